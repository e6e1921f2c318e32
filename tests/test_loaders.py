"""Tests for vlsi.data.loaders: every fixture file is built in tmp_path with PIL."""

from __future__ import annotations

import base64
import io
import json
import logging
import random
from pathlib import Path

import pytest
from PIL import Image

from vlsi.data.loaders import (
    MC_PROMPT_SUFFIX,
    ensure_rgb,
    load_records,
    read_llava_json,
    read_messages_jsonl,
    read_messages_parquet,
    read_vlmeval_tsv,
)
from vlsi.data.records import IMAGE_PLACEHOLDER, LoadReport, Record, Turn
from vlsi.errors import DataError

# --------------------------------------------------------------------------- helpers


def png_bytes(color=(200, 30, 30), size=(8, 8), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def noisy_png_bytes(size=(64, 64)) -> bytes:
    """A PNG whose pixel data is big enough that cutting the file in half hits IDAT."""
    rng = random.Random(0)
    im = Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def truncated_png_bytes() -> bytes:
    data = noisy_png_bytes()
    return data[: len(data) // 2]


def write_png(path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(**kw))
    return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_jsonl(path: Path, objs) -> Path:
    lines = [o if isinstance(o, str) else json.dumps(o) for o in objs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def llava(id_, image="img.png", q="<image>\nWhat colour is it?", a="Red.", **extra):
    rec = {"id": id_, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if image is not None:
        rec["image"] = image
    rec.update(extra)
    return rec


def assert_names(err: DataError, path: Path, record):
    assert err.path == str(path)
    assert err.record == record
    assert str(path) in str(err)
    assert f"[record {record}]" in str(err)


def expect_bad(read, path, record, match, **kw):
    """The bad record raises by default, naming file and record; returns the error."""
    with pytest.raises(DataError, match=match) as ei:
        read(path, **kw)
    assert_names(ei.value, path, record)
    return ei.value


def expect_skipped(read, path, record, n_good, match, **kw):
    """With skip_bad the bad record is counted in the report and the good ones are kept."""
    records, report = read(path, skip_bad=True, **kw)
    assert len(records) == n_good == report.kept
    assert len(report.skipped) == 1
    assert report.skipped[0].startswith(f"record {record}: ")
    assert match in report.skipped[0]
    return records, report


# --------------------------------------------------------------------------- LLaVA JSON


def test_llava_single_turn(tmp_path):
    img = write_png(tmp_path / "images" / "a.png")
    f = write_json(
        tmp_path / "data.json",
        [llava("q1", image="images/a.png", category="colour", source_scene=7)],
    )
    records, report = load_records(f)
    assert isinstance(report, LoadReport) and report.kept == 1 and report.skipped == []
    (r,) = records
    assert isinstance(r, Record)
    assert r.id == "q1"
    assert r.turns == (Turn("user", "<image>\nWhat colour is it?"), Turn("assistant", "Red."))
    assert r.images == (img.resolve(),)
    assert r.source == str(f)
    assert r.category == "colour"
    assert r.answer == "Red."
    assert r.meta == {"source_scene": 7}
    assert r.choices is None


def test_llava_multi_turn_system_and_two_images(tmp_path):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png", color=(0, 0, 255))
    rec = {
        "id": 5,
        "image": ["a.png", "b.png"],
        "conversations": [
            {"from": "system", "value": "You are terse."},
            {"from": "human", "value": "<image>\n<image>\nHow many images?"},
            {"from": "gpt", "value": "Two."},
            {"from": "human", "value": "Which one is blue?"},
            {"from": "gpt", "value": "The second."},
        ],
        "answer": "second",
    }
    records, _ = read_llava_json(write_json(tmp_path / "d.json", [rec]))
    (r,) = records
    assert r.id == "5"
    assert [t.role for t in r.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert r.images == ((tmp_path / "a.png").resolve(), (tmp_path / "b.png").resolve())
    assert r.answer == "second"


def test_llava_text_only_and_answer_defaults_to_last_assistant(tmp_path):
    rec = {
        "conversations": [
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye"},
        ]
    }
    records, _ = read_llava_json(write_json(tmp_path / "d.json", [rec]))
    assert records[0].id == "0"  # no id: the index
    assert records[0].images == ()
    assert records[0].answer == "Goodbye"


def test_llava_image_root(tmp_path):
    img = write_png(tmp_path / "elsewhere" / "x.png")
    (tmp_path / "data").mkdir()
    f = write_json(tmp_path / "data" / "d.json", [llava("a", image="x.png")])
    with pytest.raises(DataError, match="image_root"):
        read_llava_json(f)
    records, _ = read_llava_json(f, image_root=tmp_path / "elsewhere")
    assert records[0].images == (img.resolve(),)


def test_llava_image_root_must_exist(tmp_path):
    f = write_json(tmp_path / "d.json", [llava("a", image=None, q="Hi")])
    with pytest.raises(DataError, match="image_root"):
        read_llava_json(f, image_root=tmp_path / "nope")


def test_llava_missing_image_file(tmp_path):
    write_png(tmp_path / "img.png")
    f = write_json(tmp_path / "d.json", [llava("ok"), llava("bad", image="missing.png")])
    err = expect_bad(read_llava_json, f, 1, "not found")
    assert str((tmp_path / "missing.png").resolve()) in str(err)
    assert "image_root" in str(err)
    assert "'bad'" in str(err)  # the id is named too
    records, _ = expect_skipped(read_llava_json, f, 1, 1, "missing.png")
    assert records[0].id == "ok"


def test_llava_truncated_png_is_corrupt(tmp_path):
    write_png(tmp_path / "img.png")
    (tmp_path / "cut.png").write_bytes(truncated_png_bytes())
    f = write_json(tmp_path / "d.json", [llava("cut", image="cut.png"), llava("ok")])
    err = expect_bad(read_llava_json, f, 0, "corrupt")
    assert "cut.png" in str(err)
    expect_skipped(read_llava_json, f, 0, 1, "corrupt")
    # Decoding checks can be turned off; existence is still checked.
    records, _ = read_llava_json(f, check_images=False)
    assert len(records) == 2


def test_llava_not_an_image(tmp_path):
    (tmp_path / "img.png").write_bytes(b"this is not an image at all")
    f = write_json(tmp_path / "d.json", [llava("x")])
    expect_bad(read_llava_json, f, 0, "corrupt or not an image")


def test_llava_image_without_placeholder(tmp_path):
    write_png(tmp_path / "img.png")
    f = write_json(tmp_path / "d.json", [llava("ok"), llava("np", q="What colour is it?")])
    expect_bad(read_llava_json, f, 1, r"0 <image> placeholder\(s\) in the text but 1 image")
    expect_skipped(read_llava_json, f, 1, 1, "placeholder")


def test_llava_placeholder_without_image(tmp_path):
    write_png(tmp_path / "img.png")
    f = write_json(tmp_path / "d.json", [llava("noimg", image=None), llava("ok")])
    expect_bad(read_llava_json, f, 0, r"1 <image> placeholder\(s\) in the text but 0 image")
    expect_skipped(read_llava_json, f, 0, 1, "placeholder")


def test_llava_two_placeholders_one_image(tmp_path):
    write_png(tmp_path / "img.png")
    f = write_json(tmp_path / "d.json", [llava("x", q="<image> and <image>?")])
    expect_bad(read_llava_json, f, 0, "2 <image> placeholder")


def test_llava_placeholder_in_assistant_turn(tmp_path):
    write_png(tmp_path / "img.png")
    f = write_json(tmp_path / "d.json", [llava("x", q="Describe", a="<image> is red")])
    expect_bad(read_llava_json, f, 0, "only be placed in user turns")


def test_llava_empty_conversation(tmp_path):
    f = write_json(
        tmp_path / "d.json",
        [llava("ok", image=None, q="Hi"), {"id": "e", "conversations": []}],
    )
    expect_bad(read_llava_json, f, 1, "empty conversation")
    expect_skipped(read_llava_json, f, 1, 1, "empty conversation")


def test_llava_unknown_role(tmp_path):
    rec = llava("r", image=None, q="Hi")
    rec["conversations"][1]["from"] = "bot"
    f = write_json(tmp_path / "d.json", [rec, llava("ok", image=None, q="Hi")])
    expect_bad(read_llava_json, f, 0, "unknown role 'bot'")
    expect_skipped(read_llava_json, f, 0, 1, "unknown role")


@pytest.mark.parametrize(
    "conv, match",
    [
        ([("gpt", "a"), ("human", "b")], "turn 0 has role 'assistant' where 'user'"),
        ([("human", "a"), ("human", "b"), ("gpt", "c")], "turn 1 has role 'user' where 'assistant'"),
        ([("human", "a"), ("gpt", "b"), ("system", "c")], "system turn may only come first"),
        ([("human", "a"), ("gpt", "b"), ("human", "c")], "must end with an assistant turn"),
        ([("system", "s")], "only a system turn"),
    ],
)
def test_llava_wrong_turn_order(tmp_path, conv, match):
    rec = {"id": "w", "conversations": [{"from": r, "value": v} for r, v in conv]}
    f = write_json(tmp_path / "d.json", [llava("ok", image=None, q="Hi"), rec])
    expect_bad(read_llava_json, f, 1, match)
    expect_skipped(read_llava_json, f, 1, 1, match.split("'")[0])


def test_llava_empty_text(tmp_path):
    f = write_json(tmp_path / "d.json", [llava("e", image=None, q="Hi", a="   ")])
    expect_bad(read_llava_json, f, 0, r"turn 1 \(assistant\) has empty text")


@pytest.mark.parametrize(
    "rec, match",
    [
        ({"id": "m", "image": "img.png"}, "missing required key 'conversations'"),
        ({"id": "m", "conversations": [{"from": "human"}]}, "missing required key.*'value'"),
        ({"id": "m", "conversations": "hello"}, "'conversations' must be a list"),
        ("just a string", "expected a JSON object"),
    ],
)
def test_llava_missing_keys(tmp_path, rec, match):
    f = write_json(tmp_path / "d.json", [llava("ok", image=None, q="Hi"), rec])
    expect_bad(read_llava_json, f, 1, match)
    expect_skipped(read_llava_json, f, 1, 1, match.split("'")[0].split(".")[0])


def test_llava_choices_must_contain_answer(tmp_path):
    good = llava("g", image=None, q="Pick", a="A", choices={"A": "red", "B": "blue"})
    bad = llava("b", image=None, q="Pick", a="C", choices={"A": "red", "B": "blue"})
    also_bad = llava("c", image=None, q="Pick", a="B. blue", answer="C", choices={"A": "red"})
    f = write_json(tmp_path / "d.json", [good, bad])
    expect_bad(read_llava_json, write_json(tmp_path / "e.json", [also_bad]), 0, "not one of")
    expect_bad(read_llava_json, f, 1, "not one of the choices")
    records, _ = expect_skipped(read_llava_json, f, 1, 1, "choices")
    assert records[0].choices == {"A": "red", "B": "blue"} and records[0].answer == "A"


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "file not found"),
        ("", "empty"),
        ("   \n", "empty"),
        ("[{\"id\": 1,", "not valid JSON"),
        ("{\"id\": 1}", "expected a JSON list"),
        ("[]", "no records"),
    ],
)
@pytest.mark.parametrize("skip_bad", [False, True])
def test_llava_unreadable_file_always_errors(tmp_path, content, match, skip_bad):
    f = tmp_path / "d.json"
    if content is not None:
        f.write_text(content)
    with pytest.raises(DataError, match=match) as ei:
        read_llava_json(f, skip_bad=skip_bad)
    assert ei.value.path == str(f) and ei.value.record is None


def test_all_records_bad_is_an_error_even_with_skip_bad(tmp_path):
    f = write_json(tmp_path / "d.json", [{"id": 1, "conversations": []}] * 2)
    with pytest.raises(DataError, match="no usable records: all 2") as ei:
        read_llava_json(f, skip_bad=True)
    assert ei.value.record is None


def test_skip_bad_logs_a_warning_with_the_count(tmp_path, caplog):
    f = write_json(
        tmp_path / "d.json",
        [llava("ok", image=None, q="Hi"), {"conversations": []}, {"conversations": []}],
    )
    with caplog.at_level(logging.WARNING, logger="vlsi.data.loaders"):
        records, report = read_llava_json(f, skip_bad=True)
    assert len(records) == 1 and len(report.skipped) == 2
    assert any("skipped 2 bad record(s) of 3" in m for m in caplog.messages)
    assert "1 records kept, 2 skipped" in report.summary()


# --------------------------------------------------------------------------- messages JSONL


def msg(role, content):
    return {"role": role, "content": content}


def test_jsonl_string_content_with_path_images(tmp_path):
    img = write_png(tmp_path / "imgs" / "a.png")
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "id": "m1",
                "messages": [msg("user", "<image>\nWhat is it?"), msg("assistant", "A square.")],
                "images": ["imgs/a.png"],
                "category": "shape",
                "difficulty": 2,
            },
            {"messages": [msg("user", "Hi"), msg("assistant", "Hello")]},
        ],
    )
    records, report = load_records(f)
    assert report.kept == 2
    r0, r1 = records
    assert r0.id == "m1" and r0.images == (img.resolve(),)
    assert r0.category == "shape" and r0.answer == "A square." and r0.meta == {"difficulty": 2}
    assert r1.id == "1" and r1.images == ()


