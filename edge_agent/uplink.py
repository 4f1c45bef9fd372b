"""The edge's MQTT uplink to the hub: birth/death, inventory, health, spooled events, commands.

One long-lived task (`Uplink.start()`) keeps a connection to the broker (aiomqtt over paho 2.x,
MQTT 5, TLS with the site's client certificate for `mqtts://`, `clean_start` off with a session
expiry) and reconnects with jittered exponential backoff. On every connect, in this order
(docs/protocol.md, "Birth and death"):

1. a new `bdseq` is persisted; the MQTT will is the matching retained `StateDeath(lost)` with
   an MQTT 5 Will Delay Interval, so a blip shorter than `will_delay_seconds` pages no one;
2. subscribe to the site's own `cmd` topic;
3. publish the retained `StateBirth` and wait for its PUBACK;
4. publish the retained `Inventory` (if the daemon has given one);
5. send the spool (`edge_agent.spool`) oldest first, a window of QoS 1 publishes in flight, each
   row removed only on its PUBACK. The backlog of an outage therefore goes out in `seq` order,
   before anything newer, with the bytes (and timestamps) it was stored with.

Events are written to the spool *before* they are sent, connected or not. Health samples are sent
directly while connected; offline (or when the send fails) they are spooled without thumbnails
(pictures never touch the disk unsealed) and may be dropped when the spool is full. A broker
that refuses a publish (PUBACK reason ≥ 0x80, e.g. 0x87 when the ACL denies the topic because the
certificate CN is not this site id) does not get the row deleted: the uplink logs an error,
drops the connection and tries again later, so a misconfiguration delays events but loses none.

Commands on `cmd` are decoded with `sitelink`; each valid one goes to the daemon's
`on_command` handler in its own task, and the handler's `CommandReply` is published on
`cmd/reply`. Malformed or unknown commands, handler errors and timeouts become error replies
(with the request id when one can be read); none of them ends the uplink.

aiomqtt waits for a PUBACK but drops its reason code and awaits one publish at a time;
`AckingClient` adds pipelined publishes that return the reason code, by hooking paho's
`on_publish` as aiomqtt itself does (checked against aiomqtt 2.5 / paho 2.2; the ACL and spool
tests fail if a later version changes the hook).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import random
import re
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config import MqttConfig
from edge_agent.spool import Spool, SpooledMessage, SpoolStats
from sitelink.messages import (
    MAX_PAYLOAD_BYTES,
    Alarm,
    Command,
    CommandBase,
    CommandReply,
    EventBase,
    Health,
    Inventory,
    MessageError,
    ReplyError,
    StateBirth,
    decode_payload,
    encode,
    outgoing,
    request_id_of,
)
from sitelink.topics import POLICIES, Kind, check_site_id, topic, will_topic

log = logging.getLogger(__name__)

#: Placeholder `seq` for building an event to hand to `Uplink.publish_event`, which replaces it
#: with the site's next sequence number when the event is spooled.
PENDING_SEQ: Final = 1

#: Largest command the uplink accepts from the broker (MQTT 5 Maximum Packet Size in CONNECT;
#: the broker drops anything larger for this client). Commands over `MAX_PAYLOAD_BYTES` but
#: under this still get an `oversized` error reply.
MAX_INCOMING_PACKET: Final = 1024 * 1024

#: PUBACK reason codes from 0x80 up are refusals (MQTT 5 §3.4.2.1).
_REFUSED_FROM: Final = 0x80

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")
_BROKEN_JSON_ID_RE = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9._:-]{1,64})"')

CommandHandler = Callable[[Command], Awaitable[CommandReply]]


class PublishRefused(aiomqtt.MqttError):
    """The broker answered a publish with a failure reason code (e.g. 0x87 Not authorized)."""

    def __init__(
        self, topic_name: str, code: int, packet: int = PacketTypes.PUBACK, what: str = "publish"
    ) -> None:
        try:
            name = ReasonCode(packet, identifier=code).getName()
        except KeyError:
            name = "unknown reason"
        super().__init__(f"broker refused a {what} on {topic_name}: {name} (0x{code:02x})")
        self.reason_code = code


@dataclass
class UplinkCounters:
    """Monotonic counters for the daemon's status and Prometheus metrics."""

    published: int = 0  # PUBLISH packets sent for spooled rows and live health samples
    acked: int = 0  # of those, acknowledged by the broker (spooled rows then removed)
    replayed: int = 0  # spooled rows sent on a connection made after they were spooled
    refused: int = 0  # publishes the broker refused (PUBACK reason >= 0x80)
    health_spooled: int = 0  # health samples that went to the spool instead of the broker
    commands: int = 0  # commands received and decoded
    rejected_commands: int = 0  # commands that failed to decode (malformed, unknown, oversized)
    command_errors: int = 0  # valid commands whose handler failed, timed out or was busy
    replies_dropped: int = 0  # replies that could not be sent (link down)
    connects: int = 0  # sessions that reached a published birth
    connect_failures: int = 0  # attempts or sessions that ended in an error


