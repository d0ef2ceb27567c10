"""The chat page (chat.html, chat.js) in a real browser.

Run everything: python -m pytest -q test_lem_serve.py testing/
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import signal
import urllib.request
from pathlib import Path

import pytest

from testing.page_driver import CHROMIUM, CHROMIUM_ARGS, PHONE, REPLY_TIMEOUT_MS, Chat, contrast, luminance

from testing.checks import (
    ARTIFACTS, DIRECT, LONG_BUDGET, ROOT, THINKING, health, health_at, said, start_process, stored,
    wait_idle, wait_until, waiting,
)

pytestmark = pytest.mark.page


# ---------------------------------------------------------------------------
# The chat page in a real browser (Playwright driving Debian's Chromium)
# ---------------------------------------------------------------------------

@pytest.fixture
def open_chat(browser):
    """open_chat(base, **options) opens a Chat page; every one is closed after the test."""
    chats = []

    def open_one(base: str, **options) -> Chat:
        chats.append(Chat(browser, base, **options))
        return chats[-1]

    yield open_one
    for c in chats:
        c.close()


@contextlib.contextmanager
def streaming_from_own_process(open_chat, model_dir: Path):
    """A chat whose reply is streaming (three chunks in) from a server in its own process, for tests
    that kill, freeze or reload under it; (process, chat); the process is resumed and killed after."""
    process, address = start_process(model_dir, "--max-tokens", str(LONG_BUDGET))
    try:
        chat = open_chat(f"http://{address}", max_tokens=LONG_BUDGET)
        chat.send("Keep going")
        chat.wait_chunks(3)
        yield process, chat
    finally:
        process.send_signal(signal.SIGCONT)
        process.kill()


@contextlib.contextmanager
def slot_held(base: str):
    """Hold a server's generation slot with a never-ending stream from another client."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"messages": [{"role": "user", "content": "hold the slot"}], "stream": True, "max_tokens": LONG_BUDGET}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    res = conn.getresponse()
    assert res.status == 200
    res.fp.readline()  # the stream has started: the slot is taken
    try:
        yield
    finally:
        res.close()  # the response holds the socket open too
        conn.close()


def chat_posts(page, action) -> list[dict]:
    """Run action() and return the bodies of the chat requests the page sent meanwhile."""
    bodies = []
    listener = lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None
    page.on("request", listener)
    try:
        action()
    finally:
        page.remove_listener("request", listener)
    return bodies


def test_page_is_served_self_contained(base_url):
    """GET / fills in the placeholders and sets a strict CSP; nothing comes from outside."""
    health = health_at(base_url)
    with urllib.request.urlopen(base_url + "/") as res:
        html = res.read().decode()
        assert res.headers["Content-Type"].startswith("text/html")
        csp = res.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "{{" not in html
    assert re.search(r'<meta name="lem-model" content="([^"]*)">', html).group(1) == health["model"]
    assert re.search(r'<meta name="lem-max-tokens" content="(\d+)">', html).group(1) == str(health["max_tokens"])
    with urllib.request.urlopen(base_url + "/chat.js") as res:
        assert "javascript" in res.headers["Content-Type"]
        script = res.read().decode()
    assert script == (ROOT / "chat.js").read_text()
    # Works offline and under the CSP: one same-origin script, no inline handlers, no remote URLs.
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/chat.js" defer>']
    assert not re.search(r"\son[a-z]+\s*=", html)
    for text in (html, script):
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I)
        assert "@import" not in text
    # Text reaches the DOM only through textContent / text nodes.
    for unsafe in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert unsafe not in script


def test_reply_streams_token_by_token_with_stats(chat):
    page = chat.page
    health = health_at(chat.base)
    assert page.locator("#model-name").inner_text() == health["model"]
    assert page.locator("#health .health-text").text_content().startswith("Ready")
    assert page.evaluate("document.activeElement.id") == "prompt"

    # Shift+Enter makes a newline and sends nothing.
    page.locator("#prompt").press_sequentially("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.locator("#prompt").input_value() == "line one\nline two"
    assert page.locator("article.msg").count() == 0

    assert chat.set_max_tokens(800) == "800"
    # Record every text length the reply shows while it streams.
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const r = document.querySelector("article.assistant[data-state='streaming'] .msg-body");
            if (r) window.__lengths.push(r.textContent.length);
        }).observe(document.getElementById("thread"), {subtree: true, childList: true, characterData: true});
    }""")
    page.locator("#prompt").focus()
    page.keyboard.press("Enter")
    page.locator("article.assistant[data-state='streaming']").wait_for()
    assert page.locator("#stop").is_visible() and not page.locator("#send").is_visible()
    reply = chat.wait_reply("done")

    assert page.locator("article.user .msg-body").inner_text() == "line one\nline two"
    lengths = sorted(set(page.evaluate("window.__lengths")) - {0})
    assert len(lengths) >= 3, f"reply did not stream in pieces: {lengths}"
    assert int(reply.get_attribute("data-chunks")) > 1
    stats = reply.locator(".msg-stats").inner_text()
    assert re.fullmatch(r"800 tokens · [\d.]+ tok/s · prompt \d+", stats), stats
    assert page.locator("#send").is_visible() and page.locator("#prompt").input_value() == ""
    chat.check_clean()


def test_stop_aborts_generation_and_frees_the_slot(open_chat, make_long_server):
    server = make_long_server(max_requests=1)
    chat = open_chat(server.url)
    page = chat.page
    limit = health_at(chat.base)["max_tokens"]
    # The field is capped at the server's limit, and the cap is persisted.
    assert chat.set_max_tokens(limit * 10) == str(limit)
    assert f"Max {limit} tokens" in page.locator("#settings-summary").inner_text()
    assert page.evaluate("JSON.parse(localStorage.getItem('lem-chat.settings.v1')).maxTokens") == limit

    # A budget no machine finishes within the test: the reply is still running when Stop is pressed.
    assert chat.set_max_tokens(LONG_BUDGET) == str(LONG_BUDGET)
    chat.send("Tell me a very long story")
    chat.wait_chunks(5)
    assert health_at(chat.base)["active_requests"] == 1
    page.click("#stop")
    reply = chat.wait_reply("stopped")
    assert reply.locator(".msg-note").inner_text() == "Stopped"
    chunks = int(re.match(r"~(\d+) tokens", reply.locator(".msg-stats").inner_text()).group(1))
    assert 5 <= chunks < LONG_BUDGET
    assert reply.locator(".msg-error").count() == 0
    wait_idle(chat.base)  # the slot frees after Stop, long before LONG_BUDGET tokens could be written
    # The header does not go on saying "Busy" once the slot is free (it used to, until the next 10 s poll).
    # Under the page's 10 s health poll: the page asks again when a run ends, it does not wait for the poll.
    page.locator("#health[data-state='ok'] .health-text", has_text="Ready").wait_for(timeout=9_000)

    # The slot is free: the next message streams normally (no 429).
    assert chat.set_max_tokens(12) == "12"
    chat.send("And a short one")
    reply = chat.wait_reply("done")
    assert reply.locator(".msg-error").count() == 0
    assert reply.locator(".msg-stats").inner_text().startswith("12 tokens")
    chat.check_clean()


def test_autoscroll_follows_until_the_user_scrolls_up(open_chat, make_long_server):
    server = make_long_server()
    chat = open_chat(server.url, viewport=PHONE, max_tokens=LONG_BUDGET)
    page = chat.page
    chat.send("Fill the screen")
    gap = "() => { const t = document.getElementById('transcript'); return t.scrollHeight - t.scrollTop - t.clientHeight; }"
    page.wait_for_function("() => { const t = document.getElementById('transcript');"
                           " return t.scrollHeight > t.clientHeight + 800; }", timeout=REPLY_TIMEOUT_MS)
    assert page.evaluate(gap) < 50  # following the reply
    page.mouse.move(180, 300)
    page.mouse.wheel(0, -600)
    page.wait_for_timeout(400)
    top = page.evaluate("document.getElementById('transcript').scrollTop")
    chat.wait_chunks(int(page.locator("article.assistant").get_attribute("data-chunks")) + 20)
    assert page.evaluate("document.getElementById('transcript').scrollTop") == top  # not pulled back down
    assert page.evaluate(gap) > 200
    page.click("#jump-latest")
    page.wait_for_function(f"() => ({gap})() < 50")
    assert page.locator("#jump-latest").is_hidden()
    page.click("#stop")
    chat.wait_reply("stopped")
    chat.check_clean()


def test_html_in_a_message_renders_as_text(chat):
    page = chat.page
    payload = '<img src=x onerror="window.__xss=1"> <script>window.__xss=2</script> <b>not bold</b>'
    chat.send(payload)
    chat.wait_reply("done")
    assert page.locator("article.user .msg-body").inner_text() == payload
    assert page.locator("#thread img, #thread script, #thread b").count() == 0
    assert page.evaluate("window.__xss") is None
    chat.check_clean()

MARKDOWN_SAMPLE = """<think>Plan: answer <b>briefly</b>.</think>
Hello **bold** and *italic*, `x < y` and <img src=x onerror=alert(1)>.

