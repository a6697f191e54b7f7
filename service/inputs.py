"""The input boundary of launch.py: everything that comes from outside (the command line, the environment
variables it reads, the declaration file, data roots, tracking and storage URIs, run names) read into typed
values in one place, before anything starts or is written.

Its contract is total: :func:`read_inputs` returns :class:`Inputs`, or the sweep is refused with ONE line
``launch.py: error: <where> <value>: <reason>; valid: <choices>`` and exit code 2 (:func:`boundary`). An
exception of any other type is a bug of the boundary: it is reported as a one-line internal error naming the
input being read (:class:`Reading`), exit 2, never a traceback. ``tests/test_fuzz_inputs.py`` searches for
inputs that break the contract. A dry run reads everything except the probes of this machine and its services
(``service/preflight.py``).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from smear.configs import ConfigError
from smear.data.domainnet import DataError
from service import decide, estimate  # (light: torch only when it calibrates)
from service.spaces import Sweep, load_sweep
from service.refusal import first_line, internal_error, refuse
from service.uris import check_uri, resolve_tracking_uri

DESCRIPTION = "Launch a sweep: validate the declaration, run it on Ray Tune, record every trial in MLflow, report."


DEFAULT_STORAGE = "results"  # --storage when not given: Tune's results and checkpoints under ./results
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME_BYTES = 200  # a run name names folders (storage, Tune's trial folders add ~60 bytes): file systems allow 255
def check_name(name: str) -> None:
    """A sweep's run name: one safe path component a file system can hold (it names the sweep's folder)."""
    if not SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"--name={name!r} is not a safe run name; valid: one path component of letters, digits, "
                          "'.', '_', '-' (it names the folder under --storage)")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ConfigError(f"--name={name[:40]!r}... is {len(name.encode())} bytes long; valid: at most "
                          f"{MAX_NAME_BYTES} (it names folders under --storage)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own prints the usage too)
        raise SystemExit(refuse(message))


EXAMPLES = """examples:
  python service/launch.py                                   # the default sweep (smear-sweep run)
  python service/launch.py --sweep t5-glue-smoke --smoke     # a shipped declaration, tiny budget
  python service/launch.py --sweep default --dry-run         # validate, print the trials, start nothing
  python service/launch.py --resume --name RUN               # continue a sweep whose driver died
  python service/launch.py --extend --name RUN --seeds 3,4   # more seeds for a finished sweep
  python service/launch.py --until-decided --name RUN --max-seeds 12   # seeds until each comparison is decided
  python service/launch.py --dry-run --estimate --sweep resnet-domainnet   # projected device-hours