def test_jsonl_content_lists_and_image_forms(tmp_path):
    write_png(tmp_path / "a.png")
    raw = png_bytes(color=(0, 255, 0))
    rec = {
        "messages": [
            msg("system", [{"type": "text", "text": "Be brief."}]),
            msg("user", [{"type": "image"}, {"type": "image"},
                         {"type": "text", "text": "Compare "}, {"type": "text", "text": "them."}]),
            msg("assistant", [{"type": "text", "text": "Same shape."}]),
            msg("user", [{"type": "text", "text": "And this? "}, {"type": "image"}]),
            msg("assistant", "Green."),
        ],
        "images": [{"path": "a.png"}, "a.png", {"bytes": b64(raw), "path": None}],
    }
    records, _ = read_messages_jsonl(write_jsonl(tmp_path / "d.jsonl", [rec]))
    (r,) = records
    assert r.turns[1].text == "<image>\n<image>\nCompare them."
    assert r.turns[3].text == "And this? <image>"
    assert r.turns[0] == Turn("system", "Be brief.")
    assert r.images[0] == r.images[1] == (tmp_path / "a.png").resolve()
    assert r.images[2] == raw


def test_jsonl_llava_lines_detected_by_keys(tmp_path):
    write_png(tmp_path / "img.png")
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [llava("l1"), {"messages": [msg("user", "Hi"), msg("assistant", "Yo")]}],
    )
    records, _ = read_messages_jsonl(f)
    assert [r.id for r in records] == ["l1", "1"]
    assert records[0].turns[0].role == "user" and len(records[0].images) == 1


