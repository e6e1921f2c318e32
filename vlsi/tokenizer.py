"""A byte-level BPE tokenizer trained locally, laid out like Qwen2's.

Tests and the quickstart cannot download Qwen2's tokenizer, so we train a small one on the
synthetic corpus with the same pre-tokenisation (Qwen2's split regex, then byte-level
mapping), NFC normalisation, the same special tokens in the same order after the BPE
vocabulary, and a ChatML chat template. The result is saved as standard files
(``tokenizer.json``, ``tokenizer_config.json``) that ``AutoTokenizer`` loads, and that
llama.cpp's ``gpt2``/``qwen2`` BPE tokenizer reproduces. Teacher and student share it.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Iterable

# Qwen2's pre-tokenizer pattern: contractions, letter runs (with one leading non-letter),
# single digits, punctuation runs, newlines, whitespace. llama.cpp's "qwen2" pre-tokenizer
# implements the same split, which is what makes GGUF tokenisation identical.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2-VL's special tokens, in Qwen2-VL's order, placed after the BPE vocabulary.
# `<image>` follows for LLaVA-style architectures, which mark an image with it.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "<video>",
)
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"


def chat_template(image_marker: str | None = None) -> str:
    """The chat template vlsi writes (see :func:`vlsi.chat.chat_template`); Qwen2-VL's marker by default."""
    from .chat import chat_template as template

    return template(image_marker) if image_marker else template()


def build_tokenizer(texts: Iterable[str], bpe_vocab_size: int = 480):
    """Train a byte-level BPE on ``texts``; returns a ``tokenizers.Tokenizer``.

    ``bpe_vocab_size`` counts the 256 byte symbols plus merges; special tokens come after.
    Training is deterministic for the same texts in the same order.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def save_tokenizer(tok, out_dir: str | Path, model_max_length: int = 4096, image_marker: str | None = None) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` as transformers expects them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {}
    for t in SPECIAL_TOKENS:
        added[str(tok.token_to_id(t))] = {
            "content": t, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False, "special": True,
        }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "chat_template": chat_template(image_marker),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def load_fast_tokenizer(folder: str | Path):
    """The ``tokenizers`` object from a model folder (no transformers needed)."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        from .errors import CheckpointError

        raise CheckpointError(f"{path} is missing: the model folder has no tokenizer (save one with save_tokenizer)")
    return Tokenizer.from_file(str(path))
