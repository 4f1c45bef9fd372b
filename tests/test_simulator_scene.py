"""The virtual camera's picture: each fault moves the signal the edge agent's checks look at."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from simulator.camera import PICTURES
from simulator.scene import COVERED_LUMA, render_frame, snapshot_jpeg, timecode

SIZES = [(1280, 720), (640, 360)]


def _gray(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)


def _lapvar(frame: np.ndarray) -> float:
    return float(cv2.Laplacian(_gray(frame), cv2.CV_64F).var())


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(_gray(a).astype(np.int16) - _gray(b)).mean())


@pytest.mark.parametrize("picture", PICTURES)
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_every_picture_is_a_bgr_uint8_frame_of_the_asked_size(
    picture: str, width: int, height: int
) -> None:
    frame = render_frame("Camera 01", width, height, picture, 1.0)  # type: ignore[arg-type]
    assert frame.shape == (height, width, 3)
    assert frame.dtype == np.uint8


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_normal_picture_is_textured_and_changes_between_keyframes_2_s_apart(
    width: int, height: int
) -> None:
    a = render_frame("Camera 01", width, height, "normal", 0.0)
    b = render_frame("Camera 01", width, height, "normal", 2.0)
    assert _lapvar(a) > 300
    assert 40 < _gray(a).mean() < 200
    assert _diff(a, b) > 1.0


def test_same_camera_and_time_draw_the_same_picture_and_cameras_differ() -> None:
    a = render_frame("Camera 01", 640, 360, "normal", 1.5)
    assert np.array_equal(a, render_frame("Camera 01", 640, 360, "normal", 1.5))
    assert _diff(a, render_frame("Camera 02", 640, 360, "normal", 1.5)) > 20


def test_motion_repeats_after_the_period_so_clips_loop_seamlessly() -> None:
    period = 4.0
    a = render_frame("Camera 01", 640, 360, "normal", 0.0, period=period)
    b = render_frame("Camera 01", 640, 360, "normal", period, period=period)
    # only the timecode (bottom-left OSD box) may differ
    rows = slice(0, int(360 * 0.88))
    assert np.array_equal(a[rows], b[rows])
    assert not np.array_equal(a, b)


def test_black_picture_is_all_zeros() -> None:
    assert not render_frame("Camera 01", 640, 360, "black", 3.0).any()


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_covered_picture_is_dark_and_nearly_uniform(width: int, height: int) -> None:
    frame = render_frame("Camera 01", width, height, "covered", 1.0)
    assert 30 <= _gray(frame).mean() <= 40
    assert abs(_gray(frame).mean() - COVERED_LUMA) < 3
    assert _lapvar(frame) < 5
    assert _gray(frame).std() < 5


def test_frozen_picture_is_always_the_picture_of_time_zero() -> None:
    first = render_frame("Camera 01", 640, 360, "normal", 0.0)
    for t in (0.0, 2.0, 3.96):
        assert np.array_equal(render_frame("Camera 01", 640, 360, "frozen", t), first)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_blurred_picture_loses_over_99_percent_of_laplacian_variance(
    width: int, height: int
) -> None:
    normal = render_frame("Camera 01", width, height, "normal", 1.0)
    blurred = render_frame("Camera 01", width, height, "blurred", 1.0)
    assert _lapvar(blurred) * 100 < _lapvar(normal)
    assert abs(_gray(blurred).mean() - _gray(normal).mean()) < 5  # same light, no detail


def test_moved_picture_shows_another_view_of_the_same_scene() -> None:
    normal_a = render_frame("Camera 01", 640, 360, "normal", 0.0)
    normal_b = render_frame("Camera 01", 640, 360, "normal", 2.0)
    moved = render_frame("Camera 01", 640, 360, "moved", 0.0)
    assert _diff(moved, normal_a) > 20
    assert _diff(moved, normal_a) > 4 * _diff(normal_a, normal_b)
    assert _lapvar(moved) > 300  # still a sharp picture, just pointing elsewhere


def test_reused_output_buffer_gives_the_same_picture() -> None:
    out = np.zeros((360, 640, 3), np.uint8)
    frame = render_frame("Camera 01", 640, 360, "normal", 1.0, out=out)
    assert frame is out
    assert np.array_equal(frame, render_frame("Camera 01", 640, 360, "normal", 1.0))


def test_snapshot_is_a_jpeg_of_the_camera_picture() -> None:
    jpeg = snapshot_jpeg("Camera 01", 640, 360, "normal")
    assert jpeg[:2] == b"\xff\xd8"
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    assert image.shape == (360, 640, 3)
    black = cv2.imdecode(
        np.frombuffer(snapshot_jpeg("Camera 01", 640, 360, "black"), np.uint8), cv2.IMREAD_COLOR
    )
    assert black is not None and black.mean() < 2


def test_odd_or_tiny_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="even sizes"):
        render_frame("Camera 01", 641, 360, "normal", 0.0)
    with pytest.raises(ValueError, match="even sizes"):
        render_frame("Camera 01", 32, 32, "black", 0.0)


def test_timecode_counts_hours_minutes_seconds_and_frames() -> None:
    assert timecode(0.0) == "00:00:00:00"
    assert timecode(3.96) == "00:00:03:24"
    assert timecode(3723.04) == "01:02:03:01"
