"""The hub's picture of every site and camera: current state, events, missing data, outages,
tickets, last health sample and thumbnail.

Written by the ingest (`central_hub.ingest`, one writer per hub process, batched) and by the
ticket operations (`central_hub.tickets`); read by `central_hub.queries`. Every table is keyed
by the site id of the `sites` table (`central_hub.sites`), so the authorization layer's
`site_filter` (a where-clause over `sites`) scopes every read by one join.

Design notes, with the numbers behind them (docs/hub.md has the long form):

- **Times** are UNIX seconds as floats, like the wire (`sitelink.messages`) and `sites`.
- **Current state is denormalised on purpose**: `cameras.status` and the per-site counters and
  `rag` colour in `site_state` are maintained by the writer, so the board's province → district
  → site counts aggregate 2,000 `site_state` rows instead of joining 32,000 cameras on every
  page view.
- **Events** keep the edge's raw JSON (`body`) under the key (site, epoch, seq): the primary key
  is the de-duplication. `epoch` grows when an edge restarts its sequence from scratch (a box
  re-imaged or replaced): its new events would otherwise collide with the old ones and be
  dropped as duplicates. Chain heads (one per camera per minute: 46 M rows a day at 32,000
  cameras) are pruned after `chain_head_days`; other events after `event_days`
  (`prune_events`).
- **Missing data** is a set of seq ranges per (site, epoch), not one row per seq: a hole may be
  huge (an edge that lost its spool).
- **Health**: the last sample per camera is a row in the database, not process memory, because
  several hub instances share the ingest (`$share/`): the instance serving a page is usually
  not the one that received the sample. Thumbnails sit in their own table so that scans of
  `camera_health` never read image bytes; only the latest thumbnail per camera is kept
  (≤ 12 KiB each, ≤ 384 MiB for 32,000 cameras, typically a third of that).
"""

from __future__ import annotations

from typing import Final, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from central_hub import sites as _sites  # noqa: F401  (the `sites` table must exist first)
from central_hub.db import metadata, migration

#: Surrogate ids: 64-bit on PostgreSQL, SQLite's rowid alias there (INTEGER PRIMARY KEY).
_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

CameraStatus = Literal["ok", "degraded", "down", "unmonitored", "removed"]
#: `ok`: recording, no fault; `degraded`: a fault that is not an outage (e.g. blurred);
#: `down`: an outage is open; `unmonitored`: the edge does not record it (disabled or
#: ineligible in the inventory); `removed`: no longer in the site's inventory.
CAMERA_STATUSES: Final[tuple[CameraStatus, ...]] = (
    "ok",
    "degraded",
    "down",
    "unmonitored",
    "removed",
)

Rag = Literal["red", "amber", "green"]
RAGS: Final[tuple[Rag, ...]] = ("red", "amber", "green")

OutageKind = Literal["site_offline", "camera_down", "recording_gap", "image_fault"]
OUTAGE_KINDS: Final[tuple[OutageKind, ...]] = (
    "site_offline",
    "camera_down",
    "recording_gap",
    "image_fault",
)

TicketState = Literal["open", "acknowledged", "resolved", "closed"]
TICKET_STATES: Final[tuple[TicketState, ...]] = ("open", "acknowledged", "resolved", "closed")

