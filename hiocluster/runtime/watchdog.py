"""A worker's watchdog thread: its supervisor's connection, and its tick deadline.

Runs beside the worker's main thread, so it works while a node is busy:

* **orphan rule** (:class:`OrphanRule`, docs/protocol.md §9; groups and
  replicas keep the same rule): once the process that started the worker is
  no longer its parent, or the control connection to the supervisor has been
  down for :func:`orphan_grace` (or never came up within the start-up time),
  the supervisor is gone: the worker is sent SIGTERM, so it leaves through its
  exit contexts;
* **tick deadline**: once one tick has run ``tick_timeout`` seconds, the main
  thread gets SIGUSR1, which raises ``TickOverrun`` inside the node that is
  running (hiocluster.runtime.signals: a node's code has no checkpoints), so
  the failure names it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

from hiocluster.runtime.transport import Poller, Socket, heartbeat_timeout_ms

__all__ = ["Watchdog", "OrphanRule", "CHECK_S", "ORPHAN_GRACE_S", "orphan_grace",
           "parent_gone"]

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


class OrphanRule:
    """The orphan rule (docs/protocol.md §9) for one process: its supervisor is
    gone once the process that started it (pid ``parent``) is no longer its
    parent, or once the control connection has been down for :func:`orphan_grace`,
    or has not come up within ``connect_timeout`` seconds of ``now``. Told the
    connection's monitor events (:meth:`seen`); asked with :meth:`gone`. The one
    rule of workers (their :class:`Watchdog`), groups and replicas."""

    def __init__(self, connect_timeout: float, parent: int | None, now: float) -> None:
        self.deadline = now + connect_timeout
        self.parent = parent
        self.grace = orphan_grace()
        self.connected = False
        self.down_since = 0.0   # when the connection went down (0.0: it is not down)

    def seen(self, event: str, now: float) -> None:
        """A monitor event of the control connection (Socket.event)."""
        if event == "connected":
            self.connected, self.down_since = True, 0.0
        elif not self.down_since:
            self.down_since = now

    def gone(self, now: float) -> bool:
        """Whether the supervisor is gone."""
        if self.down_since:
            return now - self.down_since > self.grace or parent_gone(self.parent)
        return (not self.connected and now > self.deadline) or parent_gone(self.parent)


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

    def __init__(self, monitor: Socket, connect_timeout: float,
                 busy: Callable[[], float], idle_check: float = CHECK_S,
                 parent: int | None = None) -> None:
        super().__init__(name="hiocluster-watchdog", daemon=True)
        self.monitor = monitor
        self.rule = OrphanRule(connect_timeout, parent, time.monotonic())
        self.busy = busy
        self.tick_timeout: float | None = None
        self.idle_check = idle_check
        self.parent = parent
        self.orphaned = False
        self.overrun_since = 0.0     # the busy_since of the tick it interrupted
        self._stopped = threading.Event()
        # stop() writes here, so the thread wakes from its poll at once (a spare
        # becoming a replica, a replica exiting, do not wait out an idle check)
        self._wake_r, self._wake_w = os.pipe()
        main = threading.main_thread().ident
        assert main is not None  # a started thread has one
        self._main: int = main

    def stop(self) -> None:
        """Stop watching (before a clean exit: the supervisor may close first)."""
        self._stopped.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self.is_alive():
            self.join(1.0)
        if not self.is_alive() and self._wake_w >= 0:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    def run(self) -> None:
        rule = self.rule
        poller = Poller([self.monitor, self._wake_r])
        while not self._stopped.is_set():
            quiet = rule.connected and not rule.down_since and self.tick_timeout is None
            ready = poller.poll((self.idle_check if quiet else CHECK_S) * 1000)
            if self._stopped.is_set():
                return
            if ready:
                rule.seen(self.monitor.event(), time.monotonic())
                continue
            now = time.monotonic()
            if rule.gone(now):
                if not self._stopped.is_set():
                    self.orphaned = True
                    signal.pthread_kill(self._main, signal.SIGTERM)
                return
            since = self.busy()
            if since and self.tick_timeout is not None and since != self.overrun_since \
                    and now - since > self.tick_timeout:
                self.overrun_since = since
                signal.pthread_kill(self._main, signal.SIGUSR1)
