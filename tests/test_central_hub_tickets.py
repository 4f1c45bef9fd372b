"""Tickets (open at the threshold, resolved by the ingest, closed by a person), MTTR, and the
alert fan-out with its webhook posting to a real aiohttp server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import web

from central_hub import queries
from central_hub.alerts import AlertHub, WebhookSender, make_alert
from central_hub.db import Database
from central_hub.hub_config import (
    AlertsConfig,
    DatabaseConfig,
    HubConfig,
    IngestConfig,
    TicketsConfig,
)
from central_hub.ingest import Accepted, BatchWriter, SiteDirectory, run_data_services
from central_hub.sites import SiteAttrs, sites
from central_hub.sites_cli import enroll_site
from central_hub.status import tickets
from central_hub.tickets import (
    TicketError,
    TicketScheduler,
    acknowledge,
    add_note,
    assign,
    close,
    open_tickets_for_long_outages,
)
from devstack.broker import Mosquitto
from devstack.ports import free_port
from devstack.waiting import until
from sitelink.messages import CameraDown, CameraUp, Message, StateBirth, encode
from tests.test_central_hub_ingest import edge, mqtt_config, running_ingest

T = 1_800_000_000.0
THRESHOLD = 900.0


@pytest.fixture
def db(hub_db_url: str) -> Iterator[Database]:
    database = Database.connect(hub_db_url)
    database.migrate()
    with database.engine.begin() as conn:
        for site_id, province, operator in (
            ("dn-01", "Đà Nẵng", "vnpt"),
            ("dn-02", "Đà Nẵng", "vnpt"),
            ("hn-01", "Hà Nội", "viettel"),
        ):
            enroll_site(
                conn,
                site_id=site_id,
                province=province,
                district=None,
                kind="facility",
                authority="health",
                operator=operator,
                now=T - 10_000,
            )
    yield database
    database.close()


def apply(db: Database, site_id: str, *messages: Message, at: float) -> Any:
    directory = SiteDirectory(db)
    directory.refresh()
    return BatchWriter(db, directory).apply(
        [Accepted(site_id, m.TOPIC_KIND, m, encode(m), at) for m in messages]
    )


def birth(at: float, bdseq: int = 1) -> StateBirth:
    return StateBirth(ts=at, bdseq=bdseq, agent_version="1.0", started=at, last_seq=0)


def ticket(db: Database, ticket_id: int) -> dict[str, Any]:
    with db.engine.connect() as conn:
        found = queries.get_ticket(conn, ticket_id)
    assert found is not None
    return found


async def test_a_ticket_opens_at_the_threshold_and_closes_after_confirmation(
    db: Database, mosquitto: Mosquitto
) -> None:
    hub = AlertHub()
    seen = hub.subscribe(lambda a: a["type"].startswith("ticket_"))
    scheduler = TicketScheduler(db, TicketsConfig(threshold_s=THRESHOLD), alerts=hub)
    async with running_ingest(db, mosquitto, alerts=hub) as ingest, edge(mosquitto, "dn-01") as e:
        now = time.time()
        down_at = now - THRESHOLD - 60
        await e.birth(ts=down_at - 5)
        await e.down("cam-1", down_at, "refused")
        await until(lambda: ingest.counters.stored_events == 1, what="camera down stored")
        await ingest.wait_idle()

        assert scheduler.check_once(now=down_at + THRESHOLD - 1) == []
        [opened] = scheduler.check_once(now=down_at + THRESHOLD)
        assert scheduler.check_once(now=down_at + THRESHOLD + 30) == []  # one per outage
        hub.publish_many([opened])
        tid = opened["ticket_id"]
        assert opened["type"] == "ticket_opened" and opened["camera_id"] == "cam-1"
        assert ticket(db, tid)["state"] == "open"

        with db.engine.begin() as conn:
            acknowledge(conn, tid, by="noc-hcm-1", now=now, note="Đã gọi kỹ thuật viên")
            assign(conn, tid, assignee="Tổ kỹ thuật VNPT Đà Nẵng", by="noc-hcm-1", now=now)
        with pytest.raises(TicketError, match="still going on"), db.engine.begin() as conn:
            close(conn, tid, by="noc-hcm-1", now=now)

        await e.up("cam-1", now)
        await until(lambda: ticket(db, tid)["state"] == "resolved", what="ticket resolved")
        t = ticket(db, tid)
        assert t["resolved_at"] == pytest.approx(now) and t["ended_at"] == pytest.approx(now)
        with db.engine.begin() as conn:
            close(conn, tid, by="noc-hcm-2", now=now + 60, note="Đã thay nguồn camera")
            add_note(conn, tid, author="noc-hcm-2", text="Kiểm tra lại sau 24 giờ", now=now + 61)
        with pytest.raises(TicketError, match="closed"), db.engine.begin() as conn:
            close(conn, tid, by="noc-hcm-2", now=now + 62)

    t = ticket(db, tid)
    assert t["state"] == "closed" and t["closed_by"] == "noc-hcm-2"
    assert t["assignee"] == "Tổ kỹ thuật VNPT Đà Nẵng"
    assert [n["action"] for n in t["notes"]] == [
        "open",
        "acknowledged",
        "assigned",
        "resolved",
        "closed",
        "note",
    ]
    types = [a["type"] for a in [await anext(seen), await anext(seen)]]
    assert types == ["ticket_opened", "ticket_resolved"]


def test_ticket_operations_respect_scope_and_validate_input(db: Database) -> None:
    apply(db, "hn-01", birth(T), CameraDown(ts=T + 1, seq=1, camera="c1", cause="eof"), at=T + 1)
    with db.engine.begin() as conn:
        [tid] = open_tickets_for_long_outages(conn, now=T + 1 + THRESHOLD, threshold_s=THRESHOLD)
    danang = sites.c.province == "Đà Nẵng"
    with db.engine.begin() as conn:
        with pytest.raises(TicketError, match="no such ticket"):
            acknowledge(conn, tid, by="dn-noc", now=T, site_filter=danang)
        with pytest.raises(TicketError, match="no such ticket"):
            acknowledge(conn, 999_999, by="noc", now=T)
        with pytest.raises(TicketError, match="control characters"):
            add_note(conn, tid, author="noc", text="bad\x00note", now=T)
        with pytest.raises(TicketError, match="empty"):
            assign(conn, tid, assignee="  ", by="noc", now=T)
    with db.engine.connect() as conn:
        assert queries.get_ticket(conn, tid, site_filter=danang) is None
        assert queries.list_tickets(conn, site_filter=danang) == ([], 0)
        rows, total = queries.list_tickets(conn)
        assert total == 1 and rows[0]["id"] == tid and rows[0]["province"] == "Hà Nội"


def test_a_long_outage_learnt_late_gets_a_resolved_ticket(db: Database) -> None:
    apply(db, "dn-02", birth(T), at=T)
    # Replayed from the edge's spool: a 20-minute outage that is already over.
    apply(db, "dn-02", CameraUp(ts=T + 1300, seq=1, camera="c1", down_since=T + 100), at=T + 1400)
    # And a short one, never ticketed.
    apply(db, "dn-02", CameraUp(ts=T + 1500, seq=2, camera="c2", down_since=T + 1450), at=T + 1500)
    with db.engine.begin() as conn:
        ids = open_tickets_for_long_outages(conn, now=T + 1600, threshold_s=THRESHOLD)
        assert len(ids) == 1
        state = conn.execute(sa.select(tickets.c.state).where(tickets.c.id == ids[0]))
        assert state.scalar_one() == "resolved"
    # An outage that ended before the lookback window is left alone.
    apply(db, "dn-01", birth(T), at=T)
    apply(db, "dn-01", CameraUp(ts=T + 2000, seq=1, camera="c9", down_since=T + 10), at=T + 2000)
    with db.engine.begin() as conn:
        none = open_tickets_for_long_outages(
            conn, now=T + 2000 + 8 * 86400, threshold_s=THRESHOLD, lookback_s=7 * 86400
        )
        assert none == []


def test_mttr_per_province_and_operator(db: Database) -> None:
    for site_id, durations in (("dn-01", [1000.0, 3000.0]), ("hn-01", [5000.0])):
        apply(db, site_id, birth(T), at=T)
        for i, d in enumerate(durations, start=1):
            apply(
                db,
                site_id,
                CameraDown(ts=T + 10, seq=2 * i - 1, camera=f"c{i}", cause="timeout"),
                at=T + 10,
            )
            with db.engine.begin() as conn:
                open_tickets_for_long_outages(conn, now=T + 10 + THRESHOLD, threshold_s=THRESHOLD)
            apply(db, site_id, CameraUp(ts=T + 10 + d, seq=2 * i, camera=f"c{i}"), at=T + 10 + d)
    with db.engine.begin() as conn:
        first = conn.execute(sa.select(tickets.c.id).order_by(tickets.c.id)).scalars().first()
        assert first is not None
        close(conn, first, by="noc", now=T + 2010)
    with db.engine.connect() as conn:
        by_prov = {r["province"]: r for r in queries.mttr(conn, since=T, until=T + 10_000)}
        assert by_prov["Đà Nẵng"]["tickets"] == 2
        assert by_prov["Đà Nẵng"]["mttr_s"] == pytest.approx(2000.0)
        assert by_prov["Đà Nẵng"]["closed"] == 1
        assert by_prov["Đà Nẵng"]["mean_to_close_s"] == pytest.approx(2000.0)
        assert by_prov["Hà Nội"]["mttr_s"] == pytest.approx(5000.0)
        by_op = {
            r["operator"]: r
            for r in queries.mttr(conn, since=T, until=T + 10_000, group_by="operator")
        }
        assert by_op["viettel"]["tickets"] == 1
        scoped = queries.mttr(
            conn, since=T, until=T + 10_000, site_filter=sites.c.operator == "vnpt"
        )
        assert [r["province"] for r in scoped] == ["Đà Nẵng"]
        assert queries.mttr(conn, since=T + 20_000, until=T + 30_000) == []


# --- alerts and the webhook -----------------------------------------------------------------


def _alert(n: int, province: str = "Đà Nẵng") -> dict[str, Any]:
    site = SiteAttrs("dn-01", province, None, "facility", "health", "vnpt")
    return make_alert(
        "outage_opened",
        at=T + n,
        severity="critical",
        site=site,
        site_name="Điểm 1",
        text_vi=f"lỗi {n}",
        text_en=f"fault {n}",
        n=n,
    )


async def test_a_slow_subscriber_loses_the_oldest_alerts_and_is_told() -> None:
    hub = AlertHub()
    sub = hub.subscribe(queue_size=3)
    for n in range(5):
        hub.publish(_alert(n))  # never blocks, whatever the subscriber does
    first = await anext(sub)
    assert first["type"] == "alerts_dropped" and first["count"] == 2
    assert [(await anext(sub))["n"] for _ in range(3)] == [2, 3, 4]
    sub.close()
    assert hub.subscriber_count == 0
    with pytest.raises(StopAsyncIteration):
        await anext(sub)


async def test_a_broken_scope_filter_withholds_alerts_from_that_subscriber_only() -> None:
    hub = AlertHub()
    broken = hub.subscribe(lambda a: a["no such key"])
    fine = hub.subscribe(lambda a: SiteAttrs.from_row(a["site"]).province == "Đà Nẵng")
    hub.publish(_alert(1))
    hub.publish(_alert(2, province="Hà Nội"))
    assert broken.pending() == 0 and fine.pending() == 1


@pytest.fixture
async def receiver() -> AsyncIterator[dict[str, Any]]:
    """A real HTTP server: answers 503 to the first POST, then 200; records what it got."""
    got: dict[str, Any] = {"requests": [], "fail_first": 1}

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        got["requests"].append((dict(request.headers), body))
        if got["fail_first"] > 0:
            got["fail_first"] -= 1
            return web.Response(status=503)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hooks/isocam", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    got["url"] = f"http://127.0.0.1:{port}/hooks/isocam"
    yield got
    await runner.cleanup()


async def test_webhook_delivers_every_alert_signed_and_retries(receiver: dict[str, Any]) -> None:
    hub = AlertHub()
    sender = WebhookSender(receiver["url"], secret=b"k3y", backoff_s=0.05, retries=3)
    sender.start(hub)
    try:
        hub.publish(_alert(1))
        hub.publish(_alert(2))
        await until(lambda: sender.stats.delivered == 2, what="2 alerts delivered")
    finally:
        await sender.stop()
    assert sender.stats.retries == 1 and sender.stats.failed == 0
    bodies = [json.loads(b) for _, b in receiver["requests"]]
    assert [b["n"] for b in bodies] == [1, 1, 2]  # the first one twice: 503, then retried
    headers, body = receiver["requests"][-1]
    expected = hmac.new(b"k3y", body, hashlib.sha256).hexdigest()
    assert headers["X-Isocam-Signature"] == f"sha256={expected}"
    assert headers["X-Isocam-Alert"] == "outage_opened"
    assert bodies[-1]["text_vi"] == "lỗi 2"


async def test_webhook_gives_up_without_holding_anything_back() -> None:
    hub = AlertHub()
    dead = f"http://127.0.0.1:{free_port()}/nobody"  # nothing listens there
    sender = WebhookSender(dead, retries=1, backoff_s=0.01, queue_size=5, timeout_s=2)
    sender.start(hub)
    try:
        for n in range(50):
            hub.publish(_alert(n))  # a plain function: it cannot wait on the network
        await until(lambda: sender.stats.failed + sender.dropped == 50, what="all accounted for")
    finally:
        await sender.stop()
    assert sender.dropped >= 44 and sender.stats.delivered == 0
    assert sender.stats.notices >= 1  # the receiver was told it lost some


async def test_the_data_services_post_an_outage_to_the_webhook(
    db: Database, mosquitto: Mosquitto, receiver: dict[str, Any]
) -> None:
    """Ingest, scheduler and webhook wired as `serve` runs them: a camera that goes down at a
    site reaches the operator's webhook, and so does the ticket opened for it."""
    receiver["fail_first"] = 0
    config = HubConfig(
        database=DatabaseConfig(url="unused"),
        mqtt=mqtt_config(mosquitto),
        ingest=IngestConfig(batch_max_delay_s=0.02),
        tickets=TicketsConfig(threshold_s=THRESHOLD, check_interval_s=0.2),
        alerts=AlertsConfig(webhook_url=receiver["url"], webhook_secret=b"k"),
    )
    ready = asyncio.Event()
    services = asyncio.create_task(run_data_services(db, config, alerts=AlertHub(), ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 15)
        async with edge(mosquitto, "dn-02") as e:
            await e.birth(ts=time.time() - THRESHOLD - 100)
            await e.down("cam-7", time.time() - THRESHOLD - 50)

        def posted() -> list[str]:
            return [json.loads(b)["type"] for _, b in receiver["requests"]]

        await until(lambda: "ticket_opened" in posted(), what="ticket alert at the webhook")
        assert "outage_opened" in posted() and "site_online" in posted()
    finally:
        services.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await services
