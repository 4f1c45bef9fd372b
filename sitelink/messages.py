"""Message schemas of the edge ↔ hub contract, and the one way to decode and encode them.

Every payload is a compact JSON object with `"v": 1` and a timestamp `ts`. The models are strict
(no unknown fields, no "1" for 1, no true for 1) because the hub ingests messages from thousands
of boxes and must count, not guess, what it cannot read. `decode(topic, payload)` is the
door in: topic → size → JSON → schema, each failure a `MessageError` with a short `reason` code
for the hub's reject counters. docs/protocol.md is generated from these models
(`sitelink.protocol_doc`).

Timestamps are UNIX seconds (UTC) as JSON numbers: one representation, no time zones to get
wrong, the same as the edge's segment index, and the cheapest to validate at 20,000 events/s.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import math
import re
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, NamedTuple, get_args
from urllib.parse import parse_qsl, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from sitelink.signing import canonical_json
from sitelink.topics import POLICIES, Kind, Topic, TopicError, parse_topic, topic

PROTOCOL_VERSION = 1

#: Payload limit, checked on the raw bytes before any parsing. Measured: a 16-camera inventory
#: with two profiles per camera is 11 KiB, a 64-camera one 44 KiB; a 64-camera health sample
#: without thumbnails 16 KiB.
MAX_PAYLOAD_BYTES = 64 * 1024

#: Accepted timestamps: 2020-01-01T00:00:00Z ≤ ts < 2100-01-01T00:00:00Z. A box that booted
#: without a real-time clock says 1970; such a time is a fault to fix, not data to store.
TS_MIN = 1_577_836_800.0
TS_MAX = 4_102_444_800.0

#: JavaScript-safe integer limit: counters and byte counts reach the board's browser intact.
_INT_MAX = 2**53 - 1

Reason = Literal[
    "bad_topic", "unknown_kind", "empty", "oversized", "bad_json", "unsupported_version", "schema"
]

#: Every reject reason `decode` can give, with its meaning (the hub pre-registers one counter
#: per reason; docs/protocol.md lists them).
REASONS: dict[Reason, str] = {
    "bad_topic": "the topic is not `isocam/v1/{site_id}/{kind}` or the site id is malformed",
    "unknown_kind": "unknown topic kind, event `kind` or command name (a newer peer?)",
    "empty": "zero-length payload: on a retained topic this clears the retained copy",
    "oversized": f"payload larger than {MAX_PAYLOAD_BYTES} bytes (checked before parsing)",
    "bad_json": "not UTF-8 JSON text",
    "unsupported_version": 'the payload\'s `"v"` is not 1',
    "schema": "valid JSON that does not fit the topic's schema (fields, types, ranges)",
}


class MessageError(ValueError):
    """A message that is not part of the contract; `reason` is one of `REASONS`."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason


# --- field types ------------------------------------------------------------------------------
# `x-isocam-type` names a type in the generated docs; `TYPE_GLOSSARY` explains each name there.

TYPE_GLOSSARY: dict[str, str] = {}


def _doc_type(label: str, meaning: str) -> dict[str, JsonValue]:
    TYPE_GLOSSARY[label] = meaning
    return {"x-isocam-type": label}


# Rust-regex patterns (pydantic-core); `^...$` because they are searched, not fully matched.
_NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"
_NO_SPACE_OR_CONTROL = r"^[^\x00-\x20\x7f]+$"

