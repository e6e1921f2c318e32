"""INT8 / INT4 (and FP8) for TensorRT, written into fp16 ONNX graphs on a CPU machine.

TensorRT 11 removed the weak-typing builder flags: an engine is only ever as precise as its
ONNX graph says (strong typing). So the precision has to be *in the graph* before the device
builds it, in exactly the forms TensorRT's parser turns into low-precision kernels:

- **INT4** is weight-only: an INT4 initializer ``(K, N)`` -> ``DequantizeLinear`` (opset 21,
  ``axis=0``, ``block_size`` 128, or 64 where ``K % 128 != 0``), symmetric (no zero point),
  constant fp16 scales ``(K / block, N)`` -> ``MatMul``. A weight whose ``K`` fits neither
  block stays fp16 and is listed in :attr:`QuantResult.skipped`.
- **INT8** is Q/DQ with zero point 0. NVIDIA ModelOpt (``int8`` mode) calibrates activation
  scales and writes Q/DQ on the activations and the weights of the weight MatMuls; without
  ModelOpt (or without calibration samples) this module writes weight-only INT8: an int8
  initializer -> per-output-channel ``DequantizeLinear`` (``axis=1``) -> ``MatMul``.
- Everything else stays as exported: fp16, with the exporter's fp32 islands (softmax, norm
  statistics, rotary products) left alone. Attention's activation x activation MatMuls are
  never quantised.

Two writers, one contract, one check (:func:`inspect_graph`, run on every output):

- **ModelOpt** (``nvidia-modelopt`` 0.47, installed without extras: its ``[onnx]`` extra pulls
  ``onnxruntime-gpu`` and pins onnx) runs on the CPU with ``calibration_eps=["cpu"]``. What this
  module does around it, each for a reason found by running it here:

  * ``high_precision_dtype="fp32"`` for int8/fp8: ModelOpt's default ("fp16") re-runs its fp16
    autocast after quantising, which folds our fp32 islands (softmax, RMSNorm) back into fp16.
    With "fp32" it leaves the graph's types alone; the scales are still fp16 (the weights are).
  * ``nodes_to_quantize`` is the exact list of weight MatMuls (anchored regexes): otherwise
    whether the attention MatMuls get Q/DQ depends on the calibration length (ModelOpt skips
    MatMuls with K or N < 16, and GEMVs). Its rules still apply to our list, judged on the
    first calibration sample's shapes: a weight MatMul with a 2-D output that has a 1 in it
    (TensorRT runs INT8 GEMV no faster), or with K or N < 16, keeps fp16 and is reported as
    skipped. (The decoder's 3-D ``(B, 1, V)`` head is not a GEMV to it.) Calibrate on prefills.
  * ``dq_only=True`` for int8/fp8: weights are stored as int8/fp8 initializers -> DQ, not as
    fp16 -> Q -> DQ (half the file, and less for the device to hold while it builds).
  * weights are normalised first (exact): a ``Transpose`` of a weight initializer (the
    exporter leaves one before a shared weight: the LM head) is folded, and ``Gemm`` with a
    constant ``B`` becomes ``MatMul`` (+ ``Add``): ModelOpt's INT4 always blocks along axis 0
    of the weight, which for ``transB=1`` is N, not K.
  * one block size per ModelOpt call: a second INT4 pass at 64 takes the weights with
    ``K % 128 != 0`` (the first pass excludes them by name).
  * int4 packing: ModelOpt packs INT4 with a C++ extension built at run time by ``cppimport``
    (a compiler, pybind11) or, failing that, a Python loop over every byte (slow on a real
    model); we substitute an equivalent vectorised numpy packer for the duration of the call.
  * AWQ concatenates every sample's activations along axis 0 before flattening them to
    ``(tokens, K)``, so prompts of different lengths fail; during the call the concatenation
    flattens each sample first (what the algorithm does next anyway).
  * ``awqlite_fuse_nodes=False``: 0.47 folds AWQ-lite's pre-quant scale into a preceding
    ``Mul``'s constant through a cupy-only call (``.get()``) and crashes on numpy; unfused, the
    scale is its own ``Mul`` before the MatMul (TensorRT fuses it).
  * ``enable_shared_constants_duplication=False``: a tied LM head used by the logits and every
    verbalizer head would otherwise be copied once per use.

- **vlsi-rtn** (:func:`quantize_rtn`, numpy, always available): symmetric round-to-nearest,
  the same graph forms; int8 is weight-only. It needs no calibration and no ModelOpt.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from vlsi.errors import VLsIError

PRECISIONS = ("fp16", "int8", "int4", "fp8")
METHODS = ("auto", "modelopt", "rtn")
BLOCK_SIZES = (128, 64)
"""The INT4 block sizes TensorRT takes, preferred first."""
MAX_OPSET = 21
"""TensorRT 10.3 (JetPack 6) parses opset <= 21; block-wise DequantizeLinear needs exactly 21."""
MAX_IR = 10
CALIBRATION_METHODS = {"int8": ("max", "entropy"), "fp8": ("max", "entropy"),
                       "int4": ("awq_lite", "awq_clip", "rtn_dq")}
DEFAULT_CALIBRATION = {"int8": "max", "fp8": "max", "int4": "awq_lite"}
"""int8/fp8 ``max``: ModelOpt's recommendation for LLMs (entropy clips the outliers that decoder
activations carry); int4 ``awq_lite``: activation-aware scales, minutes not hours on a CPU."""


class TrtQuantError(VLsIError):
    """A graph could not be quantised into a form TensorRT builds."""


@dataclass
class QuantResult:
    path: Path
    precision: str
    quantizer: str  # e.g. "modelopt 0.47.0 int8 (max calibration, 16 samples)", "vlsi-rtn int4 block 128"
    skipped: list[str] = field(default_factory=list)  # weight initializers left fp16, and why
    details: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# public entry points


@lru_cache(maxsize=1)
def modelopt_available() -> str | None:
    """None when ``modelopt.onnx.quantization`` imports, else why not (one line)."""
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except Exception as e:  # ImportError, or whatever its import-time probing raises
        lines = [ln for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        return f"{type(e).__name__}: {lines[0]}"
    return None


def quantize_for_tensorrt(src: Path, dst: Path, precision: str, *,
                          calibration: list[dict[str, np.ndarray]] | None = None, method: str = "auto",
                          block_size: int = 128, calibration_method: str | None = None) -> QuantResult:
    """Write the fp16 graph ``src`` at ``precision`` to ``dst`` in a form TensorRT builds.

    ``precision``: fp16 (copied), int8, int4, fp8 (ModelOpt only). ``method``: modelopt, rtn,
    or auto (ModelOpt when it imports and it has what it needs: calibration samples for int8,
    fp8 and AWQ; else vlsi-rtn). ``calibration``: feed dicts for ``src`` (prefill of real
    prompts; lengths may differ). ``block_size``: the preferred INT4 block (128 or 64; 128
    falls back to 64 per weight). ``calibration_method``: see :data:`CALIBRATION_METHODS`.
    The output is checked (:func:`inspect_graph`); a graph that fails raises.
    """
    import onnx

    src, dst = Path(src), Path(dst)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size {block_size}: TensorRT's INT4 takes {' or '.join(map(str, BLOCK_SIZES))}")
    if not src.is_file():
        raise TrtQuantError(f"{src}: no such graph")
    if calibration_method is not None and calibration_method not in CALIBRATION_METHODS.get(precision, ()):
        raise ValueError(f"calibration_method {calibration_method!r} does not apply to {precision} "
                         f"(one of {CALIBRATION_METHODS.get(precision, ())})")
    dst.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if precision == "fp16":
        from .quantize import save_model

        save_model(onnx.load(str(src)), dst)
        res = QuantResult(dst, "fp16", "none (fp16 as exported)")
    else:
        use, calibration_method, why = _choose(precision, method, calibration, calibration_method)
        if use == "modelopt":
            res = _quantize_modelopt(src, dst, precision, calibration, block_size, calibration_method)
        else:
            res = quantize_rtn(src, dst, precision, block_size=block_size)
        if why:
            res.details["why_not_modelopt"] = why
    report = inspect_graph(dst)
    if report["problems"]:
        raise TrtQuantError(f"{dst.name} ({res.quantizer}) is not a graph TensorRT builds: {report['problems'][0]}"
                            + (f" (and {len(report['problems']) - 1} more)" if len(report["problems"]) > 1 else ""))
    try:
        onnx.checker.check_model(str(dst))
    except onnx.checker.ValidationError as e:
        raise TrtQuantError(f"{dst.name} ({res.quantizer}) fails onnx.checker: {str(e).splitlines()[0]}") from None
    res.details.update({k: v for k, v in report.items() if k != "problems"})
    res.details["seconds"] = round(time.time() - t0, 2)
    return res


def _choose(precision: str, method: str, calibration, calibration_method) -> tuple[str, str | None, str | None]:
    """(writer, ModelOpt calibration method, why auto fell back to vlsi-rtn)."""
    if method == "rtn":
        if precision == "fp8":
            raise TrtQuantError("fp8 is written by NVIDIA ModelOpt only; use method modelopt or auto")
        return "rtn", None, None
    if calibration_method is None:  # int4 without samples: ModelOpt's own round-to-nearest
        calibration_method = "rtn_dq" if precision == "int4" and not calibration else DEFAULT_CALIBRATION[precision]
    needs_samples = calibration_method != "rtn_dq"
    reason = modelopt_available()
    if method == "modelopt" or precision == "fp8":
        if reason:
            raise TrtQuantError(f"NVIDIA ModelOpt does not import ({reason}); install it (see the tensorrt-export "
                                f"extra) or use the rtn quantizer")
        if needs_samples and not calibration:
            raise TrtQuantError(f"ModelOpt's {precision} ({calibration_method}) needs calibration samples; pass "
                                "some, or use the rtn quantizer")
        return "modelopt", calibration_method, None
    if reason:
        return "rtn", None, f"ModelOpt unavailable: {reason}"
    if needs_samples and not calibration:
        return "rtn", None, f"no calibration samples (ModelOpt's {precision} {calibration_method} calibrates on them)"
    return "modelopt", calibration_method, None


# ---------------------------------------------------------------------------------------------
# graph helpers shared by both writers


def _load(path: Path):
    import onnx

    return onnx.load(str(path))


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _name_nodes(model) -> None:
    """Give every node a unique name (ModelOpt selects nodes by name)."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in seen:
                name += "_"
            n.name = name
            seen.add(name)


