"""The hub's JSON API: everything the NOC board shows, its OpenAPI 3 document, and live alerts.

One table, :data:`ROUTES`, lists every endpoint with its method, path, the policy action it
needs, its parameters and its response; the router and the OpenAPI document served at
``/api/openapi.json`` are both built from it, so they cannot drift apart (a test checks the
router against the document as well).

Authorization (docs/board.md, docs/security.md):

* **lists** (``/api/board``, ``/api/sites``, ``/api/faults``, ``/api/outages``, ``/api/tickets``,
  ``/api/uptime``, ``/api/mttr``) first ask :func:`~central_hub.web_auth.require` whether the
  user holds the action anywhere (403 and an audit row if not), then pass
  :func:`~central_hub.policy.site_filter` to :mod:`central_hub.queries`: a row outside the
  user's scope is never read, and a filter naming another province simply finds nothing;
* **objects** (a site, its cameras, outages, events; a ticket) load the site first and call
  ``await require(request, action, site)``: another scope's id answers 403 and leaves an audit
  row naming the site (the IDOR tests try every object endpoint with another province's ids);
  an id that does not exist answers 404;
* **footage**: the camera thumbnail is a picture of the site, so it needs ``view_snapshot``
  (the NOC role does not carry it), and every request — allowed or not — is audited.

Unsafe methods need the CSRF token in ``X-CSRF-Token`` (``GET /api/me`` returns it) and the
session cookie; cross-site requests are refused by the auth layer. Errors are JSON
``{"error": …, "status": …}``.

``GET /api/alerts`` is a WebSocket: it pushes every alert of :class:`~central_hub.alerts.AlertHub`
whose site the user may see (``view_status``; ticket alerts need ``view_outages``), as one JSON
object per text message. It re-checks the session every :data:`RECHECK_SECONDS` and at once when
a user, grant or session is revoked, and closes (code 4401) when the session is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import urlsplit

import sqlalchemy as sa
from aiohttp import WSMsgType, web
from sqlalchemy.engine import Connection

from central_hub import queries
from central_hub import tickets as ticket_ops
from central_hub.accounts import Revocation
from central_hub.alerts import Alert
from central_hub.policy import (
    ACTIONS,
    Action,
    Principal,
    can,
    has_nation_grant,
    site_filter,
)
from central_hub.sites import AUTHORITIES, OPERATORS, SITE_KINDS, SiteAttrs, sites
from central_hub.status import CAMERA_STATUSES, OUTAGE_KINDS, RAGS, TICKET_STATES
from central_hub.status import tickets as tickets_table
from central_hub.web_auth import (
    AUTH,
    auth_of,
    csrf_token,
    require,
    require_login,
    subscribe_revocations,
)

if TYPE_CHECKING:
    from central_hub.app import Hub

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Path parameter patterns (the router's; the OpenAPI document repeats them as `pattern`).
ID_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
TICKET_ID_PATTERN: Final = r"[0-9]{1,12}"
#: Seconds between re-checks of an alert socket's session and grants.
RECHECK_SECONDS: Final = 30.0
#: Longest period a time-window query may cover.
MAX_WINDOW_S: Final = 400 * 86400.0
MAX_TEXT: Final = 128
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_GROUPS: Final = ("nation", "operator", "province", "district")
_UPTIME_LEVELS: Final = ("nation", "operator", "province", "district", "site")


# --- shared state ---------------------------------------------------------------------------


@dataclass(eq=False)  # hashed by identity: kept in a set
class AlertSocket:
    """One open alert WebSocket: whose it is, and a flag to re-check it now."""

    user_id: int
    session_hash: str | None
    recheck: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class BoardService:
    """What the board and API handlers share (stored on the app under :data:`BOARD`)."""

    hub: Hub
    sockets: set[AlertSocket] = field(default_factory=set)
    #: alerts let through to a socket / withheld by its user's scope (monotonic, /metrics)
    alerts_sent: int = 0
    alerts_withheld: int = 0

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a read query ``fn(conn, *args, **kwargs)`` on a pooled connection, off the
        event loop (SQLAlchemy is blocking)."""

        def run() -> T:
            with self.hub.db.engine.connect() as conn:
                return fn(conn, *args, **kwargs)

        return await asyncio.to_thread(run)

    async def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(conn, …)`` in one transaction, off the event loop."""

        def run() -> T:
            with self.hub.db.engine.begin() as conn:
                return fn(conn, *args, **kwargs)

        return await asyncio.to_thread(run)

    def on_revocation(self, event: Revocation) -> None:
        for sock in list(self.sockets):
            if (event.user_id is not None and event.user_id == sock.user_id) or (
                event.session_hash is not None and event.session_hash == sock.session_hash
            ):
                sock.recheck.set()


BOARD: web.AppKey[BoardService] = web.AppKey("isocam_board", BoardService)


def service_of(request: web.Request) -> BoardService:
    return request.app[BOARD]


# --- JSON -----------------------------------------------------------------------------------


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return None  # never put binary (thumbnails) into JSON
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(data: Any) -> str:
    return json.dumps(data, default=_default, ensure_ascii=False, separators=(",", ":"))


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=dumps)


def bad_request(message: str) -> web.HTTPBadRequest:
    """A 400 whose reason names the bad parameter (shown as ``error`` in JSON)."""
    return web.HTTPBadRequest(reason=message[:200])


# --- input validation -----------------------------------------------------------------------


def clean_text(name: str, value: str | None, limit: int = MAX_TEXT) -> str | None:
    """A free-text query value: NFC, stripped, 1..limit characters without control
    characters; '' and None mean "not given"."""
    if value is None:
        return None
    value = unicodedata.normalize("NFC", value).strip()
    if not value:
        return None
    if len(value) > limit or _CONTROL.search(value):
        raise bad_request(f"{name}: at most {limit} characters, no control characters")
    return value


def choice(name: str, value: str | None, allowed: Iterable[str]) -> str | None:
    if value is None or value == "":
        return None
    options = tuple(allowed)
    if value not in options:
        raise bad_request(f"{name}: one of {', '.join(options)}")
    return value


def choices(name: str, value: str | None, allowed: Iterable[str]) -> list[str] | None:
    """A comma-separated list of allowed words (None when not given)."""
    if value is None or value.strip() == "":
        return None
    options = tuple(allowed)
    out = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in out if v not in options]
    if bad or len(out) > len(options):
        raise bad_request(f"{name}: comma-separated, each one of {', '.join(options)}")
    return out


def integer(name: str, value: str | None, default: int, lo: int, hi: int) -> int:
    if value is None or value == "":
        return default
    if not re.fullmatch(r"-?[0-9]{1,12}", value):
        raise bad_request(f"{name}: an integer from {lo} to {hi}")
    n = int(value)
    if not lo <= n <= hi:
        raise bad_request(f"{name}: an integer from {lo} to {hi}")
    return n


def number(name: str, value: str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        x = float(value)
    except ValueError:
        raise bad_request(f"{name}: a number (UNIX seconds)") from None
    if x != x or x in (float("inf"), float("-inf")) or not 0 <= x < 1e11:
        raise bad_request(f"{name}: a number (UNIX seconds)")
    return x


def boolean(name: str, value: str | None) -> bool:
    if value in (None, "", "0", "false"):
        return False
    if value in ("1", "true"):
        return True
    raise bad_request(f"{name}: true or false")


@dataclass(frozen=True)
class Filters:
    """The board's own filters (on top of the user's scope)."""

    province: str | None = None
    district: str | None = None
    operator: str | None = None
    kind: str | None = None
    authority: str | None = None

    @classmethod
    def parse(cls, query: Any) -> Filters:
        return cls(
            province=clean_text("province", query.get("province")),
            district=clean_text("district", query.get("district")),
            operator=choice("operator", query.get("operator"), OPERATORS),
            kind=choice("kind", query.get("kind"), SITE_KINDS),
            authority=choice("authority", query.get("authority"), AUTHORITIES),
        )

    def kwargs(self) -> dict[str, str | None]:
        return {
            "province": self.province,
            "district": self.district,
            "operator": self.operator,
            "kind": self.kind,
            "authority": self.authority,
        }

    def given(self) -> dict[str, str]:
        return {k: v for k, v in self.kwargs().items() if v is not None}


def window(query: Any, default_s: float = 86400.0, now: float | None = None) -> tuple[float, float]:
    """(since, until) from ``since``/``until`` (UNIX seconds), defaulting to the last
    `default_s` seconds; at most :data:`MAX_WINDOW_S` long."""
    t_now = time.time() if now is None else now
    until = number("until", query.get("until"))
    since = number("since", query.get("since"))
    until = t_now if until is None else until
    since = until - default_s if since is None else since
    if since >= until:
        raise bad_request("since must be before until")
    if until - since > MAX_WINDOW_S:
        raise bad_request(f"the period is at most {MAX_WINDOW_S / 86400:.0f} days")
    return since, until


def paging(query: Any, default: int = 50, most: int = 500) -> tuple[int, int]:
    """(limit, offset)."""
    return (
        integer("limit", query.get("limit"), default, 1, most),
        integer("offset", query.get("offset"), 0, 0, 10_000_000),
    )


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (400 unless it is one)."""
    if request.content_type != "application/json":
        raise bad_request("send application/json")
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    return data


