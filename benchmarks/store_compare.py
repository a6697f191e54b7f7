"""The MLflow tracking store, sqlite vs PostgreSQL: logging a sweep's volume, reading it back, concurrent writers.

    python -m benchmarks.store_compare [--runs 200] [--metrics 540] [--steps 5] [--writers 1,4,16]
                                       [--writer-runs 5] [--stores sqlite,postgresql,...] [--json PATH]

Stores: a sqlite file (``sqlite:///``, MLflow's defaults: rollback journal, fsync on) and a PostgreSQL 15
cluster of its own (tests/helpers/postgres.py, PostgreSQL's defaults: fsync and synchronous commit on), both
opened in this process through MlflowClient (the SQLAlchemy store: what a driver with ``--tracking-uri
sqlite:///...`` or ``postgresql://...`` does); ``sqlite-server`` and ``postgresql-server`` are the same stores
behind ``mlflow server`` (1 worker; the client logs over HTTP, as a cluster's driver and trials do).

  log     -- ``--runs`` runs in one experiment, each as the sweep's tracker writes a trial: create_run, 30
             params, ``--steps`` reports of ``--metrics`` metrics (one log_batch each), set_terminated.
             T5-GLUE's volume is 540 metrics per report (8 tasks' scores, per-layer routing statistics).
  search  -- read them back: search_runs of every run (latest metrics, params, tags: what the report reads),
             then a filtered and ordered search, then one metric's history of every run.
  writers -- K processes at once, each logging ``--writer-runs`` such runs to one shared store (K trial
             processes or sweeps on one tracking store); wall time, and the calls that failed (sqlite:
             "database is locked" after pysqlite's 5 s busy timeout).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path

EXPERIMENT = "store-compare"


def _metric_names(m: int) -> list[str]:
    return [f"val/task{i // 60}/layer{i % 60 // 6}/m{i % 6}" for i in range(m)]


def log_runs(uri: str, experiment_id: str, runs: int, metrics: int, steps: int, tag: str = "") -> dict:
    """``runs`` runs logged as the tracker logs trials; the calls' failures counted, never raised."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client, names, failures, first = MlflowClient(uri), _metric_names(metrics), 0, None
    t0 = time.perf_counter()
    for r in range(runs):
        try:
            run_id = client.create_run(experiment_id, run_name=f"{tag}run-{r}", tags={"trial_id": f"{tag}{r}"}).info.run_id
            client.log_batch(run_id, params=[Param(f"p{i}", str(i)) for i in range(30)])
        except Exception as e:  # noqa: BLE001 - counted: what a writer sees
            failures, first = failures + 1, first or f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            continue
        for step in range(steps):
            now = int(time.time() * 1000)
            batch = [Metric(k, (r * 7 + i + step) % 100 / 100, now, step) for i, k in enumerate(names)]
            for i in range(0, len(batch), 1000):  # the tracker's chunk (MLflow's log_batch limit)
                try:
                    client.log_batch(run_id, metrics=batch[i:i + 1000])
                except Exception as e:  # noqa: BLE001
                    failures, first = failures + 1, first or f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        try:
            client.set_terminated(run_id, "FINISHED")
        except Exception as e:  # noqa: BLE001
            failures, first = failures + 1, first or f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return {"s": time.perf_counter() - t0, "failures": failures, "first_failure": first}


def search_back(uri: str, experiment_id: str, runs: int) -> dict:
    from mlflow.tracking import MlflowClient

    client, key = MlflowClient(uri), _metric_names(1)[0]
    t0 = time.perf_counter()
    found, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        found += page
        token = page.token
        if not token:
            break
    t1 = time.perf_counter()
    top = client.search_runs([experiment_id], filter_string=f"metrics.`{key}` > 0.5 and attributes.status = 'FINISHED'",
                             order_by=[f"metrics.`{key}` DESC"], max_results=50)
    t2 = time.perf_counter()
    histories = sum(len(client.get_metric_history(r.info.run_id, key)) for r in found)
    t3 = time.perf_counter()
    assert len(found) == runs and top, (len(found), runs)
    return {"search_all_s": t1 - t0, "search_filtered_s": t2 - t1, "history_s": t3 - t2, "history_points": histories}


def _writer(job: tuple) -> dict:
    return log_runs(*job)


