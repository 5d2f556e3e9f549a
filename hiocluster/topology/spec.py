"""The validated topology as immutable dataclasses: :class:`Topology` with its
:class:`NodeSpec`, :class:`LinkSpec`, :class:`HostSpec` and :class:`ServiceSpec`;
the placement :class:`Plan` of :class:`WorkerSpec`."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from hiocluster.errors import TopologyError
from hiocluster.topology.limits import AUTO_CREDIT_LAG, RUN_DEFAULTS
from hiocluster.topology.lines import locate_error
from hiocluster.topology.values import run_value


@dataclass(frozen=True)
class NodeSpec:
    """One node: its unique name, its class as ``"module:attr"`` and its params.

    ``table`` is the ``[nodes.<table>]`` key that declared it (differs from
    ``name`` when ``count`` expanded it); empty when built by hand. ``index``
    and ``count``: where ``count`` made it, its number and how many there are.
    """

    name: str
    cls: str
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    table: str = field(default="", repr=False, compare=False)
    index: int | None = None      # made by ``count``: its number, 0 .. count-1
    count: int | None = None      # made by ``count``: how many its table made


@dataclass(frozen=True)
class LinkSpec:
    """A directed link ``source.outbox -> target.inbox``; ``id`` is its canonical rank.

    ``entry`` is the index of the ``[[links]]`` table that made it (-1 if none).
    """

    id: int
    source: str
    outbox: str
    target: str
    inbox: str
    capacity: int
    entry: int = field(default=-1, repr=False, compare=False)
    origin: str = field(default="", repr=False, compare=False)  # "links[3]", "patterns[0]"

    @property
    def label(self) -> str:
        """``"a.out -> b.in"``."""
        return f"{self.source}.{self.outbox} -> {self.target}.{self.inbox}"


@dataclass(frozen=True)
class Topology:
    """A validated topology. Nodes keep declaration order; links are canonical.

    ``source`` keeps the TOML text so later errors (see resolve_classes) can
    name a line.
    """

    name: str
    path: str | None
    ticks: int
    tock: float
    t0: float
    seed: int
    tick_timeout: float
    capacity: int
    real: bool
    nodes: tuple[NodeSpec, ...]
    links: tuple[LinkSpec, ...]
    placement: tuple[tuple[str, tuple[str, ...]], ...] | None
    hosts: tuple[HostSpec, ...] = ()
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    services: tuple[ServiceSpec, ...] = ()
    digest_every: int = 1
    checkpoint_every: int = 0         # ticks between checkpoints with --checkpoint (0: 1000)
    credit_lag: int | None = None     # None: "auto", see :attr:`lag`
    transport: str = "ipc"
    metrics: str = ""                 # where the Prometheus endpoint listens ("": none)
    observe_every: int = 1            # nodes' observe() every k ticks (0: never)
    restart: str = "none"             # or "checkpoint": roll back and go on (see RUN_RESTARTS)
    max_restarts: int = 3             # ... at most this many times ...
    within: float = 60.0              # ... in this many seconds
    source: str | None = field(default=None, repr=False, compare=False)
    #: node classes that travel by value (defined in ``__main__``: a script, a
    #: notebook): their ``class`` path -> the class (see hiocluster.topology.build)
    classes: dict[str, type] = field(default_factory=dict, repr=False, compare=False)
    _by_name: dict[str, NodeSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {node.name: node for node in self.nodes})

    def node(self, name: str) -> NodeSpec:
        """Return the node called ``name``. Raises KeyError if there is none."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no node named {name!r}") from None

    @property
    def lag(self) -> int:
        """The credit lag the run uses: ``credit_lag``, or with "auto" the largest of
        1 .. AUTO_CREDIT_LAG that leaves every link 4 x lag of capacity (so a link
        fed one message a tick never waits for credit)."""
        if self.credit_lag is not None:
            return self.credit_lag
        smallest = min((link.capacity for link in self.links), default=self.capacity)
        return max(1, min(AUTO_CREDIT_LAG, smallest // 4))

    def replace(self, **changes: Any) -> Topology:
        """Return a copy with ``changes`` applied; run settings are re-validated.

        Raises:
            TopologyError: a run setting is invalid (key path ``run.<key>``).
        """
        try:
            for key in RUN_DEFAULTS:
                if key in changes:
                    changes[key] = run_value(key, changes[key])
        except TopologyError as exc:
            locate_error(exc, None, self.path)
            raise
        return dataclasses.replace(self, **changes)


#: ``ssh://[USER@]HOST[:PORT]``: a host whose agent the supervisor starts over SSH.
SSH_AGENT = re.compile(r"ssh://(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9._-]*)@)?"
                       r"(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*)"
                       r"(?::(?P<port>\d{1,5}))?")


@dataclass(frozen=True)
class SshTarget:
    """Where ``ssh`` logs in: ``[user@]host``, and a port if not 22."""

    host: str
    user: str | None = None
    port: int | None = None

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


#: ``slurm://NODE``: a host whose agent the supervisor starts as a job step on
#: Slurm node NODE of the allocation it runs in.
SLURM_AGENT = re.compile(r"slurm://(?P<node>[A-Za-z0-9][A-Za-z0-9._-]*)")


@dataclass(frozen=True)
class SlurmTarget:
    """The Slurm node whose job step runs a host's agent."""

    node: str


@dataclass(frozen=True)
class HostSpec:
    """Another host: the agent that starts workers there, and which workers.
    ``agent``: ``tcp://HOST:PORT`` (an agent started by hand),
    ``ssh://[USER@]HOST[:PORT]`` (the supervisor starts one over SSH), or
    ``slurm://NODE`` (the supervisor starts one as a Slurm job step there)."""

    name: str
    agent: str
    workers: tuple[str, ...]      # worker names (placement keys, or p0.. with --processes)

    @property
    def ssh(self) -> SshTarget | None:
        found = SSH_AGENT.fullmatch(self.agent)
        if found is None:
            return None
        return SshTarget(found["host"], found["user"],
                         int(found["port"]) if found["port"] else None)

    @property
    def started(self) -> SshTarget | SlurmTarget | None:
        """How the supervisor starts this host's agent itself; None: someone else
        did, and it listens at ``agent``."""
        found = SLURM_AGENT.fullmatch(self.agent)
        return SlurmTarget(found["node"]) if found else self.ssh


@dataclass(frozen=True)
class ServiceSpec:
    """``[services.NAME]``: replicas of a node class serving on one address (see
    hiocluster.service). ``tls``: ``(certificate, key)`` file paths, made absolute
    against the topology file's directory."""

    name: str
    cls: str
    listen: tuple[str, int]
    replicas: int = 1
    restart: str = "one_for_one"    # or "one_for_all"
    max_restarts: int = 5           # at most this many restarts ...
    within: float = 10.0            # ... in this many seconds, else the service fails
    backoff: float = 0.1            # seconds before a restart, doubling per recent crash
    backoff_max: float = 5.0
    timeout: float = 60.0           # idle connection / slow request limit (0: none)
    drain: float = 5.0              # seconds a stopping replica gets to finish
    heartbeat: float = 5.0          # a serving replica silent this long is hung: killed
    max_body: int = 1 << 20         # largest HTTP request body, bytes (413 beyond)
    spare: bool = True              # keep a warm standby process (fast restarts)
    max_requests: int = 0           # a replica that served this many is replaced (0: never)
    max_requests_jitter: int = 0    # ... plus 0..this, drawn per replica start
    max_rss: int = 0                # a replica using more memory (bytes) is replaced (0: never)
    access_log: str = ""            # HTTP: a line per request to this file ("-": the output)
    access_log_format: str = "common"   # or "json"
    health_path: str = ""           # HTTP: a path the replica asks its app (2xx/3xx: healthy)
    health_interval: float = 1.0    # seconds between a replica's health checks
    health_failures: int = 3        # failed in a row this often: replaced
    tls: tuple[str, str] | None = None
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    #: the hosts its replicas run on (``[hosts]`` names, "local" this one), each
    #: serving ``listen`` there; none: this host only
    hosts: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        """``host:port``."""
        return f"{self.listen[0]}:{self.listen[1]}"

    def to_json(self) -> dict[str, Any]:
        """JSON-able fields (what a replica process is started with)."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ServiceSpec:
        body = dict(body)
        body["listen"] = tuple(body["listen"])
        body["hosts"] = tuple(body.get("hosts", ()))
        if body.get("tls") is not None:
            body["tls"] = tuple(body["tls"])
        return cls(**body)


@dataclass(frozen=True)
class WorkerSpec:
    """One worker (one OS process with one Doist) and the nodes it hosts, in
    declaration order."""

    name: str
    nodes: tuple[NodeSpec, ...]

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(node.name for node in self.nodes)


@dataclass(frozen=True)
class Plan:
    """Which worker hosts which node. Every node is in exactly one worker."""

    workers: tuple[WorkerSpec, ...]
    #: worker or group -> the host it runs on; those on no host run on this one
    hosts: dict[str, HostSpec] = field(default_factory=dict, hash=False, compare=False)
    #: group -> its members (workers and groups): each group is a sub-supervisor
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False,
                                               compare=False)
    _index: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, str] = {}
        names: set[str] = set()
        for worker in self.workers:
            if worker.name in names:
                raise TopologyError(f"duplicate worker name {worker.name!r}",
                                    key_path="placement")
            names.add(worker.name)
            for node in worker.nodes:
                if node.name in index:
                    raise TopologyError(f"node {node.name!r} is in workers "
                                        f"{index[node.name]!r} and {worker.name!r}",
                                        key_path="placement")
                index[node.name] = worker.name
        object.__setattr__(self, "_index", index)

    def worker_of(self, node: str) -> str:
        """Return the name of the worker hosting ``node``. Raises KeyError."""
        try:
            return self._index[node]
        except KeyError:
            raise KeyError(f"no node named {node!r}") from None

    @property
    def node_to_worker(self) -> dict[str, str]:
        """A fresh ``{node: worker}`` dict."""
        return dict(self._index)

    @property
    def top(self) -> tuple[str, ...]:
        """The root supervisor's children: workers and groups in no group."""
        inside = {member for members in self.groups.values() for member in members}
        return tuple(name for name in [*self.groups, *(w.name for w in self.workers)]
                     if name not in inside)

    def leaves(self, member: str) -> tuple[str, ...]:
        """The workers under ``member`` (itself, for a worker)."""
        if member not in self.groups:
            return (member,)
        return tuple(leaf for child in self.groups[member] for leaf in self.leaves(child))

    def below(self, group: str) -> tuple[str, ...]:
        """Every worker and group under ``group``, however deep."""
        return tuple(name for child in self.groups[group]
                     for name in (child, *(self.below(child) if child in self.groups else ())))

    def tree(self, member: str) -> Any:
        """``member`` as a sub-supervisor sees it: a worker -> its node names, a group ->
        {child: tree} (JSON-able; travels to the group's process)."""
        if member not in self.groups:
            return list(self.worker(member).node_names)
        return {child: self.tree(child) for child in self.groups[member]}

    def worker(self, name: str) -> WorkerSpec:
        for worker in self.workers:
            if worker.name == name:
                return worker
        raise KeyError(f"no worker named {name!r}")

    def crossing(self, links: Iterable[LinkSpec]) -> int:
        """How many of ``links`` join two different workers."""
        index = self._index
        return sum(1 for link in links if index[link.source] != index[link.target])
