"""The experiment spec: its sections, loading and `--set` overrides, the search space and the JSON Schema.

No torch, mlflow or hyperopt at import: the spec is read where only numpy, pyyaml and pydantic are installed.
"""
