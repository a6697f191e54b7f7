"""Build and run the sweep's Ray Tune Tuner: the trainable with each trial's resources, the search
algorithm and scheduler, the MLflow tracker as a callback, and ``--resume`` of an interrupted sweep.

Only public Ray APIs. Local sweeps get a fresh local Ray instance (:func:`start_local_ray`).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path

from ray.tune import Callback

from service.spaces import Sweep, param_space
from service.progress import SweepProgress
from service.storage_guard import StorageGuard
from service.tracking import MLflowTracker
from trainables.ray_trainable import trial


def start_local_ray(**init_kwargs) -> None:
    """Start a fresh local Ray instance for this sweep, never a stale one found in /tmp/ray.

    Ray's state API (which Ray Train V2 calls from its detached PlacementGroupCleaner) finds "the" cluster
    through /tmp/ray/ray_current_cluster, which every ``ray start`` writes and ``ray stop`` leaves behind.
    With a stale file there, each data-parallel trial waited 12 s for that actor to stop, and the next one's
    workers never started (measured: BENCHMARKS.md, "Ray Train start-up"). So the dashboard (the state
    API's server) gets a known free port, and every process of the instance is told it through
    RAY_API_SERVER_ADDRESS, which the raylet and its workers inherit from this process.
    """
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=False, **init_kwargs)


def connect_ray(**init_kwargs) -> None:
    """The cluster named by RAY_ADDRESS (``ray job submit`` sets it; ``init_kwargs`` go to ``ray.init``),
    else a fresh local instance."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(**init_kwargs)
        else:
            start_local_ray()


def _search_and_scheduler(sweep: Sweep):
    """Tune's search algorithm and trial scheduler for the declaration."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    search_alg = None
    if sweep.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=0)
        if sweep.seeds:
            from service.repeat import SeedRepeater

            search_alg = SeedRepeater(search_alg, sweep.seeds)
        if sweep.max_concurrent_trials:
            search_alg = ConcurrencyLimiter(search_alg, max_concurrent=sweep.max_concurrent_trials)
    if sweep.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", **sweep.asha_params())
    else:
        scheduler = FIFOScheduler()
    return search_alg, scheduler


# The sweep's console: service.progress.SweepProgress. A sweep started before it pickled its progress callback
# as service.runner.ProgressLine (tuner.pkl): --resume of such a sweep unpickles it through this name.
ProgressLine = SweepProgress


class StateBackup(Callback):
    """Keeps a last readable copy of Tune's experiment state next to it, for ``--resume``.

    Tune (2.60, ``TuneController.save_to_dir``) rewrites ``experiment_state-*.json`` in place. A driver killed
    while it writes (a trial's end forces a write, so "killed right after a trial finished" hits it) leaves
    the file truncated, and ``Tuner.restore`` then fails. After each controller step, a changed, parseable
    state file is copied (atomically) to ``<file>.last-good``; :func:`repair_experiment_state` puts that copy
    back before a resume. A copy a little older than the lost file is safe: trials it still shows running
    continue from their newest complete checkpoint, and a trial the journal holds as FINISHED is not
    re-run (trainables/ray_trainable.py). Local storage only (cloud storage is written by Tune's syncer)."""

    SUFFIX = ".last-good"

    def __init__(self, exp_path: str):
        self.exp_path, self._copied = exp_path, {}

    def on_step_end(self, iteration, trials, **info):
        self.backup()

    def on_experiment_end(self, trials, **info):
        self.backup()

    def backup(self) -> None:
        if "://" in self.exp_path:
            return
        for f in Path(self.exp_path).glob("experiment_state-*.json"):
            try:
                st = f.stat()
                if self._copied.get(f.name) == (st.st_mtime_ns, st.st_size) or not state_is_whole(f, st.st_size):
                    continue  # unchanged, or being written: the next step copies it
                tmp = f.with_name(f.name + self.SUFFIX + ".tmp")
                shutil.copyfile(f, tmp)
                if (f.stat().st_mtime_ns, f.stat().st_size) != (st.st_mtime_ns, st.st_size):
                    tmp.unlink(missing_ok=True)  # rewritten while copied: the next step copies it
                    continue
                os.replace(tmp, f.with_name(f.name + self.SUFFIX))
            except OSError:  # a full or failing storage: the sweep's own writes say so; a backup never fails it
                f.with_name(f.name + self.SUFFIX + ".tmp").unlink(missing_ok=True)
                continue
            self._copied[f.name] = (st.st_mtime_ns, st.st_size)


# The end of Tune's (2.60) experiment state, written last by its json.dump (TuneController.save_to_dir: the keys
# trial_data, runner_data, stats, in that order; the trials' states inside are JSON strings, their quotes escaped)
_STATE_END = re.compile(rb'"stats": \{"start_time": [-+0-9.eE]+\}\}\s*$')


def state_is_whole(f: Path, size: int) -> bool:
    """Whether Tune's state file ``f`` is complete: its last bytes are the end Tune writes last, else (another
    layout) it parses. A sweep of 1,000 trials has an ~80 MB state: parsing it after every change of it held
    Tune's loop ~10 s on 2 busy cores (BENCHMARKS.md, "Scale"); its last 256 bytes take microseconds."""
    with open(f, "rb") as fh:
        fh.seek(max(0, size - 256))
        if _STATE_END.search(fh.read()):
            return True
    try:
        json.loads(f.read_text())
        return True
    except ValueError:
        return False


def repair_experiment_state(exp_path: str) -> list[str]:
    """Before a resume: each unreadable ``experiment_state-*.json`` (a driver killed mid-write) replaced by its
    :class:`StateBackup` copy. Returns the files repaired."""
    repaired = []
    if "://" in exp_path:
        return repaired
    for f in Path(exp_path).glob("experiment_state-*.json"):
        good = f.with_name(f.name + StateBackup.SUFFIX)
        try:
            json.loads(f.read_text())
        except ValueError:
            if good.exists():
                os.replace(good, f)
                repaired.append(f.name)
    return repaired


def quiet_tune_logs() -> None:
    """Under the default console, the two log lines of Ray Tune (2.60) that its ``verbose=0`` leaves on:
    TensorboardX's warning on a result value it cannot write, which prints the value (the routing heatmap's
    group names), and the hint that experiment snapshots are frequent, printed every few seconds while short
    trials end (its environment variable, if the user set none; Tune reads it when the sweep starts)."""
    logging.getLogger("ray.tune.logger.tensorboardx").setLevel(logging.ERROR)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def build_tuner(sweep: Sweep, *, name: str, storage: str, tracker: MLflowTracker, tracking, resume: bool,
                verbose: bool = False, trainable=trial):
    """The Tuner. On resume, Tune restores the pickled tracker (which finds this process's replica of the
    sweep's journal again: service/tracking.py) and the sweep's console as it started (its RunConfig:
    ``verbose`` applies to a new sweep).

    The console (service/progress.py): one live display on a terminal, one line per trial end elsewhere.
    ``verbose``: Ray Tune's own trial tables and results too (with the plain lines, which suit them). Every
    trial is resolved through the tracker's :class:`~trainables.identity.SweepTrials` (the sweep's one).
    ``trainable``: the function each trial runs, called with ``trial``'s keywords (benchmarks/scale.py gives one
    that only sleeps and reports, to measure the service's own cost at scale).
    """
    from ray import tune

    if not verbose:
        quiet_tune_logs()
    exp_path = experiment_path(storage, name)
    trials = tracker.trials
    # on resume, the trials the journal holds as FINISHED report their final metrics and end: Tune's saved
    # state can predate their end (a driver killed right after it), and they must not train or log again
    finished = tracker.finished_trials() if resume else None
    trainable = tune.with_resources(
        tune.with_parameters(trainable, trials=trials, train_storage=f"{exp_path}/_train", tracking=tracking,
                             experiment_path=exp_path, finished=finished),
        lambda config: trials.resources_of(config).placement_group())
    if resume:
        for f in repair_experiment_state(exp_path):
            print(f"resume: Tune's {f} was cut short (the driver died while writing it): its last complete copy "
                  "is used", flush=True)
        return tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=param_space(sweep))
    search_alg, scheduler = _search_and_scheduler(sweep)

    def run_name(t) -> str:  # Tune's trial name and folder: the MLflow run's name
        return trials.run_name(t.config, t.trial_id)

    tuner = tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode="max", search_alg=search_alg, scheduler=scheduler,
            # the next trial runs in the finished one's process: no new Python, no re-import of torch
            # and the project (BENCHMARKS.md, "Sweep overhead")
            reuse_actors=True,
            num_samples=sweep.num_trials if sweep.search == "optuna" else 1,
            trial_name_creator=run_name, trial_dirname_creator=run_name,
            max_concurrent_trials=None if search_alg is not None else (sweep.max_concurrent_trials or None)),
        run_config=tune.RunConfig(
            # Tune's tables print each trial's final result, lists and all (the routing heatmap): off unless asked
            name=name, storage_path=storage, verbose=1 if verbose else 0,
            callbacks=[tracker, SweepProgress(sweep.num_trials, sweep.metric, trials, live=False if verbose else None),
                       StateBackup(exp_path), StorageGuard(tracker)],  # the guard last: it ends the sweep
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures)),
    )
    return tuner


def can_resume(storage: str, name: str) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(experiment_path(storage, name))


def experiment_path(storage: str, name: str) -> str:
    """Where Tune keeps the sweep ``name`` under ``storage`` (a folder or a cloud URI)."""
    return f"{storage.rstrip('/')}/{name}"
