"""The static TensorRT op check on small hand-made graphs, one forbidden pattern each, and on
what the two exporters really write."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from vlsi_export.trt_check import check_graph, table_key  # noqa: E402


def _model(nodes, inits, opset=21, ir=10, inputs=None, outputs=("y",), extra_opsets=()):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 128])]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT16, None) for o in outputs]
    g = helper.make_graph(nodes, "g", inputs, outs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.ir_version = ir
    return m


def _int4_dq(block=128, zp=None, name="w"):
    w = helper.make_tensor(f"{name}_q", TensorProto.INT4, [128, 64], np.zeros(128 * 64, np.int8).tolist())
    s = numpy_helper.from_array(np.ones((128 // block if block else 1, 64), np.float16), f"{name}_s")
    inputs = [f"{name}_q", f"{name}_s"]
    inits = [w, s]
    if zp is not None:
        inits.append(helper.make_tensor(f"{name}_z", TensorProto.INT4, [128 // block, 64], [zp] * (128 // block * 64)))
        inputs.append(f"{name}_z")
    node = helper.make_node("DequantizeLinear", inputs, [name], axis=0, block_size=block, name=f"dq_{name}")
    return node, inits


def _rules(report, version):
    return {f.rule for f in report.findings[version]}


def test_a_clean_graph_passes_every_version():
    dq, inits = _int4_dq(128)
    q8 = [numpy_helper.from_array(np.float16(0.1).reshape(()), "s8"), numpy_helper.from_array(np.int8(0).reshape(()), "z8")]
    nodes = [dq, helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("QuantizeLinear", ["h", "s8", "z8"], ["hq"]),
             helper.make_node("DequantizeLinear", ["hq", "s8", "z8"], ["hd"]),
             helper.make_node("Softmax", ["hd"], ["y"])]
    r = check_graph(_model(nodes, inits + q8), precision="int4")
    assert r.passed(), r.table()
    assert all(v in r.table() for v in ("10.3", "10.15", "11"))


def test_matmulnbits_is_refused_everywhere():
    w = numpy_helper.from_array(np.zeros((64, 2, 64), np.uint8), "w")
    n = helper.make_node("MatMulNBits", ["x", "w"], ["y"], domain="com.microsoft", K=128, N=64, bits=4, block_size=32)
    r = check_graph(_model([n], [w], extra_opsets=[helper.make_opsetid("com.microsoft", 1)]))
    assert all("domain" in _rules(r, v) for v in ("10.3", "10.15", "11"))


def test_asymmetric_zero_point_and_block_32_and_uint4():
    dq, inits = _int4_dq(128, zp=3)
    assert "dq" in _rules(check_graph(_model([dq, helper.make_node("MatMul", ["x", "w"], ["y"])], inits)), "10.3")
    dq, inits = _int4_dq(32)
    r = check_graph(_model([dq, helper.make_node("MatMul", ["x", "w"], ["y"])], inits))
    assert any("block size 32" in f.message for f in r.findings["11"])
    s = numpy_helper.from_array(np.float32(0.1).reshape(()), "s")
    z = numpy_helper.from_array(np.int8(5).reshape(()), "z")
    n = helper.make_node("DequantizeLinear", ["x8", "s", "z"], ["y"])
    x8 = [helper.make_tensor_value_info("x8", TensorProto.INT8, [4])]
    assert any("non-zero zero point" in f.message for f in check_graph(_model([n], [s, z], inputs=x8)).findings["10.3"])


def test_opset_23_ops_against_10_3_and_11():
    n = helper.make_node("RMSNormalization", ["x", "g"], ["y"])
    g = numpy_helper.from_array(np.ones(128, np.float16), "g")
    r = check_graph(_model([n], [g], opset=23, ir=11))
    assert {"op", "opset", "ir", "policy"} <= _rules(r, "10.3")
    assert "op" not in _rules(r, "11") and "opset" not in _rules(r, "11")
    assert "policy" in _rules(r, "11")  # vlsi's own rule: one graph for every version


def test_dynamic_quantize_is_refused():
    n = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
    r = check_graph(_model([n], [], outputs=("y",)))
    assert "op" in _rules(r, "10.3") and "op" in _rules(r, "11")


def test_fp32_weights_in_an_fp16_artifact():
    w = numpy_helper.from_array(np.zeros((128, 8), np.float32), "w")
    weight = helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")
    r = check_graph(_model([weight], [w]), precision="fp16")
    assert [f.node for f in r.findings["10.3"] if f.rule == "fp32_matmul"] == ["proj (MatMul)"]
    # two activations in fp32 (attention scores) are allowed
    act = helper.make_node("MatMul", ["x", "x2"], ["y"], name="scores")
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]), helper.make_tensor_value_info("x2", TensorProto.FLOAT, [8, 2])]
    assert check_graph(_model([act], [], inputs=ins), precision="fp16").passed()
    assert check_graph(_model([weight], [w]), precision=None).passed()  # an fp32 artifact may


def test_table_key():
    assert table_key("10.3.0.30") == "10.3" and table_key("10.7") == "10.3"
    assert table_key("10.15.1") == "10.15" and table_key("11.0") == "11"


def test_what_the_onnx_target_writes_is_refused(onnx_artifact):
    """Today's ONNX artifacts (opset 23, Attention, RMSNormalization) are what TensorRT 10.3
    cannot parse: the check says so."""
    r = check_graph(onnx_artifact / "decoder.onnx")
    assert {"op", "opset"} <= _rules(r, "10.3")
