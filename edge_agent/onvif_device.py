"""Talking to one ONVIF camera: what it is, its profiles, stream and snapshot URIs, its clock.

Every camera quirk is handled here and turned into a `DeviceReport` with a clear `error`
(reason code + message) — nothing from zeep or aiohttp leaks out to the survey or the recorder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
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


#: Called once the main profile's RTSP URI is known, before the rest of the query runs, so
#: the survey can start pulling the stream while ONVIF answers the other questions.
MainStreamHook = Callable[[Profile], object]


async def query_device(
    host: str,
    port: int,
    user: str,
    password: str,
    within: float = 10.0,
    *,
    on_main_stream: MainStreamHook | None = None,
) -> DeviceReport:
    """Ask one camera everything the survey and the recorder need; never raises for camera
    faults (they end up in `report.error`)."""
    report, _ = await survey_device(
        host, port, user, password, within, on_main_stream=on_main_stream, snapshot=False
    )
    return report


async def survey_device(
    host: str,
    port: int,
    user: str,
    password: str,
    within: float = 10.0,
    *,
    on_main_stream: MainStreamHook | None = None,
    snapshot: bool = True,
) -> tuple[DeviceReport, bytes | None]:
    """`query_device` plus the main profile's JPEG snapshot, over one ONVIF session.

    The order is chosen for the survey's wall time: clock and services, then the profiles and
    the main profile's stream URI (handed to `on_main_stream` at once), and only then the other
    profiles' URIs, device information and the snapshot, while the stream is measured. One
    session instead of a second one for the snapshot saves a GetSystemDateAndTime/GetServices
    round and a WSDL load per camera (zeep is CPU-bound: 16 sessions at once took ~1.8 s
    here)."""
    onvif = _import_onvif()
    report = DeviceReport(host=host, port=port)
    jpeg: bytes | None = None
    cam = onvif.ONVIFCamera(host, port, user, password, adjust_time=True, no_cache=True)
    try:
        await _query(cam, report, within, on_main_stream)
        if snapshot and report.ok and report.profiles:
            jpeg = await _snapshot(cam, host, port, report.profiles[0].token, within)
    finally:
        # closing a broken session must not hide the real error
        with contextlib.suppress(Exception):
            await cam.close()
    return report, jpeg


async def _query(
    cam: Any, report: DeviceReport, within: float, on_main_stream: MainStreamHook | None
) -> None:
    try:
        async with asyncio.timeout(within):
            await cam.update_xaddrs()
            if cam.dt_diff is not None:
                report.clock_offset_s = round(cam.dt_diff.total_seconds(), 3)
            media = await cam.create_media_service()
            for i, p in enumerate((await media.GetProfiles()) or []):
                prof = _profile(p)
                prof.rtsp_url = await _stream_uri(media, prof.token)
                report.profiles.append(prof)
                if i == 0 and on_main_stream is not None:
                    on_main_stream(prof)
            await _device_information(cam, report)
            if report.profiles:
                snap = await media.GetSnapshotUri({"ProfileToken": report.profiles[0].token})
                report.snapshot_url = str(snap.Uri)
            else:
                report.error, report.error_message = "bad_response", "the camera has no profiles"
    except Exception as exc:  # every camera fault becomes a reason, see _classify
        report.error, report.error_message = _classify(exc)
        log.info("ONVIF query of %s:%s failed: %s", report.host, report.port, report.error_message)


async def _stream_uri(media: Any, token: str) -> str:
    uri = await media.GetStreamUri(
        {
            "StreamSetup": {"Stream": "RTP-Unicast", "Transport": {"Protocol": "RTSP"}},
            "ProfileToken": token,
        }
    )
    return str(uri.Uri)


async def _device_information(cam: Any, report: DeviceReport) -> None:
    devmgmt = await cam.create_devicemgmt_service()
    info = await devmgmt.GetDeviceInformation()
    report.manufacturer = info.Manufacturer
    report.model = info.Model
    report.firmware = info.FirmwareVersion
    report.serial = info.SerialNumber
    report.hardware_id = info.HardwareId


async def _snapshot(cam: Any, host: str, port: int, token: str, within: float) -> bytes | None:
    """The JPEG (Digest, falling back to Basic as FIELD-NOTES found necessary), or None."""
    for basic in (False, True):
        try:
            async with asyncio.timeout(within):
                data: bytes | None = await cam.get_snapshot(token, basic_auth=basic)
            return data
        except Exception as exc:
            log.info("snapshot of %s:%s failed: %s", host, port, _classify(exc)[1])
            if _classify(exc)[0] != "unauthorized":
                return None
    return None


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
        return await _snapshot(cam, host, port, profile_token, within)
    except Exception as exc:
        log.info("snapshot of %s:%s failed: %s", host, port, _classify(exc)[1])
        return None
    finally:
        with contextlib.suppress(Exception):
            await cam.close()
