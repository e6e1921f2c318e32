"""``vlsi_export.trt_quant``: fp16 graphs quantised into the forms TensorRT builds, checked on
ONNX Runtime's CPU provider.

The graph is a small decoder layer traced from a ``.half()`` torch module at opset 21, as the
TensorRT export traces it: fused q/k/v, attention as two activation MatMuls around an fp32
softmax, an fp32 RMSNorm, an MLP whose down projection has K=192 (INT4 block 64), a branch with
K=48 (fits no INT4 block: stays fp16), an LM head shared by the logits and a verbalizer head
(the exporter puts a ``Transpose`` in front of a shared weight), a 2-D ``Gemm`` with bias, and
a KV cache in and out.

Error bounds, as max |q - fp16| / max |fp16| over the logits of a prefill, a decode step and a
chunk after a cache (random weights and inputs: the worst case for round-to-nearest). Measured
on this graph; each bound is about twice the worst measurement:

- INT8 weight-only (steps of max|w|/127 per output channel): 0.4-0.6%; ModelOpt's int8 with
  activation Q/DQ, max calibration: 1.0-1.4% (entropy calibration clips: 5-10%, which is why
  max is the default). Bound 3%.
- INT4 (steps of max|w|/7 per block of 64-128, about 12% of a weight's spread, rms): RTN
  (ours or ModelOpt's) 7-9%; AWQ-lite / AWQ-clip 8-11% (random activations have none of the
  outlier channels AWQ protects). Bound 20%.
- FP8 e4m3 (ModelOpt, weights and activations): 4-5%. Bound 10%.

The round-to-nearest writers are also checked exactly: every dequantised weight lies within
half a step of its fp16 weight.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

D, HEADS, HD, FF, SMALL, VOCAB = 128, 2, 64, 192, 48, 256
INPUTS = ["inputs_embeds", "attention_mask", "past_key_0", "past_value_0"]
OUTPUTS = ["logits", "verbalizer_logits_1", "pooled", "present_key_0", "present_value_0"]
BOUND = {"int8": 0.03, "int4": 0.20, "fp8": 0.10}


def _module():
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(D, 3 * D, bias=False)
            self.o = nn.Linear(D, D, bias=False)
            self.up = nn.Linear(D, FF, bias=False)
            self.down = nn.Linear(FF, D, bias=False)  # K = 192: INT4 block 64
            self.a = nn.Linear(D, SMALL, bias=True)
            self.b = nn.Linear(SMALL, D, bias=False)  # K = 48: no INT4 block
            self.norm = nn.Parameter(torch.ones(D) + 0.1 * torch.randn(D))
            self.head = nn.Linear(D, VOCAB, bias=False)  # shared by logits and the verbalizer
            self.pool = nn.Linear(D, D, bias=True)  # on a 2-D input: a Gemm

        def rms(self, x):
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.norm

        def forward(self, x, attention_mask, past_key, past_value):
            b, length, _ = x.shape
            q, k, v = self.qkv(self.rms(x)).split(D, -1)
            q = q.view(b, length, HEADS, HD).transpose(1, 2) * HD ** -0.5
            k = torch.cat([past_key, k.view(b, length, HEADS, HD).transpose(1, 2)], 2)
            v = torch.cat([past_value, v.view(b, length, HEADS, HD).transpose(1, 2)], 2)
            s = k.shape[2]
            allowed = torch.ones(length, s, dtype=torch.bool).tril(s - length)[None, None]
            allowed = allowed & attention_mask[:, None, None, :].bool()
            scores = torch.where(allowed, (q @ k.transpose(-1, -2)).float(), torch.finfo(torch.float32).min)
            probs = scores.softmax(-1).to(x.dtype)
            h1 = x + self.o((probs @ v).transpose(1, 2).reshape(b, length, D))
            n = self.rms(h1)
            h = h1 + self.down(nn.functional.silu(self.up(n))) + self.b(torch.relu(self.a(n)))
            logits = self.head(self.rms(h[:, -1:]))[:, 0].float()
            verb = self.head(self.rms(h1[:, -1:]))[:, 0].float()
            return logits, verb, self.pool(h[:, -1]), k, v

    torch.manual_seed(0)
    return Layer().half().eval()


@pytest.fixture(scope="module")
def fp16_graph(tmp_path_factory):
    import torch

    torch.set_num_threads(2)
    path = tmp_path_factory.mktemp("trtq") / "decoder.onnx"
    dyn = torch.export.Dim.DYNAMIC
    ex = (torch.randn(1, 4, D).half(), torch.ones(1, 6, dtype=torch.long),
          torch.zeros(1, HEADS, 2, HD).half(), torch.zeros(1, HEADS, 2, HD).half())
    with torch.no_grad():
        torch.onnx.export(_module(), ex, str(path), input_names=INPUTS, output_names=OUTPUTS, dynamo=True,
                          opset_version=21, verbose=False,
                          dynamic_shapes=({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 2: dyn}, {0: dyn, 2: dyn}))
    m = onnx.load(str(path))
    if m.ir_version != 10:
        m.ir_version = 10
    onnx.save(m, str(path))  # one file, external data pulled in
    return path


def _feeds(n_new, n_past, seed):
    rng = np.random.default_rng(seed)
    return {"inputs_embeds": rng.standard_normal((1, n_new, D)).astype(np.float16),
            "attention_mask": np.ones((1, n_past + n_new), np.int64),
            "past_key_0": rng.standard_normal((1, HEADS, n_past, HD)).astype(np.float16),
            "past_value_0": rng.standard_normal((1, HEADS, n_past, HD)).astype(np.float16)}


CALIBRATION = [_feeds(n, 0, seed=i) for i, n in enumerate((16, 21, 9, 30))]  # prefills, different lengths
TESTS = [_feeds(12, 0, 100), _feeds(1, 12, 101), _feeds(5, 7, 102)]  # prefill, decode, chunked


def _run(path, feeds):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [s.run(None, f) for f in feeds]


def _rel_err(ref, out) -> float:
    """Worst max |out - ref| / max |ref| over test feeds, for logits and verbalizer logits."""
    worst = 0.0
    for r, o in zip(ref, out):
        for i in (0, 1):
            a, b = r[i].astype(np.float32), o[i].astype(np.float32)
            worst = max(worst, float(np.abs(a - b).max() / np.abs(a).max()))
    return worst


def _weight_names(path):
    """Weight initializer -> (K, N), as the source graph feeds its weight MatMuls (shared
    Transpose'd weights and Gemms included)."""
    m = onnx.load(str(path))
    inits = {t.name: tuple(t.dims) for t in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    out = {}
    for n in m.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits:
            out[n.input[1]] = inits[n.input[1]]
        elif n.op_type == "MatMul" and n.input[1] in prod and prod[n.input[1]].op_type == "Transpose" \
                and prod[n.input[1]].input[0] in inits:
            out[prod[n.input[1]].input[0]] = inits[prod[n.input[1]].input[0]][::-1]
        elif n.op_type == "Gemm" and n.input[1] in inits:
            out[n.input[1]] = inits[n.input[1]][::-1]
    return out


def _forms(path):
    """The checks TensorRT cares about, written out here (independently of ``inspect_graph``):
    returns the INT4 DQs as (K, N, block) and the INT8/FP8 weight DQs."""
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(path))
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) <= 21
    assert m.ir_version <= 10
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node), "non-standard ops (com.microsoft?)"
    inits = {t.name: t for t in m.graph.initializer}
    int4, other = [], []
    for n in m.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(n.input) > 2 and n.input[2]:
            assert not np.any(numpy_helper.to_array(inits[n.input[2]]).astype(np.float32)), f"{n.name}: zero point != 0"
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            t = inits[n.input[0]]
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            if t.data_type == TensorProto.INT4:
                assert attrs["axis"] == 0 and inits[n.input[1]].data_type == TensorProto.FLOAT16
                int4.append((t.dims[0], t.dims[1], attrs["block_size"]))
            else:
                assert t.data_type in (TensorProto.INT8, TensorProto.FLOAT8E4M3FN), t.data_type
                other.append(tuple(t.dims))
    # the fp32 islands survived: softmax and the norm statistics still run in fp32
    g = onnx.shape_inference.infer_shapes(m).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    for n in g.node:
        if n.op_type in ("Softmax", "ReduceMean"):
            assert types.get(n.output[0]) == TensorProto.FLOAT, f"{n.op_type} is no longer fp32"
    return sorted(int4), other


