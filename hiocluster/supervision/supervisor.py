"""The supervisor: hio doers that own a run's worker processes and drive its windows.

In one :class:`~hiocluster.runtime.loop.Loop` (a hio Doist that waits on sockets):

=================  ============================================================
``Supervisor``     a DoDoer: the run. Owns the run directory, the ZeroMQ context
                   and the :class:`~hiocluster.supervision.runcore.RunCore` that decides.
``Switchboard``    a Doer: the control socket. Reads every frame and hands it
                   to the core at once; sends what the core says.
``ChildDoer``      a Doer per worker: ``enter`` starts its process, ``look``
                   (every LOOK_S, and when its pidfd turns readable) watches
                   the process, ``exit`` makes sure it is gone.
=================  ============================================================

None of them blocks: each ``recur`` takes what is already there and returns,
so other doers (a control endpoint, service replicas, a link to a parent
supervisor) can share the Doist. (The one wait outside the Loop's own: while
only DONEs are awaited, the switchboard waits on the Loop's poller, for every
socket and fd of every doer, bounded by the Loop's next timer.) :func:`run` is
the Python API behind the CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import secrets
import shutil
import signal
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from hio.base.doing import DoDoer, Doer

from hiocluster import protocol as proto
from hiocluster.errors import (
    CheckpointError,
    ClusterError,
    Interrupted,
    ObservationsError,
    ProcessExited,
    RecordError,
    RunFailed,
    TickTimeout,
    TopologyError,
)
from hiocluster.hosts.remote import (
    agent_links,
    launch_agents,
    listen_toward,
    supervisor_keys,
)
from hiocluster.hosts.slurm import Allocation, SlurmLauncher, place, where
from hiocluster.node import cannot_checkpoint, load_class
from hiocluster.runtime import checkpoints
from hiocluster.runtime.launch import (
    LocalLauncher,
    ProcessHandle,
    end_process,
    worker_argv,
)
from hiocluster.runtime.loop import Loop, RouterDoer
from hiocluster.runtime.rundir import close_run, make_run_dir, remove_run_dir
from hiocluster.runtime.signals import run_signals
from hiocluster.runtime.transport import (
    ENDPOINT_RECORD,
    Context,
    Credentials,
    KeyPair,
    TransportError,
    local_address,
)
from hiocluster.supervision.digestfile import DigestFileError, DigestWriter
from hiocluster.supervision.digests import digested_between
from hiocluster.supervision.observations import Observations
from hiocluster.supervision.restarts import Intensity, Restart, restartable
from hiocluster.supervision.runcore import (
    Checkpointed,
    Kill,
    Phase,
    Resume,
    RunCore,
    RunResult,
    Terminate,
)
from hiocluster.timing import KILL_GRACE_S, START_TIMEOUT, STOP_TIMEOUT
from hiocluster.topology import Plan, Topology, resolve_classes, resolve_services
from hiocluster.topology import load as load_topology
from hiocluster.topology import plan as make_plan
from hiocluster.worker import record as records

__all__ = ["SupervisorShell", "Supervisor", "Switchboard", "ChildDoer", "RunResult", "run", "KILL_GRACE_S"]

#: The gate's name for the key of shells at a tcp endpoint (no worker's name).
SHELL = ".shell"
#: Seconds a worker's frames get to arrive after its process is seen to exit
#: without its BYE, before the exit counts as a failure.
EXIT_SETTLE_S = 0.25
#: Seconds between looks at a worker's process (the tock of its ChildDoer): for the
#: signal steps that are due, and for an end its sentinel cannot tell (a remote one);
#: a readable sentinel is looked at in the cycle it wakes.
LOOK_S = 0.05


class Switchboard(RouterDoer):
    """The supervisor's control socket, as a doer (see the module docstring)."""

    def __init__(self, supervisor: Supervisor, **kwa: Any) -> None:
        super().__init__(**kwa)
        self.supervisor = supervisor
        self.worker_of: dict[bytes, str] = {}     # connection -> worker
        self.identity_of: dict[str, bytes] = {}
        self.waiting: dict[str, list[bytes]] = {}  # frames for workers not joined yet

    def enter(self) -> None:
        supervisor = self.supervisor
        assert supervisor.context is not None  # made before the doers enter
        self.attach(supervisor.loop, supervisor.context.control_router(supervisor.listen))
        assert self.router is not None
        supervisor.control_address = self.router.bound_address()

    def recur(self, tyme: float) -> bool:
        """Every frame already here goes to the core at once: the last DONE of a
        window is granted on in this same cycle (the supervisor sends the outbox).
        While only DONEs are awaited (:meth:`SupervisorShell.awaiting_dones`) it waits
        for them itself, on the loop's poller, as long as nothing else wakes and no
        timer is due: a window's DONEs cost the loop one cycle, not one each."""
        supervisor = self.supervisor
        loop = supervisor.loop
        while self._take():
            if not supervisor.awaiting_dones():
                return False
            timeout = loop.timeout()
            if timeout <= 0:
                return False
            ready = loop.poller.poll(timeout * 1000)  # level-triggered: it sees all
            if len(ready) != 1 or ready[0] is not self.router:  # the outer poll saw
                loop.ready = ready  # the rest of the cycle sees what woke
                return False
        loop.asap = True
        return False

    def _take(self) -> bool:
        """Hand every frame already here to the core; False if a flood was cut short
        (a flood cannot starve the other doers)."""
        router, core, worker_of = self.router, self.supervisor.core, self.worker_of
        now = time.monotonic()
        assert router is not None
        for _ in range(10_000):
            parts = router.take_routed()
            if parts is None:
                return True
            identity = parts[0]  # a ROUTER's first part: the connection
            worker = worker_of.get(identity)
            if worker is not None and len(parts) == 2:
                core.receive(worker, parts[1], now)
                continue
            worker, reply = core.admit(parts, router.sender())
            if worker is None:
                if reply is not None:
                    self.reply(identity, reply)
                continue
            worker_of[identity], self.identity_of[worker] = worker, identity
            core.receive(worker, parts[1], now)
            for waiting in self.waiting.pop(worker, []):
                self.reply(identity, waiting)
        return False

    def send(self, worker: str, frame: bytes) -> None:
        """Send ``frame`` to ``worker`` (kept until it joins, if it has not yet)."""
        identity = self.identity_of.get(worker)
        if identity is None:
            self.waiting.setdefault(worker, []).append(frame)
        else:
            self.reply(identity, frame)

