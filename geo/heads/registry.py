"""The head registry: ``register_head`` (a class decorator), ``head_class``, ``create_head``, ``list_heads``.

Head modules import this module, and ``geo.heads`` imports the head modules,
so that importing ``geo.heads`` registers every built-in head.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from geo.errors import ConfigError
from geo.heads.base import Head

_REGISTRY: dict[str, type[Head]] = {}


def register_head(name: str) -> Callable[[type[Head]], type[Head]]:
    """Class decorator registering a head under ``name``; a duplicate name raises ValueError."""

    def decorator(cls: type[Head]) -> type[Head]:
        if name in _REGISTRY:
            raise ValueError(f"head name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_heads() -> list[str]:
    """Names of the registered heads, sorted."""
    return sorted(_REGISTRY)


def head_class(name: str) -> type[Head]:
    """The class registered as ``name``; ConfigError listing the known heads otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown head {name!r}; known heads: {', '.join(list_heads())}")
    return _REGISTRY[name]


def create_head(name: str, *, feature_dim: int, partition: Any = None, **options: Any) -> Head:
    """A new head ``name`` for features of width ``feature_dim`` (over ``partition``'s cells if it uses one).

    Raises ConfigError for an unknown head name (listing the known ones), a
    missing partition, or an option the head does not take (listing the ones it does).
    """
    cls = head_class(name)
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "feature_dim", "partition")]
    unknown = sorted(set(options) - set(accepted))
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise ConfigError(
            f"head {name!r} has no option(s) {', '.join(unknown)}; its options are: {', '.join(accepted)}"
        )
    if cls.uses_partition:
        if partition is None:
            raise ConfigError(f"head {name!r} is built over a partition's cells; pass partition=")
        return cls(feature_dim=feature_dim, partition=partition, **options)
    return cls(feature_dim=feature_dim, **options)
