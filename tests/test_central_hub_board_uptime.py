"""The board's uptime page, its CSV and the site page's uptime, over real HTTP on SQLite and
PostgreSQL: the whole hub app, a ledger written by the ingest's own BatchWriter from real
sitelink messages on a past day with known outages, so every figure below is worked out by
hand; scope (a provincial user, the CSV too, 403 without the right); both languages; the
period arithmetic in Vietnam time; one headless Chromium run (period switch, drill-down, the
custom dates form)."""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import AsyncIterator, Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from central_hub import queries
from central_hub.app import Hub, build_app, make_hub
from central_hub.board import fmt_pct, uptime_bar, uptime_colour
from central_hub.board_uptime import (
    CSV_TABLES,
    PeriodError,
    UptimeView,
    csv_text,
    parse_period,
    uptime_data,
    vn_day,
    vn_midnight,
)
from central_hub.hub_config import DatabaseConfig, HubConfig, TicketsConfig, WebConfig
from central_hub.ingest import Accepted, BatchWriter, SiteDirectory
from central_hub.policy import Scope
from central_hub.sites_cli import enroll_site
from central_hub.tickets import TicketScheduler
from central_hub.web_auth import AUTH
from sitelink.messages import (
    CameraDown,
    CameraInfo,
    CameraUp,
    Inventory,
    Message,
    SiteInfo,
    StateBirth,
    StateDeath,
    StreamProfile,
    encode,
)
from tests.test_central_hub_api import AUTH_CONFIG, PASSWORD, Board, SiteFeed
from tests.test_central_hub_browser_board import (  # noqa: F401 (browser is a fixture)
    HubThread,
    browser,
    click,
    css,
    log_in,
    wait,
)

DAY = 86400.0
#: site id → province, district, kind, operator, cameras
SITES: dict[str, tuple[str, str, str, str, list[str]]] = {
    "hn-a": ("Hà Nội", "Ba Đình", "facility", "viettel", ["c1", "c2"]),
    "hn-b": ("Hà Nội", "Hoàn Kiếm", "checkpoint", "viettel", ["c1"]),
    "cb-a": ("Cao Bằng", "Hòa An", "facility", "vnpt", ["c1", "c2"]),
    "dn-a": ("Đà Nẵng", "Hải Châu", "facility", "vnpt", ["c1"]),
}

# The ledger of day D (00:00 = M, Vietnam time); every camera and site is known from M - 1 h,
# so each camera is monitored the whole day (86,400 s) and each site too.
#   hn-a: c1 down M+1h … M+1h30 (1,800 s); the site offline M+2h … M+2h10 (600 s: both
#         cameras down with it). c1 2,400 s down, c2 600 s.
#   cb-a: c2 down M+10,000 s for 2 h (7,200 s).
#   hn-b, dn-a: nothing.
# Tickets (threshold 60 s), all repaired within D: 1,800 s and 600 s (Hà Nội), 7,200 s (Cao Bằng).
EXPECTED = {
    # camera uptime %, site connectivity %
    "hn-a": (100 * (2 * DAY - 3000) / (2 * DAY), 100 * (DAY - 600) / DAY),  # 98.2639, 99.3056
    "hn-b": (100.0, 100.0),
    "cb-a": (100 * (2 * DAY - 7200) / (2 * DAY), 100.0),  # 95.8333
    "dn-a": (100.0, 100.0),
    "Hà Nội": (100 * (3 * DAY - 3000) / (3 * DAY), 100 * (2 * DAY - 600) / (2 * DAY)),
    "Cao Bằng": (100 * (2 * DAY - 7200) / (2 * DAY), 100.0),
    "Đà Nẵng": (100.0, 100.0),
    "nation": (100 * (6 * DAY - 10200) / (6 * DAY), 100 * (4 * DAY - 600) / (4 * DAY)),
    "viettel": (100 * (3 * DAY - 3000) / (3 * DAY), 100 * (2 * DAY - 600) / (2 * DAY)),
    "vnpt": (100 * (3 * DAY - 7200) / (3 * DAY), 100.0),  # 97.2222
    "c1": (100 * (DAY - 2400) / DAY, None),  # hn-a's cameras: 97.2222
    "c2": (100 * (DAY - 600) / DAY, None),  # 99.3056
}


