"""Checks the device signatures of the chain heads and tombstones the sites send.

Every minute a recording box signs the head of each camera's segment hash chain, and signs
every tombstone (segments removed on purpose), with its device key; enrolment records the
box's public key (`sites.device_public_key`). The ingest stores these events as they come; this
job verifies them afterwards, in a worker thread, so that an Ed25519 verification (~60 µs) per
event never slows the ingest (at 20,000 events/s it would take most of a core), and raises a
`signature` alert for each one that does not verify: a box whose key changed (replaced,
re-imaged: re-enrol it), or statements that were not made by the box.

Per site a cursor (`signature_cursor`) remembers the last (epoch, seq) checked; failures are
kept in `signature_failures` (one row per event, so two hub instances never alert one twice).
Sites without an enrolled key are skipped and counted (`unverifiable`), never failed: their
events are checked once the key is enrolled, from where the cursor stands.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import sqlalchemy as sa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy.engine import Connection

from central_hub.alerts import Alert, AlertHub, make_alert
from central_hub.db import Database, dialect_insert, metadata, migration
from central_hub.sites import SiteAttrs, sites
from central_hub.status import events
from sitelink.messages import ChainHead, MessageError, Tombstone, decode_payload
from sitelink.signing import SigningKeyError, key_id, load_public_key_pem
from sitelink.topics import Kind

log = logging.getLogger(__name__)

#: Events whose `signature` the device key made over `signing_payload(site_id)`.
SIGNED_KINDS: Final = ("chain_head", "tombstone")
#: Events read per site and pass at most (the next pass goes on).
BATCH: Final = 5000
#: How often the hub checks (`run_data_services`): a failure is alerted within this.
CHECK_INTERVAL_S: Final = 30.0

signature_cursor = sa.Table(
    "signature_cursor",
    metadata,
    sa.Column("site_id", sa.String(64), primary_key=True),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("checked_at", sa.Float, nullable=False),
)

signature_failures = sa.Table(
    "signature_failures",
    metadata,
    sa.Column("site_id", sa.String(64), primary_key=True),
    sa.Column("epoch", sa.Integer, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("camera_id", sa.String(64), nullable=True),
    sa.Column("kind", sa.String(32), nullable=False),
    # wrong_key: signed by another key than the enrolled one; bad_signature: the enrolled key's
    # id, but the signature does not verify; unreadable: the stored body does not parse.
    sa.Column("reason", sa.String(16), nullable=False),
    sa.Column("key_id", sa.String(16), nullable=True),
    sa.Column("event_ts", sa.Float, nullable=False),
    sa.Column("found_at", sa.Float, nullable=False),
)


@migration("verification", 1, "signature checks of chain heads and tombstones")
def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[signature_cursor, signature_failures])


@dataclass
class SignatureCounters:
    verified: int = 0
    failed: int = 0
    #: Signed events of sites without an enrolled device key (not checked yet).
    unverifiable_sites: int = 0
    passes: int = 0


class SignatureCollector:
    """A prometheus_client collector over `SignatureCounters` (register it on a registry)."""

    def __init__(self, counters: SignatureCounters) -> None:
        self._c = counters

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self._c
        yield CounterMetricFamily(
            "isocam_hub_signatures_verified", "Signed events that verified", value=c.verified
        )
        yield CounterMetricFamily(
            "isocam_hub_signatures_failed", "Signed events that did not verify", value=c.failed
        )
        yield GaugeMetricFamily(
            "isocam_hub_signatures_unverifiable_sites",
            "Enabled sites without an enrolled device key",
            value=c.unverifiable_sites,
        )


@dataclass
class _Site:
    attrs: SiteAttrs
    name: str
    public: Ed25519PublicKey | None
    key_id: str | None


@dataclass
class SignatureChecker:
    db: Database
    alerts: AlertHub | None = None
    counters: SignatureCounters = field(default_factory=SignatureCounters)

    def check(self, now: float | None = None) -> list[Alert]:
        """One pass over every site's signed events since its cursor; returns the alerts of
        the failures this pass found (`run` publishes them)."""
        t = time.time() if now is None else now
        found: list[Alert] = []
        unverifiable = 0
        for site in self._sites():
            if site.public is None:
                unverifiable += 1
                continue
            found.extend(self._check_site(site, t))
        self.counters.unverifiable_sites = unverifiable
        self.counters.passes += 1
        return found

    async def run(self, interval_s: float = CHECK_INTERVAL_S) -> None:
        """Check every `interval_s` until cancelled (in a worker thread: never blocks the
        event loop), publishing the failures' alerts."""
        while True:
            try:
                found = await asyncio.to_thread(self.check)
            except sa.exc.SQLAlchemyError as exc:
                log.warning("signature check failed: %s", str(exc).splitlines()[0][:300])
            else:
                for a in found:
                    log.error("%s", a["text_en"])
                if found and self.alerts is not None:
                    self.alerts.publish_many(found)
            await asyncio.sleep(interval_s)

    def _sites(self) -> list[_Site]:
        with self.db.engine.connect() as conn:
            rows = conn.execute(sa.select(sites).where(sites.c.enabled.is_(True))).all()
        out = []
        for r in rows:
            public: Ed25519PublicKey | None = None
            kid = None
            if r.device_public_key:
                try:
                    public = load_public_key_pem(r.device_public_key)
                    kid = key_id(public)
                except SigningKeyError as exc:
                    log.warning("site %s: enrolled device key unusable: %s", r.site_id, exc)
            out.append(_Site(SiteAttrs.from_row(r), r.name or r.site_id, public, kid))
        return out

    def _check_site(self, site: _Site, now: float) -> list[Alert]:
        sid = site.attrs.site_id
        alerts: list[Alert] = []
        with self.db.engine.begin() as conn:
            cur = conn.execute(
                sa.select(signature_cursor.c.epoch, signature_cursor.c.seq).where(
                    signature_cursor.c.site_id == sid
                )
            ).first()
            epoch, seq = (cur.epoch, cur.seq) if cur is not None else (-1, -1)
            rows = conn.execute(
                sa.select(events.c.epoch, events.c.seq, events.c.kind, events.c.ts, events.c.body)
                .where(
                    events.c.site_id == sid,
                    events.c.kind.in_(SIGNED_KINDS),
                    sa.tuple_(events.c.epoch, events.c.seq) > sa.tuple_(epoch, seq),
                )
                .order_by(events.c.epoch, events.c.seq)
                .limit(BATCH)
            ).all()
            if not rows:
                return alerts
            failures = []
            for r in rows:
                reason, camera, kid = _verify(site, r.body)
                if reason is None:
                    self.counters.verified += 1
                    continue
                failures.append(
                    {
                        "site_id": sid,
                        "epoch": r.epoch,
                        "seq": r.seq,
                        "camera_id": camera,
                        "kind": r.kind,
                        "reason": reason,
                        "key_id": kid,
                        "event_ts": r.ts,
                        "found_at": now,
                    }
                )
            for f in failures:
                # RETURNING, not rowcount: psycopg reports -1 for INSERT … ON CONFLICT.
                ins = (
                    dialect_insert(conn, signature_failures)
                    .on_conflict_do_nothing(index_elements=["site_id", "epoch", "seq"])
                    .returning(signature_failures.c.seq)
                )
                if conn.execute(ins, f).first() is None:
                    continue  # another hub instance recorded (and alerted) it
                self.counters.failed += 1
                alerts.append(_alert(site, f))
            last = rows[-1]
            upsert = dialect_insert(conn, signature_cursor)
            conn.execute(
                upsert.on_conflict_do_update(
                    index_elements=["site_id"],
                    set_={"epoch": last.epoch, "seq": last.seq, "checked_at": now},
                ),
                {"site_id": sid, "epoch": last.epoch, "seq": last.seq, "checked_at": now},
            )
        return alerts


