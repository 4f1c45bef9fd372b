"""A private Mosquitto broker process with its own config, on a free loopback port."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from devstack.ports import free_port, wait_for_port


class BrokerUnavailable(RuntimeError):
    """Mosquitto is not installed or would not start."""


@dataclass
class Mosquitto:
    """Start with `start()`, stop with `stop()` (or use as a context manager).

    `extra_config` lines are appended to the generated mosquitto.conf (TLS listeners, ACLs).
    """

    workdir: Path | None = None
    port: int = 0
    extra_config: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> Mosquitto:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise BrokerUnavailable(
                "mosquitto is not installed: run scripts/bootstrap.sh (apt-get install mosquitto)"
            )
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="isocam-mosquitto-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)
        conf = self.workdir / "mosquitto.conf"
        lines = [
            "per_listener_settings true",
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence false",
            f"log_dest file {self.workdir / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            *self.extra_config,
        ]
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_for_port(self.host, self.port, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            self.stop()
            raise BrokerUnavailable(f"mosquitto did not start: {exc}\n{err}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
