"""LLaVA-OneVision, torch-free: ``<image>`` tokens, anyres tiling and unpadding computed on the
host (numpy), 1-D RoPE positions."""

from __future__ import annotations

from ..spec import ArchSpec, VisionInputs
from .image import LlavaOnevisionImageSpec, num_image_tokens, pack_inputs, preprocess_images


class LlavaOnevisionSpec(ArchSpec):
    name = "llava_onevision"
    image_token = "<image>"
    image_marker = "<image>"
    position_axes = 1

    def image_spec(self, source) -> LlavaOnevisionImageSpec:
        return LlavaOnevisionImageSpec.from_preprocessor_config(source)

    @staticmethod
    def tiled(n_images: int) -> bool:
        """A prompt's only image is tiled (anyres); several images get one tile each, as the
        transformers processor does for a multi-image prompt."""
        return n_images == 1

    def image_tokens(self, image_sizes, image_spec, model: dict) -> list[int]:
        anyres = self.tiled(len(image_sizes))
        return [num_image_tokens(tuple(s), image_spec, model["patches_per_side"], model["vision_aspect_ratio"],
                                 anyres=anyres) for s in image_sizes]

    def prepare_images(self, images, image_spec, model) -> VisionInputs:
        pixels, sizes, tiles = preprocess_images(images, image_spec, anyres=self.tiled(len(images)))
        feeds = {"pixel_values": pixels,
                 **pack_inputs(sizes, tiles, image_spec, model["patches_per_side"],
                               max_ratio=model["vision_aspect_ratio"])}
        return VisionInputs(feeds, self.image_tokens(sizes.tolist(), image_spec, model), {"image_sizes": sizes})

    def vision_caps(self, max_image_tokens, image_spec, model):
        # one base tile plus the largest anyres grid for a single image; one tile per image for
        # several, each taking at least one tile's tokens
        tile = image_spec.tile_size
        grid = max((h // tile) * (w // tile) for h, w in image_spec.image_grid_pinpoints)
        per_tile = model["patches_per_side"] ** 2
        tiles = max(1 + grid, -(-max_image_tokens // per_tile))
        return {"pixel_values": tiles, "gather_index": max_image_tokens, "gather_weight": max_image_tokens}

    def model_block(self, config, tokenizer) -> dict:
        vc = config.vision_config
        return {**super().model_block(config, tokenizer), "patches_per_side": int(vc.image_size // vc.patch_size),
                "vision_aspect_ratio": str(config.vision_aspect_ratio)}
