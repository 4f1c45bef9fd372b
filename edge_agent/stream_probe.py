"""Measure what an RTSP stream really delivers (codec, size, fps, bitrate) by pulling it briefly.

The survey sizes disks from these numbers, not from what the camera advertises: cameras often
send far more (or less) than their configured bitrate limit. Packets are counted, never decoded.

Every measurement has a hard deadline. FFmpeg's own socket timeout fires only after ~2-3x its
value, and a camera that answers RTSP but sends no picture kept ``av.open`` blocked in stream
probing for 15 s here (47 s with FFmpeg's default probing), so a stalled camera used to hold a
16-camera survey for ~40 s. PyAV's ``timeout=`` interrupt callback is not an option (it takes the
GIL on every FFmpeg I/O call: FIELD-NOTES). Instead `RtspSocket` finds FFmpeg's TCP socket to the
camera from the outside (through /proc/self/fd) and, at the deadline, shuts it down under
FFmpeg's feet: the blocked read returns at once. The recorder uses the same class for its stall
watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import av

#: FFmpeg's own socket I/O timeout in µs (a backstop; the deadline below cuts first). Never
#: ``av.open(timeout=...)`` (FIELD-NOTES: PyAV's interrupt callback costs ~4x CPU).
_SOCKET_TIMEOUT_US = "5000000"
#: Probe no further than the first packet: the SDP's sprop-parameter-sets already give codec,
#: size and extradata. FFmpeg's default probing buffers ~1.1 s of packets inside ``av.open``.
FAST_PROBE = {"analyzeduration": "0", "probesize": "32"}
#: After a cut, how long the measuring thread gets to notice before it is abandoned (a socket
#: that could not be found ends only on FFmpeg's own timeout; the thread is a daemon).
_AFTER_CUT_S = 1.5
#: Extra time past `seconds` before a measurement that is still running is cut: it runs until
#: the next packet after `seconds`, at most one frame interval late for a live stream.
_MEASURE_GRACE_S = 1.5

# struct tcp_info (linux/tcp.h): tcpi_bytes_received is a __u64 at byte 128 (Linux >= 4.1).
_TCPI_BYTES_RECEIVED = 128


@dataclass
class StreamMeasurement:
    """What a few seconds of a stream showed; `error` is a reason code when it could not be read."""

    url: str  # without credentials
    codec: str | None = None  # "H264" | "H265" | other FFmpeg codec names upper-cased
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    bitrate_kbps: float | None = None
    keyframe_interval_s: float | None = None
    seconds: float = 0.0
    packets: int = 0
    error: str | None = None  # refused | timeout | unauthorized | stall | error
    error_message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def with_credentials(url: str, user: str | None, password: str | None) -> str:
    """The URL with user:password inserted (percent-encoded), unless it already has some."""
    parts = urlsplit(url)
    if not user or parts.username:
        return url
    netloc = f"{quote(user, safe='')}:{quote(password or '', safe='')}@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def without_credentials(url: str) -> str:
    """The URL safe to print and store (no user:password)."""
    parts = urlsplit(url)
    if not parts.username:
        return url
    netloc = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    return urlunsplit(parts._replace(netloc=netloc))


def classify_av_error(exc: BaseException) -> tuple[str, str]:
    """Map a PyAV/OS error on an RTSP stream to (gap cause, message)."""
    text = str(exc)
    low = text.lower()
    if isinstance(exc, ConnectionRefusedError) or "connection refused" in low:
        return "refused", "connection refused"
    if "401" in low or "unauthorized" in low:
        return "unauthorized", "the camera refused the RTSP user name or password"
    if isinstance(exc, TimeoutError) or "timed out" in low or "timeout" in low:
        return "timeout", "no answer in time"
    return "error", f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------------------------
# FFmpeg's RTSP socket, found from the outside so that a blocked read can be cut short


def _socket_inodes() -> dict[int, str]:
    """fd -> "socket:[inode]" for this process's sockets (Linux /proc)."""
    out: dict[int, str] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in names:
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:"):
            out[int(name)] = link
    return out


_open_locks: dict[tuple[str, int], threading.Lock] = {}
_open_locks_guard = threading.Lock()


def _open_lock(host: str, port: int) -> threading.Lock:
    with _open_locks_guard:
        return _open_locks.setdefault((host, port), threading.Lock())


@contextlib.contextmanager
def _borrowed(fd: int, inode: str) -> Iterator[socket.socket | None]:
    """A duplicate of `fd` as a socket object, if `fd` still is the socket `inode`.

    The check is made on the duplicate itself (fstat), so an fd closed and reused by someone
    else between the check and the use can never be touched."""
    try:
        dup = os.dup(fd)
    except OSError:
        yield None
        return
    try:
        if f"socket:[{os.fstat(dup).st_ino}]" != inode:
            os.close(dup)
            yield None
            return
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        yield None
        return
    with sock:
        yield sock


