"""Retention expiry with signed tombstones and legal holds; disk forecast and disk-full policy.

Files are real sealed segments. Free space comes from a probe that measures the real files
against a pretend volume size, and one test fills a real (tmpfs) volume.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_agent.device_key import load_or_create_device_key
from edge_agent.retention import (
    DAY,
    DiskAlarm,
    DiskPlanner,
    DiskPolicy,
    Retention,
    RetentionPolicy,
)
from edge_agent.segment_store import SegmentRecord, SegmentStore
from edge_agent.verify import verify
from sitelink.sealed_segment import SealSuite, SegmentHeader, SegmentSealer, generate_private_key

SITE = "site-dn-02"
NOW = 1_700_000_000.0
RECIPIENT = generate_private_key(SealSuite.X25519).public_key()
KIB = 1024


def record(store: SegmentStore, camera_id: str, days_ago: float, size: int = 4 * KIB) -> Path:
    """A 60 s segment of about `size` bytes that started `days_ago` before NOW."""
    start = NOW - days_ago * DAY
    seq, path = store.allocate(camera_id, start)
    with (
        open(path, "wb") as fh,
        SegmentSealer(fh, SegmentHeader(SITE, camera_id, seq, start), [RECIPIENT]) as sealer,
    ):
        sealer.write_chunk(os.urandom(size))
    store.add_segment(
        SegmentRecord(camera_id, seq, path, start, start + 60, path.stat().st_size, 1, True, "H264")
    )
    return path


def segment_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in (data_dir / "segments").glob("*/*/*.seg"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SegmentStore]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    s = SegmentStore(data_dir, load_or_create_device_key(data_dir / "device_key.pem"), SITE)
    yield s
    s.close()


def volume(store: SegmentStore, size: int) -> Callable[[], int]:
    """Free space of a pretend volume of `size` bytes holding the real segment files."""
    return lambda: size - segment_bytes(store.data_dir)


def seqs(store: SegmentStore, camera_id: str) -> list[int]:
    return [s.seq for s in store.segments(camera_id)]


# -- retention -------------------------------------------------------------------------------


def test_retention_below_the_legal_minimum_needs_explicit_permission() -> None:
    with pytest.raises(ValueError, match="below the legal minimum of 30"):
        RetentionPolicy(floor_days=7)
    assert RetentionPolicy(floor_days=7, allow_below_legal_minimum=True).floor_days == 7
    with pytest.raises(ValueError, match="inside the 45-day retention floor"):
        RetentionPolicy(floor_days=45, expire_days=40)


def test_expire_removes_only_segments_older_than_the_retention_period(store: SegmentStore) -> None:
    for days_ago in (40, 35, 31, 29, 1):
        record(store, "cam-1", days_ago)
    report = Retention(store, RetentionPolicy()).expire(NOW)
    [stone] = report.tombstones
    assert (stone.first_seq, stone.last_seq, stone.rows, stone.reason) == (1, 3, 3, "retention")
    assert (stone.start, stone.end) == (NOW - 40 * DAY, NOW - 31 * DAY + 60)
    assert seqs(store, "cam-1") == [4, 5]
    assert Retention(store, RetentionPolicy()).expire(NOW).tombstones == []


def test_a_longer_expiry_age_keeps_footage_beyond_the_floor(store: SegmentStore) -> None:
    for days_ago in (50, 40, 35):
        record(store, "cam-1", days_ago)
    Retention(store, RetentionPolicy(floor_days=30, expire_days=45)).expire(NOW)
    assert seqs(store, "cam-1") == [2, 3]


def test_successive_expiries_chain_their_tombstones_and_verify_clean(store: SegmentStore) -> None:
    for days_ago in (40, 39, 38, 37, 1):
        record(store, "cam-1", days_ago)
    store.sign_heads(now=NOW)
    first = Retention(store, RetentionPolicy(floor_days=38.5)).expire(NOW).tombstones
    second = Retention(store, RetentionPolicy(floor_days=36)).expire(NOW).tombstones
    assert [(t.first_seq, t.last_seq) for t in first + second] == [(1, 2), (3, 4)]
    assert second[0].prev_anchor == first[0].last_row_hash
    assert store.segments("cam-1")[0].prev_hash == second[0].last_row_hash
    report = verify(store.data_dir)
    assert report.ok and report.findings == [], report.render()


def test_legal_hold_on_a_camera_stops_its_expiry_only(store: SegmentStore) -> None:
    for cam in ("cam-1", "cam-2"):
        record(store, cam, 40)
        record(store, cam, 1)
    hold = store.set_legal_hold("Công an tỉnh yêu cầu giữ hình ảnh", camera_id="cam-1")
    report = Retention(store, RetentionPolicy()).expire(NOW)
    assert report.held == ["cam-1"]
    assert [t.camera_id for t in report.tombstones] == ["cam-2"]
    assert seqs(store, "cam-1") == [1, 2] and seqs(store, "cam-2") == [2]
    store.clear_legal_hold(hold, "vụ việc đã khép lại")
    assert [t.camera_id for t in Retention(store, RetentionPolicy()).expire(NOW).tombstones] == [
        "cam-1"
    ]


def test_a_site_wide_legal_hold_stops_all_expiry(store: SegmentStore) -> None:
    record(store, "cam-1", 40)
    record(store, "cam-2", 40)
    store.set_legal_hold("thanh tra")
    report = Retention(store, RetentionPolicy()).expire(NOW)
    assert report.tombstones == [] and sorted(report.held) == ["cam-1", "cam-2"]


# -- disk forecast ---------------------------------------------------------------------------


def test_forecast_measures_bitrates_and_days_of_capacity(store: SegmentStore) -> None:
    for i in range(3):
        record(store, "cam-1", i * 60 / DAY + 0.01, size=60 * KIB)
    record(store, "cam-2", 0.01, size=30 * KIB)
    stored = segment_bytes(store.data_dir)
    policy = DiskPolicy(reserve_bytes=0, ballast_bytes=0)
    planner = DiskPlanner(store, RetentionPolicy(), policy, free_bytes=lambda: 10**9)
    forecast = planner.forecast(NOW)
    rates = {c.camera_id: c.bytes_per_second for c in forecast.cameras}
    assert rates["cam-1"] == pytest.approx(1024, rel=0.02)  # ~60 KiB per 60 s
    assert rates["cam-2"] == pytest.approx(512, rel=0.05)
    assert forecast.stored_bytes == stored
    assert forecast.days_until_full == pytest.approx(10**9 / forecast.bytes_per_second / DAY)
    assert forecast.capacity_days == pytest.approx(
        (10**9 + stored) / forecast.bytes_per_second / DAY
    )


@pytest.mark.parametrize(
    ("capacity_days", "expected"),
    [(20, ["capacity_below_floor"]), (33, ["capacity_low"]), (60, [])],
)
def test_forecast_warns_early_and_alarms_when_the_floor_does_not_fit(
    store: SegmentStore, capacity_days: float, expected: list[str]
) -> None:
    record(store, "cam-1", 0.01, size=60 * KIB)
    rate = store.segments()[0].bytes / 60
    stored = segment_bytes(store.data_dir)
    free = int(capacity_days * DAY * rate) - stored
    planner = DiskPlanner(
        store,
        RetentionPolicy(),
        DiskPolicy(reserve_bytes=0, ballast_bytes=0),
        free_bytes=lambda: free,
    )
    assert [a.code for a in planner.forecast(NOW).alarms] == expected


# -- disk full -------------------------------------------------------------------------------


def test_disk_full_deletes_beyond_the_floor_first_oldest_across_cameras(
    store: SegmentStore,
) -> None:
    for days_ago in (50, 45, 2, 1):
        record(store, "cam-1", days_ago)
    for days_ago in (48, 3):
        record(store, "cam-2", days_ago)
    per_segment = store.segments()[0].bytes
    policy = DiskPolicy(reserve_bytes=2 * per_segment, target_free_bytes=int(2.5 * per_segment))
    planner = DiskPlanner(
        store,
        RetentionPolicy(expire_days=60),
        policy,
        free_bytes=volume(store, 7 * per_segment),  # 6 stored, 1 free
    )
    result = planner.enforce(NOW)
    # 50 d (cam-1) and 48 d (cam-2) go first: the two oldest, both beyond the 30-day floor
    assert [(t.camera_id, t.first_seq, t.reason) for t in result.tombstones] == [
        ("cam-1", 1, "disk_full"),
        ("cam-2", 1, "disk_full"),
    ]
    assert result.alarms == [] and result.free_after >= policy.target_free
    assert seqs(store, "cam-1") == [2, 3, 4] and seqs(store, "cam-2") == [2]
    assert verify(store.data_dir).ok


def test_disk_full_inside_the_floor_alarms_first_and_deletes_only_after_the_grace(
    store: SegmentStore,
) -> None:
    for days_ago in (5, 4, 3):
        record(store, "cam-1", days_ago)
    per_segment = store.segments()[0].bytes
    seen: list[tuple[str, int]] = []

    def on_alarm(alarm: DiskAlarm) -> None:
        seen.append((alarm.code, len(store.tombstones())))

    planner = DiskPlanner(
        store,
        RetentionPolicy(),
        DiskPolicy(reserve_bytes=per_segment, floor_grace_seconds=600),
        free_bytes=volume(store, 3 * per_segment),
        on_alarm=on_alarm,
    )
    first = planner.enforce(NOW)
    assert [(a.level, a.code) for a in first.alarms] == [("critical", "disk_full_floor_reached")]
    assert "tối thiểu" in first.alarms[0].message
    assert first.tombstones == [] and seqs(store, "cam-1") == [1, 2, 3]
    assert planner.enforce(NOW + 599).tombstones == []
    late = planner.enforce(NOW + 600)
    assert [(t.first_seq, t.last_seq, t.reason) for t in late.tombstones] == [
        (1, 1, "disk_full_inside_floor")
    ]
    assert [a.code for a in late.alarms] == ["disk_full_floor_breached"]
    # the alarm was raised while nothing had been deleted yet
    assert seen == [("disk_full_floor_reached", 0), ("disk_full_floor_breached", 1)]
    assert verify(store.data_dir).ok


def test_refusing_policy_never_deletes_inside_the_floor(store: SegmentStore) -> None:
    record(store, "cam-1", 1)
    per_segment = store.segments()[0].bytes
    planner = DiskPlanner(
        store,
        RetentionPolicy(),
        DiskPolicy(reserve_bytes=per_segment, floor_grace_seconds=None),
        free_bytes=volume(store, per_segment),
    )
    first = planner.enforce(NOW)
    assert [a.code for a in first.alarms] == ["disk_full_floor_reached"]
    assert "refused" in first.alarms[0].detail
    assert planner.enforce(NOW + 3600).tombstones == []
    assert seqs(store, "cam-1") == [1]


def test_disk_full_never_touches_a_camera_under_legal_hold(store: SegmentStore) -> None:
    record(store, "cam-1", 50)
    record(store, "cam-1", 1)
    per_segment = store.segments()[0].bytes
    store.set_legal_hold("court order 7/2021", camera_id="cam-1")
    planner = DiskPlanner(
        store,
        RetentionPolicy(expire_days=60),
        DiskPolicy(reserve_bytes=per_segment, floor_grace_seconds=0),
        free_bytes=volume(store, 2 * per_segment),
    )
    result = planner.enforce(NOW)
    assert result.tombstones == []
    assert [a.code for a in result.alarms] == [
        "disk_full_floor_reached",
        "disk_full_nothing_deletable",
    ]
    assert seqs(store, "cam-1") == [1, 2]


def test_the_floor_alarm_rearms_once_space_has_been_freed(store: SegmentStore) -> None:
    record(store, "cam-1", 1)
    per_segment = store.segments()[0].bytes
    size = {"volume": per_segment}
    planner = DiskPlanner(
        store,
        RetentionPolicy(),
        DiskPolicy(reserve_bytes=per_segment, floor_grace_seconds=600),
        free_bytes=lambda: size["volume"] - segment_bytes(store.data_dir),
    )
    assert planner.enforce(NOW).alarms and planner.floor_alarm_active
    size["volume"] = 10 * per_segment  # the NOC added a disk
    assert planner.enforce(NOW + 300).alarms == [] and not planner.floor_alarm_active
    size["volume"] = per_segment
    # a new emergency starts a new grace period: nothing deleted at NOW + 700
    assert [a.code for a in planner.enforce(NOW + 700).alarms] == ["disk_full_floor_reached"]
    assert planner.enforce(NOW + 700).tombstones == []


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A real 5 MiB tmpfs, so 'disk full' is the kernel's answer and not a number we made up."""
    mount_point = tmp_path / "volume"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_really_full_volume_is_freed_beyond_the_floor_first(small_volume: Path) -> None:
    data_dir = small_volume / "data"
    data_dir.mkdir()
    store = SegmentStore(data_dir, load_or_create_device_key(data_dir / "device_key.pem"), SITE)
    with contextlib.closing(store):
        old = [record(store, "cam-1", 40 - i, size=256 * KIB) for i in range(6)]
        young = [record(store, "cam-1", 6 - i, size=256 * KIB) for i in range(6)]
        policy = DiskPolicy(
            reserve_bytes=768 * KIB, target_free_bytes=1024 * KIB, ballast_bytes=256 * KIB
        )
        planner = DiskPlanner(store, RetentionPolicy(expire_days=60), policy)
        assert planner.ballast.stat().st_size == 256 * KIB
        # another tenant fills the volume to the last byte
        with contextlib.suppress(OSError), open(small_volume / "tenant", "wb") as fh:
            while True:
                fh.write(os.urandom(64 * KIB))
                fh.flush()
        assert shutil.disk_usage(small_volume).free == 0
        result = planner.enforce(NOW)
        # the tombstone could only be committed because the ballast was released first
        assert result.errors == [] and result.alarms == []
        assert {t.reason for t in result.tombstones} == {"disk_full"}
        assert shutil.disk_usage(small_volume).free >= 1024 * KIB
        removed = [p for p in old if not p.exists()]
        assert removed == old[: len(removed)] and len(removed) >= 4  # oldest first
        assert all(p.exists() for p in young)
        assert verify(data_dir).ok
