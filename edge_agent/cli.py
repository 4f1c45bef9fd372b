"""`edge-agent`: the facility NVR daemon and the installer's tools."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from edge_agent.survey import CameraSurvey, SurveyPolicy, SurveyTarget, render_html, run_survey

DEFAULT_CONFIG = Path("/etc/isocam/edge.toml")
_ONVIF_PORT = 80


def _split_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    if not host:
        host, port = value, ""
    try:
        return host, int(port) if port else _ONVIF_PORT
    except ValueError:
        raise click.BadParameter(f"{value!r} is not HOST or HOST:PORT") from None


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s edge-agent %(levelname)s %(name)s: %(message)s",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """isocam edge agent: finds, surveys and records a facility's ONVIF cameras, and reports
    their health to the central hub.

    Configuration is one TOML file (default /etc/isocam/edge.toml, see docs/configuration.md);
    `edge-agent check-config` validates it.
    """


def _load(config: Path | None) -> Any | None:
    """The validated configuration, or None when no file was given and the default is absent."""
    from edge_agent.config import ConfigError, load_config

    path = config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if path is None:
        return None
    try:
        return load_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@main.command("check-config")
@click.option(
    "--config", "-c", type=click.Path(path_type=Path), default=DEFAULT_CONFIG, show_default=True
)
def check_config_cmd(config: Path) -> None:
    """Validate the configuration file and say what is wrong, every key at once."""
    from edge_agent.config import ConfigError, check_config

    try:
        warnings = check_config(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"{config}: OK")


def _targets(
    cfg: Any | None,
    cameras: tuple[str, ...],
    user: str | None,
    password: str | None,
    interfaces: tuple[str, ...],
    timeout: float,
    use_discovery: bool,
) -> list[SurveyTarget]:
    """Cameras to survey: --camera addresses, the config's pinned ones, and discovery."""
    from edge_agent.discovery import probe

    def creds(host: str, port: int) -> tuple[str, str]:
        if user is not None:
            return user, password or ""
        if cfg is not None:
            c = cfg.credentials_for(host, port)
            return c.user, c.password.reveal() if c.password is not None else ""
        raise click.UsageError("give --user/--password or a --config with camera credentials")

    found: dict[tuple[str, int], SurveyTarget] = {}
    for spec in cameras:
        host, port = _split_address(spec)
        found[(host, port)] = SurveyTarget(host, port, *creds(host, port), source="manual")
    if cfg is not None:
        for host, port in cfg.pinned_onvif_addresses():
            found.setdefault(
                (host, port), SurveyTarget(host, port, *creds(host, port), source="config")
            )
    if use_discovery:
        ifaces = list(interfaces) or (cfg.discovery_interfaces() if cfg is not None else [])
        if not ifaces:
            if not found:
                raise click.UsageError(
                    "nothing to survey: name cameras with --camera HOST[:PORT], or the LAN "
                    "interface to search with --interface ADDRESS"
                )
        else:
            click.echo(
                f"Đang dò tìm camera (WS-Discovery) trên {', '.join(ifaces)} / "
                "discovering cameras...",
                err=True,
            )
            for dev in asyncio.run(probe(ifaces, timeout)):
                for host, port in dev.onvif_addresses():
                    found.setdefault(
                        (host, port),
                        SurveyTarget(host, port, *creds(host, port), source="discovery"),
                    )
    return list(found.values())


def _progress(done: int, total: int, cam: CameraSurvey) -> None:
    verdict = "ĐẠT/eligible" if cam.eligible else "KHÔNG ĐẠT/not eligible"
    click.echo(f"[{done}/{total}] {cam.target.host}:{cam.target.port} {verdict}", err=True)


_F = TypeVar("_F", bound=Callable[..., Any])


