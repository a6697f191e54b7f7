"""A tracking server lost for good mid-sweep loses nothing (issue 20, the durable record): a real ``mlflow server``
is SIGKILLed once the first trial's run exists and comes back only after the sweep has ended. The sweep ends with
its own exit code, names the runs whose record is incomplete and prints the sync command; that command, run once
the server is back, makes the record (runs, statuses, every metric step, artifacts, the report) equal to an
unfaulted sweep's of the same declaration, and a second sync sends nothing."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow.tracking import MlflowClient

from service.record import EXIT_RECORD_INCOMPLETE
from service.replica import MARKER
from tests.helpers import REPO, MlflowServer
from trainables.names import SECONDS_PER_STEP, TRAIN_HOURS

pytestmark = pytest.mark.slow

DECL = """
description: four short trials, two at a time
base: {steps: 40, eval_every: 10, batch_size: 16, torch_threads: 1, data.resolution: 16, data.augment: none,
       data.domains: [real, sketch], routing.method: smear}
grid: {seed: [0, 1, 2, 3]}
resources: {cpu: 1}
max_concurrent_trials: 2
"""
TIMING = (SECONDS_PER_STEP, TRAIN_HOURS)


def _sweep(tmp_path, env, server: MlflowServer, name: str) -> subprocess.Popen:
    (tmp_path / "space.yaml").write_text(textwrap.dedent(DECL))
    cmd = [sys.executable, str(REPO / "service" / "launch.py"), "--sweep", str(tmp_path / "space.yaml"),
           "--tracking-uri", server.url, "--storage", str(tmp_path / "results"), "--name", name,
           "--no-system-metrics"]
    return subprocess.Popen(cmd, cwd=tmp_path, env={**env, "SMEAR_RECORD_WAIT_S": "10"},
                            stdout=open(tmp_path / f"{name}.txt", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _record(url: str) -> dict:
    """The sweep's record as a researcher reads it, keyed by what is the same in two sweeps of one declaration
    (method and seed, not Tune's trial ids): status, params, tags, each metric's (step, value) history, files."""
    client = MlflowClient(url)
    exp = client.get_experiment_by_name("smear-sweep/space")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    out = {"parent": (parent.info.status, sorted(a.path for a in client.list_artifacts(parent.info.run_id)),
                      sorted(a.path for a in client.list_artifacts(parent.info.run_id, "report")))}
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId") != parent.info.run_id:
            continue
        history = {}
        for key in r.data.metrics:
            steps = [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, key)]
            assert len({s for s, _ in steps}) == len(steps), (key, steps)      # no step twice
            history[key] = sorted(s for s, _ in steps) if key in TIMING else sorted(steps)
        params = {k: v for k, v in r.data.params.items() if not k.startswith("data.root")}
        tags = {k: v for k, v in r.data.tags.items()
                if k not in (MARKER, "mlflow.parentRunId", "mlflow.runName", "trial_id", "best_checkpoint", "sweep")
                and not k.startswith("git_")}  # provenance: what the tree was at each launch
        files = sorted(a.path for a in client.list_artifacts(r.info.run_id))
        out[(r.data.tags["method"], r.data.tags["seed"])] = (r.info.status, params, tags, history, files)
    return out


def _summary_table(tmp_path, name: str) -> list[str]:
    """The report's tables of scores and statistics (what follows, the compute and trial tables, holds the
    measured seconds per step and Tune's trial ids, which two sweeps never share)."""
    text = (tmp_path / "results" / name / "report" / "summary.md").read_text()
    return [line for line in text.split("### Compute")[0].splitlines() if line.startswith("| ")]


def test_a_tracking_server_lost_for_good_loses_nothing_after_the_sync(tmp_path, env_with_venv):
    clean = MlflowServer(tmp_path / "clean" / "mlflow.db", env_with_venv)
    (tmp_path / "clean").mkdir()
    faulted = MlflowServer(tmp_path / "faulted" / "mlflow.db", env_with_venv)
    (tmp_path / "faulted").mkdir()
    procs = []
    try:
        clean.start()
        procs.append(_sweep(tmp_path, env_with_venv, clean, "clean"))
        assert procs[-1].wait(timeout=900) == 0, (tmp_path / "clean.txt").read_text()[-3000:]
        expected = _record(clean.url)
        clean.kill()

        faulted.start()
        procs.append(proc := _sweep(tmp_path, env_with_venv, faulted, "lost"))
        client = MlflowClient(faulted.url)
        deadline = time.time() + 600
        while time.time() < deadline:
            exp = client.get_experiment_by_name("smear-sweep/space")
            if exp is not None and any("trial_id" in r.data.tags for r in client.search_runs([exp.experiment_id])):
                break
            assert proc.poll() is None, (tmp_path / "lost.txt").read_text()[-3000:]
            time.sleep(0.5)
        faulted.kill()                                              # lost for good: back only after the sweep
        rc = proc.wait(timeout=900)
        out = (tmp_path / "lost.txt").read_text()
        assert rc == EXIT_RECORD_INCOMPLETE, out[-4000:]
        assert "the MLflow record is incomplete" in out and "trial run(s) lack some" in out, out[-4000:]
        assert re.search(r"\n  smear-s\d-\w+ \(\w+\): .*metric step", out), out[-4000:]  # which trial lacks what
        assert "the parent run lost: " in out and "the report" in out, out[-4000:]
        (command,) = [line.strip() for line in out.splitlines() if line.strip().startswith("python service/launch.py --sync")]

        faulted.start()                                             # the server is back, on the same store
        sync = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=REPO, env=env_with_venv,
                              capture_output=True, text=True, timeout=600)
        assert sync.returncode == 0, sync.stdout[-3000:] + sync.stderr[-3000:]
        assert "its record is complete" in sync.stdout and "Report: " in sync.stdout, sync.stdout[-3000:]
        got = _record(faulted.url)
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == expected[key], key
        assert len(_summary_table(tmp_path, "clean")) >= 5  # the scores, statistics and aggregates
        assert _summary_table(tmp_path, "lost") == _summary_table(tmp_path, "clean")  # the same report
        again = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=REPO, env=env_with_venv,
                               capture_output=True, text=True, timeout=600)
        assert again.returncode == 0 and " 0 write(s) sent" in again.stdout, again.stdout + again.stderr
        assert _record(faulted.url) == got
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        clean.kill()
        faulted.kill()
