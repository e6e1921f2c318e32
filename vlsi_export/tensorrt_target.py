"""``vlsi export --target tensorrt``: graphs TensorRT builds on the device, checked here.

TensorRT engines are specific to a GPU and a TensorRT version, so the artifact holds what
every device builds from (``vlsi build`` on the device makes the engines):

- ``vision.onnx``, ``decoder.onnx``: stock ops, opset 21, IR 10, precision written in the graph
  (:mod:`vlsi.archs.tensorrt`): fp16, INT8 Q/DQ or INT4 weight-only block-wise DQ
  (:mod:`.trt_quant`: NVIDIA ModelOpt when installed, else vlsi's round-to-nearest writer; the
  manifest says which);
- ``embed.npy``: the fp16 token table, memory-mapped by the host;
- ``build.json``: per device preset, the optimisation profiles, caps and memory budget, and
  the static op check per TensorRT version;
- ``fixtures/``: prompts with images and the PyTorch outputs, that ``vlsi build`` runs
  through the engines to measure parity on the device.

Before the folder is written the export must pass, on the CPU: ``onnx.checker``'s full check,
the static op check (:mod:`.trt_check`) for the preset's TensorRT versions, and the parity
gate on the exact graphs TensorRT will build, run by ONNX Runtime's CPU provider through the
same host loop as the TensorRT backend.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from vlsi.errors import ConfigError

from .base import CommonOptions, Target, Written, option, register_target
from .trt_presets import DEFAULT_PRESET, PRESETS, budget, check_precision, get_preset, profiles, weight_bytes

QUANTS = ("fp16", "int8", "int4", "fp8")
FIXTURES = 4


@dataclass(frozen=True)
class TensorRTOptions(CommonOptions):
    quant: str = option("fp16", "Text decoder precision: fp16; int8 (Q/DQ, zero-point 0, calibrated); int4 "
                                "(weight-only, block-wise DQ, block 128 or 64); fp8 (SM89+ GPUs only).", QUANTS)
    vision_quant: str = option("fp16", "Vision encoder precision.", ("fp16", "int8"))
    preset: str = option(DEFAULT_PRESET, "Device the budget check and `vlsi build`'s default profiles are for "
                                         "(build.json has every preset).", tuple(PRESETS))
    max_context: int | None = option(None, "Context length the engines take (default: the preset's).")
    max_image_tokens: int | None = option(None, "Image tokens one prompt may take (default: the preset's).")
    quantizer: str = option("auto", "int8/int4: modelopt (NVIDIA ModelOpt, calibrated on real samples), rtn "
                                    "(vlsi's round-to-nearest writer), auto (modelopt when installed).",
                            ("auto", "modelopt", "rtn"))
    calibration_samples: int = option(16, "Real samples the int8/int4 calibration runs on.")


def _trt_quant():
    from . import trt_quant

    return trt_quant


@register_target
class TensorRTTarget(Target):
    name = "tensorrt"
    Options = TensorRTOptions
    tools = ("onnx", "onnxruntime", "nvidia-modelopt")

    def check(self, opts):
        super().check(opts)
        preset = get_preset(opts.preset)
        if opts.quant == "fp8":
            check_precision("fp8", min(preset.compute_capability), f"--preset {opts.preset} ({preset.device})")
            if opts.quantizer == "rtn":
                raise ConfigError("--quant fp8 is written by NVIDIA ModelOpt only; drop --quantizer rtn")
        for name in ("max_context", "max_image_tokens"):
            v = getattr(opts, name)
            if v is not None and v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {v}: must be >= 1")
        if opts.calibration_samples < 1:
            raise ConfigError(f"--calibration-samples {opts.calibration_samples}: must be >= 1")

    def write(self, ck, tmp, opts, model_block):
        from vlsi.archs import get_export, get_spec
        from vlsi.archs.tensorrt import IR_VERSION, OPSET
        from vlsi.manifest import Graph, Manifest

        from .onnx_target import signature

        spec = get_spec(ck.adapter.name)
        raw = tmp / "fp16"
        raw.mkdir()
        io = get_export(ck.adapter.name, "tensorrt").export(
            ck, ck.verbalizers if opts.verbalizers else None, raw, model_block)
        shutil.move(str(raw / "embed.npy"), str(tmp / "embed.npy"))
        embed = Graph("embed.npy", "fp16", io["embed"]["inputs"], io["embed"]["outputs"],
                      {"kind": "table", "note": "rows read by the host (numpy memory map), not a graph"})
        verbs = list(ck.verbalizers.target_layers) if opts.verbalizers else []

        def manifest(graphs):  # the in-memory manifest the host loop reads while we build
            return Manifest(target=self.name, precision="fp16", model=model_block, eos_token_ids=spec.eos_ids(ck.tokenizer),
                            graphs=graphs, verbalizers=verbs)

        fp16 = {name: Graph(f"fp16/{name}.onnx", "fp16", io[name]["inputs"], io[name]["outputs"],
                            {"rope": io[name]["rope"]} if name == "decoder" else {})
                for name in ("vision", "decoder")}
        fp16["embed"] = embed
        for name in COPIED_FOR_LOOP:
            if (Path(ck.path) / name).is_file():
                shutil.copyfile(Path(ck.path) / name, tmp / name)
        samples = _samples(opts)
        calib = None
        if "int8" in (opts.quant, opts.vision_quant) or opts.quant in ("int4", "fp8"):
            calib = _calibration(tmp, manifest(fp16), samples[: opts.calibration_samples])

        graphs, quant = {"embed": embed}, {"opset": OPSET, "ir_version": IR_VERSION}
        for name, prec in (("vision", opts.vision_quant), ("decoder", opts.quant)):
            dst = tmp / f"{name}.onnx"
            res = _trt_quant().quantize_for_tensorrt(raw / f"{name}.onnx", dst, prec,
                                                     calibration=calib.get(name) if calib else None,
                                                     method=opts.quantizer)
            sig = signature(dst)
            names = {k: [v["name"] for v in sig[k]] for k in ("inputs", "outputs")}
            if names != {k: io[name][k] for k in ("inputs", "outputs")}:
                raise ConfigError(f"{name}.onnx: quantisation changed the graph's I/O names; report this as a bug")
            details = {"signature": sig, "quantizer": res.quantizer, "kept_fp16": res.skipped}
            if name == "decoder":
                details["rope"] = io[name]["rope"]
            graphs[name] = Graph(dst.name, prec, names["inputs"], names["outputs"], details)
            quant[name] = {"precision": prec, "quantizer": res.quantizer, "kept_fp16": res.skipped, **res.details}
        shutil.rmtree(raw)

        op_check = _checks(tmp, graphs, opts)
        build = _build_file(ck, tmp, graphs, model_block, opts, op_check)
        b = build["presets"][opts.preset]["budget"]
        if not b["fits"]:
            print(f"warning: the model does not fit {opts.preset}: {b['line']}. Export with a smaller --max-context "
                  "or --quant int4, or pick another --preset", file=sys.stderr)
        _fixtures(ck, tmp, samples[:FIXTURES])
        quant["quantizer"] = graphs["decoder"].details["quantizer"]
        return Written(precision=opts.quant, graphs=graphs, quantization=quant)


COPIED_FOR_LOOP = ("tokenizer.json", "preprocessor_config.json")
"""What the host loop reads from the artifact folder while the export calibrates (the base
export copies these, and the rest, again at the end)."""


def _samples(opts) -> list:
    from vlsi.data.loaders import load_records

    from .parity import default_samples

    n = max(opts.calibration_samples, FIXTURES)
    records = load_records(opts.data)[0][:n] if opts.data else default_samples(n, seed=4321)
    return [r for r in records if r.answer is not None and r.images]


def _prompt(record) -> str:
    return record.turns[0].text if record.turns[0].role == "user" else record.turns[1].text


class _Recorder:
    """Wraps a graph runner and keeps the feeds of every call (calibration data)."""

    def __init__(self, runner):
        self.runner = runner
        self.feeds = {"vision": [], "decoder": []}

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def vision(self, feeds):
        self.feeds["vision"].append(dict(feeds))
        return self.runner.vision(feeds)

    def decoder(self, cache, feeds):
        full = dict(feeds)
        for i, (k, v) in enumerate(cache["past"]):
            full[f"past_key_{i}"], full[f"past_value_{i}"] = k, v
        self.feeds["decoder"].append(full)
        return self.runner.decoder(cache, feeds)


def _calibration(tmp: Path, manifest, records) -> dict[str, list[dict]]:
    """The inputs each fp16 graph sees on real prompts with images (the prefill of each)."""
    from vlsi_runtimes.tensorrt_backend import TensorRTRuntime

    rt = TensorRTRuntime(tmp, engine="onnxruntime", manifest=manifest)
    rec = rt.runner = _Recorder(rt.runner)
    for r in records:
        rt.logits(list(r.images), _prompt(r))
    return rec.feeds


def _checks(tmp: Path, graphs: dict, opts) -> dict:
    """``onnx.checker``'s full check and the static TensorRT op check of every graph; refuses the
    export when a graph fails for one of the preset's TensorRT versions."""
    import onnx

    from .trt_check import check_graph

    preset = get_preset(opts.preset)
    versions = sorted({v for p in PRESETS.values() for v in p.tensorrt}, key=lambda v: [int(x) for x in v.split(".")])
    out = {}
    for name in ("vision", "decoder"):
        path = tmp / graphs[name].file
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ConfigError(f"{name}.onnx fails onnx.checker: {str(e).splitlines()[0]}; report this as a bug") from None
        report = check_graph(path, versions=tuple(versions), precision=graphs[name].precision)
        out[name] = {"passed": {v: report.passed(v) for v in versions}, "table": report.table(),
                     "requirements": getattr(report, "requirements", {})}
        failed = [v for v in preset.tensorrt if not report.passed(v)]
        if failed:
            first = report.findings[failed[0]][0]
            raise ConfigError(f"{name}.onnx would not build on TensorRT {', '.join(failed)} (--preset {opts.preset}): "
                              f"{first.rule}: {first.message}")
    return out


