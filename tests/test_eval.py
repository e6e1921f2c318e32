"""``vlsi eval`` on hand-made data whose right answers are known.

The tiny model is untrained, so its answers are gibberish, but deterministic: we decode
each question once with transformers' own ``generate`` (an independent implementation),
then write data where the correct option is that answer for some items and another
option for the rest. The evaluator must score exactly those items right.
"""

from __future__ import annotations

import base64
import csv
import json

import pytest
import torch

from vlsi.checkpoint import load_checkpoint
from vlsi.data.encode import Encoder
from vlsi.data.records import Record, Turn
from vlsi.eval import evaluate, normalize_answer, option_letter

from .conftest import png_bytes

MAX_NEW = 6
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (200, 30, 200), (30, 200, 200)]


def test_normalize_and_option_letter():
    assert normalize_answer("The star is red. Answer: Red.") == "red"
    assert normalize_answer("  top   left. ") == "top left"
    choices = {"A": "red", "B": "blue", "C": "green"}
    assert option_letter("B", choices) == "B"
    assert option_letter("(C) green", choices) == "C"
    assert option_letter("blue.", choices) == "B"
    assert option_letter("Z", choices) is None
    assert option_letter("purple", choices) is None


def _hf_answers(ckpt, questions, images):
    """Greedy answers from transformers' generate, one prompt at a time."""
    enc = Encoder(ckpt.adapter, ckpt.tokenizer, ckpt.image_processor, ckpt.model.config)
    out = []
    for q, img in zip(questions, images):
        rec = Record(id="x", turns=(Turn("user", q),), images=(img,), source="mem")
        b = enc.collate([enc.encode(rec, for_generation=True)], pad_left=True)
        types = (b["input_ids"] == ckpt.model.config.image_token_id).int()
        with torch.no_grad():
            ids = ckpt.model.generate(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                image_grid_thw=b["image_grid_thw"], mm_token_type_ids=types, max_new_tokens=MAX_NEW,
                do_sample=False, eos_token_id=enc.eos_ids, pad_token_id=enc.pad_id,
            )
        out.append(ckpt.tokenizer.decode(ids[0, b["input_ids"].shape[1]:].tolist(), skip_special_tokens=True))
    return out


@pytest.fixture(scope="module")
def known(tiny_ckpt):
    ckpt = load_checkpoint(tiny_ckpt)
    images = [png_bytes(color=c) for c in COLORS]
    questions = [f"<image>\nWhat colour is shape {i}?" for i in range(len(images))]
    return ckpt, images, questions


def test_tsv_option_accuracy_per_category(known, tmp_path, tiny_ckpt):
    ckpt, images, _ = known
    rows = []
    # MC prompts as the TSV loader renders them, so the reference sees the same text
    opts = ["zzz", "yyy", "xxx"]
    for i, img in enumerate(images):
        rows.append({"index": i, "image": base64.b64encode(img).decode(), "question": f"Which one {i}?",
                     "category": "even" if i % 2 == 0 else "odd"})
    tsv = tmp_path / "mc.tsv"

    def write(rows):
        with open(tsv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["index", "image", "question", "A", "B", "C", "D", "answer", "category"],
                               delimiter="\t")
            w.writeheader()
            for r in rows:
                w.writerow(r)

    # The options are part of the prompt, so the model's answer depends on them: put its own
    # answer in as option C and repeat until the answer no longer changes (a fixed point).
    from vlsi.data.loaders import MC_PROMPT_SUFFIX, load_records

    said = ["xxx"] * len(rows)
    for _ in range(6):
        for r, s in zip(rows, said):
            r.update({"A": opts[0], "B": opts[1], "C": s, "D": "www"})
            r["answer"] = "C" if r["category"] == "even" else "B"
        write(rows)
        recs, _ = load_records(tsv)
        # the loader renders the options and ends the prompt with the MC instruction
        assert [r.turns[0].text.rsplit("\n", 1)[-1] for r in recs] == [MC_PROMPT_SUFFIX] * len(recs)
        assert all(f"\nA. {opts[0]}\nB. {opts[1]}\n" in r.turns[0].text for r in recs)
        again = _hf_answers(ckpt, [r.turns[0].text for r in recs], images)
        if again == said:
            break
        said = again
    assert again == said, "no fixed point; change the option texts"
    assert all(normalize_answer(s) not in opts for s in said)
    rep = evaluate(tiny_ckpt, tsv, max_new_tokens=MAX_NEW, progress=False, out=tmp_path / "rep.json")
    assert rep["n"] == 6
    assert rep["per_category"] == {"even": 1.0, "odd": 0.0}
    assert rep["accuracy"] == pytest.approx(0.5)
    assert json.loads((tmp_path / "rep.json").read_text())["accuracy"] == pytest.approx(0.5)


def test_open_answers_exact_match_and_per_layer(known, tmp_path, tiny_ckpt):
    ckpt, images, questions = known
    said = _hf_answers(ckpt, questions, images)
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    items = []
    for i, (q, s, img) in enumerate(zip(questions, said, images)):
        (img_dir / f"{i}.png").write_bytes(img)
        answer = s if i < 4 else s + " not this"
        items.append({"id": i, "image": f"img/{i}.png", "category": "colour",
                      "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": answer}]})
    path = tmp_path / "open.json"
    path.write_text(json.dumps(items))
    rep = evaluate(tiny_ckpt, path, verbalize=True, max_new_tokens=MAX_NEW, progress=False, out=tmp_path / "o.json")
    assert rep["accuracy"] == pytest.approx(4 / 6)
    assert [p["correct"] for p in rep["predictions"]] == [True] * 4 + [False] * 2
    assert set(rep["per_layer_accuracy"]) == {"1", "3", "5", "6"}
    assert rep["per_layer_accuracy"]["6"] == rep["accuracy"]
    png = tmp_path / "o.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verbalize_without_heads_is_a_clear_error(tmp_path, synth_data):
    from vlsi.errors import CheckpointError
    from vlsi.tiny import save_tiny

    bare = save_tiny(tmp_path / "bare")
    with pytest.raises(CheckpointError, match="no verbalizers"):
        evaluate(bare, synth_data / "test.json", verbalize=True, limit=2, progress=False)
