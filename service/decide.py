"""``launch.py --until-decided``: add seeds in rounds until every comparison with the reference is decided.

Look 1 is the declaration's grid at its seeds (or seeds 0..N-1 with ``--initial-seeds N``): a new sweep, or
the finished sweep ``--name`` already is. From look 1's paired differences (the pilot) the design is fixed
once: :func:`service.sequential.plan_seeds` gives each comparison's group-sequential maximum, the largest of
them capped by ``--max-seeds`` is the design's maximum (``--max-seeds`` alone when the pilot cannot tell), and
:meth:`~service.sequential.Design.even` spaces :data:`~service.sequential.DEFAULT_LOOKS` looks up to it from
look 1's seed count, with margin ``--delta``. After each look :func:`service.sequential.decide` gives every
comparison its verdict; :func:`service.sequential.next_seeds` the next look's seed count, or None (all
decided, or the last look). The next round is an extension (service/extend.py, its own Tune experiment under
the same parent run) of the grid restricted to the reference and the undecided methods (``load_sweep(...,
methods=)``), at the next seeds not yet in the sweep; decided methods get no new seed. A round that would take
the training device-hours (``compute/train_hours`` summed: :func:`service.report.tables.device_hours`) past
``--max-device-hours`` (projected from each method's mean hours per trial so far) is not started.

The loop runs in the driver: one command runs every round. Its state (the design, the rounds planned, the
decisions, why it stopped) is recorded on the parent run through :class:`~service.record.ParentRun` (tag
:data:`STATE_TAG`, and :data:`DECISION_TAG` per comparison), so the same command continues an interrupted
loop: an unfinished look 1 is resumed, an unfinished round's extension continued, then the loop goes on from
the record. The decisions are recomputed from the trials at every look (``decide`` keeps no state), so the
record and the report (service/report/scores.py ``sequential_decisions``) always agree with the data.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field

from smear.configs import ConfigError

DEFAULT_MAX_SEEDS = 20          # --max-seeds: the design's maximum seeds (paired with the reference) at most
STATE_TAG = "decide.state"      # the loop's state on the parent run (JSON: LoopState)
DECISION_TAG = "decision."      # + method: that comparison's decision (JSON)
STOP_DECIDED, STOP_LAST_LOOK, STOP_HOURS = "every comparison decided", "the design's last look", "--max-device-hours"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--until-decided", action="store_true",
                   help="run the grid, then add seeds in rounds only to the comparisons with the reference that are "
                        "still undecided (group-sequential, docs/seeds.md), until each is decided or the budget is "
                        "spent; needs --name; the same command continues an interrupted loop")
    p.add_argument("--initial-seeds", type=int, default=None,
                   help="with --until-decided: look 1 runs seeds 0..N-1 (default: the declaration's grid seeds)")
    p.add_argument("--max-seeds", type=int, default=None,
                   help=f"with --until-decided: the most seeds a comparison gets (default {DEFAULT_MAX_SEEDS})")
    p.add_argument("--max-device-hours", type=float, default=None,
                   help="with --until-decided: no round that would take the sweep's training device-hours past H")
    p.add_argument("--delta", type=float, default=None,
                   help="with --until-decided: the equivalence margin and the difference to detect, in the test "
                        "metric (default service.sequential.DEFAULT_DELTA)")
    p.add_argument("--reference", default=None,
                   help="with --until-decided: the method every other is compared with (default: the report's)")


FLAGS = ("initial_seeds", "max_seeds", "max_device_hours", "delta", "reference")


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The flags alone (``p.error``: one line, exit 2); the declaration's part is :func:`plan_loop`'s."""
    from service.declaration import MAX_TRIALS
    from service.sequential import MIN_SEEDS

    if not args.until_decided:
        if given := [f for f in FLAGS if getattr(args, f) is not None]:
            p.error(f"--{given[0].replace('_', '-')} needs --until-decided; valid: --until-decided --name RUN with it")
        return
    for bad, why in (("resume", "an interrupted loop continues with the same --until-decided command"),
                     ("extend", "--until-decided runs its own extensions"), ("sync", "--sync only sends a record")):
        if getattr(args, bad):
            p.error(f"--until-decided and --{bad} cannot be combined: {why}; valid: --until-decided --name RUN")
    if not args.name and not args.dry_run:
        p.error("--until-decided needs --name, the sweep's run name (the same command continues it); valid: "
                "--until-decided --name RUN")
    for flag in ("initial_seeds", "max_seeds"):
        v = getattr(args, flag)
        if v is not None and not MIN_SEEDS <= v <= MAX_TRIALS:
            p.error(f"--{flag.replace('_', '-')}={v} is {'too few' if v < MIN_SEEDS else 'too many'}; valid: an "
                    f"integer from {MIN_SEEDS} to {MAX_TRIALS:,}")
    if args.initial_seeds is not None and args.initial_seeds > max_seeds(args):
        p.error(f"--max-seeds={max_seeds(args)} is smaller than --initial-seeds={args.initial_seeds}; valid: "
                f"--max-seeds >= the initial seeds")
    for flag in ("max_device_hours", "delta"):
        v = getattr(args, flag)
        if v is not None and not (math.isfinite(v) and v > 0):
            p.error(f"--{flag.replace('_', '-')}={v} must be a finite number > 0; valid: e.g. "
                    f"{'2.5' if flag == 'max_device_hours' else '0.01'}")


