"""The quickstart pipeline end to end on a miniature recipe (plumbing, not accuracy)."""

from __future__ import annotations

import json

import pytest

from vlsi_train.quickstart import METHODS, Recipe, quickstart

MINI = Recipe(
    synth={"n": 64, "n_eval": 12, "image_size": 56, "min_objects": 1, "max_objects": 1,
           "families": ["colour", "shape"]},
    teacher_steps=40, student_labels=16, student_steps=3, pool=32, extra_steps=4, verbalize_steps=2,
    teacher_targets="1::2", student_targets="2::2", batch_size=8,
)


@pytest.mark.slow
def test_quickstart_report(tmp_path, monkeypatch):
    monkeypatch.setenv("VLSI_CACHE", str(tmp_path / "cache"))
    rep = quickstart(tmp_path / "qs", seed=0, recipe=MINI, progress=False)
    on_disk = json.loads((tmp_path / "qs" / "report.json").read_text())
    assert on_disk["seed"] == 0 and on_disk["seconds"] > 0
    for m in METHODS:
        for split in ("test", "compositional"):
            assert 0.0 <= on_disk[f"{m}_acc"][split] <= 1.0
    assert set(on_disk["per_layer_verbalizer_acc"]["vlsi"]) == {"2", "4"}  # one head + the model head
    assert (tmp_path / "qs" / "report.md").read_text().startswith("| method |")
    # every method started from the same student and had the same extra steps
    steps = {}
    for name in ("sft_equal_compute", "seq_kd"):
        steps[name] = json.loads((tmp_path / "qs" / name / "vlsi.json").read_text())["provenance"]["steps"]
    for name in ("final_layer_kd", "vlsi"):
        tail = json.loads((tmp_path / "qs" / name / "vlsi.json").read_text())["provenance"]["steps"]
        inter = json.loads((tmp_path / "qs" / f"{name}_interact" / "vlsi.json").read_text())["provenance"]["steps"]
        steps[name] = tail + inter
    assert set(steps.values()) == {MINI.extra_steps}
    # the teacher is cached: a second run (new folder) reuses it
    def teachers():
        return sorted(p for p in (tmp_path / "cache" / "teachers").iterdir() if (p / "vlsi.json").is_file())

    cached = teachers()
    assert len(cached) == 1
    mtime = (cached[0] / "model.safetensors").stat().st_mtime
    quickstart(tmp_path / "qs2", seed=0, recipe=MINI, progress=False)
    assert teachers() == cached and (cached[0] / "model.safetensors").stat().st_mtime == mtime
    assert rep["vlsi_acc"] == on_disk["vlsi_acc"]
    # a finished folder is not reused for a different recipe (stale results would be reported)
    from dataclasses import replace

    from vlsi.errors import ConfigError

    with pytest.raises(ConfigError, match="different settings.*steps"):
        quickstart(tmp_path / "qs2", seed=0, recipe=replace(MINI, student_steps=4), progress=False)


@pytest.mark.slow
def test_ablation_grid(tmp_path, monkeypatch):
    from vlsi_train.ablate import ablate, read_grid

    monkeypatch.setenv("VLSI_CACHE", str(tmp_path / "cache"))
    grid = tmp_path / "g.yaml"
    grid.write_text("variants:\n  - {name: KLD/KLD, interact: {}}\n  - {name: random index, interact: {matching: random}}\n")
    res = ablate(grid, tmp_path / "ab", seeds=2, recipe=MINI, progress=False)
    lines = (tmp_path / "ab" / "ablation.md").read_text().splitlines()
    assert lines[2].startswith("| KLD/KLD |") and lines[3].startswith("| random index |")
    assert len(res["results"]["random index"]["test"]["runs"]) == 2
    rows = [json.loads(x) for x in (tmp_path / "ab" / "ablate" / "random-index" / "seed1_interact" / "training"
                                    / "metrics.jsonl").read_text().splitlines()]
    assert all("matched" in r for r in rows)
    # the pieces the grid builds on were made once
    assert (tmp_path / "ab" / "student_verb" / "vlsi.json").is_file()

    bad = tmp_path / "bad.yaml"
    bad.write_text("variants:\n  - {name: x, interact: {matcher: random}}\n")
    from vlsi.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown interact keys.*matcher"):
        read_grid(bad)


