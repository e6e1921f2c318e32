"""A static TensorRT check of an ONNX graph, per TensorRT version, on a machine without a GPU.

TensorRT engines are built on the device (a Jetson on JetPack 6 runs TensorRT 10.3), so a graph
its ONNX parser refuses, or builds at the wrong precision, is otherwise found there, late. Most
refusals can be read off the graph itself: an op outside a version's operator table, a custom
domain, an opset or IR version above what the parser was built on, a Q/DQ form TensorRT does not
take. :func:`check_graph` applies those rules for each requested version and returns a
:class:`CheckReport` (findings per version; an empty list means the version passes).

The per-version facts (operators, opset and IR limits, quantized types) are data, in
``trt_ops.json`` next to this file, with the sources they were read from; the rules are here.
Rules, each named in its findings:

- ``domain``: a node outside the default ONNX domain (``com.microsoft``'s ``MatMulNBits``,
  ``GroupQueryAttention``, ...). No TensorRT parses those; model-local functions are checked
  through their bodies instead.
- ``op``: a default-domain op the version's table does not list (``Attention`` before 10.14,
  ``RMSNormalization`` before 10.15, ``DynamicQuantizeLinear`` and ``MatMulInteger`` never), or
  a listed op at a newer schema version than the version imports.
- ``opset`` / ``ir``: the model's default-domain opset or IR version above the version's limit.
- ``policy``: vlsi's own rule for what it writes for TensorRT, the same for every version:
  opset <= :data:`VLSI_MAX_OPSET`, IR <= :data:`VLSI_IR` (what JetPack 6's TensorRT reads).
- ``dq``: QuantizeLinear / DequantizeLinear. Zero points absent or all 0 (INT8, INT4, FP8);
  quantized types among the version's (INT8, INT4, FP8 E4M3FN; FP4 E2M1 from 10.8); no UINT8
  or UINT4 (asymmetric); constant scales; INT4 weight-only: an INT4 initializer fed straight
  to a DequantizeLinear with ``block_size`` 64 or 128, blocked along one of the last two axes.
  FP8 and FP4 are not failures but hardware requirements, in :attr:`CheckReport.requirements`
  (``{"fp8": "SM89+"}``, ``{"nvfp4": "SM100+"}``).
- ``fp32_matmul`` (only for a graph declared fp16, int8, int4 or fp8): a MatMul or Gemm whose
  weight operand is fp32 and constant (an fp32 initializer, a Cast of a constant to fp32, a
  DequantizeLinear with fp32 scales): fp32 weights left behind in a low-precision artifact.
  MatMuls of two activations in fp32 are allowed: the exported attention computes its scores
  in fp32 on purpose.

Weights are not loaded: a path is read with ``load_external_data=False`` (initializer types and
shapes are in the graph file); only the zero points, which are tiny, are read from external
data when their values are needed. Torch-free: onnx, numpy and :mod:`vlsi.errors`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from vlsi.errors import ConfigError, VLsIError

VLSI_MAX_OPSET = 21
"""The highest opset vlsi writes for TensorRT: block-wise DequantizeLinear needs 21, and 21 is
what JetPack 6's TensorRT 10.3 reads."""
VLSI_IR = 10
"""The IR version vlsi writes for TensorRT (ONNX 1.16, the ONNX of TensorRT 10.3's parser)."""
DEFAULT_VERSIONS = ("10.3", "10.15", "11")
PRECISIONS = ("fp32", "fp16", "int8", "int4", "fp8")
CHECKED_PRECISIONS = ("fp16", "int8", "int4", "fp8")
"""Precisions whose artifacts must hold no fp32 weights (the ``fp32_matmul`` rule)."""
INT4_BLOCK_SIZES = (64, 128)
TABLES = Path(__file__).with_name("trt_ops.json")

_DEFAULT_DOMAINS = ("", "ai.onnx")
# ops a constant weight may pass through on its way to a MatMul and still be a weight
_PASS_THROUGH = {"Cast", "CastLike", "Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten",
                 "DequantizeLinear", "QuantizeLinear", "Expand"}
