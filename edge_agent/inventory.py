"""The site's camera inventory, kept in the edge's SQLite so it survives restarts.

A camera keeps its id for life: it is matched on its ONVIF serial number (with the
manufacturer), so a camera that got a new IP address from DHCP is the same camera. Cameras
without ONVIF (pinned by RTSP URL) are matched on their configured id.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from edge_agent.onvif_device import DeviceReport

_TABLE = "cameras"


@dataclass(frozen=True)
class InventoryCamera:
    """One enrolled or seen camera as the rest of the agent uses it."""

    id: str
    name: str
    host: str | None
    port: int | None
    serial: str | None
    manufacturer: str | None
    model: str | None
    firmware: str | None
    rtsp_main: str | None  # never with credentials
    rtsp_sub: str | None
    codec: str | None
    onvif_ok: bool
    error: str | None
    source: str  # discovery | manual | config | rtsp
    first_seen: float
    last_seen: float

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> InventoryCamera:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})


class Inventory:
    """Camera rows in DATA/inventory.db; thread-safe, one short write transaction per update."""

    def __init__(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        # one connection shared by the agent's threads; every write holds self._lock
        self._db = sqlite_utils.Database(sqlite3.connect(db_path, check_same_thread=False))
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._lock = threading.Lock()
        if _TABLE not in self._db.table_names():
            self._db[_TABLE].create(  # type: ignore[union-attr]
                {
                    "id": str,
                    "name": str,
                    "host": str,
                    "port": int,
                    "serial": str,
                    "manufacturer": str,
                    "model": str,
                    "firmware": str,
                    "rtsp_main": str,
                    "rtsp_sub": str,
                    "codec": str,
                    "onvif_ok": int,
                    "error": str,
                    "source": str,
                    "first_seen": float,
                    "last_seen": float,
                    "profiles": str,
                },
                pk="id",
            )
            self._db[_TABLE].create_index(["manufacturer", "serial"])  # type: ignore[union-attr]
        if "image_reference" not in self._db[_TABLE].columns_dict:
            # the enrolment scene signature of image health (non-reversible: no picture)
            self._db[_TABLE].add_column("image_reference", bytes)  # type: ignore[union-attr]

    def close(self) -> None:
        self._db.close()

    def cameras(self) -> list[InventoryCamera]:
        rows = self._db.query(f"select * from {_TABLE} order by id")  # noqa: S608 - constant
        return [InventoryCamera.from_row(r) for r in rows]

    def get(self, camera_id: str) -> InventoryCamera | None:
        rows = list(self._db.query(f"select * from {_TABLE} where id = ?", [camera_id]))  # noqa: S608
        return InventoryCamera.from_row(rows[0]) if rows else None

    def image_reference(self, camera_id: str) -> bytes | None:
        """The camera's stored image-health reference signature, if it has one."""
        rows = list(
            self._db.query(f"select image_reference from {_TABLE} where id = ?", [camera_id])  # noqa: S608
        )
        value = rows[0]["image_reference"] if rows else None
        return bytes(value) if value else None

    def set_image_reference(self, camera_id: str, signature: bytes) -> None:
        """Keep a camera's new enrolment reference (re-enrolment after it was moved on purpose
        is `edge-agent` policy, not this table's)."""
        with self._lock:
            self._db.execute(
                f"update {_TABLE} set image_reference = ? where id = ?",  # noqa: S608
                [signature, camera_id],
            )
            self._db.conn.commit()

    def _match(self, report: DeviceReport) -> dict[str, Any] | None:
        if report.serial:
            rows = list(
                self._db.query(
                    f"select * from {_TABLE} where serial = ? and coalesce(manufacturer, '') = ?",  # noqa: S608
                    [report.serial, report.manufacturer or ""],
                )
            )
            if rows:
                return rows[0]
        rows = list(
            self._db.query(
                f"select * from {_TABLE} where host = ? and port = ? and serial is null",  # noqa: S608
                [report.host, report.port],
            )
        )
        return rows[0] if rows else None

    def _next_id(self) -> str:
        n = 1 + max(
            (
                int(c.id.split("-")[-1])
                for c in self.cameras()
                if c.id.startswith("cam-") and c.id.split("-")[-1].isdigit()
            ),
            default=0,
        )
        return f"cam-{n:03d}"

    def record_onvif(self, report: DeviceReport, source: str) -> InventoryCamera:
        """Add or update the camera an ONVIF query found; returns it with its stable id."""
        now = time.time()
        main = report.profiles[0] if report.profiles else None
        sub = report.profiles[1] if len(report.profiles) > 1 else None
        with self._lock:
            existing = self._match(report)
            cam_id = existing["id"] if existing else self._next_id()
            row = {
                "id": cam_id,
                "name": existing["name"] if existing else f"{report.model or 'camera'} {cam_id}",
                "host": report.host,
                "port": report.port,
                "serial": report.serial,
                "manufacturer": report.manufacturer,
                "model": report.model,
                "firmware": report.firmware,
                "rtsp_main": main.rtsp_url if main else (existing or {}).get("rtsp_main"),
                "rtsp_sub": sub.rtsp_url if sub else (existing or {}).get("rtsp_sub"),
                "codec": main.codec if main else (existing or {}).get("codec"),
                "onvif_ok": int(report.ok),
                "error": report.error,
                "source": existing["source"] if existing else source,
                "first_seen": existing["first_seen"] if existing else now,
                "last_seen": now,
                "profiles": json.dumps([vars(p) for p in report.profiles]),
            }
            self._db[_TABLE].upsert(row, pk="id")  # type: ignore[union-attr]
        found = self.get(cam_id)
        assert found is not None
        return found

    def record_rtsp(
        self, camera_id: str, name: str, rtsp_main: str, rtsp_sub: str | None
    ) -> InventoryCamera:
        """Add or update a camera pinned by RTSP URL in the configuration (no ONVIF)."""
        now = time.time()
        with self._lock:
            existing = self.get(camera_id)
            self._db[_TABLE].upsert(  # type: ignore[union-attr]
                {
                    "id": camera_id,
                    "name": name,
                    "host": None,
                    "port": None,
                    "serial": None,
                    "manufacturer": None,
                    "model": None,
                    "firmware": None,
                    "rtsp_main": rtsp_main,
                    "rtsp_sub": rtsp_sub,
                    "codec": None,
                    "onvif_ok": 0,
                    "error": None,
                    "source": "rtsp",
                    "first_seen": existing.first_seen if existing else now,
                    "last_seen": now,
                    "profiles": "[]",
                },
                pk="id",
            )
        found = self.get(camera_id)
        assert found is not None
        return found
