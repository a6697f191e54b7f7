"""The MLflow record of a sweep, written from the driver only: one parent run, one child run per trial.

Why not Ray's MLflowLoggerCallback (ray-mlflow.md): it duplicates runs after ``Tuner.restore``, leaves
runs RUNNING, makes two HTTP calls per metric, and does not nest. This callback keeps a
trial_id -> run_id map in its saved state (and finds runs by their ``trial_id`` tag when that state is
lost), logs each result with one ``log_batch``, nests child runs under the parent
(``mlflow.parentRunId``), ends runs FINISHED / FAILED, and keeps the sweep going through a tracking
outage: Tune's hooks only queue MLflow calls; while the server does not answer, the logging thread holds
the queue (in order) and retries, then catches up when it is back. What it could not write (a call the
server refused, or a queue still waiting when the sweep ends and the wait is over) is counted and said at
the end (:meth:`MLflowTracker.record_summary`).
"""
from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from smear.configs import flatten
from trainables.names import ROUTING_HEATMAP
from trainables.identity import SweepTrials, run_name
from trainables.settings import get_setting

log = logging.getLogger(__name__)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
EVAL_KEY = "train/loss"  # in every evaluation report of the train loop, never in its final (test) report
MAX_PARAM_LEN = 6000
# The driver's MLflow HTTP calls fail within seconds when the server is down (MLflow's defaults retry each
# call for ~4 min, 120 s timeout), so the tracker knows of an outage and retries itself (see _safe). The
# user's own settings win.
FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


_DOWN = object()  # _safe: the call failed and the tracking server does not answer


def fail_fast_http() -> None:
    """Set FAIL_FAST_HTTP in this process (the driver, after Ray started: trial processes keep MLflow's)."""
    for k, v in FAIL_FAST_HTTP.items():
        os.environ.setdefault(k, v)


def server_answers(uri: str, timeout: float = 5.0) -> bool:
    """Whether the tracking store answers: an HTTP server's /health, or True for a local store (sqlite, file:
    a failure there is the store's own error, not an outage)."""
    if not uri.startswith(("http://", "https://")):
        return True
    import requests

    try:
        return requests.get(f"{uri.rstrip('/')}/health", timeout=timeout).ok
    except requests.RequestException:
        return False


def get_or_create_experiment(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root, tags=EXPERIMENT_KIND)


# How long an interrupted sweep waits for queued writes before ending its runs KILLED. `ray job stop` SIGKILLs
# the driver RAY_JOB_STOP_WAIT_TIME_S after its SIGTERM (Ray's default: 3 s): the shipped cluster configs give
# it more than this (ray_cluster.yaml, docker/kuberay-rayjob.yaml; tests/test_cluster_config.py checks).
INTERRUPT_FLUSH_S = 30


