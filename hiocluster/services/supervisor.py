"""A run's services, as hio doers: replica processes kept alive, scaled, rolled.

In the run's :class:`~hiocluster.runtime.loop.Loop`, beside (or instead of) a lockstep
supervisor:

================  =============================================================
``Services``      a DoDoer: the :class:`~hiocluster.services.core.ServiceCore`
                  that decides, a board, and a ``ReplicaDoer`` per process
                  (added as it starts, gone once it exited)
``ServiceBoard``  a Doer: the ROUTER replicas connect to (ipc in the 0700 run
                  directory): JOIN, LOAD, BYE, ERROR in; STOP out; a second
                  one on tcp (CurveZMQ, a key pair per replica) where
                  services run on other hosts
``AgentLink``     a Doer per other host a service runs on (``hosts``): its
                  agent starts and signals replicas there
                  (hiocluster.hosts.remote)
``ReplicaDoer``   a Doer per replica process: ``enter`` starts it, ``recur``
                  passes its output on (prefixed) and notices its exit,
                  ``exit`` makes sure it is gone
``Endpoint``      a Doer: the run's control endpoint (``hiocluster status``,
                  ``scale``, ``restart``, ``stop``)
``ServiceRun``    the root of a run with services and no simulation
================  =============================================================

None of them blocks. :func:`serve` is the Python API behind ``hiocluster run``
for such topologies.

Replicas across hosts (``[services.NAME] hosts = ["alpha", "beta"]``): replica
``i`` runs on the ``i % n``-th of the service's ``n`` hosts that are not lost
(``"local"``: this one); each host's agent listens on the service's address
there, on sockets it holds for the run. A host whose agent is lost (its link
cut, its agent gone: heartbeats) loses its replicas at once: each is a crash
under the service's restart policy, and restarts on a host still there.
Spares (warm standby processes) serve this host's replicas only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import time
from collections import deque
from typing import Any, Callable, Sequence, cast

import psutil
from hio.base.doing import DoDoer, Doer

from hiocluster import protocol as proto
from hiocluster.errors import ClusterError, FrameError, Interrupted, TopologyError
from hiocluster.hosts.remote import (
    AgentLink,
    RemoteProcess,
    agent_links,
    launch_agents,
    listen_toward,
    supervisor_keys,
)
from hiocluster.runtime.launch import LocalProcess, end_process
from hiocluster.runtime.loop import Loop, RouterDoer
from hiocluster.runtime.output import Prefixer
from hiocluster.runtime.replicas import CONTROL_ENV, listening_socket, spawn_replica
from hiocluster.runtime.rundir import close_run, make_run_dir
from hiocluster.runtime.signals import run_signals
from hiocluster.runtime.transport import (
    Context,
    Credentials,
    KeyPair,
    ipc_address,
)
from hiocluster.services.core import (
    Replica,
    ServiceCore,
    StartReplica,
    StopReplica,
    on_this_host,
)
from hiocluster.services.metrics import MetricsEndpoint
from hiocluster.timing import KILL_GRACE_S
from hiocluster.topology import Topology, load
from hiocluster.topology.lines import locate_error

__all__ = ["Services", "ServiceBoard", "ReplicaDoer", "Endpoint", "ServiceRun", "serve",
           "CONTROL_ENV", "ENDPOINT", "ServeResult"]

#: Frames from strangers on the replicas' socket said one by one; later ones counted.
LOG_IGNORED = 10
#: The endpoint's socket file in the run directory.
ENDPOINT = "endpoint"
#: Longest sleep of a run of services only: every deadline it has wakes it sooner.
IDLE_WAIT_S = 1.0
#: ms the endpoint's "stopped" answers get to leave before its socket closes.
STOPPED_LINGER_MS = 1000
#: Seconds before a spare that died is replaced.
SPARE_RETRY_S = 5.0
#: status's CPU column: each replica's use over about the last this many seconds.
CPU_WINDOW_S = 2.0


class CpuRate:
    """A process's CPU use over about the last :data:`CPU_WINDOW_S` seconds, not
    since whoever asked last: ``read()`` gives its CPU seconds so far, and
    :meth:`sample` (called every quarter window) keeps what one window needs."""

    def __init__(self, read: Callable[[], float], now: float) -> None:
        self.read = read
        self.samples: deque[tuple[float, float]] = deque()
        self.sample(now)

    def sample(self, now: float) -> float:
        """Read and keep the CPU seconds now; drop samples a whole window old
        but for the newest of them."""
        cpu = self.read()
        samples = self.samples
        samples.append((now, cpu))
        while len(samples) > 2 and now - samples[1][0] >= CPU_WINDOW_S:
            samples.popleft()
        return cpu

    def percent(self, now: float) -> float | None:
        """Percent of one core since the oldest sample kept (None: too soon to say)."""
        cpu = self.sample(now)
        then, before = self.samples[0]
        return round(100 * (cpu - before) / (now - then), 1) if now - then > 0.01 else None


def _cpu_seconds(process: psutil.Process) -> Callable[[], float]:
    """Reads ``process``'s CPU seconds (user and system) so far."""
    def read() -> float:
        times = process.cpu_times()
        return float(times.user + times.system)
    return read


