"""Nodes used by bench/lockstep.py: trivial doers, and a message firehose."""

from __future__ import annotations

from typing import Any

from hio.base.doing import Doer

from hiocluster.node import Node


class TrivialDoer(Doer):
    """A hio Doer that only counts its recurs."""

    def __init__(self, **kwa: Any) -> None:
        super().__init__(**kwa)
        self.count = 0

    def recur(self, tyme: float) -> bool:
        self.count += 1
        return False


class BusyNode(Node):
    """A node running ``params.doers`` (default 10) trivial hio doers per tick."""

    def setup(self) -> None:
        self.doers.extend(TrivialDoer() for _ in range(int(self.params.get("doers", 10))))

    def state(self) -> Any:
        return self.doers[0].count if self.doers else 0


class Source(Node):
    """Puts ``params.per_tick`` small messages on ``out`` every tick."""

    outboxes = ("out",)

    def setup(self) -> None:
        self.per_tick = int(self.params.get("per_tick", 1000))
        self.sent = 0

    def step(self) -> None:
        out = self.outbox["out"]
        for _ in range(min(self.per_tick, out.room())):
            out.put(self.sent)
            self.sent += 1

    def state(self) -> Any:
        return self.sent


class Sink(Node):
    """Takes every message from ``in``; its state is their count and sum."""

    inboxes = ("in",)

    def setup(self) -> None:
        self.count = self.total = 0

    def step(self) -> None:
        inbox = self.inbox["in"]
        self.count += len(inbox)
        self.total += sum(inbox.drain())

    def state(self) -> Any:
        return [self.count, self.total]


class RingBusy(BusyNode):
    """A BusyNode in a ring: forwards one small message per tick from ``in`` to
    ``out`` (the first node of the ring starts it), so every tick every worker
    of a ring has a DATA frame with a message for the next."""

    inboxes = ("in",)
    outboxes = ("out",)

    def setup(self) -> None:
        super().setup()
        self.seen = 0

    def step(self) -> None:
        for value in self.inbox["in"].drain():
            self.seen += value
        self.outbox["out"].put(1)

    def state(self) -> Any:
        return self.seen
