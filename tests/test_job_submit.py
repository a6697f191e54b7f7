"""`ray job submit -- python service/launch.py --smoke` against a real `ray start --head` cluster (token auth on)."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import REPO, VENV_BIN
from tests.helpers import child_runs

pytestmark = pytest.mark.slow
DASHBOARD = "http://127.0.0.1:8265"


@pytest.fixture
def ray_head(env_with_venv, tmp_path):
    # Ray 2.60 token auth, with a token of this test's own (a fresh machine has no ~/.ray/auth_token)
    token = tmp_path / "ray_token"
    token.write_text(secrets.token_hex(32))
    env = dict(env_with_venv, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    # --block keeps `ray start` in the foreground: terminating it stops this cluster only (never `ray stop`,
    # which would stop every Ray on the machine)
    head = subprocess.Popen([str(VENV_BIN / "ray"), "start", "--head", "--block", "--port=6390", "--num-cpus=2",
                             "--dashboard-host=127.0.0.1", "--dashboard-port=8265", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:  # the job server answers once the dashboard is up (401 without a token still means up)
            assert head.poll() is None, "ray start --head exited"
            try:
                urllib.request.urlopen(f"{DASHBOARD}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except Exception:
                assert time.time() < deadline, "dashboard did not come up"
                time.sleep(1)
        yield env
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def test_ray_job_submit_smoke_sweep(ray_head, tmp_path):
    env = ray_head
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_TOKEN")}
    refused = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", DASHBOARD],
                             env=dict(no_token, HOME=str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()
    db = tmp_path / "mlflow.db"
    # as `make submit` does: record the commit the upload (which has no .git) will run
    subprocess.run([sys.executable, "-m", "service.provenance"], cwd=REPO, check=True, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", DASHBOARD, "--working-dir", ".", "--",
           "python", "service/launch.py", "--smoke", "--tracking-uri", f"sqlite:///{db}",
           "--storage", str(tmp_path / "results"), "--name", "job"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout
    parent, children = child_runs(str(db), experiment="smear-sweep/default")
    assert parent.info.status == "FINISHED"
    assert head and {r.data.tags["git_commit"] for r in [parent, *children]} == {head}   # provenance kept
    assert {r.data.tags["git_dirty"] for r in [parent, *children]} <= {"true", "false"}
    assert len(children) == 15 and all(r.info.status == "FINISHED" for r in children)
    assert all("test/accuracy" in r.data.metrics and "val/accuracy" in r.data.metrics for r in children)
