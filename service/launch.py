"""Launch a sweep: validate the declaration, run it on Ray Tune, record every trial in MLflow, report.

    python service/launch.py [--sweep NAME|PATH] [--smoke] [--dry-run] [--tracking-uri URI]
                             [--storage DIR] [--name RUN_NAME] [--data-root DIR]

Local Ray is started for the sweep unless RAY_ADDRESS names a cluster (``ray job submit`` sets it).
MLflow goes to ``sqlite:///$PWD/mlflow.db`` unless ``--tracking-uri`` or MLFLOW_TRACKING_URI says
otherwise; Tune results and checkpoints go under ``./results`` unless ``--storage`` says otherwise.
Bad input exits with code 2 and a one-line message before anything starts or is written.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, e.g. by `ray job submit`

import argparse  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

from smear.configs import ConfigError  # noqa: E402
from smear.data.domainnet import DataError  # noqa: E402
from service.report import mean_std, resolve_tracking_uri  # noqa: E402  (light: mlflow + matplotlib)
from service.spaces import Sweep, load_sweep, param_space  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own prints the usage too)
        print(f"launch.py: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", default="default", help="a declaration in search_spaces/ (name) or a path to one")
    p.add_argument("--smoke", action="store_true", help="the same sweep with a tiny budget")
    p.add_argument("--dry-run", action="store_true", help="validate, print the trial list, start and write nothing")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///$PWD/mlflow.db)")
    p.add_argument("--storage", default=None, help="where Tune keeps results and checkpoints (default: ./results)")
    p.add_argument("--name", default=None, help="run name of the sweep (default: <sweep>-<time>)")
    p.add_argument("--data-root", default=None, help="dataset root for every trial (overrides the declaration)")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep --name in --storage (its driver died): finished trials are kept, "
                        "unfinished ones continue from their checkpoints, each in its own MLflow run")
    p.add_argument("--cpus-per-trial", type=float, default=None, help="override the declaration's resources.cpu")
    p.add_argument("--gpus-per-trial", type=float, default=None, help="override resources.gpu (e.g. 0.25: 4 trials per GPU)")
    p.add_argument("--max-concurrent-trials", type=int, default=None, help="override max_concurrent_trials")
    p.add_argument("--num-samples", type=int, default=None, help="override num_samples (random / optuna search)")
    p.add_argument("--no-system-metrics", action="store_true", help="do not log CPU / memory / GPU metrics of trials")
    args = p.parse_args(argv)
    for flag, low in (("cpus_per_trial", 0), ("gpus_per_trial", 0), ("max_concurrent_trials", 0), ("num_samples", 1)):
        v = getattr(args, flag)
        if v is not None and v < low:
            p.error(f"--{flag.replace('_', '-')}={v} must be >= {low}")
    if args.resume and not args.name:
        p.error("--resume needs --name, the run name of the sweep to continue")
    return args


def apply_overrides(sweep: Sweep, args: argparse.Namespace) -> None:
    if args.cpus_per_trial is not None:
        sweep.resources["cpu"] = args.cpus_per_trial
    if args.gpus_per_trial is not None:
        sweep.resources["gpu"] = args.gpus_per_trial
    if args.max_concurrent_trials is not None:
        sweep.max_concurrent_trials = args.max_concurrent_trials


def resolve_data(sweep: Sweep, data_root: str | None, *, create: bool) -> None:
    """Apply ``--data-root`` and check every trial's data before anything starts (each setting's
    :meth:`~trainables.settings.Setting.prepare_data`, once per distinct data need).

    A root of "" means the setting's offline stand-in: generated here (unless ``create`` is off, as in
    --dry-run) and again, if missing, on each node that runs a trial.
    """
    from trainables.settings import get_setting

    checked: set[tuple] = set()
    for t in sweep.trials:
        if data_root is not None:
            t.config["data"]["root"] = str(Path(data_root).resolve())
        setting = get_setting(t.config["setting"])
        key = setting.data_key(t.config)
        if key not in checked:
            checked.add(key)
            setting.prepare_data(t.config, create=create)


def check_resources(sweep: Sweep) -> None:
    from trainables.config import make_config
    from trainables.ray_trainable import trial_resources

    for t in sweep.trials:
        trial_resources(make_config(t.config), sweep.resources.get("cpu", 1), sweep.resources.get("gpu", 0))


def print_trials(sweep: Sweep) -> None:
    if sweep.search == "optuna":
        seeds = f" ({sweep.num_samples} points x seeds {sweep.seeds})" if sweep.seeds else ""
        print(f"sweep {sweep.name!r}: optuna (TPE), {sweep.num_trials} trials{seeds} over {sweep.space}"
              f"  ({sweep.description})")
        print(f"  objective: {sweep.metric} (max); scheduler: {sweep.scheduler}")
        return
    print(f"sweep {sweep.name!r}: {len(sweep.trials)} trials ({sweep.search} search, {sweep.scheduler} scheduler)"
          f"  ({sweep.description})")
    for t in sweep.trials:
        over = " ".join(f"{k}={v}" for k, v in t.overrides.items())
        print(f"  [{t.index:3d}] {over}  steps={t.config['steps']} eval_every={t.config['eval_every']}")


def summary_table(rows: list[dict], metric: str = "accuracy") -> str:
    """method x seed -> val and test score, then mean +- std per method (markdown)."""
    lines = [f"| method | seed | val {metric} (best) | test {metric} | status |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["seed"])):
        lines.append(f"| {r['method']} | {r['seed']} | {_fmt(r.get('val'))} | {_fmt(r.get('test'))} | {r['status']} |")
    lines += ["", f"| method | trials | val {metric} mean +- std | test {metric} mean +- std |", "|---|---|---|---|"]
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    test_means = {m: (mean_std([r.get("test") for r in rs]) or (float("-inf"),))[0] for m, rs in by_method.items()}
    order = sorted(by_method, key=lambda m: -test_means[m])
    for m in order:
        rs = by_method[m]
        lines.append(f"| {m} | {len(rs)} | {_ms([r.get('val') for r in rs])} | {_ms([r.get('test') for r in rs])} |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _ms(vs) -> str:
    stats = mean_std(vs)
    return "-" if stats is None else f"{stats[0]:.4f} +- {stats[1]:.4f}"


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   # then open http://127.0.0.1:5000"


def _search_and_scheduler(sweep: Sweep):
    """Tune's search algorithm and trial scheduler for the declaration."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    search_alg = None
    if sweep.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=0)
        if sweep.seeds:
            from service.repeat import SeedRepeater

            search_alg = SeedRepeater(search_alg, sweep.seeds)
        if sweep.max_concurrent_trials:
            search_alg = ConcurrencyLimiter(search_alg, max_concurrent=sweep.max_concurrent_trials)
    if sweep.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", **sweep.asha_params())
    else:
        scheduler = FIFOScheduler()
    return search_alg, scheduler