class MLflowTracker(Callback):
    """Tune callback: one MLflow child run per trial under ``parent_run_id``.

    A trial's ``ray.tune.report`` waits until the driver has run every callback on that result (measured:
    a 0.2 s callback added 0.2 s per report to the trial). So the callback methods only queue their MLflow
    calls, which one logging thread makes in order. ``flush()`` waits for the queue to drain; the sweep
    calls it (through ``on_experiment_end`` or ``close_unfinished``) before it reads the record back.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str, tags: dict[str, str],
                 trials: SweepTrials | None = None):
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self.trials = trials or SweepTrials(None, {})  # the sweep's trial identity: Tune's config -> the trial's
        self.sweep, self.tags = sweep, dict(tags)
        self.runs: dict[str, str] = {}   # trial_id -> run_id
        self.seconds = 0.0               # the logging thread's time in MLflow calls
        self.unwritten: list[str] = []   # "<what>: <reason>" of each MLflow call given up
        self.outages: list[float] = []   # seconds of each tracking outage seen (retried through)
        self.errors: dict[str, str] = {}  # trial_id -> the last line of its error (trials that failed here)
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._last_step: dict[str, int] = {}  # trial_id -> newest evaluation step in its run (see _result)
        self._finished: dict[str, bool] = {}  # trial_id -> its run had ended FINISHED when first seen here
        self._ended: set[str] = set()  # trials whose end this process has queued
        self._client: MlflowClient | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._give_up = threading.Event()  # the sweep is ending and the wait for the server is over
        self.stopped_as = "KILLED"  # a run whose trial Tune stopped unfinished at the end (FAILED: storage full)

    _RUNTIME = ("_client", "_queue", "_thread", "_lock", "_last_step", "_give_up", "_finished", "_ended",
                "stopped_as")
    RETRY_S = 5.0  # between two tries of a call while the tracking server is down
    FLUSH_WAIT_S = 300.0  # at the sweep's end, how long to wait for the server to write what is queued

    def __getstate__(self) -> dict:  # Tune pickles callbacks: plain data only, never the client or the thread
        with self._lock:
            return {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME} | {"runs": dict(self.runs)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"unwritten": [], "outages": [], "errors": {}} | state)
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

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued MLflow call has been made (at most ``timeout`` s, default FLUSH_WAIT_S).
        If the wait is over, the rest is given up (counted in ``unwritten``, said by record_summary);
        returns whether everything queued was written."""
        if self._queue is None or self._thread is None or not self._thread.is_alive():
            return True
        deadline = time.monotonic() + (self.FLUSH_WAIT_S if timeout is None else timeout)
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._queue.unfinished_tasks:
            log.warning("MLflow: %d queued calls still unwritten after waiting %.0f s for %s; giving them up",
                        self._queue.unfinished_tasks, self.FLUSH_WAIT_S if timeout is None else timeout,
                        self.tracking_uri)
            self._give_up.set()
            self._queue.join()  # quick now: every remaining call is counted as unwritten, none is tried
            return False
        return True

    def _safe(self, what: str, fn, *args, **kwargs):
        """Make one MLflow call. While the tracking server does not answer (an outage), wait and retry, so
        that the queue behind this call waits too and nothing is reordered or lost. A call the server
        answers with an error is given up at once (logged, counted in ``unwritten``): the sweep goes on."""
        down_since = None
        while True:
            if self._give_up.is_set():
                self.unwritten.append(f"{what}: not tried (tracking server unreachable at the end of the sweep)")
                return None
            t0 = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                if server_answers(self.tracking_uri):
                    log.warning("MLflow %s failed (%s); continuing without it", what, reason)
                    self.unwritten.append(f"{what}: {reason}")
                    return None
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("MLflow server %s unreachable (%s); holding %d queued calls and retrying "
                                "every %.0f s", self.tracking_uri, what, self._pending(), self.RETRY_S)
                result = _DOWN
            finally:
                self.seconds += time.perf_counter() - t0  # time spent logging (BENCHMARKS.md)
            if result is _DOWN:
                self._give_up.wait(self.RETRY_S)  # an outage: not time spent logging
                continue
            if down_since is not None:
                self.outages.append(time.monotonic() - down_since)
                log.warning("MLflow server %s answers again after %.0f s; writing the %d queued calls",
                            self.tracking_uri, self.outages[-1], self._pending())
            return result

    def _pending(self) -> int:
        return self._queue.unfinished_tasks if self._queue is not None else 0

    def record_summary(self) -> str | None:
        """One line on what the tracking outages cost the record, or None if there was none."""
        if not self.unwritten and not self.outages:
            return None
        line = (f"MLflow: {len(self.outages)} tracking outage(s), {sum(self.outages):.0f} s in all, retried through"
                if self.outages else "MLflow:")
        if self.unwritten:
            kinds = sorted({u.split(":", 1)[0] for u in self.unwritten})
            return f"{line}; {len(self.unwritten)} calls could not be written ({', '.join(kinds)}): " \
                   f"{self.unwritten[0]}"
        return f"{line}; every queued call was written"

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
                             run_name=run_name(cfg, tid), tags=tags)
            if run is None:
                return None
            run_id = run.info.run_id
            self._finished[tid] = False
            params = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(flatten(cfg).items())]
            for i in range(0, len(params), 100):
                self._safe("log params", self.client.log_batch, run_id, params=params[i:i + 100])
            self._safe("log config", self.client.log_dict, run_id, cfg, "config.json")
        with self._lock:
            self.runs[tid] = run_id
        return run_id

    def _cfg(self, trial) -> dict:
        return self.trials.config(trial.config)

    # -- Tune's hooks: capture what is needed now, log on the thread ---------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        # the run's `attempt` tag: 1 + the trial's failures so far (Tune's count, kept across --resume)
        failures = getattr(getattr(trial, "run_metadata", None), "num_failures", 0)
        self._submit(self._start, trial.trial_id, self._cfg(trial), str(failures + 1))

    on_trial_restore = on_trial_start

    def _start(self, tid: str, cfg: dict, attempt: str = "1") -> None:
        run_id = self._run_for(tid, cfg)
        if run_id and not self._is_finished(tid, run_id):
            self._safe("set RUNNING", self.client.update_run, run_id, status="RUNNING")
            self._safe("tag attempt", self.client.set_tag, run_id, "attempt", attempt)

    def _is_finished(self, tid: str, run_id: str) -> bool:
        """Whether the trial's run already ended FINISHED (a resumed sweep's finished trial): read from MLflow
        once per trial and process; such a run keeps its steps and end time."""
        if tid not in self._finished:
            run = self._safe("get run", self.client.get_run, run_id)
            self._finished[tid] = run is not None and run.info.status == "FINISHED"
        return self._finished[tid]

    def finished_trials(self) -> dict[str, dict[str, float]]:
        """trial id -> latest metrics of every child run of the parent that ended FINISHED (for ``--resume``)."""
        runs = self.client.search_runs(
            [self.experiment_id], max_results=50000,
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' and attributes.status = 'FINISHED'")
        return {r.data.tags["trial_id"]: dict(r.data.metrics) for r in runs if "trial_id" in r.data.tags}

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
        if run_id is None or self._is_finished(tid, run_id):
            return
        heat = result.get(ROUTING_HEATMAP)
        if isinstance(heat, dict) and heat.get("blocks"):
            self._safe("log heatmap", self._log_heatmap, run_id, heat, run_name(cfg, tid))
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

        from service.report.plots import routing_heatmaps

        self.client.log_dict(run_id, heat, "routing/heatmaps.json")
        fig = routing_heatmaps(heat, title)
        self.client.log_figure(run_id, fig, "routing/heatmaps.png")
        plt.close(fig)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended.add(trial.trial_id)
        ckpt = getattr(trial, "checkpoint", None)  # the latest checkpoint holds best.pt, the best-validation weights
        self._submit(self._end, trial.trial_id, self._cfg(trial), "FINISHED",
                     {"best_checkpoint": f"{ckpt.path}/best.pt"} if ckpt is not None else {})

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended.add(trial.trial_id)
        err = getattr(trial, "error_file", None)
        msg = Path(err).read_text(errors="replace")[-4000:] if err and Path(err).is_file() else ""
        lines = [line.strip() for line in msg.splitlines() if line.strip()]
        self.errors[trial.trial_id] = lines[-1] if lines else "trial failed"  # the reason, for the sweep's end
        self._submit(self._end, trial.trial_id, self._cfg(trial), "FAILED", {"error": msg or "trial failed"})

    def _end(self, tid: str, cfg: dict, status: str, tags: dict[str, str]) -> None:
        run_id = self._run_for(tid, cfg)
        if run_id and not self._is_finished(tid, run_id):
            for k, v in tags.items():
                self._safe(f"tag {k}", self.client.set_tag, run_id, k, v)
            self._safe("end run", self.client.set_terminated, run_id, status)

    def on_experiment_end(self, trials, **info):
        # a trial Tune ended before the driver died, whose end the old driver never wrote: end its run now
        # (FINISHED only with its final result: Tune also marks TERMINATED the trials it stops when it fails)
        for t in trials:
            if t.status in ("TERMINATED", "ERROR") and t.trial_id in self.runs and t.trial_id not in self._ended:
                done = t.status == "TERMINATED" and bool((t.last_result or {}).get("done"))
                self._submit(self._end_if_running, self.runs[t.trial_id],
                             "FINISHED" if done else "FAILED" if t.status == "ERROR" else self.stopped_as)
        self.flush()

    def _end_if_running(self, run_id: str, status: str) -> None:
        run = self._safe("get run", self.client.get_run, run_id)
        if run is not None and run.info.status == "RUNNING":
            self._safe("end run", self.client.set_terminated, run_id, status)

    def close_unfinished(self, status: str = "KILLED") -> None:
        """Log what is queued, then end every run of this sweep still RUNNING (sweep interrupted or crashed).
        Interrupted (KILLED), the wait for a tracking server that is down is short: the user asked to stop."""
        self.flush(timeout=INTERRUPT_FLUSH_S if status == "KILLED" else None)
        for run_id in list(self.runs.values()):
            run = self._safe("get run", self.client.get_run, run_id)
            if run is not None and run.info.status == "RUNNING":
                self._safe("end run", self.client.set_terminated, run_id, status)
