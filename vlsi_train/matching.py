"""Adaptive layer matching (VLsI Algorithm 1) and its ablation switches (Table 4e).

For student target layer i (of ts) and teacher target layers 0..tl-1 (ts <= tl):

    cand = [start .. tl - ts + i]              # search range: room for the later layers
    d[j] = D(teacher_j, student_i)             # per candidate, mean over answer tokens
    T    = (max d - min d) / scale + eps       # adaptive temperature
    j*   ~ softmax(-d / T)                     # layer-wise exploration
    loss += D(teacher_j*, student_i); start = j* + 1   # order preservation
"""

from __future__ import annotations

from typing import Callable

import torch

from .config import InteractConfig
from .losses import distill_loss


def candidates(i: int, ts: int, tl: int, start: int, cfg: InteractConfig) -> list[int]:
    lo = start if cfg.order_preservation else 0
    hi = tl - ts + i if cfg.search_range else tl - 1
    lo = min(lo, hi)  # without the search range, order preservation can run past the end
    return list(range(lo, hi + 1))


def choose(i: int, ts: int, tl: int, cand: list[int], d: torch.Tensor | None, cfg: InteractConfig,
           gen: torch.Generator) -> int:
    """Pick one teacher layer among ``cand`` (``d``: distances, needed by multinomial / bottomk)."""
    if cfg.matching == "random":
        return cand[int(torch.randint(len(cand), (1,), generator=gen))]
    if cfg.matching == "uniform":
        # fixed, evenly spaced: student i of ts maps to teacher round(i * (tl-1)/(ts-1))
        target = round(i * (tl - 1) / max(1, ts - 1)) if ts > 1 else tl - 1
        return min(cand, key=lambda j: abs(j - target))
    if cfg.matching == "bottomk":
        k = min(cfg.bottom_k, len(cand))
        order = torch.argsort(d)[:k]
        return cand[int(order[int(torch.randint(k, (1,), generator=gen))])]
    if cfg.adaptive_temperature:
        temp = (d.max() - d.min()) / cfg.temperature_scale + cfg.eps
    else:
        temp = torch.tensor(1.0)
    p = torch.softmax(-d / temp, dim=0)
    return cand[int(torch.multinomial(p, 1, generator=gen))]


def match_layers(student: list[torch.Tensor], teacher: Callable[[int], torch.Tensor], tl: int,
                 cfg: InteractConfig, gen: torch.Generator) -> tuple[torch.Tensor, list[int], list[list[float]]]:
    """Algorithm 1 over the intermediate layers.

    Args:
        student: ts tensors ``(N, V)``, student verbalizer logits on the answer tokens (with grad).
        teacher: ``j -> (N, V)`` teacher verbalizer logits of target layer j (no grad), computed
            on demand so the teacher's distributions are never all held at once.
        tl: number of teacher target layers.
    Returns:
        ``(loss, matched teacher index per student layer, candidate distances per layer)``.
    """
    ts = len(student)
    if ts > tl:
        raise ValueError(f"student has {ts} target layers but the teacher only {tl}; need ts <= tl")
    op = cfg.intermediate_op
    kw = dict(direction=cfg.kl_direction, tau=cfg.distill_temperature, chunk=cfg.chunk_tokens)
    loss = student[0].new_zeros(())
    matched, dists = [], []
    start = 0
    for i, s in enumerate(student):
        cand = candidates(i, ts, tl, start, cfg)
        d = None
        if cfg.matching in ("multinomial", "bottomk"):
            with torch.no_grad():
                d = torch.stack([distill_loss(op, s.detach(), teacher(j), **kw) for j in cand]).float().cpu()
        j = choose(i, ts, tl, cand, d, cfg, gen)
        loss = loss + distill_loss(op, s, teacher(j), **kw)
        matched.append(j)
        dists.append([] if d is None else d.tolist())
        if cfg.order_preservation:
            start = j + 1
    return loss, matched, dists
