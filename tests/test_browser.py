"""The demo page in a real browser: Playwright driving Debian's chromium against `vlsi serve`.

Needs Playwright (dev extra) and a chromium on PATH (Debian's package; `make test` installs it through `make sysdeps`).
The screenshot lands in ``test-artifacts/``.
"""

from __future__ import annotations

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


@pytest.mark.slow
def test_page_streams_answer_and_layer_panel(server, rt, browser, tmp_path):  # noqa: F811
    from PIL import Image

    png = _png(5)
    image = tmp_path / "question.png"
    image.write_bytes(png)
    question = "what colour is the shape?"
    want = rt.generate([Image.open(image)], question, max_new_tokens=16)

    page = browser.new_page(viewport={"width": 420, "height": 900})  # a small screen
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server["url"] + "/")
    page.fill("#api-key", KEY)
    page.wait_for_function("document.querySelector('#model').textContent.includes('onnx backend')")
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#preview:not([hidden])")
    page.fill("#question", question)
    page.fill("#max-tokens", "16")
    page.click("#send")
    page.wait_for_selector("#output[data-done='1']", timeout=60_000)

    assert page.text_content("#answer") == want
    names = page.locator("#layers li .name").all_text_contents()
    assert names == [f"layer {k}" for k in rt.verbalizer_layers] + ["final head"]
    verbal = rt.verbalize([Image.open(image)], question, 32)
    texts = page.locator("#layers li .text").all_text_contents()
    assert texts[:-1] == [verbal[k] or "(nothing)" for k in rt.verbalizer_layers]
    stats = page.text_content("#stats")
    assert "onnx backend" in stats and "time to first token" in stats and "tokens/s" in stats
    assert page.is_hidden("#error") and not errors
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-page.png"), full_page=True)
    assert (ARTIFACTS / "demo-page.png").stat().st_size > 1000

    # a refused request shows the server's message on the page
    page.fill("#max-tokens", "100000")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert "max_tokens" in page.text_content("#error")
    page.close()
