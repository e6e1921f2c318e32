"""The decoding loop every backend shares (``runtimes/base.py``), on a scripted mock model:
greedy picks, end of sequence, length limits, stop strings, sampling, cancellation and
UTF-8 hold-back, with no ONNX, torch or checkpoint involved."""

from __future__ import annotations

import numpy as np
import pytest

from vlsi.errors import ConfigError
from vlsi_runtimes.base import FINAL, Prompt, Runtime

# a toy tokenizer: token id -> bytes; the last id is the end of sequence
PIECES = [b"he", b"llo", b" wor", b"ld", b"!", b"\xc3", b"\xa9", b"caf", b" ok"]
EOS = len(PIECES)
VOCAB = EOS + 1
HELLO = [0, 1, 2, 3, 4]  # "hello world!"
LAYER = 2


class Scripted(Runtime):
    """Answers ``script`` (then EOS) from its head and ``layer_script`` from verbalizer layer 2:
    each step's logits peak at the next scripted token, whatever was fed back."""

    name = "scripted"
    eos_ids = (EOS,)
    verbalizer_layers = (LAYER,)

    def __init__(self, script, layer_script=(7, 8)):
        self.script = list(script)
        self.layer_script = list(layer_script)
        self.fed: list[list[int]] = []  # tokens fed back to _step, per prefill

    @staticmethod
    def _peak(script, i) -> np.ndarray:
        row = np.full(VOCAB, -4.0, dtype=np.float32)
        row[script[i] if i < len(script) else EOS] = 4.0
        return row

    def _logits(self, i) -> dict:
        return {FINAL: self._peak(self.script, i), LAYER: self._peak(self.layer_script, i)}

    def _encode(self, turns, images):
        return Prompt(list(turns[-1].text.encode()), list(images))

    def _prefill(self, prompt):
        self.fed.append([])
        return {"i": 0, "fed": self.fed[-1]}, self._logits(0)

    def _step(self, state, token):
        state["fed"].append(token)
        state["i"] += 1
        return self._logits(state["i"])

    def decode(self, ids):
        return b"".join(PIECES[i] for i in ids if i < len(PIECES)).decode("utf-8", errors="replace")


class Fixed(Scripted):
    """The same next-token distribution at every step: ``probs`` over the first ids, EOS negligible."""

    def __init__(self, probs):
        super().__init__([])
        row = np.full(VOCAB, -1e4, dtype=np.float64)
        row[: len(probs)] = np.log(probs)
        self.row = row.astype(np.float32)

    def _logits(self, i):
        return {FINAL: self.row, LAYER: self.row}


def _stream(rt, **kw):
    gen = rt.generate([], "hi", stream=True, **kw)
    pieces = list(gen)
    return pieces, gen


def test_greedy_picks_the_argmax_and_feeds_it_back():
    rt = Scripted(HELLO)
    assert rt.generate([], "hi", max_new_tokens=10) == "hello world!"
    assert rt.fed[-1] == HELLO  # every pick was fed back (EOS is not)
    assert list(rt.stream_tokens([], "hi", 10)) == HELLO
    assert list(rt.stream_tokens([], "hi", 10, source=LAYER)) == [7, 8]
    assert rt.verbalize([], "hi", 10) == {LAYER: "caf ok", FINAL: "hello world!"}
    with pytest.raises(ConfigError, match=r"layer 3 has no verbalizer here; kept: \[2\]"):
        list(rt.stream_tokens([], "hi", 4, source=3))


def test_end_of_sequence_stops_and_is_not_emitted():
    pieces, gen = _stream(Scripted(HELLO), max_new_tokens=10)
    assert "".join(pieces) == gen.text == "hello world!"
    assert (gen.finish_reason, gen.completion_tokens, gen.prompt_tokens) == ("stop", 5, 2)
    assert list(Scripted(HELLO).stream_tokens([], "hi", 10, ignore_eos=True))[5:] == [EOS] * 5


def test_max_new_tokens_finishes_with_length():
    pieces, gen = _stream(Scripted(HELLO), max_new_tokens=3)
    assert "".join(pieces) == "hello wor"
    assert (gen.finish_reason, gen.completion_tokens) == ("length", 3)
    # exactly as many tokens as the script has: the limit is reached before EOS is read
    _, gen = _stream(Scripted(HELLO), max_new_tokens=5)
    assert (gen.text, gen.finish_reason) == ("hello world!", "length")


