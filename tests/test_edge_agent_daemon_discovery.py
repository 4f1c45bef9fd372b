"""The daemon finds cameras by itself: a WS-Discovery probe at start, and a Hello from a camera
that comes up later, across a private veth network (two namespaces made by the test).

camera-sim runs in the camera namespace, `edge-agent run` in the box namespace; the status
socket is a file, so `edge-agent status` reads it from here.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.netns import NetnsUnavailable, VethPair, veth_pair
from devstack.simulator import launch_simulator
from sitelink.sealed_segment import generate_private_key, write_public_key

BIN = Path(sys.executable).parent
CAMERA_IP = "10.231.10.1"
BOX_IP = "10.231.10.2"


@pytest.fixture
def lan() -> Iterator[VethPair]:
    try:
        with veth_pair(CAMERA_IP, BOX_IP) as pair:
            yield pair
    except NetnsUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


def _config(tmp_path: Path) -> Path:
    key = generate_private_key()
    write_public_key(key.public_key(), tmp_path / "viewer.pub")
    path = tmp_path / "edge.toml"
    path.write_text(
        f"""
[site]
id = "hn-bd-cp02"
province = "Hà Nội"
district = "Ba Đình"
kind = "checkpoint"
authority = "police"
operator = "viettel"
[storage]
data_dir = "{tmp_path / "data"}"
reserve_gib = 0.05
[recording]
segment_seconds = 10
[credentials]
user = "admin"
password = "admin123"
[discovery]
interfaces = ["{BOX_IP}"]
timeout_seconds = 1.5
[mqtt]
url = "mqtt://127.0.0.1:1"
[keys]
recipient_files = ["{tmp_path / "viewer.pub"}"]
[status]
socket = "{tmp_path / "edge.sock"}"
[metrics]
listen = ""
"""
    )
    return path


def _status(config: Path) -> dict[str, Any] | None:
    res = subprocess.run(
        [str(BIN / "edge-agent"), "status", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return json.loads(res.stdout) if res.returncode == 0 else None


def _wait_recording(config: Path, proc: subprocess.Popen[str], count: int) -> dict[str, Any]:
    deadline = time.monotonic() + 90
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, "edge-agent exited"
        last = _status(config)
        if last and sum(1 for c in last["cameras"] if c["connected"]) >= count:
            return last
        time.sleep(0.5)  # polling another process's status socket: no event reaches us
    raise AssertionError(f"{count} cameras not recording within 90 s; last status: {last}")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_daemon_discovers_cameras_and_enrols_one_announced_later(
    tmp_path: Path, lan: VethPair
) -> None:
    in_cameras = lan.exec_argv(lan.camera_ns, [])
    sim1, cams1 = launch_simulator(
        tmp_path / "sim1.json",
        "--host", CAMERA_IP, "--discovery-interface", CAMERA_IP,
        cameras=2,
        prefix=in_cameras,
    )  # fmt: skip
    config = _config(tmp_path)
    agent = subprocess.Popen(
        lan.exec_argv(lan.box_ns, [str(BIN / "edge-agent"), "run", "--config", str(config)]),
        text=True,
    )
    sim2: subprocess.Popen[str] | None = None
    try:
        first = _wait_recording(config, agent, 2)
        assert {c["source"] for c in first["cameras"]} == {"discovery"}
        assert len(first["cameras"]) == 2

        # a camera that comes up later announces itself with Hello; the daemon enrols it
        sim2, cams2 = launch_simulator(
            tmp_path / "sim2.json",
            "--host", CAMERA_IP, "--discovery-interface", CAMERA_IP, "--first-index", "3",
            cameras=1,
            prefix=in_cameras,
        )  # fmt: skip
        third = _wait_recording(config, agent, 3)
        assert len(third["cameras"]) == 3
        urls = {c["url"] for c in third["cameras"]}
        assert cams2[0]["rtsp_main"] in urls
        assert {cams1[0]["rtsp_main"], cams1[1]["rtsp_main"]} <= urls
    finally:
        _stop(agent)
        for sim in (sim1, sim2):
            if sim is not None:
                sim.send_signal(signal.SIGINT)
                sim.wait(timeout=30)
    assert agent.returncode == 0
