"""The hub's ingest against a real Mosquitto and a real database (SQLite and PostgreSQL):
sites publish real sitelink messages as an edge would, and the status tables follow.

Also the hub config loader and `central-hub sites` (the ingest's inputs)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from central_hub import queries
from central_hub.alerts import AlertHub
from central_hub.db import Database
from central_hub.hub_config import (
    HubConfigError,
    IngestConfig,
    MqttConfig,
    load_config,
    settings_markdown,
)
from central_hub.ingest import GapAlerter, Ingest
from central_hub.sites import sites
from central_hub.sites_cli import enroll_site, set_site_enabled, sites_group
from central_hub.status import (
    camera_health,
    camera_thumbnails,
    cameras,
    events,
    missing_seq,
    outages,
)
from devstack.broker import Mosquitto
from devstack.waiting import until
from sitelink.messages import (
    CameraDown,
    CameraHealth,
    CameraInfo,
    CameraUp,
    Cause,
    Health,
    ImageHealth,
    Inventory,
    Message,
    SiteHealth,
    SiteInfo,
    StateBirth,
    StateDeath,
    StreamProfile,
    outgoing,
)

ROOT = Path(__file__).resolve().parent.parent
JPEG = base64.b64encode(b"\xff\xd8\xff\xe0" + b"thumb" * 10).decode()

SITES: dict[str, tuple[str, ...]] = {
    "dn-bv-01": ("Đà Nẵng", "Hải Châu", "facility", "health", "vnpt"),
    "dn-cp-02": ("Đà Nẵng", "Sơn Trà", "checkpoint", "police", "vnpt"),
    "hn-bv-01": ("Hà Nội", "Đống Đa", "facility", "military", "viettel"),
}


def enroll_all(db: Database, ids: dict[str, tuple[str, ...]] = SITES) -> None:
    with db.engine.begin() as conn:
        for site_id, (prov, dist, kind, auth, op) in ids.items():
            enroll_site(
                conn,
                site_id=site_id,
                province=prov,
                district=dist,
                kind=kind,
                authority=auth,
                operator=op,
                name=f"Điểm {site_id}",
            )


@pytest.fixture
def hub_db(hub_db_url: str) -> Iterator[Database]:
    db = Database.connect(hub_db_url)
    db.migrate()
    enroll_all(db)
    yield db
    db.close()


_client_ids = itertools.count()


def mqtt_config(broker: Mosquitto, **overrides: Any) -> MqttConfig:
    values: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "client_id": f"test-hub-{os.getpid()}-{next(_client_ids)}",
        "share_group": "test-hub",
        "session_expiry_s": 120,
        "receive_maximum": 4000,
    }
    values.update(overrides)
    return MqttConfig(**values)


@asynccontextmanager
async def running_ingest(
    db: Database, broker: Mosquitto, *, alerts: AlertHub | None = None, **mqtt: Any
) -> AsyncIterator[Ingest]:
    ingest = Ingest(
        db,
        mqtt_config(broker, **mqtt),
        IngestConfig(batch_max_delay_s=0.02, sites_refresh_s=0.3, reject_log_interval_s=60),
        alerts=alerts,
    )
    async with ingest:
        yield ingest


class Edge:
    """Publishes as one site would: real sitelink messages, its own seq and bdseq."""

    def __init__(self, client: aiomqtt.Client, site_id: str) -> None:
        self.client = client
        self.site_id = site_id
        self.seq = 0
        self.bdseq = 0

    async def send(self, message: Message) -> None:
        out = outgoing(self.site_id, message)
        await self.client.publish(out.topic, out.payload, qos=out.qos, retain=out.retain)

    async def birth(self, ts: float | None = None) -> StateBirth:
        self.bdseq += 1
        now = ts or time.time()
        b = StateBirth(
            ts=now, bdseq=self.bdseq, agent_version="0.1.0", started=now, last_seq=self.seq
        )
        await self.send(b)
        return b

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def down(self, camera: str, ts: float, cause: Cause = "timeout") -> None:
        await self.send(CameraDown(ts=ts, seq=self.next_seq(), camera=camera, cause=cause))

    async def up(self, camera: str, ts: float, down_since: float | None = None) -> None:
        await self.send(CameraUp(ts=ts, seq=self.next_seq(), camera=camera, down_since=down_since))


@asynccontextmanager
async def edge(broker: Mosquitto, site_id: str) -> AsyncIterator[Edge]:
    async with aiomqtt.Client(
        broker.host, broker.port, identifier=f"edge-{site_id}-{next(_client_ids)}"
    ) as client:
        yield Edge(client, site_id)


def site_row(db: Database, site_id: str) -> dict[str, Any] | None:
    with db.engine.connect() as conn:
        return queries.site_detail(conn, site_id)


def outage_rows(db: Database, site_id: str) -> list[dict[str, Any]]:
    with db.engine.connect() as conn:
        return [
            dict(r._mapping)
            for r in conn.execute(
                sa.select(outages).where(outages.c.site_id == site_id).order_by(outages.c.id)
            )
        ]


def inventory(
    cams: list[str],
    *,
    province: str = "Đà Nẵng",
    district: str = "Hải Châu",
    ts: float | None = None,
) -> Inventory:
    return Inventory(
        ts=ts or time.time(),
        site=SiteInfo(
            province=province,
            district=district,
            kind="facility",
            authority="health",
            operator="vnpt",
        ),
        cameras=[
            CameraInfo(
                id=c,
                name=f"Camera {c}",
                profiles=[StreamProfile(token="main", codec="h264", width=1920, height=1080)],
                record_profile="main",
                state="recording",
            )
            for c in cams
        ],
    )


# --- ingest end to end ----------------------------------------------------------------------


async def test_birth_camera_outage_and_death_build_state_and_ledger(
    hub_db: Database, mosquitto: Mosquitto
) -> None:
    alerts = AlertHub()
    seen = alerts.subscribe()
    async with running_ingest(hub_db, mosquitto, alerts=alerts), edge(mosquitto, "dn-bv-01") as e:
        t0 = time.time() - 100
        await e.birth(ts=t0)
        await e.send(inventory(["cam-1", "cam-2"], ts=t0 + 1))
        await e.down("cam-1", t0 + 10, "stall")
        await until(
            lambda: (site_row(hub_db, "dn-bv-01") or {}).get("cameras_down") == 1,
            what="camera down",
        )
        st = site_row(hub_db, "dn-bv-01")
        assert st is not None
        assert st["online"] is True and st["rag"] == "amber" and st["cameras_total"] == 2
        await e.up("cam-1", t0 + 40)
        await until(
            lambda: (site_row(hub_db, "dn-bv-01") or {}).get("rag") == "green", what="site green"
        )
        [cam_outage] = outage_rows(hub_db, "dn-bv-01")
        assert cam_outage["camera_id"] == "cam-1"
        assert cam_outage["kind"] == "camera_down" and cam_outage["cause"] == "stall"
        assert cam_outage["started_at"] == pytest.approx(t0 + 10)
        assert cam_outage["ended_at"] == pytest.approx(t0 + 40)
        assert cam_outage["footage_lost"] is False

        # A clean shutdown: the agent publishes the death paired with its birth.
        await e.send(
            StateDeath(ts=time.time(), bdseq=e.bdseq, agent_version="0.1.0", reason="shutdown")
        )
        await until(
            lambda: (site_row(hub_db, "dn-bv-01") or {}).get("online") is False, what="site offline"
        )
        site_out = outage_rows(hub_db, "dn-bv-01")[-1]
        assert site_out["camera_id"] is None and site_out["kind"] == "site_offline"
        assert site_out["cause"] == "shutdown" and site_out["ended_at"] is None
        assert site_row(hub_db, "dn-bv-01")["rag"] == "red"  # type: ignore[index]

        birth2 = await e.birth()
        await until(
            lambda: outage_rows(hub_db, "dn-bv-01")[-1]["ended_at"] is not None,
            what="site outage closed",
        )
        site_out = outage_rows(hub_db, "dn-bv-01")[-1]
        assert site_out["started_at"] <= site_out["ended_at"] <= time.time()
        assert site_out["ended_at"] == pytest.approx(min(birth2.ts, site_out["ended_at"]))
        assert site_row(hub_db, "dn-bv-01")["bdseq"] == 2  # type: ignore[index]

    types = []
    while seen.pending():
        types.append((await anext(seen))["type"])
    assert types.count("outage_opened") == 1 and types.count("outage_closed") == 2
    assert "site_offline" in types and types.count("site_online") == 2


async def test_a_killed_edge_goes_offline_through_its_will(
    hub_db: Database, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The broker publishes the will of a process killed with SIGKILL; the hub takes the
    site offline from it, because its bdseq matches the current birth."""
    script = tmp_path / "edge.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import signal, sys, time
            import paho.mqtt.client as mqtt
            from paho.mqtt.enums import CallbackAPIVersion
            from sitelink.messages import StateBirth, outgoing
            now = time.time()
            birth = StateBirth(ts=now, bdseq=7, agent_version="0.1.0", started=now, last_seq=0)
            will = outgoing("dn-cp-02", birth.matching_death("lost"))
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edge-dn-cp-02",
                            protocol=mqtt.MQTTv5)
            c.will_set(will.topic, will.payload, qos=1, retain=True)
            c.connect("{mosquitto.host}", {mosquitto.port}, keepalive=30)
            c.loop_start()
            out = outgoing("dn-cp-02", birth)
            c.publish(out.topic, out.payload, qos=1, retain=True).wait_for_publish(10)
            print("ready", flush=True)
            signal.pause()  # until the test kills it
            """
        )
    )
    async with running_ingest(hub_db, mosquitto):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line.strip() == b"ready"
            await until(
                lambda: (site_row(hub_db, "dn-cp-02") or {}).get("online") is True, what="birth"
            )
            killed_at = time.time()
            proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await until(
            lambda: (site_row(hub_db, "dn-cp-02") or {}).get("online") is False,
            what="death from the will",
        )
        st = site_row(hub_db, "dn-cp-02")
        assert st is not None and st["death_reason"] == "lost" and st["bdseq"] == 7
        [out] = outage_rows(hub_db, "dn-cp-02")
        assert out["kind"] == "site_offline" and out["cause"] == "lost"
        assert killed_at <= out["started_at"] <= time.time()


async def test_events_are_deduplicated_on_site_and_seq(
    hub_db: Database, mosquitto: Mosquitto
) -> None:
    async with running_ingest(hub_db, mosquitto) as ingest, edge(mosquitto, "dn-bv-01") as e:
        t0 = time.time() - 50
        await e.birth(ts=t0)
        down = CameraDown(ts=t0 + 5, seq=1, camera="cam-1", cause="timeout")
        for _ in range(3):  # a spool replayed, a QoS 1 redelivery
            await e.send(down)
        await until(lambda: ingest.counters.duplicates == 2, what="2 duplicates")
        await e.send(down)  # once more, after it was committed: caught by the database
        await until(lambda: ingest.counters.duplicates == 3, what="3 duplicates")
        with hub_db.engine.connect() as conn:
            n = conn.execute(
                sa.select(sa.func.count()).select_from(events).where(events.c.site_id == "dn-bv-01")
            ).scalar_one()
        assert n == 1
        assert ingest.counters.stored_events == 1
        assert len(outage_rows(hub_db, "dn-bv-01")) == 1


async def test_a_hole_in_seq_is_recorded_and_filled_by_the_late_event(
    hub_db: Database, mosquitto: Mosquitto
) -> None:
    async with running_ingest(hub_db, mosquitto) as ingest, edge(mosquitto, "dn-bv-01") as e:
        t0 = time.time() - 50
        await e.birth(ts=t0)
        await e.send(CameraDown(ts=t0 + 1, seq=1, camera="cam-1", cause="timeout"))
        # seq 2..4 are lost on the way; 5 arrives.
        await e.send(CameraUp(ts=t0 + 9, seq=5, camera="cam-1"))

        def ranges() -> list[tuple[int, int]]:
            with hub_db.engine.connect() as conn:
                rows = queries.missing_ranges(conn, "dn-bv-01")
            return sorted((r["first_seq"], r["last_seq"]) for r in rows)

        await until(lambda: ranges() == [(2, 4)], what="hole 2-4")
        assert site_row(hub_db, "dn-bv-01")["missing_events"] == 3  # type: ignore[index]
        await e.send(CameraUp(ts=t0 + 3, seq=3, camera="cam-9"))  # late
        await until(lambda: ranges() == [(2, 2), (4, 4)], what="hole split")
        await e.send(CameraDown(ts=t0 + 2, seq=2, camera="cam-9", cause="eof"))
        await e.send(CameraDown(ts=t0 + 4, seq=4, camera="cam-9", cause="eof"))
        await until(lambda: ranges() == [], what="hole filled")
        await ingest.wait_idle()
        assert site_row(hub_db, "dn-bv-01")["missing_events"] == 0  # type: ignore[index]
        assert ingest.counters.missing_seqs == 3 and ingest.counters.late_events == 3


async def test_a_hole_is_alerted_once_and_only_if_it_lasts(
    hub_db: Database, mosquitto: Mosquitto
) -> None:
    alerts = AlertHub()
    seen = alerts.subscribe(lambda a: a["type"] == "seq_gap")
    ingest = Ingest(
        hub_db,
        mqtt_config(mosquitto),
        IngestConfig(batch_max_delay_s=0.02, gap_alert_delay_s=1.0),
        alerts=alerts,
    )
    async with ingest, edge(mosquitto, "dn-bv-01") as e:
        t0 = time.time() - 50
        await e.birth(ts=t0)
        await e.send(CameraDown(ts=t0 + 1, seq=1, camera="cam-1", cause="timeout"))
        await e.send(CameraUp(ts=t0 + 9, seq=5, camera="cam-1"))  # 2..4 missing
        await until(lambda: ingest.counters.missing_seqs == 3, what="hole 2-4 recorded")
        # A lasting hole: alerted by the running ingest, once.
        alert = await asyncio.wait_for(anext(seen), 10)
        assert (alert["first_seq"], alert["last_seq"], alert["site_id"]) == (2, 4, "dn-bv-01")
        assert "3" in alert["text_vi"] and "3 events missing" in alert["text_en"]
        # Part of it filled late: what is left was alerted already, not news again.
        await e.send(CameraUp(ts=t0 + 3, seq=3, camera="cam-9"))
        await until(lambda: ingest.counters.late_events == 1, what="seq 3 filled in")
        await ingest.wait_idle()
        alerter = GapAlerter(hub_db, ingest.directory, alerts, delay_s=1.0)
        assert alerter.due(time.time() + 3600) == []
        # A new hole that the next message fills is never alerted...
        await e.send(CameraDown(ts=t0 + 20, seq=7, camera="cam-2", cause="eof"))
        await until(lambda: ingest.counters.missing_seqs == 4, what="hole 6 recorded")
        await ingest.wait_idle()
        with hub_db.engine.connect() as conn:
            detected = conn.execute(
                sa.select(missing_seq.c.detected_at).where(missing_seq.c.first_seq == 6)
            ).scalar_one()
        assert alerter.due(detected + 0.5) == []  # not yet due
        await e.send(CameraDown(ts=t0 + 19, seq=6, camera="cam-3", cause="eof"))
        await until(lambda: ingest.counters.late_events == 2, what="seq 6 filled in")
        await ingest.wait_idle()
        assert alerter.due(detected + 3600) == []
    assert seen.pending() == 0


async def test_a_stale_death_is_ignored(hub_db: Database, mosquitto: Mosquitto) -> None:
    """The will of an old connection arriving after the new birth must not take the site
    down (Sparkplug bdseq rule)."""
    async with running_ingest(hub_db, mosquitto) as ingest, edge(mosquitto, "hn-bv-01") as e:
        await e.birth()  # bdseq 1
        b2 = await e.birth()  # bdseq 2: the box reconnected
        await until(
            lambda: (site_row(hub_db, "hn-bv-01") or {}).get("bdseq") == 2, what="second birth"
        )
        await e.send(StateDeath(ts=b2.ts, bdseq=1, agent_version="0.1.0", reason="lost"))
        await until(lambda: ingest.counters.stale_states == 1, what="stale death counted")
        await ingest.wait_idle()
        st = site_row(hub_db, "hn-bv-01")
        assert st is not None and st["online"] is True and st["rag"] != "red"
        assert outage_rows(hub_db, "hn-bv-01") == []
        # The matching death does take it down.
        await e.send(b2.matching_death())
        await until(
            lambda: (site_row(hub_db, "hn-bv-01") or {}).get("online") is False,
            what="matching death",
        )


async def test_inventory_health_and_thumbnail(hub_db: Database, mosquitto: Mosquitto) -> None:
    async with running_ingest(hub_db, mosquitto), edge(mosquitto, "dn-bv-01") as e:
        await e.birth()
        await e.send(inventory(["cam-1", "cam-2", "cam-3"], district="Liên Chiểu"))
        sample = Health(
            ts=time.time(),
            site=SiteHealth(
                disk_total_bytes=4 * 2**40,
                disk_used_bytes=2**40,
                disk_free_bytes=3 * 2**40,
                forecast_days=41.5,
                cpu_percent=23.0,
                mem_total_bytes=8 * 2**30,
                mem_used_bytes=2**30,
                agent_version="0.1.0",
                uptime_s=1234.0,
                spool_depth=0,
            ),
            cameras=[
                CameraHealth(
                    camera="cam-1",
                    connected=True,
                    recording="recording",
                    fps=25.0,
                    bitrate_kbps=2048.0,
                    reconnects_1h=0,
                    image=ImageHealth(luma_mean=120.0, sharpness=500.0, faults=["blurred"]),
                    thumbnail_jpeg=JPEG,
                ),
                CameraHealth(
                    camera="cam-2", connected=True, recording="recording", reconnects_1h=2
                ),
            ],
        )
        await e.send(sample)

        def cams() -> list[dict[str, Any]]:
            with hub_db.engine.connect() as conn:
                return queries.site_cameras(conn, "dn-bv-01")

        await until(lambda: any(c["health_ts"] for c in cams()), what="health sample")
        rows = {c["camera_id"]: c for c in cams()}
        assert rows["cam-1"]["fps"] == 25.0 and rows["cam-1"]["thumbnail_ts"] == sample.ts
        assert rows["cam-1"]["health_faults"] == "blurred"
        assert rows["cam-1"]["codec"] == "h264" and rows["cam-1"]["resolution"] == "1920x1080"
        assert rows["cam-3"]["health_ts"] is None
        with hub_db.engine.connect() as conn:
            thumb = queries.camera_thumbnail(conn, "dn-bv-01", "cam-1")
            hidden = queries.camera_thumbnail(
                conn, "dn-bv-01", "cam-1", site_filter=sites.c.province == "Hà Nội"
            )
        assert thumb is not None and thumb[1] == base64.b64decode(JPEG)
        assert hidden is None
        st = site_row(hub_db, "dn-bv-01")
        assert st is not None and st["disk_free_bytes"] == 3 * 2**40
        # The box claims another district than its enrolment: flagged, never applied.
        assert "district" in (st["inventory_mismatch"] or "")
        assert st["district"] == "Hải Châu" and st["rag"] == "amber"

        # cam-3 leaves the inventory: removed, not counted.
        await e.send(inventory(["cam-1", "cam-2"], district="Hải Châu"))
        await until(
            lambda: (site_row(hub_db, "dn-bv-01") or {}).get("cameras_total") == 2,
            what="camera removed",
        )
        st = site_row(hub_db, "dn-bv-01")
        assert st is not None and st["inventory_mismatch"] is None and st["rag"] == "green"
        with hub_db.engine.connect() as conn:
            status = conn.execute(
                sa.select(cameras.c.status).where(cameras.c.camera_id == "cam-3")
            ).scalar_one()
            n_health = conn.execute(sa.select(sa.func.count()).select_from(camera_health))
            n_thumbs = conn.execute(sa.select(sa.func.count()).select_from(camera_thumbnails))
            assert n_health.scalar_one() == 2 and n_thumbs.scalar_one() == 1
        assert status == "removed"


async def test_unknown_and_disabled_sites_are_rejected_and_enrolment_takes_effect(
    hub_db: Database, mosquitto: Mosquitto
) -> None:
    async with running_ingest(hub_db, mosquitto) as ingest:
        async with edge(mosquitto, "qn-new-01") as stranger:
            await stranger.birth()  # retained, from a site not enrolled yet
        with hub_db.engine.begin() as conn:
            set_site_enabled(conn, "hn-bv-01", False)
        await ingest.refresh_sites()
        async with edge(mosquitto, "hn-bv-01") as disabled:
            await disabled.birth()
        await until(
            lambda: (
                ingest.counters.rejected["unknown_site"] == 1
                and ingest.counters.rejected["disabled_site"] == 1
            ),
            what="rejects",
        )
        assert site_row(hub_db, "qn-new-01") is None
        assert (site_row(hub_db, "hn-bv-01") or {}).get("online") is None

        # Enrolled now: the retained birth the hub rejected earlier is fetched again.
        enroll_all(hub_db, {"qn-new-01": ("Quảng Nam", "Hội An", "facility", "health", "vnpt")})
        await until(
            lambda: (site_row(hub_db, "qn-new-01") or {}).get("online") is True,
            what="retained birth of the newly enrolled site",
        )


async def test_alert_subscribers_see_only_their_scope(
    hub_db: Database, mosquitto: Mosquitto
) -> None:
    alerts = AlertHub()
    danang = alerts.subscribe(lambda a: a["site"]["province"] == "Đà Nẵng")
    hanoi = alerts.subscribe(lambda a: a["site"]["province"] == "Hà Nội")
    async with running_ingest(hub_db, mosquitto, alerts=alerts) as ingest:
        async with edge(mosquitto, "hn-bv-01") as e:
            await e.birth()
            await e.down("cam-1", time.time())
        await until(lambda: ingest.counters.stored_events == 1, what="event stored")
        await ingest.wait_idle()
    first = await asyncio.wait_for(anext(hanoi), 5)
    assert first["type"] == "site_online" and first["site_id"] == "hn-bv-01"
    assert first["text_vi"] and first["text_en"]
    second = await asyncio.wait_for(anext(hanoi), 5)
    assert second["type"] == "outage_opened" and second["camera_id"] == "cam-1"
    assert danang.pending() == 0 and danang.matched == 0


async def test_unacknowledged_messages_survive_a_hub_without_database(
    hub_db: Database, mosquitto: Mosquitto, hub_db_url: str
) -> None:
    """Messages are acknowledged only after commit: a hub that dies while its database is
    locked loses nothing; the next hub with the same client id gets them again."""
    client_id = f"persist-{os.getpid()}-{next(_client_ids)}"
    hold = Database.connect(hub_db_url)
    blocker = hold.engine.connect()
    trans = blocker.begin()
    # Hold the lock the writer needs: a row lock on PostgreSQL, the write lock on SQLite.
    if hold.dialect == "postgresql":
        blocker.execute(sa.text("LOCK TABLE site_state IN ACCESS EXCLUSIVE MODE"))
    else:
        blocker.execute(sa.text("UPDATE sites SET name = name"))
    try:
        ingest = Ingest(
            hub_db,
            mqtt_config(mosquitto, client_id=client_id),
            IngestConfig(batch_max_delay_s=0.02, sites_refresh_s=60),
        )
        task = asyncio.create_task(ingest.run())
        await until(lambda: ingest.ready.is_set(), what="first hub subscribed")
        async with edge(mosquitto, "dn-bv-01") as e:
            await e.birth()
            await e.down("cam-1", time.time())
        await until(lambda: ingest.counters.received == 2, what="received by the first hub")
        task.cancel()  # the hub dies: no DISCONNECT-time flush, nothing acknowledged
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ingest.counters.acked == 0
    finally:
        trans.rollback()
        blocker.close()
        hold.close()
    async with running_ingest(hub_db, mosquitto, client_id=client_id):
        await until(
            lambda: (site_row(hub_db, "dn-bv-01") or {}).get("cameras_down") == 1,
            what="redelivered messages applied",
        )


# --- board queries --------------------------------------------------------------------------


async def test_board_counts_and_scope(hub_db: Database, mosquitto: Mosquitto) -> None:
    async with running_ingest(hub_db, mosquitto) as ingest:
        async with edge(mosquitto, "dn-bv-01") as a, edge(mosquitto, "dn-cp-02") as b:
            await a.birth()
            await a.send(inventory(["c1", "c2"]))
            await b.birth()
            await b.send(inventory(["c1"], district="Sơn Trà"))
            await b.down("c1", time.time())
        await until(lambda: ingest.counters.stored_events == 1, what="event")
        await ingest.wait_idle()
    with hub_db.engine.connect() as conn:
        provinces = queries.board_summary(conn)
        by = {r["province"]: r for r in provinces}
        assert by["Đà Nẵng"]["sites"] == 2 and by["Đà Nẵng"]["green"] == 1
        assert by["Đà Nẵng"]["red"] == 1  # every monitored camera of dn-cp-02 is down
        assert by["Đà Nẵng"]["cameras"] == 3 and by["Đà Nẵng"]["cameras_down"] == 1
        assert by["Hà Nội"]["never_seen"] == 1 and by["Hà Nội"]["rag"] == "red"
        nation = queries.board_summary(conn, group_by="nation")
        assert nation[0]["sites"] == 3 and nation[0]["online"] == 2
        districts = queries.board_summary(conn, group_by="district", province="Đà Nẵng")
        assert [d["district"] for d in districts] == ["Hải Châu", "Sơn Trà"]
        scoped = queries.board_summary(conn, site_filter=sites.c.province == "Hà Nội")
        assert [r["province"] for r in scoped] == ["Hà Nội"]
        rows, total = queries.list_sites(conn, province="Đà Nẵng")
        assert total == 2 and [r["site_id"] for r in rows] == ["dn-cp-02", "dn-bv-01"]
        rows, total = queries.list_sites(conn, rag=["green"])
        assert total == 1 and rows[0]["site_id"] == "dn-bv-01"
        faulty, n = queries.faulty_cameras(conn)
        assert n == 1 and faulty[0]["camera_id"] == "c1"
        assert faulty[0]["faults"] == ["camera_down:timeout"]
        assert queries.faulty_cameras(conn, site_filter=sites.c.operator == "viettel") == ([], 0)
        assert queries.site_detail(conn, "dn-bv-01", site_filter=sites.c.province == "X") is None
        assert queries.site_cameras(conn, "dn-bv-01", site_filter=sites.c.province == "X") == []
        ev = queries.recent_events(conn, "dn-cp-02")
        assert ev[0]["event"]["kind"] == "camera_down" and ev[0]["seq"] == 1


# --- hub config -----------------------------------------------------------------------------


def test_config_defaults_and_values(tmp_path: Path) -> None:
    (tmp_path / "webhook.key").write_text("s3cret\n")
    cfg_path = tmp_path / "hub.toml"
    cfg_path.write_text(
        textwrap.dedent(
            """
            [database]
            url = "sqlite:///state/hub.db"
            [mqtt]
            url = "mqtt://127.0.0.1:1884"
            share_group = ""
            [tickets]
            threshold_minutes = 5
            [alerts]
            webhook_url = "https://noc.example.vn/hooks/isocam"
            webhook_secret = { file = "webhook.key" }
            [status]
            outage_image_faults = ["black", "frozen"]
            [web]
            listen = "0.0.0.0:9000"
            """
        )
    )
    cfg = load_config(cfg_path)
    assert cfg.database.url == f"sqlite:///{tmp_path / 'state/hub.db'}"
    assert cfg.mqtt.port == 1884 and cfg.mqtt.share_group is None and not cfg.mqtt.tls
    assert cfg.mqtt.client_id.startswith("central-hub-")
    assert cfg.tickets.threshold_s == 300.0
    assert cfg.alerts.webhook_secret == b"s3cret"
    assert "s3cret" not in repr(cfg)
    assert cfg.status.outage_image_faults == frozenset({"black", "frozen"})
    assert (cfg.web.host, cfg.web.port) == ("0.0.0.0", 9000)


def test_config_errors_name_every_bad_key_at_once(tmp_path: Path) -> None:
    cfg_path = tmp_path / "hub.toml"
    cfg_path.write_text(
        textwrap.dedent(
            """
            [database]
            url = "mysql://root@db/hub"
            [mqtt]
            url = "mqtt://broker.example.vn:1883"
            keepalive_seconds = "30"
            receive_maximum = 100
            [ingest]
            batch_max_mesages = 10
            [alerts]
            webhook_url = "http://noc.example.vn/hook"
            webhook_secret = { env = "ISOCAM_TEST_UNSET_VARIABLE" }
            [status]
            outage_image_faults = ["black", "smudged"]
            [webb]
            listen = "x"
            """
        )
    )
    with pytest.raises(HubConfigError) as info:
        load_config(cfg_path)
    message = str(info.value)
    for key in (
        "database.url",
        "mqtt.url",
        "mqtt.keepalive_seconds",
        "ingest.batch_max_mesages",
        "alerts.webhook_url",
        "alerts.webhook_secret",
        "status.outage_image_faults",
        "[webb]",
        "mqtt.receive_maximum",
    ):
        assert key in message, key
    assert len(info.value.problems) == 9
    assert message.startswith(f"{cfg_path}: 9 problems:")


def test_docs_list_every_setting() -> None:
    doc = (ROOT / "docs" / "hub.md").read_text()
    assert settings_markdown() in doc, (
        "docs/hub.md is out of date: paste `python -m central_hub.hub_config` into it"
    )


# --- central-hub sites ----------------------------------------------------------------------


def test_sites_cli_add_list_disable_enable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    runner = CliRunner()

    def run(*args: str) -> Any:
        return runner.invoke(sites_group, ["--database", url, *args], catch_exceptions=False)

    r = run(
        "add",
        "dn-bv-09",
        "--province",
        "Đà Nẵng",
        "--district",
        "Hải Châu",
        "--kind",
        "facility",
        "--authority",
        "health",
        "--operator",
        "vnpt",
        "--name",
        "Bệnh viện dã chiến",
    )
    assert r.exit_code == 0, r.output
    again = run(
        "add",
        "dn-bv-09",
        "--province",
        "Đà Nẵng",
        "--kind",
        "facility",
        "--authority",
        "health",
        "--operator",
        "vnpt",
    )
    assert again.exit_code == 1 and "already enrolled" in again.output
    bad = run(
        "add",
        "Bad_ID",
        "--province",
        "X",
        "--kind",
        "facility",
        "--authority",
        "health",
        "--operator",
        "vnpt",
    )
    assert bad.exit_code == 1 and "site id" in bad.output
    csv_file = tmp_path / "sites.csv"
    csv_file.write_text(
        "site_id,name,province,district,kind,authority,operator\n"
        "hn-cp-01,Chốt 1,Hà Nội,,checkpoint,police,viettel\n"
    )
    assert run("import", str(csv_file)).exit_code == 0
    listed = [json.loads(line) for line in run("list", "--json").output.splitlines()]
    # Ordered by province as the database sorts text ("Hà Nội" < "Đà Nẵng" by code point).
    assert sorted(s["site_id"] for s in listed) == ["dn-bv-09", "hn-cp-01"]
    assert next(s for s in listed if s["site_id"] == "hn-cp-01")["district"] is None
    assert "dn-bv-09" in run("disable", "dn-bv-09").output
    assert "already disabled" in run("disable", "dn-bv-09").output
    table = run("list").output
    assert "DISABLED" in table and "Bệnh viện dã chiến" in table
    assert run("enable", "dn-bv-09").exit_code == 0
    unknown = run("disable", "nope-01")
    assert unknown.exit_code == 1 and "no site" in unknown.output
    assert run("list", "--enabled-only", "--json").output.count("\n") == 2