Timestamp = Annotated[
    float,
    Field(
        ge=TS_MIN,
        lt=TS_MAX,
        json_schema_extra=_doc_type(
            "timestamp",
            "UNIX seconds, UTC, as a JSON number (integer or fraction); "
            "2020-01-01 ≤ t < 2100-01-01; NaN and infinities are rejected",
        ),
    ),
]
CameraId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"),
    Field(
        json_schema_extra=_doc_type(
            "camera id",
            "1-64 characters `A-Z a-z 0-9 . _ -`, starting with a letter or digit; "
            "stable for the camera's life (kept when its IP address changes)",
        )
    ),
]
Text = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, pattern=_NO_CONTROL),
    Field(json_schema_extra=_doc_type("text", "1-200 characters, no control characters (UTF-8)")),
]
Detail = Annotated[
    str,
    StringConstraints(min_length=1, max_length=1000, pattern=_NO_CONTROL),
    Field(
        json_schema_extra=_doc_type("detail", "1-1000 characters, no control characters (UTF-8)")
    ),
]
Code = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$"),
    Field(json_schema_extra=_doc_type("code", "machine code: `[a-z][a-z0-9_]*`, ≤ 64 characters")),
]
Version = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$"),
    Field(
        json_schema_extra=_doc_type(
            "version", "software version, ≤ 64 characters `0-9 A-Z a-z . + _ -`, e.g. `0.1.0`"
        )
    ),
]
ProfileToken = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=_NO_SPACE_OR_CONTROL),
    Field(
        json_schema_extra=_doc_type(
            "profile token", "ONVIF media profile token, 1-64 characters, no spaces"
        )
    ),
]
RequestId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,64}$"),
    Field(
        json_schema_extra=_doc_type(
            "request id", "1-64 characters `A-Z a-z 0-9 . _ : -` (a UUID fits), chosen by the hub"
        )
    ),
]
Sha256Hex = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9a-f]{64}$"),
    Field(json_schema_extra=_doc_type("sha256", "SHA-256 digest, 64 lowercase hex digits")),
]
# Canonical standard base64 of exactly 64 bytes: 85 free characters, then one whose low four
# bits are zero (A, Q, g, w), then the padding.
Signature = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9+/]{85}[AQgw]==$"),
    Field(
        json_schema_extra=_doc_type(
            "signature", "Ed25519 signature: 64 bytes in standard base64 (88 characters)"
        )
    ),
]
KeyId = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9a-f]{16}$"),
    Field(
        json_schema_extra=_doc_type(
            "key id",
            "first 8 bytes of SHA-256 over the raw 32-byte Ed25519 public key, "
            "16 lowercase hex digits (`key_id_for()`)",
        )
    ),
]
Count = Annotated[
    int,
    Field(
        ge=0,
        le=_INT_MAX,
        json_schema_extra=_doc_type("count", "integer 0 ≤ n ≤ 2^53-1 (safe in JavaScript)"),
    ),
]
Seq = Annotated[
    int,
    Field(
        ge=1,
        le=_INT_MAX,
        json_schema_extra=_doc_type("seq", "integer 1 ≤ n ≤ 2^53-1"),
    ),
]
Seconds = Annotated[
    float,
    Field(
        ge=0,
        le=1e10,
        json_schema_extra=_doc_type("seconds", "duration in seconds, number ≥ 0"),
    ),
]
Offset = Annotated[
    float,
    Field(
        ge=-1e10,
        le=1e10,
        json_schema_extra=_doc_type(
            "offset", "signed seconds: the other clock minus ours (positive: it runs ahead)"
        ),
    ),
]
Days = Annotated[
    float,
    Field(ge=0, le=1e6, json_schema_extra=_doc_type("days", "number of days, ≥ 0")),
]
Percent = Annotated[
    float,
    Field(ge=0, le=100, json_schema_extra=_doc_type("percent", "number 0-100")),
]
Kbps = Annotated[
    float,
    Field(ge=0, le=1e7, json_schema_extra=_doc_type("kbit/s", "bit rate in kbit/s, number ≥ 0")),
]
Fps = Annotated[
    float,
    Field(ge=0, le=1000, json_schema_extra=_doc_type("fps", "frames per second, 0-1000")),
]
MetricName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
Measurement = Annotated[float, Field(ge=-1e12, le=1e12)]

Cause = Literal["refused", "timeout", "stall", "eof", "error", "unauthorized"]
ImageFault = Literal["black", "covered", "frozen", "blurred", "moved"]
Level = Literal["ok", "warning", "critical"]
CameraState = Literal[
    "recording", "connecting", "offline", "unauthorized", "ineligible", "disabled"
]
RecordingState = Literal["recording", "reconnecting", "stopped", "failed"]
Codec = Literal["h264", "h265", "mjpeg", "mpeg4", "unknown"]
Purpose = Literal["live", "playback", "snapshot"]
TombstoneReason = Literal["retention", "disk_full", "disk_full_inside_floor"]

# Query keys some cameras accept credentials in (`?user=admin&password=...`).
_CREDENTIAL_KEYS = frozenset({"user", "username", "password", "pass", "passwd", "pwd"})
_LOOPBACK_NAMES = frozenset({"localhost"})


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_check(
    label: str, schemes: frozenset[str], loopback_only: frozenset[str] = frozenset()
) -> AfterValidator:
    """An after-validator: scheme allowed, a host, no credentials anywhere in the URL."""
    shown = ", ".join(f"{s}://" for s in sorted(schemes | loopback_only))

    def check(url: str) -> str:
        try:
            parts = urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018 — raises ValueError on a malformed port
        except ValueError as exc:
            raise ValueError(f"{label} is not a valid URL ({exc})") from None
        scheme = parts.scheme.lower()
        if scheme not in schemes and scheme not in loopback_only:
            raise ValueError(f"{label} must start with {shown}")
        if not host:
            raise ValueError(f"{label} has no host")
        if scheme in loopback_only and not _is_loopback(host):
            raise ValueError(f"{label}: plaintext {scheme}:// is allowed only to a loopback host")
        if "@" in parts.netloc:
            raise ValueError(f"{label} must not contain credentials (user:password@)")
        if any(k.lower() in _CREDENTIAL_KEYS for k, _ in parse_qsl(parts.query, True)):
            raise ValueError(f"{label} must not carry credentials in its query string")
        return url

    return AfterValidator(check)


