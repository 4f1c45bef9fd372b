"""The MQTT uplink against a real Mosquitto, watched by a hub-side subscriber written here.

Birth/death pairing, the will of a killed agent, a broker outage with store-and-forward, the
spool's overflow alarm, and commands (good, failing and malformed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devstack.broker import Mosquitto
from devstack.mqtt_observer import HubSubscriber, Received
from edge_agent.config import MqttConfig
from edge_agent.spool import Spool
from edge_agent.uplink import PENDING_SEQ, Uplink, salvage_request_id
from sitelink.messages import (
    Alarm,
    CameraDown,
    CameraHealth,
    CameraInfo,
    Command,
    CommandReply,
    EventBase,
    Health,
    Inventory,
    SiteHealth,
    SiteInfo,
    Snapshot,
    StateBirth,
    StateDeath,
)
from sitelink.topics import Kind, topic

ROOT = Path(__file__).resolve().parent.parent
SITE = "site-a"
JPEG = base64.b64encode(b"\xff\xd8\xff\xe0" + b"\x00" * 60).decode()


def mqtt_config(url: str, **overrides: object) -> MqttConfig:
    base = MqttConfig(
        url=url,
        ca_file=None,
        cert_file=None,
        key_file=None,
        client_id=f"edge-{SITE}",
        keepalive_seconds=5,
        session_expiry_seconds=300,
        will_delay_seconds=2,
        health_interval_seconds=10,
        spool_max_bytes=1 << 20,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def will_delay_props(seconds: int) -> Properties:
    props = Properties(PacketTypes.WILLMESSAGE)
    props.WillDelayInterval = seconds
    return props


def session_props(expiry: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry
    return props


def camera_down(n: int = 0) -> CameraDown:
    return CameraDown(ts=time.time(), seq=PENDING_SEQ, camera=f"cam-{n % 100:02d}", cause="stall")


def health_sample(thumbnail: bool = False) -> Health:
    site = SiteHealth(
        disk_total_bytes=100,
        disk_used_bytes=50,
        disk_free_bytes=50,
        cpu_percent=10.0,
        mem_total_bytes=100,
        mem_used_bytes=10,
        agent_version="0.1.0",
        uptime_s=1.0,
        spool_depth=0,
    )
    cam = CameraHealth(
        camera="cam-01",
        connected=True,
        recording="recording",
        reconnects_1h=0,
        thumbnail_jpeg=JPEG if thumbnail else None,
    )
    return Health(ts=time.time(), site=site, cameras=[cam])


def inventory(name: str = "Cổng chính") -> Inventory:
    site = SiteInfo(province="Hồ Chí Minh", kind="facility", authority="health", operator="vnpt")
    cam = CameraInfo(id="cam-01", name=name, state="recording")
    return Inventory(ts=time.time(), site=site, cameras=[cam])


def births(hub: HubSubscriber) -> list[StateBirth]:
    """Births as they happened (not retained copies re-sent when the hub re-subscribes)."""
    live = [r for r in hub.of_kind(Kind.STATE) if not r.retain]
    return [m for r in live if isinstance(m := r.message(), StateBirth)]


def deaths(hub: HubSubscriber) -> list[StateDeath]:
    live = [r for r in hub.of_kind(Kind.STATE) if not r.retain]
    return [m for r in live if isinstance(m := r.message(), StateDeath)]


def has(
    select: Callable[[HubSubscriber], list[StateBirth] | list[StateDeath]],
    hub: HubSubscriber,
    n: int,
) -> Callable[[list[Received]], bool]:
    """A `wait_for` predicate: `select(hub)` has `n` items."""
    return lambda _: len(select(hub)) == n


def replies_of(hub: HubSubscriber) -> list[CommandReply]:
    return [m for r in hub.of_kind(Kind.CMD_REPLY) if isinstance(m := r.message(), CommandReply)]


def seqs(hub: HubSubscriber) -> list[int]:
    return [m.seq for r in hub.of_kind(Kind.EVENT) if isinstance(m := r.message(), EventBase)]


@pytest.fixture
def spool_path(tmp_path: Path) -> Path:
    return tmp_path / "edge" / "spool.db"


@pytest.fixture
async def hub(mosquitto: Mosquitto) -> AsyncIterator[HubSubscriber]:
    async with HubSubscriber(mosquitto) as sub:
        yield sub


async def test_birth_and_clean_shutdown_death_share_bdseq(
    mosquitto: Mosquitto, hub: HubSubscriber, spool_path: Path
) -> None:
    for run in (1, 2):
        with Spool(spool_path, site_id=SITE, max_bytes=1 << 20) as spool:
            uplink = Uplink(mqtt_config(mosquitto.url), site_id=SITE, spool=spool)
            async with uplink:
                uplink.set_inventory(inventory())
                await hub.wait_for(has(births, hub, run))
                await hub.wait_for(lambda r: any(x.kind == Kind.INVENTORY for x in r))
                assert uplink.connected and uplink.bdseq == run
            await hub.wait_for(has(deaths, hub, run))
    birth, death = births(hub)[-1], deaths(hub)[-1]
    assert (birth.bdseq, death.bdseq, death.reason) == (2, 2, "shutdown")
    assert birth.agent_version == death.agent_version
    state_and_inventory = [r.kind for r in hub.received if r.kind != Kind.HEALTH]
    assert state_and_inventory[:3] == [Kind.STATE, Kind.INVENTORY, Kind.STATE]  # birth first
    assert all(r.retain is False for r in hub.of_kind(Kind.STATE))  # live, not replayed

    # A hub that starts now learns the last state (the death) from the retained copy.
    async with HubSubscriber(mosquitto, client_id="hub-late") as late:
        await late.wait_for(lambda r: any(x.kind == Kind.STATE for x in r))
        retained = late.of_kind(Kind.STATE)[0]
        assert retained.retain and retained.message() == death


async def test_inventory_is_republished_only_when_it_changes(
    mosquitto: Mosquitto, hub: HubSubscriber, spool_path: Path
) -> None:
    with Spool(spool_path, site_id=SITE, max_bytes=1 << 20) as spool:
        async with Uplink(mqtt_config(mosquitto.url), site_id=SITE, spool=spool) as uplink:
            assert uplink.set_inventory(inventory())
            await hub.wait_for(lambda _: len(hub.of_kind(Kind.INVENTORY)) == 1)
            assert not uplink.set_inventory(inventory())  # same content, newer ts
            assert uplink.set_inventory(inventory(name="Cổng sau"))
            await hub.wait_for(lambda _: len(hub.of_kind(Kind.INVENTORY)) == 2)
            await uplink.publish_event(camera_down())  # an ordered marker after both
            await hub.wait_for(lambda _: len(hub.of_kind(Kind.EVENT)) == 1)
    names = [
        m.cameras[0].name
        for r in hub.of_kind(Kind.INVENTORY)
        if isinstance(m := r.message(), Inventory)
    ]
    assert names == ["Cổng chính", "Cổng sau"]


AGENT = r"""
import asyncio, sys
from dataclasses import replace
from edge_agent.config import MqttConfig
from edge_agent.spool import Spool
from edge_agent.uplink import Uplink

