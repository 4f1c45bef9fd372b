"""Record one camera's RTSP stream into sealed fragmented-MP4 segments, for ever.

Per camera, a `CameraRecorder` owns

- one **worker thread** that opens the stream with PyAV (RTSP over TCP), demuxes it, remuxes the
  packets — no decoding, no transcoding — into fragmented MP4 through an `edge_agent.fmp4`
  splitter, and seals each fragment to disk (`sitelink.sealed_segment`) the moment the muxer
  finishes it. PyAV's demux blocks inside FFmpeg, so it cannot run on the event loop; it gets a
  dedicated thread rather than an executor slot because it runs for the recorder's whole life
  (the default executor has only a handful of workers, and one stuck camera must not hold a
  slot another camera needs). Reconnects with backoff and the gap ledger live here too.
- one **asyncio task** (`run()`), which lives as long as the worker, and a place on the event
  loop's shared wall-clock watchdog (one timer for all cameras). FFmpeg's own socket timeout
  fires only after ~2x its value (FIELD-NOTES), and PyAV's ``timeout=`` interrupt callback
  costs ~4x CPU across many cameras, so the watchdog watches the age of the last packet and,
  on a stall, shuts the RTSP socket down under FFmpeg's feet: the blocked read returns at
  once, demux ends, and the worker reconnects.

Back-pressure: the worker never waits for anything asynchronous. It writes to disk itself (a
slow disk slows that camera's demux and then TCP, never another camera); everything it offers
to async code is bounded and lossy for the consumer, never for the recording: the live tap is a
ring of the latest fragments, `events` is a bounded queue that drops (and counts) when nobody
reads it — the durable record of gaps and segments is the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Literal, cast
from urllib.parse import urlsplit

import av
import av.error

from edge_agent.fmp4 import MUXER_BUFFER_SIZE, FragmentSplitter, muxer_options
from edge_agent.keyframes import KeyframeSample
from edge_agent.segment_store import SegmentRecord, SegmentStore
from edge_agent.stream_probe import (
    FAST_PROBE,
    RtspSocket,
    with_credentials,
    without_credentials,
)
from sitelink.sealed_segment import RecipientPublicKey, SegmentHeader, SegmentSealer

log = logging.getLogger(__name__)

GapCause = Literal["refused", "timeout", "stall", "eof", "error", "unauthorized"]
Codec = Literal["H264", "H265"]

_CODECS: dict[str, Codec] = {"h264": "H264", "hevc": "H265"}

#: FFmpeg's own socket I/O timeout in µs; never ``av.open(timeout=...)`` (FIELD-NOTES: PyAV's
#: interrupt callback takes the GIL on every I/O call, ~4x CPU at 64 cameras).
_SOCKET_TIMEOUT_S = 5.0
_SOCKET_TIMEOUT_US = str(round(_SOCKET_TIMEOUT_S * 1_000_000))
# FAST_PROBE: probe no further than the first packet. The SDP's sprop-parameter-sets already
# give codec, size and extradata; FFmpeg's default probing buffered ~1.1 s of packets inside
# ``av.open`` here, which then reached us in a burst, stamped ~1 s late (segment start ±0.5 s).


@dataclass(frozen=True)
class RecorderConfig:
    """How a camera is recorded; the first two mirror the `recording.*` settings."""

    segment_seconds: float = 60.0
    fragment_seconds: float = 1.0
    #: No packet for this long on an established stream: a stall; reconnect.
    stall_seconds: float = 5.0
    #: After connecting, the first keyframe may take this long (opening 64+ cameras at once
    #: tripped a 5 s watchdog falsely: FIELD-NOTES).
    startup_grace_seconds: float = 15.0
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 30.0
    #: fdatasync the segment file every N sealed fragments (0: only when a segment ends).
    #: A kill -9 needs none (the page cache outlives the process); this bounds what a power cut
    #: takes. Every fragment, because it is cheap on this box's disk: 64 writers of 4 Mbit/s
    #: syncing each second saw fdatasync p50 0.8 ms / p99 5.8 ms and ~0.01 % of a core per
    #: camera; syncing every 5 fragments made each sync 5x bigger and all cameras sync at once
    #: (p50 27 ms, p99 61 ms) for the same total I/O. Raise it for slow disks.
    fsync_every_fragments: int = 1
    #: Fragments kept in memory for live view (the ring of `LiveTap`).
    live_fragments: int = 2
    #: Watchdog poll period (one shared timer per event loop checks every camera).
    watchdog_interval_seconds: float = 1.0
    events_queue_size: int = 256

    def __post_init__(self) -> None:
        if not 0 < self.fragment_seconds < self.segment_seconds:
            raise ValueError("fragment_seconds must be > 0 and shorter than segment_seconds")
        if self.stall_seconds <= 0 or self.startup_grace_seconds < self.stall_seconds:
            raise ValueError("stall_seconds must be > 0 and startup_grace_seconds >= it")
        if not 0 < self.backoff_initial_seconds <= self.backoff_max_seconds:
            raise ValueError("need 0 < backoff_initial_seconds <= backoff_max_seconds")
        if self.fsync_every_fragments < 0 or self.live_fragments < 1:
            raise ValueError("fsync_every_fragments >= 0 and live_fragments >= 1")


@dataclass(frozen=True)
class GapInfo:
    """An open gap in this camera's recording (the ledger row, as the recorder knows it)."""

    gap_id: int | None  # None if the store could not record it
    start: float
    cause: GapCause


