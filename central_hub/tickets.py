"""Repair tickets: an outage that lasts too long gets one, until a person confirms the repair.

Life of a ticket::

    open ──acknowledge──> acknowledged ──(outage ends: the ingest)──> resolved ──close──> closed
      └───────────────(outage ends)──────────────────────────────────┘

- `open_tickets_for_long_outages(conn, now=…)` opens one ticket per outage longer than the
  threshold (open outages by their age, ended ones by their length, so an outage learnt late from
  a replayed spool gets its ticket too, already `resolved`). `TicketScheduler` runs it every
  `tickets.check_interval_seconds`; several hub instances may run it at once (the unique
  `outage_id` makes the second insert a no-op).
- The ingest marks a ticket `resolved` in the same transaction that ends its outage.
- `close()` needs `resolved`: a ticket is closed only when the outage is over *and* someone
  confirmed the repair (issue 6).

Every change appends a row to `ticket_notes` (author, action, text): the ticket's history.
Who may do what is decided by the caller (`can(user, action, site)`); functions here take an
optional `site_filter` as a second line of defence, and say "no such ticket" for a ticket
outside it, exactly as for one that does not exist.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from central_hub.alerts import Alert, AlertHub, duration_text, make_alert
from central_hub.db import Database, dialect_insert
from central_hub.hub_config import TicketsConfig
from central_hub.sites import SiteAttrs, sites
from central_hub.status import TicketState, outages, ticket_notes, tickets

log = logging.getLogger(__name__)

MAX_NOTE: Final = 4000
MAX_NAME: Final = 200
_NO_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class TicketError(Exception):
    """A ticket operation that cannot be done; the message says why, for the user."""


def _check_text(label: str, value: str, limit: int, *, newlines: bool) -> str:
    if not isinstance(value, str):
        raise TicketError(f"{label} must be text")
    value = value.strip()
    if not value:
        raise TicketError(f"{label} must not be empty")
    if len(value) > limit:
        raise TicketError(f"{label} is longer than {limit} characters")
    if _NO_CONTROL.search(value) or (not newlines and ("\n" in value or "\t" in value)):
        raise TicketError(f"{label} contains control characters")
    return value


def _check_user(name: str) -> str:
    return _check_text("user", name, MAX_NAME, newlines=False)


def _optional_note(note: str | None) -> str:
    return _check_text("note", note, MAX_NOTE, newlines=True) if note else ""


def open_tickets_for_long_outages(
    conn: Connection, *, now: float, threshold_s: float, lookback_s: float = 7 * 86400.0
) -> list[int]:
    """Open a ticket for every outage longer than `threshold_s` that has none; returns the
    new tickets' ids. `now` is the clock (a parameter so tests and replays choose it)."""
    has_ticket = sa.exists().where(tickets.c.outage_id == outages.c.id)
    long_open = sa.and_(outages.c.ended_at.is_(None), outages.c.started_at <= now - threshold_s)
    long_ended = sa.and_(
        outages.c.ended_at.is_not(None),
        outages.c.ended_at >= now - lookback_s,
        outages.c.ended_at - outages.c.started_at >= threshold_s,
    )
    rows = conn.execute(
        sa.select(
            outages.c.id,
            outages.c.site_id,
            outages.c.camera_id,
            outages.c.started_at,
            outages.c.ended_at,
            outages.c.footage_lost,
        )
        .where(sa.or_(long_open, long_ended), ~has_ticket)
        .order_by(outages.c.started_at)
    ).all()
    if not rows:
        return []
    values = [
        {
            "outage_id": r.id,
            "site_id": r.site_id,
            "camera_id": r.camera_id,
            "state": "open" if r.ended_at is None else "resolved",
            "outage_started_at": r.started_at,
            "footage_lost": r.footage_lost,
            "opened_at": now,
            "resolved_at": r.ended_at,
            "updated_at": now,
        }
        for r in rows
    ]
    stmt = dialect_insert(conn, tickets).on_conflict_do_nothing(index_elements=["outage_id"])
    created = conn.execute(stmt.returning(tickets.c.id, tickets.c.state), values).all()
    if created:
        conn.execute(
            ticket_notes.insert(),
            [
                {
                    "ticket_id": t.id,
                    "at": now,
                    "author": "system",
                    "action": "open",
                    "text": "outage longer than the threshold"
                    + ("" if t.state == "open" else "; it had already ended"),
                }
                for t in created
            ],
        )
    return [t.id for t in created]


