"""launch.py --extend: more seeds for a finished sweep, under the same MLflow parent run, nothing re-run."""
from __future__ import annotations

import textwrap

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import child_runs, launch_args, run_launch

GOOD = """
description: x
base: {steps: 2, eval_every: 1, data.resolution: 16}
grid: {routing.method: [smear], seed: [0]}
"""


def _recorded_sweep(tmp_path, status: str = "FINISHED", smoke: bool = False):
    """A sweep's MLflow record as launch.py leaves it (service.record.ParentRun: the parent run, its
    trials.json), with one child run per trial: a real sqlite store, no Ray."""
    from service.record import ParentRun
    from service.spaces import load_sweep

    (tmp_path / "space.yaml").write_text(textwrap.dedent(GOOD))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = ParentRun.open(uri, load_sweep(str(tmp_path / "space.yaml")), "t", storage=str(tmp_path / "recorded"),
                            resume=False, tags={"smoke": str(smoke)})
    assert parent.replica.flush()                                 # its declaration and trial list are in MLflow
    child = parent.client.create_run(parent.experiment_id, run_name="smear-s0-x_00000", tags={
        "mlflow.parentRunId": parent.run_id, "sweep": "t", "trial_id": "x_00000", "method": "smear", "seed": "0"})
    parent.client.set_terminated(child.info.run_id, "FINISHED")
    parent.client.set_terminated(parent.run_id, status)
    return parent


def _refused(tmp_path, capsys, decl: str, *args: str) -> str:
    """main() exits 2 with one line, leaving the record as it was and no results folder."""
    from service.launch import main

    db = tmp_path / "mlflow.db"
    before = (len(child_runs(str(db))[1]), db.stat().st_mtime_ns)
    capsys.readouterr()  # what making the record printed
    try:
        rc = main(launch_args(tmp_path, decl, *args, name="t"))
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert (len(child_runs(str(db))[1]), db.stat().st_mtime_ns) == before and not (tmp_path / "results").exists()
    return err


def test_extend_refuses_a_seed_already_in_the_sweep(tmp_path, offline_data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _recorded_sweep(tmp_path)
    err = _refused(tmp_path, capsys, GOOD, "--extend", "--seeds", "2,0")
    assert "--seeds: seed 0 is already in sweep 't' (seeds 0); valid: seeds it does not have" in err


@pytest.mark.parametrize("status,smoke,decl,args,expected", [
    ("KILLED", False, GOOD, [], "sweep 't' is KILLED, not finished; valid: a finished sweep (continue this one"),
    ("FINISHED", True, GOOD, [], "sweep 't' ran with --smoke; valid: --extend with --smoke"),
    ("FINISHED", False, GOOD, ["--smoke"], "sweep 't' ran without --smoke; valid: --extend without --smoke"),
    ("FINISHED", False, GOOD.replace("[smear]", "[smear, tag]"), [],
     "declaration 'space' now resolves to other trials than sweep 't' ran (1 settings then, 2 now, seeds aside)"),
], ids=["not-finished", "smoke-then", "smoke-now", "declaration-changed"])
def test_extend_refuses_what_would_not_extend_the_same_sweep(tmp_path, offline_data, monkeypatch, capsys,
                                                             status, smoke, decl, args, expected):
    monkeypatch.chdir(tmp_path)
    _recorded_sweep(tmp_path, status=status, smoke=smoke)
    assert expected in _refused(tmp_path, capsys, decl, "--extend", "--seeds", "1", *args)


def test_extend_plan_and_an_interrupted_extension(tmp_path, offline_data, monkeypatch):
    """A fine request: the extension's Tune experiment is named after the sweep and the seeds. One that was
    interrupted (its tag still running, the parent KILLED) is allowed again, its own new runs not counted
    as seeds already in the sweep."""
    from service.extend import plan
    from service.spaces import load_sweep

    monkeypatch.chdir(tmp_path)
    parent = _recorded_sweep(tmp_path)
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "results")
    sweep = load_sweep(str(tmp_path / "space.yaml"), seeds=[1, 2])
    assert [(t.config["seed"], t.config["routing"]["method"]) for t in sweep.trials] == [(1, "smear"), (2, "smear")]
    ext = plan(uri, storage, "t", sweep, False, [1, 2])
    assert (ext.name, ext.experiment, ext.seeds, ext.resume) == ("t", "t-extend-1-2", [1, 2], False)
    parent.client.set_tag(parent.run_id, "extend.t-extend-1-2", "running")
    parent.client.create_run(parent.experiment_id, tags={"mlflow.parentRunId": parent.run_id, "seed": "1",
                                                          "extension": "t-extend-1-2"})
    parent.client.set_terminated(parent.run_id, "KILLED")
    assert plan(uri, storage, "t", sweep, False, [1, 2]).experiment == "t-extend-1-2"
    parent.client.set_tag(parent.run_id, "extend.t-extend-1-2", "done")      # finished: seed 1 is in the sweep
    parent.client.set_terminated(parent.run_id, "FINISHED")
    with pytest.raises(Exception, match="seed 1 is already in sweep 't' "):
        plan(uri, storage, "t", sweep, False, [1, 2])


