"""`edge-agent verify`: prove the recordings on this box are whole, or name each break.

Checks, per camera: every index row against its own hash (an edited row), the links of the
chain from the last tombstone's anchor (a deleted or rewritten row), every file against its row
(missing, truncated, grown, changed, or swapped with another segment, told apart by the file's
clear-text header), seq continuity (a seq with neither row nor tombstone is a deleted
segment), and the signatures of tombstones and signed chain heads (a head the chain no longer
matches means rows were rewritten or removed after it was signed).

A *break* is evidence of tampering or loss; a *warning* is an operational state (a seq
allocated but never written, a crash orphan not reconciled yet). Read-only: it opens the index
on its own connection and never writes.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.device_key import key_id, load_public_key_pem, verify_payload
from edge_agent.segment_chain import (
    GENESIS_HASH,
    SignedHead,
    Tombstone,
    compute_row_hash,
    hash_file,
    iter_segment_files,
    read_header_identity,
)
from edge_agent.segment_store import DB_NAME, open_reader

Severity = Literal["break", "warning"]


@dataclass(frozen=True)
class Finding:
    """One thing verify found; `kind` is a stable machine name, `message` says it in words."""

    severity: Severity
    kind: str
    camera_id: str | None
    seq: int | None
    message: str
    path: str | None = None


@dataclass
class VerifyReport:
    """Everything `verify` checked and found."""

    data_dir: str
    checked_at: float
    cameras: int = 0
    segments: int = 0
    bytes_hashed: int = 0
    tombstones: int = 0
    signed_heads: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def breaks(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "break"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """No break: every file, row, link, tombstone and signed head checks out."""
        return not self.breaks

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "data_dir": self.data_dir,
            "checked_at": self.checked_at,
            "summary": {
                "cameras": self.cameras,
                "segments": self.segments,
                "bytes_hashed": self.bytes_hashed,
                "tombstones": self.tombstones,
                "signed_heads": self.signed_heads,
                "breaks": len(self.breaks),
                "warnings": len(self.warnings),
            },
            "findings": [asdict(f) for f in self.findings],
        }

    def to_json(self) -> str:
        """The `edge-agent verify --json` output."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def render(self) -> str:
        """Human text: what was checked, one line per finding, then the verdict."""
        lines = [
            f"verify {self.data_dir}",
            f"  {self.cameras} cameras, {self.segments} segments "
            f"({self.bytes_hashed / 1e6:.1f} MB hashed), {self.tombstones} tombstones, "
            f"{self.signed_heads} signed heads",
        ]
        for f in self.findings:
            where = f.camera_id or "-"
            if f.seq is not None:
                where += f" seq {f.seq}"
            label = "BREAK  " if f.severity == "break" else "warning"
            lines.append(f"  {label} {where}: {f.kind}: {f.message}")
        if self.ok:
            lines.append(
                "KẾT QUẢ: toàn vẹn, không phát hiện sửa hoặc xoá trái phép. "
                f"/ RESULT: intact ({len(self.warnings)} warnings)."
            )
        else:
            lines.append(
                f"KẾT QUẢ: phát hiện {len(self.breaks)} dấu hiệu sửa hoặc xoá dữ liệu ghi hình. "
                f"/ RESULT: {len(self.breaks)} breaks — recordings were altered or deleted."
            )
        return "\n".join(lines)


def verify(
    data_dir: Path, *, public_key: Ed25519PublicKey | None = None, hash_files: bool = True
) -> VerifyReport:
    """Check every file against the index and the chain, and name each break.

    `public_key` is the device key as registered at the hub; without it the keys recorded in
    the index are used (which proves consistency, not origin: whoever can rewrite the disk can
    rewrite those too). `hash_files=False` checks sizes only (quick, misses same-size edits).
    """
    data_dir = Path(data_dir)
    report = VerifyReport(str(data_dir), time.time())
    if not (data_dir / DB_NAME).exists():
        report.findings.append(
            Finding(
                "break", "index_missing", None, None, f"no segment index at {data_dir / DB_NAME}"
            )
        )
        return report
    with contextlib.closing(open_reader(data_dir)) as conn:
        _Verifier(data_dir, conn, report, public_key, hash_files).run()
    return report


