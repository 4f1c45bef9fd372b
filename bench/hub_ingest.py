"""Ingest throughput of one hub process (events/s), on SQLite and PostgreSQL.

Run: .venv/bin/python bench/hub_ingest.py [--events 100000] [--sites 500] [--batch N]
                                          [--receive-maximum N]
                                          [--backend sqlite|postgresql|both] [--skip-mqtt]

Three figures per backend, measured in the same run on the same pre-encoded events
(500 sites, each with its own rising seq; 70 % chain heads, 10 % camera_down, 10 % camera_up,
5 % gap_opened, 5 % gap_closed — one site's minute of normal life plus the faults that make
the work):

- **baseline**: the same event rows inserted with plain `executemany` in transactions of
  `--batch` rows,
  no validation, no state, no MQTT — what the database alone allows;
- **hub core**: `Ingest.feed()` (sitelink validation, site check) → batches → `BatchWriter`
  (dedup, seq holes, camera state, outage ledger, counters), without MQTT;
- **hub + MQTT**: the whole path through a private Mosquitto: the events are queued by the broker
  for the hub's persistent session while it is away (a raw paho publisher in another process),
  then the hub connects (its receiver process, central_hub/mqtt_receiver.py) and drains the
  backlog; timed from the start of the ingest to the last commit, every message acknowledged
  after its commit. This isolates the hub from the publisher's own speed.

Each figure is the median of `--runs` runs (3), every run printed. Target (issue 6): ≥ 20,000
events/s on SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from central_hub.db import Database  # noqa: E402
from central_hub.hub_config import IngestConfig, MqttConfig  # noqa: E402
from central_hub.ingest import Ingest  # noqa: E402
from central_hub.sites import sites  # noqa: E402
from central_hub.status import events  # noqa: E402
from devstack.broker import Mosquitto  # noqa: E402
from devstack.postgres import Postgres  # noqa: E402
from sitelink.messages import (  # noqa: E402
    CameraDown,
    CameraUp,
    ChainHead,
    GapClosed,
    GapOpened,
    encode,
)
from sitelink.topics import Kind, topic  # noqa: E402

T0 = time.time() - 86400
SIG = "A" * 86 + "=="
BATCH = IngestConfig().batch_max_messages  # set by --batch
RECEIVE_MAXIMUM = MqttConfig().receive_maximum  # set by --receive-maximum


def workload(n: int, n_sites: int, seed: int = 1) -> list[tuple[str, bytes]]:
    """(topic, payload) of `n` events spread over `n_sites` sites, in each site's seq order."""
    rng = random.Random(seed)
    seqs = [0] * n_sites
    out = []
    for i in range(n):
        s = i % n_sites
        seqs[s] += 1
        seq, ts = seqs[s], T0 + i * 0.01
        cam = f"cam-{rng.randrange(16):02d}"
        r = rng.random()
        if r < 0.7:
            msg: Any = ChainHead(
                ts=ts,
                seq=seq,
                camera=cam,
                segment_seq=seq,
                row_hash="0" * 64,
                time=ts,
                key_id="0" * 16,
                signature=SIG,
            )
        elif r < 0.8:
            msg = CameraDown(ts=ts, seq=seq, camera=cam, cause="timeout")
        elif r < 0.9:
            msg = CameraUp(ts=ts, seq=seq, camera=cam)
        elif r < 0.95:
            msg = GapOpened(ts=ts, seq=seq, camera=cam, start=ts - 1, cause="stall")
        else:
            msg = GapClosed(ts=ts, seq=seq, camera=cam, start=ts - 5, end=ts, cause="stall")
        out.append((topic(f"bench-{s:04d}", Kind.EVENT), encode(msg)))
    return out


def fresh_db(url: str, n_sites: int) -> Database:
    db = Database.connect(url)
    db.migrate()
    with db.engine.begin() as conn:
        conn.execute(
            sites.insert(),
            [
                {
                    "site_id": f"bench-{s:04d}",
                    "name": "",
                    "province": f"Tỉnh {s % 63}",
                    "district": None,
                    "kind": "facility",
                    "authority": "health",
                    "operator": "vnpt",
                    "enabled": True,
                    "enrolled_at": T0,
                }
                for s in range(n_sites)
            ],
        )
    return db


def stored(db: Database) -> int:
    with db.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one())


def bench_baseline(make_db: Callable[[], Database], work: list[tuple[str, bytes]]) -> float:
    db = make_db()
    rows = []
    for i, (t, payload) in enumerate(work):
        site = t.split("/")[2]
        rows.append(
            {
                "site_id": site,
                "epoch": 0,
                "seq": i + 1,
                "kind": "chain_head",
                "camera_id": "cam-00",
                "ts": T0,
                "received_at": T0,
                "body": payload.decode(),
            }
        )
    started = time.perf_counter()
    for i in range(0, len(rows), BATCH):
        with db.engine.begin() as conn:
            conn.execute(events.insert(), rows[i : i + BATCH])
    elapsed = time.perf_counter() - started
    assert stored(db) == len(rows)
    db.close()
    return len(rows) / elapsed


