"""A hub-side MQTT observer for tests and benchmarks: a persistent MQTT 5 session subscribed
to every site's topics, recording each message with its arrival time, resuming its session
when the broker comes back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devstack.broker import Mosquitto
from sitelink.messages import Message, decode
from sitelink.topics import Kind, hub_subscriptions, parse_topic, topic


@dataclass(frozen=True)
class Received:
    at: float  # time.monotonic() on arrival
    topic: str
    payload: bytes
    retain: bool

    @property
    def kind(self) -> Kind:
        return parse_topic(self.topic).kind

    def message(self) -> Message:
        return decode(self.topic, self.payload)


class HubSubscriber:
    """The hub's side: a persistent MQTT 5 session subscribed to every site's topics.

    It records every message with its arrival time and reconnects (resuming its session) when
    the broker comes back after a restart.
    """

    def __init__(
        self, broker: Mosquitto, client_id: str = "hub-test", site: str = "site-a"
    ) -> None:
        self.broker = broker
        self.site = site
        self.client_id = client_id
        self.received: list[Received] = []
        self.client: aiomqtt.Client | None = None
        self._changed = asyncio.Condition()
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HubSubscriber:
        self._task = asyncio.create_task(self._run())
        async with asyncio.timeout(15):
            await self._subscribed.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        while True:
            try:
                async with aiomqtt.Client(
                    self.broker.host,
                    self.broker.port,
                    identifier=self.client_id,
                    protocol=aiomqtt.ProtocolVersion.V5,
                    clean_start=False,
                    properties=props,
                ) as client:
                    await client.subscribe(hub_subscriptions())
                    self.client = client
                    self._subscribed.set()
                    async for m in client.messages:
                        assert isinstance(m.payload, bytes)
                        self.received.append(
                            Received(time.monotonic(), m.topic.value, m.payload, m.retain)
                        )
                        async with self._changed:
                            self._changed.notify_all()
            except aiomqtt.MqttError:
                self._subscribed.clear()
                self.client = None
                await asyncio.sleep(0.2)  # retry delay while the broker is down

    async def wait_for(
        self, predicate: Callable[[list[Received]], bool], within: float = 20
    ) -> list[Received]:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: predicate(self.received))
        return self.received

    async def wait_subscribed(self) -> None:
        async with asyncio.timeout(30):
            await self._subscribed.wait()

    def of_kind(self, kind: Kind) -> list[Received]:
        return [r for r in self.received if r.kind == kind]

    def events(self) -> list[Message]:
        return [r.message() for r in self.of_kind(Kind.EVENT)]

    async def flush(self) -> None:
        """A QoS 1 round trip: the broker has processed our PUBACKs for everything before."""
        assert self.client is not None
        await self.client.publish("hub-test/ping", b"", qos=1)

    async def command(self, payload: bytes) -> None:
        assert self.client is not None
        await self.client.publish(topic(self.site, Kind.CMD), payload, qos=1)
