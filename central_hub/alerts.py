"""Alerts: what the NOC must notice now, fanned out in process and posted to a webhook.

The ingest and the ticket scheduler `publish()` alert dicts after their transaction commits;
the web layer attaches each open NOC page (WebSocket) with `subscribe(scope)`; a
`WebhookSender` posts every alert to the operator's ticketing or chat system.

Nothing here may slow the ingest down: `publish()` never awaits and never blocks. Every
subscriber has its own bounded queue; when a slow consumer lets it fill, the *oldest* alerts are
dropped (the newest say more about now) and the subscriber is told how many it lost with an
`alerts_dropped` alert, so a page can reload its state from the API instead of trusting a
partial stream.

An alert is a JSON-ready dict::

    {"type": "outage_opened", "severity": "critical", "at": 1767225600.0,
     "site_id": "bv-da-nang-01", "camera_id": "cam-03",
     "site": {"site_id": …, "province": …, "district": …, "kind": …, "authority": …,
              "operator": …, "enabled": true},
     "site_name": "Bệnh viện dã chiến số 1",
     "text_vi": "…", "text_en": "…", …type-specific fields…}

`alert["site"]` holds exactly the fields of `central_hub.sites.SiteAttrs`, so a scope filter
can call `can(user, "status", SiteAttrs.from_row(alert["site"]))`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, Final, Literal

import aiohttp

from central_hub.sites import SiteAttrs

log = logging.getLogger(__name__)

Alert = dict[str, Any]
ScopeFilter = Callable[[Alert], bool]
Severity = Literal["info", "warning", "critical"]

#: Alert types and what they mean (docs/hub.md lists them).
ALERT_TYPES: Final[dict[str, str]] = {
    "site_offline": "a site's box went offline (its death: connection lost or shut down)",
    "site_online": "a site's box is back (a new birth)",
    "outage_opened": "a camera outage started (stream down, recording stopped, image fault)",
    "outage_closed": "an outage ended (site or camera)",
    "outage_recorded": "an outage learnt after the fact (replayed or late events)",
    "seq_gap": "events are missing from a site (a hole in its sequence numbers)",
    "edge_reset": "a site restarted its event numbering (box re-imaged or replaced)",
    "inventory_mismatch": "a box describes its site differently from its enrolment",
    "alarm": "an edge alarm raised or cleared (spool overflow, disk full inside the floor…)",
    "disk": "a site's recording volume changed level",
    "clock": "a clock offset crossed a threshold",
    "retention": "retention set below the legal minimum, or a legal hold changed",
    "ticket_opened": "an outage lasted longer than the threshold: a ticket was opened",
    "ticket_resolved": "the outage behind a ticket ended; someone must confirm and close it",
    "signature": "a chain head or tombstone does not verify with the site's enrolled device key",
    "alerts_dropped": "this subscriber was too slow and lost `count` alerts: reload the state",
}

DEFAULT_QUEUE_SIZE: Final = 1000
_SITE_FIELDS: Final = tuple(f.name for f in fields(SiteAttrs))


def site_dict(site: SiteAttrs) -> dict[str, Any]:
    """The `alert["site"]` value (round-trips through `SiteAttrs.from_row`)."""
    # Not dataclasses.asdict: it deep-copies recursively, 30 µs per alert in the ingest.
    return {f: getattr(site, f) for f in _SITE_FIELDS}


def make_alert(
    type_: str,
    *,
    at: float,
    severity: Severity,
    site: SiteAttrs | None,
    site_name: str | None,
    text_vi: str,
    text_en: str,
    camera_id: str | None = None,
    **fields: Any,
) -> Alert:
    """Build an alert dict (see the module docstring for the shape)."""
    if type_ not in ALERT_TYPES:
        raise ValueError(f"unknown alert type {type_!r}")
    alert: Alert = {
        "type": type_,
        "severity": severity,
        "at": at,
        "site_id": site.site_id if site is not None else None,
        "camera_id": camera_id,
        "site": site_dict(site) if site is not None else None,
        "site_name": site_name,
        "text_vi": text_vi,
        "text_en": text_en,
    }
    alert.update(fields)
    return alert


def duration_text(seconds: float) -> tuple[str, str]:
    """A duration in words, (Vietnamese, English): `2 giờ 5 phút` / `2 h 5 min`."""
    s = max(0, round(seconds))
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    vi: list[str] = []
    en: list[str] = []
    if d:
        vi.append(f"{d} ngày")
        en.append(f"{d} d")
    if h:
        vi.append(f"{h} giờ")
        en.append(f"{h} h")
    if m and not d:
        vi.append(f"{m} phút")
        en.append(f"{m} min")
    if not vi:
        vi.append(f"{sec} giây")
        en.append(f"{sec} s")
    return " ".join(vi), " ".join(en)


class AlertSubscription:
    """One subscriber's bounded queue; iterate it with ``async for``.

    Use as an async context manager (or call `close()`) so the hub forgets it.
    """

    def __init__(self, hub: AlertHub, scope: ScopeFilter | None, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("queue size must be at least 1")
        self._hub = hub
        self._scope = scope
        self._maxsize = maxsize
        self._queue: deque[Alert] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._unreported_drops = 0
        #: Alerts lost because this subscriber fell behind (monotonic).
        self.dropped = 0
        #: Alerts this subscriber's scope let through (monotonic).
        self.matched = 0

    def _offer(self, alert: Alert) -> None:
        if self._closed:
            return
        if self._scope is not None:
            try:
                if not self._scope(alert):
                    return
            except Exception:
                # A broken filter must not take the fan-out down; it sees nothing instead.
                log.exception("alert scope filter failed; alert withheld from this subscriber")
                return
        self.matched += 1
        if len(self._queue) >= self._maxsize:
            self._queue.popleft()
            self.dropped += 1
            self._unreported_drops += 1
        self._queue.append(alert)
        self._wakeup.set()

    def pending(self) -> int:
        """Alerts waiting to be read."""
        return len(self._queue)

    def __aiter__(self) -> AsyncIterator[Alert]:
        return self

    async def __anext__(self) -> Alert:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._unreported_drops:
            count, self._unreported_drops = self._unreported_drops, 0
            return {
                "type": "alerts_dropped",
                "severity": "warning",
                "count": count,
                "text_vi": f"Mất {count} cảnh báo do kết nối chậm: hãy tải lại trang",
                "text_en": f"{count} alerts lost on a slow connection: reload the page",
            }
        return self._queue.popleft()

    def close(self) -> None:
        """Stop receiving; a pending `async for` ends after the queued alerts."""
        if not self._closed:
            self._closed = True
            self._hub._forget(self)
            self._wakeup.set()

    async def __aenter__(self) -> AlertSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class AlertHub:
    """In-process fan-out of alerts to subscribers (NOC pages, the webhook sender).

    Lives on the hub's event loop: call `publish` from that loop (or `publish_threadsafe`
    from a worker thread).
    """

    def __init__(self, *, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self._queue_size = queue_size
        self._subscribers: set[AlertSubscription] = set()
        #: Alerts published (monotonic), by type.
        self.published: dict[str, int] = dict.fromkeys(ALERT_TYPES, 0)

    def subscribe(
        self, scope: ScopeFilter | None = None, *, queue_size: int | None = None
    ) -> AlertSubscription:
        """A new subscription receiving every later alert that `scope(alert)` accepts
        (all of them when `scope` is None)."""
        sub = AlertSubscription(self, scope, queue_size or self._queue_size)
        self._subscribers.add(sub)
        return sub

    def _forget(self, sub: AlertSubscription) -> None:
        self._subscribers.discard(sub)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, alert: Alert) -> None:
        """Hand `alert` to every subscriber whose scope accepts it; never blocks."""
        self.published[alert["type"]] = self.published.get(alert["type"], 0) + 1
        for sub in list(self._subscribers):
            sub._offer(alert)

    def publish_many(self, alerts: Iterable[Alert]) -> None:
        for alert in alerts:
            self.publish(alert)

    def publish_threadsafe(self, loop: asyncio.AbstractEventLoop, alerts: list[Alert]) -> None:
        """Publish from another thread onto `loop`."""
        if alerts:
            loop.call_soon_threadsafe(self.publish_many, alerts)


@dataclass
class WebhookStats:
    """Alerts delivered or given up (drop notices are counted apart, in `notices`)."""

    delivered: int = 0
    failed: int = 0
    retries: int = 0
    #: `alerts_dropped` notices sent (or attempted): the receiver is told what it lost.
    notices: int = 0


class WebhookSender:
    """POST every alert (JSON) to one URL, with retries and backoff, off the ingest's path.

    Retries connection errors, timeouts, HTTP 429 and 5xx with exponential backoff and jitter
    (`backoff_s`, doubling up to `max_backoff_s`), at most `retries` times; any other status
    is final. Its subscription queue is bounded (`queue_size`): while the receiver is down,
    the oldest alerts are dropped first and counted. With `secret`, every request carries
    ``X-Isocam-Signature: sha256=<HMAC-SHA256 of the body>`` so the receiver can check the
    sender.
    """

    def __init__(
        self,
        url: str,
        *,
        secret: bytes | None = None,
        timeout_s: float = 10.0,
        retries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        scope: ScopeFilter | None = None,
    ) -> None:
        self.url = url
        self._secret = secret
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._retries = retries
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._queue_size = queue_size
        self._scope = scope
        self._task: asyncio.Task[None] | None = None
        self._subscription: AlertSubscription | None = None
        self.stats = WebhookStats()

    @property
    def dropped(self) -> int:
        """Alerts lost because the queue was full."""
        return self._subscription.dropped if self._subscription is not None else 0

    def start(self, hub: AlertHub) -> asyncio.Task[None]:
        """Subscribe to `hub` and start posting in a background task."""
        if self._task is not None:
            raise RuntimeError("webhook sender already started")
        self._subscription = hub.subscribe(self._scope, queue_size=self._queue_size)
        self._task = asyncio.get_running_loop().create_task(
            self._run(self._subscription), name="webhook-sender"
        )
        return self._task

    async def stop(self) -> None:
        """Stop posting (alerts still queued are abandoned)."""
        if self._subscription is not None:
            self._subscription.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, subscription: AlertSubscription) -> None:
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            async for alert in subscription:
                await self._deliver(session, alert)

    def _headers(self, body: bytes, alert: Alert) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "isocam-central-hub",
            "X-Isocam-Alert": str(alert.get("type", "")),
        }
        if self._secret is not None:
            digest = hmac.new(self._secret, body, hashlib.sha256).hexdigest()
            headers["X-Isocam-Signature"] = f"sha256={digest}"
        return headers

    async def _deliver(self, session: aiohttp.ClientSession, alert: Alert) -> bool:
        if alert.get("type") == "alerts_dropped":
            self.stats.notices += 1
            counted = WebhookStats()  # a notice is not one of the alerts published
        else:
            counted = self.stats
        ok = await self._post(session, alert)
        if ok:
            counted.delivered += 1
        else:
            counted.failed += 1
        return ok

    async def _post(self, session: aiohttp.ClientSession, alert: Alert) -> bool:
        body = json.dumps(alert, ensure_ascii=False, separators=(",", ":")).encode()
        headers = self._headers(body, alert)
        delay = self._backoff_s
        for attempt in range(self._retries + 1):
            try:
                async with session.post(self.url, data=body, headers=headers) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        return True
                    if resp.status != 429 and resp.status < 500:
                        log.warning(
                            "webhook refused alert %s with HTTP %d; not retried",
                            alert.get("type"),
                            resp.status,
                        )
                        return False
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt == self._retries:
                break
            self.stats.retries += 1
            log.info("webhook delivery failed (%s); retry in %.1f s", problem, delay)
            await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))  # noqa: S311
            delay = min(delay * 2, self._max_backoff_s)
        log.warning("webhook gave up on alert %s after %d attempts", alert.get("type"), attempt + 1)
        return False
