"""RTSP streams of virtual cameras, pulled with PyAV the way the edge agent pulls real ones.

One `RtspService` (one GStreamer child) serves every test of the module; each test uses its own
cameras so faults never leak between tests. Clips come from the shared clip cache, so only the
first run on a machine pays for encoding.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import av
import cv2
import numpy as np
import pytest
import pytest_asyncio

from simulator.camera import Codec, Picture, StreamProfile, VirtualCamera
from simulator.rtsp import RtspServerError, RtspService, RtspUnavailableError

pytestmark = pytest.mark.asyncio(loop_scope="module")

OPTIONS = {"rtsp_transport": "tcp", "timeout": "5000000"}
USER, PASSWORD = "admin", "Cam3ra!pw"
T = TypeVar("T")


# --- helpers ---------------------------------------------------------------------------------


def _camera(
    index: int,
    main: tuple[int, int, int] = (1280, 720, 2000),
    sub: tuple[int, int, int] = (640, 360, 512),
    codec: Codec = "H264",
) -> VirtualCamera:
    return VirtualCamera(
        index=index,
        id=f"rtsp-{index:02d}",
        name=f"RTSP test {index:02d}",
        host="127.0.0.1",
        onvif_port=0,
        rtsp_port=0,
        user=USER,
        password=PASSWORD,
        profiles=(
            StreamProfile("main", *main, codec=codec),
            StreamProfile("sub", *sub, codec=codec),
        ),
    )


def _small_camera(index: int, codec: Codec = "H264") -> VirtualCamera:
    """Cheap to encode: for tests about faults, not about resolution."""
    return _camera(index, main=(640, 360, 800), sub=(320, 180, 200), codec=codec)


def _url(cam: VirtualCamera, token: str = "main", password: str | None = None) -> str:
    return f"rtsp://{cam.user}:{password or cam.password}@{cam.host}:{cam.rtsp_port}/{token}"


@dataclass
class Pulled:
    """What a client got from one RTSP session."""

    codec: str = ""
    width: int = 0
    height: int = 0
    packets: int = 0
    bytes: int = 0
    media_s: float = 0.0
    wall_s: float = 0.0
    keyframes: list[np.ndarray] = field(default_factory=list)  # decoded, grey
    arrivals: list[float] = field(default_factory=list)  # monotonic time of each packet
    ended: str = ""  # how the session ended when the server ended it

    @property
    def fps(self) -> float:
        return (self.packets - 1) / self.media_s


def _pull(
    url: str,
    *,
    media_s: float | None = None,
    keyframes: int | None = None,
    until: Callable[[Pulled], bool] | None = None,
    max_wall_s: float = 30.0,
) -> Pulled:
    """Pull from `url` until enough media time / keyframes / `until`, decoding keyframes only
    (like the edge agent's image checks). Ends early, without error, if the server hangs up."""
    out = Pulled()
    container = av.open(url, options=OPTIONS)
    try:
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = "NONKEY"
        out.codec, out.width, out.height = stream.codec_context.name, stream.width, stream.height
        assert stream.time_base is not None
        tb = float(stream.time_base)
        first_pts: int | None = None
        t0 = time.monotonic()
        try:
            for pkt in container.demux(stream):
                if pkt.size == 0:
                    continue
                out.packets += 1
                out.bytes += pkt.size
                out.arrivals.append(time.monotonic())
                if pkt.pts is not None:
                    first_pts = pkt.pts if first_pts is None else first_pts
                    out.media_s = (pkt.pts - first_pts) * tb
                if pkt.is_keyframe:
                    out.keyframes += [f.to_ndarray(format="gray") for f in pkt.decode()]
                out.wall_s = time.monotonic() - t0
                if media_s is not None and out.media_s >= media_s:
                    break
                if keyframes is not None and len(out.keyframes) >= keyframes:
                    break
                if until is not None and until(out):
                    break
                if out.wall_s > max_wall_s:
                    break
            else:
                out.ended = "end of stream"
        except (av.FFmpegError, OSError) as exc:
            out.ended = type(exc).__name__
    finally:
        container.close()
    return out


_POOL = ThreadPoolExecutor(16, thread_name_prefix="rtsp-client")  # PyAV blocks: one thread each


async def _in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    # not asyncio.to_thread: its default pool has only cpu+4 threads, too few for 8 clients
    return await asyncio.get_running_loop().run_in_executor(_POOL, lambda: fn(*args, **kwargs))


def _lapvar(gray: np.ndarray) -> float:
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b).mean())


