"""Parity between an export and its PyTorch checkpoint, gating every export (:func:`gate`).

On real samples (images and questions), the reference (PyTorch) decodes greedily; the
artifact is fed the same tokens, and we compare per graph and end to end: vision-embedding
and logit max-abs / relative error, next-token KL (mean, max), top-1 agreement, greedy
generation exact match, task-accuracy delta, and per-layer verbalizer top-1 agreement and
logit error. An ONNX decoder split into graphs is checked as it runs: every segment and the LM
head on every position, every verbalizer head graph on the hidden state captured after its
layer, asked for at every position. Tolerances live in ``TOLERANCES``; a failed metric names
itself and by how much.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlsi.errors import VLsIError

from .tolerances import TOLERANCES, tolerance_key  # noqa: F401  (re-exported: the one table)


class ParityError(VLsIError):
    """An export drifted from its checkpoint beyond the tolerance table."""


@dataclass
class ParityReport:
    precision: str
    metrics: dict
    failures: list[str] = field(default_factory=list)
    per_sample: list[dict] = field(default_factory=list)
    graphs: list[str] = field(default_factory=list)
    """The artifact's graphs the checks ran (a split ONNX decoder's segments and heads each named)."""

    @property
    def passed(self) -> bool:
        return not self.failures

    def markdown(self) -> str:
        lines = [f"# Parity: {'PASSED' if self.passed else 'FAILED'} ({self.precision})", "",
                 "| metric | value | bound |", "| --- | --- | --- |"]
        tol = TOLERANCES[self.precision]
        for k, v in self.metrics.items():
            if isinstance(v, dict):
                continue
            bound = f"{tol[k][0]} {tol[k][1]:g}" if k in tol else ""
            lines.append(f"| {k} | {v:.6g} | {bound} |")
        for layer, v in self.metrics.get("verbalizer_top1_per_layer", {}).items():
            lines.append(f"| verbalizer top-1, layer {layer} | {v:.4f} | |")
        if self.graphs:
            lines += ["", f"Graphs run: {', '.join(self.graphs)}."]
        if self.precision.startswith("tensorrt-"):
            lines += ["", "These are the TensorRT graphs run by ONNX Runtime's CPU provider.",
                      "TensorRT device parity: not run (`vlsi build` on the device measures it)."]
        if self.failures:
            lines += ["", "Failures:", *[f"- {f}" for f in self.failures]]
        return "\n".join(lines) + "\n"


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(p || q) of two logit vectors (reference first)."""
    p = p_logits.astype(np.float64) - p_logits.max()
    q = q_logits.astype(np.float64) - q_logits.max()
    lp = p - np.log(np.exp(p).sum())
    lq = q - np.log(np.exp(q).sum())
    return float((np.exp(lp) * (lp - lq)).sum())


def default_samples(n: int = 16, seed: int = 1234) -> list:
    """Questions and images from the built-in synthetic generator (test split)."""
    import tempfile

    from vlsi.data.loaders import load_records
    from vlsi.data.synth import SynthConfig, generate

    with tempfile.TemporaryDirectory() as d:
        generate(Path(d) / "s", SynthConfig(n=1, n_eval=n, seed=seed, mc=False), progress=False)
        recs, _ = load_records(Path(d) / "s" / "test.json")
        for r in recs:  # keep the image bytes: the folder goes away
            object.__setattr__(r, "images", tuple(Path(i).read_bytes() for i in r.images))
        return recs[:n]


