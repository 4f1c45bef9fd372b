"""The viewing tunnel's wire protocol: what the edge and the hub say over the WebSocket.

The edge box sits behind NAT and never listens. On an authorized view request the hub publishes
`open_tunnel` (`sitelink.messages.OpenTunnel`) over MQTT; the edge dials the hub instance named
in it over WSS and both sides speak this protocol. Both sides import this module; docs/viewing.md
describes it for people.

Handshake (text frames, JSON)::

    edge dials hub_url, offering WebSocket subprotocol `isocam-tunnel.v1`
    hub  → edge  challenge {nonce}                      fresh 256-bit nonce per connection
    edge → hub   hello {site, camera, purpose, hub_url, token, nonce, key_id, signature}
    hub  → edge  welcome {tunnel_id, idle_seconds}      or  refused {reason, message} + close 4401

The signature is the site's Ed25519 device key over `canonical_json(hello_statement(...))`: the
token (one-time, bound by the hub to site + camera + purpose + hub instance + expiry) proves the
hub asked for this tunnel; the signature proves which box answered, and the nonce makes a
recorded hello useless on any other connection.

After the welcome the hub sends requests (`live`, `list`, `fetch`, `snapshot`, `cancel`), each
with a request id it chooses; the edge answers each with exactly one reply (`live_reply`,
`list_reply`, `fetch_reply`, `snapshot_reply` or `error`). Bulk data travels in binary frames
tagged with the request id (`FrameKind`): live init segments and fragments, segment chunks, one
snapshot. Streams end with `live_end` / `fetch_done`. Everything a peer sends is validated
strictly (pydantic models, closed and typed like `sitelink.messages`; binary frames by
`decode_frame`); anything else is a `TunnelProtocolError` and closes the tunnel with code 4400.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import math
import secrets
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

from sitelink.messages import (
    TS_MAX,
    TS_MIN,
    CameraId,
    Cause,
    Detail,
    HubUrl,
    KeyId,
    Purpose,
    Sha256Hex,
    Signature,
    Timestamp,
    Token,
    canonical_json,
    key_id_for,
)

#: WebSocket subprotocol; a peer that does not offer it is not spoken to.
SUBPROTOCOL = "isocam-tunnel.v1"
PROTOCOL_VERSION = 1
#: Where the hub mounts the tunnel endpoint (a convention; `hub_url` carries the full path).
TUNNEL_PATH = "/edge/tunnel"

# --- size limits ------------------------------------------------------------------------------
# Every limit is checked before the data is used; aiohttp enforces the per-message maximum
# (`max_msg_size`) before a frame is even assembled.

#: Largest text frame (JSON). A full `list_reply` page is ~2,000 x 190 B segments + gaps.
MAX_CONTROL_BYTES = 1024 * 1024
#: Largest init segment (ftyp + moov: ~1 KiB for one H.264/H.265 track).
MAX_INIT_BYTES = 1024 * 1024
#: Largest live fragment: ~1 s of a 4K stream at 50 Mbit/s is 6.25 MB.
MAX_FRAGMENT_BYTES = 8 * 1024 * 1024
#: Segment files travel in chunks of at most this many bytes (and exactly this many, except
#: the last): small enough to interleave with other requests, big enough to cost little.
CHUNK_BYTES = 256 * 1024
#: Largest segment file served: 60 s at 32 Mbit/s is 240 MB; a file beyond this is not ours.
MAX_SEGMENT_BYTES = 1024 * 1024 * 1024
#: Largest snapshot (JPEG).
MAX_SNAPSHOT_BYTES = 4 * 1024 * 1024
#: Segments per `list_reply` page, and gaps in the first page.
MAX_LIST_SEGMENTS = 2000
MAX_LIST_GAPS = 2000
#: Largest time range one `list` request may cover (a retention period with room to spare).
MAX_LIST_SPAN_SECONDS = 400 * 86400.0
#: Requests one tunnel serves at once (a live stream counts as one for its whole life); the
#: edge answers more with `busy`, the hub queues them.
MAX_REQUESTS_PER_TUNNEL = 4

_HEADER = struct.Struct(">BBI")  # protocol version, frame kind, request id
_INIT_META = struct.Struct(">Q")  # segment seq
_FRAGMENT_META = struct.Struct(">QQdB")  # seq, segment seq, wall, flags
_CHUNK_META = struct.Struct(">Q")  # offset in the file
#: The binary frame with the biggest payload plus its headers: the WebSocket message limit of
#: whoever receives binary frames (the hub).
MAX_FRAME_BYTES = _HEADER.size + _FRAGMENT_META.size + MAX_FRAGMENT_BYTES

_FLAG_KEYFRAME = 0x01
_MAX_U32 = 2**32 - 1
_MAX_U63 = 2**63 - 1
_JS_INT_MAX = 2**53 - 1

# --- WebSocket close codes --------------------------------------------------------------------

CLOSE_NORMAL = 1000  # done, or idle (reason text says which)
CLOSE_GOING_AWAY = 1001  # the hub or the edge is shutting down
CLOSE_PROTOCOL = 4400  # a peer sent something outside this protocol
CLOSE_REFUSED = 4401  # the hello was refused (a `refused` message went first)
CLOSE_REVOKED = 4403  # the hub ended the tunnel: access to the site was revoked
CLOSE_TIMEOUT = 4408  # the handshake did not complete in time

# --- errors -----------------------------------------------------------------------------------

RefusalReason = Literal[
    "bad_hello",
    "unknown_token",
    "token_used",
    "token_expired",
    "token_mismatch",
    "wrong_hub",
    "bad_nonce",
    "unknown_site",
    "wrong_key",
    "bad_signature",
]

#: Why the hub refuses a hello, with the meaning (docs/viewing.md lists them).
REFUSAL_REASONS: dict[RefusalReason, str] = {
    "bad_hello": "the first message was not a well-formed hello",
    "unknown_token": "no such token was issued by this hub instance (or it expired long ago)",
    "token_used": "the token was already presented once (tokens are one-time)",
    "token_expired": "the token's validity (`expires`) has passed",
    "token_mismatch": "the token was issued for another site, camera or purpose",
    "wrong_hub": "the token was issued by another hub instance (hub_url differs)",
    "bad_nonce": "the hello does not answer this connection's challenge",
    "unknown_site": "the hub has no device public key for the site (not registered, disabled)",
    "wrong_key": "the hello names a device key other than the one registered for the site",
    "bad_signature": "the device-key signature over the hello does not verify",
}

ErrorCode = Literal[
    "unknown_camera",
    "not_found",
    "bad_request",
    "forbidden",
    "busy",
    "too_large",
    "unavailable",
    "failed",
]

#: Codes of an `error` reply (the edge could not do what a request asked).
ERROR_CODES: dict[ErrorCode, str] = {
    "unknown_camera": "the camera is not recording on this box (no live tap)",
    "not_found": "no such segment in the index, or its file is missing",
    "bad_request": "well-formed but impossible: end before start, a range over the span limit",
    "forbidden": "the request does not fit the tunnel's purpose, or its file is outside DATA",
    "busy": "too many requests in flight on this tunnel (or a second live stream)",
    "too_large": "the answer would exceed a size limit of this protocol",
    "unavailable": "nothing to answer with yet (e.g. no snapshot of that camera)",
    "failed": "the edge failed while answering (its log says why)",
}

ProtocolReason = Literal["bad_json", "schema", "bad_frame", "too_large", "unexpected"]


class TunnelError(Exception):
    """Base of every tunnel failure; `reason` is a short machine code for logs and counters."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TunnelProtocolError(TunnelError):
    """A peer sent something outside this protocol; the tunnel is closed with 4400."""


