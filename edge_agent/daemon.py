"""`edge-agent run`: the facility daemon.

One asyncio process wires the parts together:

- start-up: device key (made at first start), segment store + reconcile of files against the
  index (what it repaired goes into the `agent_started` event), retention and disk planner;
- cameras (`edge_agent.cameras.CameraManager`): pinned, discovered and announced cameras, one
  recorder each, recorder events → sitelink events;
- periodic jobs, each isolated so one failing never stops another or the recorders: chain
  heads signed every minute, retention expiry, disk enforcement and forecast, health samples,
  image checks, full rescans;
- the MQTT uplink with its store-and-forward spool (`edge_agent.uplink`), commands from the hub;
- `edge-agent status` over a local Unix socket, Prometheus metrics on localhost.

Stopping (SIGTERM/SIGINT) finishes every open segment, closes open gaps, signs the final
chain heads, publishes the death message and marks the run as cleanly ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from edge_agent.cameras import CameraManager
from edge_agent.config import EdgeConfig
from edge_agent.device_key import load_or_create_device_key
from edge_agent.image_health import ImageFaultTransition, ImageHealthChecker
from edge_agent.inventory import Inventory
from edge_agent.keyframes import KeyframeSample
from edge_agent.metrics import start_metrics_server
from edge_agent.recorder import RecorderConfig
from edge_agent.retention import DiskAlarm, DiskPlanner, DiskPolicy, Retention, RetentionPolicy
from edge_agent.segment_store import SegmentStore
from edge_agent.site_health import agent_version
from sitelink import messages as m
from sitelink.sealed_segment import load_public_key

log = logging.getLogger(__name__)

GIB = 1024**3
_STATE_FILE = "agent-state.json"


@dataclass
class Timings:
    """Periods of the daemon's jobs (seconds); tests shorten them, nothing else should."""

    sign_heads: float = 60.0
    expiry: float = 600.0
    disk: float = 30.0


@dataclass
class DaemonCounters:
    events: int = 0
    event_errors: int = 0
    job_errors: dict[str, int] = field(default_factory=dict)


EventSink = Callable[[m.EventBase], Awaitable[None]]


