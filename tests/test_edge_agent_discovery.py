"""WS-Discovery: the lenient parser (fuzzed), and the probe and listener on a real network.

The network tests build two network namespaces joined by a veth pair (10.231.9.1 "camera",
10.231.9.2 "box"); nothing is sent anywhere else. A small responder written here plays the
camera: it answers Probes with a ProbeMatch plus junk, and sends Hello/Bye on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import struct
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from devstack.netns import NetnsUnavailable, VethPair, inside_netns, veth_pair
from edge_agent import discovery
from edge_agent.discovery import (
    MAX_MESSAGE_BYTES,
    NETWORK_VIDEO_TRANSMITTER,
    NS_DN,
    WSD_GROUP,
    WSD_PORT,
    Bye,
    DiscoveryError,
    DiscoveryEvent,
    DiscoveryListener,
    Hello,
    ProbeMatch,
    build_probe,
    default_interfaces,
    local_ipv4_interfaces,
    parse_wsd_message,
    probe,
    resolve_interfaces,
)

CAMERA_IP = "10.231.9.1"
BOX_IP = "10.231.9.2"

# --- three vendor-like message variants ------------------------------------------------------


def hik_like(relates_to: str, endpoint: str, ip: str, name: str = "HIKVISION DS-2CD2143") -> bytes:
    """env/wsadis/d prefixes, urn:uuid ids, scopes one per line, two location scopes."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope"
  xmlns:wsadis="http://schemas.xmlsoap.org/ws/2004/08/addressing"
  xmlns:d="http://schemas.xmlsoap.org/ws/2005/04/discovery"
  xmlns:dn="http://www.onvif.org/ver10/network/wsdl">
<env:Header>
  <wsadis:MessageID>urn:uuid:{uuid.uuid4()}</wsadis:MessageID>
  <wsadis:RelatesTo>{relates_to}</wsadis:RelatesTo>
  <wsadis:To>http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous</wsadis:To>
  <wsadis:Action>http://schemas.xmlsoap.org/ws/2005/04/discovery/ProbeMatches</wsadis:Action>
  <d:AppSequence InstanceId="1700000000" MessageNumber="3"/>
</env:Header>
<env:Body>
  <d:ProbeMatches>
    <d:ProbeMatch>
      <wsadis:EndpointReference>
        <wsadis:Address>{endpoint}</wsadis:Address>
      </wsadis:EndpointReference>
      <d:Types>dn:NetworkVideoTransmitter</d:Types>
      <d:Scopes>
        onvif://www.onvif.org/type/video_encoder
        onvif://www.onvif.org/Profile/Streaming
        onvif://www.onvif.org/hardware/DS-2CD2143G0-I
        onvif://www.onvif.org/name/{quote(name)}
        onvif://www.onvif.org/location/country/vietnam
        onvif://www.onvif.org/location/city/ho%20chi%20minh
      </d:Scopes>
      <d:XAddrs>http://{ip}/onvif/device_service</d:XAddrs>
      <d:MetadataVersion>10</d:MetadataVersion>
    </d:ProbeMatch>
  </d:ProbeMatches>
