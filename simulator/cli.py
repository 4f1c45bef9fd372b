"""`camera-sim`: virtual ONVIF cameras for the demo, the tests and installer training."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import click
from aiohttp import web

from simulator.camera import FAULT_KINDS
from simulator.control import (
    ControlError,
    call,
    default_state_file,
    make_control_app,
    write_state_file,
)
from simulator.fleet import Fleet, FleetOptions

_STATE_HELP = (
    "State file of the running simulator (default: per user, in $XDG_RUNTIME_DIR or /tmp)."
)


def _resolution(value: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 1280x720") from None
    if not (16 <= w <= 7680 and 16 <= h <= 4320) or w % 2 or h % 2:
        raise click.BadParameter(f"{value!r}: even sizes between 16x16 and 7680x4320")
    return w, h


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Virtual ONVIF cameras that real clients accept.

    Each camera is a real network peer: ONVIF device and media services over SOAP/HTTP with
    WS-UsernameToken digest auth, a JPEG snapshot behind HTTP Digest/Basic, H.264 (or H.265)
    over RTSP from GStreamer's RTSP server, and optionally WS-Discovery. Faults are switched at
    run time with `camera-sim fault`.
    """


@main.command()
@click.option("--cameras", "-n", default=4, show_default=True, type=click.IntRange(1, 256))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address every camera binds.")
@click.option(
    "--onvif-port",
    default=0,
    type=click.IntRange(0, 65535),
    help="First ONVIF/HTTP port (camera i uses PORT+i). Default: free ports.",
)
@click.option(
    "--rtsp-port",
    default=0,
    type=click.IntRange(0, 65535),
    help="First RTSP port (camera i uses PORT+i). Default: free ports.",
)
@click.option("--user", default="admin", show_default=True)
@click.option("--password", default="admin123", show_default=True)
@click.option("--main-resolution", default="1280x720", show_default=True)
@click.option(
    "--main-bitrate",
    default=2000,
    show_default=True,
    type=click.IntRange(64, 50000),
    help="Main profile kbit/s.",
)
@click.option("--sub-resolution", default="640x360", show_default=True)
@click.option(
    "--sub-bitrate",
    default=512,
    show_default=True,
    type=click.IntRange(64, 50000),
    help="Sub profile kbit/s.",
)
@click.option("--codec", type=click.Choice(["H264", "H265"]), default="H264", show_default=True)
@click.option(
    "--name-prefix",
    default="Camera",
    show_default=True,
    help="Camera names are PREFIX 01, PREFIX 02, ...",
)
@click.option(
    "--discovery-interface",
    default=None,
    metavar="IPV4",
    help="Answer WS-Discovery probes on this interface address (off by default; use "
    "only on loopback or a test network namespace, never a production LAN).",
)
@click.option(
    "--first-index",
    default=1,
    show_default=True,
    type=click.IntRange(1, 999_999),
    help="Number of the first camera (ids cam-NN, names and serials SIM0000NN follow it); "
    "lets several simulators play one site without repeating a serial number.",
)
@click.option("--state-file", type=click.Path(path_type=Path), default=None, help=_STATE_HELP)
@click.option("-v", "--verbose", is_flag=True, help="Log every request and fault.")
def run(
    cameras: int,
    host: str,
    onvif_port: int,
    rtsp_port: int,
    user: str,
    password: str,
    main_resolution: str,
    main_bitrate: int,
    sub_resolution: str,
    sub_bitrate: int,
    codec: str,
    name_prefix: str,
    discovery_interface: str | None,
    first_index: int,
    state_file: Path | None,
    verbose: bool,
) -> None:
    """Start N cameras; print one JSON line per camera once all are ready; run until Ctrl-C.

    Each line has id, name, onvif_url, rtsp_main, rtsp_sub, snapshot_url, user, password.
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s camera-sim %(levelname)s %(name)s: %(message)s",
    )
    mw, mh = _resolution(main_resolution)
    sw, sh = _resolution(sub_resolution)
    options = FleetOptions(
        cameras=cameras,
        host=host,
        onvif_port=onvif_port,
        rtsp_port=rtsp_port,
        user=user,
        password=password,
        main=(mw, mh, main_bitrate),
        sub=(sw, sh, sub_bitrate),
        codec=codec,  # type: ignore[arg-type]  # click.Choice guarantees the literal
        name_prefix=name_prefix,
        discovery_interface=discovery_interface,
        first_index=first_index,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(options, state_file or default_state_file()))


async def _run(options: FleetOptions, state_file: Path) -> None:
    fleet = Fleet(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    click.echo(
        f"camera-sim: starting {options.cameras} cameras (first start encodes the "
        "looping clips; later starts reuse the cache)...",
        err=True,
    )
    runner: web.AppRunner | None = None
    try:
        await fleet.start()
        token = secrets.token_urlsafe(24)
        runner = web.AppRunner(make_control_app(fleet, token), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}"
        write_state_file(state_file, url, token)
        for cam in fleet.cameras:
            click.echo(json.dumps(cam.announcement()))
        sys.stdout.flush()
        click.echo(
            f"camera-sim: {len(fleet.cameras)} cameras ready; control API {url}; Ctrl-C stops",
            err=True,
        )
        await stop.wait()
    finally:
        with contextlib.suppress(FileNotFoundError):
            state_file.unlink()  # noqa: ASYNC240 - one unlink at shutdown
        if runner is not None:
            await runner.cleanup()
        await fleet.stop()


def _control(
    state_file: Path | None, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    try:
        return asyncio.run(call(state_file or default_state_file(), method, path, body))
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None


@main.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, as `run` prints.")
@click.option("--state-file", type=click.Path(path_type=Path), default=None, help=_STATE_HELP)
def list_(as_json: bool, state_file: Path | None) -> None:
    """List the cameras of the running simulator and their faults."""
    cams = _control(state_file, "GET", "/cameras")
    if as_json:
        for cam in cams:
            click.echo(json.dumps(cam))
        return
    click.echo(f"{'ID':8} {'NAME':14} {'ONVIF':40} {'RTSP MAIN':36} FAULTS")
    for cam in cams:
        faults = ", ".join(cam["faults"]) or "-"
        click.echo(
            f"{cam['id']:8} {cam['name']:14} {cam['onvif_url']:40} {cam['rtsp_main']:36} {faults}"
        )


@main.command()
@click.argument("camera")
@click.argument("kind", type=click.Choice(FAULT_KINDS))
@click.argument("value", required=False, type=float)
@click.option("--state-file", type=click.Path(path_type=Path), default=None, help=_STATE_HELP)
def fault(camera: str, kind: str, value: float | None, state_file: Path | None) -> None:
    """Switch a fault on CAMERA (id like cam-01, its name, or its number).

    \b
    KIND is one of:
      clear              back to a healthy camera
      offline            every port refuses connections, discovery goes silent
      stall              RTSP sessions stay open, no packet flows
      black | covered | frozen | blurred | moved   what the picture shows
      clock-skew SECS    camera clock off by SECS (may be negative)
      wrong-credentials  the camera no longer accepts its advertised password
      reboot SECS        down for SECS, then back with new RTSP sessions
      bitrate KBPS       main stream re-encoded at KBPS (sub scales with it)
    """
    body: dict[str, Any] = {"kind": kind}
    if value is not None:
        body["value"] = value
    cam = _control(state_file, "POST", f"/cameras/{camera}/fault", body)
    click.echo(f"{cam['id']}: {', '.join(cam['faults']) or 'healthy'}")
