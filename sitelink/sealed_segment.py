"""Sealed segments: the on-disk format that keeps recorded video encrypted at rest.

The edge box records each camera as fragmented-MP4 segments. Plaintext video never touches its
disk: every fragment is sealed as it is produced, and the box holds only *public* keys, so it
cannot read its own recordings; the hub (viewing key) and an offline escrow key can. Both sides
import this module. docs/sealed-segment.md is the byte-level specification and threat model.

How a segment is sealed (ARCHITECTURE.md decision 2):

- A fresh random AES-256-GCM *data key* per segment, wrapped to each recipient public key with
  HPKE (RFC 9180) single-shot base mode. Suites: the hybrid post-quantum
  ``MLKEM768-X25519`` (X-Wing, KEM id 0x647A, draft-ietf-hpke-pq; the default) or classic
  ``DHKEM(X25519)``, both with HKDF-SHA256 and AES-256-GCM. HPKE ``info`` binds the segment's
  identity (site, camera, sequence, start time, nonce prefix), since the single-shot API has no AAD.
- The header (site, camera, sequence, start time, recipients) is authenticated by a GCM tag
  under the data key, and its SHA-256 is the associated data of every chunk.
- Chunks (chunk 0 is the fMP4 init segment, then one chunk per fragment) are sealed with the
  STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015): nonce = 7-byte random prefix
  || 32-bit counter || last-chunk flag. ``close()`` writes an empty final chunk with the flag set,
  so truncation, reordering, dropping, duplicating and swapping chunks between files are detected,
  each with its own exception (all subclasses of ``SealedSegmentError``).
- Chunks are length-prefixed and written through as produced, so the writer appends to a
  non-seekable file; after a crash every complete chunk still opens and the reader reports
  ``finished = False``.

Public API::

    key = generate_private_key()                       # hub: make a viewing key pair
    write_private_key(key, "viewing.key")              # 0600, PEM-like text
    write_public_key(key.public_key(), "viewing.pub")  # edge gets only this

    with SegmentSealer(fileobj, SegmentHeader("site-1", "cam-3", 42, time.time()),
                       [load_public_key("viewing.pub"), load_public_key("escrow.pub")]) as s:
        s.write_chunk(init_segment)
        s.write_chunk(fragment)                        # one per fMP4 fragment

    read_header("seg.isg")                             # no key: indexing, verification at edge
    scan_segment("seg.isg")                            # no key: chunk count, finished, torn tail
    with open_segment("seg.isg", load_private_key("viewing.key")) as seg:
        for chunk in seg: ...                          # verified plaintext, streaming
        seg.finished
    unseal_to("seg.isg", key, "out.mp4")               # a playable fMP4 file

Not thread-safe: one sealer or opened segment per thread.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import math
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol, Self, TypeAlias, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "DEFAULT_SUITE",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "MAX_RECIPIENTS",
    "BinaryWriter",
    "ChunkCorruptedError",
    "ChunkDroppedError",
    "ChunkDuplicatedError",
    "ChunkError",
    "ChunkReorderedError",
    "ChunkTooLargeError",
    "ForeignChunkError",
    "HeaderError",
    "HeaderTamperedError",
    "InvalidHeaderError",
    "KeyFileError",
    "MalformedHeaderError",
    "NotARecipientError",
    "NotASealedSegmentError",
    "OpenedSegment",
    "RecipientEntry",
    "RecipientPrivateKey",
    "RecipientPublicKey",
    "SealSuite",
    "SealedSegmentError",
    "SealerClosedError",
    "SegmentHeader",
    "SegmentScan",
    "SegmentSealer",
    "TrailingDataError",
    "UnfinishedSegmentError",
    "UnsupportedVersionError",
    "generate_private_key",
    "load_private_key",
    "load_public_key",
    "open_segment",
    "read_header",
    "scan_segment",
    "unseal_to",
    "write_private_key",
    "write_public_key",
]

#: First 8 bytes of every sealed segment (PNG-style: a high byte, a name, a newline).
MAGIC = b"\x89ISOSEG\n"
FORMAT_VERSION = 1
#: Largest plaintext chunk. An fMP4 fragment of ~1 s at 16 Mbit/s is ~2 MiB; 16 MiB is headroom.
MAX_CHUNK_SIZE = 16 * 1024 * 1024
MAX_RECIPIENTS = 16
#: Reader limit on the header body (16 hybrid recipients take ~19 KiB).
MAX_HEADER_BODY = 64 * 1024
MAX_ID_BYTES = 255

_KEY_ID_SIZE = 8
_NONCE_PREFIX_SIZE = 7
_TAG_SIZE = 16
_REF_SIZE = 8
_DATA_KEY_SIZE = 32
_MAX_COUNTER = 2**32 - 1
_MAX_SEQ = 2**64 - 1
_MAX_START_US = 2**63 - 1
# The header tag uses counter 0xFFFFFFFF and flag byte 0x02; chunk nonces use flags 0x00/0x01,
# so no chunk nonce can collide with it under the same data key.
_HEADER_TAG_NONCE_SUFFIX = b"\xff\xff\xff\xff\x02"
_INFO_LABEL = b"isocam sealed-segment v1 data key\x00"
_KEY_ID_LABEL = b"isocam sealed-segment key id\x00"
_READ_BLOCK = 1024 * 1024

# Sizes of the hybrid X-Wing KEM (draft-connolly-cfrg-xwing-kem): ML-KEM-768 + X25519.
_MLKEM768_PUBLIC_SIZE = 1184
_XWING_PUBLIC_SIZE = _MLKEM768_PUBLIC_SIZE + 32
_XWING_SEED_SIZE = 32


# --------------------------------------------------------------------------------------------
# Errors


class SealedSegmentError(Exception):
    """Base of every error this module raises about a segment, a key or a key file."""


class HeaderError(SealedSegmentError):
    """The segment header cannot be used: not ours, unknown version, malformed or altered."""


class NotASealedSegmentError(HeaderError):
    """The file does not start with the sealed-segment magic bytes."""


class UnsupportedVersionError(HeaderError):
    """The file is a sealed segment of a format version this code does not read."""


class MalformedHeaderError(HeaderError):
    """The header cannot be parsed (cut short, bad lengths, unknown suite ids)."""


class HeaderTamperedError(HeaderError):
    """The header parses, but was altered after sealing (authentication failed)."""


class NotARecipientError(SealedSegmentError):
    """None of the given private keys is a recipient of this segment (wrong key)."""


class ChunkError(SealedSegmentError):
    """A chunk fails verification; ``index`` is its position in the file (0 = init segment)."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


