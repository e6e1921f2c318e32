"""Qwen2-VL's numpy/Pillow preprocessing (vlsi.archs.qwen2_vl.image) equals transformers' PIL
processor; the image guards (vlsi.images) refuse what they should."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlsi.errors import ConfigError, VLsIError
from vlsi.archs.qwen2_vl.image import Qwen2VLImageSpec, num_image_tokens, preprocess_images, smart_resize
from vlsi.images import DEFAULT_MAX_INPUT_PIXELS, ImageError, load_image, validate_image

REPO = Path(__file__).resolve().parents[1]
TINY_PX = 84 * 84
TOL = 1e-6

SIZES = [(28, 28), (56, 84), (84, 84), (100, 37), (37, 300), (640, 480), (1000, 1000), (1, 1), (29, 27)]


# --------------------------------------------------------------------------- helpers


def _hf():
    mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    return mod.Qwen2VLImageProcessorPil


@pytest.fixture(scope="module")
def hf_default():
    return _hf()()


@pytest.fixture(scope="module")
def hf_tiny():
    return _hf()(size={"shortest_edge": TINY_PX, "longest_edge": TINY_PX})


SPEC_DEFAULT = Qwen2VLImageSpec()
SPEC_TINY = Qwen2VLImageSpec(min_pixels=TINY_PX, max_pixels=TINY_PX)


def rand_image(w, h, seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed + 7919 * w + h)
    # smooth-ish content plus noise, so resampling filters have something to do
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 3 + yy) % 256, (yy * 5) % 256, (xx * yy) % 256], axis=-1)
    arr = np.clip(base + rng.integers(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    return im if mode == "RGB" else im.convert(mode)


def hf_run(proc, images):
    out = proc(images, return_tensors="np")
    return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


def assert_same(ours, theirs):
    pv, grid = ours
    hpv, hgrid = theirs
    assert pv.dtype == np.float32 and grid.dtype == np.int64
    assert pv.shape == hpv.shape, (pv.shape, hpv.shape)
    np.testing.assert_array_equal(grid, hgrid)
    err = float(np.abs(pv - hpv).max())
    assert err <= TOL, f"max-abs error {err}"


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR was rewritten to claim ``width x height`` (tiny on disk)."""
    b = bytearray(png_bytes(Image.new("1", (1, 1))))
    assert b[12:16] == b"IHDR"
    b[16:20] = struct.pack(">I", width)
    b[20:24] = struct.pack(">I", height)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


# --------------------------------------------------------------------------- equality with transformers


@pytest.mark.parametrize("w,h", SIZES)
def test_matches_transformers_default(hf_default, w, h):
    im = rand_image(w, h)
    assert_same(preprocess_images([im], SPEC_DEFAULT), hf_run(hf_default, im))


@pytest.mark.parametrize("w,h", SIZES)
def test_matches_transformers_tiny(hf_tiny, w, h):
    im = rand_image(w, h, seed=1)
    ours = preprocess_images([im], SPEC_TINY)
    assert_same(ours, hf_run(hf_tiny, im))
    assert ours[0].shape[1] == 1176


def _mode_image(kind: str) -> Image.Image:
    im = rand_image(97, 61, seed=3)
    alpha = Image.fromarray(np.random.default_rng(5).integers(0, 256, (61, 97), dtype=np.uint8))
    if kind == "RGBA":
        im.putalpha(alpha)
        return im
    if kind == "LA":
        im.putalpha(alpha)
        return im.convert("LA")
    if kind == "P":
        return im.quantize(32)
    if kind == "P+transparency":
        p = im.quantize(32)
        p.info["transparency"] = 5
        return p
    return im.convert(kind)  # "L", "CMYK", "1"


@pytest.mark.parametrize("kind", ["L", "RGBA", "P", "P+transparency", "LA", "CMYK", "1"])
def test_matches_transformers_modes(hf_default, hf_tiny, kind):
    im = _mode_image(kind)
    for proc, spec in ((hf_default, SPEC_DEFAULT), (hf_tiny, SPEC_TINY)):
        ref = hf_run(proc, im)
        assert_same(preprocess_images([im], spec), ref)  # raw PIL input, converted like transformers
        rgb = validate_image(im, spec)  # the repo's conversion (ensure_rgb's) agrees for these modes
        assert rgb.mode == "RGB"
        assert_same(preprocess_images([rgb], spec), ref)
        # and through encoded bytes, as an edge server receives it
        if kind != "CMYK":
            assert_same(preprocess_images([load_image(png_bytes(im), spec)], spec), ref)


