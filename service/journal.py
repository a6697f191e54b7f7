"""The sweep's durable record: every tracking write is first a line of an append-only journal in the sweep's
storage (``<storage>/<name>/record.jsonl``), then sent to MLflow, which is a replica of it
(:mod:`service.replica`).

A line is one :class:`Entry`: the run it writes to (``key``: a trial id, or :data:`PARENT`), the kind of
write (``op``, one of :data:`OPS`), its number among that run's writes (``n``: 1, 2, ...) and what it writes
(``data``). One writer (the sweep's driver); a line is written whole and handed to the OS at once, and made
durable (fsync) before it is sent (:meth:`Journal.durable`: one fsync for every line written since, a group
commit). A driver killed mid-line leaves a last line cut short: reading skips it (it was never sent).

What the journal says of each run (:class:`RunState`: its name, status, newest evaluation step, the reason it
failed) is folded from the journal as it is written and read, never from MLflow: the tracker of a resumed
sweep knows from it which steps are recorded and which trials finished, whether or not the server answers.
Only the fold stays in memory; the entries themselves are read back from the file when needed
(:meth:`Journal.entries`), so a sweep of 10,000 trials does not hold its whole record in the driver.

Where: under local storage, in the sweep's folder; under remote storage (s3://, gs://, ...), which cannot be
appended to, in ``$SMEAR_JOURNAL_DIR`` (default ``~/.smear-sweep/journals``) on the driver's machine, copied
to the sweep's folder in the storage at the sweep's end (:func:`upload`).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)
FILE = "record.jsonl"
PARENT = "parent"  # the key of the sweep's parent run; every other key is a Tune trial id
# open: the run exists (a trial's: created with its tags, params and config; the parent's: bound to its id)
# start: RUNNING again (an attempt); metrics: one step of values; heatmap / artifact: a file of the run;
# tags; end: its status and end time; report: the sweep's report published to the parent run
# the data each kind of entry must carry, and of what type (an entry that does not is not the driver's: skipped)
_REQUIRED = {"metrics": {"step": int, "ts": int, "values": dict}, "end": {"status": str, "end_time": int},
             "open": {}, "start": {}, "heatmap": {"heat": dict, "title": str}, "artifact": {"path": str, "text": str},
             "tags": {"tags": dict}, "report": {}}
OPS = tuple(_REQUIRED)
MAX_METRICS = 999  # per entry: MLflow's log_batch takes 1000 entities, and the entry's marker tag is one


@dataclass(frozen=True)
class Entry:
    key: str
    op: str
    n: int
    data: dict

    def line(self) -> str:
        return json.dumps({"key": self.key, "op": self.op, "n": self.n, "data": self.data},
                          allow_nan=False, separators=(",", ":")) + "\n"


@dataclass
class RunState:
    """What the journal says of one run so far."""
    n: int = 0                    # its writes so far (its newest entry's n)
    name: str = ""                # its run name (the trial's), from its open entry
    status: str | None = None     # None before it is open; RUNNING; then its end's status
    last_step: int = -1           # its newest evaluation step (a final report's step is not an evaluation)
    error: str = ""               # the last line of its error, when it ended FAILED
    opened: bool = False

    def fold(self, e: Entry) -> None:
        self.n = e.n
        if e.op == "open":
            self.opened, self.name, self.status = True, str(e.data.get("run_name", self.name)), "RUNNING"
        elif e.op == "start":
            self.status = "RUNNING"
        elif e.op == "metrics" and not e.data.get("final"):
            self.last_step = max(self.last_step, int(e.data["step"]))
        elif e.op == "end":
            self.status = e.data["status"]
            tags = e.data.get("tags")
            error = tags.get("error") if isinstance(tags, dict) else None
            lines = [x.strip() for x in (error if isinstance(error, str) else "").splitlines() if x.strip()]
            self.error = (lines[-1] if lines else "trial failed") if self.status == "FAILED" else ""


class Journal:
    """The append-only journal at ``path``: :meth:`at` gives this process's one journal of a path (the tracker
    Tune unpickles on ``--resume`` and the launcher write through the same object)."""

    _open: dict[str, "Journal"] = {}
    _registry_lock = threading.Lock()

    def __init__(self, path: Path):
        self.path = Path(path)
        self.runs: dict[str, RunState] = {}
        self._lock = threading.Lock()
        self._file = None
        self._written = self._synced = 0   # lines handed to the OS / made durable by this process
        self.broken: str | None = None     # why the file could not be written (then MLflow alone holds the writes)
        for e in self.entries():
            self.runs.setdefault(e.key, RunState()).fold(e)

    @classmethod
    def at(cls, path: str | Path) -> "Journal":
        key = str(Path(path).resolve())
        with cls._registry_lock:
            if key not in cls._open:
                cls._open[key] = cls(Path(key))
            return cls._open[key]

    @classmethod
    def forget(cls, path: str | Path) -> None:
        """Drop this process's object of ``path`` (a test that plays a new driver reads the file again)."""
        with cls._registry_lock:
            j = cls._open.pop(str(Path(path).resolve()), None)
        if j is not None:
            j.close()

    @property
    def parent(self) -> dict:
        """The parent run's open entry: {run_id, experiment_id, uri, name} (empty before it is written)."""
        for e in self.entries():
            if e.key == PARENT and e.op == "open":
                return e.data
        return {}

    def state(self, key: str) -> RunState:
        return self.runs.get(key, RunState())

    def append(self, key: str, op: str, **data) -> Entry:
        """Write one entry (whole, handed to the OS) and fold it into :attr:`runs`."""
        assert op in OPS, op
        with self._lock:
            state = self.runs.setdefault(key, RunState())
            entry = Entry(key, op, state.n + 1, data)
            line = entry.line()
            if self.broken is None:
                try:
                    if self._file is None:
                        self.path.parent.mkdir(parents=True, exist_ok=True)
                        self._file = open(self.path, "a", encoding="utf-8")
                        self._terminate_cut_line()
                    self._file.write(line)
                    self._file.flush()
                    self._written += 1
                except OSError as e:  # e.g. the storage is full: the sweep goes on, its writes go to MLflow only
                    self._break(e, entry)
            state.fold(entry)
        return entry

    def _break(self, error: OSError, entry: Entry) -> None:
        self.broken = f"{error.strerror or error} (from its write {entry.n} of {entry.key})"
        log.warning("the record journal %s cannot be written (%s): the sweep's writes go to MLflow only from here",
                    self.path, self.broken)
        try:
            if self._file is not None:
                self._file.close()
        except OSError:
            pass
        self._file = None

    def _terminate_cut_line(self) -> None:
        """A last line cut short by a killed driver: end it, so that the next entry starts its own line."""
        size = self.path.stat().st_size
        if size:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    self._file.write("\n")

    def durable(self) -> None:
        """Every line written so far on disk (fsync), before any of them is sent: one call for all since the last."""
        with self._lock:
            if self._file is None or self._synced == self._written:
                return
            try:
                os.fsync(self._file.fileno())
            except OSError as e:
                self._break(e, Entry("?", "open", self._written, {}))
                return
            self._synced = self._written

    def entries(self) -> Iterator[Entry]:
        """Every complete entry in the file, in order (a line cut short or not JSON is skipped)."""
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.endswith("\n"):
                    return  # the last line, cut short: never sent
                entry = _entry(line)
                if entry is not None:
                    yield entry

    def final_metrics(self) -> dict[str, dict[str, float]]:
        """trial id -> the latest value of each of its metrics, for every trial whose run ended FINISHED (what
        ``--resume`` has a finished trial report instead of training again)."""
        finished = {k for k, s in self.runs.items() if k != PARENT and s.status == "FINISHED"}
        out: dict[str, dict[str, float]] = {k: {} for k in finished}
        for e in self.entries():
            if e.op == "metrics" and e.key in finished:
                out[e.key].update(e.data["values"])
        return out

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _entry(line: str) -> Entry | None:
    """One journal line as an Entry, or None if it is not one the driver writes (a disk's damage, a hand edit)."""
    try:
        d = json.loads(line)
    except ValueError:
        return None
    if not (isinstance(d, dict) and isinstance(d.get("key"), str) and d.get("op") in _REQUIRED
            and type(d.get("n")) is int and d["n"] >= 1 and isinstance(d.get("data"), dict)):
        return None
    data = d["data"]
    if any(type(data.get(k)) is not t and not (t is int and type(data.get(k)) is float)
           for k, t in _REQUIRED[d["op"]].items()):
        return None
    if d["op"] == "metrics" and not all(isinstance(k, str) and type(v) in (int, float) for k, v in data["values"].items()):
        return None
    return Entry(d["key"], d["op"], d["n"], data)


