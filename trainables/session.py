"""Where a trial reports: the :class:`Session` protocol (Ray Tune, Ray Train, or a plain local run) and
:class:`LocalSession`, the session without Ray (tests, benchmarks, measurements)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class Session(Protocol):
    """Where a train loop reports. A session may also say how many CPUs the trial holds (``cpus``), which
    ``data.loader_workers: -1`` resolves against; without it, the CPUs this process may use. A session whose
    ``replays_on_restore`` is true gets a restored checkpoint's evaluation reported once more
    (``trainables.checkpoints.replay_report``)."""

    world_rank: int
    world_size: int

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None: ...
    def latest_checkpoint_dir(self) -> str | None: ...
    def release_checkpoint_dir(self, path: str) -> None:
        """The loop has read ``path`` (from :meth:`latest_checkpoint_dir`): a temporary copy can go."""
    def artifact(self, name: str, data: dict) -> str | None:
        """``data`` written as the JSON file ``name`` where the driver reads it (the trial's folder in the sweep's
        storage): its location, or None where this session has none (a data-parallel worker of rank > 0)."""


def write_artifact(folder: str, name: str, data: dict) -> str:
    """``data`` as the JSON file ``folder/name``: a local folder (written whole: a temporary file, then renamed),
    or a storage URI (s3://, gs://, ...: pyarrow, as Tune writes there). Returns its location."""
    text = json.dumps(data)
    if "://" not in folder:
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return str(path)
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(folder)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{name}") as f:
        f.write(text.encode())
    return f"{folder.rstrip('/')}/{name}"


def read_artifact(location: str) -> dict:
    """What :func:`write_artifact` wrote at ``location`` (OSError or ValueError when it is not there or not JSON)."""
    if "://" not in location:
        return json.loads(Path(location).read_text())
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(location)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


@dataclass
class LocalSession:
    """A session without Ray (tests, benchmarks): keeps reports in memory, checkpoints in ``root``."""

    root: str
    world_rank: int = 0
    world_size: int = 1
    cpus: float | None = None

    def __post_init__(self) -> None:
        self.reports: list[dict[str, float]] = []
        self._latest: str | None = None
        self._saved = 0

    def report(self, metrics, checkpoint_dir):
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            self._saved += 1
            dest = Path(self.root) / f"checkpoint_{self._saved:06d}"
            dest.mkdir(parents=True, exist_ok=True)
            for f in Path(checkpoint_dir).iterdir():
                os.replace(f, dest / f.name)
            self._latest = str(dest)

    def latest_checkpoint_dir(self):
        return self._latest

    def release_checkpoint_dir(self, path):
        pass  # its own checkpoint folder, kept

    def artifact(self, name, data):
        return write_artifact(self.root, name, data)