class ChildDoer(Doer):
    """One worker, as a doer (see the module docstring). An ``external`` worker is
    started by someone else (``hiocluster worker``); this doer only waits for it."""

    def __init__(self, supervisor: Supervisor, name: str, external: bool = False,
                 **kwa: Any) -> None:
        super().__init__(tock=LOOK_S, **kwa)
        self.supervisor, self.name, self.external = supervisor, name, external
        self.handle: ProcessHandle | None = None
        self.reported = False      # its exit went to the core
        self.exitcode: int | None = None
        self.escalate: list[tuple[float, type[Terminate | Kill]]] = []  # (when, step)
        self.forgot = False  # its sentinel is no longer polled
        self.settle: float | None = None  # exited without its BYE: wait for frames until
        self.killed_at: float | None = None  # when SIGKILL was sent (or asked of an agent)

    def enter(self) -> None:
        if not self.external:
            self.handle = self.supervisor.launcher_for(self.name).start(self.name)
            sentinel = self.handle.sentinel
            if sentinel is not None:
                self.supervisor.loop.poller.register(sentinel)
                self.supervisor.watching[sentinel] = self

    def recur(self, tyme: float) -> bool:
        """Every LOOK_S (its tock): a look at the process (see :meth:`look`)."""
        self.look(time.monotonic())
        return (self.handle is None or self.reported) and self.supervisor.core.finished

    def look(self, now: float) -> None:
        """Has the process ended? Take the signal steps that are due. Called every
        LOOK_S, and in the cycle its sentinel (a pidfd in the loop's poller) turns
        readable: a run's ticks never wait on a waitpid per worker."""
        handle, core = self.handle, self.supervisor.core
        if handle is None or self.reported:
            return
        code = handle.exitcode()
        if code is None:
            while self.escalate and self.escalate[0][0] <= now:
                step = self.escalate.pop(0)[1]
                if step is Kill:
                    handle.kill()
                    self.killed_at = now
                else:
                    handle.terminate()
            if self.killed_at is not None and now - self.killed_at > \
                    self.supervisor.kill_grace:
                # e.g. a process on another host whose agent never answers: do not
                # wait for it for ever
                handle.lost(f"no word from its host {self.supervisor.kill_grace:g} s "
                            "after SIGKILL was asked for")
            return
        if core.awaits_word(self.name):
            # Its last frames can still be on their way (the kernel, then
            # ZeroMQ's I/O thread) when its exit is seen: give them a moment.
            if self.settle is None:
                self.settle = now + EXIT_SETTLE_S
                self._forget_sentinel()  # else its readable sentinel spins the loop
            if now < self.settle:
                return
        self._forget_sentinel()
        self.reported, self.exitcode = True, code
        core.exited(self.name, code, now, tick=handle.last_tick(), cause=handle.why())

    def signal(self, order: Terminate | Kill, now: float) -> None:
        """Kill now, or terminate now and kill if it lingers."""
        grace = self.supervisor.kill_grace
        if isinstance(order, Kill):
            self.escalate = [(now, Kill)]
        else:
            self.escalate = [(now, Terminate), (now + grace, Kill)]
        self.look(now)

    def wind_down(self, now: float) -> None:
        """The run is over: a worker still running gets the kill grace, then SIGTERM,
        then SIGKILL."""
        grace = self.supervisor.kill_grace
        if not self.escalate:
            self.escalate = [(now + grace, Terminate), (now + 2 * grace, Kill)]

    def _forget_sentinel(self) -> None:
        if self.handle is not None and self.handle.sentinel is not None and not self.forgot:
            self.forgot = True
            self.supervisor.loop.poller.unregister(self.handle.sentinel)
            self.supervisor.watching.pop(self.handle.sentinel, None)

    def exit(self) -> None:
        """A forced exit may leave it running: SIGTERM, a short wait, SIGKILL."""
        handle = self.handle
        if handle is None:
            return
        end_process(handle, self.supervisor.kill_grace)
        self._forget_sentinel()
        handle.close()
        self.handle = None


