"""The web chat page in a real browser: headless Chromium driven by Playwright.

The browser is Debian's ``chromium`` package (``/usr/bin/chromium``, or ``CHROMIUM_PATH``);
Playwright never downloads one. The page runs against real gunicorn and the fake upstream,
which answers ``"Echo: " + message``. Screenshots land in ``tests/artifacts/`` (ignored by
git) on every run so a person can look at the page.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from playwright.sync_api import Browser, Dialog, Locator, Page, Route, expect

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
# Loopback must never go through an HTTP proxy taken from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# `./start.sh test` installs Debian's chromium; a missing browser fails, it never skips.
pytestmark = pytest.mark.slow

expect.set_options(timeout=10_000)


def screenshot(page: Page, name: str) -> None:
    """Save a screenshot of the page for a person to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), animations="disabled")


def api_get(server: Any, path: str, client_id: str) -> Any:
    """GET a JSON endpoint of the server as the given client."""
    request = urllib.request.Request(server.url + path, headers={"X-Client-Id": client_id})
    with OPENER.open(request, timeout=10) as response:
        return json.load(response)


@dataclass
class Tab:
    """A page plus what happened in it: dialogs shown, uncaught script errors."""

    page: Page
    dialogs: list[tuple[str, str]] = field(default_factory=list)
    answers: list[str | None] = field(default_factory=list)  # next dialogs: text to accept, None to dismiss
    errors: list[str] = field(default_factory=list)

    def on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append((dialog.type, dialog.message))
        answer = self.answers.pop(0) if self.answers else None
        if answer is None:
            dialog.dismiss()
        else:
            dialog.accept(answer)

    def client_id(self) -> str:
        return self.page.evaluate("localStorage.getItem('chat.clientId')")

    # -------------------------------------------------------------- page actions

    @property
    def input(self) -> Locator:
        return self.page.locator("#message-input")

    @property
    def assistants(self) -> Locator:
        return self.page.locator("#message-list .message.assistant")

    @property
    def conversations(self) -> Locator:
        return self.page.locator("#conversation-list li.conversation-item")

    def send(self, text: str) -> Locator:
        """Type text, press Enter and wait until the reply has finished streaming."""
        before = self.assistants.count()
        self.input.fill(text)
        self.input.press("Enter")
        try:
            expect(self.assistants).to_have_count(before + 1)
        except AssertionError as exc:
            banner = self.page.locator("#error-text").text_content()
            raise AssertionError(f"no reply to {text!r}; the page says: {banner!r}") from exc
        reply = self.assistants.nth(before)
        expect(reply).not_to_have_class(re.compile(r"\bstreaming\b"))
        expect(self.page.locator("body")).not_to_have_class(re.compile(r"\bis-streaming\b"))
        return reply


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_tab(browser: Browser, url: str, **context_options: Any) -> Tab:
    """Open the page in a fresh context: its own localStorage, so its own client id."""
    options: dict[str, Any] = {"viewport": DESKTOP, "color_scheme": "light", "reduced_motion": "reduce"}
    options.update(context_options)
    context = browser.new_context(**options)
    context.set_default_timeout(15_000)
    page = context.new_page()
    tab = Tab(page)
    page.on("dialog", tab.on_dialog)
    page.on("pageerror", lambda exc: tab.errors.append(str(exc)))
    page.goto(url + "/")
    expect(page.locator("#message-input")).to_be_focused()  # the script has run
    return tab


@pytest.fixture
def tabs(browser: Browser) -> Iterator[list[Tab]]:
    """Tabs opened by a test; closed after it, failing it on an uncaught script error."""
    opened: list[Tab] = []
    yield opened
    errors = [e for tab in opened for e in tab.errors]
    for tab in opened:
        tab.page.context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def tab(browser: Browser, live_server: Any, tabs: list[Tab]) -> Tab:
    opened = open_tab(browser, live_server.url)
    tabs.append(opened)
    return opened


RATE_LIMIT_TEST = "test_rate_limit_is_explained_and_keeps_the_typed_text"


