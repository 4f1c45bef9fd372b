"""The daily uptime rollup on a real ledger, SQLite and PostgreSQL: the hub's own writer
(`BatchWriter`) turns real sitelink messages into outages over five days — outages across
midnight, a site offline while a camera is down, cameras added, removed and disabled, events
delivered days late — and `queries.uptime` from the rollup must equal the ledger's answer for
every kind of period, before and after the job catches up."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any, Literal

import pytest
import sqlalchemy as sa

from central_hub import queries, rollup
from central_hub.db import Database
from central_hub.ingest import Accepted, BatchWriter, SiteDirectory
from central_hub.rollup import (
    UptimeRollup,
    day_bounds,
    day_of,
    mark_dirty,
    run_rollup,
    uptime_daily,
    uptime_intervals,
)
from central_hub.sites import sites
from central_hub.sites_cli import enroll_site, set_site_enabled
from devstack.waiting import until
from sitelink.messages import (
    CameraDown,
    CameraInfo,
    CameraState,
    CameraUp,
    GapClosed,
    GapOpened,
    Inventory,
    Message,
    SiteInfo,
    StateBirth,
    StateDeath,
    StreamProfile,
    decode_delivery,
    outgoing,
)

H = 3600.0

SITES: dict[str, tuple[str, str, Literal["vnpt", "viettel"]]] = {
    "dn-a": ("Đà Nẵng", "Hải Châu", "vnpt"),
    "dn-b": ("Đà Nẵng", "Sơn Trà", "vnpt"),
    "hn-c": ("Hà Nội", "Đống Đa", "viettel"),
    "hn-d": ("Hà Nội", "Ba Đình", "viettel"),
}


@pytest.fixture
def hub(hub_db_url: str) -> Iterator[Database]:
    db = Database.connect(hub_db_url)
    db.migrate()
    with db.engine.begin() as conn:
        for site_id, (province, district, operator) in SITES.items():
            enroll_site(
                conn,
                site_id=site_id,
                province=province,
                district=district,
                kind="facility",
                authority="health",
                operator=operator,
                name=f"Điểm {site_id}",
            )
    yield db
    db.close()


class Edge:
    """One site's box: real sitelink messages, written by the hub's writer as received at
    `at` (the hub's clock), so that history can be laid out over past days."""

    def __init__(self, writer: BatchWriter, site_id: str) -> None:
        self.writer = writer
        self.site_id = site_id
        self.seq = 0
        self.bdseq = 0

    def send(self, message: Message, at: float) -> None:
        out = outgoing(self.site_id, message)
        d = decode_delivery(out.topic, out.payload)
        self.writer.apply([Accepted(self.site_id, d.topic.kind, d.message, out.payload, at)])

    def _seq(self) -> int:
        self.seq += 1
        return self.seq

    def birth(self, at: float) -> None:
        self.bdseq += 1
        self.send(
            StateBirth(
                ts=at, bdseq=self.bdseq, agent_version="0.1.0", started=at, last_seq=self.seq
            ),
            at,
        )

    def death(self, at: float) -> None:
        self.send(StateDeath(ts=at, bdseq=self.bdseq, agent_version="0.1.0", reason="lost"), at)

    def inventory(self, at: float, cams: dict[str, CameraState]) -> None:
        province, district, operator = SITES[self.site_id]
        self.send(
            Inventory(
                ts=at,
                site=SiteInfo(
                    province=province,
                    district=district,
                    kind="facility",
                    authority="health",
                    operator=operator,
                ),
                cameras=[
                    CameraInfo(
                        id=cam,
                        profiles=[
                            StreamProfile(token="main", codec="h264", width=1920, height=1080)
                        ],
                        record_profile="main",
                        state=state,
                    )
                    for cam, state in cams.items()
                ],
            ),
            at,
        )

    def down(self, cam: str, ts: float, at: float | None = None) -> None:
        self.send(CameraDown(ts=ts, seq=self._seq(), camera=cam, cause="timeout"), at or ts)

    def up(self, cam: str, ts: float, at: float | None = None, since: float | None = None) -> None:
        self.send(CameraUp(ts=ts, seq=self._seq(), camera=cam, down_since=since), at or ts)

    def gap(self, cam: str, start: float, end: float) -> None:
        self.send(
            GapOpened(ts=start, seq=self._seq(), camera=cam, start=start, cause="error"), start
        )
        self.send(
            GapClosed(ts=end, seq=self._seq(), camera=cam, start=start, end=end, cause="error"), end
        )


def recording(*cams: str) -> dict[str, CameraState]:
    return dict.fromkeys(cams, "recording")


LEVELS: tuple[queries.UptimeLevel, ...] = ("nation", "operator", "province", "district", "site")


def assert_same(live: list[dict[str, Any]], fast: list[dict[str, Any]], what: str) -> None:
    assert [r.keys() for r in fast] == [r.keys() for r in live], what
    for a, b in zip(live, fast, strict=True):
        for k, v in a.items():
            w = b[k]
            if isinstance(v, float) or isinstance(w, float):
                assert v is not None and w is not None, (what, k, v, w)
                assert math.isclose(v, w, rel_tol=1e-9, abs_tol=1e-6), (what, k, v, w, a)
            else:
                assert v == w, (what, k, v, w, a)


def periods(start: float, now: float) -> list[tuple[str, float, float]]:
    """Calendar days, runs of days, rolling windows, parts of days, and periods ending in the
    past or in the future."""
    out = []
    d = day_of(start)
    while day_bounds(d)[0] < now:
        s, e = day_bounds(d)
        out.append((f"day {d}", s, e))
        d += timedelta(days=1)
    first = day_bounds(day_of(start))[0]
    today = day_bounds(day_of(now))[0]
    out += [
        ("everything", first - 86400, now),
        ("calendar, from day 1 to now", first + 86400, now),
        ("calendar, days 1-3", first + 86400, first + 4 * 86400),
        ("today so far", today, now),
        ("last 24 h", now - 86400, now),
        ("last 7 d", now - 7 * 86400, now),
        ("last 3 d", now - 3 * 86400, now),
        ("last hour", now - H, now),
        ("inside one day", first + 86400 + 5 * H, first + 86400 + 21.5 * H),
        ("across days, parts at both ends", first + 30 * H, first + 77 * H),
        ("until a moment past", first + 20 * H, now - 2 * H),
        ("until later than now", now - 40 * H, now + 5 * H),
    ]
    return out


def compare_everything(db: Database, start: float, now: float) -> None:
    in_dn = sites.c.province == "Đà Nẵng"
    with db.engine.connect() as conn:
        for name, since, until_ in periods(start, now):
            for level in LEVELS:
                for scope in ({}, {"site_filter": in_dn}, {"operator": "viettel"}):
                    args: dict[str, Any] = {"since": since, "until": until_, "level": level}
                    live = queries.uptime(conn, **args, **scope, now=now, use_rollup=False)
                    fast = queries.uptime(conn, **args, **scope, now=now)
                    assert_same(live, fast, f"{name} / {level} / {scope}")


def used_rollup(db: Database, since: float, now: float) -> bool:
    """Whether the rollup answered [since, now) nation-wide (rather than the ledger)."""
    with db.engine.connect() as conn:
        got = rollup.uptime_parts(conn, since, now, now, (), None, queries.NO_UPTIME_FILTERS)
    return got is not None


def test_uptime_from_the_rollup_equals_the_ledger_through_late_events_and_camera_changes(
    hub: Database,
) -> None:
    now = time.time()
    d0 = day_of(now) - timedelta(days=4)
    s = day_bounds(d0)[0]  # midnight, four days ago
    directory = SiteDirectory(hub)
    directory.refresh()
    writer = BatchWriter(hub, directory)
    a, b, c, d = (Edge(writer, sid) for sid in SITES)
    job = UptimeRollup(hub)

    # Day 0: four sites come up.
    for e, cams in ((a, 4), (b, 3), (c, 2), (d, 2)):
        e.birth(s + 1 * H)
        e.inventory(s + 1 * H + 1, recording(*[f"cam-{i}" for i in range(1, cams + 1)]))
    b.gap("cam-2", s + 10 * H, s + 11 * H)
    d.down("cam-1", s + 12 * H)
    # A camera down from 22:00 to 03:00, its site offline from 23:00 to 01:00 within that.
    a.down("cam-1", s + 22 * H)
    a.death(s + 23 * H)
    a.birth(s + 25 * H)
    a.up("cam-1", s + 27 * H)
    # Day 1.
    c.down("cam-1", s + 30 * H)
    c.up("cam-1", s + 31.5 * H)
    d.up("cam-1", s + 40 * H)
    job.refresh(now=s + 50 * H)  # day 2, 02:00: days 0-2 computed
    assert computed_rows(hub) == 4 * 3

    # Day 2: a camera added at dn-a, one removed at dn-b; hn-c's box, offline since day 1,
    # tells late that its cam-2 was down on day 1 (a day already computed).
    a.inventory(s + 53 * H, recording("cam-1", "cam-2", "cam-3", "cam-4", "cam-5"))
    b.inventory(s + 56 * H, recording("cam-1", "cam-2"))
    c.up("cam-2", ts=s + 46 * H, since=s + 44 * H, at=s + 58 * H)
    a.down("cam-4", s + 60 * H)
    a.up("cam-4", s + 61 * H)
    compare_everything(hub, s, s + 62 * H)  # rows dirty or cameras changed: from the ledger
    job.refresh(now=s + 73 * H)  # day 3, 01:00
    compare_everything(hub, s, s + 73 * H)
    assert used_rollup(hub, s, s + 73 * H)

    # Day 3: dn-b offline for two hours; hn-c's cam-2 disabled (no longer counted, in any
    # period); hn-d disabled by the operator (left out, like any disabled site).
    b.death(s + 76 * H)
    b.birth(s + 78 * H)
    c.inventory(s + 84 * H, {"cam-1": "recording", "cam-2": "disabled"})
    with hub.engine.begin() as conn:
        set_site_enabled(conn, "hn-d", False)
    # Today: a camera down 15 minutes ago, still down.
    a.down("cam-2", now - 900)
    compare_everything(hub, s, now - 600)
    # No row for today yet (as just after midnight), day 3's not final: those days of those
    # sites from the ledger, the rest still from the rollup.
    assert used_rollup(hub, s, now - 600)
    job.refresh(now=now - 600)
    with hub.engine.connect() as conn:
        assert not conn.execute(
            sa.select(sa.func.count()).where(uptime_daily.c.dirty == sa.true())
        ).scalar()
    compare_everything(hub, s, now - 600)
    # Ten minutes later, nothing new: today extrapolated from the row's state.
    compare_everything(hub, s, now)
    assert used_rollup(hub, s, now) and used_rollup(hub, now - 86400, now)

    # An outage of day 1 learnt after all that: its day is dirty at once, figures still equal.
    a.up("cam-3", ts=s + 35 * H, since=s + 33 * H, at=now - 60)
    with hub.engine.connect() as conn:
        dirty = conn.execute(
            sa.select(uptime_daily.c.site_id, uptime_daily.c.day).where(
                uptime_daily.c.dirty == sa.true()
            )
        ).all()
    assert [tuple(r) for r in dirty] == [("dn-a", d0 + timedelta(days=1))]
    compare_everything(hub, s, now)
    stats = job.refresh(now=now)
    assert stats.rows == 1
    compare_everything(hub, s, now)
    assert job.refresh(now=now).rows == 0


def computed_rows(db: Database) -> int:
    with db.engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.count()).where(uptime_daily.c.computed_at.is_not(None))
        ).scalar_one()


