"""A run's signal handling: SIGINT and SIGTERM become a clean stop of the run, and
wake its loop at once (through a wakeup fd in its poll); the signals services
ignore are said in their log instead of ending anything."""

from __future__ import annotations

import signal
import socket
import threading
from typing import Any

from hiocluster.runtime.early import take as take_early_signal
from hiocluster.runtime.loop import Loop

__all__ = ["RunSignals", "IGNORED_SIGNALS"]

#: Signals whose default action would end a replica (or a run), ignored in runs with
#: services: a closing SSH session sends SIGHUP; there is no reload for them to mean yet.
IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class RunSignals:
    """SIGINT/SIGTERM stop the run cleanly, and wake the loop at once; in a run with
    services, SIGHUP, SIGUSR1 and SIGUSR2 are ignored (said in the log).

    A context manager around a run's loop. ``supervisor``: what a signal is told to,
    its ``interrupt(signum)``, and its ``services`` (None without): their
    ``ignored(signum)``. Only on the main thread (``enabled`` otherwise is moot).
    """

    def __init__(self, supervisor: Any, loop: Loop, enabled: bool) -> None:
        self.supervisor, self.loop = supervisor, loop
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.restore: dict[int, Any] = {}
        self.pair: tuple[socket.socket, socket.socket] | None = None
        self.old_wakeup = -1

    def __enter__(self) -> None:
        if not self.enabled:
            return
        self.pair = socket.socketpair()
        for end in self.pair:
            end.setblocking(False)
        self.old_wakeup = signal.set_wakeup_fd(self.pair[1].fileno(), warn_on_full_buffer=False)
        self.loop.poller.register(self.pair[0].fileno())
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.restore[signum] = signal.signal(signum, self._handle)
        if getattr(self.supervisor, "services", None) is not None:
            for signum in IGNORED_SIGNALS:  # SIGHUP must never end services
                self.restore[signum] = signal.signal(signum, self._handle)
        early = take_early_signal()  # one whose exception something swallowed
        if early is not None:
            self._handle(early, None)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum in (signal.SIGINT, signal.SIGTERM):
            self.supervisor.interrupt(signum)
        else:
            self.supervisor.services.ignored(signum)
        assert self.pair is not None
        try:
            while self.pair[0].recv(4096):  # the wakeup bytes: keep the pair drained
                pass
        except OSError:
            pass

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self.restore.items():
            signal.signal(signum, handler)
        if self.pair is not None:
            signal.set_wakeup_fd(self.old_wakeup)
            self.loop.poller.unregister(self.pair[0].fileno())
            for end in self.pair:
                end.close()
