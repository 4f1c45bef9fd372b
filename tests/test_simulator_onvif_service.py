"""The simulator's ONVIF/snapshot HTTP side, driven by the real `onvif-zeep-async` client."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import aiohttp
import cv2
import numpy as np
import pytest
import requests
import zeep.exceptions
from multidict import CIMultiDictProxy
from onvif import ONVIFCamera
from onvif.util import is_auth_error
from requests.auth import HTTPDigestAuth

from simulator.camera import StreamProfile, VirtualCamera
from simulator.onvif_service import OnvifServer

# importing onvif calls logging.basicConfig(INFO) on the root logger (FIELD-NOTES)
logging.getLogger().setLevel(logging.WARNING)

PASSWORD = "Cam3ra!pw"


def _jpeg(cam: VirtualCamera) -> bytes:
    """A real JPEG (a gradient) so clients can decode what they fetch."""
    image = np.tile(np.arange(0, 256, 2, dtype=np.uint8), (72, 1))
    ok, data = cv2.imencode(".jpg", cv2.merge([image, image, image]))
    assert ok
    return bytes(data)


@pytest.fixture
def camera() -> VirtualCamera:
    return VirtualCamera(
        index=1,
        id="cam-01",
        name="Cổng chính",
        host="127.0.0.1",
        onvif_port=0,
        rtsp_port=18554,
        user="admin",
        password=PASSWORD,
        profiles=(
            StreamProfile("main", 1920, 1080, 4096, codec="H265"),
            StreamProfile("sub", 640, 360, 512),
        ),
    )


@pytest.fixture
async def server(camera: VirtualCamera) -> AsyncIterator[OnvifServer]:
    srv = OnvifServer(camera, _jpeg)
    await srv.start("127.0.0.1", 0)
    yield srv
    await srv.stop()


@asynccontextmanager
async def _client(
    cam: VirtualCamera, password: str = PASSWORD, adjust_time: bool = True
) -> AsyncIterator[ONVIFCamera]:
    client = ONVIFCamera(
        cam.host, cam.onvif_port, cam.user, password, adjust_time=adjust_time, no_cache=True
    )
    try:
        yield client
    finally:
        await client.close()


def _subcodes(fault: zeep.exceptions.Fault) -> list[str]:
    return [q.localname for q in fault.subcodes or []]


def _wsse_envelope(
    operation: str,
    user: str,
    password: str,
    created: str,
    nonce: bytes,
    digest: bool = True,
) -> bytes:
    """A hand-made SOAP 1.2 request, with unusual prefixes, signed as the caller wishes."""
    if digest:
        value = base64.b64encode(
            hashlib.sha1(nonce + created.encode() + password.encode()).digest()
        ).decode()
        kind = "PasswordDigest"
    else:
        value, kind = password, "PasswordText"
    profile = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0"
    return f"""<?xml version="1.0" encoding="utf-8"?>
<S:Envelope xmlns:S="http://www.w3.org/2003/05/soap-envelope"
  xmlns:sec="http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
  xmlns:u="http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
  xmlns:d="http://www.onvif.org/ver10/device/wsdl">
 <S:Header><sec:Security S:mustUnderstand="1"><sec:UsernameToken>
  <sec:Username>{user}</sec:Username>
  <sec:Password Type="{profile}#{kind}">{value}</sec:Password>
  <sec:Nonce>{base64.b64encode(nonce).decode()}</sec:Nonce>
  <u:Created>{created}</u:Created>
 </sec:UsernameToken></sec:Security></S:Header>
 <S:Body><d:{operation}/></S:Body>