def test_matches_transformers_two_images(hf_default, hf_tiny):
    ims = [rand_image(640, 480, seed=4), rand_image(37, 300, seed=5)]
    for proc, spec in ((hf_default, SPEC_DEFAULT), (hf_tiny, SPEC_TINY)):
        pv, grid = preprocess_images(ims, spec)
        assert_same((pv, grid), hf_run(proc, ims))
        assert grid.shape == (2, 3)
        assert pv.shape[0] == int(grid.prod(axis=1).sum())


def test_smart_resize_matches_transformers():
    mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 3000, (300, 2))]
    sizes += [(14, 14), (42, 42), (70, 98), (5600, 28), (1, 200), (2, 399)]  # ties, extremes
    for min_px, max_px in ((56 * 56, 28 * 28 * 1280), (TINY_PX, TINY_PX), (100, 200_000)):
        for h, w in sizes:
            if max(h, w) / min(h, w) > 200:
                continue
            assert smart_resize(h, w, 28, min_px, max_px) == mod.smart_resize(h, w, 28, min_px, max_px), (h, w)


def test_grid_and_token_count(hf_tiny, hf_default):
    for w, h in SIZES:
        for proc, spec in ((hf_default, SPEC_DEFAULT), (hf_tiny, SPEC_TINY)):
            rh, rw = smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels)
            g = (1, rh // spec.patch_size, rw // spec.patch_size)
            assert g[1] * g[2] == proc.get_number_of_image_patches(h, w)
            assert num_image_tokens(g, spec.merge_size) == g[1] * g[2] // 4
    assert num_image_tokens((1, 6, 6), 2) == 9  # the tiny models: 84x84 -> 9 image tokens
    with pytest.raises(ImageError):
        num_image_tokens((1, 5, 6), 2)


# --------------------------------------------------------------------------- preprocessor_config.json


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"size": {"shortest_edge": TINY_PX, "longest_edge": TINY_PX}},
        {
            "size": {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 64},
            "resample": 2,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.25, 0.5, 0.75],
        },
    ],
    ids=["default", "tiny", "custom"],
)
def test_from_saved_preprocessor_config(tmp_path, kwargs):
    proc = _hf()(**kwargs)
    proc.save_pretrained(tmp_path)
    spec = Qwen2VLImageSpec.from_preprocessor_config(tmp_path)
    assert spec == Qwen2VLImageSpec.from_preprocessor_config(tmp_path / "preprocessor_config.json")
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert spec == Qwen2VLImageSpec.from_preprocessor_config(cfg)
    assert spec.min_pixels == proc.size["shortest_edge"] and spec.max_pixels == proc.size["longest_edge"]
    reloaded = _hf().from_pretrained(tmp_path)
    ims = [rand_image(640, 480, seed=6), rand_image(100, 37, seed=7)]
    assert_same(preprocess_images(ims, spec), hf_run(reloaded, ims))


