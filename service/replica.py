"""MLflow as a replica of the sweep's journal (:mod:`service.journal`).

Every tracking write is an entry of the journal first; :meth:`Replica.write` appends it and queues it for one
sending thread, which makes it durable (fsync) and applies it to MLflow, in order. While the tracking server
does not answer, the thread holds the queue and retries (every ``RETRY_S``), so nothing is reordered or
lost; a write the server answers with an error is given up (said at the end). A sweep that ends while the
server is still down waits ``FLUSH_WAIT_S``, then leaves the rest in the journal: :meth:`Replica.missing`
says which runs lack what, and ``launch.py --sync`` (:meth:`Replica.sync`) sends it later.

Idempotent by construction: each run carries the tag ``record.n``, the number of the newest journal entry of
that run applied to it (a metrics write carries it in the same ``log_batch`` as its values; any other write,
all of which can be repeated without changing the record, sets it after). A sync reads the runs and their
tags back from the server once, then applies the entries past each run's mark: the same run ids (a trial's
run is found by its ``trial_id`` tag before one is created), no step twice, each run ending with the status
its journal gives. A metrics write carries the timestamp of the report it came from, and MLflow's SQL stores
keep one row per (key, step, timestamp, value): a write sent twice is stored once. Past a lost answer (the call
failed; in a sync, any write past a run's mark) the run's history is also checked before a write is sent again.

Why not Ray's MLflowLoggerCallback (ray-mlflow.md): it duplicates runs after ``Tuner.restore``, leaves runs
RUNNING, makes two HTTP calls per metric and does not nest.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from service.journal import PARENT, Entry, Journal, Missing
from service.refusal import first_line

log = logging.getLogger(__name__)
MARKER = "record.n"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# The driver's MLflow HTTP calls fail within seconds when the server is down (MLflow's defaults retry each
# call for ~4 min, 120 s timeout), so the replica knows of an outage and retries itself. The user's own win.
FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


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


WAIT_ENV = "SMEAR_RECORD_WAIT_S"


def record_wait(default: float = 120.0) -> float:
    """How long a sweep's end waits for a tracking server that does not answer before it leaves the rest of the
    record in the journal: $SMEAR_RECORD_WAIT_S seconds if set (the launcher's boundary checks it), else
    ``default``. Raises ValueError naming the value when it is not a number >= 0."""
    import math

    text = os.environ.get(WAIT_ENV)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{WAIT_ENV}={text!r} is not a number of seconds; valid: a finite number >= 0, e.g. 60")
    return value


def get_or_create_experiment(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root, tags=EXPERIMENT_KIND)


class _Skipped(Exception):
    """A report entry with no publisher (the report's own sync): left for ``--sync``, not an error."""


class Replica:
    """The MLflow replica of the journal at a path: :meth:`at` gives this process's one (the tracker Tune
    restores, the parent run and the launcher share its queue, thread and counts)."""

    RETRY_S = 5.0         # between two tries of a write while the tracking server is down
    FLUSH_WAIT_S = 120.0  # at the sweep's end, how long to wait for a server that is down: see record_wait()
    LAG_SAMPLES = 100_000  # the tracker lags kept (:attr:`lags`): a bounded memory in a sweep of any size

    _open: dict[str, "Replica"] = {}
    _registry_lock = threading.Lock()

    def __init__(self, journal: Journal, uri: str, experiment_id: str, parent_run_id: str):
        self.journal, self.uri, self.experiment_id = journal, uri, experiment_id
        self.run_ids: dict[str, str] = {PARENT: parent_run_id}   # key -> MLflow run id
        self.applied: dict[str, int] = {}   # key -> n of its newest entry in MLflow (or given up)
        self.refused: list[str] = []        # "<what>: <reason>" of each write the server refused
        self.outages: list[float] = []      # seconds of each outage retried through
        self.seconds = 0.0                  # time in MLflow calls (BENCHMARKS.md)
        # seconds from a report's arrival at the driver (its metrics' timestamp) to its values being in MLflow, for
        # the newest LAG_SAMPLES metrics writes this process sent (benchmarks/scale.py reads its p50 / p99)
        self.lags: deque[float] = deque(maxlen=self.LAG_SAMPLES)
        self.publisher = None               # data -> bool: publish the report (a `report` entry); launch.py's
        self.dropped = 0                    # writes this process stopped trying (the server never came back)
        self._unsure: set[str] = set()      # keys whose next metrics write may already be in MLflow
        self._client: MlflowClient | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._give_up = threading.Event()   # the sweep is ending and the wait for the server is over

    @classmethod
    def at(cls, path: str | Path, uri: str, experiment_id: str, parent_run_id: str) -> "Replica":
        journal = Journal.at(path)
        with cls._registry_lock:
            key = str(journal.path)
            if key not in cls._open or cls._open[key].journal is not journal:
                cls._open[key] = cls(journal, uri, experiment_id, parent_run_id)
            return cls._open[key]

    @classmethod
    def forget(cls, path: str | Path) -> None:
        """Drop this process's replica and journal of ``path`` (a test that plays a new driver)."""
        with cls._registry_lock:
            cls._open.pop(str(Path(path).resolve()), None)
        Journal.forget(path)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    @property
    def parent_run_id(self) -> str:
        return self.run_ids[PARENT]

    # -- writing: the journal first, then the queue ---------------------------------------------------------
    def write(self, key: str, op: str, **data) -> Entry:
        entry = self.journal.append(key, op, **data)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._drain, name="mlflow-replica", daemon=True)
            self._thread.start()
        self._queue.put(entry)
        return entry

    def _drain(self) -> None:
        while True:
            entry = self._queue.get()
            try:
                self.journal.durable()  # on disk before it is sent
                self._send(entry)
            except Exception:  # a bug here must not kill the thread: later writes still go out
                log.exception("MLflow replica: %s of %s failed", entry.op, entry.key)
            finally:
                self._queue.task_done()

    def _send(self, entry: Entry) -> None:
        """Apply one entry; through an outage, wait and retry (the queue behind it waits too)."""
        down_since = None
        while True:
            if self._give_up.is_set():  # given up: the entry stays in the journal, for --sync
                self.dropped += 1
                return
            t0, down = time.perf_counter(), False
            try:
                self.apply(entry)
            except _Skipped:
                return
            except Exception as e:
                if entry.op == "metrics":
                    self._unsure.add(entry.key)  # its values may have landed without the answer
                reason = first_line(e)
                if server_answers(self.uri):
                    log.warning("MLflow %s failed (%s); continuing without it", self._what(entry), reason)
                    self.refused.append(f"{self._what(entry)}: {reason}")
                    self.applied[entry.key] = entry.n  # given up: a sync would be refused again
                    return
                down = True
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("MLflow server %s unreachable (%s); holding %d queued writes and retrying every "
                                "%.0f s (each is in the journal %s)", self.uri, self._what(entry),
                                self._queue.unfinished_tasks, self.RETRY_S, self.journal.path)
            finally:
                self.seconds += time.perf_counter() - t0
            if down:
                self._give_up.wait(self.RETRY_S)  # an outage: not time spent logging
                continue
            if entry.op == "metrics":
                self.lags.append(time.time() - int(entry.data["ts"]) / 1000)
            if down_since is not None:
                self.outages.append(time.monotonic() - down_since)
                log.warning("MLflow server %s answers again after %.0f s; writing the %d queued writes", self.uri,
                            self.outages[-1], self._queue.unfinished_tasks)
            return

    def _what(self, entry: Entry) -> str:
        return f"{entry.op} of {self.journal.state(entry.key).name or entry.key}"

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is in MLflow (at most ``timeout`` s, default FLUSH_WAIT_S); past it,
        stop trying (the rest stays in the journal: :meth:`missing`). Returns whether everything written so far
        went out (once given up, this process sends nothing more: ``--sync`` does)."""
        wait = record_wait(self.FLUSH_WAIT_S) if timeout is None else timeout
        deadline = time.monotonic() + wait
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._queue.unfinished_tasks:
            log.warning("MLflow: %d writes still unsent after waiting %.0f s for %s; they stay in the journal %s",
                        self._queue.unfinished_tasks, wait, self.uri, self.journal.path)
            self._give_up.set()
            self._queue.join()  # quick now: no write is tried
        return not self.dropped

    # -- applying one entry -----------------------------------------------------------------------------------
    def _find_run(self, key: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id], max_results=1,
            filter_string=f"tags.trial_id = '{key}' and tags.mlflow.parentRunId = '{self.parent_run_id}'")
        return runs[0].info.run_id if runs else None

    def _landed(self, run_id: str, entry: Entry) -> bool:
        """Whether a metrics entry is already in the run (its first value's step and timestamp)."""
        key = next(iter(entry.data["values"]))
        step, ts = int(entry.data["step"]), int(entry.data["ts"])
        return any(m.step == step and m.timestamp == ts for m in self.client.get_metric_history(run_id, key))

    def apply(self, entry: Entry) -> None:
        """Write one entry to MLflow (raises what the client raises)."""
        c, d = self.client, entry.data
        if entry.key not in self.run_ids:
            found = self._find_run(entry.key)
            if found is None and entry.op != "open":
                raise LookupError(f"trial {entry.key} has no run in {self.uri}")
            if found is not None:
                self.run_ids[entry.key] = found
        run_id = self.run_ids.get(entry.key)
        if entry.op == "metrics":
            # unsure (a lost answer; any entry past the mark in a sync): already there? Writes land in order, so
            # the first one that is not there ends the doubt for the entries after it
            if entry.key in self._unsure and run_id and self._landed(run_id, entry):
                c.set_tag(run_id, MARKER, str(entry.n))
            else:
                c.log_batch(run_id, metrics=[Metric(k, v, int(d["ts"]), int(d["step"])) for k, v in d["values"].items()],
                            tags=[RunTag(MARKER, str(entry.n))])
                self._unsure.discard(entry.key)
            self.applied[entry.key] = entry.n
            return
        # the entry's last call carries its marker: its params or tags, if it has any left, and the mark in one
        # log_batch (params and tags at most 100 per call), after everything else it writes (BENCHMARKS.md, "Scale")
        params: list[Param] = []
        tags: list[RunTag] = []
        if entry.op == "open" and entry.key != PARENT:
            if run_id is None:
                run_id = c.create_run(self.experiment_id, run_name=d["run_name"], tags=d["tags"]).info.run_id
                self.run_ids[entry.key] = run_id
            c.log_dict(run_id, d["config"], "config.json")
            params = [Param(k, v) for k, v in d["params"].items()]
        elif entry.op == "start":
            c.update_run(run_id, status="RUNNING")
            if "attempt" in d:
                tags = [RunTag("attempt", str(d["attempt"]))]
        elif entry.op == "heatmap":
            self._log_heatmap(run_id, d["heat"], d["title"])
        elif entry.op == "artifact":
            c.log_text(run_id, d["text"], d["path"])
        elif entry.op == "report":
            if self.publisher is None:
                raise _Skipped()
            if not self.publisher(d):
                raise RuntimeError("the report could not be written")
        if entry.op == "end":  # its status first: a run ended again by a sync gets the same status and tags
            c.set_terminated(run_id, d["status"], end_time=int(d["end_time"]))
        if entry.op in ("tags", "end") and d.get("tags"):
            tags = [RunTag(k, str(v)) for k, v in d["tags"].items()]
        while len(params) > 100 or len(tags) > 99:
            c.log_batch(run_id, params=params[:100], tags=tags[:100])
            params, tags = params[100:], tags[100:]
        c.log_batch(run_id, params=params, tags=[*tags, RunTag(MARKER, str(entry.n))])
        self.applied[entry.key] = entry.n

    def _log_heatmap(self, run_id: str, heat: dict, title: str) -> None:
        import matplotlib.pyplot as plt

        from service.report.plots import routing_heatmap_strip

        self.client.log_dict(run_id, heat, "routing/heatmaps.json")
        fig = routing_heatmap_strip(heat, title)
        self.client.log_figure(run_id, fig, "routing/heatmaps.png")
        plt.close(fig)

    # -- the record's state: replaying it, and what it lacks ----------------------------------------------------
    def sync(self) -> int:
        """Send what the server lacks of the journal (see the module docstring); returns how many entries were
        sent. Raises what the client raises when the server does not answer."""
        children = self.client.search_runs(
            [self.experiment_id], max_results=50_000,
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}'")
        marks = {PARENT: self.client.get_run(self.parent_run_id).data.tags.get(MARKER, "0")}
        for r in children:
            if tid := r.data.tags.get("trial_id"):
                self.run_ids[tid] = r.info.run_id
                marks[tid] = r.data.tags.get(MARKER, "0")
        self.applied = {k: int(v) if v.isdigit() else 0 for k, v in marks.items()}
        self._unsure = set(self.applied)
        sent = 0
        for entry in self.journal.entries():
            if entry.n <= self.applied.get(entry.key, 0):
                continue
            try:
                self.apply(entry)
                sent += 1
            except _Skipped:
                continue
            except Exception as e:
                if not server_answers(self.uri):
                    raise
                self.refused.append(f"{self._what(entry)}: {first_line(e)}")
        return sent

    def missing(self) -> dict[str, Missing]:
        """key -> what its run lacks in MLflow (entries past what was applied), for every run that lacks any."""
        out: dict[str, Missing] = {}
        for e in self.journal.entries():
            if e.n <= self.applied.get(e.key, 0):
                continue
            m = out.setdefault(e.key, Missing(self.journal.state(e.key).name or e.key, exists=e.key in self.run_ids))
            if e.op == "end":
                m.end = e.data["status"]
            else:
                m.ops[e.op] = m.ops.get(e.op, 0) + 1
        return out

    def summary(self) -> str | None:
        """One line on what tracking outages, refusals and a server that never came back cost the record (None:
        nothing)."""
        parts = []
        if self.outages:
            parts.append(f"{len(self.outages)} tracking outage(s), {sum(self.outages):.0f} s in all, retried through")
        if self.refused:
            parts.append(f"{len(self.refused)} writes refused by the server: {self.refused[0]}")
        if self.dropped:
            parts.append(f"{self.dropped} writes not sent before the sweep ended (the server did not answer): "
                         "kept in the journal, sent by --sync")
        if self.journal.broken:
            parts.append(f"the record journal {self.journal.path} could not be written: {self.journal.broken}")
        if parts and not self.refused and not self.dropped and not self.journal.broken:
            parts.append("every write was sent")
        return f"MLflow: {'; '.join(parts)}" if parts else None