async def main() -> None:
    url, spool_path, will_delay = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = MqttConfig(url=url, ca_file=None, cert_file=None, key_file=None,
                     client_id="edge-site-a", keepalive_seconds=5, session_expiry_seconds=300,
                     will_delay_seconds=will_delay, health_interval_seconds=10,
                     spool_max_bytes=1 << 20)
    spool = Spool(spool_path, site_id="site-a", max_bytes=1 << 20)
    uplink = Uplink(cfg, site_id="site-a", spool=spool)
    await uplink.start()
    await uplink.wait_connected()
    print("BIRTH", uplink.bdseq, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_killed_agent_death_arrives_after_the_will_delay(
    mosquitto: Mosquitto, hub: HubSubscriber, spool_path: Path
) -> None:
    will_delay = 3
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", AGENT, mosquitto.url, str(spool_path), str(will_delay),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert agent.stdout is not None
        async with asyncio.timeout(30):
            line = (await agent.stdout.readline()).decode()
        assert line.startswith("BIRTH"), line
        bdseq = int(line.split()[1])
        await hub.wait_for(lambda _: any(b.bdseq == bdseq for b in births(hub)))
        killed_at = time.monotonic()
        os.kill(agent.pid, signal.SIGKILL)
        await hub.wait_for(lambda _: len(deaths(hub)) == 1, within=will_delay + 20)
    finally:
        if agent.returncode is None:
            agent.kill()
        await agent.wait()
    death = deaths(hub)[0]
    arrival = next(r.at for r in hub.of_kind(Kind.STATE) if isinstance(r.message(), StateDeath))
    assert (death.bdseq, death.reason) == (bdseq, "lost")
    assert arrival - killed_at >= will_delay  # not before the will delay had elapsed


class FlakyLink:
    """A TCP relay on loopback between clients and the broker; `cut()` drops every connection
    through it at once, like the facility's line failing for a moment (the broker stays up)."""

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FlakyLink:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.broker.host, self.broker.port)
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()


