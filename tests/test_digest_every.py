"""``digest_every = k``: only every k-th state (and the last) is digested.

Which ticks are digested is a function of the tick number alone, so the run
digest stays placement and window independent; it covers fewer states, so it
differs from the every-tick digest.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, strategies as st

from hiocluster.supervision import supervisor
from hiocluster.supervision.digests import digested, digested_between
from hiocluster.errors import TopologyError
from hiocluster.topology import Topology, loads

from conftest import REPO

RING = (REPO / "topologies" / "ring.toml").read_text()
NESTED = '\n[groups]\ng1 = ["p0", "g2"]\ng2 = ["p1", "p2"]\n'


@given(first=st.integers(0, 60), span=st.integers(-2, 60), every=st.integers(1, 9),
       ticks=st.integers(1, 130))
def test_digested_between_counts_the_digested_ticks(first: int, span: int, every: int,
                                                    ticks: int) -> None:
    last = min(first + span, ticks - 1)
    expected = sum(digested(tick, every, ticks) for tick in range(first, last + 1))
    assert digested_between(first, last, every, ticks) == expected


def run(topology: Topology, **kwargs: Any) -> supervisor.RunResult:
    return supervisor.run(topology, app_dir=str(REPO), handle_signals=False, **kwargs)


def test_digest_every_is_placement_and_window_independent() -> None:
    every = loads(RING).replace(ticks=50, digest_every=7)
    reference = run(every, processes=1, keep_digests=True)
    # ticks 6, 13, ... 48 and the last one, 49
    assert len(reference.tick_digests) == 50 // 7 + 1
    for kwargs in ({"processes": 3}, {"window": 1}, {"window": 5, "processes": 2}):
        result = run(every, keep_digests=True, **kwargs)
        assert result.tick_digests == reference.tick_digests, kwargs
    grouped = run(loads(RING + NESTED).replace(ticks=50, digest_every=7), keep_digests=True)
    assert grouped.groups == 2 and grouped.tick_digests == reference.tick_digests
    each = run(loads(RING).replace(ticks=50), processes=1, keep_digests=True)
    assert len(each.tick_digests) == 50 and each.digest != reference.digest
    assert run(loads(RING).replace(ticks=50, digest_every=1)).digest == each.digest


@pytest.mark.parametrize("value", [0, -3, 1.5, "2", True])
def test_digest_every_must_be_a_positive_integer(value: Any) -> None:
    text = RING.replace("[run]", f"[run]\ndigest_every = {value!r}".replace("'", '"')
                        .replace("True", "true"), 1)
    with pytest.raises(TopologyError) as caught:
        loads(text)
    assert caught.value.key_path == "run.digest_every"
