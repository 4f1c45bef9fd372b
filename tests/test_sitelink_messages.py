"""sitelink.messages: every message kind round-trips; everything else is refused with a reason."""

from __future__ import annotations

import base64
import json
import math
from typing import Any, get_args

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from sitelink import messages as m
from sitelink.topics import POLICIES, Kind, topic

SITE = "hcm-q7-001"
NOW = 1_719_800_000.25
JPEG = base64.b64encode(b"\xff\xd8\xff\xe0" + bytes(200)).decode()


def _profile(token: str = "main", **kw: Any) -> m.StreamProfile:
    base: dict[str, Any] = {
        "token": token,
        "name": f"{token} stream",
        "codec": "h264",
        "width": 1920,
        "height": 1080,
        "fps": 25.0,
        "bitrate_kbps": 4096.0,
        "rtsp_url": f"rtsp://192.168.1.64:554/Streaming/Channels/{token}",
    }
    return m.StreamProfile(**(base | kw))


def _camera(i: int = 1, **kw: Any) -> m.CameraInfo:
    base: dict[str, Any] = {
        "id": f"cam-{i:02d}",
        "name": f"Cổng chính {i}",
        "onvif_url": f"http://192.168.1.{i}/onvif/device_service",
        "manufacturer": "Hikvision",
        "model": "DS-2CD2143G2-I",
        "firmware": "V5.7.3 build 220112",
        "serial": f"DS-2CD2143G2-I20220101AAWRG{i:08d}",
        "hardware_id": "88",
        "profiles": [_profile("main"), _profile("sub", width=640, height=360)],
        "record_profile": "main",
        "live_profile": "sub",
        "state": "recording",
        "clock_offset_s": -0.4,
    }
    return m.CameraInfo(**(base | kw))


def _site() -> m.SiteInfo:
    return m.SiteInfo(
        name="Khu cách ly KTX Đại học Quốc gia",
        province="Thành phố Hồ Chí Minh",
        district="Thủ Đức",
        kind="facility",
        authority="military",
        operator="vnpt",
    )


def _site_health() -> m.SiteHealth:
    return m.SiteHealth(
        disk_total_bytes=8 * 10**12,
        disk_used_bytes=5 * 10**12,
        disk_free_bytes=3 * 10**12,
        forecast_days=41.5,
        cpu_percent=23.5,
        mem_total_bytes=8 * 2**30,
        mem_used_bytes=3 * 2**30,
        clock_offset_s=0.012,
        agent_version="0.1.0",
        uptime_s=86_400.0,
        spool_depth=0,
    )


def _camera_health(i: int = 1, **kw: Any) -> m.CameraHealth:
    base: dict[str, Any] = {
        "camera": f"cam-{i:02d}",
        "connected": True,
        "recording": "recording",
        "last_packet_age_s": 0.04,
        "fps": 25.0,
        "bitrate_kbps": 3980.5,
        "reconnects_1h": 0,
        "segment_write_lag_s": 0.3,
        "image": m.ImageHealth(luma_mean=128.0, sharpness=575.0, motion=3.4, scene_diff=0.8),
    }
    return m.CameraHealth(**(base | kw))


SIG = base64.b64encode(bytes(range(64))).decode()
HASH = "ab" * 32


