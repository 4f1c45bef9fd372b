"""The simulator's WS-Discovery responder, across a veth pair between two network namespaces.

The responder runs in a process inside the "cameras" namespace; the test probes from the
"probe" namespace with a minimal client whose sockets are created there (setns in a throwaway
thread). Nothing here touches the host's own interfaces.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from lxml import etree

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[1]
CAMS_ADDR, PROBE_ADDR = "10.231.7.1", "10.231.7.2"
GROUP, PORT = "239.255.255.250", 3702
WSD = "http://schemas.xmlsoap.org/ws/2005/04/discovery"

CAMERAS = [
    {"id": "cam-01", "name": "Cổng chính", "host": CAMS_ADDR, "port": 8001},
    {"id": "cam-02", "name": "Hành lang tầng 2", "host": "127.0.0.2", "port": 8002},
    {"id": "cam-03", "name": "Sân sau", "host": "127.0.0.3", "port": 8003},
    {"id": "cam-04", "name": "Kho", "host": "127.0.0.4", "port": 8004, "offline": True},
]
for _spec in CAMERAS:
    _spec["uuid"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"isocam-test/{_spec['id']}"))
REACHABLE = [c for c in CAMERAS if not c.get("offline")]


def _xaddr(spec: dict[str, object]) -> str:
    return f"http://{spec['host']}:{spec['port']}/onvif/device_service"


# The responder process: cameras from argv, commands on stdin ("back CAM", "stop").
_RESPONDER = """
import asyncio, json, sys
from simulator.camera import StreamProfile, VirtualCamera
from simulator.wsdiscovery import DiscoveryResponder

async def main():
    spec = json.loads(sys.argv[1])
    cams = {}
    for i, c in enumerate(spec["cameras"], 1):
        cam = VirtualCamera(index=i, id=c["id"], name=c["name"], host=c["host"],
            onvif_port=c["port"], rtsp_port=8554, user="admin", password="x",
            profiles=(StreamProfile("main", 1280, 720, 2048),), endpoint_uuid=c["uuid"],
            location="khu-cach-ly-A", boot_count=3)
        cam.faults.offline = bool(c.get("offline"))
        cams[cam.id] = cam
    responder = DiscoveryResponder(lambda: list(cams.values()), spec["interface"])
    await responder.start()
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while words := (await reader.readline()).decode().split():
        if words[0] == "stop":
            break
        if words[0] == "back":
            cams[words[1]].faults.offline = False
            await responder.hello(cams[words[1]])
        print("OK", flush=True)
    await responder.stop()
    print("STOPPED", flush=True)

