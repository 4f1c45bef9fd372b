"""The viewing tunnel end to end: a real recorder (simulator RTSP → sealed segments in a real
`SegmentStore`) behind `edge_agent.tunnel.serve_tunnel`, dialing the real `TunnelBroker`
mounted on an aiohttp server on a loopback port.

The broker's `send_command` hook stands in for the MQTT hop only: it hands the `open_tunnel`
command to the "edge" of the site (in-process `serve_tunnel`, a subprocess, or a hand-written
misbehaving peer). Everything after that is the real protocol over a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import json
import secrets
import socket
import ssl
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import aiohttp
import av
import cv2
import numpy as np
import psutil
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from central_hub.tunnel import RemoteError, TunnelBroker, TunnelRevoked
from devstack.certs import CertificateAuthority
from devstack.waiting import until as _poll
from edge_agent.device_key import load_public_key_pem
from edge_agent.recorder import CameraRecorder, LiveTap, RecorderConfig
from edge_agent.segment_store import SegmentStore
from edge_agent.tunnel import serve_tunnel
from sitelink import tunnel as proto
from sitelink.messages import OpenTunnel, OpenTunnelArgs
from sitelink.sealed_segment import (
    RecipientPrivateKey,
    generate_private_key,
    open_segment,
    unseal_to,
    write_public_key,
)
from sitelink.tunnel import TunnelProtocolError, TunnelRefused, TunnelUnavailable

REPO = Path(__file__).resolve().parent.parent
SITE = "site-a"
OTHER_SITE = "site-b"
# Short segments so playback has sealed files within seconds; 1 s fragments as in production.
CONFIG = RecorderConfig(segment_seconds=4.0, backoff_initial_seconds=0.5, backoff_max_seconds=1.0)


# --------------------------------------------------------------------------------------------
# The edge box (TunnelSources) and the hub


@dataclass
class EdgeBox:
    """What the daemon lends `serve_tunnel`: real store, real recorders, the device key."""

    site_id: str
    device_key: Ed25519PrivateKey
    segment_store: SegmentStore
    recorders: dict[str, CameraRecorder] = field(default_factory=dict)
    snapshot_calls: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def live_tap(self, camera: str) -> LiveTap | None:
        rec = self.recorders.get(camera)
        return rec.tap if rec is not None else None

    def snapshot(self, camera: str) -> bytes | None:
        """JPEG of the newest keyframe in the camera's live tap (what image health keeps)."""
        self.snapshot_calls += 1
        tap = self.live_tap(camera)
        keyed = [f for f in tap.latest() if f.keyframe] if tap is not None else []
        if not keyed:
            return None
        with av.open(io.BytesIO(keyed[-1].init + keyed[-1].data)) as container:
            frame = next(container.decode(video=0))
        ok, jpeg = cv2.imencode(".jpg", frame.to_ndarray(format="bgr24"))
        assert ok
        return bytes(jpeg.tobytes())


Dialer = Callable[[OpenTunnelArgs], Coroutine[Any, Any, None]]


@dataclass
class Hub:
    """The real broker on a loopback aiohttp server, and the stand-in for MQTT delivery."""

    broker: TunnelBroker
    url: str
    port: int
    app: web.Application
    keys: dict[str, Ed25519PublicKey]
    dialers: dict[str, Dialer] = field(default_factory=dict)
    commands: list[tuple[str, OpenTunnel]] = field(default_factory=list)
    edge_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    edge_idle: float = 30.0
    #: handler of /fake on the same server: a misbehaving hub for edge-side tests
    fake_hub: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None

    async def send_command(self, site: str, command: OpenTunnel) -> None:
        self.commands.append((site, command))
        dialer = self.dialers.get(site)
        if dialer is not None:  # no dialer: the site is offline
            self.edge_tasks.append(asyncio.create_task(dialer(command.args)))

    def serve(self, box: EdgeBox, **kwargs: Any) -> Dialer:
        """A dialer running the real edge client for `box`."""

        async def dial(args: OpenTunnelArgs) -> None:
            await serve_tunnel(args, box, idle_seconds=self.edge_idle, **kwargs)

        return dial

    def args_for(self, site: str, camera: str, purpose: str) -> OpenTunnelArgs:
        """Issue a token as the broker would for a view request (nothing is sent)."""
        return self.broker.issue(site, camera, purpose).args  # type: ignore[arg-type]


async def _start_hub(
    keys: dict[str, Ed25519PublicKey], ssl_context: ssl.SSLContext | None = None, **options: Any
) -> tuple[Hub, web.AppRunner]:
    holder: dict[str, TunnelBroker] = {}
    hub_ref: list[Hub] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        return await holder["broker"].handle(request)

    app = web.Application()
    app.router.add_get(proto.TUNNEL_PATH, handle)

    async def fake(request: web.Request) -> web.StreamResponse:
        handler = hub_ref[0].fake_hub
        assert handler is not None
        return await handler(request)

    app.router.add_get("/fake", fake)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    scheme = "wss" if ssl_context else "ws"
    url = f"{scheme}://127.0.0.1:{port}{proto.TUNNEL_PATH}"

    async def send(site_id: str, command: OpenTunnel) -> None:
        await hub_ref[0].send_command(site_id, command)

    options.setdefault("idle_seconds", 1.0)
    options.setdefault("open_timeout", 15.0)
    broker = TunnelBroker(hub_url=url, send_command=send, device_key_for=keys.get, **options)
    holder["broker"] = broker
    hub = Hub(broker, url, port, app, keys)
    hub_ref.append(hub)
    return hub, runner