@pytest.fixture(scope="module", autouse=True)
def limited_server(request: pytest.FixtureRequest, database_url: str, upstream: Any) -> Iterator[Any]:
    """A second server allowing 2 chats a minute (the limit is per address, so not live_server's).

    Autouse: it starts in the background as the module starts (when its test is selected),
    so its start-up overlaps the browser's and the other tests; it gives a function that
    waits for it.
    """
    from servers import Gunicorn

    if not any(item.name == RATE_LIMIT_TEST for item in request.session.items):
        yield lambda: pytest.fail("the rate-limited server was not started")
        return
    server = Gunicorn(database_url=database_url, upstream_url=upstream.url, rate_limit_chat="2 per minute")
    failure: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as exc:  # reported by the test that waits for it
            failure.append(exc)

    thread = threading.Thread(target=start, name="limited-gunicorn", daemon=True)
    thread.start()

    def ready() -> Any:
        thread.join(90)
        if failure:
            raise failure[0]
        assert not thread.is_alive(), "the rate-limited server did not start"
        return server

    yield ready
    thread.join(90)
    server.stop()


# ------------------------------------------------------------------------ tests


def test_reply_streams_in_steps_with_model_and_provider(tab: Tab) -> None:
    page = tab.page
    # Record every state of the reply as it changes, to see it grow while it streams.
    page.evaluate("""() => {
        window.__snapshots = [];
        const list = document.getElementById('message-list');
        new MutationObserver(() => {
            const reply = list.querySelector('.message.assistant');
            if (!reply) return;
            const text = reply.querySelector('.message-body').textContent;
            const streaming = reply.classList.contains('streaming');
            const last = window.__snapshots[window.__snapshots.length - 1];
            if (!last || last.text !== text || last.streaming !== streaming)
                window.__snapshots.push({text, streaming, at: performance.now()});
        }).observe(list, {subtree: true, childList: true, characterData: true, attributes: true});
    }""")
    message = "Stream this please #interval=0.3 #pieces=5"
    tab.input.fill(message)
    page.locator("#send-button").click()

    streaming = page.locator("#message-list .message.assistant.streaming")
    expect(streaming).to_have_count(1)
    expect(page.locator("body")).to_have_class(re.compile(r"\bis-streaming\b"))
    expect(page.locator("#stop-button")).to_be_visible()
    expect(page.locator("#send-button")).to_be_hidden()
    expect(page.locator("#message-list .message.user .message-body")).to_have_text(message)
    expect(tab.input).to_have_value("")
    expect(streaming.locator(".message-body")).not_to_have_text("")  # first pieces arrived...
    expect(streaming).to_have_count(1)                                  # ...and more are coming

    reply = tab.assistants.first
    expect(reply).not_to_have_class(re.compile(r"\bstreaming\b"))
    expect(reply.locator(".message-body")).to_have_text(f"Echo: {message}")
    expect(page.locator("#stop-button")).to_be_hidden()
    expect(page.locator("#send-button")).to_be_visible()
    expect(page.locator("body")).not_to_have_class(re.compile(r"\bis-streaming\b"))

    snapshots = page.evaluate("window.__snapshots")
    grown = [s["text"] for s in snapshots if s["streaming"] and s["text"]]
    assert len(grown) >= 3, f"the reply did not arrive in steps: {snapshots}"
    for shorter, longer in zip(grown, grown[1:]):
        assert longer.startswith(shorter) and len(longer) > len(shorter), grown
    assert f"Echo: {message}".startswith(grown[-1])
    streamed = [s["at"] for s in snapshots if s["streaming"] and s["text"]]
    assert streamed[-1] - streamed[0] >= 300, f"all pieces showed up at once: {snapshots}"

    # The meta line names the model (the one picked) and the provider.
    model = page.locator("#model-select").input_value()
    expect(reply.locator(".message-meta .meta-model")).to_have_text(model or re.compile(r"\S+"))
    expect(reply.locator(".message-meta .meta-provider")).to_have_text(re.compile(r"^[\w.-]+$"))
    expect(reply.locator(".badge.badge-cached")).to_have_count(0)

    # The conversation shows up in the sidebar, active, and names the chat.
    expect(tab.conversations).to_have_count(1)
    expect(tab.conversations.first).to_have_class(re.compile(r"\bactive\b"))
    expect(page.locator("#chat-title")).to_have_text(message)

    # A second turn with some Markdown, for the screenshot.
    second = tab.send("Some *Markdown*:\n\n- a **bold** point\n- `inline code`\n\nThanks")
    expect(second.locator(".message-body strong")).to_have_text("bold")
    expect(second.locator(".message-body code")).to_have_text("inline code")
    expect(second.locator(".message-body li")).to_have_count(2)
    expect(tab.conversations).to_have_count(1)  # same conversation
    screenshot(page, "desktop-light.png")


