"""Ingest: every message from every site, validated, de-duplicated and written in batches.

Pipeline (one hub process and its MQTT receiver process)::

    Mosquitto ──$share/<group>/isocam/v1/+/<kind>──> receiver process (gmqtt, MQTT 5)
        │  chunks of raw (topic, payload) over a pipe; nothing parsed there
        ▼  (central_hub.mqtt_receiver)
    `_accept()`: topic → size → JSON → schema (sitelink) → enrolled, enabled site?
        │  rejects are counted per reason (`IngestCounters`) and logged, rate-limited
        ▼
    pending batch (≤ batch_max_messages, ≤ batch_max_delay) ──> writer thread
        │  `BatchWriter.apply()`: one transaction; site rows locked (PostgreSQL) in site-id
        │  order so hub instances sharing a site serialise instead of racing
        ▼
    commit ──> acknowledge the batch (one "ack through" to the receiver) ──> publish alerts

**Acknowledged after commit.** The receiver sends a message's PUBACK only once the hub says
its batch is committed, so a hub that crashes or loses its database loses nothing: the broker
redelivers to the same persistent session, and the (site, seq) key drops what was already
stored. The broker's in-flight window is the client's MQTT 5 Receive Maximum
(`mqtt.receive_maximum`): that, not a queue here, bounds the hub's memory, and a slow database
pushes back on the broker instead of growing a buffer.

**Why the connection lives in another process.** Python MQTT clients spend 14–35 µs of
interpreter time on each message (gmqtt, paho; measured), the hub's validation and write
about 40 µs: in one process, under one GIL, the ingest topped out near 9–12k events/s, while
the write path alone does 20k+. With the connection in a child the two overlap on two cores;
see central_hub/mqtt_receiver.py for the protocol and why a child never outlives its
connection (an acknowledgement can never reach the wrong one).

**Writes** go through SQLAlchemy Core with dialect upserts (`INSERT … ON CONFLICT`), multi-row
VALUES (SQLAlchemy's insertmanyvalues) and one writer thread per process: SQLite allows one
writer anyway, and PostgreSQL gets its parallelism from several hub instances.

**The database is down**: the batch is retried with backoff, forever; nothing is acknowledged
meanwhile, so the broker holds the messages. **A batch fails for another reason** (a bug, a
constraint): it is split into single messages, each in its own transaction, and the ones that
still fail are counted as `store_error` and acknowledged, so one poison message cannot stall a
hub.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import operator
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from central_hub.alerts import Alert, AlertHub, WebhookSender, duration_text, make_alert
from central_hub.db import Database, dialect_insert
from central_hub.hub_config import HubConfig, IngestConfig, MqttConfig, StatusConfig
from central_hub.ledger import (
    CameraRecord,
    LedgerPolicy,
    OutageBook,
    OutageRecord,
    camera_down,
    camera_up,
    gap_closed,
    gap_opened,
    health_clears,
    image_fault,
    set_monitoring,
)
from central_hub.mqtt_receiver import ReceiverError, ReceiverProcess, ReceiverSettings
from central_hub.rollup import mark_dirty, outage_changes, run_rollup
from central_hub.signatures import SignatureChecker, SignatureCounters
from central_hub.sites import SiteAttrs, sites
from central_hub.status import (
    camera_health,
    camera_thumbnails,
    cameras,
    events,
    missing_seq,
    outages,
    prune_events,
    site_state,
    ticket_notes,
    tickets,
)
from sitelink.messages import (
    REASONS,
    AgentStarted,
    Alarm,
    CameraDown,
    CameraUp,
    ChainHead,
    ClockEvent,
    CommandReply,
    DiskEvent,
    EventBase,
    GapClosed,
    GapOpened,
    Health,
    ImageFaultEvent,
    Inventory,
    Message,
    MessageError,
    RetentionEvent,
    StateBirth,
    StateDeath,
    decode_delivery,
)
from sitelink.topics import Kind, hub_subscriptions, topic

log = logging.getLogger(__name__)

#: Reject reasons: sitelink's (`sitelink.messages.REASONS`) and the hub's own.
REJECT_REASONS: Final[dict[str, str]] = {
    **cast(dict[str, str], REASONS),
    "unknown_site": "the topic's site id is not enrolled at this hub",
    "disabled_site": "the topic's site id is enrolled but disabled",
    "store_error": "could not be processed or written, even on its own (logged with the cause)",
}

#: How often the ingest checkpoints an SQLite database's WAL (`Ingest._checkpoint_loop`).
CHECKPOINT_INTERVAL_S: Final = 1.0

ACCEPTED_KINDS: Final = tuple(k.value for k in Kind if k is not Kind.CMD)


# --- counters -------------------------------------------------------------------------------


@dataclass
class IngestCounters:
    """Monotonic counters of one ingest (for logs, tests and Prometheus).

    Updated only on the event loop's thread (the writer returns its counts with each batch).
    """

    received: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))
    accepted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ACCEPTED_KINDS, 0))
    #: Events stored (new (site, seq)).
    stored_events: int = 0
    #: Events already stored (redelivered, replayed) and dropped.
    duplicates: int = 0
    #: Events that filled a hole in a site's sequence.
    late_events: int = 0
    #: Sequence numbers found missing (sum of hole sizes).
    missing_seqs: int = 0
    #: Deaths whose bdseq did not match the current birth, and births older than the current.
    stale_states: int = 0
    #: Inventories and health samples older than the one already applied.
    stale_samples: int = 0
    #: Messages acknowledged to the broker.
    acked: int = 0
    batches: int = 0
    batch_seconds: float = 0.0
    db_retries: int = 0
    #: MQTT connections made (subscribed); more than one means the connection was lost.
    connections: int = 0
    #: SQLite checkpoints run by the ingest (`Database.checkpoint`) that found frames.
    checkpoints: int = 0

    def snapshot(self) -> dict[str, Any]:
        """A copy safe to hand to another thread or serialise."""
        return {
            "received": self.received,
            "rejected": dict(self.rejected),
            "accepted": dict(self.accepted),
            "stored_events": self.stored_events,
            "duplicates": self.duplicates,
            "late_events": self.late_events,
            "missing_seqs": self.missing_seqs,
            "stale_states": self.stale_states,
            "stale_samples": self.stale_samples,
            "acked": self.acked,
            "batches": self.batches,
            "batch_seconds": self.batch_seconds,
            "db_retries": self.db_retries,
            "connections": self.connections,
            "checkpoints": self.checkpoints,
        }

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


class IngestCollector:
    """A prometheus_client collector over `IngestCounters` (register it on a registry)."""

    def __init__(self, counters: IngestCounters) -> None:
        self._c = counters

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        c = self._c
        rejected = CounterMetricFamily(
            "isocam_hub_ingest_rejected", "Messages rejected, by reason", labels=["reason"]
        )
        for reason, n in c.rejected.items():
            rejected.add_metric([reason], n)
        yield rejected
        accepted = CounterMetricFamily(
            "isocam_hub_ingest_accepted", "Messages accepted, by topic kind", labels=["kind"]
        )
        for kind, n in c.accepted.items():
            accepted.add_metric([kind], n)
        yield accepted
        for name, value, doc in (
            ("received", c.received, "Messages received from the broker"),
            ("stored_events", c.stored_events, "Events stored"),
            ("duplicate_events", c.duplicates, "Duplicate events dropped"),
            ("late_events", c.late_events, "Events that filled a sequence hole"),
            ("missing_seqs", c.missing_seqs, "Sequence numbers found missing"),
            ("stale_states", c.stale_states, "Stale births/deaths ignored"),
            ("batches", c.batches, "Batches written"),
            ("batch_seconds", c.batch_seconds, "Seconds spent writing batches"),
            ("db_retries", c.db_retries, "Batches retried after a database error"),
            ("connections", c.connections, "MQTT connections made (subscribed)"),
        ):
            yield CounterMetricFamily(f"isocam_hub_ingest_{name}", doc, value=value)


class RateLimitedLog:
    """At most one line per key and interval; says how many were suppressed in between."""

    def __init__(self, logger: logging.Logger, interval_s: float) -> None:
        self._log = logger
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = defaultdict(int)

    def warning(self, key: str, message: str) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] += 1
            return
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        suffix = f" ({n} more {key} since the last line)" if n else ""
        self._log.warning("%s%s", message, suffix)


# --- sites ----------------------------------------------------------------------------------


class SiteEntry(NamedTuple):
    attrs: SiteAttrs
    name: str


class SiteDirectory:
    """The enrolled sites, in memory: the ingest checks every message's site against it.

    Re-read every `sites_refresh_seconds` (2,000 rows: ~5 ms); `refresh()` may be called at
    any time (e.g. right after `central-hub sites add`). Replaced whole, so readers on the
    event loop never see a half-built dict.
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._sites: dict[str, SiteEntry] = {}

    def refresh(self) -> list[str]:
        """Reload; returns the ids that are enabled now and were not before."""
        with self._db.engine.connect() as conn:
            rows = conn.execute(sa.select(sites)).all()
        fresh = {r.site_id: SiteEntry(SiteAttrs.from_row(r), r.name or "") for r in rows}
        old = self._sites
        self._sites = fresh
        return [
            sid
            for sid, e in fresh.items()
            if e.attrs.enabled and (sid not in old or not old[sid].attrs.enabled)
        ]

    def get(self, site_id: str) -> SiteEntry | None:
        return self._sites.get(site_id)

    def __len__(self) -> int:
        return len(self._sites)


