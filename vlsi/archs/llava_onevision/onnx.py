"""LLaVA-OneVision's vision side as one ONNX graph: tower, projector, unpadding and newlines.

transformers' ``get_image_features`` + ``pack_image_features`` crop, shrink and interleave the
tiles' features with Python control flow on image sizes, which no single traced graph can
hold for every size. Here the host computes, with numpy only
(:func:`~.image.pack_inputs`), for every output token the (up to four) feature rows it is made
of and their weights; the graph runs the tower and projector over all tiles at once,
appends the ``image_newline`` vector as one more row, and gathers. Unpadding is then a choice
of rows, the newline a row index, and the ``anyres_max`` bilinear shrink four weighted taps,
so one graph serves any number of images of any sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..onnx import OnnxGraphs
from .image import LlavaOnevisionImageSpec, grid_shape, pack_inputs
INPUT_NAMES = ["pixel_values", "gather_index", "gather_weight"]
OUTPUT_NAMES = ["image_embeds"]


def _resolve_layers(layer, n_states: int) -> list[int]:
    """``vision_feature_layer`` (an int or a list, negative allowed) as indices into the
    ``n_states = num_layers + 1`` hidden states (state 0 is the input of the first block)."""
    layers = [layer] if isinstance(layer, int) else list(layer)
    if not layers:
        raise ValueError("vision_feature_layer is an empty list")
    out = []
    for i in layers:
        if not -n_states <= int(i) < n_states:
            raise ValueError(f"vision_feature_layer {i} is out of range for {n_states - 1} vision blocks")
        out.append(int(i) % n_states)
    return out


class VisionEncoder(nn.Module):
    """``pixel_values (T, 3, S, S) float32, gather_index (M, 4) int64, gather_weight (M, 4)
    float32 -> image_embeds (M, D)``, the image features in prompt order.

    Built on ``model.model.vision_tower`` (SigLIP, or CLIP with its ``pre_layrnorm``),
    ``multi_modal_projector`` and ``image_newline``; weights are shared, not copied. Only the
    blocks up to the deepest ``vision_feature_layer`` run (the tower's last norm is not in any
    hidden state transformers selects). ``vision_feature_select_strategy="default"`` drops each
    tile's first token (a CLS token), ``"full"`` keeps all.
    """

    input_names = INPUT_NAMES
    output_names = OUTPUT_NAMES

    def __init__(self, model):
        super().__init__()
        inner = model.model
        cfg = model.config
        tower = inner.vision_tower
        self.tower = getattr(tower, "vision_model", tower)  # CLIP/SigLIP wrappers hold the transformer inside
        self.projector = inner.multi_modal_projector
        self.newline = inner.image_newline
        blocks = self.tower.encoder.layers
        self.layers = _resolve_layers(cfg.vision_feature_layer, len(blocks) + 1)
        self.depth = max(self.layers)  # blocks beyond the deepest selected state are not needed
        strategy = cfg.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
        self.drop_first = strategy == "default"

    def tile_features(self, pixel_values):
        """``(T, 3, S, S) -> (T, L, E * n_layers)``: the selected hidden states, concatenated."""
        h = self.tower.embeddings(pixel_values)
        pre = getattr(self.tower, "pre_layrnorm", None)
        if pre is not None:
            h = pre(h)
        states = [h]
        for block in self.tower.encoder.layers[: self.depth]:
            h = block(h, None)
            states.append(h)
        picked = [states[i] for i in self.layers]
        return picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)

    def forward(self, pixel_values, gather_index, gather_weight):
        feats = self.tile_features(pixel_values)
        if self.drop_first:
            feats = feats[:, 1:]
        proj = self.projector(feats)  # (T, P, D)
        rows = torch.cat([proj.reshape(-1, proj.shape[-1]), self.newline[None].to(proj.dtype)], dim=0)
        taps = rows[gather_index]  # (M, 4, D)
        return (taps * gather_weight[..., None].to(proj.dtype)).sum(dim=1)


def patches_per_side(model) -> int:
    """Patch rows per tile: the vision tower's ``image_size // patch_size``."""
    vc = model.config.vision_config
    return vc.image_size // vc.patch_size


def example_inputs(model, sizes=((84, 168), (250, 83)), seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random pixels and matching gather inputs for images of ``sizes`` ((height, width)),
    tiled with the model's own pinpoints, in forward order."""
    cfg = model.config
    tile = cfg.vision_config.image_size
    spec = LlavaOnevisionImageSpec(tile_size=tile, image_grid_pinpoints=cfg.image_grid_pinpoints)
    counts = [1 + int(np.prod(grid_shape(s, spec))) for s in sizes]
    pixels = torch.randn(sum(counts), 3, tile, tile, generator=torch.Generator().manual_seed(seed))
    host = pack_inputs(sizes, counts, spec, patches_per_side(model), max_ratio=cfg.vision_aspect_ratio)
    return (pixels, torch.from_numpy(host["gather_index"]), torch.from_numpy(host["gather_weight"]))


def export_vision(model, path, example_sizes=((84, 168), (250, 83))) -> Path:
    """Export ``VisionEncoder(model)`` to ``path`` (fp32, opset 23, dynamo), dynamic in the tile
    axis of ``pixel_values`` and the token axis of the gather inputs; ``example_sizes`` only
    shape the trace (two images of different grids, so that no count is special)."""
    example = dict(zip(INPUT_NAMES, example_inputs(model, example_sizes)))
    LlavaOnevisionOnnx().export_vision(VisionEncoder(model), example, Path(path))
    return Path(path)


class LlavaOnevisionOnnx(OnnxGraphs):
    example_image_size = (130, 61)  # a 2x1 tile grid: base tile + 2 tiles, with unpadding

    def vision(self, ck, model_block):
        return VisionEncoder(ck.model)

    def vision_dynamic_shapes(self, names):
        # the two gather inputs share their token axis; named dims become the graph's dim_params,
        # so runtimes see "tiles" and "tokens"
        tiles, tokens = torch.export.Dim("tiles"), torch.export.Dim("tokens")
        return {"pixel_values": {0: tiles}, "gather_index": {0: tokens}, "gather_weight": {0: tokens}}