async def _stop_hub(hub: Hub, runner: web.AppRunner) -> None:
    await hub.broker.close()
    for task in hub.edge_tasks:
        task.cancel()
    await asyncio.gather(*hub.edge_tasks, return_exceptions=True)
    await runner.cleanup()


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[EdgeBox]:
    """Site A's edge box: a real segment store, a device key; recorders added by tests."""
    store = SegmentStore(tmp_path / "edge-data", Ed25519PrivateKey.generate(), SITE)
    edge = EdgeBox(SITE, Ed25519PrivateKey.generate(), store)
    yield edge
    await asyncio.gather(*(rec.stop() for rec in edge.recorders.values()))
    await asyncio.gather(*edge.tasks)
    store.close()


@pytest.fixture
async def hub(box: EdgeBox) -> AsyncIterator[Hub]:
    """The broker on ws://127.0.0.1:PORT/edge/tunnel; site A's box answers its commands."""
    hub, runner = await _start_hub({SITE: box.device_key.public_key()})
    hub.dialers[SITE] = hub.serve(box)
    yield hub
    await _stop_hub(hub, runner)


@pytest.fixture
def viewing_key() -> RecipientPrivateKey:
    return generate_private_key()


@pytest.fixture
async def cam(
    simulator_factory: Callable[..., Any], box: EdgeBox, viewing_key: RecipientPrivateKey
) -> str:
    """Id of a simulator camera that site A's box records (it has delivered a fragment)."""
    sim = simulator_factory(cameras=1)
    await _record(box, sim.cameras, viewing_key)
    return str(sim.cameras[0]["id"])


async def _record(
    box: EdgeBox, cameras: list[dict[str, Any]], key: RecipientPrivateKey
) -> list[CameraRecorder]:
    """Start real recorders for the simulator's cameras; return once each delivered a fragment."""
    recs = []
    for cam in cameras:
        rec = CameraRecorder(
            cam["id"],
            cam["rtsp_main"],
            box.segment_store,
            [key.public_key()],
            CONFIG,
            user=cam["user"],
            password=cam["password"],
        )
        box.recorders[cam["id"]] = rec
        box.tasks.append(asyncio.create_task(rec.run()))
        recs.append(rec)
    async with asyncio.timeout(30):
        for rec in recs:
            await rec.tap.wait(0)
    return recs


def _decode_frames(data: bytes) -> int:
    with av.open(io.BytesIO(data)) as container:
        return sum(1 for _ in container.decode(video=0))


# --------------------------------------------------------------------------------------------
# Live


async def test_live_fragments_flow_and_viewers_share_one_upstream(cam: str, hub: Hub) -> None:
    got: dict[str, list[Any]] = {"u1": [], "u2": []}
    hub.broker.viewer_queue = 2  # so that a viewer who stops reading falls behind quickly
    async with (
        asyncio.timeout(60),
        hub.broker.live(SITE, cam, user="u1") as first,
        hub.broker.live(SITE, cam, user="u2") as second,
        hub.broker.live(SITE, cam, user="u3") as slow,
    ):
        for _ in range(4):
            got["u1"].append(await anext(first))
            got["u2"].append(await anext(second))
        stats = hub.broker.stats()
        # u3 read nothing for 4 s: it lost fragments and resumes on a keyframe; nobody else lost.
        late = await anext(slow)
    assert slow.dropped > 0 and late.keyframe and late.seq > got["u1"][0].seq
    assert first.dropped == second.dropped == 0
    # One command, one edge tunnel, one upstream for all viewers.
    assert len(hub.commands) == 1 and len(hub.edge_tasks) == 1
    assert stats["tunnels_open"] == 1 and stats["upstreams"] == 1 and stats["viewers"] == 3
    for frags in got.values():
        assert frags[0].keyframe, "a viewer starts on a keyframe"
        assert [f.seq for f in frags] == list(range(frags[0].seq, frags[0].seq + 4))
        assert frags[0].init[4:8] == b"ftyp"
        assert all(f.received >= f.wall for f in frags)
        # Real video: init + the fragments decode with PyAV.
        assert _decode_frames(frags[0].init + b"".join(f.data for f in frags)) >= 25 * 2
    assert {f.seq for f in got["u1"]} & {f.seq for f in got["u2"]}, "the same fragments"
    # The last viewer left: the upstream stopped at once, the idle tunnel closes (hub idle 1 s).
    assert hub.broker.stats()["upstreams"] == 0
    await asyncio.wait_for(hub.edge_tasks[0], 30)
    assert hub.broker.open_tunnels() == []