</env:Body>
</env:Envelope>""".encode()


def axis_like(relates_to: str, endpoint: str, ip: str) -> bytes:
    """SOAP-ENV/wsa/wsdd prefixes, "uuid:" without "urn:", two XAddrs, tabs in lists."""
    bare = relates_to.removeprefix("urn:")
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<SOAP-ENV:Envelope xmlns:SOAP-ENV="http://www.w3.org/2003/05/soap-envelope" '
        'xmlns:wsa="http://schemas.xmlsoap.org/ws/2004/08/addressing" '
        'xmlns:wsdd="http://schemas.xmlsoap.org/ws/2005/04/discovery" '
        'xmlns:tdn="http://www.onvif.org/ver10/network/wsdl" '
        'xmlns:tds="http://www.onvif.org/ver10/device/wsdl">'
        "<SOAP-ENV:Header>"
        f"<wsa:MessageID>uuid:{uuid.uuid4()}</wsa:MessageID>"
        f"<wsa:RelatesTo>{bare}</wsa:RelatesTo>"
        "<wsa:Action>http://schemas.xmlsoap.org/ws/2005/04/discovery/ProbeMatches</wsa:Action>"
        "</SOAP-ENV:Header><SOAP-ENV:Body><wsdd:ProbeMatches><wsdd:ProbeMatch>"
        f"<wsa:EndpointReference><wsa:Address>{endpoint}</wsa:Address></wsa:EndpointReference>"
        "<wsdd:Types>tdn:NetworkVideoTransmitter\ttds:Device</wsdd:Types>"
        "<wsdd:Scopes>onvif://www.onvif.org/Profile/T\t\tonvif://www.onvif.org/name/Camera%20"
        "C%E1%BB%95ng  onvif://www.onvif.org/hardware/P3245-LV"
        "</wsdd:Scopes>"
        f"<wsdd:XAddrs>http://{ip}:80/onvif/device_service  "
        "http://[fe80::40:8cff:fe00:1]/onvif/device_service</wsdd:XAddrs>"
        "<wsdd:MetadataVersion>1</wsdd:MetadataVersion>"
        "</wsdd:ProbeMatch></wsdd:ProbeMatches></SOAP-ENV:Body></SOAP-ENV:Envelope>"
    ).encode()


def dahua_like(relates_to: str, endpoint: str, ip: str) -> bytes:
    """Default namespaces, WS-Addressing 2005/08, no Types and no MetadataVersion."""
    return f"""<?xml version="1.0" encoding="utf-8"?>
<Envelope xmlns="http://www.w3.org/2003/05/soap-envelope">
 <Header>
  <MessageID xmlns="http://www.w3.org/2005/08/addressing">uuid:{uuid.uuid4()}</MessageID>
  <RelatesTo xmlns="http://www.w3.org/2005/08/addressing">  {relates_to}  </RelatesTo>
 </Header>
 <Body>
  <ProbeMatches xmlns="http://schemas.xmlsoap.org/ws/2005/04/discovery">
   <ProbeMatch>
    <EndpointReference xmlns="http://www.w3.org/2005/08/addressing">
     <Address>
        {endpoint}
     </Address>
    </EndpointReference>
    <Scopes>onvif://www.onvif.org/NAME/IPC onvif://www.onvif.org/Hardware/IPC-HDW</Scopes>
    <XAddrs>http://{ip}:8080/onvif/device_service not-a-url ftp://{ip}/x</XAddrs>
   </ProbeMatch>
  </ProbeMatches>
 </Body>
</Envelope>""".encode()


VARIANTS: dict[str, Callable[[str, str, str], bytes]] = {
    "hik": hik_like,
    "axis": axis_like,
    "dahua": dahua_like,
}


def hello(endpoint: str, ip: str, message_id: str | None = None, kind: str = "Hello") -> bytes:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"
 xmlns:a="http://schemas.xmlsoap.org/ws/2004/08/addressing"
 xmlns:d="http://schemas.xmlsoap.org/ws/2005/04/discovery"
 xmlns:dn="http://www.onvif.org/ver10/network/wsdl">
<s:Header>
 <a:Action>http://schemas.xmlsoap.org/ws/2005/04/discovery/{kind}</a:Action>
 <a:MessageID>{message_id or f"urn:uuid:{uuid.uuid4()}"}</a:MessageID>
 <a:To>urn:schemas-xmlsoap-org:ws:2005:04:discovery</a:To>
</s:Header>
<s:Body><d:{kind}>
 <a:EndpointReference><a:Address>{endpoint}</a:Address></a:EndpointReference>
 <d:Types>dn:NetworkVideoTransmitter</d:Types>
 <d:Scopes>onvif://www.onvif.org/name/Late%20Camera onvif://www.onvif.org/hardware/LC1</d:Scopes>
 <d:XAddrs>http://{ip}/onvif/device_service</d:XAddrs>
 <d:MetadataVersion>2</d:MetadataVersion>
</d:{kind}></s:Body></s:Envelope>""".encode()


