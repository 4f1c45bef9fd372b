"""Latency of the NOC board's queries (central_hub.queries) on 2,000 sites / 32,000 cameras.

Run: .venv/bin/python bench/hub_queries.py [--backend sqlite|postgresql|both] [--repeat 40]

Synthetic state, fixed seed: 63 provinces, ~10 districts each, 2,000 sites of 16 cameras;
about 3 % of cameras down and 2 % degraded now; 30 days of outage history (~5 outages per
camera, a few site outages per site, tickets on the long ones). Each query runs `--repeat`
times after one warm-up; p50 and p95 are printed in ms. Two scopes: the whole nation (NOC) and
one province through `site_filter` (a provincial user). Target (issue 6): p95 ≤ 50 ms.

Baseline in the same run: `SELECT count(*) FROM cameras` — the cost of touching every camera
row once, which the board's counts must stay well under.

Uptime: the daily rollup (`central_hub.rollup`) is built for the synthetic ledger first (its
first build is timed), then every uptime period is measured twice in the same run — straight
from the ledger (`use_rollup=False`, the baseline) and through the rollup — and both must give
the same figures. Periods: calendar-aligned (today so far, the last 7 and 30 days including
today, as on /board/uptime) and rolling (the last 24 h, 7 d, 30 d, as the API's default); the
queries run 30 s after the rollup was computed, as between two passes of its job.
`--uptime-only` skips the other queries.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from central_hub import queries
from central_hub.db import Database
from central_hub.rollup import UptimeRollup, day_bounds, day_of, mark_dirty
from central_hub.sites import sites
from central_hub.status import camera_health, cameras, outages, site_state, tickets
from devstack.postgres import Postgres

SITES = 2000
CAMS_PER_SITE = 16
DAYS = 30
NOW = 1_800_000_000.0


def populate(db: Database, seed: int = 7) -> dict[str, Any]:
    """Write the synthetic state; returns a few ids the queries use."""
    rng = random.Random(seed)
    provinces = [f"Tỉnh {i:02d}" for i in range(63)]
    site_rows, state_rows, cam_rows, health_rows, out_rows = [], [], [], [], []
    t0 = NOW - DAYS * 86400
    for i in range(SITES):
        prov = provinces[i % 63]
        sid = f"site-{i:04d}"
        site_rows.append(
            {
                "site_id": sid,
                "name": f"Điểm cách ly {i}",
                "province": prov,
                "district": f"Huyện {i % 10}",
                "kind": rng.choice(["facility", "checkpoint"]),
                "authority": rng.choice(["health", "district", "military", "police"]),
                "operator": "vnpt" if i % 63 >= 31 else "viettel",
                "enabled": True,
                "enrolled_at": t0 - 86400,
            }
        )
        online = rng.random() > 0.02
        down = degraded = 0
        for c in range(CAMS_PER_SITE):
            r = rng.random()
            status = "down" if r < 0.03 else "degraded" if r < 0.05 else "ok"
            down += status == "down"
            degraded += status == "degraded"
            since = NOW - rng.uniform(60, 86400) if status == "down" else None
            cam_rows.append(
                {
                    "site_id": sid,
                    "camera_id": f"cam-{c:02d}",
                    "name": f"Camera {c}",
                    "manufacturer": "Hikvision",
                    "model": "DS-2CD",
                    "codec": "h264",
                    "resolution": "1920x1080",
                    "inv_state": "recording",
                    "in_inventory": True,
                    "status": status,
                    "first_seen": t0 - 86400,
                    "removed_at": None,
                    "updated_at": NOW,
                    "down_since": since,
                    "down_cause": "timeout" if since else None,
                    "gap_since": None,
                    "gap_cause": None,
                    "image_faults": "blurred" if status == "degraded" else "",
                    "image_since": None,
                    "outage_since": since,
                    "last_event_epoch": 0,
                    "last_event_seq": 1000,
                    "last_event_ts": NOW,
                    "chain_segment_seq": 100,
                    "chain_row_hash": "0" * 64,
                    "chain_time": NOW,
                }
            )
            health_rows.append(
                {
                    "site_id": sid,
                    "camera_id": f"cam-{c:02d}",
                    "ts": NOW,
                    "received_at": NOW,
                    "connected": status != "down",
                    "recording": "recording",
                    "fps": 25.0,
                    "bitrate_kbps": 2048.0,
                    "reconnects_1h": 0,
                    "faults": "",
                    "last_packet_age_s": 0.1,
                    "gap_since": None,
                    "segment_write_lag_s": 0.2,
                    "luma_mean": 120.0,
                    "sharpness": 500.0,
                    "motion": 3.0,
                    "scene_diff": 1.0,
                }
            )
            # History: ~5 closed outages per camera over the period, and the open one.
            for _ in range(rng.randint(2, 8)):
                start = rng.uniform(t0, NOW - 7200)
                out_rows.append(
                    _outage(sid, f"cam-{c:02d}", start, start + rng.expovariate(1 / 1800))
                )
            if since is not None:
                out_rows.append(_outage(sid, f"cam-{c:02d}", since, None))
        for _ in range(rng.randint(0, 4)):
            start = rng.uniform(t0, NOW - 7200)
            out_rows.append(_outage(sid, None, start, start + rng.expovariate(1 / 3600)))
        if not online:
            out_rows.append(_outage(sid, None, NOW - rng.uniform(60, 7200), None))
        monitored = CAMS_PER_SITE
        rag = "red" if not online or down >= monitored else "amber" if down or degraded else "green"
        state_rows.append(
            {
                "site_id": sid,
                "online": online,
                "rag": rag,
                "bdseq": 3,
                "birth_ts": t0,
                "state_since": t0,
                "agent_version": "0.1.0",
                "epoch": 0,
                "max_seq": 1000,
                "missing_events": 0,
                "first_seen_at": t0 - 86400,
                "last_seen_at": NOW,
                "health_ts": NOW,
                "disk_free_bytes": 2**40,
                "forecast_days": 40.0,
                "cameras_total": CAMS_PER_SITE,
                "cameras_down": down,
                "cameras_degraded": degraded,
                "cameras_unmonitored": 0,
            }
        )
    with db.engine.begin() as conn:
        conn.execute(sites.insert(), site_rows)
        conn.execute(site_state.insert(), state_rows)
        conn.execute(cameras.insert(), cam_rows)
        conn.execute(camera_health.insert(), health_rows)
        for i in range(0, len(out_rows), 20000):
            conn.execute(outages.insert(), out_rows[i : i + 20000])
        long_ones = conn.execute(
            sa.select(
                outages.c.id,
                outages.c.site_id,
                outages.c.camera_id,
                outages.c.started_at,
                outages.c.ended_at,
            ).where(
                sa.or_(
                    outages.c.ended_at.is_(None),
                    outages.c.ended_at - outages.c.started_at > 3600,
                )
            )
        ).all()
        conn.execute(
            tickets.insert(),
            [
                {
                    "outage_id": o.id,
                    "site_id": o.site_id,
                    "camera_id": o.camera_id,
                    "state": "open" if o.ended_at is None else "closed",
                    "opened_at": NOW,
                    "outage_started_at": o.started_at,
                    "resolved_at": o.ended_at,
                    "closed_at": None if o.ended_at is None else o.ended_at + 600,
                    "updated_at": NOW,
                }
                for o in long_ones
            ],
        )
    if db.dialect == "postgresql":
        with db.engine.connect() as conn:
            conn.execute(sa.text("ANALYZE"))
            conn.commit()
    else:
        with db.engine.connect() as conn:
            conn.execute(sa.text("ANALYZE"))
            conn.commit()
    return {
        "outages": len(out_rows),
        "tickets": len(long_ones),
        "province": provinces[5],
        "site": "site-0005",
    }


def _outage(site: str, cam: str | None, start: float, end: float | None) -> dict[str, Any]:
    return {
        "site_id": site,
        "camera_id": cam,
        "kind": "camera_down" if cam else "site_offline",
        "cause": "timeout" if cam else "lost",
        "started_at": start,
        "ended_at": None if end is None else min(end, NOW - 1),
        "end_reason": "event",
        "footage_lost": False,
        "footage_lost_s": 0.0,
    }


def measure(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.95 * len(times)))]


def build_rollup(db: Database) -> None:
    """The rollup's first build over the whole synthetic history, then what a pass costs when
    nothing changed and when 20 sites' today changed (a busy minute)."""
    job = UptimeRollup(db)
    t = time.perf_counter()
    stats = job.refresh(now=NOW)
    print(
        f"  rollup first build: {stats.rows} rows over {stats.days} days in "
        f"{time.perf_counter() - t:.1f} s"
    )
    # Statistics for the planner, as after populate (PostgreSQL's autovacuum would do it).
    with db.engine.connect() as conn:
        conn.execute(sa.text("ANALYZE"))
        conn.commit()
    t = time.perf_counter()
    job.refresh(now=NOW + 10)
    print(f"  rollup pass, nothing changed: {(time.perf_counter() - t) * 1000:.0f} ms")
    with db.engine.begin() as conn:
        mark_dirty(
            conn, [(f"site-{i:04d}", NOW - 600, None) for i in range(0, SITES, 100)], now=NOW
        )
    t = time.perf_counter()
    stats = job.refresh(now=NOW + 20)
    print(
        f"  rollup pass, 20 sites' today changed: {stats.rows} rows in "
        f"{(time.perf_counter() - t) * 1000:.0f} ms"
    )


