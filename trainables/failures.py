"""A failure's kind, found by its type through the wrappers it reaches the driver in; and the one failure that is
never a trial's own: a full disk (ENOSPC).

A trial's exception reaches Tune's driver as a ``RayTaskError`` (an instance of the cause's class too, whose
attributes such as ``errno`` are its own, unset: the original is its ``cause``); a data-parallel trial's as Ray
Train's ``WorkerGroupError`` (``worker_failures``) or ``ControllerError`` (``controller_failure``); Tune's own as a
``TuneError`` raised from it. :func:`raised` walks all of them. A full disk is an ``OSError`` whose ``errno`` is
``ENOSPC`` (Python's own writes, pyarrow's copy of a checkpoint into Tune's storage: both set it). Only where
the driver has nothing but text (Tune's error file of a trial) is it read from the text, by
:func:`names_storage_full`.
"""
from __future__ import annotations

import errno
import os
import re
from typing import Callable


def raised(error: BaseException | None, kind: type[BaseException],
           test: Callable[[BaseException], bool] | None = None) -> BaseException | None:
    """``error`` or the first exception of type ``kind`` (and, given ``test``, for which it holds) that it carries:
    through its cause and context chain, a ``RayTaskError``'s ``cause``, and what a data-parallel trial's Ray
    Train run reports (``WorkerGroupError.worker_failures``, a ``ControllerError``'s ``controller_failure``).
    A failure's kind is its type, never a substring."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind) and (test is None or test(e)):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "controller_failure", None), _cause(e),
                 *(getattr(e, "worker_failures", None) or {}).values()]
    return None


def _cause(e: BaseException) -> BaseException | None:
    cause = e.__dict__.get("cause") if hasattr(e, "__dict__") else None  # RayTaskError's (never a __getattr__ guess)
    return cause if isinstance(cause, BaseException) else None


class StorageFull(OSError):
    """A disk that a sweep writes to is full (``errno.ENOSPC``). No trial's fault: every trial would fail on it,
    so a trial raises this for any ENOSPC it meets, and the driver ends the sweep at the first one, with no
    retry (service/storage_guard.py)."""

    def __init__(self, filename: str | None = None):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), *([filename] if filename else []))

    def __reduce__(self):  # crosses processes (Ray pickles a trial's exception): rebuilt from its filename
        return StorageFull, (self.filename,)

    @classmethod
    def of(cls, error: BaseException) -> "StorageFull":
        """``error`` itself if it is one, else one for the ENOSPC ``error`` carries (raise it ``from error``)."""
        if isinstance(error, StorageFull):
            return error
        full = storage_full(error)
        return cls(getattr(full, "filename", None) if full is not None else None)


def storage_full(error: BaseException | None) -> OSError | None:
    """The out-of-space error (an ``OSError`` with ``errno.ENOSPC``) that ``error`` is or carries (:func:`raised`),
    or None."""
    return raised(error, OSError, lambda e: e.errno == errno.ENOSPC)  # type: ignore[return-value]


_ENOSPC_TEXT = re.compile(rf"\[errno {errno.ENOSPC}\]|\bENOSPC\b|{re.escape(os.strerror(errno.ENOSPC))}", re.I)


def names_storage_full(text: str) -> bool:
    """Whether an error recorded as text (Tune's error file of a trial, its last line) is ENOSPC: the errno as
    Python and pyarrow write it (``[Errno 28]``), its name, or its ``strerror``. Only for what the driver cannot
    see but as text: an exception is judged by :func:`storage_full`."""
    return bool(_ENOSPC_TEXT.search(text or ""))
