"""`edge-agent run` against the simulator: enrolment, recording, events, status, restarts.

Cameras come from a real `camera-sim` process (ONVIF + RTSP); the daemon runs in this test's
event loop (in-process tests) or as the real `edge-agent run` command (process tests).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from devstack.ports import free_port
from devstack.waiting import until
from edge_agent.config import load_config
from edge_agent.daemon import EdgeDaemon, Timings, query_status
from edge_agent.segment_store import open_reader
from edge_agent.verify import verify
from sitelink import messages as m
from sitelink.sealed_segment import generate_private_key, write_public_key

BIN = Path(sys.executable).parent


def write_config(
    tmp_path: Path,
    cams: list[dict[str, Any]],
    *,
    onvif: int,
    rtsp: int = 0,
    extra: str = "",
    metrics: str = "",
) -> Path:
    """An edge.toml pinning the first `onvif` cameras by ONVIF address and the next `rtsp` by
    RTSP URL; discovery off (no multicast leaves this machine)."""
    key = generate_private_key()
    write_public_key(key.public_key(), tmp_path / "viewer.pub")
    lines = [
        "[site]",
        'id = "hcm-q7-kcl01"',
        'name = "Khu cách ly Q7"',
        'province = "Hồ Chí Minh"',
        'district = "Quận 7"',
        'kind = "facility"',
        'authority = "health"',
        'operator = "vnpt"',
        "[storage]",
        f'data_dir = "{tmp_path / "data"}"',
        "reserve_gib = 0.05",
        "[recording]",
        "segment_seconds = 10",
        "stall_seconds = 3",
        "startup_grace_seconds = 10",
        "backoff_max_seconds = 2",
        "[credentials]",
        f'user = "{cams[0]["user"]}"',
        f'password = "{cams[0]["password"]}"',
        "[discovery]",
        "enabled = false",
        "[mqtt]",
        'url = "mqtt://127.0.0.1:1"',
        "[keys]",
        f'recipient_files = ["{tmp_path / "viewer.pub"}"]',
        "[status]",
        f'socket = "{tmp_path / "edge.sock"}"',
        "[metrics]",
        f'listen = "{metrics}"',
    ]
    for cam in cams[:onvif]:
        host_port = cam["onvif_url"].split("/")[2]
        lines += ["[[cameras.onvif]]", f'address = "{host_port}"']
    for i, cam in enumerate(cams[onvif : onvif + rtsp]):
        lines += [
            "[[cameras.rtsp]]",
            f'id = "rtsp-{i + 1:02d}"',
            f'name = "{cam["name"]}"',
            f'rtsp_main = "{cam["rtsp_main"]}"',
        ]
    path = tmp_path / "edge.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


class Collected:
    """The daemon's events, as its uplink would receive them."""

    def __init__(self) -> None:
        self.events: list[m.EventBase] = []

    async def __call__(self, event: m.EventBase) -> None:
        self.events.append(event)

    def of(self, kind: type[m.EventBase], **match: Any) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, kind) and all(getattr(e, k) == v for k, v in match.items())
        ]