def samples() -> list[m.Message]:
    """One valid message of every model, with optional fields filled in."""
    return [
        m.StateBirth(ts=NOW, bdseq=7, agent_version="0.1.0", started=NOW - 5, last_seq=41),
        m.StateDeath(ts=NOW, bdseq=7, agent_version="0.1.0", reason="lost"),
        m.Inventory(ts=NOW, site=_site(), cameras=[_camera(1), _camera(2, state="offline")]),
        m.Health(
            ts=NOW,
            site=_site_health(),
            cameras=[_camera_health(1, thumbnail_jpeg=JPEG), _camera_health(2, gap_since=NOW)],
        ),
        m.CameraDown(seq=1, ts=NOW, camera="cam-01", cause="stall", detail="no packet for 5 s"),
        m.CameraUp(seq=2, ts=NOW, camera="cam-01", down_since=NOW - 60),
        m.GapOpened(seq=3, ts=NOW, camera="cam-01", start=NOW - 60, cause="refused"),
        m.GapClosed(seq=4, ts=NOW, camera="cam-01", start=NOW - 60, end=NOW, cause="timeout"),
        m.ImageFaultEvent(
            seq=5,
            ts=NOW,
            camera="cam-02",
            fault="covered",
            active=True,
            measured={"luma_mean": 37.0, "sharpness": 1.1, "motion": 1.8},
        ),
        m.DiskEvent(seq=6, ts=NOW, level="warning", free_bytes=10**11, forecast_days=12.5),
        m.ClockEvent(seq=7, ts=NOW, level="critical", offset_s=3600.5, camera="cam-03"),
        m.ChainHead(
            seq=8,
            ts=NOW,
            camera="cam-01",
            segment_seq=1440,
            row_hash=HASH,
            time=NOW,
            key_id="0123456789abcdef",
            signature=SIG,
        ),
        m.Tombstone(
            seq=9,
            ts=NOW,
            camera="cam-01",
            first_seq=1,
            last_seq=1440,
            start=NOW - 31 * 86400,
            end=NOW - 30 * 86400,
            removed_rows=1440,
            removed_bytes=30 * 10**9,
            prev_anchor="0" * 64,
            last_row_hash=HASH,
            reason="retention",
            created_at=NOW,
            missing_files=0,
            key_id="0123456789abcdef",
            signature=SIG,
        ),
        m.RetentionEvent(
            seq=10,
            ts=NOW,
            camera="cam-01",
            retention_days=30,
            legal_hold=True,
            below_legal_minimum=False,
            reason="Quyết định số 123/QĐ-CA",
        ),
        m.Alarm(
            seq=11,
            ts=NOW,
            code="spool_overflow",
            level="critical",
            active=True,
            message="spool full: oldest health samples dropped",
        ),
        m.AgentStarted(
            seq=12, ts=NOW, agent_version="0.1.0", clean_shutdown=False, recovered={"orphans": 2}
        ),
        m.Rescan(ts=NOW, id="req-1"),
        m.Snapshot(ts=NOW, id="req-2", args=m.SnapshotArgs(camera="cam-01", max_width=320)),
        m.OpenTunnel(
            ts=NOW,
            id="2b8f1a1e-5c1d-4d7e-9a51-0c3b9d1f7e21",
            args=m.OpenTunnelArgs(
                hub_url="wss://hub-2.noc.example.vn/tunnel",
                token="A" * 43,
                camera="cam-01",
                purpose="live",
                expires=NOW + 30,
            ),
        ),
        m.SetLegalHold(
            ts=NOW,
            id="req-4",
            args=m.SetLegalHoldArgs(all_cameras=True, hold=True, reason="Công văn 55/CV-BCA"),
        ),
        m.CommandReply(ts=NOW, id="req-2", ok=True, result={"jpeg": JPEG, "n": [1, None]}),
        m.CommandReply(
            ts=NOW, id="req-9", ok=False, error=m.ReplyError(code="unknown_camera", message="x")
        ),
    ]


def _json(msg: m.Message, **changes: Any) -> bytes:
    data = json.loads(m.encode(msg))
    for key, value in changes.items():
        if value is _DELETE:
            del data[key]
        else:
            data[key] = value
    return json.dumps(data).encode()


_DELETE = object()
EVENT = m.CameraDown(seq=41, ts=NOW, camera="cam-03", cause="stall")
EVENT_TOPIC = topic(SITE, Kind.EVENT)


def _reason(topic_name: str, payload: bytes) -> str:
    with pytest.raises(m.MessageError) as info:
        m.decode(topic_name, payload)
    assert str(info.value)  # always a readable line
    assert info.value.reason in m.REASONS
    return info.value.reason


# --- round trips ------------------------------------------------------------------------------


def test_samples_cover_every_model_event_kind_and_command() -> None:
    kinds = {type(s) for s in samples()}
    assert set(m.EVENT_KINDS.values()) <= kinds
    assert set(m.COMMANDS.values()) <= kinds
    assert {m.StateBirth, m.StateDeath, m.Inventory, m.Health, m.CommandReply} <= kinds


@pytest.mark.parametrize("msg", samples(), ids=lambda s: type(s).__name__)
def test_every_message_kind_round_trips_through_its_topic(msg: m.Message) -> None:
    name = topic(SITE, msg.TOPIC_KIND)
    payload = m.encode(msg)
    assert m.decode(name, payload) == msg
    delivery = m.decode_delivery(name, payload)
    assert delivery.topic.site_id == SITE and delivery.topic.kind is msg.TOPIC_KIND
    assert delivery.message == msg


def test_encoding_is_compact_json_without_absent_fields() -> None:
    payload = m.encode(m.CameraUp(seq=2, ts=NOW, camera="cam-01"))
    assert payload == (b'{"v":1,"ts":1719800000.25,"seq":2,"kind":"camera_up","camera":"cam-01"}')


def test_explicit_null_for_an_optional_field_is_accepted() -> None:
    payload = _json(EVENT, detail=None)
    assert m.decode(EVENT_TOPIC, payload) == EVENT


def test_outgoing_carries_the_topic_qos_and_retain_flag_of_the_table() -> None:
    for msg in samples():
        out = m.outgoing(SITE, msg)
        policy = POLICIES[msg.TOPIC_KIND]
        assert out.topic == topic(SITE, msg.TOPIC_KIND)
        assert (out.qos, out.retain) == (policy.qos, policy.retain)
        assert m.decode(out.topic, out.payload) == msg


def test_a_birth_builds_its_matching_death() -> None:
    birth = m.StateBirth(ts=NOW, bdseq=12, agent_version="0.2.0", started=NOW, last_seq=0)
    will = birth.matching_death()
    assert (will.bdseq, will.reason, will.agent_version) == (12, "lost", "0.2.0")
    assert birth.matching_death("shutdown").reason == "shutdown"
    state = m.decode(topic(SITE, Kind.STATE), m.encode(will))
    assert isinstance(state, m.StateDeath) and state.bdseq == birth.bdseq


def test_messages_are_immutable() -> None:
    with pytest.raises(ValidationError):
        EVENT.seq = 42


