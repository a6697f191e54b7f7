"""A full disk (ENOSPC) is found by its type through the wrappers a trial's error reaches the driver in, and ends
the sweep at the first one (service/storage_guard.py); the real disk is tests/test_fault_tolerance.py's."""
from __future__ import annotations

import errno
import logging
import pickle
from types import SimpleNamespace

import cloudpickle
import pytest
from ray.exceptions import RayTaskError
from ray.tune.error import TuneError

from service.storage_guard import WATCHED, StorageGuard, failed_on_full_disk
from trainables.failures import StorageFull, names_storage_full, storage_full


def _enospc() -> OSError:  # what pyarrow raises when Tune copies a checkpoint onto a full disk
    return OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")


def test_enospc_is_found_by_type_through_ray_and_tune_wrappers():
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    full = _enospc()
    remote = RayTaskError("train", "Traceback ...", full).as_instanceof_cause()  # what ray.get raises on the driver
    assert isinstance(remote, OSError) and remote.errno is None       # the dual instance's own errno is unset
    assert storage_full(remote) is full
    assert storage_full(cloudpickle.loads(cloudpickle.dumps(remote))).errno == errno.ENOSPC  # Tune's error.pkl
    try:
        raise TuneError("trial failed") from remote
    except TuneError as e:
        assert storage_full(e) is full
    assert storage_full(ControllerError(WorkerGroupError("failed", {0: RuntimeError("x"), 1: full}))) is full
    assert storage_full(OSError(errno.ENOENT, "No such file or directory")) is None
    assert storage_full(RuntimeError("[Errno 28] No space left on device: said, not raised")) is None
    assert storage_full(None) is None


def test_storage_full_is_an_enospc_oserror_that_crosses_processes():
    e = StorageFull("/disk/ft/trial/checkpoint_000001")
    again = pickle.loads(pickle.dumps(e))
    assert isinstance(again, OSError) and again.errno == errno.ENOSPC and again.filename == e.filename
    assert str(again) == "[Errno 28] No space left on device: '/disk/ft/trial/checkpoint_000001'"
    assert StorageFull.of(e) is e and StorageFull.of(_enospc()).errno == errno.ENOSPC
    assert storage_full(RayTaskError("train", "tb", e).as_instanceof_cause()) is not None


def test_only_text_that_records_enospc_names_a_full_disk():
    assert names_storage_full("OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left")
    assert names_storage_full("StorageFull: [Errno 28] No space left on device")
    assert not names_storage_full("FileNotFoundError: [Errno 2] No such file or directory")
    assert not names_storage_full("ValueError: step 28") and not names_storage_full("")


class _Tracker:
    def __init__(self):
        self.errors, self.stopped_as = [], "KILLED"

    def on_trial_error(self, iteration, trials, trial, **info):
        self.errors.append(trial.trial_id)


def _trial(tmp_path, error: BaseException | None, text: str = "") -> SimpleNamespace:
    pkl, txt = tmp_path / "error.pkl", tmp_path / "error.txt"
    if error is not None:
        pkl.write_bytes(cloudpickle.dumps(error))
    txt.write_text(f"Failure # 1 (occurred at 2026-12-02_02-14-30)\n{text}\n")
    return SimpleNamespace(trial_id="t_00000", pickled_error_file=str(pkl) if error is not None else None,
                           error_file=str(txt))


@pytest.fixture(autouse=True)
def _unhandled_errors_restored(monkeypatch):
    monkeypatch.setenv("RAY_IGNORE_UNHANDLED_ERRORS", "")  # the guard sets it in the process it stops: undone here
    monkeypatch.delenv("RAY_IGNORE_UNHANDLED_ERRORS")


def test_the_first_enospc_of_a_trial_ends_the_experiment_without_its_retry(tmp_path):
    import os

    tracker = _Tracker()
    guard = StorageGuard(tracker)
    (tmp_path / "a").mkdir()
    other = _trial(tmp_path / "a", RayTaskError("train", "tb", ValueError("bad")).as_instanceof_cause())
    guard.on_trial_recover(1, [], other)              # another failure: Tune retries it as configured
    assert tracker.errors == [] and tracker.stopped_as == "KILLED" and "RAY_IGNORE_UNHANDLED_ERRORS" not in os.environ
    (tmp_path / "b").mkdir()
    full = _trial(tmp_path / "b", RayTaskError("train", "tb", StorageFull("/disk/x")).as_instanceof_cause())
    assert failed_on_full_disk(full) is not None
    with pytest.raises(StorageFull):                  # out of Tune's step: the requeued retry never starts
        guard.on_trial_recover(2, [], full)
    assert tracker.errors == ["t_00000"] and tracker.stopped_as == "FAILED"   # its run ends FAILED, and the rest
    assert os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] == "1"  # the stopped trials' dropped results: not printed
    guard.on_trial_error(3, [], full)                 # Tune cleaning up after it: not raised twice
    guard.on_step_begin(4, [])


def test_a_failure_tune_kept_only_as_text_is_judged_by_its_recorded_errno(tmp_path):
    assert failed_on_full_disk(_trial(tmp_path, None, "OSError: [Errno 28] No space left on device")) is not None
    assert failed_on_full_disk(_trial(tmp_path, None, "TuneError: restore failed")) is None


def test_tunes_logged_enospc_of_its_own_sync_is_noted_not_printed_and_ends_the_next_step():
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    guard = StorageGuard(_Tracker())
    guard.setup()
    syncer, controller = logging.getLogger(WATCHED[2]), logging.getLogger(WATCHED[0])
    for lg in (syncer, controller):
        lg.addHandler(handler)
    try:
        controller.error("Trial task failed", exc_info=RayTaskError("train", "tb", ValueError("x")))
        assert len(seen) == 1 and guard.full is None  # any other failure is printed as before
        try:
            raise _enospc()
        except OSError:  # Ray's syncer logs the failed sync's traceback as text, from inside its except
            syncer.warning("Last sync command failed with the following error:\nTraceback ...")
        assert len(seen) == 1 and guard.full is not None
        with pytest.raises(StorageFull):
            guard.on_step_begin(5, [])
    finally:
        guard.on_experiment_end([])
        for lg in (syncer, controller):
            lg.removeHandler(handler)
    assert not any(isinstance(f, type(guard._filter)) for f in syncer.filters)


def test_the_guard_pickles_with_the_tracker_it_reports_to():
    tracker = _Tracker()
    callbacks = pickle.loads(pickle.dumps([tracker, StorageGuard(tracker)]))  # as in Tune's tuner.pkl
    assert callbacks[1].tracker is callbacks[0] and callbacks[1].full is None


def test_the_sweeps_one_line_names_the_full_storage(tmp_path):
    from service.launch import sweep_failure

    try:
        raise RuntimeError("Tune's loop ended") from StorageFull("/x")  # typed: the message does not say it
    except RuntimeError as e:
        reason = sweep_failure(e, str(tmp_path), [])
    assert "(No space left on device)" in reason and str(tmp_path) in reason, reason  # (this disk is not full)
    assert "No space" not in sweep_failure(RuntimeError("other"), str(tmp_path), ["ValueError: bad"])
