"""A Playwright driver for the chat page, used by test_lem_serve.py's browser tests.

It opens chat.html from a real lem-serve in Debian's Chromium (never a
downloaded browser) and records page errors, Content-Security-Policy
violations and any request that leaves the server, so every test can assert
the page stayed clean.
"""

from __future__ import annotations

import re

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 740}
REPLY_TIMEOUT_MS = 60_000


LEGACY_STORE = "lem-chat.conversations.v1"  # where the page kept conversations before IndexedDB


class Chat:
    """A page of the chat UI, with the few gestures the tests need.

    `context` is an already made browser context (a persistent one, say);
    otherwise a fresh one is made with `context_options` (has_touch,
    reduced_motion, ...). Either way close() closes it.
    """

    def __init__(self, browser, base: str, *, viewport=DESKTOP, color_scheme="light", max_tokens: int | None = 24,
                 context=None, tab_of: "Chat | None" = None, **context_options):
        self.base = base
        self.closed = False
        self.tab_of = tab_of
        if tab_of is not None:  # another tab of the same browser profile: same storage, its own page
            context = tab_of.context
            context.new_page()
        self.context = context or browser.new_context(viewport=viewport, color_scheme=color_scheme, **context_options)
        self.context.set_default_timeout(30_000)  # a bound for failing tests only: loaded CI boxes are slow
        if max_tokens is not None:
            # Short replies keep the suite fast; only seeded when nothing is stored yet.
            self.context.add_init_script(
                "if (!localStorage.getItem('lem-chat.settings.v1')) localStorage.setItem('lem-chat.settings.v1',"
                f" JSON.stringify({{temperature: 0.7, maxTokens: {max_tokens}, systemPrompt: ''}}));")
        self.page = self.context.pages[-1] if context and self.context.pages else self.context.new_page()
        self.page_errors: list[str] = []
        self.csp_violations: list[str] = []
        self.foreign_requests: list[str] = []
        self.page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        self.page.on("console", self._on_console)
        self.page.on("request", self._on_request)
        self.page.goto(base + "/")
        self.page.wait_for_selector("#health[data-state='ok']")

    def _on_console(self, msg) -> None:
        if "Content Security Policy" in msg.text or "Refused to" in msg.text:
            self.csp_violations.append(msg.text)

    def _on_request(self, request) -> None:
        if not (request.url.startswith(self.base + "/") or request.url.startswith("data:")):
            self.foreign_requests.append(request.url)

    # -- gestures -----------------------------------------------------------

    def send(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def reload(self) -> None:
        self.page.reload()
        self.page.wait_for_selector("#health[data-state='ok']")

    def seed(self, conversations: list[dict], current: str | None = None) -> None:
        """Store conversations as the page before IndexedDB kept them (localStorage), then reload."""
        self.page.evaluate("([key, data]) => localStorage.setItem(key, JSON.stringify(data))",
                           [LEGACY_STORE, {"conversations": conversations, "currentId": current}])
        self.reload()

    def titles(self) -> list[str]:
        return self.page.locator("#conv-list .conv-title").all_inner_texts()

    def wait_chunks(self, n: int, timeout: float = REPLY_TIMEOUT_MS) -> None:
        """Wait until the reply streaming in view has shown at least n chunks."""
        self.page.wait_for_function(
            "(n) => (document.querySelector(\"article.assistant[data-state='streaming']\")?.dataset.chunks | 0) >= n",
            arg=n, timeout=timeout)

    def reply(self, n: int = -1):
        return self.page.locator("article.msg.assistant").nth(n)

    def wait_reply(self, state: str = "done", n: int = -1):
        reply = self.reply(n)
        reply.and_(self.page.locator(f"[data-state='{state}']")).wait_for(timeout=REPLY_TIMEOUT_MS)
        return reply

    def set_max_tokens(self, value: int) -> str:
        """Type a value in Settings; return what the field shows after leaving it."""
        self.page.click("#open-settings")
        field = self.page.locator("#set-max-tokens")
        field.fill(str(value))
        field.press("Tab")
        shown = field.input_value()
        self.page.click("#settings-done")
        return shown

    def check_clean(self) -> None:
        assert not self.page_errors, f"uncaught errors in the page: {self.page_errors}"
        assert not self.csp_violations, f"Content-Security-Policy violations: {self.csp_violations}"
        assert not self.foreign_requests, f"the page fetched something off the server: {self.foreign_requests}"

    def close(self) -> None:
        """Close the page's browser context (again: nothing)."""
        if not self.closed:
            self.closed = True
            if self.tab_of is not None:
                self.page.close()
            else:
                self.context.close()

    def tab(self) -> "Chat":
        """Open the page again in a second tab of this browser profile (the same storage)."""
        return Chat(None, self.base, max_tokens=None, tab_of=self)


def contrast(css_a: str, css_b: str) -> float:
    """WCAG contrast ratio (1 to 21) of two opaque CSS rgb() colours."""
    def relative(css: str) -> float:
        channels = [int(v) / 255 for v in re.findall(r"\d+", css)[:3]]
        r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b
    hi, lo = sorted((relative(css_a), relative(css_b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def luminance(css_color: str) -> float:
    """Relative brightness (0 to 1) of a CSS rgb() colour."""
    r, g, b = (int(v) for v in re.findall(r"\d+", css_color)[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255
