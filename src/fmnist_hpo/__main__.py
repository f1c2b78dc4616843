from fmnist_hpo.cli import app

app(prog_name="fmnist")