def journal_path(storage: str, name: str) -> Path:
    """The journal of sweep ``name``: in its folder under local storage, else in $SMEAR_JOURNAL_DIR."""
    if "://" not in storage:
        return Path(storage) / name / FILE
    return Path(os.environ.get("SMEAR_JOURNAL_DIR", "~/.smear-sweep/journals")).expanduser() / name / FILE


def upload(storage: str, name: str) -> str | None:
    """Under remote storage, copy the journal into the sweep's folder there; None, or one line on why not."""
    if "://" not in storage:
        return None
    try:
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(f"{storage.rstrip('/')}/{name}")
        fs.create_dir(root, recursive=True)
        pyarrow.fs.copy_files(str(journal_path(storage, name)), f"{root}/{FILE}", destination_filesystem=fs)
        return None
    except Exception as e:  # noqa: BLE001 - the copy is a convenience: the journal stays on this machine
        return f"the record journal stays at {journal_path(storage, name)} (copy to {storage} failed: {e})"


@dataclass
class Missing:
    """What a run's record lacks in MLflow: its unsent entries, summarised."""
    name: str
    ops: dict[str, int] = field(default_factory=dict)
    end: str = ""
    exists: bool = False  # its run is in MLflow (it may still lack the rest of its creation: params, config)

    def describe(self) -> str:
        parts = [("its params and config" if self.exists else "no run yet")] if self.ops.get("open") else []
        if self.ops.get("metrics"):
            parts.append(f"{self.ops['metrics']} metric step(s)")
        for op, what in (("start", "its restart"), ("heatmap", "its routing heatmap"), ("artifact", "files"),
                         ("tags", "tags"), ("report", "the report")):
            if self.ops.get(op):
                parts.append(what)
        if self.end:
            parts.append(f"its end ({self.end})")
        return ", ".join(parts)
