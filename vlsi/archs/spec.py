"""What every architecture's torch-free spec provides (numpy, Pillow and tokenizers only).

The spec is the contract export and runtime share: the exporter writes :meth:`ArchSpec.model_block`
into the manifest, and every non-torch runtime (ONNX Runtime, llama.cpp, TensorRT) and the
server read the same spec back from ``manifest.model.arch``. Nothing here may import torch or
transformers; a test checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vlsi.tokenizer import EOS_TOKEN, PAD_TOKEN


@dataclass
class VisionInputs:
    """Images made ready for the vision graph, and what the prompt needs to know about them."""

    feeds: dict[str, np.ndarray]
    """The vision graph's inputs, by name."""
    tokens: list[int]
    """Image tokens each image takes in the prompt, in order."""
    meta: dict = field(default_factory=dict)
    """What position ids need besides the tokens (e.g. Qwen2-VL's patch grids)."""


class ArchSpec:
    """Base class of the torch-free half of an architecture."""

    name: str = ""
    image_token: str = ""
    """The special token standing for one image feature in the prompt."""
    image_marker: str = ""
    """Text that marks an image in a rendered chat; its ``image_token`` is then repeated once
    per image feature, as the transformers processors do."""
    end_of_turn: str = EOS_TOKEN
    """Closes every chat turn; generation stops on it."""
    pad_token: str = PAD_TOKEN
    """Pads batches; generation also stops on it."""
    position_axes: int = 1
    """Leading axis of the decoder's ``position_ids``: 3 for M-RoPE (t, h, w), 1 for 1-D RoPE."""

    # --- tokens ----------------------------------------------------------------------
    def token_id(self, tokenizer, token: str) -> int:
        i = tokenizer.token_to_id(token)
        if i is None:
            from vlsi.errors import ConfigError

            raise ConfigError(f"the tokenizer has no {token!r} token, which {self.name} needs")
        return int(i)

    def eos_ids(self, tokenizer) -> list[int]:
        """The token ids that stop generation: end of turn, then padding."""
        return [self.token_id(tokenizer, self.end_of_turn), self.token_id(tokenizer, self.pad_token)]

    def pad_id(self, tokenizer) -> int:
        return self.token_id(tokenizer, self.pad_token)

    # --- images ----------------------------------------------------------------------
    def image_spec(self, source):
        """The image processor's settings from a ``preprocessor_config.json`` (path, folder or dict)."""
        raise NotImplementedError

    def prepare_images(self, images: list, image_spec, model: dict) -> VisionInputs:
        """Checked RGB PIL images -> the vision graph's inputs and the tokens per image.
        ``model`` is the manifest's model block."""
        raise NotImplementedError

    def vision_caps(self, max_image_tokens: int, image_spec, model: dict) -> dict[str, int]:
        """The longest first axis each vision input takes when the images of one prompt add
        up to ``max_image_tokens`` tokens (TensorRT's optimisation profiles are built on it);
        key ``"*"`` stands for every input not named."""
        raise NotImplementedError

    # --- positions -------------------------------------------------------------------
    def positions(self, input_ids, vision: VisionInputs | None, model: dict, attention_mask=None) -> np.ndarray:
        """``(position_axes, B, L)`` int64 position ids of a prompt batch; padding gets 0.
        Decoding continues from ``max + 1`` on every axis."""
        ids = np.asarray(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        pos = np.where(mask > 0, np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)
        return np.broadcast_to(pos, (self.position_axes, *pos.shape)).copy()

    def text_positions(self, first: int, count: int) -> np.ndarray:
        """``(position_axes, 1, count)`` position ids of ``count`` text tokens after a prefix
        whose largest position is ``first - 1``: text goes on by one from the prefix's maximum
        on every axis (as decoding does), in 1-D RoPE and in M-RoPE after text or an image
        alike, so a follow-up's new text needs no positions of the whole prompt."""
        return np.broadcast_to(np.arange(first, first + count, dtype=np.int64), (self.position_axes, 1, count)).copy()

    # --- the manifest ----------------------------------------------------------------
    def model_block(self, config, tokenizer) -> dict:
        """The manifest's ``model`` block, from a transformers config (read by attribute only,
        so this module needs no transformers) and the tokenizer."""
        tc = config.get_text_config() if hasattr(config, "get_text_config") else config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        return {
            "arch": self.name,
            "num_layers": int(tc.num_hidden_layers),
            "num_heads": int(tc.num_attention_heads),
            "num_kv_heads": int(tc.num_key_value_heads),
            "head_dim": int(head_dim),
            "hidden_size": int(tc.hidden_size),
            "vocab_size": int(tc.vocab_size),
            "image_token_id": self.token_id(tokenizer, self.image_token),
            "position_axes": self.position_axes,
            "max_position_embeddings": int(getattr(tc, "max_position_embeddings", 0) or 0) or None,
        }
