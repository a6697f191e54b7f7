"""Search-space declarations (``search_spaces/<name>.yaml``): load, validate, resolve into trials.

The schema (keys, types, cross-field rules, the distribution vocabulary) is :mod:`service.declaration`.
Grid and random search resolve to an explicit trial list (what ``--dry-run`` prints and what Tune
runs). Optuna (TPE) proposes trials adaptively. Tune cannot combine it with a grid, so an optuna
declaration puts what it varies in ``space``, except seeds: ``grid: {seed: [0, 1, 2]}`` runs every point
Optuna suggests once per seed and gives Optuna the mean (service/repeat.py). Every resolved trial config is
built and validated (its setting's TrainConfig) on load: a bad key or value is a :class:`ConfigError`.
``--smoke`` applies the setting's offline smoke profile (``Setting.smoke``), then the declaration's
``smoke`` block, and uses ``smoke_grid`` when there is one.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from service.declaration import Declaration, Distribution, check_trial_count, expand_grid, parse_declaration
from smear.configs import ConfigError, to_dict, unflatten
from smear.routing import available_methods
from trainables.settings import make_config
from trainables.settings import DEFAULT_SETTING, available_settings, get_setting
from trainables.identity import TRIAL_KEY, SweepTrials

METHOD_KEY, SEED_KEY = "routing.method", "seed"  # the grid keys of a comparison over seeds (--until-decided)
SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"


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
    resources: dict[str, dict[str, float]]  # setting -> {cpu, gpu} per trial (per worker)
    max_concurrent_trials: int | None  # None: as many as the cluster fits
    max_failures: int
    search: str = "grid"
    space: dict[str, Distribution] = field(default_factory=dict)
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

    def identity(self) -> SweepTrials:
        """The trials' one identity (``trainables.identity``): Tune's config -> config and resources. Make it once
        the resources are final (after the flags' overrides) and share it."""
        return SweepTrials(self.configs, self.resources)

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
    """A shipped declaration by name, or a .yaml file by path; anything else (a path the file system cannot
    even look up: too long, a NUL) is an unknown sweep."""
    with contextlib.suppress(OSError, ValueError):
        p = Path(name_or_path)
        if p.suffix in (".yaml", ".yml") and p.is_file():
            return p.resolve()
        cand = SPACES_DIR / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    raise ConfigError(f"unknown sweep {name_or_path!r}; valid: {', '.join(available_sweeps())} (or a path to a .yaml file)")


def _build(flat: dict[str, Any]) -> dict[str, Any]:
    return to_dict(make_config(unflatten(flat)))


def _setting_of(flat: dict[str, Any]) -> str:
    return flat.get("setting", DEFAULT_SETTING)


MAX_YAML_NODES = 100_000  # a declaration is small: more nodes means an alias bomb, not a sweep
MAX_YAML_DEPTH = 32       # mappings and lists nested deeper than this are not a declaration
MAX_DECLARATION_BYTES = 1 << 20


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last silently)
    and a document that expands past MAX_YAML_NODES nodes (aliases referring to aliases)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                raise ConfigError(f"key {key!r} (line {key_node.start_mark.line + 1}) is a {type(key).__name__}; "
                                  "valid: keys written as text (names, dotted names)")
            if key in seen:
                raise ConfigError(f"key {key!r} is written twice (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}); valid: each key once")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _count_nodes(root) -> None:
    """Refuse a document that expands past MAX_YAML_NODES nodes (each alias expansion counted, as a consumer
    would walk it) or nests deeper than MAX_YAML_DEPTH (iterative: any depth is measured, none overflows)."""
    budget, todo = MAX_YAML_NODES, [(root, 1)]
    while todo:
        node, depth = todo.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(f"the declaration expands to more than {MAX_YAML_NODES:,} YAML nodes (aliases of "
                              "aliases?); valid: a declaration without alias expansion")
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"the declaration nests deeper than {MAX_YAML_DEPTH} levels (line "
                              f"{node.start_mark.line + 1}); valid: at most {MAX_YAML_DEPTH}")
        for child in node.value if isinstance(node.value, list) else []:
            todo += [(n, depth + 1) for n in (child if isinstance(child, tuple) else (child,))]


