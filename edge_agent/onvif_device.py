"""Talking to one ONVIF camera: what it is, its profiles, stream and snapshot URIs, its clock.

Every camera quirk is handled here and turned into a `DeviceReport` with a clear `error`
(reason code + message) — nothing from zeep or aiohttp leaks out to the survey or the recorder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

#: Reason codes of a failed query, in the order the installer should look at them.
REASONS = ("unreachable", "timeout", "unauthorized", "soap_fault", "bad_response", "error")


@dataclass
class Profile:
    """One media profile as the camera advertises it."""

    token: str
    name: str
    codec: str  # "H264", "H265", "JPEG", ...
    width: int | None
    height: int | None
    fps: float | None
    bitrate_kbps: int | None
    rtsp_url: str | None = None


@dataclass
class DeviceReport:
    """What one ONVIF query found; `error` is set (and most fields empty) when it failed."""

    host: str
    port: int
    manufacturer: str | None = None
    model: str | None = None
    firmware: str | None = None
    serial: str | None = None
    hardware_id: str | None = None
    clock_offset_s: float | None = None  # camera clock minus ours
    profiles: list[Profile] = field(default_factory=list)
    snapshot_url: str | None = None
    error: str | None = None  # a code from REASONS
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_onvif: ModuleType | None = None


def _import_onvif() -> ModuleType:
    """Import onvif-zeep-async without letting it reconfigure logging.

    The library calls `logging.basicConfig(level=INFO)` at import (FIELD-NOTES), which would
    flood our logs with zeep chatter; undo exactly that.
    """
    global _onvif
    if _onvif is None:
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        import onvif

        root.handlers[:] = handlers
        root.setLevel(level)
        for noisy in ("zeep", "httpx", "onvif"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        _onvif = onvif
    return _onvif


def _classify(exc: BaseException) -> tuple[str, str]:
    """Map an exception from the ONVIF stack to (reason code, one-line message)."""
    from onvif.exceptions import ONVIFAuthError, ONVIFError
    from zeep.exceptions import Fault, TransportError, XMLSyntaxError

    _import_onvif()
    text = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout", "no answer from the camera in time"
    if isinstance(exc, ONVIFAuthError):
        return "unauthorized", "the camera refused the user name or password"
    if isinstance(exc, Fault):
        # a wrong password surfaces as a plain SOAP Fault (FIELD-NOTES), recognise it by code
        code = str(getattr(exc, "subcodes", "") or "") + " " + str(exc.code or "") + " " + text
        if "notauthorized" in code.lower() or "not authorized" in text.lower():
            return "unauthorized", "the camera refused the user name or password"
        return "soap_fault", f"SOAP fault: {text}"
    if isinstance(exc, TransportError):
        if exc.status_code in (401, 403):
            return "unauthorized", "the camera refused the user name or password"
        return "bad_response", f"HTTP {exc.status_code} from the camera"
    if isinstance(exc, XMLSyntaxError):
        return "bad_response", "the camera answered with malformed XML"
    if isinstance(exc, ONVIFError):
        inner = text.lower()
        if "refused" in inner or "cannot connect" in inner or "connect call failed" in inner:
            return "unreachable", "connection refused: no ONVIF service at that address"
        if "timeout" in inner or "timed out" in inner:
            return "timeout", "no answer from the camera in time"
        if "not authorized" in inner or "notauthorized" in inner or "401" in inner:
            return "unauthorized", "the camera refused the user name or password"
        return "error", text
    if isinstance(exc, ConnectionRefusedError):
        return "unreachable", "connection refused: no ONVIF service at that address"
    if isinstance(exc, OSError):
        return "unreachable", f"network error: {text}"
    return "error", f"{type(exc).__name__}: {text}"


def _profile(p: Any) -> Profile:
    enc = getattr(p, "VideoEncoderConfiguration", None)
    res = getattr(enc, "Resolution", None)
    rate = getattr(enc, "RateControl", None)
    return Profile(
        token=str(p.token),
        name=str(getattr(p, "Name", "") or p.token),
        codec=str(getattr(enc, "Encoding", "") or "unknown").upper(),
        width=getattr(res, "Width", None),
        height=getattr(res, "Height", None),
        fps=getattr(rate, "FrameRateLimit", None),
        bitrate_kbps=getattr(rate, "BitrateLimit", None),
    )


async def query_device(
    host: str, port: int, user: str, password: str, within: float = 10.0
) -> DeviceReport:
    """Ask one camera everything the survey and the recorder need; never raises for camera
    faults (they end up in `report.error`)."""
    onvif = _import_onvif()
    report = DeviceReport(host=host, port=port)
    cam = onvif.ONVIFCamera(host, port, user, password, adjust_time=True, no_cache=True)
    try:
        async with asyncio.timeout(within):
            await cam.update_xaddrs()
            if cam.dt_diff is not None:
                report.clock_offset_s = round(cam.dt_diff.total_seconds(), 3)
            devmgmt = await cam.create_devicemgmt_service()
            info = await devmgmt.GetDeviceInformation()
            report.manufacturer = info.Manufacturer
            report.model = info.Model
            report.firmware = info.FirmwareVersion
            report.serial = info.SerialNumber
            report.hardware_id = info.HardwareId
            media = await cam.create_media_service()
            profiles = await media.GetProfiles()
            for p in profiles or []:
                prof = _profile(p)
                uri = await media.GetStreamUri(
                    {
                        "StreamSetup": {"Stream": "RTP-Unicast", "Transport": {"Protocol": "RTSP"}},
                        "ProfileToken": prof.token,
                    }
                )
                prof.rtsp_url = str(uri.Uri)
                report.profiles.append(prof)
            if report.profiles:
                snap = await media.GetSnapshotUri({"ProfileToken": report.profiles[0].token})
                report.snapshot_url = str(snap.Uri)
            if not report.profiles:
                report.error, report.error_message = "bad_response", "the camera has no profiles"
    except Exception as exc:  # every camera fault becomes a reason, see _classify
        report.error, report.error_message = _classify(exc)
        log.info("ONVIF query of %s:%s failed: %s", host, port, report.error_message)
    finally:
        # closing a broken session must not hide the real error
        with contextlib.suppress(Exception):
            await cam.close()
    return report


async def fetch_snapshot(
    host: str, port: int, user: str, password: str, profile_token: str, within: float = 10.0
) -> bytes | None:
    """The camera's JPEG snapshot (Digest, falling back to Basic), or None when it has none."""
    onvif = _import_onvif()
    cam = onvif.ONVIFCamera(host, port, user, password, adjust_time=True, no_cache=True)
    try:
        async with asyncio.timeout(within):
            await cam.update_xaddrs()
            await cam.create_media_service()
            data: bytes | None = await cam.get_snapshot(profile_token)
            return data
    except Exception as exc:
        log.info("snapshot of %s:%s failed: %s", host, port, _classify(exc)[1])
        return None
    finally:
        with contextlib.suppress(Exception):
            await cam.close()