- one
- two with [a link](https://example.org/) and [bad](javascript:alert`1`)
  1. nested

```python
print("<script>alert(1)</script>")
```

| a | b |
|---|--:|
| 1 | <i>2</i> |
"""


def test_page_shows_reasoning_collapsed_and_turns_thinking_off(open_chat, chat, thinking_server):
    page_ = open_chat(thinking_server.url, max_tokens=None)  # nothing seeded: the page's own defaults
    bodies = []
    page_.page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    page_.send("hi")
    reply = page_.wait_reply()
    think = reply.locator("details.think")
    assert think.count() == 1 and not think.evaluate("d => d.open")  # collapsed
    assert THINKING in think.text_content() and "Answer!" in reply.locator(".msg-body").inner_text()
    assert "Plan" not in reply.locator(".msg-body").inner_text()  # only the summary shows while collapsed
    assert "temperature" not in bodies[0] and "chat_template_kwargs" not in bodies[0]  # the model's own sampling
    page_.reload()
    assert page_.reply().locator("details.think").count() == 1  # kept with the conversation
    page_.page.click("#open-settings")
    assert page_.page.locator("#thinking-field").is_visible() and page_.page.locator("#set-thinking").is_checked()
    page_.page.locator("#set-thinking").uncheck()
    page_.page.click("#settings-done")
    page_.send("again")
    reply = page_.wait_reply()
    assert reply.locator(".msg-body").inner_text().strip() == DIRECT and reply.locator("details.think").count() == 0
    assert bodies[-1]["chat_template_kwargs"] == {"enable_thinking": False}
    chat.page.click("#open-settings")
    assert not chat.page.locator("#thinking-field").is_visible()  # a model that does not think: no switch
    page_.check_clean()


def test_markdown_renderer_builds_safe_dom(chat):
    page = chat.page
    result = page.evaluate("""(text) => {
        const root = document.createElement("div");
        root.append(window.lemChat.renderMarkdown(text));
        document.body.append(root);  // live in the document: any onerror would fire now
        const q = (s) => [...root.querySelectorAll(s)];
        const out = {
            html_elements: q("img, script, b, i, iframe").length,
            attributes_on: q("*").flatMap((el) => [...el.attributes].map((a) => a.name)).filter((n) => n.startsWith("on")),
            think: q("details.think").map((d) => ({open: d.open, summary: d.querySelector("summary").textContent,
                                                   text: d.querySelector(".think-body").textContent})),
            strong: q(":scope > p strong").map((e) => e.textContent),
            em: q(":scope > p em").map((e) => e.textContent),
            inline_code: q(":scope > p code").map((e) => e.textContent),
            first_p: root.querySelector(":scope > p").textContent,
            items: q("ul > li").length,
            nested: q("ul > li ol > li").map((e) => e.textContent),
            list_text: root.querySelector("ul").textContent,
            links: q("a").map((a) => [a.textContent, a.getAttribute("href"), a.rel]),
            code: q(".code-block").map((b) => ({lang: b.querySelector(".code-lang").textContent,
                                                text: b.querySelector("pre > code").textContent,
                                                copy: b.querySelector("button").textContent})),
            cells: q("td").map((td) => [td.textContent, td.style.textAlign]),
            unclosed: (() => { const f = document.createElement("div");
                               f.append(window.lemChat.renderMarkdown("<think>still going"));
                               return f.querySelector("details").dataset.thinking; })(),
            orphan_close: (() => { const f = document.createElement("div");
                                   f.append(window.lemChat.renderMarkdown("hidden plan</think>Answer"));
                                   return [f.querySelector("details .think-body").textContent, f.querySelector(":scope > p").textContent]; })(),
        };
        root.remove();
        return out;
    }""", MARKDOWN_SAMPLE)
    assert result["html_elements"] == 0 and result["attributes_on"] == []
    assert result["think"] == [{"open": False, "summary": "Reasoning", "text": "Plan: answer <b>briefly</b>."}]
    assert result["strong"] == ["bold"] and result["em"] == ["italic"]
    assert result["inline_code"] == ["x < y"]
    assert result["first_p"] == "Hello bold and italic, x < y and <img src=x onerror=alert(1)>."
    assert result["items"] == 2 and result["nested"] == ["nested"]
    assert "[bad](javascript:alert`1`)" in result["list_text"]
    assert result["links"] == [["a link", "https://example.org/", "noopener noreferrer nofollow"]]
    assert result["code"] == [{"lang": "python", "text": 'print("<script>alert(1)</script>")', "copy": "Copy"}]
    assert result["cells"] == [["1", ""], ["<i>2</i>", "right"]]
    assert result["unclosed"] == "true"
    assert result["orphan_close"] == ["hidden plan", "Answer"]
    page.wait_for_timeout(100)
    chat.check_clean()


def test_conversations_survive_reload_and_new_chat(chat):
    page = chat.page
    chat.send("First conversation")
    first_reply = chat.wait_reply("done").locator(".msg-body").inner_text()

    chat.reload()
    assert page.locator("article.user .msg-body").inner_text() == "First conversation"
    assert chat.reply().locator(".msg-body").inner_text() == first_reply
    assert page.locator("#conv-list .conv-title").all_inner_texts() == ["First conversation"]

    page.click("#new-chat")
    assert page.locator("#empty-state").is_visible()
    assert page.evaluate("document.activeElement.id") == "prompt"
    chat.send("Second conversation")
    chat.wait_reply("done")
    assert page.locator("#conv-list .conv-title").all_inner_texts() == ["Second conversation", "First conversation"]

    chat.reload()
    assert page.locator("article.user .msg-body").inner_text() == "Second conversation"
    page.locator("#conv-list .conv-open", has_text="First conversation").click()
    assert page.locator("article.user .msg-body").inner_text() == "First conversation"
    assert chat.reply().locator(".msg-body").inner_text() == first_reply
    # The history goes back to the server: a follow-up turn works in the old conversation.
    chat.send("Follow-up")
    chat.wait_reply("done")
    assert page.locator("article.msg").count() == 4
    chat.check_clean()


HOLD_STORAGE = """() => new Promise((ready) => {
  const open = indexedDB.open("lem-chat");
  open.onsuccess = () => {
    const conversations = open.result.transaction("conversations", "readwrite").objectStore("conversations");
    const spin = () => { conversations.count().onsuccess = spin; };
    spin();
    ready();
  };
})"""  # a write transaction kept open: the page's own writes queue behind it until the page goes


def test_a_reply_not_yet_written_when_the_page_reloads_is_kept(chat):
    """A reload right after a reply finished, before the page could write it (its write is held
    here), keeps the reply whole and done: the page keeps what it could not write and the next load writes it."""
    page = chat.page
    page.evaluate(HOLD_STORAGE)
    chat.send("Written later")
    shown = chat.wait_reply("done").locator(".msg-body").inner_text()
    chat.reload()
    assert shown_texts(chat) == ["Written later", shown] and chat.wait_reply("done")
    page.wait_for_function("() => !Object.keys(localStorage).some((key) => key.startsWith('lem-chat.unsaved.'))")
    chat.reload()  # now from IndexedDB
    assert shown_texts(chat) == ["Written later", shown] and chat.wait_reply("done")
    chat.check_clean()


def test_busy_server_is_retried_after_a_visible_cancellable_countdown(open_chat, make_long_server):
    """A 429 is not a dead end: the page counts down Retry-After, tries again, and can be told to stop."""
    server = make_long_server(max_requests=1, queue_timeout=0)
    chat = open_chat(server.url)
    page = chat.page
    is_chat_post = lambda r: r.method == "POST" and r.url.endswith("/v1/chat/completions")
    with slot_held(server.url):
        chat.send("Are you free?")
        waiting = chat.reply().locator(".msg-wait")
        waiting.wait_for()
        assert re.search(r"Server busy.*Retrying in \d+ s", waiting.inner_text())
        assert chat.reply().get_attribute("data-state") == "waiting"
        assert page.locator("#conv-list li.generating .conv-date").inner_text() == "Waiting for a free slot…"
        for _ in range(2):  # it tries again by itself, after each Retry-After (1 s)
            with page.expect_request(is_chat_post, timeout=REPLY_TIMEOUT_MS):
                pass
        waiting.get_by_role("button", name="Cancel").click()
        error = chat.wait_reply("error").locator(".msg-error")
        assert error.get_attribute("data-kind") == "busy" and "Stopped waiting" in error.inner_text()
        assert page.evaluate("window.lemChat.state.runs.size") == 0 and page.locator("#send").is_visible()
        # Retry by hand starts the countdown again; Esc (focus anywhere) cancels it too.
        error.get_by_role("button", name="Retry").click()
        waiting.wait_for()
        page.evaluate("document.activeElement.blur()")
        page.keyboard.press("Escape")
        chat.wait_reply("error")
        error.get_by_role("button", name="Retry").click()
        waiting.wait_for()
    # The slot is free again: the next try gets through without anyone pressing anything.
    reply = chat.wait_reply("done")
    assert reply.locator(".msg-error, .msg-wait").count() == 0
    assert page.locator("article.msg").count() == 2
    chat.check_clean()


def test_api_key_is_asked_for_and_kept(open_chat, make_server):
    server = make_server(api_key="sesame")
    chat = open_chat(server.url)
    page = chat.page
    chat.send("Knock knock")
    page.locator("#key-dialog[open]").wait_for()
    assert chat.reply().locator(".msg-error").get_attribute("data-kind") == "auth"
    page.fill("#key-input", "wrong")
    page.click("#key-save")
    page.locator("#key-dialog[open] #key-error", has_text="rejected").wait_for()
    page.fill("#key-input", "sesame")
    page.click("#key-save")
    chat.wait_reply("done")
    assert page.locator(".msg-error").count() == 0
    assert page.evaluate("localStorage.getItem('lem-chat.api-key')") == "sesame"

    chat.reload()
    chat.send("Again")
    chat.wait_reply("done")
    assert page.locator("#key-dialog[open]").count() == 0
    chat.check_clean()


def test_timeout_is_shown(open_chat, make_long_server):
    server = make_long_server(timeout=2)
    chat = open_chat(server.url, max_tokens=LONG_BUDGET)
    chat.send("Take your time")
    error = chat.wait_reply("error").locator(".msg-error")
    assert error.get_attribute("data-kind") == "timeout"
    assert "timed out" in error.inner_text()
    assert wait_until(lambda: health(server)["active_requests"] == 0)
    chat.check_clean()


def test_dropped_connection_is_shown(open_chat, long_model_dir):
    with streaming_from_own_process(open_chat, long_model_dir) as (process, chat):
        process.kill()  # the server dies abruptly, as a crashed one would
        error = chat.wait_reply("error").locator(".msg-error")
        assert error.get_attribute("data-kind") == "dropped"
        assert "connection" in error.inner_text().lower()
        chat.page.wait_for_selector("#health[data-state='offline']")
        chat.check_clean()


def test_controls_are_labelled_and_keyboard_usable(chat):
    page = chat.page
    unnamed = page.evaluate("""() => [...document.querySelectorAll("button, input, textarea, select")]
        .filter((el) => el.getClientRects().length || el.closest("dialog"))
        .filter((el) => !(el.getAttribute("aria-label") || el.labels?.length || el.textContent.trim()
                          || el.getAttribute("aria-labelledby")))
        .map((el) => el.outerHTML.slice(0, 80))""")
    assert unnamed == []
    # Tab from the message box reaches Send; Enter/Escape drive the settings dialog.
    page.locator("#prompt").press_sequentially("hi")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "send"
    page.locator("#open-settings").focus()
    page.keyboard.press("Enter")
    assert page.locator("#settings-dialog").evaluate("d => d.open")
    assert page.evaluate("document.activeElement.id") == "set-system"
    page.keyboard.press("Escape")
    assert not page.locator("#settings-dialog").evaluate("d => d.open")
    assert page.evaluate("document.activeElement.id") == "open-settings"
    chat.check_clean()


def test_screenshots_desktop_phone_and_dark(open_chat, make_server):
    """Looks right from a 375 px phone to a desktop, light and dark; saves artifacts/page-*.png.

    The server keeps 4 messages (--max-context 4), so the live reply below
    a seeded conversation shows the window marker and the context gauge.
    """
    server = make_server(max_context=4)
    ARTIFACTS.mkdir(exist_ok=True)
    # The Markdown reply has two versions (the tiny model only writes gibberish, so this one is seeded).
    seed = [stored("demo", "What can you render?", said("user", "Hello, my name is Zork."),
               said("assistant", "Hello Zork! How can I help?"),
               said("user", "What can you render?"),
               said("assistant", MARKDOWN_SAMPLE, alts=[{"content": "An earlier answer.", "status": "done"}], alt=1,
                    stats={"completionTokens": 96, "promptTokens": 31, "tokensPerSecond": 41.7, "chunks": 96}))]
    for scheme in ("light", "dark"):
        chat = open_chat(server.url, color_scheme=scheme)
        page = chat.page
        chat.seed(seed, current="demo")
        chat.send("Now say something of your own")
        chat.wait_reply("done")
        assert page.locator("#window-marker").is_visible() and page.locator("#context-gauge").is_visible()
        page.locator("article.msg").nth(2).scroll_into_view_if_needed()
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert luminance(background) > 0.9 if scheme == "light" else luminance(background) < 0.2
        suffix = "" if scheme == "light" else "-dark"
        page.screenshot(path=str(ARTIFACTS / f"page-desktop{suffix}.png"))
        page.set_viewport_size(PHONE)
        page.wait_for_function(f"() => document.documentElement.clientWidth === {PHONE['width']}")
        # Nothing sticks out sideways, and the header controls stay on screen.
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        for selector in ("#toggle-sidebar", "#new-chat", "#open-settings", "#health", "#send", "#export-md"):
            box = page.locator(selector).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], selector
        assert not page.locator("#sidebar").is_visible()
        chat.reply(1).scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / f"page-phone{suffix}.png"))
        page.click("#toggle-sidebar")
        page.locator("#sidebar .conv-open").first.wait_for(state="visible")
        page.keyboard.press("Escape")
        chat.check_clean()
    for name in ("page-desktop.png", "page-phone.png", "page-desktop-dark.png", "page-phone-dark.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000

# -- the chat page: storage -------------------------------------------------

RANDOM_TEXT = "(n) => { let s = ''; while (s.length < n) s += Math.random().toString(36).slice(2); return s.slice(0, n); }"

IDB_COUNT = """async () => {
    const db = await new Promise((ok, bad) => { const r = indexedDB.open('lem-chat'); r.onsuccess = () => ok(r.result); r.onerror = bad; });
    return await new Promise((ok) => { const r = db.transaction('conversations').objectStore('conversations').count(); r.onsuccess = () => ok(r.result); });
}"""


def test_full_browser_storage_never_drops_a_conversation(chat):
    """localStorage filled to its limit (as the issue found: 20 chats, 5 MB), then one more long message.

    The page used to drop the oldest conversation to make room, silently; now
    the conversations move to IndexedDB and every one of them stays.
    """
    page = chat.page
    count = page.evaluate("""(key) => {
        const random = (n) => { let s = ''; while (s.length < n) s += Math.random().toString(36).slice(2); return s.slice(0, n); };
        const list = [];
        for (let i = 1; ; i++) {
            list.unshift({id: `old${i}`, title: `Old conversation #${i}`, created: i, updated: i,
                          messages: [{role: "user", content: random(240000)}, {role: "assistant", content: "ok", status: "done"}]});
            try { localStorage.setItem(key, JSON.stringify({conversations: list, currentId: null})); }
            catch { list.shift(); localStorage.setItem(key, JSON.stringify({conversations: list, currentId: null})); return list.length; }
        }
    }""", "lem-chat.conversations.v1")
    assert count >= 15  # about 5 MB: the browser's localStorage is full
    chat.reload()
    old = [f"Old conversation #{i}" for i in range(count, 0, -1)]
    assert chat.titles() == old
    page.fill("#prompt", page.evaluate(RANDOM_TEXT, 300_000))  # a long paste: more than the space left
    page.press("#prompt", "Enter")
    chat.wait_reply("error")
    assert chat.titles()[1:] == old
    chat.reload()
    assert len(chat.titles()) == count + 1 and chat.titles()[1:] == old
    assert page.locator("#storage-warning").is_hidden()
    assert wait_until(lambda: page.evaluate(IDB_COUNT) == count + 1)
    assert page.evaluate("localStorage.getItem('lem-chat.conversations.v1')") is None  # moved, then removed
    page.click("#conv-list .conv-open[data-id='old1']")
    assert len(page.locator("article.user .msg-body").inner_text()) == 240_000
    chat.check_clean()


def test_a_save_that_does_not_fit_warns_asks_and_deletes_nothing(browser, open_chat, base_url, tmp_path):
    """IndexedDB at its quota: the page says so, offers export, asks before leaving, and saves once there is room."""
    # Quotas can only be set on a real profile. No service worker: the page's offline copy (~150 kB
    # in Cache Storage) would count against the same small quota and move the numbers below.
    context = browser.browser_type.launch_persistent_context(
        str(tmp_path / "profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 800},
        service_workers="block")
    chat = open_chat(base_url, context=context)
    page = chat.page
    session = context.new_cdp_session(page)
    session.send("Storage.overrideQuotaForOrigin", {"origin": base_url, "quotaSize": 500_000})
    chat.seed([stored(f"old{i}", f"Old conversation #{i}", said("user", page.evaluate(RANDOM_TEXT, 75_000)),
                      updated=i) for i in range(4, 0, -1)])
    assert wait_until(lambda: page.evaluate(IDB_COUNT) == 4)  # moved in: 300 kB of the 500 kB allowed
    page.fill("#prompt", page.evaluate(RANDOM_TEXT, 250_000))
    page.press("#prompt", "Enter")
    chat.wait_reply("error")
    warning = page.locator("#storage-warning")
    warning.wait_for()
    text = warning.inner_text()
    assert "Not saved" in text and "storage for the page is full" in text and "Nothing has been deleted" in text
    assert len(chat.titles()) == 5
    # Leaving now would lose the unsaved conversation: the browser asks first (here: stay).
    dialogs = []
    page.once("dialog", lambda d: (dialogs.append(d.type), d.dismiss()))
    page.evaluate("setTimeout(() => location.reload())")
    assert wait_until(lambda: page.evaluate("1") and dialogs)
    assert dialogs == ["beforeunload"] and warning.is_visible()
    # The export has everything, the unsaved conversation included.
    with page.expect_download() as download:
        warning.get_by_role("button", name="Export all chats").click()
    exported = json.loads(Path(download.value.path()).read_text())
    assert len(exported["conversations"]) == 5
    assert len(exported["conversations"][0]["messages"][0]["content"]) == 250_000
    # Room made by deleting two old conversations: the pending save goes through by itself.
    for n in (1, 2):
        page.locator("#conv-list li", has_text=f"Old conversation #{n}").locator(".conv-del").click()
    warning.wait_for(state="hidden")
    chat.reload()
    assert chat.titles()[1:] == ["Old conversation #4", "Old conversation #3"]
    assert len(page.locator("article.user .msg-body").inner_text()) == 250_000
    chat.check_clean()


# -- the chat page: what the model sees ------------------------------------

def test_too_long_message_can_be_deleted_or_edited_and_the_chat_goes_on(chat):
    page = chat.page
    chat.send("A short first question")
    chat.wait_reply("done")
    chat.send("word " * 6000)  # over the tiny model's 4096-token context
    error = chat.wait_reply("error").locator(".msg-error")
    assert error.get_attribute("data-kind") == "too-long"
    assert "context is 4096 tokens" in error.inner_text() and "Delete or shorten the long message" in error.inner_text()
    error.get_by_role("button", name="Delete message").click()
    assert page.locator("article.msg").count() == 2  # the long message went, with its failed reply
    assert page.locator("#toast").is_visible() and page.locator("#toast-undo").is_visible()
    chat.send("And a short follow-up")
    chat.wait_reply("done")
    assert page.locator("article.msg").count() == 4 and page.locator(".msg-error").count() == 0

    chat.send("word " * 6000)
    error = chat.wait_reply("error").locator(".msg-error")
    error.get_by_role("button", name="Edit message").click()
    editor = page.locator("article.user").last.locator("textarea")
    assert editor.evaluate("(e) => e === document.activeElement")
    editor.fill("Now a short one")
    page.locator("article.user").last.get_by_role("button", name="Send").click()
    chat.wait_reply("done")
    assert page.locator("article.user .msg-body").all_inner_texts()[-1] == "Now a short one"
    assert page.locator("article.msg").count() == 6 and page.locator(".msg-error").count() == 0
    chat.reload()
    assert page.locator("article.msg").count() == 6
    chat.check_clean()


def test_window_marker_shows_what_the_model_did_not_see(open_chat, make_server):
    server = make_server(max_context=4)
    chat = open_chat(server.url)
    page = chat.page
    for text in ("My name is Zork", "How are you?"):
        chat.send(text)
        chat.wait_reply("done")
    assert page.locator("#window-marker").count() == 0
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as response:
        chat.send("What is my name?")
    assert response.value.headers["x-lem-messages-dropped"] == "2"
    chat.wait_reply("done")
    marker = page.locator("#window-marker")
    assert "did not see the 2 messages above" in marker.inner_text() and "--max-context 4" in marker.inner_text()
    outside = page.locator("article.msg.outside-window .msg-body").all_inner_texts()
    assert len(outside) == 2 and outside[0] == "My name is Zork"
    assert marker.evaluate("(m) => m.nextElementSibling.querySelector('.msg-body').textContent") == "How are you?"
    # The gauge: the last turn's prompt and reply tokens against the model's context.
    stats = chat.reply().locator(".msg-stats").inner_text()
    completion, prompt = (int(n) for n in re.fullmatch(r"(\d+) tokens · [\d.]+ tok/s · prompt (\d+)", stats).groups())
    assert page.locator("#gauge-text").inner_text() == f"{prompt + completion:,} / 4,096 tokens"
    assert page.locator("#gauge-bar").get_attribute("aria-valuemax") == "4096"
    chat.reload()  # the marker is kept with the conversation
    assert page.locator("article.msg.outside-window").count() == 2
    chat.check_clean()


# -- the chat page: editing, regenerating, retrying -------------------------

def test_stale_retry_acts_on_its_own_reply(chat):
    """A cut-off reply's Retry, after the chat went on, regenerates that reply, from the messages before it."""
    page = chat.page
    chat.seed([stored("c1", "Cut off", said("user", "First question"),
                      said("assistant", "A partial answer", status="error",
                           error={"kind": "dropped", "message": "The connection closed before the reply finished."}),
                      said("user", "Second question"), said("assistant", "The latest answer"))], current="c1")
    first = chat.reply(0)
    posts = chat_posts(page, lambda: (first.get_by_role("button", name="Retry").click(), chat.wait_reply("done", 0)))
    assert [p["messages"] for p in posts] == [[{"role": "user", "content": "First question"}]]
    assert first.locator(".variant-pos").inner_text() == "2/2"
    assert chat.reply().locator(".msg-body").inner_text() == "The latest answer"
    assert page.locator("article.msg").count() == 4
    first.get_by_role("button", name="Previous version").click()
    assert first.locator(".variant-pos").inner_text() == "1/2"
    assert first.locator(".msg-body").inner_text() == "A partial answer"
    chat.check_clean()


def test_regenerate_keeps_the_previous_reply_as_an_alternative(chat):
    page = chat.page
    chat.send("Say something")
    chat.wait_reply("done")
    content = "() => window.lemChat.state.conversations[0].messages[1].content"
    first = page.evaluate(content)
    chat.reply().get_by_role("button", name="Regenerate").click()
    chat.wait_reply("done")
    second = page.evaluate(content)
    assert chat.reply().locator(".variant-pos").inner_text() == "2/2" and second != first
    chat.reply().get_by_role("button", name="Previous version").click()
    assert chat.reply().locator(".variant-pos").inner_text() == "1/2"
    assert page.evaluate(content) == first
    chat.reload()
    assert chat.reply().locator(".variant-pos").inner_text() == "1/2"
    # The model is sent the version shown.
    posts = chat_posts(page, lambda: (chat.send("Go on"), chat.wait_reply("done")))
    assert posts[0]["messages"][1] == {"role": "assistant", "content": page.evaluate(f"window.lemChat.stripThink(({content})())")}
    chat.check_clean()


# -- the chat page: conversations ------------------------------------------

def test_export_then_import_round_trips(open_chat, base_url, tmp_path):
    chat = open_chat(base_url)
    page = chat.page
    chat.send("First chat")
    chat.wait_reply("done")
    chat.reply().get_by_role("button", name="Regenerate").click()
    chat.wait_reply("done")
    page.click("#rename-chat")
    page.fill("#rename-input", "Renamed chat")
    page.press("#rename-input", "Enter")
    page.click("#new-chat")
    chat.send("Second chat")
    chat.wait_reply("done")
    with page.expect_download() as download:
        page.click("#export-all")
    path = tmp_path / "chats.json"
    download.value.save_as(path)
    exported = json.loads(path.read_text())
    assert exported["format"] == "lem-chat" and exported["version"] == 1
    assert [c["title"] for c in exported["conversations"]] == ["Second chat", "Renamed chat"]
    with page.expect_download() as download:
        page.click("#export-md")
    markdown = Path(download.value.path()).read_text()
    assert download.value.suggested_filename == "Second chat.md"
    assert markdown.startswith("# Second chat\n") and "## You\n\nSecond chat\n" in markdown and "## tiny\n\n" in markdown

    fresh = open_chat(base_url)
    fresh.page.set_input_files("#import-file", str(path))
    fresh.page.locator("#toast-text", has_text="Imported 2 conversations.").wait_for()
    fresh.reload()
    assert fresh.titles() == ["Second chat", "Renamed chat"]
    with fresh.page.expect_download() as download:
        fresh.page.click("#export-all")
    assert json.loads(Path(download.value.path()).read_text())["conversations"] == exported["conversations"]
    fresh.page.locator("#conv-list .conv-open", has_text="Renamed chat").click()
    assert fresh.reply().locator(".variant-pos").inner_text() == "2/2"
    fresh.page.set_input_files("#import-file", str(path))  # again: nothing doubles
    fresh.page.locator("#toast-text", has_text="Imported 0 conversations; 2 already here.").wait_for()
    assert len(fresh.titles()) == 2
    chat.check_clean()
    fresh.check_clean()


def test_delete_a_conversation_can_be_undone_and_keeps_focus(chat):
    page = chat.page
    chat.seed([stored(f"c{i}", f"Chat {i}", said("user", f"hello {i}"), said("assistant", "hi"), updated=i)
               for i in (3, 2, 1)], current="c3")
    page.locator("#conv-list li", has_text="Chat 2").locator(".conv-del").focus()
    page.keyboard.press("Enter")
    assert chat.titles() == ["Chat 3", "Chat 1"]
    assert page.evaluate("document.activeElement.closest('li')?.dataset.conv") == "c1"  # the one that took its place
    assert page.locator("#toast-text").inner_text() == "Deleted “Chat 2”."
    page.click("#toast-undo")
    assert chat.titles() == ["Chat 3", "Chat 2", "Chat 1"]
    assert page.evaluate("document.activeElement.dataset.id") == "c2"
    chat.reload()
    assert chat.titles() == ["Chat 3", "Chat 2", "Chat 1"]
    page.locator("#conv-list li", has_text="Chat 3").locator(".conv-del").click()  # the open one, for good this time
    assert page.locator("#empty-state").is_visible()
    chat.reload()
    assert chat.titles() == ["Chat 2", "Chat 1"]
    chat.check_clean()


def test_rename_and_search_conversations(chat):
    page = chat.page
    chat.seed([stored("c1", "Groceries", said("user", "milk and eggs"), said("assistant", "noted"), updated=3),
               stored("c2", "Trip", said("user", "a zebra at the zoo"), said("assistant", "nice"), updated=2),
               stored("c3", "Work", said("user", "the report"), said("assistant", "done"), updated=1)], current="c1")
    page.locator("#conv-list li", has_text="Trip").locator(".conv-rename").click()
    assert page.evaluate("document.activeElement.id") == "rename-input"
    page.fill("#rename-input", "Holiday plans")
    page.press("#rename-input", "Enter")
    assert chat.titles() == ["Groceries", "Holiday plans", "Work"]
    page.fill("#conv-search", "ZEBRA")  # in a message, any case
    assert chat.titles() == ["Holiday plans"]
    page.fill("#conv-search", "work")
    assert chat.titles() == ["Work"]
    page.fill("#conv-search", "nothing like this")
    assert page.locator("#conv-list .conv-empty").inner_text() == "No conversation matches “nothing like this”."
    page.press("#conv-search", "Escape")
    assert len(chat.titles()) == 3
    chat.reload()
    assert chat.titles() == ["Groceries", "Holiday plans", "Work"]
    chat.check_clean()


def test_a_reply_streaming_in_one_chat_leaves_the_others_usable(open_chat, make_long_server):
    server = make_long_server(max_requests=2)
    chat = open_chat(server.url, max_tokens=LONG_BUDGET)
    page = chat.page
    chat.send("Chat A: a reply that never ends")
    chat.wait_chunks(3)
    page.click("#new-chat")
    assert page.locator("#send").is_visible() and page.locator("#stop").is_hidden()
    generating = page.locator("#conv-list li.generating")
    assert generating.locator(".conv-title").all_inner_texts() == ["Chat A: a reply that never ends"]
    assert generating.locator(".conv-date").inner_text() == "Generating…"
    assert chat.set_max_tokens(8) == "8"
    chat.send("Chat B: a short one")
    chat.wait_reply("done")
    assert page.locator("article.msg").count() == 2
    assert generating.locator(".conv-title").all_inner_texts() == ["Chat A: a reply that never ends"]
    page.locator("#conv-list .conv-open", has_text="Chat A").click()
    assert page.locator("#stop").is_visible()
    chat.send("Typed while A is still writing")  # Enter says why nothing was sent
    assert "still being written" in page.locator("#composer-note").inner_text()
    page.evaluate("document.activeElement.blur()")
    page.keyboard.press("Escape")  # Esc stops it from anywhere, not only the message box
    chat.wait_reply("stopped")
    assert generating.count() == 0 and page.locator("#composer-note").is_hidden()
    chat.check_clean()


# -- the chat page: smaller things -----------------------------------------

def test_table_on_a_phone_keeps_whole_words_and_scrolls(chat):
    page = chat.page
    page.set_viewport_size(PHONE)
    table = "| Name | Population | Continent | Language | Currency | Code |\n|---|---|---|---|---|---|\n" \
            "| Mauritania | 4862989 | Africa | Arabic | Ouguiya | 2222222222 |\n"
    chat.seed([stored("t", "Table", said("user", "a table please"), said("assistant", table))], current="t")
    broken = page.evaluate("""() => [...document.querySelectorAll('.md th, .md td')].filter((cell) => {
        const range = document.createRange();
        range.selectNodeContents(cell);
        return range.getClientRects().length !== 1;
    }).map((cell) => cell.textContent)""")
    assert broken == []
    wrap = page.locator(".table-wrap")
    assert wrap.evaluate("(w) => w.scrollWidth > w.clientWidth")  # the table scrolls sideways...
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # ...the page does not
    chat.check_clean()


def test_phone_enter_makes_a_new_line_and_the_hint_says_so(open_chat, base_url):
    chat = open_chat(base_url, viewport=PHONE, has_touch=True, is_mobile=True)
    page = chat.page
    page.locator("#prompt").press_sequentially("line one")
    page.keyboard.press("Enter")
    page.keyboard.type("line two")
    assert page.locator("#prompt").input_value() == "line one\nline two"
    assert page.locator("article.msg").count() == 0
    for hint in (page.locator("#composer-hint").inner_text(), page.locator("#empty-state").inner_text()):
        assert "Enter for a new line" in hint and "Shift" not in hint
    page.locator("#send").tap()
    chat.wait_reply("done")
    assert page.locator("article.user .msg-body").inner_text() == "line one\nline two"
    chat.check_clean()


def test_links_keep_their_parentheses_and_text_keeps_its_direction(chat):
    page = chat.page
    result = page.evaluate("""() => {
        const root = document.createElement("div");
        root.className = "md";
        root.append(window.lemChat.renderMarkdown(
            "See https://en.wikipedia.org/wiki/Mars_(planet) and (https://example.org/a_(b)_c), " +
            "or [Mars](https://en.wikipedia.org/wiki/Mars_(planet)). (Also https://example.org/x.)\\n\\n" +
            "שלום עולם, מה שלומך?\\n\\n- פריט ראשון\\n- פריט שני\\n\\n| א | ב |\\n|---|---|\\n| גימל | 2 |"));
        document.body.append(root);
        const dir = (s) => [...root.querySelectorAll(s)].map((e) => getComputedStyle(e).direction);
        const out = {links: [...root.querySelectorAll("a")].map((a) => a.getAttribute("href")),
                     p: dir(":scope > p"), li: dir("li"), td: dir("td")};
        root.remove();
        return out;
    }""")
    assert result["links"] == ["https://en.wikipedia.org/wiki/Mars_(planet)", "https://example.org/a_(b)_c",
                               "https://en.wikipedia.org/wiki/Mars_(planet)", "https://example.org/x"]
    assert result["p"] == ["ltr", "rtl"] and result["li"] == ["rtl", "rtl"] and result["td"] == ["rtl", "ltr"]
    assert page.locator("#prompt").get_attribute("dir") == "auto"
    chat.send("שלום, מה שלומך?")
    chat.wait_reply("done")
    assert page.locator("article.user .msg-body").evaluate("(e) => getComputedStyle(e).direction") == "rtl"
    chat.check_clean()


def test_reduced_motion_stills_the_cursor_and_the_drawer(open_chat, base_url):
    chat = open_chat(base_url, viewport=PHONE, reduced_motion="reduce")
    page = chat.page
    motion = page.evaluate("""() => {
        const article = document.createElement("article");
        article.className = "msg assistant";
        article.dataset.state = "streaming";
        const body = document.createElement("div");
        body.className = "msg-body md";
        body.append(document.createElement("p"));
        article.append(body);
        document.getElementById("thread").append(article);
        const item = document.createElement("li");
        item.className = "generating";
        const date = document.createElement("span");
        date.className = "conv-date";
        item.append(date);
        document.getElementById("conv-list").append(item);
        const out = {cursor: getComputedStyle(body.querySelector("p"), "::after").animationName,
                     dot: getComputedStyle(date, "::before").animationName,
                     drawer: getComputedStyle(document.getElementById("sidebar")).transitionDuration};
        article.remove();
        item.remove();
        return out;
    }""")
    assert motion == {"cursor": "none", "dot": "none", "drawer": "0s"}
    chat.check_clean()


def test_honest_states_reload_mid_reply_and_a_frozen_server(open_chat, long_model_dir):
    """A reply cut by a reload says "Interrupted", not "connection lost"; a server that stops
    answering is named within seconds, and given up on, instead of "Generating…" for minutes."""
    with streaming_from_own_process(open_chat, long_model_dir) as (process, chat):
        page = chat.page
        chat.reload()
        reply = chat.wait_reply("interrupted")
        assert reply.locator(".msg-note").inner_text().startswith("Interrupted")
        assert reply.locator(".msg-error").count() == 0 and reply.get_by_role("button", name="Regenerate").count() == 1
        assert wait_until(lambda: health_at(chat.base)["active_requests"] == 0)

        page.evaluate("Object.assign(window.lemChat.timing, {stallNoticeMs: 2000, idleTimeoutMs: 8000})")
        chat.send("Keep going, again")
        chat.wait_chunks(3)
        process.send_signal(signal.SIGSTOP)  # frozen: the socket stays open, nothing more arrives
        page.locator("article.assistant[data-state='streaming'] .msg-stats", has_text="No data from the server for").wait_for()
        error = chat.wait_reply("error").locator(".msg-error")
        assert error.get_attribute("data-kind") == "timeout" and "No data from the server for 8 s" in error.inner_text()
        page.locator("#health .health-text", has_text="Not responding").wait_for(timeout=20_000)
        chat.check_clean()


STREAMING_SAMPLE = """<think>First a plan.

It has two paragraphs.</think>

# A heading

A paragraph with **bold** text
over two lines.

```python
def f():

    return 1
```

- one item

- another item, loose
  with a continuation

Another paragraph, then a table.

| a | b |
|---|---|
| 1 | 2 |

The end.
"""


def test_streaming_renders_only_the_last_block(chat):
    """While a reply streams, blocks that can no longer change are rendered once and kept."""
    result = chat.page.evaluate("""(text) => {
        const body = document.createElement("div");
        document.body.append(body);
        const view = window.lemChat.newStreamView(body);
        let replaced = 0;
        for (let i = 1; i <= text.length; i += 3) {
            const before = [...body.childNodes].filter((n) => !view.tail.includes(n));
            window.lemChat.renderStreaming(view, text.slice(0, i));
            const now = [...body.childNodes];
            replaced += before.filter((n, k) => now[k] !== n).length;
        }
        window.lemChat.renderStreaming(view, text);
        const full = document.createElement("div");
        full.append(window.lemChat.renderMarkdown(text));
        const out = {replaced, stable: view.stableEnd, same: body.innerHTML === full.innerHTML, tail: view.tail.length};
        body.remove();
        return out;
    }""", STREAMING_SAMPLE)
    assert result["replaced"] == 0  # no stable block was ever rendered twice
    assert result["stable"] == STREAMING_SAMPLE.index("The end.") and result["tail"] == 1
    assert result["same"]  # and the pieces add up to the whole
    chat.check_clean()


def test_form_fields_have_3_to_1_border_contrast(open_chat, base_url):
    for scheme in ("light", "dark"):
        chat = open_chat(base_url, color_scheme=scheme)
        page = chat.page
        page.click("#open-settings")
        # [the element with the border, what surrounds it]
        pairs = page.evaluate("""() => [[".composer-box", ".composer-wrap"], ["#set-system", "#settings-dialog"],
                                       ["#set-max-tokens", "#settings-dialog"], ["#conv-search", "#sidebar"]]
            .filter(([box, around]) => document.querySelector(box) && document.querySelector(around))
            .map(([box, around]) => [box, getComputedStyle(document.querySelector(box)).borderTopColor,
                                     getComputedStyle(document.querySelector(box)).backgroundColor,
                                     getComputedStyle(document.querySelector(around)).backgroundColor])""")
        for field, border, inside, outside in pairs:
            assert contrast(border, inside) >= 3 and contrast(border, outside) >= 3, (scheme, field, border, inside, outside)
        assert len(pairs) == 4
        chat.check_clean()


# ---------------------------------------------------------------------------
# The chat page for a working day: tabs, branches, code and math, files, Continue (issue 25)
# ---------------------------------------------------------------------------

def conversation_in(page, index: int = 0) -> dict:
    """A conversation as the page holds it now (index in the list, newest first)."""
    return page.evaluate(f"JSON.parse(JSON.stringify(window.lemChat.state.conversations[{index}]))")


def shown_texts(chat: Chat) -> list[str]:
    """The text of every message in the transcript, in order."""
    return chat.page.locator("article.msg .msg-body").all_inner_texts()


def test_two_tabs_on_one_chat_keep_both_replies_and_escape_stops(open_chat, make_long_server):
    """Tab B sends while tab A's reply in the same chat streams: both replies are kept, in both tabs
    and after a reload; B shows A's reply as streaming (not interrupted); Escape stops each."""
    server = make_long_server(max_requests=2)
    a = open_chat(server.url, max_tokens=LONG_BUDGET)
    a.send("Tab A asks")
    a.wait_chunks(3)
    b = a.tab()
    remote = b.page.locator("article.assistant[data-state='streaming']")
    remote.locator(".msg-stats", has_text="Streaming in another tab").wait_for()
    b.send("Tab B asks")
    b.page.wait_for_function("() => (document.querySelectorAll(\"article.assistant[data-state='streaming']\")[1]"
                             "?.dataset.chunks | 0) >= 3", timeout=REPLY_TIMEOUT_MS)  # B's own reply, after A's
    b.page.keyboard.press("Escape")
    b.wait_reply("stopped")
    a.page.locator("article.msg").nth(3).wait_for()  # A sees B's turn while its own reply streams on
    a.page.keyboard.press("Escape")
    a.wait_reply("stopped", 0)
    wait_idle(server.url)
    for tab in (a, b):
        tab.reload()
        conv = conversation_in(tab.page)
        roles = [(m["role"], m["content"] if m["role"] == "user" else m["status"]) for m in conv["messages"]]
        assert roles == [("user", "Tab A asks"), ("assistant", "stopped"), ("user", "Tab B asks"), ("assistant", "stopped")]
        assert all(m["content"] for m in conv["messages"]), "a reply was saved empty"
        tab.check_clean()
    b.close()


def test_a_tab_changing_a_message_another_tab_changed_keeps_the_draft(open_chat, base_url):
    """Both tabs edit the same message: the first write stays, the second tab gets its text back with a notice."""
    a = open_chat(base_url)
    a.seed([stored("c1", "Edited twice", said("user", "Original"), said("assistant", "Reply"))], current="c1")
    b = a.tab()
    for tab, text in ((a, "Edited in A"), (b, "Edited in B")):
        tab.page.locator("article.msg.user").get_by_role("button", name="Edit message").click()
        tab.page.fill("article.msg.user .edit-box", text)
    a.page.locator("article.msg.user").get_by_role("button", name="Save").click()
    b.page.wait_for_function("() => window.lemChat.state.conversations[0].messages[0].content === 'Edited in A'")
    b.page.locator("article.msg.user").get_by_role("button", name="Save").click()
    b.page.locator("#conflict-note").wait_for()
    assert "another tab" in b.page.locator("#conflict-text").inner_text()
    assert "Edited in B" in b.page.locator("#prompt").input_value()
    for tab in (a, b):
        tab.reload()
        assert shown_texts(tab)[0] == "Edited in A"
    b.close()


STORED_FIRST_TEXT_IS = """async (text) => {
  const open = indexedDB.open("lem-chat");
  const db = await new Promise((done) => { open.onsuccess = () => done(open.result); });
  const get = db.transaction("conversations").objectStore("conversations").getAll();
  const records = await new Promise((done) => { get.onsuccess = () => done(get.result); });
  db.close();
  return records[0].messages[0].content === text;
}"""  # whether the first message of the stored chat says text


def test_a_turn_another_tab_added_stays_that_tabs_to_edit(open_chat, base_url):
    """Tab B edits its own turn and leaves before the edit is written; tab A, which took that turn in
    from B, writes the chat meanwhile. That write is no change of B's turn by A, so B's next load
    writes B's edit, with no conflict notice, and both tabs keep it."""
    a = open_chat(base_url)
    a.seed([stored("c1", "Two tabs", said("user", "One"), said("assistant", "Reply one"))], current="c1")
    b = a.tab()
    b.send("Two")
    b.wait_reply("done")
    a.wait_reply("done", 1)  # A has B's turn, as B wrote it last
    b.page.evaluate(HOLD_STORAGE)
    b.page.locator("article.msg.user").nth(1).get_by_role("button", name="Edit message").click()
    b.page.fill("article.msg.user .edit-box", "Two, edited")
    b.page.locator("article.msg.user").nth(1).get_by_role("button", name="Save").click()
    b.page.goto(b.base + "/healthz")  # B leaves: its write never lands; the edit waits in what B left
    a.page.locator("article.msg.user").first.get_by_role("button", name="Edit message").click()
    a.page.fill("article.msg.user .edit-box", "One, edited")
    a.page.locator("article.msg.user").first.get_by_role("button", name="Save").click()
    a.page.wait_for_function(STORED_FIRST_TEXT_IS, arg="One, edited", polling=100)  # A's write is in
    b.page.goto(b.base + "/")
    b.page.wait_for_function("() => !Object.keys(localStorage).some((key) => key.startsWith('lem-chat.unsaved.'))")
    a.page.locator("article.msg.user").nth(1).locator(".msg-body", has_text="Two, edited").wait_for()
    assert b.page.locator("#conflict-note").is_hidden()
    for tab in (a, b):
        tab.reload()
        assert shown_texts(tab)[:3] == ["One, edited", "Reply one", "Two, edited"]
        tab.check_clean()
    b.close()


def test_edit_at_message_2_of_6_keeps_the_old_branch(open_chat, base_url, tmp_path):
    """Edit + Send at the second user message (index 2 of 6) branches there; the old branch stays a
    version away, survives a reload and goes through export and import."""
    chat = open_chat(base_url)
    page = chat.page
    chat.seed([stored("c1", "Branches", said("user", "One"), said("assistant", "Reply one"), said("user", "Two"),
                      said("assistant", "Reply two"), said("user", "Three"), said("assistant", "Reply three"))], current="c1")
    second = page.locator("article.msg").nth(2)
    second.get_by_role("button", name="Edit message").click()
    page.fill("article.msg.editing .edit-box", "Two, edited")
    posts = chat_posts(page, lambda: (page.locator("article.msg.editing").get_by_role("button", name="Send").click(),
                                      chat.wait_reply("done")))
    assert [m["content"] for m in posts[0]["messages"]] == ["One", "Reply one", "Two, edited"]
    new_reply = shown_texts(chat)[3]
    assert shown_texts(chat)[:3] == ["One", "Reply one", "Two, edited"] and len(shown_texts(chat)) == 4
    nav = page.locator("article.msg").nth(2).locator(".variant-nav")
    assert nav.locator(".variant-pos").get_attribute("aria-label") == "Version 2 of 2"
    nav.get_by_role("button", name="Previous version").click()
    assert shown_texts(chat) == ["One", "Reply one", "Two", "Reply two", "Three", "Reply three"]
    chat.reload()
    assert shown_texts(chat)[2] == "Two" and len(shown_texts(chat)) == 6  # the version shown is kept
    with page.expect_download() as download:
        page.click("#export-all")
    path = tmp_path / "branches.json"
    download.value.save_as(path)
    fresh = open_chat(base_url)
    fresh.page.set_input_files("#import-file", str(path))
    fresh.page.locator("#toast-text", has_text="Imported 1 conversation").wait_for()
    fresh.page.locator("#conv-list .conv-open", has_text="Branches").click()
    fresh.page.locator("article.msg").nth(2).get_by_role("button", name="Next version").click()
    assert shown_texts(fresh) == ["One", "Reply one", "Two, edited", new_reply]
    chat.check_clean()
    fresh.check_clean()


def test_a_reasoning_only_reply_survives_regenerate(chat):
    """A thinking model cut before any answer: the reply has Copy, and Regenerate keeps it as a version."""
    page = chat.page
    chat.seed([stored("c1", "Thinking", said("user", "Think hard"),
                      said("assistant", "", reasoning="Only reasoning, cut by max tokens", finishReason="length"))],
              current="c1")
    reply = chat.reply()
    assert reply.get_by_role("button", name="Copy reply").count() == 1
    reply.get_by_role("button", name="Regenerate").click()
    chat.wait_reply("done")
    assert reply.locator(".variant-pos").inner_text() == "2/2"
    reply.get_by_role("button", name="Previous version").click()
    assert "Only reasoning" in reply.locator("details.think").text_content()
    chat.reload()
    assert chat.reply().locator(".variant-pos").inner_text() == "1/2"
    chat.check_clean()

CRAFTED_IMPORT = {"format": "lem-chat", "version": 1, "conversations": [
    {"id": "crafted", "title": "Crafted", "created": 1, "updated": 2, "settings": {"temperature": "hot", "maxTokens": -5},
     "messages": [{"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": "Hi", "status": "done", "model": {"x": 1},
                   "stats": {"tokensPerSecond": True, "promptTokens": "many", "completionTokens": -3},
                   "error": {"message": 5}, "alts": [{"content": 7}, {"content": "Older", "stats": []}], "alt": "1"}]},
    {"id": "not-one", "messages": [{"role": "tool", "content": "x"}]},
]}


def test_a_crafted_import_and_corrupt_storage_leave_a_working_page(open_chat, base_url, tmp_path):
    """The file that bricked start-up ({"tokensPerSecond": true}) is imported field by field and the
    page keeps working, after a reload too; an unreadable stored record brings up export and reset."""
    chat = open_chat(base_url)
    page = chat.page
    chat.send("A chat before the import")
    chat.wait_reply("done")
    path = tmp_path / "crafted.json"
    path.write_text(json.dumps(CRAFTED_IMPORT))
    page.set_input_files("#import-file", str(path))
    page.locator("#toast-text", has_text='Imported 1 conversation; 1 could not be read '
                                         '(conversation 2: message 1 has the role "tool").').wait_for()
    page.locator("#conv-list .conv-open", has_text="Crafted").click()
    assert shown_texts(chat) == ["Hello", "Hi"]  # its own messages, not the previous chat's
    stats = conversation_in(page, 0 if chat.titles()[0] == "Crafted" else 1)["messages"][1].get("stats")
    assert stats is None or "tokensPerSecond" not in stats
    chat.send("Still works")
    chat.wait_reply("done")
    page.evaluate("""() => new Promise((ok, bad) => { const r = indexedDB.open('lem-chat'); r.onerror = bad;
        r.onsuccess = () => { const tx = r.result.transaction('conversations', 'readwrite');
          tx.objectStore('conversations').put({id: 'junk', messages: 'not a list'}); tx.oncomplete = ok; }; })""")
    chat.reload()
    assert page.locator("#recovery").is_visible() and "could not be read" in page.locator("#recovery-text").inner_text()
    with page.expect_download() as download:
        page.click("#recovery-export")
    assert "junk" in Path(download.value.path()).read_text()
    assert "Crafted" in chat.titles()
    chat.send("And after the reload")
    chat.wait_reply("done")
    chat.check_clean()

CODE_AND_MATH = r"""Some code:

```python
def area(r):  # a circle
    return 3.14 * r ** 2
```

```rust
fn main() { let s = "hi"; println!("{}", s); }
```

```diff
-old line
+new line
```

Inline $e^{i\pi} + 1 = 0$ and display:

$$\frac{a}{\sqrt{b}} = \sum_{k=0}^{n} x_k$$

Hostile: $\text{<img src=x onerror=alert(1)>}$ costs $5 and $10.
"""


def test_code_is_highlighted_with_copy_buttons_and_math_is_mathml(chat):
    page = chat.page
    chat.seed([stored("c1", "Code", said("user", "Show me"), said("assistant", CODE_AND_MATH))], current="c1")
    body = chat.reply().locator(".msg-body")
    python = body.locator("code.language-python")
    assert python.locator(".tok-keyword", has_text="def").count() == 1
    assert python.locator(".tok-comment").inner_text() == "# a circle"
    assert python.locator(".tok-number").first.inner_text() == "3.14"
    assert python.inner_text() == "def area(r):  # a circle\n    return 3.14 * r ** 2"  # the text is unchanged
    assert body.locator("code.language-rust .tok-string").first.inner_text() == '"hi"'
    assert body.locator("code.language-diff .tok-added").inner_text() == "+new line"
    assert body.locator(".code-block .copy-code").count() == 3
    maths = body.locator("math")
    assert maths.count() == 3
    assert page.evaluate("[...document.querySelectorAll('.msg-body math')].every(m => m.namespaceURI.endsWith('/Math/MathML'))")
    assert body.locator("math[display='block'] mfrac msqrt").count() == 1
    assert body.locator("math munderover").count() == 1
    assert body.locator("img").count() == 0 and "<img src=x" in body.locator("math mtext").last.text_content()
    assert "costs $5 and $10." in body.inner_text()  # prices are not math
    # The same through the stream renderer: a reply typed in, math and code included.
    html = page.evaluate("""(t) => { const d = document.createElement('div');
        const v = window.lemChat.newStreamView(d); window.lemChat.renderStreaming(v, t); return d.querySelectorAll('math').length; }""",
                         CODE_AND_MATH)
    assert html == 3
    chat.check_clean()


def test_continue_extends_the_same_message(chat):
    page = chat.page
    chat.send("Write a lot")
    reply = chat.wait_reply("done")
    assert reply.locator(".msg-note", has_text="Hit the max tokens limit").count() == 1
    before = conversation_in(page)["messages"][1]
    posts = chat_posts(page, lambda: (reply.get_by_role("button", name="Continue").click(), chat.wait_reply("done")))
    after = conversation_in(page)["messages"]
    assert len(after) == 2 and after[1]["id"] == before["id"]
    assert after[1]["content"].startswith(before["content"]) and len(after[1]["content"]) > len(before["content"])
    sent = posts[0]["messages"]  # the cut reply comes last, as it stands: the server continues it (no "continue" turn)
    assert [m["role"] for m in sent] == ["user", "assistant"] and sent[0]["content"] == "Write a lot"
    assert sent[1] == {"role": "assistant", "content": page.evaluate("(t) => window.lemChat.answerOf(t)", before["content"])}
    assert sent[1]["content"] and after[1]["content"].startswith(sent[1]["content"])
    assert page.locator("article.msg").count() == 2
    chat.check_clean()


def test_continue_sends_a_reply_cut_while_thinking_with_its_reasoning(chat):
    """Continue on a reasoning-only reply sends it with its reasoning (the server goes on thinking where
    the template renders reasoning; the tiny model's drops it, so it answers) into the same message."""
    page = chat.page
    chat.seed([stored("c1", "Thinking", said("user", "Think hard"),
                      said("assistant", "", reasoning="Only reasoning, cut", finishReason="length"))], current="c1")
    reply = chat.reply()
    posts = chat_posts(page, lambda: (reply.get_by_role("button", name="Continue").click(), chat.wait_reply("done")))
    assert posts[0]["messages"][-1] == {"role": "assistant", "content": "", "reasoning_content": "Only reasoning, cut"}
    (message,) = conversation_in(page)["messages"][1:]
    assert message["reasoning"] == "Only reasoning, cut" and message["content"]
    chat.check_clean()


def test_an_attached_file_goes_into_the_request(chat, tmp_path):
    page = chat.page
    source = tmp_path / "tool.py"
    source.write_text("print('from a file')\n")
    page.set_input_files("#attach-file", str(source))
    page.locator("#attachments .chip", has_text="tool.py").wait_for()
    # Dropped files go the same way; a binary one and a too large one are refused, saying why.
    page.evaluate("""() => { const dt = new DataTransfer();
        dt.items.add(new File(['# Notes\\n'], 'notes.md', {type: 'text/markdown'}));
        dt.items.add(new File([new Uint8Array([0, 1, 2, 255, 0, 7])], 'image.bin'));
        dt.items.add(new File(['x'.repeat(600 * 1024)], 'huge.log'));
        document.getElementById('main').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})); }""")
    page.locator("#attachments .chip", has_text="notes.md").wait_for()
    note = page.locator("#composer-note").inner_text()
    assert "“image.bin” is not a text file" in note and "“huge.log” is too large" in note
    assert page.locator("#attachments .chip").count() == 2
    posts = chat_posts(page, lambda: (chat.send("Look at these"), chat.wait_reply("done")))
    sent = posts[0]["messages"][-1]["content"]
    assert sent == "Look at these\n\ntool.py:\n```py\nprint('from a file')\n```\n\nnotes.md:\n```md\n# Notes\n```"
    assert page.locator("#attachments").is_hidden()
    chat.check_clean()


def test_settings_differ_per_chat_and_new_chats_take_the_defaults(chat):
    page = chat.page
    chat.send("First chat")
    chat.wait_reply("done")
    page.click("#open-settings")
    assert "For this chat" in page.locator("#settings-scope").inner_text()
    page.fill("#set-system", "You are chat one.")
    page.fill("#set-temperature", "0.3")
    page.click("#settings-done")
    first = chat_posts(page, lambda: (chat.send("Again"), chat.wait_reply("done")))[0]
    assert first["messages"][0] == {"role": "system", "content": "You are chat one."} and first["temperature"] == 0.3
    page.keyboard.press("Control+Shift+O")  # a new chat, by its shortcut
    assert page.locator("#empty-state").is_visible()
    second = chat_posts(page, lambda: (chat.send("Second chat"), chat.wait_reply("done")))[0]
    assert second["messages"][0]["role"] == "user" and second["temperature"] == 0.7  # the defaults
    page.click("#open-settings")
    assert page.locator("#set-system").input_value() == "" and page.locator("#set-temperature").input_value() == "0.7"
    page.click("#settings-done")
    page.locator("#conv-list .conv-open", has_text="First chat").click()
    chat.reload()
    again = chat_posts(page, lambda: (chat.send("Back in chat one"), chat.wait_reply("done")))[0]
    assert again["messages"][0]["content"] == "You are chat one." and again["temperature"] == 0.3
    chat.check_clean()


def test_shortcuts_are_listed_and_work(chat):
    page = chat.page
    chat.send("Something to edit")
    chat.wait_reply("done")
    page.locator("#transcript").focus()
    page.keyboard.press("?")
    dialog = page.locator("#help-dialog")
    assert dialog.is_visible()
    for key in ("Ctrl", "Shift", "O", "Esc", "↑"):
        assert key in dialog.inner_text()
    page.keyboard.press("Escape")
    assert not dialog.is_visible()
    page.keyboard.press("Shift+Escape")
    assert page.evaluate("document.activeElement.id") == "prompt"
    page.keyboard.press("ArrowUp")  # empty message box: edit the last message
    assert page.locator("article.msg.user.editing .edit-box").input_value() == "Something to edit"
    chat.check_clean()


def test_touch_targets_are_24_px_and_44_under_a_finger(open_chat, base_url):
    for options, least in (({}, 24), ({"viewport": PHONE, "has_touch": True, "is_mobile": True}, 44)):
        chat = open_chat(base_url, **options)
        chat.seed([stored("c1", "Targets", said("user", "Hi"),
                          said("assistant", "```js\nlet a = 1;\n```", alts=[{"content": "Older", "status": "done"}], alt=1))],
                  current="c1")
        sizes = chat.page.evaluate("""() => [...document.querySelectorAll('button')].filter(b => b.checkVisibility({visibilityProperty: true}))
            .map(b => { const r = b.getBoundingClientRect(); return [b.getAttribute('aria-label') || b.textContent.trim(), r.width, r.height]; })""")
        small = [s for s in sizes if min(s[1], s[2]) < least - 0.5]
        assert not small, f"buttons under {least} px: {small}"
        chat.close()


def test_a_reload_while_the_server_is_down_still_opens_the_chats(open_chat, model_dir):
    """The page keeps an offline copy of itself (chat.js as its service worker): reloaded while
    the server is down it opens, shows the chats, says Offline and offers Reconnect."""
    process, address = start_process(model_dir)
    try:
        chat = open_chat(f"http://{address}")
        page = chat.page
        chat.send("Before the server went away")
        chat.wait_reply("done")
        page.wait_for_function("async () => !!(await navigator.serviceWorker.ready).active")
        process.kill()
        process.wait()
        chat.page.reload()
        page.locator("#health[data-state='offline']").wait_for()
        assert page.locator("#health-retry").is_visible()
        assert chat.titles() == ["Before the server went away"]
        assert page.locator("article.msg").count() == 2
    finally:
        process.kill()


def test_screenshots_of_the_day_long_page(open_chat, base_url):
    """Code, math, versions and an attached file, desktop and phone, light and dark (artifacts/day-*.png)."""
    ARTIFACTS.mkdir(exist_ok=True)
    seed = [stored("demo", "Code and math", said("user", "Show code and math"),
                   said("assistant", CODE_AND_MATH, alts=[{"content": "An earlier version.", "status": "done"}], alt=1,
                        stats={"completionTokens": 96, "promptTokens": 31, "tokensPerSecond": 41.7}))]
    for scheme in ("light", "dark"):
        chat = open_chat(base_url, color_scheme=scheme)
        page = chat.page
        chat.seed(seed, current="demo")
        page.evaluate("() => { const dt = new DataTransfer(); dt.items.add(new File(['a,b\\n1,2\\n'], 'data.csv'));"
                      " document.getElementById('main').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})); }")
        page.locator("#attachments .chip").wait_for()
        page.fill("#prompt", "What does this file hold?")
        for size, name in ((None, "desktop"), (PHONE, "phone")):
            if size:
                page.set_viewport_size(size)
                page.wait_for_function(f"() => document.documentElement.clientWidth === {size['width']}")
                assert page.evaluate("document.documentElement.scrollWidth") <= size["width"]
            page.locator("article.msg math").first.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / f"day-{name}-{scheme}.png"))
        chat.check_clean()
