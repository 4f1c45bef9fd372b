"""The edge's segment index: one hash-chained row per sealed segment, plus the ledgers around it.

Every sealed segment gets a row with the SHA-256 of its file and the previous row's hash, so the
rows of one camera form a chain (ARCHITECTURE decision 3). The device key signs each chain head
(`sign_heads`, every minute) and every deletion (`remove_oldest` writes a signed tombstone), so
`edge_agent.verify` can tell lawful expiry from tampering. The same database (DATA/edge.db, WAL)
holds the gap ledger and legal holds.

Threads: one writer connection behind a lock (the recorder calls from its worker threads; file
hashing happens before the lock is taken); every read opens its own connection, as Datasette does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import sqlite_utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.device_key import key_id, public_key_pem, sign_payload
from edge_agent.segment_chain import (
    GENESIS_HASH,
    SEGMENTS_DIR,
    TOMBSTONE_REASONS,
    SignedHead,
    Tombstone,
    check_camera_id,
    compute_row_hash,
    hash_file,
    iter_segment_files,
    read_header_identity,
    segment_relpath,
)

log = logging.getLogger(__name__)

DB_NAME = "edge.db"
QUARANTINE_DIR = "quarantine"
SCHEMA_VERSION = 1
GAP_CAUSES = frozenset({"refused", "timeout", "stall", "eof", "error", "unauthorized"})


class LegalHoldError(Exception):
    """Footage under legal hold was about to be deleted."""


@dataclass(frozen=True)
class SegmentRecord:
    """What the recorder knows about a segment it has written (issue 4 interface)."""

    camera_id: str
    seq: int  # per camera, strictly increasing, never reused (even after deletion)
    path: Path  # absolute
    start: float  # wall clock (UNIX s) at receipt of the segment's first packet
    end: float  # wall clock at receipt of its last packet
    bytes: int
    fragments: int  # media fragments (not counting the init chunk)
    finished: bool  # the sealer wrote its final chunk
    codec: str  # "H264" | "H265"


@dataclass(frozen=True)
class IndexedSegment:
    """A segment row as the index holds it, chain fields included."""

    camera_id: str
    seq: int
    path: Path
    start: float
    end: float
    bytes: int
    fragments: int
    finished: bool
    codec: str
    file_sha256: str
    prev_hash: str
    row_hash: str
    indexed_at: float


@dataclass(frozen=True)
class Gap:
    """A stretch of time a camera was not recorded; `end` is None while it lasts."""

    id: int
    camera_id: str
    start: float
    end: float | None
    cause: str


@dataclass(frozen=True)
class LegalHold:
    """A hold on one camera (`camera_id`) or the whole site (`camera_id` None)."""

    id: int
    camera_id: str | None
    reason: str
    set_at: float
    cleared_at: float | None
    clear_reason: str | None

    @property
    def active(self) -> bool:
        return self.cleared_at is None


@dataclass(frozen=True)
class ReconcileItem:
    """One thing reconcile found: which segment, where, and what was done about it."""

    camera_id: str
    seq: int
    path: str
    detail: str


@dataclass
class ReconcileReport:
    """What the start-up reconcile of files against the index found and did."""

    indexed_orphans: list[ReconcileItem] = field(default_factory=list)
    quarantined: list[ReconcileItem] = field(default_factory=list)
    expired_leftovers_removed: list[ReconcileItem] = field(default_factory=list)
    missing_files: list[ReconcileItem] = field(default_factory=list)
    size_mismatches: list[ReconcileItem] = field(default_factory=list)
    abandoned_seqs: list[ReconcileItem] = field(default_factory=list)
    open_gaps: list[Gap] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Nothing needed attention (open gaps from the last run do not count)."""
        return not (
            self.indexed_orphans
            or self.quarantined
            or self.expired_leftovers_removed
            or self.missing_files
            or self.size_mismatches
            or self.abandoned_seqs
        )

    def render(self) -> str:
        """Human summary, one line per finding, for the start-up log."""
        lines: list[str] = []
        sections = (
            ("indexed as unfinished (file without index row)", self.indexed_orphans),
            ("quarantined (unreadable header)", self.quarantined),
            ("removed (expired, deletion had been interrupted)", self.expired_leftovers_removed),
            ("MISSING FILE for index row", self.missing_files),
            ("SIZE differs from index", self.size_mismatches),
            ("allocated but never written", self.abandoned_seqs),
        )
        for title, items in sections:
            for item in items:
                lines.append(f"{title}: {item.camera_id} seq {item.seq} {item.path} {item.detail}")
        for gap in self.open_gaps:
            lines.append(f"gap still open from last run: {gap.camera_id} since {gap.start:.0f}")
        return "\n".join(lines) if lines else "reconcile: files and index agree"