async def test_daemon_records_pinned_cameras_reports_gaps_and_restarts_cleanly(
    tmp_path: Path, simulator_factory: Callable[..., Any]
) -> None:
    sim = simulator_factory(cameras=3)
    metrics_port = free_port()
    cfg = load_config(
        write_config(tmp_path, sim.cameras, onvif=2, rtsp=1, metrics=f"127.0.0.1:{metrics_port}")
    )
    events = Collected()
    daemon = EdgeDaemon(cfg, timings=Timings(sign_heads=5.0, disk=2.0), event_sink=events)
    stop = asyncio.Event()
    run = asyncio.create_task(daemon.run(stop))
    try:
        await until(lambda: daemon.ready.is_set() or run.done(), 60, "daemon ready")
        if run.done():
            run.result()  # the daemon failed: show why
        assert daemon.cameras is not None
        ids = sorted(daemon.cameras.cameras)
        assert ids == ["cam-001", "cam-002", "rtsp-01"]
        await until(lambda: len(events.of(m.CameraUp)) == 3, 30, "three cameras up")

        status = await query_status(cfg.status.socket)
        assert {c["id"] for c in status["cameras"]} == set(ids)
        assert status["site"] == "hcm-q7-kcl01"
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp,
        ):
            assert resp.status == 200
            scraped = await resp.text()
        for cam_id in ids:
            assert f'isocam_camera_connected{{camera="{cam_id}"}} 1.0' in scraped
        assert 'isocam_edge_up{site="hcm-q7-kcl01"} 1.0' in scraped

        # a stalled stream: one gap with cause `stall`, closed when the stream returns
        cam_sim = sim.cameras[0]["id"]
        by_serial = {c.serial: c.id for c in daemon.cameras.inventory.cameras()}
        stalled = by_serial[sim.cameras[0]["serial"]]
        healthy = by_serial[sim.cameras[1]["serial"]]
        assert sim.cli("fault", cam_sim, "stall").returncode == 0
        await until(lambda: bool(events.of(m.GapOpened, camera=stalled)), 30, "gap opened")
        opened = events.of(m.GapOpened, camera=stalled)[0]
        assert opened.cause == "stall"
        assert sim.cli("fault", cam_sim, "clear").returncode == 0
        await until(lambda: bool(events.of(m.GapClosed, camera=stalled)), 30, "gap closed")
        closed = events.of(m.GapClosed, camera=stalled)[0]
        assert closed.start == opened.start and closed.end > closed.start
        # the other cameras never stopped
        assert not events.of(m.GapOpened, camera=healthy)
        assert not events.of(m.GapOpened, camera="rtsp-01")

        await until(lambda: bool(events.of(m.ChainHead)), 30, "a signed chain head")
        inventory = daemon.cameras.inventory_message()
        assert {c.id for c in inventory.cameras} == set(ids)
        assert inventory.site.province == "Hồ Chí Minh"
    finally:
        stop.set()
        await run

    started = events.of(m.AgentStarted)
    assert len(started) == 1 and started[0].clean_shutdown is None  # first start
    db = open_reader(cfg.storage.data_dir)
    rows = db.execute("select camera_id, count(*) from segments group by camera_id").fetchall()
    assert {r[0] for r in rows} == set(ids)
    gaps = db.execute("select cause, end from gaps where camera_id = ?", [stalled]).fetchall()
    assert [g[0] for g in gaps] == ["stall"] and gaps[0][1] is not None
    db.close()

    # second run: same ids, the previous run ended cleanly
    events2 = Collected()
    daemon2 = EdgeDaemon(cfg, event_sink=events2)
    stop2 = asyncio.Event()
    run2 = asyncio.create_task(daemon2.run(stop2))
    try:
        await until(lambda: daemon2.ready.is_set() or run2.done(), 60, "daemon ready again")
        if run2.done():
            run2.result()
        assert daemon2.cameras is not None
        assert sorted(daemon2.cameras.cameras) == ids
    finally:
        stop2.set()
        await run2
    assert events2.of(m.AgentStarted)[0].clean_shutdown is True