RtspUrl = Annotated[
    str,
    StringConstraints(max_length=1024, pattern=_NO_SPACE_OR_CONTROL),
    _url_check("RTSP URL", frozenset({"rtsp", "rtsps"})),
    Field(
        json_schema_extra=_doc_type(
            "rtsp url",
            "`rtsp://` or `rtsps://` URL ≤ 1024 characters WITHOUT credentials: no "
            "`user:password@`, no `user=`/`password=`/`pwd=`… query keys (the edge adds them)",
        )
    ),
]
OnvifUrl = Annotated[
    str,
    StringConstraints(max_length=1024, pattern=_NO_SPACE_OR_CONTROL),
    _url_check("ONVIF address", frozenset({"http", "https"})),
    Field(
        json_schema_extra=_doc_type(
            "onvif url",
            "the camera's ONVIF device service, `http(s)://host[:port]/onvif/device_service`, "
            "no credentials",
        )
    ),
]
HubUrl = Annotated[
    str,
    StringConstraints(max_length=1024, pattern=_NO_SPACE_OR_CONTROL),
    _url_check("hub URL", frozenset({"wss", "https"}), frozenset({"ws", "http"})),
    Field(
        json_schema_extra=_doc_type(
            "hub url",
            "`wss://` or `https://` URL of the hub instance to dial; plaintext `ws://`/`http://` "
            "only to a loopback host (tests, demo); no credentials",
        )
    ),
]
Token = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9_-]{22,512}$"),
    Field(
        json_schema_extra=_doc_type(
            "token", "one-time secret, 22-512 URL-safe base64 characters (≥ 128 bits)"
        )
    ),
]

#: Decoded-size bound of a health thumbnail; several fit in one 64 KiB health message.
MAX_THUMBNAIL_BYTES = 12 * 1024


