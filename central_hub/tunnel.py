"""The hub side of the viewing tunnel: tokens, the edge's WebSocket endpoint, and the calls the
viewing layer makes (live, list, fetch, snapshot), multiplexed over tunnels the edges dial.

The hub never dials an edge box (it sits behind NAT). When the viewing layer asks for something
of a camera and no tunnel for it is open, `TunnelBroker`

1. issues a one-time token bound to (site, camera, purpose, this hub instance's URL, expiry),
2. hands `send_command(site_id, OpenTunnel)` the command to publish over MQTT,
3. waits (`open_timeout`) for the edge to dial `handle` (mounted at `/edge/tunnel`), where the
   hello is checked — token known, unused, unexpired, bound to what the hello claims; hello
   signed by the site's registered device key over this connection's nonce — and
4. sends its requests over the tunnel, which then stays open while used and closes after
   `idle_seconds` without use (the edge has its own, longer, idle timer as a backstop).

A tunnel is keyed by (site, camera, purpose) and only ever serves that key: a token for site A
cannot authenticate a box of site B (the token binds the site, the signature binds its key),
and the edge serves only the hello's camera and purpose.

Live view is shared: every viewer of a camera reads the same upstream (`LiveStream`s fed from
one live request); a viewer that joins gets the fragments since the last keyframe at once.
A viewer too slow to keep up loses fragments up to the next keyframe, never the others.
Playback (`list_segments`, `fetch_segment`) returns the index and the sealed bytes; the
viewing layer opens them in memory with the viewing key. Snapshots are coalesced and cached
per camera for `snapshot_interval` — the rate limit that protects the site's uplink.

`revoke(site=..., user=..., session=...)` ends, at once, every stream and call that matches
(queued fragments are dropped); revoking a whole site also closes its tunnels.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import inspect
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import TypeAdapter, ValidationError

from sitelink.messages import CameraId, HubUrl, OpenTunnel, OpenTunnelArgs, Purpose
from sitelink.topics import is_valid_site_id
from sitelink.tunnel import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_PROTOCOL,
    CLOSE_REFUSED,
    CLOSE_REVOKED,
    CLOSE_TIMEOUT,
    MAX_FRAME_BYTES,
    MAX_LIST_SEGMENTS,
    MAX_LIST_SPAN_SECONDS,
    MAX_REQUESTS_PER_TUNNEL,
    MAX_SEGMENT_BYTES,
    OPS_BY_PURPOSE,
    REFUSAL_REASONS,
    SUBPROTOCOL,
    Cancel,
    Challenge,
    ChunkFrame,
    ErrorReply,
    FetchDone,
    FetchReply,
    FetchRequest,
    FragmentFrame,
    Frame,
    GapInfo,
    Hello,
    InitFrame,
    ListReply,
    ListRequest,
    LiveEnd,
    LiveReply,
    LiveRequest,
    RefusalReason,
    Refused,
    SegmentInfo,
    SnapshotFrame,
    SnapshotReply,
    SnapshotRequest,
    TunnelError,
    TunnelProtocolError,
    TunnelRefused,
    TunnelUnavailable,
    Welcome,
    decode_edge_message,
    decode_frame,
    encode_message,
    expect,
    new_nonce,
    public_key_id,
    token_digest,
    verify_hello,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DeviceKeyLookup = Callable[[str], Ed25519PublicKey | Awaitable[Ed25519PublicKey | None] | None]
SendCommand = Callable[[str, OpenTunnel], Awaitable[None]]
UserRef = int | str

#: WebSocket pings; a dead edge (or NAT mapping) is noticed within ~2x this.
HEARTBEAT_SECONDS = 20.0
#: Fragments kept for a viewer that joins (since the last keyframe), at most this many bytes.
_GOP_CACHE_BYTES = 32 * 1024 * 1024
#: Segments one `list_segments` call returns at most (a month at one per minute is 43,200).
MAX_LISTED_SEGMENTS = 100_000

_HUB_URL: TypeAdapter[str] = TypeAdapter(HubUrl)
_CAMERA_ID: TypeAdapter[str] = TypeAdapter(CameraId)


class TunnelRevoked(TunnelError):
    """Access was revoked while the stream or call was running; it ended at once."""


class RemoteError(TunnelError):
    """The edge answered with an error; `reason` is its code (`sitelink.tunnel.ERROR_CODES`)."""


class SegmentMismatch(TunnelError):
    """The fetched file does not match its index row (size or SHA-256): altered or damaged at
    the edge. Tamper evidence, not a transport fault."""


@dataclass(frozen=True, slots=True)
class TunnelFragment:
    """One live fragment as a viewer gets it. `init` is the init segment it needs (the same
    object until it changes); `seq` +1 per fragment, a jump means fragments were skipped and
    then `keyframe` is true; `wall` is when the edge received its first packet, `received`
    when the hub got it (both UNIX s)."""

    seq: int
    segment_seq: int
    keyframe: bool
    wall: float
    init: bytes
    data: bytes
    received: float


@dataclass(frozen=True)
class SegmentListing:
    """Segments (chain order) and recording gaps of a camera over a time range."""

    segments: tuple[SegmentInfo, ...]
    gaps: tuple[GapInfo, ...]
    gaps_truncated: bool = False


@dataclass
class _Grant:
    """An issued token (by its SHA-256) and what it is good for."""

    site: str
    camera: str
    purpose: Purpose
    hub_url: str
    expires: float
    used: bool = False

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.site, self.camera, self.purpose)


@dataclass(eq=False)
class _Watch:
    """A revocable call: who made it, about what; `revoked` resolves when it must end."""

    site: str
    camera: str
    user: UserRef | None
    session: str | None
    #: resolves with the error the call ends with (TunnelRevoked, or the broker closing)
    revoked: asyncio.Future[TunnelError] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


# --------------------------------------------------------------------------------------------
# Live streams


class LiveStream:
    """One viewer's live stream: ``async for fragment in stream``.

    Raises TunnelRevoked the moment access is revoked (queued fragments are dropped) and
    TunnelUnavailable when the upstream ends (after the queued fragments). A viewer that falls
    `max_queue` fragments behind loses them and resumes at the next keyframe (`dropped`).
    """

    def __init__(
        self, site: str, camera: str, user: UserRef | None, session: str | None, max_queue: int
    ) -> None:
        self.site = site
        self.camera = camera
        self.user = user
        self.session = session
        self.delivered = 0
        self.dropped = 0
        self._max_queue = max_queue
        self._queue: collections.deque[TunnelFragment] = collections.deque()
        self._wakeup = asyncio.Event()
        self._error: TunnelError | None = None
        self._need_key = True
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __aiter__(self) -> LiveStream:
        return self

    async def __anext__(self) -> TunnelFragment:
        while True:
            if self._error is not None and isinstance(self._error, TunnelRevoked):
                raise self._error
            if self._queue:
                self.delivered += 1
                return self._queue.popleft()
            if self._error is not None:
                raise self._error
            self._wakeup.clear()
            await self._wakeup.wait()

    def _offer(self, fragment: TunnelFragment) -> None:
        if self._error is not None:
            return
        if len(self._queue) >= self._max_queue:
            self.dropped += len(self._queue)
            self._queue.clear()
            self._need_key = True
        if self._need_key and not fragment.keyframe:
            self.dropped += 1
            return
        self._need_key = False
        self._queue.append(fragment)
        self._wakeup.set()

    def _end(self, error: TunnelError) -> None:
        if self._error is None:
            self._error = error
            if isinstance(error, TunnelRevoked):
                self._queue.clear()
        self._wakeup.set()
        if not self.ended.done():
            self.ended.set_result(None)


class _Upstream:
    """The one live request per (site, camera) that every `LiveStream` of it reads."""

    def __init__(self, broker: TunnelBroker, site: str, camera: str) -> None:
        self.broker = broker
        self.site = site
        self.camera = camera
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.ready.add_done_callback(_retrieve)
        self.streams: set[LiveStream] = set()
        self.finished = False
        self._gop: list[TunnelFragment] = []
        self._gop_bytes = 0
        self._task = loop.create_task(self._run(), name=f"live-{site}-{camera}")

    def add(self, stream: LiveStream) -> None:
        self.streams.add(stream)
        for fragment in self._gop:
            stream._offer(fragment)

    def remove(self, stream: LiveStream) -> None:
        self.streams.discard(stream)
        if not self.streams and not self.finished:
            self.finished = True  # nobody left: stop now; a new viewer starts a new upstream
            self.broker._upstream_done(self)
            self._task.cancel()

    def on_fragment(self, fragment: TunnelFragment) -> None:
        size = len(fragment.data)
        if fragment.keyframe:
            self._gop, self._gop_bytes = [fragment], size
        elif self._gop and self._gop_bytes + size <= _GOP_CACHE_BYTES:
            self._gop.append(fragment)
            self._gop_bytes += size
        else:  # a GOP too long to cache: a viewer joining now waits for the next keyframe
            self._gop, self._gop_bytes = [], 0
        for stream in list(self.streams):
            stream._offer(fragment)

    async def _run(self) -> None:
        error: TunnelError = TunnelUnavailable("stopped", "the live stream was stopped")
        try:
            tunnel = await self.broker._tunnel(self.site, self.camera, "live")
            call = _LiveCall(self)
            async with tunnel.slot():
                try:
                    try:
                        async with asyncio.timeout(self.broker.request_timeout):
                            await tunnel.send(call, lambda rid: LiveRequest(id=rid))
                            await call.accepted
                    except TimeoutError:
                        raise TunnelUnavailable(
                            "timeout", "the edge did not start the live stream in time"
                        ) from None
                    if not self.ready.done():
                        self.ready.set_result(None)
                    reason = await call.ended
                    error = TunnelUnavailable("live_ended", f"the edge ended the stream ({reason})")
                finally:
                    tunnel.abandon(call)
        except TunnelError as exc:
            error = exc
        except asyncio.CancelledError:
            pass
        finally:
            self.finished = True
            self.broker._upstream_done(self)
            if not self.ready.done():
                self.ready.set_exception(error)
            for stream in list(self.streams):
                stream._end(error)


# --------------------------------------------------------------------------------------------
# Requests in flight on a tunnel


class _Pending:
    """A request the hub sent; the tunnel's reader feeds it the edge's replies and frames."""

    op: str = ""
    streams = False  # the edge keeps sending after its reply (cancel it when abandoned)

    def __init__(self) -> None:
        self.request_id = 0
        self.result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.result.add_done_callback(_retrieve)
        self.on_progress: Callable[[], None] = _nothing

    def on_reply(self, message: Any) -> bool:
        """Handle a reply; True when the request is complete."""
        if isinstance(message, ErrorReply):
            self.fail(RemoteError(message.code, f"the edge refused {self.op}: {message.message}"))
            return True
        raise TunnelProtocolError("unexpected", f"a {message.type} reply to a {self.op} request")

    def on_frame(self, frame: Frame) -> bool:
        """Handle a binary frame; True when the request is complete."""
        raise TunnelProtocolError(
            "unexpected", f"a {type(frame).__name__} frame for a {self.op} request"
        )

    def fail(self, error: TunnelError) -> None:
        if not self.result.done():
            self.result.set_exception(error)


class _ListCall(_Pending):
    op = "list"

    def __init__(self, after_seq: int | None) -> None:
        super().__init__()
        self.after_seq = after_seq or 0

    def on_reply(self, message: Any) -> bool:
        if not isinstance(message, ListReply):
            return super().on_reply(message)
        previous = self.after_seq
        for segment in message.segments:
            if segment.seq <= previous:
                raise TunnelProtocolError("schema", "list_reply segments are not in seq order")
            previous = segment.seq
        self.result.set_result(message)
        return True


class _FetchCall(_Pending):
    op = "fetch"
    streams = True

    def __init__(self, seq: int) -> None:
        super().__init__()
        self.seq = seq
        self.reply: FetchReply | None = None
        self.buffer = bytearray()

    def on_reply(self, message: Any) -> bool:
        if isinstance(message, FetchReply) and self.reply is None:
            if message.seq != self.seq:
                raise TunnelProtocolError("schema", "fetch_reply names another segment")
            self.reply = message
            self.on_progress()
            return False
        if isinstance(message, FetchDone) and self.reply is not None:
            size = len(self.buffer)
            if message.size != size:
                raise TunnelProtocolError(
                    "schema", f"fetch_done says {message.size} bytes; {size} arrived"
                )
            # size != reply.size: the file shrank while the edge read it; the index check below
            # reports it (the file no longer matches its row).
            digest = hashlib.sha256(self.buffer).hexdigest()
            if digest != message.sha256:
                raise TunnelProtocolError("schema", "fetched bytes do not match fetch_done's hash")
            if digest != self.reply.index_sha256 or size != self.reply.index_bytes:
                self.fail(
                    SegmentMismatch(
                        "mismatch",
                        f"segment {self.seq}: the file ({size} bytes, sha256 {digest[:16]}…) "
                        f"does not match its index row ({self.reply.index_bytes} bytes, "
                        f"sha256 {self.reply.index_sha256[:16]}…)",
                    )
                )
            else:
                self.result.set_result(bytes(self.buffer))
            return True
        if self.reply is None:
            return super().on_reply(message)
        raise TunnelProtocolError("unexpected", f"a {message.type} message during a fetch")

    def on_frame(self, frame: Frame) -> bool:
        if not isinstance(frame, ChunkFrame) or self.reply is None:
            return super().on_frame(frame)
        if frame.offset != len(self.buffer):
            raise TunnelProtocolError(
                "bad_frame", f"chunk at offset {frame.offset}, expected {len(self.buffer)}"
            )
        if len(self.buffer) + len(frame.data) > self.reply.size:
            raise TunnelProtocolError("too_large", "chunks exceed the announced size")
        self.buffer += frame.data
        self.on_progress()
        return False


class _SnapshotCall(_Pending):
    op = "snapshot"

    def __init__(self) -> None:
        super().__init__()
        self.size: int | None = None

    def on_reply(self, message: Any) -> bool:
        if isinstance(message, SnapshotReply) and self.size is None:
            self.size = message.size
            return False
        if self.size is None:
            return super().on_reply(message)
        raise TunnelProtocolError("unexpected", f"a {message.type} message during a snapshot")

    def on_frame(self, frame: Frame) -> bool:
        if not isinstance(frame, SnapshotFrame) or self.size is None:
            return super().on_frame(frame)
        if len(frame.data) != self.size:
            raise TunnelProtocolError("bad_frame", "snapshot size differs from its reply")
        self.result.set_result(frame.data)
        return True


class _LiveCall(_Pending):
    op = "live"
    streams = True

    def __init__(self, upstream: _Upstream) -> None:
        super().__init__()
        self.upstream = upstream
        loop = asyncio.get_running_loop()
        self.accepted = self.result  # resolves on live_reply
        self.ended: asyncio.Future[str] = loop.create_future()
        self.ended.add_done_callback(_retrieve)
        self.init: bytes | None = None
        self.last_seq = 0

    def on_reply(self, message: Any) -> bool:
        if isinstance(message, LiveReply) and not self.accepted.done():
            self.accepted.set_result(None)
            return False
        if isinstance(message, LiveEnd) and self.accepted.done():
            if not self.ended.done():
                self.ended.set_result(message.reason)
            return True
        if not self.accepted.done():
            return super().on_reply(message)
        raise TunnelProtocolError("unexpected", f"a {message.type} message during a live stream")

    def on_frame(self, frame: Frame) -> bool:
        if not self.accepted.done():
            return super().on_frame(frame)
        if isinstance(frame, InitFrame):
            self.init = frame.data
            return False
        if not isinstance(frame, FragmentFrame):
            return super().on_frame(frame)
        if self.init is None:
            raise TunnelProtocolError("bad_frame", "a fragment before its init segment")
        if frame.seq <= self.last_seq:
            raise TunnelProtocolError("bad_frame", "fragment seqs must increase")
        if frame.seq != self.last_seq + 1 and not frame.keyframe:
            raise TunnelProtocolError(
                "bad_frame", "the first fragment, and one after a skip, must start with a keyframe"
            )
        self.last_seq = frame.seq
        self.upstream.on_fragment(
            TunnelFragment(
                seq=frame.seq,
                segment_seq=frame.segment_seq,
                keyframe=frame.keyframe,
                wall=frame.wall,
                init=self.init,
                data=frame.data,
                received=time.time(),
            )
        )
        return False

    def fail(self, error: TunnelError) -> None:
        super().fail(error)
        if not self.ended.done():
            self.ended.set_exception(error)


# --------------------------------------------------------------------------------------------
# One tunnel


class _HubTunnel:
    """An authenticated edge connection for one (site, camera, purpose)."""

    def __init__(
        self,
        broker: TunnelBroker,
        ws: web.WebSocketResponse,
        grant: _Grant,
        tunnel_id: str,
        peer: str,
    ) -> None:
        self.broker = broker
        self.ws = ws
        self.site = grant.site
        self.camera = grant.camera
        self.purpose = grant.purpose
        self.key = grant.key
        self.tunnel_id = tunnel_id
        self.peer = peer
        self.opened = time.time()
        self.closed = False
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        self._slots = asyncio.Semaphore(MAX_REQUESTS_PER_TUNNEL)
        self._users = 0
        self._idle_handle: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.frames_in = 0
        self.bytes_in = 0
        self._arm_idle()

    # -- use ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold the tunnel open (no idle close) and one of its request slots."""
        self._users += 1
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        try:
            async with self._slots:
                if self.closed:
                    raise TunnelUnavailable("closed", "the tunnel closed")
                yield
        finally:
            self._users -= 1
            if self._users == 0:
                self._arm_idle()

    async def send(self, pending: _Pending, build: Callable[[int], Any]) -> None:
        if self.closed:
            raise TunnelUnavailable("closed", "the tunnel closed")
        if pending.op not in OPS_BY_PURPOSE[self.purpose]:
            raise ValueError(f"a {self.purpose} tunnel does not carry {pending.op}")
        self._next_id += 1
        pending.request_id = self._next_id
        self._pending[pending.request_id] = pending
        self.broker.counters[f"requests.{pending.op}"] += 1
        try:
            await self.ws.send_str(encode_message(build(pending.request_id)))
        except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
            self._pending.pop(pending.request_id, None)
            raise TunnelUnavailable("closed", f"the tunnel closed ({exc})") from None

    def abandon(self, pending: _Pending) -> None:
        """Forget a request the caller no longer waits for; tell the edge to stop a stream."""
        if self._pending.pop(pending.request_id, None) is None:
            return
        pending.fail(TunnelUnavailable("cancelled", "the request was cancelled"))
        if pending.streams and not self.closed:
            self._spawn(self._send_cancel(pending.request_id))

    async def _send_cancel(self, request_id: int) -> None:
        with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
            await self.ws.send_str(encode_message(Cancel(id=request_id)))

    # -- reading -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Read the edge's replies and frames until the tunnel closes."""
        error: TunnelError = TunnelUnavailable("closed", "the edge closed the tunnel")
        try:
            async for msg in self.ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    self.frames_in += 1
                    self.bytes_in += len(msg.data)
                    self._dispatch_frame(decode_frame(msg.data))
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    self._dispatch_reply(decode_edge_message(msg.data))
                else:  # ERROR: oversized or broken frame (aiohttp closes with 1009/1002)
                    raise TunnelProtocolError("bad_frame", f"unreadable frame: {msg.data}")
        except TunnelProtocolError as exc:
            error = exc
            self.broker.counters[f"protocol_error.{exc.reason}"] += 1
            log.warning(
                "tunnel %s (%s %s %s from %s): protocol error, closing: %s",
                self.tunnel_id,
                self.site,
                self.camera,
                self.purpose,
                self.peer,
                exc,
            )
            await self.close(CLOSE_PROTOCOL, f"protocol error: {exc.reason}")
        finally:
            self.closed = True
            self._cancel_idle()
            pending, self._pending = self._pending, {}
            for p in pending.values():
                p.fail(error)
            self.broker._tunnel_done(self)
            log.info(
                "tunnel %s (%s %s %s) closed: %d frames, %d bytes in %.0f s",
                self.tunnel_id,
                self.site,
                self.camera,
                self.purpose,
                self.frames_in,
                self.bytes_in,
                time.time() - self.opened,
            )

    def _dispatch_reply(self, message: Any) -> None:
        if isinstance(message, Hello):
            raise TunnelProtocolError("unexpected", "a second hello")
        pending = self._find(message.id)
        if pending is not None and pending.on_reply(message):
            self._pending.pop(message.id, None)

    def _dispatch_frame(self, frame: Frame) -> None:
        pending = self._find(frame.request_id)
        if pending is not None and pending.on_frame(frame):
            self._pending.pop(frame.request_id, None)

    def _find(self, request_id: int) -> _Pending | None:
        pending = self._pending.get(request_id)
        if pending is None and request_id > self._next_id:
            raise TunnelProtocolError(
                "unexpected", f"an answer to request {request_id}, never sent"
            )
        return pending  # None: a late answer to a request we abandoned; dropped

    # -- closing -----------------------------------------------------------------------------

    async def close(self, code: int, reason: str) -> None:
        self.closed = True
        self._cancel_idle()
        if not self.ws.closed:
            with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
                await self.ws.close(code=code, message=reason.encode()[:120])

    def close_soon(self, code: int, reason: str) -> None:
        self.closed = True
        self._spawn(self.close(code, reason))

    def _arm_idle(self) -> None:
        if self._idle_handle is None and not self.closed:
            loop = asyncio.get_running_loop()
            self._idle_handle = loop.call_later(self.broker.idle_seconds, self._on_idle)

    def _cancel_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def _on_idle(self) -> None:
        self._idle_handle = None
        if self._users == 0 and not self.closed:
            log.info("tunnel %s idle: closing", self.tunnel_id)
            self.close_soon(CLOSE_NORMAL, "idle")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


