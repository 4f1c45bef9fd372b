"""The NOC board: server-rendered pages over :mod:`central_hub.queries`, live through alerts.

``setup_board(app, hub)`` mounts, besides the JSON API of :mod:`central_hub.api`:

* ``/board`` — the country as a tree: provinces → districts → sites, with site and camera
  counts and red/amber/green, filtered by operator, province, district and kind; the sites of
  the current level one page at a time (worst first), the current faults and the open tickets.
  All counting happens in SQL over maintained counters: the browser never receives more than a
  page, whether the scope holds 16 cameras or 32,000.
* ``/board/sites/{site}`` — one site: its state and box health, its cameras (thumbnail for
  users who may see pictures; a link to live view for those who may watch), current faults,
  the outage timeline (a chart drawn by ``static/board.js`` from ``/api/sites/{site}/outages``,
  with the same rows as a table), its tickets with their forms.
* ``/board/tickets`` and ``/board/tickets/{id}`` — tickets, their history, and the forms to
  acknowledge, assign, annotate and close them (POST with the CSRF token).
* ``/board/uptime`` (and its CSV) — uptime % and MTTR per province, district, site, camera
  over calendar days: :mod:`central_hub.board_uptime`. The site page shows the site's uptime
  over 24 h / 7 d / 30 d and each camera's over the chosen period.

Every handler authorizes on the server exactly as the API does (``require`` for objects,
``site_filter`` for lists). Open pages subscribe to ``/api/alerts``; an alert makes the page
re-read itself and swap the regions that changed (``data-live``), so a fault shows within
seconds without a reload and without any state kept in the browser.

Pages are Vietnamese first (``?lang=en`` switches, see :mod:`central_hub.i18n`); the page's
texts for the script travel in ``data-*`` attributes (the CSP forbids inline scripts).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlencode

import sqlalchemy as sa
from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram
from sqlalchemy.engine import Connection

from central_hub import i18n, queries
from central_hub.alerts import duration_text
from central_hub.api import (
    BOARD,
    ID_PATTERN,
    TICKET_ACTIONS,
    TICKET_ID_PATTERN,
    BoardService,
    Filters,
    authorized_site,
    authorized_ticket,
    change_ticket,
    choice,
    integer,
    list_filter,
    scoped,
    service_of,
    setup_api,
    single_site_filter,
)
from central_hub.policy import Principal, can
from central_hub.sites import SiteAttrs, sites
from central_hub.status import TICKET_STATES
from central_hub.status import tickets as tickets_table
from central_hub.tickets import MAX_NAME, MAX_NOTE, TicketError
from central_hub.web_auth import lang_of, render

if TYPE_CHECKING:
    from central_hub.app import Hub

PAGE_SIZE: Final = 50
FAULTS_SHOWN: Final = 50
#: The outage timeline's periods (query ``period``), in seconds.
PERIODS: Final[dict[str, float]] = {
    "1h": 3600.0,
    "24h": 86400.0,
    "7d": 7 * 86400.0,
    "30d": 30 * 86400.0,
}
VN_TZ = timezone(timedelta(hours=7), "ICT")
#: Uptime colours, for camera uptime % and site connectivity % alike (docs/board.md): at or
#: above UPTIME_GREEN_PCT green, at or above UPTIME_AMBER_PCT amber, below it red.
UPTIME_GREEN_PCT: Final = 99.5
UPTIME_AMBER_PCT: Final = 98.0
#: Uptime bars span this floor to 100 %: on a 0–100 bar 99.9 % and 98 % (the difference the
#: NOC is judged on) would look the same; anything under the floor is an empty red bar.
UPTIME_BAR_FLOOR_PCT: Final = 90.0
#: The site page's uptime figures (keys of PERIODS), always shown whatever its ``period``.
SITE_UPTIME_WINDOWS: Final = ("24h", "7d", "30d")
#: Request header board.js sends when it re-reads the page for a live refresh.
REFRESH_HEADER: Final = "X-Board-Refresh"


def setup_board(app: web.Application, hub: Hub) -> BoardService:
    """Mount the board pages, the JSON API and the alert socket on `app` (after
    ``setup_auth``); register the board's metrics on the app's registry if it has one."""
    service = BoardService(hub)
    app[BOARD] = service
    setup_api(app, service)
    r = app.router
    r.add_get("/board", board_page, name="board")
    r.add_get(f"/board/sites/{{site_id:{ID_PATTERN}}}", site_page, name="board_site")
    r.add_get("/board/tickets", tickets_page, name="board_tickets")
    from central_hub.board_uptime import add_uptime_routes  # late: it imports this module

    add_uptime_routes(r)
    r.add_get(f"/board/tickets/{{ticket_id:{TICKET_ID_PATTERN}}}", ticket_page, name="board_ticket")
    r.add_post(
        f"/board/tickets/{{ticket_id:{TICKET_ID_PATTERN}}}/{{action:{'|'.join(TICKET_ACTIONS)}}}",
        ticket_post,
        name="board_ticket_action",
    )
    registry = _registry_of(app)
    if registry is not None:
        _register_metrics(app, registry, service)
    return service


# --- metrics --------------------------------------------------------------------------------


def _registry_of(app: web.Application) -> CollectorRegistry | None:
    from central_hub.app import METRICS  # late: app imports this module while building

    return app.get(METRICS)


class _BoardCollector:
    """Open alert sockets and alerts delivered / withheld by scope."""

    def __init__(self, service: BoardService) -> None:
        self._s = service

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self._s
        yield GaugeMetricFamily(
            "isocam_hub_alert_sockets", "Open alert WebSockets (NOC pages)", value=len(s.sockets)
        )
        yield CounterMetricFamily(
            "isocam_hub_alerts_sent", "Alerts sent to NOC pages", value=s.alerts_sent
        )
        yield CounterMetricFamily(
            "isocam_hub_alerts_withheld",
            "Alerts not sent to a NOC page because the site is outside its user's scope",
            value=s.alerts_withheld,
        )
        published = CounterMetricFamily(
            "isocam_hub_alerts_published", "Alerts published, by type", labels=["type"]
        )
        for kind, n in s.hub.alerts.published.items():
            published.add_metric([kind], n)
        yield published


def _register_metrics(app: web.Application, registry: CollectorRegistry, svc: BoardService) -> None:
    registry.register(_BoardCollector(svc))
    latency = Histogram(
        "isocam_hub_web_request_seconds",
        "Board and API request latency, by route",
        ["route", "method"],
        registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
    )

    @web.middleware
    async def timing(request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith(("/board", "/api/")) or request.path == "/api/alerts":
            return await handler(request)
        started = time.perf_counter()
        try:
            return await handler(request)
        finally:
            info = request.match_info.route.resource
            route = info.canonical if info is not None else "unmatched"
            latency.labels(route, request.method).observe(time.perf_counter() - started)

    app.middlewares.append(timing)


# --- helpers for the templates --------------------------------------------------------------


def fmt_clock(ts: float | None) -> str:
    """HH:MM:SS in Vietnam time (the date is shown where it matters)."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, VN_TZ).strftime("%H:%M:%S")


