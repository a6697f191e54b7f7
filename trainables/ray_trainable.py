"""Ray glue for the train loop: a Tune function trainable, and a Ray Train TorchTrainer inside it.

ray-mlflow.md (Train V2, Ray 2.60): ``Tuner(TorchTrainer(...))`` fails, so a trial is a Tune function
trainable. It runs the train loop directly when the trial needs one worker (~3 s start-up), and fits a
``TorchTrainer`` with ``TuneReportCallback`` when it asks for several data-parallel workers. The
TorchTrainer's run name is the trial id (deterministic), so a restarted trial finds its own checkpoints.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
from typing import Any

import ray.train
import ray.tune


from smear.configs import to_dict
from trainables.config import TrainConfig
from trainables.failures import StorageFull, raised, storage_full
from trainables.identity import SweepTrials
from trainables.resources import TrialResources
from trainables.session import write_artifact
from trainables.loop import train_loop
from trainables.step import NonFiniteLoss

NONFINITE_MARKER = "NONFINITE_LOSS"  # left in the trial folder: Tune's retries of that trial fail at once


def _assigned_cpus() -> float | None:
    """The CPUs Ray reserved for this trial or worker (``data.loader_workers: -1`` resolves against them)."""
    return ray.get_runtime_context().get_assigned_resources().get("CPU")


class TuneSession:
    """The train loop reports to Ray Tune (single-worker trials).

    ``trial_folder``: the trial's folder in a local sweep storage. A restored trial continues from the newest
    complete checkpoint there, which can be newer than the one Tune registered last (Tune's saved state lags
    behind an interrupted driver) or stand in for one Tune names but rotated away (trainables/checkpoints.py).
    """

    world_rank, world_size = 0, 1
    # a restored trial reports its checkpoint's evaluation again (checkpoints.replay_report): the driver's
    # tracker logs each step once, so a step the record lost is filled and a recorded one skipped
    replays_on_restore = True

    def __init__(self, trial_folder: str | None = None, artifact_folder: str | None = None):
        self.trial_folder = trial_folder
        self.artifact_folder = artifact_folder or trial_folder  # the trial's folder in any storage (URI or path)

    @property
    def cpus(self) -> float | None:
        return _assigned_cpus()

    def report(self, metrics, checkpoint_dir):
        ckpt = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=ckpt)

    def latest_checkpoint_dir(self):
        return _newest(ray.tune.get_checkpoint(), self.trial_folder)

    def release_checkpoint_dir(self, path):
        _release(path)

    def artifact(self, name, data):
        return write_artifact(self.artifact_folder or ray.tune.get_context().get_trial_dir(), name, data)


class TrainSession:
    """The train loop reports to Ray Train (each data-parallel worker).

    ``run_folder``: the Ray Train run's folder in a local (or shared) sweep storage. A retried trial's new
    TorchTrainer continues from the newest complete checkpoint there, as a Tune trial does (:class:`TuneSession`):
    it can be newer than the one Train registered (a worker killed while Train was registering it). Every
    worker reads the same folder, which no one writes while they restore, so they all restore the same one."""

    replays_on_restore = True  # as TuneSession: through TuneReportCallback to the same tracker

    def __init__(self, run_folder: str | None = None, artifact_folder: str | None = None):
        ctx = ray.train.get_context()
        self.world_rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.cpus = _assigned_cpus()
        self.run_folder = run_folder
        self.artifact_folder = artifact_folder or run_folder  # the Train run's folder in any storage

    def report(self, metrics, checkpoint_dir):
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def latest_checkpoint_dir(self):
        return _newest(ray.train.get_checkpoint(), self.run_folder)

    def release_checkpoint_dir(self, path):
        _release(path)

    def artifact(self, name, data):  # rank 0's final report is the one that reaches Tune
        return write_artifact(self.artifact_folder, name, data) if self.world_rank == 0 and self.artifact_folder \
            else None


def _newest(ckpt, folder: str | None) -> str | None:
    """The checkpoint to continue from: the newest complete one in ``folder`` (a local run or trial folder) or
    the one Ray registered (``ckpt``), read in place when local; else a temporary copy of Ray's (remote
    storage, or a checkpoint without a manifest); None when there is none (or Ray's is gone)."""
    from pathlib import Path

    from trainables.checkpoints import newest_complete

    on_disk = sorted(Path(folder).glob("checkpoint_*")) if folder else []
    registered = [ckpt.path] if ckpt is not None and os.path.isdir(ckpt.path) else []
    newest = newest_complete(on_disk + registered)
    if newest is not None:
        return newest
    try:
        return _local_dir(ckpt)
    except OSError:  # named by Ray's saved state but no longer there, and nothing newer: start over
        return None


_RESTORE_PREFIX = "smear-restore-"


def _local_dir(ckpt) -> str | None:
    """A local folder of Tune's / Train's checkpoint: itself when local, else a temporary copy."""
    if ckpt is None:
        return None
    if ckpt.filesystem.type_name == "local" and os.path.isdir(ckpt.path):
        return ckpt.path
    return ckpt.to_directory(tempfile.mkdtemp(prefix=_RESTORE_PREFIX))


def _release(path: str) -> None:
    """Delete a temporary copy made by :func:`_local_dir` (never a checkpoint folder itself)."""
    p = os.path.abspath(path)
    if os.path.basename(p).startswith(_RESTORE_PREFIX) and os.path.dirname(p) == os.path.abspath(tempfile.gettempdir()):
        shutil.rmtree(p, ignore_errors=True)


def train_worker(config: dict[str, Any], run_folder: str | None = None, artifact_folder: str | None = None) -> None:
    """Entry point of each Ray Train worker (``run_folder``, ``artifact_folder``: :class:`TrainSession`'s)."""
    from ray.train.torch import prepare_model

    train_loop(config, TrainSession(run_folder, artifact_folder), wrap_model=lambda m: prepare_model(m, move_to_device=False))


def trial(config: dict[str, Any], trials: SweepTrials, train_storage: str | None = None,
          tracking: tuple[str, str] | None = None, experiment_path: str | None = None,
          finished: dict[str, dict[str, float]] | None = None) -> None:
    """The Tune function trainable of every sweep trial (bind the keywords with tune.with_parameters).

    ``trials``: the sweep's trial identity (``trainables.identity``): Tune's ``config`` -> the trial's config
    and resources (a data-parallel trial gives each of its Ray Train workers its setting's share). With ``tracking`` = (tracking URI, experiment id), the
    trial's process logs system metrics (CPU, memory, GPU when present) to the trial's MLflow run, which
    the driver creates, tagged with the trial id. ``experiment_path``: the sweep's folder in a local storage
    (its checkpoints are found there on a restore). ``finished``: on ``--resume``, trial id -> the final
    metrics of each trial the record holds as FINISHED; such a trial reports them and ends, never trains again
    (Tune's saved state can predate its end).
    """
    ctx = ray.tune.get_context()
    if finished and ctx.get_trial_id() in finished:
        ray.tune.report({**finished[ctx.get_trial_id()], "done": 1.0})
        return
    cfg, resources = trials.typed(config), trials.resources_of(config)
    # Tune ends a trial at its final report (``done``) and, with reuse_actors, hands this process to the next
    # trial once this function has returned; it waits TUNE_FUNCTION_THREAD_TIMEOUT_S (Ray's default 2 s) and
    # otherwise puts the next trial in ERROR ("Trainable runner reuse requires reset_config()"). Read in this
    # process at that moment: a data-parallel trial's TorchTrainer can take longer than 2 s to shut down.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(REUSE_WAIT_S))
    monitor = SystemMetrics(*tracking, ctx.get_trial_id()) if tracking else None
    folder = os.path.join(experiment_path, ctx.get_trial_name()) if experiment_path and "://" not in experiment_path \
        else None
    artifacts = f"{experiment_path.rstrip('/')}/{ctx.get_trial_name()}" if experiment_path else None  # any storage
    try:
        _guarded(cfg, resources, train_storage, folder, artifacts)
    finally:
        if monitor is not None:
            monitor.stop()  # never waits on the tracking server


REUSE_WAIT_S = 120  # how long the next trial waits for this one's function to return before Tune gives up


class SystemMetrics:
    """MLflow's system-metrics monitor on a trial's run, attached and stopped off the trial's path.

    Nothing here waits on the tracking server: MLflow's monitor polls the run each interval and its
    ``finish()`` joins that thread and flushes, both through the HTTP client's retries (minutes while the
    server is down: measured, ray-mlflow.md). So attaching happens in a daemon thread, and ``stop()`` only
    signals: the monitor is finished in another daemon thread the trial never joins. During an outage the
    monitor gives up (MLflow's own loop returns on a failed call); training and the trial's end go on.
    """

    INTERVAL_S, WAIT_S = 10, 60

    def __init__(self, tracking_uri: str, experiment_id: str, trial_id: str):
        import threading

        self._monitor, self._stopped, self._lock = None, threading.Event(), threading.Lock()
        self._thread = threading.Thread(target=self._attach, args=(tracking_uri, experiment_id, trial_id),
                                        name="system-metrics-attach", daemon=True)
        self._thread.start()

    def _attach(self, tracking_uri: str, experiment_id: str, trial_id: str) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        for _ in range(self.WAIT_S):  # the driver creates the run as the trial starts: it may lag a little
            if self._stopped.is_set():
                return
            try:
                runs = client.search_runs([experiment_id], filter_string=f"tags.trial_id = '{trial_id}'", max_results=1)
                monitor = SystemMetricsMonitor(runs[0].info.run_id, sampling_interval=self.INTERVAL_S,
                                               tracking_uri=tracking_uri, resume_logging=True) if runs else None
            except Exception:
                return  # tracking unavailable: training goes on without system metrics
            if monitor is not None:
                with self._lock:  # the trial may have ended while the calls above waited on the server
                    if self._stopped.is_set():
                        return
                    self._monitor = monitor
                    monitor.start()
                return
            self._stopped.wait(1.0)

    def stop(self) -> None:
        """Signal the monitor to stop; returns at once (the monitor's last flush happens in the background)."""
        import threading

        with self._lock:
            self._stopped.set()
            monitor, self._monitor = self._monitor, None
        if monitor is not None:
            threading.Thread(target=monitor.finish, name="system-metrics-finish", daemon=True).start()


def _guarded(cfg: TrainConfig, resources: TrialResources, train_storage: str | None,
             trial_folder: str | None = None, artifacts: str | None = None) -> None:
    """Run the trial; a non-finite loss leaves a marker so that Tune's retries fail at once. A full disk (ENOSPC,
    e.g. Tune's copy of a checkpoint into the sweep's storage) is raised as :class:`StorageFull`: the driver ends
    the sweep at the first one, with no retry (service/storage_guard.py)."""
    marker = os.path.join(ray.tune.get_context().get_trial_dir(), NONFINITE_MARKER)
    if os.path.exists(marker):  # a retry after a non-finite loss fails again at once, with the same reason
        with open(marker) as f:
            raise NonFiniteLoss(f.read())
    try:
        _run(cfg, resources, train_storage, trial_folder, artifacts)
    except Exception as e:
        diverged = raised(e, NonFiniteLoss)
        if diverged is not None:
            with open(marker, "w") as f:
                f.write(str(diverged).strip().splitlines()[-1])
        if storage_full(e) is not None and not isinstance(e, StorageFull):
            raise StorageFull.of(e) from e
        raise


def _run(cfg: TrainConfig, resources: TrialResources, train_storage: str | None,
         trial_folder: str | None = None, artifacts: str | None = None) -> None:
    if not resources.data_parallel:
        train_loop(cfg, TuneSession(trial_folder, artifacts))
        return
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    ctx = ray.tune.get_context()
    # Ray Train propagates this to its controller, which polls the workers at that interval: Ray's 2 s default
    # added ~2-4 s to every trial's end (BENCHMARKS.md, "Ray Train start-up"). A user's own setting wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(TRAIN_POLL_S))
    name, storage = f"train-{ctx.get_trial_id()}", train_storage or os.path.join(ctx.get_trial_dir(), "_train")
    run_folder = os.path.join(storage, name) if "://" not in storage else None  # local or shared storage
    trainer = TorchTrainer(
        functools.partial(train_worker, run_folder=run_folder, artifact_folder=f"{storage.rstrip('/')}/{name}"),
        train_loop_config=to_dict(cfg),
        scaling_config=resources.scaling_config(),
        run_config=RunConfig(name=name, storage_path=storage, callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


TRAIN_POLL_S = 0.25  # Ray Train controller poll interval (s) in data-parallel trials