class RawRtsp:
    """Just enough RTSP (Basic auth, TCP interleaved) to see status codes and session ids."""

    def __init__(self, cam: VirtualCamera, password: str | None = None) -> None:
        self.sock = socket.create_connection((cam.host, cam.rtsp_port), timeout=5)
        token = base64.b64encode(f"{cam.user}:{password or cam.password}".encode()).decode()
        self.auth = f"Basic {token}"
        self.base = f"rtsp://{cam.host}:{cam.rtsp_port}"
        self.cseq = 0
        self.buf = b""

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, list[str]]]:
        self.cseq += 1
        head = {"CSeq": str(self.cseq), "Authorization": self.auth, **(headers or {})}
        lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
        self.sock.sendall(f"{method} {self.base}/{path} RTSP/1.0\r\n{lines}\r\n".encode())
        while True:
            self._skip_interleaved()
            if b"\r\n\r\n" in self.buf and not self.buf.startswith(b"$"):
                raw, rest = self.buf.split(b"\r\n\r\n", 1)
                text = raw.decode()
                length = re.search(r"(?i)content-length:\s*(\d+)", text)
                n = int(length.group(1)) if length else 0
                while len(rest) < n:
                    rest += self._recv()
                self.buf = rest[n:]
                status, *fields = text.split("\r\n")
                parsed: dict[str, list[str]] = {}
                for f in fields:
                    k, _, v = f.partition(":")
                    parsed.setdefault(k.strip().lower(), []).append(v.strip())
                return int(status.split()[1]), parsed
            self.buf += self._recv()

    def play(self, path: str) -> str:
        """DESCRIBE, SETUP, PLAY; returns the session id."""
        assert self.request("DESCRIBE", path, {"Accept": "application/sdp"})[0] == 200
        code, headers = self.request(
            "SETUP", f"{path}/stream=0", {"Transport": "RTP/AVP/TCP;unicast;interleaved=0-1"}
        )
        assert code == 200
        session = headers["session"][0].split(";")[0]
        assert self.request("PLAY", path, {"Session": session})[0] == 200
        return session

    def closed_by_server(self, within_s: float) -> bool:
        """True when the server closes the connection within `within_s` (data is skipped)."""
        deadline = time.monotonic() + within_s
        self.sock.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                continue
            except OSError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        return data

    def _skip_interleaved(self) -> None:
        while self.buf[:1] == b"$":
            while len(self.buf) < 4:
                self.buf += self._recv()
            n = int.from_bytes(self.buf[2:4], "big")
            while len(self.buf) < 4 + n:
                self.buf += self._recv()
            self.buf = self.buf[4 + n :]


