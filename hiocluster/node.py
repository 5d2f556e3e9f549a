"""Nodes, their inboxes and outboxes, links with credit, RNG seeds and digests.

A :class:`Node` is a hio DoDoer that the topology names and places. User code
subclasses it: declare ``inboxes`` and ``outboxes``, set up state in
:meth:`Node.setup`, act once per tick in :meth:`Node.step` (and/or add hio doers
to ``self.doers``), and return the state to digest from :meth:`Node.state`.

Delivery contract (docs/design.md, invariant 2): a message put during tick n is in
the linked inbox at the start of tick n+1, ordered by source node name, then by
the source's send sequence, whether the link crosses processes or not. The
worker does the moving; this module only holds the buffers.

Back pressure (invariant 4): every link has a capacity. A message counts
against it from ``put`` until the receiving node takes it out of its inbox;
the receiver's takes reach the sender a fixed number of ticks later (the run's
credit lag, docs/protocol.md §7), in every placement alike.
``put`` on a link without credit raises :class:`~hiocluster.errors.LinkFull`.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import os
import random
import sys
import time
from collections import deque
from itertools import repeat
from operator import itemgetter
from typing import Any, ClassVar

import msgpack
from hio.base.doing import DoDoer
from xxhash import xxh3_128_digest

from hiocluster.errors import LinkFull, Terminated
from hiocluster.protocol import arrays
from hiocluster.runtime.early import pending as early_signal

__all__ = ["Node", "Inbox", "Outbox", "Link", "Clock", "derive_seed", "digest_state",
           "random_for", "numpy_random_for",
           "load_class"]


def derive_seed(run_seed: int, node_name: str) -> int:
    """A node's RNG seed: stable across processes, hosts and Python runs."""
    material = f"hiocluster/{run_seed}/{node_name}".encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "big")


def _key_digest(run_seed: int, tick: int, key: Any) -> bytes:
    return hashlib.sha256(f"hiocluster-key/{run_seed}/{tick}/{key!r}".encode()).digest()


def random_for(run_seed: int, tick: int, key: Any) -> random.Random:
    """A generator for ``key`` at ``tick`` of a run seeded ``run_seed``: the same
    wherever, and by whichever node, it is made (unlike a node's ``rng``, whose
    draws depend on which node draws them and what it drew before). A model split
    into tiles draws per cell (``key`` = the cell's coordinates) and matches a
    one-array reference that calls this with the same keys. ``key``: ints, strings
    and tuples of them (its ``repr`` is hashed)."""
    return random.Random(int.from_bytes(_key_digest(run_seed, tick, key)[:8], "big"))


def numpy_random_for(run_seed: int, tick: int, key: Any) -> Any:
    """As :func:`random_for`, a numpy Generator (Philox, counter-based) for arrays of
    draws; needs numpy."""
    import numpy

    entropy = int.from_bytes(_key_digest(run_seed, tick, key)[:16], "big")
    return numpy.random.Generator(numpy.random.Philox(numpy.random.SeedSequence(entropy)))


#: msgpack's packer for digests: one, reused (it resets itself after every pack)
pack_state = msgpack.Packer(use_bin_type=True, default=arrays.default).pack


def digest_state(state: Any) -> bytes:
    """xxh3_128 of the msgpack packing of ``state`` (protocol.DIGEST_SIZE bytes); a big
    array is hashed in place, to the same digest (protocol.arrays.digest)."""
    return arrays.digest(state) or xxh3_128_digest(pack_state(state))


class Clock:
    """The lockstep tick, shared by every node of a worker: one store per tick, not
    one per node; and which node's tick raised (``failed``: its name, None while
    none has), read by the worker to name it."""

    __slots__ = ("tick", "spans", "failed")

    def __init__(self) -> None:
        self.tick = -1
        self.failed: str | None = None
        #: with --trace, [node, start, end] (wall seconds) of every step of this tick
        self.spans: list[list[Any]] | None = None


class Link:
    """One directed link, as both ends see it: counters that decide credit.

    ``sent`` counts messages put (by the source), ``acked`` the takes the source
    has heard of; ``taken`` counts the receiver's takes in the current tick.
    """

    __slots__ = ("id", "source", "outbox", "target", "inbox", "capacity", "source_worker",
                 "target_worker", "sent", "acked", "taken", "last_acked", "sequences",
                 "payloads", "label")

    def __init__(self, id: int, source: str, outbox: str, target: str, inbox: str,
                 capacity: int, source_worker: str, target_worker: str) -> None:
        self.id = id
        self.source, self.outbox, self.target, self.inbox = source, outbox, target, inbox
        self.capacity = capacity
        self.source_worker, self.target_worker = source_worker, target_worker
        self.sent = 0
        self.acked = 0
        self.taken = 0
        self.last_acked = 0  # the receiver's takes in the last batch of acks it sent
        self.sequences: list[int] = []  # the source's send sequence of each payload ...
        self.payloads: list[Any] = []   # ... put on this link during the current tick
        self.label = f"{source}.{outbox} -> {target}.{inbox}"

    @property
    def room(self) -> int:
        """How many more messages may be put now."""
        return self.capacity - (self.sent - self.acked)


