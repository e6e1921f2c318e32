"""``vlsi export --target gguf``: a checkpoint as llama.cpp files, written with our own code on
top of the ``gguf`` library, quantised with llama.cpp's own quantiser.

The artifact folder holds ``model-<type>.gguf`` (the language model as the llama.cpp text
architecture the model's ``gguf.py`` names, e.g. ``qwen2vl`` with ``rope.dimension_sections``
from the M-RoPE sections; the tokenizer as ``gpt2`` BPE with the ``qwen2`` pre-tokenizer,
padded to the embedding's rows; every tensor through the architecture's declarative table),
``mmproj-<type>.gguf`` (the vision tower and projector as a clip file, with the processor's pixel
bounds; where llama.cpp's clip uses other bounds for the projector, the manifest's ``clip_resize``
and one printed line say which images llama.cpp's own tools size differently and the flags that
make them agree), with ``--verbalizers``
a ``verbalizers.gguf`` sidecar holding the heads, the tokenizer/processor files, and
``manifest.json`` recording the tensor types actually written (llama.cpp falls back to other
types where a row width does not fit a block; the manifest says so). The architecture's
parts (tables, hyper-parameters, vision checks) live in ``vlsi/archs/<arch>/gguf.py``.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlsi.errors import ConfigError, UnsupportedArchitectureError

from .base import CommonOptions, Target, Written, option, register_target

TEXT_TYPES = ("f32", "f16")
# llama.cpp's own file types (enum llama_ftype), reached through llama_model_quantize
QUANT_TYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
GGUF_TYPES = (*TEXT_TYPES, *QUANT_TYPES)
MMPROJ_TYPES = ("f32", "f16", "q8_0")
# the tensor types each requested file type is made of when every row fits its blocks
# (the K-quant mixes keep some tensors at Q6_K / Q8_0 on purpose)
EXPECTED = {"f32": {"F32"}, "f16": {"F16"}, "q8_0": {"Q8_0"}, "q4_0": {"Q4_0", "Q4_1", "Q6_K", "Q8_0"},
            "q4_k_m": {"Q4_K", "Q6_K"}, "q5_k_m": {"Q5_K", "Q6_K"}, "q6_k": {"Q6_K"}}


def _tokenizer_metadata(folder: Path, vocab_size: int) -> dict:
    """Tokens (padded to the model's vocabulary), token types and merges from ``tokenizer.json``."""
    tj = json.loads((folder / "tokenizer.json").read_text())
    model = tj["model"]
    if model.get("type") != "BPE":
        raise UnsupportedArchitectureError(f"{folder}/tokenizer.json: a {model.get('type')} tokenizer; the GGUF "
                                           "target writes byte-level BPE (gpt2) tokenizers only")
    tokens = {i: t for t, i in model["vocab"].items()}
    types = {i: 1 for i in tokens}  # NORMAL
    for a in tj.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = 3 if a.get("special") else 4  # CONTROL / USER_DEFINED
    if max(tokens) >= vocab_size:
        raise ConfigError(f"{folder}: token id {max(tokens)} does not fit the model's vocabulary of {vocab_size}")
    names, kinds = [], []
    for i in range(vocab_size):
        if i in tokens:
            names.append(tokens[i])
            kinds.append(types[i])
        else:  # rows the embedding pads the vocabulary with
            names.append(f"[PAD{i}]")
            kinds.append(5)  # UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": names, "types": kinds, "merges": merges}


def _parts(ck):
    from vlsi.archs import get_export

    return get_export(ck.adapter.name, "gguf")


def write_text_gguf(ck, folder: Path, dst: Path, ftype: str = "f32") -> dict:
    """Write ``ck``'s language model to ``dst`` (one GGUF file); returns the tensor types written."""
    import gguf

    if ftype not in TEXT_TYPES:
        raise ConfigError(f"text type {ftype!r}: the writer produces {', '.join(TEXT_TYPES)}; other types "
                          "come from llama.cpp's quantiser")
    parts = _parts(ck)
    cfg = ck.model.config
    tc = cfg.get_text_config()
    sizes = ck.adapter.text_sizes(cfg)

    w = gguf.GGUFWriter(str(dst), parts.text_arch)
    w.add_name(folder.name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if ftype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    parts.text_hparams(w, cfg, sizes)

    tok = _tokenizer_metadata(folder, sizes.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    spec = ck.adapter.spec
    w.add_eos_token_id(spec.token_id(ck.tokenizer, spec.end_of_turn))
    w.add_bos_token_id(spec.pad_id(ck.tokenizer))
    w.add_pad_token_id(spec.pad_id(ck.tokenizer))
    w.add_add_bos_token(False)
    tcfg = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
    template = tcfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if template:
        w.add_chat_template(template)

    table = parts.text_tensors()
    state = ck.model.state_dict()
    tied = bool(getattr(tc, "tie_word_embeddings", False) or getattr(cfg, "tie_word_embeddings", False))
    written = {}
    for name, tensor in state.items():
        try:
            target = table.target(name)
        except KeyError as e:
            raise UnsupportedArchitectureError(str(e.args[0])) from None
        if target is None or (target == "output.weight" and tied):
            continue
        arr = tensor.detach().float().cpu().numpy()
        if ftype == "f16" and arr.ndim > 1:
            arr = arr.astype(np.float16)
        w.add_tensor(target, arr)
        written[target] = "F16" if arr.dtype == np.float16 else "F32"
    _finish(w)
    return written


def _finish(w) -> None:
    """Header, key-values, tensors, in the order GGUFWriter requires."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_mmproj_gguf(ck, folder: Path, dst: Path, ftype: str = "f16") -> dict:
    """Write the vision tower and merger as llama.cpp's clip projector file.

    Returns ``{"types": {name: type}, "fallbacks": [...]}``: with ``q8_0``, matrices whose rows
    are not a multiple of 32 stay f16 (said in ``fallbacks``); the patch convolution always
    stays f16/f32, as clip requires."""
    import gguf
    from gguf.quants import quantize

    if ftype not in MMPROJ_TYPES:
        raise ConfigError(f"--mmproj-quant {ftype!r} is not one of {', '.join(MMPROJ_TYPES)}")
    parts = _parts(ck)
    cfg = ck.model.config
    vc = cfg.vision_config
    pre = json.loads((folder / "preprocessor_config.json").read_text())

    w = gguf.GGUFWriter(str(dst), "clip")
    w.add_type("mmproj")
    w.add_name(f"{folder.name} vision projector")
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[ftype])
    w.add_string("clip.projector_type", parts.projector_type)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_uint32("clip.vision.image_size", int(getattr(vc, "image_size", 560) or 560))
    w.add_uint32("clip.vision.patch_size", int(vc.patch_size))
    w.add_uint32("clip.vision.projection_dim", int(ck.adapter.text_sizes(cfg).hidden_size))
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)  # fixed in transformers' vision blocks
    w.add_array("clip.vision.image_mean", [float(x) for x in pre["image_mean"]])
    w.add_array("clip.vision.image_std", [float(x) for x in pre["image_std"]])
    parts.image_hparams(w, pre)
    parts.vision_hparams(w, cfg)  # refuses towers clip would run differently

    table = parts.vision_tensors()
    types, fallbacks = {}, []
    for name, tensor in ck.model.state_dict().items():
        try:
            parts = table.convert(name, tensor.detach().float().cpu().numpy())
        except KeyError as e:
            raise UnsupportedArchitectureError(str(e.args[0])) from None
        for target, arr in parts:
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            kind = "F32"
            if arr.ndim > 1 and not target.endswith("_norm.weight"):
                if target.startswith("v.patch_embd"):
                    kind = "F32" if ftype == "f32" else "F16"
                elif ftype == "q8_0" and arr.shape[-1] % 32 == 0:
                    kind = "Q8_0"
                else:
                    kind = "F32" if ftype == "f32" else "F16"
                    if ftype == "q8_0":
                        fallbacks.append(f"{target}: rows of {arr.shape[-1]} are not a multiple of 32, kept F16")
            if kind == "F16":
                w.add_tensor(target, arr.astype(np.float16))
            elif kind == "Q8_0":
                q = quantize(arr, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(target, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(target, arr)
            types[target] = kind
    for need in ("mm.0.weight", "mm.2.weight", "v.patch_embd.weight"):
        if need not in types:
            raise UnsupportedArchitectureError(f"{folder}: the vision projector has no {need}; not a Qwen2-VL merger")
    _finish(w)
    return {"types": types, "fallbacks": fallbacks}


def write_verbalizers_gguf(ck, dst: Path) -> list[int]:
    """The verbalizer heads as a sidecar (architecture ``vlsi-verbalizers``), f32. The backend
    applies them in numpy to the hidden states llama.cpp's eval callback hands over, then the
    model's own output matrix (read from the text file, so a quantised head stays quantised)."""
    import gguf

    verb = ck.verbalizers
    if verb.cfg.arch == "decoder_block":
        raise UnsupportedArchitectureError(
            "--verbalizers with the GGUF target: decoder-block heads attend over the whole sequence, which the "
            "llama.cpp backend does not run; verb_ffn, ffn and mlp heads are supported (or export to ONNX)")
    w = gguf.GGUFWriter(str(dst), "vlsi-verbalizers")
    w.add_string("vlsi.verbalizers.config", json.dumps(verb.cfg.to_dict()))
    eps = {k: float(h.norm.eps) for k, h in verb.heads.items()}
    w.add_string("vlsi.verbalizers.eps", json.dumps(eps))
    for name, tensor in verb.state_dict().items():
        w.add_tensor(name, tensor.detach().float().cpu().numpy())
    _finish(w)
    return list(verb.target_layers)


def quantize_text(src: Path, dst: Path, quant: str, threads: int = 0) -> None:
    """llama.cpp's own quantiser (``llama_model_quantize``) from an f32 file."""
    import ctypes

    try:
        import llama_cpp
    except ImportError:
        raise ConfigError("quantising a GGUF needs llama-cpp-python: pip install 'vlsi[gguf]'") from None
    from vlsi.llama_cpp import quiet_logs

    quiet_logs()
    llama_cpp.llama_backend_init()
    p = llama_cpp.llama_model_quantize_default_params()  # the struct's layout differs between versions
    p.ftype = QUANT_TYPES[quant]
    if threads:
        p.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise ConfigError(f"llama.cpp could not quantise {src.name} to {quant} (llama_model_quantize returned {rc}); "
                          "run with VLSI_LLAMA_LOG=1 to see llama.cpp's reason")


def written_types(path: Path) -> dict:
    """What a GGUF file actually holds: per-tensor types, their counts and bits per weight."""
    import gguf

    r = gguf.GGUFReader(str(path))
    types, n_elem, n_bytes = {}, 0, 0
    for t in r.tensors:
        types[t.name] = t.tensor_type.name
        n_elem += int(t.n_elements)
        n_bytes += int(t.n_bytes)
    return {"tensors": types, "counts": dict(Counter(types.values())),
            "bits_per_weight": round(8 * n_bytes / max(1, n_elem), 3)}


def _fallbacks(quant: str, types: dict) -> list[str]:
    """Matrices llama.cpp wrote in another type than the requested file type is made of."""
    expect = EXPECTED[quant]
    return [f"{name}: {kind}" for name, kind in types.items()
            if kind not in expect and not (kind == "F32" and (name.endswith(".bias") or name.endswith("norm.weight")))]


def clip_resize_line(projector: str, resize: dict) -> str:
    """The one line export prints when llama.cpp's own tools size some images differently."""
    lo, hi = resize["clip_image_tokens"]
    plo, phi = resize["processor_image_tokens"]
    return (f"note: llama.cpp's own tools (llama-mtmd-cli, llama-server, llama-cpp-python's MTMDChatHandler) resize "
            f"images for {projector} to {lo}..{hi} image tokens, this model's processor to {plo}..{phi}: "
            f"{resize['resized_differently']} get another size there; run them with {resize['flags']} "
            "(MTMDChatHandler has no such setting). vlsi's own llama.cpp backend resizes as the processor does.")


@dataclass(frozen=True)
class GgufOptions(CommonOptions):
    quant: str = option("f16", "Text model type (q8_0 ... q6_k: llama.cpp's own quantiser).", GGUF_TYPES)
    mmproj_quant: str = option("f16", "Vision projector type.", MMPROJ_TYPES)
    threads: int = option(0, "Threads of llama.cpp's quantiser (0: its default).")
    draft_layer: int = option(0, "Also write draft.gguf, the text model's first L layers as they are in the model "
                                 "file: a draft model for llama.cpp's own speculative decoding, and vlsi's "
                                 "self-speculative drafter (with the layer-L verbalizer when kept). 0: none.")
    draft_vocab: str | None = option(None, "With --draft-layer: the draft head's reduced vocabulary, the tokens of "
                                           "this dataset's answers plus the end-of-sequence ids, or the ids of a "
                                           ".json list (vlsi's backend drafts on them; exact, verification uses the "
                                           "full head).")


@register_target
class GgufTarget(Target):
    name = "gguf"
    Options = GgufOptions
    tools = ("gguf", "llama_cpp_python")

    def check(self, opts):
        super().check(opts)
        if opts.draft_vocab and not opts.draft_layer:
            raise ConfigError("--draft-vocab is the vocabulary of the draft model: give --draft-layer L too")
        if opts.draft_layer < 0:
            raise ConfigError(f"--draft-layer {opts.draft_layer}: a layer number (0: no draft model)")

    def write(self, ck, tmp, opts, model_block):
        from vlsi.manifest import Graph

        folder, quant = Path(ck.path), opts.quant
        text = tmp / f"model-{quant}.gguf"
        if quant in TEXT_TYPES:
            write_text_gguf(ck, folder, text, quant)
        else:
            raw = tmp / "model-f32.gguf.tmp"
            write_text_gguf(ck, folder, raw, "f32")
            quantize_text(raw, text, quant, opts.threads)
            raw.unlink()
        mmproj = tmp / f"mmproj-{opts.mmproj_quant}.gguf"
        vis = write_mmproj_gguf(ck, folder, mmproj, opts.mmproj_quant)
        written = written_types(text)
        fallbacks = _fallbacks(quant, written["tensors"])
        if fallbacks:
            import warnings

            warnings.warn(f"{quant}: llama.cpp wrote {len(fallbacks)} tensors in another type (rows that do not fit "
                          f"its blocks), e.g. {fallbacks[0]}; the manifest lists them all", stacklevel=2)
        pre = json.loads((folder / "preprocessor_config.json").read_text())
        resize = _parts(ck).clip_resize(pre)
        if resize["differs"]:
            print(clip_resize_line(_parts(ck).projector_type, resize), file=sys.stderr)
        graphs = {
            "text": Graph(text.name, quant, details={
                "types": written["counts"], "bits_per_weight": written["bits_per_weight"],
                "fallbacks": fallbacks, "tensor_types": written["tensors"]}),
            "mmproj": Graph(mmproj.name, opts.mmproj_quant, details={
                "types": dict(Counter(vis["types"].values())), "fallbacks": vis["fallbacks"],
                **_parts(ck).image_token_limits(pre), "clip_resize": resize}),
        }
        if opts.verbalizers:
            write_verbalizers_gguf(ck, tmp / "verbalizers.gguf")
            graphs["verbalizers"] = Graph("verbalizers.gguf", "f32")
        if opts.draft_layer:
            from .draft import draft_vocab, write_draft_gguf

            ids = draft_vocab(opts.draft_vocab, ck, model_block) if opts.draft_vocab else None
            made = write_draft_gguf(text, tmp / "draft.gguf", opts.draft_layer, ids)
            graphs["draft"] = Graph("draft.gguf", quant, details={
                "layer": made["layer"], "blocks_of": made["blocks_of"], "vocab_size": len(ids) if ids else None})
        return Written(precision=quant, graphs=graphs, quantization={"text": quant, "mmproj": opts.mmproj_quant})

