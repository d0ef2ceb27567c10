"""Shared pytest fixtures for every test file: the tiny models, servers on port 0.

Run everything: python -m pytest -q test_lem_serve.py testing/
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

import lem_serve
from testing.page_driver import CHROMIUM, CHROMIUM_ARGS, Chat
from testing.tiny_model import (THINK_END, THINK_START, THINKING_TEMPLATE, build_parrot_model,
                                build_tiny_model, with_context_length)

from testing.checks import (
    ANSWER, DIRECT, FAMILIES, LONG_CONTEXT, PARROT_SCRIPT, SHORT_CONTEXT, TEMPLATES, THINKING,
    request, running_server, wait_idle,
)


def pytest_configure(config):
    """Register the markers that select a surface: pytest -m "not page" and so on."""
    config.addinivalue_line("markers", "agents: the agents' dialects through their SDKs, and the Claude Code and Codex CLIs")
    config.addinivalue_line("markers", "page: the chat page in Chromium")
    config.addinivalue_line("markers", "group: an mlx.launch group and replicas behind nginx")


# ---------------------------------------------------------------------------
# Fixtures: one model per run, servers on port 0
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def model(model_dir) -> lem_serve.Model:
    return lem_serve.load_model(lem_serve.Settings(model_path=str(model_dir)))


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory) -> Path:
    """The tiny model with a context of LONG_CONTEXT tokens, for budgets no machine can finish."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "long", max_position_embeddings=LONG_CONTEXT)


@pytest.fixture(scope="session")
def long_model(long_model_dir) -> lem_serve.Model:
    return lem_serve.load_model(lem_serve.Settings(model_path=str(long_model_dir)))


@pytest.fixture(scope="session")
def short_model_dir(model_dir, tmp_path_factory) -> Path:
    """The tiny model with a context of SHORT_CONTEXT tokens."""
    return with_context_length(model_dir, tmp_path_factory.mktemp("models") / "short", SHORT_CONTEXT)


@pytest.fixture(scope="session")
def parrot_dir(tmp_path_factory) -> Path:
    return build_parrot_model(tmp_path_factory.mktemp("models") / "parrot", PARROT_SCRIPT)


@pytest.fixture(scope="session")
def parrot_model(parrot_dir) -> lem_serve.Model:
    return lem_serve.load_model(lem_serve.Settings(model_path=str(parrot_dir)))


@pytest.fixture(scope="module")
def parrot_server(parrot_model, parrot_dir):
    with running_server(parrot_model, parrot_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def server(model, model_dir):
    with running_server(model, model_dir, max_requests=2) as srv:
        yield srv


@pytest.fixture
def make_server(model, model_dir):
    """Start servers with other settings for one test; all stopped after it."""
    with contextlib.ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(running_server(model, model_dir, **overrides))


@pytest.fixture
def make_long_server(long_model, long_model_dir):
    """Servers on the long-context model: a reply of LONG_BUDGET tokens there never ends by itself.

    Their max_tokens ceiling is the whole context, so requests may also ask for more than fits.
    """
    with contextlib.ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(
            running_server(long_model, long_model_dir, **{"max_tokens": LONG_CONTEXT, **overrides}))


@pytest.fixture
def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


# ---------------------------------------------------------------------------
# Model options: chat templates and their arguments, sampling defaults, adapters
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def thinking_dir(tmp_path_factory) -> Path:
    return build_parrot_model(tmp_path_factory.mktemp("models") / "thinking",
                              {THINK_START: THINKING + THINK_END + ANSWER, "\n": DIRECT},
                              extra_tokens=(THINK_START, THINK_END), chat_template=THINKING_TEMPLATE)


@pytest.fixture(scope="module")
def thinking_model(thinking_dir) -> lem_serve.Model:
    return lem_serve.load_model(lem_serve.Settings(model_path=str(thinking_dir)))


@pytest.fixture(scope="module")
def thinking_server(thinking_model, thinking_dir):
    with running_server(thinking_model, thinking_dir) as srv:
        yield srv


# ---------------------------------------------------------------------------
# Model families: tool calls and reasoning in each family's own chat format (issue 22)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(FAMILIES))
def family_server(request, tmp_path_factory):
    """(family name, its scripts' kinds, a server on its scripted model): one per family per module."""
    from testing.scripted_model import build_scripted_model
    name = request.param
    template, keywords, scripts = FAMILIES[name]
    kinds = list(scripts)
    path = build_scripted_model(tmp_path_factory.mktemp("families") / name, (TEMPLATES / template).read_text("utf-8"),
                                [scripts[kind] for kind in kinds], **keywords)
    model = lem_serve.load_model(lem_serve.Settings(model_path=str(path)))
    with running_server(model, path) as server:
        yield name, kinds, server, model


# ---------------------------------------------------------------------------
# The real agents, headless: Claude Code (claude -p) and Codex (codex exec)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def agent_model_dir(tmp_path_factory) -> Path:
    """A long-context model (with a 4096-token vocabulary, as real ones have more) whose replies end by themselves.

    Agents treat a reply cut at the token budget as a failure (Claude Code:
    "response exceeded the ... output token maximum", exit 1; Codex:
    "Incomplete response returned", exit 1), so every 8th token ends a turn.
    """
    return build_tiny_model(tmp_path_factory.mktemp("models") / "agent", vocab_size=4096,
                            max_position_embeddings=LONG_CONTEXT, end_token_every=8)


# ---------------------------------------------------------------------------
# The chat page in a real browser (Playwright driving Debian's Chromium)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def browser():
    """Chromium through Playwright; missing in CI is a failure, elsewhere a skip."""
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "the playwright Python package is not installed (pip install -r requirements-dev.txt)"
    if reason is None and not os.path.exists(CHROMIUM):
        reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run in CI: {reason}")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def base_url(model, model_dir):
    """The page's server: one slot, as users run it by default."""
    with running_server(model, model_dir, max_requests=1) as srv:
        yield srv.url


@pytest.fixture
def chat(browser, base_url):
    c = Chat(browser, base_url)
    yield c
    c.close()
    wait_idle(base_url)  # leave the single slot free for the next test
