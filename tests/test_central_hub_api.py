"""The hub's JSON API over real HTTP on loopback, on SQLite and PostgreSQL: the whole hub app
(`make_hub` + `build_app`), state written by the ingest's own batch writer from real sitelink
messages, users from the account store.

Proves: lists are filtered to the user's scope; every object endpoint answers 403 and writes
an audit row for another province's ids (IDOR); tickets move through their life over JSON with
CSRF; thumbnails are footage; bad parameters are 400; the alert WebSocket pushes only the
user's alerts and closes when the session ends; the OpenAPI document matches the router."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pyotp
import pytest
import sqlalchemy as sa
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from central_hub.accounts import AccountStore, AuthConfig
from central_hub.api import ROUTES, openapi_document
from central_hub.app import Hub, build_app, make_hub
from central_hub.audit import audit_log
from central_hub.hub_config import DatabaseConfig, HubConfig, TicketsConfig, WebConfig
from central_hub.ingest import Accepted, BatchWriter, SiteDirectory
from central_hub.policy import Scope
from central_hub.sites_cli import enroll_site
from central_hub.tickets import TicketScheduler
from central_hub.web_auth import AUTH, CSRF_HEADER
from sitelink.messages import (
    CameraDown,
    CameraHealth,
    CameraInfo,
    CameraUp,
    Health,
    Inventory,
    Message,
    SiteHealth,
    SiteInfo,
    StateBirth,
    StreamProfile,
    encode,
)

PASSWORD = "mật-khẩu-bảng-điều-khiển-2025"
AUTH_CONFIG = AuthConfig(
    argon2_memory_kib=19456, argon2_time_cost=1, cookie_secure=False, secret=b"a" * 32
)
JPEG = b"\xff\xd8\xff\xe0" + b"thumbnail" * 20 + b"\xff\xd9"
CSRF_RE = re.compile(r'name="csrf_token" value="([0-9a-f]{64})"')

#: site id → province, district, kind, authority, operator
SITES: dict[str, tuple[str, str | None, str, str, str]] = {
    "hn-bd-01": ("Hà Nội", "Ba Đình", "facility", "military", "viettel"),
    "hn-hk-02": ("Hà Nội", "Hoàn Kiếm", "checkpoint", "police", "viettel"),
    "cb-ha-01": ("Cao Bằng", "Hòa An", "facility", "health", "viettel"),
    "dn-hc-01": ("Đà Nẵng", "Hải Châu", "facility", "health", "vnpt"),
}


# --- state written through the ingest's writer ----------------------------------------------


class SiteFeed:
    """Applies real sitelink messages to the database with the ingest's BatchWriter (the code
    path MQTT messages take), and hands the alerts it makes to the hub's AlertHub."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        directory = SiteDirectory(hub.db)
        directory.refresh()
        self.writer = BatchWriter(hub.db, directory)
        self.seq: dict[str, int] = {}

    def send(self, site_id: str, *messages: Message, at: float | None = None) -> list[Any]:
        at = time.time() if at is None else at
        result = self.writer.apply(
            [Accepted(site_id, m.TOPIC_KIND, m, encode(m), at) for m in messages]
        )
        return result.alerts

    def next_seq(self, site_id: str) -> int:
        self.seq[site_id] = self.seq.get(site_id, 0) + 1
        return self.seq[site_id]

    def birth(self, site_id: str, ts: float) -> StateBirth:
        return StateBirth(ts=ts, bdseq=1, agent_version="0.1.0", started=ts, last_seq=0)

    def down(self, site_id: str, camera: str, ts: float) -> CameraDown:
        return CameraDown(ts=ts, seq=self.next_seq(site_id), camera=camera, cause="timeout")

    def up(self, site_id: str, camera: str, ts: float) -> CameraUp:
        return CameraUp(ts=ts, seq=self.next_seq(site_id), camera=camera)


