"""The outage ledger and what is computed from it (uptime, timelines), on SQLite and
PostgreSQL. Messages go through the ingest's `BatchWriter` with chosen receive times, so every
bound is exact; the MQTT path is covered by test_central_hub_ingest.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from central_hub import queries
from central_hub.db import Database
from central_hub.ingest import Accepted, BatchResult, BatchWriter, SiteDirectory
from central_hub.ledger import LedgerPolicy
from central_hub.sites import sites
from central_hub.sites_cli import enroll_site
from central_hub.status import cameras, events, outages
from sitelink.messages import (
    CameraDown,
    CameraHealth,
    CameraUp,
    GapClosed,
    GapOpened,
    Health,
    ImageFaultEvent,
    Message,
    SiteHealth,
    StateBirth,
    StateDeath,
    encode,
)

T = 1_800_000_000.0  # a fixed clock: 2027-01-15


@pytest.fixture
def db(hub_db_url: str) -> Iterator[Database]:
    database = Database.connect(hub_db_url)
    database.migrate()
    with database.engine.begin() as conn:
        for site_id, province, district, operator in (
            ("s1", "Đà Nẵng", "Hải Châu", "vnpt"),
            ("s2", "Đà Nẵng", "Sơn Trà", "vnpt"),
            ("s3", "Hà Nội", "Đống Đa", "viettel"),
        ):
            enroll_site(
                conn,
                site_id=f"{site_id}-site",
                province=province,
                district=district,
                kind="facility",
                authority="health",
                operator=operator,
                now=T - 10_000,
            )
    yield database
    database.close()


class Feed:
    """Applies messages of one site as the ingest would, at chosen hub receive times."""

    def __init__(self, db: Database, site_id: str, policy: LedgerPolicy | None = None) -> None:
        directory = SiteDirectory(db)
        directory.refresh()
        self.writer = BatchWriter(db, directory, policy=policy)
        self.site_id = f"{site_id}-site"
        self.seq = 0
        self.bdseq = 0

    def __call__(self, *messages: Message, at: float) -> BatchResult:
        return self.writer.apply(
            [Accepted(self.site_id, m.TOPIC_KIND, m, encode(m), at) for m in messages]
        )

    def s(self) -> int:
        self.seq += 1
        return self.seq

    def birth(self, at: float, last_seq: int | None = None) -> BatchResult:
        self.bdseq += 1
        return self(
            StateBirth(
                ts=at,
                bdseq=self.bdseq,
                agent_version="1.0",
                started=at,
                last_seq=self.seq if last_seq is None else last_seq,
            ),
            at=at,
        )

    def death(self, at: float) -> BatchResult:
        return self(StateDeath(ts=at, bdseq=self.bdseq, agent_version="1.0", reason="lost"), at=at)


def ledger(db: Database, site: str = "s1-site") -> list[dict[str, Any]]:
    with db.engine.connect() as conn:
        rows = conn.execute(
            sa.select(outages).where(outages.c.site_id == site).order_by(outages.c.started_at)
        )
        return [dict(r._mapping) for r in rows]


def camera(db: Database, cam: str, site: str = "s1-site") -> dict[str, Any]:
    with db.engine.connect() as conn:
        row = conn.execute(
            sa.select(cameras).where(cameras.c.site_id == site, cameras.c.camera_id == cam)
        ).one()
        return dict(row._mapping)


def test_overlapping_conditions_make_one_outage_with_the_union_of_their_time(
    db: Database,
) -> None:
    f = Feed(db, "s1")
    f.birth(T)
    f(CameraDown(ts=T + 10, seq=f.s(), camera="c1", cause="timeout"), at=T + 10)
    # Recording had stopped a moment earlier (last packet at T+9); same incident.
    f(GapOpened(ts=T + 11, seq=f.s(), camera="c1", start=T + 9, cause="timeout"), at=T + 11)
    f(CameraUp(ts=T + 30, seq=f.s(), camera="c1"), at=T + 30)
    assert camera(db, "c1")["status"] == "down"  # still not recording
    f(
        GapClosed(ts=T + 32, seq=f.s(), camera="c1", start=T + 9, end=T + 31, cause="timeout"),
        at=T + 32,
    )
    [o] = ledger(db)
    assert (o["started_at"], o["ended_at"]) == (T + 9, T + 31)
    assert o["kind"] == "camera_down" and o["cause"] == "timeout"
    assert o["footage_lost"] is True and o["footage_lost_s"] == pytest.approx(22.0)
    assert camera(db, "c1")["status"] == "ok"


def test_image_faults_count_as_configured(db: Database) -> None:
    f = Feed(db, "s1")
    f.birth(T)
    f(ImageFaultEvent(ts=T + 5, seq=f.s(), camera="c1", fault="blurred", active=True), at=T + 5)
    assert camera(db, "c1")["status"] == "degraded" and ledger(db) == []
    f(ImageFaultEvent(ts=T + 8, seq=f.s(), camera="c1", fault="covered", active=True), at=T + 8)
    f(ImageFaultEvent(ts=T + 9, seq=f.s(), camera="c1", fault="blurred", active=False), at=T + 9)
    assert camera(db, "c1")["status"] == "down"
    f(ImageFaultEvent(ts=T + 20, seq=f.s(), camera="c1", fault="covered", active=False), at=T + 20)
    [o] = ledger(db)
    assert (o["kind"], o["cause"], o["started_at"], o["ended_at"]) == (
        "image_fault",
        "covered",
        T + 8,
        T + 20,
    )
    assert o["footage_lost"] is False

    strict = Feed(db, "s2", LedgerPolicy(outage_image_faults=frozenset({"frozen"})))
    strict.birth(T)
    strict(
        ImageFaultEvent(ts=T + 5, seq=strict.s(), camera="c1", fault="frozen", active=True),
        at=T + 5,
    )
    assert camera(db, "c1", "s2-site")["status"] == "down"


def test_late_intervals_are_recorded_once(db: Database) -> None:
    f = Feed(db, "s1")
    f.birth(T)
    # The camera_down was lost; camera_up says since when the camera was down.
    f(CameraUp(ts=T + 50, seq=2, camera="c1", down_since=T + 20), at=T + 50)
    [o] = ledger(db)
    assert (o["started_at"], o["ended_at"], o["end_reason"]) == (T + 20, T + 50, "late")
    assert o["kind"] == "camera_down" and o["cause"] == "unknown"
    # The lost camera_down arrives late (seq 1): history only, nothing opens again.
    r = f(CameraDown(ts=T + 20, seq=1, camera="c1", cause="refused"), at=T + 60)
    assert r.late_events == 1 and len(ledger(db)) == 1
    assert camera(db, "c1")["status"] == "ok"
    # A gap learnt only from its close, inside the known outage: marks footage lost there.
    f(GapClosed(ts=T + 61, seq=3, camera="c1", start=T + 25, end=T + 45, cause="eof"), at=T + 61)
    [o] = ledger(db)
    assert o["footage_lost"] is True and o["footage_lost_s"] == pytest.approx(20.0)
    # …and one outside any outage becomes its own recording_gap outage.
    f(GapClosed(ts=T + 90, seq=4, camera="c1", start=T + 70, end=T + 80, cause="stall"), at=T + 90)
    gap = ledger(db)[-1]
    assert (gap["kind"], gap["started_at"], gap["ended_at"]) == ("recording_gap", T + 70, T + 80)
    assert gap["footage_lost"] is True


def test_a_newer_health_sample_clears_a_stuck_outage(db: Database) -> None:
    f = Feed(db, "s1")
    f.birth(T)
    f(CameraDown(ts=T + 10, seq=f.s(), camera="c1", cause="timeout"), at=T + 10)
    f.s()  # the camera_up is lost for good
    site = SiteHealth(
        disk_total_bytes=1,
        disk_used_bytes=0,
        disk_free_bytes=1,
        cpu_percent=1,
        mem_total_bytes=1,
        mem_used_bytes=0,
        agent_version="1.0",
        uptime_s=1,
        spool_depth=0,
    )
    f(
        Health(
            ts=T + 5,
            site=site,
            cameras=[
                CameraHealth(camera="c1", connected=True, recording="recording", reconnects_1h=0)
            ],
        ),
        at=T + 12,
    )
    assert ledger(db)[0]["ended_at"] is None  # older than the camera_down: no effect
    f(
        Health(
            ts=T + 40,
            site=site,
            cameras=[
                CameraHealth(camera="c1", connected=True, recording="recording", reconnects_1h=0)
            ],
        ),
        at=T + 41,
    )
    [o] = ledger(db)
    assert (o["ended_at"], o["end_reason"]) == (T + 40, "health")


def test_an_edge_that_restarts_its_numbering_gets_a_new_epoch(db: Database) -> None:
    f = Feed(db, "s1")
    f.birth(T)
    for i in range(5):
        f(CameraUp(ts=T + i, seq=f.s(), camera="c1"), at=T + i)
    f.seq = 0  # re-imaged box: empty spool, seq from 1 again
    r = f.birth(T + 100, last_seq=0)
    assert [a["type"] for a in r.alerts] == ["edge_reset"]
    r = f(CameraDown(ts=T + 101, seq=f.s(), camera="c1", cause="eof"), at=T + 101)
    assert r.stored_events == 1 and r.duplicates == 0
    with db.engine.connect() as conn:
        epochs = conn.execute(
            sa.select(events.c.epoch, events.c.seq).order_by(events.c.epoch, events.c.seq)
        ).all()
    assert [tuple(e) for e in epochs][-2:] == [(0, 5), (1, 1)]
    assert camera(db, "c1")["status"] == "down"


def test_site_outage_bounds_and_stale_birth(db: Database) -> None:
    f = Feed(db, "s1")
    f.birth(T)
    f.death(T + 100)
    old = StateBirth(ts=T, bdseq=1, agent_version="1.0", started=T, last_seq=0)
    r = f(old, at=T + 120)  # the retained birth of the dead connection, redelivered
    assert r.stale_states == 1
    assert ledger(db)[0]["ended_at"] is None
    f.birth(T + 200)
    [o] = ledger(db)
    assert (o["camera_id"], o["started_at"], o["ended_at"]) == (None, T + 100, T + 200)


def test_uptime_counts_overlaps_once(db: Database) -> None:
    a = Feed(db, "s1")
    a.birth(T)
    a(CameraUp(ts=T, seq=a.s(), camera="c1"), CameraUp(ts=T, seq=a.s(), camera="c2"), at=T)
    a(CameraDown(ts=T + 100, seq=a.s(), camera="c1", cause="timeout"), at=T + 100)
    a.death(T + 150)  # the whole site is out from T+150 to T+300
    a.birth(T + 300)
    a(CameraUp(ts=T + 200, seq=a.s(), camera="c1"), at=T + 300)  # replayed: c1 back at T+200
    b = Feed(db, "s3")
    b.birth(T)
    b(CameraUp(ts=T, seq=b.s(), camera="x1"), at=T)
    b(CameraDown(ts=T + 500, seq=b.s(), camera="x1", cause="refused"), at=T + 500)  # still down

    def up(level: Any, **kw: Any) -> list[dict[str, Any]]:
        with db.engine.connect() as conn:
            return queries.uptime(conn, since=T, until=T + 1000, level=level, now=T + 2000, **kw)

    cams = {r["camera_id"]: r for r in up("camera")}
    # c1: own outage 100-200 ∪ site 150-300 = 200 s down of 1000.
    assert cams["c1"]["down_s"] == pytest.approx(200.0)
    assert cams["c1"]["uptime_pct"] == pytest.approx(80.0)
    assert cams["c2"]["down_s"] == pytest.approx(150.0)
    assert cams["x1"]["uptime_pct"] == pytest.approx(50.0)
    [s1] = up("site", site_id="s1-site")
    assert s1["cameras"] == 2 and s1["uptime_pct"] == pytest.approx(82.5)
    assert s1["sites"] == 1 and s1["site_uptime_pct"] == pytest.approx(85.0)
    provinces = {r["province"]: r for r in up("province")}
    assert provinces["Đà Nẵng"]["uptime_pct"] == pytest.approx(82.5)
    assert provinces["Đà Nẵng"]["sites"] == 1  # s2 never spoke: no monitored time
    assert provinces["Hà Nội"]["uptime_pct"] == pytest.approx(50.0)
    [nation] = up("nation")
    assert nation["cameras"] == 3 and nation["down_s"] == pytest.approx(850.0)
    assert nation["uptime_pct"] == pytest.approx(100 * (3000 - 850) / 3000)
    assert [r["operator"] for r in up("operator")] == ["viettel", "vnpt"]
    scoped = up("province", site_filter=sites.c.province == "Hà Nội")
    assert [r["province"] for r in scoped] == ["Hà Nội"]
    # An open outage counts up to `now` only.
    with db.engine.connect() as conn:
        early = queries.uptime(
            conn, since=T, until=T + 1000, level="camera", now=T + 750, site_id="s3-site"
        )
    assert early[0]["monitored_s"] == pytest.approx(750.0)
    assert early[0]["down_s"] == pytest.approx(250.0)


def test_outage_timeline_of_a_camera_includes_its_site(db: Database) -> None:
    f = Feed(db, "s1")
    f.birth(T)
    f(CameraDown(ts=T + 10, seq=f.s(), camera="c1", cause="timeout"), at=T + 10)
    f(CameraUp(ts=T + 20, seq=f.s(), camera="c1"), at=T + 20)
    f(CameraDown(ts=T + 30, seq=f.s(), camera="c2", cause="timeout"), at=T + 30)
    f.death(T + 40)
    with db.engine.connect() as conn:
        tl = queries.outage_timeline(
            conn, since=T, until=T + 100, site_id="s1-site", camera_id="c1", now=T + 100
        )
        assert [(r["camera_id"], r["kind"]) for r in tl] == [
            ("c1", "camera_down"),
            (None, "site_offline"),
        ]
        assert tl[1]["ended_at"] is None and tl[1]["duration_s"] == pytest.approx(60.0)
        window = queries.outage_timeline(conn, since=T + 25, until=T + 35, now=T + 100)
        assert [r["camera_id"] for r in window] == ["c2"]
        assert (
            queries.outage_timeline(
                conn, since=T, until=T + 100, site_filter=sites.c.province == "Hà Nội"
            )
            == []
        )