def _normalise_weights(model) -> dict:
    """Put every weight into the one layout both writers block along K: ``MatMul(x, W (K, N))``
    with ``W`` an initializer. Exact rewrites:

    - ``Transpose(W)`` of a 2-D initializer (torch's exporter leaves one in front of a weight it
      shares, such as the LM head the logits and the verbalizer heads all read) becomes one
      transposed initializer ``<W>_kn`` that all its readers share;
    - ``Gemm(A, B const[, C])`` (alpha = beta = 1, no transA) becomes ``MatMul(A, B (K, N))``
      [+ ``Add(C)``]: ModelOpt's INT4 always blocks along axis 0 of ``B``, which for
      ``transB=1`` is N.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    out, folded, gemms, rename = [], 0, 0, {}
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type == "Transpose" and node.domain in ("", "ai.onnx") and node.input[0] in inits
                and len(inits[node.input[0]].dims) == 2 and list(attrs.get("perm", [1, 0])) == [1, 0]):
            kn = node.output[0] if node.output[0] in outputs else f"{node.input[0]}_kn"
            if kn not in inits:
                w = numpy_helper.to_array(inits[node.input[0]])
                t = numpy_helper.from_array(np.ascontiguousarray(w.T), kn)
                g.initializer.append(t)
                inits[kn] = t
            rename[node.output[0]] = kn
            folded += 1
            continue
        if (node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.input) < 2
                or node.input[1] not in inits or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) != 1.0):
            out.append(node)
            continue
        w = node.input[1]
        if attrs.get("transB", 0):
            kn = f"{w}_kn"
            if kn not in inits:
                t = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[w]).T), kn)
                g.initializer.append(t)
                inits[kn] = t
            w = kn
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}_mm" if has_bias else node.output[0]
        out.append(helper.make_node("MatMul", [node.input[0], w], [mm_out], name=node.name or None))
        if has_bias:
            out.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        gemms += 1
    if folded or gemms:
        del g.node[:]
        g.node.extend(out)
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        keep = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
    return {"folded_weight_transposes": folded, "gemms_to_matmuls": gemms}


@dataclass
class WeightMatMul:
    node: str
    weight: str
    k: int
    n: int


def weight_matmuls(model) -> list[WeightMatMul]:
    """The ``MatMul(x, W)`` nodes whose ``W`` is a 2-D float initializer (what gets quantised);
    MatMuls of two activations (attention) are not among them."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    floats = (TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.BFLOAT16)
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and len(n.input) == 2 and n.input[1] in inits:
            t = inits[n.input[1]]
            if len(t.dims) == 2 and t.data_type in floats:
                out.append(WeightMatMul(n.name, t.name, int(t.dims[0]), int(t.dims[1])))
    return out