def max_seeds(args) -> int:
    return DEFAULT_MAX_SEEDS if args.max_seeds is None else args.max_seeds


def initial_seeds(args) -> list[int] | None:
    """The seeds look 1 runs in place of the grid's (``--initial-seeds N``: 0..N-1), or None."""
    return list(range(args.initial_seeds)) if args.until_decided and args.initial_seeds is not None else None


@dataclass
class Round:
    """One round after look 1: an extension at ``seeds`` of the grid's ``methods`` (the reference first)."""
    look: int
    seeds: list[int]
    methods: list[str]


@dataclass
class LoopState:
    """What the parent run records of the loop (tag STATE_TAG); ``design`` is None until look 1 is done."""
    reference: str
    delta: float
    max_seeds: int
    design: list[int] | None = None         # cumulative paired seeds at each look (service.sequential.Design)
    alpha: float | None = None
    look: int = 0                           # the looks decided so far
    rounds: list[dict] = field(default_factory=list)   # the rounds planned after look 1 (Round's fields)
    fixed: dict[str, int | None] = field(default_factory=dict)  # fixed design's seeds per comparison (look 1's pilot)
    device_hours: float = 0.0               # training device-hours of the sweep at the last look
    stopped: str | None = None              # why the loop stopped (STOP_*), None while it goes on

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_tags(cls, tags: dict) -> "LoopState | None":
        return cls(**json.loads(tags[STATE_TAG])) if tags.get(STATE_TAG) else None

    def design_of(self):
        from service.sequential import ALPHA, Design

        return Design(tuple(self.design), self.alpha or ALPHA, self.delta)


def decisions_from_tags(tags: dict) -> dict[str, dict]:
    """Each comparison's recorded decision (the fields of service.sequential.Decision, and ``seeds``)."""
    return {k[len(DECISION_TAG):]: json.loads(v) for k, v in sorted(tags.items()) if k.startswith(DECISION_TAG)}


@dataclass(frozen=True)
class Budget:
    reference: str
    delta: float
    max_seeds: int
    max_device_hours: float | None


@dataclass
class Loop:
    """What the boundary found: the budget, and where the record stands (``new``: no sweep yet; ``resume``: look
    1 unfinished; ``continue``: look 1 done, the loop goes on from the record)."""
    budget: Budget
    mode: str


def _seed_grid(sweep) -> tuple[list[str], list[int]]:
    from service.spaces import METHOD_KEY, SEED_KEY

    if sweep.search == "optuna" or any(SEED_KEY not in t.overrides or METHOD_KEY not in t.overrides
                                       for t in sweep.trials):
        raise ConfigError(f"--until-decided needs {SEED_KEY} and {METHOD_KEY} in the declaration's grid (grid or "
                          f"random search); valid: e.g. grid: {{{METHOD_KEY}: [A, B], {SEED_KEY}: [0, 1, 2]}}")
    methods = list(dict.fromkeys(t.overrides[METHOD_KEY] for t in sweep.trials))
    return methods, sorted({int(t.overrides[SEED_KEY]) for t in sweep.trials})