def test_jsonl_invalid_json_line_names_the_line(tmp_path):
    good = {"messages": [msg("user", "Hi"), msg("assistant", "Hello")]}
    f = write_jsonl(tmp_path / "d.jsonl", [good, "", "{not json", good])
    # record index counts non-blank lines; the file line is in the message.
    err = expect_bad(read_messages_jsonl, f, 1, "line 3.*invalid JSON")
    assert "line 3" in err.reason
    records, _ = expect_skipped(read_messages_jsonl, f, 1, 2, "line 3")
    assert [r.id for r in records] == ["0", "2"]


def test_jsonl_invalid_base64(tmp_path):
    good = {"messages": [msg("user", "Hi"), msg("assistant", "Hello")]}
    bad = {"messages": [msg("user", "<image>x"), msg("assistant", "y")], "images": [{"bytes": "@@notb64@@"}]}
    f = write_jsonl(tmp_path / "d.jsonl", [bad, good])
    expect_bad(read_messages_jsonl, f, 0, "invalid base64")
    expect_skipped(read_messages_jsonl, f, 0, 1, "invalid base64")


def test_jsonl_corrupt_base64_image(tmp_path):
    bad = {"messages": [msg("user", "<image>x"), msg("assistant", "y")],
           "images": [{"bytes": b64(truncated_png_bytes())}]}
    good = {"messages": [msg("user", "Hi"), msg("assistant", "Hello")]}
    f = write_jsonl(tmp_path / "d.jsonl", [good, bad])
    expect_bad(read_messages_jsonl, f, 1, "corrupt")
    expect_skipped(read_messages_jsonl, f, 1, 1, "corrupt")


