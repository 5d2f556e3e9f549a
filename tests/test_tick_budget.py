"""The per-tick path of the DATA plane, held to a budget of work (not of time).

Two exchanges in a ring of links (w0 -> w1 -> w0 ... as the bench's ring: one
message a tick each way) pass their frames by hand, as a worker's shell does
each tick: accept the neighbour's frame, say what is missing, deliver, take
from the inbox, put, send. A profiler hook counts the Python calls of each tick
and tracemalloc the memory that stays: the budgets below are today's figures
with some room; a change that adds work to every tick fails here, whatever the
machine's speed.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

from tests.calls import count_calls
from hiocluster.worker.exchange import Exchange
from hiocluster.node import Node

#: Python calls per tick of the whole path below, for both workers together
#: (measured: 102.5 with credit lag 8, 108 with acks every tick)
CALLS_PER_TICK = 120
#: Bytes still held after 2,000 more ticks (no per-tick growth: queues are bounded)
GROWTH_BYTES = 64 * 1024


class Relay(Node):
    inboxes = ("in",)
    outboxes = ("out",)

    def step(self) -> None:
        for value in self.inbox["in"].drain():
            self.outbox["out"].put(value + 1)


def ring(lag: int) -> tuple[list[Exchange], dict[str, Node]]:
    rows = [[0, "a", "out", "b", "in", 64, "w0", "w1"],
            [1, "b", "out", "a", "in", 64, "w1", "w0"]]
    nodes = {"a": Relay("a"), "b": Relay("b")}
    return [Exchange("w0", {"a": nodes["a"]}, rows, lag),
            Exchange("w1", {"b": nodes["b"]}, rows, lag)], nodes


def run_ticks(exchanges: list[Exchange], nodes: dict[str, Node], first: int,
              count: int) -> None:
    by_name = {exchange.worker: exchange for exchange in exchanges}
    owner = {"w0": nodes["a"], "w1": nodes["b"]}
    for tick in range(first, first + count):
        for exchange in exchanges:
            if tick:
                assert not exchange.missing(tick)
                exchange.deliver(tick)
            owner[exchange.worker].step()
        for exchange in exchanges:
            for peer, frame in exchange.outgoing(tick):
                by_name[peer].accept(exchange.worker, frame)


def calls_per_tick(lag: int, ticks: int = 400) -> float:
    exchanges, nodes = ring(lag)
    nodes["a"].outbox["out"].put(0)
    run_ticks(exchanges, nodes, 0, 50)  # warm: the first ticks make what later ones reuse
    calls = count_calls(lambda: run_ticks(exchanges, nodes, 50, ticks))
    return calls / ticks


def test_a_tick_of_the_data_plane_stays_within_its_call_budget() -> None:
    per_tick = calls_per_tick(lag=8)
    assert 0 < per_tick <= CALLS_PER_TICK, per_tick


def test_the_credit_lag_saves_work_per_tick() -> None:
    """With a lag, acks ride every L-th frame: fewer calls than with acks every tick
    (the frames themselves are the same number here: the ring carries data both ways)."""
    assert calls_per_tick(lag=8) < calls_per_tick(lag=1)


def test_ticks_keep_no_memory() -> None:
    exchanges, nodes = ring(8)
    nodes["a"].outbox["out"].put(0)
    run_ticks(exchanges, nodes, 0, 200)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        run_ticks(exchanges, nodes, 200, 2000)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before <= GROWTH_BYTES, after - before
    assert nodes["b"].outbox["out"].links[0].sent > 900  # the message went round
