"""``vlsi train``: one stage, or a pipeline of stages, from a YAML file plus overrides.

A pipeline file has top-level defaults and a ``pipeline:`` list; each entry's keys override
the defaults for that stage, e.g.::

    data: runs/data/train.json
    steps: 500
    pipeline:
      - {stage: verbalize, model: runs/teacher, out: runs/teacher_verb}
      - {stage: verbalize, model: runs/student, out: runs/student_verb}
      - {stage: interact, model: runs/student_verb, teacher: runs/teacher_verb, out: runs/student_interact}
      - {stage: sft, model: runs/student_interact, out: runs/student_vlsi}

A stage whose checkpoint already exists is skipped, so a re-run continues the pipeline.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from vlsi.config import apply_overrides, from_dict
from vlsi.errors import ConfigError

from .config import TrainConfig


def stage_configs(path: str | Path | None, overrides: list[str] | None = None) -> list[TrainConfig]:
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold a mapping of config keys")
    data = apply_overrides(data, overrides or [])
    stages = data.pop("pipeline", None)
    if stages is None:
        return [from_dict(TrainConfig, data)]
    if not isinstance(stages, list) or not stages:
        raise ConfigError("pipeline must be a non-empty list of stage mappings")
    out = []
    for i, st in enumerate(stages):
        if not isinstance(st, dict):
            raise ConfigError(f"pipeline[{i}] must be a mapping")
        merged = {**data, **st}
        for k in ("optim", "lora", "verbalizer", "interact", "distributed"):
            if isinstance(data.get(k), dict) and isinstance(st.get(k), dict):
                merged[k] = {**data[k], **st[k]}
        out.append(from_dict(TrainConfig, merged, prefix=f"pipeline[{i}]."))
    return out


def run(path: str | Path | None = None, overrides: list[str] | None = None, resume: bool = False) -> list[Path]:
    """Train every stage in order; returns the checkpoints written (or found)."""
    from vlsi.checkpoint import META_FILE

    from .trainer import train

    done = []
    cfgs = stage_configs(path, overrides)
    for cfg in cfgs:
        if len(cfgs) > 1 and (Path(cfg.out) / META_FILE).is_file():
            print(f"{cfg.stage}: {cfg.out} exists, skipped")
            done.append(Path(cfg.out))
            continue
        done.append(train(cfg, resume=resume))
    return done


def main(argv: list[str] | None = None) -> None:
    """``python -m vlsi_train.pipeline [--config FILE] [--resume] [key=value ...]``: what
    ``vlsi train run`` does, without the command line around it (what torchrun launches in
    each process, so that training never starts the CLI)."""
    import argparse
    import sys

    from vlsi.errors import VLsIError

    ap = argparse.ArgumentParser(prog="python -m vlsi_train.pipeline", description=main.__doc__)
    ap.add_argument("--config", default=None, help="YAML file: one stage's keys, or a pipeline.")
    ap.add_argument("--resume", action="store_true", help="Continue from each stage's last saved state.")
    ap.add_argument("overrides", nargs="*", help="key=value overrides (dotted for nested keys).")
    args = ap.parse_args(argv)
    try:
        for path in run(args.config, args.overrides, resume=args.resume):
            print(f"wrote {path}")
    except VLsIError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
