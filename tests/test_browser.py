"""The demo page in a real browser: Playwright driving Debian's chromium against `vlsi serve`.

Needs Playwright (dev extra) and a chromium on PATH (Debian's package; `make test` installs it through `make sysdeps`).
The screenshots (one answer, then a two-turn conversation) land in ``test-artifacts/``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest

from .test_serve import KEY, _png, rt, server  # noqa: F401 - the fixtures

ARTIFACTS = Path(os.environ.get("VLSI_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright  # the dev extra

    exe = _chromium()
    assert exe, "no chromium on PATH: run `make sysdeps` (Debian: apt-get install chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=FLAGS)
        yield b
        b.close()


def _norm(messages: list) -> list:
    """User turns' content as a list of parts (OpenAI allows a plain string for text); the
    assistant turns stay as sent (string content)."""
    return [{**m, "content": [{"type": "text", "text": m["content"]}]}
            if m["role"] == "user" and isinstance(m["content"], str) else m for m in messages]


def _final_chunk(sse: str) -> dict:
    """The finishing chunk of an SSE chat stream: usage and the extras next to it (the usage-only
    chunk that ``include_usage`` adds after it has no choices)."""
    chunks = [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    return next(c for c in reversed(chunks) if c.get("choices") and c["choices"][0].get("finish_reason"))


@pytest.mark.slow
def test_page_keeps_a_conversation_with_layer_panel(server, rt, browser, tmp_path):  # noqa: F811
    from PIL import Image

    png = _png(5)
    image = tmp_path / "question.png"
    image.write_bytes(png)
    question, follow_up = "what colour is the shape?", "and what shape is it?"
    want = rt.generate([Image.open(image)], question, max_new_tokens=16)

    page = browser.new_page(viewport={"width": 420, "height": 900})  # a small screen
    errors, sent = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: sent.append(r.post_data_json)
            if r.method == "POST" and r.url.endswith("/v1/chat/completions") else None)
    page.goto(server["url"] + "/")
    page.fill("#api-key", KEY)
    page.wait_for_function("document.querySelector('#model').textContent.includes('onnx backend')")
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#preview:not([hidden])")
    page.fill("#question", question)
    page.fill("#max-tokens", "16")
    page.click("#send")
    page.wait_for_selector("#output[data-answers='1']", timeout=60_000)

    first = sent[-1]
    assert first["stream"] is True and first["stream_options"] == {"include_usage": True}
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    turn1 = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                         {"type": "text", "text": question}]}
    assert _norm(first["messages"]) == [turn1]
    assert page.locator("#chat .turn.assistant .text").all_text_contents() == [want]
    names = page.locator("#layers li .name").all_text_contents()
    assert names == [f"layer {k}" for k in rt.verbalizer_layers] + ["final head"]
    verbal = rt.verbalize([Image.open(image)], question, 32)
    texts = page.locator("#layers li .text").all_text_contents()
    assert texts[:-1] == [verbal[k] or "(nothing)" for k in rt.verbalizer_layers] and texts[-1] == want
    stats = page.text_content("#stats")
    assert "onnx backend" in stats and "time to first token" in stats and "tokens/s" in stats
    assert page.is_hidden("#error") and not errors
    assert page.is_hidden("#preview")  # the image went with the first question and stays there
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-page.png"), full_page=True)
    assert (ARTIFACTS / "demo-page.png").stat().st_size > 1000

    # a follow-up without re-attaching the image sends the whole conversation
    page.fill("#question", follow_up)
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as reply:
        page.click("#send")
    page.wait_for_selector("#output[data-answers='2']", timeout=60_000)
    messages = [turn1, {"role": "assistant", "content": want},
                {"role": "user", "content": [{"type": "text", "text": follow_up}]}]
    assert _norm(sent[-1]["messages"]) == messages  # (a)
    assert len(sent) == 2
    shown = page.locator("#chat .turn.assistant .text").all_text_contents()
    assert len(shown) == 2 and shown[0] == want  # (c) both turns
    users = page.locator("#chat .turn.user")
    assert users.locator(".text").all_text_contents() == [question, follow_up]
    assert users.nth(0).locator("img.thumb").count() == 1 and users.nth(1).locator("img.thumb").count() == 0
    last = _final_chunk(reply.value.text())  # the panel and the stats are the latest answer's
    texts = page.locator("#layers li .text").all_text_contents()
    assert page.locator("#layers li .name").all_text_contents() == names
    assert texts == [last["verbalizations"][f"layer_{k}"] or "(nothing)" for k in rt.verbalizer_layers] + [shown[1]]
    stats = page.text_content("#stats")
    assert f"{last['usage']['completion_tokens']} tokens" in stats
    cached = (last["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is not None:
        assert f"{last['usage']['prompt_tokens']} prompt tokens, {cached} cached" in stats
    else:
        assert "cached" not in stats
    page.screenshot(path=str(ARTIFACTS / "demo-conversation.png"), full_page=True)
    assert (ARTIFACTS / "demo-conversation.png").stat().st_size > 1000

    # a refused request shows the server's message and leaves the conversation as it was
    page.fill("#question", "how many?")
    page.fill("#max-tokens", "100000")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert "max_tokens" in page.text_content("#error")
    assert page.locator("#chat .turn").count() == 4 and page.input_value("#question") == "how many?"

    # (d) "New chat" clears the turns, the image and the panel; the next question starts afresh
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#preview:not([hidden])")
    page.click("#new-chat")
    assert page.locator("#chat .turn").count() == 0 and page.locator("#layers li").count() == 0
    assert page.text_content("#stats") == "" and page.is_hidden("#preview") and page.is_hidden("#error")
    page.fill("#max-tokens", "16")
    page.fill("#question", question)
    page.click("#send")
    page.wait_for_selector("#output[data-answers='1']", timeout=60_000)
    assert _norm(sent[-1]["messages"]) == [
        {"role": "user", "content": [{"type": "text", "text": question}]}]
    assert page.locator("#chat .turn").count() == 2 and not errors
    page.close()

    # (b) the follow-up answer is the runtime's for the same conversation (the message-list form)
    assert shown[1] == rt.generate(messages, max_new_tokens=16)


@pytest.mark.slow
def test_page_shows_speculative_drafting(onnx_artifact, browser, tmp_path):
    """Served with --speculative, the page's answer is plain greedy decoding's and its stats line
    says what the drafter did (accepted tokens per cycle, of how many drafted)."""
    import vlsi_runtimes
    from PIL import Image

    from .test_serve import start_server, stop_server

    image = tmp_path / "q.png"
    image.write_bytes(_png(2))
    want = vlsi_runtimes.load(onnx_artifact).generate([Image.open(image)], "describe the picture", max_new_tokens=12)
    url, proc = start_server(onnx_artifact, tmp_path / "log", "--speculative", "3:4")
    try:
        page = browser.new_page(viewport={"width": 900, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_function("document.querySelector('#model').textContent.includes('onnx backend')")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#preview:not([hidden])")
        page.fill("#question", "describe the picture")
        page.fill("#max-tokens", "12")
        page.click("#send")
        page.wait_for_selector("#output[data-answers='1']", timeout=60_000)
        assert page.locator("#chat .turn.assistant .text").all_text_contents() == [want]
        page.wait_for_function("document.querySelector('#stats').textContent.includes('accepted per cycle')")
        stats = page.text_content("#stats")
        assert "drafting at layer 3" in stats and not errors
    finally:
        stop_server(proc)
