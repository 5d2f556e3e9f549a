"""The protocol's messages: one dataclass per frame type, with its field checks.

docs/protocol.md §3 is the table these classes implement; keep the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from hiocluster.protocol.fields import (
    ADDRESS,
    ANY,
    BOOL,
    BYTES,
    COUNT,
    CREDIT_LAG,
    CURVE_KEY,
    INT,
    NAME,
    NUMBER,
    PATH,
    POSITIVE,
    STATS,
    TEXT,
    TOKEN,
    UINT,
    Check,
    LinkRun,
    ListOf,
    MapOf,
    TupleOf,
    optional,
)

__all__ = ["Message", "Hello", "Setup", "Ready", "Grant", "Progress", "Done", "Stop", "Bye",
           "Chunk",
           "Error", "Data", "Peer", "Launch", "Launched", "Signal", "Exited", "Output",
           "Ping", "Close", "Join", "Load", "Standby", "Assign", "Command", "Answer",
           "MESSAGE_TYPES", "TO_AGENT",
           "FROM_AGENT", "FROM_REPLICA", "TO_REPLICA", "COMMANDS", "NODE_ROW", "LINK_ROW",
           "METRIC_KINDS"]


@dataclass(slots=True)
class Message:
    """Base of every frame type. Subclasses list their fields with validators."""

    TYPE: ClassVar[str] = ""
    SCHEMA: ClassVar[dict[str, Check]] = {}
    #: the fields of its usual frame, where that is not every field: such a frame
    #: is taken on the fast path (frames.decode ``expect``)
    PLAIN: ClassVar[dict[str, Check] | None] = None

    def to_body(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.SCHEMA}


@dataclass(slots=True)
class Hello(Message):
    """worker → supervisor, first on the connection: who I am (proved by the run's
    ``token``), what I run on, where my neighbours send me DATA. A sub-supervisor
    (a group) has no data socket: ``leaves`` says where each worker under it
    listens."""

    TYPE = "HELLO"
    worker: str
    token: bytes
    pid: int
    versions: dict[str, str]
    data_address: str | None = None
    leaves: dict[str, str] = field(default_factory=dict)
    SCHEMA = {"worker": NAME, "token": TOKEN, "pid": UINT, "versions": MapOf(NAME, TEXT),
              "data_address": optional(ADDRESS), "leaves": MapOf(NAME, ADDRESS)}


#: ``[name, "module:attr", params, index, count]``: one node this worker builds
#: (``index``/``count``: nil unless ``count`` made it).
NODE_ROW = TupleOf(NAME, TEXT, Check(lambda v: type(v) is dict, "a map"), optional(UINT),
                   optional(UINT))
#: ``[id, source, outbox, target, inbox, capacity, source worker, target worker]``.
LINK_ROW = TupleOf(UINT, NAME, NAME, NAME, NAME, UINT, NAME, NAME)


@dataclass(slots=True)
class Setup(Message):
    """supervisor → worker: the run's clock and seed, this worker's nodes, the links
    that touch them, where each neighbour worker listens and, over tcp, each
    neighbour's CURVE public key. To a sub-supervisor: ``leaves`` holds the SETUP
    body of every worker under it (its own nodes, links and peers are empty)."""

    TYPE = "SETUP"
    t0: float
    tock: float
    seed: int
    ticks: int
    real: bool
    tick_timeout: float
    nodes: list[list[Any]]
    links: list[list[Any]]
    peers: dict[str, str]
    keys: dict[str, str] = field(default_factory=dict)
    leaves: dict[str, dict[str, Any]] = field(default_factory=dict)
    trace: bool = False
    digest_every: int = 1
    credit_lag: int = 1
    resume: str = ""
    record: str = ""
    observe_every: int = 0   # ask nodes' observe() every this many ticks (0: never)
    #: node classes that travel by value: their class path -> the class, pickled
    #: (cloudpickle; only ever from the supervisor that started this worker)
    classes: dict[str, bytes] = field(default_factory=dict)
    SCHEMA = {"t0": NUMBER, "tock": POSITIVE, "seed": UINT, "ticks": UINT, "real": BOOL,
              "tick_timeout": POSITIVE, "nodes": ListOf(NODE_ROW), "links": ListOf(LINK_ROW),
              "peers": MapOf(NAME, ADDRESS), "keys": MapOf(NAME, CURVE_KEY),
              "leaves": MapOf(NAME, Check(lambda v: type(v) is dict, "a map")),
              "trace": BOOL, "digest_every": COUNT, "credit_lag": CREDIT_LAG,
              "resume": PATH, "record": PATH, "observe_every": UINT,
              "classes": MapOf(TEXT, BYTES)}

    def to_body(self) -> dict[str, Any]:
        """``resume`` and ``record`` only when there is one."""
        body = {name: getattr(self, name) for name in self.SCHEMA}
        for name in ("resume", "record"):
            if not body[name]:
                del body[name]
        return body

    def for_group(self, leaves: dict[str, dict[str, Any]]) -> Setup:
        """The SETUP of a sub-supervisor: this run-wide part, and ``leaves`` (the SETUP
        body of every worker under it); no nodes, links or peers of its own."""
        return Setup(t0=self.t0, tock=self.tock, seed=self.seed, ticks=self.ticks,
                     real=self.real, tick_timeout=self.tick_timeout,
                     digest_every=self.digest_every, credit_lag=self.credit_lag, nodes=[],
                     links=[], peers={}, leaves=leaves, resume=self.resume)


@dataclass(slots=True)
class Ready(Message):
    """worker → supervisor: nodes built and entered, every neighbour connected;
    ``digests``: the state after set-up (see docs/protocol.md §7)."""

    TYPE = "READY"
    digests: bytes
    SCHEMA = {"digests": BYTES}


@dataclass(slots=True)
class Grant(Message):
    """supervisor → worker: run every tick up to and including ``until``.

    ``start`` (real-time runs, first GRANT only): the wall-clock time (seconds
    since the epoch) at which tick 0 starts. ``checkpoint``: a directory: after
    tick ``until``, write this worker's share of a checkpoint there before DONE.
    """

    TYPE = "GRANT"
    until: int
    start: float | None = None
    checkpoint: str = ""
    SCHEMA = {"until": UINT, "start": optional(NUMBER), "checkpoint": PATH}

    def to_body(self) -> dict[str, Any]:
        """``checkpoint`` only when there is one: a GRANT is the hottest frame."""
        body: dict[str, Any] = {"until": self.until, "start": self.start}
        if self.checkpoint:
            body["checkpoint"] = self.checkpoint
        return body


@dataclass(slots=True)
class Progress(Message):
    """worker → supervisor, at most every PROGRESS_S while a window runs: the last
    tick done (nil: none yet) and the neighbours whose frames it is waiting for."""

    TYPE = "PROGRESS"
    tick: int | None
    waiting: list[str]
    SCHEMA = {"tick": optional(UINT), "waiting": ListOf(NAME)}


@dataclass(slots=True)
class Done(Message):
    """worker → supervisor: every tick up to ``until`` ran; ``digests`` holds the
    state after each tick of the window, one digest record per tick."""

    TYPE = "DONE"
    until: int
    digests: bytes
    #: what the nodes' observe() said in the window: a bin per worker (a group's:
    #: one of each worker under it), hiocluster.protocol.observed
    observed: list[bytes] = field(default_factory=list)
    #: the tick from which the worker observes no more, full (-1: none)
    observed_cut: int = -1
    SCHEMA = {"until": UINT, "digests": BYTES, "observed": ListOf(BYTES),
              "observed_cut": INT}
    PLAIN = {"until": UINT, "digests": BYTES}

    def to_body(self) -> dict[str, Any]:
        """``observed`` and ``observed_cut`` only when there are some."""
        if not self.observed and self.observed_cut < 0:
            return {"until": self.until, "digests": self.digests}
        return Message.to_body(self)


@dataclass(slots=True)
class Stop(Message):
    """supervisor → worker: stop. ``drain``: the run finished, so collect the last
    tick's frames (counted as undelivered) before saying BYE."""

    TYPE = "STOP"
    reason: str
    drain: bool = False
    SCHEMA = {"reason": TEXT, "drain": BOOL}


