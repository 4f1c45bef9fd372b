"""Load and validate the edge agent's TOML configuration.

`load_config()` checks the file against the settings table (`edge_agent.settings`) and reports
every problem at once in one `ConfigError`, so a technician fixes the file in one pass instead of
one restart per typo. The result is a tree of frozen dataclasses; secrets are `Secret` objects
whose repr never shows the value.
"""

from __future__ import annotations

import difflib
import hmac
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge_agent.discovery import resolve_interfaces
from edge_agent.settings import (
    LEGAL_MINIMUM_RETENTION_DAYS,
    SETTINGS,
    SETTINGS_BY_NAME,
    Setting,
    split_host_port,
)

DEFAULT_CONFIG_PATH = Path("/etc/isocam/edge.toml")


class ConfigError(Exception):
    """The configuration cannot be used; `errors` holds one line per problem."""

    def __init__(self, path: Path | str, errors: list[str]) -> None:
        self.path = Path(path)
        self.errors = list(errors)
        if len(self.errors) == 1:
            message = f"{self.path}: {self.errors[0]}"
        else:
            lines = "\n".join(f"  - {e}" for e in self.errors)
            message = f"{self.path}: {len(self.errors)} problems:\n{lines}"
        super().__init__(message)


class Secret:
    """A password that never shows itself in repr, str, f-strings or logs; `reveal()` it."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str = "literal") -> None:
        self._value = value
        #: where it came from ("literal", "file:/path", "env:NAME"), safe to show
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(<hidden, {self.source}>)"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)


# --- typed configuration --------------------------------------------------------------------


@dataclass(frozen=True)
class SiteConfig:
    id: str
    name: str
    province: str
    district: str
    kind: str
    authority: str
    operator: str


@dataclass(frozen=True)
class StorageConfig:
    data_dir: Path
    retention_days: int
    allow_below_legal_minimum: bool
    reserve_gib: float
    warn_margin_days: float
    floor_grace_seconds: float


@dataclass(frozen=True)
class RecordingConfig:
    segment_seconds: int
    fragment_seconds: float
    stall_seconds: float
    startup_grace_seconds: float
    backoff_max_seconds: float
    fsync_every_fragments: int


@dataclass(frozen=True)
class Credentials:
    """A camera login; `password` None means the camera has none."""

    user: str
    password: Secret | None


@dataclass(frozen=True)
class OnvifCamera:
    """An ONVIF camera pinned by address; `user`/`password` are the effective login."""

    address: str  # normalised "host:port"
    name: str
    user: str
    password: Secret | None

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.user, self.password)


@dataclass(frozen=True)
class RtspCamera:
    """A camera without ONVIF, recorded from its RTSP URL(s)."""

    id: str
    name: str
    rtsp_main: str
    rtsp_sub: str | None
    user: str
    password: Secret | None

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.user, self.password)


@dataclass(frozen=True)
class CamerasConfig:
    accept_h265: bool
    max_clock_offset_seconds: float
    onvif: tuple[OnvifCamera, ...]
    rtsp: tuple[RtspCamera, ...]


@dataclass(frozen=True)
class CredentialsConfig:
    user: str
    password: Secret | None


@dataclass(frozen=True)
class DiscoveryConfig:
    enabled: bool
    interfaces: tuple[str, ...]
    timeout_seconds: float
    rescan_minutes: float


@dataclass(frozen=True)
class MqttConfig:
    url: str
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    client_id: str
    keepalive_seconds: int
    session_expiry_seconds: int
    will_delay_seconds: int
    health_interval_seconds: int
    spool_max_bytes: int

    @property
    def tls(self) -> bool:
        return self.url.startswith("mqtts://")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)


@dataclass(frozen=True)
class KeysConfig:
    recipient_files: tuple[Path, ...]
    device_key_file: Path


@dataclass(frozen=True)
class HealthConfig:
    check_interval_seconds: float
    black_max_luma: float
    covered_max_luma: float
    covered_max_sharpness: float
    blurred_max_sharpness: float
    blurred_max_ratio: float
    frozen_max_diff: float
    moved_max_similarity: float
    confirm_checks: int
    ntp_server: str
    max_box_clock_offset_seconds: float


@dataclass(frozen=True)
class ViewingConfig:
    ca_file: Path | None
    max_tunnels: int
    idle_seconds: float


@dataclass(frozen=True)
class MetricsConfig:
    listen: str  # "" when turned off


@dataclass(frozen=True)
class StatusConfig:
    socket: Path


@dataclass(frozen=True)
class LoggingConfig:
    level: str


@dataclass(frozen=True)
class EdgeConfig:
    """The whole validated configuration of one edge box."""

    source: Path
    site: SiteConfig
    storage: StorageConfig
    recording: RecordingConfig
    cameras: CamerasConfig
    credentials: CredentialsConfig
    discovery: DiscoveryConfig
    mqtt: MqttConfig
    keys: KeysConfig
    health: HealthConfig
    viewing: ViewingConfig
    metrics: MetricsConfig
    status: StatusConfig
    logging: LoggingConfig

    def credentials_for(self, host: str, port: int | None = None) -> Credentials:
        """Login for the ONVIF device at `host` (`host`, `host:port`, or `host` and `port`):
        the pinned entry's when one matches, else the default."""
        wanted = split_host_port(host, 80) if port is None else (host.strip("[]"), port)
        for cam in self.cameras.onvif:
            if wanted is not None and (cam.host, cam.port) == wanted:
                return cam.credentials
        return Credentials(self.credentials.user, self.credentials.password)

    def pinned_onvif_addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every `[[cameras.onvif]]` entry, in file order."""
        return [(cam.host, cam.port) for cam in self.cameras.onvif]

    def discovery_interfaces(self) -> list[str]:
        """The configured discovery interfaces as IPv4 addresses (names resolved on this
        host); empty when discovery is off or none is named. Falling back to every interface
        (`edge_agent.discovery.default_interfaces()`) is the caller's explicit choice."""
        if not self.discovery.enabled:
            return []
        return resolve_interfaces(self.discovery.interfaces)