async def test_revoke_ends_a_live_stream_at_once_and_leaves_other_viewers(
    cam: str, hub: Hub
) -> None:
    async with asyncio.timeout(60):
        async with (
            hub.broker.live(SITE, cam, user="u1", session="s1") as revoked,
            hub.broker.live(SITE, cam, user="u2") as kept,
        ):
            await anext(revoked)
            seen = (await anext(kept)).seq
            # u1 does not read: fragments queue up for it while u2 reads two more.
            while (await anext(kept)).seq < seen + 2:
                pass
            assert revoked.delivered == 1
            assert hub.broker.revoke(user="u1") == 1
            # Queued fragments are dropped: the very next read fails.
            with pytest.raises(TunnelRevoked):
                await anext(revoked)
            assert revoked.delivered == 1
            assert (await anext(kept)).seq > seen + 2, "the other viewer goes on"
            # Revoking the whole site ends the rest and closes its tunnel.
            assert hub.broker.revoke(site=SITE) == 1
            with pytest.raises(TunnelRevoked):
                await anext(kept)
        await asyncio.wait_for(hub.edge_tasks[0], 30)  # the edge saw the tunnel close
    assert hub.broker.open_tunnels() == []


async def test_snapshots_are_coalesced_per_camera_and_decode(
    cam: str, box: EdgeBox, hub: Hub
) -> None:
    async with asyncio.timeout(60):
        await _poll(lambda: any(f.keyframe for f in box.recorders[cam].tap.latest()))
        jpegs = await asyncio.gather(*(hub.broker.snapshot(SITE, cam) for _ in range(5)))
    assert box.snapshot_calls == 1 and len(hub.commands) == 1
    assert len(set(jpegs)) == 1
    picture = cv2.imdecode(np.frombuffer(jpegs[0], np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape == (720, 1280, 3)
    # A camera the box does not record: a clear error from the edge, nothing else.
    with pytest.raises(RemoteError) as err:
        await hub.broker.snapshot(SITE, "cam-99")
    assert err.value.reason == "unavailable"


# --------------------------------------------------------------------------------------------
# Playback


async def test_playback_lists_segments_and_gaps_and_fetches_a_sealed_segment_that_decodes(
    simulator_factory: Callable[..., Any], box: EdgeBox, hub: Hub, viewing_key: RecipientPrivateKey
) -> None:
    sim = simulator_factory(cameras=1)
    t0 = time.time()
    await _record(box, sim.cameras, viewing_key)
    cam = sim.cameras[0]["id"]
    store = box.segment_store
    # A gap in the ledger from an earlier outage (the store's own API, as the recorder uses it).
    gap_id = store.open_gap(cam, t0 - 120.0, "refused")
    store.close_gap(gap_id, t0 - 60.0)
    await _poll(lambda: len(store.segments(cam)) >= 2, 40, "two sealed segments")
    hub.broker.list_page = 1  # one segment per page: the broker pages through
    async with asyncio.timeout(60):
        indexed = store.segments(cam, t0 - 300, None)
        listing = await hub.broker.list_segments(SITE, cam, t0 - 300, time.time(), user="u1")
        assert [s.seq for s in listing.segments][: len(indexed)] == [s.seq for s in indexed]
        assert hub.broker.stats()["requests.list"] == len(listing.segments) >= 2
        first = listing.segments[0]
        assert first.sha256 == indexed[0].file_sha256 and first.bytes == indexed[0].bytes
        assert first.finished and first.codec == "H264" and first.start >= t0
        assert [(g.start, g.end, g.cause) for g in listing.gaps] == [
            (t0 - 120.0, t0 - 60.0, "refused")
        ]
        sealed = await hub.broker.fetch_segment(SITE, cam, first.seq, user="u1")
        with pytest.raises(RemoteError) as err:
            await hub.broker.fetch_segment(SITE, cam, 999_999)
        assert err.value.reason == "not_found"
    assert len(hub.commands) == 1, "list pages, fetch and the miss shared one playback tunnel"
    assert sealed == indexed[0].path.read_bytes()
    with open_segment(io.BytesIO(sealed), viewing_key) as segment:
        chunks = list(segment)
        assert segment.finished and segment.header.camera_id == cam
    assert chunks[0][4:8] == b"ftyp" and len(chunks) - 1 == first.fragments
    plaintext = io.BytesIO()
    unseal_to(io.BytesIO(sealed), viewing_key, plaintext, require_finished=True)
    assert _decode_frames(plaintext.getvalue()) >= 25 * 3


async def test_idle_tunnels_close_from_either_side(box: EdgeBox, hub: Hub) -> None:
    now = time.time()
    # The hub closes a tunnel nobody uses (hub idle 0.3 s, edge idle 30 s).
    hub.broker.idle_seconds = 0.3
    listing = await hub.broker.list_segments(SITE, "cam-01", now - 60, now)
    assert listing.segments == () and listing.gaps == ()
    await asyncio.wait_for(hub.edge_tasks[0], 10)  # serve_tunnel returned: closed by the hub
    assert hub.broker.open_tunnels() == []
    # The edge closes on its own when the hub asks for nothing (edge idle 0.3 s, hub 60 s).
    hub.broker.idle_seconds = 60.0
    hub.edge_idle = 0.3
    await hub.broker.list_segments(SITE, "cam-01", now - 60, now)
    await asyncio.wait_for(hub.edge_tasks[1], 10)
    await _poll(lambda: hub.broker.open_tunnels() == [], 10, "the hub to see the close")
    assert len(hub.commands) == 2


async def test_an_offline_site_fails_after_the_open_timeout_or_at_once_when_revoked(
    box: EdgeBox,
) -> None:
    hub, runner = await _start_hub({SITE: box.device_key.public_key()}, open_timeout=0.5)
    try:  # no dialer for SITE: the command goes nowhere
        with pytest.raises(TunnelUnavailable) as err:
            await hub.broker.snapshot(SITE, "cam-01")
        assert err.value.reason == "no_tunnel"
        hub.broker.open_timeout = 60.0
        waiting = asyncio.create_task(hub.broker.list_segments(SITE, "cam-01", 1.7e9, 1.7e9 + 1))
        await _poll(lambda: hub.broker.stats()["calls"] == 1, 10, "the call to be waiting")
        hub.broker.revoke(site=SITE)
        with pytest.raises(TunnelRevoked):
            await asyncio.wait_for(waiting, 10)
    finally:
        await _stop_hub(hub, runner)


# --------------------------------------------------------------------------------------------
# Authentication


def _other_key_box(box: EdgeBox, site: str = SITE) -> EdgeBox:
    return EdgeBox(site, Ed25519PrivateKey.generate(), box.segment_store)


@pytest.mark.parametrize(
    "case",
    [
        "wrong_token",
        "expired_token",
        "other_camera",
        "other_site",
        "other_site_claimed",
        "wrong_key",
        "wrong_hub",
        "replayed",
    ],
)
async def test_a_bad_hello_is_refused_with_its_reason_and_nothing_is_served(
    case: str, box: EdgeBox, hub: Hub
) -> None:
    broker = hub.broker
    edge: EdgeBox = box
    if case == "wrong_token":
        args = hub.args_for(SITE, "cam-01", "playback").model_copy(
            update={"token": secrets.token_urlsafe(32)}
        )
        expected = "unknown_token"
    elif case == "expired_token":
        broker.token_seconds = 0.05
        issued = hub.args_for(SITE, "cam-01", "playback")
        await _poll(lambda: time.time() > issued.expires, 5, "the token to expire")
        # The edge would not even dial with it; pretend its clock is late so the hub decides.
        args = issued.model_copy(update={"expires": time.time() + 60})
        expected = "token_expired"
    elif case == "other_camera":
        args = hub.args_for(SITE, "cam-01", "playback").model_copy(update={"camera": "cam-02"})
        expected = "token_mismatch"
    elif case == "other_site":  # site A's box presents a token issued for site B
        args = hub.args_for(OTHER_SITE, "cam-01", "playback")
        expected = "token_mismatch"
    elif case == "other_site_claimed":  # ... and claims to be site B: site B's key is unknown
        args = hub.args_for(OTHER_SITE, "cam-01", "playback")
        edge = _other_key_box(box, OTHER_SITE)
        expected = "unknown_site"
    elif case == "wrong_key":
        args = hub.args_for(SITE, "cam-01", "playback")
        edge = _other_key_box(box)
        expected = "wrong_key"
    elif case == "wrong_hub":  # same server, but not the URL the token was issued for
        args = hub.args_for(SITE, "cam-01", "playback").model_copy(
            update={"hub_url": hub.url.replace("127.0.0.1", "localhost")}
        )
        expected = "wrong_hub"
    else:
        args = hub.args_for(SITE, "cam-01", "playback")
        tunnel_task = asyncio.create_task(serve_tunnel(args, box, idle_seconds=0.2))
        await asyncio.wait_for(tunnel_task, 10)  # served, then idled out
        expected = "token_used"
    with pytest.raises(TunnelRefused) as err:
        await serve_tunnel(args, edge)
    assert err.value.reason == expected
    assert str(err.value)  # a sentence for the log
    assert broker.open_tunnels() == []
    assert broker.stats()[f"refused.{expected}"] == 1


async def test_the_viewer_learns_why_the_edge_was_refused(box: EdgeBox, hub: Hub) -> None:
    hub.dialers[SITE] = hub.serve(_other_key_box(box))  # re-imaged box, key not re-registered
    with pytest.raises(TunnelRefused) as err:
        await hub.broker.list_segments(SITE, "cam-01", 1.7e9, 1.7e9 + 60)
    assert err.value.reason == "wrong_key"
    with pytest.raises(TunnelRefused):
        await asyncio.gather(*hub.edge_tasks)


async def test_a_forged_signature_is_refused_and_the_socket_closed(box: EdgeBox, hub: Hub) -> None:
    args = hub.args_for(SITE, "cam-01", "playback")
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(hub.url, protocols=(proto.SUBPROTOCOL,))
        challenge = proto.decode_hub_message((await ws.receive()).data)
        honest = _hello(box.device_key, args, challenge.nonce)
        forged = _hello(Ed25519PrivateKey.generate(), args, challenge.nonce).model_copy(
            update={"key_id": honest.key_id}  # claims the registered key, signed by another
        )
        await ws.send_str(proto.encode_message(forged))
        refused = proto.decode_hub_message((await ws.receive()).data)
        assert isinstance(refused, proto.Refused) and refused.reason == "bad_signature"
        assert (await ws.receive()).type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == proto.CLOSE_REFUSED
    assert hub.broker.open_tunnels() == []


async def test_an_expired_command_is_not_even_dialed(box: EdgeBox, hub: Hub) -> None:
    args = hub.args_for(SITE, "cam-01", "live").model_copy(update={"expires": time.time() - 1})
    with pytest.raises(TunnelRefused) as err:
        await serve_tunnel(args, box)
    assert err.value.reason == "token_expired"
    assert not any(k.startswith("refused.") for k in hub.broker.stats())


def _hello(key: Ed25519PrivateKey, args: OpenTunnelArgs, nonce: str) -> proto.Hello:
    return proto.make_hello(
        key=key,
        site=SITE,
        camera=args.camera,
        purpose=args.purpose,
        hub_url=args.hub_url,
        token=args.token,
        nonce=nonce,
    )


# --------------------------------------------------------------------------------------------
# Malformed frames from either side


def _evil_edge(box: EdgeBox, payload: str | bytes) -> Dialer:
    """An edge that authenticates properly, then answers the first request with `payload`."""

    async def dial(args: OpenTunnelArgs) -> None:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(
                args.hub_url, protocols=(proto.SUBPROTOCOL,), max_msg_size=0
            )
            challenge = proto.decode_hub_message((await ws.receive()).data)
            await ws.send_str(proto.encode_message(_hello(box.device_key, args, challenge.nonce)))
            assert isinstance(proto.decode_hub_message((await ws.receive()).data), proto.Welcome)
            await ws.receive()  # the first request
            with contextlib.suppress(ConnectionError):  # the hub may cut a big frame short
                if isinstance(payload, bytes):
                    await ws.send_bytes(payload)
                else:
                    await ws.send_str(payload)
            while (await ws.receive()).type not in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
            ):
                pass
            evil_close_codes.append(ws.close_code)

    return dial


evil_close_codes: list[int | None] = []

_FRAGMENT = b"\x00\x00\x00\x10moof" + bytes(8)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param("this is not JSON", id="not-json"),
        pytest.param('{"v":1,"type":"bogus","id":1}', id="unknown-type"),
        pytest.param('{"v":1,"type":"list_reply","id":1,"segments":"x","gaps":[]}', id="schema"),
        pytest.param('{"v":2,"type":"error","id":1,"code":"failed","message":"x"}', id="version"),
        pytest.param('{"v":1,"type":"live_end","id":1,"reason":"cancelled"}', id="wrong-reply"),
        pytest.param(
            '{"v":1,"type":"error","id":7,"code":"failed","message":"x"}', id="never-sent"
        ),
        pytest.param(b"\x01\x02", id="short-frame"),
        pytest.param(proto.encode_fragment(1, 1, 1, time.time(), True, _FRAGMENT), id="frame-kind"),
        pytest.param(b"\x01\x09\x00\x00\x00\x01data", id="unknown-frame"),
        pytest.param(bytes(proto.MAX_FRAME_BYTES + 1), id="oversized"),
    ],
)
async def test_malformed_frames_from_the_edge_close_the_tunnel_cleanly(
    payload: str | bytes, box: EdgeBox, hub: Hub
) -> None:
    evil_close_codes.clear()
    hub.dialers[SITE] = _evil_edge(box, payload)
    with pytest.raises(TunnelProtocolError):
        await hub.broker.list_segments(SITE, "cam-01", 1.7e9, 1.7e9 + 60)
    await asyncio.wait_for(asyncio.gather(*hub.edge_tasks), 10)
    # 4400 from the broker; an oversized frame is cut by aiohttp itself (1009, or 1006 when
    # the peer is still writing it).
    oversized = len(payload) > proto.MAX_FRAME_BYTES
    assert evil_close_codes[0] in ({proto.CLOSE_PROTOCOL, 1009, 1006} if oversized else {4400})
    assert hub.broker.open_tunnels() == []
    # The hub is unharmed: a proper edge is served right after.
    hub.dialers[SITE] = hub.serve(box)
    listing = await hub.broker.list_segments(SITE, "cam-01", 1.7e9, 1.7e9 + 60)
    assert listing.segments == ()


