"""`central-hub export`: verify footage export bundles offline, and make the hub's signing key.

Attach with ``main.add_command(export)`` in :mod:`central_hub.cli`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import click

from central_hub.export import generate_signing_key, verify_bundle
from sitelink.signing import SigningKeyError, load_public_key_pem


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def export() -> None:
    """Footage export bundles: check one offline; make the hub's bundle signing key."""


def _when(value: object) -> str:
    if not isinstance(value, int | float):
        return "?"
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@export.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--key",
    "key_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The hub's signing public key (PEM, the .pub file). Without it the key inside the "
    "bundle is used: that proves the bundle is intact, not who made it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def verify(bundle: Path, key_path: Path | None, as_json: bool) -> None:
    """Check BUNDLE offline: the signature over every byte, the manifest's signature, and
    each footage file against the manifest. Exit status 0 only if everything holds; any
    modified byte fails."""
    key = None
    if key_path is not None:
        try:
            key = load_public_key_pem(key_path.read_bytes())
        except (OSError, SigningKeyError) as exc:
            raise click.ClickException(f"{key_path}: {exc}") from None
    report = verify_bundle(bundle, key)
    m = report.manifest or {}
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": report.ok,
                    "problems": report.problems,
                    "key_id": report.key_id,
                    "key_given": report.key_given,
                    "export_id": m.get("export_id"),
                    "site": (m.get("site") or {}).get("site_id"),
                    "camera": m.get("camera"),
                    "files": m.get("files"),
                },
                ensure_ascii=False,
            )
        )
    elif report.ok:
        click.echo(f"OK: {bundle} is intact and signed by key {report.key_id}")
        if not report.key_given:
            click.echo(
                "  (checked with the key inside the bundle: compare this key id with the "
                "hub's published one, or pass --key)"
            )
        basis = m.get("legal_basis") or {}
        click.echo(f"  export {m.get('export_id')}: site {m['site']['site_id']}, "
                   f"camera {m.get('camera')}")  # fmt: skip
        click.echo(f"  range {_when(m['range']['start'])} – {_when(m['range']['end'])}")
        click.echo(f"  legal basis: {basis.get('document_number')} — {basis.get('authority')}")
        req, appr = m["requested"], m["approved"]
        click.echo(f"  requested by {req['email']} at {_when(req['at'])}; "
                   f"approved by {appr['email']} at {_when(appr['at'])}")  # fmt: skip
        for f in m.get("files", []):
            click.echo(f"  {f['name']}: {f['bytes']} bytes, sha256 {f['sha256']}")
    else:
        click.echo(f"FAILED: {bundle}", err=True)
        for problem in report.problems:
            click.echo(f"  - {problem}", err=True)
    if not report.ok:
        raise SystemExit(1)


@export.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite an existing key.")
def keygen(path: Path, force: bool) -> None:
    """Make the hub's Ed25519 bundle signing key: PATH (private, 0600) and PATH.pub (give it
    to whoever must verify bundles)."""
    try:
        key = generate_signing_key(path, overwrite=force)
    except FileExistsError:
        raise click.ClickException(f"{path} exists (use --force to overwrite)") from None
    except OSError as exc:
        raise click.ClickException(f"{path}: {exc.strerror}") from None
    from sitelink.signing import key_id

    click.echo(f"signing key {path} (0600), public key {path}.pub — key id {key_id(key)}")
