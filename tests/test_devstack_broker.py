"""The private broker the demo and the tests rely on really is a working Mosquitto."""

from __future__ import annotations

import asyncio

import aiomqtt

from devstack.broker import Mosquitto


async def test_private_mosquitto_delivers_a_retained_message(mosquitto: Mosquitto) -> None:
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
        await pub.publish("isocam/v1/test-site/state", b"hello", qos=1, retain=True)
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as sub:
        await sub.subscribe("isocam/v1/+/state", qos=1)
        async with asyncio.timeout(10):
            message = await anext(aiter(sub.messages))
    assert message.payload == b"hello"
    assert message.retain


def test_broker_stop_frees_the_port(mosquitto: Mosquitto) -> None:
    import socket

    mosquitto.stop()
    with socket.socket() as s:
        assert s.connect_ex((mosquitto.host, mosquitto.port)) != 0
