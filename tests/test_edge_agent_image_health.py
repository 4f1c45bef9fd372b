"""Image health against the simulator's real RTSP streams.

Keyframes come from PyAV demuxing `camera-sim`'s live RTSP (over TCP), exactly the packets the
recorder would hand over as `KeyframeSample`s; faults are switched with `camera-sim fault`.
Deadlines are counted in stream time (15 s, the issue's target) so a busy machine that delivers
the stream late does not fail a test that a quiet one passes; the assertions are about what was
detected, never about how fast.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import av
import cv2
import numpy as np
import pytest

from edge_agent.config import HealthConfig
from edge_agent.image_health import (
    FAULTS,
    MAX_KEYFRAME_BYTES,
    ImageFaultTransition,
    ImageHealthChecker,
    ImageHealthError,
    ImageHealthMonitor,
    SceneSignature,
)
from edge_agent.keyframes import KeyframeSample
from sitelink import messages as m
from sitelink.topics import Kind, topic
from tests.conftest import RunningSimulator, start_simulator

OPTIONS = {"rtsp_transport": "tcp", "timeout": "5000000"}
#: Default thresholds (edge_agent.settings), but every keyframe (one per 2 s) is checked and
#: two agreeing checks decide, so a test takes seconds.
FAST = HealthConfig(
    check_interval_seconds=0.5,
    black_max_luma=16.0,
    covered_max_luma=60.0,
    covered_max_sharpness=10.0,
    blurred_max_sharpness=20.0,
    blurred_max_ratio=0.25,
    frozen_max_diff=0.1,
    moved_max_similarity=0.5,
    confirm_checks=2,
    ntp_server="",
    max_box_clock_offset_seconds=2.0,
)
STREAM_DEADLINE_S = 15.0


# --- keyframes from the live stream ---------------------------------------------------------


class KeyframeFeed:
    """Demuxes one camera's RTSP stream on a thread and keeps its newest keyframe, as the
    recorder's `last_keyframe` does (and, for fixtures, every keyframe)."""

    def __init__(self, cam: dict[str, Any], token: str = "main") -> None:
        self.camera_id: str = cam["id"]
        self.url = cam[f"rtsp_{token}"].replace(
            "rtsp://", f"rtsp://{cam['user']}:{cam['password']}@", 1
        )
        self.latest: KeyframeSample | None = None
        self.keyframes: list[KeyframeSample] = []
        self.stream_time: float | None = None  # seconds, from the packets' timestamps
        self.error: BaseException | None = None
        self._stop = threading.Event()
        #: notified on every keyframe and when the stream fails or ends
        self.changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"feed-{self.camera_id}")

    def start(self) -> KeyframeFeed:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        try:
            with av.open(self.url, options=OPTIONS) as container:
                stream = container.streams.video[0]
                ctx = stream.codec_context
                seq = 0
                for packet in container.demux(stream):
                    if self._stop.is_set():
                        return
                    if packet.pts is not None and packet.time_base is not None:
                        self.stream_time = float(packet.pts * packet.time_base)
                    if packet.is_keyframe and packet.size:
                        seq += 1
                        sample = KeyframeSample(
                            self.camera_id,
                            seq,
                            ctx.name,
                            ctx.extradata,
                            bytes(packet),
                            time.time(),
                            ctx.width,
                            ctx.height,
                        )
                        with self.changed:
                            self.keyframes.append(sample)
                            self.latest = sample
                            self.changed.notify_all()
        except Exception as exc:  # reported by the waiting test
            self.error = exc
        finally:
            with self.changed:
                self.changed.notify_all()


async def until(
    condition: Callable[[], bool], feed: KeyframeFeed, what: str, stream_seconds: float
) -> None:
    """Poll `condition` until true; fail after `stream_seconds` of the camera's stream time
    (or four times that in wall time, should the stream stop)."""
    start: float | None = feed.stream_time
    wall_limit = time.monotonic() + 4 * stream_seconds + 10
    while not condition():
        if feed.error is not None:
            raise AssertionError(f"{feed.camera_id}: stream failed: {feed.error!r}")
        now = feed.stream_time
        if start is None:
            start = now
        elif now is not None and now - start > stream_seconds:
            raise AssertionError(f"{feed.camera_id}: {what}: not within {stream_seconds:g} s")
        if time.monotonic() > wall_limit:
            raise AssertionError(f"{feed.camera_id}: {what}: the stream stopped advancing")
        await asyncio.sleep(0.1)


