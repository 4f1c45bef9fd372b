"""Device signatures of chain heads, checked by the hub after the ingest stored them
(central_hub/signatures.py): real Ed25519 keys, events through the real ingest, both backends."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry, generate_latest

from central_hub.db import Database
from central_hub.hub_config import IngestConfig, MqttConfig
from central_hub.ingest import Ingest
from central_hub.signatures import (
    SignatureChecker,
    SignatureCollector,
    signature_cursor,
    signature_failures,
)
from central_hub.sites import sites
from central_hub.sites_cli import enroll_site
from sitelink.messages import ChainHead, chain_head_payload, encode
from sitelink.signing import key_id, public_key_pem, sign_payload
from sitelink.topics import Kind, topic

BOX = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


@pytest.fixture
def db(hub_db_url: str) -> Iterator[Database]:
    database = Database.connect(hub_db_url)
    database.migrate()
    with database.engine.begin() as conn:
        for site_id, key in (("dn-bv-01", BOX), ("hn-bv-01", None)):
            enroll_site(
                conn,
                site_id=site_id,
                province="Đà Nẵng",
                district="Hải Châu",
                kind="facility",
                authority="health",
                operator="vnpt",
                device_public_key=public_key_pem(key) if key is not None else None,
            )
    yield database
    database.close()


def head(site: str, seq: int, key: Ed25519PrivateKey, *, row_hash: str = "a" * 64) -> ChainHead:
    now = time.time()
    signed = chain_head_payload(site, "cam-1", seq, "a" * 64, now)
    return ChainHead(
        ts=now,
        seq=seq,
        camera="cam-1",
        segment_seq=seq,
        row_hash=row_hash,  # what the box sent; the signature covers "a" * 64
        time=now,
        key_id=key_id(key),
        signature=sign_payload(key, signed),
    )


async def store(db: Database, *messages: tuple[str, ChainHead]) -> None:
    ingest = Ingest(db, MqttConfig(), IngestConfig())
    async with ingest.offline():
        for site, msg in messages:
            ingest.feed(topic(site, Kind.EVENT), encode(msg))
    assert ingest.counters.stored_events == len(messages)


async def test_heads_that_do_not_verify_are_alerted_once(db: Database) -> None:
    await store(
        db,
        ("dn-bv-01", head("dn-bv-01", 1, BOX)),  # good
        ("dn-bv-01", head("dn-bv-01", 2, OTHER)),  # another key signed it
        ("dn-bv-01", head("dn-bv-01", 3, BOX, row_hash="b" * 64)),  # altered after signing
        ("dn-bv-01", head("hn-bv-01", 4, BOX)),  # signed for another site
        ("hn-bv-01", head("hn-bv-01", 1, BOX)),  # no key enrolled for this site
    )
    checker = SignatureChecker(db)
    alerts = checker.check()
    got = sorted((a["seq"], a["reason"]) for a in alerts)
    assert got == [(2, "wrong_key"), (3, "bad_signature"), (4, "bad_signature")]
    assert all(a["type"] == "signature" and a["severity"] == "critical" for a in alerts)
    assert all(a["site_id"] == "dn-bv-01" and a["camera_id"] == "cam-1" for a in alerts)
    assert "chữ ký không hợp lệ" in next(a["text_vi"] for a in alerts if a["seq"] == 3)
    assert checker.counters.verified == 1 and checker.counters.unverifiable_sites == 1
    assert checker.check() == []  # the cursor moved on
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SignatureCollector(checker.counters))
    text = generate_latest(registry).decode()
    assert "isocam_hub_signatures_verified_total 1.0" in text
    assert "isocam_hub_signatures_failed_total 3.0" in text
    assert "isocam_hub_signatures_unverifiable_sites 1.0" in text

    # Another hub instance, from scratch: the failures are recorded, not alerted twice.
    with db.engine.begin() as conn:
        conn.execute(signature_cursor.delete())
    assert SignatureChecker(db).check() == []
    with db.engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(signature_failures)).scalar()
    assert n == 3

    # The key is enrolled later: what came before is checked from then on.
    with db.engine.begin() as conn:
        conn.execute(
            sites.update()
            .where(sites.c.site_id == "hn-bv-01")
            .values(device_public_key=public_key_pem(BOX))
        )
    later = SignatureChecker(db)
    assert later.check() == []
    assert later.counters.verified == 1  # hn-bv-01's head (dn-bv-01 was checked already)
