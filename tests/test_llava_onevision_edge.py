"""LLaVA-OneVision at the edge: torch-free anyres preprocessing and the vision graph.

Checked against transformers on tiny random models: the numpy/Pillow preprocessing is
bit-identical to ``LlavaOnevisionImageProcessorPil``; the token counts equal the adapter's and
the model's; the torch wrapper and its ONNX export reproduce ``get_image_features`` (tower,
projector, unpadding, ``anyres_max`` bilinear shrink, newlines) in prompt order.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from PIL import Image  # noqa: E402

from vlsi.archs.llava_onevision.image import (  # noqa: E402
    ImageError,
    LlavaOnevisionImageSpec,
    num_image_tokens,
    pack_inputs,
    preprocess_images,
)
from vlsi.errors import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# (height, width): every grid of the tiny pinpoints (1x1, 1x2, 2x1, 2x2 tiles of 84 px), tiny
# images, panoramas (1x2000 fits no pinpoint with a non-zero area), odd sizes
SIZES = [(84, 84), (84, 168), (168, 84), (168, 168), (1, 1), (5, 3), (3, 5), (1, 2000), (2000, 1),
         (12, 2000), (97, 61), (61, 97), (300, 301), (250, 83), (83, 250), (131, 389)]
# the shrink model: 42 px tiles (3x3 patches), up to 4x4 tiles, anyres_max_1 (budget 9 patches)
SHRINK_SIZES = [(168, 168), (168, 120), (100, 168), (42, 168), (30, 160), (160, 50), (77, 91), (50, 50)]


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 7919 * h + w)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


def _adapter():
    from vlsi.archs import get_adapter

    return get_adapter("llava_onevision")


def _adapter_count(config, proc, images, index: int) -> int:
    """The training side's token count for image ``index`` as the only image of a prompt."""
    ad = _adapter()
    processed = ad.process_images(proc, [images[index]])
    return ad.image_token_counts(config, proc, processed)[0]


def _pps(model) -> int:
    vc = model.config.vision_config
    return vc.image_size // vc.patch_size


def _hf_features(model, proc, images, multi=False) -> list[torch.Tensor]:
    """What the model scatters into the prompt, one tensor per image (prompt order)."""
    ref = proc(images=[images] if multi else images, return_tensors="pt")
    kw = {"batch_num_images": torch.as_tensor(ref["batch_num_images"])} if multi else {}
    with torch.no_grad():
        return list(model.model.get_image_features(ref["pixel_values"], ref["image_sizes"], **kw).pooler_output)


def _edge_inputs(model, proc, images, multi=False) -> dict[str, np.ndarray]:
    spec = LlavaOnevisionImageSpec.from_preprocessor_config(proc.to_dict())
    pv, sizes, tiles = preprocess_images(images, spec, anyres=not multi)
    host = pack_inputs(sizes, tiles, spec, _pps(model), max_ratio=model.config.vision_aspect_ratio)
    return {"pixel_values": pv, **host}


def _wrapper_out(model, inputs) -> torch.Tensor:
    from vlsi.archs.llava_onevision.onnx import VisionEncoder

    enc = VisionEncoder(model).eval()
    with torch.no_grad():
        return enc(*(torch.from_numpy(inputs[k]) for k in enc.input_names))


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def tiny():
    from vlsi.tiny import build_tiny

    model, tok, proc, _ = build_tiny("llava_onevision", "student", seed=0)
    return model, proc, tok


@pytest.fixture(scope="module")
def shrink(tiny):
    """A second tiny model whose large grids exceed the anyres_max budget (bilinear shrink)."""
    from vlsi.tiny import SIZES as TINY_SIZES
    from vlsi.tiny import build_tiny

    s = 42
    model, _, proc, _ = build_tiny("llava_onevision", dataclasses.replace(TINY_SIZES["student"], image_size=s),
                                   seed=1, tokenizer=tiny[2])
    pins = [[s * r, s * c] for r in range(1, 5) for c in range(1, 5)]
    # pack_image_features reads both from the config at call time
    model.config.image_grid_pinpoints = pins
    model.config.vision_aspect_ratio = "anyres_max_1"
    proc.image_grid_pinpoints = pins
    return model, proc


