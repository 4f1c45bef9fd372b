"""Every setting of the edge agent, in one table.

The TOML loader (`edge_agent.config`), `docs/configuration.md` and the example file are all
checked against `SETTINGS`: a setting exists once, here, with its type, default, help text and
constraints (Datasette's `SETTINGS` table is the model). Regenerate the docs with
`python -m edge_agent.settings > docs/configuration.md`; a test fails when they drift.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from sitelink.topics import SITE_ID_RE

#: Vietnamese rule of 2021: footage of quarantine facilities is kept at least 30 days.
LEGAL_MINIMUM_RETENTION_DAYS: Final = 30

SettingType = Literal[
    "string",
    "integer",
    "float",
    "boolean",
    "path",
    "secret",
    "string list",
    "path list",
    "table list",
]


class _Required:
    """Marker default: the setting has no default and must be given."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()


@dataclass(frozen=True)
class Constraint:
    """A rule a value must satisfy; `text` says it in words for errors and docs."""

    text: str
    #: returns None when the value is fine, else what is wrong (without the key name)
    problem: Callable[[Any], str | None]


@dataclass(frozen=True)
class Setting:
    """One row of the settings table.

    `name` is dotted (`section.key`); fields of an array of tables are named
    `section.list[].key`. `default` is a value, `REQUIRED`, or None for "unset" (optional,
    or derived from other settings as `default_doc` says).
    """

    name: str
    type: SettingType
    default: Any
    help: str
    constraints: tuple[Constraint, ...] = ()
    default_doc: str | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def section(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def key(self) -> str:
        """Last component, the key as written in the TOML table."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def is_list_item(self) -> bool:
        """True for a field of one `[[...]]` entry."""
        return "[]." in self.name

    def expected(self) -> str:
        """What a valid value looks like, in words, for error messages."""
        parts = [_TYPE_WORDS[self.type]]
        parts.extend(c.text for c in self.constraints)
        return ", ".join(parts)


_TYPE_WORDS: dict[SettingType, str] = {
    "string": "a string",
    "integer": "an integer",
    "float": "a number",
    "boolean": "true or false",
    "path": "a file path (relative paths are taken from the config file's directory)",
    "secret": 'a secret: "literal", { file = "PATH" } or { env = "VARIABLE" }',
    "string list": "a list of strings",
    "path list": "a list of file paths",
    "table list": "an array of tables ([[...]] entries)",
}


# --- constraints --------------------------------------------------------------------------


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def between(lo: float, hi: float) -> Constraint:
    """Inclusive numeric range."""
    text = f"between {_number(lo)} and {_number(hi)}"

    def problem(value: Any) -> str | None:
        return None if lo <= value <= hi else f"expected {text}"

    return Constraint(text, problem)


def at_least(lo: float) -> Constraint:
    text = f"at least {_number(lo)}"

    def problem(value: Any) -> str | None:
        return None if value >= lo else f"expected {text}"

    return Constraint(text, problem)


def one_of(*choices: str) -> Constraint:
    text = "one of " + ", ".join(choices)

    def problem(value: Any) -> str | None:
        return None if value in choices else f"expected {text}"

    return Constraint(text, problem)


def matches(pattern: str, text: str) -> Constraint:
    """Whole-string regular expression match, described in words by `text`."""
    rx = re.compile(pattern)

    def problem(value: Any) -> str | None:
        return None if rx.fullmatch(value) else f"expected {text}"

    return Constraint(text, problem)


def length(lo: int, hi: int) -> Constraint:
    text = f"{lo}–{hi} characters" if lo else f"at most {hi} characters"

    def problem(value: Any) -> str | None:
        return None if lo <= len(value) <= hi else f"expected {text}"

    return Constraint(text, problem)


def printable() -> Constraint:
    """No control characters: names end up in logs, terminals and MQTT messages."""

    def problem(value: Any) -> str | None:
        return "expected no control characters" if re.search(r"[\x00-\x1f\x7f]", value) else None

    return Constraint("no control characters", problem)


def min_items(n: int) -> Constraint:
    text = f"at least {n} item" + ("s" if n != 1 else "")

    def problem(value: Any) -> str | None:
        return None if len(value) >= n else f"expected {text}"

    return Constraint(text, problem)


def unique_items() -> Constraint:
    def problem(value: Any) -> str | None:
        seen: set[Any] = set()
        for item in value:
            if item in seen:
                return f"{str(item)!r} is listed twice"
            seen.add(item)
        return None

    return Constraint("no duplicates", problem)


def readable_file() -> Constraint:
    """The path names an existing regular file this process may read."""

    def problem(value: Any) -> str | None:
        path = Path(value)
        if not path.exists():
            return f"file not found: {path}"
        if not path.is_file():
            return f"not a regular file: {path}"
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            return f"cannot read {path}: {exc.strerror or exc}"
        return None

    return Constraint("an existing readable file", problem)


def each(inner: Constraint) -> Constraint:
    """Apply a constraint to every item of a list."""

    def problem(value: Any) -> str | None:
        for item in value:
            p = inner.problem(item)
            if p is not None:
                return f"{str(item)!r}: {p}" if p.startswith("expected") else p
        return None

    return Constraint(f"each {inner.text}", problem)


_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def is_valid_host(host: str) -> bool:
    """An IPv4 address, an IPv6 address (without brackets) or a DNS host name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return bool(_HOSTNAME.fullmatch(host)) and not re.fullmatch(r"[0-9.]+", host)
    return True


def split_host_port(text: str, default_port: int) -> tuple[str, int] | None:
    """Split `host`, `host:port` or `[v6]:port`; None when it is not one of those."""
    if "://" in text or "/" in text or not text:
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else ""
        if ":" not in host:
            return None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        host, port_text = text, ""  # a bare IPv6 address
    else:
        host, port_text = text, ""
    if not is_valid_host(host):
        return None
    if port_text == "" and text.endswith(":"):
        return None
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            return None
        return host, int(port_text)
    return host, default_port


def host_port(default_port: int | None, *, allow_empty: bool = False) -> Constraint:
    """`host[:port]`; with `default_port` None the port is mandatory."""
    if default_port is None:
        text = "HOST:PORT"
    else:
        text = f"HOST or HOST:PORT (port {default_port} when left out)"
    if allow_empty:
        text += ', or "" to turn it off'

    def problem(value: Any) -> str | None:
        if allow_empty and value == "":
            return None
        if "://" in value:
            return f"expected {text} without a scheme such as http://"
        parsed = split_host_port(value, default_port or 0)
        if parsed is None or (default_port is None and parsed[1] == 0):
            return f"expected {text}"
        return None

    return Constraint(text, problem)


def url(schemes: tuple[str, ...], *, path_allowed: bool, credentials_hint: str = "") -> Constraint:
    """A URL with one of `schemes`, a host, a valid port and no credentials in it."""
    path = "[/PATH]" if path_allowed else ""
    text = " or ".join(f"{s}://HOST[:PORT]{path}" for s in schemes)
    text += " with no user:password@ in it"

    def problem(value: Any) -> str | None:
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError as exc:
            return f"expected {text} ({exc})"
        if parts.scheme not in schemes:
            return f"expected {text}"
        if parts.username is not None or parts.password is not None:
            return "credentials do not belong in the URL (URLs end up in logs)" + credentials_hint
        if not parts.hostname or not is_valid_host(parts.hostname):
            return f"expected {text}"
        if port == 0:
            return f"expected {text}"
        if not path_allowed and (parts.path not in ("", "/") or parts.query or parts.fragment):
            return f"expected {text} (no path, query or fragment)"
        return None

    return Constraint(text, problem)


def ipv4_or_interface_name() -> Constraint:
    text = "an IPv4 address of this box (e.g. 192.168.1.10) or an interface name (e.g. eth1)"

    def problem(value: Any) -> str | None:
        try:
            addr = ipaddress.IPv4Address(value)
        except ValueError:
            if re.fullmatch(r"[A-Za-z0-9_.@-]{1,15}", value) and not re.fullmatch(
                r"[0-9.]+", value
            ):
                return None
            return f"expected {text}"
        if addr.is_multicast or addr.is_unspecified or addr.is_reserved:
            return f"expected {text}, not {value}"
        return None

    return Constraint(text, problem)


# the contract's rule (sitelink.topics): the id is a topic level, a certificate CN and a path
_SITE_ID = matches(
    SITE_ID_RE.pattern, "3–64 characters of a-z, 0-9 and '-', not starting or ending with '-'"
)
_CAMERA_ID = matches(r"[a-z0-9-]{1,64}", "1–64 characters of a-z, 0-9 and '-'")
_NAME = (length(1, 200), printable())
_RTSP = url(("rtsp", "rtsps"), path_allowed=True, credentials_hint=": use user and password")

# --- the table ----------------------------------------------------------------------------

#: What each section is for; rendered as the section introduction in the docs.
SECTIONS: Final[dict[str, str]] = {
    "site": "Who this box is. The attributes decide who may see the site's status and footage "
    "at the hub; they must match the site's registration there.",
    "storage": "Where sealed segments live and for how long.",
    "recording": "How streams are cut into sealed segments (a remux, never a transcode).",
    "cameras": "Which cameras to record and which ones are eligible. Cameras come from "
    "discovery, from `[[cameras.onvif]]` entries (ONVIF devices pinned by address, for LANs "
    "where multicast is blocked or for per-camera credentials) and from `[[cameras.rtsp]]` "
    "entries (cameras without ONVIF, recorded straight from their RTSP URLs).",
    "credentials": "Default login for cameras; `[[cameras.onvif]]` and `[[cameras.rtsp]]` "
    "entries may override it per camera.",
    "discovery": "WS-Discovery (multicast 239.255.255.250:3702, TTL 1) on the camera LAN.",
    "mqtt": "The uplink to the hub: MQTT 5 over TLS with a per-site client certificate "
    "(its CN is the site id).",
    "keys": "Keys for sealing footage and signing the segment chain. The box holds only "
    "public recipient keys: a stolen box reveals no footage.",
    "health": "Image checks on keyframes, on a picture scaled to 320 px wide (mean luma, "
    "Laplacian-variance sharpness, mean absolute difference between checked keyframes). "
    "Measured signals (luma / sharpness / difference) on the simulator: normal "
    "112 / 4,970 / 2.9, black 0 / 0 / 0, covered 33 / 0.1 / 2.2, blurred 111 / 2.8 / 1.4, "
    "frozen 112 / 4,970 / 0.0; scene similarity 0.94 normal, 0.05 moved. A genuinely static "
    "scene also looks frozen.",
    "viewing": "Live view, playback and snapshots: the box never listens; when the hub asks "
    "(MQTT `open_tunnel`), it dials the hub that asked over wss://.",
    "metrics": "Prometheus metrics endpoint.",
    "status": "Local status socket used by `edge-agent status`.",
    "logging": "Log output.",
}

SETTINGS: Final[tuple[Setting, ...]] = (
    # site
    Setting(
        "site.id",
        "string",
        REQUIRED,
        "Site identifier, the same as at the hub and in the MQTT client certificate's CN.",
        (_SITE_ID,),
    ),
    Setting(
        "site.name",
        "string",
        "",
        "Name of the facility as people call it (Vietnamese is fine), shown in reports.",
        (length(0, 200), printable()),
    ),
    Setting(
        "site.province",
        "string",
        REQUIRED,
        "Province (tỉnh/thành phố).",
        (length(1, 100), printable()),
    ),
    Setting(
        "site.district",
        "string",
        REQUIRED,
        'District (quận/huyện); "" for a site that belongs to no district (required so it is '
        "never forgotten: district officials see only sites that name their district).",
        (length(0, 100), printable()),
    ),
    Setting(
        "site.kind",
        "string",
        REQUIRED,
        "What the site is: a quarantine facility or a checkpoint.",
        (one_of("facility", "checkpoint"),),
    ),
    Setting(
        "site.authority",
        "string",
        REQUIRED,
        "Managing authority of the site.",
        (one_of("health", "district", "military", "police", "other"),),
    ),
    Setting(
        "site.operator",
        "string",
        REQUIRED,
        "Telecom operator running the central system for this site.",
        (one_of("vnpt", "viettel"),),
    ),
    # storage
    Setting(
        "storage.data_dir",
        "path",
        Path("/var/lib/isocam"),
        "Directory for sealed segments, the segment index and the event spool.",
    ),
    Setting(
        "storage.retention_days",
        "integer",
        LEGAL_MINIMUM_RETENTION_DAYS,
        f"Days of footage kept. Below {LEGAL_MINIMUM_RETENTION_DAYS} (the legal minimum) only "
        "with storage.allow_below_legal_minimum = true, and a warning is logged at every start.",
        (between(1, 3650),),
    ),
    Setting(
        "storage.allow_below_legal_minimum",
        "boolean",
        False,
        "Allow storage.retention_days below the legal minimum (a test bench, never a facility).",
    ),
    Setting(
        "storage.reserve_gib",
        "float",
        2.0,
        "Free space kept on the data volume. Below it, the oldest segments beyond the retention "
        "floor are deleted (signed tombstones); inside the floor only after a critical alarm "
        "and storage.floor_grace_seconds.",
        (between(0.05, 10000),),
    ),
    Setting(
        "storage.warn_margin_days",
        "float",
        7.0,
        "Warn when the volume holds fewer than retention_days + this many days of footage at "
        "the measured bit rates.",
        (between(0, 3650),),
    ),
    Setting(
        "storage.floor_grace_seconds",
        "float",
        600.0,
        "On a full disk, seconds between the critical alarm and the first deletion of footage "
        "inside the retention floor (time for the NOC to act).",
        (between(0, 86400),),
    ),
    # recording
    Setting(
        "recording.segment_seconds",
        "integer",
        60,
        "Length of one sealed segment; cut at the first keyframe after this time.",
        (between(10, 600),),
    ),
    Setting(
        "recording.fragment_seconds",
        "float",
        1.0,
        "Length of one fMP4 fragment, the unit sealed as it is produced (a crash loses at "
        "most one). Must be shorter than recording.segment_seconds.",
        (between(0.1, 10),),
    ),
    Setting(
        "recording.stall_seconds",
        "float",
        3.0,
        "A stream that delivers no packet for this long is stalled: the gap is recorded and the "
        "recorder reconnects. Cameras send a packet per frame, so 3 s of silence is a real stall; "
        "the NOC hears of it within about this plus one second (target ≤ 5 s).",
        (between(1, 120),),
    ),
    Setting(
        "recording.startup_grace_seconds",
        "float",
        15.0,
        "After connecting, how long the first keyframe may take before the stream counts as "
        "stalled (many cameras opening at once are slow). At least recording.stall_seconds.",
        (between(1, 300),),
    ),
    Setting(
        "recording.backoff_max_seconds",
        "float",
        30.0,
        "Longest wait between reconnect attempts (the wait doubles from 1 s up to this).",
        (between(1, 600),),
    ),
    Setting(
        "recording.fsync_every_fragments",
        "integer",
        1,
        "fdatasync a segment file every N sealed fragments (0: only when a segment ends). Bounds "
        "what a power cut takes; a killed process loses nothing written.",
        (between(0, 600),),
    ),
    # cameras
    Setting(
        "cameras.accept_h265",
        "boolean",
        True,
        "Record H.265 streams. Browsers cannot play H.265: playback then needs a transcode at "
        "the hub. With false, H.265-only cameras are ineligible in the survey.",
    ),
    Setting(
        "cameras.max_clock_offset_seconds",
        "float",
        5.0,
        "A camera whose clock is further off than this is flagged (and ineligible in the survey).",
        (between(0.1, 3600),),
    ),
    Setting(
        "cameras.onvif",
        "table list",
        (),
        "ONVIF cameras pinned by address, recorded whether or not discovery finds them.",
    ),
    Setting(
        "cameras.onvif[].address",
        "string",
        REQUIRED,
        "ONVIF device address.",
        (host_port(80),),
    ),
    Setting(
        "cameras.onvif[].name",
        "string",
        "",
        "Name to show for the camera (the camera's own name when empty).",
        (length(0, 200), printable()),
    ),
    Setting(
        "cameras.onvif[].user",
        "string",
        None,
        "User for this camera.",
        default_doc="credentials.user",
    ),
    Setting(
        "cameras.onvif[].password",
        "secret",
        None,
        "Password for this camera.",
        default_doc="credentials.password",
    ),
    Setting(
        "cameras.rtsp",
        "table list",
        (),
        "Cameras without ONVIF, recorded straight from their RTSP URLs.",
    ),
    Setting(
        "cameras.rtsp[].id", "string", REQUIRED, "Camera id, unique on this site.", (_CAMERA_ID,)
    ),
    Setting("cameras.rtsp[].name", "string", REQUIRED, "Name to show for the camera.", _NAME),
    Setting("cameras.rtsp[].rtsp_main", "string", REQUIRED, "Main (recorded) stream.", (_RTSP,)),
    Setting(
        "cameras.rtsp[].rtsp_sub",
        "string",
        None,
        "Sub stream, for live view and image checks.",
        (_RTSP,),
        default_doc="none",
    ),
    Setting(
        "cameras.rtsp[].user",
        "string",
        None,
        "User for this camera.",
        default_doc="credentials.user",
    ),
    Setting(
        "cameras.rtsp[].password",
        "secret",
        None,
        "Password for this camera.",
        default_doc="credentials.password",
    ),
    # credentials
    Setting("credentials.user", "string", "admin", "Default camera user.", (length(0, 200),)),
    Setting(
        "credentials.password",
        "secret",
        None,
        "Default camera password.",
        default_doc="none (no password)",
    ),
    # discovery
    Setting(
        "discovery.enabled",
        "boolean",
        True,
        "Find cameras by WS-Discovery and listen for Hello/Bye.",
    ),
    Setting(
        "discovery.interfaces",
        "string list",
        (),
        "Interfaces to probe and listen on. Empty means every non-loopback interface that is "
        "up: name the camera LAN explicitly on a box with an uplink you must not probe.",
        (each(ipv4_or_interface_name()), unique_items()),
        default_doc="[] (every non-loopback interface that is up)",
    ),
    Setting(
        "discovery.timeout_seconds",
        "float",
        3.0,
        "How long one probe waits for answers (cameras answer within 0.5 s by the spec).",
        (between(0.5, 30),),
    ),
    Setting(
        "discovery.rescan_minutes",
        "float",
        10.0,
        "Minutes between full rescans (probe + ONVIF query of every camera), which notice "
        "cameras that changed address. Hello messages are handled as they arrive.",
        (between(1, 1440),),
    ),
    # mqtt
    Setting(
        "mqtt.url",
        "string",
        REQUIRED,
        "Broker address; port 8883 (mqtts) or 1883 (mqtt) when left out. Plaintext mqtt:// "
        "is for test benches only.",
        (
            url(
                ("mqtts", "mqtt"),
                path_allowed=False,
                credentials_hint=": the site's certificate identifies it",
            ),
        ),
    ),
    Setting(
        "mqtt.ca_file",
        "path",
        None,
        "CA certificate(s) that signed the broker's certificate (system store when unset).",
        (readable_file(),),
        default_doc="none (system CA store)",
    ),
    Setting(
        "mqtt.cert_file",
        "path",
        None,
        "This site's client certificate (PEM). Required with mqtts://.",
        (readable_file(),),
        default_doc="none",
    ),
    Setting(
        "mqtt.key_file",
        "path",
        None,
        "Private key of the client certificate (PEM). Required with mqtts://.",
        (readable_file(),),
        default_doc="none",
    ),
    Setting(
        "mqtt.client_id",
        "string",
        None,
        "MQTT client id. The production broker (deploy/mosquitto) replaces it with the site "
        "certificate's CN, so one box cannot knock another off by taking its client id.",
        (matches(r"[A-Za-z0-9._-]{1,128}", "1–128 characters of A-Z, a-z, 0-9, '.', '_', '-'"),),
        default_doc="edge-<site.id>",
    ),
    Setting(
        "mqtt.keepalive_seconds",
        "integer",
        30,
        "MQTT keepalive; the broker declares the box dead after 1.5 times this.",
        (between(5, 3600),),
    ),
    Setting(
        "mqtt.session_expiry_seconds",
        "integer",
        86400,
        "MQTT 5 session expiry: how long the broker keeps the session (and queued commands) "
        "while the box is offline.",
        (between(0, 4294967295),),
    ),
    Setting(
        "mqtt.will_delay_seconds",
        "integer",
        10,
        "MQTT 5 will delay: a reconnect within this time does not publish the death message. "
        "At most mqtt.session_expiry_seconds.",
        (between(0, 86400),),
    ),
    Setting(
        "mqtt.health_interval_seconds",
        "integer",
        60,
        "How often a health report is published.",
        (between(5, 3600),),
    ),
    Setting(
        "mqtt.spool_max_bytes",
        "integer",
        256 * 1024 * 1024,
        "Largest size of the event spool kept while the uplink is down; the oldest health "
        "reports are dropped first, events never.",
        (between(1024 * 1024, 1024**4),),
    ),
    # keys
    Setting(
        "keys.recipient_files",
        "path list",
        REQUIRED,
        "Public keys (PEM) every segment's data key is wrapped to: the hub's viewing key and "
        "the offline escrow key.",
        (min_items(1), each(readable_file()), unique_items()),
    ),
    Setting(
        "keys.device_key_file",
        "path",
        None,
        "This box's Ed25519 private key, which signs segment-chain heads and tombstones "
        "(created at enrolment).",
        default_doc="<storage.data_dir>/device-key.pem",
    ),
    # health
    Setting(
        "health.check_interval_seconds",
        "float",
        4.0,
        "Seconds between image checks of one camera (one keyframe decode and analysis: ~7 ms at "
        "720p H.264, ~12 ms H.265).",
        (between(1, 3600),),
    ),
    Setting(
        "health.black_max_luma",
        "float",
        16.0,
        "Mean luma (0–255) at or below which a picture is black.",
        (between(0, 255),),
    ),
    Setting(
        "health.covered_max_luma",
        "float",
        60.0,
        "Mean luma at or below which a picture that is also unsharp is covered. "
        "Must be above health.black_max_luma.",
        (between(0, 255),),
    ),
    Setting(
        "health.covered_max_sharpness",
        "float",
        10.0,
        "Sharpness at or below which a dark picture is covered.",
        (at_least(0),),
    ),
    Setting(
        "health.blurred_max_sharpness",
        "float",
        20.0,
        "Sharpness at or below which a normally lit picture is blurred.",
        (at_least(0),),
    ),
    Setting(
        "health.blurred_max_ratio",
        "float",
        0.25,
        "Contrast-normalised sharpness, as a fraction of the camera's own baseline, at or below "
        "which a normally lit picture is blurred (0 turns this test off).",
        (between(0, 0.95),),
    ),
    Setting(
        "health.frozen_max_diff",
        "float",
        0.1,
        "Mean difference between consecutive checked keyframes at or below which the picture is "
        "frozen.",
        (at_least(0),),
    ),
    Setting(
        "health.moved_max_similarity",
        "float",
        0.5,
        "Scene-signature similarity (0–1) to the camera's enrolment reference below which it has "
        "been moved (≈0.94 same view, ≈0.4 for a 5 % pan or 5° roll).",
        (between(0, 1),),
    ),
    Setting(
        "health.confirm_checks",
        "integer",
        2,
        "Consecutive checks that must agree before an image fault is reported or cleared. "
        "With health.check_interval_seconds this sets the detection time: about "
        "confirm_checks x interval + one keyframe interval (≈ 10 s with the defaults).",
        (between(1, 100),),
    ),
    Setting(
        "health.ntp_server",
        "string",
        "",
        "NTP server the box's clock is compared with (HOST or HOST:PORT, port 123 by default), "
        "e.g. the operator's. Empty: the box's clock offset is not measured.",
        (host_port(123, allow_empty=True),),
    ),
    Setting(
        "health.max_box_clock_offset_seconds",
        "float",
        2.0,
        "A box clock further than this from NTP raises a `clock` event (segment times and "
        "event times come from this clock).",
        (between(0.01, 3600),),
    ),
    # viewing
    Setting(
        "viewing.ca_file",
        "path",
        None,
        "CA certificate(s) that signed the hub's HTTPS certificate, for the wss:// tunnels "
        "(system store when unset).",
        (readable_file(),),
        default_doc="none (system CA store)",
    ),
    Setting(
        "viewing.max_tunnels",
        "integer",
        16,
        "Most tunnels open at once (several viewers of one camera share one).",
        (between(1, 256),),
    ),
    Setting(
        "viewing.idle_seconds",
        "float",
        60.0,
        "A tunnel that carries nothing for this long is closed by the box.",
        (between(5, 3600),),
    ),
    # service surfaces
    Setting(
        "metrics.listen",
        "string",
        "127.0.0.1:9108",
        "Address of the Prometheus /metrics endpoint.",
        (host_port(None, allow_empty=True),),
    ),
    Setting(
        "status.socket",
        "path",
        Path("/run/isocam/edge.sock"),
        "Unix socket for local status queries.",
    ),
    Setting(
        "logging.level",
        "string",
        "info",
        "Least severe level logged.",
        (one_of("debug", "info", "warning", "error"),),
    ),
)

SETTINGS_BY_NAME: Final[dict[str, Setting]] = {s.name: s for s in SETTINGS}


# --- docs ---------------------------------------------------------------------------------


def _format_default(setting: Setting) -> str:
    if setting.default_doc is not None:
        return setting.default_doc
    if setting.required:
        return "**required**"
    value = setting.default
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, Path)):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[]"
    if isinstance(value, int) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"{value} ({value // (1024 * 1024)} MiB)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_DOC_INTRO = """\
