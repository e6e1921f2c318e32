"""A static check that TensorRT's ONNX parser will take a graph, run on the CPU at export and
again on the device by ``vlsi build``.

TensorRT cannot run here, so what can be known without it is checked before an artifact is
written, per TensorRT version (tables in ``trt_ops.json``, kept as data):

- ``domain``: no op outside the default ONNX domain (no TensorRT parses ``com.microsoft``'s
  ``MatMulNBits``, ``GroupQueryAttention``...);
- ``op``: every op in that version's table (``Attention`` / ``RMSNormalization`` are not in 10.3's);
- ``opset`` / ``ir``: the model's opset and IR version within the version's limits, and
  ``policy``: within vlsi's own (opset <= 21, IR 10) that one graph builds everywhere;
- ``dq``: quantisation as TensorRT takes it: zero points absent or all zero (INT8, INT4, FP8);
  INT4 only as weights, i.e. a ``DequantizeLinear`` of a constant initializer, block-wise with
  ``block_size`` 64 or 128 along one of the last two axes and constant scales; no UINT4;
  FP8 noted as needing SM89+ (a requirement, not a failure);
- ``fp32_matmul`` (fp16/int8/int4 artifacts): no ``MatMul``/``Gemm`` whose weight operand is an
  fp32 constant, i.e. no weights left in fp32. MatMuls of two activations in fp32 (attention
  scores the graph computes in fp32 on purpose) are allowed.

Torch-free (onnx only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

VLSI_MAX_OPSET = 21
VLSI_IR = 10
INT4_BLOCKS = (64, 128)


@dataclass
class Finding:
    version: str
    rule: str
    node: str | None
    message: str


@dataclass
class CheckReport:
    findings: dict[str, list[Finding]]
    """TensorRT version -> what would fail there (empty: passes)."""
    requirements: dict[str, str] = field(default_factory=dict)
    """What the graph needs of the GPU, e.g. ``{"fp8": "SM89+"}``."""

    def passed(self, version: str | None = None) -> bool:
        if version is None:
            return not any(self.findings.values())
        return not self.findings[version]

    def table(self) -> str:
        lines = ["| TensorRT | result | findings |", "| --- | --- | --- |"]
        for v, fs in self.findings.items():
            first = "; ".join(f"{f.rule}: {f.message}" for f in fs[:3]) + (" ..." if len(fs) > 3 else "")
            lines.append(f"| {v} | {'passes' if not fs else 'FAILS'} | {len(fs)}{' — ' + first if fs else ''} |")
        return "\n".join(lines) + "\n"


@cache
def tables() -> dict:
    data = json.loads((Path(__file__).with_name("trt_ops.json")).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def table_key(version: str) -> str:
    """The nearest table at or below a TensorRT version (``"10.7.0"`` -> ``"10.3"``)."""
    def key(v):
        return tuple(int(x) for x in v.split(".")[:2] if x.isdigit())

    want = key(version)
    keys = sorted(tables(), key=key)
    below = [k for k in keys if key(k) <= want]
    if not below:
        from vlsi.errors import ConfigError

        raise ConfigError(f"TensorRT {version} is older than any vlsi checks ({keys[0]}); install TensorRT 10.3 or newer")
    return below[-1]


def _load(model_or_path):
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, None
    path = Path(model_or_path)
    return onnx.load(str(path), load_external_data=False), path


def _array(tensor, base: Path | None):
    """An initializer's values, reading external data only for this tensor."""
    from onnx import external_data_helper, numpy_helper

    if external_data_helper.uses_external_data(tensor):
        if base is None:
            return None
        import copy

        t = copy.deepcopy(tensor)
        external_data_helper.load_external_data_for_tensor(t, str(base.parent))
        return numpy_helper.to_array(t)
    return numpy_helper.to_array(tensor)


