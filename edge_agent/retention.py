"""Retention and disk policy: how long footage stays, and what happens when the disk fills.

The retention floor is the law's minimum (30 days in the 2021 rules, configurable upward):
footage younger than the floor is kept. `Retention.expire` removes what is older than the
expiry age (the floor, unless a longer one is configured), oldest first, each camera's batch
behind one signed tombstone, and never a camera under legal hold.

`DiskPlanner` sizes storage from measured bitrates (Frigate's habit: measure, do not guess),
warns early, and when free space falls below the reserve it deletes, in this order:

1. segments beyond the retention floor, oldest first across cameras (tombstone `disk_full`);
2. only if that is not enough: it raises a critical alarm at once, and deletes the oldest
   footage inside the floor (tombstone `disk_full_inside_floor`, a critical alarm every time)
   only after `floor_grace_seconds` have passed with the disk still full. `None` refuses for
   good: recording then stops when the disk is physically full.

A full disk must not block its own cure: deleting writes a tombstone, and SQLite cannot commit
on a volume with no free byte. The planner keeps a ballast file (DATA/disk-ballast, default
64 MiB) and releases it when a removal fails for lack of space, then restores it once there is
room again: the same trick databases use to keep an emergency reserve.

Why delete inside the floor at all: a full disk stops recording on every camera, which breaks
the same rules (continuous recording) and loses what is happening now, the footage an ongoing
incident needs. The grace lets the NOC free space or swap the disk first; the tombstones keep
the loss provable. Cameras under legal hold are never touched, in either step.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from edge_agent.segment_chain import Tombstone
from edge_agent.segment_store import IndexedSegment, SegmentStore
from edge_agent.settings import LEGAL_MINIMUM_RETENTION_DAYS

log = logging.getLogger(__name__)

DAY = 86400.0
GIB = 1 << 30
BALLAST_NAME = "disk-ballast"
#: rows read per camera per pass; large backlogs (a box off for weeks) take several passes
_BATCH = 2000


@dataclass(frozen=True)
class RetentionPolicy:
    """The floor (kept at least) and the expiry age (removed after), in days."""

    floor_days: float = LEGAL_MINIMUM_RETENTION_DAYS
    #: None: expire as soon as footage is past the floor
    expire_days: float | None = None
    allow_below_legal_minimum: bool = False

    def __post_init__(self) -> None:
        if self.floor_days <= 0:
            raise ValueError(f"retention of {self.floor_days} days: must be more than 0")
        if self.floor_days < LEGAL_MINIMUM_RETENTION_DAYS:
            if not self.allow_below_legal_minimum:
                raise ValueError(
                    f"retention of {self.floor_days:g} days is below the legal minimum of "
                    f"{LEGAL_MINIMUM_RETENTION_DAYS}; allow it only on a test bench "
                    "(storage.allow_below_legal_minimum = true)"
                )
            log.warning(
                "retention floor %g days is BELOW the legal minimum of %d days",
                self.floor_days,
                LEGAL_MINIMUM_RETENTION_DAYS,
            )
        if self.expire_days is not None and self.expire_days < self.floor_days:
            raise ValueError(
                f"expiry after {self.expire_days:g} days would delete footage inside the "
                f"{self.floor_days:g}-day retention floor"
            )

    def floor_cutoff(self, now: float) -> float:
        """Segments that ended before this time are beyond the floor."""
        return now - self.floor_days * DAY

    def expiry_cutoff(self, now: float) -> float:
        """Segments that ended before this time are expired."""
        days = self.floor_days if self.expire_days is None else self.expire_days
        return now - days * DAY


@dataclass
class ExpiryReport:
    """What one `expire` pass removed, and which cameras a legal hold kept."""

    tombstones: list[Tombstone] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Retention:
    """Applies a RetentionPolicy to a SegmentStore; call `expire` periodically (hourly is ample)."""

    def __init__(self, store: SegmentStore, policy: RetentionPolicy) -> None:
        self.store = store
        self.policy = policy

    def expire(self, now: float) -> ExpiryReport:
        """Remove expired segments (oldest first, one signed tombstone per camera and pass)."""
        report = ExpiryReport()
        cutoff = self.policy.expiry_cutoff(now)
        while candidates := _unheld(
            self.store, self.store.expirable_prefix(cutoff, _BATCH), report
        ):
            for camera_id, segments in candidates.items():
                stone = _remove(self.store, camera_id, len(segments), "retention", report.errors)
                if stone is None:
                    return report  # an error was logged; try again next pass, never loop on it
                report.tombstones.append(stone)
        return report


@dataclass(frozen=True)
class DiskPolicy:
    """Thresholds of the disk planner (bytes, days, seconds)."""

    #: below this much free space the planner deletes (recording itself needs headroom)
    reserve_bytes: int = 2 * GIB
    #: once deleting beyond the floor, free up to this (hysteresis); None: 1.5 x reserve
    target_free_bytes: int | None = None
    #: warn when the disk holds fewer than floor + this many days at the measured bitrate
    warn_margin_days: float = 7.0
    #: bitrates are measured over segments that ended within this window
    rate_window_seconds: float = 6 * 3600.0
    #: seconds between the critical alarm and the first deletion inside the floor; None: never
    floor_grace_seconds: float | None = 600.0
    #: space held back in DATA/disk-ballast so a tombstone can be written on a full volume
    ballast_bytes: int = 64 * 1024 * 1024

    @property
    def target_free(self) -> int:
        return self.target_free_bytes or self.reserve_bytes * 3 // 2


@dataclass(frozen=True)
class DiskAlarm:
    """An alarm for the NOC: `message` is Vietnamese (shown to operators), `detail` English."""

    level: Literal["warning", "critical"]
    code: str
    message: str
    detail: str


@dataclass(frozen=True)
class CameraRate:
    """A camera's measured recording bitrate and what it has on disk."""

    camera_id: str
    bytes_per_second: float
    stored_bytes: int
    oldest_start: float | None


