"""Architecture adapters: one small file per architecture, registered by decorator."""

from __future__ import annotations

from ..errors import UnsupportedArchitectureError
from .base import Adapter, TextSizes

_REGISTRY: dict[str, Adapter] = {}


def register(cls):
    """Class decorator: make an adapter known under ``cls.name`` and its model types."""
    inst = cls()
    for key in (cls.name, *cls.model_types):
        if key in _REGISTRY and type(_REGISTRY[key]) is not cls:
            raise RuntimeError(f"adapter key {key!r} registered twice")
        _REGISTRY[key] = inst
    return cls


def supported() -> list[str]:
    """Registered adapter names."""
    return sorted({a.name for a in _REGISTRY.values()})


def get_adapter(what) -> Adapter:
    """The adapter for an adapter name, a ``model_type``, a config or a model."""
    key = what
    if not isinstance(what, str):
        config = getattr(what, "config", what)
        key = getattr(config, "model_type", None)
    if key not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {key!r}; supported: {', '.join(supported())}"
        )
    return _REGISTRY[key]


# Importing the modules registers them.
from . import llava_onevision, qwen2_5_vl, qwen2_vl  # noqa: E402,F401

__all__ = ["Adapter", "TextSizes", "get_adapter", "register", "supported"]
