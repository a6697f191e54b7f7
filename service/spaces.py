"""Search-space declarations (``search_spaces/<name>.yaml``): load, validate, resolve into trials.

A declaration states only what differs from the setting's defaults:

    description: one line
    base:   {dotted.key: value, ...}       # fixed overrides for every trial
    grid:   {dotted.key: [v1, v2], ...}    # cartesian product
    search: grid | random | optuna         # default grid
    space:  {dotted.key: {loguniform: [lo, hi]} | {uniform: [lo, hi]} | {randint: [lo, hi]} | {choice: [...]}}
    num_samples: 8                         # random: samples of ``space`` (x grid); optuna: points (x seeds)
    search_seed: 0                         # random: the samples are drawn here, reproducibly
    scheduler: fifo | asha                 # asha: early stopping on val/<primary metric>
    asha: {grace_period: 2, reduction_factor: 2}
    smoke:  {dotted.key: value, ...}       # overrides applied by --smoke (tiny budget)
    smoke_grid: {dotted.key: [...]}        # the grid used by --smoke instead of ``grid``
    resources: {cpu: 1, gpu: 0.25}         # per trial (per worker when num_workers > 1)
    max_concurrent_trials: 2
    max_failures: 1                        # retries of a failed trial from its last checkpoint

Grid and random search resolve to an explicit trial list (what ``--dry-run`` prints and what Tune
runs). Optuna (TPE) proposes trials adaptively. Tune cannot combine it with a grid, so an optuna
declaration puts what it varies in ``space``, except seeds: ``grid: {seed: [0, 1, 2]}`` runs every point
Optuna suggests once per seed and gives Optuna the mean (service/repeat.py). Every resolved trial config is
built and validated (TrainConfig) on load: a bad key or value is a :class:`ConfigError` naming it.
"""
from __future__ import annotations

import copy
import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smear.configs import ConfigError, to_dict, unflatten
from trainables.config import make_config
from trainables.settings import get_setting
from trainables.ray_trainable import TRIAL_KEY

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
TOP_KEYS = ("description", "base", "grid", "search", "space", "num_samples", "search_seed", "scheduler", "asha",
            "smoke", "smoke_grid", "resources", "max_concurrent_trials", "max_failures")
RESOURCE_KEYS = ("cpu", "gpu")
SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("fifo", "asha")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
ASHA_KEYS = ("grace_period", "reduction_factor", "max_t")


@dataclass
class Trial:
    index: int
    overrides: dict[str, Any]   # what varies in this trial (dotted keys)
    config: dict[str, Any]      # full nested TrainConfig dict


