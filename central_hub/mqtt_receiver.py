"""The ingest's MQTT connection, in a child process of the hub.

Why a process: one Python process cannot both speak MQTT and validate and write 20,000 events
a second (the GIL makes it one core). Measured on the project's 2-core box, per message:
paho's receive path ≈ 35 µs (a fifth of it building an empty MQTT 5 `Properties` object),
gmqtt's ≈ 14 µs (26 µs with a coroutine per message, which its acknowledge-after-handling
mode needs); the hub's validation and batched write ≈ 40 µs. In one process that caps the
ingest near 12,000 events/s; with the connection in a child, the hub's process spends its
core on validation and writes only, and the child's work overlaps on the other core.

What the child does, and only this: connect (MQTT 5, persistent session, Receive Maximum as
configured, TLS with a client certificate when configured), subscribe to the hub's filters,
and pass every message to the hub as it arrives, in chunks; acknowledge a message (PUBACK)
only once the hub says it is committed. It never parses a payload, never touches the database
and knows no site: everything the hub decides about a message it decides in its own process.

**One connection per child.** The child exits when its connection ends, and the hub starts a
new one (with backoff). A message's packet id belongs to the connection that delivered it, so
an acknowledgement can never reach a later connection: there is none in the same process.
Messages the hub had not acknowledged are redelivered by the broker to the next child, and
the hub's (site, seq) key drops what it already stored.

**Wire between hub and child** (two pipes, never stdout, which libraries print to): frames of
a 4-byte big-endian length and a `marshal`-encoded tuple (marshal: the fastest safe codec for
tuples of str, bytes and int; both ends are this same module and interpreter).

child → hub::

    ("up",)                                  subscribed; messages follow
    ("msgs", first_index, [(topic, payload, qos), ...])
    ("down", reason)                         the connection ended or could not be made; exit

hub → child::

    settings (the first frame: a dict, see `ReceiverSettings.to_wire`)
    ("ack", through_index)                   everything up to this index is committed
    ("fetch_retained", [filter, ...])        subscribe plainly, then leave (retained copies)
    ("stop",)                                disconnect cleanly (the session stays) and exit

Indices count this child's messages from 0, in delivery order; the hub writes and acknowledges
in that order, so one number acknowledges a whole prefix.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import marshal
import os
import ssl
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

log = logging.getLogger(__name__)

_HEADER: Final = struct.Struct(">I")
#: Messages passed to the hub in one frame at most, and how long a partial chunk may wait.
CHUNK_MAX: Final = 500
CHUNK_DELAY_S: Final = 0.002
#: Largest frame accepted (a chunk of 500 messages of at most 256 KiB each, with room).
MAX_FRAME: Final = 256 * 1024 * 1024


class ReceiverError(RuntimeError):
    """The child could not be started, or broke the protocol."""


@dataclass(frozen=True)
class ReceiverSettings:
    """What the child needs to know: the connection, and the filters to subscribe to."""

    host: str
    port: int
    client_id: str
    keepalive_s: int
    session_expiry_s: int
    receive_maximum: int
    filters: list[tuple[str, int]]
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> ReceiverSettings:
        return cls(**{**data, "filters": [tuple(f) for f in data["filters"]]})


def encode_frame(obj: Any) -> bytes:
    data = marshal.dumps(obj)
    return _HEADER.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame; `asyncio.IncompleteReadError` when the other end closed."""
    (n,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if n > MAX_FRAME:
        raise ReceiverError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    # Both ends are this module, over pipes private to the two processes.
    return marshal.loads(await reader.readexactly(n))  # noqa: S302


# --- the hub's side ---------------------------------------------------------------------------


MessagesHandler = Callable[[int, list[tuple[str, bytes, int]]], None]


class ReceiverProcess:
    """One child process, one MQTT connection (see the module docstring).

    `run()` starts the child and returns when its connection ends, with the reason; messages
    go to `on_messages(first_index, items)` on the event loop, synchronously, in order;
    `on_up()` is called once subscribed.
    """

    def __init__(
        self,
        settings: ReceiverSettings,
        *,
        on_up: Callable[[], None],
        on_messages: MessagesHandler,
    ) -> None:
        self.settings = settings
        self._on_up = on_up
        self._on_messages = on_messages
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.up = False

    async def run(self) -> str:
        """Run one connection to its end; returns why it ended."""
        to_hub_r, to_hub_w = os.pipe()
        to_child_r, to_child_w = os.pipe()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "central_hub.mqtt_receiver",
                str(to_hub_w),
                str(to_child_r),
                stdin=asyncio.subprocess.DEVNULL,
                # Libraries print to stdout; the frames have their own pipes. Logs: stderr.
                stdout=asyncio.subprocess.DEVNULL,
                pass_fds=(to_hub_w, to_child_r),
            )
        finally:
            os.close(to_hub_w)
            os.close(to_child_r)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_FRAME)
        read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(to_hub_r, "rb", buffering=0)
        )
        write_transport, write_protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(to_child_w, "wb", buffering=0)
        )
        self._writer = asyncio.StreamWriter(write_transport, write_protocol, None, loop)
        reason = "the receiver process ended"
        try:
            self._send(self.settings.to_wire())
            while True:
                try:
                    frame = await read_frame(reader)
                except asyncio.IncompleteReadError:
                    break
                tag = frame[0]
                if tag == "msgs":
                    self._on_messages(frame[1], frame[2])
                elif tag == "up":
                    self.up = True
                    self._on_up()
                elif tag == "down":
                    reason = str(frame[1])
                    break
                else:
                    raise ReceiverError(f"unexpected frame from the receiver: {tag!r}")
        finally:
            self.up = False
            self._writer = None
            write_transport.close()
            read_transport.close()
            await self._reap()
        return reason

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def ack(self, through_index: int) -> None:
        """Acknowledge every message up to `through_index` (committed)."""
        self._send(("ack", through_index))

    def fetch_retained(self, filters: list[str]) -> None:
        self._send(("fetch_retained", filters))

    def stop(self) -> None:
        """Ask the child to disconnect cleanly; `run()` returns once it has."""
        self._send(("stop",))

    def kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()

    def _send(self, obj: Any) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            return  # the child is gone; what it had not acknowledged will be redelivered
        writer.write(encode_frame(obj))

    async def _reap(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            log.warning("MQTT receiver (pid %d) did not exit; killing it", proc.pid)
            proc.kill()
            await proc.wait()
        if proc.returncode not in (0, None):
            log.warning("MQTT receiver (pid %d) exited with %s", proc.pid, proc.returncode)


# --- the child -------------------------------------------------------------------------------


class _Dropped(Exception):
    """The connection ended before the hub committed this message: do not acknowledge it."""


class _Child:
    def __init__(self, settings: ReceiverSettings, out: asyncio.StreamWriter) -> None:
        self.s = settings
        self.out = out
        self.loop = asyncio.get_running_loop()
        self.next_index = 0
        self.chunk: list[tuple[str, bytes, int]] = []
        self.chunk_first = 0
        self.chunk_done: asyncio.Future[None] = self.loop.create_future()
        self.flush_handle: asyncio.TimerHandle | None = None
        #: (first, last index, future) of each chunk sent to the hub, oldest first.
        self.waiting: collections.deque[tuple[int, int, asyncio.Future[None]]] = collections.deque()
        #: Handlers whose message the hub acknowledged and which have not returned yet.
        self.releasing = 0
        self.released = asyncio.Event()
        self.closed = False
        self.ended = asyncio.Event()
        self.end_reason = "disconnected"
        self.subscribed = asyncio.Event()
        self.sub_error: str | None = None

    # gmqtt callbacks

    async def on_message(
        self, _client: Any, topic: str, payload: bytes, qos: int, _props: Any
    ) -> int:
        if self.closed:
            raise _Dropped
        index = self.next_index
        self.next_index = index + 1
        if not self.chunk:
            self.chunk_first = index
            self.chunk_done = self.loop.create_future()
        self.chunk.append((topic, bytes(payload), qos))
        done = self.chunk_done
        if len(self.chunk) >= CHUNK_MAX:
            self.flush()
        elif self.flush_handle is None:
            self.flush_handle = self.loop.call_later(CHUNK_DELAY_S, self.flush)
        await done
        self.releasing -= 1
        if self.releasing == 0:
            self.released.set()
        if self.closed:
            raise _Dropped
        return 0  # gmqtt sends PUBACK with this reason code (success)

    def on_subscribe(self, _client: Any, _mid: int, granted: Any, _props: Any) -> None:
        bad = [g for g in granted if isinstance(g, int) and g >= 0x80]
        if bad:
            self.sub_error = f"the broker refused the subscription (reason {bad[0]:#x})"
        self.subscribed.set()

    def on_disconnect(self, _client: Any, packet: Any, *_: Any) -> None:
        self.close(f"connection lost ({packet!r})" if packet else "connection lost")

    # the rest

    def flush(self) -> None:
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        if not self.chunk or self.closed:
            return
        last = self.chunk_first + len(self.chunk) - 1
        self.out.write(encode_frame(("msgs", self.chunk_first, self.chunk)))
        self.waiting.append((self.chunk_first, last, self.chunk_done))
        self.chunk = []

    def ack(self, through: int) -> None:
        while self.waiting and self.waiting[0][1] <= through:
            first, last, fut = self.waiting.popleft()
            if not fut.done():
                self.releasing += last - first + 1
                self.released.clear()
                fut.set_result(None)

    def close(self, reason: str) -> None:
        """No acknowledgement leaves after this: every waiting handler raises `_Dropped`."""
        if self.closed:
            return
        self.closed = True
        self.end_reason = reason
        pending = [f for _, _, f in self.waiting]
        if self.chunk:
            pending.append(self.chunk_done)
        for fut in pending:
            if not fut.done():
                fut.set_exception(_Dropped())
        self.waiting.clear()
        self.chunk = []
        self.ended.set()


def _ssl_context(s: ReceiverSettings) -> ssl.SSLContext | bool:
    if not s.tls:
        return False
    ctx = ssl.create_default_context(cafile=s.ca_file)
    if s.cert_file:
        ctx.load_cert_chain(s.cert_file, s.key_file)
    return ctx


def _quiet_dropped(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # gmqtt calls `result()` of each handler in a done-callback; a `_Dropped` there is the
    # intended "do not acknowledge", not an error.
    if isinstance(context.get("exception"), _Dropped):
        return
    loop.default_exception_handler(context)


async def _child_main(out_fd: int, in_fd: int) -> int:
    import gmqtt  # only the child needs it

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_dropped)
    reader = asyncio.StreamReader(limit=MAX_FRAME)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(in_fd, "rb", buffering=0)
    )
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(out_fd, "wb", buffering=0)
    )
    out = asyncio.StreamWriter(transport, protocol, None, loop)
    try:
        settings = ReceiverSettings.from_wire(await read_frame(reader))
    except (asyncio.IncompleteReadError, TypeError, ValueError, KeyError) as exc:
        log.error("MQTT receiver: no usable settings from the hub: %s", exc)
        return 2
    child = _Child(settings, out)
    client = gmqtt.Client(
        settings.client_id,
        clean_session=False,
        optimistic_acknowledgement=False,
        session_expiry_interval=settings.session_expiry_s,
        receive_maximum=settings.receive_maximum,
    )
    client.on_message = child.on_message
    client.on_subscribe = child.on_subscribe
    client.on_disconnect = child.on_disconnect

    async def end(reason: str, code: int) -> int:
        child.close(reason)
        with contextlib.suppress(Exception):
            out.write(encode_frame(("down", reason)))
            await out.drain()
        transport.close()
        return code

    try:
        await client.connect(
            settings.host,
            settings.port,
            ssl=_ssl_context(settings),
            keepalive=settings.keepalive_s,
            version=gmqtt.constants.MQTTv50,
        )
    except Exception as exc:  # refused, unreachable, TLS: say so and let the hub retry
        return await end(f"could not connect to {settings.host}:{settings.port}: {exc}", 0)
    client.subscribe([gmqtt.Subscription(f, qos=q) for f, q in settings.filters])
    await _first(child.subscribed.wait(), child.ended.wait())
    if child.sub_error or child.closed:
        await _disconnect(client)
        return await end(child.sub_error or child.end_reason, 0)
    out.write(encode_frame(("up",)))

    stopping = False
    fetch_lock = asyncio.Lock()
    fetches: set[asyncio.Task[None]] = set()

    async def fetch(filters: list[str]) -> None:
        async with fetch_lock:  # one plain subscription at a time: one SUBACK to wait for
            await _fetch_retained(client, child, filters)

    async def commands() -> None:
        nonlocal stopping
        while True:
            try:
                frame = await read_frame(reader)
            except asyncio.IncompleteReadError:
                child.close("the hub went away")  # nothing more is acknowledged
                return
            tag = frame[0]
            if tag == "ack":
                child.ack(frame[1])
            elif tag == "fetch_retained":
                # In the background: acknowledgements must not wait for a SUBACK.
                task = asyncio.ensure_future(fetch(frame[1]))
                fetches.add(task)
                task.add_done_callback(fetches.discard)
            elif tag == "stop":
                stopping = True
                return

    reading = asyncio.ensure_future(commands())
    await _first(reading, child.ended.wait())
    if stopping:
        # Let the handlers the hub acknowledged last return, and gmqtt send their PUBACKs
        # (from each handler's done-callback, one loop turn later), then leave.
        if child.releasing > 0:
            await child.released.wait()
        await asyncio.sleep(0)  # one turn: the done-callbacks that send the PUBACKs
        child.close("stopped by the hub")
        await _disconnect(client)
        return await end("stopped by the hub", 0)
    reading.cancel()
    await _disconnect(client)
    return await end(child.end_reason, 0)


