"""Nodes that make delivery order visible, for tests of docs/design.md, invariant 2.

A :class:`ProbeSource` sends tagged messages from two outboxes, ``x`` and ``y``,
both usually linked to the same sink inbox, in an order that changes from tick
to tick, so its send sequence interleaves the two outboxes. A
:class:`ProbeSink` records every message it takes, with the tick it took it in
and the source node's name, and may also send messages to itself through its
``loop`` outbox (a self-link) to show in-process links obey the same tick delay.

Every message is sent as a tuple ``(source, sent_tick, index, outbox)``;
``index`` numbers the source's sends within that tick (so it follows the send
sequence). Messages are msgpack-normalized on every link, so the sink must get
a list; it counts any tuple it gets in ``tuples``.

States:
    ProbeSource  ``[[sent_tick, index, outbox], ...]``: every message it sent.
    ProbeSink    ``[received, sent, tuples]``: ``received`` is ``[[tick,
                 source, message], ...]``, every message it took, in the order
                 taken; ``sent`` logs its own sends through ``loop``, like a
                 source's; ``tuples`` counts messages that arrived as tuples.

Params:
    ProbeSource  per_tick (max messages per tick, default 3; the number each
                 tick is drawn from the node's RNG in 0..per_tick), pattern (the
                 outbox order to cycle through, default "xyyx"; rotated by the
                 tick).
    ProbeSink    loop (messages to itself per tick, default 0).
    both         report_dir (optional): at exit, write the final state to
                 ``<report_dir>/<node>.json``.

Imports: stdlib and hiocluster.node only.
"""

from __future__ import annotations

from typing import Any

from nodes.reporting import ReportingNode

__all__ = ["ProbeSource", "ProbeSink"]


class ProbeSource(ReportingNode):
    """Send a few tagged messages per tick, interleaving outboxes ``x`` and ``y``."""

    outboxes = ("x", "y")

    def setup(self) -> None:
        self.per_tick = int(self.params.get("per_tick", 3))
        self.pattern = str(self.params.get("pattern", "xyyx"))
        if not self.pattern or set(self.pattern) - set(self.outboxes):
            raise ValueError(f"{self.name}: pattern must use only 'x' and 'y', "
                             f"got {self.pattern!r}")
        self.sent: list[list[Any]] = []

    def step(self) -> None:
        count = self.rng.randint(0, self.per_tick)
        shift = self.tick % len(self.pattern)
        order = self.pattern[shift:] + self.pattern[:shift]
        for index in range(count):
            box = order[index % len(order)]
            outbox = self.outbox[box]
            if not outbox.links:
                continue  # an unlinked outbox: nothing to send on
            for target in outbox.targets:
                outbox.put((self.name, self.tick, index, box), to=target)
            self.sent.append([self.tick, index, box])

    def state(self) -> Any:
        return self.sent


class ProbeSink(ReportingNode):
    """Record every message taken from ``in`` as ``[tick, source, message]``."""

    inboxes = ("in",)
    outboxes = ("loop",)

    def setup(self) -> None:
        self.loop = int(self.params.get("loop", 0))
        self.received: list[list[Any]] = []
        self.sent: list[list[Any]] = []
        self.tuples = 0

    def step(self) -> None:
        inbox = self.inbox["in"]
        while inbox:
            source, message = inbox.get_from()
            self.tuples += isinstance(message, tuple)
            self.received.append([self.tick, source, message])
        outbox = self.outbox["loop"]
        if outbox.links:
            for index in range(self.loop):
                outbox.put((self.name, self.tick, index, "loop"))
                self.sent.append([self.tick, index, "loop"])

    def state(self) -> Any:
        return [self.received, self.sent, self.tuples]
