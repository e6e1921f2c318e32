"""Token-level losses between vocabulary distributions, computed in row chunks.

All functions take logits of the selected answer tokens only, ``(N, V)``, and return a
mean over the N tokens. fp32 softmax temporaries are bounded to ``chunk`` rows at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunks(n: int, chunk: int):
    for i in range(0, n, max(1, chunk)):
        yield slice(i, min(n, i + chunk))


def kl_div(student: torch.Tensor, teacher: torch.Tensor, direction: str = "forward", tau: float = 1.0,
           chunk: int = 4096, reduce: bool = True) -> torch.Tensor:
    """KL divergence per token, ``(N, V)`` x2 -> scalar mean (or ``(N,)`` with reduce=False).

    forward: KL(teacher || student) (mass-covering, the paper's choice);
    reverse: KL(student || teacher). Scaled by ``tau**2`` so gradients keep their size.
    """
    out = []
    for sl in _chunks(student.shape[0], chunk):
        ls = F.log_softmax(student[sl].float() / tau, dim=-1)
        lt = F.log_softmax(teacher[sl].float() / tau, dim=-1)
        if direction == "forward":
            out.append((lt.exp() * (lt - ls)).sum(-1))
        else:
            out.append((ls.exp() * (ls - lt)).sum(-1))
    per_token = torch.cat(out) * tau * tau if out else student.new_zeros(0)
    return per_token.mean() if reduce else per_token


def hard_ce(student: torch.Tensor, teacher: torch.Tensor, chunk: int = 4096, reduce: bool = True) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's argmax tokens (hard distillation)."""
    out = [F.cross_entropy(student[sl].float(), teacher[sl].argmax(-1), reduction="none")
           for sl in _chunks(student.shape[0], chunk)]
    per_token = torch.cat(out) if out else student.new_zeros(0)
    return per_token.mean() if reduce else per_token


def logit_l2(student: torch.Tensor, teacher: torch.Tensor, chunk: int = 4096, reduce: bool = True) -> torch.Tensor:
    """Mean squared difference of logits, each centred over the vocabulary (softmax-invariant)."""
    out = []
    for sl in _chunks(student.shape[0], chunk):
        s = student[sl].float()
        t = teacher[sl].float()
        out.append(((s - s.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))).pow(2).mean(-1))
    per_token = torch.cat(out) if out else student.new_zeros(0)
    return per_token.mean() if reduce else per_token


def distill_loss(op: str, student: torch.Tensor, teacher: torch.Tensor, direction: str = "forward",
                 tau: float = 1.0, chunk: int = 4096) -> torch.Tensor:
    """The configured op (kld | ce | l2) between student and teacher token logits."""
    if op == "kld":
        return kl_div(student, teacher, direction, tau, chunk)
    if op == "ce":
        return hard_ce(student, teacher, chunk)
    if op == "l2":
        return logit_l2(student, teacher, chunk)
    raise ValueError(f"unknown distillation op {op!r}")
