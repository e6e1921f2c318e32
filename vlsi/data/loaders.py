"""Readers that turn data files into :class:`~vlsi.data.records.Record` objects, strictly.

Four formats are read, chosen by the file extension in :func:`load_records`:

``.json``     LLaVA: one JSON list of ``{"id"?, "image"?, "conversations": [{"from", "value"}]}``.
``.jsonl``    One JSON object per line, either TRL-style ``{"messages": [...], "images": [...]}``
              or a LLaVA record (told apart per line by its keys).
``.parquet``  TRL-style columns ``messages`` and ``images`` (as the HF ``datasets`` library
              stores them: images as ``struct{bytes, path}`` or as plain path strings).
``.tsv``      VLMEvalKit multiple choice: ``index, image (base64), question, answer, A..Z``.

Every record is validated before it is returned: the conversation is non-empty, roles are
known, turns go ``[system], user, assistant, user, assistant, ...`` and end with
``assistant``, no text is empty, the ``<image>`` placeholders (user turns only) match the
images one to one, every image file exists and (with ``check_images``) decodes. A bad record
raises :class:`~vlsi.errors.DataError` naming the file and the record's 0-based index (its
id, and the line for JSONL, are in the message). With ``skip_bad=True`` the bad record is
left out, listed in ``LoadReport.skipped`` as ``"record N: reason"``, a warning is logged, and
loading goes on. A file that is unusable as a whole (missing, empty, not JSON / Parquet at
the top level, wrong top-level type, no rows, required TSV columns missing) always raises,
and so does a file in which every record was bad.

Rendering rules worth knowing:

* Content lists (``[{"type": "image"}, {"type": "text", "text": ...}]``) are rendered by
  concatenating the parts in order; an image part becomes ``<image>``, followed by ``\\n``
  when another part comes after it. So ``[image, text "What is it?"]`` gives
  ``"<image>\\nWhat is it?"`` and ``[image, image, text]`` gives ``"<image>\\n<image>\\n..."``;
  text parts are joined with nothing in between.
* Image paths are made absolute: relative to ``image_root`` when given, else to the folder
  of the data file. File existence is always checked (it is cheap); decoding is checked
  only when ``check_images`` is true.
* Images given as bytes (Parquet, base64 in JSONL and TSV) are kept as ``bytes``.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from vlsi.data.records import IMAGE_PLACEHOLDER, ROLES, ImageRef, LoadReport, Record, Turn
from vlsi.errors import DataError
from vlsi.images import ensure_rgb

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "MC_PROMPT_SUFFIX",
    "load_records",
    "read_llava_json",
    "read_messages_jsonl",
    "read_messages_parquet",
    "read_vlmeval_tsv",
    "ensure_rgb",
]

log = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS: dict[str, str] = {
    ".json": "LLaVA JSON list",
    ".jsonl": "TRL messages or LLaVA records, one JSON object per line",
    ".parquet": "TRL messages + images columns",
    ".tsv": "VLMEvalKit multiple-choice TSV",
}

#: Last line of the user turn built from a VLMEvalKit multiple-choice row.
MC_PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."

_LLAVA_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    # Aliases some LLaVA-format exports use.
    "user": "user",
    "assistant": "assistant",
}
_TSV_REQUIRED = ("index", "image", "question", "answer")
_TSV_LETTERS = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))
#: VLMEvalKit stores a repeated image once; other rows hold that row's index (<= 64 chars).
_TSV_IMAGE_REF_MAX = 64


# --------------------------------------------------------------------------- public API


def load_records(
    path, *, skip_bad: bool = False, check_images: bool = True, image_root=None
) -> tuple[list[Record], LoadReport]:
    """Read ``path`` with the reader its extension names; see the module docstring.

    Returns the records and a :class:`LoadReport`; callers using ``skip_bad`` should print
    ``report.summary()``.
    """
    p = Path(path)
    reader = _READERS.get(p.suffix.lower())
    if reader is None:
        supported = ", ".join(f"{ext} ({what})" for ext, what in SUPPORTED_EXTENSIONS.items())
        raise DataError(
            p, None,
            f"unsupported file extension {p.suffix or '(none)'!r}; supported: {supported}. "
            "Convert the file or rename it to the extension that matches its content.",
        )
    return reader(p, skip_bad=skip_bad, check_images=check_images, image_root=image_root)


def read_llava_json(
    path, *, skip_bad: bool = False, check_images: bool = True, image_root=None
) -> tuple[list[Record], LoadReport]:
    """Read a LLaVA-style JSON list of records."""
    ld = _Loader(path, skip_bad, check_images, image_root)
    text = ld.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            ld.path, None,
            f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). A .json file must "
            "hold one JSON list of records; for one record per line name it .jsonl.",
        ) from None
    if not isinstance(data, list):
        raise DataError(
            ld.path, None,
            f"expected a JSON list of records at the top level, got {_json_type(data)}. "
            "LLaVA data is a list: [{\"id\": ..., \"image\": ..., \"conversations\": [...]}, ...]",
        )
    if not data:
        raise DataError(ld.path, None, "the JSON list is empty: there are no records")
    for i, obj in enumerate(data):
        ld.add(i, _llava_record, ld, _Ctx(ld, i), obj)
    return ld.finish(len(data))


def read_messages_jsonl(
    path, *, skip_bad: bool = False, check_images: bool = True, image_root=None
) -> tuple[list[Record], LoadReport]:
    """Read JSON lines: TRL ``{"messages", "images"}`` or LLaVA records, told apart per line.

    Blank lines are ignored; record indices count the non-blank lines from 0.
    """
    ld = _Loader(path, skip_bad, check_images, image_root)
    text = ld.read_text()
    n = 0
    # Split on "\n" only: str.splitlines() would also split on U+2028 etc., which JSON
    # allows raw inside strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        ld.add(n, _jsonl_record, ld, _Ctx(ld, n, line=lineno), line)
        n += 1
    return ld.finish(n)


def read_messages_parquet(
    path, *, skip_bad: bool = False, check_images: bool = True, image_root=None
) -> tuple[list[Record], LoadReport]:
    """Read a Parquet file with a ``messages`` column and optional ``images`` column."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is in the test environment
        raise ImportError(
            "reading .parquet files needs pyarrow: pip install pyarrow (or vlsi[train])"
        ) from e
    ld = _Loader(path, skip_bad, check_images, image_root)
    ld.check_file()
    try:
        pf = pq.ParquetFile(ld.path)
        names = pf.schema_arrow.names
        num_rows = pf.metadata.num_rows
    except Exception as e:  # ArrowInvalid, OSError, ...: not a Parquet file at all
        raise DataError(
            ld.path, None, f"not a readable Parquet file ({type(e).__name__}: {e})"
        ) from None
    if "messages" not in names:
        raise DataError(
            ld.path, None,
            f"missing required column 'messages' (columns found: {', '.join(names) or 'none'}); "
            "expected TRL-style data: messages = list of {role, content}, images = list of images",
        )
    if num_rows == 0:
        raise DataError(ld.path, None, "the Parquet file has no rows")
    i = 0
    try:
        for batch in pf.iter_batches(batch_size=64):
            for row in batch.to_pylist():
                ld.add(i, _parquet_record, ld, _Ctx(ld, i), row)
                i += 1
    except DataError:
        raise
    except Exception as e:  # a corrupt page part-way through
        raise DataError(
            ld.path, None, f"cannot read the Parquet data after row {i} ({type(e).__name__}: {e})"
        ) from None
    return ld.finish(i)


