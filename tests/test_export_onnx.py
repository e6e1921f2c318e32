"""``vlsi export --target onnx``: the artifact folder, its manifest, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

import vlsi_runtimes  # noqa: E402
from vlsi.errors import ConfigError  # noqa: E402
from vlsi.manifest import ArtifactError, load_manifest  # noqa: E402
from vlsi_export import get_target, targets  # noqa: E402


@pytest.fixture(scope="module")
def artifact(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "fp32"
    get_target("onnx")(tiny_ckpt, out, quant="fp32", verbalizers=True, parity_samples=4)
    return out


def test_targets_registry():
    assert "onnx" in targets()
    with pytest.raises(ConfigError, match="available: .*onnx"):
        get_target("coreml")


@pytest.mark.slow
def test_artifact_layout_and_manifest(artifact, tiny_ckpt):
    m = load_manifest(artifact)
    assert m.target == "onnx" and m.verbalizers == [1, 3, 5] and m.precision == "fp32"
    segments = [f"decoder_{j}" for j in range(4)]  # cut after each kept verbalizer layer: 1 | 2-3 | 4-5 | 6
    heads = [f"verbalizer_{k}" for k in (1, 3, 5)]
    assert set(m.graphs) == {"vision", "embed", *segments, "lm_head", *heads}
    assert [s.graph for s in m.decoder_split.segments] == segments and m.decoder_split.split_layers == [1, 3, 5]
    assert [h.graph for h in m.decoder_split.verbalizers] == heads and m.decoder_split.lm_head.graph == "lm_head"
    assert m.format_version == 3
    assert {"decoder_0.onnx", "lm_head.onnx", "verbalizer_1.onnx", "vision.onnx", "embed.onnx", "tokenizer.json",
            "preprocessor_config.json"} <= set(m.files)
    from vlsi.manifest import folder_hash

    assert m.source["sha256"] == folder_hash(tiny_ckpt)
    assert "onnxruntime" in m.tools and "torch" in m.tools
    assert not any(p.name.startswith(".") for p in artifact.parent.iterdir())  # no temp folders left


@pytest.mark.slow
def test_damaged_artifacts_are_named(artifact, tmp_path):
    bad = tmp_path / "a"
    shutil.copytree(artifact, bad)
    f = bad / "decoder_1.onnx"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="decoder_1.onnx.*truncated"):
        load_manifest(bad)
    shutil.rmtree(bad)
    shutil.copytree(artifact, bad)
    data = bytearray((bad / "vision.onnx").read_bytes())
    data[-1] ^= 1
    (bad / "vision.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="vision.onnx does not match its sha256"):
        load_manifest(bad)
    (bad / "embed.onnx").unlink()
    m = json.loads((bad / "manifest.json").read_text())
    with pytest.raises(ArtifactError, match="embed.onnx is listed"):
        load_manifest(bad, verify=True)
    m["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="upgrade vlsi"):
        load_manifest(bad, verify=False)


def test_refusals(tmp_path, tiny_ckpt):
    from vlsi.tiny import save_tiny

    with pytest.raises(ConfigError, match="--quant 'int3'"):
        get_target("onnx")(tiny_ckpt, tmp_path / "x", quant="int3")
    bare = save_tiny(tmp_path / "bare")
    with pytest.raises(ConfigError, match="--verbalizers"):
        get_target("onnx")(bare, tmp_path / "y", verbalizers=True)
    with pytest.raises(ConfigError, match="the onnx target has no option --mmproj-quant; its options: .*--quant"):
        get_target("onnx")(tiny_ckpt, tmp_path / "z", mmproj_quant="q8_0")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def _chain(folder, m, feed_embeds) -> tuple[np.ndarray, dict]:
    """The split decoder of artifact ``folder`` on an empty cache, run graph by graph with ONNX
    Runtime: the last position's final logits and every verbalizer's."""
    import onnxruntime as ort

    def run(graph, feed):
        g = m.graph(graph)
        return dict(zip(g.outputs, ort.InferenceSession(str(folder / g.file)).run(g.outputs, feed)))

    n = feed_embeds.shape[1]
    common = {"attention_mask": np.ones((1, n), np.int64),
              "position_ids": np.broadcast_to(np.arange(n), (3, 1, n)).copy(), "row_wise": np.array(False)}
    empty = np.zeros((1, m.model["num_kv_heads"], 0, m.model["head_dim"]), np.float32)
    h, captured = feed_embeds, {}
    for s in m.decoder_split.segments:
        feed = {s.hidden_in: h, **common}
        layers = range(s.first_layer - 1, s.last_layer)
        feed.update({f"past_{kind}_{i}": empty for i in layers for kind in ("key", "value")})
        h = run(s.graph, feed)[s.hidden_out]
        captured[s.last_layer] = h
    head = m.decoder_split.lm_head
    final = run(head.graph, {head.input: h[:, -1:]})["logits"][0, -1]
    verb = {v.layer: run(head.graph, {head.input: run(v.graph, {v.input: captured[v.layer][:, -1:]})[v.output]})
            ["logits"][0, -1] for v in m.decoder_split.verbalizers}
    return final, verb


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp16", "int8", "int8-nbits", "int4"])
def test_quantised_decoders_stay_close(tiny_ckpt, artifact, tmp_path, quant):
    """Each precision runs in ONNX Runtime and stays near the fp32 graphs on the same inputs,
    every segment, the LM head and every verbalizer head quantised; the block-wise ones
    (MatMulNBits) give each row of a batch exactly what that row gives alone."""
    # parity gating is tested below; here the graphs themselves are compared with fp32
    out = get_target("onnx")(tiny_ckpt, tmp_path / quant, quant=quant, verbalizers=True, validate=False)
    mq = load_manifest(out)
    decoder = {name: g for name, g in mq.graphs.items() if name not in ("vision", "embed")}
    assert len(decoder) == 4 + 1 + 3 and {g.precision for g in decoder.values()} == {quant} == {mq.precision}
    m = load_manifest(artifact)
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((1, 6, m.model["hidden_size"])).astype(np.float32)
    ref, ref_verb = _chain(artifact, m, embeds)
    got, got_verb = _chain(out, mq, embeds)
    tol = {"fp16": 1e-2, "int8": 0.1, "int8-nbits": 0.1, "int4": 0.3}[quant]
    for a, b in [(got, ref), *((got_verb[k], ref_verb[k]) for k in ref_verb)]:
        assert np.abs(a - b).max() < tol * max(1.0, np.abs(b).max())
    if quant in ("int8-nbits", "int4"):  # what self-speculative decoding's exactness rests on
        invariant = _rows_invariant(out / mq.graph("lm_head").file, mq.model["hidden_size"])
        # 8-bit blocks: on every CPU tried; int4: not on an AVX2-only EPYC (its one-row kernel),
        # where the runtime finds it and refuses to speculate (tests/test_speculative.py)
        assert invariant or quant == "int4"
        assert vlsi_runtimes.load(out)._rows_invariant() == invariant
    if quant in ("int8", "int8-nbits", "int4"):  # every weight product is quantised, the LM and verbalizer heads included
        import onnx

        for name, entry in decoder.items():
            g = onnx.load(str(out / entry.file)).graph
            weights = {t.name for t in g.initializer}
            left = [n.name for n in g.node if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input)]
            assert not left, f"{quant} {name}: float weight products left: {left}"


def _rows_invariant(path, hidden: int) -> bool:
    """Whether graph ``path`` (``(1, T, hidden) -> (1, T, V)``) gives every row of 7 exactly what it gives alone."""
    sess = ort.InferenceSession(str(path))
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(1).standard_normal((1, 7, hidden)).astype(np.float32)
    together = sess.run(None, {name: x})[0]
    return all(np.array_equal(sess.run(None, {name: x[:, t:t + 1]})[0][0, 0], together[0, t]) for t in range(7))


@pytest.mark.slow
def test_fp32_weight_products_are_batch_invariant(artifact):
    """fp32's LM head gives each row of a batch bit for bit what the row gives alone (what
    verifying several drafted tokens in one pass needs to equal decoding them one by one)."""
    m = load_manifest(artifact)
    assert _rows_invariant(artifact / m.graph("lm_head").file, m.model["hidden_size"])


@pytest.mark.slow
def test_export_passes_parity_and_records_it(artifact, tiny_ckpt):
    m = load_manifest(artifact)
    assert m.parity["passed"] and m.parity["metrics"]["greedy_match"] == 1.0
    assert m.parity["metrics"]["logits_max_abs"] < 1e-4
    assert all((artifact / name).is_file() for name in ("parity.json", "parity.md", "parity.png"))
    # the reports are not hashed payload: validating again (which rewrites them) keeps the artifact loadable
    assert not {"parity.json", "parity.md", "parity.png"} & set(m.files)
    from vlsi_export.parity import validate

    validate(artifact, tiny_ckpt, n=2)
    assert json.loads((artifact / "parity.json").read_text())["metrics"]["samples"] == 2
    load_manifest(artifact)


@pytest.mark.slow
def test_failed_parity_refuses_the_export(tiny_ckpt, tmp_path):
    """An untrained model's near-flat distributions make int4 flip its verbalizers' argmax:
    the gate must refuse the export, leave no artifact, and keep the report."""
    from vlsi_export.parity import ParityError

    # on the built-in samples (no --data), the error says how to check on the model's own data
    with pytest.raises(ParityError, match=r"(?s)verbalizer_top1 = .* needs >= 0.9.*built-in synthetic samples.*--data"):
        get_target("onnx")(tiny_ckpt, tmp_path / "int4", quant="int4", verbalizers=True, parity_samples=4)
    assert not (tmp_path / "int4").exists()
    report = json.loads((tmp_path / "int4.parity-failed" / "parity.json").read_text())
    assert report["passed"] is False and report["failures"]
