"""The supervisor's books on each worker, and the SETUP each one gets.

:class:`WorkerBook` keeps what the supervisor knows of one worker: its protocol
machine, what it said and when, how far it got, whether its process ended.
:func:`setups` cuts the topology into one SETUP per worker: its nodes, the
links that touch them, and the addresses of its neighbours only.
"""

from __future__ import annotations

import hmac
from typing import Callable, Mapping

from hiocluster import protocol as proto
from hiocluster.errors import ClusterError, FrameError, ProtocolError, RemoteProtocolError
from hiocluster.protocol.observed import Columns, unpack_observed
from hiocluster.supervision.digests import DigestChain
from hiocluster.topology import Plan, Topology

__all__ = ["WorkerBook", "setups", "claim"]


class WorkerBook:
    """What the supervisor knows of one worker (see the module docstring).

    ``progress`` is the last tick the worker is known to have finished (-1: none),
    from its DONE and PROGRESS frames; ``heard`` when it last said anything.
    """

    def __init__(self, name: str, node_names: tuple[str, ...], external: bool = False) -> None:
        self.name = name
        self.node_names = node_names
        self.node_set = frozenset(node_names)
        self.external = external             # started by hand: no process to watch
        self.machine = proto.ParentMachine(name)
        self.joined = False                  # a connection proved it is this worker
        self.neighbours: frozenset[str] = frozenset()
        self.hello: proto.Hello | None = None
        self.ready: bytes | None = None      # digest records after set-up
        self.pending = b""                   # digest records of the window just done
        self.observed: list[bytes] = []      # ... and its observations (unread)
        self.observed_cut = -1               # the tick it observes no more from, full
        self.done_bytes = 0                  # the size of its last DONE frame
        self.bye: proto.Bye | None = None
        self.heard = 0.0
        self.progress = -1
        self.waiting: tuple[str, ...] = ()   # neighbours whose frames it lacks ...
        self.waiting_since = 0.0             # ... since we first heard so
        self.exitcode: int | None = None
        self.failed = False

    def receive(self, data: bytes, now: float, chain: DigestChain,
                versions: Mapping[str, str]) -> proto.Message:
        """Decode, advance the machine, check what this run needs, and note it.

        Raises:
            FrameError, ProtocolError: the frame is invalid (the machine says why),
                or makes no sense for this run (versions, digest sizes, neighbours).
        """
        done_before = self.machine.done
        message = self.machine.receive(data)
        self.heard = now
        if isinstance(message, proto.Done):
            self._digests(chain, message.digests, chain.states(done_before + 1, message.until),
                          "DONE.digests")
            self.pending = message.digests
            self.observed = message.observed
            if self.observed:  # the size only matters then (WindowSizer)
                self.done_bytes = len(data)
            if message.observed_cut >= 0 and self.observed_cut < 0:
                self.observed_cut = message.observed_cut
            self._advance(message.until, (), now)
        elif isinstance(message, proto.Progress):
            if not self.neighbours.issuperset(message.waiting):
                raise self._nonsense("PROGRESS.waiting", f"{message.waiting} are not all "
                                     f"neighbours of {self.name}")
            self._advance(-1 if message.tick is None else message.tick,
                          tuple(message.waiting), now)
        elif isinstance(message, proto.Hello):
            wrong = proto.mismatches(message.versions, versions)
            if wrong:
                raise RemoteProtocolError("versions differ from the supervisor's: "
                                          + "; ".join(wrong), worker=self.name,
                                          field="HELLO.versions", code="version-mismatch")
            self.hello = message
        elif isinstance(message, proto.Ready):
            self._digests(chain, message.digests, 1, "READY.digests")
            self.ready = message.digests
        elif isinstance(message, proto.Bye):
            self.bye = message
        return message

    def _digests(self, chain: DigestChain, records: bytes, states: int, field: str) -> None:
        why = chain.check(self.name, records, states)
        if why is not None:
            raise self._nonsense(field, why)

    def observations(self, blobs: list[bytes], first: int, last: int) -> list[Columns]:
        """Its DONE's observations of the window ``first``..``last``, read (after
        the next GRANT went out): only of its own nodes, and of those ticks.

        Raises:
            FrameError, RemoteProtocolError: a bin that is not one, or says what
                makes no sense (code ``bad-field``).
        """
        mine, read = self.node_set, []
        for index, blob in enumerate(blobs):
            columns = unpack_observed(blob, f"DONE.observed[{index}]")
            for name, (ticks, nodes, _) in columns.items():
                if ticks and (min(ticks) < first or max(ticks) > last):
                    raise self._nonsense(f"DONE.observed[{index}].{name}", f"ticks outside "
                                         f"the window {first}..{last}")
                strangers = set(nodes) - mine
                if strangers:
                    raise self._nonsense(f"DONE.observed[{index}].{name}", f"nodes not under "
                                         f"{self.name}: {', '.join(sorted(strangers)[:4])}")
            read.append(columns)
        return read

    def _nonsense(self, field: str, text: str) -> RemoteProtocolError:
        """A well-formed frame whose ``field`` makes no sense for this run."""
        return RemoteProtocolError(text, tick=self.machine.tick, worker=self.name, field=field,
                                   code="bad-field")

    def _advance(self, tick: int, waiting: tuple[str, ...], now: float) -> None:
        if tick != self.progress or waiting != self.waiting:
            self.waiting_since = now
        self.progress, self.waiting = max(self.progress, tick), waiting

    def resumed(self, tick: int) -> None:
        """Its worker took back the state after ``tick`` (a checkpoint's): it has
        done every tick up to it."""
        self.machine.done = self.machine.until = self.progress = tick

    @property
    def owes_done(self) -> bool:
        """Granted ticks it has not reported done."""
        return self.machine.state is proto.ParentState.RUNNING and not self.failed

    @property
    def settled(self) -> bool:
        """Nothing more to wait for: it said BYE, or its process ended; for a worker
        started by hand (whose process nobody here can see end): it failed (its
        ERROR was its last word, or it was refused) or it never joined."""
        return self.bye is not None or self.exitcode is not None or (
            self.external and (self.failed or not self.joined))

    @property
    def ready_or_failed(self) -> bool:
        return self.ready is not None or self.failed

    def lost_frame(self, now: float, patience: float,
                   progress_of: Callable[[str], int | None]) -> str | None:
        """The neighbour whose DATA frame of tick ``progress`` should be here by now (its
        progress, as ``progress_of`` knows it, says it finished that tick) yet has been
        awaited for over ``patience`` s."""
        if not self.waiting or now - self.waiting_since <= patience or not self.owes_done:
            return None
        for peer in self.waiting:
            progress = progress_of(peer)
            if progress is not None and progress >= self.progress:
                return peer
        return None


