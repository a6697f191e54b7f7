"""The MLflow tracker on a real sqlite store, driven the way Tune drives it (real Tune Trial objects), through
the sweep's journal (service/journal.py) and its MLflow replica (service/replica.py). A new driver (--resume) is
played by pickling the tracker, as Tune does, and dropping this process's replica and journal (``_new_driver``)."""
from __future__ import annotations

import pickle
import time

from mlflow.tracking import MlflowClient
from ray.tune.experiment import Trial

from service.replica import Replica
from service.tracking import MLflowTracker
from smear.configs import to_dict, unflatten
from trainables.settings import make_config
from trainables.identity import TRIAL_KEY, SweepTrials


def _sweep(tmp_path, n: int):
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("e")
    parent = client.create_run(exp, run_name="sweep").info.run_id
    configs = [to_dict(make_config(unflatten({"routing.method": m, "seed": s})))
               for m, s in [("smear", 0), ("tag", 1)][:n]]
    Replica.forget(tmp_path / "record.jsonl")
    tracker = MLflowTracker(tmp_path / "record.jsonl", uri, exp, parent, "sweep", {"git_commit": "abc"},
                            trials=SweepTrials(configs, {}))
    trials = [Trial("trial", config={TRIAL_KEY: i}, trial_id=f"t_{i:05d}", stub=True) for i in range(n)]
    return client, exp, parent, tracker, trials


def _new_driver(tracker: MLflowTracker, *, sync: bool = True) -> MLflowTracker:
    """The tracker as a new driver's Tune restores it: unpickled, with no live replica in the process; the
    launcher syncs the journal first (service/record.py, ParentRun.open on --resume)."""
    data = pickle.dumps(tracker)
    Replica.forget(tracker.journal_path)
    restored = pickle.loads(data)
    if sync:
        restored.replica.sync()
    return restored


def test_tracker_logs_every_call_in_order_from_its_thread(tmp_path):
    client, exp, parent, tracker, (a, b) = _sweep(tmp_path, 2)
    for t in (a, b):
        tracker.on_trial_start(0, [], t)
    for step in (10, 20, 30):
        for t in (a, b):
            tracker.on_trial_result(0, [], t, {"step": step, "val/accuracy": step / 100, "train/loss": 1.0 / step,
                                               "done": False, "val/nan": float("nan")})
    tracker.on_trial_complete(0, [], a)
    tracker.on_trial_error(0, [], b)
    tracker.on_experiment_end([a, b])  # what Tune calls last: everything queued is in MLflow afterwards

    runs = {r.data.tags["trial_id"]: r for r in client.search_runs([exp])
            if r.data.tags.get("mlflow.parentRunId") == parent}
    assert sorted(runs) == ["t_00000", "t_00001"]
    assert runs["t_00000"].info.status == "FINISHED" and runs["t_00001"].info.status == "FAILED"
    assert runs["t_00001"].data.tags["error"] == "trial failed"
    assert (runs["t_00000"].data.tags["method"], runs["t_00001"].data.tags["method"]) == ("smear", "tag")
    assert runs["t_00001"].data.params["seed"] == "1"
    for run in runs.values():
        history = client.get_metric_history(run.info.run_id, "val/accuracy")
        assert [(m.step, m.value) for m in history] == [(10, 0.1), (20, 0.2), (30, 0.3)]
        assert "val/nan" not in run.data.metrics and "done" not in run.data.metrics
    assert tracker.seconds > 0
    assert {k: v for k, v in tracker.replica.run_ids.items() if k != "parent"} == {
        tid: r.info.run_id for tid, r in runs.items()}
    assert tracker.replica.missing() == {}                         # everything the journal holds is in MLflow


def test_tracker_pickles_as_plain_data_and_a_new_driver_finds_its_runs_again(tmp_path):
    """Tune pickles callbacks into the experiment state; a restored tracker reuses the trial's run (found by its
    trial_id tag: the new driver's replica knows no run ids)."""
    client, exp, parent, tracker, (a,) = _sweep(tmp_path, 1)
    tracker.on_trial_start(0, [], a)
    tracker.flush()
    assert set(tracker.__getstate__()) == {"journal_path", "tracking_uri", "experiment_id", "parent_run_id", "trials",
                                           "sweep", "tags", "stopped_as"}
    old = tracker.replica
    same = pickle.loads(pickle.dumps(tracker))                    # the same process: the same live replica
    assert same.replica is old
    restored = _new_driver(tracker, sync=False)
    assert restored.replica is not old and "t_00000" not in restored.replica.run_ids
    restored.on_trial_restore(0, [], a)
    restored.on_trial_result(0, [], a, {"step": 5, "val/accuracy": 0.5})
    restored.close_unfinished("KILLED")
    (run,) = [r for r in client.search_runs([exp]) if r.data.tags.get("mlflow.parentRunId") == parent]
    assert run.info.status == "KILLED" and run.data.metrics["val/accuracy"] == 0.5


