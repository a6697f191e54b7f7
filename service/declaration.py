"""The typed schema of a sweep declaration (``search_spaces/<name>.yaml``), validated by the same machinery
as a trial's config (``smear.configs.build``), and the one mapping from its distribution vocabulary to
samples, midpoints and Tune's search space.

    description: one line
    base:   {dotted.key: value, ...}       # fixed overrides for every trial
    grid:   {dotted.key: [v1, v2], ...}    # cartesian product; routing.method: all (or a glob, "smear*")
    search: grid | random | optuna         # default grid
    space:  {dotted.key: {loguniform: [lo, hi]} | {uniform: [lo, hi]} | {randint: [lo, hi]} | {choice: [...]}}
    num_samples: 8                         # random: samples of ``space`` (x grid); optuna: points (x seeds)
    search_seed: 0                         # random: the samples are drawn here, reproducibly
    scheduler: fifo | asha                 # asha: early stopping on val/<primary metric>
    asha: {grace_period: 2, reduction_factor: 2}
    smoke:  {dotted.key: value, ...}       # --smoke: over the setting's offline smoke profile (a tiny budget)
    smoke_grid: {dotted.key: [...]}        # the grid used by --smoke instead of ``grid``
    resources: {cpu: 1, gpu: 0.25}         # per trial (per worker when num_workers > 1), or per setting:
                                           # {t5_glue: {cpu: 8, gpu: 1}, resnet_domainnet: {cpu: 4, gpu: 0.25}}
    max_concurrent_trials: 2
    max_failures: 1                        # retries of a failed trial from its last checkpoint
"""
from __future__ import annotations

import fnmatch
import math
import random
from dataclasses import dataclass, field as dc_field
from typing import Any

from smear.configs import ConfigError, build, field, leaves

SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("fifo", "asha")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")


@dataclass
class Resources:
    cpu: float = field(1.0, ge=0.0, doc="CPUs per trial (per worker when num_workers > 1)")
    gpu: float = field(0.0, ge=0.0, doc="GPUs per trial (per worker); 0.25 packs four trials on a GPU")


@dataclass
class Asha:
    grace_period: int = field(1, ge=1)
    reduction_factor: int = field(2, ge=1)
    max_t: int = field(0, ge=0, doc="evaluations; 0 = all of a trial's evaluations")