def _vision_shape(config, model_block) -> dict:
    vc = config.vision_config
    return {"patches_per_token": int(model_block.get("spatial_merge_size", 1)) ** 2,
            "heads": int(getattr(vc, "num_heads", None) or vc.num_attention_heads),
            "width": int(getattr(vc, "embed_dim", None) or vc.hidden_size)}


def preset_block(preset, model_block: dict, vision_signature: list, vision_caps, vision: dict, weights: int,
                 embed: int, max_context: int | None = None, max_image_tokens: int | None = None) -> dict:
    """One preset's entry of ``build.json``: caps, profiles and budget (``vision_caps`` is the
    spec's function of the image-token cap)."""
    ctx = max_context or preset.max_context
    tokens = max_image_tokens or preset.max_image_tokens
    b = budget(preset, model_block, weights, embed, vision, max_context=ctx, max_image_tokens=tokens)
    return {"preset": asdict(preset), "max_context": ctx, "max_image_tokens": tokens,
            "profiles": profiles(model_block, vision_signature, vision_caps(tokens), ctx, tokens),
            "budget": {**b.to_dict(), "line": b.line()}}


def _build_file(ck, tmp: Path, graphs: dict, model_block: dict, opts, op_check: dict) -> dict:
    from vlsi.archs import get_spec
    from vlsi.atomic import atomic_write_text

    spec = get_spec(ck.adapter.name)
    image_spec = spec.image_spec(ck.path)
    vision = _vision_shape(ck.model.config, model_block)
    weights = weight_bytes(tmp, [graphs[n].file for n in ("vision", "decoder")])
    embed = (tmp / "embed.npy").stat().st_size
    sig = graphs["vision"].details["signature"]["inputs"]
    presets = {}
    for name, preset in PRESETS.items():
        own = name == opts.preset
        presets[name] = preset_block(preset, model_block, sig, lambda t: spec.vision_caps(t, image_spec, model_block),
                                     vision, weights, embed, opts.max_context if own else None,
                                     opts.max_image_tokens if own else None)
    build = {"default_preset": opts.preset, "presets": presets, "vision_signature": sig, "vision": vision,
             "op_check": op_check}
    atomic_write_text(tmp / "build.json", json.dumps(build, indent=2) + "\n")
    return build


