"""Qwen2.5-VL, the transformers side: Qwen2-VL with a windowed-attention ViT, SwiGLU vision
MLP and RMSNorm."""

from __future__ import annotations

from ..qwen2_vl.hf import Qwen2VLAdapter


class Qwen25VLAdapter(Qwen2VLAdapter):
    name = "qwen2_5_vl"

    def model_class(self):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def _config_class(self):
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig

    def _vision_config(self, spec) -> dict:
        depth = spec.vision_depth
        return dict(
            depth=depth,
            hidden_size=spec.vision_embed,
            intermediate_size=spec.vision_embed * int(spec.vision_mlp_ratio),
            num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            window_size=56,
            # the last block attends over the whole image, the others within windows
            fullatt_block_indexes=[depth - 1],
            tokens_per_second=2,
        )
