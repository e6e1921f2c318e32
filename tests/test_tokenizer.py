"""The locally trained tokenizer loads with transformers and behaves like Qwen2's layout."""

from __future__ import annotations

import pytest

from vlsi.tokenizer import SPECIAL_TOKENS, build_tokenizer, save_tokenizer


def test_deterministic(tokenizer):
    from vlsi.data.synth import corpus_texts

    again = build_tokenizer(corpus_texts())
    assert again.to_str() == tokenizer.to_str()


def test_special_tokens_after_the_bpe_vocabulary_in_qwen_order(tokenizer):
    ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))
    assert ids[-1] == tokenizer.get_vocab_size() - 1
    # a special token is one id, never split
    assert tokenizer.encode("<|im_start|>user").ids[0] == tokenizer.token_to_id("<|im_start|>")


def test_autotokenizer_and_image_processor_load(tmp_path, tiny_ckpt):
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    text = "What colour is the star? Café, naïve — 12 ★"
    from vlsi.tokenizer import load_fast_tokenizer

    fast = load_fast_tokenizer(tiny_ckpt)
    assert hf(text, add_special_tokens=False).input_ids == fast.encode(text, add_special_tokens=False).ids
    assert hf.decode(hf(text).input_ids) == text  # byte-level: lossless, even for unseen characters
    ip = AutoImageProcessor.from_pretrained(str(tiny_ckpt))
    assert type(ip).__name__.startswith("Qwen2VLImageProcessor")
    # transformers' Qwen2VLProcessor always builds its video processor, which requires
    # torchvision: with torchvision AutoProcessor loads the folder, without it transformers
    # refuses, naming torchvision (vlsi itself never needs AutoProcessor).
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        proc = AutoProcessor.from_pretrained(str(tiny_ckpt))
        assert type(proc).__name__ == "Qwen2VLProcessor"
    else:
        with pytest.raises(ImportError, match="(?i)torchvision"):
            AutoProcessor.from_pretrained(str(tiny_ckpt))


def test_nfc_normalisation(tokenizer):
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert tokenizer.encode(composed).ids == tokenizer.encode(decomposed).ids


def test_qwen2_split_keeps_digits_single(tokenizer):
    toks = tokenizer.encode("12345").tokens
    assert toks == ["1", "2", "3", "4", "5"]


def test_chat_template_renders_chatml(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    save_tokenizer(tokenizer, tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    s = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert s == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|><|image_pad|><|vision_end|>\nHi<|im_end|>\n<|im_start|>assistant\n")
