"""RTSP streams of the virtual cameras, served by a GStreamer child process.

gst-rtsp-server is usable only from the system interpreter (python3-gi), so the serving runs
in ``/usr/bin/python3 simulator/rtsp_server.py`` and this module drives it over JSON lines on
its stdin/stdout. The child never encodes: `RtspService` makes sure the clip of every
(camera, profile, picture, bit rate) exists first (`simulator.clips`, one encoder process per
core, cached on disk), then tells the child which clip each mount plays.

`apply(cam)` is the one entry point for faults: it reads ``cam.faults`` and
``cam.effective_password`` and brings the child in line (idempotent, ordered per camera), so
the fleet only flips fields on the camera and calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.camera import VirtualCamera
from simulator.clips import (
    DEFAULT_SECONDS,
    ClipEncoder,
    ClipSpec,
    clip_is_cached,
    clip_path,
    prune_cache,
)

log = logging.getLogger(__name__)
_child_log = logging.getLogger(__name__ + ".child")

SYSTEM_PYTHON = "/usr/bin/python3"
DEBIAN_PACKAGES = (
    "python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base "
    "gstreamer1.0-plugins-good gstreamer1.0-plugins-bad"
)
_SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")
_START_TIMEOUT_S = 30.0
_REQUEST_TIMEOUT_S = 30.0
#: Encoder processes are stopped after this long without work (each holds ~70 MB).
_ENCODER_IDLE_S = 30.0


class RtspServerError(RuntimeError):
    """The RTSP child refused a command or died; the message is one line for the user."""


class RtspUnavailableError(RtspServerError):
    """GStreamer's RTSP server cannot run here (missing system packages)."""


class _ChildExited(RtspServerError):
    """The child died while a request was outstanding."""


@dataclass
class _Applied:
    """What the child has been told about one camera (so `apply` sends only differences, and a
    restarted child can be given every camera back as it was)."""

    host: str
    port: int
    online: bool
    stall: bool
    user: str
    password: str
    boot_count: int
    clips: dict[str, Path] = field(default_factory=dict)