_INT4_WAY = "store INT4 weights as an INT4 initializer -> DequantizeLinear (block_size 64 or 128) -> MatMul"
_ATTENTION_WAY = "write attention out with stock ops: MatMul, additive mask, Softmax in fp32, MatMul"
_QDQ_WAY = "quantise with static QuantizeLinear/DequantizeLinear, zero point 0 (ModelOpt's form)"
_OP_HINTS = {
    "Attention": _ATTENTION_WAY,
    "RMSNormalization": "decompose it in fp32 (Mul, ReduceMean, Add, Sqrt, Div, Mul)",
    "RotaryEmbedding": "apply host-computed cos/sin with Mul, Add, Slice and Concat",
    "TensorScatter": "output the new K/V and let the host write the cache",
    "DynamicQuantizeLinear": "this is ONNX Runtime's quantize_dynamic output; " + _QDQ_WAY,
    "MatMulInteger": "this is ONNX Runtime's quantize_dynamic output; " + _QDQ_WAY,
    "ConvInteger": "this is ONNX Runtime's quantize_dynamic output; " + _QDQ_WAY,
    "QLinearMatMul": "QOperator quantisation is not parsed; " + _QDQ_WAY,
    "QLinearConv": "QOperator quantisation is not parsed; " + _QDQ_WAY,
}
_DOMAIN_HINTS = {
    "MatMulNBits": _INT4_WAY,
    "GroupQueryAttention": _ATTENTION_WAY,
    "MultiHeadAttention": _ATTENTION_WAY,
    "Attention": _ATTENTION_WAY,
    "DynamicQuantizeMatMul": _QDQ_WAY,
    "MatMulIntegerToFloat": _QDQ_WAY,
}


class TrtCheckError(VLsIError):
    """The graph to check could not be read."""


@dataclass
class Finding:
    version: str
    """The TensorRT version the finding is for, as it was asked for (``"10.3"``, ``"10.7"``)."""
    rule: str
    """domain, op, opset, ir, policy, dq or fp32_matmul."""
    node: str | None
    """The node, as ``"name (OpType)"`` (its first output for an unnamed node); None for the model."""
    message: str
    """What is wrong, on which node (op type and name or output), and what to do."""

    def __str__(self) -> str:
        return f"[{self.rule}] {self.message}"


@dataclass
class CheckReport:
    findings: dict[str, list[Finding]]
    """TensorRT version -> findings; an empty list means the graph passes that version."""
    requirements: dict[str, str] = field(default_factory=dict)
    """Hardware the graph needs whatever the version, e.g. ``{"fp8": "SM89+"}``."""

    def passed(self, version: str | None = None) -> bool:
        """Whether ``version`` (every checked version when None) has no findings."""
        if version is None:
            return not any(self.findings.values())
        if version not in self.findings:
            raise ConfigError(f"TensorRT version {version!r} was not checked; checked: {', '.join(self.findings)}")
        return not self.findings[version]

    def rules(self, version: str) -> set[str]:
        """The rules ``version``'s findings name."""
        return {f.rule for f in self.findings[version]}

    def table(self, first: int = 3) -> str:
        """Markdown: one row per version (passes or not, the number of findings, the first few)."""
        lines = ["| TensorRT | result | findings | first findings |", "| --- | --- | --- | --- |"]
        for version, found in self.findings.items():
            shown = "; ".join(_cell(str(f)) for f in found[:first]) + ("; ..." if len(found) > first else "")
            lines.append(f"| {version} | {'passes' if not found else 'fails'} | {len(found)} | {shown} |")
        if self.requirements:
            lines += ["", "Requires: " + ", ".join(f"{k} {v}" for k, v in self.requirements.items())]
        return "\n".join(lines)


def _cell(text: str, limit: int = 160) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


@lru_cache(maxsize=1)
def _data() -> dict:
    return json.loads(TABLES.read_text())


@lru_cache(maxsize=1)
def tables() -> dict[str, dict]:
    """TensorRT version -> its table (ops, limits, quantized types, notes), from ``trt_ops.json``."""
    return {v: {**t, "ops": frozenset(t["ops"])} for v, t in _data()["versions"].items()}


def added_in(op_type: str) -> str | None:
    """The TensorRT release whose parser first takes ``op_type``, for ops newer than 10.3."""
    return {k: v for k, v in _data()["added_in"].items() if k != "about"}.get(op_type)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = version.split(".")
    if not parts or not all(p.isdigit() for p in parts):
        raise ConfigError(f"TensorRT version {version!r} is not dotted numbers like 10.3 or 10.3.0.30")
    return tuple(int(p) for p in parts)


def table_key(version: str) -> str:
    """The table a TensorRT version is checked against: the newest at or below it
    (``"10.3.0.30"`` -> ``"10.3"``, ``"10.7"`` -> ``"10.3"``, ``"11.2"`` -> ``"11"``)."""
    want = _version_tuple(version)
    keys = sorted(tables(), key=_version_tuple)
    below = [k for k in keys if _version_tuple(k) <= want[:len(_version_tuple(k))]]
    if not below:
        raise ConfigError(f"TensorRT {version} is older than every table ({', '.join(keys)}): "
                          f"install TensorRT {keys[0]} or newer (JetPack 6)")
    return below[-1]