# --- loading -------------------------------------------------------------------------------

_MISSING = object()
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECTION_NAMES = {s.section for s in SETTINGS}


def load_config(path: str | os.PathLike[str]) -> EdgeConfig:
    """Read and validate the TOML file at `path`; raises `ConfigError` listing every problem."""
    path = Path(path)
    doc = _read_toml(path)
    errors: list[str] = []
    values = _Validator(path.resolve().parent, errors).run(doc)
    _cross_check(values, errors)
    if errors:
        raise ConfigError(path, errors)
    return _build(path, values)


def check_config(path: str | os.PathLike[str]) -> list[str]:
    """Validate like `load_config` (raising `ConfigError`) and return the warnings."""
    return config_warnings(load_config(path))


def config_warnings(config: EdgeConfig) -> list[str]:
    """Things that are allowed but deserve a line in the log at every start."""
    warnings: list[str] = []
    days = config.storage.retention_days
    if days < LEGAL_MINIMUM_RETENTION_DAYS:
        warnings.append(
            f"storage.retention_days = {days} is below the legal minimum of "
            f"{LEGAL_MINIMUM_RETENTION_DAYS} days (allowed by storage.allow_below_legal_minimum)"
        )
    if not config.mqtt.tls:
        warnings.append(
            "mqtt.url is plaintext mqtt://: status and events travel unencrypted "
            "(test benches only; use mqtts:// at a facility)"
        )
    if not config.discovery.enabled and not config.cameras.onvif and not config.cameras.rtsp:
        warnings.append(
            "no cameras: discovery.enabled is false and no [[cameras.onvif]] or "
            "[[cameras.rtsp]] entry is given"
        )
    if config.discovery.enabled and config.discovery.interfaces:
        present = {name for _, name in socket.if_nameindex()}
        for spec in config.discovery.interfaces:
            if not re.fullmatch(r"[0-9.]+", spec) and spec not in present:
                warnings.append(f"discovery.interfaces: no interface named {spec!r} on this host")
    warnings.extend(_secret_exposure_warnings(config))
    return warnings


