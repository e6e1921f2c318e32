"""Encoding records: labels, length limit, image markers; errors name file and record."""

from __future__ import annotations

import pytest

from vlsi.archs import get_adapter
from vlsi.data.encode import IGNORE_INDEX, Encoder
from vlsi.data.records import Record, Turn
from vlsi.errors import DataError
from vlsi.tiny import build_tiny

from .conftest import png_bytes


@pytest.fixture(scope="module")
def enc(tokenizer):
    model, tok, proc, _ = build_tiny("qwen2_vl", "student", tokenizer=tokenizer)
    return Encoder(get_adapter(model), tok, proc, model.config, max_length=120)


def test_multi_turn_labels_cover_every_assistant_turn(enc):
    rec = Record(id="7", source="f.json", images=(png_bytes(),), turns=(
        Turn("user", "<image>\nWhat colour?"), Turn("assistant", "red."),
        Turn("user", "And the shape?"), Turn("assistant", "a star."),
    ))
    e = enc.encode(rec)
    kept = [t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX]
    assert enc.tok.decode(kept, skip_special_tokens=False) == "red.<|im_end|>a star.<|im_end|>"
    gen = enc.encode(rec, for_generation=True)
    text = enc.tok.decode(gen.input_ids, skip_special_tokens=False)
    assert text.endswith("And the shape?<|im_end|>\n<|im_start|>assistant\n")


def test_too_long_names_file_and_record(enc):
    rec = Record(id="3", source="data/train.json", images=(png_bytes(),),
                 turns=(Turn("user", "<image>\n" + "very long question " * 60), Turn("assistant", "no.")))
    with pytest.raises(DataError) as e:
        enc.encode(rec)
    assert "data/train.json" in str(e.value) and "record 3" in str(e.value) and "max_length=120" in str(e.value)


def test_corrupt_image_names_file_and_record(enc):
    rec = Record(id="9", source="d.json", images=(png_bytes()[:40],),
                 turns=(Turn("user", "<image>\nq"), Turn("assistant", "a.")))
    with pytest.raises(DataError, match=r"d\.json \[record 9\]"):
        enc.encode(rec)


def test_image_without_marker_is_an_error(enc):
    rec = Record(id="1", source="d.json", images=(png_bytes(),), turns=(Turn("user", "q"), Turn("assistant", "a.")))
    with pytest.raises(DataError, match="image markers"):
        enc.encode(rec)