def inventory(site_id: str, cams: list[str], ts: float) -> Inventory:
    prov, dist, kind, authority, operator = SITES[site_id]
    return Inventory(
        ts=ts,
        site=SiteInfo.model_validate(
            {
                "province": prov,
                "district": dist,
                "kind": kind,
                "authority": authority,
                "operator": operator,
            }
        ),
        cameras=[
            CameraInfo(
                id=c,
                name=f"Camera {c}",
                record_profile="main",
                state="recording",
                profiles=[StreamProfile(token="main", codec="h264", width=1280, height=720)],
            )
            for c in cams
        ],
    )


def health(cams: list[str], ts: float, thumbnail_for: str | None = None) -> Health:
    return Health(
        ts=ts,
        site=SiteHealth(
            disk_total_bytes=4 * 2**40,
            disk_used_bytes=2**40,
            disk_free_bytes=3 * 2**40,
            forecast_days=41.0,
            cpu_percent=10.0,
            mem_total_bytes=2**33,
            mem_used_bytes=2**30,
            agent_version="0.1.0",
            uptime_s=100.0,
            spool_depth=0,
        ),
        cameras=[
            CameraHealth(
                camera=c,
                connected=True,
                recording="recording",
                fps=25.0,
                bitrate_kbps=2000.0,
                reconnects_1h=0,
                thumbnail_jpeg=base64.b64encode(JPEG).decode() if c == thumbnail_for else None,
            )
            for c in cams
        ],
    )


def populate(hub: Hub, t0: float) -> SiteFeed:
    """Hà Nội: hn-bd-01 with cam-2 down (ticket), hn-hk-02 all fine; Cao Bằng: cb-ha-01 with
    cam-1 down (ticket) and a past outage; Đà Nẵng: dn-hc-01 never heard from."""
    with hub.db.engine.begin() as conn:
        for sid, (prov, dist, kind, authority, operator) in SITES.items():
            enroll_site(
                conn,
                site_id=sid,
                province=prov,
                district=dist,
                kind=kind,
                authority=authority,
                operator=operator,
                name=f"Điểm {sid}",
                now=t0 - 100,
            )
    feed = SiteFeed(hub)
    for sid, cams in (
        ("hn-bd-01", ["cam-1", "cam-2"]),
        ("hn-hk-02", ["cam-1"]),
        ("cb-ha-01", ["cam-1", "cam-2"]),
    ):
        feed.send(sid, feed.birth(sid, t0), inventory(sid, cams, t0 + 1), at=t0 + 1)
        feed.send(sid, health(cams, t0 + 2, thumbnail_for="cam-1"), at=t0 + 2)
    feed.send("hn-bd-01", feed.down("hn-bd-01", "cam-2", t0 + 10), at=t0 + 10)
    feed.send("cb-ha-01", feed.down("cb-ha-01", "cam-2", t0 + 20), at=t0 + 20)
    feed.send("cb-ha-01", feed.up("cb-ha-01", "cam-2", t0 + 70), at=t0 + 70)
    feed.send("cb-ha-01", feed.down("cb-ha-01", "cam-1", t0 + 100), at=t0 + 100)
    TicketScheduler(hub.db, TicketsConfig(threshold_s=60.0)).check_once(time.time())
    return feed


def ticket_ids(hub: Hub) -> dict[str, int]:
    """site id → the id of its (first) ticket."""
    from central_hub.status import tickets

    with hub.db.engine.connect() as conn:
        rows = conn.execute(sa.select(tickets.c.site_id, tickets.c.id).order_by(tickets.c.id))
        out: dict[str, int] = {}
        for sid, tid in rows:
            out.setdefault(sid, tid)
        return out


# --- the running hub ------------------------------------------------------------------------


