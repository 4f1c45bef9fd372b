"""The uplink's store-and-forward spool: a SQLite outbox that outlives the link and the process.

Every event is written here with its per-site `seq` *before* it is published, and removed only
when the broker has acknowledged it (docs/protocol.md, "Events and `seq`"). The uplink sends the
rows in insertion order, which for events is `seq` order, so a backlog is replayed in order and
before anything newer. Health samples taken while the link is down are spooled too, marked
droppable: when the spool reaches its bound the oldest of them go first. Events are never
dropped: if they alone exceed the bound they are all kept, the spool logs an error and reports
`overflowing`, and the uplink turns that into an `alarm` event.

Durability: WAL with `synchronous=FULL`, so a row whose append returned survives kill -9 and a
power cut; the next `seq` and the birth/death `bdseq` live in the same file, updated in the same
transaction as the row, and are never handed out twice. Acknowledgements are deleted in batches;
a crash between the broker's ack and the delete re-sends those rows (at-least-once; the hub
de-duplicates on (site, seq)).

Threads: every method blocks on SQLite, so the uplink calls them through `asyncio.to_thread`.
One connection behind a lock serves all of them; an advisory lock on `<spool>.lock` keeps a
second agent process from sharing the file (it would hand out the same bdseq and fight over the
broker session).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sitelink.messages import EventBase, Health, encode
from sitelink.topics import Kind, check_site_id

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1

#: The spool's file name inside `storage.data_dir` (next to the segment index, same volume).
SPOOL_FILENAME: Final = "uplink-spool.db"

#: Bytes counted per row on top of its payload (row header, index entry), so a bound given in
#: bytes also bounds many tiny rows. The file itself can exceed the bound by SQLite's free pages.
ROW_OVERHEAD: Final = 64

#: An overflow clears when the spool is back under this share of its bound (hysteresis, so a
#: spool hovering at the bound does not raise and clear the alarm at every event).
CLEAR_RATIO: Final = 0.9

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value ANY NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    seq INTEGER UNIQUE,
    droppable INTEGER NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_droppable ON outbox (droppable, id);
"""


class SpoolError(RuntimeError):
    """The spool cannot be used (wrong site, locked by another process, unreadable file)."""


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    """One row waiting for the broker's acknowledgement."""

    id: int  # insertion order; send order
    kind: Kind
    seq: int | None  # events only
    payload: bytes  # exactly the bytes to publish (original `ts` inside)
    created: float


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """Counts for the daemon's status and metrics."""

    rows: int
    events: int
    health: int
    bytes: int
    max_bytes: int
    last_seq: int
    bdseq: int
    dropped_health: int
    overflowing: bool