def check_graph(model_or_path, versions=("10.3", "10.15", "11"), *, precision: str | None = None) -> CheckReport:
    """Check an ONNX graph (a path or a ModelProto) against each TensorRT ``versions``' table."""
    from onnx import TensorProto

    model, path = _load(model_or_path)
    g = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    producer = {o: n for n in g.node for o in n.output}

    common: list[tuple[str, str | None, str]] = []  # (rule, node, message), the same for every version
    requirements: dict[str, str] = {}
    if opset > VLSI_MAX_OPSET:
        common.append(("policy", None, f"opset {opset} is above vlsi's TensorRT opset {VLSI_MAX_OPSET}"))
    if model.ir_version > VLSI_IR:
        common.append(("policy", None, f"IR version {model.ir_version} is above vlsi's {VLSI_IR}"))
    for n in g.node:
        where = f"{n.name or n.output[0]} ({n.op_type})"
        if n.domain not in ("", "ai.onnx"):
            common.append(("domain", where, f"op of domain {n.domain!r}: TensorRT parses only stock ONNX ops "
                                            "(re-export with --target tensorrt, not an ONNX Runtime artifact)"))
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            common += _dq_findings(n, where, inits, consts, producer, path, requirements)
        if precision in ("fp16", "int8", "int4") and n.op_type in ("MatMul", "Gemm"):
            w = n.input[1] if len(n.input) > 1 else ""
            t = inits.get(w)
            if t is not None and t.data_type == TensorProto.FLOAT:
                common.append(("fp32_matmul", where, f"weight {w!r} is fp32 in a {precision} artifact"))

    findings: dict[str, list[Finding]] = {}
    for v in versions:
        tab = tables()[table_key(v)]
        ops = set(tab["ops"])
        out = [Finding(v, r, node, msg) for r, node, msg in common]
        if opset > tab["max_opset"]:
            out.append(Finding(v, "opset", None, f"opset {opset} > {tab['max_opset']}, the highest TensorRT {v} parses"))
        if model.ir_version > tab["max_ir_version"]:
            out.append(Finding(v, "ir", None, f"IR version {model.ir_version} > {tab['max_ir_version']}"))
        for n in g.node:
            if n.domain in ("", "ai.onnx") and n.op_type not in ops:
                out.append(Finding(v, "op", f"{n.name or n.output[0]} ({n.op_type})",
                                   f"{n.op_type} is not parsed by TensorRT {v}"))
        findings[v] = out
    return CheckReport(findings, requirements)


def _dq_findings(n, where, inits, consts, producer, path, requirements) -> list[tuple[str, str | None, str]]:
    import numpy as np
    from onnx import TensorProto

    out = []
    attrs = {a.name: a for a in n.attribute}
    x = n.input[0]
    src = inits.get(x)
    dtype = src.data_type if src is not None else None
    if len(n.input) > 2 and n.input[2]:
        zp = inits.get(n.input[2])
        if zp is None and n.input[2] in consts:
            from onnx import numpy_helper

            values = numpy_helper.to_array(consts[n.input[2]].attribute[0].t)
        else:
            values = _array(zp, path) if zp is not None else None
            dtype = dtype or (zp.data_type if zp is not None else None)
        if values is None:
            out.append(("dq", where, "zero point is not a constant: TensorRT needs zero-point 0"))
        elif np.asarray(values).astype(np.float64).any():
            out.append(("dq", where, "non-zero zero point: TensorRT quantisation is symmetric (zero-point 0)"))
        if zp is not None and zp.data_type == TensorProto.UINT4:
            dtype = TensorProto.UINT4
    if dtype == TensorProto.UINT4:
        out.append(("dq", where, "UINT4 (asymmetric 4-bit) is not taken by TensorRT; use symmetric INT4"))
    if dtype in (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2):
        requirements["fp8"] = "SM89+ (Ada or newer)"
    if n.op_type == "DequantizeLinear" and dtype == TensorProto.INT4:
        block = attrs["block_size"].i if "block_size" in attrs else 0
        rank = len(src.dims)
        axis = attrs["axis"].i if "axis" in attrs else 1
        axis = axis + rank if axis < 0 else axis
        if block not in INT4_BLOCKS:
            out.append(("dq", where, f"INT4 block size {block or 'none (per-channel)'}: TensorRT takes blocks of "
                                     f"{' or '.join(map(str, INT4_BLOCKS))}"))
        if axis < rank - 2:
            out.append(("dq", where, f"INT4 blocked along axis {axis}: must be one of the last two"))
        if n.input[1] not in inits:
            out.append(("dq", where, "INT4 scales must be constant"))
    elif n.op_type == "DequantizeLinear" and src is None and x in producer and _is_int4(producer[x], inits):
        out.append(("dq", where, "INT4 must dequantize a constant weight (weight-only)"))
    return out


def _is_int4(node, inits) -> bool:
    from onnx import TensorProto

    return node.op_type == "QuantizeLinear" and any(
        a.name == "output_dtype" and a.i == TensorProto.INT4 for a in node.attribute)
