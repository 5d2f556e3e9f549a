"""The ``hiocluster`` command: argument parsing, progress, summary, exit codes.

Exit codes: 0 success, 1 failed run, 2 usage or topology error, 130 after
SIGINT, 143 after SIGTERM (the whole process tree shut down cleanly first). A
run of services only is stopped by design: 0 after SIGINT, SIGTERM or
``hiocluster stop``, 1 when a service failed. Resource exhaustion (open files,
disk space, a read-only run root) is a failed run: one line naming it, exit 1.
``status`` and friends: see hiocluster.control.client.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

from hiocluster.errors import ClusterError, Exhausted, Interrupted, RunFailed, TopologyError
from hiocluster.version import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in 0..2**63-1, got {value}")
    return value


def _name(text: str) -> str:
    from hiocluster.protocol.fields import NAME_RE

    if NAME_RE.match(text) is None:
        raise argparse.ArgumentTypeError(f"invalid worker name {text!r}: 1-64 of A-Z a-z 0-9 "
                                         "_ . -, not starting with . or -")
    return text


def _address(text: str) -> str:
    from hiocluster.protocol.fields import ADDRESS_RE

    if ADDRESS_RE.match(text) is None:
        raise argparse.ArgumentTypeError(f"expected ipc://PATH, tcp://HOST:PORT or unix://PATH, "
                                         f"got {text!r}")
    return text


def _host(text: str) -> tuple[str, str]:
    name, _, address = text.partition("=")
    return _name(name), _tcp(address)


def _place(text: str) -> tuple[str, str]:
    worker, _, host = text.partition("=")
    return _name(worker), _name(host)


def _hosts_from(args: argparse.Namespace) -> tuple[Any, ...]:
    """--host and --place as the topology's hosts."""
    from hiocluster.topology import HostSpec

    agents = dict(args.host)
    unknown = sorted({host for _, host in args.place} - set(agents))
    if unknown:
        raise TopologyError(f"--place names host {unknown[0]!r}, which no --host declares",
                            key_path="--place")
    return tuple(HostSpec(name, address, tuple(worker for worker, host in args.place
                                               if host == name))
                 for name, address in agents.items())


def _tcp(text: str) -> str:
    address = _address(text)
    host = address[len("tcp://"):].rpartition(":")[0] if address.startswith("tcp://") else ""
    if not host or host in ("*", "0.0.0.0"):
        raise argparse.ArgumentTypeError(f"expected tcp://HOST:PORT with a host workers can "
                                         f"reach, got {text!r}")
    return address


def _scale_target(text: str) -> tuple[str, int]:
    name, equals, count = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"expected NAME=N, got {text!r}")
    try:
        value = int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=N with N an integer, got "
                                         f"{text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"N must be 0 or more, got {value}")
    return _name(name), value


