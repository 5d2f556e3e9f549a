"""The supervisor's run, sans-IO: start-up, windows, the digest chain, verdicts.

:class:`RunCore` takes what arrives (frames from workers, process exits,
signals, the clock) and answers with what to do (frames to send, processes to
signal) and, in the end, a :class:`RunResult` or a failure. It owns no socket
and no process; the supervisor's doers move bytes and watch processes
(docs/design.md, "Core and shell").

A run goes STARTING (HELLO → SETUP → READY from every worker) → RUNNING
(windows: GRANT to all, DONE from all, fold the digests, grant the next) →
STOPPING (STOP to all, BYE from all) → FINISHED.

Imports: topology, chain, windows, outcome, runbooks, protocol, errors. Never zmq,
hio or os.
"""

from __future__ import annotations

import enum
from typing import Callable

from . import protocol as proto
from .chain import DigestChain
from .errors import (ClusterError, FrameError, Interrupted, ProcessExited, ProtocolError,
                     RunFailed, describe_exitcode)
from .outcome import (RunResult, error_frame, late_start, lost_frame, placed, refusal,
                      result_of, silent, worker_failure)
from .runbooks import WorkerBook, claim, setups
from .topology import Plan, Topology
from .windows import WindowSizer

__all__ = ["RunCore", "RunResult", "Phase", "START_TIMEOUT", "STOP_TIMEOUT",
           "SILENCE_GRACE_S", "STRANGER_LIMIT"]

#: Seconds every worker gets to import, say HELLO and become READY.
START_TIMEOUT = 60.0
#: Seconds workers get to run exit contexts and say BYE before being terminated.
STOP_TIMEOUT = 10.0
#: A worker owing DONE that is silent for tick_timeout plus this is stuck in a tick
#: (its own watchdog reports a hung node at tick_timeout; this catches the rest).
SILENCE_GRACE_S = 0.3
#: Rejected frames from strangers after which they are only counted, no longer answered.
STRANGER_LIMIT = 10_000
#: Lead of GRANT.start over the wall clock in real-time runs (the grant's trip).
REAL_START_LEAD_S = 0.02


class Phase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FINISHED = "finished"


