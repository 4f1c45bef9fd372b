"""The segment index: allocation, hash chain, gap ledger, legal holds, heads, removal, reconcile.

Real SQLite files and real sealed segments (sitelink's SegmentSealer on random chunks).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.device_key import load_or_create_device_key, verify_payload
from edge_agent.segment_chain import GENESIS_HASH, compute_row_hash, hash_file
from edge_agent.segment_store import (
    LegalHoldError,
    SegmentRecord,
    SegmentStore,
    open_reader,
)
from edge_agent.verify import verify
from sitelink.sealed_segment import SealSuite, SegmentHeader, SegmentSealer, generate_private_key

SITE = "site-hcm-01"
T0 = 1_700_000_000.0
RECIPIENT = generate_private_key(SealSuite.X25519).public_key()


def record_segment(
    store: SegmentStore, camera_id: str, start: float, *, fragments: int = 3
) -> SegmentRecord:
    """Allocate, seal random chunks into the file, and index it, as the recorder does."""
    seq, path = store.allocate(camera_id, start)
    with (
        open(path, "wb") as fh,
        SegmentSealer(fh, SegmentHeader(SITE, camera_id, seq, start), [RECIPIENT]) as sealer,
    ):
        sealer.write_chunk(os.urandom(200))  # the init segment
        for _ in range(fragments):
            sealer.write_chunk(os.urandom(1500))
    rec = SegmentRecord(
        camera_id, seq, path, start, start + 60, path.stat().st_size, fragments, True, "H264"
    )
    store.add_segment(rec)
    return rec


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Iterator[SegmentStore]:
    data_dir.mkdir()
    key = load_or_create_device_key(data_dir / "device_key.pem")
    s = SegmentStore(data_dir, key, SITE)
    yield s
    s.close()


def rows(data_dir: Path, camera_id: str) -> list[dict]:
    with contextlib.closing(open_reader(data_dir)) as conn:
        return [
            dict(r)
            for r in conn.execute(
                "SELECT * FROM segments WHERE camera_id = ? ORDER BY id", [camera_id]
            )
        ]


def test_allocate_gives_increasing_seqs_and_the_documented_path(store: SegmentStore) -> None:
    first = store.allocate("cam-1", T0)
    second = store.allocate("cam-1", T0 + 60)
    other = store.allocate("cam-2", T0)
    assert [first[0], second[0], other[0]] == [1, 2, 1]
    assert first[1] == store.data_dir / "segments/cam-1/20231114/cam-1-00000001.seg"
    assert first[1].parent.is_dir()


def test_add_segment_links_each_row_to_the_previous_rows_hash(store: SegmentStore) -> None:
    recs = [record_segment(store, "cam-1", T0 + 60 * i) for i in range(3)]
    chain = rows(store.data_dir, "cam-1")
    assert chain[0]["prev_hash"] == GENESIS_HASH
    for prev, row in itertools.pairwise(chain):
        assert row["prev_hash"] == prev["row_hash"]
    for rec, row in zip(recs, chain, strict=True):
        assert row["row_hash"] == compute_row_hash(row)
        assert row["file_sha256"] == hash_file(rec.path)[1]
        assert row["bytes"] == rec.bytes and row["fragments"] == 3 and row["finished"] == 1


def test_indexing_a_seq_twice_is_refused(store: SegmentStore) -> None:
    rec = record_segment(store, "cam-1", T0)
    with pytest.raises(ValueError, match="already indexed"):
        store.add_segment(rec)


def test_segment_outside_the_data_dir_is_refused(store: SegmentStore, tmp_path: Path) -> None:
    stray = tmp_path / "stray.seg"
    stray.write_bytes(b"x")
    rec = SegmentRecord("cam-1", 1, stray, T0, T0 + 60, 1, 0, True, "H264")
    with pytest.raises(ValueError, match="not inside the data directory"):
        store.add_segment(rec)


def test_camera_ids_that_are_not_file_names_are_refused(store: SegmentStore) -> None:
    for bad in ("../etc", "cam/1", "", ".hidden", "a" * 65):
        with pytest.raises(ValueError, match="not usable as a file name"):
            store.allocate(bad, T0)


def test_seqs_are_never_reused_after_removal_or_reopen(store: SegmentStore, data_dir: Path) -> None:
    for i in range(3):
        record_segment(store, "cam-1", T0 + 60 * i)
    store.remove_oldest("cam-1", 3, "retention")
    assert store.allocate("cam-1", T0 + 999)[0] == 4
    store.close()
    reopened = SegmentStore(data_dir, load_or_create_device_key(data_dir / "device_key.pem"), SITE)
    assert reopened.allocate("cam-1", T0 + 999)[0] == 5
    reopened.close()


def test_gap_ledger_opens_closes_and_answers_range_queries(store: SegmentStore) -> None:
    a = store.open_gap("cam-1", T0, "timeout")
    b = store.open_gap("cam-2", T0 + 100, "refused")
    store.close_gap(a, T0 + 30)
    assert [(g.camera_id, g.start, g.end, g.cause) for g in store.gaps()] == [
        ("cam-1", T0, T0 + 30, "timeout"),
        ("cam-2", T0 + 100, None, "refused"),
    ]
    assert [g.id for g in store.gaps(open_only=True)] == [b]
    assert [g.id for g in store.gaps(since=T0 + 31)] == [b]  # open gaps reach to now
    assert [g.id for g in store.gaps(until=T0 + 50)] == [a]
    assert [g.id for g in store.gaps(camera_id="cam-1")] == [a]
    with pytest.raises(ValueError, match="already closed"):
        store.close_gap(a, T0 + 40)
    with pytest.raises(ValueError, match="gap cause"):
        store.open_gap("cam-1", T0, "gremlins")


def test_legal_holds_apply_per_camera_or_site_and_stay_on_record(store: SegmentStore) -> None:
    cam_hold = store.set_legal_hold("điều tra vụ việc 12/2021", camera_id="cam-1")
    assert store.is_held("cam-1") and not store.is_held("cam-2")
    site_hold = store.set_legal_hold("thanh tra toàn cơ sở")
    assert store.is_held("cam-2")
    store.clear_legal_hold(site_hold, "thanh tra kết thúc")
    assert not store.is_held("cam-2") and store.is_held("cam-1")
    assert [h.id for h in store.legal_holds()] == [cam_hold]
    everything = store.legal_holds(active_only=False)
    assert [(h.id, h.clear_reason) for h in everything] == [
        (cam_hold, None),
        (site_hold, "thanh tra kết thúc"),
    ]
    with pytest.raises(ValueError, match="needs a reason"):
        store.set_legal_hold("  ")


def test_sign_heads_signs_each_cameras_head_with_the_device_key(store: SegmentStore) -> None:
    record_segment(store, "cam-1", T0)
    last = record_segment(store, "cam-1", T0 + 60)
    record_segment(store, "cam-2", T0)
    heads = store.sign_heads(now=T0 + 200)
    public = load_or_create_device_key(store.data_dir / "device_key.pem").public_key()
    assert [(h.camera_id, h.seq) for h in heads] == [("cam-1", last.seq), ("cam-2", 1)]
    for head in heads:
        assert head.time == T0 + 200 and head.key_id == store.key_id
        assert verify_payload(public, head.payload(), head.signature)
    assert store.signed_heads() == heads
    assert store.signed_heads(since_id=heads[0].id) == heads[1:]
    assert heads[0].to_event()["row_hash"] == rows(store.data_dir, "cam-1")[-1]["row_hash"]


def test_remove_oldest_writes_a_signed_tombstone_then_deletes_files(store: SegmentStore) -> None:
    recs = [record_segment(store, "cam-1", T0 + 60 * i) for i in range(4)]
    chain = rows(store.data_dir, "cam-1")
    stone = store.remove_oldest("cam-1", 3, "retention")
    assert stone is not None
    assert (stone.first_seq, stone.last_seq, stone.rows, stone.reason) == (1, 3, 3, "retention")
    assert stone.prev_anchor == GENESIS_HASH and stone.last_row_hash == chain[2]["row_hash"]
    assert stone.bytes == sum(r.bytes for r in recs[:3]) and stone.missing_files == 0
    public = load_or_create_device_key(store.data_dir / "device_key.pem").public_key()
    assert verify_payload(public, stone.payload(), stone.signature)
    assert [r.path.exists() for r in recs] == [False, False, False, True]
    assert [r["seq"] for r in rows(store.data_dir, "cam-1")] == [4]
    assert store.tombstones() == [stone]


def test_remove_oldest_refuses_under_legal_hold(store: SegmentStore) -> None:
    rec = record_segment(store, "cam-1", T0)
    store.set_legal_hold("court order", camera_id="cam-1")
    with pytest.raises(LegalHoldError):
        store.remove_oldest("cam-1", 1, "retention")
    assert rec.path.exists()


def test_head_of_a_fully_expired_camera_is_its_tombstone_anchor(store: SegmentStore) -> None:
    record_segment(store, "cam-1", T0)
    stone = store.remove_oldest("cam-1", 1, "retention")
    assert stone is not None
    assert store.chain_head("cam-1") == (1, stone.last_row_hash)
    following = record_segment(store, "cam-1", T0 + 60)
    assert rows(store.data_dir, "cam-1")[0]["prev_hash"] == stone.last_row_hash
    assert following.seq == 2
    assert verify(store.data_dir).ok


def test_many_threads_adding_segments_and_gaps_keep_every_chain_intact(
    store: SegmentStore,
) -> None:
    errors: list[BaseException] = []

    def worker(camera_id: str, offset: int) -> None:
        try:
            for i in range(8):
                start = T0 + 60 * (offset + i)
                record_segment(store, camera_id, start, fragments=1)
                gap = store.open_gap(camera_id, start + 60, "stall")
                store.close_gap(gap, start + 61)
        except BaseException as exc:
            errors.append(exc)

    def signer(stop: threading.Event) -> None:
        while not stop.is_set():
            store.sign_heads()

    stop = threading.Event()
    threads = [
        threading.Thread(target=worker, args=(f"cam-{c}", 100 * t))
        for c in range(3)
        for t in range(2)
    ]
    sign_thread = threading.Thread(target=signer, args=(stop,))
    sign_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sign_thread.join()
    assert errors == []
    for c in range(3):
        assert sorted(r["seq"] for r in rows(store.data_dir, f"cam-{c}")) == list(range(1, 17))
        assert len(store.gaps(camera_id=f"cam-{c}")) == 16
    report = verify(store.data_dir)
    assert report.ok, report.render()
    assert report.segments == 48


CRASHING_RECORDER = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from edge_agent.device_key import load_or_create_device_key
    from edge_agent.segment_store import SegmentRecord, SegmentStore
    from sitelink.sealed_segment import RecipientPublicKey, SegmentHeader, SegmentSealer

    data_dir, site, recipient_pem = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    recipient = RecipientPublicKey.from_pem(recipient_pem)
    store = SegmentStore(data_dir, load_or_create_device_key(data_dir / "device_key.pem"), site)
    for i in range(3):
        start = 1_700_000_000.0 + 60 * i
        seq, path = store.allocate("cam-1", start)
        fh = open(path, "wb")
        sealer = SegmentSealer(fh, SegmentHeader(site, "cam-1", seq, start), [recipient])
        sealer.write_chunk(os.urandom(200))
        sealer.write_chunk(os.urandom(1500))
        sealer.write_chunk(os.urandom(1500))
        if i < 2:
            sealer.close()
            fh.close()
            store.add_segment(SegmentRecord(
                "cam-1", seq, path, start, start + 60, path.stat().st_size, 2, True, "H264"))
    store.sign_heads()
    print("mid-segment", flush=True)
    signal.pause()  # killed here, with seq 3 half written and not indexed
    """
)