def _window(text: str) -> int | None:
    if text == "auto":
        return None
    return _positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hiocluster",
        description="Run hio Doists across processes in deterministic lockstep, and hio "
                    "servers as supervised replicas on one port.",
        epilog="Exit codes: 0 ok, 1 run failed (also: out of open files, disk space or "
               "a writable run root, named in one line), 2 usage or topology error, "
               "130 interrupted (SIGINT), 143 terminated (SIGTERM); a run of services only "
               "exits 0 when stopped, 1 when a service failed.")
    parser.add_argument("--version", action="version", version=f"hiocluster {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run a topology: its simulation in lockstep, its services",
        description="Run a topology and print a summary: its nodes in lockstep until the "
                    "last tick, its [services.*] as supervised replicas (until the "
                    "simulation ends; without nodes, until SIGINT, SIGTERM or "
                    "`hiocluster stop`). A run with services prints its control "
                    "address (HIOCLUSTER_CONTROL=...) for `hiocluster status`.")
    run.add_argument("topology", metavar="TOPOLOGY", help="topology file (TOML)")
    _run_options(run)

    check = commands.add_parser(
        "check", help="validate a topology without running it",
        description="Validate a topology (and import its node classes) without running "
                    "it; print the plan. It takes every option of `run`, so a run's "
                    "command line checks as it is: those that shape the run (--ticks, "
                    "--seed, --real, --processes, --host, --place, --transport, --listen, "
                    "--keys, --external) are applied and checked as `run` checks them; "
                    "those about output (--json, --digests, --trace, --output, "
                    "--no-prefix, --window) are accepted and unused.",
        epilog="Exit codes: 0 ok, 2 usage or topology error (or an option `run` would "
               "refuse, e.g. --keys DIR without the keys).")
    check.add_argument("topology", metavar="TOPOLOGY", help="topology file (TOML)")
    _run_options(check)

    agent = commands.add_parser(
        "agent", help="start workers on this host for supervisors elsewhere",
        description="Run until SIGINT or SIGTERM, starting workers on this host for "
                    "supervisors whose topology places workers here. Every connection is "
                    "CurveZMQ: the agent's key pair is DIR/NAME.key_secret; it admits only "
                    "the supervisors whose public keys it is told to --trust (never another "
                    "agent's key: any key it admits can make it run code).",
        epilog="Exit codes: 0, 130/143 after SIGINT/SIGTERM (every worker stopped), 1 when "
               "it cannot start (a key or the address).")
    agent.add_argument("--listen", required=True, metavar="ADDRESS", type=_tcp,
                       help="where supervisors reach this agent: tcp://HOST:PORT")
    agent.add_argument("--keys", required=True, metavar="DIR", help="the keys directory")
    agent.add_argument("--name", required=True, metavar="NAME", type=_name,
                       help="this host's name in topologies (its key pair: NAME.key_secret)")
    agent.add_argument("--trust", required=True, metavar="KEY", action="append",
                       help="a supervisor's public key file to accept LAUNCH from (relative "
                            "to DIR, e.g. supervisor.key); repeatable")
    agent.add_argument("--advertise", metavar="HOST",
                       help="the address workers here bind and neighbours reach (default: "
                            "the host of --listen)")
    _app_dir(agent)

    keygen = commands.add_parser(
        "keygen", help="make CurveZMQ key pairs for supervisors and agents",
        description="Make one CurveZMQ key pair per NAME in DIR: NAME.key (the public "
                    "key, to give to the other side) and NAME.key_secret (mode 0600, to "
                    "keep). Existing keys are never overwritten.")
    keygen.add_argument("directory", metavar="DIR", help="where to write the keys")
    keygen.add_argument("--skip-existing", action="store_true",
                        help="leave names that have a key pair already (instead of failing)")
    keygen.add_argument("names", metavar="NAME", nargs="+", type=_name,
                        help="who the key pair is for: 'supervisor', or a host's name")

    worker = commands.add_parser(
        "worker", help="join a run as one of its workers",
        description="Join a run as one of its workers: connect to the supervisor, get "
                    "nodes and links from it, run ticks until it says stop. Its credentials "
                    "(the run's token and, over tcp, its CURVE keys) are read from "
                    "--credentials FILE (the supervisor writes it for a worker started "
                    "with `run --external`) or $HIOCLUSTER_CREDENTIALS.",
        epilog="Exit codes: 0 stopped cleanly, 1 failed (the supervisor was told why), "
               "2 usage error, 3 the supervisor vanished, 130/143 SIGINT/SIGTERM.")
    _joining(worker, "worker", "this worker's name in the run's plan (e.g. p1)",
             "where neighbours send DATA (default: beside the control socket)")

    group = commands.add_parser(
        "group", help="join a run as a sub-supervisor (started by its supervisor)",
        description="Join a run as one of its groups: start the workers and groups under "
                    "it (--tree), speak for them to its supervisor, stop them when it says "
                    "stop. Supervisors and agents start groups themselves; credentials as "
                    "for `worker`.",
        epilog="Exit codes: 0 stopped cleanly, 1 failed (the supervisor was told why), "
               "2 usage error, 3 the supervisor vanished, 130/143 SIGINT/SIGTERM.")
    replica = commands.add_parser(
        "replica", help="serve as one replica of a service (started by hiocluster run)",
        description="Serve as one replica of a service: the service's spec and the run's "
                    "token come in $HIOCLUSTER_SERVICE and $HIOCLUSTER_CREDENTIALS; "
                    "`hiocluster run` starts replicas itself.",
        epilog="Exit codes: 0 stopped cleanly, 1 cannot serve, 2 usage error, 3 the "
               "supervisor vanished.")
    replica.add_argument("--connect", required=True, metavar="ADDRESS", type=_address,
                         help="the run's services socket")
    replica.add_argument("--name", required=True, metavar="SERVICE.REPLICA.INCARNATION",
                         help="which replica this is")
    _app_dir(replica)

    report = commands.add_parser(
        "report", help="summarise a trace written by run --trace",
        description="Print where a traced run's ticks went (per process: tick time p50 "
                    "and p99, time waiting for neighbours; the slowest process and "
                    "node) and, with --png, draw ticks/s over time and each process's "
                    "time running vs waiting (needs matplotlib).")
    report.add_argument("trace", metavar="TRACE", help="a file written by run --trace")
    report.add_argument("--png", metavar="FILE", help="also write this picture")

    status = commands.add_parser(
        "status", help="show a running run's services and simulation",
        description="Show a running run: each service's replicas (pid, state, restarts, "
                    "uptime, CPU, memory, requests served) and the simulation's progress.",
        epilog="Exit codes: 0 every replica serving, 3 some are not, 4 no run reachable, "
               "2 usage (also: several runs found; name one with --control).")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    scale = commands.add_parser(
        "scale", help="change a service's number of replicas",
        description="Change a service's number of replicas, without refusing "
                    "connections: new replicas serve beside the others; removed ones "
                    "drain first. Waits until done.",
        epilog="Exit codes: 0 done, 1 refused, 3 not done in time, 4 no run reachable, "
               "2 usage (also: several runs found; name one with --control).")
    scale.add_argument("target", metavar="NAME=N", type=_scale_target,
                       help="the service and its new number of replicas")
    restart = commands.add_parser(
        "restart", help="rolling restart of a service",
        description="Restart a service's replicas one at a time; each one's successor "
                    "serves before it is stopped. Waits until done.",
        epilog="Exit codes: 0 done, 1 refused, 3 not done in time, 4 no run reachable, "
               "2 usage (also: several runs found; name one with --control).")
    restart.add_argument("service", metavar="NAME", type=_name, help="the service")
    stop = commands.add_parser(
        "stop", help="stop a running run",
        description="Stop a running run: replicas drain and exit, a simulation stops. "
                    "Prints 'stopping', then 'stopped' once the run confirms it stopped.",
        epilog="Exit codes: 0 stopped (the run confirmed it), 1 refused, or the run "
               "vanished (e.g. was killed) or failed before confirming its stop, 2 usage "
               "(also: several runs found; name one with --control), 3 not stopped in "
               "time, 4 no run reachable.")
    for command in (status, scale, restart, stop):
        command.add_argument("--control", metavar="ADDRESS", type=_address,
                             help="the run's control endpoint (default: $HIOCLUSTER_CONTROL, "
                                  "else the one run found)")
        if command is not status:
            command.add_argument("--timeout", type=float, default=60.0, metavar="S",
                                 help="seconds to wait until done (default 60)")

    group.add_argument("--tree", required=True, metavar="FILE",
                       help="JSON: each child -> its node names (a worker) or its own tree "
                            "(a group)")
    _joining(group, "group", "this group's name in the run's plan",
             "where the workers under it bind for DATA (default: beside its control socket)")
    return parser