@dataclass
class Board:
    hub: Hub
    client: TestClient[web.Request, web.Application]
    store: AccountStore
    feed: SiteFeed
    t0: float

    def user(self, email: str, role: str, scope: str, *more: tuple[str, str]) -> int:
        uid = self.store.create_user(email, "Cán bộ " + role, PASSWORD, role, Scope.parse(scope))
        for r, s in more:
            self.store.add_grant(uid, r, Scope.parse(s), _cli())
        return uid

    async def csrf(self, path: str = "/login") -> str:
        page = await self.client.get(path)
        m = CSRF_RE.search(await page.text())
        assert m, f"no CSRF token on {path}"
        return m.group(1)

    async def login(self, email: str, user_id: int | None = None, totp: bool = False) -> None:
        self.client.session.cookie_jar.clear()
        token = await self.csrf("/login")
        resp = await self.client.post(
            "/login",
            data={"email": email, "password": PASSWORD, "csrf_token": token},
            allow_redirects=False,
        )
        assert resp.status == 303, await resp.text()
        if totp:
            assert user_id is not None
            secret, _ = self.store.totp_begin_enrolment(user_id)
            code = pyotp.TOTP(secret)
            assert self.store.totp_confirm_enrolment(user_id, code.now(), "test")
            # The enrolment session is over; log in again with the next code.
            self.client.session.cookie_jar.clear()
            token = await self.csrf("/login")
            resp = await self.client.post(
                "/login",
                data={"email": email, "password": PASSWORD, "csrf_token": token},
                allow_redirects=False,
            )
            token = await self.csrf("/login/totp")
            resp = await self.client.post(
                "/login/totp",
                data={"code": code.at(time.time() + 30), "csrf_token": token},
                allow_redirects=False,
            )
            assert resp.status == 303, await resp.text()
        me = await self.client.get("/api/me")
        assert me.status == 200

    async def api_csrf(self) -> str:
        return str((await (await self.client.get("/api/me")).json())["csrf_token"])

    async def get_json(self, path: str, status: int = 200) -> Any:
        resp = await self.client.get(path)
        assert resp.status == status, (path, resp.status, await resp.text())
        return await resp.json()

    def denied_rows(self) -> list[dict[str, Any]]:
        with self.hub.db.engine.connect() as conn:
            return [
                dict(r._mapping)
                for r in conn.execute(
                    sa.select(audit_log)
                    .where(audit_log.c.allowed == sa.false())
                    .order_by(audit_log.c.seq)
                )
            ]

    def audit_rows(self, action: str) -> list[dict[str, Any]]:
        with self.hub.db.engine.connect() as conn:
            return [
                dict(r._mapping)
                for r in conn.execute(
                    sa.select(audit_log)
                    .where(audit_log.c.action == action)
                    .order_by(audit_log.c.seq)
                )
            ]


def _cli() -> Any:
    from central_hub.accounts import cli_actor

    return cli_actor()


async def start_board(url: str) -> AsyncIterator[Board]:
    config = HubConfig(database=DatabaseConfig(url=url), web=WebConfig(host="127.0.0.1", port=0))
    hub = make_hub(config, AUTH_CONFIG)
    t0 = time.time() - 3600
    feed = populate(hub, t0)
    app: web.Application = build_app(hub)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield Board(hub, client, app[AUTH].store, feed, t0)
    finally:
        await client.close()
        hub.db.close()


@pytest.fixture
async def board(tmp_path: Any) -> AsyncIterator[Board]:
    """The hub on SQLite."""
    async for b in start_board(f"sqlite:///{tmp_path / 'hub.db'}"):
        yield b


@pytest.fixture
async def any_board(hub_db_url: str) -> AsyncIterator[Board]:
    """The hub on SQLite, then on PostgreSQL."""
    async for b in start_board(hub_db_url):
        yield b


@pytest.fixture
def routes() -> Iterator[dict[str, str]]:
    yield {r.operation_id: r.path for r in ROUTES}


# --- scope filtering of lists ---------------------------------------------------------------


