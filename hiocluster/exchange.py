"""The worker's data plane, sans-IO: DATA frames in and out, delivery, credit.

Every tick a worker sends exactly one DATA frame to each neighbour (a worker it
shares a link with, either way) and runs tick n only once it holds each
neighbour's frame of tick n-1 (docs/protocol.md §7). :class:`Exchange` keeps
the books for that: it validates and queues incoming frames per neighbour, says
which are still missing, delivers a tick's messages into inboxes in canonical
order (source node name, then send sequence), returns credit, and packs the
outgoing frames. It holds no socket; the worker's shell moves the bytes.

Imports: node, protocol, errors. Never zmq or hio.
"""

from __future__ import annotations

from collections import deque
from itertools import groupby
from operator import itemgetter
from typing import Any, Callable, Iterable, Mapping

from . import protocol as proto
from .errors import ClusterError, FrameError, RemoteProtocolError
from .node import Inbox, Link, Node

__all__ = ["Exchange", "Unsendable"]


class Unsendable(ClusterError):
    """A node put a payload that cannot cross a link (msgpack cannot round-trip it)."""

    def __init__(self, node: str, tick: int, detail: str) -> None:
        self.node, self.tick, self.detail = node, tick, detail
        super().__init__(detail)


def _reject(text: str, source: str, tick: int, field: str, code: str) -> RemoteProtocolError:
    return RemoteProtocolError(text, tick=tick, worker=source, field=field, code=code)