def test_reload_finds_conversation_then_rename_and_delete(tab: Tab, live_server: Any) -> None:
    page = tab.page
    tab.send("Remember this conversation")
    expect(tab.conversations).to_have_count(1)
    client_id = tab.client_id()
    assert client_id

    page.reload()
    assert tab.client_id() == client_id  # same browser, same owner
    expect(tab.conversations).to_have_count(1)
    item = tab.conversations.first
    conv_id = item.get_attribute("data-id")
    expect(item.locator(".conversation-title")).to_have_text("Remember this conversation")
    expect(page.locator("#message-list .message")).to_have_count(0)  # a new chat until one is opened

    item.locator("button.conversation-open").click()
    expect(page.locator("#message-list .message.user .message-body")).to_have_text(
        "Remember this conversation")
    expect(tab.assistants.locator(".message-body")).to_have_text("Echo: Remember this conversation")
    expect(tab.assistants.locator(".meta-model")).not_to_have_text("")
    expect(page.locator("#chat-title")).to_have_text("Remember this conversation")
    server = api_get(live_server, "/api/conversations", client_id)["conversations"]
    assert [(c["id"], c["title"]) for c in server] == [(conv_id, "Remember this conversation")]

    # Rename: cancelling the prompt changes nothing; answering it renames everywhere.
    tab.answers.append(None)
    item.locator("button.rename-button").click()
    expect(item.locator(".conversation-title")).to_have_text("Remember this conversation")
    tab.answers.append("  Renamed in the browser  ")
    item.locator("button.rename-button").click()
    expect(tab.conversations.first.locator(".conversation-title")).to_have_text("Renamed in the browser")
    expect(page.locator("#chat-title")).to_have_text("Renamed in the browser")
    assert [d[0] for d in tab.dialogs] == ["prompt", "prompt"]
    server = api_get(live_server, "/api/conversations", client_id)["conversations"]
    assert [(c["id"], c["title"]) for c in server] == [(conv_id, "Renamed in the browser")]
    page.reload()
    expect(tab.conversations.first.locator(".conversation-title")).to_have_text("Renamed in the browser")

    # Delete: dismissing the confirm keeps it; accepting removes it from both sides.
    tab.answers.append(None)
    tab.conversations.first.locator("button.delete-button").click()
    expect(tab.conversations).to_have_count(1)
    assert len(api_get(live_server, "/api/conversations", client_id)["conversations"]) == 1
    tab.answers.append("")
    tab.conversations.first.locator("button.delete-button").click()
    expect(tab.conversations).to_have_count(0)
    expect(page.locator("#conversation-empty")).to_be_visible()
    assert [d[0] for d in tab.dialogs][-2:] == ["confirm", "confirm"]
    assert "Renamed in the browser" in tab.dialogs[-1][1]
    assert api_get(live_server, "/api/conversations", client_id)["conversations"] == []
    page.reload()
    expect(page.locator("#conversation-empty")).to_be_visible()
    expect(tab.conversations).to_have_count(0)
    expect(page.locator("#error-banner")).to_be_hidden()


