"""A fleet of virtual cameras: builds them, runs their services, and switches faults at run time.

The fleet is the only place that knows how a fault maps onto the services: ONVIF/HTTP
(`OnvifServer`), RTSP (`RtspService`, a GStreamer child process) and WS-Discovery
(`DiscoveryResponder`). Every service reads the same `VirtualCamera`, so the fleet only flips
fields on it and asks the services to re-apply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace

from simulator.camera import FAULT_KINDS, PICTURES, Codec, Faults, StreamProfile, VirtualCamera
from simulator.onvif_service import OnvifServer
from simulator.rtsp import RtspService
from simulator.scene import snapshot_jpeg
from simulator.wsdiscovery import DiscoveryResponder

log = logging.getLogger(__name__)


class FaultError(ValueError):
    """A fault request the fleet cannot carry out (unknown camera, kind or value)."""


@dataclass(frozen=True)
class FleetOptions:
    """How `camera-sim run` was asked to build its cameras."""

    cameras: int = 4
    host: str = "127.0.0.1"
    onvif_port: int = 0  # 0: a free port per camera; otherwise camera i gets onvif_port + i
    rtsp_port: int = 0  # likewise
    user: str = "admin"
    password: str = "admin123"  # noqa: S105 - the simulated cameras' well-known demo password
    main: tuple[int, int, int] = (1280, 720, 2000)  # width, height, kbit/s
    sub: tuple[int, int, int] = (640, 360, 512)
    codec: Codec = "H264"
    name_prefix: str = "Camera"
    discovery_interface: str | None = None  # IPv4 address to answer WS-Discovery on; None: off
    #: number of the first camera (ids, names and serials follow it), so several simulators
    #: can play one site without two cameras sharing a serial number
    first_index: int = 1


def _snapshot(cam: VirtualCamera) -> bytes:
    main = cam.profiles[0]
    return snapshot_jpeg(cam.name, main.width, main.height, cam.faults.picture)


class Fleet:
    """Runs the cameras of one `camera-sim run`."""

    def __init__(self, options: FleetOptions) -> None:
        self.options = options
        self.cameras: list[VirtualCamera] = []
        self._rtsp = RtspService()
        self._onvif: dict[str, OnvifServer] = {}
        self._discovery: DiscoveryResponder | None = None
        self._reboot_tasks: dict[str, asyncio.Task[None]] = {}

    def _build(self) -> None:
        o = self.options
        for i in range(o.cameras):
            profiles = (
                StreamProfile("main", o.main[0], o.main[1], o.main[2], codec=o.codec),
                StreamProfile("sub", o.sub[0], o.sub[1], o.sub[2], codec=o.codec),
            )
            self.cameras.append(
                VirtualCamera(
                    index=o.first_index + i,
                    id=f"cam-{o.first_index + i:02d}",
                    name=f"{o.name_prefix} {o.first_index + i:02d}",
                    host=o.host,
                    onvif_port=o.onvif_port + i if o.onvif_port else 0,
                    rtsp_port=o.rtsp_port + i if o.rtsp_port else 0,
                    user=o.user,
                    password=o.password,
                    profiles=profiles,
                )
            )

    async def start(self) -> None:
        """Start every camera; returns once all of them accept ONVIF and RTSP connections."""
        self._build()
        await self._rtsp.start()
        await self._rtsp.prepare(self.cameras)  # encode missing clips on every core at once
        for cam in self.cameras:
            await self._rtsp.add_camera(cam)
            server = OnvifServer(cam, _snapshot)
            cam.onvif_port = await server.start(cam.host, cam.onvif_port)
            self._onvif[cam.id] = server
        if self.options.discovery_interface:
            self._discovery = DiscoveryResponder(
                lambda: self.cameras, self.options.discovery_interface
            )
            await self._discovery.start()

    async def stop(self) -> None:
        """Stop every service; cameras say Bye on WS-Discovery first."""
        for task in self._reboot_tasks.values():
            task.cancel()
        if self._discovery is not None:
            await self._discovery.stop()
        for server in self._onvif.values():
            await server.stop()
        await self._rtsp.close()

    def camera(self, cam_id: str) -> VirtualCamera:
        for cam in self.cameras:
            if cam.id == cam_id or cam.name == cam_id or str(cam.index) == cam_id:
                return cam
        known = ", ".join(c.id for c in self.cameras)
        raise FaultError(f"no camera {cam_id!r} (cameras: {known})")

    async def set_fault(self, cam_id: str, kind: str, value: float | None = None) -> VirtualCamera:
        """Switch one fault on a camera (or `clear` all of them) and apply it to every service."""
        cam = self.camera(cam_id)
        if kind not in FAULT_KINDS:
            raise FaultError(f"unknown fault {kind!r}; known: {', '.join(FAULT_KINDS)}")
        was_reachable = cam.reachable
        f = cam.faults
        if kind == "clear":
            self._cancel_reboot(cam)
            cam.faults = Faults()
        elif kind == "offline":
            f.offline = True
        elif kind == "stall":
            f.stall = True
        elif kind in PICTURES:
            f.picture = kind
        elif kind == "clock-skew":
            f.clock_skew_s = _need_value(kind, value)
        elif kind == "wrong-credentials":
            f.wrong_credentials = True
        elif kind == "bitrate":
            kbps = int(_need_value(kind, value))
            if not 64 <= kbps <= 50_000:
                raise FaultError("bitrate must be between 64 and 50000 kbit/s")
            f.bitrate_kbps = kbps
        elif kind == "reboot":
            seconds = _need_value(kind, value)
            if not 0 < seconds <= 3600:
                raise FaultError("reboot takes a duration in seconds, 0 < N <= 3600")
            self._cancel_reboot(cam)
            f.reboot_until = time.monotonic() + seconds
            cam.boot_count += 1
            self._reboot_tasks[cam.id] = asyncio.create_task(self._end_reboot(cam, seconds))
        log.info("camera %s: fault %s%s", cam.id, kind, "" if value is None else f" {value}")
        await self._apply(cam, was_reachable)
        return cam

    def _cancel_reboot(self, cam: VirtualCamera) -> None:
        task = self._reboot_tasks.pop(cam.id, None)
        if task is not None:
            task.cancel()

    async def _end_reboot(self, cam: VirtualCamera, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._reboot_tasks.pop(cam.id, None)
        cam.faults = replace(cam.faults, reboot_until=None)
        await self._apply(cam, was_reachable=False)

    async def _apply(self, cam: VirtualCamera, was_reachable: bool) -> None:
        await self._rtsp.apply(cam)
        server = self._onvif[cam.id]
        if cam.reachable and not was_reachable:
            await server.start(cam.host, cam.onvif_port)
            if self._discovery is not None:
                await self._discovery.hello(cam)
        elif was_reachable and not cam.reachable:
            if self._discovery is not None:
                await self._discovery.bye(cam)
            await server.stop()


def _need_value(kind: str, value: float | None) -> float:
    if value is None:
        raise FaultError(f"fault {kind!r} needs a value (e.g. `camera-sim fault cam-01 {kind} 30`)")
    return value
