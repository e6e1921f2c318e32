"""The quickstart's teacher-labelled pool holds images the teacher never trained on, and VLsI's
per-layer accuracies are read with heads refitted to its final weights (issue 15)."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlsi.data.synth import SPLITS, SynthConfig, generate
from vlsi.errors import ConfigError
from vlsi_train.quickstart import Recipe, Run, table
from vlsi_train.teacher_labels import shared_images

SMALL = dict(n=400, n_eval=60, image_size=28, grid=2, min_objects=1, max_objects=1, families=["colour", "shape"],
             mc=False, seed=3)
"""A scene space small enough that independent draws repeat images."""


def _digests(root: Path, split: str) -> dict[str, str]:
    return {r["id"]: hashlib.sha256((root / r["image"]).read_bytes()).hexdigest()
            for r in json.loads((root / f"{split}.json").read_text())}


def test_pool_split_is_fresh_and_leaves_the_other_splits_unchanged(tmp_path):
    generate(tmp_path / "with", SynthConfig(**SMALL, n_pool=120), progress=False)
    generate(tmp_path / "without", SynthConfig(**SMALL), progress=False)
    for split in SPLITS:  # the same bytes: a cached teacher trained on train stays valid
        assert (tmp_path / "with" / f"{split}.json").read_bytes() == (tmp_path / "without" / f"{split}.json").read_bytes()
        assert _digests(tmp_path / "with", split) == _digests(tmp_path / "without", split)
    assert not (tmp_path / "without" / "pool.json").exists()
    train, pool = _digests(tmp_path / "with", "train"), _digests(tmp_path / "with", "pool")
    assert len(pool) == 120 and all(i.startswith("pool_") for i in pool) and not set(pool) & set(train)
    assert not set(pool.values()) & set(train.values())  # no pool image is byte-equal to a train image
    # that is the redraw's doing, not luck: splits drawn independently here do repeat train images
    assert set(_digests(tmp_path / "with", "test").values()) & set(train.values())
    meta = json.loads((tmp_path / "with" / "meta.json").read_text())
    assert meta["counts"]["pool"] == 120 and meta["config"]["n_pool"] == 120
    assert shared_images(tmp_path / "with" / "pool.json", tmp_path / "with" / "train.json") == []
    assert shared_images(tmp_path / "with" / "test.json", tmp_path / "with" / "train.json")
    with pytest.raises(ConfigError, match="n_pool"):
        SynthConfig(n_pool=-1)


RECIPE = Recipe(synth={k: v for k, v in SMALL.items() if k != "seed"}, pool=60, batch_size=4, refit_steps=3,
                student_targets="1::2")


def test_the_quickstart_pool_is_never_the_teachers_training_data(tmp_path):
    """The pool the teacher answers comes from the fresh split; ``fresh_pool=False`` keeps the
    earlier design (the teacher's own train images); a labelled pool left by that design is
    refused, not reused."""
    run = Run(tmp_path / "qs", RECIPE, seed=0, progress=False)
    data = run.data()
    assert run.pool_images(data) == data / "pool.json"
    assert len(json.loads((data / "pool.json").read_text())) == RECIPE.pool
    assert shared_images(run.pool_images(data), data / "train.json") == []
    old = Run(tmp_path / "old", replace(RECIPE, fresh_pool=False), seed=0, progress=False)
    assert old.pool_images(old.data()) == old.out / "data" / "train.json"
    assert not (old.out / "data" / "pool.json").exists()
    # a pool_teacher.json labelled on train images (an older recipe's) is caught
    stale = [{**r, "image": str(data / r["image"])} for r in json.loads((data / "train.json").read_text())[:60]]
    (run.out / "pool_teacher.json").write_text(json.dumps(stale))
    with pytest.raises(ConfigError, match="fresh_pool.*new --out folder"):
        run.teacher_answers(tmp_path / "no-teacher-needed", data)
    # a data folder written without the pool split gets one
    later = Run(tmp_path / "old", RECIPE, seed=0, progress=False)
    assert (later.data() / "pool.json").is_file()


def test_refit_moves_only_the_heads(tiny_ckpt, synth_data, tmp_path):
    shutil.copytree(tiny_ckpt, tmp_path / "vlsi")
    run = Run(tmp_path, RECIPE, seed=0, progress=False)
    out = run.refit_heads(tmp_path / "vlsi", synth_data / "train.json")
    assert out == tmp_path / "vlsi_refit"
    before, after = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "vlsi", out))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    hb, ha = (load_file(str(d / "verbalizers.safetensors")) for d in (tmp_path / "vlsi", out))
    assert any(not torch.equal(hb[k], ha[k]) for k in hb)
    prov = json.loads((out / "vlsi.json").read_text())["provenance"]
    assert prov["stage"] == "verbalize" and prov["steps"] == RECIPE.refit_steps


@pytest.mark.parametrize("refit_steps", [3, 0])
def test_vlsi_per_layer_accuracy_is_read_with_refitted_heads(tmp_path, monkeypatch, refit_steps):
    import vlsi.eval

    calls = []

    def fake_evaluate(model_dir, data_path, verbalize=False, **kw):
        calls.append((Path(model_dir).name, Path(data_path).stem, verbalize))
        rep = {"accuracy": 0.5}
        if verbalize:
            rep["per_layer_accuracy"] = {"2": 0.9 if Path(model_dir).name.endswith("_refit") else 0.1}
        return rep

    monkeypatch.setattr(vlsi.eval, "evaluate", fake_evaluate)
    monkeypatch.setattr(Run, "refit_heads", lambda self, model, pool: model.parent / f"{model.name}_refit")
    names = ("teacher", "student", "sft_equal_compute", "seq_kd", "final_layer_kd", "vlsi")
    paths = {n: tmp_path / n for n in names} | {"data": tmp_path / "data", "pool": tmp_path / "pool.json"}
    run = Run(tmp_path / "qs", replace(RECIPE, refit_steps=refit_steps), seed=0, progress=False)
    res = run.evaluate(paths)
    refit = refit_steps > 0
    assert res["per_layer_verbalizer_acc"]["vlsi"] == {"2": 0.9 if refit else 0.1}
    assert ("vlsi", "test", not refit) in calls  # the method's own accuracy: its own checkpoint
    assert (("vlsi_refit", "test", True) in calls) == refit
    assert res["per_layer_verbalizer_acc"]["teacher"] == {"2": 0.1}  # fitted in its own verbalize step
    note = res["per_layer_verbalizer_heads"]["vlsi"]
    assert ("refitted to the final weights" in note) == refit
    assert f"vlsi per-layer verbalizer accuracy (test; heads {note})" in table(res)