class TunnelRefused(TunnelError):
    """The hub refused the hello; `reason` is one of `REFUSAL_REASONS`."""


class TunnelUnavailable(TunnelError):
    """No tunnel: the peer could not be reached, did not dial in, or the tunnel went away."""


# --- field types ------------------------------------------------------------------------------

SiteId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{1,62}[a-z0-9]$")]
#: 32 random bytes, URL-safe base64 without padding.
Nonce = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{43}$")]
TunnelId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{8,64}$")]
RequestNumber = Annotated[int, Field(ge=1, le=_MAX_U32)]
SegmentSeq = Annotated[int, Field(ge=1, le=_JS_INT_MAX)]
ByteCount = Annotated[int, Field(ge=0, le=MAX_SEGMENT_BYTES)]
CodecName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]{1,16}$")]
Version = Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")]


class _Strict(BaseModel):
    """Closed, strict, immutable; errors never echo the input (a hello holds a token)."""

    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, allow_inf_nan=False, hide_input_in_errors=True
    )


class _Msg(_Strict):
    # `v` is required on the wire; Python callers need not write it (as sitelink.messages).
    if TYPE_CHECKING:
        v: Literal[1] = 1
    else:
        v: Literal[1] = Field(description="protocol version, always 1")
    type: str

    def __init__(self, **data: Any) -> None:
        data.setdefault("v", PROTOCOL_VERSION)
        super().__init__(**data)

    # JSON goes straight to the core validator; only Python construction passes __init__.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


