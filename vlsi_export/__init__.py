"""vlsi_export: exporters to ONNX, TensorRT and GGUF, with parity validation.

``export(model, out, target=..., **options)`` runs any target (see :mod:`vlsi_export.base`);
targets register with :func:`register_target`, and an unknown one fails with the list.
"""

from __future__ import annotations

from .base import Target, export, get_target, register_target, targets

__all__ = ["Target", "export", "get_target", "register_target", "targets"]