def _check_jpeg_b64(value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("thumbnail is not valid base64") from None
    if not raw.startswith(b"\xff\xd8\xff"):
        raise ValueError("thumbnail is not a JPEG image")
    return value


Thumbnail = Annotated[
    str,
    StringConstraints(max_length=(MAX_THUMBNAIL_BYTES + 2) // 3 * 4),
    AfterValidator(_check_jpeg_b64),
    Field(
        json_schema_extra=_doc_type(
            "jpeg base64",
            f"JPEG image in standard base64, ≤ {MAX_THUMBNAIL_BYTES} bytes before encoding",
        )
    ),
]


# --- base classes -----------------------------------------------------------------------------


def _tag(name: str) -> Any:
    """The field that tells a message variant apart (`kind`, `command`): always `name`."""
    return Field(default=name, description=f"`{name}`")


class _Strict(BaseModel):
    """Strict, closed, immutable: the contract, not a suggestion."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        allow_inf_nan=False,
        # Payloads may hold tokens; errors go to logs and reject counters, never echo input.
        hide_input_in_errors=True,
    )


class Message(_Strict):
    """Base of every top-level payload: protocol version `v` and the sender's timestamp `ts`."""

    #: The topic kind this message is published on.
    TOPIC_KIND: ClassVar[Kind]

    # `v` must be present on the wire but callers in Python need not write it: mypy sees a
    # default, the schema sees a required field, and __init__ fills it in.
    if TYPE_CHECKING:
        v: int = PROTOCOL_VERSION
    else:
        v: Annotated[int, Field(ge=1, le=1, description="protocol version, always `1`")]
    ts: Timestamp = Field(description="when the sender created this message")

    def __init__(self, **data: Any) -> None:
        data.setdefault("v", PROTOCOL_VERSION)
        super().__init__(**data)

    # Without this mark pydantic routes every validate_json through this __init__, parsing to a
    # dict and validating twice (measured: 9 µs instead of 3 µs per event). With it, JSON goes
    # straight to the core validator and only Python construction passes here. A test checks
    # that the mark still works after pydantic upgrades.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


# --- state (birth / death) --------------------------------------------------------------------


class StateBirth(Message):
    """Published retained on every connect; says the site is online."""

    TOPIC_KIND = Kind.STATE
    kind: Literal["birth"] = _tag("birth")
    bdseq: Count = Field(
        description="birth/death sequence: +1 at every connect, persisted; the will registered "
        "on that connect is the death with the same `bdseq`"
    )
    agent_version: Version = Field(description="edge agent software version")
    started: Timestamp = Field(description="when the agent process started")
    last_seq: Count = Field(
        description="highest event `seq` the edge has assigned so far (0: none yet); the hub "
        "compares it with the highest it has stored to detect a reset edge"
    )

    def matching_death(self, reason: Literal["lost", "shutdown"] = "lost") -> StateDeath:
        """The death paired with this birth: the MQTT will (`lost`) or a clean `shutdown`."""
        return StateDeath(
            ts=self.ts, bdseq=self.bdseq, agent_version=self.agent_version, reason=reason
        )


class StateDeath(Message):
    """The will registered at connect (reason `lost`), or published on a clean shutdown."""

    TOPIC_KIND = Kind.STATE
    kind: Literal["death"] = _tag("death")
    bdseq: Count = Field(description="the `bdseq` of the birth this death ends")
    agent_version: Version = Field(description="edge agent software version")
    reason: Literal["lost", "shutdown"] = Field(
        description="`lost`: the broker published the will (connection lost); `shutdown`: the "
        "agent stopped cleanly and published it itself"
    )


State = Annotated[StateBirth | StateDeath, Field(discriminator="kind")]


# --- inventory --------------------------------------------------------------------------------


class SiteInfo(_Strict):
    """What the site is; the hub's scopes (province, district, authority...) hang on these."""

    name: Text | None = Field(default=None, description="display name, e.g. the facility's name")
    province: Text = Field(description="province (tỉnh / thành phố)")
    district: Text | None = Field(
        default=None, description="district (quận / huyện); absent if none"
    )
    kind: Literal["facility", "checkpoint"] = Field(description="quarantine facility or checkpoint")
    authority: Literal["health", "district", "military", "police", "other"] = Field(
        description="managing authority"
    )
    operator: Literal["vnpt", "viettel"] = Field(description="telecom operator running the hub")


class StreamProfile(_Strict):
    """One media profile of a camera as the camera advertises it."""

    token: ProfileToken = Field(description="ONVIF profile token (unique within the camera)")
    name: Text | None = Field(default=None, description="profile name given by the camera")
    codec: Codec = Field(description="video codec")
    width: int = Field(ge=1, le=16384, description="pixels")
    height: int = Field(ge=1, le=16384, description="pixels")
    fps: Fps | None = Field(default=None, description="advertised frame rate")
    bitrate_kbps: Kbps | None = Field(default=None, description="advertised bit rate limit")
    rtsp_url: RtspUrl | None = Field(default=None, description="stream URI, without credentials")


class CameraInfo(_Strict):
    """One camera of the site: identity, profiles, and what the edge does with it."""

    id: CameraId = Field(description="the camera's id, used by every other message")
    name: Text | None = Field(default=None, description="display name (e.g. `Cổng chính`)")
    onvif_url: OnvifUrl | None = Field(
        default=None, description="absent for cameras pinned by RTSP URL"
    )
    manufacturer: Text | None = Field(default=None, description="from ONVIF GetDeviceInformation")
    model: Text | None = Field(default=None, description="from ONVIF GetDeviceInformation")
    firmware: Text | None = Field(default=None, description="from ONVIF GetDeviceInformation")
    serial: Text | None = Field(default=None, description="from ONVIF GetDeviceInformation")
    hardware_id: Text | None = Field(default=None, description="from ONVIF GetDeviceInformation")
    profiles: list[StreamProfile] = Field(
        default_factory=list, max_length=16, description="media profiles"
    )
    record_profile: ProfileToken | None = Field(
        default=None, description="token of the profile being recorded (one of `profiles`)"
    )
    live_profile: ProfileToken | None = Field(
        default=None, description="token of the profile served for live view (one of `profiles`)"
    )
    state: CameraState = Field(description="what the edge is doing with the camera now")
    clock_offset_s: Offset | None = Field(default=None, description="camera clock minus edge clock")

    @model_validator(mode="after")
    def _profiles_consistent(self) -> CameraInfo:
        tokens = [p.token for p in self.profiles]
        if len(set(tokens)) != len(tokens):
            raise ValueError("profile tokens must be unique within a camera")
        for field in ("record_profile", "live_profile"):
            ref = getattr(self, field)
            if ref is not None and ref not in tokens:
                raise ValueError(f"{field} {ref!r} is not one of the camera's profiles")
        return self


class Inventory(Message):
    """The site's attributes and cameras; retained, republished on every change."""

    TOPIC_KIND = Kind.INVENTORY
    site: SiteInfo = Field(description="site attributes")
    cameras: list[CameraInfo] = Field(max_length=256, description="every camera the edge knows")

    @model_validator(mode="after")
    def _unique_camera_ids(self) -> Inventory:
        ids = [c.id for c in self.cameras]
        if len(set(ids)) != len(ids):
            raise ValueError("camera ids must be unique within the inventory")
        return self


# --- health -----------------------------------------------------------------------------------


class SiteHealth(_Strict):
    """Box-level metrics of one health sample."""

    disk_total_bytes: Count = Field(description="size of the recording volume")
    disk_used_bytes: Count = Field(description="used on the recording volume")
    disk_free_bytes: Count = Field(description="free on the recording volume")
    forecast_days: Days | None = Field(
        default=None,
        description="days of footage the volume holds at measured bit rates (absent: unknown)",
    )
    cpu_percent: Percent = Field(description="whole-machine CPU use (100 = every core busy)")
    mem_total_bytes: Count = Field(description="physical memory")
    mem_used_bytes: Count = Field(description="memory in use")
    clock_offset_s: Offset | None = Field(default=None, description="NTP time minus box time")
    agent_version: Version = Field(description="edge agent software version")
    uptime_s: Seconds = Field(description="seconds since the agent started")
    spool_depth: Count = Field(description="messages waiting in the store-and-forward spool")


class ImageHealth(_Strict):
    """Signals of the last keyframe check, in the detector's own units."""

    luma_mean: float | None = Field(default=None, ge=0, le=255, description="mean luma, 0-255")
    sharpness: float | None = Field(default=None, ge=0, le=1e9, description="Laplacian variance")
    motion: float | None = Field(
        default=None, ge=0, le=255, description="mean absolute difference to the previous keyframe"
    )
    scene_diff: float | None = Field(
        default=None,
        ge=0,
        le=1e9,
        description="difference to the reference scene taken at enrolment",
    )
    faults: list[ImageFault] = Field(
        default_factory=list, max_length=5, description="image faults active now"
    )


class CameraHealth(_Strict):
    """Per-camera metrics of one health sample (all measured, none advertised)."""

    camera: CameraId = Field(description="camera id")
    connected: bool = Field(description="the RTSP session is up")
    recording: RecordingState = Field(description="recorder state")
    last_packet_age_s: Seconds | None = Field(
        default=None, description="since the last packet arrived"
    )
    fps: Fps | None = Field(default=None, description="measured frame rate")
    bitrate_kbps: Kbps | None = Field(default=None, description="measured bit rate")
    reconnects_1h: Count = Field(description="reconnects in the last hour")
    gap_since: Timestamp | None = Field(
        default=None, description="start of the recording gap open now"
    )
    segment_write_lag_s: Seconds | None = Field(
        default=None, description="how far sealed writes trail the stream"
    )
    image: ImageHealth | None = Field(default=None, description="image checks (absent: none yet)")
    thumbnail_jpeg: Thumbnail | None = Field(
        default=None, description="small JPEG of the last keyframe, for the NOC board"
    )


class Health(Message):
    """Periodic sample (every 10 s by default) of the box and each camera."""

    TOPIC_KIND = Kind.HEALTH
    site: SiteHealth = Field(description="box metrics")
    cameras: list[CameraHealth] = Field(max_length=256, description="one entry per camera")


# --- events -----------------------------------------------------------------------------------


class EventBase(Message):
    """Base of events: a per-site `seq` the hub de-duplicates on."""

    TOPIC_KIND = Kind.EVENT
    seq: Seq = Field(
        description="per-site sequence number: +1 per event, persisted, never reused; "
        "(site, seq) identifies the event"
    )


class CameraDown(EventBase):
    """The edge lost the camera's stream."""

    kind: Literal["camera_down"] = _tag("camera_down")
    camera: CameraId = Field(description="camera id")
    cause: Cause = Field(description="why the stream stopped")
    detail: Detail | None = Field(default=None, description="the error as the edge saw it")


class CameraUp(EventBase):
    """The camera's stream is back (or up for the first time since the agent started)."""

    kind: Literal["camera_up"] = _tag("camera_up")
    camera: CameraId = Field(description="camera id")
    down_since: Timestamp | None = Field(
        default=None, description="when it went down, so the hub can close an outage it missed"
    )


class GapOpened(EventBase):
    """Recording stopped: footage is missing from `start` on."""

    kind: Literal["gap_opened"] = _tag("gap_opened")
    camera: CameraId = Field(description="camera id")
    start: Timestamp = Field(description="wall-clock time of the last recorded packet")
    cause: Cause = Field(description="why recording stopped")


class GapClosed(EventBase):
    """Recording resumed: footage is missing from `start` to `end`."""

    kind: Literal["gap_closed"] = _tag("gap_closed")
    camera: CameraId = Field(description="camera id")
    start: Timestamp = Field(description="same `start` as the matching `gap_opened`")
    end: Timestamp = Field(description="wall-clock time of the first packet recorded again")
    cause: Cause = Field(description="why recording had stopped")

    @model_validator(mode="after")
    def _ordered(self) -> GapClosed:
        if self.end < self.start:
            raise ValueError("gap end is before its start")
        return self


class ImageFaultEvent(EventBase):
    """An image fault started (`active`) or ended, with the values that decided it."""

    kind: Literal["image_fault"] = _tag("image_fault")
    camera: CameraId = Field(description="camera id")
    fault: ImageFault = Field(description="which fault")
    active: bool = Field(description="true: the fault started; false: it cleared")
    measured: dict[MetricName, Measurement] = Field(
        default_factory=dict,
        max_length=16,
        description='measured signals, e.g. `{"luma_mean": 2.1, "sharpness": 0.4}`',
    )


class DiskEvent(EventBase):
    """The recording volume changed level (ok / warning / critical)."""

    kind: Literal["disk"] = _tag("disk")
    level: Level = Field(description="new level")
    free_bytes: Count = Field(description="free bytes on the recording volume")
    forecast_days: Days | None = Field(default=None, description="days of footage the volume holds")


class ClockEvent(EventBase):
    """A clock offset crossed a threshold (box vs NTP, or a camera vs the box)."""

    kind: Literal["clock"] = _tag("clock")
    level: Level = Field(description="new level")
    offset_s: Offset = Field(description="measured offset")
    camera: CameraId | None = Field(
        default=None, description="the camera whose clock is off; absent: the box's clock vs NTP"
    )


def chain_head_payload(
    site_id: str, camera: str, segment_seq: int, row_hash: str, time: float
) -> dict[str, Any]:
    """The statement a chain head signs ("at `time`, the chain ended at `segment_seq`")."""
    # `time` is always a float on the wire; signing an int would give different bytes.
    return {
        "type": "isocam.chain_head.v1",
        "site": site_id,
        "camera": camera,
        "seq": segment_seq,
        "row_hash": row_hash,
        "time": float(time),
    }


class ChainHead(EventBase):
    """The signed head of a camera's segment hash chain (every minute while recording)."""

    kind: Literal["chain_head"] = _tag("chain_head")
    camera: CameraId = Field(description="camera id")
    segment_seq: Count = Field(description="the camera's segment sequence number at the head")
    row_hash: Sha256Hex = Field(description="hash of that segment's index row (chain link)")
    time: Timestamp = Field(description="when the head was signed (part of the signed statement)")
    key_id: KeyId = Field(description="which device key signed")
    signature: Signature = Field(description="device key's signature of `signing_payload()`")

    def signing_payload(self, site_id: str) -> bytes:
        """The bytes the device key signed; `site_id` comes from the topic."""
        return canonical_json(
            chain_head_payload(site_id, self.camera, self.segment_seq, self.row_hash, self.time)
        )


class Tombstone(EventBase):
    """Segments removed on purpose (retention expiry or a full disk), signed by the device key.

    `prev_anchor` is the prev_hash of the first removed row and `last_row_hash` the hash of the
    last one: the camera's chain continues from it, so the hub can tell expiry from deletion.
    """

    kind: Literal["tombstone"] = _tag("tombstone")
    camera: CameraId = Field(description="camera id")
    first_seq: Count = Field(description="first segment sequence number removed")
    last_seq: Count = Field(description="last segment sequence number removed")
    start: Timestamp = Field(description="start of the footage removed")
    end: Timestamp = Field(description="end of the footage removed")
    removed_rows: Count = Field(description="index rows removed")
    removed_bytes: Count = Field(description="bytes of segment files removed")
    prev_anchor: Sha256Hex = Field(description="prev_hash of the first removed row")
    last_row_hash: Sha256Hex = Field(
        description="hash of the last removed row, where the chain continues"
    )
    reason: TombstoneReason = Field(
        description="`retention`: expired; `disk_full`: disk full, beyond the retention floor; "
        "`disk_full_inside_floor`: disk full, inside the floor (always with a critical alarm)"
    )
    created_at: Timestamp = Field(description="when the tombstone was written")
    missing_files: Count = Field(description="removed rows whose file was already gone")
    key_id: KeyId = Field(description="which device key signed")
    signature: Signature = Field(description="device key's signature of `signing_payload()`")

    @model_validator(mode="after")
    def _ordered(self) -> Tombstone:
        if self.last_seq < self.first_seq or self.end < self.start:
            raise ValueError("tombstone range is reversed")
        return self

    def signing_payload(self, site_id: str) -> bytes:
        """The bytes the device key signed; `site_id` comes from the topic."""
        return canonical_json(
            {
                "type": "isocam.tombstone.v1",
                "site": site_id,
                "camera": self.camera,
                "first_seq": self.first_seq,
                "last_seq": self.last_seq,
                "start": self.start,
                "end": self.end,
                "rows": self.removed_rows,
                "bytes": self.removed_bytes,
                "prev_anchor": self.prev_anchor,
                "last_row_hash": self.last_row_hash,
                "reason": self.reason,
                "created_at": self.created_at,
                "missing_files": self.missing_files,
            }
        )


class RetentionEvent(EventBase):
    """Retention settings or a legal hold took effect (at start and on every change)."""

    kind: Literal["retention"] = _tag("retention")
    camera: CameraId | None = Field(default=None, description="absent: applies to every camera")
    retention_days: int = Field(ge=1, le=3650, description="configured retention")
    legal_hold: bool = Field(description="expiry is suspended")
    below_legal_minimum: bool = Field(description="retention is set below the legal 30 days")
    reason: Detail | None = Field(
        default=None, description="legal basis of a hold, or what changed"
    )


class Alarm(EventBase):
    """Anything else that needs a person (spool overflow, disk full inside the floor...)."""

    kind: Literal["alarm"] = _tag("alarm")
    code: Code = Field(description="machine code, e.g. `spool_overflow`, `retention_floor`")
    level: Literal["warning", "critical"] = Field(description="severity")
    active: bool = Field(description="true: raised; false: cleared")
    message: Detail = Field(description="what happened and what to do, for the NOC")
    camera: CameraId | None = Field(default=None, description="the camera concerned, if any")


class AgentStarted(EventBase):
    """The agent started; says how the previous run ended and what start-up repaired."""

    kind: Literal["agent_started"] = _tag("agent_started")
    agent_version: Version = Field(description="edge agent software version")
    clean_shutdown: bool | None = Field(
        default=None,
        description="the previous run stopped cleanly (absent: first start or unknown)",
    )
    recovered: dict[MetricName, Count] = Field(
        default_factory=dict,
        max_length=16,
        description='counts found by the start-up reconcile, e.g. `{"partial_segments": 1}`',
    )


Event = Annotated[
    CameraDown
    | CameraUp
    | GapOpened
    | GapClosed
    | ImageFaultEvent
    | DiskEvent
    | ClockEvent
    | ChainHead
    | Tombstone
    | RetentionEvent
    | Alarm
    | AgentStarted,
    Field(discriminator="kind"),
]


# --- commands ---------------------------------------------------------------------------------


class CommandBase(Message):
    """Base of hub → edge commands; the reply carries the same `id`."""

    TOPIC_KIND = Kind.CMD
    id: RequestId = Field(description="request id, echoed in the reply")


class RescanArgs(_Strict):
    """No arguments: rediscover cameras and refresh the inventory."""


class SnapshotArgs(_Strict):
    """Which camera, and an optional size bound for the reply's JPEG."""

    camera: CameraId = Field(description="camera id")
    max_width: int | None = Field(
        default=None, ge=16, le=3840, description="scale down to this width"
    )


class OpenTunnelArgs(_Strict):
    """Where to dial and what the tunnel is for (see the viewing design)."""

    hub_url: HubUrl = Field(description="the hub instance that asked; the edge dials it")
    token: Token = Field(description="one-time token the edge presents when dialing")
    camera: CameraId = Field(description="camera to serve")
    purpose: Purpose = Field(description="what the tunnel will carry")
    expires: Timestamp = Field(description="the token is useless after this time")


class SetLegalHoldArgs(_Strict):
    """Suspend (or resume) retention expiry for one camera or all of them."""

    camera: CameraId | None = Field(
        default=None, description="one camera; absent with `all_cameras`"
    )
    all_cameras: bool = Field(default=False, description="true: every camera of the site")
    hold: bool = Field(description="true: set the hold; false: lift it")
    reason: Detail = Field(description="legal basis (document number, authority)")

    @model_validator(mode="after")
    def _one_target(self) -> SetLegalHoldArgs:
        if (self.camera is None) == (not self.all_cameras):
            raise ValueError("give exactly one of `camera` or `all_cameras: true`")
        return self


class Rescan(CommandBase):
    """Rediscover cameras now."""

    command: Literal["rescan"] = _tag("rescan")
    args: RescanArgs = Field(default_factory=RescanArgs, description="`{}`")


class Snapshot(CommandBase):
    """Reply with a JPEG of the camera's last keyframe (`result.jpeg`, base64)."""

    command: Literal["snapshot"] = _tag("snapshot")
    args: SnapshotArgs = Field(description="arguments")


class OpenTunnel(CommandBase):
    """Dial the hub over WSS for live view, playback or snapshots."""

    command: Literal["open_tunnel"] = _tag("open_tunnel")
    args: OpenTunnelArgs = Field(description="arguments")


class SetLegalHold(CommandBase):
    """Set or lift a legal hold."""

    command: Literal["set_legal_hold"] = _tag("set_legal_hold")
    args: SetLegalHoldArgs = Field(description="arguments")


Command = Annotated[Rescan | Snapshot | OpenTunnel | SetLegalHold, Field(discriminator="command")]


def _finite_json(value: dict[str, JsonValue]) -> dict[str, JsonValue]:
    """Reject NaN and infinities inside free-form JSON (the parser admits them)."""
    stack: list[JsonValue] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("NaN and Infinity are not JSON numbers")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


class ReplyError(_Strict):
    """Why a command failed."""

    code: Code = Field(
        description="e.g. a `decode` reason (`schema`, `unknown_kind`…), `unknown_camera`, `failed`"
    )
    message: Detail = Field(description="for a person")


class CommandReply(Message):
    """The edge's answer to one command."""

    TOPIC_KIND = Kind.CMD_REPLY
    id: RequestId = Field(description="the command's `id`")
    ok: bool = Field(description="the command succeeded")
    error: ReplyError | None = Field(default=None, description="present exactly when `ok` is false")
    result: Annotated[dict[str, JsonValue], AfterValidator(_finite_json)] | None = Field(
        default=None, description="command-specific result (any JSON object; no NaN/Infinity)"
    )

    @model_validator(mode="after")
    def _error_iff_failed(self) -> CommandReply:
        if self.ok == (self.error is not None):
            raise ValueError("`error` must be present exactly when `ok` is false")
        return self


# --- tables derived from the models -----------------------------------------------------------

#: The union (or model) each topic kind's payload must match.
SCHEMAS: dict[Kind, Any] = {
    Kind.STATE: State,
    Kind.INVENTORY: Inventory,
    Kind.HEALTH: Health,
    Kind.EVENT: Event,
    Kind.CMD: Command,
    Kind.CMD_REPLY: CommandReply,
}


def _members(union: Any) -> tuple[type[Message], ...]:
    return tuple(get_args(get_args(union)[0]))


#: Event `kind` → model, and command name → model.
EVENT_KINDS: dict[str, type[EventBase]] = {
    m.model_fields["kind"].default: m  # type: ignore[misc]
    for m in _members(Event)
}
COMMANDS: dict[str, type[CommandBase]] = {
    m.model_fields["command"].default: m  # type: ignore[misc]
    for m in _members(Command)
}

# One compiled validator per topic kind; `validate_json` parses and validates in one pass
# inside pydantic-core, without building Python dicts first.
# The adapters' validators directly: `TypeAdapter.validate_json`'s own Python wrapper cost more
# than the validation itself (measured: ~3 µs of ~8 µs a message at the hub's ingest).
_VALIDATE_JSON = {
    kind: TypeAdapter(schema).validator.validate_json for kind, schema in SCHEMAS.items()
}
_WHAT = {
    Kind.STATE: "state",
    Kind.INVENTORY: "inventory",
    Kind.HEALTH: "health",
    Kind.EVENT: "event",
    Kind.CMD: "command",
    Kind.CMD_REPLY: "command reply",
}
_TAG_FIELD = {Kind.STATE: "kind", Kind.EVENT: "kind", Kind.CMD: "command"}


# --- decode / encode --------------------------------------------------------------------------


class Delivery(NamedTuple):
    """A decoded message with the topic it came on (the site id is only in the topic)."""

    topic: Topic
    message: Message


class Outgoing(NamedTuple):
    """Everything `publish()` needs for one message."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


def decode(topic_name: str, payload: bytes | bytearray) -> Message:
    """Validate a received MQTT message against the contract; MessageError says why not."""
    return decode_delivery(topic_name, payload).message


def decode_delivery(topic_name: str, payload: bytes | bytearray) -> Delivery:
    """Like `decode`, but also return the parsed topic (site id and kind)."""
    try:
        parsed = parse_topic(topic_name)
    except TopicError as exc:
        raise MessageError(exc.reason, str(exc)) from None
    return Delivery(parsed, decode_payload(parsed.kind, payload))


def decode_payload(kind: Kind, payload: bytes | bytearray) -> Message:
    """Validate a payload against `kind`'s schema (the topic already parsed)."""
    if not isinstance(payload, bytes | bytearray):
        raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
    size = len(payload)
    if size > MAX_PAYLOAD_BYTES:
        raise MessageError(
            "oversized", f"{kind.value}: payload of {size} bytes exceeds {MAX_PAYLOAD_BYTES}"
        )
    if size == 0:
        raise MessageError("empty", f"{kind.value}: empty payload")
    try:
        message: Message = _VALIDATE_JSON[kind](payload)
    except ValidationError as exc:
        raise _classify(kind, exc) from None
    return message


def _classify(kind: Kind, exc: ValidationError) -> MessageError:
    """Turn pydantic's error list into one reason code and one readable line."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    what = _WHAT[kind]
    if first["type"] == "json_invalid":
        return MessageError("bad_json", f"{what}: {first['msg']}")
    tag_field = _TAG_FIELD.get(kind)
    if first["type"] == "union_tag_invalid":
        tag = str(first.get("ctx", {}).get("tag", "?"))[:40]
        return MessageError("unknown_kind", f"{what}: unknown {tag_field} {tag!r}")
    for err in errors:
        # Discriminated unions prefix locations with the tag: ("camera_down", "v").
        loc = err["loc"][1:] if tag_field else err["loc"]
        if loc == ("v",) and err["type"] in ("less_than_equal", "greater_than_equal"):
            return MessageError(
                "unsupported_version", f"{what}: protocol version is not {PROTOCOL_VERSION}"
            )
    loc_text = ".".join(str(p) for p in first["loc"]) or "payload"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return MessageError("schema", f"{what}: {loc_text}: {first['msg']}{more}")


def encode(message: Message) -> bytes:
    """Compact JSON bytes of `message`; absent optional fields are left out, not `null`."""
    if not isinstance(message, Message):
        raise TypeError(f"not a sitelink message: {type(message).__name__}")
    data = message.__pydantic_serializer__.to_json(message, exclude_none=True)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise MessageError(
            "oversized",
            f"{type(message).__name__} encodes to {len(data)} bytes, over {MAX_PAYLOAD_BYTES}",
        )
    return data


def outgoing(site_id: str, message: Message) -> Outgoing:
    """Topic, payload, QoS and retain flag for publishing `message` as `site_id` (or to it)."""
    policy = POLICIES[message.TOPIC_KIND]
    return Outgoing(topic(site_id, message.TOPIC_KIND), encode(message), policy.qos, policy.retain)


_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id_of(payload: bytes | bytearray) -> str | None:
    """Best-effort `id` of a command that failed to decode, so the edge can still reply.

    Returns None when no well-formed request id can be read; never raises.
    """
    if not isinstance(payload, bytes | bytearray) or not 0 < len(payload) <= MAX_PAYLOAD_BYTES:
        return None
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    rid = data.get("id") if isinstance(data, dict) else None
    return rid if isinstance(rid, str) and _REQUEST_ID_RE.fullmatch(rid) else None


def key_id_for(public_key_raw: bytes) -> str:
    """The `key_id` of an Ed25519 public key given as its 32 raw bytes."""
    if len(public_key_raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, not {len(public_key_raw)}")
    return hashlib.sha256(public_key_raw).hexdigest()[:16]
