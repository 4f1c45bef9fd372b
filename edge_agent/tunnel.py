"""The edge side of the viewing tunnel: dial the hub that asked, prove who we are, serve it.

The box never listens (it sits behind NAT, and a listening socket would be one more way in).
When the hub publishes `open_tunnel`, the daemon calls `serve_tunnel(args, sources)`: it dials
`args.hub_url` over WSS, answers the hub's challenge with a hello carrying the one-time token and
signed with the device key (`sitelink.tunnel`), then serves the hub's requests until the hub
closes the tunnel or nothing has been asked for `idle_seconds`.

What it serves, and only for the camera and purpose the token was issued for:

- **live**: fragments from the recorder's in-memory `LiveTap`, starting at the newest keyframe;
  if the network falls behind the tap's ring, it skips to the next keyframe (the recording never
  waits for a viewer, and a viewer never gets a fragment it cannot decode);
- **playback**: the segment index (pages of segments, the gap ledger) and sealed segment files
  exactly as they are on disk; the box has no key to open them, the hub does;
- **snapshot**: one JPEG from `TunnelSources.snapshot`.

All file and index I/O runs in the default thread pool (one short read per 256 KiB chunk), so a
slow disk slows that tunnel and nothing else on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import logging
import os
import ssl
import stat
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from edge_agent.recorder import LiveFragment, LiveTap
from edge_agent.segment_store import SegmentStore, open_reader
from sitelink.messages import OpenTunnelArgs
from sitelink.tunnel import (
    CHUNK_BYTES,
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_PROTOCOL,
    CLOSE_REFUSED,
    MAX_CONTROL_BYTES,
    MAX_LIST_GAPS,
    MAX_LIST_SPAN_SECONDS,
    MAX_REQUESTS_PER_TUNNEL,
    MAX_SEGMENT_BYTES,
    MAX_SNAPSHOT_BYTES,
    OPS_BY_PURPOSE,
    SUBPROTOCOL,
    Cancel,
    Challenge,
    ErrorCode,
    ErrorReply,
    FetchDone,
    FetchReply,
    FetchRequest,
    GapInfo,
    ListReply,
    ListRequest,
    LiveEnd,
    LiveReply,
    LiveRequest,
    Refused,
    SegmentInfo,
    SnapshotReply,
    SnapshotRequest,
    TunnelError,
    TunnelProtocolError,
    TunnelRefused,
    TunnelUnavailable,
    Welcome,
    decode_hub_message,
    encode_chunk,
    encode_fragment,
    encode_init,
    encode_message,
    encode_snapshot,
    expect,
    make_hello,
)

log = logging.getLogger(__name__)

#: WebSocket pings both ways; a dead hub (or NAT mapping) is noticed within ~2x this.
HEARTBEAT_SECONDS = 20.0
#: While no fragment arrives, the live loop looks again this often whether the camera's
#: recorder was replaced (a new `LiveTap`) or removed.
_TAP_RECHECK_SECONDS = 5.0


class TunnelSources(Protocol):
    """What the daemon lends a tunnel. Every method is called on the event loop and must not
    block: `snapshot` returns a ready JPEG (e.g. image health's latest) or is a coroutine."""

    @property
    def site_id(self) -> str:
        """This box's site id (what the hub's token and the device key are bound to)."""
        ...

    @property
    def device_key(self) -> Ed25519PrivateKey:
        """The box's Ed25519 device key (`edge_agent.device_key`), registered at the hub."""
        ...

    @property
    def segment_store(self) -> SegmentStore:
        """The segment index; files are read from under its data directory only."""
        ...

    def live_tap(self, camera: str) -> LiveTap | None:
        """The running recorder's tap for `camera`, or None if it is not being recorded."""
        ...

    def snapshot(self, camera: str) -> bytes | Awaitable[bytes | None] | None:
        """A JPEG of the camera's latest picture, or None if there is none."""
        ...


class EdgeTunnel:
    """One authenticated tunnel; made by `connect_tunnel`, run by `serve`."""

    def __init__(
        self,
        args: OpenTunnelArgs,
        sources: TunnelSources,
        session: aiohttp.ClientSession,
        ws: aiohttp.ClientWebSocketResponse,
        welcome: Welcome,
    ) -> None:
        self.args = args
        self.tunnel_id = welcome.tunnel_id
        self._sources = sources
        self._session = session
        self._ws = ws
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._stopping: set[asyncio.Task[None]] = set()  # cancelled by the hub, winding down
        self._last_id = 0
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_seconds = 60.0
        self._closing: asyncio.Task[None] | None = None
        self.ended_by: str | None = None  # "hub", "idle" or "protocol"
        # figures for logs and the benchmark
        self.requests = 0
        self.fragments_sent = 0
        self.fragments_skipped = 0
        self.bytes_sent = 0

    @property
    def camera(self) -> str:
        return self.args.camera

    async def serve(self, idle_seconds: float = 60.0) -> None:
        """Answer the hub's requests until it closes the tunnel or none came for `idle_seconds`.

        Raises TunnelProtocolError (after closing with 4400) if the hub says something outside
        the protocol; returns normally otherwise.
        """
        if idle_seconds <= 0:
            raise ValueError("idle_seconds must be > 0")
        self._idle_seconds = idle_seconds
        self._arm_idle()
        try:
            while True:
                msg = await self._ws.receive()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await self._on_text(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    raise TunnelProtocolError("unexpected", "the hub sent a binary frame")
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    raise TunnelProtocolError(
                        "bad_frame", f"unreadable WebSocket frame: {msg.data}"
                    )
                else:  # CLOSE, CLOSING, CLOSED
                    if self.ended_by is None:
                        self.ended_by = "hub"
                    break
        except TunnelProtocolError as exc:
            self.ended_by = "protocol"
            log.warning("tunnel %s: the hub broke the protocol: %s", self.tunnel_id, exc)
            await self._close(CLOSE_PROTOCOL, f"protocol error: {exc}")
            raise
        finally:
            await self.close()
        log.info(
            "tunnel %s closed (%s): %d requests, %d fragments, %d bytes",
            self.tunnel_id,
            self.ended_by,
            self.requests,
            self.fragments_sent,
            self.bytes_sent,
        )

    async def close(self) -> None:
        """Stop every request and close the connection (idempotent)."""
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        tasks = [*self._tasks.values(), *self._stopping]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._close(CLOSE_GOING_AWAY, "edge closing")
        await self._session.close()

    # -- requests ----------------------------------------------------------------------------

    async def _on_text(self, data: str) -> None:
        message = decode_hub_message(data)
        if isinstance(message, Cancel):
            task = self._tasks.pop(message.id, None)
            if task is not None:  # no longer counts against the limit while it winds down
                self._stopping.add(task)
                task.cancel()
                if not self._tasks:
                    self._arm_idle()
            return
        if not isinstance(message, LiveRequest | ListRequest | FetchRequest | SnapshotRequest):
            raise TunnelProtocolError("unexpected", f"a {message.type} message after the welcome")
        if message.id <= self._last_id:
            raise TunnelProtocolError("unexpected", f"request id {message.id} is not increasing")
        self._last_id = message.id
        self.requests += 1
        if message.type not in OPS_BY_PURPOSE[self.args.purpose]:
            await self._error(
                message.id,
                "forbidden",
                f"a {self.args.purpose} tunnel does not serve {message.type}",
            )
            return
        if len(self._tasks) >= MAX_REQUESTS_PER_TUNNEL:
            await self._error(
                message.id, "busy", f"{MAX_REQUESTS_PER_TUNNEL} requests already in flight"
            )
            return
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        task = asyncio.create_task(self._serve_request(message), name=f"tunnel-{message.id}")
        self._tasks[message.id] = task
        task.add_done_callback(functools.partial(self._request_done, message.id))

    def _request_done(self, request_id: int, task: asyncio.Task[None]) -> None:
        self._stopping.discard(task)
        if self._tasks.get(request_id) is task:
            del self._tasks[request_id]
            if not self._tasks:
                self._arm_idle()

    def _arm_idle(self) -> None:
        if self._idle_handle is None and not self._ws.closed:
            loop = asyncio.get_running_loop()
            self._idle_handle = loop.call_later(self._idle_seconds, self._on_idle)

    def _on_idle(self) -> None:
        self._idle_handle = None
        if self._tasks:
            return
        self.ended_by = "idle"
        log.info("tunnel %s idle for %.0f s: closing", self.tunnel_id, self._idle_seconds)
        # close() wakes the reader's pending receive(), which then ends serve().
        self._closing = asyncio.get_running_loop().create_task(self._close(CLOSE_NORMAL, "idle"))

    async def _serve_request(
        self, req: LiveRequest | ListRequest | FetchRequest | SnapshotRequest
    ) -> None:
        try:
            if isinstance(req, LiveRequest):
                await self._live(req)
            elif isinstance(req, ListRequest):
                await self._list(req)
            elif isinstance(req, FetchRequest):
                await self._fetch(req)
            else:
                await self._snapshot(req)
        except asyncio.CancelledError:
            raise
        except (ConnectionError, aiohttp.ClientError):
            pass  # the connection is gone; the reader notices and ends serve()
        except Exception:
            log.exception("tunnel %s: request %d (%s) failed", self.tunnel_id, req.id, req.type)
            with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                await self._error(req.id, "failed", "the edge failed to answer (see its log)")

    async def _live(self, req: LiveRequest) -> None:
        tap = self._sources.live_tap(self.camera)
        if tap is None:
            await self._error(req.id, "unknown_camera", f"camera {self.camera} is not recording")
            return
        await self._send_text(encode_message(LiveReply(id=req.id)))
        relay = _LiveRelay(self, req.id)
        reason: Literal["cancelled", "recorder_stopped"] = "cancelled"
        try:
            pending = relay.start(tap)
            while True:
                for fragment in pending:
                    await relay.send(fragment)
                try:
                    async with asyncio.timeout(_TAP_RECHECK_SECONDS):
                        pending = await tap.wait(relay.last_tap_seq)
                    continue
                except TimeoutError:
                    pass
                current = self._sources.live_tap(self.camera)
                if current is None:
                    reason = "recorder_stopped"
                    break
                if current is not tap:  # the recorder was restarted: its seqs start again
                    tap = current
                    pending = relay.start(tap)
                else:
                    pending = []
        finally:
            if not self._ws.closed:
                with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                    await self._send_text(encode_message(LiveEnd(id=req.id, reason=reason)))

    async def _list(self, req: ListRequest) -> None:
        if req.end < req.start or req.end - req.start > MAX_LIST_SPAN_SECONDS:
            await self._error(
                req.id, "bad_request", "end is before start, or the range is too long"
            )
            return
        store = self._sources.segment_store
        rows = await asyncio.to_thread(
            _segment_page, store.data_dir, self.camera, req.start, req.end, req.after_seq, req.limit
        )
        truncated = len(rows) > req.limit
        segments = [_segment_info(r) for r in rows[: req.limit]]
        gaps: list[GapInfo] = []
        gaps_truncated = False
        if req.after_seq is None:
            found = await asyncio.to_thread(store.gaps, self.camera, req.start, req.end)
            gaps_truncated = len(found) > MAX_LIST_GAPS
            gaps = [
                GapInfo.model_validate(
                    {"start": float(g.start), "end": _float_or_none(g.end), "cause": g.cause}
                )
                for g in found[:MAX_LIST_GAPS]
            ]
        reply = ListReply(
            id=req.id,
            segments=segments,
            gaps=gaps,
            truncated=truncated,
            gaps_truncated=gaps_truncated,
        )
        await self._send_text(encode_message(reply))

    async def _fetch(self, req: FetchRequest) -> None:
        store = self._sources.segment_store
        row = await asyncio.to_thread(_segment_row, store.data_dir, self.camera, req.seq)
        if row is None:
            await self._error(req.id, "not_found", f"{self.camera} has no segment {req.seq}")
            return
        path = _inside_segments(store.data_dir, str(row["path"]))
        if path is None:
            await self._error(req.id, "forbidden", "the index row points outside DATA/segments")
            return
        try:
            f = await asyncio.to_thread(_open_regular, path)
        except FileNotFoundError:
            await self._error(req.id, "not_found", f"the file of segment {req.seq} is missing")
            return
        try:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_SEGMENT_BYTES or int(row["bytes"]) > MAX_SEGMENT_BYTES:
                await self._error(req.id, "too_large", f"segment {req.seq} is over the size limit")
                return
            reply = FetchReply(
                id=req.id,
                seq=req.seq,
                size=size,
                index_bytes=int(row["bytes"]),
                index_sha256=str(row["file_sha256"]),
            )
            await self._send_text(encode_message(reply))
            digest = hashlib.sha256()
            offset = 0
            while offset < size:
                data = await asyncio.to_thread(
                    _read_hashed, f, min(CHUNK_BYTES, size - offset), digest
                )
                if not data:
                    break  # the file shrank under us: fetch_done says how much was sent
                await self._send_bytes(encode_chunk(req.id, offset, data))
                offset += len(data)
            done = FetchDone(id=req.id, size=offset, sha256=digest.hexdigest())
            await self._send_text(encode_message(done))
        finally:
            f.close()

    async def _snapshot(self, req: SnapshotRequest) -> None:
        result = self._sources.snapshot(self.camera)
        jpeg = await result if inspect.isawaitable(result) else result
        if jpeg is None:
            await self._error(req.id, "unavailable", f"no snapshot of {self.camera} yet")
            return
        if not isinstance(jpeg, bytes) or not jpeg.startswith(b"\xff\xd8\xff"):
            await self._error(req.id, "failed", "the snapshot source did not give a JPEG")
            return
        if len(jpeg) > MAX_SNAPSHOT_BYTES:
            await self._error(req.id, "too_large", f"snapshot of {len(jpeg)} bytes")
            return
        await self._send_text(encode_message(SnapshotReply(id=req.id, size=len(jpeg))))
        await self._send_bytes(encode_snapshot(req.id, jpeg))

    # -- sending -----------------------------------------------------------------------------

    async def _error(self, request_id: int, code: ErrorCode, message: str) -> None:
        await self._send_text(encode_message(ErrorReply(id=request_id, code=code, message=message)))

    async def _send_text(self, text: str) -> None:
        await self._ws.send_str(text)

    async def _send_bytes(self, data: bytes) -> None:
        # aiohttp writes each uncompressed frame in one piece, so frames of concurrent requests
        # interleave whole; send awaits the transport's drain: TCP back-pressure reaches here.
        await self._ws.send_bytes(data)
        self.bytes_sent += len(data)

    async def _close(self, code: int, message: str) -> None:
        if not self._ws.closed:
            with contextlib.suppress(ConnectionError, aiohttp.ClientError, asyncio.TimeoutError):
                await self._ws.close(code=code, message=message.encode()[:120])


class _LiveRelay:
    """Turns one or more `LiveTap`s into the tunnel's fragment stream.

    Wire seqs increase by one per tap fragment, across recorder restarts too; a fragment
    skipped (the network fell behind the tap's ring) shows as a jump, and the fragment after a
    jump always starts with a keyframe, as does the first one.
    """

    def __init__(self, tunnel: EdgeTunnel, request_id: int) -> None:
        self._tunnel = tunnel
        self._id = request_id
        self.last_tap_seq = 0
        self._wire_seq = 0
        self._need_key = True
        self._init_sent: bytes | None = None

    def start(self, tap: LiveTap) -> list[LiveFragment]:
        """Begin on `tap` (again): returns the ring from its newest keyframe on."""
        ring = tap.latest()
        self._need_key = True
        self.last_tap_seq = 0
        self._wire_seq += 1  # a jump: whatever the old tap had in flight is gone
        keys = [i for i, f in enumerate(ring) if f.keyframe]
        if not keys:
            self.last_tap_seq = ring[-1].seq if ring else 0
            self._wire_seq += self.last_tap_seq
            return []
        start = ring[keys[-1]]
        self.last_tap_seq = start.seq - 1
        self._wire_seq += self.last_tap_seq
        return ring[keys[-1] :]

    async def send(self, fragment: LiveFragment) -> None:
        if fragment.seq <= self.last_tap_seq:
            return
        if fragment.seq != self.last_tap_seq + 1:
            self._tunnel.fragments_skipped += fragment.seq - self.last_tap_seq - 1
            self._need_key = True
        self._wire_seq += fragment.seq - self.last_tap_seq
        self.last_tap_seq = fragment.seq
        if self._need_key:
            if not fragment.keyframe:
                return  # undecodable without the keyframe before it
            self._need_key = False
        init = fragment.init
        if init is not self._init_sent and init != self._init_sent:
            await self._tunnel._send_bytes(encode_init(self._id, fragment.segment_seq, init))
            self._init_sent = init
        frame = encode_fragment(
            self._id,
            self._wire_seq,
            fragment.segment_seq,
            fragment.wall,
            fragment.keyframe,
            fragment.data,
        )
        await self._tunnel._send_bytes(frame)
        self._tunnel.fragments_sent += 1


# --------------------------------------------------------------------------------------------
# Dialing


async def connect_tunnel(
    args: OpenTunnelArgs,
    sources: TunnelSources,
    *,
    ssl_context: ssl.SSLContext | None = None,
    connect_timeout: float = 15.0,
    agent_version: str | None = None,
) -> EdgeTunnel:
    """Dial `args.hub_url` and authenticate; the returned tunnel is ready to `serve()`.

    `ssl_context` verifies the hub's certificate for wss:// (default: the system's CAs; pass
    one that trusts the operator's CA). Raises TunnelRefused (the hub said no; or, with reason
    `token_expired`, the command expired before dialing and nothing was sent),
    TunnelUnavailable (the hub could not be reached, or its certificate is not trusted),
    TunnelProtocolError, or TunnelError `bad_command` (arguments that are not valid).
    """
    try:  # revalidate: a command built with model_construct() skips validation
        args = OpenTunnelArgs.model_validate(args.model_dump())
    except ValidationError as exc:
        raise TunnelError("bad_command", f"open_tunnel arguments are invalid: {exc}") from None
    if args.expires <= time.time():
        raise TunnelRefused(
            "token_expired", "the open_tunnel command expired before the edge could dial"
        )
    url = _websocket_url(args.hub_url)
    session = aiohttp.ClientSession(
        trust_env=False,  # no proxy from the environment: the hub URL is dialed as given
        timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout),
    )
    try:
        try:
            ws = await session.ws_connect(
                url,
                protocols=(SUBPROTOCOL,),
                heartbeat=HEARTBEAT_SECONDS,
                max_msg_size=MAX_CONTROL_BYTES,  # the hub sends only control messages
                compress=0,
                autoping=True,
                ssl=ssl_context or True,  # True: verify against the system's CAs
                timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
            )
        except aiohttp.ClientConnectorCertificateError as exc:
            raise TunnelUnavailable(
                "tls", f"the hub's TLS certificate is not trusted ({exc.certificate_error})"
            ) from None
        except aiohttp.WSServerHandshakeError as exc:
            raise TunnelUnavailable(
                "handshake", f"the hub did not accept a WebSocket at {url} (HTTP {exc.status})"
            ) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise TunnelUnavailable(
                "unreachable", f"could not reach the hub at {url}: {type(exc).__name__}: {exc}"
            ) from None
        try:
            welcome = await _handshake(ws, args, sources, connect_timeout, agent_version)
        except BaseException:
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await ws.close(code=CLOSE_PROTOCOL)
            raise
    except BaseException:
        await session.close()
        raise
    log.info(
        "tunnel %s to %s open: %s %s",
        welcome.tunnel_id,
        url,
        args.purpose,
        args.camera,
    )
    return EdgeTunnel(args, sources, session, ws, welcome)


async def serve_tunnel(
    args: OpenTunnelArgs,
    sources: TunnelSources,
    *,
    ssl_context: ssl.SSLContext | None = None,
    idle_seconds: float = 60.0,
    connect_timeout: float = 15.0,
    agent_version: str | None = None,
) -> None:
    """Dial, authenticate and serve one `open_tunnel` command until the hub closes the tunnel
    or it has been idle for `idle_seconds`. Raises the `TunnelError`s of `connect_tunnel`, or
    TunnelProtocolError if the hub breaks the protocol later."""
    tunnel = await connect_tunnel(
        args,
        sources,
        ssl_context=ssl_context,
        connect_timeout=connect_timeout,
        agent_version=agent_version,
    )
    await tunnel.serve(idle_seconds=idle_seconds)


async def _handshake(
    ws: aiohttp.ClientWebSocketResponse,
    args: OpenTunnelArgs,
    sources: TunnelSources,
    wait: float,
    agent_version: str | None,
) -> Welcome:
    if ws.protocol != SUBPROTOCOL:
        raise TunnelProtocolError("unexpected", "the hub did not agree to the tunnel subprotocol")
    challenge = expect(decode_hub_message(await _receive_text(ws, wait)), Challenge)
    hello = make_hello(
        key=sources.device_key,
        site=sources.site_id,
        camera=args.camera,
        purpose=args.purpose,
        hub_url=args.hub_url,
        token=args.token,
        nonce=challenge.nonce,
        agent_version=agent_version,
    )
    await ws.send_str(encode_message(hello))
    answer = decode_hub_message(await _receive_text(ws, wait))
    if isinstance(answer, Refused):
        raise TunnelRefused(answer.reason, f"the hub refused the tunnel: {answer.message}")
    return expect(answer, Welcome)


async def _receive_text(ws: aiohttp.ClientWebSocketResponse, wait: float) -> str:
    try:
        msg = await ws.receive(timeout=wait)
    except TimeoutError:
        raise TunnelUnavailable("timeout", f"the hub did not answer within {wait:.0f} s") from None
    if msg.type == aiohttp.WSMsgType.TEXT:
        return str(msg.data)
    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
        code = ws.close_code
        if code == CLOSE_REFUSED:
            raise TunnelRefused("refused", "the hub refused the tunnel")
        raise TunnelUnavailable("closed", f"the hub closed the connection (code {code})")
    if msg.type == aiohttp.WSMsgType.ERROR:
        raise TunnelProtocolError("bad_frame", f"unreadable WebSocket frame: {msg.data}")
    raise TunnelProtocolError("unexpected", "the hub sent a binary frame during the handshake")


def _websocket_url(hub_url: str) -> str:
    """wss:// for https://, ws:// for http:// (HubUrl already allows plaintext only to
    loopback)."""
    scheme, sep, rest = hub_url.partition("://")
    scheme = {"https": "wss", "http": "ws"}.get(scheme.lower(), scheme.lower())
    return f"{scheme}{sep}{rest}"


# --------------------------------------------------------------------------------------------
# Index and files (worker threads)

# The segment index is read through its own read-only connection (`open_reader`), by the
# columns docs/recording.md documents; one indexed lookup instead of `SegmentStore.segments()`,
# which reads every row of the range (a month is ~43,000 rows per camera).
_SEGMENT_COLUMNS = (
    "seq, path, start_time, end_time, bytes, fragments, finished, codec, file_sha256, "
    "row_hash, prev_hash"
)


def _segment_row(data_dir: Path, camera: str, seq: int) -> dict[str, Any] | None:
    with contextlib.closing(open_reader(data_dir)) as conn:
        row = conn.execute(
            f"SELECT {_SEGMENT_COLUMNS} FROM segments WHERE camera_id = ? AND seq = ?",  # noqa: S608
            [camera, seq],
        ).fetchone()
    return None if row is None else dict(row)


def _segment_page(
    data_dir: Path, camera: str, start: float, end: float, after_seq: int | None, limit: int
) -> list[dict[str, Any]]:
    """Up to `limit` + 1 rows (the extra one says "more follow"), in chain order."""
    with contextlib.closing(open_reader(data_dir)) as conn:
        rows = conn.execute(
            f"SELECT {_SEGMENT_COLUMNS} FROM segments "  # noqa: S608
            "WHERE camera_id = ? AND end_time >= ? AND start_time <= ? AND seq > ? "
            "ORDER BY seq LIMIT ?",
            [camera, start, end, after_seq or 0, limit + 1],
        ).fetchall()
    return [dict(r) for r in rows]


def _segment_info(row: dict[str, Any]) -> SegmentInfo:
    return SegmentInfo(
        seq=int(row["seq"]),
        start=float(row["start_time"]),
        end=float(row["end_time"]),
        bytes=int(row["bytes"]),
        fragments=int(row["fragments"] or 0),
        finished=bool(row["finished"]),
        codec=str(row["codec"] or "unknown"),
        sha256=str(row["file_sha256"]),
        row_hash=row.get("row_hash") or None,
        prev_hash=row.get("prev_hash") or None,
    )


def _inside_segments(data_dir: Path, relative: str) -> Path | None:
    """The file an index row names, or None if it resolves outside DATA/segments (a tampered
    index must not turn the tunnel into a file server)."""
    root = (Path(data_dir) / "segments").resolve()
    path = (Path(data_dir) / relative).resolve()
    return path if path.is_relative_to(root) and path != root else None


def _open_regular(path: Path) -> BinaryIO:
    f = open(path, "rb")  # noqa: SIM115 - closed by the caller
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise FileNotFoundError(path)
    return f


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


def _read_hashed(f: BinaryIO, size: int, digest: Any) -> bytes:
    data = f.read(size)
    digest.update(data)
    return data


__all__ = [
    "EdgeTunnel",
    "TunnelError",
    "TunnelProtocolError",
    "TunnelRefused",
    "TunnelSources",
    "TunnelUnavailable",
    "connect_tunnel",
    "serve_tunnel",
]
