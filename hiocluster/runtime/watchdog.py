"""A worker's watchdog thread: its supervisor's connection, and its tick deadline.

Runs beside the worker's main thread, so it works while a node is busy:

* **orphan rule** (docs/protocol.md §9): once the process that started the
  worker is no longer its parent, or the control connection to the supervisor
  has been down for :func:`orphan_grace` (or never came up within the start-up
  time), the supervisor is gone: the worker is sent SIGTERM, so it leaves
  through its exit contexts;
* **tick deadline**: once one tick has run ``tick_timeout`` seconds, the main
  thread gets SIGUSR1, whose handler raises ``TickOverrun`` inside the node
  that is running, so the failure names it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable

from hiocluster.runtime.transport import heartbeat_timeout_ms, monitor_event

__all__ = ["Watchdog", "CHECK_S", "ORPHAN_GRACE_S", "orphan_grace", "parent_gone"]

#: How often the watchdog looks (it also wakes on every connection event).
CHECK_S = 0.05
#: How long the supervisor's connection may stay down before the worker is an orphan,
#: beyond the heartbeat timeout (time for ZeroMQ to connect again over a lossy link).
ORPHAN_GRACE_S = 0.2


def orphan_grace() -> float:
    """Seconds the supervisor's connection may stay down: ORPHAN_GRACE_S plus the
    heartbeat timeout (a connection dropped by a lossy link comes back by then)."""
    return ORPHAN_GRACE_S + heartbeat_timeout_ms() / 1000


def parent_gone(parent: int | None) -> bool:
    """Whether the process that started this one (pid ``parent``, None: nobody we
    know) is gone: this one was handed to another parent. Race-free: a pid that is
    reused never becomes our parent again."""
    return parent is not None and os.getppid() != parent


class Watchdog(threading.Thread):
    """See the module docstring.

    Args:
        monitor: a monitor socket of the worker's control socket (used only here).
        connect_timeout: seconds to wait for the first connection to the supervisor.
        busy: returns the monotonic start of the tick being run (0.0 between ticks).
        tick_timeout: the deadline of one tick; None until SETUP says it.
        idle_check: how often to look while connected with no tick deadline to
            watch (a replica: the monitor's events wake it anyway).
        parent: the pid of the supervisor that started this process, where it is
            its parent: once it is not, the supervisor is gone (no need to wait
            for a connection that will never come).
    """

    def __init__(self, monitor: Any, connect_timeout: float,
                 busy: Callable[[], float], idle_check: float = CHECK_S,
                 parent: int | None = None) -> None:
        super().__init__(name="hiocluster-watchdog", daemon=True)
        self.monitor = monitor
        self.connect_deadline = time.monotonic() + connect_timeout
        self.busy = busy
        self.tick_timeout: float | None = None
        self.idle_check = idle_check
        self.parent = parent
        self.orphaned = False
        self.overrun_since = 0.0     # the busy_since of the tick it interrupted
        self._stopped = threading.Event()
        main = threading.main_thread().ident
        assert main is not None  # a started thread has one
        self._main: int = main

    def stop(self) -> None:
        """Stop watching (before a clean exit: the supervisor may close first)."""
        self._stopped.set()
        if self.is_alive():
            self.join(1.0)

    def run(self) -> None:
        connected, down_since = False, 0.0
        grace = orphan_grace()
        while not self._stopped.is_set():
            quiet = connected and not down_since and self.tick_timeout is None
            if self.monitor.poll((self.idle_check if quiet else CHECK_S) * 1000):
                if monitor_event(self.monitor) == "connected":
                    connected, down_since = True, 0.0
                elif not down_since:
                    down_since = time.monotonic()
                continue
            now = time.monotonic()
            if (down_since and now - down_since > grace) or \
                    (not connected and not down_since and now > self.connect_deadline) or \
                    parent_gone(self.parent):
                if not self._stopped.is_set():
                    self.orphaned = True
                    signal.pthread_kill(self._main, signal.SIGTERM)
                return
            since = self.busy()
            if since and self.tick_timeout is not None and since != self.overrun_since \
                    and now - since > self.tick_timeout:
                self.overrun_since = since
                signal.pthread_kill(self._main, signal.SIGUSR1)
