"""The ONNX decoder split at layer boundaries, heads on demand.

* The segments, the LM head and the verbalizer head graphs together compute what the one-graph
  decoder of format-2 artifacts computed (logits of every kept head, KV presents), on batches
  with padding and a cache; no weight is in two graphs.
* Plain decoding runs the segments and the LM head only; a verbalizer's head graph runs when its
  logits are read, and gives what the one-graph artifact gave, token for token.
* Artifacts of format 2 still load and run; the manifest's split round-trips and a damaged one
  is named; ``--split-layers`` splits where asked and refuses layers that do not exist.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

import vlsi_runtimes  # noqa: E402
from vlsi.errors import ConfigError  # noqa: E402
from vlsi.manifest import ArtifactError, Graph, Manifest, load_manifest, write_manifest  # noqa: E402
from vlsi_export import get_target  # noqa: E402

pytestmark = pytest.mark.slow
Dy = torch.export.Dim.DYNAMIC


def _img(seed=0, size=84):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    from vlsi.checkpoint import load_checkpoint

    return load_checkpoint(tiny_ckpt)


@pytest.fixture(scope="module")
def one_graph(ckpt, tmp_path_factory):
    """The decoder as format-2 artifacts held it: one graph, every kept head's logits an output."""
    from vlsi.archs.onnx import OPSET, Decoder

    m = ckpt.model.eval()
    sz = ckpt.adapter.text_sizes(m.config)
    dec = Decoder(m, ckpt.verbalizers, position_axes=3).eval()
    b, length, p = 2, 5, 3
    past = [torch.zeros(b, sz.num_kv_heads, p, sz.head_dim) for _ in range(2 * sz.num_layers)]
    example = (torch.zeros(b, length, sz.hidden_size), torch.ones(b, p + length, dtype=torch.long),
               torch.arange(p, p + length).view(1, 1, length).expand(3, b, length).contiguous(), *past)
    ins, outs = dec.io_names()
    path = tmp_path_factory.mktemp("one-graph") / "decoder.onnx"
    torch.onnx.export(dec, example, str(path), input_names=ins, output_names=outs, dynamo=True, verbose=False,
                      opset_version=OPSET, dynamic_shapes=({0: Dy, 1: Dy}, {0: Dy, 1: Dy}, {1: Dy, 2: Dy},
                                                           tuple({0: Dy, 2: Dy} for _ in past)))
    return path, ins, outs


@pytest.fixture(scope="module")
def format2(onnx_artifact, one_graph, tmp_path_factory):
    """``onnx_artifact`` as vlsi wrote it before the split: format 2, one ``decoder`` graph."""
    import onnx

    from vlsi_export.onnx_target import signature
    from vlsi_export.quantize import save_model

    path, ins, outs = one_graph
    out = tmp_path_factory.mktemp("format2") / "fp32"
    shutil.copytree(onnx_artifact, out)
    m = load_manifest(out)
    split = m.decoder_split
    for name in [s.graph for s in split.segments] + [h.graph for h in (split.lm_head, *split.verbalizers)]:
        (out / m.graph(name).file).unlink()
        del m.graphs[name]
    save_model(onnx.load(str(path)), out / "decoder.onnx")  # its external data pulled in, as the export did
    m.graphs["decoder"] = Graph("decoder.onnx", "fp32", ins, outs, signature(out / "decoder.onnx"))
    m.decoder_split = None
    write_manifest(out, m)
    d = json.loads((out / "manifest.json").read_text())
    d["format_version"] = 2
    del d["decoder_split"]
    (out / "manifest.json").write_text(json.dumps(d))
    return out


def _inputs(m, b, length, p, seed):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, p + length), np.int64)
    mask[0, :2] = 0  # a left-padded row
    feed = {"inputs_embeds": rng.standard_normal((b, length, m["hidden_size"])).astype(np.float32),
            "attention_mask": mask,
            "position_ids": np.broadcast_to(np.arange(p, p + length), (3, b, length)).copy()}
    for i in range(m["num_layers"]):
        for kind in ("key", "value"):
            feed[f"past_{kind}_{i}"] = rng.standard_normal((b, m["num_kv_heads"], p, m["head_dim"])).astype(np.float32)
    return feed


