"""Ray glue for the train loop: a Tune function trainable, and a Ray Train TorchTrainer inside it.

ray-mlflow.md (Train V2, Ray 2.60): ``Tuner(TorchTrainer(...))`` fails, so a trial is a Tune function
trainable. It runs the train loop directly when the trial needs one worker (~3 s start-up), and fits a
``TorchTrainer`` with ``TuneReportCallback`` when it asks for several data-parallel workers. The
TorchTrainer's run name is the trial id (deterministic), so a restarted trial finds its own checkpoints.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import ray.train
import ray.tune


from trainables.config import TrainConfig, make_config
from trainables.loop import NonFiniteLoss, train_loop

NONFINITE_MARKER = "NONFINITE_LOSS"  # left in the trial folder: Tune's retries of that trial fail at once


TRIAL_KEY = "trial_index"  # grid / random sweeps: Tune grids over indices into the resolved trial configs


def trial_config(config: dict[str, Any], configs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The TrainConfig dict of a Tune trial: ``configs[index]`` for grid / random sweeps (whose Tune config
    is just the index, so Tune's tables and folder names stay short), the config itself for Optuna."""
    if TRIAL_KEY in config:
        assert configs is not None, "a trial index needs the sweep's resolved configs"
        return configs[config[TRIAL_KEY]]
    return config


def _assigned_cpus() -> float | None:
    """The CPUs Ray reserved for this trial or worker (``data.loader_workers: -1`` resolves against them)."""
    return ray.get_runtime_context().get_assigned_resources().get("CPU")


class TuneSession:
    """The train loop reports to Ray Tune (single-worker trials)."""

    world_rank, world_size = 0, 1

    @property
    def cpus(self) -> float | None:
        return _assigned_cpus()

    def report(self, metrics, checkpoint_dir):
        ckpt = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=ckpt)

    def latest_checkpoint_dir(self):
        ckpt = ray.tune.get_checkpoint()
        return _local_dir(ckpt)


class TrainSession:
    """The train loop reports to Ray Train (each data-parallel worker)."""

    def __init__(self):
        ctx = ray.train.get_context()
        self.world_rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.cpus = _assigned_cpus()

    def report(self, metrics, checkpoint_dir):
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def latest_checkpoint_dir(self):
        return _local_dir(ray.train.get_checkpoint())


def _local_dir(ckpt) -> str | None:
    if ckpt is None:
        return None
    dest = tempfile.mkdtemp(prefix="smear-restore-")
    return ckpt.to_directory(dest)


def train_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker."""
    from ray.train.torch import prepare_model

    train_loop(config, TrainSession(), wrap_model=lambda m: prepare_model(m, move_to_device=False))


def trial(config: dict[str, Any], train_storage: str | None = None,
          resources: dict[str, dict[str, float]] | None = None, configs: list[dict[str, Any]] | None = None,
          tracking: tuple[str, str] | None = None) -> None:
    """The Tune function trainable of every sweep trial (bind the keywords with tune.with_parameters).

    ``resources``: setting -> {cpu, gpu} per worker (the declaration's); a data-parallel trial gives each
    of its Ray Train workers its setting's share. With ``tracking`` = (tracking URI, experiment id), the
    trial's process logs system metrics (CPU, memory, GPU when present) to the trial's MLflow run, which
    the driver creates, tagged with the trial id.
    """
    config = trial_config(config, configs)
    cfg = make_config(config)
    r = (resources or {}).get(cfg.setting, {})
    cpus_per_worker, gpus_per_worker = r.get("cpu", 1.0), r.get("gpu", 0.0)
    monitor = SystemMetrics(*tracking, ray.tune.get_context().get_trial_id()) if tracking else None
    try:
        _guarded(cfg, config, train_storage, cpus_per_worker, gpus_per_worker)
    finally:
        if monitor is not None:
            monitor.stop()


class SystemMetrics:
    """MLflow's system-metrics monitor on a trial's run, attached from a background thread (no start-up wait)."""

    INTERVAL_S, WAIT_S = 10, 60

    def __init__(self, tracking_uri: str, experiment_id: str, trial_id: str):
        import threading

        self._monitor, self._stopped = None, threading.Event()
        self._thread = threading.Thread(target=self._attach, args=(tracking_uri, experiment_id, trial_id), daemon=True)
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
            except Exception:
                return  # tracking unavailable: training goes on without system metrics
            if runs:
                self._monitor = SystemMetricsMonitor(runs[0].info.run_id, sampling_interval=self.INTERVAL_S,
                                                     tracking_uri=tracking_uri, resume_logging=True)
                self._monitor.start()
                return
            self._stopped.wait(1.0)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        if self._monitor is not None:
            self._monitor.finish()


def _guarded(cfg: TrainConfig, config: dict[str, Any], train_storage: str | None, cpus_per_worker: float,
             gpus_per_worker: float) -> None:
    """Run the trial; a non-finite loss leaves a marker so that Tune's retries fail at once."""
    marker = os.path.join(ray.tune.get_context().get_trial_dir(), NONFINITE_MARKER)
    if os.path.exists(marker):  # a retry after a non-finite loss fails again at once, with the same reason
        with open(marker) as f:
            raise NonFiniteLoss(f.read())
    try:
        _run(cfg, config, train_storage, cpus_per_worker, gpus_per_worker)
    except Exception as e:
        if isinstance(e, NonFiniteLoss) or "NonFiniteLoss" in str(e):
            with open(marker, "w") as f:
                f.write(str(e).strip().splitlines()[-1])
        raise


def _run(cfg: TrainConfig, config: dict[str, Any], train_storage: str | None, cpus_per_worker: float,
         gpus_per_worker: float) -> None:
    if cfg.num_workers <= 1:
        train_loop(cfg, TuneSession())
        return
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    ctx = ray.tune.get_context()
    # Ray Train propagates this to its controller, which polls the workers at that interval: Ray's 2 s default
    # added ~2-4 s to every trial's end (BENCHMARKS.md, "Ray Train start-up"). A user's own setting wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(TRAIN_POLL_S))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=_worker_resources(cpus_per_worker, gpus_per_worker)),
        run_config=RunConfig(name=f"train-{ctx.get_trial_id()}", storage_path=train_storage or os.path.join(ctx.get_trial_dir(), "_train"),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def _worker_resources(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


TRAIN_POLL_S = 0.25  # Ray Train controller poll interval (s) in data-parallel trials
DRIVER_CPU = 0.01  # what the trial itself holds while its Ray Train workers run (it only waits)


def trial_resources(cfg: TrainConfig, cpus_per_worker: float = 1, gpus_per_worker: float = 0) -> dict[str, float]:
    """Resources of the Tune trial itself: the worker's for one worker, ~nothing when Ray Train runs workers.

    Tune refuses an all-zero request, so a multi-worker trial holds DRIVER_CPU; its workers ask for
    ``cpus_per_worker`` / ``gpus_per_worker`` each (never fractional GPUs for several workers: NCCL).
    """
    if cfg.num_workers <= 1:
        return {"cpu": cpus_per_worker, **({"gpu": gpus_per_worker} if gpus_per_worker else {})}
    if 0 < gpus_per_worker < 1:
        from smear.configs import ConfigError

        raise ConfigError(f"resources.gpu={gpus_per_worker} is fractional with num_workers={cfg.num_workers}; "
                          "multi-worker trials need whole GPUs")
    return {"cpu": DRIVER_CPU}