def test_rate_limit_is_explained_and_keeps_the_typed_text(
        browser: Browser, limited_server: Any, tabs: list[Tab]) -> None:
    server = limited_server()
    tab = open_tab(browser, server.url)
    tabs.append(tab)
    tab.send("first")
    tab.send("second")
    expect(tab.page.locator("#error-banner")).to_be_hidden()

    tab.input.fill("third, one too many")
    tab.input.press("Enter")
    banner = tab.page.locator("#error-banner")
    expect(banner).to_be_visible()
    text = tab.page.locator("#error-text")
    expect(text).to_have_text(re.compile(r"too many.*\b\d+\s*(s|sec|seconds)\b", re.I))
    wait = int(re.search(r"(\d+)\s*(?:s|sec|seconds)\b", text.inner_text()).group(1))
    assert 1 <= wait <= 60
    assert not re.search(r"[{}]|rate_limited", text.inner_text())  # words, not JSON or codes
    expect(tab.input).to_have_value("third, one too many")
    expect(tab.assistants).to_have_count(2)  # the refused turn is not left on screen
    expect(tab.page.locator("#send-button")).to_be_visible()
    tab.page.locator("#error-dismiss").click()
    expect(banner).to_be_hidden()


def test_reply_with_html_renders_as_text(tab: Tab) -> None:
    page = tab.page
    payload = "Look <img src=x onerror=alert(1)> and <script>window.__xss=1</script> end"
    reply = tab.send(payload)

    def check() -> None:
        expect(reply.locator(".message-body")).to_contain_text("<img src=x onerror=alert(1)>")
        expect(reply.locator(".message-body")).to_contain_text("<script>window.__xss=1</script>")
        expect(page.locator("#message-list .message.user .message-body")).to_have_text(payload)
        assert page.locator("#message-list img").count() == 0
        assert page.locator("#message-list script").count() == 0
        assert page.evaluate("typeof window.__xss") == "undefined"
        assert tab.dialogs == []

    check()
    # Again from the stored history, which takes another path onto the page.
    page.reload()
    expect(tab.conversations).to_have_count(1)
    tab.conversations.first.locator("button.conversation-open").click()
    reply = tab.assistants.first
    expect(reply.locator(".message-body")).to_have_text(f"Echo: {payload}")
    expect(tab.conversations.first.locator(".conversation-title")).to_contain_text("<img src=x")
    check()


def test_upstream_failure_is_shown_in_words(tab: Tab) -> None:
    page = tab.page
    tab.input.fill("this will fail #fail=500")
    tab.input.press("Enter")
    banner = page.locator("#error-banner")
    expect(banner).to_be_visible()
    expect(banner).to_have_attribute("role", "alert")
    text = page.locator("#error-text")
    expect(text).to_have_text(re.compile(r"[A-Za-z].*(try again|provider|later)", re.I))
    assert not re.search(r"[{}\[\]]|upstream_error|Traceback|<html", text.inner_text())
    expect(page.locator("body")).not_to_have_class(re.compile(r"\bis-streaming\b"))
    expect(page.locator("#message-list .message.streaming")).to_have_count(0)
    expect(tab.input).to_have_value("this will fail #fail=500")  # nothing lost
    # The next message goes through and clears the error.
    tab.send("and this works")
    expect(banner).to_be_hidden()
    expect(tab.assistants.last.locator(".message-body")).to_have_text("Echo: and this works")