class Boxes(dict):  # type: ignore[type-arg]
    """A node's inboxes or outboxes by name (a dict); a name it lacks is a KeyError
    naming the node and the boxes it has (``self.outbox["north"]`` in a node whose
    class declares ``outboxes = ("east", "west")``)."""

    def __init__(self, node: str, kind: str, boxes: dict[str, Any]) -> None:
        super().__init__(boxes)
        self.node, self.kind = node, kind

    def __missing__(self, box: str) -> Any:
        has = ", ".join(repr(name) for name in self) or "none"
        raise KeyError(f"node {self.node} has no {self.kind} {box!r} (its {self.kind}es: "
                       f"{has}; a class declares them in {self.kind}es = (...))")


class Inbox:
    """Messages delivered to one named inbox of a node, oldest first.

    Each entry remembers its source node; taking one returns credit to its link.
    """

    __slots__ = ("name", "_entries")

    def __init__(self, name: str) -> None:
        self.name = name
        self._entries: deque[tuple[Link, Any]] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def get(self) -> Any:
        """Take the oldest message. Raises IndexError when empty."""
        link, payload = self._entries.popleft()
        link.taken += 1
        return payload

    def get_from(self) -> tuple[str, Any]:
        """Take the oldest message with its source node name."""
        link, payload = self._entries.popleft()
        link.taken += 1
        return link.source, payload

    def drain(self) -> list[Any]:
        """Take every message now; return them oldest first."""
        entries = self._entries
        if not entries:
            return []
        self._entries = deque()
        for link, _ in entries:  # cheaper than a Counter for the usual few
            link.taken += 1
        return list(map(itemgetter(1), entries))

    def peek(self) -> Any:
        """The oldest message, left in place. Raises IndexError when empty."""
        return self._entries[0][1]

    def _deliver(self, link: Link, payloads: list[Any]) -> None:
        """Append a run of messages that came over ``link``, in order."""
        self._entries.extend(zip(repeat(link), payloads))


class Outbox:
    """A named outbox of a node, linked to one or more inboxes."""

    __slots__ = ("name", "node", "links", "_by_target")

    def __init__(self, name: str, node: Node) -> None:
        self.name = name
        self.node = node
        self.links: list[Link] = []
        self._by_target: dict[str, Link] = {}

    def _attach(self, link: Link) -> None:
        self.links.append(link)
        self._by_target[link.target] = link

    @property
    def targets(self) -> list[str]:
        """Target node names, in canonical (link) order."""
        return [link.target for link in self.links]

    def _link(self, to: str | None) -> Link:
        if to is None:
            if len(self.links) != 1:
                raise ValueError(f"{self.node.name}.{self.name} has {len(self.links)} links; "
                                 f"say which target with to= (one of {self.targets})")
            return self.links[0]
        try:
            return self._by_target[to]
        except KeyError:
            raise ValueError(f"{self.node.name}.{self.name} has no link to {to!r}; "
                             f"targets: {self.targets}") from None

    def room(self, to: str | None = None) -> int:
        """Messages that may still be put on the link to ``to`` this tick."""
        return self._link(to).room

    def put(self, payload: Any, to: str | None = None) -> None:
        """Send ``payload`` (anything msgpack packs) on the link to node ``to``.

        It is packed when the tick ends, on every link alike (local ones too): what
        travels is the payload as it is then (``put(a.copy())`` to send an array as
        it is now). ``to`` may be left out when the outbox has exactly one link.

        Raises:
            LinkFull: the link has no credit; nothing was sent.
            ValueError: ``to`` names no linked node.
        """
        link = self._link(to)
        if link.room <= 0:
            raise LinkFull(link.label, self.node.tick, link.capacity)
        self._append(link, payload)

    def offer(self, payload: Any, to: str | None = None) -> bool:
        """Like :meth:`put`, but return False instead of raising when full."""
        link = self._link(to)
        if link.room <= 0:
            return False
        self._append(link, payload)
        return True

    def _append(self, link: Link, payload: Any) -> None:
        node = self.node
        link.sent += 1
        link.sequences.append(node.sequence)
        link.payloads.append(payload)
        node.sequence += 1