def read_vlmeval_tsv(
    path, *, skip_bad: bool = False, check_images: bool = True, image_root=None
) -> tuple[list[Record], LoadReport]:
    """Read a VLMEvalKit multiple-choice TSV (``image`` = base64 image bytes).

    Each row becomes one user turn::

        <image>
        {hint}            (only when the row has a hint)
        {question}
        A. ...
        B. ...
        Answer with the option's letter from the given choices directly.

    and one assistant turn holding the answer letter. Options are the ``A``..``Z`` columns
    that are non-empty in that row. As in VLMEvalKit, an ``image`` field of at most 64
    characters that equals another row's ``index`` reuses that row's image. ``image_root``
    is accepted for a uniform signature and unused.
    """
    ld = _Loader(path, skip_bad, check_images, image_root)
    ld.check_file()
    _raise_csv_field_limit()
    try:
        with open(ld.path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f, delimiter="\t"))
    except UnicodeDecodeError as e:
        raise DataError(ld.path, None, f"not UTF-8 text ({e}); save the TSV as UTF-8") from None
    except csv.Error as e:
        raise DataError(ld.path, None, f"not a readable TSV file ({e})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise DataError(ld.path, None, "the file is empty")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in _TSV_REQUIRED if c not in header]
    if missing:
        raise DataError(
            ld.path, None,
            f"missing required column(s) {', '.join(missing)} (columns found: "
            f"{', '.join(header)}); a VLMEvalKit MC TSV needs {', '.join(_TSV_REQUIRED)} and "
            "option columns A, B, ... separated by tabs",
        )
    data = rows[1:]
    if not data:
        raise DataError(ld.path, None, "the TSV has a header but no data rows")
    letters = [c for c in _TSV_LETTERS if c in header]
    col = {name: k for k, name in enumerate(header)}
    images_by_index = {}
    for r in data:
        if len(r) == len(header):
            images_by_index.setdefault(r[col["index"]].strip(), r[col["image"]])
    for i, r in enumerate(data):
        ld.add(i, _tsv_record, ld, _Ctx(ld, i), header, col, letters, r, images_by_index)
    return ld.finish(len(data))


# --------------------------------------------------------------------------- machinery


class _Loader:
    """Per-file state: options, the kept records and the report."""

    def __init__(self, path, skip_bad: bool, check_images: bool, image_root):
        self.path = Path(path)
        self.skip_bad = skip_bad
        self.check_images = check_images
        self.report = LoadReport(str(self.path))
        self.records: list[Record] = []
        if image_root is not None:
            root = Path(image_root).expanduser()
            if not root.is_dir():
                raise DataError(
                    self.path, None,
                    f"image_root {os.path.abspath(root)} is not an existing folder; pass the "
                    "folder the image paths in the file are relative to",
                )
            self.image_base = root
        else:
            self.image_base = self.path.parent

    def check_file(self) -> None:
        if not self.path.exists():
            raise DataError(self.path, None, f"file not found: {os.path.abspath(self.path)}")
        if not self.path.is_file():
            raise DataError(self.path, None, "is not a regular file")
        if self.path.stat().st_size == 0:
            raise DataError(self.path, None, "the file is empty")

    def read_text(self) -> str:
        self.check_file()
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(self.path, None, f"not UTF-8 text ({e}); save it as UTF-8") from None
        except OSError as e:
            raise DataError(self.path, None, f"cannot read the file ({e})") from None
        if not text.strip():
            raise DataError(self.path, None, "the file is empty (only whitespace)")
        return text

    def add(self, index: int, build: Callable[..., Record], *args) -> None:
        try:
            rec = build(*args)
        except DataError as e:
            if e.record is None or not self.skip_bad:
                raise
            self.report.skipped.append(f"record {e.record}: {e.reason}")
            return
        self.records.append(rec)

    def finish(self, total: int) -> tuple[list[Record], LoadReport]:
        skipped = self.report.skipped
        if not self.records:
            if not total:
                raise DataError(self.path, None, "the file holds no records")
            raise DataError(
                self.path, None,
                f"no usable records: all {total} were bad (first: {skipped[0]}); "
                "fix the file rather than skipping everything",
            )
        self.report.kept = len(self.records)
        if skipped:
            log.warning(
                "%s: skipped %d bad record(s) of %d (first: %s)",
                self.path, len(skipped), total, skipped[0],
            )
        return self.records, self.report

    # images ---------------------------------------------------------------------------

    def path_image(self, ctx: "_Ctx", k: int, raw) -> Path:
        if not isinstance(raw, str) or not raw.strip():
            ctx.fail(f"image {k}: expected a non-empty path string, got {raw!r}")
        p = Path(os.path.abspath(self.image_base / Path(raw).expanduser()))
        if not p.is_file():
            what = "is not a file" if p.exists() else "not found"
            ctx.fail(
                f"image {k}: file {what}: {p} (path {raw!r} taken relative to "
                f"{os.path.abspath(self.image_base)}); if the images live elsewhere, pass "
                "image_root=<the folder the image paths are relative to>"
            )
        return p

    def bytes_image(self, ctx: "_Ctx", k: int, raw) -> bytes:
        """``raw`` is raw image bytes or a base64 string (optionally a ``data:`` URI)."""
        if isinstance(raw, (bytearray, memoryview)):
            raw = bytes(raw)
        if isinstance(raw, str):
            raw = _b64decode(ctx, k, raw)
        if not isinstance(raw, bytes):
            ctx.fail(f"image {k}: expected image bytes or a base64 string, got {type(raw).__name__}")
        if not raw:
            ctx.fail(f"image {k}: the image bytes are empty")
        return raw

    def check_image(self, ctx: "_Ctx", k: int, ref: ImageRef) -> None:
        if not self.check_images:
            return
        data = ref if isinstance(ref, bytes) else None
        try:
            if data is None:
                data = Path(ref).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.verify()  # checksums (PNG CRCs) and structure
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # full decode: catches truncated data
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
            where = f"file {ref}" if isinstance(ref, Path) else f"{len(data or b'')} bytes"
            ctx.fail(
                f"image {k} ({where}) is corrupt or not an image: {type(e).__name__}: {e}. "
                "Re-export or drop it (or pass check_images=False to skip decoding checks)"
            )

    # records --------------------------------------------------------------------------

    def make_record(
        self,
        ctx: "_Ctx",
        turns: list[Turn],
        images: list[ImageRef],
        *,
        category=None,
        answer=None,
        choices=None,
        meta: dict | None = None,
    ) -> Record:
        _check_turns(ctx, turns)
        _check_placeholders(ctx, turns, len(images))
        for k, ref in enumerate(images):
            self.check_image(ctx, k, ref)
        if category is not None and not isinstance(category, str):
            if isinstance(category, (int, float)) and not isinstance(category, bool):
                category = str(category)
            else:
                ctx.fail(f"'category' must be a string, got {type(category).__name__}")
        if choices is not None:
            if (
                not isinstance(choices, dict)
                or not choices
                or not all(isinstance(a, str) and isinstance(b, str) for a, b in choices.items())
            ):
                ctx.fail("'choices' must be a non-empty object mapping option letters to texts")
        if answer is not None:
            if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                answer = str(answer)
            if not isinstance(answer, str) or not answer.strip():
                ctx.fail(f"'answer' must be a non-empty string, got {answer!r}")
        else:
            answer = next(t.text for t in reversed(turns) if t.role == "assistant")
        if choices is not None and answer not in choices:
            ctx.fail(
                f"the answer {answer!r} is not one of the choices {sorted(choices)}; with "
                "'choices', give 'answer' as the option key (or end with it as the last turn)"
            )
        return Record(
            id=ctx.rid if ctx.rid is not None else str(ctx.index),
            turns=tuple(turns),
            images=tuple(images),
            source=str(self.path),
            category=category,
            choices=dict(choices) if choices is not None else None,
            answer=answer,
            meta=meta or {},
        )


class _Ctx:
    """Where a record is, so every message can name it."""

    def __init__(self, ld: _Loader, index: int, line: int | None = None):
        self.ld = ld
        self.index = index
        self.line = line
        self.rid: str | None = None

    def fail(self, message: str):
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.rid is not None:
            where.append(f"id {self.rid!r}")
        prefix = f"({', '.join(where)}) " if where else ""
        raise DataError(self.ld.path, self.index, prefix + message)

    def set_id(self, raw) -> None:
        if raw is None:
            return
        if isinstance(raw, bool) or not isinstance(raw, (str, int)):
            self.fail(f"'id' must be a string or an integer, got {type(raw).__name__}")
        self.rid = str(raw)


def _check_turns(ctx: _Ctx, turns: list[Turn]) -> None:
    if not turns:
        ctx.fail("empty conversation: a record needs a user turn followed by an assistant turn")
    start = 1 if turns[0].role == "system" else 0
    if start == len(turns):
        ctx.fail("the conversation has only a system turn; add a user turn and an assistant turn")
    for k, t in enumerate(turns):
        if k >= start:
            expected = "user" if (k - start) % 2 == 0 else "assistant"
            if t.role != expected:
                extra = " (a system turn may only come first)" if t.role == "system" else ""
                ctx.fail(
                    f"turn {k} has role {t.role!r} where {expected!r} was expected{extra}; turns "
                    "must go [system], user, assistant, user, assistant, ..."
                )
        if not t.text.strip():
            ctx.fail(f"turn {k} ({t.role}) has empty text")
        if t.role != "user" and IMAGE_PLACEHOLDER in t.text:
            ctx.fail(
                f"turn {k} ({t.role}) contains {IMAGE_PLACEHOLDER!r}; images may only be placed "
                "in user turns"
            )
    if turns[-1].role != "assistant":
        ctx.fail(
            "the conversation ends with a user turn; it must end with an assistant turn "
            "(the answer to learn)"
        )


# --------------------------------------------------------------------------- LLaVA


def _llava_record(ld: _Loader, ctx: _Ctx, obj) -> Record:
    if not isinstance(obj, dict):
        ctx.fail(f"expected a JSON object for the record, got {_json_type(obj)}")
    ctx.set_id(obj.get("id"))
    if "conversations" not in obj:
        ctx.fail(
            "missing required key 'conversations' (a list of {\"from\": \"human\"|\"gpt\"|"
            "\"system\", \"value\": text})"
        )
    conv = obj["conversations"]
    if not isinstance(conv, list):
        ctx.fail(f"'conversations' must be a list, got {_json_type(conv)}")
    turns = []
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict):
            ctx.fail(f"turn {k}: expected an object with 'from' and 'value', got {_json_type(turn)}")
        missing = [key for key in ("from", "value") if key not in turn]
        if missing:
            ctx.fail(f"turn {k}: missing required key(s) {', '.join(repr(m) for m in missing)}")
        role = _LLAVA_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            ctx.fail(
                f"turn {k}: unknown role {turn['from']!r} in 'from'; use 'human', 'gpt' or 'system'"
            )
        if not isinstance(turn["value"], str):
            ctx.fail(f"turn {k}: 'value' must be a string, got {_json_type(turn['value'])}")
        turns.append(Turn(role, turn["value"]))
    raw = obj.get("image")
    if raw is None:
        raw = []
    elif isinstance(raw, str):
        raw = [raw]
    elif not isinstance(raw, list):
        ctx.fail(f"'image' must be a path or a list of paths, got {_json_type(raw)}")
    # Structure first, before touching the file system.
    _check_turns(ctx, turns)
    _check_placeholders(ctx, turns, len(raw))
    images = [ld.path_image(ctx, k, r) for k, r in enumerate(raw)]
    meta = {k: v for k, v in obj.items()
            if k not in ("id", "image", "conversations", "category", "answer", "choices")}
    return ld.make_record(
        ctx, turns, images,
        category=obj.get("category"), answer=obj.get("answer"), choices=obj.get("choices"),
        meta=meta,
    )


