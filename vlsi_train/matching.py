"""Layer matching: VLsI's Algorithm 1 and the Table 4(e) variants of Appendix D.

Algorithm 1 (``matching=multinomial``), for student target layer i (of ts) and teacher target
layers 0..tl-1 (ts <= tl):

    cand = [start .. tl - ts + i]              # search range: room for the later layers
    d[j] = D(teacher_j, student_i)             # per candidate, mean over answer tokens
    T    = (max d - min d) / scale + eps       # adaptive temperature
    j*   ~ softmax(-d / T)                     # layer-wise exploration
    loss += D(teacher_j*, student_i); start = j* + 1   # order preservation

The paper's other rows (Appendix D's pseudo-code) look at every teacher target, with no
search range and no order:

    random:  j ~ U{0 .. tl-1}
    uniform: j = i * floor(tl / ts)
    bottomk: loss += mean of the k smallest D(teacher_j, student_i) over all j

The project's earlier variants stay reachable, drawn inside the candidate window like
Algorithm 1: ``random_in_window``, ``uniform_span_in_window`` and ``bottomk_pick_in_window``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from .config import InteractConfig
from .losses import distill_loss

NEEDS_DISTANCES = ("multinomial", "bottomk", "bottomk_pick_in_window")
"""Matchings that compare the student layer with its candidates before choosing."""


def candidates(i: int, ts: int, tl: int, start: int, cfg: InteractConfig) -> list[int]:
    """Teacher targets student target ``i`` may be matched to: Algorithm 1's window for the
    windowed matchings (``cfg.search_range``, ``cfg.order_preservation``), else all of them."""
    if not cfg.windowed:
        return list(range(tl))
    lo = start if cfg.order_preservation else 0
    hi = tl - ts + i if cfg.search_range else tl - 1
    lo = min(lo, hi)  # without the search range, order preservation can run past the end
    return list(range(lo, hi + 1))


def sampling_probabilities(d: torch.Tensor, cfg: InteractConfig) -> torch.Tensor:
    """Algorithm 1's p = softmax(-d / T), T adaptive ((max d - min d) / scale + eps) or 1."""
    temp = (d.max() - d.min()) / cfg.temperature_scale + cfg.eps if cfg.adaptive_temperature else 1.0
    return torch.softmax(-d / temp, dim=0)


def pick(i: int, ts: int, tl: int, cand: list[int], d: torch.Tensor | None, cfg: InteractConfig,
         gen: torch.Generator) -> list[int]:
    """The teacher targets student target ``i`` is matched to (its loss averages their
    divergences; one layer except for bottomk). ``d``: divergences to ``cand``, for the
    matchings in :data:`NEEDS_DISTANCES`."""
    m = cfg.matching

    def uniform_draw(n: int) -> int:
        return int(torch.randint(n, (1,), generator=gen))

    if m == "multinomial":
        return [cand[int(torch.multinomial(sampling_probabilities(d, cfg), 1, generator=gen))]]
    if m == "random":
        return [uniform_draw(tl)]
    if m == "uniform":
        return [i * (tl // ts)]
    if m == "bottomk":
        return [cand[int(k)] for k in torch.argsort(d, stable=True)[:min(cfg.bottom_k, len(cand))]]
    if m == "random_in_window":
        return [cand[uniform_draw(len(cand))]]
    if m == "uniform_span_in_window":
        target = round(i * (tl - 1) / (ts - 1)) if ts > 1 else tl - 1  # first to last, evenly
        return [min(cand, key=lambda j: abs(j - target))]
    if m == "bottomk_pick_in_window":
        closest = torch.argsort(d, stable=True)[:min(cfg.bottom_k, len(cand))]
        return [cand[int(closest[uniform_draw(len(closest))])]]
    raise ValueError(f"interact.matching={m!r} is not a matching")


def match_layers(student: list[torch.Tensor], teacher: Callable[[int], torch.Tensor], tl: int,
                 cfg: InteractConfig, gen: torch.Generator,
                 divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, list[int], list[list[float]]]:
    """The intermediate-layer loss: each student target matched to teacher targets by
    ``cfg.matching``.

    Args:
        student: ts tensors ``(N, V)``, student verbalizer logits on the answer tokens (with grad).
        teacher: ``j -> (N, V)`` teacher verbalizer logits of target layer j (no grad), computed
            on demand so the teacher's distributions are never all held at once.
        tl: number of teacher target layers.
        divergence: ``(student, teacher) -> scalar``; default the configured op
            (``cfg.intermediate_op``, direction, temperature).
    Returns:
        ``(loss, matched teacher index per student layer (for bottomk the closest of the k),
        candidate divergences per layer (empty where the matching needs none))``.
    """
    ts = len(student)
    if ts > tl:
        raise ValueError(f"student has {ts} target layers but the teacher only {tl}; need ts <= tl")
    if divergence is None:
        divergence = partial(distill_loss, cfg.intermediate_op, direction=cfg.kl_direction,
                             tau=cfg.distill_temperature, chunk=cfg.chunk_tokens)
    loss = student[0].new_zeros(())
    matched, dists = [], []
    start = 0
    for i, s in enumerate(student):
        cand = candidates(i, ts, tl, start, cfg)
        d = None
        if cfg.matching in NEEDS_DISTANCES:
            with torch.no_grad():
                d = torch.stack([divergence(s.detach(), teacher(j)) for j in cand]).float().cpu()
        picked = pick(i, ts, tl, cand, d, cfg, gen)
        # recomputed with the student's gradient (teacher layers are streamed, never kept)
        loss = loss + sum(divergence(s, teacher(j)) for j in picked) / len(picked)
        matched.append(picked[0])
        dists.append([] if d is None else d.tolist())
        if cfg.windowed and cfg.order_preservation:
            start = max(picked) + 1
    return loss, matched, dists