@dataclass(frozen=True)
class DiskForecast:
    """How long the disk lasts at measured bitrates, and whether it can hold the floor."""

    free_bytes: int
    stored_bytes: int
    bytes_per_second: float
    #: days until free space reaches the reserve (None: nothing is being recorded)
    days_until_full: float | None
    #: days of footage the disk can hold in total (segments + free - reserve)
    capacity_days: float | None
    floor_days: float
    cameras: list[CameraRate]
    alarms: list[DiskAlarm]


@dataclass
class DiskEnforcement:
    """What one `enforce` pass found and did."""

    free_before: int
    free_after: int
    tombstones: list[Tombstone] = field(default_factory=list)
    alarms: list[DiskAlarm] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class DiskPlanner:
    """Forecasts capacity and keeps free space above the reserve (see the module docstring).

    `free_bytes` probes free space (default: `shutil.disk_usage` of the data dir); tests pass
    their own. `on_alarm` is called the moment an alarm is raised, before any deletion it
    announces; the daemon publishes it as a disk event.
    """

    def __init__(
        self,
        store: SegmentStore,
        retention: RetentionPolicy,
        policy: DiskPolicy | None = None,
        *,
        free_bytes: Callable[[], int] | None = None,
        on_alarm: Callable[[DiskAlarm], None] | None = None,
    ) -> None:
        self.store = store
        self.retention = retention
        self.policy = policy or DiskPolicy()
        self._free = free_bytes or (lambda: shutil.disk_usage(store.data_dir).free)
        self._on_alarm = on_alarm
        #: when the "floor reached" alarm was raised; deletion inside the floor waits for grace
        self._floor_alarm_since: float | None = None
        self.ballast = store.data_dir / BALLAST_NAME
        self._restore_ballast()

    @property
    def floor_alarm_active(self) -> bool:
        """The "retention floor reached" alarm stands (cleared once free space is back)."""
        return self._floor_alarm_since is not None

    def forecast(self, now: float) -> DiskForecast:
        """Days of capacity from bitrates measured over the recent window."""
        window = self.store.segments(since=now - self.policy.rate_window_seconds)
        recorded: dict[str, tuple[int, float]] = {}
        for seg in window:
            size, seconds = recorded.get(seg.camera_id, (0, 0.0))
            recorded[seg.camera_id] = (size + seg.bytes, seconds + max(0.0, seg.end - seg.start))
        stored = self.store.stored_bytes_by_camera()
        cameras = [
            CameraRate(
                camera_id=cam,
                bytes_per_second=(recorded[cam][0] / recorded[cam][1])
                if cam in recorded and recorded[cam][1] > 0
                else 0.0,
                stored_bytes=stored.get(cam, (0, None))[0],
                oldest_start=stored.get(cam, (0, None))[1],
            )
            for cam in sorted(set(recorded) | set(stored))
        ]
        rate = sum(c.bytes_per_second for c in cameras)
        free = self._free()
        stored_total = sum(c.stored_bytes for c in cameras)
        days_until_full = capacity_days = None
        if rate > 0:
            days_until_full = max(0.0, free - self.policy.reserve_bytes) / rate / DAY
            capacity_days = max(0.0, stored_total + free - self.policy.reserve_bytes) / rate / DAY
        alarms = self._capacity_alarms(capacity_days, rate)
        return DiskForecast(
            free,
            stored_total,
            rate,
            days_until_full,
            capacity_days,
            self.retention.floor_days,
            cameras,
            alarms,
        )

    def enforce(self, now: float) -> DiskEnforcement:
        """Keep free space above the reserve: beyond the floor first, inside it last and loudly."""
        free = self._free()
        result = DiskEnforcement(free_before=free, free_after=free)
        if free >= self.policy.reserve_bytes:
            self._floor_alarm_since = None
            self._restore_ballast()
            return result
        floor_cutoff = self.retention.floor_cutoff(now)
        free = self._delete_oldest(floor_cutoff, self.policy.target_free, "disk_full", result)
        if free < self.policy.reserve_bytes:
            free = self._inside_floor(now, free, result)
        self._restore_ballast()
        result.free_after = self._free()
        return result

    # -- internals ---------------------------------------------------------------------------

    def _inside_floor(self, now: float, free: int, result: DiskEnforcement) -> int:
        grace = self.policy.floor_grace_seconds
        floor = self.retention.floor_days
        if self._floor_alarm_since is None:
            self._floor_alarm_since = now
            when = (
                "không bao giờ tự xoá (chính sách từ chối)"
                if grace is None
                else f"sẽ tự xoá dữ liệu cũ nhất sau {grace:.0f} giây"
            )
            self._alarm(
                result,
                "critical",
                "disk_full_floor_reached",
                f"Ổ đĩa đầy: đã xoá hết dữ liệu quá hạn lưu; dữ liệu trong {floor:g} ngày tối "
                f"thiểu theo quy định {when} nếu không giải phóng dung lượng.",
                f"disk full ({free} bytes free, reserve {self.policy.reserve_bytes}): nothing "
                f"left beyond the {floor:g}-day floor; "
                + (
                    "deletion inside the floor is refused"
                    if grace is None
                    else f"oldest footage inside it is deleted after {grace:.0f} s"
                ),
            )
        if grace is None or now - self._floor_alarm_since < grace:
            return free
        before = len(result.tombstones)
        free = self._delete_oldest(
            None, self.policy.reserve_bytes, "disk_full_inside_floor", result
        )
        removed = result.tombstones[before:]
        if removed:
            self._alarm(
                result,
                "critical",
                "disk_full_floor_breached",
                f"Đã xoá {sum(t.rows for t in removed)} đoạn ghi hình còn trong thời hạn lưu "
                f"tối thiểu {floor:g} ngày vì ổ đĩa đầy.",
                "deleted footage inside the retention floor: "
                + ", ".join(f"{t.camera_id} seq {t.first_seq}-{t.last_seq}" for t in removed),
            )
        if free < self.policy.reserve_bytes:
            self._alarm(
                result,
                "critical",
                "disk_full_nothing_deletable",
                "Ổ đĩa đầy và không còn dữ liệu nào xoá được (dữ liệu đang được giữ theo yêu cầu "
                "pháp lý, hoặc lỗi khi xoá): việc ghi hình sẽ dừng khi ổ đĩa hết chỗ.",
                f"disk still full ({free} bytes free) and nothing else may be deleted",
            )
        return free

    def _delete_oldest(
        self, cutoff: float | None, target: int, reason: str, result: DiskEnforcement
    ) -> int:
        """Delete oldest-first across unheld cameras until `target` bytes are free."""
        free = self._free()
        while free < target:
            limit = float("inf") if cutoff is None else cutoff
            expiry = ExpiryReport()
            candidates = _unheld(self.store, self.store.expirable_prefix(limit, _BATCH), expiry)
            if not candidates:
                break
            counts = _oldest_first(candidates, target - free)
            progressed = False
            for camera_id, count in counts.items():
                stone = _remove(
                    self.store, camera_id, count, reason, result.errors, self._release_ballast
                )
                if stone is not None:
                    result.tombstones.append(stone)
                    progressed = True
            if not progressed:
                break
            free = self._free()
        return free

    def _release_ballast(self) -> bool:
        try:
            self.ballast.unlink()
        except FileNotFoundError:
            return False
        log.warning("volume full: released the %s file to write tombstones", BALLAST_NAME)
        return True

    def _restore_ballast(self) -> None:
        """(Re)create the ballast when it fits without pushing free space below the target."""
        size = self.policy.ballast_bytes
        if size <= 0 or self.ballast.exists() or self._free() < self.policy.target_free + size:
            return
        try:
            fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        try:
            try:
                os.posix_fallocate(fd, 0, size)  # real blocks, not a sparse file
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                block = bytes(1 << 20)
                for offset in range(0, size, len(block)):
                    os.write(fd, block[: size - offset])
        except OSError:
            log.warning("could not create %s; a full volume may block tombstones", self.ballast)
            os.close(fd)
            fd = -1
            with contextlib.suppress(FileNotFoundError):
                self.ballast.unlink()
        finally:
            if fd >= 0:
                os.close(fd)

    def _capacity_alarms(self, capacity_days: float | None, rate: float) -> list[DiskAlarm]:
        if capacity_days is None:
            return []
        floor = self.retention.floor_days
        mbit = rate * 8 / 1e6
        if capacity_days < floor:
            return [
                DiskAlarm(
                    "critical",
                    "capacity_below_floor",
                    f"Ổ đĩa chỉ chứa được {capacity_days:.1f} ngày ghi hình với tốc độ hiện tại "
                    f"({mbit:.1f} Mbit/s), ít hơn {floor:g} ngày tối thiểu theo quy định.",
                    f"disk holds {capacity_days:.1f} days at {mbit:.1f} Mbit/s, "
                    f"below the {floor:g}-day floor",
                )
            ]
        if capacity_days < floor + self.policy.warn_margin_days:
            return [
                DiskAlarm(
                    "warning",
                    "capacity_low",
                    f"Ổ đĩa chỉ dư {capacity_days - floor:.1f} ngày so với thời hạn lưu "
                    f"{floor:g} ngày ({mbit:.1f} Mbit/s): cần thêm dung lượng.",
                    f"disk holds {capacity_days:.1f} days at {mbit:.1f} Mbit/s, within "
                    f"{self.policy.warn_margin_days:g} days of the {floor:g}-day floor",
                )
            ]
        return []

    def _alarm(
        self,
        result: DiskEnforcement,
        level: Literal["warning", "critical"],
        code: str,
        message: str,
        detail: str,
    ) -> None:
        alarm = DiskAlarm(level, code, message, detail)
        (log.critical if level == "critical" else log.warning)("%s: %s", code, detail)
        result.alarms.append(alarm)
        if self._on_alarm is not None:
            self._on_alarm(alarm)


