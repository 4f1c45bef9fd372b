"""WS-Discovery of ONVIF cameras: an asyncio probe, a Hello/Bye listener and a lenient parser.

Written here rather than taken from PyPI `wsdiscovery` (synchronous, cannot pick an interface,
skips loopback: see FIELD-NOTES). Every socket is tied to one named local IPv4 address
(IP_MULTICAST_IF, TTL 1): nothing is ever sent through a default interface, so an uplink
such as eth0 is never probed by accident.

Messages follow WS-Discovery 2005/04 as ONVIF Core §7.3 uses it. Cameras differ in namespace
prefixes, WS-Addressing versions, whitespace and optional fields, so the parser matches
elements by local name and treats everything but the endpoint reference as optional. A
datagram from the LAN can never raise: junk yields None and a count in `rejected_messages`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import ipaddress
import logging
import random
import re
import socket
import struct
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final, Literal
from urllib.parse import unquote, urlsplit

from lxml import etree

log = logging.getLogger(__name__)

WSD_GROUP: Final = "239.255.255.250"
WSD_PORT: Final = 3702
#: Real ProbeMatch/Hello messages are 1–4 KiB; anything past this is refused unparsed.
MAX_MESSAGE_BYTES: Final = 32 * 1024

NS_SOAP: Final = "http://www.w3.org/2003/05/soap-envelope"
NS_WSA: Final = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
NS_WSD: Final = "http://schemas.xmlsoap.org/ws/2005/04/discovery"
#: ONVIF network namespace of the `NetworkVideoTransmitter` type (ONVIF Core §7.3.1).
NS_DN: Final = "http://www.onvif.org/ver10/network/wsdl"
NETWORK_VIDEO_TRANSMITTER: Final = f"{{{NS_DN}}}NetworkVideoTransmitter"

_ANONYMOUS: Final = f"{NS_WSA}/role/anonymous"
_DISCOVERY_TO: Final = "urn:schemas-xmlsoap-org:ws:2005:04:discovery"
#: SOAP-over-UDP: a multicast message is sent this many times, 50–250 ms apart (§3.4).
_PROBE_REPEAT: Final = 2
# Linux IP_MULTICAST_ALL (not exported by Python 3.11's socket module): with 0 a socket only
# receives the groups it joined itself, on the interface it joined them on.
_IP_MULTICAST_ALL: Final = 49
_SIOCGIFFLAGS: Final = 0x8913
_SIOCGIFADDR: Final = 0x8915
_IFF_UP: Final = 0x1
_IFF_LOOPBACK: Final = 0x8
_IFF_MULTICAST: Final = 0x1000
_MAX_LIST_ITEMS: Final = 64
_MAX_TEXT: Final = 256

#: Why datagrams were rejected since start (reason -> count), for metrics and tests.
rejected_messages: Counter[str] = Counter()


class DiscoveryError(Exception):
    """Discovery cannot run as asked (e.g. an interface address that is not on this box)."""


# --- what discovery reports ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TargetService:
    """One device as it describes itself in a ProbeMatch, Hello or Bye."""

    endpoint: str  # EndpointReference address, usually "urn:uuid:…": stable across IP changes
    types: tuple[str, ...] = ()  # "{namespace}Local" when the prefix resolves, else as written
    scopes: tuple[str, ...] = ()
    xaddrs: tuple[str, ...] = ()  # device service URLs (http/https only)
    metadata_version: int | None = None
    name: str | None = None  # from onvif://www.onvif.org/name/…, percent-decoded
    hardware: str | None = None  # from …/hardware/…
    location: str | None = None  # every …/location/… scope, decoded, joined by ", "
    profiles: tuple[str, ...] = ()  # from …/Profile/… (e.g. "Streaming", "T")

    @property
    def is_video_transmitter(self) -> bool:
        return any(_local(t) == "NetworkVideoTransmitter" for t in self.types)

    def onvif_addresses(self) -> list[tuple[str, int]]:
        """(host, port) of each device-service URL in XAddrs, IPv4 first (the camera LAN)."""
        out: list[tuple[str, int]] = []
        for xaddr in self.xaddrs:
            parts = urlsplit(xaddr)
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:
                continue
            if parts.hostname and (parts.hostname, port) not in out:
                out.append((parts.hostname, port))
        return sorted(out, key=lambda hp: ":" in hp[0])


@dataclass(frozen=True, kw_only=True)
class DiscoveredDevice(TargetService):
    """A device found on the LAN: what it said, who sent it, and where we heard it."""

    source: str  # IP address the datagram came from
    interface: str  # our local address it arrived on


@dataclass(frozen=True)
class ProbeMatch:
    """A ProbeMatches message; `relates_to` is the MessageID of the Probe it answers."""

    message_id: str
    relates_to: str
    targets: tuple[TargetService, ...]


@dataclass(frozen=True)
class Hello:
    """A device announcing itself (it came up or changed address)."""

    message_id: str
    target: TargetService


@dataclass(frozen=True)
class Bye:
    """A device leaving the network cleanly."""

    message_id: str
    target: TargetService


@dataclass(frozen=True)
class DiscoveryEvent:
    """What `DiscoveryListener` reports."""

    kind: Literal["hello", "bye"]
    device: DiscoveredDevice


# --- parsing -------------------------------------------------------------------------------


def _local(tag: object) -> str:
    """Local name of a Clark-notation tag or of a "prefix:Local" QName."""
    text = tag if isinstance(tag, str) else ""
    return text.rsplit("}", 1)[-1].rsplit(":", 1)[-1]


def _children(element: etree._Element, name: str) -> list[etree._Element]:
    return [c for c in element if isinstance(c.tag, str) and _local(c.tag) == name]


def _child(element: etree._Element | None, name: str) -> etree._Element | None:
    if element is None:
        return None
    found = _children(element, name)
    return found[0] if found else None


def _text(element: etree._Element | None) -> str:
    if element is None:
        return ""
    return "".join(element.itertext()).strip()


def _clean(text: str) -> str:
    """Drop control characters (they would corrupt logs and terminals) and cap the length."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", "", text)[:_MAX_TEXT]


