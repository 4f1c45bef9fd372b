"""The viewing web layer over real HTTP and WebSockets on loopback, with real parts behind it:
simulator cameras (RTSP) → real recorders sealing segments into a real `SegmentStore` → the
edge's real `serve_tunnel` dialing the real `TunnelBroker` → `setup_viewing` routes on an
aiohttp server, behind the real `setup_auth` (sessions, CSRF, `require`, audit).

The broker's `send_command` hands `open_tunnel` straight to an in-process `serve_tunnel` task:
the edge's real code path minus the MQTT hop. `Rig` is reused by the export and browser tests.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import av
import cv2
import numpy as np
import pyotp
import pytest
import sqlalchemy as sa
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import central_hub.export  # noqa: F401  (registers the export table's migration)
from central_hub.accounts import AccountStore, AuthConfig, cli_actor
from central_hub.audit import AuditLog, audit_log
from central_hub.db import Database
from central_hub.policy import Scope
from central_hub.sites import sites
from central_hub.tunnel import TunnelBroker
from central_hub.viewing import (
    KIND_FRAGMENT,
    KIND_INIT,
    VIEWING,
    ViewingLimits,
    ViewingService,
    codec_string,
    setup_viewing,
)
from central_hub.web_auth import AUTH, setup_auth
from devstack.ports import free_port
from devstack.waiting import until as poll
from edge_agent.recorder import CameraRecorder, RecorderConfig
from edge_agent.segment_store import SegmentStore
from edge_agent.tunnel import serve_tunnel
from sitelink.messages import OpenTunnel
from sitelink.sealed_segment import RecipientPrivateKey, generate_private_key, unseal_to
from sitelink.signing import load_public_key_pem, public_key_pem
from tests.test_tunnel import EdgeBox  # the same box: real store, recorders, device key

SITE = "hn-yte-1"  # Hà Nội: the site whose box records the simulator's cameras
OTHER = "cb-yte-1"  # Cao Bằng
PASSWORD = "mật-khẩu-xem-camera-2025"
CONFIG = AuthConfig(argon2_memory_kib=19456, argon2_time_cost=2, cookie_secure=False,
                    secret=b"v" * 32)  # fmt: skip
CSRF_RE = re.compile(r'name="csrf_token" value="([0-9a-f]{64})"')


# --------------------------------------------------------------------------------------------
# The rig: edge box + hub, all real


@dataclass
class Rig:
    """A hub (auth + viewing + broker) on a loopback port and one edge box behind it."""

    db: Database
    app: web.Application
    base: str
    broker: TunnelBroker
    box: EdgeBox
    viewing_key: RecipientPrivateKey
    signing_key: Ed25519PrivateKey
    runner: web.AppRunner
    edge_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    record_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    commands: list[tuple[str, OpenTunnel]] = field(default_factory=list)

    @property
    def store(self) -> AccountStore:
        return self.app[AUTH].store

    @property
    def audit(self) -> AuditLog:
        return self.app[AUTH].audit

    @property
    def viewing(self) -> ViewingService:
        return self.app[VIEWING]

    async def send_command(self, site: str, command: OpenTunnel) -> None:
        """Stand-in for the MQTT hop: the site's box runs the command in-process."""
        self.commands.append((site, command))
        if site == self.box.site_id:
            self.edge_tasks.append(
                asyncio.create_task(serve_tunnel(command.args, self.box, idle_seconds=30.0))
            )

    async def record(self, cameras: list[dict[str, Any]], config: RecorderConfig) -> None:
        """Start real recorders; return once each delivered a live fragment."""
        for cam in cameras:
            rec = CameraRecorder(cam["id"], cam["rtsp_main"], self.box.segment_store,
                                 [self.viewing_key.public_key()], config, user=cam["user"],
                                 password=cam["password"])  # fmt: skip
            self.box.recorders[cam["id"]] = rec
            self.record_tasks.append(asyncio.create_task(rec.run()))
        async with asyncio.timeout(40):
            for rec in self.box.recorders.values():
                await rec.tap.wait(0)

    def user(self, email: str, role: str, scope: str) -> tuple[int, pyotp.TOTP]:
        """An account with one grant and TOTP enrolled (footage roles need it)."""
        uid = self.store.create_user(email, "Cán bộ " + email.split("@")[0], PASSWORD, role,
                                     Scope.parse(scope))  # fmt: skip
        secret, _ = self.store.totp_begin_enrolment(uid)
        totp = pyotp.TOTP(secret)
        assert self.store.totp_confirm_enrolment(uid, totp.now(), "test")
        return uid, totp

    def client(self, user_id: int) -> Client:
        """An HTTP client holding a fresh full session of the user (the login pages are
        tested in test_central_hub_web_auth; the browser test logs in through them)."""
        token = self.store.create_session(user_id, "full", "127.0.0.1", "test")
        return Client(self, token)

    def rows(self, *actions: str) -> list[dict[str, Any]]:
        with self.db.engine.connect() as conn:
            query = sa.select(audit_log).order_by(audit_log.c.seq)
            if actions:
                query = query.where(audit_log.c.action.in_(actions))
            return [dict(r._mapping) for r in conn.execute(query)]

    async def stop(self) -> None:
        await asyncio.gather(*(rec.stop() for rec in self.box.recorders.values()))
        await asyncio.gather(*self.record_tasks, return_exceptions=True)
        await self.broker.close()
        for task in self.edge_tasks:
            task.cancel()
        await asyncio.gather(*self.edge_tasks, return_exceptions=True)
        await self.runner.cleanup()
        self.box.segment_store.close()
        self.db.close()


