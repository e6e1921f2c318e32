"""Rotary cos/sin tables on the host (numpy), for graphs that take them as inputs.

The TensorRT decoder (:mod:`vlsi.archs.tensorrt`) leaves rotary embedding out of the graph,
as TensorRT Edge-LLM does: M-RoPE's three position axes and sections would otherwise be
gathers and concats inside every engine. The export writes the model's own rotary table into
the manifest (``rope``: fp32 inverse frequencies, the scaling factor, and the position axis of
each frequency); this module turns position ids into the ``(B, L, head_dim)`` cos and sin the
graph adds, with the arithmetic of transformers' rotary modules (fp32 angle, cos/sin, scaled,
the half-table repeated). Torch-free.
"""

from __future__ import annotations

import numpy as np


def rope_tables(position_ids: np.ndarray, rope: dict) -> tuple[np.ndarray, np.ndarray]:
    """``position_ids (A, B, L)`` (A = 1 or 3 axes) -> ``cos, sin``, each ``(B, L, head_dim)`` fp32."""
    pos = np.asarray(position_ids)
    if pos.ndim != 3:
        raise ValueError(f"position_ids must be (axes, batch, length), got shape {pos.shape}")
    inv = np.asarray(rope["inv_freq"], np.float32)
    axes = np.asarray(rope["axes"], np.int64)
    if axes.max(initial=0) >= pos.shape[0]:
        raise ValueError(f"the rotary table uses {axes.max() + 1} position axes, the prompt has {pos.shape[0]}")
    # angle[b, l, j] = pos[axes[j], b, l] * inv[j], in fp32 as transformers computes it
    angle = pos[axes].transpose(1, 2, 0).astype(np.float32) * inv
    cos, sin = np.cos(angle), np.sin(angle)
    scale = np.float32(rope.get("scaling", 1.0))
    if scale != 1:
        cos, sin = cos * scale, sin * scale
    return np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
