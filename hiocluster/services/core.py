"""What a run decides about its services, without sockets or processes (sans-IO).

A service (``[services.NAME]``) is kept at a number of replicas, each a process
serving the same address. :class:`ServiceCore` takes what happened (a replica
joined, reported its load, exited; a shell asked to scale or restart) with the
time, and says what to do in :attr:`ServiceCore.actions`, typed instructions its
shell carries out in order:

:class:`StartReplica`    start a process for this replica (a fresh incarnation)
:class:`StopReplica`     ask it to drain and exit (a STOP frame)
:class:`KillReplica`     it overstayed its drain, or hangs: SIGKILL

The rules, as Erlang/OTP supervisors have them:

* **restart policy**: ``one_for_one`` restarts only the replica that died;
  ``one_for_all`` stops the others and restarts them all;
* **intensity**: more than ``max_restarts`` restarts within ``within`` seconds
  and the service fails: every replica is stopped and the run ends with
  :class:`ServiceFailed`;
* **backoff**: a restart waits ``backoff * 2**(k-1)`` seconds (at most
  ``backoff_max``), ``k`` the replica's crashes within ``within`` seconds;
* **scale** up starts replicas; down drains the highest numbered;
* **rolling restart**: one replica at a time, its successor serving before it
  is asked to stop, so the address never has fewer replicas serving;
* **lifetimes**: a replica that served ``max_requests`` requests (plus 0 ..
  ``max_requests_jitter``, drawn per start, so replicas do not all go at once)
  or uses more than ``max_rss`` bytes of memory is replaced the same way: its
  successor serves first. No crash, no restart counted.
* **health**: a replica whose health check failed ``health_failures`` times in
  a row is taken out of the accept set at once (it drains: connections queue on
  its listening sockets, which the run holds) and a successor started in its
  slot takes them. Counted among its slot's restarts, but not as a crash: the
  service does not fail for it (a dependency that is down fails every
  replica's check; each slot is replaced at most every ``health_failures``
  checks).

A replica that does not join within ``start_timeout`` seconds is killed (and
counts as a crash), as is one that serves but is not heard from (JOIN, LOAD) for
its service's ``heartbeat`` seconds: its loop hangs, or it was SIGSTOPped; its
listening sockets are the run's, so its successor takes the connections queued.
"""

from __future__ import annotations

import bisect
import enum
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

from hiocluster.errors import ServiceFailed
from hiocluster.topology import MAX_REPLICAS, ServiceSpec

__all__ = ["ServiceCore", "Replica", "ReplicaState", "ServiceFailed", "START_TIMEOUT",
           "StartReplica", "StopReplica", "KillReplica", "Action", "Latency",
           "LATENCY_BUCKETS", "on_this_host"]

#: Seconds a replica gets from its start to JOIN.
START_TIMEOUT = 10.0


#: Upper bounds (seconds) of the buckets of a server's latency histogram (one
#: more bucket holds what is slower): Prometheus's default buckets, and finer
#: ones below 5 ms, where a replica's answers are.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)


class Latency:
    """How long requests took, as a histogram: ``counts[i]`` requests took at most
    ``LATENCY_BUCKETS[i]`` seconds and more than the bound before (the last: more
    than all), ``total`` seconds in all. Adding one costs a bisection."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def merge(self, counts: Iterable[int], total: float) -> None:
        """Add another histogram's counts (of the same buckets; none: nothing yet)
        and total."""
        mine = self.counts
        for index, count in enumerate(counts):
            mine[index] += count
        self.total += total


class ReplicaState(enum.Enum):
    STARTING = "starting"   # process started, not joined yet
    SERVING = "serving"     # joined: its servers listen
    STOPPING = "stopping"   # asked to drain and exit
    EXITED = "exited"


@dataclass(eq=False)
class Replica:
    """One process of a service: replica number ``index``, its ``incarnation``-th
    start (unique within the run, so a restarted replica has a new identity)."""

    service: str
    index: int
    incarnation: int
    started: float
    state: ReplicaState = ReplicaState.STARTING
    pid: int | None = None
    serving_since: float | None = None
    served: int = 0
    connections: int = 0
    kill_at: float | None = None       # when stopping: SIGKILL if still there
    heard: float = 0.0                 # when it last said something (JOIN, LOAD)
    hung: bool = False                 # killed for silence
    listeners: tuple[int, ...] = ()    # the service's listening sockets it accepts from
    retiring: bool = False             # stopped on purpose: its exit is no crash
    worn: bool = False                 # past max_requests or max_rss: being replaced
    jitter: int = 0                    # its share of max_requests_jitter
    version: str = ""                  # the code it imported (JOIN's version)
    failing: int = 0                   # its health checks failed this many times in a row
    latency: list[int] = field(default_factory=list)  # its requests per latency bucket
    latency_sum: float = 0.0                          # their seconds in all
    health: str = ""                   # "" no check, "ok", or the last failure
    error: str | None = None           # what it said in an ERROR frame
    host: str = ""                     # where it runs: a [hosts] name, "local"; "": here

    @property
    def here(self) -> bool:
        """Whether it runs on the run's own host."""
        return on_this_host(self.host)

    @property
    def key(self) -> str:
        """``service.index.incarnation``: its identity on the control socket."""
        return f"{self.service}.{self.index}.{self.incarnation}"

    @property
    def label(self) -> str:
        """``service.index``, as logs and the status table name it."""
        return f"{self.service}.{self.index}"


