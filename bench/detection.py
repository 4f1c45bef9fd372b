"""Detection latency: camera fault injected in the simulator → event received at the broker.

Runs a private Mosquitto, `camera-sim run`, and the real `edge-agent run` (default settings but
for the paths), and a hub-side MQTT subscriber. For each fault kind and trial it injects the
fault on one camera, waits for the event that reports it, clears the fault and waits for the
event that reports the recovery. Prints median / p95 / max per kind and writes a Markdown table.

Baselines measured in the same run, so the figures can be read against what cannot be beaten:
- `apply`: how long `camera-sim fault` takes to return (the simulator switching its picture:
  for picture faults, a new clip is encoded once, then cached — the first trial warms it);
- `broker`: a QoS 1 publish → delivery round trip through the same broker.

    .venv/bin/python bench/detection.py --trials 5 --output /tmp/detection.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiomqtt

from devstack.broker import Mosquitto
from devstack.mqtt_observer import HubSubscriber
from devstack.simulator import launch_simulator
from sitelink import messages as m
from sitelink.sealed_segment import generate_private_key, write_public_key

BIN = Path(sys.executable).parent
SITE = "bench-detect-01"
KINDS = ("offline", "stall", "black", "covered", "frozen", "blurred", "moved")


def _write_config(work: Path, cams: list[dict[str, Any]], broker_url: str) -> Path:
    key = generate_private_key()
    write_public_key(key.public_key(), work / "viewer.pub")
    lines = [
        "[site]", f'id = "{SITE}"', 'province = "Hà Nội"', 'district = "Ba Đình"',
        'kind = "facility"', 'authority = "health"', 'operator = "vnpt"',
        "[storage]", f'data_dir = "{work / "data"}"', "reserve_gib = 0.2",
        "[credentials]", f'user = "{cams[0]["user"]}"', f'password = "{cams[0]["password"]}"',
        "[discovery]", "enabled = false",
        "[mqtt]", f'url = "{broker_url}"',
        "[keys]", f'recipient_files = ["{work / "viewer.pub"}"]',
        "[status]", f'socket = "{work / "edge.sock"}"',
        "[metrics]", 'listen = ""',
    ]  # fmt: skip
    for cam in cams:
        lines += ["[[cameras.onvif]]", f'address = "{cam["onvif_url"].split("/")[2]}"']
    path = work / "edge.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _matcher(kind: str, camera: str, raised: bool) -> Callable[[m.Message], bool]:
    def match(msg: m.Message) -> bool:
        if kind in ("offline", "stall"):
            if raised:
                return isinstance(msg, m.CameraDown | m.GapOpened) and msg.camera == camera
            return isinstance(msg, m.CameraUp | m.GapClosed) and msg.camera == camera
        return (
            isinstance(msg, m.ImageFaultEvent)
            and msg.camera == camera
            and msg.fault == kind
            and msg.active == raised
        )

    return match


async def _wait_event(
    hub: HubSubscriber, start_index: int, match: Callable[[m.Message], bool], within: float
) -> float | None:
    """Arrival time (monotonic) of the first matching event received after `start_index`."""

    def found(received: list[Any]) -> bool:
        return any(match(r.message()) for r in received[start_index:] if r.kind.value == "event")

    try:
        received = await hub.wait_for(found, within)
    except TimeoutError:
        return None
    return next(
        r.at for r in received[start_index:] if r.kind.value == "event" and match(r.message())
    )


async def _fault(work: Path, camera: str, kind: str) -> None:
    """`camera-sim fault` without blocking the loop (arrival times are taken on it)."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "camera-sim"), "fault", camera, kind, "--state-file", str(work / "sim.json"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"camera-sim fault {camera} {kind} failed: {err.decode()}")


async def _broker_round_trip(broker: Mosquitto, n: int = 50) -> list[float]:
    out: list[float] = []
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe("bench/rt", qos=1)
        for _ in range(n):
            t0 = time.monotonic()
            await client.publish("bench/rt", b"x", qos=1)
            async for _msg in client.messages:
                break
            out.append(time.monotonic() - t0)
    return out


def _stats(values: list[float]) -> str:
    if not values:
        return "– | – | –"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"{statistics.median(ordered):.2f} | {p95:.2f} | {ordered[-1]:.2f}"


def start(args: argparse.Namespace) -> tuple[Any, ...]:
    """Broker, simulator and the edge agent, before the event loop starts."""
    work = Path(tempfile.mkdtemp(prefix="isocam-bench-detect-"))
    broker = Mosquitto(workdir=work / "mosquitto").start()
    sim, cams = launch_simulator(work / "sim.json", cameras=args.cameras)
    config = _write_config(work, cams, broker.url)
    edge = subprocess.Popen(
        [str(BIN / "edge-agent"), "run", "--config", str(config)],
        stderr=open(work / "edge.log", "w"),  # noqa: SIM115 - lives as long as the child
    )
    return work, broker, sim, cams, edge