def _load(conn: Connection, ticket_id: int, site_filter: ColumnElement[bool] | None) -> sa.Row[Any]:
    q = sa.select(tickets).join(sites, sites.c.site_id == tickets.c.site_id)
    q = q.where(tickets.c.id == ticket_id)
    if site_filter is not None:
        q = q.where(site_filter)
    row = conn.execute(q).first()
    if row is None:
        raise TicketError(f"no such ticket #{ticket_id}")
    return row


def _transition(
    conn: Connection,
    ticket_id: int,
    *,
    allowed_from: tuple[TicketState, ...],
    values: dict[str, Any],
    site_filter: ColumnElement[bool] | None,
    what: str,
    by: str,
    now: float,
    text: str,
) -> None:
    """Change the ticket only if it is still in one of `allowed_from`, and write the history
    note (action `what`, by `by`, saying `text`)."""
    row = _load(conn, ticket_id, site_filter)
    res = conn.execute(
        tickets.update()
        .where(tickets.c.id == ticket_id, tickets.c.state.in_(allowed_from))
        .values(**values, updated_at=now)
    )
    if res.rowcount != 1:
        raise TicketError(
            f"ticket #{ticket_id} is {row.state}: it cannot be {what} "
            f"(only when {' or '.join(allowed_from)})"
        )
    _note(conn, ticket_id, now, by, what, text)


def _note(conn: Connection, ticket_id: int, at: float, author: str, action: str, text: str) -> None:
    conn.execute(
        ticket_notes.insert().values(
            ticket_id=ticket_id, at=at, author=author, action=action, text=text
        )
    )


def acknowledge(
    conn: Connection,
    ticket_id: int,
    *,
    by: str,
    now: float,
    note: str | None = None,
    site_filter: ColumnElement[bool] | None = None,
) -> None:
    """Someone has taken the ticket (open → acknowledged)."""
    by = _check_user(by)
    text = _optional_note(note)
    _transition(
        conn,
        ticket_id,
        allowed_from=("open",),
        values={"state": "acknowledged", "acknowledged_at": now, "acknowledged_by": by},
        site_filter=site_filter,
        what="acknowledged",
        by=by,
        now=now,
        text=text,
    )


def assign(
    conn: Connection,
    ticket_id: int,
    *,
    assignee: str,
    by: str,
    now: float,
    site_filter: ColumnElement[bool] | None = None,
) -> None:
    """Give the ticket to a person or team (any state but closed)."""
    by = _check_user(by)
    assignee = _check_text("assignee", assignee, MAX_NAME, newlines=False)
    _transition(
        conn,
        ticket_id,
        allowed_from=("open", "acknowledged", "resolved"),
        values={"assignee": assignee},
        site_filter=site_filter,
        what="assigned",
        by=by,
        now=now,
        text=assignee,
    )


def add_note(
    conn: Connection,
    ticket_id: int,
    *,
    author: str,
    text: str,
    now: float,
    site_filter: ColumnElement[bool] | None = None,
) -> None:
    """Append a note (any state, closed included: a late remark is still history)."""
    author = _check_user(author)
    text = _check_text("note", text, MAX_NOTE, newlines=True)
    _load(conn, ticket_id, site_filter)
    conn.execute(tickets.update().where(tickets.c.id == ticket_id).values(updated_at=now))
    _note(conn, ticket_id, now, author, "note", text)


