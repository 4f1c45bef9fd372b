"""Accounts: the two-administrator registration workflow, activation, Argon2id passwords,
lockout and per-source rate limits, TOTP where footage is seen, server-side sessions and the
revocation hooks — on SQLite and PostgreSQL. Time is driven by a test clock, never by sleeping."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyotp
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from central_hub.accounts import (
    AccountError,
    AccountStore,
    AuthConfig,
    ConfigError,
    FormInvalid,
    Revocation,
    activation_tokens,
    cli_actor,
    registrations,
    sessions,
    users,
    web_actor,
)
from central_hub.audit import AuditLog, audit_log
from central_hub.db import Database
from central_hub.policy import Principal, Scope
from central_hub.sites import sites
from central_hub.users_cli import users as users_cli

PASSWORD = "đúng-mật-khẩu-2025"
# Argon2id at the OWASP minimum keeps the suite quick; the defaults are checked once below.
FAST = AuthConfig(lockout_threshold=3, rate_limit_attempts=8, argon2_memory_kib=19456,
                  argon2_time_cost=2)  # fmt: skip


@dataclass
class Clock:
    now: float = 1_750_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    db: Database
    store: AccountStore
    audit: AuditLog
    clock: Clock


@pytest.fixture
def world(hub_db_url: str) -> Iterator[World]:
    db = Database.connect(hub_db_url)
    db.migrate()
    clock = Clock()
    audit = AuditLog(db, clock=clock)
    store = AccountStore(db, audit, FAST, clock=clock)
    with db.engine.begin() as conn:
        for sid, prov, dist in (("hn-1", "Hà Nội", "Ba Đình"), ("cb-1", "Cao Bằng", None)):
            conn.execute(sites.insert().values(site_id=sid, province=prov, district=dist,
                         kind="facility", authority="health", operator="viettel",
                         enrolled_at=clock.now))  # fmt: skip
    yield World(db, store, audit, clock)
    db.close()


def _admin(w: World, email: str, scope: str = "province=Hà Nội") -> Principal:
    uid = w.store.create_user(email, "Quản trị", PASSWORD, "account_admin", Scope.parse(scope))
    p = w.store.load_principal(uid)
    assert p is not None
    return p


FORM = {
    "full_name": "Nguyễn Văn An",
    "title": "Phó chỉ huy trưởng",
    "unit": "Bộ CHQS tỉnh Hà Nội",
    "phone": "+84 24 3826 0000",
    "email": "an.nv@hanoi.gov.vn",
    "role": "viewer",
    "scope_kind": "province_authority",
    "province": "Hà Nội",
    "authority": "military",
    "purpose": "Giám sát khu cách ly",
}


def _actions(w: World) -> list[str]:
    with w.db.engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.select(audit_log.c.action).order_by("seq"))]


def test_the_form_is_validated_with_the_domain_allow_list(world: World) -> None:
    form = world.store.validate_form(FORM)
    assert form.scope == Scope.parse("province=Hà Nội,authority=military")
    with pytest.raises(FormInvalid) as exc:
        world.store.validate_form(dict(FORM, email="an@gmail.com", phone="call me",
                                       full_name="", role="superadmin", scope_kind="province",
                                       province=""))  # fmt: skip
    assert exc.value.errors == {"email": "email_domain", "phone": "phone_invalid",
                                "full_name": "required", "role": "role_invalid",
                                "scope": "scope_invalid"}  # fmt: skip
    # Sub-domains of an allowed suffix are fine; look-alikes are not.
    world.store.validate_form(dict(FORM, email="x@bocongan.gov.vn"))
    with pytest.raises(FormInvalid):
        world.store.validate_form(dict(FORM, email="x@evilgov.vn"))


def test_propose_then_approve_by_another_admin_creates_an_account(world: World) -> None:
    w = world
    a1, a2 = _admin(w, "admin1@hanoi.gov.vn"), _admin(w, "admin2@hanoi.gov.vn")
    outsider = _admin(w, "admin@caobang.gov.vn", "province=Cao Bằng")
    rid = w.store.submit_registration(w.store.validate_form(FORM), "127.0.0.1")
    with pytest.raises(AccountError, match="pending"):
        w.store.submit_registration(w.store.validate_form(FORM), "127.0.0.1")
    assert [r.request_id for r in w.store.registrations_visible_to(a1)] == [rid]
    assert w.store.registrations_visible_to(outsider) == []
    with pytest.raises(AccountError) as exc:
        w.store.propose(rid, web_actor(outsider, "127.0.0.2"))
    assert exc.value.code == "out_of_scope"
    with pytest.raises(AccountError) as exc:
        w.store.approve(rid, web_actor(a2, None))  # not proposed yet
    assert exc.value.code == "bad_state"
    w.store.propose(rid, web_actor(a1, "127.0.0.1"))
    with pytest.raises(AccountError) as exc:
        w.store.approve(rid, web_actor(a1, "127.0.0.1"))
    assert exc.value.code == "same_admin"
    with pytest.raises(AccountError):
        w.store.approve(rid, web_actor(outsider, None))
    activation = w.store.approve(rid, web_actor(a2, "127.0.0.3"))
    user = w.store.get_user(activation.user_id)
    assert user is not None and not user.activated and user.full_name == "Nguyễn Văn An"
    assert [(g.role, str(g.scope)) for g in user.grants] == [
        ("viewer", "province=Hà Nội,authority=military")
    ]
    with w.db.engine.connect() as conn:  # the token is stored only as a hash
        stored = conn.execute(sa.select(activation_tokens.c.token_hash)).scalars().all()
    assert activation.token not in stored and len(stored) == 1
    reg = w.store.get_registration(rid)
    assert reg is not None and reg.state == "approved" and reg.proposed_by == a1.user_id
    assert reg.decided_by == a2.user_id
    assert {"registration_submitted", "registration_proposed", "registration_approved",
            "user_created", "grant_added"} <= set(_actions(w))  # fmt: skip
    assert w.audit.verify().ok


def test_rejection_keeps_the_record(world: World) -> None:
    w = world
    a1 = _admin(w, "admin1@hanoi.gov.vn")
    rid = w.store.submit_registration(w.store.validate_form(FORM), None)
    with pytest.raises(FormInvalid):
        w.store.reject(rid, web_actor(a1, None), "   ")
    w.store.reject(rid, web_actor(a1, None), "Không đúng đơn vị")
    reg = w.store.get_registration(rid)
    assert reg is not None and reg.state == "rejected" and reg.decision_note == "Không đúng đơn vị"
    with w.db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(registrations)).scalar() == 1
    # A fresh request for the same address may be submitted after a rejection.
    w.store.submit_registration(w.store.validate_form(FORM), None)


def test_admins_cannot_hand_out_superadmin_or_act_outside_scope(world: World) -> None:
    w = world
    a1 = _admin(w, "admin1@hanoi.gov.vn")
    target = w.store.create_user("x@hanoi.gov.vn", "X", PASSWORD, "status",
                                 Scope.parse("province=Hà Nội"))  # fmt: skip
    with pytest.raises(AccountError):
        w.store.add_grant(target, "superadmin", Scope.parse("province=Hà Nội"), web_actor(a1, None))
    with pytest.raises(AccountError):
        w.store.add_grant(target, "viewer", Scope.parse("province=Cao Bằng"), web_actor(a1, None))
    with pytest.raises(AccountError):
        w.store.add_grant(target, "viewer", Scope.parse("site=cb-1"), web_actor(a1, None))
    w.store.add_grant(target, "viewer", Scope.parse("site=hn-1"), web_actor(a1, None))
    national = w.store.create_user("n@bca.gov.vn", "N", PASSWORD, "viewer", Scope.nation())
    with pytest.raises(AccountError) as exc:
        w.store.set_user_disabled(national, True, web_actor(a1, None), "x")
    assert exc.value.code == "out_of_scope"
    with pytest.raises(AccountError) as exc:
        w.store.set_user_disabled(a1.user_id, True, web_actor(a1, None), "x")
    assert exc.value.code == "self"
    assert [u.email for u in w.store.users_visible_to(a1)] == ["admin1@hanoi.gov.vn",
                                                                "x@hanoi.gov.vn"]  # fmt: skip


def test_activation_link_works_once_and_expires(world: World) -> None:
    w = world
    a1, a2 = _admin(w, "admin1@hanoi.gov.vn"), _admin(w, "admin2@hanoi.gov.vn")
    rid = w.store.submit_registration(w.store.validate_form(FORM), None)
    w.store.propose(rid, web_actor(a1, None))
    act = w.store.approve(rid, web_actor(a2, None))
    with pytest.raises(FormInvalid) as exc:
        w.store.activate(act.token, "short", "127.0.0.1")
    assert exc.value.errors == {"password": "password_short"}
    with pytest.raises(AccountError):
        w.store.activate(act.token + "x", PASSWORD, "127.0.0.1")
    assert w.store.activate(act.token, PASSWORD, "127.0.0.1") == act.user_id
    with pytest.raises(AccountError):
        w.store.activate(act.token, PASSWORD, "127.0.0.1")
    with w.db.engine.connect() as conn:
        pw_hash = conn.execute(sa.select(users.c.password_hash).where(
            users.c.user_id == act.user_id)).scalar_one()  # fmt: skip
    assert pw_hash.startswith("$argon2id$v=19$m=19456,t=2,p=4$")
    # A second request, approved but left until its link expires.
    rid2 = w.store.submit_registration(w.store.validate_form(dict(FORM, email="b@hanoi.gov.vn")),
                                       None)  # fmt: skip
    w.store.propose(rid2, web_actor(a1, None))
    act2 = w.store.approve(rid2, web_actor(a2, None))
    w.clock.now += w.store.config.activation_ttl_seconds + 1
    assert w.store.activation_user(act2.token) is None
    again = w.store.reissue_activation(act2.user_id, web_actor(a1, None))
    assert w.store.activation_user(again.token) is not None


def test_wrong_passwords_lock_the_account_for_a_while(world: World) -> None:
    w = world
    uid = w.store.create_user("s@hanoi.gov.vn", "S", PASSWORD, "status", Scope.nation())
    for _ in range(3):
        assert w.store.authenticate("s@hanoi.gov.vn", "sai-mật-khẩu-123", "10.0.0.1").reason == (
            "bad_password"
        )
    locked = w.store.authenticate("s@hanoi.gov.vn", PASSWORD, "10.0.0.2")
    assert not locked.ok and locked.reason == "locked"
    w.clock.now += w.store.config.lockout_seconds + 1
    ok = w.store.authenticate("S@Hanoi.gov.vn ", PASSWORD, "10.0.0.2")
    assert ok.ok and ok.stage == "full" and ok.user_id == uid
    acts = _actions(w)
    assert acts.count("login_failed") == 4 and "account_locked" in acts and acts[-1] == "login_ok"
    with w.db.engine.connect() as conn:
        reasons = conn.execute(sa.select(audit_log.c.reason).where(
            audit_log.c.action == "login_failed")).scalars().all()  # fmt: skip
    assert reasons == ["bad_password"] * 3 + ["locked"]


def test_failures_from_one_source_are_rate_limited(world: World) -> None:
    w = world
    w.store.create_user("s@hanoi.gov.vn", "S", PASSWORD, "status", Scope.nation())
    for i in range(8):
        w.store.authenticate(f"nobody{i}@hanoi.gov.vn", "whatever-123456", "10.9.9.9")
    limited = w.store.authenticate("s@hanoi.gov.vn", PASSWORD, "10.9.9.9")
    assert not limited.ok and limited.reason == "rate_limited"
    assert w.store.authenticate("s@hanoi.gov.vn", PASSWORD, "10.9.9.10").ok
    w.clock.now += w.store.config.rate_limit_window_seconds + 1
    assert w.store.authenticate("s@hanoi.gov.vn", PASSWORD, "10.9.9.9").ok


def test_totp_is_required_for_footage_roles_and_codes_work_once(world: World) -> None:
    w = world
    status_id = w.store.create_user("s@hanoi.gov.vn", "S", PASSWORD, "status", Scope.nation())
    viewer_id = w.store.create_user("v@hanoi.gov.vn", "V", PASSWORD, "viewer", Scope.nation())
    exporter = w.store.create_user("e@hanoi.gov.vn", "E", PASSWORD, "export_approver",
                                   Scope.nation())  # fmt: skip
    assert not w.store.totp_required(status_id)
    assert w.store.totp_required(viewer_id) and w.store.totp_required(exporter)
    assert w.store.authenticate("s@hanoi.gov.vn", PASSWORD, "1").stage == "full"
    assert w.store.authenticate("v@hanoi.gov.vn", PASSWORD, "1").stage == "enrol"
    secret, uri = w.store.totp_begin_enrolment(viewer_id)
    assert w.store.totp_begin_enrolment(viewer_id)[0] == secret  # stable until confirmed
    assert uri.startswith("otpauth://totp/") and "issuer=isocam" in uri
    totp = pyotp.TOTP(secret)
    assert not w.store.totp_confirm_enrolment(viewer_id, "000000", "1")
    assert w.store.totp_confirm_enrolment(viewer_id, totp.at(w.clock.now), "1")
    with pytest.raises(AccountError):
        w.store.totp_begin_enrolment(viewer_id)
    assert w.store.authenticate("v@hanoi.gov.vn", PASSWORD, "1").stage == "mfa"
    # The code used at enrolment is spent; the next time step's code works once.
    assert not w.store.totp_verify(viewer_id, totp.at(w.clock.now), "1")
    w.clock.now += 30
    code = totp.at(w.clock.now)
    assert w.store.totp_verify(viewer_id, code, "1")
    assert not w.store.totp_verify(viewer_id, code, "1")
    # Wrong codes count towards the lockout like wrong passwords (3 here, one is above).
    w.clock.now += 30
    assert not w.store.totp_verify(viewer_id, "123456", "1")
    assert not w.store.totp_verify(viewer_id, totp.at(w.clock.now), "1")  # locked now
    # A user that enrolled voluntarily is asked for the code too.
    secret_s, _ = w.store.totp_begin_enrolment(status_id)
    assert w.store.totp_confirm_enrolment(status_id, pyotp.TOTP(secret_s).at(w.clock.now), "1")
    assert w.store.authenticate("s@hanoi.gov.vn", PASSWORD, "1").stage == "mfa"


def test_sessions_expire_idle_and_absolute_and_are_stored_hashed(world: World) -> None:
    w = world
    uid = w.store.create_user("s@hanoi.gov.vn", "S", PASSWORD, "status", Scope.nation())
    token = w.store.create_session(uid, "full", "127.0.0.1", "test")
    with w.db.engine.connect() as conn:
        assert token not in conn.execute(sa.select(sessions.c.token_hash)).scalars().all()
    info = w.store.session(token)
    assert info is not None and info.user_id == uid and info.stage == "full"
    cfg = w.store.config
    w.clock.now += cfg.session_idle_seconds + 1
    assert w.store.session(token) is None  # idle too long
    token = w.store.create_session(uid, "full", "127.0.0.1", "test")
    for _ in range(int(cfg.session_absolute_seconds // (cfg.session_idle_seconds / 2)) + 1):
        w.clock.now += cfg.session_idle_seconds / 2
        if w.store.session(token) is None:
            break
    assert w.store.session(token) is None  # absolute lifetime reached despite activity
    pending = w.store.create_session(uid, "mfa", None, None)
    w.clock.now += 601
    assert w.store.session(pending) is None


def test_disabling_revokes_sessions_and_fires_the_hooks(world: World) -> None:
    w = world
    events: list[Revocation] = []
    unsubscribe = w.store.hooks.subscribe(events.append)
    w.store.hooks.subscribe(lambda ev: 1 / 0)  # a broken subscriber does not block revocation
    a1 = _admin(w, "admin1@hanoi.gov.vn")
    uid = w.store.create_user("v@hanoi.gov.vn", "V", PASSWORD, "viewer",
                              Scope.parse("province=Hà Nội"))  # fmt: skip
    token = w.store.create_session(uid, "full", None, None)
    w.store.set_user_disabled(uid, True, web_actor(a1, "127.0.0.1"), "Chuyển công tác")
    assert w.store.session(token) is None
    assert w.store.load_principal(uid) is None
    assert events == [Revocation("user_disabled", user_id=uid)]
    w.store.set_user_disabled(uid, False, web_actor(a1, None))
    assert w.store.session(token) is None  # re-enabling does not bring old sessions back
    user = w.store.get_user(uid)
    assert user is not None
    grant_id = user.grants[0].grant_id
    assert grant_id is not None
    w.store.revoke_grant(grant_id, web_actor(a1, None))
    principal = w.store.load_principal(uid)
    assert principal is not None and principal.grants == ()
    with pytest.raises(AccountError):  # an account admin does not manage sites
        w.store.set_site_enabled("hn-1", False, web_actor(a1, None))
    w.store.set_site_enabled("hn-1", False, cli_actor())
    unsubscribe()
    w.store.set_site_enabled("hn-1", True, cli_actor())
    assert events[1:] == [
        Revocation("grant_revoked", user_id=uid),
        Revocation("site_disabled", site_id="hn-1"),
    ]
    assert {"user_disabled", "user_enabled", "grant_revoked", "site_disabled",
            "site_enabled"} <= set(_actions(w))  # fmt: skip
    assert w.audit.verify().ok


def test_auth_config_reports_every_problem() -> None:
    cfg = AuthConfig.from_mapping({"email_domains": [".gov.vn", "ca.gov.vn"],
                                   "lockout_threshold": 4, "cookie_secure": True,
                                   "secret": "ab" * 32})  # fmt: skip
    assert cfg.email_domains == (".gov.vn", "ca.gov.vn") and cfg.secret == bytes([0xAB]) * 32
    with pytest.raises(ConfigError) as exc:
        AuthConfig.from_mapping({"lockout_threshold": "five", "nonsense": 1,
                                 "email_domains": ["not a domain"], "argon2_memory_kib": 1024,
                                 "extra_totp_roles": ["king"]})  # fmt: skip
    text = str(exc.value)
    for needle in ("lockout_threshold", "nonsense", "email_domains"):
        assert needle in text
    with pytest.raises(ConfigError) as exc:
        AuthConfig(argon2_memory_kib=1024, extra_totp_roles=("king",))
    assert "argon2_memory_kib" in str(exc.value) and "king" in str(exc.value)


def test_default_password_hashing_is_argon2id_rfc9106(world: World) -> None:
    store = AccountStore(world.db, world.audit)
    uid = store.create_superadmin("root@bca.gov.vn", "Quản trị gốc", PASSWORD)
    with world.db.engine.connect() as conn:
        pw_hash = conn.execute(sa.select(users.c.password_hash).where(
            users.c.user_id == uid)).scalar_one()  # fmt: skip
    assert pw_hash.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert store.authenticate("root@bca.gov.vn", PASSWORD, "127.0.0.1").stage == "enrol"


def test_users_cli_bootstraps_and_manages_accounts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    run = CliRunner().invoke
    made = run(users_cli, ["create-superadmin", "--db", url, "--email", "Root@BCA.gov.vn",
                           "--name", "Quản trị gốc", "--password-stdin"],
               input=PASSWORD + "\n")  # fmt: skip
    assert made.exit_code == 0, made.output
    weak = run(users_cli, ["create-superadmin", "--db", url, "--email", "x@bca.gov.vn",
                           "--name", "X", "--password-stdin"], input="short\n")  # fmt: skip
    assert weak.exit_code == 1 and "password_short" in weak.output
    db = Database.connect(url)
    store = AccountStore(db, AuditLog(db), FAST)
    uid = store.create_user("v@hanoi.gov.vn", "V", PASSWORD, "status", Scope.nation())
    granted = run(users_cli, ["grant", "--db", url, "v@hanoi.gov.vn", "--role", "viewer",
                              "--scope", "province=Hà Nội,kind=checkpoint",
                              "--expires", "2099-01-01"])  # fmt: skip
    assert granted.exit_code == 0, granted.output
    bad = run(users_cli, ["grant", "--db", url, "v@hanoi.gov.vn", "--role", "viewer",
                          "--scope", "province=Hà Nội,planet=Mars"])  # fmt: skip
    assert bad.exit_code == 2 and "bad scope" in bad.output
    listed = run(users_cli, ["list", "--db", url, "--json"])
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert [r["email"] for r in rows] == ["root@bca.gov.vn", "v@hanoi.gov.vn"]
    assert [g["scope"] for g in rows[1]["grants"]] == ["nation", "province=Hà Nội,kind=checkpoint"]
    token = store.create_session(uid, "full", None, None)
    assert run(users_cli, ["disable", "--db", url, "v@hanoi.gov.vn", "--reason", "nghỉ hưu"]
               ).exit_code == 0  # fmt: skip
    assert store.session(token) is None
    assert run(users_cli, ["disable", "--db", url, "nobody@hanoi.gov.vn"]).exit_code == 1
    revoked = run(users_cli, ["revoke-grant", "--db", url, str(rows[1]["grants"][0]["grant_id"])])
    assert revoked.exit_code == 0
    again = run(users_cli, ["reissue-activation", "--db", url, "v@hanoi.gov.vn",
                            "--base-url", "https://hub.example"])  # fmt: skip
    assert again.exit_code == 1  # already activated
    with db.engine.connect() as conn:
        actors = set(conn.execute(sa.select(audit_log.c.actor)).scalars())
    assert any(a and a.startswith("cli:") for a in actors)
    assert AuditLog(db).verify().ok
    db.close()


def test_two_admins_approving_at_once_create_one_account(world: World) -> None:
    w = world
    a1, a2, a3 = (_admin(w, f"admin{i}@hanoi.gov.vn") for i in (1, 2, 3))
    rid = w.store.submit_registration(w.store.validate_form(FORM), None)
    w.store.propose(rid, web_actor(a1, None))
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def approve(admin: Principal) -> None:
        start.wait()
        try:
            w.store.approve(rid, web_actor(admin, None))
            outcomes.append("approved")
        except AccountError as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=approve, args=(a,)) for a in (a2, a3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["approved", "bad_state"]
    assert w.store.find_user(FORM["email"]) is not None
    assert w.audit.verify().ok
