"""The chat page in a real headless browser: Debian's chromium driven by playwright.

The test types a message, sees the reply stream into the page in several pieces, keeps
the conversation for a second turn, presses Stop in the middle of a reply (the server
then cancels that generation), and checks that model output is shown as text, never
HTML. The model's steps are slowed down (a sleep per decode step) so that "in the middle
of a reply" does not depend on the machine's speed. A screenshot of the page is kept in
test-artifacts/ (LMFORGE_TEST_ARTIFACTS overrides the folder).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright
from serve_fixtures import request, running, tiny_gpt

from lmforge.engine import Engine
from lmforge.engine.batch import Batcher
from lmforge.serve.api import Service
from lmforge.serve.scheduler import Scheduler

CHROMIUM = "/usr/bin/chromium"  # Debian's package; scripts/bootstrap installs it
ARTIFACTS = Path(os.environ.get("LMFORGE_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
# what the machine's closed network needs (no background fetches), and headless as root
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


class SlowBatcher(Batcher):
    def step(self):
        time.sleep(0.02)
        return super().step()


@pytest.fixture(scope="module")
def server(gpt2_tok):
    model = tiny_gpt(gpt2_tok, context_length=512)
    engine = Engine(model, model.tokenizer)
    service = Service(engine, Scheduler(SlowBatcher(engine, 2), 8), "tiny")
    with running(service) as base:
        yield base


@pytest.fixture(scope="module")
def page(server):
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: run scripts/bootstrap (it installs it)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page()
        page.goto(server + "/")
        yield page
        browser.close()


def reply_texts(page) -> list[str]:
    return page.eval_on_selector_all(".msg.assistant .text", "els => els.map(e => e.textContent)")


def test_chat_streams_keeps_the_conversation_and_stops(page, server):
    assert page.text_content("#model") == "tiny"
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    # count how often the reply's text changes while it streams in
    page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
        .observe(document.getElementById('log'), {subtree: true, characterData: true, childList: true}); }""")
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
    first = reply_texts(page)[0]
    assert first and page.evaluate("window.updates") > 3  # arrived in pieces, not at once
    api = json.loads(request(server, "POST", "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0, "max_tokens": 12})[2])
    assert first == api["choices"][0]["message"]["content"]  # the page shows exactly what the API answers

    page.fill("#max-tokens", "400")  # a long reply, stopped in the middle
    page.fill("#input", "Tell me more")
    page.press("#input", "Enter")
    page.wait_for_function("() => { const t = document.querySelectorAll('.msg.assistant .text'); return t.length == 2 && t[1].textContent.length > 0; }",
                           timeout=60_000)
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-state=stopped]", timeout=30_000)
    stopped = reply_texts(page)[1]
    time.sleep(0.3)
    assert reply_texts(page)[1] == stopped  # nothing arrives after Stop
    assert not page.is_disabled("#send") and page.is_disabled("#stop")
    deadline = time.monotonic() + 30
    while json.loads(request(server, "GET", "/health")[2])["running"]:  # the server cancelled the generation
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [m.get_attribute("class") for m in page.query_selector_all(".msg")] == ["msg user", "msg assistant"] * 2
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-chat.png"), full_page=True)


def test_model_output_is_text_not_html(page):
    """A reply (or a message) containing markup is shown as characters: no element is created."""
    page.click("#reset")
    page.evaluate("""() => { const f = window.fetch; window.fetch = (url, opts) => url === '/v1/chat/completions'
        ? Promise.resolve(new Response('data: ' + JSON.stringify({choices: [{index: 0, delta: {content: '<img src=x onerror=alert(1)><b>hi</b>'}}]})
              + '\\n\\ndata: [DONE]\\n\\n', {headers: {'Content-Type': 'text/event-stream'}}))
        : f(url, opts); }""")
    page.fill("#input", "<i>markup</i>")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=done]")
    assert reply_texts(page) == ["<img src=x onerror=alert(1)><b>hi</b>"]
    assert page.query_selector_all("#log img, #log b, #log i") == []
