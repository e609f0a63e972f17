"""The web chat page at `/`, end to end: a real server (uvicorn in a thread), the system's Chromium driven by
playwright, a tiny model. Without playwright or Chromium the tests are skipped, unless
MAMBAVL_REQUIRE_BROWSER=1 (as CI sets it) makes that a failure."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time

import httpx
import pytest
from PIL import Image

from mambavl.serve import ServeConfig
from serving import LiveServer, printable_tiny_cobra

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None

MAX_TOKENS = 16
WAIT_MS = 30_000  # the longest any step may take (a turn of the tiny model takes ~0.1 s)
QUESTION, FOLLOW_UP = "What is in the image?", "And its colour?"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Why this machine cannot run the page tests (None: it can). Chromium is a system package that
# `pip install` cannot provide; playwright comes with the test extra.
MISSING = (
    "playwright is not installed: pip install -e '.[test]'"
    if sync_playwright is None
    else "no Chromium on PATH: install the system's (Debian: apt-get install chromium)"
    if CHROMIUM is None
    else None
)
REQUIRED = os.environ.get("MAMBAVL_REQUIRE_BROWSER") == "1"  # CI sets it: there they must run

# Skipped only on a machine without the browser that does not require it (a newcomer's, outside CI); the
# server the page drives is covered there by the HTTP tests of test_serve_api.py and test_serve_load.py.
pytestmark = pytest.mark.skipif(MISSING is not None and not REQUIRED, reason=f"{MISSING}")


@pytest.fixture(scope="module")
def browser():
    assert MISSING is None, f"{MISSING}; MAMBAVL_REQUIRE_BROWSER=1 says the browser tests must run"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def vlm():
    """Printable answers (plain random ones are bytes that decode to U+FFFD)."""
    return printable_tiny_cobra()


@pytest.fixture
def page(browser):
    """A fresh page (its own localStorage); after the test: no uncaught script error, nothing fetched from
    anywhere but the server (the page must work offline)."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors, elsewhere = [], []
    page.on("pageerror", lambda e: errors.append(e))
    page.on("request", lambda r: r.url.startswith(("http://127.0.0.1:", "data:")) or elsewhere.append(r.url))
    yield page
    context.close()
    assert not errors, f"the page's script failed: {errors}"
    assert not elsewhere, f"the page fetched from elsewhere: {elsewhere}"


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "square.png"
    Image.new("RGB", (48, 32), (200, 30, 30)).save(path)
    return path


def data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def with_image(path, text: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_uri(path)}}, {"type": "text", "text": text}]
    return {"role": "user", "content": parts}


def api_answer(url: str, messages: list[dict], key: str | None = None) -> str:
    """The answer the API gives to the same request, whole (not streamed)."""
    body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth, timeout=60)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def open_chat(page, url: str, max_tokens: int = MAX_TOKENS) -> None:
    page.goto(url)
    page.click("summary")  # the settings
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", "0")


def send(page, text: str, key: str = "Enter") -> dict:
    """Types `text`, sends it (Enter, or a click on Send); returns the body of the request the page made."""
    page.fill("#prompt", text)
    with page.expect_request("**/v1/chat/completions") as request:
        if key == "Enter":
            page.press("#prompt", "Enter")
        else:
            page.click("#send")
    return request.value.post_data_json


def answer(page, n: int) -> str:
    """The text of the n-th assistant bubble once its stream has ended."""
    bubble = page.locator("#messages .assistant").nth(n)
    expect(bubble).to_have_attribute("data-done", "true", timeout=WAIT_MS)
    return bubble.text_content()


def slowed(server: LiveServer, seconds: float) -> LiveServer:
    """Makes each decode step of the server's engine take `seconds` longer, as a real model's would: the
    tiny model's tokens, a millisecond apart, would reach the page in one read of the stream."""
    step = server.engine.decoder.step

    def slow_step(tokens):
        time.sleep(seconds)
        return step(tokens)

    server.engine.decoder.step = slow_step
    return server


def record_bubble_texts(page) -> None:
    """Keeps, in `window.seen`, the last assistant bubble's text every time the page changes it."""
    page.evaluate(
        """() => {
            window.seen = [];
            const messages = document.getElementById("messages");
            new MutationObserver(() => {
                const bubbles = messages.querySelectorAll(".assistant");
                if (bubbles.length) window.seen.push(bubbles[bubbles.length - 1].textContent);
            }).observe(messages, {childList: true, subtree: true, characterData: true});
        }"""
    )


def test_the_answer_streams_into_the_page_and_equals_the_apis(vlm, page, image):
    with slowed(LiveServer(vlm), 0.02) as url:
        open_chat(page, url)
        expect(page.locator("#model-name")).to_have_text("test-model")
        page.set_input_files("#image-input", image)
        expect(page.locator("#preview")).to_have_attribute("src", data_uri(image))
        record_bubble_texts(page)
        body = send(page, QUESTION, key="click")
        text = answer(page, 0)

        messages = [with_image(image, QUESTION)]
        assert body == {"messages": messages, "stream": True, "max_tokens": MAX_TOKENS, "temperature": 0}
        assert text == api_answer(url, messages)
        assert len(text) > 4 and text.isprintable()
        seen = [s for s in page.evaluate("window.seen") if s]
        assert all(text.startswith(s) for s in seen)
        assert len(set(seen)) > 1, f"the answer did not arrive in pieces: the bubble showed only {seen}"
        expect(page.locator("#messages .user img")).to_have_attribute("src", data_uri(image))
        expect(page.locator("#messages .user")).to_have_text(QUESTION)
        expect(page.locator("#attachment")).to_be_hidden()  # the image went with the question
        expect(page.locator("#error")).to_be_hidden()


