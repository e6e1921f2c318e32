"""Pictures of a training run: loss curves, and the paper's Figure 5 (matched teacher layer
per student layer, at the start and at the end of interaction)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path):
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    tmp.replace(path)


def loss_curves(metrics_path: Path, out: Path) -> Path | None:
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step" in r]
    if not rows:
        return None
    keys = sorted({k for r in rows for k in r if k.startswith("loss")})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(Path(metrics_path).parent.name)
    fig.tight_layout()
    _save(fig, out)
    return out


def matching_heatmaps(counts_start: np.ndarray, counts_end: np.ndarray, student_layers, teacher_layers,
                      out: Path) -> Path:
    """Figure 5: for each student layer (rows), how often each teacher layer (columns) was matched."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.45 * len(teacher_layers) * 2, 1.6 + 0.4 * len(student_layers)))
    for ax, counts, title in zip(axes, (counts_start, counts_end), ("start of interaction", "end of interaction")):
        c = np.asarray(counts, dtype=float)
        frac = c / np.maximum(c.sum(1, keepdims=True), 1)
        ax.imshow(frac, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(teacher_layers)), [str(t) for t in teacher_layers], fontsize=7)
        ax.set_yticks(range(len(student_layers)), [str(s) for s in student_layers], fontsize=7)
        ax.set_xlabel("teacher layer")
        ax.set_ylabel("student layer")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, out)
    return out