class SiteLog:
    """One site's edge as the hub hears it: messages applied by the ingest's BatchWriter (the
    path MQTT messages take) at chosen receive times."""

    def __init__(self, hub: Hub, site_id: str) -> None:
        directory = SiteDirectory(hub.db)
        directory.refresh()
        self.writer = BatchWriter(hub.db, directory)
        self.site_id = site_id
        self.seq = 0
        self.bdseq = 0

    def send(self, *messages: Message, at: float) -> None:
        self.writer.apply(
            [Accepted(self.site_id, m.TOPIC_KIND, m, encode(m), at) for m in messages]
        )

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def birth(self, at: float) -> None:
        self.bdseq += 1
        self.send(
            StateBirth(ts=at, bdseq=self.bdseq, agent_version="1.0", started=at, last_seq=self.seq),
            at=at,
        )

    def death(self, at: float) -> None:
        self.send(StateDeath(ts=at, bdseq=self.bdseq, agent_version="1.0", reason="lost"), at=at)

    def inventory(self, at: float) -> None:
        province, district, kind, operator, cams = SITES[self.site_id]
        info = SiteInfo(
            province=province,
            district=district,
            kind=kind,  # type: ignore[arg-type]
            authority="health",
            operator=operator,  # type: ignore[arg-type]
        )
        profile = StreamProfile(token="main", codec="h264", width=1280, height=720)
        cameras = [
            CameraInfo(
                id=c, name=f"Cổng {c}", record_profile="main", state="recording", profiles=[profile]
            )
            for c in cams
        ]
        self.send(Inventory(ts=at, site=info, cameras=cameras), at=at)

    def outage(self, camera: str, start: float, end: float) -> None:
        self.send(CameraDown(ts=start, seq=self._next(), camera=camera, cause="timeout"), at=start)
        self.send(CameraUp(ts=end, seq=self._next(), camera=camera), at=end)


def build_ledger(hub: Hub, m: float) -> None:
    """The sites of SITES and the ledger of the day starting at `m` (see EXPECTED)."""
    with hub.db.engine.begin() as conn:
        for sid, (province, district, kind, operator, _) in SITES.items():
            enroll_site(
                conn,
                site_id=sid,
                province=province,
                district=district,
                kind=kind,
                authority="health",
                operator=operator,
                name=f"Điểm {sid}",
                now=m - 7200,
            )
    logs = {sid: SiteLog(hub, sid) for sid in SITES}
    for log in logs.values():
        log.birth(m - 3600)
        log.inventory(m - 3600)
    logs["hn-a"].outage("c1", m + 3600, m + 5400)
    logs["hn-a"].death(m + 7200)
    logs["hn-a"].birth(m + 7800)
    logs["cb-a"].outage("c2", m + 10_000, m + 17_200)
    TicketScheduler(hub.db, TicketsConfig(threshold_s=60.0)).check_once(time.time())


def the_day() -> tuple[date, float]:
    """Day D (three days ago in Vietnam) and its 00:00."""
    d = vn_day(time.time()) - timedelta(days=3)
    return d, vn_midnight(d)


async def start(url: str) -> AsyncIterator[tuple[Board, date]]:
    config = HubConfig(database=DatabaseConfig(url=url), web=WebConfig(host="127.0.0.1", port=0))
    hub = make_hub(config, AUTH_CONFIG)
    d, m = the_day()
    build_ledger(hub, m)
    app: web.Application = build_app(hub)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield Board(hub, client, app[AUTH].store, SiteFeed(hub), m), d
    finally:
        await client.close()
        hub.db.close()


@pytest.fixture
async def any_board(hub_db_url: str) -> AsyncIterator[tuple[Board, date]]:
    """The hub with the ledger of day D, on SQLite then on PostgreSQL."""
    async for b in start(hub_db_url):
        yield b


@pytest.fixture
async def board(tmp_path: Path) -> AsyncIterator[tuple[Board, date]]:
    async for b in start(f"sqlite:///{tmp_path / 'hub.db'}"):
        yield b


async def page(b: Board, path: str, status: int = 200) -> str:
    resp = await b.client.get(path, allow_redirects=False)
    text = await resp.text()
    assert resp.status == status, (path, resp.status, text[:500])
    return text


