"""A full disk ends the sweep at its first ENOSPC: no trial is retried on it, none started after it.

A full storage is no trial's fault: each retry and each later trial would fail on it too (measured before
this guard: on a 3 MiB storage both trials of a sweep were retried against it, 75 s and 7 tracebacks on the
console; a larger sweep, 206 s and 28). Where the first one shows (Ray 2.60):

- a trial's checkpoint, copied into the storage by ``ray.tune.report`` in the trial's own process
  (``StorageContext.persist_current_checkpoint``, pyarrow: ``OSError`` with ``errno.ENOSPC``), or any other
  ENOSPC a trial meets: the trial raises it as :class:`~trainables.failures.StorageFull`
  (trainables/ray_trainable.py), which reaches the driver as a ``RayTaskError``. Tune pickles that exception
  into the trial's ``error.pkl`` on the driver's local disk (``Trial.handle_error``, before any callback runs:
  it has already requeued the trial for its retry when ``on_trial_recover`` is called), and writes its text
  to ``error.txt``. :func:`trial_failure` reads the exception back; only without one is the text judged
  (:func:`~trainables.failures.names_storage_full`).
- the driver's sync of Tune's experiment state and trial results into the storage (a background thread):
  Tune only logs its failure, with a traceback (``syncer``, ``experiment_state``). :class:`FullDiskLog`, a
  filter on those loggers, takes the exception the record carries (by type, never its text), notes it and
  drops the record. (Tune notices a failed sync only when it starts the next one, up to ~10 s later: a trial's
  own checkpoint copy, which fails at once, is in practice the first.)

:class:`StorageGuard`, the sweep's last Tune callback, then raises StorageFull out of Tune's loop, in the same
controller step: Tune stops every trial (``TuneController.cleanup``) and starts none, the requeued one included.
``Tuner.fit`` raises it, and the launcher ends every run FAILED and says so in one line (service/launch.py).
Tune drops the pending results of the trials it stops; one that had hit the full disk too would be printed by
Ray, traceback and all, as an "Unhandled error" when its reference goes: from then on the driver ignores
those (``RAY_IGNORE_UNHANDLED_ERRORS``, read by Ray at each one; measured: the second trial's ENOSPC). A
sync that fails at the sweep's very end (Tune's final snapshot) fails the sweep the same way, at
``on_experiment_end``.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ray.tune import Callback

from trainables.failures import StorageFull, names_storage_full, storage_full

# Ray's loggers that report a failed write into the storage, with its exception, and go on
WATCHED = ("ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state", "ray.train._internal.syncer")


def trial_failure(trial) -> BaseException | None:
    """The exception of ``trial``'s latest failure as Tune recorded it on the driver (``error.pkl``), or None."""
    path = getattr(trial, "pickled_error_file", None)
    if not path or not Path(path).is_file():
        return None
    try:
        import cloudpickle

        with open(path, "rb") as f:
            error = cloudpickle.load(f)
    except Exception:  # unreadable (a type that no longer unpickles): judged from its text
        return None
    return error if isinstance(error, BaseException) else None


def failed_on_full_disk(trial) -> OSError | None:
    """The ENOSPC error ``trial`` failed with, or None: its recorded exception, by type; only a trial whose
    failure Tune kept no exception of (a ``TuneError``), by the last line of its error file."""
    error = trial_failure(trial)
    if error is not None:
        return storage_full(error)
    err = getattr(trial, "error_file", None)
    lines = Path(err).read_text(errors="replace").strip().splitlines() if err and Path(err).is_file() else []
    return StorageFull() if lines and names_storage_full(lines[-1]) else None


class FullDiskLog(logging.Filter):
    """On Ray's WATCHED loggers: a record about an ENOSPC error (its ``exc_info``, or the exception being handled
    where Ray logs a failed sync's traceback as text) is noted in ``guard`` and not printed."""

    def __init__(self, guard: "StorageGuard"):
        super().__init__()
        self.guard = guard

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        full = storage_full(error)
        if full is None:
            return True
        self.guard.note(full)
        return False


class StorageGuard(Callback):
    """Tune callback (the sweep's last): at the first ENOSPC, the failed trial's run ends FAILED (``tracker``:
    the sweep's MLflowTracker), so do the runs of the trials Tune stops, and StorageFull ends the experiment."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.full: OSError | None = None
        self._filter: FullDiskLog | None = None
        self._stopped = False  # StorageFull raised: Tune is ending the experiment

    def __getstate__(self) -> dict:  # Tune pickles callbacks (tuner.pkl): the tracker is pickled with them once
        return {"tracker": self.tracker}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tracker"])

    def note(self, full: OSError) -> None:
        if self.full is None:
            self.full = full

    def setup(self, **info):
        self._filter = FullDiskLog(self)
        for name in WATCHED:
            logging.getLogger(name).addFilter(self._filter)

    def on_experiment_end(self, trials, **info):
        if self._filter is not None:
            for name in WATCHED:
                logging.getLogger(name).removeFilter(self._filter)
        self._stop_if_full()  # Tune's final snapshot could not be written

    def on_step_begin(self, iteration, trials, **info):  # before Tune starts any trial in this step
        self._stop_if_full()

    def on_step_end(self, iteration, trials, **info):
        self._stop_if_full()

    def on_trial_recover(self, iteration, trials, trial, **info):
        full = failed_on_full_disk(trial)
        if full is not None:  # Tune has requeued it for a retry, which never starts: it failed for good
            self.tracker.on_trial_error(iteration, trials, trial)
            self._stop(full)
        self._stop_if_full()

    def on_trial_error(self, iteration, trials, trial, **info):  # the tracker has ended its run FAILED
        full = failed_on_full_disk(trial)
        if full is not None:
            self._stop(full)
        self._stop_if_full()

    def _stop_if_full(self) -> None:
        if self.full is not None:
            self._stop(self.full)

    def _stop(self, full: OSError) -> None:
        self.note(full)
        self.tracker.stopped_as = "FAILED"  # the trials Tune stops now: their runs end FAILED, not KILLED
        if not self._stopped:  # once: a hook Tune calls while it cleans up after it does not raise again
            self._stopped = True
            os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"  # the stopped trials' dropped results (module doc)
            raise StorageFull.of(full) from full
