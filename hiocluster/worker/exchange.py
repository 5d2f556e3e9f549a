"""The worker's data plane, sans-IO: DATA frames in and out, delivery, credit.

A worker sends a DATA frame of tick n to every neighbour it has links into,
every tick, and runs tick n only once it holds the frame of tick n-1 of every
neighbour with links into it (docs/protocol.md §7). Credit flows back with a
fixed lag of L ticks (SETUP ``credit_lag``): the takes of L ticks travel
together in the frame of every L-th tick (n+1 a multiple of L) and count at the
source from tick n+L on, so a worker waits on a neighbour it only sends to once
every L ticks, for a frame sent L ticks before. :class:`Exchange` keeps the
books for that: it validates and queues incoming frames per neighbour, says
which are still missing, delivers a tick's messages into inboxes in canonical
order (source node name, then send sequence), returns credit when it is due,
and packs the outgoing frames. It holds no socket; the worker's shell moves the
bytes.
"""

from __future__ import annotations

from collections import deque
from itertools import groupby
from operator import itemgetter
from typing import Any, Callable, Iterable, Mapping

from hiocluster import protocol as proto
from hiocluster.errors import FrameError, RemoteProtocolError, Unsendable
from hiocluster.node import Inbox, Link, Node
from hiocluster.protocol import arrays
from hiocluster.protocol.fields import MAX_ARRAY

__all__ = ["Exchange", "Unsendable"]

#: One incoming frame as the exchange keeps it: (tick, messages, acks)
Frame = tuple[int, list[list[Any]], list[list[int]]]


def _reject(text: str, source: str, tick: int, field: str, code: str) -> RemoteProtocolError:
    return RemoteProtocolError(text, tick=tick, worker=source, field=field, code=code)


