"""The web page at GET /: static/index.html, static/app.js and static/style.css.

Fast (Flask test client): browsers get the page and every other client the short text; with API keys the
page and its files stay open while /predict does not; the page loads nothing from elsewhere and never puts
server text into innerHTML.

Slow: the page in headless Chromium (Debian's `chromium`, installed by scripts/setup.sh, driven by
Playwright; Playwright's own browser download is never used) against real gunicorn and ResNet50. A
photo chosen in the page shows exactly the five labels and percentages the service answered; a text
file shows the service's own error and status; with API keys, the 401 is shown until a key is entered.
Each state is saved as a screenshot under the test's tmp dir and copied to SCREENSHOTS.
"""

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from support import ROOT
from support.stand_in import StandInWorker
from support.traffic import same_answer, wait_for

import stack
from run_web_server import create_app

STATIC = ROOT / "static"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # the tests may run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]  # Playwright's launch() gives every browser a fresh temporary profile (--user-data-dir) of its own
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
SCREENSHOTS = Path(tempfile.gettempdir()) / "web-page-screenshots"  # a stable place to look at them
KEY = "k" * 8 + "0123456789abcdef"
TIMEOUT_MS = 60_000


def referenced_files() -> list[str]:
    """The src and href values in index.html (relative to the page at /)."""
    return re.findall(r'(?:src|href)="([^"]+)"', (STATIC / "index.html").read_text())


# --- Fast: content negotiation, open files, what the page may do ---------------------------------


@pytest.fixture
def make_app(redis_url, queue_name):
    return lambda **config: create_app({"REDIS_URL": redis_url, "IMAGE_QUEUE": queue_name} | config)


@pytest.mark.parametrize("accept", [BROWSER_ACCEPT, "text/html"], ids=["chromium", "text-html"])
def test_a_browser_gets_the_web_page(make_app, accept):
    response = make_app().test_client().get("/", headers={"Accept": accept})
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert response.get_data() == (STATIC / "index.html").read_bytes()
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]  # nothing from elsewhere runs
    assert "Accept" in response.headers["Vary"]


@pytest.mark.parametrize("accept", [None, "*/*", "text/plain", "application/json"])
def test_curl_and_other_clients_get_the_short_text(make_app, accept):
    headers = {"Accept": accept} if accept else {}
    response = make_app().test_client().get("/", headers=headers)
    assert response.status_code == 200 and response.mimetype == "text/plain"
    assert "curl -X POST -F image=@photo.jpg" in response.get_data(as_text=True)
    assert "Accept" in response.headers["Vary"]


def test_with_api_keys_the_page_and_its_files_are_open_and_predict_still_needs_a_key(make_app):
    client = make_app(API_KEYS=(KEY,)).test_client()
    assert client.get("/", headers={"Accept": BROWSER_ACCEPT}).mimetype == "text/html"
    types = {"static/app.js": "text/javascript", "static/style.css": "text/css"}
    assert sorted(referenced_files()) == sorted(types)
    for path, mimetype in types.items():
        response = client.get("/" + path)
        assert response.status_code == 200 and response.mimetype == mimetype, path
        assert response.get_data() == (ROOT / path).read_bytes()
    assert client.post("/predict").status_code == 401
    assert client.get("/static/missing.js").status_code == 404  # open, but only to the files that exist
    assert client.post("/static/../predict").status_code in (404, 405)  # the open prefix never reaches /predict


def test_the_page_loads_only_its_own_files_and_puts_server_text_in_through_text_content_only():
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"(https?:)?//[\w.-]+\.[a-z]{2,}", text), f"{path.name} refers to another site"
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", text), path.name
    for name in referenced_files():
        assert (ROOT / name).is_file(), name


# --- Slow: the page in headless Chromium against the real service ---------------------------------