def _camera_options(fn: _F) -> _F:
    """Options `survey` and `discover` share: where the cameras are and how to log in."""
    options = [
        click.option(
            "--config",
            "-c",
            type=click.Path(path_type=Path),
            default=None,
            help="Edge configuration (credentials, pinned cameras, discovery interfaces, …).",
        ),
        click.option(
            "--camera",
            "cameras",
            multiple=True,
            metavar="HOST[:PORT]",
            help="This ONVIF address too (for LANs where multicast is blocked).",
        ),
        click.option(
            "--interface",
            "interfaces",
            multiple=True,
            metavar="ADDRESS",
            help="Local IPv4 address of the camera LAN to send WS-Discovery probes from.",
        ),
        click.option("--user", default=None, help="Camera user (overrides the config)."),
        click.option("--password", default=None, help="Camera password (overrides the config)."),
        click.option(
            "--timeout",
            type=click.FloatRange(0.5, 30),
            default=3.0,
            show_default=True,
            help="How long to wait for WS-Discovery answers.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout."),
        click.option("-v", "--verbose", is_flag=True, help="Log what is being done."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command()
@_camera_options
@click.option("--no-discovery", is_flag=True, help="Survey only the given/pinned cameras.")
@click.option(
    "--html",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write a self-contained HTML report with snapshots.",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Data volume to size (default: the config's, else the current directory).",
)
@click.option(
    "--retention-days",
    type=click.IntRange(1, 3650),
    default=None,
    help="Days to size the disk for (default: the config's storage.retention_days, else 30).",
)
@click.option(
    "--seconds",
    type=click.FloatRange(1, 60),
    default=4.0,
    show_default=True,
    help="How long to pull each main stream to measure it.",
)
def survey(
    config: Path | None,
    cameras: tuple[str, ...],
    interfaces: tuple[str, ...],
    no_discovery: bool,
    user: str | None,
    password: str | None,
    as_json: bool,
    html: Path | None,
    data_dir: Path | None,
    retention_days: int | None,
    seconds: float,
    timeout: float,
    verbose: bool,
) -> None:
    """Survey the cameras for an installer: reachability, ONVIF, device, profiles, measured
    bitrate, clock, snapshot and an eligibility verdict with reasons; then the disk needed for
    the retention period and the days the data volume really holds."""
    _logging(verbose)
    cfg = _load(config)
    targets = _targets(cfg, cameras, user, password, interfaces, timeout, not no_discovery)
    if not targets:
        raise click.ClickException("no camera found: check the interface, or add --camera")
    policy = SurveyPolicy(
        accept_h265=cfg.cameras.accept_h265 if cfg is not None else True,
        max_clock_offset_s=cfg.cameras.max_clock_offset_seconds if cfg is not None else 5.0,
        retention_days=retention_days or (cfg.storage.retention_days if cfg is not None else 30),
        measure_seconds=seconds,
    )
    ddir = data_dir or (cfg.storage.data_dir if cfg is not None else Path.cwd())
    click.echo(
        f"Khảo sát {len(targets)} camera / surveying {len(targets)} cameras "
        f"(~{seconds:.0f} s each, in parallel)...",
        err=True,
    )
    report = asyncio.run(run_survey(targets, policy, ddir, progress=_progress))
    if html is not None:
        html.write_text(render_html(report), encoding="utf-8")
        click.echo(f"HTML report: {html}", err=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
        return
    s = report.to_dict()["summary"]
    for c in report.cameras:
        mark = "ĐẠT      " if c.eligible else "KHÔNG ĐẠT"
        dev = f"{c.device.manufacturer or '-'} {c.device.model or ''}".strip()
        rate = f"{c.measured_mbps:.2f} Mbit/s" if c.measured_mbps else "-"
        click.echo(
            f"{mark} {c.target.host}:{c.target.port:<6} {dev:28} {rate:>13}  "
            + "; ".join(c.reasons + c.warnings)
        )
    days = s["days_of_retention_disk_holds"]
    click.echo(
        f"\n{s['eligible']}/{s['cameras']} đạt / eligible; {s['total_measured_mbps']:.2f} Mbit/s; "
        f"cần / needs {s['disk_needed_bytes'] / 1e9:.1f} GB for {policy.retention_days} days; "
        f"trống / free {s['disk_free_bytes'] / 1e9:.1f} GB = "
        f"{'-' if days is None else days} days"
    )


@main.command()
@_camera_options
def discover(
    config: Path | None,
    cameras: tuple[str, ...],
    interfaces: tuple[str, ...],
    user: str | None,
    password: str | None,
    timeout: float,
    as_json: bool,
    verbose: bool,
) -> None:
    """The quick survey: find cameras and read what ONVIF says, without pulling streams."""
    from edge_agent.onvif_device import query_device

    _logging(verbose)
    cfg = _load(config)
    targets = _targets(cfg, cameras, user, password, interfaces, timeout, True)

    async def query_all() -> list[Any]:
        return await asyncio.gather(
            *(query_device(t.host, t.port, t.user, t.password) for t in targets)
        )

    reports = asyncio.run(query_all())
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in reports], indent=2, ensure_ascii=False))
        return
    for r in reports:
        what = (
            f"{r.manufacturer} {r.model} S/N {r.serial} "
            + ", ".join(f"{p.token} {p.codec} {p.width}x{p.height}" for p in r.profiles)
            if r.ok
            else f"{r.error}: {r.error_message}"
        )
        click.echo(f"{r.host}:{r.port:<6} {what}")


