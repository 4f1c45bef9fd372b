"""The NOC board's uptime page: uptime % and time to repair over whole days, from the ledger.

``/board/uptime`` shows, for a period of calendar days in Vietnam time (today, yesterday, the
last 7 or 30 days — today included — or any from/to dates), the level the user has opened:
provinces → (``province=``) districts → (``district=``) sites → (``site=``) the cameras of one
site; the operators alongside; the sites of the scope one page at a time, worst first (or in
name order). Per row: cameras, camera uptime, site connectivity, down time, and for provinces,
districts and operators the mean and longest time to repair. ``/board/uptime.csv`` gives one
of those tables whole (every site, not a page) for the ministry's reports.

Every figure comes from :func:`central_hub.queries.uptime` and :func:`central_hub.queries.mttr`
(aggregated in SQL, at most one row per site of the scope); this module only sorts, pages and
formats them. The totals are the sum of the site rows, which partition the scope — no second
query. The page has no live refresh: it is a report over days, and re-reading it on every
alert would run the nation-wide ledger sums once per alert per open page.

Authorization as ``/api/uptime``: ``view_outages`` somewhere (else 403 and an audit row), then
the user's scope as a SQL condition (a provincial user asking for another province finds
nothing); one site (``site=``) needs ``view_outages`` on that site (403 and an audit row outside
the scope, 404 when it does not exist).
"""

from __future__ import annotations

import csv
import functools
import io
import re
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.engine import Connection

from central_hub import i18n, queries
from central_hub.api import (
    ID_PATTERN,
    MAX_WINDOW_S,
    Filters,
    bad_request,
    choice,
    integer,
    scoped,
    service_of,
    single_site_filter,
)
from central_hub.board import (
    PAGE_SIZE,
    UPTIME_AMBER_PCT,
    UPTIME_BAR_FLOOR_PCT,
    UPTIME_GREEN_PCT,
    VN_TZ,
    Pager,
    district_choices,
    page_helpers,
    province_choices,
    worst_first,
)
from central_hub.sites import SiteAttrs, get_site, sites
from central_hub.web_auth import lang_of, render, require

Row = dict[str, Any]

