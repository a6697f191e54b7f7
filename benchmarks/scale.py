"""Scale: the service's overhead against bare Ray Tune, side by side in one process, on trivial trials.

    python -m benchmarks.scale --trials 100 [--cpus 64] [--evals 2] [--sleep 0.5] [--volume resnet|t5]
                               [--concurrent N] [--modes bare,service] [--profile PATH] [--json PATH]

Each trial sleeps instead of computing and reports the metric dicts a real trial of the setting reports, with the
same keys and volume (:func:`plan_for`): ``--evals`` evaluation reports, then the final (test) report with its
routing heatmap. Both modes share one local Ray (``ray.init(num_cpus=--cpus)``, logical CPUs: each trial asks for
one, so up to ``--cpus`` run at once), one trainable and the same trials (a declaration resolved by
``service.spaces.load_sweep``: methods x seeds, any valid config):

- ``bare``: ``tune.Tuner`` with that trainable, no callbacks, local storage, the service's concurrency and
  ``reuse_actors=True`` (a Tune setting the service also uses: without it bare Tune starts a process per trial);
- ``service``: the service's machinery as launch.py drives it (``run_sweep``): the parent run
  (``service.record.ParentRun``), the Tuner of ``service.runner.build_tuner`` (its callbacks: ``MLflowTracker``
  through the journal and its replica to a sqlite MLflow store, ``SweepProgress``, ``StateBackup``,
  ``StorageGuard``; its TuneConfig and RunConfig) given this trainable, the record flushed, the parent run
  ended and the report published (``service.report.end_of_sweep``). System metrics are off (``tracking=None``,
  ``--no-system-metrics``): they are the trial processes' cost, not the driver's.

Figures per mode: wall time (Tuner.fit, then the service's record flush and report), the driver's peak RSS
(sampled every 0.1 s), Tune's experiment-state snapshots (``TuneController.save_to_dir``, timed here), the time a
trial's ``tune.report`` blocks; for the service also the tracker lag (report's arrival at the driver -> its values
in MLflow: ``Replica.lags``), the replica's time per kind of write, the store's size and rows written per second.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

METHODS = ("smear", "tag", "adapter", "hash")  # the trials: METHODS x seeds (the report compares methods)
BASES = {  # a valid config of each setting; a simulated trial never reads it
    "resnet": {"setting": "resnet_domainnet", "steps": 300, "eval_every": 50, "batch_size": 64, "torch_threads": 1,
               "data.resolution": 32, "data.augment": "none"},
    "t5": {"setting": "t5_glue", "steps": 600, "eval_every": 200, "batch_size": 16, "warmup_steps": 2,
           "torch_threads": 1, "t5.model": "tiny", "t5.tokenizer": "byt5", "data.root": "", "use_gpu": False},
}


@dataclass(frozen=True)
class Plan:
    """What a simulated trial reports: ``evals`` evaluations of ``eval_keys`` (the first also ``first_keys``),
    then the final report of ``final_keys`` and the heatmap (``groups`` x experts per block), ``sleep_s`` before
    each report."""
    evals: int
    sleep_s: float
    eval_keys: tuple[str, ...]
    first_keys: tuple[str, ...]
    final_keys: tuple[str, ...]
    groups: tuple[str, ...]
    blocks: tuple[str, ...]
    experts: int

    def eval_report(self, i: int, step: int) -> dict:
        out = {k: 0.5 + 0.001 * ((i + j) % 97) for j, k in enumerate(self.eval_keys)}
        if i == 0:
            out.update({k: 1.0 for k in self.first_keys})
        out.update({"step": step, "epoch": i})
        return out

    def final_report(self, step: int) -> dict:
        out = {k: 0.6 for k in self.final_keys}
        heat = {b: [[1.0 / self.experts] * self.experts for _ in self.groups] for b in self.blocks}
        out.update({"step": step, "done": 1.0, "routing_heatmap": {"groups": list(self.groups), "blocks": heat}})
        return out


def plan_for(volume: str, evals: int, sleep_s: float) -> Plan:
    """The metric names of a real trial of the setting, built from the names the code writes: the setting's groups
    and metrics (val/test ``<group>/<metric>``, its primary metric and running best), the routing statistics of
    each routed block (``routing/<label>/entropy``, ``load_<e>``: trainables/evaluation.py) with the paper's
    block labels (smear/backbones: T5 v1.1-base's 12 + 12 layers, ResNet-18's 8 BasicBlocks) and expert count,
    the loop's train / compute keys (trainables/names.py)."""
    from smear.configs import to_dict, unflatten
    from trainables import names
    from trainables.settings import get_setting, make_config

    base = dict(BASES[volume])
    setting = get_setting(base["setting"])
    cfg = to_dict(make_config(unflatten(base)))
    groups = setting.groups_of(cfg)
    if volume == "t5":
        from smear.backbones.t5 import T5_V1_1
        from smear.metrics import TASK_METRICS

        n = T5_V1_1["google/t5-v1_1-base"]["num_layers"]
        blocks = [f"encoder.{i}.{j}.{a}" for i in range(n) for j, a in enumerate(("SelfAttention", "DenseReluDense"))]
        blocks += [f"decoder.{i}.{j}.{a}" for i in range(n)
                   for j, a in enumerate(("SelfAttention", "EncDecAttention", "DenseReluDense"))]
        per_group = {g: [*TASK_METRICS[g], "score"] for g in groups}
        experts = setting.defaults["routing"]["num_experts"]
    else:
        blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
        per_group = {g: [setting.group_metric] for g in groups}
        experts = cfg["routing"]["num_experts"]
    primary = setting.primary_metric

    def scores(prefix: str) -> list[str]:
        return [f"{prefix}/{g}/{m}" for g, ms in per_group.items() for m in ms] + [f"{prefix}/{primary}"]

    routing = [f"routing/{b}/{s}" for b in blocks for s in ("entropy", *(f"load_{e}" for e in range(experts)))]
    eval_keys = (*scores("val"), *routing, names.best(primary), names.TRAIN_LOSS, names.TRAIN_LR, names.SECONDS_PER_STEP)
    return Plan(evals, sleep_s, eval_keys, (*names.METRIC_NAMES, names.SYSTEM_BF16),
                (*scores("test"), names.best(primary), names.TRAIN_HOURS), tuple(groups), tuple(blocks), experts)


