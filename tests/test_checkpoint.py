"""Checkpoint round trip, atomic writes, and named errors for damaged folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vlsi.checkpoint import VERBALIZERS_FILE, load_checkpoint, save_checkpoint
from vlsi.errors import CheckpointError, VLsIError


def test_round_trip(tiny_ckpt, tmp_path):
    ck = load_checkpoint(tiny_ckpt)
    assert ck.meta["adapter"] == "qwen2_vl"
    assert ck.verbalizers.target_layers == (1, 3, 5)
    with torch.no_grad():
        for p in ck.verbalizers.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # make the heads non-trivial
    out = save_checkpoint(tmp_path / "copy", ck.model, ck.tokenizer, ck.image_processor, ck.verbalizers,
                          provenance={"test": 1})
    again = load_checkpoint(out)
    for (k, a), (_, b) in zip(ck.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
    for (k, a), (_, b) in zip(ck.verbalizers.state_dict().items(), again.verbalizers.state_dict().items()):
        assert torch.equal(a, b), k
    assert again.meta["provenance"] == {"test": 1}
    assert again.tokenizer.to_str() == ck.tokenizer.to_str()


def test_transformers_loads_the_folder_unchanged(tiny_ckpt):
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    assert AutoConfig.from_pretrained(str(tiny_ckpt)).model_type == "qwen2_vl"
    m = Qwen2VLForConditionalGeneration.from_pretrained(str(tiny_ckpt))
    assert m.config.text_config.num_hidden_layers == 6


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_model_file_is_named(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "c")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(d)


def test_truncated_verbalizer_file_is_named(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "c")
    f = d / VERBALIZERS_FILE
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=VERBALIZERS_FILE):
        load_checkpoint(d)


def test_verbalizer_keys_must_match_the_config(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "c")
    meta = json.loads((d / "vlsi.json").read_text())
    meta["verbalizers"]["target_layers"] = [1, 2]
    (d / "vlsi.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="keys do not match"):
        load_checkpoint(d)


def test_verbalizer_shapes_are_checked(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "c")
    meta = json.loads((d / "vlsi.json").read_text())
    meta["verbalizers"]["arch"] = "ffn"  # same keys, 4x inner width
    (d / "vlsi.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_checkpoint(d)


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json", "preprocessor_config.json", VERBALIZERS_FILE])
def test_missing_files_are_named(tiny_ckpt, tmp_path, missing):
    d = _copy(tiny_ckpt, tmp_path / "c")
    (d / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        load_checkpoint(d)


def test_newer_format_is_refused(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "c")
    meta = json.loads((d / "vlsi.json").read_text())
    meta["format_version"] = 99
    (d / "vlsi.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="upgrade vlsi"):
        load_checkpoint(d)


def test_failed_save_leaves_nothing_and_keeps_the_old_folder(tiny_ckpt, tmp_path):
    ck = load_checkpoint(tiny_ckpt)
    target = _copy(tiny_ckpt, tmp_path / "keep")
    before = sorted(p.name for p in target.iterdir())

    class Broken:
        def save_pretrained(self, _):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, ck.model, ck.tokenizer, Broken(), ck.verbalizers)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]  # no temp folder left behind
    load_checkpoint(target)


def test_refuses_to_overwrite_without_the_option(tiny_ckpt, tmp_path):
    from vlsi.tiny import save_tiny

    d = _copy(tiny_ckpt, tmp_path / "c")
    with pytest.raises(VLsIError, match="--overwrite"):
        save_tiny(d)