# -- what the core asks its shell to do (typed instructions, carried out in order) --

@dataclass(frozen=True, slots=True)
class StartReplica:
    """Start a process for ``replica`` (a fresh incarnation)."""

    replica: Replica
    kind: ClassVar[str] = "start"


@dataclass(frozen=True, slots=True)
class StopReplica:
    """Ask ``replica`` to drain and exit (a STOP frame)."""

    replica: Replica
    kind: ClassVar[str] = "stop"


@dataclass(frozen=True, slots=True)
class KillReplica:
    """End ``replica``'s process now (SIGKILL): it overstayed its drain, or hangs."""

    replica: Replica
    kind: ClassVar[str] = "kill"


#: One instruction of :attr:`ServiceCore.actions`.
Action = StartReplica | StopReplica | KillReplica


@dataclass(eq=False)
class _Service:
    spec: ServiceSpec
    desired: int
    replicas: dict[int, list[Replica]] = field(default_factory=dict)  # index -> newest last
    crashes: deque[tuple[float, int]] = field(default_factory=deque)  # (when, index)
    restarts: dict[int, int] = field(default_factory=dict)            # index -> count
    pending: dict[int, float] = field(default_factory=dict)           # index -> start at
    rolling: list[int] = field(default_factory=list)                  # indexes still to roll
    roll_index: int | None = None                                     # the one rolling now
    failed: str | None = None
    served_gone: int = 0   # served by replicas that exited
    worn: int = 0          # replicas replaced for max_requests or max_rss
    unhealthy: int = 0     # replicas replaced for failing their health checks
    latency_gone: Latency = field(default_factory=Latency)  # of replicas that exited
    pool: int = 0          # listening sockets 0..pool-1 exist (the run holds them)

    def live(self, index: int) -> list[Replica]:
        return [r for r in self.replicas.get(index, []) if r.state is not ReplicaState.EXITED]