# --- handshake --------------------------------------------------------------------------------


class Challenge(_Msg):
    """hub → edge, first message: the nonce the hello must sign."""

    type: Literal["challenge"] = "challenge"
    nonce: Nonce
    hub_time: Timestamp = Field(description="the hub's clock, for the edge's log")


class Hello(_Msg):
    """edge → hub: which tunnel this is, the one-time token, and the device key's signature."""

    type: Literal["hello"] = "hello"
    site: SiteId
    camera: CameraId
    purpose: Purpose
    hub_url: HubUrl = Field(description="the URL the edge dialed (from `open_tunnel`)")
    token: Token
    nonce: Nonce
    key_id: KeyId = Field(description="which device key signed")
    agent_version: Version | None = None
    signature: Signature = Field(description="Ed25519 over canonical_json(hello_statement)")

    def statement(self) -> dict[str, Any]:
        """What the signature covers."""
        return hello_statement(
            self.site, self.camera, self.purpose, self.hub_url, self.token, self.nonce
        )


class Welcome(_Msg):
    """hub → edge: authenticated; requests follow."""

    type: Literal["welcome"] = "welcome"
    tunnel_id: TunnelId
    idle_seconds: float = Field(gt=0, le=86400, description="the hub closes an idle tunnel after")


class Refused(_Msg):
    """hub → edge: not authenticated; the hub closes with 4401 right after."""

    type: Literal["refused"] = "refused"
    reason: RefusalReason
    message: Detail


def hello_statement(
    site: str, camera: str, purpose: str, hub_url: str, token: str, nonce: str
) -> dict[str, Any]:
    """The statement a hello signs. The token enters as its SHA-256 so a signature alone never
    reveals it."""
    return {
        "type": "isocam.tunnel_hello.v1",
        "site": site,
        "camera": camera,
        "purpose": purpose,
        "hub_url": hub_url,
        "token_sha256": token_digest(token),
        "nonce": nonce,
    }


def make_hello(
    *,
    key: Ed25519PrivateKey,
    site: str,
    camera: str,
    purpose: Purpose,
    hub_url: str,
    token: str,
    nonce: str,
    agent_version: str | None = None,
) -> Hello:
    """A signed hello (the edge's side of the handshake)."""
    statement = hello_statement(site, camera, purpose, hub_url, token, nonce)
    signature = base64.b64encode(key.sign(canonical_json(statement))).decode("ascii")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return Hello(
        site=site,
        camera=camera,
        purpose=purpose,
        hub_url=hub_url,
        token=token,
        nonce=nonce,
        key_id=key_id_for(raw),
        agent_version=agent_version,
        signature=signature,
    )


