"""Looping clips: encoded once, cached atomically, readable without PyAV, at the asked bit rate."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest

from simulator.clips import (
    ClipEncoder,
    ClipError,
    ClipSpec,
    clip_path,
    ensure_clip,
    ensure_clips,
    iter_nal_types,
    prune_cache,
    read_clip,
)

SMALL = ClipSpec("Camera 01", 320, 180, "normal", bitrate_kbps=300)


def _decoder(codec: str) -> av.VideoCodecContext:
    ctx = av.CodecContext.create("h264" if codec == "H264" else "hevc", "r")
    assert isinstance(ctx, av.VideoCodecContext)
    return ctx


def test_h264_clip_starts_with_an_idr_and_every_idr_carries_sps_and_pps(tmp_path: Path) -> None:
    clip = read_clip(ensure_clip(SMALL, tmp_path))
    assert len(clip.units) == SMALL.frames == 100
    keyframes = [i for i, (key, _) in enumerate(clip.units) if key]
    assert keyframes == [0, 50]  # GOP of 50, nothing else (no scene-cut IDRs)
    for i in keyframes:
        types = list(iter_nal_types(clip.units[i][1], "H264"))
        assert {7, 8, 5} <= set(types)
        assert types.index(7) < types.index(5) and types.index(8) < types.index(5)
    assert 5 not in iter_nal_types(clip.units[1][1], "H264")


def test_h265_clip_carries_vps_sps_pps_on_every_idr(tmp_path: Path) -> None:
    spec = replace(SMALL, codec="H265")
    clip = read_clip(ensure_clip(spec, tmp_path))
    for key, unit in clip.units:
        types = set(iter_nal_types(unit, "H265"))
        if key:
            assert {32, 33, 34} <= types and types & {19, 20}
        else:
            assert not types & {32, 33, 34, 19, 20}
    frames = [f for _, u in clip.units for f in _decoder("H265").decode(av.Packet(u))]
    assert frames  # decodable


def test_clip_has_no_b_frames_so_every_access_unit_decodes_at_once(tmp_path: Path) -> None:
    clip = read_clip(ensure_clip(SMALL, tmp_path))
    dec = _decoder("H264")
    assert [len(dec.decode(av.Packet(u))) for _, u in clip.units] == [1] * len(clip.units)


@pytest.mark.parametrize("picture", ["normal", "black"])
def test_clip_carries_the_asked_bit_rate_even_for_a_static_picture(
    tmp_path: Path, picture: str
) -> None:
    spec = replace(SMALL, picture=picture, bitrate_kbps=800)  # type: ignore[arg-type]
    clip = read_clip(ensure_clip(spec, tmp_path))
    kbps = clip.byte_count * 8 / spec.seconds / 1000
    assert 760 <= kbps <= 880
    # and evenly: each 2 s GOP within 15 % of its share
    gop_bytes = [sum(len(u) for _, u in clip.units[i : i + 50]) for i in (0, 50)]
    for b in gop_bytes:
        assert abs(b * 8 / 2 / 1000 - 800) < 120


def test_filler_padding_decodes_to_the_same_black_picture(tmp_path: Path) -> None:
    spec = replace(SMALL, picture="black", bitrate_kbps=1000)
    clip = read_clip(ensure_clip(spec, tmp_path))
    assert 12 in iter_nal_types(clip.units[10][1], "H264")  # filler data NAL unit
    dec = _decoder("H264")
    lumas = [
        f.to_ndarray(format="gray").mean() for _, u in clip.units for f in dec.decode(av.Packet(u))
    ]
    assert len(lumas) == len(clip.units)
    assert max(lumas) < 20


def test_clip_loops_seamlessly_back_to_its_first_picture(tmp_path: Path) -> None:
    clip = read_clip(ensure_clip(SMALL, tmp_path))
    dec = _decoder("H264")
    frames = [
        f.to_ndarray(format="gray")
        for _ in range(2)
        for _, u in clip.units
        for f in dec.decode(av.Packet(u))
    ]
    n = len(clip.units)
    assert len(frames) == 2 * n
    assert np.array_equal(frames[0], frames[n])  # the loop restarts on the same IDR
    # motion continues smoothly across the seam (as between any two neighbouring frames)
    seam = np.abs(frames[n - 1].astype(int) - frames[n]).mean()
    inner = np.abs(frames[n - 2].astype(int) - frames[n - 1]).mean()
    assert seam < 3 * inner + 1


def test_cached_clip_is_reused_without_encoding_again(tmp_path: Path) -> None:
    path = ensure_clip(SMALL, tmp_path)
    mtime = path.stat().st_mtime_ns
    assert ensure_clip(SMALL, tmp_path) == path
    assert path.stat().st_mtime_ns == mtime
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


def test_damaged_cache_file_is_encoded_again(tmp_path: Path) -> None:
    path = ensure_clip(SMALL, tmp_path)
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 2)
    assert ensure_clip(SMALL, tmp_path) == path
    assert path.stat().st_size == size
    assert len(read_clip(path).units) == SMALL.frames


def test_every_parameter_is_part_of_the_cache_key() -> None:
    variants = [
        SMALL,
        replace(SMALL, name="Camera 02"),
        replace(SMALL, width=640, height=360),
        replace(SMALL, picture="blurred"),
        replace(SMALL, bitrate_kbps=301),
        replace(SMALL, codec="H265"),
        replace(SMALL, fps=30, gop=60),
        replace(SMALL, gop=25),
        replace(SMALL, seconds=6.0),
    ]
    assert len({clip_path(v) for v in variants}) == len(variants)


def test_black_and_covered_clips_are_shared_by_all_cameras() -> None:
    for picture in ("black", "covered"):
        a = replace(SMALL, picture=picture)
        b = replace(SMALL, name="Another camera", picture=picture)
        assert a == b and clip_path(a) == clip_path(b)


def test_cache_lives_under_isocam_sim_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ISOCAM_SIM_CACHE", str(tmp_path))
    assert clip_path(SMALL).parent == tmp_path / "clips"


@pytest.mark.parametrize(
    "bad",
    [
        {"seconds": 3.0},  # 75 frames: not whole 50-frame GOPs, would not loop at a keyframe
        {"width": 321},
        {"bitrate_kbps": 0},
        {"picture": "sideways"},
        {"codec": "MJPEG"},
    ],
)
def test_spec_refuses_clips_that_cannot_be_made(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        replace(SMALL, **bad)  # type: ignore[arg-type]


def test_prune_cache_removes_stale_clips_and_leftover_temporary_files(tmp_path: Path) -> None:
    current = ensure_clip(SMALL, tmp_path)
    other_code = tmp_path / "normal-320x180-300k-h264-c0000000-0123.clip"
    leftover = tmp_path / "x.clip.1234.tmp"
    for path in (other_code, leftover):
        path.write_bytes(b"old")
    now = time.time()
    assert prune_cache(tmp_path, now=now) == 0  # all fresh: another checkout may use them
    assert prune_cache(tmp_path, now=now + 2 * 86400) == 2
    assert sorted(tmp_path.iterdir()) == [current]
    assert prune_cache(tmp_path, now=now + 31 * 86400) == 1  # unused for a month
    assert not current.exists()


def test_read_clip_refuses_other_files(tmp_path: Path) -> None:
    other = tmp_path / "x.clip"
    other.write_bytes(b"RIFF....WAVE")
    with pytest.raises(ClipError, match="not a clip file"):
        read_clip(other)


def test_encoder_processes_encode_a_batch_in_parallel(tmp_path: Path) -> None:
    specs = [replace(SMALL, name=f"Camera {i:02d}") for i in range(4)]
    paths = ensure_clips([*specs, specs[0]], tmp_path, workers=2)
    assert paths[0] == paths[4]
    for spec, path in zip(specs, paths, strict=False):
        assert path == clip_path(spec, tmp_path)
        assert len(read_clip(path).units) == spec.frames


def test_simultaneous_requests_for_one_clip_all_get_the_whole_file(tmp_path: Path) -> None:
    spec = replace(SMALL, name="Shared")
    results: list[Path] = []
    with ClipEncoder(2, tmp_path) as first, ClipEncoder(2, tmp_path) as second:
        # two encoders stand for two simulators sharing one cache
        threads = [
            threading.Thread(target=lambda e=e: results.append(e.ensure(spec)))
            for e in (first, first, second)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert len(read_clip(results[0]).units) == spec.frames
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]


def test_closed_encoder_refuses_work(tmp_path: Path) -> None:
    encoder = ClipEncoder(1, tmp_path)
    encoder.close()
    with pytest.raises(ClipError, match="closed"):
        encoder.ensure(replace(SMALL, name="Late"))