def test_python_construction_fills_in_v_but_the_wire_must_carry_it() -> None:
    assert EVENT.v == 1
    assert _reason(EVENT_TOPIC, _json(EVENT, v=_DELETE)) == "schema"


def test_decoding_json_does_not_detour_through_the_python_constructor() -> None:
    # A custom __init__ would make pydantic validate every received message twice.
    for model in {type(s) for s in samples()}:
        assert model.__pydantic_custom_init__ is False, model


def test_every_optional_field_defaults_to_none_so_leaving_it_out_round_trips() -> None:
    def walk(model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            if type(None) in get_args(field.annotation):
                assert field.default is None, f"{model.__name__}.{name}"
            for arg in (field.annotation, *get_args(field.annotation)):
                for inner in (arg, *get_args(arg)):
                    if isinstance(inner, type) and issubclass(inner, BaseModel):
                        walk(inner)

    for model in {type(s) for s in samples()}:
        walk(model)


# --- rejections -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty"),
        (b"{", "bad_json"),
        (b"\xff\xfe{}", "bad_json"),
        (b'{"v":1}garbage', "bad_json"),
        (b'{"v":1,"s":"\\ud800"}', "bad_json"),
        (b"[" * 5000 + b"]" * 5000, "bad_json"),
        (b"[]", "schema"),
        (b"42", "schema"),
        (b"null", "schema"),
        (b'{"v":1,"ts":1719800000,"seq":1,"kind":"camera_sideways"}', "unknown_kind"),
        (b'{"v":1,"ts":1719800000,"seq":1}', "schema"),
    ],
)
def test_malformed_payloads_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    assert _reason(EVENT_TOPIC, payload) == reason


def test_oversized_payloads_are_refused_before_parsing() -> None:
    junk = b"\xff" * (m.MAX_PAYLOAD_BYTES + 1)  # not JSON at all: size is checked first
    assert _reason(EVENT_TOPIC, junk) == "oversized"


def test_a_payload_of_exactly_the_limit_is_accepted() -> None:
    payload = m.encode(EVENT)
    padded = payload[:-1] + b" " * (m.MAX_PAYLOAD_BYTES - len(payload)) + b"}"
    assert len(padded) == m.MAX_PAYLOAD_BYTES
    assert m.decode(EVENT_TOPIC, padded) == EVENT


def test_unknown_fields_are_refused_at_any_depth() -> None:
    assert _reason(EVENT_TOPIC, _json(EVENT, site="hcm-q7-001")) == "schema"
    inv = json.loads(m.encode(samples()[2]))
    inv["cameras"][0]["profiles"][0]["password"] = "admin"
    assert _reason(topic(SITE, Kind.INVENTORY), json.dumps(inv).encode()) == "schema"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seq", "41"),
        ("seq", 41.0),
        ("seq", True),
        ("seq", 0),
        ("seq", -1),
        ("seq", 2**53),
        ("seq", None),
        ("camera", 3),
        ("camera", ""),
        ("camera", "-cam"),
        ("camera", "cam/03"),
        ("camera", "c" * 65),
        ("cause", "STALL"),
        ("cause", "unplugged"),
        ("detail", "line one\nline two"),
        ("detail", "x" * 1001),
        ("detail", ""),
    ],
)
def test_wrong_types_and_values_are_not_coerced(field: str, value: Any) -> None:
    assert _reason(EVENT_TOPIC, _json(EVENT, **{field: value})) == "schema"


@pytest.mark.parametrize(
    "raw_ts",
    [
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"-1",
        b"0",
        b"1577836799.999",  # 2019-12-31T23:59:59.999Z
        b"4102444800",  # 2100-01-01T00:00:00Z
        b"1e300",
        b'"2024-07-01T10:00:00Z"',
        b'"2024-07-01T10:00:00"',
        b'"1719800000"',
        b"true",
        b"null",
    ],
)
def test_bad_timestamps_are_refused(raw_ts: bytes) -> None:
    payload = m.encode(EVENT).replace(b'"ts":1719800000.25', b'"ts":' + raw_ts)
    assert raw_ts in payload
    assert _reason(EVENT_TOPIC, payload) == "schema"


@pytest.mark.parametrize("raw_ts", [b"1577836800", b"1719800000", b"4102444799.999999"])
def test_timestamps_in_range_are_accepted_as_integer_or_fraction(raw_ts: bytes) -> None:
    payload = m.encode(EVENT).replace(b'"ts":1719800000.25', b'"ts":' + raw_ts)
    assert m.decode(EVENT_TOPIC, payload).ts == float(raw_ts)


@pytest.mark.parametrize("version", [2, 0, 99])
def test_other_protocol_versions_are_refused_as_unsupported(version: int) -> None:
    assert _reason(EVENT_TOPIC, _json(EVENT, v=version)) == "unsupported_version"
    birth = samples()[0]
    assert _reason(topic(SITE, Kind.STATE), _json(birth, v=version)) == "unsupported_version"
    assert (
        _reason(topic(SITE, Kind.HEALTH), _json(samples()[3], v=version)) == "unsupported_version"
    )