@pytest.fixture(scope="module")
def clip_default(tiny):
    """A CLIP tower with a CLS token: strategy "default" drops it; two feature layers, one of them
    the input of the first block (after CLIP's pre_layrnorm), the deepest not the last block."""
    from transformers import LlavaOnevisionConfig

    model, proc, _ = tiny
    d = model.config.to_dict()
    d["vision_config"] = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                              num_hidden_layers=3, num_attention_heads=2, image_size=84, patch_size=14)
    d.update(vision_feature_select_strategy="default", vision_feature_layer=[0, -2])
    cfg = LlavaOnevisionConfig(**{k: v for k, v in d.items() if k not in ("model_type", "transformers_version")})
    torch.manual_seed(2)
    return _adapter().model_class()(cfg).eval(), proc


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_preprocess_bit_identical(tiny, size):
    _, proc, _ = tiny
    im = _image(*size)
    ref = proc(images=[im], return_tensors="np")
    spec = LlavaOnevisionImageSpec.from_preprocessor_config(proc.to_dict())
    pv, sizes, tiles = preprocess_images([im], spec)
    assert pv.dtype == np.float32 and sizes.dtype == np.int64
    assert pv.shape == ref["pixel_values"][0].shape and tiles == [pv.shape[0]]
    assert np.abs(pv - ref["pixel_values"][0]).max() == 0
    assert sizes.tolist() == ref["image_sizes"].tolist() == [list(size)]


def test_preprocess_batch_and_modes(tiny):
    """A mixed batch: HF pads each image to the largest tile count, ours concatenates."""
    _, proc, _ = tiny
    spec = LlavaOnevisionImageSpec.from_preprocessor_config(proc.to_dict())
    ims = [_image(*s) for s in SIZES[:8]]
    ims.append(_image(40, 70).convert("RGBA"))  # alpha: composited onto white, as transformers does
    ims[-1].putalpha(Image.fromarray(np.tile(np.arange(70, dtype=np.uint8) * 3, (40, 1))))
    ims.append(_image(33, 90).convert("L"))
    ref = proc(images=ims, return_tensors="np")
    pv, sizes, tiles = preprocess_images(ims, spec)
    want = np.concatenate([ref["pixel_values"][i][:n] for i, n in enumerate(tiles)])
    assert np.abs(pv - want).max() == 0
    assert sizes.tolist() == ref["image_sizes"].tolist()
    assert tiles == [1 + int(np.prod(g)) for g in (_grid(spec, s) for s in sizes.tolist())]


def _grid(spec, size):
    from vlsi.archs.llava_onevision.image import grid_shape

    return grid_shape(tuple(size), spec)


def test_preprocess_multi_image_prompt(tiny):
    """Several images in one prompt are not tiled: padded square with the mean colour, resized."""
    _, proc, _ = tiny
    spec = LlavaOnevisionImageSpec.from_preprocessor_config(proc.to_dict())
    ims = [_image(*s) for s in [(84, 168), (97, 61), (5, 3), (84, 84)]]
    ref = proc(images=[ims], return_tensors="np")
    pv, _, tiles = preprocess_images(ims, spec, anyres=False)
    assert tiles == [1] * 4 and np.abs(pv - ref["pixel_values"][:, 0]).max() == 0


def test_spec_from_preprocessor_config(tmp_path, tiny):
    _, proc, _ = tiny
    cfg = proc.to_dict()
    spec = LlavaOnevisionImageSpec.from_preprocessor_config(cfg)
    assert spec.tile_size == 84 and spec.image_grid_pinpoints == ((84, 84), (84, 168), (168, 84), (168, 168))
    assert spec.resample == 3 and spec.image_mean == tuple(proc.image_mean)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    assert LlavaOnevisionImageSpec.from_preprocessor_config(tmp_path) == spec
    assert LlavaOnevisionImageSpec.from_preprocessor_config(tmp_path / "preprocessor_config.json") == spec
    assert LlavaOnevisionImageSpec.from_preprocessor_config({}) == LlavaOnevisionImageSpec()  # class defaults
    bad = {
        "missing": tmp_path / "nope.json",
        "not json": _write(tmp_path / "a.json", "{"),
        "top-level list": _write(tmp_path / "b.json", "[]"),
        "non-square": {"size": {"height": 84, "width": 168}},
        "partial tiles": {"size": {"height": 84, "width": 84}, "image_grid_pinpoints": [[84, 100]]},
        "zero std": {"image_std": [0.5, 0, 0.5]},
        "bad resample": {"resample": 42},
        "two-channel mean": {"image_mean": [0.5, 0.5]},
    }
    for why, src in bad.items():
        with pytest.raises(ConfigError):
            LlavaOnevisionImageSpec.from_preprocessor_config(src)
            pytest.fail(why)


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


