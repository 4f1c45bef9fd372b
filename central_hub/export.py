"""Footage exports: a stated legal basis, a second person's approval, a signed bundle.

The law allows footage out of the system only for stated purposes, so an export is a workflow,
not a button:

1. an ``export_requester`` asks for (site, camera, time range) and states the legal basis —
   the document number and the requesting authority (``require(..., "export_request")``
   audits it with the basis as the reason);
2. an ``export_approver`` of that site who is **not** the requester approves or rejects;
3. the requester downloads the bundle while the approval is valid (`ExportConfig`). The
   bundle is built on the fly for each download, in memory, and streamed: the segments are
   pulled sealed through the tunnel, opened in memory with the viewing key, remuxed (never
   transcoded) with PyAV into MP4 and zipped straight into the HTTP response — plaintext
   never touches the hub's disk.

The bundle (a ZIP, stored, no compression: video does not compress) holds

* ``footage-01.mp4`` (more files only if the stream's codec or size changed in the range):
  fragmented MP4, the segments' packets at their wall-clock offsets from the range start;
* ``manifest.json``: site, camera, range, every segment's seq (its position in the camera's
  hash chain), its sealed file's SHA-256 as the edge's index reported it, the recording gaps,
  each footage file's SHA-256, who requested and approved and when, the legal basis, who
  built the bundle and when, the signing key;
* ``manifest.sig``: the hub's Ed25519 signature over the canonical JSON of the manifest;
* ``README.txt``: how to verify.

and the **ZIP comment** carries a second Ed25519 signature over the SHA-256 of every byte of
the file before the comment (``isocam-export-bundle-v1`` domain). So any modified byte —
footage, manifest, ZIP headers or the comment itself — fails :func:`verify_bundle`
(``central-hub export verify BUNDLE --key HUB_PUBLIC_KEY``), offline, with no hub at hand.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import io
import json
import logging
import os
import re
import struct
import time
import zipfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import av
import sqlalchemy as sa
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from multidict import MultiDictProxy
from sqlalchemy.engine import Connection

from central_hub.accounts import users
from central_hub.audit import AuditLog
from central_hub.db import Database, metadata, migration
from central_hub.policy import Principal, can, site_filter
from central_hub.sites import SiteAttrs, sites
from central_hub.tunnel import RemoteError, SegmentListing, SegmentMismatch, TunnelBroker
from central_hub.viewing import (
    Plaintext,
    SegmentUnreadable,
    ViewingService,
    open_in_memory,
    page,
    parse_local,
)
from central_hub.web_auth import auth_of, client_source, require, require_login
from sitelink.sealed_segment import RecipientPrivateKey
from sitelink.signing import (
    SigningKeyError,
    key_id,
    load_public_key_pem,
    public_key_pem,
    sign_payload,
    verify_payload,
)
from sitelink.topics import is_valid_site_id
from sitelink.tunnel import TunnelError

log = logging.getLogger(__name__)

FORMAT = "isocam.export.v1"
MANIFEST = "manifest.json"
MANIFEST_SIG = "manifest.sig"
README = "README.txt"
#: What the signature in the ZIP comment signs: this domain, then SHA-256 of the bytes before it.
BUNDLE_DOMAIN = b"isocam-export-bundle-v1\n"
_COMMENT_PREFIX = b"ISOCAM-EXPORT-SIG-V1 "
_COMMENT_RE = re.compile(rb"ISOCAM-EXPORT-SIG-V1 ([0-9a-f]{16}) ([0-9a-f]{128})")
#: prefix + key id (16 hex) + space + signature (128 hex)
COMMENT_LEN = len(_COMMENT_PREFIX) + 16 + 1 + 128
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record, 22 bytes
_EOCD_SIG = b"PK\x05\x06"
_MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"
_FOOTAGE_RE = re.compile(r"footage-[0-9]{2}\.mp4")
_DOC_RE = re.compile(r"[^\x00-\x1f\x7f]{1,128}")


class ExportError(Exception):
    """A workflow step the rules refuse; `code` names why (pages show a text for it)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ExportState(enum.StrEnum):
    REQUESTED = "requested"
    APPROVED = "approved"
    REJECTED = "rejected"


@dataclass(frozen=True)
class ExportConfig:
    """Limits of the export workflow."""

    #: longest range one request may cover
    max_span_seconds: float = 12 * 3600.0
    #: how long after approval the requester may download the bundle
    download_seconds: float = 7 * 86400.0

    def __post_init__(self) -> None:
        if self.max_span_seconds <= 0 or self.download_seconds <= 0:
            raise ValueError("export limits must be > 0")


# --------------------------------------------------------------------------------------------
# Storage

