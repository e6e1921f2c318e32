"""Qwen2-VL, the transformers side: ViT with 2-D RoPE and a 2x2 patch merger, Qwen2 decoder
with M-RoPE."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..adapter import Adapter
from ..spec import VisionInputs


def qwen2_text_config(spec, vocab_size: int, token_ids: dict[str, int], **rope) -> dict:
    """Config fields of a tiny Qwen2 decoder (every architecture here has one); ``rope`` adds
    rope parameters."""
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


def mrope_section(head_dim: int) -> list[int]:
    """Split ``head_dim / 2`` rotary frequencies 1 : 1.5 : 1.5 over (t, h, w), as Qwen2-VL does."""
    half = head_dim // 2
    t = half // 4
    hw = (half - t) // 2
    return [t, hw, half - t - hw]


class Qwen2VLAdapter(Adapter):
    name = "qwen2_vl"

    def model_class(self):
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def _config_class(self):
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig

    def _vision_config(self, spec) -> dict:
        return dict(
            depth=spec.vision_depth,
            embed_dim=spec.vision_embed,
            hidden_size=spec.hidden,  # merger output width = text width
            num_heads=spec.vision_heads,
            mlp_ratio=int(spec.vision_mlp_ratio),
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        )

    def tiny_config(self, spec, vocab_size: int, token_ids: dict[str, int]):
        head_dim = spec.hidden // spec.heads
        return self._config_class()(
            text_config=qwen2_text_config(spec, vocab_size, token_ids, mrope_section=mrope_section(head_dim)),
            vision_config=self._vision_config(spec),
            image_token_id=token_ids["image_pad"],
            video_token_id=token_ids["video_pad"],
            vision_start_token_id=token_ids["vision_start"],
            vision_end_token_id=token_ids["vision_end"],
            bos_token_id=token_ids["pad"],
            eos_token_id=token_ids["eos"],
            pad_token_id=token_ids["pad"],
            tie_word_embeddings=False,
        )

    def vision_tower(self, model):
        return model.model.visual

    def projector(self, model):
        return model.model.visual.merger

    # --- images ------------------------------------------------------------------------
    def tiny_image_processor(self, image_size: int):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        # min = max pixels: a square image of this size is never resized. vlsi.tiny widens the
        # bounds to llama.cpp clip's fixed ones for the models it builds.
        px = image_size * image_size
        return Qwen2VLImageProcessorPil(size={"shortest_edge": px, "longest_edge": px})

    def load_image_processor(self, folder):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil.from_pretrained(str(folder))

    def process_images(self, processor, images: list) -> dict[str, Any]:
        out = processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def image_token_counts(self, config, processor, processed):
        return self.spec.image_tokens(processed["image_grid_thw"].numpy(), processor.merge_size)

    def position_ids(self, config, input_ids, attention_mask, processed):
        grids = processed["image_grid_thw"].numpy() if processed else np.zeros((0, 3), np.int64)
        model = {"image_token_id": config.image_token_id,
                 "spatial_merge_size": config.vision_config.spatial_merge_size}
        return self.spec.positions(input_ids, VisionInputs({}, [], {"grid_thw": grids}), model, attention_mask)

    def forward_image_kwargs(self, processed):
        if not processed:
            return {}
        return {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}
