"""Dashboard benchmark: the web page on a fleet of 1,000 backends, in headless Chromium.

The app is the real one (``create_app`` plus the dashboard's routes) over a real SQLite store and
the in-process bus; only the reconciler is replaced by a fixed snapshot of :data:`BACKENDS`
Ollama backends with :data:`MODELS` declared models each, every tenth backend failing and a
quarter of the pairs still missing, so every kind of cell is drawn. Chromium logs in like an
operator and, for each page, the script times one redraw of that page's data inside the page
(``performance.now()`` around the page's own ``update``), which is the work the browser repeats on
every refresh and every burst of progress events. The size of ``GET /state`` is reported too,
since the page reads it on every refresh.

Run ``python -m benchmarks --only dashboard``; needs ``chromium`` and ``chromedriver``.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from runtimestate.api import ApiContext, create_app
from runtimestate.bus import open_bus
from runtimestate.records import BackendInfo, ListModelResponse, LLMState
from runtimestate.store import open_store
from runtimestate.web import install_dashboard

__all__ = ["run"]

BACKENDS = 1_000
MODELS = 8
REPEATS = 7
PAGES = ("overview", "backends", "matrix", "downloads")
TOKEN = "benchmark-token-0123456789"


class _Snapshot:
    """A fixed fleet in place of the reconciler (the ``StateView`` the API reads)."""

    def __init__(self) -> None:
        names = [f"family{i}:{size}" for i, size in enumerate(("1b", "3b", "7b", "8b") * 2)]
        self.models = names[:MODELS]
        self._states: dict[str, LLMState] = {}
        for index in range(BACKENDS):
            name = f"node-{index:04d}"
            held = self.models if index % 4 else self.models[: MODELS // 2]
            self._states[name] = LLMState(
                id=name,
                name=name,
                models=tuple(self.models),
                pulled_models=tuple(ListModelResponse(name=m, model=m) for m in held),
                backend=BackendInfo(
                    id=name,
                    name=name,
                    base_url=f"http://10.0.{index // 250}.{index}",
                    type="ollama",
                ),
                error="cannot connect: connection refused" if index % 10 == 0 else "",
            )

    @property
    def version(self) -> int:
        return 1  # the snapshot never changes

    def get(self) -> Mapping[str, LLMState]:
        return self._states

    async def run_backend_cycle(self) -> None:
        return None

    async def plan_backend_cycle(self) -> Mapping[str, Any]:
        return {}


class _Server:
    def __init__(self, database: Path) -> None:
        self._database = database
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server: uvicorn.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        store = await open_store(f"sqlite:///{self._database}")
        bus = await open_bus(None)
        try:
            ctx = ApiContext(store=store, messenger=bus, token=TOKEN, state=_Snapshot())
            app = create_app(ctx)
            install_dashboard(app)
            config = uvicorn.Config(app, log_config=None, lifespan="off")
            self._server = uvicorn.Server(config)
            serving = asyncio.create_task(self._server.serve(sockets=[self._sock]))
            for _ in range(3000):  # uvicorn has no "started" event to wait on
                if self._server.started or serving.done():
                    break
                await asyncio.sleep(0.01)
            self._ready.set()
            await serving
        finally:
            await bus.close()
            await store.close()

    def __enter__(self) -> _Server:
        self._thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()


_TIME_PAGE = """
const name = arguments[0];
const runs = [];
for (let i = 0; i < arguments[1]; i++) {
  const started = performance.now();
  pages[name].update("");
  runs.push(performance.now() - started);
}
return runs;
"""


def _measure(url: str) -> dict[str, list[float]]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        raise SystemExit("the dashboard benchmark needs chromium and chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(url + "/ui")
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        timings: dict[str, list[float]] = {}
        for page in PAGES:
            driver.execute_script("window.location.hash = arguments[0]", f"#/{page}")
            for _ in range(300):
                # The page's own frame must be drawn (drawn names the page shown), not only
                # some page's: a page updates regions that only its frame has.
                shown = "return data.state !== null && drawn === arguments[0] + '/'"
                if driver.execute_script(shown, page):
                    break
                time.sleep(0.1)
            timings[page] = list(driver.execute_script(_TIME_PAGE, page, REPEATS))
        return timings
    finally:
        driver.quit()


def run() -> str:
    with tempfile.TemporaryDirectory() as tmp, _Server(Path(tmp) / "bench.db") as server:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        state = httpx.get(server.url + "/state", headers=headers, timeout=30)
        state.raise_for_status()
        size_kb = len(state.content) / 1000
        timings = _measure(server.url)
    rows = [
        f"| {page} | {statistics.median(runs):.1f} | {max(runs):.1f} |"
        for page, runs in timings.items()
    ]
    return "\n".join(
        [
            "## Dashboard",
            "",
            f"The web page on a synthetic fleet of {BACKENDS:,} Ollama backends with {MODELS} "
            "declared models each (every tenth failing, a quarter missing half their models), "
            "in headless Chromium. One redraw of a page's data, timed inside the page "
            f"(`performance.now()`), median and worst of {REPEATS}; the backends and matrix "
            'pages draw their first 200 rows (a "show more" button and the filter reach the '
            "rest).",
            "",
            f"`GET /state` for this fleet: {size_kb:,.0f} kB.",
            "",
            "| page | median ms | worst ms |",
            "| --- | ---: | ---: |",
            *rows,
            "",
        ]
    )


if __name__ == "__main__":
    print(run())