class RtspService:
    """Spawns the RTSP child and keeps it in line with the cameras' state.

    ``clip_seconds`` is the loop length (rounded up to whole GOPs, at least two so consecutive
    keyframes differ). Encoding cost is paid once per clip and cached: measured here, 16
    cameras x (720p 2 Mbit/s + 360p 512 kbit/s) of 4 s clips take 11-16 s on 2 cores (call
    `prepare` with all cameras first so both cores work); a picture or bit rate fault encodes
    two clips, ≈ 1-3 s before it shows.

    Should the child die (it never should), it is restarted with every camera on its old port
    and in its old state; requests made meanwhile wait for it (clients see a camera reboot).
    """

    def __init__(
        self,
        *,
        python: str = SYSTEM_PYTHON,
        cache_dir: Path | None = None,
        clip_seconds: float = DEFAULT_SECONDS,
        encoder_workers: int | None = None,
    ) -> None:
        self.python = python
        self.cache_dir = cache_dir
        self.clip_seconds = clip_seconds
        self._encoder = ClipEncoder(encoder_workers, cache_dir)
        self._encoder_busy = 0
        self._encoder_idle_timer: asyncio.TimerHandle | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._applied: dict[str, _Applied] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._write_lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._closing = False
        self.restarts = 0  # how often the child had to be restarted (diagnostics)

    @property
    def pid(self) -> int | None:
        """Process id of the RTSP child (for CPU measurements), None when not running."""
        return self._proc.pid if self._proc is not None else None

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the child; raises `RtspUnavailableError` naming the Debian packages to
        install when the system interpreter lacks GStreamer's RTSP server."""
        if self._proc is not None:
            return
        self._closing = False
        await self._spawn()
        self._ready.set()
        await asyncio.to_thread(prune_cache, self.cache_dir)

    async def close(self) -> None:
        """Stop the child (every RTSP port closes) and the encoder processes."""
        self._closing = True
        self._ready.clear()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(RtspServerError, OSError):
                await self._send("shutdown", wait_s=5.0)
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._proc = None
        if self._encoder_idle_timer is not None:
            self._encoder_idle_timer.cancel()
            self._encoder_idle_timer = None
        await asyncio.to_thread(self._encoder.close)

    # --- cameras -----------------------------------------------------------------------------

    def clip_specs(self, cam: VirtualCamera) -> dict[str, ClipSpec]:
        """The clip each of the camera's profiles should play now (picture fault, bit rate)."""
        specs = {}
        for p in cam.profiles:
            gop_s = p.gop / p.fps
            seconds = max(2, math.ceil(self.clip_seconds / gop_s - 1e-9)) * gop_s
            specs[p.token] = ClipSpec(
                name=cam.name,
                width=p.width,
                height=p.height,
                picture=cam.faults.picture,
                bitrate_kbps=cam.current_bitrate_kbps(p.token),
                codec=p.codec,
                fps=p.fps,
                gop=p.gop,
                seconds=seconds,
            )
        return specs

    async def prepare(self, cams: Iterable[VirtualCamera]) -> None:
        """Encode the clips the cameras need now, all in parallel (call before `add_camera`
        for many cameras: adding them one by one would encode one camera at a time)."""
        specs = [s for cam in cams for s in self.clip_specs(cam).values()]
        await self._ensure(specs)

    async def add_camera(self, cam: VirtualCamera) -> int:
        """Serve the camera's profiles on ``rtsp://host:port/<token>``; returns the port
        (``cam.rtsp_port``, or a free one when it is 0) and stores it in ``cam.rtsp_port``."""
        async with self._lock(cam):
            if cam.id in self._applied:
                raise RtspServerError(f"camera {cam.id} is already served")
            specs = self.clip_specs(cam)
            paths = await self._ensure(list(specs.values()))
            clips = dict(zip(specs, paths, strict=True))
            online = cam.reachable
            answer = await self._request(
                "add",
                camera=cam.id,
                host=cam.host,
                port=cam.rtsp_port,
                user=cam.user,
                password=cam.effective_password,
                mounts={token: {"clip": str(path)} for token, path in clips.items()},
                stall=cam.faults.stall,
                offline=not online,
            )
            port = int(answer["port"])
            cam.rtsp_port = port
            self._applied[cam.id] = _Applied(
                host=cam.host,
                port=port,
                online=online,
                stall=cam.faults.stall,
                user=cam.user,
                password=cam.effective_password,
                boot_count=cam.boot_count,
                clips=clips,
            )
            return port

    async def apply(self, cam: VirtualCamera) -> None:
        """Bring the camera's RTSP side in line with its faults and credentials.

        Offline and rebooting cameras close their port and drop their clients; a changed
        ``boot_count`` ends every session (new session ids afterwards); picture and bit rate
        faults switch clips at the next keyframe without breaking sessions (encoding a new
        clip first takes ≈ 1 s); ``stall`` stops packets while sessions stay open."""
        async with self._lock(cam):
            state = self._applied.get(cam.id)
            if state is None:
                raise RtspServerError(f"camera {cam.id} is not served; add_camera first")
            online = cam.reachable
            if not online and state.online:
                await self._request("offline", camera=cam.id, on=True)
                state.online = False
            if cam.boot_count != state.boot_count:
                await self._request("reboot", camera=cam.id)
                state.boot_count = cam.boot_count
            password = cam.effective_password
            if (cam.user, password) != (state.user, state.password):
                await self._request("credentials", camera=cam.id, user=cam.user, password=password)
                state.user, state.password = cam.user, password
            if cam.faults.stall != state.stall:
                await self._request("stall", camera=cam.id, on=cam.faults.stall)
                state.stall = cam.faults.stall
            specs = self.clip_specs(cam)
            if any(clip_path(s, self.cache_dir) != state.clips.get(t) for t, s in specs.items()):
                paths = await self._ensure(list(specs.values()))
                for token, path in zip(specs, paths, strict=True):
                    if state.clips.get(token) != path:
                        await self._request("set_clip", camera=cam.id, mount=token, clip=str(path))
                        state.clips[token] = path
            online = cam.reachable  # encoding took time: a reboot may have ended meanwhile
            if online and not state.online:
                await self._request("offline", camera=cam.id, on=False)
                state.online = True

    async def remove_camera(self, cam: VirtualCamera) -> None:
        """Stop serving the camera (its port closes)."""
        async with self._lock(cam):
            if self._applied.pop(cam.id, None) is not None:
                await self._request("remove", camera=cam.id)

    async def status(self) -> dict[str, Any]:
        """The child's view of every camera: port, listening, stalled, and per mount the clip,
        running feeds and access units/bytes pushed so far (for tests and diagnostics)."""
        answer = await self._request("status")
        cameras: dict[str, Any] = answer["cameras"]
        return cameras

    # --- internals ---------------------------------------------------------------------------

    def _lock(self, cam: VirtualCamera) -> asyncio.Lock:
        return self._locks.setdefault(cam.id, asyncio.Lock())

    async def _ensure(self, specs: list[ClipSpec]) -> list[Path]:
        """Clip paths for `specs`, encoding missing ones in parallel in the encoder processes
        (blocking calls, so each runs in a thread of its own)."""
        missing = {s for s in specs if not clip_is_cached(s, self.cache_dir)}
        if missing:
            self._encoder_busy += 1
            if self._encoder_idle_timer is not None:
                self._encoder_idle_timer.cancel()
                self._encoder_idle_timer = None
            try:
                await asyncio.gather(*(asyncio.to_thread(self._encoder.ensure, s) for s in missing))
            finally:
                self._encoder_busy -= 1
                if not self._encoder_busy:
                    loop = asyncio.get_running_loop()
                    self._encoder_idle_timer = loop.call_later(
                        _ENCODER_IDLE_S, self._release_encoders
                    )
        return [clip_path(s, self.cache_dir) for s in specs]

    def _release_encoders(self) -> None:
        self._encoder_idle_timer = None
        if not self._encoder_busy:
            self._spawn_task(asyncio.to_thread(self._encoder.release_idle))

    async def _request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send a command once the child is up (waits while it is being restarted)."""
        if self._closing:
            raise RtspServerError("RTSP service is closed")
        if self._proc is None and not self._tasks:
            raise RtspServerError("RTSP server is not running; call start() first")
        for attempt in (1, 2):
            try:
                await asyncio.wait_for(self._ready.wait(), _REQUEST_TIMEOUT_S)
            except TimeoutError:
                raise RtspServerError(
                    "RTSP server process is down and does not come back"
                ) from None
            try:
                return await self._send(cmd, **args)
            except _ChildExited:
                if attempt == 2 or self._closing:
                    raise
                # the child died under this request: it is restarted with every camera as
                # last applied, then the request is sent again
        raise AssertionError("unreachable")

    async def _send(
        self, cmd: str, wait_s: float = _REQUEST_TIMEOUT_S, **args: Any
    ) -> dict[str, Any]:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            raise _ChildExited("RTSP server process is not running")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            async with self._write_lock:
                proc.stdin.write(json.dumps({"id": rid, "cmd": cmd, **args}).encode() + b"\n")
                await proc.stdin.drain()
            answer = await asyncio.wait_for(fut, wait_s)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _ChildExited("RTSP server process is gone") from exc
        except TimeoutError:
            raise RtspServerError(f"RTSP server did not answer {cmd} in {wait_s:.0f} s") from None
        finally:
            self._pending.pop(rid, None)
        if not answer.get("ok"):
            raise RtspServerError(f"RTSP {cmd} failed: {answer.get('error')}")
        return answer

    async def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python,
                "-I",  # isolated: no venv paths, no user site; system dist-packages only
                str(_SERVER_SCRIPT),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
        except OSError as exc:
            raise RtspUnavailableError(
                f"cannot run {self.python} for the RTSP server ({exc.strerror}); "
                f"install: apt-get install {DEBIAN_PACKAGES}"
            ) from exc
        assert proc.stdout is not None and proc.stderr is not None
        self._spawn_task(self._pump_stderr(proc.stderr))
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), _START_TIMEOUT_S)
        except TimeoutError:
            line = b""
        hello = _parse_line(line) if line else {}
        if hello.get("event") != "ready":
            if proc.returncode is None:
                proc.kill()
            code = await proc.wait()
            error = hello.get("error") or f"it exited with status {code}"
            raise RtspUnavailableError(f"RTSP server cannot start: {error}")
        self._proc = proc
        log.info("RTSP server process %s started (%s)", proc.pid, hello.get("gstreamer"))
        self._spawn_task(self._pump_stdout(proc, proc.stdout))

    def _spawn_task(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump_stdout(
        self, proc: asyncio.subprocess.Process, stream: asyncio.StreamReader
    ) -> None:
        while line := await stream.readline():
            msg = _parse_line(line)
            fut = self._pending.get(msg.get("id", -1))
            if fut is not None and not fut.done():
                fut.set_result(msg)
            elif "event" in msg:
                log.info("RTSP server event: %s", msg)
        code = await proc.wait()
        if proc is not self._proc:
            return
        self._ready.clear()
        reason = f"RTSP server process exited (status {code})"
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(_ChildExited(reason))
        if not self._closing:
            log.error("%s; restarting it with %d cameras", reason, len(self._applied))
            self._spawn_task(self._restart())

    async def _restart(self) -> None:
        """Start a new child and give it every camera back, on the same ports."""
        for delay in itertools.chain((0.0, 0.5, 1.0, 2.0, 5.0), itertools.repeat(10.0)):
            await asyncio.sleep(delay)
            if self._closing:
                return
            try:
                await self._spawn()
            except RtspServerError as exc:
                log.error("restarting the RTSP server failed: %s", exc)
                continue
            for cam_id, st in self._applied.items():
                try:
                    await self._send(
                        "add",
                        camera=cam_id,
                        host=st.host,
                        port=st.port,
                        user=st.user,
                        password=st.password,
                        mounts={token: {"clip": str(path)} for token, path in st.clips.items()},
                        stall=st.stall,
                        offline=not st.online,
                    )
                except RtspServerError as exc:
                    log.error("camera %s not restored: %s", cam_id, exc)
            self.restarts += 1
            self._ready.set()
            log.warning("RTSP server restarted; %d cameras restored", len(self._applied))
            return

    async def _pump_stderr(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            level = logging.INFO
            if " WARNING " in text or "WARN" in text[:40]:
                level = logging.WARNING
            elif " ERROR " in text or "CRITICAL" in text or "Traceback" in text:
                level = logging.ERROR
            _child_log.log(level, "%s", text)


def _parse_line(line: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(line)
    except ValueError:
        return {"event": "garbage", "error": line.decode(errors="replace").strip()}
    return msg if isinstance(msg, dict) else {"event": "garbage", "error": str(msg)}
