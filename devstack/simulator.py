"""Start a `camera-sim run` process and wait until its cameras are ready (demo and tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def launch_simulator(
    state_file: Path, *args: str, cameras: int = 4, prefix: Sequence[str] = ()
) -> tuple[subprocess.Popen[str], list[dict[str, Any]]]:
    """Start camera-sim and read the JSON line it prints per camera once all are ready.

    `prefix` runs it through another command, e.g. ``ip netns exec NS``."""
    proc = subprocess.Popen(
        [
            *prefix,
            str(BIN / "camera-sim"),
            "run",
            "--cameras",
            str(cameras),
            "--state-file",
            str(state_file),
            *args,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    cams = []
    for _ in range(cameras):
        line = proc.stdout.readline()  # blocks until ready; callers bound it (pytest-timeout)
        if not line:
            raise RuntimeError(f"camera-sim exited with {proc.wait()} before it was ready")
        cams.append(json.loads(line))
    return proc, cams
