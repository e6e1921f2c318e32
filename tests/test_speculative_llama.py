"""Self-speculative decoding on the llama.cpp backend: the exported draft GGUF (the text model's
first L blocks) drafts in a second context, with the layer-L verbalizer in numpy or with its own
final norm and head; the model verifies every draft in one batch; both contexts roll back. Greedy
answers equal plain decoding's token for token; the same draft file works as a draft model in
llama.cpp's own speculative decoding."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")
gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")

import vlsi_runtimes  # noqa: E402
from vlsi.errors import ConfigError  # noqa: E402
from vlsi.manifest import ArtifactError, load_manifest  # noqa: E402
from tests.speculation import PROMPTS, agreeing_checkpoint, check_eos_and_budgets, check_reduced_head  # noqa: E402
from tests.speculation import noise_image as _img  # noqa: E402
from tests.speculation import plain_and_speculative as _both  # noqa: E402
from vlsi_export import get_target  # noqa: E402

pytestmark = pytest.mark.slow


def _export(ckpt, out, **kw):
    opts = {"quant": "f32", "mmproj_quant": "f32", "verbalizers": True, "draft_layer": 3, "validate": False}
    opts.update(kw)
    return get_target("gguf")(ckpt, out, **opts)


@pytest.fixture(scope="module")
def drafts(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-draft")
    return {q: _export(tiny_ckpt, root / q, quant=q) for q in ("f32", "q8_0")}


@pytest.fixture(scope="module")
def agreeing(tiny_ckpt, tmp_path_factory):
    """The tiny student with layers 4-6 adding nothing to the residual: the layer-3 logit lens
    (the draft model's own norm and head) is the model's head, and so is layer 3's untrained
    verbalizer (the logit lens until trained)."""
    root = tmp_path_factory.mktemp("agreeing-gguf")
    agreeing_checkpoint(tiny_ckpt, root / "ckpt")
    return _export(root / "ckpt", root / "gguf")


def test_the_draft_file_is_the_models_first_blocks(drafts):
    """draft.gguf: block_count L, the first L blocks and every other tensor as they lie in the
    model file (quantised bytes included), the vlsi fields; llama-cpp-python's own ``Llama``
    loads it as a model."""
    from llama_cpp import Llama

    from vlsi.llama_cpp import read_draft_gguf

    for quant, folder in drafts.items():
        m = load_manifest(folder)
        g = m.graph("draft")
        assert g.file == "draft.gguf" and g.details["layer"] == 3 and g.details["blocks_of"] == 6
        main = gguf.GGUFReader(str(folder / m.graph("text").file))
        draft = gguf.GGUFReader(str(folder / "draft.gguf"))
        arch = str(main.fields["general.architecture"].contents())
        assert int(draft.fields[f"{arch}.block_count"].contents()) == 3
        want = {t.name: t for t in main.tensors if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < 3}
        got = {t.name: t for t in draft.tensors}
        assert set(got) == set(want) and any(n.startswith("blk.2.") for n in got)
        for name, t in got.items():
            assert t.tensor_type == want[name].tensor_type and np.array_equal(t.data, want[name].data), name
        fields = read_draft_gguf(folder / "draft.gguf")
        assert fields["layer"] == 3 and fields["model_sha256"] == m.files[m.graph("text").file]["sha256"]
        assert "vocab" not in fields
        llm = Llama(model_path=str(folder / "draft.gguf"), n_ctx=256, verbose=False)
        assert len(llm.create_completion("count", max_tokens=4, temperature=0)["choices"][0]["text"]) >= 0
        assert llm.n_vocab() == m.model["vocab_size"]
        del llm


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
@pytest.mark.parametrize("drafter,tokens", [("verbalizer", 1), ("verbalizer", 4), ("verbalizer", 8),
                                            ("model", 3)])
def test_greedy_tokens_are_plain_decodings(drafts, quant, drafter, tokens):
    rt = vlsi_runtimes.load(drafts[quant])
    total = {"cycles": 0, "drafted": 0, "accepted": 0}
    for images, prompt in PROMPTS:
        plain, drafted, stats = _both(rt, images, prompt, 24, {"layer": 3, "tokens": tokens, "drafter": drafter})
        assert drafted == plain, (quant, drafter, tokens, prompt)
        for k in total:
            total[k] += stats[k]
    assert total["cycles"] > 0 and total["drafted"] >= total["accepted"]
    assert total["accepted"] < total["drafted"] / 2  # random weights: most drafts rolled back


@pytest.mark.parametrize("drafter", ["verbalizer", "model"])
def test_drafts_the_model_agrees_with_are_all_accepted(agreeing, drafter):
    rt = vlsi_runtimes.load(agreeing)
    for tokens in (1, 3, 7):
        plain, drafted, stats = _both(rt, [_img(1)], "describe", 33, {"layer": 3, "tokens": tokens, "drafter": drafter})
        assert drafted == plain
        assert stats["accepted"] == stats["drafted"] > 0
        assert stats["cycles"] == -(-32 // (tokens + 1))


def test_end_of_sequence_and_max_new_tokens_inside_a_drafted_run(drafts, agreeing):
    check_eos_and_budgets(vlsi_runtimes.load(drafts["f32"]), 3, vlsi_runtimes.load(agreeing))


def test_both_contexts_after_speculation_hold_plain_decodings_sequence(agreeing):
    """After a speculative answer the model's cache holds what plain decoding's does and the draft
    context the same positions: a follow-up reuses both (all drafts still accepted on the
    agreeing model, which a draft context out of step would not give) and answers as plain."""
    rt = vlsi_runtimes.load(agreeing)
    images, prompt = PROMPTS[0]
    list(rt.stream_tokens(images, prompt, 20, ignore_eos=True))
    plain = rt._entry
    plain_keys, plain_past = list(plain.keys), plain.state["n_past"]
    list(rt.stream_tokens(images, prompt, 20, ignore_eos=True, reuse=False, speculative={"layer": 3, "tokens": 5}))
    drafted = rt._entry
    assert drafted.keys == plain_keys and drafted.state["n_past"] == plain_past
    assert rt._draft.keys == drafted.keys
    follow = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": prompt}]},
              {"role": "assistant", "content": rt.decode(drafted.keys[-19:])},
              {"role": "user", "content": "and then?"}]
    stats: dict = {}
    again = list(rt.stream_tokens(follow, None, 12, ignore_eos=True, stats=stats,
                                  speculative={"layer": 3, "tokens": 3}))
    assert stats["cached_tokens"] > 0 and stats["accepted"] == stats["drafted"] > 0
    assert again == list(rt.stream_tokens(follow, None, 12, ignore_eos=True, reuse=False))
    # a plain answer in between moves only the model's cache; the next speculative one re-syncs the draft's
    other = list(rt.stream_tokens([], "count to ten", 6, ignore_eos=True))
    stats = {}
    assert list(rt.stream_tokens([], "count to ten", 12, ignore_eos=True, stats=stats,
                                 speculative={"layer": 3, "tokens": 3}))[:6] == other
    assert stats["accepted"] == stats["drafted"] > 0


def test_llama_cpps_own_speculative_decoding_takes_the_draft_file(agreeing):
    """The same draft.gguf, given to llama.cpp's own draft-model speculation
    (llama-speculative-simple -md, built from the llama.cpp llama-cpp-python vendors): it drafts
    with the file's own norm and head, the model accepts them all on the agreeing model, and the
    answer is the one vlsi's backend decodes."""
    from vlsi.llama_cpp import run_speculative_tool, speculative_tool

    if speculative_tool() is None:
        pytest.skip("llama-speculative-simple is not built here: `make llama-tools` builds it (make test does)")
    rt = vlsi_runtimes.load(agreeing)
    m = rt.manifest
    for prompt in ("count to ten", "tell me a story about a square"):
        text = rt.chat_text(rt.user_turns([], prompt))
        got = run_speculative_tool(agreeing / m.graph("text").file, agreeing / "draft.gguf", text, 24, 4, threads=2)
        assert got["n_drafted"] > 0 and got["n_accept"] == got["n_drafted"]
        ours = list(rt.stream_tokens([], prompt, got["n_predict"], ignore_eos=True, reuse=False))
        assert got["text"].strip("\n") == rt.pieces_text(ours).strip("\n") != ""


def test_a_tool_run_that_loses_its_counts_is_repeated(tmp_path, monkeypatch):
    """llama.cpp's logger may drop its last lines at exit (the counts): such a run is repeated,
    and a tool that never prints them fails after ``tries`` runs, saying so."""
    from vlsi.llama_cpp import run_speculative_tool

    calls = tmp_path / "calls"
    tool = tmp_path / "llama-speculative-simple"
    tool.write_text("#!/bin/sh\n"  # prints its counts from its LOSE_UNTIL-th run on
                    f'echo x >> "{calls}"; n=$(wc -l < "{calls}")\n'
                    'printf "PROMPT one two" ; echo "decoded    3 tokens in    0.100 seconds" >&2\n'
                    '[ "$n" -ge "$LOSE_UNTIL" ] && printf "n_predict = 3\\nn_drafted = 4\\nn_accept  = 2\\n" >&2\n'
                    "exit 0\n")
    tool.chmod(0o755)
    monkeypatch.setenv("VLSI_LLAMA_SPECULATIVE", str(tool))
    monkeypatch.setenv("LOSE_UNTIL", "3")
    got = run_speculative_tool("m.gguf", "d.gguf", "PROMPT", 3, 2)
    assert got == {"text": " one two", "tok_s": pytest.approx(30.0), "n_predict": 3, "n_drafted": 4, "n_accept": 2}
    assert len(calls.read_text().split()) == 3
    calls.unlink()
    monkeypatch.setenv("LOSE_UNTIL", "99")
    with pytest.raises(RuntimeError, match="exit 0, its counts not printed"):
        run_speculative_tool("m.gguf", "d.gguf", "PROMPT", 3, 2, tries=4)
    assert len(calls.read_text().split()) == 4


def test_reduced_vocabulary_draft_head(tiny_ckpt, synth_data, tmp_path):
    data = synth_data / "train.json"
    out = _export(tiny_ckpt, tmp_path / "dv", draft_vocab=str(data))
    m = load_manifest(out)
    from vlsi.llama_cpp import read_draft_gguf

    ids = read_draft_gguf(out / "draft.gguf")["vocab"]
    assert ids == sorted(set(ids)) and set(m.eos_token_ids) <= set(ids) and 10 < len(ids) < m.model["vocab_size"] // 2
    assert m.graph("draft").details["vocab_size"] == len(ids)
    rt = vlsi_runtimes.load(out)
    rt._speculation_check(vlsi_runtimes.Speculative(3, 4))
    state, _ = rt._prefill(rt.encode([_img(2)], "describe"))
    fed = rt._draft_feed(state, 5)
    reduced = rt._draft_logits(fed)
    full = rt._verb.logits(3, fed[1])
    check_reduced_head(rt, reduced, full, ids)


def test_bad_requests_and_files_are_named(drafts, tiny_ckpt, tmp_path):
    rt = vlsi_runtimes.load(drafts["f32"])
    cases = [({"layer": 2}, "draft model is its first 3 layers.*--draft-layer 2"),
             ({"layer": 3, "tokens": 16}, "at most 15"), ({"layer": 3, "tokens": 0}, "tokens=0")]
    for spec, message in cases:
        with pytest.raises(ConfigError, match=message):
            rt.generate([], "hi", max_new_tokens=4, speculative=spec)
    plain = get_target("gguf")(tiny_ckpt, tmp_path / "plain", quant="f32", mmproj_quant="f32", validate=False)
    with pytest.raises(ConfigError, match="no draft model: export with --target gguf --draft-layer"):
        vlsi_runtimes.load(plain).generate([], "hi", max_new_tokens=4, speculative={"layer": 3})
    no_head = _export(tiny_ckpt, tmp_path / "l2", draft_layer=2)
    with pytest.raises(ConfigError, match="layer 2 has no verbalizer head.*drafter='model'"):
        vlsi_runtimes.load(no_head).generate([], "hi", max_new_tokens=4, speculative={"layer": 2})
    assert vlsi_runtimes.load(no_head).generate([], "hi", max_new_tokens=4,
                                                speculative={"layer": 2, "drafter": "model"}) == \
        vlsi_runtimes.load(no_head).generate([], "hi", max_new_tokens=4)
    # a draft cut from another model file, and a missing one
    other = tmp_path / "other"
    shutil.copytree(drafts["f32"], other)
    shutil.copy(drafts["q8_0"] / "draft.gguf", other / "draft.gguf")
    man = json.loads((other / "manifest.json").read_text())
    man["files"].pop("draft.gguf")  # the file check is the runtime's, not the manifest's digest
    (other / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="draft.gguf was not cut from"):
        vlsi_runtimes.load(other, backend="gguf").generate([], "hi", max_new_tokens=4, speculative={"layer": 3})
    (other / "draft.gguf").unlink()
    with pytest.raises(ArtifactError, match="draft model is missing"):
        vlsi_runtimes.load(other, backend="gguf").generate([], "hi", max_new_tokens=4, speculative={"layer": 3})
    # export refusals, nothing written
    with pytest.raises(ConfigError, match="give --draft-layer L too"):
        get_target("gguf")(tiny_ckpt, tmp_path / "x", draft_vocab="ids.json", validate=False)
    with pytest.raises(ConfigError, match="1 <= L < 6"):
        _export(tiny_ckpt, tmp_path / "y", draft_layer=6)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bench_speculative_rows_on_gguf(drafts, tiny_ckpt, tmp_path):
    """`vlsi bench --speculative` on a GGUF artifact: vlsi's loop with the verbalizer drafter and
    with the draft model's own head, and llama.cpp's own draft-model speculation on the same files,
    each against plain decoding in the same run, with the cost model."""
    from click.testing import CliRunner

    from vlsi.llama_cpp import speculative_tool
    from vlsi_cli import main

    res = CliRunner().invoke(main, ["bench", str(drafts["f32"]), "--reference", str(tiny_ckpt), "--runs", "1",
                                    "--new-tokens", "8", "--prompt-tokens", "40", "--speculative", "3:3",
                                    "--out", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "b.json").read_text())[-1]["speculative"]
    ways = [r["way"] for r in rows]
    assert ways[:2] == ["vlsi, verbalizer drafter", "vlsi, draft model's own head"]
    assert [r["drafter"] for r in rows[:2]] == ["verbalizer", "model"]
    for r in rows:
        assert r["layer"] == 3 and r["tokens"] == 3 and r["drafted"] >= r["accepted"] and r["drafted"] > 0
        assert r["speedup"] == pytest.approx(r["speculative_tok_s"] / r["plain_tok_s"])
        assert sorted(map(int, r["verify_cost"])) == list(range(1, 9)) and r["predicted_speedup"] > 0
    assert rows[0]["identical_rate"] == rows[1]["identical_rate"] == 1.0
    if speculative_tool() is not None:
        assert ways[2] == "llama.cpp llama-speculative-simple" and rows[2]["identical_rate"] == 1.0
    assert "llama-speculative-simple" in res.output or speculative_tool() is None
