"""Gaps a worker written from docs/protocol.md alone found in the protocol's edges.

* a neighbour's over-large acknowledgement is blamed on the neighbour that sent
  it, naming the field (not on the worker that received it);
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hiocluster import supervisor
from hiocluster.errors import RunFailed
from hiocluster.topology import loads

from conftest import REPO
from tests.fake_worker import FAKE_COMMAND
from tests.faulty import ring_toml


def ring3(ticks: int = 20) -> str:
    """Three workers in a ring a -> b -> c -> a, one node each (p0, p1, p2)."""
    return ring_toml({name: {} for name in "abc"}, {"p0": ["a"], "p1": ["b"], "p2": ["c"]},
                     ticks=ticks)


def run(text: str, **kwargs: Any) -> supervisor.RunResult:
    return supervisor.run(loads(text), app_dir=str(REPO), handle_signals=False, **kwargs)


# -- 1. a bad acknowledgement is its sender's fault ------------------------------------


def test_an_over_large_ack_is_blamed_on_the_neighbour_that_sent_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_WORKER", f"p1:bad-ack:{tmp_path / 'fake.json'}")
    with pytest.raises(RunFailed) as info:
        run(ring3(), worker_command=FAKE_COMMAND)
    error = info.value
    # p1 acknowledged 10**6 messages on the link a -> b; p0 received it and says so
    assert (error.worker, error.nodes) == ("p1", ("b",)), str(error)
    assert "sent p0 an invalid DATA frame" in error.cause
    assert "DATA.acks[0][1]" in error.cause and "1000000" in error.cause
