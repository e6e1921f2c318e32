"""GGUF target, text model: metadata, tokenizer and every tensor read back with the gguf reader.
(llama.cpp itself is exercised by the llama.cpp backend's tests.)"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")

from vlsi.checkpoint import load_checkpoint  # noqa: E402
from vlsi.errors import UnsupportedArchitectureError  # noqa: E402
from vlsi.archs.gguf import TensorTable  # noqa: E402
from vlsi.archs.qwen2_vl.gguf import QWEN2VL_TEXT  # noqa: E402
from vlsi_export.gguf_target import write_text_gguf  # noqa: E402


def _field(r, key):
    return r.fields[key].contents()


@pytest.mark.parametrize("ftype", ["f32", "f16"])
def test_text_model_reads_back(tiny_ckpt, tmp_path, ftype):
    ck = load_checkpoint(tiny_ckpt)
    dst = tmp_path / f"text-{ftype}.gguf"
    written = write_text_gguf(ck, tiny_ckpt, dst, ftype)
    r = gguf.GGUFReader(str(dst))
    tc = ck.model.config.get_text_config()
    assert _field(r, "general.architecture") == "qwen2vl"
    assert _field(r, "qwen2vl.block_count") == tc.num_hidden_layers
    assert _field(r, "qwen2vl.embedding_length") == tc.hidden_size
    assert _field(r, "qwen2vl.attention.head_count_kv") == tc.num_key_value_heads
    assert _field(r, "qwen2vl.rope.dimension_sections") == [*tc.rope_parameters["mrope_section"], 0]
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "qwen2"
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == tc.vocab_size
    tok = ck.tokenizer
    for special in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>"):
        i = tok.token_to_id(special)
        assert tokens[i] == special and _field(r, "tokenizer.ggml.token_type")[i] == 3  # CONTROL
    assert _field(r, "tokenizer.ggml.eos_token_id") == tok.token_to_id("<|im_end|>")
    assert "<|im_start|>" in _field(r, "tokenizer.chat_template")

    state = ck.model.state_dict()
    expect = {f"blk.{b}.{n}" for b in range(tc.num_hidden_layers) for n in (
        "attn_norm.weight", "attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias", "attn_v.weight",
        "attn_v.bias", "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")}
    expect |= {"token_embd.weight", "output_norm.weight"}
    if "lm_head.weight" in state and not tc.tie_word_embeddings:
        expect.add("output.weight")
    assert {t.name for t in r.tensors} == expect == set(written)
    table = TensorTable(QWEN2VL_TEXT, "test")
    by_target = {table.target(k): v for k, v in state.items() if table.target(k)}
    for t in r.tensors:
        want = by_target[t.name].float().numpy()
        got = np.asarray(t.data).reshape(want.shape)
        assert t.tensor_type.name == ("F16" if ftype == "f16" and want.ndim > 1 else "F32")
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=1e-3 if ftype == "f16" else 0, atol=1e-3 if ftype == "f16" else 0)


def test_unmapped_tensors_and_architectures_are_refused(tmp_path):
    table = TensorTable(QWEN2VL_TEXT, "qwen2vl text model")
    assert table.target("model.language_model.layers.7.mlp.up_proj.weight") == "blk.7.ffn_up.weight"
    assert table.target("model.visual.blocks.0.attn.qkv.weight") is None
    with pytest.raises(KeyError, match="no GGUF name.*rotary_emb.inv_freq"):
        table.target("model.language_model.rotary_emb.inv_freq")
    from vlsi.tiny import save_tiny

    path = tmp_path / "llava"
    save_tiny(path, arch="llava_onevision", size="student", seed=0)
    with pytest.raises(UnsupportedArchitectureError, match="LLaVA-OneVision"):
        write_text_gguf(load_checkpoint(path), path, tmp_path / "x.gguf")


def test_tiny_processors_take_the_bounds_llama_cpps_clip_uses():
    """llama.cpp's clip resizes every Qwen2-VL image to 8..4096 merged tokens (hard-coded for the
    projector); the tiny processors use the same bounds, so a 56 px image is 84 px on both sides."""
    from vlsi.archs.qwen2_vl.gguf import Qwen2VLGguf
    from vlsi.archs.qwen2_vl.image import smart_resize
    from vlsi.tiny import tiny_image_processor

    assert Qwen2VLGguf.clip_image_tokens == (8, 4096)
    for arch in ("qwen2_vl", "qwen2_5_vl"):
        proc = tiny_image_processor(arch, 56)
        assert (proc.size["shortest_edge"], proc.size["longest_edge"]) == (8 * 784, 4096 * 784)
        assert Qwen2VLGguf().clip_resize(proc.to_dict())["differs"] is False
    assert smart_resize(56, 56, 28, 8 * 784, 4096 * 784) == (84, 84)


def test_processor_bounds_clip_ignores_are_written_and_reported(tiny_ckpt, tmp_path, capsys):
    """A real Qwen2-VL processor (4..16384 tokens) against clip's 8..4096: the mmproj holds the
    processor's bounds for llama.cpp versions that read them, the manifest says which images
    llama.cpp's own tools size differently, and export prints the flags that make them agree."""
    import json
    import shutil

    from vlsi.manifest import load_manifest
    from vlsi_export import get_target

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    pre["size"] = {"shortest_edge": 3136, "longest_edge": 12845056}  # Qwen2-VL-2B-Instruct's
    (ckpt / "preprocessor_config.json").write_text(json.dumps(pre))
    out = get_target("gguf")(ckpt, tmp_path / "gguf", quant="f32", mmproj_quant="f32", validate=False)
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "llama.cpp's own tools" in ln)
    assert "8..4096 image tokens" in line and "4..16384" in line
    assert "--image-min-tokens 4 --image-max-tokens 16384" in line
    details = load_manifest(out).graph("mmproj").details
    assert details["clip_resize"]["differs"] is True
    assert details["clip_resize"]["flags"] == "--image-min-tokens 4 --image-max-tokens 16384"
    assert "6272 pixels" in details["clip_resize"]["resized_differently"]
    assert (details["image_min_tokens"], details["image_max_tokens"]) == (4, 16384)
    r = gguf.GGUFReader(str(out / load_manifest(out).graph("mmproj").file))
    assert _field(r, "clip.vision.image_min_pixels") == 3136
    assert _field(r, "clip.vision.image_max_pixels") == 12845056
