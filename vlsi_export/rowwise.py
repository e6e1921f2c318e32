"""Row-by-row attention in the ONNX decoder segments, so that a pass over a few new positions
computes, bit for bit, what the same positions give fed one at a time.

Verifying drafted tokens (self-speculative decoding) runs the upper decoder layers over k + 1
positions in one pass, and its greedy output must equal plain decoding's, which feeds them one
by one. The weight products are batch-invariant at fp32 and with ``MatMulNBits`` (a row's result
does not depend on the other rows), but ONNX Runtime's ``Attention`` is not: over several query
rows it reduces in another order than over one (about 2e-7 apart, enough to flip a near-tie).

So each ``Attention`` node of a segment becomes an ``If``: for 2 to ``max_rows`` rows, a ``Loop``
that runs the same ``Attention`` once per row, on that row's query, key and value, the cache
extended by the rows before it, and that row's part of the mask: the very call a one-position
pass makes at that position. The presents are the cache and the new rows concatenated, as the
node made them. The loop runs only when the caller asks for it, through the segment's boolean
input ``row_wise`` (the runtime sets it when verifying drafts): a prompt or a follow-up's new
tokens, one row, and more than ``max_rows`` rows take the node as it was (a 16-row prefill in the
loop costs 1.5x the node's on the 0.5B shape).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto
from onnx import helper as oh

MAX_ROWS = 16
"""Passes of up to this many positions attend row by row (a draft of at most 15 tokens)."""

ROW_WISE_INPUT = "row_wise"
"""The segments' boolean scalar input: attend row by row (2..max_rows positions) when true."""


def _ints(name: str, values: list[int]):
    return oh.make_node("Constant", [], [name], value=oh.make_tensor(f"{name}_value", TensorProto.INT64,
                                                                       [len(values)], values))