@dataclass(frozen=True)
class RecorderStats:
    """A snapshot for the health report; cheap to take, safe from any thread."""

    camera_id: str
    url: str  # without credentials
    connected: bool  # a session is delivering packets
    recording: bool  # a segment is open
    codec: Codec | None
    last_packet_age_s: float | None
    fps: float  # measured over the last few seconds
    bitrate_bps: float
    reconnects: int
    current_gap: GapInfo | None
    #: Age of the oldest received packet not yet sealed on disk (≈ up to one fragment).
    write_lag_s: float
    #: Wall time the last fragment took to seal and write (and fsync, when due).
    last_seal_ms: float
    packets: int
    segments: int
    fragments: int
    bytes_written: int
    timestamp_repairs: int  # packets whose DTS had to be invented (missing, backwards, jumps)
    events_dropped: int
    last_error: str | None


@dataclass(frozen=True)
class LiveFragment:
    """One media fragment for live view; `init` is its segment's init segment (shared)."""

    seq: int  # increases by one per fragment over the recorder's life
    segment_seq: int
    init: bytes
    data: bytes
    keyframe: bool  # starts with a keyframe: a new viewer can start here
    wall: float  # receipt time of its first packet


EventKind = Literal["connected", "disconnected", "segment", "gap_opened", "gap_closed"]


@dataclass(frozen=True)
class RecorderEvent:
    """Something the health/uplink side may want to hear about at once."""

    kind: EventKind
    camera_id: str
    wall: float
    cause: GapCause | None = None
    gap_id: int | None = None
    segment: SegmentRecord | None = None
    detail: str = ""


