"""MLflow on a real PostgreSQL (tests/helpers/postgres.py: a cluster of the test's own on a free port): a sweep
interrupted and resumed, extended with a new seed, and its report, through ``mlflow server
--backend-store-uri postgresql://...``; the same sweep written straight to ``postgresql://`` gives the record
sqlite gives; the launcher's boundary accepts a PostgreSQL URI whose driver is installed."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import LAUNCH, MlflowServer
from tests.helpers.postgres import PostgresCluster, pg_bindir

needs_postgres = pytest.mark.skipif(pg_bindir() is None, reason="PostgreSQL's server (initdb, pg_ctl) is not "
                                                                 "installed; set SMEAR_PG_BINDIR")
EXPERIMENT = "smear-sweep/space"

# two trials long enough to be interrupted after their first checkpoints (the digits stand-in, 16 px, 1 thread)
SWEEP = """
description: two trials on PostgreSQL, interrupted, resumed, extended
base: {steps: 40, eval_every: 10, batch_size: 16, torch_threads: 1, data.resolution: 16, data.augment: none,
       data.domains: [real, sketch], routing.method: smear}
grid: {seed: [0, 1]}
resources: {cpu: 1}
max_concurrent_trials: 2
"""


@pytest.fixture
def postgres():
    if pg_bindir() is None:
        pytest.skip("PostgreSQL's server (initdb, pg_ctl) is not installed; set SMEAR_PG_BINDIR")
    with PostgresCluster() as pg:
        yield pg


def _launch(tmp_path: Path, env, uri: str, *extra: str, name: str = "pg") -> subprocess.Popen:
    """launch.py on ``SWEEP`` (tmp_path/space.yaml) as a real process, its output in tmp_path/<name>-N.txt."""
    (tmp_path / "space.yaml").write_text(textwrap.dedent(SWEEP))
    out = tmp_path / f"{name}-{len(list(tmp_path.glob(f'{name}-*.txt')))}.txt"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, str(LAUNCH), "--sweep", str(tmp_path / "space.yaml"),
                                 "--tracking-uri", uri, "--storage", str(tmp_path / "results"), "--name", name, *extra],
                                cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    proc.output = out
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """The launcher's exit code and output; its process group killed if it outlives ``timeout``."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=60)
    return rc, proc.output.read_text()


def _runs(client: MlflowClient, sweep: str = "pg") -> tuple[object, list]:
    """The sweep's one parent run and its child runs (one per trial)."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("sweep") == sweep]
    return parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def _histories(client: MlflowClient, run) -> dict[str, list[tuple[int, float]]]:
    """Every metric's history in ``run``: key -> [(step, value)], in logged order."""
    return {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in run.data.metrics}


def _no_step_twice(client: MlflowClient, runs: list) -> None:
    for r in runs:
        for key, history in _histories(client, r).items():
            steps = [s for s, _ in history]
            assert len(steps) == len(set(steps)), (r.data.tags.get("trial_id"), key, steps)