#: Junk a LAN can produce, and the reason each one must be rejected for.
JUNK: dict[str, bytes] = {
    "empty": b"   \n",
    "malformed_xml": b"<s:Envelope><s:Body><d:ProbeMatches>",
    "not_soap": b'<?xml version="1.0"?><html><body>hello</body></html>',
    "oversized": b"<a>" + b"x" * (MAX_MESSAGE_BYTES + 1000) + b"</a>",
    "dtd_forbidden": (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]><lolz>&lol2;</lolz>'
    ),
    "other_message": build_probe("urn:uuid:00000000-0000-0000-0000-000000000000"),
    "missing_endpoint": hik_like("urn:uuid:x", "", "10.0.0.1"),
}
NON_XML_JUNK = [b"\x00\xff\xfe garbage \x80", b'{"json": "not xml"}', os.urandom(512)]


def test_parses_our_own_probe_as_a_probe_for_network_video_transmitters() -> None:
    message_id = f"urn:uuid:{uuid.uuid4()}"
    root = etree.fromstring(build_probe(message_id))
    (types,) = root.iter("{http://schemas.xmlsoap.org/ws/2005/04/discovery}Types")
    prefix, local = types.text.split(":")
    assert (types.nsmap[prefix], local) == (NS_DN, "NetworkVideoTransmitter")
    assert NS_DN == "http://www.onvif.org/ver10/network/wsdl"
    (mid,) = root.iter("{http://schemas.xmlsoap.org/ws/2004/08/addressing}MessageID")
    assert mid.text == message_id
    assert parse_wsd_message(build_probe(message_id)) is None  # a Probe is not an answer


# --- parsing ---------------------------------------------------------------------------------


def test_parses_hik_like_probe_match() -> None:
    msg = parse_wsd_message(hik_like("urn:uuid:abc", "urn:uuid:cam-1", "10.0.0.5", "Cổng chính"))
    assert isinstance(msg, ProbeMatch)
    assert msg.relates_to == "urn:uuid:abc" and msg.message_id.startswith("urn:uuid:")
    (target,) = msg.targets
    assert target.endpoint == "urn:uuid:cam-1"
    assert target.types == (NETWORK_VIDEO_TRANSMITTER,) and target.is_video_transmitter
    assert target.name == "Cổng chính"
    assert target.hardware == "DS-2CD2143G0-I"
    assert target.location == "country/vietnam, city/ho chi minh"
    assert target.profiles == ("Streaming",)
    assert target.xaddrs == ("http://10.0.0.5/onvif/device_service",)
    assert target.metadata_version == 10
    assert len(target.scopes) == 6


def test_parses_axis_like_probe_match() -> None:
    msg = parse_wsd_message(axis_like("urn:uuid:abc", "urn:uuid:cam-2", "10.0.0.6"))
    assert isinstance(msg, ProbeMatch)
    assert msg.relates_to == "uuid:abc"
    (target,) = msg.targets
    assert target.types == (
        NETWORK_VIDEO_TRANSMITTER,
        "{http://www.onvif.org/ver10/device/wsdl}Device",
    )
    assert target.name == "Camera Cổng" and target.hardware == "P3245-LV"
    assert target.profiles == ("T",) and target.location is None
    assert target.xaddrs == (
        "http://10.0.0.6:80/onvif/device_service",
        "http://[fe80::40:8cff:fe00:1]/onvif/device_service",
    )