async def test_a_blip_shorter_than_the_will_delay_pages_no_one(
    mosquitto: Mosquitto, hub: HubSubscriber, spool_path: Path
) -> None:
    """The link drops and the uplink is back within the will delay: a new birth, and the old
    session's will is never published. A probe client cut at the same moment, with the same
    will delay and no reconnect, shows when that will would have arrived."""
    will_delay = 3
    async with FlakyLink(mosquitto) as link:
        probe_will = aiomqtt.Will(
            topic("site-probe", Kind.STATE),
            StateDeath(ts=time.time(), bdseq=99, agent_version="0.1.0", reason="lost")
            .model_dump_json()
            .encode(),
            qos=1,
            properties=will_delay_props(will_delay),
        )
        probe = aiomqtt.Client(
            "127.0.0.1",
            link.port,
            identifier="probe",
            protocol=aiomqtt.ProtocolVersion.V5,
            will=probe_will,
            clean_start=False,
            properties=session_props(300),
        )
        await probe.__aenter__()  # never left cleanly: its connection is cut below

        async def drain_probe() -> None:  # sees the cut (else aiomqtt logs an unseen error)
            with contextlib.suppress(aiomqtt.MqttError):
                async for _ in probe.messages:
                    pass

        probe_task = asyncio.create_task(drain_probe())
        with Spool(spool_path, site_id=SITE, max_bytes=1 << 20) as spool:
            cfg = mqtt_config(link.url, will_delay_seconds=will_delay)
            uplink = Uplink(cfg, site_id=SITE, spool=spool, reconnect_min_seconds=0.1)
            async with uplink:
                await hub.wait_for(has(births, hub, 1))
                link.cut()
                await hub.wait_for(has(births, hub, 2))
                await hub.wait_for(lambda _: any(d.bdseq == 99 for d in deaths(hub)))
                await probe_task
                await hub.flush()
                assert [d.bdseq for d in deaths(hub)] == [99]  # the probe's only
                await uplink.publish_event(camera_down())  # and the uplink works
                await hub.wait_for(lambda _: seqs(hub) == [1])
    assert [b.bdseq for b in births(hub)] == [1, 2]
    assert [(d.bdseq, d.reason) for d in deaths(hub)] == [(99, "lost"), (2, "shutdown")]