def body_text(data: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = data.get(name)
    if value is None or value == "":
        if required:
            raise bad_request(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise bad_request(f"{name} must be text")
    return value


# --- authorization helpers ------------------------------------------------------------------


def list_filter(principal: Principal, action: Action, now: float) -> sa.ColumnElement[bool] | None:
    """The scope condition for a list query: :func:`~central_hub.policy.site_filter`, or None
    (no condition at all) for a nation-wide grant of a non-footage action — the same rows,
    but the queries then pick their whole-country plans (measured: see docs/board.md)."""
    if not ACTIONS[action].footage and has_nation_grant(principal, action, now):
        return None
    return site_filter(principal, action, now)


async def scoped(
    request: web.Request, action: Action
) -> tuple[Principal, sa.ColumnElement[bool] | None]:
    """For list endpoints: the user must hold `action` somewhere (else 403 + audit); returns
    the principal and the SQL condition selecting the sites where it does (see
    :func:`list_filter`)."""
    principal = await require(request, action, None)
    return principal, list_filter(principal, action, time.time())


def _site(conn: Connection, site_id: str) -> SiteAttrs | None:
    row = conn.execute(sa.select(sites).where(sites.c.site_id == site_id)).first()
    return None if row is None else SiteAttrs.from_row(row)


def _ticket_site(conn: Connection, ticket_id: int) -> SiteAttrs | None:
    row = conn.execute(
        sa.select(sites)
        .join(tickets_table, tickets_table.c.site_id == sites.c.site_id)
        .where(tickets_table.c.id == ticket_id)
    ).first()
    return None if row is None else SiteAttrs.from_row(row)


async def authorized_site(
    request: web.Request, action: Action, *, camera: str | None = None
) -> tuple[Principal, SiteAttrs]:
    """For object endpoints: the site named in the path (404 if unknown), then
    ``require(action, site)`` (403 + audit outside the scope)."""
    site_id = request.match_info["site_id"]
    site = await service_of(request).read(_site, site_id)
    if site is None:
        raise web.HTTPNotFound()
    principal = await require(request, action, site, camera=camera)
    return principal, site


async def authorized_ticket(
    request: web.Request, action: Action
) -> tuple[Principal, SiteAttrs, int]:
    ticket_id = int(request.match_info["ticket_id"])
    site = await service_of(request).read(_ticket_site, ticket_id)
    if site is None:
        raise web.HTTPNotFound()
    principal = await require(request, action, site)
    return principal, site, ticket_id


def single_site_filter(principal: Principal, action: Action, site_id: str) -> Any:
    """The scope condition plus the site, as a second line of defence in object queries."""
    return sa.and_(site_filter(principal, action, time.time()), sites.c.site_id == site_id)


# --- handlers: the board --------------------------------------------------------------------


async def api_me(request: web.Request) -> web.StreamResponse:
    principal = require_login(request)
    now = time.time()
    return json_response(
        {
            "user_id": principal.user_id,
            "email": principal.email,
            "full_name": principal.full_name,
            "grants": [
                {"role": g.role, "scope": str(g.scope), "expires_at": g.expires_at}
                for g in principal.grants
                if g.active(now)
            ],
            "can": {a: can(principal, a, None, now) for a in ACTIONS},
            "csrf_token": csrf_token(request),
        }
    )


async def api_board(request: web.Request) -> web.StreamResponse:
    _, where = await scoped(request, "view_status")
    q = request.query
    group_by = choice("group_by", q.get("group_by"), _GROUPS) or "province"
    f = Filters.parse(q)
    svc = service_of(request)
    groups = await svc.read(
        queries.board_summary,
        group_by=group_by,
        site_filter=where,
        **f.kwargs(),
    )
    totals = await svc.read(
        queries.board_summary, group_by="nation", site_filter=where, **f.kwargs()
    )
    return json_response(
        {
            "group_by": group_by,
            "filters": f.given(),
            "totals": totals[0] if totals else None,
            "groups": groups,
        }
    )


async def api_sites(request: web.Request) -> web.StreamResponse:
    _, where = await scoped(request, "view_status")
    q = request.query
    limit, offset = paging(q)
    rows, total = await service_of(request).read(
        queries.list_sites,
        site_filter=where,
        rag=choices("rag", q.get("rag"), RAGS),
        search=clean_text("q", q.get("q")),
        limit=limit,
        offset=offset,
        **Filters.parse(q).kwargs(),
    )
    return json_response({"total": total, "limit": limit, "offset": offset, "items": rows})


_HIDDEN_SITE_COLUMNS: Final = ("device_public_key", "version", "bdseq")


async def api_site(request: web.Request) -> web.StreamResponse:
    principal, site = await authorized_site(request, "view_status")
    row = await service_of(request).read(
        queries.site_detail,
        site.site_id,
        site_filter=single_site_filter(principal, "view_status", site.site_id),
    )
    if row is None:
        raise web.HTTPNotFound()
    return json_response({k: v for k, v in row.items() if k not in _HIDDEN_SITE_COLUMNS})


async def api_site_cameras(request: web.Request) -> web.StreamResponse:
    principal, site = await authorized_site(request, "view_status")
    rows = await service_of(request).read(
        queries.site_cameras,
        site.site_id,
        site_filter=single_site_filter(principal, "view_status", site.site_id),
        include_removed=boolean("include_removed", request.query.get("include_removed")),
    )
    return json_response({"site_id": site.site_id, "items": rows})


async def api_thumbnail(request: web.Request) -> web.StreamResponse:
    camera = request.match_info["camera_id"]
    principal, site = await authorized_site(request, "view_snapshot", camera=camera)
    found = await service_of(request).read(
        queries.camera_thumbnail,
        site.site_id,
        camera,
        site_filter=single_site_filter(principal, "view_snapshot", site.site_id),
    )
    if found is None:
        raise web.HTTPNotFound()
    ts, jpeg = found
    return web.Response(
        body=jpeg,
        content_type="image/jpeg",
        headers={"X-Isocam-Thumbnail-Time": f"{ts:.3f}", "Cache-Control": "no-store"},
    )


async def api_site_outages(request: web.Request) -> web.StreamResponse:
    principal, site = await authorized_site(request, "view_outages")
    q = request.query
    since, until = window(q, default_s=86400.0)
    camera = q.get("camera_id")
    if camera is not None and not re.fullmatch(ID_PATTERN, camera):
        raise bad_request("camera_id: a camera id")
    now = time.time()
    rows = await service_of(request).read(
        queries.outage_timeline,
        since=since,
        until=until,
        site_id=site.site_id,
        camera_id=camera,
        site_filter=single_site_filter(principal, "view_outages", site.site_id),
        limit=integer("limit", q.get("limit"), 1000, 1, 10000),
        now=now,
    )
    return json_response(
        {"site_id": site.site_id, "since": since, "until": until, "now": now, "items": rows}
    )


async def api_site_events(request: web.Request) -> web.StreamResponse:
    principal, site = await authorized_site(request, "view_status")
    q = request.query
    camera = q.get("camera_id")
    if camera is not None and not re.fullmatch(ID_PATTERN, camera):
        raise bad_request("camera_id: a camera id")
    kinds = q.get("kind")
    kind_list = None
    if kinds:
        kind_list = [k for k in kinds.split(",") if k]
        if len(kind_list) > 20 or not all(re.fullmatch(r"[a-z_]{1,32}", k) for k in kind_list):
            raise bad_request("kind: comma-separated event kinds")
    rows = await service_of(request).read(
        queries.recent_events,
        site.site_id,
        site_filter=single_site_filter(principal, "view_status", site.site_id),
        camera_id=camera,
        kinds=kind_list,
        limit=integer("limit", q.get("limit"), 100, 1, 1000),
    )
    return json_response({"site_id": site.site_id, "items": rows})


async def api_site_missing(request: web.Request) -> web.StreamResponse:
    principal, site = await authorized_site(request, "view_status")
    rows = await service_of(request).read(
        queries.missing_ranges,
        site.site_id,
        site_filter=single_site_filter(principal, "view_status", site.site_id),
        limit=integer("limit", request.query.get("limit"), 100, 1, 1000),
    )
    return json_response({"site_id": site.site_id, "items": rows})


async def api_site_uptime(request: web.Request) -> web.StreamResponse:
    principal, site = await authorized_site(request, "view_outages")
    since, until = window(request.query, default_s=86400.0)
    svc = service_of(request)
    where = single_site_filter(principal, "view_outages", site.site_id)
    now = time.time()
    site_rows = await svc.read(
        queries.uptime,
        since=since,
        until=until,
        level="site",
        site_filter=where,
        site_id=site.site_id,
        now=now,
    )
    camera_rows = await svc.read(
        queries.uptime,
        since=since,
        until=until,
        level="camera",
        site_filter=where,
        site_id=site.site_id,
        now=now,
    )
    return json_response(
        {
            "site_id": site.site_id,
            "since": since,
            "until": until,
            "site": site_rows[0] if site_rows else None,
            "cameras": camera_rows,
        }
    )


async def api_faults(request: web.Request) -> web.StreamResponse:
    _, where = await scoped(request, "view_status")
    q = request.query
    limit, offset = paging(q)
    statuses = choices("status", q.get("status"), ("down", "degraded")) or ["down", "degraded"]
    rows, total = await service_of(request).read(
        queries.faulty_cameras,
        site_filter=where,
        statuses=statuses,
        limit=limit,
        offset=offset,
        **Filters.parse(q).kwargs(),
    )
    return json_response({"total": total, "limit": limit, "offset": offset, "items": rows})


async def api_outages(request: web.Request) -> web.StreamResponse:
    _, where = await scoped(request, "view_outages")
    q = request.query
    since, until = window(q, default_s=3600.0)
    f = Filters.parse(q)
    now = time.time()
    rows = await service_of(request).read(
        queries.outage_timeline,
        since=since,
        until=until,
        site_filter=where,
        province=f.province,
        district=f.district,
        operator=f.operator,
        kinds=choices("kinds", q.get("kinds"), OUTAGE_KINDS),
        site_level_only=boolean("site_level_only", q.get("site_level_only")),
        limit=integer("limit", q.get("limit"), 1000, 1, 10000),
        now=now,
    )
    return json_response({"since": since, "until": until, "now": now, "items": rows})


async def api_tickets(request: web.Request) -> web.StreamResponse:
    _, where = await scoped(request, "view_outages")
    q = request.query
    limit, offset = paging(q)
    f = Filters.parse(q)
    states = choices("state", q.get("state"), TICKET_STATES)
    rows, total = await service_of(request).read(
        queries.list_tickets,
        site_filter=where,
        states=states if states is not None else ("open", "acknowledged", "resolved"),
        province=f.province,
        district=f.district,
        operator=f.operator,
        assignee=clean_text("assignee", q.get("assignee"), 200),
        limit=limit,
        offset=offset,
    )
    return json_response({"total": total, "limit": limit, "offset": offset, "items": rows})


async def _ticket_json(request: web.Request, principal: Principal, ticket_id: int) -> Any:
    row = await service_of(request).read(
        queries.get_ticket,
        ticket_id,
        site_filter=site_filter(principal, "view_outages", time.time()),
    )
    if row is None:  # a manage_tickets-only holder: read it within that scope instead
        row = await service_of(request).read(
            queries.get_ticket,
            ticket_id,
            site_filter=site_filter(principal, "manage_tickets", time.time()),
        )
    return row


async def api_ticket(request: web.Request) -> web.StreamResponse:
    principal, _, ticket_id = await authorized_ticket(request, "view_outages")
    row = await _ticket_json(request, principal, ticket_id)
    if row is None:
        raise web.HTTPNotFound()
    return json_response(row)


TICKET_ACTIONS: Final = ("acknowledge", "assign", "note", "close")


async def change_ticket(
    request: web.Request,
    principal: Principal,
    ticket_id: int,
    action: str,
    values: dict[str, str | None],
) -> None:
    """Apply one ticket action for `principal` (already authorized on the ticket's site);
    raises :class:`~central_hub.tickets.TicketError` when the ticket's state refuses it."""
    where = site_filter(principal, "manage_tickets", time.time())
    by = principal.email
    now = time.time()

    def apply(conn: Connection) -> None:
        if action == "acknowledge":
            ticket_ops.acknowledge(
                conn, ticket_id, by=by, now=now, note=values.get("note"), site_filter=where
            )
        elif action == "assign":
            ticket_ops.assign(
                conn,
                ticket_id,
                assignee=values.get("assignee") or "",
                by=by,
                now=now,
                site_filter=where,
            )
        elif action == "note":
            ticket_ops.add_note(
                conn,
                ticket_id,
                author=by,
                text=values.get("text") or "",
                now=now,
                site_filter=where,
            )
        elif action == "close":
            ticket_ops.close(
                conn, ticket_id, by=by, now=now, note=values.get("note"), site_filter=where
            )
        else:  # pragma: no cover - routes only carry the four actions
            raise ticket_ops.TicketError(f"unknown action {action!r}")

    await service_of(request).write(apply)


def _ticket_action_handler(action: str) -> Handler:
    fields = {
        "acknowledge": ("note",),
        "assign": ("assignee",),
        "note": ("text",),
        "close": ("note",),
    }[action]
    required = {"assign": "assignee", "note": "text"}.get(action)

    async def handler(request: web.Request) -> web.StreamResponse:
        principal, _, ticket_id = await authorized_ticket(request, "manage_tickets")
        data = await json_body(request)
        values = {f: body_text(data, f, required=f == required) for f in fields}
        try:
            await change_ticket(request, principal, ticket_id, action, values)
        except ticket_ops.TicketError as exc:
            return json_response({"error": str(exc), "status": 409}, status=409)
        row = await _ticket_json(request, principal, ticket_id)
        return json_response(row)

    handler.__name__ = f"api_ticket_{action}"
    return handler


async def api_uptime(request: web.Request) -> web.StreamResponse:
    _, where = await scoped(request, "view_outages")
    q = request.query
    since, until = window(q, default_s=86400.0)
    level = choice("level", q.get("level"), _UPTIME_LEVELS) or "province"
    rows = await service_of(request).read(
        queries.uptime,
        since=since,
        until=until,
        level=level,
        site_filter=where,
        limit=integer("limit", q.get("limit"), 2000, 1, 10000),
        **Filters.parse(q).kwargs(),
    )
    return json_response({"since": since, "until": until, "level": level, "items": rows})


async def api_mttr(request: web.Request) -> web.StreamResponse:
    _, where = await scoped(request, "view_outages")
    q = request.query
    since, until = window(q, default_s=30 * 86400.0)
    group_by = choice("group_by", q.get("group_by"), _GROUPS) or "province"
    f = Filters.parse(q)
    rows = await service_of(request).read(
        queries.mttr,
        since=since,
        until=until,
        group_by=group_by,
        site_filter=where,
        province=f.province,
        operator=f.operator,
    )
    return json_response({"since": since, "until": until, "group_by": group_by, "items": rows})


async def api_openapi(request: web.Request) -> web.StreamResponse:
    return json_response(openapi_document())


# --- the alert WebSocket --------------------------------------------------------------------


def alert_visible(principal: Principal, alert: Alert, now: float) -> bool:
    """May `principal` receive `alert`? Site alerts follow `view_status` on the site (ticket
    alerts `view_outages`); alerts tied to no site go to nation-wide holders only."""
    ticket = str(alert.get("type", "")).startswith("ticket_")
    action: Action = "view_outages" if ticket else "view_status"
    site = alert.get("site")
    if not isinstance(site, dict):
        return has_nation_grant(principal, action, now)
    return can(principal, action, SiteAttrs.from_row(site), now)


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    return not origin or urlsplit(origin).netloc == request.host


async def api_alerts(request: web.Request) -> web.StreamResponse:
    """Push the user's alerts over a WebSocket until the client leaves or the session ends."""
    principal = require_login(request)
    if not _same_origin(request):  # no cross-site WebSocket hijacking with the user's cookie
        raise web.HTTPForbidden(reason="csrf")
    principal = await require(request, "view_status", None)
    svc = service_of(request)
    auth = request.app[AUTH]
    state = auth_of(request)
    token = state.session_token
    sock = AlertSocket(principal.user_id, state.session.token_hash if state.session else None)
    current: list[Principal] = [principal]

    def scope(alert: Alert) -> bool:
        ok = alert_visible(current[0], alert, time.time())
        if ok:
            svc.alerts_sent += 1
        else:
            svc.alerts_withheld += 1
        return ok

    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=4096)
    await ws.prepare(request)
    subscription = svc.hub.alerts.subscribe(scope)
    svc.sockets.add(sock)

    async def still_allowed() -> bool:
        if token is None:
            return False
        info = await asyncio.to_thread(auth.store.session, token)
        if info is None or info.stage != "full":
            return False
        fresh = await asyncio.to_thread(auth.store.load_principal, info.user_id)
        if fresh is None or not can(fresh, "view_status", None, time.time()):
            return False
        current[0] = fresh
        return True

    async def watch() -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECHECK_SECONDS):
                    await sock.recheck.wait()
            sock.recheck.clear()
            if not await still_allowed():
                subscription.close()
                await ws.close(code=4401, message=b"session ended")
                return

    async def read_client() -> None:
        async for msg in ws:  # the client sends nothing we need; reading notices its close
            if msg.type == WSMsgType.ERROR:
                break
        subscription.close()

    tasks = [asyncio.create_task(watch()), asyncio.create_task(read_client())]
    try:
        await ws.send_str(dumps({"type": "hello", "user": principal.email, "at": time.time()}))
        async for alert in subscription:
            if ws.closed:
                break
            await ws.send_str(dumps(alert))
    except ConnectionResetError:
        pass
    finally:
        subscription.close()
        svc.sockets.discard(sock)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await ws.close()
    return ws