class ChunkCorruptedError(ChunkError):
    """The chunk's bytes were altered (authentication failed, or its framing is invalid)."""


class ForeignChunkError(ChunkError):
    """The chunk belongs to another segment file (swapped in from elsewhere)."""


class ChunkReorderedError(ChunkError):
    """Chunks of this segment appear out of order."""


class ChunkDroppedError(ChunkError):
    """One or more chunks of this segment are missing."""


class ChunkDuplicatedError(ChunkError):
    """A chunk of this segment appears a second time."""


class TrailingDataError(ChunkError):
    """There are bytes after the final chunk."""


class UnfinishedSegmentError(SealedSegmentError):
    """The segment has no final chunk (crash or truncation) and a finished one was required."""


class ChunkTooLargeError(SealedSegmentError, ValueError):
    """A chunk larger than ``MAX_CHUNK_SIZE`` was given to the sealer."""


class SealerClosedError(SealedSegmentError, ValueError):
    """A chunk was written after ``close()`` or ``abort()``."""


class InvalidHeaderError(SealedSegmentError, ValueError):
    """A ``SegmentHeader`` field is out of range (caller error, at construction)."""


class KeyFileError(SealedSegmentError, ValueError):
    """A key file or key encoding is unreadable, inconsistent or unsafely stored."""


# --------------------------------------------------------------------------------------------
# Suites and keys


class SealSuite(enum.Enum):
    """An HPKE suite a recipient key belongs to; the value is the name used in key files."""

    X25519 = "DHKEM-X25519-HKDF-SHA256/HKDF-SHA256/AES-256-GCM"
    MLKEM768_X25519 = "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM"

    @property
    def ids(self) -> tuple[int, int, int]:
        """(KEM, KDF, AEAD) ids from the HPKE registries, as written in the header."""
        return _SUITE_IDS[self]

    @property
    def wrapped_size(self) -> int:
        """Bytes of one wrapped data key: HPKE enc || AES-256-GCM(32-byte key) with its tag."""
        return _SUITE_ENC_SIZE[self] + _DATA_KEY_SIZE + _TAG_SIZE

    def _hpke(self) -> hpke.Suite:
        kem = hpke.KEM.X25519 if self is SealSuite.X25519 else hpke.KEM.MLKEM768_X25519
        return hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


# RFC 9180 §7: KEM 0x0020 DHKEM(X25519, HKDF-SHA256), KDF 0x0001 HKDF-SHA256, AEAD 0x0002
# AES-256-GCM; KEM 0x647A is MLKEM768-X25519 (X-Wing) in draft-ietf-hpke-pq.
_SUITE_IDS = {
    SealSuite.X25519: (0x0020, 0x0001, 0x0002),
    SealSuite.MLKEM768_X25519: (0x647A, 0x0001, 0x0002),
}
_SUITE_BY_IDS = {ids: suite for suite, ids in _SUITE_IDS.items()}
_SUITE_ENC_SIZE = {SealSuite.X25519: 32, SealSuite.MLKEM768_X25519: 1120}
_PUBLIC_SIZE = {SealSuite.X25519: 32, SealSuite.MLKEM768_X25519: _XWING_PUBLIC_SIZE}
_PRIVATE_SIZE = {SealSuite.X25519: 32, SealSuite.MLKEM768_X25519: _XWING_SEED_SIZE}

#: Suite of keys made by ``generate_private_key()`` unless told otherwise (decision 2).
DEFAULT_SUITE = SealSuite.MLKEM768_X25519

_HpkePublic: TypeAlias = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey
_HpkePrivate: TypeAlias = x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey


def _key_id(suite: SealSuite, public_raw: bytes) -> str:
    digest = hashlib.sha256(_KEY_ID_LABEL + suite.ids[0].to_bytes(2, "big") + public_raw)
    return digest.digest()[:_KEY_ID_SIZE].hex()


def _xwing_components(seed: bytes) -> tuple[mlkem.MLKEM768PrivateKey, x25519.X25519PrivateKey]:
    # X-Wing private keys are a 32-byte seed, expanded with SHAKE256 to the ML-KEM-768 seed
    # (d || z, 64 bytes) and the X25519 scalar (32 bytes): draft-connolly-cfrg-xwing-kem §5.2.
    expanded = hashlib.shake_256(seed).digest(96)
    return (
        mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64]),
        x25519.X25519PrivateKey.from_private_bytes(expanded[64:]),
    )