def public_key_id(key: Ed25519PublicKey) -> str:
    """`key_id` of a device public key (first 16 hex digits of SHA-256 over its raw bytes)."""
    return key_id_for(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def verify_hello(key: Ed25519PublicKey, hello: Hello) -> bool:
    """True if `hello.signature` is `key`'s signature over the hello's statement."""
    try:
        key.verify(
            base64.b64decode(hello.signature, validate=True), canonical_json(hello.statement())
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def token_digest(token: str) -> str:
    """SHA-256 hex of a token: what the hub stores and the hello signs, never the token."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def new_nonce() -> str:
    """A fresh challenge nonce (256 bits)."""
    return secrets.token_urlsafe(32)


# --- requests (hub → edge) --------------------------------------------------------------------


class LiveRequest(_Msg):
    """Start relaying the camera's live fragments (from its newest keyframe on)."""

    type: Literal["live"] = "live"
    id: RequestNumber


class ListRequest(_Msg):
    """Segments and gaps of the camera overlapping [start, end]; paged by `after_seq`."""

    type: Literal["list"] = "list"
    id: RequestNumber
    start: Timestamp
    end: Timestamp
    after_seq: SegmentSeq | None = Field(
        default=None, description="continue after this seq (a later page: no gaps repeated)"
    )
    limit: int = Field(default=MAX_LIST_SEGMENTS, ge=1, le=MAX_LIST_SEGMENTS)


class FetchRequest(_Msg):
    """Send one indexed segment file as it is on disk (sealed), in chunks."""

    type: Literal["fetch"] = "fetch"
    id: RequestNumber
    seq: SegmentSeq


class SnapshotRequest(_Msg):
    """Send a JPEG of the camera's latest picture."""

    type: Literal["snapshot"] = "snapshot"
    id: RequestNumber


class Cancel(_Msg):
    """Stop the stream of request `id` (a live stream, a fetch); no reply of its own."""

    type: Literal["cancel"] = "cancel"
    id: RequestNumber


Request = LiveRequest | ListRequest | FetchRequest | SnapshotRequest
HubMessage = Annotated[
    Challenge | Welcome | Refused | LiveRequest | ListRequest | FetchRequest | SnapshotRequest
    | Cancel,
    Field(discriminator="type"),
]  # fmt: skip

#: Which requests a tunnel of each purpose serves (the edge and the hub both check).
OPS_BY_PURPOSE: dict[str, frozenset[str]] = {
    "live": frozenset({"live"}),
    "playback": frozenset({"list", "fetch"}),
    "snapshot": frozenset({"snapshot"}),
}


# --- replies (edge → hub) ---------------------------------------------------------------------


class SegmentInfo(_Strict):
    """One indexed segment, as the edge's index row says."""

    seq: SegmentSeq
    start: Timestamp
    end: Timestamp
    bytes: ByteCount
    fragments: int = Field(ge=0, le=_JS_INT_MAX)
    finished: bool
    codec: CodecName
    sha256: Sha256Hex
    #: the segment's link in the camera's hash chain (index row hash, and the previous row's):
    #: an export manifest carries them so the footage can be tied to signed chain heads
    row_hash: Sha256Hex | None = None
    prev_hash: Sha256Hex | None = None


class GapInfo(_Strict):
    """A stretch without recording; `end` absent while it lasts."""

    start: Timestamp
    end: Timestamp | None = None
    cause: Cause


class LiveReply(_Msg):
    """Live stream accepted: `init` and `fragment` frames with this id follow."""

    type: Literal["live_reply"] = "live_reply"
    id: RequestNumber


class LiveEnd(_Msg):
    """The live stream of `id` ended (cancelled, or the recorder went away)."""

    type: Literal["live_end"] = "live_end"
    id: RequestNumber
    reason: Literal["cancelled", "recorder_stopped"]


class ListReply(_Msg):
    """One page of segments (chain order) and, in the first page, the gaps."""

    type: Literal["list_reply"] = "list_reply"
    id: RequestNumber
    segments: list[SegmentInfo] = Field(max_length=MAX_LIST_SEGMENTS)
    gaps: list[GapInfo] = Field(max_length=MAX_LIST_GAPS)
    truncated: bool = Field(description="more segments follow: ask again with after_seq")
    gaps_truncated: bool = False


class FetchReply(_Msg):
    """Fetch accepted: `size` bytes follow in `chunk` frames, then `fetch_done`."""

    type: Literal["fetch_reply"] = "fetch_reply"
    id: RequestNumber
    seq: SegmentSeq
    size: ByteCount = Field(description="size of the file as it is now")
    index_bytes: ByteCount = Field(description="size recorded in the index row")
    index_sha256: Sha256Hex = Field(description="SHA-256 recorded in the index row")


class FetchDone(_Msg):
    """All chunks of a fetch were sent; `sha256` is over the bytes sent."""

    type: Literal["fetch_done"] = "fetch_done"
    id: RequestNumber
    size: ByteCount
    sha256: Sha256Hex


class SnapshotReply(_Msg):
    """Snapshot accepted: exactly one `snapshot` frame of `size` bytes follows."""

    type: Literal["snapshot_reply"] = "snapshot_reply"
    id: RequestNumber
    size: int = Field(ge=1, le=MAX_SNAPSHOT_BYTES)


class ErrorReply(_Msg):
    """The request `id` failed; it has no further frames."""

    type: Literal["error"] = "error"
    id: RequestNumber
    code: ErrorCode
    message: Detail


Reply = LiveReply | LiveEnd | ListReply | FetchReply | FetchDone | SnapshotReply | ErrorReply
EdgeMessage = Annotated[
    Hello | LiveReply | LiveEnd | ListReply | FetchReply | FetchDone | SnapshotReply | ErrorReply,
    Field(discriminator="type"),
]

_HUB_MESSAGE: TypeAdapter[Any] = TypeAdapter(HubMessage)
_EDGE_MESSAGE: TypeAdapter[Any] = TypeAdapter(EdgeMessage)

_M = TypeVar("_M", bound=BaseModel)


def encode_message(message: _Msg) -> str:
    """Compact JSON text of a control message; absent optional fields are left out."""
    text = message.model_dump_json(exclude_none=True)
    if len(text) > MAX_CONTROL_BYTES:
        raise TunnelProtocolError(
            "too_large", f"{message.type} encodes to {len(text)} bytes, over {MAX_CONTROL_BYTES}"
        )
    return text


def decode_hub_message(data: str | bytes) -> Any:
    """Validate a text frame the edge received (a `HubMessage` member)."""
    return _decode(_HUB_MESSAGE, data, "hub message")


def decode_edge_message(data: str | bytes) -> Any:
    """Validate a text frame the hub received (an `EdgeMessage` member)."""
    return _decode(_EDGE_MESSAGE, data, "edge message")


def expect(message: Any, kind: type[_M]) -> _M:
    """`message` if it is a `kind`, else a TunnelProtocolError naming both."""
    if not isinstance(message, kind):
        got = getattr(message, "type", type(message).__name__)
        wanted = kind.model_fields["type"].default
        raise TunnelProtocolError("unexpected", f"expected a {wanted} message, got {got}")
    return message


def _decode(adapter: TypeAdapter[Any], data: str | bytes, what: str) -> Any:
    if len(data) > MAX_CONTROL_BYTES:
        raise TunnelProtocolError("too_large", f"{what} of {len(data)} bytes")
    try:
        return adapter.validate_json(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        first = errors[0]
        if first["type"] == "json_invalid":
            raise TunnelProtocolError("bad_json", f"{what}: not JSON ({first['msg']})") from None
        if first["type"] == "union_tag_invalid":
            raise TunnelProtocolError("unexpected", f"{what}: unknown type") from None
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise TunnelProtocolError("schema", f"{what}: {where}: {first['msg']}") from None


# --- binary frames ----------------------------------------------------------------------------


class FrameKind(enum.IntEnum):
    """Binary frame kinds. Layout (big endian): version u8, kind u8, request id u32, then

    - INIT: segment seq u64, init segment (ftyp + moov)
    - FRAGMENT: seq u64, segment seq u64, wall f64 (UNIX s), flags u8 (bit 0: starts with a
      keyframe), fragment (moof + mdat)
    - CHUNK: offset u64, up to CHUNK_BYTES of the sealed segment file
    - SNAPSHOT: one JPEG image
    """

    INIT = 1
    FRAGMENT = 2
    CHUNK = 3
    SNAPSHOT = 4


@dataclass(frozen=True, slots=True)
class InitFrame:
    """The init segment (ftyp + moov) that the following fragments need."""

    request_id: int
    segment_seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class FragmentFrame:
    """One live fMP4 fragment: `seq` +1 per fragment of the recorder's life (a jump means
    fragments were skipped, and then the fragment is a keyframe); `wall` is the receipt time
    of its first packet at the edge."""

    request_id: int
    seq: int
    segment_seq: int
    wall: float
    keyframe: bool
    data: bytes


@dataclass(frozen=True, slots=True)
class ChunkFrame:
    """Bytes of a fetched segment file starting at `offset`."""

    request_id: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class SnapshotFrame:
    """The JPEG announced by a `snapshot_reply`."""

    request_id: int
    data: bytes


Frame = InitFrame | FragmentFrame | ChunkFrame | SnapshotFrame

# Top-level boxes a media fragment may start with (FFmpeg writes moof; styp/sidx/prft may come
# first, see edge_agent.fmp4).
_FRAGMENT_BOXES = frozenset({b"moof", b"styp", b"sidx", b"prft", b"emsg"})


def encode_init(request_id: int, segment_seq: int, data: bytes) -> bytes:
    """An INIT frame."""
    return _encode(
        FrameKind.INIT, request_id, data, MAX_INIT_BYTES, "init segment", _INIT_META, segment_seq
    )


def encode_fragment(
    request_id: int, seq: int, segment_seq: int, wall: float, keyframe: bool, data: bytes
) -> bytes:
    """A FRAGMENT frame."""
    flags = _FLAG_KEYFRAME if keyframe else 0
    return _encode(
        FrameKind.FRAGMENT, request_id, data, MAX_FRAGMENT_BYTES, "fragment",
        _FRAGMENT_META, seq, segment_seq, wall, flags,
    )  # fmt: skip


def encode_chunk(request_id: int, offset: int, data: bytes) -> bytes:
    """A CHUNK frame."""
    return _encode(FrameKind.CHUNK, request_id, data, CHUNK_BYTES, "chunk", _CHUNK_META, offset)


def encode_snapshot(request_id: int, data: bytes) -> bytes:
    """A SNAPSHOT frame."""
    return _encode(FrameKind.SNAPSHOT, request_id, data, MAX_SNAPSHOT_BYTES, "snapshot")


def _encode(
    kind: FrameKind,
    request_id: int,
    data: bytes,
    limit: int,
    what: str,
    layout: struct.Struct | None = None,
    *meta: Any,
) -> bytes:
    """Header, the kind's fields (`meta` packed with `layout`), payload; the id and payload
    are checked before anything is packed."""
    _check_id(request_id)
    _check_payload(data, limit, what)
    fields = layout.pack(*meta) if layout is not None else b""
    return _HEADER.pack(PROTOCOL_VERSION, kind, request_id) + fields + data


def decode_frame(frame: bytes) -> Frame:
    """Parse and check a binary frame; TunnelProtocolError("bad_frame" / "too_large") if not."""
    if len(frame) > MAX_FRAME_BYTES:
        raise TunnelProtocolError("too_large", f"binary frame of {len(frame)} bytes")
    if len(frame) < _HEADER.size:
        raise TunnelProtocolError("bad_frame", f"binary frame of {len(frame)} bytes is too short")
    version, kind, request_id = _HEADER.unpack_from(frame)
    if version != PROTOCOL_VERSION:
        raise TunnelProtocolError("bad_frame", f"binary frame version {version}")
    if request_id == 0:
        raise TunnelProtocolError("bad_frame", "binary frame for request id 0")
    body = _HEADER.size
    if kind == FrameKind.FRAGMENT:
        meta = _meta(frame, body, _FRAGMENT_META, "fragment")
        seq, segment_seq, wall, flags = meta
        data = frame[body + _FRAGMENT_META.size :]
        if not 1 <= seq <= _MAX_U63 or not 1 <= segment_seq <= _JS_INT_MAX:
            raise TunnelProtocolError("bad_frame", "fragment seq out of range")
        if not (math.isfinite(wall) and TS_MIN <= wall < TS_MAX):
            raise TunnelProtocolError("bad_frame", "fragment wall time out of range")
        if flags & ~_FLAG_KEYFRAME:
            raise TunnelProtocolError("bad_frame", f"fragment has unknown flags {flags:#x}")
        _check_frame_payload(data, MAX_FRAGMENT_BYTES, "fragment")
        if data[4:8] not in _FRAGMENT_BOXES:
            raise TunnelProtocolError("bad_frame", "fragment does not start with moof/styp")
        return FragmentFrame(request_id, seq, segment_seq, wall, bool(flags), data)
    if kind == FrameKind.INIT:
        (segment_seq,) = _meta(frame, body, _INIT_META, "init")
        data = frame[body + _INIT_META.size :]
        if not 1 <= segment_seq <= _JS_INT_MAX:
            raise TunnelProtocolError("bad_frame", "init segment seq out of range")
        _check_frame_payload(data, MAX_INIT_BYTES, "init segment")
        if data[4:8] != b"ftyp":
            raise TunnelProtocolError("bad_frame", "init segment does not start with ftyp")
        return InitFrame(request_id, segment_seq, data)
    if kind == FrameKind.CHUNK:
        (offset,) = _meta(frame, body, _CHUNK_META, "chunk")
        data = frame[body + _CHUNK_META.size :]
        if offset > MAX_SEGMENT_BYTES:
            raise TunnelProtocolError("bad_frame", "chunk offset out of range")
        _check_frame_payload(data, CHUNK_BYTES, "chunk")
        return ChunkFrame(request_id, offset, data)
    if kind == FrameKind.SNAPSHOT:
        data = frame[body:]
        _check_frame_payload(data, MAX_SNAPSHOT_BYTES, "snapshot")
        if not data.startswith(b"\xff\xd8\xff"):
            raise TunnelProtocolError("bad_frame", "snapshot is not a JPEG image")
        return SnapshotFrame(request_id, data)
    raise TunnelProtocolError("bad_frame", f"unknown binary frame kind {kind}")


def _meta(frame: bytes, at: int, layout: struct.Struct, what: str) -> tuple[Any, ...]:
    if len(frame) < at + layout.size:
        raise TunnelProtocolError("bad_frame", f"{what} frame too short")
    return layout.unpack_from(frame, at)


def _check_id(request_id: int) -> None:
    if not 1 <= request_id <= _MAX_U32:
        raise ValueError(f"request id {request_id} out of range")


def _check_payload(data: bytes, limit: int, what: str) -> None:
    if not data:
        raise ValueError(f"empty {what}")
    if len(data) > limit:
        raise ValueError(f"{what} of {len(data)} bytes exceeds {limit}")


def _check_frame_payload(data: bytes, limit: int, what: str) -> None:
    if not data:
        raise TunnelProtocolError("bad_frame", f"empty {what}")
    if len(data) > limit:
        raise TunnelProtocolError("too_large", f"{what} of {len(data)} bytes exceeds {limit}")
