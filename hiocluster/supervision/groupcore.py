"""A sub-supervisor's run, sans-IO: a group of children that looks like one worker.

A topology's ``[groups]`` put workers (and other groups) under a supervisor of
their own, a process between them and the root (docs/design.md, "Hierarchy").
Upward it speaks the worker's side of the protocol, for its whole subtree:

* HELLO once every child said HELLO, with ``leaves``: where every worker under it
  listens for DATA (it has no data socket of its own);
* READY and DONE with the digest records of every node under it, spliced into
  name order (the root folds them as if one worker held all those nodes);
* PROGRESS every PROGRESS_S while a window runs: the least progress under it, and
  the workers outside it that those under it are waiting for;
* BYE once every child said BYE: the sum of their counters;
* ERROR at the first failure under it, naming the worker (and node) that failed
  (code ``subtree``), so the root's verdict is the same as without the group.

Downward it is a supervisor (:class:`~hiocluster.supervision.runcore.Supervision`): the
SETUP from above carries one SETUP body per worker under it, which it hands on;
GRANT and STOP go to every child as they came. DATA never passes through it:
workers send it to each other directly, so a group adds one hop to the control
path only, once per window.
"""

from __future__ import annotations

from typing import Any, Mapping

from hiocluster import protocol as proto
from hiocluster.errors import (
    ClusterError,
    FrameError,
    Interrupted,
    ProcessExited,
    ProtocolError,
    RunFailed,
)
from hiocluster.supervision.outcome import merge_byes, subtree_error
from hiocluster.supervision.runcore import Phase, Supervision
from hiocluster.timing import PROGRESS_S, START_TIMEOUT, STOP_TIMEOUT
from hiocluster.topology.tree import tree_groups, tree_leaves

__all__ = ["GroupCore", "PROGRESS_S"]

#: Longest wait for the BYEs that place a death in its tick before it goes up unplaced.
DEFER_S = 1.0
#: Deepest nesting of groups a tree may have.