@dataclass(frozen=True)
class UplinkStatus:
    """A snapshot for `edge-agent status` and the metrics endpoint."""

    connected: bool
    broker: str
    bdseq: int | None  # of the current (or last) birth
    connected_since: float | None
    last_error: str | None
    spool: SpoolStats
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def spool_depth(self) -> int:
        return self.spool.rows

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (`edge-agent status --json`)."""
        data = asdict(self)
        data["spool_depth"] = self.spool_depth
        return data


class AckingClient(aiomqtt.Client):
    """aiomqtt's client plus pipelined publishes that report the PUBACK reason code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: dict[int, asyncio.Future[int]] = {}
        self.receive_maximum = 65535  # MQTT 5 default when the CONNACK does not say

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        if properties is not None and hasattr(properties, "ReceiveMaximum"):
            self.receive_maximum = int(properties.ReceiveMaximum)
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(reason_code.value if isinstance(reason_code, ReasonCode) else 0)
        super()._on_publish(client, userdata, mid, reason_code, properties)

    def settle(self) -> None:
        """Mark the connection's end as seen: aiomqtt stores a lost connection's error in a
        future nobody may await when another task noticed first, and asyncio then logs
        "Future exception was never retrieved" at garbage collection."""
        if self._disconnected.done() and not self._disconnected.cancelled():
            self._disconnected.exception()
        acks, self._acks = self._acks, {}
        for fut in acks.values():  # publishes that will never be acknowledged now
            if not fut.done():
                fut.set_exception(aiomqtt.MqttError("connection closed before the PUBACK"))
                fut.exception()  # retrieved: the spool sender may already be gone

    def start_publish(
        self, topic_name: str, payload: bytes, qos: int, retain: bool
    ) -> asyncio.Future[int]:
        """Hand one PUBLISH to paho; the future resolves with the PUBACK reason code (0 for
        QoS 0 once written). Called in the event loop thread, like paho's callbacks."""
        info = self._client.publish(topic_name, payload, qos, retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if info.is_published():  # QoS 0 written at once: on_publish ran inside publish()
            fut.set_result(0)
        else:
            self._acks[info.mid] = fut
        return fut

    async def publish_acked(
        self, topic_name: str, payload: bytes, qos: int, retain: bool, ack_timeout: float
    ) -> None:
        """Publish and wait for the broker's acknowledgement; `PublishRefused` on a failure
        reason code, `aiomqtt.MqttError` on timeout or a lost connection."""
        fut = self.start_publish(topic_name, payload, qos, retain)
        # Also wake on a lost connection, rather than waiting out the timeout.
        waiting: list[asyncio.Future[Any]] = [fut, self._disconnected]
        await asyncio.wait(waiting, timeout=ack_timeout, return_when=asyncio.FIRST_COMPLETED)
        if not fut.done():
            fut.cancel()
            if self._disconnected.done():
                raise aiomqtt.MqttError(f"connection lost before the PUBACK for {topic_name}")
            raise aiomqtt.MqttError(f"no acknowledgement for {topic_name} in {ack_timeout} s")
        code = fut.result()
        if code >= _REFUSED_FROM:
            raise PublishRefused(topic_name, code)


@dataclass
class _InFlight:
    row: SpooledMessage
    ack: asyncio.Future[int]
    sent_at: float


class Uplink:
    """The MQTT side of the edge agent. Typical use by the daemon:

    uplink = Uplink(config.mqtt, site_id=config.site.id, spool=spool, on_command=handle)
    await uplink.start()
    uplink.set_inventory(inventory)
    await uplink.publish_event(CameraDown(ts=time.time(), seq=PENDING_SEQ, ...))
    await uplink.publish_health(sample)
    ...
    await uplink.aclose()   # publishes the `shutdown` death, disconnects
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        site_id: str,
        spool: Spool,
        on_command: CommandHandler | None = None,
        agent_version: str | None = None,
        started: float | None = None,
        reconnect_min_seconds: float = 0.5,
        reconnect_max_seconds: float = 30.0,
        max_inflight: int = 100,
        operation_timeout: float = 10.0,
        command_timeout: float = 60.0,
        max_concurrent_commands: int = 8,
    ) -> None:
        self.config = config
        self.site_id = check_site_id(site_id)
        if spool.site_id != site_id:
            raise ValueError(f"spool belongs to site {spool.site_id!r}, not {site_id!r}")
        self.spool = spool
        self.on_command = on_command
        self.agent_version = agent_version or _agent_version()
        self.started = time.time() if started is None else started
        self.reconnect_min_seconds = reconnect_min_seconds
        self.reconnect_max_seconds = reconnect_max_seconds
        self.max_inflight = max_inflight
        self.operation_timeout = operation_timeout
        self.command_timeout = command_timeout
        self.max_concurrent_commands = max_concurrent_commands
        self.counters = UplinkCounters()

        self._cmd_topic = topic(site_id, Kind.CMD)
        self._client: AckingClient | None = None
        self._connected = asyncio.Event()
        self._session_changed = asyncio.Condition()  # notified on connect, loss, failure
        self._stopping = asyncio.Event()
        self._run_task: asyncio.Task[None] | None = None
        self._birth: StateBirth | None = None
        self._connected_since: float | None = None
        self._last_error: str | None = None
        self._wake = asyncio.Event()  # spool appended or an ack arrived
        self._drained = asyncio.Event()  # the spool is empty (set by acks, cleared by appends)
        self._append_gen = 0  # bumped after each committed append (see `_send_spool`)
        self._inventory: Inventory | None = None
        self._inventory_key: bytes | None = None
        self._inventory_dirty = asyncio.Event()
        self._overflow_reported = False
        self._birth_acked_this_session = False
        self._command_tasks: set[asyncio.Task[None]] = set()
        self._commands_running = 0
        self._random = random.SystemRandom()

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background (returns at once; see `wait_connected`)."""
        if self._run_task is not None:
            raise RuntimeError("uplink already started")
        self._stopping.clear()
        self._run_task = asyncio.create_task(self._run(), name=f"uplink-{self.site_id}")
        await self._report_overflow()  # a spool that was already over its bound at start

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop cleanly: finish in-flight publishes, publish the `shutdown` death, disconnect.
        The spool stays on disk for the next start."""
        self._stopping.set()
        self._wake.set()  # the spool sender sees `_stopping` and drains what is in flight
        task, self._run_task = self._run_task, None
        if task is not None:
            try:
                async with asyncio.timeout(grace + self.operation_timeout):
                    await task
            except TimeoutError:
                log.error("uplink did not stop within %.0f s; cancelling it", grace)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for t in list(self._command_tasks):
            t.cancel()

    async def __aenter__(self) -> Uplink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def connected(self) -> bool:
        """A session is up and its birth acknowledged."""
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Until the birth of a session is acknowledged (wrap in `asyncio.timeout`)."""
        await self._connected.wait()

    async def wait_until(self, predicate: Callable[[Uplink], bool]) -> None:
        """Until `predicate(self)` holds, checked whenever a session comes up, ends or fails
        (wrap in `asyncio.timeout`). E.g. `wait_until(lambda u: u.counters.connects >= 2)`."""
        async with self._session_changed:
            await self._session_changed.wait_for(lambda: predicate(self))

    async def _notify_session_changed(self) -> None:
        async with self._session_changed:
            self._session_changed.notify_all()

    @property
    def bdseq(self) -> int | None:
        return self._birth.bdseq if self._birth else None

    @property
    def spool_depth(self) -> int:
        return self.spool.depth

    def status(self) -> UplinkStatus:
        """Everything `edge-agent status` and the metrics endpoint show about the uplink."""
        counters = asdict(self.counters)
        counters["dropped_health"] = self.spool.dropped_health
        return UplinkStatus(
            connected=self.connected,
            broker=f"{self.config.host}:{self.config.port}",
            bdseq=self.bdseq,
            connected_since=self._connected_since if self.connected else None,
            last_error=self._last_error,
            spool=self.spool.stats(),
            counters=counters,
        )

    # --- what the daemon publishes -----------------------------------------------------------

    async def publish_event(self, event: EventBase) -> int:
        """Spool `event` with the site's next `seq` (its own `seq` is ignored) and return that
        seq. When this returns the event is on disk; it is sent as soon as the link allows
        and removed from the spool only when the broker acknowledges it."""
        stamped = await asyncio.to_thread(self.spool.append_event, event)
        self._appended()
        await self._report_overflow()
        return stamped.seq

    async def publish_health(self, health: Health) -> None:
        """Send a health sample now if connected; otherwise (or if that fails) spool it,
        thumbnails removed, as droppable."""
        client = self._client if self.connected else None
        if client is not None:
            out = outgoing(self.site_id, health)
            self.counters.published += 1
            try:
                await client.publish_acked(
                    out.topic, out.payload, out.qos, out.retain, self.operation_timeout
                )
            except aiomqtt.MqttError as exc:
                if isinstance(exc, PublishRefused):
                    self.counters.refused += 1
                log.warning("health sample not delivered (%s); spooling it", exc)
            else:
                self.counters.acked += 1
                return
        await asyncio.to_thread(self.spool.append_health, _without_thumbnails(health))
        self.counters.health_spooled += 1
        self._appended()
        await self._report_overflow()

    def set_inventory(self, inventory: Inventory) -> bool:
        """Make `inventory` the site's retained inventory: published now if it differs from the
        last one (ignoring `ts`) and after every reconnect. Returns whether it changed."""
        if not isinstance(inventory, Inventory):
            raise TypeError(f"not an inventory: {type(inventory).__name__}")
        encode(inventory)  # oversized → MessageError here, in the caller, not in the uplink task
        key = inventory.model_dump_json(exclude={"ts"}).encode()
        if key == self._inventory_key:
            return False
        self._inventory, self._inventory_key = inventory, key
        self._inventory_dirty.set()
        return True

    def _appended(self) -> None:
        self._append_gen += 1
        self._drained.clear()
        self._wake.set()

    async def wait_drained(self) -> None:
        """Until the spool is empty: every spooled row acknowledged and deleted (wrap in
        `asyncio.timeout`). For tests, benchmarks and a daemon that wants to report it."""
        if self.spool.depth == 0:
            return
        await self._drained.wait()

    async def _report_overflow(self) -> None:
        """Turn a change of the spool's overflow state into an `alarm` event (once each way)."""
        state = self.spool.overflowing
        if state == self._overflow_reported:
            return
        self._overflow_reported = state
        stats = self.spool.stats()
        mib, bound = stats.bytes / 2**20, stats.max_bytes / 2**20
        if state:
            message = (
                f"Hàng đợi gửi về trung tâm vượt giới hạn ({mib:.1f} MiB > {bound:.1f} MiB): "
                "mọi sự kiện vẫn được giữ, không sự kiện nào bị xoá. Kiểm tra đường truyền tới "
                f"trung tâm. / Uplink spool over its bound ({mib:.1f} MiB > {bound:.1f} MiB, "
                f"{stats.events} events): all events are kept, none dropped. Check the link "
                "to the hub."
            )
        else:
            message = (
                f"Hàng đợi gửi về trung tâm đã trở lại dưới giới hạn ({mib:.1f} MiB). / "
                f"Uplink spool back under its bound ({mib:.1f} MiB)."
            )
        alarm = Alarm(
            ts=time.time(),
            seq=PENDING_SEQ,
            code="spool_overflow",
            level="critical",
            active=state,
            message=message,
        )
        await self.publish_event(alarm)

    # --- connection loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Whatever ended the session, the uplink itself must outlive it: log, back
                # off, reconnect. Unexpected errors get their traceback in the log.
                self.counters.connect_failures += 1
                if not isinstance(exc, aiomqtt.MqttError | OSError | ssl.SSLError):
                    self._last_error = f"uplink session failed: {type(exc).__name__}: {exc}"
                    log.exception("uplink: unexpected error; reconnecting")
                elif isinstance(exc, PublishRefused):
                    self.counters.refused += 1
                    if exc.reason_code == 0x87:
                        self._last_error = (
                            f"{exc} — the broker's ACL does not let this certificate publish "
                            f"as site {self.site_id!r}: check that the certificate CN is the "
                            "site id"
                        )
                    else:
                        self._last_error = str(exc)
                    log.error("uplink: %s", self._last_error)
                else:
                    self._last_error = _describe(exc)
                    # A refused CONNECT is configuration, not weather: say it louder.
                    refused = isinstance(exc, MqttConnectError)
                    log.log(
                        logging.ERROR if refused else logging.WARNING,
                        "uplink: %s",
                        self._last_error,
                    )
            finally:
                self._connected.clear()
                self._client = None
            await self._notify_session_changed()
            if self._stopping.is_set():
                break
            if self._birth_acked_this_session:
                attempt = 0  # it was up: the next failure starts the backoff afresh
            delay = min(self.reconnect_max_seconds, self.reconnect_min_seconds * 2**attempt)
            delay *= self._random.uniform(0.5, 1.0)
            attempt = min(attempt + 1, 30)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()

    async def _session(self) -> None:
        """One connection from CONNECT to its end. Returns when `aclose()` stopped it;
        otherwise raises whatever ended it (`_run` logs it and backs off)."""
        self._birth_acked_this_session = False
        bdseq = await asyncio.to_thread(self.spool.next_bdseq)
        birth = StateBirth(
            ts=time.time(),
            bdseq=bdseq,
            agent_version=self.agent_version,
            started=self.started,
            last_seq=self.spool.last_seq,
        )
        client = await self._new_client(birth)
        backlog_until = await asyncio.to_thread(self.spool.max_id)
        try:
            async with client:
                await self._announce(client, birth)
                await self._serve(client, birth, backlog_until)
        finally:
            client.settle()

    async def _new_client(self, birth: StateBirth) -> AckingClient:
        """An unconnected client whose will is `birth`'s death, delayed by the Will Delay."""
        cfg = self.config
        will_props = Properties(PacketTypes.WILLMESSAGE)
        will_props.WillDelayInterval = cfg.will_delay_seconds
        state = POLICIES[Kind.STATE]
        will = aiomqtt.Will(
            will_topic(self.site_id),
            encode(birth.matching_death("lost")),
            qos=state.qos,
            retain=state.retain,
            properties=will_props,
        )
        connect_props = Properties(PacketTypes.CONNECT)
        connect_props.SessionExpiryInterval = cfg.session_expiry_seconds
        connect_props.MaximumPacketSize = MAX_INCOMING_PACKET
        tls_context = await asyncio.to_thread(_tls_context, cfg) if cfg.tls else None
        return AckingClient(
            cfg.host,
            cfg.port,
            identifier=cfg.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            clean_start=False,
            keepalive=cfg.keepalive_seconds,
            properties=connect_props,
            tls_context=tls_context,
            timeout=self.operation_timeout,
            max_inflight_messages=self.max_inflight,
            logger=logging.getLogger("edge_agent.uplink.mqtt"),
        )

    async def _announce(self, client: AckingClient, birth: StateBirth) -> None:
        """Subscribe to commands, publish the birth, then the inventory (protocol order)."""
        reasons = await client.subscribe(self._cmd_topic, qos=POLICIES[Kind.CMD].qos)
        for reason in reasons:
            code = reason.value if isinstance(reason, ReasonCode) else int(reason)
            if code >= _REFUSED_FROM:
                raise PublishRefused(self._cmd_topic, code, PacketTypes.SUBACK, "subscribe")
        out = outgoing(self.site_id, birth)
        await client.publish_acked(
            out.topic, out.payload, out.qos, out.retain, self.operation_timeout
        )
        self._birth, self._client = birth, client
        self._birth_acked_this_session = True
        self._connected_since = time.time()
        self.counters.connects += 1
        self._last_error = None
        self._connected.set()
        await self._notify_session_changed()
        log.info(
            "uplink connected to %s:%d as site %s (bdseq %d, %d spooled)",
            self.config.host,
            self.config.port,
            self.site_id,
            birth.bdseq,
            self.spool.depth,
        )
        if self._inventory is not None:
            self._inventory_dirty.set()
        await self._publish_inventory(client)

    async def _serve(self, client: AckingClient, birth: StateBirth, backlog_until: int) -> None:
        """Run the spool sender, the command listener and inventory updates until one fails
        (raise) or `aclose()` asks to stop (drain, publish the death, return)."""
        tasks = [
            asyncio.create_task(self._send_spool(client, backlog_until), name="uplink-spool"),
            asyncio.create_task(self._listen_commands(client), name="uplink-commands"),
            asyncio.create_task(self._inventory_loop(client), name="uplink-inventory"),
        ]
        stop_wait = asyncio.create_task(self._stopping.wait(), name="uplink-stop")
        try:
            done, _ = await asyncio.wait([*tasks, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            if stop_wait in done:
                await self._shutdown_session(client, tasks, birth)
                return
            for t in done:
                t.result()  # re-raise the error that ended the session
            raise aiomqtt.MqttError("uplink session task ended unexpectedly")
        except asyncio.CancelledError:
            # Cancelled instead of aclose(): still try to say goodbye, briefly.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._publish_death(client, birth, ack_timeout=2.0)
            raise
        finally:
            for t in [*tasks, stop_wait]:
                t.cancel()
            await asyncio.gather(*tasks, stop_wait, return_exceptions=True)
            self._connected.clear()

    async def _shutdown_session(
        self, client: AckingClient, tasks: list[asyncio.Task[None]], birth: StateBirth
    ) -> None:
        # The spool sender sees `_stopping`, stops taking rows and drains what is in flight.
        sender = tasks[0]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.operation_timeout):
                await asyncio.shield(sender)
        await self._publish_death(client, birth, ack_timeout=self.operation_timeout)

    async def _publish_death(
        self, client: AckingClient, birth: StateBirth, *, ack_timeout: float
    ) -> None:
        out = outgoing(self.site_id, birth.matching_death("shutdown"))
        await client.publish_acked(out.topic, out.payload, out.qos, out.retain, ack_timeout)
        log.info("uplink: published the shutdown death (bdseq %d)", birth.bdseq)

    async def _publish_inventory(self, client: AckingClient) -> None:
        if not self._inventory_dirty.is_set() or self._inventory is None:
            return
        self._inventory_dirty.clear()
        out = outgoing(self.site_id, self._inventory)
        try:
            await client.publish_acked(
                out.topic, out.payload, out.qos, out.retain, self.operation_timeout
            )
        except BaseException:
            self._inventory_dirty.set()  # try again on the next connection
            raise

    async def _inventory_loop(self, client: AckingClient) -> None:
        while True:
            await self._inventory_dirty.wait()
            await self._publish_inventory(client)

    # --- the spool sender ---------------------------------------------------------------------

    async def _send_spool(self, client: AckingClient, backlog_until: int) -> None:
        """Publish spooled rows in id order with a window in flight; delete each on its ack.

        Rows are fetched when something was appended since the last fetch that came back
        short (`_append_gen`), or when the last fetch filled the window. Acks arrive in
        order on one connection, so completed publishes are taken from the left.
        """
        window = max(1, min(self.max_inflight, client.receive_maximum))
        inflight: deque[_InFlight] = deque()
        last_id = 0
        fetched_gen = -1  # force a first fetch: the backlog
        more = True
        while True:
            self._wake.clear()
            acked: list[int] = []
            refused: PublishRefused | None = None
            while inflight and inflight[0].ack.done():
                item = inflight.popleft()
                code = item.ack.result()
                if code >= _REFUSED_FROM:
                    refused = PublishRefused(topic(self.site_id, item.row.kind), code)
                    break
                acked.append(item.row.id)
            if acked:
                await asyncio.to_thread(self.spool.ack, acked)
                self.counters.acked += len(acked)
                if self.spool.depth == 0:
                    self._drained.set()
                await self._report_overflow()
            if refused is not None:
                raise refused
            stopping = self._stopping.is_set()
            if stopping and not inflight:
                return
            free = window - len(inflight)
            if not stopping and free > 0 and (more or fetched_gen != self._append_gen):
                gen = self._append_gen
                rows = await asyncio.to_thread(self.spool.pending, last_id, free)
                more = len(rows) == free
                if not more:
                    fetched_gen = gen
                now = time.monotonic()
                for row in rows:
                    policy = POLICIES[row.kind]
                    fut = client.start_publish(
                        topic(self.site_id, row.kind), row.payload, policy.qos, policy.retain
                    )
                    fut.add_done_callback(self._ack_arrived)
                    inflight.append(_InFlight(row, fut, now))
                    last_id = row.id
                    self.counters.published += 1
                    if row.id <= backlog_until:
                        self.counters.replayed += 1
                if rows:
                    continue  # acks may already be in
            if self._wake.is_set():
                continue
            timeout = None
            if inflight:
                age = time.monotonic() - inflight[0].sent_at
                timeout = max(0.0, self.operation_timeout - age)
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                raise aiomqtt.MqttError(
                    f"broker did not acknowledge a spooled message within "
                    f"{self.operation_timeout} s"
                ) from None

    def _ack_arrived(self, _: asyncio.Future[int]) -> None:
        self._wake.set()

    # --- commands -----------------------------------------------------------------------------

    async def _listen_commands(self, client: AckingClient) -> None:
        async for message in client.messages:
            name = message.topic.value
            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            if name != self._cmd_topic:
                log.warning("uplink: ignoring a message on %s (not this site's cmd)", name[:120])
                continue
            task = asyncio.create_task(self._guarded_command(bytes(payload)), name="uplink-cmd")
            self._command_tasks.add(task)
            task.add_done_callback(self._command_tasks.discard)

    async def _guarded_command(self, payload: bytes) -> None:
        try:
            await self._handle_command(payload)
        except Exception:  # a bug here must cost one reply, not the listener or the agent
            log.exception("uplink: unexpected error while handling a command")

    async def _handle_command(self, payload: bytes) -> None:
        try:
            message = decode_payload(Kind.CMD, payload)
        except MessageError as exc:
            self.counters.rejected_commands += 1
            request_id = salvage_request_id(payload)
            log.warning(
                "uplink: rejected a command (%s): %s%s",
                exc.reason,
                exc,
                "" if request_id else "; no request id to reply to",
            )
            if request_id is not None:
                await self._reply(_error_reply(request_id, exc.reason, str(exc)))
            return
        assert isinstance(message, CommandBase)
        command: Command = message  # type: ignore[assignment]
        self.counters.commands += 1
        if self._commands_running >= self.max_concurrent_commands:
            self.counters.command_errors += 1
            await self._reply(
                _error_reply(command.id, "busy", "too many commands in progress; try again")
            )
            return
        if self.on_command is None:
            self.counters.command_errors += 1
            await self._reply(_error_reply(command.id, "failed", "the edge takes no commands"))
            return
        self._commands_running += 1
        try:
            async with asyncio.timeout(self.command_timeout):
                reply = await self.on_command(command)
        except TimeoutError:
            self.counters.command_errors += 1
            log.error("uplink: command %s (%s) timed out", command.command, command.id)
            reply = _error_reply(
                command.id, "failed", f"no result within {self.command_timeout:.0f} s"
            )
        except Exception as exc:
            self.counters.command_errors += 1
            log.exception("uplink: command %s (%s) failed", command.command, command.id)
            reply = _error_reply(
                command.id,
                "failed",
                f"the edge could not carry out {command.command} ({type(exc).__name__}); "
                "see the edge agent's log",
            )
        finally:
            self._commands_running -= 1
        if not isinstance(reply, CommandReply) or reply.id != command.id:
            self.counters.command_errors += 1
            log.error("uplink: handler returned no reply for %s", command.id)
            reply = _error_reply(command.id, "failed", "the edge produced no valid reply")
        await self._reply(reply)

    async def _reply(self, reply: CommandReply) -> None:
        """Send a reply on the current connection; replies are never spooled (a snapshot
        reply holds a picture, and a late reply is useless to a hub that timed out)."""
        client = self._client if self.connected else None
        if client is None:
            self.counters.replies_dropped += 1
            log.warning("uplink: reply to %s dropped: not connected", reply.id)
            return
        try:
            out = outgoing(self.site_id, reply)
        except MessageError as exc:  # oversized result
            out = outgoing(self.site_id, _error_reply(reply.id, "failed", str(exc)))
        try:
            await client.publish_acked(
                out.topic, out.payload, out.qos, out.retain, self.operation_timeout
            )
        except aiomqtt.MqttError as exc:
            self.counters.replies_dropped += 1
            log.warning("uplink: reply to %s not delivered: %s", reply.id, exc)


# --- helpers ----------------------------------------------------------------------------------


def _agent_version() -> str:
    try:
        return importlib.metadata.version("isocam")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def _tls_context(cfg: MqttConfig) -> ssl.SSLContext:
    """Verify the broker against `ca_file` (system CAs when absent); present the site's cert."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(cfg.ca_file) if cfg.ca_file else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert_file is not None and cfg.key_file is not None:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    return ctx


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, aiomqtt.MqttError) and "timed out" in text.lower():
        text += " (no answer from the broker; with TLS, a refused client certificate looks so)"
    return f"connection to the broker failed: {text}"


def _without_thumbnails(health: Health) -> Health:
    if not any(c.thumbnail_jpeg for c in health.cameras):
        return health
    cameras = [c.model_copy(update={"thumbnail_jpeg": None}) for c in health.cameras]
    return health.model_copy(update={"cameras": cameras})


def _error_reply(request_id: str, code: str, message: str) -> CommandReply:
    text = _CONTROL_RE.sub(" ", message).strip()[:1000] or code
    return CommandReply(
        ts=time.time(), id=request_id, ok=False, error=ReplyError(code=code, message=text)
    )


def salvage_request_id(payload: bytes) -> str | None:
    """The request id of a command that failed to decode, so it can still get its error reply.

    `request_id_of` reads well-formed JSON up to MAX_PAYLOAD_BYTES. Beyond that: an oversized
    command (up to MAX_INCOMING_PACKET, all the broker sends us) is parsed anyway, and broken
    JSON is searched for a top-level-looking `"id": "..."` in its first 4 KiB. A wrong guess
    costs one error reply the hub cannot match; no guess costs the hub a timeout.
    """
    rid = request_id_of(payload)
    if rid is not None or not payload or len(payload) > MAX_INCOMING_PACKET:
        return rid
    if len(payload) > MAX_PAYLOAD_BYTES:
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError):
            data = None
        found = data.get("id") if isinstance(data, dict) else None
        if isinstance(found, str) and _REQUEST_ID_RE.fullmatch(found):
            return found
    match = _BROKEN_JSON_ID_RE.search(payload[:4096])
    return match.group(1).decode() if match else None