def writers(uri: str, experiment_id: str, k: int, runs: int, metrics: int, steps: int) -> dict:
    """``k`` processes at once on one store."""
    ctx = multiprocessing.get_context("spawn")
    jobs = [(uri, experiment_id, runs, metrics, steps, f"w{k}-{j}-") for j in range(k)]
    t0 = time.perf_counter()
    with ctx.Pool(k) as pool:
        out = pool.map(_writer, jobs)
    wall = time.perf_counter() - t0
    calls = k * runs * (2 + steps * -(-metrics // 1000) + 1)
    return {"k": k, "wall_s": wall, "writer_s_max": max(o["s"] for o in out), "runs": k * runs, "calls": calls,
            "failures": sum(o["failures"] for o in out),
            "first_failure": next((o["first_failure"] for o in out if o["first_failure"]), None)}


def experiment(uri: str, name: str) -> str:
    """A new experiment (the store's schema created first, in this process, before any writer)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).create_experiment(name)


def measure(label: str, uri: str, a) -> dict:
    print(f"{label}: logging {a.runs} runs x {a.metrics} metrics x {a.steps} steps ...", flush=True)
    exp = experiment(uri, EXPERIMENT)
    out = {"store": label, "load_before": os.getloadavg()[0], "log": log_runs(uri, exp, a.runs, a.metrics, a.steps)}
    out["search"] = search_back(uri, exp, a.runs)
    out["writers"] = []
    for k in a.writers:
        out["writers"].append(writers(uri, experiment(uri, f"writers-{k}"), k, a.writer_runs, a.metrics, a.steps))
        print(f"{label}: {k} writers: {out['writers'][-1]}", flush=True)
    out["load_after"] = os.getloadavg()[0]  # a shared machine: the 1-minute load average, around the store's figures
    print(f"{label}: {out['log']} {out['search']}", flush=True)
    return out


STORES = ("sqlite", "postgresql", "sqlite-server", "postgresql-server")


def stores(names: list[str], folder: Path, pg) -> list[tuple[str, str]]:
    """(name, backend URI) of each store to measure (a ``-server`` one is served by ``mlflow server``)."""
    out = []
    for name in names:
        if name not in STORES:
            raise SystemExit(f"--stores: unknown store {name!r}; valid: {', '.join(STORES)}")
        db = name.replace("-", "_")
        out.append((name, f"sqlite:///{folder / db}.db" if name.startswith("sqlite") else pg.create_database(db)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--metrics", type=int, default=540)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--writers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--writer-runs", type=int, default=5, help="runs each concurrent writer logs")
    ap.add_argument("--stores", type=lambda v: v.split(","), default=list(STORES),
                    help=f"comma-separated, of {', '.join(STORES)} (default: all)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from tests.helpers import MlflowServer
    from tests.helpers.postgres import PostgresCluster

    results = {"machine": f"{platform.node()} {os.cpu_count()} cpus", "args": vars(a), "stores": []}
    with tempfile.TemporaryDirectory() as d, PostgresCluster(durable=True) as pg:
        for label, uri in stores(a.stores, Path(d), pg):
            server = None
            if label.endswith("-server"):
                server = MlflowServer(Path(d) / label / "unused.db", dict(os.environ), store=uri)
                server.db.parent.mkdir()
                uri = server.start().url
            try:
                results["stores"].append(measure(label, uri, a))
            finally:
                if server is not None:
                    server.kill()
    print(json.dumps(results, indent=2))
    rows = a.runs * a.metrics * a.steps
    print(f"\n| store | log {a.runs} runs ({rows:,} metric rows) s | rows/s | search all s | filtered s | "
          f"history x{a.runs} s |")
    print("|---|---:|---:|---:|---:|---:|")
    for s in results["stores"]:
        lg, se = s["log"], s["search"]
        print(f"| {s['store']} | {lg['s']:.1f} | {rows / lg['s']:,.0f} | {se['search_all_s']:.2f} | "
              f"{se['search_filtered_s']:.2f} | {se['history_s']:.2f} |")
    print("\n| store | writers | runs | slowest writer s | failed calls | first failure |\n|---|---:|---:|---:|---:|---|")
    for s in results["stores"]:
        for w in s["writers"]:
            print(f"| {s['store']} | {w['k']} | {w['runs']} | {w['writer_s_max']:.1f} | {w['failures']}/{w['calls']} | "
                  f"{w['first_failure'] or ''} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
