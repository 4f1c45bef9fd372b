"""The installer's survey: which cameras can be enrolled, why not, and what 30 days will cost.

Everything is measured: the bitrate comes from pulling each camera's main stream for a few
seconds, the disk from the data volume itself. Cameras that fail are listed with the reason,
never dropped.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.onvif_device import DeviceReport, Profile, survey_device
from edge_agent.stream_probe import StreamMeasurement, measure_stream

#: Sealing adds a header per segment and 16+4 bytes per fragment: well under 1 %.
_SEALING_OVERHEAD = 1.01

_ONVIF_REASONS_VI = {
    "unreachable": "Không kết nối được ONVIF (cổng từ chối)",
    "timeout": "Camera không trả lời ONVIF kịp thời",
    "unauthorized": "Sai tên đăng nhập hoặc mật khẩu",
    "soap_fault": "Camera trả lỗi SOAP",
    "bad_response": "Camera trả lời không hợp lệ",
    "error": "Lỗi ONVIF",
}


@dataclass(frozen=True)
class SurveyTarget:
    """A camera to survey: an ONVIF address, with the credentials to use for it."""

    host: str
    port: int
    user: str
    password: str
    source: str = "manual"  # "discovery" | "manual" | "config"


@dataclass(frozen=True)
class SurveyPolicy:
    """What makes a camera eligible, and how hard to look; from the edge configuration."""

    accept_h265: bool = True
    max_clock_offset_s: float = 5.0
    retention_days: int = 30
    measure_seconds: float = 4.0
    #: A stream that has not answered RTSP and sent a first packet by then is `timeout`
    #: (nothing received) or `stall` (answered, no picture).
    stream_open_timeout_s: float = 5.0
    onvif_timeout_s: float = 10.0
    #: Streams pulled at once: each costs a thread and ~1 % of a core at 4 Mbit/s.
    max_parallel_streams: int = 16
    #: ONVIF sessions at once: zeep is CPU-bound, so more only queue on the event loop.
    max_parallel_onvif: int = 16

    def __post_init__(self) -> None:
        if self.measure_seconds <= 0 or self.stream_open_timeout_s <= 0:
            raise ValueError("measure_seconds and stream_open_timeout_s must be > 0")
        if self.max_parallel_streams < 1 or self.max_parallel_onvif < 1:
            raise ValueError("max_parallel_streams and max_parallel_onvif must be >= 1")


@dataclass
class CameraSurvey:
    """One camera's row in the survey."""

    target: SurveyTarget
    device: DeviceReport
    stream: StreamMeasurement | None = None
    thumbnail_jpeg: bytes | None = None
    eligible: bool = False
    reasons: list[str] = field(default_factory=list)  # why not eligible
    warnings: list[str] = field(default_factory=list)  # eligible, but look at this

    @property
    def measured_mbps(self) -> float:
        if self.stream is None or self.stream.bitrate_kbps is None:
            return 0.0
        return self.stream.bitrate_kbps / 1000

    def disk_bytes(self, days: int) -> int:
        return int(self.measured_mbps * 1e6 / 8 * 86400 * days * _SEALING_OVERHEAD)

    def to_dict(self, days: int) -> dict[str, Any]:
        return {
            "address": f"{self.target.host}:{self.target.port}",
            "source": self.target.source,
            "reachable": self.device.error not in ("unreachable", "timeout"),
            "onvif_ok": self.device.ok,
            "device": {k: v for k, v in self.device.to_dict().items() if k != "profiles"},
            "profiles": [vars(p) for p in self.device.profiles],
            "stream": self.stream.to_dict() if self.stream else None,
            "measured_mbps": round(self.measured_mbps, 3),
            "disk_bytes_for_retention": self.disk_bytes(days),
            "eligible": self.eligible,
            "reasons": self.reasons,
            "warnings": self.warnings,
            "has_thumbnail": self.thumbnail_jpeg is not None,
        }


@dataclass
class SurveyReport:
    """The whole survey, with the disk arithmetic at the bottom."""

    cameras: list[CameraSurvey]
    policy: SurveyPolicy
    data_dir: Path
    disk_total: int
    disk_free: int
    started: float
    seconds: float

    @property
    def total_mbps(self) -> float:
        return sum(c.measured_mbps for c in self.cameras if c.eligible)

    @property
    def disk_needed(self) -> int:
        return sum(c.disk_bytes(self.policy.retention_days) for c in self.cameras if c.eligible)

    @property
    def days_held(self) -> float | None:
        """Days of footage the free space holds at the measured rate (None: nothing to record)."""
        per_day = sum(c.disk_bytes(1) for c in self.cameras if c.eligible)
        return round(self.disk_free / per_day, 1) if per_day else None

    def to_dict(self) -> dict[str, Any]:
        days = self.policy.retention_days
        return {
            "started": self.started,
            "seconds": round(self.seconds, 2),
            "retention_days": days,
            "cameras": [c.to_dict(days) for c in self.cameras],
            "summary": {
                "cameras": len(self.cameras),
                "eligible": sum(c.eligible for c in self.cameras),
                "not_eligible": sum(not c.eligible for c in self.cameras),
                "total_measured_mbps": round(self.total_mbps, 3),
                "disk_needed_bytes": self.disk_needed,
                "data_dir": str(self.data_dir),
                "disk_total_bytes": self.disk_total,
                "disk_free_bytes": self.disk_free,
                "days_of_retention_disk_holds": self.days_held,
                "disk_sufficient": self.disk_free >= self.disk_needed,
            },
        }


