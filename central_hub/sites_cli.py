"""`central-hub sites …`: enrol, list, disable and enable sites.

A site must be enrolled before the hub accepts a single message from it (ingest rejects
`unknown_site`), and its attributes here — not what the box says about itself — decide who may
see it. A running hub picks up a change within `ingest.sites_refresh_seconds`.

The functions (`enroll_site`, `set_site_enabled`, `list_sites_rows`) are what the admin web
pages call too; the click commands only wrap them.
"""

from __future__ import annotations

import csv
import json
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import click
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from central_hub import status as _status  # noqa: F401  (registers the status tables)
from central_hub.db import Database, DatabaseError
from central_hub.hub_config import DEFAULT_CONFIG_PATH
from central_hub.sites import AUTHORITIES, OPERATORS, SITE_KINDS, sites
from sitelink.signing import SigningKeyError, load_public_key_pem, public_key_pem
from sitelink.topics import TopicError, check_site_id

_TEXT_RE: Final = re.compile(r"[^\x00-\x1f\x7f]{1,200}")


class SiteError(ValueError):
    """A site cannot be enrolled or changed as asked; the message says why."""


def _text(label: str, value: str | None, *, required: bool) -> str | None:
    if value is None or value == "":
        if required:
            raise SiteError(f"{label} is required")
        return None
    value = value.strip()
    if not _TEXT_RE.fullmatch(value):
        raise SiteError(f"{label} must be 1-200 characters without control characters")
    return value


def _choice(label: str, value: str, choices: Iterable[str]) -> str:
    allowed = tuple(choices)
    if value not in allowed:
        raise SiteError(f"{label} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def enroll_site(
    conn: Connection,
    *,
    site_id: str,
    province: str,
    district: str | None,
    kind: str,
    authority: str,
    operator: str,
    name: str = "",
    now: float | None = None,
    device_public_key: str | None = None,
) -> None:
    """Add a site (enabled). Raises SiteError on a bad value or an id already enrolled.

    `device_public_key` is the edge box's Ed25519 key (PEM, as `edge-agent device-key`
    prints it); without it the hub cannot check the box's chain heads or tunnel logins."""
    try:
        check_site_id(site_id)
    except TopicError as exc:
        raise SiteError(str(exc)) from None
    row = {
        "site_id": site_id,
        "name": _text("name", name, required=False) or "",
        "province": _text("province", province, required=True),
        "district": _text("district", district, required=False),
        "kind": _choice("kind", kind, SITE_KINDS),
        "authority": _choice("authority", authority, AUTHORITIES),
        "operator": _choice("operator", operator, OPERATORS),
        "enabled": True,
        "enrolled_at": time.time() if now is None else now,
        "device_public_key": _device_key(device_public_key),
    }
    exists = conn.execute(sa.select(sites.c.site_id).where(sites.c.site_id == site_id)).first()
    if exists is not None:
        raise SiteError(f"site {site_id} is already enrolled")
    conn.execute(sites.insert().values(**row))


def _device_key(pem: str | None) -> str | None:
    """The PEM of an Ed25519 public key, normalised; SiteError if it is anything else."""
    if pem is None:
        return None
    if len(pem) > 4096:
        raise SiteError("device key: expected one PEM public key (a few hundred bytes)")
    try:
        key = load_public_key_pem(pem.strip() + "\n")
    except SigningKeyError as exc:
        raise SiteError(f"device key: {exc}") from None
    return public_key_pem(key)


def set_site_enabled(conn: Connection, site_id: str, enabled: bool) -> bool:
    """Enable or disable a site; False when nothing changed. Raises SiteError if unknown.

    A disabled site's messages are rejected (`disabled_site`) and it leaves the board and the
    statistics; its history stays."""
    row = conn.execute(sa.select(sites.c.enabled).where(sites.c.site_id == site_id)).first()
    if row is None:
        raise SiteError(f"no site {site_id!r} is enrolled")
    if bool(row.enabled) == enabled:
        return False
    conn.execute(sites.update().where(sites.c.site_id == site_id).values(enabled=enabled))
    return True


def list_sites_rows(
    conn: Connection,
    *,
    province: str | None = None,
    operator: str | None = None,
    include_disabled: bool = True,
) -> list[dict[str, Any]]:
    """Enrolled sites ordered by province, district and id."""
    q = sa.select(sites).order_by(sites.c.province, sites.c.district, sites.c.site_id)
    if province is not None:
        q = q.where(sites.c.province == province)
    if operator is not None:
        q = q.where(sites.c.operator == operator)
    if not include_disabled:
        q = q.where(sites.c.enabled.is_(True))
    return [dict(r._mapping) for r in conn.execute(q)]


# --- CLI ------------------------------------------------------------------------------------