def _attention_unquantised(src, path):
    """The activation x activation MatMuls of ``src`` read no DequantizeLinear in ``path``."""
    s = onnx.load(str(src))
    inits = {t.name for t in s.graph.initializer}
    prod = {o: n for n in s.graph.node for o in n.output}
    att = [n.name for n in s.graph.node if n.op_type == "MatMul" and n.input[1] not in inits
           and not (n.input[1] in prod and prod[n.input[1]].op_type == "Transpose" and prod[n.input[1]].input[0] in inits)]
    assert len(att) == 2
    m = onnx.load(str(path))
    dq = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for n in m.graph.node:
        if n.name in att:
            assert not set(n.input) & dq, f"attention MatMul {n.name} got Q/DQ"


def _source_weights(src) -> dict[str, np.ndarray]:
    """Weight MatMul / Gemm node name -> its weight as (K, N) fp32, read from the source graph."""
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    inits = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    out = {}
    for n in m.graph.node:
        b = n.input[1] if len(n.input) > 1 else None
        if n.op_type == "MatMul" and b in inits:
            out[n.name] = inits[b]
        elif n.op_type == "MatMul" and b in prod and prod[b].op_type == "Transpose" and prod[b].input[0] in inits:
            out[n.name] = inits[prod[b].input[0]].T
        elif n.op_type == "Gemm" and b in inits:
            trans = any(a.name == "transB" and helper.get_attribute_value(a) for a in n.attribute)
            out[n.name] = inits[b].T if trans else inits[b]
    return out


