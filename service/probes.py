"""Bounded probes of the services a sweep will use, each opening the service the way the sweep will and
naming what it probed: the tracking store (a sqlite file that is a database, an SQL server's driver and
database), an http(s) tracking server that is MLflow, remote storage that resolves and takes a write, and the
Ray cluster at RAY_ADDRESS. Each probe answers within a few seconds (a thread with a deadline: a probe that
hangs is a refusal, not a hang) or refuses with one ConfigError line. Called by ``service/preflight.py``'s
``check_environment``; a dry run probes nothing."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from smear.configs import ConfigError
from smear.hub import PROBE_TIMEOUT_S

# the module a database URI's driver imports -> the package that provides it
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                   "pymysql": "PyMySQL", "pyodbc": "pyodbc", "pymssql": "pymssql"}
SQL_SCHEMES = ("postgresql", "mysql", "mssql")


def within(seconds: float, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` in a daemon thread, given ``seconds``: its value, its exception, or a ConfigError naming ``what``
    when it has not answered in time (the thread is left to end on its own)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, name=f"probe {what}", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise ConfigError(f"{what} does not answer within {seconds:g} s; valid: a reachable one")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def probe_sqlite(uri: str) -> None:
    """An existing sqlite store's file is an SQLite database (an empty or missing file: MLflow creates one)."""
    import sqlite3

    db = Path(uri[len("sqlite:///"):])
    if not db.is_file() or db.stat().st_size == 0:
        return
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=PROBE_TIMEOUT_S) as con:
            con.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as e:
        raise ConfigError(f"tracking URI {uri!r}: {db} is not an SQLite database ({e}); valid: an MLflow sqlite "
                          "store, or a new file name") from None


def probe_sql_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """A PostgreSQL / MySQL / MSSQL store: its driver is installed, and its database answers within ``timeout``."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    try:
        url = make_url(uri)
        dialect = url.get_dialect()
    except Exception as e:  # noqa: BLE001 - SQLAlchemy's refusal of the URI itself
        raise ConfigError(f"tracking URI {uri!r} is not a database URI SQLAlchemy can read ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160]}); valid: e.g. postgresql://USER:PASSWORD@HOST:PORT/DB") from None
    try:
        dialect.import_dbapi()
    except ModuleNotFoundError as e:
        package = DRIVER_PACKAGES.get(e.name or "", e.name)
        raise ConfigError(f"tracking URI {uri!r} needs the database driver {e.name!r}, which is not installed; "
                          f"valid: pip install {package} (or a sqlite:/// store)") from None
    timeouts = {"postgresql": {"connect_timeout": int(timeout)}, "mysql": {"connect_timeout": int(timeout)}}

    def connect() -> None:
        engine = create_engine(url, connect_args=timeouts.get(url.get_backend_name(), {}))
        try:
            with engine.connect() as con:
                con.execute(text("SELECT 1"))
        finally:
            engine.dispose()

    try:
        within(timeout + 1, f"the database of tracking URI {uri!r}", connect)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the server's or the driver's refusal, named
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"tracking URI {uri!r}: the database does not accept the connection ({first}); valid: "
                          "a running server, an existing database and its credentials") from None


def probe_mlflow_http(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """An http(s) tracking server answers within ``timeout`` seconds and is MLflow: its REST API answers a lookup
    of the Default experiment with MLflow's JSON (the experiment, or MLflow's error_code); a request for
    credentials counts (an auth server); a gateway's 502 / 503 / 504 for a server behind it is no answer. One
    plain request, not MLflow's client, which retries for minutes."""
    import urllib.error
    import urllib.request

    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    request = urllib.request.Request(url, headers=_mlflow_auth_headers())  # the credentials MLflow's client sends
    try:  # a fresh opener: urlopen() would install a process-wide one with this moment's proxies
        with urllib.request.build_opener().open(request, timeout=timeout) as r:
            body, status = r.read(1 << 16), r.status
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return
        if e.code in (502, 503, 504):
            raise ConfigError(f"tracking URI {uri!r} does not answer within {timeout:g} s (HTTP {e.code}); valid: a "
                              "running MLflow server (mlflow server --host ... --port ...), or a sqlite:/// store") from None
        body, status = e.read(1 << 16), e.code
    except (OSError, ValueError) as e:
        raise ConfigError(f"tracking URI {uri!r} does not answer within {timeout:g} s "
                          f"({getattr(e, 'reason', e)}); valid: a running MLflow server (mlflow server --host ... "
                          "--port ...), or a sqlite:/// store") from None
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not (isinstance(data, dict) and ("experiment" in data or "error_code" in data)):
        raise ConfigError(f"tracking URI {uri!r} answers (HTTP {status}) but is not an MLflow tracking server; "
                          "valid: the address of `mlflow server`, or a sqlite:/// store")