async def _fetch_retained(client: Any, child: _Child, filters: list[str]) -> None:
    """Subscribe plainly to `filters` and leave again: the broker sends their retained copies
    (`Ingest` uses this for sites enabled after it subscribed)."""
    import gmqtt

    child.subscribed.clear()
    client.subscribe([gmqtt.Subscription(f, qos=1) for f in filters])
    await _first(child.subscribed.wait(), child.ended.wait())
    if not child.closed:
        client.unsubscribe(filters)


async def _disconnect(client: Any) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.disconnect(), 5)


async def _first(*aws: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m central_hub.mqtt_receiver OUT_FD IN_FD (started by the hub)")
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s mqtt-receiver: %(message)s"
    )
    logging.getLogger("gmqtt").setLevel(logging.WARNING)
    # Every message in flight is a task (gmqtt's acknowledge-after-handling mode), up to the
    # Receive Maximum (20,000) at once; with the default thresholds the cyclic GC ran so
    # often over those that it took most of the child's time (measured: a backlog drained
    # at ~5k messages/s). Collect young objects far less often; nothing here builds cycles
    # in bulk.
    gc.set_threshold(100_000, 50, 50)
    return asyncio.run(_child_main(int(args[0]), int(args[1])))


if __name__ == "__main__":
    sys.exit(main())