def fmt_duration(seconds: float | None, lang: str) -> str:
    if seconds is None:
        return ""
    vi, en = duration_text(seconds)
    return en if lang == "en" else vi


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def fault_text(code: str, lang: str) -> str:
    """`camera_down:timeout` → "Mất tín hiệu (timeout)"."""
    head, _, detail = code.partition(":")
    key = f"board.fault.{head}"
    label = i18n.t(key, lang) if key in i18n.MESSAGES else head
    if head == "image":
        ikey = f"board.image.{detail}"
        return i18n.t(ikey, lang) if ikey in i18n.MESSAGES else f"{label}: {detail}"
    return f"{label} ({detail})" if detail else label


def uptime_colour(pct: float | None) -> str:
    """green / amber / red by :data:`UPTIME_GREEN_PCT` and :data:`UPTIME_AMBER_PCT`; "none"
    when nothing was monitored."""
    if pct is None:
        return "none"
    return "green" if pct >= UPTIME_GREEN_PCT else "amber" if pct >= UPTIME_AMBER_PCT else "red"


def uptime_bar(pct: float | None) -> float:
    """The bar's filled share in % of its width (its scale starts at UPTIME_BAR_FLOOR_PCT)."""
    if pct is None:
        return 0.0
    share = (pct - UPTIME_BAR_FLOOR_PCT) / (100.0 - UPTIME_BAR_FLOOR_PCT)
    return round(100.0 * min(1.0, max(0.0, share)), 1)


