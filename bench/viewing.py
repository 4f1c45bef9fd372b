"""The viewing web layer: live latency, many browser viewers, playback time-to-first-frame —
each against a baseline measured in the same run.

Run: .venv/bin/python bench/viewing.py [--cameras 8] [--viewers 20] [--seconds 30]
     [--kbps 2000] [--segment-seconds 60] [--no-browser] [--output results.md]

Processes (all on loopback):

* simulator (`simulator.rtsp.RtspService`, one pre-encoded 720p25 clip shared by every mount),
  in this process;
* **edge process**: real `CameraRecorder`s sealing segments into a real `SegmentStore`, a direct
  in-process consumer of each `LiveTap` (baseline 1), and `edge_agent.tunnel` serving the
  tunnels the hub asks for (its `open_tunnel` arrives by pipe instead of MQTT);
* **hub**: this process — `setup_auth` + `setup_viewing` (+ the `TunnelBroker`) on aiohttp, and
  one in-process `broker.live` consumer per camera (baseline 2: the tunnel alone, no HTTP);
* **viewer process**: V WebSocket clients of ``/view/{site}/{camera}/live/ws`` (the browser's
  path: auth, `require`, audit, relay), round-robin over the cameras;
* optionally headless Chromium: the real player (MSE) — latency from the frame's wall clock to
  the screen, and playback time-to-first-frame.

Live: latency = arrival − `wall` (receipt of the fragment's first packet at the edge; ≈ one
fragment duration is inherent to fMP4 and in every figure); the viewing layer's own delay is
(viewer arrival − hub-direct arrival) for the same fragment. Loss: seq gaps or fragments the
hub-direct consumer saw but a viewer of that camera did not.

Playback time-to-first-frame, per sealed segment (cache emptied before each): hub HTTP path
(playback WebSocket listing + segment GET, then decoding the first frame) vs the tunnel alone
(`broker.fetch_segment` + open in memory + decode) vs a direct read of the sealed file from the
edge's disk + open + decode.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

THIS = str(Path(__file__).resolve())
REPO = Path(THIS).parent.parent
sys.path.insert(0, str(REPO))

from bench._tunnel_rig import (  # noqa: E402
    SITE,
    EdgeProcess,
    add_load_args,
    cpu_seconds,
    ms,
    report,
    start_cameras,
    stop_cameras,
)


def _first_frame(data: bytes) -> None:
    import av

    with av.open(io.BytesIO(data)) as container:
        next(container.decode(video=0))


# --------------------------------------------------------------------------------------------
# The viewer process: WebSocket clients of the live page's socket


async def _viewer_worker(args: argparse.Namespace) -> None:
    import aiohttp

    cfg = json.loads(args.viewer_json)
    stop_at = time.time() + cfg["seconds"]

    async def one(index: int, camera: str) -> None:
        token = cfg["tokens"][index]
        async with (
            aiohttp.ClientSession(
                base_url=cfg["base"], headers={"Cookie": f"isocam_session={token}"}
            ) as session,
            session.ws_connect(f"/view/{SITE}/{camera}/live/ws", max_msg_size=0) as ws,
        ):
            while time.time() < stop_at:
                try:
                    msg = await ws.receive(timeout=max(0.1, stop_at - time.time()))
                except TimeoutError:
                    break
                if msg.type == aiohttp.WSMsgType.BINARY:
                    now = time.time()
                    kind, length = struct.unpack_from(">BI", msg.data)
                    if kind == 2:
                        meta = json.loads(msg.data[5 : 5 + length])
                        line = {"v": index, "c": camera, "s": meta["seq"], "w": meta["wall"],
                                "t": now}  # fmt: skip
                        sys.stdout.write(json.dumps(line) + "\n")
                elif msg.type != aiohttp.WSMsgType.TEXT:
                    sys.stdout.write(json.dumps({"v": index, "closed": ws.close_code}) + "\n")
                    break

    await asyncio.gather(*(one(i, cam) for i, cam in enumerate(cfg["cameras"])))
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# Chromium: the real player


def _browser_measure(base: str, email: str, password: str, code: str, camera: str,
                     playback: list[tuple[float, float]], seconds: float, work: Path,
                     drop_cache: Any) -> dict[str, Any]:  # fmt: skip
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-sync",
                "--autoplay-policy=no-user-gesture-required",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                f"--user-data-dir={work / 'chromium'}"):  # fmt: skip
        opts.add_argument(arg)
    d = webdriver.Chrome(
        service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"), options=opts
    )
    out: dict[str, Any] = {"latency": [], "ttff": []}
    try:
        d.get(f"{base}/login")
        d.find_element(By.ID, "email").send_keys(email)
        d.find_element(By.ID, "password").send_keys(password)
        d.find_element(By.ID, "login-submit").click()
        WebDriverWait(d, 20).until(lambda drv: "/login/totp" in drv.current_url)
        d.find_element(By.ID, "code").send_keys(code)
        d.find_element(By.ID, "totp-submit").click()
        WebDriverWait(d, 20).until(lambda drv: "/me/sites" in drv.current_url)
        d.get(f"{base}/view/{SITE}/{camera}/live")
        WebDriverWait(d, 60).until(lambda drv: drv.execute_script(
            "return document.querySelector('video').dataset.latency"))  # fmt: skip
        time.sleep(3)  # let the player settle at the live edge before sampling
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            value = d.execute_script("return document.querySelector('video').dataset.latency")
            out["latency"].append(float(value))
            time.sleep(0.25)
        for start, stop in playback:
            drop_cache()  # cold: the segment is pulled through the tunnel and opened again
            t0 = time.monotonic()
            d.get(f"{base}/view/{SITE}/{camera}/playback?start={start:.3f}&end={stop:.3f}")
            WebDriverWait(d, 60, poll_frequency=0.02).until(lambda drv: drv.execute_script(
                "const v = document.querySelector('video');"
                "return v.readyState >= 2 && v.currentTime > 0;"))  # fmt: skip
            out["ttff"].append(time.monotonic() - t0)
    finally:
        d.quit()
    return out


# --------------------------------------------------------------------------------------------
# The hub


async def _main(args: argparse.Namespace) -> str:
    import aiohttp
    import pyotp
    from aiohttp import web
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    import central_hub.export  # noqa: F401  (its table)
    from central_hub.accounts import AuthConfig
    from central_hub.db import Database
    from central_hub.policy import Scope
    from central_hub.sites import sites
    from central_hub.tunnel import TunnelBroker
    from central_hub.viewing import VIEWING, open_in_memory, setup_viewing
    from central_hub.web_auth import AUTH, setup_auth
    from devstack.ports import free_port
    from edge_agent.segment_store import SegmentStore
    from sitelink.sealed_segment import generate_private_key, write_public_key

    work = Path(tempfile.mkdtemp(prefix="bench-viewing-"))
    svc, cams = await start_cameras(args.cameras, args.kbps)
    viewing_key = generate_private_key()
    write_public_key(viewing_key.public_key(), work / "viewing.pub")
    edge = await EdgeProcess.start(
        work / "edge", cams, work / "viewing.pub", "--segment-seconds", str(args.segment_seconds)
    )
    device_key = await edge.device_key(180)
    measuring = {"on": False}  # hub_direct below; the edge's own flag follows it

    db = Database.connect(f"sqlite:///{work / 'hub.db'}")
    db.migrate()
    with db.engine.begin() as conn:
        conn.execute(sites.insert().values(site_id=SITE, name="Bench", province="Hà Nội",
                     district="Ba Đình", kind="facility", authority="health", operator="vnpt",
                     enrolled_at=time.time()))  # fmt: skip
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    broker = TunnelBroker(hub_url=f"ws://127.0.0.1:{port}/edge/tunnel",
                          send_command=edge.send_command,
                          device_key_for=lambda s: device_key if s == SITE else None)  # fmt: skip
    app = web.Application()
    setup_auth(app, db, AuthConfig(argon2_memory_kib=19456, argon2_time_cost=2,
                                   cookie_secure=False, secret=b"b" * 32))  # fmt: skip
    setup_viewing(app, db=db, broker=broker, viewing_key=viewing_key,
                  signing_key=Ed25519PrivateKey.generate())  # fmt: skip
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    store = app[AUTH].store
    password = "mật-khẩu-đo-hiệu-năng-2025"
    uid = store.create_user("bench@hanoi.gov.vn", "Bench", password, "viewer",
                            Scope.parse("province=Hà Nội"))  # fmt: skip
    secret, _ = store.totp_begin_enrolment(uid)
    totp = pyotp.TOTP(secret)
    assert store.totp_confirm_enrolment(uid, totp.now(), "bench")
    token = store.create_session(uid, "full", "127.0.0.1", "bench")
    service = app[VIEWING]

    # -- live: V viewers through the web layer, one hub-direct consumer per camera ----------
    hub_direct: dict[tuple[str, float], float] = {}

    async def consume(camera: str, stop: asyncio.Event) -> None:
        async with broker.live(SITE, camera, user="bench-direct") as stream:
            async for fragment in stream:
                if measuring["on"]:
                    hub_direct[(camera, fragment.wall)] = fragment.received
                if stop.is_set():
                    return

    stop = asyncio.Event()
    consumers = [asyncio.create_task(consume(c.id, stop)) for c in cams]
    await asyncio.sleep(3)
    viewer_cams = [cams[i % len(cams)].id for i in range(args.viewers)]
    # One official per viewer (a user may hold at most `live_per_user` live sessions).
    tokens = []
    for i in range(args.viewers):
        vid = store.create_user(f"xem{i}@hanoi.gov.vn", f"Viewer {i}", password, "viewer",
                                Scope.parse("province=Hà Nội"))  # fmt: skip
        tokens.append(store.create_session(vid, "full", "127.0.0.1", "bench"))
    viewer_cfg = json.dumps({"base": base, "tokens": tokens, "cameras": viewer_cams,
                             "seconds": args.seconds + args.warmup})  # fmt: skip
    viewers = await asyncio.create_subprocess_exec(
        sys.executable, THIS, "--viewer-worker", "--viewer-json", viewer_cfg,
        stdout=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    assert viewers.stdout is not None
    await asyncio.sleep(args.warmup)
    measuring["on"] = edge.measuring = True
    window = (time.time(), time.time() + args.seconds)
    h0, e0, t0 = cpu_seconds(os.getpid()), cpu_seconds(edge.pid), time.monotonic()
    viewer_lines = (await viewers.stdout.read()).decode().splitlines()
    await viewers.wait()
    elapsed = time.monotonic() - t0
    hub_cpu = (cpu_seconds(os.getpid()) - h0) / elapsed * 100
    edge_cpu = (cpu_seconds(edge.pid) - e0) / elapsed * 100
    measuring["on"] = edge.measuring = False
    stats_live = broker.stats()
    stop.set()
    for task in consumers:
        task.cancel()
    await asyncio.gather(*consumers, return_exceptions=True)

    arrivals = [json.loads(x) for x in viewer_lines]
    closed = [a for a in arrivals if "closed" in a]
    frags = [a for a in arrivals if "s" in a and window[0] <= a["t"] <= window[1]]
    viewer_lat = [a["t"] - a["w"] for a in frags]
    hub_lat = [t - w for (c, w), t in hub_direct.items() if window[0] <= t <= window[1]]
    edge_lat = [m["t"] - m["w"] for m in edge.direct if window[0] <= m["t"] <= window[1]]
    layer = [a["t"] - hub_direct[(a["c"], a["w"])] for a in frags if (a["c"], a["w"]) in hub_direct]
    per_viewer: dict[int, list[int]] = {}
    for a in arrivals:
        if "s" in a:
            per_viewer.setdefault(a["v"], []).append(a["s"])
    gaps = sum(sum(1 for x, y in itertools.pairwise(s) if y != x + 1) for s in per_viewer.values())
    seen = {(a["v"], a["w"]) for a in arrivals if "s" in a}
    missing = 0
    for v, cam in enumerate(viewer_cams):
        walls = [a["w"] for a in arrivals if a.get("v") == v and "s" in a]
        if not walls:
            missing += 1
            continue
        lo, hi = min(walls), max(walls)
        missing += sum(
            1 for (c, w) in hub_direct if c == cam and lo <= w <= hi and (v, w) not in seen
        )

    # -- browser (optional): the real player ------------------------------------------------
    browser: dict[str, Any] = {"latency": [], "ttff": []}

    # -- playback: wait for sealed segments --------------------------------------------------
    edge_store_path = work / "edge"
    segs: list[Any] = []
    deadline = time.monotonic() + args.segment_seconds * 2 + 60
    while time.monotonic() < deadline:
        reader = SegmentStore(edge_store_path, Ed25519PrivateKey.generate(), SITE)
        try:
            segs = [s for c in cams for s in reader.segments(c.id) if s.finished]
        finally:
            reader.close()
        if len(segs) >= min(args.cameras, 8):
            break
        await asyncio.sleep(2)
    for cam in cams:  # open the playback tunnels first: every path below then finds them open
        await broker.list_segments(SITE, cam.id, time.time() - 600, time.time())
    ttff_hub: list[float] = []
    ttff_tunnel: list[float] = []
    ttff_file: list[float] = []
    cookie = {"Cookie": f"isocam_session={token}"}
    async with aiohttp.ClientSession(base_url=base, headers=cookie) as client:
        for seg in segs[:16]:
            service.cache.drop()
            t0 = time.monotonic()
            query = f"?start={seg.start - 1:.3f}&end={seg.end:.3f}"
            ws = await client.ws_connect(f"/view/{SITE}/{seg.camera_id}/playback/ws{query}")
            listing = json.loads((await ws.receive(timeout=60)).data)
            resp = await client.get(f"{listing['base']}{seg.seq}.mp4")
            data = await resp.read()
            await asyncio.to_thread(_first_frame, data)
            ttff_hub.append(time.monotonic() - t0)
            await ws.close()
            t0 = time.monotonic()
            sealed = await broker.fetch_segment(SITE, seg.camera_id, seg.seq)
            plain = await asyncio.to_thread(open_in_memory, sealed, viewing_key, site=SITE,
                                            camera=seg.camera_id, seq=seg.seq)  # fmt: skip
            await asyncio.to_thread(_first_frame, plain.whole)
            ttff_tunnel.append(time.monotonic() - t0)
            t0 = time.monotonic()
            sealed = await asyncio.to_thread(seg.path.read_bytes)
            plain = await asyncio.to_thread(open_in_memory, sealed, viewing_key, site=SITE,
                                            camera=seg.camera_id, seq=seg.seq)  # fmt: skip
            await asyncio.to_thread(_first_frame, plain.whole)
            ttff_file.append(time.monotonic() - t0)
        if args.browser and segs:
            cam0 = cams[0].id
            ranges = [(s.start - 1, s.end) for s in segs if s.camera_id == cam0][:3]
            ranges += [(s.start - 1, s.end) for s in segs[:6] if s.camera_id != cam0][
                : 5 - len(ranges)
            ]
            loop = asyncio.get_running_loop()

            async def drop() -> None:
                service.cache.drop()

            def drop_cache() -> None:
                asyncio.run_coroutine_threadsafe(drop(), loop).result(10)

            browser = await asyncio.to_thread(
                _browser_measure, base, "bench@hanoi.gov.vn", password, totp.at(time.time() + 30),
                cam0, ranges, min(args.seconds, 20.0), work, drop_cache,
            )  # fmt: skip

    await edge.stop()
    await broker.close()
    await runner.cleanup()
    await stop_cameras(svc, cams)
    db.close()
    shutil.rmtree(work, ignore_errors=True)

    seg_mb = statistics.median([s.bytes for s in segs[:16]]) / 1e6 if segs else 0.0
    lines = [
        f"Command: `.venv/bin/python bench/viewing.py --cameras {args.cameras} --viewers "
        f"{args.viewers} --seconds {args.seconds:g} --kbps {args.kbps} --segment-seconds "
        f"{args.segment_seconds:g}{'' if args.browser else ' --no-browser'}`",
        "",
        f"{args.cameras} cameras 720p25 H.264 {args.kbps} kbit/s (simulator), 1 s fragments, "
        f"{args.segment_seconds:g} s segments; {args.viewers} WebSocket viewers of the live page's "
        f"socket round-robin over the cameras (own process); tunnel ws:// on loopback; "
        f"{args.seconds:g} s measured.",
        "",
        "| live latency (ms) | median | p95 | max | samples |",
        "|---|---|---|---|---|",
        f"| baseline 1: wall → direct consumer of the LiveTap at the edge | {ms(edge_lat)} |",
        f"| baseline 2: wall → `broker.live` in the hub (tunnel alone, no HTTP) | {ms(hub_lat)} |",
        f"| wall → viewer through the web layer (auth, relay over WebSocket) | {ms(viewer_lat)} |",
        f"| the web layer's own delay (viewer − baseline 2, same fragment) | {ms(layer)} |",
        f"| **camera → screen in Chromium** (wall of the frame shown → now, MSE) | "
        f"{ms(browser['latency'])} |",
        "",
        "| live throughput and loss | value |",
        "|---|---|",
        f"| tunnels / upstreams for {args.viewers} viewers + {args.cameras} direct consumers | "
        f"{stats_live.get('tunnels', 0)} / {args.cameras} |",
        f"| fragments delivered to viewers in the window | {len(frags)} "
        f"({len(frags) / max(elapsed, 1e-9):.1f}/s) |",
        f"| lost: seq gaps / missing vs hub-direct / viewers closed early | {gaps} / {missing} / "
        f"{len(closed)} |",
        f"| hub CPU (web layer + broker + {args.cameras} direct consumers + simulator), % of one "
        f"core | {hub_cpu:.1f} |",
        f"| edge CPU (recorders + tunnels), % of one core | {edge_cpu:.1f} |",
        "",
        f"| playback time-to-first-frame (ms), one sealed segment (median {seg_mb:.1f} MB), "
        "cache cold | median | p95 | max | samples |",
        "|---|---|---|---|---|",
        f"| baseline: read the sealed file at the edge + open in memory + decode | "
        f"{ms(ttff_file)} |",
        f"| tunnel alone: `broker.fetch_segment` + open in memory + decode | {ms(ttff_tunnel)} |",
        f"| web layer: playback socket (auth, listing) + segment GET + decode | {ms(ttff_hub)} |",
        f"| **Chromium**: page load → first frame shown (logged in; cache cold) | "
        f"{ms(browser['ttff'])} |",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_load_args(p, seconds_help="measured live time")
    p.add_argument("--segment-seconds", type=float, default=60.0)
    p.add_argument("--no-browser", dest="browser", action="store_false",
                   help="skip the Chromium measurements")  # fmt: skip
    p.add_argument("--output", help="also write the markdown to this file")
    p.add_argument("--viewer-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--viewer-json", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.viewer_worker:
        asyncio.run(_viewer_worker(args))
        return
    report(asyncio.run(_main(args)), args.output)


if __name__ == "__main__":
    main()
