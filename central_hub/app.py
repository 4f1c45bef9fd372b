"""`central-hub serve`: one hub instance — ingest, web (auth, board, API, viewing), tunnels.

`Hub` holds what every part shares (config, database, alerts, auth, audit, tunnel broker,
MQTT command publisher); `build_app(hub)` makes the aiohttp application; `serve(config)`
runs the data services and the web server until SIGTERM/SIGINT.

Web parts mount themselves from their own modules (`setup_*` functions) and never reach into
each other: authorization always goes through `web_auth.require` → `policy.can`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import sqlalchemy as sa
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

import central_hub.status  # noqa: F401 - registers the status tables' migrations
from central_hub.accounts import AuthConfig
from central_hub.alerts import AlertHub
from central_hub.audit import AuditLog
from central_hub.db import Database
from central_hub.hub_config import HubConfig, MqttConfig
from central_hub.ingest import IngestCollector, IngestCounters, run_data_services
from central_hub.signatures import SignatureCollector, SignatureCounters
from central_hub.sites import sites
from central_hub.tunnel import TunnelBroker
from central_hub.web_auth import AuthService, setup_auth, subscribe_revocations
from sitelink.messages import Message, outgoing
from sitelink.signing import SigningKeyError, load_public_key_pem

log = logging.getLogger(__name__)

HUB: web.AppKey[Hub] = web.AppKey("isocam_hub", object)  # type: ignore[arg-type]
#: The app's Prometheus registry: web parts register their own collectors on it.
METRICS: web.AppKey[CollectorRegistry] = web.AppKey("isocam_metrics", CollectorRegistry)


class CommandPublisher:
    """Publishes hub → edge commands (QoS 1) over one MQTT connection kept open; commands made
    while the broker is away fail at once with a clear error (the caller tells the user)."""

    def __init__(self, config: MqttConfig) -> None:
        self.config = config
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="hub-command-publisher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        c = self.config
        tls = None
        if c.tls:
            tls = aiomqtt.TLSParameters(
                ca_certs=str(c.ca_file) if c.ca_file else None,
                certfile=str(c.cert_file) if c.cert_file else None,
                keyfile=str(c.key_file) if c.key_file else None,
            )
        while True:
            try:
                async with aiomqtt.Client(
                    c.host,
                    c.port,
                    identifier=f"{c.client_id}-cmd",
                    protocol=aiomqtt.ProtocolVersion.V5,
                    tls_params=tls,
                    keepalive=c.keepalive_s,
                ) as client:
                    self._client = client
                    self._connected.set()
                    await asyncio.Future()  # until cancelled or the connection drops
            except aiomqtt.MqttError as exc:
                log.warning("command publisher: broker unavailable (%s); retrying", exc)
            finally:
                self._client = None
                self._connected.clear()
            await asyncio.sleep(2.0)

    async def send(self, site_id: str, command: Message, within: float = 5.0) -> None:
        """Publish `command` to the site's cmd topic; raises ConnectionError if the broker
        cannot be reached within `within` seconds."""
        try:
            async with asyncio.timeout(within):
                await self._connected.wait()
        except TimeoutError:
            raise ConnectionError("the MQTT broker is not reachable from the hub") from None
        client = self._client
        if client is None:
            raise ConnectionError("the MQTT broker connection dropped")
        out = outgoing(site_id, command)
        await client.publish(out.topic, out.payload, qos=out.qos, retain=out.retain)


@dataclass
class Hub:
    """What every part of one hub instance shares."""

    config: HubConfig
    db: Database
    auth_config: AuthConfig
    alerts: AlertHub
    audit: AuditLog
    publisher: CommandPublisher
    broker: TunnelBroker
    ingest_counters: IngestCounters = field(default_factory=IngestCounters)
    signature_counters: SignatureCounters = field(default_factory=SignatureCounters)
    started: float = field(default_factory=time.time)
    auth: AuthService | None = None
    #: extra startup hooks of web parts (e.g. background tasks), run in `serve`
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


def _device_key_loader(db: Database) -> Callable[[str], Awaitable[Any]]:
    async def device_key_for(site_id: str) -> Any:
        def load() -> Any:
            with db.engine.connect() as conn:
                row = conn.execute(
                    sa.select(sites.c.device_public_key, sites.c.enabled).where(
                        sites.c.site_id == site_id
                    )
                ).first()
            if row is None or not row.enabled or not row.device_public_key:
                return None
            try:
                return load_public_key_pem(row.device_public_key)
            except SigningKeyError as exc:
                log.error("site %s: stored device key unusable: %s", site_id, exc)
                return None

        return await asyncio.to_thread(load)

    return device_key_for


def make_hub(config: HubConfig, auth_config: AuthConfig | None = None) -> Hub:
    """Open the database (migrating it) and build the shared parts; nothing runs yet."""
    db = Database.connect(config.database.effective_url())
    db.migrate()
    public = (config.web.public_url or f"http://{config.web.host}:{config.web.port}").rstrip("/")
    tunnel_url = public.replace("https://", "wss://").replace("http://", "ws://") + "/edge/tunnel"
    publisher = CommandPublisher(config.mqtt)
    broker = TunnelBroker(
        hub_url=tunnel_url,
        send_command=publisher.send,
        device_key_for=_device_key_loader(db),
    )
    return Hub(
        config=config,
        db=db,
        auth_config=auth_config or AuthConfig(public_url=public),
        alerts=AlertHub(queue_size=config.alerts.subscriber_queue),
        audit=AuditLog(db),
        publisher=publisher,
        broker=broker,
    )


def build_app(hub: Hub) -> web.Application:
    """The web application: auth first (its middlewares guard everything after), then the
    edge tunnel endpoint, metrics and health, then the web parts."""
    app = web.Application(client_max_size=1024**2)
    app[HUB] = hub
    hub.auth = setup_auth(app, hub.db, hub.auth_config, audit=hub.audit)
    app.router.add_get("/edge/tunnel", hub.broker.handle)

    def on_revocation(event: Any) -> None:
        kwargs = {
            k: v
            for k, v in (
                ("user", getattr(event, "user_id", None)),
                ("site", getattr(event, "site_id", None)),
                ("session", getattr(event, "session_hash", None)),
            )
            if v is not None
        }
        if kwargs:
            hub.broker.revoke(**kwargs)

    subscribe_revocations(app, on_revocation)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(IngestCollector(hub.ingest_counters))
    registry.register(SignatureCollector(hub.signature_counters))
    app[METRICS] = registry

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "uptime_s": round(time.time() - hub.started, 1)})

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    _setup_parts(app, hub)
    return app


def _setup_parts(app: web.Application, hub: Hub) -> None:
    """Mount the board/API and viewing parts (each owns its routes and templates). Viewing is
    mounted only when the instance holds the viewing and signing keys (`[viewing]`); an
    instance without them serves status only."""
    from central_hub.board import setup_board

    setup_board(app, hub)
    keys = hub.config.viewing
    if keys.key_file is None or keys.signing_key_file is None:
        log.warning("no [viewing] keys configured: live view, playback and export are off")
        return
    from central_hub.export import load_signing_key
    from central_hub.status import cameras
    from central_hub.viewing import setup_viewing
    from sitelink.sealed_segment import load_private_key

    def cameras_of(site_id: str) -> list[str]:
        with hub.db.engine.connect() as conn:
            rows = conn.execute(
                sa.select(cameras.c.camera_id)
                .where(cameras.c.site_id == site_id)
                .order_by(cameras.c.camera_id)
            )
            return [r.camera_id for r in rows]

    setup_viewing(
        app,
        db=hub.db,
        broker=hub.broker,
        viewing_key=load_private_key(keys.key_file),
        signing_key=load_signing_key(keys.signing_key_file),
        audit=hub.audit,
        cameras_of=cameras_of,
        mount_tunnel=False,
    )


async def serve(
    config: HubConfig,
    auth_config: AuthConfig | None = None,
    *,
    stop: asyncio.Event | None = None,
    ssl_context: ssl.SSLContext | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run one hub instance until `stop` is set (or SIGTERM/SIGINT when run by the CLI)."""
    hub = make_hub(config, auth_config)
    app = build_app(hub)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.web.host, config.web.port, ssl_context=ssl_context)
    await site.start()
    await hub.publisher.start()
    data_ready = asyncio.Event()
    data = asyncio.create_task(
        run_data_services(
            hub.db,
            config,
            alerts=hub.alerts,
            ready=data_ready,
            counters=hub.ingest_counters,
            signature_counters=hub.signature_counters,
        ),
        name="hub-data-services",
    )
    for hook in hub.on_start:
        await hook()
    log.info("central hub listening on %s:%d", config.web.host, config.web.port)
    if ready is not None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await data_ready.wait()
        ready.set()
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        data.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await data
        await hub.broker.close()
        await hub.publisher.stop()
        await runner.cleanup()
        hub.db.close()
