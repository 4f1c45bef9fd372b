"""Latency of the NOC board's API calls (and its two main pages) on 2,000 sites / 32,000 cameras.

Run: .venv/bin/python bench/hub_api.py [--backend sqlite|postgresql|both] [--repeat 40]

State: the synthetic hub of bench/hub_queries.py (same generator, fixed seed; its clock moved to
now so the API's default windows — last hour, last day — hold data): 63 provinces, 2,000 sites
of 16 cameras, ~3 % of cameras down, 30 days of outage history, tickets on the long outages.
The daily uptime rollup (central_hub.rollup) is built for that history before the hub starts,
as its job would have kept it (the uptime calls read it).

The hub app (`make_hub` + `build_app`: auth, board, API) runs in a child process on a loopback
port; this process logs in as a NOC operator (nation-wide, and one province) and GETs each URL
`--repeat` times after a warm-up, one request at a time. p50/p95 in ms.

Baseline in the same run: the same `central_hub.queries` calls the handler makes, with the same
scope condition, called directly on a connection (no HTTP, no session, no JSON). The difference
is what the web layer costs. Target (issue 6): p95 ≤ 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import sqlalchemy as sa

import bench.hub_queries as synthetic
from central_hub import queries
from central_hub.accounts import AccountStore, AuthConfig
from central_hub.api import Filters, list_filter, single_site_filter
from central_hub.audit import AuditLog
from central_hub.board import board_data, site_data
from central_hub.board_uptime import CSV_TABLES, UptimeView, parse_period, uptime_data
from central_hub.db import Database
from central_hub.policy import Action, Grant, Principal, Scope
from central_hub.rollup import UptimeRollup
from central_hub.sites import get_site
from devstack.ports import free_port
from devstack.postgres import Postgres

PASSWORD = "mật-khẩu-đo-hiệu-năng-2025"
AUTH = AuthConfig(
    argon2_memory_kib=19456, argon2_time_cost=1, cookie_secure=False, secret=b"b" * 32
)
#: Whole pages (several queries each, plus the template), reported apart from the API calls.
PAGES = "page "
CSRF_RE = re.compile(r'name="csrf_token" value="([0-9a-f]{64})"')


# --- the server (child process) -------------------------------------------------------------


def serve(url: str, port: int) -> None:
    """Run the hub's web app on 127.0.0.1:`port` until stdin closes."""
    from aiohttp import web

    from central_hub.app import build_app, make_hub
    from central_hub.hub_config import DatabaseConfig, HubConfig, WebConfig

    async def main() -> None:
        config = HubConfig(database=DatabaseConfig(url=url), web=WebConfig("127.0.0.1", port))
        app = build_app(make_hub(config, AUTH))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await runner.cleanup()

    asyncio.run(main())


# --- the client -----------------------------------------------------------------------------


def pct(times: list[float]) -> tuple[float, float]:
    times = sorted(times)
    return statistics.median(times), times[min(len(times) - 1, int(0.95 * len(times)))]


