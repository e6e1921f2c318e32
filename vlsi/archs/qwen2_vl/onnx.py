"""Qwen2-VL's ONNX graphs: its vision tower written for export; embedding and decoder are
the shared ones (:mod:`vlsi.archs.onnx`).

The stock vision tower splits its attention by image with data-dependent slicing
(``cu_seqlens``), which dynamo cannot trace and the legacy exporter freezes to one image
size. Here the per-patch rotary positions and an image index per patch are computed outside
the graph (numpy, :meth:`~.spec.Qwen2VLSpec.vision_feeds`) and passed in; attention is masked
to patches of the same image, so one graph serves any number of images of any size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..onnx import OnnxGraphs, rotate_half


class VisionEncoder(nn.Module):
    """``pixel_values (N, C*T*P*P), positions (N, 2), image_index (N,) -> image embeds (N / m^2, D)``."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        cfg = visual.config
        self.heads = cfg.num_heads
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.register_buffer("inv_freq", visual.rotary_pos_emb.inv_freq.detach().clone(), persistent=False)

    def forward(self, pixel_values, positions, image_index):
        x = self.visual.patch_embed(pixel_values)  # (N, E)
        freqs = positions[..., None].float() * self.inv_freq  # (N, 2, F)
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)  # (N, head_dim)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
        same = image_index[:, None] == image_index[None, :]  # (N, N): attend within an image only
        n = x.shape[0]
        for blk in self.visual.blocks:
            h = blk.norm1(x)
            q, k, v = blk.attn.qkv(h).reshape(n, 3, self.heads, self.head_dim).unbind(1)  # (N, H, d) each
            q = q.float() * cos + rotate_half(q.float()) * sin
            k = k.float() * cos + rotate_half(k.float()) * sin
            a = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                               v.transpose(0, 1)[None].float(), attn_mask=same[None, None])
            a = a[0].transpose(0, 1).reshape(n, -1).to(x.dtype)
            x = x + blk.attn.proj(a)
            x = x + blk.mlp(blk.norm2(x))
        return self.visual.merger(x)


class Qwen2VLOnnx(OnnxGraphs):
    def vision(self, ck, model_block):
        return VisionEncoder(ck.adapter.vision_tower(ck.model))
