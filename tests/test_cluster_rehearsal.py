"""Rehearsal of the cluster deployment on this machine: what ray_cluster.yaml sets up, minus the cloud.

A real 2-node Ray cluster (`ray start --head --block` plus `ray start --address=... --block`, token auth on
every process with a token made by docker/make-secrets.sh), the MLflow server started by
docker/mlflow-server.sh on loopback (basic auth when mlflow[auth] is installed), MLflow credentials in the
nodes' environment only (as the YAML's start commands do), then `ray job submit -- python service/launch.py`
from a client that holds the Ray token but no MLflow password.

The driver on one node, every trial on the other, by construction: as ray_cluster.yaml's head, the head
node has no CPU for a trial (`--num-cpus=0`), so Ray can place each trial (1 CPU) only on the worker node
(2 CPUs), and `ray job submit` runs the driver on the head. (Which nodes trials land on when both have CPUs
is timing: Tune reuses a finished trial's process for the next one, so "trials on both nodes" failed once in
745 runs on a busy machine.) Each trial logs to the MLflow server from the worker node, the driver from the
head. On one machine every node has the same IP (Tune's result "node_ip" cannot tell them apart), so each
trial's actor is found by the "pid" of its result.json in Ray's state API, which gives the actor's node_id;
the worker node is the one with the custom resource `second_node`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import REPO, VENV_BIN, free_ports, ray_node_ports

pytestmark = pytest.mark.slow

SWEEP = """\
description: cluster rehearsal, 4 small trials on the worker node, the driver on the head
base: {steps: 20, eval_every: 10, batch_size: 16, torch_threads: 1, data.resolution: 16, data.augment: none,
       data.domains: [real, sketch]}
grid: {routing.method: [smear, tag], seed: [0, 1]}
resources: {cpu: 1}
max_concurrent_trials: 2
"""
BASIC_AUTH = importlib.util.find_spec("flask_wtf") is not None  # mlflow[auth]


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    # its own session: stopping it (and only it) never touches another Ray or MLflow on this machine
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of this process's own session
    except ProcessLookupError:
        pass


def _wait(what: str, ok, proc: subprocess.Popen, log: Path, timeout: float = 150) -> None:
    deadline = time.time() + timeout
    while not ok():
        assert proc.poll() is None, f"{what}: exited\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"{what}: not ready after {timeout} s\n{log.read_text()[-3000:]}"
        time.sleep(1)


def _ray(env: dict, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().split())


@pytest.fixture
def cluster(env_with_venv, tmp_path):
    gcs, dash, client, mlflow_port, *node_ports = free_ports(14)
    secrets = tmp_path / "secrets"
    made = subprocess.run(["bash", str(REPO / "docker" / "make-secrets.sh"), str(secrets)],
                          env=env_with_venv, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(secrets / "ray_auth_token")}
    uri = f"http://127.0.0.1:{mlflow_port}"
    # each node its own temp dir, as on separate machines: nodes sharing one would share runtime_resources,
    # and the second node's cleanup of the job's working_dir would delete the driver's working directory.
    # (short paths: Ray's unix sockets live there)
    temp_dirs = [tempfile.mkdtemp(prefix="ray-h", dir="/tmp"), tempfile.mkdtemp(prefix="ray-w", dir="/tmp")]
    procs: list[subprocess.Popen] = []
    try:
        mlflow_log = tmp_path / "mlflow-server.log"
        server = _start(["bash", str(REPO / "docker" / "mlflow-server.sh")], dict(
            env_with_venv, MLFLOW_HOME=str(tmp_path / "mlflow"), MLFLOW_HOST="127.0.0.1",
            MLFLOW_PORT=str(mlflow_port), MLFLOW_WORKERS="1", SMEAR_SECRETS_DIR=str(secrets),
            MLFLOW_AUTH="basic" if BASIC_AUTH else "none"), mlflow_log)
        procs.append(server)

        # the nodes' environment, as ray_cluster.yaml's start commands make it
        node_env = dict(env_with_venv, **token, **_env_file(secrets / "mlflow.env"), MLFLOW_TRACKING_URI=uri)
        head_log, worker_log = tmp_path / "ray-head.log", tmp_path / "ray-worker.log"
        ray = str(VENV_BIN / "ray")
        head = _start([ray, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=0", f"--temp-dir={temp_dirs[0]}",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                       *ray_node_ports(node_ports[:5]), "--disable-usage-stats"], node_env, head_log)
        procs.append(head)
        dashboard = f"http://127.0.0.1:{dash}"
        _wait("ray head", lambda: _answers(f"{dashboard}/api/version"), head, head_log)
        worker = _start([ray, "start", f"--address=127.0.0.1:{gcs}", "--block", "--num-cpus=2", f"--temp-dir={temp_dirs[1]}",
                         '--resources={"second_node": 1}', *ray_node_ports(node_ports[5:]), "--disable-usage-stats"],
                        node_env, worker_log)
        procs.insert(0, worker)
        client_env = dict(env_with_venv, **token)  # the Ray token, no MLflow password
        _wait("second node", lambda: len(_alive_nodes(client_env, dashboard)) == 2, worker, worker_log)
        _wait("mlflow server", lambda: "mlflow-server.sh: serving" in mlflow_log.read_text(), server, mlflow_log)
        yield {"dashboard": dashboard, "uri": uri, "client_env": client_env, "secrets": secrets,
               "logs": [mlflow_log, head_log, worker_log]}
    finally:
        for p in procs:  # worker node, head, MLflow
            _stop(p)
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except urllib.error.HTTPError:  # 401 without a token still means up
        return True
    except Exception:
        return False


def _failure(proc: subprocess.CompletedProcess, logs: list[Path]) -> str:
    """Errors and the last lines of the job (trial results are long lines: cut), then the services' logs."""
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [ln[:300] for ln in lines if "Error" in ln or "error:" in ln or "Traceback" in ln][-30:]
    tail = [ln[:300] for ln in lines[-40:]]
    services = [f"--- {p.name}:\n" + "\n".join(ln[:300] for ln in p.read_text().splitlines()[-15:]) for p in logs]
    return "\n".join(["--- errors:", *errors, "--- job output (end):", *tail, *services])


