"""The edge recorder against the simulator's real RTSP server: sealed segments, gaps, crashes.

Cameras are `simulator.rtsp.RtspService` mounts (GStreamer, pre-encoded looping clips at 25 fps
with a keyframe every 2 s); segments are real files in a real `SegmentStore`, opened with
`sitelink.sealed_segment` and decoded with PyAV.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.fmp4 import top_level_boxes
from edge_agent.keyframes import KeyframeSample
from edge_agent.recorder import (
    CameraRecorder,
    MediaTimeline,
    RecorderConfig,
    RecorderEvent,
    segment_paths,
)
from edge_agent.segment_store import Gap, IndexedSegment, SegmentStore
from edge_agent.stream_probe import RtspSocket
from simulator.camera import Codec, StreamProfile, VirtualCamera
from simulator.rtsp import RtspService
from sitelink.sealed_segment import (
    RecipientPrivateKey,
    generate_private_key,
    open_segment,
    read_header,
    write_public_key,
)

REPO = Path(__file__).resolve().parent.parent
FPS = 25
GOP_S = 2.0  # StreamProfile's default GOP of 50 frames
SEGMENT_S = 10.0
# Tests reconnect fast so a gap's end is within seconds of the fault's end; production keeps
# the 30 s cap.
FAST = RecorderConfig(
    segment_seconds=SEGMENT_S, backoff_initial_seconds=0.5, backoff_max_seconds=1.0
)


def _camera(
    index: int, codec: Codec, user: str = "admin", password: str = "secret"
) -> VirtualCamera:
    profile = StreamProfile("main", 640, 360, 800, codec=codec)
    return VirtualCamera(
        index=index,
        id=f"cam-{index:02d}",
        name=f"Cam {index:02d}",
        host="127.0.0.1",
        onvif_port=0,
        rtsp_port=0,
        user=user,
        password=password,
        profiles=(profile,),
    )


@pytest.fixture
async def rtsp() -> AsyncIterator[RtspService]:
    """The simulator's RTSP server (a GStreamer child process), cameras added by each test."""
    svc = RtspService()
    await svc.start()
    yield svc
    await svc.close()


@dataclass
class Site:
    store: SegmentStore
    key: RecipientPrivateKey
    data_dir: Path

    def recorder(self, cam: VirtualCamera, config: RecorderConfig = FAST) -> CameraRecorder:
        return CameraRecorder(
            cam.id,
            cam.rtsp_url("main"),
            self.store,
            [self.key.public_key()],
            config,
            user=cam.user,
            password=cam.password,
        )


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """A real segment store in a temporary data directory, and the viewing key to unseal."""
    data = tmp_path / "data"
    store = SegmentStore(data, Ed25519PrivateKey.generate(), "site-test")
    yield Site(store, generate_private_key(), data)
    store.close()


async def _next_event(rec: CameraRecorder, kind: str, within: float = 30.0) -> RecorderEvent:
    async with asyncio.timeout(within):
        while True:
            event = await rec.events.get()
            if event.kind == kind:
                return event


def _unseal(path: Path, key: RecipientPrivateKey) -> tuple[bytes, list[bytes], bool]:
    with open_segment(path, key) as seg:
        chunks = list(seg)
        finished = seg.finished
    return chunks[0], chunks[1:], finished


def _decode(plaintext: bytes) -> tuple[int, bool, str]:
    """(frames decoded, first frame is a keyframe, codec tag) of an fMP4 file in memory."""
    with av.open(io.BytesIO(plaintext), "r") as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        tag = stream.codec_context.codec_tag
        frames = 0
        first_key = False
        for frame in c.decode(stream):
            if frames == 0:
                first_key = frame.key_frame
            frames += 1
    return frames, first_key, tag