async def test_lists_show_only_the_users_scope(any_board: Board) -> None:
    b = any_board
    b.user("noc@vnpt.gov.vn", "noc", "nation")
    b.user("noc@hanoi.gov.vn", "noc", "province=Hà Nội")
    await b.login("noc@vnpt.gov.vn")
    board = await b.get_json("/api/board")
    assert [g["province"] for g in board["groups"]] == ["Cao Bằng", "Hà Nội", "Đà Nẵng"]
    assert board["totals"]["sites"] == 4 and board["totals"]["never_seen"] == 1
    assert board["totals"]["cameras"] == 5 and board["totals"]["cameras_down"] == 2
    districts = await b.get_json("/api/board?group_by=district&province=H%C3%A0%20N%E1%BB%99i")
    assert [(g["district"], g["rag"]) for g in districts["groups"]] == [
        ("Ba Đình", "amber"),
        ("Hoàn Kiếm", "green"),
    ]
    by_op = await b.get_json("/api/board?group_by=operator&kind=facility")
    assert {g["operator"]: g["sites"] for g in by_op["groups"]} == {"viettel": 2, "vnpt": 1}
    tickets = await b.get_json("/api/tickets")
    assert sorted(t["site_id"] for t in tickets["items"]) == ["cb-ha-01", "hn-bd-01"]

    await b.login("noc@hanoi.gov.vn")
    board = await b.get_json("/api/board")
    assert [g["province"] for g in board["groups"]] == ["Hà Nội"]
    # A filter naming another province finds nothing: it narrows the scope, never widens it.
    other = await b.get_json("/api/board?province=Cao%20B%E1%BA%B1ng")
    assert other["groups"] == [] and other["totals"] is None
    sites = await b.get_json("/api/sites")
    assert sites["total"] == 2 and [s["site_id"] for s in sites["items"]] == [
        "hn-bd-01",
        "hn-hk-02",
    ]
    red = await b.get_json("/api/sites?rag=green&q=hk")
    assert [s["site_id"] for s in red["items"]] == ["hn-hk-02"]
    faults = await b.get_json("/api/faults")
    assert [(f["site_id"], f["camera_id"]) for f in faults["items"]] == [("hn-bd-01", "cam-2")]
    assert faults["items"][0]["faults"] == ["camera_down:timeout"]
    tickets = await b.get_json("/api/tickets")
    assert [t["site_id"] for t in tickets["items"]] == ["hn-bd-01"]
    outages = await b.get_json(f"/api/outages?since={b.t0 - 10:.0f}")
    assert {o["site_id"] for o in outages["items"]} == {"hn-bd-01"}
    uptime = await b.get_json(f"/api/uptime?since={b.t0:.0f}&level=site")
    assert [u["site_id"] for u in uptime["items"]] == ["hn-bd-01", "hn-hk-02"]
    assert uptime["items"][1]["uptime_pct"] == pytest.approx(100.0)
    mttr = await b.get_json("/api/mttr")
    assert mttr["items"] == []  # nothing resolved yet in Hà Nội
    me = await b.get_json("/api/me")
    assert me["can"]["view_status"] and not me["can"]["view_live"]
    assert me["grants"] == [{"role": "noc", "scope": "province=Hà Nội", "expires_at": None}]


async def test_a_role_without_the_action_is_refused_lists_with_an_audit_row(board: Board) -> None:
    board.user("status@hanoi.gov.vn", "status", "province=Hà Nội")
    await board.login("status@hanoi.gov.vn")
    assert (await board.get_json("/api/sites"))["total"] == 2  # status may see status
    for path in ("/api/tickets", "/api/outages", "/api/uptime", "/api/mttr"):
        before = len(board.denied_rows())
        body = await board.get_json(path, status=403)
        assert body == {"error": "Forbidden", "status": 403}
        rows = board.denied_rows()[before:]
        assert [(r["action"], r["reason"]) for r in rows] == [("view_outages", "role_lacks_action")]
    board.client.session.cookie_jar.clear()
    assert (await board.client.get("/api/board")).status == 401


# --- objects: the IDOR probe ----------------------------------------------------------------

#: (method, path template, action) — every object endpoint of the API and the board pages.
OBJECT_ENDPOINTS: list[tuple[str, str, str]] = [
    ("GET", "/api/sites/{site}", "view_status"),
    ("GET", "/api/sites/{site}/cameras", "view_status"),
    ("GET", "/api/sites/{site}/cameras/cam-1/thumbnail", "view_snapshot"),
    ("GET", "/api/sites/{site}/outages", "view_outages"),
    ("GET", "/api/sites/{site}/events", "view_status"),
    ("GET", "/api/sites/{site}/missing", "view_status"),
    ("GET", "/api/sites/{site}/uptime", "view_outages"),
    ("GET", "/api/tickets/{ticket}", "view_outages"),
    ("POST", "/api/tickets/{ticket}/acknowledge", "manage_tickets"),
    ("POST", "/api/tickets/{ticket}/assign", "manage_tickets"),
    ("POST", "/api/tickets/{ticket}/note", "manage_tickets"),
    ("POST", "/api/tickets/{ticket}/close", "manage_tickets"),
    ("GET", "/board/sites/{site}", "view_status"),
    ("GET", "/board/tickets/{ticket}", "view_outages"),
    ("POST", "/board/tickets/{ticket}/acknowledge", "manage_tickets"),
    ("POST", "/board/tickets/{ticket}/assign", "manage_tickets"),
    ("POST", "/board/tickets/{ticket}/note", "manage_tickets"),
    ("POST", "/board/tickets/{ticket}/close", "manage_tickets"),
]


