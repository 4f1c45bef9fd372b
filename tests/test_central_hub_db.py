"""The hub's migration runner, on SQLite and on a private PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from central_hub import db as hubdb
from central_hub.db import Database, DatabaseError

probe = sa.Table("test_probe_rows", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))


@pytest.fixture
def probe_component() -> object:
    @hubdb.migration("test-probe", 1, "a probe table")
    def _v1(conn: sa.Connection) -> None:
        probe.create(conn)

    @hubdb.migration("test-probe", 2, "a column")
    def _v2(conn: sa.Connection) -> None:
        conn.execute(sa.text("ALTER TABLE test_probe_rows ADD COLUMN note TEXT"))

    yield
    del hubdb._MIGRATIONS[("test-probe", 1)]
    del hubdb._MIGRATIONS[("test-probe", 2)]


def test_migrations_apply_once_in_order(hub_db_url: str, probe_component: object) -> None:
    db = Database.connect(hub_db_url)
    first = [(m.component, m.version) for m in db.migrate()]
    assert ("test-probe", 1) in first and ("test-probe", 2) in first
    assert first.index(("test-probe", 1)) < first.index(("test-probe", 2))
    assert db.migrate() == []
    assert db.applied()["test-probe"] == 2
    with db.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO test_probe_rows (id, note) VALUES (1, 'x')"))
    db.close()


def test_a_schema_newer_than_the_code_is_refused(hub_db_url: str, probe_component: object) -> None:
    db = Database.connect(hub_db_url)
    db.migrate()
    with db.engine.begin() as conn:
        conn.execute(
            hubdb.schema_migrations.insert().values(
                component="test-probe", version=3, description="future", applied_at=0.0
            )
        )
    with pytest.raises(DatabaseError, match="upgrade the hub"):
        db.migrate()
    db.close()


def test_unsupported_urls_are_refused_clearly() -> None:
    with pytest.raises(DatabaseError, match="unsupported database"):
        Database.connect("mysql://root@localhost/x")
    with pytest.raises(DatabaseError, match="not a database URL"):
        Database.connect("::::")