def _open_db(ctx: click.Context) -> Database:
    obj = ctx.find_object(dict) or {}
    url = obj.get("database")
    if url is None:
        # Read the file as `central-hub serve` does (its [auth] table included).
        from central_hub.cli import load_hub_config  # late: the CLI module imports this one

        path = Path(obj.get("config") or DEFAULT_CONFIG_PATH)
        try:
            cfg, _ = load_hub_config(path)
        except click.ClickException as exc:
            raise click.ClickException(
                f"{exc.message}\n(give the database with --database URL or a config with --config)"
            ) from None
        url = cfg.database.effective_url()
    try:
        db = Database.connect(url)
        db.migrate()
    except (DatabaseError, sa.exc.SQLAlchemyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise click.ClickException(f"cannot open the hub database: {first}") from None
    return db


# Added to `central-hub` as ``main.add_command(sites_group)``; the command is `sites`.
@click.group("sites")
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="ISOCAM_HUB_CONFIG",
    help=f"Hub config file (default {DEFAULT_CONFIG_PATH}); its database.url is used.",
)
@click.option(
    "--database",
    "database",
    envvar="ISOCAM_HUB_DATABASE",
    help="Database URL (sqlite:///PATH or postgresql://…), instead of the config's.",
)
@click.pass_context
def sites_group(ctx: click.Context, config: Path | None, database: str | None) -> None:
    """Enrol and manage the sites whose messages this hub accepts."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config
    ctx.obj["database"] = database


@sites_group.command("add")
@click.argument("site_id")
@click.option("--province", required=True, help="Province (tỉnh / thành phố).")
@click.option("--district", default=None, help="District (quận / huyện); leave out if none.")
@click.option("--kind", required=True, type=click.Choice(SITE_KINDS), help="What the site is.")
@click.option(
    "--authority", required=True, type=click.Choice(AUTHORITIES), help="Managing authority."
)
@click.option("--operator", required=True, type=click.Choice(OPERATORS), help="Telecom operator.")
@click.option("--name", default="", help="Name as people call it (Vietnamese is fine).")
@click.option(
    "--device-key",
    "device_key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="File with the box's device public key (PEM), as `edge-agent device-key` prints it.",
)
@click.pass_context
def add_cmd(
    ctx: click.Context,
    site_id: str,
    province: str,
    district: str | None,
    kind: str,
    authority: str,
    operator: str,
    name: str,
    device_key: Path | None,
) -> None:
    """Enrol SITE_ID (the CN of the site's MQTT certificate) with its attributes."""
    pem = None
    if device_key is not None:
        try:
            pem = device_key.read_text(encoding="ascii", errors="replace")[:5000]
        except OSError as exc:
            raise click.ClickException(f"{device_key}: {exc.strerror or exc}") from None
    db = _open_db(ctx)
    try:
        with db.engine.begin() as conn:
            enroll_site(
                conn,
                site_id=site_id,
                province=province,
                district=district,
                kind=kind,
                authority=authority,
                operator=operator,
                name=name,
                device_public_key=pem,
            )
    except SiteError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        db.close()
    click.echo(f"enrolled {site_id} ({province}{', ' + district if district else ''})")


@sites_group.command("import")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_context
def import_cmd(ctx: click.Context, csv_file: Path) -> None:
    """Enrol many sites from a CSV file with a header row: site_id, name, province,
    district, kind, authority, operator. All or nothing: one bad row enrols none."""
    db = _open_db(ctx)
    try:
        with db.engine.begin() as conn, csv_file.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            n = 0
            for lineno, rec in enumerate(reader, start=2):
                try:
                    enroll_site(
                        conn,
                        site_id=(rec.get("site_id") or "").strip(),
                        name=rec.get("name") or "",
                        province=rec.get("province") or "",
                        district=rec.get("district") or None,
                        kind=(rec.get("kind") or "").strip(),
                        authority=(rec.get("authority") or "").strip(),
                        operator=(rec.get("operator") or "").strip(),
                    )
                except SiteError as exc:
                    raise click.ClickException(f"{csv_file}:{lineno}: {exc}") from None
                n += 1
    finally:
        db.close()
    click.echo(f"enrolled {n} sites from {csv_file}")


@sites_group.command("list")
@click.option("--province", default=None, help="Only this province.")
@click.option("--operator", type=click.Choice(OPERATORS), default=None, help="Only this operator.")
@click.option("--enabled-only", is_flag=True, help="Leave out disabled sites.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def list_cmd(
    ctx: click.Context,
    province: str | None,
    operator: str | None,
    enabled_only: bool,
    as_json: bool,
) -> None:
    """List enrolled sites."""
    db = _open_db(ctx)
    try:
        with db.engine.connect() as conn:
            rows = list_sites_rows(
                conn, province=province, operator=operator, include_disabled=not enabled_only
            )
    finally:
        db.close()
    if as_json:
        for r in rows:
            click.echo(json.dumps(r, ensure_ascii=False))
        return
    if not rows:
        click.echo("no sites enrolled", err=True)
        return
    header = ("SITE", "PROVINCE", "DISTRICT", "KIND", "AUTHORITY", "OPERATOR", "STATE", "NAME")
    table = [header] + [
        (
            r["site_id"],
            r["province"],
            r["district"] or "-",
            r["kind"],
            r["authority"],
            r["operator"],
            "enabled" if r["enabled"] else "DISABLED",
            r["name"] or "",
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
    out = sys.stdout
    for row in table:
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        out.write("  ".join([*cells, str(row[-1])]).rstrip() + "\n")


def _set_enabled(ctx: click.Context, site_id: str, enabled: bool) -> None:
    db = _open_db(ctx)
    try:
        with db.engine.begin() as conn:
            changed = set_site_enabled(conn, site_id, enabled)
    except SiteError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        db.close()
    word = "enabled" if enabled else "disabled"
    click.echo(f"{site_id} {word}" if changed else f"{site_id} was already {word}")


@sites_group.command("disable")
@click.argument("site_id")
@click.pass_context
def disable_cmd(ctx: click.Context, site_id: str) -> None:
    """Stop accepting SITE_ID's messages and take it off the board (history is kept)."""
    _set_enabled(ctx, site_id, False)


@sites_group.command("enable")
@click.argument("site_id")
@click.pass_context
def enable_cmd(ctx: click.Context, site_id: str) -> None:
    """Accept SITE_ID's messages again."""
    _set_enabled(ctx, site_id, True)