class Node(DoDoer):
    """Base class of every node: a hio DoDoer with inboxes, outboxes and a seeded RNG.

    Subclasses set ``inboxes``/``outboxes`` and override :meth:`setup`,
    :meth:`step` and :meth:`state`. ``self.params`` holds the topology's params,
    ``self.rng`` a ``random.Random`` seeded from (run seed, node name),
    ``self.tick`` the current lockstep tick, ``self.ticks`` the run's length;
    a node made by ``count`` knows ``self.index`` (0 .. count-1) and
    ``self.count`` (None otherwise). See hio's DoDoer for the rest.
    """

    inboxes: ClassVar[tuple[str, ...]] = ()
    outboxes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, params: dict[str, Any] | None = None, *, seed: int = 0,
                 ticks: int = 0, index: int | None = None, count: int | None = None,
                 **kwa: Any) -> None:
        super().__init__(doers=[], **kwa)
        self.name = name
        self.params = dict(params or {})
        self.seed = seed
        self.ticks = ticks  # the run's length: ticks 0 .. ticks-1
        self.index, self.count = index, count
        #: how the run ended, for ``exit()``: "finished", "failed" or "interrupted"
        #: (None while it runs)
        self.outcome: str | None = None
        self.rng = random.Random(derive_seed(seed, name))
        self.clock = Clock()  # a worker gives all its nodes one clock
        self.sequence = 0  # send sequence across all outboxes: the delivery order key
        self.inbox: dict[str, Inbox] = Boxes(name, "inbox",
                                              {box: Inbox(box) for box in self.inboxes})
        self.outbox: dict[str, Outbox] = Boxes(name, "outbox",
                                               {box: Outbox(box, self) for box in self.outboxes})
        self.setup()

    def random_for(self, key: Any) -> random.Random:
        """A generator for ``key`` at this tick, the same in every placement and
        every split of a model into nodes (:func:`random_for`)."""
        return random_for(self.seed, self.tick, key)

    def numpy_random_for(self, key: Any) -> Any:
        """As :meth:`random_for`, a numpy Generator (:func:`numpy_random_for`)."""
        return numpy_random_for(self.seed, self.tick, key)

    # -- user hooks -------------------------------------------------------
    def setup(self) -> None:
        """Build initial state and extra doers. Runs once, before the first tick."""

    def step(self) -> None:
        """Act once per tick, before this node's own doers run."""

    def state(self) -> Any:
        """What this node's digest covers: any msgpack-packable value."""
        return None

    #: The kind of each metric that is not a counter: ``{"queue": "gauge",
    #: "wait": "duration"}``. Counters are summed over nodes and shown with a rate;
    #: gauges and durations (any finite number) per node: min, mean and max.
    metric_kinds: ClassVar[dict[str, str]] = {}

    def metrics(self) -> dict[str, Any]:
        """This node's metrics at the end of a run, e.g. ``{"events": 51297}``
        (names: 1-64 of A-Z a-z 0-9 _ . -; a counter's value: an int >= 0). Each
        node's are in the result (``RunResult.node_metrics``), the counters also
        summed (``RunResult.metrics``).
        """
        return {}

    def observe(self) -> dict[str, float] | None:
        """What to record of this node after a tick, e.g. ``{"infected": 12,
        "mean": 0.31}`` (names as :meth:`metrics` has them; values: finite
        numbers, or small arrays of them: a list, tuple or numpy array of at most
        64, a row per element named ``name.i``, ``name.i.j`` for 2-D), every
        ``[run] observe_every`` ticks (default 1; 0: never) and
        after the last. Collected per tick into columns (``RunResult.observations``,
        ``--observe FILE``); never part of a digest, so it must not change the
        node's state. Only classes that define it are asked; None: nothing this
        time."""
        return None

    def result(self) -> Any:
        """What this node hands back when the run finished (msgpack-able, string map
        keys): ``RunResult.nodes[name]``, "results" in ``--json``, a line of
        ``--output``. Called after the last tick, before ``exit()``; also after
        the last tick an interrupted run reached everywhere (its results so far);
        not called when the run failed."""
        return None

    # -- checkpoints ----------------------------------------------------------
    #: The attributes that hold all of this node's own state: a checkpoint saves
    #: them as they are and a resumed run sets them back (instead of overriding
    #: :meth:`snapshot` and :meth:`restore`). hiocluster saves the rest itself:
    #: inboxes, credit, the RNG, the send sequence.
    snapshot_attrs: ClassVar[tuple[str, ...] | None] = None

    def snapshot(self) -> Any:
        """This node's own state for a checkpoint: msgpack-able (numpy arrays too),
        enough for :meth:`restore` on a fresh node of the same class and params to
        go on exactly as this one would. Default: the :attr:`snapshot_attrs`."""
        if self.snapshot_attrs is None:
            raise TypeError(cannot_checkpoint(type(self)))
        return {name: getattr(self, name) for name in self.snapshot_attrs}

    def restore(self, data: Any) -> None:
        """Take back what :meth:`snapshot` returned (after ``setup()``, before the
        first tick of a resumed run). Default: set the :attr:`snapshot_attrs`."""
        if self.snapshot_attrs is None:
            raise TypeError(cannot_checkpoint(type(self)))
        for name in self.snapshot_attrs:
            setattr(self, name, data[name])

    @property
    def tick(self) -> int:
        """The lockstep tick being run (-1 before the first)."""
        return self.clock.tick

    # -- hio --------------------------------------------------------------
    def recur(self, tyme: float, deeds: Any = None) -> bool:  # type: ignore[override]
        """One tick: :meth:`step`, then every doer in ``self.doers`` once.

        Returns False: a node lives as long as the run.
        """
        spans = self.clock.spans
        began = time.time() if spans is not None else 0.0
        try:
            self.step()
            if self.deeds:
                super().recur(tyme, deeds)
            if spans is not None:  # --trace: when this node stepped
                spans.append([self.name, began, time.time()])
        except BaseException as exc:
            if self.clock.failed is None:  # the innermost node: the one to name
                self.clock.failed = self.name
            # hio runs this node's exit() as the exception leaves its generator
            # (a signal reaches a node as the worker's Terminated: not its failure)
            self.outcome = "interrupted" if isinstance(exc, Terminated) else "failed"
            raise
        return False

    def digest(self) -> bytes:
        """xxh3_128 of :meth:`state`, packed with msgpack: the node digest the run digest
        folds in (docs/protocol.md §7). Workers compute exactly this without calling
        it, so override :meth:`state`, never this."""
        return digest_state(self.state())