@pytest.mark.slow
def test_demo_model_runs_the_quickstart_then_exports(tmp_path, monkeypatch):
    """`vlsi demo` with no model: the quickstart runs if its output is missing, then its VLsI
    student is exported to ONNX with the verbalizers, once."""
    pytest.importorskip("onnxruntime")
    from vlsi.manifest import load_manifest
    from vlsi_cli.demo import demo_model

    monkeypatch.setenv("VLSI_CACHE", str(tmp_path / "cache"))
    art = demo_model(tmp_path / "qs", recipe=MINI)
    assert (tmp_path / "qs" / "report.json").is_file()
    m = load_manifest(art)
    assert m.target == "onnx" and m.verbalizers == [2]
    stamp = (art / "manifest.json").stat().st_mtime
    assert demo_model(tmp_path / "qs", recipe=MINI) == art and (art / "manifest.json").stat().st_mtime == stamp


class _Job:
    progress = True

    def square(self, x):
        if x < 0:
            raise ValueError(f"negative {x}")
        import torch

        return x * x, torch.get_num_threads()


def test_run_parallel_keeps_order_and_raises():
    from vlsi_train.quickstart import run_parallel

    res = run_parallel([(_Job(), "square", (k,)) for k in range(5)], jobs=2, progress=False)
    assert [r for (r, _), _ in res] == [k * k for k in range(5)]
    assert {threads for (_, threads), _ in res} == {1}  # one torch thread per worker
    with pytest.raises(ValueError, match="negative -3"):
        run_parallel([(_Job(), "square", (2,)), (_Job(), "square", (-3,))], jobs=2, progress=False)


@pytest.mark.slow
def test_parallel_methods_train_what_one_process_trains(tmp_path, monkeypatch):
    """The four methods on 2 worker processes give the same weights as one after the other
    in this process (both with one torch thread)."""
    import torch
    from safetensors.torch import load_file

    monkeypatch.setenv("VLSI_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the prepared pieces are trained in this process: same thread count for both runs
        one = quickstart(tmp_path / "one", seed=0, recipe=MINI, progress=False, jobs=1)
        two = quickstart(tmp_path / "two", seed=0, recipe=MINI, progress=False, jobs=2)
    finally:
        torch.set_num_threads(threads)
    for m in ("sft_equal_compute", "seq_kd", "final_layer_kd", "vlsi"):
        a = load_file(tmp_path / "one" / m / "model.safetensors")
        b = load_file(tmp_path / "two" / m / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), m
        assert one[f"{m}_acc"] == two[f"{m}_acc"]


@pytest.mark.slow
def test_long_runs_go_to_torchrun(tmp_path, monkeypatch):
    """With jobs > 1, runs of at least DDP_MIN_STEPS train under torchrun (2 DDP processes)."""
    import vlsi_train.quickstart as qs

    monkeypatch.setenv("VLSI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(qs, "DDP_MIN_STEPS", 10)
    run = qs.Run(tmp_path / "qs", MINI, seed=0, progress=False, procs=2)
    teacher = run.teacher(run.data())
    assert json.loads((teacher / "vlsi.json").read_text())["provenance"]["processes"] == 2
    # shorter runs stay in this process
    student = run._train(tmp_path / "qs" / "student", stage="pretrain", model=MINI.student,
                         data=str(run.data() / "train.json"), steps=4)
    assert json.loads((student / "vlsi.json").read_text())["provenance"]["processes"] == 1
    # a run that fails under torchrun says so, and how to train in this process instead
    from vlsi.errors import VLsIError

    with pytest.raises(VLsIError, match="under torchrun failed.*--jobs 1"):
        run._train(tmp_path / "qs" / "bad", stage="pretrain", model="tiny:qs_student",
                   data=str(tmp_path / "missing.json"), steps=12)
    assert not (tmp_path / "qs" / "bad" / "vlsi.json").exists()
