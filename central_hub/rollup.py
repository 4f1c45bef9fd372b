"""The daily per-site uptime rollup: nation-wide uptime over a month in tens of milliseconds.

`queries.uptime` straight from the outage ledger reads every outage of the period: ~1.2 s for
30 days nation-wide on SQLite (bench/hub_queries.py). This module keeps, per site and calendar
day, what it adds up, computed by the same function (`queries.uptime_live`, grouped per site),
so that whole days are summed instead of recomputed. docs/hub.md has the long form.

**Days** are calendar days in Vietnam's time, ICT (UTC+7, no daylight saving): the hub has no
time zone setting, and the board's days are ICT too.

**Rows** (`uptime_daily`, one per enrolled site and day since the first contact with any site):
the site's `queries.UptimeParts` over the day (until `computed_at` for today), and

- `steady`: every counted camera, and the site, was there all day, so a part of the day has
  their life in proportion; its down time then comes from the day's stretches
  (`uptime_intervals`, the unsummed terms of the same arithmetic) clipped to it;
- `end_*`: for a day not over when computed, the state at `computed_at` (cameras there, cameras
  down, site seen, site offline). A clean row means nothing changed since, so the day until any
  later `now` is the row plus that state times the time since: exact. None when the ledger holds
  a time after `computed_at` (an edge clock ahead);
- `dirty`, `dirty_seq` (the ledger changed on that day since), `final` (computed after the day).

**Kept current** by `UptimeRollup.refresh`, run by `run_rollup` in a worker thread every
`status.rollup_interval_seconds` and just after midnight: rows missing (a site's whole history,
logged with progress; a new day), dirty, or not final although their day is over. A clean final
row is never recomputed, a clean row of today needs not be.

**Invalidation.** The ingest calls `mark_dirty` in the transaction that writes outages. The
cameras a day counts change only with an inventory or a new camera, which `site_state` records
(`inventory_ts`, the camera counters); `uptime_sites` keeps the values the rows were computed
with, and the next pass recomputes a site's days if its counted cameras really changed. Scope,
`enabled` and grouping come from `sites` when reading, as in the live path: disabling or moving a
site needs nothing; a deleted site's rows go with it (ON DELETE CASCADE).

**Reading** (`uptime_parts`, called by `queries.uptime`): from the rows wherever they are
current; a site's day whose row is not (dirty, missing, unsteady where needed) from the ledger,
and a site whose cameras changed since its rows, its whole period. The figures equal the live
path's to float rounding: nothing is stale, only slower until a pass has caught up.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, ClassVar, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from central_hub.db import Database, dialect_insert, metadata, migration
from central_hub.ledger import OutageRecord
from central_hub.queries import (
    NO_UPTIME_FILTERS,
    SiteFilter,
    UptimeKey,
    UptimeParts,
    least_greatest,
    uptime_down_terms,
    uptime_live,
    uptime_scope,
)
from central_hub.sites import sites
from central_hub.status import cameras, outages, site_state

log = logging.getLogger(__name__)

#: Vietnam's time (UTC+7, no daylight saving): the hub's calendar days.
ICT: Final = timezone(timedelta(hours=7), "ICT")
DAY_S: Final = 86400.0
_ONE_DAY: Final = timedelta(days=1)

uptime_daily = sa.Table(
    "uptime_daily",
    metadata,
    sa.Column(
        "site_id",
        sa.String(64),
        sa.ForeignKey("sites.site_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("day", sa.Date, primary_key=True),
    # The day's bounds in UNIX seconds (ICT midnight to midnight).
    sa.Column("day_start", sa.Float, nullable=False),
    sa.Column("day_end", sa.Float, nullable=False),
    # queries.UptimeParts over [day_start, min(day_end, computed_at)).
    sa.Column("cameras", sa.Integer, nullable=False, server_default="0"),
    sa.Column("added", sa.Integer, nullable=False, server_default="0"),
    sa.Column("monitored_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("down_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("sites", sa.Integer, nullable=False, server_default="0"),
    sa.Column("site_monitored_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("site_down_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("steady", sa.Boolean, nullable=False, server_default=sa.false()),
    # State at computed_at, for a day not over then (None: cannot be extrapolated).
    sa.Column("end_cameras", sa.Integer, nullable=True),
    sa.Column("end_down", sa.Integer, nullable=True),
    sa.Column("end_sites", sa.Integer, nullable=True),
    sa.Column("end_site_down", sa.Integer, nullable=True),
    # None: a placeholder made by mark_dirty, never computed.
    sa.Column("computed_at", sa.Float, nullable=True),
    sa.Column("final", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("dirty", sa.Boolean, nullable=False, server_default=sa.true()),
    # +1 at every mark: a pass stores its result only if the row was not marked meanwhile.
    sa.Column("dirty_seq", sa.BigInteger, nullable=False, server_default="0"),
    # Per-day counts and reads (the primary key serves per-site sums over a range of days).
    sa.Index("ix_uptime_daily_day", "day", "site_id"),
    # What the job must compute: few rows, found without a scan.
    sa.Index(
        "ix_uptime_daily_pending",
        "day",
        sqlite_where=sa.text("dirty = 1 OR final = 0"),
        postgresql_where=sa.text("dirty OR NOT final"),
    ),
    # SQLite: the rows clustered by (site_id, day): a month of one site is one contiguous read.
    sqlite_with_rowid=False,
)

uptime_sites = sa.Table(
    "uptime_sites",
    metadata,
    sa.Column(
        "site_id",
        sa.String(64),
        sa.ForeignKey("sites.site_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    # site_state's values when the rows were computed: a difference means the cameras may
    # have changed (an inventory, a new camera, the first contact).
    sa.Column("inventory_ts", sa.Float, nullable=True),
    sa.Column("cameras_total", sa.Integer, nullable=True),
    sa.Column("cameras_unmonitored", sa.Integer, nullable=True),
    sa.Column("first_seen_at", sa.Float, nullable=True),
    # Hash of the cameras as uptime counts them (id, counted, first seen, removed).
    sa.Column("camera_sig", sa.String(32), nullable=False),
    # Earliest first contact of the site or any of its cameras (None: never).
    sa.Column("life_start", sa.Float, nullable=True),
    # Every day since the rollup's first day has a row for this site.
    sa.Column("built", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("checked_at", sa.Float, nullable=False),
)


#: Surrogate ids: 64-bit on PostgreSQL, SQLite's rowid alias there.
_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

uptime_intervals = sa.Table(
    "uptime_intervals",
    metadata,
    sa.Column("id", _Id, primary_key=True, autoincrement=True),
    sa.Column(
        "site_id",
        sa.String(64),
        sa.ForeignKey("sites.site_id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("day", sa.Date, nullable=False),
    # What a clean row's down_s and site_down_s add up, unsummed (queries.uptime_down_terms):
    # a part of the day is these stretches clipped to it, with no ledger read.
    sa.Column("lo", sa.Float, nullable=False),
    sa.Column("hi", sa.Float, nullable=False),
    # +1: one camera down (its own outage, or its site's); -1: both at once (counted once).
    sa.Column("camera_w", sa.SmallInteger, nullable=False),
    # 1: the site offline (connectivity).
    sa.Column("site_w", sa.SmallInteger, nullable=False),
    sa.Index("ix_uptime_intervals_day", "day", "site_id"),
)


# Component "uptime": migrations run in component-name order, and these tables refer to
# `sites` (component "sites"), which must exist first.
@migration("uptime", 1, "daily per-site uptime rollup")
def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[uptime_daily, uptime_sites, uptime_intervals])


# --- days -----------------------------------------------------------------------------------


def day_of(ts: float) -> date:
    """The ICT calendar day containing `ts`."""
    return datetime.fromtimestamp(ts, ICT).date()


def day_bounds(day: date) -> tuple[float, float]:
    """[start, end) of an ICT calendar day in UNIX seconds."""
    start = datetime(day.year, day.month, day.day, tzinfo=ICT).timestamp()
    return start, start + DAY_S


def _days(first: date, last: date) -> Iterable[date]:
    d = first
    while d <= last:
        yield d
        d += _ONE_DAY


# --- invalidation ---------------------------------------------------------------------------

#: (site_id, started_at, ended_at) of an outage inserted or updated.
OutageChange = tuple[str, float, float | None]


def mark_dirty(
    conn: Connection, changes: Iterable[OutageChange], *, now: float | None = None
) -> int:
    """Mark dirty the rows of the days these spans of changed ledger touch, in the caller's
    transaction (the ingest's, so a row is never clean with the change committed); returns how
    many.

    Each change is (site_id, start, end); `end` None: open, every day from `start` to today
    (`outage_changes` turns the ingest's inserted and updated outages into such spans). A row
    that does not exist yet is created dirty, so that a pass computing that day at the same
    time cannot store what it read before this change. Days before the site's first contact
    count nothing and are left alone (an edge clock far in the past must not make years of
    rows): its cameras are first seen in or after the batch that first saw the site.
    """
    t = time.time() if now is None else now
    by_site: dict[str, list[tuple[float, float | None]]] = defaultdict(list)
    for site_id, start, end in changes:
        by_site[site_id].append((start, end))
    if not by_site:
        return 0
    ids = sorted(by_site)
    floor: dict[str, float] = {}
    for sid, first, life in conn.execute(
        sa.select(site_state.c.site_id, site_state.c.first_seen_at, uptime_sites.c.life_start)
        .select_from(site_state)
        .outerjoin(uptime_sites, uptime_sites.c.site_id == site_state.c.site_id)
        .where(site_state.c.site_id.in_(ids))
    ):
        known = [v for v in (first, life) if v is not None]
        if known:
            floor[sid] = min(known)
    keys: set[tuple[str, date]] = set()
    for sid, spans in by_site.items():
        for start, end in spans:
            lo = max(start, floor.get(sid, start))
            hi = max(lo, t if end is None else end)
            keys.update((sid, d) for d in _days(day_of(lo), day_of(hi)))
    if not keys:
        return 0
    rows = []
    for sid, d in sorted(keys):
        start, end = day_bounds(d)
        rows.append({"site_id": sid, "day": d, "day_start": start, "day_end": end, "dirty_seq": 1})
    ins = dialect_insert(conn, uptime_daily)
    conn.execute(
        ins.on_conflict_do_update(
            index_elements=["site_id", "day"],
            set_={"dirty": sa.true(), "dirty_seq": uptime_daily.c.dirty_seq + 1},
        ),
        rows,
    )
    return len(rows)


def outage_changes(
    conn: Connection, inserted: Iterable[OutageRecord], updated: Iterable[OutageRecord]
) -> list[OutageChange]:
    """The spans of time the ledger's change covers, for `mark_dirty`: an inserted outage's
    own span; for an updated one — called before the update is written, its stored span read
    here — only where the old and new spans differ: from its end when it closes, between the
    two starts when its start moves, nothing when only its footage changed. An open end reaches
    today."""
    out: list[OutageChange] = [(r.site_id, r.started_at, r.ended_at) for r in inserted]
    by_id = {r.id: r for r in updated if r.id is not None}
    if not by_id:
        return out
    stored = conn.execute(
        sa.select(outages.c.id, outages.c.started_at, outages.c.ended_at).where(
            outages.c.id.in_(sorted(by_id))
        )
    )
    for oid, was_start, was_end in stored:
        r = by_id[oid]
        if was_start != r.started_at:
            out.append((r.site_id, min(was_start, r.started_at), max(was_start, r.started_at)))
        if was_end != r.ended_at:
            ends = [e for e in (was_end, r.ended_at) if e is not None]
            out.append((r.site_id, min(ends), None if len(ends) < 2 else max(ends)))
    return out


# --- computing rows -------------------------------------------------------------------------

_VALUE_COLUMNS: Final = (
    "cameras",
    "added",
    "monitored_s",
    "down_s",
    "sites",
    "site_monitored_s",
    "site_down_s",
    "steady",
    "end_cameras",
    "end_down",
    "end_sites",
    "end_site_down",
    "computed_at",
    "final",
)


@dataclass
class DayRows:
    """One day's rows for some sites, and each site's stretches down (`uptime_intervals`)."""

    rows: list[dict[str, Any]]
    stretches: dict[str, list[tuple[float, float, int, int]]]


def compute_day(conn: Connection, day: date, site_ids: Sequence[str], now: float) -> DayRows:
    """The rows of `day` for `site_ids` as of `now` (values of `uptime_daily`, without the
    dirty bookkeeping); none when the day has not begun."""
    d0, d1 = day_bounds(day)
    cov = min(d1, now)
    if cov <= d0:
        return DayRows([], {})
    final = now >= d1
    where = sites.c.site_id.in_(list(site_ids))
    parts = uptime_live(
        conn, d0, cov, now, (sites.c.site_id,), where, NO_UPTIME_FILTERS, enabled_only=False
    )
    camera_terms, site_terms = uptime_down_terms(conn, d0, cov, now, where)
    stretches: dict[str, list[tuple[float, float, int, int]]] = defaultdict(list)
    for sid, sign, lo, hi in camera_terms:
        stretches[sid].append((lo, hi, int(sign), 0))
    for sid, lo, hi in site_terms:
        stretches[sid].append((lo, hi, 0, 1))
    unsteady = _unsteady(conn, site_ids, d0, d1, cov, final)
    end = {} if final else _end_state(conn, site_ids, now)
    rows = []
    for sid in site_ids:
        p = parts.get((sid,)) or UptimeParts()
        e = end.get(sid)
        rows.append(
            {
                "site_id": sid,
                "day": day,
                "day_start": d0,
                "day_end": d1,
                "cameras": p.cameras,
                "added": p.added,
                "monitored_s": p.monitored_s,
                "down_s": p.down_s,
                "sites": p.sites,
                "site_monitored_s": p.site_monitored_s,
                "site_down_s": p.site_down_s,
                "steady": sid not in unsteady,
                "end_cameras": None if e is None else e[0],
                "end_down": None if e is None else e[1],
                "end_sites": None if e is None else e[2],
                "end_site_down": None if e is None else e[3],
                "computed_at": now,
                "final": final,
            }
        )
    return DayRows(rows, stretches)


def _unsteady(
    conn: Connection, site_ids: Sequence[str], d0: float, d1: float, cov: float, final: bool
) -> set[str]:
    """Sites with a counted camera (or the site itself) that began or ended within the day —
    for a day not over, also a camera removed at all: its life may end before the day does."""
    ids = list(site_ids)
    c = cameras.c
    ended = c.removed_at < d1 if final else c.removed_at.is_not(None)
    found = {
        r[0]
        for r in conn.execute(
            sa.select(c.site_id)
            .where(
                c.site_id.in_(ids),
                c.status != "unmonitored",
                c.first_seen < cov,
                sa.func.coalesce(c.removed_at, cov) > d0,
                sa.or_(c.first_seen > d0, ended),
            )
            .distinct()
        )
    }
    first = site_state.c.first_seen_at
    found.update(
        r[0]
        for r in conn.execute(
            sa.select(site_state.c.site_id).where(
                site_state.c.site_id.in_(ids), first > d0, first < (d1 if final else cov)
            )
        )
    )
    return found


def _end_state(
    conn: Connection, site_ids: Sequence[str], now: float
) -> dict[str, tuple[int, int, int, int]]:
    """Per site: (cameras there, cameras down, site seen, site down) at `now`, for the sites
    whose ledger holds no time at or after `now` (only those can be extrapolated)."""
    ids = list(site_ids)
    blocked = {
        r[0]
        for r in conn.execute(
            sa.union(
                sa.select(outages.c.site_id).where(outages.c.started_at >= now),
                sa.select(outages.c.site_id).where(outages.c.ended_at >= now),
                sa.select(cameras.c.site_id).where(
                    cameras.c.site_id.in_(ids),
                    cameras.c.status != "unmonitored",
                    sa.or_(cameras.c.first_seen >= now, cameras.c.removed_at >= now),
                ),
                sa.select(site_state.c.site_id).where(
                    site_state.c.site_id.in_(ids), site_state.c.first_seen_at >= now
                ),
            )
        )
    }
    open_cams: set[tuple[str, str]] = set()
    open_sites: set[str] = set()
    for sid, cid in conn.execute(
        sa.select(outages.c.site_id, outages.c.camera_id).where(
            outages.c.site_id.in_(ids), outages.c.ended_at.is_(None)
        )
    ):
        if cid is None:
            open_sites.add(sid)
        else:
            open_cams.add((sid, cid))
    there: dict[str, list[int]] = {sid: [0, 0] for sid in ids}
    for sid, cid in conn.execute(
        sa.select(cameras.c.site_id, cameras.c.camera_id).where(
            cameras.c.site_id.in_(ids),
            cameras.c.status != "unmonitored",
            cameras.c.first_seen < now,
            cameras.c.removed_at.is_(None),
        )
    ):
        n = there[sid]
        n[0] += 1
        n[1] += (sid, cid) in open_cams or sid in open_sites
    seen = {
        r[0]
        for r in conn.execute(
            sa.select(site_state.c.site_id).where(
                site_state.c.site_id.in_(ids), site_state.c.first_seen_at < now
            )
        )
    }
    return {
        sid: (n[0], n[1], int(sid in seen), int(sid in seen and sid in open_sites))
        for sid, n in there.items()
        if sid not in blocked
    }


def _camera_sigs(conn: Connection, site_ids: Sequence[str]) -> dict[str, tuple[str, float | None]]:
    """Per site: a hash of its cameras as uptime counts them, and their earliest first_seen."""
    lines: dict[str, list[str]] = {sid: [] for sid in site_ids}
    first: dict[str, float] = {}
    for i in range(0, len(site_ids), 500):
        chunk = list(site_ids[i : i + 500])
        for sid, cid, status, seen, removed in conn.execute(
            sa.select(
                cameras.c.site_id,
                cameras.c.camera_id,
                cameras.c.status,
                cameras.c.first_seen,
                cameras.c.removed_at,
            ).where(cameras.c.site_id.in_(chunk))
        ):
            lines[sid].append(f"{cid}\t{status == 'unmonitored'}\t{seen!r}\t{removed!r}")
            first[sid] = min(seen, first.get(sid, seen))
    return {
        sid: (
            hashlib.blake2b("\n".join(sorted(v)).encode(), digest_size=16).hexdigest(),
            first.get(sid),
        )
        for sid, v in lines.items()
    }


# --- the job --------------------------------------------------------------------------------


@dataclass
class RefreshStats:
    """What one pass did."""

    rows: int = 0
    #: Rows not stored because the ledger changed while they were computed (next pass).
    raced: int = 0
    days: int = 0
    sites_changed: int = 0
    seconds: float = 0.0
    stopped: bool = False


_SNAPSHOT: Final = ("inventory_ts", "cameras_total", "cameras_unmonitored", "first_seen_at")


class UptimeRollup:
    """Keeps `uptime_daily` current; `refresh()` is one pass (blocking: run it in a thread)."""

    def __init__(self, db: Database, *, chunk_sites: int = 500) -> None:
        self.db = db
        self.chunk_sites = chunk_sites
        self._stop = threading.Event()
        #: Days known to have a row for every built site (checked once per process).
        self._verified: set[date] = set()

    def stop(self) -> None:
        """Make a pass running in another thread return after its current chunk."""
        self._stop.set()

    def refresh(self, *, now: float | None = None) -> RefreshStats:
        """One pass: snapshots compared, then every missing, dirty or unfinished row of a day
        that began is computed and stored (unless marked again meanwhile)."""
        t = time.time() if now is None else now
        started = time.monotonic()
        stats = RefreshStats()
        today = day_of(t)
        horizon, unbuilt, stats.sites_changed = self._check_sites(t)
        if horizon is None:
            return stats
        work: dict[date, set[str]] = defaultdict(set)
        first_day = min(day_of(horizon), today)
        for d in _days(first_day, today):
            work[d].update(unbuilt)
        with self.db.engine.connect() as conn:
            for d, sid in self._missing(conn, first_day, today):
                work[d].add(sid)
            u = uptime_daily.c
            # From the pending index: dirty, or not final and (over, or not extrapolable: the
            # ledger held a time after computed_at, an edge clock ahead).
            for sid, d in conn.execute(
                sa.select(u.site_id, u.day).where(
                    sa.or_(u.dirty == sa.true(), u.final == sa.false()),
                    sa.or_(u.dirty == sa.true(), u.day_end <= t, u.end_cameras.is_(None)),
                    u.day <= today,
                )
            ):
                work[d].add(sid)
        total = sum(len(v) for v in work.values())
        if not total:
            self._verified.update(_days(first_day, today))
            return stats
        big = total > 5 * self.chunk_sites
        if big:
            log.info(
                "uptime rollup: computing %d site-days over %d days (%s to %s)",
                total,
                len(work),
                min(work),
                max(work),
            )
        last_log = time.monotonic()
        done = 0
        # Today first (the board's periods end now), then newest to oldest.
        for d in sorted(work, key=lambda d: (d != today, -d.toordinal())):
            ids = sorted(work[d])
            for i in range(0, len(ids), self.chunk_sites):
                if self._stop.is_set():
                    stats.stopped = True
                    return stats
                written, raced = self._compute_and_store(d, ids[i : i + self.chunk_sites], t)
                stats.rows += written
                stats.raced += raced
                done += len(ids[i : i + self.chunk_sites])
                if big and time.monotonic() - last_log >= 10.0:
                    last_log = time.monotonic()
                    log.info(
                        "uptime rollup: %d of %d site-days (%s), %.0f s",
                        done,
                        total,
                        d,
                        last_log - started,
                    )
            stats.days += 1
        if unbuilt:
            with self.db.engine.begin() as conn:
                conn.execute(
                    uptime_sites.update().where(uptime_sites.c.site_id.in_(sorted(unbuilt))),
                    {"built": True},
                )
        self._verified.update(_days(first_day, today))
        stats.seconds = time.monotonic() - started
        (log.info if big else log.debug)(
            "uptime rollup: %d rows over %d days in %.1f s (%d to redo: changed meanwhile)",
            stats.rows,
            stats.days,
            stats.seconds,
            stats.raced,
        )
        return stats

    def _check_sites(self, t: float) -> tuple[float | None, set[str], int]:
        """Compare site_state with the snapshots; mark the days of sites whose counted cameras
        changed. Returns the rollup's first moment (earliest life of any site), the sites whose
        history must be built, and how many sites changed."""
        ss, us = site_state.c, uptime_sites.c
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    sites.c.site_id,
                    *[ss[k].label(k) for k in _SNAPSHOT],
                    us.site_id.label("known"),
                    us.built,
                    us.camera_sig,
                    us.life_start,
                    *[us[k].label(f"us_{k}") for k in _SNAPSHOT],
                )
                .select_from(sites)
                .outerjoin(site_state, ss.site_id == sites.c.site_id)
                .outerjoin(uptime_sites, us.site_id == sites.c.site_id)
            ).all()
            look = [
                r.site_id
                for r in rows
                if r.known is None or any(r._mapping[k] != r._mapping[f"us_{k}"] for k in _SNAPSHOT)
            ]
            sigs = _camera_sigs(conn, look)
        unbuilt = {r.site_id for r in rows if r.known is not None and not r.built}
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        changed: list[dict[str, Any]] = []
        lives: list[float] = []
        for r in rows:
            m = r._mapping
            if r.site_id not in sigs:
                if r.life_start is not None:
                    lives.append(r.life_start)
                continue
            sig, cam_first = sigs[r.site_id]
            life = min((v for v in (m["first_seen_at"], cam_first) if v is not None), default=None)
            if life is not None:
                lives.append(life)
            snap = {k: m[k] for k in _SNAPSHOT}
            snap.update(camera_sig=sig, life_start=life, checked_at=t)
            if r.known is None:
                inserts.append({"site_id": r.site_id, "built": False, **snap})
                unbuilt.add(r.site_id)
            else:
                updates.append({"k_site": r.site_id, **snap})
                if sig != r.camera_sig or m["first_seen_at"] != m["us_first_seen_at"]:
                    changed.append({"k_site": r.site_id})
        if inserts or updates:
            # In site order, like the ingest's marks: row locks taken in one order never cycle.
            changed.sort(key=lambda r: r["k_site"])
            updates.sort(key=lambda r: r["k_site"])
            with self.db.engine.begin() as conn:
                if changed:
                    conn.execute(
                        uptime_daily.update()
                        .where(uptime_daily.c.site_id == sa.bindparam("k_site"))
                        .values(dirty=True, dirty_seq=uptime_daily.c.dirty_seq + 1),
                        changed,
                    )
                if updates:
                    conn.execute(
                        uptime_sites.update()
                        .where(uptime_sites.c.site_id == sa.bindparam("k_site"))
                        .values({k: sa.bindparam(k) for k in updates[0] if k != "k_site"}),
                        updates,
                    )
                if inserts:
                    conn.execute(
                        dialect_insert(conn, uptime_sites).on_conflict_do_nothing(
                            index_elements=["site_id"]
                        ),
                        inserts,
                    )
            if changed:
                log.info("uptime rollup: cameras changed at %d sites, recomputing", len(changed))
        return (min(lives) if lives else None), unbuilt, len(changed)

    def _missing(self, conn: Connection, first: date, last: date) -> list[tuple[date, str]]:
        """(day, site) of built sites without a row on a day not yet verified."""
        todo = [d for d in _days(first, last) if d not in self._verified]
        if not todo:
            return []
        u, us = uptime_daily.c, uptime_sites.c
        built = sa.select(us.site_id).where(us.built == sa.true())
        n_built = conn.execute(sa.select(sa.func.count()).select_from(built.subquery())).scalar()
        counts: dict[date, int] = dict(
            conn.execute(
                sa.select(u.day, sa.func.count())
                .where(u.day >= todo[0], u.day <= todo[-1], u.site_id.in_(built))
                .group_by(u.day)
            ).all()
        )
        out: list[tuple[date, str]] = []
        for d in todo:
            if counts.get(d, 0) < (n_built or 0):
                have = sa.select(u.site_id).where(u.day == d)
                out.extend((d, r[0]) for r in conn.execute(built.where(us.site_id.not_in(have))))
        return out

    def _compute_and_store(self, day: date, site_ids: list[str], t: float) -> tuple[int, int]:
        """Compute one day for some sites (reads only), then store each row unless it was
        marked meanwhile; returns (rows stored, rows left to the next pass)."""
        u = uptime_daily.c
        with self.db.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            # The marks first: a change committed after this is either seen below too or makes
            # the row's dirty_seq differ when storing.
            seqs = dict(
                conn.execute(
                    sa.select(u.site_id, u.dirty_seq).where(u.day == day, u.site_id.in_(site_ids))
                ).all()
            )
            computed = compute_day(conn, day, site_ids, t)
            conn.rollback()
        rows = computed.rows
        if not rows:
            return 0, 0
        old = [r for r in rows if r["site_id"] in seqs]
        new = [r for r in rows if r["site_id"] not in seqs]
        with self.db.engine.begin() as conn:
            if old:
                conn.execute(
                    uptime_daily.update()
                    .where(
                        u.site_id == sa.bindparam("k_site"),
                        u.day == sa.bindparam("k_day"),
                        u.dirty_seq == sa.bindparam("k_seq"),
                    )
                    .values(dirty=False, **{k: sa.bindparam(k) for k in _VALUE_COLUMNS}),
                    [
                        {
                            "k_site": r["site_id"],
                            "k_day": day,
                            "k_seq": seqs[r["site_id"]],
                            **{k: r[k] for k in _VALUE_COLUMNS},
                        }
                        for r in old
                    ],
                )
            if new:
                conn.execute(
                    dialect_insert(conn, uptime_daily).on_conflict_do_nothing(
                        index_elements=["site_id", "day"]
                    ),
                    [{**r, "dirty": False, "dirty_seq": 0} for r in new],
                )
            # The rows this pass stored carry its time; their stretches go with them.
            stored = [
                r[0]
                for r in conn.execute(
                    sa.select(u.site_id).where(
                        u.day == day,
                        u.site_id.in_(site_ids),
                        u.computed_at == t,
                        u.dirty == sa.false(),
                    )
                )
            ]
            if stored:
                i = uptime_intervals.c
                conn.execute(uptime_intervals.delete().where(i.day == day, i.site_id.in_(stored)))
                stretches = [
                    {"site_id": sid, "day": day, "lo": lo, "hi": hi, "camera_w": cw, "site_w": sw}
                    for sid in stored
                    for lo, hi, cw, sw in computed.stretches.get(sid, ())
                ]
                if stretches:
                    conn.execute(uptime_intervals.insert(), stretches)
        return len(stored), len(rows) - len(stored)


def _seconds_to_next_pass(now: float, interval_s: float) -> float:
    """The interval, or less to run just after the next ICT midnight (a new day needs rows)."""
    _, midnight = day_bounds(day_of(now))
    return max(1.0, min(interval_s, midnight - now + 1.0))


async def run_rollup(db: Database, interval_s: float) -> None:
    """Keep the rollup current until cancelled: a pass every `interval_s`, in a worker
    thread. The first pass after an upgrade builds the whole history (logged with progress);
    queries read the ledger for whatever is not built yet."""
    job = UptimeRollup(db)
    try:
        while True:
            try:
                await asyncio.to_thread(job.refresh)
            except Exception:  # the board falls back to the ledger; never stop the data side
                log.exception("uptime rollup pass failed; retrying in %.0f s", interval_s)
            await asyncio.sleep(_seconds_to_next_pass(time.time(), interval_s))
    finally:
        job.stop()


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """The part [lo, hi) of the period within one day; the day is known until `known` (its
    end, or `now` for today)."""

    day: date
    start: float
    end: float
    lo: float
    hi: float
    known: float

    @property
    def whole(self) -> bool:
        return self.lo == self.start and self.hi == self.known

    @property
    def past(self) -> bool:
        return self.known == self.end


@dataclass
class _Ledger:
    """Sites (with their group) the rows cannot answer for: over the whole period (cameras
    changed since their rows, history not built), or on some days only (a row dirty, missing,
    not final, not steady where a part of its day is used, or not extrapolable)."""

    whole: dict[str, UptimeKey] = field(default_factory=dict)
    days: dict[date, dict[str, UptimeKey]] = field(default_factory=dict)

    #: Days read from the ledger one by one at most; beyond, their sites are read whole.
    MAX_DAYS: ClassVar[int] = 3

    def settle(self) -> None:
        if len(self.days) > self.MAX_DAYS:
            for found in self.days.values():
                self.whole.update(found)
            self.days.clear()
        for d, found in list(self.days.items()):
            for sid in self.whole:
                found.pop(sid, None)
            if not found:
                del self.days[d]

    def skipped(self, day: date) -> list[str]:
        """Sites whose row of `day` is not read."""
        return sorted(self.whole.keys() | self.days.get(day, {}).keys())


def uptime_parts(
    conn: Connection,
    t0: float,
    t1: float,
    t_now: float,
    group_cols: tuple[Any, ...],
    site_filter: SiteFilter,
    filters: dict[str, Any],
) -> dict[UptimeKey, UptimeParts] | None:
    """`queries.uptime_live` for [t0, t1): from the rollup's rows where they are current, from
    the ledger where not (a site's day, or a site's whole period); None when the rollup cannot
    help (not built yet, or most sites not current), and the caller reads the ledger."""
    horizon = conn.execute(
        sa.select(sa.func.min(uptime_sites.c.life_start)).where(uptime_sites.c.built == sa.true())
    ).scalar()
    if horizon is None:
        return None
    # Nothing counts before the first contact with any site or camera: start there.
    lo = max(t0, day_bounds(day_of(horizon))[0])
    if lo >= t1:
        return None
    pieces = []
    for d in _days(day_of(lo), day_of(t1)):
        start, end = day_bounds(d)
        if start < t1:
            pieces.append(_Piece(d, start, end, max(lo, start), min(t1, end), min(end, t_now)))
    # Every day but the first and the last is whole and over: one run of days summed from
    # final rows, between at most two edges (a part of a day, or today).
    summed = [p for p in pieces if p.whole and p.past]
    edges = [p for p in pieces if not (p.whole and p.past)]

    in_scope: dict[UptimeKey, int] = {}
    q = uptime_scope(sa.select(*group_cols, sa.func.count()), site_filter, filters)
    for r in conn.execute(q.group_by(*group_cols) if group_cols else q):
        in_scope[tuple(r[:-1])] = int(r[-1])
    n_scope = sum(in_scope.values())
    ledger = _unanswerable(conn, t_now, group_cols, site_filter, filters, summed, edges)
    if len(ledger.whole) * 2 > n_scope:
        return None
    out, rows = _from_rows(
        conn, t_now, group_cols, site_filter, filters, pieces, summed, edges, ledger
    )
    if rows != _rows_expected(in_scope, ledger, len(pieces)):
        # Rows missing (a site enrolled after its days were computed, days the hub was down):
        # those sites from the ledger.
        ledger.whole.update(_incomplete(conn, group_cols, site_filter, filters, pieces))
        ledger.settle()
        if len(ledger.whole) * 2 > n_scope:
            return None
        out, rows = _from_rows(
            conn, t_now, group_cols, site_filter, filters, pieces, summed, edges, ledger
        )

    def from_ledger(found: dict[str, UptimeKey]) -> SiteFilter:
        where = sites.c.site_id.in_(sorted(found))
        return where if site_filter is None else sa.and_(site_filter, where)

    if ledger.whole:
        for k, v in uptime_live(
            conn, t0, t1, t_now, group_cols, from_ledger(ledger.whole), filters
        ).items():
            _add(out.setdefault(k, UptimeParts()), v)
    for pc in pieces:
        found = ledger.days.get(pc.day)
        if not found:
            continue
        for k, v in uptime_live(
            conn, pc.lo, pc.hi, t_now, group_cols, from_ledger(found), filters
        ).items():
            g = out.setdefault(k, UptimeParts())
            # As for rows: the first day's cameras, later days' new ones; the last day's sites.
            g.cameras += v.cameras if pc is pieces[0] else v.added
            g.sites += v.sites if pc is pieces[-1] else 0
            g.monitored_s += v.monitored_s
            g.down_s += v.down_s
            g.site_monitored_s += v.site_monitored_s
            g.site_down_s += v.site_down_s
    # A group is there when it had a counted camera or a site in the period, as in the live
    # path; the nation always is.
    out = {k: v for k, v in out.items() if v.cameras or v.sites or not k}
    if not group_cols:
        out.setdefault((), UptimeParts())
    return out


def _rows_expected(
    in_scope: dict[UptimeKey, int], ledger: _Ledger, days: int
) -> dict[UptimeKey, int]:
    want = {k: n * days for k, n in in_scope.items()}
    for k in ledger.whole.values():
        want[k] -= days
    for found in ledger.days.values():
        for k in found.values():
            want[k] -= 1
    return {k: n for k, n in want.items() if n}


def _add(into: UptimeParts, v: UptimeParts) -> None:
    into.cameras += v.cameras
    into.monitored_s += v.monitored_s
    into.down_s += v.down_s
    into.sites += v.sites
    into.site_monitored_s += v.site_monitored_s
    into.site_down_s += v.site_down_s


def _unanswerable(
    conn: Connection,
    t_now: float,
    group_cols: tuple[Any, ...],
    site_filter: SiteFilter,
    filters: dict[str, Any],
    summed: list[_Piece],
    edges: list[_Piece],
) -> _Ledger:
    """Which sites in scope the rows cannot answer for, over the period or on which days."""
    u, ss, us = uptime_daily.c, site_state.c, uptime_sites.c
    changed = sa.or_(
        us.site_id.is_(None),
        us.built == sa.false(),
        *[ss[k].is_distinct_from(us[k]) for k in _SNAPSHOT],
    )
    # Tagged: 0 for the whole period, i + 1 for edges[i].
    selects = [
        sa.select(sites.c.site_id, sa.literal(0), *group_cols)
        .select_from(sites)
        .outerjoin(site_state, ss.site_id == sites.c.site_id)
        .outerjoin(uptime_sites, us.site_id == sites.c.site_id)
        .where(changed)
    ]
    for n, pc in enumerate(edges, 1):
        bad = [u.dirty == sa.true(), u.computed_at.is_(None)]
        if pc.past:
            bad.append(u.final == sa.false())
        else:
            bad += [
                u.computed_at > t_now,
                u.computed_at <= u.day_start,
                sa.and_(u.computed_at < t_now, u.end_cameras.is_(None)),
            ]
        if not pc.whole:
            bad.append(u.steady == sa.false())
        selects.append(
            sa.select(sites.c.site_id, sa.literal(n), *group_cols)
            .select_from(uptime_daily)
            .join(sites, sites.c.site_id == u.site_id)
            .where(u.day == pc.day, sa.or_(*bad))
        )
        if not pc.past:
            # Today's rows come with the first pass after midnight.
            has_row = sa.exists().where(u.site_id == sites.c.site_id, u.day == pc.day)
            selects.append(sa.select(sites.c.site_id, sa.literal(n), *group_cols).where(~has_row))
    ledger = _Ledger()
    q = sa.union_all(*[uptime_scope(x, site_filter, filters) for x in selects])
    for r in conn.execute(q):
        if r[1] == 0:
            ledger.whole[r[0]] = tuple(r[2:])
        else:
            ledger.days.setdefault(edges[r[1] - 1].day, {})[r[0]] = tuple(r[2:])
    if summed:
        # From the pending index (dirty or not final): a few rows, not a month of them.
        pending = (
            sa.select(u.site_id, u.day)
            .where(
                u.day >= summed[0].day,
                u.day <= summed[-1].day,
                sa.or_(u.dirty == sa.true(), u.final == sa.false()),
            )
            .cte("pending")
            .prefix_with("MATERIALIZED")
        )
        q2 = uptime_scope(
            sa.select(sites.c.site_id, pending.c.day, *group_cols)
            .select_from(pending)
            .join(sites, sites.c.site_id == pending.c.site_id),
            site_filter,
            filters,
        )
        for r in conn.execute(q2):
            ledger.days.setdefault(r[1], {})[r[0]] = tuple(r[2:])
    ledger.settle()
    return ledger


def _incomplete(
    conn: Connection,
    group_cols: tuple[Any, ...],
    site_filter: SiteFilter,
    filters: dict[str, Any],
    pieces: list[_Piece],
) -> dict[str, UptimeKey]:
    """Sites in scope without a row for every day of the period."""
    u = uptime_daily.c
    n = (
        sa.select(sa.func.count())
        .where(u.site_id == sites.c.site_id, u.day >= pieces[0].day, u.day <= pieces[-1].day)
        .scalar_subquery()
    )
    q = uptime_scope(
        sa.select(sites.c.site_id, *group_cols).where(n < len(pieces)), site_filter, filters
    )
    return {r[0]: tuple(r[1:]) for r in conn.execute(q)}


def _from_rows(
    conn: Connection,
    t_now: float,
    group_cols: tuple[Any, ...],
    site_filter: SiteFilter,
    filters: dict[str, Any],
    pieces: list[_Piece],
    summed: list[_Piece],
    edges: list[_Piece],
    ledger: _Ledger,
) -> tuple[dict[UptimeKey, UptimeParts], dict[UptimeKey, int]]:
    """Per group, the period from the rows the ledger does not replace, and how many rows
    were read (to find missing ones).

    Whole past days are summed; a period's cameras are those of its first day plus those first
    seen on later days, its sites those of its last day. Today is its row plus the state at
    `computed_at` times the time since. A part of a day takes its cameras' and site's life from
    a steady row (all there all day: in proportion) and its down time from the day's stretches
    clipped to it (`uptime_intervals`; for today, plus the state at `computed_at` after it)."""
    u, i = uptime_daily.c, uptime_intervals.c
    least, greatest = least_greatest(conn)
    first, last = pieces[0], pieces[-1]
    zero_i, zero_f = sa.literal(0), sa.literal(0.0)
    sum_ = sa.func.sum
    selects = []

    def grouped(q: sa.Select[Any], site_col: Any, day: date | None) -> sa.Select[Any]:
        skipped = sorted(ledger.whole) if day is None else ledger.skipped(day)
        if skipped:
            q = q.where(site_col.not_in(skipped))
        q = uptime_scope(q, site_filter, filters)
        return q.group_by(*group_cols) if group_cols else q

    def of_day(day: date, *values: Any) -> sa.Select[Any]:
        """(rows read, cameras, monitored, down, sites, site monitored, site down) of `day`."""
        q = (
            sa.select(*group_cols, *values)
            .select_from(uptime_daily)
            .join(sites, sites.c.site_id == u.site_id)
            .where(u.day == day)
        )
        return grouped(q, u.site_id, day)

    if summed:
        where = [u.day >= summed[0].day, u.day <= summed[-1].day]
        narrowed = site_filter is not None or any(v is not None for v in filters.values())
        if conn.dialect.name == "sqlite" or narrowed:
            # SQLite then reads each site's days in primary-key order, no sort; PostgreSQL
            # hashes a month of rows faster without this join when the scope is the nation
            # (measured: 16 ms instead of 22 for 58,000 rows).
            in_scope = uptime_scope(sa.select(sites.c.site_id), site_filter, filters)
            where.append(u.site_id.in_(in_scope.scalar_subquery()))
        if ledger.whole:
            where.append(u.site_id.not_in(sorted(ledger.whole)))
        per_site = (
            sa.select(
                u.site_id,
                sa.func.count().label("n"),
                sum_(u.added).label("added"),
                sum_(u.monitored_s).label("mon"),
                sum_(u.down_s).label("down"),
                sum_(u.site_monitored_s).label("smon"),
                sum_(u.site_down_s).label("sdown"),
            )
            .where(*where)
            .group_by(u.site_id)
            .subquery("per_site")
        )
        p = per_site.c
        q = sa.select(
            *group_cols,
            sum_(p.n),
            sum_(p.added),
            sum_(p.mon),
            sum_(p.down),
            zero_i,
            sum_(p.smon),
            sum_(p.sdown),
        ).select_from(per_site.join(sites, sites.c.site_id == p.site_id))
        q = uptime_scope(q, site_filter, filters)
        selects.append(q.group_by(*group_cols) if group_cols else q)
        # Minus the rows read from the ledger instead (dirty ones, usually few).
        bad = [
            sa.and_(u.day == d, u.site_id.in_(sorted(found)))
            for d, found in ledger.days.items()
            if summed[0].day <= d <= summed[-1].day
        ]
        if bad:
            q = (
                sa.select(
                    *group_cols,
                    -sa.func.count(),
                    -sum_(u.added),
                    -sum_(u.monitored_s),
                    -sum_(u.down_s),
                    zero_i,
                    -sum_(u.site_monitored_s),
                    -sum_(u.site_down_s),
                )
                .select_from(uptime_daily)
                .join(sites, sites.c.site_id == u.site_id)
                .where(sa.or_(*bad))
            )
            selects.append(grouped(q, u.site_id, None))
        if first is summed[0]:
            selects.append(
                of_day(
                    first.day,
                    zero_i,
                    sum_(u.cameras - u.added),
                    zero_f,
                    zero_f,
                    zero_i,
                    zero_f,
                    zero_f,
                )
            )
        if last is summed[-1]:
            selects.append(
                of_day(last.day, zero_i, zero_i, zero_f, zero_f, sum_(u.sites), zero_f, zero_f)
            )
    for pc in edges:
        cam = sum_(u.cameras if pc is first else u.added)
        n_sites = sum_(u.sites) if pc is last else zero_i
        if pc.whole:
            # Today until now: the row, then the state at computed_at since.
            ext = sa.literal(t_now) - u.computed_at
            selects.append(
                of_day(
                    pc.day,
                    sa.func.count(),
                    cam,
                    sum_(u.monitored_s + sa.func.coalesce(u.end_cameras, 0) * ext),
                    sum_(u.down_s + sa.func.coalesce(u.end_down, 0) * ext),
                    n_sites,
                    sum_(u.site_monitored_s + sa.func.coalesce(u.end_sites, 0) * ext),
                    sum_(u.site_down_s + sa.func.coalesce(u.end_site_down, 0) * ext),
                )
            )
            continue
        span = sa.literal(pc.hi - pc.lo)
        down: Any = zero_f
        sdown: Any = zero_f
        if not pc.past:
            # Today: the state at computed_at for the part after it.
            after = sa.case(
                (
                    u.computed_at < pc.hi,
                    sa.literal(pc.hi) - greatest(sa.literal(pc.lo), u.computed_at),
                ),
                else_=zero_f,
            )
            down = sum_(sa.func.coalesce(u.end_down, 0) * after)
            sdown = sum_(sa.func.coalesce(u.end_site_down, 0) * after)
        selects.append(
            of_day(
                pc.day,
                sa.func.count(),
                cam,
                sum_(u.cameras) * span,
                down,
                n_sites,
                sum_(u.sites) * span,
                sdown,
            )
        )
        clip = least(i.hi, sa.literal(pc.hi)) - greatest(i.lo, sa.literal(pc.lo))
        q = (
            sa.select(
                *group_cols,
                zero_i,
                zero_i,
                zero_f,
                sum_(i.camera_w * clip),
                zero_i,
                zero_f,
                sum_(i.site_w * clip),
            )
            .select_from(uptime_intervals)
            .join(sites, sites.c.site_id == i.site_id)
            .where(i.day == pc.day, i.lo < pc.hi, i.hi > pc.lo)
        )
        selects.append(grouped(q, i.site_id, pc.day))
    n = len(group_cols)
    out: dict[UptimeKey, UptimeParts] = {}
    rows: dict[UptimeKey, int] = defaultdict(int)
    for r in conn.execute(sa.union_all(*selects)):
        if r[n] is None:
            continue  # the nation's single row over no rows at all
        k = tuple(r[:n])
        rows[k] += int(r[n])
        _add(
            out.setdefault(k, UptimeParts()),
            UptimeParts(
                cameras=int(r[n + 1] or 0),
                monitored_s=float(r[n + 2] or 0.0),
                down_s=float(r[n + 3] or 0.0),
                sites=int(r[n + 4] or 0),
                site_monitored_s=float(r[n + 5] or 0.0),
                site_down_s=float(r[n + 6] or 0.0),
            ),
        )
    return out, {k: v for k, v in rows.items() if v}
