"""Image-check cost per keyframe: decode + analysis against plain decode, on real keyframes.

Run: .venv/bin/python bench/image_health.py [--codecs H264,H265] [--repeat 200]
     [--main-resolution 1280x720] [--sub-resolution 640x360] [--output results.md]

A `camera-sim` process (one camera per codec) serves its main and sub streams; a few keyframes
of each are demuxed with PyAV over RTSP/TCP, exactly what the recorder hands to image health.
Then, in this process, one thread, cycling through those keyframes `--repeat` times:

- **decode (baseline)**: a fresh single-threaded decoder per keyframe, `decode()` and nothing
  else: the unavoidable part;
- **decode, FFmpeg default threads**: the same with the decoder's default frame threading, to
  show why image health sets `thread_count = 1`;
- **check**: `ImageHealthMonitor.check()` (rate limit off): decode, scale to 320 px, luma,
  Laplacian, difference, scene signature (9 shifts), snapshot JPEG, debounce.

Wall-clock ms per keyframe (median and p95) and CPU ms (this process's CPU time, every thread:
FFmpeg's and OpenCV's workers included, mean) are printed, plus what the check costs per camera
at the default interval (10 s): % of one core. The simulator runs in its own process and is not
counted; the RTSP pulls are over before timing starts.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import av

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devstack.simulator import launch_simulator  # noqa: E402
from edge_agent.config import HealthConfig  # noqa: E402
from edge_agent.image_health import DECODERS, ImageHealthMonitor, decode_keyframe  # noqa: E402
from edge_agent.keyframes import KeyframeSample  # noqa: E402

OPTIONS = {"rtsp_transport": "tcp", "timeout": "5000000"}
CONFIG = HealthConfig(
    check_interval_seconds=0.0,
    black_max_luma=16.0,
    covered_max_luma=60.0,
    covered_max_sharpness=10.0,
    blurred_max_sharpness=20.0,
    blurred_max_ratio=0.25,
    frozen_max_diff=0.1,
    moved_max_similarity=0.5,
    confirm_checks=3,
    ntp_server="",
    max_box_clock_offset_seconds=2.0,
)
DEFAULT_INTERVAL_S = 10.0


def grab_keyframes(url: str, camera_id: str, count: int) -> list[KeyframeSample]:
    """`count` consecutive keyframes of a live stream, as the recorder would keep them."""
    out: list[KeyframeSample] = []
    with av.open(url, options=OPTIONS) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        for packet in container.demux(stream):
            if packet.is_keyframe and packet.size:
                out.append(
                    KeyframeSample(camera_id, len(out) + 1, ctx.name, ctx.extradata,
                                   bytes(packet), time.time(), ctx.width, ctx.height)
                )  # fmt: skip
                if len(out) == count:
                    break
    return out


def _decode_threads_default(sample: KeyframeSample) -> None:
    ctx = av.CodecContext.create(DECODERS[sample.codec], "r")
    ctx.skip_frame = "NONKEY"
    if sample.extradata:
        ctx.extradata = sample.extradata
    frames = ctx.decode(av.Packet(sample.data)) or ctx.decode(None)
    assert frames


def _measure(fn: Callable[[KeyframeSample], object], samples: list[KeyframeSample],
             repeat: int) -> tuple[float, float, float]:  # fmt: skip
    """(median wall ms, p95 wall ms, mean CPU ms) of `fn` over `repeat` keyframes."""
    for s in samples:  # warm-up: first calls load codecs and allocate pools
        fn(s)
    walls: list[float] = []
    cpu0 = time.process_time()
    for i in range(repeat):
        sample = replace(samples[i % len(samples)], seq=1000 + i)
        t0 = time.perf_counter()
        fn(sample)
        walls.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / repeat
    walls.sort()
    p95 = walls[min(len(walls) - 1, int(0.95 * len(walls)))]
    return statistics.median(walls) * 1e3, p95 * 1e3, cpu * 1e3


def bench(samples: list[KeyframeSample], repeat: int) -> list[tuple[str, float, float, float]]:
    monitor = ImageHealthMonitor(samples[0].camera_id, CONFIG)
    rows = [
        ("decode (baseline)", *_measure(decode_keyframe, samples, repeat)),
        ("decode, FFmpeg default threads", *_measure(_decode_threads_default, samples, repeat)),
        ("check (decode + analysis)", *_measure(monitor.check, samples, repeat)),
    ]
    assert monitor.errors == 0 and monitor.current() is not None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", default="H264,H265")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--keyframes", type=int, default=4, help="distinct keyframes cycled")
    parser.add_argument("--main-resolution", default="1280x720")
    parser.add_argument("--sub-resolution", default="640x360")
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    args = parser.parse_args()

    lines = [
        "| codec | stream | size | keyframe KiB | what | median ms | p95 ms | CPU ms | "
        f"% core/camera @ {DEFAULT_INTERVAL_S:g} s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-image-health-") as tmp:
        for codec in args.codecs.split(","):
            proc, cams = launch_simulator(
                Path(tmp) / f"sim-{codec}.json",
                "--codec", codec,
                "--main-resolution", args.main_resolution,
                "--sub-resolution", args.sub_resolution,
                cameras=1,
            )  # fmt: skip
            try:
                cam = cams[0]
                for token in ("main", "sub"):
                    url = cam[f"rtsp_{token}"].replace(
                        "rtsp://", f"rtsp://{cam['user']}:{cam['password']}@", 1
                    )
                    samples = grab_keyframes(url, cam["id"], args.keyframes)
                    size = f"{samples[0].width}x{samples[0].height}"
                    kib = statistics.mean(len(s.data) for s in samples) / 1024
                    for what, median, p95, cpu in bench(samples, args.repeat):
                        share = cpu / 1e3 / DEFAULT_INTERVAL_S * 100
                        line = (
                            f"| {codec} | {token} | {size} | {kib:.0f} | {what} | "
                            f"{median:.2f} | {p95:.2f} | {cpu:.2f} | {share:.3f} |"
                        )
                        lines.append(line)
                        print(line, flush=True)
            finally:
                proc.send_signal(2)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print()
    print("\n".join(lines))
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
