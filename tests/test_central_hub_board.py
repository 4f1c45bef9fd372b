"""The NOC board's pages over real HTTP (the whole hub app, state from the ingest's writer):
the province → district → site tree with its counts and filters, paging, the site page, the
ticket forms with CSRF and the ticket life cycle, scope, and the page texts in both languages.
The browser side (live refresh, the chart) is in test_central_hub_browser_board.py."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from central_hub import i18n
from central_hub.board import PERIODS, fault_text, fmt_duration
from central_hub.board_uptime import PERIOD_DAYS as UPTIME_PERIODS
from central_hub.sites_cli import enroll_site
from central_hub.web_auth import TEMPLATES_DIR
from tests.test_central_hub_api import CSRF_RE, Board, start_board, ticket_ids

HN = quote("Hà Nội")


@pytest.fixture
async def board(tmp_path: Path) -> AsyncIterator[Board]:
    async for b in start_board(f"sqlite:///{tmp_path / 'hub.db'}"):
        yield b


async def page(b: Board, path: str, status: int = 200) -> str:
    resp = await b.client.get(path, allow_redirects=False)
    text = await resp.text()
    assert resp.status == status, (path, resp.status, text[:500])
    return text


def attr(html: str, name: str) -> list[str]:
    return re.findall(rf'{name}="([^"]*)"', html)


async def test_the_board_opens_the_country_then_a_province_then_a_district(board: Board) -> None:
    board.user("noc@vnpt.gov.vn", "noc", "nation")
    await board.login("noc@vnpt.gov.vn")
    html = await page(board, "/board")
    assert "Bảng giám sát" in html and 'lang="vi"' in html
    assert 'id="menu-board"' in html and 'id="menu-tickets"' in html
    assert re.findall(r'class="group" data-group="([^"]+)" data-rag="(\w+)"', html) == [
        ("Cao Bằng", "amber"),
        ("Hà Nội", "amber"),
        ("Đà Nẵng", "red"),
    ]
    assert re.search(r'id="t-sites">3 / 4<', html) and re.search(r'id="t-down">2<', html)
    assert re.search(r'id="t-tickets"[^>]*>2<', html)
    faults = re.findall(
        r'class="fault status-down" data-site-id="([^"]+)" data-camera-id="([^"]+)"', html
    )
    assert sorted(faults) == [("cb-ha-01", "cam-1"), ("hn-bd-01", "cam-2")]
    # Worst first: the never-seen site is red.
    assert attr(html, 'class="site" data-site-id')[0] == "dn-hc-01"
    html = await page(board, f"/board?province={HN}")
    assert re.findall(r'class="group" data-group="([^"]+)"', html) == ["Ba Đình", "Hoàn Kiếm"]
    assert sorted(attr(html, 'class="site" data-site-id')) == ["hn-bd-01", "hn-hk-02"]
    html = await page(board, f"/board?province={HN}&district={quote('Ba Đình')}")
    assert 'id="groups"' not in html and attr(html, 'class="site" data-site-id') == ["hn-bd-01"]
    assert attr(html, "data-camera-id") == ["cam-2"]
    # Filters: operator, kind, colour; and the English page.
    html = await page(board, "/board?operator=vnpt&lang=en")
    assert "NOC board" in html and attr(html, 'class="group" data-group') == ["Đà Nẵng"]
    html = await page(board, "/board?kind=checkpoint")  # the cookie keeps English
    assert "NOC board" in html and attr(html, 'class="site" data-site-id') == ["hn-hk-02"]
    html = await page(board, "/board?rag=green&lang=vi")
    assert attr(html, 'class="site" data-site-id') == ["hn-hk-02"]
    await page(board, "/board?operator=fpt", status=400)


async def test_a_provincial_user_sees_only_its_province(board: Board) -> None:
    board.user("noc@caobang.gov.vn", "noc", "province=Cao Bằng")
    await board.login("noc@caobang.gov.vn")
    html = await page(board, "/board")
    assert attr(html, 'class="group" data-group') == ["Cao Bằng"]
    assert sorted(set(attr(html, "data-site-id"))) == ["cb-ha-01"]
    assert re.findall(r'<option value="([^"]*)"', html).count("Hà Nội") == 0
    html = await page(board, f"/board?province={HN}")  # another province: nothing, no error
    assert "data-site-id" not in html
    html = await page(board, "/board/tickets")
    assert attr(html, 'class="ticket state-open" data-ticket-id') == [
        str(ticket_ids(board.hub)["cb-ha-01"])
    ]


async def test_the_board_sends_one_page_of_sites_at_a_time(board: Board) -> None:
    with board.hub.db.engine.begin() as conn:
        for i in range(120):
            enroll_site(
                conn,
                site_id=f"hn-new-{i:03d}",
                province="Hà Nội",
                district="Đống Đa",
                kind="facility",
                authority="health",
                operator="viettel",
            )
    board.user("noc@vnpt.gov.vn", "noc", "nation")
    await board.login("noc@vnpt.gov.vn")
    html = await page(board, f"/board?province={HN}")
    assert len(attr(html, 'class="site" data-site-id')) == 50
    assert "Dòng 1–50 trên 122" in html and "Trang 1/3" in html and 'rel="next"' in html
    html = await page(board, f"/board?province={HN}&page=3")
    rows = attr(html, 'class="site" data-site-id')
    assert len(rows) == 22 and rows[-1] == "hn-hk-02"  # green last
    await page(board, "/board?page=0", status=400)


async def test_the_site_page_shows_cameras_faults_outages_and_tickets(board: Board) -> None:
    board.user("noc@hanoi.gov.vn", "noc", "province=Hà Nội")
    await board.login("noc@hanoi.gov.vn")
    html = await page(board, "/board/sites/hn-bd-01")
    cams = re.findall(r'class="camera status-(\w+)" data-camera-id="([^"]+)"', html)
    assert cams == [("down", "cam-2"), ("ok", "cam-1")]
    assert "Mất tín hiệu (timeout)" in html
    assert "<img" not in html and "Không có quyền xem hình ảnh" in html  # the NOC sees no pictures
    assert "/view/hn-bd-01/" not in html  # nor live video
    rows = re.findall(
        r'class="outage open" data-outage-id="\d+" data-camera-id="([^"]*)"\s+'
        r'data-started="([0-9.]+)" data-ended=""',
        html,
    )
    assert [(c, float(s)) for c, s in rows] == [("cam-2", pytest.approx(board.t0 + 10))]
    assert 'class="timeline" id="timeline" data-src="/api/sites/hn-bd-01/outages?since=' in html
    tid = ticket_ids(board.hub)["hn-bd-01"]
    assert f'id="ack-{tid}"' in html
    for period in PERIODS:
        await page(board, f"/board/sites/hn-bd-01?period={period}")
    await page(board, "/board/sites/hn-bd-01?period=1y", status=400)
    # A viewer also sees the picture (through the audited thumbnail endpoint) and the live link.
    uid = board.user("v@hanoi.gov.vn", "viewer", "province=Hà Nội")
    await board.login("v@hanoi.gov.vn", uid, totp=True)
    html = await page(board, "/board/sites/hn-bd-01")
    assert re.search(
        r'<img class="thumb" [^>]*src="/api/sites/hn-bd-01/cameras/cam-1/thumbnail', html
    )
    assert 'href="/view/hn-bd-01/cam-1/live"' in html
    assert 'id="outages"' not in html  # a viewer is not given the outage ledger


async def test_ticket_forms_need_csrf_and_follow_the_ticket_life(board: Board) -> None:
    board.user("noc@hanoi.gov.vn", "noc", "province=Hà Nội")
    await board.login("noc@hanoi.gov.vn")
    tid = ticket_ids(board.hub)["hn-bd-01"]
    url = f"/board/tickets/{tid}"
    html = await page(board, url)
    token = CSRF_RE.search(html).group(1)  # type: ignore[union-attr]
    assert 'id="form-acknowledge"' in html and 'id="form-close"' not in html
    c = board.client

    async def post(action: str, status: int = 303, **fields: str) -> Any:
        resp = await c.post(
            f"{url}/{action}", data={"csrf_token": token, **fields}, allow_redirects=False
        )
        assert resp.status == status, await resp.text()
        return resp

    assert (await c.post(f"{url}/acknowledge", data={}, allow_redirects=False)).status == 403
    resp = await post("acknowledge", next="/board/sites/hn-bd-01")
    assert resp.headers["Location"] == "/board/sites/hn-bd-01"
    resp = await post("assign", assignee="Tổ kỹ thuật Ba Đình", next="//evil.example/x")
    assert resp.headers["Location"] == url  # never an open redirect
    bad = await post("note", status=400, text="   ")
    assert "Nội dung không hợp lệ" in await bad.text()
    await post("note", text="Đã liên hệ cơ sở.\nChờ thay nguồn.")
    refused = await post("close", status=409)
    assert "Sự cố vẫn đang diễn ra" in await refused.text()
    board.feed.send("hn-bd-01", board.feed.up("hn-bd-01", "cam-2", time.time()))
    html = await page(board, url)
    assert 'data-state="resolved"' in html and 'id="form-close"' in html
    await post("close", note="Đã kiểm tra hình ảnh")
    html = await page(board, url)
    assert 'id="ticket-state-word" data-state="closed"' in html
    assert re.findall(r'<li data-action="(\w+)"', html) == [
        "open",
        "acknowledged",
        "assigned",
        "note",
        "resolved",
        "closed",
    ]
    assert "Chờ thay nguồn." in html and "noc@hanoi.gov.vn" in html
    html = await page(board, "/board/tickets?state=closed")
    assert attr(html, 'class="ticket state-closed" data-ticket-id') == [str(tid)]


async def test_a_status_watcher_sees_the_board_but_not_the_ledger(board: Board) -> None:
    board.user("s@hanoi.gov.vn", "status", "province=Hà Nội")
    await board.login("s@hanoi.gov.vn")
    html = await page(board, "/board")
    assert 'id="t-tickets"' not in html and "data-site-id" in html
    # the menu offers what the grants allow: the board, not tickets nor exports
    assert 'id="menu-board"' in html
    assert 'id="menu-tickets"' not in html and 'id="menu-export"' not in html
    html = await page(board, "/board/sites/hn-bd-01")
    assert 'id="outages"' not in html and 'id="site-tickets"' not in html
    await page(board, "/board/tickets", status=403)
    board.user("a@hanoi.gov.vn", "auditor", "province=Hà Nội")
    await board.login("a@hanoi.gov.vn")
    await page(board, "/board", status=403)


def test_page_helpers_speak_both_languages() -> None:
    assert fault_text("camera_down:timeout", "vi") == "Mất tín hiệu (timeout)"
    assert fault_text("image:black", "en") == "Black picture"
    assert fault_text("something:new", "en") == "something (new)"
    assert fmt_duration(3900, "vi") == "1 giờ 5 phút" and fmt_duration(3900, "en") == "1 h 5 min"


def test_every_board_text_exists_in_both_languages() -> None:
    used: set[str] = set()
    dynamic: list[str] = []
    for path in (TEMPLATES_DIR / "board").glob("*.html"):
        source = path.read_text(encoding="utf-8")
        used |= set(re.findall(r"\bt\('([a-z0-9_.]+)'\)", source))
        used |= set(re.findall(r"\bt\('([a-z0-9_.]+)',", source))
        dynamic += re.findall(r"\bt\('([a-z0-9_.]+)' ~", source)
        used |= {f"board.{g}.{v}" for g, v in re.findall(r"word\('(\w+)', '(\w+)'\)", source)}
    assert used and not used - set(i18n.MESSAGES), used - set(i18n.MESSAGES)
    # Keys built from values at run time.
    from central_hub.sites import AUTHORITIES, OPERATORS, SITE_KINDS
    from central_hub.status import CAMERA_STATUSES, OUTAGE_KINDS, RAGS, TICKET_STATES

    needed = {f"board.by_{lv}" for lv in ("province", "district")}
    needed |= {f"board.{lv}" for lv in ("province", "district")}
    needed |= {f"board.period.{p}" for p in PERIODS}
    needed |= {f"board.rag.{v}" for v in RAGS} | {f"board.operator.{v}" for v in OPERATORS}
    needed |= {f"board.kind.{v}" for v in SITE_KINDS}
    needed |= {f"board.authority.{v}" for v in AUTHORITIES}
    needed |= {f"board.status.{v}" for v in CAMERA_STATUSES}
    needed |= {f"board.outage.{v}" for v in OUTAGE_KINDS}
    needed |= {f"board.ticket_state.{v}" for v in (*TICKET_STATES, "all")}
    needed |= {
        f"board.note.{v}"
        for v in ("open", "acknowledged", "assigned", "note", "resolved", "closed")
    }
    needed |= {"board.ticket.invalid", "board.ticket.still_out", "board.ticket.refused"}
    needed |= {f"uptime.period.{p}" for p in (*UPTIME_PERIODS, "custom")}
    needed |= {f"uptime.error.{e}" for e in ("date", "order", "future", "too_long")}
    assert set(dynamic) <= {"board.by_", "board.", "board.period.", "uptime.period."}
    assert not needed - set(i18n.MESSAGES), needed - set(i18n.MESSAGES)
    for key in needed | used:
        vi, en = i18n.MESSAGES[key]
        assert vi.strip() and en.strip(), key


def test_docs_list_every_api_route() -> None:
    from central_hub.api import ROUTES

    text = (Path(__file__).resolve().parent.parent / "docs" / "board.md").read_text("utf-8")
    missing = [f"{r.method} {r.path}" for r in ROUTES if f"`{r.method} {r.path}`" not in text]
    assert missing == []


async def test_a_login_lands_on_the_board_when_allowed_else_on_my_sites(board: Board) -> None:
    board.user("noc@vnpt.gov.vn", "noc", "nation")
    board.user("audit@bocongan.gov.vn", "auditor", "nation")
    await board.login("noc@vnpt.gov.vn")
    home = await board.client.get("/", allow_redirects=False)
    assert (home.status, home.headers["Location"]) == (303, "/board")
    await board.login("audit@bocongan.gov.vn")
    home = await board.client.get("/", allow_redirects=False)
    assert (home.status, home.headers["Location"]) == (303, "/me/sites")
    board.client.session.cookie_jar.clear()
    anonymous = await board.client.get("/", allow_redirects=False)
    assert anonymous.status == 303 and anonymous.headers["Location"].startswith("/login")


async def test_the_language_switch_keeps_the_pages_query(board: Board) -> None:
    board.user("noc@vnpt.gov.vn", "noc", "nation")
    await board.login("noc@vnpt.gov.vn")
    html = await (await board.client.get("/board/uptime?period=7d&operator=vnpt")).text()
    m = re.search(r'<a href="([^"]+)" id="lang-switch"', html)
    assert m is not None
    link = urlsplit(unescape(m.group(1)))
    assert link.path == "/board/uptime"
    assert parse_qs(link.query) == {"period": ["7d"], "operator": ["vnpt"], "lang": ["en"]}
