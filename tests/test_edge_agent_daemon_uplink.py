"""The daemon over MQTT: birth, inventory, health, events, commands, and store-and-forward
across a broker outage while a camera faults. Real Mosquitto, real simulator, real daemon."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.broker import Mosquitto
from devstack.mqtt_observer import HubSubscriber
from devstack.waiting import until
from edge_agent.config import load_config
from edge_agent.daemon import EdgeDaemon
from sitelink import messages as m
from sitelink.topics import Kind
from tests.test_edge_agent_daemon import Collected, write_config

SITE = "hcm-q7-kcl01"
OUTAGE_S = 60.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(workdir=tmp_path / "mosquitto", persistence=True).start()
    yield b
    b.stop()


def _mqtt(url: str) -> str:
    return (
        f'[mqtt]\nurl = "{url}"\nhealth_interval_seconds = 5\nwill_delay_seconds = 2\n'
        "keepalive_seconds = 5\n"
    )


def _config(tmp_path: Path, cams: list[dict[str, Any]], url: str) -> Any:
    path = write_config(tmp_path, cams, onvif=2)
    text = path.read_text().replace('[mqtt]\nurl = "mqtt://127.0.0.1:1"\n', _mqtt(url))
    text += "[health]\ncheck_interval_seconds = 1\nconfirm_checks = 2\n"
    path.write_text(text)
    return load_config(path)


def _events(hub: HubSubscriber) -> list[m.EventBase]:
    return [e for e in hub.events() if isinstance(e, m.EventBase)]


async def test_daemon_reports_over_mqtt_and_answers_commands(
    tmp_path: Path, broker: Mosquitto, simulator_factory: Callable[..., Any]
) -> None:
    sim = simulator_factory(cameras=2)
    cfg = _config(tmp_path, sim.cameras, broker.url)
    async with HubSubscriber(broker, site=SITE) as hub:
        daemon = EdgeDaemon(cfg)
        stop = asyncio.Event()
        run = asyncio.create_task(daemon.run(stop))
        try:
            await hub.wait_for(lambda _: any(r.kind == Kind.STATE for r in hub.received), 60)
            birth = next(r.message() for r in hub.received if r.kind == Kind.STATE)
            assert isinstance(birth, m.StateBirth)

            def inventory_recording(_: object) -> bool:
                invs = [r.message() for r in hub.of_kind(Kind.INVENTORY)]
                return any(
                    isinstance(i, m.Inventory)
                    and len(i.cameras) == 2
                    and all(c.state == "recording" for c in i.cameras)
                    for i in invs
                )

            await hub.wait_for(inventory_recording, 60)
            await hub.wait_for(
                lambda _: sum(isinstance(e, m.CameraUp) for e in _events(hub)) == 2, 60
            )
            started = [e for e in _events(hub) if isinstance(e, m.AgentStarted)]
            assert len(started) == 1

            def health_with_pictures(_: object) -> bool:
                for r in hub.of_kind(Kind.HEALTH):
                    h = r.message()
                    if (
                        isinstance(h, m.Health)
                        and len(h.cameras) == 2
                        and all(c.connected and c.fps and c.image for c in h.cameras)
                        and any(c.thumbnail_jpeg for c in h.cameras)
                    ):
                        return True
                return False

            await hub.wait_for(health_with_pictures, 60)

            await hub.command(m.encode(m.Rescan(ts=time.time(), id="r-1")))
            await hub.command(
                m.encode(
                    m.Snapshot(ts=time.time(), id="s-1", args=m.SnapshotArgs(camera="cam-001"))
                )
            )
            unknown = {"v": 1, "ts": time.time(), "id": "bad-1", "command": "self_destruct"}
            await hub.command(json.dumps({**unknown, "args": {}}).encode())
            await hub.command(
                m.encode(
                    m.Snapshot(ts=time.time(), id="s-2", args=m.SnapshotArgs(camera="cam-999"))
                )
            )

            def replies() -> dict[str, m.CommandReply]:
                out = {}
                for r in hub.of_kind(Kind.CMD_REPLY):
                    msg = r.message()
                    if isinstance(msg, m.CommandReply):
                        out[msg.id] = msg
                return out

            await hub.wait_for(lambda _: {"r-1", "s-1", "bad-1", "s-2"} <= set(replies()), 60)
            got = replies()
            assert got["r-1"].ok and got["r-1"].result and got["r-1"].result["cameras"] == 2
            assert got["s-1"].ok and got["s-1"].result
            jpeg = base64.b64decode(str(got["s-1"].result["jpeg"]))
            assert jpeg[:2] == b"\xff\xd8"
            assert not got["bad-1"].ok and got["bad-1"].error is not None
            assert not got["s-2"].ok and got["s-2"].error
            assert got["s-2"].error.code == "unknown_camera"
        finally:
            stop.set()
            await run
        # a clean stop publishes the matching death
        await hub.wait_for(
            lambda _: any(
                isinstance(d := r.message(), m.StateDeath) and d.reason == "shutdown"
                for r in hub.of_kind(Kind.STATE)
            ),
            30,
        )


async def test_events_made_while_the_broker_is_down_arrive_once_in_order_afterwards(
    tmp_path: Path, broker: Mosquitto, simulator_factory: Callable[..., Any]
) -> None:
    sim = simulator_factory(cameras=2)
    cfg = _config(tmp_path, sim.cameras, broker.url)
    observed = Collected()
    async with HubSubscriber(broker, site=SITE) as hub:
        daemon = EdgeDaemon(cfg, event_sink=observed)
        stop = asyncio.Event()
        run = asyncio.create_task(daemon.run(stop))
        try:
            await until(lambda: len(observed.of(m.CameraUp)) == 2 or run.done(), 60, "cameras up")
            if run.done():
                run.result()
            await hub.wait_for(
                lambda _: sum(isinstance(e, m.CameraUp) for e in _events(hub)) == 2, 60
            )
            assert daemon.cameras is not None
            by_serial = {c.serial: c.id for c in daemon.cameras.inventory.cameras()}
            faulty = by_serial[sim.cameras[0]["serial"]]

            broker.stop()
            outage_started = time.time()
            await until(
                lambda: daemon.uplink is not None and not daemon.uplink.connected,
                30,
                "uplink notices the outage",
            )
            assert sim.cli("fault", sim.cameras[0]["id"], "stall").returncode == 0
            await until(lambda: bool(observed.of(m.GapOpened, camera=faulty)), 30, "gap opened")
            assert sim.cli("fault", sim.cameras[0]["id"], "clear").returncode == 0
            await until(lambda: bool(observed.of(m.GapClosed, camera=faulty)), 30, "gap closed")
            made_offline = [e for e in observed.events if e.ts >= outage_started]
            assert daemon.uplink is not None and daemon.uplink.spool_depth >= len(made_offline)

            # the scenario: the broker stays away for 60 s in all
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.time() - outage_started)))
            broker.start()  # same port, sessions persisted: the hub's subscription is kept
            last = max(e.seq for e in observed.events)
            await hub.wait_for(lambda _: any(e.seq == last for e in _events(hub)), 60)
        finally:
            stop.set()
            await run

    events = _events(hub)
    received = [e.seq for e in events]
    assert received == sorted(received), "events out of seq order"
    assert len(received) == len(set(received)), "an event arrived twice"
    assert received == list(range(received[0], received[0] + len(received))), "a seq is missing"
    by_seq = {e.seq: e for e in events}
    for sent in observed.events:
        if sent.seq in by_seq:
            assert by_seq[sent.seq].ts == sent.ts  # original timestamps, not replay times
    gap = next(e for e in events if isinstance(e, m.GapOpened) and e.camera == faulty)
    assert gap.cause == "stall" and gap.ts >= outage_started