def check_graph(model_or_path, versions=DEFAULT_VERSIONS, *, precision: str | None = None) -> CheckReport:
    """Check an ONNX graph (a path or a ``ModelProto``) against each TensorRT version in ``versions``.

    A version is checked against :func:`table_key`'s table (``"10.7"`` against 10.3's); the
    report's keys are the versions as given. ``precision`` is what the artifact claims to be:
    for fp16, int8, int4 and fp8 any constant fp32 weight feeding a MatMul or Gemm is a finding
    (``fp32_matmul``). MatMuls of two activations are left alone: fp32 attention scores are
    deliberate. None or fp32: no such rule.
    """
    if isinstance(versions, str):
        versions = (versions,)
    keys = {v: table_key(v) for v in versions}
    if precision is not None and precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    graph = _Graph(*_load(model_or_path))
    requirements: dict[str, str] = {}
    findings = {v: graph.check(v, key, precision, requirements) for v, key in keys.items()}
    return CheckReport(findings, requirements)


def _load(model_or_path):
    """(model, folder of its external data or None)."""
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, None
    path = Path(model_or_path)
    if not path.is_file():
        raise TrtCheckError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path), load_external_data=False), path.parent
    except Exception as e:  # protobuf's DecodeError and friends
        raise TrtCheckError(f"{path}: not an ONNX model ({type(e).__name__}: {e})") from e


