"""The hash-chained audit log on SQLite and PostgreSQL: any edit, deletion, insertion or
reordering done directly in the database is found by verify(), which names the first broken
row; concurrent writers keep one linear chain; exports re-verify; auditors see their scope."""

from __future__ import annotations

import io
import itertools
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from central_hub.audit import (
    GENESIS,
    AuditLog,
    audit_head,
    audit_log,
    parse_anchors,
    row_digest,
    verify_export,
)
from central_hub.db import Database
from central_hub.policy import Grant, Principal, Scope
from central_hub.sites import SiteAttrs, sites
from central_hub.users_cli import audit as audit_cli

N = 8


@pytest.fixture
def db(hub_db_url: str) -> Iterator[Database]:
    database = Database.connect(hub_db_url)
    database.migrate()
    yield database
    database.close()


def _fill(log: AuditLog, n: int = N) -> None:
    for i in range(n):
        log.record(
            "view_live" if i % 2 else "login_ok",
            user=i + 1,
            actor=f"user{i}@hanoi.gov.vn",
            source="127.0.0.1",
            site=f"site-{i % 3}" if i % 2 else None,
            camera="cam-01" if i % 2 else None,
            time_range=(1000.0 + i, 1060.5 + i) if i % 2 else None,
            allowed=bool(i % 4),
            reason="Lý do: kiểm tra" if i == 3 else None,
            detail={"i": i, "note": "ghi chú"},
        )


def _rows(db: Database) -> list[dict[str, Any]]:
    with db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(audit_log).order_by("seq"))]


def _put_back(db: Database, row: dict[str, Any]) -> None:
    with db.engine.begin() as conn:
        conn.execute(audit_log.delete().where(audit_log.c.seq == row["seq"]))
        conn.execute(audit_log.insert().values(**row))


def test_a_fresh_chain_verifies_and_links(db: Database) -> None:
    log = AuditLog(db)
    assert log.verify().ok and log.head() == (0, GENESIS)
    _fill(log)
    result = log.verify()
    assert result.ok and result.rows == N and result.head_seq == N
    rows = _rows(db)
    assert rows[0]["prev_hash"] == GENESIS
    for a, b in itertools.pairwise(rows):
        assert b["prev_hash"] == a["row_hash"]
    assert rows[1]["range_start_us"] == 1_001_000_000 and rows[1]["range_end_us"] == 1_061_500_000


def test_editing_any_field_of_any_row_is_found(db: Database) -> None:
    log = AuditLog(db)
    _fill(log)
    originals = _rows(db)
    edits = {"action": "login_ok", "allowed": True, "actor": "someone@else.gov.vn",
             "site_id": "site-9", "reason": "edited", "at_us": 1, "user_id": 99}  # fmt: skip
    for row in originals:
        for column, value in edits.items():
            if row[column] == value:
                continue
            with db.engine.begin() as conn:
                conn.execute(
                    audit_log.update().where(audit_log.c.seq == row["seq"]).values({column: value})
                )
            result = log.verify()
            assert not result.ok and result.first_bad_seq == row["seq"], (column, result)
            assert "altered" in (result.problem or "")
            _put_back(db, row)
            assert log.verify().ok


def test_deleting_any_row_is_found(db: Database) -> None:
    log = AuditLog(db)
    _fill(log)
    for row in _rows(db):
        with db.engine.begin() as conn:
            conn.execute(audit_log.delete().where(audit_log.c.seq == row["seq"]))
        result = log.verify()
        assert not result.ok and result.first_bad_seq == row["seq"], result
        _put_back(db, row)
        assert log.verify().ok


