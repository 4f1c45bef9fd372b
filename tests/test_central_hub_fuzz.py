"""Fuzz the ingest through a real broker: random, malformed, oversized and mis-addressed
messages. The hub must keep running, count every reject under the right reason, and leave the
sites nobody touched exactly as they were.

5,000 messages per backend in the suite; the issue's 100,000:
``ISOCAM_FUZZ_MESSAGES=100000 .venv/bin/python -m pytest -q tests/test_central_hub_fuzz.py``.

The expected reason of each message comes from an oracle: sitelink's own `decode_delivery`
(tested on its own in test_sitelink_messages.py) plus the enrolment table; every generator
category is also checked to produce the reason it was written for, so the oracle cannot drift
into agreeing with a broken hub.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import sqlalchemy as sa

from central_hub import queries
from central_hub.db import Database
from central_hub.hub_config import IngestConfig
from central_hub.ingest import Ingest
from central_hub.sites_cli import enroll_site, set_site_enabled
from central_hub.status import cameras, outages
from devstack.broker import Mosquitto
from devstack.waiting import until
from sitelink.messages import (
    MAX_PAYLOAD_BYTES,
    CameraDown,
    CameraUp,
    GapClosed,
    GapOpened,
    ImageFaultEvent,
    MessageError,
    StateBirth,
    decode_delivery,
    encode,
)
from tests.test_central_hub_ingest import edge, inventory, mqtt_config

N_MESSAGES = int(os.environ.get("ISOCAM_FUZZ_MESSAGES", "5000"))

TARGET = "fz-target"  # gets random valid messages too: "touched"
CALM = ("fz-calm-1", "fz-calm-2", "fz-calm-3")  # set up before, never sent anything valid
DISABLED = "fz-off"
ENROLLED = {TARGET, *CALM, DISABLED}
EDGE_KINDS = ("state", "inventory", "health", "event", "cmd/reply")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    # Production brokers hold a backlog for the hub (docs/hub.md); Mosquitto's default of 1,000
    # queued messages per client would drop QoS 1 messages whenever the fuzzer outruns the hub.
    b = Mosquitto(workdir=tmp_path / "mq", extra_config=["max_queued_messages 0"]).start()
    yield b
    b.stop()


@pytest.fixture
def fuzz_db(hub_db_url: str) -> Iterator[Database]:
    db = Database.connect(hub_db_url)
    db.migrate()
    with db.engine.begin() as conn:
        for site_id in sorted(ENROLLED):
            enroll_site(
                conn,
                site_id=site_id,
                province="Đà Nẵng",
                district="Hải Châu",
                kind="facility",
                authority="health",
                operator="vnpt",
            )
        set_site_enabled(conn, DISABLED, False)
    yield db
    db.close()


def oracle(topic: str, payload: bytes) -> str:
    """What the hub must do with this message: a reject reason, or "accepted"."""
    try:
        delivery = decode_delivery(topic, payload)
    except MessageError as exc:
        return exc.reason
    site = delivery.topic.site_id
    if site not in ENROLLED:
        return "unknown_site"
    if site == DISABLED:
        return "disabled_site"
    return "accepted"


def _valid_event(rng: random.Random, seq: int) -> bytes:
    ts = time.time() - rng.uniform(0, 3600)
    cam = f"cam-{rng.randint(1, 4)}"
    choice = rng.randrange(5)
    if choice == 0:
        msg: Any = CameraDown(ts=ts, seq=seq, camera=cam, cause=rng.choice(["timeout", "eof"]))
    elif choice == 1:
        msg = CameraUp(ts=ts, seq=seq, camera=cam)
    elif choice == 2:
        msg = GapOpened(ts=ts, seq=seq, camera=cam, start=ts - 1, cause="stall")
    elif choice == 3:
        msg = GapClosed(ts=ts, seq=seq, camera=cam, start=ts - 5, end=ts, cause="stall")
    else:
        msg = ImageFaultEvent(ts=ts, seq=seq, camera=cam, fault="black", active=rng.random() < 0.5)
    return encode(msg)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    how = rng.randrange(6)
    if how == 0 and b:
        b[rng.randrange(len(b))] = rng.randrange(256)
    elif how == 1:
        b = b[: rng.randrange(len(b) + 1)]
    elif how == 2:
        pos = rng.randrange(len(b) + 1)
        b[pos:pos] = rng.randbytes(rng.randint(1, 8))
    elif how == 3:
        doc = json.loads(data)
        key = rng.choice(list(doc))
        doc[key] = rng.choice([None, "1", 1.5, -1, [], {}, True, 2**60, "x" * 300])
        b = bytearray(json.dumps(doc).encode())
    elif how == 4:
        doc = json.loads(data)
        doc[rng.choice(["extra", "Seq", "v2", "camera_id"])] = 1
        b = bytearray(json.dumps(doc).encode())
    else:
        doc = json.loads(data)
        del doc[rng.choice(list(doc))]
        b = bytearray(json.dumps(doc).encode())
    return bytes(b)


Generated = tuple[str, str, bytes]  # (category, topic, payload)


def generate(rng: random.Random, n: int) -> list[Generated]:
    """`n` messages, mostly hostile; the category says what each was written to provoke."""
    seq = iter(range(10_000, 10_000 + 10 * n))
    t = "isocam/v1/{}/{}"
    valid = lambda: _valid_event(rng, next(seq))  # noqa: E731
    cats: list[tuple[str, float, Callable[[], tuple[str, bytes]]]] = [
        (
            "bad_topic",
            1,
            lambda: (
                t.format(rng.choice(["UPPER", "a", "-x-", "x_y", "trạm-1", "x" * 70]), "event"),
                valid(),
            ),
        ),
        (
            "unknown_site",
            1,
            lambda: (t.format(f"zz-nowhere-{rng.randrange(10**6)}", "event"), valid()),
        ),
        ("disabled_site", 1, lambda: (t.format(DISABLED, "event"), valid())),
        ("empty", 1, lambda: (t.format(rng.choice([*CALM, TARGET]), rng.choice(EDGE_KINDS)), b"")),
        (
            "oversized",
            0.3,
            lambda: (
                t.format(rng.choice([*CALM, TARGET]), "health"),
                b'{"v":1,"x":"' + b"a" * MAX_PAYLOAD_BYTES + b'"}',
            ),
        ),
        (
            "bad_json",
            1,
            lambda: (
                t.format(rng.choice([*CALM, TARGET]), rng.choice(EDGE_KINDS)),
                rng.choice([b"{", b"[1,", b"nul", b'{"v":1,"ts":NaN']) + b"\xff" + rng.randbytes(3),
            ),
        ),
        (
            "unsupported_version",
            1,
            lambda: (t.format(rng.choice(CALM), "event"), valid().replace(b'"v":1', b'"v":2')),
        ),
        (
            "schema",
            1,
            lambda: (t.format(rng.choice(CALM), rng.choice(["inventory", "health"])), valid()),
        ),
        (
            "unknown_kind",
            1,
            lambda: (
                t.format(rng.choice(CALM), "event"),
                valid().replace(b'"kind":"', b'"kind":"x'),
            ),
        ),
        ("mutated", 3, lambda: (t.format(TARGET, "event"), _mutate(rng, valid()))),
        ("valid", 1, lambda: (t.format(TARGET, "event"), valid())),
    ]
    weights = [w for _, w, _ in cats]
    out: list[Generated] = []
    for _ in range(n):
        name, _, make = rng.choices(cats, weights)[0]
        topic, payload = make()
        out.append((name, topic, payload))
    return out


def snapshot(db: Database, site_ids: tuple[str, ...]) -> Any:
    with db.engine.connect() as conn:
        state = [queries.site_detail(conn, s, now=0.0) for s in site_ids]
        cams = conn.execute(
            sa.select(cameras)
            .where(cameras.c.site_id.in_(site_ids))
            .order_by(cameras.c.site_id, cameras.c.camera_id)
        ).all()
        outs = conn.execute(
            sa.select(outages).where(outages.c.site_id.in_(site_ids)).order_by(outages.c.id)
        ).all()
    return state, [tuple(r) for r in cams], [tuple(r) for r in outs]


async def test_fuzzed_messages_are_counted_and_harm_nothing(
    fuzz_db: Database, broker: Mosquitto
) -> None:
    ingest = Ingest(
        fuzz_db,
        mqtt_config(broker, receive_maximum=20_000),
        IngestConfig(
            batch_max_messages=2000,
            batch_max_delay_s=0.02,
            sites_refresh_s=60,
            reject_log_interval_s=60,
        ),
    )
    async with ingest:
        for site in CALM:
            async with edge(broker, site) as e:
                await e.birth()
                await e.send(inventory(["cam-1", "cam-2"]))
                await e.down("cam-2", time.time())
        await until(lambda: ingest.counters.stored_events == len(CALM), what="calm sites set up")
        await ingest.wait_idle()
        before = snapshot(fuzz_db, CALM)
        baseline = ingest.counters.snapshot()

        rng = random.Random(20210601)
        messages = generate(rng, N_MESSAGES)
        expected = Counter(oracle(topic, payload) for _, topic, payload in messages)
        by_category: dict[str, Counter[str]] = {}
        for cat, topic, payload in messages:
            by_category.setdefault(cat, Counter())[oracle(topic, payload)] += 1
        for cat in (
            "bad_topic",
            "unknown_site",
            "disabled_site",
            "empty",
            "oversized",
            "bad_json",
            "unsupported_version",
            "schema",
            "unknown_kind",
        ):
            assert set(by_category.get(cat, {cat: 1})) == {cat}, (cat, by_category.get(cat))
        assert set(by_category["valid"]) == {"accepted"}

        async with aiomqtt.Client(
            broker.host, broker.port, identifier="fuzzer", max_inflight_messages=200
        ) as fuzzer:
            for i in range(0, len(messages), 500):
                await asyncio.gather(
                    *(
                        fuzzer.publish(topic, payload, qos=1)
                        for _, topic, payload in messages[i : i + 500]
                    )
                )
        received = baseline["received"] + len(messages)
        await until(
            lambda: ingest.counters.received >= received,
            within=120,
            what=f"{len(messages)} fuzz messages received",
        )
        await ingest.wait_idle()
        after = ingest.counters.snapshot()

        rejected = Counter(
            {r: after["rejected"][r] - baseline["rejected"][r] for r in after["rejected"]}
        )
        accepted = sum(after["accepted"].values()) - sum(baseline["accepted"].values())
        assert after["received"] == received
        assert +rejected == +Counter({k: v for k, v in expected.items() if k != "accepted"})
        assert accepted == expected["accepted"]
        assert rejected["store_error"] == 0

        # Untouched sites are exactly as they were.
        assert snapshot(fuzz_db, CALM) == before
        # …and the hub still works.
        async with edge(broker, CALM[0]) as e:
            e.seq = 1
            await e.up("cam-2", time.time())

        def rag() -> str | None:
            with fuzz_db.engine.connect() as conn:
                return (queries.site_detail(conn, CALM[0]) or {}).get("rag")

        await until(lambda: rag() == "green", what="a valid event after the fuzz")
    birth_only = StateBirth(
        ts=time.time(), bdseq=1, agent_version="1", started=time.time(), last_seq=0
    )
    assert oracle(f"isocam/v1/{TARGET}/state", encode(birth_only)) == "accepted"
