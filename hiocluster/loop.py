"""A hio Doist that sleeps until there is work: its wait is a poll.

hio's own ``Doist.do`` sleeps a fixed ``tock`` between cycles. :class:`Loop`
instead waits on every socket and file descriptor its doers registered, bounded
by the earliest hio timer (a deed whose ``retyme`` is in the future) and by
MAX_WAIT_S, then runs one cycle. Its ``tyme`` is wall time since it started, so
hio timers keep their meaning. A doer with tock 0 runs once per cycle: it is
woken by its sockets, not by spinning. This is the one place a supervisor
process waits (docs/design.md, "Core and shell").

Imports: hio and transport.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

from hio.base.doing import Doist

from .transport import Poller

__all__ = ["Loop", "MAX_WAIT_S"]

#: Longest wait between cycles: deadlines and signals are looked at this often.
MAX_WAIT_S = 0.05


class Loop(Doist):
    """See the module docstring. ``poller``: register sockets and fds to wake on."""

    def __init__(self, doers: Iterable[Any] = (), *, max_wait: float = MAX_WAIT_S) -> None:
        super().__init__(real=False, tock=0.0, doers=list(doers))
        self.poller = Poller()
        self.max_wait = max_wait
        self.asap = False  # a doer has more to do at once: skip the next wait
        self._origin = time.monotonic()

    def tick(self, tock: float | None = None) -> float:  # type: ignore[override]
        """hio calls this after every cycle: tyme follows the monotonic clock."""
        self.tyme = time.monotonic() - self._origin
        return self.tyme

    def timeout(self) -> float:
        """Seconds until the next cycle is due (0 when a doer asked for one at once)."""
        if self.asap:
            return 0.0
        timeout = self.max_wait
        now = self.tyme
        for _, retyme, _ in self.deeds:
            if retyme is not None and retyme > now:
                timeout = min(timeout, retyme - now)
        return timeout

    def wait(self) -> None:
        """Sleep until a registered socket or fd is ready, or the next cycle is due."""
        timeout = self.timeout()
        self.asap = False
        if timeout > 0:
            self.poller.poll(timeout * 1000)

    def run(self) -> None:
        """Enter every doer, cycle until all are done, then exit them (always)."""
        self.enter()
        try:
            while self.deeds:
                self.recur()
                if self.deeds:
                    self.wait()
        finally:
            self.exit()
