"""Search-space declarations (``search_spaces/<name>.yaml``): load, validate, resolve into trials.

A declaration states only what differs from the TrainConfig defaults:

    description: one line
    base:   {dotted.key: value, ...}     # fixed overrides for every trial
    grid:   {dotted.key: [v1, v2], ...}  # cartesian product = the trials
    smoke:  {dotted.key: value, ...}     # overrides applied by --smoke (tiny budget)
    smoke_grid: {dotted.key: [...]}      # the grid used by --smoke instead of ``grid`` (optional)
    resources: {cpu: 1, gpu: 0}          # per trial (per worker when num_workers > 1)
    max_concurrent_trials: 2
    max_failures: 1                      # retries of a failed trial from its last checkpoint

Every trial's config is built and validated (TrainConfig) on load: a bad key or value is a
:class:`smear.configs.ConfigError` naming it, before anything starts.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smear.configs import ConfigError, to_dict, unflatten
from trainables.config import make_config

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
TOP_KEYS = ("description", "base", "grid", "smoke", "smoke_grid", "resources", "max_concurrent_trials", "max_failures")
RESOURCE_KEYS = ("cpu", "gpu")


@dataclass
class Trial:
    index: int
    overrides: dict[str, Any]   # the grid values of this trial (dotted keys)
    config: dict[str, Any]      # full nested TrainConfig dict


@dataclass
class Sweep:
    name: str
    path: Path
    description: str
    trials: list[Trial]
    resources: dict[str, float]
    max_concurrent_trials: int
    max_failures: int
    text: str = field(repr=False, default="")


def param_space(sweep: Sweep) -> dict[str, Any]:
    """The Tune param space: the first trial's config with ``tune.grid_search`` at every grid key.

    Tune's cartesian product over those keys is exactly ``sweep.trials`` (values taken from the
    validated trial configs, so types are already normalised).
    """
    import copy

    from ray import tune

    space = copy.deepcopy(sweep.trials[0].config)
    for key in sweep.trials[0].overrides:
        path = key.split(".")
        values = []
        for t in sweep.trials:
            v = t.config
            for p in path:
                v = v[p]
            if v not in values:
                values.append(v)
        node = space
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = tune.grid_search(values)
    return space


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


def _mapping(decl: dict, key: str) -> dict:
    v = decl.get(key) or {}
    if not isinstance(v, dict):
        raise ConfigError(f"{key!r} must be a mapping of dotted config keys, got {v!r}")
    return v


def load_sweep(name_or_path: str, *, smoke: bool = False) -> Sweep:
    """Load, validate and resolve a declaration into its trials."""
    path = find_declaration(name_or_path)
    text = path.read_text()
    try:
        decl = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path.name}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(decl, dict):
        raise ConfigError(f"{path.name}: a declaration is a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = sorted(set(decl) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{path.name}: unknown key {unknown[0]!r}; valid keys: {', '.join(TOP_KEYS)}")
    base, grid, smoke_over = _mapping(decl, "base"), _mapping(decl, "grid"), _mapping(decl, "smoke")
    smoke_grid = _mapping(decl, "smoke_grid")
    for gname, g in (("grid", grid), ("smoke_grid", smoke_grid)):
        for k, vals in g.items():
            if not isinstance(vals, list) or not vals:
                raise ConfigError(f"{path.name}: {gname}.{k} must be a non-empty list, got {vals!r}")
    if smoke and smoke_grid:
        grid = smoke_grid
    resources = _mapping(decl, "resources") or {"cpu": 1}
    bad = sorted(set(resources) - set(RESOURCE_KEYS))
    if bad:
        raise ConfigError(f"{path.name}: unknown resource {bad[0]!r}; valid: {', '.join(RESOURCE_KEYS)}")
    for k, v in resources.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"{path.name}: resources.{k}={v!r} must be a number >= 0")
    mct = decl.get("max_concurrent_trials", 0)
    mf = decl.get("max_failures", 1)
    for key, v in (("max_concurrent_trials", mct), ("max_failures", mf)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{path.name}: {key}={v!r} must be an integer >= 0")

    keys = list(grid)
    trials = []
    for i, combo in enumerate(itertools.product(*(grid[k] for k in keys))):
        overrides = dict(zip(keys, combo))
        flat = {**base, **overrides, **(smoke_over if smoke else {})}
        try:
            cfg = make_config(unflatten(flat))
        except ConfigError as e:
            raise ConfigError(f"{path.name}: {e}") from None
        trials.append(Trial(i, overrides, to_dict(cfg)))
    if not trials:
        raise ConfigError(f"{path.name}: the grid resolves to no trials")
    return Sweep(name=path.stem, path=path, description=str(decl.get("description", "")), trials=trials,
                 resources={k: float(v) for k, v in resources.items()}, max_concurrent_trials=mct,
                 max_failures=mf, text=text)
