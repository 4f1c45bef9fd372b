"""WS-Discovery responder for a fleet of virtual cameras (WS-Discovery 2005/04, as ONVIF uses it).

One UDP socket joined to 239.255.255.250:3702 on one interface answers Probes for every
reachable camera (one ProbeMatches message per camera, as separate devices would send), and
announces cameras with Hello/Bye. Multicast leaves only through the given interface, with
TTL 1: the simulator must never talk to a real LAN by accident.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from lxml import etree
from lxml.builder import ElementMaker

from simulator.camera import VirtualCamera
from simulator.onvif_service import DEVICE_NS, onvif_scopes

_log = logging.getLogger(__name__)

MULTICAST_GROUP = "239.255.255.250"
PORT = 3702
SOAP_NS = "http://www.w3.org/2003/05/soap-envelope"
WSD_NS = "http://schemas.xmlsoap.org/ws/2005/04/discovery"
WSA_NS = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
NVT_NS = "http://www.onvif.org/ver10/network/wsdl"
TO_DISCOVERY = "urn:schemas-xmlsoap-org:ws:2005:04:discovery"
ANONYMOUS = f"{WSA_NS}/role/anonymous"
MATCH_RFC2396 = f"{WSD_NS}/rfc2396"  # the default MatchBy of WS-Discovery 2005/04 §5.1
MATCH_STRCMP0 = f"{WSD_NS}/strcmp0"

#: The types every ONVIF camera announces (ONVIF Core §7.3.1: NVT device type and tds:Device).
CAMERA_TYPES = ((NVT_NS, "NetworkVideoTransmitter"), (DEVICE_NS, "Device"))
#: A Probe is well under 2 KiB; anything far bigger is junk, not worth parsing.
MAX_DATAGRAM = 32 * 1024
#: linux/in.h; with 0 the socket gets only the groups *it* joined, on the interface it joined
#: them, instead of every group any socket on the host joined.
_IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)

_NSMAP = {"s": SOAP_NS, "a": WSA_NS, "d": WSD_NS, "dn": NVT_NS, "tds": DEVICE_NS}
_S = ElementMaker(namespace=SOAP_NS, nsmap=_NSMAP)
_A = ElementMaker(namespace=WSA_NS, nsmap=_NSMAP)
_D = ElementMaker(namespace=WSD_NS, nsmap=_NSMAP)
_PARSER = etree.XMLParser(
    resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_comments=True
)


@dataclass
class Probe:
    """What a Probe asks: its MessageID, the types (namespace, name) and scopes it wants."""

    message_id: str
    types: list[tuple[str | None, str]] = field(default_factory=list)
    scopes: list[str] = field(default_factory=list)
    match_by: str = MATCH_RFC2396


def parse_probe(data: bytes) -> Probe | None:
    """The Probe in a datagram, or None for anything else (other messages, junk).

    Lenient about prefixes and whitespace, strict about namespaces: a WS-Discovery 1.1
    (2009/01) Probe is not answered, as by ONVIF cameras.
    """
    if len(data) > MAX_DATAGRAM:
        return None
    try:
        root = etree.fromstring(data, _PARSER)
    except (etree.XMLSyntaxError, ValueError):
        return None
    if root.tag != f"{{{SOAP_NS}}}Envelope":
        return None
    probe = root.find(f"{{{SOAP_NS}}}Body/{{{WSD_NS}}}Probe")
    if probe is None:
        return None
    message_id = (root.findtext(f"{{{SOAP_NS}}}Header/{{{WSA_NS}}}MessageID") or "").strip()
    result = Probe(message_id=message_id)
    types_el = probe.find(f"{{{WSD_NS}}}Types")
    if types_el is not None and types_el.text:
        for name in types_el.text.split():
            prefix, _, local = name.rpartition(":")
            result.types.append((types_el.nsmap.get(prefix or None), local))
    scopes_el = probe.find(f"{{{WSD_NS}}}Scopes")
    if scopes_el is not None:
        result.scopes = (scopes_el.text or "").split()
        result.match_by = scopes_el.get("MatchBy", MATCH_RFC2396).strip()
    return result


def _scope_matches(wanted: str, offered: str, match_by: str) -> bool:
    if match_by == MATCH_STRCMP0:
        return wanted == offered
    if match_by != MATCH_RFC2396:
        return False  # ldap, uuid, ...: no ONVIF camera scope matches these
    a, b = urlsplit(wanted), urlsplit(offered)
    if (a.scheme.lower(), a.netloc.lower()) != (b.scheme.lower(), b.netloc.lower()):
        return False
    want = [s for s in a.path.split("/") if s]
    have = [s for s in b.path.split("/") if s]
    return have[: len(want)] == want


def probe_matches(probe: Probe, cam: VirtualCamera) -> bool:
    """Whether a camera answers this Probe: its types and scopes all match (§5.1)."""
    if probe.types and not any(
        (ns, name) in CAMERA_TYPES or (ns is None and name in {n for _, n in CAMERA_TYPES})
        for ns, name in probe.types
    ):
        return False
    offered = [uri for uri, _ in onvif_scopes(cam)]
    return all(any(_scope_matches(w, o, probe.match_by) for o in offered) for w in probe.scopes)


def _header(action: str, to: str, sequence: tuple[int, int], relates_to: str | None) -> Any:
    children = [
        _A.MessageID(f"urn:uuid:{uuid.uuid4()}"),
        _A.To(to),
        _A.Action(f"{WSD_NS}/{action}"),
    ]
    if relates_to:
        children.append(_A.RelatesTo(relates_to))
    instance, number = sequence
    children.append(_D.AppSequence(InstanceId=str(instance), MessageNumber=str(number)))
    return _S.Header(*children)


def _endpoint(cam: VirtualCamera) -> list[Any]:
    return [
        _A.EndpointReference(_A.Address(f"urn:uuid:{cam.endpoint_uuid}")),
        _D.Types("dn:NetworkVideoTransmitter tds:Device"),
        _D.Scopes(" ".join(uri for uri, _ in onvif_scopes(cam))),
        _D.XAddrs(cam.onvif_url),
        _D.MetadataVersion(str(cam.boot_count)),
    ]


def _serialize(envelope: Any) -> bytes:
    return bytes(etree.tostring(envelope, xml_declaration=True, encoding="UTF-8"))


def hello_message(cam: VirtualCamera, sequence: tuple[int, int]) -> bytes:
    """Hello announcing a camera to the group (2005/04 §4.1)."""
    return _serialize(
        _S.Envelope(
            _header("Hello", TO_DISCOVERY, sequence, None), _S.Body(_D.Hello(*_endpoint(cam)))
        )
    )


def bye_message(cam: VirtualCamera, sequence: tuple[int, int]) -> bytes:
    """Bye: the camera leaves the network (2005/04 §4.2)."""
    return _serialize(
        _S.Envelope(
            _header("Bye", TO_DISCOVERY, sequence, None),
            _S.Body(_D.Bye(_A.EndpointReference(_A.Address(f"urn:uuid:{cam.endpoint_uuid}")))),
        )
    )


def probe_matches_message(cam: VirtualCamera, probe: Probe, sequence: tuple[int, int]) -> bytes:
    """One camera's unicast answer to a Probe (2005/04 §5.3)."""
    return _serialize(
        _S.Envelope(
            _header("ProbeMatches", ANONYMOUS, sequence, probe.message_id),
            _S.Body(_D.ProbeMatches(_D.ProbeMatch(*_endpoint(cam)))),
        )
    )


