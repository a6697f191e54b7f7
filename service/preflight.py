"""The launcher's last checks before a sweep starts: what it needs from this machine and its services.

The storage folder and the tracking store can be written (nothing is created to find out), a tracking
server answers within a few seconds, every trial's resources fit this machine (local Ray) or the nodes the
cluster has or can start (RAY_ADDRESS), and the pretrained weights the trials load are cached or
downloadable (each setting's ``check_reachable``) here, or on each live node of the cluster that can run
a trial. Each failure is one ``ConfigError`` line naming the value. ``--dry-run`` skips these: it checks
the declaration and the data only, so a sweep meant for a cluster can be dry-run on a laptop.

On a cluster the node shapes come from the cluster itself (service/cluster_shapes.py): its live nodes and
the node types its autoscaler can start. A request no shape can hold would otherwise wait in Tune forever.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

from service.refusal import first_line
from smear.configs import ConfigError


def check_environment(sweep, *, storage: str, tracking_uri: str) -> None:
    """Every check of this module, cheapest first (the server probe, up to a few seconds, last)."""
    from service.probes import probe_ray_address, probe_storage, probe_tracking

    check_folder("--storage", storage)
    check_tracking_store(tracking_uri)
    if not os.environ.get("RAY_ADDRESS"):
        check_local_resources(sweep)
        check_weights(sweep)
    probe_tracking(tracking_uri)  # opened as the sweep will open it, in seconds (service/probes.py)
    probe_storage(storage)
    if os.environ.get("RAY_ADDRESS"):  # connects to the cluster (nothing is created there or here)
        probe_ray_address(os.environ["RAY_ADDRESS"])
        import logging

        from service.cluster_shapes import cluster_shapes
        from service.runner import connect_ray

        try:  # quietly: a refusal is one line, not Ray's INFO lines first
            connect_ray(logging_level=logging.WARNING)
        except ConnectionError as e:  # answered the probe, then refused the connection (auth, version)
            raise ConfigError(f"RAY_ADDRESS={os.environ['RAY_ADDRESS']!r}: Ray refused the connection "
                              f"({first_line(e)}); valid: a cluster this driver can join") from None
        check_cluster_resources(sweep, cluster_shapes())
        check_weights_on_nodes(sweep)
        logging.getLogger("ray").setLevel(logging.INFO)  # Ray's default for the sweep itself


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
        why = "a read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "no write permission"
        raise ConfigError(f"{label}={value!r} cannot be written: {why} in {existing}; "
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


def distinct_trials(sweep):
    """One config per (setting, num_workers, use_gpu): the keys its resource needs depend on."""
    seen: dict[tuple, dict] = {}
    for t in sweep.trials:
        c = t.config
        seen.setdefault((c["setting"], c["num_workers"], c["use_gpu"]), c)
    return list(seen.values())


def check_local_resources(sweep) -> None:
    """With local Ray, every trial must fit this machine (Ray's local node has os.cpu_count() CPUs and the
    GPUs torch sees): a larger request would wait forever. ``use_gpu`` needs a GPU here too."""
    import torch

    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    trials = sweep.identity()
    for c in distinct_trials(sweep):
        cpu, gpu = trials.resources_of(c).total
        if cpu > cpus or gpu > gpus:
            workers = f" ({c['num_workers']} workers)" if c["num_workers"] > 1 else ""
            raise ConfigError(f"a trial asks for cpu={cpu:g}, gpu={gpu:g}{workers}, but this machine has cpu={cpus}, "
                              f"gpu={gpus}; valid: resources within them (resources / --cpus-per-trial / "
                              "--gpus-per-trial), or a cluster (RAY_ADDRESS)")
        if c["use_gpu"] and gpus == 0:
            raise ConfigError("use_gpu=True but torch sees no CUDA device on this machine; valid: use_gpu: false, "
                              "or a GPU machine or cluster (RAY_ADDRESS)")


def check_cluster_resources(sweep, shapes) -> None:
    """On a cluster, every trial's bundles fit the nodes it has or can start: each bundle one node, and as
    many bundles of a kind (its Ray Train workers) as there are nodes to hold them; ``use_gpu`` needs a
    shape with a GPU. ``shapes``: :class:`service.cluster_shapes.Shapes`. A node type whose resources are
    unknown (left to the provider) could be anything: then nothing is refused, only a sure refusal is made."""
    if shapes.unknown:
        print(f"launch.py: note: trial resources not checked against the cluster: {', '.join(shapes.unknown)} "
              "unknown", file=sys.stderr)
        return
    where = f"the cluster at RAY_ADDRESS={os.environ.get('RAY_ADDRESS')}"
    trials = sweep.identity()
    for c in distinct_trials(sweep):
        workers = f" ({c['num_workers']} workers)" if c["num_workers"] > 1 else ""
        for (cpu, gpu), n in Counter(trials.resources_of(c).bundles).items():
            room = shapes.room_for(cpu, gpu)
            if room == 0:
                raise ConfigError(f"a trial asks for cpu={cpu:g}, gpu={gpu:g} on one node{workers}, but no node of "
                                  f"{where} has or can start that: {shapes.describe()}; valid: resources within one "
                                  "of these (resources / --cpus-per-trial / --gpus-per-trial), or a node type that "
                                  "has them")
            if room < n:
                raise ConfigError(f"a trial asks for {n} workers of cpu={cpu:g}, gpu={gpu:g}, but {where} has or "
                                  f"can start nodes for at most {room:g} of them ({shapes.describe()}); valid: "
                                  "num_workers within that, smaller resources, or more nodes (max_workers)")
        if c["use_gpu"] and not any(s.gpu > 0 for s in shapes.all):
            raise ConfigError(f"use_gpu=True but no node of {where} has or can start a GPU: {shapes.describe()}; "
                              "valid: use_gpu: false, or a GPU node type")


def check_weights(sweep) -> None:
    """Each setting's :meth:`~trainables.settings.Setting.check_reachable` over its trials' configs."""
    _check_reachable(_configs_by_setting(sweep))


def _configs_by_setting(sweep) -> dict[str, list[dict]]:
    by_setting: dict[str, list[dict]] = {}
    for t in sweep.trials:
        by_setting.setdefault(t.config["setting"], []).append(t.config)
    return by_setting


def _check_reachable(by_setting: dict[str, list[dict]]) -> None:
    from trainables.settings import get_setting

    for name, configs in by_setting.items():
        get_setting(name).check_reachable(configs)


def _reachable_here(by_setting: dict[str, list[dict]]) -> str | None:
    """On a node of the cluster: :func:`_check_reachable`'s one-line message, or None when all is there."""
    try:
        _check_reachable(by_setting)
    except ConfigError as e:
        return str(e)
    return None