def test_deleting_the_tail_and_the_head_is_found_with_external_anchors(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    log = AuditLog(db)
    _fill(log)
    with caplog.at_level(logging.INFO, logger="central_hub.audit"):
        log.emit_head()
    anchors = parse_anchors(caplog.text.splitlines())
    assert anchors == [log.head()]
    with db.engine.begin() as conn:
        conn.execute(audit_log.delete().where(audit_log.c.seq > N - 2))
    result = log.verify()
    assert not result.ok and result.first_bad_seq == N - 1  # the head still says N
    # A careful intruder also rewinds the head: only the external anchor tells.
    last = _rows(db)[-1]
    with db.engine.begin() as conn:
        conn.execute(audit_head.update().values(seq=last["seq"], row_hash=last["row_hash"]))
    assert log.verify().ok
    result = log.verify(anchors)
    assert not result.ok and result.first_bad_seq == N - 1 and "external" in (result.problem or "")


def test_rewriting_the_chain_from_a_row_on_is_found_with_anchors(db: Database) -> None:
    log = AuditLog(db)
    _fill(log)
    anchors = [log.head()]
    rows = _rows(db)
    prev = rows[2]["prev_hash"]
    with db.engine.begin() as conn:  # recompute every hash from row 3 on, head included
        for row in rows[2:]:
            row = dict(row, prev_hash=prev)
            if row["seq"] == 3:
                row["reason"] = "nothing to see"
            row["row_hash"] = row_digest(row)
            conn.execute(audit_log.update().where(audit_log.c.seq == row["seq"]).values(row))
            prev = row["row_hash"]
        conn.execute(audit_head.update().values(seq=N, row_hash=prev))
    assert log.verify().ok  # the chain alone cannot tell...
    result = log.verify(anchors)  # ...the head held outside the database can
    assert not result.ok and result.first_bad_seq == N


def test_swapping_two_rows_and_inserting_one_are_found(db: Database) -> None:
    log = AuditLog(db)
    _fill(log)
    rows = _rows(db)
    a, b = rows[3], rows[4]
    with db.engine.begin() as conn:
        conn.execute(audit_log.delete().where(audit_log.c.seq.in_((a["seq"], b["seq"]))))
        conn.execute(audit_log.insert().values(dict(b, seq=a["seq"])))
        conn.execute(audit_log.insert().values(dict(a, seq=b["seq"])))
    result = log.verify()
    assert not result.ok and result.first_bad_seq == a["seq"]
    for row in (a, b):
        _put_back(db, row)
    assert log.verify().ok
    # Insert a forged row in the middle: the rows after it must be renumbered, which breaks
    # the chain at the forged row.
    forged = dict(rows[5], reason="forged")
    forged["prev_hash"] = rows[4]["row_hash"]
    forged["row_hash"] = row_digest(forged)
    with db.engine.begin() as conn:
        for row in reversed(rows[5:]):
            conn.execute(
                audit_log.update().where(audit_log.c.seq == row["seq"]).values(seq=row["seq"] + 1)
            )
        conn.execute(audit_log.insert().values(forged))
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 7
    # Appending a forged row after the head (without the writer's lock) is found too.
    with db.engine.begin() as conn:
        conn.execute(audit_log.delete())
        conn.execute(audit_head.update().values(seq=0, row_hash=GENESIS))
    _fill(log, 3)
    extra = dict(_rows(db)[-1], seq=4, reason="appended")
    extra["prev_hash"] = _rows(db)[-1]["row_hash"]
    extra["row_hash"] = row_digest(extra)
    with db.engine.begin() as conn:
        conn.execute(audit_log.insert().values(extra))
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 4


def test_concurrent_writers_keep_one_linear_chain(db: Database) -> None:
    log = AuditLog(db)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def writer(k: int) -> None:
        try:
            start.wait()
            for i in range(25):
                log.record("view_playback", user=k, site=f"site-{k}", allowed=True,
                           detail={"i": i})  # fmt: skip
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    result = log.verify()
    assert result.ok and result.rows == 100 and result.head_seq == 100


def test_a_row_commits_with_the_callers_change_or_not_at_all(db: Database) -> None:
    log = AuditLog(db)
    with pytest.raises(RuntimeError), db.engine.begin() as conn:
        log.append(conn, "config_change", actor="cli:root", detail={"key": "x"})
        raise RuntimeError("the change failed")
    assert log.head() == (0, GENESIS) and log.verify().ok
    with pytest.raises(ValueError):
        log.record("Bad Action!")
    with pytest.raises(ValueError):
        log.record("view_live", time_range=(10.0, 5.0))


def test_export_jsonl_and_csv_since_a_time(db: Database) -> None:
    clock = iter(float(t) for t in range(1000, 2000, 10))
    log = AuditLog(db, clock=lambda: next(clock))
    _fill(log)
    log.record("login_failed", actor='=HYPERLINK("x")', source="127.0.0.1", allowed=False)
    out = io.StringIO()
    assert log.export(out, since=1030.0, fmt="jsonl") == N + 1 - 3
    lines = out.getvalue().splitlines()
    assert json.loads(lines[0])["seq"] == 4
    assert verify_export(lines).ok
    edited = json.loads(lines[1])
    edited["actor"] = "someone-else@hanoi.gov.vn"
    tampered = [lines[0], json.dumps(edited), *lines[2:]]
    bad = verify_export(tampered)
    assert not bad.ok and bad.first_bad_seq == 5
    dropped = verify_export([lines[0], *lines[2:]])
    assert not dropped.ok and dropped.first_bad_seq == 6
    csv_out = io.StringIO()
    assert log.export(csv_out, fmt="csv") == N + 1
    text = csv_out.getvalue()
    assert text.splitlines()[0].startswith("at,seq,at_us,action")
    assert "'=HYPERLINK" in text  # neutralised for spreadsheets


def test_cli_verify_and_export(db: Database, tmp_path: Any) -> None:
    url = db.engine.url.render_as_string(hide_password=False)
    log = AuditLog(db)
    _fill(log)
    runner = CliRunner()
    ok = runner.invoke(audit_cli, ["verify", "--db", url])
    assert ok.exit_code == 0, ok.output
    assert f"{N} rows" in ok.output
    head_log = tmp_path / "hub.log"
    head_log.write_text("2025-01-01 INFO " + log.emit_head() + "\n")
    exported = runner.invoke(audit_cli, ["export", "--db", url, "--since", "1970-01-02",
                                         "--format", "jsonl"])  # fmt: skip
    assert exported.exit_code == 0 and len(exported.stdout.splitlines()) == N
    with db.engine.begin() as conn:
        conn.execute(audit_log.update().where(audit_log.c.seq == 5).values(reason="x"))
    bad = runner.invoke(audit_cli, ["verify", "--db", url, "--anchors", str(head_log)])
    assert bad.exit_code == 1 and "row 5" in bad.output


def test_auditors_read_only_their_scope(db: Database) -> None:
    now = time.time()
    with db.engine.begin() as conn:
        for sid, prov in (("hn-1", "Hà Nội"), ("hn-2", "Hà Nội"), ("cb-1", "Cao Bằng")):
            conn.execute(sites.insert().values(site_id=sid, province=prov, district=None,
                         kind="facility", authority="health", operator="viettel",
                         enrolled_at=now))  # fmt: skip
    log = AuditLog(db)
    for sid in ("hn-1", "hn-2", "cb-1", "gone-site"):
        log.record("view_live", user=5, site=SiteAttrs(sid, "x", None, "facility", "health",
                   "vnpt"), allowed=True)  # fmt: skip
    log.record("login_ok", user=5, allowed=True)
    provincial = Principal(
        9, "a@hn.gov.vn", grants=(Grant("auditor", Scope.parse("province=Hà Nội")),)
    )
    national = Principal(10, "b@bca.gov.vn", grants=(Grant("auditor", Scope.nation()),))
    viewer = Principal(11, "c@hn.gov.vn", grants=(Grant("viewer", Scope.nation()),))
    assert {r.site_id for r in log.query(provincial, now)} == {"hn-1", "hn-2"}
    assert len(log.query(national, now)) == 5
    assert log.query(viewer, now) == []
    assert [r.site_id for r in log.query(provincial, now, site_id="cb-1")] == []
    assert [r.seq for r in log.query(national, now, before_seq=3)] == [2, 1]
