"""The segment chain's formats: file names, row hashing, signed heads and tombstones.

Shared by the store that writes the chain (`edge_agent.segment_store`) and the checker that
verifies it (`edge_agent.verify`), so both encode a row the same way. A row's hash is SHA-256
over canonical JSON of its fields including the previous row's hash; heads and tombstones are
signed with the device key over canonical JSON of their payload (`edge_agent.device_key`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_agent.device_key import canonical_json
from sitelink import sealed_segment

log = logging.getLogger(__name__)

SEGMENTS_DIR = "segments"
#: prev_hash of a camera's first row ever (nothing before it)
GENESIS_HASH = "0" * 64
#: why rows were removed: expiry past the retention period, or a full disk (beyond the
#: retention floor first, inside it only after a critical alarm, see edge_agent.retention)
TOMBSTONE_REASONS = frozenset({"retention", "disk_full", "disk_full_inside_floor"})

_CAMERA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SEGMENT_FILE = re.compile(r"(?P<camera>[A-Za-z0-9][A-Za-z0-9_.-]*)-(?P<seq>\d{8,})\.seg")
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class SignedHead:
    """A signed statement "at `time`, camera's chain ended at `seq` with `row_hash`"."""

    id: int
    site_id: str
    camera_id: str
    seq: int
    row_hash: str
    time: float
    key_id: str
    signature: str

    def payload(self) -> dict[str, Any]:
        """The signed content (canonical JSON of this is what the signature covers)."""
        return {
            "type": "isocam.chain_head.v1",
            "site": self.site_id,
            "camera": self.camera_id,
            "seq": self.seq,
            "row_hash": self.row_hash,
            # floats always: the hub rebuilds the bytes from JSON floats (docs/protocol.md)
            "time": float(self.time),
        }

    def to_event(self) -> dict[str, Any]:
        """The form published to the hub: the payload plus key id and signature."""
        return {**self.payload(), "key_id": self.key_id, "signature": self.signature}


@dataclass(frozen=True)
class Tombstone:
    """A signed record of rows removed from the head of a camera's chain, and why.

    `prev_anchor` is the prev_hash of the first removed row and `last_row_hash` the hash of
    the last one: the next tombstone (or the first remaining row) must continue from it.
    """

    id: int
    site_id: str
    camera_id: str
    first_seq: int
    last_seq: int
    start: float
    end: float
    rows: int
    bytes: int
    prev_anchor: str
    last_row_hash: str
    reason: str
    created_at: float
    missing_files: int
    key_id: str
    signature: str

    def payload(self) -> dict[str, Any]:
        """The signed content."""
        return {
            "type": "isocam.tombstone.v1",
            "site": self.site_id,
            "camera": self.camera_id,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "start": float(self.start),
            "end": float(self.end),
            "rows": self.rows,
            "bytes": self.bytes,
            "prev_anchor": self.prev_anchor,
            "last_row_hash": self.last_row_hash,
            "reason": self.reason,
            "created_at": float(self.created_at),
            "missing_files": self.missing_files,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Tombstone:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


def segment_row_payload(row: Mapping[str, Any]) -> dict[str, Any]:
    """The hashed content of a segment row (a dict with the `segments` table's columns)."""
    return {
        "v": 1,
        "camera": row["camera_id"],
        "seq": row["seq"],
        "path": row["path"],
        "start": row["start_time"],
        "end": row["end_time"],
        "bytes": row["bytes"],
        "fragments": row["fragments"],
        "finished": bool(row["finished"]),
        "codec": row["codec"],
        "sha256": row["file_sha256"],
        "prev": row["prev_hash"],
        "indexed_at": row["indexed_at"],
    }


def compute_row_hash(row: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over the canonical encoding of a segment row, prev hash included."""
    return hashlib.sha256(canonical_json(segment_row_payload(row))).hexdigest()


def hash_file(path: Path) -> tuple[int, str]:
    """Size and SHA-256 (hex) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def check_camera_id(camera_id: str) -> str:
    """Camera ids become directory and file names: letters, digits, `_`, `.`, `-` only."""
    if not _CAMERA_ID.fullmatch(camera_id):
        raise ValueError(
            f"camera id {camera_id!r} is not usable as a file name "
            "(1-64 letters, digits, '_', '.', '-'; not starting with '.', '_' or '-')"
        )
    return camera_id


def segment_relpath(camera_id: str, seq: int, start: float) -> str:
    """segments/{camera}/{YYYYMMDD, UTC}/{camera}-{seq:08d}.seg, relative to the data dir."""
    day = datetime.fromtimestamp(start, UTC).strftime("%Y%m%d")
    return f"{SEGMENTS_DIR}/{camera_id}/{day}/{camera_id}-{seq:08d}.seg"


def iter_segment_files(data_dir: Path) -> Iterator[tuple[str, int, Path]]:
    """(camera, seq, path) of every segment file on disk, as named by `segment_relpath`."""
    root = Path(data_dir) / SEGMENTS_DIR
    if not root.is_dir():
        return
    for camera_dir in sorted(root.iterdir()):
        if not camera_dir.is_dir():
            continue
        for path in sorted(camera_dir.glob("*/*.seg")):
            match = _SEGMENT_FILE.fullmatch(path.name)
            if match and match["camera"] == camera_dir.name:
                yield camera_dir.name, int(match["seq"]), path


@dataclass(frozen=True)
class HeaderIdentity:
    """What a sealed segment's clear-text header (and framing) says it is, read without a key.

    Unauthenticated: good enough to name a swapped file or index a crash orphan, never proof.
    `fragments` and `finished` are None unless the framing was scanned and is intact.
    """

    site_id: str
    camera_id: str
    seq: int
    start: float
    fragments: int | None = None
    finished: bool | None = None


def read_header_identity(path: Path, *, scan: bool = False) -> HeaderIdentity | None:
    """The header's site/camera/seq/start (and with `scan`, fragment count and finished flag),
    or None if the file has no readable header."""
    try:
        header = sealed_segment.read_header(path)
    except (sealed_segment.SealedSegmentError, OSError) as exc:
        log.debug("no readable header in %s: %s", path, exc)
        return None
    ident = HeaderIdentity(header.site_id, header.camera_id, header.seq, header.start_time)
    if not scan:
        return ident
    try:
        framing = sealed_segment.scan_segment(path)
    except (sealed_segment.SealedSegmentError, OSError) as exc:
        log.debug("framing of %s does not scan: %s", path, exc)
        return ident
    # chunk 0 is the fMP4 init segment; the final marker chunk is not counted by the scan
    return replace(ident, fragments=max(0, framing.chunk_count - 1), finished=framing.finished)