async def test_broker_outage_every_event_arrives_once_in_seq_order_with_original_ts(
    tmp_path: Path, spool_path: Path
) -> None:
    """Events before, during (10 s) and after a broker outage: each reaches the hub once, in
    seq order, with the timestamp it was created with; the backlog comes before newer ones."""
    broker = Mosquitto(workdir=tmp_path / "mq", persistence=True).start()
    sent: dict[int, float] = {}

    async def produce(n: int, pause: float = 0.0) -> None:
        for _ in range(n):
            ev = camera_down(len(sent))
            sent[await uplink.publish_event(ev)] = ev.ts
            if pause:
                await asyncio.sleep(pause)  # pacing the producer, not synchronisation

    try:
        async with HubSubscriber(broker) as hub:
            with Spool(spool_path, site_id=SITE, max_bytes=1 << 20) as spool:
                cfg = mqtt_config(broker.url, will_delay_seconds=60)
                uplink = Uplink(
                    cfg,
                    site_id=SITE,
                    spool=spool,
                    reconnect_min_seconds=0.2,
                    reconnect_max_seconds=1,
                )
                async with uplink:
                    await produce(10)
                    await hub.wait_for(lambda _: len(hub.of_kind(Kind.EVENT)) == 10)
                    await hub.flush()  # no delivery is half-acknowledged when the broker stops

                    broker.stop()
                    outage_start = time.monotonic()
                    await produce(20, pause=0.5)  # 10 s of events with the broker down
                    await uplink.publish_health(health_sample(thumbnail=True))
                    assert not uplink.connected
                    assert spool.depth == 21
                    assert time.monotonic() - outage_start >= 10

                    broker.start()
                    await uplink.wait_connected()
                    await produce(10)  # new events while the backlog may still be going out
                    await hub.wait_for(lambda _: len(hub.of_kind(Kind.EVENT)) >= 40)
                    await hub.wait_for(lambda _: len(hub.of_kind(Kind.HEALTH)) >= 1)
                    await hub.flush()
                    async with asyncio.timeout(10):
                        await uplink.wait_drained()  # acks are deleted in batches
                    assert uplink.counters.replayed >= 21
    finally:
        broker.stop()
    events = hub.events()
    assert seqs(hub) == list(range(1, 41))
    assert {e.seq: e.ts for e in events if isinstance(e, EventBase)} == sent
    spooled_health = hub.of_kind(Kind.HEALTH)[0].message()
    assert isinstance(spooled_health, Health)
    assert spooled_health.cameras[0].thumbnail_jpeg is None  # pictures are never spooled
    first, second = births(hub)  # one birth per session; failed attempts use up bdseqs too
    assert second.bdseq > first.bdseq == 1
    assert second.last_seq == 30  # what the spool had assigned when the link came back


async def test_live_health_keeps_its_thumbnail(
    mosquitto: Mosquitto, hub: HubSubscriber, spool_path: Path
) -> None:
    with Spool(spool_path, site_id=SITE, max_bytes=1 << 20) as spool:
        async with Uplink(mqtt_config(mosquitto.url), site_id=SITE, spool=spool) as uplink:
            await uplink.wait_connected()
            await uplink.publish_health(health_sample(thumbnail=True))
            await hub.wait_for(lambda _: len(hub.of_kind(Kind.HEALTH)) == 1)
            assert spool.depth == 0 and uplink.counters.health_spooled == 0
    sample = hub.of_kind(Kind.HEALTH)[0].message()
    assert isinstance(sample, Health) and sample.cameras[0].thumbnail_jpeg == JPEG


async def test_overflowing_spool_raises_an_alarm_event_and_keeps_every_event(
    mosquitto: Mosquitto, hub: HubSubscriber, spool_path: Path
) -> None:
    bound = 1200  # bytes: a handful of events
    with Spool(spool_path, site_id=SITE, max_bytes=bound) as spool:
        cfg = mqtt_config(mosquitto.url, spool_max_bytes=bound)
        uplink = Uplink(cfg, site_id=SITE, spool=spool)
        await uplink.publish_health(health_sample())  # not started: offline, spooled
        for n in range(12):
            await uplink.publish_event(camera_down(n))
        assert spool.overflowing and spool.dropped_health == 1
        async with uplink:
            await hub.wait_for(lambda _: len(hub.of_kind(Kind.EVENT)) == 14)
        assert uplink.status().counters["dropped_health"] == 1
    events = hub.events()
    assert seqs(hub) == list(range(1, 15))
    alarms = [e for e in events if isinstance(e, Alarm)]
    assert [(a.code, a.active, a.level) for a in alarms] == [
        ("spool_overflow", True, "critical"),
        ("spool_overflow", False, "critical"),
    ]
    assert "Uplink spool over its bound" in alarms[0].message