# --- the route table and the OpenAPI document -----------------------------------------------


@dataclass(frozen=True)
class Param:
    """One query (or path) parameter, for the router's validation and the document."""

    name: str
    schema: dict[str, Any]
    description: str
    where: str = "query"
    required: bool = False


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # OpenAPI form: /api/sites/{site_id}
    handler: Handler
    operation_id: str
    summary: str
    action: Action | None
    params: tuple[Param, ...] = ()
    response: dict[str, Any] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    tag: str = "board"
    media: str = "application/json"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _page_of(item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["total", "limit", "offset", "items"],
        "properties": {
            "total": {"type": "integer", "description": "rows matching, all pages"},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
            "items": {"type": "array", "items": _ref(item)},
        },
    }


def _list_of(item: str, **extra: Any) -> dict[str, Any]:
    props: dict[str, Any] = {"items": {"type": "array", "items": _ref(item)}}
    props.update(extra)
    return {"type": "object", "required": ["items"], "properties": props}


_STR = {"type": "string"}
_NUM = {"type": "number"}
_TIME = {"type": "number", "description": "UNIX seconds"}
_SITE_PATH = Param(
    "site_id", {"type": "string", "pattern": f"^{ID_PATTERN}$"}, "site id", "path", True
)
_CAMERA_PATH = Param(
    "camera_id", {"type": "string", "pattern": f"^{ID_PATTERN}$"}, "camera id", "path", True
)
_TICKET_PATH = Param("ticket_id", {"type": "integer", "minimum": 0}, "ticket number", "path", True)
_FILTERS = (
    Param("province", {"type": "string", "maxLength": MAX_TEXT}, "only this province"),
    Param("district", {"type": "string", "maxLength": MAX_TEXT}, "only this district"),
    Param("operator", {"type": "string", "enum": list(OPERATORS)}, "only this operator"),
    Param("kind", {"type": "string", "enum": list(SITE_KINDS)}, "only this kind of site"),
    Param("authority", {"type": "string", "enum": list(AUTHORITIES)}, "only this authority"),
)
_PAGING = (
    Param("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}, "page size"),
    Param("offset", {"type": "integer", "minimum": 0, "default": 0}, "rows to skip"),
)
_WINDOW = (
    Param(
        "since",
        _TIME,
        "start of the period (default: `until` minus a day; an hour for "
        "/api/outages, 30 days for /api/mttr)",
    ),
    Param("until", _TIME, "end of the period (default: now); at most 400 days after `since`"),
)
_TICKET_BODY: dict[str, dict[str, Any]] = {
    "acknowledge": {
        "type": "object",
        "properties": {"note": {"type": "string", "maxLength": 4000}},
    },
    "assign": {
        "type": "object",
        "required": ["assignee"],
        "properties": {"assignee": {"type": "string", "maxLength": 200}},
    },
    "note": {
        "type": "object",
        "required": ["text"],
        "properties": {"text": {"type": "string", "maxLength": 4000}},
    },
    "close": {"type": "object", "properties": {"note": {"type": "string", "maxLength": 4000}}},
}
_TICKET_SUMMARY = {
    "acknowledge": "Take a ticket (open → acknowledged)",
    "assign": "Give a ticket to a person or team",
    "note": "Add a note to a ticket's history",
    "close": "Confirm the repair (resolved → closed; refused while the outage goes on)",
}

ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/api/me",
        api_me,
        "getMe",
        "Who is logged in, what it may do, its CSRF token",
        None,
        response=_ref("Me"),
        tag="session",
    ),
    Route(
        "GET",
        "/api/board",
        api_board,
        "getBoard",
        "Site and camera counts with red/amber/green per group (the board's tree)",
        "view_status",
        (
            Param(
                "group_by",
                {"type": "string", "enum": list(_GROUPS), "default": "province"},
                "nation, operator, province or district",
            ),
            *_FILTERS,
        ),
        response={
            "type": "object",
            "required": ["group_by", "groups"],
            "properties": {
                "group_by": _STR,
                "filters": {"type": "object"},
                "totals": {"oneOf": [_ref("BoardGroup")], "nullable": True},
                "groups": {"type": "array", "items": _ref("BoardGroup")},
            },
        },
    ),
    Route(
        "GET",
        "/api/sites",
        api_sites,
        "listSites",
        "Sites with their state, worst first",
        "view_status",
        (
            *_FILTERS,
            Param("rag", _STR, "comma-separated colours: red, amber, green"),
            Param("q", {"type": "string", "maxLength": MAX_TEXT}, "site id or name contains"),
            *_PAGING,
        ),
        response=_page_of("SiteRow"),
    ),
    Route(
        "GET",
        "/api/sites/{site_id}",
        api_site,
        "getSite",
        "One site: attributes, state, box health, open outages and tickets",
        "view_status",
        (_SITE_PATH,),
        response=_ref("SiteDetail"),
    ),
    Route(
        "GET",
        "/api/sites/{site_id}/cameras",
        api_site_cameras,
        "listSiteCameras",
        "The site's cameras with status, faults, last health sample",
        "view_status",
        (_SITE_PATH, Param("include_removed", {"type": "boolean"}, "also cameras removed")),
        response=_list_of("Camera", site_id=_STR),
    ),
    Route(
        "GET",
        "/api/sites/{site_id}/cameras/{camera_id}/thumbnail",
        api_thumbnail,
        "getCameraThumbnail",
        "The camera's latest thumbnail (JPEG). Footage: needs view_snapshot; audited",
        "view_snapshot",
        (_SITE_PATH, _CAMERA_PATH),
        response={"type": "string", "format": "binary"},
        media="image/jpeg",
    ),
    Route(
        "GET",
        "/api/sites/{site_id}/outages",
        api_site_outages,
        "listSiteOutages",
        "The site's outages overlapping a period (the timeline chart)",
        "view_outages",
        (
            _SITE_PATH,
            *_WINDOW,
            Param("camera_id", _STR, "one camera (and its site's outages)"),
            Param("limit", {"type": "integer", "minimum": 1, "maximum": 10000}, "rows at most"),
        ),
        response=_list_of("Outage", site_id=_STR, since=_TIME, until=_TIME, now=_TIME),
    ),
    Route(
        "GET",
        "/api/sites/{site_id}/events",
        api_site_events,
        "listSiteEvents",
        "The site's latest events as the edge sent them",
        "view_status",
        (
            _SITE_PATH,
            Param("camera_id", _STR, "one camera"),
            Param("kind", _STR, "comma-separated event kinds"),
            Param("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "rows at most"),
        ),
        response=_list_of("Event", site_id=_STR),
    ),
    Route(
        "GET",
        "/api/sites/{site_id}/missing",
        api_site_missing,
        "listSiteMissingEvents",
        "Holes in the site's event sequence (events never received)",
        "view_status",
        (
            _SITE_PATH,
            Param("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "rows at most"),
        ),
        response=_list_of("MissingRange", site_id=_STR),
    ),
    Route(
        "GET",
        "/api/sites/{site_id}/uptime",
        api_site_uptime,
        "getSiteUptime",
        "Uptime of the site and of each camera over a period",
        "view_outages",
        (_SITE_PATH, *_WINDOW),
        response={
            "type": "object",
            "properties": {
                "site_id": _STR,
                "since": _TIME,
                "until": _TIME,
                "site": {"oneOf": [_ref("Uptime")], "nullable": True},
                "cameras": {"type": "array", "items": _ref("Uptime")},
            },
        },
    ),
    Route(
        "GET",
        "/api/faults",
        api_faults,
        "listFaults",
        "Cameras with a current fault across the scope, longest outage first",
        "view_status",
        (*_FILTERS, Param("status", _STR, "comma-separated: down, degraded"), *_PAGING),
        response=_page_of("Fault"),
    ),
    Route(
        "GET",
        "/api/outages",
        api_outages,
        "listOutages",
        "Outages overlapping a period across the scope",
        "view_outages",
        (
            *_FILTERS[:3],
            *_WINDOW,
            Param("kinds", _STR, "comma-separated: " + ", ".join(OUTAGE_KINDS)),
            Param("site_level_only", {"type": "boolean"}, "only whole-site outages"),
            Param("limit", {"type": "integer", "minimum": 1, "maximum": 10000}, "rows at most"),
        ),
        response=_list_of("Outage", since=_TIME, until=_TIME, now=_TIME),
    ),
    Route(
        "GET",
        "/api/tickets",
        api_tickets,
        "listTickets",
        "Repair tickets, open first, oldest first within a state",
        "view_outages",
        (
            *_FILTERS[:3],
            Param(
                "state",
                _STR,
                "comma-separated: " + ", ".join(TICKET_STATES) + " (default: all but closed)",
            ),
            Param("assignee", _STR, "only this assignee"),
            *_PAGING,
        ),
        response=_page_of("Ticket"),
        tag="tickets",
    ),
    Route(
        "GET",
        "/api/tickets/{ticket_id}",
        api_ticket,
        "getTicket",
        "One ticket with its outage and history",
        "view_outages",
        (_TICKET_PATH,),
        response=_ref("TicketDetail"),
        tag="tickets",
    ),
    *(
        Route(
            "POST",
            f"/api/tickets/{{ticket_id}}/{a}",
            _ticket_action_handler(a),
            f"ticket{a.capitalize()}",
            _TICKET_SUMMARY[a],
            "manage_tickets",
            (_TICKET_PATH,),
            response=_ref("TicketDetail"),
            body=_TICKET_BODY[a],
            tag="tickets",
        )
        for a in TICKET_ACTIONS
    ),
    Route(
        "GET",
        "/api/uptime",
        api_uptime,
        "getUptime",
        "Camera and site uptime % per group over a period, from the outage ledger",
        "view_outages",
        (
            *_FILTERS,
            *_WINDOW,
            Param("level", {"type": "string", "enum": list(_UPTIME_LEVELS)}, "grouping"),
            Param("limit", {"type": "integer", "minimum": 1, "maximum": 10000}, "rows at most"),
        ),
        response=_list_of("Uptime", since=_TIME, until=_TIME, level=_STR),
        tag="reports",
    ),
    Route(
        "GET",
        "/api/mttr",
        api_mttr,
        "getMttr",
        "Mean time to repair of the tickets resolved in a period, per group",
        "view_outages",
        (
            Param("group_by", {"type": "string", "enum": list(_GROUPS)}, "grouping"),
            *_FILTERS[:1],
            *_FILTERS[2:3],
            *_WINDOW,
        ),
        response=_list_of("Mttr", since=_TIME, until=_TIME, group_by=_STR),
        tag="reports",
    ),
    Route(
        "GET",
        "/api/openapi.json",
        api_openapi,
        "getOpenApi",
        "This document",
        None,
        response={"type": "object"},
        tag="session",
    ),
    Route(
        "GET",
        "/api/alerts",
        api_alerts,
        "alertStream",
        "WebSocket: alerts within the user's scope, one JSON object per message "
        "(first a `hello`). Connect with an Upgrade request; closes with 4401 when the "
        "session ends.",
        "view_status",
        response=_ref("Alert"),
        tag="alerts",
    ),
)


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


_SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["error", "status"],
        "properties": {"error": _STR, "status": {"type": "integer"}},
    },
    "Me": {
        "type": "object",
        "required": ["user_id", "email", "csrf_token"],
        "properties": {
            "user_id": {"type": "integer"},
            "email": _STR,
            "full_name": _STR,
            "grants": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"role": _STR, "scope": _STR, "expires_at": _nullable(_TIME)},
                },
            },
            "can": {"type": "object", "additionalProperties": {"type": "boolean"}},
            "csrf_token": {"type": "string", "description": "send it back in X-CSRF-Token"},
        },
    },
    "BoardGroup": {
        "type": "object",
        "properties": {
            "operator": _STR,
            "province": _STR,
            "district": _nullable(_STR),
            **{k: {"type": "integer"} for k in queries.BOARD_COUNTS},
            "rag": {"type": "string", "enum": list(RAGS)},
        },
    },
    "SiteRow": {
        "type": "object",
        "properties": {
            "site_id": _STR,
            "name": _STR,
            "province": _STR,
            "district": _nullable(_STR),
            "kind": _STR,
            "authority": _STR,
            "operator": _STR,
            "online": _nullable({"type": "boolean"}),
            "rag": {"type": "string", "enum": list(RAGS)},
            "state_since": _nullable(_TIME),
            "last_seen_at": _nullable(_TIME),
            "cameras_total": {"type": "integer"},
            "cameras_down": {"type": "integer"},
            "cameras_degraded": {"type": "integer"},
            "cameras_unmonitored": {"type": "integer"},
            "missing_events": {"type": "integer"},
            "disk_free_bytes": _nullable({"type": "integer"}),
            "forecast_days": _nullable(_NUM),
            "disk_level": _nullable(_STR),
            "clock_level": _nullable(_STR),
            "agent_version": _nullable(_STR),
            "inventory_mismatch": _nullable(_STR),
        },
    },
    "SiteDetail": {
        "allOf": [
            _ref("SiteRow"),
            {
                "type": "object",
                "properties": {
                    "enabled": {"type": "boolean"},
                    "enrolled_at": _TIME,
                    "open_outages": {"type": "integer"},
                    "open_tickets": {"type": "integer"},
                    "missing_ranges": {"type": "integer"},
                    "now": _TIME,
                },
            },
        ]
    },
    "Camera": {
        "type": "object",
        "properties": {
            "site_id": _STR,
            "camera_id": _STR,
            "name": _nullable(_STR),
            "status": {"type": "string", "enum": list(CAMERA_STATUSES)},
            "faults": {
                "type": "array",
                "items": _STR,
                "description": "codes such as camera_down:timeout, image:black",
            },
            "outage_since": _nullable(_TIME),
            "down_since": _nullable(_TIME),
            "fps": _nullable(_NUM),
            "bitrate_kbps": _nullable(_NUM),
            "connected": _nullable({"type": "boolean"}),
            "recording": _nullable(_STR),
            "thumbnail_ts": _nullable(_TIME),
        },
    },
    "Fault": {
        "type": "object",
        "properties": {
            "site_id": _STR,
            "site_name": _STR,
            "province": _STR,
            "district": _nullable(_STR),
            "operator": _STR,
            "camera_id": _STR,
            "camera_name": _nullable(_STR),
            "status": _STR,
            "faults": {"type": "array", "items": _STR},
            "outage_since": _nullable(_TIME),
        },
    },
    "Outage": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "site_id": _STR,
            "site_name": _STR,
            "camera_id": _nullable(_STR),
            "kind": {"type": "string", "enum": list(OUTAGE_KINDS)},
            "cause": _STR,
            "started_at": _TIME,
            "ended_at": _nullable(_TIME),
            "end_reason": _nullable(_STR),
            "footage_lost": {"type": "boolean"},
            "footage_lost_s": _NUM,
            "duration_s": _NUM,
            "ticket_id": _nullable({"type": "integer"}),
            "ticket_state": _nullable(_STR),
        },
    },
    "Event": {
        "type": "object",
        "properties": {
            "epoch": {"type": "integer"},
            "seq": {"type": "integer"},
            "kind": _STR,
            "camera_id": _nullable(_STR),
            "ts": _TIME,
            "received_at": _TIME,
            "event": {"type": "object", "description": "the event as the edge sent it"},
        },
    },
    "MissingRange": {
        "type": "object",
        "properties": {
            "epoch": {"type": "integer"},
            "first_seq": {"type": "integer"},
            "last_seq": {"type": "integer"},
            "count": {"type": "integer"},
            "detected_at": _TIME,
        },
    },
    "Ticket": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "state": {"type": "string", "enum": list(TICKET_STATES)},
            "site_id": _STR,
            "site_name": _STR,
            "province": _STR,
            "district": _nullable(_STR),
            "operator": _STR,
            "camera_id": _nullable(_STR),
            "assignee": _nullable(_STR),
            "opened_at": _TIME,
            "acknowledged_at": _nullable(_TIME),
            "acknowledged_by": _nullable(_STR),
            "resolved_at": _nullable(_TIME),
            "closed_at": _nullable(_TIME),
            "closed_by": _nullable(_STR),
            "outage_id": {"type": "integer"},
            "kind": _STR,
            "cause": _STR,
            "started_at": _TIME,
            "ended_at": _nullable(_TIME),
            "footage_lost": {"type": "boolean"},
            "duration_s": _NUM,
        },
    },
    "TicketDetail": {
        "allOf": [
            _ref("Ticket"),
            {
                "type": "object",
                "properties": {
                    "notes": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "at": _TIME,
                                "author": _STR,
                                "action": _STR,
                                "text": _STR,
                            },
                        },
                    }
                },
            },
        ]
    },
    "Uptime": {
        "type": "object",
        "properties": {
            "cameras": {"type": "integer"},
            "monitored_s": _NUM,
            "down_s": _NUM,
            "uptime_pct": _nullable(_NUM),
            "sites": {"type": "integer"},
            "site_uptime_pct": _nullable(_NUM),
        },
    },
    "Mttr": {
        "type": "object",
        "properties": {
            "tickets": {"type": "integer"},
            "mttr_s": _nullable(_NUM),
            "max_s": _nullable(_NUM),
            "closed": {"type": "integer"},
            "mean_to_close_s": _nullable(_NUM),
            "footage_lost": {"type": "integer"},
        },
    },
    "Alert": {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": _STR,
            "severity": {"type": "string", "enum": ["info", "warning", "critical"]},
            "at": _TIME,
            "site_id": _nullable(_STR),
            "camera_id": _nullable(_STR),
            "site": _nullable({"type": "object"}),
            "site_name": _nullable(_STR),
            "text_vi": _STR,
            "text_en": _STR,
        },
    },
}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.0 document of :data:`ROUTES`."""
    paths: dict[str, dict[str, Any]] = {}
    errors = {
        "400": "bad parameter",
        "401": "not logged in",
        "403": "not allowed (outside the scope, or the role lacks the action); audited",
        "404": "no such object",
    }
    for r in ROUTES:
        op: dict[str, Any] = {
            "operationId": r.operation_id,
            "summary": r.summary,
            "tags": [r.tag],
            "parameters": [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.required or p.where == "path",
                    "description": p.description,
                    "schema": p.schema,
                }
                for p in r.params
            ],
            "responses": {
                "200": {"description": "OK", "content": {r.media: {"schema": r.response}}},
                **{
                    code: {
                        "description": text,
                        "content": {"application/json": {"schema": _ref("Error")}},
                    }
                    for code, text in errors.items()
                },
            },
        }
        if r.action is not None:
            op["description"] = f"Needs the `{r.action}` right ({ACTIONS[r.action].en})."
            op["security"] = [{"session": []}]
        else:
            op["security"] = [] if r.operation_id == "getOpenApi" else [{"session": []}]
        if r.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": r.body}},
            }
            op["parameters"].append(
                {
                    "name": "X-CSRF-Token",
                    "in": "header",
                    "required": True,
                    "description": "the session's CSRF token (GET /api/me)",
                    "schema": {"type": "string"},
                }
            )
            op["responses"]["409"] = {
                "description": "the ticket's state does not allow this",
                "content": {"application/json": {"schema": _ref("Error")}},
            }
        if r.operation_id == "alertStream":
            op["responses"]["101"] = {"description": "switched to the WebSocket protocol"}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "isocam central hub API",
            "version": "1",
            "description": "What the NOC board shows, as JSON. Every answer is limited to the "
            "sites the logged-in user's grants cover; see docs/board.md.",
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": "session"},
            {"name": "board"},
            {"name": "tickets"},
            {"name": "reports"},
            {"name": "alerts"},
        ],
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "isocam_session",
                    "description": "the session cookie set by POST /login (named "
                    "__Host-isocam_session over https)",
                }
            },
        },
    }


def router_path(path: str) -> str:
    """The aiohttp route for an OpenAPI path (parameters get their patterns)."""
    return (
        path.replace("{site_id}", f"{{site_id:{ID_PATTERN}}}")
        .replace("{camera_id}", f"{{camera_id:{ID_PATTERN}}}")
        .replace("{ticket_id}", f"{{ticket_id:{TICKET_ID_PATTERN}}}")
    )


def setup_api(app: web.Application, service: BoardService) -> None:
    """Mount every route of :data:`ROUTES` and the revocation hook of the alert sockets."""
    for r in ROUTES:
        app.router.add_route(r.method, router_path(r.path), r.handler, name=r.operation_id)

    async def revocations(app: web.Application) -> AsyncIterator[None]:
        # Subscribed from the running loop (revocations arrive from worker threads).
        unsubscribe = subscribe_revocations(app, service.on_revocation)
        yield
        unsubscribe()

    app.cleanup_ctx.append(revocations)