class Client:
    """aiohttp client session carrying one hub session cookie."""

    def __init__(self, rig: Rig, token: str) -> None:
        self.rig = rig
        self.token = token
        self.session = aiohttp.ClientSession(
            base_url=rig.base, headers={"Cookie": f"isocam_session={token}"}
        )

    async def get(self, path: str, **kw: Any) -> aiohttp.ClientResponse:
        return await self.session.get(path, allow_redirects=False, **kw)

    async def csrf(self) -> str:
        page = await self.get("/me/sites")
        m = CSRF_RE.search(await page.text())
        assert m, "no CSRF token on /me/sites"
        return m.group(1)

    async def post(self, path: str, data: dict[str, str]) -> aiohttp.ClientResponse:
        token = await self.csrf()
        return await self.session.post(path, data={**data, "csrf_token": token},
                                       allow_redirects=False)  # fmt: skip

    async def ws(self, path: str) -> aiohttp.ClientWebSocketResponse:
        return await self.session.ws_connect(path, max_msg_size=0)

    async def close(self) -> None:
        await self.session.close()


def add_sites(db: Database, device_key: Ed25519PrivateKey) -> None:
    with db.engine.begin() as conn:
        for sid, province, district in ((SITE, "Hà Nội", "Ba Đình"), (OTHER, "Cao Bằng", "Hòa An")):
            conn.execute(sites.insert().values(
                site_id=sid, name=f"Điểm {sid}", province=province, district=district,
                kind="facility", authority="health", operator="viettel", enrolled_at=time.time(),
                device_public_key=public_key_pem(device_key) if sid == SITE else None))  # fmt: skip


