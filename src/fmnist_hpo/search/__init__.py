"""Sweeps: the driver, the Hyperopt and Ray engines, trials as runs, resume, pruning, packing, preflight and progress.

The only wing that imports hyperopt and ray.
"""