def plan_loop(args, sweep, uri: str, storage: str) -> Loop:
    """--until-decided: the declaration's part (a seed grid of one setting, two methods or more, the reference
    among them, enough seeds) and, for a real launch, the record's (a recorded loop must have run with the same
    reference, margin and --max-seeds). Reads the MLflow store, writes nothing; ConfigError otherwise."""
    from service.report.stats import default_reference
    from service.sequential import DEFAULT_DELTA, MIN_SEEDS

    methods, seeds = _seed_grid(sweep)
    reference = args.reference or default_reference()
    if len(methods) < 2 or reference not in methods:
        raise ConfigError(f"--until-decided compares methods with --reference={reference!r}: the grid's "
                          f"{', '.join(methods)} {'lacks it' if reference not in methods else 'is one method'}; "
                          f"valid: a grid of {reference!r} and at least one other method (or another --reference)")
    if len({t.config["setting"] for t in sweep.trials}) > 1:
        raise ConfigError("--until-decided needs a declaration of one setting (one comparison per method); valid: "
                          "one sweep per setting")
    if len(seeds) < MIN_SEEDS or len(seeds) > max_seeds(args):
        raise ConfigError(f"--until-decided: look 1 has {len(seeds)} seeds ({', '.join(map(str, seeds))}); valid: "
                          f"{MIN_SEEDS} to --max-seeds={max_seeds(args)} (the grid's seed or --initial-seeds)")
    budget = Budget(reference, DEFAULT_DELTA if args.delta is None else args.delta, max_seeds(args),
                    args.max_device_hours)
    if args.dry_run:
        return Loop(budget, "new")
    parent = _parent(uri, args.name, sweep)
    state = LoopState.from_tags(parent.data.tags) if parent is not None else None
    if state is not None:
        now, then = (budget.reference, budget.delta, budget.max_seeds), (state.reference, state.delta, state.max_seeds)
        if now != then:
            raise ConfigError(f"sweep {args.name!r}'s loop ran with --reference {then[0]} --delta {then[1]:g} "
                              f"--max-seeds {then[2]}, not {now[0]} {now[1]:g} {now[2]}; valid: the same flags "
                              "(--max-device-hours may change)")
    from service.extend import FINISHED
    from service.journal import journal_path

    mode = "new" if parent is None else "continue" if state or parent.info.status in FINISHED else "resume"
    if mode != "new" and not journal_path(storage, args.name).is_file():
        raise ConfigError(f"sweep {args.name!r} has no record journal at {journal_path(storage, args.name)}; valid: "
                          "the --storage the sweep ran with")
    return Loop(budget, mode)


def _parent(uri: str, name: str, sweep):
    """The sweep's parent run in the store, or None (no store, no such sweep yet)."""
    from service.record import experiment_name
    from service.report.trials import ReportError, find_sweep, open_store

    try:
        return find_sweep(open_store(uri), name, experiment_name(sweep))[0]
    except ReportError:
        return None


def again_flags(args) -> str:
    """The loop's flags, for the printed command that continues it."""
    flags = "--until-decided"
    for f in FLAGS:
        if getattr(args, f) is not None:
            flags += f" --{f.replace('_', '-')} {getattr(args, f)}"
    return flags


# ---------------------------------------------------------------------------------------------------------
# one look: the decisions from the trials, and the next round


def advance(state: LoopState, trials: list, max_device_hours: float | None = None) -> tuple[Round | None, dict]:
    """Look ``state.look + 1`` on the sweep's ``trials`` (service.report.trials.Trial, every round so far): at
    look 1 the design is fixed from the pilot; every comparison's decision is taken
    (service.sequential.decide); then the next round, or None with ``state.stopped`` saying why. ``state`` is
    updated (the look, the round appended). Returns (the next round or None, the decisions by method)."""
    from service.report.tables import device_hours
    from service.sequential import DEFAULT_LOOKS, UNDECIDED, Design, decide, next_seeds, plan_seeds

    look, ref = state.look + 1, state.reference
    diffs, scores = _differences(trials, ref)
    if state.design is None:
        n1 = len(scores[ref])
        plans = plan_seeds(diffs, state.delta)
        state.fixed = {m: p.fixed for m, p in plans.items()}
        planned = [p.sequential for p in plans.values() if p.sequential]
        top = min(state.max_seeds, max(planned)) if planned else state.max_seeds
        design = Design.even(max(top, n1), DEFAULT_LOOKS, first=n1, delta=state.delta)
        state.design, state.alpha = list(design.seeds), design.alpha
    design = state.design_of()
    found = decide(diffs, look, design)
    state.look, state.device_hours = look, device_hours(trials)
    target = next_seeds(found, look, design)
    if target is None:
        state.stopped = STOP_DECIDED if all(d.verdict != UNDECIDED for d in found.values()) else STOP_LAST_LOOK
        return None, found
    start = 1 + max(int(s) for m in scores for s in scores[m] if str(s).isdigit())
    seeds = list(range(start, start + target - design.seeds[look - 1]))
    methods = [ref] + [m for m, d in found.items() if d.verdict == UNDECIDED]
    if max_device_hours is not None:
        cost = _projected_hours(trials, methods, len(seeds))
        if state.device_hours + cost > max_device_hours:
            state.stopped = (f"{STOP_HOURS} {max_device_hours:g}: {state.device_hours:.3g} spent, the next round "
                             f"needs about {cost:.3g}")
            return None, found
    state.rounds.append(asdict(Round(look + 1, seeds, methods)))
    return Round(look + 1, seeds, methods), found