def _find_parent(client, exp_id: str, name: str):
    runs = client.search_runs([exp_id], filter_string=f"tags.sweep = '{name}' and tags.declaration != ''",
                              max_results=5)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents[0] if parents else None


def run_sweep(args, sweep: Sweep) -> int:
    import ray
    from ray import tune
    from mlflow.tracking import MlflowClient

    from service.tracking import MLflowTracker, get_or_create_experiment, git_commit, trial_run_name
    from trainables.config import make_config
    from trainables.settings import get_setting
    from trainables.ray_trainable import trial, trial_config, trial_resources

    uri = resolve_tracking_uri(args.tracking_uri)
    storage = args.storage or "results"
    if "://" not in storage:  # s3://, gs://, ... go to Tune unchanged (multi-node sweeps need shared storage)
        storage = str(Path(storage).resolve())
    name = args.name or f"{sweep.name}{'-smoke' if args.smoke else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp_path = f"{storage.rstrip('/')}/{name}"
    if args.resume and not tune.Tuner.can_restore(exp_path):
        found = (sorted(p.name for p in Path(storage).glob("*") if (p / "tuner.pkl").exists())
                 if "://" not in storage and Path(storage).is_dir() else [])
        print(f"launch.py: error: no sweep {name!r} to resume under {storage}; found: {', '.join(found) or 'none'}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    commit = git_commit(REPO)

    client = MlflowClient(uri)  # the driver creates the store first: trials never race on its schema
    artifact_root = str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts") if uri.startswith("sqlite:") else None
    exp_id = get_or_create_experiment(client, f"smear-sweep/{sweep.name}", artifact_root)
    first = make_config(sweep.trials[0].config)
    cpus, gpus = sweep.resources.get("cpu", 1), sweep.resources.get("gpu", 0)
    res = trial_resources(first, cpus, gpus)
    trainable = tune.with_resources(tune.with_parameters(
        trial, train_storage=f"{exp_path}/_train", cpus_per_worker=cpus, gpus_per_worker=gpus,
        configs=sweep.configs, tracking=None if args.no_system_metrics else (uri, exp_id)), res)

    if args.resume:
        parent = _find_parent(client, exp_id, name)
        if parent is None:
            print(f"launch.py: error: sweep {name!r} has no parent run in experiment 'smear-sweep/{sweep.name}' "
                  f"of {uri}", file=sys.stderr)
            return EXIT_BAD_INPUT
        pid = parent.info.run_id
        client.update_run(pid, status="RUNNING")
    else:
        parent = client.create_run(exp_id, run_name=name, tags={
            "sweep": name, "declaration": sweep.name, "git_commit": commit, "smoke": str(args.smoke),
            "search": sweep.search, "scheduler": sweep.scheduler, "mlflow.note.content": sweep.description})
        pid = parent.info.run_id
    tracker = MLflowTracker(uri, exp_id, pid, name, {"git_commit": commit}, configs=sweep.configs)
    print(f"sweep {name}: {sweep.num_trials} trials; if interrupted, "
          f"continue with: python service/launch.py --sweep {args.sweep} --name {name} --storage {storage} "
          f"--tracking-uri {uri} --resume", flush=True)
    status, t0 = "FAILED", time.time()
    try:
        if not args.resume:
            client.log_text(pid, sweep.text, "declaration.yaml")
            client.log_dict(pid, [{"index": t.index, **t.overrides} for t in sweep.trials], "trials.json")
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init()
            else:
                start_local_ray()
        if args.resume:
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                       param_space=param_space(sweep))
            # Tune restores the pickled callbacks (with their saved state): that tracker is the one in use
            tracker = next(c for c in tuner._local_tuner.get_run_config().callbacks if isinstance(c, MLflowTracker))
        else:
            search_alg, scheduler = _search_and_scheduler(sweep)

            def run_name(t) -> str:  # Tune's trial name and folder: the MLflow run's name
                return trial_run_name(trial_config(t.config, sweep.configs), t.trial_id)

            tuner = tune.Tuner(
                trainable,
                param_space=param_space(sweep),
                tune_config=tune.TuneConfig(
                    metric=sweep.metric, mode="max", search_alg=search_alg, scheduler=scheduler,
                    # the next trial runs in the finished one's process: no new Python, no re-import of torch
                    # and the project (BENCHMARKS.md, "Sweep overhead")
                    reuse_actors=True,
                    num_samples=sweep.num_trials if sweep.search == "optuna" else 1,
                    trial_name_creator=run_name, trial_dirname_creator=run_name,
                    max_concurrent_trials=None if search_alg is not None else (sweep.max_concurrent_trials or None)),
                run_config=tune.RunConfig(
                    name=name, storage_path=storage, callbacks=[tracker], verbose=1,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    failure_config=tune.FailureConfig(max_failures=sweep.max_failures)),
            )
        grid = tuner.fit()
        tracker.flush()  # normally a no-op: Tune's on_experiment_end has flushed it
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            tracker.close_unfinished("KILLED" if status == "KILLED" else "FAILED")
            client.set_terminated(pid, status)
    wall = time.time() - t0
    rows = []
    metric = get_setting(first.setting).primary_metric
    for r in grid:
        cfg = trial_config(r.config, sweep.configs)
        m = r.metrics or {}
        rows.append({"method": cfg["routing"]["method"], "seed": cfg["seed"], "val": m.get(f"val/best_{metric}"),
                     "test": m.get(f"test/{metric}"), "status": "ERROR" if r.error else "OK"})
    table = summary_table(rows, metric)
    client.log_text(pid, f"# {name}\n\n{sweep.description}\n\nwall time {wall:.0f} s\n\n{table}\n", "summary.md")
    client.log_metric(pid, "sweep/wall_s", wall)
    client.log_metric(pid, "sweep/tracking_s", tracker.seconds)  # logging thread's time in MLflow calls
    n_err = sum(r["status"] != "OK" for r in rows)
    client.set_terminated(pid, "FINISHED" if n_err == 0 else "FAILED")
    print(f"\nsweep {name}: {len(rows)} trials, {n_err} failed, wall {wall:.0f} s\n")
    print(table)
    try:  # the paper-style report: summary.md + plots under <storage>/<sweep>/report, logged to the parent run
        from service.report import write_report

        print(f"\nReport: {write_report(uri, name, storage, experiment=f'smear-sweep/{sweep.name}')}")
    except Exception as e:  # a report failure never fails the sweep
        print(f"\nReport not written ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              f"retry with: python service/report.py {name} --tracking-uri {uri} --storage {storage}")
    print(f"\nMLflow: experiment 'smear-sweep/{sweep.name}', parent run '{name}' in {uri}")
    print(f"Browse: {ui_command(uri)}")
    return 0 if n_err == 0 else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def start_local_ray(**init_kwargs) -> None:
    """Start a fresh local Ray instance for this sweep, never a stale one found in /tmp/ray.

    Ray's state API (which Ray Train V2 calls from its detached PlacementGroupCleaner) finds "the" cluster
    through /tmp/ray/ray_current_cluster, which every ``ray start`` writes and ``ray stop`` leaves behind.
    With a stale file there, each data-parallel trial waited 12 s for that actor to stop, and the next one's
    workers never started (measured: BENCHMARKS.md, "Ray Train start-up"). So the dashboard (the state
    API's server) gets a known free port, and every process of the instance is told it through
    RAY_API_SERVER_ADDRESS, which the raylet and its workers inherit from this process.
    """
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=False, **init_kwargs)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # `ray job stop`, kill: end MLflow runs as KILLED, like Ctrl-C
    args = parse_args(argv)
    try:
        sweep = load_sweep(args.sweep, smoke=args.smoke, num_samples=args.num_samples)
        apply_overrides(sweep, args)
        resolve_data(sweep, args.data_root, create=not args.dry_run)
        check_resources(sweep)
    except (ConfigError, DataError) as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.dry_run:
        print_trials(sweep)
        return 0
    return run_sweep(args, sweep)


if __name__ == "__main__":
    raise SystemExit(main())
