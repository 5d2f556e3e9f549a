"""Topology files: TOML text -> validated, immutable dataclasses -> placement plan.

Owns the topology file format (``[run]``, ``[nodes.*]``, ``[[links]]``,
``[placement]``, ``[groups]``, ``[hosts.*]``, ``[services.*]``), its validation with errors that name the key path and, where it
can be found, the line; ``count`` expansion of nodes, glob expansion of links and
their canonical ids; and the mapping of nodes onto workers (:func:`plan`).

Imports only the stdlib and hiocluster.errors at module level; never zmq, msgpack
or hio. ``hiocluster.node`` is imported inside :func:`resolve_classes` only.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import fnmatch
import hashlib
import heapq
import math
import os
import random
import re
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from hiocluster.errors import TopologyError
from hiocluster.protocol.fields import MAX_CREDIT_LAG

__all__ = [
    "NodeSpec",
    "LinkSpec",
    "Topology",
    "HostSpec",
    "WorkerSpec",
    "ServiceSpec",
    "Plan",
    "loads",
    "load",
    "plan",
    "resolve_classes",
    "resolve_services",
]

NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
BOX_NAME = NODE_NAME
WORKER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
CLASS_PATH = re.compile(f"{_DOTTED}:{_DOTTED}")
_PATTERN = re.compile(r"[A-Za-z0-9_*?\[\]!-]+")
MAX_COUNT = 100_000
SEED_LIMIT = 2**63
#: Deepest nesting of ``[groups]``: a group inside a group ... this many deep (a
#: process per level; the bound keeps hostile trees from exhausting recursion).
MAX_GROUP_DEPTH = 64
#: Most replicas one service may have (in the file, and through ``hiocluster scale``).
MAX_REPLICAS = 256
#: Restart strategies of a service, as Erlang/OTP names them.
RESTART_POLICIES = ("one_for_one", "one_for_all")

#: Most ticks between a message's take and its credit at the source that ``[run]
#: credit_lag = "auto"`` (the default) picks: with more, a worker waits less often on
#: the neighbours it only sends to; links need about 2 x lag capacity to flow freely.
AUTO_CREDIT_LAG = 8

_RUN_DEFAULTS: dict[str, int | float | bool | str] = {
    "ticks": 100, "tock": 1.0, "t0": 0.0, "seed": 0, "tick_timeout": 30.0, "capacity": 1024,
    "real": False, "digest_every": 1, "credit_lag": "auto", "transport": "ipc",
}
#: How the workers of one host talk (``[run] transport``, ``--transport``): ZeroMQ over
#: unix sockets or TCP on loopback, or ``local``: ZeroMQ for control and Unix-domain
#: SEQPACKET sockets for DATA (hiocluster.localnet; one host, no CurveZMQ).
RUN_TRANSPORTS = ("ipc", "tcp", "local")


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
    credit_lag: int | None = None     # None: "auto", see :attr:`lag`
    transport: str = "ipc"
    source: str | None = field(default=None, repr=False, compare=False)
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
            for key in _RUN_DEFAULTS:
                if key in changes:
                    changes[key] = _run_value(key, changes[key])
        except TopologyError as exc:
            _place(exc, None, self.path)
            raise
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class HostSpec:
    """Another host: the agent that starts workers there, and which workers."""

    name: str
    agent: str                    # tcp://HOST:PORT
    workers: tuple[str, ...]      # worker names (placement keys, or p0.. with --processes)


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
    tls: tuple[str, str] | None = None
    params: dict[str, Any] = field(default_factory=dict, hash=False)

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


# --- value checks: each raises TopologyError(key_path=...) without a line ---------

def _err(message: str, key_path: str) -> TopologyError:
    return TopologyError(message, key_path=key_path)


def _type_name(value: object) -> str:
    names = {bool: "bool", dict: "table", list: "array", datetime.datetime: "datetime",
             datetime.date: "date", datetime.time: "time"}
    return names.get(type(value), type(value).__name__)


def _int(value: object, key_path: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(f"expected int, got {_type_name(value)}", key_path)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise _err(f"must be {bound}, got {value}", key_path)
    return value


def _number(value: object, key_path: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(f"expected number, got {_type_name(value)}", key_path)
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _err(f"must be finite, got {value}", key_path)
    if positive and number <= 0:
        raise _err(f"must be > 0, got {value}", key_path)
    return number


def _str(value: object, key_path: str) -> str:
    if not isinstance(value, str):
        raise _err(f"expected str, got {_type_name(value)}", key_path)
    return value


def _table(value: object, key_path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _err(f"expected table, got {_type_name(value)}", key_path)
    return value


def _array(value: object, key_path: str) -> list[Any]:
    if not isinstance(value, list):
        raise _err(f"expected array, got {_type_name(value)}", key_path)
    return value


def _suggest(word: str, choices: Iterable[str]) -> str:
    """"; did you mean 'x'?" for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _keys(table: dict[str, Any], allowed: tuple[str, ...], prefix: str,
          required: tuple[str, ...] = ()) -> None:
    for key in table:
        if key not in allowed:
            raise _err(f"unknown key {key!r}{_suggest(key, allowed)}", _join(prefix, key))
    for key in required:
        if key not in table:
            raise _err(f"missing required key {key!r}", prefix)