def block_for(k: int, preferred: int = 128) -> int | None:
    """The INT4 block a weight with ``k`` input rows takes: ``preferred``, else 64, else None."""
    for b in ([preferred] + [b for b in BLOCK_SIZES if b < preferred]):
        if k % b == 0:
            return b
    return None


def _skip_line(w: WeightMatMul, why: str) -> str:
    return f"{w.weight} ({w.k}x{w.n}): {why}"


# ---------------------------------------------------------------------------------------------
# vlsi-rtn: numpy round-to-nearest


def rtn_int4(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block-wise INT4 of ``w (K, N)`` along K: ``(q int8 in [-8, 7] (K, N), scales fp16
    (K / block, N))`` with ``w ~= q * repeat(scales, block, axis=0)``. The scale is
    ``max|w| / 7`` per block, rounded to fp16 first so the codes are computed against the scale
    the graph stores."""
    k, n = w.shape
    wb = w.astype(np.float32).reshape(k // block, block, n)
    s = (np.abs(wb).max(axis=1) / 7.0).astype(np.float16)
    s = np.where(s == 0, np.float16(1.0), s)  # an all-zero block: any scale, codes are 0
    q = np.clip(np.rint(wb / s.astype(np.float32)[:, None, :]), -8, 7).astype(np.int8)
    return q.reshape(k, n), s


def rtn_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel INT8 of ``w (K, N)``: ``(q int8 in [-127, 127] (K, N), scales
    fp16 (N,))``."""
    wf = w.astype(np.float32)
    s = (np.abs(wf).max(axis=0) / 127.0).astype(np.float16)
    s = np.where(s == 0, np.float16(1.0), s)
    q = np.clip(np.rint(wf / s.astype(np.float32)), -127, 127).astype(np.int8)
    return q, s


def quantize_rtn(src: Path, dst: Path, precision: str, *, block_size: int = 128) -> QuantResult:
    """vlsi's round-to-nearest writer: ``int4`` (weight-only, block-wise DQ along K, block
    ``block_size`` or 64) or ``int8`` (weight-only, per-output-channel DQ). Weight MatMuls only;
    no calibration."""
    import ml_dtypes
    from onnx import helper, numpy_helper

    from .quantize import save_model

    if precision not in ("int4", "int8"):
        raise ValueError(f"quantize_rtn writes int4 or int8, not {precision!r}")
    model = _load(src)
    opset = _opset(model)
    need = 21 if precision == "int4" else 13
    if opset < need or opset > MAX_OPSET:
        raise TrtQuantError(f"{Path(src).name} is opset {opset}; {precision} for TensorRT needs opset "
                            f"{need}..{MAX_OPSET} (export at opset {MAX_OPSET})")
    _name_nodes(model)
    prep = _normalise_weights(model)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    by_weight: dict[str, list[WeightMatMul]] = {}
    for wm in weight_matmuls(model):
        by_weight.setdefault(wm.weight, []).append(wm)
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1

    skipped, blocks, new_inits, dq_for = [], {}, [], {}
    dq_nodes = []
    for wname, uses in by_weight.items():
        w = numpy_helper.to_array(inits[wname])
        first = uses[0]
        if precision == "int4":
            b = block_for(first.k, block_size)
            if b is None:
                skipped.append(_skip_line(first, f"K={first.k} fits no INT4 block of {' or '.join(map(str, BLOCK_SIZES))}"))
                continue
            q, s = rtn_int4(w, b)
            qt = numpy_helper.from_array(q.astype(ml_dtypes.int4), f"{wname}_int4")
            attrs = {"axis": 0, "block_size": b}
            blocks[str(b)] = blocks.get(str(b), 0) + 1
        else:
            q, s = rtn_int8(w)
            qt = numpy_helper.from_array(q, f"{wname}_int8")
            attrs = {"axis": 1}
        st = numpy_helper.from_array(s.astype(np.float16), f"{wname}_scale")
        out = f"{wname}_dq"
        new_inits += [qt, st]
        dq_nodes.append(helper.make_node("DequantizeLinear", [qt.name, st.name], [out], name=f"{wname}_DequantizeLinear",
                                         **attrs))
        dq_for[wname] = out

    # rewire: every weight MatMul reads its weight's DQ; the fp16 initializer goes unless
    # something else still reads it
    wm_nodes = {wm.node for uses in by_weight.values() for wm in uses}
    for n in g.node:
        if n.name in wm_nodes and n.input[1] in dq_for:
            consumers[n.input[1]] -= 1
            n.input[1] = dq_for[n.input[1]]
    keep = [t for t in g.initializer if not (t.name in dq_for and consumers.get(t.name, 0) == 0)]
    nodes = dq_nodes + list(g.node)  # DQs read initializers only: first is topologically fine
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    del g.node[:]
    g.node.extend(nodes)
    if model.ir_version > MAX_IR:
        model.ir_version = MAX_IR
    save_model(model, dst)
    n_q = len(dq_for)
    if precision == "int4":
        used = "/".join(sorted(blocks, key=int, reverse=True))
        label = f"vlsi-rtn int4 block {used}" if used else "vlsi-rtn int4: no weight fits a block, all fp16"
    else:
        label = "vlsi-rtn int8 weight-only (per output channel)"
    return QuantResult(Path(dst), precision, label, skipped,
                       {"quantized_weights": n_q, "blocks": blocks, **prep})


# ---------------------------------------------------------------------------------------------
# ModelOpt


def _reader(samples: list[dict[str, np.ndarray]]):
    """Calibration feed dicts as ONNX Runtime's ``CalibrationDataReader``, plus the
    ``get_first`` ModelOpt's GEMV rule reads (it looks at the first sample's shapes only)."""
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class Samples(CalibrationDataReader):
        def __init__(self):
            self._i = 0

        def get_next(self):
            if self._i >= len(samples):
                return None
            self._i += 1
            return samples[self._i - 1]

        def get_first(self):
            return samples[0]

        def rewind(self):
            self._i = 0

        def set_range(self, start_index: int, end_index: int):  # ORT's per-node calibration
            self._i = start_index

        def __len__(self):
            return len(samples)

    return Samples()


def check_samples(model, samples: list[dict[str, np.ndarray]]) -> None:
    """Each sample feeds exactly the graph's inputs, at their element types (one-line errors)."""
    from onnx import helper

    inits = {t.name for t in model.graph.initializer}
    want = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            for i in model.graph.input if i.name not in inits}
    for j, s in enumerate(samples):
        if not isinstance(s, dict):
            raise TrtQuantError(f"calibration sample {j} is a {type(s).__name__}, not a dict of input name -> array")
        missing = [k for k in want if k not in s]
        extra = [k for k in s if k not in want]
        if missing or extra:
            raise TrtQuantError(f"calibration sample {j}: " + (f"missing {missing}" if missing else "")
                                + ("; " if missing and extra else "") + (f"the graph takes no {extra}" if extra else ""))
        for k, dt in want.items():
            a = np.asarray(s[k])
            if a.dtype != dt:
                raise TrtQuantError(f"calibration sample {j}: {k} is {a.dtype}, the graph takes {np.dtype(dt)}")