#: The period choices of the page, besides ``custom`` (``from``/``to`` dates): name → (first,
#: last) day, counted back from today in Vietnam time.
PERIOD_DAYS: Final[dict[str, tuple[int, int]]] = {
    "today": (0, 0),
    "yesterday": (1, 1),
    "7d": (6, 0),
    "30d": (29, 0),
}
DEFAULT_PERIOD: Final = "today"
SORTS: Final = ("worst", "name")
MAX_DAYS: Final = int(MAX_WINDOW_S // 86400)
#: CSV tables offered per level of the page (the first is the level's own table).
CSV_TABLES: Final[dict[str, tuple[str, ...]]] = {
    "province": ("groups", "operators", "sites"),
    "district": ("groups", "operators", "sites"),
    "site": ("sites", "operators"),
    "camera": ("cameras",),
}
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_SITE_ID = re.compile(ID_PATTERN)
_CSV_ROWS: Final = {
    "groups": "groups",
    "operators": "operators",
    "sites": "site_rows",
    "cameras": "camera_rows",
}
_SUMMED: Final = ("cameras", "monitored_s", "down_s", "sites", "site_monitored_s", "site_down_s")


def add_uptime_routes(router: web.UrlDispatcher) -> None:
    """Mount ``/board/uptime`` and its CSV (called by ``board.setup_board``)."""
    router.add_get("/board/uptime", uptime_page, name="board_uptime")
    router.add_get("/board/uptime.csv", uptime_csv, name="board_uptime_csv")


# --- the period -----------------------------------------------------------------------------


class PeriodError(ValueError):
    """Dates typed by the user that make no period; `key` is the i18n message saying why."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


@dataclass(frozen=True)
class Period:
    """Whole days `first`…`last` (Vietnam time) as [since, until), `until` no later than now."""

    name: str
    first: date
    last: date
    since: float
    until: float

    def params(self) -> dict[str, str]:
        if self.name == "custom":
            return {"period": "custom", "from": self.first.isoformat(), "to": self.last.isoformat()}
        return {"period": self.name}


def vn_day(ts: float) -> date:
    """The calendar day of `ts` in Vietnam (UTC+7, no daylight saving)."""
    return datetime.fromtimestamp(ts, VN_TZ).date()


def vn_midnight(day: date) -> float:
    """00:00 of `day` in Vietnam, as UNIX seconds."""
    return datetime(day.year, day.month, day.day, tzinfo=VN_TZ).timestamp()


def _day(value: str) -> date:
    if not _DATE.fullmatch(value):
        raise PeriodError("uptime.error.date")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise PeriodError("uptime.error.date") from None


def parse_period(query: Mapping[str, str], now: float) -> Period:
    """The period of ``period=`` (and ``from``/``to`` for ``custom``; dates alone mean custom).

    A bad ``period`` name is a 400 like any bad parameter; dates that make no period raise
    :class:`PeriodError` so the page can say why next to the date fields."""
    raw_from = (query.get("from") or "").strip()
    raw_to = (query.get("to") or "").strip()
    name = query.get("period") or ("custom" if raw_from or raw_to else DEFAULT_PERIOD)
    today = vn_day(now)
    if name in PERIOD_DAYS:
        back_first, back_last = PERIOD_DAYS[name]
        first, last = today - timedelta(days=back_first), today - timedelta(days=back_last)
    elif name == "custom":
        if not raw_from and not raw_to:
            raise PeriodError("uptime.error.date")
        first, last = _day(raw_from or raw_to), _day(raw_to or raw_from)
        if first > last:
            raise PeriodError("uptime.error.order")
        if first > today:
            raise PeriodError("uptime.error.future")
        last = min(last, today)
        if (last - first).days + 1 > MAX_DAYS:
            raise PeriodError("uptime.error.too_long")
    else:
        raise bad_request("period: one of " + ", ".join([*PERIOD_DAYS, "custom"]))
    since = vn_midnight(first)
    until = min(vn_midnight(last + timedelta(days=1)), now)
    return Period(name, first, last, since, until)


# --- the request ----------------------------------------------------------------------------


@dataclass(frozen=True)
class UptimeView:
    """What the user asked for, apart from the period."""

    f: Filters
    site_id: str | None
    sort: str
    page: int

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> UptimeView:
        f = Filters.parse(query)
        if f.district is not None and f.province is None:
            f = Filters(operator=f.operator, kind=f.kind, authority=f.authority)
        return cls(
            f=f,
            site_id=site_param(query),
            sort=choice("sort", query.get("sort"), SORTS) or "worst",
            page=integer("page", query.get("page"), 1, 1, 100_000),
        )

    @property
    def level(self) -> str:
        """The level whose rows the page lists: province, district, site or camera."""
        if self.site_id is not None:
            return "camera"
        if self.f.province is None:
            return "province"
        return "district" if self.f.district is None else "site"

    @property
    def mttr_groups(self) -> bool:
        """Can MTTR be given for the groups? queries.mttr filters by province and operator
        only: with a kind or authority filter its figures would not match the rows."""
        return self.f.kind is None and self.f.authority is None

    @property
    def mttr_totals(self) -> bool:
        """…and for the totals and the operators (no district filter either)."""
        return self.mttr_groups and self.f.district is None

    def params(self, period: Period | None = None) -> dict[str, str | None]:
        """The query of this view (without the page), for links."""
        return {
            **(period.params() if period is not None else {}),
            **self.f.given(),
            "site": self.site_id,
            "sort": None if self.sort == "worst" else self.sort,
        }


def site_param(query: Mapping[str, str]) -> str | None:
    """``site=``: one site's cameras."""
    site_id = query.get("site") or None
    if site_id is not None and not _SITE_ID.fullmatch(site_id):
        raise bad_request("site: a site id")
    return site_id


async def _authorize(request: web.Request) -> tuple[Any, SiteAttrs | None]:
    """The list scope (SQL condition) and, for one site's cameras, the site (403 outside the
    user's scope, with an audit row; 404 when unknown). Before any other parameter is read,
    as on /board: a user without the right learns nothing from a 400."""
    site_id = site_param(request.query)
    if site_id is None:
        _, where = await scoped(request, "view_outages")
        return where, None
    site = await service_of(request).read(get_site, site_id)
    if site is None:
        raise web.HTTPNotFound()
    principal = await require(request, "view_outages", site)
    return single_site_filter(principal, "view_outages", site.site_id), site


# --- the figures ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=16384)
def _name_key(value: str | None) -> tuple[bool, str]:
    """Vietnamese alphabetical order, roughly: Đà Nẵng among the D's, not after Z; None last.
    Cached: the same 63 provinces and 2,000 site names are sorted on every request."""
    if value is None:
        return (True, "")
    plain = unicodedata.normalize("NFD", value.replace("Đ", "D").replace("đ", "d"))
    return (False, "".join(c for c in plain if not unicodedata.combining(c)).casefold())


def _totals(rows: Sequence[Row]) -> Row | None:
    """The uptime row of the whole scope, from the rows of a partition of it."""
    if not rows:
        return None
    out: Row = {k: sum(r.get(k) or 0 for r in rows) for k in _SUMMED}
    ms, ds = float(out["monitored_s"]), float(out["down_s"])
    sm, sd = float(out["site_monitored_s"]), float(out["site_down_s"])
    out["uptime_pct"] = None if ms <= 0 else max(0.0, 100.0 * (ms - ds) / ms)
    out["site_uptime_pct"] = None if sm <= 0 else max(0.0, 100.0 * (sm - sd) / sm)
    return out


def _group_rows(site_rows: Sequence[Row], keys: tuple[str, ...]) -> list[Row]:
    """Uptime rows per value of `keys` (province, district, operator), summed from site rows."""
    by: dict[tuple[Any, ...], list[Row]] = {}
    for r in site_rows:
        by.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out: list[Row] = []
    for key, rows in by.items():
        total = _totals(rows)
        assert total is not None
        out.append({**dict(zip(keys, key, strict=True)), **total})
    return out


def _site_attrs(conn: Connection, where: Any, f: Filters, site_id: str | None) -> dict[str, Row]:
    """Name, place, operator and kind of the scope's sites (or of one site): what the site
    rows of queries.uptime do not carry. One indexed read, not an aggregation."""
    q = sa.select(
        sites.c.site_id,
        sites.c.name,
        sites.c.province,
        sites.c.district,
        sites.c.operator,
        sites.c.kind,
    )
    if where is not None:
        q = q.where(where)
    if site_id is not None:
        q = q.where(sites.c.site_id == site_id)
    else:
        q = q.where(sites.c.enabled.is_(True))
        for name, value in f.kwargs().items():
            if value is not None:
                q = q.where(sites.c[name] == value)
    return {r.site_id: dict(r._mapping) for r in conn.execute(q)}


def _attach_mttr(rows: list[Row], found: list[Row], cols: tuple[str, ...]) -> None:
    by_key = {tuple(m[c] for c in cols): m for m in found}
    for r in rows:
        r["mttr"] = by_key.get(tuple(r[c] for c in cols))


def _sort(rows: list[Row], sort: str, name: Callable[[Row], Any]) -> list[Row]:
    out = sorted(rows, key=name)
    return sorted(out, key=worst_first) if sort == "worst" else out


def _group_name(r: Row) -> Any:
    return (_name_key(r.get("province")), _name_key(r.get("district")), r.get("operator") or "")


def _site_name(r: Row) -> Any:
    return (*_group_name(r)[:2], _name_key(r.get("name") or r["site_id"]), r["site_id"])


def uptime_data(
    conn: Connection,
    *,
    where: Any,
    view: UptimeView,
    period: Period,
    now: float,
    tables: Sequence[str],
) -> dict[str, Any]:
    """The figures of the asked `tables` (groups, operators, sites, cameras) of `view` over
    `period`, within the scope `where`, sorted; the sites all of them (the caller pages)."""
    f, level = view.f, view.level
    common: dict[str, Any] = {
        "since": period.since,
        "until": period.until,
        "site_filter": where,
        "now": now,
    }
    mttr_common: dict[str, Any] = {
        "since": period.since,
        "until": period.until,
        "site_filter": where,
        "province": f.province,
        "operator": f.operator,
    }
    out: dict[str, Any] = {
        "groups": [],
        "operators": [],
        "site_rows": [],
        "camera_rows": [],
        "totals": None,
        "site_name": None,
    }
    if level == "camera":
        assert view.site_id is not None
        attrs = _site_attrs(conn, where, f, view.site_id)
        out["site_name"] = (attrs.get(view.site_id) or {}).get("name")
        found = queries.uptime(conn, level="site", site_id=view.site_id, **common)
        out["totals"] = found[0] if found else None
        cams = queries.uptime(conn, level="camera", site_id=view.site_id, **common)
        names = {
            c["camera_id"]: c["name"]
            for c in queries.site_cameras(
                conn, view.site_id, site_filter=where, include_removed=True
            )
        }
        for r in cams:
            r["name"] = names.get(r["camera_id"])
        out["camera_rows"] = _sort(cams, view.sort, lambda r: r["camera_id"])
        return out

    kw: dict[str, Any] = f.kwargs()
    # One uptime query, per site: the sites partition the scope, so the provinces, districts
    # and operators are sums of their rows (the same figures as asking queries.uptime per
    # group, which a test checks; three nation-wide sums cost three times as much).
    site_rows = queries.uptime(conn, level="site", **common, **kw)
    attrs = _site_attrs(conn, where, f, None)
    for r in site_rows:
        a = attrs.get(r["site_id"]) or {}
        for k in ("name", "province", "district", "operator", "kind"):
            r[k] = a.get(k)
    if "groups" in tables and level in ("province", "district"):
        group_level: queries.GroupLevel = "province" if level == "province" else "district"
        keys = ("province",) if level == "province" else ("province", "district")
        groups = _group_rows(site_rows, keys)
        if view.mttr_groups:
            _attach_mttr(groups, queries.mttr(conn, group_by=group_level, **mttr_common), keys)
        out["groups"] = _sort(groups, view.sort, _group_name)
    if "operators" in tables:
        ops = _group_rows(site_rows, ("operator",))
        if view.mttr_totals:
            _attach_mttr(ops, queries.mttr(conn, group_by="operator", **mttr_common), ("operator",))
        out["operators"] = _sort(ops, view.sort, _group_name)
    if "sites" in tables:
        out["site_rows"] = _sort(site_rows, view.sort, _site_name)
        totals = _totals(site_rows)
        if totals is not None and view.mttr_totals:
            found = queries.mttr(conn, group_by="nation", **mttr_common)
            totals["mttr"] = found[0] if found else None
        out["totals"] = totals
    return out


# --- the page -------------------------------------------------------------------------------


def _choices(conn: Connection, where: Any, f: Filters) -> dict[str, list[str]]:
    return {
        "provinces": province_choices(conn, where),
        "districts": district_choices(conn, where, f.province) if f.province else [],
    }


async def uptime_page(request: web.Request) -> web.StreamResponse:
    where, site = await _authorize(request)
    view = UptimeView.parse(request.query)
    now = time.time()
    svc = service_of(request)
    lang = lang_of(request)
    context: dict[str, Any] = {
        "view": view,
        "level": view.level,
        "site": site,
        "periods": list(PERIOD_DAYS),
        "thresholds": {
            name: f"{value:g}" if lang == "en" else f"{value:g}".replace(".", ",")
            for name, value in (
                ("green", UPTIME_GREEN_PCT),
                ("amber", UPTIME_AMBER_PCT),
                ("floor", UPTIME_BAR_FLOOR_PCT),
            )
        },
        "today": vn_day(now).isoformat(),
        "max_days": MAX_DAYS,
        "error": None,
        **page_helpers(request),
    }
    if site is None:
        context.update(await svc.read(_choices, where, view.f))
    else:
        context.update(provinces=[], districts=[])
    try:
        period = parse_period(request.query, now)
    except PeriodError as exc:
        # The typed dates are shown back with the reason; no figures.
        return render(
            request,
            "board/uptime.html",
            status=400,
            **{**context, "error": exc.key, "period": None, "data": None, "pager": None},
            base=view.params(),
            typed={"from": request.query.get("from", ""), "to": request.query.get("to", "")},
        )
    tables = CSV_TABLES[view.level]
    data = await svc.read(
        uptime_data, where=where, view=view, period=period, now=now, tables=tables
    )
    pager = Pager(view.page, PAGE_SIZE, len(data["site_rows"]))
    data["site_rows"] = data["site_rows"][pager.offset : pager.offset + PAGE_SIZE]
    return render(
        request,
        "board/uptime.html",
        **context,
        period=period,
        data=data,
        pager=pager,
        base=view.params(period),
        typed={"from": period.first.isoformat(), "to": period.last.isoformat()},
    )


# --- the CSV --------------------------------------------------------------------------------


def _cell(value: Any) -> Any:
    """A text cell a spreadsheet will not run as a formula (CSV injection)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _num(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _secs(value: float | None) -> str:
    return "" if value is None else str(round(value))


def csv_text(
    table: str, rows: Sequence[Row], level: str, period: Period, lang: str, with_mttr: bool
) -> str:
    """The table as CSV (UTF-8 with a BOM, so that a spreadsheet reads Vietnamese right);
    headers in the page's language, numbers with a dot, durations in seconds."""

    def t(key: str) -> str:
        return i18n.t(key, lang)

    def word(group: str, value: str | None) -> str:
        key = f"board.{group}.{value}"
        return i18n.t(key, lang) if key in i18n.MESSAGES else str(value or "")

    names: list[tuple[str, Callable[[Row], Any]]]
    if table == "cameras":
        names = [
            (t("board.site"), lambda r: r["site_id"]),
            (t("board.camera"), lambda r: r["camera_id"]),
            (t("uptime.csv.camera_name"), lambda r: r.get("name") or ""),
        ]
    elif table == "sites":
        names = [
            (t("board.site"), lambda r: r["site_id"]),
            (t("uptime.csv.site_name"), lambda r: r.get("name") or ""),
            (t("sites.province"), lambda r: r.get("province") or ""),
            (t("sites.district"), lambda r: r.get("district") or ""),
            (t("sites.operator"), lambda r: word("operator", r.get("operator"))),
            (t("sites.kind"), lambda r: word("kind", r.get("kind"))),
        ]
    elif table == "operators":
        names = [(t("sites.operator"), lambda r: word("operator", r["operator"]))]
    elif level == "province":
        names = [(t("board.province"), lambda r: r["province"])]
    else:
        names = [
            (t("board.province"), lambda r: r["province"]),
            (t("board.district"), lambda r: r["district"] or ""),
        ]
    figures: list[tuple[str, Callable[[Row], Any]]] = [
        (t("uptime.csv.from"), lambda r: period.first.isoformat()),
        (t("uptime.csv.to"), lambda r: period.last.isoformat()),
    ]
    if table != "cameras":
        figures.append((t("board.sites"), lambda r: r["sites"]))
    figures += [
        (t("board.cameras"), lambda r: r["cameras"]),
        (t("uptime.csv.uptime_pct"), lambda r: _num(r["uptime_pct"])),
        (t("uptime.csv.monitored_s"), lambda r: _secs(r["monitored_s"])),
        (t("uptime.csv.down_s"), lambda r: _secs(r["down_s"])),
    ]
    if table != "cameras":
        figures += [
            (t("uptime.csv.site_uptime_pct"), lambda r: _num(r["site_uptime_pct"])),
            (t("uptime.csv.site_down_s"), lambda r: _secs(r["site_down_s"])),
        ]
    if with_mttr:
        figures += [
            (t("uptime.csv.tickets"), lambda r: (r.get("mttr") or {}).get("tickets", 0)),
            (t("uptime.csv.mttr_s"), lambda r: _secs((r.get("mttr") or {}).get("mttr_s"))),
            (t("uptime.csv.max_s"), lambda r: _secs((r.get("mttr") or {}).get("max_s"))),
        ]
    columns = names + figures
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\r\n")
    out.writerow([c[0] for c in columns])
    for r in rows:
        out.writerow([_cell(get(r)) for _, get in columns])
    return "\ufeff" + buf.getvalue()


async def uptime_csv(request: web.Request) -> web.StreamResponse:
    """One table of the page, whole (``table=groups|operators|sites|cameras``; the level's own
    table by default), with the page's authorization, scope, filters and period."""
    where, _ = await _authorize(request)
    view = UptimeView.parse(request.query)
    now = time.time()
    offered = CSV_TABLES[view.level]
    table = choice("table", request.query.get("table"), offered) or offered[0]
    try:
        period = parse_period(request.query, now)
    except PeriodError as exc:
        raise bad_request(i18n.t(exc.key, "en")) from None
    data = await service_of(request).read(
        uptime_data, where=where, view=view, period=period, now=now, tables=(table,)
    )
    rows = data[_CSV_ROWS[table]]
    with_mttr = (table == "groups" and view.mttr_groups) or (
        table == "operators" and view.mttr_totals
    )
    text = csv_text(table, rows, view.level, period, lang_of(request), with_mttr)
    where_name = view.site_id or view.f.district or view.f.province or "vn"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", _name_key(where_name)[1]).strip("-") or "scope"
    filename = f"uptime-{safe}-{table}-{period.first.isoformat()}_{period.last.isoformat()}.csv"
    return web.Response(
        text=text,
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
