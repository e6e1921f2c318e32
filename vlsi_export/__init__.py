"""vlsi_export: exporters to ONNX, TensorRT and GGUF, with parity validation.

Targets register with :func:`register_target`; an unknown target fails with the list.
"""

from __future__ import annotations

from vlsi.errors import ConfigError

_TARGETS: dict = {}


def register_target(name: str):
    def deco(fn):
        _TARGETS[name] = fn
        return fn

    return deco


def targets() -> list[str]:
    _load()
    return sorted(_TARGETS)


def get_target(name: str):
    _load()
    if name not in _TARGETS:
        raise ConfigError(f"unknown export target {name!r}; available: {', '.join(sorted(_TARGETS))}")
    return _TARGETS[name]


def _load():
    from . import gguf_target, onnx_target  # noqa: F401  (registers)