def _pack_int4(array, signed: bool) -> np.ndarray:
    """ModelOpt's ``pack_float32_to_4bit_cpp_based``, vectorised: round, clip, two values a byte,
    the first in the low nibble."""
    a = np.asarray(array)
    lo, hi = (-8, 7) if signed else (0, 15)
    flat = np.clip(np.rint(a.astype(np.float32).ravel()), lo, hi).astype(np.int16)
    if flat.size % 2:
        flat = np.append(flat, np.int16(0))
    u = (flat & 0x0F).astype(np.uint8)
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)


class _FlatConcat:
    """numpy, but ``concatenate(axis=0)`` of activations whose middle dims differ (prompts of
    different lengths) flattens each to ``(-1, last)`` first: what AWQ reshapes them to next."""

    def __init__(self, np_mod):
        self._np = np_mod

    def __getattr__(self, name):
        return getattr(self._np, name)

    def concatenate(self, arrays, axis=0, **kw):
        arrays = list(arrays)
        if (axis == 0 and len(arrays) > 1 and all(getattr(a, "ndim", 0) >= 2 for a in arrays)
                and len({a.shape[1:] for a in arrays}) > 1 and len({a.shape[-1] for a in arrays}) == 1):
            arrays = [a.reshape(-1, a.shape[-1]) for a in arrays]
        return self._np.concatenate(arrays, axis=axis, **kw)


