"""The MLflow record of a sweep, written from the driver only: one parent run, one child run per trial.

Why not Ray's MLflowLoggerCallback (ray-mlflow.md): it duplicates runs after ``Tuner.restore``, leaves
runs RUNNING, makes two HTTP calls per metric, and does not nest. This callback keeps a
trial_id -> run_id map in its saved state (and finds runs by their ``trial_id`` tag when that state is
lost), logs each result with one ``log_batch``, nests child runs under the parent
(``mlflow.parentRunId``), ends runs FINISHED / FAILED, and keeps the sweep going through a tracking
outage (results logged while the store is down are dropped with a warning, never the trial).
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from smear.configs import flatten
from trainables.loop import ROUTING_HEATMAP
from trainables.ray_trainable import trial_config
from trainables.settings import get_setting

log = logging.getLogger(__name__)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
EVAL_KEY = "train/loss"  # in every evaluation report of the train loop, never in its final (test) report
MAX_PARAM_LEN = 6000


def get_or_create_experiment(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root, tags=EXPERIMENT_KIND)


def trial_run_name(config: dict[str, Any], trial_id: str) -> str:
    """Readable, deterministic: method, seed, then the trial id (e.g. ``smear-s0-a1b2c_00000``)."""
    return f"{config['routing']['method']}-s{config['seed']}-{trial_id}"


class MLflowTracker(Callback):
    """Tune callback: one MLflow child run per trial under ``parent_run_id``.

    A trial's ``ray.tune.report`` waits until the driver has run every callback on that result (measured:
    a 0.2 s callback added 0.2 s per report to the trial). So the callback methods only queue their MLflow
    calls, which one logging thread makes in order. ``flush()`` waits for the queue to drain; the sweep
    calls it (through ``on_experiment_end`` or ``close_unfinished``) before it reads the record back.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str, tags: dict[str, str],
                 configs: list[dict] | None = None):
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self.configs = configs  # grid / random sweeps: Tune's config is an index into these
        self.sweep, self.tags = sweep, dict(tags)
        self.runs: dict[str, str] = {}   # trial_id -> run_id
        self.seconds = 0.0               # the logging thread's time in MLflow calls
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._last_step: dict[str, int] = {}  # trial_id -> newest evaluation step in its run (see _result)
        self._client: MlflowClient | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    _RUNTIME = ("_client", "_queue", "_thread", "_lock", "_last_step")

    def __getstate__(self) -> dict:  # Tune pickles callbacks: plain data only, never the client or the thread
        with self._lock:
            return {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME} | {"runs": dict(self.runs)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_runtime()
        MLflowTracker.restored = self  # Tuner.restore unpickles the sweep's tracker: the launcher uses this one

    restored: "MLflowTracker | None" = None

    # Tune saves/restores callbacks with the experiment state: keep only plain data.
    def get_state(self) -> dict | None:
        with self._lock:
            return {"runs": dict(self.runs)}

    def set_state(self, state: dict) -> None:
        with self._lock:
            self.runs.update(state.get("runs", {}))

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    # -- the logging thread ------------------------------------------------------------------------------
    def _submit(self, fn, *args) -> None:
        """Queue ``fn(*args)`` for the logging thread (started on first use)."""
        if self._thread is None or not self._thread.is_alive():
            self._queue = self._queue or queue.Queue()
            self._thread = threading.Thread(target=self._drain, name="mlflow-tracker", daemon=True)
            self._thread.start()
        self._queue.put((fn, args))

    def _drain(self) -> None:
        while True:
            fn, args = self._queue.get()
            try:
                fn(*args)
            except Exception:  # a bug here must not kill the thread: later calls still get logged
                log.exception("MLflow tracker: %s failed", getattr(fn, "__name__", fn))
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every queued MLflow call has been made."""
        if self._queue is not None and self._thread is not None and self._thread.is_alive():
            self._queue.join()

    def _safe(self, what: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # tracking outage: keep the sweep running
            log.warning("MLflow %s failed (%s); continuing without it", what, str(e).splitlines()[0][:200])
            return None
        finally:
            self.seconds += time.perf_counter() - t0  # time spent logging (BENCHMARKS.md)

    def _find_run(self, trial_id: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.trial_id = '{trial_id}' and tags.mlflow.parentRunId = '{self.parent_run_id}'",
            max_results=1)
        return runs[0].info.run_id if runs else None

    def _run_for(self, tid: str, cfg: dict) -> str | None:
        """The trial's run: from the saved map, else found by its trial_id tag, else created (logging thread)."""
        with self._lock:
            if tid in self.runs:
                return self.runs[tid]
        run_id = self._safe("search", self._find_run, tid)
        if run_id is None:
            tags = {**self.tags, "mlflow.parentRunId": self.parent_run_id, "sweep": self.sweep, "trial_id": tid,
                    "method": cfg["routing"]["method"], "seed": str(cfg["seed"]),
                    **get_setting(cfg["setting"]).record_tags(cfg)}  # setting, its metric names and groups
            run = self._safe("create_run", self.client.create_run, self.experiment_id,
                             run_name=trial_run_name(cfg, tid), tags=tags)
            if run is None:
                return None
            run_id = run.info.run_id
            params = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(flatten(cfg).items())]
            for i in range(0, len(params), 100):
                self._safe("log params", self.client.log_batch, run_id, params=params[i:i + 100])
            self._safe("log config", self.client.log_dict, run_id, cfg, "config.json")
        with self._lock:
            self.runs[tid] = run_id
        return run_id

    def _cfg(self, trial) -> dict:
        return trial_config(trial.config, self.configs)

    # -- Tune's hooks: capture what is needed now, log on the thread ---------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self._submit(self._start, trial.trial_id, self._cfg(trial))

    on_trial_restore = on_trial_start

    def _start(self, tid: str, cfg: dict) -> None:
        run_id = self._run_for(tid, cfg)
        if run_id:
            self._safe("set RUNNING", self.client.update_run, run_id, status="RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._submit(self._result, trial.trial_id, self._cfg(trial), dict(result), int(time.time() * 1000))

    def _last_logged_step(self, tid: str, run_id: str) -> int:
        """The newest evaluation step already in the trial's run: from this process's own logging, else (a
        trial first seen here: a resumed sweep, a new driver) read back from MLflow once."""
        if tid not in self._last_step:
            history = self._safe("read history", self.client.get_metric_history, run_id, EVAL_KEY) or []
            self._last_step[tid] = max((m.step for m in history), default=-1)
        return self._last_step[tid]

    def _result(self, tid: str, cfg: dict, result: dict, now: int) -> None:
        run_id = self._run_for(tid, cfg)
        if run_id is None:
            return
        heat = result.get(ROUTING_HEATMAP)
        if isinstance(heat, dict) and heat.get("blocks"):
            self._safe("log heatmap", self._log_heatmap, run_id, heat, trial_run_name(cfg, tid))
        step = int(result.get("step", result.get("training_iteration", 0)))
        final = bool(result.get("done")) and EVAL_KEY not in result
        last = self._last_logged_step(tid, run_id)
        if not final and step <= last:
            return  # a trial restored from an older checkpoint re-trains steps already in the record: log once
        if not final:
            self._last_step[tid] = step
        metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                   if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   and not (final and k.startswith("val/"))]  # the final report repeats val/best_*: once is enough
        for i in range(0, len(metrics), 1000):
            self._safe("log_batch", self.client.log_batch, run_id, metrics=metrics[i:i + 1000])

    def _log_heatmap(self, run_id: str, heat: dict, title: str) -> None:
        import matplotlib.pyplot as plt

        from service.plots import routing_heatmaps

        self.client.log_dict(run_id, heat, "routing/heatmaps.json")
        fig = routing_heatmaps(heat, title)
        self.client.log_figure(run_id, fig, "routing/heatmaps.png")
        plt.close(fig)

    def on_trial_complete(self, iteration, trials, trial, **info):
        ckpt = getattr(trial, "checkpoint", None)  # the latest checkpoint holds best.pt, the best-validation weights
        self._submit(self._end, trial.trial_id, self._cfg(trial), "FINISHED",
                     {"best_checkpoint": f"{ckpt.path}/best.pt"} if ckpt is not None else {})

    def on_trial_error(self, iteration, trials, trial, **info):
        err = getattr(trial, "error_file", None)
        msg = Path(err).read_text()[-4000:] if err and Path(err).is_file() else ""
        self._submit(self._end, trial.trial_id, self._cfg(trial), "FAILED", {"error": msg or "trial failed"})

    def _end(self, tid: str, cfg: dict, status: str, tags: dict[str, str]) -> None:
        run_id = self._run_for(tid, cfg)
        if run_id:
            for k, v in tags.items():
                self._safe(f"tag {k}", self.client.set_tag, run_id, k, v)
            self._safe("end run", self.client.set_terminated, run_id, status)

    def on_experiment_end(self, trials, **info):
        self.flush()

    def close_unfinished(self, status: str = "KILLED") -> None:
        """Log what is queued, then end every run of this sweep still RUNNING (sweep interrupted or crashed)."""
        self.flush()
        for run_id in list(self.runs.values()):
            run = self._safe("get run", self.client.get_run, run_id)
            if run is not None and run.info.status == "RUNNING":
                self._safe("end run", self.client.set_terminated, run_id, status)
