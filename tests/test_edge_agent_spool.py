"""The uplink spool: seq assignment, durability (kill -9), acks, and the size bound."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.spool import ROW_OVERHEAD, Spool, SpoolError
from sitelink.messages import CameraDown, Health, SiteHealth, decode, encode
from sitelink.topics import Kind, topic

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_750_000_000.0


def event(i: int = 0) -> CameraDown:
    return CameraDown(ts=T0 + i, seq=1, camera="cam-01", cause="stall")


def health(i: int = 0) -> Health:
    site = SiteHealth(
        disk_total_bytes=100,
        disk_used_bytes=50,
        disk_free_bytes=50,
        cpu_percent=10.0,
        mem_total_bytes=100,
        mem_used_bytes=10,
        agent_version="0.1.0",
        uptime_s=float(i),
        spool_depth=0,
    )
    return Health(ts=T0 + i, site=site, cameras=[])


def test_events_get_consecutive_seqs_and_keep_their_timestamps(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.db", site_id="site-a", max_bytes=1 << 20) as spool:
        stamped = [spool.append_event(event(i)) for i in range(3)]
        assert [e.seq for e in stamped] == [1, 2, 3]
        rows = spool.pending()
    assert [r.seq for r in rows] == [1, 2, 3]
    for i, row in enumerate(rows):
        msg = decode(topic("site-a", Kind.EVENT), row.payload)
        assert isinstance(msg, CameraDown)
        assert msg.seq == i + 1 and msg.ts == T0 + i


def test_rows_leave_only_when_acknowledged(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.db", site_id="site-a", max_bytes=1 << 20) as spool:
        for i in range(4):
            spool.append_event(event(i))
        first_two = [r.id for r in spool.pending(limit=2)]
        assert spool.ack(first_two) == 2
        assert spool.ack(first_two) == 0  # a second ack of the same rows changes nothing
        assert [r.seq for r in spool.pending()] == [3, 4]
        assert spool.depth == 2
        assert [r.seq for r in spool.pending(after_id=first_two[-1] + 1)] == [4]


def test_next_seq_and_bdseq_survive_restart_even_after_every_row_is_acked(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with Spool(path, site_id="site-a", max_bytes=1 << 20) as spool:
        for i in range(3):
            spool.append_event(event(i))
        spool.ack(r.id for r in spool.pending())
        assert spool.next_bdseq() == 1
        assert spool.next_bdseq() == 2
        assert spool.depth == 0
    with Spool(path, site_id="site-a", max_bytes=1 << 20) as spool:
        assert spool.last_seq == 3
        assert spool.append_event(event(9)).seq == 4
        assert spool.next_bdseq() == 3
        assert spool.stats().events == 1


def test_a_spool_belongs_to_one_site(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    Spool(path, site_id="site-a", max_bytes=1 << 20).close()
    with pytest.raises(SpoolError, match="site 'site-a', not 'site-b'"):
        Spool(path, site_id="site-b", max_bytes=1 << 20)


def test_a_second_process_cannot_open_the_same_spool(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with Spool(path, site_id="site-a", max_bytes=1 << 20):
        probe = subprocess.run(
            [sys.executable, "-c", OPEN_ONLY, str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert probe.returncode == 3, probe.stderr
    assert "in use by another process" in probe.stdout


OPEN_ONLY = r"""
import sys
from edge_agent.spool import Spool, SpoolError
try:
    Spool(sys.argv[1], site_id="site-a", max_bytes=1 << 20)
except SpoolError as exc:
    print(exc)
    sys.exit(3)
"""


def test_full_spool_drops_oldest_health_first_and_never_an_event(tmp_path: Path) -> None:
    one_health = len(encode(health())) + ROW_OVERHEAD
    bound = 10 * one_health + 1
    with Spool(tmp_path / "spool.db", site_id="site-a", max_bytes=bound) as spool:
        for i in range(10):
            spool.append_health(health(i))
        assert spool.dropped_health == 0
        for i in range(4):
            spool.append_event(event(i))
        assert spool.size_bytes <= bound
        assert spool.dropped_health > 0
        rows = spool.pending(limit=1000)
        kept_health = [
            decode(topic("site-a", Kind.HEALTH), r.payload).ts for r in rows if r.seq is None
        ]
        # the survivors are the newest samples, still in order
        assert kept_health == [T0 + i for i in range(spool.dropped_health, 10)]
        assert [r.seq for r in rows if r.seq is not None] == [1, 2, 3, 4]
        assert not spool.overflowing


def test_events_alone_over_the_bound_are_kept_and_raise_the_overflow(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    one_event = len(encode(event())) + ROW_OVERHEAD
    bound = 5 * one_event
    with Spool(tmp_path / "spool.db", site_id="site-a", max_bytes=bound) as spool:
        spool.append_health(health())
        for i in range(8):
            spool.append_event(event(i))
        assert spool.overflowing
        assert spool.stats().events == 8
        assert spool.stats().health == 0  # the health sample went first
        assert [r.seq for r in spool.pending()] == list(range(1, 9))
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "overflow" in errors[0].getMessage()
        # acknowledged down to 90 % of the bound: the overflow clears
        spool.ack(r.id for r in spool.pending(limit=4))
        assert not spool.overflowing


def test_spool_survives_kill_9_in_the_middle_of_appends(tmp_path: Path) -> None:
    """Every append the writer reported done is there after SIGKILL, and seqs continue."""
    path = tmp_path / "spool.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None
    reported: list[int] = []
    try:
        for line in writer.stdout:
            reported.append(int(line))
            if len(reported) >= 150:
                break
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait(timeout=30)
        writer.stdout.close()
        if writer.stderr is not None:
            writer.stderr.close()
    assert writer.returncode == -signal.SIGKILL
    assert reported == list(range(1, len(reported) + 1))

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with Spool(path, site_id="site-a", max_bytes=1 << 30) as spool:
        stored = [r.seq for r in spool.pending(limit=100_000)]
        assert stored[: len(reported)] == reported  # nothing reported is missing
        assert stored == list(range(1, len(stored) + 1))
        assert spool.append_event(event()).seq == len(stored) + 1


WRITER = r"""
import sys, time
from edge_agent.spool import Spool
from sitelink.messages import CameraDown
spool = Spool(sys.argv[1], site_id="site-a", max_bytes=1 << 30)
while True:
    e = spool.append_event(CameraDown(ts=time.time(), seq=1, camera="cam-01", cause="stall"))
    print(e.seq, flush=True)
"""


def test_stats_for_the_daemon(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.db", site_id="site-a", max_bytes=1 << 20) as spool:
        spool.append_event(event())
        spool.append_health(health())
        stats = spool.stats()
    assert (stats.rows, stats.events, stats.health) == (2, 1, 1)
    assert stats.last_seq == 1 and stats.bdseq == 0 and not stats.overflowing
    assert json.loads(json.dumps(dataclasses.asdict(stats)))["rows"] == 2
