"""Qwen2.5-VL's vision tower as one ONNX graph for any number of images of any size.

Transformers' tower reorders patches into windows and splits attention by data-dependent
cumulative lengths, which dynamo cannot trace. Here the host computes, per patch, a rotary
position, a frame id and a window id (numpy, :func:`~.vision.vision_inputs`), and the graph
masks attention with them: windowed blocks attend within a window, the blocks in
``fullatt_block_indexes`` within a frame. Patches stay in the processor's order throughout
(see :mod:`.vision` for why that equals transformers' reorder-attend-restore).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..onnx import OnnxGraphs, rotate_half
from .vision import INPUT_NAMES, vision_inputs


class VisionEncoder(nn.Module):
    """``pixel_values (N, C*T*P*P) float, positions (N, 2) int64, image_index (N,) int64,
    window_id (N,) int64 -> image_embeds (N / merge**2, out_hidden)``.

    Built on ``model.model.visual``; uses its blocks' own ``norm1``, ``norm2``, ``mlp``,
    ``attn.qkv``, ``attn.proj`` and its ``patch_embed`` and ``merger``, so the weights are
    shared, not copied.
    """

    input_names = ["pixel_values", *INPUT_NAMES]
    output_names = ["image_embeds"]

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        cfg = visual.config
        self.heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.full = frozenset(int(i) for i in cfg.fullatt_block_indexes)
        rope = visual.rotary_pos_emb
        self.rope_scale = float(getattr(rope, "attention_scaling", 1.0))
        self.register_buffer("inv_freq", rope.inv_freq.detach().float().clone(), persistent=False)

    def rotary(self, positions):
        """``positions (N, 2) -> (cos, sin)``, each ``(N, 1, head_dim)`` fp32: the row angles
        fill the first quarter of each half of the head, the column angles the second."""
        freqs = positions[..., None].float() * self.inv_freq  # (N, 2, head_dim / 4)
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.rope_scale != 1.0:
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        return cos[:, None, :], sin[:, None, :]

    def attend(self, blk, x, cos, sin, mask):
        """One block's attention on ``x (N, E)`` with a boolean ``mask (N, N)``; fp32 inside."""
        n = x.shape[0]
        q, k, v = blk.attn.qkv(blk.norm1(x)).reshape(n, 3, self.heads, self.head_dim).unbind(1)  # (N, H, d)
        q = q.float() * cos + rotate_half(q.float()) * sin
        k = k.float() * cos + rotate_half(k.float()) * sin
        a = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.float().transpose(0, 1)[None], attn_mask=mask[None, None])
        return blk.attn.proj(a[0].transpose(0, 1).reshape(n, -1).to(x.dtype))

    def forward(self, pixel_values, positions, image_index, window_id):
        x = self.visual.patch_embed(pixel_values)  # (N, E)
        cos, sin = self.rotary(positions)
        # two masks, built once: same frame (full-attention blocks), same window (the others)
        same_frame = image_index[:, None] == image_index[None, :]
        same_window = window_id[:, None] == window_id[None, :]
        for i, blk in enumerate(self.visual.blocks):
            x = x + self.attend(blk, x, cos, sin, same_frame if i in self.full else same_window)
            x = x + blk.mlp(blk.norm2(x))
        return self.visual.merger(x)  # merge units are contiguous in processor order


def example_inputs(visual, grid_thw=((1, 4, 4), (1, 6, 10)), seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random pixels and the matching host inputs for ``grid_thw``, in forward order."""
    cfg = visual.config
    grids = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    n = int(grids.prod(axis=1).sum())
    width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    pixels = torch.randn(n, width, generator=torch.Generator().manual_seed(seed))
    host = vision_inputs(grids, cfg.spatial_merge_size, cfg.patch_size, cfg.window_size)
    return (pixels, *(torch.from_numpy(host[k]) for k in INPUT_NAMES))


def export_vision(visual, path, example_grid=((1, 4, 4), (1, 6, 10))) -> Path:
    """Export ``VisionEncoder(visual)`` to ``path`` (fp32, opset 23, dynamo), dynamic in the
    patch axis of every input; ``example_grid`` only shapes the trace (two images by default,
    so that no size is special)."""
    example = dict(zip(VisionEncoder.input_names, example_inputs(visual, example_grid)))
    Qwen25VLOnnx().export_vision(VisionEncoder(visual), example, Path(path))
    return Path(path)


class Qwen25VLOnnx(OnnxGraphs):
    def vision(self, ck, model_block):
        return VisionEncoder(ck.adapter.vision_tower(ck.model))