def fmt_pct(pct: float | None, lang: str) -> str:
    """`99,87 %` / `99.87 %`, truncated rather than rounded (99.996 % is not shown as 100 %,
    which a report would read as "no outage at all"); an em dash when nothing was monitored."""
    if pct is None:
        return "—"
    text = f"{math.floor(pct * 100 + 1e-6) / 100:.2f} %"
    return text if lang == "en" else text.replace(".", ",")


def worst_first(row: dict[str, Any]) -> tuple[bool, float, float]:
    """Sort key of uptime rows: lowest camera uptime first, then lowest site connectivity;
    rows with neither figure (nothing monitored in the period) last."""
    up, site = row.get("uptime_pct"), row.get("site_uptime_pct")
    return (
        up is None and site is None,
        101.0 if up is None else float(up),
        101.0 if site is None else float(site),
    )


def _text(key: str, lang: str, fallback: str) -> str:
    return i18n.t(key, lang) if key in i18n.MESSAGES else fallback


def url(path: str, params: dict[str, Any]) -> str:
    """`path` with the non-empty `params` as a query string."""
    clean = {k: v for k, v in params.items() if v not in (None, "", False)}
    return path + ("?" + urlencode(clean) if clean else "")


def page_helpers(request: web.Request) -> dict[str, Any]:
    lang = lang_of(request)
    return {
        "fmt_clock": fmt_clock,
        "dur": lambda s: fmt_duration(s, lang),
        "fmt_bytes": fmt_bytes,
        "pct": lambda p: fmt_pct(p, lang),
        "up_colour": uptime_colour,
        "up_bar": uptime_bar,
        "fault_text": lambda c: fault_text(c, lang),
        "word": lambda group, value: _text(f"board.{group}.{value}", lang, str(value)),
        "url": url,
        "now": time.time(),
    }


@dataclass(frozen=True)
class Pager:
    """One page of `total` rows."""

    page: int
    size: int
    total: int

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.size

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.size))

    @property
    def first(self) -> int:
        return min(self.total, self.offset + 1)

    @property
    def last(self) -> int:
        return min(self.total, self.offset + self.size)


def province_choices(conn: Connection, where: Any) -> list[str]:
    """Provinces with an enabled site in the scope (the filter's choices)."""
    q = (
        sa.select(sites.c.province)
        .where(sa.true() if where is None else where, sites.c.enabled.is_(True))
        .distinct()
        .order_by(sites.c.province)
        .limit(500)
    )
    return [r[0] for r in conn.execute(q)]


def district_choices(conn: Connection, where: Any, province: str) -> list[str]:
    q = (
        sa.select(sites.c.district)
        .where(
            sa.true() if where is None else where,
            sites.c.enabled.is_(True),
            sites.c.province == province,
            sites.c.district.is_not(None),
        )
        .distinct()
        .order_by(sites.c.district)
        .limit(500)
    )
    return [r[0] for r in conn.execute(q)]


