"""``vlsi quickstart``: the whole method on the built-in synthetic task, on a CPU.

1. draw the synthetic data;
2. train the teacher on every label (cached between runs, keyed by recipe and code version);
3. train the student baseline on a small labelled subset of the teacher's training data
   (ground truth; the data-limited student);
4. the teacher answers a larger pool of images it never trained on (what every distillation
   method sees: synth's pool split, no image byte-equal to a train image);
5. verbalize teacher and student (heads only, backbones frozen);
6. from the same student baseline, give each method the same number of extra steps on the
   same images: SFT on the labels (equal compute), sequence-level KD (SFT on the teacher's
   answers), final-layer KD (+ the same SFT tail), and VLsI (interact + SFT tail);
7. evaluate everything on test and the compositional split, per-layer verbalizers included
   (VLsI's heads refitted to its final weights first: a short frozen-backbone verbalize pass).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlsi.atomic import atomic_write_text

CODE_VERSION = "qs-4"
"""Part of the teacher cache key. qs-2: long runs train under torchrun (DDP) when --jobs > 1;
qs-3: Qwen2-VL tiny processors take llama.cpp clip's image bounds (56 px -> 84 px); qs-4: the
images are drawn at 84 px on a 3x3 grid (one merged image token per cell, as 56 px on 2x2 was)."""


@dataclass(frozen=True)
class Recipe:
    """What the quickstart trains; the defaults are the design measured in the closing notes
    of the training issue (single objects on a 3x3 grid, colour / shape / describe questions)."""

    synth: dict = field(default_factory=lambda: {
        "n": 12000, "n_eval": 300, "image_size": 84, "grid": 3, "min_objects": 1, "max_objects": 1,
        "families": ["colour", "shape", "describe"], "mc": False})
    """Synthetic data options (vlsi.data.synth.SynthConfig fields). 12,000 training images:
    with 6,000 the teacher overfitted (0.84-0.85 on test), with 12,000 it reaches 0.95 in the
    same 3,000 steps, which leaves the student a gap worth distilling. 84 px on a 3x3 grid: each
    cell is one 28 px merged image token, and 84 px is the smallest image llama.cpp's clip keeps
    unchanged for Qwen2-VL (8 merged tokens at least). 56 px images, grown to 84 px by the
    processor, left the teacher at 0.51 on test (shapes blurred across token borders)."""
    teacher: str = "tiny:qs_teacher"
    student: str = "tiny:qs_student"
    teacher_steps: int = 3000
    teacher_lr: float = 1e-3
    student_labels: int = 300
    """Records with labels the student baseline learns from (the data-limited student)."""
    student_steps: int = 1500
    """The student fits its 300 labels by about 900 steps, but the longer run matters: from a
    1,000-step student, 800 steps of sequence-level KD reached 0.76-0.77 on test against 0.83
    from the 1,500-step one (same teacher answers)."""
    pool: int = 3000
    """Images the teacher answers; every distillation method sees exactly these."""
    fresh_pool: bool = True
    """The pool's images are ones the teacher never trained on: synth's ``pool`` split (drawn
    like train, none byte-equal to a train image), as the paper distils on data apart from
    the teacher's. False: the first ``pool`` train images, the teacher's own (the design before
    issue 15). The student's ``student_labels`` are the first train records either way."""
    extra_steps: int = 800
    """Steps every compared method gets on top of the student baseline."""
    sft_tail: float = 0.75
    """Fraction of extra_steps VLsI (and final-layer KD) spend in the SFT tail (0.75: 200
    interact + 600 SFT steps; with 0.5 VLsI reached 0.82 on test against 0.87, seed 0)."""
    verbalize_steps: int = 300
    refit_steps: int = 100
    """Frozen-backbone verbalize steps (on the pool) that refit VLsI's heads to its final,
    post-SFT weights before its per-layer accuracies are read: SFT carries the heads over
    untouched, so unrefitted they under-state what the layers know. 0: read the carried heads."""
    teacher_targets: str = "1,2,3"
    student_targets: str = "2,3"
    """Fewer student than teacher targets, so the adaptive matching has a choice."""
    batch_size: int = 32
    lr: float = 1e-3
    distill_temperature: float = 1.0
    interact_lr: float = 1e-3
    data_seed: int = 0
    """Seed of the data and the teacher, shared by every run; a run's own seed drives the
    student's initialisation, data order and the matching sampler."""