def claim(books: Mapping[str, WorkerBook], token: bytes, parts: list[bytes],
          sender: str | None = None) -> WorkerBook | ClusterError:
    """Whose is a new control connection? ``parts``: its first ROUTER message;
    ``sender``: the name of the CURVE key it came with (None without CURVE).

    A HELLO with the run's token (and, with CURVE, from that worker's own key),
    from a worker of the plan that has not joined, claims the connection: that
    worker's book (now marked joined). Anything else is a stranger's: the error
    to answer it with.
    """
    if len(parts) != 2:
        return FrameError(f"expected one frame, got {len(parts) - 1}", field="frame",
                          code="multipart")
    try:
        hello = proto.decode(parts[1], allowed=(proto.Hello,))
    except FrameError as exc:
        book = _malformed(books, token, parts[1], sender)
        if book is None:
            # without its traceback: the frames in it hold the stranger's bytes in a
            # reference cycle (through the caller's frame), kept until a full collection
            exc.__traceback__ = exc.__cause__ = exc.__context__ = None
            return exc
        book.joined = True  # its machine refuses the frame, naming the field: the run fails
        return book
    assert isinstance(hello, proto.Hello)
    book = books.get(hello.worker)
    if book is None:
        why = f"{hello.worker!r} is not a worker of this run"
    elif not hmac.compare_digest(hello.token, token):
        why = "wrong token"
    elif sender is not None and sender != hello.worker:
        why = f"the CURVE key of {sender or 'nobody'!r} cannot speak for {hello.worker!r}"
    elif book.joined or book.failed:
        why = f"{book.name!r} has already joined"
    else:
        book.joined = True
        return book
    return ProtocolError(why, field="HELLO.worker", code="unknown-peer")