def _fake_hub(script: list[str | bytes], seen: dict[str, Any]) -> Callable[..., Awaitable[Any]]:
    """A hub endpoint that does the handshake, then sends `script` and records how the edge
    closed."""

    async def handle(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=(proto.SUBPROTOCOL,), max_msg_size=0)
        await ws.prepare(request)
        await ws.send_str(
            proto.encode_message(proto.Challenge(nonce=proto.new_nonce(), hub_time=time.time()))
        )
        seen["hello"] = proto.decode_edge_message((await ws.receive()).data)
        await ws.send_str(proto.encode_message(proto.Welcome(tunnel_id="fake-hub", idle_seconds=9)))
        for item in script:
            if isinstance(item, bytes):
                await ws.send_bytes(item)
            else:
                await ws.send_str(item)
        async for _msg in ws:
            pass
        seen["close_code"] = ws.close_code
        return ws

    return handle


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(["{not json"], id="not-json"),
        pytest.param([b"\x01\x02\x00\x00\x00\x01"], id="binary"),
        pytest.param(['{"v":1,"type":"rm -rf","id":1}'], id="unknown-type"),
        pytest.param(['{"v":1,"type":"fetch","id":"1","seq":1}'], id="string-id"),
        pytest.param(['{"v":1,"type":"list","id":1,"start":1e300,"end":1}'], id="bad-range"),
        pytest.param(['{"v":1,"type":"fetch","id":1,"seq":1,"path":"/etc/passwd"}'], id="extra"),
        pytest.param(
            ['{"v":1,"type":"snapshot","id":5}', '{"v":1,"type":"snapshot","id":5}'],
            id="reused-id",
        ),
        pytest.param(
            ['{"v":1,"type":"welcome","tunnel_id":"again-123","idle_seconds":1}'], id="welcome"
        ),
        pytest.param(["x" * (proto.MAX_CONTROL_BYTES + 1)], id="oversized"),
    ],
)
async def test_malformed_frames_from_the_hub_end_the_edge_cleanly(
    script: list[str | bytes], box: EdgeBox, hub: Hub
) -> None:
    seen: dict[str, Any] = {}
    hub.fake_hub = _fake_hub(script, seen)
    args = OpenTunnelArgs(
        hub_url=hub.url.replace(proto.TUNNEL_PATH, "/fake"),
        token=secrets.token_urlsafe(32),
        camera="cam-01",
        purpose="snapshot",
        expires=time.time() + 60,
    )
    with pytest.raises(TunnelProtocolError):
        await asyncio.wait_for(serve_tunnel(args, box), 10)
    assert box.snapshot_calls <= 1
    await _poll(lambda: "close_code" in seen, 10, "the fake hub to see the close")
    assert seen["close_code"] in (proto.CLOSE_PROTOCOL, 1009)
    assert isinstance(seen["hello"], proto.Hello) and seen["hello"].site == SITE