def test_jsonl_image_without_placeholder(tmp_path):
    write_png(tmp_path / "a.png")
    bad = {"messages": [msg("user", [{"type": "text", "text": "What?"}]), msg("assistant", "x")],
           "images": ["a.png"]}
    f = write_jsonl(tmp_path / "d.jsonl", [bad])
    expect_bad(read_messages_jsonl, f, 0, "0 <image> placeholder")


def test_jsonl_placeholder_without_image(tmp_path):
    bad = {"messages": [msg("user", [{"type": "image"}, {"type": "text", "text": "?"}]),
                        msg("assistant", "x")]}
    f = write_jsonl(tmp_path / "d.jsonl", [bad])
    expect_bad(read_messages_jsonl, f, 0, "1 <image> placeholder.*0 image")


@pytest.mark.parametrize(
    "rec, match",
    [
        ({"messages": [msg("human", "Hi"), msg("assistant", "x")]}, "unknown role 'human'"),
        ({"messages": []}, "empty conversation"),
        ({"messages": [msg("assistant", "x"), msg("user", "Hi")]}, "where 'user' was expected"),
        ({"messages": [msg("user", "Hi"), msg("assistant", "")]}, "empty text"),
        ({"messages": [{"role": "user"}, msg("assistant", "x")]}, "missing required key.*'content'"),
        ({"messages": [msg("user", [{"type": "video"}]), msg("assistant", "x")]}, "unsupported part type"),
        ({"prompt": "Hi"}, "missing required key: 'messages'"),
    ],
)
def test_jsonl_bad_records(tmp_path, rec, match):
    good = {"messages": [msg("user", "Hi"), msg("assistant", "Hello")]}
    f = write_jsonl(tmp_path / "d.jsonl", [good, rec])
    expect_bad(read_messages_jsonl, f, 1, match)
    records, _ = read_messages_jsonl(f, skip_bad=True)
    assert len(records) == 1