# --- the writer -----------------------------------------------------------------------------


class Accepted(NamedTuple):
    """A valid message from an enabled site, waiting for its batch."""

    site_id: str
    kind: Kind
    message: Message
    payload: bytes
    received_at: float


@dataclass
class BatchResult:
    """What one batch did (the loop thread folds it into the counters and alerts)."""

    stored_events: int = 0
    duplicates: int = 0
    late_events: int = 0
    missing_seqs: int = 0
    stale_states: int = 0
    stale_samples: int = 0
    alerts: list[Alert] = field(default_factory=list)

    def add(self, other: BatchResult) -> None:
        self.stored_events += other.stored_events
        self.duplicates += other.duplicates
        self.late_events += other.late_events
        self.missing_seqs += other.missing_seqs
        self.stale_states += other.stale_states
        self.stale_samples += other.stale_samples
        self.alerts.extend(other.alerts)


def upsert(conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """Insert `rows` (all with the same keys), replacing every non-key column on conflict."""
    if not rows:
        return
    columns = tuple(rows[0])
    sql = _statement(
        conn, ("upsert", table.name, columns), lambda: _upsert_stmt(conn, table, columns)
    )
    executemany(conn, sql, rows)


def insert_ignore(conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """Insert `rows` (all with the same keys), skipping those whose primary key exists."""
    if not rows:
        return
    columns = tuple(rows[0])

    def build() -> Any:
        keys = [c.name for c in table.primary_key.columns]
        return dialect_insert(conn, table).on_conflict_do_nothing(index_elements=keys)

    executemany(conn, _statement(conn, ("ignore", table.name, columns), build), rows)


def _upsert_stmt(conn: Connection, table: sa.Table, columns: tuple[str, ...]) -> Any:
    stmt = dialect_insert(conn, table)
    keys = [c.name for c in table.primary_key.columns]
    return stmt.on_conflict_do_update(
        index_elements=keys, set_={c: stmt.excluded[c] for c in columns if c not in keys}
    )


class _Compiled(NamedTuple):
    stmt: Any
    sql: str | None
    #: A row dict to the driver's parameter tuple, in the compiled statement's order.
    row_of: Callable[[dict[str, Any]], tuple[Any, ...]]


_COMPILED: dict[tuple[Any, ...], _Compiled] = {}


def _statement(conn: Connection, key: tuple[Any, ...], build: Callable[[], Any]) -> _Compiled:
    """The statement for `key`, built and (on SQLite) compiled once per process."""
    full_key = (conn.dialect.name, *key)
    found = _COMPILED.get(full_key)
    if found is None:
        stmt = build()
        columns = key[2]
        if conn.dialect.name == "sqlite":
            kind = key[0]
            keys = None if kind == "update" else list(columns)
            compiled = stmt.compile(dialect=conn.dialect, column_keys=keys)
            found = _Compiled(stmt, str(compiled), _tuple_getter(compiled.positiontup or ()))
        else:
            found = _Compiled(stmt, None, _tuple_getter(()))
        _COMPILED[full_key] = found
    return found


def _tuple_getter(keys: Sequence[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """`operator.itemgetter` that always returns a tuple (it returns a bare value for one key)."""
    if not keys:
        return lambda row: ()
    if len(keys) == 1:
        key = keys[0]
        return lambda row: (row[key],)
    return cast(Callable[[dict[str, Any]], tuple[Any, ...]], operator.itemgetter(*keys))


def update_changed(
    conn: Connection,
    table: sa.Table,
    changes: list[tuple[dict[str, Any], dict[str, Any]]],
) -> None:
    """UPDATE only what changed: `changes` holds (primary key values, changed columns) pairs;
    rows changing the same columns go in one executemany. A site's row in a batch of events
    usually changes 3 of its 45 columns."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for key, values in changes:
        if values:
            cols = tuple(sorted(values))
            groups[cols].append({**{f"k_{k}": v for k, v in key.items()}, **values})
    pk = [c.name for c in table.primary_key.columns]
    for cols, rows in groups.items():

        def build(cols: tuple[str, ...] = cols) -> Any:
            return (
                table.update()
                .where(*[table.c[k] == sa.bindparam(f"k_{k}") for k in pk])
                .values({c: sa.bindparam(c) for c in cols})
            )

        executemany(conn, _statement(conn, ("update", table.name, cols), build), rows)


def _changed(saved: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if saved.get(k) != v}


def executemany(conn: Connection, c: _Compiled, rows: list[dict[str, Any]]) -> None:
    """Run a compiled insert for many rows.

    On SQLite the rows go to the driver's `executemany` as tuples: SQLAlchemy's per-row
    parameter processing (~7 µs a row) was a third of the writer's time at 20,000 events/s.
    On PostgreSQL SQLAlchemy's insertmanyvalues (multi-row VALUES) is the fast path already.
    """
    if c.sql is None:
        conn.execute(c.stmt, rows)
        return
    row_of = c.row_of
    conn.exec_driver_sql(c.sql, [row_of(r) for r in rows])


def site_rag(st: dict[str, Any]) -> str:
    """Red / amber / green of a site from its `site_state` row (docs/hub.md)."""
    if not st["online"]:
        return "red"
    monitored = st["cameras_total"] - st["cameras_unmonitored"]
    if monitored > 0 and st["cameras_down"] >= monitored:
        return "red"
    if (
        st["cameras_down"]
        or st["cameras_degraded"]
        or st["disk_level"] == "critical"
        or st["clock_level"] == "critical"
        or st["inventory_mismatch"]
    ):
        return "amber"
    return "green"


_CAUSE_VI: Final = {
    "camera_down": "mất tín hiệu",
    "recording_gap": "ngừng ghi hình",
    "image_fault": "lỗi hình ảnh",
    "site_offline": "mất kết nối",
}
_CAUSE_EN: Final = {
    "camera_down": "stream down",
    "recording_gap": "recording stopped",
    "image_fault": "image fault",
    "site_offline": "offline",
}


class BatchWriter:
    """Applies batches of accepted messages to the database (called from one worker thread)."""

    def __init__(
        self,
        db: Database,
        directory: SiteDirectory,
        *,
        policy: LedgerPolicy | None = None,
        future_tolerance_s: float = 60.0,
    ) -> None:
        self.db = db
        self.directory = directory
        self.policy = policy or LedgerPolicy()
        self.future_tolerance_s = future_tolerance_s
        self._cache: dict[str, _SiteCache] = {}
        #: Sites whose rows came from the cache / had to be read (diagnostics, benchmarks).
        self.cache_hits = 0
        self.cache_misses = 0

    def apply(self, items: Sequence[Accepted]) -> BatchResult:
        """Write `items` in one transaction; raises on a database error (nothing written)."""
        batch_sites = {i.site_id for i in items}
        try:
            with self.db.engine.begin() as conn:
                batch = _Batch(self, conn, items)
                result = batch.run()
        except BaseException:
            # Cached records were changed in place by the failed batch: forget them.
            for site_id in batch_sites:
                self._cache.pop(site_id, None)
            raise
        self._cache.update(batch.new_cache)
        return result

    def forget(self) -> None:
        """Drop the in-memory copy of every site (it is re-read on next use)."""
        self._cache.clear()


@dataclass
class _SiteCache:
    """A site's cameras and open outages as committed at `version` (see site_state.version)."""

    version: int
    cams: list[CameraRecord]
    open_outages: list[OutageRecord]


class _Ranges:
    """Missing-seq ranges of one (site, epoch), loaded on first use, diffed at flush.

    `detected` and `alerted` are keyed by a range's first seq; the part a late event splits
    off keeps both, so a hole already alerted is not alerted again for what is left of it.
    """

    def __init__(
        self,
        rows: list[tuple[int, int]],
        detected: dict[int, float],
        alerted: dict[int, float | None],
    ) -> None:
        self.original = set(rows)
        self.ranges = sorted(rows)
        self.detected = detected
        self.alerted = alerted

    def add(self, first: int, last: int, at: float) -> None:
        self.ranges.append((first, last))
        self.ranges.sort()
        self.detected.setdefault(first, at)

    def fill(self, seq: int, at: float) -> bool:
        for i, (first, last) in enumerate(self.ranges):
            if first <= seq <= last:
                parts = [(a, b) for a, b in ((first, seq - 1), (seq + 1, last)) if a <= b]
                self.ranges[i : i + 1] = parts
                if parts and parts[-1][0] == seq + 1:
                    self.detected.setdefault(seq + 1, self.detected.get(first, at))
                    self.alerted.setdefault(seq + 1, self.alerted.get(first))
                return True
        return False


class _Batch:
    """One batch's working state: loaded rows, changes, and the flush."""

    def __init__(self, writer: BatchWriter, conn: Connection, items: Sequence[Accepted]) -> None:
        self.w = writer
        self.conn = conn
        self.items = items
        self.policy = writer.policy
        self.result = BatchResult()
        self.state: dict[str, dict[str, Any]] = {}
        self.loaded_state: dict[str, dict[str, Any]] = {}
        self.cams: dict[tuple[str, str], CameraRecord] = {}
        self.cams_loaded: set[str] = set()
        self.book = OutageBook()
        self.event_rows: list[dict[str, Any]] = []
        self.seen: set[tuple[str, int, int]] = set()
        self.existing: set[tuple[str, int, int]] = set()
        self.ranges: dict[tuple[str, int], _Ranges] = {}
        self.health_rows: dict[tuple[str, str], dict[str, Any]] = {}
        self.thumbs: dict[tuple[str, str], dict[str, Any]] = {}
        self.changed_sites: set[str] = set()
        self.pending_alerts: list[Alert] = []
        #: What the writer may cache once this batch is committed.
        self.new_cache: dict[str, _SiteCache] = {}

    # -- loading --

    def run(self) -> BatchResult:
        site_ids = sorted({i.site_id for i in self.items})
        first_seen: dict[str, float] = {}
        for i in self.items:
            first_seen.setdefault(i.site_id, i.received_at)
        ins = dialect_insert(self.conn, site_state).on_conflict_do_nothing(
            index_elements=["site_id"]
        )
        self.conn.execute(ins, [{"site_id": s, "first_seen_at": first_seen[s]} for s in site_ids])
        q = sa.select(site_state).where(site_state.c.site_id.in_(site_ids))
        q = q.order_by(site_state.c.site_id).with_for_update()
        for row in self.conn.execute(q):
            self.state[row.site_id] = dict(row._mapping)
            self.loaded_state[row.site_id] = dict(row._mapping)
        # Cameras and open outages: from the writer's cache when the site's version is the
        # one cached (no other writer touched it since), else from the database.
        open_recs: list[OutageRecord] = []
        to_read: list[str] = []
        for site_id in site_ids:
            cached = self.w._cache.get(site_id)
            if cached is not None and cached.version == self.state[site_id]["version"]:
                self.w.cache_hits += 1
                for cam in cached.cams:
                    self.cams[(site_id, cam.camera_id)] = cam
                open_recs.extend(cached.open_outages)
            else:
                self.w.cache_misses += 1
                to_read.append(site_id)
        if to_read:
            for row in self.conn.execute(sa.select(cameras).where(cameras.c.site_id.in_(to_read))):
                cam = CameraRecord.from_row(row._mapping)
                self.cams[(cam.site_id, cam.camera_id)] = cam
            open_rows = self.conn.execute(
                sa.select(outages).where(
                    outages.c.ended_at.is_(None), outages.c.site_id.in_(to_read)
                )
            )
            open_recs.extend(_outage_record(r._mapping) for r in open_rows)
        self.cams_loaded.update(site_ids)
        self.book = OutageBook.from_open(open_recs)
        self._load_existing_seqs()
        for item in self.items:
            st = self.state[item.site_id]
            st["last_seen_at"] = max(st["last_seen_at"] or 0.0, item.received_at)
            self.changed_sites.add(item.site_id)
            msg = item.message
            if isinstance(msg, EventBase):
                self._event(item, msg)
            elif isinstance(msg, Health):
                self._health(item, msg)
            elif isinstance(msg, Inventory):
                self._inventory(item, msg)
            elif isinstance(msg, StateBirth):
                self._birth(item, msg)
            elif isinstance(msg, StateDeath):
                self._death(item, msg)
        self._flush()
        return self.result

    def _load_existing_seqs(self) -> None:
        """(site, epoch, seq) of this batch's events at or below the stored maximum that are
        already stored: the only ones whose novelty needs the database (the rest are new)."""
        low: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i in self.items:
            if isinstance(i.message, EventBase):
                st = self.state[i.site_id]
                if i.message.seq <= st["max_seq"]:
                    low[(i.site_id, st["epoch"])].append(i.message.seq)
        for (site_id, epoch), seqs in low.items():
            rows = self.conn.execute(
                sa.select(events.c.seq).where(
                    events.c.site_id == site_id,
                    events.c.epoch == epoch,
                    events.c.seq.in_(sorted(set(seqs))),
                )
            )
            self.existing.update((site_id, epoch, r.seq) for r in rows)

    # -- helpers --

    def _site(self, site_id: str) -> tuple[SiteAttrs | None, str]:
        entry = self.w.directory.get(site_id)
        return (entry.attrs, entry.name) if entry is not None else (None, site_id)

    def _alert(
        self, type_: str, site_id: str, at: float, severity: Any, vi: str, en: str, **fields: Any
    ) -> None:
        attrs, name = self._site(site_id)
        self.pending_alerts.append(
            make_alert(
                type_,
                at=at,
                severity=severity,
                site=attrs,
                site_name=name or site_id,
                text_vi=vi,
                text_en=en,
                **fields,
            )
        )

    def _clamp(self, ts: float, received_at: float) -> float:
        """An edge time, but never further ahead of the hub's clock than the tolerance."""
        return min(ts, received_at + self.w.future_tolerance_s)

    def _camera(self, site_id: str, camera_id: str, at: float) -> CameraRecord:
        key = (site_id, camera_id)
        cam = self.cams.get(key)
        if cam is None:
            cam = CameraRecord(site_id, camera_id, first_seen=at, updated_at=at, dirty=True)
            self.cams[key] = cam
        return cam

    def _ranges(self, site_id: str, epoch: int) -> _Ranges:
        key = (site_id, epoch)
        r = self.ranges.get(key)
        if r is None:
            rows = self.conn.execute(
                sa.select(missing_seq).where(
                    missing_seq.c.site_id == site_id, missing_seq.c.epoch == epoch
                )
            ).all()
            r = _Ranges(
                [(x.first_seq, x.last_seq) for x in rows],
                {x.first_seq: x.detected_at for x in rows},
                {x.first_seq: x.alerted_at for x in rows},
            )
            self.ranges[key] = r
        return r

    # -- state --

    def _birth(self, item: Accepted, b: StateBirth) -> None:
        st = self.state[item.site_id]
        cur = st["bdseq"]
        accept = cur is None or b.bdseq > cur or (b.bdseq < cur and b.ts > (st["birth_ts"] or 0.0))
        if not accept:
            # The same birth again (retained copy at a hub restart, QoS 1 redelivery), or one
            # older than the current.
            if b.bdseq != cur or st["online"] is False:
                self.result.stale_states += 1
            return
        was_online = st["online"]
        if st["max_seq"] > 0 and b.last_seq < st["max_seq"]:
            old_epoch, old_max = st["epoch"], st["max_seq"]
            st["epoch"] = old_epoch + 1
            st["max_seq"] = 0
            self._alert(
                "edge_reset",
                item.site_id,
                item.received_at,
                "warning",
                f"Điểm {item.site_id} đánh số sự kiện lại từ đầu (trước: {old_max}, "
                f"nay: {b.last_seq}); hộp có thể đã được cài lại hoặc thay thế",
                f"Site {item.site_id} restarted its event numbering (was {old_max}, now "
                f"{b.last_seq}): the box may have been re-imaged or replaced",
                epoch=st["epoch"],
                previous_max_seq=old_max,
                last_seq=b.last_seq,
            )
        if st["max_seq"] == 0:
            # No event stored yet (in this epoch): the birth says where the edge's numbering
            # stands, so holes are counted from there on (what came before the hub's first
            # contact cannot be known).
            st["max_seq"] = b.last_seq
        birth_at = min(b.ts, item.received_at)
        st.update(
            online=True,
            bdseq=b.bdseq,
            birth_ts=b.ts,
            agent_version=b.agent_version,
            agent_started=b.started,
            last_seq_reported=b.last_seq,
            state_since=birth_at,
        )
        cur_out = self.book.current(item.site_id, None)
        if cur_out is not None:
            end = min(max(birth_at, cur_out.started_at), item.received_at)
            self.book.close(item.site_id, None, end, "birth")
        if was_online is not True:
            self._alert(
                "site_online",
                item.site_id,
                birth_at,
                "info",
                f"Điểm {item.site_id} đã kết nối lại",
                f"Site {item.site_id} is back online",
                bdseq=b.bdseq,
            )

    def _death(self, item: Accepted, d: StateDeath) -> None:
        st = self.state[item.site_id]
        first_word = st["online"] is None and st["bdseq"] is None
        if not first_word and not (st["online"] is True and d.bdseq == st["bdseq"]):
            # A will from an older connection, or a repeat: the site's current birth stands.
            self.result.stale_states += 1
            return
        # A lost connection's will was written at connect time: its ts is the birth's, so the
        # hub's receive time is the best time of death there is.
        at = item.received_at
        st.update(online=False, bdseq=d.bdseq, death_ts=at, death_reason=d.reason, state_since=at)
        if self.book.current(item.site_id, None) is None:
            self.book.open(item.site_id, None, "site_offline", d.reason, at)
        self._alert(
            "site_offline",
            item.site_id,
            at,
            "critical",
            f"Điểm {item.site_id} mất kết nối"
            + (" (tắt có chủ đích)" if d.reason == "shutdown" else ""),
            f"Site {item.site_id} went offline"
            + (" (clean shutdown)" if d.reason == "shutdown" else " (connection lost)"),
            reason=d.reason,
            bdseq=d.bdseq,
        )

    # -- inventory and health --

    def _inventory(self, item: Accepted, inv: Inventory) -> None:
        st = self.state[item.site_id]
        if st["inventory_ts"] is not None and inv.ts < st["inventory_ts"]:
            self.result.stale_samples += 1
            return
        st["inventory_ts"] = inv.ts
        at = self._clamp(inv.ts, item.received_at)
        mismatch = self._mismatch(item.site_id, inv)
        if mismatch != st["inventory_mismatch"]:
            st["inventory_mismatch"] = mismatch
            if mismatch:
                self._alert(
                    "inventory_mismatch",
                    item.site_id,
                    item.received_at,
                    "warning",
                    f"Điểm {item.site_id} tự mô tả khác với hồ sơ đăng ký: {mismatch}",
                    f"Site {item.site_id} describes itself unlike its enrolment: {mismatch}",
                    mismatch=mismatch,
                )
        listed: set[str] = set()
        for c in inv.cameras:
            listed.add(c.id)
            cam = self._camera(item.site_id, c.id, item.received_at)
            cam.name, cam.manufacturer, cam.model = c.name, c.manufacturer, c.model
            prof = next((p for p in c.profiles if p.token == c.record_profile), None)
            if prof is None and c.profiles:
                prof = c.profiles[0]
            cam.codec = prof.codec if prof else None
            cam.resolution = f"{prof.width}x{prof.height}" if prof else None
            cam.updated_at = item.received_at
            set_monitoring(cam, True, c.state, at, self.book, self.policy)
        for (site_id, cam_id), cam in self.cams.items():
            if site_id == item.site_id and cam_id not in listed and cam.in_inventory is not False:
                cam.updated_at = item.received_at
                set_monitoring(cam, False, cam.inv_state, at, self.book, self.policy)

    def _mismatch(self, site_id: str, inv: Inventory) -> str | None:
        """What the box says about its site that differs from the enrolment. Never applied:
        a box must not move itself into another province's scope."""
        attrs, _ = self._site(site_id)
        if attrs is None:
            return None
        said = inv.site
        diffs = []
        for name, enrolled, claimed in (
            ("province", attrs.province, said.province),
            ("district", attrs.district or None, said.district or None),
            ("kind", attrs.kind, said.kind),
            ("authority", attrs.authority, said.authority),
            ("operator", attrs.operator, said.operator),
        ):
            if enrolled != claimed:
                diffs.append(f"{name} {claimed!r} ≠ {enrolled!r}")
        return "; ".join(diffs) if diffs else None

    def _health(self, item: Accepted, h: Health) -> None:
        st = self.state[item.site_id]
        if st["health_ts"] is not None and h.ts < st["health_ts"]:
            self.result.stale_samples += 1
            return
        s = h.site
        st.update(
            health_ts=h.ts,
            disk_total_bytes=s.disk_total_bytes,
            disk_used_bytes=s.disk_used_bytes,
            disk_free_bytes=s.disk_free_bytes,
            forecast_days=s.forecast_days,
            cpu_percent=s.cpu_percent,
            mem_total_bytes=s.mem_total_bytes,
            mem_used_bytes=s.mem_used_bytes,
            clock_offset_s=s.clock_offset_s,
            uptime_s=s.uptime_s,
            spool_depth=s.spool_depth,
            agent_version=s.agent_version,
        )
        sample_ts = self._clamp(h.ts, item.received_at)
        for c in h.cameras:
            img = c.image
            faults = sorted(img.faults) if img is not None else []
            self.health_rows[(item.site_id, c.camera)] = {
                "site_id": item.site_id,
                "camera_id": c.camera,
                "ts": h.ts,
                "received_at": item.received_at,
                "connected": c.connected,
                "recording": c.recording,
                "last_packet_age_s": c.last_packet_age_s,
                "fps": c.fps,
                "bitrate_kbps": c.bitrate_kbps,
                "reconnects_1h": c.reconnects_1h,
                "gap_since": c.gap_since,
                "segment_write_lag_s": c.segment_write_lag_s,
                "luma_mean": img.luma_mean if img else None,
                "sharpness": img.sharpness if img else None,
                "motion": img.motion if img else None,
                "scene_diff": img.scene_diff if img else None,
                "faults": ",".join(faults),
            }
            if c.thumbnail_jpeg is not None:
                self.thumbs[(item.site_id, c.camera)] = {
                    "site_id": item.site_id,
                    "camera_id": c.camera,
                    "ts": h.ts,
                    "jpeg": base64.b64decode(c.thumbnail_jpeg),
                }
            cam = self.cams.get((item.site_id, c.camera))
            if cam is not None and health_clears(
                cam,
                sample_ts,
                c.connected,
                c.recording,
                c.gap_since,
                img.faults if img is not None else None,
                self.book,
                self.policy,
            ):
                cam.updated_at = item.received_at

    # -- events --

    def _event(self, item: Accepted, ev: EventBase) -> None:
        site_id = item.site_id
        st = self.state[site_id]
        epoch = st["epoch"]
        key = (site_id, epoch, ev.seq)
        if key in self.seen or key in self.existing:
            self.result.duplicates += 1
            return
        self.seen.add(key)
        late = ev.seq <= st["max_seq"]
        if late:
            if self._ranges(site_id, epoch).fill(ev.seq, item.received_at):
                st["missing_events"] = max(0, st["missing_events"] - 1)
                self.result.late_events += 1
        else:
            # Holes are counted once the hub knows where the numbering stood: from a birth's
            # `last_seq`, or else from the first event it ever stored for the site.
            baseline_known = st["max_seq"] > 0 or st["last_seq_reported"] is not None
            if ev.seq > st["max_seq"] + 1 and baseline_known:
                first, last = st["max_seq"] + 1, ev.seq - 1
                self._ranges(site_id, epoch).add(first, last, item.received_at)
                n = last - first + 1
                st["missing_events"] += n
                self.result.missing_seqs += n
                # Alerted by `GapAlerter` only if it lasts: hub instances of one share group
                # get a site's events in turn, so a short-lived hole is normal there.
            st["max_seq"] = ev.seq
        self.result.stored_events += 1
        camera_id: str | None = getattr(ev, "camera", None)
        self.event_rows.append(
            {
                "site_id": site_id,
                "epoch": epoch,
                "seq": ev.seq,
                "kind": ev.kind,  # type: ignore[attr-defined]
                "camera_id": camera_id,
                "ts": ev.ts,
                "received_at": item.received_at,
                "body": item.payload.decode(),
            }
        )
        if camera_id is not None:
            self._camera_event(item, ev, camera_id, epoch)
        else:
            self._site_event(item, ev)

    def _camera_event(self, item: Accepted, ev: EventBase, camera_id: str, epoch: int) -> None:
        cam = self._camera(item.site_id, camera_id, item.received_at)
        stale = (epoch, ev.seq) < (cam.last_event_epoch, cam.last_event_seq)
        at = self._clamp(ev.ts, item.received_at)
        if not stale:
            cam.last_event_epoch, cam.last_event_seq, cam.last_event_ts = epoch, ev.seq, ev.ts
            cam.dirty = True
        cam.updated_at = item.received_at
        book, policy = self.book, self.policy
        if isinstance(ev, ChainHead):  # most events: first
            if cam.chain_segment_seq is None or ev.segment_seq >= cam.chain_segment_seq:
                cam.chain_segment_seq, cam.chain_row_hash = ev.segment_seq, ev.row_hash
                cam.chain_time = ev.time
                cam.dirty = True
        elif isinstance(ev, CameraDown):
            if not stale:
                camera_down(cam, at, ev.cause, book, policy)
        elif isinstance(ev, CameraUp):
            if (stale or not camera_up(cam, at, book, policy)) and ev.down_since is not None:
                since = self._clamp(ev.down_since, item.received_at)
                self._history(cam, "camera_down", "unknown", since, at, footage=False)
        elif isinstance(ev, GapOpened):
            if not stale:
                gap_opened(cam, self._clamp(ev.start, item.received_at), ev.cause, book, policy)
        elif isinstance(ev, GapClosed):
            start = self._clamp(ev.start, item.received_at)
            end = self._clamp(ev.end, item.received_at)
            if stale or not gap_closed(cam, start, end, book, policy):
                self._history(cam, "recording_gap", ev.cause, start, end, footage=True)
        elif isinstance(ev, ImageFaultEvent):
            if not stale:
                image_fault(cam, ev.fault, ev.active, at, book, policy)
        elif isinstance(ev, ClockEvent | Alarm | RetentionEvent):
            self._site_event(item, ev)

    def _history(
        self, cam: CameraRecord, kind: Any, cause: str, start: float, end: float, *, footage: bool
    ) -> None:
        """An interval learnt after the fact: mark the outage covering it, or record it."""
        if end <= start:
            return
        covering = [
            r
            for r in self.book.camera_outages(cam.site_id, cam.camera_id)
            if r.overlaps(start, end)
        ]
        cur = self.book.current(cam.site_id, cam.camera_id)
        if cur is not None and cur.overlaps(start, end) and cur not in covering:
            covering.append(cur)
        if not covering:
            rows = self.conn.execute(
                _COVERING_OUTAGE,
                {"site": cam.site_id, "camera": cam.camera_id, "start": start, "end": end},
            ).all()
            for r in rows:
                known = self.book.touched.get(r.id)
                covering.append(known if known is not None else _outage_record(r._mapping))
        if covering:
            if footage:
                rec = covering[0]
                rec.footage_lost = True
                rec.footage_lost_s += end - start
                self.book.mark(rec)
            return
        self.book.add_closed(
            OutageRecord(
                cam.site_id,
                cam.camera_id,
                kind,
                cause,
                start,
                end,
                "late",
                footage_lost=footage,
                footage_lost_s=(end - start) if footage else 0.0,
            )
        )

    def _site_event(self, item: Accepted, ev: EventBase) -> None:
        st = self.state[item.site_id]
        sid = item.site_id
        if isinstance(ev, DiskEvent):
            if ev.level != st["disk_level"]:
                st["disk_level"] = ev.level
                self._alert(
                    "disk",
                    sid,
                    ev.ts,
                    _severity(ev.level),
                    f"Ổ ghi hình tại điểm {sid}: mức {ev.level}, còn trống {_gib(ev.free_bytes)}",
                    f"Recording volume at site {sid}: level {ev.level}, {_gib(ev.free_bytes)} free",
                    level=ev.level,
                    free_bytes=ev.free_bytes,
                    forecast_days=ev.forecast_days,
                )
        elif isinstance(ev, ClockEvent):
            if ev.camera is None:
                st["clock_level"] = ev.level
            if ev.level != "ok":
                who_vi = f"camera {ev.camera}" if ev.camera else "hộp ghi hình"
                who_en = f"camera {ev.camera}" if ev.camera else "the box"
                self._alert(
                    "clock",
                    sid,
                    ev.ts,
                    _severity(ev.level),
                    f"Đồng hồ của {who_vi} tại điểm {sid} lệch {ev.offset_s:+.1f} giây",
                    f"Clock of {who_en} at site {sid} is off by {ev.offset_s:+.1f} s",
                    camera_id=ev.camera,
                    level=ev.level,
                    offset_s=ev.offset_s,
                )
        elif isinstance(ev, Alarm):
            self._alert(
                "alarm",
                sid,
                ev.ts,
                ev.level if ev.active else "info",
                f"Cảnh báo tại điểm {sid}: {ev.message}" + ("" if ev.active else " (đã hết)"),
                f"Alarm at site {sid}: {ev.message}" + ("" if ev.active else " (cleared)"),
                camera_id=ev.camera,
                code=ev.code,
                level=ev.level,
                active=ev.active,
            )
        elif isinstance(ev, RetentionEvent):
            if ev.below_legal_minimum:
                self._alert(
                    "retention",
                    sid,
                    ev.ts,
                    "critical",
                    f"Điểm {sid} lưu hình {ev.retention_days} ngày, dưới mức luật định 30 ngày",
                    f"Site {sid} keeps footage {ev.retention_days} days, below the legal 30",
                    camera_id=ev.camera,
                    retention_days=ev.retention_days,
                    legal_hold=ev.legal_hold,
                )
        elif isinstance(ev, AgentStarted):
            st["agent_version"] = ev.agent_version

    # -- flush --

    def _flush(self) -> None:
        conn = self.conn
        insert_ignore(conn, events, self.event_rows)
        self._flush_ranges()
        self._flush_outages()
        # Whole rows: diffing 26 columns in Python cost more than writing them (measured).
        dirty = [c.row() for c in self.cams.values() if c.dirty]
        upsert(conn, cameras, dirty)
        for c in self.cams.values():
            c.dirty = False
        upsert(conn, camera_health, list(self.health_rows.values()))
        upsert(conn, camera_thumbnails, list(self.thumbs.values()))
        counts_by_site: dict[str, dict[str, int]] = {}
        for (sid, _), cam in self.cams.items():
            counts = counts_by_site.setdefault(
                sid, {"ok": 0, "degraded": 0, "down": 0, "unmonitored": 0, "removed": 0}
            )
            counts[cam.status] += 1
        for site_id in self.changed_sites:
            st = self.state[site_id]
            if site_id in self.cams_loaded:
                counts = counts_by_site.get(site_id) or {
                    "ok": 0,
                    "degraded": 0,
                    "down": 0,
                    "unmonitored": 0,
                    "removed": 0,
                }
                st["cameras_total"] = sum(counts.values()) - counts["removed"]
                st["cameras_down"] = counts["down"]
                st["cameras_degraded"] = counts["degraded"]
                st["cameras_unmonitored"] = counts["unmonitored"]
            st["rag"] = site_rag(st)
            st["version"] += 1
        update_changed(
            conn,
            site_state,
            [
                ({"site_id": s}, _changed(self.loaded_state[s], self.state[s]))
                for s in sorted(self.changed_sites)
            ],
        )
        self.result.alerts.extend(self.pending_alerts)
        cams_by_site: dict[str, list[CameraRecord]] = defaultdict(list)
        for (sid, _), cam in self.cams.items():
            cams_by_site[sid].append(cam)
        open_by_site: dict[str, list[OutageRecord]] = defaultdict(list)
        for rec in self.book.open_by_key.values():
            rec.changed = False
            open_by_site[rec.site_id].append(rec)
        for site_id in self.changed_sites:
            self.new_cache[site_id] = _SiteCache(
                self.state[site_id]["version"], cams_by_site[site_id], open_by_site[site_id]
            )

    def _flush_ranges(self) -> None:
        deletes: list[dict[str, Any]] = []
        inserts: list[dict[str, Any]] = []
        for (site_id, epoch), r in self.ranges.items():
            final = set(r.ranges)
            for first, _last in r.original - final:
                deletes.append({"s": site_id, "e": epoch, "f": first})
            for first, last in final - r.original:
                inserts.append(
                    {
                        "site_id": site_id,
                        "epoch": epoch,
                        "first_seq": first,
                        "last_seq": last,
                        "detected_at": r.detected.get(first, time.time()),
                        "alerted_at": r.alerted.get(first),
                    }
                )
        if deletes:
            self.conn.execute(
                missing_seq.delete().where(
                    missing_seq.c.site_id == sa.bindparam("s"),
                    missing_seq.c.epoch == sa.bindparam("e"),
                    missing_seq.c.first_seq == sa.bindparam("f"),
                ),
                deletes,
            )
        upsert(self.conn, missing_seq, inserts)

    def _flush_outages(self) -> None:
        conn = self.conn
        book = self.book
        if book.new:
            stmt = outages.insert().returning(outages.c.id, sort_by_parameter_order=True)
            ids = conn.execute(stmt, [r.row() for r in book.new]).scalars().all()
            for rec, new_id in zip(book.new, ids, strict=True):
                rec.id = new_id
        if book.new or book.touched:
            # The uptime rollup's days these outages change, in this transaction; read before
            # the update below, which overwrites the spans they change from.
            mark_dirty(conn, outage_changes(conn, book.new, book.touched.values()))
        if book.touched:
            conn.execute(
                outages.update()
                .where(outages.c.id == sa.bindparam("oid"))
                .values(
                    started_at=sa.bindparam("started_at"),
                    ended_at=sa.bindparam("ended_at"),
                    end_reason=sa.bindparam("end_reason"),
                    footage_lost=sa.bindparam("footage_lost"),
                    footage_lost_s=sa.bindparam("footage_lost_s"),
                ),
                [
                    {
                        "oid": r.id,
                        "started_at": r.started_at,
                        "ended_at": r.ended_at,
                        "end_reason": r.end_reason,
                        "footage_lost": r.footage_lost,
                        "footage_lost_s": r.footage_lost_s,
                    }
                    for r in book.touched.values()
                ],
            )
            self._resolve_tickets(
                [r for r in book.touched.values() if r.ended_at is not None and r.id is not None]
            )
        for rec, what in book.transitions:
            self._outage_alert(rec, what)

    def _resolve_tickets(self, ended: list[OutageRecord]) -> None:
        if not ended:
            return
        by_outage = {r.id: r for r in ended}
        rows = self.conn.execute(
            sa.select(tickets.c.id, tickets.c.outage_id, tickets.c.site_id, tickets.c.camera_id)
            .where(tickets.c.outage_id.in_(list(by_outage)))
            .where(tickets.c.state.in_(["open", "acknowledged"]))
        ).all()
        if not rows:
            return
        now = time.time()
        self.conn.execute(
            tickets.update()
            .where(tickets.c.id == sa.bindparam("tid"))
            .values(
                state="resolved",
                resolved_at=sa.bindparam("at"),
                outage_started_at=sa.bindparam("start"),
                footage_lost=sa.bindparam("lost"),
                updated_at=now,
            ),
            [
                {
                    "tid": t.id,
                    "at": by_outage[t.outage_id].ended_at,
                    "start": by_outage[t.outage_id].started_at,
                    "lost": by_outage[t.outage_id].footage_lost,
                }
                for t in rows
            ],
        )
        self.conn.execute(
            ticket_notes.insert(),
            [
                {
                    "ticket_id": t.id,
                    "at": by_outage[t.outage_id].ended_at,
                    "author": "system",
                    "action": "resolved",
                    "text": "outage ended",
                }
                for t in rows
            ],
        )
        for t in rows:
            rec = by_outage[t.outage_id]
            assert rec.ended_at is not None
            vi, en = duration_text(rec.ended_at - rec.started_at)
            what_vi = f"camera {t.camera_id}" if t.camera_id else "điểm"
            what_en = f"camera {t.camera_id}" if t.camera_id else "site"
            self._alert(
                "ticket_resolved",
                t.site_id,
                rec.ended_at,
                "info",
                f"Phiếu #{t.id}: {what_vi} tại {t.site_id} đã hoạt động lại sau {vi}; "
                "cần xác nhận để đóng phiếu",
                f"Ticket #{t.id}: {what_en} at {t.site_id} is back after {en}; "
                "confirm to close the ticket",
                camera_id=t.camera_id,
                ticket_id=t.id,
                outage_id=t.outage_id,
            )

    def _outage_alert(self, rec: OutageRecord, what: str) -> None:
        if rec.camera_id is None and what != "closed":
            return  # site_offline is already said by the death's alert
        subject_vi = (
            f"Camera {rec.camera_id} tại điểm {rec.site_id}"
            if rec.camera_id
            else (f"Điểm {rec.site_id}")
        )
        subject_en = (
            f"Camera {rec.camera_id} at site {rec.site_id}"
            if rec.camera_id
            else (f"Site {rec.site_id}")
        )
        cause_vi = f"{_CAUSE_VI[rec.kind]} ({rec.cause})"
        cause_en = f"{_CAUSE_EN[rec.kind]} ({rec.cause})"
        common: dict[str, Any] = {
            "camera_id": rec.camera_id,
            "outage_id": rec.id,
            "kind": rec.kind,
            "cause": rec.cause,
            "started_at": rec.started_at,
            "ended_at": rec.ended_at,
            "footage_lost": rec.footage_lost,
        }
        if what == "opened":
            # Built at flush: the record may already be closed by a later message of the batch
            # (its own `outage_closed` alert follows); say what was true when it opened.
            common.update(ended_at=None, footage_lost=rec.kind == "recording_gap")
            self._alert(
                "outage_opened",
                rec.site_id,
                rec.started_at,
                "critical",
                f"{subject_vi}: {cause_vi}",
                f"{subject_en}: {cause_en}",
                **common,
            )
        else:
            assert rec.ended_at is not None
            vi, en = duration_text(rec.ended_at - rec.started_at)
            lost_vi = ", mất hình" if rec.footage_lost else ""
            lost_en = ", footage lost" if rec.footage_lost else ""
            type_ = "outage_closed" if what == "closed" else "outage_recorded"
            self._alert(
                type_,
                rec.site_id,
                rec.ended_at,
                "info",
                f"{subject_vi} hoạt động lại sau {vi} ({_CAUSE_VI[rec.kind]}{lost_vi})",
                f"{subject_en} back after {en} ({_CAUSE_EN[rec.kind]}{lost_en})",
                **common,
            )


# Built once: constructing a select costs more than running this one (~100 µs vs ~60 µs).
_COVERING_OUTAGE: Final = (
    sa.select(outages)
    .where(
        outages.c.site_id == sa.bindparam("site"),
        outages.c.camera_id == sa.bindparam("camera"),
        outages.c.started_at < sa.bindparam("end"),
        sa.or_(outages.c.ended_at.is_(None), outages.c.ended_at > sa.bindparam("start")),
    )
    .order_by(outages.c.started_at)
    .limit(1)
)


def _severity(level: str) -> str:
    return {"ok": "info", "warning": "warning", "critical": "critical"}.get(level, "warning")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _outage_record(m: Any) -> OutageRecord:
    return OutageRecord(
        site_id=m["site_id"],
        camera_id=m["camera_id"],
        kind=m["kind"],
        cause=m["cause"],
        started_at=m["started_at"],
        ended_at=m["ended_at"],
        end_reason=m["end_reason"],
        footage_lost=m["footage_lost"],
        footage_lost_s=m["footage_lost_s"],
        id=m["id"],
    )


# --- the async side -------------------------------------------------------------------------


class GapAlerter:
    """Alerts (`seq_gap`) the holes in sites' event numbers that stayed open
    `gap_alert_delay_s`, once each.

    Not at detection: hub instances of one `$share` group receive a site's events in turn, so
    one instance routinely commits seq 8 before another commits seq 7, and QoS 1 redelivery
    after a reconnect reorders too. A hole the next batch fills is not news; one that lasts
    is (an edge that lost its spool, a message dropped by a full broker queue). Claimed with
    `UPDATE … WHERE alerted_at IS NULL`, so two hub instances never both alert one hole.
    """

    def __init__(
        self, db: Database, directory: SiteDirectory, alerts: AlertHub, delay_s: float
    ) -> None:
        self.db = db
        self.directory = directory
        self.alerts = alerts
        self.delay_s = delay_s

    def due(self, now: float) -> list[Alert]:
        """Claim the holes due now and return their alerts (call from a thread)."""
        due_q = sa.select(missing_seq).where(
            missing_seq.c.alerted_at.is_(None), missing_seq.c.detected_at <= now - self.delay_s
        )
        claim = (
            missing_seq.update()
            .where(
                missing_seq.c.site_id == sa.bindparam("s"),
                missing_seq.c.epoch == sa.bindparam("e"),
                missing_seq.c.first_seq == sa.bindparam("f"),
                missing_seq.c.alerted_at.is_(None),
            )
            .values(alerted_at=now)
        )
        out: list[Alert] = []
        with self.db.engine.begin() as conn:
            for r in conn.execute(due_q.limit(1000)).all():
                params = {"s": r.site_id, "e": r.epoch, "f": r.first_seq}
                if conn.execute(claim, params).rowcount != 1:
                    continue  # another hub instance claimed it, or a batch just filled it
                entry = self.directory.get(r.site_id)
                n = r.last_seq - r.first_seq + 1
                sid = r.site_id
                out.append(
                    make_alert(
                        "seq_gap",
                        at=r.detected_at,
                        severity="warning",
                        site=entry.attrs if entry is not None else None,
                        site_name=(entry.name if entry is not None else "") or sid,
                        text_vi=f"Thiếu {n} sự kiện từ điểm {sid} (số {r.first_seq}–{r.last_seq})",
                        text_en=f"{n} events missing from site {sid} "
                        f"(seq {r.first_seq}-{r.last_seq})",
                        first_seq=r.first_seq,
                        last_seq=r.last_seq,
                        epoch=r.epoch,
                    )
                )
        return out

    async def run(self) -> None:
        interval = min(5.0, self.delay_s / 2)
        while True:
            await asyncio.sleep(interval)
            try:
                found = await asyncio.to_thread(self.due, time.time())
            except sa.exc.SQLAlchemyError as exc:
                log.warning("could not check for lasting seq holes: %s", _first_line(exc))
                continue
            if found:
                self.alerts.publish_many(found)


class _Received(NamedTuple):
    """One message in the pending batch: what to write (None for a reject) and how to ack."""

    accepted: Accepted | None
    mid: int
    qos: int
    generation: int


ReplyListener = Callable[[str, CommandReply], None]


class Ingest:
    """Subscribes to every site's messages and keeps the status tables current.

    ``async with Ingest(db, mqtt_config) as ingest:`` runs it in the background (waiting
    until it has subscribed); or ``await ingest.run()`` until `stop()`. `feed()` hands a
    message in without MQTT (benchmarks, replays).
    """

    def __init__(
        self,
        db: Database,
        mqtt: MqttConfig,
        config: IngestConfig | None = None,
        *,
        policy: LedgerPolicy | None = None,
        alerts: AlertHub | None = None,
    ) -> None:
        self.db = db
        self.mqtt = mqtt
        self.config = config or IngestConfig()
        self.alerts = alerts
        self.counters = IngestCounters()
        self.directory = SiteDirectory(db)
        self.writer = BatchWriter(
            db,
            self.directory,
            policy=policy,
            future_tolerance_s=self.config.future_tolerance_s,
        )
        self._reject_log = RateLimitedLog(log, self.config.reject_log_interval_s)
        self._pending: list[_Received] = []
        self._has_pending = asyncio.Event()
        self._batch_full = asyncio.Event()
        self._generation = 0
        self._receiver: ReceiverProcess | None = None
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reply_listeners: list[ReplyListener] = []
        self._idle = asyncio.Event()
        self._idle.set()

    # -- public --

    @property
    def receiver_pid(self) -> int | None:
        """The process holding the MQTT connection now (None between connections)."""
        return self._receiver.pid if self._receiver is not None else None

    def add_reply_listener(self, listener: ReplyListener) -> None:
        """Call `listener(site_id, reply)` for every valid command reply (not stored here)."""
        self._reply_listeners.append(listener)

    def feed(self, topic_name: str, payload: bytes, *, mid: int = 0, qos: int = 0) -> None:
        """Validate one message and queue it for the next batch (rejects are counted)."""
        self._receive(topic_name, payload, mid, qos, self._generation)

    async def refresh_sites(self) -> None:
        """Re-read the sites table now, and fetch retained state of newly enabled sites."""
        added = await asyncio.to_thread(self.directory.refresh)
        if added and self._receiver is not None and self.ready.is_set():
            await self._resync_retained(added)

    async def wait_idle(self) -> None:
        """Wait until every message received so far is written (and acknowledged)."""
        while self._pending or not self._idle.is_set():  # noqa: ASYNC110 — two conditions
            await asyncio.sleep(0.01)

    @contextlib.asynccontextmanager
    async def offline(self) -> AsyncIterator[Ingest]:
        """Run the writer without MQTT, for `feed()` (replays, imports, benchmarks); on exit,
        everything fed is written."""
        await asyncio.to_thread(self.directory.refresh)
        writer = asyncio.get_running_loop().create_task(self._writer_loop(), name="writer")
        try:
            yield self
            await self.wait_idle()
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def __aenter__(self) -> Ingest:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="ingest")
        ready = asyncio.ensure_future(self.ready.wait())
        done, _ = await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            ready.cancel()
            self._task.result()  # raises what stopped it
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Write what is pending, acknowledge it, disconnect."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def run(self) -> None:
        """Run until `stop()`: reconnects to the broker with backoff, never gives up."""
        await asyncio.to_thread(self.directory.refresh)
        loop = asyncio.get_running_loop()
        writer = loop.create_task(self._writer_loop(), name="ingest-writer")
        refresher = loop.create_task(self._refresh_loop(), name="sites")
        checkpoints = None
        if self.db.dialect == "sqlite":
            checkpoints = loop.create_task(self._checkpoint_loop(), name="sqlite-checkpoint")
        gaps = None
        if self.alerts is not None:
            alerter = GapAlerter(
                self.db, self.directory, self.alerts, self.config.gap_alert_delay_s
            )
            gaps = loop.create_task(alerter.run(), name="seq-gap-alerts")
        backoff = 1.0
        try:
            while not self._stopping.is_set():
                try:
                    await self._session()
                    backoff = 1.0
                except (ConnectionError, OSError, ReceiverError) as exc:
                    self.ready.clear()
                    log.warning("MQTT: %s; reconnecting in %.0f s", exc, backoff)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            for task in (gaps, checkpoints):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            refresher.cancel()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    # -- MQTT session --

    def _receiver_settings(self) -> ReceiverSettings:
        m = self.mqtt
        return ReceiverSettings(
            host=m.host,
            port=m.port,
            client_id=m.client_id,
            keepalive_s=m.keepalive_s,
            session_expiry_s=m.session_expiry_s,
            receive_maximum=m.receive_maximum,
            filters=hub_subscriptions(m.share_group),
            tls=m.tls,
            ca_file=str(m.ca_file) if m.ca_file else None,
            cert_file=str(m.cert_file) if m.cert_file else None,
            key_file=str(m.key_file) if m.key_file else None,
        )

    async def _session(self) -> None:
        """One connection, through one receiver process (central_hub.mqtt_receiver)."""
        generation = self._generation + 1

        def on_up() -> None:
            self._generation = generation
            self.counters.connections += 1
            log.info(
                "ingest subscribed to %s as %s (share group %s)",
                f"{self.mqtt.host}:{self.mqtt.port}",
                self.mqtt.client_id,
                self.mqtt.share_group or "none",
            )
            self.ready.set()

        def on_messages(first: int, items: list[tuple[str, bytes, int]]) -> None:
            for i, (topic_name, payload, qos) in enumerate(items):
                self._receive(topic_name, payload, first + i, qos, generation)

        receiver = ReceiverProcess(self._receiver_settings(), on_up=on_up, on_messages=on_messages)
        self._receiver = receiver
        running = asyncio.ensure_future(receiver.run())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if self._stopping.is_set() and not running.done():
                await self._drain()
                receiver.stop()
            reason = await running
        finally:
            stopping.cancel()
            if not running.done():
                receiver.kill()
                with contextlib.suppress(Exception):
                    await running
            self._receiver = None
            self.ready.clear()
        if not self._stopping.is_set():
            raise ConnectionError(reason)

    async def _resync_retained(self, site_ids: list[str]) -> None:
        """Subscribe plainly to the state and inventory of newly enabled sites, then leave:
        the broker sends their retained copies (rejected while the site was unknown)."""
        receiver = self._receiver
        if receiver is None:
            return
        for i in range(0, len(site_ids), 200):
            chunk = site_ids[i : i + 200]
            receiver.fetch_retained(
                [topic(s, k) for s in chunk for k in (Kind.STATE, Kind.INVENTORY)]
            )

    # -- receiving --

    def _receive(self, topic_name: str, payload: bytes, mid: int, qos: int, gen: int) -> None:
        if self._stopping.is_set():
            return  # not acknowledged: the broker redelivers it to the next session
        self.counters.received += 1
        try:
            accepted = self._accept(topic_name, payload)
        except Exception:
            # Never let a message take the receive path down (this runs in aiomqtt's callback).
            log.exception("unexpected error handling a message on %r", topic_name[:120])
            self.counters.rejected["store_error"] += 1
            accepted = None
        self._pending.append(_Received(accepted, mid, qos, gen))
        self._has_pending.set()
        if len(self._pending) >= self.config.batch_max_messages:
            self._batch_full.set()

    def _accept(self, topic_name: str, payload: bytes) -> Accepted | None:
        try:
            delivery = decode_delivery(topic_name, payload)
        except MessageError as exc:
            self._reject(exc.reason, f"rejected message on {topic_name[:120]!r}: {exc}")
            return None
        site_id = delivery.topic.site_id
        entry = self.directory.get(site_id)
        if entry is None:
            self._reject("unknown_site", f"rejected message from unknown site {site_id!r}")
            return None
        if not entry.attrs.enabled:
            self._reject("disabled_site", f"rejected message from disabled site {site_id!r}")
            return None
        kind = delivery.topic.kind
        self.counters.accepted[kind.value] += 1
        if kind is Kind.CMD_REPLY:
            assert isinstance(delivery.message, CommandReply)
            for listener in self._reply_listeners:
                try:
                    listener(site_id, delivery.message)
                except Exception:
                    log.exception("command reply listener failed")
            return None
        return Accepted(site_id, kind, delivery.message, bytes(payload), time.time())

    def _reject(self, reason: str, message: str) -> None:
        self.counters.rejected[reason] += 1
        self._reject_log.warning(reason, message)

    # -- writing --

    async def _writer_loop(self) -> None:
        while True:
            await self._has_pending.wait()
            if len(self._pending) < self.config.batch_max_messages:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._batch_full.wait(), self.config.batch_max_delay_s)
            await self._write_pending()

    async def _write_pending(self) -> None:
        # At most one batch's worth: after a stall the pending list can hold up to the
        # broker's whole in-flight window, and one huge transaction would hold the SQLite
        # write lock (and PostgreSQL row locks) for seconds.
        n = self.config.batch_max_messages
        batch, self._pending = self._pending[:n], self._pending[n:]
        if not self._pending:
            self._has_pending.clear()
        if len(self._pending) < n:
            self._batch_full.clear()
        if not batch:
            return
        self._idle.clear()
        try:
            items = [r.accepted for r in batch if r.accepted is not None]
            if items:
                result = await self._apply_with_retry(items)
                if result is None:
                    return  # stopping while the database is away: nothing acknowledged
                self._fold(result)
            self._ack(batch)
        finally:
            self._idle.set()

    async def _apply_with_retry(self, items: list[Accepted]) -> BatchResult | None:
        delay = 0.5
        while True:
            started = time.perf_counter()
            try:
                result = await asyncio.to_thread(self.writer.apply, items)
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
                if _is_unavailable(exc):
                    self.counters.db_retries += 1
                    log.warning(
                        "database unavailable (%s); retrying the batch in %.1f s",
                        _first_line(exc),
                        delay,
                    )
                    if self._stopping.is_set() and delay > 4:
                        return None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                return await self._apply_one_by_one(items, exc)
            except Exception as exc:  # a bug or a constraint: isolate the message behind it
                return await self._apply_one_by_one(items, exc)
            self.counters.batches += 1
            self.counters.batch_seconds += time.perf_counter() - started
            return result

    async def _apply_one_by_one(self, items: list[Accepted], cause: Exception) -> BatchResult:
        log.error(
            "batch of %d failed (%s); writing its messages one by one",
            len(items),
            _first_line(cause),
        )
        total = BatchResult()
        for item in items:
            try:
                total.add(await asyncio.to_thread(self.writer.apply, [item]))
            except Exception as exc:
                self.counters.accepted[item.kind.value] -= 1
                self.counters.rejected["store_error"] += 1
                log.exception(
                    "could not store a %s message of site %s: %s",
                    item.kind.value,
                    item.site_id,
                    _first_line(exc),
                )
        self.counters.batches += 1
        return total

    def _fold(self, result: BatchResult) -> None:
        c = self.counters
        c.stored_events += result.stored_events
        c.duplicates += result.duplicates
        c.late_events += result.late_events
        c.missing_seqs += result.missing_seqs
        c.stale_states += result.stale_states
        c.stale_samples += result.stale_samples
        if self.alerts is not None:
            self.alerts.publish_many(result.alerts)

    def _ack(self, batch: list[_Received]) -> None:
        receiver = self._receiver
        if receiver is None:
            return
        # `mid` is the receiver's index of the message; batches are written in the order
        # received, so acknowledging the last index acknowledges the whole batch. Messages
        # of an earlier connection (generation) are redelivered on the current one.
        through = -1
        for r in batch:
            if r.generation == self._generation:
                through = r.mid
                if r.qos > 0:
                    self.counters.acked += 1
        if through >= 0:
            receiver.ack(through)

    async def _drain(self) -> None:
        """At stop: let the writer write and acknowledge what is pending while still
        connected (`_receive` takes nothing new once stopping)."""
        await self.wait_idle()

    async def _checkpoint_loop(self) -> None:
        """SQLite: checkpoint the WAL every second in a worker thread, beside the writer
        (a passive checkpoint waits for no one), so no commit of the writer has to."""
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL_S)
            try:
                if await asyncio.to_thread(self.db.checkpoint):
                    self.counters.checkpoints += 1
            except sa.exc.SQLAlchemyError as exc:
                log.warning("SQLite checkpoint failed: %s", _first_line(exc))

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sites_refresh_s)
            try:
                await self.refresh_sites()
            except sa.exc.SQLAlchemyError as exc:
                log.warning("could not re-read the sites table: %s", _first_line(exc))


