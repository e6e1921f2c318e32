"""The synthetic visual-QA generator: determinism, splits, answers, TSV, atomic writes."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlsi.data import synth
from vlsi.data.synth import (
    COLOURS, FAMILIES, MC_INSTRUCTION, POSITION_NAMES, POSITIONS, RELATIONS, SHAPES, SPLITS,
    SynthConfig, corpus_texts, generate, held_out_combos, mc_prompt,
)
from vlsi.errors import ConfigError
from vlsi.eval import normalize_answer

SPLIT_FILES = [f"{s}.{ext}" for s in SPLITS for ext in ("json", "tsv")] + ["meta.json"]
ADJ = {"small": ("size", "small"), "large": ("size", "large"),
       "filled": ("style", "filled"), "outlined": ("style", "outline")}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, split: str) -> list[dict]:
    return json.loads((root / f"{split}.json").read_text())


def _tsv(root: Path, split: str) -> list[dict]:
    with open(root / f"{split}.tsv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _matches(ref: str, objects: list[dict]) -> list[int]:
    """Indices of the objects a phrase such as 'small outlined red star' / 'red object' fits."""
    out = []
    for i, o in enumerate(objects):
        ok = True
        for w in ref.split():
            if w in ADJ:
                key, val = ADJ[w]
                ok &= o[key] == val
            elif w in COLOURS:
                ok &= o["colour"] == w
            elif w in SHAPES:
                ok &= o["shape"] == w
            else:
                assert w == "object", f"unexpected word {w!r} in {ref!r}"
        if ok:
            out.append(i)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, SynthConfig(n=400, seed=7, dots=True, n_eval=80), progress=False)
    return root


@pytest.fixture(scope="module")
def reasoning_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth_r") / "data"
    generate(root, SynthConfig(n=120, seed=3, reasoning=True, qa_per_image=3, grid=4, max_objects=5,
                               n_eval=40), progress=False)
    return root


# --------------------------------------------------------------------------- determinism

def test_same_seed_same_bytes_and_different_seed_differs(tmp_path):
    cfg = SynthConfig(n=60, seed=11, n_eval=20, dots=True)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, cfg, progress=False)
    generate(b, cfg, progress=False)
    generate(c, SynthConfig(n=60, seed=12, n_eval=20, dots=True), progress=False)
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert set(SPLIT_FILES) <= set(ha)
    assert len([k for k in ha if k.startswith("images/")]) == 60 + 3 * 20
    assert ha == hb
    assert ha.keys() == hc.keys()
    assert all(ha[f] != hc[f] for f in SPLIT_FILES)
    assert sum(ha[k] != hc[k] for k in ha if k.startswith("images/")) > 100


def test_mc_option_changes_no_json_and_larger_n_appends(tmp_path):
    generate(tmp_path / "a", SynthConfig(n=40, seed=5, n_eval=20), progress=False)
    generate(tmp_path / "b", SynthConfig(n=40, seed=5, n_eval=20, mc=False), progress=False)
    generate(tmp_path / "c", SynthConfig(n=60, seed=5, n_eval=20), progress=False)
    assert not (tmp_path / "b" / "train.tsv").exists()
    assert (tmp_path / "a" / "train.json").read_bytes() == (tmp_path / "b" / "train.json").read_bytes()
    assert _load(tmp_path / "c", "train")[:40] == _load(tmp_path / "a", "train")


# --------------------------------------------------------------------------- splits

def test_compositional_split_is_disjoint_and_covered(data):
    meta = json.loads((data / "meta.json").read_text())
    held = {tuple(p) for p in meta["held_out"]}
    assert held == set(held_out_combos(SynthConfig(seed=7)))
    n_combos = len(COLOURS) * len(SHAPES)
    assert 0.15 <= len(held) / n_combos <= 0.20
    assert {c for c, _ in held} == set(COLOURS)  # one per colour: each keeps 5 shapes in train

    def combos(rec):
        objs = rec["objects"] + ([rec["missing"]] if "missing" in rec else [])
        return [(o["colour"], o["shape"]) for o in objs]

    for split in ("train", "val", "test"):
        for rec in _load(data, split):
            assert not held & set(combos(rec)), (split, rec["id"])
            assert not any(f"{c} {s}" in rec["conversations"][0]["value"] for c, s in held)
    train = _load(data, "train")
    assert {c for r in train for c, _ in combos(r)} == set(COLOURS)
    assert {s for r in train for _, s in combos(r)} == set(SHAPES)

    comp = _load(data, "compositional")
    assert len(comp) == 80
    for rec in comp:
        assert held & set(combos(rec)), rec["id"]
        objs, fam = rec["objects"], rec["category"]
        if fam in ("colour", "shape", "position", "relation"):
            assert any((objs[t]["colour"], objs[t]["shape"]) in held for t in rec["target"]), rec
        elif fam == "exists":
            q = rec["conversations"][0]["value"]
            assert any(re.search(rf"\ban? {c} {s}\?", q) for c, s in held), q
        elif fam == "sequence":
            assert (rec["missing"]["colour"], rec["missing"]["shape"]) in held


def test_split_sizes_and_meta(data):
    meta = json.loads((data / "meta.json").read_text())
    assert meta["counts"] == {"train": 400, "val": 80, "test": 80, "compositional": 80}
    assert meta["vocab_version"] == synth.VOCAB_VERSION
    assert set(meta["families"]["train"]) == set(FAMILIES)
    assert SynthConfig(n=1000).split_sizes()["val"] == 100
    assert SynthConfig(n=50).split_sizes()["test"] == 20


# --------------------------------------------------------------------------- answers

def _check_answer(rec: dict, grid: int = 3) -> None:
    fam, ans, objs = rec["category"], rec["answer"], rec["objects"]
    q = rec["conversations"][0]["value"]
    assert q.startswith("<image>\n")
    assert ans == ans.lower() and ans.endswith(".") and ans.strip() == ans
    a = normalize_answer(ans)
    t = [objs[i] for i in rec["target"]]
    if fam == "colour":
        assert a == t[0]["colour"]
    elif fam == "shape":
        assert a == t[0]["shape"]
    elif fam == "count":
        if "dots" in q:
            assert a == str(t[0]["dots"])
        else:
            assert a == str(len(t))
    elif fam == "position":
        assert a in POSITION_NAMES[grid] and a == t[0]["position"]
    elif fam == "relation":
        assert a in RELATIONS
        (ra, ca), (rb, cb) = divmod(t[0]["cell"], grid), divmod(t[1]["cell"], grid)
        want = {(0, -1): "left of", (0, 1): "right of", (-1, 0): "above", (1, 0): "below"}
        assert a == want[((ra > rb) - (ra < rb), (ca > cb) - (ca < cb))]
    elif fam == "exists":
        m = re.fullmatch(r"<image>\nis there an? (\w+) (\w+)\?", q)
        present = {(o["colour"], o["shape"]) for o in objs}
        assert a == ("yes" if (m.group(1), m.group(2)) in present else "no")
    elif fam == "describe":
        parts = [f"{'an' if o['colour'][0] in 'aeiou' else 'a'} {o['colour']} {o['shape']} at the "
                 f"{o['position']}" for o in sorted(objs, key=lambda o: o["cell"])]
        assert a == ", ".join(parts)
    elif fam == "sequence":
        m = rec["missing"]
        assert re.fullmatch(rf"an? {m['colour']} {m['shape']} with (no|one|two|three) dots?", a)
        assert len(objs) == 3 and [o["panel"] for o in objs] == [0, 1, 2]
    else:
        raise AssertionError(fam)


def test_every_family_gives_valid_answers(data):
    for split in SPLITS:
        recs = _load(data, split)
        for rec in recs:
            _check_answer(rec)
        ex = Counter(r["answer"] for r in recs if r["category"] == "exists")
        assert abs(ex["yes."] - ex["no."]) <= 1, (split, ex)
    assert {r["category"] for r in _load(data, "train")} == set(FAMILIES)


def test_questions_name_one_object(data):
    for split in SPLITS:
        for rec in _load(data, split):
            q, objs = rec["conversations"][0]["value"].split("\n", 1)[1], rec["objects"]
            refs = {
                "colour": re.fullmatch(r"what colour is the (.+)\?", q),
                "shape": re.fullmatch(r"what shape is the (.+)\?", q),
                "position": re.fullmatch(r"where is the (.+)\?", q),
                "relation": re.fullmatch(r"is the (.+) left of, right of, above or below the (.+)\?", q),
            }.get(rec["category"])
            if refs is None:
                continue
            for k, ref in enumerate(refs.groups()):
                assert _matches(ref, objs) == [rec["target"][k]], (q, objs)
            if rec["category"] == "colour":
                assert not any(c in q for c in COLOURS)
            if rec["category"] == "shape":
                assert not any(s in q for s in SHAPES)


def test_extract_answer_on_both_forms(reasoning_data):
    assert normalize_answer("red.") == "red"
    assert normalize_answer("  Top Left. ") == "top left"
    assert normalize_answer("The star is in the top left cell and it is red. Answer: red.") == "red"
    assert normalize_answer("a red star at the top, a blue circle at the center.") == \
        "a red star at the top, a blue circle at the center"
    assert normalize_answer("I think so. answer:  YES ") == "yes"
    for split in SPLITS:
        for rec in _load(reasoning_data, split):
            conv = rec["conversations"]
            gpt = conv[1]["value"]
            assert re.fullmatch(r"[A-Z][^\n]*\. Answer: [^\n]+\.", gpt), gpt
            assert normalize_answer(gpt) == normalize_answer(rec["answer"])
            _check_answer(rec, grid=4)
            # extra turns: human/gpt pairs, the image only in the first
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert all("<image>" not in t["value"] for t in conv[2:])
            if rec["category"] != "sequence":
                assert len(conv) == 6, rec["id"]


# --------------------------------------------------------------------------- multiple choice

def test_tsv_rows_are_valid_multiple_choice(data):
    letters_seen = Counter()
    for split in SPLITS:
        recs, rows = _load(data, split), _tsv(data, split)
        assert len(rows) == len(recs)
        assert list(rows[0]) == ["index", "image", "question", "A", "B", "C", "D", "answer", "category"]
        for k, (rec, row) in enumerate(zip(recs, rows)):
            assert row["index"] == str(k) and row["category"] == rec["category"]
            assert row["question"] == rec["conversations"][0]["value"].split("\n", 1)[1]
            opts = [row[L] for L in "ABCD" if row[L]]
            assert len(set(opts)) == len(opts)
            assert row[row["answer"]] == normalize_answer(rec["answer"])
            if rec["category"] == "exists":
                assert sorted(opts) == ["no", "yes"]
            else:
                assert len(opts) == 4
                letters_seen[row["answer"]] += 1
                fam = rec["category"]
                vocab = {"colour": COLOURS, "shape": SHAPES, "position": POSITIONS,
                         "relation": RELATIONS}.get(fam)
                if vocab is not None:
                    assert all(o in vocab for o in opts)
                elif fam == "count":
                    assert all(o.isdigit() for o in opts)
            if k < 5:
                png = base64.b64decode(row["image"])
                assert png == (data / rec["image"]).read_bytes()
                with Image.open(io.BytesIO(png)) as im:
                    assert im.format == "PNG" and im.size == (84, 84) and im.mode == "RGB"
    total = sum(letters_seen.values())
    assert all(letters_seen[L] > total / 8 for L in "ABCD"), letters_seen


# --------------------------------------------------------------------------- corpus, config

_TOKEN = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")


def test_corpus_covers_every_text(data, reasoning_data):
    corpus = corpus_texts()
    assert corpus == corpus_texts()
    words = {w for t in corpus for w in _TOKEN.findall(t)}
    for root in (data, reasoning_data):
        for split in SPLITS:
            recs = _load(root, split)
            texts = [t["value"].replace("<image>", "") for r in recs for t in r["conversations"]]
            texts += [mc_prompt(r["question"], [r[L] for L in "ABCD" if r[L]]) for r in _tsv(root, split)]
            missing = {w for t in texts for w in _TOKEN.findall(t)} - words
            assert not missing, (root, split, missing)
    assert MC_INSTRUCTION in corpus


def test_config_validation_and_options(tmp_path):
    for bad in ({"grid": 5}, {"n": 0}, {"min_objects": 3, "max_objects": 2}, {"max_objects": 10},
                {"families": ("colour", "smell")}, {"family_weights": {"colour": -1}},
                {"background": "pink"}, {"background": (245, 245, 240, 1)},
                {"families": ("relation",), "max_objects": 1}, {"image_size": 8}):
        with pytest.raises(ConfigError):
            SynthConfig(**bad)
    assert "relation" not in SynthConfig(min_objects=1, max_objects=1).active_families
    assert SynthConfig(families=["shape", "colour"]).families == ("shape", "colour")
    assert SynthConfig(background="white").background == (255, 255, 255)
    assert POSITION_NAMES[2] == ("top left", "top right", "bottom left", "bottom right")
    assert POSITIONS[4] == "center" and len(set(POSITION_NAMES[4])) == 16

    cfg = SynthConfig(n=30, seed=1, n_eval=20, background="white", families=("colour", "describe"),
                      family_weights={"describe": 3}, grid=2, max_objects=4, image_size=56)
    generate(tmp_path / "w", cfg, progress=False)
    recs = _load(tmp_path / "w", "train")
    assert {r["category"] for r in recs} <= {"colour", "describe"}
    assert all(o["colour"] != "white" for r in recs for o in r["objects"])
    for r in recs:
        _check_answer(r, grid=2)
    with Image.open(tmp_path / "w" / recs[0]["image"]) as im:
        assert im.size == (56, 56) and im.getpixel((0, 0)) == (255, 255, 255)


# --------------------------------------------------------------------------- writing

def test_refuses_to_overwrite_and_leaves_no_temp_dirs(tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = SynthConfig(n=20, n_eval=20)
    generate(out, cfg, progress=False)
    before = _hashes(out)
    with pytest.raises(ConfigError, match="overwrite=True"):
        generate(out, SynthConfig(n=20, n_eval=20, seed=1), progress=False)
    assert _hashes(out) == before
    generate(out, SynthConfig(n=20, n_eval=20, seed=1), progress=False, overwrite=True)
    after = _hashes(out)
    assert after != before
    (tmp_path / "empty").mkdir()
    generate(tmp_path / "empty", cfg, progress=False)  # an empty folder is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_write_split", boom)
    with pytest.raises(RuntimeError):
        generate(tmp_path / "never", cfg, progress=False)
    with pytest.raises(RuntimeError):
        generate(out, cfg, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]
    assert _hashes(out) == after  # a failed overwrite leaves the old data untouched


def test_throughput(tmp_path, capsys):
    stats = generate(tmp_path / "speed", SynthConfig(n=2000, seed=0), progress=False)
    with capsys.disabled():
        print(f"\nsynth throughput: {sum(stats.counts.values())} samples at 84 px in "
              f"{stats.seconds:.2f} s = {stats.samples_per_s:.0f} samples/s")
    assert stats.samples_per_s > 20