class Exchange:
    """One worker's links and the DATA frames of its neighbours.

    Args:
        worker: this worker's name.
        nodes: its nodes by name (their boxes get attached to the links).
        rows: SETUP link rows ``[id, source, outbox, target, inbox, capacity,
            source worker, target worker]``: every link touching these nodes.
    """

    def __init__(self, worker: str, nodes: Mapping[str, Node],
                 rows: Iterable[list[Any]]) -> None:
        self.worker = worker
        self.links: dict[int, Link] = {}
        self.inbox_of: dict[int, Inbox] = {}
        self.local_links: list[Link] = []            # both ends here
        out_to: dict[str, list[Link]] = {}           # neighbour -> links into it
        in_from: dict[str, list[Link]] = {}          # neighbour -> links from it
        for link_id, source, outbox, target, inbox, capacity, s_worker, t_worker in rows:
            link = Link(link_id, source, outbox, target, inbox, capacity, s_worker, t_worker)
            if s_worker == worker:
                nodes[source].outbox[outbox]._attach(link)
            if t_worker == worker:
                self.inbox_of[link_id] = nodes[target].inbox[inbox]
            if s_worker == t_worker == worker:
                self.local_links.append(link)
            elif s_worker == worker:
                out_to.setdefault(t_worker, []).append(link)
            elif t_worker == worker:
                in_from.setdefault(s_worker, []).append(link)
            self.links[link_id] = link
        #: every neighbour, sorted: one DATA frame each way per tick
        self.neighbours: tuple[str, ...] = tuple(sorted(out_to.keys() | in_from.keys()))
        self._out_to = {peer: out_to.get(peer, []) for peer in self.neighbours}
        self._in_from = {peer: in_from.get(peer, []) for peer in self.neighbours}
        self._accepts = {peer: frozenset(link.id for link in in_from.get(peer, ()))
                         for peer in self.neighbours}
        self._acks_for = {peer: frozenset(link.id for link in out_to.get(peer, ()))
                          for peer in self.neighbours}
        self._queues: dict[str, deque[proto.Data]] = {peer: deque() for peer in self.neighbours}
        #: per neighbour, the tick of the next frame expected (= frames arrived)
        self.next_tick: dict[str, int] = dict.fromkeys(self.neighbours, 0)
        #: neighbours that connected again: frames they resent that are already here
        #: are dropped (counted in ``duplicates``), not refused as stale
        self.resumed: set[str] = set()
        self.duplicates = 0
        self._local: proto.Data | None = None
        self.sent_tick = -1          # the last tick whose frames went out
        self.messages = 0            # messages put on any link, local ones included
        self.undelivered = 0         # messages of the last tick, drained at STOP

    # -- incoming ---------------------------------------------------------
    def accept(self, source: str, raw: bytes) -> None:
        """Validate and queue a DATA frame that arrived from neighbour ``source``.

        Raises:
            FrameError: not a valid DATA frame.
            RemoteProtocolError: valid, but wrong for this run (``worker`` = source).
        """
        frame = proto.decode_data(raw)
        expected = self.next_tick[source]
        if frame.source != source:
            raise _reject(f"frame from {source} claims to come from {frame.source!r}", source,
                          expected, "DATA.source", "wrong-source")
        if frame.tick != expected or frame.tick > self.sent_tick + 1:
            stale = frame.tick < expected
            if stale and source in self.resumed:
                self.duplicates += 1
                return
            raise _reject(f"frame of tick {frame.tick}, expected tick {expected}"
                          + (" (a tick from the past)" if stale else ""), source, expected,
                          "DATA.tick", "stale-tick" if stale else "wrong-tick")
        ids = [row[0] for row in frame.messages]
        if not self._accepts[source].issuperset(ids) or len(set(ids)) != len(ids):
            self._explain_ids(ids, self._accepts[source], source, "DATA.messages", expected)
        acked = [row[0] for row in frame.acks]
        if not self._acks_for[source].issuperset(acked) or len(set(acked)) != len(acked):
            self._explain_ids(acked, self._acks_for[source], source, "DATA.acks", expected)
        self._queues[source].append(frame)
        self.next_tick[source] = expected + 1

    def _explain_ids(self, ids: list[int], allowed: frozenset[int], source: str, field: str,
                     tick: int) -> None:
        seen: set[int] = set()
        for index, link_id in enumerate(ids):
            if link_id not in allowed:
                raise _reject(f"link {link_id} does not join {source} and {self.worker}",
                              source, tick, f"{field}[{index}][0]", "bad-link")
            if link_id in seen:
                raise _reject(f"link {link_id} appears twice", source, tick,
                              f"{field}[{index}][0]", "duplicate")
            seen.add(link_id)

    def missing(self, tick: int) -> list[str]:
        """Neighbours whose frame of ``tick`` has not arrived yet (sorted)."""
        return [peer for peer, after in self.next_tick.items() if after <= tick]

    @property
    def received(self) -> dict[str, int]:
        """How many frames arrived from each neighbour."""
        return dict(self.next_tick)

    def _take(self, tick: int) -> list[proto.Data]:
        """Every frame of ``tick``: the neighbours' (all must be in), then our own."""
        frames = [self._queues[peer].popleft() for peer in self.neighbours]
        local, self._local = self._local, None
        if local is not None and local.tick == tick:
            frames.append(local)
        return frames

    def deliver(self, tick: int) -> None:
        """Return credit, then fill inboxes with the messages of ``tick``: by source
        node name, then send sequence (docs/protocol.md §7 step 2).

        Raises:
            RemoteProtocolError: a neighbour acknowledged more than was in flight.
        """
        links, inbox_of = self.links, self.inbox_of
        runs: dict[Inbox, list[tuple[Link, list[int], list[Any]]]] = {}
        for frame in self._take(tick):
            for index, (link_id, count) in enumerate(frame.acks):
                link = links[link_id]
                if count > link.sent - link.acked:
                    raise _reject(f"acks {count} on link {link_id} but only "
                                  f"{link.sent - link.acked} are in flight", frame.source, tick,
                                  f"DATA.acks[{index}][1]", "bad-ack")
                link.acked += count
            for link_id, sequences, payloads in frame.messages:
                if payloads:
                    runs.setdefault(inbox_of[link_id], []).append(
                        (links[link_id], sequences, payloads))
        for inbox, group in runs.items():  # inboxes are independent: their order is moot
            if len(group) == 1:
                inbox._deliver(group[0][0], group[0][2])
                continue
            group.sort(key=_source_of)
            for _, same_source in groupby(group, key=_source_of):
                batch = list(same_source)
                if len(batch) == 1:
                    inbox._deliver(batch[0][0], batch[0][2])
                else:  # one node, several outboxes into this inbox: merge by sequence
                    merged = sorted(((sequence, link, payload) for link, sequences, payloads
                                     in batch for sequence, payload in zip(sequences, payloads)),
                                    key=itemgetter(0))
                    for _, link, payload in merged:
                        inbox._deliver(link, [payload])

    def drain(self, tick: int) -> None:
        """Take the last tick's frames without delivering them (a clean STOP): their
        messages count as undelivered, never dropped unseen."""
        self.undelivered += sum(len(row[2]) for frame in self._take(tick)
                                for row in frame.messages)

    # -- outgoing ---------------------------------------------------------
    def outgoing(self, tick: int) -> list[tuple[str, bytes]]:
        """The DATA frame of ``tick`` for every neighbour, sorted by neighbour (an
        empty frame where there is nothing to say); keeps the local frame for the
        next :meth:`deliver`.

        Raises:
            Unsendable: a payload does not survive msgpack; names node and link.
        """
        self.sent_tick = tick
        if not self.links:
            return []
        local = self._frame(tick, self.local_links, self.local_links)
        if local.messages or local.acks:
            # through msgpack and back, so local payloads look exactly like remote ones
            self._local = self._pack(local, proto.reload_data)
        frames = []
        for peer in self.neighbours:
            frame = self._frame(tick, self._out_to[peer], self._in_from[peer])
            if frame.messages:
                frames.append((peer, self._pack(frame, proto.check_unpacks)))
            else:
                frames.append((peer, proto.encode(frame)))
        return frames

    def _frame(self, tick: int, out_links: list[Link], in_links: list[Link]) -> proto.Data:
        messages, acks = [], []
        for link in out_links:
            if link.payloads:
                messages.append([link.id, link.sequences, link.payloads])
                self.messages += len(link.payloads)
                link.sequences, link.payloads = [], []
        for link in in_links:
            if link.taken:
                acks.append([link.id, link.taken])
                link.taken = 0
        return proto.Data(tick, self.worker, messages, acks)

    def _pack(self, frame: proto.Data, unpack: Callable[[bytes], Any]) -> Any:
        """``unpack(encode(frame))``: pack a DATA frame and unpack it as its receiver
        will. A payload that msgpack packs but cannot give back (a map with an array
        key, say), or that overflows a frame, fails here in the sender, naming node
        and link, the same in every placement."""
        try:
            return unpack(proto.encode(frame))
        except FrameError as exc:
            cause: Exception = exc
            link = self.links[frame.messages[0][0]]
            for row in frame.messages:
                try:
                    proto.decode_data(proto.encode(proto.Data(0, self.worker, [row], [])))
                except FrameError as found:
                    cause, link = found, self.links[row[0]]
                    break
            raise Unsendable(link.source, frame.tick, f"cannot send on link {link.label} at "
                             f"tick {frame.tick}: {cause.__cause__ or cause}") from exc

    # -- counters -----------------------------------------------------------
    def unsent(self) -> int:
        """Messages put but never sent (put in exit contexts, after the last tick)."""
        return sum(len(link.payloads) for link in self.links.values()
                   if link.source_worker == self.worker)


def _source_of(run: tuple[Link, list[int], list[Any]]) -> str:
    return run[0].source