class SupervisorShell(DoDoer):
    """What every supervisor process runs: a :class:`Switchboard` and a
    :class:`ChildDoer` per child around a core that decides (the root's
    :class:`~hiocluster.supervision.runcore.RunCore`, a group's
    :class:`~hiocluster.supervision.groupcore.GroupCore`). Subclasses make ``core``,
    ``context`` and ``listen`` before the doers enter, and say who starts each
    child (:meth:`launcher_for`).

    Args:
        loop: the Loop this supervisor runs in (its poller wakes it).
        children: the names of its children.
        external: children started by someone else (``hiocluster worker``).
        extra: more doers, run after the switchboard and before the children.
        kill_grace: see :class:`Supervisor`.
    """

    def __init__(self, loop: Loop, children: Sequence[str], *, external: Sequence[str] = (),
                 extra: Sequence[Doer] = (), kill_grace: float = KILL_GRACE_S,
                 **kwa: Any) -> None:
        self.loop, self.kill_grace = loop, kill_grace
        self.switchboard = Switchboard(self)
        self.children = {name: ChildDoer(self, name, name in external) for name in children}
        self.watching: dict[int, ChildDoer] = {}  # a child's sentinel -> the child
        self.core: Any = None           # made before the doers enter
        self.context: Context | None = None
        self.listen = ""
        self.control_address = ""
        self.on_listening: Callable[[Any], None] | None = None
        super().__init__(doers=[self.switchboard, *extra, *self.children.values()], **kwa)

    def enter(self, doers: Any = None) -> Any:  # type: ignore[override]
        if doers is None:
            self._open()
        return super().enter(doers)

    def recur(self, tyme: float, deeds: Any = None) -> bool:  # type: ignore[override]
        super().recur(tyme, deeds)  # the switchboard, the extra doers, every child due
        core, now = self.core, time.monotonic()
        for item in self.loop.ready:  # a process that ended, at once
            child = self.watching.get(item)
            if child is not None:
                child.look(now)
        core.poll(now)
        for worker, frame in core.outbox:
            self.switchboard.send(worker, frame)
        core.outbox.clear()
        for order in core.signals:
            self.children[order.child].signal(order, now)
        core.signals.clear()
        self._after(now)
        if not core.finished:
            return False
        for child in self.children.values():
            child.wind_down(now)
        return all(child.handle is None or child.reported for child in self.children.values())

    def awaiting_dones(self) -> bool:
        """Nothing but DONEs to wait for: a window runs, and every frame for the
        children went out (the switchboard may wait for them itself)."""
        core = self.core
        return core.owed > 0 and not core.outbox and core.phase is Phase.RUNNING

    def exit(self, deeds: Any = None) -> None:  # type: ignore[override]
        try:
            super().exit(deeds)
        finally:
            if deeds is None:
                self._close()

    def _open(self) -> None:
        """Before any doer enters: make ``core``, ``context``, ``listen``."""
        raise NotImplementedError

    def _close(self) -> None:
        """After every doer exited: close the context, remove files."""

    def _after(self, now: float) -> None:
        """What a subclass does once per cycle, after the core took its inputs."""

    def launcher_for(self, worker: str) -> Any:
        """Who starts child ``worker`` (a Launcher)."""
        raise NotImplementedError