def test_a_second_turn_sends_the_conversation(vlm, page, image):
    with LiveServer(vlm) as url:
        open_chat(page, url)
        page.set_input_files("#image-input", image)
        send(page, QUESTION)
        first = answer(page, 0)
        body = send(page, FOLLOW_UP)
        second = answer(page, 1)

        messages = [
            with_image(image, QUESTION),
            {"role": "assistant", "content": first},
            {"role": "user", "content": FOLLOW_UP},
        ]
        assert body["messages"] == messages
        assert second == api_answer(url, messages)
        assert second != api_answer(url, messages[2:])  # the history changed the answer

        # The model takes one image per conversation: a new one says so, and sending it starts afresh.
        page.set_input_files("#image-input", image)
        expect(page.locator("#attachment-note")).to_contain_text("starts a new chat")
        body = send(page, QUESTION)
        assert body["messages"] == [with_image(image, QUESTION)]
        assert answer(page, 0) == first
        expect(page.locator("#messages .bubble")).to_have_count(2)

        page.click("#new-chat")
        expect(page.locator("#messages .bubble")).to_have_count(0)
        assert send(page, FOLLOW_UP)["messages"] == [{"role": "user", "content": FOLLOW_UP}]
        answer(page, 0)


def test_errors_show_in_the_page_and_the_api_key_is_sent(vlm, page, image):
    with LiveServer(vlm, config=ServeConfig(model_name="test-model", api_key="k")) as url:
        open_chat(page, url)
        error = page.locator("#error")
        expect(error).to_contain_text("a valid API key is needed")  # GET /v1/models already said so
        page.click("#error")  # dismissed
        expect(error).to_be_hidden()

        page.set_input_files("#image-input", image)
        send(page, QUESTION)
        expect(error).to_contain_text("a valid API key is needed")
        expect(error).to_contain_text("401")
        # the turn is taken back, ready to be sent again
        expect(page.locator("#messages .bubble")).to_have_count(0)
        expect(page.locator("#prompt")).to_have_value(QUESTION)
        expect(page.locator("#preview")).to_have_attribute("src", data_uri(image))

        page.fill("#api-key", "k")
        page.press("#api-key", "Tab")  # the key changed: the page asks for the model again
        expect(page.locator("#model-name")).to_have_text("test-model")
        expect(error).to_be_hidden()
        with page.expect_request("**/v1/chat/completions") as request:
            page.click("#send")
        assert request.value.headers["authorization"] == "Bearer k"
        assert answer(page, 0) == api_answer(url, [with_image(image, QUESTION)], key="k")

        page.fill("#max-tokens", "0")  # the server refuses it, and the page shows why
        page.set_input_files("#image-input", image)  # a second image starts a new chat...
        send(page, FOLLOW_UP)
        expect(error).to_contain_text("max_tokens")
        expect(page.locator("#messages .bubble")).to_have_count(2)  # ...unless it fails: the old one is back
        expect(page.locator("#attachment-note")).to_contain_text("starts a new chat")

        page.reload()  # the settings, the key among them, are kept in localStorage
        expect(page.locator("#model-name")).to_have_text("test-model")
        expect(page.locator("#api-key")).to_have_value("k")
        assert json.loads(page.evaluate("localStorage.getItem('mambavl.chat.settings')"))["apiKey"] == "k"


def test_stop_ends_the_stream_frees_the_slot_and_keeps_the_partial_answer(vlm, page):
    long = ServeConfig(model_name="test-model", max_tokens=10**6)  # an answer that would take minutes
    with LiveServer(vlm, config=long) as url:
        open_chat(page, url, max_tokens=10**6)
        send(page, QUESTION)
        bubble = page.locator("#messages .assistant")
        expect(bubble).not_to_have_text("", timeout=WAIT_MS)
        expect(page.locator("#send")).to_be_disabled()
        # stop only once the engine decodes the request (the bubble may show text before it is admitted)
        page.wait_for_function(
            "async () => (await (await fetch('/health')).json()).active === 1", polling=100, timeout=WAIT_MS
        )
        page.click("#stop")
        partial = answer(page, 0)
        expect(bubble).to_have_class("bubble assistant stopped")
        expect(page.locator("#stop")).to_be_disabled()
        page.wait_for_function(
            "async () => (await (await fetch('/health')).json()).active === 0", polling=100, timeout=WAIT_MS
        )
        deadline = time.monotonic() + WAIT_MS / 1000  # the count follows the slot's release
        while 'outcome="cancelled"}' not in httpx.get(f"{url}/metrics").text and time.monotonic() < deadline:
            time.sleep(0.05)
        metrics = httpx.get(f"{url}/metrics").text
        assert metrics.count('outcome="cancelled"} 1.0') == 1, [
            ln
            for ln in metrics.splitlines()
            if ln.startswith(("mambavl_requests_total", "mambavl_slots_used"))
        ] + [str(httpx.get(f"{url}/health").json())]

        page.fill("#max-tokens", str(MAX_TOKENS))
        body = send(page, FOLLOW_UP)
        assert body["messages"][1] == {"role": "assistant", "content": partial}
        answer(page, 1)