class ServiceCore:
    """See the module docstring. ``specs``: the topology's services."""

    def __init__(self, specs: Iterable[ServiceSpec], *, start_timeout: float = START_TIMEOUT
                 ) -> None:
        self.services = {spec.name: _Service(spec, spec.replicas, pool=spec.replicas)
                         for spec in specs}
        self.start_timeout = start_timeout
        self.actions: list[Action] = []
        self.log: list[str] = []           # what happened, for the run's output
        self.failure: ServiceFailed | None = None
        self.stopping = False
        self._incarnation = 0
        self._by_key: dict[str, Replica] = {}

    # -- inputs ---------------------------------------------------------------------
    def start(self, now: float) -> None:
        """Start every service's replicas."""
        for service in self.services.values():
            for index in range(service.desired):
                self._start(service, index, now)

    def replica(self, key: str) -> Replica | None:
        """The live replica whose identity is ``key``."""
        return self._by_key.get(key)

    def joined(self, replica: Replica, pid: int, now: float, version: str = "") -> None:
        """``replica`` said JOIN (having imported code ``version``): it serves."""
        if replica.state is not ReplicaState.STARTING:
            return
        replica.state, replica.pid, replica.serving_since = ReplicaState.SERVING, pid, now
        replica.version = version
        replica.heard = now
        service = self.services[replica.service]
        if self.stopping or service.failed:
            self._stop(replica, now)
            return
        # a rolling restart: the predecessor in this slot may go now
        for old in service.live(replica.index):
            if old is not replica and old.state is not ReplicaState.STOPPING:
                old.retiring = True
                self._stop(old, now)

    def load(self, replica: Replica, served: int, connections: int,
             now: float | None = None, rss: int | None = None, failing: int = 0,
             health: str = "", latency: list[int] | None = None,
             latency_sum: float = 0.0) -> None:
        """``replica`` reported its counts (at ``now``: it is alive; ``rss``: the
        memory its process uses, as the shell measured it then; ``failing``: its
        health checks failed so many times in a row, the last saying ``health``;
        ``latency``: its requests per bucket of LATENCY_BUCKETS, ``latency_sum``
        seconds in all; other than one count per bucket, it is not taken)."""
        replica.served, replica.connections = served, connections
        if latency is not None and len(latency) == len(LATENCY_BUCKETS) + 1:
            replica.latency, replica.latency_sum = latency, latency_sum
        if now is None:
            return
        replica.heard = now
        replica.failing, replica.health = failing, health
        if replica.worn or replica.state is not ReplicaState.SERVING or self.stopping:
            return
        spec = self.services[replica.service].spec
        if failing >= spec.health_failures:
            self._wear(replica, f"failed its health check {failing} times in a row "
                                f"({health})", now, unhealthy=True)
        elif spec.max_requests and served >= spec.max_requests + replica.jitter:
            self._wear(replica, f"served {served:,} requests (max_requests = "
                                f"{spec.max_requests:,} + {replica.jitter:,})", now)
        elif spec.max_rss and rss is not None and rss > spec.max_rss:
            self._wear(replica, f"uses {rss / 2**20:,.1f} MiB (max_rss = "
                                f"{spec.max_rss / 2**20:,.1f} MiB)", now)

    def exited(self, replica: Replica, code: int, now: float) -> None:
        """``replica``'s process ended with ``code`` (negative: the signal)."""
        if replica.state is ReplicaState.EXITED:
            return
        was = replica.state
        replica.state = ReplicaState.EXITED
        self._by_key.pop(replica.key, None)
        service = self.services[replica.service]
        service.served_gone += replica.served
        service.latency_gone.merge(replica.latency, replica.latency_sum)
        if replica.retiring or self.stopping or service.failed:
            if not replica.retiring and not self.stopping and was is not ReplicaState.STOPPING:
                self.log.append(f"{replica.label} exited ({_how(code)})")
            self._advance_roll(service, now)
            return
        if replica.index >= service.desired:  # scaled away while it was dying
            return
        self._crashed(service, replica, code, now)

    def scale(self, name: str, replicas: int, now: float) -> str:
        """Keep ``replicas`` of service ``name`` from now on. Returns what it does.

        Raises:
            KeyError: no such service (the message names the services).
            ValueError: ``replicas`` is out of range.
        """
        service = self._service(name)
        if not 0 <= replicas <= MAX_REPLICAS:
            raise ValueError(f"replicas must be in 0..{MAX_REPLICAS}, got {replicas}")
        if service.failed:
            raise ValueError(f"service {name} has failed: {service.failed}")
        before, service.desired = service.desired, replicas
        service.pool = max(service.pool, replicas) if replicas else 0
        for index in range(before, replicas):
            if not service.live(index):
                self._start(service, index, now)
        for index in range(replicas, before):
            service.pending.pop(index, None)
            for replica in service.live(index):
                replica.retiring = True
                self._stop(replica, now)
        service.rolling = [index for index in service.rolling if index < replicas]
        # the listening sockets of the replicas removed go to those that stay:
        # each one that must take some over is rolled (connections queued on
        # those sockets meanwhile wait for it, none is refused)
        for index in range(replicas):
            live = service.live(index)
            wanted = set(self.listeners_for(service, index))
            if live and not wanted <= set(live[-1].listeners) and index not in service.rolling:
                service.rolling.append(index)  # mid-roll: again once it is done
        self._advance_roll(service, now)
        self.log.append(f"{name}: scaled from {before} to {replicas} replicas")
        return f"{name}: {before} -> {replicas} replicas"

    def restart(self, name: str, now: float) -> str:
        """Roll every replica of ``name``, one at a time. Raises KeyError/ValueError."""
        service = self._service(name)
        if service.failed:
            raise ValueError(f"service {name} has failed: {service.failed}")
        if service.rolling or service.roll_index is not None:
            raise ValueError(f"service {name} is already restarting "
                             f"({len(service.rolling) + 1} replicas to go)")
        service.rolling = list(range(service.desired))
        self.log.append(f"{name}: rolling restart of {service.desired} replicas")
        self._advance_roll(service, now)
        return f"{name}: rolling restart of {service.desired} replicas"

    def reload(self, name: str, spec: ServiceSpec, now: float) -> str:
        """Take ``spec`` (service ``name`` as its topology file says now: new
        settings and params) and roll every replica onto it, as :meth:`restart`;
        a changed number of replicas is then scaled to (as :meth:`scale`). The
        address stays. Raises KeyError/ValueError, naming why."""
        service = self._service(name)
        if spec.listen != service.spec.listen:
            raise ValueError(f"{name}: its file says listen = {spec.address}, the run "
                             f"serves {service.spec.address}: a reload keeps the address")
        if service.rolling or service.roll_index is not None:
            raise ValueError(f"service {name} is already restarting")
        detail = self.restart(name, now)  # checks that it has not failed
        service.spec = spec
        detail = detail.replace("rolling restart", "reload")
        if spec.replicas != service.desired:
            detail += f", then {self.scale(name, spec.replicas, now).split(': ', 1)[1]}"
        return detail

    def stop(self, now: float) -> None:
        """Drain and stop every replica; :attr:`finished` once all exited."""
        if self.stopping:
            return
        self.stopping = True
        for service in self.services.values():
            service.pending.clear()
            service.rolling.clear()
            service.roll_index = None
        for replica in self.live():
            self._stop(replica, now)

    def fail(self, name: str, reason: str, now: float) -> None:
        """Service ``name`` cannot run at all (``reason``): the run stops."""
        service = self._service(name)
        service.failed = reason
        self.log.append(f"service {name} failed: {reason}")
        self.failure = ServiceFailed(name, f"service {name} failed: {reason}")
        service.pending.clear()
        for replica in self.live():
            replica.retiring = True
            self._stop(replica, now)
        self.stopping = True

    def poll(self, now: float) -> None:
        """Act on the time: due restarts, start and drain deadlines."""
        for service in self.services.values():
            for index, when in list(service.pending.items()):
                if when <= now:
                    del service.pending[index]
                    self._start(service, index, now)
        for replica in self.live():
            if replica.state is ReplicaState.STARTING and \
                    now - replica.started > self.start_timeout and replica.kill_at is None:
                self.log.append(f"{replica.label} did not start serving within "
                                f"{self.start_timeout:g} s: killed")
                replica.kill_at = now
                self.actions.append(KillReplica(replica))
            elif replica.state is ReplicaState.SERVING and not replica.hung and \
                    now - replica.heard > self._heartbeat(replica):
                self.log.append(f"{replica.label} (pid {replica.pid}) silent for "
                                f"{now - replica.heard:.1f} s (heartbeat = "
                                f"{self._heartbeat(replica):g} s): hung, killed")
                replica.hung = True
                replica.error = "hung"
                self.actions.append(KillReplica(replica))
            elif replica.state is ReplicaState.STOPPING and replica.kill_at is not None \
                    and now >= replica.kill_at:
                self.log.append(f"{replica.label} still running {replica_drain(self, replica):g} "
                                "s after STOP: killed")
                replica.kill_at = None
                self.actions.append(KillReplica(replica))

    def next_due(self) -> float | None:
        """When :meth:`poll` has something to do next, if ever."""
        times = [when for service in self.services.values()
                 for when in service.pending.values()]
        for replica in self.live():
            if replica.state is ReplicaState.STARTING and replica.kill_at is None:
                times.append(replica.started + self.start_timeout)
            elif replica.state is ReplicaState.SERVING and not replica.hung:
                times.append(replica.heard + self._heartbeat(replica))
            elif replica.kill_at is not None:
                times.append(replica.kill_at)
        return min(times, default=None)

    # -- state ----------------------------------------------------------------------
    def live(self) -> list[Replica]:
        """Every replica whose process has not exited, in service and index order."""
        return [replica for service in self.services.values()
                for index in sorted(service.replicas) for replica in service.live(index)]

    @property
    def finished(self) -> bool:
        """Stopping (or failed), and every process has exited."""
        return (self.stopping or self.failure is not None) and not self.live()

    def all_serving(self, name: str | None = None) -> bool:
        """Every service (or service ``name``) has its replicas serving, and none
        failed."""
        services = self.services.values() if name is None else [self.services[name]]
        return all(not service.failed and sum(
            1 for index in range(service.desired)
            if any(r.state is ReplicaState.SERVING for r in service.live(index)))
            == service.desired for service in services)

    def status(self, now: float) -> list[dict[str, Any]]:
        """One row per service: its settings and a row per live replica (what
        ``hiocluster status`` shows; the shell adds CPU and memory by pid)."""
        rows = []
        for name, service in self.services.items():
            replicas: list[dict[str, Any]] = [{
                "replica": replica.index, "incarnation": replica.incarnation,
                "pid": replica.pid, "state": replica.state.value,
                "restarts": service.restarts.get(replica.index, 0),
                "uptime": round(now - replica.serving_since, 3)
                if replica.serving_since is not None else 0.0,
                "served": replica.served, "connections": replica.connections,
                "version": replica.version, "health": _health(replica),
                "health_detail": replica.health if replica.failing else "",
                "host": replica.host,
            } for replica in self.live() if replica.service == name]
            for index, when in sorted(service.pending.items()):
                replicas.append({"replica": index, "incarnation": None, "pid": None, "host": "",
                                 "state": "backoff", "restarts": service.restarts.get(index, 0),
                                 "uptime": 0.0, "served": 0, "connections": 0,
                                 "restart_in": round(max(0.0, when - now), 3)})
            replicas.sort(key=lambda row: (row["replica"], row["incarnation"] or 0))
            latency = Latency()
            latency.merge(service.latency_gone.counts, service.latency_gone.total)
            for replica in self.live():
                if replica.service == name:
                    latency.merge(replica.latency, replica.latency_sum)
            rows.append({
                "service": name, "listen": service.spec.address, "desired": service.desired,
                "serving": sum(1 for r in replicas if r["state"] == "serving"),
                "restarts": sum(service.restarts.values()),
                "served": service.served_gone + sum(r["served"] for r in replicas),
                "rolling": len(service.rolling) + (service.roll_index is not None),
                "replaced": service.worn, "unhealthy": service.unhealthy,
                "versions": len({r["version"] for r in replicas if r["state"] == "serving"}),
                "failed": service.failed,
                "latency": {"counts": latency.counts, "sum": round(latency.total, 6)},
                "replicas": replicas,
            })
        return rows

    # -- helpers --------------------------------------------------------------------
    def _heartbeat(self, replica: Replica) -> float:
        return self.services[replica.service].spec.heartbeat

    def _service(self, name: str) -> _Service:
        if name not in self.services:
            raise KeyError(f"no service {name!r} (services: {', '.join(self.services)})")
        return self.services[name]

    def listeners_for(self, service: Any, index: int) -> tuple[int, ...]:
        """The listening sockets replica ``index`` accepts from: its own and those
        of replicas scaled away (spread over those that stay)."""
        if isinstance(service, str):
            service = self._service(service)
        desired = service.desired
        return tuple(k for k in range(service.pool)
                     if k == index or (desired and k >= desired and k % desired == index))

    def _wear(self, replica: Replica, why: str, now: float, unhealthy: bool = False) -> None:
        """``replica`` is past a lifetime limit: its successor starts in its slot,
        and it drains once that one serves (as in a rolling restart). An
        ``unhealthy`` one drains at once: its connections wait for the successor."""
        service = self.services[replica.service]
        if len(service.live(replica.index)) > 1 or replica.index == service.roll_index:
            # its slot is changing hands already: asked again at its next LOAD,
            # but an unhealthy one stops taking connections now
            if unhealthy and any(other is not replica and other.state is ReplicaState.SERVING
                                 for other in service.live(replica.index)):
                replica.retiring = True
                self._stop(replica, now)
            return
        replica.worn = True
        if unhealthy:
            service.unhealthy += 1
            service.restarts[replica.index] = service.restarts.get(replica.index, 0) + 1
        else:
            service.worn += 1
        self.log.append(f"{replica.label} {why}: replaced")
        self._start(service, replica.index, now)
        if unhealthy:
            replica.retiring = True
            self._stop(replica, now)

    def _start(self, service: _Service, index: int, now: float) -> None:
        self._incarnation += 1
        replica = Replica(service.spec.name, index, self._incarnation, now,
                          listeners=self.listeners_for(service, index))
        if service.spec.max_requests_jitter:
            replica.jitter = random.Random(replica.key).randint(
                0, service.spec.max_requests_jitter)
        service.replicas[index] = [*service.live(index), replica]
        self._by_key[replica.key] = replica
        self.actions.append(StartReplica(replica))

    def _stop(self, replica: Replica, now: float) -> None:
        if replica.state is ReplicaState.EXITED or replica.state is ReplicaState.STOPPING:
            return
        if replica.state is ReplicaState.STARTING:  # nothing to drain
            replica.state, replica.kill_at = ReplicaState.STOPPING, None
            self.actions.append(KillReplica(replica))
            return
        replica.state = ReplicaState.STOPPING
        replica.kill_at = now + replica_drain(self, replica)
        self.actions.append(StopReplica(replica))

    def _crashed(self, service: _Service, replica: Replica, code: int, now: float) -> None:
        spec = service.spec
        service.crashes.append((now, replica.index))
        while service.crashes and now - service.crashes[0][0] > spec.within:
            service.crashes.popleft()
        if len(service.crashes) > spec.max_restarts:
            failed = (f"{len(service.crashes)} crashes within {spec.within:g} s "
                      f"(max_restarts = {spec.max_restarts}); the last: "
                      f"{replica.label} {_how(code)}"
                      + (f" ({replica.error})" if replica.error else ""))
            self.fail(spec.name, failed, now)  # the whole run stops
            return
        if service.rolling or service.roll_index is not None:
            self.log.append(f"{spec.name}: rolling restart abandoned: {replica.label} "
                            f"{_how(code)}")
            service.roll_index = None
            service.rolling.clear()
        if spec.restart == "one_for_one" and any(
                other.state is not ReplicaState.STOPPING for other in service.live(replica.index)):
            # mid-roll: the other incarnation of this replica serves on, or soon will
            self.log.append(f"{replica.label} {_how(code)}; another incarnation runs")
            return
        recent = sum(1 for _, index in service.crashes if index == replica.index)
        delay = min(spec.backoff * 2 ** (recent - 1), spec.backoff_max)
        if spec.restart == "one_for_all":
            self.log.append(f"{replica.label} {_how(code)}: restarting all {spec.name} "
                            f"replicas in {delay:g} s (one_for_all)")
            for other in self.live():
                if other.service == spec.name:
                    other.retiring = True
                    self._stop(other, now)
            indexes = range(service.desired)
        else:
            self.log.append(f"{replica.label} {_how(code)}: restarting in {delay:g} s")
            indexes = range(replica.index, replica.index + 1)
        for index in indexes:
            service.restarts[index] = service.restarts.get(index, 0) + 1
            service.pending[index] = now + delay

    def _advance_roll(self, service: _Service, now: float) -> None:
        """Start the successor of the next replica to roll, once none is mid-roll."""
        current = service.roll_index
        if current is not None and len(service.live(current)) > 1:
            return  # its successor serves, or will: wait for the old one to go
        service.roll_index = None
        while service.rolling and not self.stopping:
            index = service.rolling.pop(0)
            live = service.live(index)
            if index >= service.desired:
                continue
            if not live or live[0].state is not ReplicaState.SERVING:
                if not live and index not in service.pending:
                    self._start(service, index, now)
                continue  # starting or in backoff: it is fresh anyway
            service.roll_index = index
            self._start(service, index, now)
            return


def replica_drain(core: ServiceCore, replica: Replica) -> float:
    """Seconds ``replica`` gets between STOP and SIGKILL."""
    return core.services[replica.service].spec.drain


def on_this_host(host: str) -> bool:
    """Whether a replica placed on ``host`` runs on the run's own host: "" (its
    service names no hosts) or "local"."""
    return host in ("", "local")


def _health(replica: Replica) -> str:
    """``-`` (no check), ``ok`` or ``failing N`` (N checks in a row)."""
    if not replica.health:
        return "-"
    return "ok" if not replica.failing else f"failing {replica.failing}"


def _how(code: int) -> str:
    """``exited with code 1`` / ``was killed by signal 9``."""
    if code < 0:
        return f"was killed by signal {-code}"
    return f"exited with code {code}"
