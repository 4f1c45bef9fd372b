"""Survey wall time: `edge-agent survey --json` on 16 simulated cameras, 4 of them faulty.

Run: .venv/bin/python bench/survey.py [--runs 5] [--cameras 16] [--seconds 4]
     [--baseline-runs 1] [--output results.md]

One `camera-sim run` serves the cameras (main stream 1500 kbit/s, 720p25); cam-02 has a wrong
password, cam-05 is offline, cam-09's clock is 120 s ahead and cam-13's RTSP stream stalls (it
answers RTSP, then sends no picture). Issue 3's target: all cameras listed with the right
verdict in under 15 s.

Measured in the same run, on the same cameras:

- isocam: the CLI as an installer runs it (a fresh process each time, imports included),
  ONVIF + stream measurement + snapshot of every camera; the verdicts are checked every run;
- serial ffprobe: one ``ffprobe`` per camera, one after the other, pulling each main stream
  for the same number of seconds (``-read_intervals %+N``, FFmpeg's socket timeout 5 s): the
  naive way to measure bitrates, streams only (no ONVIF, no snapshot, no verdicts);
- parallel ffprobe: the same commands all at once: what concurrency alone gives, without a
  deadline on a stalled stream.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devstack.simulator import launch_simulator  # noqa: E402

BIN = Path(sys.executable).parent
FFPROBE = shutil.which("ffprobe") or "ffprobe"
FAULTS = {
    "cam-02": ("wrong-credentials",),
    "cam-05": ("offline",),
    "cam-09": ("clock-skew", "120"),
    "cam-13": ("stall",),
}
#: cam-id -> a substring of its one and only reason; every other camera must be eligible.
EXPECTED = {
    "cam-02": "unauthorized",
    "cam-05": "unreachable",
    "cam-09": "clock",
    "cam-13": "RTSP stall",
}


def _address(cam: dict) -> str:
    u = urlsplit(cam["onvif_url"])
    return f"{u.hostname}:{u.port}"


def _isocam(cams: list[dict], seconds: float, data_dir: Path) -> tuple[float, str]:
    """(wall seconds, "ok" or what was wrong with the verdicts)."""
    args = [
        str(BIN / "edge-agent"),
        "survey",
        "--json",
        "--no-discovery",
        "--seconds",
        str(seconds),
        "--user",
        cams[0]["user"],
        "--password",
        cams[0]["password"],
        "--data-dir",
        str(data_dir),
    ]
    for cam in cams:
        args += ["--camera", _address(cam)]
    t0 = time.monotonic()
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t0
    if done.returncode != 0:
        return wall, f"exit {done.returncode}: {done.stderr.strip()[-200:]}"
    rows = {row["address"]: row for row in json.loads(done.stdout)["cameras"]}
    problems = []
    if len(rows) != len(cams):
        problems.append(f"{len(rows)} of {len(cams)} cameras listed")
    for cam in cams:
        row = rows.get(_address(cam))
        if row is None:
            continue
        want = EXPECTED.get(cam["id"])
        if want is None and not row["eligible"]:
            problems.append(f"{cam['id']} not eligible: {row['reasons']}")
        elif want is not None and (
            row["eligible"] or len(row["reasons"]) != 1 or want not in row["reasons"][0]
        ):
            problems.append(f"{cam['id']}: {row['reasons']}")
    return wall, "; ".join(problems) or "ok"


def _ffprobe_args(cam: dict, seconds: float) -> list[str]:
    url = cam["rtsp_main"].replace("rtsp://", f"rtsp://{cam['user']}:{cam['password']}@")
    return [
        FFPROBE,
        "-v",
        "error",
        "-rtsp_transport",
        "tcp",
        "-timeout",
        "5000000",
        "-read_intervals",
        f"%+{seconds:g}",
        "-select_streams",
        "v:0",
        "-show_entries",
        "packet=size",
        "-of",
        "csv=p=0",
        url,
    ]


def _ffprobe_serial(cams: list[dict], seconds: float) -> tuple[float, str]:
    t0 = time.monotonic()
    for cam in cams:
        subprocess.run(_ffprobe_args(cam, seconds), capture_output=True, timeout=300)
    return time.monotonic() - t0, "n/a"


def _ffprobe_parallel(cams: list[dict], seconds: float) -> tuple[float, str]:
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            _ffprobe_args(cam, seconds), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for cam in cams
    ]
    for p in procs:
        p.wait(timeout=300)
    return time.monotonic() - t0, "n/a"


def _row(name: str, walls: list[float], verdicts: list[str]) -> str:
    return (
        f"| {name} | {len(walls)} | {statistics.median(walls):.1f} | {max(walls):.1f} | "
        f"{min(walls):.1f} | {'; '.join(sorted(set(verdicts)))} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--runs", type=int, default=5, help="isocam surveys")
    p.add_argument("--baseline-runs", type=int, default=1, help="runs of each ffprobe baseline")
    p.add_argument("--cameras", type=int, default=16)
    p.add_argument("--seconds", type=float, default=4.0, help="stream pull per camera")
    p.add_argument("--output", help="also write the markdown table to this file")
    args = p.parse_args()
    if args.cameras < 14:
        raise SystemExit("--cameras must be at least 14 (faults are on cam-02 ... cam-13)")

    with tempfile.TemporaryDirectory(prefix="isocam-bench-survey-") as tmp:
        state = Path(tmp) / "sim.json"
        proc, cams = launch_simulator(state, "--main-bitrate", "1500", cameras=args.cameras)
        try:
            for cam_id, fault in FAULTS.items():
                subprocess.run(
                    [str(BIN / "camera-sim"), "fault", cam_id, *fault, "--state-file", str(state)],
                    check=True,
                    capture_output=True,
                )
            load = os.getloadavg()
            lines = [
                f"Survey benchmark: {args.cameras} cameras (4 faulty), {args.seconds:g} s pull "
                f"per stream, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}, "
                f"load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.",
                "",
                "| method | runs | median s | max s | min s | verdicts |",
                "|---|---|---|---|---|---|",
            ]
            print("\n".join(lines), flush=True)
            methods: list[tuple[str, int, Callable[[], tuple[float, str]]]] = [
                (
                    "isocam `edge-agent survey --json`",
                    args.runs,
                    lambda: _isocam(cams, args.seconds, Path(tmp)),
                ),
                (
                    "serial ffprobe (streams only)",
                    args.baseline_runs,
                    lambda: _ffprobe_serial(cams, args.seconds),
                ),
                (
                    "parallel ffprobe (streams only)",
                    args.baseline_runs,
                    lambda: _ffprobe_parallel(cams, args.seconds),
                ),
            ]
            for name, runs, run in methods:
                walls: list[float] = []
                verdicts: list[str] = []
                for _ in range(runs):
                    wall, verdict = run()
                    walls.append(wall)
                    verdicts.append(verdict)
                if walls:
                    lines.append(_row(name, walls, verdicts))
                    print(lines[-1], flush=True)
            load = os.getloadavg()
            lines += ["", f"Load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}."]
            print(lines[-1])
        finally:
            proc.send_signal(signal.SIGINT)  # camera-sim stops its GStreamer child cleanly
            proc.wait(timeout=30)
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
