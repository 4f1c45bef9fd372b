"""The rig bench/tunnel.py and bench/viewing.py share: simulator cameras, an edge process that
records them and serves the tunnels the hub asks for, and the arithmetic of the figures.

The edge process is this file run as a script (`EdgeProcess.start`): real `CameraRecorder`s
sealing segments into a real `SegmentStore`, one direct in-process consumer of each `LiveTap`
(the baseline), and `edge_agent.tunnel` serving every `OpenTunnelArgs` line it reads on stdin
(the MQTT hop, by pipe). On stdout it writes JSON lines: `{"ready": device key PEM}` once every
recorder delivers, `{"d": camera, "w": wall, "t": arrival, "n": bytes}` per fragment the direct
consumer gets, and `{"tunnels": [...]}` (what each tunnel sent) when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RIG = str(Path(__file__).resolve())
REPO = Path(RIG).parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SITE = "bench-site"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# Figures


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(values: list[float]) -> str:
    """Table cells: median | p95 | max (milliseconds) | samples."""
    if not values:
        return "– | – | – | 0"
    return (
        f"{statistics.median(values) * 1000:.1f} | {pct(values, 0.95) * 1000:.1f} | "
        f"{max(values) * 1000:.1f} | {len(values)}"
    )


def add_load_args(p: argparse.ArgumentParser, seconds_help: str) -> None:
    """The options both benches take, in the order their --help lists them."""
    p.add_argument("--cameras", type=int, default=8)
    p.add_argument("--viewers", type=int, default=20)
    p.add_argument("--seconds", type=float, default=30.0, help=seconds_help)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--kbps", type=int, default=2000, help="camera bit rate")


def report(text: str, output: str | None) -> None:
    """Print the markdown, and write it to `output` too when given."""
    print(text)
    if output:
        Path(output).write_text(text + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# The simulator


async def start_cameras(count: int, kbps: int) -> tuple[Any, list[Any]]:
    """An `RtspService` serving `count` cameras (one pre-encoded looping 720p25 H.264 clip
    shared by every mount); returns (service, cameras)."""
    from simulator.camera import StreamProfile, VirtualCamera
    from simulator.rtsp import RtspService

    svc = RtspService()
    await svc.start()
    cams = [
        VirtualCamera(index=i + 1, id=f"bench-{i + 1:02d}", name="Bench", host="127.0.0.1",
                      onvif_port=0, rtsp_port=0, user="admin", password="bench",
                      profiles=(StreamProfile("main", 1280, 720, kbps, codec="H264"),))
        for i in range(count)
    ]  # fmt: skip
    await svc.prepare(cams)
    for cam in cams:
        await svc.add_camera(cam)
    return svc, cams


async def stop_cameras(svc: Any, cams: list[Any]) -> None:
    for cam in cams:
        await svc.remove_camera(cam)
    await svc.close()


# --------------------------------------------------------------------------------------------
# The edge process, seen from the hub


class EdgeProcess:
    """The edge process and what it reports: its device key once ready, the direct consumer's
    fragments while `measuring` is set (`direct`), what the tunnels sent (`tunnels`, at stop)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.measuring = False
        self.direct: list[dict[str, Any]] = []
        self.tunnels: list[dict[str, Any]] = []
        self._stdin = proc.stdin
        self._ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(proc.stdout))

    @classmethod
    async def start(
        cls, data: Path, cams: list[Any], recipient: Path, *options: str
    ) -> EdgeProcess:
        """Record `cams` (their main stream) sealed to `recipient`, in `data`; `options`: more
        of this script's options (--ca, --segment-seconds)."""
        urls = [
            {"id": c.id, "url": c.rtsp_url("main").replace("rtsp://", "rtsp://admin:bench@")}
            for c in cams
        ]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, RIG, "--data", str(data), "--recipient", str(recipient),
            "--cameras-json", json.dumps(urls), *options,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def device_key(self, seconds: float) -> Any:
        """The edge's device public key, once every recorder delivers (within `seconds`)."""
        from edge_agent.device_key import load_public_key_pem

        return load_public_key_pem(await asyncio.wait_for(self._ready, seconds))

    async def send_command(self, site: str, command: Any) -> None:
        """The broker's `send_command`: the MQTT hop, by pipe."""
        self._stdin.write(command.args.model_dump_json().encode() + b"\n")
        await self._stdin.drain()

    async def stop(self) -> None:
        """Close its stdin (it stops recording and reports the tunnels) and wait for it."""
        self._stdin.close()
        await asyncio.wait_for(self.proc.wait(), 60)
        await self._reader

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            msg = json.loads(line)
            if "d" in msg:
                if self.measuring:
                    self.direct.append(msg)
            elif "ready" in msg:
                self._ready.set_result(msg["ready"])
            elif "tunnels" in msg:
                self.tunnels = msg["tunnels"]


# --------------------------------------------------------------------------------------------
# The edge process itself


class _Box:
    """TunnelSources for the worker."""

    def __init__(self, device_key: Any, store: Any, recorders: dict[str, Any]) -> None:
        self.site_id = SITE
        self.device_key = device_key
        self.segment_store = store
        self.recorders = recorders

    def live_tap(self, camera: str) -> Any:
        rec = self.recorders.get(camera)
        return rec.tap if rec is not None else None

    def snapshot(self, camera: str) -> bytes | None:
        return None


async def _edge_worker(args: argparse.Namespace) -> None:
    import ssl

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
    config = (
        RecorderConfig()
        if args.segment_seconds is None
        else RecorderConfig(segment_seconds=args.segment_seconds)
    )
    cams = json.loads(args.cameras_json)
    recorders = {
        c["id"]: CameraRecorder(c["id"], c["url"], store, [recipient], config) for c in cams
    }
    tasks = [asyncio.create_task(r.run()) for r in recorders.values()]

    def emit(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

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
    box = _Box(key, store, recorders)
    tunnels: list[Any] = []
    serving: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command = OpenTunnelArgs.model_validate_json(line)
        tunnel = await connect_tunnel(command, box, ssl_context=ssl_context)
        tunnels.append(tunnel)
        serving.append(asyncio.create_task(tunnel.serve(idle_seconds=60)))
    sent = [
        {
            "camera": t.camera,
            "fragments": t.fragments_sent,
            "skipped": t.fragments_skipped,
            "bytes": t.bytes_sent,
        }
        for t in tunnels
    ]
    emit({"tunnels": sent})
    for task in [*consumers, *serving]:
        task.cancel()
    await asyncio.gather(*consumers, *serving, return_exceptions=True)
    await asyncio.gather(*(r.stop() for r in recorders.values()))
    await asyncio.gather(*tasks)
    store.close()


def main() -> None:
    p = argparse.ArgumentParser(description="The edge process of the tunnel benches.")
    p.add_argument("--data", required=True, help="the edge's data directory")
    p.add_argument("--recipient", required=True, help="public key file segments are sealed to")
    p.add_argument("--cameras-json", required=True, help='[{"id": …, "url": rtsp://…}, …]')
    p.add_argument("--ca", help="CA file to trust when dialing wss://")
    p.add_argument("--segment-seconds", type=float, help="recorder segment length")
    args = p.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_edge_worker(args))


if __name__ == "__main__":
    main()