@pytest.fixture(scope="module")
def served(make_module_stack):
    return make_module_stack.serve(REQUEST_TIMEOUT_S=60, GUNICORN_TIMEOUT_S=90)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium package")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Tab:
    """A page in a fresh browser context, with the script errors and console errors it produced."""

    page: object
    errors: list[str] = field(default_factory=list)

    def screenshot(self, tmp_path: Path, name: str) -> Path:
        path = tmp_path / name
        self.page.screenshot(path=path, full_page=True)
        SCREENSHOTS.mkdir(exist_ok=True)
        shutil.copy(path, SCREENSHOTS / name)
        print(f"screenshot: {SCREENSHOTS / name}")
        return path

    def watch_states(self) -> None:
        """Record every value #outcome's data-state takes, busy included, in window.states."""
        self.page.evaluate(
            """() => {
                const outcome = document.getElementById("outcome");
                window.states = [];
                new MutationObserver((records) => records.forEach((r) => window.states.push(r.oldValue)))
                    .observe(outcome, {attributes: true, attributeFilter: ["data-state"], attributeOldValue: true});
            }"""
        )

    def states(self) -> list:
        return self.page.evaluate("[...window.states, document.getElementById('outcome').dataset.state]")


@pytest.fixture
def tab(browser):
    context = browser.new_context(viewport={"width": 1000, "height": 720})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    t = Tab(page)
    page.on("pageerror", lambda error: t.errors.append(f"page error: {error}"))
    # An HTTP error status is logged as "Failed to load resource"; anything else (a CSP refusal, a script
    # error) is a fault of the page.
    page.on(
        "console",
        lambda m: m.type == "error" and not m.text.startswith("Failed to load resource") and t.errors.append(m.text),
    )
    yield t
    context.close()


def rows(page) -> list[dict]:
    """What the page shows for each prediction: label, percentage, and the bar's width as a track fraction."""
    return page.eval_on_selector_all(
        "#predictions li",
        """items => items.map((li) => ({
            label: li.querySelector(".label").textContent,
            percent: li.querySelector(".probability").textContent,
            bar: li.querySelector(".bar").getBoundingClientRect().width,
            track: li.querySelector(".track").getBoundingClientRect().width,
        }))""",
    )


def assert_shows(page, predictions: list[dict]) -> None:
    shown = rows(page)
    assert [r["label"] for r in shown] == [p["label"] for p in predictions]
    assert [r["percent"] for r in shown] == [f"{p['probability'] * 100:.2f}%" for p in predictions]
    for r, p in zip(shown, predictions, strict=True):  # bar length = probability (at least 2 px, to be seen)
        assert abs(r["bar"] - max(p["probability"] * r["track"], 2)) <= 1.5, (r, p)


@pytest.mark.slow
def test_a_chosen_photo_shows_five_bars_with_the_labels_and_percentages_predict_gives(served, tab, tmp_path):
    photo = ROOT / "images" / "chelsea.jpg"
    direct = requests.post(served.url + "predict", files={"image": (photo.name, photo.read_bytes())}, timeout=60)
    assert direct.status_code == 200, direct.text
    page = tab.page
    page.goto(served.url)
    assert page.title() == "Image classification"
    tab.watch_states()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "image"  # the file input is reachable by keyboard
    tab.screenshot(tmp_path, "page-start.png")

    with page.expect_response("**/predict") as answer:
        page.set_input_files("#image", photo)
    page.wait_for_selector("#outcome[data-state=done]")

    received = answer.value.json()["predictions"]
    assert page.locator("#predictions li").count() == 5
    assert_shows(page, received)  # exactly what the page received, and that is what curl gets too:
    assert same_answer(received, direct.json()["predictions"])
    assert tab.states() == [None, "busy", "done"]  # a busy state while waiting, then the answer
    assert page.get_attribute("#outcome", "aria-live") == "polite"
    assert page.get_attribute("#outcome", "aria-busy") == "false"
    timing = page.text_content("#timing")
    assert re.fullmatch(
        r"Answered in \d+ ms \(measured by this page\)\. Server: prepare [\d.]+ ms, wait [\d.]+ ms, "
        r"queue [\d.]+ ms, inference [\d.]+ ms \(batch of 1\), return [\d.]+ ms, total [\d.]+ ms\. "
        r"Request ID [0-9a-f]{32}\.",
        timing,
    ), timing
    assert page.eval_on_selector("#preview", "img => img.naturalWidth") == 451  # chelsea.jpg is 451 x 300
    assert page.is_hidden("#error") and page.is_hidden("#model-box")  # one model: nothing to pick
    tab.screenshot(tmp_path, "page-photo.png")
    assert tab.errors == []


