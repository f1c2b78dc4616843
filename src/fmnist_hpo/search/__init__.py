"""Sweeps: specs run in order (run, plan), the driver (sweep) and its strategies (strategy, hyperopt_space),
the Ray engine, trials as runs, resume, pruning, packing, preflight, progress and the signal policy.

The only wing that imports hyperopt and ray.
"""
