"""``vlsi export --target onnx``: three graphs (vision encoder, token embedding, decoder with
KV cache), quantised per graph with ONNX Runtime's own quantisers, their I/O names in the
manifest. The graphs themselves are the architecture's (``vlsi/archs/<arch>/onnx.py``)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from vlsi.errors import ConfigError

from .base import CommonOptions, Target, Written, option, register_target
from .quantize import PRECISIONS, quantize_graph, save_model


@dataclass(frozen=True)
class OnnxOptions(CommonOptions):
    quant: str = option("fp32", "Text decoder precision (int4: MatMulNBits, int8: dynamic quantisation).",
                        PRECISIONS)
    vision_quant: str = option("fp32", "Vision encoder precision.", PRECISIONS)
    block_size: int = option(32, "int4: weights per quantisation block (a power of two >= 16).")
    symmetric: bool = option(True, "int4: symmetric blocks (--no-symmetric: with zero points).")


def signature(path: Path) -> dict:
    """Input and output names, dtypes and shapes of an ONNX file (weights not loaded)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def desc(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}

    return {"inputs": [desc(v) for v in m.graph.input], "outputs": [desc(v) for v in m.graph.output]}


@register_target
class OnnxTarget(Target):
    name = "onnx"
    Options = OnnxOptions
    tools = ("onnx", "onnxruntime", "onnxscript")

    def check(self, opts):
        super().check(opts)
        if opts.block_size < 16 or opts.block_size & (opts.block_size - 1):
            raise ConfigError(f"--block-size {opts.block_size}: must be a power of two >= 16")

    def write(self, ck, tmp, opts, model_block):
        import onnx

        from vlsi.archs import get_export
        from vlsi.archs.onnx import OPSET
        from vlsi.manifest import Graph

        raw = tmp / "fp32"
        raw.mkdir()
        io = get_export(ck.adapter.name, "onnx").export(ck, ck.verbalizers if opts.verbalizers else None, raw,
                                                         model_block)
        precision = {"vision": opts.vision_quant, "embed": "fp32", "decoder": opts.quant}
        graphs = {}
        for name, prec in precision.items():
            dst = tmp / f"{name}.onnx"
            quantize_graph(raw / f"{name}.onnx", dst, prec, block_size=opts.block_size, symmetric=opts.symmetric)
            if name == "embed":  # a row lookup: keep the table in a mapped file, not in the heap
                save_model(onnx.load(str(dst)), dst, external=True)
            sig = signature(dst)
            names = {k: [v["name"] for v in sig[k]] for k in ("inputs", "outputs")}
            if names != io[name]:
                raise ConfigError(f"{name}.onnx: the quantiser changed the graph's I/O names "
                                  f"({io[name]} -> {names}); report this as a bug")
            graphs[name] = Graph(dst.name, prec, names["inputs"], names["outputs"], sig)
        shutil.rmtree(raw)
        quant = {"decoder": opts.quant, "vision": opts.vision_quant, "block_size": opts.block_size,
                 "symmetric": opts.symmetric, "opset": OPSET}
        return Written(precision=opts.quant, graphs=graphs, quantization=quant)

