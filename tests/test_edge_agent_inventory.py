"""The camera inventory keeps a camera's id across restarts and IP changes."""

from __future__ import annotations

from pathlib import Path

from edge_agent.inventory import Inventory
from edge_agent.onvif_device import DeviceReport, Profile


def _report(host: str, serial: str | None, port: int = 80) -> DeviceReport:
    return DeviceReport(
        host=host,
        port=port,
        manufacturer="Hik",
        model="DS-2CD",
        firmware="5.7",
        serial=serial,
        profiles=[
            Profile("main", "main", "H264", 1920, 1080, 25, 4096, f"rtsp://{host}/main"),
            Profile("sub", "sub", "H264", 640, 360, 25, 512, f"rtsp://{host}/sub"),
        ],
    )


def test_a_camera_keeps_its_id_when_its_address_changes(tmp_path: Path) -> None:
    inv = Inventory(tmp_path / "edge.db")
    first = inv.record_onvif(_report("10.0.0.5", "SN1"), "discovery")
    other = inv.record_onvif(_report("10.0.0.6", "SN2"), "discovery")
    moved = inv.record_onvif(_report("10.0.0.77", "SN1"), "discovery")
    assert first.id == moved.id != other.id
    assert moved.host == "10.0.0.77"
    assert moved.rtsp_main == "rtsp://10.0.0.77/main"
    assert moved.first_seen == first.first_seen
    assert moved.source == "discovery"


def test_the_inventory_survives_a_restart(tmp_path: Path) -> None:
    inv = Inventory(tmp_path / "edge.db")
    cam = inv.record_onvif(_report("10.0.0.5", "SN1"), "manual")
    inv.close()
    again = Inventory(tmp_path / "edge.db")
    assert again.cameras() == [cam]
    assert again.record_onvif(_report("10.0.0.9", "SN1"), "discovery").id == cam.id


def test_a_camera_that_refused_onvif_is_listed_with_its_reason(tmp_path: Path) -> None:
    inv = Inventory(tmp_path / "edge.db")
    failed = DeviceReport(
        host="10.0.0.8", port=80, error="unauthorized", error_message="wrong password"
    )
    cam = inv.record_onvif(failed, "discovery")
    assert not cam.onvif_ok and cam.error == "unauthorized"
    # later it answers: same row, matched on its address since it had no serial then
    assert inv.record_onvif(_report("10.0.0.8", "SN8"), "discovery").id == cam.id
    assert len(inv.cameras()) == 1


def test_cameras_pinned_by_rtsp_url_keep_their_configured_id(tmp_path: Path) -> None:
    inv = Inventory(tmp_path / "edge.db")
    cam = inv.record_rtsp("gate-1", "Cổng chính", "rtsp://10.0.0.20/stream1", None)
    assert inv.get("gate-1") == cam
    assert cam.source == "rtsp" and cam.name == "Cổng chính"
