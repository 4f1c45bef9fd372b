"""The production broker config (deploy/mosquitto/) run for real: TLS, client certificates, ACL.

The broker runs deploy/mosquitto/mosquitto.conf and deploy/mosquitto/acl as written, with only
the listener moved to a loopback port and the certificate paths pointed at a throw-away PKI
(devstack.certs). A site's certificate CN is its site id; the hub's is `HUB_CN`.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devstack.broker import Mosquitto, localise_config
from devstack.certs import HUB_CN, CertificateAuthority, IssuedCert
from edge_agent.config import MqttConfig
from edge_agent.spool import Spool
from edge_agent.uplink import PENDING_SEQ, AckingClient, PublishRefused, Uplink
from sitelink.messages import CameraDown, Command, CommandReply, StateBirth, decode, encode
from sitelink.topics import Kind, hub_subscriptions, topic

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "mosquitto"


class Pki:
    """A CA, the broker's certificate and client certificates for site-a, site-b and the hub."""

    def __init__(self, directory: Path) -> None:
        self.ca = CertificateAuthority(directory)
        self.server = self.ca.issue_server()
        self.clients = {cn: self.ca.issue_client(cn) for cn in ("site-a", "site-b", HUB_CN)}

    def context(self, client: IssuedCert | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca.cert_file))
        if client is not None:
            ctx.load_cert_chain(client.cert_file, client.key_file)
        return ctx


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[Mosquitto]:
    paths = {
        "cafile": pki.ca.cert_file,
        "certfile": pki.server.cert_file,
        "keyfile": pki.server.key_file,
        "acl_file": DEPLOY / "acl",
    }
    mq = Mosquitto(
        workdir=tmp_path / "mosquitto", config_file=DEPLOY / "mosquitto.conf", config_paths=paths
    )
    mq.start()
    yield mq
    mq.stop()


def client(
    broker: Mosquitto, pki: Pki, cn: str | None, client_id: str, **kwargs: Any
) -> AckingClient:
    """A client of the sites' listener (8883 in production), or the hub's (8884) for HUB_CN."""
    port = broker.listener_ports[1] if cn == HUB_CN else broker.listener_ports[0]
    return AckingClient(
        broker.host,
        port,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=pki.context(pki.clients[cn] if cn else None),
        **{"timeout": 5, **kwargs},
    )


class Inbox:
    """Messages one connected client receives, awaitable by predicate."""

    def __init__(self, mqtt: aiomqtt.Client) -> None:
        self.mqtt = mqtt
        self.messages: list[tuple[str, bytes]] = []
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for m in self.mqtt.messages:
            assert isinstance(m.payload, bytes)
            self.messages.append((m.topic.value, m.payload))
            async with self._changed:
                self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[list[tuple[str, bytes]]], bool]) -> None:
        async with asyncio.timeout(15), self._changed:
            await self._changed.wait_for(lambda: predicate(self.messages))

    async def wait_for_payload(self, payload: bytes) -> list[tuple[str, bytes]]:
        """Every message up to and including the first with `payload`."""
        await self.wait_for(lambda msgs: any(p == payload for _, p in msgs))
        end = next(i for i, (_, p) in enumerate(self.messages) if p == payload)
        return self.messages[: end + 1]

    def close(self) -> None:
        self._task.cancel()


@pytest.fixture
async def hub(broker: Mosquitto, pki: Pki) -> AsyncIterator[Inbox]:
    async with client(broker, pki, HUB_CN, "hub-test") as mqtt:
        reasons = await mqtt.subscribe(hub_subscriptions())
        assert all(r.value < 0x80 for r in reasons)  # type: ignore[union-attr]
        inbox = Inbox(mqtt)
        yield inbox
        inbox.close()


def test_the_localised_config_is_the_production_one(broker: Mosquitto) -> None:
    assert broker.workdir is not None
    running = (broker.workdir / "mosquitto.conf").read_text().splitlines()
    for line in (
        "per_listener_settings true",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        "tls_version tlsv1.2",
        f"acl_file {DEPLOY / 'acl'}",
    ):
        assert line in running
    assert broker.url.startswith("mqtts://127.0.0.1:")


async def test_a_site_publishes_under_its_own_prefix_and_nowhere_else(
    broker: Mosquitto, pki: Pki, hub: Inbox
) -> None:
    async with client(broker, pki, "site-a", "edge-site-a") as site_a:
        await site_a.publish_acked(topic("site-a", Kind.EVENT), b"own-1", 1, False, 5)
        with pytest.raises(PublishRefused) as refused:
            await site_a.publish_acked(topic("site-b", Kind.EVENT), b"forged", 1, False, 5)
        assert refused.value.reason_code == 0x87  # Not authorized
        with pytest.raises(PublishRefused):
            await site_a.publish_acked(topic("site-b", Kind.STATE), b"forged", 1, True, 5)
        with pytest.raises(PublishRefused):  # nor may it pose as the hub
            await site_a.publish_acked(topic("site-b", Kind.CMD), b"forged", 1, False, 5)
        await site_a.publish_acked(topic("site-a", Kind.EVENT), b"own-2", 1, False, 5)
    seen = await hub.wait_for_payload(b"own-2")  # in order: the forged ones would be before
    assert seen == [
        (topic("site-a", Kind.EVENT), b"own-1"),
        (topic("site-a", Kind.EVENT), b"own-2"),
    ]