class Exchange:
    """One worker's links and the DATA frames of its neighbours.

    Args:
        worker: this worker's name.
        nodes: its nodes by name (their boxes get attached to the links).
        rows: SETUP link rows ``[id, source, outbox, target, inbox, capacity,
            source worker, target worker]``: every link touching these nodes.
        lag: the run's credit lag L (SETUP ``credit_lag``): the takes of ticks
            n-L+1 .. n, with n+1 a multiple of L, count at the source from tick n+L.
    """

    def __init__(self, worker: str, nodes: Mapping[str, Node],
                 rows: Iterable[list[Any]], lag: int = 1, end: int = -1) -> None:
        self.worker = worker
        self.lag = lag
        #: the run's length: an empty frame of this tick is an end frame (:meth:`finish`)
        self.end = end
        #: neighbours this worker feeds whose end frame came: they have all of ours
        self.finished: set[str] = set()
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
        #: every neighbour (a worker sharing a link either way), sorted
        self.neighbours: tuple[str, ...] = tuple(sorted(out_to.keys() | in_from.keys()))
        #: neighbours with links into this worker: a frame from each every tick
        self.upstream: tuple[str, ...] = tuple(sorted(in_from))
        #: neighbours this worker only sends to: a frame (their acks) every lag ticks
        self.downstream: tuple[str, ...] = tuple(sorted(out_to.keys() - in_from.keys()))
        self._out_to = {peer: out_to.get(peer, []) for peer in self.neighbours}
        self._in_from = {peer: in_from.get(peer, []) for peer in self.neighbours}
        self._accepts = {peer: frozenset(link.id for link in in_from.get(peer, ()))
                         for peer in self.neighbours}
        self._acks_for = {peer: frozenset(link.id for link in out_to.get(peer, ()))
                          for peer in self.neighbours}
        self._queues: dict[str, deque[Frame]] = {peer: deque() for peer in self.neighbours}
        #: per neighbour, the ticks between its frames: 1, or lag for acks alone
        self._step = {peer: 1 if peer in in_from else lag for peer in self.neighbours}
        #: per neighbour, the tick of the next frame expected from it
        self.next_tick: dict[str, int] = {peer: step - 1 for peer, step in self._step.items()}
        #: per neighbour, 1 + the tick of the last frame from it (0: none yet)
        self.arrived: dict[str, int] = dict.fromkeys(self.neighbours, 0)
        #: neighbours that connected again: frames they resent that are already here
        #: are dropped (counted in ``duplicates``), not refused as stale
        self.resumed: set[str] = set()
        self.duplicates = 0
        #: acks by the tick they count from: [(source worker, field, [link id, count])]
        self._due: dict[int, list[tuple[str, str, list[int]]]] = {}
        self._local: Frame | None = None
        self.sent_tick = -1          # the last tick whose frames went out
        self.messages = 0            # messages put on any link, local ones included
        self.undelivered = 0         # messages of the last tick, drained at STOP

    def acks_due(self, tick: int) -> bool:
        """True if acks sent with the frames of ``tick - lag`` count from ``tick``."""
        lag = self.lag
        return tick % lag == lag - 1 and tick >= 2 * lag - 1

    # -- incoming ---------------------------------------------------------
    def accept(self, source: str, raw: bytes) -> None:
        """Validate and queue a DATA frame that arrived from neighbour ``source``.

        Raises:
            FrameError: not a valid DATA frame.
            RemoteProtocolError: valid, but wrong for this run (``worker`` = source).
        """
        tick, claimed, messages, acks = proto.read_data(raw)
        if tick == self.end and claimed == source and not messages and not acks \
                and self._out_to[source]:
            self.finished.add(source)  # its end frame: it had every frame of ours
            return
        expected = self.next_tick[source]
        if claimed != source:
            raise _reject(f"frame from {source} claims to come from {claimed!r}", source,
                          expected, "DATA.source", "wrong-source")
        if tick != expected or tick > self._ahead(source):
            stale = tick < self.arrived[source]
            if stale and source in self.resumed:
                self.duplicates += 1
                return
            raise _reject(f"frame of tick {tick}, expected tick {expected}"
                          + (" (a tick from the past)" if stale else ""), source, expected,
                          "DATA.tick", "stale-tick" if stale else "wrong-tick")
        if messages:
            ids = [row[0] for row in messages]
            if not self._accepts[source].issuperset(ids) or len(set(ids)) != len(ids):
                self._explain_ids(ids, self._accepts[source], source, "DATA.messages",
                                  expected)
        if acks:
            acked = [row[0] for row in acks]
            if not self._acks_for[source].issuperset(acked) or len(set(acked)) != len(acked):
                self._explain_ids(acked, self._acks_for[source], source, "DATA.acks",
                                  expected)
            if (tick + 1) % self.lag:
                raise _reject(f"acks in the frame of tick {tick}: they travel only every "
                              f"{self.lag} ticks", source, tick, "DATA.acks", "bad-ack")
        self._queues[source].append((tick, messages, acks))
        self.next_tick[source] = tick + self._step[source]
        self.arrived[source] = tick + 1

    def _ahead(self, peer: str) -> int:
        """The furthest tick ``peer`` can have run: one past ours if it waits for our
        data, else as far as the acks we sent let it go."""
        if self._out_to[peer]:
            return self.sent_tick + 1
        lag = self.lag
        return (self.sent_tick + 1) // lag * lag - 1 + 2 * lag - 1

    def safe_before(self, peer: str) -> int:
        """Our frames to ``peer`` of ticks before this one are surely there: the last
        tick it ran (a frame of it arrived) needed no later one."""
        return self.arrived[peer] - 1 - (0 if self._out_to[peer] else self.lag - 1)

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
        """Neighbours whose frame needed before running ``tick`` has not arrived: the
        upstream ones' of tick-1, and when acks are due, the others' of tick-lag."""
        next_tick = self.next_tick
        missing = [peer for peer in self.upstream if next_tick[peer] < tick]
        if self.downstream and self.acks_due(tick):
            before = tick - self.lag + 1
            missing += [peer for peer in self.downstream if next_tick[peer] < before]
        return missing

    @property
    def received(self) -> dict[str, int]:
        """Per neighbour, 1 + the tick of the last frame from it (how far it got)."""
        return dict(self.arrived)

    def _take(self, tick: int) -> list[tuple[str, Frame]]:
        """Every frame due before ``tick``: the upstream neighbours' of tick-1 (all must
        be in), the downstream ones' acks of tick-lag when due, our own local one."""
        queues = self._queues
        frames = [(peer, queues[peer].popleft()) for peer in self.upstream]
        if self.downstream and self.acks_due(tick):
            frames += [(peer, queues[peer].popleft()) for peer in self.downstream]
        local, self._local = self._local, None
        if local is not None and local[0] == tick - 1:
            frames.append((self.worker, local))
        return frames

    def deliver(self, tick: int) -> None:
        """Before running ``tick``: count the acks due now, then fill inboxes with the
        messages of tick-1, by source node name, then send sequence
        (docs/protocol.md §7 step 2).

        Raises:
            RemoteProtocolError: a neighbour acknowledged more than was in flight.
        """
        links, inbox_of, due, lag = self.links, self.inbox_of, self._due, self.lag
        runs: dict[Inbox, list[tuple[Link, list[int], list[Any]]]] = {}
        for peer, (sent, messages, acks) in self._take(tick):
            if acks:
                due.setdefault(sent + lag, []).extend(
                    (peer, f"DATA.acks[{index}][1]", row) for index, row in enumerate(acks))
            for link_id, sequences, payloads in messages:
                if payloads:
                    runs.setdefault(inbox_of[link_id], []).append(
                        (links[link_id], sequences, payloads))
        if due:
            self._count_acks(tick)
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

    def _count_acks(self, tick: int) -> None:
        links = self.links
        for peer, field, (link_id, count) in self._due.pop(tick, ()):
            link = links[link_id]
            if count > link.sent - link.acked:
                raise _reject(f"acks {count} on link {link_id} but only "
                              f"{link.sent - link.acked} are in flight", peer, tick,
                              field, "bad-ack")
            link.acked += count

    def drain(self, tick: int) -> None:
        """Take the frames due before ``tick`` without delivering them (a clean STOP
        after tick-1): their messages count as undelivered, never dropped unseen."""
        self.undelivered += sum(len(row[2]) for _, frame in self._take(tick)
                                for row in frame[1])

    def finish(self) -> list[tuple[str, bytes]]:
        """After a drained stop: an end frame (an empty frame of tick ``end``) for every
        neighbour with links into this worker, saying that it had all their frames."""
        self.sent_tick = self.end
        frame = proto.encode(proto.Data(self.end, self.worker, [], []))
        return [(peer, frame) for peer in self.upstream]

    def unfinished(self) -> list[str]:
        """Neighbours this worker feeds whose end frame has not come."""
        return [peer for peer in self.neighbours
                if self._out_to[peer] and peer not in self.finished]

    # -- outgoing ---------------------------------------------------------
    def outgoing(self, tick: int) -> list[tuple[str, bytes]]:
        """The DATA frames of ``tick``: one for every neighbour this worker has links
        into (empty where there is nothing to say), and, when ``tick`` + 1 is a
        multiple of the lag, one with the acks for every other; sorted by neighbour.
        Keeps the local frame for the next :meth:`deliver`.

        Raises:
            Unsendable: a payload does not survive msgpack; names node and link.
        """
        self.sent_tick = tick
        if not self.links:
            return []
        acking = (tick + 1) % self.lag == 0
        if self.local_links:
            local = self._frame(tick, self.local_links, self.local_links, acking)
            if local.messages or local.acks:
                # through msgpack and back, so local payloads look exactly like remote
                # ones; arrays alone come back as copies: copied, not packed
                if _scalars(local.messages):  # they come back as they are: packed, kept
                    self._pack(local, proto.check_size)
                    self._local = (tick, local.messages, local.acks)
                elif _copyable(local.messages):
                    self._local = (tick, [[link, sequences, [value.copy() for value in values]]
                                          for link, sequences, values in local.messages],
                                   local.acks)
                else:
                    reloaded = self._pack(local, proto.reload_data)
                    self._local = (tick, reloaded.messages, reloaded.acks)
        frames = []
        for peer in self.neighbours:
            out_links = self._out_to[peer]
            if not out_links and not acking:
                continue
            frame = self._frame(tick, out_links, self._in_from[peer], acking)
            if frame.messages and _scalars(frame.messages):  # packing them is check enough
                frames.append((peer, self._pack(frame, proto.check_size)))
            elif frame.messages and _copyable(frame.messages):  # arrays alone: they unpack
                frames.append((peer, proto.encode(frame)))
            elif frame.messages:
                frames.append((peer, self._pack(frame, proto.check_unpacks)))
            else:
                frames.append((peer, proto.encode(frame)))
        return frames

    def _frame(self, tick: int, out_links: list[Link], in_links: list[Link],
               acking: bool) -> proto.Data:
        messages, acks = [], []
        for link in out_links:
            if link.payloads:
                messages.append([link.id, link.sequences, link.payloads])
                self.messages += len(link.payloads)
                link.sequences, link.payloads = [], []
        if acking:
            for link in in_links:
                link.last_acked = taken = link.taken  # (a checkpoint's pending credit)
                if taken:
                    acks.append([link.id, taken])
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

    # -- checkpoints (hiocluster.worker.checkpoint) -------------------------------------
    def last_ack_tick(self, tick: int) -> int:
        """The last tick up to ``tick`` whose frames carried acks (-1: none yet)."""
        lag = self.lag
        return (tick + 1) // lag * lag - 1

    def cut(self, tick: int) -> tuple[dict[int, dict[str, int]], dict[int, list[Any]]]:
        """This worker's side of every link after ``tick``, which every worker has run
        and whose frames to this one are all in (a checkpoint's cut): per link id,
        ``sent``/``acked`` where its source is here, ``taken`` (takes not acked yet)
        and ``pending`` (the takes acked at the last ack tick: credit its source
        counts only ``lag`` ticks later) where its target is; and the messages of
        ``tick`` not delivered yet, per link id: ``[sequences, payloads]``."""
        links: dict[int, dict[str, int]] = {}
        for link_id, link in self.links.items():
            side = links[link_id] = {}
            if link.source_worker == self.worker:
                side["sent"], side["acked"] = link.sent, link.acked
            if link.target_worker == self.worker:
                side["taken"] = link.taken
                side["pending"] = link.last_acked if self.last_ack_tick(tick) >= 0 else 0
        undelivered: dict[int, list[Any]] = {}
        frames = [queue[0] for peer in self.upstream if (queue := self._queues[peer])]
        if self._local is not None:
            frames.append(self._local)
        for sent, messages, _ in frames:
            if sent != tick:
                raise ValueError(f"a frame of tick {sent} where the cut after tick {tick} "
                                 "expects one of that tick")
            for link_id, sequences, payloads in messages:
                undelivered[link_id] = [list(sequences), list(payloads)]
        return links, undelivered

    def resume(self, tick: int, links: Mapping[int, Mapping[str, int]],
               undelivered: Mapping[int, list[Any]]) -> None:
        """Start after ``tick`` from a cut (:meth:`cut` of every worker, merged by link
        id, at any placement): counters back on the links, the credit acked at the
        last ack tick due ``lag`` ticks after it, and the messages of ``tick``
        delivered before the next one, as a local frame would be."""
        lag, me = self.lag, self.worker
        for link_id, link in self.links.items():
            side = links[link_id]
            if link.source_worker == me:
                link.sent, link.acked = side["sent"], side["acked"]
                self.messages += link.sent
            if link.target_worker == me:
                link.taken = side["taken"]
        last = self.last_ack_tick(tick)
        if last >= 0:  # the acks sent then count at their source from last + lag on
            for link_id, link in self.links.items():
                pending = links[link_id]["pending"]
                if link.source_worker == me and pending:
                    self._due.setdefault(last + lag, []).append(
                        (link.target_worker, "checkpoint", [link_id, pending]))
        self.sent_tick = tick
        for peer in self.upstream:  # their frames of tick are in the cut: stand-ins
            self._queues[peer].append((tick, [], []))
            self.next_tick[peer] = self.arrived[peer] = tick + 1
        for peer in self.downstream:  # acks alone: the last ones are in the cut too
            if last >= lag - 1:
                self._queues[peer].append((last, [], []))
            self.next_tick[peer] = last + lag
            self.arrived[peer] = last + 1
        mine = [[link_id, *undelivered[link_id]] for link_id in sorted(undelivered)
                if link_id in self.links and self.links[link_id].target_worker == me]
        self._local = (tick, mine, []) if mine else None

    # -- counters -----------------------------------------------------------
    def unsent(self) -> int:
        """Messages put but never sent (put in exit contexts, after the last tick)."""
        return sum(len(link.payloads) for link in self.links.values()
                   if link.source_worker == self.worker)


#: Payload types msgpack gives back exactly as it packed them (exact types: a
#: subclass, a tuple or a container takes the round trip).
_SCALARS = frozenset({type(None), bool, int, float, str, bytes})


def _scalars(rows: list[list[Any]]) -> bool:
    """Every payload of ``rows`` is a scalar that unpacks as it was packed: a frame of
    them that packs within the size limit is one its receiver takes."""
    scalars = _SCALARS
    for row in rows:
        for value in row[2]:
            if type(value) not in scalars:
                return False
    return True


def _copyable(rows: list[list[Any]]) -> bool:
    """Every payload of ``rows`` is an array that comes back from msgpack as its copy,
    and the frame stays well inside the limit (else: pack, unpack, and say why not)."""
    size = arrays.arrays_size(rows)
    return size is not None and size < proto.MAX_DATA_FRAME // 2 \
        and sum(len(row[2]) for row in rows) < MAX_ARRAY // 2


def _source_of(run: tuple[Link, list[int], list[Any]]) -> str:
    return run[0].source