async def bench_core(make_db: Callable[[], Database], work: list[tuple[str, bytes]]) -> float:
    db = make_db()
    ingest = Ingest(db, MqttConfig(), IngestConfig(batch_max_messages=BATCH))
    async with ingest.offline():
        started = time.perf_counter()
        for i in range(0, len(work), 1000):
            for t, payload in work[i : i + 1000]:
                ingest.feed(t, payload)
            await asyncio.sleep(0)  # let the writer take a batch meanwhile, as MQTT would
        await ingest.wait_idle()
        elapsed = time.perf_counter() - started
    assert ingest.counters.stored_events == len(work), ingest.counters.snapshot()
    db.close()
    return len(work) / elapsed


_PUBLISHER = textwrap.dedent(
    """
    import pickle, sys
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    work = pickle.load(open(path, "rb"))
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-edges", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect(host, port)
    c.loop_start()
    # In chunks: packet ids wrap at 65,535, and paho refuses an id still in flight.
    for start in range(0, len(work), 20000):
        infos = [c.publish(t, p, qos=1) for t, p in work[start : start + 20000]]
        for i in infos:
            i.wait_for_publish(300)
    c.disconnect()
    c.loop_stop()
    """
)


async def bench_mqtt(
    make_db: Callable[[], Database], work: list[tuple[str, bytes]], workdir: Path
) -> float:
    import pickle

    db = make_db()
    # The queue limits of deploy/mosquitto/mosquitto.conf (docs/hub.md, broker settings).
    limits = ["max_queued_messages 1000000", "max_queued_bytes 268435456"]
    broker = Mosquitto(workdir=workdir / "mq", extra_config=limits).start()
    try:
        cfg = MqttConfig(
            host=broker.host,
            port=broker.port,
            client_id="bench-hub",
            share_group="bench",
            session_expiry_s=3600,
            receive_maximum=RECEIVE_MAXIMUM,
        )
        icfg = IngestConfig(batch_max_messages=BATCH, sites_refresh_s=300)
        async with Ingest(db, cfg, icfg):
            pass  # creates the persistent session and its subscriptions, then leaves
        path = workdir / "work.pickle"
        path.write_bytes(pickle.dumps(work))
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", _PUBLISHER, broker.host, str(broker.port), str(path)],
            check=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        ingest = Ingest(db, cfg, icfg)
        started = time.perf_counter()
        async with ingest:
            while ingest.counters.stored_events + ingest.counters.duplicates < len(work):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            await ingest.wait_idle()
            elapsed = time.perf_counter() - started
        assert ingest.counters.stored_events == len(work), ingest.counters.snapshot()
    finally:
        broker.stop()
        db.close()
    return len(work) / elapsed


def run_backend(
    name: str,
    url_for: Callable[[str], str],
    args: argparse.Namespace,
    work: list[tuple[str, bytes]],
    tmp: Path,
) -> dict[str, float]:
    counter = iter(range(1000))

    def make_db() -> Database:
        return fresh_db(url_for(f"b{next(counter)}"), args.sites)

    def runs(label: str, unit: str, measure: Callable[[int], float]) -> float:
        """Median of `--runs` measurements (each printed)."""
        found = [measure(i) for i in range(args.runs)]
        each = ", ".join(f"{v:,.0f}" for v in found)
        median = statistics.median(found)
        print(f"  {name:10s} {label:22s} {median:10,.0f} {unit} (median of {each})", flush=True)
        return median

    out = {
        "baseline": runs("baseline executemany:", "rows/s", lambda _: bench_baseline(make_db, work))
    }
    out["core"] = runs("hub core:", "events/s", lambda _: asyncio.run(bench_core(make_db, work)))
    if not args.skip_mqtt:
        out["mqtt"] = runs(
            "hub + MQTT:",
            "events/s",
            lambda i: asyncio.run(bench_mqtt(make_db, work, tmp / f"{name}-mqtt-{i}")),
        )
    return out


def main() -> None:
    global BATCH, RECEIVE_MAXIMUM
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--sites", type=int, default=500)
    ap.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--skip-mqtt", action="store_true")
    ap.add_argument("--runs", type=int, default=3, help="runs of each measurement (median)")
    ap.add_argument("--batch", type=int, default=BATCH, help="ingest.batch_max_messages")
    ap.add_argument(
        "--receive-maximum", type=int, default=RECEIVE_MAXIMUM, help="mqtt.receive_maximum"
    )
    args = ap.parse_args()
    BATCH = args.batch
    RECEIVE_MAXIMUM = args.receive_maximum
    work = workload(args.events, args.sites)
    print(f"{len(work):,} events over {args.sites} sites; load average {os.getloadavg()[0]:.1f}")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.backend in ("sqlite", "both"):
            results["SQLite"] = run_backend(
                "SQLite", lambda name: f"sqlite:///{tmp / (name + '.db')}", args, work, tmp
            )
        if args.backend in ("postgresql", "both"):
            with Postgres() as pg:
                admin = Database.connect(pg.url)

                def pg_url(name: str) -> str:
                    with admin.engine.connect() as conn:
                        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                            sa.text(f'CREATE DATABASE "{name}"')
                        )
                    return pg.url.rsplit("/", 1)[0] + "/" + name

                results["PostgreSQL"] = run_backend("PostgreSQL", pg_url, args, work, tmp)
                admin.close()
    print()
    print("| backend | baseline executemany rows/s | hub core events/s | hub + MQTT events/s |")
    print("|---|---|---|---|")
    for name, r in results.items():
        mqtt = f"{r['mqtt']:,.0f}" if "mqtt" in r else "-"
        print(f"| {name} | {r['baseline']:,.0f} | {r['core']:,.0f} | {mqtt} |")


if __name__ == "__main__":
    main()
