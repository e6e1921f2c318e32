"""LLaVA-OneVision: SigLIP vision tower, 2-layer MLP projector, Qwen2 decoder, "anyres" tiling."""

from __future__ import annotations

import math
from typing import Any

from . import register
from .base import Adapter


@register
class LlavaOnevisionAdapter(Adapter):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    image_token = "<image>"
    image_marker = "<image>"

    def model_class(self):
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    def tiny_config(self, spec, vocab_size: int, token_ids: dict[str, int]):
        from transformers import LlavaOnevisionConfig

        s = spec.image_size
        return LlavaOnevisionConfig(
            vision_config=dict(
                model_type="siglip_vision_model",
                hidden_size=spec.vision_embed,
                intermediate_size=spec.vision_embed * int(spec.vision_mlp_ratio),
                num_hidden_layers=spec.vision_depth,
                num_attention_heads=spec.vision_heads,
                image_size=s,
                patch_size=14,
                vision_use_head=False,
            ),
            text_config=dict(model_type="qwen2", **self.tiny_text_config(spec, vocab_size, token_ids)),
            image_token_index=token_ids["image"],
            video_token_index=token_ids["video"],
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            vision_aspect_ratio="anyres_max_9",
            # one tile grid at the native size and a 2x2 one for larger images
            image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
            tie_word_embeddings=False,
        )

    def vision_tower(self, model):
        return model.model.vision_tower

    def projector(self, model):
        return model.model.multi_modal_projector

    # --- images ------------------------------------------------------------------------
    def tiny_image_processor(self, image_size: int):
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        s = image_size
        return LlavaOnevisionImageProcessorPil(
            size={"height": s, "width": s},
            image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
        )

    def load_image_processor(self, folder):
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        return LlavaOnevisionImageProcessorPil.from_pretrained(str(folder))

    def process_images(self, processor, images: list) -> dict[str, Any]:
        out = processor(images=images, return_tensors="pt")
        return {
            "pixel_values": out["pixel_values"],
            "image_sizes": out["image_sizes"],
            "_tile": dict(processor.size),
            "_pinpoints": [list(p) for p in processor.image_grid_pinpoints],
        }

    def _num_features(self, processed, index: int) -> int:
        """How many feature vectors the model makes for one image (base tile + unpadded grid + newlines)."""
        from transformers.image_processing_utils import select_best_resolution

        tile = processed["_tile"]["height"]
        side = tile // 14  # patches per tile side
        oh, ow = (int(x) for x in processed["image_sizes"][index])
        pinpoints = processed["_pinpoints"]
        bh, bw = select_best_resolution((oh, ow), pinpoints)
        cur_h, cur_w = side * (bh // tile), side * (bw // tile)
        # the tiled grid is cropped back to the image's own aspect ratio
        if ow / oh > cur_w / cur_h:
            new_h = int(round(oh * (cur_w / ow), 7))
            cur_h -= 2 * ((cur_h - new_h) // 2)
        else:
            new_w = int(round(ow * (cur_h / oh), 7))
            cur_w -= 2 * ((cur_w - new_w) // 2)
        grid, newlines = cur_h * cur_w, cur_h
        ratio = math.sqrt(cur_h * cur_w / (9 * side * side))  # anyres_max_9
        if ratio > 1.1:
            grid = int(cur_h // ratio) * int(cur_w // ratio)
            newlines = int(cur_h // ratio)
        return side * side + grid + newlines

    def num_image_tokens(self, processed, index):
        return self._num_features(processed, index)

    def forward_image_kwargs(self, processed):
        if not processed:
            return {}
        return {"pixel_values": processed["pixel_values"], "image_sizes": processed["image_sizes"]}

    def concat_processed(self, items):
        import torch

        if not items:
            return {}
        # tiles per image differ with aspect ratio: pad the tile axis to the longest
        n = max(it["pixel_values"].shape[1] for it in items)
        pv = [torch.nn.functional.pad(it["pixel_values"], (0, 0, 0, 0, 0, 0, 0, n - it["pixel_values"].shape[1])) for it in items]
        return {
            "pixel_values": torch.cat(pv, dim=0),
            "image_sizes": torch.cat([it["image_sizes"] for it in items], dim=0),
            "_tile": items[0]["_tile"],
            "_pinpoints": items[0]["_pinpoints"],
        }
