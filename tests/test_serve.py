"""`vlsi serve`: a real server process on a loopback port, the `openai` package as the client,
and the abuse cases (bad requests, bombs, a burst past the queue bound)."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("starlette", reason="the app extra is not installed")
openai = pytest.importorskip("openai", reason="the dev extra is not installed")
httpx = pytest.importorskip("httpx")

KEY = "test-key"
QUEUE = 2
CAP = 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(model, log: Path, *args: str) -> tuple[str, subprocess.Popen]:
    """``vlsi serve MODEL *args`` on a free loopback port; returns its URL once /health answers."""
    port = _free_port()
    cmd = [sys.executable, "-m", "vlsi_cli", "serve", str(model), "--port", str(port), *args]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**__import__("os").environ,
                                                                               "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not come up: {log.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(onnx_artifact, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    url, proc = start_server(onnx_artifact, log, "--api-key", KEY, "--max-queue", str(QUEUE), "--max-tokens", str(CAP),
                             "--name", "tiny")
    yield {"url": url, "proc": proc, "log": log}
    stop_server(proc)


@pytest.fixture(scope="module")
def rt(onnx_artifact):
    import vlsi_runtimes

    return vlsi_runtimes.load(onnx_artifact)


def _png(seed=0, size=84) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _user(png: bytes | None, text: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": _data_url(png)}}] if png is not None else []
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _client(server, key=KEY):
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=key, max_retries=0, timeout=60)


def _bomb_png(width=20000, height=20000) -> bytes:
    """A PNG whose header claims width x height pixels, with a few rows of data: decoding it
    would allocate over a gigabyte, so the server must refuse it from the header."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + 3 * width) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_chat_with_image_matches_the_runtime(server, rt):
    png, q = _png(0), "what colour is the shape?"
    from PIL import Image

    direct = rt.generate([Image.open(io.BytesIO(png))], q, max_new_tokens=16)
    c = _client(server)
    r = c.chat.completions.create(model="tiny", messages=_user(png, q), max_tokens=16, temperature=0)
    assert r.choices[0].message.content == direct
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(rt.encode([Image.open(io.BytesIO(png))], q).ids)
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(c.chat.completions.create(model="tiny", messages=_user(png, q), max_tokens=16, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == direct
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_multi_turn_with_the_openai_client(server, rt):
    """An image in the first turn, a follow-up that needs it: the server answers the whole
    conversation as the runtime does, and the follow-up reuses the image's KV cache."""
    png = _png(3)
    first = _user(png, "what colour is the shape?")
    c = _client(server)
    r1 = c.chat.completions.create(model="tiny", messages=first, max_tokens=12, temperature=0)
    a1 = r1.choices[0].message.content
    assert a1 == rt.generate(first, max_new_tokens=12)
    follow = [*first, {"role": "assistant", "content": a1}, {"role": "user", "content": "and what shape is it?"}]
    r2 = c.chat.completions.create(model="tiny", messages=follow, max_tokens=12, temperature=0)
    rt.forget()
    assert r2.choices[0].message.content == rt.generate(follow, max_new_tokens=12, reuse=False)
    prompt = rt.encode(follow)
    assert r2.usage.prompt_tokens == len(prompt.ids)
    (start, n_image), = prompt.spans
    assert r2.usage.prompt_tokens_details.cached_tokens >= start + n_image  # the image was not encoded again


def test_chat_ui_request_shape(server, rt):
    """What chat UIs send: a system prompt, several turns, ``stream: true`` with
    ``stream_options.include_usage``: the stream matches the runtime and ends with a usage chunk."""
    png = _png(4)
    messages = [{"role": "system", "content": "You answer in one word."}, *_user(png, "colour?"),
                {"role": "assistant", "content": "red."}, {"role": "user", "content": [
                    {"type": "text", "text": "and the shape?"}]}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 10, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server['url']}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert text == rt.generate(messages, max_new_tokens=10)
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["prompt_tokens"] == len(rt.encode(messages).ids)
    assert last["usage"]["completion_tokens"] >= 1
    # the openai client reads the same stream
    stream = _client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=10, stream=True,
                                                     stream_options={"include_usage": True})
    got = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in got if ch.choices) == text
    assert got[-1].usage.prompt_tokens == last["usage"]["prompt_tokens"]
    assert got[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same conversation again


def test_stream_ends_with_done(server):
    body = {"model": "tiny", "messages": _user(_png(1), "shape?"), "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{server['url']}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_verbalizations_on_request(server, rt):
    png, q = _png(2), "what shape is it?"
    from PIL import Image

    want = rt.verbalize([Image.open(io.BytesIO(png))], q, 32)
    r = _client(server).chat.completions.create(model="tiny", messages=_user(png, q), max_tokens=8,
                                                extra_body={"verbalize": True})
    layers = r.model_extra["verbalizations"]
    assert list(layers) == [f"layer_{k}" for k in rt.verbalizer_layers]
    assert layers == {f"layer_{k}": want[k] for k in rt.verbalizer_layers}
    plain = _client(server).chat.completions.create(model="tiny", messages=_user(png, q), max_tokens=8)
    assert "verbalizations" not in plain.model_extra


def test_models_health_and_api_key(server):
    c = _client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong").models.list()
    r = httpx.post(f"{server['url']}/v1/chat/completions", json={"messages": _user(None, "hi")}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    h = httpx.get(f"{server['url']}/health", timeout=5).json()
    assert h["status"] == "ok" and h["backend"] == "onnx"


def _post(server, body=None, raw=None, timeout=30):
    kw = {"content": raw} if raw is not None else {"json": body}
    return httpx.post(f"{server['url']}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}",
                                                                       "Content-Type": "application/json"},
                      timeout=timeout, **kw)


@pytest.mark.parametrize("case, status, needle", [
    ("malformed_json", 400, "not valid JSON"),
    ("missing_messages", 400, "messages"),
    ("assistant_last", 400, "must end with a user"),
    ("unknown_role", 400, "must be one of"),
    ("assistant_image", 400, "only user messages may hold images"),
    ("too_many_images", 400, "images; the limit is"),
    ("too_long", 400, "context holds"),
    ("invalid_base64", 400, "base64"),
    ("remote_url", 400, "remote URLs"),
    ("bomb", 400, "pixels"),
    ("corrupt_image", 400, "image rejected"),
    ("unknown_model", 404, "does not exist"),
    ("max_tokens_over_cap", 400, "max_tokens"),
    ("bad_temperature", 400, "temperature"),
    ("too_large_body", 413, "exceeds"),
])
def test_bad_requests_get_openai_errors(server, case, status, needle):
    good = {"model": "tiny", "messages": _user(_png(0), "colour?"), "max_tokens": 4}
    bodies = {
        "missing_messages": {"model": "tiny"},
        "assistant_last": {**good, "messages": [*good["messages"], {"role": "assistant", "content": "red"}]},
        "unknown_role": {**good, "messages": [{"role": "tool", "content": "x"}, *good["messages"]]},
        "assistant_image": {**good, "messages": [*_user(None, "hi"), {"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(_png(1))}}]}, *_user(None, "and?")]},
        "too_many_images": {**good, "messages": [*_user(_png(1), "a"), {"role": "assistant", "content": "b"},
                                                 *_user(_png(2), "c"), {"role": "assistant", "content": "d"},
                                                 *_user(_png(3), "e"), {"role": "assistant", "content": "f"},
                                                 *_user(_png(4), "g"), {"role": "assistant", "content": "h"},
                                                 *_user(_png(5), "i")]},
        "too_long": {**good, "messages": [{"role": "user", "content": "word " * 900}], "max_tokens": CAP},
        "invalid_base64": {**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not base64@@"}},
            {"type": "text", "text": "x"}]}]},
        "remote_url": {**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            {"type": "text", "text": "x"}]}]},
        "bomb": {**good, "messages": _user(_bomb_png(), "x")},
        "corrupt_image": {**good, "messages": _user(_png(0)[:60], "x")},
        "unknown_model": {**good, "model": "gpt-4o"},
        "max_tokens_over_cap": {**good, "max_tokens": CAP + 1},
        "bad_temperature": {**good, "temperature": -1},
    }
    if case == "malformed_json":
        r = _post(server, raw=b'{"messages": [')
    elif case == "too_large_body":
        r = _post(server, raw=b"{" + b" " * (17 * 1024 * 1024) + b"}")
    else:
        r = _post(server, bodies[case])
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and set(err) == {"message", "type", "param", "code"}
    if case in ("assistant_last", "unknown_role", "assistant_image"):
        assert err["param"].startswith("messages[")  # names the message at fault
    assert httpx.get(f"{server['url']}/health", timeout=5).status_code == 200


