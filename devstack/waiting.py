"""Waiting on a real observable in tests and benchmarks, where there is no event to await."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def until(
    check: Callable[[], T], within: float = 30.0, what: str = "condition", *, every: float = 0.05
) -> T:
    """Poll `check` until it returns something truthy and return that; after `within` seconds
    fail with an AssertionError naming `what` and the last value seen."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what} (last value {value!r})")
        await asyncio.sleep(every)
