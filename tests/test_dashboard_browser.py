"""The web dashboard in a real headless Chromium, driving ``runtimestate serve --demo``.

One service (the demo fleet: three emulated Ollama nodes, one node that is down, one model that
a node refuses) and one browser serve the whole module, because starting Chromium costs seconds.
The browser logs in once; the tests then act as an operator would, by clicking and reading the
page, and compare what the page shows with ground truth from outside the page: the API's JSON,
and the emulator's own count of pull streams whose client went away (its control API).

Each test saves a screenshot at 1280x800 under ``test-artifacts/screenshots`` (ignored by git), so
a person can look at what the page showed. The browser's console is read after every test: a
JavaScript error fails it.

Chromium and chromedriver come from the distribution's packages (``.ci/run`` installs them).
Without them the module is skipped with the reason, except under ``CI=true``, where that is a
failure - like PostgreSQL and NATS.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from runtimestate.demo import DOWN_NODE, REFUSED_MODEL, REFUSING_NODE
from tests.cli_service import ServiceProcess, cli_env, restartable_port, start_service
from tests.fixtures.polling import eventually_sync

# Chromium's driver: it has the browser log (``get_log``) that the generic WebDriver lacks.
WebDriver = webdriver.Chrome

SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"
WAIT = 30.0
PULL_SECONDS = "12"


def _browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    reason = "headless Chromium and chromedriver are not installed (apt-get install chromium "
    reason += "chromium-driver)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"the browser tests are required under CI=true: {reason}")
    pytest.skip(reason)


# The page and the service move on their own; an element redrawn while it was read is "not yet".
on_page = functools.partial(eventually_sync, within=WAIT, ignore=(StaleElementReferenceException,))


class Demo:
    """The demo service subprocess, restartable on its port, with its token and emulator."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.port = restartable_port()
        self.process: ServiceProcess | None = None
        self.start()

    def start(self) -> None:
        self.process = start_service(
            data_dir=self.data_dir,
            log_path=self.root / "service.log",
            # Two workers for three nodes: one node's pull waits in the queue at any time.
            extra=(
                "--demo",
                "--interval",
                "0.5",
                "--workers",
                "2",
                "--demo-pull-seconds",
                PULL_SECONDS,
            ),
            # A refused pull is tried again only after ten minutes: within a test, a new pull
            # request at the emulator is the Retry button's doing.
            env=cli_env(
                url="http://unused",
                data_dir=self.data_dir,
                RUNTIMESTATE_PULL_BACKOFF_INITIAL="600",
                RUNTIMESTATE_PULL_BACKOFF_MAX="1200",
            ),
            port=self.port,
        )
        self.token = (self.data_dir / "token").read_text().strip()

    def stop(self) -> None:
        assert self.service.stop() == 0, self.service.log_tail()

    @property
    def service(self) -> ServiceProcess:
        assert self.process is not None
        return self.process

    @property
    def url(self) -> str:
        return self.service.url

    def api(self, path: str, method: str = "GET", **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.request(method, self.url + path, headers=headers, timeout=10, **kwargs)

    def emulator_url(self) -> str:
        """Where the emulator listens (its URL is in the service's log of this run)."""
        text = (self.root / "service.log").read_text()
        return str(re.findall(r"demo: emulated Ollama nodes at (\S+)", text)[-1])

    def emulator(self) -> dict[str, dict[str, Any]]:
        """The emulator's own listing: each node with its counters."""
        listing = httpx.get(f"{self.emulator_url()}/_emulator/backends", timeout=10).json()
        return {entry["name"]: entry for entry in listing}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    _browser_binaries()
    running = Demo(tmp_path_factory.mktemp("dashboard"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser(demo: Demo) -> Iterator[WebDriver]:
    chromium, chromedriver = _browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,800")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=ChromeService(chromedriver), options=options)
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
    )
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        driver.get(demo.url + "/ui")
        driver.find_element(By.ID, "token").send_keys(demo.token)
        driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        on_page(lambda: driver.find_elements(By.ID, "ov-backends"), what="the overview after login")
        yield driver
    finally:
        driver.quit()


@pytest.fixture(autouse=True)
def console_and_screenshot(
    request: pytest.FixtureRequest, browser: WebDriver
) -> Iterator[list[dict[str, Any]]]:
    """Every test leaves a screenshot, and fails on a JavaScript error in the console."""
    browser_log(browser)  # drop what earlier tests left
    seen: list[dict[str, Any]] = []
    yield seen
    browser.save_screenshot(str(SCREENSHOTS / f"{request.node.name}.png"))
    seen.extend(browser_log(browser))
    allowed_network = request.node.get_closest_marker("network_errors_expected") is not None
    errors = [
        entry
        for entry in seen
        if entry["level"] in ("SEVERE", "WARNING")
        and not (allowed_network and entry.get("source") == "network")
    ]
    assert not errors, f"browser console: {errors}"


def browser_log(browser: WebDriver) -> list[dict[str, Any]]:
    """What the page wrote to the console (and failed requests) since the last call."""
    entries: list[dict[str, Any]] = browser.execute("getLog", {"type": "browser"})["value"]
    return entries


def visit(browser: WebDriver, page: str) -> None:
    browser.execute_script("window.location.hash = arguments[0]", f"#/{page}")
    on_page(
        lambda: browser.find_elements(By.CSS_SELECTOR, f'nav a[data-page="{page}"][aria-current]'),
        what=f"the {page} page",
    )


def click(browser: WebDriver, selector: str, what: str) -> None:
    """Click the element ``selector`` finds. The page is redrawn as data arrives: an element
    found may be replaced before the click, which then reaches nothing and is tried again."""

    def clicked() -> bool:
        browser.find_element(By.CSS_SELECTOR, selector).click()
        return True

    on_page(clicked, what=f"{what} clicked")


def text_of(browser: WebDriver, element_id: str) -> str:
    found = browser.find_elements(By.ID, element_id)
    return found[0].text if found else ""


# ---- tests, in the order an operator meets the dashboard ---------------------------------
def test_login_sets_a_strict_http_only_cookie_and_a_wrong_token_is_refused(
    demo: Demo, browser: WebDriver
) -> None:
    cookie = browser.get_cookie("runtimestate_session")
    assert cookie is not None
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert browser.execute_script("return document.cookie") == "", "scripts must not see it"
    # The API accepts the cookie for reads, but a change without the CSRF header is refused.
    jar = {"runtimestate_session": cookie["value"]}
    assert httpx.get(demo.url + "/state", cookies=jar, timeout=10).status_code == 200
    forged = httpx.post(demo.url + "/state/sync", cookies=jar, timeout=10)
    assert forged.status_code == 403, forged.text
    wrong = httpx.post(demo.url + "/ui/login", data={"token": "not-the-token"}, timeout=10)
    assert wrong.status_code == 401
    assert "not the admin token" in wrong.text


def test_overview_numbers_equal_the_apis(demo: Demo, browser: WebDriver) -> None:
    visit(browser, "overview")

    def agree() -> tuple[dict[str, str], dict[str, str]] | None:
        state = demo.api("/state").json()
        queue = demo.api("/queue").json()
        declared = {m for entry in state for m in entry.get("models", ())}
        # Newer services list every pull task with its status; older ones what waits or runs.
        statuses = [
            item.get("status") or ("running" if item["running"] else "queued") for item in queue
        ]
        expected = {
            "ov-backends": str(len(state)),
            "ov-models": str(len(declared)),
            "ov-health-error": str(sum(1 for entry in state if entry.get("error"))),
            "ov-running": str(statuses.count("running")),
            "ov-queued": str(statuses.count("queued")),
        }
        shown = {key: text_of(browser, key) for key in expected}
        return (shown, expected) if shown == expected else None

    shown, _ = on_page(agree, what="the overview to show the API's numbers")
    assert shown["ov-backends"] == "4"
    assert shown["ov-health-error"] == "1", "the demo's down node"
    # Which replica leads and which are alive, as /cluster says.
    cluster = demo.api("/cluster").json()

    def replicas() -> list[list[str]] | None:
        rows = browser.find_elements(By.CSS_SELECTOR, '[data-region="replicas"] tbody tr')
        cells = [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]
        return cells or None

    rows = on_page(replicas, what="the replicas table")
    assert [row[:3] for row in rows] == [
        [r["instance"], "leader" if r["instance"] == cluster["leader"] else "replica", "yes"]
        for r in cluster["replicas"]
    ]
    # How long ago the leader last confirmed the snapshot, and how long its cycle took.
    on_page(
        lambda: re.fullmatch(
            r"confirmed by the leader \d+ s ago, took \d+(\.\d+)? m?s", text_of(browser, "ov-cycle")
        ),
        what="the last cycle's age and duration",
    )


def test_the_cancel_button_stops_a_running_pull(demo: Demo, browser: WebDriver) -> None:
    visit(browser, "downloads")
    running = "li.download.running"

    def an_early_pull() -> str | None:
        # A pull in its first half, so that the cancel reaches it before it ends by itself.
        for row in browser.find_elements(By.CSS_SELECTOR, running):
            for bar in row.find_elements(By.CSS_SELECTOR, "progress[value]"):
                value, top = bar.get_attribute("value"), bar.get_attribute("max")
                if value is not None and top and float(value) < float(top) / 2:
                    return str(row.get_attribute("data-backend"))
        return None

    def cancel_one() -> bool:
        node = on_page(an_early_pull, what="a running pull in its first half", within=60)
        before = demo.emulator()[node]["streams_abandoned"]
        button = f'{running}[data-backend="{node}"] button[data-act="cancel"]'
        try:
            browser.find_element(By.CSS_SELECTOR, button).click()
        except (NoSuchElementException, StaleElementReferenceException):
            return False  # redrawn under the pointer, or ended: take the next one
        try:
            on_page(
                lambda: demo.emulator()[node]["streams_abandoned"] > before,
                what=f"the emulator to see the pull on {node} abandoned",
                within=15,
                every=0.2,
            )
        except AssertionError:
            return False  # the click reached a pull that had just ended: take the next one
        return True

    # Ground truth at the emulator: the pull's stream was closed by its client.
    assert any(cancel_one() for _ in range(3)), "no cancel closed a pull's stream"


def test_a_pull_moves_from_queued_to_a_percent_to_present_in_the_matrix(
    demo: Demo, browser: WebDriver
) -> None:
    visit(browser, "matrix")

    def queued_cell() -> tuple[str, str] | None:
        for cell in browser.find_elements(By.CSS_SELECTOR, 'td.cell[data-status="queued"]'):
            pair = str(cell.get_attribute("data-backend")), str(cell.get_attribute("data-model"))
            if pair != (REFUSING_NODE, REFUSED_MODEL):  # that one goes from queued to failed
                return pair
        return None

    node, model = on_page(queued_cell, what="a queued pull")
    selector = f'td.cell[data-backend="{node}"][data-model="{model}"]'

    def cell_text() -> str:
        return str(browser.find_element(By.CSS_SELECTOR, selector).text)

    percent = on_page(
        lambda: re.fullmatch(r"pulling (\d+) %", cell_text()),
        what=f"{model} pulling with a percent",
    )
    assert 0 <= int(percent.group(1)) <= 100
    on_page(lambda: cell_text() == "present", what=f"{model} present on {node}")
    # Ground truth: the node really holds it.
    tags = httpx.get(demo.emulator()[node]["base_url"] + "/api/tags", timeout=10)
    assert model in {m["name"] for m in tags.json()["models"]}


def test_the_retry_button_pulls_a_refused_model_again(demo: Demo, browser: WebDriver) -> None:
    visit(browser, "downloads")
    row = f'li.download.failed[data-backend="{REFUSING_NODE}"][data-model="{REFUSED_MODEL}"]'
    on_page(
        lambda: browser.find_elements(By.CSS_SELECTOR, f'{row} button[data-act="retry"]'),
        what="the refused model failed, with a Retry button",
        within=60,
    )

    def pulls() -> int:
        asked: dict[str, int] = demo.emulator()[REFUSING_NODE]["pull_requests"]
        return asked.get(REFUSED_MODEL, 0)

    before = pulls()
    assert before >= 1, "the refused model was pulled and refused"
    click(browser, f'{row} button[data-act="retry"]', "the Retry button")
    # Ground truth at the emulator: a new pull request for that model on that node (the next
    # automatic attempt is ten minutes away), which it refuses again.
    on_page(lambda: pulls() > before, what="a new pull request at the emulator", within=60)
    on_page(
        lambda: browser.find_elements(By.CSS_SELECTOR, f'{row} button[data-act="retry"]'),
        what="the refused model failed again",
        within=60,
    )
    assert not browser.find_elements(By.CSS_SELECTOR, f"{row} [data-error]:not([hidden])")


def test_backends_show_latency_and_each_backend_its_history_of_errors(
    demo: Demo, browser: WebDriver
) -> None:
    visit(browser, "backends")

    def latencies() -> dict[str, str] | None:
        shown = {
            str(row.get_attribute("data-backend")): row.find_element(
                By.CSS_SELECTOR, "td.latency"
            ).text
            for row in browser.find_elements(By.CSS_SELECTOR, "table#backends tbody tr")
        }
        expected = {
            entry["name"]: _seconds(entry["latencySeconds"]) for entry in demo.api("/state").json()
        }
        return shown if shown == expected else None

    shown = on_page(latencies, what="each backend's latency as the API gives it")
    assert all(text != "-" for text in shown.values()), shown
    # The down node's page: its history of errors, as the service keeps it.
    state = {entry["name"]: entry for entry in demo.api("/state").json()}
    down = state[DOWN_NODE]
    click(browser, f'tr[data-backend="{DOWN_NODE}"] th a', "the down node's link")
    served = demo.api(f"/state/{down['id']}/errors").json()["errors"]
    assert served, "the down node's error was recorded"
    assert served[0]["error"] == down["error"]

    def history() -> list[str] | None:
        items = browser.find_elements(By.CSS_SELECTOR, "#history li")
        return [str(item.get_attribute("data-error")) for item in items] or None

    assert on_page(history, what="the history of errors") == [c["error"] for c in served]
    browser.save_screenshot(str(SCREENSHOTS / "page-backend.png"))


def _seconds(value: float | None) -> str:
    """A latency as the dashboard shows it."""
    if value is None:
        return "-"
    if value < 1:
        return f"{round(value * 1000)} ms"
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def test_providers_show_which_backend_cools_down_and_until_when(
    demo: Demo, browser: WebDriver
) -> None:
    # Every node's chat fails (a fault armed at the emulator), so the gateway cools them down.
    nodes = [name for name in demo.emulator() if name != DOWN_NODE]
    for name in nodes:
        armed = httpx.post(
            f"{demo.emulator_url()}/_emulator/backends/ollama/{name}/faults",
            json={"fault": "fail", "status": 500, "path": "/api/chat"},
            timeout=10,
        )
        assert armed.status_code < 300, armed.text
    key = demo.api("/gateway/keys", "POST", json={"name": "browser-test"}).json()["key"]
    try:
        for _ in range(12):
            answer = httpx.post(
                demo.url + "/api/chat",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}]},
                timeout=30,
            )
            if answer.status_code == 503 and "cool" in answer.text:
                break
        else:
            raise AssertionError(f"no backend cooled down: {answer.status_code} {answer.text}")
    finally:
        for name in nodes:
            httpx.delete(
                f"{demo.emulator_url()}/_emulator/backends/ollama/{name}/faults", timeout=10
            )
    health = {entry["name"]: entry for entry in demo.api("/providers/health").json()}
    cooling = {
        name for name, entry in health.items() if (entry["routing"] or {}).get("coolingUntil")
    }
    assert cooling, health
    visit(browser, "providers")

    def cooldowns() -> dict[str, str] | None:
        rows = browser.find_elements(By.CSS_SELECTOR, "table#backend-health tbody tr")
        shown = {
            str(row.get_attribute("data-backend")): row.find_element(
                By.CSS_SELECTOR, "td.cooldown"
            ).text
            for row in rows
        }
        return shown if set(shown) == set(health) else None

    shown = on_page(cooldowns, what="one row per backend")
    assert {name for name, text in shown.items() if text != "-"} == cooling
    for name in cooling:
        until = health[name]["routing"]["coolingUntil"]
        local = browser.execute_script("return new Date(arguments[0]).toLocaleTimeString()", until)
        assert shown[name] == local


