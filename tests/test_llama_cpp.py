"""``vlsi export --target gguf`` run on the real llama.cpp (llama-cpp-python): the exported
pair loads, matches PyTorch, quantises through llama.cpp's own quantiser, keeps the
verbalizers, works with llama-cpp-python's own chat API, and bad files are named."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")
gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")

import vlsi_runtimes  # noqa: E402
from vlsi.errors import ConfigError, UnsupportedArchitectureError  # noqa: E402
from vlsi.manifest import ArtifactError, Manifest, load_manifest, write_manifest  # noqa: E402
from vlsi_export import get_target  # noqa: E402
from vlsi_export.parity import TOLERANCES, ParityError  # noqa: E402

pytestmark = pytest.mark.slow


def _img(seed=0, size=84):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def f32(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "f32"
    get_target("gguf")(tiny_ckpt, out, quant="f32", mmproj_quant="f32", verbalizers=True, parity_samples=4)
    return out


@pytest.fixture(scope="module")
def pair(tiny_ckpt, f32):
    return vlsi_runtimes.load(tiny_ckpt), vlsi_runtimes.load(f32)


def test_artifact_layout_and_parity_recorded(f32, tiny_ckpt):
    m = load_manifest(f32)
    assert m.target == "gguf" and m.precision == "f32" and m.verbalizers == [1, 3, 5]
    assert {"model-f32.gguf", "mmproj-f32.gguf", "verbalizers.gguf", "tokenizer.json"} <= set(m.files)
    assert m.graph("text").details["types"] == {"F32": len(m.graph("text").details["tensor_types"])} and m.graph("text").details["fallbacks"] == []
    assert "llama_cpp_python" in m.tools and "gguf" in m.tools
    p = m.parity["metrics"]
    assert m.parity["passed"] and p["greedy_match"] == 1.0 and p["tokens_match"] == 1.0
    assert p["vision_max_abs"] < 2e-3 and p["verbalizer_top1"] == 1.0
    assert not any(x.name.startswith(".") for x in f32.parent.iterdir())  # no temporary folders left


def test_mmproj_reads_back(f32, tiny_ckpt):
    from vlsi.checkpoint import load_checkpoint

    ck = load_checkpoint(tiny_ckpt)
    vc = ck.model.config.vision_config
    r = gguf.GGUFReader(str(f32 / "mmproj-f32.gguf"))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "clip" and field("clip.projector_type") == "qwen2vl_merger"
    assert field("clip.vision.block_count") == vc.depth and field("clip.vision.embedding_length") == vc.embed_dim
    assert field("clip.vision.projection_dim") == ck.model.config.get_text_config().hidden_size
    assert np.allclose(field("clip.vision.image_mean"), ck.image_processor.image_mean)
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    state = ck.model.state_dict()
    qkv = state["model.visual.blocks.1.attn.qkv.weight"].numpy()
    e = vc.embed_dim
    for i, part in enumerate("qkv"):  # the fused projection is cut in thirds, q first
        np.testing.assert_array_equal(t[f"v.blk.1.attn_{part}.weight"].reshape(e, e), qkv[i * e:(i + 1) * e])
    patch = state["model.visual.patch_embed.proj.weight"].numpy()
    np.testing.assert_array_equal(t["v.patch_embd.weight"].reshape(patch[:, :, 0].shape), patch[:, :, 0])
    np.testing.assert_array_equal(t["v.patch_embd.weight.1"].reshape(patch[:, :, 1].shape), patch[:, :, 1])
    assert {"mm.0.weight", "mm.2.weight", "v.post_ln.weight", "v.blk.0.ffn_up.weight"} <= set(t)


def test_matches_torch(pair):
    ref, rt = pair
    assert rt.name == "gguf" and rt.verbalizer_layers == (1, 3, 5)
    for images, prompt in [([_img(0)], "what colour is the star?"), ([_img(1), _img(2)], "compare <image> and <image>"),
                           ([], "no image here")]:
        assert ref.encode(images, prompt).ids == rt.encode(images, prompt).ids
        a = ref.logits(images, prompt, continuation=[10, 20, 30])
        b = rt.logits(images, prompt, continuation=[10, 20, 30])
        assert len(a) == len(b) == 4
        for x, y in zip(a, b):
            for k in ("final", 1, 3, 5):
                assert np.abs(x[k] - y[k]).max() <= TOLERANCES["f32"]["logits_max_abs"][1], (prompt, k)
                assert np.argmax(x[k]) == np.argmax(y[k])
        assert ref.generate(images, prompt, max_new_tokens=6) == rt.generate(images, prompt, max_new_tokens=6)
    assert ref.verbalize([_img(3)], "what shape?", 4) == rt.verbalize([_img(3)], "what shape?", 4)


def test_image_embeddings_match_torch(pair):
    ref, rt = pair
    for im in (_img(4), _img(5, size=140)):
        a, b = ref.image_embeds([im]), rt.image_embeds([im])
        assert a.shape == b.shape
        assert np.abs(a - b).max() < 2e-3
    both = [_img(4), _img(5, size=140)]
    assert np.abs(ref.image_embeds(both) - rt.image_embeds(both)).max() < 2e-3


def test_tokenisation_matches_the_hf_tokenizer(pair):
    ref, rt = pair
    tok = ref.ck.tokenizer
    texts = ["what colour is the star?", "  two  spaces\tand a tab\nnew line", "<|im_start|>user\nhi<|im_end|>\n",
             "café naïve — 東京 🙂 ünïcödé", "<|vision_start|><|image_pad|><|vision_end|>", "1234567 + 89 = ?"]
    for text in texts:
        assert rt.tokenize(text) == tok.encode(text, add_special_tokens=False).ids, text
    for ids in ([5, 6, 7, 8], tok.encode(texts[3], add_special_tokens=False).ids):
        assert rt.decode(ids) == tok.decode(ids, skip_special_tokens=True)


def test_quantised_types_and_fallbacks_are_recorded(tiny_ckpt, tmp_path):
    """hidden 96 fits Q8_0's 32-wide blocks but not the K-quants' 256: the manifest says what
    llama.cpp actually wrote instead of pretending every tensor is Q4_K."""
    from vlsi_export.gguf_target import written_types

    out = tmp_path / "q4km"
    with pytest.warns(UserWarning, match="q4_k_m: llama.cpp wrote .* in another type"):
        get_target("gguf")(tiny_ckpt, out, quant="q4_k_m", validate=False)
    m = load_manifest(out)
    on_disk = written_types(out / "model-q4_k_m.gguf")
    assert m.graph("text").details["tensor_types"] == on_disk["tensors"] and m.graph("text").details["types"] == on_disk["counts"]
    assert "Q5_0" in on_disk["counts"]  # Q4_K's fallback for rows of 96
    assert "blk.0.attn_q.weight: Q5_0" in m.graph("text").details["fallbacks"]
    assert sorted(m.graph("text").details["fallbacks"]) == sorted(f"{k}: {v}" for k, v in on_disk["tensors"].items()
                                                     if v not in ("Q4_K", "Q6_K", "F32"))
    assert 4 < m.graph("text").details["bits_per_weight"] < 16
    rt = vlsi_runtimes.load(out)
    assert rt.generate([_img(0)], "what colour?", max_new_tokens=3)

    out = tmp_path / "q8"  # Q8_0 fits: no fallbacks; the mmproj can be Q8_0 too where rows fit
    get_target("gguf")(tiny_ckpt, out, quant="q8_0", mmproj_quant="q8_0", validate=False)
    m = load_manifest(out)
    assert m.graph("text").details["types"].keys() == {"Q8_0", "F32"} and m.graph("text").details["fallbacks"] == []
    assert m.graph("mmproj").details["types"].get("Q8_0", 0) > 0
    assert vlsi_runtimes.load(out).generate([_img(0)], "what colour?", max_new_tokens=3)


def test_failed_parity_refuses_the_export(tiny_ckpt, tmp_path):
    """The untrained verbalizers' near-flat distributions flip under Q8_0: refused, no artifact."""
    with pytest.raises(ParityError, match="verbalizer_top1 = .* needs >= 0.95"):
        get_target("gguf")(tiny_ckpt, tmp_path / "q8", quant="q8_0", verbalizers=True, parity_samples=4)
    assert not (tmp_path / "q8").exists()
    assert json.loads((tmp_path / "q8.parity-failed" / "parity.json").read_text())["passed"] is False