def simulated(plan: Plan):
    """The trivial trainable: ``trial``'s signature (service/runner.py binds its keywords), sleeps and reports."""

    def trial(config, trials=None, train_storage=None, tracking=None, experiment_path=None, finished=None):
        from ray import tune

        blocked = []
        for i in range(plan.evals):
            time.sleep(plan.sleep_s)
            t0 = time.perf_counter()
            tune.report(plan.eval_report(i, 10 * (i + 1)))
            blocked.append(time.perf_counter() - t0)
        time.sleep(plan.sleep_s)
        # Tune ends the trial at this report: what the earlier ones blocked rides with it (no "/": not logged)
        tune.report({**plan.final_report(10 * plan.evals), "sim_blocked_max_s": max(blocked, default=0.0),
                     "sim_blocked_sum_s": sum(blocked)})

    return trial


def declaration(volume: str, trials: int, concurrent: int | None) -> str:
    import yaml

    seeds = math.ceil(trials / len(METHODS))
    return yaml.safe_dump({"description": "scale benchmark (simulated trials)", "base": BASES[volume],
                           "grid": {"routing.method": list(METHODS), "seed": list(range(seeds))},
                           "resources": {"cpu": 1}, "max_concurrent_trials": concurrent, "max_failures": 0})


class Peak:
    """The driver's peak RSS while a mode runs (psutil, sampled every 0.1 s)."""

    def __init__(self):
        import psutil

        self._proc, self._stop, self.peak = psutil.Process(), threading.Event(), 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def timed_snapshots(out: list):
    """Tune's own experiment-state snapshots (``TuneController.save_to_dir``): each one's seconds into ``out``."""
    from ray.tune.execution.tune_controller import TuneController

    original = TuneController.save_to_dir

    def save_to_dir(self):
        t0 = time.perf_counter()
        try:
            return original(self)
        finally:
            out.append(time.perf_counter() - t0)

    TuneController.save_to_dir = save_to_dir
    try:
        yield out
    finally:
        TuneController.save_to_dir = original


@contextlib.contextmanager
def timed_writes(replica, out: dict):
    """The replica's time per kind of write (op -> [count, seconds]), by wrapping this replica's ``apply``."""
    original = replica.apply

    def apply(entry):
        t0 = time.perf_counter()
        try:
            return original(entry)
        finally:
            c = out.setdefault(entry.op, [0, 0.0])
            c[0] += 1
            c[1] += time.perf_counter() - t0

    replica.apply = apply
    try:
        yield out
    finally:
        del replica.apply


def _pct(xs, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))] if xs else float("nan")


