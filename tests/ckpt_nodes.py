"""Nodes for tests/test_checkpoint.py: random walkers whose every choice comes from
their RNG and what they were sent, over links with little credit."""

from __future__ import annotations

from hiocluster import Node


class Walker(Node):
    """Each tick: takes some of what came in (not all: inboxes keep messages across
    ticks), then puts rng-drawn numbers on its outboxes while they have credit."""

    inboxes = ("in",)
    outboxes = ("out", "side")
    snapshot_attrs = ("total", "seen")

    def setup(self) -> None:
        self.total, self.seen = 0, []

    def step(self) -> None:
        inbox = self.inbox["in"]
        for _ in range(self.rng.randint(0, 3)):
            if not inbox:
                break
            source, value = inbox.get_from()
            self.total += value
            self.seen = (self.seen + [source])[-4:]
        for out in self.outbox.values():
            for target in out.targets:
                for _ in range(self.rng.randint(0, 2)):
                    if not out.offer(self.rng.randint(1, 1000) + self.tick, to=target):
                        break

    def state(self):
        return [self.total, self.seen, len(self.inbox["in"])]


class Forgetful(Walker):
    """No snapshot_attrs, no snapshot(): cannot be checkpointed."""

    snapshot_attrs = None


class Half(Walker):
    """restore() without snapshot(): refused too."""

    snapshot_attrs = None

    def restore(self, data) -> None:
        self.total = data
