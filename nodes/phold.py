"""PHOLD: the classic parallel discrete-event benchmark, as a lockstep topology.

N logical processes (LPs) each keep a priority queue of events. Processing an
event schedules exactly one new event, so the event population is constant.
The new event's timestamp is the old one plus ``1 + exponential(mean_delay)``;
with probability ``remote_fraction`` it goes to another LP (chosen with
``rng.choice`` over the outbox's targets, in canonical link order), otherwise it
stays in the LP's own queue.

Time is measured in ticks and the scheme is conservative-synchronous with a
lookahead of one tick: during tick n an LP processes every queued event with
timestamp < n + 1, in the total order (timestamp, source LP, source's event
sequence). Every new event is at least one tick later than the event that made
it, and a remote event sent during tick n arrives at the start of tick n + 1,
so (with enough link credit) no event ever arrives in an LP's past.

Link credit is respected: a remote event that finds no credit is held and
offered again next tick, never dropped. A held event can arrive after its
timestamp; it is then processed in the tick it arrives and counted in ``late``
(0 in topologies/phold.toml, whose links have ample capacity). Results stay
deterministic either way.

``state()`` is ``[processed, mix, queued, held, late]``: ``processed`` (first,
so benchmarks can read it) counts events processed; ``mix`` is a rolling hash of
every processed (timestamp, source); ``queued`` is the queue length and ``held``
the remote events waiting for credit. The run's ``messages`` counter counts the
remote events; its ``events`` metric (and events/s) counts the processed ones.

Params: population (events each LP starts with, default 8), remote_fraction
(default 0.5), mean_delay (default 1.0), report_dir (optional: at exit, write
the final state to ``<report_dir>/<node>.json``).

Imports: stdlib and hiocluster.node only.
"""

from __future__ import annotations

import heapq
import zlib
from collections import deque
from typing import Any

from nodes.reporting import ReportingNode

__all__ = ["PholdLP", "events_processed"]

#: Modulus of the rolling hash (a Mersenne prime, so the mix stays a small int).
MIX_MODULUS = 2**61 - 1


def events_processed(state: Any) -> int:
    """The number of events an LP has processed, from its :meth:`PholdLP.state`."""
    return int(state[0])


class PholdLP(ReportingNode):
    """One PHOLD logical process; see the module docstring for the model."""

    inboxes = ("in",)
    outboxes = ("out",)

    def setup(self) -> None:
        params = self.params
        self.population = int(params.get("population", 8))
        self.remote_fraction = float(params.get("remote_fraction", 0.5))
        self.mean_delay = float(params.get("mean_delay", 1.0))
        if self.population < 0 or not 0.0 <= self.remote_fraction <= 1.0 \
                or self.mean_delay <= 0:
            raise ValueError(f"{self.name}: need population >= 0, 0 <= remote_fraction <= 1 "
                             f"and mean_delay > 0; got {params}")
        self.processed = 0
        self.mix = 0
        self.late = 0
        self.generated = 0          # this LP's event sequence: the second tie-break
        self.queue: list[tuple[float, str, int]] = []   # heap of (timestamp, source, seq)
        self.held: deque[tuple[str, list[Any]]] = deque()  # (target, event) lacking credit
        self._source_keys: dict[str, int] = {}
        for _ in range(self.population):
            self.queue.append((self._delay() - 1.0, self.name, self._next_sequence()))
        heapq.heapify(self.queue)

    def _delay(self) -> float:
        return 1.0 + self.rng.expovariate(1.0 / self.mean_delay)

    def _next_sequence(self) -> int:
        self.generated += 1
        return self.generated - 1

    def _source_key(self, source: str) -> int:
        key = self._source_keys.get(source)
        if key is None:  # crc32: stable across processes, unlike hash()
            key = self._source_keys[source] = zlib.crc32(source.encode())
        return key

    def step(self) -> None:
        out = self.outbox["out"]
        horizon = self.tick + 1.0
        self._retry_held(out)
        queue = self.queue
        for timestamp, source, sequence in self.inbox["in"].drain():
            if timestamp < self.tick:
                self.late += 1
            heapq.heappush(queue, (timestamp, source, sequence))
        targets = out.targets
        rng, remote_fraction, name = self.rng, self.remote_fraction, self.name
        while queue and queue[0][0] < horizon:
            timestamp, source, _ = heapq.heappop(queue)
            self.processed += 1
            self.mix = (self.mix * 1_000_003 + int(timestamp * 1_000_000)
                        + self._source_key(source)) % MIX_MODULUS
            remote = targets and rng.random() < remote_fraction
            event = (timestamp + self._delay(), name, self._next_sequence())
            if remote:
                target = rng.choice(targets)
                # per-link FIFO holds: events still held for this target mean its
                # credit is spent for this tick, so this offer fails too
                if not out.offer(list(event), to=target):
                    self.held.append((target, list(event)))
            else:
                heapq.heappush(queue, event)

    def _retry_held(self, out: Any) -> None:
        """Offer held events again, oldest first; those still without credit stay held."""
        still: deque[tuple[str, list[Any]]] = deque()
        for target, event in self.held:
            if not out.offer(event, to=target):
                still.append((target, event))
        self.held = still

    def state(self) -> Any:
        return [self.processed, self.mix, len(self.queue), len(self.held), self.late]

    def snapshot(self) -> Any:
        """All its state, for checkpoints (msgpack gives tuples back as lists)."""
        return {"counts": [self.processed, self.mix, self.late, self.generated],
                "queue": self.queue, "held": list(self.held)}

    def restore(self, data: Any) -> None:
        self.processed, self.mix, self.late, self.generated = data["counts"]
        self.queue = [tuple(event) for event in data["queue"]]  # a heap stays a heap
        self.held = deque((target, list(event)) for target, event in data["held"])

    def metrics(self) -> dict[str, int]:
        """``events``: events processed; the run reports their sum and events/s."""
        return {"events": self.processed}