async def test_a_site_reads_only_its_own_commands(broker: Mosquitto, pki: Pki, hub: Inbox) -> None:
    async with client(broker, pki, "site-a", "edge-site-a") as site_a:
        await site_a.subscribe(topic("site-a", Kind.CMD), qos=1)
        await site_a.subscribe(topic("site-b", Kind.CMD), qos=1)  # granted, but filtered
        await site_a.subscribe("isocam/v1/+/event", qos=1)
        inbox = Inbox(site_a)
        await hub.mqtt.publish(topic("site-b", Kind.CMD), b"for site-b", qos=1)
        await hub.mqtt.publish(topic("site-a", Kind.CMD), b"for site-a", qos=1)
        assert await inbox.wait_for_payload(b"for site-a") == [
            (topic("site-a", Kind.CMD), b"for site-a")
        ]
        inbox.close()


async def test_a_site_cannot_knock_another_off_or_take_its_session(
    broker: Mosquitto, pki: Pki, hub: Inbox
) -> None:
    """site-b connecting with site-a's client id gets its own CN as client id instead: site-a
    stays connected, and site-b sees none of site-a's commands."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300
    async with client(
        broker, pki, "site-a", "edge-site-a", clean_start=False, properties=props
    ) as site_a:
        await site_a.subscribe(topic("site-a", Kind.CMD), qos=1)
        site_a_inbox = Inbox(site_a)
        async with client(
            broker, pki, "site-b", "edge-site-a", clean_start=False, properties=props
        ) as intruder:
            await intruder.subscribe(topic("site-b", Kind.CMD), qos=1)
            intruder_inbox = Inbox(intruder)
            await hub.mqtt.publish(topic("site-a", Kind.CMD), b"for site-a", qos=1)
            await hub.mqtt.publish(topic("site-b", Kind.CMD), b"for site-b", qos=1)
            assert await intruder_inbox.wait_for_payload(b"for site-b") == [
                (topic("site-b", Kind.CMD), b"for site-b")
            ]
            assert await site_a_inbox.wait_for_payload(b"for site-a") == [
                (topic("site-a", Kind.CMD), b"for site-a")
            ]
            intruder_inbox.close()
        site_a_inbox.close()
    assert broker.log_file.read_text().count("as site-a (") >= 1  # the CN became the id


async def test_a_client_without_a_valid_certificate_is_refused(
    broker: Mosquitto, pki: Pki, tmp_path: Path
) -> None:
    # TLS 1.3: the broker's "certificate required" alert comes after the client's handshake
    # completes, so the client sees no CONNACK (FIELD-NOTES: "only a timeout").
    with pytest.raises(aiomqtt.MqttError):
        async with client(broker, pki, None, "anonymous", timeout=2):
            pass
    rogue_ca = CertificateAuthority(tmp_path / "rogue", name="not the operator's CA")
    rogue = rogue_ca.issue_client("site-a")
    ctx = pki.context(None)
    ctx.load_cert_chain(rogue.cert_file, rogue.key_file)
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=ctx,
            timeout=2,
        ):
            pass


def uplink_config(broker: Mosquitto, pki: Pki, cn: str) -> MqttConfig:
    cert = pki.clients[cn]
    return MqttConfig(
        url=f"mqtts://{broker.host}:{broker.listener_ports[0]}",
        ca_file=pki.ca.cert_file,
        cert_file=cert.cert_file,
        key_file=cert.key_file,
        client_id="edge-site-a",
        keepalive_seconds=5,
        session_expiry_seconds=300,
        will_delay_seconds=5,
        health_interval_seconds=10,
        spool_max_bytes=1 << 20,
    )


async def test_uplink_over_tls_with_the_site_certificate(
    broker: Mosquitto, pki: Pki, hub: Inbox, tmp_path: Path
) -> None:
    async def on_command(cmd: Command) -> CommandReply:
        return CommandReply(ts=time.time(), id=cmd.id, ok=True, result={"cameras": 0})

    with Spool(tmp_path / "spool.db", site_id="site-a", max_bytes=1 << 20) as spool:
        cfg = uplink_config(broker, pki, "site-a")
        async with Uplink(cfg, site_id="site-a", spool=spool, on_command=on_command) as uplink:
            await uplink.wait_connected()
            event = CameraDown(ts=time.time(), seq=PENDING_SEQ, camera="cam-01", cause="eof")
            seq = await uplink.publish_event(event)
            rescan = f'{{"v":1,"ts":{time.time()},"id":"r-1","command":"rescan","args":{{}}}}'
            await hub.mqtt.publish(topic("site-a", Kind.CMD), rescan.encode(), qos=1)
            reply_topic = topic("site-a", Kind.CMD_REPLY)
            await hub.wait_for(lambda msgs: any(t == reply_topic for t, _ in msgs))
    births = [m for t, p in hub.messages if isinstance(m := decode(t, p), StateBirth)]
    assert [b.bdseq for b in births] == [1]
    kinds = {t: decode(t, p) for t, p in hub.messages}
    event_msg = kinds[topic("site-a", Kind.EVENT)]
    assert isinstance(event_msg, CameraDown) and event_msg.seq == seq
    reply = kinds[topic("site-a", Kind.CMD_REPLY)]
    assert isinstance(reply, CommandReply) and reply.ok and reply.id == "r-1"


async def test_uplink_with_another_sites_certificate_loses_no_event(
    broker: Mosquitto, pki: Pki, hub: Inbox, tmp_path: Path
) -> None:
    """Configured as site-a but holding site-b's certificate: the broker refuses everything it
    publishes; the uplink says why, keeps its events spooled and keeps trying."""
    with Spool(tmp_path / "spool.db", site_id="site-a", max_bytes=1 << 20) as spool:
        cfg = uplink_config(broker, pki, "site-b")
        uplink = Uplink(cfg, site_id="site-a", spool=spool, reconnect_min_seconds=0.1)
        await uplink.publish_event(
            CameraDown(ts=time.time(), seq=PENDING_SEQ, camera="cam-01", cause="eof")
        )
        async with uplink:
            async with asyncio.timeout(15):
                await uplink.wait_until(lambda u: u.counters.connect_failures >= 2)
            assert not uplink.connected
            assert spool.depth == 1
            assert uplink.status().last_error is not None
            assert "certificate CN" in uplink.status().last_error  # type: ignore[operator]
    assert [t for t, _ in hub.messages if t.startswith("isocam/v1/site-a/")] == []


def test_localising_a_config_never_falls_back_to_production_paths(tmp_path: Path) -> None:
    text = (DEPLOY / "mosquitto.conf").read_text()
    with pytest.raises(ValueError, match="no local file given for `acl_file`"):
        localise_config(
            text,
            host="127.0.0.1",
            ports=[1, 2],
            paths={"cafile": tmp_path, "certfile": tmp_path, "keyfile": tmp_path},
            workdir=tmp_path,
        )
    every = dict.fromkeys(("cafile", "certfile", "keyfile", "acl_file"), tmp_path)
    with pytest.raises(ValueError, match="more listeners than the 1 ports"):
        localise_config(text, host="127.0.0.1", ports=[1], paths=every, workdir=tmp_path)


async def test_the_hub_ingest_over_tls_with_its_certificate(
    broker: Mosquitto, pki: Pki, tmp_path: Path
) -> None:
    """The hub's real ingest (its receiver process) on the hubs' listener with the hub's
    certificate, fed by a site over the sites' listener with the site's."""
    from central_hub.db import Database
    from central_hub.hub_config import IngestConfig
    from central_hub.hub_config import MqttConfig as HubMqttConfig
    from central_hub.ingest import Ingest
    from central_hub.sites_cli import enroll_site
    from devstack.waiting import until

    db = Database.connect(f"sqlite:///{tmp_path / 'hub.db'}")
    db.migrate()
    with db.engine.begin() as conn:
        enroll_site(
            conn,
            site_id="site-a",
            province="Đà Nẵng",
            district="Hải Châu",
            kind="facility",
            authority="health",
            operator="vnpt",
            name="Điểm A",
        )
    hub_cert = pki.clients[HUB_CN]
    cfg = HubMqttConfig(
        host=broker.host,
        port=broker.listener_ports[1],
        tls=True,
        ca_file=pki.ca.cert_file,
        cert_file=hub_cert.cert_file,
        key_file=hub_cert.key_file,
        client_id=HUB_CN,
        session_expiry_s=60,
        receive_maximum=100,
    )
    try:
        async with (
            asyncio.timeout(60),  # a TLS failure would otherwise retry until pytest's timeout
            Ingest(db, cfg, IngestConfig(batch_max_messages=10)) as ingest,
        ):
            async with client(broker, pki, "site-a", "site-a") as site:
                event = CameraDown(ts=time.time(), seq=1, camera="cam-01", cause="eof")
                await site.publish(topic("site-a", Kind.EVENT), encode(event), qos=1)
                await until(lambda: ingest.counters.stored_events == 1, what="event stored")
            assert ingest.counters.acked >= 1
    finally:
        db.close()