# --------------------------------------------------------------------------------------------
# The edge process listens for nothing


EDGE_PROCESS = r"""
import asyncio, json, sys
from pathlib import Path

from edge_agent.device_key import load_or_create_device_key, public_key_pem
from edge_agent.recorder import CameraRecorder, RecorderConfig
from edge_agent.segment_store import SegmentStore
from edge_agent.tunnel import serve_tunnel
from sitelink.messages import OpenTunnelArgs
from sitelink.sealed_segment import load_public_key


class Box:
    def __init__(self, site_id, device_key, segment_store, recorder):
        self.site_id, self.device_key, self.segment_store = site_id, device_key, segment_store
        self.recorder = recorder

    def live_tap(self, camera):
        return self.recorder.tap if camera == self.recorder.camera_id else None

    def snapshot(self, camera):
        return None


async def main():
    data, site, recipient = Path(sys.argv[1]), sys.argv[2], sys.argv[4]
    camera = json.loads(sys.argv[3])
    data.mkdir(parents=True, exist_ok=True)
    key = load_or_create_device_key(data / "device_key.pem")
    store = SegmentStore(data, key, site)
    rec = CameraRecorder(camera["id"], camera["rtsp_main"], store, [load_public_key(recipient)],
                         RecorderConfig(), user=camera["user"], password=camera["password"])
    recording = asyncio.create_task(rec.run())
    print(json.dumps({"public_key": public_key_pem(key)}), flush=True)
    loop = asyncio.get_running_loop()
    tunnels = []
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        args = OpenTunnelArgs.model_validate_json(line)
        tunnels.append(asyncio.create_task(serve_tunnel(args, Box(site, key, store, rec))))
    await rec.stop()
    await recording


asyncio.run(main())
"""