# --------------------------------------------------------------------------------------------
# The broker


class TunnelBroker:
    """Everything about tunnels on one hub instance; see the module docstring.

    `hub_url` is this instance's tunnel endpoint as edges dial it (``wss://hub-2.example/
    edge/tunnel``); `device_key_for(site_id)` returns the site's registered Ed25519 public key
    (or None: unknown or disabled site), sync or async. Use it from one event loop.
    """

    def __init__(
        self,
        *,
        hub_url: str,
        send_command: SendCommand,
        device_key_for: DeviceKeyLookup,
        token_seconds: float = 30.0,
        open_timeout: float = 20.0,
        hello_timeout: float = 10.0,
        idle_seconds: float = 20.0,
        request_timeout: float = 30.0,
        snapshot_interval: float = 2.0,
        viewer_queue: int = 64,
        list_page: int = MAX_LIST_SEGMENTS,
    ) -> None:
        try:
            self.hub_url = _HUB_URL.validate_python(hub_url)
        except ValidationError as exc:
            raise ValueError(f"hub_url: {exc.errors()[0]['msg']}") from None
        if min(token_seconds, open_timeout, hello_timeout, idle_seconds, request_timeout) <= 0:
            raise ValueError("timeouts must be > 0")
        if viewer_queue < 2:
            raise ValueError("viewer_queue must be >= 2")
        if not 1 <= list_page <= MAX_LIST_SEGMENTS:
            raise ValueError(f"list_page must be 1-{MAX_LIST_SEGMENTS}")
        self._send_command = send_command
        self._device_key_for = device_key_for
        self.token_seconds = token_seconds
        self.open_timeout = open_timeout
        self.hello_timeout = hello_timeout
        self.idle_seconds = idle_seconds
        self.request_timeout = request_timeout
        self.snapshot_interval = snapshot_interval
        self.viewer_queue = viewer_queue
        #: segments asked for per `list` request (pages follow until the range is complete)
        self.list_page = list_page
        self.counters: collections.Counter[str] = collections.Counter()
        self._grants: dict[str, _Grant] = {}
        self._opening: dict[tuple[str, str, str], asyncio.Future[_HubTunnel]] = {}
        self._tunnels: dict[tuple[str, str, str], _HubTunnel] = {}
        self._all_tunnels: set[_HubTunnel] = set()
        self._upstreams: dict[tuple[str, str], _Upstream] = {}
        self._streams: set[LiveStream] = set()
        self._watches: set[_Watch] = set()
        self._snapshots: dict[tuple[str, str], tuple[float, bytes]] = {}
        self._snapshot_calls: dict[tuple[str, str], asyncio.Future[bytes]] = {}
        self._closed = False

    # -- tokens and commands -----------------------------------------------------------------

    def issue(self, site: str, camera: str, purpose: Purpose) -> OpenTunnel:
        """A fresh one-time token for (site, camera, purpose) on this hub instance, as the
        `open_tunnel` command that carries it to the edge."""
        _check_target(site, camera)
        now = time.time()
        for digest in [d for d, g in self._grants.items() if g.expires < now - 600]:
            del self._grants[digest]  # used or expired ten minutes ago: "unknown" from now on
        token = secrets.token_urlsafe(32)
        expires = now + self.token_seconds
        args = OpenTunnelArgs(
            hub_url=self.hub_url, token=token, camera=camera, purpose=purpose, expires=expires
        )
        self._grants[token_digest(token)] = _Grant(site, camera, purpose, self.hub_url, expires)
        return OpenTunnel(id=uuid.uuid4().hex, ts=now, args=args)

    async def _tunnel(self, site: str, camera: str, purpose: Purpose) -> _HubTunnel:
        """An open tunnel for the key: an idle one, one being opened, or a new one."""
        key = (site, camera, purpose)
        tunnel = self._tunnels.get(key)
        if tunnel is not None and not tunnel.closed:
            return tunnel
        if self._closed:
            raise TunnelUnavailable("closed", "the tunnel broker is shut down")
        future = self._opening.get(key)
        if future is None:
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            future.add_done_callback(_retrieve)
            self._opening[key] = future
            command = self.issue(site, camera, purpose)
            timer = loop.call_later(
                self.open_timeout,
                self._open_failed,
                key,
                future,
                TunnelUnavailable(
                    "no_tunnel",
                    f"site {site} did not open a tunnel within {self.open_timeout:.0f} s "
                    "(offline, or cannot reach this hub)",
                ),
            )
            future.add_done_callback(lambda _f: timer.cancel())
            self.counters["commands"] += 1
            try:
                await self._send_command(site, command)
            except Exception as exc:
                log.warning("open_tunnel to %s could not be sent: %s", site, exc)
                self._open_failed(
                    key, future, TunnelUnavailable("command_failed", f"open_tunnel not sent: {exc}")
                )
        return await asyncio.shield(future)

    def _open_failed(
        self, key: tuple[str, str, str], future: asyncio.Future[_HubTunnel], error: TunnelError
    ) -> None:
        if self._opening.get(key) is future:
            del self._opening[key]
        if not future.done():
            future.set_exception(error)

    # -- the edge's endpoint -----------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """aiohttp handler for edges dialing in: ``app.router.add_get("/edge/tunnel",
        broker.handle)``. Needs no user session: the token and the device key authenticate."""
        ws = web.WebSocketResponse(
            protocols=(SUBPROTOCOL,),
            max_msg_size=MAX_FRAME_BYTES,
            compress=False,  # video does not compress; frames stay atomic without the lock
            heartbeat=HEARTBEAT_SECONDS,
        )
        if not ws.can_prepare(request).ok:
            return web.Response(status=400, text="WebSocket endpoint for edge boxes\n")
        await ws.prepare(request)
        if self._closed:
            await ws.close(code=CLOSE_GOING_AWAY, message=b"hub shutting down")
            return ws
        peer = request.remote or "?"
        if ws.ws_protocol != SUBPROTOCOL:
            await ws.close(code=CLOSE_PROTOCOL, message=f"subprotocol {SUBPROTOCOL}".encode())
            return ws
        nonce = new_nonce()
        await ws.send_str(encode_message(Challenge(nonce=nonce, hub_time=time.time())))
        try:
            msg = await ws.receive(timeout=self.hello_timeout)
        except TimeoutError:
            self.counters["refused.timeout"] += 1
            await ws.close(code=CLOSE_TIMEOUT, message=b"no hello")
            return ws
        if msg.type != aiohttp.WSMsgType.TEXT:
            await self._refuse(ws, peer, None, None, "bad_hello", "the hello must be a text frame")
            return ws
        try:
            hello = expect(decode_edge_message(msg.data), Hello)
        except TunnelProtocolError as exc:
            await self._refuse(ws, peer, None, None, "bad_hello", str(exc))
            return ws
        grant, refusal, why = await self._authenticate(hello, nonce)
        if grant is None or refusal is not None:
            await self._refuse(ws, peer, hello, grant, refusal or "unknown_token", why)
            return ws
        tunnel = _HubTunnel(self, ws, grant, secrets.token_urlsafe(12), peer)
        try:
            await ws.send_str(
                encode_message(Welcome(tunnel_id=tunnel.tunnel_id, idle_seconds=self.idle_seconds))
            )
        except (ConnectionError, RuntimeError):
            return ws
        self.counters["tunnels"] += 1
        self._all_tunnels.add(tunnel)
        self._tunnels[grant.key] = tunnel
        future = self._opening.pop(grant.key, None)
        if future is not None and not future.done():
            future.set_result(tunnel)
        log.info(
            "tunnel %s open: site %s camera %s %s from %s",
            tunnel.tunnel_id,
            grant.site,
            grant.camera,
            grant.purpose,
            peer,
        )
        await tunnel.run()
        return ws

    async def _authenticate(
        self, hello: Hello, nonce: str
    ) -> tuple[_Grant | None, RefusalReason | None, str]:
        """(grant, None, "") if the hello is good; else the refusal reason and why."""
        grant = self._grants.get(token_digest(hello.token))
        if grant is None:
            return None, "unknown_token", "this hub instance did not issue that token"
        if grant.used:
            return grant, "token_used", "the token was already used"
        grant.used = True  # one presentation, whatever its outcome
        if time.time() > grant.expires:
            return grant, "token_expired", "the token expired"
        if (hello.site, hello.camera, hello.purpose) != grant.key:
            return grant, "token_mismatch", "the token was issued for another site/camera/purpose"
        if hello.hub_url != grant.hub_url:
            return grant, "wrong_hub", "the token was issued for another hub URL"
        if not secrets.compare_digest(hello.nonce, nonce):
            return grant, "bad_nonce", "the hello does not answer this connection's challenge"
        try:
            found = self._device_key_for(hello.site)
            key = await found if inspect.isawaitable(found) else found
        except Exception:
            log.exception("device key lookup for %s failed", hello.site)
            key = None
        if key is None:
            return grant, "unknown_site", f"no device key registered for site {hello.site}"
        if public_key_id(key) != hello.key_id:
            return grant, "wrong_key", f"site {hello.site} is registered with another device key"
        if not verify_hello(key, hello):
            return grant, "bad_signature", "the device-key signature does not verify"
        return grant, None, ""

    async def _refuse(
        self,
        ws: web.WebSocketResponse,
        peer: str,
        hello: Hello | None,
        grant: _Grant | None,
        reason: RefusalReason,
        why: str,
    ) -> None:
        self.counters[f"refused.{reason}"] += 1
        claimed = f"site {hello.site} camera {hello.camera} {hello.purpose}" if hello else "?"
        log.warning("tunnel refused (%s) from %s, claiming %s: %s", reason, peer, claimed, why)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str(encode_message(Refused(reason=reason, message=why[:1000])))
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.close(code=CLOSE_REFUSED, message=reason.encode())
        if grant is not None:
            # Whoever waits for this tunnel learns why it will not come.
            future = self._opening.get(grant.key)
            if future is not None and reason != "token_used":
                self._open_failed(
                    grant.key,
                    future,
                    TunnelRefused(
                        reason, f"the edge's tunnel was refused: {REFUSAL_REASONS[reason]}"
                    ),
                )

    def _tunnel_done(self, tunnel: _HubTunnel) -> None:
        self._all_tunnels.discard(tunnel)
        if self._tunnels.get(tunnel.key) is tunnel:
            del self._tunnels[tunnel.key]

    # -- live --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def live(
        self,
        site: str,
        camera: str,
        *,
        user: UserRef | None = None,
        session: str | None = None,
    ) -> AsyncIterator[LiveStream]:
        """A live stream of the camera, shared with every other viewer of it. Entering waits
        until the upstream delivers (the first viewer opens the tunnel) or raises
        TunnelError; leaving as the last viewer stops the upstream and lets the tunnel idle."""
        _check_target(site, camera)
        if self._closed:
            raise TunnelUnavailable("closed", "the tunnel broker is shut down")
        upstream = self._upstreams.get((site, camera))
        if upstream is None or upstream.finished:
            upstream = _Upstream(self, site, camera)
            self._upstreams[(site, camera)] = upstream
        stream = LiveStream(site, camera, user, session, self.viewer_queue)
        upstream.add(stream)
        self._streams.add(stream)
        try:
            await asyncio.wait({upstream.ready, stream.ended}, return_when=asyncio.FIRST_COMPLETED)
            if stream._error is not None and isinstance(stream._error, TunnelRevoked):
                raise stream._error
            upstream.ready.result()  # raises the upstream's failure
            yield stream
        finally:
            self._streams.discard(stream)
            upstream.remove(stream)

    def _upstream_done(self, upstream: _Upstream) -> None:
        key = (upstream.site, upstream.camera)
        if self._upstreams.get(key) is upstream:
            del self._upstreams[key]

    # -- playback ----------------------------------------------------------------------------

    async def list_segments(
        self,
        site: str,
        camera: str,
        start: float,
        end: float,
        *,
        user: UserRef | None = None,
        session: str | None = None,
    ) -> SegmentListing:
        """Segments and gaps of the camera overlapping [start, end] (UNIX s), from the edge's
        index; pages are fetched until the range is complete (at most MAX_LISTED_SEGMENTS)."""
        _check_target(site, camera)
        start, end = float(start), float(end)
        if not start <= end or end - start > MAX_LIST_SPAN_SECONDS:
            raise ValueError("need start <= end and a range of at most 400 days")

        async def pages() -> SegmentListing:
            segments: list[SegmentInfo] = []
            gaps: tuple[GapInfo, ...] = ()
            gaps_truncated = False
            after: int | None = None
            while True:
                call = _ListCall(after)
                build = functools.partial(
                    _list_request, start=start, end=end, after_seq=after, limit=self.list_page
                )
                page: ListReply = await self._request(site, camera, "playback", call, build)
                if after is None:
                    gaps, gaps_truncated = tuple(page.gaps), page.gaps_truncated
                segments.extend(page.segments)
                if not page.truncated or not page.segments:
                    break
                if len(segments) >= MAX_LISTED_SEGMENTS:
                    raise RemoteError("too_large", "more than MAX_LISTED_SEGMENTS segments")
                after = page.segments[-1].seq
            return SegmentListing(tuple(segments), gaps, gaps_truncated)

        return await self._guarded(site, camera, user, session, pages())

    async def fetch_segment(
        self,
        site: str,
        camera: str,
        seq: int,
        *,
        user: UserRef | None = None,
        session: str | None = None,
    ) -> bytes:
        """The sealed bytes of one segment file, checked against the edge's index row
        (SegmentMismatch if they differ). Open them with `sitelink.sealed_segment` in memory."""
        _check_target(site, camera)
        if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq <= 2**53 - 1:
            raise ValueError("seq must be a positive integer")
        call = _FetchCall(seq)
        coro = self._request(
            site, camera, "playback", call, lambda rid: FetchRequest(id=rid, seq=seq)
        )
        data: bytes = await self._guarded(site, camera, user, session, coro)
        if len(data) > MAX_SEGMENT_BYTES:  # pragma: no cover - bounded by the protocol checks
            raise RemoteError("too_large", "segment over the size limit")
        return data

    # -- snapshots ---------------------------------------------------------------------------

    async def snapshot(
        self,
        site: str,
        camera: str,
        *,
        user: UserRef | None = None,
        session: str | None = None,
    ) -> bytes:
        """A JPEG of the camera. Calls for the same camera share one request, and a snapshot
        younger than `snapshot_interval` is answered from memory."""
        _check_target(site, camera)
        key = (site, camera)
        cached = self._snapshots.get(key)
        if cached is not None and time.monotonic() - cached[0] < self.snapshot_interval:
            return cached[1]
        future = self._snapshot_calls.get(key)
        if future is None:
            call = _SnapshotCall()
            future = asyncio.ensure_future(
                self._request(site, camera, "snapshot", call, lambda rid: SnapshotRequest(id=rid))
            )
            self._snapshot_calls[key] = future
            future.add_done_callback(lambda f: self._snapshot_done(key, f))
        return await self._guarded(site, camera, user, session, asyncio.shield(future))

    def _snapshot_done(self, key: tuple[str, str], future: asyncio.Future[bytes]) -> None:
        if self._snapshot_calls.get(key) is future:
            del self._snapshot_calls[key]
        if not future.cancelled() and future.exception() is None:
            self._snapshots[key] = (time.monotonic(), future.result())

    # -- requests, revocation ----------------------------------------------------------------

    async def _request(
        self,
        site: str,
        camera: str,
        purpose: Purpose,
        call: _Pending,
        build: Callable[[int], Any],
    ) -> Any:
        """Send one request on the key's tunnel and wait for its result; a request that makes
        no progress for `request_timeout` fails (TunnelUnavailable "timeout")."""
        tunnel = await self._tunnel(site, camera, purpose)
        loop = asyncio.get_running_loop()
        async with tunnel.slot():
            try:
                async with asyncio.timeout(self.request_timeout) as deadline:
                    call.on_progress = lambda: deadline.reschedule(
                        loop.time() + self.request_timeout
                    )
                    await tunnel.send(call, build)
                    return await call.result
            except TimeoutError:
                raise TunnelUnavailable(
                    "timeout", f"the edge did not answer {call.op} within {self.request_timeout} s"
                ) from None
            finally:
                tunnel.abandon(call)

    async def _guarded(
        self,
        site: str,
        camera: str,
        user: UserRef | None,
        session: str | None,
        work: Awaitable[T],
    ) -> T:
        """Run `work` until it is done or the caller's access is revoked (TunnelRevoked)."""
        watch = _Watch(site, camera, user, session)
        self._watches.add(watch)
        task = asyncio.ensure_future(work)
        waiters: set[asyncio.Future[Any]] = {task, watch.revoked}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            self._watches.discard(watch)
        if watch.revoked.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise watch.revoked.result()
        return task.result()

    def revoke(
        self,
        *,
        site: str | None = None,
        user: UserRef | None = None,
        session: str | None = None,
        camera: str | None = None,
    ) -> int:
        """End at once every live stream and call matching all the given filters; returns how
        many ended. Without `user` and `session` (a whole site, or one camera of it) the
        matching tunnels are closed too (code 4403). Call it on the broker's event loop."""
        if site is None and user is None and session is None:
            raise ValueError("revoke needs at least one of site, user, session")

        def matches(s: str, c: str, u: UserRef | None, sess: str | None) -> bool:
            return (
                (site is None or s == site)
                and (camera is None or c == camera)
                and (user is None or u == user)
                and (session is None or sess == session)
            )

        ended = 0
        error = TunnelRevoked("revoked", "access was revoked")
        for stream in [s for s in self._streams if matches(s.site, s.camera, s.user, s.session)]:
            ended += 1
            self._streams.discard(stream)
            stream._end(error)
            upstream = self._upstreams.get((stream.site, stream.camera))
            if upstream is not None:
                upstream.remove(stream)
        for watch in [w for w in self._watches if matches(w.site, w.camera, w.user, w.session)]:
            ended += 1
            self._watches.discard(watch)
            if not watch.revoked.done():
                watch.revoked.set_result(error)
        if user is None and session is None:
            for tunnel in list(self._all_tunnels):
                if matches(tunnel.site, tunnel.camera, None, None):
                    tunnel.close_soon(CLOSE_REVOKED, "revoked")
            for key, future in list(self._opening.items()):
                if matches(key[0], key[1], None, None):
                    self._open_failed(key, future, TunnelRevoked("revoked", "access was revoked"))
        if ended:
            log.info("revoked %d stream(s)/call(s): site=%s user=%s", ended, site, user)
        return ended

    # -- state -------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Gauges and counters for metrics and tests."""
        return {
            "tunnels_open": len(self._all_tunnels),
            "upstreams": len(self._upstreams),
            "viewers": len(self._streams),
            "calls": len(self._watches),
            "tokens": len(self._grants),
            **self.counters,
        }

    def open_tunnels(self) -> list[tuple[str, str, str]]:
        """(site, camera, purpose) of every open tunnel."""
        return [t.key for t in self._all_tunnels if not t.closed]

    async def close(self) -> None:
        """End every stream, call and tunnel (hub shutdown); later calls fail."""
        self._closed = True
        error = TunnelUnavailable("closed", "the hub is shutting down")
        for stream in list(self._streams):
            stream._end(error)
        for key, future in list(self._opening.items()):
            self._open_failed(key, future, error)
        for watch in list(self._watches):
            if not watch.revoked.done():
                watch.revoked.set_result(error)
        await asyncio.gather(
            *(t.close(CLOSE_GOING_AWAY, "hub shutting down") for t in list(self._all_tunnels)),
            return_exceptions=True,
        )


def _check_target(site: str, camera: str) -> None:
    if not is_valid_site_id(site):
        raise ValueError(f"invalid site id {str(site)[:70]!r}")
    try:
        _CAMERA_ID.validate_python(camera)
    except ValidationError:
        raise ValueError(f"invalid camera id {str(camera)[:70]!r}") from None


def _list_request(
    rid: int, *, start: float, end: float, after_seq: int | None, limit: int
) -> ListRequest:
    return ListRequest(id=rid, start=start, end=end, after_seq=after_seq, limit=limit)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (the broker reports errors through other paths)."""
    if not future.cancelled():
        future.exception()


def _nothing() -> None:
    pass
