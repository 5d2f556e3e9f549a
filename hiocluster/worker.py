"""A worker process: one local hio Doist hosting some nodes, speaking the protocol.

The shell around three socket-free parts: the protocol's ChildMachine (control),
:class:`~hiocluster.exchange.Exchange` (DATA frames, delivery, credit) and
:class:`~hiocluster.host.NodeHost` (nodes, Doist, digests). It waits in one
place — a poll over its sockets bounded by its next timer — and never blocks
anywhere else.

Life of a worker (docs/protocol.md §6): HELLO; SETUP (build nodes, dial every
neighbour, READY); then per GRANT, for every tick n up to ``until``: wait for
each neighbour's DATA frame of tick n-1, deliver, pace to the wall clock in
real-time runs, ``Doist.recur()``, send one DATA frame to each neighbour, hash;
DONE. PROGRESS every PROGRESS_S while a window runs. STOP: drain, exit
contexts, BYE.

Started by the supervisor, or by hand: ``hiocluster worker --connect ADDRESS
--name NAME`` (see :func:`main`).

Imports: host, exchange, watchdog, transport, protocol, errors. Never topology
or supervisor.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, NoReturn

from . import protocol as proto
from .errors import FrameError, ProtocolError, RemoteProtocolError
from .exchange import Exchange, Unsendable
from .host import NodeFailed, NodeHost, Terminated, TickOverrun, tail
from .transport import NOBLOCK, Again, Context, Poller, bound_address, ipc_path
from .watchdog import Watchdog

__all__ = ["WorkerOptions", "Worker", "run_worker", "PROGRESS_S", "START_TIMEOUT"]

#: How often a worker running a window tells its supervisor how far it got.
PROGRESS_S = 0.1
#: How long a worker waits for its supervisor to answer HELLO.
START_TIMEOUT = 60.0
#: Linger of a failing worker's sockets: time for its ERROR to leave, not more.
FAIL_LINGER_MS = 500
#: Longest ERROR detail sent up (well inside the protocol's string limit).
MAX_DETAIL = 8000
#: Rejected data frames from strangers that are logged one by one; then only counted.
LOG_REJECTED = 10


@dataclass(frozen=True)
class WorkerOptions:
    """How to join a run (the ``hiocluster worker`` command line)."""

    connect: str                      # the supervisor's control address
    name: str                         # the worker's name in the plan
    token: bytes                      # the run's secret (proves we belong to it)
    bind: str | None = None           # our data address; default: beside the control one
    app_dir: str | None = None        # where node classes are imported from
    run_dir: str | None = None        # the supervisor's; the last orphan out removes it


def default_bind(connect: str, name: str) -> str:
    """Where a worker's data socket binds by default: beside the control socket."""
    path = ipc_path(connect)
    if path is not None:
        return f"ipc://{os.path.join(os.path.dirname(path), 'd-' + name)}"
    host = connect[len("tcp://"):].rsplit(":", 1)[0]
    return f"tcp://{host}:*"


class _Stopped(Exception):
    """A STOP arrived while a window ran."""

    def __init__(self, stop: proto.Stop) -> None:
        self.stop = stop


class _DataFault(Exception):
    """A neighbour sent an invalid DATA frame (it, not we, is to blame)."""

    def __init__(self, peer: str, error: FrameError | ProtocolError) -> None:
        self.peer, self.error = peer, error