def test_edge_agent_run_survives_kill_and_status_command_works(
    tmp_path: Path, simulator_factory: Callable[..., Any]
) -> None:
    sim = simulator_factory(cameras=1)
    config = write_config(tmp_path, sim.cameras, onvif=1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(BIN / "edge-agent"), "run", "--config", str(config)],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def wait_recording(proc: subprocess.Popen[str]) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, (
                f"edge-agent exited: {proc.stderr.read() if proc.stderr else ''}"
            )
            res = subprocess.run(
                [str(BIN / "edge-agent"), "status", "--json", "--config", str(config)],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if res.returncode == 0:
                data: dict[str, Any] = json.loads(res.stdout)
                if data["cameras"] and data["cameras"][0]["segments"] >= 1:
                    return data
            time.sleep(0.5)  # polling another process's status socket: no event reaches us
        raise AssertionError("no segment recorded within 60 s")

    proc = start()
    try:
        wait_recording(proc)
        table = subprocess.run(
            [str(BIN / "edge-agent"), "status", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert table.returncode == 0 and "cam-001" in table.stdout and "recording" in table.stdout
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = json.loads((tmp_path / "data" / "agent-state.json").read_text())
    assert state["running"] is True  # killed: never marked stopped

    proc = start()
    try:
        data = wait_recording(proc)
        assert data["cameras"][0]["id"] == "cam-001"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert "start-up reconcile" in log
    assert json.loads((tmp_path / "data" / "agent-state.json").read_text())["running"] is False

    # no agent running: status says so clearly
    res = subprocess.run(
        [str(BIN / "edge-agent"), "status", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode != 0 and "is `edge-agent run` running?" in res.stderr


@pytest.mark.parametrize("missing", ["site"])
def test_run_refuses_a_bad_config_with_every_problem_named(tmp_path: Path, missing: str) -> None:
    bad = tmp_path / "edge.toml"
    bad.write_text("[storage]\nretention_days = 7\n")
    res = subprocess.run(
        [str(BIN / "edge-agent"), "run", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode != 0
    assert "site.id" in res.stderr and "storage.retention_days" in res.stderr


def _segment_bytes(data_dir: Path) -> int:
    return sum(f.stat().st_size for f in (data_dir / "segments").rglob("*") if f.is_file())


async def test_a_full_disk_deletes_oldest_footage_with_alarm_and_tombstones_and_keeps_recording(
    tmp_path: Path, simulator_factory: Callable[..., Any]
) -> None:
    """Retention floor 1 day (test bench), grace 0: the disk fills within seconds, so the
    daemon must raise the critical alarm, delete the oldest segments inside the floor with
    signed tombstones, and go on recording every camera. Free space is an injected probe over
    the real files: a budget of reserve + 6 MB minus what the segments take."""
    sim = simulator_factory(cameras=2)
    extra_storage = (
        "retention_days = 1\nallow_below_legal_minimum = true\nfloor_grace_seconds = 0\n"
    )
    path = write_config(tmp_path, sim.cameras, onvif=2)
    path.write_text(
        path.read_text().replace("reserve_gib = 0.05\n", "reserve_gib = 0.05\n" + extra_storage)
    )
    cfg = load_config(path)
    reserve = int(0.05 * 1024**3)
    budget = reserve + 6 * 1024 * 1024
    data_dir = cfg.storage.data_dir

    events = Collected()
    daemon = EdgeDaemon(
        cfg,
        timings=Timings(disk=1.0),
        free_bytes=lambda: budget - _segment_bytes(data_dir),
        event_sink=events,
    )
    stop = asyncio.Event()
    run = asyncio.create_task(daemon.run(stop))
    try:
        await until(lambda: daemon.ready.is_set() or run.done(), 60, "daemon ready")
        if run.done():
            run.result()
        await until(
            lambda: bool(events.of(m.Tombstone, reason="disk_full_inside_floor")),
            90,
            "footage deleted inside the floor",
        )
        alarm = events.of(m.Alarm, code="disk_full_floor_reached")
        assert alarm and alarm[0].level == "critical" and alarm[0].active
        assert events.of(m.DiskEvent, level="critical")
        # recording goes on: new segments keep arriving on both cameras after the deletion
        db = open_reader(data_dir)
        seen = dict(db.execute("select camera_id, max(seq) from segments group by camera_id"))
        db.close()

        def both_advanced() -> bool:
            conn = open_reader(data_dir)
            now = dict(conn.execute("select camera_id, max(seq) from segments group by camera_id"))
            conn.close()
            return all(now.get(c, 0) > s for c, s in seen.items()) and len(now) == 2

        await until(both_advanced, 60, "both cameras still recording after the deletion")
    finally:
        stop.set()
        await run
    # the alarm was published before the first deletion inside the floor
    kinds = [
        (type(e).__name__, getattr(e, "code", getattr(e, "reason", None))) for e in events.events
    ]
    assert kinds.index(("Alarm", "disk_full_floor_reached")) < kinds.index(
        ("Tombstone", "disk_full_inside_floor")
    )
    report = verify(data_dir)
    assert report.ok, report.render()


def test_device_key_command_prints_the_key_the_daemon_signs_with(
    tmp_path: Path, simulator_factory: Callable[..., Any]
) -> None:
    from sitelink.signing import key_id, load_public_key_pem

    sim = simulator_factory(cameras=1)
    config = write_config(tmp_path, sim.cameras, onvif=1)
    res = subprocess.run(
        [str(BIN / "edge-agent"), "device-key", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    public = load_public_key_pem(res.stdout)
    assert key_id(public) in res.stderr
    key_file = tmp_path / "data" / "device-key.pem"
    assert key_file.stat().st_mode & 0o077 == 0
    again = subprocess.run(
        [str(BIN / "edge-agent"), "device-key", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.stdout == res.stdout  # made once, then reused

    found = subprocess.run(
        [str(BIN / "edge-agent"), "discover", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.returncode == 0, found.stderr
    reports = json.loads(found.stdout)
    assert [r["serial"] for r in reports] == [sim.cameras[0]["serial"]]


async def test_image_faults_become_events_and_the_reference_is_kept(
    tmp_path: Path, simulator_factory: Callable[..., Any]
) -> None:
    sim = simulator_factory(cameras=1)
    # checks faster than the simulator's 2 s keyframe interval: every keyframe is looked at
    health = "[health]\ncheck_interval_seconds = 1\nconfirm_checks = 2\n"
    cfg = load_config(write_config(tmp_path, sim.cameras, onvif=1, extra=health))
    events = Collected()
    daemon = EdgeDaemon(cfg, event_sink=events)
    stop = asyncio.Event()
    run = asyncio.create_task(daemon.run(stop))
    try:
        await until(lambda: daemon.ready.is_set() or run.done(), 60, "daemon ready")
        if run.done():
            run.result()
        assert daemon.cameras is not None
        await until(
            lambda: (
                daemon.cameras is not None
                and daemon.cameras.inventory.image_reference("cam-001") is not None
            ),
            60,
            "the camera's image reference enrolled",
        )
        assert sim.cli("fault", sim.cameras[0]["id"], "black").returncode == 0
        await until(
            lambda: bool(events.of(m.ImageFaultEvent, fault="black", active=True)), 40, "black"
        )
        raised = events.of(m.ImageFaultEvent, fault="black", active=True)[0]
        assert raised.camera == "cam-001" and raised.measured["luma_mean"] < 16
        assert sim.cli("fault", sim.cameras[0]["id"], "clear").returncode == 0
        await until(
            lambda: bool(events.of(m.ImageFaultEvent, fault="black", active=False)),
            40,
            "black cleared",
        )
    finally:
        stop.set()
        await run


class NtpPeer(asyncio.DatagramProtocol):
    """An NTP server on loopback whose clock runs `offset` seconds ahead of this machine's
    (a network peer standing in for the operator's NTP server)."""

    NTP_EPOCH = 2_208_988_800  # 1900-01-01 to 1970-01-01

    def __init__(self) -> None:
        self.offset = 0.0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (3.11's selector datagram transport does not subclass DatagramTransport)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def _stamp(self, t: float) -> bytes:
        t += self.NTP_EPOCH
        return struct.pack("!II", int(t), int((t % 1) * 2**32))

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 48 or self.transport is None:
            return
        now = time.time() + self.offset
        reply = (
            struct.pack("!BBbb", 0x24, 1, 4, -20)  # no leap, v4, server; stratum 1
            + struct.pack("!II", 0, 0)
            + b"GPS\x00"
            + self._stamp(now)  # reference
            + data[40:48]  # originate = the client's transmit time
            + self._stamp(now)  # receive
            + self._stamp(now)  # transmit
        )
        self.transport.sendto(reply, addr)


async def test_box_clock_offset_to_ntp_is_reported_and_raises_a_clock_event(
    tmp_path: Path, simulator_factory: Callable[..., Any]
) -> None:
    sim = simulator_factory(cameras=1)
    peer = NtpPeer()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: peer, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    health = f'[health]\nntp_server = "127.0.0.1:{port}"\nmax_box_clock_offset_seconds = 2\n'
    cfg = load_config(write_config(tmp_path, sim.cameras, onvif=1, extra=health))
    events = Collected()
    daemon = EdgeDaemon(cfg, timings=Timings(clock=0.5), event_sink=events)
    stop = asyncio.Event()
    peer.offset = 30.0
    run = asyncio.create_task(daemon.run(stop))
    try:
        await until(lambda: bool(events.of(m.ClockEvent, level="warning")), 60, "clock warning")
        raised = events.of(m.ClockEvent, level="warning")[0]
        assert raised.camera is None and 29 < raised.offset_s < 31
        status = await query_status(cfg.status.socket)
        assert 29 < status["clock"]["ntp_offset_s"] < 31
        peer.offset = 0.0
        await until(lambda: bool(events.of(m.ClockEvent, level="ok")), 30, "clock back to ok")
        assert abs(events.of(m.ClockEvent, level="ok")[0].offset_s) < 1
    finally:
        stop.set()
        await run
        transport.close()