def _state(env: dict, dashboard: str, kind: str) -> list[dict]:
    proc = _ray(env, "list", kind, "--address", dashboard, "--detail", "--format", "json", "--limit", "10000")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(proc.stdout) if proc.stdout.lstrip().startswith("[") else []  # "No resource in the cluster"


def _alive_nodes(env: dict, dashboard: str) -> list[dict]:
    try:
        return [n for n in _state(env, dashboard, "nodes") if n["state"] == "ALIVE"]
    except AssertionError:
        return []


def test_sweep_job_on_two_node_cluster_logs_every_trial_to_mlflow_server(cluster, tmp_path, monkeypatch):
    t0 = time.time()
    decl = tmp_path / "rehearsal.yaml"
    decl.write_text(SWEEP)
    storage = tmp_path / "results"
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO),
           # job-level env_vars: the tracking URI only (credentials come from the nodes' environment)
           "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": cluster["uri"]}}), "--",
           "python", "service/launch.py", "--sweep", str(decl), "--tracking-uri", cluster["uri"],
           "--storage", str(storage), "--name", "rehearsal"]
    proc = subprocess.run(cmd, cwd=REPO, env=cluster["client_env"], capture_output=True, text=True, timeout=900)
    (tmp_path / "job.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, _failure(proc, cluster["logs"])
    assert "succeeded" in proc.stdout

    # every trial is in the MLflow server, read back with the job account's credentials
    from mlflow.tracking import MlflowClient

    if BASIC_AUTH:  # nothing on the cluster was refused: the driver (head) and the trials (worker node, with
        # their system metrics) authenticated with the account in their node's environment
        access = cluster["logs"][0].read_text().splitlines()
        assert not [ln for ln in access if '" 401' in ln or '" 403' in ln]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{cluster['uri']}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert refused.value.code == 401
        for k, v in _env_file(cluster["secrets"] / "mlflow.env").items():
            monkeypatch.setenv(k, v)
    client = MlflowClient(cluster["uri"])
    exp = client.get_experiment_by_name("smear-sweep/rehearsal")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "rehearsal"
    assert sorted((r.data.tags["method"], r.data.tags["seed"]) for r in children) == [
        ("smear", "0"), ("smear", "1"), ("tag", "0"), ("tag", "1")]
    for r in children:
        assert r.info.status == "FINISHED", r.info
        assert {"train/loss", "val/accuracy", "test/accuracy"} <= set(r.data.metrics), sorted(r.data.metrics)
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val/accuracy")] == [10, 20]
    assert "summary.md" in [a.path for a in client.list_artifacts(parent.info.run_id)]  # proxied artifacts

    # every trial ran on the worker node, the driver on the head: trial pid (result.json) -> actor (state API)
    # -> node; the job's driver node from the state API
    pids = {}
    for result in (storage / "rehearsal").glob("*/result.json"):
        last = json.loads(result.read_text().splitlines()[-1])
        pids[last["trial_id"]] = last["pid"]
    assert len(pids) == 4, sorted(p.name for p in (storage / "rehearsal").iterdir())
    env, dashboard = cluster["client_env"], cluster["dashboard"]
    node_of_pid = {a["pid"]: a["node_id"] for a in _state(env, dashboard, "actors") if a.get("pid")}
    nodes = _state(env, dashboard, "nodes")
    (second,) = [n["node_id"] for n in nodes if "second_node" in n["resources_total"]]
    (head,) = [n["node_id"] for n in nodes if n["node_id"] != second]
    trial_nodes = {tid: node_of_pid[pid] for tid, pid in pids.items()}
    assert set(trial_nodes.values()) == {second}, (trial_nodes, second)
    drivers = {j.get("driver_node_id") for j in _state(env, dashboard, "jobs")}
    assert drivers == {head}, (drivers, head)
    print(f"\nrehearsal: job {time.time() - t0:.0f} s; driver on the head, {len(trial_nodes)} trials on the worker node")
