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
import base64
import contextlib
import json
import logging
import os
import ssl
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
from edge_agent.segment_store import LegalHoldError, SegmentStore
from edge_agent.site_health import SiteSampler, agent_version
from edge_agent.spool import SPOOL_FILENAME, Spool
from edge_agent.tunnel import TunnelSources, serve_tunnel
from edge_agent.uplink import PENDING_SEQ, Uplink
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
    clock: float = 300.0


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
        self.uplink: Uplink | None = None
        self._spool: Spool | None = None
        self._sampler: SiteSampler | None = None
        self._key: Any = None
        self._tunnels: set[asyncio.Task[None]] = set()
        self._thumb_cursor = 0
        self._ntp_offset: float | None = None
        self._clock_level = "ok"
        self._jobs: list[asyncio.Task[None]] = []
        self._status_runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready = asyncio.Event()

    # -- events --------------------------------------------------------------------------------

    async def emit(self, cls: type[m.EventBase], **fields: Any) -> None:
        """Build a sitelink event and hand it to the uplink, which numbers it, writes it to
        the spool (durable from here on) and publishes it when the link allows."""
        fields.setdefault("ts", time.time())
        try:
            event = cls(seq=PENDING_SEQ, **fields)
        except ValueError as exc:
            self.counters.event_errors += 1
            log.error("event %s not built: %s", cls.__name__, exc)
            return
        self.counters.events += 1
        if self.uplink is not None:
            try:
                seq = await self.uplink.publish_event(event)
                event = event.model_copy(update={"seq": seq})
            except Exception as exc:  # the spool is unusable: say so loudly, keep recording
                self.counters.event_errors += 1
                log.error("event %s could not be spooled: %s", cls.__name__, exc)
        if self._event_sink is not None:
            await self._event_sink(event)

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        clean_previous = self._mark_running()
        key = self._key = load_or_create_device_key(cfg.keys.device_key_file)
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
            cfg,
            store,
            inventory,
            recipients,
            self.emit,
            recorder_config=rec_cfg,
            on_inventory_change=self._inventory_changed,
        )
        self._sampler = SiteSampler(self.data_dir, self.started)
        self._spool = Spool(
            self.data_dir / SPOOL_FILENAME, site_id=cfg.site.id, max_bytes=cfg.mqtt.spool_max_bytes
        )
        self.uplink = Uplink(
            cfg.mqtt,
            site_id=cfg.site.id,
            spool=self._spool,
            on_command=self._on_command,
            agent_version=agent_version(),
            started=self.started,
        )
        await self.uplink.start()
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
                    "health",
                    float(cfg.mqtt.health_interval_seconds),
                    self._health,
                    first_delay=min(5.0, float(cfg.mqtt.health_interval_seconds)),
                ),
                self._every("inventory", 30.0, self._publish_inventory),
                self._every("clock", self.timings.clock, self._clock),
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
        for tunnel in list(self._tunnels):
            tunnel.cancel()
        await asyncio.gather(*self._tunnels, return_exceptions=True)
        if self.image is not None:
            self.image.close()
        if self.cameras is not None:
            await self.cameras.stop()
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self._sign_heads()
        if self.uplink is not None:
            with contextlib.suppress(Exception):
                await self.uplink.aclose()
        if self._spool is not None:
            self._spool.close()
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

    # -- uplink: inventory, health, commands ---------------------------------------------------

    def _inventory_changed(self) -> None:
        if self.uplink is not None and self.cameras is not None:
            try:
                self.uplink.set_inventory(self.cameras.inventory_message())
            except Exception as exc:  # an inventory that does not encode: log, keep the old one
                log.error("inventory not published: %s", exc)

    async def _publish_inventory(self) -> None:
        """Camera states change without enrolment (up, down, unauthorized): republish when
        the inventory differs (the uplink compares; unchanged costs nothing on the wire)."""
        self._inventory_changed()

    def _camera_health(self) -> list[m.CameraHealth]:
        assert self.cameras is not None
        out: list[m.CameraHealth] = []
        for cam in sorted(self.cameras.cameras.values(), key=lambda c: c.id)[:256]:
            st = cam.stats()
            monitor = self.image.monitor(cam.id) if self.image else None
            recording: str = "stopped"
            if st is not None:
                recording = "recording" if st.recording else "reconnecting"
            out.append(
                m.CameraHealth(
                    camera=cam.id,
                    connected=bool(st and st.connected),
                    recording=recording,  # type: ignore[arg-type]
                    last_packet_age_s=st.last_packet_age_s if st else None,
                    fps=min(st.fps, 1000.0) if st and st.connected else None,
                    bitrate_kbps=st.bitrate_bps / 1000 if st and st.connected else None,
                    reconnects_1h=sum(1 for t in cam.reconnects if t > time.time() - 3600),
                    gap_since=st.current_gap.start if st and st.current_gap else None,
                    segment_write_lag_s=st.write_lag_s if st else None,
                    image=monitor.current() if monitor else None,
                )
            )
        return out

    def _with_thumbnails(self, cams: list[m.CameraHealth], budget: int) -> list[m.CameraHealth]:
        """Attach snapshot thumbnails round-robin while the message stays under `budget`
        bytes: a site's every camera is refreshed over a few samples, never one oversized
        message."""
        if not cams or self.image is None:
            return cams
        out = list(cams)
        used = 0
        n = len(out)
        for i in range(n):
            idx = (self._thumb_cursor + i) % n
            monitor = self.image.monitor(out[idx].camera)
            jpeg = monitor.snapshot_jpeg() if monitor else None
            if not jpeg:
                continue
            size = (len(jpeg) + 2) // 3 * 4 + 40
            if used + size > budget:
                self._thumb_cursor = idx
                break
            used += size
            out[idx] = out[idx].model_copy(
                update={"thumbnail_jpeg": base64.b64encode(jpeg).decode("ascii")}
            )
        else:
            self._thumb_cursor = 0
        return out

    async def _health(self) -> None:
        assert self._sampler is not None and self.uplink is not None
        site = self._sampler.sample(
            forecast_days=_days(self._forecast_days),
            spool_depth=self.uplink.spool_depth,
            clock_offset_s=self._ntp_offset,
        )
        cams = self._camera_health()
        bare = m.Health(ts=time.time(), site=site, cameras=cams)
        room = m.MAX_PAYLOAD_BYTES - len(m.encode(bare)) - 1024
        health = bare.model_copy(update={"cameras": self._with_thumbnails(cams, room)})
        await self.uplink.publish_health(health)

    async def _on_command(self, cmd: Any) -> m.CommandReply:
        """One hub command; errors become error replies (the uplink also guards)."""

        def fail(code: str, message: str) -> m.CommandReply:
            return m.CommandReply(
                ts=time.time(), id=cmd.id, ok=False, error=m.ReplyError(code=code, message=message)
            )

        def ok(result: dict[str, Any]) -> m.CommandReply:
            return m.CommandReply(ts=time.time(), id=cmd.id, ok=True, result=result)

        assert self.cameras is not None and self.store is not None
        if isinstance(cmd, m.Rescan):
            return ok(await self.cameras.rescan())
        if isinstance(cmd, m.Snapshot):
            if cmd.args.camera not in self.cameras.cameras:
                return fail("unknown_camera", f"no camera {cmd.args.camera} at this site")
            jpeg = self._snapshot(cmd.args.camera)
            if jpeg is None:
                return fail("no_picture", "no picture of this camera yet (not recording?)")
            return ok({"camera": cmd.args.camera, "jpeg": base64.b64encode(jpeg).decode("ascii")})
        if isinstance(cmd, m.SetLegalHold):
            return await self._legal_hold(cmd, ok, fail)
        if isinstance(cmd, m.OpenTunnel):
            return self._open_tunnel(cmd, ok, fail)
        return fail("unknown_command", f"command {type(cmd).__name__} is not handled")

    async def _legal_hold(self, cmd: Any, ok: Any, fail: Any) -> m.CommandReply:
        assert self.store is not None and self.cameras is not None
        a = cmd.args
        if a.camera is not None and a.camera not in self.cameras.cameras:
            return fail("unknown_camera", f"no camera {a.camera} at this site")
        try:
            if a.hold:
                hold_id = await asyncio.to_thread(self.store.set_legal_hold, a.reason, a.camera)
                result = {"hold_id": hold_id, "camera": a.camera, "hold": True}
            else:
                held = [h for h in self.store.legal_holds() if h.camera_id == a.camera]
                if not held:
                    return fail("not_held", "no active legal hold matches")
                for h in held:
                    await asyncio.to_thread(self.store.clear_legal_hold, h.id, a.reason)
                result = {"cleared": [h.id for h in held], "camera": a.camera, "hold": False}
        except (LegalHoldError, ValueError) as exc:
            return fail("failed", str(exc))
        await self.emit(
            m.RetentionEvent,
            camera=a.camera,
            retention_days=self.config.storage.retention_days,
            legal_hold=bool(a.hold),
            below_legal_minimum=self.config.storage.retention_days < 30,
            reason=a.reason,
        )
        return ok(result)

    def _snapshot(self, camera: str) -> bytes | None:
        monitor = self.image.monitor(camera) if self.image else None
        return monitor.snapshot_jpeg() if monitor else None

    def _open_tunnel(self, cmd: Any, ok: Any, fail: Any) -> m.CommandReply:
        assert self.cameras is not None
        args = cmd.args
        if args.camera not in self.cameras.cameras:
            return fail("unknown_camera", f"no camera {args.camera} at this site")
        if len(self._tunnels) >= self.config.viewing.max_tunnels:
            return fail("busy", f"{len(self._tunnels)} tunnels already open")
        task = asyncio.create_task(self._serve_tunnel(args), name=f"tunnel-{args.camera}")
        self._tunnels.add(task)
        task.add_done_callback(self._tunnels.discard)
        return ok({"camera": args.camera, "purpose": args.purpose, "dialling": True})

    async def _serve_tunnel(self, args: m.OpenTunnelArgs) -> None:
        from sitelink.tunnel import TunnelError

        try:
            await serve_tunnel(
                args,
                _Sources(self),
                ssl_context=self._tunnel_ssl(),
                idle_seconds=self.config.viewing.idle_seconds,
                agent_version=agent_version(),
            )
        except TunnelError as exc:
            log.warning("tunnel for %s (%s) ended: %s", args.camera, args.purpose, exc)
        except Exception:
            log.exception("tunnel for %s (%s) failed", args.camera, args.purpose)

    def _tunnel_ssl(self) -> ssl.SSLContext | None:
        ca = self.config.viewing.ca_file
        return ssl.create_default_context(cafile=str(ca)) if ca else None

    async def _clock(self) -> None:
        """Compare the box clock with NTP (`health.ntp_server`); a `clock` event when the
        offset crosses `health.max_box_clock_offset_seconds` either way."""
        server = self.config.health.ntp_server
        if not server:
            return
        host, _, port = server.rpartition(":") if ":" in server else (server, "", "123")
        try:
            offset = await asyncio.to_thread(_ntp_offset, host.strip("[]"), int(port or 123))
        except Exception as exc:  # unreachable NTP is worth a log line, not an alarm
            if self._ntp_offset is not None or self.counters.job_errors.get("ntp") is None:
                log.warning("NTP %s: no answer (%s); box clock offset unknown", server, exc)
            self.counters.job_errors["ntp"] = self.counters.job_errors.get("ntp", 0) + 1
            self._ntp_offset = None
            return
        self._ntp_offset = round(offset, 3)
        level = "warning" if abs(offset) > self.config.health.max_box_clock_offset_seconds else "ok"
        if level != self._clock_level:
            self._clock_level = level
            log.log(logging.WARNING if level != "ok" else logging.INFO,
                    "box clock is %+.3f s from NTP %s", offset, server)  # fmt: skip
            await self.emit(m.ClockEvent, level=level, offset_s=self._ntp_offset)

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
            "clock": {"ntp_offset_s": self._ntp_offset, "level": self._clock_level},
            "alarms": sorted(self._alarms),
            "events": self.counters.events,
            "job_errors": self.counters.job_errors,
            "last_scan": self.cameras.last_scan if self.cameras else None,
            "uplink": self.uplink.status().as_dict() if self.uplink else None,
            "tunnels": len(self._tunnels),
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


class _Sources(TunnelSources):
    """What a tunnel may read: the running recorders' taps, the segment store, snapshots."""

    def __init__(self, daemon: EdgeDaemon) -> None:
        self._d = daemon

    @property
    def site_id(self) -> str:
        return self._d.config.site.id

    @property
    def device_key(self) -> Any:
        return self._d._key

    @property
    def segment_store(self) -> SegmentStore:
        assert self._d.store is not None
        return self._d.store

    def live_tap(self, camera: str) -> Any:
        cam = self._d.cameras.cameras.get(camera) if self._d.cameras else None
        return cam.recorder.tap if cam is not None and cam.recorder is not None else None

    def snapshot(self, camera: str) -> bytes | None:
        return self._d._snapshot(camera)


def _ntp_offset(host: str, port: int) -> float:
    """NTP time minus this box's time, in seconds (one SNTP query, ntplib)."""
    import ntplib

    response = ntplib.NTPClient().request(host, version=4, port=port, timeout=3)
    return float(response.offset)


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