def _assert_no_plaintext(sealed: bytes, plaintext: bytes) -> None:
    # Every box header of the plaintext with 8 bytes of its payload (16 bytes: a chance match
    # in random ciphertext is 2^-128), and 16-byte windows of the video data spread over it.
    pos = 0
    for _box, size in top_level_boxes(plaintext):
        assert plaintext[pos : pos + 16] not in sealed
        pos += size
    for i in range(1, 9):
        off = len(plaintext) * i // 9
        assert plaintext[off : off + 16] not in sealed
    # The bare markers: ciphertext holds a given 4-byte string about once per 4 GiB, while
    # plaintext fMP4 holds them once per fragment (and Annex-B video once per frame).
    for marker in (b"ftyp", b"moof", b"mdat", b"\x00\x00\x00\x01"):
        assert sealed.count(marker) <= 1, marker


@dataclass
class CameraResult:
    segments: list[IndexedSegment]
    gaps: list[Gap]
    frames: int
    expected_frames: float


def _check_segments(site: Site, cam: VirtualCamera) -> CameraResult:
    """Unseal and decode every segment of `cam`; check each is finished, indexed, starts with
    a keyframe, carries no plaintext; count frames against the wall-clock time covered."""
    indexed = site.store.segments(cam.id)
    files = segment_paths(site.data_dir, cam.id)
    assert [s.path for s in indexed] == files
    frames = 0
    expected = 0.0
    for seg in indexed:
        assert seg.finished and seg.codec == cam.profiles[0].codec
        init, fragments, finished = _unseal(seg.path, site.key)
        assert finished and len(fragments) == seg.fragments
        assert [b for b, _ in top_level_boxes(init)] == ["ftyp", "moov"]
        plaintext = init + b"".join(fragments)
        _assert_no_plaintext(seg.path.read_bytes(), plaintext)
        n, first_key, tag = _decode(plaintext)
        assert first_key, f"{seg.path.name} does not start with a keyframe"
        if cam.profiles[0].codec == "H265":
            assert tag == "hvc1"
        frames += n
        expected += (seg.end - seg.start) * FPS + 1
    return CameraResult(indexed, site.store.gaps(cam.id), frames, expected)


async def test_four_cameras_record_60_s_into_sealed_segments_with_one_gap_per_fault(
    rtsp: RtspService, site: Site
) -> None:
    """cam-01 (H.264) and cam-02 (H.265) stay healthy; cam-03 stalls for 12 s and later has
    its session dropped; cam-04 goes offline for 10 s. Each fault is exactly one gap row."""
    cams = [_camera(1, "H264"), _camera(2, "H265"), _camera(3, "H264"), _camera(4, "H265")]
    await rtsp.prepare(cams)
    for cam in cams:
        await rtsp.add_camera(cam)
    recs = [site.recorder(cam) for cam in cams]
    t0 = time.time()
    tasks = [asyncio.create_task(r.run()) for r in recs]
    for rec in recs:
        await _next_event(rec, "connected")

    async def at(t: float) -> None:
        await asyncio.sleep(max(0.0, t0 + t - time.time()))

    async def fault(cam: VirtualCamera, **changes: object) -> float:
        for name, value in changes.items():
            setattr(cam.faults, name, value)
        when = time.time()
        await rtsp.apply(cam)
        return when

    stall3, offline4 = cams[2], cams[3]
    await at(12)
    stall_on = await fault(stall3, stall=True)
    gap_event = await _next_event(recs[2], "gap_opened", within=10)
    assert gap_event.cause == "stall"
    stats = recs[2].stats()
    assert stats.current_gap is not None and stats.current_gap.cause == "stall"
    live = recs[0].stats()
    assert live.connected and 22 <= live.fps <= 28
    assert 400_000 <= live.bitrate_bps <= 1_300_000  # the clip is padded to 800 kbit/s
    assert live.write_lag_s <= 2.0 and live.timestamp_repairs == 0
    await at(24)
    stall_off = await fault(stall3, stall=False)
    await at(30)
    offline_on = await fault(offline4, offline=True)
    await at(40)
    offline_off = await fault(offline4, offline=False)
    await at(46)
    stall3.boot_count += 1  # the camera drops every session and takes new ones at once
    drop_at = await fault(stall3)

    # live view: the ring holds the latest fragments (2 s GOP, 1 s fragments: one of the two
    # starts with a keyframe); that one and its segment's init decode on their own
    tap = recs[1].tap
    async with asyncio.timeout(5):
        newer = await tap.wait(tap.last_seq)
    assert newer and newer[-1].seq == tap.last_seq
    (keyed,) = [f for f in tap.latest() if f.keyframe]
    assert _decode(keyed.init + keyed.data)[0] >= FPS // 2

    await at(62)
    await asyncio.gather(*(r.stop() for r in recs))
    await asyncio.gather(*tasks)
    t_end = time.time()

    checked = await asyncio.gather(*(asyncio.to_thread(_check_segments, site, c) for c in cams))
    results = {cam.id: res for cam, res in zip(cams, checked, strict=True)}
    for cam_id, res in results.items():
        assert res.frames >= 0.99 * res.expected_frames, (cam_id, res.frames, res.expected_frames)
        if not res.gaps:  # (after a stall the camera may send a burst: more frames than time)
            assert res.frames <= res.expected_frames + len(res.segments) * 3
        first, last = res.segments[0], res.segments[-1]
        assert first.start - t0 <= 3.0 and t_end - last.end <= 1.0
        # segments abut except across a gap, which then covers the hole exactly
        pairs = list(zip(res.segments, res.segments[1:], strict=False))
        holes = [(a.end, b.start) for a, b in pairs if b.start - a.end > 0.2]
        assert holes == [(g.start, g.end) for g in res.gaps]
        for a, b in pairs:
            if b.start - a.end <= 0.2:  # cut on time: at the first keyframe after ~10 s
                assert SEGMENT_S - 0.6 <= a.end - a.start <= SEGMENT_S + GOP_S + 0.3

    assert results["cam-01"].gaps == [] and results["cam-02"].gaps == []
    g3 = results["cam-03"].gaps
    assert [g.cause for g in g3] == ["stall", "eof"]
    assert g3[0].end is not None and g3[1].end is not None
    assert abs(g3[0].start - stall_on) <= 2 and abs(g3[0].end - stall_off) <= 2
    assert abs(g3[1].start - drop_at) <= 2 and abs(g3[1].end - drop_at) <= 3
    (g4,) = results["cam-04"].gaps
    assert g4.cause == "refused" and g4.end is not None
    assert abs(g4.start - offline_on) <= 2 and abs(g4.end - offline_off) <= 2