def test_jsonl_missing_image_file(tmp_path):
    bad = {"messages": [msg("user", "<image>?"), msg("assistant", "x")], "images": ["gone.png"]}
    f = write_jsonl(tmp_path / "d.jsonl", [bad])
    err = expect_bad(read_messages_jsonl, f, 0, "not found")
    assert str((tmp_path / "gone.png").resolve()) in str(err) and "image_root" in str(err)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_jsonl_empty_file(tmp_path, content):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match="empty") as ei:
        read_messages_jsonl(f, skip_bad=True)
    assert ei.value.record is None


# --------------------------------------------------------------------------- Parquet


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def pq_row(text_parts, image_bytes, answer="Red."):
    content = [{"type": "image", "text": None}] * len(image_bytes) + [
        {"type": "text", "text": t} for t in text_parts
    ]
    return {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [{"bytes": b, "path": None} for b in image_bytes],
    }


def test_parquet_content_lists_with_image_bytes(tmp_path):
    img = png_bytes()
    f = write_parquet(tmp_path / "d.parquet", [pq_row(["What colour?"], [img]), pq_row(["Hi"], [])])
    records, report = load_records(f)
    assert report.kept == 2
    r0, r1 = records
    assert r0.turns == (Turn("user", "<image>\nWhat colour?"), Turn("assistant", "Red."))
    assert r0.images == (img,) and isinstance(r0.images[0], bytes)
    assert r0.id == "0" and r0.answer == "Red."
    assert r1.images == ()


def test_parquet_string_content_and_path_images(tmp_path):
    img = write_png(tmp_path / "p.png")
    rows = [{
        "id": "p1",
        "messages": [{"role": "user", "content": "<image>\nShape?"},
                     {"role": "assistant", "content": "Square."}],
        "images": ["p.png"],
    }]
    records, _ = read_messages_parquet(write_parquet(tmp_path / "d.parquet", rows))
    assert records[0].id == "p1" and records[0].images == (img.resolve(),)


def test_parquet_corrupt_image_bytes(tmp_path):
    f = write_parquet(
        tmp_path / "d.parquet",
        [pq_row(["Q"], [png_bytes()]), pq_row(["Q"], [truncated_png_bytes()])],
    )
    expect_bad(read_messages_parquet, f, 1, "corrupt")
    expect_skipped(read_messages_parquet, f, 1, 1, "corrupt")