@contextlib.contextmanager
def _modelopt_cpu_patches():
    """The two substitutions described in the module docstring, undone on exit."""
    from modelopt.onnx.quantization import gs_patching, int4

    saved = []
    if hasattr(gs_patching, "pack_float32_to_4bit_cpp_based"):
        saved.append((gs_patching, "pack_float32_to_4bit_cpp_based", gs_patching.pack_float32_to_4bit_cpp_based))
        gs_patching.pack_float32_to_4bit_cpp_based = _pack_int4
    if getattr(int4, "np", None) is np:  # numpy build (no cupy)
        saved.append((int4, "np", int4.np))
        int4.np = _FlatConcat(np)
    try:
        yield
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


def _anchored(names) -> list[str]:
    return [f"^{re.escape(n)}$" for n in names]


def _quantize_modelopt(src: Path, dst: Path, precision: str, calibration, block_size: int,
                       calibration_method: str) -> QuantResult:
    import modelopt
    from modelopt.onnx.quantization import quantize

    from .quantize import save_model

    model = _load(src)
    opset = _opset(model)
    if opset > MAX_OPSET:
        raise TrtQuantError(f"{src.name} is opset {opset}; TensorRT 10.3 parses <= {MAX_OPSET}")
    if calibration:
        check_samples(model, calibration)
    _name_nodes(model)
    prep = _normalise_weights(model)
    wms = weight_matmuls(model)
    version = getattr(modelopt, "__version__", "?")
    skipped: list[str] = []
    details: dict = {"calibration_samples": len(calibration or []), "calibration_method": calibration_method, **prep}
    big = model.ByteSize() > 1_800_000_000
    common = dict(calibration_eps=["cpu"], log_level="WARNING", use_external_data_format=big,
                  enable_shared_constants_duplication=False)

    with tempfile.TemporaryDirectory(prefix="vlsi-modelopt-") as tmp:
        tmp = Path(tmp)
        cur = tmp / "in.onnx"
        save_model(model, cur, external=big)
        del model

        def run(inp: Path, out: Path, **kw):
            try:
                with _modelopt_cpu_patches():
                    quantize(str(inp), output_path=str(out), **common, **kw)
            except Exception as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise TrtQuantError(f"ModelOpt {version} {precision} ({calibration_method}) failed on {src.name}: "
                                    f"{type(e).__name__}: {first}") from e
            if not out.is_file():
                raise TrtQuantError(f"ModelOpt {version} {precision} wrote no graph for {src.name} "
                                    "(nothing quantisable?)")

        if precision in ("int8", "fp8"):
            if not wms:
                raise TrtQuantError(f"{src.name} has no weight MatMul to quantise")
            out = tmp / "out.onnx"
            run(cur, out, quantize_mode=precision, calibration_method=calibration_method,
                calibration_data_reader=_reader(calibration), nodes_to_quantize=_anchored(w.node for w in wms),
                high_precision_dtype="fp32", dq_only=True)
            label = f"modelopt {version} {precision} ({calibration_method} calibration, {len(calibration)} samples)"
        else:
            passes: dict[int, list[WeightMatMul]] = {}
            for w in wms:
                b = block_for(w.k, block_size)
                if b is not None:
                    passes.setdefault(b, []).append(w)
                elif not any(s.startswith(f"{w.weight} ") for s in skipped):  # once per (shared) weight
                    skipped.append(_skip_line(w, f"K={w.k} fits no INT4 block of {' or '.join(map(str, BLOCK_SIZES))}"))
            extra = {"awqlite_fuse_nodes": False} if calibration_method == "awq_lite" else {}
            for i, (b, chosen) in enumerate(sorted(passes.items(), reverse=True)):
                others = [w.node for w in wms if w not in chosen]
                out = tmp / f"out{i}.onnx"
                reader = _reader(calibration) if calibration else None
                run(cur, out, quantize_mode="int4", calibration_method=calibration_method, block_size=b,
                    calibration_data_reader=reader, nodes_to_exclude=_anchored(others), **extra)
                cur = out
            out = cur
            details["blocks"] = {str(b): len(ws) for b, ws in passes.items()}
            cal = f", {len(calibration)} samples" if calibration and calibration_method != "rtn_dq" else ""
            used = "/".join(str(b) for b in sorted(passes, reverse=True))
            label = (f"modelopt {version} int4 {calibration_method} block {used}{cal}" if used
                     else f"modelopt {version} int4: no weight fits a block, all fp16")
        result = _load(out)
        result.ir_version = min(result.ir_version, MAX_IR)
        save_model(result, dst)

    # what ModelOpt left fp16 of the weights we asked for (its GEMV / small-GEMM rules)
    fed = {n.input[1] for n in result.graph.node if n.op_type == "MatMul" and len(n.input) == 2}
    inits = {t.name for t in result.graph.initializer}
    for w in wms:
        if w.weight in inits and w.weight in fed and not any(s.startswith(f"{w.weight} ") for s in skipped):
            skipped.append(_skip_line(w, "left fp16 by ModelOpt (its GEMV rule: a 2-D output with a 1 in it, or "
                                         "small-GEMM rule: K or N < 16, in the first calibration sample)"))
    return QuantResult(Path(dst), precision, label, skipped, details)