@pytest.mark.network_errors_expected
def test_an_invalid_form_shows_the_apis_error_inline(demo: Demo, browser: WebDriver) -> None:
    visit(browser, "actions")
    form = browser.find_element(By.ID, "add-backend")
    form.find_element(By.NAME, "name").send_keys("typo-node")
    form.find_element(By.NAME, "baseUrl").send_keys("not a url")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    said = demo.api(
        "/backends", "POST", json={"name": "typo-node", "baseUrl": "not a url", "type": "ollama"}
    )
    assert said.status_code in (400, 422)
    message = said.json()["error"]["message"]
    shown = on_page(
        lambda: form.find_element(By.CSS_SELECTOR, "[data-error]").text, what="the inline error"
    )
    assert shown == message
    assert form.find_element(By.NAME, "baseUrl").get_attribute("aria-invalid") == "true"


def test_every_page_shows_the_demo_fleet(demo: Demo, browser: WebDriver) -> None:
    """One screenshot per page while pulls run; the refused model and the down node are
    visible where they belong."""
    # The demo's first pulls may be over by now: every node loses a model (removed on the node
    # itself, as an operator might), so the next cycle pulls it again while the pages are shown.
    nodes = {name: entry["base_url"] for name, entry in demo.emulator().items()}
    for base_url in nodes.values():
        httpx.request(
            "DELETE", base_url + "/api/delete", json={"model": "qwen2.5:0.5b"}, timeout=10
        )
    visit(browser, "downloads")
    on_page(
        lambda: browser.find_elements(By.CSS_SELECTOR, "li.download.running progress[value]"),
        what="pulls running again",
        within=60,
    )
    for page in ("overview", "backends", "matrix", "downloads", "plan", "providers", "actions"):
        visit(browser, page)
        time.sleep(0.3)
        browser.save_screenshot(str(SCREENSHOTS / f"page-{page}.png"))
    visit(browser, "backends")
    down = on_page(
        lambda: browser.find_elements(By.CSS_SELECTOR, f'tr[data-backend="{DOWN_NODE}"]'),
        what="the down node's row",
    )
    assert "error" in down[0].text
    visit(browser, "matrix")
    refused = f'td.cell[data-backend="{REFUSING_NODE}"][data-model="{REFUSED_MODEL}"]'
    on_page(
        lambda: (
            browser.find_element(By.CSS_SELECTOR, refused).get_attribute("data-status") == "failed"
        ),
        what="the refused model failing on its node",
        within=60,
    )
    # The down node's cells say why its models are not there: the node, not the models.
    down_cells = browser.find_elements(By.CSS_SELECTOR, f'td.cell[data-backend="{DOWN_NODE}"]')
    assert down_cells
    assert {cell.get_attribute("data-status") for cell in down_cells} == {"unreachable"}
    # Dark mode: the page follows the system's colour scheme.
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
    )
    try:
        background = browser.execute_script(
            "return getComputedStyle(document.body).backgroundColor"
        )
        assert background == "rgb(20, 20, 23)", background
        browser.save_screenshot(str(SCREENSHOTS / "page-matrix-dark.png"))
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    # Keyboard: the skip link first, then the pages; Enter opens one.
    visit(browser, "overview")
    browser.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
    keys = ActionChains(browser)
    keys.send_keys(Keys.TAB).perform()
    assert browser.switch_to.active_element.text == "Skip to content"
    keys.send_keys(Keys.TAB, Keys.TAB).perform()
    assert browser.switch_to.active_element.get_attribute("data-page") == "backends"
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    on_page(
        lambda: browser.find_elements(By.CSS_SELECTOR, "table#backends"), what="the backends page"
    )
    browser.set_window_size(390, 844)
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True},
    )
    try:
        visit(browser, "overview")
        time.sleep(0.3)
        browser.save_screenshot(str(SCREENSHOTS / "page-overview-phone.png"))
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= 390, "the overview must not scroll sideways at phone width"
    finally:
        browser.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
        )


@pytest.mark.network_errors_expected
def test_the_page_recovers_by_itself_after_a_service_restart(
    demo: Demo, browser: WebDriver
) -> None:
    visit(browser, "overview")
    on_page(lambda: text_of(browser, "live") == "live", what="the live indicator")
    demo.stop()
    on_page(
        lambda: browser.find_element(By.ID, "live").get_attribute("data-state") == "reconnecting",
        what="the page to say it is reconnecting",
    )
    assert "reconnecting" in text_of(browser, "live")
    browser.save_screenshot(str(SCREENSHOTS / "reconnecting.png"))
    demo.start()
    on_page(lambda: text_of(browser, "live") == "live", what="the page to reconnect")
    # Fresh data after the restart, without a reload: the demo's nodes are there again.
    on_page(lambda: text_of(browser, "ov-backends") == "4", what="the overview after the restart")
    assert not browser.find_elements(By.ID, "token"), "the restart must not log the browser out"
