"""A worker process: one local hio Doist hosting some nodes, speaking the protocol.

The shell around three socket-free parts: the protocol's ChildMachine (control),
:class:`~hiocluster.worker.exchange.Exchange` (DATA frames, delivery, credit) and
:class:`~hiocluster.worker.nodes.NodeRunner` (nodes, Doist, digests). It waits in one
place — a poll over its sockets bounded by its next timer — and never blocks
anywhere else.

Life of a worker (docs/protocol.md §6): HELLO; SETUP (build nodes, dial every
neighbour, READY); then per GRANT, for every tick n up to ``until``: wait for
the DATA frame of tick n-1 of each neighbour with links into it (and, every
credit lag, the acks of the others), deliver, pace to the wall clock in
real-time runs, ``Doist.recur()``, send the tick's DATA frames, hash;
DONE. PROGRESS every PROGRESS_S while a window runs. STOP: drain, exit
contexts, BYE.

Started by the supervisor, or by hand: ``hiocluster worker --connect ADDRESS
--name NAME`` (see :func:`run_worker`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, NoReturn

from hiocluster import protocol as proto
from hiocluster.errors import (
    CheckpointError,
    FrameError,
    ProtocolError,
    RecordError,
    RemoteProtocolError,
)
from hiocluster.protocol.observed import pack_observed
from hiocluster.runtime import checkpoints
from hiocluster.runtime.launch import TickRegister
from hiocluster.runtime.rundir import remove_orphan_files
from hiocluster.runtime.signals import STOP_SIGNALS, Signals
from hiocluster.runtime.transport import Context, Credentials, Poller, ipc_path
from hiocluster.runtime.watchdog import Watchdog, parent_gone
from hiocluster.timing import PROGRESS_S, START_TIMEOUT
from hiocluster.worker import checkpoint
from hiocluster.worker.dataplane import DataFault, DataPlane
from hiocluster.worker.exchange import Exchange, Unsendable
from hiocluster.worker.localnet import SCHEME as LOCAL_SCHEME
from hiocluster.worker.localnet import local_path, open_data_plane
from hiocluster.worker.nodes import NodeFailed, NodeRunner, Terminated, TickOverrun, explain
from hiocluster.worker.record import Recorder, RecordingExchange

__all__ = ["WorkerOptions", "Worker", "run_worker", "PROGRESS_S", "START_TIMEOUT"]

#: Linger of a failing worker's sockets: time for its ERROR to leave, not more.
FAIL_LINGER_MS = 500
#: Longest a drained worker waits for the end frames of the neighbours it feeds.
FINISH_S = 5.0
#: Longest ERROR detail sent up (well inside the protocol's string limit).
MAX_DETAIL = 8000
#: How many values a worker's trace may hold (--trace): it travels in its BYE, a
#: control frame; the ticks after that are not traced.
MAX_TRACE_VALUES = 1_000_000


@dataclass(frozen=True)
class WorkerOptions:
    """How to join a run (the ``hiocluster worker`` command line)."""

    connect: str                      # the supervisor's control address
    name: str                         # the worker's name in the plan
    credentials: Credentials          # the run's token; CURVE keys over tcp
    bind: str | None = None           # our data address; default: beside the control one
    data: str = "zmq"                 # the data plane by default: "zmq", or "local" (unix://)
    app_dir: str | None = None        # where node classes are imported from
    run_dir: str | None = None        # the supervisor's; the last orphan out removes it
    tick_file: str | None = None      # a TickRegister the supervisor reads
    parent: int | None = None         # the pid of the process that started it, if one did


def default_bind(connect: str, name: str, data: str = "zmq") -> str:
    """Where a worker's data socket binds by default: beside the control socket
    (``unix://`` for the local data plane, which needs an ipc control socket)."""
    path = ipc_path(connect)
    if path is not None:
        scheme = LOCAL_SCHEME if data == "local" else "ipc://"
        return f"{scheme}{os.path.join(os.path.dirname(path), 'd-' + name)}"
    host = connect[len("tcp://"):].rsplit(":", 1)[0]
    return f"tcp://{host}:*"


class _Stopped(Exception):
    """A STOP arrived while a window ran."""

    def __init__(self, stop: proto.Stop) -> None:
        self.stop = stop


class Worker:
    """One worker's lifetime (see the module docstring)."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.name = options.name
        self.machine = proto.ChildMachine(options.name)
        self.host: NodeRunner | None = None
        self.digest_every, self.last_tick = 1, -1  # which ticks are digested (SETUP)
        self.observe_every = 0  # ask observe() every k ticks (SETUP; 0: no node observes)
        self.exchange: Exchange | None = None
        self.recorder: Recorder | None = None  # with --record
        self.tick = -1                    # the last tick run
        self.report_at = 0.0              # when the next PROGRESS is due
        self.pacer: Pacer | None = None   # real-time runs only
        self.peers: DataPlane | None = None
        self.register: TickRegister | None = None
        self.trace: list[list[Any]] | None = None  # with --trace: a row per tick
        self.trace_room = 0
        self.parent = os.getppid()        # who started it: once gone, its files are ours
        self.signals = Signals(enabled=False)  # run_worker's, while it runs
        self.in_nodes = False             # the nodes' own code runs (start-up: build, enter)
        self.wake: int | None = None      # the signals' wakeup fd, in the poller

    # -- lifetime -------------------------------------------------------------
    def run(self) -> int:
        """Join the run and take part until STOP; return the process exit code."""
        credentials = self.options.credentials
        self.context = Context(credentials.keys, owner=f"worker {self.name}")
        self.watchdog: Watchdog | None = None
        try:
            if self.options.tick_file:
                self.register = TickRegister(self.options.tick_file)
            self.control, monitor = self.context.monitored_dealer(self.options.connect,
                                                                  credentials.server)
            self.peers = open_data_plane(self.context, self.options.bind or default_bind(
                self.options.connect, self.name, self.options.data), self.name,
                credentials.token)
            self.poller = Poller([self.control])
            self.wake = wake = self.signals.fileno()
            if wake is not None:  # a signal ends any wait at once
                self.poller.register(wake)
            self.peers.watch(self.poller)
            self.watchdog = Watchdog(monitor, START_TIMEOUT,
                                     lambda: self.host.busy_since if self.host else 0.0,
                                     parent=self.options.parent)
            self.watchdog.start()
            return self._run()
        except Terminated as exc:
            if self._orphaned():
                return self._orphan()
            signum = exc.args[0] if exc.args else signal.SIGTERM
            return self._fail("terminated", f"by {signal.Signals(signum).name}",
                              code_out=128 + signum)
        except NodeFailed as exc:
            return self._fail(exc.code, exc.detail, node=exc.node, cause=exc.cause)
        except Unsendable as exc:
            return self._fail("node-error", exc.detail, node=exc.node)
        except DataFault as exc:
            return self._fail(exc.error.code, str(exc.error), field=exc.error.field,
                              peer=exc.peer)
        except (FrameError, ProtocolError) as exc:
            return self._fail(exc.code, str(exc), field=exc.field)
        except CheckpointError as exc:
            return self._fail("checkpoint", str(exc))
        except RecordError as exc:
            return self._fail("record", str(exc))
        except Exception:
            if self._orphaned():  # e.g. its run directory went with its supervisor
                return self._orphan()
            return self._fail("worker-error", explain())

    def _orphaned(self) -> bool:
        return (self.watchdog is not None and self.watchdog.orphaned) or \
            parent_gone(self.options.parent)

    def _orphan(self) -> int:
        return self._fail("orphaned", f"no supervisor at {self.options.connect} (gone, or "
                          "never there)", code_out=3, tell=False)

    def _run(self) -> int:
        assert self.peers is not None
        self._send(proto.Hello(worker=self.name, token=self.options.credentials.token,
                               pid=os.getpid(),
                               versions=proto.local_versions(),
                               data_address=self.peers.address))
        message = self._await_control()
        if isinstance(message, proto.Setup):
            self._setup(message)
            message = self._await_control()
            while isinstance(message, proto.Grant):
                try:
                    self._window(message)
                except _Stopped as stopped:
                    message = stopped.stop
                    break
                message = self._await_control()
        if isinstance(message, proto.Error):
            self._remote_error(message)
        if not isinstance(message, proto.Stop):
            raise RemoteProtocolError(f"unexpected {message.TYPE}", code="protocol")
        if message.drain and self.exchange is not None and self.tick >= 0:
            self._gather(self.tick + 1)
            self.exchange.drain(self.tick + 1)
            self._finish()
            self.peers.take_arrived()  # strangers' frames still queued: refused, counted
        elif self.exchange is not None:
            self.peers.take_arrived()
            self.peers.close(drop=True)  # no drain: frames still queued (to a dead peer) are moot
        # a drained stop: every worker stopped after the same tick (the run's end, or
        # an interrupted run's cut), so the results are one consistent state
        cut = message.drain
        host = self.host
        results = host.results() if host is not None and cut else {}
        if host is not None:
            host.tell_outcome("finished" if message.reason == "done" else "interrupted"
                              if message.reason.startswith("Interrupted") else "failed")
        failures = host.exit() if host is not None else []
        if failures:
            raise NodeFailed(failures[0][0], self.tick, failures[0][1])
        metrics, per_node, kinds = host.metrics() if host is not None else ({}, {}, {})
        self._stop_watching()
        if self.recorder is not None:
            self.recorder.close(whole=True)
        bye = proto.Bye(stats=self._stats(), metrics=metrics,
                        received=self.exchange.received if self.exchange else {},
                        results=results, node_metrics=per_node if cut else {},
                        kinds=kinds, trace={self.name: self.trace}
                        if self.trace is not None and cut else {})
        for frame in self.machine.frames(bye):  # large results: in CHUNKs
            self.control.send(frame)
        if self.peers is not None:
            self.peers.drop_unconnected()
        self._close(clean=True, drained=message.drain)
        return 0

    def _fail(self, code: str, detail: str, *, node: str | None = None, field: str = "",
              peer: str | None = None, code_out: int = 1, tell: bool = True,
              cause: str | None = None) -> int:
        """Run exit contexts, tell the supervisor what happened, close, return the exit code."""
        self._stop_watching()
        if self.recorder is not None:
            with contextlib.suppress(RecordError):  # what it holds is kept, cut short
                self.recorder.close(whole=False)
        try:
            if self.host is not None:
                self.host.tell_outcome("interrupted" if code == "terminated" else "failed")
            failures = self.host.exit() if self.host is not None else []
        except Terminated:
            failures = []
        for name, text in failures:
            detail += f"\nwhile exiting node {name}:\n{text}"
        if not tell or self.options.run_dir is None:  # nobody else will say it
            say(f"hiocluster worker {self.name}: {code}: {detail.strip().splitlines()[-1]}")
        if tell and getattr(self, "control", None) is not None:
            if len(detail) > MAX_DETAIL:  # keep the end: the exception itself
                detail = "..." + detail[-MAX_DETAIL:]
            error = proto.Error(code=code, detail=detail, field=field, node=node, peer=peer,
                                tick=self.host.tick if self.host and self.host.tick >= 0
                                else None, cause=cause)
            with contextlib.suppress(Exception):  # it also sees our exit code
                self.control.send(proto.encode(error))
        self._close(clean=False, orphaned=not tell)
        return code_out

    def _stop_watching(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()

    def _close(self, *, clean: bool, orphaned: bool = False, drained: bool = False) -> None:
        """Close every socket; an orphan also removes the files its supervisor cannot.
        Only a drained stop waits for frames to its neighbours to leave: after any other,
        one queued for a neighbour that died must not hold up the exit."""
        if self.peers is not None:
            self.peers.close(drop=not drained)
        self.context.close(linger=0 if orphaned else None if clean else FAIL_LINGER_MS)
        if orphaned or os.getppid() != self.parent:  # or an agent killed: nobody else will
            address = self.peers.address if self.peers else self.options.bind or \
                default_bind(self.options.connect, self.name, self.options.data)
            remove_orphan_files(self.options.run_dir, self.options.connect,
                                ipc_path(address) or local_path(address), self.options.tick_file)

    # -- start-up ---------------------------------------------------------------
    def _setup(self, setup: proto.Setup) -> None:
        if setup.real:
            self.pacer = Pacer(setup.tock)
        if setup.trace:
            self.trace, self.trace_room = [], MAX_TRACE_VALUES
        self.in_nodes = True
        self.host = host = NodeRunner(setup, self.options.app_dir)
        self.in_nodes = False
        self.digest_every, self.last_tick = setup.digest_every, setup.ticks - 1
        self.observe_every = setup.observe_every if host.observing else 0
        self.exchange = (RecordingExchange if setup.record else Exchange)(
            self.name, host.by_name, setup.links, setup.credit_lag, setup.ticks)
        assert self.watchdog is not None and self.peers is not None
        self.watchdog.tick_timeout = setup.tick_timeout
        self.peers.connect(self.exchange, setup.peers, setup.keys)
        self.in_nodes = True
        host.enter()
        self.in_nodes = False
        if setup.resume:
            self._resume(setup.resume)
        ready = host.records()
        if setup.record:
            assert isinstance(self.exchange, RecordingExchange)
            self.recorder = self.exchange.recorder = Recorder(
                setup.record, self.name, setup, self.options.app_dir, ready)
        self._send(proto.Ready(digests=ready))

    # -- ticking ------------------------------------------------------------------
    def _window(self, grant: proto.Grant) -> None:
        """Run every tick up to ``grant.until``, then answer DONE."""
        host, exchange, peers = self.host, self.exchange, self.peers
        assert host is not None and exchange is not None and peers is not None
        if grant.start is not None and self.pacer is not None:
            self.pacer.start = grant.start
        records = []
        self.report_at = time.monotonic() + PROGRESS_S
        register = self.register
        trace = self.trace
        every, last = self.digest_every, self.last_tick
        observe_every = self.observe_every
        signals = self.signals
        for tick in range(self.tick + 1, grant.until + 1):
            if signals.pending:
                self._checkpoint()
            if register is not None:
                register.store(tick)
            if trace is not None:
                waited = time.time()
            if tick:
                self._gather(tick)
                try:
                    exchange.deliver(tick)
                except RemoteProtocolError as exc:  # a neighbour's over-large ack: its fault
                    raise DataFault(exc.worker or "", exc) from exc
            if self.pacer is not None:
                self._pace(tick)
            if trace is not None:
                ran = time.time()
                spans: list[list[Any]] = []
                host.clock.spans = spans
            host.run_tick(tick)
            if trace is not None:
                stepped = time.time()
            peers.send(exchange.outgoing(tick))
            if trace is not None:
                sent = time.time()
            if (tick + 1) % every == 0 or tick == last:  # fields.digested, inlined (the tick loop)
                records.append(host.records())
            if observe_every and ((tick + 1) % observe_every == 0 or tick == last):
                host.observe(tick)
            if trace is not None and self.trace_room > 0:
                # [tick, waiting from, running from, sending from, hashing from, done,
                #  [[node, from, to], ...]] (wall seconds)
                trace.append([tick, waited, ran, stepped, sent, time.time(), spans])
                self.trace_room -= 6 + 3 * len(spans)
            self.tick = tick
            if time.monotonic() >= self.report_at:
                self._report()
        if grant.checkpoint:
            self._checkpoint_to(grant.checkpoint, grant.until)
        if register is not None:
            register.store(grant.until + 1)  # its inputs are what it waits for now
        digests = b"".join(records)
        if self.recorder is not None:
            self.recorder.window(grant.until, digests)
        observed = host.take_observed() if observe_every else None
        self._send(proto.Done(until=grant.until, digests=digests,
                              observed=[pack_observed(observed)] if observed else [],
                              observed_cut=host.observed_cut), checked=False)

    def _checkpoint_to(self, directory: str, tick: int) -> None:
        """This worker's share of the checkpoint after ``tick`` (every worker ran it):
        once every frame of ``tick`` addressed here is in, into ``directory``."""
        assert self.host is not None and self.exchange is not None
        self._gather(tick + 1)
        checkpoints.write_share(directory, self.name,
                                checkpoint.cut(self.host, self.exchange, tick))

    def _resume(self, directory: str) -> None:
        """Take the state after a checkpoint's tick back (nodes built and entered)."""
        assert self.host is not None and self.exchange is not None
        self.tick = checkpoint.take_back(directory, self.host, self.exchange, self.name)

    def _gather(self, tick: int) -> None:
        """Wait until every DATA frame needed before running ``tick`` is in."""
        exchange = self.exchange
        assert exchange is not None
        missing = exchange.missing(tick)
        receive = self.peers.receive if self.peers is not None else None
        signals = self.signals
        while missing:
            if time.monotonic() >= self.report_at:
                self._report(missing)  # and a look at the control socket
            if receive is not None:
                receive()
                if signals.pending:
                    self._checkpoint()
            else:
                self._wait(self.report_at)
            missing = exchange.missing(tick)

    def _finish(self) -> None:
        """After a drained stop: tell the neighbours that feed it that it has all their
        frames (end frames), and wait until those it feeds say the same, making
        again any connection to them that dropped meanwhile: a frame lost with a
        connection that broke at the very end is sent again, not lost with this
        process. At most FINISH_S: a neighbour's own end frame can be what was lost."""
        exchange, peers = self.exchange, self.peers
        assert exchange is not None and peers is not None
        peers.send(exchange.finish())
        deadline = time.monotonic() + FINISH_S
        while exchange.unfinished() and (now := time.monotonic()) < deadline:
            ready = self.poller.poll(max(0.0, min(deadline, self.report_at) - now) * 1000)
            self._checkpoint(ready)
            if self.control in ready:  # its supervisor has more to say: no more waiting
                return
            peers.serve(ready)
            if time.monotonic() >= self.report_at:
                self.report_at = time.monotonic() + PROGRESS_S
                peers.check()

    def _pace(self, tick: int) -> None:
        """Real time: wait until tick ``tick`` is due, serving sockets meanwhile."""
        assert self.pacer is not None
        while (delay := self.pacer.delay(tick, time.time())) > 0:
            if time.monotonic() >= self.report_at:
                self._report()
            self._wait(min(self.report_at, time.monotonic() + delay))

    def _report(self, waiting: list[str] | None = None) -> None:
        """PROGRESS to the supervisor, and a look at the control socket for STOP."""
        self.report_at = time.monotonic() + PROGRESS_S
        self._take_control()
        if self.peers is not None and self.exchange is not None:
            self.peers.check()  # a data connection that dropped is made again
        if self.machine.state is proto.ChildState.RUNNING:
            self._send(proto.Progress(tick=self.tick if self.tick >= 0 else None,
                                      waiting=waiting or []), checked=False)

    # -- waiting and receiving --------------------------------------------------------
    def _wait(self, until: float) -> None:
        """The one place a worker waits: its sockets, bounded by its next timer; then
        one frame from each socket that has one (a poll is cheaper than a refused
        recv, and frames usually arrive before they are needed)."""
        timeout = max(0.0, until - time.monotonic())
        ready = self.poller.poll(timeout * 1000)
        self._checkpoint(ready)
        if self.control in ready:
            self._take_control()
        if self.peers is not None:
            self.peers.serve(ready)

    def _await_control(self) -> proto.Message:
        """The next control frame, serving the data socket meanwhile (a neighbour's
        PEER that comes before our SETUP is held until SETUP names the neighbours)."""
        control = self.control
        while True:
            ready = self.poller.poll(PROGRESS_S * 1000)
            self._checkpoint(ready)
            if control in ready and (frame := control.take()) is not None:
                return self.machine.receive(frame)
            if ready and self.peers is not None:
                self.peers.serve(ready)
            elif self.exchange is not None and self.peers is not None:
                self.peers.check()

    def _checkpoint(self, ready: list[Any] | None = None) -> None:
        """Act on the signals written down since the last checkpoint (``ready``:
        what a poll found, the wakeup fd perhaps): SIGTERM or SIGINT (the
        watchdog's SIGTERM: an orphan) end the worker through its exit contexts;
        a tick deadline's SIGUSR1 that came between ticks is moot."""
        signals = self.signals
        if not signals.pending and (not ready or self.wake not in ready):
            return
        for signum in signals.take():
            if signum in STOP_SIGNALS:
                raise Terminated(signum)

    def unprotected(self, signum: int) -> BaseException | None:
        """What a signal raises inside the nodes' own code (which has no
        checkpoints: a node may loop for ever): Terminated, or TickOverrun for the
        watchdog's SIGUSR1 in the tick it timed; None anywhere else (written down
        for the next checkpoint)."""
        host, watchdog = self.host, self.watchdog
        busy = host.busy_since if host is not None else 0.0
        if signum == signal.SIGUSR1:
            if host is not None and busy and watchdog is not None \
                    and busy == watchdog.overrun_since:
                return TickOverrun(f"tick {host.tick} ran past the "
                                   f"{watchdog.tick_timeout:g} s tick deadline")
            return None
        return Terminated(signum) if busy or self.in_nodes else None

    def _take_control(self) -> None:
        """A control frame mid-window can only be STOP or ERROR (the machine says so)."""
        frame = self.control.take()
        if frame is None:
            return
        message = self.machine.receive(frame)
        if isinstance(message, proto.Stop):
            raise _Stopped(message)
        self._remote_error(message)

    def _remote_error(self, message: proto.Message) -> NoReturn:
        assert isinstance(message, proto.Error)
        raise RemoteProtocolError(f"supervisor sent ERROR {message.code}: {message.detail}",
                                  tick=self.machine.tick, field=message.field, code="protocol")

    def _send(self, message: proto.Message, *, checked: bool = True) -> None:
        self.control.send(self.machine.send(message, checked=checked))

    def _stats(self) -> dict[str, int]:
        exchange, host = self.exchange, self.host
        unsent = exchange.unsent() if exchange else 0   # put in exit contexts
        return {"messages": (exchange.messages if exchange else 0) + unsent,
                "rejected": self.peers.refused if self.peers else 0,
                "undelivered": (exchange.undelivered if exchange else 0) + unsent,
                "unread": host.unread() if host else 0,
                "late": self.pacer.late if self.pacer else 0}


class Pacer:
    """Real-time pacing: tick n is due at ``start + n x tock`` seconds on the wall clock
    (``start`` from the first GRANT, shared by every worker of the run)."""

    def __init__(self, tock: float) -> None:
        self.tock = tock
        self.start = 0.0
        self.late = 0       # ticks that started more than one tock after they were due

    def delay(self, tick: int, now: float) -> float:
        """Seconds until ``tick`` is due; 0 once it may start (counted if late)."""
        behind = now - (self.start + tick * self.tock)
        if behind < 0:
            return -behind
        if behind > self.tock:  # it missed its slot entirely
            self.late += 1
        return 0.0


def say(line: str) -> None:
    """Write ``line`` on stderr. A stderr nobody reads any more (the pipe of an agent
    that is gone) is no reason to fail, nor to skip the clean-up after: from then on
    this process's stderr is /dev/null."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stderr.fileno())
        os.close(devnull)


def run_worker(options: WorkerOptions) -> int:
    """Run a worker in this process with its signals; return its exit code.

    SIGTERM and SIGINT end it through its exit contexts (exit code 143 or 130);
    SIGUSR1 is its watchdog's tick deadline (runtime.signals: acted on at the
    worker's checkpoints, raised only inside its nodes' code).
    """
    worker = Worker(options)
    with Signals(STOP_SIGNALS + (signal.SIGUSR1,), unprotected=worker.unprotected) as signals:
        worker.signals = signals
        try:
            return worker.run()
        except Terminated:  # a signal inside a node while already failing: exit quietly
            return 143
