"""Property-based fuzzing of ``POST /v1/chat/completions`` (hypothesis), on the real ONNX runtime
of the tiny test model, in-process through Starlette's TestClient.

Generated bodies: wrong types for every field, huge and empty values, deeply nested parts, odd
unicode (lone surrogates, NUL, RTL marks, emoji, special-token text), bad data URIs (not base64,
truncated, non-images, decompression bombs, 1x1 and valid images of many modes and formats),
bodies that are not JSON or not an object, and valid conversations (system prompts, several
turns, images in earlier user turns). Properties:

- never a 5xx (a server exception propagates to the test: TestClient re-raises it); every
  non-200 is a 4xx with OpenAI's ``{"error": {"message", "type", "param", "code"}}``;
- a 200 is a ``chat.completion`` (or, with ``stream``, a well-formed SSE stream of chunks ending
  in ``data: [DONE]``, with no error event in it);
- ``/health`` answers 200 after every example, with nothing left queued;
- the conversation rules: an assistant turn with images, a conversation ending with an assistant
  turn, an unknown role, too many images across all turns and a conversation longer than the
  model's context are 4xx naming the field (``param`` starts with ``messages``); a bad option is a
  4xx naming that option;
- memory comes back to its baseline: RSS and traced (tracemalloc) memory do not grow with the
  number of requests (a decoded image or a generation kept per request would show).

Every run is derandomized (same examples each time, no example database) and does not shrink a
failure (each shrinking step is a request; minutes of them): a failure is reported as generated.
``VLSI_FUZZ_SHRINK=1`` minimises failures; ``VLSI_FUZZ_SCALE`` multiplies the example counts (e.g. 10
for a long local run); ``VLSI_FUZZ_ARTIFACT`` points at an already exported tiny ONNX artifact
instead of exporting one (the ``onnx_artifact`` fixture).
"""

from __future__ import annotations

import base64
import gc
import io
import json
import math
import os
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("starlette", reason="the app extra is not installed")
pytest.importorskip("httpx", reason="the dev extra is not installed")
hypothesis = pytest.importorskip("hypothesis", reason="the dev extra is not installed")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.control import currently_in_test_context  # noqa: E402

# the raw bodies hold 200 kB constants; hypothesis warns when it prints one in a report
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning")

MODEL = "tiny"
CAP = 4  # Limits.max_tokens: every generation is at most 4 tokens
MAX_IMAGES = 3
MAX_BODY = 2 * 1024 * 1024
URL = "/v1/chat/completions"

SCALE = float(os.environ.get("VLSI_FUZZ_SCALE", "1"))


def _n(count: int) -> int:
    return max(1, int(count * SCALE))


PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
if os.environ.get("VLSI_FUZZ_SHRINK"):
    PHASES.append(Phase.shrink)

FUZZ = settings(
    phases=PHASES,  # shrinking a failure can take minutes of requests: opt in with VLSI_FUZZ_SHRINK=1
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is reproducible
    database=None,  # no .hypothesis/ folder in the repository
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                           HealthCheck.filter_too_much],
)


# --------------------------------------------------------------------------- images


def _encode_image(im, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w, channels) if channels > 1 else (h, w)
    return (rng.random(shape) * 255).astype("uint8")