#: What a metric is: a counter is summed over nodes and shown with a rate; a
#: gauge or a duration is shown per node (min, mean, max), without a rate.
METRIC_KINDS = ("counter", "gauge", "duration")


@dataclass(slots=True)
class Bye(Message):
    """worker → supervisor: exit contexts ran; counters, the sum of its nodes'
    counter metrics (:meth:`Node.metrics`), and how many DATA frames arrived from
    each neighbour; after a finished run, each node's :meth:`Node.result` and
    metrics, and the kind of each metric that is not a counter."""

    TYPE = "BYE"
    stats: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    node_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    trace: dict[str, list[Any]] = field(default_factory=dict)
    SCHEMA = {"stats": STATS, "metrics": STATS, "received": MapOf(NAME, UINT),
              "trace": MapOf(NAME, ListOf(ANY)),
              "results": MapOf(NAME, ANY), "node_metrics": MapOf(NAME, MapOf(NAME, NUMBER)),
              "kinds": MapOf(NAME, Check(lambda v: v in METRIC_KINDS,
                                         f"one of {', '.join(METRIC_KINDS)}"))}


@dataclass(slots=True)
class Chunk(Message):
    """worker → supervisor: a piece of a BYE frame over :data:`MAX_CONTROL_FRAME` (a
    finished run's large results). The pieces' ``data``, joined in order, are the
    BYE frame; ``more`` is false on the last."""

    TYPE = "CHUNK"
    data: bytes
    more: bool
    SCHEMA = {"data": BYTES, "more": BOOL}