def uptime_cases(
    conn: Any, prov: Any
) -> list[tuple[str, str, Callable[[], Any], Callable[[], Any]]]:
    """(name, scope, ledger, rollup) for every uptime period measured."""
    now = NOW + 30  # half a job interval after the rollup's last pass
    midnight = day_bounds(day_of(now))[0]
    windows = [
        ("today (calendar)", midnight),
        ("7 d (calendar)", midnight - 6 * 86400),
        ("30 d (calendar)", midnight - 29 * 86400),
        ("last 24 h", now - 86400),
        ("last 7 d", now - 7 * 86400),
        ("last 30 d", now - 30 * 86400),
    ]
    out: list[tuple[str, str, Callable[[], Any], Callable[[], Any]]] = []
    for scope, level, where in (("nation", "province", None), ("province", "district", prov)):
        for name, since in windows:

            def call(
                rollup: bool, since: float = since, level: Any = level, where: Any = where
            ) -> Any:
                return queries.uptime(
                    conn,
                    since=since,
                    until=now,
                    level=level,
                    site_filter=where,
                    now=now,
                    use_rollup=rollup,
                )

            out.append(
                (f"uptime({level}, {name})", scope, partial(call, False), partial(call, True))
            )
    return out


def same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys()
        and all(
            math.isclose(x[k], y[k], rel_tol=1e-9, abs_tol=1e-6)
            if isinstance(x[k], float) and isinstance(y[k], float)
            else x[k] == y[k]
            for k in x
        )
        for x, y in zip(a, b, strict=True)
    )


