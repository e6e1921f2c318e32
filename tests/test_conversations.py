"""Chat messages through every backend, and prefix reuse.

* The token ids of a conversation (system prompt, several turns, images in any user turn) are
  the same on the PyTorch, ONNX Runtime and llama.cpp backends, and equal transformers' own
  rendering of the chat template stored in the checkpoint.
* A follow-up reuses the KV cache of the conversation the runtime last served: the image is not
  encoded again, only the new tokens are prefilled, and the greedy answers equal those of a
  fresh prefill, token for token, on ONNX Runtime and llama.cpp (torch: test_prefix_reuse_torch).
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

import vlsi_runtimes  # noqa: E402
from vlsi.errors import ConfigError  # noqa: E402

from .conftest import train_briefly  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(synth_data, tmp_path_factory):
    return train_briefly("qwen2_vl", synth_data, tmp_path_factory.mktemp("conv"))


@pytest.fixture(scope="module")
def images(synth_data):
    """Two synthetic test images (the model was trained on such pictures) as files."""
    paths = sorted((synth_data / "images").glob("test_*.png")) or sorted((synth_data / "images").glob("*.png"))
    assert len(paths) >= 2
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def backends(trained, tmp_path_factory):
    from vlsi_export import get_target

    root = tmp_path_factory.mktemp("conv-art")
    onnx = get_target("onnx")(trained, root / "onnx", verbalizers=True, parity_samples=2)
    out = {"torch": vlsi_runtimes.load(trained), "onnx": vlsi_runtimes.load(onnx)}
    # the gguf extra is part of `make test`: a missing llama_cpp fails here, not skips
    gg = get_target("gguf")(trained, root / "gguf", quant="f32", mmproj_quant="f32", verbalizers=True, parity_samples=2)
    out["gguf"] = vlsi_runtimes.load(gg, parity=True)
    return out


def _data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _conversations(a, b):
    img_a = {"type": "image_url", "image_url": {"url": _data_uri(a)}}
    return {
        "one turn": [{"role": "user", "content": [img_a, {"type": "text", "text": "What colour is the shape?"}]}],
        "system and turns": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [img_a, {"type": "text", "text": "What colour is the shape?"}]},
            {"role": "assistant", "content": "red."},
            {"role": "user", "content": "And its shape?"}],
        "image in a later turn": [
            {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "image": str(b)},
                                         {"type": "text", "text": "how many shapes?"}]}],
        "two images": [
            {"role": "developer", "content": "Compare."},
            {"role": "user", "content": [img_a, {"type": "image", "image": str(b)}, {"type": "text", "text": "same?"}]}],
    }


def _for_transformers(messages):
    """The same messages as transformers' processors take them (image parts without payload)."""
    out = []
    for m in messages:
        c = m["content"]
        if isinstance(c, list):
            c = [{"type": "image"} if p["type"] in ("image", "image_url") else p for p in c]
        out.append({**m, "content": c})
    return out


def test_ids_equal_transformers_rendering_on_every_backend(backends, trained, images):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(trained))
    for name, messages in _conversations(*images).items():
        text = hf.apply_chat_template(_for_transformers(messages), add_generation_prompt=True, tokenize=False)
        ref = backends["onnx"].encode(messages)
        counts = iter(n for _, n in ref.spans)
        text = "".join(piece + ("<|image_pad|>" * next(counts) if k < text.count("<|image_pad|>") else "")
                       for k, piece in enumerate(text.split("<|image_pad|>")))
        want = hf(text, add_special_tokens=False).input_ids
        for backend, rt in backends.items():
            assert rt.encode(messages).ids == want, (name, backend)


@pytest.mark.parametrize("backend", ["onnx", "gguf"])
def test_follow_up_reuses_the_image_and_answers_as_a_fresh_prefill(backends, images, backend):
    rt = backends[backend]
    a, _ = images
    first = _conversations(a, a)["one turn"]
    answer = rt.generate(first, max_new_tokens=12)
    follow = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And its shape?"}]
    gen = rt.generate(follow, max_new_tokens=12, stream=True)
    reused = "".join(gen)
    prompt = rt.encode(follow)
    (start, n_image), = prompt.spans
    assert gen.cached_tokens >= start + n_image and gen.prompt_tokens == len(prompt.ids)
    rt.forget()
    fresh_tokens = list(rt.stream_tokens(follow, None, 12, reuse=False))
    rt.generate(first, max_new_tokens=12)  # cache the first turn again
    assert list(rt.stream_tokens(follow, None, 12)) == fresh_tokens
    assert reused == rt.decode(fresh_tokens)
    # the next-token logits after a resume equal a fresh prefill's (every head)
    rt.generate(first, max_new_tokens=12)
    state, resumed, cached = rt._start(prompt)
    assert cached > 0
    full = rt.logits(follow)[0]
    for k, v in full.items():
        np.testing.assert_allclose(resumed[k], v, atol=2e-3, rtol=0, err_msg=f"{backend} head {k}")
    # and the torch reference gives the same answer to the whole conversation
    assert reused == backends["torch"].generate(follow, max_new_tokens=12, reuse=False)