class LiveTap:
    """The latest sealed-and-written fragments, in memory, for live view.

    Bounded: only the newest `size` fragments are kept. Publishing costs an append; waking
    async readers costs nothing unless someone waits.
    """

    def __init__(self, size: int) -> None:
        self._ring: deque[LiveFragment] = deque(maxlen=size)
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._seq = 0

    @property
    def last_seq(self) -> int:
        return self._seq

    def latest(self, after: int = 0) -> list[LiveFragment]:
        """Fragments newer than `after` still in the ring, oldest first."""
        with self._lock:
            return [f for f in self._ring if f.seq > after]

    async def wait(self, after: int) -> list[LiveFragment]:
        """Wait until a fragment newer than `after` exists, then return the newer ones (bound
        the wait with ``asyncio.timeout``)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._seq > after:
                return [f for f in self._ring if f.seq > after]
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, fut))
        try:
            await fut
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._waiters.remove((loop, fut))
        return self.latest(after)

    def _publish(
        self, segment_seq: int, init: bytes, data: bytes, keyframe: bool, wall: float
    ) -> None:
        with self._lock:
            self._seq += 1
            self._ring.append(LiveFragment(self._seq, segment_seq, init, data, keyframe, wall))
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
                loop.call_soon_threadsafe(_resolve, fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# --------------------------------------------------------------------------------------------
# Errors → gap causes


def classify_error(exc: BaseException, *, streaming: bool) -> tuple[GapCause, str]:
    """Map a PyAV/OS error to (gap cause, one-line message).

    `streaming` is True once the stream delivered packets: a timeout then means it stalled,
    and a reset connection means it was dropped (an end of stream).
    """
    if isinstance(exc, av.error.HTTPUnauthorizedError | av.error.HTTPForbiddenError):
        return "unauthorized", "the camera refused the RTSP user name or password (401/403)"
    if isinstance(exc, ConnectionRefusedError):
        return "refused", "connection refused"
    if isinstance(exc, TimeoutError):
        if streaming:
            return "stall", "no packet within the socket timeout"
        return "timeout", "no answer within the socket timeout"
    if streaming and isinstance(exc, ConnectionError | EOFError):
        return "eof", f"connection dropped ({type(exc).__name__})"
    return "error", f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------
# One RTSP session


class _Connection:
    """One RTSP session: the PyAV container and FFmpeg's TCP socket under it.

    `interrupt()` cuts the session short from another thread (the watchdog, `stop()`), during
    the open as well as while demuxing: `edge_agent.stream_probe.RtspSocket` finds the socket
    and shuts it down (never closes it: FFmpeg owns the fd); the blocked read returns at once.
    When the socket cannot be found, the session ends when FFmpeg's own socket timeout fires.
    """

    def __init__(self, url: str, host: str, port: int) -> None:
        self.url = url
        self.host = host
        self.port = port
        self.container: Any = None
        self.opening_mono: float | None = None
        self.opened_mono: float | None = None
        self.first_key_mono: float | None = None
        self.interrupt_cause: GapCause | Literal["stopped"] | None = None
        self._sock = RtspSocket(host, port)
        self._lock = threading.Lock()
        self._closed = False

    def open(self) -> Any:
        options = {"rtsp_transport": "tcp", "timeout": _SOCKET_TIMEOUT_US, **FAST_PROBE}
        self.opening_mono = time.monotonic()
        with self._sock.opening():
            container = av.open(self.url, options=options)
        stream = container.streams.video[0] if container.streams.video else None
        if (
            self.interrupt_cause is None
            and stream is not None
            and not (stream.codec_context.extradata and stream.codec_context.width)
        ):
            # No parameter sets in the SDP: let FFmpeg probe the stream itself (slower, and the
            # probed packets arrive in a burst; rare with real cameras).
            with self._lock:
                self._sock.release()
                self._sock = RtspSocket(self.host, self.port)
            container.close()
            del options["analyzeduration"], options["probesize"]
            with self._sock.opening():
                container = av.open(self.url, options=options)
        with self._lock:
            self.container = container
            self.opened_mono = time.monotonic()
        return container

    def bytes_received(self) -> int | None:
        """What the camera sent on this session so far (None: unknown)."""
        return self._sock.bytes_received()

    def interrupt(self, cause: GapCause | Literal["stopped"]) -> bool:
        """Make the blocked open or demux return now; True if the socket could be shut down."""
        with self._lock:
            if self.interrupt_cause is None:
                self.interrupt_cause = cause
            if self._closed:
                return False
            return self._sock.interrupt()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._sock.release()
            container, self.container = self.container, None
        if container is not None:
            with contextlib.suppress(av.FFmpegError, OSError):
                container.close()


# --------------------------------------------------------------------------------------------
# Timestamps


class MediaTimeline:
    """Turns the camera's timestamps into a strictly increasing DTS line for the muxer.

    RTSP gives the first packet of a session no timestamps, cameras' clocks jump, and some send
    non-monotonic DTS. A step is taken from the camera when it is positive and plausible — at
    most the wall time since the previous packet plus a second (a stall legitimately shows as
    a jump in media time) — otherwise one nominal frame duration is used instead.
    """

    def __init__(self, time_base: Fraction, fps: float) -> None:
        self.time_base = time_base
        self.nominal = max(1, round(1 / (fps * time_base)))
        # A float, not a Fraction: it is compared against on every packet, and Fraction
        # arithmetic (ABC isinstance checks, object creation) cost more than the rest of place().
        self.ticks_per_s = float(1 / time_base)
        self.prev_in: int | None = None
        self.prev_wall = 0.0
        self.out = -self.nominal  # so the first packet lands on 0
        self.started = False
        self.repairs = 0

    def place(self, pts: int | None, dts: int | None, wall: float) -> tuple[int, int]:
        """(pts, dts) on the output line for a packet received at `wall`."""
        if dts is None:
            dts = pts
        step = self.nominal
        if dts is None:
            if self.started:  # only a session's first packet may come without timestamps
                self.repairs += 1
        elif self.prev_in is not None:
            delta = dts - self.prev_in
            if 0 < delta <= (wall - self.prev_wall + 1.0) * self.ticks_per_s:
                step = delta
            else:
                self.repairs += 1
        if dts is not None:
            self.prev_in = dts
        self.started = True
        self.prev_wall = wall
        self.out += step
        cts = 0
        if pts is not None and dts is not None and 0 <= pts - dts <= self.ticks_per_s:
            cts = pts - dts  # B-frames: keep the reorder offset
        return self.out + cts, self.out


def _fps_of(stream: Any) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and 1 <= float(rate) <= 240:
            return float(rate)
    return 25.0


# --------------------------------------------------------------------------------------------
# One segment being written


class _SegmentWriter:
    """Muxes one segment into fMP4 and seals every piece as the muxer finishes it."""

    def __init__(
        self,
        rec: CameraRecorder,
        in_stream: Any,
        codec: Codec,
        start_wall: float,
        first_dts: int,
    ) -> None:
        self.rec = rec
        self.codec = codec
        self.start_wall = start_wall
        self.start_mono = time.monotonic()
        self.end_wall = start_wall
        self.base_dts = first_dts
        self.init = b""
        self.fragments = 0
        self.sealed = False
        self._since_sync = 0
        self.bytes_counted = 0  # of sealer.bytes_written, already added to the recorder's total
        self._pending_wall: float | None = None  # first packet of the fragment being muxed
        self._pending_key = False
        self._incoming_wall = 0.0
        self._incoming_key = False
        self.seq, self.path = rec.store.allocate(rec.camera_id, start_wall)
        # Raw (unbuffered) file: each sealed chunk goes to the kernel as the sealer writes it.
        self.file = cast(BinaryIO, open(self.path, "xb", buffering=0))  # noqa: SIM115
        try:
            header = SegmentHeader(rec.store.site_id, rec.camera_id, self.seq, start_wall)
            # The store hashes the closed file itself; no need to hash twice.
            self.sealer = SegmentSealer(self.file, header, rec.recipients, track_sha256=False)
            self.splitter = FragmentSplitter(self._on_init, self._on_fragment)
            self.out: Any = av.open(
                self.splitter,
                "w",
                format="mp4",
                options=muxer_options(rec.config.fragment_seconds),
                buffer_size=MUXER_BUFFER_SIZE,
            )
            self.ostream = self.out.add_stream_from_template(in_stream)
            if codec == "H265":
                self.ostream.codec_context.codec_tag = "hvc1"  # MP4 default hev1; Apple wants hvc1
        except BaseException:
            self.file.close()
            raise

    def mux(self, packet: Any, pts: int, dts: int, wall: float, key: bool) -> None:
        self._incoming_wall, self._incoming_key = wall, key
        if self._pending_wall is None:
            self._pending_wall, self._pending_key = wall, key
        packet.dts = dts - self.base_dts
        packet.pts = pts - self.base_dts
        packet.stream = self.ostream
        self.out.mux(packet)
        self.end_wall = wall

    @property
    def pending_since(self) -> float | None:
        return self._pending_wall

    def _on_init(self, data: bytes) -> None:
        self.init = data
        self.sealer.write_chunk(data)

    def _on_fragment(self, data: bytes) -> None:
        t0 = time.perf_counter()
        self.sealer.write_chunk(data)
        self.fragments += 1
        every = self.rec.config.fsync_every_fragments
        self._since_sync += 1
        if every and self._since_sync >= every:
            os.fdatasync(self.file.fileno())
            self._since_sync = 0
        self.rec._fragment_written(self, data, self._pending_wall or 0.0, self._pending_key, t0)
        # The muxer cuts a fragment when the *next* packet arrives: that packet starts the next.
        self._pending_wall, self._pending_key = self._incoming_wall, self._incoming_key

    def finish(self) -> SegmentRecord:
        """Flush the last fragment, seal the end marker, fsync and close. Never raises: a
        segment that cannot be finished is recorded as unfinished (its sealed chunks stand)."""
        finished = False
        try:
            self.out.close()  # flushes the last fragment through _on_fragment
            self.splitter.check_complete()
            self.sealer.close()
            finished = True
        except Exception as exc:
            log.error("%s seq %d: could not finish segment: %s", self.rec.camera_id, self.seq, exc)
            self.sealer.abort()
        try:
            os.fsync(self.file.fileno())  # the index row must never point at unsynced data
        except OSError as exc:
            log.error("%s seq %d: fsync failed: %s", self.rec.camera_id, self.seq, exc)
            finished = False
        finally:
            self.file.close()
        self._pending_wall = None
        return SegmentRecord(
            camera_id=self.rec.camera_id,
            seq=self.seq,
            path=self.path,
            start=self.start_wall,
            end=self.end_wall,
            bytes=self.sealer.bytes_written,
            fragments=self.fragments,
            finished=finished,
            codec=self.codec,
        )


# --------------------------------------------------------------------------------------------
# The watchdog


class _Watchdog:
    """One timer per event loop that checks every running recorder's last-packet age.

    One wake-up per interval for all cameras rather than one per camera: every wake-up of the
    loop thread has to take the GIL from the demux threads (with a 2 Hz timer per camera, 8
    cameras measured 0.74 % of a core per camera against 0.64 % with one shared timer; noisy,
    but as much as sealing costs).
    """

    _by_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watchdog]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._recorders: set[CameraRecorder] = set()
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Watchdog:
        dog = cls._by_loop.get(loop)
        if dog is None:
            dog = cls._by_loop[loop] = cls(loop)
        return dog

    def add(self, rec: CameraRecorder) -> None:
        self._recorders.add(rec)
        if self._timer is None:
            self._schedule()

    def remove(self, rec: CameraRecorder) -> None:
        self._recorders.discard(rec)
        if not self._recorders and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        interval = min(r.config.watchdog_interval_seconds for r in self._recorders)
        self._timer = self._loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        for rec in list(self._recorders):
            try:
                rec._watch()
            except Exception:  # one camera's bug must not blind the watchdog for the others
                log.exception("%s: watchdog check failed", rec.camera_id)
        self._timer = None
        if self._recorders:
            self._schedule()


# --------------------------------------------------------------------------------------------
# The recorder


class CameraRecorder:
    """Records one camera until stopped; see the module docstring for the threads involved.

    Use as ``task = asyncio.create_task(rec.run())`` … ``await rec.stop()``.
    """

    def __init__(
        self,
        camera_id: str,
        url: str,
        store: SegmentStore,
        recipients: Sequence[RecipientPublicKey],
        config: RecorderConfig | None = None,
        *,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("rtsp", "rtsps") or not parts.hostname:
            raise ValueError(f"{camera_id}: not an RTSP URL: {without_credentials(url)}")
        if not recipients:
            raise ValueError(f"{camera_id}: no recipient keys to seal segments to")
        self.camera_id = camera_id
        self.store = store
        self.recipients = list(recipients)
        self.config = config or RecorderConfig()
        self.tap = LiveTap(self.config.live_fragments)
        self.events: asyncio.Queue[RecorderEvent] = asyncio.Queue(self.config.events_queue_size)
        self._url = with_credentials(url, user, password)
        self._public_url = without_credentials(self._url)
        self._host = parts.hostname
        self._port = parts.port or 554
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._thread_done: asyncio.Future[None] | None = None
        self._conn: _Connection | None = None
        self._segment: _SegmentWriter | None = None
        self._gap: GapInfo | None = None
        self._started_wall = 0.0
        # Counters written by the worker only; readers take plain attribute snapshots.
        self._packets = 0
        self._bytes_in = 0
        self._last_packet_mono: float | None = None
        self._last_recorded_wall: float | None = None
        self._samples: deque[tuple[float, int, int]] = deque(maxlen=6)
        self._next_sample = 0.0
        self._connected = False
        self._codec: Codec | None = None
        self._reconnects = 0
        self._segments = 0
        self._fragments = 0
        self._bytes_written = 0
        self._last_seal_ms = 0.0
        self._repairs = 0
        self._events_dropped = 0
        self._last_error: str | None = None
        self._keyframe_seq = 0
        self._last_keyframe: KeyframeSample | None = None
        #: Notified at each new keyframe (once per GOP), for `wait_keyframe_after`.
        self._keyframe_changed = threading.Condition()

    # -- public ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Record until `stop()`: the worker thread records, the loop's watchdog watches it."""
        if self._thread is not None:
            raise RuntimeError(f"{self.camera_id}: recorder already running")
        self._loop = asyncio.get_running_loop()
        self._thread_done = self._loop.create_future()
        self._started_wall = time.time()
        self._thread = threading.Thread(
            target=self._work, name=f"recorder-{self.camera_id}", daemon=True
        )
        self._thread.start()
        watchdog = _Watchdog.of(self._loop)
        watchdog.add(self)
        try:
            await asyncio.shield(self._thread_done)
        finally:
            watchdog.remove(self)
            if not self._thread_done.done():  # cancelled: still shut the worker down cleanly
                self._request_stop()
                await asyncio.shield(self._thread_done)

    async def stop(self) -> None:
        """Finish the open segment, close an open gap and return once the worker has ended."""
        self._request_stop()
        if self._thread_done is not None:
            await asyncio.shield(self._thread_done)

    @property
    def last_keyframe(self) -> KeyframeSample | None:
        """The latest keyframe received (still compressed), for image health; None before the
        first. Cheap and safe from any thread: a plain read of an immutable object."""
        return self._last_keyframe

    def wait_keyframe_after(self, seq: int, timeout: float) -> KeyframeSample | None:
        """Block (on a thread, not the event loop) until a keyframe newer than `seq` arrives;
        None after `timeout` seconds."""
        with self._keyframe_changed:
            self._keyframe_changed.wait_for(
                lambda: self._last_keyframe is not None and self._last_keyframe.seq > seq,
                timeout,
            )
            sample = self._last_keyframe
        return sample if sample is not None and sample.seq > seq else None

    def stats(self) -> RecorderStats:
        """Live figures for the health report (cheap: no locks, no I/O)."""
        now_mono = time.monotonic()
        last = self._last_packet_mono
        fps = bitrate = 0.0
        samples = list(self._samples)
        if samples:
            t0, p0, b0 = samples[0]
            span = now_mono - t0
            if span >= 0.5:
                fps = (self._packets - p0) / span
                bitrate = (self._bytes_in - b0) * 8 / span
        seg = self._segment
        pending = seg.pending_since if seg is not None else None
        return RecorderStats(
            camera_id=self.camera_id,
            url=self._public_url,
            connected=self._connected,
            recording=seg is not None,
            codec=self._codec,
            last_packet_age_s=None if last is None else now_mono - last,
            fps=fps,
            bitrate_bps=bitrate,
            reconnects=self._reconnects,
            current_gap=self._gap,
            write_lag_s=0.0 if pending is None else max(0.0, time.time() - pending),
            last_seal_ms=self._last_seal_ms,
            packets=self._packets,
            segments=self._segments,
            fragments=self._fragments,
            bytes_written=self._bytes_written,
            timestamp_repairs=self._repairs,
            events_dropped=self._events_dropped,
            last_error=self._last_error,
        )

    # -- watchdog (event loop) ---------------------------------------------------------------

    def _watch(self) -> None:
        conn = self._conn
        if conn is None or conn.interrupt_cause is not None:
            return
        now = time.monotonic()
        if conn.opened_mono is None:
            # Still inside av.open: a camera that answers RTSP but sends no picture kept it
            # blocked 15 s here, 47 s more when the open is retried with full probing.
            if conn.opening_mono is not None and (
                now - conn.opening_mono > self.config.startup_grace_seconds
            ):
                cause: GapCause = "stall" if conn.bytes_received() else "timeout"
                cut = conn.interrupt(cause)
                log.warning(
                    "%s: no video %.0f s after connecting (%s)%s",
                    self.camera_id,
                    now - conn.opening_mono,
                    cause,
                    "" if cut else ", waiting for FFmpeg's socket timeout",
                )
            return
        if conn.first_key_mono is None:
            late = now - conn.opened_mono > self.config.startup_grace_seconds
        else:
            last = self._last_packet_mono or conn.first_key_mono
            late = now - last > self.config.stall_seconds
        if late:
            cut = conn.interrupt("stall")
            log.warning(
                "%s: no video for %.0f s, reconnecting%s",
                self.camera_id,
                now - (self._last_packet_mono or conn.opened_mono),
                "" if cut else " once FFmpeg's socket timeout fires",
            )

    def _request_stop(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None:
            conn.interrupt("stopped")

    # -- worker thread -----------------------------------------------------------------------

    def _work(self) -> None:
        try:
            self._reconnect_loop()
        except Exception:  # a bug: say so loudly, but never take other cameras down with it
            log.exception("%s: recorder thread crashed", self.camera_id)
            self._last_error = "internal error (see log)"
        finally:
            self._connected = False
            loop, done = self._loop, self._thread_done
            if loop is not None and done is not None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_resolve, done)

    def _reconnect_loop(self) -> None:
        failures = 0
        # A loss whose cause is only "eof"/"error" waits for the next attempt: if that one is
        # refused (or 401, or times out) the gap gets that, more telling, cause; if it records
        # again, the gap is written with the original cause.
        pending: GapCause | None = None
        while not self._stop.is_set():
            conn = _Connection(self._url, self._host, self._port)
            self._conn = conn
            outcome = self._session(conn, pending)
            self._conn = None
            if outcome.recorded:
                pending = None
            if self._stop.is_set():
                if pending is not None:
                    self._open_gap(pending)
                break
            cause = outcome.cause
            if outcome.recorded:
                if cause in ("eof", "error"):
                    pending = cause
                else:
                    self._open_gap(cause)
            elif pending is not None:
                self._open_gap(
                    cause if cause in ("refused", "unauthorized", "timeout") else pending
                )
                pending = None
            else:
                self._open_gap(cause)  # no-op while a gap is already open
            self._reconnects += 1
            # Back off unless a session just recorded for a good while (then it is one drop,
            # not a flapping camera: retry at once).
            if outcome.recorded_seconds >= 10 * self.config.stall_seconds:
                failures = 0
                delay = 0.0
            else:
                failures += 1
                base = self.config.backoff_initial_seconds * 2 ** min(failures - 1, 16)
                jitter = random.uniform(0.5, 1.0)  # noqa: S311 - spreading retries, not crypto
                delay = min(self.config.backoff_max_seconds, base) * jitter
            if self._stop.wait(delay):
                break
        if self._gap is not None:
            # Recording stops here on purpose; the next start opens a new gap if the camera is
            # still down, so the ledger never holds a row nobody will close.
            self._close_gap(time.time())

    def _session(self, conn: _Connection, pending: GapCause | None) -> _Outcome:
        out = _Outcome()
        began = time.monotonic()
        try:
            container = conn.open()
        except (av.FFmpegError, OSError) as exc:
            out.cause, msg = classify_error(exc, streaming=False)
            if conn.interrupt_cause not in (None, "stopped"):
                out.cause = cast(GapCause, conn.interrupt_cause)  # the watchdog cut the open
                msg = f"no video within {self.config.startup_grace_seconds:.0f} s ({out.cause})"
            elif out.cause == "error" and time.monotonic() - began >= _SOCKET_TIMEOUT_S * 0.9:
                # FFmpeg reports a camera that accepts TCP but never answers RTSP as invalid
                # data once its socket timeout expires: that is a timeout.
                out.cause, msg = "timeout", f"no RTSP answer within {_SOCKET_TIMEOUT_S:.0f} s"
            self._note_error(msg, conn)
            return out
        try:
            if not self._stop.is_set():
                self._stream(conn, container, out, pending)
        except Exception as exc:  # our side failed (disk full, store, muxer): retry with backoff
            out.cause = "error"
            self._note_error(f"recording failed: {type(exc).__name__}: {exc}", conn)
            log.debug("%s: recording failure", self.camera_id, exc_info=True)
        finally:
            seg, self._segment = self._segment, None
            if seg is not None:
                self._finish_segment(seg)
            conn.close()
            if out.first_mono is not None:
                out.recorded_seconds = time.monotonic() - out.first_mono
            if self._connected:
                self._connected = False
                event = RecorderEvent(
                    "disconnected",
                    self.camera_id,
                    time.time(),
                    cause=out.cause,
                    detail=self._last_error or "",
                )
                self._emit(event)
        return out

    def _stream(
        self, conn: _Connection, container: Any, out: _Outcome, pending: GapCause | None
    ) -> None:
        if not container.streams.video:
            out.cause = "error"
            self._note_error("the stream has no video", conn)
            return
        stream = container.streams.video[0]
        codec = _CODECS.get(stream.codec_context.name)
        if codec is None:
            out.cause = "error"
            name = stream.codec_context.name
            self._note_error(f"codec {name} is not recorded (H.264/H.265 only)", conn)
            return
        self._codec = codec
        timeline = MediaTimeline(stream.time_base or Fraction(1, 90000), _fps_of(stream))
        place = timeline.place
        ctx = stream.codec_context
        extradata = bytes(ctx.extradata) if ctx.extradata else None
        sample_info = (ctx.name, extradata, ctx.width, ctx.height)
        # A keyframe due exactly at the segment length arrives a few ms early or late; without
        # slack, a camera whose GOP divides the segment length would cut a GOP late every time.
        segment_s = self.config.segment_seconds - min(0.5, self.config.fragment_seconds / 2)
        # This loop runs for every packet of every camera, all threads sharing one GIL: it is
        # kept to attribute reads and a few assignments (see docs/recording.md, Performance).
        next_packet = container.demux(stream).__next__
        now_wall, now_mono = time.time, time.monotonic
        wall = mono = 0.0
        while True:
            try:
                packet = next_packet()
            except StopIteration:
                out.cause = "eof"
                break
            except (av.FFmpegError, OSError) as exc:
                out.cause, msg = classify_error(exc, streaming=True)
                self._note_error(msg, conn)
                break
            size = packet.size
            if not size:
                continue
            if conn.interrupt_cause is None:
                wall = now_wall()
                mono = now_mono()
                self._last_packet_mono = mono
            elif not wall:
                continue  # interrupted before anything arrived: nothing to stamp it with
            # else: the socket was cut and FFmpeg is flushing its parser's last frame; it
            # arrived before the stall, so it keeps the previous packet's receipt time.
            self._packets += 1
            self._bytes_in += size
            if mono >= self._next_sample:
                self._samples.append((mono, self._packets, self._bytes_in))
                self._next_sample = mono + 1.0
            key = packet.is_keyframe
            pts, dts = place(packet.pts, packet.dts, wall)
            seg = self._segment
            if key:
                self._keep_keyframe(packet, wall, sample_info)  # before the muxer takes it
                if seg is not None and mono - seg.start_mono >= segment_s:
                    self._segment = None
                    self._finish_segment(seg)
                    seg = self._segment = _SegmentWriter(self, stream, codec, wall, dts)
            if seg is not None:
                seg.mux(packet, pts, dts, wall, key)
            elif key:  # (re)start recording: nothing decodes before a keyframe
                seg = self._segment = _SegmentWriter(self, stream, codec, wall, dts)
                seg.mux(packet, pts, dts, wall, key)
                out.first_mono = conn.first_key_mono = mono
                out.recorded = True
                self._connected = True
                self._emit(RecorderEvent("connected", self.camera_id, wall))
                if pending is not None:
                    self._open_gap(pending)  # the reconnect worked: the loss was the cause
                    pending = None
                self._close_gap(wall)
            else:
                continue
            self._last_recorded_wall = wall
            self._repairs = timeline.repairs
        if conn.interrupt_cause is not None and conn.interrupt_cause != "stopped":
            out.cause = conn.interrupt_cause
        if out.recorded and conn.interrupt_cause != "stopped":
            log.warning("%s: stream lost (%s)", self.camera_id, out.cause)

    # -- helpers (worker thread) -------------------------------------------------------------

    def _keep_keyframe(
        self, packet: Any, wall: float, info: tuple[str, bytes | None, int, int]
    ) -> None:
        """Publish the keyframe for image health: one copy of one packet per GOP; readers get
        the previous sample or this one whole (one attribute store, atomic under the GIL)."""
        self._keyframe_seq += 1
        codec, extradata, width, height = info
        sample = KeyframeSample(
            camera_id=self.camera_id,
            seq=self._keyframe_seq,
            codec=codec,
            extradata=extradata,
            data=bytes(packet),
            wall=wall,
            width=width,
            height=height,
        )
        with self._keyframe_changed:
            self._last_keyframe = sample
            self._keyframe_changed.notify_all()

    def _finish_segment(self, seg: _SegmentWriter) -> None:
        rec = seg.finish()
        self._segments += 1
        try:
            self.store.add_segment(rec)
        except Exception as exc:  # the file is on disk; reconcile indexes it at next start
            log.error("%s seq %d: could not index segment: %s", self.camera_id, rec.seq, exc)
        self._emit(RecorderEvent("segment", self.camera_id, rec.end, segment=rec))

    def _fragment_written(
        self, seg: _SegmentWriter, data: bytes, wall: float, key: bool, t0: float
    ) -> None:
        self._fragments += 1
        self._bytes_written += seg.sealer.bytes_written - seg.bytes_counted
        seg.bytes_counted = seg.sealer.bytes_written
        self._last_seal_ms = (time.perf_counter() - t0) * 1000
        self.tap._publish(seg.seq, seg.init, data, key, wall)

    def _open_gap(self, cause: GapCause) -> None:
        """Open a gap from the last recorded packet (or the recorder's start), unless open."""
        if self._gap is not None:
            return
        start = self._last_recorded_wall or self._started_wall
        gap_id: int | None = None
        try:
            gap_id = self.store.open_gap(self.camera_id, start, cause)
        except Exception as exc:
            log.error("%s: could not record gap in the ledger: %s", self.camera_id, exc)
        self._gap = GapInfo(gap_id, start, cause)
        log.warning("%s: recording gap since %.3f (%s)", self.camera_id, start, cause)
        self._emit(RecorderEvent("gap_opened", self.camera_id, start, cause=cause, gap_id=gap_id))

    def _close_gap(self, end: float) -> None:
        gap, self._gap = self._gap, None
        if gap is None:
            return
        if gap.gap_id is not None:
            try:
                self.store.close_gap(gap.gap_id, end)
            except Exception as exc:
                log.error("%s: could not close gap %s: %s", self.camera_id, gap.gap_id, exc)
        log.info(
            "%s: recording again after %.1f s (%s)", self.camera_id, end - gap.start, gap.cause
        )
        self._emit(
            RecorderEvent("gap_closed", self.camera_id, end, cause=gap.cause, gap_id=gap.gap_id)
        )

    def _note_error(self, message: str, conn: _Connection) -> None:
        if conn.interrupt_cause == "stopped":
            return
        if message != self._last_error:
            log.warning("%s: %s (%s)", self.camera_id, message, self._public_url)
        self._last_error = message

    def _emit(self, event: RecorderEvent) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            loop.call_soon_threadsafe(self._put_event, event)

    def _put_event(self, event: RecorderEvent) -> None:
        try:
            self.events.put_nowait(event)
        except asyncio.QueueFull:
            self._events_dropped += 1