@pytest.mark.slow
def test_a_text_file_shows_the_services_error_message_and_status(served, tab, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("These are notes, not a photo.\n")
    direct = requests.post(
        served.url + "predict", files={"image": (notes.name, notes.read_bytes(), "text/plain")}, timeout=60
    )
    assert direct.status_code == 400
    page = tab.page
    page.goto(served.url)
    tab.watch_states()

    page.set_input_files("#image", notes)
    page.wait_for_selector("#outcome[data-state=error]")

    assert page.is_visible("#error") and page.get_attribute("#error", "role") == "alert"
    assert page.text_content("#error .error-status") == "HTTP 400 BAD REQUEST"
    assert page.text_content("#error .error-message") == direct.json()["error"]
    assert page.locator("#predictions li").count() == 0
    assert page.is_hidden("#preview") and page.text_content("#file-name").startswith("notes.txt")
    assert tab.states() == [None, "busy", "error"]
    tab.screenshot(tmp_path, "page-error.png")
    assert tab.errors == []


@pytest.mark.slow
def test_with_api_keys_the_page_shows_the_401_until_a_key_is_entered_then_classifies(served, tab, tmp_path):
    """A second gunicorn with API_KEYS on the same queue, so the same model worker answers it."""
    port = stack.free_port()
    web = stack.start_web(served.env | {"WEB_PORT": str(port), "API_KEYS": KEY}, tmp_path / "web-keys.log")
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(lambda: requests.get(url + "healthz", timeout=10).ok, 60)
        page = tab.page
        page.goto(url)
        assert page.eval_on_selector("#drop-zone", "z => getComputedStyle(z).borderStyle") == "dashed"  # CSS
        assert page.text_content("#predict-url") == url + "predict"  # and the script ran: both served keyless
        photo = ROOT / "images" / "coffee.jpg"  # over 64 KB: the 401 comes before the body is read

        page.set_input_files("#image", photo)
        page.wait_for_selector("#outcome[data-state=error]")
        assert page.text_content("#error .error-status") == "HTTP 401 UNAUTHORIZED"
        assert "an API key is required" in page.text_content("#error .error-message")
        assert page.get_attribute("#key-box", "open") is not None  # the key field is opened for the user
        tab.screenshot(tmp_path, "page-api-key.png")

        page.fill("#api-key", KEY)
        page.click("#send")
        page.wait_for_selector("#outcome[data-state=done]")
        assert page.locator("#predictions li").count() == 5 and page.is_hidden("#error")
        assert page.evaluate("sessionStorage.getItem('image-classifier-api-key')") == KEY
        assert tab.errors == []
    finally:
        web.stop()


@pytest.mark.slow
def test_with_two_models_the_page_offers_a_picker_and_the_picked_model_answers(make_module_stack, redis_client, tab):
    """A gunicorn whose Redis has two models registered (stand-in workers in this process): the page lists
    both, and the photo goes to the one picked; with one model (the other tests) there is no picker."""
    two = make_module_stack()
    two.start_web()
    wait_for(lambda: requests.get(two.url + "healthz", timeout=10).ok, 60)
    with (
        StandInWorker(two.queue(redis_client, "alpha")) as alpha,
        StandInWorker(two.queue(redis_client, "beta")) as beta,
    ):
        page = tab.page
        page.goto(two.url)
        page.wait_for_selector("#model-box:not([hidden])")
        assert page.eval_on_selector_all("#model option", "options => options.map((o) => o.value)") == ["alpha", "beta"]
        page.select_option("#model", "beta")
        with page.expect_response("**/predict?model=beta") as answer:
            page.set_input_files("#image", ROOT / "images" / "chelsea.jpg")
        page.wait_for_selector("#outcome[data-state=done]")
        assert answer.value.status == 200 and (alpha.batches, beta.batches) == ([], [1])
        assert tab.errors == []