def load_yaml(text: str):
    """Parse a declaration strictly (see :class:`_StrictLoader`); {} for an empty document. A syntax error is a
    ConfigError naming its line and column."""
    try:
        return _load(text)
    except RecursionError:  # the composer recurses per level: nesting past Python's stack
        raise ConfigError(f"the declaration nests deeper than {MAX_YAML_DEPTH} levels; valid: at most "
                          f"{MAX_YAML_DEPTH}") from None
    except yaml.MarkedYAMLError as e:
        raise ConfigError(f"not valid YAML at {_where(e)}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:  # the reader's (a character YAML does not allow) and any other
        raise ConfigError(f"not valid YAML ({str(e).splitlines()[0]})") from None


def _load(text: str):
    loader = _StrictLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return {}
        _count_nodes(root)
        return loader.construct_document(root)
    finally:
        loader.dispose()


def _where(e: yaml.MarkedYAMLError) -> str:
    mark = e.problem_mark or e.context_mark
    return "an unknown position" if mark is None else f"line {mark.line + 1}, column {mark.column + 1}"


def read_declaration(path: Path) -> str:
    """The declaration file's text: UTF-8 (a BOM allowed), at most MAX_DECLARATION_BYTES, else one line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({e.strerror}); valid: a readable declaration file") from None
    if len(data) > MAX_DECLARATION_BYTES:
        raise ConfigError(f"{path.name} is {len(data):,} bytes; valid: a declaration of at most "
                          f"{MAX_DECLARATION_BYTES:,} bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path.name} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); valid: a "
                          "YAML file in UTF-8") from None


def load_sweep(name_or_path: str, *, smoke: bool = False, num_samples: int | None = None,
               seeds: list[int] | None = None, methods: list[str] | None = None) -> Sweep:
    """Load, validate and resolve a declaration; any problem is one ConfigError line naming the file.

    ``seeds`` replaces the grid's seeds (``launch.py --extend``: the same grid at new seeds); ``methods`` keeps
    only those of the grid's ``routing.method`` (``--until-decided``: a round of the undecided comparisons)."""
    path = find_declaration(name_or_path)
    text = read_declaration(path)
    try:
        raw = load_yaml(text)
        if not raw:
            raise ConfigError("the declaration is empty; valid: at least a description and a base or grid "
                              "(an empty one would run the paper's full defaults)")
        return _resolve(path, text, parse_declaration(raw), smoke=smoke, num_samples=num_samples, seeds=seeds,
                        methods=methods)
    except ConfigError as e:
        raise ConfigError(f"{path.name}: {e}") from None


def _resolve(path: Path, text: str, decl: Declaration, *, smoke: bool, num_samples: int | None,
             seeds: list[int] | None = None, methods: list[str] | None = None) -> Sweep:
    grid = expand_grid(decl.smoke_grid if smoke and decl.smoke_grid else decl.grid, available_methods())
    if methods is not None:
        if METHOD_KEY not in grid:
            raise ConfigError(f"a method filter needs {METHOD_KEY} in the grid (--until-decided)")
        grid = {**grid, METHOD_KEY: [m for m in grid[METHOD_KEY] if m in methods]}
    if seeds is not None:
        if decl.search == "optuna":
            raise ConfigError("--seeds (--extend) needs search: grid or random; an optuna sweep's points are "
                              "its own (run a new sweep with more grid.seed)")
        if "seed" in decl.space:
            raise ConfigError("--seeds (--extend) needs the seed in grid, not in space")
        grid = {**grid, "seed": list(seeds)}
    if num_samples is not None and decl.search == "grid":
        raise ConfigError(f"--num-samples={num_samples} needs search: random or optuna (the declaration's search is "
                          "grid: the grid alone sets the trials)")
    num_samples = num_samples or decl.num_samples
    check_trial_count(grid, num_samples, decl.search)
    space = decl.distributions()
    seeds = list(grid.get("seed", [])) if decl.search == "optuna" else []

    def fixed(overrides: dict[str, Any]) -> dict[str, Any]:
        """base, then what varies, then (--smoke) the setting's offline profile and the declaration's smoke."""
        flat = {**decl.base, **overrides}
        if smoke:
            flat = {**flat, **get_setting(_setting_of(flat)).smoke, **decl.smoke}
        return flat

    rng = random.Random(decl.search_seed)
    samples: list[dict[str, Any]] = [{}]
    if decl.search == "random":
        samples = [{k: d.sample(rng) for k, d in space.items()} for _ in range(num_samples)]
    elif decl.search == "optuna":  # example trials validate the space: its midpoints, every choice and both bounds
        samples = [{k: d.examples()[0] for k, d in space.items()}]
        for k, d in space.items():
            for v in d.examples()[1:]:
                _build(fixed({**samples[0], k: v}))
    # seed-major: every other combination at the first seed, then at the next, ... so that the first
    # results of a sweep (Tune runs the grid in this order) cover every method
    keys = sorted(grid, key=lambda k: k != "seed")
    trials = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        for sample in samples:
            chosen = dict(zip(keys, combo))
            overrides = {**{k: chosen[k] for k in grid}, **sample}  # shown in the declaration's key order
            cfg = _build(fixed(overrides))
            trials.append(Trial(len(trials), overrides, cfg))
    if not trials:
        raise ConfigError("the declaration resolves to no trials")
    if decl.search != "optuna":
        _refuse_identical(trials)
    settings = available_settings()
    resources = {t.config["setting"]: decl.resources_for(t.config["setting"], settings) for t in trials}
    sweep = Sweep(name=path.stem, path=path, description=decl.description, trials=trials,
                  resources={k: dataclasses.asdict(r) for k, r in resources.items()},
                  max_concurrent_trials=decl.max_concurrent_trials, max_failures=decl.max_failures,
                  search=decl.search, space=space, num_samples=num_samples, scheduler=decl.scheduler,
                  asha={k: v for k, v in dataclasses.asdict(decl.asha).items() if v}, base_config=_build(fixed({})),
                  text=text, seeds=seeds)
    if decl.scheduler == "asha":
        a = sweep.asha_params()
        if a["grace_period"] > a["max_t"]:
            if not smoke:
                raise ConfigError(f"asha.grace_period={a['grace_period']} exceeds max_t={a['max_t']} "
                                  f"evaluations; valid: 1 to {a['max_t']}")
            sweep.asha["grace_period"] = a["max_t"]  # --smoke shrinks the budget: ASHA's first rung shrinks too
        _check_asha(sweep.asha_params())  # and by Tune's own rules
    return sweep


def _check_asha(params: dict[str, int]) -> None:
    """ASHA's settings by Ray Tune's own rules: the scheduler is built here, before anything starts."""
    from ray.tune.schedulers import ASHAScheduler

    try:
        ASHAScheduler(time_attr="training_iteration", metric="m", mode="max", **params)
    except (AssertionError, ValueError, TypeError) as e:
        raise ConfigError(f"asha {params} is refused by Ray Tune ({str(e) or type(e).__name__}); valid: "
                          "grace_period >= 1, reduction_factor >= 2, max_t >= grace_period") from None


def _refuse_identical(trials: list[Trial]) -> None:
    """Two trials with the same resolved config would run the same thing twice (e.g. ``smoke`` fixing a key
    the grid varies, or random draws of a ``choice`` space that repeat)."""
    import json

    seen: dict[str, Trial] = {}
    for t in trials:
        key = json.dumps(t.config, sort_keys=True, default=str)
        if key in seen:
            a = seen[key]
            raise ConfigError(f"trials {a.index} and {t.index} are identical "
                              f"({' '.join(f'{k}={v}' for k, v in t.overrides.items())} resolves like "
                              f"{' '.join(f'{k}={v}' for k, v in a.overrides.items())}); valid: distinct trials "
                              "(what varies must not be fixed again by smoke, and a random space needs draws that differ)")
        seen[key] = t


def param_space(sweep: Sweep) -> dict[str, Any]:
    """The Tune param space.

    grid / random: ``{"trial_index": grid_search([0, 1, ...])}`` into ``sweep.trials``, in order (the
    random samples are drawn once, in the driver, reproducibly). optuna: the base config with each
    distribution's Tune object (:meth:`Distribution.to_tune`) at its ``space`` key.
    """
    from ray import tune

    if sweep.search != "optuna":
        return {TRIAL_KEY: tune.grid_search([t.index for t in sweep.trials])}
    space = copy.deepcopy(sweep.base_config)
    for key, dist in sweep.space.items():
        node = space
        *heads, last = key.split(".")
        for h in heads:
            node = node[h]
        node[last] = dist.to_tune()
    return space