def run(
    db: Database, repeat: int, uptime_only: bool = False
) -> list[tuple[str, str, float, float]]:
    info = populate(db)
    print(
        f"  {SITES} sites, {SITES * CAMS_PER_SITE} cameras, {info['outages']} outages, "
        f"{info['tickets']} tickets"
    )
    build_rollup(db)
    prov = sites.c.province == info["province"]
    month = NOW - DAYS * 86400
    conn = db.engine.connect()
    cases: list[tuple[str, str, Callable[[], Any]]] = [
        (
            "baseline: count(*) cameras",
            "nation",
            lambda: conn.execute(sa.select(sa.func.count()).select_from(cameras)).scalar_one(),
        ),
        ("board_summary(province)", "nation", lambda: queries.board_summary(conn)),
        ("board_summary(nation)", "nation", lambda: queries.board_summary(conn, group_by="nation")),
        (
            "board_summary(district)",
            "province",
            lambda: queries.board_summary(conn, group_by="district", site_filter=prov),
        ),
        ("list_sites(page 1)", "nation", lambda: queries.list_sites(conn, limit=50)),
        ("list_sites(red)", "nation", lambda: queries.list_sites(conn, rag=["red"], limit=50)),
        ("list_sites(page 1)", "province", lambda: queries.list_sites(conn, site_filter=prov)),
        ("site_detail", "nation", lambda: queries.site_detail(conn, info["site"])),
        ("site_cameras", "nation", lambda: queries.site_cameras(conn, info["site"])),
        ("faulty_cameras(page 1)", "nation", lambda: queries.faulty_cameras(conn, limit=100)),
        (
            "faulty_cameras(page 1)",
            "province",
            lambda: queries.faulty_cameras(conn, site_filter=prov, limit=100),
        ),
        (
            "outage_timeline(site, 30 d)",
            "nation",
            lambda: queries.outage_timeline(
                conn, since=month, until=NOW, site_id=info["site"], now=NOW
            ),
        ),
        (
            "outage_timeline(all, 1 h)",
            "nation",
            lambda: queries.outage_timeline(conn, since=NOW - 3600, until=NOW, now=NOW),
        ),
        (
            "list_tickets(open, page 1)",
            "nation",
            lambda: queries.list_tickets(conn, states=["open"], limit=50, now=NOW),
        ),
        (
            "list_tickets(page 1)",
            "province",
            lambda: queries.list_tickets(conn, site_filter=prov, states=None, limit=50, now=NOW),
        ),
        (
            "uptime(camera, 30 d, 1 site)",
            "nation",
            lambda: queries.uptime(
                conn, since=month, until=NOW, level="camera", site_id=info["site"], now=NOW
            ),
        ),
        ("mttr(province, 30 d)", "nation", lambda: queries.mttr(conn, since=month, until=NOW)),
        (
            "mttr(operator, 30 d)",
            "province",
            lambda: queries.mttr(
                conn, since=month, until=NOW, group_by="operator", site_filter=prov
            ),
        ),
    ]
    plan = [] if uptime_only else [(name, scope, fn, repeat) for name, scope, fn in cases]
    for name, scope, ledger, fast in uptime_cases(conn, prov):
        assert same(ledger(), fast()), f"{name} ({scope}): the rollup differs from the ledger"
        # The ledger's month nation-wide takes seconds: fewer runs there.
        slow = "30 d" in name and scope == "nation"
        plan.append((f"{name} ledger", scope, ledger, max(3, repeat // 4) if slow else repeat))
        plan.append((f"{name} rollup", scope, fast, repeat))
    out = []
    for name, scope, fn, n in plan:
        p50, p95 = measure(fn, n)
        out.append((name, scope, p50, p95))
        print(f"  {name:44s} {scope:9s} p50 {p50:8.2f} ms  p95 {p95:8.2f} ms", flush=True)
    # A busy minute: 10 sites' rows made dirty since the last pass; those sites are read from
    # the ledger for the whole period, the rest from the rollup.
    with db.engine.begin() as c:
        mark_dirty(c, [(f"site-{i:04d}", NOW - 300, None) for i in range(7, SITES, 200)], now=NOW)
    for name, scope, ledger, fast in uptime_cases(conn, prov):
        if scope == "nation" and ("30 d" in name or "24 h" in name):
            assert same(ledger(), fast()), f"{name}: the rollup differs from the ledger"
            p50, p95 = measure(fast, repeat)
            label = f"{name} rollup, 10 sites dirty"
            out.append((label, scope, p50, p95))
            print(f"  {label:44s} {scope:9s} p50 {p50:8.2f} ms  p95 {p95:8.2f} ms", flush=True)
    conn.close()
    return out


def _cache_pragma(db: Database, mib: int) -> None:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute(f"PRAGMA cache_size=-{mib * 1024}")

    sa.event.listen(db.engine, "connect", on_connect)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--repeat", type=int, default=40)
    ap.add_argument(
        "--sqlite-cache-mib",
        type=int,
        default=0,
        help="Also set PRAGMA cache_size to this many MiB on SQLite connections (the hub's "
        "db.py leaves SQLite's 2 MiB default; docs/hub.md suggests 64).",
    )
    ap.add_argument("--uptime-only", action="store_true", help="measure only uptime")
    args = ap.parse_args()
    results: dict[str, list[tuple[str, str, float, float]]] = {}
    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as d:
            print("SQLite (WAL)")
            db = Database.connect(f"sqlite:///{Path(d) / 'hub.db'}")
            if args.sqlite_cache_mib:
                print(f"  PRAGMA cache_size = {args.sqlite_cache_mib} MiB")
                _cache_pragma(db, args.sqlite_cache_mib)
            db.migrate()
            results["sqlite"] = run(db, args.repeat, args.uptime_only)
            db.close()
    if args.backend in ("postgresql", "both"):
        with Postgres() as pg:
            print("PostgreSQL (private server, fsync off)")
            db = Database.connect(pg.url)
            db.migrate()
            results["postgresql"] = run(db, args.repeat, args.uptime_only)
            db.close()
    print()
    backends = list(results)
    print("| query | scope | " + " | ".join(f"{b} p50 / p95 ms" for b in backends) + " |")
    print("|---|---|" + "---|" * len(backends))
    first = results[backends[0]]
    for i, (name, scope, _, _) in enumerate(first):
        cells = [f"{results[b][i][2]:.1f} / {results[b][i][3]:.1f}" for b in backends]
        print(f"| {name} | {scope} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