async def run(args: argparse.Namespace, started: tuple[Any, ...]) -> str:
    work, broker, sim, cams, edge = started
    detect: dict[str, list[float]] = {k: [] for k in args.kinds}
    clear: dict[str, list[float]] = {k: [] for k in args.kinds}
    apply: dict[str, list[float]] = {k: [] for k in args.kinds}
    missed: dict[str, int] = {k: 0 for k in args.kinds}
    try:
        async with HubSubscriber(broker, client_id="bench-hub", site=SITE) as hub:

            def ups() -> int:
                return sum(isinstance(e, m.CameraUp) for e in hub.events())

            def ready(_: object) -> bool:
                if edge.poll() is not None:
                    raise SystemExit(f"edge-agent exited; see {work / 'edge.log'}")
                return ups() >= args.cameras

            await hub.wait_for(ready, 120)
            edge_ids = sorted({e.camera for e in hub.events() if isinstance(e, m.CameraUp)})
            # edge ids are assigned in enrolment order; map them through the inventory serials
            inventories = [r.message() for r in hub.received if r.kind.value == "inventory"]
            inv = inventories[-1]
            assert isinstance(inv, m.Inventory)
            by_serial = {c.serial: c.id for c in inv.cameras}
            sim_to_edge = {c["id"]: by_serial[c["serial"]] for c in cams}
            print(f"edge cameras: {edge_ids}; settling 15 s for image references", flush=True)
            await asyncio.sleep(15)  # image health enrols its references (a settle delay)

            for trial in range(args.trials + 1):  # trial 0 warms the simulator's clip cache
                for i, kind in enumerate(args.kinds):
                    sim_cam = cams[(trial + i) % len(cams)]["id"]
                    camera = sim_to_edge[sim_cam]
                    mark = len(hub.received)
                    t0 = time.monotonic()
                    await _fault(work, sim_cam, kind)
                    t_apply = time.monotonic() - t0
                    at = await _wait_event(hub, mark, _matcher(kind, camera, True), args.within)
                    mark2 = len(hub.received)
                    t1 = time.monotonic()
                    await _fault(work, sim_cam, "clear")
                    cleared = await _wait_event(
                        hub, mark2, _matcher(kind, camera, False), args.within
                    )
                    label = "warm-up" if trial == 0 else f"trial {trial}"
                    print(
                        f"{label:8} {kind:8} {camera}: apply {t_apply:.2f} s, detected "
                        + (f"{at - t0:.2f} s" if at else "NOT within limit")
                        + ", cleared "
                        + (f"{cleared - t1:.2f} s" if cleared else "NOT within limit"),
                        flush=True,
                    )
                    if trial == 0:
                        continue
                    apply[kind].append(t_apply)
                    if at is None:
                        missed[kind] += 1
                    else:
                        detect[kind].append(at - t0)
                    if cleared is not None:
                        clear[kind].append(cleared - t1)
                    # let the camera settle (reconnect, image checks agree) before the next
                    await asyncio.sleep(args.settle)
        rt = await _broker_round_trip(broker)
    finally:
        edge.send_signal(signal.SIGTERM)
        try:
            edge.wait(timeout=60)
        except subprocess.TimeoutExpired:
            edge.kill()
        sim.send_signal(signal.SIGINT)
        sim.wait(timeout=30)
        broker.stop()

    targets = {"offline": 5.0, "stall": 5.0}
    lines = [
        f"Detection latency, camera fault → event at the hub subscriber; {args.cameras} "
        f"simulated cameras (720p H.264 2 Mbit/s), {args.trials} trials per kind after one "
        "warm-up, edge defaults (stall 3 s, image checks every 4 s, 2 to confirm). Seconds.",
        "",
        "| fault | detect median | p95 | max | missed | clear median | p95 | max | "
        "simulator apply median | target p95 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in args.kinds:
        lines.append(
            f"| {kind} | {_stats(detect[kind])} | {missed[kind]} | {_stats(clear[kind])} | "
            f"{statistics.median(apply[kind]) if apply[kind] else 0:.2f} | "
            f"≤ {targets.get(kind, 15.0):.0f} |"
        )
    lines += [
        "",
        f"Broker round trip (QoS 1 publish → delivery, same broker, {len(rt)} samples): "
        f"median {statistics.median(rt) * 1000:.1f} ms, max {max(rt) * 1000:.1f} ms.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cameras", type=int, default=4)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--kinds", type=lambda s: s.split(","), default=list(KINDS))
    p.add_argument("--within", type=float, default=60.0, help="give up on one event after")
    p.add_argument("--settle", type=float, default=8.0, help="pause between trials, s")
    p.add_argument("--output", type=Path, default=None, help="also write the table here")
    args = p.parse_args()
    table = asyncio.run(run(args, start(args)))
    print(table)
    if args.output:
        args.output.write_text(table)
    os._exit(0)


if __name__ == "__main__":
    main()