export_requests = sa.Table(
    "export_requests",
    metadata,
    sa.Column("export_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("site_id", sa.String(64), nullable=False),
    sa.Column("camera_id", sa.String(64), nullable=False),
    sa.Column("range_start", sa.Float, nullable=False),
    sa.Column("range_end", sa.Float, nullable=False),
    sa.Column("document_number", sa.String(128), nullable=False),
    sa.Column("authority", sa.String(300), nullable=False),
    sa.Column("note", sa.Text, nullable=False, server_default=""),
    sa.Column("requested_by", sa.Integer, nullable=False),
    sa.Column("requested_at", sa.Float, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("decided_by", sa.Integer, nullable=True),
    sa.Column("decided_at", sa.Float, nullable=True),
    sa.Column("decision_note", sa.Text, nullable=True),
    sa.Column("downloads", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_bundle_sha256", sa.String(64), nullable=True),
    sa.Index("ix_export_requests_site", "site_id", "export_id"),
)


@migration("export", 1, "footage export requests and approvals")
def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[export_requests])


@dataclass(frozen=True)
class Person:
    """Who requested, approved or built a bundle, as the manifest names them."""

    user_id: int
    email: str
    full_name: str

    def as_json(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "email": self.email, "full_name": self.full_name}


@dataclass(frozen=True)
class ExportRequest:
    """A stored request and where it stands."""

    export_id: int
    site_id: str
    camera_id: str
    start: float
    end: float
    document_number: str
    authority: str
    note: str
    requested_by: Person
    requested_at: float
    state: ExportState
    decided_by: Person | None
    decided_at: float | None
    decision_note: str | None
    downloads: int
    last_bundle_sha256: str | None

    @property
    def legal_basis(self) -> str:
        return f"{self.document_number} — {self.authority}"


def _person(conn: Connection, user_id: int | None) -> Person | None:
    if user_id is None:
        return None
    row = conn.execute(
        sa.select(users.c.email, users.c.full_name).where(users.c.user_id == user_id)
    ).first()
    if row is None:
        return Person(int(user_id), f"user {user_id}", "")
    return Person(int(user_id), str(row.email), str(row.full_name))


def clean_field(value: str, limit: int, name: str, *, required: bool = True) -> str:
    """Form text without control characters, at most `limit` characters."""
    value = (value or "").strip()
    if not value:
        if required:
            raise ExportError("invalid", f"{name} is required")
        return ""
    if len(value) > limit or any((ord(c) < 32 and c not in "\n\t") or ord(c) == 127 for c in value):
        raise ExportError("invalid", f"{name}: at most {limit} characters, no control characters")
    return value


class ExportStore:
    """The requests table; every change and its audit row commit together. Blocking."""

    def __init__(self, db: Database, audit: AuditLog, config: ExportConfig) -> None:
        self.db = db
        self.audit = audit
        self.config = config

    def _load(self, conn: Connection, row: sa.Row[Any]) -> ExportRequest:
        requester = _person(conn, row.requested_by)
        assert requester is not None
        return ExportRequest(
            export_id=int(row.export_id),
            site_id=row.site_id,
            camera_id=row.camera_id,
            start=float(row.range_start),
            end=float(row.range_end),
            document_number=row.document_number,
            authority=row.authority,
            note=row.note or "",
            requested_by=requester,
            requested_at=float(row.requested_at),
            state=ExportState(row.state),
            decided_by=_person(conn, row.decided_by),
            decided_at=row.decided_at,
            decision_note=row.decision_note,
            downloads=int(row.downloads),
            last_bundle_sha256=row.last_bundle_sha256,
        )

    def get(self, export_id: int) -> ExportRequest | None:
        with self.db.engine.connect() as conn:
            row = conn.execute(
                sa.select(export_requests).where(export_requests.c.export_id == export_id)
            ).first()
            return None if row is None else self._load(conn, row)

    def visible_to(self, principal: Principal, now: float, limit: int = 200) -> list[ExportRequest]:
        """Requests on sites where `principal` may request or approve exports (SQL filter)."""
        where = sa.or_(
            site_filter(principal, "export_request", now),
            site_filter(principal, "export_approve", now),
        )
        query = (
            sa.select(export_requests)
            .join(sites, sites.c.site_id == export_requests.c.site_id)
            .where(where)
            .order_by(export_requests.c.export_id.desc())
            .limit(limit)
        )
        with self.db.engine.connect() as conn:
            return [self._load(conn, r) for r in conn.execute(query)]

    def create(
        self,
        *,
        site: SiteAttrs,
        camera: str,
        start: float,
        end: float,
        document_number: str,
        authority: str,
        note: str,
        requester: Principal,
        source: str | None,
    ) -> int:
        if not start < end:
            raise ExportError("invalid", "the range must start before it ends")
        if end - start > self.config.max_span_seconds:
            raise ExportError("invalid", "the range is longer than an export may cover")
        now = time.time()
        with self.db.engine.begin() as conn:
            result = conn.execute(
                export_requests.insert().values(
                    site_id=site.site_id,
                    camera_id=camera,
                    range_start=start,
                    range_end=end,
                    document_number=document_number,
                    authority=authority,
                    note=note,
                    requested_by=requester.user_id,
                    requested_at=now,
                    state=ExportState.REQUESTED.value,
                )
            )
            assert result.inserted_primary_key is not None
            export_id = int(result.inserted_primary_key[0])
            self.audit.append(
                conn,
                "export_requested",
                user=requester,
                source=source,
                site=site,
                camera=camera,
                time_range=(start, end),
                reason=f"{document_number} — {authority}"[:1000],
                detail={"export_id": export_id},
            )
        return export_id

    def decide(
        self,
        export_id: int,
        approver: Principal,
        approve: bool,
        note: str,
        source: str | None,
    ) -> ExportRequest:
        """Approve or reject; never by the requester, only once. Refusals raise ExportError
        (the caller audits them)."""
        state = ExportState.APPROVED if approve else ExportState.REJECTED
        with self.db.engine.begin() as conn:
            row = conn.execute(
                sa.select(export_requests).where(export_requests.c.export_id == export_id)
            ).first()
            if row is None:
                raise ExportError("not_found", f"no export request {export_id}")
            if int(row.requested_by) == approver.user_id:
                raise ExportError("same_person", "the requester may not decide their own request")
            claimed = conn.execute(
                export_requests.update()
                .where(
                    export_requests.c.export_id == export_id,
                    export_requests.c.state == ExportState.REQUESTED.value,
                )
                .values(
                    state=state.value,
                    decided_by=approver.user_id,
                    decided_at=time.time(),
                    decision_note=note,
                )
            ).rowcount
            if claimed != 1:
                raise ExportError("bad_state", f"export request {export_id} was already decided")
            self.audit.append(
                conn,
                "export_approved" if approve else "export_rejected",
                user=approver,
                source=source,
                site=row.site_id,
                camera=row.camera_id,
                time_range=(row.range_start, row.range_end),
                reason=note[:1000] or None,
                detail={"export_id": export_id, "requested_by": int(row.requested_by)},
            )
        found = self.get(export_id)
        assert found is not None
        return found

    def downloaded(self, export_id: int, bundle_sha256: str) -> None:
        with self.db.engine.begin() as conn:
            conn.execute(
                export_requests.update()
                .where(export_requests.c.export_id == export_id)
                .values(downloads=export_requests.c.downloads + 1, last_bundle_sha256=bundle_sha256)
            )


# --------------------------------------------------------------------------------------------
# Signing keys


def generate_signing_key(
    path: str | os.PathLike[str], *, overwrite: bool = False
) -> Ed25519PrivateKey:
    """Make the hub's Ed25519 signing key: PATH (PKCS#8 PEM, 0600) and PATH.pub (its public
    key, to hand to whoever verifies bundles)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    target = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(target, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = target.with_name(target.name + ".pub")
    pub.write_text(public_key_pem(key), encoding="ascii")
    return key


def load_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read the hub's signing key (PKCS#8 PEM), or ValueError with what is wrong."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 key")
    return key


# --------------------------------------------------------------------------------------------
# Building a bundle


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Collector:
    """Bytes produced by the builder (in a worker thread), drained by the async writer."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def drain(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class _SigningSink:
    """The ZIP writer's output: hashed as it passes, the last 22 bytes (the end-of-central-
    directory record) held back so `finish` can set its comment length, sign the hash of every
    byte before the comment, and append the signature as the comment. Has no seek/tell, so
    `zipfile` streams (data descriptors) instead of seeking back."""

    def __init__(self, out: _Collector) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self._tail = b""
        self.size = 0

    def write(self, data: bytes) -> int:
        data = bytes(data)
        if len(data) >= _EOCD.size:
            forward, self._tail = self._tail + data[: -_EOCD.size], data[-_EOCD.size :]
        else:
            joined = self._tail + data
            forward, self._tail = joined[: -_EOCD.size], joined[-_EOCD.size :]
        if forward:
            self._hash.update(forward)
            self._out.write(forward)
            self.size += len(forward)
        return len(data)

    def flush(self) -> None:
        pass

    def finish(self, key: Ed25519PrivateKey) -> tuple[str, int]:
        """Sign and write the end; returns (SHA-256 of the whole file, its size)."""
        fields = list(_EOCD.unpack(self._tail))
        if fields[0] != _EOCD_SIG or fields[-1] != 0:
            raise RuntimeError("the ZIP did not end with an empty-comment EOCD record")
        fields[-1] = COMMENT_LEN
        tail = _EOCD.pack(*fields)
        self._hash.update(tail)
        signature = key.sign(BUNDLE_DOMAIN + self._hash.digest())
        comment = _COMMENT_PREFIX + key_id(key).encode() + b" " + signature.hex().encode()
        assert len(comment) == COMMENT_LEN
        whole = self._hash.copy()
        whole.update(comment)
        self._out.write(tail + comment)
        self.size += len(tail) + len(comment)
        return whole.hexdigest(), self.size


class _HashingWriter:
    """A write-only file for PyAV (no seek: the mp4 muxer then streams fragments) that hashes
    what passes into the ZIP member."""

    def __init__(self, member: BinaryIO) -> None:
        self._member = member
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        self._member.write(data)
        return len(data)


@dataclass
class _Footage:
    """One MP4 of the bundle being written."""

    name: str
    member: BinaryIO
    writer: _HashingWriter
    container: Any
    stream: Any
    signature: tuple[Any, ...]
    start: float
    end: float = 0.0
    segments: list[int] = field(default_factory=list)
    last_dts: Fraction | None = None
    packets: int = 0


class BundleWriter:
    """Writes a bundle into a collector, one opened segment at a time. Blocking (PyAV,
    zipfile): each call runs in a worker thread, one at a time."""

    def __init__(self, out: _Collector, range_start: float, when: float) -> None:
        self.range_start = range_start
        self._when = datetime.fromtimestamp(when, UTC).timetuple()[:6]
        self._sink = _SigningSink(out)
        self._zip = zipfile.ZipFile(  # type: ignore[call-overload]
            self._sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True
        )
        self._footage: _Footage | None = None
        self.files: list[dict[str, Any]] = []

    def _info(self, name: str) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(name, date_time=self._when)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        return info

    def add(self, plain: Plaintext) -> None:
        """Remux one opened segment's packets into the current MP4 (a new file if the codec
        parameters changed), at its wall-clock offset from the range start."""
        with av.open(io.BytesIO(plain.whole), "r", format="mp4") as source:
            if not source.streams.video:
                raise ValueError(f"segment {plain.seq} has no video stream")
            istream = source.streams.video[0]
            ctx = istream.codec_context
            signature = (ctx.name, ctx.width, ctx.height, bytes(ctx.extradata or b""))
            footage = self._footage
            if footage is None or footage.signature != signature:
                self._close_footage()
                footage = self._open_footage(istream, signature, plain.start)
            tb = istream.time_base
            assert tb is not None
            offset = round(Fraction(plain.start - self.range_start) / tb)
            shift: int | None = None
            for packet in source.demux(istream):
                if packet.dts is None or packet.pts is None:
                    continue  # the demuxer's flush packet
                if shift is None:
                    shift = offset
                    if footage.last_dts is not None:
                        # Wall times of adjacent segments can overlap by a few ms: keep DTS
                        # strictly increasing (the muxer requires it).
                        first = Fraction(packet.dts + shift) * tb
                        if first <= footage.last_dts:
                            shift += int((footage.last_dts - first) / tb) + 1
                packet.dts += shift
                packet.pts += shift
                footage.last_dts = Fraction(packet.dts) * tb
                packet.stream = footage.stream
                footage.container.mux(packet)
                footage.packets += 1
        footage.segments.append(plain.seq)
        footage.end = max(footage.end, plain.start)

    def _open_footage(self, istream: Any, signature: tuple[Any, ...], start: float) -> _Footage:
        name = f"footage-{len(self.files) + 1:02d}.mp4"
        member = self._zip.open(self._info(name), "w", force_zip64=True)
        writer = _HashingWriter(member)
        container = av.open(writer, "w", format="mp4", options={"movflags": _MOVFLAGS})
        stream = container.add_stream_from_template(istream)
        if istream.codec_context.name == "hevc":
            stream.codec_context.codec_tag = "hvc1"
        self._footage = _Footage(name, member, writer, container, stream, signature, start)
        return self._footage

    def _close_footage(self) -> None:
        footage, self._footage = self._footage, None
        if footage is None:
            return
        footage.container.close()
        footage.member.close()
        self.files.append(
            {
                "name": footage.name,
                "bytes": footage.writer.size,
                "sha256": footage.writer.hash.hexdigest(),
                "segments": footage.segments,
                "packets": footage.packets,
            }
        )

    def finish(self, manifest: dict[str, Any], key: Ed25519PrivateKey) -> tuple[str, int]:
        """Close the footage, add manifest, its signature and the README, sign the file."""
        self._close_footage()
        manifest = {**manifest, "files": self.files}
        body = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False).encode()
        sig = {"alg": "ed25519", "key_id": key_id(key), "signature": sign_payload(key, manifest)}
        self._zip.writestr(self._info(MANIFEST), body)
        self._zip.writestr(self._info(MANIFEST_SIG), json.dumps(sig, indent=2).encode())
        self._zip.writestr(self._info(README), _readme(manifest).encode())
        self._zip.close()
        return self._sink.finish(key)


def _readme(manifest: dict[str, Any]) -> str:
    return (
        "isocam — gói trích xuất hình ảnh / footage export bundle\n\n"
        f"Điểm / site: {manifest['site']['site_id']}   Camera: {manifest['camera']}\n"
        f"Từ / from: {manifest['range']['start_iso']}   Đến / to: {manifest['range']['end_iso']}\n"
        f"Căn cứ / legal basis: {manifest['legal_basis']['document_number']} — "
        f"{manifest['legal_basis']['authority']}\n\n"
        "Kiểm tra / verify (offline):\n"
        "  central-hub export verify THIS.zip --key HUB_SIGNING_KEY.pub\n\n"
        "Gói được ký bằng khoá Ed25519 của trung tâm; sửa bất kỳ byte nào cũng làm việc kiểm tra "
        "thất bại.\nThe bundle is signed with the hub's Ed25519 key; changing any byte makes "
        "verification fail.\n"
    )


@dataclass(frozen=True)
class BundleResult:
    sha256: str
    size: int
    manifest: dict[str, Any]


async def build_bundle(
    write: Callable[[bytes], Awaitable[Any]],
    *,
    request: ExportRequest,
    listing: SegmentListing,
    site: SiteAttrs,
    built_by: Principal,
    broker: TunnelBroker,
    viewing_key: RecipientPrivateKey,
    signing_key: Ed25519PrivateKey,
    session: str | None = None,
) -> BundleResult:
    """Stream the bundle of an approved request to `write`: each segment is fetched sealed
    through the tunnel, opened and remuxed in memory (worker thread), and the bytes produced
    are written out before the next segment is fetched (memory stays ~one segment)."""
    if request.state is not ExportState.APPROVED or request.decided_by is None:
        raise ExportError("bad_state", "only an approved request has a bundle")
    if not listing.segments:
        raise ExportError("empty", "no recording in the range")
    built_at = time.time()
    out = _Collector()
    writer = await asyncio.to_thread(BundleWriter, out, request.start, built_at)
    file_of: dict[int, str] = {}
    for info in listing.segments:
        sealed = await broker.fetch_segment(
            site.site_id, request.camera_id, info.seq, user=built_by.user_id, session=session
        )
        plain = await asyncio.to_thread(
            open_in_memory,
            sealed,
            viewing_key,
            site=site.site_id,
            camera=request.camera_id,
            seq=info.seq,
        )
        del sealed
        await asyncio.to_thread(writer.add, plain)
        del plain
        await write(out.drain())
    segments: list[dict[str, Any]] = []
    for info in listing.segments:
        entry: dict[str, Any] = {
            "seq": info.seq,
            "chain_position": info.seq,
            "start": info.start,
            "end": info.end,
            "bytes": info.bytes,
            "fragments": info.fragments,
            "finished": info.finished,
            "codec": info.codec,
            "sha256": info.sha256,
        }
        for extra in ("row_hash", "prev_hash"):  # when the edge's listing carries them
            value = getattr(info, extra, None)
            if value is not None:
                entry[extra] = value
        segments.append(entry)
    for f in writer.files:
        for seq in f["segments"]:
            file_of[seq] = f["name"]
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "export_id": request.export_id,
        "site": {
            "site_id": site.site_id,
            "province": site.province,
            "district": site.district,
            "kind": site.kind,
            "authority": site.authority,
            "operator": site.operator,
        },
        "camera": request.camera_id,
        "range": {
            "start": request.start,
            "end": request.end,
            "start_iso": _iso(request.start),
            "end_iso": _iso(request.end),
        },
        "covered": {
            "start": min(s.start for s in listing.segments),
            "end": max(s.end for s in listing.segments),
        },
        "legal_basis": {
            "document_number": request.document_number,
            "authority": request.authority,
            "note": request.note,
        },
        "requested": {**request.requested_by.as_json(), "at": request.requested_at},
        "approved": {
            **request.decided_by.as_json(),
            "at": request.decided_at,
            "note": request.decision_note or "",
        },
        "built": {
            "at": built_at,
            "at_iso": _iso(built_at),
            "by": {
                "user_id": built_by.user_id,
                "email": built_by.email,
                "full_name": built_by.full_name,
            },
        },
        "segments": [{**s, "file": file_of.get(int(s["seq"]))} for s in segments],
        "gaps": [{"start": g.start, "end": g.end, "cause": g.cause} for g in listing.gaps],
        "gaps_truncated": listing.gaps_truncated,
        "signing_key": {
            "key_id": key_id(signing_key),
            "public_key_pem": public_key_pem(signing_key),
        },
    }
    digest, size = await asyncio.to_thread(writer.finish, manifest, signing_key)
    await write(out.drain())
    return BundleResult(digest, size, {**manifest, "files": writer.files})


