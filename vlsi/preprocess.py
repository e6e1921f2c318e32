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
bit-identical to it (the tests check max-abs error <= 1e-6; in practice it is 0).

Input hygiene lives here too: :func:`load_image` and :func:`validate_image` turn bytes, paths
or PIL images into RGB images, refusing undecodable data, decompression bombs (checked on the
header, before any pixel is decoded) and shapes ``smart_resize`` cannot take (aspect ratio
over 200), each with an :class:`ImageError` that says what to do. Decoding and RGB conversion
reuse :func:`vlsi.data.loaders.ensure_rgb`, so an image read at the edge becomes the same RGB
pixels as the same file read by the training data loaders.

Nothing here imports torch or transformers (a test proves it in a subprocess).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlsi.data.loaders import _to_rgb, ensure_rgb
from vlsi.errors import ConfigError, DataError, VLsIError

__all__ = [
    "DEFAULT_MAX_INPUT_PIXELS",
    "MAX_ASPECT_RATIO",
    "ImageError",
    "Qwen2VLImageSpec",
    "grid_thw_for_size",
    "load_image",
    "num_image_tokens",
    "preprocess_images",
    "smart_resize",
    "validate_image",
]

#: Default decompression-bomb guard: images with more pixels than this are refused unread.
DEFAULT_MAX_INPUT_PIXELS = 50_000_000
#: ``smart_resize`` (and so transformers) refuses images whose long side / short side exceeds this.
MAX_ASPECT_RATIO = 200

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageSource = bytes | bytearray | memoryview | str | os.PathLike | Image.Image