def rows(html: str, kind: str) -> list[dict[str, Any]]:
    """The uptime rows of one kind (group, operator, site, camera): their data-* attributes,
    colour and cell texts."""
    out = []
    pattern = rf'<tr class="up-row {kind} up-(\w+)"([^>]*)>(.*?)</tr>'
    for colour, attrs, body in re.findall(pattern, html, re.S):
        row: dict[str, Any] = dict(re.findall(r'data-([\w-]+)="([^"]*)"', attrs))
        row["colour"] = colour
        row["cells"] = [
            re.sub(r"<[^>]+>", "", c).strip()
            for c in re.findall(r"<td[^>]*>(.*?)</td>", body, re.S)
        ]
        out.append(row)
    return out


def pct_of(row: dict[str, Any], name: str = "uptime") -> float:
    return float(row[name])


def day_query(d: date) -> str:
    return f"period=custom&from={d.isoformat()}&to={d.isoformat()}"


def read_csv(text: str) -> list[list[str]]:
    assert text.startswith("\ufeff")  # a spreadsheet then reads UTF-8
    return list(csv.reader(io.StringIO(text[1:])))


# --- the figures ----------------------------------------------------------------------------


async def test_the_page_gives_hand_computed_uptime_and_mttr_at_every_level(
    any_board: tuple[Board, date],
) -> None:
    b, d = any_board
    b.user("noc@vnpt.gov.vn", "noc", "nation")
    await b.login("noc@vnpt.gov.vn")
    html = await page(b, f"/board/uptime?{day_query(d)}")
    assert "Tỷ lệ hoạt động của camera và điểm" in html and 'id="menu-uptime"' in html

    # Provinces, worst first, with their colours and MTTR (mean, longest, tickets).
    groups = rows(html, "group")
    assert [g["group"] for g in groups] == ["Cao Bằng", "Hà Nội", "Đà Nẵng"]
    for g in groups:
        up, site = EXPECTED[g["group"]]
        assert pct_of(g) == pytest.approx(up, abs=1e-4)
        assert pct_of(g, "site-uptime") == pytest.approx(site, abs=1e-4)
    assert [g["colour"] for g in groups] == ["red", "amber", "green"]
    cb, hn, dn = (g["cells"] for g in groups)
    # name, sites, cameras, uptime, down, site %, site down, MTTR, longest, tickets
    assert cb == [
        "Cao Bằng",
        "1",
        "2",
        "95,83 %",
        "2 giờ",
        "100,00 %",
        "0 giây",
        "2 giờ",
        "2 giờ",
        "1",
    ]
    assert hn[3:] == ["98,84 %", "50 phút", "99,65 %", "10 phút", "20 phút", "30 phút", "2"]
    assert dn[3:] == ["100,00 %", "0 giây", "100,00 %", "0 giây", "—", "—", "0"]

    # The whole scope: camera-weighted, truncated not rounded (99.826 % shows as 99,82 %).
    assert float(re.search(r'id="tot-uptime" data-pct="([0-9.]+)"', html)[1]) == pytest.approx(  # type: ignore[index]
        EXPECTED["nation"][0], abs=1e-4
    )
    assert re.search(r'id="tot-uptime" data-pct="[0-9.]+">98,03 %<', html)
    assert re.search(r'id="tot-site-uptime" data-pct="[0-9.]+">99,82 %<', html)
    assert re.search(r'id="tot-mttr">53 phút<', html)  # (1,800 + 600 + 7,200) / 3 = 3,200 s
    assert "3 phiếu đã khắc phục, lâu nhất 2 giờ" in html

    operators = rows(html, "operator")
    assert [o["operator"] for o in operators] == ["vnpt", "viettel"]
    for o in operators:
        assert pct_of(o) == pytest.approx(EXPECTED[o["operator"]][0], abs=1e-4)
    assert operators[1]["cells"][-3:] == ["20 phút", "30 phút", "2"]

    site_rows = rows(html, "site")
    assert [s["site-id"] for s in site_rows] == ["cb-a", "hn-a", "dn-a", "hn-b"]
    for s in site_rows:
        up, site = EXPECTED[s["site-id"]]
        assert pct_of(s) == pytest.approx(up, abs=1e-4)
        assert pct_of(s, "site-uptime") == pytest.approx(site, abs=1e-4)

    # Name order: Vietnamese alphabetical, Đà Nẵng among the D's.
    html = await page(b, f"/board/uptime?{day_query(d)}&sort=name")
    assert [g["group"] for g in rows(html, "group")] == ["Cao Bằng", "Đà Nẵng", "Hà Nội"]
    assert [s["site-id"] for s in rows(html, "site")] == ["cb-a", "dn-a", "hn-a", "hn-b"]

    # Down the tree: Hà Nội's districts, then Ba Đình's one site, then its cameras.
    hn_link = re.search(r'<a href="(/board/uptime\?[^"]*)">Hà Nội</a></td>', html)
    assert hn_link and "sort=name" in hn_link[1] and f"from={d.isoformat()}" in hn_link[1]
    html = await page(b, f"/board/uptime?{day_query(d)}&province={quote('Hà Nội')}")
    districts = rows(html, "group")
    assert [g["group"] for g in districts] == ["Ba Đình", "Hoàn Kiếm"]
    assert pct_of(districts[0]) == pytest.approx(EXPECTED["hn-a"][0], abs=1e-4)
    assert districts[0]["cells"][-3:] == ["20 phút", "30 phút", "2"]
    assert districts[1]["cells"][-3:] == ["—", "—", "0"]
    assert [s["site-id"] for s in rows(html, "site")] == ["hn-a", "hn-b"]
    html = await page(
        b, f"/board/uptime?{day_query(d)}&province={quote('Hà Nội')}&district={quote('Ba Đình')}"
    )
    assert 'id="uptime-groups"' not in html
    assert [s["site-id"] for s in rows(html, "site")] == ["hn-a"]
    assert 'id="tot-mttr"' not in html  # queries.mttr cannot filter by district
    html = await page(b, f"/board/uptime?{day_query(d)}&site=hn-a")
    cams = rows(html, "camera")
    assert [c["camera-id"] for c in cams] == ["c1", "c2"]
    for c in cams:
        assert pct_of(c) == pytest.approx(EXPECTED[c["camera-id"]][0], abs=1e-4)
    assert cams[0]["cells"][0] == "Cổng c1 c1" and cams[0]["cells"][1] == "1 ngày"
    assert cams[0]["cells"][2:] == ["97,22 %", "40 phút"]
    assert 'href="/board/sites/hn-a"' in html

    # A kind filter: MTTR (which cannot be filtered by kind) is left out, and says so.
    html = await page(b, f"/board/uptime?{day_query(d)}&kind=checkpoint")
    assert [g["group"] for g in rows(html, "group")] == ["Hà Nội"]
    assert 'id="mttr-note"' in html and 'id="tot-mttr"' not in html

    # The CSV of each table: whole, numbers with a dot, durations in seconds.
    resp = await b.client.get(f"/board/uptime.csv?{day_query(d)}&table=groups")
    assert resp.status == 200 and resp.content_type == "text/csv"
    assert (
        f"uptime-vn-groups-{d.isoformat()}_{d.isoformat()}.csv"
        in resp.headers["Content-Disposition"]
    )
    table = read_csv(await resp.text())
    assert table[0][:4] == ["Tỉnh/TP", "Từ ngày", "Đến ngày", "Điểm"]
    by_name = {r[0]: r for r in table[1:]}
    assert list(by_name) == ["Cao Bằng", "Hà Nội", "Đà Nẵng"]
    assert by_name["Cao Bằng"][1:] == [
        d.isoformat(),
        d.isoformat(),
        "1",
        "2",
        "95.833",
        "172800",
        "7200",
        "100.000",
        "0",
        "1",
        "7200",
        "7200",
    ]
    sites_csv = read_csv(await page(b, f"/board/uptime.csv?{day_query(d)}&table=sites"))
    assert [r[0] for r in sites_csv[1:]] == ["cb-a", "hn-a", "dn-a", "hn-b"]
    cams_csv = read_csv(await page(b, f"/board/uptime.csv?{day_query(d)}&site=hn-a"))
    assert [r[:3] for r in cams_csv[1:]] == [["hn-a", "c1", "Cổng c1"], ["hn-a", "c2", "Cổng c2"]]
    await page(b, f"/board/uptime.csv?{day_query(d)}&site=hn-a&table=groups", status=400)


