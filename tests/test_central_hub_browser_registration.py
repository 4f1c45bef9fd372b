"""The whole account workflow in headless Chromium against the real hub pages on loopback:
register → propose (admin 1) → approve (admin 2) → activate → set TOTP → log in with TOTP →
see exactly the permitted sites."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyotp
import pytest
from aiohttp import web
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from central_hub.accounts import AuthConfig
from central_hub.db import Database
from central_hub.policy import Scope
from central_hub.sites import sites
from central_hub.web_auth import AUTH, setup_auth
from devstack.ports import free_port
from tests.chromium import start_chromium

PASSWORD = "mật-khẩu-quản-trị-2025"
NEW_PASSWORD = "mật-khẩu-của-An-2025"
CONFIG = AuthConfig(argon2_memory_kib=19456, argon2_time_cost=2, cookie_secure=False,
                    secret=b"b" * 32)  # fmt: skip
SITES = [
    # site id, province, district, kind, authority
    ("hn-mil-1", "Hà Nội", "Ba Đình", "facility", "military"),
    ("hn-mil-2", "Hà Nội", "Hoàn Kiếm", "checkpoint", "military"),
    ("hn-yte-1", "Hà Nội", "Ba Đình", "facility", "health"),
    ("cb-mil-1", "Cao Bằng", "Hòa An", "facility", "military"),
]


class HubThread:
    """The hub's aiohttp app on a free loopback port, in a thread with its own event loop."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner = web.AppRunner(app)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        self._loop.run_until_complete(start())
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> str:
        self._thread.start()
        assert self._ready.wait(20), "the hub did not start"
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(20)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(20)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[str, web.Application]]:
    db = Database.connect(f"sqlite:///{tmp_path / 'hub.db'}")
    db.migrate()
    with db.engine.begin() as conn:
        for sid, prov, dist, kind, authority in SITES:
            conn.execute(sites.insert().values(site_id=sid, name=f"Điểm {sid}", province=prov,
                         district=dist, kind=kind, authority=authority, operator="viettel",
                         enrolled_at=time.time()))  # fmt: skip
    app = web.Application()
    setup_auth(app, db, CONFIG)
    store = app[AUTH].store
    for n in (1, 2):
        store.create_user(f"admin{n}@hanoi.gov.vn", f"Quản trị {n}", PASSWORD, "account_admin",
                          Scope.parse("province=Hà Nội"))  # fmt: skip
    server = HubThread(app)
    base = server.start()
    yield base, app
    server.stop()
    db.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    driver = start_chromium(tmp_path)
    yield driver
    driver.quit()


def _wait_path(driver: WebDriver, path: str) -> None:
    WebDriverWait(driver, 15).until(lambda d: d.current_url.split("://", 1)[1].split("/", 1)[1]
                                    .startswith(path.lstrip("/")))  # fmt: skip


def _fill(driver: WebDriver, values: dict[str, str]) -> None:
    for name, value in values.items():
        field = driver.find_element(By.ID, name)
        if field.tag_name == "select":
            Select(field).select_by_value(value)
        else:
            field.clear()
            field.send_keys(value)


def _login(driver: WebDriver, base: str, email: str, password: str) -> None:
    driver.get(f"{base}/login")
    _fill(driver, {"email": email, "password": password})
    driver.find_element(By.ID, "login-submit").click()


def _logout(driver: WebDriver) -> None:
    driver.find_element(By.ID, "logout").click()
    WebDriverWait(driver, 15).until(ec.presence_of_element_located((By.ID, "notice")))


def test_register_propose_approve_activate_totp_login_and_see_only_permitted_sites(
    hub: tuple[str, web.Application], browser: WebDriver
) -> None:
    base, app = hub
    d = browser

    # 1. The official asks for an account on the public form (Vietnamese page).
    d.get(f"{base}/register")
    assert d.find_element(By.TAG_NAME, "html").get_attribute("lang") == "vi"
    _fill(d, {
        "full_name": "Nguyễn Văn An", "title": "Trợ lý tác chiến",
        "unit": "Bộ Chỉ huy Quân sự Hà Nội", "phone": "0243 826 0000",
        "email": "an.nv@hanoi.gov.vn", "role": "viewer", "scope_kind": "province_authority",
        "province": "Hà Nội", "authority": "military", "purpose": "Giám sát khu cách ly",
    })  # fmt: skip
    d.find_element(By.ID, "register-submit").click()
    message = WebDriverWait(d, 15).until(ec.presence_of_element_located((By.ID, "message")))
    assert "1" in message.text

    # 2. The first administrator proposes it; it cannot approve its own proposal.
    _login(d, base, "admin1@hanoi.gov.vn", PASSWORD)
    _wait_path(d, "/me/sites")
    d.get(f"{base}/admin/registrations")
    d.find_element(By.CSS_SELECTOR, "#request-1 button.propose").click()
    card = WebDriverWait(d, 15).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "#request-1[data-state=proposed]"))
    )
    assert not card.find_elements(By.CSS_SELECTOR, "button.approve")
    _logout(d)

    # 3. A second administrator approves and gets the one-time activation link.
    _login(d, base, "admin2@hanoi.gov.vn", PASSWORD)
    _wait_path(d, "/me/sites")
    d.get(f"{base}/admin/registrations")
    d.find_element(By.CSS_SELECTOR, "#request-1 button.approve").click()
    link = (
        WebDriverWait(d, 15).until(ec.presence_of_element_located((By.ID, "activation-link"))).text
    )
    assert link.startswith(f"{base}/activate?token=")
    _logout(d)

    # 4. The official activates the account; a viewer must set up TOTP straight away.
    d.get(link)
    _fill(d, {"password": NEW_PASSWORD, "password2": NEW_PASSWORD})
    d.find_element(By.ID, "activate-submit").click()
    _wait_path(d, "/me/totp")
    secret = d.find_element(By.ID, "totp-secret").get_attribute("data-secret")
    assert secret and "otpauth://totp/" in d.find_element(By.ID, "totp-uri").text
    totp = pyotp.TOTP(secret)
    _fill(d, {"code": totp.now()})
    d.find_element(By.ID, "enrol-submit").click()
    _wait_path(d, "/login")
    assert d.find_element(By.ID, "notice").text

    # 5. Log in with password and a fresh TOTP code.
    _login(d, base, "an.nv@hanoi.gov.vn", NEW_PASSWORD)
    _wait_path(d, "/login/totp")
    _fill(d, {"code": totp.at(time.time() + 30)})  # the next step: the enrolment code is spent
    d.find_element(By.ID, "totp-submit").click()
    _wait_path(d, "/me/sites")

    # 6. Exactly the military-managed sites of Hà Nội, nothing of Cao Bằng or of health.
    rows = d.find_elements(By.CSS_SELECTOR, "tr.site")
    assert sorted(r.get_attribute("data-site-id") or "" for r in rows) == ["hn-mil-1", "hn-mil-2"]
    assert d.find_element(By.ID, "who").text == "Nguyễn Văn An"

    # The English switch works on the same page.
    d.find_element(By.ID, "lang-switch").click()
    WebDriverWait(d, 15).until(
        lambda drv: drv.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en"
    )
    assert "Sites you may see" in d.find_element(By.TAG_NAME, "h1").text

    # Every step is on the audit record, and the chain holds.
    audit = app[AUTH].audit
    actions = [r.action for r in audit.rows_since()]
    for expected in ("registration_submitted", "registration_proposed", "registration_approved",
                     "account_activated", "totp_enrolled", "login_ok"):  # fmt: skip
        assert expected in actions
    assert audit.verify().ok