def _trial_figures(grid) -> dict:
    results = [r.metrics or {} for r in grid]
    blocked = [m["sim_blocked_max_s"] for m in results if "sim_blocked_max_s" in m]
    return {"trials": len(grid), "errors": sum(1 for r in grid if r.error), "completed": len(blocked),
            "report_block_max_p50_s": _pct(blocked, 0.5), "report_block_max_p99_s": _pct(blocked, 0.99)}


def _snapshot_figures(snaps: list) -> dict:
    return {"snapshots": len(snaps), "snapshot_total_s": sum(snaps), "snapshot_max_s": max(snaps, default=0.0),
            "snapshot_mean_s": sum(snaps) / len(snaps) if snaps else float("nan")}


def run_bare(sweep, root: Path, plan: Plan) -> dict:
    from ray import tune

    from service.spaces import param_space

    snaps: list[float] = []
    trainable = tune.with_resources(tune.with_parameters(simulated(plan), trials=sweep.identity()), {"cpu": 1})
    tuner = tune.Tuner(trainable, param_space=param_space(sweep),
                       tune_config=tune.TuneConfig(reuse_actors=True, num_samples=1,
                                                   max_concurrent_trials=sweep.max_concurrent_trials or None),
                       run_config=tune.RunConfig(name="bare", storage_path=str(root / "results"), verbose=0))
    with Peak() as peak, timed_snapshots(snaps):
        t0 = time.perf_counter()
        grid = tuner.fit()
        fit = time.perf_counter() - t0
    return {"fit_s": fit, "wall_s": fit, "peak_rss_mb": peak.peak / 2**20, **_trial_figures(grid),
            **_snapshot_figures(snaps)}


def run_service(sweep, root: Path, plan: Plan, profile: str | None = None) -> dict:
    """launch.py's run_sweep, step by step, with this benchmark's trainable (and no console: its lines go to a file)."""
    from service.journal import journal_path
    from service.progress import close_displays
    from service.record import ParentRun, experiment_name
    from service.replica import fail_fast_http
    from service.report import end_of_sweep
    from service.runner import build_tuner
    from service.tracking import MLflowTracker

    uri, storage, name = f"sqlite:///{root}/mlflow.db", str(root / "results"), "service"
    snaps: list[float] = []
    writes: dict = {}
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
    with Peak() as peak, timed_snapshots(snaps), open(root / "console.txt", "w") as console, \
            contextlib.redirect_stdout(console):
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        parent = ParentRun.open(uri, sweep, name, storage=storage, resume=False, tags={"smoke": "False"})
        tracker = MLflowTracker(journal_path(storage, name), uri, parent.experiment_id, parent.run_id, name, {},
                                trials=sweep.identity())
        fail_fast_http()
        with timed_writes(tracker.replica, writes):
            tuner = build_tuner(sweep, name=name, storage=storage, tracker=tracker, tracking=None, resume=False,
                                trainable=simulated(plan))
            t_fit = time.perf_counter()
            try:
                grid = tuner.fit()
            finally:
                close_displays()
            fit = time.perf_counter() - t_fit
            backlog = tracker.replica._queue.unfinished_tasks  # writes not yet in MLflow when Tune ended
            tracker.flush()
            t_flushed = time.perf_counter()
            parent.finish("FINISHED", metrics={"sweep/wall_s": fit, "sweep/tracking_s": tracker.seconds})
            report: dict = {}

            def publisher(data: dict) -> bool:
                r0 = time.perf_counter()
                ok, line = end_of_sweep(uri, name, storage, data["experiment"], data.get("extension"))
                report.update(ok=ok, line=line.strip(), seconds=time.perf_counter() - r0)
                return ok

            complete = parent.publish(publisher, experiment=experiment_name(sweep))
        wall = time.perf_counter() - t0
        if prof:
            prof.disable()
            prof.dump_stats(profile)
    lags = list(tracker.replica.lags)
    db = root / "mlflow.db"
    store = db.stat().st_size + sum(f.stat().st_size for f in (root / "mlartifacts").rglob("*") if f.is_file())
    with sqlite3.connect(db) as c:
        rows = {t: c.execute(f"select count(*) from {t}").fetchone()[0]
                for t in ("runs", "metrics", "latest_metrics", "params", "tags")}
    record_s = t_flushed - t_fit  # from the sweep's start to the last trial write in MLflow
    return {"fit_s": fit, "flush_s": t_flushed - t_fit - fit, "record_s": record_s, "wall_s": wall,
            "setup_s": t_fit - t0, "report_s": report.get("seconds", float("nan")), "report_ok": report.get("ok"),
            "record_complete": complete, "backlog_at_end": backlog, "peak_rss_mb": peak.peak / 2**20,
            "lag_p50_s": _pct(lags, 0.5), "lag_p99_s": _pct(lags, 0.99), "lag_max_s": max(lags, default=math.nan),
            "lag_samples": len(lags), "tracking_s": tracker.seconds, "writes": writes,
            "store_mb": store / 2**20, "rows": rows, "rows_per_s": sum(rows.values()) / record_s,
            "refused": list(tracker.replica.refused[:3]), **_trial_figures(grid), **_snapshot_figures(snaps)}