async def test_the_edge_process_serves_live_view_with_outbound_connections_only(
    tmp_path: Path, simulator_factory: Callable[..., Any], viewing_key: RecipientPrivateKey
) -> None:
    sim = simulator_factory(cameras=1)
    cam = sim.cameras[0]
    write_public_key(viewing_key.public_key(), tmp_path / "viewing.pub")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        EDGE_PROCESS,
        str(tmp_path / "edge-data"),
        SITE,
        json.dumps(cam),
        str(tmp_path / "viewing.pub"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdin is not None and proc.stdout is not None
    stdin = proc.stdin
    try:
        announced = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
        hub, runner = await _start_hub({SITE: load_public_key_pem(announced["public_key"])})

        async def deliver(args: OpenTunnelArgs) -> None:  # the MQTT hop, by pipe
            stdin.write(args.model_dump_json().encode() + b"\n")
            await stdin.drain()

        hub.dialers[SITE] = deliver
        try:
            async with asyncio.timeout(60), hub.broker.live(SITE, cam["id"]) as stream:
                fragments = [await anext(stream) for _ in range(3)]
                connections = psutil.Process(proc.pid).net_connections(kind="inet")
        finally:
            await _stop_hub(hub, runner)
    finally:
        stdin.close()
        proc.terminate()
        await proc.wait()
    assert fragments[0].keyframe and fragments[0].init[4:8] == b"ftyp"
    listening = [c for c in connections if c.status == psutil.CONN_LISTEN]
    unbound_udp = [c for c in connections if c.type == socket.SOCK_DGRAM and not c.raddr]
    assert listening == [] and unbound_udp == [], "the edge must accept nothing"
    remote_ports = sorted(c.raddr.port for c in connections if c.raddr)
    assert hub.port in remote_ports, "the tunnel is an outbound connection to the hub"
    assert all(ipaddress.ip_address(c.raddr.ip).is_loopback for c in connections if c.raddr)
    ours = [c for c in connections if c.raddr and c.raddr.port == hub.port]
    assert len(ours) == 1 and ours[0].status == psutil.CONN_ESTABLISHED


# --------------------------------------------------------------------------------------------
# TLS


async def test_wss_works_with_the_operators_ca_and_an_untrusted_hub_is_not_spoken_to(
    tmp_path: Path, box: EdgeBox
) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    cert = ca.issue_server()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert.cert_file, cert.key_file)
    hub, runner = await _start_hub({SITE: box.device_key.public_key()}, ssl_context=server_tls)
    try:
        assert hub.url.startswith("wss://127.0.0.1:")
        trusting = ssl.create_default_context(cafile=str(ca.cert_file))
        hub.dialers[SITE] = hub.serve(box, ssl_context=trusting)
        listing = await hub.broker.list_segments(SITE, "cam-01", 1.7e9, 1.7e9 + 60)
        assert listing.segments == () and hub.broker.stats()["tunnels"] == 1
        # The system's CAs do not know the test CA: the edge refuses to talk, nothing is sent.
        with pytest.raises(TunnelUnavailable) as err:
            await serve_tunnel(hub.args_for(SITE, "cam-01", "playback"), box)
        assert err.value.reason == "tls"
        assert not any(k.startswith("refused.") for k in hub.broker.stats())
    finally:
        await _stop_hub(hub, runner)


