"""The web page at / and the API docs at /docs in a real browser: Debian's chromium, driven by Playwright,
against the real server.

Locally the tests skip (saying why) when chromium or Playwright is missing; under CI they fail instead.
`make screenshot` runs the cat test with SCREENSHOT_TO=docs/screenshot.png: the README's picture.
"""

import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CAT_LABELS, ROOT, Server, b64, make_key, photo_path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
WRONG_KEY = "sk-" + "A" * 43  # well formed, but no such key
ELEMENT_TIMEOUT_MS = 60_000  # a busy CI machine; the test waits for elements, never for a time


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = find_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if chromium is None or sync_playwright is None:
        reason = ("no chromium on PATH (apt-get install chromium)" if chromium is None
                  else "Playwright is not installed (pip install -r requirements-dev.txt)")
        if os.environ.get("CI"):
            pytest.fail(f"the web page must be tested in CI: {reason}")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        # Playwright's own browser builds cannot be downloaded here: Debian's chromium, by its path.
        launched = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 900, "height": 720})
    opened = context.new_page()
    opened.set_default_timeout(ELEMENT_TIMEOUT_MS)
    requested: list[str] = []
    opened.on("request", lambda request: requested.append(request.url))
    opened.goto(server.url + "/")
    yield opened
    context.close()
    elsewhere = [url for url in requested if not url.startswith((server.url + "/", "blob:", "data:"))]
    assert not elsewhere, f"the page loaded something from elsewhere: {elsewhere}"


def new_key(server: Server, **limits: int) -> str:
    """make_key in a thread of its own: Playwright's sync API keeps an event loop running in this one."""
    made: list[str] = []
    worker = threading.Thread(target=lambda: made.append(make_key(server.database_url, **limits)))
    worker.start()
    worker.join()
    return made[0]


def send(page: Any, key: str, path: Path) -> None:
    page.fill("#key", key)
    page.set_input_files("#file", str(path))


def error_text(page: Any) -> str:
    page.wait_for_selector("#error", state="visible")
    return page.text_content("#error")


def test_the_page_and_its_files_are_served_with_a_policy_that_keeps_them_local(server):
    """No browser needed: this one runs everywhere."""
    with server.client() as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
        linked = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert linked and all(url.startswith("/static/") for url in linked), linked
        assert all(client.get(url).status_code == 200 for url in linked)
        assert "/" not in client.get("/openapi.json").json()["paths"]  # a page, not part of the API


def test_the_page_names_its_icon_so_browsers_ask_for_no_favicon_ico(server):
    """Without one the browser asked for /favicon.ico, and its console showed the 404."""
    with server.client() as client:
        page = client.get("/").text
        [icon] = re.findall(r'<link rel="icon" href="([^"]+)"', page)
        served = client.get(icon)
    assert served.status_code == 200 and served.headers["content-type"].startswith("image/")
    assert "ImageNet" not in page  # the model's labels, whichever they are


def test_a_cat_photo_shows_cat_labels_then_a_wrong_key_shows_why(page, server, tmp_path):
    send(page, new_key(server, rate_limit=100), photo_path("chelsea.png"))
    page.wait_for_selector("#result", state="visible")
    labels = page.locator("#predictions .name").all_text_contents()
    assert len(labels) == 5 and labels[0] in CAT_LABELS, labels
    assert "efficientnet_lite0" in page.text_content("#meta") and "ms" in page.text_content("#meta")
    assert page.text_content("#quota").startswith("Quota: 99 of 100 requests left")  # from X-RateLimit-*
    assert page.evaluate("document.getElementById('preview').naturalWidth") == 451  # the photo itself is shown
    page.locator("#usage-summary", has_text=re.compile(r"^1 request,")).wait_for()  # one: not "1 requests"
    page.screenshot(path=tmp_path / "cat.png", full_page=True)
    if target := os.environ.get("SCREENSHOT_TO"):
        page.screenshot(path=ROOT / target, full_page=True)

    send(page, WRONG_KEY, photo_path("chelsea.png"))
    assert "API key was not accepted" in error_text(page)
    assert page.is_hidden("#result")
    assert page.text_content("#quota") == ""  # the last key's quota is not left on show
    page.screenshot(path=tmp_path / "wrong-key.png", full_page=True)

    send(page, "sk-\u200b" + "A" * 43, photo_path("chelsea.png"))  # a zero-width space, pasted along with a key
    assert "does not look like a whole API key" in error_text(page)


def test_a_used_up_key_says_how_long_to_wait_and_a_text_file_is_not_an_image(page, server, tmp_path):
    key = new_key(server, rate_limit=2, window_s=600)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("shopping list: milk, eggs")
    send(page, key, not_an_image)
    assert "not an image the server can read" in error_text(page)
    assert page.text_content("#quota").startswith("Quota: 1 of 2")  # a refused image still used its slot
    page.set_input_files("#file", str(photo_path("coffee.png")))
    page.wait_for_selector("#result", state="visible")
    assert page.locator("#predictions .name").first.text_content() == "espresso"
    page.set_input_files("#file", str(photo_path("coffee.png")))
    message = error_text(page)
    assert "Too many requests with this key" in message and "seconds" in message
    assert any(word.isdigit() and int(word) > 500 for word in message.split()), message  # the window's wait