def test_split_graphs_compute_what_the_one_graph_decoder_did(onnx_artifact, one_graph):
    """Chained segments + LM head + each verbalizer head graph on its captured state equal the
    one-graph decoder's logits, verbalizer logits and presents (batch of 2 with padding, a cache,
    a prefill and a decode step)."""
    m = load_manifest(onnx_artifact)
    split = m.decoder_split
    sessions = {name: ort.InferenceSession(str(onnx_artifact / g.file)) for name, g in m.graphs.items()}
    ref_sess = ort.InferenceSession(str(one_graph[0]))
    names = one_graph[2]
    for b, length, p in [(2, 5, 3), (1, 7, 0), (2, 1, 9)]:
        feed = _inputs(m.model, b, length, p, seed=length)
        ref = dict(zip(names, ref_sess.run(names, feed)))
        keep = feed["attention_mask"].astype(bool)
        h, captured = feed["inputs_embeds"], {}
        for s in split.segments:
            g = m.graph(s.graph)
            given = {**feed, s.hidden_in: h, "row_wise": np.array(False)}
            outs = dict(zip(g.outputs, sessions[s.graph].run(g.outputs, {n: given[n] for n in g.inputs})))
            h = captured[s.last_layer] = outs[s.hidden_out]
            assert h.shape == (b, length, m.model["hidden_size"])  # every position, not the last only
            for n in g.outputs[1:]:  # cached positions of padding are never attended to: compare the real ones
                for row in range(b):
                    assert np.abs(outs[n][row][:, keep[row]] - ref[n][row][:, keep[row]]).max() < 1e-5, n
        head = sessions["lm_head"]
        logits = head.run(["logits"], {"normed_hidden": h})[0]
        assert logits.shape == (b, length, m.model["vocab_size"])  # a row per position given
        assert np.abs(logits[:, -1] - ref["logits"]).max() < 1e-5
        for v in split.verbalizers:
            normed = sessions[v.graph].run([v.output], {v.input: captured[v.layer][:, -1:]})[0]
            got = head.run(["logits"], {"normed_hidden": normed})[0][:, 0]
            assert np.abs(got - ref[f"verbalizer_logits_{v.layer}"]).max() < 1e-5, v.layer


def test_segments_take_the_cache_into_onnx_attention_and_rotary(onnx_artifact):
    """Each segment's layers are ONNX's own ops, not written out: one ``Attention`` per layer fed
    that layer's ``past_key/past_value`` and returning its ``present`` (inside the ``If`` that
    attends row by row over a few positions, whose other branch is the node as exported), rotary
    as ``RotaryEmbedding`` on the packed projections, no transpose and no concatenation of the
    cache outside that branch."""
    import onnx

    m = load_manifest(onnx_artifact)
    for seg in m.decoder_split.segments:
        g = onnx.load(str(onnx_artifact / m.graph(seg.graph).file), load_external_data=False).graph
        ops = [n.op_type for n in g.node]
        layers = seg.last_layer - seg.first_layer + 1
        assert ops.count("If") == layers and ops.count("RotaryEmbedding") == 2 * layers
        assert "Transpose" not in ops and "Attention" not in ops
        assert not [n for n in g.node if n.op_type == "Concat" and any(i.startswith("past_") for i in n.input)]
        ifs = [n for n in g.node if n.op_type == "If"]
        for i, n in zip(range(seg.first_layer - 1, seg.last_layer), ifs):
            assert list(n.output[1:3]) == [f"present_key_{i}", f"present_value_{i}"]
            whole = {a.name: a.g for a in n.attribute}["else_branch"]
            attn = [x for x in whole.node if x.op_type == "Attention"]
            assert len(attn) == 1 and list(attn[0].input[4:6]) == [f"past_key_{i}", f"past_value_{i}"]