async def _call(b: Board, method: str, path: str, token: str) -> Any:
    if method == "GET":
        return await b.client.get(path, allow_redirects=False)
    if path.startswith("/api/"):
        return await b.client.post(
            path, json={"assignee": "Đội 3", "text": "kiểm tra"}, headers={CSRF_HEADER: token}
        )
    return await b.client.post(
        path,
        data={"csrf_token": token, "assignee": "Đội 3", "text": "kiểm tra"},
        allow_redirects=False,
    )


async def test_every_object_endpoint_refuses_another_provinces_ids_with_an_audit_row(
    any_board: Board,
) -> None:
    b = any_board
    uid = b.user("v@hanoi.gov.vn", "viewer", "province=Hà Nội", ("noc", "province=Hà Nội"))
    await b.login("v@hanoi.gov.vn", uid, totp=True)
    token = await b.api_csrf()
    ids = ticket_ids(b.hub)
    mine = {"site": "hn-bd-01", "ticket": ids["hn-bd-01"]}
    theirs = {"site": "cb-ha-01", "ticket": ids["cb-ha-01"]}
    problems: list[str] = []
    for method, template, action in OBJECT_ENDPOINTS:
        if method == "GET":  # its own province: allowed
            resp = await _call(b, method, template.format(**mine), token)
            if resp.status != 200:
                problems.append(f"own {template}: {resp.status}")
        path = template.format(**theirs)
        before = len(b.denied_rows())
        resp = await _call(b, method, path, token)
        rows = b.denied_rows()[before:]
        if resp.status != 403:
            problems.append(f"{method} {path}: {resp.status}, wanted 403")
        elif [(r["action"], r["site_id"], r["reason"]) for r in rows] != [
            (action, "cb-ha-01", "out_of_scope")
        ]:
            problems.append(f"{method} {path}: audit rows {rows}")
    assert problems == []
    # Ids that do not exist are simply not found.
    assert (await b.client.get("/api/sites/zz-nowhere-01")).status == 404
    assert (await b.client.get("/api/tickets/999999")).status == 404
    assert (await b.client.get("/board/sites/zz-nowhere-01")).status == 404
    # The viewer may see pictures of its own province: allowed, and audited as footage.
    allowed = [r for r in b.audit_rows("view_snapshot") if r["allowed"]]
    assert [(r["site_id"], r["camera_id"]) for r in allowed] == [("hn-bd-01", "cam-1")]
    assert b.hub.audit.verify().ok


async def test_thumbnails_are_footage(board: Board) -> None:
    board.user("noc@hanoi.gov.vn", "noc", "province=Hà Nội")
    uid = board.user("v@hanoi.gov.vn", "viewer", "province=Hà Nội")
    await board.login("noc@hanoi.gov.vn")
    path = "/api/sites/hn-bd-01/cameras/cam-1/thumbnail"
    assert (await board.client.get(path)).status == 403
    assert board.denied_rows()[-1]["reason"] == "role_lacks_action"
    await board.login("v@hanoi.gov.vn", uid, totp=True)
    resp = await board.client.get(path)
    assert resp.status == 200 and resp.content_type == "image/jpeg"
    assert await resp.read() == JPEG and resp.headers["Cache-Control"] == "no-store"
    assert (await board.client.get("/api/sites/hn-bd-01/cameras/cam-2/thumbnail")).status == 404


# --- tickets over JSON ----------------------------------------------------------------------