def _fixtures(ck, tmp: Path, records) -> None:
    """Prompts with images and what PyTorch answers, for ``vlsi build`` to run on the device."""
    import numpy as np

    from vlsi.atomic import atomic_write_text
    from vlsi_runtimes import load

    ref = load(ck.path, backend="torch")
    folder = tmp / "fixtures"
    folder.mkdir()
    samples, arrays = [], {}
    n_new = 16
    for i, r in enumerate(records):
        images = list(r.images)
        names = []
        for j, im in enumerate(images):
            data = im if isinstance(im, bytes) else Path(im).read_bytes()
            (folder / f"{i}_{j}.png").write_bytes(data)
            names.append(f"fixtures/{i}_{j}.png")
        prompt = _prompt(r)
        ids = list(ref.stream_tokens(images, prompt, n_new))
        arrays[f"logits_{i}"] = ref.logits(images, prompt)[0]["final"].astype(np.float32)
        arrays[f"image_embeds_{i}"] = ref.image_embeds(images).astype(np.float32)
        samples.append({"id": r.id, "images": names, "prompt": prompt, "reference_ids": ids,
                        "reference_text": ref.decode(ids)})
    np.savez(folder / "reference.npz", **arrays)
    atomic_write_text(folder / "fixtures.json", json.dumps({"max_new_tokens": n_new, "samples": samples}, indent=2))
