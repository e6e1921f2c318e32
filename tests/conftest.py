"""Shared fixtures: tiny models and data are built once per test session, offline."""

from __future__ import annotations

import io
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def png_bytes(size=(84, 84), color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def tokenizer():
    from vlsi.tiny import default_tokenizer

    return default_tokenizer()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A saved tiny Qwen2-VL student with untrained verbalizers on layers 1, 3 and 5."""
    import torch

    from vlsi.tiny import save_tiny

    torch.set_num_threads(2)
    path = tmp_path_factory.mktemp("ckpt") / "student"
    save_tiny(path, arch="qwen2_vl", size="student", seed=0, verbalizer_layers="1::2")
    return path


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A small synthetic dataset (all families)."""
    from vlsi.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, SynthConfig(n=60, seed=0, n_eval=24), progress=False)
    return out


@pytest.fixture(scope="session")
def onnx_artifact(tiny_ckpt, tmp_path_factory):
    """``tiny_ckpt`` exported to ONNX fp32 with its verbalizers (parity-checked)."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from vlsi_export import get_target

    return get_target("onnx")(tiny_ckpt, tmp_path_factory.mktemp("onnx") / "fp32", verbalizers=True)


def train_briefly(arch: str, synth_data, root, size: str = "student"):
    """A student of ``arch`` pretrained 40 steps, then verbalizers (1, 3, 5) trained 120 steps on
    the synthetic data: peaked next-token distributions, as a real model has, so that parity
    gates measure quantisation error rather than ties between near-equal logits."""
    import json

    from vlsi.config import load_config
    from vlsi_train.config import TrainConfig
    from vlsi_train.trainer import train

    def cfg(**kw):
        base = dict(arch=arch, data=str(synth_data / "train.json"), batch_size=4, log_every=20, progress=False,
                    **{"optim.lr": 3e-3}, **kw)
        return load_config(TrainConfig, None, [f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                                                for k, v in base.items()])

    train(cfg(stage="pretrain", model=f"tiny:{size}", out=str(root / "s"), steps=40))
    train(cfg(stage="verbalize", model=str(root / "s"), out=str(root / "sv"), steps=120,
              **{"verbalizer.target_layers": "1::2"}))
    return root / "sv"


TRAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
"""Environment of a training subprocess: one thread per process, nothing fetched."""


def torchrun_train(nproc: int, args: list[str]):
    """``vlsi train run ARGS`` under PyTorch's own launcher with ``nproc`` processes."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "vlsi_cli", "train", "run", *args]
    return subprocess.run(cmd, env=TRAIN_ENV, capture_output=True, text=True, timeout=900)