def test_parses_dahua_like_probe_match_with_missing_optional_fields() -> None:
    msg = parse_wsd_message(dahua_like("urn:uuid:abc", "urn:uuid:cam-3", "10.0.0.7"))
    assert isinstance(msg, ProbeMatch)
    assert msg.relates_to == "urn:uuid:abc"  # surrounding whitespace stripped
    (target,) = msg.targets
    assert target.endpoint == "urn:uuid:cam-3"
    assert target.types == () and not target.is_video_transmitter
    assert target.metadata_version is None
    assert target.name == "IPC" and target.hardware == "IPC-HDW"  # scope kinds in any case
    assert target.xaddrs == ("http://10.0.0.7:8080/onvif/device_service",)  # junk URLs dropped


def test_onvif_addresses_come_from_xaddrs_ipv4_first() -> None:
    msg = parse_wsd_message(axis_like("urn:uuid:abc", "urn:uuid:cam-2", "10.0.0.6"))
    assert isinstance(msg, ProbeMatch)
    device = discovery._device(msg.targets[0], "10.0.0.6", "10.0.0.1")
    assert device.onvif_addresses() == [("10.0.0.6", 80), ("fe80::40:8cff:fe00:1", 80)]


def test_probe_matches_with_several_targets_keeps_only_those_with_an_endpoint() -> None:
    text = hik_like("urn:uuid:abc", "urn:uuid:one", "10.0.0.5").decode()
    match = re.search(r"<d:ProbeMatch>.*</d:ProbeMatch>", text, re.S)
    assert match is not None
    second = match.group(0).replace("urn:uuid:one", "urn:uuid:two")
    empty = match.group(0).replace("urn:uuid:one", "")
    text = text.replace("</d:ProbeMatches>", second + empty + "</d:ProbeMatches>")
    msg = parse_wsd_message(text.encode())
    assert isinstance(msg, ProbeMatch)
    assert [t.endpoint for t in msg.targets] == ["urn:uuid:one", "urn:uuid:two"]


def test_parses_hello_and_bye() -> None:
    msg = parse_wsd_message(hello("urn:uuid:late", "10.0.0.9", "urn:uuid:m1"))
    assert isinstance(msg, Hello)
    assert msg.message_id == "urn:uuid:m1"
    assert msg.target.name == "Late Camera" and msg.target.metadata_version == 2
    bye = parse_wsd_message(hello("urn:uuid:late", "10.0.0.9", kind="Bye"))
    assert isinstance(bye, Bye) and bye.target.endpoint == "urn:uuid:late"


def test_control_characters_in_names_are_removed() -> None:
    msg = parse_wsd_message(hik_like("urn:uuid:a", "urn:uuid:b", "10.0.0.5", "evil\x1b[31m\nname"))
    assert isinstance(msg, ProbeMatch)
    assert msg.targets[0].name == "evil[31mname"


@pytest.mark.parametrize("reason", sorted(JUNK))
def test_junk_is_rejected_and_counted_by_reason(reason: str) -> None:
    before = discovery.rejected_messages[reason]
    assert parse_wsd_message(JUNK[reason]) is None
    assert discovery.rejected_messages[reason] == before + 1


def test_non_xml_junk_is_rejected() -> None:
    for junk in NON_XML_JUNK:
        assert parse_wsd_message(junk) is None


def test_a_message_one_byte_over_the_limit_is_not_parsed() -> None:
    valid = hik_like("urn:uuid:a", "urn:uuid:b", "10.0.0.5")
    padded = valid.replace(b"<env:Body>", b"<env:Body>" + b" " * (MAX_MESSAGE_BYTES - len(valid)))
    assert len(padded) == MAX_MESSAGE_BYTES
    assert isinstance(parse_wsd_message(padded), ProbeMatch)
    assert parse_wsd_message(padded.replace(b"<env:Body>", b"<env:Body> ")) is None


