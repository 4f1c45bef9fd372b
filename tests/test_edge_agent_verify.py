"""`verify` names every kind of tampering precisely: which camera, which seq, what.

Each test records real sealed segments into a real index, tampers as an intruder with root on
the box would (editing files and the SQLite index directly), and checks the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.device_key import load_or_create_device_key
from edge_agent.segment_chain import compute_row_hash
from edge_agent.segment_store import SegmentRecord, SegmentStore
from edge_agent.verify import VerifyReport, verify
from sitelink.sealed_segment import SealSuite, SegmentHeader, SegmentSealer, generate_private_key

SITE = "site-hn-07"
T0 = 1_700_000_000.0
RECIPIENT = generate_private_key(SealSuite.X25519).public_key()


def record_segment(store: SegmentStore, camera_id: str, start: float) -> Path:
    seq, path = store.allocate(camera_id, start)
    with (
        open(path, "wb") as fh,
        SegmentSealer(fh, SegmentHeader(SITE, camera_id, seq, start), [RECIPIENT]) as sealer,
    ):
        sealer.write_chunk(os.urandom(200))
        sealer.write_chunk(os.urandom(1000 + 100 * seq))  # sizes differ between segments
    store.add_segment(
        SegmentRecord(camera_id, seq, path, start, start + 60, path.stat().st_size, 1, True, "H265")
    )
    return path


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Path]:
    """A data dir with cam-1 seq 1-5 and cam-2 seq 1-3, heads signed, the agent stopped."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    store = SegmentStore(data_dir, load_or_create_device_key(data_dir / "device_key.pem"), SITE)
    for i in range(5):
        record_segment(store, "cam-1", T0 + 60 * i)
    for i in range(3):
        record_segment(store, "cam-2", T0 + 60 * i)
    store.sign_heads(now=T0 + 400)
    store.close()
    yield data_dir


def seg(data_dir: Path, camera_id: str, seq: int) -> Path:
    return data_dir / f"segments/{camera_id}/20231114/{camera_id}-{seq:08d}.seg"


@contextlib.contextmanager
def index(data_dir: Path) -> Iterator[sqlite3.Connection]:
    """The index opened for writing, as an intruder would."""
    conn = sqlite3.connect(data_dir / "edge.db")
    conn.row_factory = sqlite3.Row
    try:
        with conn:
            yield conn
    finally:
        conn.close()


def breaks(report: VerifyReport) -> list[tuple[str, str | None, int | None]]:
    return sorted((f.kind, f.camera_id, f.seq) for f in report.breaks)


def test_an_untouched_box_verifies_clean(box: Path) -> None:
    report = verify(box)
    assert report.ok and report.findings == []
    assert (report.cameras, report.segments, report.signed_heads) == (2, 8, 2)
    assert report.bytes_hashed == sum(p.stat().st_size for p in box.glob("segments/*/*/*.seg"))
    assert "RESULT: intact" in report.render()


def test_one_changed_byte_is_named_by_camera_and_seq(box: Path) -> None:
    path = seg(box, "cam-1", 3)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(data)
    assert breaks(verify(box)) == [("file_changed", "cam-1", 3)]


def test_a_truncated_file_is_reported_as_truncated(box: Path) -> None:
    path = seg(box, "cam-2", 2)
    size = path.stat().st_size
    os.truncate(path, size - 100)
    report = verify(box)
    assert breaks(report) == [("file_truncated", "cam-2", 2)]
    assert f"{size - 100} of {size} bytes" in report.breaks[0].message


