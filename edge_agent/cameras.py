"""The daemon's cameras: enrolment (pinned, discovered, announced), one recorder each, and the
translation of what recorders see into sitelink events.

Every camera the inventory knows is recorded for as long as the agent runs, whether it answers
or not: a camera that is down at boot still gets a recorder, which keeps retrying and writes the
gap into the ledger. What decides the RTSP URL:

- pinned by RTSP URL in the configuration: that URL;
- pinned by ONVIF address, found by a discovery probe, or announced by a WS-Discovery Hello:
  the first profile's stream URI from an ONVIF query. A later query that returns another URI
  (the camera got a new IP address from DHCP: it keeps its id, matched on its serial) restarts
  the recorder on the new URI.

H.265 cameras are refused when ``cameras.accept_h265`` is false (state `ineligible`, a reason in
the inventory, nothing recorded): the hub's players and the legal export format need H.264.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from edge_agent.config import EdgeConfig
from edge_agent.discovery import (
    DiscoveredDevice,
    DiscoveryEvent,
    DiscoveryListener,
    default_interfaces,
    probe,
)
from edge_agent.inventory import Inventory, InventoryCamera
from edge_agent.keyframes import KeyframeSample
from edge_agent.onvif_device import DeviceReport, query_device
from edge_agent.recorder import CameraRecorder, RecorderConfig, RecorderEvent, RecorderStats
from edge_agent.segment_store import SegmentStore
from sitelink import messages as m
from sitelink.sealed_segment import RecipientPublicKey

log = logging.getLogger(__name__)

#: emit(event_class, **fields): the daemon assigns seq and ts, spools and publishes.
Emit = Callable[..., Awaitable[None]]

_CODECS = {"H264": "h264", "H265": "h265", "HEVC": "h265", "JPEG": "mjpeg", "MPEG4": "mpeg4"}


@dataclass
class ManagedCamera:
    """One camera as the daemon runs it."""

    id: str
    name: str
    url: str | None  # RTSP URL without credentials; None: not known (ONVIF never answered)
    user: str
    password: str | None
    source: str
    onvif_address: tuple[str, int] | None = None
    report: DeviceReport | None = None
    state: str = "connecting"  # sitelink CameraState
    reason: str | None = None  # why it is not recorded, for the inventory and the status
    recorder: CameraRecorder | None = None
    task: asyncio.Task[None] | None = None
    pump: asyncio.Task[None] | None = None
    down_since: float | None = None
    gap_starts: dict[int | None, float] = field(default_factory=dict)
    reconnects: list[float] = field(default_factory=list)  # reconnect times, for reconnects_1h

    def stats(self) -> RecorderStats | None:
        return self.recorder.stats() if self.recorder is not None else None

    def keyframe(self) -> KeyframeSample | None:
        rec = self.recorder
        return getattr(rec, "last_keyframe", None) if rec is not None else None


class CameraManager:
    """Keeps one recorder per known camera and keeps the inventory up to date."""

    def __init__(
        self,
        config: EdgeConfig,
        store: SegmentStore,
        inventory: Inventory,
        recipients: list[RecipientPublicKey],
        emit: Emit,
        *,
        recorder_config: RecorderConfig | None = None,
        on_inventory_change: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.inventory = inventory
        self.recipients = recipients
        self.emit = emit
        self.recorder_config = recorder_config or RecorderConfig(
            segment_seconds=float(config.recording.segment_seconds),
            fragment_seconds=config.recording.fragment_seconds,
        )
        self.cameras: dict[str, ManagedCamera] = {}
        self._on_change = on_inventory_change or (lambda: None)
        self._listener: DiscoveryListener | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rescan_lock = asyncio.Lock()
        self._clock_alarm: dict[str, bool] = {}
        self.last_scan: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Enrol what the configuration pins and the inventory remembers, start recording, then
        find the rest (probe) and listen for Hello/Bye."""
        for pinned in self.config.cameras.rtsp:
            row = self.inventory.record_rtsp(
                pinned.id, pinned.name, pinned.rtsp_main, pinned.rtsp_sub
            )
            self._adopt(row, pinned.user, pinned.password.reveal() if pinned.password else None)
        for row in self.inventory.cameras():
            if row.id not in self.cameras and row.source != "rtsp":
                creds = self._credentials(row.host, row.port)
                self._adopt(row, *creds)
        self._on_change()
        await self.rescan()
        interfaces = discovery_interfaces(self.config)
        if interfaces:
            try:
                self._listener = DiscoveryListener(interfaces, callback=self._on_discovery)
                await self._listener.start()
            except Exception as exc:  # discovery is optional: pinned cameras still record
                log.error("WS-Discovery listener not started: %s", exc)
                self._listener = None

    async def stop(self) -> None:
        if self._listener is not None:
            await self._listener.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self._stop_recorder(c) for c in self.cameras.values()))

    async def rescan(self) -> dict[str, Any]:
        """Query every pinned ONVIF camera and everything a probe finds; enrol what is new,
        follow cameras that moved. Returns a summary (for the `rescan` command's reply)."""
        async with self._rescan_lock:
            targets: dict[tuple[str, int], str] = {}
            for cam in self.config.cameras.onvif:
                targets[(cam.host, cam.port)] = "config"
            for c in self.cameras.values():
                if c.onvif_address and c.onvif_address not in targets:
                    targets[c.onvif_address] = c.source
            interfaces = discovery_interfaces(self.config)
            found = 0
            if interfaces:
                try:
                    devices = await probe(interfaces, self.config.discovery.timeout_seconds)
                except Exception as exc:
                    log.error("discovery probe failed: %s", exc)
                    devices = []
                for dev in devices:
                    if dev.is_video_transmitter and dev.onvif_addresses():
                        found += 1
                        targets.setdefault(dev.onvif_addresses()[0], "discovery")
            results = await asyncio.gather(
                *(
                    self._query_and_enrol(host, port, source)
                    for (host, port), source in targets.items()
                )
            )
            self.last_scan = time.time()
            self._on_change()
            return {
                "queried": len(targets),
                "discovered": found,
                "onvif_ok": sum(1 for r in results if r),
                "cameras": len(self.cameras),
            }

    # -- enrolment ---------------------------------------------------------------------------

    def _credentials(self, host: str | None, port: int | None) -> tuple[str, str | None]:
        creds = self.config.credentials_for(host or "", port if host else 0)
        return creds.user, creds.password.reveal() if creds.password else None

    async def _query_and_enrol(self, host: str, port: int, source: str) -> bool:
        user, password = self._credentials(host, port)
        report = await query_device(host, port, user, password or "")
        if not report.ok:
            log.warning(
                "camera %s:%d: ONVIF %s (%s)", host, port, report.error, report.error_message
            )
        existing = self._by_address(host, port)
        if not report.ok and existing is not None:
            # keep what we knew (its recorder goes on retrying); remember why ONVIF failed
            existing.report = report
            existing.reason = f"ONVIF: {report.error}"
            return False
        row = self.inventory.record_onvif(report, source)
        cam = self._adopt(row, user, password, report=report, address=(host, port))
        await self._check_clock(cam)
        return report.ok

    def _by_address(self, host: str, port: int) -> ManagedCamera | None:
        for cam in self.cameras.values():
            if cam.onvif_address == (host, port):
                return cam
        return None

    def _adopt(
        self,
        row: InventoryCamera,
        user: str,
        password: str | None,
        *,
        report: DeviceReport | None = None,
        address: tuple[str, int] | None = None,
    ) -> ManagedCamera:
        """Make `row` a managed camera, (re)starting its recorder if its URL changed."""
        cam = self.cameras.get(row.id)
        if address is None and row.host and row.port:
            address = (row.host, row.port)
        if cam is None:
            cam = ManagedCamera(
                row.id, row.name, row.rtsp_main, user, password, row.source, onvif_address=address
            )
            self.cameras[row.id] = cam
        else:
            cam.onvif_address = address or cam.onvif_address
            cam.user, cam.password = user, password
        if report is not None:
            cam.report = report
        codec = (row.codec or "").upper()
        if codec in ("H265", "HEVC") and not self.config.cameras.accept_h265:
            cam.state, cam.reason = "ineligible", "H.265 refused by cameras.accept_h265 = false"
            self._spawn(self._stop_recorder(cam))
            return cam
        if row.onvif_ok == 0 and row.error == "unauthorized" and not row.rtsp_main:
            cam.state, cam.reason = "unauthorized", "the camera refused the ONVIF login"
        if row.rtsp_main and (cam.recorder is None or cam.url != row.rtsp_main):
            moved = cam.recorder is not None
            cam.url = row.rtsp_main
            if moved:
                log.info("%s: stream moved to %s; restarting its recorder", cam.id, cam.url)
                self._spawn(self._restart(cam))
            else:
                self._start_recorder(cam)
        elif not row.rtsp_main and cam.recorder is None:
            cam.state = "offline" if cam.state == "connecting" else cam.state
            cam.reason = cam.reason or "no stream URI known yet (ONVIF has not answered)"
        return cam

    async def _check_clock(self, cam: ManagedCamera) -> None:
        offset = cam.report.clock_offset_s if cam.report else None
        if offset is None:
            return
        limit = self.config.cameras.max_clock_offset_seconds
        bad = abs(offset) > limit
        if bad != self._clock_alarm.get(cam.id, False):
            self._clock_alarm[cam.id] = bad
            await self.emit(
                m.ClockEvent,
                level="warning" if bad else "ok",
                offset_s=float(offset),
                camera=cam.id,
            )

    def _on_discovery(self, event: DiscoveryEvent) -> None:
        dev: DiscoveredDevice = event.device
        if event.kind == "bye":
            log.info("WS-Discovery Bye from %s (%s)", dev.source, dev.endpoint)
            return
        if not dev.is_video_transmitter or not dev.onvif_addresses():
            return
        host, port = dev.onvif_addresses()[0]
        log.info("WS-Discovery Hello from %s: querying %s:%d", dev.source, host, port)
        self._spawn(self._enrol_announced(host, port))

    async def _enrol_announced(self, host: str, port: int) -> None:
        async with self._rescan_lock:
            await self._query_and_enrol(host, port, "discovery")
        self._on_change()

    # -- recorders ---------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_recorder(self, cam: ManagedCamera) -> None:
        assert cam.url is not None
        try:
            rec = CameraRecorder(
                cam.id,
                cam.url,
                self.store,
                self.recipients,
                self.recorder_config,
                user=cam.user,
                password=cam.password,
            )
        except ValueError as exc:
            cam.state, cam.reason = "ineligible", str(exc)
            log.error("%s: not recorded: %s", cam.id, exc)
            return
        cam.recorder = rec
        cam.state, cam.reason = "connecting", None
        cam.task = asyncio.create_task(self._run_recorder(cam, rec), name=f"record-{cam.id}")
        cam.pump = asyncio.create_task(self._pump(cam, rec), name=f"events-{cam.id}")

    async def _run_recorder(self, cam: ManagedCamera, rec: CameraRecorder) -> None:
        try:
            await rec.run()
        except asyncio.CancelledError:
            raise
        except Exception:  # one camera's failure never stops the others
            log.exception("%s: recorder crashed", cam.id)
            cam.state = "offline"

    async def _stop_recorder(self, cam: ManagedCamera) -> None:
        rec, task, pump = cam.recorder, cam.task, cam.pump
        cam.recorder = cam.task = cam.pump = None
        if rec is not None:
            await rec.stop()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if pump is not None and rec is not None:
            await self._drain(cam, rec)
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def _restart(self, cam: ManagedCamera) -> None:
        await self._stop_recorder(cam)
        self._start_recorder(cam)

    async def _pump(self, cam: ManagedCamera, rec: CameraRecorder) -> None:
        while True:
            event = await rec.events.get()
            await self._translate(cam, event)

    async def _drain(self, cam: ManagedCamera, rec: CameraRecorder) -> None:
        while not rec.events.empty():
            await self._translate(cam, rec.events.get_nowait())

    async def _translate(self, cam: ManagedCamera, ev: RecorderEvent) -> None:
        """Recorder event → sitelink event (segment events are counted, not sent)."""
        try:
            if ev.kind == "connected":
                cam.state, cam.reason = "recording", None
                if cam.down_since is not None:  # back after a loss: a reconnect
                    now = time.time()
                    cam.reconnects = [t for t in cam.reconnects if t > now - 3600] + [now]
                await self.emit(m.CameraUp, camera=cam.id, down_since=cam.down_since)
                cam.down_since = None
            elif ev.kind == "disconnected":
                cause = ev.cause or "error"
                cam.state = "unauthorized" if cause == "unauthorized" else "offline"
                if cam.down_since is None:
                    cam.down_since = ev.wall
                await self.emit(
                    m.CameraDown,
                    camera=cam.id,
                    cause=cause,
                    detail=(ev.detail or None) and ev.detail[:500],
                )
            elif ev.kind == "gap_opened":
                cam.gap_starts[ev.gap_id] = ev.wall
                await self.emit(
                    m.GapOpened, camera=cam.id, start=ev.wall, cause=ev.cause or "error"
                )
            elif ev.kind == "gap_closed":
                start = cam.gap_starts.pop(ev.gap_id, None)
                if start is None:
                    start = ev.wall
                await self.emit(
                    m.GapClosed,
                    camera=cam.id,
                    start=min(start, ev.wall),
                    end=ev.wall,
                    cause=ev.cause or "error",
                )
        except Exception:
            log.exception("%s: could not report %s", cam.id, ev.kind)

    # -- reporting ---------------------------------------------------------------------------

    def inventory_message(self) -> m.Inventory:
        site = self.config.site
        cams: list[m.CameraInfo] = []
        for row in self.inventory.cameras():
            managed = self.cameras.get(row.id)
            profiles = _profiles(managed.report if managed else None)
            tokens = [p.token for p in profiles]
            cams.append(
                m.CameraInfo(
                    id=row.id,
                    name=row.name or None,
                    onvif_url=f"http://{row.host}:{row.port}/onvif/device_service"
                    if row.host and row.port
                    else None,
                    manufacturer=row.manufacturer,
                    model=row.model,
                    firmware=row.firmware,
                    serial=row.serial,
                    profiles=profiles,
                    record_profile=tokens[0] if tokens else None,
                    live_profile=tokens[1] if len(tokens) > 1 else (tokens[0] if tokens else None),
                    state=(managed.state if managed else "offline"),  # type: ignore[arg-type]
                    clock_offset_s=managed.report.clock_offset_s
                    if managed and managed.report
                    else None,
                )
            )
        return m.Inventory(
            ts=time.time(),
            site=m.SiteInfo(
                name=site.name or None,
                province=site.province,
                district=site.district or None,
                kind=site.kind,  # type: ignore[arg-type]
                authority=site.authority,  # type: ignore[arg-type]
                operator=site.operator,  # type: ignore[arg-type]
            ),
            cameras=cams[:256],
        )

    def status(self) -> list[dict[str, Any]]:
        out = []
        for cam in sorted(self.cameras.values(), key=lambda c: c.id):
            st = cam.stats()
            out.append(
                {
                    "id": cam.id,
                    "name": cam.name,
                    "url": cam.url,
                    "source": cam.source,
                    "state": cam.state,
                    "reason": cam.reason,
                    "connected": st.connected if st else False,
                    "recording": st.recording if st else False,
                    "fps": round(st.fps, 2) if st else None,
                    "bitrate_kbps": round(st.bitrate_bps / 1000, 1) if st else None,
                    "last_packet_age_s": st.last_packet_age_s if st else None,
                    "reconnects": st.reconnects if st else 0,
                    "segments": st.segments if st else 0,
                    "gap_since": st.current_gap.start if st and st.current_gap else None,
                    "last_error": st.last_error if st else cam.reason,
                }
            )
        return out