async def login(session: aiohttp.ClientSession, base: str, email: str) -> None:
    session.cookie_jar.clear()
    async with session.get(f"{base}/login") as resp:
        token = CSRF_RE.search(await resp.text())
    assert token, "no login form"
    data = {"email": email, "password": PASSWORD, "csrf_token": token.group(1)}
    async with session.post(f"{base}/login", data=data, allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()


async def timed_get(session: aiohttp.ClientSession, url: str, repeat: int) -> list[float]:
    out: list[float] = []
    for i in range(repeat + 3):
        t = time.perf_counter()
        async with session.get(url) as resp:
            await resp.read()
            assert resp.status == 200, (url, resp.status)
        if i >= 3:  # warm-up
            out.append((time.perf_counter() - t) * 1000)
    return out


def timed_direct(fn: Callable[[], Any], repeat: int) -> list[float]:
    out: list[float] = []
    for i in range(repeat + 3):
        t = time.perf_counter()
        fn()
        if i >= 3:
            out.append((time.perf_counter() - t) * 1000)
    return out


def cases(
    conn: sa.Connection, info: dict[str, Any], now: float
) -> list[tuple[str, str, str, Callable[[], Any]]]:
    """(name, scope, URL path, the same queries called directly)."""
    nation = Principal(1, "noc@vnpt.gov.vn", grants=(Grant("noc", Scope.nation()),))
    prov = Principal(
        2, "noc@tinh.gov.vn", grants=(Grant("noc", Scope("province", province=info["province"])),)
    )
    pq = quote(info["province"])
    site = info["site"]

    def f(p: Principal, action: Action = "view_status") -> Any:
        return list_filter(p, action, now)  # what the list handlers pass

    def one(p: Principal, action: Action = "view_status") -> Any:
        return single_site_filter(p, action, site)  # what the object handlers pass

    def board_page(p: Principal, province: str | None = None) -> Callable[[], Any]:
        # The page handler's own loader, with what the handler passes it.
        return lambda: board_data(
            conn,
            principal=p,
            where=f(p),
            f=Filters(province=province),
            rag=None,
            page_no=1,
            now=now,
        )

    def uptime_page(p: Principal, query: dict[str, str]) -> Callable[[], Any]:
        # The uptime page's own loader, with what its handler passes it.
        view = UptimeView.parse(query)
        period = parse_period(query, now)
        return lambda: uptime_data(
            conn,
            where=f(p, "view_outages"),
            view=view,
            period=period,
            now=now,
            tables=CSV_TABLES[view.level],
        )

    def site_page() -> Any:
        attrs = get_site(conn, site)
        assert attrs is not None
        return site_data(conn, principal=nation, site=attrs, since=now - 86400, now=now)

    return [
        (
            "GET /api/board",
            "nation",
            "/api/board",
            lambda: (
                queries.board_summary(conn, site_filter=f(nation)),
                queries.board_summary(conn, group_by="nation", site_filter=f(nation)),
            ),
        ),
        (
            "GET /api/board (districts)",
            "province",
            f"/api/board?group_by=district&province={pq}",
            lambda: (
                queries.board_summary(
                    conn, group_by="district", site_filter=f(prov), province=info["province"]
                ),
                queries.board_summary(
                    conn, group_by="nation", site_filter=f(prov), province=info["province"]
                ),
            ),
        ),
        (
            "GET /api/sites (page 1)",
            "nation",
            "/api/sites?limit=50",
            lambda: queries.list_sites(conn, site_filter=f(nation), limit=50),
        ),
        (
            "GET /api/sites?rag=red",
            "nation",
            "/api/sites?rag=red&limit=50",
            lambda: queries.list_sites(conn, site_filter=f(nation), rag=["red"], limit=50),
        ),
        (
            "GET /api/sites (page 1)",
            "province",
            "/api/sites?limit=50",
            lambda: queries.list_sites(conn, site_filter=f(prov), limit=50),
        ),
        (
            "GET /api/sites/{site}",
            "nation",
            f"/api/sites/{site}",
            lambda: queries.site_detail(conn, site, site_filter=one(nation)),
        ),
        (
            "GET /api/sites/{site}/cameras",
            "nation",
            f"/api/sites/{site}/cameras",
            lambda: queries.site_cameras(conn, site, site_filter=one(nation)),
        ),
        (
            "GET /api/sites/{site}/outages (24 h)",
            "nation",
            f"/api/sites/{site}/outages",
            lambda: queries.outage_timeline(
                conn,
                since=now - 86400,
                until=now,
                site_id=site,
                site_filter=one(nation, "view_outages"),
                now=now,
            ),
        ),
        (
            "GET /api/faults (page 1)",
            "nation",
            "/api/faults?limit=50",
            lambda: queries.faulty_cameras(conn, site_filter=f(nation), limit=50),
        ),
        (
            "GET /api/faults (page 1)",
            "province",
            "/api/faults?limit=50",
            lambda: queries.faulty_cameras(conn, site_filter=f(prov), limit=50),
        ),
        (
            "GET /api/outages (1 h)",
            "nation",
            "/api/outages",
            lambda: queries.outage_timeline(
                conn, since=now - 3600, until=now, site_filter=f(nation, "view_outages"), now=now
            ),
        ),
        (
            "GET /api/tickets (page 1)",
            "nation",
            "/api/tickets?limit=50",
            lambda: queries.list_tickets(conn, site_filter=f(nation, "view_outages"), limit=50),
        ),
        (
            "GET /api/tickets (page 1)",
            "province",
            "/api/tickets?limit=50",
            lambda: queries.list_tickets(conn, site_filter=f(prov, "view_outages"), limit=50),
        ),
        (
            "GET /api/uptime (province, 1 d)",
            "nation",
            "/api/uptime?level=province",
            lambda: queries.uptime(
                conn,
                since=now - 86400,
                until=now,
                level="province",
                site_filter=f(nation, "view_outages"),
                now=now,
            ),
        ),
        (
            "GET /api/mttr (province, 30 d)",
            "nation",
            "/api/mttr",
            lambda: queries.mttr(
                conn, since=now - 30 * 86400, until=now, site_filter=f(nation, "view_outages")
            ),
        ),
        ("page /board", "nation", "/board", board_page(nation)),
        (
            "page /board?province=",
            "province",
            f"/board?province={pq}",
            board_page(prov, info["province"]),
        ),
        ("page /board/sites/{site}", "nation", f"/board/sites/{site}", site_page),
        (
            "GET /api/uptime (province, 30 d)",
            "nation",
            f"/api/uptime?level=province&since={now - 30 * 86400:.0f}",
            lambda: queries.uptime(
                conn,
                since=float(f"{now - 30 * 86400:.0f}"),
                until=now,
                level="province",
                site_filter=f(nation, "view_outages"),
                now=now,
            ),
        ),
        (
            "page /board/uptime (today)",
            "nation",
            "/board/uptime?period=today",
            uptime_page(nation, {"period": "today"}),
        ),
        (
            "page /board/uptime (30 d)",
            "nation",
            "/board/uptime?period=30d",
            uptime_page(nation, {"period": "30d"}),
        ),
        (
            "page /board/uptime (30 d, province)",
            "province",
            f"/board/uptime?period=30d&province={pq}",
            uptime_page(prov, {"period": "30d", "province": info["province"]}),
        ),
    ]


Result = tuple[str, str, tuple[float, float], tuple[float, float]]


def measure(url: str, repeat: int) -> list[Result]:
    """Populate `url`, start the hub on it, and time every case both ways."""
    db = Database.connect(url)
    db.migrate()
    now = time.time()
    synthetic.NOW = now  # the generator's clock: the API's default windows are "until now"
    info = synthetic.populate(db)
    print(
        f"  {synthetic.SITES} sites, {synthetic.SITES * synthetic.CAMS_PER_SITE} cameras, "
        f"{info['outages']} outages, {info['tickets']} tickets",
        flush=True,
    )
    t = time.perf_counter()
    UptimeRollup(db).refresh(now=now)
    with db.engine.connect() as conn:  # planner statistics, as autovacuum would have them
        conn.execute(sa.text("ANALYZE"))
        conn.commit()
    print(f"  uptime rollup built in {time.perf_counter() - t:.1f} s", flush=True)
    store = AccountStore(db, AuditLog(db), AUTH)
    store.create_user("noc@vnpt.gov.vn", "NOC", PASSWORD, "noc", Scope.nation())
    store.create_user(
        "noc@tinh.gov.vn", "NOC tỉnh", PASSWORD, "noc", Scope("province", province=info["province"])
    )
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", url, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None and server.stdin is not None
    assert server.stdout.readline().strip() == "ready", "the hub did not start"
    conn = db.engine.connect()
    try:
        return asyncio.run(_client(f"http://127.0.0.1:{port}", cases(conn, info, now), repeat))
    finally:
        conn.close()
        server.stdin.close()
        server.wait(30)
        db.close()


async def _client(
    base: str, todo: list[tuple[str, str, str, Callable[[], Any]]], repeat: int
) -> list[Result]:
    results: list[Result] = []
    # unsafe=True: keep cookies for an IP address host (127.0.0.1).
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        logged_in = ""
        for name, scope, path, direct in todo:
            email = "noc@vnpt.gov.vn" if scope == "nation" else "noc@tinh.gov.vn"
            if email != logged_in:
                await login(session, base, email)
                logged_in = email
            api = pct(await timed_get(session, base + path, repeat))
            baseline = pct(timed_direct(direct, repeat))
            results.append((name, scope, baseline, api))
            print(
                f"  {name:38s} {scope:9s} direct p50 {baseline[0]:7.2f} p95 "
                f"{baseline[1]:7.2f} | API p50 {api[0]:7.2f} p95 {api[1]:7.2f} ms",
                flush=True,
            )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--repeat", type=int, default=40)
    ap.add_argument("--serve", nargs=2, metavar=("URL", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    results: dict[str, list[Any]] = {}
    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as d:
            print("SQLite (WAL)", flush=True)
            results["sqlite"] = measure(f"sqlite:///{Path(d) / 'hub.db'}", args.repeat)
    if args.backend in ("postgresql", "both"):
        with Postgres() as pg:
            print("PostgreSQL (private server, fsync off)", flush=True)
            results["postgresql"] = measure(pg.url, args.repeat)
    print()
    backends = list(results)
    head = " | ".join(f"{b} direct p50 / p95 | {b} API p50 / p95" for b in backends)
    print(f"| call | scope | {head} |")
    print("|---|---|" + "---|---|" * len(backends))
    first = results[backends[0]]
    worst = {"call": 0.0, "page": 0.0}
    for i, (name, scope, _, _) in enumerate(first):
        cells = []
        for b in backends:
            _, _, base, api = results[b][i]
            kind = "page" if name.startswith(PAGES) else "call"
            worst[kind] = max(worst[kind], api[1])
            cells.append(f"{base[0]:.1f} / {base[1]:.1f} | {api[0]:.1f} / {api[1]:.1f}")
        print(f"| {name} | {scope} | " + " | ".join(cells) + " |")
    met = "met" if worst["call"] <= 50 else "MISSED"
    print(
        f"\nworst p95 of the API calls: {worst['call']:.1f} ms (target ≤ 50 ms: {met}); "
        f"of the pages (several queries and a template each): {worst['page']:.1f} ms"
    )


if __name__ == "__main__":
    main()
