"""Deterministic synthetic visual-QA data: scenes drawn with Pillow, questions in eight families.

Usage::

    from vlsi.data.synth import SynthConfig, generate
    stats = generate("data/synth", SynthConfig(n=2000, seed=0))

writes ``images/{split}_{idx:06d}.png``, ``{split}.json`` (LLaVA conversations plus the scene:
``objects``, ``target``), ``{split}.tsv`` (VLMEvalKit multiple choice) and ``meta.json`` for
the splits ``train``, ``val``, ``test`` and ``compositional``, and ``pool`` when ``n_pool`` asks
for one (fresh train-distribution images, none equal to a train image).

Determinism: every record has its own ``random.Random`` seeded from (seed, split, index), so
the same config gives the same bytes in every file, and a larger ``n`` only appends records.
Multiple-choice options come from a second per-record generator: ``mc`` changes no JSON byte.

Compositional split: a fixed set of (colour, shape) combinations (one per colour, shapes spread
evenly, chosen from the seed) never appears in train/val/test scenes (nor in their questions);
every compositional scene holds one, and its question is about that object where the family
allows (``count`` asks about its colour, shape or dots; ``describe`` names it among the rest).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from vlsi.data.scenes import (
    COLOURS, DEFAULT_BACKGROUND, MAX_DOTS, NAMED_BACKGROUNDS, POSITION_NAMES, POSITIONS, SHAPE_PLURALS,
    SHAPES, SIZES, STYLE_ADJECTIVES, STYLES, SEQUENCE_PANELS, Obj, max_jitter, png_bytes,
    render_grid, render_sequence, usable_colours,
)
from vlsi.errors import ConfigError

__all__ = [
    "FAMILIES", "SPLITS", "COLOURS", "SHAPES", "SIZES", "STYLES", "POSITIONS", "POSITION_NAMES",
    "RELATIONS", "VOCAB_VERSION", "MC_INSTRUCTION", "POOL_SPLIT", "SynthConfig", "SynthStats", "generate",
    "corpus_texts", "held_out_combos", "mc_prompt",
]

#: Question families; a record's ``category`` is one of these.
FAMILIES: tuple[str, ...] = (
    "colour", "shape", "count", "position", "relation", "exists", "describe", "sequence",
)
SPLITS: tuple[str, ...] = ("train", "val", "test", "compositional")
#: The optional split of fresh images (``SynthConfig.n_pool``), written after the others.
POOL_SPLIT = "pool"
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
#: Bump when any word, template or drawing changes: tokenizers and checkpoints depend on it.
VOCAB_VERSION = 1
#: The line VLMEvalKit-style prompts end with (the TSV loader appends it).
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
MC_LETTERS: tuple[str, ...] = ("A", "B", "C", "D")


# --------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Lists given for tuple fields are turned into tuples."""

    n: int = 1000
    """Number of train samples (one image each)."""
    seed: int = 0
    """Seeds everything: scenes, questions, held-out combinations, option order."""
    image_size: int = 84
    """Side of the square images in pixels (28..1024)."""
    grid: int = 3
    """Cells per side of a scene (2..4); each object sits in its own cell."""
    min_objects: int = 1
    """Fewest objects in a grid scene (``relation`` questions use at least 2)."""
    max_objects: int = 3
    """Most objects in a grid scene (at most grid * grid)."""
    families: tuple[str, ...] | None = None
    """Question families to draw from (subset of ``FAMILIES``); None: every family the object
    range allows (``relation`` needs max_objects >= 2)."""
    family_weights: tuple[tuple[str, float], ...] | None = None
    """Relative weight per family, e.g. ``{"describe": 2.0}`` (missing families weigh 1)."""
    reasoning: bool = False
    """Answers as one explaining sentence then ``Answer: X.`` instead of just ``X.``."""
    background: tuple[int, int, int] = DEFAULT_BACKGROUND
    """Background RGB, a name (grey, white, black) or ``#rrggbb``. Palette colours too close
    to it are left out of the scenes."""
    n_eval: int | None = None
    """Samples in each of val, test and compositional; None: max(20, n // 10)."""
    mc: bool = True
    """Also write ``{split}.tsv`` multiple-choice files (VLMEvalKit format)."""
    qa_per_image: int = 1
    """Question/answer pairs per grid scene (extra pairs are later turns without ``<image>``)."""
    dots: bool = False
    """Draw 0-3 dots inside grid-scene objects (and ask ``count`` questions about them).
    ``sequence`` images always use dots."""
    n_pool: int = 0
    """Samples in a ``pool`` split: scenes and questions drawn as for train, from their own
    per-record seeds, and redrawn until no image is byte-equal to a train image. Images a
    model trained on ``train`` never saw (the teacher-labelled pool of distillation). 0: no
    pool split. The other splits are the same bytes whatever ``n_pool`` is."""

    def __post_init__(self) -> None:
        def bad(key, value, allowed):
            raise ConfigError(f"synth option {key}={value!r} is invalid; allowed: {allowed}")

        def set_(key, value):
            object.__setattr__(self, key, value)

        for key, lo, hi in (("n", 1, None), ("image_size", 28, 1024), ("grid", 2, 4), ("n_pool", 0, None),
                            ("qa_per_image", 1, 8), ("min_objects", 1, None), ("max_objects", 1, None)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                bad(key, v, f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            bad("seed", self.seed, "an integer")
        if self.n_eval is not None and (isinstance(self.n_eval, bool) or not isinstance(self.n_eval, int)
                                        or self.n_eval < 0):
            bad("n_eval", self.n_eval, "None or an integer >= 0")
        cells = self.grid * self.grid
        if not self.min_objects <= self.max_objects <= cells:
            raise ConfigError(
                f"synth options min_objects={self.min_objects}, max_objects={self.max_objects}: need "
                f"1 <= min_objects <= max_objects <= grid*grid ({cells})"
            )
        set_("background", _parse_background(self.background))
        fams = self.families
        if isinstance(fams, str):
            fams = [f.strip() for f in fams.split(",") if f.strip()]
        if fams is not None:
            fams = tuple(dict.fromkeys(fams))
            unknown = [f for f in fams if f not in FAMILIES]
            if unknown or not fams:
                bad("families", self.families, f"a non-empty subset of {', '.join(FAMILIES)}")
            if "relation" in fams and self.max_objects < 2:
                raise ConfigError(
                    "synth option families includes 'relation', which needs two objects: set "
                    "max_objects >= 2 or leave 'relation' out"
                )
            set_("families", fams)
        w = self.family_weights
        if w is not None:
            items = list(w.items()) if isinstance(w, Mapping) else [tuple(p) for p in w]
            for name, value in items:
                if name not in FAMILIES or not isinstance(value, (int, float)) or not (
                        math.isfinite(value) and value >= 0):
                    bad("family_weights", w, f"family -> weight >= 0, families: {', '.join(FAMILIES)}")
            d = dict(items)
            set_("family_weights", tuple((f, float(d[f])) for f in FAMILIES if f in d))
            if not any(self.weight(f) > 0 for f in self.active_families):
                bad("family_weights", w, "at least one selected family with a weight > 0")

    @property
    def active_families(self) -> tuple[str, ...]:
        if self.families is not None:
            return self.families
        return tuple(f for f in FAMILIES if f != "relation" or self.max_objects >= 2)

    def weight(self, family: str) -> float:
        return dict(self.family_weights or ()).get(family, 1.0)

    def split_sizes(self) -> dict[str, int]:
        m = max(20, self.n // 10) if self.n_eval is None else self.n_eval
        sizes = {"train": self.n, "val": m, "test": m, "compositional": m}
        if self.n_pool:
            sizes[POOL_SPLIT] = self.n_pool
        return sizes


def _parse_background(bg) -> tuple[int, int, int]:
    rgb = None
    if isinstance(bg, str):
        s = bg.strip().lower()
        if s in NAMED_BACKGROUNDS:
            rgb = NAMED_BACKGROUNDS[s]
        elif re.fullmatch(r"#[0-9a-f]{6}", s):
            rgb = tuple(int(s[k:k + 2], 16) for k in (1, 3, 5))
    elif isinstance(bg, Sequence) and len(bg) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in bg):
        rgb = tuple(bg)
    if rgb is None:
        raise ConfigError(f"synth option background={bg!r} is invalid; allowed: an (r, g, b) triple "
                          f"of 0..255, '#rrggbb' or one of {', '.join(NAMED_BACKGROUNDS)}")
    if len(usable_colours(rgb)) < 4:
        raise ConfigError(f"synth option background={bg!r} hides too many object colours; pick a "
                          "colour further from the palette (default: mid-grey)")
    return rgb


def held_out_combos(cfg: SynthConfig) -> tuple[tuple[str, str], ...]:
    """The (colour, shape) pairs kept for the compositional split: one per usable colour, the
    shapes spread evenly, so each colour keeps 5 shapes and each shape 6+ colours in train."""
    colours = list(usable_colours(cfg.background))
    shapes = list(SHAPES)
    rng = random.Random(f"vlsi-synth/{cfg.seed}/held-out")
    rng.shuffle(colours)
    rng.shuffle(shapes)
    pairs = {(c, shapes[k % len(shapes)]) for k, c in enumerate(colours)}
    return tuple(sorted(pairs, key=lambda p: (list(COLOURS).index(p[0]), SHAPES.index(p[1]))))


@dataclass(frozen=True)
class _Ctx:
    cfg: SynthConfig
    colours: tuple[str, ...]
    positions: tuple[str, ...]
    held_out: tuple[tuple[str, str], ...]
    train_combos: tuple[tuple[str, str], ...]
    weights: tuple[float, ...]

    @staticmethod
    def of(cfg: SynthConfig) -> "_Ctx":
        colours = usable_colours(cfg.background)
        held = held_out_combos(cfg)
        train = tuple((c, s) for c in colours for s in SHAPES if (c, s) not in held)
        weights = tuple(cfg.weight(f) for f in cfg.active_families)
        return _Ctx(cfg, colours, POSITION_NAMES[cfg.grid], held, train, weights)


# --------------------------------------------------------------------------- text helpers

def _an(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _phrase(o: Obj, attrs: Sequence[str]) -> str:
    words = []
    if "size" in attrs:
        words.append(o.size)
    if "style" in attrs:
        words.append(STYLE_ADJECTIVES[o.style])
    if "colour" in attrs:
        words.append(o.colour)
    words.append(o.shape if "shape" in attrs else "object")
    return " ".join(words)


def _refer(o: Obj, objs: list[Obj], base: tuple[str, ...]) -> str | None:
    """Shortest description from ``base`` (+ size, style) that fits ``o`` alone, else None."""
    for extra in ((), ("size",), ("style",), ("size", "style")):
        attrs = extra + base
        if sum(all(getattr(p, a) == getattr(o, a) for a in attrs) for p in objs) == 1:
            return _phrase(o, attrs)
    return None


def _dots_text(n: int) -> str:
    return "no dots" if n == 0 else f"{NUMBER_WORDS[n]} dot" + ("s" if n > 1 else "")


def _pick(rng: random.Random, answer: str, preferred: Sequence[str], pool: Sequence[str],
          k: int = 3) -> list[str]:
    """k distractors != answer: the preferred (plausible) ones first, then the rest of the pool."""
    first = [p for p in dict.fromkeys(preferred) if p != answer]
    rng.shuffle(first)
    rest = [p for p in dict.fromkeys(pool) if p != answer and p not in first]
    rng.shuffle(rest)
    return (first + rest)[:k]


@dataclass
class _QA:
    family: str
    question: str
    answer: str
    """Short answer without the final '.'."""
    reason: str
    """One sentence explaining the answer."""
    target: tuple[int, ...]
    distract: Callable[[random.Random], list[str]] = field(repr=False)

    def text(self, reasoning: bool) -> str:
        return f"{self.reason} Answer: {self.answer}." if reasoning else f"{self.answer}."


# --------------------------------------------------------------------------- question families
# Each takes (rng, objs, ctx, cand, comp, want_yes): cand are the indices the question may be
# about (the held-out objects in the compositional split). None means "not possible here".

def _q_colour(rng, objs, ctx, cand, comp, want_yes):
    for i in rng.sample(cand, len(cand)):
        o = objs[i]
        ref = _refer(o, objs, ("shape",))
        if ref:
            at = ctx.positions[o.cell]
            return _QA("colour", f"what colour is the {ref}?", o.colour,
                       f"The {ref} is at the {at} and it is {o.colour}.", (i,),
                       lambda r: _pick(r, o.colour, [p.colour for p in objs], ctx.colours))
    return None


def _q_shape(rng, objs, ctx, cand, comp, want_yes):
    for i in rng.sample(cand, len(cand)):
        o = objs[i]
        ref = _refer(o, objs, ("colour",))
        if ref:
            at = ctx.positions[o.cell]
            return _QA("shape", f"what shape is the {ref}?", o.shape,
                       f"The {ref} at the {at} is {_an(o.shape)}.", (i,),
                       lambda r: _pick(r, o.shape, [p.shape for p in objs], SHAPES))
    return None


def _listing(objs: list[Obj], ctx: _Ctx) -> str:
    return _join([f"{_an(_phrase(o, ('colour', 'shape')))} at the {ctx.positions[o.cell]}" for o in objs])


def _q_count(rng, objs, ctx, cand, comp, want_yes):
    kinds = ["shape", "colour"] + (["dots"] if ctx.cfg.dots else []) + ([] if comp else ["total"])
    kind = rng.choice(kinds)
    o = objs[rng.choice(cand)]
    if kind == "dots":
        ref = _refer(o, objs, ("colour", "shape"))
        if not ref:
            return None
        n, i = o.dots, objs.index(o)
        q = f"how many dots are on the {ref}?"
        reason = f"The {ref} at the {ctx.positions[o.cell]} has {_dots_text(n)}."
        pool = [str(k) for k in range(MAX_DOTS + 1)]
        return _QA("count", q, str(n), reason, (i,), lambda r: _pick(r, str(n), [], pool))
    if kind == "total":
        match, q, none = objs, "how many objects are there?", "no objects"
    elif kind == "shape":
        shape = o.shape if comp or rng.random() < 0.75 else rng.choice(SHAPES)
        match = [p for p in objs if p.shape == shape]
        q, none = f"how many {SHAPE_PLURALS[shape]} are there?", f"no {SHAPE_PLURALS[shape]}"
    else:
        colour = o.colour if comp or rng.random() < 0.75 else rng.choice(ctx.colours)
        match = [p for p in objs if p.colour == colour]
        q, none = f"how many {colour} objects are there?", f"no {colour} objects"
    n = len(match)
    reason = f"I see {_listing(match, ctx) if match else none}."
    pool = [str(k) for k in range(max(4, ctx.cfg.max_objects + 1))]
    near = [str(n - 1), str(n + 1)] if n > 0 else ["1"]
    return _QA("count", q, str(n), reason, tuple(objs.index(p) for p in match),
               lambda r: _pick(r, str(n), near, pool))


def _q_position(rng, objs, ctx, cand, comp, want_yes):
    for i in rng.sample(cand, len(cand)):
        o = objs[i]
        ref = _refer(o, objs, ("colour", "shape"))
        if ref:
            pos = ctx.positions[o.cell]
            return _QA("position", f"where is the {ref}?", pos, f"The {ref} is in the {pos} cell.",
                       (i,), lambda r: _pick(r, pos, [ctx.positions[p.cell] for p in objs],
                                             ctx.positions))
    return None


def _q_relation(rng, objs, ctx, cand, comp, want_yes):
    g = ctx.cfg.grid
    pairs = [(i, j) for i in range(len(objs)) for j in range(len(objs))
             if i != j and (i in cand or j in cand)]
    rng.shuffle(pairs)
    for i, j in pairs:
        (ri, ci), (rj, cj) = divmod(objs[i].cell, g), divmod(objs[j].cell, g)
        if ri == rj:
            rel = "left of" if ci < cj else "right of"
        elif ci == cj:
            rel = "above" if ri < rj else "below"
        else:
            continue
        a, b = _refer(objs[i], objs, ("colour", "shape")), _refer(objs[j], objs, ("colour", "shape"))
        if a and b:
            return _QA("relation", f"is the {a} left of, right of, above or below the {b}?", rel,
                       f"The {a} is at the {ctx.positions[objs[i].cell]} and the {b} is at the "
                       f"{ctx.positions[objs[j].cell]}.", (i, j),
                       lambda r: _pick(r, rel, [], RELATIONS))
    return None


def _q_exists(rng, objs, ctx, cand, comp, want_yes):
    present = {(o.colour, o.shape) for o in objs}
    if want_yes:
        i = rng.choice(cand)
        o = objs[i]
        combo = (o.colour, o.shape)
        reason = f"There is {_an(' '.join(combo))} at the {ctx.positions[o.cell]}."
        target: tuple[int, ...] = (i,)
    else:
        absent = [c for c in (ctx.held_out if comp else ctx.train_combos) if c not in present]
        hard = [c for c in absent if any(c[0] == p[0] or c[1] == p[1] for p in present)]
        if not absent:
            return None
        combo = rng.choice(hard if hard and rng.random() < 0.5 else absent)
        reason = f"I see {_listing(objs, ctx)}, but no {' '.join(combo)}."
        target = ()
    ans = "yes" if want_yes else "no"
    return _QA("exists", f"is there {_an(' '.join(combo))}?", ans, reason, target,
               lambda r: ["no" if want_yes else "yes"])


def _describe(objs: list[Obj], ctx: _Ctx) -> str:
    return ", ".join(f"{_an(o.colour + ' ' + o.shape)} at the {ctx.positions[o.cell]}"
                     for o in sorted(objs, key=lambda o: o.cell))


def _q_describe(rng, objs, ctx, cand, comp, want_yes):
    ans = _describe(objs, ctx)
    k = len(objs)
    reason = f"There {'is' if k == 1 else 'are'} {k} object{'' if k == 1 else 's'}."

    def distract(r: random.Random) -> list[str]:
        out: list[str] = []
        free = [c for c in range(ctx.cfg.grid ** 2) if c not in {o.cell for o in objs}]
        for _ in range(200):
            alt = list(objs)
            j = r.randrange(k)
            o = alt[j]
            how = r.choice(("colour", "shape", "cell", "swap")[: 4 if k > 1 else 3])
            if how == "colour":
                alt[j] = replace(o, colour=r.choice([c for c in ctx.colours if c != o.colour]))
            elif how == "shape":
                alt[j] = replace(o, shape=r.choice([s for s in SHAPES if s != o.shape]))
            elif how == "cell" and free:
                alt[j] = replace(o, cell=r.choice(free))
            elif how == "swap":  # two objects trade colours: the binding error to catch
                m = r.choice([x for x in range(k) if x != j])
                alt[j], alt[m] = replace(o, colour=alt[m].colour), replace(alt[m], colour=o.colour)
            text = _describe(alt, ctx)
            if text != ans and text not in out:
                out.append(text)
            if len(out) == 3:
                break
        return out

    return _QA("describe", "describe the objects in the image.", ans, reason,
               tuple(range(k)), distract)


_FAMILY_FN = {"colour": _q_colour, "shape": _q_shape, "count": _q_count, "position": _q_position,
              "relation": _q_relation, "exists": _q_exists, "describe": _q_describe}


def _sequence(rng: random.Random, ctx: _Ctx, comp: bool) -> tuple[list[Obj], Obj, _QA]:
    """Three panels following a pattern (colour / shape alternate or stay, dots go up / down /
    stay) and the fourth to guess. The answer's (colour, shape) is also the second panel's."""
    pool = ctx.held_out if comp else ctx.train_combos
    allowed = set(ctx.held_out) | set(ctx.train_combos) if comp else set(ctx.train_combos)
    while True:
        rules = (rng.choice(["stay", "alternate"]), rng.choice(["stay", "alternate"]),
                 rng.choice(["stay", "up", "down"]))
        if rules == ("stay", "stay", "stay"):
            continue
        ca, sa = rng.choice(pool)
        co = rng.choice([c for c in ctx.colours if c != ca]) if rules[0] == "alternate" else ca
        so = rng.choice([s for s in SHAPES if s != sa]) if rules[1] == "alternate" else sa
        if (co, so) in allowed:  # the panels show (co, so) and (ca, sa) only
            break
    d0 = rng.randint(0, MAX_DOTS)
    dots = {"stay": [d0] * 4, "up": [0, 1, 2, 3], "down": [3, 2, 1, 0]}[rules[2]]
    seq = [Obj(co if k % 2 == 0 else ca, so if k % 2 == 0 else sa, dots=dots[k], cell=k)
           for k in range(SEQUENCE_PANELS)]
    panels, missing = seq[:-1], seq[-1]
    ans = f"{_an(ca + ' ' + sa)} with {_dots_text(missing.dots)}"
    parts = [
        f"the colour stays {ca}" if co == ca else f"the colour alternates between {co} and {ca}",
        f"the shape stays {_an(sa)}" if so == sa else f"the shape alternates between {so} and {sa}",
        {"stay": f"the number of dots stays at {NUMBER_WORDS[d0]}",
         "up": "the number of dots goes up by one",
         "down": "the number of dots goes down by one"}[rules[2]],
    ]
    reason = (parts[0] + ", " + parts[1] + " and " + parts[2] + ".").capitalize()

    def distract(r: random.Random) -> list[str]:
        colours = [co] if co != ca else []
        shapes = [so] if so != sa else []
        near = [d for d in (missing.dots - 1, missing.dots + 1) if 0 <= d <= MAX_DOTS]
        cands = ([f"{_an(c + ' ' + sa)} with {_dots_text(missing.dots)}" for c in colours] +
                 [f"{_an(ca + ' ' + s)} with {_dots_text(missing.dots)}" for s in shapes] +
                 [f"{_an(ca + ' ' + sa)} with {_dots_text(d)}" for d in near])
        more = ([f"{_an(c + ' ' + sa)} with {_dots_text(missing.dots)}" for c in ctx.colours] +
                [f"{_an(ca + ' ' + s)} with {_dots_text(missing.dots)}" for s in SHAPES])
        return _pick(r, ans, cands, more)

    qa = _QA("sequence", "what would the missing image look like?", ans, reason, (), distract)
    return panels, missing, qa


# --------------------------------------------------------------------------- samples

@dataclass
class _Sample:
    family: str
    objects: list[Obj]
    qas: list[_QA]
    missing: Obj | None = None


def _scene(rng: random.Random, ctx: _Ctx, family: str, comp: bool) -> list[Obj]:
    cfg = ctx.cfg
    lo = max(cfg.min_objects, 2) if family == "relation" else cfg.min_objects
    k = rng.randint(lo, cfg.max_objects)
    objs = []
    for j, cell in enumerate(rng.sample(range(cfg.grid ** 2), k)):
        colour, shape = rng.choice(ctx.held_out if comp and j == 0 else ctx.train_combos)
        size, style = rng.choice(SIZES), rng.choice(STYLES)
        dots = rng.randint(0, MAX_DOTS) if cfg.dots else 0
        mj = max_jitter(cfg.image_size, cfg.grid, size)
        dx, dy = rng.randint(-mj, mj), rng.randint(-mj, mj)
        objs.append(Obj(colour, shape, size, style, dots, cell, dx, dy))
    return sorted(objs, key=lambda o: o.cell)


def _make_sample(ctx: _Ctx, split: str, idx: int, want_yes: bool,
                 family: str | None = None, redraw: int = 0) -> _Sample:
    """Record ``idx`` of ``split``; ``redraw`` > 0 draws it again from another seed."""
    cfg = ctx.cfg
    rng = random.Random(f"vlsi-synth/{cfg.seed}/{split}/{idx}" + (f"/redraw{redraw}" if redraw else ""))
    fams = cfg.active_families
    if family is None:
        family = rng.choices(fams, weights=ctx.weights)[0]
    comp = split == "compositional"
    if family == "sequence":
        panels, missing, qa = _sequence(rng, ctx, comp)
        return _Sample(family, panels, [qa], missing)
    for _ in range(1000):
        objs = _scene(rng, ctx, family, comp)
        cand = [i for i, o in enumerate(objs) if (o.colour, o.shape) in ctx.held_out] if comp \
            else list(range(len(objs)))
        qa = _FAMILY_FN[family](rng, objs, ctx, cand, comp, want_yes)
        if qa is not None:
            break
    else:  # pragma: no cover - every family succeeds on most scenes
        raise RuntimeError(f"no {family} question found for {split} sample {idx}")
    qas = [qa]
    extra_fams = [f for f in fams if f != "sequence"]
    if cfg.qa_per_image > 1 and extra_fams:
        xr = random.Random(f"vlsi-synth/{cfg.seed}/{split}/{idx}" + (f"/redraw{redraw}" if redraw else "") + "/extra")
        xw = [cfg.weight(f) for f in extra_fams]
        everything = list(range(len(objs)))
        for _ in range(cfg.qa_per_image - 1):
            for _try in range(20):
                f = xr.choices(extra_fams, weights=xw)[0] if sum(xw) > 0 else xr.choice(extra_fams)
                q = _FAMILY_FN[f](xr, objs, ctx, everything, comp, xr.random() < 0.5)
                if q is not None and all(q.question != p.question for p in qas):
                    qas.append(q)
                    break
    return _Sample(family, objs, qas)


def _obj_json(o: Obj, ctx: _Ctx, panel: bool = False) -> dict:
    if panel:
        return {"colour": o.colour, "shape": o.shape, "dots": o.dots, "panel": o.cell}
    return {"colour": o.colour, "shape": o.shape, "size": o.size, "style": o.style, "dots": o.dots,
            "position": ctx.positions[o.cell], "cell": o.cell}


def mc_prompt(question: str, options: Sequence[str]) -> str:
    """The text a model sees for a multiple-choice row (as the VLMEvalKit TSV loader builds it,
    without the ``<image>`` line)."""
    lines = [question] + [f"{MC_LETTERS[k]}. {t}" for k, t in enumerate(options)] + [MC_INSTRUCTION]
    return "\n".join(lines)


def _mc(sample: _Sample, ctx: _Ctx, split: str, idx: int) -> tuple[list[str], str]:
    """Options (answer + distractors, answer at a seeded uniform position) and the letter."""
    r = random.Random(f"vlsi-synth/{ctx.cfg.seed}/{split}/{idx}/mc")
    qa = sample.qas[0]
    opts = qa.distract(r)[:3]
    k = r.randrange(len(opts) + 1)
    opts.insert(k, qa.answer)
    return opts, MC_LETTERS[k]


# --------------------------------------------------------------------------- writing

@dataclass(frozen=True)
class SynthStats:
    """What :func:`generate` wrote and how fast."""

    out_dir: str
    counts: dict[str, int]
    """Samples per split."""
    families: dict[str, dict[str, int]]
    """Samples per family (first question), per split."""
    held_out: tuple[tuple[str, str], ...]
    seconds: float
    samples_per_s: float
    """All splits, drawing + PNG + JSON + TSV writing included."""

    def as_dict(self) -> dict:
        return asdict(self)


MAX_REDRAWS = 1000
"""Draws of one pool record before giving up on an image unlike every train image."""


def _draw(ctx: _Ctx, split: str, idx: int, want_yes: bool, avoid: set[str] | None) -> tuple[_Sample, bytes]:
    """Record ``idx`` and its PNG; with ``avoid`` (sha256 of images to stay unlike), redrawn
    until its image is none of them."""
    cfg = ctx.cfg
    for redraw in range(MAX_REDRAWS):
        s = _make_sample(ctx, split, idx, want_yes, redraw=redraw)
        if s.family == "sequence":
            img = render_sequence(s.objects, cfg.image_size, cfg.background)
        else:
            img = render_grid(s.objects, cfg.image_size, cfg.grid, cfg.background)
        png = png_bytes(img)
        if avoid is None or hashlib.sha256(png).hexdigest() not in avoid:
            return s, png
    raise ConfigError(f"synth option n_pool: {split} sample {idx} came out equal to a train image {MAX_REDRAWS} "
                      "times; the scene space is too small for a fresh pool (raise grid or image_size)")


def _write_split(root: Path, split: str, size: int, ctx: _Ctx, bar,
                 avoid: set[str] | None = None) -> tuple[Counter, set[str]]:
    """Write ``split``; -> its family counts and the sha256 of its images."""
    cfg = ctx.cfg
    records, fam_counts, hashes = [], Counter(), set()
    tsv = open(root / f"{split}.tsv", "w", newline="", encoding="utf-8") if cfg.mc else None
    try:
        writer = csv.writer(tsv, delimiter="\t", lineterminator="\n") if tsv else None
        if writer:
            writer.writerow(["index", "image", "question", *MC_LETTERS, "answer", "category"])
        for idx in range(size):
            want_yes = fam_counts["exists"] % 2 == 0  # exact yes/no balance within a split
            s, png = _draw(ctx, split, idx, want_yes, avoid)
            fam_counts[s.family] += 1
            hashes.add(hashlib.sha256(png).hexdigest())
            name = f"images/{split}_{idx:06d}.png"
            (root / name).write_bytes(png)
            conv = []
            for k, qa in enumerate(s.qas):
                conv.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + qa.question})
                conv.append({"from": "gpt", "value": qa.text(cfg.reasoning)})
            rec = {"id": f"{split}_{idx:06d}", "image": name, "conversations": conv,
                   "category": s.family, "answer": s.qas[0].answer + ".",
                   "objects": [_obj_json(o, ctx, s.missing is not None) for o in s.objects],
                   "target": list(s.qas[0].target)}
            if s.missing is not None:
                rec["missing"] = _obj_json(s.missing, ctx, True)
            records.append(rec)
            if writer:
                opts, letter = _mc(s, ctx, split, idx)
                opts += [""] * (len(MC_LETTERS) - len(opts))
                writer.writerow([idx, base64.b64encode(png).decode("ascii"), s.qas[0].question,
                                 *opts, letter, s.family])
            bar.update(1)
    finally:
        if tsv:
            tsv.close()
    with open(root / f"{split}.json", "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    return fam_counts, hashes


def generate(out_dir, cfg: SynthConfig | None = None, *, progress: bool = True,
             overwrite: bool = False) -> SynthStats:
    """Write the four splits and ``meta.json`` into ``out_dir`` (see the module docstring).

    Everything is written to a temporary folder beside ``out_dir`` and renamed into place at
    the end, so ``out_dir`` is either complete or untouched. An existing non-empty ``out_dir``
    is refused unless ``overwrite=True``.
    """
    from tqdm.auto import tqdm

    from ..atomic import atomic_dir

    cfg = cfg or SynthConfig()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a folder; choose a folder path")
    ctx = _Ctx.of(cfg)
    sizes = cfg.split_sizes()
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite, overwrite_flag="overwrite=True (CLI: --overwrite)") as tmp:
        os.chmod(tmp, 0o755)
        (tmp / "images").mkdir()
        fams = {}
        with tqdm(total=sum(sizes.values()), disable=not progress, desc="synth", unit="img") as bar:
            train_images: set[str] = set()
            for split in sizes:  # the four SPLITS, then the pool (unlike every train image)
                c, hashes = _write_split(tmp, split, sizes[split], ctx, bar,
                                         avoid=train_images if split == POOL_SPLIT else None)
                if split == "train":
                    train_images = hashes
                fams[split] = {f: c[f] for f in FAMILIES if c[f]}
        meta = {
            "generator": "vlsi.data.synth", "vocab_version": VOCAB_VERSION,
            "config": asdict(cfg), "held_out": [list(p) for p in ctx.held_out],
            "counts": sizes, "families": fams, "colours": {c: list(COLOURS[c]) for c in ctx.colours},
            "shapes": list(SHAPES), "positions": list(ctx.positions), "relations": list(RELATIONS),
            "answer_format": "short: 'X.'; reasoning: '<sentence> Answer: X.' (vlsi.eval.normalize_answer)",
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    seconds = time.perf_counter() - t0
    total = sum(sizes.values())
    stats = SynthStats(str(out), sizes, fams, ctx.held_out, seconds, total / max(seconds, 1e-9))
    if progress:
        print(f"synth: {total} samples in {seconds:.1f} s ({stats.samples_per_s:.0f} samples/s) "
              f"-> {out}", file=sys.stderr)
    return stats


# --------------------------------------------------------------------------- answers and corpus

def corpus_texts(cfg: SynthConfig | None = None) -> list[str]:
    """Deterministic texts holding every word, number and punctuation mark a question, either
    answer form or a multiple-choice prompt can contain (for training a tokenizer).

    With ``cfg=None`` it covers every grid size, dots on and off and all families; with a
    config, that config's vocabulary (plus the full word lists, always)."""
    texts = [
        " ".join(COLOURS), " ".join(SHAPES), " ".join(SHAPE_PLURALS.values()), " ".join(SIZES),
        " ".join(STYLE_ADJECTIVES.values()), ", ".join(RELATIONS), "yes. no.",
        " ".join(str(k) for k in range(17)), " ".join(NUMBER_WORDS), " ".join(MC_LETTERS),
        MC_INSTRUCTION, "Answer: " + ". ".join(MC_LETTERS) + ".",
    ]
    texts += [", ".join(POSITION_NAMES[g]) + "." for g in sorted(POSITION_NAMES)]
    if cfg is None:
        cfgs = [SynthConfig(grid=g, dots=True, max_objects=min(4, g * g)) for g in sorted(POSITION_NAMES)]
    else:
        cfgs = [cfg]
    for c in cfgs:
        ctx = _Ctx.of(c)
        for split in ("train", "compositional"):
            for fam in c.active_families:
                for idx in range(40):
                    s = _make_sample(ctx, split, idx, idx % 2 == 0, family=fam)
                    for qa in s.qas:
                        texts += [qa.question, qa.text(False), qa.text(True)]
                    opts, letter = _mc(s, ctx, split, idx)
                    texts += [mc_prompt(s.qas[0].question, opts), letter]
    return texts
