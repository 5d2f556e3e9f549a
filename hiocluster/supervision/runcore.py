"""The supervisor's run, sans-IO: start-up, windows, the digest chain, verdicts.

:class:`Supervision` keeps a supervisor's books on its children: it takes what
arrives (frames from them, process exits, signals, the clock) and answers with
what to do (frames to send, processes to signal), and owns the rules every
supervisor shares: who may join, deadlines, silence, lost frames, stopping,
verdicts. :class:`RunCore` is the root of a run: it sends the SETUPs, grants
the windows, folds the digests and makes the :class:`RunResult`. A
sub-supervisor's core (hiocluster.supervision.groupcore) relays the same steps to its
parent instead. No socket and no process here; the supervisor's doers move
bytes and watch processes (docs/design.md, "Core and shell").

A run goes STARTING (HELLO → SETUP → READY from every child) → RUNNING
(windows: GRANT to all, DONE from all, fold the digests, grant the next) →
STOPPING (STOP to all, BYE from all) → FINISHED.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from hiocluster import protocol as proto
from hiocluster.errors import (
    CheckpointError,
    ClusterError,
    FrameError,
    Interrupted,
    ProcessExited,
    ProtocolError,
    RunFailed,
    describe_exitcode,
)
from hiocluster.protocol.fields import differing_nodes
from hiocluster.supervision.books import WorkerBook, claim, neighbours, setups
from hiocluster.supervision.digests import DigestChain
from hiocluster.supervision.observations import Observations
from hiocluster.supervision.outcome import (
    RunResult,
    error_frame,
    late_start,
    lost_frame,
    placed,
    refusal,
    result_of,
    silent,
    worker_failure,
)
from hiocluster.supervision.windows import WindowSizer
from hiocluster.timing import START_TIMEOUT, STOP_TIMEOUT
from hiocluster.topology import Plan, Topology

__all__ = ["Supervision", "Terminate", "Kill", "RunCore", "RunResult", "Phase", "START_TIMEOUT", "STOP_TIMEOUT",
           "SILENCE_GRACE_S", "STRANGER_LIMIT"]

#: A worker owing DONE that is silent for tick_timeout plus this is stuck in a tick
#: (its own watchdog reports a hung node at tick_timeout; this catches the rest).
SILENCE_GRACE_S = 0.3
#: Seconds between looks for silent workers and lost frames while the run ticks.
CHECK_S = 0.02
#: Rejected frames from strangers after which they are only counted, no longer answered.
STRANGER_LIMIT = 10_000
#: Lead of GRANT.start over the wall clock in real-time runs (the grant's trip).
REAL_START_LEAD_S = 0.02
#: How long an interrupted run waits for the window in flight to end, so that it
#: stops after one tick everywhere (results so far); past that it stops at once.
CUT_GRACE_S = 5.0
#: Observations kept in memory wait, packed, for the run's end until about this
#: many bytes of them came (then they are read: a row takes far more unpacked).
OBSERVED_HOLD_BYTES = 64 * 1024 * 1024



# -- what a core asks its shell to do besides sending frames (typed instructions) --

@dataclass(frozen=True, slots=True)
class Terminate:
    """End child ``child``'s process: SIGTERM now, SIGKILL if it lingers."""

    child: str


@dataclass(frozen=True, slots=True)
class Kill:
    """End child ``child``'s process now (SIGKILL)."""

    child: str


@dataclass(frozen=True, slots=True)
class Checkpointed:
    """Every worker wrote its share of the checkpoint after ``tick``: write its
    manifest (``digest``: the run digest after it; ``records``: the state after it,
    spliced; ``folded``: states folded so far)."""

    tick: int
    digest: str
    records: bytes
    folded: int


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a resumed run starts: the state after ``tick`` (``records``, spliced,
    checked against what the workers took back), the run digest then and the
    states folded so far; ``path``: the checkpoint's directory (SETUP resume)."""

    path: str
    tick: int
    digest: str
    records: bytes
    folded: int


class Phase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FINISHED = "finished"


