"""The dashboards in headless Chromium: a real login, every page with data, charts drawn by
plotly.js, no console errors; screenshots go to test-artifacts/dashboards/.

The app is the production one (``create_app``) reading the ClickHouse 18.16 server through
clickhouse-driver, served by werkzeug on a free loopback port. Chromium is driven over the
DevTools protocol (websocket-client), which sees every console message, exception and
failed load (a CSP violation included).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from opentrack.workload import generate
from tests.test_analytics_world import (
    API_KEY,
    load_events,
    make_app,
    new_tag,
    pipeline_events,
    tagged,
)
from warehouse.engines import ServerEngine
from warehouse.schema import migrate

websocket = pytest.importorskip("websocket")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "dashboards"
START = "2032-06-01"  # the workload's weeks: no other test writes sends there
RANGE = f"from={START}&to=2032-06-28"
PAGES = {  # page -> charts it must draw
    "templates": 4, "subjects": 4, "sequences": 6, "follow-ups": 1, "timing": 3,
}


class Chromium:
    """Headless Chromium and one page, over the DevTools protocol."""

    def __init__(self, profile: Path, log: Path) -> None:
        self.log = log.open("wb")
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
             "--window-size=1400,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=self.log,
        )
        port = self._port(profile / "DevToolsActivePort")
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60,
                                              suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def _port(self, path: Path, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().strip():
                return int(path.read_text().split()[0])
            if self.process.poll() is not None:
                raise RuntimeError("chromium exited at start")
            time.sleep(0.05)
        raise TimeoutError("chromium did not open its DevTools port")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_event(self, method: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.ws.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                self.events.append(json.loads(self.ws.recv()))
            except websocket.WebSocketTimeoutException:
                break
            finally:
                self.ws.settimeout(60)
        raise TimeoutError(f"no {method} within {timeout} s")

    def _loaded_after(self, action: Any) -> None:
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        action()
        self.wait_event("Page.loadEventFired")

    def open(self, url: str) -> None:
        self._loaded_after(lambda: self.call("Page.navigate", url=url))

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=await_promise)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def submit(self, expression: str) -> None:
        """Run ``expression`` (a click that navigates) and wait for the next page."""
        self._loaded_after(lambda: self.evaluate(expression))

    def wait_for(self, expression: str, timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"never true: {expression}")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far (then cleared)."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append("console: " + " ".join(
                    str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                found.append("exception: " + json.dumps(params["exceptionDetails"])[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                found.append(f"log: {entry['text']} {entry.get('url', '')}")
        self.events = [e for e in self.events if not e.get("method", "").startswith(
            ("Runtime.console", "Runtime.exception", "Log."))]
        return found

    def screenshot(self, path: Path) -> None:
        metrics = self.call("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": metrics["width"], "height": metrics["height"],
                "scale": 1}
        data = self.call("Page.captureScreenshot", format="png", clip=clip,
                         captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.log.close()


@pytest.fixture(scope="module")
def site(clickhouse_server, tmp_path_factory) -> Iterator[str]:
    """A month of a realistic workload in the server, and the web app over it."""
    from werkzeug.serving import make_server

    engine = ServerEngine(clickhouse_server.url)
    migrate(engine)
    start_ms = int(datetime.fromisoformat(START).replace(tzinfo=UTC).timestamp() * 1000)
    workload = tagged(generate(4000, days=27, seed=2032, start_ms=start_ms), new_tag("br"),
                      names=False)
    load_events(engine, pipeline_events(workload))
    app = make_app(None, tmp_path_factory.mktemp("site"),
                   OPENTRACK_CLICKHOUSE_URL=clickhouse_server.url)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)
    engine.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Chromium]:
    root = tmp_path_factory.mktemp("chromium")
    chromium = Chromium(root / "profile", root / "chromium.log")
    yield chromium
    chromium.close()


def test_login_every_page_and_logout(site: str, browser: Chromium) -> None:
    browser.open(f"{site}/dashboards/templates?{RANGE}")
    assert browser.evaluate("location.pathname") == "/dashboards/login"
    browser.evaluate("document.getElementById('api_key').focus()")
    browser.call("Input.insertText", text=API_KEY)
    browser.submit("document.querySelector('section.login button[type=submit]').click()")
    assert browser.evaluate("location.pathname + location.search") == (
        f"/dashboards/templates?{RANGE}")
    assert API_KEY not in browser.evaluate("location.href")

    cookies = browser.call("Network.getCookies", urls=[site])["cookies"]
    session = next(c for c in cookies if c["name"] == "opentrack_session")
    assert session["httpOnly"] and session["sameSite"] == "Lax"
    assert "opentrack_session" not in browser.evaluate("document.cookie")

    for name, expected in PAGES.items():
        browser.open(f"{site}/dashboards/{name}?{RANGE}")
        drawn = browser.wait_for(
            "(() => { const plots = [...document.querySelectorAll('.plot')];"
            " const done = plots.filter(p => p.classList.contains('js-plotly-plot')"
            "   && p.querySelector('.main-svg') && (p._fullData || []).length > 0);"
            " return plots.length > 0 && done.length === plots.length && plots.length; })()"
        )
        assert drawn >= expected, (name, drawn)
        assert browser.evaluate("document.querySelectorAll('.js-plotly-plot .main-svg').length"
                                ) >= 2 * expected
        assert browser.evaluate("document.querySelectorAll('table.data tbody tr').length") > 0
        status = browser.evaluate(
            "fetch(document.querySelector('a.download').href).then("
            "r => r.status + ' ' + r.headers.get('content-type'))", await_promise=True)
        assert status.startswith("200 text/csv"), (name, status)
        time.sleep(0.3)  # let late console messages arrive
        browser.evaluate("1")
        assert browser.errors() == [], name
        browser.screenshot(ARTIFACTS / f"{name}.png")

    browser.submit("document.querySelector('form.logout button').click()")
    assert browser.evaluate("location.pathname") == "/dashboards/login"
    browser.open(f"{site}/dashboards/timing")
    assert browser.evaluate("location.pathname") == "/dashboards/login"
    assert browser.errors() == []


def test_filters_change_what_the_page_shows(site: str, browser: Chromium) -> None:
    browser.open(f"{site}/dashboards/login")
    browser.evaluate("document.getElementById('api_key').focus()")
    browser.call("Input.insertText", text=API_KEY)
    browser.submit("document.querySelector('section.login button[type=submit]').click()")
    browser.open(f"{site}/dashboards/templates?{RANGE}")
    everyone = browser.evaluate("document.querySelectorAll('table.data tbody tr').length")
    browser.submit("document.querySelector('select[name=person_type]').value = 'contact';"
                   "document.querySelector('form.filters button').click()")
    assert "person_type=contact" in browser.evaluate("location.search")
    contacts = browser.evaluate(
        "[...document.querySelectorAll('table.data tbody td.key')].map(td => td.textContent)")
    assert 0 < len(contacts) < everyone
    assert not any("cand_" in key for key in contacts)  # candidates' templates are gone
    browser.wait_for("document.querySelectorAll('.js-plotly-plot .main-svg').length > 0")
    assert browser.errors() == []


def test_the_error_check_sees_errors_and_the_csp_holds(site: str, browser: Chromium) -> None:
    """The no-console-errors checks above can fail: a planted error and an inline script
    (which the Content-Security-Policy must refuse) are both reported."""
    browser.open(f"{site}/dashboards/login")
    browser.evaluate("console.error('planted error')")
    browser.evaluate("(() => { const s = document.createElement('script');"
                     " s.textContent = 'window.injected = true'; document.body.appendChild(s);"
                     " return 1; })()")
    time.sleep(0.3)
    assert browser.evaluate("window.injected === undefined")
    errors = browser.errors()
    assert any("planted error" in e for e in errors), errors
    assert any("Content Security Policy" in e for e in errors), errors