async def start_rig(tmp_path: Path, limits: ViewingLimits | None = None, **broker_kw: Any) -> Rig:
    """Everything on the running loop: the hub on a free loopback port, site A's box."""
    db = Database.connect(f"sqlite:///{tmp_path / 'hub.db'}")
    db.migrate()
    device_key = Ed25519PrivateKey.generate()
    add_sites(db, device_key)

    def device_key_for(site_id: str) -> Any:  # the sites table, as the hub's app does
        with db.engine.connect() as conn:
            query = sa.select(sites.c.device_public_key).where(
                sites.c.site_id == site_id, sites.c.enabled
            )
            pem = conn.execute(query).scalar()
        return load_public_key_pem(pem) if pem else None

    port = free_port()
    holder: list[Rig] = []

    async def send(site: str, command: OpenTunnel) -> None:
        await holder[0].send_command(site, command)

    broker = TunnelBroker(hub_url=f"ws://127.0.0.1:{port}/edge/tunnel", send_command=send,
                          device_key_for=device_key_for, **broker_kw)  # fmt: skip
    app = web.Application()
    setup_auth(app, db, CONFIG)
    viewing_key = generate_private_key()
    signing_key = Ed25519PrivateKey.generate()
    setup_viewing(app, db=db, broker=broker, viewing_key=viewing_key, signing_key=signing_key,
                  limits=limits, cameras_of=lambda site: ["cam-01"])  # fmt: skip
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    store = SegmentStore(tmp_path / "edge-data", Ed25519PrivateKey.generate(), SITE)
    box = EdgeBox(SITE, device_key, store)
    rig = Rig(db, app, f"http://127.0.0.1:{port}", broker, box, viewing_key, signing_key, runner)
    holder.append(rig)
    return rig


def parse_record(data: bytes) -> tuple[int, dict[str, Any], bytes]:
    kind, length = struct.unpack_from(">BI", data)
    return kind, json.loads(data[5 : 5 + length]), data[5 + length :]


def count_frames(data: bytes) -> int:
    with av.open(io.BytesIO(data)) as container:
        return sum(1 for _ in container.decode(video=0))


FAST_SEGMENTS = RecorderConfig(segment_seconds=4.0, backoff_initial_seconds=0.5,
                               backoff_max_seconds=1.0)  # fmt: skip


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = await start_rig(tmp_path, ViewingLimits(snapshot_user_burst=3, snapshot_user_rate=0.01))
    yield r
    await r.stop()


@pytest.fixture
async def cam(simulator_factory: Callable[..., Any], rig: Rig) -> str:
    """Id of a simulator camera the rig's box records (4 s segments)."""
    sim = simulator_factory(cameras=1)
    await rig.record(sim.cameras, FAST_SEGMENTS)
    return str(sim.cameras[0]["id"])


async def _read_live(
    ws: aiohttp.ClientWebSocketResponse, fragments: int
) -> tuple[bytes, list[dict[str, Any]], bytes]:
    """(first init, fragment metas, init + fragment bytes) for `fragments` fragments."""
    init = b""
    metas: list[dict[str, Any]] = []
    media = b""
    while len(metas) < fragments:
        msg = await ws.receive(timeout=30)
        if msg.type == aiohttp.WSMsgType.TEXT:
            continue
        assert msg.type == aiohttp.WSMsgType.BINARY, msg
        kind, meta, payload = parse_record(msg.data)
        if kind == KIND_INIT:
            assert meta["codec"].startswith("avc1.")
            if not init:
                init = payload
                media = payload
        else:
            assert kind == KIND_FRAGMENT
            metas.append(meta)
            media += payload
    return init, metas, media


# --------------------------------------------------------------------------------------------
# Live