async def handler(cmd: Command) -> CommandReply:
    """A daemon's command handler: snapshot answers, set_legal_hold raises, rescan hangs."""
    if isinstance(cmd, Snapshot):
        return CommandReply(ts=time.time(), id=cmd.id, ok=True, result={"jpeg": JPEG})
    if cmd.command == "rescan":
        await asyncio.Event().wait()
    raise RuntimeError("disk on fire")


async def test_commands_malformed_unknown_failing_or_hanging_get_error_replies(
    mosquitto: Mosquitto, hub: HubSubscriber, spool_path: Path
) -> None:
    def cmd(**fields: object) -> bytes:
        return json.dumps({"v": 1, "ts": time.time(), **fields}).encode()

    snapshot = {"command": "snapshot", "args": {"camera": "cam-01"}}
    hold = {"command": "set_legal_hold", "args": {"all_cameras": True, "hold": True, "reason": "x"}}
    cases: list[tuple[bytes, str | None]] = [
        (b'{"v": 1, "id": "r-badjson", "command": "snapsh', "bad_json"),
        (cmd(id="r-schema", command="snapshot", args={}), "schema"),
        (cmd(id="r-unknown", command="self_destruct", args={}), "unknown_kind"),
        (
            cmd(id="r-version", command="rescan", args={}).replace(b'"v": 1', b'"v": 2'),
            "unsupported_version",
        ),
        (cmd(id="r-big", command="rescan", args={}, pad="x" * 70_000), "oversized"),
        (cmd(id="r-fails", **hold), "failed"),
        (cmd(id="r-hangs", command="rescan", args={}), "failed"),
        (b"\xff\xfe garbage without an id", None),
        (b"", None),
        (cmd(id="r-ok", **snapshot), None),
    ]
    with Spool(spool_path, site_id=SITE, max_bytes=1 << 20) as spool:
        uplink = Uplink(
            mqtt_config(mosquitto.url),
            site_id=SITE,
            spool=spool,
            on_command=handler,
            command_timeout=1.0,
        )
        async with uplink:
            await uplink.wait_connected()
            for payload, _ in cases:
                await hub.command(payload)
            expected = {
                f"r-{x}"
                for x in ("badjson", "schema", "unknown", "version", "big", "fails", "hangs", "ok")
            }

            def replied(_: list[Received]) -> bool:
                return {r.id for r in replies_of(hub)} >= expected

            await hub.wait_for(replied)
            # ... and the uplink carries on: same session, events still flow
            await uplink.publish_event(camera_down())
            await hub.wait_for(lambda _: len(hub.of_kind(Kind.EVENT)) == 1)
            assert uplink.connected and uplink.bdseq == 1
            assert uplink.counters.rejected_commands == 7
            assert uplink.counters.commands == 3
    replies = {r.id: r for r in replies_of(hub)}
    assert len(hub.of_kind(Kind.CMD_REPLY)) == len(expected)  # none for id-less payloads
    for payload, code in cases:
        rid = salvage_request_id(payload)
        if rid is None:
            continue
        reply = replies[rid]
        assert isinstance(reply, CommandReply)
        if code is None:
            assert reply.ok and reply.result == {"jpeg": JPEG}
        else:
            assert not reply.ok and reply.error is not None and reply.error.code == code, rid
    failed = replies["r-fails"].error
    assert failed is not None
    assert "disk on fire" not in failed.message  # details stay in the edge's log
    assert "RuntimeError" in failed.message
