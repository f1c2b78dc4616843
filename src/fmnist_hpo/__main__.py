from fmnist_hpo.cli.app import entry

entry()