# --------------------------------------------------------------------------------------------
# Verifying a bundle (offline)


@dataclass
class BundleReport:
    """What `verify_bundle` found; `ok` only if every check held."""

    problems: list[str] = field(default_factory=list)
    key_id: str | None = None
    key_given: bool = False
    manifest: dict[str, Any] | None = None
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_tail(f: BinaryIO, size: int) -> bytes:
    f.seek(size - _EOCD.size - COMMENT_LEN)
    return f.read(_EOCD.size + COMMENT_LEN)


def verify_bundle(
    path: str | os.PathLike[str], public_key: Ed25519PublicKey | None = None
) -> BundleReport:
    """Check a bundle offline: the signature over every byte (ZIP comment), the ZIP's CRCs,
    exactly the expected members, the manifest's signature, and each footage file's size and
    SHA-256 against the manifest. Without `public_key` the key named in the manifest is used
    — that proves integrity only, not origin: compare its key id with the hub's published one.
    """
    report = BundleReport(key_given=public_key is not None)
    target = Path(path)
    try:
        size = target.stat().st_size
    except OSError as exc:
        report.problems.append(f"cannot read {target}: {exc.strerror}")
        return report
    if size < _EOCD.size + COMMENT_LEN + 30:
        report.problems.append("not an isocam export bundle (too short)")
        return report
    with target.open("rb") as f:
        tail = _read_tail(f, size)
        fields = _EOCD.unpack(tail[: _EOCD.size])
        comment = tail[_EOCD.size :]
        match = _COMMENT_RE.fullmatch(comment)
        if fields[0] != _EOCD_SIG or fields[-1] != COMMENT_LEN or match is None:
            report.problems.append(
                "the bundle signature (ZIP comment) is missing or malformed: not an isocam "
                "bundle, or its end was altered"
            )
            return report
        comment_key_id = match.group(1).decode()
        signature = bytes.fromhex(match.group(2).decode())
        f.seek(0)
        digest = hashlib.sha256()
        remaining = size - COMMENT_LEN
        while remaining:
            block = f.read(min(remaining, 1024 * 1024))
            if not block:
                break
            digest.update(block)
            remaining -= len(block)
        try:
            archive = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError) as exc:
            report.problems.append(f"not a readable ZIP: {exc}")
            archive = None
        manifest: dict[str, Any] | None = None
        manifest_sig: dict[str, Any] | None = None
        if archive is not None:
            manifest, manifest_sig = _check_members(archive, report)
        key = public_key
        if key is None and manifest is not None:
            try:
                key = load_public_key_pem(str(manifest["signing_key"]["public_key_pem"]))
            except (KeyError, TypeError, SigningKeyError) as exc:
                report.problems.append(f"the manifest names no usable signing key: {exc}")
        if key is None:
            report.problems.append("no key to check the signature with (use --key)")
            return report
        report.key_id = key_id(key)
        if comment_key_id != report.key_id:
            report.problems.append(
                f"the bundle is signed by key {comment_key_id}, not by key {report.key_id}"
            )
        try:
            key.verify(signature, BUNDLE_DOMAIN + digest.digest())
        except InvalidSignature:
            report.problems.append(
                "the signature over the bundle does not verify: some byte was changed"
            )
        if manifest is not None and manifest_sig is not None:
            if manifest_sig.get("alg") != "ed25519" or not isinstance(
                manifest_sig.get("signature"), str
            ):
                report.problems.append("manifest.sig is malformed")
            elif not verify_payload(key, manifest, manifest_sig["signature"]):
                report.problems.append("the manifest's signature does not verify")
            if manifest.get("signing_key", {}).get("key_id") != report.key_id:
                report.problems.append("the manifest names another signing key")
        if archive is not None and manifest is not None:
            _check_files(archive, manifest, report)
        report.manifest = manifest
    return report


