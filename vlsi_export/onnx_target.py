"""``vlsi export --target onnx``: three graphs (vision encoder, token embedding, decoder with
KV cache), quantised per graph, plus tokenizer/processor files and ``manifest.json``.

The folder is written atomically: a failed export leaves no artifact behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vlsi.atomic import atomic_dir
from vlsi.errors import ConfigError, UnsupportedArchitectureError

from . import register_target
from .quantize import PRECISIONS, quantize_graph, save_model

COPIED = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "vlsi.json")


OPSET = 23


def _export_qwen2_vl(ck, verbalizers, tmp: Path) -> dict:
    """The Qwen2-VL graphs in fp32; returns their signatures."""
    import torch
    from PIL import Image

    from .qwen2_vl_graphs import Decoder, TokenEmbedding, VisionEncoder, vision_inputs

    dyn = torch.export.Dim.DYNAMIC
    model = ck.model.eval()
    sizes = ck.adapter.text_sizes(model.config)
    # opset 23 has RMSNormalization and Attention: about 30% fewer nodes per decode step than
    # opset 20's decomposed norm and softmax, which matters when a token takes a few ms.
    quiet = {"dynamo": True, "verbose": False, "opset_version": OPSET}

    proc = ck.adapter.process_images(ck.image_processor, [Image.new("RGB", (56, 56), (122, 117, 104))])
    pos, seg = vision_inputs(proc["image_grid_thw"].numpy(), model.config.vision_config.spatial_merge_size)
    vis = VisionEncoder(model.model.visual).eval()
    torch.onnx.export(vis, (proc["pixel_values"], torch.from_numpy(pos), torch.from_numpy(seg)), str(tmp / "vision.onnx"),
                      input_names=["pixel_values", "positions", "image_index"], output_names=["image_embeds"],
                      dynamic_shapes={"pixel_values": {0: dyn}, "positions": {0: dyn}, "image_index": {0: dyn}}, **quiet)

    emb = TokenEmbedding(ck.adapter.embed_tokens(model)).eval()
    ids = torch.zeros((2, 5), dtype=torch.long)
    torch.onnx.export(emb, (ids,), str(tmp / "embed.onnx"), input_names=["input_ids"], output_names=["inputs_embeds"],
                      dynamic_shapes={"input_ids": {0: dyn, 1: dyn}}, **quiet)

    dec = Decoder(model, verbalizers).eval()
    b, length, p = 2, 5, 3
    past = [torch.zeros(b, sizes.num_kv_heads, p, sizes.head_dim) for _ in range(2 * sizes.num_layers)]
    example = (torch.zeros(b, length, sizes.hidden_size), torch.ones(b, p + length, dtype=torch.long),
               torch.arange(p, p + length).view(1, 1, length).expand(3, b, length).contiguous(), *past)
    ins, outs = dec.io_names()
    torch.onnx.export(dec, example, str(tmp / "decoder.onnx"), input_names=ins, output_names=outs,
                      dynamic_shapes=({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {1: dyn, 2: dyn},
                                      tuple({0: dyn, 2: dyn} for _ in past)), **quiet)
    return {
        "model": {
            "arch": ck.adapter.name,
            "num_layers": sizes.num_layers, "num_kv_heads": sizes.num_kv_heads, "head_dim": sizes.head_dim,
            "hidden_size": sizes.hidden_size, "vocab_size": sizes.vocab_size,
            "image_token_id": int(model.config.image_token_id),
            "spatial_merge_size": int(model.config.vision_config.spatial_merge_size),
            "position_axes": 3,
        },
    }


GRAPH_BUILDERS = {"qwen2_vl": _export_qwen2_vl}


def _signature(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def desc(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}

    return {"inputs": [desc(v) for v in m.graph.input], "outputs": [desc(v) for v in m.graph.output]}


@register_target("onnx")
def export_onnx(model, out, quant: str = "fp32", vision_quant: str = "fp32", verbalizers: bool = False,
                block_size: int = 32, symmetric: bool = True, overwrite: bool = False, validate: bool = True,
                data=None, parity_samples: int = 16) -> Path:
    """Export a checkpoint to an ONNX artifact folder (see the module docstring).

    With ``validate`` (default) the artifact is checked against the checkpoint before it is
    moved into place; on failure no artifact is made, the parity report is left in
    ``<out>.parity-failed/`` and :class:`~vlsi_export.validate.ParityError` is raised."""
    from vlsi.checkpoint import load_checkpoint
    from vlsi.manifest import folder_hash, tool_versions, write_manifest

    for flag, value in (("--quant", quant), ("--vision-quant", vision_quant)):
        if value not in PRECISIONS:
            raise ConfigError(f"{flag} {value!r} is not one of {', '.join(PRECISIONS)}")
    ck = load_checkpoint(model)
    if ck.adapter.name not in GRAPH_BUILDERS:
        raise UnsupportedArchitectureError(
            f"the ONNX target does not export {ck.adapter.name!r} yet; supported: {', '.join(GRAPH_BUILDERS)}")
    if verbalizers and ck.verbalizers is None:
        raise ConfigError(f"--verbalizers: {model} has no verbalizer heads (train them with the verbalize stage)")
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        raw = tmp / "fp32"
        raw.mkdir()
        info = GRAPH_BUILDERS[ck.adapter.name](ck, ck.verbalizers if verbalizers else None, raw)
        precision = {"vision": vision_quant, "embed": "fp32", "decoder": quant}
        graphs = {}
        for name, prec in precision.items():
            dst = tmp / f"{name}.onnx"
            quantize_graph(raw / f"{name}.onnx", dst, prec, block_size=block_size, symmetric=symmetric)
            if name == "embed":  # a row lookup: keep the table in a mapped file, not in the heap
                import onnx

                save_model(onnx.load(str(dst)), dst, external=True)
            graphs[name] = {"file": dst.name, "precision": prec, **_signature(dst)}
        shutil.rmtree(raw)
        for name in COPIED:
            if (Path(model) / name).is_file():
                shutil.copyfile(Path(model) / name, tmp / name)
        manifest = {
            "target": "onnx",
            "source": {"path": str(Path(model).resolve()), "sha256": folder_hash(model)},
            "graphs": graphs,
            "verbalizers": list(ck.verbalizers.target_layers) if verbalizers else [],
            "quantization": {"decoder": quant, "vision": vision_quant, "block_size": block_size,
                             "symmetric": symmetric},
            "eos_token_ids": [ck.tokenizer.token_to_id("<|im_end|>"), ck.tokenizer.token_to_id("<|endoftext|>")],
            "opset": OPSET,
            "tools": tool_versions(("vlsi", "torch", "transformers", "onnx", "onnxruntime", "onnxscript")),
            **info,
        }
        write_manifest(tmp, manifest)
        if validate:
            gate(tmp, out, model, manifest, data, parity_samples)
    return out


def gate(tmp: Path, out: Path, reference, manifest: dict, data, samples: int) -> None:
    """Run parity on the finished folder; record it in the manifest, or refuse the export."""
    from vlsi.manifest import write_manifest

    from .validate import ParityError, validate

    report = validate(tmp, reference, data=data, n=samples, raise_on_fail=False)
    if not report.passed:
        failed = out.parent / f"{out.name}.parity-failed"
        shutil.rmtree(failed, ignore_errors=True)
        failed.mkdir(parents=True)
        for name in ("parity.json", "parity.md", "parity.png"):
            if (tmp / name).is_file():
                shutil.copyfile(tmp / name, failed / name)
        raise ParityError(f"export to {out} refused, parity failed ({report.precision}): "
                          + "; ".join(report.failures) + f". Report: {failed}/parity.md")
    manifest = {k: v for k, v in manifest.items() if k != "files"}
    manifest["parity"] = {"passed": True, "metrics": {k: v for k, v in report.metrics.items() if not isinstance(v, dict)}}
    write_manifest(tmp, manifest)