def _secret_exposure_warnings(config: EdgeConfig) -> list[str]:
    secrets: list[Secret] = []
    if config.credentials.password is not None:
        secrets.append(config.credentials.password)
    cameras: list[OnvifCamera | RtspCamera] = [*config.cameras.onvif, *config.cameras.rtsp]
    secrets.extend(cam.password for cam in cameras if cam.password is not None)
    out: list[str] = []
    seen: set[str] = set()
    for secret in secrets:
        if secret.source == "literal":
            where = config.source
        elif secret.source.startswith("file:"):
            where = Path(secret.source[len("file:") :])
        else:
            continue
        if str(where) in seen:
            continue
        seen.add(str(where))
        try:
            mode = where.stat().st_mode
        except OSError:
            continue
        if mode & stat.S_IROTH:
            out.append(
                f"{where} holds a camera password and is readable by every user (chmod o-r {where})"
            )
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            path, ["config file not found (give another one with --config)"]
        ) from None
    except PermissionError:
        raise ConfigError(path, ["cannot read the config file: permission denied"]) from None
    except IsADirectoryError:
        raise ConfigError(path, ["is a directory, not a config file"]) from None
    except OSError as exc:
        raise ConfigError(path, [f"cannot read the config file: {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(path, [f"line {line}: not UTF-8 text"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = re.search(r"\(at line (\d+), column (\d+)\)", message)
        if found:
            lineno = int(found.group(1))
            reason = message[: found.start()].strip()
            lines = text.splitlines()
            shown = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ""
            detail = f"line {lineno}, column {found.group(2)}: TOML syntax error: {reason}"
            if shown:
                detail += f" in: {shown[:80]}"
        else:
            detail = f"TOML syntax error: {message}"
        raise ConfigError(path, [detail]) from None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# In this order: a bool is also an int.
_TOML_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
)


def _toml_type(value: Any) -> str:
    return next((name for kind, name in _TOML_TYPES if isinstance(value, kind)), "a date/time")


class _Validator:
    """Walks the parsed TOML against the table, collecting values and errors."""

    def __init__(self, base_dir: Path, errors: list[str]) -> None:
        self.base_dir = base_dir
        self.errors = errors
        #: settings an unknown key was taken for: their absence is not reported a second time
        self.suggested: set[str] = set()

    def run(self, doc: dict[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        self._walk(doc, "", "", values)
        for setting in SETTINGS:
            if setting.is_list_item or setting.name in values:
                continue
            if setting.required:
                if setting.name not in self.suggested:
                    self.errors.append(f"{setting.name}: missing; expected {setting.expected()}")
            else:
                values[setting.name] = setting.default
        return values

    def _walk(
        self, table: dict[str, Any], shown: str, canonical: str, into: dict[str, Any]
    ) -> None:
        for key, value in table.items():
            name, cname = shown + key, canonical + key
            setting = SETTINGS_BY_NAME.get(cname)
            if setting is not None:
                if setting.type == "table list":
                    into[cname] = self._table_list(setting, value, name)
                else:
                    # _MISSING marks a value already reported, so it is not "missing" too
                    into[cname] = self._convert(setting, value, name)
            elif any(s.name.startswith(cname + ".") for s in SETTINGS):
                if isinstance(value, dict):
                    self._walk(value, name + ".", cname + ".", into)
                else:
                    self.errors.append(
                        f"{name}: expected a table [{name}], got {_toml_type(value)}"
                    )
            else:
                message, meant = _unknown_key(name, cname, is_table=isinstance(value, dict))
                self.errors.append(message)
                if meant is not None:
                    self.suggested.add(meant)

    def _table_list(self, setting: Setting, value: Any, name: str) -> tuple[dict[str, Any], ...]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.errors.append(
                f"{name}: expected {setting.expected()}, written [[{name}]], "
                f"got {_toml_type(value)}"
            )
            return ()
        items: list[dict[str, Any]] = []
        fields = [s for s in SETTINGS if s.name.startswith(setting.name + "[].")]
        for index, entry in enumerate(value, start=1):
            item: dict[str, Any] = {}
            self._walk(entry, f"{name}[{index}].", setting.name + "[].", item)
            for field_setting in fields:
                if field_setting.name in item:
                    continue
                if field_setting.required:
                    if f"{name}[{index}].{field_setting.key}" in self.suggested:
                        continue
                    self.errors.append(
                        f"{name}[{index}].{field_setting.key}: missing; "
                        f"expected {field_setting.expected()}"
                    )
                else:
                    item[field_setting.name] = field_setting.default
            items.append({k.rsplit(".", 1)[1]: v for k, v in item.items()})
        return tuple(items)

    def _convert(self, setting: Setting, value: Any, name: str) -> Any:
        """The typed value, or `_MISSING` after recording an error."""
        converted = self._typed(setting, value, name)
        if converted is _MISSING:
            return _MISSING
        for constraint in setting.constraints:
            problem = constraint.problem(converted)
            if problem is not None:
                # a problem that names its file says enough; a secret is never echoed
                quiet = setting.type == "secret" or not problem.startswith("expected")
                shown = "" if quiet else f", got {_show(value)}"
                self.errors.append(f"{name}: {problem}{shown}")
                return _MISSING
        return converted

    def _typed(self, setting: Setting, value: Any, name: str) -> Any:
        def wrong() -> Any:
            self.errors.append(
                f"{name}: expected {setting.expected()}, got {_toml_type(value)}"
                + ("" if setting.type == "secret" else f" {_show(value)}")
            )
            return _MISSING

        kind = setting.type
        if kind == "string":
            return value if isinstance(value, str) else wrong()
        if kind == "integer":
            return value if isinstance(value, int) and not isinstance(value, bool) else wrong()
        if kind == "float":
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            return wrong()
        if kind == "boolean":
            return value if isinstance(value, bool) else wrong()
        if kind == "path":
            return self._path(value) if isinstance(value, str) and value.strip() else wrong()
        if kind == "string list":
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return tuple(value)
            return wrong()
        if kind == "path list":
            if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
                return tuple(self._path(v) for v in value)
            return wrong()
        if kind == "secret":
            return self._secret(setting, value, name, wrong)
        raise AssertionError(f"unhandled setting type {kind}")  # pragma: no cover

    def _path(self, text: str) -> Path:
        path = Path(text).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def _secret(self, setting: Setting, value: Any, name: str, wrong: Callable[[], Any]) -> Any:
        if isinstance(value, str):
            return Secret(value)
        if (
            not isinstance(value, dict)
            or len(value) != 1
            or next(iter(value)) not in ("file", "env")
        ):
            return wrong()
        ((how, where),) = value.items()
        if not isinstance(where, str) or not where:
            return wrong()
        if how == "env":
            if not _ENV_NAME.fullmatch(where):
                self.errors.append(f"{name}: {where!r} is not an environment variable name")
                return _MISSING
            secret = os.environ.get(where)
            if secret is None:
                self.errors.append(f"{name}: environment variable {where} is not set")
                return _MISSING
            return Secret(secret, f"env:{where}")
        path = self._path(where)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self.errors.append(f"{name}: secret file not found: {path}")
            return _MISSING
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.errors.append(f"{name}: cannot read secret file {path}: {reason}")
            return _MISSING
        # one trailing newline is what editors and `echo` add; it is not part of the password
        if text.endswith("\r\n"):
            text = text[:-2]
        elif text.endswith("\n"):
            text = text[:-1]
        if not text:
            self.errors.append(f"{name}: secret file {path} is empty")
            return _MISSING
        return Secret(text, f"file:{path}")


def _unknown_key(shown: str, canonical: str, *, is_table: bool) -> tuple[str, str | None]:
    """The error line for an unknown key, and the setting it most likely meant (shown form)."""
    parent, _, key = canonical.rpartition(".")
    shown_parent = shown.rpartition(".")[0]
    in_entry = shown != canonical  # inside [[...]]: suggest the key as the user writes it
    what = "unknown section" if is_table and not parent else "unknown key"
    # a key written in the wrong section (or before any [section]) is a common slip
    elsewhere = [s.name for s in SETTINGS if s.key == key and not s.is_list_item]
    if elsewhere and not in_entry and not is_table:
        return f"{shown}: {what} (did you mean {elsewhere[0]}?)", elsewhere[0]
    # what may stand at this level: settings and sub-sections below `parent`
    prefix = parent + "." if parent else ""
    levels = {s.name[len(prefix) :].split(".")[0] for s in SETTINGS if s.name.startswith(prefix)}
    close = difflib.get_close_matches(
        key, sorted(level for level in levels if not level.endswith("[]")), n=1, cutoff=0.6
    )
    if close:
        suggestion = close[0] if in_entry else prefix + close[0]
        meant = f"{shown_parent}.{close[0]}" if shown_parent else close[0]
        return f"{shown}: {what} (did you mean {suggestion}?)", meant
    if not parent:
        return f"{shown}: {what} (sections are: {', '.join(sorted(_SECTION_NAMES))})", None
    return f"{shown}: {what}", None


def _cross_check(values: dict[str, Any], errors: list[str]) -> None:
    """Rules that involve more than one setting (documented in docs/configuration.md).

    A rule is checked only when its settings are valid on their own, so every problem is
    reported once.
    """

    def valid(*keys: str) -> bool:
        return all(values.get(k, _MISSING) is not _MISSING for k in keys)

    if valid("storage.retention_days", "storage.allow_below_legal_minimum"):
        days = values["storage.retention_days"]
        if days < LEGAL_MINIMUM_RETENTION_DAYS and not values["storage.allow_below_legal_minimum"]:
            errors.append(
                f"storage.retention_days: expected at least {LEGAL_MINIMUM_RETENTION_DAYS} "
                f"(the legal minimum), got {days}; to keep less on a test bench set "
                "storage.allow_below_legal_minimum = true"
            )
    if valid("recording.fragment_seconds", "recording.segment_seconds"):
        fragment, segment = (
            values["recording.fragment_seconds"],
            values["recording.segment_seconds"],
        )
        if fragment >= segment:
            errors.append(
                "recording.fragment_seconds: expected less than recording.segment_seconds "
                f"({segment}), got {fragment:g}"
            )
    if valid("recording.stall_seconds", "recording.startup_grace_seconds"):
        stall, grace = values["recording.stall_seconds"], values["recording.startup_grace_seconds"]
        if grace < stall:
            errors.append(
                "recording.startup_grace_seconds: expected at least recording.stall_seconds "
                f"({stall:g}), got {grace:g}"
            )
    tls_keys = ("mqtt.ca_file", "mqtt.cert_file", "mqtt.key_file")
    if valid("mqtt.url", *tls_keys):
        tls_files = [k for k in tls_keys if values[k] is not None]
        if values["mqtt.url"].startswith("mqtts://"):
            for key in ("mqtt.cert_file", "mqtt.key_file"):
                if values[key] is None:
                    errors.append(
                        f"{key}: missing; mqtts:// needs this site's client certificate and key"
                    )
        elif tls_files:
            errors.append(
                f"mqtt.url: expected mqtts:// because {', '.join(tls_files)} "
                "is given (TLS files would be ignored with plaintext mqtt://)"
            )
    if valid("mqtt.will_delay_seconds", "mqtt.session_expiry_seconds"):
        delay, expiry = values["mqtt.will_delay_seconds"], values["mqtt.session_expiry_seconds"]
        if delay > expiry:
            errors.append(
                "mqtt.will_delay_seconds: expected at most mqtt.session_expiry_seconds "
                f"({expiry}), got {delay}"
            )
    if valid("health.black_max_luma", "health.covered_max_luma"):
        black, covered = values["health.black_max_luma"], values["health.covered_max_luma"]
        if black >= covered:
            errors.append(
                "health.black_max_luma: expected less than health.covered_max_luma "
                f"({covered:g}), got {black:g}"
            )
    _check_unique(values.get("cameras.onvif", ()), "cameras.onvif", "address", errors)
    _check_unique(values.get("cameras.rtsp", ()), "cameras.rtsp", "id", errors)


def _check_unique(items: Any, name: str, key: str, errors: list[str]) -> None:
    if items is _MISSING:
        return
    seen: dict[object, int] = {}
    for index, item in enumerate(items, start=1):
        value = item.get(key, _MISSING)
        if value is _MISSING:
            continue
        # "10.0.0.5" and "10.0.0.5:80" are the same camera
        identity = split_host_port(value, 80) if key == "address" else value
        if identity in seen:
            errors.append(
                f"{name}[{index}].{key}: {value!r} is already given in {name}[{seen[identity]}]"
            )
        else:
            seen[identity] = index


def _section(values: dict[str, Any], section: str) -> dict[str, Any]:
    prefix = section + "."
    return {
        k[len(prefix) :]: v
        for k, v in values.items()
        if k.startswith(prefix) and "." not in k[len(prefix) :]
    }


def _normalise_address(address: str) -> str:
    parsed = split_host_port(address, 80)
    assert parsed is not None  # validated by the table
    host, port = parsed
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _build(path: Path, values: dict[str, Any]) -> EdgeConfig:
    site = SiteConfig(**_section(values, "site"))
    default_user: str = values["credentials.user"]
    default_password: Secret | None = values["credentials.password"]

    def login(item: dict[str, Any]) -> tuple[str, Secret | None]:
        user = item["user"] if item["user"] is not None else default_user
        password = item["password"] if item["password"] is not None else default_password
        return user, password

    onvif = tuple(
        OnvifCamera(_normalise_address(item["address"]), item["name"], *login(item))
        for item in values["cameras.onvif"]
    )
    rtsp = tuple(
        RtspCamera(item["id"], item["name"], item["rtsp_main"], item["rtsp_sub"], *login(item))
        for item in values["cameras.rtsp"]
    )
    storage = StorageConfig(**_section(values, "storage"))
    mqtt = _section(values, "mqtt")
    if mqtt["client_id"] is None:
        mqtt["client_id"] = f"edge-{site.id}"
    keys = _section(values, "keys")
    if keys["device_key_file"] is None:
        keys["device_key_file"] = storage.data_dir / "device-key.pem"
    return EdgeConfig(
        source=path,
        site=site,
        storage=storage,
        recording=RecordingConfig(**_section(values, "recording")),
        cameras=CamerasConfig(
            accept_h265=values["cameras.accept_h265"],
            max_clock_offset_seconds=values["cameras.max_clock_offset_seconds"],
            onvif=onvif,
            rtsp=rtsp,
        ),
        credentials=CredentialsConfig(default_user, default_password),
        discovery=DiscoveryConfig(**_section(values, "discovery")),
        mqtt=MqttConfig(**mqtt),
        keys=KeysConfig(**keys),
        health=HealthConfig(**_section(values, "health")),
        viewing=ViewingConfig(**_section(values, "viewing")),
        metrics=MetricsConfig(**_section(values, "metrics")),
        status=StatusConfig(**_section(values, "status")),
        logging=LoggingConfig(**_section(values, "logging")),
    )