@dataclass(slots=True)
class Error(Message):
    """either way: something failed. ``field`` names the offending field, if any;
    ``node`` the node whose code failed; ``peer`` the neighbour that sent a bad
    DATA frame (a worker blames it rather than itself). From a sub-supervisor
    (code ``subtree``, ``field`` the failure's kind): ``worker`` the worker under
    it that failed, ``cause`` why, ``exitcode`` if its process died."""

    TYPE = "ERROR"
    code: str
    detail: str
    field: str = ""
    tick: int | None = None
    node: str | None = None
    peer: str | None = None
    worker: str | None = None
    exitcode: int | None = None
    cause: str | None = None
    SCHEMA = {"code": TEXT, "detail": TEXT, "field": TEXT, "tick": optional(UINT),
              "node": optional(NAME), "peer": optional(NAME), "worker": optional(NAME),
              "exitcode": optional(INT), "cause": optional(TEXT)}


@dataclass(slots=True)
class Data(Message):
    """worker → worker: everything one worker sent another during ``tick``.

    ``messages`` rows are ``[link id, [sequence, ...], [payload, ...]]``: one row
    per link, its messages in send order, sequences and payloads side by side.
    ``acks`` rows ``[link id, count]`` return credit: how many messages the
    sender took out of that link's inbox during ``tick``. Sent every tick to
    every neighbour, empty when there is nothing to say.
    """

    TYPE = "DATA"
    tick: int
    source: str
    messages: list[list[Any]]
    acks: list[list[int]]
    SCHEMA = {"tick": UINT, "source": NAME, "messages": ListOf(LinkRun()),
              "acks": ListOf(TupleOf(UINT, UINT))}


@dataclass(slots=True)
class Peer(Message):
    """worker → worker, first on every data connection: who is sending (proved by
    the run's ``token``). Every later frame on that connection is its."""

    TYPE = "PEER"
    worker: str
    token: bytes
    SCHEMA = {"worker": NAME, "token": TOKEN}


# -- a supervisor and a host's agent (docs/protocol.md §10) ----------------------


@dataclass(slots=True)
class Launch(Message):
    """supervisor → agent: start worker ``worker`` on the agent's host, connecting
    to ``connect`` with ``credentials`` (JSON text: they travel encrypted); with
    ``tree`` (JSON), a sub-supervisor of that subtree instead; with ``service``
    (a service's spec, JSON), replica ``worker`` (SERVICE.REPLICA.INCARNATION) of
    it, serving on the agent's listening sockets ``listeners`` for that service
    (positions: the agent opens each on first use and holds it for the run)."""

    TYPE = "LAUNCH"
    worker: str
    connect: str
    credentials: str
    tree: str | None = None
    service: str | None = None
    listeners: list[int] | None = None
    SCHEMA = {"worker": NAME, "connect": ADDRESS, "credentials": TEXT, "tree": optional(TEXT),
              "service": optional(TEXT), "listeners": optional(ListOf(UINT))}


@dataclass(slots=True)
class Launched(Message):
    """agent → supervisor: the worker's process runs, as ``pid`` on the host."""

    TYPE = "LAUNCHED"
    worker: str
    pid: int
    SCHEMA = {"worker": NAME, "pid": UINT}


@dataclass(slots=True)
class Signal(Message):
    """supervisor → agent: ``terminate`` (SIGTERM) or ``kill`` (SIGKILL) a worker."""

    TYPE = "SIGNAL"
    worker: str
    signal: str
    SCHEMA = {"worker": NAME, "signal": Check(lambda v: v in ("terminate", "kill"),
                                              "'terminate' or 'kill'")}


@dataclass(slots=True)
class Close(Message):
    """supervisor → agent: close the agent's listening sockets ``listeners``
    (positions) of service ``service``: no replica of it serves from them on
    this host any more (the service was scaled down). A replica still draining
    keeps its own descriptor; a position the agent does not hold is no error."""

    TYPE = "CLOSE"
    service: str
    listeners: list[int]
    SCHEMA = {"service": NAME, "listeners": ListOf(UINT)}


