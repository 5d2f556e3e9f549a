"""One bounded wait for the tests: every wait is bounded by seconds, never by rounds."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition",
               interval: float = 0.02) -> T:
    """Call ``predicate`` until it returns something truthy; return that.

    Bounded by ``timeout`` seconds of wall-clock time (generous: the suite runs
    on loaded 2-core machines); raises AssertionError naming ``what`` on expiry.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