@dataclass
class Sweep:
    name: str
    path: Path
    description: str
    trials: list[Trial]         # grid / random: every trial; optuna: example trials (the space's midpoints x seeds)
    resources: dict[str, float]
    max_concurrent_trials: int
    max_failures: int
    search: str = "grid"
    space: dict[str, dict] = field(default_factory=dict)
    num_samples: int = 1
    scheduler: str = "fifo"
    asha: dict[str, int] = field(default_factory=dict)
    base_config: dict[str, Any] = field(default_factory=dict)
    text: str = field(repr=False, default="")
    seeds: list[int] = field(default_factory=list)  # optuna: every suggested point runs once per seed

    @property
    def num_trials(self) -> int:
        if self.search == "optuna":
            return self.num_samples * max(1, len(self.seeds))
        return len(self.trials)

    @property
    def setting(self) -> str:
        return self.trials[0].config["setting"]

    @property
    def configs(self) -> list[dict[str, Any]] | None:
        """What a trial index refers to (None for Optuna, whose trials carry their config)."""
        return None if self.search == "optuna" else [t.config for t in self.trials]

    def asha_params(self) -> dict[str, int]:
        """ASHA's settings: time is in evaluations (``training_iteration``); max_t defaults to all of them."""
        first = self.trials[0].config
        max_t = self.asha.get("max_t", max(1, first["steps"] // first["eval_every"]) + 1)
        return {"max_t": max_t, "grace_period": self.asha.get("grace_period", 1),
                "reduction_factor": self.asha.get("reduction_factor", 2)}

    @property
    def metric(self) -> str:
        return f"val/best_{get_setting(self.setting).primary_metric}"  # in every report, eval and final


def available_sweeps() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def find_declaration(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p.resolve()
    cand = SPACES_DIR / f"{name_or_path}.yaml"
    if cand.is_file():
        return cand
    raise ConfigError(f"unknown sweep {name_or_path!r}; valid: {', '.join(available_sweeps())} (or a path to a .yaml file)")


def _mapping(decl: dict, key: str, where: str) -> dict:
    v = decl.get(key) or {}
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: {key!r} must be a mapping of dotted config keys, got {v!r}")
    return v


def _int(decl: dict, key: str, default: int, where: str, minimum: int = 0) -> int:
    v = decl.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{where}: {key}={v!r} must be an integer >= {minimum}")
    return v


def _choice(decl: dict, key: str, valid: tuple, where: str) -> str:
    v = decl.get(key, valid[0])
    if v not in valid:
        raise ConfigError(f"{where}: {key}={v!r} is not valid; valid: {', '.join(valid)}")
    return v


def _check_distribution(key: str, spec: Any, where: str) -> tuple[str, Any]:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: space.{key}={spec!r} must be one of {{{': ..., '.join(DISTRIBUTIONS)}: ...}}")
    kind, arg = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"{where}: space.{key}.choice must be a non-empty list, got {arg!r}")
        return kind, arg
    if (not isinstance(arg, list) or len(arg) != 2
            or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in arg) or not arg[0] < arg[1]):
        raise ConfigError(f"{where}: space.{key}.{kind} must be [low, high] with low < high, got {arg!r}")
    if kind == "loguniform" and arg[0] <= 0:
        raise ConfigError(f"{where}: space.{key}.loguniform needs low > 0, got {arg!r}")
    if kind == "randint" and not all(isinstance(a, int) for a in arg):
        raise ConfigError(f"{where}: space.{key}.randint needs integers, got {arg!r}")
    return kind, arg


def _sample(kind: str, arg: Any, rng: random.Random) -> Any:
    if kind == "choice":
        return rng.choice(arg)
    if kind == "uniform":
        return rng.uniform(*arg)
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(arg[0]), math.log(arg[1])))
    return rng.randrange(arg[0], arg[1])  # randint: [low, high), like tune.randint


def _midpoint(kind: str, arg: Any) -> Any:
    if kind == "choice":
        return arg[0]
    if kind == "loguniform":
        return math.sqrt(arg[0] * arg[1])
    if kind == "randint":
        return arg[0]
    return (arg[0] + arg[1]) / 2