@pytest.mark.parametrize("version", ["1", 1.0, True, None])
def test_a_version_of_the_wrong_type_is_a_schema_error(version: Any) -> None:
    assert _reason(EVENT_TOPIC, _json(EVENT, v=version)) == "schema"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("isocam/v1/Bad_Site/event", "bad_topic"),
        ("isocam/v1/-site/event", "bad_topic"),
        ("isocam/v2/hcm-q7-001/event", "bad_topic"),
        ("isocam/v1/hcm-q7-001/telemetry", "unknown_kind"),
    ],
)
def test_bad_topics_are_refused_with_the_topic_reason(name: str, reason: str) -> None:
    assert _reason(name, m.encode(EVENT)) == reason


@pytest.mark.parametrize(
    ("msg_index", "wrong_kind", "reason"),
    [
        (0, Kind.EVENT, "unknown_kind"),  # birth on the event topic
        (4, Kind.STATE, "unknown_kind"),  # event on the state topic
        (3, Kind.INVENTORY, "schema"),  # health on the inventory topic
        (2, Kind.HEALTH, "schema"),  # inventory on the health topic
        (16, Kind.CMD_REPLY, "schema"),  # command on the reply topic
        (20, Kind.CMD, "schema"),  # reply on the command topic
    ],
)
def test_a_payload_on_another_kinds_topic_is_refused(
    msg_index: int, wrong_kind: Kind, reason: str
) -> None:
    msg = samples()[msg_index]
    assert msg.TOPIC_KIND is not wrong_kind
    assert _reason(topic(SITE, wrong_kind), m.encode(msg)) == reason


def test_unknown_commands_are_refused_as_unknown_kind() -> None:
    payload = _json(samples()[16], command="format_disk")
    with pytest.raises(m.MessageError, match="unknown command 'format_disk'") as info:
        m.decode(topic(SITE, Kind.CMD), payload)
    assert info.value.reason == "unknown_kind"


def test_errors_never_echo_the_payload() -> None:
    secret = "S3cr3tT0kenS3cr3tT0kenS3cr3t"
    cmd = json.loads(m.encode(samples()[18]))
    cmd["args"]["token"] = secret + "!"  # invalid character, so the token field fails
    with pytest.raises(m.MessageError) as info:
        m.decode(topic(SITE, Kind.CMD), json.dumps(cmd).encode())
    assert secret not in str(info.value)


def test_a_non_bytes_payload_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        m.decode(EVENT_TOPIC, m.encode(EVENT).decode())  # type: ignore[arg-type]


def test_a_bytearray_payload_is_accepted() -> None:
    assert m.decode(EVENT_TOPIC, bytearray(m.encode(EVENT))) == EVENT


def test_message_error_is_a_value_error_with_a_known_reason() -> None:
    with pytest.raises(ValueError):
        m.decode(EVENT_TOPIC, b"")
    assert set(get_args(m.Reason)) == set(m.REASONS)


# --- field rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "rtsp://admin:12345@192.168.1.64:554/Streaming/Channels/101",
        "rtsp://admin@192.168.1.64/stream",
        "rtsp://192.168.1.64/stream?user=admin&password=12345",
        "rtsp://192.168.1.64/stream?PWD=12345",
        "http://192.168.1.64/stream",
        "rtsp:///nohost",
        "rtsp://192.168.1.64:99999/stream",
        "rtsp://192.168.1.64/with space",
        "rtsp://[::1/stream",
    ],
)
def test_rtsp_urls_with_credentials_or_wrong_form_are_refused(url: str) -> None:
    with pytest.raises(ValidationError):
        _profile(rtsp_url=url)


@pytest.mark.parametrize(
    "url",
    [
        "rtsp://192.168.1.64:554/Streaming/Channels/101",
        "rtsps://cam.local/onvif-media/media.amp?profile=profile_1_h264&streamtype=unicast",
        "rtsp://[fe80::1]:554/live",
    ],
)
def test_rtsp_urls_without_credentials_are_accepted(url: str) -> None:
    assert _profile(rtsp_url=url).rtsp_url == url


def test_onvif_addresses_must_be_http_without_credentials() -> None:
    assert _camera(onvif_url="https://10.0.0.5:8443/onvif/device_service")
    for bad in ("rtsp://10.0.0.5/onvif", "http://admin:pw@10.0.0.5/onvif/device_service"):
        with pytest.raises(ValidationError):
            _camera(onvif_url=bad)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("wss://hub.example.vn/tunnel", True),
        ("https://hub.example.vn/tunnel", True),
        ("ws://127.0.0.1:8080/tunnel", True),
        ("ws://localhost:8080/tunnel", True),
        ("http://[::1]:8080/tunnel", True),
        ("ws://hub.example.vn/tunnel", False),
        ("http://10.0.0.1/tunnel", False),
        ("wss://user:pw@hub.example.vn/tunnel", False),
        ("ftp://hub.example.vn/", False),
    ],
)
def test_tunnel_urls_are_tls_except_to_loopback(url: str, ok: bool) -> None:
    def build() -> m.OpenTunnelArgs:
        return m.OpenTunnelArgs(
            hub_url=url, token="t" * 22, camera="cam-01", purpose="playback", expires=NOW
        )

    if ok:
        assert build().hub_url == url
    else:
        with pytest.raises(ValidationError):
            build()