async def test_the_site_page_shows_its_uptime_over_24_hours_7_and_30_days(
    board: tuple[Board, date],
) -> None:
    b, _ = board
    b.user("noc@hanoi.gov.vn", "noc", "province=Hà Nội")
    await b.login("noc@hanoi.gov.vn")
    before = time.time()
    html = await page(b, "/board/sites/hn-a?period=7d")
    after = time.time()
    windows = {
        w: (u, s)
        for w, u, s in re.findall(
            r'data-window="(\w+)" data-uptime="([0-9.]*)" data-site-uptime="([0-9.]*)"', html
        )
    }
    assert list(windows) == ["24h", "7d", "30d"]
    assert windows["24h"] == ("100.0000", "100.0000")  # day D is more than a day ago
    # 7 and 30 days: from first contact (M - 1 h) until now, the same 3,000 s down.
    first_seen = b.t0 - 3600
    lowest = 100 * (1 - 3000 / (2 * (before - first_seen)))
    highest = 100 * (1 - 3000 / (2 * (after - first_seen)))
    for w in ("7d", "30d"):
        assert lowest - 1e-4 <= float(windows[w][0]) <= highest + 1e-4
    cams = rows(html, "camera")
    assert [c["camera-id"] for c in cams] == ["c1", "c2"]  # c1 the worse
    assert 'href="/board/uptime?site=hn-a&amp;period=7d"' in html
    # The page's live refresh (board.js) leaves the uptime as it is: no ledger sums re-run.
    resp = await b.client.get("/board/sites/hn-a?period=7d", headers={"X-Board-Refresh": "1"})
    refreshed = await resp.text()
    assert 'id="outages"' in refreshed and 'id="site-uptime"' not in refreshed
    assert refreshed.count('class="ticket state-resolved"') == 2  # the rest is all there
    # A status watcher sees the site, not the ledger's figures.
    b.user("s@hanoi.gov.vn", "status", "province=Hà Nội")
    await b.login("s@hanoi.gov.vn")
    html = await page(b, "/board/sites/hn-a")
    assert 'id="site-uptime"' not in html