async def test_wrong_credentials_open_an_unauthorized_gap_from_the_start(
    rtsp: RtspService, site: Site
) -> None:
    cam = _camera(5, "H264")
    cam.faults.wrong_credentials = True
    await rtsp.add_camera(cam)
    rec = site.recorder(cam)
    task = asyncio.create_task(rec.run())
    event = await _next_event(rec, "gap_opened")
    await rec.stop()
    await task
    assert event.cause == "unauthorized"
    (gap,) = site.store.gaps(cam.id)
    assert gap.cause == "unauthorized" and gap.end is not None
    assert "401" in (rec.stats().last_error or "")
    assert segment_paths(site.data_dir, cam.id) == []


async def test_camera_stalled_from_the_start_is_cut_at_the_startup_grace_as_a_stall(
    rtsp: RtspService, site: Site
) -> None:
    """It answers RTSP (parameter sets, no picture): FFmpeg's probing would hold av.open for
    15 s, then 47 s more on the full-probe retry; the watchdog cuts the open itself."""
    cam = _camera(10, "H264")
    cam.faults.stall = True
    await rtsp.add_camera(cam)
    config = RecorderConfig(
        segment_seconds=SEGMENT_S,
        stall_seconds=2.0,
        startup_grace_seconds=3.0,
        backoff_initial_seconds=0.5,
        backoff_max_seconds=1.0,
    )
    rec = site.recorder(cam, config)
    started = time.time()
    task = asyncio.create_task(rec.run())
    event = await _next_event(rec, "gap_opened", within=12)
    await rec.stop()
    await task
    assert event.cause == "stall"
    (gap,) = site.store.gaps(cam.id)
    assert gap.cause == "stall" and abs(gap.start - started) <= 1.0
    assert segment_paths(site.data_dir, cam.id) == []