async def test_live_relays_fmp4_to_several_viewers_over_one_upstream_and_audits_start_stop(
    cam: str, rig: Rig
) -> None:
    viewer, _ = rig.user("xem@hanoi.gov.vn", "viewer", "province=Hà Nội")
    a, b = rig.client(viewer), rig.client(viewer)
    try:
        page = await a.get(f"/view/{SITE}/{cam}/live")
        assert page.status == 200 and 'class="card live-player"' in await page.text()
        async with asyncio.timeout(60):
            ws_a = await a.ws(f"/view/{SITE}/{cam}/live/ws")
            ws_b = await b.ws(f"/view/{SITE}/{cam}/live/ws")
            init, metas, media = await _read_live(ws_a, 3)
            await _read_live(ws_b, 2)
            assert rig.broker.stats()["upstreams"] == 1 and len(rig.commands) == 1
            assert metas[0]["keyframe"] and [m["seq"] for m in metas] == list(
                range(metas[0]["seq"], metas[0]["seq"] + 3)
            )
            assert all(time.time() - m["wall"] < 10 for m in metas)
            assert count_frames(media) >= 25 * 2, "real video that decodes"
            assert codec_string(init).startswith("avc1.")
            await ws_a.close()
            await ws_b.close()
            await poll(lambda: len(rig.rows("live_stop")) == 2, 10, "two stop rows")
    finally:
        await a.close()
        await b.close()
    rows = rig.rows("view_live", "live_start", "live_stop")
    assert [r["action"] for r in rows].count("view_live") == 2
    starts = [r for r in rows if r["action"] == "live_start"]
    stops = [r for r in rows if r["action"] == "live_stop"]
    assert len(starts) == 2 and len(stops) == 2
    for r in rows:
        assert (r["user_id"], r["site_id"], r["camera_id"]) == (viewer, SITE, cam)
    assert {json.loads(r["detail"])["viewing"] for r in starts} == {
        json.loads(r["detail"])["viewing"] for r in stops
    }
    assert all(r["reason"] == "viewer_closed" for r in stops)
    assert max(json.loads(r["detail"])["fragments"] for r in stops) >= 3
    assert rig.audit.verify().ok


async def test_a_viewer_of_another_province_is_refused_everywhere_and_audited(rig: Rig) -> None:
    """No edge needed: nothing may reach the tunnel."""
    viewer, _ = rig.user("xem@caobang.gov.vn", "viewer", "province=Cao Bằng")
    noc, _ = rig.user("noc@hanoi.gov.vn", "noc", "province=Hà Nội")
    c, n = rig.client(viewer), rig.client(noc)
    now = time.time()
    try:
        paths = [f"/view/{SITE}/cam-01/live", f"/view/{SITE}/cam-01/live/ws",
                 f"/view/{SITE}/cam-01/playback?start={now - 600}&end={now}",
                 f"/view/{SITE}/cam-01/playback/ws?start={now - 600}&end={now}",
                 f"/view/{SITE}/cam-01/snapshot.jpg", f"/view/{SITE}"]  # fmt: skip
        for client in (c, n):
            for path in paths:
                resp = await client.get(path)
                assert resp.status == 403, path
        # Unknown ids are 404, malformed ones never reach the database.
        assert (await c.get("/view/no-such-site/cam-01/live")).status == 404
        assert (await c.get(f"/view/{SITE}/..%2Fetc/live")).status == 404
        # Someone else's playback id, or a made-up one: nothing.
        assert (await c.get("/view/playback/" + "A" * 22 + "/1.mp4")).status == 404
        # Not logged in: the page redirects to the login form, the socket is refused.
        async with aiohttp.ClientSession(base_url=rig.base) as anon:
            resp = await anon.get(f"/view/{SITE}/cam-01/live", allow_redirects=False)
            assert resp.status == 303 and resp.headers["Location"].startswith("/login")
            resp = await anon.get(f"/view/{SITE}/cam-01/live/ws", allow_redirects=False)
            assert resp.status == 303
    finally:
        await c.close()
        await n.close()
    assert rig.commands == [], "a refused request never opens a tunnel"
    denied = [r for r in rig.rows() if r["allowed"] is False]
    mine = [r for r in denied if r["user_id"] == viewer]
    assert len(mine) == len(paths)
    assert all(r["site_id"] == SITE and r["reason"] == "out_of_scope" for r in mine)
    assert {r["action"] for r in mine} == {"view_live", "view_playback", "view_snapshot"}
    pb = [r for r in mine if r["action"] == "view_playback" and r["range_start_us"]]
    assert pb and pb[0]["camera_id"] == "cam-01"
    noc_rows = [r for r in denied if r["user_id"] == noc]
    assert len(noc_rows) == len(paths) and {r["reason"] for r in noc_rows} == {"role_lacks_action"}


# --------------------------------------------------------------------------------------------
# Playback