class ImageError(VLsIError, ValueError):
    """An input image is unusable: undecodable, too large, or of a shape the model cannot take."""


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class Qwen2VLImageSpec:
    """The settings of a Qwen2-VL image processor (what ``preprocessor_config.json`` holds).

    ``min_pixels`` / ``max_pixels`` are the ``size.shortest_edge`` / ``size.longest_edge`` of
    the transformers processor (they are pixel counts, not edge lengths, despite the names).
    The repo's tiny models use ``min_pixels = max_pixels = 84 * 84``.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple = _CLIP_MEAN
    image_std: tuple = _CLIP_STD
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
        if any(s == 0 for s in self.image_std):
            raise ConfigError(f"image spec: image_std has a zero entry {self.image_std}; it is a divisor")
        if isinstance(self.rescale_factor, bool) or not isinstance(self.rescale_factor, (int, float)):
            raise ConfigError(f"image spec: rescale_factor must be a number, got {self.rescale_factor!r}")
        object.__setattr__(self, "rescale_factor", float(self.rescale_factor))
        try:
            resample = int(self.resample)
            Image.Resampling(resample)
        except (TypeError, ValueError):
            allowed = ", ".join(f"{r.value} ({r.name.lower()})" for r in Image.Resampling)
            raise ConfigError(
                f"image spec: resample must be a Pillow filter number, one of {allowed}; got {self.resample!r}"
            ) from None
        object.__setattr__(self, "resample", resample)
        for name in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            object.__setattr__(self, name, bool(getattr(self, name)))

    @property
    def factor(self) -> int:
        """Both sides of a resized image are multiples of this (``patch_size * merge_size``)."""
        return self.patch_size * self.merge_size

    def patch_dim(self, channels: int = 3) -> int:
        """Length of one row of ``pixel_values``: ``C * temporal_patch_size * patch_size**2``."""
        return channels * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_preprocessor_config(cls, path_or_dict: str | os.PathLike | dict) -> Qwen2VLImageSpec:
        """Read a ``preprocessor_config.json`` (a file, the folder holding it, or its dict).

        Mirrors how ``Qwen2VLImageProcessor(Pil)`` reads it: ``size`` (``shortest_edge`` =
        min_pixels, ``longest_edge`` = max_pixels) replaces the default size, then top-level
        ``min_pixels`` / ``max_pixels`` (older configs, e.g. Qwen2-VL-2B-Instruct's) override
        it. Missing or null keys take the class defaults; unknown keys are ignored.
        """
        if isinstance(path_or_dict, dict):
            cfg, where = path_or_dict, "<preprocessor config dict>"
        elif isinstance(path_or_dict, (str, os.PathLike)):
            p = Path(path_or_dict).expanduser()
            if p.is_dir():
                p = p / "preprocessor_config.json"
            where = str(p)
            try:
                cfg = json.loads(p.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise ConfigError(
                    f"{where} not found: pass a preprocessor_config.json or the model folder holding it"
                ) from None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f"{where}: cannot read it as JSON: {type(e).__name__}: {e}") from None
            if not isinstance(cfg, dict):
                raise ConfigError(f"{where}: expected a JSON object at the top level, got {type(cfg).__name__}")
        else:
            raise ConfigError(
                f"from_preprocessor_config takes a path or a dict, got {type(path_or_dict).__name__}"
            )

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


def grid_thw_for_size(height: int, width: int, spec: Qwen2VLImageSpec | None = None) -> tuple[int, int, int]:
    """The ``image_grid_thw`` row an image of this size gets, without touching pixels."""
    spec = spec or Qwen2VLImageSpec()
    h, w = _target_size(height, width, spec)
    return 1, h // spec.patch_size, w // spec.patch_size


def num_image_tokens(grid_thw_row: Sequence[int], merge_size: int = 2) -> int:
    """How many ``<|image_pad|>`` tokens an image with this ``(t, h, w)`` grid takes in the prompt."""
    t, h, w = (int(x) for x in grid_thw_row)
    if min(t, h, w) < 1 or h % merge_size or w % merge_size:
        raise ImageError(
            f"grid_thw {tuple(grid_thw_row)} is not a valid grid for merge_size={merge_size}: "
            f"t, h, w must be positive and h, w multiples of merge_size"
        )
    return t * h * w // (merge_size * merge_size)


# --------------------------------------------------------------------------- pixels


def _to_rgb_like_transformers(im: Image.Image) -> Image.Image:
    """RGB conversion as transformers' image processors do it (``do_convert_rgb``).

    An image with an alpha band, or with a ``transparency`` entry (palette, grey or RGB with a
    tRNS chunk), is composited onto opaque white; anything else is ``convert("RGB")``.
    """
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


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
        im = _to_rgb_like_transformers(im)
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
    :func:`load_image` / :func:`validate_image` first to get the training loaders' conversion
    and the size guards.
    """
    spec = spec or Qwen2VLImageSpec()
    if isinstance(images, Image.Image):
        images = [images]
    images = list(images)
    if not images:
        raise ImageError("preprocess_images got no images")
    patches, grids = [], []
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise ImageError(
                f"image {i} is a {type(im).__name__}, expected a PIL.Image.Image; "
                f"use load_image() for bytes and paths"
            )
        try:
            p, g = _one_image(im, spec)
        except ImageError as e:
            if len(images) == 1:
                raise
            raise ImageError(f"image {i}: {e}") from None
        patches.append(p)
        grids.append(g)
    return np.concatenate(patches, axis=0), np.asarray(grids, dtype=np.int64)


# --------------------------------------------------------------------------- input hygiene


_PIL_PIXELS = re.compile(r"\((\d+) pixels\)")


def _check_geometry(width: int, height: int, spec: Qwen2VLImageSpec, max_input_pixels: int, where: str,
                    decoded: bool) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"{where}: image has no pixels ({width}x{height}, width x height)")
    if max_input_pixels is not None and width * height > max_input_pixels:
        unread = "" if decoded else "; it was not decoded"
        raise ImageError(
            f"{where}: image is {width}x{height} = {width * height} pixels, more than "
            f"max_input_pixels={max_input_pixels} ({max_input_pixels / 1e6:g} megapixels, a "
            f"decompression-bomb guard){unread}. Downscale it before sending it, or pass a larger "
            f"max_input_pixels if the source is trusted"
        )
    try:
        _target_size(height, width, spec)
    except ImageError as e:
        raise ImageError(f"{where}: {e}") from None


