"""Checkpoints, sans-IO (hiocluster.worker.checkpoint): a cut after tick T taken at
one placement, resumed at another, goes on exactly as the run that was never
cut. Real NodeRunners and Exchanges, frames passed by hand as sockets would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hiocluster import protocol as proto
from hiocluster.node import cannot_checkpoint
from hiocluster.worker import checkpoint
from hiocluster.worker.exchange import Exchange
from hiocluster.worker.nodes import NodeRunner
from tests.ckpt_nodes import Forgetful, Half, Walker

HERE = str(Path(__file__).parent)
NODES = [f"n{k}" for k in range(6)]
TICKS = 40


def links(capacity: int) -> list[tuple[str, str, str]]:
    """A ring both ways, two chords (a node with several targets) and two side
    links beside ring links (one node's two outboxes into one inbox: merged by
    send sequence)."""
    pairs = [(NODES[k], "out", NODES[(k + 1) % 6]) for k in range(6)]
    pairs += [(NODES[(k + 1) % 6], "out", NODES[k]) for k in range(6)]
    return pairs + [("n0", "out", "n3"), ("n4", "out", "n1"), ("n0", "side", "n1"),
                    ("n4", "side", "n5")]


class Worker:
    def __init__(self, name: str, names: list[str], placement: dict[str, str],
                 lag: int, capacity: int) -> None:
        rows = [[i, s, box, t, "in", capacity, placement[s], placement[t]]
                for i, (s, box, t) in enumerate(links(capacity))]
        setup = proto.Setup(t0=0.0, tock=0.25, seed=7, ticks=TICKS, real=False,
                            tick_timeout=30.0, peers={}, credit_lag=lag,
                            nodes=[[n, "tests.ckpt_nodes:Walker", {}, None, None]
                                   for n in names],
                            links=[row for row in rows if name in (row[6], row[7])])
        self.name = name
        self.host = NodeRunner(setup, HERE)
        self.exchange = Exchange(name, self.host.by_name, setup.links, lag, end=TICKS)
        self.host.enter()


def lockstep(workers: list[Worker], ticks: range, records: dict[int, dict[str, bytes]]
             ) -> None:
    by_name = {worker.name: worker for worker in workers}
    for tick in ticks:
        for worker in workers:
            if tick:
                assert worker.exchange.missing(tick) == []
                worker.exchange.deliver(tick)
            worker.host.run_tick(tick)
        for worker in workers:
            for peer, frame in worker.exchange.outgoing(tick):
                by_name[peer].exchange.accept(worker.name, frame)
            records.setdefault(tick, {})[worker.name] = worker.host.records()


def split(records: dict[str, bytes]) -> dict[str, bytes]:
    """One state's records of every worker, per node."""
    out = {}
    for blob in records.values():
        at = 0
        while at < len(blob):
            name = next(n for n in NODES if blob.startswith(n.encode(), at))
            out[name] = blob[at + len(name):at + len(name) + proto.DIGEST_SIZE]
            at += len(name) + proto.DIGEST_SIZE
    return out


def make(groups: list[list[str]], lag: int, capacity: int) -> list[Worker]:
    placement = {node: f"w{k}" for k, group in enumerate(groups) for node in group}
    return [Worker(f"w{k}", group, placement, lag, capacity)
            for k, group in enumerate(groups)]


PLACEMENTS = {"one": [NODES], "two": [NODES[:3], NODES[3:]],
              "three": [["n0", "n4"], ["n1", "n2", "n5"], ["n3"]],
              "six": [[n] for n in NODES]}


@pytest.mark.parametrize("lag", [1, 2, 3])
@pytest.mark.parametrize("capacity", [2, 9])
@pytest.mark.parametrize("before,after", [("two", "three"), ("six", "one"),
                                          ("one", "six"), ("three", "three")])
@pytest.mark.parametrize("at", [0, 4, 17])
def test_a_cut_resumed_at_another_placement_goes_on_as_if_never_cut(
        lag: int, capacity: int, before: str, after: str, at: int) -> None:
    whole: dict[int, dict[str, bytes]] = {}
    lockstep(make(PLACEMENTS["two"], lag, capacity), range(TICKS), whole)

    first = make(PLACEMENTS[before], lag, capacity)
    lockstep(first, range(at + 1), {})
    cuts = [checkpoint.cut(worker.host, worker.exchange, at) for worker in first]
    assert len({cut["tyme"] for cut in cuts}) == 1
    nodes: dict[str, Any] = {}
    link_sides: dict[int, dict[str, int]] = {}
    undelivered: dict[int, list[Any]] = {}
    for cut in cuts:
        nodes.update(cut["nodes"])
        undelivered.update(cut["undelivered"])
        for link_id, side in cut["links"].items():
            link_sides.setdefault(link_id, {}).update(side)
    assert sorted(nodes) == NODES and len(link_sides) == len(links(capacity))

    second = make(PLACEMENTS[after], lag, capacity)
    for worker in second:
        checkpoint.resume(worker.host, worker.exchange, at, cuts[0]["tyme"], nodes,
                          link_sides, undelivered)
    resumed: dict[int, dict[str, bytes]] = {}
    lockstep(second, range(at + 1, TICKS), resumed)
    for tick in range(at + 1, TICKS):
        assert split(resumed[tick]) == split(whole[tick]), tick


def test_the_runs_compared_do_differ_from_tick_to_tick() -> None:
    """The check above can fail: states change, and inboxes hold messages at cuts."""
    records: dict[int, dict[str, bytes]] = {}
    workers = make(PLACEMENTS["two"], 2, 2)
    lockstep(workers, range(TICKS), records)
    assert len({tuple(sorted(split(records[t]).items())) for t in range(TICKS)}) == TICKS
    held = checkpoint.cut(workers[0].host, workers[0].exchange, TICKS - 1)
    assert any(entry["inboxes"] for entry in held["nodes"].values())
    assert held["undelivered"]


def test_classes_that_cannot_be_checkpointed_are_named() -> None:
    assert cannot_checkpoint(Walker) is None
    assert "tests.ckpt_nodes.Forgetful cannot be checkpointed" in cannot_checkpoint(Forgetful)
    assert "defines restore() but not snapshot()" in cannot_checkpoint(Half)
    with pytest.raises(TypeError, match="Forgetful"):
        Forgetful("x").snapshot()