def _tokens(element: etree._Element | None) -> list[str]:
    return _text(element).split()[:_MAX_LIST_ITEMS]


def _resolve_types(element: etree._Element | None) -> tuple[str, ...]:
    out: list[str] = []
    for token in _tokens(element):
        prefix, _, local = token.rpartition(":")
        namespace = element.nsmap.get(prefix or None) if element is not None else None
        out.append(_clean(f"{{{namespace}}}{local}" if namespace else token))
    return tuple(out)


_ONVIF_SCOPE = re.compile(r"onvif://www\.onvif\.org/([^/]+)/(.*)", re.IGNORECASE)


def _target(element: etree._Element) -> TargetService | None:
    endpoint = _clean(_text(_child(_child(element, "EndpointReference"), "Address")))
    if not endpoint:
        return None
    raw_scopes = _tokens(_child(element, "Scopes"))
    scopes = tuple(_clean(s) for s in raw_scopes)
    name = hardware = None
    locations: list[str] = []
    profiles: list[str] = []
    # decode before capping: a cap inside a percent-encoded character would garble the name
    for scope in raw_scopes:
        found = _ONVIF_SCOPE.fullmatch(scope)
        if not found:
            continue
        kind, value = found.group(1).lower(), _clean(unquote(found.group(2), errors="replace"))
        if kind == "name" and name is None:
            name = value
        elif kind == "hardware" and hardware is None:
            hardware = value
        elif kind == "location" and value:
            locations.append(value)
        elif kind == "profile" and value:
            profiles.append(value)
    xaddrs = []
    for token in _tokens(_child(element, "XAddrs")):
        try:
            parts = urlsplit(token)
            if parts.scheme in ("http", "https") and parts.hostname:
                xaddrs.append(_clean(token))
        except ValueError:
            continue
    version_text = _text(_child(element, "MetadataVersion"))
    return TargetService(
        endpoint=endpoint,
        types=_resolve_types(_child(element, "Types")),
        scopes=scopes,
        xaddrs=tuple(xaddrs),
        metadata_version=int(version_text) if version_text.isdigit() else None,
        name=name,
        hardware=hardware,
        location=", ".join(locations) or None,
        profiles=tuple(profiles),
    )


def _xml_parser() -> etree.XMLParser:
    # defusedxml-like: no entities, no DTD, no network, no huge trees (billion laughs, XXE)
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        load_dtd=False,
        dtd_validation=False,
        remove_comments=True,
        remove_pis=True,
    )


