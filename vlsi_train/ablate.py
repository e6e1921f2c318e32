"""``vlsi train ablate``: the paper's Table 4 variants at the quickstart's scale.

The quickstart's prepared pieces (teacher and student with verbalizers, the teacher's
answers) are made once in ``out`` (or reused); each variant then runs interact + SFT tail
per seed (the seed drives data order and the matching sampler) and is evaluated on test
and compositional. Writes ``ablation.md`` (mean ± sd over seeds) and ``ablation.json``.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import yaml

from vlsi.atomic import atomic_write_text
from vlsi.errors import ConfigError

from .config import InteractConfig


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def read_grid(path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"grid file {p} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    variants = data.get("variants")
    if not isinstance(variants, list) or not variants:
        raise ConfigError(f"{p}: needs a non-empty `variants:` list of {{name, interact}} mappings")
    allowed = set(InteractConfig.__dataclass_fields__)
    for v in variants:
        if not isinstance(v, dict) or "name" not in v:
            raise ConfigError(f"{p}: every variant needs a name (got {v!r})")
        bad = set(v.get("interact") or {}) - allowed
        if bad:
            raise ConfigError(f"{p}: variant {v['name']!r} has unknown interact keys {sorted(bad)}; allowed: {sorted(allowed)}")
    return variants


def ablate(grid, out, seeds: int = 3, recipe=None, progress: bool = True, jobs: int | None = None) -> dict:
    """Run every variant of ``grid`` for ``seeds`` seeds (on ``jobs`` processes); returns and
    writes the table."""
    from .quickstart import Recipe, Run, default_jobs, run_parallel

    variants = read_grid(grid)
    jobs = default_jobs() if jobs is None else jobs
    run = Run(Path(out), recipe or Recipe(), seed=0, progress=progress, procs=jobs)
    prepared = run.prepare()
    todo = [(v, s) for v in variants for s in range(seeds)]
    calls = [(run, "distil", (prepared, f"ablate/{_slug(v['name'])}/seed{s}", dict(v.get("interact") or {}), s))
             for v, s in todo]
    ckpts = run_parallel(calls, jobs, progress, desc="ablation runs")
    evals = [(v, split, ckpt) for (v, _), (ckpt, _) in zip(todo, ckpts) for split in ("test", "compositional")]
    reports = run_parallel([(run, "evaluate_one", (ckpt, prepared["data"] / f"{split}.json", False, None))
                            for _, split, ckpt in evals], jobs, progress, desc="ablation evaluations")
    results = {}
    for (v, split, _), (rep, _) in zip(evals, reports):
        results.setdefault(v["name"], {}).setdefault(split, []).append(rep["accuracy"])
    lines = ["| variant | test | compositional |", "| --- | --- | --- |"]
    summary = {}
    for v in variants:
        row = results[v["name"]]
        cells = []
        for split in ("test", "compositional"):
            xs = row[split]
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            summary.setdefault(v["name"], {})[split] = {"mean": statistics.mean(xs), "sd": sd, "runs": xs}
            cells.append(f"{statistics.mean(xs):.3f} ± {sd:.3f}")
        lines.append(f"| {v['name']} | {cells[0]} | {cells[1]} |")
    md = "\n".join(lines) + f"\n\n{seeds} seeds each; exact-match accuracy.\n"
    atomic_write_text(Path(out) / "ablation.md", md)
    atomic_write_text(Path(out) / "ablation.json", json.dumps(summary, indent=2) + "\n")
    return {"table": md, "results": summary}