def judge(cam: CameraSurvey, policy: SurveyPolicy) -> None:
    """Set the eligibility verdict and its reasons (Vietnamese first, English after ' / ')."""
    d = cam.device
    if d.error is not None:
        vi = _ONVIF_REASONS_VI.get(d.error, "Lỗi ONVIF")
        cam.reasons.append(f"{vi} / ONVIF {d.error}: {d.error_message}")
    s = cam.stream
    if d.ok and s is None:
        cam.reasons.append("Không có luồng RTSP / no RTSP stream advertised")
    if s is not None and s.error is not None:
        cam.reasons.append(f"Không đọc được luồng RTSP / RTSP {s.error}: {s.error_message}")
    if s is not None and s.codec is not None:
        if s.codec == "H265" and not policy.accept_h265:
            cam.reasons.append(
                "Camera dùng H.265, cấu hình chỉ nhận H.264 / H.265 refused by config"
            )
        elif s.codec == "H265":
            cam.warnings.append(
                "H.265: trình duyệt không phát trực tiếp, cần luồng phụ H.264 / H.265: browsers "
                "cannot play it; live view needs an H.264 sub stream"
            )
        elif s.codec not in ("H264", "H265"):
            cam.reasons.append(f"Mã hoá {s.codec} không hỗ trợ / codec {s.codec} not supported")
    if d.clock_offset_s is not None and abs(d.clock_offset_s) > policy.max_clock_offset_s:
        cam.reasons.append(
            f"Đồng hồ camera lệch {d.clock_offset_s:+.1f} s / camera clock off by "
            f"{d.clock_offset_s:+.1f} s (max {policy.max_clock_offset_s:.0f} s): set NTP"
        )
    advertised = d.profiles[0].bitrate_kbps if d.profiles else None
    if s is not None and s.bitrate_kbps and advertised and s.bitrate_kbps > 1.5 * advertised:
        cam.warnings.append(
            f"Bitrate đo được {s.bitrate_kbps:.0f} kbit/s > cấu hình {advertised} / measured "
            f"bitrate exceeds the advertised limit"
        )
    cam.eligible = not cam.reasons


def _disk_usage(data_dir: Path) -> tuple[int, int]:
    probe = data_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the data dir may not exist before enrolment
    usage = shutil.disk_usage(probe)
    return usage.total, usage.free


@dataclass
class _Limits:
    """Bounds on what one survey does at once (see `SurveyPolicy`)."""

    onvif: asyncio.Semaphore
    streams: asyncio.Semaphore


async def _measure(
    url: str, target: SurveyTarget, policy: SurveyPolicy, limits: _Limits
) -> StreamMeasurement:
    async with limits.streams:
        return await measure_stream(
            url,
            target.user,
            target.password,
            policy.measure_seconds,
            open_timeout=policy.stream_open_timeout_s,
        )


async def _survey_one(target: SurveyTarget, policy: SurveyPolicy, limits: _Limits) -> CameraSurvey:
    """ONVIF and the stream measurement overlap: the measurement starts as soon as ONVIF has
    named the main stream, and the device information and snapshot are fetched meanwhile."""
    stream_task: asyncio.Task[StreamMeasurement] | None = None

    def start_stream(main: Profile) -> None:
        nonlocal stream_task
        if main.rtsp_url and stream_task is None:
            stream_task = asyncio.create_task(_measure(main.rtsp_url, target, policy, limits))

    try:
        async with limits.onvif:
            device, jpeg = await survey_device(
                target.host,
                target.port,
                target.user,
                target.password,
                policy.onvif_timeout_s,
                on_main_stream=start_stream,
            )
        cam = CameraSurvey(target=target, device=device, thumbnail_jpeg=jpeg)
        if stream_task is not None:
            cam.stream = await stream_task
    finally:
        if stream_task is not None and not stream_task.done():
            stream_task.cancel()  # only when we are cancelled ourselves
    judge(cam, policy)
    return cam


async def run_survey(
    targets: list[SurveyTarget],
    policy: SurveyPolicy,
    data_dir: Path,
    progress: Callable[[int, int, CameraSurvey], None] | None = None,
) -> SurveyReport:
    """Survey every target concurrently (bounded by the policy's limits);
    `progress(done, total, camera)` after each camera."""
    started, t0 = time.time(), time.monotonic()
    limits = _Limits(
        asyncio.Semaphore(policy.max_parallel_onvif), asyncio.Semaphore(policy.max_parallel_streams)
    )
    finished = 0

    async def one(t: SurveyTarget) -> CameraSurvey:
        nonlocal finished
        cam = await _survey_one(t, policy, limits)
        finished += 1
        if progress is not None:
            progress(finished, len(targets), cam)
        return cam

    ordered = await asyncio.gather(*(one(t) for t in targets))
    total, free = _disk_usage(data_dir)
    return SurveyReport(
        list(ordered), policy, data_dir, total, free, started, time.monotonic() - t0
    )


def thumbnail_data_uri(jpeg: bytes | None) -> str | None:
    """An <img src> for the HTML report (the report is one self-contained file)."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode() if jpeg else None


def render_html(report: SurveyReport) -> str:
    """The self-contained HTML report (thumbnails inlined) an installer hands over."""
    import datetime as dt

    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(
        loader=PackageLoader("edge_agent", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
    )
    data = report.to_dict()
    for row, cam in zip(data["cameras"], report.cameras, strict=True):
        row["thumb"] = thumbnail_data_uri(cam.thumbnail_jpeg)
    started = (
        dt.datetime.fromtimestamp(report.started).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")
    )
    return env.get_template("survey.html.j2").render(
        cameras=data["cameras"],
        summary=data["summary"],
        started=started,
        seconds=data["seconds"],
        retention_days=data["retention_days"],
    )
