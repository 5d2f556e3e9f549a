"""Signals, one way for every hiocluster process (trio-style).

A handler only writes the signal down and wakes the process: Python writes a
byte on the wakeup fd (:func:`signal.set_wakeup_fd`) whose other end the
process's poller watches, so a wait ends at once. The process acts on what was
written down at its next checkpoint (:meth:`Signals.take`), in its own code, at
a point where its state is whole: nothing of hiocluster's is ever interrupted.

The one exception is the code of the user's nodes, which hiocluster cannot give
checkpoints (a node may loop for ever inside one tick): while a worker runs
node code, its ``unprotected`` callback may turn the signal into an exception
raised there, as trio raises KeyboardInterrupt into code that is not
protected. So a stuck tick still ends, and the failure names its node.

Before a command has its :class:`Signals` (its imports, its start-up),
SIGINT and SIGTERM are raised wherever it is, and also written down in
:mod:`hiocluster.runtime.early`; :meth:`Signals.__enter__` takes one that code
not ours swallowed.
"""

from __future__ import annotations

import signal
import socket
import threading
from typing import Any, Callable, Iterable

from hiocluster.runtime.early import take as take_early_signal
from hiocluster.runtime.loop import Loop

__all__ = ["Signals", "run_signals", "STOP_SIGNALS", "IGNORED_SIGNALS"]

#: What stops a hiocluster process cleanly.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Signals whose default action would end (or, TTIN/TTOU, stop) a replica or a run:
#: caught in runs with services and by replicas. A run with services reloads on
#: SIGHUP and scales each service up/down by one on SIGTTIN/SIGTTOU (as gunicorn
#: does); the others are ignored, with a line.
IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN,
                   signal.SIGTTOU)


class Signals:
    """Catch ``caught`` signals while in this context (see the module docstring).

    Args:
        caught: the signals written down (and waking the process).
        enabled: False: a context that catches nothing (a run inside a thread, or
            one whose caller keeps its own handlers). Only the main thread can.
        unprotected: called by the handler with the signal; an exception it
            returns is raised where the process is (only while code that cannot
            have checkpoints runs: a node's); None: written down as usual.
    """

    def __init__(self, caught: Iterable[int] = STOP_SIGNALS, *, enabled: bool = True,
                 unprotected: Callable[[int], BaseException | None] | None = None) -> None:
        self.caught = tuple(caught)
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.unprotected = unprotected
        self.pending: list[int] = []   # written down, not yet taken
        self._restore: dict[int, Any] = {}
        self._pair: tuple[socket.socket, socket.socket] | None = None
        self._old_wakeup = -1
        self._watched: tuple[Loop, Callable[[], None]] | None = None

    def __enter__(self) -> Signals:
        if not self.enabled:
            return self
        self._pair = socket.socketpair()
        for end in self._pair:
            end.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._pair[1].fileno(),
                                                warn_on_full_buffer=False)
        for signum in self.caught:
            self._restore[signum] = signal.signal(signum, self._handle)
        early = take_early_signal()  # one whose exception something swallowed
        if early is not None:
            self.pending.append(early)
            self._pair[1].send(b"\0")  # a wait that starts now ends at once
        if self._watched is not None:
            loop, checkpoint = self._watched
            loop.poller.register(self._pair[0].fileno())
            loop.checkpoints.append(checkpoint)
        return self

    def watch(self, loop: Loop, act: Callable[[int], None]) -> Signals:
        """Have ``loop`` wake on a signal, and call ``act(signum)`` for each one at
        the checkpoint after each of its waits (from :meth:`__enter__` on)."""
        def checkpoint() -> None:
            fd = self.fileno()
            if self.pending or (fd is not None and fd in loop.ready):
                for signum in self.take():
                    act(signum)

        self._watched = (loop, checkpoint)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._watched is not None and self._pair is not None:
            loop, checkpoint = self._watched
            loop.poller.unregister(self._pair[0].fileno())
            loop.checkpoints.remove(checkpoint)
        for signum, handler in self._restore.items():
            signal.signal(signum, handler)
        self._restore.clear()
        if self._pair is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            for end in self._pair:
                end.close()
            self._pair = None

    def fileno(self) -> int | None:
        """The fd a poller watches: readable once a signal came (None: not catching)."""
        return self._pair[0].fileno() if self._pair is not None else None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.unprotected is not None:
            exc = self.unprotected(signum)
            if exc is not None:
                raise exc
        self.pending.append(signum)

    def take(self) -> list[int]:
        """The checkpoint: every signal written down since the last one, oldest
        first (empty: none); the wakeup fd is emptied."""
        if self._pair is not None:
            try:
                while self._pair[0].recv(4096):
                    pass
            except OSError:  # empty: would block
                pass
        taken, self.pending = self.pending, []
        return taken


def run_signals(supervisor: Any, loop: Loop, enabled: bool) -> Signals:
    """A run's signals: SIGINT/SIGTERM stop it cleanly (``supervisor.interrupt``);
    in a run with services, SIGHUP reloads them (``supervisor.services.hangup``),
    SIGTTIN/SIGTTOU scale each by one (``scale_by``), SIGUSR1 and SIGUSR2 are ignored (said in the log by
    ``supervisor.services.ignored``). A context around ``loop.run()``."""
    services = getattr(supervisor, "services", None)

    def act(signum: int) -> None:
        if signum in STOP_SIGNALS:
            supervisor.interrupt(signum)
        elif services is not None and signum == signal.SIGHUP:
            services.hangup()
        elif services is not None and signum == signal.SIGUSR1:
            services.reopen_logs()
        elif services is not None and signum in (signal.SIGTTIN, signal.SIGTTOU):
            services.scale_by(1 if signum == signal.SIGTTIN else -1)
        elif services is not None:
            services.ignored(signum)

    return Signals(STOP_SIGNALS + (IGNORED_SIGNALS if services is not None else ()),
                   enabled=enabled).watch(loop, act)
