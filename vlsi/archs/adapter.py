"""What every architecture's transformers side (its ``hf.py`` adapter) provides.

Trainer, exporters and the torch runtime reach into a model only through an adapter, so
none of them special-cases a model class. An adapter knows where the decoder layers, final
norm, LM head, token embeddings, vision tower and projector live; how the HF image processor
is made and called; and which modules LoRA adapts. Token, marker and position rules are
the architecture's torch-free spec (``self.spec``), shared with the edge runtimes.
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
    """Base class; an architecture's ``ARCH`` entry names its subclass (see :mod:`vlsi.archs`)."""

    name: str = ""
    """Registry key, e.g. ``qwen2_vl``."""
    lora_targets: str = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    """Regex of the modules LoRA adapts: the language model's projections (the paper's
    "LoRA on the LLM")."""

    @property
    def spec(self):
        """The architecture's torch-free spec (tokens, image marker, positions)."""
        from . import get_spec

        return get_spec(self.name)

    @property
    def image_token(self) -> str:
        return self.spec.image_token

    @property
    def image_marker(self) -> str:
        return self.spec.image_marker

    # --- model classes and configs -------------------------------------------------
    def model_class(self):
        raise NotImplementedError

    def tiny_config(self, spec, vocab_size: int, token_ids: dict[str, int]):
        """A transformers config for a tiny model of this architecture (see ``vlsi.tiny``)."""
        raise NotImplementedError

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

    def image_token_counts(self, config, processor, processed: dict[str, Any]) -> list[int]:
        """How many ``image_token``s each image of ``processed`` takes in the prompt."""
        raise NotImplementedError

    def position_ids(self, config, input_ids, attention_mask, processed):
        """Position ids for a prompt batch (numpy in, numpy out): ``(B, L)`` counting real
        tokens (padding gets 0), the spec's rule. Decoding continues from ``max + 1``."""
        return self.spec.positions(input_ids, None, {}, attention_mask)[0]

    def image_features(self, model, processed: dict[str, Any]):
        """The image features the model scatters into the prompt, ``(tokens, hidden)``, all
        images concatenated in order (the reference the vision graphs are checked against)."""
        out = model.get_image_features(**self.forward_image_kwargs(processed))
        feats = getattr(out, "pooler_output", out)
        import torch

        return torch.cat(list(feats), dim=0)

    def forward_image_kwargs(self, processed: dict[str, Any]) -> dict[str, Any]:
        """The image-related keyword arguments of the model's forward."""
        raise NotImplementedError

    def concat_processed(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Join per-sample processed images into one batch, in order."""
        import torch

        if not items:
            return {}
        return {k: torch.cat([it[k] for it in items], dim=0) for k in items[0]}
