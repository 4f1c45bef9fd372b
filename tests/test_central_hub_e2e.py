"""Issue 6, "done when", end to end: a real Mosquitto, `camera-sim run`, the real `edge-agent
run` and `central-hub serve` (processes), a NOC operator in headless Chromium — on SQLite and
on PostgreSQL.

One scenario: the site is enrolled with `central-hub sites add --device-key`; the edge comes up
and its camera shows on the board; `camera-sim fault … offline` → the fault appears on the open
board page within 10 s of the edge reporting it (the event's arrival at the hub) → a ticket
opens (threshold 0.1 min) → `camera-sim fault … clear` → the outage row's bounds match the
fault and the clear → the ticket is resolved, the operator confirms in the browser, it closes.
Deadlines are polled on real observables (the page, the hub's database); nothing sleeps to
synchronise.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from central_hub.accounts import AccountStore, AuthConfig
from central_hub.audit import AuditLog
from central_hub.db import Database
from central_hub.policy import Scope
from central_hub.status import cameras, events, outages, tickets
from devstack.broker import Mosquitto
from devstack.ports import free_port
from sitelink.sealed_segment import generate_private_key, write_public_key
from tests.conftest import RunningSimulator
from tests.test_central_hub_api import PASSWORD
from tests.test_central_hub_browser_board import (  # noqa: F401 (browser: a fixture)
    attrs,
    browser,
    click,
    css,
    log_in,
)

BIN = Path(sys.executable).parent
SITE = "hcm-q7-e2e01"
NOC = "noc@vnpt.gov.vn"
T = TypeVar("T")


def until(check: Callable[[], T], within: float, what: str, deadline: float | None = None) -> T:
    """Poll `check` until it returns something truthy; fail at the deadline. An element the
    page swapped while it was being read counts as a miss."""
    end = deadline if deadline is not None else time.time() + within
    while True:
        try:
            value = check()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        if time.time() > end:
            raise AssertionError(f"not within the deadline: {what}")
        time.sleep(0.2)  # polling a page / a database: no event to wait on from here


def _run(*args: str) -> str:
    done = subprocess.run([*args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done.stdout


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _hub_toml(work: Path, db_url: str, broker: Mosquitto, port: int) -> Path:
    path = work / "hub.toml"
    path.write_text(
        "\n".join(
            [
                "[database]",
                f'url = "{db_url}"',
                "[mqtt]",
                f'url = "mqtt://{broker.host}:{broker.port}"',
                f'client_id = "e2e-hub-{os.getpid()}-{port}"',
                'share_group = "e2e"',
                "[ingest]",
                "batch_max_delay_ms = 20",
                "sites_refresh_seconds = 0.5",
                # 6 s: the smallest threshold the config allows (fractional minutes are accepted).
                "[tickets]",
                "threshold_minutes = 0.1",
                "check_interval_seconds = 1",
                "[web]",
                f'listen = "127.0.0.1:{port}"',
                "[auth]",
                "cookie_secure = false",
                f'secret = "{secrets.token_hex(32)}"',
                "argon2_memory_kib = 19456",
                "argon2_time_cost = 1",
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    return path


def _edge_toml(work: Path, cam: dict[str, Any], broker: Mosquitto) -> Path:
    key = generate_private_key()
    write_public_key(key.public_key(), work / "viewer.pub")
    path = work / "edge.toml"
    path.write_text(
        "\n".join(
            [
                "[site]",
                f'id = "{SITE}"',
                'name = "Khu cách ly Quận 7 (thử nghiệm)"',
                'province = "Hồ Chí Minh"',
                'district = "Quận 7"',
                'kind = "facility"',
                'authority = "health"',
                'operator = "vnpt"',
                "[storage]",
                f'data_dir = "{work / "edge-data"}"',
                "reserve_gib = 0.1",
                "[recording]",
                "backoff_max_seconds = 1",
                "[credentials]",
                f'user = "{cam["user"]}"',
                f'password = "{cam["password"]}"',
                "[discovery]",
                "enabled = false",
                "[mqtt]",
                f'url = "{broker.url}"',
                "health_interval_seconds = 5",
                "[keys]",
                f'recipient_files = ["{work / "viewer.pub"}"]',
                "[status]",
                f'socket = "{work / "edge.sock"}"',
                "[metrics]",
                'listen = ""',
                "[[cameras.onvif]]",
                f'address = "{cam["onvif_url"].split("/")[2]}"',
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    return path


def _rows(db: Database, query: Any) -> list[dict[str, Any]]:
    with db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


@pytest.fixture
def started(
    tmp_path: Path,
    hub_db_url: str,
    mosquitto: Mosquitto,
    simulator_factory: Callable[..., RunningSimulator],
) -> Iterator[tuple[str, Database, RunningSimulator]]:
    """Broker, simulator (one camera), hub and edge running; the site enrolled; a NOC user."""
    sim = simulator_factory(cameras=1)
    port = free_port()
    hub_toml = _hub_toml(tmp_path, hub_db_url, mosquitto, port)
    edge_toml = _edge_toml(tmp_path, sim.cameras[0], mosquitto)
    (tmp_path / "device.pem").write_text(
        _run(str(BIN / "edge-agent"), "device-key", "--config", str(edge_toml))
    )
    _run(
        str(BIN / "central-hub"),
        "sites",
        "--config",
        str(hub_toml),
        "add",
        SITE,
        "--province",
        "Hồ Chí Minh",
        "--district",
        "Quận 7",
        "--kind",
        "facility",
        "--authority",
        "health",
        "--operator",
        "vnpt",
        "--name",
        "Khu cách ly Quận 7",
        "--device-key",
        str(tmp_path / "device.pem"),
    )
    # `central-hub sites add` migrated the database with every component the CLI knows; this
    # process may know fewer, so it uses the schema as it is rather than migrating it.
    db = Database.connect(hub_db_url)
    store = AccountStore(db, AuditLog(db), AuthConfig(argon2_memory_kib=19456, argon2_time_cost=1))
    store.create_user(NOC, "Trực ban NOC", PASSWORD, "noc", Scope.nation())
    hub = subprocess.Popen(
        [str(BIN / "central-hub"), "serve", "--config", str(hub_toml)],
        stderr=open(tmp_path / "hub.log", "w"),  # noqa: SIM115 - lives as long as the child
    )
    edge = None
    try:
        base = f"http://127.0.0.1:{port}"
        until(lambda: _healthy(base, hub), 30, "the hub answers /healthz")
        edge = subprocess.Popen(
            [str(BIN / "edge-agent"), "run", "--config", str(edge_toml)],
            stderr=open(tmp_path / "edge.log", "w"),  # noqa: SIM115
        )
        yield base, db, sim
    finally:
        if edge is not None:
            _stop(edge)
        _stop(hub)
        db.close()


def _healthy(base: str, proc: subprocess.Popen[Any]) -> bool:
    import urllib.request

    assert proc.poll() is None, "central-hub serve exited; see hub.log"
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_a_simulated_fault_reaches_the_board_and_its_ticket_closes(
    started: tuple[str, Database, RunningSimulator],
    browser: WebDriver,  # noqa: F811
) -> None:
    base, db, sim = started
    d = browser
    # The edge comes up: its site online, its camera recording, all seen on the board.
    ok = sa.select(cameras.c.camera_id).where(cameras.c.site_id == SITE, cameras.c.status == "ok")
    ((camera,),) = until(
        lambda: [tuple(r.values()) for r in _rows(db, ok)], 60, "the edge's camera is recording"
    )
    log_in(d, base, NOC, "/board")
    until(
        lambda: css(d, f'tr.site[data-site-id="{SITE}"][data-rag="green"]'),
        15,
        "the site is green on the board",
    )
    until(lambda: css(d, "#alerts-status.ws-on"), 10, "the alert socket is open")
    assert not css(d, "tr.fault")

    t_fault = time.time()
    assert sim.cli("fault", sim.cameras[0]["id"], "offline").returncode == 0

    def reported() -> float | None:
        rows = _rows(
            db,
            sa.select(sa.func.min(events.c.received_at).label("at")).where(
                events.c.site_id == SITE,
                events.c.camera_id == camera,
                events.c.kind.in_(["camera_down", "gap_opened"]),
                events.c.ts >= t_fault - 5,
            ),
        )
        return rows[0]["at"] if rows else None

    t_report = until(reported, 30, "the edge reports the fault to the hub")
    assert t_report is not None
    # On the open board page, without a reload: within 10 s of the report.
    until(
        lambda: css(d, f'tr.fault[data-site-id="{SITE}"][data-camera-id="{camera}"]'),
        0,
        "the fault on the board within 10 s of the edge's report",
        deadline=t_report + 10,
    )
    shown = time.time()
    assert css(d, f'tr.site[data-site-id="{SITE}"][data-rag="red"]')

    click(d, By.CSS_SELECTOR, f'tr.fault[data-site-id="{SITE}"] a')
    (tid,) = until(  # type: ignore[misc]
        lambda: attrs(d, 'tr.ticket[data-state="open"]', "data-ticket-id"), 30, "a ticket opens"
    )

    t_clear = time.time()
    assert sim.cli("fault", sim.cameras[0]["id"], "clear").returncode == 0
    until(
        lambda: css(d, f'tr.ticket[data-ticket-id="{tid}"][data-state="resolved"]'),
        30,
        "the outage ends and the ticket is resolved",
    )
    until(
        lambda: css(d, f'article.camera[data-camera-id="{camera}"][data-status="ok"]'),
        15,
        "the camera is back on the page",
    )
    bounds = attrs(d, f'tr.outage[data-camera-id="{camera}"]', "data-started", "data-ended")
    assert bounds is not None
    started_at, ended_at = (float(v or 0) for v in bounds)
    # The outage starts at the last packet before the fault (or at the edge's detection,
    # ~3 s later) and ends when the stream is back (reconnect backoff at most 1 s here).
    assert t_fault - 2 <= started_at <= t_fault + 5, started_at - t_fault
    assert t_clear - 2 <= ended_at <= t_clear + 6, ended_at - t_clear
    print(
        f"fault→report {t_report - t_fault:.1f} s, report→board ≤ {shown - t_report:.1f} s, "
        f"outage start {started_at - t_fault:+.1f} s, end {ended_at - t_clear:+.1f} s"
    )
    (stored,) = _rows(db, sa.select(outages).where(outages.c.camera_id == camera))
    assert (stored["started_at"], stored["ended_at"]) == pytest.approx((started_at, ended_at))

    # Someone confirms the repair: the ticket closes.
    click(d, By.ID, f"close-{tid}")
    until(
        lambda: css(d, f'tr.ticket[data-ticket-id="{tid}"][data-state="closed"]'),
        15,
        "the ticket is closed",
    )
    (closed,) = _rows(db, sa.select(tickets).where(tickets.c.id == int(tid or 0)))
    assert closed["state"] == "closed" and closed["closed_by"] == NOC