def test_a_write_the_store_refuses_is_given_up_and_said_and_the_rest_is_written(tmp_path):
    client, exp, parent, tracker, (a,) = _sweep(tmp_path, 1)
    tracker.on_trial_start(0, [], a)
    tracker.replica.write("t_00000", "tags", tags={"k" * 300: "v"})  # a tag key longer than MLflow allows
    tracker.on_trial_complete(0, [], a)
    assert tracker.flush() is True
    (run,) = [r for r in client.search_runs([exp]) if r.data.tags.get("mlflow.parentRunId") == parent]
    assert run.info.status == "FINISHED"
    assert "1 writes refused by the server: tags of" in tracker.record_summary()


def test_provenance_from_git_then_the_recorded_file_then_the_environment(tmp_path, monkeypatch):
    import json
    import subprocess

    from service.provenance import FILE, provenance, record
    from tests.helpers import REPO

    here = provenance(REPO)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert here["git_commit"] == head and here["git_dirty"] in ("true", "false")
    copy = tmp_path / "upload"                                   # what `ray job submit` runs: no .git
    copy.mkdir()
    monkeypatch.delenv("SMEAR_GIT_COMMIT", raising=False)
    empty = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"          # no files: git's empty tree
    assert provenance(copy) == {"git_commit": "unknown", "git_tree": empty, "git_dirty": "unknown"}
    monkeypatch.setenv("SMEAR_GIT_COMMIT", "abc123")
    assert provenance(copy)["git_commit"] == "abc123"
    (copy / FILE).write_text(json.dumps({"git_commit": head, "git_dirty": "false"}))
    assert provenance(copy) == {"git_commit": head, "git_tree": empty, "git_dirty": "false"}  # the file wins over env
    repo = tmp_path / "repo"                                     # record() writes the file and git-excludes it
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    path = record(repo)
    assert json.loads(path.read_text())["git_dirty"] == "false" and len(json.loads(path.read_text())["git_tree"]) == 40
    assert FILE in (repo / ".git" / "info" / "exclude").read_text()
    status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True).stdout
    assert status == ""                                          # the record does not dirty the tree


def test_no_step_is_logged_twice_after_a_restore_or_by_the_final_report(tmp_path):
    client, exp, parent, tracker, (a,) = _sweep(tmp_path, 1)
    tracker.on_trial_start(0, [], a)
    for step in (10, 20):
        tracker.on_trial_result(0, [], a, {"step": step, "train/loss": 1.0, "val/accuracy": step / 100,
                                           "val/best_accuracy": step / 100, "done": False})
    tracker.flush()
    # a new driver (--resume) restores the trial from its step-10 checkpoint: steps 20 is trained again
    restored = _new_driver(tracker)
    restored.on_trial_restore(0, [], a)
    for step in (20, 30):
        restored.on_trial_result(0, [], a, {"step": step, "train/loss": 0.5, "val/accuracy": step / 100 + 0.01,
                                             "val/best_accuracy": step / 100, "done": False})
    # the final report repeats val/best_accuracy at the last step, with the test metrics
    restored.on_trial_result(0, [], a, {"step": 30, "val/best_accuracy": 0.3, "test/accuracy": 0.4, "done": True})
    restored.on_trial_complete(0, [], a)
    restored.flush()
    (run,) = [r for r in client.search_runs([exp]) if r.data.tags.get("mlflow.parentRunId") == parent]
    for key in ("val/accuracy", "val/best_accuracy", "train/loss"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == [10, 20, 30], (key, steps)
    acc = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/accuracy")}
    assert acc[20] == 0.2                                          # the first record of a step is kept
    assert run.data.metrics["test/accuracy"] == 0.4


def test_a_finished_run_is_left_alone_when_a_resumed_sweep_reports_it_again(tmp_path):
    """--resume after a driver killed right after a trial finished: Tune's saved state may still hold the trial
    as running. Its run keeps its status, end time and steps; the driver knows it as finished."""
    client, exp, parent, tracker, (a,) = _sweep(tmp_path, 1)
    tracker.on_trial_start(0, [], a)
    for step in (10, 20):
        tracker.on_trial_result(0, [], a, {"step": step, "train/loss": 1.0, "val/accuracy": step / 100})
    tracker.on_trial_result(0, [], a, {"step": 20, "test/accuracy": 0.5, "done": True})
    tracker.on_trial_complete(0, [], a)
    tracker.flush()
    (run,) = [r for r in client.search_runs([exp]) if r.data.tags.get("mlflow.parentRunId") == parent]
    assert tracker.finished_trials() == {"t_00000": run.data.metrics}
    restored = _new_driver(tracker)                               # the new driver's tracker
    restored.on_trial_restore(0, [], a)
    restored.on_trial_result(0, [], a, {"step": 30, "train/loss": 0.5, "val/accuracy": 0.3})
    restored.on_trial_result(0, [], a, {**run.data.metrics, "done": 1.0})
    restored.on_trial_complete(0, [], a)
    restored.flush()
    again = client.get_run(run.info.run_id)
    assert again.info.status == "FINISHED" and again.info.end_time == run.info.end_time
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == [10, 20]
    assert len(client.get_metric_history(run.info.run_id, "test/accuracy")) == 1


def test_an_unreachable_tracking_server_holds_the_queue_then_says_what_was_not_written(tmp_path, monkeypatch):
    """No server answers at the tracking URI: the calls wait in order (retried), the sweep's end waits a bounded
    time, then gives them up and says so in one line."""
    from service.replica import fail_fast_http, server_answers
    from tests.helpers import free_port

    for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)
    fail_fast_http()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")   # the refusal is immediate: no need to wait here
    uri = f"http://127.0.0.1:{free_port()}"
    assert not server_answers(uri)
    _, exp, parent, local, (a,) = _sweep(tmp_path, 1)
    Replica.forget(tmp_path / "dead.jsonl")
    tracker = MLflowTracker(tmp_path / "dead.jsonl", uri, exp, parent, "sweep", {}, trials=local.trials)
    tracker.replica.RETRY_S = 0.2
    tracker.on_trial_start(0, [], a)
    tracker.on_trial_result(0, [], a, {"step": 10, "train/loss": 1.0})
    t0 = time.monotonic()
    assert tracker.flush(timeout=2) is False
    assert time.monotonic() - t0 < 10
    assert tracker.replica.dropped == 2                            # the run's creation and its step: both kept
    (missing,) = tracker.replica.missing().values()
    assert missing.describe() == "no run yet, 1 metric step(s)"
    note = tracker.record_summary()
    assert note.startswith("MLflow:") and "2 writes not sent before the sweep ended" in note, note
    assert not tracker.replica.outages                             # it never came back


