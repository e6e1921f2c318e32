"""``vlsi export --target tensorrt`` on the CPU: the graphs TensorRT builds, their checks, the
host loop they share with the TensorRT backend, and the refusals.

Everything here runs the real exporter and the real onnxruntime on the exact files a device
would build engines from; nothing of TensorRT itself runs (see test_tensorrt_engine.py for
the engine runner against a fake ``tensorrt`` module). The int8/int4 sweep uses a briefly
trained student (see ``conftest.train_briefly``): an untrained model's near-flat logits make
top-1 agreement measure ties, not quantisation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

import vlsi_runtimes  # noqa: E402
from vlsi.errors import ConfigError  # noqa: E402
from vlsi.manifest import load_manifest  # noqa: E402
from vlsi_export import get_target  # noqa: E402

from .conftest import png_bytes  # noqa: E402


@pytest.fixture(scope="module")
def fp16(tiny_ckpt, tmp_path_factory):
    return get_target("tensorrt")(tiny_ckpt, tmp_path_factory.mktemp("trt") / "fp16", verbalizers=True,
                                  parity_samples=6)


def _graph(path):
    import onnx

    return onnx.load(str(path))


def test_layout_manifest_and_graph_forms(fp16):
    m = load_manifest(fp16)
    assert m.target == "tensorrt" and m.precision == "fp16" and m.verbalizers == [1, 3, 5]
    assert m.parity["passed"] and m.parity["metrics"]["top1"] >= 0.99
    assert {"vision", "decoder", "embed"} <= set(m.graphs)
    assert not (fp16 / "fp16").exists()  # the intermediate graphs are gone
    for name in ("vision", "decoder"):
        g = _graph(fp16 / m.graph(name).file)
        assert g.ir_version == 10
        assert {o.domain or "ai.onnx": o.version for o in g.opset_import}["ai.onnx"] == 21
        ops = {n.op_type for n in g.graph.node}
        assert not {n.domain for n in g.graph.node} - {"", "ai.onnx"}, "only stock ops"
        assert not ops & {"Attention", "RMSNormalization", "RotaryEmbedding", "MatMulNBits"}
        assert "Softmax" in ops
    dec = _graph(fp16 / "decoder.onnx")
    types = {v.name: v.type.tensor_type.elem_type for v in [*dec.graph.input, *dec.graph.output]}
    assert types["inputs_embeds"] == 10 and types["past_key_0"] == 10 and types["present_value_0"] == 10  # fp16
    assert types["rope_cos"] == 1 and types["logits"] == 1  # host tables and logits fp32
    # no weight matrix left in fp32: every float initializer of rank 2 is fp16
    big = [t for t in dec.graph.initializer if len(t.dims) == 2]
    assert big and all(t.data_type == 10 for t in big)
    # the softmax runs in fp32: its input comes through a Cast to float
    producers = {o: n for n in dec.graph.node for o in n.output}
    for n in dec.graph.node:
        if n.op_type == "Softmax":
            assert any(a.name == "to" and a.i == 1 for a in _upstream_cast(producers, n.input[0]).attribute)
    table = np.load(fp16 / "embed.npy", mmap_mode="r")
    assert table.dtype == np.float16 and table.shape[1] == m.model["hidden_size"]
    rope = m.graph("decoder").details["rope"]
    assert len(rope["inv_freq"]) == m.model["head_dim"] // 2 and set(rope["axes"]) == {0, 1, 2}  # M-RoPE


def _upstream_cast(producers, name):
    node = producers[name]
    while node.op_type != "Cast":
        node = producers[node.input[0]]
    return node


def test_build_file_fixtures_and_budget(fp16):
    build = json.loads((fp16 / "build.json").read_text())
    assert build["default_preset"] == "orin-nano" and set(build["presets"]) == {"orin-nano", "orin-agx", "desktop"}
    nano = build["presets"]["orin-nano"]
    prefill, decode = nano["profiles"]["decoder"]
    assert prefill["name"] == "prefill" and decode["name"] == "decode"
    assert prefill["shapes"]["inputs_embeds"][2][1] == nano["max_context"] == 1024
    assert decode["shapes"]["inputs_embeds"] == [[1, 1, 64]] * 3 or decode["shapes"]["inputs_embeds"][0][1] == 1
    assert prefill["shapes"]["past_key_0"][0][2] == 0 and decode["shapes"]["past_key_0"][2][2] == 1023
    (vision,) = nano["profiles"]["vision"]
    assert vision["shapes"]["pixel_values"][2][0] == nano["max_image_tokens"] * 4  # 2x2 merge
    assert nano["budget"]["fits"] and "GiB" in nano["budget"]["line"]
    for name, entry in build["op_check"].items():
        assert all(entry["passed"].values()), (name, entry["table"])
    fx = json.loads((fp16 / "fixtures" / "fixtures.json").read_text())
    ref = np.load(fp16 / "fixtures" / "reference.npz")
    assert len(fx["samples"]) == 4
    for i, s in enumerate(fx["samples"]):
        assert all((fp16 / p).is_file() for p in s["images"]) and s["reference_ids"]
        assert ref[f"logits_{i}"].shape == (load_manifest(fp16).model["vocab_size"],)


def test_shared_loop_answers_as_pytorch(fp16, tiny_ckpt):
    """The TensorRT host loop (here over ONNX Runtime) against the checkpoint, greedy, on image
    shapes that change the token count and the M-RoPE grid."""
    ref = vlsi_runtimes.load(tiny_ckpt, backend="torch")
    rt = vlsi_runtimes.load(fp16, backend="onnx")
    assert rt.runner.name == "onnxruntime"
    for size, colour in [((56, 56), (200, 30, 30)), ((112, 56), (10, 200, 30)), ((84, 140), (20, 20, 220))]:
        img = png_bytes(size, colour)
        prompt = "What colour is the shape?"
        assert rt.encode([img], prompt).ids == ref.encode([img], prompt).ids
        assert list(rt.stream_tokens([img], prompt, 12)) == list(ref.stream_tokens([img], prompt, 12))
        a, b = ref.logits([img], prompt)[0], rt.logits([img], prompt)[0]
        assert np.abs(a["final"] - b["final"]).max() < 2e-2
        for layer in (1, 3, 5):
            assert np.argmax(a[layer]) == np.argmax(b[layer])
    assert rt.verbalize([png_bytes()], "Name it.", max_new_tokens=4).keys() == {1, 3, 5, "final"}


def test_rope_tables_equal_the_models_rotary(tiny_ckpt):
    import torch

    from vlsi.archs.rope import rope_tables
    from vlsi.archs.tensorrt import rope_block
    from vlsi.checkpoint import load_checkpoint

    ck = load_checkpoint(tiny_ckpt)
    rope = rope_block(ck.model, ck.adapter)
    pos = np.stack([np.arange(7), np.arange(7) // 2, np.arange(7) % 3])[:, None, :]  # (3, 1, 7), axes differ
    cos, sin = rope_tables(pos, rope)
    rot = ck.adapter.language_model(ck.model).rotary_emb
    tc, ts = rot(torch.zeros(1, 7, 4), torch.from_numpy(pos))
    np.testing.assert_allclose(cos, tc.numpy(), atol=1e-6)
    np.testing.assert_allclose(sin, ts.numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def trained(synth_data, tmp_path_factory):
    from .conftest import train_briefly

    # hidden 256: every decoder matrix has a width INT4 blocks of 128 fit (the 96-wide student's
    # would mostly stay fp16)
    return train_briefly("qwen2_vl", synth_data, tmp_path_factory.mktemp("trt-trained"), size="k256")


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp16", "int8", "int4"])
def test_every_precision_passes_cpu_parity(trained, quant, tmp_path):
    """Each precision through the whole export: quantiser, checks, the parity gate on the exact
    TensorRT graphs. The measured metrics go to <basetemp>/trt_parity_table.json."""
    # 4 calibration prompts: AWQ's scale search is ~10 s per matrix and prompt on 2 cores
    out = get_target("tensorrt")(trained, tmp_path / quant, quant=quant, verbalizers=True, parity_samples=8,
                                 calibration_samples=4)
    m = load_manifest(out)
    assert m.parity["passed"] and m.precision == quant
    dec = _graph(out / "decoder.onnx")
    dq = [n for n in dec.graph.node if n.op_type == "DequantizeLinear"]
    inits = {t.name: t for t in dec.graph.initializer}
    if quant == "int4":
        int4 = [n for n in dq if n.input[0] in inits and inits[n.input[0]].data_type == 22]  # INT4
        assert int4, "int4 weights feed block-wise DequantizeLinear"
        for n in int4:
            assert {a.name: a.i for a in n.attribute}.get("block_size") in (64, 128)
        assert not m.quantization["decoder"]["kept_fp16"], m.quantization["decoder"]["kept_fp16"]
    elif quant == "int8":
        assert dq and any(inits.get(n.input[0]) is not None and inits[n.input[0]].data_type == 3 for n in dq)
    else:
        assert not dq
    for n in dq:  # zero points are absent or zero
        if len(n.input) > 2 and n.input[2] in inits:
            from onnx import numpy_helper

            assert not numpy_helper.to_array(inits[n.input[2]]).astype(np.int64).any()
    row = {k: m.parity["metrics"][k] for k in ("top1", "kl_mean", "logits_max_abs", "greedy_match", "vision_max_abs",
                                              "verbalizer_top1")}
    row["quantizer"] = m.quantization["quantizer"]
    table = tmp_path.parent.parent / "trt_parity_table.json"
    data = json.loads(table.read_text()) if table.is_file() else {}
    data[quant] = row
    table.write_text(json.dumps(data, indent=2))
    print(quant, row)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava_onevision"])
def test_other_architectures_export_fp16(arch, tmp_path):
    from vlsi.tiny import save_tiny

    ck = save_tiny(tmp_path / "s", arch=arch, size="student", seed=0, verbalizer_layers="1::2")
    out = get_target("tensorrt")(ck, tmp_path / "trt", verbalizers=True, parity_samples=4)
    m = load_manifest(out)
    assert m.parity["passed"] and m.model["arch"] == arch
    rt = vlsi_runtimes.load(out, backend="onnx")
    ref = vlsi_runtimes.load(ck, backend="torch")
    img = png_bytes((130, 61))  # LLaVA-OV: a 2x1 anyres grid with unpadding
    assert rt.encode([img], "Describe.").ids == ref.encode([img], "Describe.").ids
    # an untrained model's logits are near-ties (greedy paths part on 1e-3 differences), so
    # compare the computation along the reference's own continuation
    cont = list(ref.stream_tokens([img], "Describe.", 8))
    for a, b in zip(ref.logits([img], "Describe.", cont), rt.logits([img], "Describe.", cont)):
        assert np.abs(a["final"] - b["final"]).max() < 1e-2


def test_refusals(tiny_ckpt, tmp_path, fp16, onnx_artifact):
    trt = get_target("tensorrt")
    with pytest.raises(ConfigError, match="fp8 needs a GPU of compute capability 8.9.*8.7"):
        trt(tiny_ckpt, tmp_path / "a", quant="fp8", preset="orin-nano")
    with pytest.raises(ConfigError, match="--preset 'jetson-tx2' is not one of"):
        trt(tiny_ckpt, tmp_path / "b", preset="jetson-tx2")
    with pytest.raises(ConfigError, match="--max-context 0"):
        trt(tiny_ckpt, tmp_path / "c", max_context=0)
    with pytest.raises(ConfigError, match="no option --block-size"):
        trt(tiny_ckpt, tmp_path / "d", block_size=32)
    assert not any(p.name in "abcd" for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match="not a TensorRT artifact.*--backend onnx --providers tensorrt"):
        vlsi_runtimes.load(onnx_artifact, backend="tensorrt")
    with pytest.raises(ConfigError, match="providers= is an option of the onnx backend"):
        vlsi_runtimes.load(fp16, backend="tensorrt", providers="cpu")


def test_onnx_artifact_on_onnxruntimes_providers(onnx_artifact):
    """Running an ONNX artifact on ONNX Runtime's TensorRT/CUDA provider is an option of the onnx
    backend; where this onnxruntime has none (this CPU machine), the error says what to install."""
    import onnxruntime as ort

    rt = vlsi_runtimes.load(onnx_artifact, backend="onnx", providers="cpu")
    assert rt.providers == ["CPUExecutionProvider"]
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        return
    with pytest.raises(ConfigError, match="no TensorrtExecutionProvider.*onnxruntime-gpu"):
        vlsi_runtimes.load(onnx_artifact, backend="onnx", providers="tensorrt,cuda,cpu")


def test_budget_of_a_2b_model_on_each_preset():
    """A Qwen2-VL-2B-shaped model: int4 weights fit an Orin Nano at its 1,024-token preset, fp16
    weights at a 64k context do not."""
    from vlsi_export.trt_presets import PRESETS, budget

    model = {"num_layers": 28, "num_kv_heads": 2, "head_dim": 128, "hidden_size": 1536}
    vision = {"patches_per_token": 4, "heads": 16, "width": 1280}
    int4 = budget(PRESETS["orin-nano"], model, weight_bytes=int(1.1e9), embed_bytes=int(0.47e9), vision=vision)
    assert int4.fits, int4.line()
    fp16 = budget(PRESETS["orin-nano"], model, weight_bytes=int(4.4e9), embed_bytes=int(0.47e9), vision=vision,
                  max_context=65536)
    assert not fp16.fits and "DOES NOT FIT" in fp16.line()
    assert fp16.kv_cache_gib == pytest.approx(1.75)  # 2 * 28 * 2 * 128 * 65536 * 2 bytes