def _create_schema(db: sqlite_utils.Database) -> None:
    db.table("meta").create({"key": str, "value": str}, pk="key", if_not_exists=True)
    db.table("device_keys").create(
        {"key_id": str, "public_key_pem": str, "added_at": float},
        pk="key_id",
        if_not_exists=True,
    )
    db.table("cameras").create(
        {"camera_id": str, "next_seq": int},
        pk="camera_id",
        not_null={"next_seq"},
        if_not_exists=True,
    )
    # state: open (allocated, being written) | indexed | void (nothing was ever written) |
    # quarantined (file without a readable header, moved to DATA/quarantine)
    db.table("allocations").create(
        {"camera_id": str, "seq": int, "path": str, "allocated_at": float, "state": str},
        pk=("camera_id", "seq"),
        if_not_exists=True,
    )
    db.table("segments").create(
        {
            "id": int,
            "camera_id": str,
            "seq": int,
            "path": str,
            "start_time": float,
            "end_time": float,
            "bytes": int,
            "fragments": int,
            "finished": int,
            "codec": str,
            "file_sha256": str,
            "prev_hash": str,
            "row_hash": str,
            "indexed_at": float,
        },
        pk="id",
        not_null={"camera_id", "seq", "path", "file_sha256", "prev_hash", "row_hash"},
        if_not_exists=True,
    )
    db.table("segments").create_index(["camera_id", "seq"], unique=True, if_not_exists=True)
    db.table("segments").create_index(["end_time"], if_not_exists=True)
    db.table("tombstones").create(
        {
            "id": int,
            "site_id": str,
            "camera_id": str,
            "first_seq": int,
            "last_seq": int,
            "start": float,
            "end": float,
            "rows": int,
            "bytes": int,
            "prev_anchor": str,
            "last_row_hash": str,
            "reason": str,
            "created_at": float,
            "missing_files": int,
            "key_id": str,
            "signature": str,
        },
        pk="id",
        if_not_exists=True,
    )
    db.table("tombstones").create_index(["camera_id"], if_not_exists=True)
    db.table("chain_heads").create(
        {
            "id": int,
            "site_id": str,
            "camera_id": str,
            "seq": int,
            "row_hash": str,
            "time": float,
            "key_id": str,
            "signature": str,
        },
        pk="id",
        if_not_exists=True,
    )
    db.table("chain_heads").create_index(["camera_id", "seq"], if_not_exists=True)
    db.table("gaps").create(
        {"id": int, "camera_id": str, "start": float, "end": float, "cause": str},
        pk="id",
        if_not_exists=True,
    )
    db.table("gaps").create_index(["camera_id", "start"], if_not_exists=True)
    db.table("legal_holds").create(
        {
            "id": int,
            "camera_id": str,  # NULL: the whole site
            "reason": str,
            "set_at": float,
            "cleared_at": float,
            "clear_reason": str,
        },
        pk="id",
        if_not_exists=True,
    )