def _within_half_step(src, path) -> int:
    """Every weight MatMul fed by a DequantizeLinear of a constant reads, for each element, its
    fp16 weight to within half a quantisation step (round-to-nearest); returns how many."""
    from onnx import numpy_helper

    weights = _source_weights(src)
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    dq = {n.output[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    checked = 0
    for n in m.graph.node:
        if n.op_type != "MatMul" or n.input[1] not in dq:
            continue
        d = dq[n.input[1]]
        q = numpy_helper.to_array(inits[d.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[d.input[1]]).astype(np.float32)
        block = next((a.i for a in d.attribute if a.name == "block_size"), 0)
        step = np.repeat(scale, block, axis=0) if block else np.broadcast_to(scale, q.shape)
        w = weights[n.name]
        assert np.all(np.abs(q * step - w) <= step / 2 + 2e-3 * np.abs(w) + 1e-6), n.name  # + fp16 rounding
        checked += 1
    return checked


@pytest.fixture(scope="module")
def reference(fp16_graph):
    return _run(fp16_graph, TESTS)


# ---------------------------------------------------------------------------------------------
# vlsi-rtn (always)


def test_source_graph_has_the_forms_we_handle(fp16_graph):
    w = _weight_names(fp16_graph)
    assert sorted(w.values()) == sorted([(D, 3 * D), (D, D), (D, FF), (FF, D), (D, SMALL), (SMALL, D),
                                         (D, VOCAB), (D, D)])
    ops = {n.op_type for n in onnx.load(str(fp16_graph)).graph.node}
    assert {"Gemm", "Transpose", "Softmax"} <= ops


def test_rtn_int4(fp16_graph, reference, tmp_path):
    from vlsi_export.trt_quant import quantize_for_tensorrt

    res = quantize_for_tensorrt(fp16_graph, tmp_path / "q.onnx", "int4", method="rtn")
    assert res.quantizer == "vlsi-rtn int4 block 128/64"
    int4, other = _forms(res.path)
    assert not other
    # qkv, o, up, a, head (shared: one DQ), pool at 128; down (K=192) at 64; b (K=48) stays fp16
    assert int4 == sorted([(D, 3 * D, 128), (D, D, 128), (D, FF, 128), (FF, D, 64), (D, SMALL, 128),
                           (D, VOCAB, 128), (D, D, 128)])
    assert len(res.skipped) == 1 and f"({SMALL}x{D})" in res.skipped[0] and "K=48" in res.skipped[0]
    assert res.details["blocks"] == {"128": 6, "64": 1} and res.details["folded_weight_transposes"] == 1
    assert res.details["gemms_to_matmuls"] == 1
    _attention_unquantised(fp16_graph, res.path)
    assert _within_half_step(fp16_graph, res.path) == 8  # 7 weights, the shared head read twice
    assert _rel_err(reference, _run(res.path, TESTS)) < BOUND["int4"]


def test_rtn_int4_block_64_everywhere(fp16_graph, tmp_path):
    from vlsi_export.trt_quant import quantize_for_tensorrt

    res = quantize_for_tensorrt(fp16_graph, tmp_path / "q.onnx", "int4", method="rtn", block_size=64)
    assert {b for _, _, b in _forms(res.path)[0]} == {64} and res.quantizer == "vlsi-rtn int4 block 64"


def test_rtn_int8(fp16_graph, reference, tmp_path):
    from vlsi_export.trt_quant import quantize_for_tensorrt

    res = quantize_for_tensorrt(fp16_graph, tmp_path / "q.onnx", "int8", method="rtn")
    assert res.quantizer == "vlsi-rtn int8 weight-only (per output channel)" and not res.skipped
    int4, other = _forms(res.path)
    assert not int4 and len(other) == 8  # every weight, K=48 included; the shared head once
    assert res.details["activation_qdq"] == 0
    _attention_unquantised(fp16_graph, res.path)
    assert _within_half_step(fp16_graph, res.path) == 9
    assert _rel_err(reference, _run(res.path, TESTS)) < BOUND["int8"]


def test_fp16_copies_and_auto_without_samples_falls_back(fp16_graph, reference, tmp_path):
    from vlsi_export.trt_quant import quantize_for_tensorrt

    res = quantize_for_tensorrt(fp16_graph, tmp_path / "f.onnx", "fp16")
    assert res.quantizer.startswith("none") and _rel_err(reference, _run(res.path, TESTS)) == 0
    res = quantize_for_tensorrt(fp16_graph, tmp_path / "a.onnx", "int8")  # auto, no calibration
    assert res.quantizer.startswith("vlsi-rtn int8") and "why_not_modelopt" in res.details


def test_auto_int4_without_samples(fp16_graph, tmp_path):
    from vlsi_export.trt_quant import modelopt_available, quantize_for_tensorrt

    res = quantize_for_tensorrt(fp16_graph, tmp_path / "a.onnx", "int4")
    if modelopt_available() is None:  # ModelOpt's own round-to-nearest needs no samples
        assert "int4 rtn_dq block 128/64" in res.quantizer and res.quantizer.startswith("modelopt")
    else:
        assert res.quantizer == "vlsi-rtn int4 block 128/64" and "ModelOpt unavailable" in res.details["why_not_modelopt"]


def test_refusals(fp16_graph, tmp_path):
    from vlsi_export.trt_quant import TrtQuantError, modelopt_available, quantize_for_tensorrt

    with pytest.raises(ValueError, match="block_size 32"):
        quantize_for_tensorrt(fp16_graph, tmp_path / "x.onnx", "int4", block_size=32)
    with pytest.raises(ValueError, match="precision 'int3'"):
        quantize_for_tensorrt(fp16_graph, tmp_path / "x.onnx", "int3")
    with pytest.raises(TrtQuantError, match="fp8 is written by NVIDIA ModelOpt only"):
        quantize_for_tensorrt(fp16_graph, tmp_path / "x.onnx", "fp8", method="rtn")
    if modelopt_available() is None:
        with pytest.raises(TrtQuantError, match="needs calibration samples"):
            quantize_for_tensorrt(fp16_graph, tmp_path / "x.onnx", "int8", method="modelopt")
        bad = [dict(CALIBRATION[0])]
        del bad[0]["past_key_0"]
        with pytest.raises(TrtQuantError, match=r"calibration sample 0: missing \['past_key_0'\]"):
            quantize_for_tensorrt(fp16_graph, tmp_path / "x.onnx", "int8", method="modelopt", calibration=bad)
        bad = [{**CALIBRATION[0], "inputs_embeds": CALIBRATION[0]["inputs_embeds"].astype(np.float32)}]
        with pytest.raises(TrtQuantError, match="inputs_embeds is float32, the graph takes float16"):
            quantize_for_tensorrt(fp16_graph, tmp_path / "x.onnx", "int8", method="modelopt", calibration=bad)


def test_inspect_graph_names_what_tensorrt_refuses():
    from onnx import TensorProto, helper

    from vlsi_export.trt_quant import inspect_graph

    w = helper.make_tensor("w", TensorProto.INT4, [96, 8], [1] * (96 * 8))
    s = helper.make_tensor("s", TensorProto.FLOAT, [3, 8], [0.1] * 24)
    zp = helper.make_tensor("zp", TensorProto.INT4, [3, 8], [1] * 24)
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "zp"], ["wd"], name="dq", axis=0, block_size=32),
             helper.make_node("MatMul", ["x", "wd"], ["y0"]),
             helper.make_node("MatMulNBits", ["y0"], ["y"], domain="com.microsoft")]
    g = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 96])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w, s, zp])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    problems = " | ".join(inspect_graph(m)["problems"])
    for what in ("opset 23 > 21", "com.microsoft.MatMulNBits", "zero point is not 0", "block size 32",
                 "scales are float32"):
        assert what in problems, what


