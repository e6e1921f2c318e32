"""A plain Hugging Face folder is a first-class export input, and a padded vocabulary survives
every export.

The folders here are what a user downloads: ``model.save_pretrained``, the tokenizer saved by
transformers (``tokenizer.json``, ``tokenizer_config.json``, the chat template) and
``image_processor.save_pretrained`` -- written by hand from :func:`vlsi.tiny.build_tiny`, not by
``save_tiny``, so there is no ``vlsi.json`` and no verbalizer file. They export on every target
that takes their architecture (ONNX: all three; GGUF: Qwen2-VL), parity-gated.

The Qwen2-VL folder also has a padded vocabulary, as real Qwen2-VL has (151,936 embedding rows
for 151,646 tokens): ``GAP`` rows more than the tokenizer has tokens, on purpose not a multiple
of 64 and wider than the tiny models' default rounding. Its exports keep the padded width
(logits, GGUF token list, llama.cpp's vocabulary).
"""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

import vlsi_runtimes  # noqa: E402
from vlsi.errors import UnsupportedArchitectureError  # noqa: E402
from vlsi.manifest import folder_hash, load_manifest  # noqa: E402
from vlsi_export import get_target  # noqa: E402

pytestmark = pytest.mark.slow  # an ONNX export is ~40 s on 2 cores

ARCHS = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")
GAP = 37
"""Embedding rows beyond the tokenizer's tokens in the padded (Qwen2-VL) folder."""
PARITY_SAMPLES = 2  # the gate runs in full; fewer samples keep three exports affordable
PROMPT = "what colour is the shape?"


def _png(seed=0, size=84) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def save_plain(path, arch: str, vocab_size: int | None = None):
    """A tiny model saved the way transformers saves a downloaded one; returns the tokenizer's size."""
    from transformers import PreTrainedTokenizerFast

    from vlsi.tiny import build_tiny
    from vlsi.tokenizer import EOS_TOKEN, PAD_TOKEN, chat_template

    model, tok, proc, _ = build_tiny(arch, "student", seed=0, vocab_size=vocab_size)
    model.save_pretrained(path)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    hf_tok.chat_template = chat_template()
    hf_tok.save_pretrained(path)
    proc.save_pretrained(path)
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """arch -> (folder, number of tokens); the Qwen2-VL folder has ``GAP`` padding rows."""
    import torch

    from vlsi.tiny import default_tokenizer

    torch.set_num_threads(2)
    n = default_tokenizer().get_vocab_size()
    out = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp("plain") / arch
        vocab = n + GAP if arch == "qwen2_vl" else None
        assert save_plain(path, arch, vocab) == n
        out[arch] = (path, n)
    return out


@pytest.fixture(scope="module")
def exported(plain, tmp_path_factory):
    """``exported(arch, target)``: the plain folder's parity-gated fp32/f32 artifact, made once."""
    cache = {}

    def get(arch, target):
        if (arch, target) not in cache:
            out = tmp_path_factory.mktemp(f"{target}-{arch}") / "art"
            opts = {"quant": "fp32"} if target == "onnx" else {"quant": "f32", "mmproj_quant": "f32"}
            get_target(target)(plain[arch][0], out, parity_samples=PARITY_SAMPLES, **opts)
            cache[arch, target] = out
        return cache[arch, target]

    return get


