"""Declarative tensor-name tables for the GGUF target: one line per tensor.

``{bid}`` stands for the block index. A ``None`` target means "deliberately not written to
this file" (with the reason beside it); a checkpoint tensor that matches no line is an error,
so a new architecture variant cannot be half-converted silently. A third item names a
transform: ``split3`` cuts a fused q/k/v tensor into thirds along its first axis (``{qkv}`` in
the target becomes q, k, v); ``temporal`` cuts the 3-D patch convolution into its two frames
(the second goes to ``<target>.1``), as llama.cpp's clip runs two 2-D convolutions.
"""

from __future__ import annotations

import re

# transformers' Qwen2-VL / Qwen2.5-VL language model -> llama.cpp's `qwen2vl` text model
QWEN2VL_TEXT: list[tuple[str, str | None]] = [
    ("model.language_model.embed_tokens.weight", "token_embd.weight"),
    ("model.language_model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),  # left out when tied to the embedding
    ("model.language_model.layers.{bid}.input_layernorm.weight", "blk.{bid}.attn_norm.weight"),
    ("model.language_model.layers.{bid}.self_attn.q_proj.weight", "blk.{bid}.attn_q.weight"),
    ("model.language_model.layers.{bid}.self_attn.q_proj.bias", "blk.{bid}.attn_q.bias"),
    ("model.language_model.layers.{bid}.self_attn.k_proj.weight", "blk.{bid}.attn_k.weight"),
    ("model.language_model.layers.{bid}.self_attn.k_proj.bias", "blk.{bid}.attn_k.bias"),
    ("model.language_model.layers.{bid}.self_attn.v_proj.weight", "blk.{bid}.attn_v.weight"),
    ("model.language_model.layers.{bid}.self_attn.v_proj.bias", "blk.{bid}.attn_v.bias"),
    ("model.language_model.layers.{bid}.self_attn.o_proj.weight", "blk.{bid}.attn_output.weight"),
    ("model.language_model.layers.{bid}.post_attention_layernorm.weight", "blk.{bid}.ffn_norm.weight"),
    ("model.language_model.layers.{bid}.mlp.gate_proj.weight", "blk.{bid}.ffn_gate.weight"),
    ("model.language_model.layers.{bid}.mlp.up_proj.weight", "blk.{bid}.ffn_up.weight"),
    ("model.language_model.layers.{bid}.mlp.down_proj.weight", "blk.{bid}.ffn_down.weight"),
    ("model.visual.{rest}", None),  # the vision tower goes to the mmproj file
]


# the vision tower and merger -> llama.cpp's clip projector file (mmproj), both generations
QWEN2VL_VISION: list[tuple] = [
    ("model.language_model.{rest}", None),  # the text model goes to the other file
    ("lm_head.weight", None),
    ("model.visual.patch_embed.proj.weight", "v.patch_embd.weight", "temporal"),
    ("model.visual.blocks.{bid}.norm1.weight", "v.blk.{bid}.ln1.weight"),
    ("model.visual.blocks.{bid}.norm1.bias", "v.blk.{bid}.ln1.bias"),  # LayerNorm (2-VL) only
    ("model.visual.blocks.{bid}.norm2.weight", "v.blk.{bid}.ln2.weight"),
    ("model.visual.blocks.{bid}.norm2.bias", "v.blk.{bid}.ln2.bias"),
    ("model.visual.blocks.{bid}.attn.qkv.weight", "v.blk.{bid}.attn_{qkv}.weight", "split3"),
    ("model.visual.blocks.{bid}.attn.qkv.bias", "v.blk.{bid}.attn_{qkv}.bias", "split3"),
    ("model.visual.blocks.{bid}.attn.proj.weight", "v.blk.{bid}.attn_out.weight"),
    ("model.visual.blocks.{bid}.attn.proj.bias", "v.blk.{bid}.attn_out.bias"),
    ("model.visual.blocks.{bid}.mlp.fc1.weight", "v.blk.{bid}.ffn_up.weight"),  # 2-VL: GELU MLP
    ("model.visual.blocks.{bid}.mlp.fc1.bias", "v.blk.{bid}.ffn_up.bias"),
    ("model.visual.blocks.{bid}.mlp.fc2.weight", "v.blk.{bid}.ffn_down.weight"),
    ("model.visual.blocks.{bid}.mlp.fc2.bias", "v.blk.{bid}.ffn_down.bias"),
    ("model.visual.blocks.{bid}.mlp.gate_proj.weight", "v.blk.{bid}.ffn_gate.weight"),  # 2.5-VL: SwiGLU
    ("model.visual.blocks.{bid}.mlp.gate_proj.bias", "v.blk.{bid}.ffn_gate.bias"),
    ("model.visual.blocks.{bid}.mlp.up_proj.weight", "v.blk.{bid}.ffn_up.weight"),
    ("model.visual.blocks.{bid}.mlp.up_proj.bias", "v.blk.{bid}.ffn_up.bias"),
    ("model.visual.blocks.{bid}.mlp.down_proj.weight", "v.blk.{bid}.ffn_down.weight"),
    ("model.visual.blocks.{bid}.mlp.down_proj.bias", "v.blk.{bid}.ffn_down.bias"),
    ("model.visual.merger.ln_q.weight", "v.post_ln.weight"),
    ("model.visual.merger.ln_q.bias", "v.post_ln.bias"),
    ("model.visual.merger.mlp.0.weight", "mm.0.weight"),
    ("model.visual.merger.mlp.0.bias", "mm.0.bias"),
    ("model.visual.merger.mlp.2.weight", "mm.2.weight"),
    ("model.visual.merger.mlp.2.bias", "mm.2.bias"),
]


def _compile(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\{bid\}", r"(?P<bid>\d+)").replace(r"\{rest\}", r"(?P<rest>.+)")
    return re.compile(rx + r"\Z")


class TensorTable:
    """Maps checkpoint tensor names through one of the tables above."""

    def __init__(self, rows: list[tuple], what: str):
        self.rows = [(_compile(row[0]), row[1], row[2] if len(row) > 2 else None) for row in rows]
        self.what = what

    def target(self, name: str) -> str | None:
        """The GGUF name for ``name``, ``None`` when it is deliberately left out; raises
        ``KeyError`` naming the tensor when no line matches."""
        return self._match(name)[0]

    def convert(self, name: str, array) -> list[tuple[str, object]]:
        """``[(gguf_name, array), ...]`` for one checkpoint tensor (empty when left out)."""
        dst, transform = self._match(name)
        if dst is None:
            return []
        if transform == "split3":
            if array.shape[0] % 3:
                raise ValueError(f"{name}: first axis {array.shape[0]} does not split into q, k, v")
            n = array.shape[0] // 3
            return [(dst.replace("{qkv}", part), array[i * n:(i + 1) * n]) for i, part in enumerate("qkv")]
        if transform == "temporal":
            if array.ndim != 5 or array.shape[2] != 2:
                raise ValueError(f"{name}: shape {tuple(array.shape)}; llama.cpp's clip needs a patch convolution "
                                 "over exactly 2 frames (temporal_patch_size 2)")
            return [(dst, array[:, :, 0]), (dst + ".1", array[:, :, 1])]
        return [(dst, array)]

    def _match(self, name: str) -> tuple[str | None, str | None]:
        for rx, dst, transform in self.rows:
            m = rx.match(name)
            if m:
                if dst is None:
                    return None, None
                groups = {k: v for k, v in m.groupdict().items() if k != "rest"}
                return dst.replace("{bid}", groups.get("bid", "{bid}")), transform
        raise KeyError(f"{self.what}: no GGUF name for checkpoint tensor {name!r}; add a line to "
                       f"vlsi_export/gguf_tables.py (or map it to None to leave it out on purpose)")
