"""`central-hub users …` and `central-hub audit …`: the hub console's account and audit tools.

Attach to the main group with ``main.add_command(users)`` and ``main.add_command(audit)``.
Both take the database URL from ``--db`` or ``ISOCAM_HUB_DB`` and apply pending migrations.
Every change made here is written to the audit log as ``cli:<os user>``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import click

from central_hub.accounts import (
    AccountError,
    AccountStore,
    AuthConfig,
    FormInvalid,
    UserRecord,
    cli_actor,
)
from central_hub.audit import AuditLog, parse_anchors
from central_hub.db import Database, DatabaseError
from central_hub.policy import ROLES, PolicyError, Scope

_db_option = click.option(
    "--db",
    "db_url",
    envvar="ISOCAM_HUB_DB",
    required=True,
    help="Hub database URL (sqlite:///PATH or postgresql://…); env ISOCAM_HUB_DB.",
)


def _open(db_url: str) -> Database:
    try:
        db = Database.connect(db_url)
        db.migrate()
    except DatabaseError as exc:
        raise click.ClickException(str(exc)) from None
    return db


@contextmanager
def _accounts(db_url: str) -> Iterator[AccountStore]:
    """The account store on a migrated database, closed afterwards; a refusal (AccountError)
    ends the command with its reason."""
    db = _open(db_url)
    try:
        yield AccountStore(db, AuditLog(db), AuthConfig())
    except AccountError as exc:
        raise _fail(exc) from None
    finally:
        db.close()


@contextmanager
def _audit_log(db_url: str) -> Iterator[AuditLog]:
    db = _open(db_url)
    try:
        yield AuditLog(db)
    finally:
        db.close()


def _user(store: AccountStore, email: str) -> UserRecord:
    rec = store.find_user(email)
    if rec is None:
        raise click.ClickException(f"no account {email!r}")
    return rec


def _when(text: str) -> float:
    """ISO 8601 date or date-time; UTC unless it names an offset."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an ISO 8601 date or time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _fail(exc: Exception) -> click.ClickException:
    if isinstance(exc, FormInvalid):
        return click.ClickException(
            "; ".join(f"{field}: {code}" for field, code in exc.errors.items())
        )
    return click.ClickException(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def users() -> None:
    """Accounts: bootstrap the first superadmin, list, disable, grant.

    Ordinary accounts are made through the registration workflow in the web UI (proposed by
    one account administrator, approved by another); this console is for bootstrapping and
    emergencies."""


@users.command("create-superadmin")
@_db_option
@click.option("--email", required=True, help="Official e-mail; the login name.")
@click.option("--name", "full_name", required=True, help="Full name, as on the ID card.")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from standard input (one line)."
)
def create_superadmin(db_url: str, email: str, full_name: str, password_stdin: bool) -> None:
    """Create a nation-wide superadmin. TOTP is enrolled at its first login."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    with _accounts(db_url) as store:
        user_id = store.create_superadmin(email, full_name, password, cli_actor())
    click.echo(f"superadmin {email} created (user {user_id}); set up TOTP at the first login")


@users.command("list")
@_db_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_users(db_url: str, as_json: bool) -> None:
    """Every account with its active grants."""
    with _accounts(db_url) as store:
        records = store.list_users()
    for rec in records:
        grants = [
            {
                "grant_id": g.grant_id,
                "role": g.role,
                "scope": str(g.scope),
                "expires_at": g.expires_at,
            }
            for g in rec.grants
        ]
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "user_id": rec.user_id,
                        "email": rec.email,
                        "full_name": rec.full_name,
                        "unit": rec.unit,
                        "disabled": rec.disabled,
                        "activated": rec.activated,
                        "totp": rec.totp_enrolled,
                        "grants": grants,
                    },
                    ensure_ascii=False,
                )
            )
            continue
        state = "disabled" if rec.disabled else ("active" if rec.activated else "not activated")
        roles = ", ".join(f"#{g['grant_id']} {g['role']}@{g['scope']}" for g in grants) or "-"
        click.echo(f"{rec.user_id:>5}  {rec.email:<40} {state:<14} {roles}")


def _change(db_url: str, email: str, what: str, reason: str = "") -> None:
    with _accounts(db_url) as store:
        rec = _user(store, email)
        actor = cli_actor()
        if what == "disable":
            store.set_user_disabled(rec.user_id, True, actor, reason)
        elif what == "enable":
            store.set_user_disabled(rec.user_id, False, actor, reason)
        elif what == "unlock":
            store.unlock_user(rec.user_id, actor)
        elif what == "reset-totp":
            store.reset_totp(rec.user_id, actor)
    click.echo(f"{email}: {what} done")


@users.command("disable")
@_db_option
@click.argument("email")
@click.option("--reason", default="", help="Why (kept in the audit log).")
def disable(db_url: str, email: str, reason: str) -> None:
    """Disable an account: its sessions end at once."""
    _change(db_url, email, "disable", reason)


@users.command("enable")
@_db_option
@click.argument("email")
def enable(db_url: str, email: str) -> None:
    """Enable a disabled account again."""
    _change(db_url, email, "enable")


@users.command("unlock")
@_db_option
@click.argument("email")
def unlock(db_url: str, email: str) -> None:
    """Lift a lockout after failed logins."""
    _change(db_url, email, "unlock")


@users.command("reset-totp")
@_db_option
@click.argument("email")
def reset_totp(db_url: str, email: str) -> None:
    """Forget an account's second factor (lost phone); it enrols again at the next login."""
    _change(db_url, email, "reset-totp")


