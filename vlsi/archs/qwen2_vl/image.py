"""Qwen2-VL image preprocessing in numpy + Pillow only, for edge runtimes.

ONNX Runtime and llama.cpp front ends must not import torch or transformers, yet they have to
feed the vision tower exactly what training fed it. This module re-implements the PIL path of
``transformers``' ``Qwen2VLImageProcessorPil`` (transformers 5.x) and its ``smart_resize``:

1. convert to RGB (alpha and ``transparency`` composited onto white, as transformers does);
2. resize with Pillow to the ``smart_resize`` size (both sides multiples of
   ``patch_size * merge_size``, pixel count kept in ``[min_pixels, max_pixels]``), on the uint8
   image, with the configured filter (bicubic by default);
3. rescale: ``float32(float64(uint8) * rescale_factor)``;
4. normalise in float32: ``(x - mean) / std`` per channel;
5. cut into ``patch_size`` squares ordered merge-group by merge-group, each patch repeated
   ``temporal_patch_size`` times along time (a still image is a clip of identical frames),
   flattened to ``(num_patches, C * temporal_patch_size * patch_size**2)`` = ``(N, 1176)``.

The arithmetic is done in the same dtypes and order as transformers, so the output is
bit-identical to it (the tests check max-abs error <= 1e-6; in practice it is 0). Qwen2.5-VL
uses the same processor. Decoding, EXIF orientation and the size guards are
:mod:`vlsi.images`'s; :meth:`Qwen2VLImageSpec.check_size` is the part of them that is Qwen2-VL's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

from vlsi.errors import ConfigError
from vlsi.images import ImageError, pil_images, to_rgb_like_transformers

from ..processor import CLIP_MEAN, CLIP_STD, check_pixel_settings, read_preprocessor_config

#: ``smart_resize`` (and so transformers) refuses images whose long side / short side exceeds this.
MAX_ASPECT_RATIO = 200




@dataclass(frozen=True)
class Qwen2VLImageSpec:
    """The settings of a Qwen2-VL image processor (what ``preprocessor_config.json`` holds).

    ``min_pixels`` / ``max_pixels`` are the ``size.shortest_edge`` / ``size.longest_edge`` of
    the transformers processor (they are pixel counts, not edge lengths, despite the names).
    The repo's tiny models use llama.cpp clip's bounds, 8 to 4096 merged tokens
    (``vlsi.tiny.tiny_image_processor``), so a 56 px square becomes 84 px.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"image spec: {name} must be a positive integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                v = (v,)
            try:
                v = tuple(float(x) for x in v)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"image spec: {name} must be a number or a list of numbers (one per channel), got {v!r}"
                ) from None
            if not v:
                raise ConfigError(f"image spec: {name} is empty; give one value per channel (3 for RGB)")
            object.__setattr__(self, name, v)
        check_pixel_settings(self, ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"))

    @property
    def factor(self) -> int:
        """Both sides of a resized image are multiples of this (``patch_size * merge_size``)."""
        return self.patch_size * self.merge_size

    def check_size(self, height: int, width: int) -> None:
        """Raise :class:`~vlsi.images.ImageError` for a size this processor cannot take."""
        _target_size(height, width, self)

    def resize(self, im: Image.Image) -> Image.Image:
        """RGB conversion and resize exactly as the processor does them (see :func:`resize_for_spec`)."""
        return resize_for_spec(im, self)

    @classmethod
    def from_preprocessor_config(cls, path_or_dict: str | os.PathLike | dict) -> Qwen2VLImageSpec:
        """Read a ``preprocessor_config.json`` (a file, the folder holding it, or its dict).

        Mirrors how ``Qwen2VLImageProcessor(Pil)`` reads it: ``size`` (``shortest_edge`` =
        min_pixels, ``longest_edge`` = max_pixels) replaces the default size, then top-level
        ``min_pixels`` / ``max_pixels`` (older configs, e.g. Qwen2-VL-2B-Instruct's) override
        it. Missing or null keys take the class defaults; unknown keys are ignored.
        """
        cfg, where = read_preprocessor_config(path_or_dict)

        defaults = cls()
        kw: dict[str, Any] = {}
        min_px, max_px = defaults.min_pixels, defaults.max_pixels
        size = cfg.get("size")
        if size is not None:
            if not isinstance(size, dict):
                raise ConfigError(
                    f"{where}: size must be an object with shortest_edge and longest_edge (pixel counts), "
                    f"got {size!r}"
                )
            min_px = size.get("shortest_edge", size.get("min_pixels"))
            max_px = size.get("longest_edge", size.get("max_pixels"))
        if cfg.get("min_pixels") is not None:
            min_px = cfg["min_pixels"]
        if cfg.get("max_pixels") is not None:
            max_px = cfg["max_pixels"]
        if not min_px or not max_px:
            raise ConfigError(
                f"{where}: Qwen2-VL needs size.shortest_edge (min_pixels) and size.longest_edge "
                f"(max_pixels), got size={size!r}"
            )
        kw["min_pixels"], kw["max_pixels"] = min_px, max_px
        for f in fields(cls):
            if f.name in ("min_pixels", "max_pixels"):
                continue
            if cfg.get(f.name) is not None:
                kw[f.name] = cfg[f.name]
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None



# --------------------------------------------------------------------------- geometry


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """The ``(height, width)`` transformers resizes an image to, both multiples of ``factor``.

    The sides are rounded to the nearest multiple of ``factor`` (Python's round, ties to
    even); if that leaves more than ``max_pixels`` pixels both sides shrink by the same ratio
    (rounding down), if fewer than ``min_pixels`` both grow (rounding up). Never smaller than
    ``factor`` when shrinking. Raises :class:`ImageError` (a ValueError, like transformers) when
    the aspect ratio exceeds 200 or a side is below 1.
    """
    if height < 1 or width < 1:
        raise ImageError(f"image has no pixels ({width}x{height}, width x height)")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"image is {width}x{height} (width x height): aspect ratio {ratio:.1f} exceeds "
            f"{MAX_ASPECT_RATIO}, the most Qwen2-VL's smart_resize accepts; crop it, or pad the "
            f"short side, so that the long side is at most {MAX_ASPECT_RATIO} times the short side"
        )
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