class RunCore:
    """One run's rules, fed from outside; see the module docstring.

    Args:
        topology, plan: what to run and where.
        now: the monotonic clock at start (seconds); every input carries ``now``.
        token: the run's secret; a worker proves with it that it belongs to the run.
        window: ticks per GRANT (None: automatic).
        keep_digests: keep the run digest after every tick.
        wall: the wall clock (``time.time``), read only to set GRANT.start in
            real-time runs.
        versions: what workers must match (default: this process's).
        keys: every worker's CURVE public key, for CURVE runs (tcp).
    """

    def __init__(self, topology: Topology, plan: Plan, *, now: float, token: bytes,
                 window: int | None = None, keep_digests: bool = False,
                 wall: Callable[[], float] | None = None,
                 versions: dict[str, str] | None = None,
                 keys: dict[str, str] | None = None,
                 start_timeout: float = START_TIMEOUT,
                 stop_timeout: float = STOP_TIMEOUT) -> None:
        self.topology, self.plan = topology, plan
        self.books = {spec.name: WorkerBook(spec) for spec in plan.workers}
        self.chain = DigestChain({name: book.node_names for name, book in self.books.items()},
                                 keep=keep_digests)
        self.sizer = WindowSizer(window, max(self.chain.sizes.values()), topology.tock,
                                 topology.real)
        self.token, self.keys = token, keys
        self.versions = versions or proto.local_versions()
        self.wall = wall
        self.stop_timeout = stop_timeout
        self.phase = Phase.STARTING
        self.deadline = now + start_timeout
        self.started = now
        self.ticking = self.ticked = 0.0  # first GRANT, last DONE folded
        self.window_start = now
        self.granted = -1
        self.outbox: list[tuple[str, bytes]] = []     # (worker, frame) to send
        self.signals: list[tuple[str, str]] = []      # (worker, "terminate" | "kill")
        self.failure: ClusterError | None = None
        self.rejected = 0
        self.result: RunResult | None = None

    # -- inputs -----------------------------------------------------------
    def receive(self, worker: str, data: bytes, now: float) -> None:
        """A frame from worker ``worker`` on its control connection."""
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
        handler = getattr(self, f"_on_{message.TYPE.lower()}", None)
        if handler is not None:
            handler(book, message, now)

    def exited(self, worker: str, exitcode: int | None, now: float, tick: int | None = None,
               cause: str | None = None) -> None:
        """Worker ``worker``'s process ended with ``exitcode`` (negative: a signal);
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

    def interrupt(self, signum: int, now: float) -> None:
        """A signal asked the run to stop: everyone stops cleanly, nobody is blamed."""
        if isinstance(self.failure, RunFailed) and self.failure.cause.startswith("terminated"):
            self.failure = None  # the same signal reached a worker first: not its fault
        if self.failure is None:
            self.fail(Interrupted(signum), now)

    def poll(self, now: float) -> None:
        """The clock moved: check deadlines."""
        if self.phase is Phase.STARTING and now > self.deadline:
            failure, stuck = late_start(self.books.values(), self.deadline - self.started)
            for book in stuck:  # the others wait for them: they get STOP
                self._kill(book)
            self.fail(failure, now)
        elif self.phase is Phase.RUNNING:
            self._check_silence(now)
        elif self.phase is Phase.STOPPING and now > self.deadline:
            for book in self.books.values():
                if not book.settled:
                    self.signals.append((book.name, "terminate"))
            self._finish(now)

    def admit(self, parts: list[bytes],
              sender: str | None = None) -> tuple[str | None, bytes | None]:
        """A message on a control connection no worker has claimed yet.

        Returns ``(worker, None)`` when it is that worker's HELLO, with the run's
        token, and the worker has not joined: every later frame on the
        connection is that worker's. Anything else is a stranger's: counted, and
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
        """Ticks every worker has finished."""
        return 1 + min(book.progress for book in self.books.values())

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    # -- start-up -----------------------------------------------------------
    def _on_hello(self, book: WorkerBook, message: proto.Hello, now: float) -> None:
        if self.phase is Phase.STARTING and all(b.hello for b in self.books.values()):
            for name, setup in setups(self.topology, self.plan, self.books, self.keys):
                self._send(self.books[name], setup)

    def _on_ready(self, book: WorkerBook, message: proto.Ready, now: float) -> None:
        if self.phase is Phase.STARTING and all(b.ready for b in self.books.values()):
            self.chain.fold({name: b.ready for name, b in self.books.items()}, 1)
            self.phase = Phase.RUNNING
            self.ticking = now
            self._grant(now)

    # -- windows --------------------------------------------------------------
    def _grant(self, now: float) -> None:
        until = min(self.topology.ticks - 1, self.granted + self.sizer.size)
        start = None
        if self.topology.real and self.granted < 0 and self.wall is not None:
            start = self.wall() + REAL_START_LEAD_S
        self.granted, self.window_start = until, now
        for book in self.books.values():
            self._send(book, proto.Grant(until=until, start=start))

    def _on_done(self, book: WorkerBook, message: proto.Done, now: float) -> None:
        if self.phase is not Phase.RUNNING:
            return
        books = self.books.values()
        if any(b.machine.state is not proto.ParentState.IDLE for b in books):
            return
        states = self.granted - (self.chain.folded - 2)  # folded: set-up + ticks 0..
        self.chain.fold({name: b.pending for name, b in self.books.items()}, states)
        self.ticked = now
        self.sizer.observe(states, now - self.window_start)
        if self.granted >= self.topology.ticks - 1:
            self._stop(now, drain=True)
        else:
            self._grant(now)

    def _on_bye(self, book: WorkerBook, message: proto.Bye, now: float) -> None:
        self._maybe_finish(now)

    def _on_error(self, book: WorkerBook, message: proto.Error, now: float) -> None:
        book.failed = True
        self.fail(worker_failure(book, message, self.books, self._tick_of(book),
                                 self.topology.tick_timeout), now)

    def _check_silence(self, now: float) -> None:
        deadline = self.topology.tick_timeout
        for book in self.books.values():
            if book.owes_done and now - book.heard > deadline + SILENCE_GRACE_S:
                self._kill(book)
                self.fail(silent(book, now - book.heard, deadline), now)
                return
            lost = book.lost_frame(now, deadline, self.books)
            if lost is not None:
                self.fail(lost_frame(self.books[lost], book), now)
                return

    # -- stopping -------------------------------------------------------------
    def fail(self, error: ClusterError, now: float) -> None:
        """The run cannot go on: keep the first failure, stop everyone else."""
        if self.failure is None:
            self.failure = error
        if self.phase in (Phase.STARTING, Phase.RUNNING):
            self._stop(now, drain=False)

    def _stop(self, now: float, *, drain: bool) -> None:
        self.phase = Phase.STOPPING
        self.deadline = now + self.stop_timeout
        failure = self.failure
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
                                         tick=self.topology.ticks - 1,
                                         cause="no BYE after STOP")
            else:
                self.result = result_of(self.topology, self.books.values(), self.chain,
                                        self.sizer, self.rejected,
                                        (self.started, self.ticking, self.ticked))
        elif isinstance(self.failure, ProcessExited):
            self.failure = placed(self.failure, self.books.values())

    # -- helpers ------------------------------------------------------------
    def _send(self, book: WorkerBook, message: proto.Message) -> None:
        self.outbox.append((book.name, book.machine.send(message)))

    def _kill(self, book: WorkerBook) -> None:
        book.failed = True
        self.signals.append((book.name, "kill"))

    def _tick_of(self, book: WorkerBook) -> int | None:
        """The tick ``book``'s worker is in, as far as we know (None before ticking)."""
        return book.progress + 1 if self.ticking else None

    def _refuse(self, book: WorkerBook, exc: FrameError | ProtocolError, now: float) -> None:
        """A worker of the run sent an invalid frame: ERROR to it, fail the run."""
        book.failed = True
        tick = self._tick_of(book)
        self.outbox.append((book.name, error_frame(exc, tick)))
        self.fail(refusal(book, exc, tick), now)
