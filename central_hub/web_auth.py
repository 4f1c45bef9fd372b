"""The hub's web login, account pages and the one gate every handler passes: :func:`require`.

``setup_auth(app, db, config)`` installs, in this order (outermost first):

1. an error renderer (HTML pages in the user's language, JSON under ``/api/``; a 401 on a page
   redirects to the login page);
2. the session layer: reads the session cookie and keeps the request's
   :class:`RequestAuth` under :data:`REQUEST_AUTH` — ``principal_of(request)`` is the
   :class:`~central_hub.policy.Principal` (or None);
3. CSRF protection on every unsafe method: a synchronizer token (HMAC of the session token, or
   of a pre-session cookie before login) in the form field ``csrf_token`` or the header
   ``X-CSRF-Token``; cross-site requests (``Sec-Fetch-Site``/``Origin``) are refused as well.
   Without a valid token: 403.

and the pages: login (password, then TOTP), TOTP enrolment, logout, registration, activation,
the administrators' propose/approve/reject and disable pages, the auditor's log page,
``/me/sites``, and ``/`` (where a login lands: the board for those allowed it, else
``/me/sites``). Security headers (CSP without inline scripts or external origins, no-referrer,
no framing, no-store) go on every response; cookies are HttpOnly, SameSite=Strict, and Secure
when served over https (``auth.cookie_secure`` overrides the detection, e.g. for loopback tests
or behind a TLS proxy).

Later layers (the NOC board, the JSON API, viewing) call ``await require(request, action,
site)`` in every handler: it answers 401/403 and writes an audit row for every refusal and for
every allowed footage request, so no handler can forget either.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
import sqlalchemy as sa
from aiohttp import web
from multidict import MultiDictProxy

from central_hub import i18n
from central_hub.accounts import (
    AccountError,
    AccountStore,
    AuthConfig,
    FormInvalid,
    Revocation,
    SessionInfo,
    role_text,
    web_actor,
)
from central_hub.audit import AuditLog
from central_hub.db import Database
from central_hub.policy import (
    ACTIONS,
    AUTHORITIES,
    OPERATORS,
    REGISTRABLE_ROLES,
    SCOPE_KINDS,
    SITE_KINDS,
    Action,
    Principal,
    can,
    site_filter,
)
from central_hub.sites import SiteAttrs, sites

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
TEMPLATES_DIR = _HERE / "templates"
STATIC_DIR = _HERE / "static"
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_VN_TZ = timezone(timedelta(hours=7), "ICT")
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class AuthService:
    """Everything the auth layer needs, stored on the app under :data:`AUTH`."""

    db: Database
    config: AuthConfig
    store: AccountStore
    audit: AuditLog
    templates: jinja2.Environment
    secret: bytes
    home: str = "/"


AUTH: web.AppKey[AuthService] = web.AppKey("isocam_auth", AuthService)


def get_auth(app: web.Application) -> AuthService:
    return app[AUTH]


@dataclass
class RequestAuth:
    """Per-request auth state set by the middlewares."""

    principal: Principal | None = None
    session: SessionInfo | None = None
    session_token: str | None = None
    pre_token: str | None = None
    set_pre_token: bool = False
    lang: str = i18n.DEFAULT_LANG


REQUEST_AUTH: web.RequestKey[RequestAuth] = web.RequestKey("isocam_auth", RequestAuth)


def auth_of(request: web.Request) -> RequestAuth:
    """The request's auth state (an empty one outside the middlewares)."""
    state = request.get(REQUEST_AUTH)
    if state is None:
        state = RequestAuth()
        request[REQUEST_AUTH] = state
    return state


def principal_of(request: web.Request) -> Principal | None:
    """Who is logged in on this request (fully: password and, where needed, TOTP)."""
    return auth_of(request).principal


# --- setup ----------------------------------------------------------------------------------


