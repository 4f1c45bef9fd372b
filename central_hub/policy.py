"""Who may do what on which site: one table-driven, pure decision used by every handler.

The law decides who may watch footage, so the decision lives in one place, in tables a reader
can check against the regulation (and that docs/security.md is generated from):

* :data:`ACTIONS` — every action a handler can ask about, whether it touches footage (footage of
  a disabled site is refused whatever the grant) and whether it is a nation-wide action;
* :data:`ROLE_ACTIONS` — role → the actions it carries;
* :data:`SCOPE_MATCH` / :data:`SCOPE_SQL` — scope kind → which sites it covers, once as a Python
  predicate over :class:`~central_hub.sites.SiteAttrs` and once as a SQL condition over the
  ``sites`` table (lists are filtered in the database, never by fetching everything and asking
  :func:`can` row by row). A test checks both agree on every generated site.

A grant is (user, role, scope, optional expiry). :func:`can` is pure: it takes the principal
(the user and its grants, loaded once per request), the action, the site's attributes and the
time, and returns a boolean. Nothing else in the hub decides access.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, get_args

import sqlalchemy as sa

from central_hub.sites import AUTHORITIES, OPERATORS, SITE_KINDS, SiteAttrs, sites

Role = Literal[
    "viewer",
    "status",
    "noc",
    "account_admin",
    "auditor",
    "export_requester",
    "export_approver",
    "superadmin",
]
Action = Literal[
    "view_live",
    "view_playback",
    "view_snapshot",
    "view_status",
    "view_outages",
    "manage_tickets",
    "export_request",
    "export_approve",
    "manage_accounts",
    "view_audit",
    "manage_sites",
    "admin",
]
ScopeKind = Literal[
    "nation",
    "operator",
    "province",
    "province_district",
    "province_authority",
    "province_kind",
    "site",
]

ROLES: tuple[Role, ...] = get_args(Role)
ACTION_NAMES: tuple[Action, ...] = get_args(Action)
SCOPE_KINDS: tuple[ScopeKind, ...] = get_args(ScopeKind)


class PolicyError(ValueError):
    """A role, action or scope that does not exist or is malformed (a programming or input
    error, never a silent "no")."""


@dataclass(frozen=True)
class ActionInfo:
    """What an action is, for the decision and for the documentation."""

    footage: bool  # touches video or stills: refused on disabled sites, audited when allowed
    nation_only: bool  # only a nation-wide grant carries it (hub configuration)
    vi: str
    en: str


ACTIONS: dict[Action, ActionInfo] = {
    "view_live": ActionInfo(True, False, "Xem trực tiếp", "Watch live video"),
    "view_playback": ActionInfo(True, False, "Xem lại bản ghi", "Play back recordings"),
    "view_snapshot": ActionInfo(True, False, "Xem ảnh chụp camera", "See camera snapshots"),
    "view_status": ActionInfo(False, False, "Xem trạng thái", "See site and camera status"),
    "view_outages": ActionInfo(False, False, "Xem sổ sự cố", "See the outage ledger"),
    "manage_tickets": ActionInfo(False, False, "Xử lý phiếu sự cố", "Handle repair tickets"),
    "export_request": ActionInfo(True, False, "Yêu cầu trích xuất", "Request a footage export"),
    "export_approve": ActionInfo(True, False, "Phê duyệt trích xuất", "Approve a footage export"),
    "manage_accounts": ActionInfo(False, False, "Quản lý tài khoản", "Manage accounts"),
    "view_audit": ActionInfo(False, False, "Xem nhật ký kiểm toán", "Read the audit log"),
    "manage_sites": ActionInfo(False, False, "Quản lý điểm", "Enrol and disable sites"),
    "admin": ActionInfo(False, True, "Cấu hình hệ thống", "Configure the hub"),
}

#: Role → the actions it carries. Viewing video is a separate right from seeing status: the NOC
#: sees health, outages and tickets, never footage (snapshots are footage too).
ROLE_ACTIONS: dict[Role, frozenset[Action]] = {
    "viewer": frozenset({"view_live", "view_playback", "view_snapshot", "view_status"}),
    "status": frozenset({"view_status"}),
    "noc": frozenset({"view_status", "view_outages", "manage_tickets"}),
    "account_admin": frozenset({"manage_accounts"}),
    "auditor": frozenset({"view_audit"}),
    "export_requester": frozenset({"export_request"}),
    "export_approver": frozenset({"export_approve"}),
    "superadmin": frozenset(ACTION_NAMES),
}

ROLE_TEXT: dict[Role, tuple[str, str]] = {
    "viewer": ("Người xem", "Viewer"),
    "status": ("Theo dõi trạng thái", "Status watcher"),
    "noc": ("Trực vận hành (NOC)", "NOC operator"),
    "account_admin": ("Quản trị tài khoản", "Account administrator"),
    "auditor": ("Kiểm toán viên", "Auditor"),
    "export_requester": ("Người yêu cầu trích xuất", "Export requester"),
    "export_approver": ("Người phê duyệt trích xuất", "Export approver"),
    "superadmin": ("Quản trị cao nhất", "Superadmin"),
}

#: Actions on footage; a role carrying any of them needs a second factor to log in.
FOOTAGE_ACTIONS: frozenset[Action] = frozenset(a for a, i in ACTIONS.items() if i.footage)
#: Roles whose holders must log in with TOTP: those that see footage (superadmin included).
TOTP_ROLES: frozenset[Role] = frozenset(
    r for r, acts in ROLE_ACTIONS.items() if acts & FOOTAGE_ACTIONS
)
#: Roles that the registration workflow may grant; superadmin is made only by the CLI.
REGISTRABLE_ROLES: tuple[Role, ...] = tuple(r for r in ROLES if r != "superadmin")

# Which optional fields each scope kind must carry (all others must be empty).
_SCOPE_FIELDS: dict[ScopeKind, frozenset[str]] = {
    "nation": frozenset(),
    "operator": frozenset({"operator"}),
    "province": frozenset({"province"}),
    "province_district": frozenset({"province", "district"}),
    "province_authority": frozenset({"province", "authority"}),
    "province_kind": frozenset({"province", "site_kind"}),
    "site": frozenset({"site_id"}),
}
_ALL_FIELDS = ("operator", "province", "district", "authority", "site_kind", "site_id")
# The text form of a scope names its fields with these keys ("kind" reads better than site_kind).
_TEXT_KEYS = {
    "operator": "operator",
    "province": "province",
    "district": "district",
    "authority": "authority",
    "site_kind": "kind",
    "site_id": "site",
}
_FIELDS_BY_TEXT_KEY = {v: k for k, v in _TEXT_KEYS.items()}


def _check_value(name: str, value: str) -> None:
    if not value or len(value) > 128:
        raise PolicyError(f"scope {name} must be 1–128 characters")
    if any(unicodedata.category(ch).startswith("C") for ch in value):
        raise PolicyError(f"scope {name} must not contain control characters")
    if "," in value or "=" in value or value != value.strip():
        raise PolicyError(f"scope {name} must not contain ',' or '=' or surrounding spaces")


@dataclass(frozen=True)
class Scope:
    """Which sites a grant covers: a kind plus exactly the attributes that kind names."""

    kind: ScopeKind
    operator: str | None = None
    province: str | None = None
    district: str | None = None
    authority: str | None = None
    site_kind: str | None = None
    site_id: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _SCOPE_FIELDS:
            raise PolicyError(f"unknown scope kind {self.kind!r}")
        needed = _SCOPE_FIELDS[self.kind]
        for name in _ALL_FIELDS:
            value = getattr(self, name)
            if name in needed:
                if value is None:
                    raise PolicyError(f"a {self.kind} scope needs {_TEXT_KEYS[name]}")
                _check_value(_TEXT_KEYS[name], value)
            elif value is not None:
                raise PolicyError(f"a {self.kind} scope has no {_TEXT_KEYS[name]}")
        if self.operator is not None and self.operator not in OPERATORS:
            raise PolicyError(f"operator must be one of {', '.join(OPERATORS)}")
        if self.authority is not None and self.authority not in AUTHORITIES:
            raise PolicyError(f"authority must be one of {', '.join(AUTHORITIES)}")
        if self.site_kind is not None and self.site_kind not in SITE_KINDS:
            raise PolicyError(f"kind must be one of {', '.join(SITE_KINDS)}")

    @classmethod
    def nation(cls) -> Scope:
        return cls("nation")

    @classmethod
    def parse(cls, text: str) -> Scope:
        """Read the text form used by the CLI and the docs: ``nation``, ``operator=vnpt``,
        ``province=Hà Nội``, ``province=Hà Nội,district=Ba Đình``,
        ``province=Hà Nội,authority=military``, ``province=Hà Nội,kind=checkpoint``,
        ``site=site-01``."""
        text = unicodedata.normalize("NFC", text.strip())
        if text == "nation":
            return cls("nation")
        values: dict[str, str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in _FIELDS_BY_TEXT_KEY:
                raise PolicyError(
                    f"bad scope {text!r}: write nation, or key=value pairs with keys "
                    "operator, province, district, authority, kind, site"
                )
            fname = _FIELDS_BY_TEXT_KEY[key]
            if fname in values:
                raise PolicyError(f"bad scope {text!r}: {key} given twice")
            values[fname] = value.strip()
        keys = frozenset(values)
        for kind, needed in _SCOPE_FIELDS.items():
            if needed == keys and kind != "nation":
                return cls(kind, **values)
        raise PolicyError(
            f"bad scope {text!r}: allowed combinations are operator; province; "
            "province+district; province+authority; province+kind; site"
        )

    def __str__(self) -> str:
        if self.kind == "nation":
            return "nation"
        return ",".join(
            f"{_TEXT_KEYS[name]}={getattr(self, name)}"
            for name in _ALL_FIELDS
            if getattr(self, name) is not None
        )

    def describe(self, lang: str = "vi") -> str:
        """The scope in words for pages (Vietnamese unless ``lang == "en"``)."""
        en = lang == "en"
        if self.kind == "nation":
            return "Nationwide" if en else "Toàn quốc"
        parts: list[str] = []
        labels = {
            "operator": ("Nhà mạng", "Operator"),
            "province": ("Tỉnh/TP", "Province"),
            "district": ("Quận/huyện", "District"),
            "authority": ("Cơ quan quản lý", "Authority"),
            "site_kind": ("Loại điểm", "Kind"),
            "site_id": ("Điểm", "Site"),
        }
        for name in _ALL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{labels[name][1 if en else 0]}: {value}")
        return "; ".join(parts)


@dataclass(frozen=True)
class Grant:
    """One (role, scope) held by a user, optionally until `expires_at` (epoch seconds)."""

    role: Role
    scope: Scope
    expires_at: float | None = None
    grant_id: int | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLE_ACTIONS:
            raise PolicyError(f"unknown role {self.role!r}")

    def active(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at


@dataclass(frozen=True)
class Principal:
    """An authenticated, enabled user and the grants it holds (loaded once per request)."""

    user_id: int
    email: str
    full_name: str = ""
    grants: tuple[Grant, ...] = field(default_factory=tuple)

    def roles(self, now: float) -> frozenset[Role]:
        return frozenset(g.role for g in self.grants if g.active(now))


def _action_info(action: str) -> ActionInfo:
    try:
        return ACTIONS[action]  # type: ignore[index]
    except KeyError:
        raise PolicyError(f"unknown action {action!r}") from None


# --- the scope table ------------------------------------------------------------------------

SCOPE_MATCH: dict[ScopeKind, Callable[[Scope, SiteAttrs], bool]] = {
    "nation": lambda sc, s: True,
    "operator": lambda sc, s: s.operator == sc.operator,
    "province": lambda sc, s: s.province == sc.province,
    "province_district": lambda sc, s: s.province == sc.province and s.district == sc.district,
    "province_authority": lambda sc, s: s.province == sc.province and s.authority == sc.authority,
    "province_kind": lambda sc, s: s.province == sc.province and s.kind == sc.site_kind,
    "site": lambda sc, s: s.site_id == sc.site_id,
}

SCOPE_SQL: dict[ScopeKind, Callable[[Scope, sa.Table], sa.ColumnElement[bool]]] = {
    "nation": lambda sc, t: sa.true(),
    "operator": lambda sc, t: t.c.operator == sc.operator,
    "province": lambda sc, t: t.c.province == sc.province,
    "province_district": lambda sc, t: sa.and_(
        t.c.province == sc.province, t.c.district == sc.district
    ),
    "province_authority": lambda sc, t: sa.and_(
        t.c.province == sc.province, t.c.authority == sc.authority
    ),
    "province_kind": lambda sc, t: sa.and_(t.c.province == sc.province, t.c.kind == sc.site_kind),
    "site": lambda sc, t: t.c.site_id == sc.site_id,
}


def _grants_for(principal: Principal, action: Action, now: float) -> Iterable[Grant]:
    info = _action_info(action)
    for g in principal.grants:
        if not g.active(now) or action not in ROLE_ACTIONS[g.role]:
            continue
        if info.nation_only and g.scope.kind != "nation":
            continue
        yield g


def can(principal: Principal | None, action: Action, site: SiteAttrs | None, now: float) -> bool:
    """May `principal` do `action` on `site` at time `now`?

    With ``site=None`` the question is "does any grant carry this action at all" — for pages
    whose content is then filtered with :func:`site_filter` (a provincial auditor may open the
    audit page; it shows only its province). Footage of a disabled site is always refused.
    Unknown actions raise :class:`PolicyError` rather than answer."""
    info = _action_info(action)
    if principal is None:
        return False
    if site is not None and info.footage and not site.enabled:
        return False
    for g in _grants_for(principal, action, now):
        if site is None or SCOPE_MATCH[g.scope.kind](g.scope, site):
            return True
    return False


def site_filter(
    principal: Principal | None, action: Action, now: float, table: sa.Table = sites
) -> sa.ColumnElement[bool]:
    """A WHERE condition over the ``sites`` table (or a table with the same columns) selecting
    exactly the sites for which :func:`can` would say yes."""
    info = _action_info(action)
    if principal is None:
        return sa.false()
    conditions = [
        SCOPE_SQL[g.scope.kind](g.scope, table) for g in _grants_for(principal, action, now)
    ]
    if not conditions:
        return sa.false()
    where = sa.or_(*conditions)
    if info.footage:
        where = sa.and_(table.c.enabled == sa.true(), where)
    return where


def has_nation_grant(principal: Principal | None, action: Action, now: float) -> bool:
    """True when some active grant carries `action` nation-wide (records tied to no site, such
    as logins, are shown only to such holders)."""
    if principal is None:
        return False
    return any(g.scope.kind == "nation" for g in _grants_for(principal, action, now))


def scope_covers(outer: Scope, inner: Scope, inner_site: SiteAttrs | None = None) -> bool:
    """Is every site `inner` can ever cover also covered by `outer`?

    Used so an account administrator proposes and approves only within its own scope. A
    one-site `inner` is judged on that site's attributes (`inner_site`); unknown → only a
    nation scope covers it."""
    if outer.kind == "nation":
        return True
    if inner.kind == "site":
        if inner_site is None or inner_site.site_id != inner.site_id:
            return outer.kind == "site" and outer.site_id == inner.site_id
        return SCOPE_MATCH[outer.kind](outer, inner_site)
    if outer.kind == "operator":
        return inner.kind == "operator" and inner.operator == outer.operator
    if outer.kind == "site" or inner.kind in ("nation", "operator"):
        return False
    # Both are provincial from here on.
    if outer.province != inner.province:
        return False
    if outer.kind == "province":
        return True
    return inner.kind == outer.kind and inner == outer


def covering_grant(
    principal: Principal | None,
    action: Action,
    scope: Scope,
    now: float,
    scope_site: SiteAttrs | None = None,
) -> Grant | None:
    """The first active grant of `principal` carrying `action` over all of `scope`, if any."""
    if principal is None:
        return None
    for g in _grants_for(principal, action, now):
        if scope_covers(g.scope, scope, scope_site):
            return g
    return None


def role_table_markdown() -> str:
    """The role → action table as Markdown (docs/security.md embeds it; a test keeps it equal)."""
    header = "| action | footage | " + " | ".join(f"`{r}`" for r in ROLES) + " |"
    rule = "|---|---|" + "---|" * len(ROLES)
    lines = [header, rule]
    for action in ACTION_NAMES:
        info = ACTIONS[action]
        notes = (["yes"] if info.footage else []) + (
            ["nation scope only"] if info.nation_only else []
        )
        marks = " | ".join("✔" if action in ROLE_ACTIONS[r] else "" for r in ROLES)
        lines.append(f"| `{action}` — {info.en} | {', '.join(notes)} | {marks} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m central_hub.policy > the table for docs/security.md
    print(role_table_markdown(), end="")