def _run_value(key: str, value: object) -> int | float | bool | str | None:
    key_path = f"run.{key}"
    if key == "transport":
        if value not in RUN_TRANSPORTS:
            raise _err(f"expected one of {', '.join(RUN_TRANSPORTS)}, got {value!r}", key_path)
        return str(value)
    if key == "real":
        if not isinstance(value, bool):
            raise _err(f"expected bool, got {_type_name(value)}", key_path)
        return value
    if key in ("ticks", "capacity", "digest_every"):
        return _int(value, key_path, 1)
    if key == "credit_lag":
        if value == "auto" or value is None:
            return None
        if isinstance(value, str):
            raise _err(f'expected an int or "auto", got {value!r}', key_path)
        return _int(value, key_path, 1, MAX_CREDIT_LAG)
    if key == "seed":
        return _int(value, key_path, 0, SEED_LIMIT - 1)
    return _number(value, key_path, positive=key != "t0")


def _plain(value: object, key_path: str) -> Any:
    """Deep-copy a params value, rejecting TOML dates and times."""
    if isinstance(value, dict):
        return {key: _plain(item, _join(key_path, key)) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item, f"{key_path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        raise _err(f"{_type_name(value)} values are not allowed in params", key_path)
    return value


def _name(value: str, pattern: re.Pattern[str], what: str, key_path: str) -> str:
    if not pattern.fullmatch(value):
        raise _err(f"invalid {what} name {value!r}: must match {pattern.pattern}", key_path)
    return value


def _is_glob(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


def _match(pattern: str, names: dict[str, int], key_path: str) -> list[str]:
    """The node names ``pattern`` means; ``names``: every node -> its declaration index."""
    if _is_glob(pattern):
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise _err(f"pattern {pattern!r} matches no node", key_path)
        return matched
    if pattern not in names:
        raise _err(f"no node named {pattern!r}{_suggest(pattern, names)}", key_path)
    return [pattern]


def _endpoint(value: object, key_path: str) -> tuple[str, str]:
    text = _str(value, key_path)
    node, dot, box = text.rpartition(".")
    if not dot or not _PATTERN.fullmatch(node):
        raise _err(f"expected 'node.box', got {text!r}", key_path)
    return node, _name(box, BOX_NAME, "box", key_path)


# --- the sections -----------------------------------------------------------------

def _run(document: dict[str, Any]) -> dict[str, Any]:
    run = _table(document.get("run", {}), "run")
    _keys(run, tuple(_RUN_DEFAULTS), "run")
    return {key: _run_value(key, run.get(key, default)) for key, default in _RUN_DEFAULTS.items()}


def _nodes(document: dict[str, Any]) -> tuple[NodeSpec, ...]:
    raw = _table(document.get("nodes", {}), "nodes")
    if not raw and not document.get("services"):
        raise _err("at least one node (or service) is required", "nodes")
    declared_by: dict[str, str] = {}
    nodes: list[NodeSpec] = []
    for key, body in raw.items():
        key_path = f"nodes.{key}"
        _name(key, NODE_NAME, "node", key_path)
        _keys(_table(body, key_path), ("class", "params", "count", "per_index"), key_path,
              ("class",))
        cls = _str(body["class"], f"{key_path}.class")
        if not CLASS_PATH.fullmatch(cls):
            raise _err(f"expected 'module.path:attr', got {cls!r}", f"{key_path}.class")
        params = _table(body.get("params", {}), f"{key_path}.params")
        names = [key]
        count = None
        if "count" in body:
            count = _int(body["count"], f"{key_path}.count", 1, MAX_COUNT)
            width = len(str(count - 1))
            names = [f"{key}{i:0{width}d}" for i in range(count)]
        per_index = _per_index(body, count, key_path)
        for i, name in enumerate(names):
            _name(name, NODE_NAME, "node", key_path)
            if name in declared_by:
                raise _err(f"duplicate node name {name!r} (also declared by "
                           f"{declared_by[name]})", key_path)
            declared_by[name] = key_path
            own = {**params, **{param: values[i] for param, values in per_index.items()}}
            nodes.append(NodeSpec(name, cls, _plain(own, f"{key_path}.params"), table=key,
                                  index=i if count is not None else None, count=count))
    return tuple(nodes)


def _per_index(body: dict[str, Any], count: int | None, key_path: str) -> dict[str, list[Any]]:
    """``per_index = { param = [value for node 0, node 1, ...] }``: params that vary
    with the index of the nodes ``count`` makes."""
    if "per_index" not in body:
        return {}
    table = _table(body["per_index"], f"{key_path}.per_index")
    if count is None:
        raise _err("per_index needs count (it gives each of the count nodes its own "
                   "value)", f"{key_path}.per_index")
    for param, values in table.items():
        values = _array(values, f"{key_path}.per_index.{param}")
        if len(values) != count:
            raise _err(f"has {len(values)} values for {count} nodes (count = {count})",
                       f"{key_path}.per_index.{param}")
    return table


def _links(document: dict[str, Any], names: dict[str, int],
           capacity: int, seed: int = 0) -> tuple[LinkSpec, ...]:
    made: dict[tuple[str, str, str, str], tuple[int, int]] = {}
    for i, entry in enumerate(_array(document.get("links", []), "links")):
        key_path = f"links[{i}]"
        _keys(_table(entry, key_path), ("from", "to", "capacity"), key_path, ("from", "to"))
        source_pattern, outbox = _endpoint(entry["from"], f"{key_path}.from")
        target_pattern, inbox = _endpoint(entry["to"], f"{key_path}.to")
        link_capacity = _int(entry.get("capacity", capacity), f"{key_path}.capacity", 1)
        sources = _match(source_pattern, names, f"{key_path}.from")
        targets = _match(target_pattern, names, f"{key_path}.to")
        globbed = _is_glob(source_pattern) or _is_glob(target_pattern)
        pairs = [(s, t) for s in sources for t in targets if not (globbed and s == t)]
        if not pairs:
            raise _err("makes no link: globs never link a node to itself", key_path)
        for source, target in pairs:
            key = (source, outbox, target, inbox)
            if key in made:
                raise _err(f"duplicate link {source}.{outbox} -> {target}.{inbox} "
                           f"(also made by links[{made[key][0]}])", key_path)
            made[key] = (i, link_capacity)
    origins = {key: f"links[{i}]" for key, (i, _) in made.items()}
    for j, entry in enumerate(_array(document.get("patterns", []), "patterns")):
        key_path = f"patterns[{j}]"
        link_capacity = _int(_table(entry, key_path).get("capacity", capacity),
                             f"{key_path}.capacity", 1)
        for key in _pattern(entry, j, names, seed, key_path):
            if key in made:
                raise _err(f"duplicate link {key[0]}.{key[1]} -> {key[2]}.{key[3]} (also made "
                           f"by {origins[key]})", key_path)
            made[key] = (-1, link_capacity)
            origins[key] = key_path
    return tuple(LinkSpec(n, *key, capacity=made[key][1], entry=made[key][0],
                          origin=origins[key])
                 for n, key in enumerate(sorted(made)))


#: The link patterns of ``[[patterns]]`` (and the builder).
PATTERN_KINDS = ("ring", "line", "grid", "torus", "all", "random")
#: Grid directions: name -> (rows down, columns right); a message sent out of box
#: ``d`` arrives in the neighbour's inbox named for where it came from.
_DIRECTIONS = {"n": (-1, 0), "s": (1, 0), "e": (0, 1), "w": (0, -1),
               "ne": (-1, 1), "nw": (-1, -1), "se": (1, 1), "sw": (1, -1)}
_OPPOSITE = {"n": "s", "s": "n", "e": "w", "w": "e", "ne": "sw", "sw": "ne", "nw": "se",
             "se": "nw"}
_LINE_KEYS = ("kind", "nodes", "from", "to", "capacity")
_GRID_KEYS = (*_LINE_KEYS, "shape", "neighbours", "boxes")
#: The keys each kind of pattern takes.
_PATTERN_KEYS = {"ring": _LINE_KEYS, "line": _LINE_KEYS, "all": _LINE_KEYS,
                 "random": (*_LINE_KEYS, "k", "seed"), "grid": _GRID_KEYS,
                 "torus": _GRID_KEYS}


def _pattern(entry: dict[str, Any], j: int, names: dict[str, int], run_seed: int,
             key_path: str) -> list[tuple[str, str, str, str]]:
    """The links one ``[[patterns]]`` entry makes (see docs: Topology files)."""
    kind = _str(entry.get("kind"), f"{key_path}.kind") if "kind" in entry else ""
    if kind not in PATTERN_KINDS:
        raise _err(f"expected kind = one of {', '.join(PATTERN_KINDS)}, got {kind!r}"
                   f"{_suggest(kind, PATTERN_KINDS)}", f"{key_path}.kind")
    _keys(entry, _PATTERN_KEYS[kind], key_path, ("kind", "nodes"))
    members = _pattern_nodes(entry["nodes"], names, f"{key_path}.nodes")
    outbox = _name(_str(entry.get("from", "out"), f"{key_path}.from"), BOX_NAME, "box",
                   f"{key_path}.from")
    inbox = _name(_str(entry.get("to", "in"), f"{key_path}.to"), BOX_NAME, "box",
                  f"{key_path}.to")
    n = len(members)
    if kind in ("ring", "line"):
        ends = n if kind == "ring" else n - 1
        pairs = [(members[i], members[(i + 1) % n]) for i in range(ends) if n > 1]
        return [(a, outbox, b, inbox) for a, b in pairs]
    if kind == "all":
        return [(a, outbox, b, inbox) for a in members for b in members if a != b]
    if kind == "random":
        if "k" not in entry:
            raise _err("missing required key 'k' (links out of each node)", key_path)
        k = _int(entry["k"], f"{key_path}.k", 1, max(1, n - 1))
        seed = _int(entry.get("seed", run_seed), f"{key_path}.seed", 0, SEED_LIMIT - 1)
        digest = hashlib.sha256(f"hiocluster pattern {j} seed {seed}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        links = []
        for a in members:
            for b in rng.sample([m for m in members if m != a], k):
                links.append((a, outbox, b, inbox))
        return links
    if "shape" not in entry:
        raise _err("missing required key 'shape' ([rows, columns])", key_path)
    shape = _array(entry["shape"], f"{key_path}.shape")
    if len(shape) != 2:
        raise _err(f"expected [rows, columns], got {shape!r}", f"{key_path}.shape")
    rows, cols = (_int(v, f"{key_path}.shape", 1) for v in shape)
    if rows * cols != n:
        raise _err(f"{rows} x {cols} = {rows * cols} places for {n} nodes",
                   f"{key_path}.shape")
    neighbours = _int(entry.get("neighbours", 4), f"{key_path}.neighbours", 4, 8)
    if neighbours not in (4, 8):
        raise _err(f"expected 4 or 8, got {neighbours}", f"{key_path}.neighbours")
    boxes = _str(entry.get("boxes", "named"), f"{key_path}.boxes")
    if boxes not in ("named", "single"):
        raise _err(f"expected 'named' (a box per direction: n s e w, and ne nw se sw) or "
                   f"'single' (from and to), got {boxes!r}", f"{key_path}.boxes")
    links: list[tuple[str, str, str, str]] = []
    for r in range(rows):
        for c in range(cols):
            for direction, (dr, dc) in list(_DIRECTIONS.items())[:neighbours]:
                rr, cc = r + dr, c + dc
                if kind == "torus":
                    rr, cc = rr % rows, cc % cols
                elif not (0 <= rr < rows and 0 <= cc < cols):
                    continue
                a, b = members[r * cols + c], members[rr * cols + cc]
                if a == b:
                    continue  # a torus one wide: its own neighbour
                link = (a, direction, b, _OPPOSITE[direction]) if boxes == "named" \
                    else (a, outbox, b, inbox)
                if link in links:
                    raise _err(f"links {a}.{link[1]} -> {b}.{link[3]} twice (a torus two wide "
                               "with boxes = 'single'): use boxes = 'named'", key_path)
                links.append(link)
    return links


def _pattern_nodes(value: object, names: dict[str, int], key_path: str) -> list[str]:
    """A pattern's nodes, in order: a table's ``count`` nodes by index (``"t"``), a
    glob or a name (file order), or an array of names."""
    if isinstance(value, list):
        members = [_str(v, f"{key_path}[{i}]") for i, v in enumerate(value)]
        for i, member in enumerate(members):
            if member not in names:
                raise _err(f"no node named {member!r}{_suggest(member, names)}",
                           f"{key_path}[{i}]")
        return members
    text = _str(value, key_path)
    table = [name for name in names if re.fullmatch(re.escape(text) + r"\d+", name)]
    if table and text not in names:
        return table
    if not _is_glob(text) and text not in names:
        raise _err(f"no node, and no table of count nodes, named {text!r}"
                   f"{_suggest(text, names)}", key_path)
    return _match(text, names, key_path)


def _placement(document: dict[str, Any],
               names: dict[str, int]) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
    if "placement" not in document:
        return None
    raw = _table(document["placement"], "placement")
    if not raw:
        raise _err("no workers listed", "placement")
    order = names  # declaration index of every node
    placed_in: dict[str, str] = {}
    result: list[tuple[str, tuple[str, ...]]] = []
    for worker, entries in raw.items():
        key_path = f"placement.{worker}"
        _name(worker, WORKER_NAME, "worker", key_path)
        if not _array(entries, key_path):
            raise _err(f"worker {worker!r} has no nodes", key_path)
        members: list[str] = []
        for j, pattern in enumerate(entries):
            for node in _match(_str(pattern, f"{key_path}[{j}]"), names, key_path):
                if node in placed_in:
                    raise _err(f"node {node!r} is placed twice: in {placed_in[node]} "
                               f"and {key_path}", key_path)
                placed_in[node] = key_path
                members.append(node)
        result.append((worker, tuple(sorted(members, key=order.__getitem__))))
    missing = [name for name in names if name not in placed_in]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more"
                                           if len(missing) > 10 else "")
        raise _err(f"not placed in any worker: {shown}", "placement")
    return tuple(result)


def _groups(document: dict[str, Any]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    raw = _table(document.get("groups", {}), "groups")
    groups = []
    for name, members in raw.items():
        key_path = f"groups.{name}"
        _name(name, WORKER_NAME, "group", key_path)
        if not _array(members, key_path):
            raise _err(f"group {name!r} has no members", key_path)
        groups.append((name, tuple(_name(_str(member, f"{key_path}[{j}]"), WORKER_NAME,
                                         "member", f"{key_path}[{j}]")
                                   for j, member in enumerate(members))))
    return tuple(groups)


_AGENT = re.compile(r"tcp://[^\s:/]+:\d{1,5}")


def _hosts(document: dict[str, Any]) -> tuple[HostSpec, ...]:
    raw = _table(document.get("hosts", {}), "hosts")
    hosts, placed_on = [], {}
    for name, body in raw.items():
        key_path = f"hosts.{name}"
        _name(name, WORKER_NAME, "host", key_path)
        if name == "local":
            raise _err("'local' is this host: it needs no entry", key_path)
        _keys(_table(body, key_path), ("agent", "workers"), key_path, ("agent", "workers"))
        agent = _str(body["agent"], f"{key_path}.agent")
        if not _AGENT.fullmatch(agent):
            raise _err(f"expected 'tcp://HOST:PORT', got {agent!r}", f"{key_path}.agent")
        workers = []
        for j, worker in enumerate(_array(body["workers"], f"{key_path}.workers")):
            worker = _name(_str(worker, f"{key_path}.workers[{j}]"), WORKER_NAME, "worker",
                           f"{key_path}.workers[{j}]")
            if worker in placed_on:
                raise _err(f"worker {worker!r} is on hosts {placed_on[worker]} and {name}",
                           f"{key_path}.workers[{j}]")
            placed_on[worker] = name
            workers.append(worker)
        hosts.append(HostSpec(name, agent, tuple(workers)))
    return tuple(hosts)


_SERVICE_KEYS = ("class", "replicas", "listen", "restart", "max_restarts", "within",
                 "backoff", "backoff_max", "timeout", "drain", "heartbeat", "max_body",
                 "spare", "tls", "params")
_LISTEN = re.compile(r"(?P<host>[A-Za-z0-9_.-]{1,253}):(?P<port>\d{1,5})")


def _services(document: dict[str, Any], nodes: tuple[NodeSpec, ...],
              base: str) -> tuple[ServiceSpec, ...]:
    raw = _table(document.get("services", {}), "services")
    services, listening = [], {}
    for name, body in raw.items():
        key_path = f"services.{name}"
        _name(name, NODE_NAME, "service", key_path)
        if any(node.name == name for node in nodes):
            raise _err(f"service {name!r} has the name of a node", key_path)
        _keys(_table(body, key_path), _SERVICE_KEYS, key_path, ("class", "listen"))
        cls = _str(body["class"], f"{key_path}.class")
        if not CLASS_PATH.fullmatch(cls):
            raise _err(f"expected 'module.path:attr', got {cls!r}", f"{key_path}.class")
        listen = _str(body["listen"], f"{key_path}.listen")
        found = _LISTEN.fullmatch(listen)
        if found is None:
            raise _err(f"expected 'HOST:PORT', got {listen!r}", f"{key_path}.listen")
        port = _int(int(found["port"]), f"{key_path}.listen", 1, 65535)
        address = (found["host"], port)
        if address in listening:
            raise _err(f"{listen} is also where service {listening[address]} listens",
                       f"{key_path}.listen")
        listening[address] = name
        restart = _str(body.get("restart", "one_for_one"), f"{key_path}.restart")
        if restart not in RESTART_POLICIES:
            raise _err(f"expected one of {', '.join(RESTART_POLICIES)}, got {restart!r}"
                       f"{_suggest(restart, RESTART_POLICIES)}", f"{key_path}.restart")
        numbers = {key: _number(body[key], f"{key_path}.{key}", positive=key != "timeout")
                   for key in ("within", "backoff", "backoff_max", "timeout", "drain",
                               "heartbeat")
                   if key in body}
        if "max_body" in body:
            numbers["max_body"] = _int(body["max_body"], f"{key_path}.max_body", 1, 1 << 40)
        if numbers.get("timeout", 0) < 0:
            raise _err(f"must be >= 0, got {body['timeout']}", f"{key_path}.timeout")
        spare = body.get("spare", True)
        if not isinstance(spare, bool):
            raise _err(f"expected bool, got {_type_name(spare)}", f"{key_path}.spare")
        tls = None
        if "tls" in body:
            table = _table(body["tls"], f"{key_path}.tls")
            _keys(table, ("cert", "key"), f"{key_path}.tls", ("cert", "key"))
            tls = tuple(os.path.join(base, _str(table[key], f"{key_path}.tls.{key}"))
                        for key in ("cert", "key"))
        services.append(ServiceSpec(
            name, cls, address,
            replicas=_int(body.get("replicas", 1), f"{key_path}.replicas", 1, MAX_REPLICAS),
            restart=restart,
            max_restarts=_int(body.get("max_restarts", 5), f"{key_path}.max_restarts", 0,
                              10_000),
            tls=tls,  # type: ignore[arg-type]
            spare=spare,
            params=_plain(_table(body.get("params", {}), f"{key_path}.params"),
                          f"{key_path}.params"),
            **numbers))
    return tuple(services)


# --- line numbers (best effort: tomllib reports none for valid TOML) ---------------

_HEADER = re.compile(r"\s*(\[\[?)([^\[\]]+)\]\]?\s*(?:#.*)?$")
_KEY = re.compile(r"""\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*[=.]""")


def _split_key_path(key_path: str) -> list[str | int]:
    return [int(index) if index else name
            for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", key_path)]


def _bare(part: str) -> str:
    return part.strip().strip("\"'")


def _locate(text: str | None, key_path: str) -> int | None:
    """Return the 1-based line that defines ``key_path`` in ``text``, if found."""
    if not text or not key_path:
        return None
    want = _split_key_path(key_path)
    lines = text.splitlines()
    sections: list[tuple[tuple[str | int, ...], int]] = [((), -1)]
    seen_arrays: dict[tuple[str | int, ...], int] = {}
    for number, line in enumerate(lines):
        match = _HEADER.match(line)
        if match:
            names: tuple[str | int, ...] = tuple(_bare(p) for p in match[2].split("."))
            if match[1] == "[[":
                index = seen_arrays[names] = seen_arrays.get(names, -1) + 1
                names += (index,)
            sections.append((names, number))
    for depth in range(len(want), -1, -1):
        for position, (names, start) in enumerate(sections):
            if list(names) != want[:depth]:
                continue
            if depth == len(want):
                return start + 1 if start >= 0 else None
            key = want[depth]
            end = sections[position + 1][1] if position + 1 < len(sections) else len(lines)
            for number in range(start + 1, end):
                match = _KEY.match(lines[number])
                if match and _bare(match[1]) == key:
                    return number + 1
    return None


def _place(exc: TopologyError, text: str | None, path: str | None) -> None:
    """Fill in the line and path of an error raised by the checks above."""
    if exc.line is None:
        exc.line = _locate(text, exc.key_path)
    exc.path = exc.path or path
    exc.args = (str(exc),)


# --- public API -----------------------------------------------------------------

def loads(text: str, *, path: str | None = None) -> Topology:
    """Parse and validate topology TOML ``text`` (``path`` only names it in errors).

    Raises:
        TopologyError: invalid TOML or an invalid topology; carries key path and line.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+), column (\d+)", str(exc))
        line = int(found[1]) if found else (text.count("\n") + 1 if "end of document" in str(exc)
                                            else None)
        raise TopologyError(f"invalid TOML: {exc}", line=line, path=path) from exc
    try:
        _keys(document, ("run", "nodes", "links", "patterns", "placement", "groups", "hosts",
                         "services"), "")
        run = _run(document)
        nodes = _nodes(document)
        names = {node.name: index for index, node in enumerate(nodes)}
        links = _links(document, names, int(run["capacity"]), int(run["seed"]))
        placement = _placement(document, names)
        groups = _groups(document)
        hosts = _hosts(document)
        services = _services(document, nodes,
                             os.path.dirname(os.path.abspath(path)) if path else os.getcwd())
    except TopologyError as exc:
        _place(exc, text, path)
        raise
    return Topology(
        name=Path(path).stem if path else "<string>", path=path,
        ticks=int(run["ticks"]), tock=float(run["tock"]), t0=float(run["t0"]),
        seed=int(run["seed"]), tick_timeout=float(run["tick_timeout"]),
        capacity=int(run["capacity"]), real=bool(run["real"]),
        digest_every=int(run["digest_every"]), credit_lag=run["credit_lag"], transport=str(run["transport"]), nodes=nodes, links=links, placement=placement, groups=groups, hosts=hosts, services=services, source=text,
    )


def load(path: str | os.PathLike[str]) -> Topology:
    """Read and validate the topology file at ``path``. Raises TopologyError."""
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TopologyError("no such file", path=name) from None
    except UnicodeDecodeError as exc:
        raise TopologyError(f"not a TOML file: not UTF-8 text ({exc.reason})", path=name) from exc
    except OSError as exc:
        raise TopologyError(exc.strerror or str(exc), path=name) from exc
    return loads(text, path=name)


def plan(topology: Topology, processes: int | None = None, *,
         cores: int | None = None) -> Plan:
    """Map nodes onto workers (one OS process each), and workers onto hosts.

    ``processes`` None uses the topology's ``[placement]``; without one, the nodes
    are spread over as many workers as there are cores (``cores``, default
    ``os.cpu_count()``), never more workers than nodes. An int P splits the link
    graph into P balanced parts with few links between them (:func:`_partition`;
    without links: contiguous blocks of the file's order), workers ``p0..p{P-1}``,
    with no groups: the file's ``[groups]`` name the workers of its placement. Workers and groups named in ``[hosts.*]`` run on those hosts.

    Raises:
        TopologyError: P is not in 1..number of nodes (key path ``--processes``), or
            a host names a worker the plan does not have (``hosts.<name>.workers``).
    """
    nodes = topology.nodes
    if not nodes:
        raise TopologyError("no nodes to simulate (this topology only has services: "
                            "`hiocluster run` serves them)", key_path="nodes",
                            path=topology.path)
    if processes is None:
        if topology.placement is not None:
            workers = tuple(WorkerSpec(name, tuple(topology.node(n) for n in members))
                            for name, members in topology.placement)
        else:
            workers = _partition(nodes, topology.links,
                                 min(len(nodes), cores or os.cpu_count() or 1))
    else:
        try:
            count = _int(processes, "--processes", 1, len(nodes))
        except TopologyError as exc:
            exc.message += f" (the topology has {len(nodes)} nodes)"
            _place(exc, None, topology.path)
            raise
        workers = _partition(nodes, topology.links, count)
    names = [worker.name for worker in workers]
    try:
        groups = _group_tree(topology.groups if processes is None else (), names)
        inside = {member for members in groups.values() for member in members}
        hosts: dict[str, HostSpec] = {}
        for host in topology.hosts:
            for j, worker in enumerate(host.workers):
                key_path = f"hosts.{host.name}.workers[{j}]"
                if worker not in names and worker not in groups:
                    raise _err(f"no worker or group {worker!r} in the plan"
                               f"{_suggest(worker, [*names, *groups])} (workers: "
                               f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''})",
                               key_path)
                if worker in inside:
                    raise _err(f"{worker!r} is in a group: it runs where its group runs",
                               key_path)
                hosts[worker] = host
    except TopologyError as exc:
        _place(exc, topology.source, topology.path)
        raise
    return Plan(workers, hosts, groups)


def _group_tree(groups: tuple[tuple[str, tuple[str, ...]], ...],
                workers: list[str]) -> dict[str, tuple[str, ...]]:
    """The groups, checked: members exist, each once, no cycles, no name twice."""
    tree = dict(groups)
    parent: dict[str, str] = {}
    for name, members in groups:
        if name in workers:
            raise _err(f"group {name!r} has the name of a worker", f"groups.{name}")
        for j, member in enumerate(members):
            key_path = f"groups.{name}[{j}]"
            if member not in workers and member not in tree:
                raise _err(f"no worker or group {member!r}"
                           f"{_suggest(member, [*workers, *tree])}", key_path)
            if member in parent:
                raise _err(f"{member!r} is in groups {parent[member]} and {name}", key_path)
            parent[member] = name
    for name in tree:  # a group must not contain itself, however deep
        seen, member = {name}, parent.get(name)
        while member is not None:
            if member in seen:
                raise _err(f"group {name!r} contains itself", f"groups.{name}")
            seen.add(member)
            member = parent.get(member)
        if len(seen) > MAX_GROUP_DEPTH:
            raise _err(f"group {name!r} is nested {len(seen)} deep (at most "
                       f"{MAX_GROUP_DEPTH})", f"groups.{name}")
    return tree


def _partition(nodes: tuple[NodeSpec, ...], links: tuple[LinkSpec, ...],
               count: int) -> tuple[WorkerSpec, ...]:
    """``count`` workers of nearly equal size with few links between them: METIS
    (pymetis, when installed) or a plain greedy growing of regions, on the graph
    of links (both directions, weighted by how many links join two nodes), or
    contiguous blocks of the file's order where those are as balanced and cut as
    few links (a chain). Deterministic for a given topology; without links,
    blocks. Workers are numbered by their first node in the file's order."""
    index = {node.name: i for i, node in enumerate(nodes)}
    weights: dict[tuple[int, int], int] = {}
    for link in links:
        a, b = index[link.source], index[link.target]
        if a != b:
            pair = (min(a, b), max(a, b))
            weights[pair] = weights.get(pair, 0) + 1
    if count == 1 or count >= len(nodes) or not weights:
        return _blocks(nodes, count)
    neighbours: list[list[tuple[int, int]]] = [[] for _ in nodes]
    for (a, b), weight in sorted(weights.items()):
        neighbours[a].append((b, weight))
        neighbours[b].append((a, weight))
    n = len(nodes)

    even = math.ceil(n / count) + n // (100 * count)  # parts within 1 % count as even

    def score(parts: list[int]) -> tuple[int, int]:  # balance (to 1 %), then the cut
        cut = sum(weight for (a, b), weight in weights.items() if parts[a] != parts[b])
        return max(max(Counter(parts).values()), even), cut

    # the partitioner's split, unless the file's own order does as well (a chain)
    blocks = [i * count // n for i in range(n)]
    parts = min(_metis(neighbours, count, score(blocks), score)
                or _grow(neighbours, count), blocks, key=score)
    members: list[list[NodeSpec]] = [[] for _ in range(count)]
    for i, part in enumerate(parts):
        members[part].append(nodes[i])
    if not all(members):  # a partitioner that left a part empty: do not trust it
        return _blocks(nodes, count)
    members.sort(key=lambda block: index[block[0].name])
    return tuple(WorkerSpec(f"p{j}", tuple(block)) for j, block in enumerate(members))


def _metis(neighbours: list[list[tuple[int, int]]], count: int, to_beat: tuple[int, int],
           score: Callable[[list[int]], tuple[int, int]]) -> list[int] | None:
    """METIS's k-way partition: of a few fixed seeds, the first whose ``score``
    (balance, then links cut) beats ``to_beat`` (the file's order), else the best:
    the same topology, the same plan. None without pymetis."""
    try:
        import pymetis  # optional: pip install "hiocluster[graph]"
    except ImportError:
        return None
    xadj, adjncy, eweights = [0], [], []
    for row in neighbours:
        adjncy += [b for b, _ in row]
        eweights += [weight for _, weight in row]
        xadj.append(len(adjncy))
    best: tuple[tuple[int, int], list[int]] | None = None
    for seed in range(1, 9):  # METIS's balance varies with its seed
        options = pymetis.Options(seed=seed)
        if hasattr(pymetis, "CSRAdjacency"):  # pymetis >= 2025.2
            _, parts = pymetis.part_graph(count, pymetis.CSRAdjacency(xadj, adjncy),
                                          eweights=eweights, options=options)
        else:
            _, parts = pymetis.part_graph(count, xadj=xadj, adjncy=adjncy,
                                          eweights=eweights, options=options)
        found = (score(list(parts)), list(parts))
        if best is None or found[0] < best[0]:
            best = found
        if found[0] < to_beat:
            break  # better than the file's order: good enough
    return best[1] if best is not None else None


def _grow(neighbours: list[list[tuple[int, int]]], count: int) -> list[int]:
    """Without METIS, greedy graph growing: each part starts at the unplaced node
    with the fewest unplaced neighbours (a corner of what is left) and takes, one
    at a time, the unplaced node with the most link weight into the part (ties:
    the fewest unplaced neighbours, then the file's order), until it has its
    share: compact regions, so few links between them."""
    n = len(neighbours)
    parts = [-1] * n
    free = [len(row) for row in neighbours]  # unplaced neighbours of each node
    for part in range(count):
        size = n * (part + 1) // count - n * part // count
        gain: dict[int, int] = {}
        heap: list[tuple[int, int, int]] = []
        for _ in range(size):
            while heap and (parts[heap[0][2]] >= 0 or -heap[0][0] != gain.get(heap[0][2])):
                heapq.heappop(heap)  # stale entries
            if heap:
                node = heapq.heappop(heap)[2]
            else:  # a new region: a corner of what is left
                node = min((i for i in range(n) if parts[i] < 0), key=lambda i: (free[i], i))
            parts[node] = part
            gain.pop(node, None)
            for other, weight in neighbours[node]:
                free[other] -= 1
                if parts[other] < 0:
                    gain[other] = gain.get(other, 0) + weight
                    heapq.heappush(heap, (-gain[other], free[other], other))
    return parts


def _blocks(nodes: tuple[NodeSpec, ...], count: int) -> tuple[WorkerSpec, ...]:
    blocks: list[list[NodeSpec]] = [[] for _ in range(count)]
    for i, node in enumerate(nodes):
        blocks[i * count // len(nodes)].append(node)
    return tuple(WorkerSpec(f"p{j}", tuple(block)) for j, block in enumerate(blocks))


def resolve_classes(topology: Topology, app_dir: str | None = None) -> dict[str, type]:
    """Import every node's class and check each link's boxes exist on it.

    ``app_dir`` (default: the current directory) goes at the front of sys.path
    if absent, like uvicorn's ``--app-dir``.

    Returns:
        ``{node name: class}`` in declaration order.
    Raises:
        TopologyError: naming ``nodes.<name>.class`` or ``links[i].from``/``.to``.
    """
    from hiocluster.node import load_class  # deferred: node imports the runtime stack

    try:
        cache: dict[str, type] = {}
        classes: dict[str, type] = {}
        for node in topology.nodes:
            if node.cls not in cache:
                key_path = f"nodes.{node.table or node.name}.class"
                try:
                    cache[node.cls] = load_class(node.cls, app_dir)
                except ImportError as exc:
                    raise _err(str(exc), key_path) from exc
            classes[node.name] = cache[node.cls]
        for link in topology.links:
            origin = link.origin or f"links[{link.entry if link.entry >= 0 else link.id}]"
            for end, node_name, box, kind in (("from", link.source, link.outbox, "outbox"),
                                              ("to", link.target, link.inbox, "inbox")):
                boxes = tuple(getattr(classes[node_name], f"{kind}es", ()))
                if box not in boxes:
                    raise _err(f"node {node_name!r} ({topology.node(node_name).cls}) has no "
                               f"{kind} {box!r}; it has: {', '.join(boxes) or 'none'}",
                               f"{origin}.{end}" if origin.startswith("links")
                               else origin)
    except TopologyError as exc:
        _place(exc, topology.source, topology.path)
        raise
    return classes


def resolve_services(topology: Topology, app_dir: str | None = None) -> dict[str, type]:
    """Import every service's class (a subclass of hiocluster.service.Service) and
    check its TLS files exist.

    Raises:
        TopologyError: naming ``services.<name>.class`` or ``.tls``.
    """
    from hiocluster.node import load_class  # deferred: imports the runtime stack
    from hiocluster.service import Service

    classes: dict[str, type] = {}
    try:
        for service in topology.services:
            try:
                classes[service.name] = load_class(service.cls, app_dir, base=Service)
            except ImportError as exc:
                raise _err(str(exc), f"services.{service.name}.class") from exc
            for what, path in zip(("cert", "key"), service.tls or ()):
                if not os.path.isfile(path):
                    raise _err(f"no such file: {path}", f"services.{service.name}.tls.{what}")
    except TopologyError as exc:
        _place(exc, topology.source, topology.path)
        raise
    return classes