def test_model_picker_lists_server_models(tab: Tab, live_server: Any) -> None:
    page = tab.page
    listed = api_get(live_server, "/v1/models", tab.client_id())["data"]
    models = [m["id"] for m in listed]
    assert models
    options = page.locator("#model-select option")
    expect(options).to_have_text(models)
    assert [options.nth(i).get_attribute("value") for i in range(len(models))] == models

    # Picking another model of the default provider (the fake upstream) uses it and remembers it.
    default_provider = listed[0]["owned_by"]
    same = [m["id"] for m in listed[1:] if m["owned_by"] == default_provider]
    if same:
        page.locator("#model-select").select_option(same[-1])
        reply = tab.send("which model?")
        expect(reply.locator(".meta-model")).to_have_text(same[-1])
        expect(reply.locator(".meta-provider")).to_have_text(default_provider)
        page.reload()
        expect(page.locator("#model-select")).to_have_value(same[-1])

    # A model of another provider is asked of that provider (answered here without running it).
    other = next((m for m in listed if m["owned_by"] != default_provider), None)
    if other:
        page.locator("#model-select").select_option(other["id"])
        sent: list[Any] = []

        def capture(route: Route) -> None:
            sent.append(route.request.post_data_json)
            route.fulfill(status=429, headers={"Retry-After": "7", "Content-Type": "application/json"},
                          body=json.dumps({"success": False, "error": {
                              "code": "rate_limited", "message": "slow down"}}))

        page.route("**/api/chat", capture)
        tab.input.fill("asked of another provider")
        tab.input.press("Enter")
        expect(page.locator("#error-text")).to_contain_text("7 s")
        page.unroute("**/api/chat")
        assert sent and sent[0]["model"] == other["id"] and sent[0]["provider"] == other["owned_by"], sent


def test_enter_sends_and_shift_enter_adds_a_line(tab: Tab) -> None:
    page = tab.page
    tab.input.click()
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    expect(tab.input).to_have_value("line one\nline two")
    expect(page.locator("#message-list .message")).to_have_count(0)  # nothing sent yet
    page.keyboard.press("Enter")
    expect(page.locator("#message-list .message.user")).to_have_count(1)
    user_text = page.locator("#message-list .message.user .message-body").evaluate("n => n.textContent")
    assert user_text == "line one\nline two"
    expect(tab.input).to_have_value("")
    expect(tab.assistants).to_have_count(1)
    expect(tab.assistants.first).not_to_have_class(re.compile(r"\bstreaming\b"))
    expect(tab.assistants.first.locator(".message-body")).to_contain_text("line two")
    # Enter on a blank box sends nothing.
    page.keyboard.press("Enter")
    expect(page.locator("#message-list .message")).to_have_count(2)


def test_dark_theme(browser: Browser, live_server: Any, tabs: list[Tab]) -> None:
    tab = open_tab(browser, live_server.url, color_scheme="dark")
    tabs.append(tab)
    tab.send("Dark mode check with `code` and **bold**")
    expect(tab.conversations).to_have_count(1)
    background = tab.page.evaluate("getComputedStyle(document.body).backgroundColor")
    red, green, blue = (int(x) for x in re.findall(r"\d+", background)[:3])
    assert (0.2126 * red + 0.7152 * green + 0.0722 * blue) < 80, f"not a dark background: {background}"
    screenshot(tab.page, "desktop-dark.png")


def test_phone_layout_hides_the_sidebar_behind_a_toggle(
        browser: Browser, live_server: Any, tabs: list[Tab]) -> None:
    tab = open_tab(browser, live_server.url, viewport=PHONE, is_mobile=True, has_touch=True,
                   device_scale_factor=2)
    tabs.append(tab)
    page = tab.page
    sidebar, toggle = page.locator("#sidebar"), page.locator("#sidebar-toggle")
    expect(toggle).to_be_visible()
    expect(sidebar).to_be_hidden()
    expect(page.locator("#new-chat")).to_be_hidden()
    expect(tab.input).to_be_visible()
    expect(page.locator("#send-button")).to_be_visible()

    tab.send("Hello from a phone")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # no sideways scroll
    expect(sidebar).to_be_hidden()
    screenshot(page, "phone.png")

    toggle.click()
    expect(sidebar).to_be_visible()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    expect(tab.conversations).to_have_count(1)
    screenshot(page, "phone-sidebar.png")
    page.keyboard.press("Escape")
    expect(sidebar).to_be_hidden()
    expect(toggle).to_have_attribute("aria-expanded", "false")

    toggle.click()
    tab.conversations.first.locator("button.conversation-open").click()  # opening one closes it
    expect(sidebar).to_be_hidden()
    expect(tab.assistants.first.locator(".message-body")).to_have_text("Echo: Hello from a phone")