# settings that change how a run looks, not what it trains
_COSMETIC = {"progress", "log_every", "out", "threads", "device", "model", "teacher", "data"}


def _check_same(out: Path, cfg) -> None:
    """A finished stage is reused only if it was trained with the same settings; otherwise a
    re-run with a changed recipe or code would silently report stale results."""
    from vlsi.errors import ConfigError

    done = json.loads((out / "vlsi.json").read_text()).get("provenance", {}).get("config", {})
    want = asdict(cfg)
    diff = sorted(k for k in want if k not in _COSMETIC and k in done and json.dumps(done[k], sort_keys=True)
                  != json.dumps(want[k], sort_keys=True))
    if diff:
        raise ConfigError(f"{out} was trained with different settings ({', '.join(diff)}) than this run asks for; "
                          f"use a new --out folder, or delete {out} to retrain it")


DDP_MIN_STEPS = 500
"""Runs this long go to torchrun when several processes are allowed: starting the processes
costs seconds, which short runs (verbalize, 300 steps) would not win back."""


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _torchrun(cfg, procs: int) -> Path:
    """Train ``cfg`` with DDP over ``procs`` one-thread CPU processes, through PyTorch's own
    launcher (``python -m torch.distributed.run``): on a small model this beats one process
    with ``procs`` threads. Same global batch; the losses follow a single process's (tested in
    test_train_resume_dist). Progress and errors print to this process's stderr."""
    import subprocess
    import sys
    import tempfile

    import yaml

    from vlsi.errors import VLsIError

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, cfg_file = tempfile.mkstemp(prefix=f".{out.name}-", suffix=".yaml", dir=out.parent)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(json.loads(json.dumps({**asdict(cfg), "threads": 1})), f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "vlsi_train.pipeline", "--config", cfg_file]
    try:
        res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    finally:
        os.unlink(cfg_file)
    if res.returncode != 0 or not (out / "vlsi.json").is_file():
        raise VLsIError(f"training {out} with {procs} processes under torchrun failed (exit {res.returncode}); "
                        f"its error is printed above. Run with --jobs 1 to train in this process.")
    return out


def _cache_root() -> Path:
    return Path(os.environ.get("VLSI_CACHE", Path.home() / ".cache" / "vlsi"))


