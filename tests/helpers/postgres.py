"""A real PostgreSQL cluster of its own for a test or a benchmark: ``initdb`` in a temporary folder, the server
on a free loopback port (TCP only, trust authentication), databases created in it, everything stopped and
deleted at the end.

PostgreSQL refuses to run as root. As root (CI, containers), initdb and the server run as an unprivileged
user: ``postgres`` (the Debian/Ubuntu packages create it), else ``nobody``; the cluster's folder is a fresh
``mkdtemp`` under the system temp folder (world-traversable; pytest's ``tmp_path`` is root's own, mode 0700)
handed to that user. Not as root, both run as the current user. The child processes drop privileges through
``subprocess``'s ``user=``/``group=`` (setuid before exec), so neither ``runuser`` nor ``su`` is needed.

    with PostgresCluster() as pg:
        uri = pg.create_database("mlflow")      # postgresql://smear@127.0.0.1:PORT/mlflow

The binaries: $SMEAR_PG_BINDIR, else the folder of ``pg_ctl`` / ``initdb`` on PATH (symlinks followed), else
the newest ``/usr/lib/postgresql/*/bin``; :func:`pg_bindir` is None when there is none.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SUPERUSER = "smear"                       # the cluster's superuser (trust auth: no password)
_FAST = ("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")  # a throwaway cluster


def pg_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and createdb, or None when PostgreSQL's server is not installed."""
    def complete(d: Path) -> bool:
        return all((d / b).is_file() for b in ("initdb", "pg_ctl", "createdb"))

    if env := os.environ.get("SMEAR_PG_BINDIR"):
        return Path(env) if complete(Path(env)) else None
    for name in ("pg_ctl", "initdb"):
        if found := shutil.which(name):
            d = Path(found).resolve().parent
            if complete(d):
                return d
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                      if p.parent.name.isdigit() else 0)
    return next((d for d in reversed(versions) if complete(d)), None)


def _unprivileged_user() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as: None when this process is not root (it runs as we do)."""
    if os.geteuid() != 0:
        return None
    import pwd

    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    raise RuntimeError("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")


class PostgresCluster:
    """One PostgreSQL cluster: :meth:`start` (initdb + server), :meth:`create_database`, :meth:`stop` (server
    stopped, folder deleted). ``durable=False`` (tests) turns fsync and synchronous commit off; a benchmark
    that compares stores passes ``durable=True``, PostgreSQL's defaults."""

    def __init__(self, port: int | None = None, *, durable: bool = False, bindir: Path | None = None):
        from tests.helpers import free_port

        self.bindir = bindir or pg_bindir()
        if self.bindir is None:
            raise RuntimeError("PostgreSQL's server (initdb, pg_ctl) is not installed; set SMEAR_PG_BINDIR")
        self.port, self.durable = port or free_port(), durable
        self.owner = _unprivileged_user()
        self.folder: Path | None = None

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    def uri(self, database: str, driver: str = "") -> str:
        """SQLAlchemy's URI of ``database`` (``driver``: e.g. "psycopg2" for ``postgresql+psycopg2://``;
        "" is SQLAlchemy's default PostgreSQL driver, psycopg 3 from SQLAlchemy 2.1)."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A PostgreSQL server program, as the cluster's owner."""
        who = {} if self.owner is None else {"user": self.owner[0], "group": self.owner[1], "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C", "PGTZ": "UTC"}
        proc = subprocess.run([str(self.bindir / argv[0]), *argv[1:]], capture_output=True, text=True,
                              timeout=timeout, cwd=self.folder, env=env, **who)
        if proc.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.is_file() else ""
            raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}{log}")
        return proc

    def start(self) -> "PostgresCluster":
        self.folder = Path(tempfile.mkdtemp(prefix="smear-pg-"))
        try:
            if self.owner is not None:
                os.chown(self.folder, *self.owner)
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", SUPERUSER, "-E", "UTF8",
                      "--locale=C", *(() if self.durable else ("--no-sync",)))
            # TCP on loopback only; the unix socket in the cluster's own folder (never /var/run/postgresql)
            options = ["-p", str(self.port), "-c", "listen_addresses=127.0.0.1", "-k", str(self.folder),
                       "-c", "max_connections=200", *(() if self.durable else _FAST)]
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                      "-o", " ".join(options), "start")
        except BaseException:
            self.stop()
            raise
        return self

    def create_database(self, name: str, driver: str = "") -> str:
        """A new, empty database; its URI (:meth:`uri`)."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name)
        return self.uri(name, driver)

    def stop(self) -> None:
        """The server stopped (fast shutdown: open connections are closed), its folder deleted."""
        if self.folder is None:
            return
        if (self.data / "postmaster.pid").is_file():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                self._kill_postmaster()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def _kill_postmaster(self) -> None:
        import signal

        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGQUIT)  # immediate shutdown of the postmaster and its backends
        except (OSError, ValueError, IndexError):
            pass

    def __enter__(self) -> "PostgresCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
