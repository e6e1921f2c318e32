"""Training stages on tiny models: what trains, what stays frozen, what is written, and the
refusals the method requires."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from vlsi.checkpoint import load_checkpoint
from vlsi.config import load_config
from vlsi.errors import ConfigError
from vlsi_train.config import TrainConfig
from vlsi_train.pipeline import run, stage_configs
from vlsi_train.trainer import Trainer, train


def _file_hashes(folder) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=4, batch_size=4, log_every=2, progress=False, threads=2)
    base.update(kw)
    return load_config(TrainConfig, None, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def pair(tmp_path_factory, synth_data):
    """Teacher and student with verbalizers (a few steps each: behaviour, not accuracy)."""
    root = tmp_path_factory.mktemp("pair")
    data = str(synth_data / "train.json")
    train(_cfg(stage="pretrain", model="tiny:teacher", data=data, out=str(root / "t")))
    train(_cfg(stage="pretrain", model="tiny:student", data=data, out=str(root / "s")))
    train(_cfg(stage="verbalize", model=str(root / "t"), data=data, out=str(root / "tv"),
               **{"verbalizer.target_layers": "1::1"}))
    train(_cfg(stage="verbalize", model=str(root / "s"), data=data, out=str(root / "sv"),
               **{"verbalizer.target_layers": "1::2"}))
    return root, data


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown config key interact.matcher; allowed keys here:.*matching"):
        load_config(TrainConfig, None, ["data=x", "out=y", "interact.matcher=random"])
    with pytest.raises(ConfigError, match="interact.matching='nearest' is not allowed; choose one of: multinomial"):
        load_config(TrainConfig, None, ["data=x", "out=y", "interact.matching=nearest"])
    with pytest.raises(ConfigError, match="steps must be an integer"):
        load_config(TrainConfig, None, ["data=x", "out=y", "steps=many"])
    with pytest.raises(ConfigError, match="teacher=PATH"):
        load_config(TrainConfig, None, ["data=x", "out=y", "stage=interact"])


def test_pipeline_entries_override_defaults(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("data: d.json\nsteps: 10\ninteract: {matching: random}\npipeline:\n"
                 "  - {stage: verbalize, model: a, out: b}\n"
                 "  - {stage: interact, model: b, teacher: t, out: c, interact: {last_op: none}}\n")
    cfgs = stage_configs(f, ["steps=7"])
    assert [c.stage for c in cfgs] == ["verbalize", "interact"]
    assert all(c.steps == 7 for c in cfgs)
    assert cfgs[1].interact.matching == "random" and cfgs[1].interact.last_op == "none"


def test_pretrain_learns_and_writes_a_plain_checkpoint(pair):
    root, _ = pair
    rows = [json.loads(x) for x in (root / "s" / "training" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (root / "s" / "training" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((root / "s" / "vlsi.json").read_text())
    assert meta["provenance"]["stage"] == "pretrain" and meta["verbalizers"] is None


def test_verbalize_trains_only_the_heads(pair):
    root, _ = pair
    before = load_file(str(root / "s" / "model.safetensors"))
    after = load_file(str(root / "sv" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ck = load_checkpoint(root / "sv")
    assert ck.verbalizers.target_layers == (1, 3, 5)
    heads = load_file(str(root / "sv" / "verbalizers.safetensors"))
    assert any(k.endswith("down.weight") and v.abs().sum() > 0 for k, v in heads.items())  # moved off zero init
    rows = [json.loads(x) for x in (root / "sv" / "training" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_l1", "loss_l3", "loss_l5"} <= set(rows[0])


@pytest.mark.parametrize("lora", [True, False])
def test_interact_with_and_without_lora(pair, tmp_path, lora):
    root, data = pair
    out = tmp_path / "si"
    teacher_files = _file_hashes(root / "tv")
    trainer = Trainer(_cfg(stage="interact", model=str(root / "sv"), teacher=str(root / "tv"), data=data,
                           out=str(out), **{"lora.enabled": lora, "lora.r": 4, "lora.alpha": 4}))
    trainer.train()
    ck = load_checkpoint(out)  # plain checkpoint: LoRA merged, loads with key checks
    keys = load_file(str(out / "model.safetensors")).keys()
    assert not any("lora" in k for k in keys)
    rows = [json.loads(x) for x in (out / "training" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        (m,) = r["matched"]  # one micro-batch per step: three student layers -> teacher indices
        assert m == sorted(m) and len(set(m)) == 3 and all(0 <= j <= 7 - 3 + i for i, j in enumerate(m))
        assert r["loss"] == pytest.approx(r["loss_intermediate"] + r["loss_last"], rel=1e-4)
    assert (out / "training" / "matching.png").is_file()
    # the student changed, the teacher did not
    s0 = load_file(str(root / "sv" / "model.safetensors"))
    s1 = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)
    assert _file_hashes(root / "tv") == teacher_files  # nothing in the teacher's folder was rewritten
    t0 = load_checkpoint(root / "tv")  # and the teacher the loop held in memory was never updated
    held = trainer.teacher
    assert all(torch.equal(p, t0.model.state_dict()[k]) for k, p in held.model.state_dict().items())
    assert all(torch.equal(p, t0.verbalizers.state_dict()[k]) for k, p in held.verbalizers.state_dict().items())
    assert ck.verbalizers is not None


def test_sft_fraction_sets_the_steps(pair, tmp_path):
    root, data = pair
    out = tmp_path / "sft"
    train(_cfg(stage="sft", model=str(root / "sv"), data=data, out=str(out), steps=8, sft_fraction=0.5))
    rows = (out / "training" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4
    assert load_checkpoint(out).verbalizers is not None  # carried through untouched


def test_teacher_with_fewer_target_layers_is_refused(pair, tmp_path):
    root, data = pair
    train(_cfg(stage="verbalize", model=str(root / "t"), data=data, out=str(tmp_path / "tv2"), steps=1,
               **{"verbalizer.target_layers": "3,6"}))
    with pytest.raises(ConfigError, match="ts <= tl"):
        train(_cfg(stage="interact", model=str(root / "sv"), teacher=str(tmp_path / "tv2"), data=data,
                   out=str(tmp_path / "x")))


def test_teacher_with_another_vocabulary_is_refused(pair, tmp_path):
    root, data = pair
    from vlsi.tokenizer import build_tokenizer, save_tokenizer

    other = tmp_path / "t_other"
    import shutil

    shutil.copytree(root / "tv", other)
    save_tokenizer(build_tokenizer(["a completely different corpus " * 20]), other)
    with pytest.raises(ConfigError, match="share one vocabulary"):
        train(_cfg(stage="interact", model=str(root / "sv"), teacher=str(other), data=data, out=str(tmp_path / "x")))


def test_teacher_without_verbalizers_is_refused(pair, tmp_path):
    root, data = pair
    with pytest.raises(ConfigError, match="run the verbalize stage"):
        train(_cfg(stage="interact", model=str(root / "sv"), teacher=str(root / "t"), data=data,
                   out=str(tmp_path / "x")))


def test_pipeline_skips_finished_stages(pair, tmp_path, capsys):
    root, data = pair
    f = tmp_path / "p.yaml"
    f.write_text(f"data: {data}\nsteps: 2\nbatch_size: 4\nprogress: false\npipeline:\n"
                 f"  - {{stage: sft, model: {root / 'sv'}, out: {tmp_path / 'a'}}}\n"
                 f"  - {{stage: sft, model: {tmp_path / 'a'}, out: {tmp_path / 'b'}}}\n")
    run(f)
    run(f)
    assert capsys.readouterr().out.count("exists, skipped") == 2


@pytest.mark.slow
def test_bench_prints_every_mode(pair, tmp_path):
    from click.testing import CliRunner

    from vlsi_cli import main

    root, data = pair
    res = CliRunner().invoke(main, ["train", "bench", "--teacher", str(root / "tv"), "--student", str(root / "sv"),
                                    "--data", data, "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [r["mode"] for r in rows] == ["sft", "final_layer_kd", "interact"]
    assert all(r["s_per_step"] > 0 and r["peak_rss_mb"] > 0 for r in rows)
    assert rows[0]["x_sft"] == 1.0 and rows[1]["x_final_layer_kd"] == 1.0
    assert "| interact |" in res.output


def test_out_of_memory_names_the_knobs(pair, tmp_path, monkeypatch):
    from vlsi.errors import VLsIError
    from vlsi_train import trainer as tr

    root, data = pair

    def oom(self, idxs, tokens):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tr.Trainer, "_micro_loss", oom)
    with pytest.raises(VLsIError) as e:
        train(_cfg(stage="sft", model=str(root / "sv"), data=data, out=str(tmp_path / "x")))
    for knob in ("batch_size", "grad_accum", "gradient_checkpointing", "lora.enabled", "max_length"):
        assert knob in str(e.value)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_final_layer_kd_under_torchrun_leaves_the_student_heads_alone(pair, tmp_path):
    """interact with intermediate_op=none (final-layer KD) neither computes nor trains the
    student's verbalizers: under DDP with two processes it runs (unused parameters used to stop
    it at the second step) and the heads come out unchanged."""
    from vlsi.checkpoint import VERBALIZERS_FILE

    from .conftest import torchrun_train

    root, data = pair
    out = tmp_path / "flkd"
    args = ["stage=interact", f"model={root / 'sv'}", f"teacher={root / 'tv'}", f"data={data}", f"out={out}",
            "steps=6", "batch_size=4", "log_every=1", "progress=false", "threads=1", "interact.intermediate_op=none",
            "interact.last_op=kld"]
    res = torchrun_train(2, args)
    assert res.returncode == 0, res.stderr[-3000:]
    before, after = (load_file(str(d / VERBALIZERS_FILE)) for d in (root / "sv", out))
    assert before and before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


# ---------------------------------------------------------------- what interaction trains (issue 15)
LM_HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"  # as model.safetensors names them


def _changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("overrides, frozen", [
    ({}, {LM_HEAD, EMBED, "heads"}),  # the paper's reading, the default
    ({"interact.freeze": [], "interact.train_student_verbalizers": True}, set()),  # the earlier behaviour
    ({"interact.freeze": ["lm_head"], "interact.train_student_verbalizers": True}, {LM_HEAD}),
    ({"interact.freeze": ["embed_tokens", "vision_tower"]}, {EMBED, "heads", "visual"}),
])
def test_interact_with_full_fine_tuning_freezes_what_is_asked(pair, tmp_path, overrides, frozen):
    """With lora.enabled=false, interact.freeze keeps the named parts bit-identical (the LM head
    and the input embeddings by default, as the paper's interaction trains neither) and
    interact.train_student_verbalizers says whether the student's heads move; everything else
    trains."""
    from vlsi.checkpoint import VERBALIZERS_FILE

    root, data = pair
    out = tmp_path / "si"
    trainer = Trainer(_cfg(stage="interact", model=str(root / "sv"), teacher=str(root / "tv"), data=data,
                           out=str(out), **overrides))
    trainer.train()
    moved = _changed(load_file(str(root / "sv" / "model.safetensors")), load_file(str(out / "model.safetensors")))
    heads_moved = _changed(load_file(str(root / "sv" / VERBALIZERS_FILE)), load_file(str(out / VERBALIZERS_FILE)))
    weights = load_file(str(out / "model.safetensors")).keys()
    should_stay = {k for k in weights if k in frozen or any(k.startswith(p + ".") for p in frozen)}
    assert not moved & should_stay, sorted(moved & should_stay)[:5]
    # every other weight that feeds the loss moved: each decoder layer, the vision tower, the final norm
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.5.mlp.down_proj.weight", "model.norm.weight",
              "visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.0.weight", LM_HEAD, EMBED):
        assert (k in moved) == (k not in should_stay), k
    assert bool(heads_moved) == ("heads" not in frozen)
    # frozen, not merely unused: nothing frozen is in the optimiser (DDP expects a gradient for each)
    trainable = {n for n, p in trainer.module.named_parameters() if p.requires_grad}
    assert ("model.lm_head.weight" in trainable) == (LM_HEAD not in frozen)
    assert any(n.startswith("verbalizers.") for n in trainable) == ("heads" not in frozen)


def test_freeze_names_are_checked():
    from vlsi_train.config import FREEZABLE
    from vlsi_train.models import freeze_parts
    from vlsi.tiny import build_tiny

    with pytest.raises(ConfigError, match="interact.freeze='lm_heads' is not allowed; choose one of: lm_head"):
        load_config(TrainConfig, None, ["data=x", "out=y", "interact.freeze=[lm_heads]"])
    with pytest.raises(ConfigError, match="interact.freeze.*twice"):
        load_config(TrainConfig, None, ["data=x", "out=y", "interact.freeze=[lm_head, lm_head]"])
    model = build_tiny("qwen2_vl", "student")[0]
    freeze_parts(model, FREEZABLE)  # every name resolves through the adapter
    assert not model.lm_head.weight.requires_grad and not model.model.visual.merger.mlp[0].weight.requires_grad
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.requires_grad


@pytest.mark.slow
def test_paper_faithful_interaction_under_torchrun(pair, tmp_path):
    """The default interaction (LM head, embeddings and student heads frozen, layer-wise term
    on) under DDP with two processes: runs past the second step and leaves those tensors
    bit-identical while the layers train."""
    from vlsi.checkpoint import VERBALIZERS_FILE

    from .conftest import torchrun_train

    root, data = pair
    out = tmp_path / "strict"
    args = ["stage=interact", f"model={root / 'sv'}", f"teacher={root / 'tv'}", f"data={data}", f"out={out}",
            "steps=6", "batch_size=4", "log_every=1", "progress=false", "threads=1"]
    res = torchrun_train(2, args)
    assert res.returncode == 0, res.stderr[-3000:]
    moved = _changed(load_file(str(root / "sv" / "model.safetensors")), load_file(str(out / "model.safetensors")))
    assert LM_HEAD not in moved and EMBED not in moved
    assert "model.layers.0.self_attn.q_proj.weight" in moved
    assert not _changed(load_file(str(root / "sv" / VERBALIZERS_FILE)), load_file(str(out / VERBALIZERS_FILE)))
    rows = [json.loads(x) for x in (out / "training" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["matched"]) == 1 for r in rows)


def test_drafter_heads_fit_the_models_own_head(pair, tmp_path):
    """verbalizer.fit=final on the model's own answers (`vlsi data answers`): the backbone stays
    as it was, the loss is the KL to the final head and falls, and the heads agree with the
    final head (teacher-forced on those answers) more often than heads fitted to the
    dataset's reference answers (today's verbalize stage) for as many steps on the same questions."""
    from click.testing import CliRunner

    from vlsi.data.loaders import load_records
    from vlsi_cli import main

    root, data = pair
    own = tmp_path / "own.json"
    res = CliRunner().invoke(main, ["data", "answers", "--model", str(root / "s"), "--data", data, "--out", str(own),
                                    "--limit", "24", "--max-new-tokens", "12"])
    assert res.exit_code == 0, res.output
    records, _ = load_records(own)
    assert 0 < len(records) <= 24
    kw = {"verbalizer.target_layers": "1::2", "steps": 30, "optim.lr": 3e-3}
    train(_cfg(stage="verbalize", model=str(root / "s"), data=str(own), out=str(tmp_path / "draft"),
               **{**kw, "verbalizer.fit": "final"}))
    train(_cfg(stage="verbalize", model=str(root / "s"), data=data, out=str(tmp_path / "labels"), limit=24, **kw))
    before = load_file(str(root / "s" / "model.safetensors"))
    after = load_file(str(tmp_path / "draft" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    rows = [json.loads(x) for x in (tmp_path / "draft" / "training" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    meta = json.loads((tmp_path / "draft" / "vlsi.json").read_text())
    assert meta["provenance"]["config"]["verbalizer"]["fit"] == "final"

    def agreement(path):
        """Share of (answer token, head) pairs where the head's argmax is the final head's, teacher-forced."""
        from vlsi.data.encode import Encoder
        from vlsi_train.trainer import StudentForward, _answer_select

        ck = load_checkpoint(path)
        enc = Encoder(ck.adapter, ck.tokenizer, ck.image_processor, ck.model.config)
        batch = enc.collate([enc.encode(r) for r in records])
        sel, _ = _answer_select(batch.pop("labels"))
        with torch.no_grad():
            final, heads = StudentForward(ck.model.eval(), ck.verbalizers.eval())(batch, sel, True)
        best = final.argmax(-1)
        return float(torch.stack([(v.argmax(-1) == best).float().mean() for v in heads.values()]).mean())

    a, b = agreement(tmp_path / "draft"), agreement(tmp_path / "labels")
    assert a > b