class Run:
    """One seed of the quickstart in ``out``; each step skips work already on disk."""

    def __init__(self, out: Path, recipe: Recipe, seed: int, progress: bool = True, procs: int = 1):
        self.out, self.r, self.seed, self.progress = Path(out), recipe, seed, progress
        self.procs = procs  # processes for a long run (DDP, CPU) and for side-by-side runs; 1: this process
        self.out.mkdir(parents=True, exist_ok=True)
        self.times: dict[str, float] = {}

    def _timed(self, name, fn):
        t = time.time()
        res = fn()
        self.times[name] = round(time.time() - t, 1)
        return res

    def _train(self, out: Path, **kw) -> Path:
        from vlsi.config import from_dict

        from .config import TrainConfig
        from .trainer import train

        base = {"seed": self.seed, "batch_size": self.r.batch_size, "progress": self.progress, "log_every": 50,
                "optim": {"lr": self.r.lr, "warmup_steps": 50, "min_lr": self.r.lr / 100}}
        for k, v in kw.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                base[k] = {**base[k], **v}
            else:
                base[k] = v
        cfg = from_dict(TrainConfig, {**base, "out": str(out)})
        if (out / "vlsi.json").is_file():
            _check_same(out, cfg)
            return out
        if self.procs > 1 and cfg.steps >= DDP_MIN_STEPS and not _has_cuda():
            return _torchrun(cfg, self.procs)
        return train(cfg)

    # -------------------------------------------------------------- pieces
    def data(self) -> Path:
        """The synthetic splits, with a ``pool`` split of ``pool`` fresh images when
        ``fresh_pool`` (train and the other splits are the same bytes either way, so the cached
        teacher stays valid)."""
        from vlsi.data.synth import SynthConfig, generate

        d = self.out / "data"
        n_pool = self.r.pool if self.r.fresh_pool else 0
        meta = d / "meta.json"
        if not meta.is_file() or json.loads(meta.read_text())["counts"].get("pool", 0) != n_pool:
            generate(d, SynthConfig(**{**self.r.synth, "seed": self.r.data_seed, "n_pool": n_pool}),
                     progress=self.progress, overwrite=True)
        return d

    def teacher(self, data: Path) -> Path:
        r = self.r
        key = hashlib.sha256(json.dumps([CODE_VERSION, r.teacher, r.teacher_steps, r.teacher_lr, r.batch_size,
                                         r.data_seed, r.synth], sort_keys=True).encode()).hexdigest()[:16]
        cached = _cache_root() / "teachers" / key
        self._train(cached, stage="pretrain", model=r.teacher, data=str(data / "train.json"), seed=r.data_seed,
                    steps=r.teacher_steps, optim={"lr": r.teacher_lr, "min_lr": r.teacher_lr / 100})
        return cached

    def pool_images(self, data: Path) -> Path:
        """The records whose images the teacher answers: the fresh pool split, or (without
        ``fresh_pool``) the teacher's own train split, of which the first ``pool`` are used."""
        return data / ("pool.json" if self.r.fresh_pool else "train.json")

    def teacher_answers(self, teacher: Path, data: Path) -> Path:
        """The teacher-labelled pool (``pool_teacher.json``), checked to hold no image the teacher
        trained on when ``fresh_pool`` (a file left by an older recipe would)."""
        from vlsi.errors import ConfigError

        from .teacher_labels import label_with_teacher, shared_images

        pool = self.out / "pool_teacher.json"
        if not pool.is_file():
            label_with_teacher(teacher, self.pool_images(data), pool, limit=self.r.pool, progress=self.progress)
        if self.r.fresh_pool:
            seen = shared_images(pool, data / "train.json")
            if seen:
                raise ConfigError(f"{pool} holds {len(seen)} images of the teacher's train split (e.g. {seen[0]}), "
                                  "but the recipe asks for a fresh pool (fresh_pool), and every later stage learnt "
                                  f"from it: use a new --out folder, or delete {self.out} to rerun")
        return pool

    def prepare(self) -> dict:
        """Data, teacher, student baseline, the teacher's answers on the pool, verbalized models."""
        r, o = self.r, self.out
        data = self._timed("data", self.data)
        train_json = str(data / "train.json")
        teacher = self._timed("teacher", lambda: self.teacher(data))
        student = self._timed("student", lambda: self._train(
            o / "student", stage="pretrain", model=r.student, data=train_json, limit=r.student_labels,
            steps=r.student_steps))
        pool = self._timed("teacher_answers", lambda: self.teacher_answers(teacher, data))
        tv = self._timed("verbalize_teacher", lambda: self._train(
            o / "teacher_verb", stage="verbalize", model=str(teacher), data=str(pool), steps=r.verbalize_steps,
            verbalizer={"target_layers": r.teacher_targets}))
        sv = self._timed("verbalize_student", lambda: self._train(
            o / "student_verb", stage="verbalize", model=str(student), data=str(pool), steps=r.verbalize_steps,
            verbalizer={"target_layers": r.student_targets}))
        return {"data": data, "teacher": tv, "student": sv, "pool": pool}

    def refit_heads(self, model: Path, pool: Path) -> Path:
        """``model`` with its verbalizer heads refitted to its final weights: ``refit_steps`` of
        the verbalize stage (backbone frozen, so the model's own answers are unchanged), from
        the heads it carries. Written beside it as ``<name>_refit``."""
        return self._train(model.parent / f"{model.name}_refit", stage="verbalize", model=str(model), data=str(pool),
                           steps=self.r.refit_steps, verbalizer={"target_layers": self.r.student_targets})

    def distil(self, p: dict, name: str, interact: dict, seed: int | None = None) -> Path:
        """Interact (with these interact options) then the SFT tail, from the verbalized student."""
        r, o = self.r, self.out
        tail = max(1, round(r.extra_steps * r.sft_tail))
        extra = {} if seed is None else {"seed": seed}
        mid = self._train(o / f"{name}_interact", stage="interact", model=str(p["student"]), teacher=str(p["teacher"]),
                          data=str(p["pool"]), steps=r.extra_steps - tail,
                          interact={"distill_temperature": r.distill_temperature, **interact},
                          optim={"lr": r.interact_lr, "min_lr": r.interact_lr / 100}, **extra)
        return self._train(o / name, stage="sft", model=str(mid), data=str(p["pool"]), steps=tail, **extra)

    def method(self, p: dict, name: str) -> Path:
        """Train one compared method from the prepared pieces ``p``."""
        r, o = self.r, self.out
        if name == "sft_equal_compute":
            return self._train(o / name, stage="sft", model=str(p["student"]), data=str(p["data"] / "train.json"),
                               limit=r.student_labels, steps=r.extra_steps)
        if name == "seq_kd":
            return self._train(o / name, stage="sft", model=str(p["student"]), data=str(p["pool"]), steps=r.extra_steps)
        if name == "final_layer_kd":
            return self.distil(p, name, {"intermediate_op": "none", "last_op": "kld"})
        if name == "vlsi":
            return self.distil(p, name, {})
        raise ValueError(f"unknown method {name!r}")

    def all(self) -> dict:
        """Prepare, then train the four methods (``procs`` at a time)."""
        p = self.prepare()
        names = ("sft_equal_compute", "seq_kd", "final_layer_kd", "vlsi")
        methods = run_parallel([(self, "method", (p, n)) for n in names], self.procs, self.progress,
                               desc=f"seed {self.seed}: the 4 methods")
        for n, (path, secs) in zip(names, methods):
            self.times[n] = secs
        return {**p, **{n: path for n, (path, _) in zip(names, methods)}}

    def evaluate(self, paths: dict) -> dict:
        """Accuracy of every method on test and compositional; per-layer verbalizer accuracy on
        test for the teacher and student (heads fitted in their verbalize step) and VLsI (heads
        refitted to its final weights, unless ``refit_steps`` is 0). The evaluations are
        independent: they run ``procs`` at a time, as the compared methods do."""
        refit = self.r.refit_steps > 0
        heads = {"teacher": paths["teacher"], "student": paths["student"],
                 "vlsi": self._timed("refit_heads", lambda: self.refit_heads(paths["vlsi"], paths["pool"]))
                 if refit else paths["vlsi"]}
        res: dict = {"per_layer_verbalizer_heads": {
            "teacher": "fitted in the verbalize step", "student": "fitted in the verbalize step",
            "vlsi": (f"refitted to the final weights ({self.r.refit_steps} frozen-backbone verbalize steps on the "
                     "pool after SFT)") if refit else "carried through interaction and SFT, not refitted"}}
        jobs = []  # (method, split, what it reads, model, verbalize, report file)
        for split in ("test", "compositional"):
            data = paths["data"] / f"{split}.json"
            for name in METHODS:
                own_heads = split == "test" and heads.get(name) == paths[name]
                jobs.append((name, split, "acc+layers" if own_heads else "acc", paths[name], data, own_heads,
                             self.out / "eval" / f"{name}_{split}.json"))
                if split == "test" and name in heads and not own_heads:  # the refitted heads on the same backbone
                    jobs.append((name, split, "layers", heads[name], data, True,
                                 self.out / "eval" / f"{name}_refit_{split}.json"))
        reports = self._timed("evaluate", lambda: run_parallel(
            [(self, "evaluate_one", (model, data, verb, out)) for *_, model, data, verb, out in jobs], self.procs,
            self.progress, desc=f"seed {self.seed}: {len(jobs)} evaluations"))
        for (name, split, reads, *_), (rep, _) in zip(jobs, reports):
            if "acc" in reads:
                res.setdefault(f"{name}_acc", {})[split] = rep["accuracy"]
            if "layers" in reads:
                res.setdefault("per_layer_verbalizer_acc", {})[name] = rep["per_layer_accuracy"]
        return res

    @staticmethod
    def evaluate_one(model: Path, data: Path, verbalize: bool, out: Path | None) -> dict:
        """One evaluation (its report written to ``out`` when given); returns accuracy and per-layer accuracy."""
        from vlsi.eval import evaluate

        rep = evaluate(model, data, verbalize=verbalize, progress=False, out=out)
        return {"accuracy": rep["accuracy"], "per_layer_accuracy": rep.get("per_layer_accuracy")}


