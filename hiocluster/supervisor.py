"""The supervisor: a hio DoDoer that owns child processes and drives them in lockstep.

Each child process is a :class:`ChildDoer` among the supervisor's doers. One
``Supervisor.recur`` is one cluster tick: every ChildDoer sends its TICK, then
the supervisor waits (bounded by the tick deadline) for every TOCK, watching
process sentinels so a dead child is noticed at once, and chains the node
digests into the run digest. :func:`run` is the Python API behind the CLI.

Imports: hio, topology, worker, transport, protocol, errors.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NoReturn

import psutil
from hio.base.doing import DoDoer, Doer, Doist

from . import protocol as proto
from . import worker
from .errors import (ClusterError, FrameError, Interrupted, NodeError, ProcessExited,
                     ProtocolError, RemoteProtocolError, RunFailed, TickTimeout,
                     describe_exitcode)
from .topology import Plan, ProcessSpec, Topology, plan as make_plan, resolve_classes
from .transport import (NOBLOCK, SNDMORE, Again, Context, TransportError, ZMQError,
                        bound_address, local_address)

__all__ = ["Supervisor", "ChildDoer", "RunResult", "run", "START_TIMEOUT", "STOP_TIMEOUT"]

#: Seconds every child gets to import, say HELLO and become READY.
START_TIMEOUT = 60.0
#: Seconds children get to run exit contexts and say BYE before being terminated.
STOP_TIMEOUT = 10.0
#: Longest single wait, so signals and deadlines are noticed promptly.
SLICE_S = 0.1
#: Seconds between SIGTERM and SIGKILL for a child that will not go.
KILL_GRACE_S = 2.0
#: Rejected frames from strangers after which they are only counted, no longer answered.
STRANGER_LIMIT = 10_000


def _forkserver() -> Any:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["hiocluster.worker"])
    return context


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Start children without re-importing ``__main__`` in each of them.

    multiprocessing makes every forkserver child import the parent's main module
    (so pickled functions from it resolve). A worker needs only hiocluster.worker,
    already preloaded in the fork server; importing main again costs time per
    child and re-runs any unguarded script. So children see a bare ``__main__``.
    """
    saved = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = saved


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


class ChildDoer(Doer):
    """One child process, as the supervisor's Doist sees it: each recur sends a TICK."""

    def __init__(self, supervisor: Supervisor, spec: ProcessSpec, index: int,
                 **kwa: Any) -> None:
        super().__init__(**kwa)
        self.supervisor = supervisor
        self.spec = spec
        self.name = spec.name
        self.index = index
        self.identity = spec.name.encode()
        self.machine = proto.ParentMachine(spec.name)
        self.process: Any = None
        self.hello: proto.Hello | None = None
        self.last_tock: proto.Tock | None = None
        self.bye: proto.Bye | None = None
        self.failed = False
        self.node_names = spec.node_names
        self.node_set = frozenset(self.node_names)

    def recur(self, tyme: float) -> bool:
        supervisor = self.supervisor
        try:
            self.send(proto.Tick(supervisor.tick, supervisor.expect.get(self.name, 0)))
        except ZMQError as exc:  # ROUTER_MANDATORY: the child's connection is gone
            supervisor.lost(self, exc)
        return False

    def send(self, message: proto.Message) -> None:
        self.supervisor.send_to(self.identity, self.machine.send(message))

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.exitcode is None \
            and self.process.is_alive()


