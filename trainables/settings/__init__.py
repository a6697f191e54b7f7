"""The setting registry, in the style of timm's model registry: one module per setting in this folder,
each registering a :class:`Setting` subclass with :func:`register_setting`.

Adding a setting = one module here (plus its data and backbone code in ``smear/``) and one test:
the launcher, the train loop, the tracker and the report ask this registry and name no setting.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, TypeVar

from smear.configs import ConfigError, build
from trainables.config import TrainConfig
from trainables.settings._base import Batch, Setting

_SETTINGS: dict[str, type[Setting]] = {}
S = TypeVar("S", bound=type[Setting])
DEFAULT_SETTING = "resnet_domainnet"  # what a config without ``setting`` means


def register_setting(cls: S) -> S:
    """Class decorator: makes ``cls`` buildable by ``cls.name``."""
    if cls.name in _SETTINGS:
        raise ValueError(f"setting {cls.name!r} registered twice")
    _SETTINGS[cls.name] = cls
    return cls


def available_settings() -> list[str]:
    return sorted(_SETTINGS)


def get_setting(name: str) -> type[Setting]:
    """The setting class for ``name``; an unknown name is a one-line ConfigError listing the valid ones."""
    try:
        return _SETTINGS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"setting={name!r} is not valid; valid: {', '.join(available_settings())}") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_config(values: dict[str, Any] | TrainConfig | None = None) -> TrainConfig:
    """The one way to build a trial's config: its setting's typed config class (this registry), the setting's
    paper defaults, then ``values``, validated."""
    if isinstance(values, TrainConfig):
        return values
    values = dict(values or {})
    setting = get_setting(values.get("setting", DEFAULT_SETTING))
    return build(setting.config_class, _merge({**setting.defaults, "setting": setting.name}, values))


for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Batch", "Setting", "DEFAULT_SETTING", "available_settings", "get_setting", "make_config", "register_setting"]