@dataclass(slots=True)
class Exited(Message):
    """agent → supervisor: a worker's process ended (``exitcode`` negative: the
    signal); ``tick``: the tick it was working on (its tick register)."""

    TYPE = "EXITED"
    worker: str
    exitcode: int
    tick: int | None = None
    SCHEMA = {"worker": NAME, "exitcode": INT, "tick": optional(UINT)}


@dataclass(slots=True)
class Output(Message):
    """agent → supervisor: lines a worker wrote on its stderr."""

    TYPE = "OUTPUT"
    worker: str
    text: str
    SCHEMA = {"worker": NAME, "text": TEXT}


@dataclass(slots=True)
class Ping(Message):
    """agent → supervisor, every 0.1 s: the agent still hears the supervisor (a send
    to a connection that is gone fails, so the agent knows whose workers to stop)."""

    TYPE = "PING"
    SCHEMA = {}


# -- a service's replicas, and the run's control endpoint (docs/protocol.md §12) ----


@dataclass(slots=True)
class Join(Message):
    """replica → supervisor, once its servers listen: which replica of which service
    (``incarnation`` counts its starts), proved by the run's ``token``."""

    TYPE = "JOIN"
    service: str
    replica: int
    incarnation: int
    token: bytes
    pid: int
    version: str = ""   # the code it imported (hiocluster.services.replica.code_version)
    SCHEMA = {"service": NAME, "replica": UINT, "incarnation": UINT, "token": TOKEN,
              "pid": UINT, "version": TEXT}


@dataclass(slots=True)
class Load(Message):
    """replica → supervisor, at most every LOAD_S while it serves: responses (or
    messages) served so far and connections open now."""

    TYPE = "LOAD"
    served: int
    connections: int
    failing: int = 0    # its health checks failed this many times in a row (now)
    health: str = ""    # "" no check, "ok", or what the last failed check said
    latency: list[int] = field(default_factory=list)  # requests per latency bucket
    latency_sum: float = 0.0                          # their seconds in all
    SCHEMA = {"served": UINT, "connections": UINT, "failing": UINT, "health": TEXT,
              "latency": ListOf(UINT), "latency_sum": NUMBER}


@dataclass(slots=True)
class Standby(Message):
    """a spare → the run, once its service's code is imported: ready to become a
    replica at once (proved by the run's ``token``)."""

    TYPE = "STANDBY"
    service: str
    token: bytes
    pid: int
    SCHEMA = {"service": NAME, "token": TOKEN, "pid": UINT}


@dataclass(slots=True)
class Assign(Message):
    """the run → a spare: become replica ``replica`` (its ``incarnation``-th start),
    accepting from the service's listening sockets ``listeners`` (positions in
    the spare's inherited descriptors)."""

    TYPE = "ASSIGN"
    replica: int
    incarnation: int
    listeners: list[int]
    SCHEMA = {"replica": UINT, "incarnation": UINT, "listeners": ListOf(UINT)}


#: What a shell may ask of a run's control endpoint.
COMMANDS = ("status", "scale", "restart", "reload", "stop")


@dataclass(slots=True)
class Command(Message):
    """a shell (``hiocluster status|scale|restart|stop``) → the run's endpoint."""

    TYPE = "COMMAND"
    command: str
    service: str | None = None
    replicas: int | None = None
    SCHEMA = {"command": Check(lambda v: v in COMMANDS, f"one of {', '.join(COMMANDS)}"),
              "service": optional(NAME), "replicas": optional(UINT)}


@dataclass(slots=True)
class Answer(Message):
    """the run's endpoint → the shell: done (``ok``) or why not; ``status``: the
    run's state (docs/protocol.md §12)."""

    TYPE = "ANSWER"
    ok: bool
    detail: str
    status: dict[str, Any] = field(default_factory=dict)
    SCHEMA = {"ok": BOOL, "detail": TEXT,
              "status": Check(lambda v: type(v) is dict, "a map")}


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Hello, Setup, Ready, Grant, Progress, Done, Stop, Bye, Chunk,
                              Error,
                              Data, Peer, Launch, Launched, Signal, Close, Exited, Output,
                              Ping,
                              Join, Load, Standby, Assign, Command, Answer)
}
#: What an agent accepts, and what a supervisor accepts from an agent.
TO_AGENT = (Launch, Signal, Close, Error)
FROM_AGENT = (Launched, Exited, Output, Ping, Error)
#: What a supervisor accepts from a replica, and a replica from its supervisor.
FROM_REPLICA = (Join, Load, Standby, Bye, Error)
TO_REPLICA = (Stop, Assign, Error)
