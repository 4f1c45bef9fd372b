"""The ingest's MQTT receiver process (central_hub/mqtt_receiver.py), against a real Mosquitto.

What must hold whatever happens to a process: nothing acknowledged before commit, nothing
stored twice, nothing lost, and no receiver left running without its hub.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa

from central_hub.db import Database
from central_hub.hub_config import IngestConfig
from central_hub.ingest import Ingest
from central_hub.status import events
from devstack.broker import Mosquitto
from devstack.waiting import until
from sitelink.messages import ChainHead
from tests.test_central_hub_ingest import Edge, edge, enroll_all, mqtt_config

ROOT = Path(__file__).resolve().parent.parent
SITE = "dn-bv-01"


@pytest.fixture
def db(hub_db_url: str) -> Iterator[Database]:
    database = Database.connect(hub_db_url)
    database.migrate()
    enroll_all(database)
    yield database
    database.close()


def stored_seqs(db: Database) -> list[int]:
    with db.engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(events.c.seq).where(events.c.site_id == SITE).order_by(events.c.seq)
            ).scalars()
        )


async def send_heads(e: Edge, n: int) -> None:
    now = time.time()
    for _ in range(n):
        seq = e.next_seq()
        await e.send(
            ChainHead(
                ts=now,
                seq=seq,
                camera="cam-1",
                segment_seq=seq,
                row_hash="0" * 64,
                time=now,
                key_id="0" * 16,
                signature="A" * 86 + "==",
            )
        )


def ingest_for(db: Database, broker: Mosquitto, client_id: str) -> Ingest:
    return Ingest(
        db,
        mqtt_config(broker, client_id=client_id),
        IngestConfig(batch_max_messages=50, batch_max_delay_s=0.02, sites_refresh_s=60),
    )


async def test_a_killed_receiver_is_replaced_and_nothing_is_lost(
    db: Database, mosquitto: Mosquitto
) -> None:
    ingest = ingest_for(db, mosquitto, f"kill-{os.getpid()}")
    async with ingest, edge(mosquitto, SITE) as e:
        await e.birth()
        await send_heads(e, 300)
        await until(lambda: ingest.counters.stored_events >= 100, what="some events stored")
        first = ingest.receiver_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await send_heads(e, 300)
        await until(
            lambda: ingest.receiver_pid not in (None, first) and ingest.ready.is_set(),
            what="a new receiver subscribed",
            within=20,
        )
        await until(lambda: len(stored_seqs(db)) == 600, what="all 600 events", within=30)
        if db.dialect == "sqlite":
            # The WAL is checkpointed beside the writer, not inside its commits.
            await until(lambda: ingest.counters.checkpoints >= 1, what="a checkpoint")
            with db.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    assert stored_seqs(db) == list(range(1, 601))
    # What the killed receiver had passed on but not acknowledged came again: dropped as
    # duplicates by the (site, seq) key, never stored twice.
    assert ingest.counters.stored_events == 600
    assert ingest.counters.connections == 2
    assert ingest.counters.missing_seqs == ingest.counters.late_events


async def test_a_stopped_hub_acknowledged_all_it_stored(db: Database, mosquitto: Mosquitto) -> None:
    client_id = f"stop-{os.getpid()}"
    first = ingest_for(db, mosquitto, client_id)
    async with first, edge(mosquitto, SITE) as e:
        await e.birth()
        await send_heads(e, 200)
        await until(lambda: first.counters.stored_events == 200, what="200 events stored")
    assert first.counters.acked == first.counters.received
    # The same session again: were anything unacknowledged, the broker would deliver it
    # before the marker sent now.
    second = ingest_for(db, mosquitto, client_id)
    async with second, edge(mosquitto, SITE) as e2:
        e2.seq = 200
        await send_heads(e2, 1)
        await until(lambda: second.counters.stored_events == 1, what="the marker stored")
        # Received besides the marker: only the site's retained birth, which Mosquitto hands
        # to every new subscriber; no event came twice.
        assert second.counters.accepted["event"] == 1
        assert second.counters.received == 2
        assert second.counters.duplicates == 0


async def test_a_broker_restart_is_survived(db: Database, mosquitto: Mosquitto) -> None:
    ingest = ingest_for(db, mosquitto, f"restart-{os.getpid()}")
    async with ingest:
        async with edge(mosquitto, SITE) as e:
            await e.birth()
            await send_heads(e, 20)
            await until(lambda: ingest.counters.stored_events == 20, what="20 stored")
            seq = e.seq
        first = ingest.receiver_pid
        mosquitto.restart()
        await until(
            lambda: ingest.ready.is_set() and ingest.receiver_pid not in (None, first),
            what="subscribed again after the restart",
            within=30,
        )
        async with edge(mosquitto, SITE) as e:
            e.seq = seq
            await send_heads(e, 20)
            await until(lambda: ingest.counters.stored_events == 40, what="40 stored")
    assert stored_seqs(db) == list(range(1, 41))
    assert ingest.counters.connections == 2


_HUB = textwrap.dedent(
    """
    import asyncio, sys
    from central_hub.db import Database
    from central_hub.hub_config import MqttConfig
    from central_hub.ingest import Ingest

    async def main():
        db = Database.connect(sys.argv[1])
        cfg = MqttConfig(host="127.0.0.1", port=int(sys.argv[2]), client_id="orphan-test")
        async with Ingest(db, cfg) as ingest:
            print(ingest.receiver_pid, flush=True)
            await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def test_a_hub_killed_outright_leaves_no_receiver(
    db: Database, hub_db_url: str, mosquitto: Mosquitto
) -> None:
    hub = subprocess.Popen(
        [sys.executable, "-c", _HUB, hub_db_url, str(mosquitto.port)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert hub.stdout is not None
        line = hub.stdout.readline()  # the receiver's pid, once subscribed
        receiver = psutil.Process(int(line))
        assert receiver.is_running()
        hub.kill()
        hub.wait()
        # The receiver sees its pipe close, drops what it holds unacknowledged, and exits.
        receiver.wait(15)
    finally:
        if hub.poll() is None:
            hub.kill()
            hub.wait()
