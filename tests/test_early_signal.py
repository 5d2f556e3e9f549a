"""A Ctrl-C in start-up whose exception something swallowed is not lost.

hiocluster's first line turns SIGINT/SIGTERM into an exception raised wherever
the command is; code that is not ours (a bare ``except:`` around an import)
may drop it. The signal is also written down (hiocluster.runtime.early), and the run
takes it as soon as its own handlers are in: it stops at once, interrupted.
"""

from __future__ import annotations

import signal

import pytest

from conftest import REPO
from hiocluster.supervision import supervisor
from hiocluster.runtime import early
from hiocluster.errors import Interrupted
from hiocluster.topology import load


def test_a_signal_whose_exception_was_swallowed_still_stops_the_run() -> None:
    topology = load(REPO / "topologies" / "ring.toml").replace(ticks=1_000_000)
    early.received(signal.SIGINT)      # as the first-line handler does, then raises:
    try:                               # ... and something not ours swallowed the raise
        raise KeyboardInterrupt
    except BaseException:  # noqa: BLE001 - what the swallowing code does
        pass
    with pytest.raises(Interrupted) as info:
        supervisor.run(topology, app_dir=str(REPO), handle_signals=True)
    assert info.value.signal == signal.SIGINT
    assert early.take() is None        # taken once


def test_nothing_written_down_means_nothing_taken() -> None:
    assert early.take() is None
    early.received(signal.SIGTERM)
    early.received(signal.SIGINT)
    assert early.take() == signal.SIGTERM and early.take() is None


def test_an_interrupt_that_surfaces_as_another_exception_ends_the_command_as_one(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Python's import machinery, interrupted inside a module lock, can raise a
    KeyError instead: with the signal written down, the command ends as interrupted."""
    import hiocluster.__main__ as entry
    import hiocluster.cli

    def broken() -> int:
        early.received(signal.SIGTERM)
        raise KeyError(140000000000000)

    monkeypatch.setattr(hiocluster.cli, "main", broken)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert entry.main() == 143
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert capsys.readouterr().err.strip() == "hiocluster: interrupted by SIGTERM"
    monkeypatch.setattr(hiocluster.cli, "main", lambda: {}["nothing written down"])
    try:
        with pytest.raises(KeyError):
            entry.main()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