class Supervisor(DoDoer):
    """Drive one topology's processes in lockstep; one recur is one cluster tick.

    Args:
        topology: the validated topology (ticks, seed and tock come from it).
        plan: which nodes run in which process (see topology.plan).
        app_dir: directory put first on the children's sys.path.
        on_tick: called as ``on_tick(done_ticks, total_ticks)`` after every tick.
        on_ready: called with the supervisor once every child is READY (tests use
            it to find ``control_address`` and the children's ``hello.data_address``).
        keep_digests: keep every tick's run digest in the result.
        worker_target: the child entry point (tests substitute misbehaving ones).
        transport: "ipc" (unix sockets in the run directory) or "tcp" (loopback,
            ports picked by the system); the protocol is the same over both.

    The run directory (control and data sockets, mode 0700) is made under
    ``$HIOCLUSTER_RUN_ROOT`` if set, else the system temp directory, and removed
    at exit.
    """

    def __init__(self, topology: Topology, plan: Plan, *, app_dir: str | None = None,
                 on_tick: Callable[[int, int], None] | None = None,
                 keep_digests: bool = False,
                 worker_target: Callable[[worker.WorkerSpec], None] = worker.main,
                 on_ready: Callable[[Supervisor], None] | None = None,
                 transport: str = "ipc", **kwa: Any) -> None:
        self.topology = topology
        self.transport = transport
        self.plan = plan
        self.app_dir = os.path.abspath(app_dir or os.getcwd())
        self.on_tick = on_tick
        self.keep_digests = keep_digests
        self.worker_target = worker_target
        self.on_ready = on_ready
        self.children = [ChildDoer(self, spec, index)
                         for index, spec in enumerate(plan.processes)]
        self.by_identity = {child.identity: child for child in self.children}
        self.process_names = frozenset(child.name for child in self.children)
        super().__init__(doers=list(self.children), **kwa)
        self.ticks = topology.ticks
        self.tick = 0
        self.expect: dict[str, int] = {}
        self.digest = b"\0" * proto.DIGEST_SIZE
        self.tick_digests: list[str] = []
        self.node_order = sorted(node.name for node in topology.nodes)
        self._unaccounted: list[proto.Tock] = []
        self.chained = 0  # whole-run states folded into self.digest
        self._ticked = 0.0
        self.rejected = 0           # frames refused on the control socket
        self.interrupted: int | None = None
        self.failure: BaseException | None = None
        self.result: RunResult | None = None
        self.run_dir: str | None = None
        self.context: Context | None = None
        self.router: Any = None
        self.control_address = ""
        self._started = self._ticking = 0.0

    # -- hio contexts -------------------------------------------------------
    def enter(self, doers: Any = None) -> Any:  # type: ignore[override]
        if doers is None:
            self.start()
        return super().enter(doers)

    def recur(self, tyme: float, deeds: Any = None) -> bool:  # type: ignore[override]
        if self.tick >= self.ticks:
            return True
        if self.interrupted:
            raise Interrupted(self.interrupted)
        super().recur(tyme, deeds)  # every ChildDoer sends its TICK
        self._account()  # the previous TOCKs' books, while the children work
        self._gather_tocks()
        self.tick += 1
        if self.on_tick is not None:
            self.on_tick(self.tick, self.ticks)
        if self.tick >= self.ticks:
            self._ticked = time.perf_counter()
            self._account()
            return True
        return False

    def abort(self, ex: BaseException) -> None:
        self.failure = ex

    def close(self) -> None:  # forced exit: the Doist closed us before the last tick
        if self.failure is None and self.tick < self.ticks:
            self.failure = Interrupted(signal.SIGINT) if self.interrupted is None \
                else Interrupted(self.interrupted)

    def exit(self, deeds: Any = None) -> None:  # type: ignore[override]
        super().exit(deeds)
        if deeds is None:
            self.shutdown()

    def interrupt(self, signum: int) -> None:
        """Ask the run to stop cleanly at the next chance (from a signal handler)."""
        self.interrupted = self.interrupted or signum

    # -- start-up -----------------------------------------------------------
    def start(self) -> None:
        """Make the run directory and control socket, spawn children, handshake."""
        self._started = time.perf_counter()
        root = os.environ.get("HIOCLUSTER_RUN_ROOT") or None
        try:
            self.run_dir = tempfile.mkdtemp(prefix="hioc-", dir=root)
            os.chmod(self.run_dir, 0o700)
        except OSError as exc:
            raise TransportError(f"cannot make the run directory under "
                                 f"{root or tempfile.gettempdir()}: {exc}") from exc
        self.context = Context()
        self.router = self.context.router(
            local_address(self.transport, self.run_dir, "control"),
            timeout_ms=int(SLICE_S * 1000))
        self.control_address = bound_address(self.router)
        me = psutil.Process()
        mp = _forkserver()
        for child in self.children:
            spec = worker.WorkerSpec(
                process=child.name, control_address=self.control_address,
                data_bind=local_address(self.transport, self.run_dir, f"d{child.index}"),
                nodes=tuple((node.name, node.cls, node.params) for node in child.spec.nodes),
                app_dir=self.app_dir, run_dir=self.run_dir, parent_pid=me.pid,
                parent_started=me.create_time())
            child.process = mp.Process(target=self.worker_target, args=(spec,),
                                       name=f"hiocluster-{child.name}")
            with _main_hidden():
                child.process.start()
        deadline = time.monotonic() + START_TIMEOUT
        self._wait(lambda c: c.hello is not None, deadline, "HELLO")
        addresses = {c.name: c.hello.data_address for c in self.children}  # type: ignore
        placement = self.plan.node_to_process
        links = [[link.id, link.source, link.outbox, link.target, link.inbox, link.capacity]
                 for link in self.topology.links]
        for child in self.children:
            child.send(proto.Setup(t0=self.topology.t0, tock=self.topology.tock,
                                   seed=self.topology.seed, addresses=addresses,
                                   placement=placement, links=links))
        self._wait(lambda c: c.machine.state is proto.ParentState.IDLE, deadline, "READY")
        if self.on_ready is not None:
            self.on_ready(self)
        self._ticking = time.perf_counter()

    # -- ticking ------------------------------------------------------------
    def _gather_tocks(self) -> None:
        """Wait for every TOCK of this tick; work out what each child must expect next."""
        deadline = time.monotonic() + self.topology.tick_timeout
        self._wait(lambda c: c.machine.state is proto.ParentState.IDLE, deadline, "TOCK")
        expect: dict[str, int] = {}
        tocks = []
        for child in self.children:
            tock = child.last_tock
            assert tock is not None
            tocks.append(tock)
            for peer in tock.sent:
                expect[peer] = expect.get(peer, 0) + 1
        self.expect = expect
        self._unaccounted = tocks

    def _account(self) -> None:
        """Chain the node digests carried by the last gathered TOCKs (the state at
        the start of their tick) into the run digest."""
        tocks, self._unaccounted = self._unaccounted, []
        if tocks:
            self._chain([tock.digests for tock in tocks])

    def _chain(self, parts: list[dict[str, bytes]]) -> None:
        """Fold one whole-run state (every node's digest) into the run digest.

        digest = sha256(previous digest + for each node by name: name + digest).
        The first state folded is the one after set-up; ``tick_digests[n]`` is
        the run digest once the state after tick n is folded in.
        """
        digests: dict[str, bytes] = {}
        for part in parts:
            digests.update(part)
        chain = hashlib.sha256(self.digest)
        for name in self.node_order:
            chain.update(name.encode())
            chain.update(digests[name])
        self.digest = chain.digest()
        if self.keep_digests and self.chained:
            self.tick_digests.append(self.digest.hex())
        self.chained += 1

    def _wait(self, done: Callable[[ChildDoer], bool], deadline: float, what: str) -> None:
        """Receive until ``done`` holds for every child, or fail loudly.

        Blocks in recv (no poll per message: this is the hot path); every quiet
        SLICE_S it checks child sentinels, the deadline and signals.
        """
        recv = self.router.recv_multipart
        pending = [child for child in self.children if not done(child)]
        checked = time.monotonic()
        while pending:
            try:
                self._dispatch(recv())
            except Again:
                pass
            now = time.monotonic()
            if now - checked >= SLICE_S:  # also when a flood keeps recv busy
                checked = now
                self._check_sentinels()
                if self.interrupted:
                    raise Interrupted(self.interrupted)
            if now > deadline:
                pending = [child for child in pending if not done(child)]
                if pending:
                    self._timed_out(pending, what)
            if pending and done(pending[0]):
                pending = [child for child in pending if not done(child)]

    def _receive_all(self) -> None:
        """Handle every frame already queued, without waiting."""
        router = self.router
        while True:
            try:
                parts = router.recv_multipart(NOBLOCK)
            except Again:
                return
            self._dispatch(parts)

    def _dispatch(self, parts: list[bytes]) -> None:
        identity = parts[0]
        child = self.by_identity.get(identity)
        if child is None or child.failed or len(parts) != 2:
            self._reject_stranger(parts)
            return
        try:
            message = child.machine.receive(parts[1])
        except (FrameError, ProtocolError) as exc:
            self._refuse(child, exc)
        if isinstance(message, proto.Tock):
            self._check_digests(child, message.digests, "TOCK.digests")
            names = self.process_names
            if any(p not in names or p == child.name for p in message.sent) \
                    or len(set(message.sent)) != len(message.sent):
                self._refuse(child, self._nonsense(child, "TOCK.sent", f"{message.sent} is "
                                                   "not a list of distinct peers"))
            child.last_tock = message
        elif isinstance(message, proto.Hello):
            if tuple(message.nodes) != child.node_names:
                self._refuse(child, self._nonsense(
                    child, "HELLO.nodes",
                    f"{message.nodes} differ from the plan {list(child.node_names)}"))
            child.hello = message
        elif isinstance(message, proto.Bye):
            if message.digests or self.finished:  # empty only after a failed run
                self._check_digests(child, message.digests, "BYE.digests")
            child.bye = message
        elif isinstance(message, proto.Error):
            child.failed = True
            nodes = (message.node,) if message.node else child.node_names
            tick = message.tick if message.tick is not None else self._tick_of()
            if message.code == "node-error":
                cause = message.detail.strip().splitlines()[-1] if message.detail else "error"
                raise NodeError(process=child.name, nodes=nodes, tick=tick, cause=cause,
                                detail=message.detail)
            raise RunFailed(process=child.name, nodes=nodes, tick=tick,
                            cause=f"{message.code}: {message.detail}")

    def _check_digests(self, child: ChildDoer, digests: dict[str, bytes], field: str) -> None:
        if digests.keys() != child.node_set:
            self._refuse(child, self._nonsense(child, field, f"names {sorted(digests)}, not "
                                               f"its nodes {sorted(child.node_set)}"))

    def _nonsense(self, child: ChildDoer, field: str, text: str) -> RemoteProtocolError:
        """A well-formed frame whose ``field`` makes no sense for this run."""
        return RemoteProtocolError(text, tick=self._tick_of(), process=child.name,
                                   field=field, code="bad-field")

    def _refuse(self, child: ChildDoer, exc: FrameError | ProtocolError) -> NoReturn:
        """A child of the run sent an invalid frame: ERROR to it, fail the run."""
        child.failed = True
        self._reply_error(child.identity, exc)
        text = str(exc) if isinstance(exc, FrameError) else f"{exc.field}: {exc}"
        raise RunFailed(process=child.name, nodes=child.node_names, tick=self._tick_of(),
                        cause=f"sent an invalid frame: {text}") from exc

    def _tick_of(self) -> int | None:
        return self.tick if self._ticking else None

    def _reject_stranger(self, parts: list[bytes]) -> None:
        """A frame from no child of ours: answer ERROR, count it, carry on."""
        self.rejected += 1
        if len(parts) != 2:
            error: ClusterError = FrameError(f"expected one frame, got {len(parts) - 1}",
                                             field="frame", code="multipart")
        else:
            try:
                proto.decode(parts[1], allowed=(proto.Hello,))
                error = ProtocolError("not a process of this run", field="HELLO.process",
                                      code="unknown-peer")
            except FrameError as exc:
                error = exc
        if self.rejected <= STRANGER_LIMIT:
            self._reply_error(parts[0], error)

    def send_to(self, identity: bytes, frame: bytes, flags: int = 0) -> None:
        """Send one frame to the peer ``identity`` on the control socket."""
        self.router.send(identity, flags | SNDMORE)
        self.router.send(frame, flags)

    def lost(self, child: ChildDoer, exc: ZMQError) -> NoReturn:
        """``child`` disconnected: fail the run with what it said last (its ERROR, if
        one is queued), else with its exit status or the disconnection itself."""
        self._receive_all()  # raises NodeError/RunFailed for a queued ERROR frame
        child.failed = True
        if child.process is not None:
            child.process.join(KILL_GRACE_S)
        exitcode = child.process.exitcode if child.process is not None else None
        raise ProcessExited(process=child.name, nodes=child.node_names, tick=self._tick_of(),
                            exitcode=exitcode, cause=describe_exitcode(exitcode)
                            if exitcode is not None else f"disconnected ({exc})")

    def _reply_error(self, identity: bytes, exc: ClusterError) -> None:
        error = proto.Error(code=getattr(exc, "code", "error"), detail=str(exc),
                            field=getattr(exc, "field", ""),
                            tick=self._tick_of())
        try:
            self.send_to(identity, proto.encode(error), NOBLOCK)
        except ZMQError:
            pass  # the peer is gone already; the rejection is counted

    def _check_sentinels(self) -> None:
        for child in self.children:
            if child.process is not None and child.process.exitcode is not None \
                    and child.bye is None:
                # a last ERROR frame may be queued: read it first, it says more
                self._receive_all()
                child.failed = True
                raise ProcessExited(process=child.name, nodes=child.node_names,
                                    tick=self._tick_of(), exitcode=child.process.exitcode,
                                    cause=describe_exitcode(child.process.exitcode))

    def _timed_out(self, pending: list[ChildDoer], what: str) -> None:
        child = pending[0]
        for late in pending:
            late.failed = True
            _terminate(late.process)
        if what == "TOCK":
            raise TickTimeout(process=child.name, nodes=child.node_names, tick=self.tick,
                              cause=f"no TOCK within the {self.topology.tick_timeout:g} s "
                              "tick deadline (terminated)")
        raise TickTimeout(process=child.name, nodes=child.node_names, tick=None,
                          cause=f"no {what} within {START_TIMEOUT:g} s of start (terminated)")

    # -- shutdown -----------------------------------------------------------
    def shutdown(self) -> None:
        """STOP every child, wait for BYE, reap every process, remove the run directory."""
        try:
            if self.router is not None:
                self._stop_children()
        finally:
            for child in self.children:
                _reap(child.process)
            if self.context is not None:
                self.context.close(linger=0)
                self.context = None
            if self.run_dir is not None:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                self.run_dir = None
        if self.finished:
            self.result = self._result()

    @property
    def finished(self) -> bool:
        """Every tick ran and nothing failed: a clean stop, with a result."""
        return self.failure is None and self.tick >= self.ticks

    def _stop_children(self) -> None:
        clean = self.finished
        reason = ("done" if clean else f"{type(self.failure).__name__}: {self.failure}"
                  if self.failure is not None else "stopped before the last tick")
        stopping = []
        for child in self.children:
            if child.failed or not child.alive or child.machine.state in (
                    proto.ParentState.CLOSED, proto.ParentState.ERROR):
                continue
            expect = self.expect.get(child.name, 0) if clean else None
            try:
                child.send(proto.Stop(reason=reason[:1000], expect=expect))
                stopping.append(child)
            except (ZMQError, ProtocolError):
                child.failed = True
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            waiting = [child for child in stopping if child.bye is None]
            if not waiting:
                break
            try:
                if not any(child.alive for child in waiting):
                    self._receive_all()  # a BYE may still be queued behind a quick exit
                    break
                self._dispatch(self.router.recv_multipart())
            except Again:
                continue
            except ClusterError as exc:
                if self.failure is None:
                    self.failure = exc
                    raise

    def _result(self) -> RunResult:
        """The result of a clean run: needs every child's BYE (final digests, counters)."""
        missing = [child for child in self.children if child.bye is None]
        if missing:
            child = missing[0]
            raise RunFailed(process=child.name, nodes=child.node_names, tick=self.tick,
                            cause="no BYE after STOP: "
                            + describe_exitcode(child.process.exitcode if child.process
                                                else None))
        self._chain([child.bye.digests for child in self.children])  # type: ignore[union-attr]
        stats: Counter[str] = Counter()
        metrics: Counter[str] = Counter()
        for child in self.children:
            stats.update(child.bye.stats)  # type: ignore[union-attr]
            metrics.update(child.bye.metrics)  # type: ignore[union-attr]
        return RunResult(
            topology=self.topology.name, ticks=self.tick, digest=self.digest.hex(),
            processes=len(self.children), nodes=len(self.topology.nodes),
            seconds=self._ticked - self._ticking, startup_seconds=self._ticking - self._started,
            messages=stats["messages"], undelivered=stats["undelivered"],
            unread=stats["unread"], rejected_frames=self.rejected + stats["rejected"],
            metrics=dict(sorted(metrics.items())), tick_digests=self.tick_digests)