def test_burst_past_the_queue_bound(server):
    """50 concurrent requests with a queue bound of 2: the excess gets 429, the rest 200,
    /health answers throughout, and memory comes back to its baseline."""
    pid = server["proc"].pid
    _post(server, {"model": "tiny", "messages": _user(_png(3), "warm up"), "max_tokens": 64})
    base = _rss_mb(pid)
    body = {"model": "tiny", "messages": _user(_png(3), "describe the picture"), "max_tokens": 64}
    health, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            t = time.perf_counter()
            code = httpx.get(f"{server['url']}/health", timeout=5).status_code
            health.append((code, time.perf_counter() - t))
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with cf.ThreadPoolExecutor(50) as ex:
            codes = list(ex.map(lambda _: _post(server, body, timeout=120).status_code, range(50)))
    finally:
        stop.set()
        poller.join()
    ok, busy = codes.count(200), codes.count(429)
    print(f"\nburst of 50 with queue bound {QUEUE}: {ok} served, {busy} refused with 429; "
          f"/health answered {len(health)} times, slowest {max(d for _, d in health):.3f} s")
    assert ok + busy == 50 and ok >= 1 and busy >= 1
    assert health and all(code == 200 for code, _ in health)
    time.sleep(0.5)
    after = _rss_mb(pid)
    print(f"server RSS: {base:.0f} MB before the burst, {after:.0f} MB after")
    assert after < base + 100


def test_client_disconnect_cancels_generation(server, rt):
    """A streaming client that goes away stops the generation before the next token."""
    from PIL import Image

    png = None
    for seed in range(20):  # a prompt whose greedy answer runs to the cap (the fixture model is seeded)
        candidate = _png(10 + seed)
        gen = rt.generate([Image.open(io.BytesIO(candidate))], "tell me everything", max_new_tokens=CAP, stream=True)
        "".join(gen)
        if gen.finish_reason == "length":
            png = candidate
            break
    assert png is not None, "precondition: the test model ends every prompt early; pick other prompts"
    before = httpx.get(f"{server['url']}/health", timeout=5).json()["cancelled"]
    body = {"model": "tiny", "messages": _user(png, "tell me everything"), "max_tokens": CAP, "stream": True}
    with httpx.stream("POST", f"{server['url']}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)  # the first event arrived: go away
    for _ in range(100):
        if httpx.get(f"{server['url']}/health", timeout=5).json()["cancelled"] > before:
            break
        time.sleep(0.1)
    assert httpx.get(f"{server['url']}/health", timeout=5).json()["cancelled"] == before + 1