@needs_postgres
@pytest.mark.slow
def test_a_sweep_resumed_extended_and_reported_through_an_mlflow_server_on_postgresql(tmp_path, env_with_venv,
                                                                                     postgres):
    store = postgres.create_database("mlflow")
    with _server(tmp_path, env_with_venv, store) as server:
        client = MlflowClient(server.url)
        # the sweep, stopped (SIGTERM, as `ray job stop`) once both trials have a checkpoint
        proc = _launch(tmp_path, env_with_venv, server.url)
        try:
            _wait_for(lambda: len(list((tmp_path / "results" / "pg").glob("*/checkpoint_*"))) >= 2, 240,
                      "the first checkpoints", proc)
            proc.send_signal(signal.SIGTERM)
        finally:
            rc, out = _finish(proc, 120)
        assert rc in (143, 0), out[-3000:]  # 0: the trials outran the signal (a fast machine): resume finds them done
        # --resume: each trial finished once, under the same parent
        rc, out = _finish(_launch(tmp_path, env_with_venv, server.url, "--resume"))
        assert rc == 0, out[-3000:]
        parent, runs = _runs(client)
        assert parent.info.status == "FINISHED"
        assert len(runs) == 2 and len({r.data.tags["trial_id"] for r in runs}) == 2
        assert [r.info.status for r in runs] == ["FINISHED"] * 2
        for r in runs:
            assert [s for s, _ in _histories(client, r)["val/accuracy"]] == [10, 20, 30, 40]
        # --extend with a new seed: its run under the same parent, the sweep's own runs untouched
        before = {r.info.run_id: (r.info.end_time, _histories(client, r)) for r in runs}
        rc, out = _finish(_launch(tmp_path, env_with_venv, server.url, "--extend", "--seeds", "2"))
        assert rc == 0, out[-3000:]
        again, runs = _runs(client)
        assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
        new = [r for r in runs if r.info.run_id not in before]
        assert [(r.data.tags["seed"], r.data.tags["extension"], r.info.status) for r in new] == \
            [("2", "pg-extend-2", "FINISHED")]
        for r in runs:
            if r.info.run_id in before:
                assert (r.info.end_time, _histories(client, r)) == before[r.info.run_id]
        _no_step_twice(client, runs)
        # the report, read back from the server, written and logged to the parent run
        report = subprocess.run([sys.executable, "-m", "service.report", "pg", "--tracking-uri", server.url,
                                 "--storage", str(tmp_path / "results")], cwd=tmp_path, env=env_with_venv,
                                capture_output=True, text=True, timeout=120)
        assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-2000:]
        text = (tmp_path / "results" / "pg" / "report" / "summary.md").read_text()
        assert "- 3 trials: 3 finished" in text
        assert {"summary.md", "trials.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


@contextlib.contextmanager
def _server(tmp_path: Path, env, store: str):
    server = MlflowServer(tmp_path / "server" / "unused.db", env, store=store)
    server.db.parent.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _wait_for(pred, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the launcher ended (rc={proc.returncode}) before {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


ONE = """
description: one trial, written straight to the tracking store
base: {steps: 20, eval_every: 10, batch_size: 16, torch_threads: 1, data.resolution: 16, data.augment: none,
       data.domains: [real, sketch], routing.method: smear}
grid: {seed: [0]}
resources: {cpu: 1}
"""
# what two identical sweeps may differ in: ids, times, the machine's own measurements
_RUN_SPECIFIC_TAGS = ("mlflow.parentRunId", "mlflow.log-model.history")


def _record(uri: str, sweep: str, storage: Path) -> dict:
    """A sweep's record, without what two identical sweeps may differ in (run ids, times, measured timings and
    system metrics; Tune's random trial-id prefix and the storage folder in names, params and tags): the parent's
    status, params, tags and artifacts; each trial run's status, name, params, tags and every metric's history."""
    from trainables.names import SECONDS_PER_STEP, TRAIN_HOURS

    client = MlflowClient(uri)
    parent, runs = _runs(client, sweep)
    prefixes = {r.data.tags["trial_id"].split("_")[0] for r in runs}  # e.g. 3ed8a of 3ed8a_00000: Tune's, random

    def text(value: str) -> str:
        for p in prefixes:
            value = value.replace(f"{p}_", "TUNE_")
        return value.replace(str(storage), "STORAGE")

    def strings(d: dict, drop=()) -> dict:
        return {k: text(v) for k, v in d.items() if k not in drop}

    def history(r) -> dict:
        return {k: h for k, h in _histories(client, r).items() if k not in (SECONDS_PER_STEP, TRAIN_HOURS)
                and not k.startswith(("system/", "sweep/"))}
    return {"parent": (parent.info.status, strings(parent.data.params), strings(parent.data.tags, _RUN_SPECIFIC_TAGS),
                       sorted(a.path for a in client.list_artifacts(parent.info.run_id))),
            "trials": sorted(((r.info.status, text(r.info.run_name), strings(r.data.params),
                               strings(r.data.tags, _RUN_SPECIFIC_TAGS), history(r)) for r in runs), key=lambda t: t[1])}


@needs_postgres
@pytest.mark.slow
def test_a_sweep_written_straight_to_postgresql_records_what_sqlite_records(tmp_path, env_with_venv, postgres):
    """--tracking-uri postgresql://... (the driver and every trial's process open the database themselves),
    through the launcher's boundary (it probes the database with the installed driver), then the same sweep on
    sqlite: the same record."""
    uri = postgres.create_database("direct")
    records = {}
    for store, where in ((uri, tmp_path / "pg"), (f"sqlite:///{tmp_path / 'lite' / 'mlflow.db'}", tmp_path / "lite")):
        where.mkdir()
        (where / "space.yaml").write_text(textwrap.dedent(ONE))
        proc = subprocess.run([sys.executable, str(LAUNCH), "--sweep", str(where / "space.yaml"), "--tracking-uri",
                               store, "--storage", str(where / "results"), "--name", "one"], cwd=where,
                              env=env_with_venv, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        records[store.split(":", 1)[0]] = _record(store, "one", where / "results")
    (trial,) = records["postgresql"]["trials"]
    assert trial[0] == "FINISHED" and [s for s, _ in trial[4]["val/accuracy"]] == [10, 20] and "test/accuracy" in trial[4]
    assert records["postgresql"] == records["sqlite"]


@needs_postgres
def test_the_launcher_boundary_accepts_a_postgresql_store_whose_driver_is_installed(tmp_path, offline_data,
                                                                                    monkeypatch, capsys, postgres):
    """service/inputs.py's boundary probes the database with the installed driver (psycopg 3, SQLAlchemy 2.1's
    default for postgresql://): a database that exists is accepted, one that does not is one line naming it."""
    from service.inputs import Inputs, boundary
    from tests.helpers import TINY, launch_args

    monkeypatch.chdir(tmp_path)
    uri = postgres.create_database("accepted")
    inputs = boundary(launch_args(tmp_path, TINY, "--tracking-uri", uri))
    assert isinstance(inputs, Inputs) and inputs.tracking_uri == uri
    capsys.readouterr()
    assert boundary(launch_args(tmp_path, TINY, "--tracking-uri", postgres.uri("nope"))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"tracking URI {postgres.uri('nope')!r}: the database does not accept the connection" in err, err
    assert 'database "nope" does not exist' in err, err