def _run_options(command: argparse.ArgumentParser) -> None:
    """The options of ``run``, which ``check`` takes too: any run's command line
    checks as it is."""
    command.add_argument("--ticks", type=_positive_int, metavar="N",
                         help="number of ticks (default: the file's run.ticks)")
    command.add_argument("--seed", type=_seed, metavar="S",
                         help="run seed (default: the file's run.seed)")
    _processes(command)
    command.add_argument("--window", type=_window, default=None, metavar="N",
                         help="ticks granted at once (default: auto, sized to ~0.1 s of work); "
                              "1 supervises every tick; results never depend on it")
    command.add_argument("--real", action="store_true", default=None,
                         help="pace ticks to the wall clock: tick n starts tock x n seconds "
                              "after the start (default: the file's run.real)")
    command.add_argument("--json", action="store_true",
                         help="print one JSON object on stdout instead of the summary "
                              "(arrays in results as {dtype, shape, data}, bytes as hex)")
    command.add_argument("--digests", action="store_true",
                         help="also print every tick's run digest (after the summary, or as "
                              "tick_digests with --json)")
    command.add_argument("--trace", metavar="FILE",
                         help="record where each tick's time goes and write it to FILE as "
                              "Chrome Trace Event JSON (Perfetto, chrome://tracing); the "
                              "summary names the slowest process and node")
    command.add_argument("--output", metavar="FILE",
                         help="after a finished run, write one JSON line per node to FILE: "
                              "its result() and its metrics (JSON as --json's)")
    _app_dir(command)
    command.add_argument("--transport", choices=("ipc", "tcp", "local"), default=None,
                         help="how local processes talk: ZeroMQ over unix sockets (ipc, "
                              "the default) or TCP on 127.0.0.1 (tcp), or local: ZeroMQ "
                              "for control and plain unix SEQPACKET sockets for DATA "
                              "(faster; every worker on this host, no --host/--keys); "
                              "default: the file's run.transport, else ipc; results are "
                              "identical")
    command.add_argument("--listen", metavar="ADDRESS", type=_address,
                         help="bind the control socket here (e.g. tcp://127.0.0.1:7000), for "
                              "workers started by hand")
    command.add_argument("--keys", metavar="DIR",
                         help="CurveZMQ keys for a run across hosts: DIR/supervisor.key_secret "
                              "and DIR/<host>.key for each host (see keygen)")
    _hosts_options(command)
    command.add_argument("--external", metavar="NAME", action="append", default=[],
                         type=_name,
                         help="do not start worker NAME: wait for it to be started by hand "
                              "(the command to use is printed); repeatable")
    command.add_argument("--no-prefix", action="store_true",
                         help="pass replicas' output through without the 'name | ' prefix")


def _joining(command: argparse.ArgumentParser, what: str, name_help: str,
             bind_help: str) -> None:
    """The options of a process that joins a run: ``worker`` and ``group``."""
    command.add_argument("--connect", required=True, metavar="ADDRESS", type=_address,
                         help="the supervisor's control address (ipc://... or tcp://...)")
    command.add_argument("--name", required=True, metavar="NAME", type=_name, help=name_help)
    command.add_argument("--credentials", metavar="FILE",
                         help=f"file holding this {what}'s credentials (JSON)")
    command.add_argument("--bind", metavar="ADDRESS", type=_address, help=bind_help)
    command.add_argument("--data", choices=("zmq", "local"), default="zmq",
                         help="how DATA travels between workers: ZeroMQ (default), or "
                              "local: unix SEQPACKET sockets (the run's --transport local; "
                              "the default --bind is then unix://<dir of control>/d-NAME)")
    _app_dir(command)
    command.add_argument("--run-dir", metavar="DIR", help=argparse.SUPPRESS)
    command.add_argument("--tick-file", metavar="FILE", help=argparse.SUPPRESS)


def _hosts_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--host", metavar="NAME=ADDRESS", action="append", default=[],
                         type=_host, help="a host and its agent, e.g. h1=tcp://h1:7100 "
                                          "(instead of the file's [hosts]); repeatable")
    command.add_argument("--place", metavar="WORKER=HOST", action="append", default=[],
                         type=_place, help="run WORKER on HOST (a --host); repeatable")


def _processes(command: argparse.ArgumentParser) -> None:
    command.add_argument("--processes", type=_positive_int, metavar="P",
                         help="spread the nodes over P worker processes, without groups "
                              "(default: the file's placement and groups, else one per core; "
                              "1 puts every node in one)")


def _app_dir(command: argparse.ArgumentParser) -> None:
    command.add_argument("--app-dir", metavar="DIR",
                         help="directory to import node classes from (default: current "
                              "directory)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hiocluster`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("worker", "group"):
        return _worker(parser, args)
    if args.command == "keygen":
        return _keygen(parser, args)
    if args.command == "agent":
        return _agent(args)
    if args.command == "replica":
        return _replica(parser, args)
    if args.command == "report":
        return _report(args)
    if args.command in ("status", "scale", "restart", "stop"):
        from hiocluster.control.client import control_main
        return control_main(args)
    try:
        return _check(args) if args.command == "check" else _run(args)
    except TopologyError as exc:  # also raised by run() for an impossible plan
        print(f"hiocluster: {exc}", file=sys.stderr)
        _json_error(args, exc, {"key_path": exc.key_path, "line": exc.line})
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. `hiocluster run ... | head -1`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as exc:  # the machine ran out of something: one line, no traceback
        if _exhausted(exc) is None:
            raise
        return _failed(args, Exhausted(str(exc)).with_cause(exc), {})


#: Open files a run holds besides its children's, and per child process (measured:
#: a ring of 8 workers needs 47; the margin is for services' sockets and pipes).
FILES_BASE, FILES_PER_PROCESS = 24, 6


def _enough_files(processes: int) -> None:
    """Make sure ``processes`` children fit in RLIMIT_NOFILE: raise the soft limit
    (up to the hard one) if need be, else Exhausted naming it. Checked up front:
    libzmq aborts the whole process when it runs out of descriptors in its own
    thread, and an abort cleans nothing up."""
    import resource

    need = FILES_BASE + FILES_PER_PROCESS * processes
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard == resource.RLIM_INFINITY or hard >= need:
        wanted = 2 * need if hard == resource.RLIM_INFINITY else min(hard, 2 * need)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return
    raise Exhausted(f"too many open files (RLIMIT_NOFILE {soft}): {processes} processes "
                    f"need about {need}; raise the limit (ulimit -n {need})")


def _exhausted(exc: BaseException) -> str | None:
    """What ran out, if ``exc`` (or what caused it) says a resource did: e.g. "no
    space left on device (PATH)", "too many open files (RLIMIT_NOFILE 32)"."""
    import errno
    import resource
    import tempfile

    seen: BaseException | None = exc
    while seen is not None:
        code = getattr(seen, "errno", None)
        if code in (errno.EMFILE, errno.ENFILE):
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            return "too many open files in the system (fs.file-max)" \
                if code == errno.ENFILE else f"too many open files (RLIMIT_NOFILE {soft})"
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            path = getattr(seen, "filename", None) or \
                f"{os.environ.get('HIOCLUSTER_RUN_ROOT') or tempfile.gettempdir()}, the run root"
            what = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota "
                    "exceeded", errno.EROFS: "read-only file system"}[code]
            return f"{what} ({path})"
        if code == errno.ENOMEM:
            return "out of memory"
        seen = seen.__cause__ or seen.__context__
    return None


def _load(args: argparse.Namespace) -> Any:
    """The topology with the CLI's overrides, and its placement plan."""
    from hiocluster.topology import load, plan

    topology = load(args.topology)
    changes = {key: getattr(args, key, None) for key in ("ticks", "seed", "real")}
    changes = {key: value for key, value in changes.items() if value is not None}
    if getattr(args, "host", None) or getattr(args, "place", None):
        changes["hosts"] = _hosts_from(args)
    if changes:
        topology = topology.replace(**changes)
    return topology, plan(topology, args.processes) if topology.nodes else None


def _names(names: Sequence[str], shown: int = 8) -> str:
    if len(names) <= shown:
        return " ".join(names)
    return f"{' '.join(names[:3])} ... {' '.join(names[-2:])}"


def _check(args: argparse.Namespace) -> int:
    from hiocluster.topology import resolve_classes, resolve_services

    topology, layout = _load(args)
    resolve_services(topology, args.app_dir)
    if layout is not None:
        resolve_classes(topology, args.app_dir)  # run() does this itself
        from hiocluster.runtime.loop import Loop
        from hiocluster.supervision.supervisor import Supervisor
        try:  # run()'s own checks of --transport, --listen, --keys, --external: made,
            # never entered, it starts nothing
            Supervisor(topology, layout, Loop(), app_dir=args.app_dir, keys=args.keys,
                       transport=args.transport, listen=args.listen, external=args.external)
        except TopologyError:
            raise
        except ClusterError as exc:
            print(f"hiocluster: check: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"ok: {topology.name}: {len(topology.nodes)} nodes, {len(topology.links)} "
              f"links, {topology.ticks} ticks; {len(layout.workers)} workers on "
              f"{os.cpu_count()} cores, {layout.crossing(topology.links)} links between "
              "workers")
        for worker in layout.workers[:20]:
            host = layout.hosts.get(worker.name)
            where = f" on {host.name} ({host.agent})" if host is not None else ""
            print(f"  {worker.name}{where}: {len(worker.nodes)} nodes: "
                  f"{_names(worker.node_names)}")
        if len(layout.workers) > 20:
            print(f"  ... and {len(layout.workers) - 20} more workers")
        if layout.groups:
            print("groups: " + "; ".join(
                f"{name} [{', '.join(members)}]"
                + (f" on {layout.hosts[name].name}" if name in layout.hosts else "")
                for name, members in layout.groups.items()))
    else:
        print(f"ok: {topology.name}: {len(topology.services)} services")
    for spec in topology.services:
        print(f"service {spec.name}: {spec.replicas} x {spec.cls} on {spec.address}"
              f"{' (tls)' if spec.tls else ''}; {spec.restart}, at most {spec.max_restarts} "
              f"restarts in {spec.within:g} s")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from hiocluster.runtime.output import Prefixer
    from hiocluster.supervision.supervisor import run

    topology, layout = _load(args)
    try:
        _enough_files(sum(spec.replicas + 1 for spec in topology.services)  # +1: a spare
                      + (len(layout.workers) + len(layout.groups) if layout else 0))
    except Exhausted as exc:
        return _failed(args, exc, {})
    if topology.services and not topology.nodes:
        return _serve(args, topology)

    def announce(supervisor: Any) -> None:  # once the control socket is bound
        if topology.services:
            print(f"hiocluster: control: HIOCLUSTER_CONTROL={supervisor.endpoint_address}",
                  file=sys.stderr, flush=True)
        for name in args.external:
            print(f"hiocluster: waiting for worker {name}: "
                  f"{supervisor.worker_command_line(name)}", file=sys.stderr, flush=True)

    with _progress(topology.ticks) as on_tick:
        try:
            result = run(topology, processes=args.processes, app_dir=args.app_dir,
                         window=args.window, on_tick=on_tick, keep_digests=args.digests,
                         transport=args.transport, listen=args.listen, keys=args.keys,
                         external=args.external, on_listening=announce,
                         prefixer=Prefixer(prefix=not args.no_prefix),
                         trace=bool(args.trace))
        except Interrupted as exc:
            print(f"hiocluster: {exc}; every process was shut down", file=sys.stderr)
            _json_error(args, exc, {"signal": exc.signal})
            return 128 + exc.signal
        except RunFailed as exc:
            return _failed(args, exc, {"worker": exc.worker, "nodes": list(exc.nodes),
                                       "tick": exc.tick, "cause": exc.cause})
        except TopologyError:
            raise
        except ClusterError as exc:
            return _failed(args, exc, {})
    if args.trace:
        from hiocluster.supervision.trace import chrome
        try:
            with open(args.trace, "w", encoding="utf-8") as file:
                json.dump(chrome(result.trace), file)
        except OSError as exc:
            print(f"hiocluster: cannot write --trace {args.trace}: {exc}", file=sys.stderr)
            return EXIT_FAILED
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as file:
                for line in result.lines():
                    file.write(json.dumps(line) + "\n")
        except OSError as exc:
            print(f"hiocluster: cannot write --output {args.output}: {exc}", file=sys.stderr)
            return EXIT_FAILED
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(summary(result))
        if result.tick_digests:
            width = len(str(len(result.tick_digests) - 1))
            print("\n".join(f"tick {tick:>{width}} {digest}"
                             for tick, digest in enumerate(result.tick_digests)))
        if result.trace:
            from hiocluster.supervision.trace import lines
            print("\n".join(lines(result.trace)))
        if result.services:
            print(services_summary(result.services))
    return EXIT_OK


def _agent(args: argparse.Namespace) -> int:
    from hiocluster.hosts.agent import AgentOptions, run_agent

    return run_agent(AgentOptions(listen=args.listen, keys=args.keys, name=args.name,
                                  trust=tuple(args.trust),
                                  app_dir=os.path.abspath(args.app_dir or os.getcwd()),
                                  advertise=args.advertise))


def _keygen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from hiocluster.runtime.transport import write_key_pair

    directory = args.directory
    taken = [name for name in args.names for suffix in (".key", ".key_secret")
             if os.path.exists(os.path.join(directory, name + suffix))]
    if taken and args.skip_existing:
        args.names = [name for name in args.names if name not in taken]
    elif taken:
        parser.error(f"keygen: a key for {', '.join(sorted(set(taken)))} exists in "
                     f"{directory}; remove it first to make a new one")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        for name in args.names:
            public, secret = write_key_pair(directory, name)
            print(f"{name}: {public} (public), {secret} (secret)")
    except OSError as exc:
        print(f"hiocluster: keygen: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _worker(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from hiocluster.runtime.launch import parent_from_env
    from hiocluster.runtime.transport import CREDENTIALS_ENV, Credentials
    from hiocluster.runtime.watchdog import parent_gone
    from hiocluster.worker.process import WorkerOptions, run_worker

    parent = parent_from_env()

    try:
        if args.credentials:
            with open(args.credentials, encoding="utf-8") as file:
                text = file.read()
        else:
            text = os.environ.get(CREDENTIALS_ENV, "")
        credentials = Credentials.from_json(text)
    except (OSError, ValueError) as exc:
        parser.error(f"{args.command}: no usable credentials ({exc}): pass --credentials "
                     f"FILE or set ${CREDENTIALS_ENV}")
    if args.command == "group":
        from hiocluster.supervision.group import GroupOptions, load_tree, run_group
        try:
            tree = load_tree(args.tree)
        except ValueError as exc:
            if parent_gone(parent):  # its supervisor, and the file, are gone already
                print(f"hiocluster group {args.name}: orphaned: its supervisor is gone",
                      file=sys.stderr)
                return 3
            parser.error(f"group: --tree: {exc}")
        if args.run_dir:  # its supervisor wrote the file for it alone
            with contextlib.suppress(OSError):
                os.unlink(args.tree)
        return run_group(GroupOptions(connect=args.connect, name=args.name, tree=tree,
                                      credentials=credentials, bind=args.bind,
                                      app_dir=args.app_dir, run_dir=args.run_dir,
                                      tick_file=args.tick_file, parent=parent,
                                      data=args.data))
    return run_worker(WorkerOptions(connect=args.connect, name=args.name,
                                    credentials=credentials, bind=args.bind,
                                    app_dir=args.app_dir, run_dir=args.run_dir,
                                    tick_file=args.tick_file, parent=parent,
                                    data=args.data))


def _serve(args: argparse.Namespace, topology: Any) -> int:
    from hiocluster.runtime.output import Prefixer
    from hiocluster.services.core import ServiceFailed
    from hiocluster.services.supervisor import CONTROL_ENV, serve

    def announce(run: Any) -> None:  # once the endpoint is bound
        print(f"hiocluster: control: {CONTROL_ENV}={run.endpoint_address}", file=sys.stderr,
              flush=True)

    try:
        result = serve(topology, app_dir=args.app_dir, on_listening=announce,
                       prefixer=Prefixer(prefix=not args.no_prefix))
    except ServiceFailed as exc:
        return _failed(args, exc, {"service": exc.service})
    except ClusterError as exc:  # e.g. no run directory: the run root is full
        return _failed(args, exc, {})
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(services_summary(result.services))
    return EXIT_OK


def services_summary(rows: list[dict[str, Any]]) -> str:
    """One line per service, after a run."""
    return "\n".join(f"{row['service']}: stopped; {row['served']} served, "
                     f"{row['restarts']} restarts" for row in rows)


def _report(args: argparse.Namespace) -> int:
    from hiocluster.supervision.trace import lines, load, plot

    try:
        trace = load(args.trace)
    except ValueError as exc:
        print(f"hiocluster: report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print("\n".join(lines(trace)))
    if args.png:
        try:
            plot(trace, args.png)
        except ImportError:
            print("hiocluster: report: --png needs matplotlib (pip install matplotlib)",
                  file=sys.stderr)
            return EXIT_FAILED
        print(f"wrote {args.png}")
    return EXIT_OK


def _replica(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from hiocluster.services.replica import options_from, run_replica

    try:
        options = options_from(args.connect, args.name, args.app_dir)
    except ValueError as exc:
        parser.error(f"replica: {exc}")
    return run_replica(options)


def _failed(args: argparse.Namespace, exc: ClusterError, fields: dict[str, Any]) -> int:
    resource = _exhausted(exc)
    if resource is not None and not str(exc).startswith(resource):
        exc = Exhausted(f"{resource}: {exc}").with_cause(exc)
    print(f"hiocluster: run failed: {exc}", file=sys.stderr)
    _json_error(args, exc, fields)
    return EXIT_FAILED


def _json_error(args: argparse.Namespace, exc: ClusterError, fields: dict[str, Any]) -> None:
    """With --json, every outcome is one JSON object on stdout: here, the error."""
    if getattr(args, "json", False):
        print(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc),
                                    **fields}}))


def summary(result: Any) -> str:
    """The human summary printed after a successful run."""
    processes = f"{result.processes} process" + ("es" if result.processes != 1 else "")
    if result.groups:
        processes += f" ({result.groups} group" + ("s)" if result.groups != 1 else ")")
    late = [f"late     {result.late_ticks} ticks started more than one tock late"] \
        if result.real else []
    return "\n".join([
        f"{result.topology}: {result.ticks} ticks, {result.node_count} nodes on "
        f"{processes} in {result.seconds:.3f} s "
        f"({result.ticks_per_second:,.0f} ticks/s; start-up {result.startup_seconds:.3f} s)",
        f"digest   {result.digest}",
        f"messages {result.messages} delivered or in flight; {result.undelivered} in flight "
        f"at stop, {result.unread} unread in inboxes; {result.rejected_frames} frames "
        "rejected",
    ] + late + [f"metric   {name} {value:,} ({value / result.seconds:,.0f}/s)"
         for name, value in result.metrics.items() if result.seconds > 0]
        + [_spread(name, kind, [metrics[name] for metrics in result.node_metrics.values()
                                if name in metrics])
           for name, kind in result.metric_kinds.items()])


def _spread(name: str, kind: str, values: list[float]) -> str:
    """A gauge's or a duration's line: min, mean and max over the nodes."""
    if not values:
        return f"metric   {name} ({kind}): no node reported it"
    mean = sum(values) / len(values)
    return (f"metric   {name} ({kind}) min {min(values):,.6g} mean {mean:,.6g} "
            f"max {max(values):,.6g} over {len(values)} nodes")


class _progress:
    """A rich progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar: Any = None

    def __enter__(self) -> Callable[[int, int], None] | None:
        if not sys.stderr.isatty():
            return None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("ticking"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task("run", total=self.total, rate="")
        first: list[tuple[int, float]] = []

        def on_tick(done: int, total: int) -> None:  # called as windows complete
            now = time.monotonic()
            if not first:
                first.append((done, now))
            ticks, seconds = done - first[0][0], now - first[0][1]
            rate = f"{ticks / seconds:,.0f} ticks/s" if seconds > 0 and ticks else ""
            self.bar.update(task, completed=done, rate=rate)
        return on_tick

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