class GroupCore(Supervision):
    """A sub-supervisor's books (see the module docstring).

    Args:
        name: the group's name in the plan (its children's supervisor knows it so).
        tree: its children (see :func:`check_tree`).
        token: the run's token: it proves itself with it, and its children with it.
        pid: its process id (HELLO.pid).
        The rest: see :class:`~hiocluster.supervision.runcore.Supervision`.

    The shell feeds frames from the parent to :meth:`from_parent` and sends what
    collects in ``up``; frames from children and process exits go in as for any
    supervisor.
    """

    def __init__(self, name: str, tree: Mapping[str, Any], *, now: float, token: bytes,
                 pid: int, versions: dict[str, str] | None = None,
                 start_timeout: float = START_TIMEOUT,
                 stop_timeout: float = STOP_TIMEOUT) -> None:
        leaves = {child: tree_leaves(child, sub) for child, sub in tree.items()}
        members = {child: [node for nodes in under.values() for node in nodes]
                   for child, under in leaves.items()}
        super().__init__(members, now=now, token=token, versions=versions,
                         start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.name, self.pid = name, pid
        self.parent = proto.ChildMachine(name)
        self.up: list[bytes] = []                 # frames to the parent
        self.leaves_of.update({child: tuple(under) for child, under in leaves.items()})
        self.grouped = {child for child, sub in tree.items() if isinstance(sub, dict)}
        for child, under in leaves.items():
            for leaf, nodes in under.items():
                self.owner[leaf], self.nodes_of[leaf] = child, nodes
            if isinstance(tree[child], dict):
                for inner, nodes in tree_groups(tree[child]).items():
                    self.owner[inner], self.nodes_of[inner] = child, nodes
        self.done_until = -1          # the last tick reported DONE upward
        self.report_at = 0.0          # when the next PROGRESS is due
        self.orphaned = False         # the parent is gone: nobody to tell
        self.told = False             # its supervisor knows of the failure
        self.deferred = False         # a child died without a word: told once placed
        self.deferred_at = 0.0

    # -- from the parent -----------------------------------------------------------
    def from_parent(self, data: bytes, now: float) -> None:
        """A frame from this group's own supervisor."""
        if self.parent.state in (proto.ChildState.CLOSED, proto.ChildState.ERROR):
            return
        try:
            message = self.parent.receive(data)
        except (FrameError, ProtocolError) as exc:
            self.up.append(proto.encode(proto.Error(
                code=exc.code, detail=str(exc), field=exc.field, tick=self._tick())))
            self.fail(self._own(f"its supervisor sent an invalid frame: {exc.field}: {exc}"),
                      now, tell=False)
            return
        if isinstance(message, proto.Setup):
            self._setup(message, now)
        elif isinstance(message, proto.Grant):
            self.granted, self.window_start = message.until, now
            self.report_at = now + PROGRESS_S
            self._grant_all(message)
        elif isinstance(message, proto.Stop):
            if self.phase in (Phase.STARTING, Phase.RUNNING):
                self._stop(now, drain=message.drain, reason=message.reason)
        elif isinstance(message, proto.Error):
            self.fail(self._own(f"its supervisor sent ERROR {message.code}: "
                                f"{message.detail}"), now, tell=False)

    def lost_parent(self, now: float) -> None:
        """The connection to the parent is gone for good: stop, telling nobody."""
        self.orphaned = True
        self.fail(self._own("orphaned: its supervisor is gone"), now, tell=False)

    def interrupt(self, signum: int, now: float) -> None:
        """A signal (SIGTERM from its supervisor, or by hand): stop everyone cleanly."""
        self.fail(Interrupted(signum), now)

    def poll(self, now: float) -> None:
        super().poll(now)
        if self.deferred and now > self.deferred_at + DEFER_S and isinstance(
                self.failure, RunFailed):
            self._tell(self.failure)  # a sibling is slow to say BYE: say it unplaced
        if self.parent.state is proto.ChildState.RUNNING and now >= self.report_at \
                and not self.told:  # (it still speaks while it places a death)
            self.report_at = now + PROGRESS_S
            tick = min(book.progress for book in self.books.values())
            waiting = sorted({peer for book in self.books.values() for peer in book.waiting
                              if peer not in self.owner})
            self._up(proto.Progress(tick=tick if tick >= 0 else None, waiting=waiting),
                     checked=False)

    @property
    def exit_code(self) -> int:
        """The group process's exit code: 0 once it said BYE."""
        if self.parent.state is proto.ChildState.CLOSED and self.failure is None:
            return 0
        if isinstance(self.failure, Interrupted):
            return 128 + self.failure.signal
        return 3 if self.orphaned else 1

    # -- the steps, as a group takes them -------------------------------------------
    def _all_hello(self, now: float) -> None:
        addresses = self._addresses(now)
        if addresses is not None:
            self._up(proto.Hello(worker=self.name, token=self.token, pid=self.pid,
                                 versions=self.versions, leaves=addresses))

    def _setup(self, setup: proto.Setup, now: float) -> None:
        mine = {leaf for under in self.leaves_of.values() for leaf in under}
        try:
            if set(setup.leaves) != mine:
                raise FrameError(f"names {sorted(setup.leaves)[:10]}, not the workers under "
                                 f"{self.name}: {sorted(mine)[:10]}", field="SETUP.leaves",
                                 code="bad-field")
            bodies = {leaf: proto.from_body(proto.Setup, body)
                      for leaf, body in setup.leaves.items()}
        except FrameError as exc:
            self.up.append(proto.encode(proto.Error(code=exc.code, detail=str(exc),
                                                    field=exc.field)))
            self.fail(self._own(f"its supervisor sent an invalid SETUP: {exc}"), now,
                      tell=False)
            return
        self.tick_timeout = setup.tick_timeout
        self.chain.every, self.chain.ticks = setup.digest_every, setup.ticks
        for child, book in self.books.items():
            under = self.leaves_of[child]
            book.neighbours = frozenset(peer for leaf in under
                                        for peer in bodies[leaf].peers  # type: ignore
                                        if peer not in under)
            if child not in self.grouped:
                self._send(book, bodies[child])
            else:
                self._send(book, setup.for_group({leaf: setup.leaves[leaf]
                                                  for leaf in under}))

    def _all_ready(self, now: float) -> None:
        self.phase, self.ticking = Phase.RUNNING, now
        self._up(proto.Ready(digests=self.chain.splice(
            {name: b.ready for name, b in self.books.items()}, 1)))  # type: ignore[misc]

    def _all_done(self, now: float) -> None:
        states = self.chain.states(self.done_until + 1, self.granted)
        digests = self.chain.splice({name: b.pending for name, b in self.books.items()},
                                    states)
        self.done_until = self.granted
        if not self.observed_window:
            self._up(proto.Done(until=self.granted, digests=digests), checked=False)
            return
        self.observed_window = False
        books = self.books.values()
        cuts = [book.observed_cut for book in books if book.observed_cut >= 0]
        self._up(proto.Done(until=self.granted, digests=digests,
                            observed=[blob for book in books for blob in book.observed],
                            observed_cut=min(cuts, default=-1)), checked=False)

    def _finished(self, now: float) -> None:
        if self.deferred and isinstance(self.failure, RunFailed):
            self._tell(self.failure)  # placed now: its neighbours' BYEs said how far it got
        if self.failure is not None or self.parent.state is not proto.ChildState.STOPPING:
            return
        byes = [book.bye for book in self.books.values()]
        self.up.extend(self.parent.frames(merge_byes(byes, inside=self.owner)))  # type: ignore[arg-type]

    # -- failing ------------------------------------------------------------------
    def fail(self, error: ClusterError, now: float, *, tell: bool = True) -> None:
        """The first failure under this group also goes up at once, as an ERROR that
        names the worker (and node) it happened in; a process that died without a
        word, once its siblings' BYEs placed it in its tick."""
        first = self.failure is None
        if first and tell and isinstance(error, ProcessExited):
            self.deferred = True  # before stopping: the last sibling may finish it at once
            self.deferred_at = now
        super().fail(error, now)
        if first and tell and not self.deferred and isinstance(error, (RunFailed, Interrupted)):
            self._tell(error)

    def _tell(self, error: RunFailed | Interrupted) -> None:
        if self.told or self.orphaned or self.parent.state in (
                proto.ChildState.START, proto.ChildState.CLOSED, proto.ChildState.ERROR):
            return
        self.told = True
        if isinstance(error, RunFailed):
            self._up(subtree_error(error), checked=False)
        else:
            self._up(proto.Error(code="terminated", detail=str(error), tick=self._tick()),
                     checked=False)

    def _own(self, cause: str) -> RunFailed:
        """A failure of the group itself (not of a worker under it)."""
        return RunFailed(worker=self.name, nodes=tuple(sorted(
            node for book in self.books.values() for node in book.node_names)),
            tick=self._tick(), cause=cause, kind="group")

    def _tick(self) -> int | None:
        return self.done_until + 1 if self.ticking else None

    def _up(self, message: proto.Message, *, checked: bool = True) -> None:
        self.up.append(self.parent.send(message, checked=checked))