class Supervisor(SupervisorShell):
    """Run one topology's workers in windows of lockstep ticks.

    Args:
        topology, plan: what to run and where (see topology.plan).
        loop: the Loop this supervisor runs in (its poller wakes it).
        app_dir: directory the workers import node classes from.
        window: ticks per GRANT (None: automatic); 1 is strict per-tick supervision.
        keep_digests: keep the run digest after every tick.
        transport: "ipc" (unix sockets in the run directory), "tcp" (loopback), or
            "local" (ipc for control, Unix-domain SEQPACKET sockets for DATA: see
            hiocluster.worker.localnet; every worker on this host); None: the topology's
            ``run.transport``.
        listen: bind the control socket here instead (e.g. for external workers).
        external: workers started by hand (``hiocluster worker``), not by us.
        worker_command: program and leading arguments that run ``hiocluster``.
        on_tick: called as ``on_tick(done, total)`` when every worker got further.
        on_ready: called with the supervisor once every worker is READY.
        on_listening: called with the supervisor once its control socket is bound
            (``control_address`` is set; ``worker_command_line`` works).
        start_timeout: seconds for every worker to say HELLO and READY.
        stop_timeout: seconds for every worker to say BYE after STOP.
        kill_grace: seconds between the end of the run (or a SIGTERM) and the next
            step for a worker that has not exited: SIGTERM, then SIGKILL.

    Over tcp (``transport="tcp"``, a tcp ``listen`` address, or workers on other
    hosts) every socket of the run is CurveZMQ: the supervisor makes a key pair
    for each worker, and one for itself unless ``keys`` (a keys directory made
    by ``hiocluster keygen``: its ``supervisor.key_secret``, and each host's
    ``<host>.key``) gives one. Workers on other hosts are started by the agents
    of ``plan.hosts`` (see hiocluster.hosts.remote).

    The run directory (ipc sockets, tick registers, the credentials of workers
    started by hand; mode 0700) is made under
    ``$HIOCLUSTER_RUN_ROOT`` if set, else the system temp directory, and removed
    at exit.
    """

    def __init__(self, topology: Topology, plan: Plan, loop: Loop, *,
                 app_dir: str | None = None, window: int | None = None,
                 keep_digests: bool = False, transport: str | None = None,
                 listen: str | None = None,
                 external: Sequence[str] = (), worker_command: Sequence[str] | None = None,
                 on_tick: Callable[[int, int], None] | None = None,
                 on_ready: Callable[[Supervisor], None] | None = None,
                 on_listening: Callable[[Supervisor], None] | None = None,
                 start_timeout: float = START_TIMEOUT, stop_timeout: float = STOP_TIMEOUT,
                 kill_grace: float = KILL_GRACE_S, keys: str | None = None,
                 prefixer: Any = None, trace: bool = False,
                 slurm: Allocation | None = None, metrics: Any = None, **kwa: Any) -> None:
        self.topology, self.plan = topology, plan
        self.trace = trace
        self.app_dir = os.path.abspath(app_dir or os.getcwd())
        self.window, self.keep_digests = window, keep_digests
        #: told every state folded (a digest file's writer), if set before it enters
        self.digest_sink: Callable[[int, bytes, bytes], None] | None = None
        self.worker_command = worker_command
        self.on_tick, self.on_ready = on_tick, on_ready
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        names = list(plan.top)
        workers = [spec.name for spec in plan.workers]
        unknown = sorted(set(external) - set(workers))
        if unknown:
            what = "is a group: only workers" if unknown[0] in plan.groups else \
                f"is no worker in the plan (workers: {', '.join(workers[:10])}); workers"
            raise TopologyError(f"{unknown[0]} {what} can be started by hand",
                                key_path="--external")
        grouped = sorted(set(external) - set(names))
        if grouped:
            raise TopologyError(f"{', '.join(grouped)} run under a group: its group starts "
                                "them, not a hand", key_path="--external")
        hosts = {host.name: host for host in plan.hosts.values()}
        transport = transport or topology.transport
        self.data = "local" if transport == "local" else "zmq"   # how DATA travels
        if self.data == "local":
            transport = "ipc"
            if hosts or (listen or "").startswith("tcp://"):
                raise TopologyError(
                    "local DATA sockets join only the workers of this host, without "
                    "CurveZMQ: " + ("the plan puts workers on other hosts" if hosts else
                                    f"--listen {listen} is tcp") + "; use --transport ipc "
                    "or tcp", key_path="--transport local")
        self.slurm = slurm
        if slurm is not None:
            transport = _slurm_checks(plan, self.data, hosts)
        self.links = agent_links(self, hosts, keys, what="workers")
        from hiocluster.services.supervisor import Endpoint, Services  # services import this module
        self.endpoint = Endpoint(self, on_bound=self._endpoint_bound)
        self.endpoint_address = ""
        self.services = Services(self, topology, app_dir=app_dir, prefixer=prefixer) \
            if topology.services else None
        #: the run's Prometheus endpoint (hiocluster.services.metrics), if it has one
        self.metrics = metrics
        if metrics is not None:
            metrics.attach(loop, self.status)
        extra = [*self.links.values(), self.endpoint, *([self.services] if self.services
                                                         else []), *([metrics] if metrics else [])]
        super().__init__(loop, names, external=external, extra=extra,
                         kill_grace=kill_grace, **kwa)
        self.transport, self.listen = transport, listen or ""
        self.on_listening = on_listening
        self.token = secrets.token_bytes(16)
        self.curve = transport == "tcp" or self.listen.startswith("tcp://") or bool(hosts)
        self.keys: KeyPair | None = None
        if self.curve:
            self.keys = supervisor_keys(keys)
        # every worker's and every group's: groups hand theirs on to those under them
        self.worker_keys = {name: KeyPair.generate()
                            for name in [*(spec.name for spec in plan.workers), *plan.groups]
                            } if self.curve else {}
        if hosts and not self.listen:  # where the hosts reach us: the address facing them
            self.listen = listen_toward(next(iter(self.links.values())))
        #: under --launcher slurm: each worker's Slurm node (its allocation's task slots)
        self.slurm_nodes: dict[str, str] = {}
        if slurm is not None:
            self.listen = self.listen or f"tcp://{slurm.supervisor_address()}:*"
            self.slurm_nodes = place(names, slurm.nodes, slurm.tasks)
        self.core: RunCore = None  # type: ignore[assignment]  # made in enter
        self.run_dir: str | None = None
        self.launcher: Any = None
        self._shown = 0
        self._ready_told = False
        self._early_signal: int | None = None
        self.shell_keys: KeyPair | None = None  # a tcp endpoint's shells'
        #: set by run() before it enters: where checkpoints go and how often, and the
        #: checkpoint the run starts from
        self.checkpoint_root: str | None = None
        self.checkpoint_every = 0
        self.resume_point: Resume | None = None
        #: set by run() before it enters: where every worker records (--record)
        self.record_root: str | None = None
        self.observations: Observations | None = None  # run() sets it: every try's
        self._completing: threading.Thread | None = None  # a checkpoint's manifest
        self._completing_failed: CheckpointError | None = None
        #: the tick of the newest checkpoint this supervisor completed (None: none yet)
        self.checkpointed: int | None = None

    # -- hio contexts -------------------------------------------------------------
    def recur(self, tyme: float, deeds: Any = None) -> bool:  # type: ignore[override]
        done = super().recur(tyme, deeds)
        services = self.services
        if services is None:
            return done
        core, now = self.core, time.monotonic()
        if services.core.failure is not None and not core.finished:
            core.fail(services.core.failure, now)  # a failed service fails the run
        if core.finished:
            services.stop()  # the simulation is over: so are the services
        return done and services.core.finished

    def _after(self, now: float) -> None:
        core = self.core
        core.flush_observed(now, hold=True)  # the next GRANT went out: off the critical path
        if core.checkpoints:
            for made in core.checkpoints:
                self._manifest(made, now)
            core.checkpoints.clear()
        self._tell(core)

    def _manifest(self, made: Checkpointed, now: float) -> None:
        """Every share of the checkpoint after ``made.tick`` is written: complete it
        (sync the shares, write the manifest, drop old ones) in a thread, off the
        run's critical path; one at a time."""
        root = self.checkpoint_root
        assert root is not None
        self._completed()
        manifest = {
            "tick": made.tick, "topology": self.topology.name,
            "topology_hash": checkpoints.topology_hash(self.topology),
            "versions": proto.local_versions(), "digest": made.digest,
            "records": made.records.hex(), "folded": made.folded,
            "placement": {spec.name: list(spec.node_names) for spec in self.plan.workers},
            "nodes": len(self.topology.nodes)}

        def complete() -> None:
            try:
                checkpoints.complete_checkpoint(checkpoints.tick_dir(root, made.tick),
                                                manifest)
                self.checkpointed = made.tick
                checkpoints.prune(root)
            except CheckpointError as exc:
                self._completing_failed = exc

        self._completing = threading.Thread(target=complete, name="hiocluster-checkpoint")
        self._completing.start()

    def _completed(self) -> None:
        """Wait for the checkpoint being completed (if one is); fail the run if it
        could not be."""
        if self._completing is not None:
            self._completing.join()
            self._completing = None
        if self._completing_failed is not None and not self.core.finished:
            self.core.fail(self._completing_failed, time.monotonic())

    def interrupt(self, signum: int) -> None:
        """Stop the run cleanly at once (SIGINT/SIGTERM, at the loop's signal
        checkpoint); before the core exists, as soon as it does."""
        if self.core is None:
            self._early_signal = signum
        else:
            self.core.interrupt(signum, time.monotonic())
        if self.services is not None:
            self.services.stop()

    # -- the control endpoint (hiocluster status / stop) ------------------------------
    def command(self, message: Any) -> Any:
        from hiocluster.services.supervisor import answer_command
        return answer_command(message, self.services, self.status,
                              lambda: self.interrupt(signal.SIGTERM))

    def status(self) -> dict[str, Any]:
        """What ``hiocluster status`` shows of this run."""
        core, now = self.core, time.monotonic()
        if core is None:  # not started yet
            return {"topology": self.topology.name, "pid": os.getpid(), "uptime": 0.0,
                    "simulation": None, "services": []}
        done = core.progress if core.ticking else 0
        seconds = now - core.ticking if core.ticking else 0.0
        workers, progress = {}, {}
        for name, book in core.books.items():
            state = book.machine.state.name.lower()
            if book.exitcode is not None:
                state = f"exited {book.exitcode}"
            elif book.failed:
                state = "failed"
            workers[name] = state
            progress[name] = {"tick": max(book.machine.done, book.progress, 0),
                              "waiting": list(book.waiting),
                              "waiting_s": round(now - book.waiting_since, 3)
                              if book.waiting else 0.0}
        return {"topology": self.topology.name, "pid": os.getpid(),
                "uptime": round(now - core.started, 3),
                "simulation": {"tick": done, "ticks": self.topology.ticks,
                               "rate": round(done / seconds, 3) if seconds > 0 else 0.0,
                               "window": core.sizer.size, "state": core.phase.name.lower(),
                               "workers": workers, "progress": progress},
                "services": self.services.status() if self.services is not None else []}

    # -- results --------------------------------------------------------------------
    @property
    def result(self) -> RunResult | None:
        return self.core.result if self.core is not None else None

    @property
    def failure(self) -> ClusterError | None:
        if self.core is None:
            return None
        if self.core.failure is None and not self.core.finished:
            return Interrupted(signal.SIGINT)  # the loop was closed before the end
        return self.core.failure

    def worker_command_line(self, worker: str) -> str:
        """How to start worker ``worker`` by hand (for ``external`` workers)."""
        argv = ["hiocluster", *worker_argv(self.control_address, worker,
                                           app_dir=self.app_dir, data=self.data)]
        return " ".join(argv) + f" --credentials {self._credentials_path(worker)}"

    def launcher_for(self, worker: str) -> Any:
        """Who starts ``worker``: its host's agent, or this host."""
        host = self.plan.hosts.get(worker)
        return self.links[host.name] if host is not None else self.launcher

    def credentials(self, worker: str) -> Credentials:
        """What child ``worker`` proves itself with (see transport.Credentials); a
        group also gets the key pairs of everyone under it."""
        under = {}
        if worker in self.plan.groups and self.curve:
            under = {name: self.worker_keys[name] for name in self.plan.below(worker)}
        return Credentials(self.token, self.worker_keys.get(worker),
                           self.keys.public if self.keys is not None else None, under)

    def _credentials_path(self, worker: str) -> str:
        return os.path.join(self.run_dir or "", f"{worker}.credentials")

    # -- helpers --------------------------------------------------------------------
    def _open(self) -> None:
        self.run_dir = make_run_dir()
        try:
            for name, child in self.children.items():
                if child.external:  # the worker started by hand reads it (mode 0600)
                    path = self._credentials_path(name)
                    with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as file:
                        file.write(self.credentials(name).to_json())
        except OSError as exc:
            raise TransportError(f"cannot write into the run directory {self.run_dir}: "
                                 f"{exc}") from exc
        self.listen = self.listen or local_address(self.transport, self.run_dir, "control")
        # the endpoint follows the transport: over tcp no unix path at all (CURVE, its
        # keys for shells in the run directory: see hiocluster.control.client)
        self.endpoint_address = local_address(self.transport, self.run_dir, "endpoint")
        self.context = Context(self.keys, owner="supervisor")
        if self.context.gate is not None:
            if self.endpoint_address.startswith("tcp://"):
                self.shell_keys = KeyPair.generate()
                self.context.gate.admit(SHELL, self.shell_keys.public)
            for name in self.children:  # those under groups connect to their group
                self.context.gate.admit(name, self.worker_keys[name].public)
            self.context.gate.open()
        self.core = RunCore(self.topology, self.plan, now=time.monotonic(), token=self.token,
                            keys={name: pair.public for name, pair in self.worker_keys.items()},
                            window=self.window, keep_digests=self.keep_digests,
                            wall=time.time, start_timeout=self.start_timeout,
                            stop_timeout=self.stop_timeout, trace=self.trace,
                            external=[name for name, child in self.children.items()
                                      if child.external],
                            checkpoint_every=self.checkpoint_every,
                            record=self.record_root or "",
                            checkpoint_path=None if self.checkpoint_root is None else
                            functools.partial(checkpoints.tick_dir, self.checkpoint_root),
                            resume=self.resume_point, observations=self.observations)
        self.core.chain.sink = self.digest_sink
        if self._early_signal is not None:  # it stops before it starts anyone
            self.core.interrupt(self._early_signal, time.monotonic())
        launch_agents(self.links.values())
        # the launcher needs the bound address: the switchboard binds in its enter,
        # which hio runs before any child's (doers enter in order)
        self.launcher = _DeferredLauncher(self)

    def _close(self) -> None:
        self._completed()  # the last checkpoint is complete before the run ends
        close_run(self)

    def _endpoint_bound(self) -> None:
        """The endpoint is bound: a tcp one's address and keys go in the run directory
        (mode 0600), where shells of this user find them; then say we listen."""
        if self.shell_keys is not None and self.keys is not None:
            assert self.run_dir is not None
            record = {"address": self.endpoint_address, "public": self.shell_keys.public,
                      "secret": self.shell_keys.secret, "server": self.keys.public}
            path = os.path.join(self.run_dir, ENDPOINT_RECORD)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as file:
                json.dump(record, file)
        if self.on_listening is not None:
            self.on_listening(self)

    def _tell(self, core: RunCore) -> None:
        if self.on_ready is not None and not self._ready_told and core.ticking:
            self._ready_told = True
            self.on_ready(self)
        if self.on_tick is not None and core.ticking:
            done = core.progress
            if done > self._shown:
                self._shown = done
                self.on_tick(done, self.topology.ticks)


