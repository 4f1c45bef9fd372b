"""Live view through the tunnel: latency, and many viewers of many cameras, against a direct
consumer of the same fragments.

Run: .venv/bin/python bench/tunnel.py [--cameras 8] [--viewers 20] [--seconds 30]
     [--warmup 5] [--kbps 2000] [--plain] [--output results.md]

The simulator (`simulator.rtsp.RtspService`, one pre-encoded looping 720p25 clip shared by every
mount) serves N cameras. An **edge process** records them with the real `CameraRecorder` (sealed
segments in a real `SegmentStore`) and serves tunnels with `edge_agent.tunnel`; the **hub** is
this process: a `TunnelBroker` on an aiohttp server on loopback (wss:// with a throw-away CA
unless --plain), and V viewers spread round-robin over the cameras (`broker.live`).

Baseline, in the same run: inside the edge process one direct consumer per camera reads the
recorder's `LiveTap` (an in-process queue) and reports when each fragment reached it. For every
fragment both sides saw, the tunnel's extra delay is (arrival at a hub viewer) − (arrival at the
direct consumer); latencies are also given from the fragment's `wall` (receipt of its first
packet at the edge, so ≈ one fragment duration is inherent to fMP4 and in both figures).

Phase 1 measures the edge process's CPU with the direct consumers only; phase 2 with the tunnels
and viewers as well, plus this (hub) process's CPU. A viewer loses nothing if its seqs are
contiguous and `stream.dropped` stays 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

THIS = str(Path(__file__).resolve())
REPO = Path(THIS).parent.parent
sys.path.insert(0, str(REPO))

from aiohttp import web  # noqa: E402

from central_hub.tunnel import TunnelBroker  # noqa: E402
from devstack.certs import CertificateAuthority  # noqa: E402
from edge_agent.device_key import load_public_key_pem  # noqa: E402
from simulator.camera import StreamProfile, VirtualCamera  # noqa: E402
from simulator.rtsp import RtspService  # noqa: E402
from sitelink.messages import OpenTunnel  # noqa: E402
from sitelink.sealed_segment import generate_private_key, write_public_key  # noqa: E402
from sitelink.tunnel import TUNNEL_PATH  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
SITE = "bench-site"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(values: list[float]) -> str:
    if not values:
        return "– | – | –"
    return (
        f"{statistics.median(values) * 1000:.1f} | {_pct(values, 0.95) * 1000:.1f} | "
        f"{max(values) * 1000:.1f}"
    )


# --------------------------------------------------------------------------------------------
# The edge process


class _Box:
    """TunnelSources for the worker."""

    def __init__(self, site_id: str, device_key: Any, store: Any, recorders: dict[str, Any]):
        self.site_id = site_id
        self.device_key = device_key
        self.segment_store = store
        self.recorders = recorders

    def live_tap(self, camera: str) -> Any:
        rec = self.recorders.get(camera)
        return rec.tap if rec is not None else None

    def snapshot(self, camera: str) -> bytes | None:
        return None


async def _edge_worker(args: argparse.Namespace) -> None:
    from edge_agent.device_key import load_or_create_device_key, public_key_pem
    from edge_agent.recorder import CameraRecorder, RecorderConfig
    from edge_agent.segment_store import SegmentStore
    from edge_agent.tunnel import connect_tunnel
    from sitelink.messages import OpenTunnelArgs
    from sitelink.sealed_segment import load_public_key

    data = Path(args.data)
    os.makedirs(data, exist_ok=True)
    key = load_or_create_device_key(data / "device_key.pem")
    store = SegmentStore(data, key, SITE)
    recipient = load_public_key(args.recipient)
    cams = json.loads(args.cameras_json)
    recorders = {
        c["id"]: CameraRecorder(c["id"], c["url"], store, [recipient], RecorderConfig())
        for c in cams
    }
    tasks = [asyncio.create_task(r.run()) for r in recorders.values()]
    out = sys.stdout

    def emit(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    async def direct(camera: str, rec: Any) -> None:
        last = 0
        while True:
            fragments = await rec.tap.wait(last)
            now = time.time()
            for f in fragments:
                if f.seq > last:
                    emit({"d": camera, "w": f.wall, "t": now, "n": len(f.data)})
                    last = f.seq

    for rec in recorders.values():
        await rec.tap.wait(0)
    consumers = [asyncio.create_task(direct(cid, rec)) for cid, rec in recorders.items()]
    emit({"ready": public_key_pem(key)})
    ssl_context = ssl.create_default_context(cafile=args.ca) if args.ca else None
    box = _Box(SITE, key, store, recorders)
    tunnels: list[Any] = []
    serving: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command = OpenTunnelArgs.model_validate_json(line)
        tunnel = await connect_tunnel(command, box, ssl_context=ssl_context)
        tunnels.append(tunnel)
        serving.append(asyncio.create_task(tunnel.serve(idle_seconds=60)))
    emit(
        {
            "tunnels": [
                {
                    "camera": t.camera,
                    "fragments": t.fragments_sent,
                    "skipped": t.fragments_skipped,
                    "bytes": t.bytes_sent,
                }
                for t in tunnels
            ]
        }
    )
    for task in [*consumers, *serving]:
        task.cancel()
    await asyncio.gather(*consumers, *serving, return_exceptions=True)
    await asyncio.gather(*(r.stop() for r in recorders.values()))
    await asyncio.gather(*tasks)
    store.close()


# --------------------------------------------------------------------------------------------
# The hub side


@dataclass
class Viewer:
    camera: str
    latencies: list[float] = field(default_factory=list)
    arrivals: dict[float, float] = field(default_factory=dict)  # wall -> hub arrival
    seqs: list[int] = field(default_factory=list)
    bytes: int = 0
    dropped: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)
    measuring: bool = False


async def _view(broker: TunnelBroker, viewer: Viewer, stop: asyncio.Event) -> None:
    async with broker.live(SITE, viewer.camera) as stream:
        viewer.started.set()
        waiter = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                nxt = asyncio.ensure_future(anext(stream))
                done, _ = await asyncio.wait({nxt, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    break
                fragment = nxt.result()
                if viewer.measuring:
                    viewer.latencies.append(fragment.received - fragment.wall)
                    viewer.arrivals[fragment.wall] = fragment.received
                    viewer.seqs.append(fragment.seq)
                    viewer.bytes += len(fragment.data)
        finally:
            waiter.cancel()
            viewer.dropped = stream.dropped


async def _read_edge(stream: asyncio.StreamReader, state: dict[str, Any]) -> None:
    while line := await stream.readline():
        msg = json.loads(line)
        if "d" in msg:
            if state["measuring"]:
                state["direct"].append(msg)
        elif "ready" in msg:
            state["ready"].set_result(msg["ready"])
        elif "tunnels" in msg:
            state["tunnels"] = msg["tunnels"]


async def _main(args: argparse.Namespace) -> str:
    work = Path(tempfile.mkdtemp(prefix="bench-tunnel-"))
    svc = RtspService()
    await svc.start()
    cams = [
        VirtualCamera(
            index=i + 1,
            id=f"bench-{i + 1:02d}",
            name="Bench",
            host="127.0.0.1",
            onvif_port=0,
            rtsp_port=0,
            user="admin",
            password="bench",
            profiles=(StreamProfile("main", 1280, 720, args.kbps, codec="H264"),),
        )
        for i in range(args.cameras)
    ]
    await svc.prepare(cams)
    for cam in cams:
        await svc.add_camera(cam)
    key = generate_private_key()
    write_public_key(key.public_key(), work / "viewing.pub")

    server_tls = None
    ca_file = ""
    if not args.plain:
        ca = CertificateAuthority(work / "pki")
        cert = ca.issue_server()
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(cert.cert_file, cert.key_file)
        ca_file = str(ca.cert_file)

    state: dict[str, Any] = {
        "measuring": False,
        "direct": [],
        "ready": asyncio.get_running_loop().create_future(),
        "tunnels": [],
    }
    cam_json = json.dumps(
        [
            {"id": c.id, "url": c.rtsp_url("main").replace("rtsp://", "rtsp://admin:bench@")}
            for c in cams
        ]
    )
    edge = await asyncio.create_subprocess_exec(
        sys.executable,
        THIS,
        "--edge-worker",
        "--data",
        str(work / "edge"),
        "--recipient",
        str(work / "viewing.pub"),
        "--cameras-json",
        cam_json,
        *(["--ca", ca_file] if ca_file else []),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    assert edge.stdin is not None and edge.stdout is not None
    edge_in = edge.stdin
    reader = asyncio.create_task(_read_edge(edge.stdout, state))
    public_pem = await asyncio.wait_for(state["ready"], 120)
    device_key = load_public_key_pem(public_pem)

    async def send_command(site: str, command: OpenTunnel) -> None:  # the MQTT hop, by pipe
        edge_in.write(command.args.model_dump_json().encode() + b"\n")
        await edge_in.drain()

    app = web.Application()
    holder: dict[str, TunnelBroker] = {}

    async def handle(request: web.Request) -> web.StreamResponse:
        return await holder["broker"].handle(request)

    app.router.add_get(TUNNEL_PATH, handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    scheme = "ws" if args.plain else "wss"
    broker = TunnelBroker(
        hub_url=f"{scheme}://127.0.0.1:{port}{TUNNEL_PATH}",
        send_command=send_command,
        device_key_for=lambda s: device_key if s == SITE else None,
    )
    holder["broker"] = broker

    # Phase 1: recorders and direct consumers only.
    await asyncio.sleep(args.warmup)
    c0, t0 = _cpu_seconds(edge.pid), time.monotonic()
    await asyncio.sleep(args.seconds)
    edge_cpu_base = (_cpu_seconds(edge.pid) - c0) / (time.monotonic() - t0) * 100

    # Phase 2: tunnels and viewers.
    viewers = [Viewer(cams[i % len(cams)].id) for i in range(args.viewers)]
    stop = asyncio.Event()
    opened = time.monotonic()
    view_tasks = [asyncio.create_task(_view(broker, v, stop)) for v in viewers]
    await asyncio.wait_for(asyncio.gather(*(v.started.wait() for v in viewers)), 60)
    open_s = time.monotonic() - opened
    await asyncio.sleep(args.warmup)
    for v in viewers:
        v.measuring = True
    state["measuring"] = True
    c0, h0, t0 = _cpu_seconds(edge.pid), _cpu_seconds(os.getpid()), time.monotonic()
    await asyncio.sleep(args.seconds)
    elapsed = time.monotonic() - t0
    edge_cpu = (_cpu_seconds(edge.pid) - c0) / elapsed * 100
    hub_cpu = (_cpu_seconds(os.getpid()) - h0) / elapsed * 100
    for v in viewers:
        v.measuring = False
    state["measuring"] = False
    stats = broker.stats()
    stop.set()
    await asyncio.gather(*view_tasks)
    edge_in.close()
    await asyncio.wait_for(edge.wait(), 60)
    await reader
    await broker.close()
    await runner.cleanup()
    for cam in cams:
        await svc.remove_camera(cam)
    await svc.close()
    shutil.rmtree(work, ignore_errors=True)

    # Baseline: the direct consumer's arrival of each fragment in the window.
    direct_at = {(m["d"], m["w"]): m["t"] for m in state["direct"]}
    direct_lat = [m["t"] - m["w"] for m in state["direct"]]
    tunnel_lat = [x for v in viewers for x in v.latencies]
    overhead = [
        arrival - direct_at[(v.camera, wall)]
        for v in viewers
        for wall, arrival in v.arrivals.items()
        if (v.camera, wall) in direct_at
    ]
    gaps = sum(
        sum(1 for a, b in zip(v.seqs, v.seqs[1:], strict=False) if b != a + 1) for v in viewers
    )
    dropped = sum(v.dropped for v in viewers)
    # Every fragment the direct consumer saw in the window reached every viewer of that camera.
    missing = sum(
        1
        for v in viewers
        for m in state["direct"]
        if m["d"] == v.camera
        and v.arrivals
        and min(v.arrivals) <= m["w"] <= max(v.arrivals)
        and m["w"] not in v.arrivals
    )
    delivered = sum(len(v.seqs) for v in viewers)
    delivered_mb = sum(v.bytes for v in viewers) / 1e6
    upstream_mb = sum(m["n"] for m in state["direct"]) / 1e6
    skipped = sum(t["skipped"] for t in state["tunnels"])

    scheme_text = "ws:// (plain)" if args.plain else "wss:// (TLS, private CA)"
    lines = [
        f"Command: `.venv/bin/python bench/tunnel.py --cameras {args.cameras} --viewers "
        f"{args.viewers} --seconds {args.seconds:g} --warmup {args.warmup:g} --kbps {args.kbps}"
        f"{' --plain' if args.plain else ''}`",
        "",
        f"{args.cameras} cameras 720p25 H.264 {args.kbps} kbit/s (simulator), 1 s fragments, "
        f"{args.viewers} viewers round-robin over the cameras, tunnel over {scheme_text}, "
        f"edge in its own process, {args.seconds:g} s measured per phase.",
        "",
        "| latency (ms) | median | p95 | max | samples |",
        "|---|---|---|---|---|",
        f"| baseline: wall → direct in-process consumer at the edge | {_ms(direct_lat)} | "
        f"{len(direct_lat)} |",
        f"| wall → hub viewer through the tunnel | {_ms(tunnel_lat)} | {len(tunnel_lat)} |",
        f"| tunnel's own delay (same fragment: hub viewer − direct consumer) | {_ms(overhead)} | "
        f"{len(overhead)} |",
        "",
        "| throughput and loss | value |",
        "|---|---|",
        f"| tunnels / MQTT commands for {args.viewers} viewers of {args.cameras} cameras | "
        f"{stats.get('tunnels', 0)} / {stats.get('commands', 0)} |",
        f"| time until every viewer had its first fragment | {open_s:.2f} s |",
        f"| fragments delivered to viewers | {delivered} ({delivered / elapsed:.1f}/s) |",
        f"| bytes to viewers / from the edge (unique) | {delivered_mb / elapsed * 8:.1f} / "
        f"{upstream_mb / elapsed * 8:.1f} Mbit/s |",
        f"| lost: seq gaps / dropped by slow viewers / missing vs direct / skipped at edge | "
        f"{gaps} / {dropped} / {missing} / {skipped} |",
        f"| edge CPU, % of one core: recorders only → with tunnels | {edge_cpu_base:.1f} → "
        f"{edge_cpu:.1f} ({edge_cpu - edge_cpu_base:+.1f}) |",
        f"| hub CPU (broker + {args.viewers} viewers), % of one core | {hub_cpu:.1f} |",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--cameras", type=int, default=8)
    p.add_argument("--viewers", type=int, default=20)
    p.add_argument("--seconds", type=float, default=30.0, help="measured time per phase")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--kbps", type=int, default=2000, help="camera bit rate")
    p.add_argument("--plain", action="store_true", help="ws:// instead of wss://")
    p.add_argument("--output", help="also write the markdown to this file")
    p.add_argument("--edge-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--recipient", help=argparse.SUPPRESS)
    p.add_argument("--cameras-json", help=argparse.SUPPRESS)
    p.add_argument("--ca", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.edge_worker:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_edge_worker(args))
        return
    report = asyncio.run(_main(args))
    print(report)
    if args.output:
        Path(args.output).write_text(report + "\n")


if __name__ == "__main__":
    main()