def test_reconcile_after_kill_9_indexes_the_half_written_segment(data_dir: Path) -> None:
    data_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_RECORDER, str(data_dir), SITE, RECIPIENT.to_pem()],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "mid-segment"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    store = SegmentStore(data_dir, load_or_create_device_key(data_dir / "device_key.pem"), SITE)
    report = store.reconcile()
    assert [(i.camera_id, i.seq, i.detail) for i in report.indexed_orphans] == [
        ("cam-1", 3, "unfinished")
    ]
    orphan = store.segments("cam-1")[-1]
    assert (orphan.seq, orphan.finished, orphan.fragments) == (3, False, 2)
    assert orphan.start == 1_700_000_000.0 + 120
    assert not (report.missing_files or report.quarantined)
    assert store.allocate("cam-1", T0 + 999)[0] == 4
    assert store.reconcile().indexed_orphans == []  # idempotent
    assert verify(data_dir).ok
    store.close()


def test_reconcile_reports_missing_files_and_never_drops_their_rows(store: SegmentStore) -> None:
    recs = [record_segment(store, "cam-1", T0 + 60 * i) for i in range(3)]
    recs[1].path.unlink()
    report = store.reconcile()
    assert [(i.camera_id, i.seq) for i in report.missing_files] == [("cam-1", 2)]
    assert [r["seq"] for r in rows(store.data_dir, "cam-1")] == [1, 2, 3]
    assert not report.clean


