"""What several test files share: the repository root, the one tiny declaration, running the launcher as a
real process, and reading a sweep's runs back from MLflow."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
VENV_BIN = Path(sys.executable).parent
LAUNCH = REPO / "service" / "launch.py"

TINY = """
description: tiny sweep for tests
base: {steps: 4, eval_every: 2, batch_size: 16, torch_threads: 1, data.resolution: 16, data.augment: none,
       data.domains: [real, sketch]}
grid: {routing.method: [smear, tag, adapter], seed: [0]}
resources: {cpu: 1}
max_concurrent_trials: 2
"""


def launch_args(tmp_path: Path, decl: str | None, *extra: str, name: str | None = "t") -> list[str]:
    """launch.py's arguments for ``decl`` (written to tmp_path/space.yaml; None = no --sweep), with the MLflow
    store and the results under ``tmp_path``."""
    argv = ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "results")]
    if decl is not None:
        (tmp_path / "space.yaml").write_text(textwrap.dedent(decl))
        argv += ["--sweep", str(tmp_path / "space.yaml")]
    if name is not None:
        argv += ["--name", name]
    return argv + list(extra)


def run_launch(tmp_path: Path, env, decl: str, *extra: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """launch.py as a real process (the command users run), to completion."""
    return subprocess.run([sys.executable, str(LAUNCH), *launch_args(tmp_path, decl, *extra)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def child_runs(db: str, experiment: str = "smear-sweep/space") -> tuple[object, list]:
    """The one parent run of the experiment and its child runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    return parents[0], [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]


def without_timing(reports: list[dict]) -> list[dict]:
    """Reports without the measured wall-clock metrics (the only keys two identical runs may differ in), and with
    the routing heatmaps' content in place of their file's location (each run writes its own file)."""
    from trainables.names import ROUTING_HEATMAP, SECONDS_PER_STEP, TRAIN_HOURS
    from trainables.session import read_artifact

    return [{k: read_artifact(v) if k == ROUTING_HEATMAP else v for k, v in r.items()
             if k not in (SECONDS_PER_STEP, TRAIN_HOURS)} for r in reports]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all held open while they are chosen)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ray_node_ports(p: list[int]) -> list[str]:
    """`ray start` flags giving a node's own ports (5 of ``p``): two Rays on one machine (another engineer's test,
    a second node) never meet on a default one."""
    return [f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}", f"--dashboard-agent-listen-port={p[2]}",
            f"--dashboard-agent-grpc-port={p[3]}", f"--runtime-env-agent-port={p[4]}"]


class MlflowServer:
    """A real ``mlflow server`` on a sqlite store (``db``), or on ``store`` (a PostgreSQL URI: its artifacts and
    log still go next to ``db``), as a process group that can be killed and started again on the same port and
    store (a tracking outage)."""

    def __init__(self, db: Path, env: dict[str, str], port: int | None = None, store: str | None = None):
        self.db, self.env, self.port = db, env, port or free_port()
        self.store = store or f"sqlite:///{db}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = db.parent / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "MlflowServer":
        import time
        import urllib.request

        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", self.store,
                 "--artifacts-destination", str(self.db.parent / "mlartifacts"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                cwd=self.db.parent, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self._warm(deadline)
            except OSError:
                pass
            time.sleep(0.5)
        self.kill()  # never left running behind a failed test
        raise AssertionError(f"mlflow server not healthy after {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def _warm(self, deadline: float) -> "MlflowServer":
        """One REST call, given what is left of the start's time: /health answers before the server has opened
        its store, which its first request does (a PostgreSQL store: the schema check, seconds on a busy machine,
        longer than the launcher's 3 s probe)."""
        import time
        import urllib.error
        import urllib.request

        url = f"{self.url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
        try:
            urllib.request.urlopen(url, timeout=max(5.0, deadline - time.time())).close()
        except urllib.error.HTTPError:
            pass  # an answer (e.g. 404 for a store without the Default experiment yet)
        return self

    def kill(self) -> None:
        """SIGKILL the server's whole process group (uvicorn and its workers): an outage, not a clean stop."""
        import os
        import signal

        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A real tmpfs mounted on ``folder`` (created) with mount ``options`` (e.g. "size=3m", "ro,size=1m"),
    unmounted after; needs root, as CI has."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                             text=True)
    assert mounted.returncode == 0, f"this test mounts a tmpfs ({options}) and needs root: {mounted.stderr.strip()}"
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@contextlib.contextmanager
def terminated_at_exit(proc: subprocess.Popen, timeout: float = 60):
    """Within: ``proc`` (a ``ray start --block`` head, a server in its own session) runs; at exit it is
    terminated, and its process group killed if it has not ended within ``timeout`` (never ``ray stop``, which
    would stop every Ray on the machine)."""
    import os
    import signal

    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