def test_a_text_follow_up_is_fed_the_whole_prompts_positions(backends, images):
    """A follow-up of text only takes its positions from the kept prefix's largest one, without
    the whole prompt's M-RoPE; they equal the whole prompt's, after an answer and after an answer
    cut short, and a follow-up with a new image still computes them whole."""
    rt = backends["onnx"]
    a, b = images
    fed = []
    forward = rt._forward
    rt._forward = lambda state, embeds, pos: fed.append(np.array(pos)) or forward(state, embeds, pos)
    try:
        first = _conversations(a, a)["one turn"]
        for answer_tokens in (12, 3):
            answer = rt.generate(first, max_new_tokens=answer_tokens)
            for turn in ("And its shape?", [{"type": "image", "image": str(b)}, {"type": "text", "text": "and this?"}]):
                follow = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": turn}]
                rt.generate(first, max_new_tokens=answer_tokens)
                fed.clear()
                gen = rt.generate(follow, max_new_tokens=2, stream=True)
                "".join(gen)
                prompt = rt.encode(follow)
                whole = rt.spec.positions(np.array([prompt.ids]), prompt.images, rt.model)
                assert gen.cached_tokens > 0
                assert np.array_equal(fed[0], whole[..., gen.cached_tokens:]), (answer_tokens, turn)
                assert fed[1].ravel().tolist() == [int(whole.max()) + 1] * whole.shape[0]  # decoding goes on from there
    finally:
        rt._forward = forward


def test_text_positions_continue_every_architectures_scheme():
    """The continuation rule the runtimes use is each spec's own: 1-D positions go on by one, as
    the spec's whole-prompt positions do."""
    from vlsi.archs import get_spec

    spec = get_spec("llava_onevision")
    ids = np.arange(20)[None]
    whole = spec.positions(ids, None, {})
    assert np.array_equal(spec.text_positions(int(whole[..., :7].max()) + 1, 13), whole[..., 7:])


def test_only_new_images_are_encoded(backends, images):
    rt = backends["onnx"]
    a, b = images
    first = _conversations(a, b)["one turn"]
    answer = rt.generate(first, max_new_tokens=8)
    calls = []
    vision = rt._vision
    rt._vision = lambda v: calls.append(list(v.tokens)) or vision(v)
    try:
        follow = [*first, {"role": "assistant", "content": answer},
                  {"role": "user", "content": [{"type": "image", "image": str(b)}, {"type": "text", "text": "and this?"}]}]
        reused = rt.generate(follow, max_new_tokens=8)
        assert len(calls) == 1 and len(calls[0]) == 1  # the second image only
        calls.clear()
        rt.forget()
        assert rt.generate(follow, max_new_tokens=8, reuse=False) == reused
        assert len(calls) == 1 and len(calls[0]) == 2  # both, without reuse
        # another image in the first turn: reuse stops before it, both images are encoded again
        other = [{"role": "user", "content": [{"type": "image", "image": str(b)},
                                              {"type": "text", "text": "What colour is the shape?"}]}]
        calls.clear()
        gen = rt.generate(other, max_new_tokens=8, stream=True)
        text = "".join(gen)
        assert calls == [[rt.encode(other).spans[0][1]]] and gen.cached_tokens <= rt.encode(other).spans[0][0]
        rt.forget()
        assert rt.generate(other, max_new_tokens=8, reuse=False) == text
    finally:
        rt._vision = vision


@pytest.mark.parametrize("backend", ["onnx", "gguf"])
def test_an_answer_cut_short_then_a_follow_up(backends, images, backend):
    rt = backends[backend]
    a, _ = images
    first = _conversations(a, a)["one turn"]
    short = rt.generate(first, max_new_tokens=2)  # stopped by length inside the answer
    follow = [*first, {"role": "assistant", "content": short}, {"role": "user", "content": "Say more."}]
    with_reuse = list(rt.stream_tokens(follow, None, 10))
    rt.forget()
    assert with_reuse == list(rt.stream_tokens(follow, None, 10, reuse=False))
    stopped = rt.generate(first, max_new_tokens=12, stop=[" "])  # a stop string ends the stream early
    follow = [*first, {"role": "assistant", "content": stopped}, {"role": "user", "content": "Say more."}]
    with_reuse = list(rt.stream_tokens(follow, None, 10))
    rt.forget()
    assert with_reuse == list(rt.stream_tokens(follow, None, 10, reuse=False))


@pytest.mark.parametrize("messages, needle, param", [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "must end with", "messages[1].role"),
    ([{"role": "tool", "content": "x"}], "must be one of", "messages[0].role"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "image": "x.png"}]},
      {"role": "user", "content": "b"}], "only user messages may hold images", "messages[1].content[0]"),
    ([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], "'text', 'image_url' or 'image'",
     "messages[0].content[0].type"),
    ([{"role": "user", "content": "look at <image>"}], "send images as image parts", "messages[0].content"),
    ([{"role": "user", "content": 5}], "string or a list of parts", "messages[0].content"),
])
def test_bad_conversations_name_the_field(backends, messages, needle, param):
    from vlsi.chat import MessageError

    for rt in backends.values():
        with pytest.raises(MessageError, match=needle) as e:
            rt.generate(messages, max_new_tokens=2)
        assert e.value.param == param and isinstance(e.value, ConfigError)


def test_messages_or_the_one_turn_shortcut(backends, images):
    from PIL import Image

    a, _ = images
    rt = backends["onnx"]
    shortcut = rt.encode([Image.open(a)], "What colour is the shape?").ids
    assert rt.encode(_conversations(a, a)["one turn"]).ids == shortcut
    with pytest.raises(ConfigError, match="not both"):
        rt.encode(_conversations(a, a)["one turn"], "and?")
