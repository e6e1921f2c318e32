"""Qwen2.5-VL and LLaVA-OneVision on the ONNX target, end to end: export and its parity gate at
every precision, the torch-free runtime against the PyTorch one on many image shapes, and the
server on top of it.

Each architecture gets one tiny student with untrained verbalizers on layers 1, 3 and 5, and
its fp32 artifact; the runtime and server tests use those. The precision sweep uses a second,
briefly trained copy (see :func:`trained`): an untrained model's next-token distributions are
nearly flat (logit std ~0.2, top-2 gaps ~0.05), and int4's ~0.15 logit error flips LLaVA-OV's
*final* head on 12-19% of positions (block size and zero points do not help), which says
nothing about a real model.

The metrics of every export are written to ``<pytest basetemp>/onnx_parity_table.json``
(and printed with ``-s``).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

import vlsi_runtimes  # noqa: E402
from vlsi.errors import UnsupportedArchitectureError  # noqa: E402
from vlsi.manifest import load_manifest  # noqa: E402
from vlsi_export import get_target  # noqa: E402

ARCHS = ["qwen2_5_vl", "llava_onevision"]
LAYERS = (1, 3, 5)
VISION_INPUTS = {"qwen2_5_vl": ["pixel_values", "positions", "image_index", "window_id"],
                 "llava_onevision": ["pixel_values", "gather_index", "gather_weight"]}
POSITION_AXES = {"qwen2_5_vl": 3, "llava_onevision": 1}
TABLE_KEYS = ("top1", "kl_mean", "logits_max_abs", "greedy_match", "vision_max_abs", "verbalizer_top1")


def _img(width: int, height: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


def _png(width: int, height: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    _img(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def ckpt(arch, tmp_path_factory):
    """A tiny student of ``arch`` with untrained verbalizers on layers 1, 3 and 5."""
    from vlsi.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp(arch) / "student", arch=arch, size="student", seed=0,
                     verbalizer_layers="1::2")


@pytest.fixture(scope="module")
def artifact(ckpt, arch, tmp_path_factory):
    """``ckpt`` exported to ONNX fp32 with its verbalizers (the full export: traced and gated)."""
    return get_target("onnx")(ckpt, tmp_path_factory.mktemp(f"{arch}-onnx") / "fp32", quant="fp32",
                              verbalizers=True, parity_samples=4)


@pytest.fixture(scope="module")
def pair(ckpt, artifact):
    """(PyTorch runtime of the checkpoint, ONNX Runtime runtime of its fp32 artifact)."""
    return vlsi_runtimes.load(ckpt, backend="torch"), vlsi_runtimes.load(artifact)


@pytest.fixture(scope="module")
def trained(arch, synth_data, tmp_path_factory):
    """A student of ``arch`` pretrained 40 steps, then verbalizers (1, 3, 5) trained 60 steps on
    the synthetic data: peaked next-token distributions, as a real model has, so that the
    parity gate measures quantisation error rather than ties between near-equal logits."""
    from .conftest import train_briefly

    return train_briefly(arch, synth_data, tmp_path_factory.mktemp(f"{arch}-trained"))


@pytest.fixture(scope="module")
def trace_cache(tmp_path_factory):
    return {"root": tmp_path_factory.mktemp("traces"), "graphs": {}}


@pytest.fixture
def traced_once(trace_cache, monkeypatch):
    """Within the precision sweep, trace each (checkpoint, verbalizers kept) once.

    The fp32 graphs an export quantises depend only on the checkpoint, on whether the
    verbalizers are kept and on where the decoder is split (``--quant`` is applied to them afterwards), and tracing them is
    15-30 s of each export on 2 cores. Later exports of the same checkpoint get the first one's
    fp32 graphs; quantisation, the I/O check, the manifest and the parity gate all run."""
    from vlsi.archs.onnx import OnnxGraphs

    original = OnnxGraphs.export

    def export(self, ck, verbalizers, folder, model_block, split_layers=()):
        key = (str(Path(ck.path).resolve()), verbalizers is not None, tuple(split_layers), type(self).__name__)
        graphs = trace_cache["graphs"]
        if key not in graphs:
            io_names = original(self, ck, verbalizers, folder, model_block, split_layers)
            keep = trace_cache["root"] / str(len(graphs))
            shutil.copytree(folder, keep)
            graphs[key] = (keep, io_names)
            return copy.deepcopy(io_names)
        keep, io_names = graphs[key]
        for f in keep.iterdir():
            shutil.copyfile(f, Path(folder) / f.name)
        return copy.deepcopy(io_names)

    monkeypatch.setattr(OnnxGraphs, "export", export)


@pytest.fixture(scope="module")
def parity_table(tmp_path_factory):
    """``{arch: {precision: metrics}}``, rewritten to ``onnx_parity_table.json`` on every row."""
    return {"path": tmp_path_factory.getbasetemp() / "onnx_parity_table.json", "rows": {}}


def _record(table, arch: str, label: str, metrics: dict) -> None:
    table["rows"].setdefault(arch, {})[label] = {k: metrics.get(k) for k in ("samples", "positions", *TABLE_KEYS)}
    table["path"].write_text(json.dumps(table["rows"], indent=2) + "\n")
    cells = "  ".join(f"{k}={metrics[k]:.3g}" if metrics.get(k) is not None else f"{k}=n/a" for k in TABLE_KEYS)
    print(f"parity {arch} {label}: {cells}")


# --------------------------------------------------------------------------- export


def test_fp32_export_manifest_and_parity(artifact, arch, ckpt, parity_table):
    m = load_manifest(artifact)
    assert m.target == "onnx" and m.arch == m.model["arch"] == arch
    assert m.precision == "fp32" and {g.precision for g in m.graphs.values()} == {"fp32"}
    assert m.verbalizers == list(LAYERS)
    axes = POSITION_AXES[arch]
    assert m.model["position_axes"] == axes
    vision, embed = m.graph("vision"), m.graph("embed")
    assert vision.inputs == VISION_INPUTS[arch] and vision.outputs == ["image_embeds"]
    assert embed.inputs == ["input_ids"] and embed.outputs == ["inputs_embeds"]
    n = m.model["num_layers"]
    split = m.decoder_split  # cut after every kept verbalizer layer: 1 | 2-3 | 4-5 | 6
    assert [(s.first_layer, s.last_layer) for s in split.segments] == [(1, 1), (2, 3), (4, 5), (6, n)]
    hidden = ["inputs_embeds", *[f"hidden_{k}" for k in LAYERS], "final_hidden"]
    for s, hin, hout in zip(split.segments, hidden, hidden[1:]):
        dec = m.graph(s.graph)
        layers = range(s.first_layer - 1, s.last_layer)
        assert (s.hidden_in, s.hidden_out) == (hin, hout)
        assert dec.inputs == [hin, "attention_mask", "position_ids",
                              *[f"past_{kind}_{i}" for i in layers for kind in ("key", "value")], "row_wise"]
        assert dec.outputs == [hout, *[f"present_{kind}_{i}" for i in layers for kind in ("key", "value")]]
        shapes = {v["name"]: v["shape"] for v in dec.details["inputs"]}
        assert shapes["position_ids"][0] == axes  # the position axis is fixed in the graph, not dynamic
    assert m.graph(split.lm_head.graph).outputs == ["logits"]
    assert [(h.layer, m.graph(h.graph).inputs, m.graph(h.graph).outputs) for h in split.verbalizers] == [
        (k, [f"hidden_{k}"], [f"verbalizer_hidden_{k}"]) for k in LAYERS]
    metrics = m.parity["metrics"]
    assert m.parity["passed"] and metrics["greedy_match"] == metrics["top1"] == metrics["verbalizer_top1"] == 1.0
    assert metrics["logits_max_abs"] <= 1e-4 and metrics["vision_max_abs"] <= 1e-4
    _record(parity_table, arch, "fp32 (untrained)", metrics)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp32", "fp16", "int8", "int4"])
def test_every_precision_passes_the_parity_gate(trained, arch, quant, traced_once, parity_table, tmp_path):
    """The decoder at each precision (vision stays fp32), verbalizers kept, through the gate."""
    out = get_target("onnx")(trained, tmp_path / quant, quant=quant, verbalizers=True, parity_samples=8)
    m = load_manifest(out)
    decoder = [g for name, g in m.graphs.items() if name not in ("vision", "embed")]
    assert m.arch == arch and m.precision == quant and {g.precision for g in decoder} == {quant}
    assert m.graph("vision").precision == "fp32" and m.verbalizers == list(LAYERS)
    assert m.parity["passed"], m.parity
    metrics = m.parity["metrics"]
    assert {"vision_max_abs", "verbalizer_top1"} <= set(metrics)  # images and verbalizers were compared
    _record(parity_table, arch, quant, metrics)


def test_gguf_refuses_llava_onevision(tmp_path):
    """The refusal names the reason and the architectures the target takes (before any gguf
    package is needed, and without writing anything)."""
    from vlsi.tiny import save_tiny

    ck = save_tiny(tmp_path / "llava", arch="llava_onevision", size="student", seed=0)
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"gguf target does not take 'llava_onevision': .*anyres_max_9 unpadding.*"
                             r"Architectures it takes: qwen2_5_vl, qwen2_vl"):
        get_target("gguf")(ck, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- runtime

# (width, height) of each image of a prompt; every image of a Qwen2.5-VL case spans at least
# two attention windows (the tiny processor resizes to ~7056 pixels, windows are 4x4 patches),
# the LLaVA-OV cases cover every tile grid of the tiny pinpoints, an odd size (unpadding) and a
# two-image prompt (one tile each)
CASES = {
    "qwen2_5_vl": [([(56, 56)], "what colour is the star?"), ([(84, 140)], "describe"),
                   ([(168, 84)], "what shape?"), ([(28, 308)], "how many?"),
                   ([(56, 56), (28, 308)], "compare <image> and <image>")],
    "llava_onevision": [([(84, 84)], "what colour is the star?"), ([(168, 84)], "describe"),
                        ([(84, 168)], "what shape?"), ([(168, 168)], "how many?"), ([(97, 61)], "where?"),
                        ([(84, 84), (84, 168)], "compare <image> and <image>")],
}


def _check_case(arch, rt, images, sizes):
    """The case exercises what it claims: several windows, or the intended tile grids."""
    vision = rt.encode(images, "x" if len(images) < 2 else "<image> <image>").images
    feeds = vision.feeds
    if arch == "qwen2_5_vl":
        grids = vision.meta["grid_thw"]
        for (t, h, w), frame in zip(grids.tolist(), np.split(feeds["window_id"], np.cumsum(grids.prod(1))[:-1])):
            assert len(np.unique(frame)) >= 2, (sizes, (t, h, w))
        return None
    from vlsi.archs.llava_onevision.image import grid_shape

    grids = [grid_shape((h, w), rt.image_spec) for w, h in sizes]
    tiles = [1] * len(images) if len(images) > 1 else [1 + grids[0][0] * grids[0][1]]
    assert feeds["pixel_values"].shape[0] == sum(tiles), (sizes, grids)
    return grids[0] if len(images) == 1 else None


def test_onnx_runtime_matches_torch(pair, arch):
    """Same tokens, image embeddings and logits (<= 1e-4, every head, prompt and continuation),
    the same greedy ids, answers and per-layer verbalizations."""
    ref, rt = pair
    assert (ref.name, rt.name) == ("torch", "onnx") and rt.verbalizer_layers == ref.verbalizer_layers == LAYERS
    grids = set()
    for sizes, prompt in CASES[arch]:
        images = [_img(w, h, seed=i + 7 * len(sizes)) for i, (w, h) in enumerate(sizes)]
        grids.add(_check_case(arch, rt, images, sizes))
        where = (sizes, prompt)
        assert ref.encode(images, prompt).ids == rt.encode(images, prompt).ids, where
        assert np.abs(ref.image_embeds(images) - rt.image_embeds(images)).max() <= 1e-4, where
        ids = list(ref.stream_tokens(images, prompt, 8))
        assert len(ids) == 8 and list(rt.stream_tokens(images, prompt, 8)) == ids, where
        a = ref.logits(images, prompt, continuation=ids[:5])
        b = rt.logits(images, prompt, continuation=ids[:5])
        assert len(a) == len(b) == 6
        for x, y in zip(a, b):
            assert set(x) == set(y) == {"final", *LAYERS}, where
            for k in x:
                assert np.abs(x[k] - y[k]).max() <= 1e-4, (where, k)
        assert ref.generate(images, prompt, max_new_tokens=6) == rt.generate(images, prompt, max_new_tokens=6)
        want = ref.verbalize(images, prompt, 4)
        assert list(want) == [*LAYERS, "final"] and rt.verbalize(images, prompt, 4) == want, where
    if arch == "llava_onevision":
        assert {(1, 1), (1, 2), (2, 1), (2, 2)} <= grids


def test_onnx_runtime_runs_without_torch(pair, artifact, tmp_path):
    """The same answers from a process where torch and transformers cannot be imported (the
    architecture's spec does all preprocessing and positions with numpy)."""
    import subprocess
    import sys

    _, rt = pair
    files = []
    for i, (w, h) in enumerate([(84, 168), (56, 56), (168, 84)]):
        files.append(str(tmp_path / f"{i}.png"))
        Path(files[-1]).write_bytes(_png(w, h, seed=i))
    one, two = files[:1], files[1:]
    code = f"""
import sys
sys.modules['torch'] = None
sys.modules['transformers'] = None
import vlsi_runtimes
rt = vlsi_runtimes.load({str(artifact)!r})
print(repr((rt.generate({one!r}, 'what colour?', max_new_tokens=4), rt.verbalize({two!r}, '<image> or <image>?', 3))))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    want = (rt.generate(one, "what colour?", max_new_tokens=4), rt.verbalize(two, "<image> or <image>?", 3))
    assert res.stdout.strip().splitlines()[-1] == repr(want)


# --------------------------------------------------------------------------- server


def test_serve_answers_and_verbalizes(pair, arch):
    """``vlsi serve`` on the ONNX runtime: an OpenAI chat completion with a data-URI image, and
    ``"verbalize": true`` returns each kept layer's greedy answer."""
    pytest.importorskip("starlette", reason="the app extra is not installed")
    openai = pytest.importorskip("openai", reason="the dev extra is not installed")
    from PIL import Image
    from starlette.testclient import TestClient

    from vlsi_apps.server import Limits, create_app

    _, rt = pair
    png, q = _png(168, 84, seed=3), "what shape is it?"
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
        {"type": "text", "text": q}]}]
    with TestClient(create_app(rt, model_name="tiny")) as http:
        client = openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="unused", http_client=http, max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0.0,
                                           extra_body={"verbalize": True})
    image = Image.open(io.BytesIO(png))
    assert r.choices[0].message.content == rt.generate([image], q, max_new_tokens=6)
    want = rt.verbalize([image], q, Limits().verbalize_tokens, final=False)
    assert list(want) == list(LAYERS) and any(want.values())
    assert r.model_extra["verbalizations"] == {f"layer_{k}": want[k] for k in LAYERS}