@users.command("grant")
@_db_option
@click.argument("email")
@click.option("--role", required=True, type=click.Choice(ROLES))
@click.option(
    "--scope",
    "scope_text",
    required=True,
    help="nation | operator=vnpt | province=P | province=P,district=D | "
    "province=P,authority=A | province=P,kind=K | site=ID",
)
@click.option("--expires", default=None, help="ISO 8601 date/time the grant ends (UTC).")
def grant(db_url: str, email: str, role: str, scope_text: str, expires: str | None) -> None:
    """Give an account one more (role, scope)."""
    try:
        scope = Scope.parse(scope_text)
    except PolicyError as exc:
        raise click.BadParameter(str(exc), param_hint="--scope") from None
    with _accounts(db_url) as store:
        rec = _user(store, email)
        grant_id = store.add_grant(
            rec.user_id, role, scope, cli_actor(), None if expires is None else _when(expires)
        )
    click.echo(f"grant {grant_id}: {email} is {role} over {scope}")


@users.command("reissue-activation")
@_db_option
@click.argument("email")
@click.option("--base-url", required=True, help="The hub's public address, e.g. https://hub.vn")
def reissue_activation(db_url: str, email: str, base_url: str) -> None:
    """A new one-time activation link for an approved account whose link expired."""
    with _accounts(db_url) as store:
        activation = store.reissue_activation(_user(store, email).user_id, cli_actor())
    expires = datetime.fromtimestamp(activation.expires_at, UTC).isoformat(timespec="minutes")
    click.echo(f"{base_url.rstrip('/')}/activate?token={activation.token}")
    click.echo(f"valid until {expires}; send it to {email} through an official channel", err=True)


@users.command("revoke-grant")
@_db_option
@click.argument("grant_id", type=int)
def revoke_grant(db_url: str, grant_id: int) -> None:
    """End a grant now (open viewing that relied on it ends)."""
    with _accounts(db_url) as store:
        store.revoke_grant(grant_id, cli_actor())
    click.echo(f"grant {grant_id} revoked")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def audit() -> None:
    """The hash-chained audit log: verify it, export it, print its head."""


@audit.command("verify")
@_db_option
@click.option(
    "--anchors",
    "anchor_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Log file(s) holding 'audit chain head seq=… hash=…' lines written by the hub; "
    "detects a chain rewritten or cut short inside the database.",
)
def verify(db_url: str, anchor_files: tuple[Path, ...]) -> None:
    """Check every row's hash and link; exit 1 naming the first broken row."""
    anchors: list[tuple[int, str]] = []
    for path in anchor_files:
        with path.open(encoding="utf-8", errors="replace") as f:
            anchors.extend(parse_anchors(f))
    with _audit_log(db_url) as log:
        result = log.verify(anchors)
    if result.ok:
        click.echo(
            f"audit log OK: {result.rows} rows, head seq={result.head_seq} "
            f"hash={result.head_hash}, {len(anchors)} external anchors checked"
        )
        return
    click.echo(
        f"audit log BROKEN at row {result.first_bad_seq}: {result.problem} "
        f"({result.rows} rows verified before it)"
    )
    sys.exit(1)


@audit.command("export")
@_db_option
@click.option("--since", default=None, help="ISO 8601 date/time (UTC unless it has an offset).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File to write (default: standard output).",
)
def export(db_url: str, since: str | None, fmt: str, output: Path | None) -> None:
    """Write rows from a time on as JSON lines (re-verifiable) or CSV (for spreadsheets)."""
    since_ts = None if since is None else _when(since)
    with _audit_log(db_url) as log:
        if output is None:
            count = log.export(sys.stdout, since_ts, fmt)  # type: ignore[arg-type]
        else:
            with output.open("w", encoding="utf-8", newline="") as f:
                count = log.export(f, since_ts, fmt)  # type: ignore[arg-type]
    click.echo(f"{count} rows exported", err=True)


@audit.command("head")
@_db_option
def head(db_url: str) -> None:
    """Print the chain head (keep it somewhere the database's admins cannot write)."""
    with _audit_log(db_url) as log:
        seq, digest = log.head()
    click.echo(f"audit chain head seq={seq} hash={digest}")