async def test_camera_that_accepts_tcp_but_never_answers_is_a_timeout(site: Site) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # the kernel completes handshakes; nobody ever answers RTSP
        port = silent.getsockname()[1]
        rec = CameraRecorder(
            "cam-09", f"rtsp://127.0.0.1:{port}/main", site.store, [site.key.public_key()], FAST
        )
        started = time.time()
        task = asyncio.create_task(rec.run())
        event = await _next_event(rec, "gap_opened", within=20)
        await rec.stop()
        await task
    assert event.cause == "timeout"
    (gap,) = site.store.gaps("cam-09")
    assert gap.cause == "timeout" and abs(gap.start - started) <= 1.0


async def test_kill_9_mid_segment_loses_at_most_the_fragment_in_flight(
    rtsp: RtspService, site: Site, tmp_path: Path
) -> None:
    cam = _camera(6, "H264")
    await rtsp.add_camera(cam)
    pub = tmp_path / "viewing.pub"
    write_public_key(site.key.public_key(), pub)
    data = tmp_path / "crash"
    url = cam.rtsp_url("main").replace("rtsp://", f"rtsp://{cam.user}:{cam.password}@")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edge_agent.recorder",
        f"{cam.id}={url}",
        "--data-dir",
        str(data),
        "--recipient",
        str(pub),
        "--segment-seconds",
        "60",
        "--stats-interval",
        "0.25",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=REPO,
    )
    assert proc.stdout is not None
    written = 0
    try:
        async with asyncio.timeout(40):
            while written < 5:  # mid-segment: 5 of ~60 fragments sealed
                line = await proc.stdout.readline()
                assert line, "recorder exited"
                msg = json.loads(line)
                if msg["event"] == "stats":
                    written = msg["fragments"]
        # The 5th fragment was sealed ≤ 0.25 s ago; half a second more lands the kill in the
        # middle of the next fragment (scenario timing, not synchronisation).
        await asyncio.sleep(0.5)
    finally:
        killed_at = time.time()
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL

    (path,) = segment_paths(data, cam.id)
    header = read_header(path)
    init, fragments, finished = _unseal(path, site.key)
    assert not finished
    assert len(fragments) >= written  # every fragment reported written is there
    frames, first_key, _ = _decode(init + b"".join(fragments))
    assert first_key
    recorded_s = frames / FPS
    elapsed = killed_at - header.start_time
    # lost: the fragment in flight (≤ 1 s + one frame) and what sat in socket buffers
    assert recorded_s >= elapsed - FAST.fragment_seconds - 0.3, (recorded_s, elapsed)
    assert recorded_s <= elapsed + 0.2


def test_media_timeline_repairs_missing_backwards_and_jumping_timestamps() -> None:
    tl = MediaTimeline(Fraction(1, 90000), 25)
    t = 1000.0
    out = [tl.place(None, None, t)]  # an RTSP session's first packet has no timestamps
    for i, dts in enumerate([3600, 7200, 3600, 7200 + 3600 * 90000, 7200 + 3600 * 90000 + 3600]):
        out.append(tl.place(dts, dts, t + 0.04 * (i + 1)))
    dts_line = [d for _, d in out]
    # missing → 0; the backwards step and the 1 h clock jump become one frame each
    assert dts_line == [0, 3600, 7200, 10800, 14400, 18000]
    assert tl.repairs == 2
    # a stall shows as a real jump in media time when wall-clock time agrees
    assert tl.place(7200 + 3600 * 90000 + 3600 * 126, None, t + 5.3)[1] == 18000 + 3600 * 125
    # B-frames keep their presentation offset; DTS still strictly increases
    pts, dts = tl.place(
        7200 + 3600 * 90000 + 3600 * 129, 7200 + 3600 * 90000 + 3600 * 127, t + 5.34
    )
    assert pts - dts == 7200 and dts == 18000 + 3600 * 126


def test_recorder_refuses_setups_it_could_never_record_with(site: Site) -> None:
    with pytest.raises(ValueError, match="no recipient keys"):  # nothing to seal to
        CameraRecorder("cam-01", "rtsp://127.0.0.1:1/main", site.store, [])
    with pytest.raises(ValueError, match="not an RTSP URL"):
        CameraRecorder("cam-01", "http://127.0.0.1/", site.store, [site.key.public_key()])
    with pytest.raises(ValueError, match="shorter than segment_seconds"):
        RecorderConfig(segment_seconds=1, fragment_seconds=2)


