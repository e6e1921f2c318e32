"""What the exporters write for drafting tokens (self-speculative decoding): the draft head's
reduced vocabulary (ONNX and GGUF) and, for llama.cpp, a truncated draft model.

The draft GGUF is the text model's first ``L`` blocks, copied byte for byte from the exported
(quantised) file with its embedding, final norm, output matrix, tokenizer and chat template:
a model llama.cpp loads like any other. vlsi's llama.cpp backend runs it in a second context
and reads the residual stream after block ``L`` (then the layer-``L`` verbalizer head in
numpy, on the reduced vocabulary); llama.cpp's own speculative decoding
(``llama-speculative-simple -md``, ``llama-server --model-draft``) takes it as a draft model
and drafts with its final norm and output matrix (the logit lens at layer ``L``).
"""

from __future__ import annotations

from pathlib import Path

from vlsi.errors import ConfigError
from vlsi.llama_cpp import DRAFT_LAYER_KEY, DRAFT_MODEL_KEY, DRAFT_VOCAB_KEY
from vlsi.manifest import sha256_file


def draft_vocab(source: str, ck, model_block: dict) -> list[int]:
    """The draft head's token ids: a .json list of ids, or every token of a dataset's answers
    (its last assistant turns) plus the end-of-sequence ids; sorted, checked against the vocabulary."""
    import json
    from pathlib import Path

    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"--draft-vocab {source}: no such file")
    vocab = int(model_block["vocab_size"])
    data = None
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"--draft-vocab {source}: not valid JSON ({e})") from None
    if isinstance(data, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in data):
        ids = set(data)
    else:
        from vlsi.data.loaders import load_records

        records, _ = load_records(path, check_images=False)
        ids = set()
        for r in records:
            answers = [t.text for t in r.turns if t.role == "assistant"]
            if answers:
                ids.update(ck.tokenizer.encode(answers[-1], add_special_tokens=False).ids)
        if not ids:
            raise ConfigError(f"--draft-vocab {source}: no answers to take tokens from")
    from vlsi.archs import get_spec

    ids.update(int(t) for t in get_spec(ck.adapter.name).eos_ids(ck.tokenizer))
    bad = sorted(t for t in ids if not 0 <= t < vocab)
    if bad:
        raise ConfigError(f"--draft-vocab {source}: token ids {bad[:5]} are outside the vocabulary of {vocab}")
    return sorted(ids)


def write_draft_gguf(text: Path, dst: Path, layers: int, vocab: list[int] | None = None) -> dict:
    """``dst``: the first ``layers`` blocks of the GGUF text model ``text`` and everything that
    is not a block, as they lie in ``text``; ``vocab`` (the draft head's ids) is recorded for
    vlsi's backend. -> ``{"layer", "blocks_of", "tensors", "bytes"}``."""
    import gguf

    r = gguf.GGUFReader(str(text))
    arch = str(r.fields["general.architecture"].contents())
    count_key = f"{arch}.block_count"
    total = int(r.fields[count_key].contents())
    if not 1 <= layers < total:
        raise ConfigError(f"--draft-layer {layers}: the draft model is the first L of the {total} layers, "
                          f"1 <= L < {total}")
    w = gguf.GGUFWriter(str(dst), arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = layers if name == count_key else field.contents()
        w.add_key_value(name, value, kind, sub)
    w.add_uint32(DRAFT_LAYER_KEY, layers)
    w.add_string(DRAFT_MODEL_KEY, sha256_file(text))
    if vocab:
        w.add_array(DRAFT_VOCAB_KEY, [int(t) for t in vocab])
    kept = 0
    for t in r.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= layers:
            continue
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        kept += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"layer": layers, "blocks_of": total, "tensors": kept, "bytes": dst.stat().st_size}