def test_the_minimum_confidence_is_sent_and_the_page_shows_what_the_api_returns(page, server):
    key = new_key(server)
    page.fill("#min-confidence", "30")
    send(page, key, photo_path("chelsea.png"))
    page.wait_for_selector("#result", state="visible")
    shown = page.locator("#predictions .percent").all_text_contents()
    assert 0 < len(shown) < 5 and all(float(text.split()[0]) >= 30 for text in shown), shown  # the cat: 38 %, 37 %
    assert page.is_hidden("#no-predictions")
    # What the API answers for the same minimum, label for label.
    with server.client(key) as client:
        answer = client.post("/v1/classify", files={"file": ("chelsea.png", photo_path("chelsea.png").read_bytes())},
                             data={"top_k": "5", "min_confidence": "0.3"}).json()
    assert page.locator("#predictions .name").all_text_contents() == [p["label"] for p in answer["predictions"]]

    page.fill("#min-confidence", "99")
    page.set_input_files("#file", str(photo_path("chelsea.png")))
    page.wait_for_selector("#no-predictions", state="visible")
    assert page.locator("#predictions li").count() == 0
    assert "No label is at least 99 % likely" in page.text_content("#no-predictions")
    page.fill("#min-confidence", "150")
    page.set_input_files("#file", str(photo_path("chelsea.png")))
    assert "from 0 to 100" in error_text(page)


DROP_FILE = """([base64, name]) => {
    const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    const dropped = new DataTransfer();
    dropped.items.add(new File([bytes], name, {type: "image/png"}));
    document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dropped, bubbles: true}));
}"""


def test_a_dropped_image_is_classified_and_the_key_kept_only_when_the_box_is_ticked(page, server):
    key = new_key(server)
    page.fill("#key", key)
    page.evaluate(DROP_FILE, [b64(photo_path("coffee.png").read_bytes()), "coffee.png"])
    page.wait_for_selector("#result", state="visible")
    assert page.locator("#predictions .name").first.text_content() == "espresso"
    assert page.evaluate("Object.keys(localStorage).length") == 0
    page.check("#remember")
    assert page.evaluate("localStorage.getItem('classify.apiKey')") == key
    page.reload()
    assert page.input_value("#key") == key and page.is_checked("#remember")
    page.uncheck("#remember")
    assert page.evaluate("Object.keys(localStorage).length") == 0


def test_the_last_hour_is_drawn_per_minute_with_its_p95(page, server, tmp_path):
    """After each answer the page reads /v1/usage for the last hour by the minute and draws it: a bar per minute
    whose height is its requests, and the p95 latency as a line."""
    key = new_key(server, rate_limit=100)
    for _ in range(2):
        send(page, key, photo_path("chelsea.png"))
        page.wait_for_selector("#result", state="visible")
    page.locator("#usage-summary", has_text=re.compile(r"^2 requests")).wait_for()  # the CSP forbids eval
    summary = page.text_content("#usage-summary")
    assert re.fullmatch(r"2 requests, 2 answered 200, 2 images; p95 [\d.]+ ms \(the line\)\.", summary), summary
    bars = page.locator("#usage-chart rect.requests")
    assert bars.count() in (60, 61)  # the hour, rounded out to whole minutes
    counts = [int(bars.nth(index).get_attribute("data-requests")) for index in range(bars.count())]
    assert sum(counts) == 2
    heights = [float(bars.nth(index).get_attribute("height")) for index in range(bars.count())]
    assert all((height > 0) == (count > 0) for height, count in zip(heights, counts))
    assert page.locator("#usage-chart polyline.p95").get_attribute("points").strip()
    page.screenshot(path=tmp_path / "usage.png", full_page=True)


def test_the_api_docs_render_with_nothing_from_elsewhere(browser, server):
    """FastAPI's own /docs loads Swagger UI from a CDN: offline, a blank page. Here every other origin is cut off
    (as offline), and the page must still show the operations, having asked nothing of anyone else."""
    context = browser.new_context()
    elsewhere: list[str] = []
    blocked_by_policy: list[str] = []
    context.route(lambda url: not url.startswith(server.url + "/"),
                  lambda route: (elsewhere.append(route.request.url), route.abort()))
    page = context.new_page()
    page.set_default_timeout(ELEMENT_TIMEOUT_MS)
    page.on("console", lambda message: blocked_by_policy.append(message.text)
            if "Content Security Policy" in message.text else None)
    page.goto(server.url + "/docs")
    page.wait_for_selector('.opblock-summary-path[data-path="/v1/classify"]', state="visible")
    assert page.locator(".opblock-summary-path").count() >= 6  # classify, usage, models, healthz, readyz, metrics
    context.close()
    assert not elsewhere and not blocked_by_policy, (elsewhere, blocked_by_policy)
