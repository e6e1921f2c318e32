"""``vlsi export --target gguf``: the text model as llama.cpp's ``qwen2vl`` architecture,
written with our own code on top of the ``gguf`` library.

What is here: hyper-parameters (``rope.dimension_sections`` from the M-RoPE sections), the
tokenizer as ``gpt2`` BPE with the ``qwen2`` pre-tokenizer (tokens, merges, token types,
special ids, chat template), and every tensor through the declarative table in
:mod:`vlsi_export.gguf_tables`, as f32 or f16 (1-D tensors stay f32, as llama.cpp expects).
The vision projector file, llama.cpp quantisation and the llama.cpp backend build on this.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlsi.errors import ConfigError, UnsupportedArchitectureError

from .gguf_tables import QWEN2VL_TEXT, TensorTable

TEXT_TYPES = ("f32", "f16")


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


def write_text_gguf(ck, folder: Path, dst: Path, ftype: str = "f32") -> dict:
    """Write ``ck``'s language model to ``dst`` (one GGUF file); returns the tensor types written."""
    import gguf

    if ftype not in TEXT_TYPES:
        raise ConfigError(f"text type {ftype!r}: the writer produces {', '.join(TEXT_TYPES)}; other types "
                          "come from llama.cpp's quantiser")
    if ck.adapter.name not in ("qwen2_vl", "qwen2_5_vl"):
        raise UnsupportedArchitectureError(
            f"the GGUF target writes Qwen2-VL and Qwen2.5-VL (llama.cpp's qwen2vl); {ck.adapter.name!r} is "
            "not supported (llama.cpp cannot run LLaVA-OneVision's projector)")
    cfg = ck.model.config
    tc = cfg.get_text_config()
    sizes = ck.adapter.text_sizes(cfg)
    rope = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
    sections = list(rope.get("mrope_section") or [])
    if len(sections) != 3 or 2 * sum(sections) != sizes.head_dim:
        raise ConfigError(f"mrope_section {sections} does not split head_dim {sizes.head_dim} in three")

    w = gguf.GGUFWriter(str(dst), "qwen2vl")
    w.add_name(folder.name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if ftype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(int(tc.max_position_embeddings))
    w.add_embedding_length(sizes.hidden_size)
    w.add_block_count(sizes.num_layers)
    w.add_feed_forward_length(int(tc.intermediate_size))
    w.add_head_count(sizes.num_heads)
    w.add_head_count_kv(sizes.num_kv_heads)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(tc.rms_norm_eps))
    w.add_rope_dimension_sections([*sections, 0])

    tok = _tokenizer_metadata(folder, sizes.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    t = ck.tokenizer
    eos = t.token_to_id("<|im_end|>")
    w.add_eos_token_id(eos)
    w.add_bos_token_id(t.token_to_id("<|endoftext|>"))
    w.add_pad_token_id(t.token_to_id("<|endoftext|>"))
    w.add_add_bos_token(False)
    tcfg = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
    template = tcfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if template:
        w.add_chat_template(template)

    table = TensorTable(QWEN2VL_TEXT, "qwen2vl text model")
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
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written