async def test_a_ticket_is_taken_assigned_noted_and_closed_after_the_outage(board: Board) -> None:
    board.user("noc@hanoi.gov.vn", "noc", "province=Hà Nội")
    await board.login("noc@hanoi.gov.vn")
    tid = ticket_ids(board.hub)["hn-bd-01"]
    base = f"/api/tickets/{tid}"
    assert (await board.client.post(f"{base}/acknowledge", json={})).status == 403  # no CSRF
    token = await board.api_csrf()
    h = {CSRF_HEADER: token}

    async def post(action: str, body: Any, status: int = 200) -> Any:
        resp = await board.client.post(f"{base}/{action}", json=body, headers=h)
        assert resp.status == status, await resp.text()
        return await resp.json()

    assert (await post("acknowledge", {"note": "đang xử lý"}))["state"] == "acknowledged"
    assert (await post("assign", {"assignee": "Tổ kỹ thuật VNPT Ba Đình"}))["assignee"] == (
        "Tổ kỹ thuật VNPT Ba Đình"
    )
    await post("note", {"text": "đã gọi điện cho cơ sở"})
    refused = await post("close", {}, status=409)
    assert "still going on" in refused["error"]
    await post("assign", {}, status=400)
    await post("note", {"text": 5}, status=400)
    bad = await board.client.post(
        f"{base}/note", data="[1]", headers={**h, "Content-Type": "application/json"}
    )
    assert bad.status == 400
    # The camera comes back: the ingest resolves the ticket; now a person may close it.
    board.feed.send("hn-bd-01", board.feed.up("hn-bd-01", "cam-2", time.time()))
    closed = await post("close", {"note": "camera đã hoạt động lại"})
    assert closed["state"] == "closed" and closed["closed_by"] == "noc@hanoi.gov.vn"
    assert [n["action"] for n in closed["notes"]] == [
        "open",
        "acknowledged",
        "assigned",
        "note",
        "resolved",
        "closed",
    ]
    mttr = await board.get_json(f"/api/mttr?since={board.t0:.0f}")
    assert [(r["province"], r["tickets"], r["closed"]) for r in mttr["items"]] == [("Hà Nội", 1, 1)]


# --- input validation -----------------------------------------------------------------------


async def test_bad_parameters_are_refused_with_a_reason(board: Board) -> None:
    board.user("noc@vnpt.gov.vn", "noc", "nation")
    await board.login("noc@vnpt.gov.vn")
    for path, word in (
        ("/api/board?group_by=camera", "group_by"),
        ("/api/sites?limit=0", "limit"),
        ("/api/sites?limit=abc", "limit"),
        ("/api/sites?operator=fpt", "operator"),
        ("/api/sites?rag=purple", "rag"),
        ("/api/sites?province=" + "x" * 200, "province"),
        ("/api/sites?province=a%00b", "province"),
        ("/api/outages?since=nan", "since"),
        ("/api/outages?since=100&until=50", "since"),
        ("/api/uptime?since=0&until=99999999", "period"),
        ("/api/tickets?state=lost", "state"),
        ("/api/sites/hn-bd-01/events?kind=DROP%20TABLE", "kind"),
        ("/api/sites/hn-bd-01/outages?camera_id=../x", "camera_id"),
    ):
        body = await board.get_json(path, status=400)
        assert word in body["error"], (path, body)
    assert (await board.client.get("/api/sites/..%2Fetc")).status == 404


# --- the alert socket -----------------------------------------------------------------------


async def _next_alert(ws: Any, within: float = 5.0) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), within)
    assert msg.type == WSMsgType.TEXT, msg
    data: dict[str, Any] = json.loads(msg.data)
    return data