class Supervision:
    """A supervisor's books on its children (see the module docstring).

    Args:
        members: each child's name -> the node names under it (a worker's own, a
            sub-supervisor's whole subtree).
        now: the monotonic clock at start (seconds); every input carries ``now``.
        token: the run's secret; a worker proves with it that it belongs to the run.
        keep_digests: keep the run digest after every tick.
        versions: what workers must match (default: this process's).
        tick_timeout: the tick deadline, seconds.
        external: children started by hand: no process here to watch or signal.
    """

    def __init__(self, members: Mapping[str, Sequence[str]], *, now: float, token: bytes,
                 keep_digests: bool = False, versions: dict[str, str] | None = None,
                 tick_timeout: float = 30.0, start_timeout: float = START_TIMEOUT,
                 stop_timeout: float = STOP_TIMEOUT, external: Sequence[str] = ()) -> None:
        self.books = {name: WorkerBook(name, tuple(nodes), name in external)
                      for name, nodes in members.items()}
        self.chain = DigestChain({name: book.node_names for name, book in self.books.items()},
                                 keep=keep_digests)
        self.token = token
        self.versions = versions or proto.local_versions()
        self.tick_timeout, self.stop_timeout = tick_timeout, stop_timeout
        #: every worker under a child -> that child (a worker is its own)
        self.owner = {name: name for name in self.books}
        self.nodes_of: dict[str, tuple[str, ...]] = {name: book.node_names
                                                      for name, book in self.books.items()}
        #: every child -> the workers under it (a worker: itself)
        self.leaves_of: dict[str, tuple[str, ...]] = {name: (name,) for name in self.books}
        self.grouped: set[str] = set()  # the children that are groups
        self.groups: set[str] = set()   # every group under this supervisor, at any depth
        self.phase = Phase.STARTING
        self.deadline = now + start_timeout
        self.started = now
        self.ticking = self.ticked = 0.0  # first GRANT, last DONE folded
        self.window_start = now
        self.granted = -1
        self.completed = -1    # the last tick every worker finished (its state folded)
        self.window_first = 0  # the first tick of the window granted last
        self.owed = 0          # DONEs still owed for it
        self.checked_at = 0.0  # when silence and lost frames are looked for next
        self.outbox: list[tuple[str, bytes]] = []      # (child, frame) for the shell to send
        self.signals: list[Terminate | Kill] = []      # processes for it to end
        self.failure: ClusterError | None = None
        self.rejected = 0
        self.observed_window = False  # a DONE of the window in flight had observations

    # -- inputs -----------------------------------------------------------
    def receive(self, worker: str, data: bytes, now: float) -> None:
        """A frame from child ``worker`` on its control connection."""
        book = self.books[worker]
        if book.failed or book.machine.state in (proto.ParentState.CLOSED,
                                                 proto.ParentState.ERROR):
            self.rejected += 1  # late words from a worker already judged: counted
            return
        try:
            message = book.receive(data, now, self.chain, self.versions)
        except (FrameError, ProtocolError) as exc:
            self._refuse(book, exc, now)
            return
        books = self.books.values()
        if type(message) is proto.Done:
            if message.observed or message.observed_cut >= 0:
                self.observed_window = True  # what _all_done passes on
            if self.phase is Phase.RUNNING:
                self.owed -= 1  # each child's machine takes one DONE per GRANT
                if not self.owed:
                    self._all_done(now)
        elif isinstance(message, proto.Hello):
            if self.phase is Phase.STARTING and all(b.hello for b in books):
                self._all_hello(now)
        elif isinstance(message, proto.Ready):
            if self.phase is Phase.STARTING and all(b.ready for b in books):
                self._all_ready(now)
        elif isinstance(message, proto.Bye):
            self._maybe_finish(now)
        elif isinstance(message, proto.Error):
            if message.code == "subtree" and self.owner.get(message.worker or "") != worker:
                return self._refuse(book, book._nonsense(
                    "ERROR.worker", f"{message.worker!r} is not under {worker}"), now)
            book.failed = True
            self.fail(worker_failure(book, message, self.nodes_of.__getitem__,
                                     self._tick_of(book), self.tick_timeout), now)

    def exited(self, worker: str, exitcode: int | None, now: float, tick: int | None = None,
               cause: str | None = None) -> None:
        """Child ``worker``'s process ended with ``exitcode`` (negative: a signal);
        ``tick``: the tick it was working on, where its process handle can tell;
        ``cause``: what happened, where the exit code cannot say (a lost host)."""
        book = self.books[worker]
        book.exitcode = exitcode
        if book.bye is None and not book.failed and self.phase is not Phase.FINISHED:
            book.failed = True
            known = self._tick_of(book)
            if known is not None and tick is not None:
                known = max(known, tick)
            self.fail(ProcessExited(worker=worker, nodes=book.node_names, tick=known,
                                    exitcode=None if cause else exitcode,
                                    cause=cause or describe_exitcode(exitcode)), now)
        self._maybe_finish(now)

    def awaits_word(self, worker: str) -> bool:
        """True while child ``worker`` still owes its last word (BYE) and nothing
        has yet made it moot: its frames may still be in flight after it exits."""
        book = self.books[worker]
        return book.bye is None and not book.failed and self.phase is not Phase.FINISHED

    def poll(self, now: float) -> None:
        """The clock moved: check deadlines."""
        if self.phase is Phase.STARTING and now > self.deadline:
            failure, stuck = late_start(self.books.values(), self.deadline - self.started)
            for book in stuck:  # the others wait for them: they get STOP
                self._kill(book)
            self.fail(failure, now)
        elif self.phase is Phase.RUNNING and now >= self.checked_at:
            self.checked_at = now + CHECK_S  # not every cycle: deadlines are seconds
            self._check_silence(now)
        elif self.phase is Phase.STOPPING and now > self.deadline:
            for book in self.books.values():
                if not book.settled:
                    self.signals.append(Terminate(book.name))
            self._finish(now)

    def admit(self, parts: list[bytes],
              sender: str | None = None) -> tuple[str | None, bytes | None]:
        """A message on a control connection no child has claimed yet.

        Returns ``(worker, None)`` when it is that child's HELLO, with the run's
        token, and the child has not joined: every later frame on the connection
        is that child's. Anything else is a stranger's: counted, and
        ``(None, ERROR frame)`` to answer (no frame once STRANGER_LIMIT were).
        """
        claimed = claim(self.books, self.token, parts, sender)
        if isinstance(claimed, WorkerBook):
            return claimed.name, None
        self.rejected += 1
        return None, error_frame(claimed, None) if self.rejected <= STRANGER_LIMIT else None

    # -- what the shell reads ------------------------------------------------
    @property
    def progress(self) -> int:
        """Ticks every child has finished."""
        return 1 + min(book.progress for book in self.books.values())

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    # -- what a supervisor does at each step (the root and a sub-supervisor differ) ----
    def _all_hello(self, now: float) -> None:
        raise NotImplementedError

    def _all_ready(self, now: float) -> None:
        raise NotImplementedError

    def _all_done(self, now: float) -> None:
        raise NotImplementedError

    def _finished(self, now: float) -> None:
        raise NotImplementedError

    def _addresses(self, now: float) -> dict[str, str] | None:
        """Every worker's data address, from its HELLO or its group's; None (and the
        run refused) when a HELLO does not fit the plan."""
        addresses: dict[str, str] = {}
        for name, book in self.books.items():
            hello = book.hello
            assert hello is not None
            if name in self.grouped:
                expected = set(self.leaves_of[name])
                if set(hello.leaves) != expected or hello.data_address is not None:
                    self._refuse(book, book._nonsense(
                        "HELLO.leaves", f"names {sorted(hello.leaves)[:10]}, not the "
                                        f"workers under {name}: {sorted(expected)[:10]}"), now)
                    return None
                addresses.update(hello.leaves)
            elif hello.data_address is None or hello.leaves:
                self._refuse(book, book._nonsense("HELLO.data_address",
                                                  "a worker has one data address"), now)
                return None
            else:
                addresses[name] = hello.data_address
        return addresses

    # -- deadlines ------------------------------------------------------------
    def _check_silence(self, now: float) -> None:
        deadline = self.tick_timeout
        for book in self.books.values():
            if book.owes_done and now - book.heard > deadline + SILENCE_GRACE_S:
                self._kill(book)
                self.fail(silent(book, now - book.heard, deadline), now)
                return
            lost = book.lost_frame(now, deadline, self._progress_of)
            if lost is not None:
                self.fail(lost_frame(lost, self.nodes_of.get(lost, ()), book), now)
                return

    def _progress_of(self, worker: str) -> int | None:
        """How far ``worker`` (under some child) is known to have got; None if it is
        not under any child of this supervisor."""
        owner = self.owner.get(worker)
        return self.books[owner].progress if owner is not None else None

    # -- stopping -------------------------------------------------------------
    def fail(self, error: ClusterError, now: float) -> None:
        """The run cannot go on: keep the first failure, stop everyone else."""
        if isinstance(error, RunFailed) and error.worker in self.grouped | self.groups:
            error.kind = "group"  # a sub-supervisor's process: said so
        if self.failure is None:
            self.failure = error
        if self.phase in (Phase.STARTING, Phase.RUNNING):
            self._stop(now, drain=False)

    def _stop(self, now: float, *, drain: bool, reason: str | None = None) -> None:
        self.phase = Phase.STOPPING
        self.deadline = now + self.stop_timeout
        failure = self.failure
        if reason is None:
            reason = "done" if failure is None else f"{type(failure).__name__}: {failure}"
        for book in self.books.values():
            if book.failed or book.exitcode is not None or book.machine.state in (
                    proto.ParentState.CLOSED, proto.ParentState.ERROR):
                continue
            self._send(book, proto.Stop(reason=reason[:1000], drain=drain))
        self._maybe_finish(now)

    def _maybe_finish(self, now: float) -> None:
        if self.phase is Phase.STOPPING and all(b.settled for b in self.books.values()):
            self._finish(now)

    def _finish(self, now: float) -> None:
        self.phase = Phase.FINISHED
        if self.failure is None:
            missing = [b for b in self.books.values() if b.bye is None]
            if missing:
                self.failure = RunFailed(worker=missing[0].name, nodes=missing[0].node_names,
                                         tick=self.granted, cause="no BYE after STOP",
                                         kind="group" if missing[0].name in self.grouped
                                         else "worker")
        elif isinstance(self.failure, ProcessExited):
            self.failure = placed(self.failure, self.books.values())
        self._finished(now)

    # -- helpers ------------------------------------------------------------
    def _send(self, book: WorkerBook, message: proto.Message) -> None:
        self.outbox.append((book.name, book.machine.send(message)))

    def _grant_all(self, grant: proto.Grant) -> None:
        """GRANT to every child: one frame, packed and checked once, serves them all."""
        frame = None
        for book in self.books.values():
            frame = book.machine.send(grant, checked=frame is None, frame=frame)
            self.outbox.append((book.name, frame))
        self.owed = len(self.books)

    def _kill(self, book: WorkerBook) -> None:
        book.failed = True
        self.signals.append(Kill(book.name))

    def _tick_of(self, book: WorkerBook) -> int | None:
        """The tick ``book``'s worker is in, as far as we know (None before ticking)."""
        return book.progress + 1 if self.ticking else None

    def _refuse(self, book: WorkerBook, exc: FrameError | ProtocolError, now: float) -> None:
        """A child sent an invalid frame: ERROR to it, fail the run."""
        book.failed = True
        tick = self._tick_of(book)
        self.outbox.append((book.name, error_frame(exc, tick)))
        self.fail(refusal(book, exc, tick), now)


