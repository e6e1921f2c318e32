"""``vlsi train bench``: time per optimiser step and peak memory of SFT, final-layer KD and
VLsI's interact on the same batch. Each mode runs in its own process so peak memory is its own."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from vlsi.sysinfo import peak_rss_mb

MODES = {
    "sft": {"stage": "sft"},
    "final_layer_kd": {"stage": "interact", "interact": {"intermediate_op": "none", "last_op": "kld"}},
    "interact": {"stage": "interact"},
}


def _measure(mode: str, teacher: str, student: str, data: str, steps: int, batch_size: int, device: str) -> dict:
    import torch

    from vlsi.config import from_dict

    from .config import TrainConfig
    from .trainer import Trainer

    cfg = from_dict(TrainConfig, {**MODES[mode], "model": student, "teacher": teacher, "data": data, "out": "/nonexistent",
                                  "batch_size": batch_size, "steps": steps, "progress": False, "device": device})
    tr = Trainer(cfg)
    tr._setup()
    idxs = tr.plan.micro_batches(0)[0]  # the same batch every step
    tokens = sum(tr._answer_tokens(i) for i in idxs)
    params = [p for p in tr.module.parameters() if p.requires_grad]
    times = []
    for k in range(steps + 2):
        if tr.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss, _, _ = tr._micro_loss(idxs, tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        if tr.device.type == "cuda":
            torch.cuda.synchronize()
        if k >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - t)
    out = {"mode": mode, "s_per_step": statistics.median(times), "peak_rss_mb": peak_rss_mb(),
           "answer_tokens": tokens, "batch": len(idxs), "device": str(tr.device)}
    if tr.device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def bench(teacher, student, data, steps: int = 10, batch_size: int = 16, device: str = "auto") -> list[dict]:
    """Run every mode in a fresh process; returns one row per mode with ratios."""
    rows = []
    for mode in MODES:
        cmd = [sys.executable, "-m", "vlsi_train.bench", mode, str(teacher), str(student), str(data), str(steps),
               str(batch_size), device]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"bench {mode} failed:\n{res.stderr[-2000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    base = {r["mode"]: r["s_per_step"] for r in rows}
    for r in rows:
        r["x_sft"] = r["s_per_step"] / base["sft"]
        r["x_final_layer_kd"] = r["s_per_step"] / base["final_layer_kd"]
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| mode | s/step | x SFT | x final-layer KD | peak RSS MB |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['s_per_step']:.4f} | {r['x_sft']:.2f} | {r['x_final_layer_kd']:.2f} | "
                     f"{r['peak_rss_mb']:.0f}" + (f" (CUDA {r['peak_cuda_mb']:.0f})" if "peak_cuda_mb" in r else "") + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    mode, teacher, student, data, steps, bs, device = sys.argv[1:8]
    print(json.dumps(_measure(mode, teacher, student, data, int(steps), int(bs), device)))