class EdgeDaemon:
    """Runs one edge box until `stop` is set. `free_bytes` overrides the disk probe (tests use a
    small budget on a real directory); `event_sink` replaces the MQTT uplink (tools)."""

    def __init__(
        self,
        config: EdgeConfig,
        *,
        timings: Timings | None = None,
        free_bytes: Callable[[], int] | None = None,
        event_sink: EventSink | None = None,
    ) -> None:
        self.config = config
        self.timings = timings or Timings()
        self.data_dir = config.storage.data_dir
        self.started = time.time()
        self.counters = DaemonCounters()
        self._free_bytes = free_bytes
        self._event_sink = event_sink
        self._seq_lock = asyncio.Lock()
        self._disk_level = "ok"
        self._alarms: set[str] = set()
        self._forecast_days: float | None = None
        self.store: SegmentStore | None = None
        self.cameras: CameraManager | None = None
        self.planner: DiskPlanner | None = None
        self.image: ImageHealthChecker | None = None
        self._jobs: list[asyncio.Task[None]] = []
        self._status_runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready = asyncio.Event()

    # -- events --------------------------------------------------------------------------------

    async def emit(self, cls: type[m.EventBase], **fields: Any) -> None:
        """Build a sitelink event and hand it to the uplink (which numbers, spools, sends)."""
        fields.setdefault("ts", time.time())
        try:
            event = cls(seq=1, **fields)  # seq is assigned by the sink
        except ValueError as exc:
            self.counters.event_errors += 1
            log.error("event %s not built: %s", cls.__name__, exc)
            return
        self.counters.events += 1
        if self._event_sink is not None:
            await self._event_sink(event)
        else:
            log.info("event %s", m.encode(event).decode())

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        clean_previous = self._mark_running()
        key = load_or_create_device_key(cfg.keys.device_key_file)
        recipients = [load_public_key(p) for p in cfg.keys.recipient_files]
        store = self.store = SegmentStore(self.data_dir, key, cfg.site.id)
        report = store.reconcile()
        if report.clean:
            log.info("start-up reconcile: files and index agree")
        else:
            log.warning("start-up reconcile:\n%s", report.render())
        retention = RetentionPolicy(
            floor_days=cfg.storage.retention_days,
            allow_below_legal_minimum=cfg.storage.allow_below_legal_minimum,
        )
        self.planner = DiskPlanner(
            store,
            retention,
            DiskPolicy(
                reserve_bytes=int(cfg.storage.reserve_gib * GIB),
                warn_margin_days=cfg.storage.warn_margin_days,
                floor_grace_seconds=cfg.storage.floor_grace_seconds,
            ),
            free_bytes=self._free_bytes,
            on_alarm=self._on_disk_alarm,
        )
        inventory = Inventory(self.data_dir / "inventory.db")
        rec_cfg = RecorderConfig(
            segment_seconds=float(cfg.recording.segment_seconds),
            fragment_seconds=cfg.recording.fragment_seconds,
            stall_seconds=cfg.recording.stall_seconds,
            startup_grace_seconds=cfg.recording.startup_grace_seconds,
            backoff_max_seconds=cfg.recording.backoff_max_seconds,
            fsync_every_fragments=cfg.recording.fsync_every_fragments,
        )
        self.cameras = CameraManager(
            cfg, store, inventory, recipients, self.emit, recorder_config=rec_cfg
        )
        await self.emit(
            m.AgentStarted,
            agent_version=agent_version(),
            clean_shutdown=clean_previous,
            recovered=_recovered_counts(report),
        )
        await self.emit(
            m.RetentionEvent,
            retention_days=cfg.storage.retention_days,
            legal_hold=bool(store.legal_holds()),
            below_legal_minimum=cfg.storage.retention_days < 30,
            reason="agent start",
        )
        await self._start_status_server()
        if cfg.metrics.listen:
            self._metrics_runner = await start_metrics_server(cfg.metrics.listen, self.status)
        try:
            await self.cameras.start()
            retention_runner = Retention(store, retention)
            self.image = ImageHealthChecker(
                cfg.health,
                self._latest_keyframe,
                self._on_image_transition,
                on_reference=self._store_image_reference,
                blurred_max_ratio=cfg.health.blurred_max_ratio,
            )
            self._jobs = [
                self._every("image", min(1.0, cfg.health.check_interval_seconds / 4), self._image),
                self._every("sign_heads", self.timings.sign_heads, self._sign_heads),
                self._every("expiry", self.timings.expiry, lambda: self._expire(retention_runner)),
                self._every("disk", self.timings.disk, self._disk),
                self._every(
                    "rescan",
                    cfg.discovery.rescan_minutes * 60,
                    self._rescan,
                    first_delay=cfg.discovery.rescan_minutes * 60,
                ),
            ]
            self.ready.set()
            log.info(
                "edge agent %s running for site %s: %d camera(s)",
                agent_version(),
                cfg.site.id,
                len(self.cameras.cameras),
            )
            await stop.wait()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        log.info("stopping: finishing open segments")
        for job in self._jobs:
            job.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        if self.image is not None:
            self.image.close()
        if self.cameras is not None:
            await self.cameras.stop()
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self._sign_heads()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self._status_runner is not None:
            await self._status_runner.cleanup()
            with contextlib.suppress(FileNotFoundError):
                self.config.status.socket.unlink()
        if self.cameras is not None:
            self.cameras.inventory.close()
        if self.store is not None:
            self.store.close()
        self._mark_stopped()
        log.info("stopped cleanly")

    def _mark_running(self) -> bool | None:
        """Record that a run started; returns whether the previous run ended cleanly
        (None: first start)."""
        path = self.data_dir / _STATE_FILE
        previous: bool | None = None
        with contextlib.suppress(FileNotFoundError, ValueError):
            previous = not json.loads(path.read_text())["running"]
        self._write_state(running=True)
        return previous

    def _mark_stopped(self) -> None:
        self._write_state(running=False)

    def _write_state(self, *, running: bool) -> None:
        path = self.data_dir / _STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"running": running, "since": time.time(), "pid": os.getpid()}))
        os.replace(tmp, path)

    # -- jobs ----------------------------------------------------------------------------------

    def _every(
        self,
        name: str,
        period: float,
        job: Callable[[], Awaitable[Any]],
        *,
        first_delay: float = 0.0,
    ) -> asyncio.Task[None]:
        async def loop() -> None:
            await asyncio.sleep(first_delay)
            while True:
                try:
                    await job()
                except asyncio.CancelledError:
                    raise
                except Exception:  # a failing job is logged and retried next period
                    self.counters.job_errors[name] = self.counters.job_errors.get(name, 0) + 1
                    log.exception("job %s failed", name)
                await asyncio.sleep(period)

        return asyncio.create_task(loop(), name=f"job-{name}")

    async def _sign_heads(self) -> None:
        assert self.store is not None
        heads = await asyncio.to_thread(self.store.sign_heads)
        for h in heads:
            await self.emit(
                m.ChainHead,
                camera=h.camera_id,
                segment_seq=h.seq,
                row_hash=h.row_hash,
                time=h.time,
                key_id=h.key_id,
                signature=h.signature,
            )

    async def _expire(self, retention: Retention) -> None:
        report = await asyncio.to_thread(retention.expire, time.time())
        for stone in report.tombstones:
            await self._tombstone(stone)
        for err in report.errors:
            log.error("retention: %s", err)

    async def _tombstone(self, t: Any) -> None:
        await self.emit(
            m.Tombstone,
            camera=t.camera_id,
            first_seq=t.first_seq,
            last_seq=t.last_seq,
            start=t.start,
            end=t.end,
            removed_rows=t.rows,
            removed_bytes=t.bytes,
            prev_anchor=t.prev_anchor,
            last_row_hash=t.last_row_hash,
            reason=t.reason,
            created_at=t.created_at,
            missing_files=t.missing_files,
            key_id=t.key_id,
            signature=t.signature,
        )

    async def _disk(self) -> None:
        assert self.planner is not None
        now = time.time()
        result = await asyncio.to_thread(self.planner.enforce, now)
        for alarm in result.alarms:
            await self._raise_alarm(alarm)  # already published by _on_disk_alarm: a no-op
        for stone in result.tombstones:
            await self._tombstone(stone)
        for err in result.errors:
            log.error("disk: %s", err)
        forecast = await asyncio.to_thread(self.planner.forecast, now)
        self._forecast_days = forecast.capacity_days
        for alarm in forecast.alarms + result.alarms:
            await self._raise_alarm(alarm)
        level = "ok"
        if any(a.level == "critical" for a in forecast.alarms + result.alarms):
            level = "critical"
        elif forecast.alarms:
            level = "warning"
        if level != self._disk_level:
            self._disk_level = level
            await self.emit(
                m.DiskEvent,
                level=level,
                free_bytes=max(0, forecast.free_bytes),
                forecast_days=_days(forecast.capacity_days),
            )
        active = {a.code for a in forecast.alarms + result.alarms}
        for code in sorted(self._alarms - active):
            self._alarms.discard(code)
            await self.emit(
                m.Alarm,
                code=code,
                level="warning",
                active=False,
                message="Đã hết cảnh báo / cleared",
            )

    def _on_disk_alarm(self, alarm: DiskAlarm) -> None:
        """Called by the planner, in its worker thread, the moment it raises an alarm and
        before any deletion the alarm announces: the worker waits until the alarm event is
        handed to the uplink (spooled), so the NOC's record always has the alarm first."""
        log.critical("disk alarm %s: %s (%s)", alarm.code, alarm.message, alarm.detail)
        loop = self._loop
        if loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._raise_alarm(alarm), loop)
        try:
            future.result(timeout=30)
        except Exception as exc:  # never let reporting block the deletion that frees the disk
            log.error("disk alarm %s not published before deletion: %s", alarm.code, exc)

    async def _raise_alarm(self, alarm: DiskAlarm) -> None:
        if alarm.code in self._alarms:
            return
        self._alarms.add(alarm.code)
        await self.emit(
            m.Alarm,
            code=alarm.code,
            level=alarm.level,
            active=True,
            message=f"{alarm.message} / {alarm.detail}"[:500],
        )

    def _latest_keyframe(self, camera_id: str) -> KeyframeSample | None:
        cam = self.cameras.cameras.get(camera_id) if self.cameras else None
        return cam.keyframe() if cam is not None else None

    async def _image(self) -> None:
        """One round of image checks, after following the camera set (cameras come and go)."""
        assert self.image is not None and self.cameras is not None
        wanted = {cid for cid, c in self.cameras.cameras.items() if c.recorder is not None}
        for cid in set(self.image.camera_ids) - wanted:
            self.image.remove_camera(cid)
        for cid in wanted - set(self.image.camera_ids):
            self.image.add_camera(cid, self.cameras.inventory.image_reference(cid))
        await self.image.check_due()

    async def _on_image_transition(self, t: ImageFaultTransition) -> None:
        await self.emit(m.ImageFaultEvent, ts=t.wall, **t.event_fields())

    async def _store_image_reference(self, camera_id: str, signature: bytes) -> None:
        assert self.cameras is not None
        await asyncio.to_thread(self.cameras.inventory.set_image_reference, camera_id, signature)
        log.info("%s: image reference enrolled (%d bytes)", camera_id, len(signature))

    async def _rescan(self) -> None:
        assert self.cameras is not None
        await self.cameras.rescan()

    # -- status --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        cams = self.cameras.status() if self.cameras else []
        return {
            "site": self.config.site.id,
            "agent_version": agent_version(),
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "ready": self.ready.is_set(),
            "disk": {"level": self._disk_level, "forecast_days": _days(self._forecast_days)},
            "alarms": sorted(self._alarms),
            "events": self.counters.events,
            "job_errors": self.counters.job_errors,
            "last_scan": self.cameras.last_scan if self.cameras else None,
            "cameras": cams,
        }

    async def _start_status_server(self) -> None:
        path = self.config.status.socket
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        except OSError as exc:
            log.error("status socket %s not available: %s", path, exc)
            return

        async def handle(_request: web.Request) -> web.Response:
            return web.json_response(self.status())

        app = web.Application()
        app.router.add_get("/status", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.UnixSite(runner, str(path))
        try:
            await site.start()
            os.chmod(path, 0o660)
        except OSError as exc:
            log.error("status socket %s not available: %s", path, exc)
            await runner.cleanup()
            return
        self._status_runner = runner


def _days(value: float | None) -> float | None:
    return None if value is None else min(max(value, 0.0), 1e6)


def _recovered_counts(report: Any) -> dict[str, int]:
    counts = {
        "indexed_orphans": len(report.indexed_orphans),
        "quarantined": len(report.quarantined),
        "expired_leftovers": len(report.expired_leftovers_removed),
        "missing_files": len(report.missing_files),
        "size_mismatches": len(report.size_mismatches),
        "abandoned_seqs": len(report.abandoned_seqs),
        "open_gaps": len(report.open_gaps),
    }
    return {k: v for k, v in counts.items() if v}


async def query_status(socket_path: Path, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
    """What `edge-agent status` prints: the running daemon's state over its Unix socket."""
    import aiohttp

    connector = aiohttp.UnixConnector(path=str(socket_path))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get("http://edge/status", timeout=aiohttp.ClientTimeout(total=timeout)) as resp,
    ):
        resp.raise_for_status()
        data: dict[str, Any] = await resp.json()
        return data
