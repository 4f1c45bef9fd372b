"""The authorization policy: every role × action × scope kind × site attribute combination,
checked against an expectation written here independently of central_hub.policy; the SQL
filter checked equal to `can` on a generated set of sites (SQLite and PostgreSQL)."""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from central_hub.db import Database
from central_hub.policy import (
    ACTION_NAMES,
    ROLES,
    TOTP_ROLES,
    Grant,
    PolicyError,
    Principal,
    Scope,
    can,
    covering_grant,
    role_table_markdown,
    scope_covers,
    site_filter,
)
from central_hub.sites import AUTHORITIES, OPERATORS, SITE_KINDS, SiteAttrs, sites

NOW = 1_750_000_000.0

# --- the expectation, written from issue 7 (not derived from the code under test) ----------

EXPECTED_ROLE_ACTIONS: dict[str, set[str]] = {
    "viewer": {"view_live", "view_playback", "view_snapshot", "view_status"},
    "status": {"view_status"},
    "noc": {"view_status", "view_outages", "manage_tickets"},
    "account_admin": {"manage_accounts"},
    "auditor": {"view_audit"},
    "export_requester": {"export_request"},
    "export_approver": {"export_approve"},
    "superadmin": {
        "view_live", "view_playback", "view_snapshot", "view_status", "view_outages",
        "manage_tickets", "export_request", "export_approve", "manage_accounts", "view_audit",
        "manage_sites", "admin",
    },
}  # fmt: skip
EXPECTED_FOOTAGE = {"view_live", "view_playback", "view_snapshot", "export_request",
                    "export_approve"}  # fmt: skip
EXPECTED_NATION_ONLY = {"admin"}

PROVINCES = ("Hà Nội", "Cao Bằng")
DISTRICTS = ("Ba Đình", "Hoàn Kiếm", None)


def make_sites() -> list[SiteAttrs]:
    """Every combination of the attributes a scope can look at (240 sites)."""
    out = []
    combos = itertools.product(
        PROVINCES, DISTRICTS, SITE_KINDS, AUTHORITIES, OPERATORS, (True, False)
    )
    for i, (p, d, k, a, o, en) in enumerate(combos):
        out.append(SiteAttrs(f"s{i:03d}", p, d, k, a, o, en))
    return out


SITES = make_sites()

# A scope is written here as the attribute equalities it imposes on a site.
CONSTRAINTS: list[dict[str, str]] = [
    {},
    *({"operator": o} for o in OPERATORS),
    *({"province": p} for p in PROVINCES),
    *({"province": p, "district": d} for p in PROVINCES for d in DISTRICTS if d),
    *({"province": "Hà Nội", "authority": a} for a in AUTHORITIES),
    {"province": "Cao Bằng", "authority": "military"},
    *({"province": "Hà Nội", "kind": k} for k in SITE_KINDS),
    {"province": "Cao Bằng", "kind": "checkpoint"},
    {"site_id": SITES[0].site_id},  # an enabled site
    {"site_id": SITES[1].site_id},  # a disabled one
]


def scope_of(constraint: dict[str, str]) -> Scope:
    text = ",".join(f"{'site' if k == 'site_id' else k}={v}" for k, v in constraint.items())
    return Scope.parse(text or "nation")


def expected_match(constraint: dict[str, str], site: SiteAttrs) -> bool:
    return all(getattr(site, attr) == value for attr, value in constraint.items())


def expected_can(
    role: str, constraint: dict[str, str], action: str, site: SiteAttrs | None
) -> bool:
    if action not in EXPECTED_ROLE_ACTIONS[role]:
        return False
    if action in EXPECTED_NATION_ONLY and constraint:
        return False
    if site is None:
        return True
    if action in EXPECTED_FOOTAGE and not site.enabled:
        return False
    return expected_match(constraint, site)


def test_the_constraint_list_covers_every_scope_kind() -> None:
    kinds = {scope_of(c).kind for c in CONSTRAINTS}
    assert kinds == {"nation", "operator", "province", "province_district",
                     "province_authority", "province_kind", "site"}  # fmt: skip


def test_the_role_table_is_the_one_in_the_issue() -> None:
    for role in ROLES:
        for action in ACTION_NAMES:
            p = Principal(1, "x@a.gov.vn", grants=(Grant(role, Scope.nation()),))
            assert can(p, action, None, NOW) == (action in EXPECTED_ROLE_ACTIONS[role]), (
                role,
                action,
            )
    assert set(ROLES) == set(EXPECTED_ROLE_ACTIONS)
    assert set(TOTP_ROLES) == {"viewer", "export_requester", "export_approver", "superadmin"}


def test_matrix_every_role_action_scope_and_site() -> None:
    """8 roles × 12 actions × 20 scopes × 240 sites, plus site=None: all agree."""
    checked = 0
    for role, constraint in itertools.product(ROLES, CONSTRAINTS):
        p = Principal(7, "u@a.gov.vn", grants=(Grant(role, scope_of(constraint)),))
        for action in ACTION_NAMES:
            assert can(p, action, None, NOW) == expected_can(role, constraint, action, None)
            for site in SITES:
                got = can(p, action, site, NOW)
                if got != expected_can(role, constraint, action, site):
                    pytest.fail(f"{role} {constraint} {action} {site}: got {got}")
                checked += 1
    assert checked == len(ROLES) * len(CONSTRAINTS) * len(ACTION_NAMES) * len(SITES)