@dataclass
class _Outcome:
    """How one session ended."""

    cause: GapCause = "error"
    recorded: bool = False  # at least one keyframe was recorded
    recorded_seconds: float = 0.0
    first_mono: float | None = None  # when its first keyframe was recorded


def segment_paths(data_dir: Path, camera_id: str) -> list[Path]:
    """Sealed segment files of a camera under DATA/segments, oldest first (tests, tools)."""
    return sorted((data_dir / "segments" / camera_id).glob("*/*.seg"))


# --------------------------------------------------------------------------------------------
# `python -m edge_agent.recorder`: record cameras without the rest of the agent (benchmarks,
# crash tests, field debugging). The daemon wires `CameraRecorder` up itself.


def _parse_args(argv: Sequence[str] | None) -> Any:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m edge_agent.recorder",
        description="Record RTSP cameras into sealed segments until SIGINT/SIGTERM.",
    )
    p.add_argument("cameras", nargs="+", metavar="CAMERA_ID=RTSP_URL")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--site", default="site-local", help="site id written into segment headers")
    p.add_argument(
        "--recipient",
        type=Path,
        action="append",
        required=True,
        help="public key file to seal to (repeatable)",
    )
    p.add_argument("--segment-seconds", type=float, default=60.0)
    p.add_argument("--fragment-seconds", type=float, default=1.0)
    p.add_argument(
        "--fsync-every",
        type=int,
        default=RecorderConfig.fsync_every_fragments,
        help="fdatasync every N fragments (0: only at segment end)",
    )
    p.add_argument(
        "--stats-interval",
        type=float,
        default=0.0,
        help="print one JSON line of stats per camera every N seconds (0: never)",
    )
    return p.parse_args(argv)


