"""Uplink throughput: events/s through spool append + publish + PUBACK + delete, against plain
aiomqtt QoS 1 publishes of the same payloads without a spool, all in one run, one broker.

Run: .venv/bin/python bench/uplink.py [--events 2000] [--spool-dir DIR]

Rows:
- baseline, sequential: `await client.publish(..., qos=1)` one after the other (aiomqtt's usual
  use; one round trip per message);
- baseline, windowed: the same publishes, up to 100 in flight (asyncio.gather per 100);
- spool only: `Spool.append_event` (one fsync'd transaction per event, synchronous=FULL);
- uplink live: `await publish_event()` one after the other while connected, timed until the
  spool is empty (every event written, sent, acknowledged and deleted);
- uplink live, 8 producers: the same with 8 concurrent producers (appends still serialise);
- uplink replay: the same number of events spooled while disconnected, timed from `start()`
  until the spool is empty (no append cost; publish + ack + batched delete).

The spool's fsyncs land on the file system of --spool-dir (default: a temporary directory);
the figures depend on it far more than on the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiomqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devstack.broker import Mosquitto
from edge_agent.config import MqttConfig
from edge_agent.spool import Spool
from edge_agent.uplink import PENDING_SEQ, Uplink
from sitelink.messages import CameraDown, encode
from sitelink.topics import Kind, topic

SITE = "bench-site"


def event() -> CameraDown:
    return CameraDown(
        ts=time.time(), seq=PENDING_SEQ, camera="cam-01", cause="stall", detail="no packets"
    )


def config(broker: Mosquitto) -> MqttConfig:
    return MqttConfig(
        url=broker.url,
        ca_file=None,
        cert_file=None,
        key_file=None,
        client_id=f"edge-{SITE}",
        keepalive_seconds=30,
        session_expiry_seconds=300,
        will_delay_seconds=10,
        health_interval_seconds=10,
        spool_max_bytes=1 << 30,
    )


async def baseline(broker: Mosquitto, n: int, window: int) -> float:
    payload = encode(event())
    name = topic(SITE, Kind.EVENT)
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        protocol=aiomqtt.ProtocolVersion.V5,
        max_inflight_messages=window,
    ) as client:
        client.pending_calls_threshold = window + 1  # no warning per call: the window is meant
        start = time.perf_counter()
        if window == 1:
            for _ in range(n):
                await client.publish(name, payload, qos=1)
        else:
            for i in range(0, n, window):
                batch = min(window, n - i)
                await asyncio.gather(*(client.publish(name, payload, qos=1) for _ in range(batch)))
        return n / (time.perf_counter() - start)


def spool_only(spool_dir: Path, n: int) -> float:
    with Spool(spool_dir / "append.db", site_id=SITE, max_bytes=1 << 30) as spool:
        start = time.perf_counter()
        for _ in range(n):
            spool.append_event(event())
        return n / (time.perf_counter() - start)


async def uplink_live(broker: Mosquitto, spool_dir: Path, n: int, producers: int) -> float:
    with Spool(spool_dir / f"live{producers}.db", site_id=SITE, max_bytes=1 << 30) as spool:
        async with Uplink(config(broker), site_id=SITE, spool=spool) as uplink:
            await uplink.wait_connected()

            async def produce(count: int) -> None:
                for _ in range(count):
                    await uplink.publish_event(event())

            start = time.perf_counter()
            await asyncio.gather(*(produce(n // producers) for _ in range(producers)))
            await uplink.wait_drained()
            rate = n // producers * producers / (time.perf_counter() - start)
            assert uplink.counters.acked >= n // producers * producers
        return rate


async def uplink_replay(broker: Mosquitto, spool_dir: Path, n: int) -> float:
    with Spool(spool_dir / "replay.db", site_id=SITE, max_bytes=1 << 30) as spool:
        for _ in range(n):
            spool.append_event(event())
        uplink = Uplink(config(broker), site_id=SITE, spool=spool)
        start = time.perf_counter()
        async with uplink:
            await uplink.wait_drained()
            rate = n / (time.perf_counter() - start)
            assert uplink.counters.replayed == n
        return rate


async def run(n: int, spool_dir: Path) -> None:
    rows: list[tuple[str, Callable[[], Awaitable[float]]]] = [
        ("baseline: aiomqtt QoS 1, sequential", lambda: baseline(broker, n, 1)),
        ("baseline: aiomqtt QoS 1, 100 in flight", lambda: baseline(broker, n, 100)),
        ("spool only: append_event (fsync each)",
         lambda: asyncio.to_thread(spool_only, spool_dir, n)),
        ("uplink live: publish_event, 1 producer", lambda: uplink_live(broker, spool_dir, n, 1)),
        ("uplink live: publish_event, 8 producers", lambda: uplink_live(broker, spool_dir, n, 8)),
        ("uplink replay: backlog after reconnect", lambda: uplink_replay(broker, spool_dir, n)),
    ]  # fmt: skip
    broker = Mosquitto(workdir=spool_dir / "mosquitto").start()
    try:
        results = [(label, await fn()) for label, fn in rows]
    finally:
        broker.stop()
    base = results[0][1]
    print(f"| path ({n} events of {len(encode(event()))} B) | events/s | vs sequential baseline |")
    print("|---|---|---|")
    for label, rate in results:
        print(f"| {label} | {rate:,.0f} | {rate / base:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--spool-dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="isocam-bench-uplink-") as tmp:
        spool_dir = args.spool_dir or Path(tmp)
        spool_dir.mkdir(parents=True, exist_ok=True)
        fs = (
            subprocess.run(
                ["df", "-T", str(spool_dir)], capture_output=True, text=True, check=False
            )
            .stdout.splitlines()[-1]
            .split()[1]
        )
        mosq = subprocess.run(
            ["mosquitto", "-h"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0]
        versions = ", ".join(
            f"{p} {importlib.metadata.version(p)}" for p in ("aiomqtt", "paho-mqtt")
        )
        print(
            f"python {platform.python_version()}, {versions}, {mosq}, {os.cpu_count()} cores, "
            f"spool on {fs} ({spool_dir})"
        )
        print()
        asyncio.run(run(args.events, spool_dir))


if __name__ == "__main__":
    main()
