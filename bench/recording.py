"""Recording cost: isocam's recorder against one ffmpeg per camera, on the same streams, at once.

Run: .venv/bin/python bench/recording.py [--cameras 1,8,32,64] [--bitrates 2000,4000]
     [--seconds 60] [--warmup 8] [--fsync-every 1] [--output results.md]

For each (cameras, bit rate) the simulator (`simulator.rtsp.RtspService`, GStreamer, one
pre-encoded looping 720p25 clip shared by every mount) serves N cameras. Two recorders pull
every stream at the same time:

- isocam: ONE process, ``python -m edge_agent.recorder`` with all N cameras (remux to fMP4,
  sealed with AES-256-GCM per fragment, fdatasync every N fragments, indexed in SQLite);
- ffmpeg: N processes, ``ffmpeg -rtsp_transport tcp -i URL -c copy -f segment`` (remux to
  plain MP4 segments, no sealing: the baseline of FIELD-NOTES).

After a warm-up, CPU time (utime+stime from /proc/PID/stat) is measured over `--seconds` and
reported as % of one core per camera; memory at the end as RSS (VmRSS) and PSS
(smaps_rollup: shared libraries split between the ffmpeg processes) per camera. The simulator's
own CPU is measured from its process too and reported apart: on this 2-core box it competes
with both recorders. isocam's "kept up" column is the slowest camera's measured fps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from simulator.camera import StreamProfile, VirtualCamera  # noqa: E402
from simulator.rtsp import RtspService  # noqa: E402
from sitelink.sealed_segment import generate_private_key, write_public_key  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
FFMPEG = shutil.which("ffmpeg") or "ffmpeg"


def _cpu_seconds(pid: int) -> float:
    """CPU time of a live process, NaN once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (proc(5) fields 14, 15)


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


@dataclass
class RunResult:
    cameras: int
    kbps: int
    seconds: float
    isocam_cpu: float  # % of one core, whole process
    isocam_rss_kib: int
    isocam_rss_start_kib: int
    isocam_min_fps: float
    isocam_mbit_written: float  # sealed bytes written per second, all cameras
    ffmpeg_cpu: float  # % of one core, all processes
    ffmpeg_rss_kib: int
    ffmpeg_pss_kib: int
    ffmpeg_alive: int
    simulator_cpu: float
    notes: list[str] = field(default_factory=list)

    def row(self) -> str:
        n = self.cameras
        iso_cam = self.isocam_cpu / n
        ff_cam = self.ffmpeg_cpu / n
        ratio = iso_cam / ff_cam if ff_cam else float("nan")
        mib = 1024.0
        iso_rss = self.isocam_rss_kib / n / mib
        iso_inc = (self.isocam_rss_kib - self.isocam_rss_start_kib) / n / mib
        return (
            f"| {n} | {self.kbps} | {iso_cam:.2f} | {ff_cam:.2f} | {ratio:.2f} | "
            f"{iso_rss:.1f} ({iso_inc:.1f}) | {self.isocam_rss_kib / mib:.0f} | "
            f"{self.ffmpeg_rss_kib / n / mib:.1f} | {self.ffmpeg_pss_kib / n / mib:.1f} | "
            f"{self.simulator_cpu:.1f} | {self.isocam_min_fps:.1f} | "
            f"{self.isocam_mbit_written / n:.2f} | {self.ffmpeg_alive}/{n} |"
        )


