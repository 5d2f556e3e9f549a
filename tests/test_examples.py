"""Every example topology runs, and gives the same digests in every placement.

The placement test globs topologies/*.toml, so a new example file is covered
without touching this file. PHOLD and the pipeline also get checks of what they
model; their nodes write final states to ``params.report_dir`` at exit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO
from hiocluster.supervision.supervisor import RunResult, run
from hiocluster.topology import Topology, load

#: The simulations among the examples (the others are services: test_cluster_services).
TOPOLOGY_FILES = sorted(path for path in (REPO / "topologies").glob("*.toml")
                        if "[services." not in path.read_text())
#: Ticks for the placement comparison: enough to exercise links, fast on 2 cores.
TEST_TICKS = 40


def _placements(topology: Topology) -> list[int | None]:
    """The file's own placement, one process, one per node, and one in between."""
    count = len(topology.nodes)
    placements: list[int | None] = [None, 1]
    for processes in (count, (count + 1) // 2):
        if processes not in placements:
            placements.append(processes)
    return placements


def _run(topology: Topology, processes: int | None = None, **kwa: Any) -> RunResult:
    return run(topology, processes=processes, app_dir=str(REPO), handle_signals=False, **kwa)


def _with_params(topology: Topology, **params: Any) -> Topology:
    """A copy of ``topology`` with ``params`` added to every node's params."""
    nodes = tuple(dataclasses.replace(node, params={**node.params, **params})
                  for node in topology.nodes)
    return topology.replace(nodes=nodes)


def _run_reporting(topology: Topology, report_dir: Path,
                   processes: int | None = None) -> tuple[RunResult, dict[str, Any]]:
    """Run with every node reporting its final state; return the result and states."""
    report_dir.mkdir(parents=True)
    result = _run(_with_params(topology, report_dir=str(report_dir)), processes)
    states = {node.name: json.loads((report_dir / f"{node.name}.json").read_text())
              for node in topology.nodes}
    return result, states


def test_examples_exist() -> None:
    names = {path.name for path in TOPOLOGY_FILES}
    assert {"ring.toml", "phold.toml", "pipeline.toml"} <= names


@pytest.mark.parametrize("path", TOPOLOGY_FILES, ids=[p.stem for p in TOPOLOGY_FILES])
def test_example_digests_identical_across_placements(path: Path) -> None:
    topology = load(path)
    topology = topology.replace(ticks=min(topology.ticks, TEST_TICKS))
    placements = _placements(topology)
    assert len(placements) >= min(3, len(topology.nodes))
    digests = {}
    for processes in placements:
        result = _run(topology, processes, keep_digests=True)
        assert result.ticks == topology.ticks
        assert len(result.tick_digests) == topology.ticks
        assert result.rejected_frames == 0
        digests[processes] = result.tick_digests
    reference = digests[None]
    for processes, tick_digests in digests.items():
        assert tick_digests == reference, f"processes={processes} differs from the file's own"


# --- PHOLD ------------------------------------------------------------------------

def _phold(ticks: int = TEST_TICKS) -> Topology:
    return load(REPO / "topologies" / "phold.toml").replace(ticks=ticks)


def test_phold_seed_changes_digest() -> None:
    topology = _phold(20)
    first = _run(topology, 1)
    again = _run(topology, 1)
    other = _run(topology.replace(seed=topology.seed + 1), 1)
    assert first.digest == again.digest
    assert other.digest != first.digest


def test_phold_processes_events_and_conserves_them(tmp_path: Path) -> None:
    topology = _phold()
    result, states = _run_reporting(topology, tmp_path / "report", processes=4)
    population = sum(topology.node(name).params["population"] for name in states)
    processed = sum(state[0] for state in states.values())
    assert processed > population  # every LP worked through several ticks of events
    assert all(state[0] > 0 for state in states.values())
    assert result.messages > 0  # remote events crossed links (and processes)
    assert result.metrics == {"events": processed}  # the run reports events (and events/s)
    assert result.to_json()["metrics_per_second"]["events"] == pytest.approx(
        processed / result.seconds, rel=1e-3)
    assert all(state[4] == 0 for state in states.values())  # ample credit: none late
    queued = sum(state[2] + state[3] for state in states.values())
    assert queued + result.undelivered + result.unread == population


def test_phold_without_credit_holds_events_and_loses_none(tmp_path: Path) -> None:
    """Links of capacity 1: events wait for credit, none is dropped, all placements agree."""
    topology = _phold(30)
    tight = topology.replace(links=tuple(dataclasses.replace(link, capacity=1)
                                         for link in topology.links))
    population = sum(node.params["population"] for node in topology.nodes)
    outcomes = []
    for processes in (1, 3):
        result, states = _run_reporting(tight, tmp_path / f"p{processes}", processes)
        queued = sum(state[2] + state[3] for state in states.values())
        assert queued + result.undelivered + result.unread == population
        assert sum(state[3] for state in states.values()) > 0  # some still held at the end
        assert sum(state[4] for state in states.values()) > 0  # held ones arrived late
        outcomes.append((result.digest, states))
    assert outcomes[0] == outcomes[1]


# --- pipeline ---------------------------------------------------------------------

def _pipeline(ticks: int) -> Topology:
    return load(REPO / "topologies" / "pipeline.toml").replace(ticks=ticks)


@pytest.mark.parametrize("ticks", [TEST_TICKS, 200], ids=["in-flight", "drained"])
def test_pipeline_pushes_back_and_loses_nothing(tmp_path: Path, ticks: int) -> None:
    topology = _pipeline(ticks)
    items = topology.node("producer").params["items"]
    outcomes = []
    for processes in (None, 1, 4):
        result, states = _run_reporting(topology, tmp_path / f"p{processes}", processes)
        made, sent, backlog, blocked_ticks = states["producer"]
        consumed, next_expected, errors, _ = states["consumer"]
        assert blocked_ticks > 0  # the push-back reached the producer
        assert errors == 0 and next_expected == consumed  # in order, no gap, no duplicate
        assert made == sent + backlog
        in_flight = backlog + result.undelivered + result.unread
        assert made == consumed + in_flight  # nothing lost
        if ticks >= 200:
            assert made == consumed == items and in_flight == 0
        else:
            assert 0 < consumed < made and in_flight > 0
        outcomes.append((result.digest, states))
    assert all(outcome == outcomes[0] for outcome in outcomes)
