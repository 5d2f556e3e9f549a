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
