"""Counting Python calls: budgets of work per tick that do not depend on a machine's speed."""

from __future__ import annotations

import sys
from typing import Any, Callable


def count_calls(action: Callable[[], None]) -> int:
    """The Python and C function calls made while ``action()`` runs (sys.setprofile)."""
    calls = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(profile)
    try:
        action()
    finally:
        sys.setprofile(None)
    return calls