# ---------------------------------------------------------------------------------------------
# the check


def inspect_graph(path_or_model) -> dict:
    """What a quantised graph holds, and ``problems``: everything TensorRT would refuse or not
    run at low precision (non-default op domains, opset > 21, IR > 10, a zero point that is
    not 0, INT4 other than signed block-wise along K with block 64/128 and constant fp16
    scales, a block that does not divide its axis)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    produced = {o: n for n in g.node for o in n.output}
    problems = []
    opset = _opset(model)
    if opset > MAX_OPSET:
        problems.append(f"opset {opset} > {MAX_OPSET}")
    if model.ir_version > MAX_IR:
        problems.append(f"IR version {model.ir_version} > {MAX_IR}")
    domains = sorted({n.domain for n in g.node if n.domain not in ("", "ai.onnx")})
    if domains:
        ops = sorted({f"{n.domain}.{n.op_type}" for n in g.node if n.domain in domains})
        problems.append(f"non-standard ops {ops[:5]}")

    def const(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        n = produced.get(name)
        if n is not None and n.op_type == "Constant":
            return numpy_helper.to_array(n.attribute[0].t)
        return None

    def elem(name):
        if name in inits:
            return inits[name].data_type
        n = produced.get(name)
        if n is not None and n.op_type == "Constant":
            return n.attribute[0].t.data_type
        return None

    counts = {"int4_weights": 0, "int8_weights": 0, "fp8_weights": 0, "activation_qdq": 0}
    blocks: dict[str, int] = {}
    fp8 = (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2)
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        where = n.name or n.output[0]
        if len(n.input) > 2 and n.input[2]:
            zp = const(n.input[2])
            if zp is None:
                problems.append(f"{where}: zero point is not a constant")
            elif np.any(zp.astype(np.float32) != 0):
                problems.append(f"{where}: zero point is not 0 (TensorRT takes symmetric quantisation only)")
        scale = const(n.input[1])
        if scale is None:
            problems.append(f"{where}: scale is not a constant")
        if n.op_type == "QuantizeLinear":
            counts["activation_qdq"] += n.input[0] not in inits
            continue
        xt = elem(n.input[0])
        if xt in (TensorProto.INT4, TensorProto.UINT4):
            counts["int4_weights"] += 1
            if xt == TensorProto.UINT4:
                problems.append(f"{where}: UINT4 weights (TensorRT takes signed INT4 with zero point 0)")
            b = attrs.get("block_size", 0)
            dims = list(inits[n.input[0]].dims) if n.input[0] in inits else []
            axis = attrs.get("axis", 1)
            if b not in BLOCK_SIZES:
                problems.append(f"{where}: INT4 block size {b} (TensorRT takes {BLOCK_SIZES})")
            elif len(dims) == 2 and dims[axis % 2] % b:
                problems.append(f"{where}: block {b} does not divide axis {axis} of {dims}")
            if len(dims) == 2 and axis % 2 != 0:
                problems.append(f"{where}: INT4 blocked along axis {axis} of {dims}, not K (axis 0)")
            if scale is not None and scale.dtype != np.float16:
                problems.append(f"{where}: INT4 scales are {scale.dtype}, not float16")
            blocks[str(b)] = blocks.get(str(b), 0) + 1
        elif xt == TensorProto.INT8:
            counts["int8_weights"] += 1
        elif xt in fp8:
            counts["fp8_weights"] += 1
    fed_by_dq = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
    weights = weight_matmuls(model)
    return {"opset": opset, "ir_version": model.ir_version, **counts, "blocks": blocks,
            "fp16_weight_matmuls": len(weights),
            "quantized_matmuls": sum(1 for n in g.node if n.op_type == "MatMul" and len(n.input) == 2
                                     and n.input[1] in fed_by_dq),
            "problems": problems}

