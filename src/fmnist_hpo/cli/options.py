"""Options several command groups share."""

from __future__ import annotations

from typing import Annotated

import typer

TrackingOption = Annotated[str | None, typer.Option(help="MLflow tracking URI (default: sqlite:///mlflow.db)")]
DatasetOption = Annotated[str | None, typer.Option(
    help="fashion-mnist, mnist or kmnist; must be the one the model was trained on (default: that one)")]