def test_mark_dirty_marks_the_days_an_outage_touches_and_creates_missing_rows_dirty(
    hub: Database,
) -> None:
    now = time.time()
    today = day_of(now)
    directory = SiteDirectory(hub)
    directory.refresh()
    writer = BatchWriter(hub, directory)
    e = Edge(writer, "dn-a")
    e.birth(now - 10 * 86400)
    e.inventory(now - 10 * 86400 + 1, recording("cam-1"))
    with hub.engine.begin() as conn:
        conn.execute(uptime_daily.delete())
        # Closed, two days long; open since yesterday; from before the site was first seen
        # (an edge clock years behind): only from the first contact on.
        n = mark_dirty(
            conn,
            [
                ("dn-a", now - 8 * 86400, now - 6 * 86400),
                ("dn-a", now - 86400, None),
                ("dn-a", now - 5 * 365 * 86400, now - 9 * 86400),
            ],
            now=now,
        )
        got = conn.execute(
            sa.select(uptime_daily.c.day, uptime_daily.c.dirty, uptime_daily.c.computed_at).where(
                uptime_daily.c.site_id == "dn-a"
            )
        ).all()
    first = day_of(now - 10 * 86400)
    want = {first, first + timedelta(days=1)}
    want |= {day_of(now - 8 * 86400) + timedelta(days=i) for i in range(3)}
    want |= {day_of(now - 86400), today}
    assert n == len(want) and {r.day for r in got} == want
    assert all(r.dirty and r.computed_at is None for r in got)