# --------------------------------------------------------------------------- token counts


def test_token_counts_match_adapter_and_model(tiny):
    model, proc, _ = tiny
    spec = LlavaOnevisionImageSpec.from_preprocessor_config(proc.to_dict())
    ims = [_image(*s) for s in SIZES]
    feats = _hf_features(model, proc, ims)
    for i, size in enumerate(SIZES):
        n = num_image_tokens(size, spec, _pps(model), model.config.vision_aspect_ratio)
        assert n == _adapter_count(model.config, proc, [ims[i]], 0) == feats[i].shape[0], size


def test_check_size(shrink):
    model, proc = shrink
    spec = LlavaOnevisionImageSpec.from_preprocessor_config(proc.to_dict())
    for h, w in [(0, 5), (5, 0), (0, 0)]:
        with pytest.raises(ImageError, match="no pixels"):
            spec.check_size(h, w)
        with pytest.raises(ImageError):
            preprocess_images([Image.new("RGB", (w, h))], spec)
    spec.check_size(1, 2000, _pps(model), "anyres_max_1")  # fine: transformers handles it too
    # a 12x1-patch unpadded grid shrinks to 10x0 under anyres_max_1: torch's interpolate fails
    with pytest.raises(RuntimeError, match="greater than 0"):
        _hf_features(model, proc, [_image(168, 10)])
    with pytest.raises(ImageError, match="anyres_max"):
        spec.check_size(168, 10, _pps(model), model.config.vision_aspect_ratio)
    with pytest.raises(ImageError):
        num_image_tokens((168, 10), spec, _pps(model), model.config.vision_aspect_ratio)


def test_pack_inputs_checks_its_inputs(tiny):
    _, proc, _ = tiny
    spec = LlavaOnevisionImageSpec.from_preprocessor_config(proc.to_dict())
    with pytest.raises(ImageError, match="tiles_per_image"):
        pack_inputs([[84, 168]], [5], spec, 6)  # a 1x2 grid has 3 tiles
    with pytest.raises(ImageError, match="newline_row"):
        pack_inputs([[84, 168]], [3], spec, 6, newline_row=7)
    host = pack_inputs([[84, 168]], [3], spec, 6, newline_row=3 * 36)
    assert host["gather_index"].shape == (114, 4) and host["gather_weight"].dtype == np.float32
    assert set(host) == {"gather_index", "gather_weight"}


