"""A private PostgreSQL server for tests and benchmarks: initdb into a temporary directory,
Debian's binaries, a free loopback port, trust auth for one database.

The tests never rely on a server that happens to be running on the machine. When run as root
(CI containers), the cluster is owned by the ``postgres`` system user (initdb refuses root).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from devstack.ports import free_port


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be started here; the message says why and how to fix it."""


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if not found:
        on_path = shutil.which("initdb")
        if on_path:
            return Path(on_path).parent
        raise PostgresUnavailable(
            "initdb not found: install Debian's postgresql package (scripts/bootstrap.sh does)"
        )
    return Path(found[0]).parent


@dataclass
class Postgres:
    """``with Postgres() as pg: pg.url`` → ``postgresql+psycopg://…/isocam``."""

    database: str = "isocam"
    port: int = field(default_factory=free_port)
    _dir: Path | None = None
    _user: str | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self._owner()}@127.0.0.1:{self.port}/{self.database}"

    def _owner(self) -> str:
        return self._user or pwd.getpwuid(os.getuid()).pw_name

    def _run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        argv = list(cmd)
        if self._user and os.getuid() == 0:
            argv = ["runuser", "-u", self._user, "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)

    def start(self) -> Postgres:
        bindir = _bindir()
        self._dir = Path(tempfile.mkdtemp(prefix="isocam-pg-"))
        if os.getuid() == 0:
            self._user = "postgres"
            shutil.chown(self._dir, user="postgres")
        data = self._dir / "data"
        res = self._run(
            str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", self._owner(),
            "-E", "UTF8", "--no-sync", "--locale=C.UTF-8",
        )  # fmt: skip
        if res.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {res.stderr.strip() or res.stdout.strip()}")
        opts = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self._dir} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        res = self._run(
            str(bindir / "pg_ctl"), "-D", str(data), "-l", str(self._dir / "log"),
            "-o", opts, "-w", "-t", "60", "start",
        )  # fmt: skip
        if res.returncode != 0:
            log = (self._dir / "log").read_text(errors="replace") if self._dir else ""
            raise PostgresUnavailable(f"pg_ctl start failed: {res.stderr.strip()}\n{log[-2000:]}")
        deadline = time.monotonic() + 30
        while True:
            res = self._run(
                str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                "-U", self._owner(), self.database,
            )  # fmt: skip
            if res.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise PostgresUnavailable(f"createdb failed: {res.stderr.strip()}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self._dir is None:
            return
        with contextlib.suppress(Exception):
            self._run(str(_bindir() / "pg_ctl"), "-D", str(self._dir / "data"), "-m", "fast",
                      "-w", "stop")  # fmt: skip
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