def _parse(data: bytes) -> tuple[ProbeMatch | Hello | Bye | None, str]:
    if not data.strip():
        return None, "empty"
    if len(data) > MAX_MESSAGE_BYTES:
        return None, "oversized"
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        return None, "dtd_forbidden"
    try:
        root = etree.fromstring(data, _xml_parser())
    except (etree.XMLSyntaxError, ValueError):
        return None, "malformed_xml"
    if root is None or root.getroottree().docinfo.doctype:
        return None, "dtd_forbidden"
    if _local(root.tag) != "Envelope":
        return None, "not_soap"
    header, body = _child(root, "Header"), _child(root, "Body")
    if body is None:
        return None, "not_soap"
    payload = next((c for c in body if isinstance(c.tag, str)), None)
    if payload is None:
        return None, "not_soap"
    message_id = _clean(_text(_child(header, "MessageID")))
    kind = _local(payload.tag)
    if kind == "ProbeMatches":
        targets = [t for m in _children(payload, "ProbeMatch") if (t := _target(m)) is not None]
        if not targets:
            return None, "missing_endpoint"
        relates_to = _clean(_text(_child(header, "RelatesTo")))
        return ProbeMatch(message_id, relates_to, tuple(targets[:_MAX_LIST_ITEMS])), ""
    if kind in ("Hello", "Bye"):
        target = _target(payload)
        if target is None:
            return None, "missing_endpoint"
        return (Hello(message_id, target) if kind == "Hello" else Bye(message_id, target)), ""
    return None, "other_message"  # Probe, Resolve, ResolveMatches: not for us


def parse_wsd_message(data: bytes) -> ProbeMatch | Hello | Bye | None:
    """Parse one WS-Discovery datagram; None (and a count in `rejected_messages`) for
    anything that is not a usable ProbeMatches, Hello or Bye. Never raises."""
    try:
        result, reason = _parse(bytes(data))
    except Exception:
        # a datagram from the LAN must never take the agent down
        log.debug("WS-Discovery parser failed unexpectedly", exc_info=True)
        result, reason = None, "parser_error"
    if result is None:
        rejected_messages[reason] += 1
    return result


def _same_message_id(a: str, b: str) -> bool:
    """Compare message ids, tolerating the "uuid:" vs "urn:uuid:" spellings cameras use."""

    def norm(text: str) -> str:
        return re.sub(r"^(urn:)?(uuid:)?", "", text.strip().lower())

    return bool(a) and norm(a) == norm(b)


def _endpoint_key(endpoint: str) -> str:
    return re.sub(r"^(urn:)?(uuid:)?", "", endpoint.strip().lower())


# --- the probe -----------------------------------------------------------------------------


def build_probe(message_id: str) -> bytes:
    """A Probe for ONVIF NetworkVideoTransmitters (ONVIF Core §7.3.2)."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<s:Envelope xmlns:s="{NS_SOAP}" xmlns:a="{NS_WSA}" xmlns:d="{NS_WSD}" '
        f'xmlns:dn="{NS_DN}">'
        "<s:Header>"
        f'<a:Action s:mustUnderstand="1">{NS_WSD}/Probe</a:Action>'
        f"<a:MessageID>{message_id}</a:MessageID>"
        f"<a:ReplyTo><a:Address>{_ANONYMOUS}</a:Address></a:ReplyTo>"
        f'<a:To s:mustUnderstand="1">{_DISCOVERY_TO}</a:To>'
        "</s:Header>"
        "<s:Body><d:Probe><d:Types>dn:NetworkVideoTransmitter</d:Types></d:Probe></s:Body>"
        "</s:Envelope>"
    ).encode()


def _check_interfaces(interfaces: Sequence[str]) -> list[str]:
    if isinstance(interfaces, str):
        raise DiscoveryError("interfaces must be a list of IPv4 addresses, not one string")
    if not interfaces:
        # deliberate: there is no default interface, so an uplink is never probed by accident
        raise DiscoveryError("name at least one local IPv4 address to discover on")
    out: list[str] = []
    for spec in interfaces:
        try:
            addr = ipaddress.IPv4Address(spec)
        except ValueError:
            raise DiscoveryError(
                f"{spec!r} is not an IPv4 address (resolve interface names first)"
            ) from None
        if addr.is_unspecified or addr.is_multicast:
            raise DiscoveryError(f"{spec} cannot name an interface")
        if str(addr) not in out:
            out.append(str(addr))
    return out


def _multicast_socket(address: str, *, bind: tuple[str, int]) -> socket.socket:
    """A UDP socket whose multicast goes out only through `address`'s interface, TTL 1."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        if bind[1]:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
        sock.bind(bind)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise DiscoveryError(
            f"cannot use {address} for discovery: {exc.strerror or exc} "
            "(is it an address of this box?)"
        ) from None
    return sock