# --- sockets -------------------------------------------------------------------------------------


async def _interface_of(address: str) -> tuple[str, int]:
    """(name, index) of the interface holding an IPv4 address; every 127/8 address is on lo."""
    ip = ipaddress.IPv4Address(address)
    if ip.is_loopback:
        return "lo", socket.if_nametoindex("lo")
    proc = await asyncio.create_subprocess_exec(
        "ip", "-j", "-4", "addr", "show", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    for link in json.loads(out or b"[]"):
        if any(a.get("local") == address for a in link.get("addr_info", [])):
            return str(link["ifname"]), int(link["ifindex"])
    raise ValueError(
        f"{address} is not an address of any interface here; give the address of the "
        "interface WS-Discovery should answer on"
    )


def _bind_to_device(sock: socket.socket, ifname: str) -> None:
    """Pin a socket to one interface so nothing it sends can leave by another (eth0)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
    except PermissionError:  # before Linux 5.7 this needs CAP_NET_RAW; IP_MULTICAST_IF remains
        _log.debug("SO_BINDTODEVICE %s not permitted; relying on the multicast interface", ifname)


def _mreqn(group: str, address: str, ifindex: int) -> bytes:
    return struct.pack("4s4si", socket.inet_aton(group), socket.inet_aton(address), ifindex)


def _listen_socket(address: str, ifname: str, ifindex: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        # other listeners on 3702 (an agent hearing Hello on the same host) get every datagram too
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _bind_to_device(sock, ifname)
        sock.bind((MULTICAST_GROUP, PORT))
        sock.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
        sock.setsockopt(
            socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, _mreqn(MULTICAST_GROUP, address, ifindex)
        )
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _send_socket(address: str, ifname: str, ifindex: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        _bind_to_device(sock, ifname)
        sock.bind((address, 0))
        # struct ip_mreqn: the group field is unused for IP_MULTICAST_IF
        mreqn = _mreqn("0.0.0.0", address, ifindex)  # noqa: S104 - not a bind
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)  # never past one link
        sock.setsockopt(
            socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1
        )  # peers on this host hear us
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _ProbeListener(asyncio.DatagramProtocol):
    def __init__(self, responder: DiscoveryResponder) -> None:
        self._responder = responder

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self._responder._on_datagram(data, addr)
        except Exception:  # a bad datagram must never stop discovery for the whole fleet
            _log.exception("WS-Discovery: datagram from %s:%s not handled", *addr)

    def error_received(self, exc: Exception) -> None:
        _log.debug("WS-Discovery socket error: %s", exc)


class DiscoveryResponder:
    """Answers WS-Discovery for every reachable camera that `cameras()` returns.

    `interface_addr` names the one interface (by one of its IPv4 addresses; any 127/8
    address means lo) on which Probes are heard and out of which Hello/Bye/ProbeMatches go.
    """

    def __init__(self, cameras: Callable[[], list[VirtualCamera]], interface_addr: str) -> None:
        self._cameras = cameras
        self.interface_addr = interface_addr
        self._listen: asyncio.DatagramTransport | None = None
        self._send: asyncio.DatagramTransport | None = None
        # AppSequence (2005/04 §7): InstanceId grows on every start, MessageNumber per message
        self._instance = 0
        self._number = 0

    def _sequence(self) -> tuple[int, int]:
        self._number += 1
        return self._instance, self._number

    async def start(self) -> None:
        """Join the group on the interface and announce every reachable camera (Hello)."""
        if self._listen is not None:
            raise RuntimeError("WS-Discovery responder already started")
        ifname, ifindex = await _interface_of(self.interface_addr)
        loop = asyncio.get_running_loop()
        send_sock = _send_socket(self.interface_addr, ifname, ifindex)
        try:
            listen_sock = _listen_socket(self.interface_addr, ifname, ifindex)
        except OSError:
            send_sock.close()
            raise
        self._send, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, sock=send_sock
        )
        self._listen, _ = await loop.create_datagram_endpoint(
            lambda: _ProbeListener(self), sock=listen_sock
        )
        self._instance = max(self._instance + 1, int(time.time()))
        self._number = 0
        _log.info("WS-Discovery answering on %s (%s)", self.interface_addr, ifname)
        await self._announce(hello_message, self._reachable())

    async def stop(self) -> None:
        """Say Bye for every reachable camera, then leave the group; idempotent."""
        if self._listen is None:
            return
        await self._announce(bye_message, self._reachable())
        listen, send, self._listen, self._send = self._listen, self._send, None, None
        listen.close()
        if send is not None:
            send.close()

    async def hello(self, cam: VirtualCamera) -> None:
        """Announce one camera (it came back, or was added)."""
        await self._announce(hello_message, [cam])

    async def bye(self, cam: VirtualCamera) -> None:
        """Announce that one camera leaves (graceful shutdown, reboot)."""
        await self._announce(bye_message, [cam])

    def _reachable(self) -> list[VirtualCamera]:
        return [cam for cam in self._cameras() if cam.reachable]

    async def _announce(
        self,
        build: Callable[[VirtualCamera, tuple[int, int]], bytes],
        cams: Iterable[VirtualCamera],
    ) -> None:
        if self._send is None:
            raise RuntimeError("WS-Discovery responder is not started")
        for cam in cams:
            self._send.sendto(build(cam, self._sequence()), (MULTICAST_GROUP, PORT))

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        probe = parse_probe(data)
        if probe is None or self._send is None:
            return
        matched = [cam for cam in self._reachable() if probe_matches(probe, cam)]
        _log.debug("Probe %s from %s:%s: %d match(es)", probe.message_id, *addr, len(matched))
        for cam in matched:
            self._send.sendto(probe_matches_message(cam, probe, self._sequence()), addr)
