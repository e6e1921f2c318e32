"""Loading the models a stage needs, with the checks the method requires."""

from __future__ import annotations

from vlsi.archs import get_adapter
from vlsi.checkpoint import Checkpoint, load_checkpoint
from vlsi.errors import ConfigError
from vlsi.verbalizer import VerbalizerConfig, Verbalizers, parse_target_layers

from .config import FREEZABLE, TrainConfig


def load_student(cfg: TrainConfig, device) -> Checkpoint:
    """The model to train: a checkpoint folder, or ``tiny:SIZE`` built from scratch."""
    if cfg.model.startswith("tiny:"):
        from vlsi.tiny import build_tiny

        model, tok, proc, _ = build_tiny(cfg.arch, cfg.model.split(":", 1)[1], seed=cfg.seed)
        ck = Checkpoint(model.to(device), tok, proc, None, {"provenance": {"built_by": "vlsi.tiny", "size": cfg.model}})
    else:
        ck = load_checkpoint(cfg.model, device=device)
    return ck


def ensure_verbalizers(ck: Checkpoint, spec) -> Verbalizers:
    """The checkpoint's verbalizers, or new ones from the config's target layers (the verbalize
    stage runs on one model at a time, teacher or student, each with its own targets)."""
    if ck.verbalizers is not None:
        return ck.verbalizers
    n = get_adapter(ck.model).text_sizes(ck.model.config).num_layers
    cfg = VerbalizerConfig(parse_target_layers(spec.target_layers, n), arch=spec.arch, depth=spec.depth,
                           sizes=spec.sizes)
    ck.verbalizers = Verbalizers.for_model(ck.model, cfg)
    return ck.verbalizers


def freeze_parts(model, parts) -> None:
    """Fix the named student parts (``interact.freeze``: lm_head, embed_tokens, vision_tower,
    projector): ``requires_grad`` off, so no optimiser holds them and DDP expects no gradient."""
    ad = get_adapter(model)
    where = {"lm_head": ad.lm_head, "embed_tokens": ad.embed_tokens, "vision_tower": ad.vision_tower,
             "projector": ad.projector}
    for part in parts:
        if part not in where:
            raise ConfigError(f"interact.freeze names {part!r}; allowed: {', '.join(FREEZABLE)}")
        where[part](model).requires_grad_(False)


def check_pair(student: Checkpoint, teacher: Checkpoint) -> None:
    """VLsI needs a shared vocabulary and at least as many teacher as student target layers."""
    sv, tv = student.tokenizer.get_vocab(with_added_tokens=True), teacher.tokenizer.get_vocab(with_added_tokens=True)
    if sv != tv:
        diff = sorted(set(sv.items()) ^ set(tv.items()))[:3]
        raise ConfigError(
            "teacher and student tokenizers differ (e.g. " + ", ".join(f"{t!r}->{i}" for t, i in diff) + "): "
            "VLsI compares vocabulary distributions token by token, so both must share one vocabulary"
        )
    s_rows = get_adapter(student.model).text_sizes(student.model.config).vocab_size
    t_rows = get_adapter(teacher.model).text_sizes(teacher.model.config).vocab_size
    if s_rows != t_rows:
        raise ConfigError(f"teacher LM head has {t_rows} rows, student {s_rows}: the vocabularies must be the same size")
    if teacher.verbalizers is None:
        raise ConfigError(f"teacher {teacher.path} has no verbalizers: run the verbalize stage on it first")
    if student.verbalizers is None:
        raise ConfigError(f"student {student.path} has no verbalizers: run the verbalize stage on it first")
    ts, tl = len(student.verbalizers.target_layers), len(teacher.verbalizers.target_layers)
    if ts > tl:
        raise ConfigError(
            f"the student has {ts} target layers but the teacher only {tl}: layer matching needs ts <= tl "
            f"(fewer student targets via verbalizer.target_layers, or more teacher heads)"
        )
    if ts == tl:
        import warnings

        warnings.warn(
            f"student and teacher both have {ts} target layers: with the search range and order "
            "preservation every student layer has a single candidate, so matching is fixed "
            "(give the teacher more verbalized layers for the adaptive matching to choose among)",
            stacklevel=2,
        )


def add_lora(model, cfg: TrainConfig):
    """Wrap the language model's projections with LoRA adapters; returns the peft model."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("lora.enabled=true needs peft: pip install 'vlsi[train]'") from None
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=get_adapter(model).lora_targets, bias="none")
    return get_peft_model(model, lcfg)
