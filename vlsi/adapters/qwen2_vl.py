"""Qwen2-VL: ViT with 2-D RoPE and a 2x2 patch merger, Qwen2 decoder with M-RoPE."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import register
from .base import Adapter


def mrope_section(head_dim: int) -> list[int]:
    """Split ``head_dim / 2`` rotary frequencies 1 : 1.5 : 1.5 over (t, h, w), as Qwen2-VL does."""
    half = head_dim // 2
    t = half // 4
    hw = (half - t) // 2
    return [t, hw, half - t - hw]


@register
class Qwen2VLAdapter(Adapter):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    image_token = "<|image_pad|>"
    image_marker = "<|vision_start|><|image_pad|><|vision_end|>"

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
            text_config=self.tiny_text_config(spec, vocab_size, token_ids, mrope_section=mrope_section(head_dim)),
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

        # min = max pixels: a square image of this size is never resized.
        px = image_size * image_size
        return Qwen2VLImageProcessorPil(size={"shortest_edge": px, "longest_edge": px})

    def load_image_processor(self, folder):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil.from_pretrained(str(folder))

    def process_images(self, processor, images: list) -> dict[str, Any]:
        out = processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def num_image_tokens(self, processed, index):
        t, h, w = (int(x) for x in processed["image_grid_thw"][index])
        return t * h * w // 4  # 2x2 patches merge into one token

    def position_ids(self, config, input_ids, attention_mask, processed):
        from ..mrope import mrope_positions

        grids = processed["image_grid_thw"].numpy() if processed else np.zeros((0, 3), np.int64)
        pos, _ = mrope_positions(
            input_ids, config.image_token_id, grids, config.vision_config.spatial_merge_size, attention_mask
        )
        return pos

    def forward_image_kwargs(self, processed):
        if not processed:
            return {}
        return {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}