def test_refusals(tiny_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="--quant 'int4' is not one of f32, f16, q8_0.*target gguf"):
        get_target("gguf")(tiny_ckpt, tmp_path / "a", quant="int4")
    with pytest.raises(ConfigError, match="--mmproj-quant 'q4_0'"):
        get_target("gguf")(tiny_ckpt, tmp_path / "a", mmproj_quant="q4_0")
    from vlsi.tiny import save_tiny

    path = tmp_path / "llava"
    save_tiny(path, arch="llava_onevision", size="student", seed=0)
    with pytest.raises(UnsupportedArchitectureError,
                       match="gguf target does not take 'llava_onevision'.*LLaVA-OneVision.*--target onnx.*"
                             "takes: qwen2_5_vl, qwen2_vl"):
        get_target("gguf")(path, tmp_path / "b")
    path = tmp_path / "q25"  # llama.cpp's clip fixes Qwen2.5-VL's attention window at 112 pixels
    save_tiny(path, arch="qwen2_5_vl", size="student", seed=0)
    with pytest.raises(UnsupportedArchitectureError, match="window_size 56"):
        get_target("gguf")(path, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_qwen25_vl_runs_on_llama_cpp(tmp_path):
    """A Qwen2.5-VL student with llama.cpp's 112-pixel window: SwiGLU + RMSNorm vision tower,
    window attention, the qwen2.5vl_merger projector; parity-gated like any export."""
    from vlsi.tiny import save_tiny

    path = tmp_path / "q25"
    save_tiny(path, arch="qwen2_5_vl", size="student", seed=0)
    cfg = json.loads((path / "config.json").read_text())
    cfg["vision_config"]["window_size"] = 112
    (path / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "g"
    get_target("gguf")(path, out, quant="f32", mmproj_quant="f32", parity_samples=3)
    r = gguf.GGUFReader(str(out / "mmproj-f32.gguf"))
    assert r.fields["clip.projector_type"].contents() == "qwen2.5vl_merger"
    assert r.fields["clip.use_silu"].contents() is True
    ref, rt = vlsi_runtimes.load(path), vlsi_runtimes.load(out)
    im = _img(7, size=224)  # 16x16 patches: several windows
    a = ref.logits([im], "what is it?")[0]["final"]
    b = rt.logits([im], "what is it?")[0]["final"]
    assert np.abs(a - b).max() < 2e-2


def test_bad_files_are_named(f32, tiny_ckpt, tmp_path):
    bad = tmp_path / "a"
    shutil.copytree(f32, bad)
    f = bad / "model-f32.gguf"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(ArtifactError, match="model-f32.gguf.*truncated"):
        vlsi_runtimes.load(bad)
    shutil.rmtree(bad)
    shutil.copytree(f32, bad)
    (bad / "mmproj-f32.gguf").unlink()
    with pytest.raises(ArtifactError, match="mmproj-f32.gguf.*missing"):
        vlsi_runtimes.load(bad)
    # a truncated file whose manifest was rewritten to match: llama.cpp itself refuses it, named
    shutil.rmtree(bad)
    shutil.copytree(f32, bad)
    f = bad / "model-f32.gguf"
    f.write_bytes(f.read_bytes()[:5000])
    m = json.loads((bad / "manifest.json").read_text())
    write_manifest(bad, Manifest.from_dict(m))
    with pytest.raises(ArtifactError, match="could not load .*model-f32.gguf"):
        vlsi_runtimes.load(bad)
    # a projector from another model (a different text width) next to this text model
    from vlsi.tiny import save_tiny

    other = tmp_path / "other"
    save_tiny(other, arch="qwen2_vl", size="teacher", seed=0)
    get_target("gguf")(other, tmp_path / "og", quant="f32", mmproj_quant="f32", validate=False)
    shutil.rmtree(bad)
    shutil.copytree(f32, bad)
    shutil.copyfile(tmp_path / "og" / "mmproj-f32.gguf", bad / "mmproj-f32.gguf")
    write_manifest(bad, Manifest.from_dict(m))
    with pytest.raises(ArtifactError, match="not the projector made for this text model"):
        vlsi_runtimes.load(bad)


def test_llama_cpp_chat_api_gives_the_same_answer(f32, tiny_ckpt):
    """llama-cpp-python's own high-level API (``Llama`` + the multimodal chat handler, which
    renders the chat template stored in our GGUF) answers like the PyTorch model."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    m = load_manifest(f32)
    png = _png(_img(8))
    handler = MTMDChatHandler(clip_model_path=str(f32 / m.graph("mmproj").file), verbose=False)
    llm = Llama(model_path=str(f32 / m.graph("text").file), chat_handler=handler, n_ctx=1024, n_threads=2, verbose=False)
    question = "what colour is the star?"
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    # vlsi's layout puts a newline between the image and the question (the LLaVA convention)
    out = llm.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "\n" + question}]}],
        temperature=0.0, max_tokens=8)
    want = vlsi_runtimes.load(tiny_ckpt).generate([png], question, max_new_tokens=8)
    assert out["choices"][0]["message"]["content"] == want
    assert llm.metadata["general.architecture"] == "qwen2vl"


def test_backend_imports_neither_torch_nor_transformers(f32):
    code = f"""
import sys
sys.modules['torch'] = None
sys.modules['transformers'] = None
import vlsi_runtimes
rt = vlsi_runtimes.load({str(f32)!r})
print(rt.generate([{_png(_img(5))!r}], 'what colour?', max_new_tokens=3))
print(sorted(rt.verbalize([], 'hi', 2), key=str))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_streaming_and_stop(pair):
    _, rt = pair
    gen = rt.generate([_img(0)], "what colour?", max_new_tokens=5, stream=True)
    pieces = list(gen)
    assert "".join(pieces) == gen.text and gen.completion_tokens <= 5 and gen.finish_reason in ("stop", "length")
    assert gen.prompt_tokens == len(rt.encode([_img(0)], "what colour?").ids)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        rt.generate([_img(0)], "x", max_new_tokens=0)


def test_bench_has_the_llama_cpp_backend(f32, tiny_ckpt, tmp_path):
    from click.testing import CliRunner

    from vlsi_cli import main

    res = CliRunner().invoke(main, ["bench", str(f32), "--reference", str(tiny_ckpt), "--runs", "1", "--threads", "2",
                                    "--new-tokens", "4", "--prompt-tokens", "40", "--out", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [(r["backend"], r["precision"]) for r in rows] == [("torch", "fp32"), ("gguf", "f32")]
    g = rows[1]
    assert g["decode_tok_s"] > 0 and g["vision_s"] > 0 and g["roofline_tok_s"] > 0
    assert g["engine_decode_tok_s"] > 0 and g["x_engine_rounds"] == [g["x_engine"]]
    assert g["x_engine"] == pytest.approx(g["paired_decode_tok_s"] / g["engine_decode_tok_s"])
    assert g["engine"] == "Llama" and "vlsi / engine" in res.output
    # the weights a decode step reads: the text file's tensors without the (untied) embedding rows
    r = gguf.GGUFReader(str(f32 / "model-f32.gguf"))
    assert g["weights_mb"] * 2**20 == pytest.approx(sum(int(t.n_bytes) for t in r.tensors if t.name != "token_embd.weight"))


def test_served_on_the_gguf_backend(f32, tmp_path):
    """`vlsi serve ART --backend gguf` with the openai client: the same answers and per-layer
    verbalizations as the llama.cpp runtime called directly."""
    openai = pytest.importorskip("openai", reason="the dev extra is not installed")
    pytest.importorskip("starlette", reason="the app extra is not installed")
    from tests.test_serve import _user, start_server, stop_server

    png, q = _png(_img(9)), "what colour is the shape?"
    rt = vlsi_runtimes.load(f32)
    want = rt.generate([png], q, max_new_tokens=12)
    layers = rt.verbalize([png], q, 32)
    url, proc = start_server(f32, tmp_path / "log", "--backend", "gguf", "--name", "g")
    try:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="g", messages=_user(png, q), max_tokens=12, temperature=0,
                                      extra_body={"verbalize": True})
        assert r.choices[0].message.content == want
        assert r.model_extra["vlsi"]["backend"] == "gguf"
        assert r.model_extra["verbalizations"] == {f"layer_{k}": layers[k] for k in rt.verbalizer_layers}
        chunks = list(c.chat.completions.create(model="g", messages=_user(png, q), max_tokens=12, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    finally:
        stop_server(proc)


@pytest.mark.parametrize("arch,sizes", [("verb_ffn", "paper"), ("ffn", "paper"), ("ffn", "legacy"),
                                        ("mlp", "paper"), ("mlp", "legacy"), ("decoder_block", "legacy")])
def test_verbalizer_sidecar_heads_match_torch(arch, sizes, tmp_path):
    """The numpy heads the llama.cpp backend applies equal the torch heads, for every variant
    the sidecar takes at both sizes (the paper's and the legacy stand-ins old checkpoints hold);
    decoder-block heads (attention over the sequence) are refused."""
    import types

    import torch

    from vlsi_runtimes.llama_backend import NumpyVerbalizers
    from vlsi.verbalizer import VerbalizerConfig, Verbalizers
    from vlsi_export.gguf_target import write_verbalizers_gguf

    torch.manual_seed(0)
    cfg = VerbalizerConfig(target_layers=(1, 3), arch=arch, depth=2, ffn_mult=2, sizes=sizes)
    v = Verbalizers(cfg, 32, 4, 1e-6, intermediate_size=48)
    with torch.no_grad():
        for p in v.parameters():
            p.normal_(0, 0.2)
    ck = types.SimpleNamespace(verbalizers=v)
    if arch == "decoder_block":
        with pytest.raises(UnsupportedArchitectureError, match="decoder-block heads"):
            write_verbalizers_gguf(ck, tmp_path / "v.gguf")
        return
    assert write_verbalizers_gguf(ck, tmp_path / "v.gguf") == [1, 3]
    out = torch.randn(50, 32)
    heads = NumpyVerbalizers(tmp_path / "v.gguf", out.numpy())  # anything with W @ h: an array, an OutputMatrix
    h = torch.randn(32)
    for layer in (1, 3):
        with torch.no_grad():
            want = out @ v.heads[str(layer)](h[None, None])[0, 0]
        np.testing.assert_allclose(heads.logits(layer, h.numpy()), want.numpy(), rtol=1e-4, atol=1e-4)


def test_plain_decoding_never_reads_the_output_matrix(f32):
    """With verbalizers kept, generate() leaves the output matrix unread (nothing allocated for it)
    and keeps no layer's state (the eval callback looks at no node); the first verbalization
    reads it, and from an f32 file without a copy (the file's mapped pages)."""
    rt = vlsi_runtimes.load(f32)
    assert rt.verbalizer_layers == (1, 3, 5) and rt.output_matrix.rows is None
    import types

    seen, lib = [], rt._g
    rt._g = types.SimpleNamespace(ggml_get_name=lambda t: (seen.append(1), lib.ggml_get_name(t))[1],
                                  ggml_nbytes=lib.ggml_nbytes, ggml_backend_tensor_get=lib.ggml_backend_tensor_get)
    rt.generate([_img(0)], "describe", max_new_tokens=6)
    # decoding from the model's head: the eval callback answers llama.cpp's question about
    # every graph node at once, looking at nothing, and keeps no layer's state
    assert not seen and not rt._hidden
    rt.capture_layers = False  # a pass as plain decoding makes it: a layer's logits cannot be read from it
    _, plain = rt._prefill(rt.encode([_img(0)], "describe"))
    rt.capture_layers = True
    with pytest.raises(RuntimeError, match="capture_layers"):
        plain[1]
    logits = rt.logits([_img(0)], "describe")[0]
    assert seen and set(rt._hidden) == {1, 3, 5}
    assert set(logits) == {"final", 1, 3, 5} and rt.output_matrix.rows is None  # keys compute nothing
    rt.verbalize([_img(0)], "describe", 2, final=False)
    rows = rt.output_matrix.rows
    assert rows is not None and rows.dtype == np.float32 and not rows.flags.owndata


def test_a_quantised_output_matrix_is_kept_in_f16_and_multiplied_in_blocks(tmp_path):
    from gguf.quants import dequantize, quantize

    from vlsi_runtimes.llama_backend import OutputMatrix

    rng = np.random.default_rng(0)
    q8 = gguf.GGMLQuantizationType.Q8_0
    q = quantize(rng.standard_normal((1000, 64)).astype(np.float32), q8)
    w = gguf.GGUFWriter(str(tmp_path / "o.gguf"), "qwen2")
    w.add_tensor("output.weight", q, raw_dtype=q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = OutputMatrix(tmp_path / "o.gguf", 1000, 64, rows_per_block=300)  # blocks that do not divide the rows
    h = rng.standard_normal(64).astype(np.float32)
    want = dequantize(q, q8) @ h
    got = out @ h
    assert out.rows.dtype == np.float16 and got.dtype == np.float32 and got.shape == (1000,)
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()  # f16 rounding of the dequantised weights
