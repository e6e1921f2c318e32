"""A run killed with SIGKILL resumes to the same result; N processes under torchrun follow
the same loss trajectory as one process with the same global batch."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import TRAIN_ENV as ENV
from .conftest import torchrun_train as _torchrun


def _args(data, out, **kw):
    base = {"stage": "pretrain", "model": "tiny:student", "data": data, "out": out, "steps": 12,
            "batch_size": 8, "log_every": 1, "progress": "false", "threads": 1, "optim.warmup_steps": 2}
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def _vlsi(*args, **popen):
    return subprocess.Popen([sys.executable, "-m", "vlsi_cli", "train", "run", *args], env=ENV, **popen)


def _losses(out):
    rows = [json.loads(x) for x in (Path(out) / "training" / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(synth_data, tmp_path):
    data = str(synth_data / "train.json")
    ref = tmp_path / "ref"
    assert _vlsi(*_args(data, ref, save_every=3)).wait(timeout=600) == 0

    out = tmp_path / "run"
    proc = _vlsi(*_args(data, out, save_every=3), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "run.train" / "state" / "progress.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["step"] >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # no half-written checkpoint
    killed_at = json.loads(progress.read_text())["step"]
    assert 6 <= killed_at < 12

    assert _vlsi("--resume", *_args(data, out, save_every=3)).wait(timeout=600) == 0
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    steps, losses = _losses(out)
    ref_steps, ref_losses = _losses(ref)
    assert steps == ref_steps == list(range(1, 13))
    assert losses == pytest.approx(ref_losses, rel=1e-5)


def test_resume_with_a_changed_config_is_refused(synth_data, tmp_path):
    from vlsi.config import load_config
    from vlsi.errors import ConfigError
    from vlsi_train.config import TrainConfig
    from vlsi_train.trainer import train

    data = str(synth_data / "train.json")
    out = tmp_path / "r"
    train(load_config(TrainConfig, None, _args(data, out, steps=2, save_every=1)))
    # a finished run keeps no state past its last save; make one by hand from its own config
    state = tmp_path / "r.train" / "state"
    assert (state / "progress.json").is_file()
    with pytest.raises(ConfigError, match="config changed in optim"):
        train(load_config(TrainConfig, None, _args(data, out, steps=2, save_every=1, **{"optim.lr": 0.5})), resume=True)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(synth_data, tmp_path, strategy):
    data = str(synth_data / "train.json")
    one = tmp_path / "one"
    assert _vlsi(*_args(data, one, steps=6)).wait(timeout=600) == 0
    two = tmp_path / "two"
    res = _torchrun(2, _args(data, two, steps=6, **{"distributed.strategy": strategy}))
    assert res.returncode == 0, res.stderr[-3000:]
    _, l1 = _losses(one)
    _, l2 = _losses(two)
    assert l2 == pytest.approx(l1, rel=2e-4)
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=1e-3, msg=k)
    meta = json.loads((two / "vlsi.json").read_text())
    assert meta["provenance"]["processes"] == 2