def _totals(groups: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The board_summary "nation" row of the scope, from the rows of a partition of it."""
    if not groups:
        return None
    out: dict[str, Any] = {k: sum(int(g[k]) for g in groups) for k in queries.BOARD_COUNTS}
    out["rag"] = "red" if out["red"] else "amber" if out["amber"] else "green"
    return out


def _tickets_not_closed(conn: Connection, where: Any, f: Filters) -> int:
    """How many tickets are open, acknowledged or resolved in the scope and filters.

    Counted here rather than with list_tickets (which also joins and sorts a page): without a
    scope or a filter the sites table is not even joined (measured on 24,000 tickets: 0.2 ms
    against 9 ms)."""
    q = sa.select(sa.func.count()).select_from(tickets_table)
    q = q.where(tickets_table.c.state.in_(["open", "acknowledged", "resolved"]))
    filters = {"province": f.province, "district": f.district, "operator": f.operator}
    if where is not None or any(v is not None for v in filters.values()):
        q = q.join(sites, sites.c.site_id == tickets_table.c.site_id)
        if where is not None:
            q = q.where(where)
        for name, value in filters.items():
            if value is not None:
                q = q.where(sites.c[name] == value)
    return int(conn.execute(q).scalar_one())


# --- the board ------------------------------------------------------------------------------


async def board_page(request: web.Request) -> web.StreamResponse:
    principal, where = await scoped(request, "view_status")
    q = request.query
    f = Filters.parse(q)
    if f.district is not None and f.province is None:
        f = Filters(operator=f.operator, kind=f.kind, authority=f.authority)
    rag = choice("rag", q.get("rag"), ("red", "amber", "green"))
    svc = service_of(request)
    page_no = integer("page", q.get("page"), 1, 1, 100_000)
    now = time.time()

    data = await svc.read(
        board_data,
        principal=principal,
        where=where,
        f=f,
        rag=rag,
        page_no=page_no,
        now=now,
    )
    pager = Pager(page_no, PAGE_SIZE, data.pop("site_total"))
    base = {**f.given(), "rag": rag}
    return render(
        request,
        "board/board.html",
        f=f,
        rag=rag,
        base=base,
        pager=pager,
        **data,
        **page_helpers(request),
    )


def board_data(
    conn: Connection,
    *,
    principal: Principal,
    where: Any,
    f: Filters,
    rag: str | None,
    page_no: int,
    now: float,
) -> dict[str, Any]:
    """Everything the board page shows, for `principal` whose list scope is `where`:
    the counts of the current level of the tree, one page of sites, the current faults."""
    level = "province" if f.province is None else "district" if f.district is None else "site"
    can_outages = can(principal, "view_outages", None, now)
    kw = f.kwargs()
    if level == "site":
        groups: list[dict[str, Any]] = []
        found = queries.board_summary(conn, group_by="nation", site_filter=where, **kw)
        totals = found[0] if found else None
    else:
        groups = queries.board_summary(
            conn,
            group_by="province" if level == "province" else "district",
            site_filter=where,
            **kw,
        )
        totals = _totals(groups)  # the groups partition the scope: no second query
    site_rows, site_total = queries.list_sites(
        conn,
        site_filter=where,
        rag=[rag] if rag else None,
        limit=PAGE_SIZE,
        offset=(page_no - 1) * PAGE_SIZE,
        **kw,
    )
    fault_rows, fault_total = queries.faulty_cameras(
        conn,
        site_filter=where,
        limit=FAULTS_SHOWN,
        province=f.province,
        district=f.district,
        operator=f.operator,
        kind=f.kind,
        authority=f.authority,
    )
    tickets_open = None
    if can_outages:
        tickets_open = _tickets_not_closed(conn, list_filter(principal, "view_outages", now), f)
    return {
        "level": level,
        "can_outages": can_outages,
        "totals": totals,
        "groups": groups,
        "site_rows": site_rows,
        "site_total": site_total,
        "fault_rows": fault_rows,
        "fault_total": fault_total,
        "tickets_open": tickets_open,
        "provinces": (
            [g["province"] for g in groups]
            if level == "province" and not f.given()
            else province_choices(conn, where)
        ),
        "districts": district_choices(conn, where, f.province) if f.province else [],
    }


# --- one site -------------------------------------------------------------------------------


async def site_page(request: web.Request) -> web.StreamResponse:
    principal, site = await authorized_site(request, "view_status")
    svc = service_of(request)
    now = time.time()
    period = choice("period", request.query.get("period"), PERIODS) or "24h"
    since = now - PERIODS[period]
    can_tickets = can(principal, "manage_tickets", site, now)
    can_snapshot = can(principal, "view_snapshot", site, now)
    can_live = can(principal, "view_live", site, now)

    # A live refresh (board.js) leaves the uptime figures as they are: they move slowly, and
    # their four ledger sums would double the cost of every refresh (measured ~12 ms of 16 on
    # SQLite, ~17 of 24 on PostgreSQL, 2,000 sites).
    refresh = request.headers.get(REFRESH_HEADER) == "1"
    data = await svc.read(
        site_data, principal=principal, site=site, since=since, now=now, with_uptime=not refresh
    )
    if data["detail"] is None:
        raise web.HTTPNotFound()
    return render(
        request,
        "board/site.html",
        site=site,
        period=period,
        periods=list(PERIODS),
        since=since,
        until=now,
        can_outages=data.pop("can_outages"),
        can_tickets=can_tickets,
        can_snapshot=can_snapshot,
        can_live=can_live,
        **data,
        **page_helpers(request),
    )


def site_data(
    conn: Connection,
    *,
    principal: Principal,
    site: SiteAttrs,
    since: float,
    now: float,
    with_uptime: bool = True,
) -> dict[str, Any]:
    """Everything the site page shows (the outage ledger, uptime and tickets only with
    ``view_outages`` on the site); ``detail`` is None if the site is out of scope."""
    status_where = single_site_filter(principal, "view_status", site.site_id)
    can_outages = can(principal, "view_outages", site, now)
    out: dict[str, Any] = {
        "can_outages": can_outages,
        "detail": queries.site_detail(conn, site.site_id, site_filter=status_where, now=now),
        "cameras": queries.site_cameras(conn, site.site_id, site_filter=status_where),
        "outages": [],
        "site_tickets": [],
        "missing": queries.missing_ranges(conn, site.site_id, site_filter=status_where, limit=5),
    }
    out["uptime_windows"] = {}
    out["camera_uptime"] = []
    if not can_outages:
        return out
    where = single_site_filter(principal, "view_outages", site.site_id)
    out["outages"] = queries.outage_timeline(
        conn, since=since, until=now, site_id=site.site_id, site_filter=where, now=now
    )
    out["site_tickets"], _ = queries.list_tickets(
        conn, site_filter=where, states=None, site_id=site.site_id, limit=20, now=now
    )
    if with_uptime:
        for name in SITE_UPTIME_WINDOWS:
            found = queries.uptime(
                conn,
                since=now - PERIODS[name],
                until=now,
                level="site",
                site_filter=where,
                site_id=site.site_id,
                now=now,
            )
            out["uptime_windows"][name] = found[0] if found else None
        camera_rows = queries.uptime(
            conn,
            since=since,
            until=now,
            level="camera",
            site_filter=where,
            site_id=site.site_id,
            now=now,
        )
        names = {c["camera_id"]: c["name"] for c in out["cameras"]}
        for r in camera_rows:
            r["name"] = names.get(r["camera_id"])
        out["camera_uptime"] = sorted(camera_rows, key=worst_first)
    return out


# --- tickets --------------------------------------------------------------------------------


async def tickets_page(request: web.Request) -> web.StreamResponse:
    _, where = await scoped(request, "view_outages")
    q = request.query
    state = choice("state", q.get("state"), (*TICKET_STATES, "all"))
    f = Filters.parse(q)
    page_no = integer("page", q.get("page"), 1, 1, 100_000)
    states: tuple[str, ...] | None = (
        None if state == "all" else (state,) if state else ("open", "acknowledged", "resolved")
    )
    rows, total = await service_of(request).read(
        queries.list_tickets,
        site_filter=where,
        states=states,
        province=f.province,
        district=f.district,
        operator=f.operator,
        limit=PAGE_SIZE,
        offset=(page_no - 1) * PAGE_SIZE,
    )
    return render(
        request,
        "board/tickets.html",
        rows=rows,
        state=state or "",
        states=[*TICKET_STATES, "all"],
        f=f,
        base={**f.given(), "state": state},
        pager=Pager(page_no, PAGE_SIZE, total),
        **page_helpers(request),
    )


async def _ticket_view(
    request: web.Request,
    principal: Principal,
    site: SiteAttrs,
    ticket_id: int,
    *,
    error: str | None = None,
    status: int = 200,
) -> web.Response:
    where = single_site_filter(principal, "view_outages", site.site_id)
    if not can(principal, "view_outages", site, time.time()):
        where = single_site_filter(principal, "manage_tickets", site.site_id)
    row = await service_of(request).read(queries.get_ticket, ticket_id, site_filter=where)
    if row is None:
        raise web.HTTPNotFound()
    return render(
        request,
        "board/ticket.html",
        status=status,
        ticket=row,
        can_tickets=can(principal, "manage_tickets", site, time.time()),
        error=error,
        **page_helpers(request),
    )


async def ticket_page(request: web.Request) -> web.StreamResponse:
    principal, site, ticket_id = await authorized_ticket(request, "view_outages")
    return await _ticket_view(request, principal, site, ticket_id)


def _form_text(value: str | None, limit: int) -> str | None:
    """Stripped form text, None when empty; raises ValueError when too long or with control
    characters (newlines and tabs are fine in notes)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if len(value) > limit or any(ord(c) < 32 and c not in "\n\r\t" for c in value):
        raise ValueError("invalid text")
    return value.replace("\r\n", "\n")


async def ticket_post(request: web.Request) -> web.StreamResponse:
    """A ticket form (acknowledge, assign, note, close); back to the page it came from."""
    action = request.match_info["action"]
    principal, site, ticket_id = await authorized_ticket(request, "manage_tickets")
    form = await request.post()
    raw = {k: v for k, v in form.items() if isinstance(v, str)}
    try:
        values = {
            "note": _form_text(raw.get("note"), MAX_NOTE),
            "text": _form_text(raw.get("text"), MAX_NOTE),
            "assignee": _form_text(raw.get("assignee"), MAX_NAME),
        }
        if (action == "assign" and not values["assignee"]) or (
            action == "note" and not values["text"]
        ):
            raise ValueError("missing text")
    except ValueError:
        return await _ticket_view(
            request, principal, site, ticket_id, error="board.ticket.invalid", status=400
        )
    try:
        await change_ticket(request, principal, ticket_id, action, values)
    except TicketError:
        row = await service_of(request).read(
            queries.get_ticket,
            ticket_id,
            site_filter=single_site_filter(principal, "manage_tickets", site.site_id),
        )
        still_out = (
            action == "close" and row is not None and row["state"] in ("open", "acknowledged")
        )
        key = "board.ticket.still_out" if still_out else "board.ticket.refused"
        return await _ticket_view(request, principal, site, ticket_id, error=key, status=409)
    raise web.HTTPSeeOther(_back(raw.get("next"), f"/board/tickets/{ticket_id}"))


def _back(value: str | None, default: str) -> str:
    """Where a form returns: only a board page of this hub (no open redirect)."""
    if (
        not value
        or len(value) > 500
        or not value.startswith("/board")
        or "//" in value
        or "\\" in value
        or any(ord(c) < 33 for c in value)
    ):
        return default
    return value
