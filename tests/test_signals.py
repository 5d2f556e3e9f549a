"""runtime.signals: one signal handling, with real signals sent to this process.

A handler only writes the signal down and wakes the poll; the process acts at
its checkpoints; an exception is raised by the signal only where ``unprotected``
says so (a node's own code)."""

from __future__ import annotations

import os
import select
import signal

import pytest

from hiocluster.runtime import early
from hiocluster.runtime.loop import Loop
from hiocluster.runtime.signals import STOP_SIGNALS, Signals


class Boom(BaseException):
    pass


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_a_signal_is_written_down_and_wakes_the_fd_without_raising() -> None:
    before = signal.getsignal(signal.SIGUSR2)
    with Signals((signal.SIGUSR2,)) as signals:
        fd = signals.fileno()
        assert fd is not None and not _readable(fd)
        os.kill(os.getpid(), signal.SIGUSR2)  # the handler runs before kill returns
        assert signals.pending == [signal.SIGUSR2]
        assert _readable(fd)
        assert signals.take() == [signal.SIGUSR2]
        assert signals.take() == [] and not _readable(fd)
    assert signal.getsignal(signal.SIGUSR2) is before  # restored on exit
    assert signals.fileno() is None


def test_unprotected_code_gets_the_exception_that_the_callback_returns() -> None:
    raising = [False]

    def unprotected(signum: int) -> BaseException | None:
        return Boom(signum) if raising[0] else None

    with Signals((signal.SIGUSR2,), unprotected=unprotected) as signals:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert signals.take() == [signal.SIGUSR2]
        raising[0] = True
        with pytest.raises(Boom):
            os.kill(os.getpid(), signal.SIGUSR2)
        assert signals.pending == []  # raised, not also written down


def test_an_early_signal_is_taken_on_enter_and_wakes_the_first_wait() -> None:
    early.received(signal.SIGTERM)
    with Signals() as signals:
        fd = signals.fileno()
        assert fd is not None and _readable(fd)
        assert signals.take() == [signal.SIGTERM]
    assert early.take() is None


def test_a_watched_loop_acts_at_its_checkpoint_after_the_wait_a_signal_ended() -> None:
    loop = Loop(max_wait=30.0)  # a wait that only the signal can end early
    acted: list[int] = []
    with Signals((signal.SIGUSR2,)).watch(loop, acted.append):
        os.kill(os.getpid(), signal.SIGUSR2)
        assert acted == []  # nothing runs in the handler
        loop.wait()
        assert acted == [signal.SIGUSR2]
        assert loop.checkpoints
    assert loop.checkpoints == []  # unwatched on exit


def test_disabled_signals_catch_nothing() -> None:
    before = signal.getsignal(signal.SIGINT)
    with Signals(STOP_SIGNALS, enabled=False) as signals:
        assert signals.fileno() is None
        assert signal.getsignal(signal.SIGINT) is before