def load_class(path: str, app_dir: str | None = None, base: type | None = None) -> Any:
    """Import the Node subclass (or subclass of ``base``) named ``"module:attr"``.

    ``app_dir`` (default: the current directory) goes first on sys.path if absent,
    like gunicorn's and uvicorn's ``--app-dir``.

    Raises:
        ImportError: with a message saying what was missing or what went wrong.
    """
    directory = os.path.abspath(os.getcwd() if app_dir is None else app_dir)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name + ".").startswith(exc.name + "."):
            raise ImportError(f"module {module_name!r} not found (looked in the app dir "
                              f"{directory} and on sys.path; where is it? pass --app-dir "
                              "DIR)") from exc
        raise ImportError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") \
            from exc
    except Exception as exc:  # the user's module raised while importing: say so
        if early_signal() is not None:  # an interrupt it turned into something else
            raise KeyboardInterrupt from exc
        raise ImportError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") \
            from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            near = difflib.get_close_matches(part, [name for name in dir(target)
                                                    if not name.startswith("_")], n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ImportError(f"module {module_name!r} has no attribute {attribute!r}"
                              f"{hint}") from None
    if not isinstance(target, type):
        raise ImportError(f"{path!r} is not a class (it is a {type(target).__name__})")
    base = base or Node
    if not issubclass(target, base):
        raise ImportError(f"{path!r} is not a subclass of {base.__module__}.{base.__qualname__}")
    return target


def cannot_checkpoint(cls: type[Node]) -> str | None:
    """Why nodes of class ``cls`` cannot be checkpointed (None: they can): a class
    needs both :meth:`Node.snapshot` and :meth:`Node.restore` of its own, or
    :attr:`Node.snapshot_attrs`."""
    own = cls.snapshot is not Node.snapshot, cls.restore is not Node.restore
    if all(own) or (not any(own) and getattr(cls, "snapshot_attrs", None) is not None):
        return None
    if any(own):
        return (f"{cls.__module__}.{cls.__qualname__} defines "
                f"{'snapshot()' if own[0] else 'restore()'} but not "
                f"{'restore()' if own[0] else 'snapshot()'}: a checkpoint needs both")
    return (f"{cls.__module__}.{cls.__qualname__} cannot be checkpointed: define "
            "snapshot() and restore(), or snapshot_attrs (the attributes that hold its "
            "state)")
