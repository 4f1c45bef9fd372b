"""`camera-sim run / list / fault` as a user drives them: real processes, real sockets."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import av

from tests.conftest import RunningSimulator

BIN = Path(sys.executable).parent


def _port_open(url: str) -> bool:
    u = urlsplit(url)
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((u.hostname, u.port)) == 0


def test_run_announces_every_camera_and_list_json_repeats_it(
    simulator_factory: Callable[..., RunningSimulator],
) -> None:
    sim = simulator_factory(cameras=3)
    assert [c["id"] for c in sim.cameras] == ["cam-01", "cam-02", "cam-03"]
    for cam in sim.cameras:
        assert set(cam) >= {
            "id",
            "name",
            "onvif_url",
            "rtsp_main",
            "rtsp_sub",
            "snapshot_url",
            "user",
            "password",
        }
        assert _port_open(cam["onvif_url"]) and _port_open(cam["rtsp_main"])
    listed = sim.cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line) for line in listed.stdout.splitlines()] == sim.cameras


def test_offline_fault_refuses_both_ports_and_clear_brings_them_back(
    simulator_factory: Callable[..., RunningSimulator],
) -> None:
    sim = simulator_factory(cameras=2)
    cam = sim.cameras[1]
    done = sim.cli("fault", "cam-02", "offline")
    assert done.returncode == 0, done.stderr
    assert "offline" in done.stdout
    assert not _port_open(cam["onvif_url"])
    assert not _port_open(cam["rtsp_main"])
    assert _port_open(sim.cameras[0]["onvif_url"])  # other cameras unaffected
    assert sim.cli("fault", "cam-02", "clear").returncode == 0
    assert _port_open(cam["onvif_url"]) and _port_open(cam["rtsp_main"])
    url = cam["rtsp_sub"].replace("rtsp://", f"rtsp://{cam['user']}:{cam['password']}@")
    with av.open(url, options={"rtsp_transport": "tcp", "timeout": "5000000"}) as c:
        packet = next(p for p in c.demux(video=0) if p.size)
        assert packet.size > 0


def test_bad_fault_requests_get_one_clear_line(
    simulator_factory: Callable[..., RunningSimulator],
) -> None:
    sim = simulator_factory(cameras=1)
    unknown_cam = sim.cli("fault", "cam-09", "black")
    assert unknown_cam.returncode != 0
    assert "no camera 'cam-09'" in unknown_cam.stderr
    missing_value = sim.cli("fault", "cam-01", "reboot")
    assert missing_value.returncode != 0
    assert "needs a value" in missing_value.stderr
    assert "Traceback" not in unknown_cam.stderr + missing_value.stderr


def test_list_without_a_running_simulator_says_how_to_start_one(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(BIN / "camera-sim"), "list", "--state-file", str(tmp_path / "none.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "camera-sim run" in done.stderr


def test_sigint_stops_the_simulator_and_removes_its_state_file(
    simulator_factory: Callable[..., RunningSimulator],
) -> None:
    sim = simulator_factory(cameras=1)
    assert sim.state_file.exists()
    assert sim.stop() == 0
    assert not sim.state_file.exists()
    assert not _port_open(sim.cameras[0]["onvif_url"])
