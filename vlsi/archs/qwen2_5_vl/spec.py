"""Qwen2.5-VL, torch-free: Qwen2-VL's tokens, images and M-RoPE; only the vision graph's inputs
differ (window ids for the windowed blocks)."""

from __future__ import annotations

from ..qwen2_vl.spec import Qwen2VLSpec
from .vision import vision_inputs


class Qwen25VLSpec(Qwen2VLSpec):
    name = "qwen2_5_vl"

    def vision_feeds(self, grid_thw, model):
        return vision_inputs(grid_thw, model["spatial_merge_size"], model["vision_patch_size"],
                             model["vision_window_size"])

    def model_block(self, config, tokenizer):
        vc = config.vision_config
        return {**super().model_block(config, tokenizer), "vision_patch_size": int(vc.patch_size),
                "vision_window_size": int(vc.window_size)}