@dataclass(frozen=True)
class RecipientPublicKey:
    """A recipient's public key; the edge holds only these.

    ``raw`` is the standard encoding: 32 bytes for X25519; for MLKEM768-X25519 the X-Wing
    public key, ML-KEM-768 encapsulation key (1184 bytes) || X25519 public key (32 bytes).
    """

    suite: SealSuite
    raw: bytes
    _hpke_key: _HpkePublic = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_size("public", self.suite, self.raw, _PUBLIC_SIZE)
        key: _HpkePublic
        try:
            if self.suite is SealSuite.X25519:
                key = x25519.X25519PublicKey.from_public_bytes(self.raw)
            else:
                key = hpke.MLKEM768X25519PublicKey(
                    mlkem.MLKEM768PublicKey.from_public_bytes(self.raw[:_MLKEM768_PUBLIC_SIZE]),
                    x25519.X25519PublicKey.from_public_bytes(self.raw[_MLKEM768_PUBLIC_SIZE:]),
                )
        except ValueError as exc:
            raise KeyFileError(f"invalid {self.suite.name} public key: {exc}") from None
        object.__setattr__(self, "_hpke_key", key)

    @property
    def key_id(self) -> str:
        """16 hex digits naming this key in headers and key files (SHA-256 of the key)."""
        return _key_id(self.suite, self.raw)

    def to_pem(self) -> str:
        """The key as PEM-like text (see docs/sealed-segment.md, "Key files")."""
        return _to_pem("PUBLIC", self.suite, self.key_id, self.raw)

    @classmethod
    def from_pem(cls, text: str) -> RecipientPublicKey:
        """Parse ``to_pem()`` output; raises ``KeyFileError`` with the reason."""
        return _key_from_pem(cls, "PUBLIC", text)


@dataclass(frozen=True)
class RecipientPrivateKey:
    """A recipient's private key (hub viewing key, escrow key); never on an edge box.

    ``raw`` is 32 bytes: the X25519 scalar, or the X-Wing seed for MLKEM768-X25519.
    """

    suite: SealSuite
    raw: bytes = field(repr=False)
    _hpke_key: _HpkePrivate = field(init=False, repr=False, compare=False)
    _public: RecipientPublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_size("private", self.suite, self.raw, _PRIVATE_SIZE)
        key: _HpkePrivate
        if self.suite is SealSuite.X25519:
            key = x25519.X25519PrivateKey.from_private_bytes(self.raw)
            public_raw = key.public_key().public_bytes_raw()
        else:
            m, x = _xwing_components(self.raw)
            key = hpke.MLKEM768X25519PrivateKey(m, x)
            public_raw = m.public_key().public_bytes_raw() + x.public_key().public_bytes_raw()
        object.__setattr__(self, "_hpke_key", key)
        object.__setattr__(self, "_public", RecipientPublicKey(self.suite, public_raw))

    def public_key(self) -> RecipientPublicKey:
        """The matching public key, to hand to edge boxes."""
        return self._public

    @property
    def key_id(self) -> str:
        """Key id of the matching public key."""
        return self._public.key_id

    def to_pem(self) -> str:
        """The key as PEM-like text; keep it in a 0600 file (``write_private_key``)."""
        return _to_pem("PRIVATE", self.suite, self.key_id, self.raw)

    @classmethod
    def from_pem(cls, text: str) -> RecipientPrivateKey:
        """Parse ``to_pem()`` output; the Key-Id line must match the key."""
        return _key_from_pem(cls, "PRIVATE", text)


def generate_private_key(suite: SealSuite = DEFAULT_SUITE) -> RecipientPrivateKey:
    """Make a new recipient key pair (``.public_key()`` is the part edges get)."""
    if suite is SealSuite.X25519:
        return RecipientPrivateKey(suite, x25519.X25519PrivateKey.generate().private_bytes_raw())
    return RecipientPrivateKey(suite, os.urandom(_XWING_SEED_SIZE))


def _to_pem(kind: str, suite: SealSuite, key_id: str, raw: bytes) -> str:
    body = base64.b64encode(raw).decode("ascii")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join(
        [
            f"-----BEGIN ISOCAM SEGMENT {kind} KEY-----",
            f"Suite: {suite.value}",
            f"Key-Id: {key_id}",
            "",
            *lines,
            f"-----END ISOCAM SEGMENT {kind} KEY-----",
            "",
        ]
    )


def _from_pem(kind: str, text: str) -> tuple[SealSuite, str, bytes]:
    begin, end = (
        f"-----BEGIN ISOCAM SEGMENT {kind} KEY-----",
        f"-----END ISOCAM SEGMENT {kind} KEY-----",
    )
    lines = [line.strip() for line in text.splitlines()]
    if begin not in lines:
        other = "PRIVATE" if kind == "PUBLIC" else "PUBLIC"
        if f"-----BEGIN ISOCAM SEGMENT {other} KEY-----" in lines:
            raise KeyFileError(f"this is a {other.lower()} key, a {kind.lower()} key is needed")
        raise KeyFileError(f"no '{begin}' line: not an isocam segment {kind.lower()} key")
    start = lines.index(begin) + 1
    if end not in lines[start:]:
        raise KeyFileError(f"no '{end}' line: the key file is cut short")
    block = lines[start : lines.index(end, start)]
    if "" not in block:
        raise KeyFileError("no blank line between the key file's headers and its body")
    split = block.index("")
    headers: dict[str, str] = {}
    for line in block[:split]:
        name, sep, value = line.partition(":")
        if not sep:
            raise KeyFileError(f"bad key file header line {line!r} (expected 'Name: value')")
        headers[name.strip().lower()] = value.strip()
    suite_name = headers.get("suite")
    suite = next((s for s in SealSuite if s.value == suite_name), None)
    if suite is None:
        names = ", ".join(s.value for s in SealSuite)
        raise KeyFileError(f"unknown or missing Suite {suite_name!r} (known: {names})")
    if "key-id" not in headers:
        raise KeyFileError("the key file has no Key-Id line")
    try:
        raw = base64.b64decode("".join(block[split + 1 :]), validate=True)
    except binascii.Error:
        raise KeyFileError("the key file's body is not valid base64") from None
    return suite, headers["key-id"], raw


def _check_size(kind: str, suite: SealSuite, raw: bytes, sizes: dict[SealSuite, int]) -> None:
    if len(raw) != sizes[suite]:
        raise KeyFileError(f"a {suite.name} {kind} key is {sizes[suite]} bytes, not {len(raw)}")


_Key = TypeVar("_Key", "RecipientPublicKey", "RecipientPrivateKey")


