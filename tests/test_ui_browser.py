"""
Drives the browser chat UI (nanochat/serving/ui.html) in headless Chromium: streaming, sliders, slash
commands, edit/regenerate, error display, the API-key field and the 360px phone layout.

run_ui_checks() only relies on the HTTP contract of GET / and POST /chat/completions, so it works against
any server. Here it runs against the real server; error and auth cases are produced with Playwright
request routing, so they need no special server setup. Skips when playwright or a Chromium binary is missing.
"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.server_utils import RunningServer, make_chat_checkpoint

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

UI_PATH = Path(__file__).resolve().parent.parent / "nanochat" / "serving" / "ui.html"
PLACEHOLDER = "/*__NANOCHAT_UI_CONFIG__*/null"
REPLY_TIMEOUT_MS = 60_000  # generous for a real model on a busy CPU
NOT_BUSY = "document.body.dataset.busy === 'false'"


@pytest.fixture(scope="module")
def ui_server_url(tmp_path_factory):
    """The real server (scripts.chat_web, no API keys) with a tiny checkpoint made here."""
    base_dir = tmp_path_factory.mktemp("ui_base")
    make_chat_checkpoint(str(base_dir))
    # short replies keep multi-turn conversations of this model's garbage text inside its 1024-token context
    with RunningServer(base_dir, "--max-tokens", "48") as server:
        yield server.url


# ---------------------------------------------------------------------------------------------------------
# Browser

def find_chromium():
    for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if os.path.exists(path):
            return path
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        path = find_chromium()
        if path is None and os.path.exists(p.chromium.executable_path):
            path = p.chromium.executable_path  # Playwright's own download, if present
        if path is None:
            pytest.skip("no Chromium found (/usr/bin/chromium, chromium-browser, or `playwright install chromium`)")
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    yield page
    context.close()


# ---------------------------------------------------------------------------------------------------------
# The checks

def served_config(html):
    """The JSON the server substituted for the placeholder (None if it didn't)."""
    start = html.index("const SERVER = ") + len("const SERVER = ")
    return json.JSONDecoder().raw_decode(html, start)[0]


def messages(page, role=None):
    selector = ".message" if role is None else f'.message[data-role="{role}"]'
    return page.locator(f"#messages {selector}")


def texts(page, role):
    return messages(page, role).locator(".content").all_text_contents()


def turns(page):
    """User and assistant messages (notices, e.g. "cut off at the token limit", are not turns)."""
    return messages(page, "user").count() + messages(page, "assistant").count()


def send(page, text, requests):
    """Type and send a message with Enter; wait for the reply; return the request body the UI sent."""
    before = len(requests)
    page.evaluate("window.__lengths = []")
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(NOT_BUSY, timeout=REPLY_TIMEOUT_MS)
    assert len(requests) == before + 1, "exactly one request per message"
    return requests[-1]


def watch_reply_growth(page):
    """Records the length of the newest assistant bubble on every DOM change, to prove it streams."""
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const bubbles = document.querySelectorAll('.message[data-role="assistant"] .content');
            if (bubbles.length) window.__lengths.push(bubbles[bubbles.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")


def command(page, text, requests):
    """Run a slash command; return the newest notice. Commands must never reach the server."""
    before_requests, before_notices = len(requests), messages(page, "notice").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    assert page.input_value("#input") == "", "a command clears the input"
    assert len(requests) == before_requests, f"{text!r} was sent to the server"
    if text.strip() == "/clear":
        return None
    assert messages(page, "notice").count() == before_notices + 1, f"{text!r} showed no notice"
    return messages(page, "notice").last.text_content()


def slider(page, name):
    return float(page.input_value(f"#{name}")), float(page.text_content(f"#{name}-value"))


def check_sliders_and_commands(page, config, requests):
    page.click("#sampling-toggle")
    assert page.is_visible("#sampling-panel")
    assert page.get_attribute("#sampling-toggle", "aria-expanded") == "true"
    for name, key in (("temperature", "temperature"), ("top-k", "top_k"), ("top-p", "top_p")):
        assert slider(page, name) == (config[key]["default"],) * 2, f"{name} starts at the server default"
        # Keyboard moves the slider one step, like a user dragging it; the label must follow.
        bounds = config[key]
        arrow = "ArrowLeft" if bounds["default"] >= bounds["max"] else "ArrowRight"
        page.focus(f"#{name}")
        page.keyboard.press(arrow)
        expected = bounds["default"] + (bounds["step"] if arrow == "ArrowRight" else -bounds["step"])
        value, label = slider(page, name)
        assert value == pytest.approx(expected) and label == pytest.approx(expected), name
    assert float(page.get_attribute("#top-p", "min")) > 0, "top_p = 0 is rejected by the server, so not selectable"

    body = send(page, "Hello there", requests)
    assert body["temperature"] == pytest.approx(slider(page, "temperature")[0])
    assert body["top_k"] == int(slider(page, "top-k")[0]) and isinstance(body["top_k"], int)
    assert body["top_p"] == pytest.approx(slider(page, "top-p")[0])

    for name, key, cmd in (("temperature", "temperature", "/temperature"), ("top-k", "top_k", "/topk"),
                           ("top-p", "top_p", "/topp")):
        bounds = config[key]
        steps = round((bounds["max"] - bounds["min"]) / bounds["step"])
        target = round(bounds["min"] + bounds["step"] * (steps // 3), 6)
        target_text = str(int(target)) if bounds["step"] >= 1 else str(target)
        notice = command(page, f"{cmd} {target_text}", requests)
        assert slider(page, name) == (pytest.approx(target), pytest.approx(target)), f"{cmd} sets the slider"
        assert page.text_content(f"#{name}-value") in notice
        notice = command(page, cmd, requests)
        assert page.text_content(f"#{name}-value") in notice, f"bare {cmd} shows the current value"
        notice = command(page, f"{cmd} {bounds['max'] + 10}", requests)
        assert "range" in notice or "from" in notice, f"out-of-range {cmd} explains the range: {notice!r}"
        assert slider(page, name)[0] == pytest.approx(target), "a rejected value leaves the slider alone"
    assert "from" in command(page, "/topp 0", requests), "top_p = 0 is refused"
    assert "nonsense" in command(page, "/topk nonsense", requests)
    assert "Unknown" in command(page, "/frobnicate", requests)
    help_text = command(page, "/help", requests)
    for cmd in ("/temperature", "/topk", "/topp", "/clear", "/help"):
        assert cmd in help_text
    command(page, "/clear", requests)
    assert messages(page).count() == 0, "/clear empties the conversation"

    body = send(page, "after the change", requests)
    assert body["temperature"] == pytest.approx(slider(page, "temperature")[0]), "command values reach the request"
    assert body["top_k"] == int(slider(page, "top-k")[0])
    assert body["top_p"] == pytest.approx(slider(page, "top-p")[0])
    command(page, "/clear", requests)


def check_chat(page, requests):
    page.fill("#input", "line one")
    page.press("#input", "Shift+Enter")
    page.type("#input", "line two")
    assert page.input_value("#input") == "line one\nline two", "Shift+Enter adds a newline"
    assert not requests, "Shift+Enter must not send"
    page.fill("#input", "")

    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    assert page.evaluate("document.body.dataset.busy") == "true"
    assert page.is_disabled("#send") and page.is_enabled("#stop"), "sending is blocked while a reply streams"
    page.wait_for_function(NOT_BUSY, timeout=REPLY_TIMEOUT_MS)
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    assert requests[-1]["messages"] == [{"role": "user", "content": "Hello there"}]
    assert texts(page, "user") == ["Hello there"]
    [reply] = texts(page, "assistant")
    lengths = page.evaluate("window.__lengths")
    assert reply.strip(), "the reply text appears"
    assert len({n for n in lengths if n > 0}) >= 2 and lengths == sorted(lengths), f"reply grows as it streams: {lengths}"
    assert lengths[-1] == len(reply)
    assert messages(page, "error").count() == 0


def check_edit_and_regenerate(page, requests):
    send(page, "first question", requests)
    send(page, "second question", requests)
    assert turns(page) == 4
    assert messages(page).locator(".regenerate").count() == 1, "only the last answer can be regenerated"
    assert messages(page, "assistant").last.locator(".regenerate").count() == 1
    first_answer = texts(page, "assistant")[0]

    before = len(requests)
    messages(page, "assistant").last.locator(".regenerate").click()
    page.wait_for_function(NOT_BUSY, timeout=REPLY_TIMEOUT_MS)
    assert len(requests) == before + 1
    assert [m["content"] for m in requests[-1]["messages"]] == ["first question", first_answer, "second question"]
    assert [m["role"] for m in requests[-1]["messages"]] == ["user", "assistant", "user"]
    assert turns(page) == 4 and texts(page, "assistant")[1].strip()

    messages(page, "user").first.locator(".edit").click()
    box = messages(page, "user").first.locator("textarea")
    assert box.input_value() == "first question", "editing starts from the current text"
    box.fill("first question, edited")
    messages(page, "user").first.locator(".save").click()
    page.wait_for_function(NOT_BUSY, timeout=REPLY_TIMEOUT_MS)
    assert requests[-1]["messages"] == [{"role": "user", "content": "first question, edited"}], "edit drops what followed"
    assert texts(page, "user") == ["first question, edited"]
    assert len(texts(page, "assistant")) == 1 and texts(page, "assistant")[0].strip()


def check_stop(page):
    page.fill("#input", "please give a long answer")
    page.press("#input", "Enter")
    page.wait_for_function('document.querySelectorAll(\'.message[data-role="assistant"]\').length > 1'
                           " || document.body.dataset.busy === 'false'", timeout=REPLY_TIMEOUT_MS)
    page.evaluate("document.getElementById('stop').click()")  # no-op if the reply already finished
    page.wait_for_function(NOT_BUSY, timeout=5000)
    assert messages(page, "error").count() == 0, "stopping is not an error"
    assert page.is_enabled("#send")


def check_errors(page):
    """Errors before and during streaming are shown, and the typed message is not lost."""
    turns_before = messages(page, "user").count()

    def too_many(route):
        route.fulfill(status=429, headers={"Retry-After": "7"}, content_type="application/json",
                      body=json.dumps({"error": {"message": "Rate limit exceeded", "type": "rate_limit_error",
                                                 "param": None, "code": None}}))
    page.route("**/chat/completions", too_many)
    page.fill("#input", "this one fails")
    page.press("#input", "Enter")
    page.wait_for_function(NOT_BUSY)
    assert "Rate limit exceeded" in messages(page, "error").last.text_content()
    assert page.input_value("#input") == "this one fails", "the failed message goes back to the input"
    assert messages(page, "user").count() == turns_before
    page.unroute("**/chat/completions")

    def breaks_midway(route):
        body = 'data: {"token": "Partial"}\n\ndata: {"error": {"message": "Model crashed"}}\n\n'
        route.fulfill(status=200, content_type="text/event-stream", body=body)
    page.route("**/chat/completions", breaks_midway)
    page.press("#input", "Enter")
    page.wait_for_function(NOT_BUSY)
    assert "Model crashed" in messages(page, "error").last.text_content()
    assert texts(page, "assistant")[-1] == "Partial", "the partial answer is kept"
    assert page.input_value("#input") == ""
    page.unroute("**/chat/completions")


def boxes_overlap(a, b, tolerance=0.5):
    return (a["x"] + a["width"] - tolerance > b["x"] and b["x"] + b["width"] - tolerance > a["x"]
            and a["y"] + a["height"] - tolerance > b["y"] and b["y"] + b["height"] - tolerance > a["y"])


def check_layout(page, width):
    page.set_viewport_size({"width": width, "height": 740})
    assert page.evaluate("document.documentElement.scrollWidth") <= width, "no horizontal scrolling"
    # Boxes of visible controls; those in the scrolled transcript are clipped to it (scrolled-away ones skipped).
    controls = page.evaluate("""() => {
        const clip = document.getElementById('messages').getBoundingClientRect();
        const out = [];
        for (const el of document.querySelectorAll('button, input, textarea, output, select')) {
            const style = getComputedStyle(el);
            let r = el.getBoundingClientRect();
            if (!r.width || !r.height || style.visibility === 'hidden') continue;
            let {left, top, right, bottom} = r;
            if (el.closest('#messages')) {
                left = Math.max(left, clip.left); top = Math.max(top, clip.top);
                right = Math.min(right, clip.right); bottom = Math.min(bottom, clip.bottom);
                if (right <= left || bottom <= top) continue;
            }
            out.push({id: el.id || el.className || el.tagName, x: left, y: top, width: right - left, height: bottom - top});
        }
        return out;
    }""")
    ids = {c["id"] for c in controls}
    for required in ("input", "send", "stop", "sampling-toggle", "temperature", "top-k", "top-p"):
        assert required in ids, f"#{required} is not visible at {width}px"
    for c in controls:
        assert c["x"] >= -0.5 and c["x"] + c["width"] <= width + 0.5, f"{c['id']} sticks out at {width}px: {c}"
    for i, a in enumerate(controls):
        for b in controls[i + 1:]:
            assert not boxes_overlap(a, b), f"{a['id']} overlaps {b['id']} at {width}px: {a} {b}"
    assert page.evaluate("document.getElementById('input').getBoundingClientRect().width") >= 120, "room to type"


def check_auth_and_layout(page, base_url, screenshot_path):
    """Pretend the server requires a key (rewriting its config in GET /) to see the key field and header."""
    def auth_required(route):
        response = route.fetch()
        html = re.sub(r'"auth_required"\s*:\s*false', '"auth_required": true', response.text())
        route.fulfill(response=response, body=html)
    page.route(base_url + "/", auth_required)
    page.goto(base_url + "/")
    assert page.is_visible("#api-key") and page.get_attribute("#api-key", "type") == "password"
    page.fill("#api-key", "sk-ui-test-0123456789")
    page.reload()
    assert page.input_value("#api-key") == "sk-ui-test-0123456789", "the key is remembered in localStorage"

    seen = {}

    def unauthorized(route):
        seen["authorization"] = route.request.headers.get("authorization")
        route.fulfill(status=401, content_type="application/json",
                      body=json.dumps({"error": {"message": "Invalid API key", "type": "authentication_error",
                                                 "param": None, "code": "invalid_api_key"}}))
    page.route("**/chat/completions", unauthorized)
    page.fill("#input", "who am I")
    page.press("#input", "Enter")
    page.wait_for_function(NOT_BUSY)
    assert seen["authorization"] == "Bearer sk-ui-test-0123456789"
    assert "Invalid API key" in messages(page, "error").last.text_content()
    assert page.input_value("#input") == "who am I"
    page.unroute("**/chat/completions")

    # A busy-looking screen for the layout check: key field, open panel, answers with their buttons, an error.
    page.press("#input", "Enter")
    page.wait_for_function(NOT_BUSY, timeout=REPLY_TIMEOUT_MS)
    page.click("#sampling-toggle")
    check_layout(page, 1200)
    page.screenshot(path=str(Path(screenshot_path).with_name(Path(screenshot_path).stem + "_wide.png")))
    check_layout(page, 360)
    page.screenshot(path=str(screenshot_path))
    assert Path(screenshot_path).stat().st_size > 0


def run_ui_checks(page, base_url, screenshot_path):
    base_url = base_url.rstrip("/")
    html = page.request.get(base_url + "/").text()
    assert PLACEHOLDER not in html, "the server must substitute its config for the placeholder"
    config = served_config(html)
    assert isinstance(config, dict), "GET / should carry the server's config"
    requests = []
    page.on("request", lambda r: requests.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    page.goto(base_url + "/")
    assert page.title() == "nanochat"
    assert page.is_hidden("#sampling-panel"), "the sampling panel starts collapsed"
    assert page.is_visible("#api-key") == bool(config.get("auth_required"))
    watch_reply_growth(page)

    check_chat(page, requests)
    check_sliders_and_commands(page, config, requests)
    check_edit_and_regenerate(page, requests)
    check_stop(page)
    check_errors(page)
    check_auth_and_layout(page, base_url, screenshot_path)


def test_ui_in_browser(page, ui_server_url, tmp_path):
    run_ui_checks(page, ui_server_url, tmp_path / "ui_360.png")


def test_ui_placeholder_fallback(page):
    """Opened straight from disk (no server), the page falls back to built-in defaults instead of breaking."""
    page.goto(UI_PATH.as_uri())
    assert page.text_content("#temperature-value") == "0.80"
    assert page.text_content("#top-k-value") == "50"
    assert page.text_content("#top-p-value") == "1.00"
    assert page.is_hidden("#api-key")
