"""The record, and the only wing that imports mlflow.

store: the store itself (its URI, creating and opening it, with sqlite_store); provenance: where a run
came from; writer: the sweep's writes; reader: reading runs back; registry: trained models; serve: the UI.
The tag names and statuses on a run are the root's tags.py, since records.py reads them too.
"""