@pytest.mark.parametrize("token", ["short", "t" * 21, "has space" * 5, "x" * 513, "a+b/" * 10])
def test_tunnel_tokens_are_long_url_safe_strings(token: str) -> None:
    with pytest.raises(ValidationError):
        m.OpenTunnelArgs(
            hub_url="wss://h.vn/", token=token, camera="cam-01", purpose="live", expires=NOW
        )


@pytest.mark.parametrize(
    "thumb",
    [
        base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(50)).decode(),  # a PNG, not a JPEG
        "not base64!!",
        base64.b64encode(b"\xff\xd8\xff" + bytes(m.MAX_THUMBNAIL_BYTES)).decode(),  # too big
        "",
    ],
)
def test_thumbnails_must_be_small_base64_jpegs(thumb: str) -> None:
    with pytest.raises(ValidationError):
        _camera_health(thumbnail_jpeg=thumb)


def test_a_thumbnail_at_the_size_bound_is_accepted() -> None:
    thumb = base64.b64encode(b"\xff\xd8\xff" + bytes(m.MAX_THUMBNAIL_BYTES - 3)).decode()
    assert _camera_health(thumbnail_jpeg=thumb).thumbnail_jpeg == thumb


def test_a_64_camera_site_fits_its_inventory_and_health_in_one_message() -> None:
    inv = m.Inventory(ts=NOW, site=_site(), cameras=[_camera(i) for i in range(64)])
    health = m.Health(ts=NOW, site=_site_health(), cameras=[_camera_health(i) for i in range(64)])
    assert len(m.encode(inv)) < m.MAX_PAYLOAD_BYTES
    assert len(m.encode(health)) < m.MAX_PAYLOAD_BYTES // 2


def test_encode_refuses_a_message_over_the_limit() -> None:
    big = base64.b64encode(b"\xff\xd8\xff" + bytes(m.MAX_THUMBNAIL_BYTES - 3)).decode()
    health = m.Health(
        ts=NOW,
        site=_site_health(),
        cameras=[_camera_health(i, thumbnail_jpeg=big) for i in range(8)],
    )
    with pytest.raises(m.MessageError, match="over 65536") as info:
        m.encode(health)
    assert info.value.reason == "oversized"


def test_encode_refuses_what_is_not_a_message() -> None:
    with pytest.raises(TypeError):
        m.encode(_site())  # type: ignore[arg-type]


def test_gap_and_tombstone_ranges_must_not_be_reversed() -> None:
    with pytest.raises(ValidationError, match="before its start"):
        m.GapClosed(seq=1, ts=NOW, camera="c", start=NOW, end=NOW - 1, cause="eof")
    stone = json.loads(m.encode(samples()[12]))
    stone["last_seq"] = 0
    assert _reason(EVENT_TOPIC, json.dumps(stone).encode()) == "schema"


@pytest.mark.parametrize("raw", [b"NaN", b"Infinity", b"[1, -Infinity]", b'{"a": {"b": NaN}}'])
def test_free_form_reply_results_refuse_nan_and_infinity(raw: bytes) -> None:
    payload = b'{"v":1,"ts":1719800000,"id":"r","ok":true,"result":{"x":' + raw + b"}}"
    assert _reason(topic(SITE, Kind.CMD_REPLY), payload) == "schema"


def test_a_legal_hold_names_exactly_one_target() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        m.SetLegalHoldArgs(hold=True, reason="CV 1")
    with pytest.raises(ValidationError, match="exactly one"):
        m.SetLegalHoldArgs(camera="cam-01", all_cameras=True, hold=True, reason="CV 1")
    assert m.SetLegalHoldArgs(camera="cam-01", hold=False, reason="CV 2").camera == "cam-01"


def test_a_reply_has_an_error_exactly_when_it_failed() -> None:
    with pytest.raises(ValidationError, match="exactly when"):
        m.CommandReply(ts=NOW, id="r", ok=False)
    with pytest.raises(ValidationError, match="exactly when"):
        m.CommandReply(ts=NOW, id="r", ok=True, error=m.ReplyError(code="x", message="y"))


def test_inventory_profile_references_and_camera_ids_are_consistent() -> None:
    with pytest.raises(ValidationError, match="not one of the camera's profiles"):
        _camera(record_profile="third")
    with pytest.raises(ValidationError, match="unique within a camera"):
        _camera(profiles=[_profile("main"), _profile("main")], live_profile=None)
    with pytest.raises(ValidationError, match="camera ids must be unique"):
        m.Inventory(ts=NOW, site=_site(), cameras=[_camera(1), _camera(1)])


@pytest.mark.parametrize(
    "sig",
    [
        SIG[:-3] + "B==",  # non-canonical: low bits of the last character set
        SIG[:-2],  # no padding
        base64.b64encode(bytes(63)).decode(),
        base64.urlsafe_b64encode(bytes([251] * 64)).decode(),  # URL-safe alphabet
    ],
)
def test_signatures_must_be_canonical_base64_of_64_bytes(sig: str) -> None:
    stone = json.loads(m.encode(samples()[11]))
    stone["signature"] = sig
    assert _reason(EVENT_TOPIC, json.dumps(stone).encode()) == "schema"