@pytest.fixture(scope="module")
def reference(plain):
    """arch -> the torch runtime on the plain folder."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = vlsi_runtimes.load(plain[arch][0], backend="torch")
        return cache[arch]

    return get


def _check_artifact(art, folder, target, ref):
    m = load_manifest(art)
    assert m.target == target and m.verbalizers == []
    assert m.parity["passed"] and m.parity["metrics"]["greedy_match"] == 1.0
    assert m.source["sha256"] and m.source["sha256"] == folder_hash(folder)
    assert "vlsi.json" not in m.files
    assert {"tokenizer.json", "preprocessor_config.json", "chat_template.jinja"} <= set(m.files)
    rt = vlsi_runtimes.load(art)
    images, prompt = [_png(3)], PROMPT
    assert rt.encode(images, prompt).ids == ref.encode(images, prompt).ids
    text = rt.generate(images, prompt, max_new_tokens=6)
    assert isinstance(text, str) and text == ref.generate(images, prompt, max_new_tokens=6)
    return rt


def test_plain_folder_is_plain(plain):
    """Nothing vlsi-specific in the folders, and they load as checkpoints all the same."""
    from vlsi.checkpoint import load_checkpoint

    for arch, (path, _) in plain.items():
        names = {p.name for p in path.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "preprocessor_config.json"} <= names, arch
        assert "vlsi.json" not in names and "verbalizers.safetensors" not in names
        # transformers 5 writes the template beside the config; older versions inside it
        assert "chat_template.jinja" in names or "chat_template" in (path / "tokenizer_config.json").read_text()
        ck = load_checkpoint(path)
        assert ck.verbalizers is None and ck.meta["adapter"] is None and ck.adapter.name == arch


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_folder_exports_to_onnx(arch, plain, exported, reference):
    path, _ = plain[arch]
    _check_artifact(exported(arch, "onnx"), path, "onnx", reference(arch))


def test_plain_folder_exports_to_gguf(plain, exported, reference):
    pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")
    path, _ = plain["qwen2_vl"]
    art = exported("qwen2_vl", "gguf")
    _check_artifact(art, path, "gguf", reference("qwen2_vl"))
    m = load_manifest(art)
    assert m.parity["metrics"]["tokens_match"] == 1.0
    import gguf

    # the chat template transformers wrote beside tokenizer_config.json is the one llama.cpp gets
    r = gguf.GGUFReader(str(art / m.graph("text").file))
    assert r.fields["tokenizer.chat_template"].contents() == (path / "chat_template.jinja").read_text()


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava_onevision"])
def test_gguf_refuses_what_it_does_not_take(arch, plain, tmp_path):
    """'Every target that supports its architecture': the GGUF target's limits are refusals,
    named, not half-written artifacts (tiny Qwen2.5-VL has the 56-pixel window llama.cpp lacks)."""
    pytest.importorskip("gguf", reason="the gguf extra is not installed")
    with pytest.raises(UnsupportedArchitectureError):
        get_target("gguf")(plain[arch][0], tmp_path / "g", quant="f32", mmproj_quant="f32")
    assert not (tmp_path / "g").exists()


# --------------------------------------------------------------------------- padded vocabulary


def test_padded_vocab_is_padded(plain):
    import json

    from vlsi.tiny import padded_vocab

    path, n = plain["qwen2_vl"]
    cfg = json.loads((path / "config.json").read_text())
    rows = cfg.get("text_config", cfg)["vocab_size"]
    assert rows == n + GAP and rows - n > padded_vocab(n) - n > 0  # wider than the default rounding


def test_padded_vocab_onnx(plain, exported, reference):
    n = plain["qwen2_vl"][1]
    rows = n + GAP
    art = exported("qwen2_vl", "onnx")
    m = load_manifest(art)
    assert m.parity["passed"] and m.parity["metrics"]["logits_max_abs"] <= 1e-4
    rt, ref = vlsi_runtimes.load(art), reference("qwen2_vl")
    for images in ([_png(4)], []):
        a = ref.logits(images, PROMPT, continuation=[n - 1, n + 1])  # the last real token, a padding id
        b = rt.logits(images, PROMPT, continuation=[n - 1, n + 1])
        for x, y in zip(a, b):
            assert x["final"].shape == y["final"].shape == (rows,)
            assert np.abs(x["final"] - y["final"]).max() <= 1e-4


def test_padded_vocab_gguf(plain, exported, reference):
    gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")
    pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")
    from tokenizers import Tokenizer

    path, n = plain["qwen2_vl"]
    rows = n + GAP
    art = exported("qwen2_vl", "gguf")
    m = load_manifest(art)
    assert m.parity["passed"]
    r = gguf.GGUFReader(str(art / m.graph("text").file))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    embd = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert len(tokens) == len(types) == rows == int(embd.shape[-1])  # ggml lists the row count last
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tokens[:n] == [tok.id_to_token(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, rows)]
    # UNUSED, as llama.cpp's own converter writes padding (USER_DEFINED tokens would be matched
    # in prompt text; the tokenisation check below would catch that)
    assert types[n:] == [int(gguf.TokenType.UNUSED)] * GAP
    assert int(gguf.TokenType.UNUSED) not in set(types[:n])

    rt, ref = vlsi_runtimes.load(art), reference("qwen2_vl")
    assert rt.n_vocab == rows  # llama_vocab_n_tokens
    a, b = ref.logits([], PROMPT, continuation=[n + 1]), rt.logits([], PROMPT, continuation=[n + 1])
    for x, y in zip(a, b):
        assert x["final"].shape == y["final"].shape == (rows,)
        assert np.abs(x["final"] - y["final"]).max() < 2e-2 and np.argmax(x["final"]) == np.argmax(y["final"])
    # the padding names are not tokens to llama.cpp's tokenizer: text spelling one splits as the HF one does
    text = f"[PAD{n}] and [PAD{rows - 1}]"
    assert rt.tokenize(text) == tok.encode(text, add_special_tokens=False).ids