def _verify(site: _Site, body: str) -> tuple[str | None, str | None, str | None]:
    """(failure reason or None, camera, key id) of one stored signed event."""
    assert site.public is not None
    try:
        msg: Any = decode_payload(Kind.EVENT, body.encode())
    except MessageError:
        return "unreadable", None, None
    if not isinstance(msg, ChainHead | Tombstone):
        return "unreadable", None, None
    camera = getattr(msg, "camera", None)
    if msg.key_id != site.key_id:
        return "wrong_key", camera, msg.key_id
    try:
        site.public.verify(
            base64.b64decode(msg.signature, validate=True),
            msg.signing_payload(site.attrs.site_id),
        )
    except (InvalidSignature, ValueError):
        return "bad_signature", camera, msg.key_id
    return None, camera, msg.key_id


def _alert(site: _Site, f: dict[str, Any]) -> Alert:
    what_en = {"chain_head": "chain head", "tombstone": "tombstone"}[f["kind"]]
    what_vi = {"chain_head": "đầu chuỗi băm", "tombstone": "bản ghi xoá"}[f["kind"]]
    why_en = {
        "wrong_key": f"signed by key {f['key_id']}, not the box's enrolled key",
        "bad_signature": "signature does not verify",
        "unreadable": "stored event unreadable",
    }[f["reason"]]
    why_vi = {
        "wrong_key": f"ký bằng khoá {f['key_id']}, không phải khoá đã đăng ký của hộp",
        "bad_signature": "chữ ký không hợp lệ",
        "unreadable": "không đọc được sự kiện đã lưu",
    }[f["reason"]]
    sid = f["site_id"]
    cam = f" camera {f['camera_id']}" if f["camera_id"] else ""
    return make_alert(
        "signature",
        at=f["event_ts"],
        severity="critical",
        site=site.attrs,
        site_name=site.name,
        camera_id=f["camera_id"],
        text_vi=f"Điểm {sid}{cam}: {what_vi} số {f['seq']} — {why_vi}",
        text_en=f"Site {sid}{cam}: {what_en} seq {f['seq']}: {why_en}",
        reason=f["reason"],
        epoch=f["epoch"],
        seq=f["seq"],
    )