HEADER = (
    "| cameras | kbit/s | isocam CPU %/cam | ffmpeg CPU %/cam | ratio | isocam RSS MiB/cam "
    "(increment) | isocam RSS MiB total | ffmpeg RSS MiB/cam | ffmpeg PSS MiB/cam | "
    "simulator CPU % | isocam min fps | isocam Mbit/s written/cam | ffmpeg alive |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


async def _read_recorder(stream: asyncio.StreamReader, last: dict[str, dict]) -> None:
    while line := await stream.readline():
        with contextlib.suppress(ValueError):
            msg = json.loads(line)
            if msg.get("event") == "stats":
                last[msg["camera_id"]] = msg


async def _run(
    svc: RtspService, n: int, kbps: int, args: argparse.Namespace, work: Path
) -> RunResult:
    w, h = (int(v) for v in args.resolution.split("x"))
    # One name for every camera: the clip burns the name in, so all mounts share one clip.
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
            profiles=(StreamProfile("main", w, h, kbps, codec=args.codec),),
        )
        for i in range(n)
    ]
    await svc.prepare(cams)
    for cam in cams:
        await svc.add_camera(cam)
    urls = [cam.rtsp_url("main").replace("rtsp://", "rtsp://admin:bench@") for cam in cams]

    key = generate_private_key()
    pub = work / "viewing.pub"
    write_public_key(key.public_key(), pub, overwrite=True)
    iso_dir = work / f"isocam-{n}-{kbps}"
    recorder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edge_agent.recorder",
        *(f"{cam.id}={url}" for cam, url in zip(cams, urls, strict=True)),
        "--data-dir",
        str(iso_dir),
        "--recipient",
        str(pub),
        "--segment-seconds",
        "60",
        "--fsync-every",
        str(args.fsync_every),
        "--stats-interval",
        "5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=REPO,
    )
    assert recorder.stdout is not None
    await recorder.stdout.readline()  # {"event": "recording"}: imports done, threads started
    iso_rss_start = _memory_kib(recorder.pid)[0]
    last_stats: dict[str, dict] = {}
    reader = asyncio.create_task(_read_recorder(recorder.stdout, last_stats))

    ffmpegs = []
    for cam, url in zip(cams, urls, strict=True):
        out = work / f"ffmpeg-{n}-{kbps}" / cam.id
        out.mkdir(parents=True, exist_ok=True)
        ffmpegs.append(
            await asyncio.create_subprocess_exec(
                FFMPEG,
                "-nostdin",
                "-loglevel",
                "error",
                "-rtsp_transport",
                "tcp",
                "-i",
                url,
                "-c",
                "copy",
                "-f",
                "segment",
                "-segment_time",
                "60",
                "-reset_timestamps",
                "1",
                str(out / "%05d.mp4"),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        )

    await asyncio.sleep(args.warmup)
    sim_pid = svc.pid
    assert sim_pid is not None
    pids = [recorder.pid, *(p.pid for p in ffmpegs), sim_pid]
    cpu0 = {pid: _cpu_seconds(pid) for pid in pids}
    bytes0 = sum(s.get("bytes_written", 0) for s in last_stats.values())
    t0 = time.monotonic()
    await asyncio.sleep(args.seconds)
    elapsed = time.monotonic() - t0
    alive = [p for p in ffmpegs if p.returncode is None]
    cpu = {pid: (_cpu_seconds(pid) - cpu0[pid]) / elapsed * 100 for pid in pids}
    iso_rss = _memory_kib(recorder.pid)[0]
    ff_mem = [_memory_kib(p.pid) for p in alive]
    bytes1 = sum(s.get("bytes_written", 0) for s in last_stats.values())
    fps = [s.get("fps", 0.0) for s in last_stats.values()]

    for p in ffmpegs:
        if p.returncode is None:
            p.send_signal(signal.SIGINT)  # ffmpeg finishes its segment and exits
    recorder.send_signal(signal.SIGINT)
    await asyncio.gather(*(p.wait() for p in ffmpegs), recorder.wait())
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader
    for cam in cams:
        await svc.remove_camera(cam)
    if not args.keep:
        shutil.rmtree(iso_dir, ignore_errors=True)
        shutil.rmtree(work / f"ffmpeg-{n}-{kbps}", ignore_errors=True)

    return RunResult(
        cameras=n,
        kbps=kbps,
        seconds=elapsed,
        isocam_cpu=cpu.get(recorder.pid, float("nan")),
        isocam_rss_kib=iso_rss,
        isocam_rss_start_kib=iso_rss_start,
        isocam_min_fps=min(fps) if len(fps) == n else 0.0,
        isocam_mbit_written=(bytes1 - bytes0) * 8 / 1e6 / elapsed,
        ffmpeg_cpu=sum(cpu[p.pid] for p in alive),
        ffmpeg_rss_kib=sum(m[0] for m in ff_mem),
        ffmpeg_pss_kib=sum(m[1] for m in ff_mem),
        ffmpeg_alive=len(alive),
        simulator_cpu=cpu.get(sim_pid, float("nan")),
    )


async def _main(args: argparse.Namespace) -> list[str]:
    counts = [int(v) for v in args.cameras.split(",")]
    rates = [int(v) for v in args.bitrates.split(",")]
    lines = [
        f"Recording benchmark: {args.resolution} {args.codec} 25 fps, {args.seconds:.0f} s "
        f"measured after {args.warmup:.0f} s warm-up, fsync every {args.fsync_every} "
        f"fragment(s), {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        HEADER,
    ]
    print("\n".join(lines), flush=True)
    svc = RtspService()
    await svc.start()
    try:
        with tempfile.TemporaryDirectory(prefix="isocam-bench-") as tmp:
            for n in counts:
                for kbps in rates:
                    result = await _run(svc, n, kbps, args, Path(tmp))
                    lines.append(result.row())
                    print(result.row(), flush=True)
    finally:
        await svc.close()
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--cameras", default="1,8,32,64", help="comma-separated camera counts")
    p.add_argument("--bitrates", default="2000,4000", help="comma-separated kbit/s")
    p.add_argument("--seconds", type=float, default=60.0, help="measured time per run")
    p.add_argument("--warmup", type=float, default=8.0, help="seconds before measuring")
    p.add_argument("--resolution", default="1280x720")
    p.add_argument("--codec", default="H264", choices=["H264", "H265"])
    p.add_argument("--fsync-every", type=int, default=1, help="isocam: fdatasync every N fragments")
    p.add_argument("--output", help="also write the markdown table to this file")
    p.add_argument("--keep", action="store_true", help="keep the recorded files")
    args = p.parse_args()
    lines = asyncio.run(_main(args))
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