def discovery_interfaces(config: EdgeConfig) -> list[str]:
    """Where the daemon probes and listens: the configured interfaces, or every non-loopback
    interface that is up when none is named (as docs/configuration.md says); none when
    discovery is off."""
    if not config.discovery.enabled:
        return []
    return config.discovery_interfaces() or default_interfaces()


def _profiles(report: DeviceReport | None) -> list[m.StreamProfile]:
    out: list[m.StreamProfile] = []
    if report is None:
        return out
    seen: set[str] = set()
    for p in report.profiles[:16]:
        if not p.token or p.token in seen or not p.width or not p.height:
            continue
        seen.add(p.token)
        try:
            out.append(
                m.StreamProfile(
                    token=p.token,
                    name=p.name or None,
                    codec=_CODECS.get(p.codec.upper(), "unknown"),  # type: ignore[arg-type]
                    width=p.width,
                    height=p.height,
                    fps=float(p.fps) if p.fps else None,
                    bitrate_kbps=float(p.bitrate_kbps) if p.bitrate_kbps else None,
                    rtsp_url=p.rtsp_url,
                )
            )
        except ValueError as exc:  # a camera that lies about its profile: list the rest
            log.warning("%s:%s profile %s not reported: %s", report.host, report.port, p.token, exc)
    return out