def setup_auth(
    app: web.Application,
    db: Database,
    config: AuthConfig | None = None,
    *,
    audit: AuditLog | None = None,
    store: AccountStore | None = None,
    home: str = "/",
) -> AuthService:
    """Install sessions, CSRF, security headers, error pages and the auth pages on `app`.

    Call it before adding other middlewares (theirs then see ``principal_of(request)``). The
    database must be migrated already. `home` is where a login lands by default."""
    config = config or AuthConfig()
    audit = audit or AuditLog(db)
    store = store or AccountStore(db, audit, config)
    secret = config.secret
    if secret is None:
        secret = secrets.token_bytes(32)
        log.warning(
            "auth.secret is not set: forms open before a restart will be refused after it, and "
            "several hub instances behind one address need the same auth.secret"
        )
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
    )
    service = AuthService(db, config, store, audit, env, secret, home)
    app[AUTH] = service
    app.middlewares.extend([_error_middleware, _session_middleware, _csrf_middleware])
    app.on_response_prepare.append(_security_headers)
    app.cleanup_ctx.append(_audit_head_publisher)
    r = app.router
    r.add_get("/login", login_page)
    r.add_post("/login", login_submit)
    r.add_get("/login/totp", totp_page)
    r.add_post("/login/totp", totp_submit)
    r.add_post("/logout", logout)
    r.add_get("/me/totp", enrol_page)
    r.add_post("/me/totp", enrol_submit)
    r.add_get("/", home_page)
    r.add_get("/me/sites", my_sites)
    r.add_get("/register", register_page)
    r.add_post("/register", register_submit)
    r.add_get("/activate", activate_page)
    r.add_post("/activate", activate_submit)
    r.add_get("/admin/registrations", admin_registrations)
    r.add_post("/admin/registrations/{request_id:[0-9]{1,12}}/{decision}", admin_decide)
    r.add_get("/admin/users", admin_users)
    r.add_post("/admin/users/{user_id:[0-9]{1,12}}/{change}", admin_user_change)
    r.add_get("/audit", audit_page)
    r.add_static("/static", STATIC_DIR, name="isocam_static", append_version=True)
    return service


async def _audit_head_publisher(app: web.Application) -> AsyncIterator[None]:
    """Write the audit chain head to the log now, periodically, and at shutdown."""
    service = app[AUTH]

    async def loop() -> None:
        while True:
            try:
                await asyncio.to_thread(service.audit.emit_head)
            except Exception:
                log.exception("could not write the audit chain head")
            await asyncio.sleep(service.config.audit_head_interval_seconds)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    with contextlib.suppress(Exception):
        await asyncio.to_thread(service.audit.emit_head)


def subscribe_revocations(
    app: web.Application, callback: Callable[[Revocation], None]
) -> Callable[[], None]:
    """Have `callback` called on the app's event loop whenever a user is disabled, a grant
    revoked, a session ended or a site disabled (the viewing layer ends open viewing). Call it
    from a running loop (e.g. an ``on_startup`` handler); returns an unsubscribe function."""
    loop = asyncio.get_running_loop()

    def relay(event: Revocation) -> None:
        loop.call_soon_threadsafe(callback, event)

    return app[AUTH].store.hooks.subscribe(relay)


# --- request helpers ------------------------------------------------------------------------


def client_source(request: web.Request) -> str:
    """The client's address (the last X-Forwarded-For hop when ``auth.trust_forwarded_for``,
    i.e. what our own proxy saw)."""
    if request.app[AUTH].config.trust_forwarded_for:
        forwarded = request.headers.get("X-Forwarded-For", "")
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        if hops:
            return hops[-1][:256]
    return (request.remote or "unknown")[:256]


def _secure(request: web.Request) -> bool:
    config = request.app[AUTH].config
    if config.cookie_secure is not None:
        return config.cookie_secure
    if config.trust_forwarded_for and request.headers.get("X-Forwarded-Proto") == "https":
        return True
    return request.secure


def _cookie_name(request: web.Request, base: str) -> str:
    # The __Host- prefix pins a cookie to this exact host and path, over https only.
    return f"__Host-{base}" if _secure(request) else base


def _set_cookie(request: web.Request, response: web.StreamResponse, base: str, value: str) -> None:
    response.set_cookie(
        _cookie_name(request, base),
        value,
        path="/",
        httponly=True,
        secure=_secure(request),
        samesite="Strict",
    )


