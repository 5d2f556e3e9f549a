"""A token ring: each node forwards every token it gets to the next node.

Every node mixes each token it sees into its state, adds a random hop weight
from its own seeded RNG and passes the token on; ``params.tokens`` tokens start
at a node. The digest covers every node's state, so any delivery-order or
RNG mistake shows as a different digest.
"""

from __future__ import annotations

from typing import Any

from hiocluster.node import Node


class RingNode(Node):
    """Forward tokens from ``in`` to ``out``; params: tokens (int, default 0)."""

    inboxes = ("in",)
    outboxes = ("out",)
    snapshot_attrs = ("seen", "mix", "to_start")  # all its state, for checkpoints

    def setup(self) -> None:
        self.seen = 0
        self.mix = 0
        self.to_start = int(self.params.get("tokens", 0))

    def step(self) -> None:
        out = self.outbox["out"]
        while self.to_start and out.room():
            out.put({"id": f"{self.name}/{self.to_start}", "hops": 0, "weight": 0})
            self.to_start -= 1
        inbox = self.inbox["in"]
        while inbox and out.room():
            token = inbox.get()
            self.seen += 1
            self.mix = (self.mix * 1_000_003 + token["weight"] + token["hops"]) % (2**61 - 1)
            token["hops"] += 1
            token["weight"] += self.rng.randrange(1000)
            out.put(token)

    def state(self) -> Any:
        return [self.seen, self.mix, self.to_start]
