"""`central-hub`: the operator's hub, and its key and footage tools."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from sitelink.sealed_segment import (
    DEFAULT_SUITE,
    KeyFileError,
    SealedSegmentError,
    SealSuite,
    generate_private_key,
    unseal_to,
    write_private_key,
    write_public_key,
)

_SUITES = {"mlkem768-x25519": SealSuite.MLKEM768_X25519, "x25519": SealSuite.X25519}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """isocam central hub: ingests every site's state, holds accounts and scopes, proxies
    viewing, and keeps the audit log."""


@main.command()
@click.argument("name", type=click.Path(path_type=Path))
@click.option(
    "--suite",
    type=click.Choice(sorted(_SUITES)),
    default=None,
    help="HPKE suite. Default: the hybrid post-quantum mlkem768-x25519.",
)
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
def keygen(name: Path, suite: str | None, force: bool) -> None:
    """Make a viewing (or escrow) key pair: NAME.key (private, 0600) and NAME.pub.

    Edge boxes are configured with NAME.pub only; they seal every segment to it and can never
    open what they recorded. Keep NAME.key on the hub (viewing) or offline (escrow).
    """
    key = generate_private_key(_SUITES[suite] if suite else DEFAULT_SUITE)
    priv, pub = name.with_suffix(".key"), name.with_suffix(".pub")
    try:
        write_private_key(key, priv, overwrite=force)
        write_public_key(key.public_key(), pub, overwrite=force)
    except (FileExistsError, KeyFileError) as exc:
        raise click.ClickException(f"{exc} (use --force to overwrite)") from None
    click.echo(f"private key {priv} (0600) — key id {key.key_id}")
    click.echo(f"public key  {pub} — give this file to edge boxes")


@main.command()
@click.argument("segment", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Private key file (viewing or escrow).",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Where to write the MP4 (0600). '-' writes to stdout.",
)
@click.option(
    "--require-finished",
    is_flag=True,
    help="Fail on a segment cut short by a crash instead of opening what is there.",
)
def unseal(segment: Path, key_path: Path, output: Path, require_finished: bool) -> None:
    """Open a sealed segment into a playable fragmented MP4, verifying every chunk.

    Any tampering (an edited byte, reordered, dropped or foreign chunks, an edited header)
    fails with the reason and writes nothing.
    """
    try:
        if str(output) == "-":
            opened = unseal_to(
                segment, key_path, sys.stdout.buffer, require_finished=require_finished
            )
        else:
            opened = unseal_to(segment, key_path, output, require_finished=require_finished)
    except (SealedSegmentError, OSError) as exc:
        raise click.ClickException(f"{segment}: {exc}") from None
    h = opened.header
    state = "finished" if opened.finished else "UNFINISHED (cut short, e.g. by a crash)"
    click.echo(f"{segment}: site {h.site_id} camera {h.camera_id} seq {h.seq}: {state}", err=True)


def _attach_groups() -> None:
    from central_hub.export_cli import export
    from central_hub.sites_cli import sites_group
    from central_hub.users_cli import audit, users

    main.add_command(users)
    main.add_command(audit)
    main.add_command(sites_group)
    main.add_command(export)


def load_hub_config(path: Path) -> tuple[Any, Any]:
    """(HubConfig, AuthConfig) from one TOML file; every problem of both in one message."""
    import tomllib

    from central_hub.accounts import AuthConfig
    from central_hub.hub_config import HubConfigError, parse_config

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise click.ClickException(f"{path}: not valid TOML: {exc}") from None
    auth_table = data.pop("auth", {})
    problems: list[str] = []
    hub_config = auth_config = None
    try:
        hub_config = parse_config(data, base_dir=path.resolve().parent, source=str(path))
    except HubConfigError as exc:
        problems += exc.problems
    try:
        if not isinstance(auth_table, dict):
            raise ValueError("auth: expected a table [auth]")
        auth_config = AuthConfig.from_mapping(auth_table)
    except ValueError as exc:
        problems += [line.strip(" -") for line in str(exc).splitlines() if line.strip()]
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise click.ClickException(f"{path}: {len(problems)} problem(s):\n{lines}")
    return hub_config, auth_config


@main.command()
@click.option(
    "--config",
    "-c",
    type=click.Path(path_type=Path),
    default=Path("/etc/isocam/hub.toml"),
    show_default=True,
)
def serve(config: Path) -> None:
    """Run one hub instance: MQTT ingest, outage ledger and tickets, the NOC board and API,
    accounts, viewing tunnels. Stops cleanly on SIGTERM or Ctrl-C."""
    import asyncio
    import logging
    import signal

    from central_hub.app import serve as run_hub

    hub_config, auth_config = load_hub_config(config)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s central-hub %(levelname)s %(name)s: %(message)s"
    )
    if auth_config.public_url is None and hub_config.web.public_url:
        import dataclasses

        auth_config = dataclasses.replace(auth_config, public_url=hub_config.web.public_url)

    async def main_loop() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_hub(hub_config, auth_config, stop=stop)

    asyncio.run(main_loop())


_attach_groups()