# --- scope and rights -----------------------------------------------------------------------


async def test_a_provincial_user_sees_only_its_province_on_the_page_and_in_the_csv(
    any_board: tuple[Board, date],
) -> None:
    b, d = any_board
    b.user("noc@caobang.gov.vn", "noc", "province=Cao Bằng")
    await b.login("noc@caobang.gov.vn")
    html = await page(b, f"/board/uptime?{day_query(d)}")
    assert [g["group"] for g in rows(html, "group")] == ["Cao Bằng"]
    assert [o["operator"] for o in rows(html, "operator")] == ["vnpt"]
    assert [s["site-id"] for s in rows(html, "site")] == ["cb-a"]
    assert "Hà Nội" not in html  # not even among the province filter's choices
    assert re.search(r'id="tot-mttr">2 giờ<', html)
    html = await page(b, f"/board/uptime?{day_query(d)}&province={quote('Hà Nội')}")
    assert 'id="uptime-none"' in html and "data-site-id" not in html
    for table in ("groups", "operators", "sites"):
        text = await page(b, f"/board/uptime.csv?{day_query(d)}&table={table}")
        assert "Hà Nội" not in text and "hn-a" not in text and "Viettel" not in text
    sites_csv = read_csv(await page(b, f"/board/uptime.csv?{day_query(d)}&table=sites"))
    assert [r[0] for r in sites_csv[1:]] == ["cb-a"]
    # Another province's site: refused, and the refusal is audited.
    await page(b, f"/board/uptime?{day_query(d)}&site=hn-a", status=403)
    await page(b, f"/board/uptime.csv?{day_query(d)}&site=hn-a", status=403)
    denied = b.denied_rows()
    assert denied and denied[-1]["site_id"] == "hn-a" and denied[-1]["action"] == "view_outages"
    await page(b, f"/board/uptime?{day_query(d)}&site=nowhere", status=404)