def test_parquet_placeholder_mismatch(tmp_path):
    row = pq_row(["Q"], [png_bytes()])
    row["messages"][0]["content"] = [{"type": "text", "text": "Q"}]
    f = write_parquet(tmp_path / "d.parquet", [pq_row(["Q"], [png_bytes()]), row])
    expect_bad(read_messages_parquet, f, 1, "0 <image> placeholder")
    expect_skipped(read_messages_parquet, f, 1, 1, "placeholder")


def test_parquet_missing_messages_column(tmp_path):
    f = write_parquet(tmp_path / "d.parquet", [{"text": "hello"}])
    with pytest.raises(DataError, match="missing required column 'messages'") as ei:
        read_messages_parquet(f, skip_bad=True)
    assert ei.value.record is None


def test_parquet_no_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])
    f = tmp_path / "d.parquet"
    pq.write_table(schema.empty_table(), f)
    with pytest.raises(DataError, match="no rows"):
        read_messages_parquet(f, skip_bad=True)


def test_parquet_not_a_parquet_file(tmp_path):
    f = tmp_path / "d.parquet"
    f.write_bytes(b"definitely not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_messages_parquet(f)


# --------------------------------------------------------------------------- VLMEvalKit TSV

TSV_COLS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


def write_tsv(path: Path, rows: list[dict], cols=TSV_COLS) -> Path:
    lines = ["\t".join(cols)]
    for r in rows:
        lines.append("\t".join(str(r.get(c, "")) for c in cols))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tsv_row(index, image=None, answer="B", **kw):
    row = {
        "index": index, "question": "What colour is the square?", "A": "red", "B": "green",
        "C": "blue", "D": "yellow", "answer": answer, "category": "colour",
        "image": b64(png_bytes(color=(0, 255, 0))) if image is None else image,
    }
    row.update(kw)
    return row


def test_tsv_four_options_and_category(tmp_path):
    img = png_bytes(color=(0, 255, 0))
    f = write_tsv(
        tmp_path / "bench.tsv",
        [tsv_row(10, image=b64(img), **{"l2-category": "perception"}),
         tsv_row(11, hint="Look closely.", answer="A")],
    )
    records, report = load_records(f)
    assert report.kept == 2
    r0, r1 = records
    assert r0.id == "10"
    assert r0.turns[0] == Turn(
        "user",
        "<image>\nWhat colour is the square?\nA. red\nB. green\nC. blue\nD. yellow\n" + MC_PROMPT_SUFFIX,
    )
    assert r0.turns[1] == Turn("assistant", "B")
    assert r0.choices == {"A": "red", "B": "green", "C": "blue", "D": "yellow"}
    assert r0.answer == "B" and r0.category == "colour"
    assert r0.images == (img,)
    assert r0.meta == {"l2-category": "perception"}
    assert r1.turns[0].text.startswith("<image>\nLook closely.\nWhat colour is the square?\nA. red\n")
    assert r1.answer == "A"
    assert MC_PROMPT_SUFFIX == "Answer with the option's letter from the given choices directly."


def test_tsv_only_present_options_are_used(tmp_path):
    f = write_tsv(tmp_path / "b.tsv", [tsv_row(1, C="", D="nan")])
    (r,) = read_vlmeval_tsv(f)[0]
    assert r.choices == {"A": "red", "B": "green"}
    assert "C." not in r.turns[0].text


def test_tsv_answer_not_a_present_option(tmp_path):
    f = write_tsv(tmp_path / "b.tsv", [tsv_row(1), tsv_row(2, answer="D", D=""), tsv_row(3)])
    err = expect_bad(read_vlmeval_tsv, f, 1, "answer 'D' is not one of the option letters")
    assert "'2'" in str(err)  # the row's index is named
    records, _ = expect_skipped(read_vlmeval_tsv, f, 1, 2, "answer 'D'")
    assert [r.id for r in records] == ["1", "3"]


def test_tsv_invalid_base64(tmp_path):
    f = write_tsv(tmp_path / "b.tsv", [tsv_row(1, image="!!!not-base64!!!" * 8), tsv_row(2)])
    expect_bad(read_vlmeval_tsv, f, 0, "invalid base64")
    expect_skipped(read_vlmeval_tsv, f, 0, 1, "invalid base64")


def test_tsv_corrupt_image(tmp_path):
    f = write_tsv(tmp_path / "b.tsv", [tsv_row(1), tsv_row(2, image=b64(truncated_png_bytes()))])
    expect_bad(read_vlmeval_tsv, f, 1, "corrupt")
    expect_skipped(read_vlmeval_tsv, f, 1, 1, "corrupt")


def test_tsv_empty_question(tmp_path):
    f = write_tsv(tmp_path / "b.tsv", [tsv_row(1, question="")])
    expect_bad(read_vlmeval_tsv, f, 0, "empty 'question'")


def test_tsv_image_reference_to_another_row(tmp_path):
    img = png_bytes(color=(1, 2, 3))
    f = write_tsv(tmp_path / "b.tsv", [tsv_row(7, image=b64(img)), tsv_row(8, image="7")])
    records, _ = read_vlmeval_tsv(f)
    assert records[1].images == (img,)


def test_tsv_large_base64_field(tmp_path):
    big = noisy_png_bytes(size=(256, 256))  # ~260 KB base64, above csv's default 128 KiB limit
    f = write_tsv(tmp_path / "b.tsv", [tsv_row(1, image=b64(big))])
    (r,) = read_vlmeval_tsv(f)[0]
    assert r.images == (big,)


def test_tsv_missing_required_columns(tmp_path):
    cols = ["index", "question", "A", "B", "image"]
    f = write_tsv(tmp_path / "b.tsv", [tsv_row(1)], cols=cols)
    with pytest.raises(DataError, match="missing required column.*answer") as ei:
        read_vlmeval_tsv(f, skip_bad=True)
    assert ei.value.record is None


@pytest.mark.parametrize("content", ["", "\t".join(TSV_COLS) + "\n"])
def test_tsv_no_rows(tmp_path, content):
    f = tmp_path / "b.tsv"
    f.write_text(content)
    with pytest.raises(DataError, match="empty|no data rows"):
        read_vlmeval_tsv(f, skip_bad=True)


# --------------------------------------------------------------------------- dispatch


def test_unknown_extension_lists_supported(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("a,b\n")
    with pytest.raises(DataError, match=r"\.json.*\.jsonl.*\.parquet.*\.tsv") as ei:
        load_records(f)
    assert ei.value.path == str(f)


def test_extension_is_case_insensitive(tmp_path):
    f = write_json(tmp_path / "D.JSON", [llava("a", image=None, q="Hi")])
    assert load_records(f)[1].kept == 1


# --------------------------------------------------------------------------- ensure_rgb


def test_ensure_rgb_from_path_and_bytes(tmp_path):
    p = write_png(tmp_path / "a.png", color=(10, 20, 30))
    for ref in (p, str(p), p.read_bytes()):
        im = ensure_rgb(ref)
        assert im.mode == "RGB" and im.getpixel((0, 0)) == (10, 20, 30)


def test_ensure_rgb_composites_alpha_on_white():
    data = png_bytes(color=(255, 0, 0, 0), mode="RGBA")  # fully transparent red
    assert ensure_rgb(data).getpixel((0, 0)) == (255, 255, 255)
    half = png_bytes(color=(0, 0, 0, 128), mode="RGBA")
    assert ensure_rgb(half).getpixel((0, 0)) == (127, 127, 127)


def test_ensure_rgb_grey_palette_and_16bit():
    assert ensure_rgb(png_bytes(color=77, mode="L")).getpixel((0, 0)) == (77, 77, 77)
    pal = Image.new("RGB", (4, 4), (0, 128, 255)).convert("P", palette=Image.Palette.ADAPTIVE)
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert ensure_rgb(buf.getvalue()).getpixel((0, 0)) == (0, 128, 255)
    buf = io.BytesIO()
    Image.new("I;16", (4, 4), 65535).save(buf, format="PNG")
    assert ensure_rgb(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_ensure_rgb_errors(tmp_path):
    with pytest.raises(DataError, match="corrupt"):
        ensure_rgb(truncated_png_bytes())
    with pytest.raises(DataError, match="not found"):
        ensure_rgb(tmp_path / "missing.png")
    with pytest.raises(DataError, match="corrupt") as ei:
        ensure_rgb(b"garbage", source="d.tsv", record=4)
    assert ei.value.path == "d.tsv" and ei.value.record == 4


def test_placeholder_constant_is_what_loaders_emit():
    assert IMAGE_PLACEHOLDER == "<image>"
