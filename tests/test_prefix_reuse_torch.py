"""Prefix reuse on the PyTorch backend (``TorchRuntime._resume``, ``VerbalizerTap.truncate/extend``):
a follow-up prompt that starts like the last decoded sequence prefills only its new part, and
decodes exactly as a fresh full prefill of the whole prompt does, for every architecture the
backend serves.

The models are tiny students with verbalizers on layers 1, 3 and 5, built untrained (seconds)
so that the file runs in about a minute on 2 cores; ``VLSI_REUSE_TRAINED=1`` runs it on
briefly trained ones instead (``conftest.train_briefly``: peaked logits, several minutes per
architecture). Untrained logits are flat, but what the greedy comparisons need is margin
against the resumed-vs-full difference, not peakedness: that difference is float32 summation
order (~2e-7 untrained, ~1e-6 trained, in logits), while the closest top-2 gaps seen over
these conversations are ~1e-3. Heads whose last projection is zero-initialised would read
like the logit lens and attend to nothing; the untrained heads here get small random weights.
"""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest

import vlsi_runtimes

ARCHS = ["qwen2_vl", "llava_onevision"]
ALL = [*ARCHS, "qwen2_5_vl"]  # Qwen2.5-VL (Qwen2-VL's decoder and positions, another ViT): the main paths only
NEW = 12  # tokens compared per answer (ignore_eos: past an early end of sequence too)
FIRST = 6  # tokens of the first answer

# Resumed vs full-prefill logits differ by float32 summation order only: observed max |diff|
# 2e-7 (untrained) to 1e-6 (trained, logits up to ~4). A suffix one position off moves them by
# 6e-4 (untrained) to 3e-3..3e-2 (trained), so this bound sits >10x above the noise and >10x
# below the smallest real error.
ATOL, RTOL = 2e-5, 1e-5


class Setup:
    """A runtime whose vision path counts the images it encodes (``calls``: images per call)."""

    def __init__(self, arch, rt, images):
        self.arch, self.rt, self.images = arch, rt, images
        self.calls: list[int] = []
        inner = rt.model.model
        original = inner.get_image_features

        def counting(*args, **kw):  # Qwen2-VL: (pixel_values, image_grid_thw); LLaVA-OV: (pixel_values, image_sizes)
            second = args[1] if len(args) > 1 else kw.get("image_grid_thw", kw.get("image_sizes"))
            self.calls.append(len(second))
            return original(*args, **kw)

        inner.get_image_features = counting  # the model's forward and adapter.image_features both come here


def _randomise_heads(verbalizers, seed: int = 0):
    """Small random weights in the heads' zero-initialised last projections."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in verbalizers.named_parameters():
            if name.endswith(("down.weight", "out.weight", "fc2.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((84, 84, 3)) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def s(request, tmp_path_factory):
    """Tests pick the architectures with ``@pytest.mark.parametrize("s", ARCHS, indirect=True)``."""
    import torch

    torch.set_num_threads(2)
    arch = request.param
    root = tmp_path_factory.mktemp(f"reuse-{arch}")
    if os.environ.get("VLSI_REUSE_TRAINED"):
        from .conftest import train_briefly

        path = train_briefly(arch, request.getfixturevalue("synth_data"), root)
    else:
        from vlsi.tiny import save_tiny

        seed = {"llava_onevision": 3}.get(arch, 0)  # seed 0's LLaVA-OV answers a special token only: no text
        path = save_tiny(root / "student", arch=arch, size="student", seed=seed, verbalizer_layers="1::2")
    rt = vlsi_runtimes.load(path, backend="torch")
    if not os.environ.get("VLSI_REUSE_TRAINED"):
        _randomise_heads(rt.ck.verbalizers)
    images = []
    for k in range(3):
        f = root / f"image{k}.png"
        f.write_bytes(_png(k))
        images.append(str(f))
    return Setup(arch, rt, images)


def user(text, *images):
    return {"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                        {"type": "text", "text": text}]}


def data_url(path) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def follow(s, first, then, first_kw=None):
    """Answer ``first`` (the runtime keeps that sequence), append the answer and ``then``, and
    answer that with reuse and with a fresh full prefill; they must agree token for token.
    -> (messages, cached positions, images encoded by the reusing answer)."""
    rt = s.rt
    rt.forget()
    answer = rt.generate(first, **{"max_new_tokens": FIRST, **(first_kw or {})})
    messages = [*first, {"role": "assistant", "content": answer}, *then]
    s.calls.clear()
    stats: dict = {}
    got = list(rt.stream_tokens(messages, None, NEW, ignore_eos=True, stats=stats))
    encoded = list(s.calls)
    entry = rt._entry
    assert entry is not None and entry.state.length() == len(entry.keys)  # one position per key
    want = list(rt.stream_tokens(messages, None, NEW, ignore_eos=True, reuse=False))
    assert got == want
    return messages, stats["cached_tokens"], encoded


def image_spans(s, messages):
    return s.rt.encode(messages).spans


# --------------------------------------------------------------------------- conversations


@pytest.mark.parametrize("s", ALL, indirect=True)
def test_a_follow_up_reuses_the_image(s):
    """The image as a path; the answer token for token equal to a full prefill's."""
    first = [user("what would the missing image look like?", s.images[0])]
    messages, cached, encoded = follow(s, first, [user("and what colour is it?")])
    (start, count), = image_spans(s, messages)
    assert cached >= start + count and encoded == []


@pytest.mark.parametrize("s", ARCHS, indirect=True)
def test_a_follow_up_through_generate_stream(s):
    """The image as an OpenAI data URL; ``generate(stream=True)`` counts the reused positions."""
    rt = s.rt
    part = {"type": "image_url", "image_url": {"url": data_url(s.images[0])}}
    first = [{"role": "user", "content": [part, {"type": "text", "text": "what would the missing image look like?"}]}]
    rt.forget()
    answer = rt.generate(first, max_new_tokens=FIRST)
    messages = [*first, {"role": "assistant", "content": answer}, user("and what colour is it?")]
    s.calls.clear()
    gen = rt.generate(messages, max_new_tokens=NEW, stream=True)
    text = "".join(gen)
    (start, count), = image_spans(s, messages)
    assert gen.cached_tokens >= start + count and s.calls == []
    assert gen.prompt_tokens == len(rt.encode(messages).ids)
    assert text == rt.generate(messages, max_new_tokens=NEW, reuse=False)


@pytest.mark.parametrize("s", ALL, indirect=True)
@pytest.mark.parametrize("case", ["follow_up", "edited_question"])
def test_resumed_logits_match_a_full_prefill(s, case):
    """After a resume, and after each step fed after it: ``final`` and every verbalizer layer
    equal a full prefill's within float32 summation noise. ``edited_question`` keeps fewer
    positions than the cached sequence holds (the cache is cut back)."""
    rt = s.rt
    first = [user("what would the missing image look like?", s.images[0])]
    rt.forget()
    answer = rt.generate(first, max_new_tokens=FIRST)
    if case == "follow_up":
        messages = [*first, {"role": "assistant", "content": answer}, user("and what colour is it?")]
    else:
        messages = [user("what colour is the missing image?", s.images[0])]
    prompt = rt.encode(messages)
    held = rt._entry.state.length()
    state, logits, cached = rt._start(prompt)
    (start, count), = prompt.spans
    assert start + count <= cached < len(prompt.ids)
    if case == "edited_question":
        assert cached < held  # the cache, mask and positions were cut back
    fed = [int(np.argmax(logits["final"]))]
    resumed = [logits]
    for _ in range(3):
        resumed.append(rt._step(state, fed[-1]))
        fed.append(int(np.argmax(resumed[-1]["final"])))
    full = rt.logits(messages, None, fed[:-1])
    for got, want in zip(resumed, full, strict=True):
        assert set(got) == {"final", *rt.verbalizer_layers}
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=f"layer {k}")


@pytest.mark.parametrize("s", ARCHS, indirect=True)
def test_attending_heads_resume_with_their_history(s, monkeypatch):
    """``decoder_block`` heads read each layer's whole hidden history: it is cut back and
    extended with the cache (logits equal a full prefill's, also after steps)."""
    from vlsi.verbalizer import VerbalizerConfig, Verbalizers

    rt = s.rt
    heads = Verbalizers.for_model(rt.model, VerbalizerConfig(tuple(rt.verbalizer_layers), arch="decoder_block"))
    _randomise_heads(heads, seed=1)
    monkeypatch.setattr(rt.ck, "verbalizers", heads)
    rt.forget()
    try:
        first = [user("what would the missing image look like?", s.images[0])]
        rt.generate(first, max_new_tokens=FIRST)
        messages = [user("what colour is the missing image?", s.images[0])]
        prompt = rt.encode(messages)
        held = rt._entry.state.length()
        state, logits, cached = rt._start(prompt)
        assert 0 < cached < held and state._attends and state._history
        resumed, fed = [logits], []
        for _ in range(2):
            fed.append(int(np.argmax(resumed[-1]["final"])))
            resumed.append(rt._step(state, fed[-1]))
        full = rt.logits(messages, None, fed)
        for got, want in zip(resumed, full, strict=True):
            for k in want:
                np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=f"layer {k}")
    finally:
        rt.forget()  # the cached tap holds these heads


@pytest.mark.parametrize("s", ARCHS, indirect=True)
def test_a_new_image_in_the_follow_up_is_the_only_one_encoded(s):
    first = [user("what would the missing image look like?", s.images[0])]
    messages, cached, encoded = follow(s, first, [user("and this one?", s.images[1])])
    (a_start, a_count), (b_start, _) = image_spans(s, messages)
    if s.arch == "llava_onevision":
        # a lone image is tiled, one of several is not: the first image's cached encoding is
        # not this prompt's, so the reuse stops before it and both are encoded
        assert cached <= a_start and encoded == [2]
    else:
        assert a_start + a_count <= cached <= b_start and encoded == [1]


@pytest.mark.parametrize("s", ARCHS, indirect=True)
def test_a_third_image_after_two(s):
    first = [user("compare them", s.images[0], s.images[1])]
    messages, cached, encoded = follow(s, first, [user("and this one?", s.images[2])])
    spans = image_spans(s, messages)
    assert spans[1][0] + spans[1][1] <= cached <= spans[2][0]
    # LLaVA-OV preprocesses a lone image otherwise than one of several (the adapter has no way
    # to say "one of three"), so the backend encodes all three as the full prefill does and
    # keeps the new one's features; the text prefix is still reused
    assert encoded == ([3] if s.arch == "llava_onevision" else [1])


@pytest.mark.parametrize("s", ARCHS, indirect=True)
def test_a_different_image_in_the_same_place_stops_the_reuse_before_it(s):
    rt = s.rt
    question = "what would the missing image look like?"
    rt.forget()
    answer = rt.generate([user(question, s.images[0])], max_new_tokens=FIRST)
    messages = [user(question, s.images[1]), {"role": "assistant", "content": answer}, user("and what colour is it?")]
    s.calls.clear()
    stats: dict = {}
    got = list(rt.stream_tokens(messages, None, NEW, ignore_eos=True, stats=stats))
    assert s.calls == [1]
    (start, _), = image_spans(s, messages)
    assert stats["cached_tokens"] == start
    assert got == list(rt.stream_tokens(messages, None, NEW, ignore_eos=True, reuse=False))


@pytest.mark.parametrize("s", ARCHS, indirect=True)
@pytest.mark.parametrize("how", ["max_new_tokens", "stop"])
def test_stopping_early_then_a_follow_up(s, how):
    """The first answer cut short (the last token not fed, or the stream closed at a stop
    string); the follow-up with that short answer still equals a full prefill's."""
    rt = s.rt
    first = [user("what would the missing image look like?", s.images[0])]
    if how == "max_new_tokens":
        kw = {"max_new_tokens": 2}
    else:
        kw = None
        for question in ("what would the missing image look like?", "describe the image.", "what shape is it?"):
            first = [user(question, s.images[0])]
            rt.forget()
            full = rt.generate(first, max_new_tokens=FIRST)
            stop = next((c for c in full[len(full) // 2:] if c.strip() and c != "\ufffd" and full.find(c) > 0), None)
            if stop is not None:
                kw = {"stop": [stop]}
                break
        assert kw is not None, "no answer with a character to stop at: the fixture model answers nothing"
    _, cached, encoded = follow(s, first, [user("and what colour is it?")], first_kw=kw)
    assert cached > 0 and encoded == []  # the sequence is kept also when the consumer stopped early