def _differences(trials: list, reference: str) -> tuple[dict[str, list[float]], dict]:
    """Per method, its paired differences with the reference in seed order (as the report computes them)."""
    from service.report.stats import paired_differences
    from service.report.tables import seed_scores

    scores = seed_scores(trials)
    return {m: paired_differences(m, scores[m], reference, scores[reference]) for m in scores if m != reference}, scores


def _projected_hours(trials: list, methods: list[str], n_seeds: int) -> float:
    """A round's training device-hours: per method, its trials per seed x its mean train_hours per trial so far."""
    total = 0.0
    for m in methods:
        mine = [t for t in trials if t.method == m]
        hours = [t.compute["train_hours"] for t in mine if "train_hours" in t.compute]
        per_seed = len(mine) / max(1, len({t.seed for t in mine}))
        total += (sum(hours) / len(hours) if hours else 0.0) * per_seed * n_seeds
    return total


# ---------------------------------------------------------------------------------------------------------
# the loop, in the driver


def record(parent, state: LoopState, found: dict) -> None:
    """The loop's state and each comparison's decision on the parent run (through its journal)."""
    for m, d in found.items():
        parent.tag(f"{DECISION_TAG}{m}", json.dumps({**asdict(d), "seeds": d.n}, separators=(",", ":")))
    parent.tag(STATE_TAG, state.to_json())
    parent.replica.flush()


def _say(state: LoopState, found: dict, nxt: Round | None) -> None:
    what = ", ".join(f"{m} {d.verdict}" + (f" (look {d.decided_at})" if d.decided_at else "") for m, d in found.items())
    then = (f"next: seeds {','.join(map(str, nxt.seeds))} for {', '.join(nxt.methods)}" if nxt
            else f"stopped: {state.stopped}")
    print(f"until-decided: look {state.look} of {len(state.design)} ({state.design[state.look - 1]} seeds), vs "
          f"{state.reference}: {what}; {then}", flush=True)


def run(inputs, run_round, round_inputs, publish) -> int:
    """Every round of the loop (the module docstring). ``run_round(inputs) -> exit code`` runs one Tune
    experiment (launch.run_sweep), ``round_inputs(inputs, seeds, methods)`` gives the checked inputs of an
    extension round (service/inputs.py), ``publish(parent) -> 0 or an exit code`` writes the report again once
    the loop's final state is recorded. Returns the exit code: 0, 1 (some trial failed), or a round's other."""
    from service.extend import DONE, extension_name
    from service.record import ParentRun
    from service.report.trials import read_trials

    name, uri, storage, budget = inputs.args.name, inputs.tracking_uri, inputs.storage, inputs.loop.budget
    failed, mode = False, inputs.loop.mode
    if mode == "continue":  # what an earlier driver could not send goes first: the looks read MLflow
        ParentRun.attach(uri, name, storage).replica.sync()
    for _ in range(budget.max_seeds + 3):  # each pass runs a round or stops: never more passes than seeds
        if mode in ("new", "resume"):  # look 1: the declaration's grid, a new sweep or the interrupted one
            code, mode = run_round(inputs), "continue"
        else:
            parent_run = _parent(uri, name, inputs.sweep)
            state = LoopState.from_tags(parent_run.data.tags) or LoopState(budget.reference, budget.delta,
                                                                           budget.max_seeds)
            last = state.rounds[-1] if state.rounds else None
            if state.stopped in (STOP_DECIDED, STOP_LAST_LOOK):
                print(f"until-decided: sweep {name} is done ({state.stopped} at look {state.look}): nothing to run")
                return 0
            if state.stopped:  # the device-hours cap stopped it: this look again, under the cap given now
                state.stopped, state.look = None, state.look - 1
            if last and parent_run.data.tags.get(f"extend.{extension_name(name, last['seeds'])}") != DONE:
                code = run_round(round_inputs(inputs, last["seeds"], last["methods"]))  # planned, not done
            else:
                trials = read_trials(ParentRun.attach(uri, name, storage).client, parent_run)
                nxt, found = advance(state, trials, budget.max_device_hours)
                parent = ParentRun.attach(uri, name, storage)
                record(parent, state, found)
                _say(state, found, nxt)
                if nxt is None:
                    return publish(parent) or int(failed)
                code = run_round(round_inputs(inputs, nxt.seeds, nxt.methods))
        if code not in (0, 1):
            return code
        failed = failed or code == 1
    print("launch.py: --until-decided: the loop did not end within its seed budget (a bug)", file=sys.stderr)
    return 3
