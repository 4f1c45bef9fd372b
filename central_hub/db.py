"""The hub's database: one SQLAlchemy Core engine, SQLite (WAL) by default, PostgreSQL by URL.

Every part of the hub that keeps tables (ingest and status, accounts, audit, viewing) declares
them on the shared :data:`metadata` and registers its schema changes as numbered migrations of
its own *component*. :meth:`Database.migrate` applies whatever is missing, in order, each in its
own transaction, and records it in ``schema_migrations``; so a component can be added or grow a
column without touching the others, and a hub never runs on a schema older than its code.

Usage::

    db = Database.connect("sqlite:////var/lib/isocam/hub.db")   # or postgresql+psycopg://…
    db.migrate()
    with db.engine.begin() as conn:
        conn.execute(...)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

#: Every hub table is declared on this metadata (so tests and tools can see the whole schema).
metadata = sa.MetaData()

schema_migrations = sa.Table(
    "schema_migrations",
    metadata,
    sa.Column("component", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
)


class DatabaseError(Exception):
    """The database cannot be used as asked (bad URL, newer schema than this code, …)."""


@dataclass(frozen=True)
class Migration:
    """One schema change of one component; `upgrade` runs inside a transaction."""

    component: str
    version: int
    description: str
    upgrade: Callable[[Connection], None]


_MIGRATIONS: dict[tuple[str, int], Migration] = {}


def migration(
    component: str, version: int, description: str
) -> Callable[[Callable[[Connection], None]], Callable[[Connection], None]]:
    """Register ``fn(conn)`` as migration `version` of `component` (versions start at 1 and
    have no holes). Use it at module level of the module that owns the tables::

        @migration("ingest", 1, "sites, cameras, events")
        def _v1(conn):
            metadata.create_all(conn, tables=[sites, cameras, events])
    """

    def register(fn: Callable[[Connection], None]) -> Callable[[Connection], None]:
        key = (component, version)
        if key in _MIGRATIONS and _MIGRATIONS[key].upgrade is not fn:
            raise DatabaseError(f"migration {component} v{version} is registered twice")
        _MIGRATIONS[key] = Migration(component, version, description, fn)
        return fn

    return register


def registered_migrations() -> list[Migration]:
    """Every registered migration, grouped by component, in version order."""
    by_component: dict[str, list[Migration]] = {}
    for m in _MIGRATIONS.values():
        by_component.setdefault(m.component, []).append(m)
    ordered: list[Migration] = []
    for component in sorted(by_component):
        steps = sorted(by_component[component], key=lambda m: m.version)
        expected = list(range(1, len(steps) + 1))
        if [m.version for m in steps] != expected:
            raise DatabaseError(
                f"migrations of {component!r} must be numbered 1..n without holes, "
                f"got {[m.version for m in steps]}"
            )
        ordered.extend(steps)
    return ordered


#: Pages of WAL after which a commit checkpoints by itself (64 MiB at 4 KiB pages).
WAL_AUTOCHECKPOINT_PAGES: Final = 16384


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk when it returns. The ingest acknowledges messages to the broker
    # after commit; with NORMAL a power cut could roll back what was acknowledged (WAL mode
    # syncs only at checkpoints then). One fsync per batch of up to 5,000 messages.
    cur.execute("PRAGMA synchronous=FULL")
    # Checkpoints belong to `Database.checkpoint()`, run by the ingest in its own thread, not
    # to whichever writer's commit crosses the threshold (a checkpoint inside the ingest's
    # commit stalled it for up to a second, measured). This is the backstop if none runs.
    cur.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA cache_size=-65536")  # 64 MiB: the ledger queries run 25-50 % faster
    cur.close()


def dialect_insert(conn: Connection, table: sa.Table) -> Any:
    """`INSERT` with `on_conflict_do_nothing/do_update` for the connection's dialect."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


class Database:
    """An engine plus the migration runner; cheap to share across the hub's tasks."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def connect(cls, url: str, **engine_kwargs: Any) -> Database:
        """Open `url` (``sqlite:///PATH`` or ``postgresql+psycopg://…``); plain
        ``postgresql://`` is taken to mean psycopg 3."""
        if url.startswith("postgresql://") or url.startswith("postgres://"):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        try:
            parsed = sa.engine.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise DatabaseError(f"not a database URL: {url!r} ({exc})") from None
        backend = parsed.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise DatabaseError(f"unsupported database {backend!r}: use sqlite or postgresql")
        if backend == "sqlite":
            engine_kwargs.setdefault("connect_args", {"check_same_thread": False})
        else:
            engine_kwargs.setdefault("pool_pre_ping", True)
        engine = sa.create_engine(parsed, **engine_kwargs)
        if backend == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        return cls(engine)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def checkpoint(self) -> int:
        """SQLite: copy what the WAL holds into the database without waiting for anyone
        (PASSIVE); returns how many of the WAL's frames are in the database now (0: the WAL
        was empty). PostgreSQL: nothing to do, 0."""
        if self.dialect != "sqlite":
            return 0
        with self.engine.connect() as conn:
            row = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
        _busy, _log, copied = row
        return max(0, int(copied))

    def applied(self) -> dict[str, int]:
        """Highest applied version per component ({} on an empty database)."""
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("schema_migrations"):
                return {}
            rows = conn.execute(
                sa.select(
                    schema_migrations.c.component, sa.func.max(schema_migrations.c.version)
                ).group_by(schema_migrations.c.component)
            ).all()
        return {component: int(version) for component, version in rows}

    def migrate(self) -> list[Migration]:
        """Apply every registered migration not yet applied; returns those applied now.

        Refuses to run when the database holds a component version newer than this code
        knows (an older hub binary against a newer schema)."""
        import time

        import central_hub.schema  # noqa: F401 - registers every component's migrations

        metadata.create_all(self.engine, tables=[schema_migrations])
        done = self.applied()
        known: dict[str, int] = {}
        for m in registered_migrations():
            known[m.component] = max(known.get(m.component, 0), m.version)
        for component, version in done.items():
            if version > known.get(component, 0):
                raise DatabaseError(
                    f"the database has {component} schema v{version}, this hub knows only "
                    f"v{known.get(component, 0)}: upgrade the hub"
                )
        applied: list[Migration] = []
        for m in registered_migrations():
            if m.version <= done.get(m.component, 0):
                continue
            with self.engine.begin() as conn:
                m.upgrade(conn)
                conn.execute(
                    schema_migrations.insert().values(
                        component=m.component,
                        version=m.version,
                        description=m.description,
                        applied_at=time.time(),
                    )
                )
            log.info("schema: %s v%d applied (%s)", m.component, m.version, m.description)
            applied.append(m)
        return applied

    def close(self) -> None:
        self.engine.dispose()