TWO = """
description: two methods, one seed, then extended
base: {steps: 2, eval_every: 1, batch_size: 16, torch_threads: 1, data.resolution: 16, data.augment: none,
       data.domains: [real, sketch]}
grid: {routing.method: [smear, tag], seed: [0]}
resources: {cpu: 1}
max_concurrent_trials: 2
"""


@pytest.mark.slow
def test_extend_a_finished_sweep_adds_only_the_new_seeds_under_the_same_parent(tmp_path, env_with_venv):
    proc = run_launch(tmp_path, env_with_venv, TWO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    db = f"{tmp_path}/mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    parent, old = child_runs(db)
    history = {r.info.run_id: {k: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)]
                               for k in r.data.metrics} for r in old}

    proc = run_launch(tmp_path, env_with_venv, TWO, "--extend", "--seeds", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sweep t: 2 new trials" in proc.stdout and "progress: 2/2 done" in proc.stdout
    again, children = child_runs(db)                      # still one parent run: the same one, finished again
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert again.data.tags["extend.t-extend-1"] == "done"
    new = [r for r in children if r.info.run_id not in history]
    assert sorted((r.data.tags["method"], r.data.tags["seed"]) for r in new) == [("smear", "1"), ("tag", "1")]
    assert all(r.info.status == "FINISHED" and r.data.tags["extension"] == "t-extend-1" for r in new)
    assert all(r.data.params["seed"] == "1" and "test/accuracy" in r.data.metrics for r in new)
    # the sweep's own runs: untouched (same ids, end times, metric histories), none re-run
    for r in old:
        now = client.get_run(r.info.run_id)
        assert (now.info.status, now.info.end_time) == (r.info.status, r.info.end_time)
        assert {k: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)]
                for k in now.data.metrics} == history[r.info.run_id]
    # Tune: the extension is its own experiment; the sweep's has the same two trials as before
    results = tmp_path / "results"
    assert len(list((results / "t").glob("*/result.json"))) == 2
    assert len(list((results / "t-extend-1").glob("*/result.json"))) == 2
    # the report (read back from MLflow, written at the end of the extension) covers seeds 0 and 1
    text = (results / "t" / "report" / "summary.md").read_text()
    assert "- 4 trials: 4 finished" in text
    for method in ("smear", "tag"):
        assert f"| {method} | 2/2 |" in text
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.md", "summary-t-extend-1.md", "trials.json", "trials-t-extend-1.json"} <= artifacts
    # the same seed again: refused before anything starts
    proc = run_launch(tmp_path, env_with_venv, TWO, "--extend", "--seeds", "1")
    assert proc.returncode == 2 and "seed 1 is already in sweep 't' (seeds 0, 1)" in proc.stderr, proc.stderr
    assert len(child_runs(db)[1]) == 4