@pytest.mark.parametrize("stop, text", [
    (["llo"], "he"),              # the whole of token 2
    (["lo w"], "hel"),            # spans tokens 2 and 3
    (["o wo"], "hell"),           # spans tokens 2 and 3, starting inside token 2
    (["wor", "o w"], "hell"),     # both complete at token 3: the earliest in the text wins
    (["!"], "hello world"),       # the last token
    (["xyz"], "hello world!"),    # never seen: the whole answer
])
def test_stop_strings_cut_the_text(stop, text):
    pieces, gen = _stream(Scripted(HELLO), max_new_tokens=10, stop=stop)
    assert "".join(pieces) == gen.text == text
    assert gen.finish_reason == "stop"
    assert all(s not in "".join(pieces) for s in stop)
    assert Scripted(HELLO).generate([], "hi", max_new_tokens=10, stop=stop) == text


def test_streaming_holds_back_a_tail_that_could_become_a_stop_string():
    pieces, gen = _stream(Scripted(HELLO), max_new_tokens=10, stop=["lo w"])
    # after "he" nothing is safe yet (3 characters held back); "hello" releases "he"; then the stop
    assert pieces == ["he", "l"]
    assert gen.completion_tokens == 3  # it stopped at the token that completed the stop string
    pieces, _ = _stream(Scripted(HELLO), max_new_tokens=10)
    assert pieces == ["he", "llo", " wor", "ld", "!"]  # no stop strings: one piece per token


def test_partial_utf8_is_held_until_the_character_completes():
    pieces, gen = _stream(Scripted([7, 5, 6, 8]), max_new_tokens=10)  # "caf", 0xC3, 0xA9, " ok"
    assert pieces == ["caf", "é", " ok"]
    assert not any("\ufffd" in p for p in pieces)
    assert gen.text == "café ok" and gen.completion_tokens == 4


def test_cancel_stops_before_the_next_token():
    gen = Scripted(HELLO).generate([], "hi", max_new_tokens=10, stream=True)
    assert next(gen) == "he"
    gen.cancel()
    assert list(gen) == []
    assert (gen.finish_reason, gen.completion_tokens, gen.text) == ("cancelled", 1, "he")


PROBS = [0.5, 0.3, 0.15, 0.05]  # the nucleus at top_p=0.7 is {0, 1}: 0.5 + 0.3 >= 0.7


def test_sampling_is_seeded_and_stays_in_the_nucleus():
    rt = Fixed(PROBS)

    def draw(seed, n=400, **kw):
        return list(rt.stream_tokens([], "hi", n, seed=seed, **kw))

    a = draw(1, temperature=1.0, top_p=0.7)
    assert a == draw(1, temperature=1.0, top_p=0.7)  # reproducible
    assert a != draw(2, temperature=1.0, top_p=0.7)  # and the seed matters
    assert set(a) == {0, 1}  # never outside the nucleus, and both members are drawn
    # renormalised inside the nucleus: 0.5 / 0.8 = 0.625
    assert abs(a.count(0) / len(a) - 0.625) < 0.06
    # without top_p every token with mass can come out, in proportion
    b = draw(3, n=2000, temperature=1.0)
    assert set(b) == {0, 1, 2, 3}
    assert all(abs(b.count(t) / len(b) - p) < 0.03 for t, p in enumerate(PROBS))
    # temperature sharpens (p ** (1 / T)); near 0 it is greedy
    c = draw(4, n=2000, temperature=0.5)
    sharp = np.array(PROBS) ** 2 / (np.array(PROBS) ** 2).sum()
    assert all(abs(c.count(t) / len(c) - p) < 0.03 for t, p in enumerate(sharp))
    assert set(draw(5, temperature=0.01)) == {0}
    # a top_p below the largest probability keeps just the argmax
    assert set(draw(6, temperature=1.0, top_p=0.1)) == {0}
    # through generate: same seed, same text
    g = rt.generate([], "hi", max_new_tokens=20, temperature=1.0, top_p=0.7, seed=9)
    assert g == rt.generate([], "hi", max_new_tokens=20, temperature=1.0, top_p=0.7, seed=9)


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=0), "max_new_tokens=0 must be between 1 and 4096"),
    (dict(max_new_tokens=4097), "max_new_tokens=4097"),
    (dict(top_p=0.0), "top_p=0.0 in"),
    (dict(top_p=1.5), "top_p=1.5 in"),
    (dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
])
def test_bad_settings_raise_config_errors(kw, match):
    rt = Scripted(HELLO)
    with pytest.raises(ConfigError, match=match):
        rt.generate([], "hi", **kw)
    with pytest.raises(ConfigError, match=match):
        list(rt.stream_tokens([], "hi", **kw))