def test_from_legacy_config_min_max_pixels(tmp_path):
    """Qwen2-VL-2B-Instruct style: top-level min_pixels/max_pixels, no size; they win over size."""
    cfg = {
        "min_pixels": 3136,
        "max_pixels": 200_704,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    spec = Qwen2VLImageSpec.from_preprocessor_config(tmp_path)
    assert (spec.min_pixels, spec.max_pixels) == (3136, 200_704)
    im = rand_image(1000, 1000, seed=8)
    assert_same(preprocess_images([im], spec), hf_run(_hf().from_pretrained(tmp_path), im))
    both = dict(cfg, size={"shortest_edge": 999, "longest_edge": 888})
    assert Qwen2VLImageSpec.from_preprocessor_config(both).max_pixels == 200_704


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Qwen2VLImageSpec.from_preprocessor_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        Qwen2VLImageSpec.from_preprocessor_config(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="shortest_edge"):
        Qwen2VLImageSpec.from_preprocessor_config({"size": {"height": 224, "width": 224}})
    with pytest.raises(ConfigError, match="patch_size"):
        Qwen2VLImageSpec.from_preprocessor_config({"patch_size": 0})
    with pytest.raises(ConfigError, match="resample"):
        Qwen2VLImageSpec(resample=42)


# --------------------------------------------------------------------------- bad inputs


def test_image_error_type():
    assert issubclass(ImageError, VLsIError) and issubclass(ImageError, ValueError)


def test_undecodable_bytes():
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(b"this is not an image at all")
    with pytest.raises(ImageError, match="cannot decode"):
        validate_image(b"\x89PNG\r\n\x1a\n garbage")


def test_truncated_png():
    data = png_bytes(rand_image(64, 64, seed=9))
    with pytest.raises(ImageError, match="decode"):
        load_image(data[: len(data) // 2])
    with pytest.raises(ImageError):  # lazily opened PIL image: fails on conversion
        validate_image(Image.open(io.BytesIO(data[: len(data) // 2])))


def _no_decode(monkeypatch):
    import vlsi.images as pp

    def boom(*a, **k):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(pp, "ensure_rgb", boom)


def test_huge_header_rejected_before_decoding(monkeypatch):
    _no_decode(monkeypatch)
    # 20000 x 20000 = 400 Mpx: above Pillow's own bomb limit too
    with pytest.raises(ImageError, match=f"max_input_pixels={DEFAULT_MAX_INPUT_PIXELS}") as e:
        load_image(png_claiming_size(20000, 20000))
    assert "not decoded" in str(e.value) and "400000000" in str(e.value)
    # 8000 x 8000 = 64 Mpx: Pillow would open it, our guard refuses it
    with pytest.raises(ImageError, match="8000x8000") as e:
        load_image(png_claiming_size(8000, 8000))
    assert f"max_input_pixels={DEFAULT_MAX_INPUT_PIXELS}" in str(e.value) and "not decoded" in str(e.value)


def test_custom_pixel_limit(tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(png_bytes(rand_image(100, 100)))
    with pytest.raises(ImageError, match="max_input_pixels=5000"):
        load_image(p, max_input_pixels=5000)
    with pytest.raises(ImageError, match="max_input_pixels=5000"):
        validate_image(rand_image(100, 100), max_input_pixels=5000)
    assert load_image(p, max_input_pixels=10_000).size == (100, 100)


@pytest.mark.parametrize("w,h", [(1, 500), (500, 2)])
def test_extreme_aspect_ratio(w, h):
    im = rand_image(w, h)
    for call in (
        lambda: load_image(png_bytes(im), SPEC_DEFAULT),
        lambda: validate_image(im, SPEC_DEFAULT),
        lambda: preprocess_images([im]),
        lambda: smart_resize(h, w),
    ):
        with pytest.raises(ImageError, match="aspect ratio .* exceeds 200"):
            call()
    assert validate_image(rand_image(1, 200), SPEC_DEFAULT).size == (1, 200)  # exactly 200 is allowed, as in HF
    # without a spec only the generic guards apply: the shape is the architecture's business
    assert load_image(png_bytes(im)).size == (w, h)


def test_empty_and_wrong_types(tmp_path):
    with pytest.raises(ImageError, match="no pixels"):
        validate_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="expected a PIL"):
        preprocess_images([np.zeros((28, 28, 3), np.uint8)])
    with pytest.raises(ImageError, match="no images"):
        preprocess_images([])


def test_do_resize_false_needs_multiples():
    spec = Qwen2VLImageSpec(do_resize=False)
    pv, grid = preprocess_images([rand_image(56, 84)], spec)
    assert grid.tolist() == [[1, 6, 4]] and pv.shape == (24, 1176)
    with pytest.raises(ImageError, match="multiples of patch_size\\*merge_size = 28"):
        preprocess_images([rand_image(57, 84)], spec)


def test_load_image_matches_training_loader(tmp_path):
    from vlsi.data.loaders import ensure_rgb

    im = _mode_image("RGBA")
    p = tmp_path / "x.png"
    p.write_bytes(png_bytes(im))
    for src in (p, str(p), p.read_bytes()):
        out = load_image(src, SPEC_TINY)
        assert out.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ensure_rgb(p)))
    # EXIF orientation is applied (6 = rotate 90 degrees): 40x20 stored -> 20x40 shown
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    rand_image(40, 20).save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)


# --------------------------------------------------------------------------- no torch / transformers


def test_imports_without_torch_or_transformers(tmp_path):
    (tmp_path / "img.png").write_bytes(png_bytes(rand_image(100, 100)))  # -> 84x84 -> 6x6 patches
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None
        sys.modules["transformers"] = None
        import numpy as np
        import vlsi.archs.qwen2_vl.image as pp
        from vlsi.images import load_image
        spec = pp.Qwen2VLImageSpec(min_pixels=84 * 84, max_pixels=84 * 84)
        im = load_image({str(tmp_path / "img.png")!r}, spec)
        pv, grid = pp.preprocess_images([im, im], spec)
        assert pv.shape == (72, 1176) and pv.dtype == np.float32, pv.shape
        assert grid.tolist() == [[1, 6, 6], [1, 6, 6]]
        heavy = sorted(m for m in sys.modules
                       if m.split(".")[0] in ("torch", "transformers", "torchvision")
                       and sys.modules[m] is not None)
        assert not heavy, heavy
        print("ok")
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=False,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