"""


def parse_args(argv: list[str] | None = None, *, usage: str | None = None, epilog: str | None = None) -> argparse.Namespace:
    """launch.py's flags, checked: the one definition of each (``smear-sweep`` passes its own ``usage`` and
    ``epilog`` for its subcommands' --help, service/cli.py). A bad value or combination: one line, exit 2."""
    p = _Parser(description=DESCRIPTION, usage=usage, epilog=EXAMPLES if epilog is None else epilog,
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
    p.add_argument("--sync", action="store_true",
                   help="send the tracking server what it lacks of sweep --name's record (its journal in --storage): "
                        "after a sweep that ended with writes unsent (exit 4); idempotent")
    estimate.add_arguments(p)  # --estimate, --price-per-gpu-hour, --calibration-steps, --calibration-batch
    _extend_arguments(p)
    decide.add_arguments(p)  # --until-decided and its budget (service/decide.py)
    args = p.parse_args(argv)
    estimate.check_arguments(p, args)
    _check_extend(p, args)
    decide.check_arguments(p, args)
    for flag, low in (("cpus_per_trial", 0), ("gpus_per_trial", 0), ("max_concurrent_trials", 1), ("num_samples", 1)):
        v = getattr(args, flag)
        if v is not None and not (math.isfinite(v) and v >= low):
            p.error(f"--{flag.replace('_', '-')}={v} must be >= {low}{'' if math.isfinite(v) else ' and finite'}")
    if args.sync:
        if not args.name:
            p.error("--sync needs --name, the run name of the sweep whose record to send")
        for bad in ("resume", "extend", "dry_run", "estimate", "smoke"):
            if getattr(args, bad):
                p.error(f"--sync and --{bad.replace('_', '-')} cannot be combined: --sync only sends a recorded "
                        "sweep's journal; valid: --sync --name RUN [--storage DIR] [--tracking-uri URI]")
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
    if args.name is not None:
        try:
            check_name(args.name)
        except ConfigError as e:
            p.error(str(e))
    for flag, kind in (("tracking_uri", "tracking"), ("storage", "storage")):
        v = getattr(args, flag)
        if v is not None:
            try:
                check_uri(f"--{flag.replace('_', '-')}", v, kind)
            except ConfigError as e:
                p.error(str(e))
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


def plan_extension(args: argparse.Namespace, sweep: Sweep, uri: str, storage: str):
    """--extend: the checked Extension (service/extend.py), or a ConfigError before anything starts."""
    from service.extend import plan

    return plan(uri, storage, args.name, sweep, args.smoke, args.seeds)


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
    """Every trial's resource request, as Tune will ask for it (a bad combination is a one-line ConfigError):
    checked once per (setting, num_workers, use_gpu), what a request depends on (preflight.distinct_trials),
    not once per trial (a config built per trial: seconds at 10,000 trials)."""
    from service.preflight import distinct_trials

    trials = sweep.identity()
    for config in distinct_trials(sweep):
        trials.resources_of(config)


@dataclass
class Inputs:
    """What the boundary read: the flags, the resolved sweep, where it records and stores, its extension."""

    args: argparse.Namespace
    sweep: Sweep | None    # None for --sync (it needs no declaration)
    tracking_uri: str
    storage: str
    extension: Any | None  # service.extend.Extension for --extend
    loop: Any | None = None  # service.decide.Loop for --until-decided
    again: str | None = None  # the flags of the command that continues the sweep, when not --resume / --extend's


class Reading:
    """Which input the boundary is reading now: an internal error's line names it."""

    def __init__(self) -> None:
        self.what = "the command line"

    @contextlib.contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        before, self.what = self.what, what
        yield
        self.what = before  # not on an exception: then the line names what was being read


def read_inputs(argv: list[str] | None, reading: Reading, *, usage: str | None = None,
                epilog: str | None = None) -> Inputs:
    """Read and check every input (see the module docstring); refusals are ConfigError / DataError lines."""
    from service.preflight import check_environment, check_sweep_name

    args = parse_args(argv, usage=usage, epilog=epilog)
    with reading("the environment's SMEAR_RECORD_WAIT_S"):
        check_record_wait()
    if args.sync:
        with reading(f"the record journal of --name={args.name!r}"):
            return read_sync(args)
    with reading("the tracking URI (--tracking-uri / MLFLOW_TRACKING_URI)"):
        uri = resolve_tracking_uri(args.tracking_uri)
    with reading(f"--storage={args.storage!r}"):
        storage = resolve_storage(args.storage)
    with reading(f"the declaration --sweep={args.sweep!r}"):
        sweep = load_sweep(args.sweep, smoke=args.smoke, num_samples=args.num_samples,
                           seeds=args.seeds if args.seeds is not None else decide.initial_seeds(args))
    with reading("--extend"):
        ext = plan_extension(args, sweep, uri, storage) if args.extend else None  # issue 14
    with reading("--until-decided"):
        loop = decide.plan_loop(args, sweep, uri, storage) if args.until_decided else None  # issue 22
        if loop is not None and loop.mode == "resume":  # look 1 was interrupted: it continues as --resume would
            args = argparse.Namespace(**{**vars(args), "resume": True})
    apply_overrides(sweep, args)
    if not args.dry_run:  # this machine and its services (service/preflight.py), before the data check's minute
        with reading("this machine and its services"):
            check_environment(sweep, storage=args.storage or DEFAULT_STORAGE, tracking_uri=uri)  # as the user wrote it
            check_sweep_name(storage, args.name, resume=args.resume,
                             extend=args.extend or (loop is not None and loop.mode == "continue"))
    with reading(f"the data (--data-root={args.data_root!r})"):
        resolve_data(sweep, args.data_root, create=not args.dry_run, images="full" if args.check_images else "header")
    with reading("the trials' resources"):
        check_resources(sweep)
    return Inputs(args=args, sweep=sweep, tracking_uri=uri, storage=storage, extension=ext, loop=loop,
                  again=decide.again_flags(args) if loop is not None else None)


def round_inputs(inputs: Inputs, seeds: list[int], methods: list[str]) -> Inputs:
    """--until-decided: one round after look 1, checked as ``--extend --seeds`` is (service/extend.py): the grid
    of ``methods`` only at ``seeds``, under the same parent run. A refusal is a ConfigError / DataError line."""
    from service.extend import plan

    args = argparse.Namespace(**{**vars(inputs.args), "resume": False, "extend": True, "seeds": seeds})
    sweep = load_sweep(args.sweep, smoke=args.smoke, num_samples=args.num_samples, seeds=seeds, methods=methods)
    ext = plan(inputs.tracking_uri, inputs.storage, args.name, sweep, args.smoke, seeds, methods)
    apply_overrides(sweep, args)
    resolve_data(sweep, args.data_root, create=True, images="full" if args.check_images else "header")
    check_resources(sweep)
    return Inputs(args, sweep, inputs.tracking_uri, inputs.storage, ext, inputs.loop, inputs.again)


def check_record_wait() -> None:
    from service.replica import record_wait

    try:
        record_wait()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def read_sync(args: argparse.Namespace) -> Inputs:
    """--sync: the sweep's journal must be in the storage; the tracking URI is --tracking-uri, else the one the
    journal records (the store the sweep wrote to)."""
    from service.journal import FILE, Journal, journal_path

    storage = resolve_storage(args.storage)
    path = journal_path(storage, args.name)
    if not path.is_file():
        local = "://" not in storage and Path(storage).is_dir()
        found = sorted(p.parent.name for p in Path(storage).glob(f"*/{FILE}")) if local else []
        raise ConfigError(f"--name={args.name!r}: no record journal at {path}; valid: a sweep recorded in --storage "
                          f"{storage}: {', '.join(found) or 'none found'}")
    header = Journal.at(path).parent
    if not all(isinstance(header.get(k), str) and header[k] for k in ("run_id", "experiment_id", "uri")):
        raise ConfigError(f"--name={args.name!r}: the journal {path} records no parent run; valid: a journal "
                          "written by launch.py")
    uri = resolve_tracking_uri(args.tracking_uri) if args.tracking_uri else header["uri"]
    check_uri("the journal's tracking URI", uri, "tracking")
    probe_parent_run(uri, header["run_id"], args.name)
    return Inputs(args=args, sweep=None, tracking_uri=uri, storage=storage, extension=None)


def probe_parent_run(uri: str, run_id: str, name: str) -> None:
    """--sync: the store answers (bounded, as a sweep's probes) and holds the sweep's parent run: the journal
    is replayed into the store the sweep wrote to, never into another (which it would fill with orphans)."""
    from service.probes import PROBE_TIMEOUT_S, probe_tracking, within

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ConfigError(f"--tracking-uri={uri!r}: no sqlite store there; valid: the store sweep {name!r} wrote to")
    probe_tracking(uri)

    def has_parent() -> bool:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(uri).get_run(run_id)
            return True
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise ConfigError(f"tracking URI {uri!r}: {first_line(e)}; valid: a store that "
                              "answers") from None

    if not within(3 * PROBE_TIMEOUT_S, f"tracking URI {uri!r}", has_parent):
        raise ConfigError(f"--tracking-uri={uri!r} has no run {run_id} (the parent run of sweep {name!r}); valid: "
                          "the store the sweep wrote to (the journal's, when --tracking-uri is not given)")


def boundary(argv: list[str] | None = None, **kw: Any) -> Inputs | int:
    """:func:`read_inputs` with its contract made total: the inputs, or exit code 2 after one line."""
    reading = Reading()
    try:
        return read_inputs(argv, reading, **kw)
    except (ConfigError, DataError) as e:
        return refuse(str(e))
    except (SystemExit, KeyboardInterrupt):
        raise  # argparse's refusals (one line, exit 2: _Parser.error); Ctrl-C
    except BaseException as e:  # noqa: BLE001 - the contract: never a traceback; a bug of the boundary, named
        return internal_error(e, reading.what)
