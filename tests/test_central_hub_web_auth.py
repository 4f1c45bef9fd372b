"""The web auth layer over real HTTP on loopback: CSRF on every unsafe request, cookie flags,
login with lockout and TOTP, the IDOR probe (a viewer of province A gets 403 and an audit row
for every endpoint touching province B), scope-filtered pages, language switch, revocation."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest
import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from central_hub import i18n
from central_hub.accounts import AccountStore, AuthConfig, Revocation, cli_actor
from central_hub.audit import AuditLog, audit_log, parse_anchors
from central_hub.db import Database
from central_hub.policy import SCOPE_KINDS, Action, Scope
from central_hub.sites import get_site, sites
from central_hub.web_auth import (
    AUTH,
    CSRF_HEADER,
    TEMPLATES_DIR,
    require,
    setup_auth,
    subscribe_revocations,
)

PASSWORD = "mật-khẩu-thử-nghiệm-2025"
FAST = AuthConfig(lockout_threshold=3, argon2_memory_kib=19456, argon2_time_cost=2,
                  cookie_secure=False, secret=b"k" * 32)  # fmt: skip
CSRF_RE = re.compile(r'name="csrf_token" value="([0-9a-f]{64})"')

SITES = [
    ("hn-bd-1", "Hà Nội", "Ba Đình", "facility", "military", "viettel"),
    ("hn-hk-1", "Hà Nội", "Hoàn Kiếm", "checkpoint", "police", "viettel"),
    ("cb-1", "Cao Bằng", "Hòa An", "facility", "military", "viettel"),
    ("cb-2", "Cao Bằng", None, "checkpoint", "police", "viettel"),
]


# --- a stand-in for the later JSON API: every handler goes through require() ---------------


def _site_route(action: Action) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        db = request.app[AUTH].db
        with db.engine.connect() as conn:
            site = get_site(conn, request.match_info["site_id"])
        if site is None:
            raise web.HTTPNotFound()
        rng = None
        if "start" in request.query:
            rng = (float(request.query["start"]), float(request.query["end"]))
        await require(request, action, site, camera=request.match_info.get("camera"),
                      time_range=rng)  # fmt: skip
        return web.json_response({"site": site.site_id, "action": action})

    return handler


API_ROUTES: list[tuple[str, str, Action]] = [
    ("GET", "/api/sites/{site_id}/status", "view_status"),
    ("GET", "/api/sites/{site_id}/outages", "view_outages"),
    ("POST", "/api/sites/{site_id}/tickets", "manage_tickets"),
    ("GET", "/api/sites/{site_id}/cameras/{camera}/live", "view_live"),
    ("GET", "/api/sites/{site_id}/cameras/{camera}/playback?start=1000&end=1600", "view_playback"),
    ("GET", "/api/sites/{site_id}/cameras/{camera}/snapshot", "view_snapshot"),
    ("POST", "/api/sites/{site_id}/cameras/{camera}/export", "export_request"),
]


def build_app(db: Database, config: AuthConfig = FAST) -> web.Application:
    app = web.Application()
    setup_auth(app, db, config)
    for method, path, action in API_ROUTES:
        app.router.add_route(method, path.split("?")[0], _site_route(action))
    return app


# --- fixtures -------------------------------------------------------------------------------


@dataclass
class Hub:
    db: Database
    client: TestClient  # type: ignore[type-arg]
    store: AccountStore
    audit: AuditLog

    async def csrf(self, path: str = "/login") -> str:
        page = await self.client.get(path)
        m = CSRF_RE.search(await page.text())
        assert m, f"no CSRF token on {path}"
        return m.group(1)

    async def post_form(self, path: str, data: dict[str, str], page: str = "/login",
                        **kw: object) -> object:  # fmt: skip
        token = await self.csrf(page)
        return await self.client.post(
            path, data={**data, "csrf_token": token}, allow_redirects=False, **kw
        )  # type: ignore[arg-type]

    def denied_rows(self) -> list[dict[str, object]]:
        with self.db.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(
                sa.select(audit_log).where(audit_log.c.allowed == sa.false())
                .order_by(audit_log.c.seq))]  # fmt: skip

    async def login(self, email: str, totp: pyotp.TOTP | None = None) -> None:
        resp = await self.post_form("/login", {"email": email, "password": PASSWORD})
        assert resp.status == 303, await resp.text()  # type: ignore[attr-defined]
        if totp is not None:
            assert resp.headers["Location"].startswith("/login/totp")  # type: ignore[attr-defined]
            code = totp.at(time.time() + 30)  # the next step: never the one spent at enrolment
            resp = await self.post_form("/login/totp", {"code": code}, page="/login/totp")
            assert resp.status == 303, await resp.text()  # type: ignore[attr-defined]
        me = await self.client.get("/me/sites", allow_redirects=False)
        assert me.status == 200

    async def logout(self) -> None:
        resp = await self.post_form("/logout", {}, page="/me/sites")
        assert resp.status == 303  # type: ignore[attr-defined]


def _make_db(url: str) -> Database:
    db = Database.connect(url)
    db.migrate()
    with db.engine.begin() as conn:
        for sid, prov, dist, kind, auth, op in SITES:
            conn.execute(sites.insert().values(site_id=sid, name=f"Điểm {sid}", province=prov,
                         district=dist, kind=kind, authority=auth, operator=op,
                         enrolled_at=time.time()))  # fmt: skip
    return db


async def _hub(db: Database, config: AuthConfig = FAST) -> AsyncIterator[Hub]:
    app = build_app(db, config)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    service = app[AUTH]
    try:
        yield Hub(db, client, service.store, service.audit)
    finally:
        await client.close()
        db.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hub.db'}"


@pytest.fixture
async def hub(sqlite_url: str) -> AsyncIterator[Hub]:
    async for h in _hub(_make_db(sqlite_url)):
        yield h


@pytest.fixture
async def any_hub(hub_db_url: str) -> AsyncIterator[Hub]:
    async for h in _hub(_make_db(hub_db_url)):
        yield h


def _user(hub: Hub, email: str, role: str, scope: str) -> int:
    return hub.store.create_user(email, "Cán bộ " + role, PASSWORD, role, Scope.parse(scope))


def _enrolled(hub: Hub, user_id: int) -> pyotp.TOTP:
    secret, _ = hub.store.totp_begin_enrolment(user_id)
    totp = pyotp.TOTP(secret)
    assert hub.store.totp_confirm_enrolment(user_id, totp.now(), "test")
    return totp


# --- CSRF and cookies -----------------------------------------------------------------------


async def test_every_unsafe_request_without_a_csrf_token_is_refused(hub: Hub) -> None:
    _user(hub, "s@hanoi.gov.vn", "noc", "province=Hà Nội")
    c = hub.client
    targets = ["/login", "/register", "/logout", "/activate", "/login/totp", "/me/totp",
               "/admin/registrations/1/approve", "/admin/users/1/disable",
               "/api/sites/hn-bd-1/tickets"]  # fmt: skip
    for path in targets:
        resp = await c.post(path, data={"email": "s@hanoi.gov.vn", "password": PASSWORD},
                            allow_redirects=False)  # fmt: skip
        assert resp.status == 403, path
        bad = await c.post(path, data={"csrf_token": "0" * 64}, allow_redirects=False)
        assert bad.status == 403, path
    # Logged in: JSON calls need the header; a cross-site request fails even with a token.
    await hub.login("s@hanoi.gov.vn")
    token = await hub.csrf("/me/sites")
    assert (await c.post("/api/sites/hn-bd-1/tickets", json={})).status == 403
    ok = await c.post("/api/sites/hn-bd-1/tickets", json={}, headers={CSRF_HEADER: token})
    assert ok.status == 200
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        resp = await c.post("/api/sites/hn-bd-1/tickets", json={},
                            headers={CSRF_HEADER: token, **headers})  # fmt: skip
        assert resp.status == 403
    # A token that is not this session's does not pass.
    assert (await c.post("/api/sites/hn-bd-1/tickets", json={},
                         headers={CSRF_HEADER: "f" * 64})).status == 403  # fmt: skip
    assert (await c.get("/api/sites/hn-bd-1/status")).status == 200  # safe methods need none


async def test_cookies_are_httponly_strict_and_secure_when_asked(sqlite_url: str) -> None:
    config = AuthConfig(argon2_memory_kib=19456, argon2_time_cost=2, cookie_secure=True,
                        secret=b"s" * 32)  # fmt: skip
    async for hub in _hub(_make_db(sqlite_url), config):
        _user(hub, "s@hanoi.gov.vn", "noc", "province=Hà Nội")
        page = await hub.client.get("/login")
        pre = page.headers["Set-Cookie"]
        assert pre.startswith("__Host-isocam_csrf=")
        for flag in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/"):
            assert flag in pre
        assert "Strict-Transport-Security" in page.headers
        # The test client talks plain http, so hand the Secure cookie back explicitly.
        value = pre.split(";", 1)[0].split("=", 1)[1]
        token = CSRF_RE.search(await page.text()).group(1)  # type: ignore[union-attr]
        hub.client.session.cookie_jar.clear()
        resp = await hub.client.post(
            "/login",
            data={"email": "s@hanoi.gov.vn", "password": PASSWORD, "csrf_token": token},
            headers={"Cookie": f"__Host-isocam_csrf={value}"},
            allow_redirects=False,
        )
        assert resp.status == 303
        session_cookie = resp.headers["Set-Cookie"]
        assert session_cookie.startswith("__Host-isocam_session=")
        for flag in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/"):
            assert flag in session_cookie


async def test_security_headers_on_pages(hub: Hub) -> None:
    resp = await hub.client.get("/login")
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Cache-Control"] == "no-store"
    css = await hub.client.get("/static/hub.css")
    assert css.status == 200 and "text/css" in css.headers["Content-Type"]


# --- login ----------------------------------------------------------------------------------


async def test_wrong_passwords_lock_the_account_over_http(hub: Hub) -> None:
    _user(hub, "s@hanoi.gov.vn", "noc", "province=Hà Nội")
    for _ in range(3):
        resp = await hub.post_form("/login", {"email": "s@hanoi.gov.vn", "password": "sai-rồi-123"})
        assert resp.status == 401  # type: ignore[attr-defined]
    resp = await hub.post_form("/login", {"email": "s@hanoi.gov.vn", "password": PASSWORD})
    assert resp.status == 401  # type: ignore[attr-defined]
    text = await resp.text()  # type: ignore[attr-defined]
    assert i18n.t("login.failed", "vi") in text  # the same words whatever the reason
    assert [r["reason"] for r in hub.denied_rows()] == ["bad_password"] * 3 + ["locked"]
    assert (await hub.client.get("/me/sites", allow_redirects=False)).status == 303


async def test_totp_is_enrolled_then_required_for_a_viewer(hub: Hub) -> None:
    _user(hub, "v@hanoi.gov.vn", "viewer", "province=Hà Nội")
    c = hub.client
    first = await c.get("/me/sites", allow_redirects=False)
    assert first.status == 303
    assert parse_qs(urlsplit(first.headers["Location"]).query) == {"next": ["/me/sites"]}
    resp = await hub.post_form("/login", {"email": "v@hanoi.gov.vn", "password": PASSWORD})
    assert resp.headers["Location"] == "/me/totp"  # type: ignore[attr-defined]
    # Half-logged-in: no page beyond the enrolment one.
    assert (await c.get("/me/sites", allow_redirects=False)).status == 303
    page = await c.get("/me/totp")
    secret = re.search(r'data-secret="([A-Z2-7]+)"', await page.text()).group(1)  # type: ignore[union-attr]
    assert "otpauth://totp/" in await page.text()
    totp = pyotp.TOTP(secret)
    wrong = await hub.post_form("/me/totp", {"code": "000000"}, page="/me/totp")
    assert wrong.status == 401  # type: ignore[attr-defined]
    right = await hub.post_form("/me/totp", {"code": totp.now()}, page="/me/totp")
    assert right.headers["Location"] == "/login?msg=enrolled"  # type: ignore[attr-defined]
    resp = await hub.post_form("/login", {"email": "v@hanoi.gov.vn", "password": PASSWORD})
    assert resp.headers["Location"].startswith("/login/totp")  # type: ignore[attr-defined]
    assert (await c.get("/me/sites", allow_redirects=False)).status == 303
    bad = await hub.post_form("/login/totp", {"code": totp.now()}, page="/login/totp")
    assert bad.status == 401  # type: ignore[attr-defined]  # the enrolment code is spent
    ok = await hub.post_form("/login/totp", {"code": totp.at(time.time() + 30)},
                             page="/login/totp")  # fmt: skip
    assert ok.status == 303  # type: ignore[attr-defined]
    assert (await c.get("/me/sites", allow_redirects=False)).status == 200
    await hub.logout()
    assert (await c.get("/me/sites", allow_redirects=False)).status == 303
    with hub.db.engine.connect() as conn:
        acts = conn.execute(sa.select(audit_log.c.action).order_by("seq")).scalars().all()
    assert acts == ["user_created", "grant_added", "totp_enrol_failed", "totp_enrolled",
                    "login_failed", "login_ok", "logout"]  # fmt: skip


# --- authorization --------------------------------------------------------------------------


async def idor_probe(
    hub: Hub,
    routes: list[tuple[str, str, Action]],
    ids: dict[str, str],
    *,
    expect: int = 403,
) -> list[str]:
    """Call every route with `ids` filled in; each must answer `expect` and leave exactly one
    new refused audit row naming the site. Returns what went wrong (empty: all good)."""
    problems: list[str] = []
    token = await hub.csrf("/me/sites")
    for method, template, action in routes:
        path = template.format(**ids)
        before = len(hub.denied_rows())
        resp = await hub.client.request(method, path, headers={CSRF_HEADER: token},
                                        allow_redirects=False)  # fmt: skip
        rows = hub.denied_rows()[before:]
        if resp.status != expect:
            problems.append(f"{method} {path}: {resp.status}, wanted {expect}")
        elif len(rows) != 1 or rows[0]["site_id"] != ids["site_id"] or rows[0]["action"] != action:
            problems.append(f"{method} {path}: audit rows {rows}")
    return problems


async def test_a_provincial_viewer_gets_403_and_an_audit_row_for_every_other_province_object(
    any_hub: Hub,
) -> None:
    hub = any_hub
    uid = hub.store.create_user("v@hanoi.gov.vn", "Người xem", PASSWORD, "viewer",
                                Scope.parse("province=Hà Nội"))  # fmt: skip
    for role in ("noc", "export_requester"):
        hub.store.add_grant(uid, role, Scope.parse("province=Hà Nội"), cli_actor())
    await hub.login("v@hanoi.gov.vn", _enrolled(hub, uid))
    token = await hub.csrf("/me/sites")
    for method, template, _action in API_ROUTES:  # its own province: all allowed
        resp = await hub.client.request(method, template.format(site_id="hn-bd-1", camera="c1"),
                                        headers={CSRF_HEADER: token})  # fmt: skip
        assert resp.status == 200, template
    for site_id in ("cb-1", "cb-2"):
        assert await idor_probe(hub, API_ROUTES, {"site_id": site_id, "camera": "c1"}) == []
    footage = [r for r in hub.denied_rows() if r["action"] == "view_playback"]
    assert footage[0]["range_start_us"] == 1_000_000_000 and footage[0]["reason"] == "out_of_scope"
    with hub.db.engine.connect() as conn:  # allowed footage requests are audited as well
        query = sa.select(audit_log.c.action).where(
            audit_log.c.allowed == sa.true(), audit_log.c.site_id == "hn-bd-1"
        )
        allowed = conn.execute(query).scalars().all()
    assert sorted(allowed) == ["export_request", "view_live", "view_playback", "view_snapshot"]
    # A disabled site refuses footage even inside the scope.
    hub.store.set_site_enabled("hn-hk-1", False, cli_actor())
    resp = await hub.client.get("/api/sites/hn-hk-1/cameras/c1/live")
    assert resp.status == 403 and hub.denied_rows()[-1]["reason"] == "site_disabled"
    # Nobody logged in: 401, and a footage attempt is still on record.
    await hub.logout()
    resp = await hub.client.get("/api/sites/hn-bd-1/cameras/c1/live", allow_redirects=False)
    assert resp.status == 401 and hub.denied_rows()[-1]["reason"] == "not_logged_in"
    assert hub.audit.verify().ok


async def test_me_sites_lists_only_permitted_sites(hub: Hub) -> None:
    _user(hub, "m@hanoi.gov.vn", "noc", "province=Cao Bằng,kind=checkpoint")
    await hub.login("m@hanoi.gov.vn")
    html = await (await hub.client.get("/me/sites")).text()
    assert re.findall(r'data-site-id="([^"]+)"', html) == ["cb-2"]


async def test_the_audit_page_shows_only_the_auditors_scope(hub: Hub) -> None:
    for sid in ("hn-bd-1", "cb-1"):
        hub.audit.record("view_live", user=99, actor="x@hanoi.gov.vn", site=sid, allowed=True)
    _user(hub, "a@hanoi.gov.vn", "auditor", "province=Hà Nội")
    _user(hub, "n@hanoi.gov.vn", "noc", "province=Hà Nội")
    await hub.login("n@hanoi.gov.vn")
    assert (await hub.client.get("/audit")).status == 403
    assert hub.denied_rows()[-1]["action"] == "view_audit"
    await hub.logout()
    await hub.login("a@hanoi.gov.vn")
    html = await (await hub.client.get("/audit?lang=en")).text()
    assert set(re.findall(r'data-site-id="([^"]*)"', html)) == {"hn-bd-1"}
    assert "Audit log" in html
    html = await (await hub.client.get("/audit?site=cb-1")).text()  # a filter cannot widen it
    assert re.findall(r'data-site-id="([^"]*)"', html) == []


async def test_admin_actions_outside_scope_are_refused_and_audited(hub: Hub) -> None:
    _user(hub, "admin@caobang.gov.vn", "account_admin", "province=Cao Bằng")
    form = hub.store.validate_form({
        "full_name": "Trần Thị Bình", "title": "Chuyên viên", "unit": "Sở Y tế Hà Nội",
        "phone": "0243 000 0000", "email": "binh@hanoi.gov.vn", "role": "viewer",
        "scope_kind": "province", "province": "Hà Nội",
    })  # fmt: skip
    rid = hub.store.submit_registration(form, None)
    await hub.login("admin@caobang.gov.vn")
    html = await (await hub.client.get("/admin/registrations")).text()
    assert f'id="request-{rid}"' not in html
    resp = await hub.post_form(f"/admin/registrations/{rid}/propose", {},
                               page="/admin/registrations")  # fmt: skip
    assert resp.status == 403  # type: ignore[attr-defined]
    row = hub.denied_rows()[-1]
    assert row["action"] == "admin_denied" and row["reason"] == "out_of_scope"
    reg = hub.store.get_registration(rid)
    assert reg is not None and reg.state == "submitted"


# --- language, templates, revocation --------------------------------------------------------


async def test_vietnamese_first_with_an_english_switch(hub: Hub) -> None:
    vi = await (await hub.client.get("/login")).text()
    assert '<html lang="vi">' in vi and i18n.t("login.title", "vi") in vi
    en = await hub.client.get("/login?lang=en")
    assert "Log in" in await en.text()
    again = await (await hub.client.get("/register")).text()  # remembered by the cookie
    assert '<html lang="en">' in again and "Request an account" in again


def test_every_template_key_exists_in_both_languages() -> None:
    used: set[str] = set()
    for path in TEMPLATES_DIR.glob("*.html"):
        used |= set(re.findall(r"\bt\('([a-z_.]+)'", path.read_text(encoding="utf-8")))
    assert used, "no t('…') calls found"
    # Keys the handlers pass to templates (message_key=…, error=…).
    source = (TEMPLATES_DIR.parent / "web_auth.py").read_text(encoding="utf-8")
    prefixes = ("login.", "totp.", "register.", "error.", "activate.", "admin.")
    used |= {k for k in re.findall(r'"([a-z_]+\.[a-z_.]+)"', source) if k.startswith(prefixes)}
    static = {k for k in used if not k.endswith((".", ".html"))}
    missing = static - set(i18n.MESSAGES)
    assert not missing, missing
    for key, (vi, en) in i18n.MESSAGES.items():
        assert vi.strip() and en.strip(), key
    # Keys built at run time from a code: every code the workflow can produce has a text.
    for code in ("required", "too_long", "control_chars", "phone_invalid", "email_invalid",
                 "email_domain", "role_invalid", "scope_invalid", "password_short",
                 "password_weak", "password_mismatch", "email_taken", "pending_exists",
                 "same_admin", "out_of_scope", "bad_state", "token_invalid", "self"):  # fmt: skip
        assert f"error.{code}" in i18n.MESSAGES
    for state in ("submitted", "proposed", "approved", "rejected"):
        assert f"admin.state.{state}" in i18n.MESSAGES
    for kind in SCOPE_KINDS:
        assert f"scope.{kind}" in i18n.MESSAGES


async def test_disabling_a_user_ends_its_session_and_tells_subscribers(sqlite_url: str) -> None:
    revocations: list[Revocation] = []
    db = _make_db(sqlite_url)
    app = build_app(db)
    seen = asyncio.Event()

    async def on_startup(app: web.Application) -> None:
        def cb(ev: Revocation) -> None:
            revocations.append(ev)
            seen.set()

        subscribe_revocations(app, cb)

    app.on_startup.append(on_startup)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    service = app[AUTH]
    hub = Hub(db, client, service.store, service.audit)
    try:
        uid = _user(hub, "s@hanoi.gov.vn", "noc", "province=Hà Nội")
        await hub.login("s@hanoi.gov.vn")
        await asyncio.to_thread(service.store.set_user_disabled, uid, True, cli_actor(), "test")
        await asyncio.wait_for(seen.wait(), 10)
        assert revocations == [Revocation("user_disabled", user_id=uid)]
        assert (await client.get("/me/sites", allow_redirects=False)).status == 303
    finally:
        await client.close()
        db.close()


async def test_the_audit_chain_head_goes_to_the_log_output(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="central_hub.audit")
    db = _make_db(sqlite_url)
    app = build_app(db)
    app[AUTH].audit.record("config_change", actor="cli:root", detail={"key": "auth.secret"})
    loop = asyncio.get_running_loop()
    written = asyncio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if parse_anchors([record.getMessage()]):
                loop.call_soon_threadsafe(written.set)

    watch = Watch()
    logging.getLogger("central_hub.audit").addHandler(watch)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    try:
        await client.start_server()
        await asyncio.wait_for(written.wait(), 10)
    finally:
        await client.close()
        logging.getLogger("central_hub.audit").removeHandler(watch)
    anchors = parse_anchors(caplog.messages)
    assert anchors and anchors[0][0] == 1
    assert app[AUTH].audit.verify(anchors).ok
    db.close()