def test_no_weight_is_in_two_decoder_graphs(onnx_artifact, ckpt):
    """The LM head is stored once (in lm_head.onnx, not per kept head), each layer's weights in one
    segment, and the decoder graphs hold exactly the text model's and the heads' weights."""
    import onnx

    m = load_manifest(onnx_artifact)
    sz = ckpt.adapter.text_sizes(ckpt.model.config)
    head_w = ckpt.adapter.lm_head(ckpt.model).weight.detach().numpy()
    seen, total, holders = {}, 0, []
    for name, g in m.graphs.items():
        if name in ("vision", "embed"):
            continue
        for t in onnx.load(str(onnx_artifact / g.file)).graph.initializer:
            a = onnx.numpy_helper.to_array(t)
            total += a.size
            # weight matrices (small constants may repeat, and so do untrained heads' zero projections)
            if a.size >= sz.hidden_size * sz.hidden_size and np.ptp(a) > 0:
                key = (a.shape, a.tobytes())
                assert key not in seen, f"{t.name} of {name} is also in {seen[key]}"
                seen[key] = name
            if any(a.shape == w.shape and np.array_equal(a, w) for w in (head_w, head_w.T)):
                holders.append(name)
    assert holders == ["lm_head"]
    lm = ckpt.adapter.language_model(ckpt.model)
    text = sum(p.numel() for n, p in lm.named_parameters() if not n.startswith("embed_tokens"))
    heads = sum(p.numel() for p in ckpt.verbalizers.parameters())
    head = ckpt.adapter.lm_head(ckpt.model).weight.numel()
    # the exporter folds a few small vectors (norm weights of ones) and adds rotary tables and
    # shape constants: about right, and far from one more LM head per kept verbalizer
    want = text + head + heads
    assert 0.99 * want <= total <= want + 200 * len(m.graphs) and want + head > 1.05 * want


def test_plain_decoding_runs_no_head_graph(onnx_artifact):
    """generate() runs the segments and the LM head once per position fed, nothing else: no
    verbalizer graph is even opened. verbalize() then runs each layer's head graph."""
    rt = vlsi_runtimes.load(onnx_artifact)
    calls = []
    real = rt._run_graph
    rt._run_graph = lambda name, feeds: (calls.append(name), real(name, feeds))[1]
    ids = list(rt.stream_tokens([_img(0)], "describe", 5, ignore_eos=True))
    segments = [s.graph for s in rt.split.segments]
    forwards = len(ids)  # the prompt, then every token but the last
    assert {c for c in calls if c not in ("vision", "embed")} == {*segments, "lm_head"}
    assert all(calls.count(g) == forwards for g in (*segments, "lm_head"))
    assert not [n for n in rt.sessions if n.startswith("verbalizer_")]
    rt.capture_layers = False  # a pass as plain decoding makes it: a layer's logits cannot be read from it
    state, logits = rt._prefill(rt.encode([_img(0)], "describe"))
    rt.capture_layers = True
    assert logits["final"].shape == (rt.model["vocab_size"],)
    with pytest.raises(RuntimeError, match="capture_layers"):
        logits[1]
    calls.clear()
    out = rt.verbalize([_img(0)], "describe", 3, final=False)
    assert set(out) == {1, 3, 5}
    heads = {f"verbalizer_{k}" for k in (1, 3, 5)}
    assert heads <= set(calls) and heads <= set(rt.sessions)


def test_kept_heads_benchmark_pairs_both_load_orders(onnx_artifact, tiny_ckpt, tmp_path):
    """``python -m vlsi_runtimes.bench kept-heads PLAIN KEPT``: the artifact without heads and the
    one with them decode side by side in one process, in both load orders, round by round; both
    decode the same tokens; the figure is the geometric mean of the two orders' medians."""
    import math
    import subprocess
    import sys

    from vlsi_runtimes.bench import format_kept_heads, measure_kept_heads

    plain = get_target("onnx")(tiny_ckpt, tmp_path / "plain", verbalizers=False)
    row = measure_kept_heads(str(plain), str(onnx_artifact), new_tokens=4, runs=3, threads=1)
    assert row["verbalizers"] == [1, 3, 5] and row["backend"] == "onnx"
    assert [o["loaded_first"] for o in row["orders"]] == ["plain", "kept"]
    for o in row["orders"]:
        assert o["same_tokens"] is True and len(o["rounds_x_plain"]) == 3
        assert o["x_plain"] == sorted(o["rounds_x_plain"])[1] > 0
    assert row["x_plain"] == pytest.approx(math.sqrt(row["orders"][0]["x_plain"] * row["orders"][1]["x_plain"]))
    assert "both load orders" in format_kept_heads(row)
    out = subprocess.run([sys.executable, "-m", "vlsi_runtimes.bench", "kept-heads", str(plain), str(onnx_artifact),
                          "3", "1", "1"], capture_output=True, text=True, check=True).stdout
    assert "| plain |" in out and "| kept |" in out


