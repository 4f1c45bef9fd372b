"""Box-level health: disk, CPU, memory, uptime, version (psutil), for the periodic `health`
message and `edge-agent status`."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil

from sitelink import messages as m


def agent_version() -> str:
    try:
        return metadata.version("isocam")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "0.0.0+src"


@dataclass
class SiteSampler:
    """Samples the box; `cpu_percent` is measured since the previous sample (psutil keeps the
    previous CPU times), so call `sample()` at a steady interval."""

    data_dir: Path
    started: float

    def __post_init__(self) -> None:
        psutil.cpu_percent(None)  # prime: the first call has nothing to compare with

    def sample(
        self, *, forecast_days: float | None, spool_depth: int, clock_offset_s: float | None
    ) -> m.SiteHealth:
        disk = shutil.disk_usage(self.data_dir)
        mem = psutil.virtual_memory()
        return m.SiteHealth(
            disk_total_bytes=disk.total,
            disk_used_bytes=disk.used,
            disk_free_bytes=disk.free,
            forecast_days=None if forecast_days is None else min(max(forecast_days, 0.0), 1e6),
            cpu_percent=min(max(float(psutil.cpu_percent(None)), 0.0), 100.0),
            mem_total_bytes=int(mem.total),
            mem_used_bytes=int(mem.total - mem.available),
            clock_offset_s=clock_offset_s,
            agent_version=agent_version(),
            uptime_s=max(0.0, time.time() - self.started),
            spool_depth=spool_depth,
        )