async def run_data_services(
    db: Database,
    config: HubConfig,
    *,
    alerts: AlertHub,
    ready: asyncio.Event | None = None,
    counters: IngestCounters | None = None,
    signature_counters: SignatureCounters | None = None,
) -> None:
    """Everything the hub's data side runs, until cancelled: the ingest, the ticket scheduler,
    event pruning and (if configured) the webhook sender. `serve` starts this next to the web
    server and gives the same `alerts` hub to the WebSocket handlers, and the `counters` its
    /metrics endpoint reads (a fresh set otherwise)."""
    from central_hub.tickets import TicketScheduler  # tickets imports this module

    ingest = Ingest(
        db,
        config.mqtt,
        config.ingest,
        policy=LedgerPolicy(outage_image_faults=config.status.outage_image_faults),
        alerts=alerts,
    )
    if counters is not None:
        ingest.counters = counters
    webhook = None
    if config.alerts.webhook_url:
        webhook = WebhookSender(
            config.alerts.webhook_url,
            secret=config.alerts.webhook_secret,
            timeout_s=config.alerts.webhook_timeout_s,
            retries=config.alerts.webhook_retries,
            queue_size=config.alerts.webhook_queue,
        )
        webhook.start(alerts)
    scheduler = TicketScheduler(db, config.tickets, alerts=alerts)
    tasks = [
        asyncio.create_task(scheduler.run(), name="tickets"),
        asyncio.create_task(_prune_loop(db, config.status), name="prune"),
        asyncio.create_task(run_rollup(db, config.status.rollup_interval_s), name="rollup"),
        asyncio.create_task(
            SignatureChecker(db, alerts, signature_counters or SignatureCounters()).run(),
            name="signatures",
        ),
    ]
    try:
        async with ingest:
            if ready is not None:
                ready.set()
            await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if webhook is not None:
            await webhook.stop()


async def _prune_loop(db: Database, config: StatusConfig) -> None:
    def prune() -> int:
        with db.engine.begin() as conn:
            return prune_events(
                conn,
                now=time.time(),
                chain_head_days=config.chain_head_days,
                event_days=config.event_days,
            )

    while True:
        try:
            removed = await asyncio.to_thread(prune)
            if removed:
                log.info("pruned %d old events", removed)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("event pruning failed: %s", _first_line(exc))
        await asyncio.sleep(config.prune_interval_s)


def _is_unavailable(exc: BaseException) -> bool:
    """A database that is down, restarting or locked (retry), not a statement that is wrong."""
    if isinstance(exc, sa.exc.InterfaceError):
        return True
    if isinstance(exc, sa.exc.OperationalError):
        text = str(exc.orig).lower() if exc.orig is not None else str(exc).lower()
        return not any(w in text for w in ("syntax", "no such table", "no such column"))
    return False


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
