"""A private Mosquitto broker process with its own config, on a free loopback port.

Three ways to run it:

- `Mosquitto()`: one plaintext, anonymous listener (the demo, most tests);
- `Mosquitto(tls=TlsListener(...))`: the same plus a TLS listener with client certificates
  and an optional ACL file;
- `Mosquitto(config_file=Path("deploy/mosquitto/mosquitto.conf"), config_paths={...})`: the
  production configuration itself, localised (`localise_config`): listeners moved to free
  loopback ports, file paths pointed at test files, logs and persistence in the work directory.
  Every other line (TLS version, certificate rules, ACL, limits) runs as written.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devstack.ports import free_port, wait_for_port


class BrokerUnavailable(RuntimeError):
    """Mosquitto is not installed or would not start."""


@dataclass(frozen=True)
class TlsListener:
    """A second, TLS listener: server certificate, client-certificate rules, optional ACL."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = True
    use_identity_as_username: bool = True
    acl_file: Path | None = None


#: Directives of a production config that name files; a localised config must supply each one.
PATH_DIRECTIVES = frozenset(
    {"cafile", "capath", "certfile", "keyfile", "crlfile", "dhparamfile", "acl_file",
     "password_file", "psk_file"}
)  # fmt: skip


def _run_as_user() -> str:
    # Run as root, Mosquitto drops to the `mosquitto` user, which cannot read a private
    # temporary directory (logs, ACL, keys, persistence). Naming the current user keeps it as
    # is; for a non-root user the line changes nothing.
    return pwd.getpwuid(os.getuid()).pw_name


def localise_config(
    text: str,
    *,
    host: str,
    ports: list[int],
    paths: Mapping[str, Path],
    workdir: Path,
) -> list[str]:
    """Rewrite a production mosquitto.conf to run privately: the i-th `listener` on `ports[i]`
    at `host`, file directives from `paths` (a missing one is an error, never a silent
    fallback to the production path), persistence and log in `workdir`, no pid file."""
    out: list[str] = []
    listeners = 0
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        directive = line.split(None, 1)[0]
        if directive == "listener":
            if listeners >= len(ports):
                raise ValueError(f"config has more listeners than the {len(ports)} ports given")
            out.append(f"listener {ports[listeners]} {host}")
            listeners += 1
        elif directive in PATH_DIRECTIVES:
            if directive not in paths:
                raise ValueError(f"no local file given for `{directive}` ({line})")
            out.append(f"{directive} {paths[directive]}")
        elif directive == "persistence_location":
            out.append(f"persistence_location {workdir}/")
        elif directive in ("log_dest", "pid_file", "user"):
            continue  # replaced below
        elif directive in ("include_dir",):
            raise ValueError(f"`{directive}` is not supported in a localised config")
        else:
            out.append(line)
    if listeners != len(ports):
        raise ValueError(f"config has {listeners} listeners, {len(ports)} ports given")
    out += [f"log_dest file {workdir / 'mosquitto.log'}", f"user {_run_as_user()}"]
    return out


def count_listeners(text: str) -> int:
    """How many `listener` lines a mosquitto.conf has."""
    return len(re.findall(r"^\s*listener\s", text, flags=re.MULTILINE))


@dataclass
class Mosquitto:
    """Start with `start()`, stop with `stop()` (or use as a context manager).

    `extra_config` lines are appended to the generated mosquitto.conf. `persistence` keeps
    sessions and retained messages across `restart()` (saved on the clean stop).
    """

    workdir: Path | None = None
    port: int = 0
    extra_config: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None
    tls: TlsListener | None = None
    tls_port: int = 0
    persistence: bool = False
    config_file: Path | None = None
    config_paths: dict[str, Path] = field(default_factory=dict)
    #: With `config_file`: the port of each of its listeners, in file order (`port` is the first).
    listener_ports: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        """URL of the first listener (mqtts:// when it is the TLS one of a production config)."""
        if self.config_file is not None and self.tls_port == self.port:
            return f"mqtts://{self.host}:{self.port}"
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        if not self.tls_port:
            raise RuntimeError("this broker has no TLS listener")
        return f"mqtts://{self.host}:{self.tls_port}"

    @property
    def log_file(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "mosquitto.log"

    def _config_lines(self) -> list[str]:
        assert self.workdir is not None
        if self.config_file is not None:
            text = self.config_file.read_text()
            wanted = count_listeners(text)
            if len(self.listener_ports) != wanted:  # first start; a restart keeps the ports
                self.listener_ports = [free_port(self.host) for _ in range(wanted)]
            self.port = self.listener_ports[0]
            if "certfile" in self.config_paths:
                self.tls_port = self.port
            lines = localise_config(
                text,
                host=self.host,
                ports=self.listener_ports,
                paths=self.config_paths,
                workdir=self.workdir,
            )
            return [*lines, *self.extra_config]
        self.port = self.port or free_port(self.host)
        lines = [
            "per_listener_settings true",
            f"user {_run_as_user()}",
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
        ]
        if self.tls is not None:
            self.tls_port = self.tls_port or free_port(self.host)
            t = self.tls
            lines += [
                f"listener {self.tls_port} {self.host}",
                f"cafile {t.ca_file}",
                f"certfile {t.cert_file}",
                f"keyfile {t.key_file}",
                f"require_certificate {str(t.require_certificate).lower()}",
                f"use_identity_as_username {str(t.use_identity_as_username).lower()}",
                f"allow_anonymous {str(not t.use_identity_as_username).lower()}",
            ]
            if t.acl_file is not None:
                lines.append(f"acl_file {t.acl_file}")
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/"]
        else:
            lines.append("persistence false")
        lines += [
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            *self.extra_config,
        ]
        return lines

    def start(self) -> Mosquitto:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise BrokerUnavailable(
                "mosquitto is not installed: run scripts/bootstrap.sh (apt-get install mosquitto)"
            )
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="isocam-mosquitto-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        try:
            lines = self._config_lines()
        except (OSError, ValueError) as exc:
            raise BrokerUnavailable(f"cannot build the broker config: {exc}") from None
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            for port in {self.port, self.tls_port, *self.listener_ports} - {0}:
                wait_for_port(self.host, port, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            log = ""
            if self.log_file.exists():
                log = self.log_file.read_text(errors="replace")[-2000:]
            self.stop()
            raise BrokerUnavailable(f"mosquitto did not start: {exc}\n{err}{log}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> Mosquitto:
        """Stop cleanly (persisting sessions when `persistence` is on) and start on the same
        ports, so clients reconnect to the same URL."""
        self.stop()
        return self.start()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
