"""Delivery order (docs/design.md, invariant 2), made visible with nodes/orderprobe.py.

A message put during tick n is in the linked inbox at the start of tick n+1,
ordered by source node name, then by the source's send sequence (which
interleaves a source's outboxes), in every placement, self-links included.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO
from hiocluster.supervision.supervisor import RunResult, run
from hiocluster.topology import Topology, loads

TICKS = 12


#: Sources declared out of name order; the sink "mid" sorts between them and
#: also sends to itself through a self-link.
PROBE_TOML = f"""
[run]
ticks = {TICKS}
seed = 5
capacity = 64

[nodes.zed]
class = "nodes.orderprobe:ProbeSource"
params = {{ per_tick = 4, pattern = "xyyx" }}

[nodes.alpha]
class = "nodes.orderprobe:ProbeSource"
params = {{ per_tick = 3, pattern = "yx" }}

[nodes.mid]
class = "nodes.orderprobe:ProbeSink"
params = {{ loop = 2 }}

[nodes.beta]
class = "nodes.orderprobe:ProbeSource"
params = {{ per_tick = 4, pattern = "yyxyx" }}

[[links]]
from = "zed.x"
to = "mid.in"

[[links]]
from = "zed.y"
to = "mid.in"

[[links]]
from = "alpha.x"
to = "mid.in"

[[links]]
from = "alpha.y"
to = "mid.in"

[[links]]
from = "beta.y"
to = "mid.in"

[[links]]
from = "beta.x"
to = "mid.in"

[[links]]
from = "mid.loop"
to = "mid.in"
"""

SOURCES = ("zed", "alpha", "beta")

#: processes=int spreads nodes in declaration order; tuples name processes by hand.
PLACEMENTS: dict[str, Any] = {
    "one-process": 1,
    "process-per-node": 4,
    "sink-with-zed": (("pa", ("zed", "mid")), ("pb", ("alpha", "beta"))),
    "sink-with-alpha": (("pa", ("alpha", "mid")), ("pb", ("zed",)), ("pc", ("beta",))),
}


def _probe(report_dir: Path | None = None, text: str = PROBE_TOML) -> Topology:
    topology = loads(text)
    if report_dir is not None:
        topology = topology.replace(nodes=tuple(
            dataclasses.replace(node, params={**node.params, "report_dir": str(report_dir)})
            for node in topology.nodes))
    return topology


def _run_probe(topology: Topology, placement: Any,
               report_dir: Path) -> tuple[RunResult, dict[str, Any]]:
    processes = placement if isinstance(placement, int) else None
    if not isinstance(placement, int):
        topology = topology.replace(placement=placement)
    result = run(topology, processes=processes, app_dir=str(REPO), keep_digests=True,
                 handle_signals=False)
    states = {node.name: json.loads((report_dir / f"{node.name}.json").read_text())
              for node in topology.nodes}
    return result, states


def _expected(states: dict[str, Any], ticks: int) -> list[list[Any]]:
    """What the sink must have taken: each send of tick n at n+1, by (source, sequence)."""
    logs = {name: states[name] for name in SOURCES}
    logs["mid"] = states["mid"][1]
    expected = []
    for source in sorted(logs):  # a stable sort by tick below keeps (source, sequence)
        for sent_tick, index, box in logs[source]:  # logged in send-sequence order
            if sent_tick + 1 < ticks:
                expected.append([sent_tick + 1, source, [source, sent_tick, index, box]])
    expected.sort(key=lambda entry: entry[0])
    return expected


@pytest.mark.parametrize("placement", list(PLACEMENTS.values()), ids=list(PLACEMENTS))
def test_delivery_next_tick_in_canonical_order(tmp_path: Path, placement: Any) -> None:
    result, states = _run_probe(_probe(tmp_path), placement, tmp_path)
    received, sent, tuples = states["mid"]
    assert tuples == 0  # msgpack-normalized on every link: tuples arrive as lists
    assert received == _expected(states, TICKS)
    last_tick_sends = sum(1 for name in SOURCES for entry in states[name]
                          if entry[0] == TICKS - 1)
    last_tick_sends += sum(1 for entry in sent if entry[0] == TICKS - 1)
    assert result.undelivered == last_tick_sends and result.unread == 0


def test_delivery_probe_is_not_trivial(tmp_path: Path) -> None:
    """The probe really interleaves outboxes and mixes sources within one tick."""
    _, states = _run_probe(_probe(tmp_path), 1, tmp_path)
    received = states["mid"][0]
    by_tick: dict[int, list[Any]] = {}
    for tick, source, message in received:
        by_tick.setdefault(tick, []).append((source, message[3]))
    assert any(len({source for source, _ in entries}) >= 3 for entries in by_tick.values())
    # some source switched outbox back and forth within a tick: x before y and y before x
    boxes = ["".join(box for source, box in entries if source == name)
             for entries in by_tick.values() for name in SOURCES]
    assert any("xy" in order and "yx" in order for order in boxes)
    assert list(SOURCES) != sorted(SOURCES)  # declaration order is not the delivery order


def test_delivery_identical_across_placements(tmp_path: Path) -> None:
    outcomes = {}
    for label, placement in PLACEMENTS.items():
        report_dir = tmp_path / label
        report_dir.mkdir()
        result, states = _run_probe(_probe(report_dir), placement, report_dir)
        outcomes[label] = (result.tick_digests, states, result.messages, result.undelivered)
    reference = outcomes["one-process"]
    for label, outcome in outcomes.items():
        assert outcome == reference, f"{label} differs from one-process"


SELF_LINK_TOML = f"""
[run]
ticks = {TICKS}
seed = 1

[nodes.solo]
class = "nodes.orderprobe:ProbeSink"
params = {{ loop = 3 }}

[[links]]
from = "solo.loop"
to = "solo.in"
"""


def test_delivery_self_link_waits_one_tick(tmp_path: Path) -> None:
    """A node's message to itself is not in its inbox until the next tick."""
    result, states = _run_probe(_probe(tmp_path, SELF_LINK_TOML), 1, tmp_path)
    received, sent, tuples = states["solo"]
    assert tuples == 0
    assert len(sent) == 3 * TICKS
    assert received == [[tick + 1, "solo", ["solo", tick, index, "loop"]]
                        for tick, index, _ in sent if tick + 1 < TICKS]
    assert all(tick >= 1 for tick, _, _ in received)  # nothing arrives in the tick it was sent
    assert result.undelivered == 3 and result.unread == 0
