"""What every architecture adapter provides.

Trainer, exporters and runtimes reach into a model only through an adapter, so none of
them special-cases a model class. An adapter knows where the decoder layers, final norm,
LM head, token embeddings, vision tower and projector live; how an image becomes pixel
inputs and a run of placeholder tokens; and how position ids are made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TextSizes:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int


class Adapter:
    """Base class; subclasses register with :func:`vlsi.adapters.register`."""

    name: str = ""
    """Registry key, e.g. ``qwen2_vl``."""
    model_types: tuple[str, ...] = ()
    """``config.model_type`` values this adapter handles."""
    image_token: str = ""
    """The special token that stands for one image feature in the prompt."""
    image_marker: str = ""
    """Text that marks an image in a rendered chat; its ``image_token`` is later repeated
    once per image feature (as the transformers processors do)."""

    # --- model classes and configs -------------------------------------------------
    def model_class(self):
        raise NotImplementedError

    def tiny_config(self, spec, vocab_size: int, token_ids: dict[str, int]):
        """A transformers config for a tiny model of this architecture (see ``vlsi.tiny``)."""
        raise NotImplementedError

    @staticmethod
    def tiny_text_config(spec, vocab_size: int, token_ids: dict[str, int], **rope) -> dict:
        """Decoder config fields of a tiny Qwen2-family decoder; ``rope`` adds rope parameters."""
        return dict(
            vocab_size=vocab_size,
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": float(spec.rope_theta), **rope},
            tie_word_embeddings=False,
            bos_token_id=token_ids["pad"],
            eos_token_id=token_ids["eos"],
            pad_token_id=token_ids["pad"],
        )

    def text_config(self, config):
        return config.text_config

    def text_sizes(self, config) -> TextSizes:
        tc = self.text_config(config)
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        return TextSizes(
            hidden_size=tc.hidden_size,
            num_layers=tc.num_hidden_layers,
            num_heads=tc.num_attention_heads,
            num_kv_heads=tc.num_key_value_heads,
            head_dim=head_dim,
            intermediate_size=tc.intermediate_size,
            vocab_size=tc.vocab_size,
        )

    # --- where things are ------------------------------------------------------------
    def language_model(self, model):
        return model.model.language_model

    def decoder_layers(self, model):
        return self.language_model(model).layers

    def final_norm(self, model):
        return self.language_model(model).norm

    def lm_head(self, model):
        return model.lm_head

    def embed_tokens(self, model):
        return self.language_model(model).embed_tokens

    def vision_tower(self, model):
        raise NotImplementedError

    def projector(self, model):
        raise NotImplementedError

    # --- images and prompts --------------------------------------------------------
    def tiny_image_processor(self, image_size: int):
        """A PIL-based image processor for tiny models fed ``image_size`` square images."""
        raise NotImplementedError

    def load_image_processor(self, folder):
        raise NotImplementedError

    def process_images(self, processor, images: list) -> dict[str, Any]:
        """PIL RGB images -> tensors for the model's forward (batched over all images)."""
        raise NotImplementedError

    def num_image_tokens(self, processed: dict[str, Any], index: int) -> int:
        """How many ``image_token``s image ``index`` of ``processed`` takes in the prompt."""
        raise NotImplementedError

    def position_ids(self, config, input_ids, attention_mask, processed):
        """Position ids for a prompt batch (numpy in, numpy out): ``(B, L)`` counting real
        tokens (padding gets 0). Decoding continues from ``max + 1`` along the last axis."""
        import numpy as np

        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
        return np.where(mask > 0, np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)

    def forward_image_kwargs(self, processed: dict[str, Any]) -> dict[str, Any]:
        """The image-related keyword arguments of the model's forward."""
        raise NotImplementedError

    def concat_processed(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Join per-sample processed images into one batch, in order."""
        import torch

        if not items:
            return {}
        return {k: torch.cat([it[k] for it in items], dim=0) for k in items[0]}
