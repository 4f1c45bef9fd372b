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
import os
import shutil
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web

from bench._tunnel_rig import (
    SITE,
    EdgeProcess,
    add_load_args,
    cpu_seconds,
    ms,
    report,
    start_cameras,
    stop_cameras,
)
from central_hub.tunnel import TunnelBroker
from devstack.certs import CertificateAuthority
from sitelink.sealed_segment import generate_private_key, write_public_key
from sitelink.tunnel import TUNNEL_PATH

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


async def _main(args: argparse.Namespace) -> str:
    work = Path(tempfile.mkdtemp(prefix="bench-tunnel-"))
    svc, cams = await start_cameras(args.cameras, args.kbps)
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

    edge = await EdgeProcess.start(
        work / "edge", cams, work / "viewing.pub", *(["--ca", ca_file] if ca_file else [])
    )
    device_key = await edge.device_key(120)

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
        send_command=edge.send_command,
        device_key_for=lambda s: device_key if s == SITE else None,
    )
    holder["broker"] = broker

    # Phase 1: recorders and direct consumers only.
    await asyncio.sleep(args.warmup)
    c0, t0 = cpu_seconds(edge.pid), time.monotonic()
    await asyncio.sleep(args.seconds)
    edge_cpu_base = (cpu_seconds(edge.pid) - c0) / (time.monotonic() - t0) * 100

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
    edge.measuring = True
    c0, h0, t0 = cpu_seconds(edge.pid), cpu_seconds(os.getpid()), time.monotonic()
    await asyncio.sleep(args.seconds)
    elapsed = time.monotonic() - t0
    edge_cpu = (cpu_seconds(edge.pid) - c0) / elapsed * 100
    hub_cpu = (cpu_seconds(os.getpid()) - h0) / elapsed * 100
    for v in viewers:
        v.measuring = False
    edge.measuring = False
    stats = broker.stats()
    stop.set()
    await asyncio.gather(*view_tasks)
    await edge.stop()
    await broker.close()
    await runner.cleanup()
    await stop_cameras(svc, cams)
    shutil.rmtree(work, ignore_errors=True)

    # Baseline: the direct consumer's arrival of each fragment in the window.
    direct_at = {(m["d"], m["w"]): m["t"] for m in edge.direct}
    direct_lat = [m["t"] - m["w"] for m in edge.direct]
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
        for m in edge.direct
        if m["d"] == v.camera
        and v.arrivals
        and min(v.arrivals) <= m["w"] <= max(v.arrivals)
        and m["w"] not in v.arrivals
    )
    delivered = sum(len(v.seqs) for v in viewers)
    delivered_mb = sum(v.bytes for v in viewers) / 1e6
    upstream_mb = sum(m["n"] for m in edge.direct) / 1e6
    skipped = sum(t["skipped"] for t in edge.tunnels)

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
        f"| baseline: wall → direct in-process consumer at the edge | {ms(direct_lat)} |",
        f"| wall → hub viewer through the tunnel | {ms(tunnel_lat)} |",
        f"| tunnel's own delay (same fragment: hub viewer − direct consumer) | {ms(overhead)} |",
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
    add_load_args(p, seconds_help="measured time per phase")
    p.add_argument("--plain", action="store_true", help="ws:// instead of wss://")
    p.add_argument("--output", help="also write the markdown to this file")
    args = p.parse_args()
    report(asyncio.run(_main(args)), args.output)


if __name__ == "__main__":
    main()