def test_chain_heads_and_tombstones_verify_with_the_device_key_after_the_trip() -> None:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    kid = m.key_id_for(raw)
    when = 1_719_800_000.0  # integral: signed and decoded as a float all the same
    head_payload = m.canonical_json(m.chain_head_payload(SITE, "cam-01", 1440, HASH, int(when)))
    head = samples()[11].model_copy(
        update={
            "time": when,
            "key_id": kid,
            "signature": base64.b64encode(key.sign(head_payload)).decode(),
        }
    )
    unsigned = samples()[12]
    assert isinstance(unsigned, m.Tombstone)
    stone = unsigned.model_copy(update={"key_id": kid})
    stone = stone.model_copy(
        update={"signature": base64.b64encode(key.sign(stone.signing_payload(SITE))).decode()}
    )
    for event in (head, stone):
        got = m.decode(EVENT_TOPIC, m.encode(event))
        assert isinstance(got, m.ChainHead | m.Tombstone)
        assert got.key_id == kid
        key.public_key().verify(base64.b64decode(got.signature), got.signing_payload(SITE))
        # bound to the site: the same signature does not hold for another site
        with pytest.raises(InvalidSignature):
            key.public_key().verify(
                base64.b64decode(got.signature), got.signing_payload("other-site")
            )


def test_signed_payloads_are_canonical_json() -> None:
    payload = json.loads(m.encode(samples()[11]))
    head = m.decode(EVENT_TOPIC, json.dumps(payload).encode())
    assert isinstance(head, m.ChainHead)
    body = head.signing_payload(SITE)
    assert body == json.dumps(
        json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode("ascii")
    assert json.loads(body)["type"] == "isocam.chain_head.v1"
    assert json.loads(body)["site"] == SITE


def test_key_id_is_a_prefix_of_the_public_keys_sha256() -> None:
    assert m.key_id_for(bytes(32)) == "66687aadf862bd77"
    with pytest.raises(ValueError, match="32 bytes"):
        m.key_id_for(bytes(31))


@pytest.mark.parametrize(
    ("payload", "rid"),
    [
        (b'{"v":1,"id":"req-7","command":"format_disk"}', "req-7"),
        (b'{"id":"req-8","ts":"yesterday"}', "req-8"),
        (b'{"id":"bad id with spaces"}', None),
        (b'{"id":7}', None),
        (b"[1,2]", None),
        (b"{", None),
        (b"\xff", None),
        (b"", None),
        (b"[" * 100_000, None),
    ],
)
def test_the_request_id_of_a_broken_command_is_salvaged_when_readable(
    payload: bytes, rid: str | None
) -> None:
    assert m.request_id_of(payload) == rid


# --- properties -------------------------------------------------------------------------------

ts = st.floats(min_value=m.TS_MIN, max_value=m.TS_MAX, exclude_max=True)
camera_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cc"]), min_size=1, max_size=200
).filter(lambda s: "\x7f" not in s)
details = text
counts = st.integers(0, 2**53 - 1)
seqs = st.integers(1, 2**53 - 1)
seconds = st.floats(0, 1e10)
offsets = st.floats(-1e10, 1e10)
versions = st.from_regex(r"\A[0-9A-Za-z][0-9A-Za-z.+_-]{0,20}\Z")
hexes = st.from_regex(r"\A[0-9a-f]{64}\Z")
sigs = st.binary(min_size=64, max_size=64).map(lambda b: base64.b64encode(b).decode())
key_ids = st.from_regex(r"\A[0-9a-f]{16}\Z")
metric_names = st.from_regex(r"\A[a-z][a-z0-9_]{0,31}\Z")
codes = st.from_regex(r"\A[a-z][a-z0-9_]{0,20}\Z")
hosts = st.sampled_from(["192.168.1.64", "cam.local", "[fe80::1]", "10.0.0.7:8554"])
paths = st.from_regex(r"\A[A-Za-z0-9/_.-]{0,40}\Z")
rtsp_urls = st.builds(lambda h, p: f"rtsp://{h}/{p}", hosts, paths)
thumbs = st.binary(max_size=300).map(lambda b: base64.b64encode(b"\xff\xd8\xff" + b).decode())
request_ids = st.from_regex(r"\A[A-Za-z0-9._:-]{1,64}\Z")
tokens = st.from_regex(r"\A[A-Za-z0-9_-]{22,100}\Z")