class RunCore(Supervision):
    """The root of a run (see the module docstring).

    Args:
        topology, plan: what to run and where (the plan's top-level workers and
            sub-supervisors are this supervisor's children).
        window: ticks per GRANT (None: automatic).
        wall: the wall clock (``time.time``), read only to set GRANT.start in
            real-time runs.
        keys: every worker's CURVE public key, for CURVE runs (tcp).
        The rest: see :class:`Supervision`.
    """

    def __init__(self, topology: Topology, plan: Plan, *, now: float, token: bytes,
                 window: int | None = None, keep_digests: bool = False,
                 wall: Callable[[], float] | None = None,
                 versions: dict[str, str] | None = None,
                 keys: dict[str, str] | None = None,
                 start_timeout: float = START_TIMEOUT,
                 stop_timeout: float = STOP_TIMEOUT, trace: bool = False,
                 external: Sequence[str] = (),
                 checkpoint_every: int = 0,
                 checkpoint_path: Callable[[int], str] | None = None,
                 resume: Resume | None = None, record: str = "",
                 observations: Observations | None = None) -> None:
        members = {name: [node for leaf in plan.leaves(name)
                          for node in plan.worker(leaf).node_names] for name in plan.top}
        super().__init__(members, now=now, token=token, keep_digests=keep_digests,
                         versions=versions, tick_timeout=topology.tick_timeout,
                         start_timeout=start_timeout, stop_timeout=stop_timeout,
                         external=external)
        self.topology, self.plan, self.keys, self.wall = topology, plan, keys, wall
        self.chain.every, self.chain.ticks = topology.digest_every, topology.ticks
        self.trace = trace
        self.sizer = WindowSizer(window, max(self.chain.sizes.values()), topology.tock,
                                 topology.real)
        self.grouped = set(plan.groups) & set(plan.top)
        self.groups = set(plan.groups)
        for name in plan.top:
            self.leaves_of[name] = plan.leaves(name)
            for member in plan.below(name) if name in plan.groups else ():
                self.owner[member] = name
                self.nodes_of[member] = tuple(node for leaf in plan.leaves(member)
                                              for node in plan.worker(leaf).node_names)
        self.result: RunResult | None = None
        #: where the nodes' observations go, window by window
        self.observations = observations if observations is not None else Observations()
        #: windows whose observations are all in, not yet read (their first and
        #: last tick, each child's bins, each child's cut)
        self.observed: list[tuple[int, int, list[tuple[WorkerBook, list[bytes]]],
                                  list[int]]] = []
        self.observed_bytes = 0  # their DONEs' sizes, about
        #: a checkpoint after every tick T with (T+1) mod checkpoint_every = 0 (0: none),
        #: into checkpoint_path(T)
        self.checkpoint_every, self.checkpoint_path = checkpoint_every, checkpoint_path
        self.checkpointing = -1                        # the window in flight ends in one
        self.checkpoints: list[Checkpointed] = []      # for the shell: manifests to write
        self.resume = resume
        self.record = record  # every worker records into this directory (--record)
        self.cut: Interrupted | None = None   # a signal came: stop once the window ends
        self.cut_by = 0.0                     # ... if it ends by then
        self.cut_made = False                 # it did: a drained STOP went out

    def interrupt(self, signum: int, now: float) -> None:
        """A signal asked the run to stop: everyone stops cleanly, nobody is blamed.

        While ticks run, the window in flight ends first (at most CUT_GRACE_S), so
        that every worker stops after the same tick and the results so far are one
        consistent cut (``Interrupted.partial``); a second signal stops at once."""
        if _terminated(self.failure):
            self.failure = None  # the same signal reached a worker first: not its fault
        if self.failure is not None:
            return
        if self.phase is Phase.RUNNING and self.cut is None:
            self.cut, self.cut_by = Interrupted(signum), now + CUT_GRACE_S
            return  # a window is always in flight: its end makes the cut
        self.fail(self.cut or Interrupted(signum), now)

    def fail(self, error: ClusterError, now: float) -> None:
        if self.cut is not None and self.failure is None and _terminated(error):
            error = self.cut  # the signal reached the worker too: not its fault
        super().fail(error, now)

    def _last_checkpoint(self, now: float) -> bool:
        """An interrupted run that writes checkpoints ends with one: a last window up
        to the next digested tick, which writes it (True); False if there is none
        to write (it just did, or no digested tick is left before the last)."""
        if not self.checkpoint_every or self.checkpoint_path is None \
                or self.checkpointing == self.granted:
            return False
        every = self.topology.digest_every
        due = (self.granted + 1) // every * every + every - 1
        if due >= self.topology.ticks - 1:
            return False
        self.checkpointing = due
        self.window_first, self.window_start = self.granted + 1, now
        self.granted = due
        self._grant_all(proto.Grant(until=due, checkpoint=self.checkpoint_path(due)))
        return True

    def _stop_cut(self, now: float) -> None:
        """Every worker has finished the window: stop there, drained, with results."""
        assert self.cut is not None
        self.failure, self.cut_made = self.cut, True
        self._stop(now, drain=True)

    def poll(self, now: float) -> None:
        super().poll(now)
        if self.cut is not None and self.phase is Phase.RUNNING and now > self.cut_by:
            self.fail(self.cut, now)  # the window did not end in time: no cut

    def _all_hello(self, now: float) -> None:
        """Every child said HELLO: every worker's data address is known, SETUP all."""
        addresses = self._addresses(now)
        if addresses is None:
            return
        made = setups(self.topology, self.plan, addresses, self.keys, self.trace,
                      resume=self.resume.path if self.resume else "", record=self.record)
        near = neighbours(self.topology, self.plan)
        for name, book in self.books.items():
            leaves = self.plan.leaves(name)
            book.neighbours = frozenset(peer for leaf in leaves for peer in near[leaf]
                                        if peer not in leaves)
            if name not in self.grouped:
                self._send(book, made[name])
                continue
            self._send(book, made[leaves[0]].for_group(
                {leaf: made[leaf].to_body() for leaf in leaves}))

    def _all_ready(self, now: float) -> None:
        ready = {name: b.ready for name, b in self.books.items()}
        resume = self.resume
        if resume is None:
            self.chain.fold(ready, 1)  # type: ignore[arg-type]
        else:  # the workers took back the state after resume.tick: is it that state?
            held = self.chain.splice(ready, 1)  # type: ignore[arg-type]
            if held != resume.records:
                self.fail(CheckpointError(
                    f"the state taken back from {resume.path} is not the one it holds "
                    f"after tick {resume.tick} (nodes "
                    f"{', '.join(_differ(held, resume.records, self.topology)[:8])})"),
                    now)
                return
            self.chain.digest, self.chain.folded = bytes.fromhex(resume.digest), resume.folded
            self.granted = self.completed = resume.tick
            for book in self.books.values():
                book.resumed(resume.tick)
        self.phase = Phase.RUNNING
        self.ticking = now
        self._grant(now)

    def _grant(self, now: float) -> None:
        last = self.topology.ticks - 1
        until = min(last, self.granted + self.sizer.size)
        start = None
        if self.topology.real and self.granted < 0 and self.wall is not None:
            start = self.wall() + REAL_START_LEAD_S
        checkpoint = ""
        every = self.checkpoint_every
        if every and self.checkpoint_path is not None:
            due = (self.granted + 1) // every * every + every - 1  # the next cut's tick
            if due < last and until >= due:
                until, checkpoint = due, self.checkpoint_path(due)
                self.checkpointing = due
        self.window_first = self.granted + 1
        self.granted, self.window_start = until, now
        self._grant_all(proto.Grant(until=until, start=start, checkpoint=checkpoint))

    def _all_done(self, now: float) -> None:
        states = self.chain.states(self.window_first, self.granted)
        self.completed = self.granted
        self.chain.fold({name: b.pending for name, b in self.books.items()}, states)
        self.ticked = now
        done_bytes = 0
        if self.observed_window:  # read once the next window is granted: flush_observed
            self.observed_window = False
            books = self.books.values()
            self.observed.append((self.window_first, self.granted,
                                  [(book, book.observed) for book in books if book.observed],
                                  [book.observed_cut for book in books]))
            self.observed_bytes += sum(book.done_bytes for book in books if book.observed)
            done_bytes = max(book.done_bytes for book in books)
        self.sizer.observe(self.granted + 1 - self.window_first, now - self.window_start,
                           done_bytes)
        if self.checkpointing == self.granted:
            self.checkpoints.append(Checkpointed(self.granted, self.chain.digest.hex(),
                                                 self.chain.last_records,
                                                 self.chain.folded))
        if self.cut is not None:
            if not self._last_checkpoint(now):
                self._stop_cut(now)
        elif self.granted >= self.topology.ticks - 1:
            self._stop(now, drain=True)
        else:
            self._grant(now)

    def flush_observed(self, now: float, *, hold: bool = False) -> None:
        """Read the observations of the windows done into ``observations``: the
        shell calls it once the next GRANT went out (reading, sorting and writing
        them is off the run's critical path) with ``hold`` (kept in memory: they
        wait, packed, until OBSERVED_HOLD_BYTES of them, so that reading them
        takes no CPU from the workers meanwhile), and :meth:`_finished` and the
        shell after the run without. A child's bin that is not one fails the run,
        blaming the child."""
        if hold and self.observations.path is None and \
                self.observed_bytes < OBSERVED_HOLD_BYTES:
            return
        windows, self.observed, self.observed_bytes = self.observed, [], 0
        for first, last, parts, cuts in windows:
            read = []
            for book, blobs in parts:
                try:
                    read += book.observations(blobs, first, last)
                except (FrameError, ProtocolError) as exc:
                    self._refuse(book, exc, now)
                    return
            self.observations.window(last, read, cuts)

    def _finished(self, now: float) -> None:
        self.flush_observed(now)
        cut = self.cut_made and self.failure is self.cut and \
            all(book.bye is not None for book in self.books.values())
        if self.failure is None or cut:
            result = result_of(self.topology, self.books.values(), self.chain,
                               self.sizer, self.rejected,
                               (self.started, self.ticking, self.ticked),
                               len(self.plan.workers), self.observations,
                               len(self.plan.groups), reached=self.granted + 1)
            if self.resume is not None:
                result.resumed_from = self.resume.tick
            if self.failure is None:
                self.result = result
            else:
                result.status = "interrupted"
                self.cut.partial = result  # type: ignore[union-attr]


def _terminated(error: ClusterError | None) -> bool:
    """Whether ``error`` is a worker ended by a signal (SIGTERM/SIGINT): the same
    signal that interrupts the run, when it was sent to every process."""
    return isinstance(error, RunFailed) and error.cause.startswith("terminated")


def _differ(held: bytes, expected: bytes, topology: Topology) -> list[str]:
    """The nodes whose digest records differ between two spliced states."""
    return differing_nodes(held, expected, [node.name for node in topology.nodes])