def _check_placeholders(ctx: _Ctx, turns: list[Turn], n_images: int) -> None:
    n_ph = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
    if n_ph == n_images:
        return
    if not n_ph:
        hint = f"put {IMAGE_PLACEHOLDER!r} in the user turn where each image goes"
    elif not n_images:
        hint = f"give the image(s), or remove {IMAGE_PLACEHOLDER!r} from the text"
    else:
        hint = f"make the number of {IMAGE_PLACEHOLDER!r} placeholders equal the images"
    ctx.fail(
        f"{n_ph} {IMAGE_PLACEHOLDER} placeholder(s) in the text but {n_images} image(s) "
        f"given; {hint}"
    )


# --------------------------------------------------------------------------- TRL messages


def _jsonl_record(ld: _Loader, ctx: _Ctx, line: str) -> Record:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        ctx.fail(f"invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object")
    if not isinstance(obj, dict):
        ctx.fail(f"expected a JSON object on the line, got {_json_type(obj)}")
    if "messages" in obj:
        return _messages_record(ld, ctx, obj)
    if "conversations" in obj:
        return _llava_record(ld, ctx, obj)
    ctx.fail(
        "missing required key: 'messages' (TRL format) or 'conversations' (LLaVA format); "
        f"keys found: {', '.join(sorted(obj)) or 'none'}"
    )