def _unheld(
    store: SegmentStore, candidates: dict[str, list[IndexedSegment]], report: ExpiryReport
) -> dict[str, list[IndexedSegment]]:
    """Drop cameras under legal hold (noting them in `report.held`)."""
    kept: dict[str, list[IndexedSegment]] = {}
    for camera_id, segments in candidates.items():
        if store.is_held(camera_id):
            if camera_id not in report.held:
                report.held.append(camera_id)
        else:
            kept[camera_id] = segments
    return kept


def _oldest_first(candidates: dict[str, list[IndexedSegment]], needed: int) -> dict[str, int]:
    """How many of each camera's oldest segments free `needed` bytes, oldest across cameras."""
    merged = sorted(
        (seg for segments in candidates.values() for seg in segments),
        key=lambda s: (s.start, s.camera_id, s.seq),
    )
    counts: dict[str, int] = {}
    freed = 0
    for seg in merged:
        if freed >= needed:
            break
        counts[seg.camera_id] = counts.get(seg.camera_id, 0) + 1
        freed += seg.bytes
    return counts


def _remove(
    store: SegmentStore,
    camera_id: str,
    count: int,
    reason: str,
    errors: list[str],
    on_disk_full: Callable[[], bool] | None = None,
) -> Tombstone | None:
    """One camera's removal; a failure is logged and reported, never stops other cameras.

    If the volume is too full to commit the tombstone, `on_disk_full` may make room (it
    returns True if it did) and the removal is tried once more.
    """
    for attempt in (1, 2):
        try:
            return store.remove_oldest(camera_id, count, reason)
        except Exception as exc:
            if attempt == 1 and on_disk_full is not None and _is_disk_full(exc) and on_disk_full():
                continue
            log.exception("%s: removing %d segments (%s) failed", camera_id, count, reason)
            errors.append(f"{camera_id}: {exc}")
    return None


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC
