"""The bounded probes of the services a sweep uses (service/probes.py), each against the real thing: a file that
is not an SQLite database, a database driver that is not installed, an HTTP server that is not MLflow and a real
``mlflow server``, storage that cannot be resolved, and RAY_ADDRESS: a closed port, a port that is no Ray
cluster, and a real ``ray start --head``. Each answers within its bound or refuses in one line."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from service.probes import (
    probe_mlflow_http, probe_ray_address, probe_sql_server, probe_sqlite, probe_storage, within,
)
from smear.configs import ConfigError
from tests.helpers import VENV_BIN, MlflowServer, free_port, free_ports, ray_node_ports, terminated_at_exit


def test_a_probe_that_hangs_is_a_refusal_within_its_bound():
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"^the thing does not answer within 0.5 s; valid: a reachable one$"):
        within(0.5, "the thing", lambda: time.sleep(30))
    assert time.monotonic() - t0 < 2
    assert within(1, "x", lambda: 7) == 7
    with pytest.raises(KeyError):  # its own exception comes back as it was
        within(1, "x", lambda: {}["k"])


def test_a_sqlite_store_that_is_not_a_database_is_refused(tmp_path):
    (tmp_path / "notes.db").write_text("these are my notes, not a database\n" * 20)
    with pytest.raises(ConfigError, match=r"notes.db is not an SQLite database \(file is not a database\); valid:"):
        probe_sqlite(f"sqlite:///{tmp_path / 'notes.db'}")
    import sqlite3

    sqlite3.connect(tmp_path / "real.db").execute("create table t (x)").connection.commit()
    probe_sqlite(f"sqlite:///{tmp_path / 'real.db'}")        # a database: accepted
    probe_sqlite(f"sqlite:///{tmp_path / 'new.db'}")         # not there yet: MLflow creates it


@pytest.mark.parametrize("uri,module,package", [("postgresql://u:p@127.0.0.1:1/db", "psycopg", "psycopg[binary]"),
                                                ("postgresql+psycopg2://u:p@127.0.0.1:1/db", "psycopg2",
                                                 "psycopg2-binary"),
                                                ("mysql+pymysql://u:p@127.0.0.1:1/db", "pymysql", "PyMySQL")])
def test_a_database_driver_that_is_not_installed_is_named_with_its_package(uri, module, package):
    pytest.importorskip("sqlalchemy")
    if any(m == module for m in sys.modules) or _importable(module):
        pytest.skip(f"{module} is installed here")
    with pytest.raises(ConfigError, match=rf"needs the database driver '{module}', which is not installed; valid: "
                                          rf"pip install {package.replace('[', '.').replace(']', '.')}"):
        probe_sql_server(uri)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
def test_an_http_server_that_is_not_mlflow_is_refused_and_mlflow_is_accepted(tmp_path, env_with_venv):
    port = free_port()
    other = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = MlflowServer(tmp_path / "m.db", env_with_venv)
    try:
        _wait_port(port)
        with pytest.raises(ConfigError, match=r"answers \(HTTP 404\) but is not an MLflow tracking server; valid:"):
            probe_mlflow_http(f"http://127.0.0.1:{port}")
        server.start()
        probe_mlflow_http(server.url)
    finally:
        other.kill()
        server.kill()


def _wait_port(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listens on {port}")


def test_remote_storage_that_cannot_be_resolved_is_refused_within_its_bound():
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"^--storage='s3://smear-no-such-bucket-\w+/x' (cannot be resolved or "
                                          r"written|does not answer within)"):
        probe_storage(f"s3://smear-no-such-bucket-{int(t0)}/x", timeout=5)
    assert time.monotonic() - t0 < 8
    probe_storage("/a/local/path")  # local: check_folder's, not probed here


def test_ray_address_refused_when_closed_or_not_ray_and_accepted_for_a_real_cluster(tmp_path):
    with pytest.raises(ConfigError, match=r"^RAY_ADDRESS='127.0.0.1:1' does not answer within 3 s"):
        probe_ray_address("127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"^RAY_ADDRESS='::::' "):
        probe_ray_address("::::")
    port = free_port()  # a port that accepts connections and speaks HTTP, not Ray
    other = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        with pytest.raises(ConfigError, match=r"answers but is not a Ray cluster|does not answer"):
            probe_ray_address(f"127.0.0.1:{port}")
    finally:
        other.kill()


@pytest.mark.slow
def test_ray_address_of_a_real_head_is_accepted(tmp_path, env_with_venv):
    """A real ``ray start --head`` (ports of its own; --block, so terminating it stops this cluster only)."""
    gcs, dash, client, *node = free_ports(8)
    head = subprocess.Popen([str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=1",
                             "--include-dashboard=false", f"--ray-client-server-port={client}", *ray_node_ports(node),
                             "--disable-usage-stats"], env=env_with_venv, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    with terminated_at_exit(head):
        deadline = time.monotonic() + 90
        while True:  # the GCS answers within seconds of the start
            assert head.poll() is None, "ray start --head exited"
            try:
                probe_ray_address(f"127.0.0.1:{gcs}")
                break
            except ConfigError:
                assert time.monotonic() < deadline, "the head's GCS never answered the probe"
                time.sleep(1)


def test_a_gateway_answering_for_a_server_that_is_down_is_no_answer():
    """A reverse proxy's 503 for the MLflow server behind it: the tracking server does not answer."""
    import http.server
    import threading

    class Gateway(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"upstream connect error")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ConfigError, match=r"does not answer within 3 s \(HTTP 503\); valid: a running MLflow server"):
            probe_mlflow_http(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
