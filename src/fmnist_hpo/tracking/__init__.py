"""The record, and the only wing that imports mlflow.

The SQLite store, the sweep's writer, the readers, the registry and the tag names.
"""