def test_entities_are_never_expanded_even_when_the_doctype_hides_in_utf16() -> None:
    # the byte-level DOCTYPE check cannot see UTF-16; the parser settings must still hold
    bomb = (
        '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE e [<!ENTITY a "aaaaaaaaaa">'
        '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]>'
        "<Envelope><Body><Hello><EndpointReference><Address>&c;</Address>"
        "</EndpointReference></Hello></Body></Envelope>"
    ).encode("utf-16")
    before = discovery.rejected_messages["dtd_forbidden"]
    assert parse_wsd_message(bomb) is None
    assert discovery.rejected_messages["dtd_forbidden"] == before + 1


def test_external_entities_are_never_read() -> None:
    xxe = (
        '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE e [<!ENTITY x SYSTEM '
        '"file:///etc/hostname">]><Envelope><Body><Hello><EndpointReference><Address>&x;'
        "</Address></EndpointReference></Hello></Body></Envelope>"
    ).encode("utf-16")
    assert parse_wsd_message(xxe) is None


def test_parser_never_raises_on_non_bytes() -> None:
    before = discovery.rejected_messages["parser_error"]
    assert parse_wsd_message("not bytes") is None  # type: ignore[arg-type]
    assert discovery.rejected_messages["parser_error"] == before + 1


# --- fuzzing ---------------------------------------------------------------------------------

_ALLOWED = (ProbeMatch, Hello, Bye, type(None))


