"""The viewing web layer: live view, playback and snapshots for the browser, through the tunnel.

Every request passes :func:`central_hub.web_auth.require` (policy + audit), then asks the
:class:`~central_hub.tunnel.TunnelBroker` for the camera:

* **Live** — ``GET /view/{site}/{camera}/live`` is the page; its script opens the WebSocket
  ``…/live/ws``, which relays the fMP4 fragments of ``broker.live`` (one shared upstream per
  camera, however many viewers). Each WebSocket message is one binary record
  ``kind u8 ‖ meta length u32 ‖ meta JSON ‖ payload`` (kind 1: init segment with its codec
  string; kind 2: a fragment with its seq, segment seq, ``wall`` time and media start ``t0``),
  fed to Media Source Extensions by ``static/viewing.js``. No HLS player library is needed.
* **Playback** — ``…/playback`` is the page; its script opens ``…/playback/ws?start=&end=``,
  which authorizes the time range, lists the segments and gaps through the tunnel and holds a
  *playback session* for as long as the socket is open. Segments are fetched sealed through
  the tunnel, opened **in memory** with the viewing private key (plaintext never touches the
  hub's disk), kept in a bounded in-memory cache, and served as fMP4 to MSE
  (``/view/playback/{id}/{seq}.mp4``) or as an HLS fMP4 playlist for native players
  (``/view/playback/{id}/index.m3u8``).
* **Snapshots** — ``…/snapshot.jpg``, rate-limited per user and per camera.

Every live and playback session writes a start and a stop row to the audit log (camera, time
range, why it stopped) besides the allow/deny row of ``require()``. Sessions end at once when
the user's session, grant or account, or the site, is revoked (``subscribe_revocations``), and
a periodic re-check catches anything a hook could miss (expiry).

Exports (legal basis, second-person approval, signed bundles) are in :mod:`central_hub.export`;
:func:`setup_viewing` mounts their pages too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import io
import json
import logging
import math
import secrets
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import sqlalchemy as sa
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import TypeAdapter, ValidationError

from central_hub import i18n
from central_hub.accounts import AccountStore, Revocation, sessions
from central_hub.audit import AuditLog
from central_hub.db import Database
from central_hub.policy import Action, Principal, can
from central_hub.sites import SiteAttrs, get_site
from central_hub.tunnel import (
    RemoteError,
    SegmentListing,
    SegmentMismatch,
    TunnelBroker,
    TunnelRevoked,
)
from central_hub.web_auth import (
    AUTH,
    auth_of,
    client_source,
    principal_of,
    render,
    require,
    subscribe_revocations,
)
from sitelink.messages import CameraId
from sitelink.sealed_segment import RecipientPrivateKey, SealedSegmentError, open_segment
from sitelink.topics import is_valid_site_id
from sitelink.tunnel import TUNNEL_PATH, SegmentInfo, TunnelError

log = logging.getLogger(__name__)

_VN_TZ = timezone(timedelta(hours=7), "ICT")
_CAMERA_ID: TypeAdapter[str] = TypeAdapter(CameraId)
_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_PLAYBACK_ID = r"[A-Za-z0-9_-]{22}"

#: WebSocket record kinds (first byte of every binary message to the browser).
KIND_INIT = 1
KIND_FRAGMENT = 2
_RECORD_HEAD = struct.Struct(">BI")

#: WebSocket close codes sent to the browser (the script shows why the stream ended).
CLOSE_REVOKED = 4403
CLOSE_UNAVAILABLE = 4503
CLOSE_LIMIT = 4429

# --------------------------------------------------------------------------------------------
# Texts of the viewing and export pages: the ``view.*`` keys of central_hub.i18n


def vt(key: str, lang: str, **values: object) -> str:
    """A viewing/export page text in `lang`: ``view.<key>`` of :mod:`central_hub.i18n` (the
    templates say ``vt('live.title')``)."""
    return i18n.t(f"view.{key}", lang, **values)


#: The keys `vt` takes; templates test an error code against them before showing its text.
VIEW_KEYS = frozenset(key.removeprefix("view.") for key in i18n.MESSAGES if key.startswith("view."))


def fmt_time(ts: float | None) -> str:
    """Wall time as shown on the pages (Vietnam time)."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, _VN_TZ).strftime("%Y-%m-%d %H:%M:%S")


