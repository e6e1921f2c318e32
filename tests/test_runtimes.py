"""One runtime interface: the ONNX Runtime backend matches the PyTorch reference, and runs
without torch or transformers."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

import vlsi_runtimes
from vlsi_export.parity import TOLERANCES  # noqa: E402
from vlsi.errors import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def pair(tiny_ckpt, onnx_artifact):
    return vlsi_runtimes.load(tiny_ckpt), vlsi_runtimes.load(onnx_artifact), onnx_artifact


def _img(seed=0, size=84):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


@pytest.mark.slow
def test_onnx_matches_torch(pair):
    ref, ort_rt, _ = pair
    assert (ref.name, ort_rt.name) == ("torch", "onnx")
    for images, prompt in [([_img(0)], "what colour is the star?"), ([_img(1), _img(2)], "compare <image> and <image>"),
                           ([], "no image here")]:
        a = ref.logits(images, prompt, continuation=[10, 20, 30])
        b = ort_rt.logits(images, prompt, continuation=[10, 20, 30])
        assert len(a) == len(b) == 4
        for x, y in zip(a, b):
            assert set(x) == set(y) == {"final", 1, 3, 5}
            for k in x:
                assert np.abs(x[k] - y[k]).max() <= TOLERANCES["fp32"]["logits_max_abs"][1]
        assert ref.generate(images, prompt, max_new_tokens=6) == ort_rt.generate(images, prompt, max_new_tokens=6)
    assert ref.verbalize([_img(3)], "what shape?", 4) == ort_rt.verbalize([_img(3)], "what shape?", 4)


@pytest.mark.slow
def test_streaming_stop_and_sampling(pair):
    _, rt, _ = pair
    full = rt.generate([_img(0)], "describe", max_new_tokens=8)
    assert "".join(rt.generate([_img(0)], "describe", max_new_tokens=8, stream=True)) == full
    # precondition: the answer runs to max_new_tokens and its first token has at least two
    # characters, so a stop string can straddle the boundary between tokens 1 and 2
    ids = list(rt.stream_tokens([_img(0)], "describe", 8))
    first = len(rt.decode(ids[:1]))
    assert len(ids) == 8 and first >= 2 and rt.decode(ids) == full
    stop = full[first - 1: first + 1]
    assert full.find(stop) == first - 1, (full, stop)
    gen = rt.generate([_img(0)], "describe", max_new_tokens=8, stop=[stop], stream=True)
    assert "".join(gen) == full[: first - 1]
    assert (gen.finish_reason, gen.completion_tokens) == ("stop", 2)
    gen = rt.generate([_img(0)], "describe", max_new_tokens=8, stop=["not in the answer"], stream=True)
    assert "".join(gen) == full and gen.finish_reason == "length"
    a = rt.generate([_img(0)], "describe", max_new_tokens=8, temperature=1.0, seed=1)
    b = rt.generate([_img(0)], "describe", max_new_tokens=8, temperature=1.0, seed=1)
    assert a == b  # seeded sampling is reproducible
    with pytest.raises(ConfigError, match="max_new_tokens"):
        rt.generate([_img(0)], "x", max_new_tokens=0)
    with pytest.raises(ConfigError, match="placeholders"):
        rt.generate([_img(0)], "<image> <image>")


@pytest.mark.slow
def test_onnx_backend_imports_neither_torch_nor_transformers(pair):
    _, _, art = pair
    buf = io.BytesIO()
    _img(5).save(buf, format="PNG")
    code = f"""
import sys
sys.modules['torch'] = None
sys.modules['transformers'] = None
import vlsi_runtimes
rt = vlsi_runtimes.load({str(art)!r})
print(rt.generate([{buf.getvalue()!r}], 'what colour?', max_new_tokens=3))
assert 'torch' not in sys.modules or sys.modules['torch'] is None
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_bad_images_are_rejected_before_onnx_runtime(pair):
    from vlsi.images import ImageError

    _, rt, _ = pair
    with pytest.raises(ImageError):
        rt.generate([b"not an image"], "x", max_new_tokens=2)
    from PIL import Image

    with pytest.raises(ImageError, match="200"):
        rt.generate([Image.new("RGB", (1, 500))], "x", max_new_tokens=2)


def test_unknown_backend_and_path(tmp_path):
    with pytest.raises(ConfigError, match="backend 'tflite'"):
        vlsi_runtimes.load(tmp_path, backend="tflite")
    with pytest.raises(ConfigError, match="neither an export artifact"):
        vlsi_runtimes.load(tmp_path)


@pytest.mark.slow
def test_bench_table(pair, tiny_ckpt, tmp_path):
    import json

    from click.testing import CliRunner

    from vlsi_cli import main

    _, _, art = pair
    res = CliRunner().invoke(main, ["bench", str(art), "--reference", str(tiny_ckpt), "--runs", "1",
                                    "--new-tokens", "4", "--prompt-tokens", "40", "--out", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [r["backend"] for r in rows] == ["torch", "onnx"]
    assert rows[0]["x_decode_vs_torch"] == 1.0
    for r in rows:
        assert r["decode_tok_s"] > 0 and r["ttft_s"] > 0 and r["peak_rss_mb"] > 0 and r["roofline_tok_s"] > 0
    assert rows[1]["vision_s"] > 0
    assert "% of roofline" in res.output
    # paired with a plain ONNX Runtime loop over the same graphs, which decodes the same tokens
    o = rows[1]
    assert o["engine"] == "onnxruntime" and o["engine_same_tokens"] is True
    assert o["x_engine_rounds"] == [o["x_engine"]]  # one round: its ratio
    assert o["x_engine"] == pytest.approx(o["paired_decode_tok_s"] / o["engine_decode_tok_s"])
    assert "vlsi / engine" in res.output
    for r in rows:  # the follow-up rows: the reused prefix holds the whole first turn, image included
        assert r["followup_cached_tokens"] > r["followup_image_tokens"] > 0
        # ... and the answer's tokens that the runtime fed (all but the last it decoded)
        assert r["followup_cached_tokens"] == r["followup_first_turn_tokens"] + max(r["followup_answer_tokens"] - 1, 0)
        assert r["followup_ttft_cold_s"] > 0 and r["followup_ttft_reused_s"] > 0
    assert "TTFT reused s" in res.output