async def switch(sim: RunningSimulator, camera_id: str, kind: str) -> None:
    """`camera-sim fault`; it returns once the new clip is encoded and set."""
    done = await asyncio.to_thread(sim.cli, "fault", camera_id, kind)
    assert done.returncode == 0, done.stderr


class Rig:
    """Feeds + one ImageHealthChecker running on the event loop, recording what it reports."""

    def __init__(self, sim: RunningSimulator, config: HealthConfig) -> None:
        self.feeds = {cam["id"]: KeyframeFeed(cam) for cam in sim.cameras}
        self.seen: dict[str, list[ImageFaultTransition]] = {cid: [] for cid in self.feeds}
        self.references: dict[str, bytes] = {}
        self.checker = ImageHealthChecker(
            config,
            lambda cid: self.feeds[cid].latest,
            self._on_transition,
            on_reference=self._on_reference,
        )
        for cid in self.feeds:
            self.checker.add_camera(cid)
        self._task: asyncio.Task[None] | None = None

    async def _on_transition(self, transition: ImageFaultTransition) -> None:
        self.seen[transition.camera_id].append(transition)

    async def _on_reference(self, camera_id: str, signature: bytes) -> None:
        self.references[camera_id] = signature

    def reported(self, camera_id: str, fault: str, active: bool) -> Callable[[], bool]:
        return lambda: any(t.fault == fault and t.active == active for t in self.seen[camera_id])

    def checks(self, camera_id: str) -> int:
        monitor = self.checker.monitor(camera_id)
        assert monitor is not None
        return monitor.checks

    async def __aenter__(self) -> Rig:
        for feed in self.feeds.values():
            feed.start()
        self._task = asyncio.create_task(self.checker.run(tick=0.1))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*(asyncio.to_thread(f.stop) for f in self.feeds.values()))


#: What a reported fault's measured values must show, by the rule that decided it.
DECIDED_BY: dict[str, Callable[[dict[str, float]], bool]] = {
    "black": lambda v: v["luma_mean"] <= FAST.black_max_luma,
    "covered": lambda v: (
        v["luma_mean"] <= FAST.covered_max_luma and v["sharpness"] <= FAST.covered_max_sharpness
    ),
    "frozen": lambda v: v["motion"] <= FAST.frozen_max_diff,
    "blurred": lambda v: v["sharpness"] <= FAST.blurred_max_sharpness,
    "moved": lambda v: v["similarity"] < FAST.moved_max_similarity,
}


# --- against the live simulator -------------------------------------------------------------


async def test_each_picture_fault_is_detected_and_cleared_and_a_healthy_camera_stays_quiet(
    simulator_factory: Callable[..., RunningSimulator],
) -> None:
    sim = simulator_factory(cameras=6)
    ids = [cam["id"] for cam in sim.cameras]
    plan: dict[str, str | None] = dict(zip(ids, [*FAULTS, None], strict=True))
    healthy = ids[-1]
    during: dict[str, m.ImageHealth | None] = {}

    async with Rig(sim, FAST) as rig:

        async def fault_then_clear(cid: str, fault: str) -> None:
            feed = rig.feeds[cid]
            await until(lambda: rig.checks(cid) >= 3, feed, "3 healthy checks", 30)
            await switch(sim, cid, fault)
            await until(rig.reported(cid, fault, True), feed, f"{fault} on", STREAM_DEADLINE_S)
            monitor = rig.checker.monitor(cid)
            assert monitor is not None
            during[cid] = monitor.current()
            await switch(sim, cid, "clear")
            await until(rig.reported(cid, fault, False), feed, f"{fault} off", STREAM_DEADLINE_S)

        async def stay_healthy() -> None:
            await until(lambda: rig.checks(healthy) >= 10, rig.feeds[healthy], "10 checks", 30)

        outcomes = await asyncio.gather(
            *(fault_then_clear(cid, f) for cid, f in plan.items() if f is not None),
            stay_healthy(),
            return_exceptions=True,
        )
    failures = [repr(o) for o in outcomes if isinstance(o, BaseException)]
    assert not failures, failures

    for cid, fault in plan.items():
        got = [(t.fault, t.active) for t in rig.seen[cid]]
        assert got == ([] if fault is None else [(fault, True), (fault, False)]), cid
    for cid, fault in plan.items():
        if fault is None:
            continue
        health = during[cid]
        assert health is not None and health.faults == [fault]
        started = rig.seen[cid][0]
        assert DECIDED_BY[fault](started.values), (fault, started.values)
    # the checker enrolled a reference per camera and gave it to the daemon to store
    assert sorted(rig.references) == sorted(ids)
    assert all(len(sig) < 1024 for sig in rig.references.values())
    stats = rig.checker.stats()
    assert stats.errors == 0 and stats.checks >= 6 * 3
    assert stats.decode_seconds > 0 and stats.analysis_seconds > 0


