"""Shared fixtures: the offline digits DomainNet stand-in (generated once per session), tiny configs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from smear.data.digits_domainnet import write_digits_domainnet

    return write_digits_domainnet(tmp_path_factory.mktemp("data") / "digits-domainnet")


@pytest.fixture
def env_with_venv(digits_root) -> dict[str, str]:
    """Environment for subprocesses: the project's interpreter first on PATH, data pre-generated."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["SMEAR_DATA_DIR"] = str(digits_root)
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env