@dataclass(frozen=True)
class Distribution:
    """One ``space`` entry: ``{kind: arg}`` of the YAML vocabulary, and what each search does with it."""

    kind: str
    arg: Any

    @classmethod
    def parse(cls, key: str, spec: Any) -> "Distribution":
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"space.{key}={spec!r} must be one of {{{': ..., '.join(DISTRIBUTIONS)}: ...}}")
        kind, arg = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(arg, list) or not arg:
                raise ConfigError(f"space.{key}.choice must be a non-empty list, got {arg!r}")
            return cls(kind, list(arg))
        if (not isinstance(arg, list) or len(arg) != 2
                or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in arg) or not arg[0] < arg[1]):
            raise ConfigError(f"space.{key}.{kind} must be [low, high] with low < high, got {arg!r}")
        if kind == "loguniform" and arg[0] <= 0:
            raise ConfigError(f"space.{key}.loguniform needs low > 0, got {arg!r}")
        if kind == "randint" and not all(isinstance(a, int) for a in arg):
            raise ConfigError(f"space.{key}.randint needs integers, got {arg!r}")
        return cls(kind, list(arg))

    def sample(self, rng: random.Random) -> Any:
        """Random search's draw (the same distributions as Tune's)."""
        if self.kind == "choice":
            return rng.choice(self.arg)
        if self.kind == "uniform":
            return rng.uniform(*self.arg)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(self.arg[0]), math.log(self.arg[1])))
        return rng.randrange(self.arg[0], self.arg[1])  # randint: [low, high), like tune.randint

    def examples(self) -> list[Any]:
        """Values that validate the space before Optuna runs: the midpoint first, then every choice / bound."""
        lo, hi = self.arg[0], self.arg[-1]
        if self.kind == "loguniform":
            mid = math.sqrt(lo * hi)
        elif self.kind == "uniform":
            mid = (lo + hi) / 2
        else:  # choice, randint: the first value
            mid = lo
        return [mid, *self.arg]

    def to_tune(self):
        """Tune's search-space object (Optuna reads it through OptunaSearch)."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(self.arg)
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](*self.arg)


@dataclass
class Declaration:
    description: str = field("", doc="one line, shown in --dry-run and on the sweep's parent run")
    base: dict = field({}, doc="dotted trial-config keys fixed for every trial")
    grid: dict = field({}, doc="dotted keys -> lists; the cartesian product")
    search: str = field("grid", choices=SEARCHES)
    space: dict = field({}, doc="dotted keys -> distributions (random / optuna)")
    num_samples: int = field(1, ge=1)
    search_seed: int = field(0, ge=0)
    scheduler: str = field("fifo", choices=SCHEDULERS)
    asha: Asha = dc_field(default_factory=Asha)
    smoke: dict = field({}, doc="--smoke overrides, over the setting's smoke profile")
    smoke_grid: dict = field({}, doc="the grid of --smoke")
    resources: dict = field({}, doc="{cpu, gpu}, or per setting: {setting: {cpu, gpu}}")
    max_concurrent_trials: int | None = field(None, ge=1, doc="left out = as many as the cluster fits")
    max_failures: int = field(1, ge=0)

    def validate(self) -> None:
        for gname in ("grid", "smoke_grid"):
            for k, vals in getattr(self, gname).items():
                if k == "routing.method" and isinstance(vals, str):
                    continue  # "all" or a glob, expanded by expand_grid
                if not isinstance(vals, list) or not vals:
                    raise ConfigError(f"{gname}.{k} must be a non-empty list, got {vals!r}")
        for gname in ("grid", "smoke_grid"):
            for k, vals in getattr(self, gname).items():
                if isinstance(vals, list):
                    dup = next((v for i, v in enumerate(vals) if v in vals[:i]), None)
                    if dup is not None:
                        raise ConfigError(f"{gname}.{k} has {dup!r} twice; valid: distinct values (each trial differs)")
        for gname in ("grid", "smoke_grid", "space"):
            over = next((k for k in getattr(self, gname) if k in self.base), None)
            if over is not None:
                raise ConfigError(f"base.{over} is overridden by {gname}.{over}; valid: set it in one place")
        over = next((k for k in self.space if k in self.grid), None)
        if over is not None:
            raise ConfigError(f"grid.{over} is overridden by space.{over}; valid: set it in one place")
        if self.search == "grid" and not self.grid and "seed" not in self.base:
            raise ConfigError("grid is empty: the sweep would be one trial at the default seed; valid: list the "
                              "seeds, e.g. grid: {seed: [0, 1, 2]} (or state one in base.seed)")
        if self.search == "grid" and self.num_samples != 1:
            raise ConfigError(f"num_samples={self.num_samples} needs search: random or optuna (search is grid: "
                              "the grid alone sets the trials)")
        if self.search == "grid" and self.space:
            raise ConfigError("'space' needs search: random or optuna (search is grid)")
        if self.search != "grid" and not self.space:
            raise ConfigError(f"search: {self.search} needs a 'space' of distributions")
        for k, spec in self.space.items():
            Distribution.parse(k, spec)
        if self.search == "optuna" and "seed" in self.space:  # Optuna would tune the seed as a hyper-parameter
            raise ConfigError("space.seed: an Optuna search would tune the seed like a hyper-parameter; valid: "
                              "grid.seed (every Optuna point runs once per seed)")
        if self.search == "optuna" and self.grid:
            extra = [k for k in self.grid if k != "seed"]
            if extra:
                raise ConfigError(f"search: optuna cannot be combined with a grid over {extra[0]!r} (Tune refuses "
                                  f"it); only grid.seed is allowed, or put {extra[0]!r} in 'space' as a choice")
            if "seed" in self.space:
                raise ConfigError("seed is in both grid and space; keep grid.seed (every Optuna point runs once per seed)")
            if self.scheduler == "asha":
                raise ConfigError("scheduler: asha with grid.seed would stop some seeds of an Optuna point early "
                                  "and average what they reached; valid: scheduler: fifo with grid.seed")

    def distributions(self) -> dict[str, Distribution]:
        return {k: Distribution.parse(k, v) for k, v in self.space.items()}

    def resources_for(self, setting: str, settings: list[str]) -> Resources:
        """The resources of a trial of ``setting``: the flat {cpu, gpu} form, or the setting's own entry."""
        r = self.resources
        if r and all(isinstance(v, dict) for v in r.values()):
            bad = sorted(set(r) - set(settings))
            if bad:
                raise ConfigError(f"resources has unknown setting {bad[0]!r}; valid: {', '.join(settings)}")
            return _resources(r.get(setting, {}), f"resources.{setting}.")
        return _resources(r, "resources.")