async def test_without_the_ledger_right_the_page_and_the_csv_are_refused(
    board: tuple[Board, date],
) -> None:
    b, d = board
    b.user("s@hanoi.gov.vn", "status", "province=Hà Nội")
    await b.login("s@hanoi.gov.vn")
    html = await page(b, "/board")
    assert 'id="menu-board"' in html and 'id="menu-uptime"' not in html
    assert 'id="board-uptime-link"' not in html
    await page(b, "/board/uptime", status=403)
    await page(b, "/board/uptime?period=week", status=403)  # refused before any 400
    await page(b, f"/board/uptime.csv?{day_query(d)}", status=403)
    assert b.denied_rows()[-1]["reason"] == "role_lacks_action"
    b.user("a@hanoi.gov.vn", "auditor", "province=Hà Nội")
    await b.login("a@hanoi.gov.vn")
    await page(b, "/board/uptime", status=403)
    b.client.session.cookie_jar.clear()
    resp = await b.client.get("/board/uptime", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"].startswith("/login?next=")


async def test_the_page_speaks_english_and_says_what_is_wrong_with_typed_dates(
    board: tuple[Board, date],
) -> None:
    b, d = board
    b.user("noc@vnpt.gov.vn", "noc", "nation")
    await b.login("noc@vnpt.gov.vn")
    html = await page(b, f"/board/uptime?{day_query(d)}&lang=en")
    assert "Camera and site uptime" in html and "By province" in html and "Last 7 days" in html
    assert rows(html, "group")[0]["cells"][3:5] == ["95.83 %", "2 h"]
    assert rows(html, "group")[1]["cells"][-3:] == ["20 min", "30 min", "2"]
    assert "green from 99.5 %, amber from 98 %" in html
    text = await page(b, f"/board/uptime.csv?{day_query(d)}")  # the cookie keeps English
    assert read_csv(text)[0][:2] == ["Province", "First day"]
    html = await page(b, f"/board/uptime?{day_query(d)}&lang=vi")
    assert "xanh từ 99,5 % trở lên, vàng từ 98 %" in html

    html = await page(b, "/board/uptime?period=custom&from=2025-02-30", status=400)
    assert "Ngày không hợp lệ" in html and 'value="2025-02-30"' in html
    tomorrow = (vn_day(time.time()) + timedelta(days=2)).isoformat()
    html = await page(b, f"/board/uptime?from={tomorrow}", status=400)
    assert "chưa bắt đầu" in html
    html = await page(b, f"/board/uptime?from={d.isoformat()}&to=2020-01-01", status=400)
    assert "không được sau" in html
    html = await page(b, "/board/uptime?from=2020-01-01&to=2022-01-01", status=400)
    assert "dài nhất là 400 ngày" in html
    await page(b, f"/board/uptime.csv?from={tomorrow}", status=400)
    for bad in ("period=week", "sort=best", "operator=fpt", "page=0", "site=../x"):
        await page(b, f"/board/uptime?{bad}", status=400)


async def test_sites_come_one_page_at_a_time_and_whole_in_the_csv(
    board: tuple[Board, date],
) -> None:
    b, d = board
    with b.hub.db.engine.begin() as conn:
        for i in range(60):
            enroll_site(
                conn,
                site_id=f"hn-x-{i:02d}",
                province="Hà Nội",
                district="Đống Đa",
                kind="facility",
                authority="health",
                operator="viettel",
                now=b.t0 - 7200,
            )
    for i in range(60):
        SiteLog(b.hub, f"hn-x-{i:02d}").birth(b.t0 - 3600)  # connected, no cameras
    b.user("noc@vnpt.gov.vn", "noc", "nation")
    await b.login("noc@vnpt.gov.vn")
    html = await page(b, f"/board/uptime?{day_query(d)}")
    first = [s["site-id"] for s in rows(html, "site")]
    assert len(first) == 50 and first[:4] == ["cb-a", "hn-a", "dn-a", "hn-b"]
    assert "Dòng 1–50 trên 64" in html and 'rel="next"' in html
    html = await page(b, f"/board/uptime?{day_query(d)}&page=2")
    second = [s["site-id"] for s in rows(html, "site")]
    assert len(second) == 14 and not set(first) & set(second)
    assert rows(html, "site")[0]["uptime"] == ""  # no camera: no camera uptime, site 100 %
    text = await page(b, f"/board/uptime.csv?{day_query(d)}&table=sites")
    assert len(read_csv(text)) == 65


# --- the parts ------------------------------------------------------------------------------


def test_periods_are_whole_days_in_vietnam_time() -> None:
    # 2025-07-10 17:30 UTC is 00:30 on the 11th in Vietnam: "today" is the 11th.
    now = 1752168600.0
    vn = 1752166800.0  # 2025-07-11 00:00 +07:00
    p = parse_period({}, now)
    assert (p.name, p.first, p.last, p.since, p.until) == (
        "today",
        date(2025, 7, 11),
        date(2025, 7, 11),
        vn,
        now,
    )
    p = parse_period({"period": "yesterday"}, now)
    assert (p.first, p.since, p.until) == (date(2025, 7, 10), vn - DAY, vn)
    p = parse_period({"period": "7d"}, now)
    assert (p.first, p.last, p.since, p.until) == (
        date(2025, 7, 5),
        date(2025, 7, 11),
        vn - 6 * DAY,
        now,
    )
    assert parse_period({"period": "30d"}, now).first == date(2025, 6, 12)
    p = parse_period({"from": "2025-07-01", "to": "2025-07-03"}, now)
    assert (p.name, p.since, p.until) == ("custom", vn - 10 * DAY, vn - 7 * DAY)
    assert p.params() == {"period": "custom", "from": "2025-07-01", "to": "2025-07-03"}
    p = parse_period({"period": "custom", "from": "2025-07-09", "to": "2025-08-01"}, now)
    assert (p.last, p.until) == (date(2025, 7, 11), now)  # the future is not counted
    assert parse_period({"period": "custom", "to": "2025-07-02"}, now).first == date(2025, 7, 2)
    for query, key in (
        ({"period": "custom"}, "uptime.error.date"),
        ({"from": "2025-7-1"}, "uptime.error.date"),
        ({"from": "2025-02-29"}, "uptime.error.date"),
        ({"from": "2025-07-03", "to": "2025-07-01"}, "uptime.error.order"),
        ({"from": "2025-07-12"}, "uptime.error.future"),
        ({"from": "2024-01-01", "to": "2025-07-11"}, "uptime.error.too_long"),
    ):
        with pytest.raises(PeriodError) as err:
            parse_period(query, now)
        assert err.value.key == key, query
    with pytest.raises(web.HTTPBadRequest):
        parse_period({"period": "week"}, now)


def test_colours_bars_and_percentages_follow_the_thresholds() -> None:
    assert [uptime_colour(p) for p in (100.0, 99.5, 99.49, 98.0, 97.99, None)] == [
        "green",
        "green",
        "amber",
        "amber",
        "red",
        "none",
    ]
    assert [uptime_bar(p) for p in (100.0, 99.5, 95.0, 90.0, 42.0, None)] == [
        100.0,
        95.0,
        50.0,
        0.0,
        0.0,
        0.0,
    ]
    assert fmt_pct(99.999, "vi") == "99,99 %" and fmt_pct(100.0, "en") == "100.00 %"
    assert fmt_pct(98.0, "en") == "98.00 %" and fmt_pct(None, "vi") == "—"


def test_the_csv_does_not_let_a_spreadsheet_run_a_site_name() -> None:
    period = parse_period({"period": "today"}, 1752168600.0)
    row = {
        "site_id": "x-1",
        "name": '=HYPERLINK("http://evil")',
        "province": "+Tỉnh",
        "district": None,
        "operator": "vnpt",
        "kind": "facility",
        "sites": 1,
        "cameras": 0,
        "uptime_pct": None,
        "monitored_s": 0.0,
        "down_s": 0.0,
        "site_uptime_pct": 100.0,
        "site_down_s": 0.0,
    }
    [head, line] = read_csv(csv_text("sites", [row], "site", period, "en", False))
    assert head[:3] == ["Site", "Site name", "Province"]
    assert line[:3] == ["x-1", '\'=HYPERLINK("http://evil")', "'+Tỉnh"]
    assert line[-5:] == ["", "0", "0", "100.000", "0"]


# --- in a browser ---------------------------------------------------------------------------


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[str, date]]:
    config = HubConfig(
        database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'hub.db'}"),
        web=WebConfig(host="127.0.0.1", port=0),
    )
    hub = make_hub(config, AUTH_CONFIG)
    d, m = the_day()
    build_ledger(hub, m)
    server = HubThread(hub)
    base = server.start()
    assert server.app is not None
    server.app[AUTH].store.create_user(
        "noc@vnpt.gov.vn", "Trực ban VNPT", PASSWORD, "noc", Scope.nation()
    )
    yield base, d
    server.stop()
    hub.db.close()


