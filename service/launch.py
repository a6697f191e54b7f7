"""Launch a sweep: validate the declaration, run it on Ray Tune, record every trial in MLflow, report.

    python service/launch.py [--sweep NAME|PATH] [--smoke] [--dry-run] [--tracking-uri URI]
                             [--storage DIR] [--name RUN_NAME] [--data-root DIR]
    python service/launch.py --sweep NAME --extend --name RUN_NAME --seeds 3,4   # more seeds, same sweep

Local Ray is started for the sweep unless RAY_ADDRESS names a cluster (``ray job submit`` sets it).
MLflow goes to ``sqlite:///$PWD/mlflow.db`` unless ``--tracking-uri`` or MLFLOW_TRACKING_URI says
otherwise; Tune results and checkpoints go under ``./results`` unless ``--storage`` says otherwise.
Bad input exits with code 2 and a one-line message before anything starts or is written. The console is one
progress display (service/progress.py); ``--verbose`` adds Ray Tune's own tables. ``smear-sweep run``,
``resume``, ``extend``, ``estimate`` and ``data check`` are this command with some flags set (service/cli.py).

It imports the installed package: the venv's editable install (``pip install -e .``), or under ``ray job
submit --working-dir .`` the uploaded copy, which Ray puts first on the job's PYTHONPATH.
"""
from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from pathlib import Path

from smear.configs import ConfigError
from smear.data.domainnet import DataError
from service import estimate  # (light: torch only when it calibrates)
from service.preflight import check_environment
from service.spaces import Sweep, load_sweep
from service.uris import resolve_tracking_uri

REPO = Path(__file__).resolve().parent.parent
EXIT_BAD_INPUT = 2