def _check_result(result: object) -> None:
    assert isinstance(result, _ALLOWED)
    targets = (
        result.targets
        if isinstance(result, ProbeMatch)
        else (result.target,)
        if isinstance(result, (Hello, Bye))
        else ()
    )
    for target in targets:
        assert target.endpoint and target.endpoint == target.endpoint.strip()
        assert all(x.startswith(("http://", "https://")) for x in target.xaddrs)
        for text in (target.name, target.hardware, target.location):
            assert text is None or not re.search(r"[\x00-\x1f]", text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes_never_raise(data: bytes) -> None:
    _check_result(parse_wsd_message(data))


_TAGS = [
    "Envelope", "Header", "Body", "ProbeMatches", "ProbeMatch", "Hello", "Bye",
    "EndpointReference", "Address", "Types", "Scopes", "XAddrs", "MetadataVersion",
    "MessageID", "RelatesTo", "Action", "Junk",
]  # fmt: skip
_NAMESPACES = [
    None,
    "http://www.w3.org/2003/05/soap-envelope",
    "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "http://schemas.xmlsoap.org/ws/2005/04/discovery",
    "urn:other",
]
_XML_TEXT = st.text(
    alphabet=st.one_of(
        st.characters(min_codepoint=0x20, max_codepoint=0xD7FF), st.sampled_from("\n\t ")
    ),
    max_size=40,
) | st.sampled_from(
    [
        "http://10.0.0.5/onvif/device_service",
        "urn:uuid:1234",
        "onvif://www.onvif.org/name/A%20B onvif://www.onvif.org/location/x",
        "dn:NetworkVideoTransmitter",
        "42",
    ]
)


@dataclass
class _Node:
    tag: str
    namespace: str | None
    text: str
    children: list[_Node]

    def build(self) -> etree._Element:
        element = etree.Element(f"{{{self.namespace}}}{self.tag}" if self.namespace else self.tag)
        element.text = self.text
        element.extend(child.build() for child in self.children)
        return element


_NODES = st.recursive(
    st.builds(_Node, st.sampled_from(_TAGS), st.sampled_from(_NAMESPACES), _XML_TEXT, st.just([])),
    lambda children: st.builds(
        _Node,
        st.sampled_from(_TAGS),
        st.sampled_from(_NAMESPACES),
        _XML_TEXT,
        st.lists(children, max_size=4),
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=_NODES, payload=_NODES)
def test_fuzz_random_xml_in_a_soap_envelope_never_raises(header: _Node, payload: _Node) -> None:
    envelope = _Node(
        "Envelope",
        _NAMESPACES[1],
        "",
        [
            _Node("Header", _NAMESPACES[1], "", [header]),
            _Node("Body", _NAMESPACES[1], "", [payload]),
        ],
    )
    _check_result(parse_wsd_message(etree.tostring(envelope.build())))
    _check_result(parse_wsd_message(etree.tostring(payload.build())))


_MUTATION = st.tuples(
    st.sampled_from(["flip", "delete", "insert", "truncate", "duplicate"]),
    st.integers(min_value=0, max_value=1 << 20),
    st.binary(min_size=1, max_size=24),
)


def _mutate(data: bytes, mutations: list[tuple[str, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for op, where, blob in mutations:
        if not buf:
            break
        at = where % len(buf)
        if op == "flip":
            buf[at] ^= blob[0] or 1
        elif op == "delete":
            del buf[at : at + len(blob)]
        elif op == "insert":
            buf[at:at] = blob
        elif op == "truncate":
            del buf[at:]
        else:
            buf[at:at] = buf[at : at + 64]
    return bytes(buf)


@settings(max_examples=400, deadline=None)
@given(variant=st.sampled_from(sorted(VARIANTS)), mutations=st.lists(_MUTATION, max_size=6))
def test_fuzz_mutated_vendor_probe_matches_never_raise(
    variant: str, mutations: list[tuple[str, int, bytes]]
) -> None:
    original = VARIANTS[variant]("urn:uuid:probe", "urn:uuid:cam", "10.0.0.5")
    result = parse_wsd_message(_mutate(original, mutations))
    _check_result(result)
    if not mutations:
        assert isinstance(result, ProbeMatch)


@settings(max_examples=200, deadline=None)
@given(
    name=st.text(
        alphabet=st.characters(
            min_codepoint=0x20, max_codepoint=0x2FFF, blacklist_categories=("Cs",)
        ),
        min_size=1,
        max_size=80,
    )
)
def test_fuzz_percent_encoded_names_decode_to_the_original(name: str) -> None:
    msg = parse_wsd_message(hik_like("urn:uuid:p", "urn:uuid:c", "10.0.0.5", name))
    assert isinstance(msg, ProbeMatch)
    assert msg.targets[0].name == re.sub(r"[\x7f-\x9f]", "", name)


# --- argument checks (no network) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("interfaces", "message"),
    [
        ([], "name at least one local IPv4 address"),
        ("10.0.0.1", "a list of IPv4 addresses, not one string"),
        (["eth0"], "'eth0' is not an IPv4 address (resolve interface names first)"),
        (["0.0.0.0"], "0.0.0.0 cannot name an interface"),
        ([WSD_GROUP], f"{WSD_GROUP} cannot name an interface"),
    ],
)
async def test_probe_requires_explicit_interface_addresses(
    interfaces: list[str], message: str
) -> None:
    with pytest.raises(DiscoveryError, match=re.escape(message)):
        await probe(interfaces, timeout=0.5)
    with pytest.raises(DiscoveryError, match=re.escape(message)):
        DiscoveryListener(interfaces)


async def test_probe_from_an_address_this_host_lacks_fails_before_sending() -> None:
    # 10.231.9.2 exists only inside the test namespaces, never in this one
    with pytest.raises(DiscoveryError, match=r"cannot use 10\.231\.9\.2 for discovery"):
        await probe([BOX_IP], timeout=0.5)


def test_resolve_interfaces_maps_names_and_refuses_unknown_ones() -> None:
    assert resolve_interfaces(["lo", "127.0.0.5"]) == ["127.0.0.1", "127.0.0.5"]
    with pytest.raises(DiscoveryError, match="no interface named 'nope0'"):
        resolve_interfaces(["nope0"])


# --- the network: two namespaces joined by a veth pair ---------------------------------------


@pytest.fixture(scope="module")
def veth() -> Iterator[VethPair]:
    """Two fresh namespaces, 10.231.9.1/24 and 10.231.9.2/24 on a veth pair between them."""
    try:
        with veth_pair(CAMERA_IP, BOX_IP) as pair:
            yield pair
    except NetnsUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


_IP_RECVTTL = 12  # Linux, not exported by Python 3.11's socket module
_IP_TTL = 2


class CameraResponder(threading.Thread):
    """Plays a camera in the camera namespace: answers each Probe with junk, an unrelated
    ProbeMatch, two vendor-style ProbeMatches (one twice) and records what it received."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.stop = threading.Event()
        #: (payload, source address, TTL) of each Probe received
        self.probes: list[tuple[bytes, str, int | None]] = []
        self.got_probe = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                data, ancillary, _, source = self.sock.recvmsg(65535, socket.CMSG_SPACE(4))
            except TimeoutError:
                continue
            except OSError:
                return
            found = re.search(rb"MessageID>([^<]+)<", data)
            if found is None or b"<d:Probe>" not in data:
                continue  # only Probes get an answer
            ttl = next(
                (
                    struct.unpack("i", cdata[:4])[0]
                    for level, kind, cdata in ancillary
                    if level == socket.IPPROTO_IP and kind == _IP_TTL
                ),
                None,
            )
            self.probes.append((data, source[0], ttl))
            self.answer(found.group(1).decode(), source)
            self.got_probe.set()

    def answer(self, message_id: str, to: tuple[str, int]) -> None:
        for junk in [*JUNK.values(), *NON_XML_JUNK]:
            self.sock.sendto(junk, to)
        self.sock.sendto(hik_like("urn:uuid:someone-else", "urn:uuid:stranger", CAMERA_IP), to)
        first = hik_like(message_id, "urn:uuid:cam-hik", CAMERA_IP, "Cổng chính")
        self.sock.sendto(first, to)
        self.sock.sendto(first, to)  # cameras answer each repetition of the Probe
        self.sock.sendto(axis_like(message_id, "urn:uuid:cam-axis", CAMERA_IP), to)

    def send_to_group(self, payload: bytes) -> None:
        self.sock.sendto(payload, (WSD_GROUP, WSD_PORT))


@pytest.fixture
def camera(veth: VethPair) -> Iterator[CameraResponder]:
    with inside_netns(veth.camera_ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IP, _IP_RECVTTL, 1)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(CAMERA_IP))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
    sock.bind(("0.0.0.0", WSD_PORT))  # all addresses of the camera namespace only
    sock.setsockopt(
        socket.IPPROTO_IP,
        socket.IP_ADD_MEMBERSHIP,
        socket.inet_aton(WSD_GROUP) + socket.inet_aton(CAMERA_IP),
    )
    sock.settimeout(0.1)
    responder = CameraResponder(sock)
    responder.start()
    try:
        yield responder
    finally:
        responder.stop.set()
        responder.join(timeout=5)
        sock.close()


async def test_probe_finds_the_camera_across_the_veth_and_ignores_junk(
    veth: VethPair, camera: CameraResponder
) -> None:
    before = Counter(discovery.rejected_messages)
    with inside_netns(veth.box_ns):
        devices = await probe([BOX_IP], timeout=1.5)

    by_endpoint = {d.endpoint: d for d in devices}
    assert sorted(by_endpoint) == ["urn:uuid:cam-axis", "urn:uuid:cam-hik"]
    hik = by_endpoint["urn:uuid:cam-hik"]
    assert hik.name == "Cổng chính" and hik.hardware == "DS-2CD2143G0-I"
    assert hik.xaddrs == (f"http://{CAMERA_IP}/onvif/device_service",)
    assert hik.source == CAMERA_IP and hik.interface == BOX_IP
    assert hik.onvif_addresses() == [(CAMERA_IP, 80)]
    assert by_endpoint["urn:uuid:cam-axis"].is_video_transmitter

    # what went on the wire: our Probe, from the named address, with TTL 1, repeated
    assert camera.probes, "the camera never saw a Probe"
    ids: set[bytes] = set()
    for payload, source, ttl in camera.probes:
        assert source == BOX_IP
        assert ttl == 1
        found = re.search(rb"MessageID>([^<]+)<", payload)
        assert found is not None
        ids.add(found.group(1))
        assert b"<d:Types>dn:NetworkVideoTransmitter</d:Types>" in payload
    assert len(ids) == 1, "a repeated Probe must keep its MessageID"

    rejected = Counter(discovery.rejected_messages)
    rejected.subtract(before)
    for reason in [*JUNK, "unrelated_reply"]:
        assert rejected[reason] >= 1, (reason, rejected)


async def test_listener_reports_a_hello_sent_later_and_then_a_bye(
    veth: VethPair, camera: CameraResponder
) -> None:
    with inside_netns(veth.box_ns):
        listener = DiscoveryListener([BOX_IP])
        await listener.start()
    try:
        for junk in [*JUNK.values(), *NON_XML_JUNK]:
            camera.send_to_group(junk)
        camera.send_to_group(hik_like("urn:uuid:x", "urn:uuid:stray-match", CAMERA_IP))
        announcement = hello("urn:uuid:late-cam", CAMERA_IP, "urn:uuid:hello-1")
        camera.send_to_group(announcement)
        camera.send_to_group(announcement)  # SOAP-over-UDP repeats with the same MessageID

        event = await asyncio.wait_for(anext(listener), timeout=5)
        assert event.kind == "hello"
        assert event.device.endpoint == "urn:uuid:late-cam"
        assert event.device.name == "Late Camera"
        assert event.device.xaddrs == (f"http://{CAMERA_IP}/onvif/device_service",)
        assert event.device.source == CAMERA_IP and event.device.interface == BOX_IP

        camera.send_to_group(hello("urn:uuid:late-cam", CAMERA_IP, kind="Bye"))
        event = await asyncio.wait_for(anext(listener), timeout=5)
        # the repeated Hello was dropped: the next event is the Bye
        assert (event.kind, event.device.endpoint) == ("bye", "urn:uuid:late-cam")
        assert listener.rejected["probe_match_on_group"] == 1
        assert listener.rejected["unparsable"] >= len(JUNK) - 1 + len(NON_XML_JUNK)
    finally:
        await listener.close()
    with pytest.raises(StopAsyncIteration):
        await anext(listener)


async def test_listener_hands_events_to_a_callback(veth: VethPair, camera: CameraResponder) -> None:
    events: list[DiscoveryEvent] = []
    arrived = asyncio.Event()

    def on_event(event: DiscoveryEvent) -> None:
        events.append(event)
        arrived.set()

    with inside_netns(veth.box_ns):
        listener = DiscoveryListener([BOX_IP], callback=on_event)
    async with contextlib.AsyncExitStack() as stack:
        with inside_netns(veth.box_ns):
            await stack.enter_async_context(listener)
        camera.send_to_group(hello("urn:uuid:cb-cam", CAMERA_IP))
        await asyncio.wait_for(arrived.wait(), timeout=5)
    assert [(e.kind, e.device.endpoint) for e in events] == [("hello", "urn:uuid:cb-cam")]


def test_local_interfaces_are_listed_per_namespace(veth: VethPair) -> None:
    with inside_netns(veth.box_ns):
        interfaces = {i.name: i for i in local_ipv4_interfaces()}
        defaults = default_interfaces()
        resolved = resolve_interfaces([veth.box_if])
    box = interfaces[veth.box_if]
    assert (box.address, box.up, box.loopback, box.multicast) == (BOX_IP, True, False, True)
    assert interfaces["lo"].loopback
    assert defaults == [BOX_IP]  # loopback is never a default
    assert resolved == [BOX_IP]
