"""Odd images give the same answer on every backend, or the same clear refusal.

Each image is fed as the bytes of its file and as a path to it, to the torch, ONNX and GGUF
runtimes of the session's tiny Qwen2-VL. Accepted images: the same prompt ids and greedy text
everywhere; torch and ONNX within the fp32 parity bounds (logits and image embeddings <= 1e-4),
llama.cpp within what ``tests/test_llama_cpp.py`` allows (it runs its own f32 image pipeline:
logits < 2e-2 with the same argmax, image embeddings < 2e-3). Refusals: the same
:class:`vlsi.images.ImageError`, word for word, on every backend.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")

import vlsi_runtimes  # noqa: E402
from vlsi.images import ImageError  # noqa: E402
from vlsi_export import get_target  # noqa: E402

pytestmark = pytest.mark.slow

PROMPT = "what colour?"
NEW = 4
BACKENDS = ("torch", "onnx", "gguf")


# --------------------------------------------------------------------------- the images


def _scene(w: int, h: int) -> Image.Image:
    """Smooth gradients and a red block: content that survives JPEG and tells rotations apart."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), np.full_like(x, 90)], -1).astype(np.uint8)
    a[h // 4: h // 2, w // 8: w // 2] = (220, 30, 30)
    return Image.fromarray(a, "RGB")


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgba() -> Image.Image:
    a = np.array(_scene(84, 84).convert("RGBA"))
    a[:, :42, 3] = 0  # fully transparent left half
    a[:42, :, 3] = 128  # half transparent top
    return Image.fromarray(a, "RGBA")


def _exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(_scene(112, 56), "JPEG", quality=95, exif=exif.tobytes())  # shown 56 wide, 112 tall


def _grey16() -> bytes:
    im = Image.fromarray(np.linspace(0, 65535, 84 * 84).reshape(84, 84).astype(np.uint16))
    assert im.mode == "I;16"
    return _save(im, "PNG")


def _palette(transparent: bool) -> bytes:
    p = _scene(84, 84).quantize(16)
    return _save(p, "PNG", transparency=0) if transparent else _save(p, "PNG")


def _truncated(fmt: str) -> bytes:
    rng = np.random.default_rng(5)
    data = _save(Image.fromarray((rng.random((84, 84, 3)) * 255).astype(np.uint8)), fmt)
    return data[: len(data) // 2]


ACCEPTED = {
    "cmyk_jpeg": lambda: _save(_scene(84, 84).convert("CMYK"), "JPEG", quality=95),
    "grey16_png": _grey16,
    "palette_png": lambda: _palette(False),
    "palette_transparent_png": lambda: _palette(True),
    "rgba_png": lambda: _save(_rgba(), "PNG"),
    "la_png": lambda: _save(_rgba().convert("LA"), "PNG"),
    "exif6_jpeg": lambda: _exif_jpeg(6),
    "exif8_jpeg": lambda: _exif_jpeg(8),
    "panorama_1000x60": lambda: _save(_scene(1000, 60), "PNG"),
    "one_pixel": lambda: _save(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
}
# name -> (bytes, what the message says after "<where>: ")
REFUSED = {
    "panorama_201_to_1": (lambda: _save(_scene(2010, 10), "PNG"),
                          "image is 2010x10 (width x height): aspect ratio 201.0 exceeds 200"),
    "truncated_png": (lambda: _truncated("PNG"), "cannot decode the image"),
    "truncated_jpeg": (lambda: _truncated("JPEG"), "cannot decode the image"),
    "random_bytes": (lambda: np.random.default_rng(0).bytes(500),
                     "cannot decode the image, it is corrupt or not an image file"),
    "empty_file": (lambda: b"", "cannot decode the image, it is empty (0 bytes)"),
}



# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gguf_artifact(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-odd") / "f32"
    return get_target("gguf")(tiny_ckpt, out, quant="f32", mmproj_quant="f32", validate=False)


@pytest.fixture(scope="module")
def rts(tiny_ckpt, onnx_artifact, gguf_artifact):
    return {"torch": vlsi_runtimes.load(tiny_ckpt, backend="torch"),
            "onnx": vlsi_runtimes.load(onnx_artifact, backend="onnx"),
            "gguf": vlsi_runtimes.load(gguf_artifact, backend="gguf")}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> (bytes, path of a file holding them)."""
    folder = tmp_path_factory.mktemp("odd-images")
    out = {}
    for name, make in {**ACCEPTED, **{k: v[0] for k, v in REFUSED.items()}}.items():
        data = make()
        (folder / name).write_bytes(data)
        out[name] = (data, folder / name)
    return out


def _answer(rt, image):
    """(prompt ids, greedy text, first next-token logits, image embeddings) for one image."""
    return (rt.encode([image], PROMPT).ids, rt.generate([image], PROMPT, max_new_tokens=NEW),
            rt.logits([image], PROMPT)[0]["final"], rt.image_embeds([image]))


# --------------------------------------------------------------------------- accepted


def test_the_images_are_what_they_say(files):
    modes = {"cmyk_jpeg": "CMYK", "grey16_png": "I;16", "palette_png": "P", "palette_transparent_png": "P",
             "rgba_png": "RGBA", "la_png": "LA"}
    for name, mode in modes.items():
        assert Image.open(io.BytesIO(files[name][0])).mode == mode, name
    assert "transparency" in Image.open(io.BytesIO(files["palette_transparent_png"][0])).info
    assert "transparency" not in Image.open(io.BytesIO(files["palette_png"][0])).info
    for name, o in (("exif6_jpeg", 6), ("exif8_jpeg", 8)):
        im = Image.open(io.BytesIO(files[name][0]))
        assert im.size == (112, 56) and im.getexif()[0x0112] == o
    assert Image.open(io.BytesIO(files["one_pixel"][0])).size == (1, 1)


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_torch_and_onnx_agree(name, rts, files):
    data, path = files[name]
    t_ids, t_text, t_logits, t_emb = _answer(rts["torch"], data)
    o_ids, o_text, o_logits, o_emb = _answer(rts["onnx"], data)
    assert t_ids == o_ids
    assert t_text == o_text
    assert t_emb.shape == o_emb.shape and np.abs(t_emb - o_emb).max() <= 1e-4
    assert np.abs(t_logits - o_logits).max() <= 1e-4
    for b in ("torch", "onnx"):  # a path is the same image as its bytes
        assert rts[b].encode([path], PROMPT).ids == t_ids
        assert rts[b].generate([str(path)], PROMPT, max_new_tokens=NEW) == t_text


@pytest.mark.parametrize("name", ACCEPTED)
def test_gguf_agrees(name, rts, files):
    data, path = files[name]
    t_ids, t_text, t_logits, t_emb = _answer(rts["torch"], data)
    g_ids, g_text, g_logits, g_emb = _answer(rts["gguf"], data)
    assert g_ids == t_ids
    assert g_text == t_text
    assert g_emb.shape == t_emb.shape and np.abs(g_emb - t_emb).max() < 2e-3
    assert np.abs(g_logits - t_logits).max() < 2e-2 and np.argmax(g_logits) == np.argmax(t_logits)
    assert rts["gguf"].encode([path], PROMPT).ids == t_ids
    assert rts["gguf"].generate([path], PROMPT, max_new_tokens=NEW) == t_text


def test_exif_rotation_is_applied(rts, files):
    """The model sees the image as a viewer does: the embeddings of an EXIF-rotated file are
    those of the transposed pixels, not of the stored ones (torch and ONNX alike)."""
    for name in ("exif6_jpeg", "exif8_jpeg"):
        data = files[name][0]
        stored = Image.open(io.BytesIO(data)).convert("RGB")
        shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        assert shown.size == (56, 112)
        for b in ("torch", "onnx"):
            emb = rts[b].image_embeds([data])
            assert np.abs(emb - rts[b].image_embeds([shown])).max() <= 1e-6
            assert np.abs(emb - rts[b].image_embeds([stored])).max() > 1e-2


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "P", "LA", "RGBA"])
def test_pil_images_in_odd_modes(mode, rts):
    """A PIL image passed directly (not bytes) in any mode works on every backend, and gives
    the same answer everywhere (the torch runtime once crashed on CMYK: 'cannot write mode
    CMYK as PNG')."""
    if mode == "I;16":
        im = Image.fromarray(np.linspace(0, 65535, 84 * 84).reshape(84, 84).astype(np.uint16))
    elif mode == "RGBA" or mode == "LA":
        im = _rgba().convert(mode)
    else:
        im = _scene(84, 84).convert(mode)
    assert im.mode == mode
    t_ids, t_text, t_logits, _ = _answer(rts["torch"], im)
    for b in ("onnx", "gguf"):
        ids, text, logits, _ = _answer(rts[b], im)
        assert ids == t_ids and text == t_text, b
        tol = 1e-4 if b == "onnx" else 2e-2
        assert np.abs(logits - t_logits).max() <= tol and np.argmax(logits) == np.argmax(t_logits), b
    assert im.mode == mode  # the caller's image is not converted in place


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_the_same_way_everywhere(name, rts, files):
    data, path = files[name]
    says = REFUSED[name][1]
    for image, where in ((data, "<image bytes>"), (path, str(path))):
        messages = {}
        for b in BACKENDS:
            with pytest.raises(ImageError) as e:
                rts[b].generate([image], PROMPT, max_new_tokens=NEW)
            messages[b] = str(e.value)
            with pytest.raises(ImageError):
                rts[b].encode([image], PROMPT)
        assert len(set(messages.values())) == 1, messages
        assert messages["torch"].startswith(f"{where}: {says}"), messages["torch"]
