"""The MLflow record of a sweep's trials, written from the driver only: one child run per trial under the
sweep's parent run (:mod:`service.record`).

:class:`MLflowTracker` is a Tune callback that turns Tune's hooks into the record's writes: each is an entry of
the sweep's journal first (:mod:`service.journal`, in the sweep's storage, durable), then sent to MLflow, a
replica of it (:mod:`service.replica`: one sending thread, retried through a tracking outage, ``--sync`` for
what a sweep could not send). What the tracker needs to know of a run (does it exist, its newest step, did it
finish) it reads from the journal, never from MLflow: a restored trial that trains steps again is logged once,
a finished trial reported again by a resumed sweep is left alone, whether or not the server answers.

Tune pickles its callbacks (``tuner.pkl``, the experiment state): the tracker pickles as plain data (where
its journal is, whom it writes to), and finds its process's live replica again by the journal's path
(:meth:`service.replica.Replica.at`): the launcher, the parent run and a tracker Tune restored share it.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from ray.tune import Callback

from service.journal import MAX_METRICS, PARENT, Journal
from service.replica import Replica
from smear.configs import flatten
from trainables.identity import SweepTrials, run_name
from trainables.names import ROUTING_HEATMAP
from trainables.session import read_artifact
from trainables.settings import get_setting

log = logging.getLogger(__name__)
EVAL_KEY = "train/loss"  # in every evaluation report of the train loop, never in its final (test) report
MAX_PARAM_LEN = 6000
# How long an interrupted sweep waits for queued writes before ending its runs KILLED. `ray job stop` SIGKILLs
# the driver RAY_JOB_STOP_WAIT_TIME_S after its SIGTERM (Ray's default: 3 s): the shipped cluster configs give
# it more than this (ray_cluster.yaml, docker/kuberay-rayjob.yaml; tests/test_cluster_config.py checks).
# What is not sent by then stays in the journal, for --resume's (or --sync's) replay.
INTERRUPT_FLUSH_S = 30


class MLflowTracker(Callback):
    """Tune callback: one MLflow child run per trial under ``parent_run_id``, through the journal at ``journal``.

    A trial's ``ray.tune.report`` waits until the driver has run every callback on that result (measured: a
    0.2 s callback added 0.2 s per report to the trial). So the hooks only append to the journal (one line,
    no fsync) and queue; the replica's thread makes the MLflow calls. ``flush()`` waits for them.
    """

    def __init__(self, journal: str | Path, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str,
                 tags: dict[str, str], trials: SweepTrials | None = None):
        self.journal_path = str(journal)
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self.trials = trials or SweepTrials(None, {})  # the sweep's trial identity: Tune's config -> the trial's
        self.sweep, self.tags = sweep, dict(tags)
        self.stopped_as = "KILLED"  # a run whose trial Tune stopped unfinished at the end (FAILED: storage full)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.stopped_as = "KILLED"

    @property
    def replica(self) -> Replica:
        return Replica.at(self.journal_path, self.tracking_uri, self.experiment_id, self.parent_run_id)

    @property
    def journal(self) -> Journal:
        return self.replica.journal

    @property
    def seconds(self) -> float:
        """The sending thread's time in MLflow calls."""
        return self.replica.seconds

    @property
    def errors(self) -> dict[str, str]:
        """trial id -> the last line of its error, for each trial whose run ended FAILED."""
        return {k: s.error for k, s in self.journal.runs.items() if k != PARENT and s.status == "FAILED"}

    def flush(self, timeout: float | None = None) -> bool:
        return self.replica.flush(timeout)

    def record_summary(self) -> str | None:
        return self.replica.summary()

    def finished_trials(self) -> dict[str, dict[str, float]]:
        """trial id -> latest metrics of every trial whose run ended FINISHED (for ``--resume``), from the journal."""
        return self.journal.final_metrics()

    def _open(self, tid: str, cfg: dict, attempt: str) -> bool:
        """The trial's run opened in the record (unless it is already); False if it ended FINISHED (a resumed
        sweep's finished trial: its run keeps its steps and end)."""
        state = self.journal.state(tid)
        if state.status == "FINISHED":
            return False
        if not state.opened:
            tags = {**self.tags, "mlflow.parentRunId": self.parent_run_id, "sweep": self.sweep, "trial_id": tid,
                    "method": cfg["routing"]["method"], "seed": str(cfg["seed"]), "attempt": attempt,
                    **get_setting(cfg["setting"]).record_tags(cfg)}  # setting, its metric names and groups
            params = {k: str(v)[:MAX_PARAM_LEN] for k, v in sorted(flatten(cfg).items())}
            self.replica.write(tid, "open", run_name=run_name(cfg, tid), tags=tags, params=params, config=cfg)
        return True

    def _cfg(self, trial) -> dict:
        return self.trials.config(trial.config)

    # -- Tune's hooks -------------------------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        # the run's `attempt` tag: 1 + the trial's failures so far (Tune's count, kept across --resume)
        failures = getattr(getattr(trial, "run_metadata", None), "num_failures", 0)
        tid, attempt = trial.trial_id, str(failures + 1)
        was_open = self.journal.state(tid).opened
        if self._open(tid, self._cfg(trial), attempt) and was_open:
            self.replica.write(tid, "start", attempt=attempt)

    on_trial_restore = on_trial_start

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid, cfg, now = trial.trial_id, self._cfg(trial), int(time.time() * 1000)
        if not self._open(tid, cfg, "1"):
            return
        if isinstance(where := result.get(ROUTING_HEATMAP), str):  # the trial's heatmap file: into the journal
            try:
                heat = read_artifact(where)
            except (OSError, ValueError) as e:
                log.warning("routing heatmaps of %s not read from %s (%s)", run_name(cfg, tid), where, e)
                heat = None
            if isinstance(heat, dict) and heat.get("blocks"):
                self.replica.write(tid, "heatmap", heat=heat, title=run_name(cfg, tid))
        step = int(result.get("step", result.get("training_iteration", 0)))
        final = bool(result.get("done")) and EVAL_KEY not in result
        if not final and step <= self.journal.state(tid).last_step:
            return  # a trial restored from an older checkpoint re-trains steps already in the record: log once
        values = {k: float(v) for k, v in result.items()
                  if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  and not (final and k.startswith("val/"))}  # the final report repeats val/best_*: once is enough
        keys = sorted(values)
        for i in range(0, len(keys), MAX_METRICS):  # one entry per log_batch: its mark rides with its values
            self.replica.write(tid, "metrics", step=step, ts=now, final=final,
                               values={k: values[k] for k in keys[i:i + MAX_METRICS]})

    def on_trial_complete(self, iteration, trials, trial, **info):
        ckpt = getattr(trial, "checkpoint", None)  # the latest checkpoint holds best.pt, the best-validation weights
        self._end(trial, "FINISHED", {"best_checkpoint": f"{ckpt.path}/best.pt"} if ckpt is not None else {})

    def on_trial_error(self, iteration, trials, trial, **info):
        err = getattr(trial, "error_file", None)
        msg = Path(err).read_text(errors="replace")[-4000:] if err and Path(err).is_file() else ""
        self._end(trial, "FAILED", {"error": msg or "trial failed"})

    def _end(self, trial, status: str, tags: dict[str, str]) -> None:
        tid = trial.trial_id
        if self._open(tid, self._cfg(trial), "1"):
            self.replica.write(tid, "end", status=status, end_time=int(time.time() * 1000), tags=tags)

    def on_experiment_end(self, trials, **info):
        # a trial Tune ended before the driver died, whose end the old driver never wrote: end its run now
        # (FINISHED only with its final result: Tune also marks TERMINATED the trials it stops when it fails)
        for t in trials:
            if t.status in ("TERMINATED", "ERROR") and self.journal.state(t.trial_id).status == "RUNNING":
                done = t.status == "TERMINATED" and bool((t.last_result or {}).get("done"))
                self._end(t, "FINISHED" if done else "FAILED" if t.status == "ERROR" else self.stopped_as, {})
        self.flush()

    def close_unfinished(self, status: str = "KILLED") -> None:
        """End every run of this sweep still RUNNING (sweep interrupted or crashed), then send what is queued.
        Interrupted (KILLED), the wait for a tracking server that is down is short: the user asked to stop."""
        now = int(time.time() * 1000)
        for tid, state in list(self.journal.runs.items()):
            if tid != PARENT and state.status == "RUNNING":
                self.replica.write(tid, "end", status=status, end_time=now, tags={})
        self.flush(timeout=INTERRUPT_FLUSH_S if status == "KILLED" else None)