# ---------------------------------------------------------------------------------------------
# NVIDIA ModelOpt: it installs and runs on a CPU, so these fail (not skip) when it is missing


@pytest.fixture(scope="module")
def modelopt():
    from vlsi_export.trt_quant import modelopt_available

    reason = modelopt_available()
    assert not reason, (f"NVIDIA ModelOpt does not import ({reason}); install it as `make test` does: "
                        "make .venv/.modelopt-installed")


def test_modelopt_int8(modelopt, fp16_graph, reference, tmp_path):
    from vlsi_export.trt_quant import quantize_for_tensorrt

    res = quantize_for_tensorrt(fp16_graph, tmp_path / "q.onnx", "int8", calibration=CALIBRATION, method="modelopt")
    assert res.quantizer.startswith("modelopt ") and "int8 (max calibration, 4 samples)" in res.quantizer
    int4, weights = _forms(res.path)
    # ModelOpt's GEMV rule keeps the pooler (a 2-D (1, D) output) fp16, and says so
    assert not int4 and len(weights) == 7
    assert len(res.skipped) == 1 and "left fp16 by ModelOpt" in res.skipped[0]
    assert res.details["activation_qdq"] >= 5  # activations of the weight MatMuls are Q/DQ'd
    _attention_unquantised(fp16_graph, res.path)
    assert _rel_err(reference, _run(res.path, TESTS)) < BOUND["int8"]