def open_reader(data_dir: Path) -> sqlite3.Connection:
    """A read-only connection of its own to DATA/edge.db (for queries and `verify`)."""
    path = Path(data_dir) / DB_NAME
    if not path.exists():
        raise FileNotFoundError(f"no segment index at {path}")
    conn = sqlite3.connect(path, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA query_only = 1")
    return conn


class SegmentStore:
    """Index, chain, gap ledger, legal holds and tombstones of one edge box (DATA/edge.db)."""

    def __init__(self, data_dir: Path, device_key: Ed25519PrivateKey, site_id: str) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.site_id = site_id
        self._key = device_key
        self.key_id = key_id(device_key)
        self._lock = threading.Lock()
        (self.data_dir / SEGMENTS_DIR).mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.data_dir / DB_NAME, timeout=30, check_same_thread=False)
        self._db = sqlite_utils.Database(conn)
        self._db.enable_wal()
        # FULL, not NORMAL: a head signed and published must never refer to a row that a power
        # cut then rolls back (it would look like tampering). One commit a minute per camera.
        self._db.execute("PRAGMA synchronous = FULL")
        with self._lock, self._db.atomic():
            _create_schema(self._db)
            self._db.table("meta").insert(
                {"key": "schema_version", "value": str(SCHEMA_VERSION)}, ignore=True
            )
            self._db.table("meta").insert({"key": "site_id", "value": site_id}, ignore=True)
            self._db.table("device_keys").insert(
                {
                    "key_id": self.key_id,
                    "public_key_pem": public_key_pem(device_key),
                    "added_at": time.time(),
                },
                ignore=True,
            )

    def close(self) -> None:
        """Close the writer connection."""
        with self._lock:
            self._db.close()

    # -- recording ---------------------------------------------------------------------------

    def allocate(self, camera_id: str, start: float) -> tuple[int, Path]:
        """Reserve the camera's next seq and return it with the file path (dirs created)."""
        check_camera_id(camera_id)
        with self._lock, self._db.atomic():
            row = self._one("SELECT next_seq FROM cameras WHERE camera_id = ?", [camera_id])
            seq = row["next_seq"] if row else 1
            self._db.table("cameras").upsert(
                {"camera_id": camera_id, "next_seq": seq + 1}, pk="camera_id"
            )
            rel = segment_relpath(camera_id, seq, start)
            self._db.table("allocations").insert(
                {
                    "camera_id": camera_id,
                    "seq": seq,
                    "path": rel,
                    "allocated_at": time.time(),
                    "state": "open",
                },
                pk=("camera_id", "seq"),
                replace=True,
            )
        path = self.data_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return seq, path

    def add_segment(self, rec: SegmentRecord) -> None:
        """Hash the segment's file and append its row to the camera's chain.

        The size and hash are taken from the file as it is now (the recorder has closed it);
        if `rec.bytes` disagrees, the file wins and the difference is logged.
        """
        check_camera_id(rec.camera_id)
        rel = self._relative(rec.path)
        size, digest = hash_file(self.data_dir / rel)
        if size != rec.bytes:
            log.warning(
                "%s seq %d: recorder said %d bytes, file has %d; indexing the file",
                rec.camera_id,
                rec.seq,
                rec.bytes,
                size,
            )
        with self._lock, self._db.atomic():
            if self._one(
                "SELECT 1 FROM segments WHERE camera_id = ? AND seq = ?", [rec.camera_id, rec.seq]
            ):
                raise ValueError(f"{rec.camera_id} seq {rec.seq} is already indexed")
            row: dict[str, Any] = {
                "camera_id": rec.camera_id,
                "seq": int(rec.seq),
                "path": rel,
                "start_time": float(rec.start),
                "end_time": float(rec.end),
                "bytes": size,
                "fragments": int(rec.fragments),
                "finished": int(bool(rec.finished)),
                "codec": str(rec.codec),
                "file_sha256": digest,
                "prev_hash": self._head_hash(rec.camera_id),
                "indexed_at": time.time(),
            }
            row["row_hash"] = compute_row_hash(row)
            self._db.table("segments").insert(row)
            self._db.execute(
                "INSERT INTO allocations (camera_id, seq, path, allocated_at, state) "
                "VALUES (?, ?, ?, ?, 'indexed') "
                "ON CONFLICT (camera_id, seq) DO UPDATE SET state = 'indexed'",
                [rec.camera_id, rec.seq, rel, row["indexed_at"]],
            )
            self._db.execute(
                "INSERT INTO cameras (camera_id, next_seq) VALUES (?, ?) "
                "ON CONFLICT (camera_id) DO UPDATE SET next_seq = max(next_seq, excluded.next_seq)",
                [rec.camera_id, rec.seq + 1],
            )

    # -- gap ledger --------------------------------------------------------------------------

    def open_gap(self, camera_id: str, start: float, cause: str) -> int:
        """Start a gap in the camera's recording; returns the ledger row id for `close_gap`."""
        if cause not in GAP_CAUSES:
            raise ValueError(f"gap cause {cause!r} is not one of {sorted(GAP_CAUSES)}")
        with self._lock:
            return self._insert(
                "gaps", {"camera_id": camera_id, "start": float(start), "end": None, "cause": cause}
            )

    def close_gap(self, gap_id: int, end: float) -> None:
        """End an open gap (closing a closed gap again is an error)."""
        with self._lock, self._db.atomic():
            row = self._one('SELECT "end", start FROM gaps WHERE id = ?', [gap_id])
            if row is None:
                raise KeyError(f"no gap with id {gap_id}")
            if row["end"] is not None:
                raise ValueError(f"gap {gap_id} is already closed")
            self._db.execute(
                'UPDATE gaps SET "end" = ? WHERE id = ?', [max(float(end), row["start"]), gap_id]
            )

    def gaps(
        self,
        camera_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        open_only: bool = False,
    ) -> list[Gap]:
        """Gaps overlapping [since, until] (open gaps reach to now), oldest first."""
        where, params = _where(
            ("camera_id = ?", camera_id),
            ('("end" IS NULL OR "end" >= ?)', since),
            ("start <= ?", until),
        )
        sql = "SELECT * FROM gaps WHERE 1=1" + where  # noqa: S608 - fixed clauses (_where)
        if open_only:
            sql += ' AND "end" IS NULL'
        rows = self._read(sql + " ORDER BY start, id", params)
        return [Gap(r["id"], r["camera_id"], r["start"], r["end"], r["cause"]) for r in rows]

    # -- legal hold --------------------------------------------------------------------------

    def set_legal_hold(self, reason: str, camera_id: str | None = None) -> int:
        """Stop all deletion for one camera, or the whole site when `camera_id` is None."""
        if not reason.strip():
            raise ValueError("a legal hold needs a reason")
        with self._lock:
            hold_id = self._insert(
                "legal_holds",
                {
                    "camera_id": camera_id,
                    "reason": reason,
                    "set_at": time.time(),
                    "cleared_at": None,
                    "clear_reason": None,
                },
            )
            log.warning("legal hold %d set on %s: %s", hold_id, camera_id or "site", reason)
            return hold_id

    def clear_legal_hold(self, hold_id: int, reason: str) -> None:
        """Lift a hold; the hold and why it was lifted stay on record."""
        if not reason.strip():
            raise ValueError("lifting a legal hold needs a reason")
        with self._lock, self._db.atomic():
            row = self._one("SELECT cleared_at FROM legal_holds WHERE id = ?", [hold_id])
            if row is None:
                raise KeyError(f"no legal hold with id {hold_id}")
            if row["cleared_at"] is not None:
                raise ValueError(f"legal hold {hold_id} is already cleared")
            self._db.execute(
                "UPDATE legal_holds SET cleared_at = ?, clear_reason = ? WHERE id = ?",
                [time.time(), reason, hold_id],
            )

    def legal_holds(self, active_only: bool = True) -> list[LegalHold]:
        """Holds in the order they were set."""
        rows = self._read("SELECT * FROM legal_holds ORDER BY id")
        return [LegalHold(**r) for r in rows if not (active_only and r["cleared_at"] is not None)]

    def is_held(self, camera_id: str) -> bool:
        """True if a site-wide hold or a hold on this camera is active."""
        return bool(
            self._read(
                "SELECT 1 FROM legal_holds WHERE cleared_at IS NULL "
                "AND (camera_id IS NULL OR camera_id = ?)",
                [camera_id],
            )
        )

    # -- chain heads -------------------------------------------------------------------------

    def sign_heads(self, now: float | None = None) -> list[SignedHead]:
        """Sign every camera's chain head (seq, row hash, time) and keep the signatures.

        Called every minute by the daemon; the result is published to the hub as events.
        A camera whose rows have all expired signs its last tombstone's anchor.
        """
        at = time.time() if now is None else float(now)
        signed: list[SignedHead] = []
        with self._lock, self._db.atomic():
            for camera_id in self._camera_ids():
                head = self._head(camera_id)
                if head is None:
                    continue
                seq, row_hash = head
                signed_head = SignedHead(
                    0, self.site_id, camera_id, seq, row_hash, at, self.key_id, signature=""
                )
                signed_head = replace(
                    signed_head, signature=sign_payload(self._key, signed_head.payload())
                )
                record = {k: v for k, v in signed_head.__dict__.items() if k != "id"}
                signed.append(replace(signed_head, id=self._insert("chain_heads", record)))
        return signed

    def signed_heads(self, since_id: int = 0) -> list[SignedHead]:
        """Signed heads with id > `since_id`, oldest first (for publishing upstream)."""
        rows = self._read("SELECT * FROM chain_heads WHERE id > ? ORDER BY id", [since_id])
        return [SignedHead(**dict(r)) for r in rows]

    # -- deletion (the only way rows leave the index) ----------------------------------------

    def remove_oldest(self, camera_id: str, count: int, reason: str) -> Tombstone | None:
        """Delete the camera's `count` oldest segments behind one signed tombstone.

        Order matters for crash safety: the tombstone and the row deletion commit together
        first, the files are unlinked after; a crash in between leaves files whose seqs are
        tombstoned, which `reconcile` removes. Refuses (LegalHoldError) under legal hold.
        """
        if reason not in TOMBSTONE_REASONS:
            raise ValueError(
                f"tombstone reason {reason!r} is not one of {sorted(TOMBSTONE_REASONS)}"
            )
        if count <= 0:
            return None
        with self._lock:
            if self.is_held(camera_id):
                raise LegalHoldError(f"{camera_id} is under legal hold; nothing was deleted")
            rows = list(
                self._db.query(
                    "SELECT * FROM segments WHERE camera_id = ? ORDER BY id LIMIT ?",
                    [camera_id, count],
                )
            )
            if not rows:
                return None
            missing = sum(1 for r in rows if not _file_matches_size(self.data_dir / r["path"], r))
            if missing:
                log.warning(
                    "%s: %d of %d segments to remove (%s) had a missing or resized file",
                    camera_id,
                    missing,
                    len(rows),
                    reason,
                )
            expected_anchor = self._tombstone_anchor(camera_id)
            if rows[0]["prev_hash"] != expected_anchor:
                log.warning(
                    "%s: chain does not continue from the last anchor before seq %d; "
                    "`edge-agent verify` will report it",
                    camera_id,
                    rows[0]["seq"],
                )
            stone = Tombstone(
                id=0,
                site_id=self.site_id,
                camera_id=camera_id,
                first_seq=min(r["seq"] for r in rows),
                last_seq=max(r["seq"] for r in rows),
                start=min(r["start_time"] for r in rows),
                end=max(r["end_time"] for r in rows),
                rows=len(rows),
                bytes=sum(r["bytes"] for r in rows),
                prev_anchor=rows[0]["prev_hash"],
                last_row_hash=rows[-1]["row_hash"],
                reason=reason,
                created_at=time.time(),
                missing_files=missing,
                key_id=self.key_id,
                signature="",
            )
            stone = replace(stone, signature=sign_payload(self._key, stone.payload()))
            with self._db.atomic():
                record = {k: v for k, v in stone.__dict__.items() if k != "id"}
                stone = replace(stone, id=self._insert("tombstones", record))
                ids = [r["id"] for r in rows]
                marks = ",".join("?" * len(ids))
                self._db.execute(f"DELETE FROM segments WHERE id IN ({marks})", ids)  # noqa: S608
                self._db.execute(
                    "DELETE FROM allocations WHERE camera_id = ? AND seq <= ?",
                    [camera_id, stone.last_seq],
                )
                # heads of removed rows can no longer be checked against anything but the anchor
                self._db.execute(
                    "DELETE FROM chain_heads WHERE camera_id = ? AND seq < ?",
                    [camera_id, stone.last_seq],
                )
        for r in rows:
            _unlink_segment(self.data_dir / r["path"])
        log.info(
            "%s: removed seq %d-%d (%d segments, %d bytes), reason %s, tombstone %d",
            camera_id,
            stone.first_seq,
            stone.last_seq,
            stone.rows,
            stone.bytes,
            reason,
            stone.id,
        )
        return stone

    def tombstones(self, camera_id: str | None = None) -> list[Tombstone]:
        """Tombstones, oldest first."""
        if camera_id is None:
            rows = self._read("SELECT * FROM tombstones ORDER BY id")
        else:
            rows = self._read(
                "SELECT * FROM tombstones WHERE camera_id = ? ORDER BY id", [camera_id]
            )
        return [Tombstone.from_row(r) for r in rows]

    # -- queries -----------------------------------------------------------------------------

    def cameras(self) -> list[str]:
        """Every camera the index knows (allocated, indexed or tombstoned)."""
        rows = self._read(
            "SELECT camera_id FROM cameras UNION SELECT camera_id FROM segments "
            "UNION SELECT camera_id FROM tombstones ORDER BY camera_id"
        )
        return [r["camera_id"] for r in rows]

    def segments(
        self,
        camera_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[IndexedSegment]:
        """Indexed segments overlapping [since, until], in chain order (oldest first)."""
        where, params = _where(
            ("camera_id = ?", camera_id), ("end_time >= ?", since), ("start_time <= ?", until)
        )
        sql = "SELECT * FROM segments WHERE 1=1" + where + " ORDER BY id"  # noqa: S608 - _where
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [self._indexed(r) for r in self._read(sql, params)]

    def expirable_prefix(
        self, cutoff: float, limit: int | None = None
    ) -> dict[str, list[IndexedSegment]]:
        """Per camera, its oldest segments (at most `limit`) that all ended before `cutoff`.

        Only a prefix of each chain, stopping at the first segment that ended at or after the
        cutoff, so removal always takes rows from the old end of the chain.
        """
        result: dict[str, list[IndexedSegment]] = {}
        cameras = self._read("SELECT DISTINCT camera_id FROM segments ORDER BY camera_id")
        for camera_id in (r["camera_id"] for r in cameras):
            prefix: list[IndexedSegment] = []
            rows = self._read(
                "SELECT * FROM segments WHERE camera_id = ? ORDER BY id LIMIT ?",
                [camera_id, -1 if limit is None else limit],
            )
            for row in rows:
                if row["end_time"] >= cutoff:
                    break
                prefix.append(self._indexed(row))
            if prefix:
                result[camera_id] = prefix
        return result

    def stored_bytes_by_camera(self) -> dict[str, tuple[int, float | None]]:
        """Per camera: bytes of its indexed segments and the start of its oldest one."""
        rows = self._read(
            "SELECT camera_id, sum(bytes) AS total, min(start_time) AS oldest "
            "FROM segments GROUP BY camera_id"
        )
        return {r["camera_id"]: (int(r["total"] or 0), r["oldest"]) for r in rows}

    def chain_head(self, camera_id: str) -> tuple[int, str] | None:
        """(seq, row hash) of the camera's newest row, or of its last tombstone if all expired."""
        with self._lock:
            return self._head(camera_id)

    def public_key_pem(self) -> str:
        """The device's public key (PEM), for enrolment at the hub."""
        return public_key_pem(self._key)

    # -- start-up reconcile ------------------------------------------------------------------

    def reconcile(self) -> ReconcileReport:
        """Compare files and index at start (before recording resumes) and repair what is safe.

        - a file without a row whose seq is tombstoned: an interrupted expiry, removed;
        - a file without a row whose header reads as this camera/seq (the segment being
          written at a crash): indexed as unfinished;
        - a file without a readable header: moved to DATA/quarantine, never deleted;
        - a row without a file, or with a different size: reported, never dropped;
        - a seq allocated but never written: marked void.
        Seq counters are raised above every seq found on disk so no seq is ever reused.
        """
        report = ReconcileReport()
        rows = {(r["camera_id"], r["seq"]): r for r in self._read("SELECT * FROM segments")}
        stones = self._read("SELECT camera_id, first_seq, last_seq FROM tombstones")
        files = {(cam, seq): path for cam, seq, path in iter_segment_files(self.data_dir)}
        top_seq: dict[str, int] = {}
        for (cam, seq), path in sorted(files.items()):
            top_seq[cam] = max(top_seq.get(cam, 0), seq)
            if (cam, seq) in rows:
                continue
            rel = str(path.relative_to(self.data_dir))
            if any(
                s["camera_id"] == cam and s["first_seq"] <= seq <= s["last_seq"] for s in stones
            ):
                _unlink_segment(path)
                report.expired_leftovers_removed.append(ReconcileItem(cam, seq, rel, "tombstoned"))
                continue
            ident = read_header_identity(path, scan=True) if path.stat().st_size else None
            if ident is None or (ident.camera_id, ident.seq) != (cam, seq):
                detail = (
                    "no readable header"
                    if ident is None
                    else f"header says {ident.camera_id} seq {ident.seq}"
                )
                moved = self._quarantine(path)
                self._set_allocation_state(cam, seq, rel, "quarantined")
                report.quarantined.append(
                    ReconcileItem(cam, seq, rel, f"{detail}; moved to {moved}")
                )
                continue
            stat = path.stat()
            self.add_segment(
                SegmentRecord(
                    camera_id=cam,
                    seq=seq,
                    path=path,
                    start=ident.start,
                    end=max(stat.st_mtime, ident.start),  # last write ~ receipt of last packet
                    bytes=stat.st_size,
                    fragments=ident.fragments or 0,
                    # the framing's final marker is unauthenticated here: a crash orphan is
                    # recorded as unfinished unless the scan saw the marker
                    finished=bool(ident.finished),
                    codec="unknown",  # not in the header; the hub learns it when it opens it
                )
            )
            report.indexed_orphans.append(
                ReconcileItem(cam, seq, rel, "finished" if ident.finished else "unfinished")
            )
        for (cam, seq), row in sorted(rows.items()):
            top_seq[cam] = max(top_seq.get(cam, 0), seq)
            path = self.data_dir / row["path"]
            if (cam, seq) not in files:
                report.missing_files.append(ReconcileItem(cam, seq, row["path"], "no file"))
            elif path.stat().st_size != row["bytes"]:
                report.size_mismatches.append(
                    ReconcileItem(
                        cam,
                        seq,
                        row["path"],
                        f"index {row['bytes']} bytes, file {path.stat().st_size} bytes",
                    )
                )
        with self._lock, self._db.atomic():
            for alloc in self._db.query(
                "SELECT * FROM allocations a WHERE state = 'open' AND NOT EXISTS "
                "(SELECT 1 FROM segments s WHERE s.camera_id = a.camera_id AND s.seq = a.seq)"
            ):
                if (alloc["camera_id"], alloc["seq"]) not in files:
                    report.abandoned_seqs.append(
                        ReconcileItem(alloc["camera_id"], alloc["seq"], alloc["path"], "void")
                    )
            for item in report.abandoned_seqs:
                self._db.execute(
                    "UPDATE allocations SET state = 'void' WHERE camera_id = ? AND seq = ?",
                    [item.camera_id, item.seq],
                )
            for cam, seq in top_seq.items():
                self._db.execute(
                    "INSERT INTO cameras (camera_id, next_seq) VALUES (?, ?) ON CONFLICT "
                    "(camera_id) DO UPDATE SET next_seq = max(next_seq, excluded.next_seq)",
                    [cam, seq + 1],
                )
        report.open_gaps = self.gaps(open_only=True)
        for line in report.render().splitlines():
            (log.info if report.clean else log.warning)("%s", line)
        return report

    # -- internals ---------------------------------------------------------------------------

    def _relative(self, path: Path) -> str:
        try:
            return Path(path).resolve().relative_to(self.data_dir).as_posix()
        except ValueError:
            raise ValueError(
                f"segment {path} is not inside the data directory {self.data_dir}"
            ) from None

    def _insert(self, table: str, record: dict[str, Any]) -> int:
        """Insert through the writer (lock held) and return the new row's id."""
        rowid = self._db.table(table).insert(record).last_rowid
        assert rowid is not None
        return rowid

    def _one(self, sql: str, params: list[Any]) -> dict[str, Any] | None:
        """One row through the writer connection (call with the lock held)."""
        return next(iter(self._db.query(sql, params)), None)

    def _read(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        with contextlib.closing(open_reader(self.data_dir)) as conn:
            return [dict(r) for r in conn.execute(sql, params or [])]

    def _camera_ids(self) -> list[str]:
        """Cameras with a chain (rows or tombstones), through the writer (lock held)."""
        rows = self._db.query(
            "SELECT camera_id FROM segments UNION SELECT camera_id FROM tombstones "
            "ORDER BY camera_id"
        )
        return [r["camera_id"] for r in rows]

    def _head(self, camera_id: str) -> tuple[int, str] | None:
        row = self._one(
            "SELECT seq, row_hash FROM segments WHERE camera_id = ? ORDER BY id DESC LIMIT 1",
            [camera_id],
        )
        if row:
            return row["seq"], row["row_hash"]
        stone = self._one(
            "SELECT last_seq, last_row_hash FROM tombstones WHERE camera_id = ? "
            "ORDER BY id DESC LIMIT 1",
            [camera_id],
        )
        return (stone["last_seq"], stone["last_row_hash"]) if stone else None

    def _head_hash(self, camera_id: str) -> str:
        head = self._head(camera_id)
        return head[1] if head else GENESIS_HASH

    def _tombstone_anchor(self, camera_id: str) -> str:
        stone = self._one(
            "SELECT last_row_hash FROM tombstones WHERE camera_id = ? ORDER BY id DESC LIMIT 1",
            [camera_id],
        )
        return stone["last_row_hash"] if stone else GENESIS_HASH

    def _indexed(self, row: Mapping[str, Any]) -> IndexedSegment:
        return IndexedSegment(
            camera_id=row["camera_id"],
            seq=row["seq"],
            path=self.data_dir / row["path"],
            start=row["start_time"],
            end=row["end_time"],
            bytes=row["bytes"],
            fragments=row["fragments"],
            finished=bool(row["finished"]),
            codec=row["codec"],
            file_sha256=row["file_sha256"],
            prev_hash=row["prev_hash"],
            row_hash=row["row_hash"],
            indexed_at=row["indexed_at"],
        )

    def _set_allocation_state(self, camera_id: str, seq: int, rel: str, state: str) -> None:
        with self._lock:
            self._db.table("allocations").upsert(
                {"camera_id": camera_id, "seq": seq, "path": rel, "state": state},
                pk=("camera_id", "seq"),
            )

    def _quarantine(self, path: Path) -> str:
        rel = path.relative_to(self.data_dir / SEGMENTS_DIR)
        target = self.data_dir / QUARANTINE_DIR / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
        return str(target.relative_to(self.data_dir))


def _file_matches_size(path: Path, row: Mapping[str, Any]) -> bool:
    try:
        return path.stat().st_size == row["bytes"]
    except FileNotFoundError:
        return False


def _unlink_segment(path: Path) -> None:
    """Remove a segment file, then its day directory if that is now empty."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with contextlib.suppress(OSError):
        os.rmdir(path.parent)  # only succeeds when empty


def _where(*conditions: tuple[str, Any]) -> tuple[str, list[Any]]:
    """`` AND …`` clauses and their parameters for the conditions whose value is given (a
    None value sets no condition)."""
    sql = ""
    params: list[Any] = []
    for clause, value in conditions:
        if value is not None:
            sql += f" AND {clause}"
            params.append(value)
    return sql, params
