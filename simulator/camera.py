"""What one virtual camera *is*: identity, stream profiles, credentials and its current faults.

Every service of the simulator (ONVIF SOAP, snapshot, RTSP, WS-Discovery) reads the same
`VirtualCamera` object, so a fault switched at run time is seen by all of them at once.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

Picture = Literal["normal", "black", "covered", "frozen", "blurred", "moved"]
PICTURES: tuple[Picture, ...] = ("normal", "black", "covered", "frozen", "blurred", "moved")

#: Fault kinds accepted by the control API and `camera-sim fault CAM KIND`.
FAULT_KINDS = (
    "clear",  # back to a healthy camera
    "offline",  # every port refuses connections; discovery silent
    "stall",  # RTSP sessions stay open but no packet flows
    "black",
    "covered",
    "frozen",
    "blurred",
    "moved",  # picture faults: what the image shows
    "clock-skew",  # camera clock off by VALUE seconds (ONVIF time, WS-Security window)
    "wrong-credentials",  # the camera's password was changed behind our back
    "reboot",  # down for VALUE seconds, then back with new RTSP sessions
    "bitrate",  # streams re-encoded at VALUE kbit/s (main profile; sub scales with it)
)

Codec = Literal["H264", "H265"]


@dataclass(frozen=True)
class StreamProfile:
    """One ONVIF media profile and the RTSP mount that serves it."""

    token: str  # "main" or "sub"; also the RTSP path segment
    width: int
    height: int
    bitrate_kbps: int
    fps: int = 25
    gop: int = 50  # 2 s at 25 fps
    codec: Codec = "H264"


@dataclass
class Faults:
    """Run-time faults of one camera; all off means a healthy camera."""

    offline: bool = False
    stall: bool = False
    picture: Picture = "normal"
    clock_skew_s: float = 0.0
    wrong_credentials: bool = False
    bitrate_kbps: int | None = None  # overrides the main profile's bitrate when set
    reboot_until: float | None = None  # monotonic time at which a reboot ends

    def describe(self) -> list[str]:
        """Human-readable list of what is wrong, for `camera-sim list`."""
        out: list[str] = []
        if self.offline:
            out.append("offline")
        if self.reboot_until is not None:
            out.append(f"rebooting ({max(0.0, self.reboot_until - time.monotonic()):.0f} s left)")
        if self.stall:
            out.append("stall")
        if self.picture != "normal":
            out.append(self.picture)
        if self.clock_skew_s:
            out.append(f"clock-skew {self.clock_skew_s:+.0f} s")
        if self.wrong_credentials:
            out.append("wrong-credentials")
        if self.bitrate_kbps is not None:
            out.append(f"bitrate {self.bitrate_kbps} kbit/s")
        return out


@dataclass
class VirtualCamera:
    """A simulated ONVIF camera as its network services see it."""

    index: int
    id: str  # e.g. "cam-01"
    name: str  # shown in the picture and in ONVIF scopes
    host: str
    onvif_port: int
    rtsp_port: int
    user: str
    password: str
    profiles: tuple[StreamProfile, ...]
    manufacturer: str = "isocam-sim"
    model: str = "VirtualCam 1080"
    firmware: str = "1.0.0"
    serial: str = ""
    hardware_id: str = "VC1080"
    location: str = "quarantine-facility"
    endpoint_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    faults: Faults = field(default_factory=Faults)
    #: bumped on every reboot so RTSP session ids and the WS-Discovery metadata version change
    boot_count: int = 1

    def __post_init__(self) -> None:
        if not self.serial:
            self.serial = f"SIM{self.index:06d}"

    # --- what the services ask -------------------------------------------------------------
    @property
    def reachable(self) -> bool:
        """False while offline or rebooting: ports refuse, discovery is silent."""
        if self.faults.reboot_until is not None and time.monotonic() >= self.faults.reboot_until:
            self.faults.reboot_until = None
        return not self.faults.offline and self.faults.reboot_until is None

    @property
    def effective_password(self) -> str:
        """The password the camera really accepts (differs from the advertised one under
        the `wrong-credentials` fault)."""
        return self.password + "-changed" if self.faults.wrong_credentials else self.password

    def now(self) -> float:
        """The camera's own clock (UNIX seconds), skewed by the `clock-skew` fault."""
        return time.time() + self.faults.clock_skew_s

    def profile(self, token: str) -> StreamProfile:
        for p in self.profiles:
            if p.token == token:
                return p
        raise KeyError(token)

    def current_bitrate_kbps(self, token: str) -> int:
        """Bitrate a profile streams at now (the `bitrate` fault scales both profiles)."""
        p = self.profile(token)
        if self.faults.bitrate_kbps is None:
            return p.bitrate_kbps
        main = self.profiles[0].bitrate_kbps
        return max(64, round(p.bitrate_kbps * self.faults.bitrate_kbps / main))

    @property
    def onvif_url(self) -> str:
        return f"http://{self.host}:{self.onvif_port}/onvif/device_service"

    def rtsp_url(self, token: str) -> str:
        return f"rtsp://{self.host}:{self.rtsp_port}/{token}"

    @property
    def snapshot_url(self) -> str:
        return f"http://{self.host}:{self.onvif_port}/snapshot.jpg"

    def announcement(self) -> dict[str, object]:
        """The JSON line `camera-sim run` prints per camera once it is ready."""
        return {
            "id": self.id,
            "name": self.name,
            "onvif_url": self.onvif_url,
            "rtsp_main": self.rtsp_url("main"),
            "rtsp_sub": self.rtsp_url("sub"),
            "snapshot_url": self.snapshot_url,
            "user": self.user,
            "password": self.password,
            "serial": self.serial,
            "faults": self.faults.describe(),
        }