class Spool:
    """`Spool(path, site_id=..., max_bytes=...)`; close with `close()` or use `with`."""

    def __init__(self, path: str | os.PathLike[str], *, site_id: str, max_bytes: int) -> None:
        check_site_id(site_id)
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.path = Path(path)
        self.site_id = site_id
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._lock_fd = self._take_file_lock()
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10
            )
        except sqlite3.DatabaseError as exc:
            self._release_file_lock()
            raise SpoolError(f"{self.path}: cannot open the spool: {exc}") from None
        try:
            self._setup()
        except (sqlite3.DatabaseError, SpoolError) as exc:
            self._db.close()
            self._release_file_lock()
            if isinstance(exc, SpoolError):
                raise
            raise SpoolError(f"{self.path}: cannot open the spool: {exc}") from None
        self.dropped_health = 0
        self._overflowing = False
        row = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(seq IS NOT NULL), 0) FROM outbox"
        ).fetchone()
        self._rows, self._bytes, self._events = int(row[0]), int(row[1]), int(row[2])
        # Mirrors of the persisted counters, so status reads never touch the database.
        self._last_seq = self._meta("next_seq") - 1
        self._bdseq = self._meta("bdseq")
        if self._bytes > self.max_bytes:
            with self._lock, self._transaction():
                self._enforce_bound()

    # --- opening ------------------------------------------------------------------------------

    def _take_file_lock(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(
                f"{self.path} is in use by another process (is a second edge agent running?)"
            ) from None
        return fd

    def _release_file_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = -1

    def _setup(self) -> None:
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed append is on disk before `append_*` returns (power cut included).
        # Events are rare (transitions), so one fsync each is affordable; see bench/uplink.py.
        db.execute("PRAGMA synchronous=FULL")
        self._durable = True
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SpoolError(
                f"{self.path} was written by a newer edge agent (schema {version}); "
                "upgrade the agent or move the spool aside"
            )
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('site_id', ?)", (self.site_id,))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('next_seq', 1)")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('bdseq', 0)")
            stored = db.execute("SELECT value FROM meta WHERE key = 'site_id'").fetchone()[0]
        if stored != self.site_id:
            raise SpoolError(
                f"{self.path} holds the spool of site {stored!r}, not {self.site_id!r}: its "
                "events belong to that site; move the file aside to start a new spool"
            )

    @contextlib.contextmanager
    def _transaction(self, *, durable: bool = True) -> Iterator[None]:
        """BEGIN IMMEDIATE … COMMIT. `durable=False` (acks only) commits without fsync: a
        power cut may then bring deleted rows back, which re-sends them (the hub de-duplicates)
        but never loses one; the next durable commit syncs the WAL, deletes included."""
        if durable != self._durable:
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._durable = durable
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _meta(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    # --- writing ------------------------------------------------------------------------------

    def append_event(self, event: EventBase) -> EventBase:
        """Give `event` the next `seq` (its own `seq` is a placeholder), store it, and return
        the event as it will be published. The row is on disk when this returns."""
        if not isinstance(event, EventBase):
            raise TypeError(f"not an event: {type(event).__name__}")
        with self._lock, self._transaction():
            seq = self._meta("next_seq")
            stamped = event.model_copy(update={"seq": seq})
            payload = encode(stamped)  # MessageError("oversized") leaves the counter untouched
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
            self._insert(Kind.EVENT, seq, payload, droppable=False, created=stamped.ts)
            self._events += 1
            self._enforce_bound()
        self._last_seq = seq  # after the commit
        return stamped

    def append_health(self, health: Health) -> int:
        """Store a health sample as droppable; returns its row id. The caller removes
        thumbnails first: pictures of the site never go to disk unsealed."""
        if not isinstance(health, Health):
            raise TypeError(f"not a health sample: {type(health).__name__}")
        payload = encode(health)
        with self._lock, self._transaction():
            row_id = self._insert(Kind.HEALTH, None, payload, droppable=True, created=health.ts)
            self._enforce_bound()
        return row_id

    def _insert(
        self, kind: Kind, seq: int | None, payload: bytes, *, droppable: bool, created: float
    ) -> int:
        size = len(payload) + ROW_OVERHEAD
        cur = self._db.execute(
            "INSERT INTO outbox (kind, seq, droppable, created, size, payload) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (kind.value, seq, int(droppable), created, size, payload),
        )
        self._rows += 1
        self._bytes += size
        assert cur.lastrowid is not None
        return cur.lastrowid

    def _enforce_bound(self) -> None:
        """Within a transaction: drop the oldest droppable rows until under the bound; if
        events alone are over it, keep them and raise the overflow (loudly, once)."""
        if self._bytes <= self.max_bytes:
            return
        excess = self._bytes - self.max_bytes
        freed, cutoff, dropped = 0, None, 0
        for row_id, size in self._db.execute(
            "SELECT id, size FROM outbox WHERE droppable = 1 ORDER BY id"
        ):
            freed += size
            cutoff = row_id
            dropped += 1
            if freed >= excess:
                break
        if cutoff is not None:
            self._db.execute("DELETE FROM outbox WHERE droppable = 1 AND id <= ?", (cutoff,))
            self._rows -= dropped
            self._bytes -= freed
            self.dropped_health += dropped
            log.warning(
                "uplink spool at its bound (%d bytes): dropped the %d oldest health sample(s)",
                self.max_bytes,
                dropped,
            )
        if self._bytes > self.max_bytes and not self._overflowing:
            self._overflowing = True
            log.error(
                "uplink spool overflow: %d events (%d bytes) exceed spool_max_bytes = %d; "
                "every event is kept, none dropped, but the disk use grows until the link "
                "to the broker is back",
                self._events,
                self._bytes,
                self.max_bytes,
            )

    def next_bdseq(self) -> int:
        """Increment and return the birth/death sequence for a new connection (persisted
        before the connect, so a crash can never re-use it)."""
        with self._lock, self._transaction():
            bdseq = self._meta("bdseq") + 1
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'bdseq'", (bdseq,))
        self._bdseq = bdseq
        return bdseq

    # --- reading and acknowledging ----------------------------------------------------------

    def pending(self, after_id: int = 0, limit: int = 100) -> list[SpooledMessage]:
        """Up to `limit` rows with id > `after_id`, oldest first (the send order)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, seq, payload, created FROM outbox WHERE id > ? "
                "ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [SpooledMessage(r[0], Kind(r[1]), r[2], bytes(r[3]), r[4]) for r in rows]

    def ack(self, ids: Iterable[int]) -> int:
        """Remove rows the broker acknowledged; returns how many were removed."""
        id_list = list(ids)
        if not id_list:
            return 0
        removed = 0
        with self._lock, self._transaction(durable=False):
            for row_id in id_list:
                row = self._db.execute(
                    "DELETE FROM outbox WHERE id = ? RETURNING size, seq IS NOT NULL", (row_id,)
                ).fetchone()
                if row is None:
                    continue  # already gone (acked twice, or dropped health)
                removed += 1
                self._rows -= 1
                self._bytes -= row[0]
                self._events -= row[1]
            if self._overflowing and self._bytes <= self.max_bytes * CLEAR_RATIO:
                self._overflowing = False
                log.warning("uplink spool back under its bound: %d bytes", self._bytes)
        return removed

    def max_id(self) -> int:
        """Id of the newest row (0 when empty): rows up to it are the backlog of a reconnect."""
        with self._lock:
            return int(self._db.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0])

    # --- state --------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Rows waiting for an acknowledgement (no database access)."""
        return self._rows

    @property
    def size_bytes(self) -> int:
        """Counted size of the waiting rows (payloads plus `ROW_OVERHEAD` each)."""
        return self._bytes

    @property
    def overflowing(self) -> bool:
        """Events alone exceed the bound (raised at once, cleared under `CLEAR_RATIO`)."""
        return self._overflowing

    @property
    def last_seq(self) -> int:
        """Highest `seq` ever assigned (0: none yet); survives restarts and acks."""
        return self._last_seq

    def stats(self) -> SpoolStats:
        """Counts for status and metrics, from memory (no database access)."""
        return SpoolStats(
            rows=self._rows,
            events=self._events,
            health=self._rows - self._events,
            bytes=self._bytes,
            max_bytes=self.max_bytes,
            last_seq=self._last_seq,
            bdseq=self._bdseq,
            dropped_health=self.dropped_health,
            overflowing=self._overflowing,
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._release_file_lock()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
