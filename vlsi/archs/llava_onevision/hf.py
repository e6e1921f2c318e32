"""LLaVA-OneVision, the transformers side: SigLIP vision tower, 2-layer MLP projector, Qwen2
decoder, "anyres" tiling."""

from __future__ import annotations

from typing import Any

from ..adapter import Adapter
from ..qwen2_vl.hf import qwen2_text_config


def torch_long(values):
    import torch

    return torch.tensor(values, dtype=torch.long)


class LlavaOnevisionAdapter(Adapter):
    name = "llava_onevision"

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
            text_config=dict(model_type="qwen2", **qwen2_text_config(spec, vocab_size, token_ids)),
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
        # one prompt's images as one nested list: a lone image is tiled (anyres), each of
        # several gets one tile, as transformers' processor and model do for a multi-image prompt
        out = processor(images=[list(images)], return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"],
                "batch_num_images": torch_long([len(images)])}

    def image_token_counts(self, config, processor, processed):
        from .image import LlavaOnevisionImageSpec

        spec = self.spec
        model = {"patches_per_side": config.vision_config.image_size // config.vision_config.patch_size,
                 "vision_aspect_ratio": config.vision_aspect_ratio}
        image_spec = LlavaOnevisionImageSpec.from_preprocessor_config(processor.to_dict())
        return spec.image_tokens(processed["image_sizes"].tolist(), image_spec, model)

    def forward_image_kwargs(self, processed):
        if not processed:
            return {}
        return {k: processed[k] for k in ("pixel_values", "image_sizes", "batch_num_images")}

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
            "batch_num_images": torch.cat([it["batch_num_images"] for it in items], dim=0),
        }
