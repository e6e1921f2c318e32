"""Resumable training state, written atomically next to the output checkpoint.

``<out>.train/state/`` holds the trainable weights, verbalizers, optimiser, scheduler, every
RNG state, the step (which fixes the data position) and the config it was made with. A
crash mid-write leaves the previous state intact (temporary folder + rename).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from vlsi.atomic import atomic_dir
from vlsi.errors import ConfigError

# keys that may change between a run and its resume without changing the trajectory
RESUMABLE_CHANGES = {"progress", "save_every", "log_every", "threads"}


def run_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.train"


def rng_state(gen: torch.Generator) -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
          "matching": gen.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict, gen: torch.Generator) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    gen.set_state(st["matching"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_state(path: Path, step: int, config: dict, trainable: dict, optimizer, scheduler, gen) -> None:
    with atomic_dir(path, overwrite=True) as tmp:
        torch.save({"trainable": trainable, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng_state(gen)}, tmp / "state.pt")
        (tmp / "progress.json").write_text(json.dumps({"step": step, "config": config}, indent=1))


def load_state(path: Path, config: dict):
    """``(step, payload)`` or ``None`` when there is no state; refuses a different config."""
    prog = path / "progress.json"
    if not prog.is_file():
        return None
    meta = json.loads(prog.read_text())
    old = meta["config"]
    config = json.loads(json.dumps(config))  # tuples -> lists, as stored
    diff = sorted(k for k in set(old) | set(config) if k not in RESUMABLE_CHANGES and old.get(k) != config.get(k))
    if diff:
        raise ConfigError(
            f"cannot resume from {path}: the config changed in {', '.join(diff)}; restore those keys or "
            f"start afresh without --resume (the old state is replaced)"
        )
    payload = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    return meta["step"], payload