def default_jobs() -> int:
    """Parallel training processes: 2 where there are at least 2 CPU cores. These models are
    too small for a second thread to help much (1.4x one thread for the teacher here, against
    1.75x for DDP over two one-thread processes), so two one-thread processes finish
    independent runs sooner than one two-thread process."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def _worker_init() -> None:
    import torch
    from transformers.utils import logging

    torch.set_num_threads(1)
    logging.disable_progress_bar()  # "Loading weights" bars from two processes would interleave


def _call(obj, method: str, args: tuple):
    t = time.time()
    res = getattr(obj, method)(*args)
    return res, round(time.time() - t, 1)


def run_parallel(calls: list[tuple], jobs: int, progress: bool = True, desc: str = "runs") -> list:
    """``[(obj, method, args), ...]`` -> ``[(result, seconds), ...]`` in order, on ``jobs``
    worker processes (one torch thread each) or in this process when ``jobs`` is 1. Progress
    is a bar over finished runs; each worker's own bars are off so lines do not interleave."""
    if jobs <= 1 or len(calls) <= 1:
        return [_call(o, m, a) for o, m, a in calls]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    quiet = []  # workers: no bars of their own, and no processes of their own
    for o, m, a in calls:
        o = copy.copy(o)
        if hasattr(o, "progress"):
            o.progress = False
        if hasattr(o, "procs"):
            o.procs = 1
        quiet.append((o, m, a))
    out: list = [None] * len(calls)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init) as ex:
        futs = {ex.submit(_call, *c): k for k, c in enumerate(quiet)}
        with tqdm(total=len(futs), desc=f"{desc} ({jobs} processes)", disable=not progress) as bar:
            try:
                for f in as_completed(futs):
                    out[futs[f]] = f.result()
                    bar.update(1)
            except BaseException:
                for f in futs:
                    f.cancel()
                raise
    return out