def _gradient_png(w: int, h: int) -> bytes:
    """A large image that compresses well (a small body, a large decoded image)."""
    from PIL import Image

    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    rgb = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1).astype("uint8")
    return _encode_image(Image.fromarray(rgb), "PNG")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(width: int, height: int, rows: int = 4) -> bytes:
    """A PNG whose header claims width x height pixels, with a few rows of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\0" * (1 + 3 * min(width, 100_000)) * rows)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def _gif_bomb(width: int = 65535, height: int = 65535) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b"\x2c" + b"\x00" * 8 + b"\x00\x3b"


def _data_uri(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def _valid_images() -> list[bytes]:
    """Small images the server must accept: many modes and formats, and the extreme sizes."""
    from PIL import Image

    out = [
        _encode_image(Image.fromarray(_noise(1, 1, 1)), "PNG"),  # 1x1 (first: the one shrinking picks)
        _encode_image(Image.fromarray(_noise(84, 84, 0)), "PNG"),
        _encode_image(Image.fromarray(_noise(56, 112, 2, 4), "RGBA"), "PNG"),
        _encode_image(Image.fromarray(_noise(40, 30, 3, 1), "L"), "PNG"),
        _encode_image(Image.fromarray(_noise(64, 64, 4)).convert("P"), "PNG"),
        _encode_image(Image.fromarray(_noise(64, 64, 4)).convert("P"), "PNG", transparency=0),
        _encode_image(Image.fromarray(_noise(33, 47, 5, 1), "L").convert("1"), "PNG"),
        _encode_image(Image.fromarray((_noise(30, 30, 6, 1).astype(np.uint16) * 257)), "PNG"),  # 16-bit grey
        _encode_image(Image.fromarray(_noise(84, 84, 7)), "JPEG", quality=70),
        _encode_image(Image.fromarray(_noise(84, 84, 8)).convert("CMYK"), "JPEG"),
        _encode_image(Image.fromarray(_noise(50, 20, 9)), "GIF"),
        _encode_image(Image.fromarray(_noise(50, 50, 10)), "WEBP"),
        _encode_image(Image.fromarray(_noise(20, 20, 11)), "BMP"),
        _encode_image(Image.fromarray(_noise(20, 20, 12)), "TIFF"),
        _encode_image(Image.fromarray(_noise(400, 3, 13)), "PNG"),  # aspect ratio 133
        _gradient_png(320, 240),  # a processor that keeps large images: 100 image tokens
    ]
    return out


def _bad_images() -> list[bytes]:
    """Images the server must refuse with a 4xx (never decode a bomb, never crash)."""
    good = _encode_image(__import__("PIL.Image", fromlist=["Image"]).fromarray(_noise(84, 84, 20)), "PNG")
    big = _gradient_png(1024, 1024)
    return [
        b"",
        b"not an image at all",
        b"\x89PNG\r\n\x1a\n",  # the signature alone
        good[:60],  # header, no data
        good[: len(good) // 2],  # truncated
        big[: len(big) - 200],  # a large image, its data cut short
        _bomb_png(20000, 20000),  # 400 M pixels: a decompression bomb
        _bomb_png(4001, 4000),  # just over Limits.max_image_pixels
        _bomb_png(0, 10),
        _bomb_png(100_000, 1),  # an aspect ratio Qwen2-VL refuses
        _gif_bomb(),
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
        b"PK\x03\x04" + b"\x00" * 26,
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        bytes(range(256)) * 4,
    ]


VALID_IMAGES = _valid_images()
BAD_IMAGES = _bad_images()
VALID_URIS = [_data_uri(b) for b in VALID_IMAGES]
BAD_URIS = [_data_uri(b) for b in BAD_IMAGES] + [
    "data:image/png;base64,@@not base64@@",
    "data:image/png;base64,iVBORw0KGgo=\n",  # a newline in strict base64
    "data:image/png;base64,iVBORw0KGgo",  # bad padding
    "data:image/png;base64,ｉＶＢＯＲ",  # non-ASCII
    "data:image/png;base64,",
    "data:image/png;base64",
    "data:image/png,rawbytes",
    "data:,",
    "DATA:image/png;base64,iVBORw0KGgo=",
    "https://example.com/cat.png",
    "file:///etc/passwd",
    "",
    "/tmp/image.png",
]


@st.composite
def _generated_png_uri(draw):
    from PIL import Image

    w, h = draw(st.integers(1, 96)), draw(st.integers(1, 96))
    mode = draw(st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "I;16"]))
    seed = draw(st.integers(0, 3))
    if mode in ("RGB", "P"):
        im = Image.fromarray(_noise(w, h, seed)).convert(mode)
    elif mode == "RGBA":
        im = Image.fromarray(_noise(w, h, seed, 4), "RGBA")
    elif mode == "LA":
        im = Image.fromarray(_noise(w, h, seed, 2), "LA")
    elif mode == "L":
        im = Image.fromarray(_noise(w, h, seed, 1), "L")
    else:
        im = Image.fromarray(_noise(w, h, seed, 1).astype(np.uint16) * 257)
    return _data_uri(_encode_image(im, "PNG"))


@st.composite
def _truncated_uri(draw):
    uri = draw(st.sampled_from(VALID_URIS[:14]))
    cut = draw(st.integers(len("data:image/png;base64,"), len(uri) - 1))
    return uri[:cut]


valid_image_uris = st.one_of(st.sampled_from(VALID_URIS), _generated_png_uri())
any_image_uris = st.one_of(
    valid_image_uris,
    st.sampled_from(BAD_URIS),
    _truncated_uri(),
    st.binary(max_size=64).map(_data_uri),  # base64 of (almost surely) a non-image
    st.text(max_size=30).map(lambda s: "data:image/png;base64," + s),
)

# --------------------------------------------------------------------------- JSON values and text

ODD = ["\x00", "\u200f", "\u202e", "\u2066", "\u2069", "\ufeff", "\u0301", "e\u0301", "\U0001F600",
       "\U0001F469\u200d\U0001F469\u200d\U0001F467", "\U0010ffff", "\ufffd", "\ud800", "\udfff", "\ud83d",
       "\r\n", "\t", " ", "\\", '"', "<image>", "<|im_start|>", "<|im_end|>", "<|image_pad|>",
       "<|vision_start|>", "<|endoftext|>", "<video>", "{{", "{%", "\u0000\u0001\u001f", "\x7f"]
HUGE_STRINGS = ["", " ", "\n\n", "a" * 20_000, "ab " * 700, "\U0001F600" * 300, "\u202e" * 500, "\x00" * 1000]
odd_text = st.one_of(
    st.sampled_from(ODD),
    st.lists(st.one_of(st.sampled_from(ODD), st.text(max_size=4)), min_size=1, max_size=6).map("".join),
    st.text(max_size=30),
    st.sampled_from(HUGE_STRINGS),
)
EDGE_NUMBERS = [0, -1, 1, 2, 5, 1.5, -0.0, 2**31, 2**32, 2**53 + 1, 2**63, -(2**63), 10**30, 1e-300, 1e308, -1e308,
                float("nan"), float("inf"), float("-inf")]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.sampled_from(EDGE_NUMBERS), odd_text)
json_values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                          st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                           max_leaves=8)


def _nested(depth: int, leaf):
    for _ in range(depth):
        leaf = [leaf]
    return leaf


# --------------------------------------------------------------------------- valid conversations

safe_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(
    lambda s: s.strip() and "<image>" not in s and "<|" not in s and "<video>" not in s)
question = st.one_of(safe_text, st.sampled_from(["what colour is the shape?", "describe the image",
                                                 "\U0001F600 \u202eright to left\u202c", "naïve café", "x\x00y"]))


@st.composite
def user_message(draw, images: int = 0, need_text: bool = True):
    parts = [{"type": "image_url", "image_url": {"url": draw(valid_image_uris)}} for _ in range(images)]
    if need_text or draw(st.booleans()):
        parts.append({"type": "text", "text": draw(question)})
    parts = draw(st.permutations(parts)) if draw(st.booleans()) else parts
    if not images and len(parts) == 1 and draw(st.booleans()):
        return {"role": "user", "content": parts[0]["text"]}
    return {"role": "user", "content": parts}


@st.composite
def conversations(draw, max_images: int = MAX_IMAGES):
    """A valid conversation: optional system prompt, earlier user/assistant turns (images in user
    turns only, at most ``max_images`` in all), ending with a user question."""
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": draw(st.sampled_from(["system", "developer"])), "content": draw(question)})
    budget = draw(st.integers(0, max_images))
    for _ in range(draw(st.integers(0, 3))):
        k = draw(st.integers(0, budget))
        budget -= k
        msgs.append(draw(user_message(images=k, need_text=k == 0)))
        msgs.append({"role": "assistant", "content": draw(question)})
    msgs.append(draw(user_message(images=budget)))
    return msgs


def good_options():
    return {
        "model": st.sampled_from([MODEL, None]),
        "max_tokens": st.integers(1, CAP),
        "max_completion_tokens": st.integers(1, CAP),
        "temperature": st.one_of(st.just(0), st.floats(0, 2)),
        "top_p": st.floats(1e-6, 1),
        "seed": st.integers(0, 2**32 - 1),
        "stop": st.one_of(safe_text, st.lists(safe_text, max_size=4)),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "n": st.just(1),
        "verbalize": st.booleans(),
    }


GOOD = good_options()


@st.composite
def valid_bodies(draw):
    body = {"messages": draw(conversations())}
    for name, strategy in GOOD.items():
        if draw(st.booleans()):
            body[name] = draw(strategy)
    if "max_tokens" in body and "max_completion_tokens" in body:
        del body["max_tokens"]
    return body


# --------------------------------------------------------------------------- fuzzed bodies

ROLES = ["user", "user", "assistant", "system", "developer", "tool", "function", "User", "", " user"]
PART_TYPES = ["text", "image_url", "image", "input_text", "input_image", "audio", "TEXT", ""]


@st.composite
def fuzz_parts(draw, depth: int = 0):
    kind = draw(st.sampled_from(["text", "image", "text_bad", "image_bad", "type_bad", "str", "value", "nested"]))
    if kind == "text":
        return {"type": "text", "text": draw(odd_text)}
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": draw(any_image_uris)}}
    if kind == "text_bad":
        return {"type": "text", **({"text": draw(json_values)} if draw(st.booleans()) else {})}
    if kind == "image_bad":
        iu = draw(st.one_of(any_image_uris, json_values, st.fixed_dictionaries({"url": json_values}),
                            st.fixed_dictionaries({"url": any_image_uris, "detail": json_values})))
        return {"type": "image_url", **({"image_url": iu} if draw(st.booleans()) else {})}
    if kind == "type_bad":
        part = {"type": draw(st.one_of(st.sampled_from(PART_TYPES), json_values))}
        if draw(st.booleans()):
            part[draw(st.sampled_from(["text", "image_url", "image", "url"]))] = draw(
                st.one_of(odd_text, any_image_uris, json_values))
        return part
    if kind == "str":
        return draw(odd_text)
    if kind == "value":
        return draw(json_values)
    # deeply nested parts
    depth = draw(st.sampled_from([1, 2, 10, 100, 600]))
    return _nested(depth, {"type": "text", "text": "deep"})


@st.composite
def mutated_conversations(draw):
    """A valid conversation with one to three things broken or made odd: a role, a content, a part,
    a text, an image, an extra key. Most bugs hide one step away from a valid request."""
    msgs = [dict(m) for m in draw(conversations())]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.one_of(st.just(len(msgs) - 1), st.integers(0, len(msgs) - 1)))
        if not isinstance(msgs[i], dict):  # already replaced by a non-object
            continue
        m = msgs[i] = dict(msgs[i])
        action = draw(st.sampled_from(["text", "text", "text", "stop_text", "role", "content", "add_part",
                                       "image", "drop", "key", "whole"]))
        if action == "text":  # odd text where the model reads it, the question kept
            odd, content = draw(odd_text), m.get("content")
            join = draw(st.sampled_from([lambda a, b: a + b, lambda a, b: b + a, lambda a, b: b]))
            if isinstance(content, list):
                texts = [j for j, p in enumerate(content) if isinstance(p, dict) and p.get("type") == "text"]
                content = list(content)
                if texts:
                    j = draw(st.sampled_from(texts))
                    content[j] = {"type": "text", "text": join(str(content[j].get("text")), odd)}
                else:
                    content.append({"type": "text", "text": odd})
                m["content"] = content
            else:
                m["content"] = join(content, odd) if isinstance(content, str) else odd
        elif action == "stop_text":
            m["content"] = draw(question) + draw(st.sampled_from(ODD)) + draw(question)
        elif action == "role":
            m["role"] = draw(st.one_of(st.sampled_from(ROLES), json_values))
        elif action == "content":
            m["content"] = draw(st.one_of(json_values, st.lists(fuzz_parts(), max_size=4)))
        elif action == "add_part":
            content = m.get("content")
            parts = list(content) if isinstance(content, list) else [{"type": "text", "text": str(content)}]
            parts.insert(draw(st.integers(0, len(parts))), draw(fuzz_parts()))
            m["content"] = parts
        elif action == "image":
            content = m.get("content")
            parts = list(content) if isinstance(content, list) else [{"type": "text", "text": str(content)}]
            parts.insert(0, {"type": "image_url", "image_url": {"url": draw(any_image_uris)}})
            m["content"] = parts
        elif action == "drop":
            m.pop(draw(st.sampled_from(["role", "content"])), None)
        elif action == "key":
            m[draw(st.sampled_from(["name", "tool_calls", "tool_call_id", "refusal", "audio"]))] = draw(json_values)
        else:
            msgs[i] = draw(json_values)
    return msgs


@st.composite
def fuzz_messages(draw):
    shape = draw(st.sampled_from(["mutated", "mutated", "mutated", "list", "list", "valid", "value", "empty",
                                  "many"]))
    if shape == "valid":
        return draw(conversations())
    if shape == "mutated":
        return draw(mutated_conversations())
    if shape == "value":
        return draw(json_values)
    if shape == "empty":
        return []
    if shape == "many":
        return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * 200 + [
            {"role": "user", "content": "and now?"}]
    msgs = []
    for _ in range(draw(st.integers(1, 4))):
        m = {}
        r = draw(st.sampled_from(["good", "good", "good", "bad", "absent"]))
        if r != "absent":
            m["role"] = draw(st.sampled_from(ROLES)) if r == "good" else draw(json_values)
        c = draw(st.sampled_from(["str", "parts", "parts", "value", "absent", "null"]))
        if c == "str":
            m["content"] = draw(odd_text)
        elif c == "parts":
            m["content"] = draw(st.lists(fuzz_parts(), max_size=5))
        elif c == "value":
            m["content"] = draw(json_values)
        elif c == "null":
            m["content"] = None
        if draw(st.integers(0, 5)) == 0:
            m[draw(st.sampled_from(["name", "tool_calls", "tool_call_id", "refusal"]))] = draw(json_values)
        msgs.append(m if draw(st.integers(0, 9)) else draw(json_values))
    return msgs


@st.composite
def fuzz_bodies(draw):
    """A request body with any field of any type (valid ones included, so that the valid paths
    are fuzzed too)."""
    body = {}
    if draw(st.integers(0, 9)):
        body["messages"] = draw(fuzz_messages())
    # most bodies have valid options, so that the messages get fuzzed past the option checks
    bad = draw(st.sets(st.sampled_from(sorted(GOOD)), min_size=1, max_size=2)) if draw(st.integers(0, 2)) == 0 else ()
    for name, good in GOOD.items():
        if name in bad:
            body[name] = draw(st.one_of(json_values, st.sampled_from(EDGE_NUMBERS + HUGE_STRINGS[:4] + [[], {}])))
        elif draw(st.booleans()):
            body[name] = draw(good)
    if draw(st.integers(0, 5)) == 0:
        body[draw(st.text(max_size=10))] = draw(json_values)
    return body


def dumps(obj) -> bytes:
    """JSON as a client may send it: lone surrogates escaped (\\ud800), NaN and Infinity allowed
    (Python's parser accepts them)."""
    return json.dumps(obj, ensure_ascii=True, allow_nan=True).encode()


GOOD_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
RAW_BODIES = [
    b"", b" ", b"null", b"true", b"0", b"[]", b"{}", b'"messages"', b"{", b"}", b'{"messages": [', b"\xff\xfe\xfd",
    b"\x00" * 16, b"\xef\xbb\xbf" + dumps(GOOD_BODY),  # UTF-8 BOM
    dumps(GOOD_BODY).decode().encode("utf-16"), dumps(GOOD_BODY).decode().encode("utf-32"),
    dumps(GOOD_BODY)[:-1],  # truncated
    dumps(GOOD_BODY) + b"garbage",
    b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',  # invalid UTF-8 inside a string
    b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',  # an encoded surrogate (invalid UTF-8)
    b'{"messages": [{"role": "user", "content": "hi"}], "messages": 5}',  # duplicate key
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "hi"}], "seed": Infinity}',
    b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 400 + b"}",  # overflows a float
    b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1' + b"0" * 5000 + b"}",  # over int's 4300 digits
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4.0000000000000000001}',
    b"[" * 100_000 + b"]" * 100_000,  # nesting past the parser's recursion limit
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"messages": [{"role": "user", "content": ' + b"[" * 5000 + b"]" * 5000 + b"}]}",
    b'{"messages": [{"role": "user", "content": [' + b'{"type": "text", "text": "x"},' * 20_000 + b'{}]}]}',
    b"{" + b" " * (MAX_BODY + 10) + b"}",  # over the body limit
]
raw_bodies = st.one_of(
    st.sampled_from(RAW_BODIES),
    st.binary(max_size=64),
    json_values.filter(lambda v: not isinstance(v, dict)).map(dumps),  # JSON, but not an object
    st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
    fuzz_bodies().map(lambda b: dumps(b)[: len(dumps(b)) // 2]),
)


# --------------------------------------------------------------------------- checks


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_error(r, body_text: str = "") -> dict:
    """A 4xx with OpenAI's error shape; returns the error object."""
    assert r.status_code < 500, f"{r.status_code} for the body {body_text[:2000]}: {r.text[:2000]}"
    assert 400 <= r.status_code < 500, f"status {r.status_code}: {r.text[:500]}"
    assert r.status_code != 429, "a 429 for one request at a time: the queue count leaked"
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    payload = r.json()
    assert isinstance(payload, dict) and set(payload) == {"error"}, payload
    err = payload["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    return err


def check_usage(usage, max_tokens: int) -> None:
    assert isinstance(usage, dict), usage
    p, c, t = usage.get("prompt_tokens"), usage.get("completion_tokens"), usage.get("total_tokens")
    assert _is_int(p) and p > 0 and _is_int(c) and 0 <= c <= max_tokens and t == p + c, usage
    details = usage.get("prompt_tokens_details")
    if details is not None:  # OpenAI's field; when present it must be well-formed
        cached = details.get("cached_tokens")
        assert _is_int(cached) and 0 <= cached <= p, usage


def _cap(body: dict) -> int:
    v = body.get("max_completion_tokens")
    if v is None:
        v = body.get("max_tokens")
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and v not in (
        float("inf"), float("-inf")) else CAP


def check_completion(r, body: dict) -> dict:
    out = r.json()
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    assert set(out) >= {"id", "object", "created", "model", "choices", "usage"}, out
    assert isinstance(out["id"], str) and out["id"].startswith("chatcmpl-"), out
    assert out["object"] == "chat.completion" and _is_int(out["created"]) and out["model"] == MODEL, out
    assert isinstance(out["choices"], list) and len(out["choices"]) == 1, out
    choice = out["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length"), choice
    msg = choice["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str), msg
    check_usage(out["usage"], _cap(body))
    if out["usage"]["completion_tokens"] == _cap(body) and not body.get("stop"):
        assert choice["finish_reason"] == "length", out
    if "verbalizations" in out:
        assert body.get("verbalize"), out
        v = out["verbalizations"]
        assert isinstance(v, dict) and v and all(k.startswith("layer_") and isinstance(s, str) for k, s in v.items())
    else:
        assert not body.get("verbalize"), out
    return out


def check_stream(r, body: dict) -> str:
    """A well-formed SSE stream: chunks of one id, the role first, one finish, then [DONE]."""
    assert r.headers.get("content-type", "").startswith("text/event-stream"), r.headers
    text = r.text
    assert text.endswith("data: [DONE]\n\n"), text[-500:]
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events[:5]
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1, events[-3:]
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks, "no chunk before [DONE]"
    for ch in chunks:
        assert "error" not in ch, f"an error event inside a 200 stream: {ch}"
        assert ch["object"] == "chat.completion.chunk" and ch["id"] == chunks[0]["id"] and ch["model"] == MODEL, ch
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        # OpenAI: one more chunk before [DONE], with no choices and the whole request's usage
        usage_chunk, chunks = chunks[-1], chunks[:-1]
        assert usage_chunk["choices"] == [], usage_chunk
        check_usage(usage_chunk.get("usage"), _cap(body))
        assert chunks, "no content chunk before the usage chunk"
    for ch in chunks:
        assert len(ch["choices"]) == 1 and ch["choices"][0]["index"] == 0, ch
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant", chunks[0]
    finishes = [i for i, ch in enumerate(chunks) if ch["choices"][0]["finish_reason"] is not None]
    assert finishes == [len(chunks) - 1], f"finish_reason must be set on the last chunk only: {chunks}"
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] in ("stop", "length"), last
    check_usage(last.get("usage"), _cap(body))
    content = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
    assert isinstance(content, str)
    return content


def check_health(client) -> None:
    """/health answers 200 and, once the request's worker thread is done, nothing is queued."""
    for _ in range(200):
        h = client.get("/health")
        assert h.status_code == 200, h.text
        if h.json()["queued"] == 0:
            break
        time.sleep(0.01)
    state = h.json()
    assert state["status"] == "ok" and state["queued"] == 0, state


def post(client, raw: bytes):
    return client.post(URL, content=raw, headers={"Content-Type": "application/json"})


def check_any(client, raw: bytes, body=None):
    """Send ``raw``; check the properties whatever the answer; return the response."""
    r = post(client, raw)
    if currently_in_test_context():  # statistics for --hypothesis-show-statistics
        hypothesis.event(f"status {r.status_code}")
    if r.status_code == 200:
        assert isinstance(body, dict), f"200 for a body that is not a JSON object: {raw[:300]!r}"
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            assert body.get("stream"), "a stream that was not asked for"
            check_stream(r, body)
        else:
            assert body.get("stream") is not True, "`stream: true` answered without a stream"
            check_completion(r, body)
    else:
        check_error(r, raw[:2000].decode("utf-8", "replace"))
    check_health(client)
    return r


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def artifact(request):
    path = os.environ.get("VLSI_FUZZ_ARTIFACT")
    return Path(path) if path else request.getfixturevalue("onnx_artifact")


@pytest.fixture(scope="module")
def runtime(artifact):
    import vlsi_runtimes

    return vlsi_runtimes.load(artifact)


@pytest.fixture(scope="module")
def context_tokens(artifact) -> int:
    cfg = json.loads((Path(artifact) / "config.json").read_text())
    return int(cfg.get("max_position_embeddings") or cfg["text_config"]["max_position_embeddings"])


@pytest.fixture(scope="module")
def client(runtime):
    from starlette.testclient import TestClient

    from vlsi_apps.server import Limits, create_app

    limits = Limits(max_tokens=CAP, max_images=MAX_IMAGES, max_queue=2, verbalize_tokens=3, max_body_bytes=MAX_BODY)
    app = create_app(runtime, MODEL, limits=limits)
    # raise_server_exceptions: a server exception fails the example with its traceback
    with TestClient(app, raise_server_exceptions=True) as c:
        yield c


# --------------------------------------------------------------------------- properties


@settings(FUZZ, max_examples=_n(150))
@given(body=fuzz_bodies())
def test_fuzzed_bodies_get_a_completion_or_an_openai_4xx(client, body):
    check_any(client, dumps(body), body)


@settings(FUZZ, max_examples=_n(30))
@given(raw=raw_bodies)
def test_raw_bodies_get_an_openai_4xx(client, raw):
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        body = None
    check_any(client, raw, body)


@settings(FUZZ, max_examples=_n(30))
@given(body=valid_bodies())
def test_valid_conversations_are_answered(client, body):
    r = check_any(client, dumps(body), body)
    assert r.status_code == 200, f"a valid conversation got {r.status_code}: {r.text[:1000]}"


@settings(FUZZ, max_examples=_n(30))
@given(messages=conversations(), odd=st.lists(st.sampled_from(ODD), min_size=1, max_size=3).map("".join),
       data=st.data())
def test_odd_text_in_a_valid_conversation(client, messages, odd, data):
    """Odd unicode and special-token text spliced into one message of a valid conversation (or
    into a stop string): a completion or a 4xx."""
    i = data.draw(st.integers(-1, len(messages) - 1), label="message (-1: a stop string)")
    body = {"model": MODEL, "messages": [dict(m) for m in messages], "max_tokens": 2}
    if i < 0:
        body["stop"] = [odd]
    else:
        m = body["messages"][i]
        at = data.draw(st.integers(0, 40), label="position")
        if isinstance(m["content"], str):
            m["content"] = m["content"][:at] + odd + m["content"][at:]
        else:
            m["content"] = [*m["content"], {"type": "text", "text": odd}]
    check_any(client, dumps(body), body)


BAD_OPTIONS = {
    "model": ["gpt-4o", "", "TINY", 5, [], {}, True],
    "max_tokens": [0, -1, CAP + 1, 1.5, "2", True, False, [], {}, 10**30, 2**63, 1e308, -0.5],
    "max_completion_tokens": [0, -1, CAP + 1, 2.5, "2", True, [], {"n": 1}, 10**30],
    "temperature": [-0.1, 2.01, "0", True, [], {}, 1e308, -1e308],
    "top_p": [0, -1, 1.01, "1", True, [], 1e308],
    "seed": [-1, 2**32, 1.5, "0", True, [], 10**30],
    "stop": ["", [""], [1], ["a", "b", "c", "d", "e"], 5, True, {}, [None], [["a"]]],
    "n": [0, 2, "1", [], {}, 1.5, -1],
    # lenient in this server (truthiness); when refused, the error must name them
    "stream": ["yes", 1, [], {}, "false"],
    "stream_options": ["yes", 1, [], True],
    "verbalize": ["yes", 1, [], {}],
}
STRICT = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n"}


@settings(FUZZ, max_examples=_n(30))
@given(messages=conversations(), name=st.sampled_from(sorted(BAD_OPTIONS)), data=st.data())
def test_a_bad_option_is_a_4xx_naming_it(client, messages, name, data):
    value = data.draw(st.sampled_from(BAD_OPTIONS[name]), label=name)
    body = {"model": MODEL, "messages": messages, name: value}
    r = check_any(client, dumps(body), body)
    if name in STRICT:
        assert r.status_code in ((400, 404) if name == "model" else (400,)), (name, value, r.status_code, r.text)
    if r.status_code != 200:
        assert r.json()["error"]["param"] == name, (name, value, r.json())


# Every constant once, deterministically (hypothesis samples among them, and combines them).


@pytest.mark.parametrize("raw", RAW_BODIES, ids=[f"raw{i}" for i in range(len(RAW_BODIES))])
def test_each_raw_body(client, raw):
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        body = None
    check_any(client, raw, body)


def _ask(uri=None, text="what is it?"):
    parts = [{"type": "image_url", "image_url": {"url": uri}}] if uri is not None else []
    return {"model": MODEL, "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
            "max_tokens": 2}


@pytest.mark.parametrize("uri", VALID_URIS, ids=[f"valid{i}" for i in range(len(VALID_URIS))])
def test_each_valid_image_is_answered(client, uri):
    r = check_any(client, dumps(_ask(uri)), _ask(uri))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("uri", BAD_URIS, ids=[f"bad{i}" for i in range(len(BAD_URIS))])
def test_each_bad_image_is_a_400(client, uri):
    r = check_any(client, dumps(_ask(uri)), _ask(uri))
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages"), r.text


@pytest.mark.parametrize("where", ["question", "system", "history", "stop"])
@pytest.mark.parametrize("odd", ODD, ids=[f"odd{i}" for i in range(len(ODD))])
def test_each_odd_string(client, odd, where):
    """Lone surrogates, NUL, RTL marks, emoji, special-token text ... in the question, the system
    prompt, an earlier turn or a stop string: a completion or a 4xx, never a 5xx."""
    body = _ask(text=f"what is {odd} here?" if where == "question" else "what is it?")
    if where == "system":
        body["messages"].insert(0, {"role": "system", "content": f"you {odd} are"})
    elif where == "history":
        body["messages"][:0] = [{"role": "user", "content": odd}, {"role": "assistant", "content": f"a{odd}b"}]
    elif where == "stop":
        body["stop"] = [odd]
    check_any(client, dumps(body), body)


EDGE_OPTIONS = [
    {"temperature": 0}, {"temperature": 5e-324}, {"temperature": 1e-310}, {"temperature": 1e-300},
    {"temperature": 2}, {"temperature": 2, "top_p": 1e-6}, {"top_p": 1e-6}, {"top_p": 1},
    {"seed": 0}, {"seed": 2**32 - 1}, {"max_tokens": 1}, {"max_tokens": float(CAP)}, {"max_completion_tokens": 1},
    {"max_tokens": None, "max_completion_tokens": None, "temperature": None, "top_p": None, "seed": None,
     "stop": None, "stream": None, "model": None},
    {"stop": ["a", "b", "c", "d"]}, {"stream": True, "stream_options": {"include_usage": True}},
    {"stream": True, "verbalize": True, "temperature": 1e-310},
]


@pytest.mark.parametrize("options", EDGE_OPTIONS, ids=[f"edge{i}" for i in range(len(EDGE_OPTIONS))])
def test_each_edge_option_is_answered(client, options):
    """Valid values at the edges of each option's range (a subnormal temperature included): a
    completion, not an error."""
    body = {**_ask(_data_uri(VALID_IMAGES[0])), **options}
    r = check_any(client, dumps(body), body)
    assert r.status_code == 200, r.text


# The conversation rules: each takes a valid conversation and breaks it one way.


def _assistant_with_image(msgs, draw, ctx):
    out = [dict(m) for m in msgs]
    uri = draw(valid_image_uris)
    i = len(out) - 1
    out.insert(i, {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                    {"type": "text", "text": "here it is"}]})
    out.insert(i, {"role": "user", "content": "show me a picture"})
    return out


def _ends_with_assistant(msgs, draw, ctx):
    return [*msgs, {"role": "assistant", "content": draw(question)}]


def _unknown_role(msgs, draw, ctx):
    out = [dict(m) for m in msgs]
    i = draw(st.integers(0, len(out) - 1))
    out[i]["role"] = draw(st.sampled_from(["robot", "tool", "function", "USER", "", "assistant ", None, 3, ["user"]]))
    return out


def _too_many_images(msgs, draw, ctx):
    """MAX_IMAGES + 1 images or more, spread over several user turns (each turn within the limit)."""
    total = draw(st.integers(MAX_IMAGES + 1, MAX_IMAGES + 3))
    out, left = [], total
    while left > MAX_IMAGES:
        k = draw(st.integers(1, MAX_IMAGES))
        out.append(draw(user_message(images=k)))
        out.append({"role": "assistant", "content": "noted"})
        left -= k
    out.append(draw(user_message(images=left)))
    return [m for m in msgs[:-1] if m["role"] in ("system", "developer")][:1] + out


RULES = {
    "assistant_turn_with_images": _assistant_with_image,
    "ends_with_assistant_turn": _ends_with_assistant,
    "unknown_role": _unknown_role,
    "too_many_images_across_turns": _too_many_images,
}


@pytest.mark.parametrize("rule", list(RULES))
@settings(FUZZ, max_examples=_n(10))
@given(messages=conversations(max_images=1), data=st.data())
def test_conversation_rules_are_4xx_naming_the_field(client, rule, messages, data):
    broken = RULES[rule](messages, data.draw, None)
    body = {"model": MODEL, "messages": broken, "max_tokens": 2}
    check_rejected(client, body, rule)


def check_rejected(client, body, rule):
    r = check_any(client, dumps(body), body)
    assert 400 <= r.status_code < 500, f"{rule}: got {r.status_code}, not a 4xx: {r.text[:300]}"
    param = r.json()["error"]["param"]
    assert isinstance(param, str) and param.startswith("messages"), f"{rule}: param={param!r}"


@pytest.mark.parametrize("where", ["system", "history", "last"])
def test_a_conversation_longer_than_the_context_is_a_4xx(client, context_tokens, where):
    """Tokens past the model's context (``max_position_embeddings``), each message and the whole
    conversation under the character limit: an emoji is four byte-level tokens. (Deterministic, not
    fuzzed: a server that runs such a prompt spends seconds on it.)"""
    filler = "\U0001F600" * (context_tokens // 4 + 64)
    ask = {"role": "user", "content": "what is this?"}
    messages = {
        "system": [{"role": "system", "content": filler}, ask],
        "history": [{"role": "user", "content": filler[: len(filler) // 2]},
                    {"role": "assistant", "content": filler[len(filler) // 2:]}, ask],
        "last": [{"role": "user", "content": filler + " what is this?"}],
    }[where]
    body = {"model": MODEL, "messages": messages, "max_tokens": 2}
    check_rejected(client, body, f"longer than the context ({where})")


def test_usage_reports_cached_tokens(client):
    """OpenAI's ``usage.prompt_tokens_details.cached_tokens``, in a completion and in a stream."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "what is cached?"}], "max_tokens": 2}
    for stream in (False, True):
        r = post(client, dumps({**body, "stream": stream}))
        assert r.status_code == 200, r.text
        usage = (json.loads(r.text.split("\n\n")[-3][6:]) if stream else r.json())["usage"]
        details = usage.get("prompt_tokens_details")
        assert isinstance(details, dict) and _is_int(details.get("cached_tokens")), usage
        assert 0 <= details["cached_tokens"] <= usage["prompt_tokens"], usage


# --------------------------------------------------------------------------- memory


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _settled() -> tuple[float, float]:
    gc.collect()
    time.sleep(0.05)
    gc.collect()
    return _rss_mb(), tracemalloc.get_traced_memory()[0] / 2**20


def _live_objects() -> dict[str, int]:
    """How many PIL images, prompts and generations are alive (whatever their size)."""
    from PIL import Image

    from vlsi_runtimes.base import Generation, Prompt

    gc.collect()
    kinds = {"PIL image": Image.Image, "Prompt": Prompt, "Generation": Generation}
    counts = dict.fromkeys(kinds, 0)
    for o in gc.get_objects():
        mro = type(o).__mro__  # not isinstance(): that reads __class__, which some modules' objects warn on
        for name, kind in kinds.items():
            if kind in mro:
                counts[name] += 1
    return counts


@pytest.fixture
def fresh_client(artifact):
    """A server on its own runtime: ONNX Runtime keeps the peak of its memory arena, so the long
    prompts and images of the tests before would otherwise set this test's baseline."""
    from starlette.testclient import TestClient

    import vlsi_runtimes
    from vlsi_apps.server import Limits, create_app

    limits = Limits(max_tokens=CAP, max_images=MAX_IMAGES, max_queue=2, verbalize_tokens=3, max_body_bytes=MAX_BODY)
    with TestClient(create_app(vlsi_runtimes.load(artifact), MODEL, limits=limits)) as c:
        yield c


def _image_side(artifact) -> int:
    """The side of the square test image: 1024 px when the processor shrinks every image to a
    few tokens anyway (a 3 MB decoded image for a cheap request), else 448 px (256 image tokens;
    a processor that keeps large images makes a 1024 px one cost ~1300 tokens of vision)."""
    cfg = json.loads((Path(artifact) / "preprocessor_config.json").read_text())
    size = cfg.get("size") or {}
    max_pixels = size.get("longest_edge") or size.get("max_pixels") or cfg.get("max_pixels") or 0
    return 1024 if max_pixels and max_pixels <= 320 * 320 else 448


def test_memory_returns_to_baseline(fresh_client, artifact):
    """Many requests with images (valid ones, and a 2000x2000 one whose data is cut short: 12 MB
    decoded, then refused), streaming and not, with verbalizations and with earlier turns, and
    refused ones: after a warm-up, the number of live PIL images, prompts and generations does not
    grow, nor do the process's RSS and the memory Python traces (tracemalloc: Python objects and
    numpy arrays such as pixel values). ONNX Runtime's own buffers (KV caches) show in RSS only, so
    a small KV cache kept per request (~100 KB for these short prompts) would go unseen unless an
    object holding it is counted."""
    client = fresh_client
    side = _image_side(artifact)
    big = _data_uri(_gradient_png(side, side))
    cut = _data_uri(_gradient_png(2000, 2000)[:-300])

    def user(uri, text):
        return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                            {"type": "text", "text": text}]}

    def round_(k: int) -> list[dict]:
        q = f"question {k}: what is in the picture?"
        return [
            {"messages": [user(big, q)], "max_tokens": CAP},
            {"messages": [user(big, q)], "max_tokens": CAP, "stream": True, "stream_options": {"include_usage": True}},
            {"messages": [user(big, q)], "max_tokens": 2, "verbalize": True},
            {"messages": [{"role": "system", "content": f"be brief {k}"}, user(big, "first look"),
                          {"role": "assistant", "content": "a gradient"}, user(big, q)], "max_tokens": CAP},
            {"messages": [user(cut, q)]},
            {"messages": [user(_data_uri(_bomb_png(20000, 20000)), q)]},
            {"messages": [user("data:image/png;base64,@@", q)]},
            {"messages": [{"role": "user", "content": "the same greedy question"}], "max_tokens": CAP},
        ]

    answers = []

    def run(rounds, start):
        for k in range(start, start + rounds):
            for body in round_(k):
                r = post(client, dumps(body))
                assert r.status_code < 500, r.text
                if body["messages"][-1]["content"] == "the same greedy question":
                    answers.append(r.json()["choices"][0]["message"]["content"])
        check_health(client)

    tracemalloc.start()
    try:
        run(3, 0)  # warm up: allocator pools, ONNX Runtime's arena, the runtime's one reusable KV entry
        live0 = _live_objects()
        rss0, traced0 = _settled()
        rounds = _n(6)
        t0 = time.perf_counter()
        run(rounds, 3)
        rss1, traced1 = _settled()
        live1 = _live_objects()
    finally:
        tracemalloc.stop()
    n = rounds * len(round_(0))
    print(f"\n{n} requests ({side} px images) in {time.perf_counter() - t0:.1f} s: RSS {rss0:.0f} -> {rss1:.0f} MB, "
          f"traced {traced0:.1f} -> {traced1:.1f} MB, alive {live0} -> {live1}")
    grown = {k: live1[k] - live0[k] for k in live0 if live1[k] - live0[k] > 2}
    assert not grown, f"objects kept across {n} requests: {grown}"
    # Bounds: a healthy run grows by 0-10 MB of RSS and ~0.1 MB traced; keeping every decoded
    # image adds >= 70 MB of RSS (the cut 2000 px ones alone), keeping every encoded prompt
    # adds >= 5 MB traced (84 px pixel arrays; 448 px ones are 35 times larger)
    assert rss1 - rss0 < 32, f"RSS grew {rss1 - rss0:.0f} MB over {n} requests"
    assert traced1 - traced0 < 2, f"traced memory grew {traced1 - traced0:.1f} MB over {n} requests"
    assert len(set(answers)) == 1, f"the same greedy request answered differently: {set(answers)}"


def test_health_after_the_fuzzing(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["queued"] == 0 and h["rejected"] == 0, h
    assert math.isfinite(h["uptime_s"])
