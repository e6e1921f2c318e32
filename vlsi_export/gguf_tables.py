"""Declarative tensor-name tables for the GGUF target: one line per tensor.

``{bid}`` stands for the block index. A ``None`` target means "deliberately not written to
this file" (with the reason beside it); a checkpoint tensor that matches no line is an error,
so a new architecture variant cannot be half-converted silently.
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


def _compile(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\{bid\}", r"(?P<bid>\d+)").replace(r"\{rest\}", r"(?P<rest>.+)")
    return re.compile(rx + r"\Z")


class TensorTable:
    """Maps checkpoint tensor names through one of the tables above."""

    def __init__(self, rows: list[tuple[str, str | None]], what: str):
        self.rows = [(_compile(src), dst) for src, dst in rows]
        self.what = what

    def target(self, name: str) -> str | None:
        """The GGUF name for ``name``, ``None`` when it is deliberately left out; raises
        ``KeyError`` naming the tensor when no line matches."""
        for rx, dst in self.rows:
            m = rx.match(name)
            if m:
                return None if dst is None else dst.format(**m.groupdict())
        raise KeyError(f"{self.what}: no GGUF name for checkpoint tensor {name!r}; add a line to "
                       f"vlsi_export/gguf_tables.py (or map it to None to leave it out on purpose)")