def _clear_cookie(request: web.Request, response: web.StreamResponse, base: str) -> None:
    response.del_cookie(
        _cookie_name(request, base), path="/", secure=_secure(request), samesite="Strict"
    )


def _see_other(location: str) -> web.Response:
    """A 303 to return (not raise) when cookies go with it."""
    return web.Response(status=303, headers={"Location": location})


def lang_of(request: web.Request) -> str:
    return auth_of(request).lang


def _csrf_for(secret: bytes, basis: str) -> str:
    return hmac.new(secret, b"csrf\x00" + basis.encode(), hashlib.sha256).hexdigest()


def csrf_token(request: web.Request) -> str:
    """The token a form (or fetch) on this page must send back."""
    state = auth_of(request)
    basis = state.session_token or state.pre_token
    if basis is None:
        basis = secrets.token_urlsafe(32)
        state.pre_token = basis
        state.set_pre_token = True
    return _csrf_for(request.app[AUTH].secret, basis)


def _safe_next(value: str | None, default: str) -> str:
    if (
        not value
        or len(value) > 500
        or not value.startswith("/")
        or value.startswith("//")
        or "\\" in value
        or any(ord(c) < 32 for c in value)
    ):
        return default
    return value


def _fmt_time(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, _VN_TZ).strftime("%Y-%m-%d %H:%M:%S")


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    """Render a page with the layout's context (language, principal, CSRF token, nav)."""
    service = request.app[AUTH]
    lang = lang_of(request)
    principal = principal_of(request)
    now = time.time()
    nav = {
        "registrations": can(principal, "manage_accounts", None, now),
        "users": can(principal, "manage_accounts", None, now),
        "audit": can(principal, "view_audit", None, now),
        "board": can(principal, "view_status", None, now),
        "tickets": can(principal, "manage_tickets", None, now),
        "uptime": can(principal, "view_outages", None, now),
        "export": can(principal, "export_request", None, now)
        or can(principal, "export_approve", None, now),
    }

    def t(key: str, **values: object) -> str:
        return i18n.t(key, lang, **values)

    html = service.templates.get_template(template).render(
        t=t,
        lang=lang,
        other_lang="en" if lang == "vi" else "vi",
        principal=principal,
        csrf_token=csrf_token(request),
        nav=nav,
        path=request.path,
        # The same page in the other language, its query (period, filters) kept.
        lang_switch_url=str(request.rel_url.update_query(lang="en" if lang == "vi" else "vi")),
        static=lambda name: str(request.app.router["isocam_static"].url_for(filename=name)),
        fmt_time=_fmt_time,
        role_text=lambda r: role_text(r, lang),
        **context,
    )
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