def dirty_rows(db: Database) -> list[tuple[str, date]]:
    with db.engine.connect() as conn:
        found = conn.execute(
            sa.select(uptime_daily.c.site_id, uptime_daily.c.day)
            .where(uptime_daily.c.dirty == sa.true())
            .order_by(uptime_daily.c.site_id, uptime_daily.c.day)
        )
        return [(r.site_id, r.day) for r in found]


def test_an_outage_changed_marks_only_the_days_its_change_covers(hub: Database) -> None:
    now = time.time()
    t0 = now - 3 * 86400
    directory = SiteDirectory(hub)
    directory.refresh()
    writer = BatchWriter(hub, directory)
    e = Edge(writer, "dn-a")
    e.birth(t0)
    e.inventory(t0 + 1, recording("cam-1", "cam-2"))
    e.down("cam-1", t0 + H)  # down for three days
    job = UptimeRollup(hub)
    job.refresh(now=now - H)
    assert dirty_rows(hub) == []
    # Footage lost while it is down: the outage row changes, not what uptime counts.
    e.gap("cam-1", now - 3000, now - 2500)
    assert dirty_rows(hub) == []
    # It ends half an hour ago: only the days from its end are marked, not its three days.
    e.up("cam-1", now - 1800)
    d = day_of(now - 1800)
    assert dirty_rows(hub) == [
        ("dn-a", d + timedelta(days=i)) for i in range((day_of(now) - d).days + 1)
    ]
    compare_everything(hub, t0, now)
    job.refresh(now=now)
    compare_everything(hub, t0, now)