async def _record_main(args: Any) -> None:
    import json
    import signal
    from dataclasses import asdict

    from edge_agent.device_key import load_or_create_device_key
    from sitelink.sealed_segment import load_public_key

    args.data_dir.mkdir(parents=True, exist_ok=True)
    store = SegmentStore(
        args.data_dir, load_or_create_device_key(args.data_dir / "device_key.pem"), args.site
    )
    recipients = [load_public_key(p) for p in args.recipient]
    config = RecorderConfig(
        segment_seconds=args.segment_seconds,
        fragment_seconds=args.fragment_seconds,
        fsync_every_fragments=args.fsync_every,
    )
    recorders = []
    for spec in args.cameras:
        camera_id, sep, url = spec.partition("=")
        if not sep:
            raise SystemExit(f"camera {spec!r}: write it as CAMERA_ID=rtsp://…")
        recorders.append(CameraRecorder(camera_id, url, store, recipients, config))
    tasks = [asyncio.create_task(r.run()) for r in recorders]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"event": "recording", "cameras": len(recorders)}), flush=True)
    while not stop.is_set():
        interval = args.stats_interval or 3600.0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        if args.stats_interval:
            for r in recorders:
                print(json.dumps({"event": "stats", **asdict(r.stats())}), flush=True)
    await asyncio.gather(*(r.stop() for r in recorders))
    await asyncio.gather(*tasks)
    store.close()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m edge_agent.recorder``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(_record_main(_parse_args(argv)))


if __name__ == "__main__":
    main()