class RtspSocket:
    """FFmpeg's TCP socket to one RTSP camera, so a blocked open or read can be cut short.

    The socket is found by diffing this process's sockets around ``av.open`` (or, while the
    open still blocks, against the sockets that existed before it began), keeping only new
    sockets whose peer is the camera's address and port: exactly one, or none is trusted. A
    per-(host, port) lock held for the whole open serialises opens to one camera address (e.g.
    its main and sub stream), never across cameras. `interrupt()` shuts the socket down (never
    closes it: FFmpeg owns the fd) from any thread.

    The socket is remembered by inode, not by fd: another thread's search briefly holds a
    duplicate fd of every socket it looks at, so one socket can show up under two fds (seen
    with 16 cameras opening at once: the camera's socket was then never found, and that
    recorder could not be stopped).
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._addresses: set[str] = set()
        self._before: dict[int, str] | None = None  # set while an open is in progress
        self._inode: str | None = None
        self._lock = threading.Lock()
        self._released = False

    @contextlib.contextmanager
    def opening(self) -> Iterator[None]:
        """Wrap the blocking ``av.open``; afterwards the session's socket is known (or not)."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            addresses = {str(ai[4][0]) for ai in infos}
        except OSError:
            addresses = set()
        with _open_lock(self.host, self.port):
            with self._lock:
                self._addresses = addresses
                self._before = _socket_inodes()
            try:
                yield
            finally:
                found = self._find()
                with self._lock:
                    self._inode = found
                    self._before = None

    @property
    def found(self) -> bool:
        """Whether the session's socket is known (so `interrupt()` can work)."""
        return self._inode is not None

    def _find(self) -> str | None:
        before = self._before
        if before is None or not self._addresses:
            return None
        before_inodes = set(before.values())
        found: set[str] = set()
        for fd, inode in _socket_inodes().items():
            if inode in before_inodes or inode in found:
                continue
            with _borrowed(fd, inode) as s:
                if s is None:
                    continue
                try:
                    peer = s.getpeername()
                except OSError:
                    continue
            if isinstance(peer, tuple) and peer[0] in self._addresses and peer[1] == self.port:
                found.add(inode)
        return found.pop() if len(found) == 1 else None

    @contextlib.contextmanager
    def _session_socket(self) -> Iterator[socket.socket | None]:
        """A borrowed fd of the session's socket (searched for now while an open blocks)."""
        with self._lock:
            inode = None if self._released else self._inode
            if inode is None and not self._released and self._before is not None:
                inode = self._find()
            fds = [fd for fd, ino in _socket_inodes().items() if ino == inode] if inode else []
            for fd in fds:
                with _borrowed(fd, inode or "") as s:
                    if s is not None:
                        yield s
                        return
            yield None

    def interrupt(self) -> bool:
        """Make a blocked open or demux return now; True if a socket was shut down."""
        with self._session_socket() as s:
            if s is None:
                return False
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                return False
            return True

    def bytes_received(self) -> int | None:
        """Bytes the camera has sent on the session (TCP_INFO), None if unknown."""
        with self._session_socket() as s:
            if s is None:
                return None
            try:
                raw = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            except OSError:
                return None
        if len(raw) < _TCPI_BYTES_RECEIVED + 8:
            return None
        return int(struct.unpack_from("=Q", raw, _TCPI_BYTES_RECEIVED)[0])

    def release(self) -> None:
        """Never touch the socket again (call before FFmpeg closes it)."""
        with self._lock:
            self._released = True
            self._inode = None


# --------------------------------------------------------------------------------------------
# One measurement