def test_heads_on_demand_equal_the_one_graph_artifact(onnx_artifact, format2, tiny_ckpt):
    """The split artifact answers as the format-2 artifact of the same model (which still loads):
    every head's logits after the prompt and along a continuation, greedy tokens, verbalizations;
    and both as the PyTorch reference."""
    from vlsi_export.parity import TOLERANCES

    old, new, ref = vlsi_runtimes.load(format2), vlsi_runtimes.load(onnx_artifact), vlsi_runtimes.load(tiny_ckpt)
    assert load_manifest(format2).format_version == 2 and old.split is None and new.split is not None
    for images, prompt in [([_img(1)], "what colour is it?"), ([], "no image here")]:
        cont = list(ref.stream_tokens(images, prompt, 6))
        a, b, r = (rt.logits(images, prompt, continuation=cont) for rt in (old, new, ref))
        assert len(a) == len(b) == len(r) == len(cont) + 1
        for x, y, z in zip(a, b, r):
            assert set(x) == set(y) == set(z) == {"final", 1, 3, 5}
            for k in x:
                assert np.abs(x[k] - y[k]).max() < 1e-5, k
                assert np.abs(y[k] - z[k]).max() <= TOLERANCES["fp32"]["logits_max_abs"][1], k
        assert list(new.stream_tokens(images, prompt, 6)) == list(old.stream_tokens(images, prompt, 6)) == cont
        assert new.verbalize(images, prompt, 4) == old.verbalize(images, prompt, 4) == ref.verbalize(images, prompt, 4)


def test_prefix_reuse_with_the_split_cache(onnx_artifact):
    """A follow-up reuses the KV cache held across the segments and answers as a fresh prefill."""
    rt = vlsi_runtimes.load(onnx_artifact)
    first = [{"role": "user", "content": [{"type": "image", "image": _img(2)}, {"type": "text", "text": "Describe."}]}]
    said = rt.decode(list(rt.stream_tokens(first, None, 4, ignore_eos=True)))
    follow = [*first, {"role": "assistant", "content": said}, {"role": "user", "content": "And the colour?"}]
    stats: dict = {}
    reused = list(rt.stream_tokens(follow, None, 6, stats=stats))
    assert stats["cached_tokens"] > 0
    rt.forget()
    assert list(rt.stream_tokens(follow, None, 6, reuse=False)) == reused
    held = len(rt._entry.keys)  # every segment's layers hold every position fed
    assert all(k.shape[2] == v.shape[2] == held for k, v in rt._entry.state["past"])


def test_manifest_round_trip_and_damaged_splits(onnx_artifact, tmp_path):
    m = load_manifest(onnx_artifact)
    again = Manifest.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again == m and again.decoder_split.split_layers == [1, 3, 5]
    bad = tmp_path / "a"
    shutil.copytree(onnx_artifact, bad)
    d = json.loads((bad / "manifest.json").read_text())
    d["decoder_split"]["segments"][1]["graph"] = "decoder_9"
    (bad / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match=r"decoder_split names graphs \['decoder_9'\].*re-export"):
        load_manifest(bad, verify=False)
    d["decoder_split"]["segments"][1] = {"graph": "decoder_1"}
    (bad / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="decoder_split is malformed"):
        load_manifest(bad, verify=False)
    d = json.loads((onnx_artifact / "manifest.json").read_text())
    d["decoder_split"]["segments"][2]["first_layer"] = 5  # layer 4 would be skipped
    (bad / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="decoder_2 .* does not continue the one before it; re-export"):
        vlsi_runtimes.load(bad)


def test_split_layers_option(tiny_ckpt, tmp_path):
    """--split-layers cuts where asked, without verbalizers too; layers that do not exist are refused."""
    out = get_target("onnx")(tiny_ckpt, tmp_path / "s", split_layers="4,2", validate=False)
    m = load_manifest(out)
    assert [(s.first_layer, s.last_layer) for s in m.decoder_split.segments] == [(1, 2), (3, 4), (5, 6)]
    assert m.verbalizers == [] and m.decoder_split.verbalizers == []
    rt, ref = vlsi_runtimes.load(out), vlsi_runtimes.load(tiny_ckpt)
    assert list(rt.stream_tokens([_img(3)], "what?", 5)) == list(ref.stream_tokens([_img(3)], "what?", 5))
    for spec, needle in [("6", r"\[6\] out of range.*after layers 1..5"), ("two", "give 1-based layers")]:
        with pytest.raises(ConfigError, match=f"--split-layers.*{needle}"):
            get_target("onnx")(tiny_ckpt, tmp_path / spec, split_layers=spec, validate=False)
        assert not (tmp_path / spec).exists()
