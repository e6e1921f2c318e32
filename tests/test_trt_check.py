"""The static TensorRT op check on small hand-made graphs, one forbidden pattern each, a clean
graph every version takes, the per-version tables themselves, and what the ONNX target writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from vlsi.errors import ConfigError  # noqa: E402
from vlsi_export.trt_check import TABLES, check_graph, table_key, tables  # noqa: E402

VERSIONS = ("10.3", "10.15", "11")
MS = helper.make_opsetid("com.microsoft", 1)


def _model(nodes, inits=(), opset=21, ir=10, inputs=None, outputs=(("y", TensorProto.FLOAT16),), extra_opsets=()):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 128])]
    outs = [helper.make_tensor_value_info(name, t, shape[0] if shape else None) for name, t, *shape in outputs]
    g = helper.make_graph(nodes, "g", inputs, outs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.ir_version = ir
    return m


def _int4_dq(block=128, zp=None, name="w", k=128, n=64, axis=0, scale_dtype=np.float16):
    """An INT4 (k, n) weight -> block-wise DequantizeLinear along ``axis``."""
    w = helper.make_tensor(f"{name}_q", TensorProto.INT4, [k, n], (np.arange(k * n) % 15 - 7).tolist())
    blocks = [k // block if block else 1, n] if axis == 0 else [k, n // block if block else 1]
    s = numpy_helper.from_array(np.full(blocks, 0.01, scale_dtype), f"{name}_s")
    inputs, inits = [f"{name}_q", f"{name}_s"], [w, s]
    if zp is not None:
        inits.append(helper.make_tensor(f"{name}_z", TensorProto.INT4, blocks, [zp] * int(np.prod(blocks))))
        inputs.append(f"{name}_z")
    attrs = {"block_size": block} if block else {}
    node = helper.make_node("DequantizeLinear", inputs, [name], axis=axis, name=f"dq_{name}", **attrs)
    return node, inits


def _rules(report, version):
    return {f.rule for f in report.findings[version]}


def _scalar(name, value, dtype):
    return numpy_helper.from_array(np.array(value, dtype), name)


def _clean_graph():
    """fp16 MatMul with an INT4 block-128 symmetric weight, INT8 Q/DQ with zero point 0, Softmax."""
    dq, inits = _int4_dq(128)
    inits += [_scalar("s8", 0.1, np.float16), _scalar("z8", 0, np.int8)]
    nodes = [dq, helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("QuantizeLinear", ["h", "s8", "z8"], ["hq"], name="q"),
             helper.make_node("DequantizeLinear", ["hq", "s8", "z8"], ["hd"], name="dq"),
             helper.make_node("Softmax", ["hd"], ["y"], name="softmax")]
    return _model(nodes, inits, outputs=(("y", TensorProto.FLOAT16, [2, 64]),))


# -- a clean graph --------------------------------------------------------------------------------


def test_a_clean_graph_passes_every_version():
    m = _clean_graph()
    onnx.checker.check_model(m, full_check=True)  # the fixture is a valid graph to begin with
    for precision in (None, "fp16", "int8", "int4"):
        r = check_graph(m, precision=precision)
        assert r.passed(), r.table()
        assert all(r.passed(v) for v in VERSIONS) and r.requirements == {}
    table = r.table()
    assert all(f"| {v} | passes | 0 |" in table for v in VERSIONS), table


def test_the_table_names_every_version_and_the_first_findings():
    n = helper.make_node("RMSNormalization", ["x", "g"], ["y"], name="norm")
    r = check_graph(_model([n], [numpy_helper.from_array(np.ones(128, np.float16), "g")], opset=23))
    table = r.table()
    for v in VERSIONS:
        assert f"| {v} |" in table
    assert "| 10.3 | fails |" in table and "RMSNormalization" in table and "[op]" in table


# -- rule: domain -----------------------------------------------------------------------------------


def test_matmulnbits_is_refused_everywhere():
    w = numpy_helper.from_array(np.zeros((64, 4, 16), np.uint8), "w")
    s = numpy_helper.from_array(np.ones(64 * 4, np.float16), "s")
    n = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", name="mm",
                         K=128, N=64, bits=4, block_size=32)
    r = check_graph(_model([n], [w, s], extra_opsets=[MS]))
    for v in VERSIONS:
        found = [f for f in r.findings[v] if f.rule == "domain"]
        assert [f.node for f in found] == ["mm (MatMulNBits)"]
        assert "com.microsoft" in found[0].message and "DequantizeLinear" in found[0].message  # what to do
        assert not r.passed(v)


def test_a_model_local_function_is_checked_through_its_body():
    body = [helper.make_node("Relu", ["a"], ["b"])]
    fn = helper.make_function("vlsi.local", "MyRelu", ["a"], ["b"], body, [helper.make_opsetid("", 21)])
    n = helper.make_node("MyRelu", ["x"], ["y"], domain="vlsi.local", name="call")
    m = _model([n], extra_opsets=[helper.make_opsetid("vlsi.local", 1)])
    m.functions.append(fn)
    assert check_graph(m).passed()
    bad = helper.make_function("vlsi.local", "MyRelu", ["a"], ["b"],
                               [helper.make_node("DynamicQuantizeLinear", ["a"], ["b", "s", "z"])],
                               [helper.make_opsetid("", 21)])
    m.functions[0].CopyFrom(bad)
    assert "op" in _rules(check_graph(m), "11")


# -- rule: op, opset, ir, policy ------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["RMSNormalization", "Attention"])
def test_opset_23_ops_are_refused_by_10_3_and_taken_by_11(op):
    if op == "RMSNormalization":
        nodes = [helper.make_node(op, ["x", "g"], ["y"], name="n")]
        inits = [numpy_helper.from_array(np.ones(128, np.float16), "g")]
        inputs = None
    else:
        nodes = [helper.make_node(op, ["q", "k", "v"], ["y"], name="n")]
        inits = []
        inputs = [helper.make_tensor_value_info(t, TensorProto.FLOAT16, [1, 2, 4, 8]) for t in "qkv"]
    r = check_graph(_model(nodes, inits, opset=23, ir=11, inputs=inputs))
    assert {"op", "opset", "ir", "policy"} <= _rules(r, "10.3")
    op_finding = next(f for f in r.findings["10.3"] if f.rule == "op")
    since = {"Attention": "10.14", "RMSNormalization": "10.15"}[op]
    assert op_finding.node == f"n ({op})" and f"TensorRT parses it from {since}" in op_finding.message
    assert "op" not in _rules(r, "10.15") and "op" not in _rules(r, "11")
    assert _rules(r, "11") == {"policy"}  # vlsi's own limit (opset 21, IR 10): one graph for every version


def test_dynamic_quantize_linear_is_refused_everywhere():
    n = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"], name="dq")
    r = check_graph(_model([n], outputs=(("y", TensorProto.UINT8),),
                           inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 128])]))
    for v in VERSIONS:
        (f,) = [f for f in r.findings[v] if f.rule == "op"]
        assert f.node == "dq (DynamicQuantizeLinear)" and "quantize_dynamic" in f.message


def test_opset_21_group_normalization_is_refused_by_10_3_only():
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4, 8])]
    gb = [numpy_helper.from_array(np.ones(4, np.float16), n) for n in ("g", "b")]
    node = helper.make_node("GroupNormalization", ["x", "g", "b"], ["y"], num_groups=2, name="gn")
    r = check_graph(_model([node], gb, inputs=ins))
    assert _rules(r, "10.3") == {"op"} and r.passed("10.15") and r.passed("11")
    assert check_graph(_model([node], gb, opset=18, inputs=ins)).passed()  # the opset-18 form


def test_policy_limits_every_version_and_ir_and_opset_limit_per_version():
    relu = [helper.make_node("Relu", ["x"], ["y"])]
    r = check_graph(_model(relu, opset=21, ir=11))
    assert _rules(r, "10.3") == {"ir", "policy"}
    assert _rules(r, "10.15") == {"policy"} and _rules(r, "11") == {"policy"}
    r = check_graph(_model(relu, opset=22, ir=10))
    assert _rules(r, "10.3") == {"opset", "policy"} and _rules(r, "11") == {"policy"}
    assert "opset 22" in r.findings["11"][0].message
    assert check_graph(_model(relu, opset=17, ir=8)).passed()  # older is fine


def test_versions_map_to_the_newest_table_at_or_below():
    assert table_key("10.3.0.30") == "10.3" and table_key("10.7") == "10.3"
    assert table_key("10.15.1") == "10.15" and table_key("10.16") == "10.15"
    assert table_key("11.0") == "11" and table_key("11.2") == "11"
    with pytest.raises(ConfigError, match="older than every table"):
        table_key("8.6")
    with pytest.raises(ConfigError, match="dotted numbers"):
        table_key("latest")
    n = helper.make_node("RMSNormalization", ["x", "g"], ["y"])
    r = check_graph(_model([n], [numpy_helper.from_array(np.ones(128, np.float16), "g")], opset=21),
                    versions=("10.7", "10.16"))
    assert list(r.findings) == ["10.7", "10.16"] and "op" in _rules(r, "10.7") and r.passed("10.16")


# -- rule: dq -------------------------------------------------------------------------------------------


def test_asymmetric_int8_zero_point_is_refused():
    x8 = [helper.make_tensor_value_info("x8", TensorProto.INT8, [4])]
    n = helper.make_node("DequantizeLinear", ["x8", "s", "z"], ["y"], name="dq8")
    r = check_graph(_model([n], [_scalar("s", 0.1, np.float16), _scalar("z", 5, np.int8)], inputs=x8))
    for v in VERSIONS:
        (f,) = r.findings[v]
        assert (f.rule, f.node) == ("dq", "dq8 (DequantizeLinear)") and "not 0" in f.message
    r = check_graph(_model([n], [_scalar("s", 0.1, np.float16), _scalar("z", 0, np.int8)], inputs=x8))
    assert r.passed()


def test_int4_block_32_and_other_int4_forms_are_refused():
    def rules_of(dq, inits):
        m = _model([dq, helper.make_node("MatMul", ["x", "w"], ["y"])], inits)
        return check_graph(m, precision="int4").findings["10.3"]

    found = rules_of(*_int4_dq(32))
    assert [f.rule for f in found] == ["dq"] and "block_size 32" in found[0].message
    assert any("no block_size" in f.message for f in rules_of(*_int4_dq(0)))  # per-channel INT4
    assert any("zero point" in f.message for f in rules_of(*_int4_dq(128, zp=3)))
    assert not rules_of(*_int4_dq(128, zp=0))  # an explicit all-zero zero point is symmetric
    assert not rules_of(*_int4_dq(64))
    assert not rules_of(*_int4_dq(128, axis=1, k=128, n=256))  # blocked along the last axis
    dq, inits = _int4_dq(128, k=192)  # 192 is not a multiple of 128
    assert any("not a multiple" in f.message for f in rules_of(dq, inits))


def test_uint4_int4_activations_and_uint8_are_refused():
    # UINT4 (asymmetric INT4) weights
    w = helper.make_tensor("w_q", TensorProto.UINT4, [128, 64], [8] * (128 * 64))
    s = numpy_helper.from_array(np.full((1, 64), 0.01, np.float16), "w_s")
    dq = helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], axis=0, block_size=128, name="dq_u4")
    r = check_graph(_model([dq, helper.make_node("MatMul", ["x", "w"], ["y"])], [w, s]))
    assert any(f.rule == "dq" and "UINT4 (asymmetric INT4)" in f.message for f in r.findings["11"])
    # INT4 of an activation: a QuantizeLinear to INT4, and a DQ of a non-initializer
    q = helper.make_node("QuantizeLinear", ["x", "s4", "z4"], ["xq"], name="q4")
    d = helper.make_node("DequantizeLinear", ["xq", "s4", "z4"], ["y"], name="d4")
    z4 = helper.make_tensor("z4", TensorProto.INT4, [], [0])
    r = check_graph(_model([q, d], [_scalar("s4", 0.1, np.float16), z4]))
    msgs = [f.message for f in r.findings["10.3"] if f.rule == "dq"]
    assert any("weight-only" in m for m in msgs) and any("not an initializer" in m for m in msgs)
    # a QuantizeLinear without a zero point quantises to UINT8 in ONNX
    q8 = helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], name="q8")
    d8 = helper.make_node("DequantizeLinear", ["xq", "s"], ["y"], name="d8")
    r = check_graph(_model([q8, d8], [_scalar("s", 0.1, np.float16)]))
    assert any("UINT8" in f.message for f in r.findings["10.3"] if f.node == "q8 (QuantizeLinear)")


def test_a_scale_that_is_not_constant_is_refused():
    ins = [helper.make_tensor_value_info("x8", TensorProto.INT8, [4]),
           helper.make_tensor_value_info("s", TensorProto.FLOAT16, [])]
    n = helper.make_node("DequantizeLinear", ["x8", "s"], ["y"], name="dq")
    r = check_graph(_model([n], inputs=ins))
    assert any("scale" in f.message and "constant" in f.message for f in r.findings["10.3"])


def test_fp8_is_a_requirement_and_fp4_needs_a_newer_tensorrt():
    ins = [helper.make_tensor_value_info("x8", TensorProto.FLOAT8E4M3FN, [4])]
    z = helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0.0])
    n = helper.make_node("DequantizeLinear", ["x8", "s", "z"], ["y"], name="dq")
    r = check_graph(_model([n], [_scalar("s", 0.1, np.float16), z], inputs=ins))
    assert r.passed() and r.requirements == {"fp8": "SM89+"}
    assert "fp8 SM89+" in r.table()
    ins = [helper.make_tensor_value_info("x4", TensorProto.FLOAT4E2M1, [4])]
    n = helper.make_node("DequantizeLinear", ["x4", "s"], ["y"], name="dq")
    r = check_graph(_model([n], [_scalar("s", 0.1, np.float16)], opset=23, ir=11, inputs=ins))
    assert r.requirements == {"nvfp4": "SM100+"}
    assert any(f.rule == "dq" and "FLOAT4E2M1" in f.message for f in r.findings["10.3"])
    assert "dq" not in _rules(r, "10.15") and "dq" not in _rules(r, "11")


def test_zero_points_are_read_from_external_data_without_loading_the_weights(tmp_path):
    x8 = [helper.make_tensor_value_info("x8", TensorProto.INT8, [64])]
    z = numpy_helper.from_array(np.full(64, 3, np.int8), "z")
    s = numpy_helper.from_array(np.full(64, 0.1, np.float16), "s")
    big = numpy_helper.from_array(np.zeros((256, 64), np.float16), "big")
    n = helper.make_node("DequantizeLinear", ["x8", "s", "z"], ["d"], axis=0, name="dq")
    mm = helper.make_node("MatMul", ["big", "d2"], ["y"], name="mm")
    rs = helper.make_node("Reshape", ["d", "shape"], ["d2"])
    shape = numpy_helper.from_array(np.array([64, 1], np.int64), "shape")
    m = _model([n, rs, mm], [s, z, big, shape], inputs=x8)
    path = tmp_path / "g.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="g.onnx.data", size_threshold=0)
    stored = onnx.load(str(path), load_external_data=False)
    assert all(onnx.external_data_helper.uses_external_data(t) for t in stored.graph.initializer)
    r = check_graph(path, precision="fp16")
    assert any(f.rule == "dq" and "not 0" in f.message for f in r.findings["10.3"])
    # in memory without its data there is nothing to read the zero point from: say so
    r = check_graph(stored)
    assert any("cannot be checked" in f.message for f in r.findings["10.3"])


# -- rule: fp32_matmul ----------------------------------------------------------------------------------


def test_fp32_weights_in_an_fp16_artifact_are_refused_but_fp32_attention_is_not():
    w = numpy_helper.from_array(np.zeros((128, 8), np.float32), "w")
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 128])]
    weight = helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")
    out = (("y", TensorProto.FLOAT),)
    r = check_graph(_model([weight], [w], inputs=ins, outputs=out), precision="fp16")
    for v in VERSIONS:
        assert [(f.rule, f.node) for f in r.findings[v]] == [("fp32_matmul", "proj (MatMul)")]
    assert check_graph(_model([weight], [w], inputs=ins, outputs=out), precision=None).passed()  # an fp32 artifact
    assert check_graph(_model([weight], [w], inputs=ins, outputs=out), precision="fp32").passed()
    # attention scores: two activations in fp32, on purpose
    q = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, [2, 8]) for n in ("q", "k")]
    nodes = [helper.make_node("Cast", ["q"], ["q32"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["k"], ["k32"], to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["k32"], ["kt"], perm=[1, 0]),
             helper.make_node("MatMul", ["q32", "kt"], ["scores"], name="scores"),
             helper.make_node("Softmax", ["scores"], ["y"])]
    r = check_graph(_model(nodes, inputs=q, outputs=out), precision="fp16")
    assert r.passed(), r.table()


def test_fp32_weights_through_a_cast_or_an_fp32_dequantize_are_refused():
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 128])]
    out = (("y", TensorProto.FLOAT),)
    w16 = numpy_helper.from_array(np.zeros((128, 8), np.float16), "w16")
    cast = [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")]
    (f,) = check_graph(_model(cast, [w16], inputs=ins, outputs=out), precision="fp16").findings["10.3"]
    assert f.rule == "fp32_matmul" and "Cast" in f.message
    dq, inits = _int4_dq(128, scale_dtype=np.float32)  # ModelOpt's int4 before the fp16 pass
    nodes = [dq, helper.make_node("Gemm", ["x", "w"], ["y"], name="proj")]
    (f,) = check_graph(_model(nodes, inits, inputs=ins, outputs=out), precision="int4").findings["11"]
    assert (f.rule, f.node) == ("fp32_matmul", "proj (Gemm)") and "fp32 scales" in f.message


def test_an_unknown_precision_or_version_is_a_one_line_error():
    with pytest.raises(ConfigError, match="precision 'bf8' is not one of"):
        check_graph(_clean_graph(), precision="bf8")
    with pytest.raises(ConfigError, match="older than every table"):
        check_graph(_clean_graph(), versions=("9.0",))


# -- the tables -----------------------------------------------------------------------------------------


def test_the_tables_hold_what_the_sources_say():
    t = tables()
    assert list(t) == list(VERSIONS)
    assert {k: len(v["ops"]) for k, v in t.items()} == {"10.3": 150, "10.15": 158, "11": 159}
    assert t["10.3"]["ops"] < t["10.15"]["ops"] < t["11"]["ops"]  # nothing the parser took was dropped
    assert t["10.15"]["ops"] - t["10.3"]["ops"] == {"Attention", "RMSNormalization", "RotaryEmbedding",
                                                     "TensorScatter", "BlackmanWindow", "HammingWindow",
                                                     "HannWindow", "STFT"}
    never = {"DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul", "ConvInteger", "AffineGrid", "Compress"}
    assert not never & t["11"]["ops"]
    assert all(v["custom_domains"] == [] for v in t.values())
    assert (t["10.3"]["max_opset"], t["10.3"]["max_ir_version"]) == (21, 10)
    data = json.loads(TABLES.read_text())
    assert data["sources"] and all(u.startswith("https://") for u in data["sources"].values())
    assert all(onnx.defs.has(op) for op in t["11"]["ops"] - {"ImageScaler", "ParametricSoftplus", "ScaledTanh",
                                                             "Scatter", "Upsample"})


def test_the_tables_ship_with_the_package():
    text = (TABLES.parents[1] / "pyproject.toml").read_text()
    assert '"vlsi_export" = ["*.json"]' in text


# -- what the ONNX target writes ---------------------------------------------------------------------------


@pytest.mark.slow
def test_what_the_onnx_target_writes_is_refused(onnx_artifact):
    """Today's ONNX artifacts (opset 23, Attention, RMSNormalization) are what TensorRT 10.3
    cannot parse: the check says so."""
    r = check_graph(onnx_artifact / "decoder_0.onnx")  # a segment of the split decoder
    assert {"op", "opset"} <= _rules(r, "10.3")