async def test_playback_lists_segments_and_gaps_and_serves_them_unsealed_in_memory(
    simulator_factory: Callable[..., Any], rig: Rig, tmp_path: Path
) -> None:
    sim = simulator_factory(cameras=1)
    t0 = time.time()
    cam = sim.cameras[0]["id"]
    store = rig.box.segment_store
    gap = store.open_gap(cam, t0 - 100.0, "refused")
    store.close_gap(gap, t0 - 40.0)
    await rig.record(sim.cameras, FAST_SEGMENTS)
    await poll(lambda: len(store.segments(cam)) >= 2, 40, "two sealed segments")
    viewer, _ = rig.user("xem@hanoi.gov.vn", "viewer", "province=Hà Nội,district=Ba Đình")
    c = rig.client(viewer)
    start, end = t0 - 120.0, time.time()
    try:
        async with asyncio.timeout(60):
            page = await c.get(f"/view/{SITE}/{cam}/playback?start={start}&end={end}")
            assert page.status == 200
            ws = await c.ws(f"/view/{SITE}/{cam}/playback/ws?start={start}&end={end}")
            listing = json.loads((await ws.receive(timeout=30)).data)
            assert listing["type"] == "listing"
            indexed = store.segments(cam, start, None)
            seqs = [s["seq"] for s in listing["segments"]]
            assert seqs[: len(indexed)] == [s.seq for s in indexed] and len(seqs) >= 2
            assert [(g["start"], g["end"], g["cause"]) for g in listing["gaps"]] == [
                (t0 - 100.0, t0 - 40.0, "refused")
            ]
            base = listing["base"]
            first = indexed[0]
            resp = await c.get(f"{base}{first.seq}.mp4")
            assert resp.status == 200 and resp.headers["Content-Type"] == "video/mp4"
            assert resp.headers["X-Isocam-Codec"].startswith("avc1.")
            whole = await resp.read()
            expected = io.BytesIO()
            unseal_to(first.path, rig.viewing_key, expected)
            assert whole == expected.getvalue(), "the plaintext of the sealed file, exactly"
            assert count_frames(whole) >= 25 * 3
            # HLS: a VOD playlist with an init section and media per segment.
            playlist = await (await c.get(f"{base}index.m3u8")).text()
            assert playlist.startswith("#EXTM3U") and "#EXT-X-ENDLIST" in playlist
            assert f'#EXT-X-MAP:URI="{first.seq}/init.mp4"' in playlist
            init = await (await c.get(f"{base}{first.seq}/init.mp4")).read()
            media = await (await c.get(f"{base}{first.seq}/media.m4s")).read()
            assert init + media == whole
            # A seq outside the listing is not served; another user's session cannot use it.
            assert (await c.get(f"{base}999999.mp4")).status == 404
            other, _ = rig.user("xem2@hanoi.gov.vn", "viewer", "province=Hà Nội")
            stranger = rig.client(other)
            assert (await stranger.get(f"{base}{first.seq}.mp4")).status == 404
            await stranger.close()
            await ws.close()
            await poll(lambda: rig.rows("playback_stop"), 10, "the stop row")
            # The session is over: its URLs are dead.
            assert (await c.get(f"{base}{first.seq}.mp4")).status == 404
    finally:
        await c.close()
    assert rig.viewing.cache.misses == 1 and rig.viewing.cache.hits == 2
    rows = rig.rows("view_playback", "playback_start", "playback_stop")
    assert [r["action"] for r in rows] == ["view_playback", "playback_start", "playback_stop"]
    for r in rows:
        assert r["camera_id"] == cam and r["site_id"] == SITE
        assert (r["range_start_us"], r["range_end_us"]) == (round(start * 1e6), round(end * 1e6))
    assert json.loads(rows[2]["detail"])["segments_served"] == 3

    # Plaintext only in memory: the hub's directory holds its database and nothing that
    # looks like video (the edge's directory holds sealed segments only).
    def heads() -> list[tuple[Path, bytes]]:
        files = [p for p in tmp_path.rglob("*") if p.is_file() and "edge-data" not in p.parts]
        return [(p, p.read_bytes()[:64]) for p in files]

    for p, head in await asyncio.to_thread(heads):
        assert b"ftyp" not in head, p