class ReplicaDoer(Doer):
    """One replica process (see the module docstring), or a spare: a process that
    imported the service's code and holds all its listening sockets, waiting to
    become a replica (:meth:`Services.start`) the moment one is needed."""

    def __init__(self, services: Services, replica: Replica | None, *,
                 spare: tuple[str, int] | None = None, link: AgentLink | None = None,
                 unplaced: str | None = None, **kwa: Any) -> None:
        super().__init__(**kwa)
        self.services, self.replica = services, replica
        self.spare = spare                 # (service, serial) while a spare
        self.standing = False              # a spare that said STANDBY
        self.retired = False               # a spare told to go
        self.listeners = 0                 # a spare: how many sockets it holds
        self.link = link                   # the other host's agent it runs through
        self.unplaced = unplaced           # why it has no host to run on
        self.handle: LocalProcess | RemoteProcess | None = None
        self.output: int | None = None
        self.unstarted: int | None = None  # could not start: the exit code to report
        self.public: str | None = None     # its CURVE key, on another host

    @property
    def service(self) -> str:
        return self.replica.service if self.replica is not None else self.spare[0]  # type: ignore

    @property
    def key(self) -> str:
        """Its routing id on the services socket."""
        if self.replica is not None:
            return self.replica.key
        return f"{self.spare[0]}.spare.{self.spare[1]}"  # type: ignore[index]

    @property
    def label(self) -> str:
        return self.replica.label if self.replica is not None else f"{self.service}.spare"

    def enter(self) -> None:
        services, replica = self.services, self.replica
        spec = services.core.services[self.service].spec
        if replica is None:  # a spare holds every socket of its service
            positions: tuple[int, ...] = tuple(range(services.core.services[self.service].pool))
        else:  # across hosts, a replica's socket is on its own host: its own only
            positions = (replica.index,) if spec.hosts else replica.listeners
        if self.unplaced is not None:
            self._unstarted(self.unplaced)
            return
        if self.link is not None:
            self._enter_remote(spec.to_json(), list(positions))
            return
        try:
            fds = [services.socket(self.service, k).fileno() for k in positions]
        except OSError as exc:
            self._unstarted(f"cannot listen on {spec.address}: {exc.strerror or exc}")
            return
        self.listeners = len(fds)
        self.handle = handle = spawn_replica(
            services.command, connect=services.address, key=self.key,
            app_dir=services.app_dir, spec=spec.to_json(),
            credentials=Credentials(services.token).to_json(), fds=fds,
            env={CONTROL_ENV: services.endpoint_address})
        self.output = handle.output
        poller = services.loop.poller
        if self.output is not None:
            poller.register(self.output)
        if handle.sentinel is not None:
            poller.register(handle.sentinel)

    def _enter_remote(self, spec: dict[str, Any], positions: list[int]) -> None:
        """Its host's agent starts it: a key pair of its own for the services socket
        on tcp, admitted for as long as it runs."""
        services, link = self.services, self.link
        assert link is not None and services.keys is not None
        keys = KeyPair.generate()
        gate = services.context.gate
        assert gate is not None
        gate.admit(self.key, keys.public)
        self.public = keys.public
        credentials = Credentials(services.token, keys, services.keys.public)
        services.held.setdefault((link.host.name, self.service), set()).update(positions)
        self.handle = link.start_replica(self.key, connect=services.remote_address,
                                         credentials=credentials.to_json(), spec=spec,
                                         listeners=positions)

    def _unstarted(self, error: str) -> None:
        self.services.say(f"{self.label}: {error}")
        if self.replica is not None:
            self.replica.error = error
        self.unstarted = 1

    def become(self, replica: Replica) -> None:
        """This spare is now ``replica``: it is told so and joins as it."""
        positions = list(replica.listeners)
        self.services.board.reply(self.key.encode(), proto.encode(proto.Assign(
            replica=replica.index, incarnation=replica.incarnation, listeners=positions)))
        self.services.prefixer.flush(self.label)
        self.replica, self.spare, self.standing = replica, None, False

    def recur(self, tyme: float) -> bool:
        if self.unstarted is not None:
            if self.replica is not None:
                self.services.core.exited(self.replica, self.unstarted, time.monotonic())
            return True
        self.read()
        handle = self.handle
        if handle is None:
            return True
        code = handle.exitcode()
        if code is None:
            return False
        self.read()
        why = handle.why()
        if why is not None:
            self.services.say(f"{self.label}: {why}")
        self._release()
        if self.replica is not None:
            self.services.core.exited(self.replica, code, time.monotonic())
        else:
            self.services.spare_exited(self, code)
        return True

    def read(self) -> None:
        """Pass on what the replica wrote (bounded per cycle)."""
        if self.output is None:
            return
        for _ in range(16):
            try:
                data = os.read(self.output, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.services.prefixer.flush(self.label)
                self.services.loop.poller.unregister(self.output)
                self.output = None
                return
            self.services.prefixer.feed(self.label, data)

    def kill(self) -> None:
        if self.handle is not None:
            self.handle.kill()

    def _release(self) -> None:
        handle = self.handle
        if handle is None:
            return
        poller = self.services.loop.poller
        if self.output is not None:
            poller.unregister(self.output)
            self.output = None
        if handle.sentinel is not None:
            poller.unregister(handle.sentinel)
        handle.close()
        self.handle = None
        if self.public is not None:  # its key opens nothing now
            gate = self.services.context.gate
            if gate is not None:
                gate.forget(self.public)
            self.public = None
        self.services.prefixer.flush(self.label)

    def exit(self) -> None:
        """A forced exit (the run ends early) may leave it running: end it (one
        on another host: its agent is told to; it also ends them all once the
        run's connection to it closes)."""
        if isinstance(self.handle, RemoteProcess):
            self.handle.kill()
            self._release()
        elif self.handle is not None:
            end_process(self.handle, KILL_GRACE_S)
            self.read()
            self._release()


class ServiceBoard(RouterDoer):
    """The socket replicas talk to the supervisor on (see the module docstring)."""

    def __init__(self, services: Services, *, remote: bool = False, **kwa: Any) -> None:
        super().__init__(**kwa)
        self.services, self.remote = services, remote
        self.ignored = 0  # frames from no replica or spare of ours: counted, first few said

    def enter(self) -> None:
        services = self.services
        if not self.remote:
            self.attach(services.loop, services.context.control_router(services.address))
            return
        self.attach(services.loop, services.context.control_router(services.remote_listen))
        assert self.router is not None
        services.remote_address = self.router.bound_address()

    def recur(self, tyme: float) -> bool:
        core, now = self.services.core, time.monotonic()
        router = self.router
        assert router is not None
        for _ in range(10_000):  # bounded: a flood cannot starve the other doers
            parts = router.take_parts()
            if parts is None:
                break
            identity = parts[0].decode("utf-8", "replace")
            replica = core.replica(identity)
            if replica is not None and self.remote == replica.here:
                replica = None  # a replica says who it is on its own socket only
            if replica is None and len(parts) == 2 and not self.remote:
                spare = self.services.spares.get(identity)
                if spare is not None:
                    self.services.standby(spare, parts[1])
                    continue
            if replica is None or len(parts) != 2:  # not a replica of ours (or one gone)
                self._ignore(identity, "no replica of this run" if replica is None
                             else f"{len(parts) - 1} frames in one message")
                continue
            try:
                message = proto.decode(parts[1], allowed=proto.FROM_REPLICA)
            except FrameError as exc:
                self.services.say(f"{replica.label}: bad frame: {exc}; killed")
                self.services.kill(replica)
                continue
            self.services.received(replica, message, now)
        return False

    def _ignore(self, identity: str, why: str) -> None:
        self.ignored += 1
        if self.ignored <= LOG_IGNORED:
            self.services.say(f"ignored a frame on the replicas' socket from {identity!r}: "
                              f"{why}" + (" (further ones are only counted)"
                                          if self.ignored == LOG_IGNORED else ""))

    def send(self, replica: Replica, message: proto.Message) -> None:
        self.reply(replica.key.encode(), proto.encode(message))


class Services(DoDoer):
    """Every service of a run (see the module docstring).

    Args:
        owner: the run: gives ``loop``, ``context``, ``run_dir``, ``token``,
            ``endpoint_address`` once it entered.
        topology: the services to run.
        app_dir: where replicas import service classes from.
        command: program and leading arguments that run ``hiocluster``.
        prefixer: where replicas' output and the run's service messages go.
        keys: the keys directory: the agents' public keys (``NAME.key``) of the
            hosts services run on (``tcp://`` ones; ``ssh://`` and ``slurm://``
            ones' are made for the run).
        across_hosts: whether the owner can run services on other hosts (it then
            gives ``keys``, its CURVE key pair, and a context with a gate).

    Raises:
        TopologyError: a service names a host the topology does not declare, or
            one on another host without ``across_hosts``, or without the keys.
    """

    def __init__(self, owner: Any, topology: Topology, *, app_dir: str | None = None,
                 command: Sequence[str] | None = None, prefixer: Prefixer | None = None,
                 keys: str | None = None, across_hosts: bool = False, **kwa: Any) -> None:
        self.owner = owner
        self.core = ServiceCore(topology.services)
        self.path = topology.path  # read again on reload
        self.app_dir = os.path.abspath(app_dir or os.getcwd())
        self.command = list(command or [sys.executable, "-m", "hiocluster"])
        self.prefixer = prefixer or Prefixer()
        try:
            self.links = _links(self, topology, keys, across_hosts)
        except TopologyError as exc:  # named at its line of the file
            locate_error(exc, topology.source, topology.path)
            raise
        self.remote_listen = listen_toward(next(iter(self.links.values()))) \
            if self.links else ""
        self.remote_address = ""                    # the tcp board's, once bound
        #: (host, service) -> the listening sockets its agent was asked to open
        self.held: dict[tuple[str, str], set[int]] = {}
        self.prefixer.reserve(["hiocluster", *(f"{spec.name}.{spec.replicas - 1}"
                                               for spec in topology.services)])
        self.board = ServiceBoard(self)
        self.running: dict[str, ReplicaDoer] = {}
        self.spares: dict[str, ReplicaDoer] = {}    # routing id -> a spare's doer
        self.spare_serial = 0
        self.spare_failed: dict[str, float] = {}   # service -> when its spare last died
        self.spare_after_start: set[str] = set()   # services whose replicas all served
        self.sockets: dict[str, dict[int, Any]] = {name: {} for name in self.core.services}
        self.processes: dict[int, psutil.Process] = {}
        self.cpu: dict[int, CpuRate] = {}  # pid -> its recent CPU use
        self.cpu_due = 0.0
        self.started = False
        self.remote_board = ServiceBoard(self, remote=True) if self.links else None
        remote = [self.remote_board, *self.links.values()] if self.remote_board else []
        super().__init__(doers=[self.board, *remote], **kwa)

    # what the owner provides, once it entered
    @property
    def loop(self) -> Loop:
        return self.owner.loop

    @property
    def context(self) -> Context:
        return self.owner.context

    @property
    def token(self) -> bytes:
        return self.owner.token

    @property
    def keys(self) -> KeyPair | None:
        """The owner's CURVE key pair (where services run on other hosts)."""
        return getattr(self.owner, "keys", None)

    @property
    def address(self) -> str:
        return ipc_address(self.owner.run_dir, "services")

    @property
    def endpoint_address(self) -> str:
        return self.owner.endpoint_address

    def recur(self, tyme: float, deeds: Any = None) -> bool:  # type: ignore[override]
        core, now = self.core, time.monotonic()
        if not self.started:
            self.started = True
            for name, service in core.services.items():
                hosts = service.spec.hosts  # across hosts: those of its first placement here
                try:  # every listening socket first: a taken address fails at once
                    for k in range(service.pool):
                        if not hosts or hosts[k % len(hosts)] == "local":
                            self.socket(name, k)
                except OSError as exc:
                    core.fail(name, f"cannot listen on {service.spec.address}: "
                                    f"{exc.strerror or exc}", now)
                    break
            else:
                core.start(now)
        super().recur(tyme, deeds)
        for key in [key for key, doer in self.running.items() if doer.done]:
            doer = self.running.pop(key)
            self.doers.remove(doer)
        core.poll(now)
        for action in core.actions:
            if isinstance(action, StartReplica):
                self.start(action.replica)
            elif isinstance(action, StopReplica):
                board = self.board if action.replica.here else self.remote_board
                assert board is not None
                board.send(action.replica, proto.Stop(reason="stop", drain=True))
            else:
                self.kill(action.replica)
        core.actions.clear()
        for line in core.log:
            self.say(line)
        core.log.clear()
        self.keep_spares(now)
        self.sample_cpu(now)
        for name, sockets in self.sockets.items():  # scaled to 0: refuse, do not queue
            pool = core.services[name].pool
            if core.services[name].spec.hosts:  # across hosts: no hand-over of sockets
                pool = min(pool, core.services[name].desired)
            for k in [k for k in sockets if k >= pool]:
                sockets.pop(k).close()
        for (host, name), held in self.held.items():  # the same on the other hosts
            gone = sorted(k for k in held if k >= core.services[name].desired)
            if gone:
                held.difference_update(gone)
                self.links[host].close_listeners(name, gone)
        due = core.next_due()
        if due is not None:
            self.loop.wake_by(due)
        finished = core.finished and not self.spares
        if finished:
            self.close_sockets()
        return finished

    # -- spares -------------------------------------------------------------------
    def start(self, replica: Replica) -> None:
        """A process for ``replica`` on its host (:meth:`place`). On this one: a
        waiting spare of its service if there is one holding the sockets it needs
        (it serves within milliseconds), else a new process (a Python start-up: a
        few hundred milliseconds)."""
        try:
            link = self.place(replica)
        except LookupError as exc:
            self._extend(ReplicaDoer(self, replica, unplaced=str(exc.args[0])))
            return
        if link is not None:
            self._extend(ReplicaDoer(self, replica, link=link))
            return
        for key, spare in list(self.spares.items()):
            if spare.service == replica.service and spare.standing and \
                    spare.listeners > max(replica.listeners, default=-1):
                del self.spares[key]
                spare.become(replica)
                self.running[replica.key] = spare
                return
        self._extend(ReplicaDoer(self, replica))

    def _extend(self, doer: ReplicaDoer) -> None:
        assert doer.replica is not None
        self.running[doer.replica.key] = doer
        self.extend([doer])

    def place(self, replica: Replica) -> AgentLink | None:
        """Where ``replica`` runs: replica ``i`` on the ``i % n``-th of its service's
        ``n`` hosts not lost (None: this one); sets ``replica.host``. Raises
        LookupError when every host of its service is lost."""
        hosts = self.core.services[replica.service].spec.hosts
        if not hosts:
            return None
        live = [host for host in hosts if host == "local" or not self.links[host].lost]
        if not live:
            raise LookupError(f"every host of service {replica.service} is lost "
                              f"({', '.join(hosts)})")
        replica.host = live[replica.index % len(live)]
        return None if replica.host == "local" else self.links[replica.host]

    def remote_output(self, key: str, text: str) -> None:
        """What a replica on another host wrote (its agent's OUTPUT)."""
        doer = self.running.get(key)
        self.prefixer.feed(doer.label if doer is not None else key, text.encode())

    def keep_spares(self, now: float) -> None:
        """One spare per service (``spare = true``) once its replicas serve; a spare
        that holds too few sockets (the service grew) is replaced; none while
        stopping."""
        core = self.core
        for name, service in core.services.items():
            mine = [doer for doer in self.spares.values() if doer.service == name]
            if core.all_serving(name):
                self.spare_after_start.add(name)  # its first replicas have started
            wanted = service.spec.spare and not service.spec.hosts and not core.stopping \
                and not service.failed \
                and service.pool > 0 and name in self.spare_after_start \
                and now - self.spare_failed.get(name, -1e9) > SPARE_RETRY_S
            for doer in mine:
                if not wanted or (doer.handle is not None and doer.listeners < service.pool):
                    self.retire(doer)
            if wanted and not any(doer.listeners >= service.pool for doer in mine):
                self.spare_serial += 1
                doer = ReplicaDoer(self, None, spare=(name, self.spare_serial))
                self.spares[doer.key] = doer
                self.extend([doer])

    def retire(self, doer: ReplicaDoer) -> None:
        """A spare that is not needed: STOP (it exits at once), or SIGKILL before
        it said STANDBY."""
        if doer.retired:
            return
        doer.retired = True
        if doer.standing:
            self.board.reply(doer.key.encode(), proto.encode(proto.Stop(reason="stop")))
        elif doer.handle is not None:
            doer.kill()
        doer.standing, doer.listeners = False, -1  # never assigned now

    def standby(self, doer: ReplicaDoer, data: bytes) -> None:
        """A frame from a spare: STANDBY, checked like a JOIN."""
        try:
            message = proto.decode(data, allowed=(proto.Standby,))
        except FrameError as exc:
            self.say(f"{doer.label}: bad frame: {exc}; killed")
            doer.kill()
            return
        assert isinstance(message, proto.Standby)
        if (message.service, message.token, message.pid) != \
                (doer.service, self.token, doer.handle.pid if doer.handle else None):
            self.say(f"{doer.label}: STANDBY does not match the spare started: killed")
            doer.kill()
            return
        if doer.listeners > 0:
            doer.standing = True

    def spare_exited(self, doer: ReplicaDoer, code: int) -> None:
        self.spares.pop(doer.key, None)
        if doer in self.doers:
            self.doers.remove(doer)
        if code != 0 and not doer.retired and not self.core.stopping:
            self.say(f"{doer.label} (a standby process) exited with code {code}; "
                     f"another in {SPARE_RETRY_S:g} s")
            self.spare_failed[doer.service] = time.monotonic()

    def socket(self, service: str, k: int) -> Any:
        """Listening socket ``k`` of ``service`` (made on first use; the run holds
        it so that connections queued on it outlive any one replica)."""
        sockets = self.sockets[service]
        if k not in sockets:
            # the first: no other program (another run, though it sets SO_REUSEPORT
            # too) may listen there, or it would silently take part of the traffic
            sockets[k] = listening_socket(self.core.services[service].spec.listen,
                                          alone=not sockets)
        return sockets[k]

    def close_sockets(self) -> None:
        for sockets in self.sockets.values():
            for sock in sockets.values():
                sock.close()
            sockets.clear()

    def exit(self, deeds: Any = None) -> None:  # type: ignore[override]
        try:
            super().exit(deeds)
        finally:
            if deeds is None:
                self.close_sockets()

    def received(self, replica: Replica, message: proto.Message, now: float) -> None:
        """A frame from ``replica``'s process."""
        if isinstance(message, proto.Join):
            doer = self.running.get(replica.key)
            pid = doer.handle.pid if doer is not None and doer.handle else None
            if pid is None and doer is not None and doer.link is not None:
                pid = message.pid  # its agent's LAUNCHED may come after its JOIN
            expected = (replica.service, replica.index, replica.incarnation, self.token, pid)
            said = (message.service, message.replica, message.incarnation, message.token,
                    message.pid)
            if said != expected:
                self.say(f"{replica.label}: JOIN does not match the replica started "
                         "(service, replica, incarnation, token or pid): killed")
                self.kill(replica)
                return
            self.core.joined(replica, message.pid, now, message.version)
            spec = self.core.services[replica.service].spec
            if doer is not None and doer.link is not None:  # its pid is its host's
                self.say(f"{replica.label} serving on {spec.address} on host "
                         f"{replica.host} (pid {message.pid})")
                return
            try:
                process = psutil.Process(message.pid)
                self.cpu[message.pid] = CpuRate(_cpu_seconds(process), now)
                self.processes[message.pid] = process
            except psutil.Error:
                pass
            self.say(f"{replica.label} serving on {spec.address} (pid {message.pid})")
        elif isinstance(message, proto.Load):
            self.core.load(replica, message.served, message.connections, now,
                           rss=self._rss(replica), failing=message.failing,
                           health=message.health, latency=message.latency,
                           latency_sum=message.latency_sum)
        elif isinstance(message, proto.Bye):
            self.core.load(replica, message.stats.get("served", replica.served), 0)
        elif isinstance(message, proto.Error):
            replica.error = message.detail
            self.say(f"{replica.label}: {message.detail}")

    def _rss(self, replica: Replica) -> int | None:
        """The memory ``replica``'s process uses, where its service limits it."""
        if not self.core.services[replica.service].spec.max_rss:
            return None
        process = self.processes.get(replica.pid or -1)
        try:
            return process.memory_info().rss if process is not None else None
        except psutil.Error:
            return None

    def reload(self) -> str:
        """SIGHUP or ``hiocluster reload``: read the topology file again and roll
        each service onto what it says (:meth:`ServiceCore.reload`), every
        successor a process that imports the code anew: the warm spares, which
        imported it before, are retired first (and made again behind them).

        Raises:
            ValueError: no file to read, or it is no longer valid (named).
        """
        if not self.path:
            raise ValueError("this run was not started from a topology file")
        try:
            topology = load(self.path)
        except (OSError, ClusterError) as exc:
            raise ValueError(f"cannot reload {self.path}: {exc}") from None
        specs, now, said = {spec.name: spec for spec in topology.services}, \
            time.monotonic(), []
        for name in self.core.services:
            if name not in specs:
                said.append(f"{name}: not in {self.path} now: left as it is")
                continue
            try:
                said.append(self.core.reload(name, specs[name], now))
            except (KeyError, ValueError) as exc:
                said.append(str(exc.args[0]))
                continue
            for doer in [doer for doer in self.spares.values() if doer.service == name]:
                self.retire(doer)
        return "; ".join(said)

    def hangup(self) -> None:
        """SIGHUP: reload, saying what it did."""
        try:
            self.say(f"SIGHUP: {self.reload()}")
        except ValueError as exc:
            self.say(f"SIGHUP: {exc}")

    def scale_by(self, step: int) -> None:
        """SIGTTIN (+1) or SIGTTOU (-1): one more or one fewer replica of every
        service (never fewer than one), saying what it did."""
        name = "SIGTTIN" if step > 0 else "SIGTTOU"
        for service, state in self.core.services.items():
            try:
                self.say(f"{name}: " + self.core.scale(
                    service, max(1, state.desired + step), time.monotonic()))
            except ValueError as exc:
                self.say(f"{name}: {exc}")

    def reopen_logs(self) -> None:
        """SIGUSR1 to the run: every replica opens its log files again (after a
        rotation), as gunicorn's workers do."""
        replicas = [replica for replica in self.core.live() if replica.pid is not None
                    and replica.here]  # another host's pids are its own
        for replica in replicas:
            with contextlib.suppress(OSError):
                os.kill(replica.pid, signal.SIGUSR1)  # type: ignore[arg-type]
        self.say(f"SIGUSR1: {len(replicas)} replicas told to open their log files again")

    def ignored(self, signum: int) -> None:
        """A signal the run ignores (SIGUSR2) arrived."""
        self.say(f"{signal.Signals(signum).name} ignored (SIGHUP reloads; SIGTERM or "
                 "`hiocluster stop` stops the run)")

    def kill(self, replica: Replica) -> None:
        doer = self.running.get(replica.key)
        if doer is not None:
            doer.kill()

    def say(self, line: str) -> None:
        self.prefixer.write("hiocluster", [line])

    def sample_cpu(self, now: float) -> None:
        """Every quarter of :data:`CPU_WINDOW_S`: each replica's CPU seconds."""
        if now < self.cpu_due:
            return
        self.cpu_due = now + CPU_WINDOW_S / 4
        for rate in self.cpu.values():
            with contextlib.suppress(psutil.Error):
                rate.sample(now)
        if self.cpu:
            self.loop.wake_by(self.cpu_due)

    def status(self) -> list[dict[str, Any]]:
        """The core's status, with CPU (percent of a core, over the last
        :data:`CPU_WINDOW_S` seconds) and RSS per replica."""
        now = time.monotonic()
        rows = self.core.status(now)
        for row in rows:
            for replica in row["replicas"]:
                process = self.processes.get(replica["pid"] or -1) \
                    if on_this_host(replica["host"]) else None
                cpu, rss = None, None
                if process is not None:
                    try:
                        with process.oneshot():
                            cpu = self.cpu[replica["pid"]].percent(now)
                            rss = process.memory_info().rss
                    except psutil.Error:
                        pass
                replica["cpu"], replica["rss"] = cpu, rss
        for row in rows:
            row["spare"] = next((doer.handle.pid for doer in self.spares.values()
                                 if doer.service == row["service"] and doer.standing
                                 and doer.handle is not None), None)
        live = {replica.pid for replica in self.core.live()}
        for pid in [pid for pid in self.processes if pid not in live]:
            del self.processes[pid], self.cpu[pid]  # made together
        return rows

    def stop(self) -> None:
        self.core.stop(time.monotonic())


class Endpoint(RouterDoer):
    """The run's control endpoint: COMMAND in, ANSWER out (docs/protocol.md §12).
    ``owner`` answers: ``command(message) -> Answer``; ``on_bound()`` is called once
    it is bound (``owner.endpoint_address`` then has a tcp endpoint's port)."""

    def __init__(self, owner: Any, on_bound: Callable[[], None] | None = None,
                 **kwa: Any) -> None:
        super().__init__(**kwa)
        self.owner, self.on_bound = owner, on_bound
        self.stopping: list[bytes] = []  # shells that asked to stop: told once stopped

    def enter(self) -> None:
        owner = self.owner
        self.attach(owner.loop, owner.context.endpoint_router(owner.endpoint_address))
        assert self.router is not None
        owner.endpoint_address = self.router.bound_address()
        if self.on_bound is not None:
            self.on_bound()

    def exit(self) -> None:
        """The run has stopped: each shell that asked gets its second ANSWER, how
        it ended (``owner.failure``); a shell that sees the connection close
        without it knows the run did not end by its own hand."""
        if self.router is not None and self.stopping:
            failure = self.owner.failure
            answer = proto.Answer(ok=True, detail="stopped") \
                if failure is None or isinstance(failure, Interrupted) else \
                proto.Answer(ok=False, detail=f"stopped: the run failed: {failure}")
            for identity in self.stopping:
                self.reply(identity, proto.encode(answer))
            self.linger_ms = STOPPED_LINGER_MS
        super().exit()

    def recur(self, tyme: float) -> bool:
        router = self.router
        assert router is not None
        for _ in range(100):
            parts = router.take_parts()
            if parts is None:
                break
            try:
                if len(parts) != 2:
                    raise FrameError(f"expected one frame, got {len(parts) - 1}",
                                     code="multipart")
                message = cast(proto.Command, proto.decode(parts[1], allowed=(proto.Command,)))
                answer = self.owner.command(message)
                if message.command == "stop" and answer.ok:
                    self.stopping.append(parts[0])
            except FrameError as exc:
                answer = proto.Answer(ok=False, detail=f"bad command: {exc}")
            self.reply(parts[0], proto.encode(answer))  # a shell gone away is no error
        return False


def answer_command(message: proto.Command, services: Services | None,
                   status: Callable[[], dict[str, Any]], stop: Callable[[], None]
                   ) -> proto.Answer:
    """What every run answers on its endpoint: ``status`` (the run's state),
    ``scale``/``restart`` (its services), ``stop``."""
    if message.command == "status":
        return proto.Answer(ok=True, detail="", status=status())
    if message.command == "stop":
        stop()
        return proto.Answer(ok=True, detail="stopping")
    if services is None:
        return proto.Answer(ok=False, detail="this run has no services")
    if message.command == "reload":
        try:
            return proto.Answer(ok=True, detail=services.reload())
        except ValueError as exc:
            return proto.Answer(ok=False, detail=str(exc))
    if not message.service:
        return proto.Answer(ok=False, detail=f"{message.command} needs a service name")
    now = time.monotonic()
    try:
        if message.command == "scale":
            if message.replicas is None:
                return proto.Answer(ok=False, detail="scale needs a number of replicas")
            detail = services.core.scale(message.service, message.replicas, now)
        else:
            detail = services.core.restart(message.service, now)
    except KeyError as exc:
        return proto.Answer(ok=False, detail=str(exc.args[0]))
    except ValueError as exc:
        return proto.Answer(ok=False, detail=str(exc))
    return proto.Answer(ok=True, detail=detail)


class ServiceRun(DoDoer):
    """The root of a run of services only (see :func:`serve`)."""

    def __init__(self, topology: Topology, loop: Loop, *, app_dir: str | None = None,
                 command: Sequence[str] | None = None, prefixer: Prefixer | None = None,
                 on_listening: Callable[[ServiceRun], None] | None = None,
                 metrics: MetricsEndpoint | None = None, keys: str | None = None,
                 **kwa: Any) -> None:
        self.topology, self.loop = topology, loop
        self.token = secrets.token_bytes(16)
        self.run_dir: str | None = None
        self.context: Context | None = None
        self.endpoint_address = ""
        self.on_listening = on_listening
        self.keys: KeyPair | None = None  # services on other hosts: the run's CURVE keys
        self.services = Services(self, topology, app_dir=app_dir, command=command,
                                 prefixer=prefixer, keys=keys, across_hosts=True)
        if self.services.links:
            self.keys = supervisor_keys(keys)
        self.endpoint = Endpoint(self)
        self.started = time.time()
        #: the run's Prometheus endpoint, if it has one
        self.metrics = metrics
        if metrics is not None:
            metrics.attach(loop, self.status)
        super().__init__(doers=[self.endpoint, self.services, *([metrics] if metrics else [])],
                         **kwa)

    def enter(self, doers: Any = None) -> Any:  # type: ignore[override]
        if doers is None:
            self.run_dir = make_run_dir()
            self.endpoint_address = ipc_address(self.run_dir, ENDPOINT)
            self.context = Context(self.keys, owner="supervisor")
            if self.context.gate is not None:  # replicas' keys are admitted as they start
                self.context.gate.open()
            launch_agents(self.services.links.values())
        deeds = super().enter(doers)
        if doers is None and self.on_listening is not None:
            self.on_listening(self)
        return deeds

    def recur(self, tyme: float, deeds: Any = None) -> bool:  # type: ignore[override]
        super().recur(tyme, deeds)
        return self.services.core.finished

    def exit(self, deeds: Any = None) -> None:  # type: ignore[override]
        try:
            super().exit(deeds)
        finally:
            if deeds is None:
                close_run(self)

    def interrupt(self, signum: int) -> None:
        """SIGINT/SIGTERM: drain and stop every replica."""
        self.services.stop()

    @property
    def failure(self) -> ClusterError | None:
        return self.services.core.failure

    def status(self) -> dict[str, Any]:
        return {"topology": self.topology.name, "pid": os.getpid(),
                "uptime": round(time.time() - self.started, 3),
                "services": self.services.status(), "simulation": None}

    def command(self, message: proto.Command) -> proto.Answer:
        return answer_command(message, self.services, self.status, self.services.stop)


class ServeResult:
    """How a run of services ended: each service's final status row."""

    def __init__(self, services: list[dict[str, Any]]) -> None:
        self.services = services

    def to_json(self) -> dict[str, Any]:
        return {"services": self.services}


def serve(topology: Topology, *, app_dir: str | None = None,
          command: Sequence[str] | None = None, prefixer: Prefixer | None = None,
          handle_signals: bool = True,
          on_listening: Callable[[ServiceRun], None] | None = None,
          keys: str | None = None) -> ServeResult:
    """Run ``topology``'s services until stopped (SIGINT, SIGTERM, ``hiocluster
    stop``) and return how they ended. ``keys``: the keys directory, where
    services run on other hosts' agents (see :class:`Services`).

    Raises:
        TopologyError: a service's hosts are not declared, or need ``keys``.
        ServiceFailed: a service restarted more often than its intensity allows;
            every replica was stopped first.
    """
    from hiocluster.topology import resolve_services

    resolve_services(topology, app_dir)
    loop = Loop(max_wait=IDLE_WAIT_S)  # replicas, shells and signals wake it sooner
    metrics = MetricsEndpoint(topology.metrics) if topology.metrics else None
    try:
        root = ServiceRun(topology, loop, app_dir=app_dir, command=command, prefixer=prefixer,
                          on_listening=on_listening, metrics=metrics, keys=keys)
        loop.doers = [root]
        with run_signals(root, loop, handle_signals):
            loop.run()
    finally:
        if metrics is not None:
            metrics.close()
    if root.services.core.failure is not None:
        raise root.services.core.failure
    return ServeResult(root.services.core.status(time.monotonic()))


def _links(services: Services, topology: Topology, keys: str | None,
           across_hosts: bool) -> dict[str, AgentLink]:
    """An agent link per other host the topology's services run on (see
    :class:`Services`)."""
    declared = {host.name: host for host in topology.hosts}
    named: list[str] = []
    for spec in topology.services:
        for j, name in enumerate(spec.hosts):
            where = f"services.{spec.name}.hosts[{j}]"
            if name != "local" and name not in declared:
                raise TopologyError(f"host {name!r} is not declared (a [hosts.{name}] "
                                    f"table, or --host {name}=ADDRESS)", key_path=where)
            if name != "local" and not across_hosts:
                raise TopologyError("services run on other hosts only in a run of services "
                                    "alone (this topology has nodes too): run them apart",
                                    key_path=where)
            if name != "local" and name not in named:
                named.append(name)
    return agent_links(services, {name: declared[name] for name in named}, keys,
                       what="services", output=services.remote_output)
