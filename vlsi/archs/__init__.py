"""Architectures: one folder each, all reached through this registry.

```
vlsi/archs/<name>/
  __init__.py   ARCH, the registry entry (torch-free: names and module paths only)
  spec.py       torch-free: special tokens, image marker, EOS ids, image preprocessing and its
                limits, position ids, tokens per image, the manifest's model block
  hf.py         the transformers side: model class, where modules live, tiny config, LoRA targets
  onnx.py       ONNX graph wrappers with their example inputs, dynamic shapes and I/O names
  gguf.py       GGUF tensor tables, hyper-parameters and vision checks
```

Importing this module, or any ``spec`` through :func:`get_spec`, never imports torch or
transformers: runtimes, the server and the exporters all read the same spec. A subclass
architecture (Qwen2.5-VL of Qwen2-VL) inherits its parent's classes and overrides only what
differs. An (architecture, target) pair that is not supported is refused with the reason
and the list of architectures that target takes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cache

from vlsi.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Arch:
    """One architecture's registry entry: what it is called and where its parts live."""

    name: str
    """Registry key, e.g. ``qwen2_vl``."""
    model_types: tuple[str, ...]
    """``config.model_type`` values it handles."""
    spec: str
    """``module:Class`` of the torch-free spec."""
    hf: str
    """``module:Class`` of the transformers adapter."""
    targets: dict[str, str] = field(default_factory=dict)
    """Export target -> ``module:Class`` of that target's per-architecture part."""
    refused: dict[str, str] = field(default_factory=dict)
    """Export target -> why this architecture cannot go there."""


_PACKAGES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")


@cache
def _entries() -> dict[str, Arch]:
    out: dict[str, Arch] = {}
    for pkg in _PACKAGES:
        entry = importlib.import_module(f"{__name__}.{pkg}").ARCH
        for key in (entry.name, *entry.model_types):
            if key in out and out[key] is not entry:
                raise RuntimeError(f"architecture key {key!r} registered twice")
            out[key] = entry
    return out


def supported(target: str | None = None) -> list[str]:
    """Architecture names; with ``target``, those that export there."""
    names = {a.name: a for a in _entries().values()}
    return sorted(n for n, a in names.items() if target is None or target in a.targets)


def _key(what) -> str | None:
    if isinstance(what, str):
        return what
    if isinstance(what, dict):
        return what.get("model_type") or what.get("arch")
    config = getattr(what, "config", what)
    return getattr(config, "model_type", None)


def get_arch(what) -> Arch:
    """The entry for a name, a ``model_type``, a ``config.json`` dict, a config or a model."""
    key = _key(what)
    entries = _entries()
    if key not in entries:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {key!r}; supported: {', '.join(supported())}")
    return entries[key]


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@cache
def _instance(path: str):
    return _load(path)()


def get_spec(what):
    """The torch-free :class:`~vlsi.archs.spec.ArchSpec` of an architecture."""
    return _instance(get_arch(what).spec)


def get_adapter(what):
    """The transformers :class:`~vlsi.archs.adapter.Adapter` of an architecture."""
    return _instance(get_arch(what).hf)


def get_export(what, target: str):
    """An architecture's part for export ``target`` (graph wrappers, tensor tables, ...)."""
    entry = get_arch(what)
    if target not in entry.targets:
        why = entry.refused.get(target, f"no {target} export is written for it")
        raise UnsupportedArchitectureError(
            f"the {target} target does not take {entry.name!r}: {why}. Architectures it takes: "
            f"{', '.join(supported(target)) or 'none'}")
    return _instance(entry.targets[target])


__all__ = ["Arch", "get_adapter", "get_arch", "get_export", "get_spec", "supported"]