# --------------------------------------------------------------------------------------------
# Revocation and snapshots


async def test_revocation_ends_live_and_playback_at_once_and_closes_the_browser_stream(
    cam: str, rig: Rig
) -> None:
    viewer, _ = rig.user("xem@hanoi.gov.vn", "viewer", "province=Hà Nội")
    other, _ = rig.user("xem2@hanoi.gov.vn", "viewer", "province=Hà Nội")
    logged_out, kept, regranted = rig.client(viewer), rig.client(other), rig.client(other)
    now = time.time()
    try:
        async with asyncio.timeout(60):
            live = await logged_out.ws(f"/view/{SITE}/{cam}/live/ws")
            playback = await logged_out.ws(
                f"/view/{SITE}/{cam}/playback/ws?start={now - 60}&end={now}"
            )
            other_live = await kept.ws(f"/view/{SITE}/{cam}/live/ws")
            await _read_live(live, 1)
            await _read_live(other_live, 1)
            assert json.loads((await playback.receive(timeout=30)).data)["type"] == "listing"
            # Logout (the session is revoked): both of its sockets close with 4403 at once.
            await asyncio.to_thread(rig.store.end_session, logged_out.token, "logout")
            for ws in (live, playback):
                while (await ws.receive(timeout=10)).type not in (
                    aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):  # fmt: skip
                    pass
                assert ws.close_code == 4403
            # The other user goes on; then its grant is revoked: the re-check ends it too.
            await _read_live(other_live, 1)
            grant = rig.store.load_principal(other).grants[0]  # type: ignore[union-attr]
            assert grant.grant_id is not None
            await asyncio.to_thread(rig.store.revoke_grant, grant.grant_id, cli_actor())
            while (await other_live.receive(timeout=10)).type not in (
                aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):  # fmt: skip
                pass
            assert other_live.close_code == 4403
            # Without a grant, a new attempt is refused (and audited).
            assert (await regranted.get(f"/view/{SITE}/{cam}/live/ws")).status == 403
            await poll(lambda: len(rig.rows("live_stop", "playback_stop")) == 3, 10, "stop rows")
    finally:
        for client in (logged_out, kept, regranted):
            await client.close()
    stops = {
        (r["user_id"], r["action"]): r["reason"] for r in rig.rows("live_stop", "playback_stop")
    }
    assert stops == {
        (viewer, "live_stop"): "session_ended",
        (viewer, "playback_stop"): "session_ended",
        (other, "live_stop"): "access_changed",
    }
    assert rig.viewing.sessions == {}


async def test_snapshots_are_authorized_audited_and_rate_limited(cam: str, rig: Rig) -> None:
    viewer, _ = rig.user("xem@hanoi.gov.vn", "viewer", "province=Hà Nội")
    c = rig.client(viewer)
    try:
        await poll(lambda: any(f.keyframe for f in rig.box.recorders[cam].tap.latest()), 20,
                   "a keyframe")  # fmt: skip
        async with asyncio.timeout(60):
            for _ in range(3):  # the test rig allows a burst of 3 per user
                resp = await c.get(f"/view/{SITE}/{cam}/snapshot.jpg")
                assert resp.status == 200 and resp.headers["Content-Type"] == "image/jpeg"
                picture = cv2.imdecode(np.frombuffer(await resp.read(), np.uint8), cv2.IMREAD_COLOR)
                assert picture.shape == (720, 1280, 3)
            limited = await c.get(f"/view/{SITE}/{cam}/snapshot.jpg")
            assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1
            site_page = await c.get(f"/view/{SITE}")
            assert site_page.status == 200 and 'data-camera="cam-01"' in await site_page.text()
    finally:
        await c.close()
    rows = rig.rows("view_snapshot")
    assert len(rows) == 3 and all(r["allowed"] and r["camera_id"] == cam for r in rows)