class _Graph:
    """One model's nodes (subgraphs and local functions included), initializers, producers and types."""

    def __init__(self, model, base_dir: Path | None):
        import onnx

        self.model, self.base_dir = model, base_dir
        self.opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), None)
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.inits: dict = {}
        self.producer: dict = {}
        self.types: dict[str, int] = {}
        self.nodes: list = []
        self._values: dict = {}
        self._walk(model.graph)
        try:  # types of activations; initializer shapes are in the graph even when their data is not
            inferred = onnx.shape_inference.infer_shapes(model).graph
        except Exception:  # a >2 GB in-memory model, or a graph inference rejects: use what is declared
            inferred = model.graph
        for vi in [*inferred.value_info, *inferred.input, *inferred.output, *model.graph.value_info]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self.types.setdefault(vi.name, vi.type.tensor_type.elem_type)

    def _walk(self, graph, seen_functions=None):
        from onnx import AttributeProto

        seen_functions = set() if seen_functions is None else seen_functions
        for t in getattr(graph, "initializer", ()):  # a FunctionProto has none
            self.inits[t.name] = t
        for node in graph.node:
            key = (node.domain, node.op_type)
            if key in self.functions:  # a model-local function: TensorRT imports its body
                if key not in seen_functions:
                    seen_functions.add(key)
                    self._walk(self.functions[key], seen_functions)
                continue
            self.nodes.append(node)
            for out in node.output:
                if out:
                    self.producer[out] = node
            for a in node.attribute:
                if a.type == AttributeProto.GRAPH:
                    self._walk(a.g, seen_functions)
                elif a.type == AttributeProto.GRAPHS:
                    for g in a.graphs:
                        self._walk(g, seen_functions)

    # -- what a tensor is ---------------------------------------------------------------------

    def dtype(self, name: str) -> int | None:
        """The element type of tensor ``name`` (a TensorProto.DataType), when it can be told."""
        from onnx import TensorProto

        if name in self.inits:
            return self.inits[name].data_type
        node = self.producer.get(name)
        if node is not None:
            attrs = _attrs(node)
            if node.op_type == "Constant":
                return _constant_dtype(node)
            if node.op_type == "Cast":
                return attrs.get("to")
            if node.op_type == "DequantizeLinear":
                return attrs.get("output_dtype") or self.dtype(node.input[1])
            if node.op_type == "QuantizeLinear":
                if len(node.input) > 2 and node.input[2]:
                    return self.dtype(node.input[2])
                return attrs.get("output_dtype") or TensorProto.UINT8
        return self.types.get(name)

    def constant(self, name: str, depth: int = 0) -> bool:
        """Whether ``name`` is a constant: an initializer, a Constant, or one passed through
        Cast / DequantizeLinear / Transpose / Reshape and the like."""
        if name in self.inits:
            return True
        node = self.producer.get(name)
        if node is None or depth > 16:
            return False
        if node.op_type == "Constant":
            return True
        return node.op_type in _PASS_THROUGH and bool(node.input) and self.constant(node.input[0], depth + 1)

    def values(self, name: str):
        """The values of constant ``name`` (an ndarray), or a one-line reason they cannot be read."""
        if name not in self._values:
            self._values[name] = self._read(name)
        return self._values[name]

    def _read(self, name: str):
        from onnx import external_data_helper, numpy_helper

        if name in self.inits:
            t = self.inits[name]
            if external_data_helper.uses_external_data(t):
                if self.base_dir is None:
                    return "stored as external data of a model passed in memory (check the file instead)"
                try:
                    return numpy_helper.to_array(t, base_dir=str(self.base_dir))
                except Exception as e:
                    return f"its external data could not be read ({type(e).__name__}: {e})"
            return numpy_helper.to_array(t)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
            return "a Constant without a tensor value"
        if node is not None and node.op_type == "Identity":
            return self.values(node.input[0])
        return "not a constant"

    # -- the rules ----------------------------------------------------------------------------

    def check(self, version: str, key: str, precision: str | None, requirements: dict) -> list[Finding]:
        """The findings for TensorRT ``version``, judged by table ``key``."""
        out: list[Finding] = []
        table = tables()[key]

        def add(rule: str, node, message: str):
            out.append(Finding(version, rule, _where(node) if node is not None else None, message))

        trt = f"TensorRT {version}"
        ir = self.model.ir_version
        if self.opset is not None and self.opset > table["max_opset"]:
            add("opset", None, f"opset {self.opset} is above {trt}'s {table['max_opset']}: export at opset "
                               f"<= {table['max_opset']}")
        if ir > table["max_ir_version"]:
            add("ir", None, f"IR version {ir} is above {trt}'s {table['max_ir_version']}: set model.ir_version "
                            f"to {min(VLSI_IR, table['max_ir_version'])}")
        if self.opset is not None and self.opset > VLSI_MAX_OPSET:
            add("policy", None, f"opset {self.opset}: vlsi writes TensorRT graphs at opset <= {VLSI_MAX_OPSET} "
                                f"(JetPack 6's TensorRT 10.3)")
        if ir > VLSI_IR:
            add("policy", None, f"IR version {ir}: vlsi writes TensorRT graphs at IR {VLSI_IR}")

        for node in self.nodes:
            label = _label(node)
            if node.domain not in _DEFAULT_DOMAINS:
                if node.domain not in table["custom_domains"]:
                    hint = _DOMAIN_HINTS.get(node.op_type, "replace it with stock ONNX ops (default domain)")
                    add("domain", node, f"{label} is in domain {node.domain!r}, which {trt} does not parse: {hint}")
                continue
            if node.op_type not in table["ops"]:
                since = added_in(node.op_type)
                when = f" (TensorRT parses it from {since})" if since else ""
                hint = _OP_HINTS.get(node.op_type, f"replace it with ops {trt} lists")
                add("op", node, f"{label} is not among {trt}'s ONNX operators{when}: {hint}")
                continue
            limit = table["op_max_since_version"].get(node.op_type)
            if limit is not None and self.opset is not None:
                since = _since_version(node.op_type, self.opset)
                if since is not None and since > limit:
                    add("op", node, f"{label} is its opset-{since} form at opset {self.opset}; {trt} imports the "
                                    f"opset-{limit} form only: export at an opset below {since} or decompose it")
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                for message in self._qdq(node, label, table, trt, requirements):
                    add("dq", node, message)
            if precision in CHECKED_PRECISIONS and node.op_type in ("MatMul", "Gemm"):
                for message in self._fp32_weights(node, label, precision):
                    add("fp32_matmul", node, message)
        return out

    def _qdq(self, node, label: str, table: dict, trt: str, requirements: dict):
        from onnx import TensorProto

        import numpy as np

        dq = node.op_type == "DequantizeLinear"
        attrs = _attrs(node)
        zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
        qtype = self.dtype(node.input[0]) if dq else self.dtype(node.output[0])
        qname = _type_name(qtype)

        if qtype == TensorProto.FLOAT8E4M3FN:
            requirements.setdefault("fp8", "SM89+")
        elif qtype == TensorProto.FLOAT4E2M1:
            requirements.setdefault("nvfp4", "SM100+")

        if not dq and zp is None and qtype == TensorProto.UINT8 and "output_dtype" not in attrs:
            yield (f"{label} has no zero point, so ONNX quantises to UINT8 (asymmetric) where TensorRT uses INT8: "
                   f"give it an INT8 zero point of 0")
        elif qtype == TensorProto.UINT4:
            yield (f"{label} is UINT4 (asymmetric INT4), which TensorRT refuses: its INT4 is signed and symmetric; "
                   f"{_INT4_WAY}, no zero point")
        elif qtype == TensorProto.UINT8:
            yield f"{label} is UINT8 (asymmetric); TensorRT reads it as INT8: use INT8 with a zero point of 0"
        elif qtype is not None and qname not in table["quantized_types"]:
            yield f"{label} quantises to {qname}; {trt} takes {', '.join(table['quantized_types'])} only"

        if zp is not None:
            values = self.values(zp)
            if isinstance(values, str):
                yield f"{label}: zero point {zp!r} cannot be checked ({values}); TensorRT needs a constant 0"
            elif np.any(values.astype(np.float32) != 0):
                yield (f"{label}: zero point {zp!r} is not 0 (asymmetric quantisation); TensorRT takes symmetric "
                       f"only: requantise with zero point 0, or drop the zero point")
        if not self.constant(node.input[1]):
            yield f"{label}: scale {node.input[1]!r} is not a constant; TensorRT needs build-time constant scales"

        if qtype != TensorProto.INT4:
            return
        if not dq:
            yield f"{label} quantises to INT4, but TensorRT's INT4 is weight-only: {_INT4_WAY}"
            return
        weight = self.inits.get(node.input[0])
        if weight is None:
            yield f"{label}: its INT4 input {node.input[0]!r} is not an initializer; {_INT4_WAY}"
            return
        dims = list(weight.dims)
        block = attrs.get("block_size", 0)
        if block not in INT4_BLOCK_SIZES:
            what = f"block_size {block}" if block else "no block_size (per-tensor or per-axis INT4)"
            yield f"{label} has {what}; TensorRT's INT4 is block-wise with block_size 64 or 128"
        rank = len(dims)
        axis = attrs.get("axis", 1)
        axis = axis + rank if axis < 0 else axis
        if rank >= 2 and axis not in (rank - 1, rank - 2):
            yield f"{label} blocks axis {axis} of a rank-{rank} weight; TensorRT blocks one of the last two axes"
        elif block in INT4_BLOCK_SIZES and 0 <= axis < rank and dims[axis] % block:
            yield f"{label}: axis {axis} of {node.input[0]!r} ({dims[axis]}) is not a multiple of block_size {block}"
        if dims and dims[-1] % 2:
            yield (f"{label}: INT4 weight {node.input[0]!r} has an odd last dimension ({dims[-1]}); "
                   f"TensorRT needs it even")

    def _fp32_weights(self, node, label: str, precision: str):
        from onnx import TensorProto

        for name in node.input[:2]:
            if not name or not self.constant(name) or self.dtype(name) != TensorProto.FLOAT:
                continue
            src = self.producer.get(name)
            if name in self.inits:
                how = "an fp32 initializer"
            elif src is not None and src.op_type == "DequantizeLinear":
                how = "a DequantizeLinear with fp32 scales (make the scales fp16)"
            elif src is not None and src.op_type == "Cast":
                how = "a constant Cast to fp32 (drop the Cast or cast to fp16)"
            else:
                how = f"a constant fp32 {src.op_type if src is not None else 'tensor'}"
            yield (f"{label}: weight {name!r} is {how}, left fp32 in a {precision} artifact: convert it to fp16 "
                   f"(or INT8/INT4 Q/DQ with fp16 scales)")


def _label(node) -> str:
    where = f"'{node.name}'" if node.name else f"(output '{node.output[0]}')" if node.output else "(unnamed)"
    return f"{node.op_type} {where}"


def _where(node) -> str:
    return f"{node.name or (node.output[0] if node.output else '?')} ({node.op_type})"


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constant_dtype(node) -> int | None:
    from onnx import TensorProto

    for a in node.attribute:
        if a.name == "value":
            return a.t.data_type
        if a.name in ("value_float", "value_floats"):
            return TensorProto.FLOAT
        if a.name in ("value_int", "value_ints"):
            return TensorProto.INT64
    return None


def _type_name(dtype: int | None) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(dtype) if dtype else "an unknown type"


def _since_version(op_type: str, opset: int) -> int | None:
    """The schema version ``op_type`` resolves to at ``opset`` (None for an op onnx does not know)."""
    from onnx import defs

    try:
        return defs.get_schema(op_type, opset, "").since_version
    except Exception:  # SchemaError: not an op of this onnx release
        return None