def _resources(values: dict, prefix: str) -> Resources:
    bad = sorted(set(values) - {"cpu", "gpu"})
    if bad:
        raise ConfigError(f"unknown resource {bad[0]!r}; valid: cpu, gpu")
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"{prefix}{k}={v!r} must be a number >= 0")
    return build(Resources, {k: float(v) for k, v in values.items()}, prefix=prefix)


def parse_declaration(decl: Any) -> Declaration:
    """The typed declaration of a parsed YAML mapping; ConfigError (one line) naming what is wrong."""
    if not isinstance(decl, dict):
        raise ConfigError(f"a declaration is a mapping with keys {', '.join(Declaration.__dataclass_fields__)}")
    for key in ("base", "grid", "space", "smoke", "smoke_grid", "asha", "resources"):
        if decl.get(key) is not None and not isinstance(decl[key], dict):
            raise ConfigError(f"{key!r} must be a mapping of dotted config keys, got {decl[key]!r}")
    values = {k: v for k, v in decl.items() if v is not None}
    for key in ("base", "smoke"):  # one spelling, dotted: a key given both dotted and nested is refused here
        if key in values:
            values[key] = _dotted(values[key], key)
    if "asha" in values:
        bad = sorted(set(values["asha"]) - set(Asha.__dataclass_fields__))
        if bad:
            raise ConfigError(f"unknown asha key {bad[0]!r}; valid: {', '.join(Asha.__dataclass_fields__)}")
    for key in ("num_samples", "search_seed", "max_concurrent_trials", "max_failures"):
        v, low = values.get(key), Declaration.__dataclass_fields__[key].metadata["ge"]
        if key in values and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            hint = "; leave it out for as many as the cluster fits" if key == "max_concurrent_trials" else ""
            raise ConfigError(f"{key}={v!r} must be an integer >= {low:g}{hint}")
    return build(Declaration, values)


def _dotted(mapping: dict, where: str) -> dict:
    """``mapping`` with nested config sections written as dotted keys (``data: {resolution: 16}`` ->
    ``data.resolution: 16``); a key given twice in two spellings is a one-line ConfigError."""
    out: dict = {}
    spelled: dict[str, str] = {}  # dotted key -> how the declaration wrote it
    for top, section in mapping.items():
        for path, value in leaves(tuple(top.split(".")), section):
            key = ".".join(path)
            how = top if key == top else f"{top}: {{...}}"
            clash = next((k for k in out if k == key or k.startswith(f"{key}.") or key.startswith(f"{k}.")), None)
            if clash is not None:
                raise ConfigError(f"{where}.{key} is given twice (as {spelled[clash]!r} and as {how!r}); valid: each "
                                  "key once, dotted or nested")
            out[key], spelled[key] = value, how
    return out


MAX_TRIALS = 10_000  # more is a typo (a list pasted twice, a stray range), not a sweep anyone meant to run


def check_trial_count(grid: dict[str, list], num_samples: int, search: str) -> int:
    """The number of trials ``grid`` (expanded) and ``num_samples`` resolve to, refused above MAX_TRIALS
    before any trial config is built."""
    n = 1
    for vals in grid.values():
        n *= len(vals)
    if search != "grid":
        n *= num_samples
    if n > MAX_TRIALS:
        shape = " x ".join([*(f"{len(v)} {k}" for k, v in grid.items()),
                            *([f"{num_samples} samples"] if search != "grid" else [])])
        raise ConfigError(f"the declaration resolves to {n:,} trials ({shape}); valid: at most {MAX_TRIALS:,}")
    return n


def expand_grid(grid: dict[str, Any], methods: list[str]) -> dict[str, list]:
    """``routing.method: all`` (or a glob such as ``"smear*"``, alone or in a list) -> the registered names."""
    out = dict(grid)
    vals = grid.get("routing.method")
    if vals is None:
        return out
    expanded: list[str] = []
    for v in ([vals] if isinstance(vals, str) else vals):
        if v == "all":
            hits = list(methods)
        elif isinstance(v, str) and any(c in v for c in "*?["):
            hits = [m for m in methods if fnmatch.fnmatchcase(m, v)]
            if not hits:
                raise ConfigError(f"grid: routing.method pattern {v!r} matches no method; valid: {', '.join(methods)}")
        else:
            hits = [v]
        expanded += [m for m in hits if m not in expanded]
    out["routing.method"] = expanded
    return out
