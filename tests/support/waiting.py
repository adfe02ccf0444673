"""Waiting for an event with a deadline, never for a fixed time (after psutil's test helpers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.01) -> T:
    """The first true value ``predicate`` returns, polled every ``interval`` seconds; an
    AssertionError naming it after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


async def until(predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.005) -> T:
    """``wait_for`` inside a running event loop: the loop goes on between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        await asyncio.sleep(interval)
