"""``vlsi eval``: greedy decoding, exact-match / option accuracy, per category and per layer."""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path

from .atomic import atomic_write_text

_ANSWER_TAG = re.compile(r"answer\s*:\s*", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """The short answer in ``text``: the part after a final ``Answer:`` if any, lowercased,
    whitespace folded, trailing full stop dropped."""
    parts = _ANSWER_TAG.split(text)
    s = " ".join(parts[-1].lower().split())
    return s.rstrip(". ").strip()


def option_letter(prediction: str, choices: dict[str, str]) -> str | None:
    """The option a free-text prediction picks: a leading letter ("B", "B.", "(B)") or the
    text of exactly one option."""
    s = prediction.strip()
    m = re.match(r"^\(?([A-Z])\)?(?:[.:)\s]|$)", s)
    if m and m.group(1) in choices:
        return m.group(1)
    norm = normalize_answer(s)
    hits = [k for k, v in choices.items() if normalize_answer(v) == norm]
    return hits[0] if len(hits) == 1 else None


def is_correct(record, prediction: str) -> bool:
    if record.choices:
        return option_letter(prediction, record.choices) == record.answer
    return normalize_answer(prediction) == normalize_answer(record.answer or "")


def _accuracy(records, predictions) -> dict:
    per_cat = defaultdict(list)
    for r, p in zip(records, predictions):
        per_cat[r.category or "all"].append(is_correct(r, p))
    flat = [x for v in per_cat.values() for x in v]
    return {
        "accuracy": sum(flat) / max(1, len(flat)),
        "per_category": {k: sum(v) / len(v) for k, v in sorted(per_cat.items())},
    }


def evaluate(model_dir, data_path, verbalize: bool = False, batch_size: int = 16, max_new_tokens: int | None = None,
             limit: int | None = None, out: str | Path | None = None, progress: bool = True, device: str = "cpu") -> dict:
    """Evaluate a checkpoint on a data file (any loader format). Returns the report dict and,
    with ``out``, writes it as JSON plus a per-layer accuracy chart (``.png``) beside it."""
    import torch
    from tqdm.auto import tqdm

    from .checkpoint import load_checkpoint
    from .data.encode import Encoder
    from .data.loaders import load_records
    from .errors import CheckpointError
    from .generate import greedy_generate

    t0 = time.time()
    ckpt = load_checkpoint(model_dir, device=device)
    records, _ = load_records(data_path)
    records = [r for r in records if r.answer is not None]
    if limit:
        records = records[:limit]
    if verbalize and ckpt.verbalizers is None:
        raise CheckpointError(f"{model_dir} has no verbalizers; drop --verbalize or train them (vlsi train, stage verbalize)")
    enc = Encoder(ckpt.adapter, ckpt.tokenizer, ckpt.image_processor, ckpt.model.config)
    if max_new_tokens is None:
        longest = max((len(enc.text_ids(r.answer)) for r in records), default=8)
        max_new_tokens = min(256, longest + 8)

    num_layers = ckpt.adapter.text_sizes(ckpt.model.config).num_layers
    sources = [(num_layers, None)]
    if verbalize:
        sources = [(k, k) for k in ckpt.verbalizers.target_layers] + sources
    preds = {layer: [] for layer, _ in sources}
    batches = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]
    bar = tqdm(total=len(batches) * len(sources), desc="eval", unit="batch", disable=not progress)
    with torch.inference_mode():
        for chunk in batches:
            batch = enc.collate([enc.encode(r, for_generation=True) for r in chunk], pad_left=True)
            batch = {k: v.to(device) for k, v in batch.items()}
            for layer, src in sources:
                ids = greedy_generate(ckpt.model, batch, max_new_tokens, enc.eos_ids, ckpt.verbalizers, src)
                preds[layer] += [ckpt.tokenizer.decode(x, skip_special_tokens=True) for x in ids]
                bar.update(1)
    bar.close()

    final = _accuracy(records, preds[num_layers])
    report = {
        "model": str(model_dir),
        "data": str(data_path),
        "n": len(records),
        **final,
        "max_new_tokens": max_new_tokens,
        "seconds": round(time.time() - t0, 2),
        "predictions": [
            {"id": r.id, "category": r.category, "answer": r.answer, "prediction": p, "correct": is_correct(r, p)}
            for r, p in zip(records, preds[num_layers])
        ],
    }
    if verbalize:
        report["per_layer_accuracy"] = {str(k): _accuracy(records, preds[k])["accuracy"] for k, _ in sources}
        report["per_layer_examples"] = {str(k): preds[k][:5] for k, _ in sources}
    if out is not None:
        out = Path(out)
        atomic_write_text(out, json.dumps(report, indent=2) + "\n")
        if verbalize:
            plot_per_layer(report["per_layer_accuracy"], out.with_suffix(".png"), title=Path(model_dir).name)
    return report


def plot_per_layer(per_layer: dict[str, float], path: Path, title: str = "") -> Path:
    """Bar chart of accuracy per verbalized layer (the last bar is the model's own head)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(per_layer, key=int)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(layers) + 2), 3.2))
    colors = ["#6c8ebf"] * (len(layers) - 1) + ["#d79b00"]
    ax.bar(layers, [per_layer[k] for k in layers], color=colors)
    ax.set_xlabel("decoder layer (last = model head)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"per-layer verbalizer accuracy {title}".strip())
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
