"""Typed, validated configs: dataclasses built from plain dicts, bad keys and values named in the error.

Each config field may carry metadata: ``choices`` (allowed values), ``ge``/``gt``/``le`` (numeric
bounds) and ``doc``. :func:`build` is the single entry point from untyped input (CLI, YAML) to a
typed config; it raises :class:`ConfigError` with a one-line message naming the offending value.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line and names the value and the valid choices."""


def field(default: Any, *, choices: tuple | None = None, ge: float | None = None, gt: float | None = None,
          le: float | None = None, doc: str = "") -> Any:
    """A dataclass field with validation metadata."""
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "doc": doc}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}={value!r} has the wrong type; expected {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}={value!r} is not valid; valid: {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} has the wrong type; expected a list")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} has the wrong type; expected a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} has the wrong type; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r} has the wrong type; expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r} has the wrong type; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} has the wrong type; expected a string")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} has the wrong type; expected a mapping")
        return build(tp, value, prefix=f"{where}.")
    return value


def build(cls: type[T], values: dict[str, Any] | None = None, *, prefix: str = "") -> T:
    """Build ``cls`` from ``values`` (defaults for what is missing), validating every key and value."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!r}; valid keys: {', '.join(fields)}")  # declared order
    kwargs = {}
    for name, f in fields.items():
        if name not in values:
            continue
        where = f"{prefix}{name}"
        v = _check_type(values[name], hints[name], where)
        m = f.metadata
        if m.get("choices") is not None and v not in m["choices"]:
            raise ConfigError(f"{where}={v!r} is not valid; valid: {', '.join(map(str, m['choices']))}")
        if isinstance(v, float) and not math.isfinite(v):  # .nan / .inf pass every comparison below
            raise ConfigError(f"{where}={v!r} is not a finite number; valid: a finite number")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if m.get("ge") is not None and v < m["ge"]:
                raise ConfigError(f"{where}={v!r} is out of range; must be >= {m['ge']}")
            if m.get("gt") is not None and v <= m["gt"]:
                raise ConfigError(f"{where}={v!r} is out of range; must be > {m['gt']}")
            if m.get("le") is not None and v > m["le"]:
                raise ConfigError(f"{where}={v!r} is out of range; must be <= {m['le']}")
        kwargs[name] = v
    obj = cls(**kwargs)
    post = getattr(obj, "validate", None)
    if callable(post):
        post()
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``: the form logged as MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(d: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1} -> {"a": {"b": 1}}``: dotted keys of a search space into nested config dicts. A key may be
    written dotted or nested (``data.resolution: 16`` or ``data: {resolution: 16}``), and spellings merge; a
    value given twice, in two spellings, is refused (one line naming both)."""
    out: dict[str, Any] = {}
    written: dict[tuple[str, ...], str] = {}  # each leaf's path -> the key that wrote it
    for k, v in d.items():
        for path, leaf in leaves(tuple(k.split(".")), v):
            clash = next((p for p in written if p[:len(path)] == path or path[:len(p)] == p), None)
            if clash is not None:
                raise ConfigError(f"key {'.'.join(path)!r} is given twice (as {written[clash]!r} and {k!r}); "
                                  "valid: each key once, dotted or nested")
            written[path] = k
            cur = out
            for h in path[:-1]:
                cur = cur.setdefault(h, {})
            cur[path[-1]] = leaf
    return out


def leaves(path: tuple[str, ...], value: Any):
    """(path, value) of each leaf under ``path``: a non-empty mapping is its keys' leaves (dotted keys split)."""
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        for k, v in value.items():
            yield from leaves((*path, *k.split(".")), v)
    else:
        yield path, value
