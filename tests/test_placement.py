"""Invariant 1 as a property: random topologies, random placements, same digests.

Each example builds a full mesh of random size and link capacity (small
capacities make senders wait for credit) of PHOLD LPs (random population and
remote fraction) or of order-sensitive Mixers (tests/faulty.py: they fold what
they read in delivery order), then runs it in one process, one process per
node, and a random spread, with real processes. Every per-tick run digest must
be identical.
"""

from __future__ import annotations


from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO
from hiocluster.supervision.supervisor import run
from hiocluster.topology import loads
from tests.faulty import mesh_toml


@settings(max_examples=8, derandomize=True)
@given(cls=st.sampled_from(["nodes.phold:PholdLP", "tests.faulty:Mixer"]),
       lps=st.integers(2, 5), population=st.integers(1, 6),
       remote=st.sampled_from([0.0, 0.3, 0.9, 1.0]), capacity=st.integers(1, 6),
       seed=st.integers(0, 2**63 - 1), ticks=st.integers(5, 20),
       lag=st.sampled_from([None, 1, 2, 5]), ring=st.booleans(), data=st.data())
def test_random_topologies_identical_in_every_placement(cls: str, lps: int, population: int,
                                                        remote: float, capacity: int,
                                                        seed: int, ticks: int,
                                                        lag: int | None, ring: bool,
                                                        data: st.DataObject) -> None:
    topology = loads(mesh_toml(cls, lps, ticks=ticks, seed=seed, capacity=capacity,
                               lag=lag, ring=ring,
                               params=f"population = {population}, remote_fraction = "
                                      f"{remote}, mean_delay = 0.7"))
    spread = data.draw(st.integers(2, lps), label="processes")
    results = [run(topology, processes=processes, app_dir=str(REPO), keep_digests=True,
                   handle_signals=False) for processes in (1, lps, spread)]
    reference = results[0]
    assert len(reference.tick_digests) == ticks
    for result in results[1:]:
        assert result.tick_digests == reference.tick_digests
        assert (result.messages, result.undelivered, result.unread, result.metrics) == (
            reference.messages, reference.undelivered, reference.unread, reference.metrics)
