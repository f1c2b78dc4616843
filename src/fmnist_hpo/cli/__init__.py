"""The `fmnist` command line: one module per command group; each command parses, calls one function, maps errors once."""
from fmnist_hpo.cli.app import app

__all__ = ["app"]