# Edge agent configuration

<!-- Generated by edge_agent.settings.render_settings_markdown(); do not edit by hand.
     Regenerate: .venv/bin/python -m edge_agent.settings > docs/configuration.md -->

`edge-agent` reads one TOML file: `/etc/isocam/edge.toml` unless `--config` names another.
`edge-agent check-config` only validates it. Every problem is reported at once, one line per
key, naming the key and what is expected; unknown keys are errors too (a misspelt key would
otherwise be silently ignored). A commented, working example is `deploy/edge.example.toml`.

- **Paths** that are relative are taken from the directory of the config file.
- **Secrets** (camera passwords) are written one of three ways; the value is never logged:
  `password = "literal"`, `password = { file = "/etc/isocam/camera.pass" }` (the file's
  content without its final newline: use it with systemd `LoadCredential=`), or
  `password = { env = "ISOCAM_CAMERA_PASSWORD" }`. `check-config` warns when a file holding a
  password is readable by every user.
- **Retention** below the legal minimum of {minimum} days is refused unless
  `storage.allow_below_legal_minimum = true`, and then warned about at every start.
- **Cross-checks**: `mqtts://` needs `mqtt.cert_file` and `mqtt.key_file`; TLS files with a
  plaintext `mqtt://` URL are refused; `mqtt.will_delay_seconds` may not exceed
  `mqtt.session_expiry_seconds`; `recording.fragment_seconds` must be shorter than
  `recording.segment_seconds`; `health.black_max_luma` must be below `health.covered_max_luma`;
  camera ids and pinned addresses must be unique.
"""


def render_settings_markdown() -> str:
    """`docs/configuration.md`, generated from `SETTINGS` so no setting goes undocumented."""
    out = [_DOC_INTRO.replace("{minimum}", str(LEGAL_MINIMUM_RETENTION_DAYS))]
    for section, intro in SECTIONS.items():
        rows = [s for s in SETTINGS if s.section == section]
        out.append(f"\n## `[{section}]`\n\n{intro}\n")
        out.append("| Setting | Type | Default | Description |")
        out.append("|---|---|---|---|")
        for s in rows:
            description = s.help
            if s.constraints:
                description += " Allowed: " + "; ".join(c.text for c in s.constraints) + "."
            out.append(
                f"| `{s.name}` | {s.type} | {_cell(_format_default(s))} | {_cell(description)} |"
            )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_settings_markdown())