def _from_bytes(data: bytes, spec: Qwen2VLImageSpec, max_input_pixels: int, where: str) -> Image.Image:
    try:
        head = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:
        m = _PIL_PIXELS.search(str(e))
        n = int(m.group(1)) if m else None
        if n is not None and n > max_input_pixels:
            limit = f"max_input_pixels={max_input_pixels} ({max_input_pixels / 1e6:g} megapixels)"
        else:  # the caller allowed more than Pillow's own guard does
            limit = f"Pillow's limit Image.MAX_IMAGE_PIXELS * 2 = {2 * (Image.MAX_IMAGE_PIXELS or 0)}"
        raise ImageError(
            f"{where}: image header says {n if n is not None else 'too many'} pixels, more than "
            f"{limit}, a decompression-bomb guard; it was not decoded. Downscale it before sending it"
        ) from None
    except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, OSError, SyntaxError, ...
        raise ImageError(
            f"{where}: cannot decode the image, it is corrupt or not an image file "
            f"({type(e).__name__}: {e}); send a PNG, JPEG, WebP, GIF, BMP or TIFF file"
        ) from None
    with head:
        width, height = head.size
    _check_geometry(width, height, spec, max_input_pixels, where, decoded=False)
    try:
        im = ensure_rgb(data, source=where)
    except DataError as e:
        raise ImageError(f"{e}; send a complete PNG, JPEG, WebP, GIF, BMP or TIFF file") from None
    # EXIF rotation may swap the sides: check the do_resize=False divisibility on the result
    _check_geometry(im.width, im.height, spec, None, where, decoded=True)
    return im


def validate_image(
    image: Image.Image | bytes | bytearray | memoryview,
    spec: Qwen2VLImageSpec | None = None,
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
    *,
    source: str | None = None,
) -> Image.Image:
    """Check an image and return it as RGB, ready for :func:`preprocess_images`.

    ``image`` is a PIL image or the bytes of an image file. Bytes are decoded only after the
    header's size passed the ``max_input_pixels`` guard, then converted by
    :func:`vlsi.data.loaders.ensure_rgb` (EXIF rotation applied, transparency composited onto
    white, 16-bit grey scaled to 8 bits). A PIL image is converted the same way, without EXIF
    rotation (its pixels are taken as given). Raises :class:`ImageError` for undecodable data,
    more than ``max_input_pixels`` pixels, an empty image, an aspect ratio over 200, or (with
    ``do_resize=False``) sides that are not multiples of ``patch_size * merge_size``.
    ``source`` names the image in messages.
    """
    spec = spec or Qwen2VLImageSpec()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(image), spec, max_input_pixels, source or "<image bytes>")
    if not isinstance(image, Image.Image):
        raise ImageError(
            f"{source or '<image>'}: expected a PIL image or image file bytes, got {type(image).__name__}"
        )
    where = source or f"<{image.mode} image {image.width}x{image.height}>"
    _check_geometry(image.width, image.height, spec, max_input_pixels, where, decoded=True)
    try:
        image.load()  # a lazily opened image is decoded here, so a truncated file fails now
        return _to_rgb(image)
    except Exception as e:  # noqa: BLE001 - OSError (truncated), ValueError, ...
        raise ImageError(
            f"{where}: cannot decode or convert the image (mode {image.mode}) to RGB: {type(e).__name__}: {e}"
        ) from None


def load_image(
    src: ImageSource,
    spec: Qwen2VLImageSpec | None = None,
    *,
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
) -> Image.Image:
    """Open an image (file path, file bytes or PIL image) as a checked RGB PIL image.

    Paths are read once into memory, then handled like bytes by :func:`validate_image`.
    """
    if isinstance(src, (str, os.PathLike)):
        path = Path(src).expanduser()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageError(f"image file not found: {path.absolute()}") from None
        except OSError as e:
            raise ImageError(f"{path}: cannot read the image file: {type(e).__name__}: {e}") from None
        return validate_image(data, spec, max_input_pixels, source=str(path))
    return validate_image(src, spec, max_input_pixels)
