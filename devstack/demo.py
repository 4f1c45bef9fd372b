"""The one-machine demo: a private Mosquitto, simulated cameras, and the isocam daemons that exist.

Run through `scripts/demo.sh`. Everything lives under .demo/ in the checkout and stops on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from devstack.broker import BrokerUnavailable, Mosquitto
from devstack.simulator import launch_simulator

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / ".demo"
BIN = Path(sys.executable).parent


def main() -> int:
    DEMO_DIR.mkdir(exist_ok=True)
    procs: list[subprocess.Popen[str]] = []
    broker = Mosquitto(workdir=DEMO_DIR / "mosquitto")
    stopping = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        try:
            broker.start()
        except BrokerUnavailable as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 1
        print(f"demo: Mosquitto broker on {broker.url}", flush=True)
        state_file = DEMO_DIR / "camera-sim.json"
        sim, cams = launch_simulator(state_file, cameras=4)
        procs.append(sim)
        env_hint = f"--state-file {state_file}"
        print("demo: 4 simulated ONVIF cameras:", flush=True)
        for cam in cams:
            print(
                f"  {cam['id']}  {cam['onvif_url']}  {cam['rtsp_main']}  "
                f"user {cam['user']} / {cam['password']}",
                flush=True,
            )
        print(f"demo: inject a fault:  .venv/bin/camera-sim fault cam-02 black {env_hint}")
        print(f"demo: list cameras:    .venv/bin/camera-sim list {env_hint}")
        print(
            "demo: not yet built, so not started: edge agent recording and uplink, "
            "central hub web UI (see `issues`).",
            flush=True,
        )
        print("demo: running; Ctrl-C stops everything.", flush=True)
        while not stopping:
            for p in procs:
                if p.poll() is not None:
                    print(f"demo: {p.args!r} exited with {p.returncode}; stopping", file=sys.stderr)
                    return 1
            time.sleep(0.5)  # supervising child processes; no event source to wait on
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()
        print("demo: stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    raise SystemExit(main())
