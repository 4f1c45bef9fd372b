"""Chain formats: file naming, row hashing, and what a segment's clear-text header tells."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_agent.segment_chain import (
    GENESIS_HASH,
    check_camera_id,
    compute_row_hash,
    iter_segment_files,
    read_header_identity,
    segment_relpath,
)
from sitelink.sealed_segment import SealSuite, SegmentHeader, SegmentSealer, generate_private_key

ROW = {
    "camera_id": "cam-1",
    "seq": 3,
    "path": "segments/cam-1/20231114/cam-1-00000003.seg",
    "start_time": 1_700_000_000.25,
    "end_time": 1_700_000_060.5,
    "bytes": 123456,
    "fragments": 60,
    "finished": 1,
    "codec": "H264",
    "file_sha256": "ab" * 32,
    "prev_hash": GENESIS_HASH,
    "indexed_at": 1_700_000_061.0,
}


def test_segment_paths_are_grouped_by_camera_and_utc_day() -> None:
    # 2023-11-14 23:59:59 UTC is already the 15th in Vietnam (UTC+7): the UTC day wins
    assert segment_relpath("cam-1", 42, 1_700_006_399.0) == (
        "segments/cam-1/20231114/cam-1-00000042.seg"
    )


def test_camera_ids_must_be_safe_file_names() -> None:
    assert check_camera_id("cam_01.main-2") == "cam_01.main-2"
    for bad in ("a/b", "..", "-x", "cam 1", "camé"):
        with pytest.raises(ValueError, match="not usable as a file name"):
            check_camera_id(bad)


def test_row_hash_covers_every_field_including_the_previous_hash() -> None:
    reference = compute_row_hash(ROW)
    assert len(reference) == 64 and compute_row_hash(dict(ROW)) == reference
    for name, value in [
        ("seq", 4),
        ("end_time", 1_700_000_060.25),
        ("bytes", 123457),
        ("finished", 0),
        ("file_sha256", "cd" * 32),
        ("prev_hash", "1" * 64),
        ("path", "segments/cam-1/20231114/cam-1-00000004.seg"),
    ]:
        assert compute_row_hash({**ROW, name: value}) != reference, name
    # extra columns (id, row_hash itself) are not part of the hashed content
    assert compute_row_hash({**ROW, "id": 99, "row_hash": "x"}) == reference


def test_only_files_named_like_segments_of_their_camera_are_listed(tmp_path: Path) -> None:
    day = tmp_path / "segments/cam-1/20231114"
    day.mkdir(parents=True)
    for name in ("cam-1-00000001.seg", "cam-1-00000002.seg", "cam-2-00000003.seg", "notes.txt"):
        (day / name).write_bytes(b"")
    assert [(c, s) for c, s, _ in iter_segment_files(tmp_path)] == [("cam-1", 1), ("cam-1", 2)]
    assert list(iter_segment_files(tmp_path / "nowhere")) == []


def test_header_identity_reads_a_sealed_segment_without_any_key(tmp_path: Path) -> None:
    recipient = generate_private_key(SealSuite.X25519).public_key()
    path = tmp_path / "cam-1-00000005.seg"
    with open(path, "wb") as fh:
        sealer = SegmentSealer(
            fh, SegmentHeader("site-1", "cam-1", 5, 1_700_000_000.5), [recipient]
        )
        for _ in range(4):  # init + 3 fragments, then a crash: no final marker
            sealer.write_chunk(os.urandom(300))
        sealer.abort()
    ident = read_header_identity(path, scan=True)
    assert ident is not None
    assert (ident.site_id, ident.camera_id, ident.seq, ident.start) == (
        "site-1",
        "cam-1",
        5,
        1_700_000_000.5,
    )
    assert (ident.fragments, ident.finished) == (3, False)
    assert read_header_identity(path).fragments is None  # type: ignore[union-attr]
    junk = tmp_path / "junk.seg"
    junk.write_bytes(os.urandom(100))
    assert read_header_identity(junk) is None