def test_in_a_browser_the_period_switches_and_a_province_opens(
    running: tuple[str, date],
    browser: WebDriver,  # noqa: F811
) -> None:
    base, d = running
    drv = browser
    log_in(drv, base, "noc@vnpt.gov.vn", "/board/uptime")

    # Both read the page that is there now; one being replaced by the next reads as "not yet".
    def groups() -> list[str]:
        try:
            return [e.get_attribute("data-group") for e in css(drv, "tr.up-row.group")]
        except StaleElementReferenceException:
            return []

    def current_period() -> str | None:
        try:
            found = css(drv, "#periods a[aria-current]")
            return found[0].get_attribute("data-period") if found else None
        except StaleElementReferenceException:
            return None

    assert drv.find_element(By.TAG_NAME, "h1").text == "Tỷ lệ hoạt động của camera và điểm"
    assert current_period() == "today"
    assert groups() == ["Cao Bằng", "Đà Nẵng", "Hà Nội"]  # all 100 % today: name order

    # The last 7 days hold day D: Cao Bằng (2 h of one camera down) is now the worst.
    click(drv, By.CSS_SELECTOR, '#periods a[data-period="7d"]')
    wait(drv, lambda _: current_period() == "7d")
    wait(drv, lambda _: groups() == ["Cao Bằng", "Hà Nội", "Đà Nẵng"])
    bar = css(drv, 'tr.up-row.group[data-group="Cao Bằng"] svg.up-bar rect.fill')[0]
    assert 0 < float(bar.get_attribute("width")) < 100
    fill = drv.execute_script("return getComputedStyle(arguments[0]).fill;", bar)
    assert fill != "rgb(0, 0, 0)"  # coloured by board.css, which the CSP let through

    # Into Hà Nội: its districts, the period kept.
    click(drv, By.LINK_TEXT, "Hà Nội")
    wait(drv, lambda _: groups() == ["Ba Đình", "Hoàn Kiếm"])
    assert current_period() == "7d"
    assert "Hà Nội" in drv.find_element(By.ID, "crumbs").text

    # Typed dates switch the form to "custom dates" (board.js); the page shows day D.
    drv.execute_script(
        "for (const id of ['u-from', 'u-to']) { const e = document.getElementById(id);"
        " e.value = arguments[0]; e.dispatchEvent(new Event('change')); }",
        d.isoformat(),
    )
    assert drv.execute_script("return document.getElementById('u-period').value;") == "custom"
    click(drv, By.ID, "u-submit")
    wait(drv, lambda _: f"from={d.isoformat()}" in drv.current_url)
    wait(drv, lambda _: groups() == ["Ba Đình", "Hoàn Kiếm"])
    assert current_period() is None
    row = css(drv, 'tr.up-row.group[data-group="Ba Đình"]')[0]
    assert float(row.get_attribute("data-uptime")) == pytest.approx(EXPECTED["hn-a"][0], abs=1e-4)
    errors = [
        e
        for e in drv.get_log("browser")  # type: ignore[attr-defined]
        if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]
    ]
    assert errors == []