def page(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    """`render` with the viewing texts (``vt``) in the request's language."""
    lang = auth_of(request).lang
    return render(
        request,
        template,
        status=status,
        vt=lambda key, **values: vt(key, lang, **values),
        texts=VIEW_KEYS,
        fmt=fmt_time,
        **context,
    )


# --------------------------------------------------------------------------------------------
# fMP4 boxes: just enough to give MSE a codec string and a fragment's media start


class Mp4Error(ValueError):
    """The bytes are not the fMP4 the recorder writes."""


_CONTAINERS = frozenset({b"moov", b"trak", b"mdia", b"minf", b"stbl", b"moof", b"traf", b"edts"})


def iter_boxes(
    data: bytes, start: int = 0, end: int | None = None
) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of each box in data[start:end] (ISO/IEC 14496-12 §4.2)."""
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        head = 8
        if size == 1:
            if pos + 16 > end:
                raise Mp4Error("truncated large box header")
            size = struct.unpack_from(">Q", data, pos + 8)[0]
            head = 16
        elif size == 0:
            size = end - pos
        if size < head or pos + size > end:
            raise Mp4Error(f"box {kind!r} at {pos} overruns its parent")
        yield kind, pos + head, pos + size
        pos += size


def find_box(
    data: bytes, path: tuple[bytes, ...], start: int = 0, end: int | None = None
) -> tuple[int, int] | None:
    """Payload span of the first box along `path` (containers only between), or None."""
    for kind, lo, hi in iter_boxes(data, start, end):
        if kind == path[0]:
            if len(path) == 1:
                return lo, hi
            if kind in _CONTAINERS:
                found = find_box(data, path[1:], lo, hi)
                if found is not None:
                    return found
    return None


def codec_string(init: bytes) -> str:
    """The RFC 6381 codec string of the video track (``avc1.64001f``, ``hvc1.1.6.L93.B0``) for
    ``MediaSource.isTypeSupported``; ``unknown`` if it cannot be told."""
    stsd = find_box(init, (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd"))
    if stsd is None:
        return "unknown"
    lo, hi = stsd
    for kind, entry_lo, entry_hi in iter_boxes(init, lo + 8, hi):  # skip version/flags/count
        # VisualSampleEntry: 8 bytes SampleEntry + 70 bytes visual fields, then child boxes
        children = entry_lo + 78
        if kind in (b"avc1", b"avc3"):
            for child, c_lo, c_hi in iter_boxes(init, children, entry_hi):
                if child == b"avcC" and c_hi - c_lo >= 4:
                    profile, compat, level = init[c_lo + 1], init[c_lo + 2], init[c_lo + 3]
                    return f"{kind.decode()}.{profile:02x}{compat:02x}{level:02x}"
        if kind in (b"hvc1", b"hev1"):
            for child, c_lo, c_hi in iter_boxes(init, children, entry_hi):
                if child == b"hvcC" and c_hi - c_lo >= 13:
                    b1 = init[c_lo + 1]
                    space = "ABC"[(b1 >> 6) - 1] if b1 >> 6 else ""
                    tier = "H" if b1 & 0x20 else "L"
                    profile = b1 & 0x1F
                    compat = int.from_bytes(init[c_lo + 2 : c_lo + 6], "big")
                    compat_rev = int(f"{compat:032b}"[::-1], 2)
                    level = init[c_lo + 12]
                    constraint = init[c_lo + 6]
                    name = kind.decode()
                    return f"{name}.{space}{profile}.{compat_rev:X}.{tier}{level}.{constraint:X}"
        return kind.decode("ascii", "replace")
    return "unknown"


def timescale(init: bytes) -> int:
    """The video track's media timescale (``mdhd``), ticks per second."""
    mdhd = find_box(init, (b"moov", b"trak", b"mdia", b"mdhd"))
    if mdhd is None:
        raise Mp4Error("no mdhd in the init segment")
    lo, _hi = mdhd
    version = init[lo]
    scale = struct.unpack_from(">I", init, lo + (20 if version == 1 else 12))[0]
    if scale <= 0:
        raise Mp4Error("mdhd timescale is 0")
    return int(scale)


def fragment_start(fragment: bytes) -> int:
    """The fragment's baseMediaDecodeTime (``tfdt``) in timescale ticks."""
    tfdt = find_box(fragment, (b"moof", b"traf", b"tfdt"))
    if tfdt is None:
        raise Mp4Error("no tfdt in the fragment")
    lo, _hi = tfdt
    if fragment[lo] == 1:
        return int(struct.unpack_from(">Q", fragment, lo + 4)[0])
    return int(struct.unpack_from(">I", fragment, lo + 4)[0])


def record(kind: int, meta: dict[str, Any], payload: bytes) -> bytes:
    """One binary WebSocket message to the browser (see the module docstring)."""
    head = json.dumps(meta, separators=(",", ":")).encode()
    return _RECORD_HEAD.pack(kind, len(head)) + head + payload


# --------------------------------------------------------------------------------------------
# Opening sealed segments in memory


class SegmentUnreadable(Exception):
    """A fetched segment does not open with the viewing key, or is not the one asked for."""


@dataclass(frozen=True)
class Plaintext:
    """An opened segment: the init segment and the media fragments, in memory only."""

    site: str
    camera: str
    seq: int
    start: float
    init: bytes
    media: bytes
    finished: bool

    @property
    def size(self) -> int:
        return len(self.init) + len(self.media)

    @property
    def whole(self) -> bytes:
        """init + fragments: a playable fMP4 file (as bytes, never as a file)."""
        return self.init + self.media


def open_in_memory(
    sealed: bytes, key: RecipientPrivateKey, *, site: str, camera: str, seq: int
) -> Plaintext:
    """Verify and decrypt a sealed segment held in memory; check its authenticated header
    names the site, camera and seq that were asked for (a box serving another camera's file
    is caught here). Blocking: call it in a worker thread."""
    try:
        with open_segment(io.BytesIO(sealed), key) as segment:
            header = segment.header
            if (header.site_id, header.camera_id, header.seq) != (site, camera, seq):
                raise SegmentUnreadable(
                    f"segment header names {header.site_id}/{header.camera_id}#{header.seq}, "
                    f"asked for {site}/{camera}#{seq}"
                )
            chunks = iter(segment)
            init = next(chunks, b"")
            media = b"".join(chunks)
            finished = segment.finished
    except SealedSegmentError as exc:
        raise SegmentUnreadable(f"segment {site}/{camera}#{seq} does not open: {exc}") from None
    if init[4:8] != b"ftyp":
        raise SegmentUnreadable(f"segment {site}/{camera}#{seq}: chunk 0 is not an init segment")
    return Plaintext(site, camera, seq, header.start_us / 1e6, init, media, finished)


class PlaintextCache:
    """Opened segments kept in memory (LRU, bounded in bytes) so a seek back or a second viewer
    does not pull and decrypt the segment again. Loads of the same segment are shared."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: collections.OrderedDict[tuple[str, str, int], Plaintext] = (
            collections.OrderedDict()
        )
        self._loading: dict[tuple[str, str, int], asyncio.Future[Plaintext]] = {}

    async def get(
        self, key: tuple[str, str, int], load: Callable[[], Awaitable[Plaintext]]
    ) -> Plaintext:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
            self.hits += 1
            return item
        future = self._loading.get(key)
        if future is None:
            self.misses += 1
            future = asyncio.ensure_future(load())
            self._loading[key] = future
            future.add_done_callback(lambda f: self._loaded(key, f))
        return await asyncio.shield(future)

    def _loaded(self, key: tuple[str, str, int], future: asyncio.Future[Plaintext]) -> None:
        self._loading.pop(key, None)
        if future.cancelled() or future.exception() is not None:
            return
        item = future.result()
        if item.size > self.max_bytes or key in self._items:
            return
        self._items[key] = item
        self.bytes += item.size
        while self.bytes > self.max_bytes and self._items:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.size

    def drop(self, site: str | None = None) -> None:
        """Forget cached plaintext (all, or one site's: e.g. when the site is disabled)."""
        for key in [k for k in self._items if site is None or k[0] == site]:
            self.bytes -= self._items.pop(key).size


# --------------------------------------------------------------------------------------------
# Rate limits


class TokenBucket:
    """`burst` requests at once, refilled at `rate` per second, per key."""

    def __init__(
        self, burst: int, rate: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = burst
        self.rate = rate
        self._clock = clock
        self._state: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 if a request for `key` may go now (and count it), else seconds to wait."""
        now = self._clock()
        tokens, last = self._state.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._state[key] = (tokens - 1.0, now)
            if len(self._state) > 100_000:  # bounded memory under a flood of keys
                self._state = {k: v for k, v in self._state.items() if now - v[1] < 3600}
            return 0.0
        self._state[key] = (tokens, now)
        return (1.0 - tokens) / self.rate if self.rate > 0 else 3600.0


# --------------------------------------------------------------------------------------------
# The service


@dataclass(frozen=True)
class ViewingLimits:
    """Limits of the viewing layer (the hub config's ``[viewing]`` table can carry them)."""

    #: snapshots per user: burst, then per second
    snapshot_user_burst: int = 30
    snapshot_user_rate: float = 1.0
    #: snapshots per camera (all users together): burst, then per second
    snapshot_camera_burst: int = 10
    snapshot_camera_rate: float = 1.0
    #: live sessions one user may hold at once (a video wall of 16)
    live_per_user: int = 16
    #: playback sessions one user may hold at once
    playback_per_user: int = 8
    #: longest range one playback session may cover
    playback_max_seconds: float = 24 * 3600.0
    #: opened (plaintext) segments kept in memory for playback, all users together
    plaintext_cache_bytes: int = 256 * 1024 * 1024
    #: every open session's user, session, grant and site are checked again this often
    recheck_seconds: float = 30.0

    def __post_init__(self) -> None:
        if min(self.snapshot_user_burst, self.snapshot_camera_burst) < 1:
            raise ValueError("snapshot bursts must be >= 1")
        if min(self.snapshot_user_rate, self.snapshot_camera_rate) <= 0:
            raise ValueError("snapshot rates must be > 0")
        if min(self.live_per_user, self.playback_per_user) < 1:
            raise ValueError("per-user session limits must be >= 1")
        if self.playback_max_seconds <= 0 or self.recheck_seconds <= 0:
            raise ValueError("playback_max_seconds and recheck_seconds must be > 0")
        if self.plaintext_cache_bytes < 0:
            raise ValueError("plaintext_cache_bytes must be >= 0")


SessionKind = Literal["live", "playback"]


@dataclass(eq=False)
class ViewingSession:
    """One open live or playback session (one browser WebSocket)."""

    kind: SessionKind
    viewing_id: str
    user_id: int
    session_hash: str | None
    site: str
    camera: str
    ws: web.WebSocketResponse
    started: float = field(default_factory=time.time)
    time_range: tuple[float, float] | None = None
    listing: dict[int, SegmentInfo] = field(default_factory=dict)
    stop_reason: str | None = None
    served: int = 0
    served_bytes: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def action(self) -> Action:
        return "view_live" if self.kind == "live" else "view_playback"

    def end(self, reason: str) -> None:
        """End the session now (revoked, access changed, hub closing); its handler closes
        the socket and writes the stop row."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.ended.set()


CamerasOf = Callable[[str], Awaitable[list[str]] | list[str]]


class ViewingService:
    """The viewing layer's state on one hub instance; see :func:`setup_viewing`."""

    def __init__(
        self,
        *,
        db: Database,
        broker: TunnelBroker,
        viewing_key: RecipientPrivateKey,
        signing_key: Ed25519PrivateKey,
        audit: AuditLog,
        store: AccountStore,
        limits: ViewingLimits,
        cameras_of: CamerasOf | None,
    ) -> None:
        self.db = db
        self.store = store
        self.broker = broker
        self.viewing_key = viewing_key
        self.signing_key = signing_key
        self.audit = audit
        self.limits = limits
        self.cameras_of = cameras_of
        self.cache = PlaintextCache(limits.plaintext_cache_bytes)
        self.sessions: dict[str, ViewingSession] = {}
        self.snapshot_users = TokenBucket(limits.snapshot_user_burst, limits.snapshot_user_rate)
        self.snapshot_cameras = TokenBucket(
            limits.snapshot_camera_burst, limits.snapshot_camera_rate
        )
        self.counters: collections.Counter[str] = collections.Counter()
        self._background: set[asyncio.Task[Any]] = set()

    # -- helpers ---------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def site(self, site_id: str) -> SiteAttrs:
        """The site's attributes, or 404 (unknown id; a malformed id never reaches the DB)."""
        if not is_valid_site_id(site_id):
            raise web.HTTPNotFound()

        def load() -> SiteAttrs | None:
            with self.db.engine.connect() as conn:
                return get_site(conn, site_id)

        site = await asyncio.to_thread(load)
        if site is None:
            raise web.HTTPNotFound()
        return site

    async def record(self, action: str, request: web.Request | None, **kw: Any) -> None:
        """Append an audit row (in a worker thread) with the request's source address."""
        await asyncio.to_thread(
            self.audit.record,
            action,
            source=client_source(request) if request is not None else None,
            **kw,
        )

    def open_sessions(self, user_id: int, kind: SessionKind) -> int:
        """How many live or playback sessions the user holds on this hub instance."""
        return sum(1 for s in self.sessions.values() if s.user_id == user_id and s.kind == kind)

    async def load_plaintext(
        self, site: str, camera: str, seq: int, *, user: int, session: str | None
    ) -> Plaintext:
        """The opened segment, from the cache or pulled sealed through the tunnel and opened
        in memory (in a worker thread: decryption of a 60 s segment takes milliseconds but
        must not stall the loop)."""

        async def load() -> Plaintext:
            sealed = await self.broker.fetch_segment(site, camera, seq, user=user, session=session)
            self.counters["segments_fetched"] += 1
            return await asyncio.to_thread(
                open_in_memory, sealed, self.viewing_key, site=site, camera=camera, seq=seq
            )

        return await self.cache.get((site, camera, seq), load)

    # -- revocation ------------------------------------------------------------------------

    def on_revocation(self, event: Revocation) -> None:
        """Called on the loop for every revocation: end what hangs on it, at once."""
        broker = self.broker
        if event.kind == "site_disabled" and event.site_id:
            broker.revoke(site=event.site_id)
            self.cache.drop(event.site_id)
            for s in [s for s in self.sessions.values() if s.site == event.site_id]:
                s.end("site_disabled")
        elif event.kind == "session_revoked" and event.session_hash:
            broker.revoke(session=event.session_hash)
            for s in [s for s in self.sessions.values() if s.session_hash == event.session_hash]:
                s.end("session_ended")
        elif event.kind in ("session_revoked", "user_disabled") and event.user_id is not None:
            broker.revoke(user=event.user_id)
            reason = "user_disabled" if event.kind == "user_disabled" else "session_ended"
            for s in [s for s in self.sessions.values() if s.user_id == event.user_id]:
                s.end(reason)
        elif event.kind == "grant_revoked" and event.user_id is not None:
            # The user may hold other grants that still cover some sessions: check each.
            self._spawn(self.recheck(user_id=event.user_id))

    async def recheck(self, user_id: int | None = None) -> int:
        """Check every open session (or one user's) against the database now: session
        still valid, user enabled, grant still covering the site, site enabled. Ends the
        sessions that fail; returns how many."""
        targets = [s for s in self.sessions.values() if user_id is None or s.user_id == user_id]
        if not targets:
            return 0
        store = self.store
        now = time.time()

        def check() -> list[tuple[ViewingSession, str]]:
            failed: list[tuple[ViewingSession, str]] = []
            principals: dict[int, Principal | None] = {}
            with self.db.engine.connect() as conn:
                for s in targets:
                    if s.user_id not in principals:
                        principals[s.user_id] = store.load_principal(s.user_id, now)
                    principal = principals[s.user_id]
                    if principal is None:
                        failed.append((s, "user_disabled"))
                        continue
                    if s.session_hash is not None:
                        row = conn.execute(
                            sa.select(sessions.c.revoked_at, sessions.c.expires_at).where(
                                sessions.c.token_hash == s.session_hash
                            )
                        ).first()
                        if row is None or row.revoked_at is not None or row.expires_at <= now:
                            failed.append((s, "session_ended"))
                            continue
                    site = get_site(conn, s.site)
                    if site is None or not can(principal, s.action, site, now):
                        failed.append((s, "access_changed"))
            return failed

        failed = await asyncio.to_thread(check)
        for s, reason in failed:
            if reason == "session_ended" and s.session_hash is not None:
                self.broker.revoke(site=s.site, camera=s.camera, session=s.session_hash)
            else:
                self.broker.revoke(site=s.site, camera=s.camera, user=s.user_id)
            s.end(reason)
        return len(failed)

    # -- shutdown --------------------------------------------------------------------------

    async def close(self) -> None:
        """End every open session (their handlers write the stop rows), at hub shutdown."""
        open_now = list(self.sessions.values())
        for s in open_now:
            s.end("hub_closing")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                for s in open_now:
                    await s.closed.wait()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)


VIEWING: web.AppKey[ViewingService] = web.AppKey("isocam_viewing", ViewingService)


# --------------------------------------------------------------------------------------------
# Request helpers


def _camera(request: web.Request) -> str:
    camera = request.match_info.get("camera", "")
    try:
        return _CAMERA_ID.validate_python(camera)
    except ValidationError:
        raise web.HTTPNotFound() from None


def _session_hash(request: web.Request) -> str | None:
    info = auth_of(request).session
    return info.token_hash if info is not None else None


def _same_origin(request: web.Request) -> None:
    """A WebSocket handshake is a GET (no CSRF token): refuse one opened by another origin
    (cross-site WebSocket hijacking; the SameSite=Strict cookie is the first defence)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return
    if urlsplit(origin).netloc != request.host:
        raise web.HTTPForbidden(reason="origin")


async def _page_gate(
    request: web.Request, action: Action, site: SiteAttrs, camera: str
) -> Principal:
    """Pages carry no footage: an allowed user gets the page without an audit row (the
    stream it then opens is audited); a refusal is audited by `require` and raises."""
    principal = principal_of(request)
    if principal is not None and can(principal, action, site, time.time()):
        return principal
    return await require(request, action, site, camera=camera)


def _float_param(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{name} must be a number (UNIX seconds)") from None
    if not math.isfinite(value) or not 1.5e9 <= value <= 4.1e9:
        raise web.HTTPBadRequest(reason=f"{name} is out of range")
    return value


def _local_param(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name, "")
    if not raw:
        return None
    try:
        return parse_local(raw)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{name} must be a date and time") from None


def _range(request: web.Request, limits: ViewingLimits) -> tuple[float, float]:
    """The requested range: ``start``/``end`` in UNIX seconds, or ``from``/``to`` as the
    page's date-time fields (Vietnam time); the last hour by default."""
    now = time.time()
    end = _float_param(request, "end") or _local_param(request, "to") or now
    start = _float_param(request, "start") or _local_param(request, "from")
    if start is None:
        start = end - 3600.0
    if not start < end:
        raise web.HTTPBadRequest(reason="start must be before end")
    if end - start > limits.playback_max_seconds:
        raise web.HTTPBadRequest(reason="the range is too long")
    return start, end


async def _send(ws: web.WebSocketResponse, data: bytes | str) -> None:
    if isinstance(data, bytes):
        await ws.send_bytes(data)
    else:
        await ws.send_str(data)


async def _until_client_closes(ws: web.WebSocketResponse) -> None:
    """Read (and ignore) what the browser sends until it closes the socket."""
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.ERROR:
            return


@contextlib.asynccontextmanager
async def _registered(service: ViewingService, session: ViewingSession) -> AsyncIterator[None]:
    service.sessions[session.viewing_id] = session
    try:
        yield
    finally:
        service.sessions.pop(session.viewing_id, None)
        session.closed.set()


def _close_code(reason: str) -> int:
    if reason in ("revoked", "session_ended", "user_disabled", "site_disabled", "access_changed"):
        return CLOSE_REVOKED
    if reason in ("viewer_closed", "hub_closing"):
        return 1000
    return CLOSE_UNAVAILABLE


async def _finish(ws: web.WebSocketResponse, reason: str) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
        if not ws.closed:
            await ws.send_str(json.dumps({"type": "end", "reason": reason}))
            await ws.close(code=_close_code(reason), message=reason.encode()[:120])


def _new_ws() -> web.WebSocketResponse:
    # The browser only sends a close; 64 KiB is plenty. Video does not compress.
    return web.WebSocketResponse(heartbeat=20.0, max_msg_size=64 * 1024, compress=False)


# --------------------------------------------------------------------------------------------
# Live


async def live_page(request: web.Request) -> web.StreamResponse:
    service = request.app[VIEWING]
    site = await service.site(request.match_info["site"])
    camera = _camera(request)
    await _page_gate(request, "view_live", site, camera)
    return page(request, "viewing/live.html", site=site, camera=camera)


async def live_ws(request: web.Request) -> web.StreamResponse:
    """Relay the camera's live fMP4 fragments to one browser (see the module docstring)."""
    service = request.app[VIEWING]
    site = await service.site(request.match_info["site"])
    camera = _camera(request)
    _same_origin(request)
    principal = await require(request, "view_live", site, camera=camera)
    stats: dict[str, int] = {"fragments": 0, "dropped": 0}
    return await _serve_session(
        request, principal, site, camera, "live",
        work=lambda session: _pump_live(service, session, stats),
        stop_detail=lambda _session: dict(stats),
    )  # fmt: skip


async def _serve_session(
    request: web.Request,
    principal: Principal,
    site: SiteAttrs,
    camera: str,
    kind: SessionKind,
    *,
    work: Callable[[ViewingSession], Awaitable[str]],
    stop_detail: Callable[[ViewingSession], dict[str, Any]],
    time_range: tuple[float, float] | None = None,
) -> web.WebSocketResponse:
    """Hold one live or playback session on the browser's WebSocket: refused past the user's
    limit of such sessions, audited when it starts and when it stops (why, how long, and
    `stop_detail`), running `work` until it, the browser or a revocation ends it."""
    service = request.app[VIEWING]
    limit = service.limits.live_per_user if kind == "live" else service.limits.playback_per_user
    if service.open_sessions(principal.user_id, kind) >= limit:
        raise web.HTTPTooManyRequests(reason=f"too many {kind} sessions")
    ws = _new_ws()
    try:
        await ws.prepare(request)
    except ConnectionResetError:  # the browser went away during the handshake
        return ws
    # A playback id is part of its segment URLs (_PLAYBACK_ID: 22 characters, 16 bytes).
    viewing_id = secrets.token_urlsafe(12 if kind == "live" else 16)
    session = ViewingSession(
        kind, viewing_id, principal.user_id, _session_hash(request), site.site_id, camera, ws,
        time_range=time_range,
    )  # fmt: skip
    audited = {"user": principal, "site": site, "camera": camera, "time_range": time_range}
    async with _registered(service, session):
        await service.record(
            f"{kind}_start", request, **audited, detail={"viewing": session.viewing_id}
        )
        service.counters[f"{kind}_sessions"] += 1
        try:
            await _run_session(session, work(session))
        finally:
            reason = session.stop_reason or "viewer_closed"
            await _finish(ws, reason)
            await service.record(
                f"{kind}_stop", request, **audited, reason=reason,
                detail={"viewing": session.viewing_id,
                        "seconds": round(time.time() - session.started, 3),
                        **stop_detail(session)},
            )  # fmt: skip
    return ws


async def _run_session(session: ViewingSession, work: Awaitable[str]) -> str:
    """Run the session's work until it ends, the browser closes, or `end()` is called."""
    work_task = asyncio.ensure_future(work)
    reader = asyncio.ensure_future(_until_client_closes(session.ws))
    ended = asyncio.ensure_future(session.ended.wait())
    tasks = {work_task, reader, ended}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if session.stop_reason is None:
            if work_task in done and not work_task.cancelled() and work_task.exception() is None:
                session.stop_reason = work_task.result()
            elif work_task in done:
                session.stop_reason = "failed"
            else:
                session.stop_reason = "viewer_closed"
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return session.stop_reason or "viewer_closed"


async def _pump_live(
    service: ViewingService, session: ViewingSession, stats: dict[str, int]
) -> str:
    ws = session.ws
    try:
        async with service.broker.live(
            session.site, session.camera, user=session.user_id, session=session.session_hash
        ) as stream:
            await ws.send_str(json.dumps({"type": "started"}))
            init: bytes | None = None
            scale = 90000
            try:
                async for fragment in stream:
                    if fragment.init is not init:
                        init = fragment.init
                        scale = timescale(init)
                        meta = {"codec": codec_string(init), "segment_seq": fragment.segment_seq}
                        await ws.send_bytes(record(KIND_INIT, meta, init))
                    meta2 = {
                        "seq": fragment.seq,
                        "segment_seq": fragment.segment_seq,
                        "keyframe": fragment.keyframe,
                        "wall": fragment.wall,
                        "t0": fragment_start(fragment.data) / scale,
                    }
                    await ws.send_bytes(record(KIND_FRAGMENT, meta2, fragment.data))
                    stats["fragments"] += 1
            finally:
                stats["dropped"] = stream.dropped
    except TunnelRevoked:
        return "revoked"
    except TunnelError as exc:
        log.info("live %s/%s ended: %s", session.site, session.camera, exc)
        return f"unavailable:{exc.reason}"[:60]
    except Mp4Error as exc:
        log.warning("live %s/%s: unreadable fragment: %s", session.site, session.camera, exc)
        return "bad_stream"
    except (ConnectionError, RuntimeError, aiohttp.ClientError):
        return "viewer_closed"
    return "ended"


# --------------------------------------------------------------------------------------------
# Playback


async def playback_page(request: web.Request) -> web.StreamResponse:
    service = request.app[VIEWING]
    site = await service.site(request.match_info["site"])
    camera = _camera(request)
    start, end = _range(request, service.limits)
    await _page_gate(request, "view_playback", site, camera)
    return page(
        request, "viewing/playback.html", site=site, camera=camera, start=start, end=end,
        start_local=_local_input(start), end_local=_local_input(end),
    )  # fmt: skip


def _local_input(ts: float) -> str:
    return datetime.fromtimestamp(ts, _VN_TZ).strftime("%Y-%m-%dT%H:%M:%S")


def parse_local(text: str) -> float:
    """A ``datetime-local`` form value in Vietnam time → UNIX seconds (ValueError if bad)."""
    text = text.strip()[:32]
    for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=_VN_TZ).timestamp()
        except ValueError:
            continue
    raise ValueError(f"not a date and time: {text!r}")


def listing_json(listing: SegmentListing, start: float, end: float) -> dict[str, Any]:
    """The listing as the player gets it: segments (seq order) and gaps, clipped to the range."""
    return {
        "range": {"start": start, "end": end},
        "segments": [
            {
                "seq": s.seq,
                "start": s.start,
                "end": s.end,
                "bytes": s.bytes,
                "finished": s.finished,
                "codec": s.codec,
            }
            for s in listing.segments
        ],
        "gaps": [
            {
                "start": max(g.start, start),
                "end": min(g.end if g.end is not None else end, end),
                "open": g.end is None,
                "cause": g.cause,
            }
            for g in listing.gaps
        ],
        "gaps_truncated": listing.gaps_truncated,
    }


async def playback_ws(request: web.Request) -> web.StreamResponse:
    """Authorize a playback range, send its listing, and hold the playback session (segment
    URLs work while this socket is open)."""
    service = request.app[VIEWING]
    site = await service.site(request.match_info["site"])
    camera = _camera(request)
    start, end = _range(request, service.limits)
    _same_origin(request)
    principal = await require(
        request, "view_playback", site, camera=camera, time_range=(start, end)
    )
    return await _serve_session(
        request, principal, site, camera, "playback",
        work=lambda session: _hold_playback(service, session),
        stop_detail=lambda session: {"segments_served": session.served,
                                     "bytes_served": session.served_bytes},
        time_range=(start, end),
    )  # fmt: skip


async def _hold_playback(service: ViewingService, session: ViewingSession) -> str:
    assert session.time_range is not None
    start, end = session.time_range
    try:
        listing = await service.broker.list_segments(
            session.site, session.camera, start, end,
            user=session.user_id, session=session.session_hash,
        )  # fmt: skip
    except TunnelRevoked:
        return "revoked"
    except TunnelError as exc:
        with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
            await session.ws.send_str(json.dumps({"type": "error", "reason": exc.reason}))
        return f"unavailable:{exc.reason}"[:60]
    session.listing = {s.seq: s for s in listing.segments}
    body = listing_json(listing, start, end)
    body.update(type="listing", session=session.viewing_id,
                base=f"/view/playback/{session.viewing_id}/")  # fmt: skip
    try:
        await session.ws.send_str(json.dumps(body))
    except (ConnectionError, RuntimeError, aiohttp.ClientError):
        return "viewer_closed"
    await asyncio.Event().wait()  # held until the browser closes or end() cancels
    return "viewer_closed"  # pragma: no cover


def _own_playback_session(
    request: web.Request, *, open_only: bool
) -> tuple[ViewingSession, Principal]:
    """The playback session the URL names, if it is this request's own (same user, same login
    session) and, with `open_only`, not yet stopped; else 404 (not telling whether it exists)."""
    session = request.app[VIEWING].sessions.get(request.match_info["pid"])
    principal = principal_of(request)
    if (
        session is None
        or session.kind != "playback"
        or (open_only and session.stop_reason is not None)
        or principal is None
        or principal.user_id != session.user_id
        or _session_hash(request) != session.session_hash
    ):
        raise web.HTTPNotFound()
    return session, principal


async def _playback_segment(request: web.Request) -> tuple[ViewingSession, Plaintext]:
    """The opened segment for a request under a playback session, with every check: the
    session is open and this request's own (user and login session), the user may still play
    back this site, the segment is in the session's listing."""
    service = request.app[VIEWING]
    session, principal = _own_playback_session(request, open_only=True)
    site = await service.site(session.site)
    if not can(principal, "view_playback", site, time.time()):
        await require(request, "view_playback", site, camera=session.camera,
                      time_range=session.time_range)  # fmt: skip
    seq = int(request.match_info["seq"])
    if seq not in session.listing:
        raise web.HTTPNotFound()
    try:
        plain = await service.load_plaintext(
            session.site, session.camera, seq, user=session.user_id, session=session.session_hash
        )
    except TunnelRevoked:
        raise web.HTTPForbidden() from None
    except (SegmentMismatch, SegmentUnreadable) as exc:
        altered = isinstance(exc, SegmentMismatch)
        await service.record(
            "segment_mismatch" if altered else "segment_unreadable", request, user=principal,
            site=site, camera=session.camera, reason=str(exc)[:900], detail={"seq": seq},
        )  # fmt: skip
        reason = "segment altered at the edge" if altered else "segment does not open"
        raise web.HTTPBadGateway(reason=reason) from None
    except RemoteError as exc:
        raise web.HTTPNotFound(reason=f"edge: {exc.reason}") from None
    except TunnelError as exc:
        raise web.HTTPGatewayTimeout(reason=f"site unavailable: {exc.reason}") from None
    session.served += 1
    return session, plain


async def playback_segment(request: web.Request) -> web.StreamResponse:
    """One segment as a whole fMP4 (init + fragments), for MSE."""
    session, plain = await _playback_segment(request)
    session.served_bytes += plain.size
    return web.Response(
        body=plain.whole,
        content_type="video/mp4",
        headers={"X-Isocam-Codec": codec_string(plain.init)},
    )


async def playback_init(request: web.Request) -> web.StreamResponse:
    """HLS: the segment's init section (``EXT-X-MAP``)."""
    _session, plain = await _playback_segment(request)
    return web.Response(body=plain.init, content_type="video/mp4")


async def playback_media(request: web.Request) -> web.StreamResponse:
    """HLS: the segment's media fragments."""
    session, plain = await _playback_segment(request)
    session.served_bytes += len(plain.media)
    return web.Response(body=plain.media, content_type="video/iso.segment")


def hls_playlist(segments: list[SegmentInfo]) -> str:
    """An HLS (fMP4, RFC 8216 version 7) VOD playlist of the session's segments. Each segment
    has its own init section and restarts its timestamps, hence a discontinuity before each;
    program date-times put every segment at its wall-clock time (gaps stay gaps)."""
    lines = [
        "#EXTM3U",
        "#EXT-X-VERSION:7",
        f"#EXT-X-TARGETDURATION:{max([math.ceil(s.end - s.start) for s in segments] or [1])}",
        "#EXT-X-PLAYLIST-TYPE:VOD",
        "#EXT-X-MEDIA-SEQUENCE:0",
        "#EXT-X-INDEPENDENT-SEGMENTS",
    ]
    for i, s in enumerate(segments):
        if i:
            lines.append("#EXT-X-DISCONTINUITY")
        when = datetime.fromtimestamp(s.start, UTC).isoformat(timespec="milliseconds")
        lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{when.replace('+00:00', 'Z')}")
        lines.append(f'#EXT-X-MAP:URI="{s.seq}/init.mp4"')
        lines.append(f"#EXTINF:{max(s.end - s.start, 0.001):.3f},")
        lines.append(f"{s.seq}/media.m4s")
    lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


async def playback_playlist(request: web.Request) -> web.StreamResponse:
    session, _principal = _own_playback_session(request, open_only=False)
    segments = [session.listing[k] for k in sorted(session.listing)]
    return web.Response(text=hls_playlist(segments), content_type="application/vnd.apple.mpegurl")


# --------------------------------------------------------------------------------------------
# Snapshots and the site page


async def snapshot(request: web.Request) -> web.StreamResponse:
    """A JPEG of the camera; rate-limited per user and per camera before anything is asked of
    the site (or written to the audit log)."""
    service = request.app[VIEWING]
    site = await service.site(request.match_info["site"])
    camera = _camera(request)
    principal = principal_of(request)
    who = f"u{principal.user_id}" if principal is not None else f"a{client_source(request)}"
    wait = max(
        service.snapshot_users.take(who),
        service.snapshot_cameras.take(f"{site.site_id}/{camera}"),
    )
    if wait > 0:
        service.counters["snapshots_limited"] += 1
        # Returned, not raised: the error pages would drop Retry-After.
        return web.Response(
            status=429,
            text="snapshot rate limit / giới hạn tần suất ảnh chụp\n",
            headers={"Retry-After": str(math.ceil(wait))},
        )
    principal = await require(request, "view_snapshot", site, camera=camera)
    try:
        jpeg = await service.broker.snapshot(
            site.site_id, camera, user=principal.user_id, session=_session_hash(request)
        )
    except TunnelRevoked:
        raise web.HTTPForbidden() from None
    except RemoteError as exc:
        raise web.HTTPNotFound(reason=f"edge: {exc.reason}") from None
    except TunnelError as exc:
        raise web.HTTPGatewayTimeout(reason=f"site unavailable: {exc.reason}") from None
    service.counters["snapshots"] += 1
    return web.Response(body=jpeg, content_type="image/jpeg")


async def site_page(request: web.Request) -> web.StreamResponse:
    """The cameras of a site, with links to live view and playback (cameras from the
    `cameras_of` hook; the page itself carries no footage)."""
    service = request.app[VIEWING]
    site = await service.site(request.match_info["site"])
    principal = principal_of(request)
    now = time.time()
    if principal is None or not (
        can(principal, "view_live", site, now) or can(principal, "view_playback", site, now)
    ):
        await require(request, "view_live", site)
        raise web.HTTPForbidden()  # pragma: no cover - require raised
    cameras: list[str] | None = None
    if service.cameras_of is not None:
        found = service.cameras_of(site.site_id)
        cameras = list(await found if inspect.isawaitable(found) else found)
    return page(
        request, "viewing/site.html", site=site, cameras=cameras,
        snapshots=can(principal, "view_snapshot", site, now),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Setup


def setup_viewing(
    app: web.Application,
    *,
    db: Database,
    broker: TunnelBroker,
    viewing_key: RecipientPrivateKey,
    signing_key: Ed25519PrivateKey,
    audit: AuditLog | None = None,
    limits: ViewingLimits | None = None,
    cameras_of: CamerasOf | None = None,
    export_config: Any = None,
    mount_tunnel: bool = True,
) -> ViewingService:
    """Mount live view, playback, snapshots and exports on `app`.

    Needs `setup_auth(app, db, ...)` first (sessions, CSRF, `require`, the templates). `db`
    must be migrated after importing :mod:`central_hub.export` (its table). `broker` must be
    used from the app's event loop; with ``mount_tunnel`` (default) its endpoint is added at
    ``/edge/tunnel``. `viewing_key` opens sealed segments (in memory); `signing_key` signs
    export bundles. `audit` defaults to the auth layer's log; `cameras_of(site_id)` (sync or
    async) lists a site's cameras for the site page, when the hub knows them.
    """
    from central_hub import export  # late: export builds on this module

    if AUTH not in app:
        raise RuntimeError("call setup_auth(app, ...) before setup_viewing")
    service = ViewingService(
        db=db,
        broker=broker,
        viewing_key=viewing_key,
        signing_key=signing_key,
        audit=audit or app[AUTH].audit,
        store=app[AUTH].store,
        limits=limits or ViewingLimits(),
        cameras_of=cameras_of,
    )
    app[VIEWING] = service
    r = app.router
    base = f"/view/{{site:{_ID}}}"
    cam = f"{base}/{{camera:{_ID}}}"
    r.add_get(base, site_page)
    r.add_get(f"{cam}/live", live_page)
    r.add_get(f"{cam}/live/ws", live_ws)
    r.add_get(f"{cam}/playback", playback_page)
    r.add_get(f"{cam}/playback/ws", playback_ws)
    r.add_get(f"{cam}/snapshot.jpg", snapshot)
    pb = f"/view/playback/{{pid:{_PLAYBACK_ID}}}"
    r.add_get(f"{pb}/index.m3u8", playback_playlist)
    r.add_get(f"{pb}/{{seq:[0-9]{{1,15}}}}.mp4", playback_segment)
    r.add_get(f"{pb}/{{seq:[0-9]{{1,15}}}}/init.mp4", playback_init)
    r.add_get(f"{pb}/{{seq:[0-9]{{1,15}}}}/media.m4s", playback_media)
    if mount_tunnel:
        r.add_get(TUNNEL_PATH, broker.handle)
    export.setup_export(app, service, export_config)
    app.cleanup_ctx.append(_lifecycle)
    return service


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Subscribe to revocations, re-check open sessions periodically; end them at shutdown."""
    service = app[VIEWING]
    unsubscribe = subscribe_revocations(app, service.on_revocation)

    async def rechecks() -> None:
        while True:
            await asyncio.sleep(service.limits.recheck_seconds)
            try:
                await service.recheck()
            except Exception:
                log.exception("re-checking open viewing sessions failed")

    task = asyncio.create_task(rechecks())
    yield
    unsubscribe()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await service.close()
