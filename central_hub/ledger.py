"""The outage ledger: how events turn into outage rows, one camera or site at a time.

Pure Python over in-memory records; the ingest's writer (`central_hub.ingest`) loads the rows of
a batch's sites, runs these transitions, and writes the result in the same transaction.

**What is an outage.** A camera is *out* while at least one of its conditions holds:

- its stream is down (`camera_down` … `camera_up`), kind `camera_down`;
- recording has stopped (`gap_opened` … `gap_closed`), kind `recording_gap`; footage is lost;
- an image fault that makes the camera useless for watching is active (`image_fault`); by
  default `black`, `covered` and `moved` (the area is not watched although video flows).
  `blurred` and `frozen` only make the camera *degraded*: a genuinely static scene also looks
  frozen (FIELD-NOTES) and a blurred picture still shows people. The set is configurable
  (`status.outage_image_faults`).

Overlapping conditions make **one** outage: it starts when the first condition starts, ends when
the last one clears, and takes its kind and cause from the condition that opened it. So a
camera's outages never overlap, which lets uptime be summed in SQL without a union of
intervals. `footage_lost` is set as soon as a recording gap touches the outage, and
`footage_lost_s` adds up the closed gaps' lengths (from the edge's gap ledger).

A **site** is out from its death (the broker's will or a clean shutdown, `bdseq` matching the
current birth) until its next birth; its outages never overlap either. A site outage does not
open camera outages: the edge keeps recording through an uplink failure, and its spooled events
tell, on reconnection, what really happened to each camera. Uptime (`central_hub.queries`)
counts a camera as down during its own outages and its site's outages, counting overlaps once.

**Late events.** An event older than the last one applied to a camera (it filled a seq hole, or
another hub instance held it) does not change the camera's current state; only the two events
that carry a whole interval add history: `camera_up` with `down_since` and `gap_closed`. The
writer inserts such an interval as a closed outage, or marks footage lost on the outage that
already covers it.

**Health.** A health sample newer than a camera's last event may *clear* a stuck condition
(the edge says connected and recording while the hub still believes it down: the clearing
event was lost). It never opens one; events do. The outage then ends with reason `health`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from central_hub.status import CameraStatus, OutageKind

#: Image faults that count as an outage unless the config says otherwise.
DEFAULT_OUTAGE_IMAGE_FAULTS: Final = frozenset({"black", "covered", "moved"})

#: Inventory states in which the edge does not record the camera: not monitored, no outage.
UNMONITORED_STATES: Final = frozenset({"disabled", "ineligible"})


@dataclass(frozen=True)
class LedgerPolicy:
    """What counts as an outage (from the hub config)."""

    outage_image_faults: frozenset[str] = DEFAULT_OUTAGE_IMAGE_FAULTS


@dataclass(slots=True)
class OutageRecord:
    """One row of `outages`; `id` is None until the writer inserts it."""

    site_id: str
    camera_id: str | None
    kind: OutageKind
    cause: str
    started_at: float
    ended_at: float | None = None
    end_reason: str | None = None
    footage_lost: bool = False
    footage_lost_s: float = 0.0
    id: int | None = None
    changed: bool = False

    def row(self) -> dict[str, Any]:
        """Column values for an insert (without `id`)."""
        return {
            "site_id": self.site_id,
            "camera_id": self.camera_id,
            "kind": self.kind,
            "cause": self.cause,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "end_reason": self.end_reason,
            "footage_lost": self.footage_lost,
            "footage_lost_s": self.footage_lost_s,
        }

    def overlaps(self, start: float, end: float) -> bool:
        stop = self.ended_at if self.ended_at is not None else float("inf")
        return self.started_at < end and start < stop


@dataclass(slots=True)
class CameraRecord:
    """In-memory copy of one `cameras` row while a batch is applied."""

    site_id: str
    camera_id: str
    first_seen: float
    updated_at: float
    name: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    codec: str | None = None
    resolution: str | None = None
    inv_state: str | None = None
    in_inventory: bool | None = None
    status: CameraStatus = "ok"
    removed_at: float | None = None
    down_since: float | None = None
    down_cause: str | None = None
    gap_since: float | None = None
    gap_cause: str | None = None
    image_faults: frozenset[str] = frozenset()
    image_since: float | None = None
    outage_since: float | None = None
    last_event_epoch: int = 0
    last_event_seq: int = 0
    last_event_ts: float | None = None
    chain_segment_seq: int | None = None
    chain_row_hash: str | None = None
    chain_time: float | None = None
    dirty: bool = False

    @classmethod
    def from_row(cls, m: Any) -> CameraRecord:
        faults = m["image_faults"]
        return cls(
            site_id=m["site_id"],
            camera_id=m["camera_id"],
            first_seen=m["first_seen"],
            updated_at=m["updated_at"],
            name=m["name"],
            manufacturer=m["manufacturer"],
            model=m["model"],
            codec=m["codec"],
            resolution=m["resolution"],
            inv_state=m["inv_state"],
            in_inventory=m["in_inventory"],
            status=m["status"],
            removed_at=m["removed_at"],
            down_since=m["down_since"],
            down_cause=m["down_cause"],
            gap_since=m["gap_since"],
            gap_cause=m["gap_cause"],
            image_faults=frozenset(faults.split(",")) if faults else frozenset(),
            image_since=m["image_since"],
            outage_since=m["outage_since"],
            last_event_epoch=m["last_event_epoch"],
            last_event_seq=m["last_event_seq"],
            last_event_ts=m["last_event_ts"],
            chain_segment_seq=m["chain_segment_seq"],
            chain_row_hash=m["chain_row_hash"],
            chain_time=m["chain_time"],
        )

    def row(self) -> dict[str, Any]:
        """Every column of `cameras` (for the writer's upsert)."""
        return {
            "site_id": self.site_id,
            "camera_id": self.camera_id,
            "name": self.name,
            "manufacturer": self.manufacturer,
            "model": self.model,
            "codec": self.codec,
            "resolution": self.resolution,
            "inv_state": self.inv_state,
            "in_inventory": self.in_inventory,
            "status": self.status,
            "first_seen": self.first_seen,
            "removed_at": self.removed_at,
            "updated_at": self.updated_at,
            "down_since": self.down_since,
            "down_cause": self.down_cause,
            "gap_since": self.gap_since,
            "gap_cause": self.gap_cause,
            "image_faults": ",".join(sorted(self.image_faults)),
            "image_since": self.image_since,
            "outage_since": self.outage_since,
            "last_event_epoch": self.last_event_epoch,
            "last_event_seq": self.last_event_seq,
            "last_event_ts": self.last_event_ts,
            "chain_segment_seq": self.chain_segment_seq,
            "chain_row_hash": self.chain_row_hash,
            "chain_time": self.chain_time,
        }

    @property
    def monitored(self) -> bool:
        """The edge records this camera (so its outages count)."""
        return self.in_inventory is not False and self.inv_state not in UNMONITORED_STATES

    def outage_conditions(self, policy: LedgerPolicy) -> list[tuple[float, OutageKind, str]]:
        """Active conditions that make an outage, as (since, kind, cause), earliest first."""
        found: list[tuple[float, OutageKind, str]] = []
        if self.down_since is not None:
            found.append((self.down_since, "camera_down", self.down_cause or "error"))
        if self.gap_since is not None:
            found.append((self.gap_since, "recording_gap", self.gap_cause or "error"))
        counted = sorted(self.image_faults & policy.outage_image_faults)
        if counted and self.image_since is not None:
            found.append((self.image_since, "image_fault", counted[0]))
        found.sort(key=lambda c: c[0])
        return found

    def degraded_faults(self, policy: LedgerPolicy) -> frozenset[str]:
        return self.image_faults - policy.outage_image_faults


@dataclass
class OutageBook:
    """The open outages of a batch's sites, and every outage the batch creates or changes."""

    open_by_key: dict[tuple[str, str | None], OutageRecord] = field(default_factory=dict)
    new: list[OutageRecord] = field(default_factory=list)
    #: Outages that existed before the batch and were changed by it.
    touched: dict[int, OutageRecord] = field(default_factory=dict)
    #: (record, "opened" | "closed") in the order they happened, for alerts.
    transitions: list[tuple[OutageRecord, str]] = field(default_factory=list)

    @classmethod
    def from_open(cls, records: Iterable[OutageRecord]) -> OutageBook:
        book = cls()
        for r in records:
            key = (r.site_id, r.camera_id)
            # Should a database ever hold two open outages for one key (edited by hand), the
            # earliest stays current and the later one is left for the operator to see.
            if key not in book.open_by_key or r.started_at < book.open_by_key[key].started_at:
                book.open_by_key[key] = r
        return book

    def current(self, site_id: str, camera_id: str | None) -> OutageRecord | None:
        return self.open_by_key.get((site_id, camera_id))

    def open(
        self, site_id: str, camera_id: str | None, kind: OutageKind, cause: str, start: float
    ) -> OutageRecord:
        rec = OutageRecord(site_id, camera_id, kind, cause, start)
        self.open_by_key[(site_id, camera_id)] = rec
        self.new.append(rec)
        self.transitions.append((rec, "opened"))
        return rec

    def close(
        self, site_id: str, camera_id: str | None, end: float, reason: str
    ) -> OutageRecord | None:
        rec = self.open_by_key.pop((site_id, camera_id), None)
        if rec is None:
            return None
        rec.ended_at = max(end, rec.started_at)
        rec.end_reason = reason
        self.mark(rec)
        self.transitions.append((rec, "closed"))
        return rec

    def add_closed(self, rec: OutageRecord) -> None:
        """A historical outage learnt late (already over when the hub heard of it)."""
        self.new.append(rec)
        self.transitions.append((rec, "recorded"))

    def mark(self, rec: OutageRecord) -> None:
        """Remember that an existing outage changed (new ones are inserted whole)."""
        if rec.id is not None:
            rec.changed = True
            self.touched[rec.id] = rec

    def camera_outages(self, site_id: str, camera_id: str) -> list[OutageRecord]:
        """Outages of this camera created by this batch (for overlap checks)."""
        return [r for r in self.new if r.site_id == site_id and r.camera_id == camera_id]


# --- camera transitions -------------------------------------------------------------------


def reconcile(
    cam: CameraRecord, at: float, book: OutageBook, policy: LedgerPolicy, reason: str
) -> None:
    """Open or close the camera's outage to match its conditions, and refresh its status."""
    conditions = cam.outage_conditions(policy) if cam.monitored else []
    cur = book.current(cam.site_id, cam.camera_id)
    if conditions and cur is None:
        since, kind, cause = conditions[0]
        cur = book.open(cam.site_id, cam.camera_id, kind, cause, since)
        if cam.gap_since is not None:
            cur.footage_lost = True
    elif not conditions and cur is not None:
        book.close(cam.site_id, cam.camera_id, at, reason)
        cur = None
    elif conditions and cur is not None and conditions[0][0] < cur.started_at:
        # A condition that started earlier joined (a gap whose last recorded packet precedes
        # the stream's failure): the outage is the union, so it starts with it.
        cur.started_at = conditions[0][0]
        book.mark(cur)
    cam.outage_since = cur.started_at if cur is not None else None
    cam.status = camera_status(cam, policy)
    cam.dirty = True


def camera_status(cam: CameraRecord, policy: LedgerPolicy) -> CameraStatus:
    """The board's word for the camera now (see `central_hub.status.CAMERA_STATUSES`)."""
    if cam.in_inventory is False:
        return "removed"
    if cam.inv_state in UNMONITORED_STATES:
        return "unmonitored"
    if cam.outage_since is not None:
        return "down"
    if cam.degraded_faults(policy):
        return "degraded"
    return "ok"


def camera_down(
    cam: CameraRecord, at: float, cause: str, book: OutageBook, policy: LedgerPolicy
) -> None:
    if cam.down_since is None:
        cam.down_since, cam.down_cause = at, cause
    reconcile(cam, at, book, policy, "event")


def camera_up(cam: CameraRecord, at: float, book: OutageBook, policy: LedgerPolicy) -> bool:
    """Clear the stream condition; False when none was set (the caller may then record the
    `down_since` interval as history)."""
    if cam.down_since is None:
        return False
    cam.down_since = cam.down_cause = None
    reconcile(cam, at, book, policy, "event")
    return True


def gap_opened(
    cam: CameraRecord, start: float, cause: str, book: OutageBook, policy: LedgerPolicy
) -> None:
    if cam.gap_since is None:
        cam.gap_since, cam.gap_cause = start, cause
    reconcile(cam, start, book, policy, "event")
    cur = book.current(cam.site_id, cam.camera_id)
    if cur is not None and not cur.footage_lost:
        cur.footage_lost = True
        book.mark(cur)


def gap_closed(
    cam: CameraRecord,
    start: float,
    end: float,
    book: OutageBook,
    policy: LedgerPolicy,
) -> bool:
    """Close the recording condition; False when no gap was open (history for the caller)."""
    if cam.gap_since is None:
        return False
    cur = book.current(cam.site_id, cam.camera_id)
    if cur is not None:
        cur.footage_lost = True
        cur.footage_lost_s += max(0.0, end - start)
        book.mark(cur)
    cam.gap_since = cam.gap_cause = None
    reconcile(cam, end, book, policy, "event")
    return True


def image_fault(
    cam: CameraRecord,
    fault: str,
    active: bool,
    at: float,
    book: OutageBook,
    policy: LedgerPolicy,
) -> None:
    before = cam.image_faults
    after = before | {fault} if active else before - {fault}
    if after != before:
        cam.image_faults = frozenset(after)
        _image_since(cam, before, at, policy)
    reconcile(cam, at, book, policy, "event")


def _image_since(
    cam: CameraRecord, before: frozenset[str], at: float, policy: LedgerPolicy
) -> None:
    """`image_since` is the start of the *counted* image faults; a second counted fault keeps
    the original start (same outage), degraded-only faults have none."""
    counted_before = before & policy.outage_image_faults
    counted_after = cam.image_faults & policy.outage_image_faults
    if counted_after and not counted_before:
        cam.image_since = at
    elif not counted_after:
        cam.image_since = None


def set_monitoring(
    cam: CameraRecord,
    in_inventory: bool,
    inv_state: str | None,
    at: float,
    book: OutageBook,
    policy: LedgerPolicy,
) -> None:
    """Apply the inventory's word; a camera that left it (or is no longer recorded) has its
    conditions cleared and its outage closed (reason `removed` / `unmonitored`)."""
    cam.in_inventory = in_inventory
    cam.inv_state = inv_state
    if not cam.monitored:
        if cam.removed_at is None and not in_inventory:
            cam.removed_at = at
        cam.down_since = cam.down_cause = cam.gap_since = cam.gap_cause = None
        cam.image_faults, cam.image_since = frozenset(), None
        reason = "removed" if not in_inventory else "unmonitored"
        reconcile(cam, at, book, policy, reason)
    else:
        cam.removed_at = None
        reconcile(cam, at, book, policy, "event")


def health_clears(
    cam: CameraRecord,
    sample_ts: float,
    connected: bool,
    recording: str,
    gap_since: float | None,
    faults: Iterable[str] | None,
    book: OutageBook,
    policy: LedgerPolicy,
) -> bool:
    """Clear conditions that a newer health sample contradicts; True if anything changed."""
    if cam.last_event_ts is not None and sample_ts <= cam.last_event_ts:
        return False
    changed = False
    if cam.down_since is not None and connected and sample_ts > cam.down_since:
        cam.down_since = cam.down_cause = None
        changed = True
    if (
        cam.gap_since is not None
        and gap_since is None
        and recording == "recording"
        and sample_ts > cam.gap_since
    ):
        cam.gap_since = cam.gap_cause = None
        changed = True
    if faults is not None and cam.image_faults:
        since = cam.image_since if cam.image_since is not None else cam.last_event_ts or 0.0
        still = cam.image_faults & frozenset(faults)
        if still != cam.image_faults and sample_ts > since:
            before = cam.image_faults
            cam.image_faults = still
            _image_since(cam, before, sample_ts, policy)
            changed = True
    if changed:
        reconcile(cam, sample_ts, book, policy, "health")
    return changed