# --------------------------------------------------------------------------- prefix reuse


class Reusing(Scripted):
    """Records what each prefill covered: ``("full", n)`` or ``("resume", kept, n)``."""

    def __init__(self, script):
        super().__init__(script)
        self.calls = []

    def _encode(self, turns, images):
        # every character a token; an image is 3 tokens of id 255 with a digest from its name
        ids, spans, digests = [], [], []
        text = "|".join(f"{t.role}:{t.text}" for t in turns)
        for k, part in enumerate(text.split("<image>")):
            if k:
                spans.append((len(ids), 3))
                digests.append(str(images[k - 1]))
                ids += [255] * 3
            ids += list(part.encode())
        return Prompt(ids, None, spans, digests)

    def _prefill(self, prompt):
        self.calls.append(("full", len(prompt.ids)))
        return super()._prefill(prompt)

    def _resume(self, state, n, prompt):
        self.calls.append(("resume", n, len(prompt.ids)))
        return super()._prefill(prompt)


def _turns(*texts, images=()):
    msgs = [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(texts)]
    if images:
        msgs[0]["content"] = [*({"type": "image", "image": im} for im in images), {"type": "text", "text": texts[0]}]
    return msgs


def test_a_follow_up_reuses_the_conversation_and_counts_cached_tokens():
    rt = Reusing(HELLO)
    first = _turns("what is it?", images=["cat.png"])
    assert rt.generate(first) == "hello world!"
    assert rt.calls == [("full", len(rt.encode(first).ids))]
    follow = _turns("what is it?", "hello world!", "and its colour?", images=["cat.png"])
    gen = rt.generate(follow, stream=True)
    assert "".join(gen) == "hello world!"
    # the first prompt was reused whole, and then the fed answer tokens until the texts diverge
    kind, kept, total = rt.calls[-1]
    first_ids = rt.encode(first).ids
    assert kind == "resume" and kept >= len(first_ids) - 1 and total == len(rt.encode(follow).ids)
    assert gen.cached_tokens == kept and gen.prompt_tokens == total


def test_a_different_image_cuts_the_reuse_at_that_image():
    rt = Reusing(HELLO)
    rt.generate(_turns("q", images=["a.png", "b.png"]))
    rt.generate(_turns("q", images=["a.png", "c.png"]))
    prompt = rt.encode(_turns("q", images=["a.png", "c.png"]))
    assert rt.calls[-1] == ("resume", prompt.spans[1][0], len(prompt.ids))  # up to the second image, not into it
    rt.generate(_turns("q", images=["z.png", "c.png"]))
    other = rt.encode(_turns("q", images=["z.png", "c.png"]))
    assert rt.calls[-1] == ("resume", other.spans[0][0], len(other.ids))  # only the text before the first image


def test_reuse_off_and_a_failed_step_drop_the_entry():
    rt = Reusing(HELLO)
    rt.reuse = False
    rt.generate(_turns("q"))
    rt.generate(_turns("q"))
    assert [c[0] for c in rt.calls] == ["full", "full"]
    rt.reuse = True
    rt.generate(_turns("q"))

    def boom(state, token):
        raise RuntimeError("device lost")

    rt._step = boom
    with pytest.raises(RuntimeError):
        rt.generate(_turns("q"))
    assert rt._entry is None


def test_a_consumer_that_stops_early_leaves_the_sequence_cached():
    rt = Reusing(HELLO)
    assert rt.generate(_turns("q"), stop=[" wor"]) == "hello"  # the stream is closed at the stop string
    assert rt._entry is not None
    it = rt.stream_tokens(_turns("q"), None, 8)
    next(it)
    it.close()
    assert rt._entry is not None and rt.calls[-1][0] == "resume"
