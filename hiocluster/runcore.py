"""The supervisor's run, sans-IO: start-up, windows, the digest chain, verdicts.

:class:`RunCore` takes what arrives (frames from workers, process exits,
signals, the clock) and answers with what to do (frames to send, processes to
signal) and, in the end, a :class:`RunResult` or a failure. It owns no socket
and no process; the supervisor's doers move bytes and watch processes
(docs/design.md, "Core and shell").

A run goes STARTING (HELLO → SETUP → READY from every worker) → RUNNING
(windows: GRANT to all, DONE from all, fold the digests, grant the next) →
STOPPING (STOP to all, BYE from all) → FINISHED.

Imports: topology, chain, protocol, errors. Never zmq, hio or os.
"""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass, field
from typing import Any, Callable

from . import protocol as proto
from .chain import DigestChain
from .errors import (ClusterError, FrameError, Interrupted, NodeError, ProcessExited,
                     ProtocolError, RunFailed, TickTimeout, describe_exitcode)
from .runbooks import WorkerBook, setups
from .topology import Plan, Topology

__all__ = ["RunCore", "RunResult", "Phase", "WindowSizer", "START_TIMEOUT", "STOP_TIMEOUT",
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


@dataclass
class RunResult:
    """What a finished run reports (the CLI's --json prints :meth:`to_json`)."""

    topology: str
    ticks: int
    digest: str
    processes: int
    nodes: int
    seconds: float
    startup_seconds: float
    messages: int
    undelivered: int
    unread: int
    rejected_frames: int
    window: str = "auto"
    real: bool = False
    late_ticks: int = 0
    metrics: dict[str, int] = field(default_factory=dict)
    tick_digests: list[str] = field(default_factory=list)

    @property
    def ticks_per_second(self) -> float:
        return self.ticks / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = {key: value for key, value in self.__dict__.items() if key != "tick_digests"}
        data["ticks_per_second"] = round(self.ticks_per_second, 1)
        data["seconds"] = round(self.seconds, 6)
        data["startup_seconds"] = round(self.startup_seconds, 6)
        data["metrics_per_second"] = {name: round(value / self.seconds, 1) if self.seconds
                                      else 0.0 for name, value in self.metrics.items()}
        if self.tick_digests:
            data["tick_digests"] = self.tick_digests
        return data


class WindowSizer:
    """How many ticks the next GRANT covers.

    Fixed with ``window``; else it starts small and grows while windows run
    quicker than TARGET_S, shrinking when one runs slower, so a window stays
    around TARGET_S of wall time. In real time it is TARGET_S of ticks. Always
    bounded so one DONE stays under MAX_DONE_BYTES.
    """

    TARGET_S = 0.05
    FIRST = 4
    MAX = 100_000
    MAX_DONE_BYTES = 4 * 1024 * 1024

    def __init__(self, window: int | None, record_bytes: int, tock: float, real: bool) -> None:
        self.fixed = window is not None
        limit = max(1, self.MAX_DONE_BYTES // max(1, record_bytes))
        self.limit = window if window is not None else min(self.MAX, limit)
        if window is not None:
            self.size = window
        elif real:
            self.fixed = True
            self.size = min(self.limit, max(1, int(self.TARGET_S / tock)))
        else:
            self.size = min(self.limit, self.FIRST)

    def observe(self, ticks: int, seconds: float) -> None:
        """A window of ``ticks`` took ``seconds``: size the next one."""
        if self.fixed or ticks < self.size:
            return
        per_tick = seconds / ticks if ticks else 0.0
        wanted = self.TARGET_S / per_tick if per_tick > 0 else self.size * 4
        self.size = max(1, min(self.limit, self.size * 4, int(wanted)))


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
    """

    def __init__(self, topology: Topology, plan: Plan, *, now: float, token: bytes,
                 window: int | None = None, keep_digests: bool = False,
                 wall: Callable[[], float] | None = None,
                 versions: dict[str, str] | None = None,
                 start_timeout: float = START_TIMEOUT,
                 stop_timeout: float = STOP_TIMEOUT) -> None:
        self.topology, self.plan = topology, plan
        self.books = {spec.name: WorkerBook(spec) for spec in plan.workers}
        self.chain = DigestChain({name: book.node_names for name, book in self.books.items()},
                                 keep=keep_digests)
        self.sizer = WindowSizer(window, max(self.chain.sizes.values()), topology.tock,
                                 topology.real)
        self.token = token
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

    def exited(self, worker: str, exitcode: int, now: float) -> None:
        """Worker ``worker``'s process ended with ``exitcode`` (negative: a signal)."""
        book = self.books[worker]
        book.exitcode = exitcode
        if book.bye is None and not book.failed and self.phase is not Phase.FINISHED:
            book.failed = True
            self.fail(ProcessExited(worker=worker, nodes=book.node_names,
                                    tick=self._tick_of(book), exitcode=exitcode,
                                    cause=describe_exitcode(exitcode)), now)
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
            late = [book for book in self.books.values() if not book.ready_or_failed]
            silent = [book for book in late if book.hello is None]
            stuck, what = (silent, "HELLO") if silent else (late, "READY")
            blamed = stuck[0]
            for book in stuck:  # the others wait for them: they get STOP
                self._kill(book)
            self.fail(TickTimeout(worker=blamed.name, nodes=blamed.node_names, tick=None,
                                  cause=f"no {what} within {self.deadline - self.started:g} s "
                                        "of start (killed)"), now)
        elif self.phase is Phase.RUNNING:
            self._check_silence(now)
        elif self.phase is Phase.STOPPING and now > self.deadline:
            for book in self.books.values():
                if not book.settled:
                    self.signals.append((book.name, "terminate"))
            self._finish(now)

    def admit(self, parts: list[bytes]) -> tuple[str | None, bytes | None]:
        """A message on a control connection no worker has claimed yet.

        Returns ``(worker, None)`` when it is that worker's HELLO, with the run's
        token, and the worker has not joined: every later frame on the
        connection is that worker's. Anything else is a stranger's: counted, and
        ``(None, ERROR frame)`` to answer (no frame once STRANGER_LIMIT were).
        """
        error: ClusterError
        if len(parts) != 2:
            error = FrameError(f"expected one frame, got {len(parts) - 1}", field="frame",
                               code="multipart")
        else:
            try:
                hello = proto.decode(parts[1], allowed=(proto.Hello,))
            except FrameError as exc:
                error = exc
            else:
                book = self.books.get(hello.worker)  # type: ignore[attr-defined]
                if book is None:
                    why = f"{hello.worker!r} is not a worker of this run"  # type: ignore
                elif not hmac.compare_digest(hello.token, self.token):  # type: ignore
                    why = "wrong token"
                elif book.joined or book.failed:
                    why = f"{book.name!r} has already joined"
                else:
                    book.joined = True
                    return book.name, None
                error = ProtocolError(why, field="HELLO.worker", code="unknown-peer")
        self.rejected += 1
        return None, self._error_frame(error, None) if self.rejected <= STRANGER_LIMIT else None

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
            for name, setup in setups(self.topology, self.plan, self.books):
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
        tick = message.tick if message.tick is not None else self._tick_of(book)
        nodes = (message.node,) if message.node else book.node_names
        if message.peer is not None and message.peer in self.books:
            blamed = self.books[message.peer]
            error: RunFailed = RunFailed(
                worker=blamed.name, nodes=blamed.node_names, tick=tick,
                cause=f"sent {book.name} an invalid DATA frame: {message.field}: "
                      f"{message.detail}")
        elif message.code == "node-error":
            cause = message.detail.strip().splitlines()[-1] if message.detail else "error"
            error = NodeError(worker=book.name, nodes=nodes, tick=tick, cause=cause,
                              detail=message.detail)
        elif message.code == "tick-timeout":
            error = TickTimeout(worker=book.name, nodes=nodes, tick=tick,
                                cause=f"ran past the {self.topology.tick_timeout:g} s tick "
                                      "deadline (interrupted)", detail=message.detail)
        else:
            error = RunFailed(worker=book.name, nodes=nodes, tick=tick,
                              cause=f"{message.code}: {message.detail}")
        self.fail(error, now)

    def _check_silence(self, now: float) -> None:
        limit = self.topology.tick_timeout + SILENCE_GRACE_S
        for book in self.books.values():
            if book.owes_done and now - book.heard > limit:
                self._kill(book)
                self.fail(TickTimeout(
                    worker=book.name, nodes=book.node_names, tick=book.progress + 1,
                    cause=f"silent for {now - book.heard:.1f} s on one tick, past the "
                          f"{self.topology.tick_timeout:g} s tick deadline (killed)"), now)
                return
            lost = book.lost_frame(now, self.topology.tick_timeout, self.books)
            if lost is not None:
                peer = self.books[lost]
                self.fail(RunFailed(worker=lost, nodes=peer.node_names, tick=book.progress,
                                    cause=f"its DATA frame of tick {book.progress} never "
                                          f"reached {book.name}"), now)
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
                self.result = self._result()
        elif isinstance(self.failure, ProcessExited):
            self.failure = self._refined(self.failure)

    def _refined(self, failure: ProcessExited) -> ProcessExited:
        """A process died without a word: its neighbours' BYEs tell how many of its
        DATA frames arrived, so the tick it died in, exactly."""
        heard = [b.bye.received.get(failure.worker, 0) for b in self.books.values()
                 if b.bye is not None]
        tick = max([failure.tick or 0, *heard]) if failure.tick is not None else None
        if tick == failure.tick:
            return failure
        return ProcessExited(worker=failure.worker, nodes=failure.nodes, tick=tick,
                             exitcode=failure.exitcode, cause=failure.cause)

    def _result(self) -> RunResult:
        stats: dict[str, int] = {}
        metrics: dict[str, int] = {}
        late = 0
        for book in self.books.values():
            assert book.bye is not None
            for name, value in book.bye.stats.items():
                stats[name] = stats.get(name, 0) + value
            for name, value in book.bye.metrics.items():
                metrics[name] = metrics.get(name, 0) + value
            late = max(late, book.bye.stats.get("late", 0))
        topology = self.topology
        return RunResult(
            topology=topology.name, ticks=topology.ticks, digest=self.chain.digest.hex(),
            processes=len(self.books), nodes=len(topology.nodes),
            seconds=self.ticked - self.ticking, startup_seconds=self.ticking - self.started,
            messages=stats.get("messages", 0), undelivered=stats.get("undelivered", 0),
            unread=stats.get("unread", 0), rejected_frames=self.rejected + stats.get(
                "rejected", 0), window=str(self.sizer.size) if self.sizer.fixed else "auto",
            real=topology.real, late_ticks=late, metrics=dict(sorted(metrics.items())),
            tick_digests=self.chain.tick_digests)

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
        self.outbox.append((book.name, self._error_frame(exc, tick)))
        if exc.code == "version-mismatch":
            cause = str(exc)
        elif isinstance(exc, FrameError):
            cause = f"sent an invalid frame: {exc}"
        else:
            cause = f"sent an invalid frame: {exc.field}: {exc}"
        self.fail(RunFailed(worker=book.name, nodes=book.node_names, tick=tick, cause=cause),
                  now)

    @staticmethod
    def _error_frame(exc: ClusterError, tick: int | None) -> bytes:
        return proto.encode(proto.Error(code=getattr(exc, "code", "error"), detail=str(exc),
                                        field=getattr(exc, "field", ""), tick=tick))