def _build(flat: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return to_dict(make_config(unflatten(flat)))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_sweep(name_or_path: str, *, smoke: bool = False, num_samples: int | None = None) -> Sweep:
    """Load, validate and resolve a declaration."""
    path = find_declaration(name_or_path)
    where = path.name
    text = path.read_text()
    try:
        decl = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(decl, dict):
        raise ConfigError(f"{where}: a declaration is a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = sorted(set(decl) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(TOP_KEYS)}")
    base, grid, smoke_over = (_mapping(decl, k, where) for k in ("base", "grid", "smoke"))
    smoke_grid, space_decl = _mapping(decl, "smoke_grid", where), _mapping(decl, "space", where)
    for gname, g in (("grid", grid), ("smoke_grid", smoke_grid)):
        for k, vals in g.items():
            if not isinstance(vals, list) or not vals:
                raise ConfigError(f"{where}: {gname}.{k} must be a non-empty list, got {vals!r}")
    if smoke and smoke_grid:
        grid = smoke_grid
    search = _choice(decl, "search", SEARCHES, where)
    scheduler = _choice(decl, "scheduler", SCHEDULERS, where)
    num_samples = num_samples or _int(decl, "num_samples", 1, where, minimum=1)
    search_seed = _int(decl, "search_seed", 0, where)
    space = {k: _check_distribution(k, v, where) for k, v in space_decl.items()}
    if search == "grid" and space:
        raise ConfigError(f"{where}: 'space' needs search: random or optuna (search is grid)")
    if search != "grid" and not space:
        raise ConfigError(f"{where}: search: {search} needs a 'space' of distributions")
    seeds: list[int] = []
    if search == "optuna" and grid:
        extra = [k for k in grid if k != "seed"]
        if extra:
            raise ConfigError(f"{where}: search: optuna cannot be combined with a grid over {extra[0]!r} (Tune refuses "
                              f"it); only grid.seed is allowed, or put {extra[0]!r} in 'space' as a choice")
        if "seed" in space:
            raise ConfigError(f"{where}: seed is in both grid and space; keep grid.seed (every Optuna point runs once "
                              "per seed)")
        if scheduler == "asha":
            raise ConfigError(f"{where}: scheduler: asha with grid.seed would stop some seeds of an Optuna point early "
                              "and average what they reached; valid: scheduler: fifo with grid.seed, or seed in space")
        seeds = list(grid["seed"])
    asha = _mapping(decl, "asha", where)
    bad = sorted(set(asha) - set(ASHA_KEYS))
    if bad:
        raise ConfigError(f"{where}: unknown asha key {bad[0]!r}; valid: {', '.join(ASHA_KEYS)}")
    for k, v in asha.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{where}: asha.{k}={v!r} must be an integer >= 1")
    resources = _mapping(decl, "resources", where) or {"cpu": 1}
    bad = sorted(set(resources) - set(RESOURCE_KEYS))
    if bad:
        raise ConfigError(f"{where}: unknown resource {bad[0]!r}; valid: {', '.join(RESOURCE_KEYS)}")
    for k, v in resources.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"{where}: resources.{k}={v!r} must be a number >= 0")
    mct = _int(decl, "max_concurrent_trials", 0, where)
    mf = _int(decl, "max_failures", 1, where)

    smoke_over = smoke_over if smoke else {}
    fixed = {**base, **smoke_over}
    rng = random.Random(search_seed)
    samples: list[dict[str, Any]] = [{}]
    if search == "random":
        samples = [{k: _sample(kind, arg, rng) for k, (kind, arg) in space.items()} for _ in range(num_samples)]
    elif search == "optuna":  # example trials validate the space: its midpoints, every choice and both bounds
        samples = [{k: _midpoint(kind, arg) for k, (kind, arg) in space.items()}]
        for k, (kind, arg) in space.items():
            for v in arg:
                _build({**base, **samples[0], k: v, **smoke_over}, where)
    keys = list(grid)
    trials = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        for sample in samples:
            overrides = {**dict(zip(keys, combo)), **sample}
            cfg = _build({**base, **overrides, **smoke_over}, where)
            trials.append(Trial(len(trials), overrides, cfg))
    if not trials:
        raise ConfigError(f"{where}: the declaration resolves to no trials")
    sweep = Sweep(name=path.stem, path=path, description=str(decl.get("description", "")), trials=trials,
                  resources={k: float(v) for k, v in resources.items()}, max_concurrent_trials=mct, max_failures=mf,
                  search=search, space={k: {kind: arg} for k, (kind, arg) in space.items()}, num_samples=num_samples,
                  scheduler=scheduler, asha=asha, base_config=_build(fixed, where), text=text, seeds=seeds)
    if scheduler == "asha":
        a = sweep.asha_params()
        if a["grace_period"] > a["max_t"]:
            if not smoke:
                raise ConfigError(f"{where}: asha.grace_period={a['grace_period']} exceeds max_t={a['max_t']} "
                                  f"evaluations; valid: 1 to {a['max_t']}")
            sweep.asha["grace_period"] = a["max_t"]  # --smoke shrinks the budget: ASHA's first rung shrinks too
    return sweep


def param_space(sweep: Sweep) -> dict[str, Any]:
    """The Tune param space.

    grid / random: ``{"trial_index": grid_search([0, 1, ...])}`` into ``sweep.trials``, in order.
    optuna: the base config with Tune distributions at the ``space`` keys.
    """
    from ray import tune

    if sweep.search != "optuna":
        return {TRIAL_KEY: tune.grid_search([t.index for t in sweep.trials])}
    space = copy.deepcopy(sweep.base_config)
    make = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    for key, spec in sweep.space.items():
        (kind, arg), = spec.items()
        node = space
        *heads, last = key.split(".")
        for h in heads:
            node = node[h]
        node[last] = tune.choice(arg) if kind == "choice" else make[kind](*arg)
    return space