asyncio.run(main())
"""


# --- namespaces ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetnsPair:
    cams: str  # where the responder runs
    probe: str  # where the test's client sockets live


def _ip(*argv: str) -> None:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(argv)}: {done.stderr.strip()}")


@pytest.fixture(scope="module")
def netns_pair() -> Iterator[NetnsPair]:
    tag = secrets.token_hex(3)
    pair = NetnsPair(cams=f"isocam-cams-{tag}", probe=f"isocam-probe-{tag}")
    veth_cams, veth_probe = f"icc{tag}", f"icp{tag}"  # interface names: at most 15 characters
    created: list[str] = []
    try:
        for ns in (pair.cams, pair.probe):
            _ip("netns", "add", ns)
            created.append(ns)
        # both ends are created directly inside the namespaces: nothing appears on the host
        _ip("link", "add", veth_cams, "netns", pair.cams, "type", "veth",
            "peer", "name", veth_probe, "netns", pair.probe)  # fmt: skip
        for ns, dev, addr in (
            (pair.cams, veth_cams, CAMS_ADDR),
            (pair.probe, veth_probe, PROBE_ADDR),
        ):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "multicast", "on", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", dev)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        pytest.fail(f"cannot create the test's network namespaces (needs root and iproute2): {err}")
    try:
        yield pair
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


_IP_RECVTTL = 12  # linux/in.h; not exported by the socket module
_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def _socket_in_netns(ns: str, make: Callable[[], socket.socket]) -> socket.socket:
    """Create a socket inside a namespace: a socket keeps the namespace it was born in, so a
    short-lived thread enters the namespace (setns is per thread), makes it and exits."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
            finally:
                os.close(fd)
            out["sock"] = make()
        except Exception as err:  # handed to the test thread below
            out["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    sock = out["sock"]
    assert isinstance(sock, socket.socket)
    return sock


def _group_listener() -> socket.socket:
    """Hears Hello/Bye: bound to the group, joined on the probe side's veth."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((GROUP, PORT))
    mreq = struct.pack("4s4s", socket.inet_aton(GROUP), socket.inet_aton(PROBE_ADDR))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    sock.setsockopt(socket.IPPROTO_IP, _IP_RECVTTL, 1)
    sock.setblocking(False)
    return sock


def _prober() -> socket.socket:
    """Sends Probes to the group and receives the unicast ProbeMatches."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((PROBE_ADDR, 0))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(PROBE_ADDR))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    sock.setblocking(False)
    return sock


# --- a minimal WS-Discovery client ---------------------------------------------------------------


@dataclass
class Message:
    action: str
    relates_to: str | None
    address: str | None
    types: list[str]
    scopes: list[str]
    xaddrs: list[str]
    metadata_version: str | None
    sender: str
    ttl: int | None


def _parse(data: bytes, sender: str, ttl: int | None) -> Message:
    root = etree.fromstring(data)
    match = root.find("{*}Body/")
    assert match is not None
    if match.tag.endswith("ProbeMatches"):
        match = match.find("{*}ProbeMatch")
    assert match is not None

    def words(name: str) -> list[str]:
        return (match.findtext(f"{{*}}{name}") or "").split()

    return Message(
        action=(root.findtext("{*}Header/{*}Action") or "").rsplit("/", 1)[-1],
        relates_to=root.findtext("{*}Header/{*}RelatesTo"),
        address=match.findtext("{*}EndpointReference/{*}Address"),
        types=words("Types"),
        scopes=words("Scopes"),
        xaddrs=words("XAddrs"),
        metadata_version=match.findtext("{*}MetadataVersion"),
        sender=sender,
        ttl=ttl,
    )


async def _receive(sock: socket.socket, deadline: float) -> Message:
    """Next message on a socket, with the TTL it arrived with when the socket asks for it."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, ancillary, _, sender = sock.recvmsg(65535, socket.CMSG_SPACE(4))
            break
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_reader(sock.fileno(), ready.set_result, None)
            try:
                await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
            finally:
                loop.remove_reader(sock.fileno())
    ttl = next(
        (int.from_bytes(d[:4], sys.byteorder) for lvl, typ, d in ancillary if typ == socket.IP_TTL),
        None,
    )
    return _parse(data, sender[0], ttl)


async def _collect(
    sock: socket.socket, done: Callable[[list[Message]], bool], within_s: float = 10.0
) -> list[Message]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    got: list[Message] = []
    while not done(got):
        got.append(await _receive(sock, deadline))
    return got


def _probe_xml(message_id: str, types: str | None, scopes: str | None = None) -> bytes:
    types_el = f"<w:Types>{types}</w:Types>" if types is not None else ""
    scopes_el = f"<w:Scopes>{scopes}</w:Scopes>" if scopes is not None else ""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope"
  xmlns:wa="http://schemas.xmlsoap.org/ws/2004/08/addressing"
  xmlns:w="{WSD}" xmlns:nvt="http://www.onvif.org/ver10/network/wsdl"
  xmlns:dev="http://www.onvif.org/ver10/device/wsdl"
  xmlns:dpws="http://schemas.xmlsoap.org/ws/2006/02/devprof">
 <e:Header>
  <wa:MessageID>{message_id}</wa:MessageID>
  <wa:To>urn:schemas-xmlsoap-org:ws:2005:04:discovery</wa:To>
  <wa:Action>{WSD}/Probe</wa:Action>
 </e:Header>
 <e:Body><w:Probe>{types_el}{scopes_el}</w:Probe></e:Body>
</e:Envelope>""".encode()


def _send_probe(sock: socket.socket, types: str | None, scopes: str | None = None) -> str:
    message_id = f"urn:uuid:{uuid.uuid4()}"
    sock.sendto(_probe_xml(message_id, types, scopes), (GROUP, PORT))
    return message_id


def _relating_to(message_id: str, n: int) -> Callable[[list[Message]], bool]:
    return lambda got: sum(m.relates_to == message_id for m in got) >= n


@asynccontextmanager
async def _responder(pair: NetnsPair) -> AsyncIterator[asyncio.subprocess.Process]:
    spec = json.dumps({"interface": CAMS_ADDR, "cameras": CAMERAS})
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", pair.cams, sys.executable, "-c", _RESPONDER, spec,
        cwd=REPO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line == b"READY\n", f"responder did not start: {line!r}"
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _command(proc: asyncio.subprocess.Process, line: str, answer: bytes) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{line}\n".encode())
    await proc.stdin.drain()
    assert await asyncio.wait_for(proc.stdout.readline(), 30) == answer


# --- tests ---------------------------------------------------------------------------------------


async def test_probe_finds_every_reachable_camera_with_xaddrs_and_scopes(
    netns_pair: NetnsPair,
) -> None:
    sock = _socket_in_netns(netns_pair.probe, _prober)
    try:
        async with _responder(netns_pair):
            probe_id = _send_probe(sock, "nvt:NetworkVideoTransmitter")
            got = await _collect(sock, _relating_to(probe_id, len(REACHABLE)))
            found = {m.address: m for m in got}
            assert set(found) == {f"urn:uuid:{c['uuid']}" for c in REACHABLE}
            for spec in REACHABLE:
                m = found[f"urn:uuid:{spec['uuid']}"]
                assert m.action == "ProbeMatches" and m.relates_to == probe_id
                assert m.xaddrs == [_xaddr(spec)]
                assert m.metadata_version == "3"
                assert m.sender == CAMS_ADDR
                assert {"dn:NetworkVideoTransmitter", "tds:Device"} <= set(m.types)
                assert set(m.scopes) >= {
                    f"onvif://www.onvif.org/name/{quote(str(spec['name']), safe='')}",
                    "onvif://www.onvif.org/hardware/VC1080",
                    "onvif://www.onvif.org/location/khu-cach-ly-A",
                    "onvif://www.onvif.org/type/video_encoder",
                    "onvif://www.onvif.org/Profile/Streaming",
                }
            # a Probe without Types, and one for tds:Device, find the same cameras
            for types in (None, "dev:Device"):
                probe_id = _send_probe(sock, types)
                got = await _collect(sock, _relating_to(probe_id, len(REACHABLE)))
                assert {m.address for m in got if m.relates_to == probe_id} == set(found)
    finally:
        sock.close()


async def test_probe_for_other_types_or_scopes_is_not_answered(netns_pair: NetnsPair) -> None:
    sock = _socket_in_netns(netns_pair.probe, _prober)
    try:
        async with _responder(netns_pair):
            printer_probe = _send_probe(sock, "dpws:Device")  # a printer's type, not a camera's
            cam2 = CAMERAS[1]
            name_scope = f"onvif://www.onvif.org/name/{quote(str(cam2['name']), safe='')}"
            scoped_probe = _send_probe(sock, "nvt:NetworkVideoTransmitter", name_scope)
            offline_scope = f"onvif://www.onvif.org/name/{quote(str(CAMERAS[3]['name']), safe='')}"
            offline_probe = _send_probe(sock, None, offline_scope)
            # the responder answers datagrams in order: once the last probe is fully answered,
            # every answer to the earlier ones has arrived too
            last_probe = _send_probe(sock, None, "onvif://www.onvif.org/location")
            got = await _collect(sock, _relating_to(last_probe, len(REACHABLE)))
    finally:
        sock.close()
    assert [m for m in got if m.relates_to in (printer_probe, offline_probe)] == []
    assert [m.address for m in got if m.relates_to == scoped_probe] == [f"urn:uuid:{cam2['uuid']}"]


async def test_hello_on_start_bye_on_stop_and_hello_when_a_camera_comes_back(
    netns_pair: NetnsPair,
) -> None:
    listener = _socket_in_netns(netns_pair.probe, _group_listener)
    try:
        async with _responder(netns_pair) as proc:
            hellos = await _collect(listener, lambda got: len(got) >= len(REACHABLE))
            assert {(m.action, m.address, m.xaddrs[0]) for m in hellos} == {
                ("Hello", f"urn:uuid:{c['uuid']}", _xaddr(c)) for c in REACHABLE
            }
            # multicast stays on the link: sent with TTL 1, from the interface address
            assert {(m.ttl, m.sender) for m in hellos} == {(1, CAMS_ADDR)}

            await _command(proc, "back cam-04", b"OK\n")
            back = await _collect(listener, lambda got: len(got) >= 1)
            assert [(m.action, m.address) for m in back] == [
                ("Hello", f"urn:uuid:{CAMERAS[3]['uuid']}")
            ]

            await _command(proc, "stop", b"STOPPED\n")
            byes = await _collect(listener, lambda got: len(got) >= len(CAMERAS))
            assert {(m.action, m.address) for m in byes} == {
                ("Bye", f"urn:uuid:{c['uuid']}") for c in CAMERAS
            }
            assert await proc.wait() == 0
    finally:
        listener.close()


async def test_junk_datagrams_do_not_kill_the_responder(netns_pair: NetnsPair) -> None:
    sock = _socket_in_netns(netns_pair.probe, _prober)
    billion_laughs = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
        b'<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
        b"<lolz>&lol3;</lolz>"
    )
    junk = [
        b"",
        b"\x00\xff\xfe" * 300,
        b"<e:Envelope xmlns:e='http://www.w3.org/2003/05/soap-envelope'><e:Body>",
        b"<a>" + b"x" * 60_000 + b"</a>",  # near the largest UDP datagram
        billion_laughs,
        _probe_xml("urn:uuid:1", "undeclared:NetworkVideoTransmitter").replace(b"Probe>", b"Prob>"),
        _probe_xml("", "nvt:NetworkVideoTransmitter").replace(b"http://www.w3.org/2003/05/", b"x:"),
        "<?xml version='1.0' encoding='utf-8'?><x>Cổng \udcff</x>".encode("utf-8", "surrogatepass"),
    ]
    try:
        async with _responder(netns_pair) as proc:
            for datagram in junk:
                sock.sendto(datagram, (GROUP, PORT))
            probe_id = _send_probe(sock, "nvt:NetworkVideoTransmitter")
            got = await _collect(sock, _relating_to(probe_id, len(REACHABLE)))
            assert {m.relates_to for m in got} == {probe_id}
            assert proc.returncode is None
    finally:
        sock.close()
