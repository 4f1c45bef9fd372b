"""Private test networks: two network namespaces joined by a veth pair (root and iproute2).

Multicast and camera traffic in the tests stays inside namespaces made here, never on the
machine's real interfaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsUnavailable(RuntimeError):
    """The namespaces cannot be built here (needs root and iproute2)."""


@contextlib.contextmanager
def inside_netns(name: str) -> Iterator[None]:
    """Run the calling thread in network namespace `name`; sockets made here stay there."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")
        try:
            yield
        finally:
            if _libc.setns(original, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original namespace failed")
    finally:
        os.close(target)
        os.close(original)


@dataclass(frozen=True)
class VethPair:
    """`camera_ns` holds `camera_ip` on `camera_if`; `box_ns` holds `box_ip` on `box_if`."""

    camera_ns: str
    box_ns: str
    camera_if: str
    box_if: str
    camera_ip: str
    box_ip: str

    def exec_argv(self, ns: str, argv: list[str]) -> list[str]:
        """`argv` run inside namespace `ns` (as a new process)."""
        return ["ip", "netns", "exec", ns, *argv]


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {result.stderr.strip()}")


@contextlib.contextmanager
def veth_pair(camera_ip: str = "10.231.9.1", box_ip: str = "10.231.9.2") -> Iterator[VethPair]:
    """Two fresh namespaces with a /24 on a veth pair between them and a multicast route.

    Raises `NetnsUnavailable` (with the reason) when they cannot be built."""
    tag = f"{os.getpid() % 0xFFFF:04x}{secrets.token_hex(2)}"
    pair = VethPair(
        f"isocam-cam-{tag}", f"isocam-box-{tag}", f"vc{tag}", f"vb{tag}", camera_ip, box_ip
    )
    created: list[str] = []
    try:
        for ns in (pair.camera_ns, pair.box_ns):
            _ip("netns", "add", ns)
            created.append(ns)
        # created straight inside the namespaces: the pair never exists next to eth0
        _ip("link", "add", pair.camera_if, "netns", pair.camera_ns, "type", "veth",
            "peer", "name", pair.box_if, "netns", pair.box_ns)  # fmt: skip
        for ns, dev, addr in (
            (pair.camera_ns, pair.camera_if, camera_ip),
            (pair.box_ns, pair.box_if, box_ip),
        ):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", dev)
        deadline = time.monotonic() + 10
        for ns, dev in ((pair.camera_ns, pair.camera_if), (pair.box_ns, pair.box_if)):
            while (
                "LOWER_UP"
                not in subprocess.run(
                    ["ip", "-n", ns, "link", "show", dev],
                    capture_output=True,
                    text=True,
                    check=False,
                ).stdout
            ):
                if time.monotonic() > deadline:
                    raise NetnsUnavailable(f"{dev} in {ns} never came up")
                time.sleep(0.02)  # polling link state: there is no event to await
    except (NetnsUnavailable, OSError) as exc:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        raise NetnsUnavailable(
            f"cannot build the test network namespaces (needs root and iproute2): {exc}"
        ) from None
    try:
        yield pair
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False)
