"""Launch a sweep: validate the declaration, run it on Ray Tune, record every trial in MLflow, report.

    python service/launch.py [--sweep NAME|PATH] [--smoke] [--dry-run] [--tracking-uri URI]
                             [--storage DIR] [--name RUN_NAME] [--data-root DIR]
    python service/launch.py --sweep NAME --extend --name RUN_NAME --seeds 3,4   # more seeds, same sweep
    python service/launch.py --sweep NAME --until-decided --name RUN_NAME       # seeds until decided

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

import signal
import sys
import time
from pathlib import Path

from smear.configs import ConfigError
from smear.data.domainnet import DataError
from service import estimate  # (light: torch only when it calibrates)
from service.inputs import Inputs, boundary, refuse
from service.refusal import first_line
from service.spaces import Sweep

REPO = Path(__file__).resolve().parent.parent


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


def run_sweep(inputs: Inputs) -> int:
    """Run a validated sweep: the parent run (service.record), the Tuner (service.runner), the report.
    ``inputs.extension`` (--extend): the sweep's new seeds as their own Tune experiment under its parent run.
    Every tracking write goes through the sweep's journal (service/journal.py): a sweep whose tracking server
    did not take all of it ends with EXIT_RECORD_INCOMPLETE, what each run lacks, and the --sync command."""
    from service.journal import journal_path, upload
    from service.record import EXIT_RECORD_INCOMPLETE, NoParentRun, ParentRun, experiment_name
    from service.progress import close_displays
    from service.runner import build_tuner, connect_ray
    from service.provenance import note as provenance_note, provenance
    from service.replica import fail_fast_http
    from service.tracking import MLflowTracker

    args, sweep, ext, uri, storage = inputs.args, inputs.sweep, inputs.extension, inputs.tracking_uri, inputs.storage
    name = args.name or f"{sweep.name}{'-smoke' if args.smoke else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    code = provenance(REPO)  # git commit, tree and dirty flag, also under `ray job submit` (service/provenance.py)
    try:
        parent = ParentRun.open(uri, sweep, name, storage=storage, resume=args.resume or ext is not None,
                                tags={**code, "smoke": str(args.smoke)})
    except NoParentRun as e:
        return refuse(str(e))
    if unknown := provenance_note(REPO, code):  # the sweep starts: say once that its commit is unknown (a plain `ray job submit`)
        print(unknown, file=sys.stderr, flush=True)
    if ext is not None:
        ext.start(parent, sweep)
    tracker = MLflowTracker(journal_path(storage, name), uri, parent.experiment_id, parent.run_id, name,
                            {**code, **({"extension": ext.experiment} if ext else {})}, trials=sweep.identity())
    again = inputs.again or (f"--extend --seeds {','.join(map(str, ext.seeds))}" if ext else "--resume")
    print(f"sweep {name}: {sweep.num_trials} {'new ' if ext else ''}trials; if interrupted, "
          f"continue with: python service/launch.py --sweep {args.sweep} --name {name} --storage {storage} "
          f"--tracking-uri {uri}{_same_trials(args)} {again}", flush=True)
    status, t0, reason = "FAILED", time.time(), None
    try:
        connect_ray()
        signal.signal(signal.SIGTERM, _interrupt)  # ray.init() installs its own SIGTERM handler: ours again
        fail_fast_http()  # the driver's MLflow calls: the replica retries an outage itself (service/replica.py)
        tuner = build_tuner(sweep, name=ext.experiment if ext else name, storage=storage, tracker=tracker,
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
    except Exception as e:  # Tune failed, or a full disk ended it (service/storage_guard.py): one line, no traceback
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
            if not parent.replica.flush(timeout=5):
                print(parent.incomplete(), file=sys.stderr)
            _say(upload(storage, name))
    wall = time.time() - t0
    n_trials, n_err = len(grid), sum(1 for r in grid if r.error)  # Tune's results: the exit code
    note = tracker.record_summary()  # what a tracking outage cost the record, if there was one
    reason = sweep_failure(None, storage, tracker.errors.values()) if n_err else None
    what = f"sweep/{'extend_' if ext else ''}"  # an extension keeps the sweep's own wall time
    parent.finish("FINISHED" if n_err == 0 else "FAILED",
                  metrics={f"{what}wall_s": wall, f"{what}tracking_s": tracker.seconds},
                  tags={k: v for k, v in (("sweep_error", reason), ("tracking_note", note)) if v})
    print(f"\nsweep {name}: {n_trials} {'new ' if ext else ''}trials, {n_err} failed, wall {wall:.0f} s\n")
    where = []  # the report's line: where it is, or why it was not written
    complete = parent.publish(_publisher(uri, name, storage, where), experiment=experiment_name(sweep), extension=ext.experiment if ext else None)
    _say(upload(storage, name))
    code = 0 if n_err == 0 else EXIT_SWEEP_FAILED if reason.startswith("storage ") else 1
    if reason:
        print(f"launch.py: sweep {name}: {n_err} of {n_trials} trials failed (exit {code}): {reason}", file=sys.stderr)
    if note:
        print(note)
    print(*where)
    print(f"\nMLflow: experiment {experiment_name(sweep)!r}, parent run '{name}' in {uri}")
    print(f"Browse: {ui_command(uri)}")
    if not complete:
        print(parent.incomplete(), file=sys.stderr)
        code = code if code == EXIT_SWEEP_FAILED else EXIT_RECORD_INCOMPLETE
    return code


def run_sync(inputs: Inputs) -> int:
    """``--sync --name RUN``: send what the tracking server lacks of the sweep's journal (its unsent writes,
    then its report if the sweep ended without one), idempotently. 0 when the record is complete, else
    EXIT_RECORD_INCOMPLETE and one line."""
    from service.journal import Journal, journal_path
    from service.record import EXIT_RECORD_INCOMPLETE, incomplete_note
    from service.replica import Replica, fail_fast_http

    name, storage, uri = inputs.args.name, inputs.storage, inputs.tracking_uri
    path = journal_path(storage, name)
    header = Journal.at(path).parent
    fail_fast_http()
    replica = Replica.at(path, uri, header["experiment_id"], header["run_id"])
    where = []
    replica.publisher = _publisher(uri, name, storage, where)
    try:
        sent = replica.sync()
    except Exception as e:  # noqa: BLE001 - the server does not answer (or fails): one line, the journal is intact
        print(f"launch.py: sync of sweep {name}: {uri} did not take the record ({type(e).__name__}: "
              f"{first_line(e)}); nothing is lost: run the same command again "
              f"once it answers", file=sys.stderr)
        return EXIT_RECORD_INCOMPLETE
    if where:
        print(*where)
    if replica.missing():
        print(incomplete_note(replica, name, storage), file=sys.stderr)
        return EXIT_RECORD_INCOMPLETE
    note = replica.summary()
    print(f"sync: sweep {name}: {sent} write(s) sent to {uri} from {path}; its record is complete"
          + (f" ({note})" if note else ""))
    return 0


def _publisher(uri: str, name: str, storage: str, where: list[str]):
    """The report, written by the replica once the rest of the record is in (a journal ``report`` entry's
    data); ``where`` gets the line that says where it is, or why it was not written."""
    from service.report import end_of_sweep

    def publisher(data: dict) -> bool:
        ok, line = end_of_sweep(uri, name, storage, data["experiment"], data.get("extension"))
        where.append(line)
        return ok
    return publisher


def run_until_decided(inputs: Inputs) -> int:
    """``--until-decided``: look 1, then rounds of extensions until every comparison is decided or the budget is
    spent (service/decide.py), each round a run_sweep; the report again at the end, with the final decisions."""
    from service import decide
    from service.inputs import round_inputs
    from service.record import EXIT_RECORD_INCOMPLETE, experiment_name

    from service.journal import upload

    def publish(parent) -> int:
        where: list[str] = []
        complete = parent.publish(_publisher(inputs.tracking_uri, inputs.args.name, inputs.storage, where),
                                  experiment=experiment_name(inputs.sweep))
        _say(upload(inputs.storage, inputs.args.name))
        print(*where)
        if not complete:
            print(parent.incomplete(), file=sys.stderr)
        return 0 if complete else EXIT_RECORD_INCOMPLETE

    try:
        return decide.run(inputs, run_sweep, round_inputs, publish)
    except (ConfigError, DataError) as e:  # a round refused (the declaration or the data changed under the loop)
        return refuse(str(e))


def _say(line: str | None) -> None:
    if line:
        print(f"launch.py: {line}", file=sys.stderr)


EXIT_SWEEP_FAILED = 3  # the sweep itself could not go on (storage full or unwritable, Tune failed, ...)


def sweep_failure(exc: BaseException | None, storage: str, trial_errors) -> str:
    """One line on why a sweep failed: a full or unwritable storage named as such (Tune's own exception is
    then often a consequence, e.g. a truncated pickle), else the exception, else the trials' first error.
    A full disk is found by type (an ENOSPC OSError in the exception's chain: the StorageFull that
    service/storage_guard.py ends a sweep with); only in what is text (the trials' errors, a message that
    quotes a lost exception) by trainables.failures.names_storage_full."""
    import os
    import shutil

    from trainables.failures import names_storage_full, storage_full

    seen = [f"{type(e).__name__}: {e}" for e in _chain(exc)] + list(trial_errors)
    local = "://" not in storage and Path(storage).is_dir()
    if storage_full(exc) is not None or any(names_storage_full(t) for t in seen):
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


_received: list[int] = []  # the signals that interrupted the sweep (Tune may re-raise its own KeyboardInterrupt)


def _interrupt(signum, frame):
    _received.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


EXIT_SIGTERM, EXIT_SIGINT = 128 + signal.SIGTERM, 128 + signal.SIGINT  # 143, 130: the shell's convention


def main(argv: list[str] | None = None, *, usage: str | None = None, epilog: str | None = None) -> int:
    """The launcher (``python service/launch.py``, ``smear-sweep run|resume|extend|estimate|data check``):
    ``usage`` and ``epilog`` only change its --help. Every input is read by the boundary (service/inputs.py)
    before anything starts: bad input is one line and exit 2."""
    signal.signal(signal.SIGTERM, _interrupt)  # `ray job stop`, kill: end MLflow runs as KILLED, like Ctrl-C
    inputs = boundary(argv, usage=usage, epilog=epilog)
    if isinstance(inputs, int):
        return inputs
    if inputs.args.dry_run:
        print_trials(inputs.sweep)
        try:  # --estimate: the projected device-hours and cost, from a short calibration (service/estimate.py)
            return estimate.run(inputs.sweep, inputs.args, inputs.tracking_uri) if inputs.args.estimate else 0
        except (ConfigError, DataError) as e:
            return refuse(str(e))
    try:
        if inputs.args.sync:
            return run_sync(inputs)
        return run_until_decided(inputs) if inputs.args.until_decided else run_sweep(inputs)
    except KeyboardInterrupt:  # SIGTERM (`ray job stop`, kill) or Ctrl-C: every run of the sweep is KILLED
        term = signal.SIGTERM in _received
        print(f"launch.py: interrupted ({'SIGTERM' if term else 'SIGINT'}): the sweep's MLflow runs are KILLED; "
              "continue it with the command printed above (continue with: ...)", file=sys.stderr)
        return EXIT_SIGTERM if term else EXIT_SIGINT


if __name__ == "__main__":
    raise SystemExit(main())
