"""A back-pressured pipeline: producer -> stage1 -> stage2 (slow) -> consumer.

The producer makes up to ``burst`` numbered items per tick (``items`` in all)
and sends them in order while its link has credit. The slow stage forwards at
most ``rate`` items per tick. Links are small, so the slow stage's inbox fills,
credit stops coming back, the fast stage stops taking, and the push-back reaches
the producer, which keeps every unsent item in its backlog (docs/design.md,
invariant 4: a full buffer pushes back; nothing is lost).

A stage takes an item from its inbox only when it can forward it at once, so
no item is ever inside a stage between ticks: every item made but not yet
consumed is in the producer's backlog, in a link, or in an inbox. At the end of
a run::

    producer.made == consumer.consumed + producer backlog + undelivered + unread

where undelivered and unread are the run result's counters.

States:
    producer  ``[made, sent, backlog, blocked_ticks]``; a blocked tick is one in
              which the producer had an item to send and no credit for it.
    stage     ``[forwarded, mix]``
    consumer  ``[consumed, next_expected, errors, mix]``; ``errors`` counts items
              that arrived out of order, duplicated or after a gap.

Every node takes ``report_dir`` (optional): at exit it writes its final state
to ``<report_dir>/<node>.json``.

Imports: stdlib and hiocluster.node only.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from nodes.reporting import ReportingNode

__all__ = ["Producer", "Stage", "Consumer"]

#: Modulus of the rolling checksums (a Mersenne prime).
MIX_MODULUS = 2**61 - 1


class Producer(ReportingNode):
    """Make ``items`` items, ``burst`` per tick at most, and send them in order.

    Params: items (default 100), burst (default 5). An item is ``[seq, value]``
    with ``value`` from the node's RNG.
    """

    outboxes = ("out",)

    def setup(self) -> None:
        self.items = int(self.params.get("items", 100))
        self.burst = int(self.params.get("burst", 5))
        self.made = 0
        self.sent = 0
        self.blocked_ticks = 0
        self.backlog: deque[list[int]] = deque()

    def step(self) -> None:
        # make at most `burst` new items, and never hoard more than `burst`
        while len(self.backlog) < self.burst and self.made < self.items:
            self.backlog.append([self.made, self.rng.randrange(1_000_000)])
            self.made += 1
        out = self.outbox["out"]
        while self.backlog:
            if not out.offer(self.backlog[0]):
                self.blocked_ticks += 1  # pushed back: keep the item for a later tick
                break
            self.backlog.popleft()
            self.sent += 1

    def state(self) -> Any:
        return [self.made, self.sent, len(self.backlog), self.blocked_ticks]


class Stage(ReportingNode):
    """Forward items from ``in`` to ``out``, at most ``rate`` per tick.

    Params: rate (default: no limit). An item is taken only when it can be
    forwarded at once, so a full ``out`` leaves items in ``in``, unacknowledged,
    and the push-back travels upstream.
    """

    inboxes = ("in",)
    outboxes = ("out",)

    def setup(self) -> None:
        rate = self.params.get("rate")
        self.rate = None if rate is None else int(rate)
        self.forwarded = 0
        self.mix = 0

    def step(self) -> None:
        inbox, out = self.inbox["in"], self.outbox["out"]
        budget = out.room() if self.rate is None else min(self.rate, out.room())
        for _ in range(min(budget, len(inbox))):
            item = inbox.get()
            self.mix = (self.mix * 1_000_003 + item[0] * 7919 + item[1]) % MIX_MODULUS
            out.put(item)
            self.forwarded += 1

    def state(self) -> Any:
        return [self.forwarded, self.mix]


class Consumer(ReportingNode):
    """Take every item and check the sequence numbers run 0, 1, 2, ... without gaps."""

    inboxes = ("in",)

    def setup(self) -> None:
        self.consumed = 0
        self.next_expected = 0
        self.errors = 0
        self.mix = 0

    def step(self) -> None:
        for seq, value in self.inbox["in"].drain():
            if seq != self.next_expected:
                self.errors += 1
            self.next_expected = seq + 1
            self.consumed += 1
            self.mix = (self.mix * 1_000_003 + seq * 7919 + value) % MIX_MODULUS

    def state(self) -> Any:
        return [self.consumed, self.next_expected, self.errors, self.mix]