@pytest.mark.parametrize("method", ["awq_lite", "awq_clip", "rtn_dq"])
def test_modelopt_int4(modelopt, fp16_graph, reference, tmp_path, method):
    from modelopt.onnx.quantization import gs_patching

    from vlsi_export.trt_quant import quantize_for_tensorrt

    packer = gs_patching.pack_float32_to_4bit_cpp_based
    res = quantize_for_tensorrt(fp16_graph, tmp_path / "q.onnx", "int4", calibration=CALIBRATION, method="modelopt",
                                calibration_method=method)
    assert gs_patching.pack_float32_to_4bit_cpp_based is packer  # our CPU patches are undone
    assert f"int4 {method} block 128/64" in res.quantizer
    int4, other = _forms(res.path)
    assert not other
    assert int4 == sorted([(D, 3 * D, 128), (D, D, 128), (D, FF, 128), (FF, D, 64), (D, SMALL, 128),
                           (D, VOCAB, 128), (D, D, 128)])
    assert len(res.skipped) == 1 and "K=48" in res.skipped[0]
    _attention_unquantised(fp16_graph, res.path)
    if method == "rtn_dq":  # ModelOpt's own round-to-nearest obeys the same bound as ours
        assert _within_half_step(fp16_graph, res.path) == 8
    assert _rel_err(reference, _run(res.path, TESTS)) < BOUND["int4"]


def test_modelopt_fp8(modelopt, fp16_graph, reference, tmp_path):
    from vlsi_export.trt_quant import quantize_for_tensorrt

    res = quantize_for_tensorrt(fp16_graph, tmp_path / "q.onnx", "fp8", calibration=CALIBRATION)
    assert "fp8 (max calibration" in res.quantizer and res.details["fp8_weights"] == 7
    _forms(res.path)
    _attention_unquantised(fp16_graph, res.path)
    assert _rel_err(reference, _run(res.path, TESTS)) < BOUND["fp8"]