async def test_h265_keyframes_are_decoded_measured_and_judged(
    simulator_factory: Callable[..., RunningSimulator],
) -> None:
    sim = simulator_factory("--codec", "H265", cameras=1)
    cid = sim.cameras[0]["id"]
    async with Rig(sim, FAST) as rig:
        feed = rig.feeds[cid]
        await until(lambda: rig.checks(cid) >= 2, feed, "2 checks", 30)
        monitor = rig.checker.monitor(cid)
        assert monitor is not None
        assert feed.latest is not None and feed.latest.codec == "hevc"
        health = monitor.current()
        assert health is not None and health.faults == []
        assert health.luma_mean is not None and 60 < health.luma_mean < 200
        assert health.sharpness is not None and health.sharpness > 100 * FAST.blurred_max_sharpness
        assert health.motion is not None and health.motion > 1.0
        await switch(sim, cid, "moved")
        await until(rig.reported(cid, "moved", True), feed, "moved on", STREAM_DEADLINE_S)
        await switch(sim, cid, "clear")
        await until(rig.reported(cid, "moved", False), feed, "moved off", STREAM_DEADLINE_S)
    assert [(t.fault, t.active) for t in rig.seen[cid]] == [("moved", True), ("moved", False)]


# --- recorded keyframes of one camera -------------------------------------------------------


class Recorded:
    """Real keyframes of one simulator camera: normal (main), one of the sub stream, and
    blurred (main)."""

    def __init__(self, normal: list[KeyframeSample], sub: KeyframeSample,
                 blurred: list[KeyframeSample]) -> None:  # fmt: skip
        self.normal = normal
        self.sub = sub
        self.blurred = blurred


def _wait_keyframes(feed: KeyframeFeed, count: int) -> list[KeyframeSample]:
    """Wait (on the feed's condition, notified per keyframe) until `count` keyframes came."""
    with feed.changed:
        got = feed.changed.wait_for(
            lambda: len(feed.keyframes) >= count or feed.error is not None
            or not feed._thread.is_alive(),
            timeout=60,
        )  # fmt: skip
        assert feed.error is None, feed.error
        assert got and len(feed.keyframes) >= count, (
            f"{feed.camera_id}: fewer than {count} keyframes"
        )
        return feed.keyframes[:count]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    sim = start_simulator(tmp_path_factory.mktemp("sim"), cameras=1)
    try:
        cam = sim.cameras[0]
        main, sub = KeyframeFeed(cam).start(), KeyframeFeed(cam, "sub").start()
        try:
            normal = _wait_keyframes(main, 3)
            sub_key = _wait_keyframes(sub, 1)[0]
            done = sim.cli("fault", cam["id"], "blurred")
            assert done.returncode == 0, done.stderr
            # the clip switches at the next keyframe: skip the one that may straddle it
            after = len(main.keyframes) + 1
            blurred = _wait_keyframes(main, after + 2)[after:]
        finally:
            main.stop()
            sub.stop()
        yield Recorded(normal, sub_key, blurred)
    finally:
        sim.stop()


def _renumbered(samples: list[KeyframeSample], first: int = 1) -> list[KeyframeSample]:
    return [replace(s, seq=first + i) for i, s in enumerate(samples)]


def test_blurred_is_judged_against_the_cameras_own_baseline(recorded: Recorded) -> None:
    # absolute threshold off: only the drop against the camera's baseline can decide
    relative_only = replace(FAST, blurred_max_sharpness=0.0, check_interval_seconds=0.0)
    samples = _renumbered(recorded.normal + recorded.normal + recorded.blurred)

    monitor = ImageHealthMonitor("cam-01", relative_only)
    reported = [t for s in samples for t in monitor.check(s)]
    assert [(t.fault, t.active) for t in reported] == [("blurred", True)]
    assert reported[0].values["sharpness_ratio"] <= 0.25

    # with the relative test off too, nothing calls it blurred (it may look moved instead)
    neither = ImageHealthMonitor("cam-01", relative_only, blurred_max_ratio=0.0)
    assert all(t.fault != "blurred" for s in samples for t in neither.check(s))