def test_two_swapped_segments_are_both_named_with_what_they_hold(box: Path) -> None:
    a, b = seg(box, "cam-1", 2), seg(box, "cam-1", 4)
    tmp = a.with_suffix(".tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    report = verify(box)
    assert breaks(report) == [("file_swapped", "cam-1", 2), ("file_swapped", "cam-1", 4)]
    messages = {f.seq: f.message for f in report.breaks}
    assert messages[2].startswith("file holds cam-1 seq 4")
    assert messages[4].startswith("file holds cam-1 seq 2")


def test_a_deleted_segment_file_is_reported_missing(box: Path) -> None:
    seg(box, "cam-2", 2).unlink()
    assert breaks(verify(box)) == [("file_missing", "cam-2", 2)]


def test_a_segment_deleted_with_its_row_breaks_the_chain_and_the_seqs(box: Path) -> None:
    seg(box, "cam-1", 3).unlink()
    with index(box) as db:
        db.execute("DELETE FROM segments WHERE camera_id = 'cam-1' AND seq = 3")
    report = verify(box)
    assert breaks(report) == [("chain_break", "cam-1", 4), ("seq_missing", "cam-1", 3)]
    assert "does not link to seq 2" in next(f.message for f in report.breaks if f.seq == 4)


def test_an_edited_index_row_is_named(box: Path) -> None:
    with index(box) as db:
        db.execute(
            "UPDATE segments SET end_time = end_time - 30 WHERE camera_id = 'cam-1' AND seq = 2"
        )
    assert breaks(verify(box)) == [("row_edited", "cam-1", 2)]


def test_a_deleted_index_row_is_named_even_though_its_file_remains(box: Path) -> None:
    with index(box) as db:
        db.execute("DELETE FROM segments WHERE camera_id = 'cam-2' AND seq = 2")
    report = verify(box)
    assert breaks(report) == [("chain_break", "cam-2", 3), ("seq_missing", "cam-2", 2)]
    missing = next(f for f in report.breaks if f.kind == "seq_missing")
    assert "file is still on disk" in missing.message


def test_deleting_the_newest_segment_after_a_signed_head_is_caught(box: Path) -> None:
    seg(box, "cam-1", 5).unlink()
    with index(box) as db:
        db.execute("DELETE FROM segments WHERE camera_id = 'cam-1' AND seq = 5")
        db.execute("DELETE FROM allocations WHERE camera_id = 'cam-1' AND seq = 5")
    report = verify(box)
    assert breaks(report) == [("head_row_missing", "cam-1", 5)]


def test_a_chain_rewritten_consistently_still_contradicts_the_signed_head(box: Path) -> None:
    with index(box) as db:
        chain = [
            dict(r)
            for r in db.execute("SELECT * FROM segments WHERE camera_id = 'cam-1' ORDER BY id")
        ]
        prev = chain[1]["row_hash"]
        for row in chain[2:]:  # edit seq 3, then recompute every hash after it
            if row["seq"] == 3:
                row["end_time"] -= 30
            row["prev_hash"] = prev
            row["row_hash"] = prev = compute_row_hash(row)
            db.execute(
                "UPDATE segments SET end_time = ?, prev_hash = ?, row_hash = ? WHERE id = ?",
                [row["end_time"], row["prev_hash"], row["row_hash"], row["id"]],
            )
    assert breaks(verify(box)) == [("head_mismatch", "cam-1", 5)]


def test_oldest_segments_removed_without_a_tombstone_are_caught(box: Path) -> None:
    for seq in (1, 2):
        seg(box, "cam-1", seq).unlink()
    with index(box) as db:
        db.execute("DELETE FROM segments WHERE camera_id = 'cam-1' AND seq <= 2")
    assert breaks(verify(box)) == [
        ("chain_break", "cam-1", 3),
        ("seq_missing", "cam-1", 1),
        ("seq_missing", "cam-1", 2),
    ]


def test_lawful_expiry_verifies_clean_and_an_edited_tombstone_does_not(box: Path) -> None:
    store = SegmentStore(box, load_or_create_device_key(box / "device_key.pem"), SITE)
    store.remove_oldest("cam-1", 2, "retention")
    store.close()
    report = verify(box)
    assert report.ok and report.findings == [] and report.tombstones == 1
    with index(box) as db:
        db.execute("UPDATE tombstones SET reason = 'disk_full'")
    assert breaks(verify(box)) == [("tombstone_signature_invalid", "cam-1", 1)]


def test_signatures_are_checked_against_the_registered_key_when_given(box: Path) -> None:
    stranger = Ed25519PrivateKey.generate().public_key()
    assert breaks(verify(box, public_key=stranger)) == [
        ("head_unknown_key", "cam-1", 5),
        ("head_unknown_key", "cam-2", 3),
    ]
    genuine = load_or_create_device_key(box / "device_key.pem").public_key()
    assert verify(box, public_key=genuine).ok


def test_quick_mode_checks_sizes_only(box: Path) -> None:
    path = seg(box, "cam-1", 1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(data)
    quick = verify(box, hash_files=False)
    assert quick.ok and quick.bytes_hashed == 0
    os.truncate(seg(box, "cam-1", 2), 10)
    assert breaks(verify(box, hash_files=False)) == [("file_truncated", "cam-1", 2)]


def test_json_output_lists_every_finding(box: Path) -> None:
    seg(box, "cam-2", 1).unlink()
    doc = json.loads(verify(box).to_json())
    assert doc["ok"] is False
    assert doc["summary"]["breaks"] == 1 and doc["summary"]["segments"] == 8
    assert doc["findings"] == [
        {
            "severity": "break",
            "kind": "file_missing",
            "camera_id": "cam-2",
            "seq": 1,
            "message": "segment file is missing",
            "path": "segments/cam-2/20231114/cam-2-00000001.seg",
        }
    ]


def test_rendered_text_names_each_break_and_gives_a_verdict(box: Path) -> None:
    seg(box, "cam-2", 1).unlink()
    text = verify(box).render()
    assert "BREAK   cam-2 seq 1: file_missing: segment file is missing" in text
    assert text.splitlines()[-1].startswith("KẾT QUẢ: phát hiện 1")


def test_a_data_dir_without_an_index_is_a_break(tmp_path: Path) -> None:
    assert breaks(verify(tmp_path)) == [("index_missing", None, None)]


def test_expiring_a_segment_whose_file_was_already_gone_leaves_a_warning(box: Path) -> None:
    seg(box, "cam-2", 1).unlink()
    store = SegmentStore(box, load_or_create_device_key(box / "device_key.pem"), SITE)
    stone = store.remove_oldest("cam-2", 2, "retention")
    store.close()
    assert stone is not None and stone.missing_files == 1
    report = verify(box)
    assert report.ok
    assert [(f.kind, f.camera_id, f.seq) for f in report.warnings] == [
        ("tombstone_missing_files", "cam-2", 1)
    ]
