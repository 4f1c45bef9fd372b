"""The NOC board in headless Chromium against the whole hub app on loopback: log in, follow the
tree, see a new fault pushed over the alert WebSocket appear on the open page without a
reload, the outage timeline drawn as SVG, a ticket taken from the site page, the English
switch. State comes from the ingest's own writer (the MQTT path is covered end to end in
test_central_hub_e2e.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from central_hub.app import Hub, build_app, make_hub
from central_hub.hub_config import DatabaseConfig, HubConfig, WebConfig
from central_hub.policy import Scope
from central_hub.web_auth import AUTH
from devstack.ports import free_port
from tests.test_central_hub_api import AUTH_CONFIG, PASSWORD, SiteFeed, populate, ticket_ids


class HubThread:
    """The whole hub app (auth, board, API, alerts) on a free loopback port, in a thread with
    its own event loop; the app is built on that loop (it subscribes to revocations)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self.app: web.Application | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self.app = build_app(self.hub)
            self._runner = web.AppRunner(self.app)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        self.loop.run_until_complete(start())
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> str:
        self._thread.start()
        assert self._ready.wait(20), "the hub did not start"
        return f"http://127.0.0.1:{self.port}"

    def publish(self, alerts: list[Any]) -> None:
        self.hub.alerts.publish_threadsafe(self.loop, alerts)

    def stop(self) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(20)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[str, HubThread, SiteFeed, float]]:
    config = HubConfig(
        database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'hub.db'}"),
        web=WebConfig(host="127.0.0.1", port=0),
    )
    hub = make_hub(config, AUTH_CONFIG)
    t0 = time.time() - 3600
    feed = populate(hub, t0)
    server = HubThread(hub)
    base = server.start()
    assert server.app is not None
    server.app[AUTH].store.create_user(
        "noc@vnpt.gov.vn", "Trực ban VNPT", PASSWORD, "noc", Scope.nation()
    )
    yield base, server, feed, t0
    server.stop()
    hub.db.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(
        service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"), options=opts
    )
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait(driver: WebDriver, what: Any, within: float = 15.0) -> Any:
    """Poll `what(driver)`; an element swapped by the page's live refresh meanwhile is just
    another miss."""
    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, within, 0.1, ignored_exceptions=ignored).until(what)


def click(driver: WebDriver, by: str, value: str) -> None:
    """Click an element, finding it again if the live refresh swapped it under us."""
    wait(driver, lambda d: d.find_element(by, value).click() or True)


def attrs(driver: WebDriver, selector: str, *names: str) -> list[str] | None:
    """Attributes of the first element matching `selector`, read in one step (the page may
    swap the element between two WebDriver calls); None when there is none."""
    found: list[str] | None = driver.execute_script(
        "var e = document.querySelector(arguments[0]);"
        "return e ? arguments[1].map(function (n) { return e.getAttribute(n); }) : null;",
        selector,
        list(names),
    )
    return found


def css(driver: WebDriver, selector: str) -> list[Any]:
    return driver.find_elements(By.CSS_SELECTOR, selector)


def log_in(driver: WebDriver, base: str, email: str, landing: str) -> None:
    driver.get(f"{base}/login?next={landing}")
    driver.find_element(By.NAME, "email").send_keys(email)
    driver.find_element(By.NAME, "password").send_keys(PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait(driver, lambda d: d.current_url.endswith(landing))


def test_the_board_follows_a_fault_live_and_draws_the_timeline(
    running: tuple[str, HubThread, SiteFeed, float], browser: WebDriver
) -> None:
    base, server, feed, _ = running
    d = browser
    log_in(d, base, "noc@vnpt.gov.vn", "/board")
    assert d.find_element(By.TAG_NAME, "h1").text == "Bảng giám sát"
    groups = [e.get_attribute("data-group") for e in css(d, "tr.group")]
    assert groups == ["Cao Bằng", "Hà Nội", "Đà Nẵng"]
    wait(d, lambda d: css(d, "#alerts-status.ws-on"))  # the alert socket is open
    d.execute_script("window.__notReloaded = true;")

    # A camera of Hà Nội goes down (the ingest's writer), its alert is pushed to the page.
    alerts = feed.send("hn-hk-02", feed.down("hn-hk-02", "cam-1", time.time()))
    server.publish(alerts)
    wait(d, lambda d: css(d, 'tr.fault[data-site-id="hn-hk-02"][data-camera-id="cam-1"]'))
    item = wait(d, lambda d: css(d, '#alerts li[data-site-id="hn-hk-02"]'))[0]  # not swapped
    assert item.get_attribute("data-type") == "outage_opened" and "cam-1" in item.text
    assert d.execute_script("return window.__notReloaded === true;")
    wait(d, lambda d: d.find_element(By.ID, "t-down").text == "3")

    # Down the tree to the site; its timeline is drawn from the API as SVG.
    click(d, By.LINK_TEXT, "Hà Nội")
    wait(
        d,
        lambda d: (
            [e.get_attribute("data-group") for e in css(d, "tr.group")] == ["Ba Đình", "Hoàn Kiếm"]
        ),
    )
    click(d, By.CSS_SELECTOR, 'tr.site[data-site-id="hn-bd-01"] a')
    wait(d, lambda d: attrs(d, "#timeline", "data-drawn") == ["1"])
    chart = d.execute_script(
        "var bars = document.querySelectorAll('svg.timeline-chart g.outage.open rect');"
        "var labels = document.querySelectorAll('svg.timeline-chart text.row-label');"
        "return [Array.from(bars).map(function (b) { return +b.getAttribute('width'); }),"
        "        Array.from(labels).map(function (l) { return l.textContent; })];"
    )
    assert len(chart[0]) == 1 and chart[0][0] > 2
    assert chart[1] == ["Toàn điểm", "cam-2", "cam-1"]
    assert attrs(d, 'article.camera[data-camera-id="cam-2"]', "data-status") == ["down"]

    # Take the ticket from the site page (a real form post with the CSRF token).
    tid = ticket_ids(server.hub)["hn-bd-01"]
    click(d, By.ID, f"ack-{tid}")
    wait(d, lambda d: css(d, f'tr.ticket[data-ticket-id="{tid}"][data-state="acknowledged"]'))

    # The camera comes back: the outage closes on the open page, the ticket is resolved.
    server.publish(feed.send("hn-bd-01", feed.up("hn-bd-01", "cam-2", time.time())))
    wait(d, lambda d: css(d, f'tr.ticket[data-ticket-id="{tid}"][data-state="resolved"]'))
    wait(d, lambda d: css(d, 'article.camera[data-camera-id="cam-2"][data-status="ok"]'))
    wait(d, lambda d: css(d, "svg.timeline-chart g.outage.kind-camera_down:not(.open)"))

    click(d, By.ID, "lang-switch")
    wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#outages h2").text == "Outage timeline")
    wait(
        d,
        lambda d: (
            d.find_element(By.CSS_SELECTOR, "svg.timeline-chart text.row-label").text
            == "Whole site"
        ),
    )
    # No script error on any page visited (the CSP would report inline code as an error).
    errors = [
        e
        for e in d.get_log("browser")  # type: ignore[attr-defined]
        if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]
    ]
    assert errors == []