class _Verifier:
    def __init__(
        self,
        data_dir: Path,
        conn: sqlite3.Connection,
        report: VerifyReport,
        public_key: Ed25519PublicKey | None,
        hash_files: bool,
    ) -> None:
        self.data_dir = data_dir
        self.report = report
        self.hash_files = hash_files
        # one snapshot of the whole index, so a running recorder cannot make it inconsistent
        conn.execute("BEGIN")
        self.rows = _by_camera(conn, "SELECT * FROM segments ORDER BY id")
        self.stones = {
            cam: [Tombstone.from_row(r) for r in rows]
            for cam, rows in _by_camera(conn, "SELECT * FROM tombstones ORDER BY id").items()
        }
        self.heads = {
            cam: [SignedHead(**r) for r in rows]
            for cam, rows in _by_camera(conn, "SELECT * FROM chain_heads ORDER BY id").items()
        }
        self.allocations = {
            (r["camera_id"], r["seq"]): r["state"]
            for r in map(dict, conn.execute("SELECT camera_id, seq, state FROM allocations"))
        }
        if public_key is not None:
            self.keys = {key_id(public_key): public_key}
        else:
            self.keys = {
                r["key_id"]: load_public_key_pem(r["public_key_pem"])
                for r in conn.execute("SELECT key_id, public_key_pem FROM device_keys")
            }
        conn.execute("COMMIT")
        self.files: dict[str, dict[int, Path]] = defaultdict(dict)
        for cam, seq, path in iter_segment_files(data_dir):
            self.files[cam][seq] = path

    def run(self) -> None:
        allocated = {cam for cam, _ in self.allocations}
        cameras = sorted(set(self.rows) | set(self.stones) | set(self.files) | allocated)
        self.report.cameras = len(cameras)
        self.report.tombstones = sum(len(s) for s in self.stones.values())
        self.report.signed_heads = sum(len(h) for h in self.heads.values())
        for cam in cameras:
            anchor, expired_through = self._tombstones(cam)
            self._chain(cam, anchor)
            self._seqs(cam, expired_through)
            self._heads(cam)

    def _add(
        self,
        severity: Severity,
        kind: str,
        cam: str | None,
        seq: int | None,
        message: str,
        path: str | None = None,
    ) -> None:
        self.report.findings.append(Finding(severity, kind, cam, seq, message, path))

    def _signed(self, what: str, cam: str, seq: int, kid: str, payload: dict, sig: str) -> None:
        key = self.keys.get(kid)
        if key is None:
            self._add(
                "break", f"{what}_unknown_key", cam, seq, f"{what} signed by unknown key {kid}"
            )
        elif not verify_payload(key, payload, sig):
            self._add("break", f"{what}_signature_invalid", cam, seq, f"{what} signature invalid")

    def _tombstones(self, cam: str) -> tuple[str, int]:
        """Check the camera's tombstones; return the anchor rows continue from and the last
        expired seq."""
        anchor, expired_through = GENESIS_HASH, 0
        for stone in self.stones.get(cam, []):
            self._signed(
                "tombstone", cam, stone.first_seq, stone.key_id, stone.payload(), stone.signature
            )
            if stone.prev_anchor != anchor:
                self._add(
                    "break",
                    "tombstone_chain_break",
                    cam,
                    stone.first_seq,
                    f"tombstone {stone.id} (seq {stone.first_seq}-{stone.last_seq}, "
                    f"{stone.reason}) does not continue from "
                    + ("the chain's start" if anchor == GENESIS_HASH else "the previous tombstone")
                    + ": segments before it were removed without a tombstone",
                )
            if stone.missing_files:
                self._add(
                    "warning",
                    "tombstone_missing_files",
                    cam,
                    stone.first_seq,
                    f"{stone.missing_files} of the {stone.rows} segments removed by tombstone "
                    f"{stone.id} ({stone.reason}) had no file of the indexed size at the time",
                )
            anchor = stone.last_row_hash
            expired_through = max(expired_through, stone.last_seq)
        return anchor, expired_through

    def _chain(self, cam: str, anchor: str) -> None:
        prev_hash, prev_seq = anchor, None
        for row in self.rows.get(cam, []):
            seq = row["seq"]
            self.report.segments += 1
            if compute_row_hash(row) != row["row_hash"]:
                self._add(
                    "break",
                    "row_edited",
                    cam,
                    seq,
                    "index row does not match its own hash: the row was edited",
                )
            if row["prev_hash"] != prev_hash:
                after = (
                    "the chain's start or last tombstone" if prev_seq is None else f"seq {prev_seq}"
                )
                self._add(
                    "break",
                    "chain_break",
                    cam,
                    seq,
                    f"row does not link to {after}: rows between were deleted or rewritten",
                )
            prev_hash, prev_seq = row["row_hash"], seq
            self._file(cam, row)

    def _file(self, cam: str, row: dict[str, Any]) -> None:
        seq, rel = row["seq"], row["path"]
        path = self.data_dir / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            self._add("break", "file_missing", cam, seq, "segment file is missing", rel)
            return
        digest = None
        if self.hash_files and size == row["bytes"]:
            digest = hash_file(path)[1]
            self.report.bytes_hashed += size
            if digest == row["file_sha256"]:
                return
        elif size == row["bytes"]:
            return
        ident = read_header_identity(path)
        if ident is not None and (ident.camera_id, ident.seq) != (cam, seq):
            self._add(
                "break",
                "file_swapped",
                cam,
                seq,
                f"file holds {ident.camera_id} seq {ident.seq}: segment files were swapped "
                "or moved",
                rel,
            )
        elif size < row["bytes"]:
            self._add(
                "break",
                "file_truncated",
                cam,
                seq,
                f"file has {size} of {row['bytes']} bytes: truncated",
                rel,
            )
        elif size > row["bytes"]:
            self._add(
                "break",
                "file_grown",
                cam,
                seq,
                f"file has {size} bytes, index says {row['bytes']}: data was added",
                rel,
            )
        else:
            self._add(
                "break",
                "file_changed",
                cam,
                seq,
                "file content does not match the index's SHA-256: altered",
                rel,
            )

    def _seqs(self, cam: str, expired_through: int) -> None:
        """Every seq up to the newest must be indexed, tombstoned, or explainably never written."""
        live = {r["seq"] for r in self.rows.get(cam, [])}
        files = self.files.get(cam, {})
        allocated = [s for (c, s) in self.allocations if c == cam]
        newest = max([*live, *files, *allocated, expired_through, 0])
        newest_allocated = max(allocated, default=0)
        for seq in range(1, newest + 1):
            if seq in live:
                continue
            path = files.get(seq)
            rel = str(path.relative_to(self.data_dir)) if path else None
            if seq <= expired_through:
                if path is not None:
                    self._add(
                        "warning",
                        "expired_file_present",
                        cam,
                        seq,
                        "expired (tombstoned) segment's file is still on disk",
                        rel,
                    )
                continue
            state = self.allocations.get((cam, seq))
            if state == "void":
                self._add("warning", "seq_void", cam, seq, "allocated, nothing was recorded")
            elif state == "quarantined":
                self._add(
                    "warning",
                    "seq_quarantined",
                    cam,
                    seq,
                    "file had no readable header and was moved to quarantine",
                )
            elif state == "open" and seq == newest_allocated:
                continue  # the segment being recorded now
            elif state == "open":
                self._add(
                    "warning",
                    "seq_unindexed",
                    cam,
                    seq,
                    "allocated but not indexed"
                    + (" (file present)" if path else " (no file)")
                    + ": restart the agent to reconcile",
                    rel,
                )
            else:
                self._add(
                    "break",
                    "seq_missing",
                    cam,
                    seq,
                    "no index row and no tombstone: the segment was deleted"
                    + (" (its file is still on disk, the row was removed)" if path else ""),
                    rel,
                )

    def _heads(self, cam: str) -> None:
        live = {r["seq"]: r["row_hash"] for r in self.rows.get(cam, [])}
        anchors = {s.last_seq: s.last_row_hash for s in self.stones.get(cam, [])}
        expired_through = max(anchors, default=0)
        for head in self.heads.get(cam, []):
            self._signed("head", cam, head.seq, head.key_id, head.payload(), head.signature)
            signed_at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(head.time))
            expected = live.get(head.seq, anchors.get(head.seq))
            if expected is None and head.seq <= expired_through:
                continue  # signed before an expiry that removed its row; the tombstone speaks
            if expected is None:
                self._add(
                    "break",
                    "head_row_missing",
                    cam,
                    head.seq,
                    f"head signed at {signed_at} UTC names seq {head.seq}, which is no longer "
                    "in the index: rows were deleted after it was signed",
                )
            elif expected != head.row_hash:
                self._add(
                    "break",
                    "head_mismatch",
                    cam,
                    head.seq,
                    f"head signed at {signed_at} UTC does not match the index's row: the chain "
                    "was rewritten after it was signed",
                )


def _by_camera(conn: sqlite3.Connection, sql: str) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in conn.execute(sql):
        record = dict(row)
        grouped[record["camera_id"]].append(record)
    return dict(grouped)
