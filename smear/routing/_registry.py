"""Registry of routing methods: one file per method, file name = registry key."""
from __future__ import annotations

from typing import Callable, TypeVar

_METHODS: dict[str, type] = {}
DEFAULT_METHOD = "smear"  # the paper's method: a config's default method, and the reference of comparisons
T = TypeVar("T", bound=type)


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: ``@register_method("smear")`` makes the method buildable by name."""

    def deco(cls: T) -> T:
        if name in _METHODS:
            raise ValueError(f"routing method {name!r} registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def available_methods() -> list[str]:
    """Sorted names of every registered routing method."""
    return sorted(_METHODS)


def get_method_class(name: str) -> type:
    """The method class for ``name``; unknown names fail with the list of valid ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown routing method {name!r}; valid: {', '.join(available_methods())}"
        ) from None


def method_params() -> list[type]:
    """Every registered method's ``Params`` dataclass, once each, in registration order."""
    out: list[type] = []
    for cls in _METHODS.values():
        p = getattr(cls, "Params", None)
        if p is not None and p not in out:
            out.append(p)
    return out