def validate(artifact, reference, data=None, n: int = 16, max_new_tokens: int = 16, write: bool = True,
             raise_on_fail: bool = True) -> ParityReport:
    """Compare ``artifact`` with the checkpoint ``reference``; writes parity.json/.md/.png into it."""
    from vlsi.data.loaders import load_records
    from vlsi.eval import is_correct
    from vlsi.manifest import load_manifest
    from vlsi_runtimes import load

    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    precision = tolerance_key(manifest)
    ref = load(reference, backend="torch")
    # parity=True: caches kept at full precision (llama.cpp's f32 KV), so the tolerances
    # measure the weights' precision, not the cache's. TensorRT graphs are checked on ONNX
    # Runtime here; `vlsi build` measures the engines on the device (device_parity).
    rt = load(artifact, backend="onnx" if manifest.target == "tensorrt" else "auto", parity=True)
    records = load_records(data)[0][:n] if data else default_samples(n)
    records = [r for r in records if r.answer is not None]
    if not records:
        raise VLsIError(f"no usable samples in {data}: parity needs questions with answers")

    kls, top1, max_abs, rel, greedy, acc_ref, acc_rt, vis, same_ids = [], [], [], [], [], [], [], [], []
    vtop1: dict = {k: [] for k in rt.verbalizer_layers}
    vabs: list[float] = []
    samples = []
    for r in records:
        images = list(r.images)
        prompt = r.turns[0].text if r.turns[0].role == "user" else r.turns[1].text
        same_ids.append(int(ref.encode(images, prompt).ids == rt.encode(images, prompt).ids))
        ref_ids = list(ref.stream_tokens(images, prompt, max_new_tokens))
        rt_ids = list(rt.stream_tokens(images, prompt, max_new_tokens))
        a = ref.logits(images, prompt, continuation=ref_ids)
        b = rt.logits(images, prompt, continuation=ref_ids)
        for x, y in zip(a, b):
            kls.append(_kl(x["final"], y["final"]))
            top1.append(int(np.argmax(x["final"]) == np.argmax(y["final"])))
            err = float(np.abs(x["final"] - y["final"]).max())
            max_abs.append(err)
            rel.append(err / max(1e-12, float(np.abs(x["final"]).max())))
            for k in vtop1:
                vtop1[k].append(int(np.argmax(x[k]) == np.argmax(y[k])))
                vabs.append(float(np.abs(x[k] - y[k]).max()))
        greedy.append(int(ref_ids == rt_ids))
        ref_text, rt_text = ref.decode(ref_ids), rt.decode(rt_ids)
        acc_ref.append(is_correct(r, ref_text))
        acc_rt.append(is_correct(r, rt_text))
        if images:
            vis.append(float(np.abs(ref.image_embeds(images) - rt.image_embeds(images)).max()))
        samples.append({"id": r.id, "reference": ref_text, "artifact": rt_text, "match": ref_ids == rt_ids})
    metrics = {
        "samples": len(records), "positions": len(kls), "tokens_match": float(np.mean(same_ids)),
        "logits_max_abs": max(max_abs), "logits_rel": max(rel),
        "kl_mean": float(np.mean(kls)), "kl_max": float(np.max(kls)),
        "top1": float(np.mean(top1)), "greedy_match": float(np.mean(greedy)),
        "acc_reference": float(np.mean(acc_ref)), "acc_artifact": float(np.mean(acc_rt)),
        "acc_drop": float(np.mean(acc_ref) - np.mean(acc_rt)),
    }
    if vis:
        metrics["vision_max_abs"] = max(vis)
    if vtop1:
        per = {str(k): float(np.mean(v)) for k, v in vtop1.items()}
        metrics["verbalizer_top1"] = min(per.values())
        metrics["verbalizer_logits_max_abs"] = max(vabs)
        metrics["verbalizer_top1_per_layer"] = per
    failures = []
    for key, (op, bound) in TOLERANCES[precision].items():
        if key not in metrics:
            continue
        v = metrics[key]
        ok = v <= bound + 1e-12 if op == "<=" else v >= bound - 1e-12
        if not ok:
            failures.append(f"{key} = {v:.6g}, needs {op} {bound:g} (off by {abs(v - bound):.3g})")
    ran = sorted(getattr(rt, "sessions", {}))  # ONNX Runtime opens a head graph when its logits are first read
    report = ParityReport(precision, metrics, failures, samples, ran)
    if write:
        _write(artifact, report)
    if failures and raise_on_fail:
        raise ParityError(f"{artifact}: parity FAILED for {precision}: " + "; ".join(failures))
    return report


def _write(artifact: Path, report: ParityReport) -> None:
    from vlsi.atomic import atomic_write_text

    atomic_write_text(artifact / "parity.json", json.dumps(
        {"precision": report.precision, "passed": report.passed, "metrics": report.metrics, "graphs": report.graphs,
         "tolerances": {k: list(v) for k, v in TOLERANCES[report.precision].items()},
         "failures": report.failures, "samples": report.per_sample}, indent=2) + "\n")
    atomic_write_text(artifact / "parity.md", report.markdown())
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    m = report.metrics
    names = ["top1", "greedy_match", "verbalizer_top1"]
    vals = [m.get(k, float("nan")) for k in names]
    fig, ax = plt.subplots(figsize=(5, 2.8))
    ax.bar(names, vals, color=["#2e7d32" if report.passed else "#c62828"] * len(names))
    ax.set_ylim(0, 1.02)
    ax.set_title(f"parity {report.precision}: {'passed' if report.passed else 'FAILED'}, "
                 f"KL mean {m['kl_mean']:.2e}, max |dlogit| {m['logits_max_abs']:.1e}", fontsize=8)
    fig.tight_layout()
    fig.savefig(artifact / "parity.png", dpi=110)
    plt.close(fig)


def gate(tmp: Path, out: Path, reference, manifest, data, samples: int) -> None:
    """Run parity on the finished folder ``tmp``; record it in its manifest, or refuse the
    export (the report is kept in ``<out>.parity-failed/``)."""
    from vlsi.manifest import write_manifest

    report = validate(tmp, reference, data=data, n=samples, raise_on_fail=False)
    if not report.passed:
        failed = out.parent / f"{out.name}.parity-failed"
        shutil.rmtree(failed, ignore_errors=True)
        failed.mkdir(parents=True)
        for name in ("parity.json", "parity.md", "parity.png"):
            if (tmp / name).is_file():
                shutil.copyfile(tmp / name, failed / name)
        hint = ""
        if data is None:  # the built-in synthetic samples: a model trained on other data sees them out of distribution
            hint = (" The check ran on vlsi's built-in synthetic samples; if the model was trained on other data, "
                    "pass its own test questions (--data path/to/test.json, --parity-samples 64), on which "
                    "near-ties between tokens are rarer.")
        raise ParityError(f"export to {out} refused, parity failed ({report.precision}): "
                          + "; ".join(report.failures) + f". Report: {failed}/parity.md." + hint)
    manifest.parity = {"passed": True, "metrics": {k: v for k, v in report.metrics.items() if not isinstance(v, dict)}}
    write_manifest(tmp, manifest)