def test_a_camera_first_seen_blurred_is_caught_by_the_absolute_threshold(
    recorded: Recorded,
) -> None:
    monitor = ImageHealthMonitor("cam-01", replace(FAST, check_interval_seconds=0.0))
    reported = [t for s in _renumbered(recorded.blurred * 2) for t in monitor.check(s)]
    assert [(t.fault, t.active) for t in reported] == [("blurred", True)]
    assert monitor.reference_signature() is None  # a blurred picture is no reference


def test_garbage_and_damaged_keyframes_are_refused_and_the_monitor_carries_on(
    recorded: Recorded,
) -> None:
    good = recorded.normal[0]
    monitor = ImageHealthMonitor("cam-01", replace(FAST, check_interval_seconds=0.0))
    bad = {
        "cannot be decoded": replace(good, data=os.urandom(4000), extradata=None),
        "cannot be decoded|holds no picture": replace(good, data=bytes(3000)),
        "damaged": replace(good, data=good.data[: len(good.data) // 3]),
        "empty keyframe": replace(good, data=b""),
        "is not checked": replace(good, codec="mjpeg"),
        "larger than": replace(good, data=bytes(MAX_KEYFRAME_BYTES + 1)),
        "invalid codec extradata": replace(good, extradata=bytes(70_000)),
    }
    for n, (message, sample) in enumerate(bad.items(), start=1):
        with pytest.raises(ImageHealthError, match=message):
            monitor.check(replace(sample, seq=n))
        assert monitor.errors == n and monitor.checks == 0
    with pytest.raises(ImageHealthError, match="given to the monitor of cam-01"):
        monitor.check(replace(good, camera_id="cam-02", seq=99))
    assert monitor.current() is None

    assert monitor.check(replace(good, seq=100)) == []
    health = monitor.current()
    assert monitor.checks == 1 and health is not None and health.faults == []


async def test_checker_reports_a_broken_camera_once_and_keeps_checking_the_others(
    recorded: Recorded, caplog: pytest.LogCaptureFixture
) -> None:
    good = _renumbered(recorded.normal * 2)
    rounds = {"n": 0}

    def latest(camera_id: str) -> KeyframeSample:
        n = rounds["n"]
        if camera_id == "cam-bad":
            return replace(good[0], camera_id="cam-bad", seq=n + 1, data=os.urandom(2000))
        return good[n % len(good)]

    async def ignore(_: ImageFaultTransition) -> None:
        return None

    checker = ImageHealthChecker(replace(FAST, check_interval_seconds=0.0), latest, ignore)
    checker.add_camera("cam-01")
    checker.add_camera("cam-bad")
    caplog.set_level(logging.WARNING, logger="edge_agent.image_health")
    try:
        for n in range(4):
            rounds["n"] = n
            await checker.check_due()
    finally:
        checker.close()
    stats = checker.stats()
    assert (stats.checks, stats.errors) == (4, 4)
    assert stats.decode_seconds > 0 and stats.cpu_seconds > 0
    warnings = [r.getMessage() for r in caplog.records if "cam-bad" in r.getMessage()]
    assert len(warnings) == 1 and "cannot be decoded" in warnings[0]
    bad = checker.monitor("cam-bad")
    assert bad is not None and bad.current() is None and bad.errors == 4


def test_one_decode_per_interval_and_never_the_same_keyframe_twice(recorded: Recorded) -> None:
    first, second = _renumbered(recorded.normal[:2])
    monitor = ImageHealthMonitor("cam-01", replace(FAST, check_interval_seconds=10.0))
    monitor.check(first, now=100.0)
    assert monitor.checks == 1 and not monitor.due(105.0)
    assert monitor.check(second, now=105.0) == []  # too soon: not decoded
    assert monitor.checks == 1
    monitor.check(second, now=110.0)
    assert monitor.checks == 2
    monitor.check(second, now=500.0)  # no new keyframe (a stalled stream): nothing to judge
    assert monitor.checks == 2


def test_reference_is_a_small_signature_that_survives_a_restart(recorded: Recorded) -> None:
    config = replace(FAST, check_interval_seconds=0.0)
    first = ImageHealthMonitor("cam-01", config)
    first.check(recorded.normal[0])
    stored = first.reference_signature()
    assert stored is not None and len(stored) < 1024
    signature = SceneSignature.from_bytes(stored)
    assert signature.cells == (32, 18) and signature.detail is not None

    # after a restart the stored reference judges the same view, including the sub stream
    again = ImageHealthMonitor("cam-01", config, reference=stored)
    again.check(recorded.sub)
    measured = again.measurement()
    assert measured is not None and measured.similarity is not None
    assert measured.similarity > 0.8
    assert again.reference_signature() == stored and again.reference_version == 0

    for broken in (b"", b"IHS1", stored[:-1], b"XXXX" + stored[4:]):
        with pytest.raises(ValueError, match="reference signature"):
            ImageHealthMonitor("cam-01", config, reference=broken)


async def test_checker_re_enrols_a_camera_whose_stored_reference_is_unreadable(
    recorded: Recorded, caplog: pytest.LogCaptureFixture
) -> None:
    stored: dict[str, bytes] = {}

    async def keep(camera_id: str, signature: bytes) -> None:
        stored[camera_id] = signature

    async def ignore(_: ImageFaultTransition) -> None:
        return None

    checker = ImageHealthChecker(FAST, lambda _: recorded.normal[0], ignore, on_reference=keep)
    try:
        monitor = checker.add_camera("cam-01", reference=b"not a signature")
        assert monitor.reference_signature() is None
        assert "re-enrolling" in caplog.text
        await checker.check_due()
    finally:
        checker.close()
    assert stored["cam-01"] == monitor.reference_signature()


def test_snapshot_and_signals_fit_the_health_message(recorded: Recorded) -> None:
    monitor = ImageHealthMonitor("cam-01", replace(FAST, check_interval_seconds=0.0))
    assert monitor.snapshot_jpeg() is None
    monitor.check(recorded.normal[0])
    jpeg = monitor.snapshot_jpeg()
    assert jpeg is not None and len(jpeg) <= m.MAX_THUMBNAIL_BYTES
    picture = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert picture is not None
    assert picture.shape[1] <= 320 and picture.mean() > 30  # a picture, not a grey box
    camera = m.CameraHealth(
        camera="cam-01",
        connected=True,
        recording="recording",
        reconnects_1h=0,
        image=monitor.current(),
        thumbnail_jpeg=base64.b64encode(jpeg).decode(),
    )
    assert camera.image is not None and camera.image.scene_diff == 0.0


def test_transition_becomes_an_image_fault_event_on_the_wire(recorded: Recorded) -> None:
    monitor = ImageHealthMonitor("cam-01", replace(FAST, check_interval_seconds=0.0))
    frozen = _renumbered([recorded.normal[0]] * 3)
    started = [t for s in frozen for t in monitor.check(s)]
    assert [(t.fault, t.active) for t in started] == [("frozen", True)]
    event = started[0].to_event(seq=42)
    assert event.ts == frozen[-1].wall and event.measured["motion"] == 0.0
    name = topic("site-01", Kind.EVENT)
    back = m.decode(name, m.encode(event))
    assert isinstance(back, m.ImageFaultEvent)
    assert (back.seq, back.camera, back.fault, back.active) == (42, "cam-01", "frozen", True)


def test_thresholds_come_from_the_configuration(recorded: Recorded) -> None:
    # a camera that is dark by design: with black_max_luma above its level it is "black"
    strict = replace(FAST, check_interval_seconds=0.0, black_max_luma=200.0,
                     covered_max_luma=220.0)  # fmt: skip
    monitor = ImageHealthMonitor("cam-01", strict)
    reported = [t for s in _renumbered(recorded.normal[:2]) for t in monitor.check(s)]
    assert [(t.fault, t.active) for t in reported] == [("black", True)]


def test_a_looping_picture_checked_once_per_loop_is_not_frozen_given_the_keyframe_before(
    recorded: Recorded,
) -> None:
    """The simulator's clip loops every two keyframes: checks one loop apart see the same
    picture though the stream moves. With the keyframe just before each checked one, the
    monitor tells a loop from a freeze; without it, it cannot."""
    k0, k1, k2 = recorded.normal[:3]  # k2 is k0 one loop later
    cfg = replace(FAST, check_interval_seconds=0.0, confirm_checks=1)
    # seqs as the stream numbered them: k0=1, k1=2, k0'=3, k1'=4, k0''=5
    stream = [replace(s, seq=i + 1) for i, s in enumerate([k0, k1, k2, k1, k0])]

    blind = ImageHealthMonitor("cam-01", cfg)
    seen_blind = [t for s in (stream[0], stream[2], stream[4]) for t in blind.check(s)]
    assert ("frozen", True) in [(t.fault, t.active) for t in seen_blind]

    informed = ImageHealthMonitor("cam-01", cfg)
    seen = informed.check(stream[0])
    seen += informed.check(stream[2], before=stream[1])
    seen += informed.check(stream[4], before=stream[3])
    assert all(t.fault != "frozen" for t in seen), seen