def _terminate(process: Any) -> None:
    if process is not None and process.exitcode is None:
        try:
            process.terminate()
        except (OSError, ValueError):
            pass


def _reap(process: Any) -> None:
    """Join ``process``; SIGTERM then SIGKILL if it will not exit."""
    if process is None or process.pid is None:
        return
    process.join(KILL_GRACE_S)
    _terminate(process)
    process.join(KILL_GRACE_S)
    if process.exitcode is None:
        process.kill()
        process.join()


def run(topology: Topology, *, processes: int | None = None, app_dir: str | None = None,
        on_tick: Callable[[int, int], None] | None = None, keep_digests: bool = False,
        handle_signals: bool = True,
        worker_target: Callable[[worker.WorkerSpec], None] = worker.main,
        on_ready: Callable[[Supervisor], None] | None = None,
        transport: str = "ipc", check_classes: bool = True) -> RunResult:
    """Run ``topology`` to completion in lockstep and return its result.

    Args:
        topology: a validated topology (see :func:`hiocluster.topology.load`).
        processes: spread nodes over this many processes (None: the file's placement).
        app_dir: directory to import node classes from (default: cwd).
        on_tick: progress callback ``(done, total)``.
        keep_digests: also return every tick's run digest.
        handle_signals: on the main thread, turn SIGINT/SIGTERM into a clean stop.
        worker_target, on_ready, transport: see :class:`Supervisor`.
        check_classes: import the node classes here first and check every link's
            boxes exist (TopologyError naming the key); tests of the workers'
            own start-up errors turn it off.

    Raises:
        TopologyError: the plan is impossible (e.g. more processes than nodes).
        RunFailed: a process failed (NodeError, TickTimeout, ProcessExited...).
        Interrupted: a signal stopped the run; every process was shut down.
    """
    plan = make_plan(topology, processes)
    if check_classes:
        resolve_classes(topology, app_dir)
    supervisor = Supervisor(topology, plan, app_dir=app_dir, on_tick=on_tick,
                            keep_digests=keep_digests, worker_target=worker_target,
                            on_ready=on_ready, transport=transport)
    doist = Doist(tock=topology.tock, real=False, doers=[supervisor])
    restore = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            restore[signum] = signal.signal(signum, lambda s, f: supervisor.interrupt(s))
    try:
        doist.enter()
        while doist.deeds:
            doist.recur()
    finally:
        doist.exit()
        for signum, handler in restore.items():
            signal.signal(signum, handler)
    if supervisor.result is None:  # pragma: no cover - failures raise above
        raise RuntimeError("run ended without a result")
    return supervisor.result