class _StreamProbe:
    """One measurement: a daemon thread pulls the stream, the caller's event loop enforces
    the deadlines (`open_timeout` for the RTSP handshake and the first packet, then
    `seconds` + a grace for the measurement)."""

    def __init__(self, url: str, seconds: float, open_timeout: float) -> None:
        parts = urlsplit(url)
        self.url = url
        self.seconds = seconds
        self.open_timeout = open_timeout
        self.result = StreamMeasurement(url=without_credentials(url))
        self.sock = RtspSocket(parts.hostname or "", parts.port or 554)
        self.deadline = time.monotonic() + open_timeout
        self.opened = False
        self.cut_cause: str | None = None  # set when the deadline cut the session
        self.cut_message = ""

    # -- the caller's side (event loop) ------------------------------------------------------

    async def run(self) -> StreamMeasurement:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def work() -> None:
            try:
                self._measure()
            except Exception as exc:  # a bug, or PyAV raising something unexpected
                self.result.error, self.result.error_message = classify_av_error(exc)
            finally:
                with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                    loop.call_soon_threadsafe(_resolve, done)

        self.deadline = time.monotonic() + self.open_timeout
        threading.Thread(target=work, name="stream-probe", daemon=True).start()
        try:
            while not done.done():
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(done), remaining)
            if not done.done():
                self._cut()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(done), _AFTER_CUT_S)
        except asyncio.CancelledError:
            self._cut()
            raise
        if not done.done():
            # The socket could not be found (e.g. a connect that never completes); the thread
            # ends on FFmpeg's own timeout, its result is not waited for.
            m = StreamMeasurement(url=self.result.url)
            m.error = self.cut_cause or "timeout"
            m.error_message = self.cut_message or "no answer in time"
            return m
        return self.result

    def _cut(self) -> None:
        if self.cut_cause is not None:
            return
        if not self.opened:
            # Blocked in av.open: the handshake, or probing for the first packet. If the camera
            # has sent anything, it answered RTSP and then sent no picture.
            received = self.sock.bytes_received()
            if received:
                self.cut_cause = "stall"
                self.cut_message = (
                    f"the camera answered RTSP but sent no video within {self.open_timeout:g} s"
                )
            else:
                self.cut_cause = "timeout"
                self.cut_message = f"no RTSP answer within {self.open_timeout:g} s"
        else:
            self.cut_cause = "stall"
            self.cut_message = f"video stopped within the {self.seconds:g} s measurement"
        self.sock.interrupt()

    # -- the measuring thread ----------------------------------------------------------------

    def _open(self, options: dict[str, str]) -> Any:
        with self.sock.opening():
            return av.open(self.url, options=options)

    def _measure(self) -> None:
        m = self.result
        options = {"rtsp_transport": "tcp", "timeout": _SOCKET_TIMEOUT_US, **FAST_PROBE}
        try:
            container = self._open(options)
            video = container.streams.video[0] if container.streams.video else None
            if (
                self.cut_cause is None
                and video is not None
                and not (video.codec_context.extradata and video.codec_context.width)
            ):
                # No parameter sets in the SDP: let FFmpeg probe the stream (as the recorder)
                self.sock.release()
                container.close()
                self.sock = RtspSocket(self.sock.host, self.sock.port)
                self.deadline = time.monotonic() + self.open_timeout
                del options["analyzeduration"], options["probesize"]
                container = self._open(options)
        except (av.FFmpegError, OSError) as exc:
            m.error, m.error_message = classify_av_error(exc)
            self._apply_cut()
            return
        try:
            self._count(container)
        except (av.FFmpegError, OSError) as exc:
            m.error, m.error_message = classify_av_error(exc)
        finally:
            self.sock.release()
            container.close()
        self._apply_cut()

    def _apply_cut(self) -> None:
        """A session the deadline cut reports why, whatever FFmpeg made of the cut."""
        m = self.result
        if self.cut_cause is None:
            return
        if self.opened and m.packets >= 2 and m.seconds >= 0.8 * self.seconds:
            return  # measured in full; the cut only ended a session that was winding down
        m.error, m.error_message = self.cut_cause, self.cut_message
        m.fps = m.bitrate_kbps = None

    def _count(self, container: Any) -> None:
        m = self.result
        if not container.streams.video:
            m.error, m.error_message = "error", "the stream has no video"
            return
        video = container.streams.video[0]
        ctx = video.codec_context
        m.codec = {"h264": "H264", "hevc": "H265"}.get(ctx.name, ctx.name.upper())
        m.width, m.height = ctx.width or None, ctx.height or None
        start = time.monotonic()
        self.opened = True
        self.deadline = start + self.seconds + _MEASURE_GRACE_S
        if self.cut_cause is not None:
            return  # cut while av.open was returning
        nbytes = 0
        key_times: list[float] = []
        last_packet = start
        first_pts: int | None = None
        last_pts: int | None = None
        for packet in container.demux(video):
            now = time.monotonic()
            if packet.size == 0:
                continue
            if packet.pts is not None:
                first_pts = packet.pts if first_pts is None else first_pts
                last_pts = packet.pts
            m.packets += 1
            nbytes += packet.size
            last_packet = now
            if packet.is_keyframe:
                key_times.append(now)
            if now - start >= self.seconds:
                break
        m.seconds = round(last_packet - start, 3)
        if m.packets < 2:
            m.error, m.error_message = "stall", "the stream opened but sent no video packets"
            return
        # rates over media time: a session starts with a burst (the server's buffered GOP), so
        # packets per wall-clock second overstate fps on a short pull
        span = m.seconds
        if first_pts is not None and last_pts is not None and video.time_base:
            media = float((last_pts - first_pts) * video.time_base)
            if media > 0.5:
                span = media * m.packets / max(1, m.packets - 1)
        if span > 0:
            m.fps = round(m.packets / span, 2)
            m.bitrate_kbps = round(nbytes * 8 / 1000 / span, 1)
        if len(key_times) >= 2:
            m.keyframe_interval_s = round((key_times[-1] - key_times[0]) / (len(key_times) - 1), 2)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def measure_stream(
    url: str,
    user: str | None = None,
    password: str | None = None,
    seconds: float = 4.0,
    open_timeout: float = 5.0,
) -> StreamMeasurement:
    """Pull `url` for `seconds` and measure it; never takes much longer than
    `open_timeout` + `seconds` + 3 s, whatever the camera does.

    The demux blocks inside FFmpeg, so it runs on a daemon thread of its own (not the default
    executor: its few workers would queue a 16-camera survey into waves, and an abandoned
    measurement must never block the interpreter's exit). A camera that does not complete the
    RTSP handshake and deliver a first packet within `open_timeout` is reported as `timeout`
    (nothing received) or `stall` (it answered RTSP but sent no picture); one that stops
    sending during the measurement as `stall`."""
    probe = _StreamProbe(with_credentials(url, user, password), seconds, open_timeout)
    return await probe.run()
