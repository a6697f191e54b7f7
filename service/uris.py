"""Where a sweep's records and results go: the MLflow tracking URI and the storage location, inputs of both
the launcher (``service/inputs.py``, its input boundary) and the report, checked the same way wherever they come
from (a flag or the environment).

Imports stay light (the standard library; smear.configs' ConfigError, which imports torch, only to refuse).
"""
from __future__ import annotations

import os
from pathlib import Path

SCHEMES = {"tracking": ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks"),
           "storage": ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "file")}


def check_uri(where: str, value: str, kind: str) -> None:
    """A tracking URI or storage location (``kind``), wherever it came from (``where``: a flag or an environment
    variable): not empty, printable, and of a scheme the sweep can use."""
    from smear.configs import ConfigError  # the launcher's refusal (one line, exit 2)

    if not value.strip():
        raise ConfigError(f"{where}={value!r} is empty; valid: a path or a URI")
    if not value.isprintable():
        raise ConfigError(f"{where}={value!r} has control characters; valid: a path or a URI")
    scheme = value.split("://", 1)[0] if "://" in value else None
    if scheme is not None and scheme not in SCHEMES[kind]:
        raise ConfigError(f"{where}={value!r} has an unknown scheme {scheme!r}; valid: {', '.join(SCHEMES[kind])}")


def resolve_tracking_uri(arg: str | None) -> str:
    """``arg``, else $MLFLOW_TRACKING_URI, else sqlite:///$PWD/mlflow.db; a relative sqlite path made absolute
    (trials chdir into their folders: a relative path would land there). The environment's value is checked as
    the flag's is (:func:`check_uri`)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if arg is None and env is not None:
        check_uri("MLFLOW_TRACKING_URI", env, "tracking")
    uri = arg or env or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri
