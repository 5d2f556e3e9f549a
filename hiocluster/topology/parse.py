"""TOML text -> :class:`~hiocluster.topology.spec.Topology`: the sections of a
topology file, each validated with errors that name the key path and, where it
can be found, the line (:func:`loads`, :func:`load`)."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from hiocluster.errors import TopologyError
from hiocluster.topology.limits import (
    ACCESS_LOG_FORMATS,
    CLASS_PATH,
    MAX_COUNT,
    MAX_REPLICAS,
    NODE_NAME,
    RESTART_POLICIES,
    RUN_DEFAULTS,
    WORKER_NAME,
)
from hiocluster.topology.lines import locate_error
from hiocluster.topology.patterns import pattern_links
from hiocluster.topology.spec import (
    SLURM_AGENT,
    SSH_AGENT,
    HostSpec,
    LinkSpec,
    NodeSpec,
    ServiceSpec,
    Topology,
)
from hiocluster.topology.values import (
    _plain,
    array_value,
    check_keys,
    endpoint_value,
    int_value,
    is_glob,
    match_names,
    name_value,
    number_value,
    run_value,
    suggest,
    table_value,
    text_value,
    topology_error,
    type_name,
)

# --- the sections -----------------------------------------------------------------

def _run(document: dict[str, Any]) -> dict[str, Any]:
    run = table_value(document.get("run", {}), "run")
    check_keys(run, tuple(RUN_DEFAULTS), "run")
    return {key: run_value(key, run.get(key, default)) for key, default in RUN_DEFAULTS.items()}


def _nodes(document: dict[str, Any]) -> tuple[NodeSpec, ...]:
    raw = table_value(document.get("nodes", {}), "nodes")
    if not raw and not document.get("services"):
        raise topology_error("at least one node (or service) is required", "nodes")
    declared_by: dict[str, str] = {}
    nodes: list[NodeSpec] = []
    for key, body in raw.items():
        key_path = f"nodes.{key}"
        name_value(key, NODE_NAME, "node", key_path)
        check_keys(table_value(body, key_path), ("class", "params", "count", "per_index"), key_path,
              ("class",))
        cls = text_value(body["class"], f"{key_path}.class")
        if not CLASS_PATH.fullmatch(cls):
            raise topology_error(f"expected 'module.path:attr', got {cls!r}", f"{key_path}.class")
        params = table_value(body.get("params", {}), f"{key_path}.params")
        names = [key]
        count = None
        if "count" in body:
            count = int_value(body["count"], f"{key_path}.count", 1, MAX_COUNT)
            width = len(str(count - 1))
            names = [f"{key}{i:0{width}d}" for i in range(count)]
        per_index = _per_index(body, count, key_path)
        for i, name in enumerate(names):
            name_value(name, NODE_NAME, "node", key_path)
            if name in declared_by:
                raise topology_error(f"duplicate node name {name!r} (also declared by "
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
    table = table_value(body["per_index"], f"{key_path}.per_index")
    if count is None:
        raise topology_error("per_index needs count (it gives each of the count nodes its own "
                   "value)", f"{key_path}.per_index")
    for param, values in table.items():
        values = array_value(values, f"{key_path}.per_index.{param}")
        if len(values) != count:
            raise topology_error(f"has {len(values)} values for {count} nodes (count = {count})",
                       f"{key_path}.per_index.{param}")
    return table


def _links(document: dict[str, Any], names: dict[str, int],
           capacity: int, seed: int = 0) -> tuple[LinkSpec, ...]:
    made: dict[tuple[str, str, str, str], tuple[int, int]] = {}
    for i, entry in enumerate(array_value(document.get("links", []), "links")):
        key_path = f"links[{i}]"
        check_keys(table_value(entry, key_path), ("from", "to", "capacity"), key_path, ("from", "to"))
        source_pattern, outbox = endpoint_value(entry["from"], f"{key_path}.from")
        target_pattern, inbox = endpoint_value(entry["to"], f"{key_path}.to")
        link_capacity = int_value(entry.get("capacity", capacity), f"{key_path}.capacity", 1)
        sources = match_names(source_pattern, names, f"{key_path}.from")
        targets = match_names(target_pattern, names, f"{key_path}.to")
        globbed = is_glob(source_pattern) or is_glob(target_pattern)
        pairs = [(s, t) for s in sources for t in targets if not (globbed and s == t)]
        if not pairs:
            raise topology_error("makes no link: globs never link a node to itself", key_path)
        for source, target in pairs:
            key = (source, outbox, target, inbox)
            if key in made:
                raise topology_error(f"duplicate link {source}.{outbox} -> {target}.{inbox} "
                           f"(also made by links[{made[key][0]}])", key_path)
            made[key] = (i, link_capacity)
    origins = {key: f"links[{i}]" for key, (i, _) in made.items()}
    for j, entry in enumerate(array_value(document.get("patterns", []), "patterns")):
        key_path = f"patterns[{j}]"
        link_capacity = int_value(table_value(entry, key_path).get("capacity", capacity),
                             f"{key_path}.capacity", 1)
        for key in pattern_links(entry, j, names, seed, key_path):
            if key in made:
                raise topology_error(f"duplicate link {key[0]}.{key[1]} -> {key[2]}.{key[3]} (also made "
                           f"by {origins[key]})", key_path)
            made[key] = (-1, link_capacity)
            origins[key] = key_path
    return tuple(LinkSpec(n, *key, capacity=made[key][1], entry=made[key][0],
                          origin=origins[key])
                 for n, key in enumerate(sorted(made)))


def _placement(document: dict[str, Any],
               names: dict[str, int]) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
    if "placement" not in document:
        return None
    raw = table_value(document["placement"], "placement")
    if not raw:
        raise topology_error("no workers listed", "placement")
    order = names  # declaration index of every node
    placed_in: dict[str, str] = {}
    result: list[tuple[str, tuple[str, ...]]] = []
    for worker, entries in raw.items():
        key_path = f"placement.{worker}"
        name_value(worker, WORKER_NAME, "worker", key_path)
        if not array_value(entries, key_path):
            raise topology_error(f"worker {worker!r} has no nodes", key_path)
        members: list[str] = []
        for j, pattern in enumerate(entries):
            for node in match_names(text_value(pattern, f"{key_path}[{j}]"), names, key_path):
                if node in placed_in:
                    raise topology_error(f"node {node!r} is placed twice: in {placed_in[node]} "
                               f"and {key_path}", key_path)
                placed_in[node] = key_path
                members.append(node)
        result.append((worker, tuple(sorted(members, key=order.__getitem__))))
    missing = [name for name in names if name not in placed_in]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more"
                                           if len(missing) > 10 else "")
        raise topology_error(f"not placed in any worker: {shown}", "placement")
    return tuple(result)


def _groups(document: dict[str, Any]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    raw = table_value(document.get("groups", {}), "groups")
    groups = []
    for name, members in raw.items():
        key_path = f"groups.{name}"
        name_value(name, WORKER_NAME, "group", key_path)
        if not array_value(members, key_path):
            raise topology_error(f"group {name!r} has no members", key_path)
        groups.append((name, tuple(name_value(text_value(member, f"{key_path}[{j}]"), WORKER_NAME,
                                         "member", f"{key_path}[{j}]")
                                   for j, member in enumerate(members))))
    return tuple(groups)


_AGENT = re.compile(r"tcp://[^\s:/]+:\d{1,5}")


def _hosts(document: dict[str, Any]) -> tuple[HostSpec, ...]:
    raw = table_value(document.get("hosts", {}), "hosts")
    hosts: list[HostSpec] = []
    placed_on: dict[str, str] = {}
    for name, body in raw.items():
        key_path = f"hosts.{name}"
        name_value(name, WORKER_NAME, "host", key_path)
        if name == "local":
            raise topology_error("'local' is this host: it needs no entry", key_path)
        check_keys(table_value(body, key_path), ("agent", "workers"), key_path, ("agent",))
        agent = text_value(body["agent"], f"{key_path}.agent")
        if not (_AGENT.fullmatch(agent) or SSH_AGENT.fullmatch(agent)
                or SLURM_AGENT.fullmatch(agent)):
            raise topology_error(f"expected 'tcp://HOST:PORT' (an agent), "
                                 f"'ssh://[USER@]HOST[:PORT]' or 'slurm://NODE', got "
                                 f"{agent!r}",
                                 f"{key_path}.agent")
        workers = []
        for j, worker in enumerate(array_value(body.get("workers", []), f"{key_path}.workers")):
            worker = name_value(text_value(worker, f"{key_path}.workers[{j}]"), WORKER_NAME, "worker",
                           f"{key_path}.workers[{j}]")
            if worker in placed_on:
                raise topology_error(f"worker {worker!r} is on hosts {placed_on[worker]} and {name}",
                           f"{key_path}.workers[{j}]")
            placed_on[worker] = name
            workers.append(worker)
        hosts.append(HostSpec(name, agent, tuple(workers)))
    return tuple(hosts)


_SERVICE_KEYS = ("class", "replicas", "listen", "restart", "max_restarts", "within",
                 "backoff", "backoff_max", "timeout", "drain", "heartbeat", "max_body",
                 "max_requests", "max_requests_jitter", "max_rss", "access_log",
                 "access_log_format", "health_path", "health_interval", "health_failures",
                 "spare", "tls", "params", "hosts")
_HEALTH_PATH = re.compile(r"/[!-~]{0,1023}")
_LISTEN = re.compile(r"(?P<host>[A-Za-z0-9_.-]{1,253}):(?P<port>\d{1,5})")


def _services(document: dict[str, Any], nodes: tuple[NodeSpec, ...],
              base: str) -> tuple[ServiceSpec, ...]:
    raw = table_value(document.get("services", {}), "services")
    services: list[ServiceSpec] = []
    listening: dict[tuple[str, int], str] = {}
    for name, body in raw.items():
        key_path = f"services.{name}"
        name_value(name, NODE_NAME, "service", key_path)
        if any(node.name == name for node in nodes):
            raise topology_error(f"service {name!r} has the name of a node", key_path)
        check_keys(table_value(body, key_path), _SERVICE_KEYS, key_path, ("class", "listen"))
        cls = text_value(body["class"], f"{key_path}.class")
        if not CLASS_PATH.fullmatch(cls):
            raise topology_error(f"expected 'module.path:attr', got {cls!r}", f"{key_path}.class")
        listen = text_value(body["listen"], f"{key_path}.listen")
        found = _LISTEN.fullmatch(listen)
        if found is None:
            raise topology_error(f"expected 'HOST:PORT', got {listen!r}", f"{key_path}.listen")
        port = int_value(int(found["port"]), f"{key_path}.listen", 1, 65535)
        address = (found["host"], port)
        if address in listening:
            raise topology_error(f"{listen} is also where service {listening[address]} listens",
                       f"{key_path}.listen")
        listening[address] = name
        restart = text_value(body.get("restart", "one_for_one"), f"{key_path}.restart")
        if restart not in RESTART_POLICIES:
            raise topology_error(f"expected one of {', '.join(RESTART_POLICIES)}, got {restart!r}"
                       f"{suggest(restart, RESTART_POLICIES)}", f"{key_path}.restart")
        numbers: dict[str, Any] = {key: number_value(body[key], f"{key_path}.{key}", positive=key != "timeout")
                   for key in ("within", "backoff", "backoff_max", "timeout", "drain",
                               "heartbeat", "health_interval")
                   if key in body}
        if "max_body" in body:
            numbers["max_body"] = int_value(body["max_body"], f"{key_path}.max_body", 1, 1 << 40)
        for key in ("max_requests", "max_requests_jitter", "max_rss"):
            if key in body:
                numbers[key] = int_value(body[key], f"{key_path}.{key}", 0, 1 << 50)
        if "health_failures" in body:
            numbers["health_failures"] = int_value(body["health_failures"],
                                                   f"{key_path}.health_failures", 1, 1_000)
        if "health_path" in body:
            path = text_value(body["health_path"], f"{key_path}.health_path")
            if not _HEALTH_PATH.fullmatch(path):
                raise topology_error(f"expected a path such as '/health' (printable ASCII, "
                                     f"no spaces), got {path!r}", f"{key_path}.health_path")
            numbers["health_path"] = path
        if "access_log" in body:  # a file relative to the topology's, or "-": the output
            log = text_value(body["access_log"], f"{key_path}.access_log")
            numbers["access_log"] = log if log in ("", "-") else os.path.join(base, log)
        log_format = text_value(body.get("access_log_format", "common"),
                                f"{key_path}.access_log_format")
        if log_format not in ACCESS_LOG_FORMATS:
            raise topology_error(f"expected one of {', '.join(ACCESS_LOG_FORMATS)}, got "
                                 f"{log_format!r}{suggest(log_format, ACCESS_LOG_FORMATS)}",
                                 f"{key_path}.access_log_format")
        numbers["access_log_format"] = log_format
        if numbers.get("health_interval", 1.0) < 0.05:
            raise topology_error(f"must be >= 0.05 (seconds between checks), got "
                                 f"{body['health_interval']}", f"{key_path}.health_interval")
        if numbers.get("timeout", 0) < 0:
            raise topology_error(f"must be >= 0, got {body['timeout']}", f"{key_path}.timeout")
        spare = body.get("spare", True)
        if not isinstance(spare, bool):
            raise topology_error(f"expected bool, got {type_name(spare)}", f"{key_path}.spare")
        tls = None
        if "tls" in body:
            table = table_value(body["tls"], f"{key_path}.tls")
            check_keys(table, ("cert", "key"), f"{key_path}.tls", ("cert", "key"))
            tls = tuple(os.path.join(base, text_value(table[key], f"{key_path}.tls.{key}"))
                        for key in ("cert", "key"))
        on = []
        for j, host in enumerate(array_value(body.get("hosts", []), f"{key_path}.hosts")):
            host = name_value(text_value(host, f"{key_path}.hosts[{j}]"), WORKER_NAME, "host",
                              f"{key_path}.hosts[{j}]")
            if host in on:
                raise topology_error(f"host {host!r} is named twice", f"{key_path}.hosts[{j}]")
            on.append(host)
        services.append(ServiceSpec(
            name, cls, address, hosts=tuple(on),
            replicas=int_value(body.get("replicas", 1), f"{key_path}.replicas", 1, MAX_REPLICAS),
            restart=restart,
            max_restarts=int_value(body.get("max_restarts", 5), f"{key_path}.max_restarts", 0,
                              10_000),
            tls=tls,  # type: ignore[arg-type]
            spare=spare,
            params=_plain(table_value(body.get("params", {}), f"{key_path}.params"),
                          f"{key_path}.params"),
            **numbers))
    return tuple(services)


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
        check_keys(document, ("run", "nodes", "links", "patterns", "placement", "groups", "hosts",
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
        locate_error(exc, text, path)
        raise
    return Topology(
        name=Path(path).stem if path else "<string>", path=path,
        ticks=int(run["ticks"]), tock=float(run["tock"]), t0=float(run["t0"]),
        seed=int(run["seed"]), tick_timeout=float(run["tick_timeout"]),
        capacity=int(run["capacity"]), real=bool(run["real"]),
        digest_every=int(run["digest_every"]),
        checkpoint_every=int(run["checkpoint_every"]), credit_lag=run["credit_lag"], transport=str(run["transport"]), metrics=str(run["metrics"]), observe_every=int(run["observe_every"]),
        restart=str(run["restart"]), max_restarts=int(run["max_restarts"]),
        within=float(run["within"]), nodes=nodes, links=links, placement=placement, groups=groups, hosts=hosts, services=services, source=text,
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