class _Collector(asyncio.DatagramProtocol):
    def __init__(self, interface: str, on_message: Callable[[bytes, str, str], None]) -> None:
        self.interface = interface
        self.on_message = on_message

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.on_message(data, addr[0], self.interface)

    def error_received(self, exc: Exception) -> None:
        log.debug("discovery socket on %s: %s", self.interface, exc)


def _device(target: TargetService, source: str, interface: str) -> DiscoveredDevice:
    described = {f.name: getattr(target, f.name) for f in fields(TargetService)}
    return DiscoveredDevice(**described, source=source, interface=interface)


async def probe(
    interfaces: Sequence[str],
    timeout: float = 3.0,  # noqa: ASYNC109 - the listening window, not a cancellation
) -> list[DiscoveredDevice]:
    """Multicast a Probe for ONVIF cameras from each local IPv4 address in `interfaces` and
    return the devices that answer within `timeout` seconds, one per endpoint reference.

    Raises `DiscoveryError` before sending anything when an address is not usable.
    """
    addresses = _check_interfaces(interfaces)
    message_id = f"urn:uuid:{uuid.uuid4()}"
    payload = build_probe(message_id)
    found: dict[str, DiscoveredDevice] = {}

    def on_message(data: bytes, source: str, interface: str) -> None:
        message = parse_wsd_message(data)
        if not isinstance(message, ProbeMatch):
            if message is not None:
                rejected_messages["unexpected_on_probe_socket"] += 1
            return
        if not _same_message_id(message.relates_to, message_id):
            rejected_messages["unrelated_reply"] += 1
            return
        for target in message.targets:
            key = _endpoint_key(target.endpoint)
            known = found.get(key)
            if known is None:
                found[key] = _device(target, source, interface)
            else:  # seen on another interface or answered twice: keep every address
                extra = tuple(x for x in target.xaddrs if x not in known.xaddrs)
                found[key] = replace(known, xaddrs=known.xaddrs + extra)

    loop = asyncio.get_running_loop()
    sockets = [_multicast_socket(a, bind=(a, 0)) for a in addresses]
    transports: list[asyncio.DatagramTransport] = []
    try:
        for address, sock in zip(addresses, sockets, strict=True):
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(_Collector, address, on_message), sock=sock
            )
            transports.append(transport)
        deadline = loop.time() + timeout
        for attempt in range(_PROBE_REPEAT):
            for transport in transports:
                transport.sendto(payload, (WSD_GROUP, WSD_PORT))
            if attempt + 1 < _PROBE_REPEAT:
                # a protocol delay (SOAP-over-UDP §3.4 repetition), not a wait for an event
                await asyncio.sleep(min(random.uniform(0.05, 0.25), timeout / 4))  # noqa: S311
        # answers arrive within APP_MAX_DELAY (0.5 s) by the spec; slow cameras get `timeout`
        await asyncio.sleep(max(0.0, deadline - loop.time()))
    finally:
        for transport in transports:
            transport.close()
        for sock in sockets[len(transports) :]:
            sock.close()
    return list(found.values())


# --- the listener --------------------------------------------------------------------------


