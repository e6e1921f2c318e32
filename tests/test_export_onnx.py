"""``vlsi export --target onnx``: the artifact folder, its manifest, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

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
    assert set(m.graphs) == {"vision", "embed", "decoder"}
    outs = m.graph("decoder").outputs
    assert outs[:4] == ["logits", "verbalizer_logits_1", "verbalizer_logits_3", "verbalizer_logits_5"]
    assert {"decoder.onnx", "vision.onnx", "embed.onnx", "tokenizer.json", "preprocessor_config.json"} <= set(m.files)
    from vlsi.manifest import folder_hash

    assert m.source["sha256"] == folder_hash(tiny_ckpt)
    assert "onnxruntime" in m.tools and "torch" in m.tools
    assert not any(p.name.startswith(".") for p in artifact.parent.iterdir())  # no temp folders left


@pytest.mark.slow
def test_damaged_artifacts_are_named(artifact, tmp_path):
    bad = tmp_path / "a"
    shutil.copytree(artifact, bad)
    f = bad / "decoder.onnx"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="decoder.onnx.*truncated"):
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


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp16", "int8", "int4"])
def test_quantised_decoders_stay_close(tiny_ckpt, artifact, tmp_path, quant):
    """Each precision runs in ONNX Runtime and stays near the fp32 graph on the same inputs."""
    import onnxruntime as ort

    # parity gating is tested below; here the graphs themselves are compared with fp32
    out = get_target("onnx")(tiny_ckpt, tmp_path / quant, quant=quant, verbalizers=True, validate=False)
    assert load_manifest(out).graph("decoder").precision == load_manifest(out).precision == quant
    m = load_manifest(artifact).model
    rng = np.random.default_rng(0)
    feed = {"inputs_embeds": rng.standard_normal((1, 6, m["hidden_size"])).astype(np.float32),
            "attention_mask": np.ones((1, 6), np.int64),
            "position_ids": np.broadcast_to(np.arange(6), (3, 1, 6)).copy()}
    for i in range(m["num_layers"]):
        for kind in ("key", "value"):
            feed[f"past_{kind}_{i}"] = np.zeros((1, m["num_kv_heads"], 0, m["head_dim"]), np.float32)
    ref = ort.InferenceSession(str(artifact / "decoder.onnx")).run(["logits"], feed)[0]
    got = ort.InferenceSession(str(out / "decoder.onnx")).run(["logits"], feed)[0]
    tol = {"fp16": 1e-2, "int8": 0.1, "int4": 0.3}[quant]
    assert np.abs(got - ref).max() < tol * max(1.0, np.abs(ref).max())
    if quant in ("int8", "int4"):  # every weight product is quantised, the LM and verbalizer heads included
        import onnx

        g = onnx.load(str(out / "decoder.onnx")).graph
        weights = {t.name for t in g.initializer}
        left = [n.name for n in g.node if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input)]
        assert not left, f"{quant}: float weight products left: {left}"


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

    with pytest.raises(ParityError, match="verbalizer_top1 = .* needs >= 0.9"):
        get_target("onnx")(tiny_ckpt, tmp_path / "int4", quant="int4", verbalizers=True, parity_samples=4)
    assert not (tmp_path / "int4").exists()
    report = json.loads((tmp_path / "int4.parity-failed" / "parity.json").read_text())
    assert report["passed"] is False and report["failures"]
