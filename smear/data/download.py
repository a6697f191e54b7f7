"""Resumable, digest-checked downloads of many files in parallel: what ``smear.data.fetch`` is built on.

``download_all(remotes, workers)`` brings each :class:`Remote` to its ``dest`` and returns one
:class:`Outcome` per file, in the given order:

- A ``dest`` already there whose MD5 matches is ``"present"``: nothing is transferred. One whose MD5 does
  not match is removed and fetched again.
- A file is written to ``<dest>.part`` first. A ``.part`` left by an interrupted run is continued with an
  HTTP Range request from its size, and a connection dropped mid-file is resumed the same way, in the same
  run (a few times, by huggingface_hub). A server that ignores Range sends the whole file, which replaces
  the ``.part``; a ``.part`` that is already complete (416 Range Not Satisfiable) goes on to the check.
- The finished ``.part`` is checked against the published MD5. A mismatch removes it and is ``"failed"``
  with one line naming the file, the digest found and the digest expected; a match renames it to
  ``dest`` (``"downloaded"``). A transfer error is ``"failed"`` too, its ``.part`` kept for the next run.
- Files go through a thread pool of ``workers``; each has a tqdm bar while it downloads (on a terminal;
  none when output is piped), and ``report(outcome)`` is called as each finishes.

The transfer itself is huggingface_hub's ``http_get`` (Range resume, retries, progress bar), which takes any
URL. Written here, because no installed library does them: the digest check against a table, the
``.part`` bookkeeping around it, and the pool.
"""
from __future__ import annotations

import functools
import hashlib
import os
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["Outcome", "Remote", "download_all", "md5_of"]


@dataclass(frozen=True)
class Remote:
    """One file to fetch: ``url`` to ``dest``, which must have MD5 ``md5`` (lowercase hex)."""

    name: str    # how messages name it (the file name)
    url: str
    md5: str
    dest: Path


@dataclass(frozen=True)
class Outcome:
    remote: Remote
    status: Literal["present", "downloaded", "failed"]
    resumed_at: int = 0        # bytes a .part held when this run began (0: from the start)
    size: int = 0              # bytes of the verified file ("present", "downloaded")
    error: str | None = None   # one line, for "failed"


def md5_of(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _status_code(error: BaseException) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def _why(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _transfer(remote: Remote, part: Path, slot: int) -> int:
    """Append the rest of ``remote.url`` to ``part``, from its current size; return that starting size."""
    from huggingface_hub.file_download import http_get
    from tqdm.auto import tqdm

    start = part.stat().st_size if part.exists() else 0
    bar = functools.partial(tqdm, position=slot, leave=False, disable=None)   # disable=None: off unless a TTY
    with open(part, "r+b" if start else "wb") as f:
        f.seek(start)
        try:
            http_get(remote.url, f, resume_size=start, displayed_filename=remote.name, tqdm_class=bar)
        except Exception as e:
            if not (start and _status_code(e) == 416):   # 416: the .part already holds the whole file
                raise
    return start


def _fetch(remote: Remote, slots: queue.Queue[int]) -> Outcome:
    if remote.dest.is_file():
        if md5_of(remote.dest) == remote.md5:
            return Outcome(remote, "present", size=remote.dest.stat().st_size)
        remote.dest.unlink()   # stale or damaged: fetch it again
    part = remote.dest.with_name(remote.dest.name + ".part")
    remote.dest.parent.mkdir(parents=True, exist_ok=True)
    slot = slots.get()
    try:
        start = _transfer(remote, part, slot)
    except Exception as e:  # noqa: BLE001 - network, HTTP status, disk: each becomes its file's one line
        return Outcome(remote, "failed", error=f"{remote.name} {remote.url}: download failed ({_why(e)}); "
                                               f"valid: a reachable URL (run again to resume)")
    finally:
        slots.put(slot)
    actual = md5_of(part)
    if actual != remote.md5:
        part.unlink()
        return Outcome(remote, "failed", start, error=f"{remote.name} md5 {actual}: does not match the published "
                                                      f"digest, file removed; valid: {remote.md5}")
    os.replace(part, remote.dest)
    return Outcome(remote, "downloaded", start, remote.dest.stat().st_size)


def download_all(remotes: Sequence[Remote], workers: int = 4,
                 report: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Fetch every remote (see the module docstring); outcomes in the order of ``remotes``."""
    if workers < 1:
        raise ValueError(f"workers={workers}; valid: 1 or more")
    slots: queue.Queue[int] = queue.Queue()
    for i in range(workers):
        slots.put(i)

    def one(remote: Remote) -> Outcome:
        outcome = _fetch(remote, slots)
        if report:
            report(outcome)
        return outcome

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch") as pool:
        return list(pool.map(one, remotes))