def test_gather_reproduces_pack_image_features(shrink):
    """pack_inputs' taps applied to random tile features equal transformers' pack_image_features
    (unpad + bilinear shrink + newlines) for many sizes, without running the tower."""
    model, proc = shrink
    spec = LlavaOnevisionImageSpec.from_preprocessor_config(proc.to_dict())
    pps, d = _pps(model), model.config.text_config.hidden_size
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(20, 400, (40, 2))]
    sizes = [s for s in sizes if _fits(spec, s, pps)]
    tiles = [1 + int(np.prod(_grid(spec, s))) for s in sizes]
    feats = torch.randn(sum(tiles), pps * pps, d, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, _ = model.model.pack_image_features(list(torch.split(feats, tiles)), torch.tensor(sizes),
                                                 image_newline=model.model.image_newline,
                                                 vision_aspect_ratio=model.config.vision_aspect_ratio)
        host = pack_inputs(sizes, tiles, spec, pps, max_ratio=model.config.vision_aspect_ratio)
        rows = torch.cat([feats.reshape(-1, d), model.model.image_newline[None]])
        got = (rows[torch.from_numpy(host["gather_index"])]
               * torch.from_numpy(host["gather_weight"])[..., None]).sum(1)
    assert got.shape == torch.cat(ref).shape
    assert (got - torch.cat(ref)).abs().max().item() <= 1e-5
    assert (host["gather_weight"][:, 1:] != 0).any(), "no size exercised the 4-tap bilinear path"


def _fits(spec, size, pps) -> bool:
    try:
        spec.check_size(*size, pps, "anyres_max_1")
        return True
    except ImageError:
        return False


# --------------------------------------------------------------------------- torch wrapper


def _check_wrapper(model, proc, sizes, multi=False, tol=1e-5) -> float:
    ims = [_image(*s) for s in sizes]
    ref = torch.cat(_hf_features(model, proc, ims, multi))
    got = _wrapper_out(model, _edge_inputs(model, proc, ims, multi))
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err <= tol, err
    return err


def test_wrapper_matches_hf(tiny):
    model, proc, _ = tiny
    _check_wrapper(model, proc, SIZES)  # all of them as one batch, in prompt order
    _check_wrapper(model, proc, [(84, 168), (97, 61), (5, 3)], multi=True)


def test_wrapper_matches_hf_with_bilinear_shrink(shrink):
    model, proc = shrink
    spec = LlavaOnevisionImageSpec.from_preprocessor_config(proc.to_dict())
    pv, sizes, tiles = preprocess_images([_image(*s) for s in SHRINK_SIZES], spec)
    host = pack_inputs(sizes, tiles, spec, _pps(model), max_ratio=model.config.vision_aspect_ratio)
    assert (host["gather_weight"][:, 1:] != 0).any()  # the 4-tap path is exercised
    _check_wrapper(model, proc, SHRINK_SIZES)


def test_wrapper_clip_default_strategy_and_layer_list(clip_default):
    model, proc = clip_default
    _check_wrapper(model, proc, [(84, 168), (97, 61), (5, 3)])


# --------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def exported(tiny, shrink, tmp_path_factory):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from vlsi.archs.llava_onevision.onnx import export_vision

    out = tmp_path_factory.mktemp("llava_ov_onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sessions = {}
    for name, (model, *_) in {"tiny": tiny, "shrink": shrink}.items():
        path = export_vision(model, out / f"{name}.onnx")
        sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sessions


def test_onnx_signature(exported):
    sess = exported["tiny"]
    ins = {i.name: (i.type, i.shape) for i in sess.get_inputs()}
    assert list(ins) == ["pixel_values", "gather_index", "gather_weight"]
    assert ins["pixel_values"] == ("tensor(float)", ["tiles", 3, 84, 84])
    assert ins["gather_index"] == ("tensor(int64)", ["tokens", 4])
    assert ins["gather_weight"] == ("tensor(float)", ["tokens", 4])
    assert [o.name for o in sess.get_outputs()] == ["image_embeds"]


@pytest.mark.parametrize("case", [
    ("tiny", [(84, 84)], False),  # 1x1 grid
    ("tiny", [(84, 168), (168, 84)], False),  # 1x2 and 2x1
    ("tiny", [(168, 168), (5, 3), (2000, 1), (97, 61)], False),  # 2x2, tiny, panorama (empty grid), odd
    ("tiny", [(97, 61), (5, 3)], True),  # multi-image prompt, each image run alone: one tile
    ("shrink", SHRINK_SIZES[:5], False),  # bilinear shrink
], ids=["1x1", "1x2+2x1", "mixed", "single-tile", "shrink"])
def test_onnx_matches_hf(exported, tiny, shrink, case):
    name, sizes, multi = case
    model, proc = (tiny[0], tiny[1]) if name == "tiny" else shrink
    ims = [_image(*s) for s in sizes]
    ref = torch.cat(_hf_features(model, proc, ims, multi)).numpy()
    # a one-image multi-image prompt is tiled by transformers, so the one-tile (tiles=1) graph run
    # is checked image by image against HF's multi-image prompt
    runs = [[im] for im in ims] if multi else [ims]
    got = np.concatenate([exported[name].run(None, _edge_inputs(model, proc, r, multi))[0] for r in runs])
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4


# --------------------------------------------------------------------------- torch-free


def test_image_module_imports_neither_torch_nor_transformers():
    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"blocked import of {name}")
sys.meta_path.insert(0, Block())
import numpy as np
from PIL import Image
from vlsi.archs.llava_onevision import image as m
spec = m.LlavaOnevisionImageSpec(tile_size=84, image_grid_pinpoints=[[84, 84], [84, 168], [168, 84], [168, 168]])
pv, sizes, tiles = m.preprocess_images([Image.new("RGB", (150, 70), (10, 200, 30))], spec)
host = m.pack_inputs(sizes, tiles, spec, 6)
assert pv.shape == (3, 3, 84, 84) and host["gather_index"].shape[0] == m.num_image_tokens((70, 150), spec, 6)
bad = [k for k in sys.modules if k.split(".")[0] in ("torch", "transformers")]
assert not bad, bad
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