def _key_from_pem(cls: type[_Key], kind: str, text: str) -> _Key:
    """Parse a key file of `kind`; its Key-Id line must match the key it holds."""
    suite, stated, raw = _from_pem(kind, text)
    key = cls(suite, raw)
    if stated.lower() != key.key_id:
        raise KeyFileError(
            f"Key-Id {stated} does not match the key ({key.key_id}): the key file is corrupted"
        )
    return key


def _write_key_file(path: str | os.PathLike[str], text: str, mode: int, overwrite: bool) -> None:
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            os.fchmod(f.fileno(), mode)  # the umask may have removed bits, never added
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # atomic "create unless it exists"
            except FileExistsError:
                raise FileExistsError(
                    f"{target} already exists; refusing to overwrite a key file"
                ) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_private_key(
    key: RecipientPrivateKey, path: str | os.PathLike[str], *, overwrite: bool = False
) -> None:
    """Write a private key file readable by its owner only (0600), atomically."""
    _write_key_file(path, key.to_pem(), 0o600, overwrite)


def write_public_key(
    key: RecipientPublicKey, path: str | os.PathLike[str], *, overwrite: bool = False
) -> None:
    """Write a public key file (0644): this is what edge boxes are configured with."""
    _write_key_file(path, key.to_pem(), 0o644, overwrite)