site_state = sa.Table(
    "site_state",
    metadata,
    sa.Column(
        "site_id",
        sa.String(64),
        sa.ForeignKey("sites.site_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    # None: never heard from; True after a birth; False after a death.
    sa.Column("online", sa.Boolean, nullable=True),
    sa.Column("rag", sa.String(8), nullable=False, server_default="red"),
    # +1 at every batch that touches the site: the ingest's writer keeps the site's cameras
    # and open outages in memory and re-reads them only when another writer (another hub
    # instance) moved this number.
    sa.Column("version", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("bdseq", sa.BigInteger, nullable=True),
    sa.Column("birth_ts", sa.Float, nullable=True),
    sa.Column("death_ts", sa.Float, nullable=True),
    sa.Column("death_reason", sa.String(16), nullable=True),
    sa.Column("state_since", sa.Float, nullable=True),
    sa.Column("agent_version", sa.String(64), nullable=True),
    sa.Column("agent_started", sa.Float, nullable=True),
    sa.Column("epoch", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_seq", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("last_seq_reported", sa.BigInteger, nullable=True),
    sa.Column("missing_events", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("first_seen_at", sa.Float, nullable=True),
    sa.Column("last_seen_at", sa.Float, nullable=True),
    # Box metrics of the last health sample.
    sa.Column("health_ts", sa.Float, nullable=True),
    sa.Column("disk_total_bytes", sa.BigInteger, nullable=True),
    sa.Column("disk_used_bytes", sa.BigInteger, nullable=True),
    sa.Column("disk_free_bytes", sa.BigInteger, nullable=True),
    sa.Column("forecast_days", sa.Float, nullable=True),
    sa.Column("cpu_percent", sa.Float, nullable=True),
    sa.Column("mem_total_bytes", sa.BigInteger, nullable=True),
    sa.Column("mem_used_bytes", sa.BigInteger, nullable=True),
    sa.Column("clock_offset_s", sa.Float, nullable=True),
    sa.Column("uptime_s", sa.Float, nullable=True),
    sa.Column("spool_depth", sa.BigInteger, nullable=True),
    # Levels from `disk` / `clock` events (ok, warning, critical).
    sa.Column("disk_level", sa.String(8), nullable=True),
    sa.Column("clock_level", sa.String(8), nullable=True),
    sa.Column("inventory_ts", sa.Float, nullable=True),
    # What the box claims about itself that differs from its enrolment (never applied).
    sa.Column("inventory_mismatch", sa.Text, nullable=True),
    # Counters over this site's cameras, maintained by the writer (see module docstring).
    sa.Column("cameras_total", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cameras_down", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cameras_degraded", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cameras_unmonitored", sa.Integer, nullable=False, server_default="0"),
    sa.Index("ix_site_state_rag", "rag"),
)

cameras = sa.Table(
    "cameras",
    metadata,
    sa.Column(
        "site_id",
        sa.String(64),
        sa.ForeignKey("sites.site_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("camera_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.Text, nullable=True),
    sa.Column("manufacturer", sa.Text, nullable=True),
    sa.Column("model", sa.Text, nullable=True),
    sa.Column("codec", sa.String(16), nullable=True),
    sa.Column("resolution", sa.String(16), nullable=True),
    # The edge's own word on the camera (sitelink CameraState); None before any inventory.
    sa.Column("inv_state", sa.String(16), nullable=True),
    # None: not yet in any inventory (known from events only).
    sa.Column("in_inventory", sa.Boolean, nullable=True),
    sa.Column("status", sa.String(16), nullable=False, server_default="ok"),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("removed_at", sa.Float, nullable=True),
    sa.Column("updated_at", sa.Float, nullable=False),
    # Conditions, each from its own events: stream down, recording gap, image faults.
    sa.Column("down_since", sa.Float, nullable=True),
    sa.Column("down_cause", sa.String(16), nullable=True),
    sa.Column("gap_since", sa.Float, nullable=True),
    sa.Column("gap_cause", sa.String(16), nullable=True),
    # Active image faults, comma-separated in sorted order ("" when none).
    sa.Column("image_faults", sa.String(64), nullable=False, server_default=""),
    sa.Column("image_since", sa.Float, nullable=True),
    # Start of the outage open now (None: none).
    sa.Column("outage_since", sa.Float, nullable=True),
    # Highest (epoch, seq) applied to this camera's state; older events only fill the ledger.
    sa.Column("last_event_epoch", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_event_seq", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("last_event_ts", sa.Float, nullable=True),
    # Latest signed chain head (tamper evidence; the full history is in `events`).
    sa.Column("chain_segment_seq", sa.BigInteger, nullable=True),
    sa.Column("chain_row_hash", sa.String(64), nullable=True),
    sa.Column("chain_time", sa.Float, nullable=True),
    sa.Index("ix_cameras_status", "status", "site_id"),
)

camera_health = sa.Table(
    "camera_health",
    metadata,
    sa.Column("site_id", sa.String(64), primary_key=True),
    sa.Column("camera_id", sa.String(64), primary_key=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("connected", sa.Boolean, nullable=False),
    sa.Column("recording", sa.String(16), nullable=False),
    sa.Column("last_packet_age_s", sa.Float, nullable=True),
    sa.Column("fps", sa.Float, nullable=True),
    sa.Column("bitrate_kbps", sa.Float, nullable=True),
    sa.Column("reconnects_1h", sa.BigInteger, nullable=False),
    sa.Column("gap_since", sa.Float, nullable=True),
    sa.Column("segment_write_lag_s", sa.Float, nullable=True),
    sa.Column("luma_mean", sa.Float, nullable=True),
    sa.Column("sharpness", sa.Float, nullable=True),
    sa.Column("motion", sa.Float, nullable=True),
    sa.Column("scene_diff", sa.Float, nullable=True),
    sa.Column("faults", sa.String(64), nullable=False, server_default=""),
)

camera_thumbnails = sa.Table(
    "camera_thumbnails",
    metadata,
    sa.Column("site_id", sa.String(64), primary_key=True),
    sa.Column("camera_id", sa.String(64), primary_key=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("jpeg", sa.LargeBinary, nullable=False),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("site_id", sa.String(64), primary_key=True),
    sa.Column("epoch", sa.Integer, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("camera_id", sa.String(64), nullable=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    # Pruning by age (`prune_events`); the primary key already serves "recent events of a site".
    sa.Index("ix_events_received", "received_at"),
)

missing_seq = sa.Table(
    "missing_seq",
    metadata,
    sa.Column("site_id", sa.String(64), primary_key=True),
    sa.Column("epoch", sa.Integer, primary_key=True),
    sa.Column("first_seq", sa.BigInteger, primary_key=True),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
    sa.Column("detected_at", sa.Float, nullable=False),
    # When the hole was alerted (`seq_gap`); None until it has stayed open for
    # `ingest.gap_alert_delay_seconds` (central_hub.ingest.GapAlerter).
    sa.Column("alerted_at", sa.Float, nullable=True),
)

outages = sa.Table(
    "outages",
    metadata,
    sa.Column("id", _Id, primary_key=True, autoincrement=True),
    sa.Column(
        "site_id",
        sa.String(64),
        sa.ForeignKey("sites.site_id", ondelete="CASCADE"),
        nullable=False,
    ),
    # None: the whole site (its box went offline).
    sa.Column("camera_id", sa.String(64), nullable=True),
    sa.Column("kind", sa.String(16), nullable=False),
    # Detail of the kind: sitelink Cause for streams and gaps, the fault for images, the death
    # reason (lost, shutdown) for sites.
    sa.Column("cause", sa.String(16), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float, nullable=True),
    # What ended it: event, health (reconciled from a health sample), birth, removed, disabled.
    sa.Column("end_reason", sa.String(16), nullable=True),
    sa.Column("footage_lost", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("footage_lost_s", sa.Float, nullable=False, server_default="0"),
    sa.Index("ix_outages_site_camera_start", "site_id", "camera_id", "started_at"),
    sa.Index("ix_outages_started", "started_at"),
    sa.Index("ix_outages_ended", "ended_at"),
    sa.Index(
        "ix_outages_open",
        "site_id",
        sqlite_where=sa.text("ended_at IS NULL"),
        postgresql_where=sa.text("ended_at IS NULL"),
    ),
)

tickets = sa.Table(
    "tickets",
    metadata,
    sa.Column("id", _Id, primary_key=True, autoincrement=True),
    sa.Column(
        "outage_id",
        _Id,
        sa.ForeignKey("outages.id", ondelete="CASCADE"),
        nullable=False,
        unique=True,
    ),
    sa.Column(
        "site_id",
        sa.String(64),
        sa.ForeignKey("sites.site_id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("camera_id", sa.String(64), nullable=True),
    sa.Column("state", sa.String(16), nullable=False),
    # Copied from the outage when the ticket opens and again when it is resolved, so that
    # MTTR is an aggregate over tickets alone.
    sa.Column("outage_started_at", sa.Float, nullable=False),
    sa.Column("footage_lost", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("assignee", sa.Text, nullable=True),
    sa.Column("opened_at", sa.Float, nullable=False),
    sa.Column("acknowledged_at", sa.Float, nullable=True),
    sa.Column("acknowledged_by", sa.Text, nullable=True),
    sa.Column("resolved_at", sa.Float, nullable=True),
    sa.Column("closed_at", sa.Float, nullable=True),
    sa.Column("closed_by", sa.Text, nullable=True),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Index("ix_tickets_state_opened", "state", "opened_at"),
    sa.Index("ix_tickets_site", "site_id", "opened_at"),
    sa.Index("ix_tickets_resolved", "resolved_at"),
)

ticket_notes = sa.Table(
    "ticket_notes",
    metadata,
    sa.Column("id", _Id, primary_key=True, autoincrement=True),
    sa.Column(
        "ticket_id",
        _Id,
        sa.ForeignKey("tickets.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("author", sa.Text, nullable=False),
    # open, acknowledged, assigned, note, resolved, closed: the ticket's history in one list.
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("text", sa.Text, nullable=False, server_default=""),
    sa.Index("ix_ticket_notes_ticket", "ticket_id", "at"),
)

STATUS_TABLES: Final = (
    site_state,
    cameras,
    camera_health,
    camera_thumbnails,
    events,
    missing_seq,
    outages,
    tickets,
    ticket_notes,
)


@migration("status", 1, "site and camera state, events, missing seq, outages, tickets")
def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=list(STATUS_TABLES))


@migration("status", 2, "missing_seq.alerted_at: holes are alerted once they have lasted")
def _v2(conn: Connection) -> None:
    # v1 creates the table as declared now; this adds the column to databases made before.
    columns = {c["name"] for c in sa.inspect(conn).get_columns("missing_seq")}
    if "alerted_at" not in columns:
        conn.execute(sa.text("ALTER TABLE missing_seq ADD COLUMN alerted_at FLOAT"))


def prune_events(conn: Connection, *, now: float, chain_head_days: float, event_days: float) -> int:
    """Delete chain heads older than `chain_head_days` and other events older than
    `event_days` (by hub receive time); returns the rows removed.

    The seq bookkeeping (`site_state.max_seq`, `missing_seq`) does not need old rows, so
    pruning never turns an old seq into a hole. Tombstones and alarms are ordinary events and
    live for `event_days`.
    """
    removed = 0
    heads = conn.execute(
        events.delete().where(
            events.c.kind == "chain_head",
            events.c.received_at < now - chain_head_days * 86400.0,
        )
    )
    removed += heads.rowcount or 0
    others = conn.execute(events.delete().where(events.c.received_at < now - event_days * 86400.0))
    removed += others.rowcount or 0
    return removed
