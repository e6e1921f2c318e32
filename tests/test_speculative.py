"""Self-speculative decoding on ONNX Runtime: draft with the layers up to a kept verbalizer and
its head, verify every drafted token in one pass of the layers above, keep what agrees.

* Greedy output is plain decoding's, token for token: random weights (near-ties everywhere,
  drafts mostly rejected: every cycle rolls back), text and image prompts, every drafting layer,
  draft lengths 1..8, early stopping by the head's confidence, an end of sequence and
  ``max_new_tokens`` falling inside a drafted run; at fp32 and at 8-bit MatMulNBits.
* The cache after a speculative answer is the one plain decoding leaves, array for array.
* A model whose upper layers add nothing accepts every draft: cycles of ``tokens + 1``; sampled
  too. Speculative sampling's rule gives the model's distribution whatever the drafter's.
* The segments' row-by-row attention makes a pass over several positions equal, bit for bit,
  the same positions fed one at a time (ONNX Runtime's Attention over several rows does not).
* Bad requests (no head at the layer, a draft length of 0 or above the cap, the last layer,
  a non-exact precision, an artifact made before row-wise attention, a backend that
  cannot) are refused naming the option or the file. ``vlsi bench --speculative`` and
  ``vlsi serve --speculative`` run it.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

import vlsi_runtimes  # noqa: E402
from vlsi.errors import ConfigError  # noqa: E402
from vlsi.manifest import load_manifest  # noqa: E402
from tests.speculation import PROMPTS, agreeing_checkpoint, check_eos_and_budgets, check_reduced_head  # noqa: E402
from tests.speculation import noise_image as _img  # noqa: E402
from tests.speculation import plain_and_speculative as _both  # noqa: E402
from vlsi_export import get_target  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("layer,tokens,min_p", [(1, 1, 0.0), (1, 4, 0.0), (3, 3, 0.0), (3, 8, 0.0), (5, 2, 0.0),
                                                (1, 6, 0.3)])
def test_greedy_tokens_are_plain_decodings(onnx_artifact, layer, tokens, min_p):
    rt = vlsi_runtimes.load(onnx_artifact)
    total = {"drafted": 0, "accepted": 0, "cycles": 0}
    for images, prompt in PROMPTS:
        plain, drafted, stats = _both(rt, images, prompt, 24, {"layer": layer, "tokens": tokens, "min_p": min_p})
        assert drafted == plain, (layer, tokens, prompt)
        for k in total:
            total[k] += stats[k]
    assert total["drafted"] >= total["accepted"] >= 0 and total["cycles"] > 0
    if layer == 1:  # random weights, drafting at layer 1 of 6: most drafts are rejected and rolled back
        assert total["accepted"] < total["drafted"] / 2


def test_end_of_sequence_and_max_new_tokens_inside_a_drafted_run(onnx_artifact):
    """With EOS honoured and budgets that end mid-cycle, the answers (and where they stop) are plain decoding's."""
    check_eos_and_budgets(vlsi_runtimes.load(onnx_artifact), 1)


def test_the_cache_after_speculation_is_plain_decodings(onnx_artifact):
    """The rolled-back cache kept for the next prompt equals plain decoding's, and a follow-up
    reusing it answers as one reusing plain decoding's."""
    rt = vlsi_runtimes.load(onnx_artifact)
    images, prompt = PROMPTS[0]
    list(rt.stream_tokens(images, prompt, 20, ignore_eos=True))
    plain = rt._entry
    list(rt.stream_tokens(images, prompt, 20, ignore_eos=True, reuse=False, speculative={"layer": 1, "tokens": 5}))
    drafted = rt._entry
    assert drafted.keys == plain.keys and drafted.state["length"] == plain.state["length"] == len(plain.keys)
    assert drafted.state["next_pos"] == plain.state["next_pos"]
    for (k1, v1), (k2, v2) in zip(plain.state["past"], drafted.state["past"]):
        assert np.array_equal(k1, k2) and np.array_equal(v1, v2)
    follow = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": prompt}]},
              {"role": "assistant", "content": rt.decode(drafted.keys[-19:])},
              {"role": "user", "content": "and then?"}]
    stats: dict = {}
    again = list(rt.stream_tokens(follow, None, 8, stats=stats, speculative={"layer": 3, "tokens": 3}))
    assert stats["cached_tokens"] > 0
    list(rt.stream_tokens(images, prompt, 20, ignore_eos=True, reuse=False))  # the same cache, from plain decoding
    assert again == list(rt.stream_tokens(follow, None, 8))


