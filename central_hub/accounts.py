"""Accounts, grants, the registration workflow, login, second factor and sessions.

Every access must be traceable to a named official, so an account exists only through the
official form: the applicant (or an administrator on their behalf) submits it, one account
administrator *proposes* it, a different one *approves* it — each only within its own scope —
and approval creates the account with a one-time activation link. Rejected requests are kept.

Passwords are Argon2id (argon2-cffi); roles that see footage need TOTP (pyotp) with replay
protection; repeated failures lock the account for a while and failures per source address are
rate limited; sessions live in the database as hashes of random tokens with idle and absolute
expiry, and are revoked at once when the user is disabled. Disabling a user, revoking a grant
or disabling a site is announced through :class:`RevocationHooks`, so the viewing layer can end
open live and playback sessions immediately.

All methods block (database, Argon2): async callers run them in a worker thread.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import pyotp
import sqlalchemy as sa
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy.engine import Connection

from central_hub.audit import AuditLog
from central_hub.db import Database, metadata, migration
from central_hub.policy import (
    REGISTRABLE_ROLES,
    ROLE_ACTIONS,
    ROLE_TEXT,
    ROLES,
    TOTP_ROLES,
    Grant,
    PolicyError,
    Principal,
    Role,
    Scope,
    ScopeKind,
    can,
    covering_grant,
)
from central_hub.sites import SiteAttrs, get_site, sites

log = logging.getLogger(__name__)

# --- tables -----------------------------------------------------------------------------------


# The attributes of a scope besides its kind (policy.Scope), stored one column each.
_SCOPE_FIELDS = ("operator", "province", "district", "authority", "site_kind", "site_id")
# The text fields of the official form, stored as they are in `registrations`.
_FORM_TEXT_FIELDS = ("full_name", "title", "unit", "phone", "email", "role", "purpose")
# What a stored request records about its way through the workflow (Registration).
_DECISION_FIELDS = (
    "proposed_by",
    "proposed_at",
    "decided_by",
    "decided_at",
    "decision_note",
    "user_id",
)


def _scope_columns(prefix: str = "") -> list[sa.Column[Any]]:
    return [
        sa.Column(f"{prefix}scope_kind", sa.String(24), nullable=False),
        sa.Column(f"{prefix}operator", sa.String(16), nullable=True),
        sa.Column(f"{prefix}province", sa.String(128), nullable=True),
        sa.Column(f"{prefix}district", sa.String(128), nullable=True),
        sa.Column(f"{prefix}authority", sa.String(16), nullable=True),
        sa.Column(f"{prefix}site_kind", sa.String(16), nullable=True),
        sa.Column(f"{prefix}site_id", sa.String(64), nullable=True),
    ]


users = sa.Table(
    "users",
    metadata,
    sa.Column("user_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("email", sa.String(254), nullable=False, unique=True),
    sa.Column("full_name", sa.Text, nullable=False),
    sa.Column("title", sa.Text, nullable=False, server_default=""),
    sa.Column("unit", sa.Text, nullable=False, server_default=""),
    sa.Column("phone", sa.String(32), nullable=False, server_default=""),
    sa.Column("password_hash", sa.Text, nullable=True),
    sa.Column("totp_secret", sa.String(64), nullable=True),
    sa.Column("totp_pending", sa.String(64), nullable=True),
    sa.Column("totp_last_step", sa.BigInteger, nullable=True),
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("disabled_reason", sa.Text, nullable=True),
    sa.Column("failed_logins", sa.Integer, nullable=False, server_default="0"),
    sa.Column("locked_until", sa.Float, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("created_by", sa.Text, nullable=False, server_default=""),
    sa.Column("activated_at", sa.Float, nullable=True),
    sa.Column("last_login_at", sa.Float, nullable=True),
    sa.Column("registration_id", sa.Integer, nullable=True),
)

grants = sa.Table(
    "grants",
    metadata,
    sa.Column("grant_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.user_id"), nullable=False),
    sa.Column("role", sa.String(32), nullable=False),
    *_scope_columns(),
    sa.Column("expires_at", sa.Float, nullable=True),
    sa.Column("granted_at", sa.Float, nullable=False),
    sa.Column("granted_by", sa.Text, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
    sa.Column("revoked_by", sa.Text, nullable=True),
    sa.Index("ix_grants_user", "user_id"),
)

registrations = sa.Table(
    "registrations",
    metadata,
    sa.Column("request_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("full_name", sa.Text, nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("unit", sa.Text, nullable=False),
    sa.Column("phone", sa.String(32), nullable=False),
    sa.Column("email", sa.String(254), nullable=False),
    sa.Column("role", sa.String(32), nullable=False),
    *_scope_columns(),
    sa.Column("purpose", sa.Text, nullable=False, server_default=""),
    sa.Column("submitted_at", sa.Float, nullable=False),
    sa.Column("source", sa.Text, nullable=True),
    sa.Column("proposed_by", sa.Integer, nullable=True),
    sa.Column("proposed_at", sa.Float, nullable=True),
    sa.Column("decided_by", sa.Integer, nullable=True),
    sa.Column("decided_at", sa.Float, nullable=True),
    sa.Column("decision_note", sa.Text, nullable=True),
    sa.Column("user_id", sa.Integer, nullable=True),
    sa.Index("ix_registrations_state", "state"),
)

activation_tokens = sa.Table(
    "activation_tokens",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.user_id"), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("used_at", sa.Float, nullable=True),
)

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.user_id"), nullable=False),
    sa.Column("stage", sa.String(8), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_seen_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
    sa.Column("revoked_reason", sa.String(32), nullable=True),
    sa.Column("source", sa.Text, nullable=True),
    sa.Column("user_agent", sa.Text, nullable=True),
    sa.Index("ix_sessions_user", "user_id"),
)

auth_attempts = sa.Table(
    "auth_attempts",
    metadata,
    sa.Column("attempt_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("source", sa.String(256), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Index("ix_auth_attempts_source", "kind", "source", "at"),
    sa.Index("ix_auth_attempts_at", "at"),
)


@migration("accounts", 1, "users, grants, registrations, activation tokens, sessions")
def _v1(conn: Connection) -> None:
    metadata.create_all(
        conn, tables=[users, grants, registrations, activation_tokens, sessions, auth_attempts]
    )


# --- configuration ----------------------------------------------------------------------------


class ConfigError(ValueError):
    """The ``[auth]`` settings are invalid; the message lists every problem, one per line."""


@dataclass(frozen=True)
class AuthConfig:
    """Settings of accounts and the web login (the hub config's ``[auth]`` table)."""

    email_domains: tuple[str, ...] = (".gov.vn",)
    lockout_threshold: int = 5
    lockout_seconds: float = 900.0
    rate_limit_attempts: int = 20
    rate_limit_window_seconds: float = 300.0
    register_rate_limit: int = 5
    register_rate_window_seconds: float = 3600.0
    session_idle_seconds: float = 1800.0
    session_absolute_seconds: float = 43200.0
    activation_ttl_seconds: float = 259200.0
    password_min_length: int = 12
    totp_issuer: str = "isocam"
    extra_totp_roles: tuple[str, ...] = ()
    cookie_secure: bool | None = None
    secret: bytes | None = None
    audit_head_interval_seconds: float = 300.0
    trust_forwarded_for: bool = False
    public_url: str | None = None
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65536
    argon2_parallelism: int = 4

    def __post_init__(self) -> None:
        problems: list[str] = []
        for entry in self.email_domains:
            if not re.fullmatch(r"\.?[a-z0-9-]+(\.[a-z0-9-]+)+", entry):
                problems.append(f"auth.email_domains: {entry!r} is not a domain like .gov.vn")
        if not self.email_domains:
            problems.append("auth.email_domains: give at least one domain, e.g. .gov.vn")
        positive = (
            "lockout_threshold",
            "lockout_seconds",
            "rate_limit_attempts",
            "rate_limit_window_seconds",
            "register_rate_limit",
            "register_rate_window_seconds",
            "session_idle_seconds",
            "session_absolute_seconds",
            "activation_ttl_seconds",
            "audit_head_interval_seconds",
            "argon2_time_cost",
            "argon2_parallelism",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                problems.append(f"auth.{name}: must be greater than 0")
        if self.session_idle_seconds > self.session_absolute_seconds:
            problems.append("auth.session_idle_seconds: must not exceed session_absolute_seconds")
        if self.password_min_length < 10:
            problems.append("auth.password_min_length: must be at least 10")
        if self.argon2_memory_kib < 19456:
            problems.append("auth.argon2_memory_kib: at least 19456 (OWASP minimum for Argon2id)")
        for role in self.extra_totp_roles:
            if role not in ROLES:
                problems.append(f"auth.extra_totp_roles: unknown role {role!r}")
        if self.public_url is not None and not re.fullmatch(
            r"https?://[A-Za-z0-9.\[\]:-]+(/[^\s?#]*)?", self.public_url
        ):
            problems.append("auth.public_url: an http(s) URL expected, e.g. https://hub.example")
        if self.secret is not None and len(self.secret) < 32:
            problems.append("auth.secret: at least 32 bytes")
        if problems:
            raise ConfigError("\n".join(problems))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> AuthConfig:
        """Build from a parsed TOML table; unknown keys and wrong types are errors (all of
        them reported at once). ``secret`` is given as hex text."""
        known = {f.name: f for f in fields(cls)}
        problems: list[str] = []
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                problems.append(f"auth.{key}: unknown setting")
                continue
            default = known[key].default
            problem = None
            if key == "secret":
                try:
                    value = bytes.fromhex(str(value))
                except ValueError:
                    problem = "hex text expected"
            elif key in ("email_domains", "extra_totp_roles"):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    problem = "a list of strings expected"
                else:
                    value = tuple(v.lower() for v in value)
            elif key == "cookie_secure" or isinstance(default, bool):
                if not isinstance(value, bool):
                    problem = "true or false expected"
            elif key == "public_url" or isinstance(default, str):
                if not isinstance(value, str):
                    problem = "text expected"
            elif isinstance(default, int):
                if not isinstance(value, int) or isinstance(value, bool):
                    problem = "an integer expected"
            elif isinstance(default, float):
                if not isinstance(value, int | float) or isinstance(value, bool):
                    problem = "a number expected"
                else:
                    value = float(value)
            if problem:
                problems.append(f"auth.{key}: {problem}")
            else:
                values[key] = value
        try:
            config = cls(**values)
        except ConfigError as exc:
            problems.extend(str(exc).splitlines())
        if problems:
            raise ConfigError("\n".join(problems))
        return config


# --- errors and records -----------------------------------------------------------------------


class AccountError(Exception):
    """A request the workflow refuses; `code` names the reason (pages translate it)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class FormInvalid(AccountError):
    """Some fields of a submitted form are invalid: `errors` maps field → reason code."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("form_invalid", "invalid fields: " + ", ".join(sorted(errors)))
        self.errors = errors


@dataclass(frozen=True)
class RegistrationForm:
    """The official account request, as submitted."""

    full_name: str
    title: str
    unit: str
    phone: str
    email: str
    role: str
    scope: Scope
    purpose: str = ""


@dataclass(frozen=True)
class Registration:
    """A stored request and where it stands in the workflow."""

    request_id: int
    state: Literal["submitted", "proposed", "approved", "rejected"]
    form: RegistrationForm
    submitted_at: float
    proposed_by: int | None
    proposed_at: float | None
    decided_by: int | None
    decided_at: float | None
    decision_note: str | None
    user_id: int | None


@dataclass(frozen=True)
class UserRecord:
    """A user row and its active grants (for lists and the CLI)."""

    user_id: int
    email: str
    full_name: str
    title: str
    unit: str
    phone: str
    disabled: bool
    activated: bool
    totp_enrolled: bool
    locked_until: float | None
    last_login_at: float | None
    grants: tuple[Grant, ...]


@dataclass(frozen=True)
class Activation:
    """What approval hands out: the new account and its one-time activation token (shown or
    sent once, stored only hashed)."""

    user_id: int
    token: str
    expires_at: float


SessionStage = Literal["full", "mfa", "enrol"]


@dataclass(frozen=True)
class SessionInfo:
    """A live server-side session. Stage ``mfa`` waits for the TOTP code, ``enrol`` for TOTP
    enrolment; only ``full`` carries a principal."""

    token_hash: str
    user_id: int
    stage: SessionStage
    created_at: float
    expires_at: float


@dataclass(frozen=True)
class LoginOutcome:
    """Result of the password step: `stage` is where the new session starts."""

    ok: bool
    user_id: int | None = None
    stage: SessionStage | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Revocation:
    """Something that access hangs on went away: end what depends on it at once."""

    kind: Literal["user_disabled", "grant_revoked", "session_revoked", "site_disabled"]
    user_id: int | None = None
    site_id: str | None = None
    session_hash: str | None = None


class RevocationHooks:
    """Callbacks told about revocations right after they commit (from whatever thread made the
    change; an asyncio consumer should hop to its loop with ``call_soon_threadsafe`` — see
    :func:`central_hub.web_auth.subscribe_revocations`). A failing callback is logged and
    never blocks the revocation."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[Revocation], None]] = []
        self._lock = threading.Lock()

    def subscribe(self, callback: Callable[[Revocation], None]) -> Callable[[], None]:
        """Register `callback`; returns a function that unregisters it."""
        with self._lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    def fire(self, event: Revocation) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for cb in callbacks:
            try:
                cb(event)
            except Exception:
                log.exception("revocation callback %r failed for %s", cb, event.kind)


# --- input validation -------------------------------------------------------------------------

_EMAIL_RE = re.compile(r"^[a-z0-9._%+-]{1,64}@([a-z0-9-]{1,63}\.)+[a-z]{2,63}$")
_PHONE_RE = re.compile(r"^\+?[0-9 ().-]{8,20}$")


def clean_text(value: str, *, limit: int, required: bool = True) -> str:
    """NFC-normalised text without control characters, or ValueError."""
    value = unicodedata.normalize("NFC", value).strip()
    if required and not value:
        raise ValueError("required")
    if len(value) > limit:
        raise ValueError("too_long")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co") for ch in value):
        raise ValueError("control_chars")
    return value


def normalise_email(value: str) -> str:
    """Lower-cased e-mail address or ValueError (plain ASCII addresses only)."""
    value = value.strip().lower()
    if len(value) > 254 or not _EMAIL_RE.match(value):
        raise ValueError("email_invalid")
    return value


def email_domain_allowed(email: str, allowed: tuple[str, ...]) -> bool:
    """``.gov.vn`` admits any subdomain of gov.vn (and gov.vn); ``bocongan.gov.vn`` only itself."""
    domain = email.rsplit("@", 1)[1]
    for entry in allowed:
        if entry.startswith("."):
            if domain == entry[1:] or domain.endswith(entry):
                return True
        elif domain == entry:
            return True
    return False


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _scope_values(scope: Scope) -> dict[str, Any]:
    return {"scope_kind": scope.kind, **{name: getattr(scope, name) for name in _SCOPE_FIELDS}}


def _scope_from(m: Mapping[Any, Any]) -> Scope:
    kind: ScopeKind = m["scope_kind"]
    return Scope(kind, **{name: m[name] for name in _SCOPE_FIELDS})


def _form_values(form: RegistrationForm) -> dict[str, Any]:
    return {name: getattr(form, name) for name in _FORM_TEXT_FIELDS} | _scope_values(form.scope)


def _form_from(m: Mapping[Any, Any]) -> RegistrationForm:
    return RegistrationForm(scope=_scope_from(m), **{name: m[name] for name in _FORM_TEXT_FIELDS})


def _grant_from(m: Mapping[Any, Any]) -> Grant:
    return Grant(
        role=m["role"],
        scope=_scope_from(m),
        expires_at=m["expires_at"],
        grant_id=int(m["grant_id"]),
    )


def _active_grants_where(now: float) -> sa.ColumnElement[bool]:
    return sa.and_(
        grants.c.revoked_at.is_(None),
        sa.or_(grants.c.expires_at.is_(None), grants.c.expires_at > now),
    )


# --- the store --------------------------------------------------------------------------------


@dataclass
class _Actor:
    """Who performs a change, for the records: a principal (web) or a named operator (CLI)."""

    principal: Principal | None = None
    name: str | None = None
    source: str | None = None

    @property
    def label(self) -> str:
        if self.principal is not None:
            return self.principal.email
        return self.name or f"cli:{getpass.getuser()}"


def cli_actor(source: str = "cli") -> _Actor:
    """The operator at the hub's console (``central-hub users …``)."""
    return _Actor(name=f"cli:{getpass.getuser()}", source=source)


def web_actor(principal: Principal, source: str | None) -> _Actor:
    return _Actor(principal=principal, source=source)


@dataclass
class AccountStore:
    """Accounts, grants, registrations, sessions; every change writes its audit row in the
    same transaction."""

    db: Database
    audit: AuditLog
    config: AuthConfig = field(default_factory=AuthConfig)
    clock: Callable[[], float] = time.time
    hooks: RevocationHooks = field(default_factory=RevocationHooks)

    def __post_init__(self) -> None:
        c = self.config
        self._hasher = PasswordHasher(
            time_cost=c.argon2_time_cost,
            memory_cost=c.argon2_memory_kib,
            parallelism=c.argon2_parallelism,
            type=Type.ID,
        )
        self._dummy_hash: str | None = None
        self._totp_roles: frozenset[str] = TOTP_ROLES | frozenset(c.extra_totp_roles)

    # --- helpers ----------------------------------------------------------------------------

    def _audit(self, conn: Connection, action: str, actor: _Actor, **kw: Any) -> None:
        self.audit.append(
            conn,
            action,
            user=actor.principal,
            actor=None if actor.principal else actor.label,
            source=actor.source,
            **kw,
        )

    def _site(self, conn: Connection, scope: Scope) -> SiteAttrs | None:
        return get_site(conn, scope.site_id) if scope.site_id else None

    def _require_admin_over(
        self, conn: Connection, actor: _Actor, scope: Scope, role: str | None = None
    ) -> None:
        """A web administrator may act only on scopes inside its own ``manage_accounts``
        grants, and never hand out superadmin. The CLI (console of the hub) may."""
        if actor.principal is None:
            return
        if role == "superadmin":
            raise AccountError("out_of_scope", "superadmin is granted only with the CLI")
        now = self.clock()
        if (
            covering_grant(actor.principal, "manage_accounts", scope, now, self._site(conn, scope))
            is None
        ):
            raise AccountError("out_of_scope", f"{scope} is outside your account scope")

    def _hash_password(self, password: str) -> str:
        return self._hasher.hash(password)

    def check_password_policy(self, password: str, email: str) -> None:
        """Raise FormInvalid({'password': reason}) for a password not worth hashing."""
        if len(password) < self.config.password_min_length:
            raise FormInvalid({"password": "password_short"})
        if len(password) > 256:
            raise FormInvalid({"password": "too_long"})
        local = email.split("@", 1)[0]
        if password.lower() in (email, local) or len(set(password)) < 5:
            raise FormInvalid({"password": "password_weak"})

    # --- users and grants -------------------------------------------------------------------

    def _user_row(self, conn: Connection, user_id: int) -> sa.Row[Any] | None:
        return conn.execute(sa.select(users).where(users.c.user_id == user_id)).first()

    def _grants_of(self, conn: Connection, user_id: int, now: float) -> tuple[Grant, ...]:
        rows = conn.execute(
            sa.select(grants)
            .where(grants.c.user_id == user_id, _active_grants_where(now))
            .order_by(grants.c.grant_id)
        )
        return tuple(_grant_from(r._mapping) for r in rows)

    def _record(self, conn: Connection, row: sa.Row[Any], now: float) -> UserRecord:
        m = row._mapping
        return UserRecord(
            user_id=int(m["user_id"]),
            email=m["email"],
            full_name=m["full_name"],
            title=m["title"],
            unit=m["unit"],
            phone=m["phone"],
            disabled=bool(m["disabled"]),
            activated=m["password_hash"] is not None,
            totp_enrolled=m["totp_secret"] is not None,
            locked_until=m["locked_until"],
            last_login_at=m["last_login_at"],
            grants=self._grants_of(conn, int(m["user_id"]), now),
        )

    def get_user(self, user_id: int) -> UserRecord | None:
        with self.db.engine.connect() as conn:
            row = self._user_row(conn, user_id)
            return None if row is None else self._record(conn, row, self.clock())

    def find_user(self, email: str) -> UserRecord | None:
        try:
            email = normalise_email(email)
        except ValueError:
            return None
        with self.db.engine.connect() as conn:
            row = conn.execute(sa.select(users).where(users.c.email == email)).first()
            return None if row is None else self._record(conn, row, self.clock())

    def list_users(self) -> list[UserRecord]:
        now = self.clock()
        with self.db.engine.connect() as conn:
            rows = conn.execute(sa.select(users).order_by(users.c.email)).all()
            return [self._record(conn, r, now) for r in rows]

    def users_visible_to(self, admin: Principal) -> list[UserRecord]:
        """Users with at least one active grant inside the administrator's scopes."""
        now = self.clock()
        visible: list[UserRecord] = []
        with self.db.engine.connect() as conn:
            for rec in self.list_users():
                if any(
                    covering_grant(
                        admin, "manage_accounts", g.scope, now, self._site(conn, g.scope)
                    )
                    for g in rec.grants
                ):
                    visible.append(rec)
        return visible

    def load_principal(self, user_id: int, now: float | None = None) -> Principal | None:
        """The principal of an enabled, activated user with its active grants, or None. The
        viewing layer calls this again to re-check open sessions."""
        now = self.clock() if now is None else now
        with self.db.engine.connect() as conn:
            row = self._user_row(conn, user_id)
            if row is None or row.disabled or row.password_hash is None:
                return None
            return Principal(
                user_id=int(row.user_id),
                email=row.email,
                full_name=row.full_name,
                grants=self._grants_of(conn, user_id, now),
            )

    def _insert_user(
        self,
        conn: Connection,
        *,
        email: str,
        full_name: str,
        title: str = "",
        unit: str = "",
        phone: str = "",
        created_by: str,
        password_hash: str | None = None,
        registration_id: int | None = None,
    ) -> int:
        if conn.execute(sa.select(users.c.user_id).where(users.c.email == email)).first():
            raise AccountError("email_taken", f"an account for {email} already exists")
        now = self.clock()
        result = conn.execute(
            users.insert().values(
                email=email,
                full_name=full_name,
                title=title,
                unit=unit,
                phone=phone,
                password_hash=password_hash,
                created_at=now,
                created_by=created_by,
                activated_at=now if password_hash else None,
                registration_id=registration_id,
            )
        )
        assert result.inserted_primary_key is not None
        return int(result.inserted_primary_key[0])

    def _insert_grant(
        self,
        conn: Connection,
        actor: _Actor,
        user_id: int,
        role: str,
        scope: Scope,
        expires_at: float | None,
    ) -> int:
        if role not in ROLE_ACTIONS:
            raise AccountError("role_invalid", f"unknown role {role!r}")
        result = conn.execute(
            grants.insert().values(
                user_id=user_id,
                role=role,
                **_scope_values(scope),
                expires_at=expires_at,
                granted_at=self.clock(),
                granted_by=actor.label,
            )
        )
        assert result.inserted_primary_key is not None
        grant_id = int(result.inserted_primary_key[0])
        self._audit(
            conn,
            "grant_added",
            actor,
            detail={
                "grant_id": grant_id,
                "user_id": user_id,
                "role": role,
                "scope": str(scope),
                "expires_at": expires_at,
            },
            site=scope.site_id,
        )
        return grant_id

    def create_superadmin(
        self, email: str, full_name: str, password: str, actor: _Actor | None = None
    ) -> int:
        """Bootstrap an account with a nation-wide superadmin grant (CLI only). It enrols TOTP
        at its first login."""
        actor = actor or cli_actor()
        try:
            email = normalise_email(email)
            full_name = clean_text(full_name, limit=200)
        except ValueError as exc:
            raise AccountError(str(exc), f"invalid input: {exc}") from None
        return self._create_activated(
            actor, email, full_name, password, "superadmin", Scope.nation(), None
        )

    def create_user(
        self,
        email: str,
        full_name: str,
        password: str,
        role: str,
        scope: Scope,
        actor: _Actor | None = None,
        *,
        title: str = "",
        unit: str = "",
        phone: str = "",
        expires_at: float | None = None,
    ) -> int:
        """Create an activated account with one grant directly, bypassing the two-person
        workflow: for the hub's console (CLI) and for test fixtures, never the web."""
        actor = actor or cli_actor()
        if actor.principal is not None:
            raise AccountError("out_of_scope", "web accounts are created by registration only")
        email = normalise_email(email)
        return self._create_activated(
            actor,
            email,
            full_name,
            password,
            role,
            scope,
            expires_at,
            title=title,
            unit=unit,
            phone=phone,
        )

    def _create_activated(
        self,
        actor: _Actor,
        email: str,
        full_name: str,
        password: str,
        role: str,
        scope: Scope,
        expires_at: float | None,
        *,
        title: str = "",
        unit: str = "",
        phone: str = "",
    ) -> int:
        """An account with a password set and one grant (the console's way, no workflow)."""
        self.check_password_policy(password, email)
        pw_hash = self._hash_password(password)
        with self.db.engine.begin() as conn:
            user_id = self._insert_user(
                conn,
                email=email,
                full_name=clean_text(full_name, limit=200),
                created_by=actor.label,
                title=title,
                unit=unit,
                phone=phone,
                password_hash=pw_hash,
            )
            self._audit(conn, "user_created", actor, detail={"user_id": user_id, "email": email})
            self._insert_grant(conn, actor, user_id, role, scope, expires_at)
        return user_id

    def add_grant(
        self,
        user_id: int,
        role: str,
        scope: Scope,
        actor: _Actor,
        expires_at: float | None = None,
    ) -> int:
        """Give `user_id` one more (role, scope); an administrator only within its scope."""
        with self.db.engine.begin() as conn:
            if self._user_row(conn, user_id) is None:
                raise AccountError("no_such_user", f"no user {user_id}")
            self._require_admin_over(conn, actor, scope, role)
            return self._insert_grant(conn, actor, user_id, role, scope, expires_at)

    def revoke_grant(self, grant_id: int, actor: _Actor) -> None:
        """End a grant now (the row stays for the record) and tell the viewing layer."""
        with self.db.engine.begin() as conn:
            row = conn.execute(sa.select(grants).where(grants.c.grant_id == grant_id)).first()
            if row is None or row.revoked_at is not None:
                raise AccountError("no_such_grant", f"no active grant {grant_id}")
            grant = _grant_from(row._mapping)
            self._require_admin_over(conn, actor, grant.scope, grant.role)
            conn.execute(
                grants.update()
                .where(grants.c.grant_id == grant_id)
                .values(revoked_at=self.clock(), revoked_by=actor.label)
            )
            self._audit(
                conn,
                "grant_revoked",
                actor,
                detail={
                    "grant_id": grant_id,
                    "user_id": int(row.user_id),
                    "role": grant.role,
                    "scope": str(grant.scope),
                },
            )
        self.hooks.fire(Revocation("grant_revoked", user_id=int(row.user_id)))

    def _require_admin_over_user(self, conn: Connection, actor: _Actor, user_id: int) -> None:
        """An administrator may act on a user only if every active grant of that user lies
        inside its own scope (a provincial admin cannot disable a nation-wide account)."""
        if actor.principal is None:
            return
        if actor.principal.user_id == user_id:
            raise AccountError("self", "you cannot do this to your own account")
        for g in self._grants_of(conn, user_id, self.clock()):
            self._require_admin_over(conn, actor, g.scope, g.role)

    def set_user_disabled(
        self, user_id: int, disabled: bool, actor: _Actor, reason: str = ""
    ) -> None:
        """Disable (or re-enable) an account. Disabling revokes its sessions in the same
        transaction and then tells the viewing layer to end open viewing."""
        reason = clean_text(reason, limit=500, required=False)
        with self.db.engine.begin() as conn:
            row = self._user_row(conn, user_id)
            if row is None:
                raise AccountError("no_such_user", f"no user {user_id}")
            self._require_admin_over_user(conn, actor, user_id)
            conn.execute(
                users.update()
                .where(users.c.user_id == user_id)
                .values(disabled=disabled, disabled_reason=reason if disabled else None)
            )
            if disabled:
                self._revoke_sessions(conn, user_id, "user_disabled")
            self._audit(
                conn,
                "user_disabled" if disabled else "user_enabled",
                actor,
                reason=reason or None,
                detail={"user_id": user_id, "email": row.email},
            )
        if disabled:
            self.hooks.fire(Revocation("user_disabled", user_id=user_id))

    def unlock_user(self, user_id: int, actor: _Actor) -> None:
        with self.db.engine.begin() as conn:
            self._require_admin_over_user(conn, actor, user_id)
            conn.execute(
                users.update()
                .where(users.c.user_id == user_id)
                .values(failed_logins=0, locked_until=None)
            )
            self._audit(conn, "user_unlocked", actor, detail={"user_id": user_id})

    def reset_totp(self, user_id: int, actor: _Actor) -> None:
        """Forget the user's second factor (lost phone): it enrols again at its next login.
        Its sessions end."""
        with self.db.engine.begin() as conn:
            self._require_admin_over_user(conn, actor, user_id)
            conn.execute(
                users.update()
                .where(users.c.user_id == user_id)
                .values(totp_secret=None, totp_pending=None, totp_last_step=None)
            )
            self._revoke_sessions(conn, user_id, "totp_reset")
            self._audit(conn, "totp_reset", actor, detail={"user_id": user_id})
        self.hooks.fire(Revocation("session_revoked", user_id=user_id))

    def set_site_enabled(self, site_id: str, enabled: bool, actor: _Actor) -> None:
        """Enable or disable an enrolled site. Disabling refuses its footage to everyone from
        now on (the policy checks ``enabled``) and tells the viewing layer to end open viewing
        of it."""
        with self.db.engine.begin() as conn:
            site = get_site(conn, site_id)
            if site is None:
                raise AccountError("no_such_site", f"no site {site_id}")
            if actor.principal is not None and not can(
                actor.principal, "manage_sites", site, self.clock()
            ):
                raise AccountError("out_of_scope", f"site {site_id} is outside your scope")
            conn.execute(sites.update().where(sites.c.site_id == site_id).values(enabled=enabled))
            self._audit(conn, "site_enabled" if enabled else "site_disabled", actor, site=site_id)
        if not enabled:
            self.hooks.fire(Revocation("site_disabled", site_id=site_id))

    # --- registration -----------------------------------------------------------------------

    def validate_form(self, raw: Mapping[str, str]) -> RegistrationForm:
        """Check the official form's fields (web or CLI input); FormInvalid lists every bad
        field."""
        errors: dict[str, str] = {}
        values: dict[str, str] = {}
        limits = {"full_name": 200, "title": 200, "unit": 200}
        for name, limit in limits.items():
            try:
                values[name] = clean_text(raw.get(name, ""), limit=limit)
            except ValueError as exc:
                errors[name] = str(exc)
        try:
            values["purpose"] = clean_text(raw.get("purpose", ""), limit=1000, required=False)
        except ValueError as exc:
            errors["purpose"] = str(exc)
        phone = raw.get("phone", "").strip()
        if not _PHONE_RE.match(phone):
            errors["phone"] = "phone_invalid"
        try:
            email = normalise_email(raw.get("email", ""))
            if not email_domain_allowed(email, self.config.email_domains):
                errors["email"] = "email_domain"
        except ValueError as exc:
            errors["email"] = str(exc)
            email = ""
        role = raw.get("role", "")
        if role not in REGISTRABLE_ROLES:
            errors["role"] = "role_invalid"
        scope: Scope | None = None
        try:
            scope = scope_from_form(raw)
        except PolicyError:
            errors["scope"] = "scope_invalid"
        if errors or scope is None:
            raise FormInvalid(errors)
        return RegistrationForm(phone=phone, email=email, role=role, scope=scope, **values)

    def submit_registration(self, form: RegistrationForm, source: str | None) -> int:
        """Store a request (state ``submitted``). Refused when the address already has an
        account or an open request."""
        now = self.clock()
        with self.db.engine.begin() as conn:
            if conn.execute(sa.select(users.c.user_id).where(users.c.email == form.email)).first():
                raise AccountError("email_taken", "an account with this e-mail exists")
            open_request = conn.execute(
                sa.select(registrations.c.request_id).where(
                    registrations.c.email == form.email,
                    registrations.c.state.in_(("submitted", "proposed")),
                )
            ).first()
            if open_request:
                raise AccountError("pending_exists", "a request for this e-mail is pending")
            result = conn.execute(
                registrations.insert().values(
                    state="submitted", **_form_values(form), submitted_at=now, source=source
                )
            )
            assert result.inserted_primary_key is not None
            request_id = int(result.inserted_primary_key[0])
            self.audit.append(
                conn,
                "registration_submitted",
                actor=form.email,
                source=source,
                detail={"request_id": request_id, "role": form.role, "scope": str(form.scope)},
            )
        return request_id

    @staticmethod
    def _registration(m: Mapping[Any, Any]) -> Registration:
        return Registration(
            request_id=int(m["request_id"]),
            state=m["state"],
            form=_form_from(m),
            submitted_at=m["submitted_at"],
            **{name: m[name] for name in _DECISION_FIELDS},
        )

    def get_registration(self, request_id: int) -> Registration | None:
        with self.db.engine.connect() as conn:
            row = conn.execute(
                sa.select(registrations).where(registrations.c.request_id == request_id)
            ).first()
        return None if row is None else self._registration(row._mapping)

    def registrations_visible_to(
        self, admin: Principal, states: tuple[str, ...] = ("submitted", "proposed")
    ) -> list[Registration]:
        """Requests whose asked-for scope lies inside the administrator's scopes."""
        now = self.clock()
        out: list[Registration] = []
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                sa.select(registrations)
                .where(registrations.c.state.in_(states))
                .order_by(registrations.c.request_id)
            ).all()
            for row in rows:
                reg = self._registration(row._mapping)
                site = self._site(conn, reg.form.scope)
                if covering_grant(admin, "manage_accounts", reg.form.scope, now, site):
                    out.append(reg)
        return out

    def _load_for_decision(
        self, conn: Connection, request_id: int, actor: _Actor, states: tuple[str, ...]
    ) -> Registration:
        row = conn.execute(
            sa.select(registrations).where(registrations.c.request_id == request_id)
        ).first()
        if row is None:
            raise AccountError("no_such_request", f"no request {request_id}")
        reg = self._registration(row._mapping)
        self._require_admin_over(conn, actor, reg.form.scope, reg.form.role)
        if reg.state not in states:
            raise AccountError("bad_state", f"request {request_id} is {reg.state}")
        return reg

    @staticmethod
    def _claim(conn: Connection, request_id: int, states: tuple[str, ...], **values: Any) -> None:
        """Move a request on only if it is still in `states`: of two administrators deciding
        at once, the second finds it already decided (the row lock orders them)."""
        moved = conn.execute(
            registrations.update()
            .where(registrations.c.request_id == request_id, registrations.c.state.in_(states))
            .values(**values)
        )
        if moved.rowcount != 1:
            raise AccountError("bad_state", f"request {request_id} was decided meanwhile")

    def propose(self, request_id: int, actor: _Actor) -> None:
        """First administrator: vouches for a submitted request."""
        if actor.principal is None:
            raise AccountError("admin_required", "a request is proposed by an account admin")
        with self.db.engine.begin() as conn:
            self._load_for_decision(conn, request_id, actor, ("submitted",))
            self._claim(
                conn,
                request_id,
                ("submitted",),
                state="proposed",
                proposed_by=actor.principal.user_id,
                proposed_at=self.clock(),
            )
            self._audit(conn, "registration_proposed", actor, detail={"request_id": request_id})

    def approve(self, request_id: int, actor: _Actor) -> Activation:
        """Second administrator (never the proposer): creates the account, its grant and a
        one-time activation token."""
        if actor.principal is None:
            raise AccountError("admin_required", "a request is approved by an account admin")
        now = self.clock()
        with self.db.engine.begin() as conn:
            reg = self._load_for_decision(conn, request_id, actor, ("proposed",))
            if reg.proposed_by == actor.principal.user_id:
                raise AccountError("same_admin", "the proposer cannot also approve")
            self._claim(
                conn,
                request_id,
                ("proposed",),
                state="approved",
                decided_by=actor.principal.user_id,
                decided_at=now,
            )
            f = reg.form
            user_id = self._insert_user(
                conn,
                email=f.email,
                full_name=f.full_name,
                title=f.title,
                unit=f.unit,
                phone=f.phone,
                created_by=actor.label,
                registration_id=request_id,
            )
            self._audit(conn, "user_created", actor, detail={"user_id": user_id, "email": f.email})
            self._insert_grant(conn, actor, user_id, f.role, f.scope, None)
            activation = self._insert_activation(conn, user_id, now)
            conn.execute(
                registrations.update()
                .where(registrations.c.request_id == request_id)
                .values(user_id=user_id)
            )
            self._audit(
                conn,
                "registration_approved",
                actor,
                detail={
                    "request_id": request_id,
                    "user_id": user_id,
                    "proposed_by": reg.proposed_by,
                },
            )
        return activation

    def reject(self, request_id: int, actor: _Actor, note: str) -> None:
        """Refuse a request; the record stays with the reason."""
        if actor.principal is None:
            raise AccountError("admin_required", "a request is rejected by an account admin")
        try:
            note = clean_text(note, limit=1000)
        except ValueError:
            raise FormInvalid({"note": "required"}) from None
        with self.db.engine.begin() as conn:
            self._load_for_decision(conn, request_id, actor, ("submitted", "proposed"))
            self._claim(
                conn,
                request_id,
                ("submitted", "proposed"),
                state="rejected",
                decided_by=actor.principal.user_id,
                decided_at=self.clock(),
                decision_note=note,
            )
            self._audit(
                conn,
                "registration_rejected",
                actor,
                reason=note,
                detail={"request_id": request_id},
            )

    def reissue_activation(self, user_id: int, actor: _Actor) -> Activation:
        """A new activation token for an account not yet activated (the first one expired);
        earlier tokens stop working."""
        now = self.clock()
        with self.db.engine.begin() as conn:
            row = self._user_row(conn, user_id)
            if row is None or row.password_hash is not None:
                raise AccountError("bad_state", "only an account not yet activated")
            self._require_admin_over_user(conn, actor, user_id)
            conn.execute(
                activation_tokens.update()
                .where(
                    activation_tokens.c.user_id == user_id, activation_tokens.c.used_at.is_(None)
                )
                .values(used_at=now)
            )
            activation = self._insert_activation(conn, user_id, now)
            self._audit(conn, "activation_reissued", actor, detail={"user_id": user_id})
        return activation

    def _insert_activation(self, conn: Connection, user_id: int, now: float) -> Activation:
        """A fresh one-time activation token for `user_id` (stored hashed, valid for
        ``activation_ttl_seconds``)."""
        token = secrets.token_urlsafe(32)
        expires_at = now + self.config.activation_ttl_seconds
        conn.execute(
            activation_tokens.insert().values(
                token_hash=_hash_token(token),
                user_id=user_id,
                created_at=now,
                expires_at=expires_at,
            )
        )
        return Activation(user_id, token, expires_at)

    # --- activation -------------------------------------------------------------------------

    def activation_user(self, token: str) -> UserRecord | None:
        """The account a still-valid activation token belongs to (None when unknown, used,
        expired, or the account is disabled or already active)."""
        if not token or len(token) > 200:
            return None
        with self.db.engine.connect() as conn:
            row = conn.execute(
                sa.select(activation_tokens).where(
                    activation_tokens.c.token_hash == _hash_token(token)
                )
            ).first()
            if row is None or row.used_at is not None or row.expires_at <= self.clock():
                return None
            user = self._user_row(conn, int(row.user_id))
            if user is None or user.disabled or user.password_hash is not None:
                return None
            return self._record(conn, user, self.clock())

    def activate(self, token: str, password: str, source: str | None) -> int:
        """Set the first password with a valid token (used once); returns the user id."""
        user = self.activation_user(token)
        if user is None:
            raise AccountError("token_invalid", "this activation link is invalid or expired")
        self.check_password_policy(password, user.email)
        pw_hash = self._hash_password(password)
        now = self.clock()
        with self.db.engine.begin() as conn:
            used = conn.execute(
                activation_tokens.update()
                .where(
                    activation_tokens.c.token_hash == _hash_token(token),
                    activation_tokens.c.used_at.is_(None),
                )
                .values(used_at=now)
            )
            if used.rowcount != 1:  # a concurrent activation won
                raise AccountError("token_invalid", "this activation link was already used")
            conn.execute(
                users.update()
                .where(users.c.user_id == user.user_id, users.c.password_hash.is_(None))
                .values(password_hash=pw_hash, activated_at=now)
            )
            self.audit.append(
                conn, "account_activated", user=user.user_id, actor=user.email, source=source
            )
        return user.user_id

    # --- login ------------------------------------------------------------------------------

    def totp_required(self, user_id: int) -> bool:
        """TOTP is needed when any active grant's role sees footage (or is configured to need
        it), and always once the user has enrolled."""
        with self.db.engine.connect() as conn:
            row = self._user_row(conn, user_id)
            if row is None:
                return True
            if row.totp_secret is not None:
                return True
            roles = {g.role for g in self._grants_of(conn, user_id, self.clock())}
        return bool(roles & self._totp_roles)

    def rate_limited(self, kind: Literal["login", "register"], source: str) -> bool:
        """Too many failed logins (or any registrations) from this source address lately?"""
        c = self.config
        limit, window = (
            (c.rate_limit_attempts, c.rate_limit_window_seconds)
            if kind == "login"
            else (c.register_rate_limit, c.register_rate_window_seconds)
        )
        since = self.clock() - window
        query = sa.select(sa.func.count()).where(
            auth_attempts.c.kind == kind,
            auth_attempts.c.source == source[:256],
            auth_attempts.c.at > since,
        )
        if kind == "login":
            query = query.where(auth_attempts.c.ok == sa.false())
        with self.db.engine.connect() as conn:
            return int(conn.execute(query).scalar_one()) >= limit

    def note_attempt(self, kind: Literal["login", "register"], source: str, ok: bool) -> None:
        now = self.clock()
        horizon = 2 * max(
            self.config.rate_limit_window_seconds, self.config.register_rate_window_seconds
        )
        with self.db.engine.begin() as conn:
            conn.execute(
                auth_attempts.insert().values(kind=kind, source=source[:256], at=now, ok=ok)
            )
            conn.execute(auth_attempts.delete().where(auth_attempts.c.at < now - horizon))

    def _verify_password(self, pw_hash: str | None, password: str) -> bool:
        if pw_hash is None:
            # Same work as a real check, so response time does not tell which accounts exist.
            if self._dummy_hash is None:
                self._dummy_hash = self._hasher.hash(secrets.token_hex(16))
            pw_hash = self._dummy_hash
            password = password + "\x00not-this"
        try:
            return self._hasher.verify(pw_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def _fail(self, conn: Connection, user_id: int) -> bool:
        """Count a failure against the account; returns True when it is now locked."""
        row = self._user_row(conn, user_id)
        assert row is not None
        failures = int(row.failed_logins) + 1
        if failures >= self.config.lockout_threshold:
            conn.execute(
                users.update()
                .where(users.c.user_id == user_id)
                .values(failed_logins=0, locked_until=self.clock() + self.config.lockout_seconds)
            )
            return True
        conn.execute(
            users.update().where(users.c.user_id == user_id).values(failed_logins=failures)
        )
        return False

    def authenticate(self, email: str, password: str, source: str) -> LoginOutcome:
        """The password step. Success starts a session in stage ``full``, or ``mfa`` / ``enrol``
        when a second factor is (to be) required. Every failure is audited with its reason;
        the caller shows one generic message whatever the reason."""
        if self.rate_limited("login", source):
            self.audit.record(
                "login_failed",
                actor=email[:254],
                source=source,
                allowed=False,
                reason="rate_limited",
            )
            return LoginOutcome(False, reason="rate_limited")
        try:
            email = normalise_email(email)
        except ValueError:
            email = email.strip().lower()[:254]
        with self.db.engine.connect() as conn:
            row = conn.execute(sa.select(users).where(users.c.email == email)).first()
        now = self.clock()
        pw_ok = self._verify_password(None if row is None else row.password_hash, password)
        reason: str | None = None
        if row is None:
            reason = "unknown_user"
        elif row.password_hash is None:
            reason = "not_activated"
        elif row.disabled:
            reason = "disabled"
        elif row.locked_until is not None and now < row.locked_until:
            reason = "locked"
        elif not pw_ok:
            reason = "bad_password"
        if reason is not None:
            self.note_attempt("login", source, ok=False)
            with self.db.engine.begin() as conn:
                locked = False
                if row is not None and reason == "bad_password":
                    locked = self._fail(conn, int(row.user_id))
                user_id = None if row is None else int(row.user_id)
                self._audit_login_failed(conn, user_id, email, source, reason, locked=locked)
            return LoginOutcome(False, reason=reason)
        assert row is not None
        user_id = int(row.user_id)
        if self._hasher.check_needs_rehash(row.password_hash):
            with self.db.engine.begin() as conn:
                conn.execute(
                    users.update()
                    .where(users.c.user_id == user_id)
                    .values(password_hash=self._hash_password(password))
                )
        if self.totp_required(user_id):
            stage: SessionStage = "mfa" if row.totp_secret is not None else "enrol"
            return LoginOutcome(True, user_id=user_id, stage=stage)
        self.login_succeeded(user_id, source, mfa=False)
        return LoginOutcome(True, user_id=user_id, stage="full")

    def _audit_login_failed(
        self,
        conn: Connection,
        user_id: int | None,
        email: str,
        source: str | None,
        reason: str,
        *,
        locked: bool,
    ) -> None:
        """Record a failed login step and, when this failure `locked` the account, the lock."""
        self.audit.append(
            conn,
            "login_failed",
            user=user_id,
            actor=email,
            source=source,
            allowed=False,
            reason=reason,
        )
        if locked:
            self.audit.append(
                conn,
                "account_locked",
                user=user_id,
                actor=email,
                source=source,
                reason=f"{self.config.lockout_threshold} failed attempts",
            )

    def login_succeeded(self, user_id: int, source: str | None, *, mfa: bool) -> None:
        """Reset the failure count and record the login (called when the last factor passed)."""
        with self.db.engine.begin() as conn:
            row = self._user_row(conn, user_id)
            assert row is not None
            conn.execute(
                users.update()
                .where(users.c.user_id == user_id)
                .values(failed_logins=0, locked_until=None, last_login_at=self.clock())
            )
            self.audit.append(
                conn,
                "login_ok",
                user=user_id,
                actor=row.email,
                source=source,
                allowed=True,
                detail={"mfa": mfa},
            )
        self.note_attempt("login", source or "", ok=True)

    # --- TOTP -------------------------------------------------------------------------------

    def totp_begin_enrolment(self, user_id: int) -> tuple[str, str]:
        """(secret, otpauth URI) for the enrolment page. The same pending secret is shown until
        it is confirmed; an already enrolled user cannot enrol over it (a reset is needed)."""
        with self.db.engine.begin() as conn:
            row = self._user_row(conn, user_id)
            if row is None or row.totp_secret is not None:
                raise AccountError("bad_state", "TOTP is already set up for this account")
            secret = row.totp_pending
            if secret is None:
                secret = pyotp.random_base32()
                conn.execute(
                    users.update().where(users.c.user_id == user_id).values(totp_pending=secret)
                )
            uri = pyotp.TOTP(secret).provisioning_uri(
                name=row.email, issuer_name=self.config.totp_issuer
            )
        return secret, uri

    def _match_totp(self, secret: str, code: str, last_step: int | None) -> int | None:
        """The time step the code belongs to (±1 step of clock skew), if it is fresh."""
        code = code.strip().replace(" ", "")
        if not re.fullmatch(r"[0-9]{6}", code):
            return None
        totp = pyotp.TOTP(secret)
        now_step = int(self.clock() // totp.interval)
        for step in (now_step - 1, now_step, now_step + 1):
            if last_step is not None and step <= last_step:
                continue  # a code is good once: replays are refused
            if hmac.compare_digest(totp.at(step * totp.interval), code):
                return step
        return None

    def totp_confirm_enrolment(self, user_id: int, code: str, source: str | None) -> bool:
        with self.db.engine.begin() as conn:
            row = self._user_row(conn, user_id)
            if row is None or row.totp_pending is None or row.totp_secret is not None:
                return False
            step = self._match_totp(row.totp_pending, code, None)
            if step is None:
                locked = self._fail(conn, user_id)
                self.audit.append(
                    conn,
                    "totp_enrol_failed",
                    user=user_id,
                    actor=row.email,
                    source=source,
                    allowed=False,
                    reason="account locked" if locked else None,
                )
                return False
            conn.execute(
                users.update()
                .where(users.c.user_id == user_id)
                .values(totp_secret=row.totp_pending, totp_pending=None, totp_last_step=step)
            )
            self.audit.append(conn, "totp_enrolled", user=user_id, actor=row.email, source=source)
        return True

    def totp_verify(self, user_id: int, code: str, source: str | None) -> bool:
        """The second step of a login; failures count towards the lockout."""
        with self.db.engine.begin() as conn:
            row = self._user_row(conn, user_id)
            if row is None or row.totp_secret is None or row.disabled:
                return False
            now = self.clock()
            locked_now = row.locked_until is not None and now < row.locked_until
            step = (
                None if locked_now else self._match_totp(row.totp_secret, code, row.totp_last_step)
            )
            if step is None:
                locked = locked_now or self._fail(conn, user_id)
                self._audit_login_failed(
                    conn,
                    user_id,
                    row.email,
                    source,
                    "locked" if locked_now else "bad_totp",
                    locked=locked and not locked_now,
                )
                return False
            conn.execute(
                users.update().where(users.c.user_id == user_id).values(totp_last_step=step)
            )
        return True

    # --- sessions ---------------------------------------------------------------------------

    def create_session(
        self, user_id: int, stage: SessionStage, source: str | None, user_agent: str | None
    ) -> str:
        """A new session; returns the raw token for the cookie (only its hash is stored).
        Sessions waiting for a second factor live ten minutes at most."""
        now = self.clock()
        token = secrets.token_urlsafe(32)
        lifetime = self.config.session_absolute_seconds if stage == "full" else 600.0
        with self.db.engine.begin() as conn:
            conn.execute(
                sessions.insert().values(
                    token_hash=_hash_token(token),
                    user_id=user_id,
                    stage=stage,
                    created_at=now,
                    last_seen_at=now,
                    expires_at=now + lifetime,
                    source=(source or "")[:256],
                    user_agent=(user_agent or "")[:300],
                )
            )
        return token

    def session(self, token: str) -> SessionInfo | None:
        """The live session for a cookie value, or None (unknown, revoked, expired, idle too
        long, or its user disabled). Touches the idle timer at most once a minute."""
        if not token or len(token) > 200:
            return None
        token_hash = _hash_token(token)
        now = self.clock()
        with self.db.engine.connect() as conn:
            row = conn.execute(
                sa.select(sessions, users.c.disabled)
                .join(users, users.c.user_id == sessions.c.user_id)
                .where(sessions.c.token_hash == token_hash)
            ).first()
        if row is None or row.revoked_at is not None:
            return None
        idle = now - row.last_seen_at > self.config.session_idle_seconds
        if row.disabled or now >= row.expires_at or idle:
            self._revoke(token_hash, "idle" if idle else "expired")
            return None
        if now - row.last_seen_at > 60:
            with self.db.engine.begin() as conn:
                conn.execute(
                    sessions.update()
                    .where(sessions.c.token_hash == token_hash)
                    .values(last_seen_at=now)
                )
        return SessionInfo(
            token_hash=token_hash,
            user_id=int(row.user_id),
            stage=row.stage,
            created_at=row.created_at,
            expires_at=row.expires_at,
        )

    def _revoke(self, token_hash: str, reason: str) -> int:
        with self.db.engine.begin() as conn:
            return conn.execute(
                sessions.update()
                .where(sessions.c.token_hash == token_hash, sessions.c.revoked_at.is_(None))
                .values(revoked_at=self.clock(), revoked_reason=reason)
            ).rowcount

    def _revoke_sessions(self, conn: Connection, user_id: int, reason: str) -> None:
        conn.execute(
            sessions.update()
            .where(sessions.c.user_id == user_id, sessions.c.revoked_at.is_(None))
            .values(revoked_at=self.clock(), revoked_reason=reason)
        )

    def end_session(self, token: str, reason: str = "logout") -> None:
        """Revoke one session (logout, or a stage finished) and tell the viewing layer."""
        token_hash = _hash_token(token)
        with self.db.engine.connect() as conn:
            row = conn.execute(
                sa.select(sessions.c.user_id).where(sessions.c.token_hash == token_hash)
            ).first()
        if self._revoke(token_hash, reason) and row is not None:
            self.hooks.fire(
                Revocation("session_revoked", user_id=int(row.user_id), session_hash=token_hash)
            )

    def revoke_user_sessions(self, user_id: int, reason: str) -> None:
        with self.db.engine.begin() as conn:
            self._revoke_sessions(conn, user_id, reason)
        self.hooks.fire(Revocation("session_revoked", user_id=user_id))


def scope_from_form(raw: Mapping[str, str]) -> Scope:
    """Build a scope from form fields (``scope_kind`` plus the fields it names)."""
    kind = raw.get("scope_kind", "")

    def val(name: str) -> str | None:
        v = raw.get(name)
        return unicodedata.normalize("NFC", v.strip()) if v and v.strip() else None

    needed = {
        "nation": (),
        "operator": ("operator",),
        "province": ("province",),
        "province_district": ("province", "district"),
        "province_authority": ("province", "authority"),
        "province_kind": ("province", "site_kind"),
        "site": ("site_id",),
    }.get(kind)
    if needed is None:
        raise PolicyError(f"unknown scope kind {kind!r}")
    return Scope(kind, **{name: val(name) for name in needed})  # type: ignore[arg-type]


def role_text(role: Role | str, lang: str) -> str:
    """A role's name for pages."""
    if role not in ROLE_TEXT:
        return str(role)
    texts = ROLE_TEXT[role]
    return str(texts[1] if lang == "en" else texts[0])
