"""Acceptance of self-speculative drafting, per layer, on a model trained here: a narrow deep
student (24 layers by default) with a verbalizer head on every layer, trained on the synthetic
families with long answers (describe, sequence, reasoning-form answers). Two sets of heads on
the same backbone: fitted to the labels (the verbalize stage) and fitted to the model's own
final head on its own answers (``verbalizer.fit=final``); beside them the logit lens (the
backbone's own final norm and LM head on layer k's state, i.e. what a draft model made of the
first k layers drafts with in llama.cpp's own draft-model speculation). Acceptance is measured by teacher
forcing along the model's own greedy answers to the test questions: at each answer position,
whether a head's argmax is the final head's (what greedy verification accepts), and, for draft
lengths 1..8, the tokens a cycle yields when drafting from that layer (the run of agreements
from the cycle's start, capped at the draft length, plus the model's own token).

    python scripts/speculative_acceptance.py --out runs/acceptance            # ~15 min on 2 cores
    python scripts/speculative_acceptance.py --out /tmp/acc --steps 20 --n 200  # a smoke run

Writes ``acceptance.json`` (with every answer's agreement pattern per layer, which
``scripts/speculative_replay.py`` replays on a bigger model), ``acceptance.md`` and
``acceptance.png`` into ``--out``; with
``--costs BENCH.json`` (rows of ``vlsi bench --speculative --out``, or the JSON line of
``python -m vlsi_runtimes.bench speculative ...``) it also predicts the speedup per layer from
those measured costs (draft layers scaled by depth).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _stage(**kw) -> Path:
    from vlsi.config import load_config
    from vlsi_train.config import TrainConfig
    from vlsi_train.trainer import train

    pairs = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in kw.items()]
    return train(load_config(TrainConfig, None, pairs))


def agreement(model_dir: Path, data: Path, limit: int) -> dict[int, list[np.ndarray]]:
    """Per head layer, one boolean array per answer: head argmax == final argmax, teacher-forced."""
    import torch

    from vlsi.checkpoint import load_checkpoint
    from vlsi.data.encode import Encoder
    from vlsi.data.loaders import load_records
    from vlsi_train.trainer import StudentForward, _answer_select

    ck = load_checkpoint(model_dir)
    enc = Encoder(ck.adapter, ck.tokenizer, ck.image_processor, ck.model.config)
    records, _ = load_records(data)
    records = records[:limit]
    fwd = StudentForward(ck.model.eval(), ck.verbalizers.eval())
    out: dict[int, list[np.ndarray]] = {k: [] for k in ck.verbalizers.target_layers}
    with torch.no_grad():
        for i in range(0, len(records), 16):
            chunk = records[i:i + 16]
            batch = enc.collate([enc.encode(r) for r in chunk])
            labels = batch.pop("labels")
            sel, _ = _answer_select(labels)
            final, heads = fwd(batch, sel, True)
            lengths = sel.sum(1).tolist()
            best = final.argmax(-1)
            for k, v in heads.items():
                hits = (v.argmax(-1) == best).numpy()
                at = 0
                for n in lengths:
                    out[k].append(hits[at:at + n])
                    at += n
    return out


def logit_lens(model_dir: Path, out: Path, layers: int) -> None:
    """``model_dir`` with untrained verb_ffn heads on every layer: each starts as the final norm
    (copied) and a zero residual branch, so its logits are the logit lens at its layer."""
    from vlsi.checkpoint import load_checkpoint, save_checkpoint
    from vlsi.verbalizer import VerbalizerConfig, Verbalizers, parse_target_layers

    ck = load_checkpoint(model_dir)
    heads = Verbalizers.for_model(ck.model, VerbalizerConfig(parse_target_layers("1::1", layers), arch="verb_ffn"))
    save_checkpoint(out, ck.model, ck.tokenizer, ck.image_processor, heads)


def tokens_per_cycle(runs: list[np.ndarray], k: int) -> tuple[float, float]:
    """Greedy speculative decoding replayed on agreement patterns: -> (tokens a cycle yields, cycles)."""
    tokens = cycles = 0
    for hits in runs:
        i = 0
        while i < len(hits):
            m = 0
            while m < k and i + m < len(hits) and hits[i + m]:
                m += 1
            step = min(m + 1, len(hits) - i)
            tokens += step
            cycles += 1
            i += step
    return tokens / max(cycles, 1), cycles


def predict(costs: dict, layer: int, n_layers: int, k: int, per_cycle: float) -> float:
    """Speedup the measured costs predict: a cycle feeds k + 1 tokens through the drafting layers
    (cost scaled from the measured drafting depth), runs the head k times, verifies k + 1 positions."""
    low = costs["draft_layers_cost"] * layer / costs["layer"]
    upper = costs["verify_cost"]
    scale = (n_layers - layer) / max(n_layers - costs["layer"], 1)  # the verifying layers, by count
    verify = upper[str(min(k + 1, 8))] if str(min(k + 1, 8)) in upper else upper[min(k + 1, 8)]
    cycle = (k + 1) * low + k * costs["draft_head_cost"] + verify * scale
    return per_cycle / cycle


def main() -> None:
    from vlsi.data.synth import SynthConfig, generate
    from vlsi.tiny import TinySpec, save_tiny
    from vlsi_train.teacher_labels import label_with_teacher

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--n", type=int, default=3000, help="training images")
    p.add_argument("--steps", type=int, default=1500, help="pretraining steps (the heads get a third each)")
    p.add_argument("--test", type=int, default=96, help="test questions answered and measured")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--costs", type=Path, default=None, help="measured costs (see the module's docstring)")
    a = p.parse_args()
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "train.json").is_file():
        generate(data, SynthConfig(n=a.n, seed=a.seed, n_eval=max(a.test, 20), reasoning=True,
                                   families=("describe", "sequence", "colour", "shape", "position", "count")),
                 progress=True)
    common = dict(threads=a.threads, seed=a.seed, batch_size=16, log_every=50, max_length=512)
    spec = TinySpec(hidden=a.hidden, layers=a.layers, heads=2, kv_heads=1, intermediate=2 * a.hidden,
                    vision_embed=32, vision_depth=2, vision_heads=1, rope_theta=10.0, image_size=84)
    init = out / "init"
    if not (init / "config.json").is_file():
        save_tiny(init, size=spec, seed=a.seed, overwrite=True)
    base = out / "student"
    if not (base / "vlsi.json").is_file():
        _stage(stage="pretrain", model=str(init), data=str(data / "train.json"), out=str(base), steps=a.steps,
               **{"optim.lr": 3e-3}, **common)
    heads = {"labels": out / "heads_labels", "final": out / "heads_final", "lens": out / "heads_lens"}
    if not (heads["lens"] / "vlsi.json").is_file():  # untrained heads: the logit lens, exactly
        logit_lens(base, heads["lens"], a.layers)
    every = f"1::{1}"
    if not (heads["labels"] / "vlsi.json").is_file():
        _stage(stage="verbalize", model=str(base), data=str(data / "train.json"), out=str(heads["labels"]),
               steps=max(1, a.steps // 3), **{"verbalizer.target_layers": every, "optim.lr": 3e-3}, **common)
    own_train, own_test = out / "own_train.json", out / "own_test.json"
    if not own_train.is_file():
        label_with_teacher(base, data / "train.json", own_train, limit=min(a.n, 1500), max_new_tokens=48)
    if not own_test.is_file():
        label_with_teacher(base, data / "test.json", own_test, limit=a.test, max_new_tokens=48)
    if not (heads["final"] / "vlsi.json").is_file():
        _stage(stage="verbalize", model=str(base), data=str(own_train), out=str(heads["final"]),
               steps=max(1, a.steps // 3),
               **{"verbalizer.target_layers": every, "verbalizer.fit": "final", "optim.lr": 3e-3}, **common)

    costs = json.loads(a.costs.read_text()) if a.costs else None
    if isinstance(costs, list):  # `vlsi bench --out` rows: the speculative block
        costs = next(r["speculative"][0] for r in costs if "speculative" in r)
    result = {"layers": a.layers, "hidden": a.hidden, "test_answers": a.test, "heads": {}, "patterns": {}}
    for kind, path in heads.items():
        runs = agreement(path, own_test, a.test)
        # per answer, "1" where the head agreed: what scripts/speculative_replay.py replays
        result["patterns"][kind] = {layer: ["".join("1" if x else "0" for x in hits) for hits in pattern]
                                    for layer, pattern in runs.items()}
        rows = {}
        for layer, pattern in runs.items():
            flat = np.concatenate(pattern) if pattern else np.zeros(0, bool)
            row = {"agreement": float(flat.mean()) if flat.size else 0.0, "tokens": int(flat.size)}
            for k in range(1, 9):
                per_cycle, _ = tokens_per_cycle(pattern, k)
                row[f"tokens_per_cycle_k{k}"] = per_cycle
                if costs:
                    row[f"predicted_speedup_k{k}"] = predict(costs, layer, a.layers, k, per_cycle)
            rows[layer] = row
        result["heads"][kind] = rows
    (out / "acceptance.json").write_text(json.dumps(result, indent=2) + "\n")

    lines = [f"Acceptance per drafting layer, {a.layers}-layer student (hidden {a.hidden}), teacher-forced on its "
             f"own greedy answers to {a.test} test questions: agreement of the head's argmax with the final head's, "
             "and tokens a cycle yields with a 4-token draft" + (" and the speedup the measured costs predict" if costs
                                                                   else "") + ".", "",
             "| layer | labels: agreement | labels: tokens/cycle (k=4) | own head: agreement | own head: tokens/cycle (k=4) |"
             " logit lens: agreement | logit lens: tokens/cycle (k=4) |"
             + (" predicted speedup (own head, k=4) |" if costs else ""),
             "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if costs else "")]
    for layer in result["heads"]["labels"]:
        lab, own = result["heads"]["labels"][layer], result["heads"]["final"][layer]
        lens = result["heads"]["lens"][layer]
        line = (f"| {layer} | {lab['agreement']:.2f} | {lab['tokens_per_cycle_k4']:.2f} | {own['agreement']:.2f} | "
                f"{own['tokens_per_cycle_k4']:.2f} | {lens['agreement']:.2f} | {lens['tokens_per_cycle_k4']:.2f} |")
        if costs:
            line += f" {own['predicted_speedup_k4']:.2f}x |"
        lines.append(line)
    (out / "acceptance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, label in (("labels", "heads fitted to the labels"), ("final", "heads fitted to the model's own head"),
                        ("lens", "logit lens (a truncated draft model's own head)")):
        layers = list(result["heads"][kind])
        ax.plot(layers, [result["heads"][kind][k]["agreement"] for k in layers], marker="o", label=label)
    ax.set_xlabel("drafting layer")
    ax.set_ylabel("agreement with the final head")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Draft acceptance per layer ({a.layers}-layer student)")
    fig.tight_layout()
    fig.savefig(out / "acceptance.png", dpi=120)


if __name__ == "__main__":
    main()