</S:Envelope>""".encode()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def _post(url: str, body: bytes) -> tuple[int, str, CIMultiDictProxy[str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers={"Content-Type": "application/soap+xml"}) as r,
    ):
        return r.status, await r.text(), r.headers


# --- ONVIF through the real client ---------------------------------------------------------------


async def test_onvif_client_reads_device_information_profiles_and_uris(
    server: OnvifServer, camera: VirtualCamera
) -> None:
    async with _client(camera) as client:
        await client.update_xaddrs()
        base = f"http://127.0.0.1:{camera.onvif_port}"
        assert client.xaddrs == {
            "http://www.onvif.org/ver10/device/wsdl": f"{base}/onvif/device_service",
            "http://www.onvif.org/ver10/media/wsdl": f"{base}/onvif/media_service",
        }
        device = await client.create_devicemgmt_service()
        info = await device.GetDeviceInformation()
        assert (info.Manufacturer, info.Model, info.SerialNumber, info.FirmwareVersion) == (
            "isocam-sim",
            "VirtualCam 1080",
            "SIM000001",
            "1.0.0",
        )
        scopes = [s.ScopeItem for s in await device.GetScopes()]
        assert "onvif://www.onvif.org/name/C%E1%BB%95ng%20ch%C3%ADnh" in scopes
        assert "onvif://www.onvif.org/Profile/Streaming" in scopes
        caps = await client.get_capabilities()
        assert caps is not None and caps["Media"]["XAddr"] == f"{base}/onvif/media_service"

        media = await client.create_media_service()
        profiles = {p.token: p for p in await media.GetProfiles()}
        assert list(profiles) == ["main", "sub"]
        main = profiles["main"].VideoEncoderConfiguration
        sub = profiles["sub"].VideoEncoderConfiguration
        assert (main.Encoding, main.Resolution.Width, main.Resolution.Height) == (
            "H265",
            1920,
            1080,
        )
        assert (main.RateControl.FrameRateLimit, main.RateControl.BitrateLimit) == (25, 4096)
        h265 = main._value_1[0]  # Media1 has no H265 element: it rides in the xs:any tail
        assert h265.findtext("{*}GovLength") == "50"
        assert (sub.Encoding, sub.Resolution.Width, sub.Resolution.Height) == ("H264", 640, 360)
        assert (sub.RateControl.BitrateLimit, sub.H264.GovLength) == (512, 50)

        setup = {"Stream": "RTP-Unicast", "Transport": {"Protocol": "RTSP"}}
        for token in ("main", "sub"):
            uri = await media.GetStreamUri({"StreamSetup": setup, "ProfileToken": token})
            assert uri.Uri == f"rtsp://127.0.0.1:18554/{token}"
        assert await client.get_snapshot_uri("main") == f"{base}/snapshot.jpg"
        sources = await media.GetVideoSources()
        assert (sources[0].Resolution.Width, sources[0].Framerate) == (1920, 25.0)


async def test_bitrate_fault_shows_in_the_profiles(
    server: OnvifServer, camera: VirtualCamera
) -> None:
    camera.faults.bitrate_kbps = 1024
    async with _client(camera) as client:
        await client.update_xaddrs()
        media = await client.create_media_service()
        limits = {
            p.token: p.VideoEncoderConfiguration.RateControl.BitrateLimit
            for p in await media.GetProfiles()
        }
    assert limits == {"main": 1024, "sub": 128}


async def test_wrong_password_is_refused_with_a_not_authorized_fault(
    server: OnvifServer, camera: VirtualCamera
) -> None:
    async with _client(camera, password="wrong") as client:
        with pytest.raises(zeep.exceptions.Fault) as caught:
            await client.update_xaddrs()
    assert _subcodes(caught.value) == ["NotAuthorized"]
    assert "wrong username or password" in caught.value.message
    assert is_auth_error(caught.value)


async def test_wrong_credentials_fault_refuses_the_advertised_password(
    server: OnvifServer, camera: VirtualCamera
) -> None:
    camera.faults.wrong_credentials = True
    async with _client(camera) as client:
        with pytest.raises(zeep.exceptions.Fault) as caught:
            await client.update_xaddrs()
    assert _subcodes(caught.value) == ["NotAuthorized"]
    async with _client(camera, password=camera.effective_password) as client:
        await client.update_xaddrs()


async def test_clock_skewed_camera_works_with_adjust_time(
    server: OnvifServer, camera: VirtualCamera
) -> None:
    camera.faults.clock_skew_s = 3600
    async with _client(camera) as client:
        device = await client.create_devicemgmt_service()
        answer = await device.authless_GetSystemDateAndTime()
        d, t = answer.UTCDateTime.Date, answer.UTCDateTime.Time
        reported = datetime(d.Year, d.Month, d.Day, t.Hour, t.Minute, t.Second, tzinfo=UTC)
        assert abs(reported.timestamp() - camera.now()) < 5
        assert answer.TimeZone.TZ == "ICT-7"
        await client.update_xaddrs()
        assert client.dt_diff is not None and abs(client.dt_diff.total_seconds() - 3600) < 5
        device = await client.create_devicemgmt_service()
        assert (await device.GetDeviceInformation()).SerialNumber == "SIM000001"


async def test_clock_skewed_camera_refuses_an_unadjusted_created_time(
    server: OnvifServer, camera: VirtualCamera
) -> None:
    camera.faults.clock_skew_s = 3600
    url = camera.onvif_url
    body = _wsse_envelope(
        "GetDeviceInformation", "admin", PASSWORD, _iso(time.time()), os.urandom(16)
    )
    status, text, _ = await _post(url, body)
    assert status == 400
    assert "ter:NotAuthorized" in text and "camera clock" in text
    async with _client(camera, adjust_time=False) as client:
        with pytest.raises(zeep.exceptions.Fault) as caught:
            await client.update_xaddrs()
    assert _subcodes(caught.value) == ["NotAuthorized"]
    # the same credentials signed with the camera's own time pass
    body = _wsse_envelope(
        "GetDeviceInformation", "admin", PASSWORD, _iso(camera.now()), os.urandom(16)
    )
    status, text, _ = await _post(url, body)
    assert status == 200 and "SIM000001" in text


async def test_replayed_nonce_is_refused(server: OnvifServer, camera: VirtualCamera) -> None:
    body = _wsse_envelope(
        "GetDeviceInformation", "admin", PASSWORD, _iso(time.time()), os.urandom(16)
    )
    first = await _post(camera.onvif_url, body)
    second = await _post(camera.onvif_url, body)
    assert first[0] == 200
    assert second[0] == 400 and "ter:NotAuthorized" in second[1] and "nonce" in second[1]


async def test_password_text_token_is_accepted(server: OnvifServer, camera: VirtualCamera) -> None:
    good = _wsse_envelope(
        "GetDeviceInformation", "admin", PASSWORD, _iso(time.time()), b"n1", digest=False
    )
    bad = _wsse_envelope(
        "GetDeviceInformation", "admin", "nope", _iso(time.time()), b"n2", digest=False
    )
    assert (await _post(camera.onvif_url, good))[0] == 200
    assert (await _post(camera.onvif_url, bad))[0] == 400


async def test_protected_operation_without_credentials_gets_401_and_a_fault(
    server: OnvifServer, camera: VirtualCamera
) -> None:
    anonymous = b"""<e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope"
        xmlns:x="http://www.onvif.org/ver10/device/wsdl"><e:Body><x:%s/></e:Body></e:Envelope>"""
    status, text, headers = await _post(camera.onvif_url, anonymous % b"GetDeviceInformation")
    assert status == 401 and "ter:NotAuthorized" in text
    assert headers["WWW-Authenticate"].startswith("Digest ")
    # PRE_AUTH operations answer anyone (ONVIF Core access classes)
    status, text, _ = await _post(camera.onvif_url, anonymous % b"GetServices")
    assert status == 200 and "onvif/media_service" in text


async def test_http_digest_authenticates_soap_calls_too(
    server: OnvifServer, camera: VirtualCamera
) -> None:
    body = b"""<e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope"
        xmlns:x="http://www.onvif.org/ver10/device/wsdl"><e:Body><x:GetDeviceInformation/></e:Body></e:Envelope>"""
    response = await asyncio.to_thread(
        requests.post,
        camera.onvif_url,
        data=body,
        auth=HTTPDigestAuth("admin", PASSWORD),
        headers={"Content-Type": "application/soap+xml"},
        timeout=10,
    )
    assert response.status_code == 200 and "SIM000001" in response.text


async def test_unknown_operation_gets_an_action_not_supported_fault(
    server: OnvifServer, camera: VirtualCamera
) -> None:
    async with _client(camera) as client:
        await client.update_xaddrs()
        device = await client.create_devicemgmt_service()
        with pytest.raises(zeep.exceptions.Fault) as caught:
            await device.GetNetworkInterfaces()
    assert _subcodes(caught.value) == ["ActionNotSupported"]
    assert caught.value.code == "env:Receiver"


async def test_unknown_profile_token_gets_a_no_profile_fault(
    server: OnvifServer, camera: VirtualCamera
) -> None:
    async with _client(camera) as client:
        await client.update_xaddrs()
        media = await client.create_media_service()
        with pytest.raises(zeep.exceptions.Fault) as caught:
            await media.GetStreamUri(
                {
                    "StreamSetup": {"Stream": "RTP-Unicast", "Transport": {"Protocol": "RTSP"}},
                    "ProfileToken": "third",
                }
            )
    assert _subcodes(caught.value) == ["InvalidArgVal", "NoProfile"]


async def test_malformed_request_gets_a_well_formed_fault(
    server: OnvifServer, camera: VirtualCamera
) -> None:
    for junk in (b"<not-closed", b"\x00\xff" * 40, b"<?xml version='1.0'?><Envelope/>"):
        status, text, _ = await _post(camera.onvif_url, junk)
        assert status == 400 and "ter:WellFormed" in text


# --- snapshot ------------------------------------------------------------------------------------


async def test_snapshot_through_the_onvif_client_with_digest_and_basic(
    server: OnvifServer, camera: VirtualCamera
) -> None:
    async with _client(camera) as client:
        await client.update_xaddrs()
        by_digest = await client.get_snapshot("main")
        by_basic = await client.get_snapshot("main", basic_auth=True)
    assert by_digest == by_basic == _jpeg(camera)
    image = cv2.imdecode(np.frombuffer(by_digest or b"", np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[:2] == (72, 128)


async def test_snapshot_with_requests_http_digest_and_a_wrong_password(
    server: OnvifServer, camera: VirtualCamera
) -> None:
    good = await asyncio.to_thread(
        requests.get, camera.snapshot_url, auth=HTTPDigestAuth("admin", PASSWORD), timeout=10
    )
    bad = await asyncio.to_thread(
        requests.get, camera.snapshot_url, auth=HTTPDigestAuth("admin", "wrong"), timeout=10
    )
    assert good.status_code == 200 and good.headers["Content-Type"] == "image/jpeg"
    assert good.content == _jpeg(camera)
    assert bad.status_code == 401


async def test_snapshot_without_credentials_gets_401_with_digest_and_basic_challenges(
    server: OnvifServer, camera: VirtualCamera
) -> None:
    async with aiohttp.ClientSession() as session, session.get(camera.snapshot_url) as r:
        challenges = r.headers.getall("WWW-Authenticate")
        assert r.status == 401
    assert challenges[0].startswith("Digest ") and 'qop="auth"' in challenges[0]
    assert "algorithm=MD5" in challenges[0]
    assert challenges[1].startswith("Basic ")


def _digest_header(challenge: str, method: str, uri: str, user: str, password: str) -> str:
    params = dict(re.findall(r'(\w+)="?([^",]+)"?', challenge.removeprefix("Digest ")))
    ha1 = hashlib.md5(f"{user}:{params['realm']}:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"{method}:{uri}".encode()).hexdigest()
    nc, cnonce = "00000001", "0a4f113b"
    response = hashlib.md5(f"{ha1}:{params['nonce']}:{nc}:{cnonce}:auth:{ha2}".encode()).hexdigest()
    return (
        f'Digest username="{user}", realm="{params["realm"]}", nonce="{params["nonce"]}", '
        f'uri="{uri}", algorithm=MD5, qop=auth, nc={nc}, cnonce="{cnonce}", '
        f'response="{response}", opaque="{params["opaque"]}"'
    )


async def test_expired_digest_nonce_is_answered_stale(
    server: OnvifServer, camera: VirtualCamera
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(camera.snapshot_url) as r:
            challenge = r.headers["WWW-Authenticate"]
        auth = _digest_header(challenge, "GET", "/snapshot.jpg", "admin", PASSWORD)
        async with session.get(camera.snapshot_url, headers={"Authorization": auth}) as r:
            assert r.status == 200
        camera.faults.clock_skew_s = 3600  # the nonce is now an hour old on the camera's clock
        async with session.get(camera.snapshot_url, headers={"Authorization": auth}) as r:
            assert r.status == 401
            assert "stale=true" in r.headers["WWW-Authenticate"]
            fresh = r.headers["WWW-Authenticate"]
        auth = _digest_header(fresh, "GET", "/snapshot.jpg", "admin", PASSWORD)
        async with session.get(camera.snapshot_url, headers={"Authorization": auth}) as r:
            assert r.status == 200


# --- server life cycle ---------------------------------------------------------------------------


async def test_stopped_server_refuses_connections_and_restarts_on_the_same_port(
    server: OnvifServer, camera: VirtualCamera
) -> None:
    port = camera.onvif_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /snapshot.jpg HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 401")
    await server.stop()
    # the kept-alive connection is closed, not left open
    await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)

    assert await server.start("127.0.0.1", port) == port
    async with _client(camera) as client:
        await client.update_xaddrs()
        device = await client.create_devicemgmt_service()
        assert (await device.GetDeviceInformation()).SerialNumber == "SIM000001"