def quickstart(out, seed: int = 0, seeds: int = 1, recipe: Recipe | None = None, progress: bool = True,
               jobs: int | None = None) -> dict:
    """Run the quickstart for ``seeds`` seeds (from ``seed``); writes ``out/report.json``.
    ``jobs``: processes for the four compared methods and the evaluations (default: :func:`default_jobs`)."""
    jobs = default_jobs() if jobs is None else jobs
    recipe = recipe or Recipe()
    t0 = time.time()
    out = Path(out)
    runs = []
    for s in range(seed, seed + seeds):
        t = time.time()
        run = Run(out / f"seed{s}" if seeds > 1 else out, recipe, s, progress, procs=jobs)
        res = run.evaluate(run.all())
        res.update({"seed": s, "seconds": round(time.time() - t, 1), "stage_seconds": run.times})
        runs.append(res)
    report = dict(runs[0]) if seeds == 1 else _aggregate(runs)
    report.update({"seconds": round(time.time() - t0, 1), "recipe": asdict(recipe)})
    if seeds > 1:
        report["runs"] = runs
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "report.md", table(report) + "\n")
    return report


METHODS = ("teacher", "student", "sft_equal_compute", "seq_kd", "final_layer_kd", "vlsi")


def _aggregate(runs: list[dict]) -> dict:
    agg: dict = {"seed": [r["seed"] for r in runs]}
    for m in METHODS:
        key = f"{m}_acc"
        agg[key] = {}
        for split in ("test", "compositional"):
            xs = [r[key][split] for r in runs]
            agg[key][split] = statistics.mean(xs)
            agg[key][f"{split}_sd"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
    layers = runs[0].get("per_layer_verbalizer_acc", {})
    agg["per_layer_verbalizer_acc"] = {
        m: {k: statistics.mean(r["per_layer_verbalizer_acc"][m][k] for r in runs) for k in layers[m]} for m in layers
    }
    agg["per_layer_verbalizer_heads"] = runs[0].get("per_layer_verbalizer_heads", {})
    return agg


def table(report: dict) -> str:
    """Markdown table of the methods' accuracies (mean +/- sd over seeds when several)."""
    lines = ["| method | test | compositional |", "| --- | --- | --- |"]
    for m in METHODS:
        acc = report[f"{m}_acc"]
        cells = []
        for split in ("test", "compositional"):
            sd = acc.get(f"{split}_sd")
            cells.append(f"{acc[split]:.3f}" + (f" ± {sd:.3f}" if sd is not None else ""))
        lines.append(f"| {m} | {cells[0]} | {cells[1]} |")
    t, s, v = (report[f"{m}_acc"]["test"] for m in ("teacher", "student", "vlsi"))
    if t > s:
        lines.append(f"\nVLsI closes {(v - s) / (t - s):.0%} of the teacher-student gap on test.")
    notes = report.get("per_layer_verbalizer_heads", {})
    for m, layers in report.get("per_layer_verbalizer_acc", {}).items():
        how = f"; heads {notes[m]}" if m in notes else ""
        lines.append(f"{m} per-layer verbalizer accuracy (test{how}): "
                     + ", ".join(f"L{k} {a:.2f}" for k, a in sorted(layers.items(), key=lambda x: int(x[0]))))
    return "\n".join(lines)