def test_a_pass_computes_the_history_once_then_only_what_changed(
    hub: Database, caplog: pytest.LogCaptureFixture
) -> None:
    now = time.time()
    directory = SiteDirectory(hub)
    directory.refresh()
    writer = BatchWriter(hub, directory)
    for sid in SITES:
        e = Edge(writer, sid)
        e.birth(now - 3 * 86400)
        e.inventory(now - 3 * 86400 + 1, recording("cam-1", "cam-2"))
        e.down("cam-1", now - 2 * 86400)
        e.up("cam-1", now - 2 * 86400 + 600)
    job = UptimeRollup(hub, chunk_sites=1)
    days = (day_of(now) - day_of(now - 3 * 86400)).days + 1
    with caplog.at_level(logging.INFO, logger="central_hub.rollup"):
        stats = job.refresh(now=now)
    assert stats.rows == len(SITES) * days and stats.raced == 0
    assert "uptime rollup: computing" in caplog.text  # the first build says what it does
    with hub.engine.connect() as conn:
        stretches = conn.execute(sa.select(sa.func.count()).select_from(uptime_intervals)).scalar()
    assert stretches  # a part of a day is summed from these, without the ledger
    assert job.refresh(now=now + 30).rows == 0
    # A camera that appears changes its site's counted cameras: that site's days again.
    Edge(writer, "hn-c").inventory(now + 40, recording("cam-1", "cam-2", "cam-3"))
    stats = job.refresh(now=now + 60)
    assert stats.sites_changed == 1 and stats.rows == days
    # A pass asked to stop returns before computing anything.
    job.stop()
    with hub.engine.begin() as conn:
        conn.execute(uptime_daily.update().values(dirty=True))
    assert job.refresh(now=now + 90).stopped


async def test_the_job_builds_the_rollup_in_the_background_until_cancelled(
    hub: Database,
) -> None:
    now = time.time()
    directory = SiteDirectory(hub)
    directory.refresh()
    writer = BatchWriter(hub, directory)
    e = Edge(writer, "dn-a")
    e.birth(now - 2 * 86400)
    e.inventory(now - 2 * 86400 + 1, recording("cam-1"))
    task = asyncio.create_task(run_rollup(hub, 3600.0))
    want = (day_of(now) - day_of(now - 2 * 86400)).days + 1
    await until(lambda: computed_rows(hub) >= len(SITES) * want, 60, "rollup built")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with hub.engine.connect() as conn:
        assert used_rollup(hub, now - 86400, time.time())
        days = conn.execute(sa.select(sa.func.min(uptime_daily.c.day))).scalar()
    assert isinstance(days, date) and days == day_of(now - 2 * 86400)