async def _keyframe_after(rec: CameraRecorder, seq: int, within: float = 10.0) -> KeyframeSample:
    """Wait until the recorder publishes a keyframe newer than `seq`."""
    sample = await asyncio.to_thread(rec.wait_keyframe_after, seq, within)
    assert sample is not None, f"no keyframe after #{seq} within {within} s"
    return sample


def _decode_keyframe(sample: KeyframeSample) -> av.VideoFrame:
    ctx = av.CodecContext.create(sample.codec, "r")
    assert isinstance(ctx, av.VideoCodecContext)
    if sample.extradata is not None:
        ctx.extradata = sample.extradata
    frames = [*ctx.decode(av.Packet(sample.data)), *ctx.decode(None)]
    assert len(frames) == 1
    frame = frames[0]
    assert isinstance(frame, av.VideoFrame)
    return frame


async def test_every_keyframe_is_published_compressed_for_image_health(
    rtsp: RtspService, site: Site
) -> None:
    """The hook image health reads: the latest keyframe with what a decoder needs, decodable
    on its own into a picture of the stream's size; one new sample per GOP."""
    cams = [_camera(7, "H264"), _camera(8, "H265")]
    await rtsp.prepare(cams)
    for cam in cams:
        await rtsp.add_camera(cam)
    recs = [site.recorder(cam) for cam in cams]
    assert all(rec.last_keyframe is None for rec in recs)
    started = time.time()
    tasks = [asyncio.create_task(r.run()) for r in recs]
    try:
        for cam, rec in zip(cams, recs, strict=True):
            first = await _keyframe_after(rec, 0)
            second = await _keyframe_after(rec, first.seq)
            assert second.seq == first.seq + 1
            assert started <= first.wall < second.wall <= time.time()  # receipt times
            assert first.camera_id == cam.id
            assert first.codec == {"H264": "h264", "H265": "hevc"}[cam.profiles[0].codec]
            assert first.extradata  # the SDP's parameter sets
            assert (first.width, first.height) == (640, 360)
            for sample in (first, second):
                frame = _decode_keyframe(sample)
                assert (frame.width, frame.height) == (640, 360)
                assert frame.key_frame
    finally:
        await asyncio.gather(*(r.stop() for r in recs))
        await asyncio.gather(*tasks)


def test_rtsp_socket_is_found_and_cut_even_while_another_thread_borrows_its_fd() -> None:
    """FFmpeg's socket is found from /proc by peer address; a concurrent search holds a
    duplicate fd of every socket it inspects, which must not make the match ambiguous (with
    16 cameras opening at once a recorder once could not be stopped because of it)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        host, port = server.getsockname()

        sock = RtspSocket(host, port)
        with sock.opening():  # stands for av.open: connects inside
            client = socket.create_connection((host, port))
            borrowed = os.dup(client.fileno())  # another thread's search, at that moment
        os.close(borrowed)
        peer, _ = server.accept()
        with client, peer:
            assert sock.found
            assert sock.interrupt()
            assert peer.recv(1) == b""  # shut down: the blocked reader would return now
            sock.release()
            assert not sock.interrupt()  # released: never touched again

        # While the open still blocks, the socket is searched for when needed; what the
        # camera sent tells an RTSP answer without video from no answer at all.
        blocked = RtspSocket(host, port)
        with blocked.opening():
            client = socket.create_connection((host, port))
            peer, _ = server.accept()
            with client, peer:
                assert blocked.bytes_received() == 0
                peer.sendall(b"RTSP/1.0 200 OK\r\n\r\n")
                # Readable once the kernel has the bytes, which is when TCP_INFO counts them.
                readable, _, _ = select.select([client], [], [], 5)
                assert readable, "the answer did not arrive"
                assert blocked.bytes_received() == 19
                assert blocked.interrupt()
                assert peer.recv(1) == b""
