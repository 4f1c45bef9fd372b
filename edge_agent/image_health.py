"""Image health: is the camera still showing what it should? Judged on keyframes only.

The recorder hands over its latest compressed keyframe (`KeyframeSample`); at most once per
`health.check_interval_seconds` per camera the keyframe is decoded (never anything but that one
keyframe: `skip_frame="NONKEY"`, a fresh single-threaded decoder per check), scaled to
`ANALYSIS_WIDTH` pixels wide and measured with OpenCV:

- **luma_mean**: mean of full-range luma (0-255). At or below `black_max_luma`: *black*.
- **sharpness**: variance of the Laplacian. Dark (≤ `covered_max_luma`) and unsharp
  (≤ `covered_max_sharpness`): *covered*. Normally lit but ≤ `blurred_max_sharpness`, or fallen
  to `blurred_max_ratio` of the camera's own baseline (contrast-normalised, so dusk or a dimmer
  scene does not count as blur): *blurred*.
- **motion**: mean absolute difference to the previously checked keyframe. At or below
  `frozen_max_diff` while new keyframes keep arriving: *frozen*.
- **similarity** to the scene signature taken at enrolment (see below). Below
  `moved_max_similarity`: *moved*.

A fault is reported when `confirm_checks` consecutive checks agree, and cleared the same way.
A check that cannot judge a fault (a black picture says nothing about focus or aim) leaves it
as it is.

The scene signature is deliberately not an image: the footage is a state secret, and the
reference is kept for the camera's life. It is a 32-column grid (≈ 40 x 40 pixels of a 720p
picture per cell) of band-passed edge energy, quantised to one signed byte per cell (576 bytes
for 16:9), with no grey levels, colour or texture detail: enough to tell that the walls and
doors are no longer where they were, far too coarse to show a person, a face or writing.
Similarity is the normalised correlation of the signatures, the best of a ±1.25 % shift (wind
and vibration); measured on the simulator: same view 0.93-0.95, noise and lighting changes
0.88-0.94, a 3 % pan 0.74, 5 % 0.39, 5° roll 0.44, the simulator's `moved` 0.05.

Threading: `ImageHealthMonitor.check` blocks (decode + OpenCV, 2-10 ms, measured in
`bench/image_health.py`); `ImageHealthChecker` runs it on a small thread pool (one worker by
default: PyAV and OpenCV release the GIL, and the recorder needs the other core) and hands the
transitions to an async callback on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter

from edge_agent.config import HealthConfig
from edge_agent.keyframes import KeyframeSample
from sitelink.messages import MAX_THUMBNAIL_BYTES, ImageFault, ImageFaultEvent, ImageHealth

log = logging.getLogger(__name__)

#: Every fault, in the order they are judged and reported.
FAULTS: Final[tuple[ImageFault, ...]] = ("black", "covered", "frozen", "blurred", "moved")

#: Width of the picture that is measured. Fixed, so thresholds mean the same on a main and a
#: sub stream; small, so scaling and measuring cost < 1 ms (the decode is the cost).
ANALYSIS_WIDTH: Final = 320
#: Columns of the scene signature; rows follow the aspect ratio (18 for 16:9).
SIGNATURE_COLUMNS: Final = 32
#: Shift tolerated when comparing signatures, in pixels of the half-size edge map
#: (2 px of 160 = ±1.25 % of the width): a pole swaying in the wind is not a moved camera.
SIGNATURE_SHIFT: Final = 2
#: Sigma (in cells) of the blur subtracted from the edge energy: removes the coarse layout
#: (floor below, wall above) that a pan keeps, so what is compared is where things are.
SIGNATURE_HIGHPASS_SIGMA: Final = 2.0
#: Default for the relative blur test: contrast-normalised sharpness at or below this fraction
#: of the camera's baseline is blurred (the simulator's `blurred` falls to < 0.01).
BLURRED_MAX_RATIO: Final = 0.25
#: The baseline is the median of this many recent sharp checks (10 minutes at 10 s)...
BASELINE_CHECKS: Final = 60
#: ...once there are at least this many; before that, the value stored at enrolment.
BASELINE_MIN_CHECKS: Final = 3
#: Largest keyframe accepted (a 4K H.265 I-frame is ~1-2 MB); larger is not a camera's.
MAX_KEYFRAME_BYTES: Final = 16 * 1024 * 1024
MAX_EXTRADATA_BYTES: Final = 64 * 1024
#: Decoders accepted, by FFmpeg name ("h265" taken as "hevc").
DECODERS: Final[dict[str, Literal["h264", "hevc"]]] = {
    "h264": "h264",
    "hevc": "hevc",
    "h265": "hevc",
}
#: JPEG qualities tried for the snapshot until it fits a health message's thumbnail.
_JPEG_QUALITIES: Final = (70, 55, 40, 25)

_SIGNATURE_MAGIC: Final = b"IHS1"
_SIGNATURE_HEADER: Final = struct.Struct(">4sBBf")

#: uint8 (height, width) picture and float32 map; plain ndarray because OpenCV's stubs say
#: no more than that
Gray = np.ndarray
FloatMap = np.ndarray


class ImageHealthError(ValueError):
    """A keyframe that cannot be checked (undecodable, unsupported, out of bounds); the
    message is one line that names the camera and the reason, `reason` a short code
    (`codec`, `size`, `extradata`, `decode`, `no_picture`, `corrupt`, `camera`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# --- values and transitions -----------------------------------------------------------------


@dataclass(frozen=True)
class ImageMeasurement:
    """What one check measured. `motion` is None on a camera's first check, `similarity`
    when no reference is enrolled yet, `sharpness_ratio` while there is no baseline."""

    luma_mean: float
    sharpness: float
    motion: float | None
    similarity: float | None
    sharpness_ratio: float | None

    def values(self) -> dict[str, float]:
        """The measured signals by name, as `ImageFaultEvent.measured` carries them."""
        out = {"luma_mean": round(self.luma_mean, 2), "sharpness": round(self.sharpness, 2)}
        if self.motion is not None:
            out["motion"] = round(self.motion, 3)
        if self.similarity is not None:
            out["similarity"] = round(self.similarity, 3)
        if self.sharpness_ratio is not None:
            out["sharpness_ratio"] = round(self.sharpness_ratio, 4)
        return out


@dataclass(frozen=True)
class ImageFaultTransition:
    """An image fault started (`active`) or ended on `camera_id`; `wall` is when the deciding
    keyframe arrived, `values` what that check measured. The daemon turns it into an
    `ImageFaultEvent` once it has assigned the site's next `seq`."""

    camera_id: str
    fault: ImageFault
    active: bool
    wall: float
    values: dict[str, float] = field(default_factory=dict)

    def event_fields(self) -> dict[str, Any]:
        """The `ImageFaultEvent` fields other than `seq` and `ts`, for a daemon that assigns
        those itself (`emit(ImageFaultEvent, **fields)`); keep `wall` as `ts` if it can."""
        return {
            "camera": self.camera_id,
            "fault": self.fault,
            "active": self.active,
            "measured": dict(self.values),
        }

    def to_event(self, seq: int, ts: float | None = None) -> ImageFaultEvent:
        """The event to spool and publish; `ts` defaults to the keyframe's arrival time."""
        return ImageFaultEvent(seq=seq, ts=self.wall if ts is None else ts, **self.event_fields())


@dataclass(frozen=True)
class CheckCost:
    """Time one check took in the worker: decode, then scaling + measuring + snapshot.
    Wall-clock seconds; `cpu` is the worker thread's CPU time for the whole check."""

    decode: float
    analysis: float
    cpu: float

    @property
    def total(self) -> float:
        return self.decode + self.analysis


@dataclass(frozen=True)
class _Published:
    """What readers on other threads see; replaced as a whole after each check."""

    health: ImageHealth | None = None
    snapshot: bytes | None = None
    measurement: ImageMeasurement | None = None


@dataclass
class _Debounce:
    active: bool = False
    streak: int = 0  # consecutive checks that disagreed with `active`

    def observe(self, seen: bool | None, confirm: int) -> bool:
        """Feed one check's verdict (None: cannot tell); True when the state flipped."""
        if seen is None:
            return False
        if seen == self.active:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak < confirm:
            return False
        self.active, self.streak = seen, 0
        return True


# --- the scene signature --------------------------------------------------------------------


@dataclass(frozen=True)
class SceneSignature:
    """The enrolment reference: coarse band-passed edge energy plus the sharpness baseline.

    `grid` is the signature as unit-norm, zero-mean floats (columns x rows from `cells`);
    `detail` the contrast-normalised sharpness at enrolment (None: unknown)."""

    grid: FloatMap
    detail: float | None

    @property
    def cells(self) -> tuple[int, int]:
        rows, cols = self.grid.shape
        return cols, rows

    def to_bytes(self) -> bytes:
        """Serialised: magic, columns, rows, detail (NaN: none), one int8 per cell."""
        cols, rows = self.cells
        std = float(self.grid.std()) or 1.0
        q = np.clip(np.rint(self.grid / (4.0 * std) * 127.0), -127, 127).astype(np.int8)
        detail = math.nan if self.detail is None else self.detail
        return _SIGNATURE_HEADER.pack(_SIGNATURE_MAGIC, cols, rows, detail) + q.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> SceneSignature:
        """Parse `to_bytes` output; ValueError with the reason when it is not one."""
        if len(data) < _SIGNATURE_HEADER.size:
            raise ValueError("reference signature is truncated")
        magic, cols, rows, detail = _SIGNATURE_HEADER.unpack_from(data)
        if magic != _SIGNATURE_MAGIC:
            raise ValueError("not an image-health reference signature")
        if not (8 <= cols <= 64 and 4 <= rows <= 64):
            raise ValueError(f"reference signature has an impossible grid {cols}x{rows}")
        if len(data) != _SIGNATURE_HEADER.size + cols * rows:
            raise ValueError("reference signature has the wrong length for its grid")
        if not (math.isnan(detail) or (math.isfinite(detail) and detail >= 0)):
            raise ValueError("reference signature has an invalid sharpness baseline")
        q = np.frombuffer(data, np.int8, offset=_SIGNATURE_HEADER.size).reshape(rows, cols)
        grid = _normalised(q.astype(np.float32))
        if grid is None:
            raise ValueError("reference signature is blank")
        return cls(grid, None if math.isnan(detail) else float(detail))


def _normalised(m: FloatMap) -> FloatMap | None:
    m = m - m.mean()
    norm = float(np.linalg.norm(m))
    if norm < 1e-6:
        return None
    return (m / norm).astype(np.float32)


def _edge_energy(gray: Gray) -> FloatMap:
    """Gradient magnitude of the half-size picture (slightly smoothed against noise)."""
    h, w = gray.shape
    half = cv2.resize(gray, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(half.astype(np.float32), (0, 0), 1.0)
    gx = cv2.Sobel(small, cv2.CV_32F, 1, 0)
    gy = cv2.Sobel(small, cv2.CV_32F, 0, 1)
    return cv2.magnitude(gx, gy)


def _signature_grid(edges: FloatMap, cells: tuple[int, int]) -> FloatMap | None:
    m = np.sqrt(cv2.resize(edges, cells, interpolation=cv2.INTER_AREA))
    m = m - cv2.GaussianBlur(m, (0, 0), SIGNATURE_HIGHPASS_SIGMA)
    return _normalised(m)


def _signature_cells(width: int, height: int) -> tuple[int, int]:
    rows = min(64, max(4, round(SIGNATURE_COLUMNS * height / width)))
    return SIGNATURE_COLUMNS, rows


def _similarity(reference: SceneSignature, edges: FloatMap) -> float:
    """Best correlation of the current edges with the reference over small shifts, 0-1."""
    s = SIGNATURE_SHIFT
    padded = cv2.copyMakeBorder(edges, s, s, s, s, cv2.BORDER_REFLECT)
    h, w = edges.shape
    best = 0.0
    for dy in (-s, 0, s):
        for dx in (-s, 0, s):
            window = padded[s + dy : s + dy + h, s + dx : s + dx + w]
            grid = _signature_grid(window, reference.cells)
            if grid is not None:
                best = max(best, float(np.dot(grid.ravel(), reference.grid.ravel())))
    return min(1.0, best)


# --- decoding -------------------------------------------------------------------------------


def _validate(sample: KeyframeSample) -> Literal["h264", "hevc"]:
    decoder = DECODERS.get(sample.codec) if isinstance(sample.codec, str) else None
    if decoder is None:
        raise ImageHealthError(
            "codec",
            f"camera {sample.camera_id}: codec {sample.codec!r} is not checked (h264, hevc)",
        )
    if not isinstance(sample.data, bytes | bytearray | memoryview) or not sample.data:
        raise ImageHealthError("size", f"camera {sample.camera_id}: empty keyframe")
    if len(sample.data) > MAX_KEYFRAME_BYTES:
        raise ImageHealthError(
            "size",
            f"camera {sample.camera_id}: keyframe of {len(sample.data)} bytes is larger than "
            f"{MAX_KEYFRAME_BYTES}",
        )
    extradata = sample.extradata
    if extradata is not None and (
        not isinstance(extradata, bytes) or len(extradata) > MAX_EXTRADATA_BYTES
    ):
        raise ImageHealthError("extradata", f"camera {sample.camera_id}: invalid codec extradata")
    return decoder


def decode_keyframe(sample: KeyframeSample) -> av.VideoFrame:
    """Decode the sample's one keyframe; ImageHealthError when it holds no intact picture.

    A fresh single-threaded decoder per call: measured as fast as keeping one per camera
    (creating it costs ~0.05 ms), it holds no ~3 MiB of frame buffers between checks, and a
    codec or parameter-set change needs no special case. Frame threads would only delay the
    frame. Frames the decoder marks corrupt (a truncated or damaged packet, concealed) are
    refused rather than judged."""
    decoder = _validate(sample)
    ctx = av.CodecContext.create(decoder, "r")
    ctx.thread_count = 1
    ctx.skip_frame = "NONKEY"
    if sample.extradata:
        ctx.extradata = bytes(sample.extradata)
    try:
        frames = ctx.decode(av.Packet(bytes(sample.data)))
        if not frames:  # a decoder with reordering delay gives it up only when drained
            frames = ctx.decode(None)
    except av.FFmpegError as exc:
        raise ImageHealthError(
            "decode",
            f"camera {sample.camera_id}: keyframe {sample.seq} cannot be decoded "
            f"({type(exc).__name__})",
        ) from None
    if not frames:
        raise ImageHealthError(
            "no_picture",
            f"camera {sample.camera_id}: keyframe {sample.seq} holds no picture "
            "(not a keyframe, or its parameter sets are missing)",
        )
    frame = frames[0]
    if frame.is_corrupt:
        raise ImageHealthError(
            "corrupt",
            f"camera {sample.camera_id}: keyframe {sample.seq} is damaged (decoder reports "
            "a corrupt picture)",
        )
    if frame.width < 16 or frame.height < 16:
        raise ImageHealthError(
            "size",
            f"camera {sample.camera_id}: keyframe {sample.seq} is only {frame.width}x"
            f"{frame.height} pixels",
        )
    return frame


def _analysis_size(width: int, height: int) -> tuple[int, int]:
    h = round(ANALYSIS_WIDTH * height / width / 2) * 2
    return ANALYSIS_WIDTH, min(2 * ANALYSIS_WIDTH, max(32, h))


def _small_bgr(frame: av.VideoFrame, reformatter: VideoReformatter) -> np.ndarray:
    """The picture at analysis size as BGR, in one swscale pass (area-averaged, limited-range
    YUV expanded to full range so black is 0, as the thresholds assume). The reformatter is
    kept per camera: it caches the swscale context, which `frame.reformat()` would build
    anew for every decoded frame (measured 3.5 ms against 0.4 ms at 720p)."""
    w, h = _analysis_size(frame.width, frame.height)
    small = reformatter.reformat(frame, width=w, height=h, format="bgr24", interpolation="AREA")
    return small.to_ndarray()


def _snapshot_jpeg(bgr: np.ndarray) -> bytes | None:
    picture = bgr
    for _ in range(3):
        for quality in _JPEG_QUALITIES:
            ok, buf = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok and len(buf) <= MAX_THUMBNAIL_BYTES:
                return bytes(buf.tobytes())
        h, w = picture.shape[:2]
        picture = cv2.resize(picture, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    return None


# --- one camera -----------------------------------------------------------------------------


class ImageHealthMonitor:
    """Image checks of one camera: decode a keyframe now and then, judge, debounce.

    `check()` may be called as often as the caller likes (on every new keyframe, say); it
    decodes at most once per `config.check_interval_seconds` and never the same keyframe twice.
    Checks of one monitor are serialised; `current()`, `snapshot_jpeg()` and
    `reference_signature()` may be read from any thread at any time.

    `reference` is the scene signature stored at enrolment (`reference_signature()` of an
    earlier run). Without one, the first check whose picture is neither black, covered nor
    blurred becomes the reference; `reference_version` then changes so the daemon can store it.
    """

    def __init__(
        self,
        camera_id: str,
        config: HealthConfig,
        reference: bytes | None = None,
        *,
        blurred_max_ratio: float = BLURRED_MAX_RATIO,
    ) -> None:
        if not 0 <= blurred_max_ratio < 1:
            raise ValueError("blurred_max_ratio must be in [0, 1)")
        if config.confirm_checks < 1:
            raise ValueError("confirm_checks must be at least 1")
        self.camera_id = camera_id
        self.config = config
        self.blurred_max_ratio = blurred_max_ratio
        self._reference = None if reference is None else SceneSignature.from_bytes(reference)
        #: +1 whenever the reference changes (enrolment): the daemon stores it again.
        self.reference_version = 0
        self._state = {fault: _Debounce() for fault in FAULTS}
        self._baseline: deque[float] = deque(maxlen=BASELINE_CHECKS)
        self._previous: Gray | None = None
        self._last_seq: int | None = None
        self._last_decode: float | None = None
        self._check_lock = threading.Lock()
        self._reformatter = VideoReformatter()  # used under _check_lock only
        self._published = _Published()
        #: successful checks / samples refused, the last refusal, the last check's cost
        self.checks = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_cost: CheckCost | None = None

    # -- reading (any thread) -----------------------------------------------------------------

    def current(self) -> ImageHealth | None:
        """The last check's signals and the faults active now; None before the first check."""
        return self._published.health

    def measurement(self) -> ImageMeasurement | None:
        return self._published.measurement

    def active_faults(self) -> list[ImageFault]:
        return [f for f in FAULTS if self._state[f].active]

    def snapshot_jpeg(self) -> bytes | None:
        """A small JPEG (≤ `MAX_THUMBNAIL_BYTES`) of the last checked keyframe. Kept in memory
        only: it is footage, and is never written to disk unsealed."""
        return self._published.snapshot

    def reference_signature(self) -> bytes | None:
        """The enrolment reference as a non-reversible scene signature (see the module doc),
        for the daemon to store and give back at the next start; None until enrolled."""
        ref = self._reference
        return ref.to_bytes() if ref is not None else None

    def due(self, now: float | None = None) -> bool:
        """Whether a check now would decode (the rate limit has passed)."""
        now = time.monotonic() if now is None else now
        last = self._last_decode
        return last is None or now - last >= self.config.check_interval_seconds

    @property
    def last_seq(self) -> int | None:
        """`seq` of the last keyframe taken for a check (decoded or refused)."""
        return self._last_seq

    # -- changing -----------------------------------------------------------------------------

    def enrol(self) -> None:
        """Forget the reference and the sharpness baseline: the next usable check becomes
        the new reference (after an installer re-aimed the camera on purpose)."""
        with self._check_lock:
            self._reference = None
            self._baseline.clear()
            self._state["moved"] = _Debounce(active=self._state["moved"].active)

    def check(
        self,
        sample: KeyframeSample,
        now: float | None = None,
        before: KeyframeSample | None = None,
    ) -> list[ImageFaultTransition]:
        """Check `sample` if it is new and the rate limit allows; returns the faults that
        started or ended. Raises ImageHealthError (counted in `errors`) for a sample that
        cannot be checked; the monitor keeps working with the next one.

        `before` is the stream keyframe that came just before `sample`, when the caller saw
        it. It is decoded only when the picture looks frozen against the previous *check*: a
        source whose picture repeats with a period (a looping test clip, a patrol tour) can
        show two identical keyframes a check interval apart while the stream moves; frozen
        then also needs the two consecutive stream keyframes to be the same."""
        if sample.camera_id != self.camera_id:
            raise ImageHealthError(
                "camera",
                f"keyframe of camera {sample.camera_id} given to the monitor of {self.camera_id}",
            )
        with self._check_lock:
            now = time.monotonic() if now is None else now
            if sample.seq == self._last_seq or not self.due(now):
                return []
            self._last_decode = now
            self._last_seq = sample.seq
            cpu0, t0 = time.thread_time(), time.perf_counter()
            try:
                frame = decode_keyframe(sample)
            except ImageHealthError as exc:
                self.errors += 1
                self.last_error = str(exc)
                raise
            t1 = time.perf_counter()
            if before is not None and (
                before.seq >= sample.seq or before.camera_id != sample.camera_id
            ):
                before = None
            transitions = self._judge(frame, sample.wall, before)
            t2 = time.perf_counter()
            self.last_cost = CheckCost(t1 - t0, t2 - t1, time.thread_time() - cpu0)
            self.checks += 1
            return transitions

    # -- judging ------------------------------------------------------------------------------

    def _judge(
        self, frame: av.VideoFrame, wall: float, before: KeyframeSample | None = None
    ) -> list[ImageFaultTransition]:
        cfg = self.config
        bgr = _small_bgr(frame, self._reformatter)
        gray: Gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        luma = float(gray.mean())
        contrast = float(gray.var())
        sharpness = float(cv2.Laplacian(gray, cv2.CV_64F).var())
        # Laplacian variance over intensity variance: unchanged when the light halves
        detail = sharpness / max(contrast, 1.0)
        motion = None
        if self._previous is not None and self._previous.shape == gray.shape:
            motion = float(cv2.absdiff(gray, self._previous).mean())
        self._previous = gray
        if motion is not None and motion <= cfg.frozen_max_diff and before is not None:
            try:
                prior = cv2.cvtColor(
                    _small_bgr(decode_keyframe(before), self._reformatter), cv2.COLOR_BGR2GRAY
                )
            except ImageHealthError:
                prior = None
            if prior is not None and prior.shape == gray.shape:
                motion = max(motion, float(cv2.absdiff(gray, prior).mean()))

        black = luma <= cfg.black_max_luma
        covered = (
            not black and luma <= cfg.covered_max_luma and sharpness <= cfg.covered_max_sharpness
        )
        dark = luma <= cfg.covered_max_luma  # not "normally lit": focus is not judged
        baseline = self._baseline_detail()
        ratio = detail / baseline if baseline else None
        blurred: bool | None = None
        if not (black or covered or dark):
            blurred = sharpness <= cfg.blurred_max_sharpness or (
                ratio is not None and ratio <= self.blurred_max_ratio
            )
        frozen = None if black or covered or motion is None else motion <= cfg.frozen_max_diff

        edges = _edge_energy(gray)
        usable = not (black or covered or blurred)
        if self._reference is None and usable and blurred is not None:
            grid = _signature_grid(edges, _signature_cells(gray.shape[1], gray.shape[0]))
            if grid is not None:
                self._reference = SceneSignature(grid, detail)
                self.reference_version += 1
        similarity = _similarity(self._reference, edges) if self._reference else None
        moved = None
        if usable and similarity is not None:
            moved = similarity < cfg.moved_max_similarity

        measured = ImageMeasurement(luma, sharpness, motion, similarity, ratio)
        seen: dict[ImageFault, bool | None] = {
            "black": black,
            "covered": covered,
            "frozen": frozen,
            "blurred": blurred,
            "moved": moved,
        }
        values = measured.values()
        transitions = [
            ImageFaultTransition(self.camera_id, fault, self._state[fault].active, wall, values)
            for fault in FAULTS
            if self._state[fault].observe(seen[fault], cfg.confirm_checks)
        ]
        if blurred is False and not self._state["blurred"].active:
            self._baseline.append(detail)
        self._publish(measured, bgr)
        return transitions

    def _baseline_detail(self) -> float | None:
        if len(self._baseline) >= BASELINE_MIN_CHECKS:
            return float(np.median(np.fromiter(self._baseline, np.float64)))
        ref = self._reference
        return ref.detail if ref is not None and ref.detail else None

    def _publish(self, measured: ImageMeasurement, bgr: np.ndarray) -> None:
        health = ImageHealth(
            luma_mean=round(min(255.0, measured.luma_mean), 2),
            sharpness=round(min(1e9, measured.sharpness), 2),
            motion=None if measured.motion is None else round(min(255.0, measured.motion), 3),
            scene_diff=None if measured.similarity is None else round(1 - measured.similarity, 3),
            faults=self.active_faults(),
        )
        self._published = _Published(health, _snapshot_jpeg(bgr), measured)


# --- many cameras ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckerStats:
    """Totals since the checker started, for metrics and `edge-agent status`."""

    cameras: int
    checks: int
    errors: int
    decode_seconds: float
    analysis_seconds: float
    cpu_seconds: float
    max_check_seconds: float
    last_round_seconds: float


class ImageHealthChecker:
    """Runs image checks for every camera on a small thread pool, off the event loop.

    `latest_keyframe(camera_id)` returns the camera's newest `KeyframeSample` (the recorder's
    `last_keyframe`) or None; it is called on the event loop and must not block. Each round
    (`check_due`) checks, one camera after the other on `workers` threads, the cameras whose
    rate limit has passed and that have a keyframe not yet checked; so at most `workers`
    decodes run at once and nothing queues up (a slow round only delays the next). Every
    transition is awaited through `on_transition` in order; `on_reference(camera_id, bytes)`
    is awaited when a camera enrolled a new reference.
    """

    def __init__(
        self,
        config: HealthConfig,
        latest_keyframe: Callable[[str], KeyframeSample | None],
        on_transition: Callable[[ImageFaultTransition], Awaitable[None]],
        *,
        on_reference: Callable[[str, bytes], Awaitable[None]] | None = None,
        workers: int = 1,
        blurred_max_ratio: float = BLURRED_MAX_RATIO,
    ) -> None:
        if not 1 <= workers <= 8:
            raise ValueError("workers must be between 1 and 8")
        self.config = config
        self._latest = latest_keyframe
        self._on_transition = on_transition
        self._on_reference = on_reference
        self._workers = workers
        self._blurred_max_ratio = blurred_max_ratio
        self._monitors: dict[str, ImageHealthMonitor] = {}
        self._stored_version: dict[str, int] = {}
        self._counted_checks: dict[str, int] = {}
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="image-health")
        self._logged_error: dict[str, str] = {}
        #: per camera: (latest keyframe seen, the one seen before it)
        self._seen: dict[str, tuple[KeyframeSample | None, KeyframeSample | None]] = {}
        self._totals = [0, 0, 0.0, 0.0, 0.0, 0.0]  # checks, errors, decode, analysis, cpu, max
        self._last_round = 0.0

    # -- cameras ------------------------------------------------------------------------------

    def add_camera(self, camera_id: str, reference: bytes | None = None) -> ImageHealthMonitor:
        """Start checking a camera; a stored `reference` that cannot be read is logged and
        replaced by a new enrolment rather than stopping the camera's checks."""
        try:
            monitor = ImageHealthMonitor(
                camera_id, self.config, reference, blurred_max_ratio=self._blurred_max_ratio
            )
        except ValueError as exc:
            log.warning("camera %s: stored image reference ignored (%s); re-enrolling",
                        camera_id, exc)  # fmt: skip
            monitor = ImageHealthMonitor(
                camera_id, self.config, None, blurred_max_ratio=self._blurred_max_ratio
            )
        self._monitors[camera_id] = monitor
        self._stored_version[camera_id] = monitor.reference_version
        self._counted_checks[camera_id] = 0
        return monitor

    def remove_camera(self, camera_id: str) -> None:
        self._monitors.pop(camera_id, None)
        self._stored_version.pop(camera_id, None)
        self._counted_checks.pop(camera_id, None)
        self._logged_error.pop(camera_id, None)
        self._seen.pop(camera_id, None)

    def monitor(self, camera_id: str) -> ImageHealthMonitor | None:
        return self._monitors.get(camera_id)

    @property
    def camera_ids(self) -> list[str]:
        return list(self._monitors)

    # -- running ------------------------------------------------------------------------------

    async def check_due(self) -> list[ImageFaultTransition]:
        """One round: check every camera that is due and has a new keyframe; returns (and
        hands to the callbacks) the transitions, in camera order."""
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        jobs: list[tuple[ImageHealthMonitor, KeyframeSample, KeyframeSample | None]] = []
        for camera_id, monitor in list(self._monitors.items()):
            try:
                sample = self._latest(camera_id)
            except Exception:
                if self._logged_error.get(camera_id) != "source":
                    self._logged_error[camera_id] = "source"
                    log.exception("camera %s: reading the latest keyframe failed", camera_id)
                continue
            if sample is None:
                continue
            # every tick sees every keyframe of a normal GOP: remember the one before the
            # latest (a reference, no copy), for the frozen check's second opinion
            last, before = self._seen.get(camera_id, (None, None))
            if last is None or sample.seq != last.seq:
                before, last = last, sample
                self._seen[camera_id] = (last, before)
            if monitor.due(now) and sample.seq != monitor.last_seq:
                jobs.append((monitor, sample, before))
        gate = asyncio.Semaphore(self._workers)

        async def run(
            monitor: ImageHealthMonitor, sample: KeyframeSample, before: KeyframeSample | None
        ) -> list[object]:
            async with gate:
                try:
                    return list(
                        await loop.run_in_executor(
                            self._executor, monitor.check, sample, None, before
                        )
                    )
                except ImageHealthError as exc:
                    return [exc]
                except Exception as exc:  # a bug or an OpenCV surprise: this camera only
                    log.exception("camera %s: image check failed", monitor.camera_id)
                    return [exc]

        results = await asyncio.gather(*(run(m, s, b) for m, s, b in jobs))
        transitions: list[ImageFaultTransition] = []
        for (monitor, _, _), outcome in zip(jobs, results, strict=True):
            self._account(monitor, outcome)
            for item in outcome:
                if isinstance(item, ImageFaultTransition):
                    transitions.append(item)
                    await self._on_transition(item)
            await self._store_reference(monitor)
        self._last_round = time.perf_counter() - started
        return transitions

    async def run(self, tick: float | None = None) -> None:
        """Check rounds until cancelled. `tick` (default: a quarter of the check interval, at
        most 1 s) is how often due cameras are looked for, not how often they are decoded."""
        period = tick if tick is not None else min(1.0, self.config.check_interval_seconds / 4)
        try:
            while True:
                await self.check_due()
                await asyncio.sleep(period)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the worker threads (a check in flight finishes first)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> CheckerStats:
        checks, errors, decode, analysis, cpu, worst = self._totals
        return CheckerStats(
            cameras=len(self._monitors),
            checks=int(checks),
            errors=int(errors),
            decode_seconds=decode,
            analysis_seconds=analysis,
            cpu_seconds=cpu,
            max_check_seconds=worst,
            last_round_seconds=self._last_round,
        )

    def _account(self, monitor: ImageHealthMonitor, outcome: list[object]) -> None:
        error = next((x for x in outcome if isinstance(x, Exception)), None)
        if error is not None:
            self._totals[1] += 1
            reason = error.reason if isinstance(error, ImageHealthError) else "bug"
            # one line per new kind of trouble, not one per keyframe of a broken camera
            if self._logged_error.get(monitor.camera_id) != reason:
                self._logged_error[monitor.camera_id] = reason
                log.warning("image check skipped: %s", error)
            return
        if self._logged_error.pop(monitor.camera_id, None) is not None:
            log.info("camera %s: image checks work again", monitor.camera_id)
        cost = monitor.last_cost
        if cost is None or monitor.checks == self._counted_checks.get(monitor.camera_id):
            return  # nothing was decoded (another caller checked this keyframe first)
        self._counted_checks[monitor.camera_id] = monitor.checks
        self._totals[0] += 1
        self._totals[2] += cost.decode
        self._totals[3] += cost.analysis
        self._totals[4] += cost.cpu
        self._totals[5] = max(self._totals[5], cost.total)

    async def _store_reference(self, monitor: ImageHealthMonitor) -> None:
        version = monitor.reference_version
        if version == self._stored_version.get(monitor.camera_id):
            return
        self._stored_version[monitor.camera_id] = version
        signature = monitor.reference_signature()
        if self._on_reference is not None and signature is not None:
            await self._on_reference(monitor.camera_id, signature)