def _mlflow_auth_headers() -> dict[str, str]:
    """The Authorization header MLflow's client sends from its environment: basic auth from
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, else a bearer MLFLOW_TRACKING_TOKEN; none without."""
    import base64
    import os

    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {token}"}
    return {}


def probe_tracking(uri: str) -> None:
    """The tracking URI, opened the way the sweep will open it."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if uri.startswith("sqlite:///"):
        probe_sqlite(uri)
    elif scheme in SQL_SCHEMES:
        probe_sql_server(uri)
    elif scheme in ("http", "https"):
        probe_mlflow_http(uri)


def probe_storage(storage: str, timeout: float = 2 * PROBE_TIMEOUT_S) -> None:
    """Remote storage (s3://, gs://, ...) resolves (pyarrow, as Tune opens it) and takes a write, within
    ``timeout``; local folders are ``check_folder``'s."""
    if "://" not in storage or storage.startswith("file://"):
        return
    import uuid

    import pyarrow.fs

    def write() -> None:
        fs, path = pyarrow.fs.FileSystem.from_uri(storage)
        probe = f"{path.rstrip('/')}/.smear-write-probe-{uuid.uuid4().hex}"
        fs.create_dir(path.rstrip("/"), recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"probe")
        fs.delete_file(probe)

    try:
        within(timeout, f"--storage={storage!r}", write)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow's or the service's refusal, named
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"--storage={storage!r} cannot be resolved or written ({first}); valid: storage this "
                          "machine can reach and write (credentials, bucket, network)") from None


def _answers_as_ray(host: str, port: int, timeout: float) -> bool:
    """One gRPC call to the address (the GCS's CheckAlive, through grpcio and Ray's own generated stubs): Ray's
    GCS answers it (OK, or a request for its auth token); a Ray client server answers as a gRPC server without
    that method. A port that accepts TCP and is no gRPC server (a proxy: an HTTP status; nothing) does not."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    try:  # Ray's own channel options: never through the environment's http(s) proxy, unless Ray's would be
        from ray._private.ray_constants import GLOBAL_GRPC_OPTIONS as options
    except ImportError:
        options = (("grpc.enable_http_proxy", 0),)
    with grpc.insecure_channel(f"{host}:{port}", options=list(options)) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).CheckAlive(gcs_service_pb2.CheckAliveRequest(),
                                                                            timeout=timeout)
            return True
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ConnectionError(e.details() or e.code().name) from None
            return not (e.details() or "").startswith("Received http2 header with status")


def probe_ray_address(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """RAY_ADDRESS answers as a Ray cluster (:func:`_answers_as_ray`: Ray's GCS, or its client server for ray://)
    within ``timeout`` ("auto" and "local" are Ray's own lookups, not probed)."""
    if address in ("auto", "local", ""):
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port or (10001 if parts.scheme == "ray" and "://" in address else 6379)
    except ValueError as e:
        raise ConfigError(f"RAY_ADDRESS={address!r} is not an address ({e}); valid: HOST:PORT, ray://HOST:PORT, "
                          "or unset for a local Ray") from None
    if not host:
        raise ConfigError(f"RAY_ADDRESS={address!r} names no host; valid: HOST:PORT, ray://HOST:PORT, or unset")
    try:  # the name lookup too is bounded
        ray_answers = within(timeout + 1, f"RAY_ADDRESS={address!r}", lambda: _answers_as_ray(host, port, timeout))
    except OSError as e:
        raise ConfigError(f"RAY_ADDRESS={address!r} does not answer within {timeout:g} s ({e.strerror or e}); valid: "
                          "the address of a running Ray cluster (ray start --head), or unset for a local Ray") from None
    if not ray_answers:
        raise ConfigError(f"RAY_ADDRESS={address!r} answers but is not a Ray cluster; valid: the address of "
                          "a running Ray cluster's GCS (ray start --head prints it), or unset for a local Ray")
