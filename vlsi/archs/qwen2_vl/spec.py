"""Qwen2-VL, torch-free: ``<|vision_start|><|image_pad|>...<|vision_end|>`` images, one token per
2x2 merged patch, M-RoPE positions over (t, h, w)."""

from __future__ import annotations

import numpy as np

from ..spec import ArchSpec, VisionInputs
from .image import Qwen2VLImageSpec, num_image_tokens, preprocess_images
from .positions import mrope_positions, vision_inputs


class Qwen2VLSpec(ArchSpec):
    name = "qwen2_vl"
    image_token = "<|image_pad|>"
    image_marker = "<|vision_start|><|image_pad|><|vision_end|>"
    position_axes = 3

    def image_spec(self, source) -> Qwen2VLImageSpec:
        return Qwen2VLImageSpec.from_preprocessor_config(source)

    def image_tokens(self, grid_thw, merge_size: int) -> list[int]:
        """Image tokens per image: one per ``merge_size x merge_size`` patches."""
        return [num_image_tokens(g, merge_size) for g in np.asarray(grid_thw).reshape(-1, 3)]

    def vision_feeds(self, grid_thw, model: dict) -> dict[str, np.ndarray]:
        """The vision graph's inputs besides ``pixel_values`` (see :mod:`.onnx`)."""
        pos, seg = vision_inputs(grid_thw, model["spatial_merge_size"])
        return {"positions": pos, "image_index": seg}

    def prepare_images(self, images, image_spec, model) -> VisionInputs:
        pixels, grids = preprocess_images(images, image_spec)
        feeds = {"pixel_values": pixels, **self.vision_feeds(grids, model)}
        return VisionInputs(feeds, self.image_tokens(grids, model["spatial_merge_size"]), {"grid_thw": grids})

    def vision_caps(self, max_image_tokens, image_spec, model):
        return {"*": max_image_tokens * model["spatial_merge_size"] ** 2}  # every input is per patch

    def positions(self, input_ids, vision, model, attention_mask=None):
        grids = vision.meta["grid_thw"] if vision is not None else np.zeros((0, 3), np.int64)
        pos, _ = mrope_positions(np.asarray(input_ids), model["image_token_id"], grids,
                                 model["spatial_merge_size"], attention_mask)
        return pos

    def model_block(self, config, tokenizer) -> dict:
        return {**super().model_block(config, tokenizer),
                "spatial_merge_size": int(config.vision_config.spatial_merge_size)}