def opt(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


def lit(alias: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from(get_args(alias))


def event(model: type[m.EventBase], **fields: Any) -> st.SearchStrategy[Any]:
    """Events of `model`: any `seq` and `ts`, the other fields from `fields`."""
    return st.builds(model, seq=seqs, ts=ts, **fields)


def command(model: type[m.CommandBase], **fields: Any) -> st.SearchStrategy[Any]:
    """Commands of `model`: any `ts` and `id`, the other fields from `fields`."""
    return st.builds(model, ts=ts, id=request_ids, **fields)


profiles = st.builds(
    m.StreamProfile,
    token=st.sampled_from(["main", "sub", "Profile_1", "third"]),
    name=opt(text),
    codec=lit(m.Codec),
    width=st.integers(1, 16384),
    height=st.integers(1, 16384),
    fps=opt(st.floats(0, 1000)),
    bitrate_kbps=opt(st.floats(0, 1e7)),
    rtsp_url=opt(rtsp_urls),
)


@st.composite
def cameras(draw: st.DrawFn) -> m.CameraInfo:
    profs = draw(st.lists(profiles, max_size=3, unique_by=lambda p: p.token))
    tokens_ = [p.token for p in profs]
    return m.CameraInfo(
        id=draw(camera_ids),
        name=draw(opt(text)),
        onvif_url=draw(opt(st.builds(lambda h: f"http://{h}/onvif/device_service", hosts))),
        manufacturer=draw(opt(text)),
        model=draw(opt(text)),
        firmware=draw(opt(text)),
        serial=draw(opt(text)),
        hardware_id=draw(opt(text)),
        profiles=profs,
        record_profile=draw(opt(st.sampled_from(tokens_))) if tokens_ else None,
        live_profile=draw(opt(st.sampled_from(tokens_))) if tokens_ else None,
        state=draw(lit(m.CameraState)),
        clock_offset_s=draw(opt(offsets)),
    )


sites = st.builds(
    m.SiteInfo,
    name=opt(text),
    province=text,
    district=opt(text),
    kind=st.sampled_from(["facility", "checkpoint"]),
    authority=st.sampled_from(["health", "district", "military", "police", "other"]),
    operator=st.sampled_from(["vnpt", "viettel"]),
)
camera_healths = st.builds(
    m.CameraHealth,
    camera=camera_ids,
    connected=st.booleans(),
    recording=lit(m.RecordingState),
    last_packet_age_s=opt(seconds),
    fps=opt(st.floats(0, 1000)),
    bitrate_kbps=opt(st.floats(0, 1e7)),
    reconnects_1h=counts,
    gap_since=opt(ts),
    segment_write_lag_s=opt(seconds),
    image=opt(
        st.builds(
            m.ImageHealth,
            luma_mean=opt(st.floats(0, 255)),
            sharpness=opt(st.floats(0, 1e9)),
            motion=opt(st.floats(0, 255)),
            scene_diff=opt(st.floats(0, 1e9)),
            faults=st.lists(lit(m.ImageFault), max_size=5),
        )
    ),
    thumbnail_jpeg=opt(thumbs),
)
site_healths = st.builds(
    m.SiteHealth,
    disk_total_bytes=counts,
    disk_used_bytes=counts,
    disk_free_bytes=counts,
    forecast_days=opt(st.floats(0, 1e6)),
    cpu_percent=st.floats(0, 100),
    mem_total_bytes=counts,
    mem_used_bytes=counts,
    clock_offset_s=opt(offsets),
    agent_version=versions,
    uptime_s=seconds,
    spool_depth=counts,
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@st.composite
def gap_closed(draw: st.DrawFn) -> m.GapClosed:
    start, end = sorted((draw(ts), draw(ts)))
    return m.GapClosed(
        seq=draw(seqs),
        ts=draw(ts),
        camera=draw(camera_ids),
        start=start,
        end=end,
        cause=draw(lit(m.Cause)),
    )


@st.composite
def tombstones(draw: st.DrawFn) -> m.Tombstone:
    start, end = sorted((draw(ts), draw(ts)))
    first, last = sorted((draw(counts), draw(counts)))
    return m.Tombstone(
        seq=draw(seqs),
        ts=draw(ts),
        camera=draw(camera_ids),
        first_seq=first,
        last_seq=last,
        start=start,
        end=end,
        removed_rows=draw(counts),
        removed_bytes=draw(counts),
        prev_anchor=draw(hexes),
        last_row_hash=draw(hexes),
        reason=draw(lit(m.TombstoneReason)),
        created_at=draw(ts),
        missing_files=draw(counts),
        key_id=draw(key_ids),
        signature=draw(sigs),
    )


@st.composite
def legal_holds(draw: st.DrawFn) -> m.SetLegalHold:
    camera = draw(opt(camera_ids))
    return m.SetLegalHold(
        ts=draw(ts),
        id=draw(request_ids),
        args=m.SetLegalHoldArgs(
            camera=camera, all_cameras=camera is None, hold=draw(st.booleans()), reason=draw(text)
        ),
    )


@st.composite
def replies(draw: st.DrawFn) -> m.CommandReply:
    ok = draw(st.booleans())
    return m.CommandReply(
        ts=draw(ts),
        id=draw(request_ids),
        ok=ok,
        error=None if ok else m.ReplyError(code=draw(codes), message=draw(details)),
        result=draw(opt(st.dictionaries(st.text(max_size=8), json_values, max_size=4))),
    )


messages = st.one_of(
    st.builds(
        m.StateBirth,
        ts=ts,
        bdseq=counts,
        agent_version=versions,
        started=ts,
        last_seq=counts,
    ),
    st.builds(
        m.StateDeath,
        ts=ts,
        bdseq=counts,
        agent_version=versions,
        reason=st.sampled_from(["lost", "shutdown"]),
    ),
    st.builds(
        m.Inventory,
        ts=ts,
        site=sites,
        cameras=st.lists(cameras(), max_size=3, unique_by=lambda c: c.id),
    ),
    st.builds(m.Health, ts=ts, site=site_healths, cameras=st.lists(camera_healths, max_size=3)),
    event(m.CameraDown, camera=camera_ids, cause=lit(m.Cause), detail=opt(details)),
    event(m.CameraUp, camera=camera_ids, down_since=opt(ts)),
    event(m.GapOpened, camera=camera_ids, start=ts, cause=lit(m.Cause)),
    gap_closed(),
    event(
        m.ImageFaultEvent,
        camera=camera_ids,
        fault=lit(m.ImageFault),
        active=st.booleans(),
        measured=st.dictionaries(metric_names, st.floats(-1e12, 1e12), max_size=16),
    ),
    event(m.DiskEvent, level=lit(m.Level), free_bytes=counts, forecast_days=opt(st.floats(0, 1e6))),
    event(m.ClockEvent, level=lit(m.Level), offset_s=offsets, camera=opt(camera_ids)),
    event(
        m.ChainHead,
        camera=camera_ids,
        segment_seq=counts,
        row_hash=hexes,
        time=ts,
        key_id=key_ids,
        signature=sigs,
    ),
    tombstones(),
    event(
        m.RetentionEvent,
        camera=opt(camera_ids),
        retention_days=st.integers(1, 3650),
        legal_hold=st.booleans(),
        below_legal_minimum=st.booleans(),
        reason=opt(details),
    ),
    event(
        m.Alarm,
        code=codes,
        level=st.sampled_from(["warning", "critical"]),
        active=st.booleans(),
        message=details,
        camera=opt(camera_ids),
    ),
    event(
        m.AgentStarted,
        agent_version=versions,
        clean_shutdown=opt(st.booleans()),
        recovered=st.dictionaries(metric_names, counts, max_size=16),
    ),
    command(m.Rescan),
    command(
        m.Snapshot,
        args=st.builds(m.SnapshotArgs, camera=camera_ids, max_width=opt(st.integers(16, 3840))),
    ),
    command(
        m.OpenTunnel,
        args=st.builds(
            m.OpenTunnelArgs,
            hub_url=st.sampled_from(["wss://hub.example.vn/t", "ws://127.0.0.1:9000/t"]),
            token=tokens,
            camera=camera_ids,
            purpose=lit(m.Purpose),
            expires=ts,
        ),
    ),
    legal_holds(),
    replies(),
)

_PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROPERTY
@given(messages)
def test_random_valid_messages_round_trip(msg: m.Message) -> None:
    payload = m.encode(msg)
    decoded = m.decode(topic(SITE, msg.TOPIC_KIND), payload)
    assert decoded == msg
    assert m.encode(decoded) == payload


@_PROPERTY
@given(st.binary(max_size=2048), st.sampled_from(list(Kind)))
def test_random_bytes_never_raise_anything_but_message_error(payload: bytes, kind: Kind) -> None:
    try:
        m.decode(topic(SITE, kind), payload)
    except m.MessageError as exc:
        assert exc.reason in m.REASONS


@_PROPERTY
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | st.text(max_size=20)
        | st.sampled_from(["camera_down", "birth", "rescan", "cam-01", "stall"]),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(["v", "ts", "seq", "kind", "command", "camera", "args", "id", "x"]),
                inner,
                max_size=6,
            )
        ),
        max_leaves=20,
    ),
    st.sampled_from(list(Kind)),
)
def test_random_json_never_raises_anything_but_message_error(value: Any, kind: Kind) -> None:
    payload = json.dumps(value).encode()  # may contain NaN/Infinity tokens: bad_json
    try:
        m.decode(topic(SITE, kind), payload)
    except m.MessageError as exc:
        assert exc.reason in m.REASONS


