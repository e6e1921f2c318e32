"""Qwen2.5-VL's vision tower as one graph: the torch wrapper and its ONNX export match the
transformers tower for several sizes, aspect ratios and image counts; the host inputs are
torch-free and partition patches into the same windows and frames as transformers; and the
windowed/full split is actually exercised (a wrong mask would fail)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from vlsi.archs.qwen2_5_vl.onnx import VisionEncoder, export_vision
from vlsi.archs.qwen2_5_vl.vision import INPUT_NAMES, vision_inputs

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

# (height, width) in pixels, multiples of 28 so the processor keeps them; windows are 56 px
# (2x2 merged tokens), so all but the first case have several windows, some cut short.
CASES = {
    "56x56": [(56, 56)],                    # one window
    "84x140": [(84, 140)],                  # 2x3 windows, last row and column cut short
    "168x84": [(168, 84)],                  # tall, 3x2 windows, last column cut short
    "112x112": [(112, 112)],                # 2x2 full windows (transformers pads a row and column of empty ones)
    "28x308": [(28, 308)],                  # panorama: 1x6 windows
    "three": [(56, 56), (84, 140), (28, 308)],
    "two": [(168, 84), (112, 112)],
}
TORCH_TOL, ONNX_TOL = 1e-5, 1e-4


def _tiny_config():
    """A tiny Qwen2.5-VL: 3 vision blocks, the last full-attention, 56 px windows (2x2 merged
    tokens); a one-layer decoder, which these tests never run. Built here rather than with
    ``vlsi.tiny`` so that only transformers' config schema is assumed."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=96,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  window_size=56, fullatt_block_indexes=[2], tokens_per_second=2)
    text = dict(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 9, 9]},
                bos_token_id=254, eos_token_id=255, pad_token_id=254)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=250, video_token_id=251,
                            vision_start_token_id=252, vision_end_token_id=253)


@pytest.fixture(scope="module")
def model():
    """The tiny model, seeded, with sharpened attention: at init the logits are ~0.03 and
    attention is nearly uniform, which would hide rotary or mask mistakes."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = Qwen2_5_VLForConditionalGeneration(_tiny_config()).eval()
    cfg = m.model.visual.config
    assert list(cfg.fullatt_block_indexes) == [cfg.depth - 1] and cfg.depth >= 2  # both kinds run
    with torch.no_grad():
        for blk in m.model.visual.blocks:
            blk.attn.qkv.weight.mul_(6.0)
    return m


@pytest.fixture(scope="module")
def processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # pixel-count bounds wide enough that none of CASES is resized
    return Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28, "longest_edge": 336 * 336})


@pytest.fixture(scope="module")
def batches(processor):
    """``case -> (pixel_values (N, 1176), grid_thw (n, 3))`` from random-noise images (a flat
    image gives identical values everywhere, and then any attention mask looks right)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = {}
    for name, sizes in CASES.items():
        imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
        o = processor(images=imgs, return_tensors="pt")
        assert [(h * 14, w * 14) for _, h, w in o["image_grid_thw"].tolist()] == sizes  # not resized
        out[name] = (o["pixel_values"], o["image_grid_thw"])
    return out


@pytest.fixture(scope="module")
def references(model, batches):
    """``case -> (N / 4, out_hidden)``: transformers' image features, concatenated."""
    with torch.no_grad():
        return {k: torch.cat(model.get_image_features(pv, g).pooler_output) for k, (pv, g) in batches.items()}