def _refuses_connections(cam: VirtualCamera) -> bool:
    try:
        socket.create_connection((cam.host, cam.rtsp_port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


async def _poll(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


async def _mount(service: RtspService, cam: VirtualCamera, token: str = "main") -> dict[str, Any]:
    """The RTSP child's view of one mount: feeds, playing, pushed, bytes."""
    mount: dict[str, Any] = (await service.status())[cam.id]["mounts"][token]
    return mount


async def _until_playing(service: RtspService, cam: VirtualCamera, timeout_s: float = 10) -> None:
    """Wait until the server has pushed a second of video on the camera's /main."""
    deadline = time.monotonic() + timeout_s
    start = (await _mount(service, cam))["pushed"]
    while True:
        m = await _mount(service, cam)
        if m["playing"] and m["pushed"] >= start + 25:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{cam.id} did not start playing within {timeout_s} s")
        await asyncio.sleep(0.1)


# --- fixtures --------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service() -> AsyncIterator[RtspService]:
    svc = RtspService()
    await svc.start()
    yield svc
    await svc.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def eight_cameras(service: RtspService) -> list[VirtualCamera]:
    cams = [_camera(i) for i in range(1, 9)]
    await service.prepare(cams)
    for cam in cams:
        await service.add_camera(cam)
    return cams


async def _added(service: RtspService, *cams: VirtualCamera) -> None:
    await service.prepare(cams)
    for cam in cams:
        await service.add_camera(cam)


# --- streaming -------------------------------------------------------------------------------


async def test_eight_cameras_stream_main_at_25_fps_at_once_for_10_s(
    eight_cameras: list[VirtualCamera],
) -> None:
    pulls = await asyncio.gather(
        *(_in_thread(_pull, _url(cam), media_s=10.0) for cam in eight_cameras)
    )
    for cam, got in zip(eight_cameras, pulls, strict=True):
        assert not got.ended, f"{cam.id}: session ended early ({got.ended})"
        assert (got.codec, got.width, got.height) == ("h264", 1280, 720)
        assert got.media_s >= 10.0
        assert 24.5 <= got.fps <= 25.5, f"{cam.id}: {got.fps:.2f} fps"
        # paced like a live camera: ~1 s of probing burst, then real time
        assert got.media_s - 2.0 <= got.wall_s <= got.media_s + 3.0
        assert 1700 <= got.bytes * 8 / got.media_s / 1000 <= 2400  # ≈ 2000 kbit/s
        assert len(got.keyframes) >= 4  # a keyframe every 2 s, each one decodes
        for gray in got.keyframes:
            assert gray.shape == (720, 1280)
            assert 40 < gray.mean() < 200 and _lapvar(gray) > 200


async def test_sub_stream_serves_its_own_resolution_and_bit_rate(
    eight_cameras: list[VirtualCamera],
) -> None:
    got = await _in_thread(_pull, _url(eight_cameras[0], "sub"), media_s=4.0)
    assert (got.width, got.height) == (640, 360)
    assert 24.5 <= got.fps <= 25.5
    assert 400 <= got.bytes * 8 / got.media_s / 1000 <= 650  # ≈ 512 kbit/s


async def test_many_clients_share_one_feed_per_mount(
    service: RtspService, eight_cameras: list[VirtualCamera]
) -> None:
    cam = eight_cameras[1]
    clients = asyncio.gather(*(_in_thread(_pull, _url(cam), media_s=3.0) for _ in range(4)))
    most_feeds = 0
    while not clients.done():
        most_feeds = max(most_feeds, (await _mount(service, cam))["feeds"])
        await asyncio.sleep(0.2)
    for got in await clients:
        assert not got.ended and 24.0 <= got.fps <= 26.0
    assert most_feeds == 1  # four clients, one running media (one feeder) for /main


async def test_h265_profile_streams_hevc(service: RtspService) -> None:
    cam = _small_camera(20, codec="H265")
    await _added(service, cam)
    got = await _in_thread(_pull, _url(cam), media_s=4.0)
    assert not got.ended
    assert (got.codec, got.width, got.height) == ("hevc", 640, 360)
    assert 24.5 <= got.fps <= 25.5
    assert got.keyframes and _lapvar(got.keyframes[0]) > 200


# --- picture faults --------------------------------------------------------------------------


@dataclass
class Signals:
    """What the edge agent's image checks measure on decoded keyframes."""

    luma: float
    lapvar: float
    keyframe_diff: float  # mean abs difference between consecutive keyframes
    first: np.ndarray


def _signals(got: Pulled) -> Signals:
    k = got.keyframes
    assert len(k) >= 2, f"only {len(k)} keyframes"
    return Signals(
        luma=float(np.mean([g.mean() for g in k])),
        lapvar=float(np.mean([_lapvar(g) for g in k])),
        keyframe_diff=float(np.mean([_diff(a, b) for a, b in itertools.pairwise(k)])),
        first=k[0],
    )


PICTURE_FAULTS: tuple[Picture, ...] = ("black", "covered", "frozen", "blurred", "moved")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def picture_signals(service: RtspService) -> dict[str, tuple[Signals, Signals]]:
    """(normal, faulty) signals per picture fault, each measured on the same camera."""
    cams = {p: _small_camera(30 + i) for i, p in enumerate(PICTURE_FAULTS)}
    await _added(service, *cams.values())
    normal = await asyncio.gather(
        *(_in_thread(_pull, _url(c), keyframes=3, max_wall_s=12) for c in cams.values())
    )
    for picture, cam in cams.items():
        cam.faults.picture = picture
    await asyncio.gather(*(service.apply(c) for c in cams.values()))
    faulty = await asyncio.gather(
        *(_in_thread(_pull, _url(c), keyframes=3, max_wall_s=12) for c in cams.values())
    )
    return {p: (_signals(n), _signals(f)) for p, n, f in zip(cams, normal, faulty, strict=True)}


async def test_normal_picture_signals_are_those_of_a_healthy_camera(
    picture_signals: dict[str, tuple[Signals, Signals]],
) -> None:
    for normal, _ in picture_signals.values():
        assert 60 < normal.luma < 180
        assert normal.lapvar > 300
        assert normal.keyframe_diff > 1.0


async def test_black_fault_decodes_to_mean_luma_below_20(
    picture_signals: dict[str, tuple[Signals, Signals]],
) -> None:
    _, black = picture_signals["black"]
    assert black.luma < 20
    assert black.lapvar < 1


async def test_covered_fault_is_dark_and_flat(
    picture_signals: dict[str, tuple[Signals, Signals]],
) -> None:
    normal, covered = picture_signals["covered"]
    assert 25 <= covered.luma <= 45
    assert covered.lapvar < 10 and covered.lapvar * 50 < normal.lapvar


async def test_frozen_fault_keeps_keyframes_identical_while_packets_flow(
    picture_signals: dict[str, tuple[Signals, Signals]],
) -> None:
    normal, frozen = picture_signals["frozen"]
    assert frozen.keyframe_diff < 0.5
    assert normal.keyframe_diff > 5 * frozen.keyframe_diff
    assert frozen.lapvar > 300  # still a sharp, normal-looking picture


async def test_blurred_fault_drops_laplacian_variance_over_100x(
    picture_signals: dict[str, tuple[Signals, Signals]],
) -> None:
    normal, blurred = picture_signals["blurred"]
    assert blurred.lapvar * 100 < normal.lapvar
    assert abs(blurred.luma - normal.luma) < 10


async def test_moved_fault_changes_the_static_background(
    picture_signals: dict[str, tuple[Signals, Signals]],
) -> None:
    normal, moved = picture_signals["moved"]
    assert _diff(normal.first, moved.first) > 15
    assert _diff(normal.first, moved.first) > 3 * normal.keyframe_diff
    assert moved.lapvar > 300


async def test_picture_switch_happens_inside_an_open_session(service: RtspService) -> None:
    cam = _small_camera(40)
    await _added(service, cam)
    switched = threading.Event()

    def black_after_switch(got: Pulled) -> bool:
        return switched.is_set() and bool(got.keyframes) and got.keyframes[-1].mean() < 20

    pulling = _in_thread(_pull, _url(cam), until=black_after_switch, max_wall_s=20)
    task = asyncio.ensure_future(pulling)
    await asyncio.sleep(2.0)  # let the session run on the normal picture first
    cam.faults.picture = "black"
    await service.apply(cam)
    switched.set()
    got = await task
    assert not got.ended, f"session broke: {got.ended}"
    assert got.keyframes[0].mean() > 40 and got.keyframes[-1].mean() < 20
    gaps = np.diff(got.arrivals[30:])  # after the probing burst
    assert gaps.max() < 1.0  # the stream never paused for the switch


# --- network faults --------------------------------------------------------------------------


async def test_stall_sends_no_packets_but_keeps_the_session_open(service: RtspService) -> None:
    cam = _small_camera(50)
    await _added(service, cam)
    shared: dict[str, Any] = {}

    def until(got: Pulled) -> bool:
        shared["got"] = got  # the live object, read by the test while the stall lasts
        return "resume_after" in shared and got.packets > shared["resume_after"] + 25

    task = asyncio.ensure_future(_in_thread(_pull, _url(cam), until=until, max_wall_s=25))
    await _poll(lambda: "got" in shared and shared["got"].packets > 30, 10, "the client to play")
    cam.faults.stall = True
    await service.apply(cam)
    await asyncio.sleep(0.5)  # packets already in flight may still land
    pushed = (await _mount(service, cam))["pushed"]
    received = shared["got"].packets
    await asyncio.sleep(3.0)
    assert (await _mount(service, cam))["pushed"] == pushed, "server sent video while stalled"
    assert shared["got"].packets == received, "client received video while stalled"
    shared["resume_after"] = received
    cam.faults.stall = False
    await service.apply(cam)
    got = await task
    assert not got.ended, f"session did not survive the stall: {got.ended}"
    assert got.packets > received + 25  # the same session carried on
    assert np.diff(got.arrivals).max() > 3.0


async def test_new_session_on_a_stalled_camera_opens_but_gets_no_pictures(
    service: RtspService,
) -> None:
    cam = _small_camera(51)
    cam.faults.stall = True
    await _added(service, cam)
    raw = RawRtsp(cam)
    try:
        raw.play("main")  # DESCRIBE/SETUP/PLAY answer at once
        got = await _in_thread(_pull_raw_bytes, raw, 2.0)
        assert got < 4000  # parameter sets and RTCP at most, no picture
    finally:
        raw.close()


def _pull_raw_bytes(raw: RawRtsp, seconds: float) -> int:
    raw.sock.settimeout(0.2)
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            n += len(raw.sock.recv(65536))
        except TimeoutError:
            continue
    return n


async def test_offline_refuses_connections_drops_clients_and_comes_back(
    service: RtspService,
) -> None:
    cam = _small_camera(60)
    await _added(service, cam)
    port = cam.rtsp_port
    task = asyncio.ensure_future(_in_thread(_pull, _url(cam), max_wall_s=20))
    await _until_playing(service, cam)
    cam.faults.offline = True
    await service.apply(cam)
    got = await asyncio.wait_for(task, 15)
    assert got.ended  # the server hung up (PyAV sees end of stream or an error)
    assert _refuses_connections(cam)
    with pytest.raises((ConnectionRefusedError, av.FFmpegError)):
        await _in_thread(av.open, _url(cam), options=OPTIONS)
    cam.faults.offline = False
    await service.apply(cam)
    assert cam.rtsp_port == port
    again = await _in_thread(_pull, _url(cam), media_s=2.0)
    assert not again.ended and 24 <= again.fps <= 26


async def test_reboot_drops_sessions_and_comes_back_on_the_same_port_with_new_ids(
    service: RtspService,
) -> None:
    cam = _small_camera(70)
    await _added(service, cam)
    port = cam.rtsp_port
    old = RawRtsp(cam)
    old_session = old.play("main")
    # what the fleet does for `fault reboot 1`
    cam.faults.reboot_until = time.monotonic() + 1.0
    cam.boot_count += 1
    await service.apply(cam)
    assert _refuses_connections(cam)
    assert old.closed_by_server(within_s=5)
    old.close()
    assert cam.faults.reboot_until is not None
    await asyncio.sleep(cam.faults.reboot_until - time.monotonic())  # the fleet's timer
    assert cam.reachable
    await service.apply(cam)
    assert cam.rtsp_port == port
    new = RawRtsp(cam)
    try:
        new_session = new.play("main")
        assert new_session != old_session
        code, _ = new.request("PLAY", "main", {"Session": old_session})
        assert code == 454  # Session Not Found: the old session did not survive the reboot
    finally:
        new.close()
    got = await _in_thread(_pull, _url(cam), media_s=2.0)
    assert 24 <= got.fps <= 26


async def test_wrong_password_gets_401_and_digest_and_basic_are_offered(
    eight_cameras: list[VirtualCamera],
) -> None:
    cam = eight_cameras[2]
    with pytest.raises(av.error.HTTPUnauthorizedError):
        await _in_thread(av.open, _url(cam, password="wrong"), options=OPTIONS)
    raw = RawRtsp(cam, password="wrong")
    try:
        code, headers = raw.request("DESCRIBE", "main", {"Accept": "application/sdp"})
    finally:
        raw.close()
    assert code == 401
    offered = " ".join(headers.get("www-authenticate", []))
    assert "Digest" in offered and "Basic" in offered


async def test_wrong_credentials_fault_changes_the_password_the_camera_accepts(
    service: RtspService,
) -> None:
    cam = _small_camera(80)
    await _added(service, cam)
    cam.faults.wrong_credentials = True
    await service.apply(cam)
    with pytest.raises(av.error.HTTPUnauthorizedError):
        await _in_thread(av.open, _url(cam), options=OPTIONS)
    got = await _in_thread(_pull, _url(cam, password=cam.effective_password), media_s=1.0)
    assert got.packets > 0
    cam.faults.wrong_credentials = False
    await service.apply(cam)
    assert (await _in_thread(_pull, _url(cam), media_s=1.0)).packets > 0


async def test_bitrate_fault_changes_bytes_per_second(service: RtspService) -> None:
    cam = _small_camera(90)  # main 800 kbit/s, sub 200 kbit/s
    await _added(service, cam)
    before = await _in_thread(_pull, _url(cam), media_s=3.0)
    cam.faults.bitrate_kbps = 3200
    await service.apply(cam)
    after, sub = await asyncio.gather(
        _in_thread(_pull, _url(cam), media_s=3.0), _in_thread(_pull, _url(cam, "sub"), media_s=3.0)
    )
    assert 650 <= before.bytes * 8 / before.media_s / 1000 <= 1000
    assert 2700 <= after.bytes * 8 / after.media_s / 1000 <= 3800
    assert 650 <= sub.bytes * 8 / sub.media_s / 1000 <= 1000  # the sub stream scales along


# --- errors ----------------------------------------------------------------------------------


async def test_port_in_use_raises_a_clear_error(service: RtspService) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cam = _small_camera(100)
        cam.rtsp_port = taken.getsockname()[1]
        with pytest.raises(RtspServerError, match=f"127.0.0.1:{cam.rtsp_port}"):
            await service.add_camera(cam)


async def test_interpreter_without_gstreamer_names_the_debian_packages() -> None:
    svc = RtspService(python=sys.executable)  # the venv's python has no gi
    with pytest.raises(RtspUnavailableError, match=r"python3-gi gir1\.2-gst-rtsp-server-1\.0"):
        await svc.start()
    await svc.close()


async def test_crashed_server_process_is_restarted_with_every_camera_on_its_port() -> None:
    svc = RtspService()
    await svc.start()
    try:
        cam = _small_camera(120)
        await _added(svc, cam)
        pid = svc.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        status = await svc.status()  # waits for the new process and the restored cameras
        assert svc.pid != pid and svc.restarts == 1
        assert status[cam.id]["port"] == cam.rtsp_port and status[cam.id]["listening"]
        got = await _in_thread(_pull, _url(cam), media_s=1.0)
        assert got.packets > 20
    finally:
        await svc.close()


async def test_apply_before_add_camera_is_refused(service: RtspService) -> None:
    with pytest.raises(RtspServerError, match="add_camera first"):
        await service.apply(_small_camera(110))