async def test_groups_summed_from_sites_equal_the_ledgers_own_groups(
    any_board: tuple[Board, date],
) -> None:
    """The page sums provinces, districts and operators from its site rows (one query); they
    must be what queries.uptime gives for the group levels themselves."""
    b, _ = any_board
    now = time.time()
    for days in (1, 7, 30):
        period = parse_period({"period": f"{days}d" if days > 1 else "today"}, now)
        for query, level, keys in (
            ({}, "province", ("province",)),
            ({"province": "Hà Nội"}, "district", ("province", "district")),
        ):
            view = UptimeView.parse(query)
            with b.hub.db.engine.connect() as conn:
                data = uptime_data(
                    conn, where=None, view=view, period=period, now=now, tables=CSV_TABLES[level]
                )
                common = {"since": period.since, "until": period.until, "now": now}
                direct = queries.uptime(conn, level=level, **common, **view.f.kwargs())
                ops = queries.uptime(conn, level="operator", **common, **view.f.kwargs())
            for found, expected, cols in (
                (data["groups"], direct, keys),
                (data["operators"], ops, ("operator",)),
            ):
                got = {tuple(r[k] for k in cols): r for r in found}
                want = {tuple(r[k] for k in cols): r for r in expected}
                assert set(got) == set(want), (days, level)
                for key, r in want.items():
                    for field in ("cameras", "sites", "monitored_s", "down_s", "site_down_s"):
                        assert got[key][field] == pytest.approx(r[field], rel=1e-9, abs=1e-6)
