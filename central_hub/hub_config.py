"""The hub's TOML config: one table of settings, one loader, one error naming every bad key.

`SETTINGS` is the single list of what can be set (name, type, default, help, check); the
loader, the docs table in docs/hub.md (`settings_markdown()`, a test keeps it in sync) and the
error messages all come from it. `load_config(path)` returns a `HubConfig` or raises
`HubConfigError` whose message lists every problem at once, one line per key — unknown keys
included, since a misspelt key would otherwise be silently ignored.

Secrets (`alerts.webhook_secret`, `database.password`) are written ``"literal"``,
``{ file = "/run/credentials/…" }`` or ``{ env = "VARIABLE" }`` and never appear in messages.
Relative paths (TLS files, a relative SQLite database) are taken from the config file's
directory.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import SplitResult, quote, urlsplit

from sitelink.topics import SHARE_GROUP_RE

SettingType = Literal["string", "integer", "float", "boolean", "path", "secret", "string list"]

IMAGE_FAULTS: Final = ("black", "covered", "frozen", "blurred", "moved")

DEFAULT_CONFIG_PATH: Final = Path("/etc/isocam/hub.toml")


class HubConfigError(ValueError):
    """The config cannot be used; `problems` has one line per bad key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        n = len(problems)
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''}:\n{lines}")


Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Setting:
    """One row of the settings table; `check(value)` returns what is wrong, or None."""

    name: str
    type: SettingType
    default: Any
    help: str
    check: Check | None = None
    allowed: str = ""

    @property
    def section(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def key(self) -> str:
        return self.name.split(".", 1)[1]


def _between(lo: float, hi: float) -> tuple[Check, str]:
    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"must be between {lo:g} and {hi:g}"

    return check, f"between {lo:g} and {hi:g}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_db_url(v: str) -> str | None:
    if v.startswith("sqlite:///"):
        return None if len(v) > len("sqlite:///") else "needs a file path after sqlite:///"
    if re.match(r"^postgres(ql)?(\+psycopg)?://", v):
        return None
    return "must start with sqlite:/// or postgresql://"


def _split_service_url(
    v: str, schemes: tuple[str, ...], wrong_scheme: str, credentials_hint: str
) -> SplitResult | str:
    """The parts of a broker or webhook URL, or what is wrong with it (a malformed port, a
    scheme not in `schemes`, no host, credentials in the URL)."""
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018 — raises ValueError on a malformed port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in schemes:
        return wrong_scheme
    if not parts.hostname:
        return "has no host"
    if "@" in parts.netloc:
        return f"must not contain credentials ({credentials_hint})"
    return parts


def _check_mqtt_url(v: str) -> str | None:
    parts = _split_service_url(
        v,
        ("mqtt", "mqtts"),
        "must start with mqtt:// or mqtts://",
        "the hub authenticates with its certificate",
    )
    if isinstance(parts, str):
        return parts
    assert parts.hostname is not None
    if parts.path not in ("", "/") or parts.query:
        return "must be mqtt(s)://HOST[:PORT] with nothing after it"
    if parts.scheme == "mqtt" and not _is_loopback(parts.hostname):
        return "plaintext mqtt:// is allowed only to a loopback broker; use mqtts://"
    if parts.port == 0:
        return "port 0 is not a port"
    return None


def _check_http_url(v: str) -> str | None:
    if v == "":
        return None
    parts = _split_service_url(
        v, ("https", "http"), "must start with https://", "use alerts.webhook_secret"
    )
    if isinstance(parts, str):
        return parts
    assert parts.hostname is not None
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        return "plaintext http:// is allowed only to a loopback host; use https://"
    return None


def _check_listen(v: str) -> str | None:
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return "must be HOST:PORT with a port 1-65535"
    if not host.strip("[]"):
        return "needs a host (0.0.0.0 to listen on every address)"
    return None


def _check_pattern(rx: re.Pattern[str], words: str) -> tuple[Check, str]:
    def check(v: str) -> str | None:
        return None if rx.fullmatch(v) else f"must be {words}"

    return check, words


def _check_faults(v: list[str]) -> str | None:
    bad = [f for f in v if f not in IMAGE_FAULTS]
    if bad:
        return f"unknown image faults {bad}; allowed: {', '.join(IMAGE_FAULTS)}"
    return None


def _default_client_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "host"
    return f"central-hub-{host}"


_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _setting(
    name: str,
    type_: SettingType,
    default: Any,
    help_: str,
    check: tuple[Check, str] | Check | None = None,
) -> Setting:
    if isinstance(check, tuple):
        return Setting(name, type_, default, help_, check[0], check[1])
    return Setting(name, type_, default, help_, check)


SETTINGS: Final[tuple[Setting, ...]] = (
    _setting(
        "database.url",
        "string",
        "sqlite:////var/lib/isocam/hub.db",
        "Where the hub keeps its state: sqlite:///PATH (WAL; one hub instance) or "
        "postgresql://USER@HOST[:PORT]/DB (several instances sharing the ingest).",
        _check_db_url,
    ),
    _setting(
        "database.password",
        "secret",
        None,
        "PostgreSQL password, if the server asks for one (kept out of the URL and the logs).",
    ),
    _setting(
        "mqtt.url",
        "string",
        "mqtt://127.0.0.1:1883",
        "The broker: mqtts://HOST[:PORT] (port 8883 by default); plaintext mqtt:// only to a "
        "loopback broker.",
        _check_mqtt_url,
    ),
    _setting("mqtt.ca_file", "path", None, "CA certificate(s) that signed the broker's."),
    _setting("mqtt.cert_file", "path", None, "The hub's client certificate (mqtts://)."),
    _setting("mqtt.key_file", "path", None, "The hub's private key (mqtts://)."),
    _setting(
        "mqtt.client_id",
        "string",
        None,
        "MQTT client id; keep it stable per hub instance so its persistent session (and the "
        "messages queued for it) survive a restart. Default: central-hub-<hostname>.",
        _check_pattern(_CLIENT_ID_RE, "1-64 letters, digits, '_' or '-'"),
    ),
    _setting(
        "mqtt.share_group",
        "string",
        "isocam-hub",
        'Shared-subscription group: hub instances with the same group split the messages. "" '
        "subscribes without sharing (every instance gets everything).",
        lambda v: (
            None
            if v == "" or SHARE_GROUP_RE.fullmatch(v)
            else ("must be 1-64 letters, digits, '_' or '-', or \"\"")
        ),
    ),
    _setting("mqtt.keepalive_seconds", "integer", 30, "MQTT keepalive.", _between(5, 600)),
    _setting(
        "mqtt.session_expiry_seconds",
        "integer",
        3600,
        "How long the broker keeps the hub's session (and queues messages for it) while the "
        "hub is away.",
        _between(0, 4294967295),
    ),
    _setting(
        "mqtt.receive_maximum",
        "integer",
        40000,
        "Messages the broker may have in flight to the hub unacknowledged. The hub acknowledges "
        "only after a message is committed, so this bounds its memory; keep it at least twice "
        "ingest.batch_max_messages.",
        _between(100, 65535),
    ),
    _setting(
        "ingest.batch_max_messages",
        "integer",
        10000,
        "Messages written in one transaction at most (bigger batches amortise the per-site "
        "work; end to end on SQLite, measured: 18,000 events/s at 5,000, 20,500 at 10,000, "
        "22,000 at 20,000 with mqtt.receive_maximum 65535). A batch holds the SQLite write "
        "lock while it is written (about 0.4 s at 10,000).",
        _between(1, 20000),
    ),
    _setting(
        "ingest.batch_max_delay_ms",
        "integer",
        50,
        "How long the first message of a batch waits for others before the batch is written.",
        _between(1, 5000),
    ),
    _setting(
        "ingest.sites_refresh_seconds",
        "float",
        5.0,
        "How often the list of enrolled, enabled sites is re-read (a newly enrolled or "
        "disabled site takes effect within this time).",
        _between(0.5, 300),
    ),
    _setting(
        "ingest.future_tolerance_seconds",
        "float",
        60.0,
        "Edge timestamps further in the future than this (a box clock running ahead) are "
        "taken as the hub's receive time in the outage ledger.",
        _between(0, 86400),
    ),
    _setting(
        "ingest.reject_log_interval_seconds",
        "float",
        10.0,
        "At most one log line per reject reason in this interval (the counters count all).",
        _between(0, 3600),
    ),
    _setting(
        "ingest.gap_alert_delay_seconds",
        "float",
        30.0,
        "A hole in a site's event numbers is alerted (seq_gap) only once it has stayed open "
        "this long: hub instances of one share group receive a site's events in turn, so "
        "holes that the next batch fills are normal.",
        _between(1, 86400),
    ),
    _setting(
        "status.outage_image_faults",
        "string list",
        ["black", "covered", "moved"],
        "Image faults that count as an outage (the others only make a camera degraded). "
        f"Allowed: {', '.join(IMAGE_FAULTS)}.",
        _check_faults,
    ),
    _setting(
        "status.chain_head_days",
        "float",
        35.0,
        "Days a chain-head event is kept (one per camera per minute); the latest per camera is "
        "always kept on the camera.",
        _between(1, 3650),
    ),
    _setting(
        "status.event_days",
        "float",
        400.0,
        "Days every other event (tombstones, alarms, gaps…) is kept.",
        _between(1, 36500),
    ),
    _setting(
        "status.prune_interval_minutes",
        "float",
        60.0,
        "How often old events are pruned.",
        _between(1, 1440),
    ),
    _setting(
        "status.rollup_interval_seconds",
        "float",
        60.0,
        "How often the daily uptime rollup is brought up to date (days the ledger changed, "
        "new days, new sites). Uptime figures are exact whatever the interval: what the "
        "rollup does not have yet is read from the ledger, only slower.",
        _between(5, 3600),
    ),
    _setting(
        "tickets.threshold_minutes",
        "float",
        15.0,
        "An outage longer than this opens a ticket.",
        _between(0.1, 10080),
    ),
    _setting(
        "tickets.check_interval_seconds",
        "float",
        30.0,
        "How often long outages are looked for.",
        _between(1, 3600),
    ),
    _setting(
        "tickets.lookback_days",
        "float",
        7.0,
        "Outages that ended longer ago than this never get a ticket (e.g. history replayed "
        "from an edge's spool after a long disconnection).",
        _between(0.01, 365),
    ),
    _setting(
        "alerts.webhook_url",
        "string",
        "",
        'Where every alert is POSTed as JSON (https://; "" for none).',
        _check_http_url,
    ),
    _setting(
        "alerts.webhook_secret",
        "secret",
        None,
        "Key of the X-Isocam-Signature header (HMAC-SHA256 of the body).",
    ),
    _setting(
        "alerts.webhook_timeout_seconds",
        "float",
        10.0,
        "Timeout of one POST.",
        _between(0.5, 300),
    ),
    _setting(
        "alerts.webhook_retries",
        "integer",
        5,
        "Retries of a failed POST (connection error, timeout, 429, 5xx), backing off "
        "exponentially from 1 s to 60 s.",
        _between(0, 50),
    ),
    _setting(
        "alerts.webhook_queue",
        "integer",
        1000,
        "Alerts waiting for the webhook at most; the oldest are dropped first.",
        _between(1, 1_000_000),
    ),
    _setting(
        "alerts.subscriber_queue",
        "integer",
        1000,
        "Alerts waiting for one open NOC page at most.",
        _between(1, 100_000),
    ),
    _setting(
        "web.listen",
        "string",
        "127.0.0.1:8080",
        "Address of the web UI and API (put a TLS-terminating proxy in front).",
        _check_listen,
    ),
    _setting(
        "web.public_url",
        "string",
        "",
        "https:// URL under which users and edge tunnels reach this hub instance.",
        _check_http_url,
    ),
    _setting(
        "viewing.key_file",
        "path",
        None,
        "The viewing private key (`central-hub keygen`): opens sealed segments in memory for "
        "playback and export. Unset: this instance serves no footage (status only).",
    ),
    _setting(
        "viewing.signing_key_file",
        "path",
        None,
        "The hub's Ed25519 key that signs export bundles (`central-hub export keygen`). "
        "Required with viewing.key_file.",
    ),
)

SETTINGS_BY_NAME: Final = {s.name: s for s in SETTINGS}
SECTIONS: Final = tuple(dict.fromkeys(s.section for s in SETTINGS))


# --- typed result ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DatabaseConfig:
    url: str
    password: str | None = field(default=None, repr=False)

    def effective_url(self) -> str:
        """The URL with the password put in (never log it)."""
        if self.password is None or not self.url.startswith("postgres"):
            return self.url
        scheme, rest = self.url.split("://", 1)
        netloc, slash, tail = rest.partition("/")
        user, at, host = netloc.rpartition("@")
        if not at or ":" in user:
            return self.url
        return f"{scheme}://{user}:{quote(self.password, safe='')}@{host}{slash}{tail}"


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    client_id: str = "central-hub"
    share_group: str | None = "isocam-hub"
    keepalive_s: int = 30
    session_expiry_s: int = 3600
    receive_maximum: int = 40000


@dataclass(frozen=True)
class IngestConfig:
    batch_max_messages: int = 10000
    batch_max_delay_s: float = 0.05
    sites_refresh_s: float = 5.0
    future_tolerance_s: float = 60.0
    reject_log_interval_s: float = 10.0
    gap_alert_delay_s: float = 30.0


@dataclass(frozen=True)
class StatusConfig:
    outage_image_faults: frozenset[str] = frozenset({"black", "covered", "moved"})
    chain_head_days: float = 35.0
    event_days: float = 400.0
    prune_interval_s: float = 3600.0
    rollup_interval_s: float = 60.0


@dataclass(frozen=True)
class TicketsConfig:
    threshold_s: float = 900.0
    check_interval_s: float = 30.0
    lookback_s: float = 7 * 86400.0


@dataclass(frozen=True)
class AlertsConfig:
    webhook_url: str | None = None
    webhook_secret: bytes | None = field(default=None, repr=False)
    webhook_timeout_s: float = 10.0
    webhook_retries: int = 5
    webhook_queue: int = 1000
    subscriber_queue: int = 1000


@dataclass(frozen=True)
class WebConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = None


@dataclass(frozen=True)
class ViewingConfig:
    key_file: Path | None = None
    signing_key_file: Path | None = None


@dataclass(frozen=True)
class HubConfig:
    """Everything the hub reads from its config file."""

    database: DatabaseConfig
    mqtt: MqttConfig = MqttConfig()
    ingest: IngestConfig = IngestConfig()
    status: StatusConfig = StatusConfig()
    tickets: TicketsConfig = TicketsConfig()
    alerts: AlertsConfig = AlertsConfig()
    web: WebConfig = WebConfig()
    viewing: ViewingConfig = ViewingConfig()
    source: Path | None = None


# --- loading --------------------------------------------------------------------------------


_TYPE_WORDS: Final[dict[SettingType, str]] = {
    "string": "a string",
    "integer": "an integer",
    "float": "a number",
    "boolean": "true or false",
    "path": "a file path",
    "secret": 'a secret: "literal", { file = "PATH" } or { env = "VARIABLE" }',
    "string list": "a list of strings",
}


def _typed(setting: Setting, value: Any) -> tuple[Any, str | None]:
    """Check the TOML type of `value`; returns (value, problem)."""
    t = setting.type
    if t in ("string", "path"):
        ok = isinstance(value, str) and (t == "string" or value != "")
    elif t == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif t == "boolean":
        ok = isinstance(value, bool)
    elif t == "string list":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:  # secret
        ok = isinstance(value, str) or (
            isinstance(value, dict)
            and len(value) == 1
            and next(iter(value)) in ("file", "env")
            and isinstance(next(iter(value.values())), str)
        )
    if not ok:
        return value, f"expected {_TYPE_WORDS[t]}, got {_shown(value, setting)}"
    return value, None


def _shown(value: Any, setting: Setting) -> str:
    if setting.type == "secret":
        return type(value).__name__
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _resolve_secret(value: Any, base: Path) -> tuple[str | None, str | None]:
    if isinstance(value, str):
        return value, None
    ((how, where),) = value.items()
    if how == "env":
        found = os.environ.get(where)
        if found is None:
            return None, f"environment variable {where} is not set"
        return found, None
    path = (base / where) if not Path(where).is_absolute() else Path(where)
    try:
        return path.read_text().removesuffix("\n"), None
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"


def parse_config(data: dict[str, Any], *, base_dir: Path, source: str = "config") -> HubConfig:
    """Validate a parsed TOML document; `base_dir` anchors relative paths."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    for section, body in data.items():
        if section not in SECTIONS:
            problems.append(f"[{section}]: unknown section; known: {', '.join(SECTIONS)}")
            continue
        if not isinstance(body, dict):
            problems.append(f"{section}: expected a table [{section}]")
            continue
        for key, value in body.items():
            name = f"{section}.{key}"
            setting = SETTINGS_BY_NAME.get(name)
            if setting is None:
                known = ", ".join(s.key for s in SETTINGS if s.section == section)
                problems.append(f"{name}: unknown setting; [{section}] has {known}")
                continue
            value, problem = _typed(setting, value)
            if problem is None and setting.type == "secret":
                value, problem = _resolve_secret(value, base_dir)
            if problem is None and setting.check is not None and value is not None:
                problem = setting.check(value)
            if problem is not None:
                problems.append(f"{name}: {problem}")
                continue
            values[name] = value

    def get(name: str) -> Any:
        if name in values:
            return values[name]
        return SETTINGS_BY_NAME[name].default

    def path(name: str) -> Path | None:
        v = get(name)
        if v is None:
            return None
        p = Path(v)
        return p if p.is_absolute() else base_dir / p

    # Cross-checks.
    mqtt_url = urlsplit(get("mqtt.url"))
    tls = mqtt_url.scheme == "mqtts"
    cert, key, ca = path("mqtt.cert_file"), path("mqtt.key_file"), path("mqtt.ca_file")
    if "mqtt.url" not in [p.split(":", 1)[0] for p in problems]:
        if tls and (cert is None or key is None):
            problems.append("mqtt.cert_file: mqtts:// needs mqtt.cert_file and mqtt.key_file")
        if not tls and any(x is not None for x in (cert, key, ca)):
            problems.append("mqtt.url: TLS files are set but the URL is plaintext mqtt://")
    viewing_key, signing_key = path("viewing.key_file"), path("viewing.signing_key_file")
    for name, p in (
        ("mqtt.ca_file", ca),
        ("mqtt.cert_file", cert),
        ("mqtt.key_file", key),
        ("viewing.key_file", viewing_key),
        ("viewing.signing_key_file", signing_key),
    ):
        if p is not None and not p.is_file():
            problems.append(f"{name}: no such file {p}")
    if (viewing_key is None) != (signing_key is None):
        problems.append(
            "viewing.signing_key_file: viewing.key_file and viewing.signing_key_file go together"
        )
    if get("mqtt.receive_maximum") < 2 * get("ingest.batch_max_messages"):
        problems.append(
            "mqtt.receive_maximum: must be at least twice ingest.batch_max_messages "
            f"({2 * get('ingest.batch_max_messages')}), or batches never fill"
        )
    if problems:
        raise HubConfigError(source, problems)

    db_url = get("database.url")
    if db_url.startswith("sqlite:///") and not db_url.startswith("sqlite:////"):
        db_url = f"sqlite:///{base_dir / db_url.removeprefix('sqlite:///')}"
    host, _, port = get("web.listen").rpartition(":")
    secret = get("alerts.webhook_secret")
    return HubConfig(
        database=DatabaseConfig(url=db_url, password=get("database.password")),
        mqtt=MqttConfig(
            host=mqtt_url.hostname or "127.0.0.1",
            port=mqtt_url.port or (8883 if tls else 1883),
            tls=tls,
            ca_file=ca,
            cert_file=cert,
            key_file=key,
            client_id=get("mqtt.client_id") or _default_client_id(),
            share_group=get("mqtt.share_group") or None,
            keepalive_s=get("mqtt.keepalive_seconds"),
            session_expiry_s=get("mqtt.session_expiry_seconds"),
            receive_maximum=get("mqtt.receive_maximum"),
        ),
        ingest=IngestConfig(
            batch_max_messages=get("ingest.batch_max_messages"),
            batch_max_delay_s=get("ingest.batch_max_delay_ms") / 1000.0,
            sites_refresh_s=get("ingest.sites_refresh_seconds"),
            future_tolerance_s=get("ingest.future_tolerance_seconds"),
            reject_log_interval_s=get("ingest.reject_log_interval_seconds"),
            gap_alert_delay_s=get("ingest.gap_alert_delay_seconds"),
        ),
        status=StatusConfig(
            outage_image_faults=frozenset(get("status.outage_image_faults")),
            chain_head_days=get("status.chain_head_days"),
            event_days=get("status.event_days"),
            prune_interval_s=get("status.prune_interval_minutes") * 60.0,
            rollup_interval_s=get("status.rollup_interval_seconds"),
        ),
        tickets=TicketsConfig(
            threshold_s=get("tickets.threshold_minutes") * 60.0,
            check_interval_s=get("tickets.check_interval_seconds"),
            lookback_s=get("tickets.lookback_days") * 86400.0,
        ),
        alerts=AlertsConfig(
            webhook_url=get("alerts.webhook_url") or None,
            webhook_secret=secret.encode() if secret else None,
            webhook_timeout_s=get("alerts.webhook_timeout_seconds"),
            webhook_retries=get("alerts.webhook_retries"),
            webhook_queue=get("alerts.webhook_queue"),
            subscriber_queue=get("alerts.subscriber_queue"),
        ),
        web=WebConfig(
            host=host.strip("[]"), port=int(port), public_url=get("web.public_url") or None
        ),
        viewing=ViewingConfig(key_file=viewing_key, signing_key_file=signing_key),
        source=Path(source) if source != "config" else None,
    )


def load_config(path: Path | str) -> HubConfig:
    """Read and validate the TOML file at `path` (HubConfigError says what is wrong)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise HubConfigError(str(p), [f"cannot read the file: {exc.strerror or exc}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise HubConfigError(str(p), [f"not valid TOML: {exc}"]) from None
    return parse_config(data, base_dir=p.resolve().parent, source=str(p))


def settings_markdown() -> str:
    """The settings table for docs/hub.md (a test checks the docs hold exactly this)."""
    lines: list[str] = []
    for section in SECTIONS:
        lines += [f"### `[{section}]`", "", "| Setting | Type | Default | Description |"]
        lines.append("|---|---|---|---|")
        for s in SETTINGS:
            if s.section != section:
                continue
            default = "none" if s.default is None else _toml_value(s.default)
            desc = s.help + (f" Allowed: {s.allowed}." if s.allowed else "")
            lines.append(f"| `{s.name}` | {s.type} | {default} | {desc} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":  # pragma: no cover
    print(settings_markdown(), end="")
