"""Prometheus metrics of the edge daemon (prometheus-client), read at scrape time.

Nothing is updated on the recording path: a custom collector asks the daemon for its live
figures when Prometheus scrapes, so metrics cost nothing between scrapes. Served on
``metrics.listen`` (default 127.0.0.1:9108; empty turns it off) by the daemon's own aiohttp.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EdgeCollector(Collector):
    """Turns `status()` (the same dict `edge-agent status --json` prints) into metrics."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        s = self._status()
        up = GaugeMetricFamily("isocam_edge_up", "1 while the agent runs", labels=["site"])
        up.add_metric([s["site"]], 1.0)
        yield up
        uptime = GaugeMetricFamily("isocam_edge_uptime_seconds", "seconds since start")
        uptime.add_metric([], float(s["uptime_s"]))
        yield uptime
        events = CounterMetricFamily("isocam_edge_events", "events emitted since start")
        events.add_metric([], float(s["events"]))
        yield events
        forecast = s["disk"]["forecast_days"]
        if forecast is not None:
            days = GaugeMetricFamily(
                "isocam_edge_disk_forecast_days", "days of footage the data volume holds"
            )
            days.add_metric([], float(forecast))
            yield days
        uplink = s.get("uplink") or {}
        if uplink:
            connected = GaugeMetricFamily("isocam_edge_uplink_connected", "MQTT session up")
            connected.add_metric([], 1.0 if uplink.get("connected") else 0.0)
            yield connected
            depth = GaugeMetricFamily("isocam_edge_spool_depth", "messages waiting in the spool")
            depth.add_metric([], float(uplink.get("spool_depth") or 0))
            yield depth
        families = {
            "connected": GaugeMetricFamily(
                "isocam_camera_connected", "RTSP session delivering packets", labels=["camera"]
            ),
            "recording": GaugeMetricFamily(
                "isocam_camera_recording", "a segment is open", labels=["camera"]
            ),
            "fps": GaugeMetricFamily("isocam_camera_fps", "measured frame rate", labels=["camera"]),
            "bitrate_kbps": GaugeMetricFamily(
                "isocam_camera_bitrate_kbps", "measured bit rate", labels=["camera"]
            ),
            "last_packet_age_s": GaugeMetricFamily(
                "isocam_camera_last_packet_age_seconds", "since the last packet", labels=["camera"]
            ),
        }
        reconnects = CounterMetricFamily(
            "isocam_camera_reconnects", "reconnects since start", labels=["camera"]
        )
        segments = CounterMetricFamily(
            "isocam_camera_segments", "segments sealed since start", labels=["camera"]
        )
        for cam in s["cameras"]:
            for key, family in families.items():
                value = cam.get(key)
                if value is not None:
                    family.add_metric([cam["id"]], float(value))
            reconnects.add_metric([cam["id"]], float(cam.get("reconnects") or 0))
            segments.add_metric([cam["id"]], float(cam.get("segments") or 0))
        yield from families.values()
        yield reconnects
        yield segments


async def start_metrics_server(
    listen: str, status: Callable[[], dict[str, Any]]
) -> web.AppRunner | None:
    """Serve /metrics on `listen` ("host:port"); None (and an error logged) if it cannot bind."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgeCollector(status))

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE})

    host, _, port = listen.rpartition(":")
    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host.strip("[]") or "127.0.0.1", int(port)).start()
    except OSError as exc:
        log.error("metrics endpoint %s not available: %s", listen, exc)
        await runner.cleanup()
        return None
    return runner