def _check_members(
    archive: zipfile.ZipFile, report: BundleReport
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    names = [i.filename for i in archive.infolist()]
    report.files = names
    if len(set(names)) != len(names):
        report.problems.append("the ZIP holds the same name twice")
    for name in names:
        if name not in (MANIFEST, MANIFEST_SIG, README) and not _FOOTAGE_RE.fullmatch(name):
            report.problems.append(f"unexpected member {name!r}")
    try:
        bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        report.problems.append(f"the ZIP is damaged: {exc}")
        bad = None
    else:
        if bad is not None:
            report.problems.append(f"member {bad} is damaged (CRC mismatch)")
    manifest = manifest_sig = None
    try:
        manifest = json.loads(archive.read(MANIFEST))
        manifest_sig = json.loads(archive.read(MANIFEST_SIG))
    except KeyError as exc:
        report.problems.append(f"missing {exc.args[0]}")
    except (ValueError, zipfile.BadZipFile, OSError) as exc:
        report.problems.append(f"manifest unreadable: {exc}")
    if manifest is not None and (
        not isinstance(manifest, dict) or manifest.get("format") != FORMAT
    ):
        report.problems.append(f"the manifest is not a {FORMAT} manifest")
        manifest = None
    if manifest_sig is not None and not isinstance(manifest_sig, dict):
        manifest_sig = None
    return manifest, manifest_sig


def _check_files(archive: zipfile.ZipFile, manifest: dict[str, Any], report: BundleReport) -> None:
    listed = manifest.get("files")
    if not isinstance(listed, list) or not listed:
        report.problems.append("the manifest lists no footage")
        return
    present = {n for n in report.files if _FOOTAGE_RE.fullmatch(n)}
    names = {str(f.get("name")) for f in listed if isinstance(f, dict)}
    if present != names:
        report.problems.append(f"footage files differ from the manifest: {sorted(present ^ names)}")
    for entry in listed:
        if not isinstance(entry, dict) or str(entry.get("name")) not in present:
            continue
        digest = hashlib.sha256()
        count = 0
        try:
            with archive.open(str(entry["name"])) as member:
                while block := member.read(1024 * 1024):
                    digest.update(block)
                    count += len(block)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            report.problems.append(f"{entry['name']}: unreadable ({exc})")
            continue
        if count != entry.get("bytes") or digest.hexdigest() != entry.get("sha256"):
            report.problems.append(f"{entry['name']} does not match the manifest (size or SHA-256)")


# --------------------------------------------------------------------------------------------
# Pages


@dataclass
class ExportService:
    """The export pages' state: the viewing layer (broker, keys, audit) and the requests."""

    viewing: ViewingService
    store: ExportStore
    config: ExportConfig


EXPORTS: web.AppKey[ExportService] = web.AppKey("isocam_export", ExportService)


def _camera_ok(camera: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", camera))


async def _form(request: web.Request) -> dict[str, str]:
    data: MultiDictProxy[Any] = await request.post()
    return {k: v for k, v in data.items() if isinstance(v, str)}


async def export_list(
    request: web.Request,
    error: str | None = None,
    values: dict[str, str] | None = None,
    status: int = 200,
) -> web.StreamResponse:
    service = request.app[EXPORTS]
    principal = require_login(request)
    now = time.time()
    may_request = can(principal, "export_request", None, now)
    if not may_request and not can(principal, "export_approve", None, now):
        await require(request, "export_request", None)
    rows = await asyncio.to_thread(service.store.visible_to, principal, now)
    q = request.query
    defaults = {
        "site": q.get("site", "")[:64],
        "camera": q.get("camera", "")[:64],
        "start": q.get("start", "")[:32],
        "end": q.get("end", "")[:32],
        "document_number": "",
        "authority": "",
        "note": "",
    }
    return page(
        request, "viewing/export_list.html", status=status, rows=rows,
        may_request=may_request, values=values or defaults, error=error, me=principal.user_id,
    )  # fmt: skip


async def export_create(request: web.Request) -> web.StreamResponse:
    service = request.app[EXPORTS]
    principal = require_login(request)
    form = await _form(request)
    names = ("site", "camera", "start", "end", "document_number", "authority", "note")
    values = {k: form.get(k, "")[:1000] for k in names}
    try:
        site_id = values["site"].strip()
        camera = values["camera"].strip()
        if not is_valid_site_id(site_id) or not _camera_ok(camera):
            raise ExportError("invalid", "site or camera")
        start = parse_local(values["start"])
        end = parse_local(values["end"])
        document = clean_field(values["document_number"], 128, "document number")
        authority = clean_field(values["authority"], 300, "requesting authority")
        note = clean_field(values["note"], 1000, "note", required=False)
    except (ExportError, ValueError) as exc:
        return await export_list(request, error=str(exc), values=values, status=400)
    site = await service.viewing.site(site_id)
    await require(
        request, "export_request", site, camera=camera, time_range=(start, end),
        reason=f"legal basis: {document} — {authority}"[:1000],
    )  # fmt: skip
    try:
        export_id = await asyncio.to_thread(
            service.store.create, site=site, camera=camera, start=start, end=end,
            document_number=document, authority=authority, note=note, requester=principal,
            source=client_source(request),
        )  # fmt: skip
    except ExportError as exc:
        return await export_list(request, error=str(exc), values=values, status=400)
    raise web.HTTPSeeOther(f"/export/{export_id}")


async def _visible_request(request: web.Request) -> tuple[ExportRequest, SiteAttrs, Principal]:
    """The request named in the URL, if the user may see it (request or approve on its site);
    a refusal is audited."""
    service = request.app[EXPORTS]
    principal = require_login(request)
    found = await asyncio.to_thread(service.store.get, int(request.match_info["export_id"]))
    if found is None:
        raise web.HTTPNotFound()
    site = await service.viewing.site(found.site_id)
    now = time.time()
    if not (
        can(principal, "export_request", site, now) or can(principal, "export_approve", site, now)
    ):
        await require(request, "export_approve", site, camera=found.camera_id,
                      time_range=(found.start, found.end))  # fmt: skip
    return found, site, principal


async def export_detail(
    request: web.Request, error: str | None = None, status: int = 200
) -> web.StreamResponse:
    service = request.app[EXPORTS]
    found, site, principal = await _visible_request(request)
    now = time.time()
    can_decide = (
        found.state is ExportState.REQUESTED
        and found.requested_by.user_id != principal.user_id
        and can(principal, "export_approve", site, now)
    )
    can_download = (
        found.state is ExportState.APPROVED
        and found.requested_by.user_id == principal.user_id
        and found.decided_at is not None
        and now < found.decided_at + service.config.download_seconds
    )
    return page(
        request, "viewing/export_detail.html", status=status, req=found, site=site,
        can_decide=can_decide, can_download=can_download, error=error,
        key_id=key_id(service.viewing.signing_key),
    )  # fmt: skip


async def export_decide(request: web.Request) -> web.StreamResponse:
    service = request.app[EXPORTS]
    found, site, principal = await _visible_request(request)
    approve = request.match_info["decision"] == "approve"
    form = await _form(request)
    note = form.get("note", "")[:1000].strip()
    await require(
        request, "export_approve", site, camera=found.camera_id,
        time_range=(found.start, found.end),
        reason=f"{'approve' if approve else 'reject'} export {found.export_id}",
    )  # fmt: skip
    try:
        await asyncio.to_thread(
            service.store.decide, found.export_id, principal, approve, note, client_source(request)
        )
    except ExportError as exc:
        await service.viewing.record(
            "export_decision_refused", request, user=principal, site=site,
            camera=found.camera_id, time_range=(found.start, found.end), allowed=False,
            reason=exc.code, detail={"export_id": found.export_id},
        )  # fmt: skip
        return await export_detail(
            request, error=exc.code, status=403 if exc.code == "same_person" else 409
        )
    raise web.HTTPSeeOther(f"/export/{found.export_id}")


async def export_bundle(request: web.Request) -> web.StreamResponse:
    """Stream the bundle to its requester (while the approval is valid)."""
    service = request.app[EXPORTS]
    viewing = service.viewing
    found, site, principal = await _visible_request(request)
    if found.requested_by.user_id != principal.user_id:
        await viewing.record(
            "export_request", request, user=principal, site=site, camera=found.camera_id,
            time_range=(found.start, found.end), allowed=False,
            reason=f"not_requester: download export {found.export_id}",
        )  # fmt: skip
        raise web.HTTPForbidden()
    await require(
        request, "export_request", site, camera=found.camera_id,
        time_range=(found.start, found.end), reason=f"download export {found.export_id}",
    )  # fmt: skip
    if found.state is not ExportState.APPROVED or found.decided_at is None:
        return await export_detail(request, error="bad_state", status=409)
    if time.time() >= found.decided_at + service.config.download_seconds:
        return await export_detail(request, error="expired", status=410)
    session = auth_of(request).session
    session_hash = session.token_hash if session is not None else None
    try:
        listing = await viewing.broker.list_segments(
            site.site_id, found.camera_id, found.start, found.end,
            user=principal.user_id, session=session_hash,
        )  # fmt: skip
    except TunnelError as exc:
        raise web.HTTPGatewayTimeout(reason=f"site unavailable: {exc.reason}") from None
    if not listing.segments:
        raise web.HTTPNotFound(reason="no recording in the range")
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="isocam-export-{found.export_id}.zip"',
        }
    )
    await response.prepare(request)
    try:
        result = await build_bundle(
            response.write, request=found, listing=listing, site=site, built_by=principal,
            broker=viewing.broker, viewing_key=viewing.viewing_key,
            signing_key=viewing.signing_key, session=session_hash,
        )  # fmt: skip
    except (
        TunnelError,
        SegmentUnreadable,
        RemoteError,
        SegmentMismatch,
        ExportError,
        ValueError,
        av.FFmpegError,
    ) as exc:
        await viewing.record(
            "export_bundle_failed", request, user=principal, site=site,
            camera=found.camera_id, time_range=(found.start, found.end),
            reason=str(exc)[:900], detail={"export_id": found.export_id},
        )  # fmt: skip
        log.warning("export %d failed: %s", found.export_id, exc)
        raise  # the connection is cut: a truncated bundle never verifies
    await viewing.record(
        "export_bundle", request, user=principal, site=site, camera=found.camera_id,
        time_range=(found.start, found.end),
        detail={"export_id": found.export_id, "sha256": result.sha256, "bytes": result.size,
                "segments": len(listing.segments)},
    )  # fmt: skip
    await asyncio.to_thread(service.store.downloaded, found.export_id, result.sha256)
    await response.write_eof()
    return response


def setup_export(
    app: web.Application, viewing: ViewingService, config: ExportConfig | None = None
) -> ExportService:
    """Mount the export pages (called by `setup_viewing`)."""
    config = config or ExportConfig()
    service = ExportService(viewing, ExportStore(viewing.db, viewing.audit, config), config)
    app[EXPORTS] = service
    r = app.router
    r.add_get("/export", export_list)
    r.add_post("/export", export_create)
    r.add_get("/export/{export_id:[0-9]{1,12}}", export_detail)
    r.add_post("/export/{export_id:[0-9]{1,12}}/{decision:approve|reject}", export_decide)
    r.add_get("/export/{export_id:[0-9]{1,12}}/bundle", export_bundle)
    return service


__all__ = [
    "BUNDLE_DOMAIN",
    "COMMENT_LEN",
    "FORMAT",
    "BundleReport",
    "BundleResult",
    "BundleWriter",
    "ExportConfig",
    "ExportError",
    "ExportRequest",
    "ExportService",
    "ExportState",
    "ExportStore",
    "build_bundle",
    "export_requests",
    "generate_signing_key",
    "load_signing_key",
    "setup_export",
    "verify_bundle",
]