DEFAULT_STORAGE = "results"  # --storage when not given: Tune's results and checkpoints under ./results
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")
STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "file")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own prints the usage too)
        print(f"launch.py: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


EXAMPLES = """examples:
  python service/launch.py                                   # the default sweep (smear-sweep run)
  python service/launch.py --sweep t5-glue-smoke --smoke     # a shipped declaration, tiny budget
  python service/launch.py --sweep default --dry-run         # validate, print the trials, start nothing
  python service/launch.py --resume --name RUN               # continue a sweep whose driver died
  python service/launch.py --extend --name RUN --seeds 3,4   # more seeds for a finished sweep
  python service/launch.py --dry-run --estimate --sweep resnet-domainnet   # projected device-hours
"""


def parse_args(argv: list[str] | None = None, *, usage: str | None = None, epilog: str | None = None) -> argparse.Namespace:
    """launch.py's flags, checked: the one definition of each (``smear-sweep`` passes its own ``usage`` and
    ``epilog`` for its subcommands' --help, service/cli.py). A bad value or combination: one line, exit 2."""
    p = _Parser(description=__doc__.splitlines()[0], usage=usage, epilog=EXAMPLES if epilog is None else epilog,
                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--check-images", action="store_true",
                   help="decode every image of the data before the sweep (parallel; default: headers only)")
    p.add_argument("--verbose", action="store_true",
                   help="also print Ray Tune's trial tables and each trial's results (default: one progress display)")
    estimate.add_arguments(p)  # --estimate, --price-per-gpu-hour, --calibration-steps, --calibration-batch
    _extend_arguments(p)
    args = p.parse_args(argv)
    estimate.check_arguments(p, args)
    _check_extend(p, args)
    for flag, low in (("cpus_per_trial", 0), ("gpus_per_trial", 0), ("max_concurrent_trials", 1), ("num_samples", 1)):
        v = getattr(args, flag)
        if v is not None and v < low:
            p.error(f"--{flag.replace('_', '-')}={v} must be >= {low}")
    if args.resume and not args.name:
        p.error("--resume needs --name, the run name of the sweep to continue")
    if args.resume and args.max_concurrent_trials is not None:  # Tune restores the saved sweep's TuneConfig
        p.error(f"--max-concurrent-trials={args.max_concurrent_trials} cannot be combined with --resume: the resumed "
                "sweep keeps the limit it started with; valid: --resume without it")
    if args.resume and args.verbose:  # Tune restores the saved sweep's RunConfig, its console included
        p.error("--verbose cannot be combined with --resume: the resumed sweep keeps the console it started with; "
                "valid: --resume without it")
    if args.resume and args.dry_run:
        p.error("--dry-run and --resume cannot be combined: a dry run starts nothing, so there is nothing to resume")
    if args.name is not None and (not SAFE_NAME.fullmatch(args.name) or args.name in (".", "..")):
        p.error(f"--name={args.name!r} is not a safe run name; valid: one path component of letters, digits, "
                "'.', '_', '-' (it names the folder under --storage)")
    for flag, schemes in (("tracking_uri", TRACKING_SCHEMES), ("storage", STORAGE_SCHEMES)):
        v = getattr(args, flag)
        if v is not None and not v.strip():
            p.error(f"--{flag.replace('_', '-')}={v!r} is empty; valid: a path or a URI")
        scheme = v.split("://", 1)[0] if v is not None and "://" in v else None
        if scheme is not None and scheme not in schemes:
            p.error(f"--{flag.replace('_', '-')}={v!r} has an unknown scheme {scheme!r}; valid: {', '.join(schemes)}")
    return args


# issue 14: --extend (service/extend.py)
def _extend_arguments(p: argparse.ArgumentParser) -> None:
    from service.extend import parse_seeds

    def seeds(text: str) -> list[int]:
        try:
            return parse_seeds(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    p.add_argument("--extend", action="store_true",
                   help="add the declaration's grid at --seeds to the finished sweep --name: same MLflow parent "
                        "run, its trials kept and never re-run, the report over every seed")
    p.add_argument("--seeds", type=seeds, default=None, help="with --extend: the new seeds, e.g. 3,4")


def _check_extend(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.seeds is not None and not args.extend:
        p.error("--seeds needs --extend (a new sweep takes its seeds from the declaration's grid)")
    if not args.extend:
        return
    for bad, why in (("resume", "an interrupted extension continues with the same --extend command"),
                     ("dry_run", "a dry run starts nothing")):
        if getattr(args, bad):
            p.error(f"--extend and --{bad.replace('_', '-')} cannot be combined: {why}")
    if not args.name:
        p.error("--extend needs --name, the run name of the finished sweep to extend")
    if args.seeds is None:
        p.error("--extend needs --seeds, the new seeds (e.g. --seeds 3,4)")


def plan_extension(args: argparse.Namespace, sweep: Sweep):
    """--extend: the checked Extension (service/extend.py), or a ConfigError before anything starts."""
    from service.extend import plan

    return plan(resolve_tracking_uri(args.tracking_uri), resolve_storage(args.storage), args.name, sweep,
                args.smoke, args.seeds)


def resolve_storage(arg: str | None) -> str:
    """``--storage`` (default ./results) as an absolute path; s3://, gs://, ... go to Tune unchanged
    (multi-node sweeps need shared storage)."""
    storage = arg or DEFAULT_STORAGE
    return storage if "://" in storage else str(Path(storage).resolve())


def apply_overrides(sweep: Sweep, args: argparse.Namespace) -> None:
    for key, value in (("cpu", args.cpus_per_trial), ("gpu", args.gpus_per_trial)):
        if value is not None:
            for res in sweep.resources.values():  # every setting's trials
                res[key] = value
    if args.max_concurrent_trials is not None:
        sweep.max_concurrent_trials = args.max_concurrent_trials


def resolve_data(sweep: Sweep, data_root: str | None, *, create: bool, images: str = "header") -> None:
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
            setting.prepare_data(t.config, create=create, images=images)


def check_resources(sweep: Sweep) -> None:
    """Every trial's resource request, as Tune will ask for it (a bad combination is a one-line ConfigError)."""
    trials = sweep.identity()
    for t in sweep.trials:
        trials.resources_of(t.config)


def print_trials(sweep: Sweep) -> None:
    if sweep.search == "optuna":
        seeds = f" ({sweep.num_samples} points x seeds {sweep.seeds})" if sweep.seeds else ""
        print(f"sweep {sweep.name!r}: optuna (TPE), {sweep.num_trials} trials{seeds} over "
              f"{ {k: {d.kind: d.arg} for k, d in sweep.space.items()} }"
              f"  ({sweep.description})")
        print(f"  objective: {sweep.metric} (max); scheduler: {sweep.scheduler}")
        return
    print(f"sweep {sweep.name!r}: {len(sweep.trials)} trials ({sweep.search} search, {sweep.scheduler} scheduler)"
          f"  ({sweep.description})")
    for t in sweep.trials:
        over = " ".join(f"{k}={v}" for k, v in t.overrides.items())
        print(f"  [{t.index:3d}] {over}  steps={t.config['steps']} eval_every={t.config['eval_every']}")


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   # then open http://127.0.0.1:5000"


def run_sweep(args, sweep: Sweep, ext=None) -> int:
    """Run a validated sweep: the parent run (service.record), the Tuner (service.runner), the report.
    ``ext`` (--extend): the sweep's new seeds as their own Tune experiment under its parent run."""
    from service.record import NoParentRun, ParentRun, experiment_name
    from service.progress import close_displays
    from service.report import end_of_sweep
    from service.runner import build_tuner, can_resume, connect_ray
    from service.provenance import provenance
    from service.tracking import MLflowTracker, fail_fast_http

    uri = resolve_tracking_uri(args.tracking_uri)
    storage = resolve_storage(args.storage)
    name = args.name or f"{sweep.name}{'-smoke' if args.smoke else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.resume and not can_resume(storage, name):
        found = (sorted(p.name for p in Path(storage).glob("*") if (p / "tuner.pkl").exists())
                 if "://" not in storage and Path(storage).is_dir() else [])
        return _bad(f"no sweep {name!r} to resume under {storage}; found: {', '.join(found) or 'none'}")
    code = provenance(REPO)  # git commit and dirty flag, also under `ray job submit` (service/provenance.py)
    try:
        parent = ParentRun.open(uri, sweep, name, resume=args.resume or ext is not None,
                                tags={**code, "smoke": str(args.smoke)})
    except NoParentRun as e:
        return _bad(str(e))
    if ext is not None:
        ext.start(parent, sweep)
    tracker = MLflowTracker(uri, parent.experiment_id, parent.run_id, name,
                            {**code, **({"extension": ext.experiment} if ext else {})}, trials=sweep.identity())
    again = f"--extend --seeds {','.join(map(str, ext.seeds))}" if ext else "--resume"
    print(f"sweep {name}: {sweep.num_trials} {'new ' if ext else ''}trials; if interrupted, "
          f"continue with: python service/launch.py --sweep {args.sweep} --name {name} --storage {storage} "
          f"--tracking-uri {uri}{_same_trials(args)} {again}", flush=True)
    status, t0, reason = "FAILED", time.time(), None
    try:
        connect_ray()
        signal.signal(signal.SIGTERM, _interrupt)  # ray.init() installs its own SIGTERM handler: ours again
        fail_fast_http()  # the driver's MLflow calls: the tracker retries an outage itself (service/tracking.py)
        tuner, tracker = build_tuner(sweep, name=ext.experiment if ext else name, storage=storage, tracker=tracker,
                                     resume=args.resume or (ext is not None and ext.resume), verbose=args.verbose,
                                     tracking=None if args.no_system_metrics else (uri, parent.experiment_id))
        try:
            grid = tuner.fit()
        finally:  # a sweep interrupted or failed before Tune's end: its live display stops here
            close_displays()
        tracker.flush()  # normally a no-op: Tune's on_experiment_end has flushed it
        if ext is not None:
            ext.done(parent)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as e:  # Tune itself failed (e.g. its experiment state on a full disk): one line, no traceback
        reason = sweep_failure(e, storage, tracker.errors.values())
        print(f"launch.py: sweep {name} failed (exit {EXIT_SWEEP_FAILED}): {reason}", file=sys.stderr)
        return EXIT_SWEEP_FAILED
    finally:
        if status != "FINISHED":
            tracker.close_unfinished("KILLED" if status == "KILLED" else "FAILED")
            note = tracker.record_summary()
            if note:
                print(note, file=sys.stderr)
            parent.finish(status, tags={k: v for k, v in (("sweep_error", reason), ("tracking_note", note)) if v})
    wall = time.time() - t0
    n_trials, n_err = len(grid), sum(1 for r in grid if r.error)  # Tune's results: the exit code
    note = tracker.record_summary()  # what a tracking outage cost the record, if there was one
    reason = sweep_failure(None, storage, tracker.errors.values()) if n_err else None
    what = f"sweep/{'extend_' if ext else ''}"  # an extension keeps the sweep's own wall time
    parent.finish("FINISHED" if n_err == 0 else "FAILED",
                  metrics={f"{what}wall_s": wall, f"{what}tracking_s": tracker.seconds},
                  tags={k: v for k, v in (("sweep_error", reason), ("tracking_note", note)) if v})
    print(f"\nsweep {name}: {n_trials} {'new ' if ext else ''}trials, {n_err} failed, wall {wall:.0f} s\n")
    where = end_of_sweep(uri, name, storage, experiment_name(sweep), ext.experiment if ext else None)  # the summary
    code = 0 if n_err == 0 else EXIT_SWEEP_FAILED if reason.startswith("storage ") else 1
    if reason:
        print(f"launch.py: sweep {name}: {n_err} of {n_trials} trials failed (exit {code}): {reason}", file=sys.stderr)
    if note:
        print(note)
    print(where)
    print(f"\nMLflow: experiment {experiment_name(sweep)!r}, parent run '{name}' in {uri}")
    print(f"Browse: {ui_command(uri)}")
    return code


EXIT_SWEEP_FAILED = 3  # the sweep itself could not go on (storage full or unwritable, Tune failed, ...)


def sweep_failure(exc: BaseException | None, storage: str, trial_errors) -> str:
    """One line on why a sweep failed: a full or unwritable storage named as such (Tune's own exception is
    then often a consequence, e.g. a truncated pickle), else the exception, else the trials' first error."""
    import os
    import shutil

    seen = [f"{type(e).__name__}: {e}" for e in _chain(exc)] + list(trial_errors)
    local = "://" not in storage and Path(storage).is_dir()
    if any("No space left on device" in t or "Errno 28" in t for t in seen):
        free = shutil.disk_usage(storage).free if local else 0
        if free < 64 * 2**20:
            return (f"storage {storage} is full (No space left on device); free space there, then continue the "
                    "sweep with the --resume command printed above")
        return (f"a disk is full (No space left on device), though storage {storage} has {free / 2**30:.1f} GiB "
                "free: check the trial nodes' /tmp (Ray's session folder)")
    if local and not os.access(storage, os.W_OK):
        return f"storage {storage} is not writable (permission denied)"
    first = seen[0] if seen else "unknown error"
    return first.splitlines()[0][:300] if first.strip() else "unknown error"


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _same_trials(args) -> str:
    """The flags that shape the trials, for the printed --resume / --extend command (the same sweep again)."""
    flags = " --smoke" if args.smoke else ""
    if args.num_samples is not None:
        flags += f" --num-samples {args.num_samples}"
    if args.data_root is not None:
        flags += f" --data-root {Path(args.data_root).resolve()}"
    return flags


def _bad(message: str) -> int:
    print(f"launch.py: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


_received: list[int] = []  # the signals that interrupted the sweep (Tune may re-raise its own KeyboardInterrupt)


def _interrupt(signum, frame):
    _received.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


EXIT_SIGTERM, EXIT_SIGINT = 128 + signal.SIGTERM, 128 + signal.SIGINT  # 143, 130: the shell's convention


def main(argv: list[str] | None = None, *, usage: str | None = None, epilog: str | None = None) -> int:
    """The launcher (``python service/launch.py``, ``smear-sweep run|resume|extend|estimate|data check``):
    ``usage`` and ``epilog`` only change its --help."""
    signal.signal(signal.SIGTERM, _interrupt)  # `ray job stop`, kill: end MLflow runs as KILLED, like Ctrl-C
    args = parse_args(argv, usage=usage, epilog=epilog)
    try:
        sweep = load_sweep(args.sweep, smoke=args.smoke, num_samples=args.num_samples, seeds=args.seeds)
        ext = plan_extension(args, sweep) if args.extend else None  # issue 14: checked before anything starts
        apply_overrides(sweep, args)
        if not args.dry_run:  # this machine and its services (service/preflight.py), before the data check's minute
            check_environment(sweep, storage=args.storage or DEFAULT_STORAGE, tracking_uri=resolve_tracking_uri(args.tracking_uri))
        resolve_data(sweep, args.data_root, create=not args.dry_run, images="full" if args.check_images else "header")
        check_resources(sweep)
    except (ConfigError, DataError) as e:
        return _bad(str(e))
    if args.dry_run:
        print_trials(sweep)
        try:  # --estimate: the projected device-hours and cost, from a short calibration (service/estimate.py)
            return estimate.run(sweep, args) if args.estimate else 0
        except (ConfigError, DataError) as e:
            return _bad(str(e))
    try:
        return run_sweep(args, sweep, ext)
    except KeyboardInterrupt:  # SIGTERM (`ray job stop`, kill) or Ctrl-C: every run of the sweep is KILLED
        term = signal.SIGTERM in _received
        print(f"launch.py: interrupted ({'SIGTERM' if term else 'SIGINT'}): the sweep's MLflow runs are KILLED; "
              "continue it with the --resume command printed above", file=sys.stderr)
        return EXIT_SIGTERM if term else EXIT_SIGINT


if __name__ == "__main__":
    raise SystemExit(main())