def test_plaintext_hub_urls_are_accepted_only_on_loopback() -> None:
    def args(url: str) -> OpenTunnelArgs:
        return OpenTunnelArgs(
            hub_url=url, token="A" * 43, camera="cam-01", purpose="live", expires=time.time() + 30
        )

    assert args("wss://hub-2.example.org/edge/tunnel").hub_url.startswith("wss://")
    assert args("https://hub-2.example.org/edge/tunnel").hub_url.startswith("https://")
    assert args("ws://127.0.0.1:8443/edge/tunnel").hub_url.startswith("ws://")
    for bad in (
        "ws://hub-2.example.org/edge/tunnel",
        "http://10.0.0.5/edge/tunnel",
        "wss://user:pw@hub.example.org/edge/tunnel",
        "ftp://hub.example.org/",
    ):
        with pytest.raises(ValidationError):
            args(bad)

    async def never(site: str, command: OpenTunnel) -> None:
        raise AssertionError("not used")

    with pytest.raises(ValueError, match="loopback"):
        TunnelBroker(
            hub_url="ws://hub-2.example.org/edge/tunnel", send_command=never, device_key_for={}.get
        )


# --------------------------------------------------------------------------------------------
# The wire format itself


def test_binary_frames_round_trip() -> None:
    wall = time.time()
    init = b"\x00\x00\x00\x10ftypisom" + bytes(4)
    assert proto.decode_frame(proto.encode_init(7, 3, init)) == proto.InitFrame(7, 3, init)
    assert proto.decode_frame(proto.encode_fragment(7, 42, 3, wall, True, _FRAGMENT)) == (
        proto.FragmentFrame(7, 42, 3, wall, True, _FRAGMENT)
    )
    chunk = bytes(range(256)) * 4
    assert proto.decode_frame(proto.encode_chunk(9, 512, chunk)) == proto.ChunkFrame(9, 512, chunk)
    jpeg = b"\xff\xd8\xff\xe0" + bytes(16)
    assert proto.decode_frame(proto.encode_snapshot(2**32 - 1, jpeg)) == (
        proto.SnapshotFrame(2**32 - 1, jpeg)
    )


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x01\x02\x00\x00", id="short-header"),
        pytest.param(b"\x02\x04\x00\x00\x00\x01\xff\xd8\xff", id="version-2"),
        pytest.param(b"\x01\x04\x00\x00\x00\x00\xff\xd8\xff", id="request-0"),
        pytest.param(b"\x01\x05\x00\x00\x00\x01data", id="unknown-kind"),
        pytest.param(b"\x01\x02\x00\x00\x00\x01" + bytes(10), id="short-fragment-meta"),
        pytest.param(b"\x01\x04\x00\x00\x00\x01", id="empty-snapshot"),
        pytest.param(b"\x01\x04\x00\x00\x00\x01GIF89a", id="not-jpeg"),
        pytest.param(b"\x01\x01\x00\x00\x00\x01" + bytes(8) + b"\x00\x00\x00\x10moov", id="init"),
        pytest.param(
            proto.encode_fragment(1, 1, 1, time.time(), False, _FRAGMENT)[:-16]
            + b"\x00\x00\x00\x10mdat"
            + bytes(8),
            id="fragment-not-moof",
        ),
        pytest.param(
            proto.encode_fragment(1, 1, 1, time.time(), False, _FRAGMENT).replace(
                struct.pack(">B", 0) + _FRAGMENT, struct.pack(">B", 0x80) + _FRAGMENT
            ),
            id="unknown-flag",
        ),
        pytest.param(
            proto.encode_chunk(1, 0, b"x")[:6] + struct.pack(">Q", 2**62) + b"x", id="offset"
        ),
        pytest.param(proto.encode_chunk(1, 0, b"x") + bytes(proto.CHUNK_BYTES), id="chunk-too-big"),
    ],
)
def test_malformed_binary_frames_are_rejected(frame: bytes) -> None:
    with pytest.raises(TunnelProtocolError):
        proto.decode_frame(frame)


