"""Fixtures shared across the suite: real processes, started by the tests themselves."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from devstack.broker import Mosquitto
from devstack.postgres import Postgres
from devstack.simulator import launch_simulator

BIN = Path(sys.executable).parent


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private Mosquitto on a free loopback port; the test fails if it cannot start."""
    broker = Mosquitto(workdir=tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


@dataclass
class RunningSimulator:
    """A `camera-sim run` process and the cameras it announced."""

    proc: subprocess.Popen[str]
    cameras: list[dict]
    state_file: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run another camera-sim command against this simulator."""
        return subprocess.run(
            [str(BIN / "camera-sim"), *args, "--state-file", str(self.state_file)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_simulator(tmp_path: Path, *args: str, cameras: int = 2) -> RunningSimulator:
    """Start `camera-sim run` and wait for its JSON announcement lines."""
    state_file = tmp_path / f"sim-{len(list(tmp_path.glob('sim-*.json')))}.json"
    proc, cams = launch_simulator(state_file, *args, cameras=cameras)
    return RunningSimulator(proc, cams, state_file)


@pytest.fixture
def simulator_factory(tmp_path: Path) -> Iterator[Callable[..., RunningSimulator]]:
    """Start camera-sim processes with given options; all are stopped after the test."""
    started: list[RunningSimulator] = []

    def factory(*args: str, cameras: int = 2) -> RunningSimulator:
        sim = start_simulator(tmp_path, *args, cameras=cameras)
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        sim.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """One private PostgreSQL cluster for the session (initdb into a temporary directory).

    If it cannot start, every test using it fails with the reason; none is skipped."""
    server = Postgres().start()
    yield server
    server.stop()


_db_counter = iter(range(1_000_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def hub_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty hub database URL: a SQLite file, then (second run) a new PostgreSQL
    database in the session's private cluster. Tests taking it run once on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    server: Postgres = request.getfixturevalue("postgres_server")
    name = f"t{next(_db_counter)}"
    with psycopg.connect(server.url.replace("+psycopg", "").rsplit("/", 1)[0] + "/isocam",
                         autocommit=True) as conn:  # fmt: skip
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.url.rsplit("/", 1)[0] + "/" + name