def _row_by_row(node, p: str, head_dim: int) -> onnx.GraphProto:
    """The ``If`` branch for 2..max_rows rows: presents by concatenation, outputs from one
    ``Attention`` per row (``p`` prefixes every name this adds)."""
    q, k, v, mask, past_k, past_v = list(node.input)[:6]
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    kv_heads, heads = attrs["kv_num_heads"], attrs["q_num_heads"]
    n = lambda s: p + s  # noqa: E731
    body = oh.make_graph([
        oh.make_node("Unsqueeze", ["row", n("axis0")], [n("i")]),
        oh.make_node("Add", [n("i"), n("one")], [n("i1")]),
        oh.make_node("Slice", [q, n("i"), n("i1"), n("one")], [n("q_i")]),
        oh.make_node("Slice", [k, n("i"), n("i1"), n("one")], [n("k_i")]),
        oh.make_node("Slice", [v, n("i"), n("i1"), n("one")], [n("v_i")]),
        oh.make_node("Add", [n("cached"), n("i")], [n("upto")]),  # the cache this row's one-position pass has
        oh.make_node("Slice", [n("present_k"), n("axis0"), n("upto"), n("two")], [n("past_k_i")]),
        oh.make_node("Slice", [n("present_v"), n("axis0"), n("upto"), n("two")], [n("past_v_i")]),
        oh.make_node("Add", [n("upto"), n("one")], [n("keys")]),
        oh.make_node("Concat", [n("i"), n("axis0")], [n("mask_from")], axis=0),
        oh.make_node("Concat", [n("i1"), n("keys")], [n("mask_to")], axis=0),
        oh.make_node("Slice", [mask, n("mask_from"), n("mask_to"), n("axes23")], [n("mask_i")]),
        oh.make_node("Attention", [n("q_i"), n("k_i"), n("v_i"), n("mask_i"), n("past_k_i"), n("past_v_i")],
                     [n("attn_i"), n("unused_k"), n("unused_v")], name=n("row_attention"), **attrs),
        # a reshape to the row's known shape: ONNX Runtime cannot infer it through the loop's outer scope
        oh.make_node("Reshape", [n("attn_i"), n("row_shape")], [n("out_i")]),
        oh.make_node("Identity", ["cond"], ["cond_out"]),
    ], n("row"), [oh.make_tensor_value_info("row", TensorProto.INT64, []),
                  oh.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [oh.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         oh.make_tensor_value_info(n("out_i"), TensorProto.FLOAT, ["batch", 1, heads * head_dim])])
    nodes = [
        _ints(n("axis0"), [0]), _ints(n("one"), [1]), _ints(n("two"), [2]), _ints(n("axes23"), [2, 3]),
        _ints(n("kv_shape"), [0, 0, kv_heads, head_dim]), _ints(n("row_shape"), [0, 1, heads * head_dim]),
        _ints(n("packed"), [0, 0, heads * head_dim]),
        oh.make_node("Shape", [past_k], [n("past_shape")]),
        oh.make_node("Gather", [n("past_shape"), n("two")], [n("cached")], axis=0),
        oh.make_node("Reshape", [k, n("kv_shape")], [n("k4")]),
        oh.make_node("Transpose", [n("k4")], [n("k_new")], perm=[0, 2, 1, 3]),
        oh.make_node("Reshape", [v, n("kv_shape")], [n("v4")]),
        oh.make_node("Transpose", [n("v4")], [n("v_new")], perm=[0, 2, 1, 3]),
        oh.make_node("Concat", [past_k, n("k_new")], [n("present_k")], axis=2),
        oh.make_node("Concat", [past_v, n("v_new")], [n("present_v")], axis=2),
        oh.make_node("Shape", [q], [n("q_shape")]),
        oh.make_node("Gather", [n("q_shape"), n("one")], [n("rows1")], axis=0),
        oh.make_node("Squeeze", [n("rows1")], [n("rows")]),
        oh.make_node("Loop", [n("rows"), ""], [n("stacked")], body=body),  # (rows, B, 1, H*hd)
        oh.make_node("Transpose", [n("stacked")], [n("by_batch")], perm=[1, 0, 2, 3]),
        oh.make_node("Reshape", [n("by_batch"), n("packed")], [n("out")]),
    ]
    outs = [oh.make_tensor_value_info(n(x), TensorProto.FLOAT, None) for x in ("out", "present_k", "present_v")]
    return oh.make_graph(nodes, n("rows_branch"), [], outs)


def _as_is(node, p: str) -> onnx.GraphProto:
    """The ``If`` branch for one row or a prefill: the node itself."""
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    outs = [p + x for x in ("whole_out", "whole_k", "whole_v")]
    inner = oh.make_node("Attention", list(node.input)[:6], outs, name=p + "attention", **attrs)
    return oh.make_graph([inner], p + "whole_branch", [],
                         [oh.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in outs])


def row_wise_attention(model: onnx.ModelProto, max_rows: int = MAX_ROWS) -> int:
    """Rewrite ``model``'s ``Attention`` nodes (packed ``(B, T, heads * hd)`` query/key/value,
    with past and present) in place, taking :data:`ROW_WISE_INPUT` as a new last graph input;
    -> how many. A node of another form is refused."""
    g = model.graph
    if not any(i.name == ROW_WISE_INPUT for i in g.input):
        g.input.append(oh.make_tensor_value_info(ROW_WISE_INPUT, TensorProto.BOOL, []))
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    out, count = [], 0
    for node in g.node:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            out.append(node)
            continue
        ins = list(node.input)
        if len(ins) < 6 or not ins[4] or ins[4] not in dims or len(dims[ins[4]]) != 4 or not dims[ins[4]][3]:
            raise ValueError(f"{node.name}: an Attention without a cache input of known head size")
        if len(node.output) > 3 and node.output[3]:
            raise ValueError(f"{node.name}: its qk output is used")
        p = f"rowwise{count}_"
        head_dim = dims[ins[4]][3]
        out += [
            oh.make_node("Shape", [ins[0]], [p + "shape"]),
            _ints(p + "axis1", [1]), _ints(p + "single", [1]), _ints(p + "most", [max_rows]),
            oh.make_node("Gather", [p + "shape", p + "axis1"], [p + "t"], axis=0),
            oh.make_node("Greater", [p + "t", p + "single"], [p + "several"]),
            oh.make_node("LessOrEqual", [p + "t", p + "most"], [p + "few"]),
            oh.make_node("And", [p + "several", p + "few"], [p + "rows_1"]),
            oh.make_node("Squeeze", [p + "rows_1"], [p + "in_range"]),
            oh.make_node("And", [p + "in_range", ROW_WISE_INPUT], [p + "by_row"]),
            oh.make_node("If", [p + "by_row"], list(node.output)[:3], name=p + "if",
                         then_branch=_row_by_row(node, p, head_dim), else_branch=_as_is(node, p)),
        ]
        count += 1
    del g.node[:]
    g.node.extend(out)
    return count