@pytest.mark.parametrize("wall", [float("nan"), float("inf"), 0.0, 5e9])
def test_fragment_wall_times_must_be_real_clock_readings(wall: float) -> None:
    frame = proto._HEADER.pack(1, proto.FrameKind.FRAGMENT, 1) + proto._FRAGMENT_META.pack(
        1, 1, wall, 1
    )
    with pytest.raises(TunnelProtocolError):
        proto.decode_frame(frame + _FRAGMENT)


@pytest.mark.parametrize(
    "text",
    [
        '{"v":1,"type":"fetch","id":1,"seq":"1"}',  # no "1" for 1
        '{"v":1,"type":"fetch","id":1,"seq":true}',  # no true for 1
        '{"v":1,"type":"fetch","id":0,"seq":1}',  # ids start at 1
        '{"v":1,"type":"fetch","id":1,"seq":1,"camera":"cam-02"}',  # closed: the tunnel's camera
        '{"v":1,"type":"list","id":1,"start":1.7e9,"end":1.7e9,"limit":100000}',
        '{"v":1,"type":"list","id":1,"start":NaN,"end":1.7e9}',
        '{"type":"snapshot","id":1}',
        "[]",
    ],
)
def test_hub_messages_are_validated_strictly(text: str) -> None:
    with pytest.raises(TunnelProtocolError):
        proto.decode_hub_message(text)


def test_the_hello_signature_binds_site_camera_purpose_hub_token_and_nonce() -> None:
    key = Ed25519PrivateKey.generate()
    fields = {
        "site": SITE,
        "camera": "cam-01",
        "purpose": "live",
        "hub_url": "wss://hub-1.example.org/edge/tunnel",
        "token": secrets.token_urlsafe(32),
        "nonce": proto.new_nonce(),
    }
    hello = proto.make_hello(key=key, **fields)  # type: ignore[arg-type]
    decoded = proto.decode_edge_message(proto.encode_message(hello))
    assert decoded == hello and proto.verify_hello(key.public_key(), decoded)
    assert hello.token not in proto.canonical_json(hello.statement()).decode()
    other = {
        "site": OTHER_SITE,
        "camera": "cam-02",
        "purpose": "playback",
        "hub_url": "wss://hub-2.example.org/edge/tunnel",
        "token": secrets.token_urlsafe(32),
        "nonce": proto.new_nonce(),
    }
    for name, value in other.items():
        assert not proto.verify_hello(key.public_key(), hello.model_copy(update={name: value}))
    assert not proto.verify_hello(Ed25519PrivateKey.generate().public_key(), hello)


def test_docs_describe_every_message_reason_and_error_code() -> None:
    doc = (REPO / "docs" / "viewing.md").read_text()
    names = [
        *proto.REFUSAL_REASONS,
        *proto.ERROR_CODES,
        *(m.model_fields["type"].default for m in _union_members(proto.HubMessage)),
        *(m.model_fields["type"].default for m in _union_members(proto.EdgeMessage)),
        *(kind.name for kind in proto.FrameKind),
    ]
    missing = [n for n in names if f"`{n}`" not in doc]
    assert missing == [], f"docs/viewing.md does not describe {missing}"


def _union_members(annotated: Any) -> tuple[Any, ...]:
    return get_args(get_args(annotated)[0])
