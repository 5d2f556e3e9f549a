"""How many ticks one GRANT covers (docs/protocol.md §7, "Windows").
"""

from __future__ import annotations

__all__ = ["WindowSizer"]


class WindowSizer:
    """How many ticks the next GRANT covers.

    Fixed with ``window``; else it starts at FIRST and grows (at most GROWTH
    times per window) while windows run quicker than TARGET_S, shrinking when
    one runs slower, so a window stays around TARGET_S of wall time. In real
    time it is TARGET_S of ticks. Always bounded so one DONE stays under
    MAX_DONE_BYTES. (Progress and STOP do not wait for a window's end: workers
    report every 0.1 s inside one.)
    """

    TARGET_S = 0.1
    FIRST = 16
    GROWTH = 8
    MAX = 100_000
    MAX_DONE_BYTES = 4 * 1024 * 1024

    def __init__(self, window: int | None, record_bytes: int, tock: float, real: bool) -> None:
        self.fixed = window is not None
        limit = max(1, self.MAX_DONE_BYTES // max(1, record_bytes))
        self.limit = window if window is not None else min(self.MAX, limit)
        if window is not None:
            self.size = window
        elif real:
            self.fixed = True
            self.size = min(self.limit, max(1, int(self.TARGET_S / tock)))
        else:
            self.size = min(self.limit, self.FIRST)

    def observe(self, ticks: int, seconds: float, done_bytes: int = 0) -> None:
        """A window of ``ticks`` took ``seconds``, and its largest DONE was
        ``done_bytes`` (observations make them larger): size the next one."""
        if not self.fixed and ticks and done_bytes:
            self.limit = min(self.limit, max(1, self.MAX_DONE_BYTES * ticks // done_bytes))
            self.size = min(self.size, self.limit)
        if self.fixed or ticks < self.size:
            return
        per_tick = seconds / ticks if ticks else 0.0
        wanted = self.TARGET_S / per_tick if per_tick > 0 else self.size * self.GROWTH
        self.size = max(1, min(self.limit, self.size * self.GROWTH, int(wanted)))
