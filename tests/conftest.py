"""Shared fixtures: the offline data stand-ins (generated once per session), subprocess environment."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import VENV_BIN


@pytest.fixture(scope="session")
def data_home(tmp_path_factory) -> Path:
    """A SMEAR_DATA_DIR for the whole session: both offline stand-ins are generated in it once."""
    return tmp_path_factory.mktemp("smear-data")


@pytest.fixture(scope="session")
def digits_root(data_home) -> Path:
    from smear.data.digits_domainnet import write_digits_domainnet

    return write_digits_domainnet(data_home / "digits-domainnet")


@pytest.fixture(scope="session")
def glue_root(data_home) -> Path:
    from smear.data.synthetic_glue import write_synthetic_glue

    return write_synthetic_glue(data_home / "synthetic-glue")


@pytest.fixture
def offline_data(data_home, digits_root, glue_root, monkeypatch) -> Path:
    """Point this process's offline data at the session's stand-ins."""
    monkeypatch.setenv("SMEAR_DATA_DIR", str(data_home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(data_home / "hf-cache"))
    return data_home


@pytest.fixture
def env_with_venv(data_home, digits_root, glue_root) -> dict[str, str]:
    """Environment for subprocesses: the project's interpreter first on PATH, data pre-generated."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["SMEAR_DATA_DIR"] = str(data_home)
    env["HF_DATASETS_CACHE"] = str(data_home / "hf-cache")
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env