class Worker:
    """One worker's lifetime (see the module docstring)."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.name = options.name
        self.machine = proto.ChildMachine(options.name)
        self.host: NodeHost | None = None
        self.exchange: Exchange | None = None
        self.tick = -1                    # the last tick run
        self.report_at = 0.0              # when the next PROGRESS is due
        self.start_wall: float | None = None
        self.tock = 1.0
        self.late = 0
        self.rejected = 0
        self.peer_of: dict[bytes, str] = {}      # data connection -> neighbour
        self.outs: dict[str, Any] = {}            # neighbour -> DEALER
        self.bound = ""                           # our data address, once bound

    # -- lifetime -------------------------------------------------------------
    def run(self) -> int:
        """Join the run and take part until STOP; return the process exit code."""
        self.context = Context()
        self.watchdog: Watchdog | None = None
        try:
            self.control = self.context.control_dealer(self.options.connect)
            self.data = self.context.data_router(self.options.bind or default_bind(
                self.options.connect, self.name))
            self.bound = bound_address(self.data)
            self.poller = Poller([self.control, self.data])
            self.watchdog = Watchdog(self.context.monitor(self.control), START_TIMEOUT,
                                     lambda: self.host.busy_since if self.host else 0.0)
            self.watchdog.start()
            return self._run()
        except Terminated as exc:
            if self.watchdog is not None and self.watchdog.orphaned:
                return self._fail("orphaned", "the supervisor vanished", code_out=3,
                                  tell=False)
            signum = exc.args[0] if exc.args else signal.SIGTERM
            return self._fail("terminated", f"by {signal.Signals(signum).name}",
                              code_out=128 + signum)
        except NodeFailed as exc:
            return self._fail(exc.code, exc.detail, node=exc.node)
        except Unsendable as exc:
            return self._fail("node-error", exc.detail, node=exc.node)
        except _DataFault as exc:
            return self._fail(exc.error.code, str(exc.error), field=exc.error.field,
                              peer=exc.peer)
        except (FrameError, ProtocolError) as exc:
            return self._fail(exc.code, str(exc), field=exc.field)
        except Exception:
            return self._fail("worker-error", tail(traceback.format_exc()))

    def _run(self) -> int:
        self._send(proto.Hello(worker=self.name, token=self.options.token, pid=os.getpid(),
                               versions=proto.local_versions(), data_address=self.bound))
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
        if message.drain and self.exchange is not None:
            self._gather(self.tick)
            self.exchange.drain(self.tick)
        elif self.exchange is not None:
            self._take_arrived()
        failures = self.host.exit() if self.host is not None else []
        if failures:
            raise NodeFailed(failures[0][0], self.tick, failures[0][1])
        metrics = self.host.metrics() if self.host is not None else {}
        self._stop_watching()
        self._send(proto.Bye(stats=self._stats(), metrics=metrics,
                             received=self.exchange.received if self.exchange else {}))
        self._close(clean=True)
        return 0

    def _fail(self, code: str, detail: str, *, node: str | None = None, field: str = "",
              peer: str | None = None, code_out: int = 1, tell: bool = True) -> int:
        """Run exit contexts, tell the supervisor what happened, close, return the exit code."""
        self._stop_watching()
        try:
            failures = self.host.exit() if self.host is not None else []
        except Terminated:
            failures = []
        for name, text in failures:
            detail += f"\nwhile exiting node {name}:\n{text}"
        if tell and getattr(self, "control", None) is not None:
            if len(detail) > MAX_DETAIL:  # keep the end: the exception itself
                detail = "..." + detail[-MAX_DETAIL:]
            error = proto.Error(code=code, detail=detail, field=field, node=node, peer=peer,
                                tick=self.host.tick if self.host and self.host.tick >= 0
                                else None)
            with contextlib.suppress(Exception):  # it also sees our exit code
                self.control.send(proto.encode(error))
        self._close(clean=False, orphaned=not tell)
        return code_out

    def _stop_watching(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()

    def _close(self, *, clean: bool, orphaned: bool = False) -> None:
        """Close every socket; an orphan also removes the files its supervisor cannot."""
        self.context.close(linger=0 if orphaned else None if clean else FAIL_LINGER_MS)
        if not orphaned:
            return
        run_dir = self.options.run_dir
        paths = [ipc_path(self.bound)]
        if run_dir:  # the supervisor's files: whoever comes last removes the directory
            paths += [ipc_path(self.options.connect), os.path.join(run_dir, "token")]
        for path in paths:
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        if run_dir:
            with contextlib.suppress(OSError):
                os.rmdir(run_dir)

    # -- start-up ---------------------------------------------------------------
    def _setup(self, setup: proto.Setup) -> None:
        self.tock = setup.tock
        self.host = host = NodeHost(setup, self.options.app_dir)
        self.exchange = Exchange(self.name, host.by_name, setup.links)
        assert self.watchdog is not None
        self.watchdog.tick_timeout = setup.tick_timeout
        for peer in self.exchange.neighbours:
            out = self.outs[peer] = self.context.data_dealer(setup.peers[peer])
            out.send(proto.encode(proto.Peer(worker=self.name, token=self.options.token)))
        host.enter()
        self._send(proto.Ready(digests=host.records()))

    # -- ticking ------------------------------------------------------------------
    def _window(self, grant: proto.Grant) -> None:
        """Run every tick up to ``grant.until``, then answer DONE."""
        host, exchange = self.host, self.exchange
        assert host is not None and exchange is not None
        if grant.start is not None:
            self.start_wall = grant.start
        outs, records = self.outs, []
        self.report_at = time.monotonic() + PROGRESS_S
        for tick in range(self.tick + 1, grant.until + 1):
            if tick:
                self._gather(tick - 1)
                exchange.deliver(tick - 1)
            if self.start_wall is not None:
                self._pace(tick)
            host.run_tick(tick)
            for peer, frame in exchange.outgoing(tick):
                outs[peer].send(frame)
            records.append(host.records())
            self.tick = tick
            if time.monotonic() >= self.report_at:
                self._report()
        self._send(proto.Done(until=grant.until, digests=b"".join(records)), checked=False)

    def _gather(self, tick: int) -> None:
        """Wait until every neighbour's DATA frame of ``tick`` is in."""
        exchange = self.exchange
        assert exchange is not None
        missing = exchange.missing(tick)
        while missing:
            if time.monotonic() >= self.report_at:
                self._report(missing)
            self._wait(self.report_at)
            missing = exchange.missing(tick)

    def _pace(self, tick: int) -> None:
        """Real time: start tick ``tick`` at start + tick x tock on the wall clock."""
        assert self.start_wall is not None
        due = self.start_wall + tick * self.tock
        while True:
            behind = time.time() - due
            if behind >= 0:
                if behind > self.tock:  # it missed its slot entirely
                    self.late += 1
                return
            if time.monotonic() >= self.report_at:
                self._report()
            self._wait(min(self.report_at, time.monotonic() - behind))

    def _report(self, waiting: list[str] | None = None) -> None:
        """PROGRESS to the supervisor, and a look at the control socket for STOP."""
        self.report_at = time.monotonic() + PROGRESS_S
        self._take_control()
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
        if self.control in ready:
            self._take_control()
        if self.data in ready:
            self._take_data()

    def _await_control(self) -> proto.Message:
        """The next control frame, serving the data socket meanwhile (once SETUP
        said who the neighbours are)."""
        control = self.control
        while True:
            if self.exchange is None:
                ready = [control] if control.poll(PROGRESS_S * 1000) else []
            else:
                ready = self.poller.poll(PROGRESS_S * 1000)
            if control in ready:
                return self.machine.receive(control.recv(NOBLOCK))
            if ready:
                self._take_data()

    def _take_control(self) -> None:
        """A control frame mid-window can only be STOP or ERROR (the machine says so)."""
        try:
            message = self.machine.receive(self.control.recv(NOBLOCK))
        except Again:
            return
        if isinstance(message, proto.Stop):
            raise _Stopped(message)
        self._remote_error(message)

    def _remote_error(self, message: proto.Message) -> NoReturn:
        assert isinstance(message, proto.Error)
        raise RemoteProtocolError(f"supervisor sent ERROR {message.code}: {message.detail}",
                                  tick=self.machine.tick, field=message.field, code="protocol")

    def _take_data(self) -> None:
        """One message from the data socket (poll said there is one): a neighbour's
        frame goes to the exchange, anything else to :meth:`_admit`."""
        data = self.data
        try:
            identity = data.recv(NOBLOCK)
        except Again:
            return
        frame = data.recv(copy=False)
        parts = [identity, frame.bytes]
        while frame.more:
            frame = data.recv(copy=False)
            parts.append(frame.bytes)
        peer = self.peer_of.get(identity)
        if peer is not None and len(parts) == 2 and self.exchange is not None:
            try:
                self.exchange.accept(peer, parts[1])
            except (FrameError, ProtocolError) as exc:
                raise _DataFault(peer, exc) from exc
        else:
            self._admit(parts)

    def _take_arrived(self) -> None:
        """After a failed run: take in the frames that already arrived, so BYE says
        how far each neighbour got (the supervisor places a dead worker's failure
        by it). The run is over: a bad frame here is only reported."""
        while self.data.poll(0):
            try:
                self._take_data()
            except _DataFault as fault:
                print(f"hiocluster worker {self.name}: after the run failed, {fault.peer} "
                      f"sent an invalid DATA frame: {fault.error}", file=sys.stderr,
                      flush=True)

    def _admit(self, parts: list[bytes]) -> None:
        """A frame on a connection not yet known: a neighbour's PEER, or a stranger's."""
        why = "not a PEER frame"
        if len(parts) == 2 and self.exchange is not None:
            try:
                peer = proto.decode(parts[1], allowed=(proto.Peer,))
            except FrameError as exc:
                why = str(exc)
            else:
                if peer.worker not in self.exchange.neighbours:
                    why = f"{peer.worker!r} is not a neighbour"
                elif peer.token != self.options.token:
                    why = "wrong token"
                elif peer.worker in self.peer_of.values():
                    why = f"{peer.worker!r} is already connected"
                else:
                    self.peer_of[parts[0]] = peer.worker
                    return
        self.rejected += 1
        if self.rejected <= LOG_REJECTED:
            print(f"hiocluster worker {self.name}: refused a frame on the data socket: {why}"
                  + (" (further refusals are only counted)" if self.rejected == LOG_REJECTED
                     else ""), file=sys.stderr, flush=True)

    def _send(self, message: proto.Message, *, checked: bool = True) -> None:
        self.control.send(self.machine.send(message, checked=checked))

    def _stats(self) -> dict[str, int]:
        exchange, host = self.exchange, self.host
        unsent = exchange.unsent() if exchange else 0   # put in exit contexts
        return {"messages": (exchange.messages if exchange else 0) + unsent,
                "rejected": self.rejected,
                "undelivered": (exchange.undelivered if exchange else 0) + unsent,
                "unread": host.unread() if host else 0, "late": self.late}


def run_worker(options: WorkerOptions) -> int:
    """Run a worker in this process with its signal handlers; return its exit code.

    SIGTERM and SIGINT end it through its exit contexts (exit code 143 or 130);
    SIGUSR1 is its watchdog's tick deadline.
    """
    worker = Worker(options)

    def on_signal(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Terminated(signum)

    def on_overrun(signum: int, frame: Any) -> None:
        host, watchdog = worker.host, worker.watchdog
        if host is not None and watchdog is not None and host.busy_since \
                and host.busy_since == watchdog.overrun_since:
            raise TickOverrun(f"tick {host.tick} ran past the {watchdog.tick_timeout:g} s "
                              "tick deadline")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR1, on_overrun)
    try:
        return worker.run()
    except Terminated:  # a second signal while already failing: exit quietly
        return 143