async def test_the_alert_socket_pushes_only_the_users_alerts_and_ends_with_the_session(
    board: Board,
) -> None:
    uid = board.user("noc@hanoi.gov.vn", "noc", "province=Hà Nội")
    assert (await board.client.get("/api/alerts")).status == 401
    await board.login("noc@hanoi.gov.vn")
    other = await board.client.get(
        "/api/alerts",
        headers={"Origin": "https://evil.example", "Connection": "Upgrade", "Upgrade": "websocket"},
    )
    assert other.status == 403
    ws = await board.client.ws_connect("/api/alerts")
    hello = await _next_alert(ws)
    assert hello["type"] == "hello" and hello["user"] == "noc@hanoi.gov.vn"
    # Real alerts from the ingest's writer: a camera of Cao Bằng, then one of Hà Nội.
    feed = board.feed
    for sid in ("cb-ha-01", "hn-hk-02"):
        alerts = feed.send(
            sid, feed.down(sid, "cam-1" if sid == "hn-hk-02" else "cam-2", time.time())
        )
        assert alerts
        board.hub.alerts.publish_many(alerts)
    got = await _next_alert(ws)
    assert got["type"] == "outage_opened" and got["site_id"] == "hn-hk-02"
    assert got["text_vi"] and got["text_en"]
    metrics = await (await board.client.get("/metrics")).text()
    assert "isocam_hub_alert_sockets 1.0" in metrics
    assert re.search(r"isocam_hub_alerts_withheld_total [1-9]", metrics), metrics
    # Disabling the user ends its session: the socket closes at once with 4401.
    board.store.set_user_disabled(uid, True, _cli(), "test")
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED) and ws.close_code == 4401
    await ws.close()


async def test_metrics_show_the_ingest_and_the_board(board: Board) -> None:
    board.user("noc@vnpt.gov.vn", "noc", "nation")
    await board.login("noc@vnpt.gov.vn")
    await board.get_json("/api/board")
    text = await (await board.client.get("/metrics")).text()
    for name in (
        "isocam_hub_ingest_received_total",
        "isocam_hub_alert_sockets",
        "isocam_hub_alerts_published_total",
        'isocam_hub_web_request_seconds_count{method="GET",route="/api/board"}',
    ):
        assert name in text, name


# --- the OpenAPI document -------------------------------------------------------------------


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


async def test_the_openapi_document_describes_every_api_route(board: Board) -> None:
    served = await board.get_json("/api/openapi.json")  # public: no login needed
    doc = openapi_document()
    assert served == json.loads(json.dumps(doc, ensure_ascii=False))
    assert doc["openapi"].startswith("3.0.") and doc["info"]["title"] and doc["info"]["version"]
    # Every route the router serves under /api/ is documented, and nothing else is.
    mounted: set[tuple[str, str]] = set()
    assert board.client.app is not None
    for route in board.client.app.router.routes():
        info = route.resource.canonical if route.resource is not None else ""
        if info.startswith("/api/") and route.method != "HEAD":
            mounted.add((route.method.lower(), re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", info)))
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert mounted == documented
    op_ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(op_ids) == len(set(op_ids))
    for path, ops in doc["paths"].items():
        declared = set(re.findall(r"\{(\w+)\}", path))
        for method, op in ops.items():
            assert method in ("get", "post", "put", "delete", "patch"), method
            params = {p["name"] for p in op["parameters"] if p["in"] == "path"}
            assert params == declared, (path, params)
            for p in op["parameters"]:
                assert p["in"] in ("path", "query", "header", "cookie") and "schema" in p
                assert p["required"] or p["in"] != "path"
            assert "200" in op["responses"] and "403" in op["responses"]
            for code, resp in op["responses"].items():
                assert re.fullmatch(r"[1-5][0-9][0-9]", code) and resp["description"]
            for s in op.get("security", []):
                assert set(s) <= set(doc["components"]["securitySchemes"])
    for node in _walk(doc):  # every $ref resolves, every schema type is an OpenAPI 3.0 type
        if isinstance(node, dict) and "$ref" in node:
            assert isinstance(_resolve(doc, node["$ref"]), dict)
        if isinstance(node, dict) and isinstance(node.get("type"), str) and "properties" in node:
            assert node["type"] == "object"
    types = {
        n["type"]
        for n in _walk(doc)
        if isinstance(n, dict)
        and isinstance(n.get("type"), str)
        and ("format" in n or "enum" in n or "properties" in n or "items" in n)
    }
    assert types <= {"object", "array", "string", "integer", "number", "boolean", "apiKey"}
