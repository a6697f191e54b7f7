"""The launcher's last checks before a sweep starts: what it needs from this machine and its services.

The storage folder and the tracking store can be written (nothing is created to find out), a tracking
server answers within a few seconds, every trial's resources fit this machine (local Ray), and the
pretrained weights the trials load are cached here or downloadable (each setting's ``check_reachable``).
Each failure is one ``ConfigError`` line naming the value. ``--dry-run`` skips these: it checks the
declaration and the data only, so a sweep meant for a cluster can be dry-run on a laptop.

On a cluster (RAY_ADDRESS set) resources and weights are not checked here: the driver's machine is not
where the trials run. Ray then schedules each trial on a node that fits it; a request no node (nor the
autoscaler's largest node type) can satisfy waits, and Tune warns about it in the driver's log.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from smear.configs import ConfigError
from smear.hub import PROBE_TIMEOUT_S


def check_environment(sweep, *, storage: str, tracking_uri: str) -> None:
    """Every check of this module, cheapest first (the server probe, up to a few seconds, last)."""
    check_folder("--storage", storage)
    check_tracking_store(tracking_uri)
    if not os.environ.get("RAY_ADDRESS"):
        check_local_resources(sweep)
        check_weights(sweep)
    probe_tracking_server(tracking_uri)


def check_folder(label: str, value: str, folder: str | None = None) -> None:
    """``value`` (a local path or a file:// URI; other URIs are the storage service's business) is a folder
    or can be created as one by this user: the nearest existing ancestor is a writable folder. ``folder``:
    the folder to check when it is not ``value`` itself (a sqlite store's)."""
    if folder is None and "://" in value and not value.startswith("file://"):
        return
    path = Path(folder if folder is not None else value.removeprefix("file://")).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{label}={value!r}: {path} is a file; valid: a folder (existing, or one that can be created)")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{label}={value!r} cannot be created: {existing} is a file; valid: a path under a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{label}={value!r} cannot be written: no write permission in {existing}; "
                          "valid: a folder this user can write")


def check_tracking_store(uri: str) -> None:
    """A sqlite:/// store's database file can be created (MLflow creates its folder too); a file store's folder can."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if db.is_dir():
            raise ConfigError(f"tracking URI {uri!r} names a folder; valid: sqlite:///PATH/TO/FILE.db")
        check_folder("tracking URI", uri, str(db.parent))
    elif uri.startswith("file:"):
        check_folder("tracking URI", uri, uri.removeprefix("file:").removeprefix("//"))
    elif "://" not in uri:
        check_folder("tracking URI", uri)


def probe_tracking_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """An http(s) tracking server answers within ``timeout`` seconds (any HTTP status counts, a request
    for credentials too, but not a gateway's 502 / 503 / 504 for a server behind it). A plain request, not
    MLflow's client, which retries for minutes."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        # a fresh opener: urlopen() would install a process-wide one with this moment's proxies
        urllib.request.build_opener().open(f"{uri.rstrip('/')}/health", timeout=timeout).close()
        return
    except urllib.error.HTTPError as e:
        if e.code not in (502, 503, 504):
            return
        reason = f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        reason = str(getattr(e, "reason", e))
    raise ConfigError(f"tracking URI {uri!r} does not answer within {timeout:g} s ({reason}); valid: a running "
                      "MLflow server (mlflow server --host ... --port ...), or a sqlite:/// store")


def trial_needs(sweep, config: dict[str, Any]) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds on a node: its own request, plus its Ray Train workers' when it has several."""
    from trainables.ray_trainable import trial_resources

    r = sweep.resources[config["setting"]]
    own = trial_resources(_typed(config), r["cpu"], r["gpu"])
    n = config["num_workers"]
    workers = (n * r["cpu"], n * r["gpu"]) if n > 1 else (0.0, 0.0)
    return own["cpu"] + workers[0], own.get("gpu", 0.0) + workers[1]


def check_local_resources(sweep) -> None:
    """With local Ray, every trial must fit this machine (Ray's local node has os.cpu_count() CPUs and the
    GPUs torch sees): a larger request would wait forever. ``use_gpu`` needs a GPU here too."""
    import torch

    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    seen: set[tuple] = set()
    for t in sweep.trials:
        c = t.config
        key = (c["setting"], c["num_workers"], c["use_gpu"])
        if key in seen:
            continue
        seen.add(key)
        cpu, gpu = trial_needs(sweep, c)
        if cpu > cpus or gpu > gpus:
            workers = f" ({c['num_workers']} workers)" if c["num_workers"] > 1 else ""
            raise ConfigError(f"a trial asks for cpu={cpu:g}, gpu={gpu:g}{workers}, but this machine has cpu={cpus}, "
                              f"gpu={gpus}; valid: resources within them (resources / --cpus-per-trial / "
                              "--gpus-per-trial), or a cluster (RAY_ADDRESS)")
        if c["use_gpu"] and gpus == 0:
            raise ConfigError("use_gpu=True but torch sees no CUDA device on this machine; valid: use_gpu: false, "
                              "or a GPU machine or cluster (RAY_ADDRESS)")


def check_weights(sweep) -> None:
    """Each setting's :meth:`~trainables.settings.Setting.check_reachable` over its trials' configs."""
    from trainables.settings import get_setting

    by_setting: dict[str, list[dict]] = {}
    for t in sweep.trials:
        by_setting.setdefault(t.config["setting"], []).append(t.config)
    for name, configs in by_setting.items():
        get_setting(name).check_reachable(configs)


def _typed(config: dict[str, Any]):
    from trainables.config import make_config

    return make_config(config)
