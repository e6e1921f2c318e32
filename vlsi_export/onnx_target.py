"""``vlsi export --target onnx``: vision encoder, token embedding and the text decoder with its
KV cache, the decoder split at layer boundaries into segments, one LM head graph and one graph
per kept verbalizer head (:mod:`vlsi.archs.onnx`), each quantised with ONNX Runtime's own
quantisers, their I/O names and the split in the manifest. The vision graph is the
architecture's (``vlsi/archs/<arch>/onnx.py``)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from vlsi.errors import ConfigError

from .base import CommonOptions, Target, Written, option, register_target
from .draft import draft_vocab
from .quantize import PRECISIONS, quantize_graph, save_model


@dataclass(frozen=True)
class OnnxOptions(CommonOptions):
    quant: str = option("fp32", "Text decoder precision (int8: dynamic quantisation; int8-nbits, int4: "
                        "block-wise weights, MatMulNBits).",
                        PRECISIONS)
    vision_quant: str = option("fp32", "Vision encoder precision.", PRECISIONS)
    block_size: int = option(32, "int8-nbits, int4: weights per quantisation block (a power of two >= 16).")
    symmetric: bool = option(True, "int8-nbits, int4: symmetric blocks (--no-symmetric: with zero points).")
    split_layers: str | None = option(None, "Also split the decoder after these layers (1-based, e.g. '6' or "
                                            "'4,12'), besides after every kept verbalizer layer.")
    draft_vocab: str | None = option(None, "With --verbalizers: also a reduced-vocabulary draft head for "
                                           "self-speculative decoding, on the tokens of this dataset's answers (any "
                                           "format vlsi reads) plus the end-of-sequence ids, or on the ids of a .json "
                                           "list. Exact: verification uses the full head.")


def parse_split_layers(spec: str | None, num_layers: int) -> tuple[int, ...]:
    """``--split-layers`` as sorted layers, each in 1..num_layers - 1."""
    if spec is None or not str(spec).strip():
        return ()
    try:
        layers = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--split-layers {spec!r}: give 1-based layers separated by commas, "
                          "e.g. '6' or '4,12'") from None
    bad = [k for k in layers if not 1 <= k < num_layers]
    if bad:
        raise ConfigError(f"--split-layers {spec!r}: {bad} out of range; the decoder can be split after layers "
                          f"1..{num_layers - 1}")
    return tuple(sorted(set(layers)))


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
        if opts.draft_vocab and not opts.verbalizers:
            raise ConfigError("--draft-vocab drafts after a verbalizer's own part: export with --verbalizers too")
        if opts.block_size < 16 or opts.block_size & (opts.block_size - 1):
            raise ConfigError(f"--block-size {opts.block_size}: must be a power of two >= 16")

    def write(self, ck, tmp, opts, model_block):
        import onnx

        from vlsi.archs import get_export
        from vlsi.archs.onnx import OPSET
        from vlsi.manifest import Graph

        split_layers = parse_split_layers(opts.split_layers, model_block["num_layers"])
        raw = tmp / "fp32"
        raw.mkdir()
        io, split = get_export(ck.adapter.name, "onnx").export(ck, ck.verbalizers if opts.verbalizers else None, raw,
                                                                model_block, split_layers)
        if opts.draft_vocab:
            io["draft_head"] = export_draft_head(ck, draft_vocab(opts.draft_vocab, ck, model_block), raw, split)
        # segments attend row by row over a few positions, so that verifying drafted tokens in
        # one pass gives what decoding them one by one does (vlsi_export/rowwise.py)
        from .rowwise import MAX_ROWS, ROW_WISE_INPUT, row_wise_attention

        for seg in split.segments:
            path = raw / f"{seg.graph}.onnx"
            graph = onnx.load(str(path))
            row_wise_attention(graph, MAX_ROWS)
            save_model(graph, path)
            io[seg.graph]["inputs"].append(ROW_WISE_INPUT)
        split.row_wise_rows = MAX_ROWS
        # every decoder graph (segments, LM head, verbalizer heads) at the decoder's precision
        precision = {name: opts.quant for name in io}
        precision.update(vision=opts.vision_quant, embed="fp32")
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
        return Written(precision=opts.quant, graphs=graphs, quantization=quant, decoder_split=split)


def export_draft_head(ck, ids: list[int], folder, split) -> dict:
    """``draft_head.onnx``: ``normed_hidden (B, T, D) -> draft_logits (B, T, len(ids))``, the LM
    head's rows ``ids``; recorded in ``split``. -> its I/O names."""
    import torch

    from vlsi.archs.onnx import HEAD_INPUT, OPSET
    from vlsi.manifest import Head

    weight = ck.adapter.lm_head(ck.model).weight.detach()[torch.tensor(ids)].clone()
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight = torch.nn.Parameter(weight)
    dyn = torch.export.Dim.DYNAMIC
    torch.onnx.export(head.eval(), (torch.zeros(1, 2, weight.shape[1]),), str(folder / "draft_head.onnx"),
                      input_names=[HEAD_INPUT], output_names=["draft_logits"],
                      dynamic_shapes={"input": {0: dyn, 1: dyn}}, dynamo=True, verbose=False, opset_version=OPSET)
    split.draft_head = Head("draft_head", HEAD_INPUT, "draft_logits")
    split.draft_vocab = list(ids)
    return {"inputs": [HEAD_INPUT], "outputs": ["draft_logits"]}
