"""What a virtual camera sees: a synthetic scene per camera, drawn with numpy + OpenCV.

The picture has what the edge agent's image checks look at (FIELD-NOTES, "Measured signals"):
a textured static background (Laplacian variance in the hundreds), a moving object (consecutive
keyframes 2 s apart differ), the camera's name and a running timecode burned in like an OSD.
Each picture fault changes exactly the signal a detector keys on:

- ``black``: all zeros.
- ``covered``: dark and nearly uniform (mean luma ≈ 35, Laplacian variance ≈ 1).
- ``frozen``: the picture of t = 0 for ever (the stream keeps flowing).
- ``blurred``: the normal picture, defocused (Laplacian variance drops by more than 100x).
- ``moved``: the background rotated and shifted, as if the camera had been knocked.

Rendering is cheap on purpose (≈ 1 ms per 720p frame): backgrounds are drawn once per camera and
cached, only the moving object and the text are drawn per frame. ``clips.py`` encodes loops of
these frames once; the snapshot endpoint encodes one as JPEG.
"""

from __future__ import annotations

import hashlib
import math
import time
from functools import lru_cache

import cv2
import numpy as np

from simulator.camera import Picture

#: Default motion period (= the clips' default loop length; clips pass their own length so
#: every loop is seamless).
DEFAULT_PERIOD_S = 4.0
#: Mean luma of the ``covered`` picture (a hand or tape over the lens lets a little light in).
COVERED_LUMA = 35
#: Rotation (degrees) and shift (fraction of the frame) of the ``moved`` picture.
MOVED_ROTATION_DEG = 9.0
MOVED_SHIFT = (0.14, 0.10)
#: The world the camera looks at is this much larger than the frame, so a moved camera
#: still sees scenery (not black corners) around its new view.
_WORLD_MARGIN = 1.35

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def render_frame(
    name: str,
    width: int,
    height: int,
    picture: Picture,
    t: float,
    *,
    period: float = DEFAULT_PERIOD_S,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The camera's picture at clip time ``t`` (seconds) as a BGR uint8 array (height, width, 3).

    ``period`` is the loop length of the clip being drawn: the motion repeats exactly after it,
    so a clip of that length loops without a jump (except the timecode, which restarts).
    ``out`` (same shape) is reused when given, which saves a 2.7 MB allocation per 720p frame
    when a clip is drawn; the result may still be a new array.
    """
    _check_size(width, height)
    if picture == "black":
        return np.zeros((height, width, 3), np.uint8)
    if picture == "covered":
        return _covered(width, height, t, period)
    if picture == "frozen":
        t = 0.0
    background = _background(name, width, height, picture == "moved")
    if out is not None and out.shape == background.shape and out.dtype == np.uint8:
        frame = out
        np.copyto(frame, background)
    else:
        frame = background.copy()
    _draw_object(frame, name, t, period)
    _draw_osd(frame, name, t)
    if picture == "blurred":
        return _defocus(frame)
    return frame


def snapshot_jpeg(name: str, width: int, height: int, picture: Picture, quality: int = 85) -> bytes:
    """The camera's current picture as JPEG bytes, for the ONVIF snapshot endpoint."""
    t = time.monotonic() % DEFAULT_PERIOD_S
    frame = render_frame(name, width, height, picture, t)
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV only fails on invalid input, checked above
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def timecode(t: float, fps: int = 25) -> str:
    """``HH:MM:SS:FF`` of clip time ``t``, as burned into the picture."""
    frames = round(t * fps)
    s, ff = divmod(frames, fps)
    m, ss = divmod(s, 60)
    hh, mm = divmod(m, 60)
    return f"{hh:02d}:{mm:02d}:{ss:02d}:{ff:02d}"


# --- drawing ---------------------------------------------------------------------------------


def _check_size(width: int, height: int) -> None:
    if width < 64 or height < 64 or width % 2 or height % 2:
        raise ValueError(f"frame size {width}x{height}: need even sizes of at least 64x64")


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


def _color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    b, g, r = (int(v) for v in rng.integers(lo, hi, 3))
    return (b, g, r)


def _world(name: str, width: int, height: int) -> np.ndarray:
    """The scenery around the camera, larger than its view; same name → same scenery."""
    rng = np.random.default_rng(_seed(name))
    ww, wh = int(width * _WORLD_MARGIN) // 2 * 2, int(height * _WORLD_MARGIN) // 2 * 2
    s = height / 720  # drawing scale: sizes are designed for 720p
    # wall: two-colour horizontal gradient with a vertical light fall-off
    c0 = np.array(_color(rng, 60, 200), np.float32)
    c1 = np.array(_color(rng, 60, 200), np.float32)
    gx = np.linspace(0.0, 1.0, ww, dtype=np.float32)[None, :, None]
    gy = np.linspace(1.0, 0.75, wh, dtype=np.float32)[:, None, None]
    world = np.empty((wh, ww, 3), np.uint8)
    world[:] = ((c0 * (1 - gx) + c1 * gx) * gy).astype(np.uint8)
    # floor: a tiled checkerboard on the lower third (many sharp edges)
    floor_y = int(wh * 0.66)
    tile = max(8, int(40 * s))
    ys, xs = np.mgrid[floor_y:wh, 0:ww]
    checker = ((ys // tile + xs // tile) % 2).astype(bool)
    light, dark = _color(rng, 150, 230), _color(rng, 30, 100)
    world[floor_y:][checker] = light
    world[floor_y:][~checker] = dark
    # doors, windows and boxes along the wall
    for _ in range(14):
        x = int(rng.integers(0, ww))
        y = int(rng.integers(0, floor_y))
        rw = int(rng.integers(int(40 * s), int(220 * s)))
        rh = int(rng.integers(int(40 * s), int(260 * s)))
        cv2.rectangle(world, (x, y), (x + rw, y + rh), _color(rng), -1)
        cv2.rectangle(world, (x, y), (x + rw, y + rh), _color(rng, 0, 60), max(1, int(4 * s)))
    # windows with bars
    for _ in range(4):
        x = int(rng.integers(0, ww - int(200 * s)))
        y = int(rng.integers(0, max(1, floor_y - int(160 * s))))
        rw, rh = int(180 * s), int(140 * s)
        cv2.rectangle(world, (x, y), (x + rw, y + rh), (235, 225, 200), -1)
        for bx in range(x, x + rw, max(4, int(18 * s))):
            cv2.line(world, (bx, y), (bx, y + rh), (40, 40, 40), max(1, int(3 * s)))
    # round things: lamps, signs, a clock
    for _ in range(8):
        centre = (int(rng.integers(0, ww)), int(rng.integers(0, wh)))
        r = int(rng.integers(int(12 * s), int(70 * s)))
        cv2.circle(world, centre, r, _color(rng), -1, cv2.LINE_AA)
        cv2.circle(world, centre, r, (20, 20, 20), max(1, int(3 * s)), cv2.LINE_AA)
    # signs with text (ASCII: Hershey fonts have no Vietnamese diacritics)
    for label in ("KHU CACH LY", "LOI THOAT", f"P.{int(rng.integers(100, 999))}"):
        x = int(rng.integers(0, max(1, ww - int(300 * s))))
        y = int(rng.integers(int(60 * s), max(int(61 * s), floor_y)))
        cv2.putText(world, label, (x, y), _FONT, 1.4 * s, (20, 20, 20), max(1, int(4 * s)))
    # cables and pipes
    for _ in range(6):
        p0 = (int(rng.integers(0, ww)), int(rng.integers(0, wh)))
        p1 = (int(rng.integers(0, ww)), int(rng.integers(0, wh)))
        cv2.line(world, p0, p1, _color(rng, 0, 120), max(1, int(5 * s)), cv2.LINE_AA)
    return world


@lru_cache(maxsize=16)
def _background(name: str, width: int, height: int, moved: bool) -> np.ndarray:
    """The static part of the camera's view, normal or knocked (rotated + shifted)."""
    world = _world(name, width, height)
    wh, ww = world.shape[:2]
    centre = (ww / 2, wh / 2)
    if moved:
        m = cv2.getRotationMatrix2D(centre, MOVED_ROTATION_DEG, 1.0)
        m[0, 2] += MOVED_SHIFT[0] * width
        m[1, 2] += MOVED_SHIFT[1] * height
    else:
        m = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # then take the centred (width x height) window of the transformed world
    m[0, 2] -= (ww - width) / 2
    m[1, 2] -= (wh - height) / 2
    view = cv2.warpAffine(
        world, m, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    view.setflags(write=False)  # shared by every frame: callers copy before drawing
    return view


def _draw_object(frame: np.ndarray, name: str, t: float, period: float) -> None:
    """A person-sized figure walking a closed path that repeats every ``period`` seconds."""
    h, w = frame.shape[:2]
    s = h / 720
    rng = np.random.default_rng(_seed(name) ^ 0x5EED)
    phase = float(rng.uniform(0, 2 * math.pi))
    a = 2 * math.pi * t / period + phase
    # a circle-like path: positions half a period apart are opposite, so any two distinct
    # keyframes of a loop differ
    cx = int(w * (0.5 + 0.30 * math.cos(a)))
    cy = int(h * (0.55 + 0.18 * math.sin(a)))
    body = _color(rng, 0, 256)
    bw, bh = int(70 * s), int(150 * s)
    cv2.rectangle(frame, (cx - bw // 2, cy - bh // 2), (cx + bw // 2, cy + bh // 2), body, -1)
    cv2.circle(frame, (cx, cy - bh // 2 - int(30 * s)), int(30 * s), (80, 150, 220), -1)
    cv2.rectangle(
        frame,
        (cx - bw // 2, cy - bh // 2),
        (cx + bw // 2, cy + bh // 2),
        (0, 0, 0),
        max(1, int(3 * s)),
    )
    # a turning fan in a corner: small, always moving, easy to see in a diff
    fc = (int(w * 0.88), int(h * 0.2))
    fr = int(60 * s)
    for k in range(3):
        ang = a * 3 + k * 2 * math.pi / 3
        tip = (int(fc[0] + fr * math.cos(ang)), int(fc[1] + fr * math.sin(ang)))
        cv2.line(frame, fc, tip, (250, 250, 250), max(2, int(10 * s)), cv2.LINE_AA)


def _draw_osd(frame: np.ndarray, name: str, t: float) -> None:
    """Camera name top-left and timecode bottom-left, white on a dark box, like a camera OSD."""
    h = frame.shape[0]
    s = h / 720
    scale, thick = 1.0 * s, max(1, int(2 * s))
    pad = max(2, int(8 * s))
    for text, y in ((name, int(44 * s)), (timecode(t), h - int(20 * s))):
        (tw, th), base = cv2.getTextSize(text, _FONT, scale, thick)
        x = int(16 * s)
        cv2.rectangle(frame, (x - pad, y - th - pad), (x + tw + pad, y + base + pad), (0, 0, 0), -1)
        cv2.putText(frame, text, (x, y), _FONT, scale, (255, 255, 255), thick, cv2.LINE_AA)


def _defocus(frame: np.ndarray) -> np.ndarray:
    """A strong Gaussian defocus (σ ≈ 2.5 % of the width), computed at 1/8 scale: the same
    look as a full-size blur at 1/20 of the cost."""
    h, w = frame.shape[:2]
    small = cv2.resize(frame, (max(8, w // 8), max(8, h // 8)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), max(1.0, w / 320))
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _covered(width: int, height: int, t: float, period: float) -> np.ndarray:
    """Something over the lens: dark, nearly uniform, a faint glow drifting at one edge."""
    # built at 1/16 scale and upscaled: a smooth field, Laplacian variance ≈ 0
    sw, sh = max(4, width // 16), max(4, height // 16)
    ys, xs = np.mgrid[0:sh, 0:sw].astype(np.float32)
    a = 2 * math.pi * t / period
    gx = sw * (0.5 + 0.4 * math.cos(a))
    glow = 8.0 * np.exp(-(((xs - gx) / (sw * 0.35)) ** 2 + ((ys - sh) / (sh * 0.5)) ** 2))
    luma = np.clip(COVERED_LUMA - 2.0 + glow, 0, 255).astype(np.uint8)
    small = cv2.merge([luma, luma, luma])
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