def close(
    conn: Connection,
    ticket_id: int,
    *,
    by: str,
    now: float,
    note: str | None = None,
    site_filter: ColumnElement[bool] | None = None,
) -> None:
    """Confirm the repair (resolved → closed). Refused while the outage goes on."""
    by = _check_user(by)
    text = _optional_note(note)
    row = _load(conn, ticket_id, site_filter)
    if row.state in ("open", "acknowledged"):
        raise TicketError(
            f"ticket #{ticket_id}: the outage is still going on; it can be closed once the "
            "camera or site is back (the ticket is then resolved)"
        )
    _transition(
        conn,
        ticket_id,
        allowed_from=("resolved",),
        values={"state": "closed", "closed_at": now, "closed_by": by},
        site_filter=site_filter,
        what="closed",
        by=by,
        now=now,
        text=text,
    )


def ticket_alerts(conn: Connection, ticket_ids: list[int]) -> list[Alert]:
    """`ticket_opened` alerts for freshly opened tickets."""
    if not ticket_ids:
        return []
    rows = conn.execute(
        sa.select(
            tickets.c.id,
            tickets.c.state,
            tickets.c.camera_id,
            tickets.c.outage_id,
            outages.c.kind,
            outages.c.cause,
            outages.c.started_at,
            outages.c.ended_at,
            sites,
        )
        .join(outages, outages.c.id == tickets.c.outage_id)
        .join(sites, sites.c.site_id == tickets.c.site_id)
        .where(tickets.c.id.in_(ticket_ids))
        .order_by(tickets.c.id)
    ).all()
    alerts: list[Alert] = []
    for r in rows:
        m = r._mapping
        attrs = SiteAttrs.from_row(dict(m))
        end = r.ended_at if r.ended_at is not None else time.time()
        vi, en = duration_text(end - r.started_at)
        subject_vi = (
            f"camera {r.camera_id} tại điểm {attrs.site_id}"
            if r.camera_id
            else (f"điểm {attrs.site_id}")
        )
        subject_en = (
            f"camera {r.camera_id} at site {attrs.site_id}"
            if r.camera_id
            else (f"site {attrs.site_id}")
        )
        alerts.append(
            make_alert(
                "ticket_opened",
                at=time.time(),
                severity="critical" if r.state == "open" else "warning",
                site=attrs,
                site_name=m["name"] or attrs.site_id,
                camera_id=r.camera_id,
                text_vi=f"Phiếu #{r.id}: {subject_vi} gián đoạn {vi} ({r.kind}/{r.cause})",
                text_en=f"Ticket #{r.id}: {subject_en} out for {en} ({r.kind}/{r.cause})",
                ticket_id=r.id,
                outage_id=r.outage_id,
                state=r.state,
                kind=r.kind,
                cause=r.cause,
                started_at=r.started_at,
                ended_at=r.ended_at,
            )
        )
    return alerts


class TicketScheduler:
    """Looks for long outages every `check_interval_s` and opens their tickets."""

    def __init__(
        self,
        db: Database,
        config: TicketsConfig,
        *,
        alerts: AlertHub | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.config = config
        self.alerts = alerts
        self.clock = clock
        self.opened = 0

    def check_once(self, now: float) -> list[Alert]:
        """One pass at time `now`; returns the alerts for the tickets it opened."""
        with self.db.engine.begin() as conn:
            ids = open_tickets_for_long_outages(
                conn,
                now=now,
                threshold_s=self.config.threshold_s,
                lookback_s=self.config.lookback_s,
            )
            self.opened += len(ids)
            return ticket_alerts(conn, ids)

    async def run(self) -> None:
        """Run until cancelled; a database error is logged and the next pass tries again."""
        while True:
            try:
                found = await asyncio.to_thread(self.check_once, self.clock())
            except sa.exc.SQLAlchemyError as exc:
                log.warning("ticket check failed: %s", str(exc).splitlines()[0][:300])
            else:
                if found:
                    log.info("opened %d tickets for long outages", len(found))
                if self.alerts is not None:
                    self.alerts.publish_many(found)
            await asyncio.sleep(self.config.check_interval_s)
