"""LLaVA-OneVision image preprocessing ("anyres" tiling) in numpy + Pillow only, for edge runtimes.

This re-implements the PIL path of transformers' ``LlavaOnevisionImageProcessorPil`` (5.x) and
the host-side half of the model's ``pack_image_features``, so an ONNX Runtime front end needs
neither torch nor transformers. For one image of ``(height, width)`` pixels and tile side ``S``:

1. pick the grid resolution ``(bh, bw)`` among ``image_grid_pinpoints`` that keeps the most
   image pixels after an aspect-preserving fit (ties: the one wasting the least area);
2. fit the image into ``(bh, bw)`` (Pillow resize of the uint8 image, ceil-rounded short side),
   centre it on a black canvas (pad value 0 *before* rescaling, so it normalises to
   ``-mean/std``), cut the canvas into ``S x S`` tiles in row-major order;
3. put a ``S x S`` resize of the whole image (the "base" tile) in front of them;
4. rescale (``float32(float64(uint8) * rescale_factor)``) and normalise in float32.

The model then turns the tiles' patch features into prompt tokens: all base-tile patches, then
the tiles' patches laid out as one big grid, cropped back to the image's own aspect ratio
("unpadding"), bilinearly shrunk when it holds more than ``max_ratio`` tiles' worth of patches
(``anyres_max_9``), with one ``image_newline`` vector after each grid row. :func:`pack_inputs`
turns that into a gather (index + weight, four taps per token) that an ONNX graph can apply to
the projector output, so one graph serves any image sizes. :func:`num_image_tokens` counts the
tokens without touching pixels.

The images of a prompt holding two or more (transformers' nested ``[[im1, im2]]`` input,
``anyres=False`` here) are not tiled: each is padded to a square with the mean colour, resized to one tile, and
gives its patches plus a single newline.

Nothing here imports torch or transformers, not even lazily (a test proves it).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vlsi.errors import ConfigError
from vlsi.images import ImageError, pil_images

from ..processor import CLIP_MEAN, CLIP_STD, check_pixel_settings, read_preprocessor_config

__all__ = [
    "DEFAULT_PINPOINTS",
    "LlavaOnevisionImageSpec",
    "best_resolution",
    "grid_shape",
    "num_image_tokens",
    "pack_inputs",
    "parse_max_ratio",
    "preprocess_images",
]

#: transformers' class default: every grid of 1..6 x 1..6 tiles of 384 px.
DEFAULT_PINPOINTS = tuple((384 * r, 384 * c) for r in range(1, 7) for c in range(1, 7))
#: ``pack_image_features`` shrinks the unpadded grid only when it exceeds the budget by this.
_SHRINK_TOLERANCE = 1.1


# --------------------------------------------------------------------------- spec


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ConfigError(f"image spec: {name} must be a positive integer, got {v!r}")
    return int(v)


def _channel_values(name: str, v) -> tuple[float, ...]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = (v,) * 3
    try:
        v = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        raise ConfigError(f"image spec: {name} must be a number or a list of 3 numbers, got {v!r}") from None
    if len(v) != 3:
        raise ConfigError(f"image spec: {name} needs one value per RGB channel (3), got {len(v)}: {v}")
    return v


@dataclass(frozen=True)
class LlavaOnevisionImageSpec:
    """The settings of a LLaVA-OneVision image processor (what ``preprocessor_config.json`` holds).

    ``tile_size`` is ``size.height`` (= ``size.width``; must equal the vision tower's
    ``image_size``). ``image_grid_pinpoints`` are ``(height, width)`` pixel resolutions, each a
    multiple of ``tile_size``. ``do_pad`` only pads the batch to a common tile count in
    transformers; :func:`preprocess_images` concatenates tiles instead, so it changes nothing
    here. ``do_resize`` only affects the multi-image path: the anyres path always resizes.
    """

    tile_size: int = 384
    image_grid_pinpoints: tuple = DEFAULT_PINPOINTS
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    do_pad: bool = True

    def __post_init__(self):
        s = _positive_int("tile_size", self.tile_size)
        object.__setattr__(self, "tile_size", s)
        object.__setattr__(self, "image_grid_pinpoints", self._checked_pinpoints(self.image_grid_pinpoints, s))
        for name in ("image_mean", "image_std"):
            object.__setattr__(self, name, _channel_values(name, getattr(self, name)))
        check_pixel_settings(self, ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad"))

    @staticmethod
    def _checked_pinpoints(points, tile: int) -> tuple[tuple[int, int], ...]:
        try:
            pairs = [tuple(p) for p in points]
        except TypeError:
            raise ConfigError(f"image spec: image_grid_pinpoints must be a list of [height, width], got {points!r}") from None
        if not pairs:
            raise ConfigError("image spec: image_grid_pinpoints is empty; give at least one [height, width]")
        out = []
        for p in pairs:
            if len(p) != 2 or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1 for x in p):
                raise ConfigError(f"image spec: image_grid_pinpoints entry {list(p)!r} is not a [height, width] of positive integers")
            if p[0] % tile or p[1] % tile:
                # transformers would cut partial tiles and fail to stack them
                raise ConfigError(
                    f"image spec: image_grid_pinpoints entry {list(p)} is not a multiple of the tile size {tile}")
            out.append((int(p[0]), int(p[1])))
        return tuple(out)

    @property
    def square_pad_color(self) -> tuple[int, int, int]:
        """The uint8 colour the multi-image path pads to a square with (``int(mean * 255)``)."""
        return tuple(int(m * 255) for m in self.image_mean)

    @classmethod
    def from_preprocessor_config(cls, path_or_dict: str | os.PathLike | dict) -> LlavaOnevisionImageSpec:
        """Read a ``preprocessor_config.json`` (a file, the folder holding it, or its dict).

        ``size`` is ``{"height": S, "width": S}`` (or ``{"shortest_edge": S}``, read as a square
        tile, as transformers does). Missing or null keys take the class defaults (those of
        ``LlavaOnevisionImageProcessorPil``); unknown keys are ignored. Settings that
        transformers would turn into non-square or partial tiles are refused.
        """
        cfg, where = read_preprocessor_config(path_or_dict)
        kw: dict[str, Any] = {}
        size = cfg.get("size")
        if size is not None:
            kw["tile_size"] = _tile_from_size(size, where)
        crop = cfg.get("crop_size")
        if cfg.get("do_center_crop"):
            raise ConfigError(f"{where}: do_center_crop=true is not supported for LLaVA-OneVision (tiles must be whole)")
        if isinstance(crop, dict) and crop.get("height") not in (None, kw.get("tile_size", cls.tile_size)):
            # transformers cuts tiles of crop_size.height when it is set: that is not a tile the model takes
            raise ConfigError(f"{where}: crop_size {crop} differs from the tile size; remove it or make it equal to size")
        for name in ("image_grid_pinpoints", "image_mean", "image_std", "rescale_factor", "resample",
                     "do_resize", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad"):
            if cfg.get(name) is not None:
                kw[name] = cfg[name]
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def check_size(self, height: int, width: int, patches_per_side: int | None = None,
                   max_ratio: int | str | None = None) -> None:
        """Raise :class:`ImageError` for an image size the maths cannot take.

        The processor takes any size of at least 1x1 (an extreme panorama such as 1x2000 fits
        no pinpoint with a non-zero area, and transformers then picks the pinpoint wasting the
        least, like any tie; its unpadded grid may then keep no column, leaving the base tile
        and one newline per grid row, or no row, leaving the base tile alone). With ``patches_per_side`` (and ``max_ratio``, default 9) the model side is checked
        too: a grid shrunk by ``anyres_max`` to zero rows or columns makes torch's interpolate
        fail, so such sizes are refused.
        """
        if isinstance(height, bool) or isinstance(width, bool) or int(height) != height or int(width) != width:
            raise ImageError(f"image size must be integers, got height={height!r}, width={width!r}")
        if height < 1 or width < 1:
            raise ImageError(f"image has no pixels ({width}x{height}, width x height)")
        if patches_per_side is None:
            return
        rows, cols, out = _grid_layout((int(height), int(width)), self, patches_per_side, parse_max_ratio(max_ratio))
        if out is not None and (out[0] < 1 or out[1] < 1):
            raise ImageError(
                f"image is {width}x{height} (width x height): its unpadded tile grid of {rows}x{cols} patches "
                f"shrinks to {out[0]}x{out[1]} under anyres_max, which LLaVA-OneVision (torch interpolate) "
                f"cannot do; crop it or pad the short side to a less extreme aspect ratio")


def _tile_from_size(size, where: str) -> int:
    if not isinstance(size, dict):
        raise ConfigError(f"{where}: size must be an object like {{\"height\": 384, \"width\": 384}}, got {size!r}")
    h, w = size.get("height"), size.get("width")
    if h is not None or w is not None:
        if h != w:
            raise ConfigError(f"{where}: size {size} is not square; LLaVA-OneVision tiles are S x S")
        return h
    if size.get("shortest_edge") is not None:
        return size["shortest_edge"]
    raise ConfigError(f"{where}: size {size} has neither height/width nor shortest_edge")


def parse_max_ratio(value: int | str | None) -> int:
    """``9``, ``"anyres_max_9"`` -> 9 (the tile budget of the unpadded grid); ``None`` -> 9.

    transformers reads the number with ``str.strip("anyres_max_")``, which strips those
    *characters* from both ends; any string of that shape gives the same digits here.
    """
    if value is None:
        return 9
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
        return int(value)
    m = re.fullmatch(r"[anyres_mx]*?(\d+)", str(value)) if isinstance(value, str) else None
    if not m or int(m.group(1)) < 1:
        raise ConfigError(f"vision_aspect_ratio must look like 'anyres_max_9' (or be a positive int), got {value!r}")
    return int(m.group(1))


# --------------------------------------------------------------------------- geometry


def best_resolution(size: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The ``(height, width)`` pinpoint an image of ``size = (height, width)`` is tiled at.

    Each candidate is scored by how many image pixels survive an aspect-preserving fit into it
    (sides truncated to int, capped at the image's own pixel count); the highest wins, ties go
    to the candidate with the least unused area, then to the earlier one.
    """
    h, w = size
    best, best_kept, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        kept = min(int(w * scale) * int(h * scale), w * h)
        waste = ph * pw - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (ph, pw), kept, waste
    return best