def _parquet_record(ld: _Loader, ctx: _Ctx, row: dict) -> Record:
    return _messages_record(ld, ctx, row)


def _messages_record(ld: _Loader, ctx: _Ctx, obj: dict) -> Record:
    ctx.set_id(obj.get("id"))
    messages = obj.get("messages")
    if messages is None:
        ctx.fail("'messages' is missing or null; expected a list of {role, content}")
    if not isinstance(messages, list):
        ctx.fail(f"'messages' must be a list of {{role, content}}, got {_json_type(messages)}")
    turns = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            ctx.fail(f"message {k}: expected an object with 'role' and 'content', got {_json_type(m)}")
        missing = [key for key in ("role", "content") if m.get(key) is None]
        if missing:
            ctx.fail(f"message {k}: missing required key(s) {', '.join(repr(x) for x in missing)}")
        if m["role"] not in ROLES:
            ctx.fail(f"message {k}: unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        turns.append(Turn(m["role"], _render_content(ctx, k, m["content"])))
    images_raw = obj.get("images")
    if images_raw is None:
        images_raw = obj.get("image")  # single-image datasets name the column "image"
    if images_raw is None:
        images_raw = []
    elif not isinstance(images_raw, list):
        images_raw = [images_raw]
    _check_turns(ctx, turns)
    _check_placeholders(ctx, turns, len(images_raw))
    images = [_message_image(ld, ctx, k, raw) for k, raw in enumerate(images_raw)]
    meta = {k: v for k, v in obj.items()
            if k not in ("id", "messages", "images", "image", "category", "answer", "choices")}
    return ld.make_record(
        ctx, turns, images,
        category=obj.get("category"), answer=obj.get("answer"), choices=obj.get("choices"),
        meta=meta,
    )


def _render_content(ctx: _Ctx, k: int, content) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        ctx.fail(
            f"message {k}: 'content' must be a string or a list of parts, got {_json_type(content)}"
        )
    pieces: list[str] = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or "type" not in part:
            ctx.fail(f"message {k}, part {j}: expected an object with a 'type', got {part!r:.80}")
        kind = part["type"]
        if kind == "image":
            pieces.append(IMAGE_PLACEHOLDER + ("\n" if j + 1 < len(content) else ""))
        elif kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                ctx.fail(f"message {k}, part {j}: a text part needs a string 'text', got {text!r}")
            pieces.append(text)
        else:
            ctx.fail(f"message {k}, part {j}: unsupported part type {kind!r}; use 'image' or 'text'")
    return "".join(pieces)


def _message_image(ld: _Loader, ctx: _Ctx, k: int, raw) -> ImageRef:
    if isinstance(raw, str):
        return ld.path_image(ctx, k, raw)
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return ld.bytes_image(ctx, k, raw)
    if isinstance(raw, dict):
        if raw.get("bytes") is not None:
            return ld.bytes_image(ctx, k, raw["bytes"])
        if raw.get("path") is not None:
            return ld.path_image(ctx, k, raw["path"])
        ctx.fail(f"image {k}: neither 'bytes' nor 'path' is set")
    ctx.fail(
        f"image {k}: expected a path, {{\"path\": ...}} or {{\"bytes\": base64}}, got "
        f"{type(raw).__name__}"
    )


# --------------------------------------------------------------------------- VLMEvalKit TSV


def _tsv_record(ld, ctx, header, col, letters, row, images_by_index) -> Record:
    if len(row) != len(header):
        ctx.fail(
            f"the row has {len(row)} fields but the header has {len(header)} (a stray tab, or "
            "an unquoted quote/newline in a field?)"
        )

    def field(name: str) -> str:
        return row[col[name]].strip() if name in col else ""

    index = field("index")
    if not index:
        ctx.fail("empty 'index'")
    ctx.rid = index
    question = field("question")
    if not question:
        ctx.fail("empty 'question'")
    choices = {L: field(L) for L in letters if not _tsv_empty(field(L))}
    answer = field("answer")
    if answer not in choices:
        present = ", ".join(choices) or "none"
        ctx.fail(
            f"answer {answer!r} is not one of the option letters present in this row ({present}); "
            "fill in that option column or fix the answer"
        )
    raw = field("image")
    if not raw:
        ctx.fail("empty 'image' (expected base64 image bytes)")
    if len(raw) <= _TSV_IMAGE_REF_MAX and raw in images_by_index and raw != index:
        raw = images_by_index[raw].strip()
    if raw.startswith("["):  # several images, written as a Python/JSON list of base64 strings
        try:
            parts = ast.literal_eval(raw)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            ctx.fail("'image' looks like a list but cannot be parsed; expected ['<b64>', ...]")
        if not isinstance(parts, list) or not parts:
            ctx.fail("'image' must be base64 image bytes or a non-empty list of them")
    else:
        parts = [raw]
    images = [ld.bytes_image(ctx, k, p) for k, p in enumerate(parts)]
    hint = field("hint")
    prompt = (IMAGE_PLACEHOLDER + "\n") * len(images)
    if not _tsv_empty(hint):
        prompt += hint + "\n"
    prompt += question + "\n"
    prompt += "".join(f"{L}. {t}\n" for L, t in choices.items())
    prompt += MC_PROMPT_SUFFIX
    category = field("category")
    known = set(_TSV_REQUIRED) | set(letters) | {"category", "hint"}
    meta = {h: row[k] for h, k in col.items() if h not in known and not _tsv_empty(row[k].strip())}
    return ld.make_record(
        ctx,
        [Turn("user", prompt), Turn("assistant", answer)],
        images,
        category=None if _tsv_empty(category) else category,
        answer=answer,
        choices=choices,
        meta=meta,
    )


def _tsv_empty(value: str) -> bool:
    # pandas writes missing values as "" by default; "nan" appears when NaN went through str().
    return value == "" or value.lower() == "nan"


def _raise_csv_field_limit() -> None:
    """Base64 images exceed csv's default 128 KiB field limit; raise it as far as allowed."""
    limit = sys.maxsize
    while True:
        try:
            if csv.field_size_limit() < limit:
                csv.field_size_limit(limit)
            return
        except OverflowError:  # C long is 32 bits on Windows
            limit //= 2


# --------------------------------------------------------------------------- images


def _b64decode(ctx: _Ctx, k: int, s: str) -> bytes:
    s = s.strip()
    if s.startswith("data:"):
        head, sep, s = s.partition(",")
        if not sep or not head.endswith(";base64"):
            ctx.fail(f"image {k}: a data: URI must be base64 encoded (data:<type>;base64,...)")
    s = "".join(s.split())
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        ctx.fail(f"image {k}: invalid base64 ({e}); expected the base64 of an image file")


def _json_type(v: Any) -> str:
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if v is None:
        return "null"
    return type(v).__name__


_READERS: dict[str, Callable[..., tuple[list[Record], LoadReport]]] = {
    ".json": read_llava_json,
    ".jsonl": read_messages_jsonl,
    ".parquet": read_messages_parquet,
    ".tsv": read_vlmeval_tsv,
}