def load_private_key(path: str | os.PathLike[str]) -> RecipientPrivateKey:
    """Read a private key file; refuses one that group or others can access (like ssh)."""
    p = Path(path)
    mode = p.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{p} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run 'chmod 600 {p}'"
        )
    try:
        return RecipientPrivateKey.from_pem(p.read_text(encoding="ascii"))
    except (KeyFileError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{p}: {exc}") from None


def load_public_key(path: str | os.PathLike[str]) -> RecipientPublicKey:
    """Read a public key file written by ``write_public_key``."""
    p = Path(path)
    try:
        return RecipientPublicKey.from_pem(p.read_text(encoding="ascii"))
    except (KeyFileError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{p}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Header


@dataclass(frozen=True)
class RecipientEntry:
    """One recipient in a header: who (key id), how (suite), and the wrapped data key."""

    key_id: str
    suite: SealSuite
    wrapped_key: bytes = field(repr=False)


@dataclass(frozen=True)
class SegmentHeader:
    """What a segment is: stored in clear (readable without a key) and authenticated.

    ``start_time`` is UNIX seconds (UTC), the project's one time representation; it is stored
    as whole microseconds, and rounded to them here so a header read back compares equal.
    ``recipients`` is filled in by the sealer; leave it empty when creating a header.
    """

    site_id: str
    camera_id: str
    seq: int
    start_time: float
    recipients: tuple[RecipientEntry, ...] = ()
    version: int = FORMAT_VERSION
    _start_us: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("site_id", "camera_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not 0 < len(value.encode("utf-8")) <= MAX_ID_BYTES:
                raise InvalidHeaderError(f"{name} must be 1..{MAX_ID_BYTES} bytes of UTF-8 text")
        if (
            isinstance(self.seq, bool)
            or not isinstance(self.seq, int)
            or not 0 <= self.seq <= _MAX_SEQ
        ):
            raise InvalidHeaderError(f"seq must be an integer in 0..2**64-1, not {self.seq!r}")
        t = self.start_time
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise InvalidHeaderError(f"start_time must be UNIX seconds >= 0, not {t!r}")
        micros = round(t * 1_000_000)
        if micros > _MAX_START_US:
            raise InvalidHeaderError(f"start_time {t!r} is out of range")
        object.__setattr__(self, "start_time", micros / 1_000_000)
        object.__setattr__(self, "_start_us", micros)
        object.__setattr__(self, "recipients", tuple(self.recipients))

    @property
    def start_us(self) -> int:
        """Start time as whole microseconds since the UNIX epoch, exactly as stored."""
        return self._start_us

    def _with_stored_start(self, start_us: int) -> SegmentHeader:
        # Floats lose sub-microsecond exactness after 2106; keep the stored integer verbatim.
        object.__setattr__(self, "_start_us", start_us)
        return self


def _uvarint(value: int) -> bytes:
    # Unsigned LEB128. Varints keep the clear-text fields free of runs of zero bytes: a segment
    # holds no fixed "00 00 00 01" (an H.264/H.265 start code) that a plaintext check would flag.
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class _Cursor:
    """Parses the header body; every failure is a MalformedHeaderError naming the field."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise MalformedHeaderError(f"header body ends inside {what}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uvarint(self, what: str, limit: int) -> int:
        value = shift = 0
        for i in range(10):
            byte = self.take(1, what)[0]
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if byte == 0 and i > 0:
                    raise MalformedHeaderError(f"{what} is not minimally encoded")
                if value > limit:
                    raise MalformedHeaderError(f"{what} is out of range ({value})")
                return value
        raise MalformedHeaderError(f"{what} is too long")

    def text(self, what: str) -> str:
        n = self.uvarint(f"{what} length", MAX_ID_BYTES)
        try:
            value = self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedHeaderError(f"{what} is not valid UTF-8") from None
        if not value:
            raise MalformedHeaderError(f"{what} is empty")
        return value


@dataclass(frozen=True)
class _ParsedHeader:
    header: SegmentHeader
    raw: bytes  # every header byte, tag included
    identity: bytes  # magic, version and identity fields as encoded: what HPKE info binds
    nonce_prefix: bytes

    @property
    def tag(self) -> bytes:
        return self.raw[-_TAG_SIZE:]

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.raw).digest()


def _encode_identity(header: SegmentHeader, nonce_prefix: bytes) -> tuple[bytes, bytes]:
    site, camera = header.site_id.encode("utf-8"), header.camera_id.encode("utf-8")
    fields = b"".join(
        [
            _uvarint(len(site)),
            site,
            _uvarint(len(camera)),
            camera,
            _uvarint(header.seq),
            _uvarint(header.start_us),
            nonce_prefix,
        ]
    )
    return MAGIC + _uvarint(FORMAT_VERSION) + fields, fields


def _hpke_info(identity: bytes) -> bytes:
    return _INFO_LABEL + hashlib.sha256(identity).digest()


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Read n bytes, fewer only at end of file (handles short reads of pipes and raw files)."""
    parts = []
    while n > 0:
        chunk = f.read(n)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _read_stream_uvarint(f: BinaryIO, limit: int) -> tuple[int | None, bytes]:
    """(value, bytes read); value None if the file ends inside it, -1 if it is invalid."""
    value = shift = 0
    read = bytearray()
    for i in range(10):
        b = f.read(1)
        if not b:
            return None, bytes(read)
        read += b
        value |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            if (b[0] == 0 and i > 0) or value > limit:
                return -1, bytes(read)
            return value, bytes(read)
    return -1, bytes(read)


def _parse_header(f: BinaryIO) -> _ParsedHeader:
    magic = _read_exact(f, len(MAGIC))
    if magic != MAGIC:
        if not magic:
            raise NotASealedSegmentError("empty file: not a sealed segment")
        if MAGIC.startswith(magic):
            raise MalformedHeaderError("the file ends inside the header")
        raise NotASealedSegmentError("not a sealed segment (wrong magic bytes)")
    version, version_raw = _read_stream_uvarint(f, 2**32)
    if version is None:
        raise MalformedHeaderError("the file ends inside the header")
    if version < 0:
        raise MalformedHeaderError("the format version field is invalid")
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"sealed segment format version {version} is not supported (this code reads "
            f"version {FORMAT_VERSION}); upgrade isocam"
        )
    body_len, body_len_raw = _read_stream_uvarint(f, MAX_HEADER_BODY)
    if body_len is None:
        raise MalformedHeaderError("the file ends inside the header")
    if body_len < 0:
        raise MalformedHeaderError(f"header length is invalid or above {MAX_HEADER_BODY} bytes")
    rest = _read_exact(f, body_len + _TAG_SIZE)
    if len(rest) < body_len + _TAG_SIZE:
        raise MalformedHeaderError("the file ends inside the header")
    body = rest[:body_len]
    cur = _Cursor(body)
    site = cur.text("site id")
    camera = cur.text("camera id")
    seq = cur.uvarint("segment seq", _MAX_SEQ)
    start_us = cur.uvarint("start time", _MAX_START_US)
    nonce_prefix = cur.take(_NONCE_PREFIX_SIZE, "nonce prefix")
    identity_end = cur.pos
    count = cur.uvarint("recipient count", MAX_RECIPIENTS)
    if count == 0:
        raise MalformedHeaderError("the header lists no recipients")
    entries = []
    for n in range(1, count + 1):
        key_id = cur.take(_KEY_ID_SIZE, f"recipient {n} key id").hex()
        ids = (
            cur.uvarint(f"recipient {n} KEM id", 0xFFFF),
            cur.uvarint(f"recipient {n} KDF id", 0xFFFF),
            cur.uvarint(f"recipient {n} AEAD id", 0xFFFF),
        )
        suite = _SUITE_BY_IDS.get(ids)
        if suite is None:
            raise MalformedHeaderError(
                f"recipient {n} has unknown suite ids kem=0x{ids[0]:04x} kdf=0x{ids[1]:04x} "
                f"aead=0x{ids[2]:04x}"
            )
        size = cur.uvarint(f"recipient {n} wrapped key length", 0xFFFF)
        if size != suite.wrapped_size:
            raise MalformedHeaderError(
                f"recipient {n} wrapped key is {size} bytes; {suite.name} needs "
                f"{suite.wrapped_size}"
            )
        entries.append(RecipientEntry(key_id, suite, cur.take(size, f"recipient {n} wrapped key")))
    if cur.pos != len(body):
        raise MalformedHeaderError(f"{len(body) - cur.pos} stray bytes at the end of the header")
    header = SegmentHeader(site, camera, seq, start_us / 1_000_000, tuple(entries), version)
    header = header._with_stored_start(start_us)
    return _ParsedHeader(
        header=header,
        raw=MAGIC + version_raw + body_len_raw + rest,
        identity=MAGIC + version_raw + body[:identity_end],
        nonce_prefix=nonce_prefix,
    )


def _open_source(source: str | os.PathLike[str] | BinaryIO) -> tuple[BinaryIO, bool]:
    if isinstance(source, str | os.PathLike):
        return open(source, "rb"), True  # closed by the caller, which owns it
    return source, False


def read_header(source: str | os.PathLike[str] | BinaryIO) -> SegmentHeader:
    """The header of a segment, without a key (for indexing and checks at the edge).

    Unauthenticated: only a recipient's key proves the header genuine (``open_segment``).
    A file object is left positioned after the header.
    """
    f, owned = _open_source(source)
    try:
        return _parse_header(f).header
    finally:
        if owned:
            f.close()


# --------------------------------------------------------------------------------------------
# Frames


@dataclass(frozen=True)
class _Frame:
    ref: bytes
    counter: int
    last: bool
    ciphertext: bytes
    size: int  # bytes of the whole frame in the file


@dataclass(frozen=True)
class _Torn:
    """The file ends inside a frame (crash mid-write): ``size`` bytes of it are present."""

    size: int


@dataclass(frozen=True)
class _BadFrame:
    """A frame header that cannot be valid; ``head`` holds the bytes read of it."""

    head: bytes


def _read_frame(f: BinaryIO) -> _Frame | _Torn | _BadFrame | None:
    """The next frame; None at a clean end of file."""
    ref = _read_exact(f, _REF_SIZE)
    if not ref:
        return None
    if len(ref) < _REF_SIZE:
        return _Torn(len(ref))
    ct_len, raw_len = _read_stream_uvarint(f, MAX_CHUNK_SIZE + _TAG_SIZE)
    head = ref + raw_len
    if ct_len is None:
        return _Torn(len(head))
    if ct_len < _TAG_SIZE:
        return _BadFrame(head)
    position, raw_pos = _read_stream_uvarint(f, 2 * _MAX_COUNTER + 1)
    head += raw_pos
    if position is None:
        return _Torn(len(head))
    if position < 0:
        return _BadFrame(head)
    ciphertext = _read_exact(f, ct_len)
    if len(ciphertext) < ct_len:
        return _Torn(len(head) + len(ciphertext))
    return _Frame(ref, position >> 1, bool(position & 1), ciphertext, len(head) + ct_len)


def _zero_tail(f: BinaryIO, frame_bytes: bytes, min_zero: int) -> int | None:
    """Bytes after the current frame if it starts a power-loss tail, else None.

    After a power cut, ext4 and others can leave the unsynced end of a file as zero bytes. A
    frame counts as torn that way if everything after its first ``len(frame_bytes) - min_zero``
    bytes, to the end of the file, is zero and that zero run is at least 16 bytes long. With
    ``min_zero`` = 16 for a complete frame, its whole GCM tag must be zero: a corruption does that
    with probability 2**-128. Reads the rest of the file (error path only).
    """
    keep = max(0, len(frame_bytes) - min_zero)
    if frame_bytes[keep:].strip(b"\0"):
        return None
    rest = 0
    while block := f.read(_READ_BLOCK):
        if block.strip(b"\0"):
            return None
        rest += len(block)
    return rest if len(frame_bytes) - keep + rest >= _TAG_SIZE else None


def _remaining(f: BinaryIO) -> int:
    total = 0
    while block := f.read(_READ_BLOCK):
        total += len(block)
    return total


def _chunk_nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


# --------------------------------------------------------------------------------------------
# Sealing


class BinaryWriter(Protocol):
    """Where a sealer writes: a binary file, a pipe, a socket file, a tee to the live view."""

    def write(self, data: bytes, /) -> int | None: ...


class SegmentSealer:
    """Seals one segment into ``fileobj`` as it is produced (the edge's only way to write video).

    The header is written at construction; each ``write_chunk`` writes one sealed chunk through
    to the file object (and flushes it) before returning, so the file can be a pipe and a crash
    loses only the chunk in flight. Durability (fsync) is the caller's policy. ``close()`` writes
    the final marker chunk; ``abort()`` or an exception inside ``with`` leaves the segment
    unfinished, as does a failed write (later writes raise ``SealerClosedError``). The sealer
    never closes ``fileobj``.
    """

    def __init__(
        self,
        fileobj: BinaryWriter,
        header: SegmentHeader,
        recipients: Sequence[RecipientPublicKey],
        *,
        track_sha256: bool = True,
    ) -> None:
        if header.recipients:
            raise InvalidHeaderError("leave header.recipients empty: the sealer fills it in")
        if not 1 <= len(recipients) <= MAX_RECIPIENTS:
            raise InvalidHeaderError(f"a segment needs 1..{MAX_RECIPIENTS} recipients")
        key_ids = [r.key_id for r in recipients]
        if len(set(key_ids)) != len(key_ids):
            raise InvalidHeaderError("the same recipient key is listed twice")
        self._file = fileobj
        self._sha256 = hashlib.sha256() if track_sha256 else None
        data_key = AESGCM.generate_key(bit_length=256)
        self._aead: AESGCM | None = AESGCM(data_key)
        self._prefix = os.urandom(_NONCE_PREFIX_SIZE)
        identity, identity_fields = _encode_identity(header, self._prefix)
        info = _hpke_info(identity)
        entries = tuple(
            RecipientEntry(
                r.key_id, r.suite, r.suite._hpke().encrypt(data_key, r._hpke_key, info=info)
            )
            for r in recipients
        )
        body = identity_fields + _uvarint(len(entries))
        for e in entries:
            body += bytes.fromhex(e.key_id) + b"".join(_uvarint(i) for i in e.suite.ids)
            body += _uvarint(len(e.wrapped_key)) + e.wrapped_key
        unsigned = MAGIC + _uvarint(FORMAT_VERSION) + _uvarint(len(body)) + body
        tag = AESGCM(data_key).encrypt(self._prefix + _HEADER_TAG_NONCE_SUFFIX, b"", unsigned)
        raw = unsigned + tag
        self._header = SegmentHeader(
            header.site_id, header.camera_id, header.seq, header.start_time, entries
        )._with_stored_start(header.start_us)
        self._aad = hashlib.sha256(raw).digest()
        self._ref = self._aad[:_REF_SIZE]
        self._counter = 0
        self._closed = False
        self._bytes_written = 0
        self._write(raw)

    @property
    def header(self) -> SegmentHeader:
        """The header as written, recipients included."""
        return self._header

    @property
    def chunk_count(self) -> int:
        """Data chunks written so far (the final marker is not counted)."""
        return self._counter

    @property
    def bytes_written(self) -> int:
        """Size of the segment file so far."""
        return self._bytes_written

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of every byte written so far (for the index's hash chain)."""
        if self._sha256 is None:
            raise ValueError("the sealer was created with track_sha256=False")
        return self._sha256.hexdigest()

    @property
    def closed(self) -> bool:
        """True after ``close()`` or ``abort()``."""
        return self._closed

    def write_chunk(self, data: bytes | bytearray | memoryview) -> None:
        """Seal one chunk (chunk 0: the fMP4 init segment; then one per fragment) and write it."""
        if self._closed:
            raise SealerClosedError(
                "the segment is closed (or a write to it failed); start a new SegmentSealer"
            )
        size = memoryview(data).nbytes
        if size > MAX_CHUNK_SIZE:
            raise ChunkTooLargeError(
                f"chunk of {size} bytes is above the {MAX_CHUNK_SIZE}-byte limit; "
                "cut segments into smaller fragments"
            )
        if self._counter >= _MAX_COUNTER:
            raise ChunkTooLargeError(f"a segment holds at most {_MAX_COUNTER} chunks")
        self._seal(data, last=False)

    def close(self) -> None:
        """Write the final marker chunk: the segment is now finished. Idempotent."""
        if self._closed:
            return
        self._seal(b"", last=True)
        self._forget()

    def abort(self) -> None:
        """Stop without a final marker: readers will see an unfinished segment."""
        self._forget()

    def _seal(self, data: bytes | bytearray | memoryview, *, last: bool) -> None:
        assert self._aead is not None
        ciphertext = self._aead.encrypt(
            _chunk_nonce(self._prefix, self._counter, last), data, self._aad
        )
        frame_head = self._ref + _uvarint(len(ciphertext)) + _uvarint(self._counter << 1 | last)
        try:
            self._write(frame_head, ciphertext)
        except BaseException:
            # A frame may be half written: appending more would bury it mid-file, where it
            # reads as corruption. Stop here; the file stays an unfinished segment.
            self._forget()
            raise
        if not last:
            self._counter += 1

    def _write(self, *parts: bytes) -> None:
        for part in parts:
            rest = part
            while rest:
                # A raw (unbuffered) file may write fewer bytes than given: write the rest.
                n = self._file.write(rest)
                rest = rest[len(rest) if n is None else n :]
            if self._sha256 is not None:
                self._sha256.update(part)
            self._bytes_written += len(part)
        flush = getattr(self._file, "flush", None)
        if flush is not None:
            flush()

    def _forget(self) -> None:
        self._closed = True
        # Drop the data key; Python cannot wipe memory, so this only ends our reference.
        self._aead = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------------
# Opening


def _unwrap(parsed: _ParsedHeader, keys: Sequence[RecipientPrivateKey]) -> tuple[bytes, str]:
    info = _hpke_info(parsed.identity)
    entries = parsed.header.recipients
    for key in keys:
        for entry in entries:
            if entry.key_id != key.key_id:
                continue
            if entry.suite is not key.suite:
                raise HeaderTamperedError(
                    f"header altered: recipient {key.key_id} is listed with suite "
                    f"{entry.suite.name}, but the key is {key.suite.name}"
                )
            try:
                data_key = key.suite._hpke().decrypt(entry.wrapped_key, key._hpke_key, info=info)
            except InvalidTag:
                raise HeaderTamperedError(
                    f"header altered: the data key wrapped to {key.key_id} does not open "
                    "(site, camera, seq, start time or the wrapped key were changed)"
                ) from None
            if len(data_key) != _DATA_KEY_SIZE:
                raise HeaderTamperedError("header altered: the wrapped data key has a wrong size")
            return data_key, key.key_id
    # No key id matched. If a key still opens an entry, only the key id field was changed.
    for key in keys:
        for entry in entries:
            if entry.suite is key.suite:
                try:
                    key.suite._hpke().decrypt(entry.wrapped_key, key._hpke_key, info=info)
                except InvalidTag:
                    continue
                raise HeaderTamperedError(
                    f"header altered: the key id of recipient {key.key_id} was changed "
                    f"to {entry.key_id}"
                )
    listed = ", ".join(e.key_id for e in entries)
    given = ", ".join(k.key_id for k in keys)
    raise NotARecipientError(
        f"wrong key: the segment is sealed to key ids {listed}; the key given is {given}"
    )


class OpenedSegment:
    """An opened segment: iterate it for verified plaintext chunks, in order, one at a time.

    Every chunk yielded has been authenticated and is in its place; an error raised later means
    the segment as a whole is not intact. Memory stays bounded by one chunk. After the iteration
    ends, ``finished`` says whether the final marker was present (False: the writer crashed or
    the file was truncated; ``tail_bytes`` counts bytes of a torn last chunk).
    """

    def __init__(
        self, f: BinaryIO, owned: bool, parsed: _ParsedHeader, data_key: bytes, key_id: str
    ) -> None:
        self.header = parsed.header
        self.key_id = key_id
        self.chunk_count = 0
        self.tail_bytes = 0
        self._f = f
        self._owned = owned
        self._parsed = parsed
        self._aead = AESGCM(data_key)
        self._finished: bool | None = None
        self._started = False

    @property
    def finished(self) -> bool:
        """True if the final marker chunk was read; known once iteration has ended."""
        if self._finished is None:
            raise RuntimeError("read all chunks first: finished is known at the end of the file")
        return self._finished

    def __iter__(self) -> Iterator[bytes]:
        if self._started:
            raise RuntimeError("an OpenedSegment can be iterated once; open it again")
        self._started = True
        return self._chunks()

    def _open(self, frame: _Frame) -> bytes | None:
        nonce = _chunk_nonce(self._parsed.nonce_prefix, frame.counter, frame.last)
        try:
            return self._aead.decrypt(nonce, frame.ciphertext, self._parsed.digest)
        except InvalidTag:
            return None

    def _chunks(self) -> Iterator[bytes]:
        ref = self._parsed.digest[:_REF_SIZE]
        index = 0
        while True:
            frame = _read_frame(self._f)
            if frame is None:
                self._finished = False
                return
            if isinstance(frame, _Torn):
                self.tail_bytes, self._finished = frame.size, False
                return
            if isinstance(frame, _BadFrame):
                rest = _zero_tail(self._f, frame.head, len(frame.head) - _REF_SIZE)
                if rest is None:
                    raise ChunkCorruptedError(f"chunk {index}: its framing is invalid", index)
                self.tail_bytes, self._finished = len(frame.head) + rest, False
                return
            if frame.ref != ref:
                # A parsed frame has a non-zero length right after its reference, so a zero
                # tail from a power cut cannot start inside a reference that parsed.
                raise ForeignChunkError(
                    f"chunk {index} belongs to another segment file (swapped in)", index
                )
            plaintext = self._open(frame)
            if plaintext is None:
                rest = _zero_tail(self._f, frame.ciphertext, _TAG_SIZE)
                if rest is None:
                    raise ChunkCorruptedError(
                        f"chunk {index} was altered (authentication failed)", index
                    )
                self.tail_bytes, self._finished = frame.size + rest, False
                return
            if frame.counter < index:
                raise ChunkDuplicatedError(
                    f"chunk {frame.counter} appears again at position {index}", index
                )
            if frame.counter > index:
                self._raise_gap(index, frame.counter)
            if frame.last:
                extra = _remaining(self._f)
                if extra:
                    raise TrailingDataError(
                        f"{extra} bytes after the final chunk (appended data)", index + 1
                    )
                self._finished = True
                if plaintext:
                    self.chunk_count += 1
                    yield plaintext
                return
            self.chunk_count += 1
            yield plaintext
            index += 1

    def _raise_gap(self, index: int, found: int) -> None:
        # Chunk `found` stands where chunk `index` belongs. Read on: if a missing chunk turns up
        # later, the chunks were reordered; if not, they were dropped. Error path only.
        position = index + 1
        while isinstance(frame := _read_frame(self._f), _Frame):
            if index <= frame.counter < found and self._open(frame) is not None:
                raise ChunkReorderedError(
                    f"chunks out of order: chunk {found} stands at position {index}, "
                    f"chunk {frame.counter} at position {position}",
                    index,
                )
            position += 1
        missing = f"chunk {index}" if found == index + 1 else f"chunks {index}..{found - 1}"
        raise ChunkDroppedError(
            f"{missing} missing (chunk {found} follows chunk {index - 1})", index
        )

    def close(self) -> None:
        """Close the file if ``open_segment`` opened it from a path."""
        if self._owned:
            self._f.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_segment(
    source: str | os.PathLike[str] | BinaryIO,
    private_key: RecipientPrivateKey | Sequence[RecipientPrivateKey],
) -> OpenedSegment:
    """Open a segment with a recipient's private key (or any of several, e.g. during rotation).

    Checks the header at once (``HeaderError``, ``NotARecipientError``); chunks are verified
    as they are iterated. ``source`` may be a path or a readable binary stream (even a pipe).
    """
    keys = [private_key] if isinstance(private_key, RecipientPrivateKey) else list(private_key)
    if not keys:
        raise ValueError("open_segment needs at least one private key")
    f, owned = _open_source(source)
    try:
        parsed = _parse_header(f)
        data_key, key_id = _unwrap(parsed, keys)
        try:
            AESGCM(data_key).decrypt(
                parsed.nonce_prefix + _HEADER_TAG_NONCE_SUFFIX, parsed.tag, parsed.raw[:-_TAG_SIZE]
            )
        except InvalidTag:
            raise HeaderTamperedError(
                "header altered: its authentication tag does not match (a recipient entry, "
                "length or the tag itself was changed)"
            ) from None
    except BaseException:
        if owned:
            f.close()
        raise
    return OpenedSegment(f, owned, parsed, data_key, key_id)


def unseal_to(
    source: str | os.PathLike[str] | BinaryIO,
    private_key: RecipientPrivateKey | Sequence[RecipientPrivateKey] | str | os.PathLike[str],
    out: str | os.PathLike[str] | BinaryIO,
    *,
    require_finished: bool = False,
) -> OpenedSegment:
    """Decrypt a whole segment into ``out`` (init + fragments: a playable fMP4), verified.

    ``private_key`` may be a key file path. When ``out`` is a path the file is written 0600
    under a temporary name and renamed only once every chunk verified; on any error nothing is
    left behind. Returns the (exhausted) ``OpenedSegment`` for its header, count and state.
    """
    if isinstance(private_key, str | os.PathLike):
        private_key = load_private_key(private_key)
    with open_segment(source, private_key) as segment:
        if not isinstance(out, str | os.PathLike):
            for chunk in segment:
                out.write(chunk)
            _check_finished(segment, require_finished)
            return segment
        target = Path(out)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in segment:
                    f.write(chunk)
                _check_finished(segment, require_finished)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return segment


def _check_finished(segment: OpenedSegment, required: bool) -> None:
    if required and not segment.finished:
        raise UnfinishedSegmentError(
            f"segment {segment.header.site_id}/{segment.header.camera_id}#{segment.header.seq} "
            f"has no final chunk ({segment.chunk_count} chunks, {segment.tail_bytes} torn bytes): "
            "the recorder crashed or the file was truncated"
        )


# --------------------------------------------------------------------------------------------
# Scanning without a key


@dataclass(frozen=True)
class SegmentScan:
    """What the framing of a segment says, read without a key (unauthenticated).

    For the edge: index a file, count its chunks, find a crashed writer's torn tail
    (``complete_size`` is where the last complete chunk ends).
    """

    header: SegmentHeader
    header_size: int
    chunk_count: int
    finished: bool
    complete_size: int
    tail_bytes: int


def scan_segment(source: str | os.PathLike[str] | BinaryIO) -> SegmentScan:
    """Walk a segment's frames without decrypting; raises on framing that cannot be right."""
    f, owned = _open_source(source)
    try:
        parsed = _parse_header(f)
        ref = parsed.digest[:_REF_SIZE]
        size = len(parsed.raw)
        count = tail = 0
        finished = False
        while (frame := _read_frame(f)) is not None:
            if isinstance(frame, _Torn):
                tail = frame.size
                break
            if isinstance(frame, _BadFrame):
                rest = _zero_tail(f, frame.head, len(frame.head) - _REF_SIZE)
                if rest is None:
                    raise ChunkCorruptedError(f"chunk {count}: its framing is invalid", count)
                tail = len(frame.head) + rest
                break
            if frame.ref != ref:
                raise ForeignChunkError(f"chunk {count} belongs to another segment file", count)
            size += frame.size
            if frame.last:
                finished = True
                count += len(frame.ciphertext) > _TAG_SIZE  # v1 writers leave the final one empty
                extra = _remaining(f)
                if extra:
                    raise TrailingDataError(f"{extra} bytes after the final chunk", count + 1)
                break
            count += 1
        return SegmentScan(parsed.header, len(parsed.raw), count, finished, size, tail)
    finally:
        if owned:
            f.close()
