"""Greedy decoding with a KV cache, reading the next token from the model's own head or
from any verbalizer head (what that intermediate layer "would say")."""

from __future__ import annotations

import torch

MODEL_HEAD = None
"""``source`` value for the model's own final-layer head."""


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def greedy_generate(model, batch: dict, max_new_tokens: int, eos_ids, verbalizers=None,
                    source: int | None = MODEL_HEAD) -> list[list[int]]:
    """Greedy continuation of a left-padded prompt batch (from ``Encoder.collate(pad_left=True)``).

    ``source``: None decodes with the model's head; a target layer number decodes with that
    layer's verbalizer (the paper's Figure 3). Returns the new token ids per row, cut at the
    first end-of-turn token (excluded).
    """
    from .verbalizer import VerbalizerTap

    inputs = _model_inputs(batch)
    attention_mask = inputs["attention_mask"]
    b = attention_mask.shape[0]
    eos = torch.tensor(sorted(set(eos_ids)), device=attention_mask.device)
    done = torch.zeros(b, dtype=torch.bool, device=attention_mask.device)
    out = [[] for _ in range(b)]
    if max_new_tokens < 1:
        return out
    tap = VerbalizerTap(model, verbalizers if source is not None else None, () if source is None else (source,))
    final, per_layer = tap.prefill(inputs)
    for i in range(max_new_tokens):
        nxt = (final if source is None else per_layer[source]).argmax(-1)
        for row in range(b):
            if not done[row]:
                if nxt[row] in eos:
                    done[row] = True
                else:
                    out[row].append(int(nxt[row]))
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        final, per_layer = tap.step(nxt)
    return out