class _DeferredLauncher:
    """A LocalLauncher made on first use, once the control socket is bound."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.launcher: LocalLauncher | SlurmLauncher | None = None

    def start(self, worker: str) -> ProcessHandle:
        supervisor = self.supervisor
        if self.launcher is None and supervisor.slurm is not None:
            self.launcher = SlurmLauncher(supervisor.slurm, supervisor.slurm_nodes,
                                          supervisor.control_address, supervisor.credentials,
                                          app_dir=supervisor.app_dir,
                                          command=supervisor.worker_command)
        if self.launcher is None:
            assert supervisor.run_dir is not None
            plan = supervisor.plan
            self.launcher = LocalLauncher(supervisor.control_address, supervisor.credentials,
                                          supervisor.run_dir, app_dir=supervisor.app_dir,
                                          command=supervisor.worker_command,
                                          data=supervisor.data,
                                          trees={name: plan.tree(name) for name in plan.top
                                                 if name in plan.groups})
        return self.launcher.start(worker)


def run(topology: Topology | str | os.PathLike[str], *, processes: int | None = None,
        app_dir: str | None = None,
        window: int | None = None, real: bool | None = None,
        on_tick: Callable[[int, int], None] | None = None, keep_digests: bool = False,
        handle_signals: bool = True, worker_command: Sequence[str] | None = None,
        on_ready: Callable[[Supervisor], None] | None = None, transport: str | None = None,
        listen: str | None = None, external: Sequence[str] = (),
        on_listening: Callable[[Supervisor], None] | None = None,
        check_classes: bool = True, keys: str | None = None, prefixer: Any = None,
        trace: bool = False, digests_file: str | None = None,
        checkpoint: str | None = None, checkpoint_every: int | None = None,
        resume: str | None = None, on_restart: Callable[[Restart], None] | None = None,
        record: str | None = None, launcher: str = "local",
        progress: bool | None = None, observe: str | None = None,
        **timeouts: float) -> RunResult:
    """Run ``topology`` to completion in lockstep and return its result.

    Args:
        topology: a validated topology (see :func:`hiocluster.topology.load`), or the
            path of a topology file, loaded here.
        processes: spread nodes over this many worker processes (None: the file's
            placement, else one worker per core).
        app_dir: directory to import node classes from (default: cwd).
        window: ticks per GRANT (None: automatic; 1: strict per-tick supervision).
            Results never depend on it.
        real: pace ticks to the wall clock (default: the topology's ``run.real``).
        on_tick: progress callback ``(done, total)``.
        progress: without ``on_tick``, a bar in a Jupyter notebook (None: there
            only; False: never; True: there, else nothing either: the command
            line has its own).
        keep_digests: also return every tick's run digest.
        digests_file: write every node's digest after every digested tick to this
            file (hiocluster.supervision.digestfile), also for a run that fails or
            is interrupted: up to the last state folded.
        checkpoint: write a checkpoint into this directory after every
            ``checkpoint_every`` ticks (default CHECKPOINT_EVERY; a multiple of the
            topology's digest_every), the newest checkpoints.KEEP kept.
        resume: start from the newest complete checkpoint in this directory (one
            of this topology, by these versions; any placement, window or host).
        on_restart: with ``[run] restart = "checkpoint"``, told each restart
            (hiocluster.supervision.restarts.Restart) as it begins.
        record: every worker records what it receives, and its digests, into this
            directory (hiocluster.worker.record), to replay it alone later
            (hiocluster.worker.replay). Made if needed; its records are replaced.
        observe: stream what the nodes' ``observe()`` say to this file as the run
            goes, a window at a time: CSV, or Parquet for ``*.parquet`` (pyarrow).
            Without it they are kept in memory (``RunResult.observations``).
        launcher: "local" (this host, or the agents of the plan's hosts) or
            "slurm": each worker a job step of the Slurm allocation this process runs
            in (hiocluster.hosts.slurm; over tcp; one worker per task unless
            ``processes`` says otherwise).
        handle_signals: on the main thread, turn SIGINT/SIGTERM into a clean stop.
        worker_command, on_ready, on_listening, transport, listen, external, keys: see
            :class:`Supervisor`.
        trace: record where each tick's time goes (``RunResult.trace``; see
            hiocluster.supervision.trace).
        check_classes: import the node classes here first and check every link's
            boxes exist (TopologyError naming the key); tests of the workers'
            own start-up errors turn it off.
        timeouts: ``start_timeout``, ``stop_timeout``, ``kill_grace`` (seconds; see
            :class:`Supervisor`).

    Raises:
        TopologyError: the plan is impossible (e.g. more processes than nodes).
        RunFailed: a worker failed (NodeError, TickTimeout, ProcessExited...); with
            ``[run] restart = "checkpoint"``, one that no restart could get past.
        Interrupted: a signal stopped the run; every worker was shut down.
    """
    if isinstance(topology, (str, os.PathLike)):
        topology = load_topology(topology)
    if on_tick is None and progress is not False:
        from hiocluster.runtime.notebook import NotebookBar, in_notebook
        if in_notebook():
            on_tick = NotebookBar()
    slurm = None
    if launcher == "slurm":
        slurm = Allocation.from_environment()
        if processes is None and not topology.placement:
            processes = min(slurm.ntasks, len(topology.nodes))
    elif launcher != "local":
        raise TopologyError(f"unknown launcher {launcher!r}; choose from local, slurm",
                            key_path="--launcher")
    plan = make_plan(topology, processes)
    if check_classes:
        resolve_classes(topology, app_dir)
        resolve_services(topology, app_dir)
    if real is not None:
        topology = topology.replace(real=real)
    restarting = topology.restart == "checkpoint"
    scratch = None  # restarts without --checkpoint: checkpoints in a run directory
    if restarting:
        restart_checks(topology, plan, external)
        if checkpoint is None:
            scratch = checkpoint = make_run_dir("hioc-checkpoints-")
    writer = metrics = None
    if record is not None:
        record = _start_record(record, topology, plan, checkpoint, app_dir)
    observations = Observations(observe)  # a file: made now, so a bad path fails first
    try:
        if topology.metrics:
            from hiocluster.services.metrics import MetricsEndpoint
            metrics = MetricsEndpoint(topology.metrics)
        if digests_file is not None:
            writer = DigestWriter(digests_file, topology.name, topology.ticks,
                                  topology.digest_every, [node.name for node in topology.nodes])
        intensity = Intensity(topology.max_restarts, topology.within)
        restarts: list[Restart] = []
        kept: list[str] = []  # tick digests of earlier tries, up to where the next began
        began = time.monotonic()
        start_from = resume  # the checkpoint a try starts from
        first: Resume | None = None  # the run's (the first try's)
        while True:
            loop = Loop()
            supervisor = Supervisor(topology, plan, loop, app_dir=app_dir, window=window,
                                    keep_digests=keep_digests, transport=transport,
                                    listen=listen, external=external,
                                    worker_command=worker_command, on_tick=on_tick,
                                    on_ready=on_ready, on_listening=on_listening, keys=keys,
                                    prefixer=prefixer, trace=trace, slurm=slurm,
                                    metrics=metrics, **timeouts)
            _checkpoints(supervisor, topology, checkpoint, checkpoint_every, start_from,
                         app_dir)
            point = supervisor.resume_point
            if not restarts:
                first = point
            supervisor.digest_sink = writer
            supervisor.observations = observations
            supervisor.record_root = record
            loop.doers = [supervisor]
            with run_signals(supervisor, loop, handle_signals):
                loop.run()
            supervisor.core.flush_observed(time.monotonic())  # every window done, even
            # in a failed try
            failure = supervisor.failure
            if not (restarting and restartable(failure)
                    and supervisor._completing_failed is None):
                break
            assert isinstance(failure, (ProcessExited, TickTimeout)) and checkpoint is not None
            if not intensity.allows(time.monotonic()):
                failure.cause += f"; {intensity.exceeded()}"
                failure.args = (str(failure),)
                break
            # a host lost: its workers start again on this one
            moved = tuple(sorted(name for name, link in supervisor.links.items()
                                 if link.lost is not None))
            if moved:
                plan = dataclasses.replace(plan, hosts={
                    worker: host for worker, host in plan.hosts.items()
                    if host.name not in moved})
            # every worker is gone: all start again from the newest checkpoint this
            # try completed (or, before its first, from where this try started)
            tried_from = point.tick if point else -1
            tick = supervisor.checkpointed if supervisor.checkpointed is not None \
                else tried_from
            if keep_digests:
                kept += supervisor.core.chain.tick_digests[:digested_between(
                    tried_from + 1, tick, topology.digest_every, topology.ticks)]
            if writer is not None:
                writer.rewind(tick if tick >= 0 else None)
            observations.rewind(tick)
            start_from = checkpoints.tick_dir(checkpoint, tick) if tick >= 0 else None
            if start_from is not None and point is not None and tick == point.tick:
                start_from = point.path  # no newer one: the one this try started from
            if record is not None:  # the next try's record starts from its checkpoint
                start_from = _record_restart(record, start_from)
            restarts.append(Restart.of(failure, tick, time.monotonic() - began, moved))
            if on_restart is not None:
                on_restart(restarts[-1])
    finally:
        observations.close()
        if writer is not None:
            writer.close()
        if metrics is not None:
            metrics.close()
        if scratch is not None:
            remove_run_dir(scratch)
    for made in (supervisor.result, getattr(supervisor.failure, "partial", None)):
        if made is not None:
            made.observations_from = first.tick + 1 if first is not None else 0
        if made is not None and restarts:  # the whole run's, not only the last try's
            made.tick_digests[:0] = kept
            made.resumed_from = first.tick if first is not None else None
            made.restarts = [restart.to_json() for restart in restarts]
            made.seconds = time.monotonic() - began - made.startup_seconds
    if record is not None:
        _end_record(record, supervisor)
    if isinstance(supervisor.failure, RunFailed):  # how far the run got, as a whole
        failure = supervisor.failure
        node = supervisor.slurm_nodes.get(failure.worker)
        if slurm is not None and node is not None:  # a step: where it ran, however it failed
            failure.cause += f" {where(slurm, failure.worker, node)}"
            failure.args = (str(failure),)
        failure.reached = supervisor.core.completed
        failure.digest = supervisor.core.chain.digest.hex()
        if checkpoint is not None and scratch is None:
            with contextlib.suppress(CheckpointError):
                failure.checkpoint = checkpoints.newest(checkpoint)[0]
    if supervisor.failure is not None:
        raise supervisor.failure
    if supervisor._completing_failed is not None:  # the last checkpoint, after the end
        raise supervisor._completing_failed
    for error, kind in ((writer.error if writer else None, DigestFileError),
                        (observations.error, ObservationsError)):
        if error is not None:
            raise kind(f"{error} (the run finished: digest "
                       f"{supervisor.result.digest if supervisor.result else '?'})")
    if supervisor.result is None:  # pragma: no cover - failures raise above
        raise RuntimeError("run ended without a result")
    if supervisor.services is not None:
        supervisor.result.services = supervisor.services.core.status(time.monotonic())
    return supervisor.result


def checkpoint_interval(topology: Topology, every: int | None = None) -> int:
    """Ticks between checkpoints: ``every`` (--checkpoint-every), else the file's
    ``checkpoint_every``, else CHECKPOINT_EVERY rounded up to a multiple of
    ``digest_every``."""
    digest_every = topology.digest_every
    return every or topology.checkpoint_every or \
        -(-CHECKPOINT_EVERY // digest_every) * digest_every


def checkpointable(topology: Topology, app_dir: str | None) -> None:
    """Raise TopologyError naming a node class that cannot be checkpointed."""
    first: dict[str, str] = {}  # each class once (10,000 nodes may share one), named by its first node
    for node in topology.nodes:
        first.setdefault(node.cls, node.name)
    for cls, name in first.items():
        why = cannot_checkpoint(load_class(cls, app_dir))
        if why is not None:
            raise TopologyError(why, key_path=f"nodes.{name}.class")


def _start_record(directory: str, topology: Topology, plan: Plan,
                  checkpoint: str | None, app_dir: str | None) -> str:
    """Make the record directory and its manifest (hiocluster.worker.record)."""
    directory = os.path.abspath(directory)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        for name in os.listdir(directory):  # an earlier run's: not mixed with this one's
            if name.endswith(".rec"):
                os.unlink(os.path.join(directory, name))
        _drop_restart_copies(directory)
    except OSError as exc:
        raise RecordError(f"cannot make the record directory {directory}: "
                          f"{exc.strerror or exc}") from None
    records.write_manifest(directory, {
        "topology": topology.name, "topology_hash": checkpoints.topology_hash(topology),
        "versions": proto.local_versions(), "ticks": topology.ticks,
        "digest_every": topology.digest_every,
        "placement": {spec.name: list(spec.node_names) for spec in plan.workers},
        "checkpoint": os.path.abspath(checkpoint) if checkpoint else "",
        "app_dir": os.path.abspath(app_dir or os.getcwd()), "status": "running"})
    return directory


#: The checkpoint a restarted try of a recorded run started from, kept in the
#: record (``<DIR>/restarted-from-tick-<T>``): the record holds the last try, and
#: its replay takes that checkpoint back, which rotation would remove.
RECORD_RESTART = "restarted-from-"


def _record_restart(directory: str, start_from: str | None) -> str | None:
    """Copy the checkpoint a restarted try starts from into the record (replacing
    an earlier try's); the try starts from the copy. None: from the start."""
    try:
        _drop_restart_copies(directory)
        if start_from is None:
            return None
        kept = os.path.join(directory, RECORD_RESTART + os.path.basename(
            os.path.normpath(start_from)))
        shutil.copytree(start_from, kept)
    except OSError as exc:
        raise RecordError(f"cannot keep the checkpoint {start_from} in the record "
                          f"{directory}: {exc.strerror or exc}") from None
    return kept


def _drop_restart_copies(directory: str) -> None:
    """Remove the checkpoints an earlier try (or run) kept in the record."""
    for name in os.listdir(directory):
        if name.startswith(RECORD_RESTART):
            shutil.rmtree(os.path.join(directory, name))


def _end_record(directory: str, supervisor: Supervisor) -> None:
    """The record's manifest, with how the run ended (and its speed, for replay)."""
    manifest = records.read_manifest(directory)
    result = supervisor.result or getattr(supervisor.failure, "partial", None)
    manifest["status"] = "finished" if supervisor.result is not None else \
        "interrupted" if result is not None else "failed"
    if result is not None:
        manifest.update(digest=result.digest, ticks_per_second=result.ticks_per_second)
    manifest["size"] = records.directory_size(directory)
    records.write_manifest(directory, manifest)


def _slurm_checks(plan: Plan, data: str, hosts: Mapping[str, Any]) -> str:
    """What ``--launcher slurm`` cannot do (TopologyError); its transport: tcp."""
    why = ("[hosts]: the allocation's nodes are its hosts" if hosts else
           "groups: run it flat (--processes)" if plan.groups else
           "--transport local: it joins only the workers of one host"
           if data == "local" else None)
    if why is not None:
        raise TopologyError(f"--launcher slurm does not work with {why}",
                            key_path="--launcher")
    return "tcp"  # over the allocation's network, CurveZMQ


def restart_checks(topology: Topology, plan: Plan, external: Sequence[str]) -> None:
    """What ``[run] restart = "checkpoint"`` cannot do yet: raises TopologyError."""
    why = ("groups: run it with --processes (any number) instead" if plan.groups else
           "services: run the simulation in a topology of its own" if topology.services
           else "workers started by hand (--external): nobody could start them again"
           if external else None)
    if why is not None:
        raise TopologyError(f'restart = "checkpoint" does not work with {why}',
                            key_path="run.restart")


#: Ticks between checkpoints when ``--checkpoint`` says no ``--checkpoint-every``.
CHECKPOINT_EVERY = 1000


def _checkpoints(supervisor: Supervisor, topology: Topology, root: str | None,
                 every: int | None, resume: str | None, app_dir: str | None) -> None:
    """Where the run's checkpoints go, and the one it starts from (checked: of this
    topology, by these versions, before its last tick; every node class able to take
    its state back). Raises TopologyError, CheckpointError."""
    if root is None and resume is None:
        return
    checkpointable(topology, app_dir)
    if root is not None:
        digest_every = topology.digest_every
        every = checkpoint_interval(topology, every)
        if every < 1 or every % digest_every:
            raise TopologyError(f"checkpoints every {every} ticks: must be a multiple of "
                                f"digest_every ({digest_every}), whose states are digested",
                                key_path="run.checkpoint_every")
        supervisor.checkpoint_root = os.path.abspath(root)
        supervisor.checkpoint_every = every
        try:
            os.makedirs(supervisor.checkpoint_root, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot make the checkpoint directory {root}: "
                                  f"{exc.strerror or exc}") from None
    if resume is None:
        return
    if supervisor.plan.groups:
        raise TopologyError("--resume does not work with groups yet: run it with "
                            "--processes (any number) instead", key_path="--resume")
    resume = os.path.abspath(resume)
    if os.path.exists(os.path.join(resume, checkpoints.MANIFEST)):  # one checkpoint
        directory, manifest = resume, checkpoints.read_manifest(resume)
    else:  # a --checkpoint directory: its newest
        directory, manifest = checkpoints.newest(resume)
    if manifest.get("topology_hash") != checkpoints.topology_hash(topology):
        raise CheckpointError(f"{directory} was written by another topology "
                              f"({manifest.get('topology')!r}, or the same one changed: "
                              "its nodes, params, links, seed or clock)")
    if manifest.get("versions") != proto.local_versions():
        raise CheckpointError(f"{directory} was written by other versions "
                              f"({manifest.get('versions')}; these: {proto.local_versions()})")
    try:
        point = Resume(directory, int(manifest["tick"]), str(manifest["digest"]),
                       bytes.fromhex(manifest["records"]), int(manifest["folded"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory}: its manifest lacks or garbles {exc}") from None
    if not 0 <= point.tick < topology.ticks - 1:
        raise CheckpointError(f"{directory} is after tick {point.tick}: nothing of the "
                              f"run's {topology.ticks} ticks is left to run")
    supervisor.resume_point = point