def test_a_trial_tune_ended_before_the_driver_died_gets_its_run_ended_on_resume(tmp_path):
    """Tune's saved state holds a trial TERMINATED, but the dead driver never wrote its run's end: the resumed
    sweep's end writes it (nothing left RUNNING), and leaves a run this process ended alone."""
    client, exp, parent, tracker, (a, b) = _sweep(tmp_path, 2)
    for t in (a, b):
        tracker.on_trial_start(0, [], t)
    tracker.flush()                                               # the driver dies here
    restored = _new_driver(tracker)
    restored.on_trial_restore(0, [], b)
    restored.on_trial_complete(0, [], b)
    a.set_status(Trial.TERMINATED)
    a.update_last_result({"done": True, "step": 4})               # it had reported its end
    b.set_status(Trial.TERMINATED)
    restored.on_experiment_end([a, b])
    runs = {r.data.tags["trial_id"]: r for r in client.search_runs([exp])
            if r.data.tags.get("mlflow.parentRunId") == parent}
    assert runs["t_00000"].info.status == "FINISHED" and runs["t_00001"].info.status == "FINISHED"


def test_a_trial_tune_stopped_without_its_final_result_is_not_recorded_finished(tmp_path):
    """Tune marks TERMINATED the trials it stops when it fails itself: without their final result (``done``)
    their runs end KILLED, never FINISHED (what ran is what MLflow records)."""
    client, exp, parent, tracker, (a,) = _sweep(tmp_path, 1)
    tracker.on_trial_start(0, [], a)
    tracker.flush()
    a.update_last_result({"step": 2})                             # an evaluation, not the end
    a.set_status(Trial.TERMINATED)
    tracker.on_experiment_end([a])
    (run,) = [r for r in client.search_runs([exp]) if r.data.tags.get("mlflow.parentRunId") == parent]
    assert run.info.status == "KILLED"


def test_the_heatmaps_are_a_file_of_the_trial_recorded_as_the_runs_artifact(tmp_path):
    """The final report carries where the trial wrote its heatmaps (a Tune result holds no nested lists); the
    tracker journals them and the run gets routing/heatmaps.json and .png. A file that cannot be read is skipped."""
    from trainables.session import write_artifact

    client, exp, parent, tracker, (a,) = _sweep(tmp_path, 1)
    heat = {"groups": ["real", "sketch"], "blocks": {"layer1.0": [[0.7, 0.3], [0.2, 0.8]]}}
    where = write_artifact(str(tmp_path / "trial"), "routing_heatmaps.json", heat)
    tracker.on_trial_start(0, [], a)
    tracker.on_trial_result(0, [], a, {"step": 4, "test/accuracy": 0.5, "done": True, "routing_heatmap": where})
    tracker.on_trial_result(0, [], a, {"step": 4, "done": True, "routing_heatmap": str(tmp_path / "absent.json")})
    tracker.on_trial_complete(0, [], a)
    assert tracker.flush()
    (run,) = [r for r in client.search_runs([exp]) if r.data.tags.get("mlflow.parentRunId") == parent]
    assert {f.path for f in client.list_artifacts(run.info.run_id, "routing")} == {
        "routing/heatmaps.json", "routing/heatmaps.png"}
    assert "routing_heatmap" not in run.data.metrics and run.data.metrics["test/accuracy"] == 0.5