NODE_CHECK_TIMEOUT_S = 120  # a node's first task sets up the job's runtime env (its working_dir) first


def check_weights_on_nodes(sweep, timeout: float = NODE_CHECK_TIMEOUT_S) -> None:
    """On a cluster: :func:`check_weights` on every live node that can run a trial (CPUs > 0), as a zero-CPU
    task pinned to it, in the job's runtime env (the weights must be in that node's caches or downloadable
    from it). A node that does not answer in ``timeout`` is named on stderr and left to its trials; so are
    the nodes the autoscaler starts later, which do not exist yet."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    by_setting = _configs_by_setting(sweep)
    task = ray.remote(num_cpus=0, max_retries=0)(_reachable_here)
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(by_setting)
            for n in nodes]
    if not refs:
        return
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    for node, ref in zip(nodes, refs):
        where = f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]})"
        if ref not in done:
            print(f"launch.py: note: {where} did not answer the pretrained-weights check in {timeout:g} s; "
                  "its trials load the weights themselves", file=sys.stderr)
            continue
        try:
            message = ray.get(ref)
        except Exception as e:  # the check itself failed there (runtime env, import): left to the trials
            print(f"launch.py: note: the pretrained-weights check failed on {where}: {first_line(e)}",
                  file=sys.stderr)
            continue
        if message:
            raise ConfigError(f"on {where} of the cluster: {message}")


def check_sweep_name(storage: str, name: str | None, *, resume: bool, extend: bool) -> None:
    """``--resume`` needs the sweep ``name`` in ``storage``; a new sweep must not reuse the name of one there
    (its experiment folder would mix two sweeps); ``--extend`` checks its own (service/extend.py)."""
    from service.runner import can_resume

    if name is None or extend:
        return
    from service.journal import journal_path

    exists = can_resume(storage, name)
    if not resume and not exists and journal_path(storage, name).is_file():  # a sweep that died before Tune began
        raise ConfigError(f"--name={name!r}: a sweep of that name has a record journal in {storage} "
                          f"({journal_path(storage, name)}); valid: a new --name")
    if resume and not exists:
        found = (sorted(p.name for p in Path(storage).glob("*") if (p / "tuner.pkl").exists())
                 if "://" not in storage and Path(storage).is_dir() else [])
        raise ConfigError(f"no sweep {name!r} to resume under {storage}; found: {', '.join(found) or 'none'}")
    if not resume and exists:
        raise ConfigError(f"--name={name!r}: a sweep of that name is already in {storage}; valid: a new --name, or "
                          "--resume (an interrupted sweep) or --extend (more seeds) to continue it")
