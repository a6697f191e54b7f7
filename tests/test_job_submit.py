"""`ray job submit -- python service/launch.py --smoke` against a real `ray start --head` cluster (token auth on)."""
from __future__ import annotations

import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import REPO, VENV_BIN, free_ports, ray_node_ports, terminated_at_exit
from tests.helpers import child_runs

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_head(env_with_venv, tmp_path):
    # Ray 2.60 token auth, with a token of this test's own (a fresh machine has no ~/.ray/auth_token)
    token = tmp_path / "ray_token"
    token.write_text(secrets.token_hex(32))
    # as ray_cluster.yaml's head: `ray job stop` gives the driver 60 s after SIGTERM before its SIGKILL
    env = dict(env_with_venv, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_JOB_STOP_WAIT_TIME_S="60")
    # --block keeps `ray start` in the foreground: terminating it stops this cluster only (never `ray stop`,
    # which would stop every Ray on the machine)
    # ports of its own: another Ray on this machine (another engineer's run of this test) is never reached
    gcs, dash, client, *node = free_ports(8)
    dashboard = f"http://127.0.0.1:{dash}"
    head = subprocess.Popen([str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                             *ray_node_ports(node), "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    with terminated_at_exit(head):
        deadline = time.time() + 90
        while True:  # the job server answers once the dashboard is up (401 without a token still means up)
            assert head.poll() is None, "ray start --head exited"
            try:
                urllib.request.urlopen(f"{dashboard}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except Exception:
                assert time.time() < deadline, "dashboard did not come up"
                time.sleep(1)
        yield env, dashboard, f"127.0.0.1:{gcs}"


def test_ray_job_submit_smoke_sweep(ray_head, tmp_path):
    env, dashboard, gcs = ray_head
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_TOKEN")}
    refused = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", dashboard],
                             env=dict(no_token, HOME=str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()
    db = tmp_path / "mlflow.db"
    submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", "."]
    launch = ["python", "service/launch.py", "--smoke", "--tracking-uri", f"sqlite:///{db}",
              "--storage", str(tmp_path / "results"), "--name", "job"]
    # issue 12: a trial no node of this cluster (2 CPUs, no GPU, no autoscaler) can hold is refused before
    # anything starts, naming the cluster's nodes
    no_autoscaler = '{"env_vars": {"SMEAR_AUTOSCALING_CONFIG": "%s"}}' % (tmp_path / "none.yaml")
    proc = subprocess.run([*submit, "--runtime-env-json", no_autoscaler, "--", *launch, "--gpus-per-trial", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "failed with exit code 2" in out, out[-4000:]
    refusal = {line for line in out.splitlines() if "no node of the cluster" in line}   # streamed, then in the status
    assert len(refusal) == 1, out[-4000:]
    line = refusal.pop()
    assert line.startswith("launch.py: error: a trial asks for cpu=1, gpu=1 on one node")
    assert "live nodes: 1x cpu=2 gpu=0" in line and "valid:" in line
    assert "Traceback" not in out and not db.exists() and not (tmp_path / "results").exists()
    assert "Connecting to existing Ray cluster" not in out        # the driver's output is the one line
    assert "provenance:" not in out                               # refused input: no word on the commit either
    # ImageNet weights the cluster's node has not cached and cannot download (the job's env: no network, an
    # empty torch hub): refused by a check on that node, before anything starts
    decl = tmp_path / "imagenet.yaml"
    decl.write_text("description: x\nbase: {steps: 2, eval_every: 1, data.resolution: 16, pretrained: imagenet}\n"
                    "grid: {routing.method: [smear], seed: [0]}\n")
    dead = "http://127.0.0.1:9"   # the discard port: nothing listens
    offline = ('{"env_vars": {"TORCH_HOME": "%s", "HTTPS_PROXY": "%s", "https_proxy": "%s", "SMEAR_AUTOSCALING_CONFIG": '
               '"%s"}}' % (tmp_path / "empty-torch", dead, dead, tmp_path / "none.yaml"))
    proc = subprocess.run([*submit, "--runtime-env-json", offline, "--", "python", "service/launch.py", "--sweep",
                           str(decl), *launch[3:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "failed with exit code 2" in out, out[-4000:]
    refusal = {line for line in out.splitlines() if line.startswith("launch.py: error: on node ")}
    assert len(refusal) == 1 and ") of the cluster: pretrained='imagenet' needs " in refusal.pop(), out[-4000:]
    assert "Traceback" not in out and not db.exists() and not (tmp_path / "results").exists()
    # the shapes read from this live cluster and an autoscaler config (the shipped one, as on a `ray up` head)
    read = subprocess.run([sys.executable, "-c", "from service.cluster_shapes import cluster_shapes; "
                           "print(cluster_shapes().describe())"], cwd=REPO, capture_output=True, text=True,
                          env=dict(env, RAY_ADDRESS=gcs, PYTHONPATH=str(REPO),
                                   SMEAR_AUTOSCALING_CONFIG=str(REPO / "ray_cluster.yaml")), timeout=120)
    assert read.returncode == 0, read.stderr[-3000:]
    assert read.stdout.strip().splitlines()[-1] == (
        "live nodes: 1x cpu=2 gpu=0; node types: head cpu=0 gpu=0 (max 1), gpu_1x_a10g cpu=4 gpu=1 (max 8), "
        "gpu_4x_a10g cpu=48 gpu=4 (max 2)")
    # `ray job stop` of a running sweep: SIGTERM to the driver, which ends its parent and trial runs KILLED
    # (none left RUNNING) and exits 143
    long = tmp_path / "long.yaml"
    long.write_text("description: x\nbase: {steps: 400, eval_every: 10, batch_size: 16, torch_threads: 1, "
                    "data.resolution: 16, data.augment: none, data.domains: [real, sketch]}\n"
                    "grid: {routing.method: [smear], seed: [0, 1]}\nresources: {cpu: 1}\nmax_concurrent_trials: 2\n")
    stop_db = tmp_path / "stop.db"
    proc = subprocess.run([*submit, "--no-wait", "--", "python", "service/launch.py", "--sweep", str(long),
                           "--tracking-uri", f"sqlite:///{stop_db}", "--storage", str(tmp_path / "results"),
                           "--name", "stop"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    job = re.search(r"raysubmit_[A-Za-z0-9]+", proc.stdout + proc.stderr)
    assert proc.returncode == 0 and job, proc.stdout[-3000:] + proc.stderr[-3000:]
    deadline = time.time() + 300
    while len({p.parent for p in (tmp_path / "results" / "stop").glob("*/checkpoint_*")}) < 2:  # both training
        assert time.time() < deadline, "no checkpoints"
        time.sleep(1)
    jobs = [str(VENV_BIN / "ray"), "job"]
    subprocess.run([*jobs, "stop", "--address", dashboard, job.group(0)], env=env, check=True, capture_output=True,
                   timeout=180)
    logs = subprocess.run([*jobs, "logs", "--address", dashboard, job.group(0)], env=env, capture_output=True,
                          text=True, timeout=60).stdout
    assert "launch.py: interrupted (SIGTERM): the sweep's MLflow runs are KILLED" in logs, logs[-3000:]
    parent, children = child_runs(str(stop_db), experiment="smear-sweep/long")
    assert parent.info.status == "KILLED" and len(children) == 2, parent.info.status
    assert {r.info.status for r in children} == {"KILLED"}, [r.info.status for r in children]
    # as `make submit` does: record the commit the upload (which has no .git) will run
    subprocess.run([sys.executable, "-m", "service.provenance"], cwd=REPO, check=True, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    proc = subprocess.run([*submit, "--", *launch], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout
    parent, children = child_runs(str(db), experiment="smear-sweep/default")
    assert parent.info.status == "FINISHED"
    assert head and {r.data.tags["git_commit"] for r in [parent, *children]} == {head}   # provenance kept
    assert {r.data.tags["git_dirty"] for r in [parent, *children]} <= {"true", "false"}
    assert len(children) == 15 and all(r.info.status == "FINISHED" for r in children)
    assert all("test/accuracy" in r.data.metrics and "val/accuracy" in r.data.metrics for r in children)
    # issue 20: a plain `ray job submit` (no provenance step) records the tree the upload came from, git's own
    # HEAD^{tree}, and says once that the commit is unknown. The working dir is an export of this checkout's
    # tracked files as they are now (`git stash create`: a commit of them, HEAD itself when clean), so the tree
    # is well defined whatever the developer's working tree holds, and the job runs the code under test.
    snapshot = subprocess.run(["git", "stash", "create"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip() or "HEAD"
    tree = subprocess.run(["git", "rev-parse", f"{snapshot}^{{tree}}"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    export = tmp_path / "export"
    export.mkdir()
    archive = subprocess.run(["git", "archive", snapshot], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(export)], input=archive, check=True)
    assert not (export / ".git").exists() and not (export / ".smear-provenance.json").exists()
    plain_db = tmp_path / "plain.db"
    one = tmp_path / "one.yaml"
    one.write_text("description: x\nbase: {steps: 2, eval_every: 1, batch_size: 8, torch_threads: 1, "
                   "data.resolution: 16, data.augment: none, data.domains: [real, sketch]}\n"
                   "grid: {routing.method: [smear], seed: [0]}\nresources: {cpu: 1}\n")
    proc = subprocess.run([*submit[:-1], str(export), "--", "python", "service/launch.py", "--sweep", str(one),
                           "--tracking-uri", f"sqlite:///{plain_db}", "--storage", str(tmp_path / "results"),
                           "--name", "plain", "--no-system-metrics"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in proc.stdout, out[-4000:]
    parent, children = child_runs(str(plain_db), experiment="smear-sweep/one")
    assert len(children) == 1 and parent.info.status == "FINISHED"
    assert {r.data.tags["git_tree"] for r in [parent, *children]} == {tree}          # the checkout's tree
    assert {r.data.tags["git_commit"] for r in [parent, *children]} == {"unknown"}
    said = {line for line in out.splitlines() if line.startswith("provenance: ")}    # streamed, once
    assert len(said) == 1 and f"git_tree={tree}" in said.pop(), out[-4000:]
    assert out.count("python -m service.provenance") == 1, out[-4000:]