def _wants_json(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return request.path.startswith("/api/") or (
        "application/json" in accept and "text/html" not in accept
    )


# --- middlewares ----------------------------------------------------------------------------


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    lang = i18n.pick_lang(request.query.get("lang"), request.cookies.get("lang"))
    auth_of(request).lang = lang
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if not 400 <= exc.status < 500:
            raise
        if _wants_json(request):
            return web.json_response({"error": exc.reason, "status": exc.status}, status=exc.status)
        if exc.status == 401 and request.method == "GET":
            target = "/login?next=" + quote(request.path_qs, safe="")
            raise web.HTTPSeeOther(target) from None
        key = {
            401: "login.expired",
            403: "error.csrf" if exc.reason == "csrf" else "error.forbidden",
            404: "error.not_found",
        }.get(exc.status, "error.generic")
        response = render(
            request,
            "message.html",
            status=exc.status,
            message_key=key,
            title_key="error.title",
            error=True,
        )
    if request.query.get("lang") in i18n.LANGS:
        response.set_cookie(
            "lang", lang, path="/", samesite="Strict", max_age=365 * 86400, secure=_secure(request)
        )
    return response


@web.middleware
async def _session_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    service = request.app[AUTH]
    state = auth_of(request)
    if request.path.startswith("/static/"):
        return await handler(request)
    token = request.cookies.get(_cookie_name(request, "isocam_session"))
    if token:
        info = await asyncio.to_thread(service.store.session, token)
        if info is not None:
            state.session = info
            state.session_token = token
            if info.stage == "full":
                state.principal = await asyncio.to_thread(
                    service.store.load_principal, info.user_id
                )
    pre = request.cookies.get(_cookie_name(request, "isocam_csrf"))
    if pre and 20 <= len(pre) <= 100:
        state.pre_token = pre
    response = await handler(request)
    if state.set_pre_token and state.pre_token:
        _set_cookie(request, response, "isocam_csrf", state.pre_token)
    return response


def csrf_exempt(handler: Handler) -> Handler:
    """Mark a handler that authenticates otherwise (e.g. the edge's tunnel with its device
    key) as not needing a CSRF token. Browser-facing handlers never use this."""
    handler.csrf_exempt = True  # type: ignore[attr-defined]
    return handler


@web.middleware
async def _csrf_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method not in _UNSAFE or getattr(handler, "csrf_exempt", False):
        return await handler(request)
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        raise web.HTTPForbidden(reason="csrf")
    origin = request.headers.get("Origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.host:
        raise web.HTTPForbidden(reason="csrf")
    supplied = request.headers.get(CSRF_HEADER)
    if supplied is None and request.content_type in (
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ):
        form = await request.post()
        value = form.get(CSRF_FIELD)
        supplied = value if isinstance(value, str) else None
    secret = request.app[AUTH].secret
    state = auth_of(request)
    bases = [b for b in (state.session_token, state.pre_token) if b]
    if not supplied or not any(hmac.compare_digest(supplied, _csrf_for(secret, b)) for b in bases):
        raise web.HTTPForbidden(reason="csrf")
    return await handler(request)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    h = response.headers
    h.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
        "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'",
    )
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("Referrer-Policy", "no-referrer")
    h.setdefault("X-Frame-Options", "DENY")
    if not request.path.startswith("/static/"):
        h.setdefault("Cache-Control", "no-store")
    if _secure(request):
        h.setdefault("Strict-Transport-Security", "max-age=31536000")


# --- the gate -------------------------------------------------------------------------------


async def require(
    request: web.Request,
    action: Action,
    site: SiteAttrs | None,
    *,
    camera: str | None = None,
    time_range: tuple[float, float] | None = None,
    reason: str | None = None,
) -> Principal:
    """Authorise `action` on `site` for the request's user, or raise 401 (not logged in) /
    403 (not allowed). Writes an audit row for every refusal of a logged-in user, for every
    refused footage request, and for every allowed footage request (with `camera` and the
    footage `time_range` in epoch seconds); `reason` is recorded too (e.g. an export's legal
    basis)."""
    service = request.app[AUTH]
    principal = principal_of(request)
    now = time.time()
    footage = ACTIONS[action].footage
    allowed = can(principal, action, site, now)
    if allowed and principal is not None and not (footage and site is not None):
        return principal
    if principal is None and not footage:
        raise web.HTTPUnauthorized()
    if not allowed:
        if principal is None:
            why = "not_logged_in"
        elif footage and site is not None and not site.enabled:
            why = "site_disabled"
        elif not can(principal, action, None, now):
            why = "role_lacks_action"
        else:
            why = "out_of_scope"
        reason = f"{why}: {reason}" if reason else why
    await asyncio.to_thread(
        service.audit.record,
        action,
        user=principal,
        source=client_source(request),
        site=site,
        camera=camera,
        time_range=time_range,
        allowed=allowed,
        reason=reason,
        detail={"method": request.method, "path": request.path[:300]},
    )
    if not allowed:
        raise web.HTTPUnauthorized() if principal is None else web.HTTPForbidden()
    assert principal is not None
    return principal


def require_login(request: web.Request) -> Principal:
    """The logged-in principal, or 401 (a page redirects to the login form)."""
    principal = principal_of(request)
    if principal is None:
        raise web.HTTPUnauthorized()
    return principal


async def _form(request: web.Request) -> dict[str, str]:
    data: MultiDictProxy[Any] = await request.post()
    return {k: v for k, v in data.items() if isinstance(v, str)}


# --- login ----------------------------------------------------------------------------------

_LOGIN_MESSAGES = {
    "activated": "login.activated",
    "logged_out": "login.logged_out",
    "enrolled": "totp.enrolled",
    "expired": "login.expired",
}


async def login_page(request: web.Request) -> web.StreamResponse:
    service = request.app[AUTH]
    if principal_of(request) is not None:
        raise web.HTTPSeeOther(_safe_next(request.query.get("next"), service.home))
    return render(
        request,
        "login.html",
        next=_safe_next(request.query.get("next"), ""),
        notice=_LOGIN_MESSAGES.get(request.query.get("msg", "")),
        error=None,
        email="",
    )


async def _start_session(
    request: web.Request, user_id: int, stage: str, target: str
) -> web.StreamResponse:
    """End the current session (no fixation across stages) and start a new one."""
    service = request.app[AUTH]
    old = auth_of(request).session_token
    if old:
        await asyncio.to_thread(service.store.end_session, old, "stage_change")
    token = await asyncio.to_thread(
        service.store.create_session,
        user_id,
        stage,  # type: ignore[arg-type]
        client_source(request),
        request.headers.get("User-Agent"),
    )
    response = _see_other(target)
    _set_cookie(request, response, "isocam_session", token)
    return response


async def login_submit(request: web.Request) -> web.StreamResponse:
    service = request.app[AUTH]
    form = await _form(request)
    email = form.get("email", "")[:300]
    next_url = _safe_next(form.get("next"), "")
    outcome = await asyncio.to_thread(
        service.store.authenticate, email, form.get("password", "")[:1024], client_source(request)
    )
    if not outcome.ok:
        limited = outcome.reason == "rate_limited"
        return render(
            request,
            "login.html",
            status=429 if limited else 401,
            next=next_url,
            notice=None,
            error="login.rate_limited" if limited else "login.failed",
            email=email,
        )
    assert outcome.user_id is not None and outcome.stage is not None
    target = {
        "full": next_url or service.home,
        "mfa": "/login/totp" + (f"?next={quote(next_url, safe='')}" if next_url else ""),
        "enrol": "/me/totp",
    }[outcome.stage]
    return await _start_session(request, outcome.user_id, outcome.stage, target)


def _pending(request: web.Request, stage: str) -> int:
    info = auth_of(request).session
    if info is None or info.stage != stage:
        raise web.HTTPSeeOther("/login?msg=expired")
    return int(info.user_id)


async def totp_page(request: web.Request) -> web.StreamResponse:
    _pending(request, "mfa")
    return render(request, "totp.html", next=_safe_next(request.query.get("next"), ""), error=None)


async def totp_submit(request: web.Request) -> web.StreamResponse:
    service = request.app[AUTH]
    user_id = _pending(request, "mfa")
    form = await _form(request)
    next_url = _safe_next(form.get("next"), "")
    source = client_source(request)
    ok = await asyncio.to_thread(
        service.store.totp_verify, user_id, form.get("code", "")[:20], source
    )
    if not ok:
        return render(request, "totp.html", status=401, next=next_url, error="totp.failed")
    await asyncio.to_thread(service.store.login_succeeded, user_id, source, mfa=True)
    return await _start_session(request, user_id, "full", next_url or service.home)


async def logout(request: web.Request) -> web.StreamResponse:
    service = request.app[AUTH]
    token = auth_of(request).session_token
    info = auth_of(request).session
    if token and info is not None:
        await asyncio.to_thread(service.store.end_session, token, "logout")
        principal = principal_of(request)
        await asyncio.to_thread(
            service.audit.record,
            "logout",
            user=principal if principal is not None else info.user_id,
            source=client_source(request),
        )
    response = _see_other("/login?msg=logged_out")
    _clear_cookie(request, response, "isocam_session")
    return response


# --- TOTP enrolment -------------------------------------------------------------------------


def _enrolling_user(request: web.Request) -> int:
    """Enrolment is open to a session waiting for it, or to a logged-in user without TOTP."""
    info = auth_of(request).session
    if info is not None and info.stage == "enrol":
        return int(info.user_id)
    principal = principal_of(request)
    if principal is not None:
        return int(principal.user_id)
    raise web.HTTPSeeOther("/login?msg=expired")


async def enrol_page(request: web.Request, error: str | None = None) -> web.StreamResponse:
    service = request.app[AUTH]
    user_id = _enrolling_user(request)
    try:
        secret, uri = await asyncio.to_thread(service.store.totp_begin_enrolment, user_id)
    except AccountError:
        raise web.HTTPSeeOther(service.home) from None
    grouped = " ".join(secret[i : i + 4] for i in range(0, len(secret), 4))
    return render(
        request,
        "totp_enrol.html",
        status=401 if error else 200,
        secret=secret,
        secret_grouped=grouped,
        uri=uri,
        error=error,
    )


async def enrol_submit(request: web.Request) -> web.StreamResponse:
    service = request.app[AUTH]
    user_id = _enrolling_user(request)
    form = await _form(request)
    ok = await asyncio.to_thread(
        service.store.totp_confirm_enrolment,
        user_id,
        form.get("code", "")[:20],
        client_source(request),
    )
    if not ok:
        return await enrol_page(request, error="totp.failed")
    info = auth_of(request).session
    if info is not None and info.stage == "enrol":
        await asyncio.to_thread(
            service.store.end_session, auth_of(request).session_token or "", "enrolled"
        )
        response = _see_other("/login?msg=enrolled")
        _clear_cookie(request, response, "isocam_session")
        return response
    raise web.HTTPSeeOther(service.home)


# --- my sites -------------------------------------------------------------------------------


def _my_sites_rows(principal: Principal, db: Database) -> list[dict[str, Any]]:
    now = time.time()
    status = site_filter(principal, "view_status", now)
    live = site_filter(principal, "view_live", now)
    query = (
        sa.select(
            sites.c.site_id,
            sites.c.name,
            sites.c.province,
            sites.c.district,
            sites.c.kind,
            sites.c.authority,
            sites.c.operator,
            sites.c.enabled,
            sa.case((live, sa.true()), else_=sa.false()).label("footage"),
        )
        .where(sa.or_(status, live))
        .order_by(sites.c.province, sites.c.district, sites.c.site_id)
        .limit(10000)
    )
    with db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


async def home_page(request: web.Request) -> web.StreamResponse:
    """Where a login lands: the NOC board for those allowed it (when the hub serves one),
    otherwise the list of sites the user may see."""
    principal = require_login(request)
    if "board" in request.app.router and can(principal, "view_status", None, time.time()):
        raise web.HTTPSeeOther("/board")
    raise web.HTTPSeeOther("/me/sites")


async def my_sites(request: web.Request) -> web.StreamResponse:
    """The sites the user may see, with whether it may watch their footage (filtered in SQL
    with the same policy as every other page)."""
    service = request.app[AUTH]
    principal = require_login(request)
    rows = await asyncio.to_thread(_my_sites_rows, principal, service.db)
    return render(request, "me_sites.html", rows=rows)


# --- registration and activation ------------------------------------------------------------


def _provinces(db: Database) -> list[str]:
    with db.engine.connect() as conn:
        return [
            r[0]
            for r in conn.execute(
                sa.select(sites.c.province).distinct().order_by(sites.c.province).limit(200)
            )
        ]


async def _register_form(
    request: web.Request,
    values: dict[str, str],
    errors: dict[str, str],
    status: int = 200,
    message: str | None = None,
) -> web.Response:
    service = request.app[AUTH]
    return render(
        request,
        "register.html",
        status=status,
        values=values,
        errors=errors,
        message=message,
        roles=REGISTRABLE_ROLES,
        scope_kinds=SCOPE_KINDS,
        authorities=AUTHORITIES,
        site_kinds=SITE_KINDS,
        operators=OPERATORS,
        provinces=await asyncio.to_thread(_provinces, service.db),
        domains=", ".join(service.config.email_domains),
        password_min=service.config.password_min_length,
    )


async def register_page(request: web.Request) -> web.StreamResponse:
    return await _register_form(request, {}, {})


async def register_submit(request: web.Request) -> web.StreamResponse:
    service = request.app[AUTH]
    form = await _form(request)
    values = {k: v[:1000] for k, v in form.items() if k != CSRF_FIELD}
    source = client_source(request)
    if await asyncio.to_thread(service.store.rate_limited, "register", source):
        return await _register_form(request, values, {}, 429, "register.rate_limited")
    try:
        reg = service.store.validate_form(values)
        await asyncio.to_thread(service.store.note_attempt, "register", source, True)
        request_id = await asyncio.to_thread(service.store.submit_registration, reg, source)
    except FormInvalid as exc:
        return await _register_form(request, values, exc.errors, 400)
    except AccountError as exc:
        return await _register_form(request, values, {"email": exc.code}, 409)
    return render(
        request,
        "message.html",
        message_key="register.done",
        message_values={"request_id": request_id},
        title_key="register.title",
        error=False,
    )


async def activate_page(request: web.Request) -> web.StreamResponse:
    service = request.app[AUTH]
    token = request.query.get("token", "")
    user = await asyncio.to_thread(service.store.activation_user, token)
    if user is None:
        return render(
            request,
            "message.html",
            status=404,
            message_key="error.token_invalid",
            title_key="activate.title",
            error=True,
        )
    return render(
        request,
        "activate.html",
        token=token,
        email=user.email,
        errors={},
        password_min=service.config.password_min_length,
    )


async def activate_submit(request: web.Request) -> web.StreamResponse:
    service = request.app[AUTH]
    form = await _form(request)
    token = form.get("token", "")[:200]
    password = form.get("password", "")[:1024]
    user = await asyncio.to_thread(service.store.activation_user, token)
    if user is None:
        return render(
            request,
            "message.html",
            status=404,
            message_key="error.token_invalid",
            title_key="activate.title",
            error=True,
        )

    def again(errors: dict[str, str]) -> web.Response:
        return render(
            request,
            "activate.html",
            status=400,
            token=token,
            email=user.email,
            errors=errors,
            password_min=service.config.password_min_length,
        )

    if password != form.get("password2", ""):
        return again({"password": "password_mismatch"})
    try:
        user_id = await asyncio.to_thread(
            service.store.activate, token, password, client_source(request)
        )
    except FormInvalid as exc:
        return again(exc.errors)
    except AccountError:
        return render(
            request,
            "message.html",
            status=404,
            message_key="error.token_invalid",
            title_key="activate.title",
            error=True,
        )
    if await asyncio.to_thread(service.store.totp_required, user_id):
        return await _start_session(request, user_id, "enrol", "/me/totp")
    raise web.HTTPSeeOther("/login?msg=activated")


# --- administrators -------------------------------------------------------------------------


def _admin(request: web.Request) -> Principal:
    principal = require_login(request)
    if not can(principal, "manage_accounts", None, time.time()):
        raise web.HTTPForbidden()
    return principal


async def _admin_refused(request: web.Request, principal: Principal, exc: AccountError) -> None:
    """Refusals of administrator actions are audited like any other refusal."""
    await asyncio.to_thread(
        request.app[AUTH].audit.record,
        "admin_denied",
        user=principal,
        source=client_source(request),
        allowed=False,
        reason=exc.code,
        detail={"method": request.method, "path": request.path[:300]},
    )


async def admin_registrations(request: web.Request) -> web.StreamResponse:
    service = request.app[AUTH]
    principal = _admin(request)
    regs = await asyncio.to_thread(service.store.registrations_visible_to, principal)
    names: dict[int, str] = {}
    for reg in regs:
        if reg.proposed_by is not None and reg.proposed_by not in names:
            rec = await asyncio.to_thread(service.store.get_user, reg.proposed_by)
            names[reg.proposed_by] = rec.email if rec else str(reg.proposed_by)
    return render(request, "admin_registrations.html", regs=regs, names=names, me=principal.user_id)


async def admin_decide(request: web.Request) -> web.StreamResponse:
    service = request.app[AUTH]
    principal = _admin(request)
    request_id = int(request.match_info["request_id"])
    decision = request.match_info["decision"]
    actor = web_actor(principal, client_source(request))
    form = await _form(request)
    try:
        if decision == "propose":
            await asyncio.to_thread(service.store.propose, request_id, actor)
        elif decision == "reject":
            await asyncio.to_thread(service.store.reject, request_id, actor, form.get("note", ""))
        elif decision == "approve":
            activation = await asyncio.to_thread(service.store.approve, request_id, actor)
            reg = await asyncio.to_thread(service.store.get_registration, request_id)
            assert reg is not None
            base = service.config.public_url or f"{request.scheme}://{request.host}"
            link = f"{base.rstrip('/')}/activate?token={activation.token}"
            return render(
                request,
                "admin_approved.html",
                link=link,
                email=reg.form.email,
                expires=_fmt_time(activation.expires_at),
            )
        else:
            raise web.HTTPNotFound()
    except FormInvalid as exc:
        return render(
            request,
            "message.html",
            status=400,
            title_key="error.title",
            message_key=f"error.{next(iter(exc.errors.values()))}",
            error=True,
        )
    except AccountError as exc:
        await _admin_refused(request, principal, exc)
        status = 403 if exc.code in ("out_of_scope", "same_admin") else 409
        key = f"error.{exc.code}" if f"error.{exc.code}" in i18n.MESSAGES else "error.generic"
        return render(
            request,
            "message.html",
            status=status,
            title_key="error.title",
            message_key=key,
            error=True,
        )
    raise web.HTTPSeeOther("/admin/registrations")


async def admin_users(request: web.Request) -> web.StreamResponse:
    service = request.app[AUTH]
    principal = _admin(request)
    records = await asyncio.to_thread(service.store.users_visible_to, principal)
    return render(request, "admin_users.html", users=records, me=principal.user_id)


async def admin_user_change(request: web.Request) -> web.StreamResponse:
    service = request.app[AUTH]
    principal = _admin(request)
    user_id = int(request.match_info["user_id"])
    change = request.match_info["change"]
    if change not in ("disable", "enable"):
        raise web.HTTPNotFound()
    form = await _form(request)
    actor = web_actor(principal, client_source(request))
    try:
        await asyncio.to_thread(
            service.store.set_user_disabled,
            user_id,
            change == "disable",
            actor,
            form.get("reason", "")[:500],
        )
    except AccountError as exc:
        await _admin_refused(request, principal, exc)
        status = 403 if exc.code in ("out_of_scope", "self") else 404
        key = f"error.{exc.code}" if f"error.{exc.code}" in i18n.MESSAGES else "error.generic"
        return render(
            request,
            "message.html",
            status=status,
            title_key="error.title",
            message_key=key,
            error=True,
        )
    raise web.HTTPSeeOther("/admin/users")


# --- auditor --------------------------------------------------------------------------------


def _parse_since(text: str) -> float | None:
    try:
        day = datetime.strptime(text.strip(), "%Y-%m-%d").replace(tzinfo=_VN_TZ)
    except ValueError:
        return None
    return day.timestamp()


async def audit_page(request: web.Request) -> web.StreamResponse:
    """The audit log as an auditor may read it: only rows inside its scopes (in SQL), newest
    first, 100 a page. Reading the log is itself recorded."""
    service = request.app[AUTH]
    principal = require_login(request)
    now = time.time()
    if not can(principal, "view_audit", None, now):
        await require(request, "view_audit", None)  # audits the refusal, raises 403
    q = request.query
    since = _parse_since(q.get("since", ""))
    action = q.get("action", "").strip()[:64] or None
    site_id = q.get("site", "").strip()[:64] or None
    before = q.get("before", "")
    before_seq = int(before) if before.isdigit() and len(before) < 19 else None
    rows = await asyncio.to_thread(
        service.audit.query,
        principal,
        now,
        since=since,
        action=action,
        site_id=site_id,
        before_seq=before_seq,
        limit=100,
    )
    await asyncio.to_thread(
        service.audit.record,
        "audit_viewed",
        user=principal,
        source=client_source(request),
        detail={
            "since": q.get("since", "")[:20],
            "action": action,
            "site": site_id,
            "before": before_seq,
        },
    )
    return render(
        request,
        "audit.html",
        rows=rows,
        filters={"since": q.get("since", "")[:20], "action": action or "", "site": site_id or ""},
        older=rows[-1].seq if len(rows) == 100 else None,
        fmt_us=lambda us: "" if us is None else _fmt_time(us / 1e6),
    )