def test_expired_grants_give_nothing_and_future_expiry_counts() -> None:
    for role, constraint in itertools.product(ROLES, CONSTRAINTS):
        expired = Principal(1, "u@a.gov.vn", grants=(Grant(role, scope_of(constraint), NOW),))
        later = Principal(1, "u@a.gov.vn", grants=(Grant(role, scope_of(constraint), NOW + 1),))
        for action in ACTION_NAMES:
            for site in (None, *SITES[::7]):
                assert not can(expired, action, site, NOW)
                assert can(later, action, site, NOW) == expected_can(role, constraint, action, site)
    assert not can(None, "view_status", SITES[0], NOW)


def test_several_grants_are_a_union() -> None:
    p = Principal(
        1,
        "u@a.gov.vn",
        grants=(
            Grant("viewer", Scope.parse("province=Hà Nội,authority=military")),
            Grant("noc", Scope.parse("operator=viettel")),
        ),
    )
    for site in SITES:
        want_live = site.enabled and site.province == "Hà Nội" and site.authority == "military"
        assert can(p, "view_live", site, NOW) == want_live
        want_status = (site.province == "Hà Nội" and site.authority == "military") or (
            site.operator == "viettel"
        )
        assert can(p, "view_status", site, NOW) == want_status
        assert can(p, "manage_tickets", site, NOW) == (site.operator == "viettel")


def test_unknown_actions_and_bad_scopes_raise() -> None:
    p = Principal(1, "u@a.gov.vn", grants=(Grant("superadmin", Scope.nation()),))
    with pytest.raises(PolicyError):
        can(p, "delete_footage", None, NOW)  # type: ignore[arg-type]
    for bad in ("", "province=", "district=X", "province=A,site=x", "operator=mobifone",
                "province=A,authority=navy", "province=A,province=B", "world",
                "province=A\x07", "province=A,kind=checkpoint,district=B"):  # fmt: skip
        with pytest.raises(PolicyError):
            Scope.parse(bad)
    with pytest.raises(PolicyError):
        Grant("emperor", Scope.nation())  # type: ignore[arg-type]


def test_scope_text_round_trips() -> None:
    for constraint in CONSTRAINTS:
        scope = scope_of(constraint)
        assert Scope.parse(str(scope)) == scope
        assert scope.describe("vi") and scope.describe("en")


def test_scope_covers_is_set_inclusion_over_every_site() -> None:
    """outer covers inner exactly when every site inner matches is matched by outer."""
    by_id = {s.site_id: s for s in SITES}
    for outer_c, inner_c in itertools.product(CONSTRAINTS, CONSTRAINTS):
        outer, inner = scope_of(outer_c), scope_of(inner_c)
        inner_sites = {s.site_id for s in SITES if expected_match(inner_c, s)}
        outer_sites = {s.site_id for s in SITES if expected_match(outer_c, s)}
        want = inner_sites <= outer_sites
        site = by_id.get(inner.site_id or "")
        assert scope_covers(outer, inner, site) == want, (outer, inner)
    # An unknown site is covered only nationwide (or by itself).
    ghost = Scope.parse("site=ghost")
    assert scope_covers(Scope.nation(), ghost)
    assert not scope_covers(Scope.parse("province=Hà Nội"), ghost)


def test_covering_grant_needs_the_action() -> None:
    admin = Principal(
        1, "a@a.gov.vn", grants=(Grant("account_admin", Scope.parse("province=Hà Nội")),)
    )
    inner = Scope.parse("province=Hà Nội,district=Ba Đình")
    assert covering_grant(admin, "manage_accounts", inner, NOW) is not None
    assert covering_grant(admin, "view_audit", inner, NOW) is None
    assert covering_grant(admin, "manage_accounts", Scope.parse("province=Cao Bằng"), NOW) is None


def test_site_filter_selects_exactly_what_can_allows(hub_db_url: str) -> None:
    db = Database.connect(hub_db_url)
    db.migrate()
    with db.engine.begin() as conn:
        conn.execute(
            sites.insert(),
            [
                {"site_id": s.site_id, "name": s.site_id, "province": s.province,
                 "district": s.district, "kind": s.kind, "authority": s.authority,
                 "operator": s.operator, "enabled": s.enabled, "enrolled_at": time.time()}
                for s in SITES
            ],
        )  # fmt: skip
    principals: list[Principal] = [
        Principal(1, "u@a.gov.vn", grants=(Grant(role, scope_of(c)),))
        for role, c in itertools.product(ROLES, CONSTRAINTS)
    ]
    principals += [
        Principal(2, "m@a.gov.vn", grants=(
            Grant("viewer", Scope.parse("province=Hà Nội,kind=checkpoint")),
            Grant("noc", Scope.parse("operator=vnpt")),
            Grant("auditor", Scope.parse("province=Cao Bằng,district=Ba Đình")),
            Grant("viewer", Scope.nation(), expires_at=NOW - 1),
        )),
        Principal(3, "n@a.gov.vn"),
    ]  # fmt: skip
    with db.engine.connect() as conn:
        for p in principals:
            for action in ACTION_NAMES:
                got = {
                    r[0]
                    for r in conn.execute(
                        sa.select(sites.c.site_id).where(site_filter(p, action, NOW))
                    )
                }
                want = {s.site_id for s in SITES if can(p, action, s, NOW)}
                assert got == want, (p.grants, action)
        assert not conn.execute(
            sa.select(sites.c.site_id).where(site_filter(None, "view_status", NOW))
        ).all()
    db.close()


def test_security_doc_has_the_current_role_table() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "security.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- role-table:start -->\n(.*?)<!-- role-table:end -->", doc, flags=re.DOTALL)
    assert m, "docs/security.md lost its role-table markers"
    assert m.group(1) == role_table_markdown(), (
        "docs/security.md is out of date: paste policy.role_table_markdown() between the markers"
    )