def test_generate_with_speculation(onnx_artifact):
    rt = vlsi_runtimes.load(onnx_artifact)
    images, prompt = PROMPTS[2]
    want = rt.generate(images, prompt, max_new_tokens=12)
    assert rt.generate(images, prompt, max_new_tokens=12, speculative=vlsi_runtimes.Speculative(3, 4)) == want
    gen = rt.generate(images, prompt, max_new_tokens=12, stream=True, speculative={"layer": 1, "tokens": 2})
    assert "".join(gen) == want and gen.stats["cycles"] >= 1 and gen.stats["drafted"] >= gen.stats["accepted"]


@pytest.fixture(scope="module")
def agreeing(tiny_ckpt, tmp_path_factory):
    """The tiny student with layers 4-6 adding nothing to the residual (their output projections
    zeroed): layer 3's untrained head (the logit lens) is then the model's own head."""
    root = tmp_path_factory.mktemp("agreeing")
    agreeing_checkpoint(tiny_ckpt, root / "ckpt")
    return get_target("onnx")(root / "ckpt", root / "onnx", verbalizers=True, validate=False)


def test_drafts_the_model_agrees_with_are_all_accepted(agreeing):
    rt = vlsi_runtimes.load(agreeing)
    for tokens in (1, 3, 7):
        plain, drafted, stats = _both(rt, [_img(1)], "describe", 33, {"layer": 3, "tokens": tokens})
        assert drafted == plain
        assert stats["accepted"] == stats["drafted"] > 0
        assert stats["cycles"] == -(-32 // (tokens + 1))  # each cycle yields its drafts and the model's next token


def test_the_sampling_rule_gives_the_models_distribution():
    """Whatever the drafter's distribution, a drafted token kept or replaced by the rule is
    distributed as the model's (20,000 draws on 6 tokens: total variation under 0.02)."""
    from vlsi_runtimes.base import accept_draft

    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    for q in (np.array([0.1, 0.1, 0.1, 0.1, 0.1, 0.5]), p.copy(), np.array([0.0, 0.9, 0.0, 0.0, 0.0, 0.1])):
        counts = np.zeros(6)
        for _ in range(20000):
            d = int(rng.choice(6, p=q))
            r = accept_draft(p, q, d, rng)
            counts[d if r is None else r] += 1
        assert 0.5 * np.abs(counts / counts.sum() - p).sum() < 0.02, q
    same = [accept_draft(p, p, int(rng.choice(6, p=p)), rng) for _ in range(200)]
    assert same == [None] * 200  # a drafter with the model's own distribution is always kept


def test_sampling_with_an_agreeing_drafter_accepts_everything(agreeing):
    """At temperature 0.8, where the head's distribution is the model's own, every draft is
    kept; seeds give different answers, a seed gives the same one twice."""
    rt = vlsi_runtimes.load(agreeing)
    answers = set()
    for seed in range(4):
        stats: dict = {}
        spec = {"layer": 3, "tokens": 4}
        a = list(rt.stream_tokens([_img(1)], "describe", 20, temperature=0.8, seed=seed, ignore_eos=True,
                                  reuse=False, stats=stats, speculative=spec))
        assert stats["accepted"] == stats["drafted"] > 0 and len(a) == 20
        assert a == list(rt.stream_tokens([_img(1)], "describe", 20, temperature=0.8, seed=seed, ignore_eos=True,
                                          reuse=False, speculative=spec))
        answers.add(tuple(a))
    assert len(answers) > 1


def test_row_wise_attention_equals_one_position_at_a_time(onnx_artifact):
    """A segment asked to attend row by row over 2..16 new positions returns, bit for bit, what
    the positions give fed one at a time; not asked (a prompt, a follow-up's new tokens), it runs
    the Attention node it replaced, bit for bit."""
    import onnx

    from vlsi_export.rowwise import ROW_WISE_INPUT

    m = load_manifest(onnx_artifact)
    assert m.decoder_split.row_wise_rows == 16
    seg = m.decoder_split.segments[1]
    g = m.graph(seg.graph)
    assert ROW_WISE_INPUT in g.inputs
    sess = ort.InferenceSession(str(onnx_artifact / g.file))
    model = onnx.load(str(onnx_artifact / g.file))
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == seg.last_layer - seg.first_layer + 1
    # the graph as it was before the rewrite: each If replaced by the node its else branch holds
    for node in ifs:
        (inner,) = next(a.g for a in node.attribute if a.name == "else_branch").node
        assert inner.op_type == "Attention"
        del inner.output[:]
        inner.output.extend(node.output)
        at = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(at, inner)
    original = ort.InferenceSession(model.SerializeToString())
    mm = m.model
    rng = np.random.default_rng(0)
    layers = range(seg.first_layer - 1, seg.last_layer)

    def run(h, start, past, row_wise, session=sess):
        feed = {seg.hidden_in: h, "attention_mask": np.ones((1, start + h.shape[1]), np.int64),
                "position_ids": np.broadcast_to(np.arange(start, start + h.shape[1]), (3, 1, h.shape[1])).copy(),
                ROW_WISE_INPUT: np.array(row_wise)}
        for i in layers:
            feed[f"past_key_{i}"], feed[f"past_value_{i}"] = past[i]
        names = [o.name for o in session.get_outputs()]
        inputs = {i.name for i in session.get_inputs()}
        return dict(zip(names, session.run(names, {k: v for k, v in feed.items() if k in inputs})))

    cached = 9
    past = {i: tuple(rng.standard_normal((1, mm["num_kv_heads"], cached, mm["head_dim"])).astype(np.float32)
                     for _ in range(2)) for i in layers}
    differs = []
    for rows in (2, 5, 16):
        h = rng.standard_normal((1, rows, mm["hidden_size"])).astype(np.float32)
        together = run(h, cached, past, True)
        p, one = dict(past), []
        for t in range(rows):
            o = run(h[:, t:t + 1], cached + t, p, False)
            one.append(o[seg.hidden_out])
            p = {i: (o[f"present_key_{i}"], o[f"present_value_{i}"]) for i in layers}
        assert np.array_equal(together[seg.hidden_out], np.concatenate(one, axis=1)), rows
        for i in layers:
            assert np.array_equal(together[f"present_key_{i}"], p[i][0])
        as_is, before = run(h, cached, past, False), run(h, cached, past, False, original)
        for name in g.outputs:
            assert np.array_equal(as_is[name], before[name]), (rows, name)
        differs.append(not np.array_equal(together[seg.hidden_out], before[seg.hidden_out]))
    assert any(differs)  # the node over several rows is not the one-row calls: the flag chose the path


def test_exact_at_8_bit_block_weights_and_refused_where_it_cannot_be(tiny_ckpt, onnx_artifact, tmp_path):
    nbits = get_target("onnx")(tiny_ckpt, tmp_path / "q8", quant="int8-nbits", verbalizers=True, validate=False)
    rt = vlsi_runtimes.load(nbits)
    for images, prompt in PROMPTS[:3]:
        plain, drafted, _ = _both(rt, images, prompt, 20, {"layer": 1, "tokens": 4})
        assert drafted == plain
    # int4: exact where this CPU's kernels give a row alone what it gets in a batch; the runtime
    # checks that on the artifact and refuses otherwise, naming the precisions left
    q4 = get_target("onnx")(tiny_ckpt, tmp_path / "q4", quant="int4", verbalizers=True, validate=False)
    rt4 = vlsi_runtimes.load(q4)
    if rt4._rows_invariant():
        plain, drafted, _ = _both(rt4, *PROMPTS[0], 20, {"layer": 1, "tokens": 4})
        assert drafted == plain
    rt4._invariant = False  # what an AVX2-only EPYC finds (tests/test_export_onnx.py)
    with pytest.raises(ConfigError, match="'int4' would not give plain decoding's tokens on this CPU.*"
                                          "lm_head.onnx.*--quant fp32 or int8-nbits$"):
        rt4.generate([], "hi", speculative={"layer": 1})
    dyn = get_target("onnx")(tiny_ckpt, tmp_path / "i8", quant="int8", verbalizers=True, validate=False)
    with pytest.raises(ConfigError, match="not batch-invariant.*--quant fp32 or int8-nbits or int4"):
        vlsi_runtimes.load(dyn).generate([], "hi", speculative={"layer": 1})
    # an artifact exported before row-wise attention (its manifest says 0)
    old = tmp_path / "old"
    shutil.copytree(onnx_artifact, old)
    man = json.loads((old / "manifest.json").read_text())
    man["decoder_split"]["row_wise_rows"] = 0
    (old / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ConfigError, match="re-export it"):
        vlsi_runtimes.load(old).generate([], "hi", speculative={"layer": 1})


def test_bad_requests_name_the_option(onnx_artifact, tiny_ckpt):
    rt = vlsi_runtimes.load(onnx_artifact)
    cases = [({"layer": 2}, "layer 2 has no verbalizer head"), ({"layer": 1, "tokens": 0}, "tokens=0"),
             ({"layer": 1, "tokens": 16}, "at most 15"), ({"layer": 6}, "saves nothing"),
             ({"layer": 1, "min_p": 1.5}, "min_p"), ({"layer": 1, "draft": 3}, "takes layer, tokens, min_p and drafter"),
             ({"layer": 1, "drafter": "x"}, "drafter='x'"), ({"layer": 1, "drafter": "model"}, "llama.cpp backend has"),
             ({"tokens": 3}, "takes layer"), ("layer 1", "a Speculative or a mapping")]
    for spec, message in cases:
        with pytest.raises(ConfigError, match=message):
            rt.generate([], "hi", max_new_tokens=4, speculative=spec)
    with pytest.raises(ConfigError, match="source='final'"):
        list(rt.stream_tokens([], "hi", 4, source=1, speculative={"layer": 1}))
    with pytest.raises(ConfigError, match="torch backend does not decode speculatively"):
        vlsi_runtimes.load(tiny_ckpt).generate([], "hi", max_new_tokens=4, speculative={"layer": 1})


def test_bench_speculative_rows(onnx_artifact, tiny_ckpt, tmp_path):
    """`vlsi bench --speculative` times both decodings on the same prompts, says every answer was
    plain decoding's, and prints the cost model; a malformed value names the option."""
    from click.testing import CliRunner

    from vlsi_cli import main

    res = CliRunner().invoke(main, ["bench", str(onnx_artifact), "--reference", str(tiny_ckpt), "--runs", "1",
                                    "--new-tokens", "8", "--prompt-tokens", "40", "--speculative", "1:3",
                                    "--out", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "b.json").read_text())[-1]["speculative"][0]
    assert row["identical_rate"] == 1.0 and row["layer"] == 1 and row["tokens"] == 3
    assert row["speedup"] == pytest.approx(row["speculative_tok_s"] / row["plain_tok_s"])
    assert sorted(map(int, row["verify_cost"])) == list(range(1, 9)) and row["predicted_speedup"] > 0
    assert row["drafted"] >= row["accepted"] and row["cycles"] > 0
    assert "predicted speedup" in res.output and "verify 8" in res.output
    bad = CliRunner().invoke(main, ["bench", str(onnx_artifact), "--reference", str(tiny_ckpt), "--speculative", "1"])
    assert bad.exit_code != 0 and "--speculative" in bad.output and "LAYER:TOKENS" in bad.output


def test_served_speculatively(onnx_artifact, tmp_path):
    """`vlsi serve --speculative`: the openai client gets plain greedy decoding's answers (whole
    and streamed) with the drafted/accepted counts, and sampled ones; a drafting layer without
    a head stops the server before it serves."""
    pytest.importorskip("starlette", reason="the app extra is not installed")
    openai = pytest.importorskip("openai", reason="the dev extra is not installed")
    from tests.test_serve import _user, start_server, stop_server

    rt = vlsi_runtimes.load(onnx_artifact)
    png = tmp_path / "q.png"
    _img(4).save(png)
    data = png.read_bytes()
    url, proc = start_server(onnx_artifact, tmp_path / "log", "--speculative", "1:3", "--name", "s")
    try:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        for q in ("what colour is it?", "describe the picture"):
            want = rt.generate([png], q, max_new_tokens=12)
            r = c.chat.completions.create(model="s", messages=_user(data, q), max_tokens=12, temperature=0)
            assert r.choices[0].message.content == want
            sp = r.model_extra["vlsi"]["speculative"]
            assert sp["layer"] == 1 and sp["tokens"] == 3 and sp["cycles"] >= 1 and sp["drafted"] >= sp["accepted"]
            chunks = list(c.chat.completions.create(model="s", messages=_user(data, q), max_tokens=12, temperature=0,
                                                    stream=True))
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
        r = c.chat.completions.create(model="s", messages=_user(data, "hi"), max_tokens=6, temperature=0.8, seed=3)
        assert r.model_extra["vlsi"]["speculative"]["cycles"] >= 1 and r.usage.completion_tokens >= 1
    finally:
        stop_server(proc)
    with pytest.raises(RuntimeError, match="speculative layer 2 has no verbalizer head"):
        start_server(onnx_artifact, tmp_path / "log2", "--speculative", "2:3")


def test_reduced_vocabulary_draft_head(tiny_ckpt, synth_data, tmp_path):
    """--draft-vocab: a draft head on the tokens of the training answers plus EOS, the LM head's
    rows of those tokens; drafting with it proposes only those tokens (the full head's choice
    among them) and the answers stay plain decoding's."""
    data = synth_data / "train.json"
    out = get_target("onnx")(tiny_ckpt, tmp_path / "dv", verbalizers=True, validate=False, draft_vocab=str(data))
    m = load_manifest(out)
    ids = m.decoder_split.draft_vocab
    assert ids == sorted(set(ids)) and set(m.eos_token_ids) <= set(ids) and 10 < len(ids) < m.model["vocab_size"] // 2
    assert m.graph("draft_head").outputs == ["draft_logits"]
    rt = vlsi_runtimes.load(out)
    rt._speculation_check(vlsi_runtimes.Speculative(3, 4))
    state, _ = rt._prefill(rt.encode([_img(2)], "describe"))
    rt._fed(state)
    h = rt._draft_feed(state, 5)
    reduced = rt._draft_logits(h)
    full = rt._verbalizer(3, h)
    check_reduced_head(rt, reduced, full, ids)
    with pytest.raises(ConfigError, match="--draft-vocab drafts after a verbalizer"):
        get_target("onnx")(tiny_ckpt, tmp_path / "x", draft_vocab=str(data), validate=False)
    bad = tmp_path / "ids.json"
    bad.write_text(json.dumps([1, 2, 10**9]))
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        get_target("onnx")(tiny_ckpt, tmp_path / "y", verbalizers=True, draft_vocab=str(bad), validate=False)
    assert not (tmp_path / "y").exists()
