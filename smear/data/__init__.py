"""Datasets: DomainNet (official layout), GLUE (the Hub's layout), and their offline stand-ins.

The offline stand-ins are generated on first use, on each node that needs them, under
``$SMEAR_DATA_DIR`` (default ``~/.cache/smear-sweep``); generation is atomic and idempotent.
``smear.data.check.check_domainnet`` checks a DomainNet root's lists and images before training.
``python -m smear.data.fetch domainnet|glue ROOT`` downloads the real ones (``smear.data.fetch``).
"""
from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    return Path(os.environ.get("SMEAR_DATA_DIR") or Path.home() / ".cache" / "smear-sweep")


def offline_digits_domainnet() -> str:
    """Root of the digits DomainNet stand-in, generated if missing."""
    from smear.data.digits_domainnet import write_digits_domainnet

    return str(write_digits_domainnet(data_home() / "digits-domainnet"))


def offline_synthetic_glue() -> str:
    """Root of the synthetic GLUE stand-in, generated if missing."""
    from smear.data.synthetic_glue import write_synthetic_glue

    return str(write_synthetic_glue(data_home() / "synthetic-glue"))
