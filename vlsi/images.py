"""Images in, RGB images out: decoding, EXIF orientation, mode conversion and size guards,
written once for training, every runtime and the server (numpy and Pillow only).

Two RGB rules exist, on purpose:

- :func:`to_rgb` is the project's rule, used when a *file* becomes an image (training data,
  runtime prompts, server requests): transparency composited onto white, 16-bit grey
  scaled to 8 bits (divided by 257), float images clipped to 0..255;
- :func:`to_rgb_like_transformers` is what transformers' image processors do with an image
  that is *already* decoded (``do_convert_rgb``): Pillow's ``convert("RGB")``, which clips
  16-bit grey instead of scaling it. The edge preprocessors apply it after :func:`to_rgb`,
  where it is the identity, so that a PIL image handed straight to them gets the pixels the
  HF processor would make of it.

Architecture-specific size rules (Qwen2-VL's aspect-ratio limit, a fixed tile grid...) are
the image spec's ``check_size(height, width)``, which the guards here call when given one.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError, VLsIError

__all__ = ["DEFAULT_MAX_INPUT_PIXELS", "ImageError", "ensure_rgb", "load_image", "to_rgb",
           "pil_images", "to_rgb_like_transformers", "validate_image"]

#: Default decompression-bomb guard: images with more pixels than this are refused unread.
DEFAULT_MAX_INPUT_PIXELS = 50_000_000

ImageSource = bytes | bytearray | memoryview | str | os.PathLike | Image.Image


class ImageError(VLsIError, ValueError):
    """An input image is unusable: undecodable, too large, or of a shape the model cannot take."""


def ensure_rgb(image_ref, *, source=None, record=None) -> Image.Image:
    """Open an image (a path, the encoded bytes of an image file, or a PIL image) as an RGB ``PIL`` image.

    * The EXIF orientation is applied (as ``transformers.image_utils.load_image`` does), so the
      image is the way a person viewing it saw it.
    * Transparency (RGBA, LA, PA, palette or grey with a transparent colour) is composited
      onto **white**, as most image processors do; grey, palette, CMYK, ... are converted.
    * 16-bit grey is scaled to 8 bits (divided by 257); float images are clipped to 0..255.

    ``source``/``record`` only label the :class:`DataError` raised when the image is missing,
    corrupt or of an unconvertible mode.
    """
    where = source if source is not None else (
        str(image_ref) if isinstance(image_ref, (str, os.PathLike)) else "<image bytes>"
    )
    if isinstance(image_ref, Image.Image):  # already decoded: its pixels are taken as given
        return to_rgb(image_ref)
    im = _decode(image_ref, where, record)
    try:
        im = ImageOps.exif_transpose(im) or im
        return to_rgb(im)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            where, record, f"cannot convert the image (mode {im.mode}) to RGB: {type(e).__name__}: {e}"
        ) from None


def _decode(image_ref, where, record) -> Image.Image:
    try:
        if isinstance(image_ref, (bytes, bytearray, memoryview)):
            data = bytes(image_ref)
        elif isinstance(image_ref, (str, os.PathLike)):
            data = Path(image_ref).read_bytes()
        else:
            raise DataError(
                where, record, f"expected an image path or image bytes, got {type(image_ref).__name__}"
            )
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(
            where, record, f"image file not found: {os.path.abspath(image_ref)}"
        ) from None
    except Exception as e:
        raise DataError(
            where, record, f"cannot decode the image, it is corrupt or not an image: "
            f"{type(e).__name__}: {e}"
        ) from None


def to_rgb(im: Image.Image) -> Image.Image:
    """The project's RGB rule (see the module docstring)."""
    if im.mode == "RGB":
        return im
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im)
        if arr.dtype == np.uint16 or im.mode.startswith("I;16") or (
            im.mode == "I" and arr.size and arr.max() > 255
        ):
            arr = arr.astype(np.float64) / 257.0
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        has_alpha = False
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def to_rgb_like_transformers(im: Image.Image) -> Image.Image:
    """RGB conversion as transformers' image processors do it (``do_convert_rgb``).

    An image with an alpha band, or with a ``transparency`` entry (palette, grey or RGB with a
    tRNS chunk), is composited onto opaque white; anything else is ``convert("RGB")``.
    """
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def pil_images(images) -> list[Image.Image]:
    """One PIL image or an iterable of them as a non-empty list, for an architecture's
    preprocessing; anything else is an :class:`ImageError` pointing at :func:`load_image`."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    if not images:
        raise ImageError("preprocessing got no images")
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise ImageError(f"image {i} is a {type(im).__name__}, expected a PIL.Image.Image; "
                             "use vlsi.images.load_image() for bytes and paths")
    return images


_PIL_PIXELS = re.compile(r"\((\d+) pixels\)")


def _check_geometry(width: int, height: int, spec, max_input_pixels: int, where: str,
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
    if spec is not None:
        try:
            spec.check_size(height, width)
        except ImageError as e:
            raise ImageError(f"{where}: {e}") from None


_FORMATS = "send a PNG, JPEG, WebP, GIF, BMP or TIFF file"


def _from_bytes(data: bytes, spec, max_input_pixels: int, where: str) -> Image.Image:
    if not data:
        raise ImageError(f"{where}: cannot decode the image, it is empty (0 bytes); {_FORMATS}")
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
        # Pillow's UnidentifiedImageError names the BytesIO object it read, memory address and
        # all: the message would differ from call to call (and backend to backend)
        why = "Pillow recognises no image format in it" if isinstance(e, UnidentifiedImageError) else e
        raise ImageError(
            f"{where}: cannot decode the image, it is corrupt or not an image file "
            f"({type(e).__name__}: {why}); {_FORMATS}"
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
    spec=None,
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
    *,
    source: str | None = None,
) -> Image.Image:
    """Check an image and return it as RGB, ready for an architecture's preprocessing.

    ``image`` is a PIL image or the bytes of an image file. Bytes are decoded only after the
    header's size passed the ``max_input_pixels`` guard, then converted by
    :func:`ensure_rgb` (EXIF rotation applied, transparency composited onto
    white, 16-bit grey scaled to 8 bits). A PIL image is converted the same way, without EXIF
    rotation (its pixels are taken as given). Raises :class:`ImageError` for undecodable data,
    more than ``max_input_pixels`` pixels, an empty image, or a size ``spec.check_size``
    refuses (Qwen2-VL: an aspect ratio over 200, or with ``do_resize=False`` sides that are not
    multiples of ``patch_size * merge_size``).
    ``source`` names the image in messages.
    """
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
        return to_rgb(image)
    except Exception as e:  # noqa: BLE001 - OSError (truncated), ValueError, ...
        raise ImageError(
            f"{where}: cannot decode or convert the image (mode {image.mode}) to RGB: {type(e).__name__}: {e}"
        ) from None


def decode_data_uri(uri: str) -> bytes:
    """The bytes of a ``data:[type];base64,PAYLOAD`` URI; ImageError when it is not one."""
    import base64
    import binascii

    head, sep, payload = uri.partition(",")
    if not sep or ";base64" not in head:
        raise ImageError("the image data URI must be base64 encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the image data URI is not valid base64") from None


def load_image(
    src: ImageSource,
    spec=None,
    *,
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
) -> Image.Image:
    """Open an image (file path, file bytes or PIL image) as a checked RGB PIL image.

    Paths are read once into memory, then handled like bytes by :func:`validate_image`; a
    ``data:image/...;base64,`` URI (what chat messages carry) is decoded first. Remote URLs are
    refused: nothing is fetched.
    """
    if isinstance(src, str) and src.startswith("data:"):
        return validate_image(decode_data_uri(src), spec, max_input_pixels, source="data URI")
    if isinstance(src, str) and src.split(":", 1)[0].lower() in ("http", "https", "ftp"):
        raise ImageError(f"{src[:60]}: remote images are not fetched; pass a file path, the bytes or a data URI")
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