@main.command()
@click.option(
    "--config",
    "-c",
    type=click.Path(path_type=Path),
    default=None,
    help="Edge configuration (for its data directory).",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Data directory to verify (overrides the config).",
)
@click.option(
    "--public-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The device key as registered at the hub (PEM), to prove origin and not only consistency.",
)
@click.option("--quick", is_flag=True, help="Check sizes only, skip hashing every file.")
@click.option("--json", "as_json", is_flag=True)
def verify(
    config: Path | None, data_dir: Path | None, public_key: Path | None, quick: bool, as_json: bool
) -> None:
    """Check every recorded segment against the index and the signed hash chain.

    Names each break (camera, seq, what): an edited or truncated file, swapped or deleted
    segments, edited or deleted index rows, bad signatures. Lawful expiry (signed tombstones)
    is not a break. Exits 1 when anything is broken.
    """
    from edge_agent.device_key import DeviceKeyError, load_public_key_pem
    from edge_agent.verify import verify as run_verify

    cfg = _load(config)
    ddir = data_dir or (cfg.storage.data_dir if cfg is not None else None)
    if ddir is None:
        raise click.UsageError("give --data-dir or a --config")
    key = None
    if public_key is not None:
        try:
            key = load_public_key_pem(public_key.read_text())
        except (DeviceKeyError, ValueError) as exc:
            raise click.ClickException(f"{public_key}: {exc}") from None
    report = run_verify(ddir, public_key=key, hash_files=not quick)
    click.echo(report.to_json() if as_json else report.render())
    sys.exit(0 if report.ok else 1)


@main.command()
@click.option(
    "--config", "-c", type=click.Path(path_type=Path), default=DEFAULT_CONFIG, show_default=True
)
def run(config: Path) -> None:
    """Run the facility daemon: record every camera into sealed segments, watch their health,
    and report to the hub. Stops cleanly on SIGTERM or Ctrl-C (open segments are finished)."""
    import signal

    from edge_agent.config import ConfigError, config_warnings, load_config
    from edge_agent.daemon import EdgeDaemon

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    logging.basicConfig(
        level=getattr(logging, cfg.logging.level.upper()),
        stream=sys.stderr,
        format="%(asctime)s edge-agent %(levelname)s %(name)s: %(message)s",
    )
    for warning in config_warnings(cfg):
        logging.getLogger("edge_agent").warning("%s", warning)

    async def main_loop() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await EdgeDaemon(cfg).run(stop)

    try:
        asyncio.run(main_loop())
    except Exception as exc:  # say what happened in one line; the traceback is in the log
        logging.getLogger("edge_agent").exception("edge agent stopped by an error")
        raise click.ClickException(f"edge agent stopped: {exc}") from None


def _days_text(days: float | None) -> str:
    return "?" if days is None else f"{days:.1f}"


@main.command()
@click.option(
    "--config", "-c", type=click.Path(path_type=Path), default=DEFAULT_CONFIG, show_default=True
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON status.")
def status(config: Path, as_json: bool) -> None:
    """Show the live state of the local daemon (cameras, recording, disk, uplink)."""
    import aiohttp

    from edge_agent.daemon import query_status

    cfg = _load(config)
    if cfg is None:
        raise click.ClickException(f"{config} not found: give --config")
    try:
        data = asyncio.run(query_status(cfg.status.socket))
    except (TimeoutError, OSError, aiohttp.ClientError) as exc:
        raise click.ClickException(
            f"no edge agent answers on {cfg.status.socket} ({exc}); is `edge-agent run` running?"
        ) from None
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    up = data.get("uplink") or {}
    click.echo(
        f"Điểm / site {data['site']}  agent {data['agent_version']}  "
        f"uptime {data['uptime_s']:.0f} s  disk {data['disk']['level']} "
        f"(forecast {_days_text(data['disk']['forecast_days'])} days)  "
        f"uplink {'connected' if up.get('connected') else 'DOWN'}"
        + (f" spool {up.get('spool_depth')}" if up else "")
    )
    if data.get("alarms"):
        click.echo("Cảnh báo / alarms: " + ", ".join(data["alarms"]))
    click.echo(f"{'CAMERA':10} {'STATE':12} {'FPS':>6} {'KBIT/S':>8} {'SEGS':>5}  NOTE")
    for cam in data["cameras"]:
        note = cam.get("last_error") or cam.get("reason") or ""
        click.echo(
            f"{cam['id']:10} {cam['state']:12} {cam['fps'] or 0:6.1f} "
            f"{cam['bitrate_kbps'] or 0:8.0f} {cam['segments']:5}  {note}"
        )


@main.command("device-key")
@click.option(
    "--config", "-c", type=click.Path(path_type=Path), default=DEFAULT_CONFIG, show_default=True
)
def device_key_cmd(config: Path) -> None:
    """Print this box's device public key (PEM) and key id, for registering the site at the
    hub (`central-hub sites add … --device-key FILE`). Makes the key if it does not exist yet."""
    from edge_agent.device_key import DeviceKeyError, key_id, load_or_create_device_key
    from edge_agent.device_key import public_key_pem as pem_of

    cfg = _load(config)
    if cfg is None:
        raise click.ClickException(f"{config} not found: give --config")
    try:
        cfg.keys.device_key_file.parent.mkdir(parents=True, exist_ok=True)
        key = load_or_create_device_key(cfg.keys.device_key_file)
    except (DeviceKeyError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"# site {cfg.site.id}, device key id {key_id(key)}", err=True)
    click.echo(pem_of(key), nl=False)
