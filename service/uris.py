"""Where a sweep's records go: the MLflow tracking URI, an input of both the launcher and the report.

Imports stay light (the standard library only).
"""
from __future__ import annotations

import os
from pathlib import Path


def resolve_tracking_uri(arg: str | None) -> str:
    """``arg``, else $MLFLOW_TRACKING_URI, else sqlite:///$PWD/mlflow.db; a relative sqlite path made absolute
    (trials chdir into their folders: a relative path would land there)."""
    uri = arg or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri
