"""The fMP4 splitter: real muxer output cut into one init segment and self-contained fragments."""

from __future__ import annotations

import io
import struct
from fractions import Fraction

import av
import numpy as np
import pytest

from edge_agent.fmp4 import (
    MUXER_BUFFER_SIZE,
    Fmp4Error,
    FragmentSplitter,
    muxer_options,
    top_level_boxes,
)

FPS = 25


def _encoded_packets(codec: str, frames: int = 100, gop: int = 25) -> tuple[av.VideoStream, list]:
    """Encode a small moving picture for real into an MP4 in memory, then demux it again:
    the packets and stream a remux really sees."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as sink:
        stream = sink.add_stream(codec, rate=FPS)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        stream.gop_size = gop
        stream.max_b_frames = 0
        params = f"keyint={gop}:min-keyint={gop}:scenecut=0"
        if codec == "libx265":
            stream.options = {"x265-params": params + ":log-level=error"}
        else:
            stream.options = {"x264-params": params}
        for i in range(frames):
            img = np.full((96, 160, 3), (i * 7) % 255, np.uint8)
            img[:, (i * 3) % 160] = 255
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, FPS)
            sink.mux(stream.encode(frame))
        sink.mux(stream.encode(None))
    source = av.open(io.BytesIO(buf.getvalue()), "r")
    video = source.streams.video[0]
    return video, [p for p in source.demux(video) if p.size]


def _remux(codec: str, frames: int = 100) -> tuple[bytes, list[bytes], bytes]:
    """Mux real packets through the splitter; returns (init, fragments, raw muxer bytes)."""
    template, packets = _encoded_packets(codec, frames)
    init: list[bytes] = []
    fragments: list[bytes] = []
    raw = io.BytesIO()

    def on_init(data: bytes) -> None:
        init.append(data)

    splitter = FragmentSplitter(on_init, fragments.append)

    class Tee:  # records every byte the muxer wrote, in its own split, and passes it on
        def write(self, data: bytes) -> int:
            raw.write(data)
            return splitter.write(data)

    out = av.open(Tee(), "w", format="mp4", options=muxer_options(1.0))
    ostream = out.add_stream_from_template(template)
    for p in packets:
        p.stream = ostream
        out.mux(p)
    out.close()
    splitter.check_complete()
    assert len(init) == 1
    return init[0], fragments, raw.getvalue()


def _decode_count(data: bytes) -> int:
    with av.open(io.BytesIO(data), "r") as c:
        return len(list(c.decode(video=0)))


@pytest.mark.parametrize("codec", ["libx264", "libx265"])
def test_muxer_output_splits_into_init_and_moof_mdat_fragments_that_decode_whole(
    codec: str,
) -> None:
    init, fragments, _ = _remux(codec)
    assert [b for b, _ in top_level_boxes(init)] == ["ftyp", "moov"]
    # 100 frames at 25 fps, a keyframe every second, fragments of ~1 s
    assert 4 <= len(fragments) <= 5
    for frag in fragments:
        assert [b for b, _ in top_level_boxes(frag)] == ["moof", "mdat"]
    assert _decode_count(init + b"".join(fragments)) == 100
    # every fragment after the init stands on its own (moof-relative offsets)
    assert _decode_count(init + fragments[-1]) >= 1


def test_trailing_mfra_index_is_dropped_and_nothing_else_is_lost() -> None:
    init, fragments, raw = _remux("libx264")
    boxes = top_level_boxes(raw)
    assert boxes[-1][0] == "mfra"
    assert len(init) + sum(map(len, fragments)) == len(raw) - boxes[-1][1]


@pytest.mark.parametrize("split", [1, 7, 4096, 1 << 20])
def test_any_write_split_gives_the_same_pieces(split: int) -> None:
    init, fragments, raw = _remux("libx264", frames=60)
    got: list[bytes] = []
    s = FragmentSplitter(got.append, got.append)
    for i in range(0, len(raw), split):
        s.write(raw[i : i + split])
    s.check_complete()
    assert got == [init, *fragments]
    assert s.fragments == len(fragments)


def test_with_the_recorders_buffer_each_fragment_is_one_write_passed_on_without_a_copy() -> None:
    """The recorder opens the muxer with MUXER_BUFFER_SIZE: then every moof+mdat arrives in a
    single write and the splitter hands that very object on (no reassembly, no copy)."""
    template, packets = _encoded_packets("libx264", frames=75)
    written: list[bytes] = []
    got: list[bytes] = []
    splitter = FragmentSplitter(got.append, got.append)

    class Recording:
        def write(self, data: bytes) -> int:
            written.append(data)
            return splitter.write(data)

    out = av.open(
        Recording(),
        "w",
        format="mp4",
        options=muxer_options(1.0),
        buffer_size=MUXER_BUFFER_SIZE,
    )
    ostream = out.add_stream_from_template(template)
    for p in packets:
        p.stream = ostream
        out.mux(p)
    out.close()
    splitter.check_complete()
    fragments = got[1:]
    assert len(fragments) >= 3
    for frag in fragments:
        assert any(frag is w for w in written)  # the muxer's own bytes object
        assert [b for b, _ in top_level_boxes(frag)] == ["moof", "mdat"]
    assert _decode_count(b"".join(got)) == 75


def _box(kind: bytes, payload: bytes, large: bool = False) -> bytes:
    if large:
        return struct.pack(">I4sQ", 1, kind, 16 + len(payload)) + payload
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def test_64_bit_largesize_boxes_are_followed() -> None:
    got: list[tuple[str, bytes]] = []
    s = FragmentSplitter(lambda d: got.append(("init", d)), lambda d: got.append(("frag", d)))
    init = _box(b"ftyp", b"isom") + _box(b"moov", b"x" * 10)
    frag = _box(b"moof", b"m" * 5) + _box(b"mdat", b"d" * 100, large=True)
    s.write(init + frag[:20])
    s.write(frag[20:])
    assert got == [("init", init), ("frag", frag)]
    assert top_level_boxes(frag) == [("moof", 13), ("mdat", 116)]


def test_a_box_running_to_end_of_file_is_refused_in_one_line() -> None:
    s = FragmentSplitter(lambda d: None, lambda d: None)
    with pytest.raises(Fmp4Error, match="not writing fragments"):
        s.write(struct.pack(">I4s", 0, b"mdat") + b"data")


def test_a_box_smaller_than_its_header_is_refused() -> None:
    s = FragmentSplitter(lambda d: None, lambda d: None)
    with pytest.raises(Fmp4Error, match="less than its own header"):
        s.write(struct.pack(">I4s", 4, b"moof"))


def test_a_fragment_before_the_init_segment_is_refused() -> None:
    s = FragmentSplitter(lambda d: None, lambda d: None)
    with pytest.raises(Fmp4Error, match="before the init segment"):
        s.write(_box(b"moof", b"") + _box(b"mdat", b"x"))


def test_output_cut_inside_a_box_is_reported_at_the_end() -> None:
    s = FragmentSplitter(lambda d: None, lambda d: None)
    s.write(_box(b"ftyp", b"isom") + _box(b"moov", b"")[:5])
    assert s.pending == 17
    with pytest.raises(Fmp4Error, match="inside a box"):
        s.check_complete()