def test_reconcile_quarantines_files_without_a_readable_header(store: SegmentStore) -> None:
    seq, path = store.allocate("cam-1", T0)
    path.write_bytes(b"")  # crashed before the header was written
    seq2, path2 = store.allocate("cam-1", T0 + 60)
    path2.write_bytes(os.urandom(500))
    report = store.reconcile()
    assert [(i.seq, i.detail.split(";")[0]) for i in report.quarantined] == [
        (seq, "no readable header"),
        (seq2, "no readable header"),
    ]
    assert not path.exists()
    assert (store.data_dir / "quarantine/cam-1/20231114" / path2.name).read_bytes()
    report2 = verify(store.data_dir)
    assert report2.ok and {f.kind for f in report2.warnings} == {"seq_quarantined"}


def test_reconcile_quarantines_a_file_whose_header_names_another_segment(
    store: SegmentStore,
) -> None:
    rec = record_segment(store, "cam-1", T0)
    seq, path = store.allocate("cam-1", T0 + 60)
    path.write_bytes(rec.path.read_bytes())  # a copy of seq 1 under seq 2's name
    report = store.reconcile()
    assert [(i.seq, i.detail.split(";")[0]) for i in report.quarantined] == [
        (seq, "header says cam-1 seq 1")
    ]


def test_reconcile_finishes_an_interrupted_expiry_and_voids_abandoned_seqs(
    store: SegmentStore,
) -> None:
    recs = [record_segment(store, "cam-1", T0 + 60 * i) for i in range(2)]
    leftover = recs[0].path.read_bytes()
    store.remove_oldest("cam-1", 1, "retention")
    recs[0].path.parent.mkdir(parents=True, exist_ok=True)
    recs[0].path.write_bytes(leftover)  # as if the process died before unlinking
    abandoned, _ = store.allocate("cam-1", T0 + 120)  # allocated, crashed before the file
    report = store.reconcile()
    assert [(i.seq, i.detail) for i in report.expired_leftovers_removed] == [(1, "tombstoned")]
    assert not recs[0].path.exists()
    assert [(i.seq, i.detail) for i in report.abandoned_seqs] == [(abandoned, "void")]
    result = verify(store.data_dir)
    assert result.ok and [(f.kind, f.seq) for f in result.findings] == [("seq_void", abandoned)]


