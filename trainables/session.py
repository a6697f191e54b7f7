"""Where a trial reports: the :class:`Session` protocol (Ray Tune, Ray Train, or a plain local run) and
:class:`LocalSession`, the session without Ray (tests, benchmarks, measurements)."""
from __future__ import annotations

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
