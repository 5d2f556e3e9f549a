"""A hio Doist that sleeps until there is work: its wait is a poll.

hio's own ``Doist.do`` sleeps a fixed ``tock`` between cycles. :class:`Loop`
instead waits on every socket and file descriptor its doers registered, bounded
by the earliest hio timer (a deed whose ``retyme`` is in the future) and by
MAX_WAIT_S, then runs one cycle. Its ``tyme`` is wall time since it started, so
hio timers keep their meaning. A doer with tock 0 runs once per cycle: it is
woken by its sockets, not by spinning. This is the one place a supervisor
process waits (docs/design.md, "Core and shell").
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from hio.base.doing import Doer, Doist

from hiocluster.runtime.transport import Poller, Socket

__all__ = ["Loop", "RouterDoer", "MAX_WAIT_S"]

#: Longest wait between cycles: deadlines and signals are looked at this often.
MAX_WAIT_S = 0.05


class Loop(Doist):
    """See the module docstring. ``poller``: register sockets and fds to wake on."""

    def __init__(self, doers: Iterable[Any] = (), *, max_wait: float = MAX_WAIT_S) -> None:
        super().__init__(real=False, tock=0.0, doers=list(doers))
        self.poller = Poller()
        self.max_wait = max_wait
        self.asap = False  # a doer has more to do at once: skip the next wait
        self.due: float | None = None  # a doer wants a cycle by then (monotonic)
        self.ready: list[Any] = []  # what the last wait found readable (sockets, fds)
        self.checkpoints: list[Callable[[], None]] = []  # called after each wait (signals)
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
        if self.due is not None:
            timeout = max(0.0, min(timeout, self.due - time.monotonic()))
        return timeout

    def wake_by(self, when: float) -> None:
        """Run a cycle no later than ``when`` (monotonic seconds), once."""
        self.due = when if self.due is None else min(self.due, when)

    def wait(self) -> None:
        """Sleep until a registered socket or fd is ready, or the next cycle is due."""
        timeout = self.timeout()
        self.asap, self.due = False, None
        self.ready = self.poller.poll(timeout * 1000) if timeout > 0 else []
        for checkpoint in self.checkpoints:
            checkpoint()

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


class RouterDoer(Doer):
    """A doer that owns one bound ZeroMQ ROUTER socket in a :class:`Loop`: it is
    polled from :meth:`attach` on, closed in ``exit``."""

    router: Socket | None = None
    _loop: Loop | None = None
    #: ms its last frames get to leave when it closes (0: dropped)
    linger_ms = 0

    def attach(self, loop: Loop, router: Socket) -> None:
        self._loop, self.router = loop, router
        loop.poller.register(router)

    def reply(self, identity: bytes, frame: bytes) -> None:
        """Send ``frame`` to the peer ``identity``; a peer that is gone is no error
        (its process exit, or its silence, tells the core)."""
        assert self.router is not None
        self.router.put_to(identity, frame)

    def exit(self) -> None:
        if self.router is not None:
            if self._loop is not None:
                self._loop.poller.unregister(self.router)
            self.router.close(linger=self.linger_ms)
            self.router = None