class DiscoveryListener:
    """Stays joined to the WS-Discovery group on the given local IPv4 addresses and reports
    Hello and Bye messages as they arrive, so cameras that come up later are noticed.

    Use as `async with DiscoveryListener([...]) as listener: async for event in listener:`,
    or pass `callback` to have each `DiscoveryEvent` handed over instead of queued.
    """

    def __init__(
        self,
        interfaces: Sequence[str],
        *,
        callback: Callable[[DiscoveryEvent], None] | None = None,
        queue_size: int = 1024,
    ) -> None:
        self.interfaces = _check_interfaces(interfaces)
        self.callback = callback
        #: why datagrams were ignored on this listener (reason -> count)
        self.rejected: Counter[str] = Counter()
        self._queue: asyncio.Queue[DiscoveryEvent | None] = asyncio.Queue(queue_size)
        self._transports: list[asyncio.DatagramTransport] = []
        # Hello and Bye are repeated with the same MessageID (SOAP-over-UDP §3.4)
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._closed = False

    async def start(self) -> None:
        """Join the group on every interface; raises `DiscoveryError` if one cannot be used."""
        loop = asyncio.get_running_loop()
        try:
            for address in self.interfaces:
                sock = _multicast_socket(address, bind=(WSD_GROUP, WSD_PORT))
                try:
                    membership = socket.inet_aton(WSD_GROUP) + socket.inet_aton(address)
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
                except OSError as exc:
                    sock.close()
                    raise DiscoveryError(
                        f"cannot join {WSD_GROUP} on {address}: {exc.strerror or exc}"
                    ) from None
                transport, _ = await loop.create_datagram_endpoint(
                    functools.partial(_Collector, address, self._on_message), sock=sock
                )
                self._transports.append(transport)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Leave the group; a pending iteration ends."""
        for transport in self._transports:
            transport.close()
        self._transports.clear()
        if not self._closed:
            self._closed = True
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)

    async def __aenter__(self) -> DiscoveryListener:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __aiter__(self) -> DiscoveryListener:
        return self

    async def __anext__(self) -> DiscoveryEvent:
        if self._closed and self._queue.empty():
            raise StopAsyncIteration
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        return event

    def _on_message(self, data: bytes, source: str, interface: str) -> None:
        message = parse_wsd_message(data)
        if message is None:
            self.rejected["unparsable"] += 1
            return
        if isinstance(message, ProbeMatch):
            self.rejected["probe_match_on_group"] += 1
            return
        if message.message_id:
            if message.message_id in self._recent:
                return
            self._recent[message.message_id] = None
            if len(self._recent) > 512:
                self._recent.popitem(last=False)
        kind: Literal["hello", "bye"] = "hello" if isinstance(message, Hello) else "bye"
        event = DiscoveryEvent(kind, _device(message.target, source, interface))
        if self.callback is not None:
            try:
                self.callback(event)
            except Exception:
                log.exception("discovery callback failed")
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.rejected["queue_full"] += 1


# --- local interfaces ----------------------------------------------------------------------


@dataclass(frozen=True)
class LocalInterface:
    """An interface of this box with its (first) IPv4 address."""

    name: str
    address: str
    up: bool
    loopback: bool
    multicast: bool = field(default=False)


def local_ipv4_interfaces() -> list[LocalInterface]:
    """Interfaces of the current network namespace that have an IPv4 address."""
    out: list[LocalInterface] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("16s16x", name.encode()[:15])
            try:
                address = socket.inet_ntoa(fcntl.ioctl(sock, _SIOCGIFADDR, request)[20:24])
                (flags,) = struct.unpack("H", fcntl.ioctl(sock, _SIOCGIFFLAGS, request)[16:18])
            except OSError:
                continue  # no IPv4 address
            out.append(
                LocalInterface(
                    name=name,
                    address=address,
                    up=bool(flags & _IFF_UP),
                    loopback=bool(flags & _IFF_LOOPBACK),
                    multicast=bool(flags & _IFF_MULTICAST),
                )
            )
    return out


def default_interfaces() -> list[str]:
    """Addresses of every non-loopback, multicast-capable interface that is up: the CLI's
    choice when the configuration names none (a real box only, never a test)."""
    return [i.address for i in local_ipv4_interfaces() if i.up and not i.loopback and i.multicast]


def resolve_interfaces(specs: Sequence[str]) -> list[str]:
    """Map interface names (e.g. "eth1") to their IPv4 address; addresses pass through."""
    by_name = {i.name: i.address for i in local_ipv4_interfaces()}
    out: list[str] = []
    for spec in specs:
        try:
            out.append(str(ipaddress.IPv4Address(spec)))
        except ValueError:
            if spec not in by_name:
                raise DiscoveryError(f"no interface named {spec!r} with an IPv4 address") from None
            out.append(by_name[spec])
    return out