@_PROPERTY
@given(messages, st.data())
def test_mutated_valid_messages_decode_or_raise_only_message_error(
    msg: m.Message, data: st.DataObject
) -> None:
    payload = bytearray(m.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        op = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if op == "flip":
            payload[i] = data.draw(st.integers(0, 255))
        elif op == "delete":
            del payload[i]
        else:
            payload.insert(i, data.draw(st.integers(0, 255)))
    try:
        got = m.decode(topic(SITE, msg.TOPIC_KIND), bytes(payload))
    except m.MessageError as exc:
        assert exc.reason in m.REASONS
    else:
        assert isinstance(got, m.Message)


@_PROPERTY
@given(st.text(max_size=80), st.binary(max_size=64))
def test_random_topics_never_raise_anything_but_message_error(name: str, payload: bytes) -> None:
    try:
        m.decode(name, payload)
    except m.MessageError as exc:
        assert exc.reason in m.REASONS


def test_floats_survive_the_trip_exactly() -> None:
    for value in (m.TS_MIN, math.nextafter(m.TS_MAX, 0), 1_719_800_000.123456, 1.7e9 + 1e-6):
        msg = m.CameraUp(seq=1, ts=value, camera="c")
        got = m.decode(EVENT_TOPIC, m.encode(msg))
        assert got.ts == value