def test_reconcile_raises_the_seq_counter_above_files_found_on_disk(
    store: SegmentStore, data_dir: Path
) -> None:
    rec = record_segment(store, "cam-1", T0)
    # a segment written by another copy of the index (e.g. a restored backup of edge.db)
    stray = rec.path.with_name("cam-1-00000007.seg")
    with (
        open(stray, "wb") as fh,
        SegmentSealer(fh, SegmentHeader(SITE, "cam-1", 7, T0 + 400), [RECIPIENT]) as sealer,
    ):
        sealer.write_chunk(b"init")
    report = store.reconcile()
    assert [i.seq for i in report.indexed_orphans] == [7]
    assert store.allocate("cam-1", T0 + 999)[0] == 8


def test_reconcile_reports_gaps_left_open_by_the_last_run(store: SegmentStore) -> None:
    gap = store.open_gap("cam-1", T0, "eof")
    report = store.reconcile()
    assert [g.id for g in report.open_gaps] == [gap] and report.clean
    assert "gap still open" in report.render()


def test_heads_and_tombstones_verify_as_the_events_the_hub_receives(store: SegmentStore) -> None:
    from sitelink import messages

    record_segment(store, "cam-1", T0)
    record_segment(store, "cam-1", T0 + 60)
    [head] = store.sign_heads(now=T0 + 130)
    stone = store.remove_oldest("cam-1", 1, "retention")
    assert stone is not None
    public = load_or_create_device_key(store.data_dir / "device_key.pem").public_key()
    head_event = messages.ChainHead(
        seq=1,
        ts=T0 + 130,
        camera=head.camera_id,
        segment_seq=head.seq,
        row_hash=head.row_hash,
        time=head.time,
        key_id=head.key_id,
        signature=head.signature,
    )
    stone_event = messages.Tombstone(
        seq=2,
        ts=T0 + 140,
        camera=stone.camera_id,
        first_seq=stone.first_seq,
        last_seq=stone.last_seq,
        start=stone.start,
        end=stone.end,
        removed_rows=stone.rows,
        removed_bytes=stone.bytes,
        prev_anchor=stone.prev_anchor,
        last_row_hash=stone.last_row_hash,
        reason="retention",
        created_at=stone.created_at,
        missing_files=stone.missing_files,
        key_id=stone.key_id,
        signature=stone.signature,
    )
    for event in (head_event, stone_event):
        public.verify(base64.b64decode(event.signature), event.signing_payload(SITE))
