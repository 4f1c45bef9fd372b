"""The audit log: append-only, every row hash-chained to the one before it.

Who watched, played back or exported what, when and why must be provable years later, and the
people who could tamper with the database are among those being audited. So:

* every row carries ``row_hash = SHA-256(domain ‖ canonical JSON of the row including
  prev_hash)``; editing, deleting, inserting or reordering rows breaks the chain and
  :meth:`AuditLog.verify` names the first broken row;
* the newest (seq, hash) is also kept in the one-row ``audit_head`` table, so cutting rows off
  the end is detected; and it is written to the log output periodically
  (:meth:`AuditLog.emit_head`), so an external log collector holds anchors that a person who
  rewrites the whole table cannot change (``verify(anchors=…)`` checks them);
* the writer is serialised on the ``audit_head`` row (``SELECT … FOR UPDATE`` on PostgreSQL,
  the database write lock taken first on SQLite), so the chain stays linear with several
  threads, processes or hub instances writing at once;
* a row is appended inside the caller's transaction when the caller passes its connection, so
  an account change and its audit row commit together or not at all.

Times are integer microseconds since the epoch (UTC), so the canonical encoding is exact on
both databases.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TextIO, TypedDict, Unpack

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from central_hub.db import Database, metadata, migration
from central_hub.policy import Principal, has_nation_grant, site_filter
from central_hub.sites import SiteAttrs, sites

log = logging.getLogger(__name__)

GENESIS = "0" * 64
_DOMAIN = b"isocam-audit-v1\n"
_ACTION_RE = re.compile(r"^[a-z][a-z0-9_.]{1,63}$")
_HEAD_RE = re.compile(r"audit chain head seq=(\d+) hash=([0-9a-f]{64})")
_MAX_TEXT = 1000
_MAX_DETAIL = 8192

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("at_us", sa.BigInteger, nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("allowed", sa.Boolean, nullable=True),
    sa.Column("user_id", sa.Integer, nullable=True),
    sa.Column("actor", sa.Text, nullable=True),
    sa.Column("source", sa.Text, nullable=True),
    sa.Column("site_id", sa.String(64), nullable=True),
    sa.Column("camera_id", sa.String(64), nullable=True),
    sa.Column("range_start_us", sa.BigInteger, nullable=True),
    sa.Column("range_end_us", sa.BigInteger, nullable=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("row_hash", sa.String(64), nullable=False),
    sa.Index("ix_audit_log_at", "at_us"),
    sa.Index("ix_audit_log_site", "site_id", "seq"),
    sa.Index("ix_audit_log_user", "user_id", "seq"),
)

audit_head = sa.Table(
    "audit_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("row_hash", sa.String(64), nullable=False),
)


@migration("audit", 1, "hash-chained audit log and its head")
def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[audit_log, audit_head])
    conn.execute(audit_head.insert().values(id=1, seq=0, row_hash=GENESIS))


#: The fields covered by a row's hash, in the order exports list them.
HASHED_FIELDS = (
    "seq",
    "at_us",
    "action",
    "allowed",
    "user_id",
    "actor",
    "source",
    "site_id",
    "camera_id",
    "range_start_us",
    "range_end_us",
    "reason",
    "detail",
    "prev_hash",
)


def row_digest(fields: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over the canonical encoding of a row's hashed fields."""
    body = {name: fields[name] for name in HASHED_FIELDS}
    data = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(_DOMAIN + data.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class AuditRow:
    """One stored row."""

    seq: int
    at_us: int
    action: str
    allowed: bool | None
    user_id: int | None
    actor: str | None
    source: str | None
    site_id: str | None
    camera_id: str | None
    range_start_us: int | None
    range_end_us: int | None
    reason: str | None
    detail: str | None
    prev_hash: str
    row_hash: str

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> AuditRow:
        m = row._mapping
        return cls(
            seq=int(m["seq"]),
            at_us=int(m["at_us"]),
            action=str(m["action"]),
            allowed=None if m["allowed"] is None else bool(m["allowed"]),
            user_id=None if m["user_id"] is None else int(m["user_id"]),
            actor=m["actor"],
            source=m["source"],
            site_id=m["site_id"],
            camera_id=m["camera_id"],
            range_start_us=None if m["range_start_us"] is None else int(m["range_start_us"]),
            range_end_us=None if m["range_end_us"] is None else int(m["range_end_us"]),
            reason=m["reason"],
            detail=m["detail"],
            prev_hash=str(m["prev_hash"]),
            row_hash=str(m["row_hash"]),
        )

    @property
    def at(self) -> datetime:
        return datetime.fromtimestamp(self.at_us / 1e6, UTC)

    def to_export(self) -> dict[str, Any]:
        """The row for jsonl/csv export: every hashed field verbatim (so an export can be
        re-verified) plus readable ISO times."""
        out: dict[str, Any] = {"at": _iso(self.at_us)}
        out.update(asdict(self))
        out["range_start"] = None if self.range_start_us is None else _iso(self.range_start_us)
        out["range_end"] = None if self.range_end_us is None else _iso(self.range_end_us)
        return out


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of a chain check; `first_bad_seq` names the first row that does not hold."""

    ok: bool
    rows: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None = None
    problem: str | None = None


def _text(value: str | None, limit: int = _MAX_TEXT) -> str | None:
    if value is None:
        return None
    value = str(value)
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _ident(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not value or len(value) > 64:
        raise ValueError(f"audit {name} must be 1–64 characters")
    return value


def _us(t: float) -> int:
    return round(t * 1_000_000)


def parse_anchors(lines: Iterable[str]) -> list[tuple[int, str]]:
    """Chain heads found in log output (lines written by :meth:`AuditLog.emit_head`)."""
    found: list[tuple[int, str]] = []
    for line in lines:
        for m in _HEAD_RE.finditer(line):
            found.append((int(m.group(1)), m.group(2)))
    return found


class RowFields(TypedDict, total=False):
    """The fields of a row a caller may give, as :meth:`AuditLog.append` takes them (mypy
    checks that they stay the same)."""

    user: Principal | int | None
    actor: str | None
    source: str | None
    site: SiteAttrs | str | None
    camera: str | None
    time_range: tuple[float, float] | None
    allowed: bool | None
    reason: str | None
    detail: Mapping[str, Any] | None


class AuditLog:
    """Writer, verifier and reader of the audit chain. Thread-safe; all methods block (call
    them from a worker thread in async code)."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self._clock = clock

    # --- writing ----------------------------------------------------------------------------

    def _lock_head(self, conn: Connection) -> tuple[int, str]:
        """Take the chain's write lock for this transaction and return the current head."""
        query = sa.select(audit_head.c.seq, audit_head.c.row_hash).where(audit_head.c.id == 1)
        if conn.dialect.name == "postgresql":
            row = conn.execute(query.with_for_update()).one()
        else:
            # SQLite: writing first takes the database write lock before anything is read,
            # so the head read next is the newest (a deferred read-then-write transaction
            # could otherwise read a stale head under WAL).
            conn.execute(
                audit_head.update().where(audit_head.c.id == 1).values(seq=audit_head.c.seq)
            )
            row = conn.execute(query).one()
        return int(row.seq), str(row.row_hash)

    def append(
        self,
        conn: Connection,
        action: str,
        *,
        user: Principal | int | None = None,
        actor: str | None = None,
        source: str | None = None,
        site: SiteAttrs | str | None = None,
        camera: str | None = None,
        time_range: tuple[float, float] | None = None,
        allowed: bool | None = None,
        reason: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> AuditRow:
        """Append one row inside the caller's transaction `conn` (it commits with the caller's
        change). `user` is who acted (a principal, or a user id); `actor` a name for the record
        when there is no principal (an e-mail tried at login, ``cli:root``); `time_range` is the
        footage range asked for, in epoch seconds."""
        if not _ACTION_RE.match(action):
            raise ValueError(f"audit action {action!r} must match {_ACTION_RE.pattern}")
        user_id: int | None
        if isinstance(user, Principal):
            user_id = user.user_id
            actor = actor or user.email
        else:
            user_id = user
        site_id = site.site_id if isinstance(site, SiteAttrs) else site
        start_us = end_us = None
        if time_range is not None:
            start_us, end_us = _us(time_range[0]), _us(time_range[1])
            if start_us > end_us:
                raise ValueError("audit time_range starts after it ends")
        detail_text = None
        if detail is not None:
            detail_text = json.dumps(
                dict(detail), sort_keys=True, separators=(",", ":"), ensure_ascii=False
            )
            if len(detail_text) > _MAX_DETAIL:
                raise ValueError(f"audit detail is longer than {_MAX_DETAIL} characters")
        head_seq, head_hash = self._lock_head(conn)
        fields: dict[str, Any] = {
            "seq": head_seq + 1,
            "at_us": _us(self._clock()),
            "action": action,
            "allowed": allowed,
            "user_id": user_id,
            "actor": _text(actor, 254),
            "source": _text(source, 256),
            "site_id": _ident("site", site_id),
            "camera_id": _ident("camera", camera),
            "range_start_us": start_us,
            "range_end_us": end_us,
            "reason": _text(reason),
            "detail": detail_text,
            "prev_hash": head_hash,
        }
        fields["row_hash"] = row_digest(fields)
        conn.execute(audit_log.insert().values(**fields))
        conn.execute(
            audit_head.update()
            .where(audit_head.c.id == 1)
            .values(seq=fields["seq"], row_hash=fields["row_hash"])
        )
        return AuditRow(**fields)

    def record(self, action: str, **fields: Unpack[RowFields]) -> AuditRow:
        """Append one row in its own transaction (see :meth:`append` for the fields). The
        viewing layer records every start/stop of live and playback with this."""
        with self.db.engine.begin() as conn:
            return self.append(conn, action, **fields)

    # --- the head ---------------------------------------------------------------------------

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the newest row; (0, GENESIS) on an empty log."""
        with self.db.engine.connect() as conn:
            row = conn.execute(
                sa.select(audit_head.c.seq, audit_head.c.row_hash).where(audit_head.c.id == 1)
            ).one()
        return int(row.seq), str(row.row_hash)

    def emit_head(self) -> str:
        """Write the chain head to the log output (an external collector keeps these lines as
        anchors for ``central-hub audit verify --anchors``); returns the line."""
        seq, digest = self.head()
        line = f"audit chain head seq={seq} hash={digest}"
        log.info("%s", line)
        return line

    # --- verification -----------------------------------------------------------------------

    def verify(self, anchors: Iterable[tuple[int, str]] = ()) -> VerifyResult:
        """Walk the whole chain in order; the result names the first row that does not hold
        (edited, deleted, inserted or moved), or a missing tail, or a row that differs from
        an externally held head in `anchors`."""
        wanted = dict(anchors)
        expected_seq, prev = 1, GENESIS
        count = 0
        with self.db.engine.connect() as conn:
            head = conn.execute(
                sa.select(audit_head.c.seq, audit_head.c.row_hash).where(audit_head.c.id == 1)
            ).one()
            head_seq, head_hash = int(head.seq), str(head.row_hash)

            def bad(seq: int, problem: str) -> VerifyResult:
                return VerifyResult(False, count, head_seq, head_hash, seq, problem)

            rows = conn.execution_options(yield_per=2000).execute(
                sa.select(audit_log).order_by(audit_log.c.seq)
            )
            for raw in rows:
                row = AuditRow.from_row(raw)
                if row.seq != expected_seq:
                    return bad(
                        expected_seq,
                        f"row {expected_seq} is missing (deleted?): the next row is {row.seq}",
                    )
                if row.prev_hash != prev:
                    return bad(
                        row.seq,
                        f"row {row.seq} does not follow row {row.seq - 1} "
                        "(rows deleted, inserted or reordered)",
                    )
                if row_digest(asdict(row)) != row.row_hash:
                    return bad(row.seq, f"row {row.seq} was altered after it was written")
                if row.seq in wanted and wanted[row.seq] != row.row_hash:
                    return bad(
                        row.seq,
                        f"row {row.seq} differs from the head recorded in the external log "
                        "(the chain was rewritten up to here)",
                    )
                prev = row.row_hash
                expected_seq += 1
                count += 1
        last = expected_seq - 1
        if head_seq != last or head_hash != prev:
            return bad(
                min(head_seq, last) + 1,
                f"the chain ends at row {last} but its head records row {head_seq} "
                "(rows removed from the end, or the head edited)",
            )
        beyond = sorted(seq for seq in wanted if seq > last)
        if beyond:
            return bad(
                last + 1,
                f"row {beyond[0]} is in the external head log but not in the database "
                "(rows removed from the end)",
            )
        return VerifyResult(True, count, head_seq, head_hash)

    # --- reading ----------------------------------------------------------------------------

    def rows_since(self, since: float | None = None) -> Iterator[AuditRow]:
        """Every row at or after `since` (epoch seconds), in chain order."""
        query = sa.select(audit_log).order_by(audit_log.c.seq)
        if since is not None:
            query = query.where(audit_log.c.at_us >= _us(since))
        with self.db.engine.connect() as conn:
            for raw in conn.execution_options(yield_per=2000).execute(query):
                yield AuditRow.from_row(raw)

    def export(
        self, out: TextIO, since: float | None = None, fmt: Literal["jsonl", "csv"] = "jsonl"
    ) -> int:
        """Write rows at or after `since` to `out`; returns how many. JSON lines keep every
        hashed field verbatim (re-verifiable with :func:`verify_export`); CSV is for
        spreadsheets and neutralises cells a spreadsheet would run as formulas."""
        count = 0
        if fmt == "jsonl":
            for row in self.rows_since(since):
                out.write(json.dumps(row.to_export(), ensure_ascii=False, sort_keys=True) + "\n")
                count += 1
            return count
        if fmt != "csv":
            raise ValueError("export format must be jsonl or csv")
        columns = ["at", *HASHED_FIELDS, "row_hash", "range_start", "range_end"]
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in self.rows_since(since):
            writer.writerow({k: _csv_cell(v) for k, v in row.to_export().items()})
            count += 1
        return count

    def query(
        self,
        principal: Principal | None,
        now: float,
        *,
        since: float | None = None,
        until: float | None = None,
        action: str | None = None,
        site_id: str | None = None,
        user_id: int | None = None,
        before_seq: int | None = None,
        limit: int = 100,
    ) -> list[AuditRow]:
        """Rows `principal` may read as an auditor, newest first: rows about sites inside its
        ``view_audit`` scopes; rows tied to no site (logins, accounts) only with a nation-wide
        grant. Filtered in SQL."""
        if has_nation_grant(principal, "view_audit", now):
            where: sa.ColumnElement[bool] = sa.true()
        else:
            visible = sa.select(sites.c.site_id).where(site_filter(principal, "view_audit", now))
            where = audit_log.c.site_id.in_(visible)
        query = sa.select(audit_log).where(where)
        if since is not None:
            query = query.where(audit_log.c.at_us >= _us(since))
        if until is not None:
            query = query.where(audit_log.c.at_us < _us(until))
        if action:
            query = query.where(audit_log.c.action == action)
        if site_id:
            query = query.where(audit_log.c.site_id == site_id)
        if user_id is not None:
            query = query.where(audit_log.c.user_id == user_id)
        if before_seq is not None:
            query = query.where(audit_log.c.seq < before_seq)
        query = query.order_by(audit_log.c.seq.desc()).limit(max(1, min(limit, 1000)))
        with self.db.engine.connect() as conn:
            return [AuditRow.from_row(r) for r in conn.execute(query)]


def _csv_cell(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def verify_export(lines: Iterable[str]) -> VerifyResult:
    """Check a JSON-lines export on its own: each row's hash, and that the rows follow each
    other. An export that starts mid-chain is checked from its first row on."""
    prev: str | None = None
    count = 0
    last_seq, last_hash = 0, GENESIS
    for line in lines:
        if not line.strip():
            continue
        data = json.loads(line)
        seq = int(data["seq"])
        if prev is not None and (seq != last_seq + 1 or data["prev_hash"] != prev):
            return VerifyResult(
                False,
                count,
                last_seq,
                last_hash,
                seq,
                f"row {seq} does not follow row {last_seq} in the export",
            )
        if row_digest(data) != data["row_hash"]:
            return VerifyResult(False, count, last_seq, last_hash, seq, f"row {seq} was altered")
        prev = last_hash = data["row_hash"]
        last_seq = seq
        count += 1
    return VerifyResult(True, count, last_seq, last_hash)