@pytest.fixture(scope="module")
def session(model, tmp_path_factory):
    path = export_vision(model.model.visual, tmp_path_factory.mktemp("qwen25_vision") / "vision.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _host(grid, visual) -> dict[str, np.ndarray]:
    cfg = visual.config
    return vision_inputs(grid.numpy(), cfg.spatial_merge_size, cfg.patch_size, cfg.window_size)


def _wrapper(model, pv, host) -> torch.Tensor:
    enc = VisionEncoder(model.model.visual).eval()
    with torch.no_grad():
        return enc(pv, *(torch.from_numpy(host[k]) for k in INPUT_NAMES))


def test_reference_is_the_tower(model, batches, references):
    """The tower returns an output object in 5.24; its pooler_output is the merged features
    in processor order, what get_image_features splits per image."""
    pv, g = batches["three"]
    with torch.no_grad():
        out = model.model.visual(pv, grid_thw=g)
    assert torch.equal(out.pooler_output, references["three"])
    assert references["three"].shape == (int(g.prod(-1).sum()) // 4, model.config.vision_config.out_hidden_size)


@pytest.mark.parametrize("case", list(CASES))
def test_torch_wrapper_matches_hf(model, batches, references, case):
    pv, g = batches[case]
    got = _wrapper(model, pv, _host(g, model.model.visual))
    err = (got - references[case]).abs().max().item()
    print(f"torch {case}: {err:.2e}")
    assert got.shape == references[case].shape and err <= TORCH_TOL


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_matches_hf(model, session, batches, references, case):
    pv, g = batches[case]
    host = _host(g, model.model.visual)
    assert [i.name for i in session.get_inputs()] == VisionEncoder.input_names == ["pixel_values", *host]
    got = session.run(VisionEncoder.output_names, {"pixel_values": pv.numpy(), **host})[0]
    err = np.abs(got - references[case].numpy()).max()
    print(f"onnx {case}: {err:.2e}")
    assert got.shape == tuple(references[case].shape) and err <= ONNX_TOL


@pytest.mark.parametrize("case", ["112x112", "two"])
def test_wrong_masks_would_fail(model, batches, references, case):
    """With several windows per side, attending over the whole frame in every block, or
    within windows in every block, or with window ids repeated across images, is visibly
    different from transformers, so the tests above can fail."""
    pv, g = batches[case]
    host = _host(g, model.model.visual)
    wrong = {
        "all full": {**host, "window_id": host["image_index"]},
        "all windowed": {**host, "image_index": host["window_id"]},
    }
    if len(g) > 1:  # window ids restarting at 0 for each image: windows of different images merge
        starts = np.r_[0, np.flatnonzero(np.diff(host["image_index"])) + 1]
        first = np.repeat(host["window_id"][starts], np.diff(np.r_[starts, len(host["window_id"])]))
        wrong["local window ids"] = {**host, "window_id": host["window_id"] - first}
    for what, inputs in wrong.items():
        err = (_wrapper(model, pv, inputs) - references[case]).abs().max().item()
        print(f"{what} {case}: {err:.2e}")
        assert err > 100 * TORCH_TOL, f"{what}: {err:.2e}"


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label arrays group the same elements together."""
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


@pytest.mark.parametrize("grids", [[[1, 4, 4]], [[1, 6, 10], [1, 12, 6]], [[2, 8, 8], [1, 2, 22]], [[3, 10, 14]]])
def test_host_inputs_match_hf_windows(grids):
    """Positions, frames and windows equal transformers' (videos with t > 1 included), with
    transformers' window order and cumulative lengths turned back into per-patch labels."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    g = torch.tensor(grids)
    host = vision_inputs(grids, merge_size=2, patch_size=14, window_size=56)
    n = int(g.prod(-1).sum())
    assert {k: (v.shape, v.dtype) for k, v in host.items()} == {
        "positions": ((n, 2), np.int64), "image_index": ((n,), np.int64), "window_id": ((n,), np.int64)}
    np.testing.assert_array_equal(host["positions"], get_vision_position_ids(g, 2).numpy())

    def labels(cu):  # segment number of each position of a sequence cut at cu
        return np.searchsorted(cu.numpy()[1:], np.arange(n), side="right")

    assert _same_partition(host["image_index"], labels(get_vision_cu_seqlens(g)))
    order, cu_win = get_vision_window_index(g, spatial_merge_size=2, window_size=56, patch_size=14)
    patch_order = (order.numpy()[:, None] * 4 + np.arange(4)).ravel()  # merge units -> patches
    win = np.empty(n, dtype=np.int64)
    win[patch_order] = labels(cu_win)
    assert _same_partition(host["window_id"], win)


def test_vision_inputs_are_torch_free():
    """``vision.py`` imports and runs with torch and transformers made unimportable."""
    code = textwrap.dedent("""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError(f"blocked: {name}")

        sys.meta_path.insert(0, Block())
        from vlsi.archs.qwen2_5_vl.vision import vision_inputs
        for grids in ([[1, 4, 4]], [[1, 6, 10], [1, 2, 22]], [[2, 8, 8]]):
            out = vision_inputs(grids, 2, 14, 56)
            assert list(out) == ["positions", "image_index", "window_id"], list(out)
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("ok")
    """)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
