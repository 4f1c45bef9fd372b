"""Enrolled sites and their attributes: what every scope and every report hangs on.

A site is enrolled at the hub (``central-hub sites add`` or the admin UI) before its messages
are accepted: ingest drops messages whose topic names a site not in this table, or a disabled
one. The attribute names and values are the contract between ingest, the policy and the board
(same words as `sitelink.messages.SiteInfo`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from central_hub.db import metadata, migration

SiteKind = Literal["facility", "checkpoint"]
Authority = Literal["health", "district", "military", "police", "other"]
Operator = Literal["vnpt", "viettel"]

SITE_KINDS: tuple[SiteKind, ...] = ("facility", "checkpoint")
AUTHORITIES: tuple[Authority, ...] = ("health", "district", "military", "police", "other")
OPERATORS: tuple[Operator, ...] = ("vnpt", "viettel")

sites = sa.Table(
    "sites",
    metadata,
    sa.Column("site_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.Text, nullable=False, server_default=""),
    sa.Column("province", sa.String(128), nullable=False),
    sa.Column("district", sa.String(128), nullable=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("authority", sa.String(16), nullable=False),
    sa.Column("operator", sa.String(16), nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("enrolled_at", sa.Float, nullable=False),
    #: the edge box's Ed25519 device key (PEM SubjectPublicKeyInfo): verifies its chain heads,
    #: tombstones and tunnel logins; NULL until the box is registered
    sa.Column("device_public_key", sa.Text, nullable=True),
    sa.Index("ix_sites_province_district", "province", "district"),
    sa.Index("ix_sites_operator", "operator"),
)


@migration("sites", 1, "enrolled sites and their attributes")
def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[sites])
    # v1 creates the table as declared now (device_public_key included); v2 adds the column
    # only to databases made before it existed.


@migration("sites", 2, "device public key of each site's edge box")
def _v2(conn: Connection) -> None:
    columns = {c["name"] for c in sa.inspect(conn).get_columns("sites")}
    if "device_public_key" not in columns:
        conn.execute(sa.text("ALTER TABLE sites ADD COLUMN device_public_key TEXT"))


@dataclass(frozen=True)
class SiteAttrs:
    """The attributes the policy decides on (a row of `sites`)."""

    site_id: str
    province: str
    district: str | None
    kind: SiteKind
    authority: Authority
    operator: Operator
    enabled: bool = True

    @classmethod
    def from_row(cls, row: sa.Row[object] | dict[str, object]) -> SiteAttrs:
        m = row._mapping if isinstance(row, sa.Row) else row
        return cls(
            site_id=str(m["site_id"]),
            province=str(m["province"]),
            district=None if m["district"] is None else str(m["district"]),
            kind=m["kind"],  # type: ignore[arg-type]
            authority=m["authority"],  # type: ignore[arg-type]
            operator=m["operator"],  # type: ignore[arg-type]
            enabled=bool(m["enabled"]),
        )


def get_site(conn: Connection, site_id: str) -> SiteAttrs | None:
    row = conn.execute(sa.select(sites).where(sites.c.site_id == site_id)).first()
    return None if row is None else SiteAttrs.from_row(row)