def check_record(root: Path, plan: Plan, trials: int) -> dict:
    """The service's record: one child run per trial, each evaluation step logged once, every run FINISHED."""
    with sqlite3.connect(root / "mlflow.db") as c:
        parent = c.execute("select run_uuid from tags where key='sweep' and run_uuid not in "
                           "(select run_uuid from tags where key='mlflow.parentRunId')").fetchone()[0]
        runs = [r for (r,) in c.execute("select run_uuid from tags where key='mlflow.parentRunId' and value=?",
                                        (parent,))]
        status = dict(c.execute("select status, count(*) from runs where run_uuid in (%s) group by status"
                                % ",".join("?" * len(runs)), runs).fetchall())
        key = plan.eval_keys[0]
        steps = c.execute("select run_uuid, step, count(*) from metrics where key=? group by run_uuid, step",
                          (key,)).fetchall()
    per_run: dict[str, list[int]] = {}
    for run, step, n in steps:
        per_run.setdefault(run, []).extend([step] * n)
    want = [10 * (i + 1) for i in range(plan.evals)]
    return {"child_runs": len(runs), "finished_runs": status.get("FINISHED", 0),
            "runs_with_every_step_once": sum(1 for r in runs if sorted(per_run.get(r, [])) == want),
            "expected": trials}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100, help="rounded up to a multiple of %d (methods)" % len(METHODS))
    ap.add_argument("--cpus", type=int, default=64, help="Ray's logical CPUs (one per trial)")
    ap.add_argument("--concurrent", type=int, default=None, help="max_concurrent_trials (default: as many as fit)")
    ap.add_argument("--evals", type=int, default=2, help="evaluation reports per trial, then the final one")
    ap.add_argument("--sleep", type=float, default=0.5, help="seconds before each report")
    ap.add_argument("--volume", choices=sorted(BASES), default="resnet", help="whose metric dicts the trials report")
    ap.add_argument("--modes", default="bare,service")
    ap.add_argument("--dir", default=None, help="where the stores go (default: a temporary folder, removed)")
    ap.add_argument("--profile", default=None, help="cProfile of the driver's service run (main thread) to PATH")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import ray

    from service.spaces import load_sweep

    plan = plan_for(a.volume, a.evals, a.sleep)
    out: dict = {"machine": f"{platform.node()} {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}",
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(a),
                 "keys_per_eval": len(plan.eval_keys) + 2, "keys_final": len(plan.final_keys) + 2}
    with tempfile.TemporaryDirectory() if a.dir is None else contextlib.nullcontext(a.dir) as d:
        decl = Path(d, "scale.yaml")
        decl.parent.mkdir(parents=True, exist_ok=True)
        decl.write_text(declaration(a.volume, a.trials, a.concurrent))
        t0 = time.perf_counter()
        sweep = load_sweep(str(decl))
        out["load_sweep_s"], out["trials"] = time.perf_counter() - t0, sweep.num_trials
        ray.init(address="local", num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
        try:
            for mode in a.modes.split(","):
                root = Path(d, mode)
                root.mkdir()
                out[mode] = run_bare(sweep, root, plan) if mode == "bare" else run_service(sweep, root, plan, a.profile)
                if mode == "service":
                    out[mode]["check"] = check_record(root, plan, sweep.num_trials)
                print(f"{mode}: {json.dumps(out[mode])}", flush=True)
        finally:
            ray.shutdown()
    if "bare" in out and "service" in out:
        out["ratio_fit"] = out["service"]["fit_s"] / out["bare"]["fit_s"]
        out["ratio_record"] = out["service"]["record_s"] / out["bare"]["fit_s"]
        out["ratio_wall"] = out["service"]["wall_s"] / out["bare"]["fit_s"]
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