def _malformed(books: Mapping[str, WorkerBook], token: bytes, data: bytes,
               sender: str | None) -> WorkerBook | None:
    """The worker of the run that an invalid HELLO provably comes from (one that has
    not joined yet): the owner of the CURVE key it came with, else the worker it
    names if it carries the run's token. None: a stranger's."""
    name, proof = proto.claimed_by(data)
    if sender is not None:
        name = sender
    elif type(proof) is not bytes or not hmac.compare_digest(proof, token):
        return None
    book = books.get(name) if type(name) is str else None
    return book if book is not None and not book.joined and not book.failed else None


def neighbours(topology: Topology, plan: Plan) -> dict[str, set[str]]:
    """Every worker's neighbours: the workers it shares a link with, either way."""
    worker_of = plan.node_to_worker
    near: dict[str, set[str]] = {spec.name: set() for spec in plan.workers}
    for link in topology.links:
        source, target = worker_of[link.source], worker_of[link.target]
        if source != target:
            near[source].add(target)
            near[target].add(source)
    return near


def setups(topology: Topology, plan: Plan, addresses: Mapping[str, str],
           keys: Mapping[str, str] | None = None, trace: bool = False, resume: str = "",
           record: str = "") -> dict[str, proto.Setup]:
    """One SETUP per worker: its nodes, the links touching them, its neighbours'
    data ``addresses`` and, with ``keys`` (every worker's CURVE public key), theirs;
    ``resume``: the checkpoint every worker starts from; ``record``: the directory
    every worker records into."""
    worker_of = plan.node_to_worker
    rows: dict[str, list[list]] = {spec.name: [] for spec in plan.workers}
    for link in topology.links:
        source, target = worker_of[link.source], worker_of[link.target]
        row = [link.id, link.source, link.outbox, link.target, link.inbox, link.capacity,
               source, target]
        rows[source].append(row)
        if target != source:
            rows[target].append(row)
    near = neighbours(topology, plan)
    pickled = pickle_classes(topology.classes)
    made = {}
    for spec in plan.workers:
        peers = {peer: addresses[peer] for peer in sorted(near[spec.name])}
        made[spec.name] = proto.Setup(
            t0=topology.t0, tock=topology.tock, seed=topology.seed, ticks=topology.ticks,
            real=topology.real, tick_timeout=topology.tick_timeout,
            digest_every=topology.digest_every, credit_lag=topology.lag,
            nodes=[[node.name, node.cls, node.params, node.index, node.count]
                   for node in spec.nodes],
            links=rows[spec.name], peers=peers,
            keys={peer: keys[peer] for peer in peers} if keys else {}, trace=trace,
            resume=resume, record=record, observe_every=topology.observe_every,
            classes={node.cls: pickled[node.cls] for node in spec.nodes if node.cls in pickled})
    return made


def pickle_classes(classes: Mapping[str, type]) -> dict[str, bytes]:
    """Node classes that travel by value, pickled by cloudpickle (which pickles a
    class of ``__main__``, a notebook's or a function's, whole).

    Raises:
        TopologyError: cloudpickle is missing, or a class cannot be pickled.
    """
    if not classes:
        return {}
    from hiocluster.errors import TopologyError
    try:
        import cloudpickle
    except ImportError:
        raise TopologyError("node classes defined in __main__ (a script, a notebook) travel "
                            "to the workers by value with cloudpickle: pip install "
                            "cloudpickle", key_path="nodes") from None
    pickled = {}
    for path, cls in classes.items():
        try:
            pickled[path] = cloudpickle.dumps(cls)
        except Exception as exc:
            raise TopologyError(f"node class {path} cannot travel by value: "
                                f"{type(exc).__name__}: {exc}", key_path="nodes") from None
    return pickled