def _fit_size(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    """``(h, w)`` scaled to fit ``(th, tw)``: the limiting side fills it, the other is ceil-rounded."""
    sw, sh = tw / w, th / h
    if sw < sh:
        return min(math.ceil(h * sw), th), tw
    return th, min(math.ceil(w * sh), tw)


def grid_shape(size: tuple[int, int], spec: LlavaOnevisionImageSpec) -> tuple[int, int]:
    """``(tile rows, tile columns)`` of the anyres grid for an image of ``(height, width)``."""
    bh, bw = best_resolution(size, spec.image_grid_pinpoints)
    return bh // spec.tile_size, bw // spec.tile_size


def _unpad_window(size: tuple[int, int], rows: int, cols: int) -> tuple[int, int, int, int]:
    """``(r0, r1, c0, c1)``: the part of a ``rows x cols`` patch grid the image covers.

    The padding the processor added around the fitted image is cut off symmetrically, in
    patch units, with the model's rounding (``round(x, 7)`` then ``int``; an odd leftover
    row or column stays).
    """
    h, w = size
    if w / h > cols / rows:
        kept = int(round(h * (cols / w), 7))
        pad = (rows - kept) // 2
        return pad, rows - pad, 0, cols
    kept = int(round(w * (rows / h), 7))
    pad = (cols - kept) // 2
    return 0, rows, pad, cols - pad


def _grid_layout(size, spec, patches_per_side: int, max_ratio: int):
    """Unpadded grid ``(rows, cols)`` in patches, and the shrunk ``(rows, cols)`` or None."""
    n_rows, n_cols = grid_shape(size, spec)
    r0, r1, c0, c1 = _unpad_window(size, n_rows * patches_per_side, n_cols * patches_per_side)
    rows, cols = r1 - r0, c1 - c0
    ratio = math.sqrt(rows * cols / (max_ratio * patches_per_side**2))
    if ratio > _SHRINK_TOLERANCE:
        # the same float arithmetic as pack_image_features: floor-divide ints by the float ratio
        return rows, cols, (int(rows // ratio), int(cols // ratio))
    return rows, cols, None


def num_image_tokens(image_size: tuple[int, int], spec: LlavaOnevisionImageSpec, patches_per_side: int,
                     max_ratio: int | str = 9, *, anyres: bool = True) -> int:
    """How many image feature vectors (prompt tokens) one image of ``(height, width)`` gives.

    ``patches_per_side`` is ``vision image_size // patch_size``; ``max_ratio`` is the
    ``anyres_max_N`` budget (int or the config's ``vision_aspect_ratio`` string). anyres:
    base tile patches + unpadded (maybe shrunk) grid + one newline per grid row. With
    ``anyres=False`` (one of several images in a prompt): one tile's patches + one newline.
    """
    h, w = (int(x) for x in image_size)
    base = patches_per_side**2
    if not anyres:
        spec.check_size(h, w)
        return base + 1
    spec.check_size(h, w, patches_per_side, max_ratio)
    rows, cols, out = _grid_layout((h, w), spec, patches_per_side, parse_max_ratio(max_ratio))
    if out is not None:
        rows, cols = out
    return base + rows * cols + rows


# --------------------------------------------------------------------------- pixels


def _to_rgb(im: Image.Image, spec: LlavaOnevisionImageSpec) -> Image.Image:
    """RGB conversion as transformers does it: transparency composited onto opaque white."""
    if not spec.do_convert_rgb:
        if im.mode != "RGB":
            raise ImageError(f"image mode {im.mode!r} is not RGB and the spec has do_convert_rgb=False; convert it first")
        return im
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _chw(im: Image.Image) -> np.ndarray:
    """PIL RGB -> (3, H, W) uint8."""
    return np.moveaxis(np.asarray(im), -1, 0)


def _normalise(x: np.ndarray, spec: LlavaOnevisionImageSpec) -> np.ndarray:
    """(..., 3, H, W) uint8 -> float32, in transformers' dtypes and order (bit-identical)."""
    if spec.do_rescale:
        # multiply in float64, round once to float32, as transformers' rescale does
        x = (x.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    if spec.do_normalize:
        x = x.astype(np.float32, copy=False)
        mean = np.asarray(spec.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(spec.image_std, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    return x.astype(np.float32, copy=False)


def _anyres_tiles(im: Image.Image, spec: LlavaOnevisionImageSpec) -> np.ndarray:
    """One RGB image -> (1 + rows * cols, 3, S, S) float32: base tile, then the grid row-major."""
    s = spec.tile_size
    h, w = im.height, im.width
    bh, bw = best_resolution((h, w), spec.image_grid_pinpoints)
    fh, fw = _fit_size(h, w, bh, bw)
    fitted = im.resize((fw, fh), resample=spec.resample)  # Pillow returns a copy when the size is unchanged
    # centre on a zero canvas (the odd pixel of padding goes after), in uint8 like transformers
    top, left = (bh - fh) // 2, (bw - fw) // 2
    canvas = np.zeros((3, bh, bw), dtype=np.uint8)
    canvas[:, top:top + fh, left:left + fw] = _chw(fitted)
    grid = canvas.reshape(3, bh // s, s, bw // s, s).transpose(1, 3, 0, 2, 4).reshape(-1, 3, s, s)
    base = _chw(im.resize((s, s), resample=spec.resample))[None]
    return _normalise(np.concatenate([base, grid], axis=0), spec)


def _square_tile(im: Image.Image, spec: LlavaOnevisionImageSpec) -> np.ndarray:
    """One RGB image of a multi-image prompt -> (1, 3, S, S): padded to a square, resized."""
    s = spec.tile_size
    h, w = im.height, im.width
    if h != w:
        side = max(h, w)
        canvas = np.empty((3, side, side), dtype=np.uint8)
        canvas[:] = np.asarray(spec.square_pad_color, dtype=np.uint8)[:, None, None]
        top, left = (side - h) // 2, (side - w) // 2
        canvas[:, top:top + h, left:left + w] = _chw(im)
        im = Image.fromarray(np.ascontiguousarray(np.moveaxis(canvas, 0, -1)), mode="RGB")
    if spec.do_resize:
        im = im.resize((s, s), resample=spec.resample)
    elif im.size != (s, s):
        raise ImageError(f"image is {w}x{h} and the spec has do_resize=False: it must already be {s}x{s}")
    return _normalise(_chw(im)[None], spec)


def preprocess_images(images: Image.Image | Iterable[Image.Image], spec: LlavaOnevisionImageSpec | None = None,
                      *, anyres: bool = True) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``(pixel_values, image_sizes, tiles_per_image)`` for PIL images, as transformers makes them.

    ``pixel_values`` float32 ``(total_tiles, 3, S, S)``: each image's tiles (base tile first),
    image after image, *not* padded to a common count (transformers' 5-D output is this, padded
    per image with zero tiles). ``image_sizes`` int64 ``(N, 2)`` rows ``(height, width)`` of the
    original images; ``tiles_per_image`` the tile count of each. ``anyres=False`` is the path
    transformers takes for a prompt with two or more images (nested list ``[[im1, im2, ...]]``):
    one tile per image. A prompt with a single image is always tiled (``[[im]]`` included).
    """
    spec = spec or LlavaOnevisionImageSpec()
    images = pil_images(images)
    tiles, sizes = [], []
    for i, im in enumerate(images):
        try:
            spec.check_size(im.height, im.width)
            rgb = _to_rgb(im, spec)
            tiles.append(_anyres_tiles(rgb, spec) if anyres else _square_tile(rgb, spec))
        except ImageError as e:
            raise (e if len(images) == 1 else ImageError(f"image {i}: {e}")) from None
        sizes.append((im.height, im.width))
    counts = [len(t) for t in tiles]
    return np.concatenate(tiles, axis=0), np.asarray(sizes, dtype=np.int64), counts


# --------------------------------------------------------------------------- packing


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's 1-D linear interpolation with ``align_corners=False`` and no explicit scale:
    for each output ``i``, source ``(i + 0.5) * n_in / n_out - 0.5`` clamped at 0, taps
    ``floor`` and ``floor + 1`` (same tap at the last input), weights ``1 - frac`` and ``frac``.
    Computed in float32 as torch's CPU kernel does. Returns ``(i0, i1, w0, w1)``."""
    if n_in == n_out:
        i = np.arange(n_out)
        return i, i, np.ones(n_out, np.float32), np.zeros(n_out, np.float32)
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    i1 = i0 + (i0 < n_in - 1)
    return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


def _image_gather(size, first_row: int, n_tiles: int, spec, pps: int, max_ratio: int,
                  newline_row: int) -> tuple[np.ndarray, np.ndarray]:
    """Gather taps ``(m, 4)`` index / weight for one image whose tiles start at row ``first_row``
    of the flattened features (``pps * pps`` rows per tile)."""
    per_tile = pps * pps
    base = first_row + np.arange(per_tile)
    if n_tiles == 1:  # multi-image path: the tile, then one newline
        rows = np.append(base, newline_row)
        return _plain(rows)
    n_rows, n_cols = grid_shape(size, spec)
    if n_tiles != 1 + n_rows * n_cols:
        raise ImageError(
            f"an image of {size[1]}x{size[0]} (width x height) is tiled {n_rows}x{n_cols} (+1 base tile) "
            f"under these pinpoints, but tiles_per_image says {n_tiles}; the sizes, tile counts and spec disagree")
    # feature row of every patch of the tile grid, laid out as one (rows*pps, cols*pps) picture
    r = np.arange(n_rows * pps)[:, None]
    c = np.arange(n_cols * pps)[None, :]
    tile = 1 + (r // pps) * n_cols + (c // pps)
    where = first_row + tile * per_tile + (r % pps) * pps + (c % pps)
    r0, r1, c0, c1 = _unpad_window(size, n_rows * pps, n_cols * pps)
    where = where[r0:r1, c0:c1]
    _, _, out = _grid_layout(size, spec, pps, max_ratio)
    if out is None:
        idx = np.broadcast_to(where[..., None], where.shape + (4,))
        wgt = np.zeros(where.shape + (4,), np.float32)
        wgt[..., 0] = 1
    else:
        idx, wgt = _bilinear(where, *out)
    # one newline tap at the end of every grid row
    nl_idx = np.full((idx.shape[0], 1, 4), newline_row, dtype=np.int64)
    nl_wgt = np.zeros((idx.shape[0], 1, 4), np.float32)
    nl_wgt[..., 0] = 1
    idx = np.concatenate([idx, nl_idx], axis=1).reshape(-1, 4)
    wgt = np.concatenate([wgt, nl_wgt], axis=1).reshape(-1, 4)
    b_idx, b_wgt = _plain(base)
    return np.concatenate([b_idx, idx]), np.concatenate([b_wgt, wgt])


def _plain(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One tap of weight 1 per row (the other three taps repeat it with weight 0)."""
    idx = np.repeat(np.asarray(rows, np.int64)[:, None], 4, axis=1)
    wgt = np.zeros(idx.shape, np.float32)
    wgt[:, 0] = 1
    return idx, wgt


def _bilinear(where: np.ndarray, out_h: int, out_w: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps ``(out_h, out_w, 4)`` of a bilinear resize of the index picture ``where``."""
    y0, y1, wy0, wy1 = _linear_taps(where.shape[0], out_h)
    x0, x1, wx0, wx1 = _linear_taps(where.shape[1], out_w)
    idx = np.stack([where[y0][:, x0], where[y0][:, x1], where[y1][:, x0], where[y1][:, x1]], axis=-1)
    wgt = np.stack([wy0[:, None] * wx0[None], wy0[:, None] * wx1[None],
                    wy1[:, None] * wx0[None], wy1[:, None] * wx1[None]], axis=-1).astype(np.float32)
    return idx, wgt


def pack_inputs(image_sizes, tiles_per_image: Sequence[int], spec: LlavaOnevisionImageSpec, patches_per_side: int,
                newline_row: int | None = None, *, max_ratio: int | str = 9) -> dict[str, np.ndarray]:
    """Host inputs that make the vision graph reproduce ``pack_image_features`` as a gather.

    ``F`` is the projector output of all tiles flattened to ``(total_tiles * pps**2, D)`` rows,
    plus the ``image_newline`` vector as row ``newline_row`` (= ``total_tiles * pps**2``, the
    default; it is checked). Output token ``j`` is ``sum_t gather_weight[j, t] *
    F[gather_index[j, t]]``, tokens in prompt order: per image, its base tile's patches, then
    the unpadded grid row by row, each row closed by a newline (anyres) - or, for a one-tile
    image (multi-image prompts), its patches and one newline. Plain tokens use one tap of
    weight 1; an ``anyres_max`` shrink uses torch's bilinear taps. Returns ``{"gather_index":
    int64 (M, 4), "gather_weight": float32 (M, 4)}``, exactly the graph's extra inputs.
    """
    sizes = np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2)
    counts = [int(n) for n in tiles_per_image]
    if len(counts) != len(sizes):
        raise ImageError(f"{len(sizes)} image sizes but {len(counts)} tile counts")
    if any(n < 1 for n in counts):
        raise ImageError(f"tiles_per_image must be positive, got {counts}")
    pps = _positive_int("patches_per_side", patches_per_side)
    ratio = parse_max_ratio(max_ratio)
    total = sum(counts) * pps * pps
    if newline_row is None:
        newline_row = total
    elif int(newline_row) != total:
        raise ImageError(f"newline_row must be total_tiles * patches_per_side**2 = {total} (the row after all "
                         f"tile features), got {newline_row}")
    idx, wgt, first = [], [], 0
    for (h, w), n in zip(sizes.tolist(), counts):
        spec.check_size(h, w, *((pps, ratio) if n > 1 else ()))
        i, g = _image_gather((h, w), first, n, spec, pps, ratio, total)
        idx.append(i)
        wgt.append(g)
        first += n * pps * pps
    return {"gather_index": np.ascontiguousarray(np.concatenate(idx), dtype=np.int64),
            "gather_weight": np.ascontiguousarray(np.concatenate(wgt), dtype=np.float32)}
