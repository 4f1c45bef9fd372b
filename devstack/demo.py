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


def write_edge_config(cams: list[dict[str, str]], broker_url: str) -> Path:
    """The demo box's edge.toml: the simulated cameras pinned by ONVIF address (no multicast
    leaves this machine), a viewing key pair made once under .demo/keys."""
    keys = DEMO_DIR / "keys"
    keys.mkdir(exist_ok=True)
    if not (keys / "viewer.pub").exists():
        subprocess.run(
            [str(BIN / "central-hub"), "keygen", str(keys / "viewer")], check=True, timeout=60
        )
    edge = DEMO_DIR / "edge"
    edge.mkdir(exist_ok=True)
    lines = [
        "# written by the demo (devstack/demo.py); see deploy/edge.example.toml",
        "[site]",
        'id = "hcm-q7-kcl01"',
        'name = "Khu cách ly tập trung Quận 7 (demo)"',
        'province = "Hồ Chí Minh"',
        'district = "Quận 7"',
        'kind = "facility"',
        'authority = "health"',
        'operator = "vnpt"',
        "[storage]",
        f'data_dir = "{edge / "data"}"',
        "reserve_gib = 0.5",
        "[credentials]",
        f'user = "{cams[0]["user"]}"',
        f'password = "{cams[0]["password"]}"',
        "[discovery]",
        "enabled = false",
        "[mqtt]",
        f'url = "{broker_url}"',
        "[keys]",
        f'recipient_files = ["{keys / "viewer.pub"}"]',
        "[status]",
        f'socket = "{edge / "edge.sock"}"',
    ]
    for cam in cams:
        lines += ["[[cameras.onvif]]", f'address = "{cam["onvif_url"].split("/")[2]}"']
    path = edge / "edge.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


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
        edge_config = write_edge_config(cams, broker.url)
        edge = subprocess.Popen(
            [str(BIN / "edge-agent"), "run", "--config", str(edge_config)],
            stderr=open(DEMO_DIR / "edge-agent.log", "a"),  # noqa: SIM115 - lives as long as the child
            text=True,
        )
        procs.append(edge)
        print(
            f"demo: edge agent recording the cameras into {DEMO_DIR / 'edge' / 'data'} "
            f"(log {DEMO_DIR / 'edge-agent.log'})",
            flush=True,
        )
        print(f"demo: edge status:     .venv/bin/edge-agent status --config {edge_config}")
        print(f"demo: verify footage:  .venv/bin/edge-agent verify --config {edge_config}")
        print(f"demo: inject a fault:  .venv/bin/camera-sim fault cam-02 black {env_hint}")
        print(f"demo: list cameras:    .venv/bin/camera-sim list {env_hint}")
        print(
            "demo: not yet built, so not started: central hub web UI (see `issues`).",
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