def _target_size(height: int, width: int, spec: Qwen2VLImageSpec) -> tuple[int, int]:
    if spec.do_resize:
        return smart_resize(height, width, spec.factor, spec.min_pixels, spec.max_pixels)
    if height < 1 or width < 1:
        raise ImageError(f"image has no pixels ({width}x{height}, width x height)")
    if height % spec.factor or width % spec.factor:
        raise ImageError(
            f"image is {width}x{height} (width x height) and the spec has do_resize=False, so both "
            f"sides must be multiples of patch_size*merge_size = {spec.factor}; resize or crop it first"
        )
    return height, width


def num_image_tokens(grid_thw_row: Sequence[int], merge_size: int = 2) -> int:
    """How many ``<|image_pad|>`` tokens an image with this ``(t, h, w)`` grid takes in the prompt."""
    t, h, w = (int(x) for x in grid_thw_row)
    if min(t, h, w) < 1 or h % merge_size or w % merge_size:
        raise ImageError(
            f"grid_thw {tuple(grid_thw_row)} is not a valid grid for merge_size={merge_size}: "
            f"t, h, w must be positive and h, w multiples of merge_size"
        )
    return t * h * w // (merge_size * merge_size)



def _patchify(chw: np.ndarray, spec: Qwen2VLImageSpec) -> np.ndarray:
    """(C, H, W) float32 -> (H/p * W/p, C * T * p * p), rows ordered merge group by merge group."""
    c, height, width = chw.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = height // p, width // p
    # axes: channel, merge-row block, row in block, pixel row, merge-col block, col in block, pixel col
    x = chw.reshape(c, gh // m, m, p, gw // m, m, p)
    # -> (row block, col block, row in block, col in block, channel, pixel row, pixel col)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)
    # a still image is a clip of `t` identical frames: the time axis goes after the channel
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t,) + x.shape[5:])
    return x.reshape(gh * gw, c * t * p * p)


def resize_for_spec(im: Image.Image, spec: Qwen2VLImageSpec) -> Image.Image:
    """RGB conversion and resize exactly as the processor does them, before any arithmetic
    (runtimes that take 8-bit images, like llama.cpp's mtmd, get the pixels the model sees)."""
    if spec.do_convert_rgb:
        im = to_rgb_like_transformers(im)
    elif im.mode not in ("RGB", "L"):
        raise ImageError(
            f"image mode {im.mode!r} needs converting but the spec has do_convert_rgb=False; "
            f"convert it to RGB first (load_image / validate_image do)"
        )
    width, height = im.size
    new_h, new_w = _target_size(height, width, spec)
    if spec.do_resize and (new_w, new_h) != (width, height):
        im = im.resize((new_w, new_h), resample=spec.resample)
    return im


def _one_image(im: Image.Image, spec: Qwen2VLImageSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    im = resize_for_spec(im, spec)
    new_w, new_h = im.size
    x = np.asarray(im)
    x = x[None] if x.ndim == 2 else np.moveaxis(x, -1, 0)  # (C, H, W) uint8
    channels = x.shape[0]
    if spec.do_rescale:
        # multiply in float64, then round to float32: transformers' order (matters for bit equality)
        x = (x.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    if spec.do_normalize:
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        mean, std = spec.image_mean, spec.image_std
        if len(mean) == 1:
            mean = mean * channels
        if len(std) == 1:
            std = std * channels
        if len(mean) != channels or len(std) != channels:
            raise ImageError(
                f"the image has {channels} channel(s) but image_mean has {len(mean)} and image_std "
                f"{len(std)} entries; convert the image to RGB or fix the spec"
            )
        x = (x - np.asarray(mean, dtype=x.dtype)[:, None, None]) / np.asarray(std, dtype=x.dtype)[:, None, None]
    x = np.asarray(x, dtype=np.float32)
    grid = (1, new_h // spec.patch_size, new_w // spec.patch_size)
    return _patchify(x, spec), grid


def preprocess_images(
    images: Image.Image | Iterable[Image.Image], spec: Qwen2VLImageSpec | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(pixel_values, image_grid_thw)`` for a list of PIL images, as transformers makes them.

    ``pixel_values`` is float32 ``(sum of h*w over images, C * temporal_patch_size *
    patch_size**2)``, the images' patches one after the other; ``image_grid_thw`` is int64
    ``(n_images, 3)`` with rows ``(1, h, w)`` in patches. Images are used as given (no EXIF
    rotation; 16-bit grey is converted the way Pillow does it): pass them through
    :func:`vlsi.images.load_image` / :func:`vlsi.images.validate_image` first to get the training loaders' conversion
    and the size guards.
    """
    spec = spec or Qwen2VLImageSpec()
    images = pil_images(images)
    patches, grids = [], []
    for i, im in enumerate(images):
        try:
            p, g = _one_image(im, spec)
        except ImageError as e:
            if len(images) == 1:
                raise
            raise ImageError(f"image {i}: {e}") from None
        patches.append(p)
        grids.append(g)
    return np.concatenate(patches, axis=0), np.asarray(grids, dtype=np.int64)
