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
    from .adapters import get_adapter
    from .verbalizer import LayerTap

    adapter = get_adapter(model)
    inputs = _model_inputs(batch)
    attention_mask = inputs["attention_mask"]
    position_ids = inputs["position_ids"]
    b = attention_mask.shape[0]
    eos = torch.tensor(sorted(set(eos_ids)), device=attention_mask.device)
    done = torch.zeros(b, dtype=torch.bool, device=attention_mask.device)
    out = [[] for _ in range(b)]
    layers = () if source is None else (source,)
    head = None if source is None else verbalizers.heads[str(source)]
    # Heads with attention need the layer's whole history; position-wise heads the last step.
    history = [] if source is not None and verbalizers.cfg.arch == "decoder_block" else None
    cache = None
    step_inputs = dict(inputs)
    for _ in range(max_new_tokens):
        with LayerTap(model, layers) as hidden:
            res = model(**step_inputs, cache=cache, use_cache=True,
                        logits_to_keep=0 if history is not None else 1)
        cache = res.cache
        if source is None:
            logits = res.logits[:, -1]
        else:
            h = hidden[source]
            if history is not None:
                history.append(h)
                full = torch.cat(history, dim=1)
                logits = adapter.lm_head(model)(head(full, attention_mask)[:, -1])
            else:
                logits = adapter.lm_head(model)(head(h[:, -1:])[:, -1])
        nxt = logits.argmax(-1)
        for i in range(b):
            if not done[i]:
                if nxt[i] in eos:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
        if bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        position_ids = position_ids.max(dim=-1, keepdim=True).values + 1
        step_inputs = {"input_ids": nxt[:, None], "attention_mask": attention_mask, "position_ids": position_ids}
    return out
