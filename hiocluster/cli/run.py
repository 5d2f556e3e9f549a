"""``run``, ``check`` and ``report``: a topology with the command line's overrides,
checked, or run (its simulation in lockstep, its services as replicas) and
summarised; and where a traced run's ticks went."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import IO, Any, Callable, Mapping, Sequence

from hiocluster.cli.output import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ProgressBar,
    failed,
    json_error,
    services_summary,
    summary,
)
from hiocluster.cli.resources import enough_files, exhausted
from hiocluster.errors import (
    ClusterError,
    Exhausted,
    Interrupted,
    LaunchError,
    MetricsError,
    RunFailed,
    TopologyError,
)


def topology_main(args: argparse.Namespace) -> int:
    """``run`` or ``check``, with a topology error as exit code 2 and what ran out of
    the machine as a failed run: one line each, no traceback."""
    try:
        return check_main(args) if args.command == "check" else run_main(args)
    except TopologyError as exc:  # also raised by run() for an impossible plan
        print(f"hiocluster: {exc}", file=sys.stderr)
        json_error(args, exc, {"key_path": exc.key_path, "line": exc.line})
        return EXIT_USAGE
    except LaunchError as exc:  # --launcher slurm outside an allocation, no srun
        print(f"hiocluster: {exc}", file=sys.stderr)
        json_error(args, exc, {})
        return EXIT_USAGE
    except MetricsError as exc:  # its address is taken: nothing started
        return failed(args, exc, {})
    except BrokenPipeError:  # e.g. `hiocluster run ... | head -1`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as exc:  # the machine ran out of something: one line, no traceback
        if exhausted(exc) is None:
            raise
        return failed(args, Exhausted(str(exc)).with_cause(exc), {})


def check_main(args: argparse.Namespace) -> int:
    from hiocluster.topology import resolve_classes, resolve_services

    topology, layout = _load(args)
    resolve_services(topology, args.app_dir)
    slurm = _allocation(args)
    if layout is not None:
        resolve_classes(topology, args.app_dir)  # run() does this itself
        from hiocluster.runtime.loop import Loop
        from hiocluster.supervision.supervisor import Supervisor, checkpointable, restart_checks
        if topology.restart == "checkpoint":
            restart_checks(topology, layout, args.external)
            checkpointable(topology, args.app_dir)
        try:  # run()'s own checks of --transport, --listen, --keys, --external: made,
            # never entered, it starts nothing
            made = Supervisor(topology, layout, Loop(), app_dir=args.app_dir, keys=args.keys,
                              transport=args.transport, listen=args.listen,
                              external=args.external, slurm=slurm)
        except TopologyError:
            raise
        except ClusterError as exc:
            print(f"hiocluster: check: {exc}", file=sys.stderr)
            return EXIT_USAGE
        _print_plan(topology, layout, made.slurm_nodes)
        if slurm is not None:
            print(f"launcher: slurm: job {slurm.job}, {slurm.ntasks} tasks on "
                  f"{len(slurm.nodes)} nodes; each worker a job step; the supervisor at "
                  f"{made.listen}")
    else:
        from hiocluster.runtime.loop import Loop
        from hiocluster.services.supervisor import ServiceRun
        try:  # serve()'s own checks of the services' hosts and --keys: made, never entered
            ServiceRun(topology, Loop(), app_dir=args.app_dir, keys=args.keys)
        except TopologyError:
            raise
        except ClusterError as exc:
            print(f"hiocluster: check: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"ok: {topology.name}: {len(topology.services)} services")
    for spec in topology.services:
        hosts = f" on hosts {', '.join(spec.hosts)}" if spec.hosts else ""
        print(f"service {spec.name}: {spec.replicas} x {spec.cls} on {spec.address}{hosts}"
              f"{' (tls)' if spec.tls else ''}; {spec.restart}, at most {spec.max_restarts} "
              f"restarts in {spec.within:g} s")
    return EXIT_OK


def _allocation(args: argparse.Namespace) -> Any:
    """The Slurm allocation of ``--launcher slurm`` (None: local)."""
    if getattr(args, "launcher", "local") != "slurm":
        return None
    from hiocluster.hosts.slurm import Allocation
    return Allocation.from_environment()


def _print_plan(topology: Any, layout: Any, nodes: Mapping[str, str]) -> None:
    """``check``'s lines about the nodes: how many, on which workers and groups."""
    print(f"ok: {topology.name}: {len(topology.nodes)} nodes, {len(topology.links)} "
          f"links, {topology.ticks} ticks; {len(layout.workers)} workers on "
          f"{os.cpu_count()} cores, {layout.crossing(topology.links)} links between "
          "workers")
    for worker in layout.workers[:20]:
        host = layout.hosts.get(worker.name)
        where = f" on {host.name} ({host.agent})" if host is not None else \
            f" on Slurm node {nodes[worker.name]}" if worker.name in nodes else ""
        print(f"  {worker.name}{where}: {len(worker.nodes)} nodes: "
              f"{_names(worker.node_names)}")
    if len(layout.workers) > 20:
        print(f"  ... and {len(layout.workers) - 20} more workers")
    if layout.groups:
        print("groups: " + "; ".join(
            f"{name} [{', '.join(members)}]"
            + (f" on {layout.hosts[name].name}" if name in layout.hosts else "")
            for name, members in layout.groups.items()))
    if topology.restart == "checkpoint":
        from hiocluster.supervision.supervisor import checkpoint_interval
        every = checkpoint_interval(topology)
        print(f"restarts: a worker that dies, hangs or loses its host sends every worker "
              f"back to the last checkpoint (every {every} ticks), at most "
              f"{topology.max_restarts} in {topology.within:g} s")


def _names(names: Sequence[str], shown: int = 8) -> str:
    if len(names) <= shown:
        return " ".join(names)
    return f"{' '.join(names[:3])} ... {' '.join(names[-2:])}"


def _load(args: argparse.Namespace) -> Any:
    """The topology with the CLI's overrides, and its placement plan."""
    from hiocluster.topology import load, plan

    topology = load(args.topology)
    changes = {key: getattr(args, key, None) for key in ("ticks", "seed", "real", "metrics")}
    changes = {key: value for key, value in changes.items() if value is not None}
    if getattr(args, "host", None) or getattr(args, "place", None):
        changes["hosts"] = _hosts_from(args)
    if changes:
        topology = topology.replace(**changes)
    processes = args.processes
    if processes is None and topology.nodes and not topology.placement:
        slurm = _allocation(args)  # under Slurm: a worker per task
        if slurm is not None:
            processes = min(slurm.ntasks, len(topology.nodes))
    return topology, plan(topology, processes) if topology.nodes else None


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


def run_main(args: argparse.Namespace) -> int:
    from hiocluster.runtime.output import Prefixer
    from hiocluster.supervision.supervisor import run

    topology, layout = _load(args)
    try:
        enough_files(sum(spec.replicas + 1 for spec in topology.services)  # +1: a spare
                     + (len(layout.workers) + len(layout.groups) if layout else 0))
    except Exhausted as exc:
        return failed(args, exc, {})
    if topology.services and not topology.nodes:
        return _serve(args, topology)

    def announce(supervisor: Any) -> None:  # once the control socket is bound
        if topology.services:
            print(f"hiocluster: control: HIOCLUSTER_CONTROL={supervisor.endpoint_address}",
                  file=sys.stderr, flush=True)
        say_metrics(supervisor)
        for name in args.external:
            print(f"hiocluster: waiting for worker {name}: "
                  f"{supervisor.worker_command_line(name)}", file=sys.stderr, flush=True)

    with ProgressBar(topology.ticks, quiet=args.quiet) as on_tick:
        try:
            result = run(topology, processes=args.processes, app_dir=args.app_dir,
                         window=args.window, on_tick=on_tick,
                         keep_digests=args.digests is True,
                         digests_file=args.digests if isinstance(args.digests, str) else None,
                         transport=args.transport, listen=args.listen, keys=args.keys,
                         external=args.external, on_listening=announce,
                         prefixer=Prefixer(prefix=not args.no_prefix),
                         trace=bool(args.trace), checkpoint=args.checkpoint,
                         checkpoint_every=args.checkpoint_every, resume=args.resume,
                         on_restart=lambda restart: print(
                             f"hiocluster: {restart}", file=sys.stderr, flush=True),
                         record=args.record, launcher=args.launcher,
                         observe=getattr(args, "observe", None))
        except Interrupted as exc:
            return _interrupted(args, exc, topology.ticks)
        except RunFailed as exc:
            return _failed_run(args, exc, topology)
        except (TopologyError, LaunchError):
            raise
        except ClusterError as exc:
            return failed(args, exc, {})
    if not _write_files(args, result):
        return EXIT_FAILED
    _print_result(args, result)
    if args.record:
        from hiocluster.worker.record import directory_size
        print(f"hiocluster: recorded {directory_size(args.record) / 2**20:,.1f} MiB into "
              f"{args.record} (`hiocluster replay {args.record} --worker NAME`)",
              file=sys.stderr)
    return EXIT_OK


def _interrupted(args: argparse.Namespace, exc: Interrupted, ticks: int) -> int:
    """A signal stopped the run: say how far it got; the results so far, where every
    worker stopped after the same tick, go to --output (and --trace) as a finished
    run's do, marked interrupted. Exit 128 + the signal."""
    partial = exc.partial
    if partial is None:
        print(f"hiocluster: {exc}; every process was shut down", file=sys.stderr)
        json_error(args, exc, {"signal": exc.signal})
        return 128 + exc.signal
    written = [f"--{option} {getattr(args, option)}" for option in ("output", "trace")
               if getattr(args, option)]
    said = "; results so far in " + " and ".join(written) if written else ""
    print(f"hiocluster: {exc} after tick {partial.ticks - 1:,} ({partial.ticks:,} of "
          f"{ticks:,} ticks, digest {partial.digest}); every process was shut down{said}",
          file=sys.stderr)
    json_error(args, exc, {"signal": exc.signal, "ticks": partial.ticks,
                           "digest": partial.digest})
    _write_files(args, partial)
    return 128 + exc.signal


def _failed_run(args: argparse.Namespace, exc: RunFailed, topology: Any) -> int:
    """A run that failed: the failure, then how far the run got as a whole (the
    last tick every worker finished, the newest checkpoint to resume from); --output
    gets every node, marked failed at that tick, its result not collected (no
    consistent state holds one). Exit 1."""
    fields = {"worker": exc.worker, "nodes": list(exc.nodes), "tick": exc.tick,
              "cause": exc.cause, "reached": exc.reached, "digest": exc.digest,
              "checkpoint": exc.checkpoint}
    code = failed(args, exc, {key: value for key, value in fields.items()
                              if value is not None})
    if exc.reached is None:
        return code
    said = [f"every worker finished tick {exc.reached:,} (digest {exc.digest})"
            if exc.reached >= 0 else "no tick was finished by every worker"]
    if exc.checkpoint:
        said.append(f"the newest checkpoint is {exc.checkpoint}: `--resume "
                    f"{args.checkpoint}` goes on from there")
    if args.output:
        rows = [{"node": node.name, "result": None, "metrics": {}, "status": "failed",
                 "tick": exc.reached, "worker": exc.worker, "cause": exc.cause}
                for node in sorted(topology.nodes, key=lambda node: node.name)]

        def output(file: IO[str]) -> None:
            for row in rows:
                file.write(json.dumps(row) + "\n")
        if _write("--output", args.output, output):
            said.append(f"--output {args.output} marks every node failed at that tick")
    print(f"hiocluster: {'; '.join(said)}", file=sys.stderr)
    return code


def _write_files(args: argparse.Namespace, result: Any) -> bool:
    """--trace and --output (a run's result, or an interrupted run's results so
    far); False (said on stderr) if one failed."""
    if args.trace:
        from hiocluster.supervision.trace import chrome

        def trace(file: IO[str]) -> None:
            json.dump(chrome(result.trace), file)
        if not _write("--trace", args.trace, trace):
            return False
    if args.output:
        def output(file: IO[str]) -> None:
            for line in result.lines():
                file.write(json.dumps(line) + "\n")
        if not _write("--output", args.output, output):
            return False
    if getattr(args, "observe", None):
        cut, since = result.observations_cut, result.observations_from
        print(f"hiocluster: {result.observations_rows:,} observations in {args.observe}" + (
            f" (from tick {since}: the run resumed from a checkpoint there)"
            if since else "") + (
            f" (up to tick {cut}: too many in one window of a worker, the rest were not "
            "kept)"
            if cut is not None else ""), file=sys.stderr)
    return True


def _write(option: str, path: str, write: Callable[[IO[str]], None]) -> bool:
    try:
        with open(path, "w", encoding="utf-8") as file:
            write(file)
    except OSError as exc:
        print(f"hiocluster: cannot write {option} {path}: {exc}", file=sys.stderr)
        return False
    return True


def _print_result(args: argparse.Namespace, result: Any) -> None:
    """A finished run on stdout: one JSON object, or the summary and what was asked for."""
    if args.json:
        print(json.dumps(result.to_json()))
        return
    print(summary(result))
    if result.tick_digests:
        first = 0 if result.resumed_from is None else result.resumed_from + 1
        width = len(str(first + len(result.tick_digests) - 1))
        print("\n".join(f"tick {tick:>{width}} {digest}"
                         for tick, digest in enumerate(result.tick_digests, start=first)))
    if result.trace:
        from hiocluster.supervision.trace import lines
        print("\n".join(lines(result.trace)))
    if result.services:
        print(services_summary(result.services))


def say_metrics(run: Any) -> None:
    """Where the run's Prometheus endpoint is (once a run; a restart keeps it)."""
    metrics = run.metrics
    if metrics is not None and not getattr(metrics, "said", False):
        metrics.said = True
        print(f"hiocluster: metrics: http://{metrics.address}/metrics", file=sys.stderr,
              flush=True)


def _serve(args: argparse.Namespace, topology: Any) -> int:
    """A run of services only: until SIGINT, SIGTERM or ``hiocluster stop``."""
    from hiocluster.runtime.output import Prefixer
    from hiocluster.services.core import ServiceFailed
    from hiocluster.services.supervisor import CONTROL_ENV, serve

    def announce(run: Any) -> None:  # once the endpoint is bound
        print(f"hiocluster: control: {CONTROL_ENV}={run.endpoint_address}", file=sys.stderr,
              flush=True)
        say_metrics(run)

    try:
        result = serve(topology, app_dir=args.app_dir, on_listening=announce,
                       prefixer=Prefixer(prefix=not args.no_prefix), keys=args.keys)
    except ServiceFailed as exc:
        return failed(args, exc, {"service": exc.service})
    except (TopologyError, LaunchError):  # nothing started: usage errors, as run's
        raise
    except ClusterError as exc:  # e.g. no run directory: the run root is full
        return failed(args, exc, {})
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(services_summary(result.services))
    return EXIT_OK


def sweep_main(args: argparse.Namespace) -> int:
    """``hiocluster sweep``: the table on stdout (or --output), one line per run."""
    from hiocluster.supervision.sweep import sweep

    names = [name for name, _ in args.param]
    if len(set(names)) != len(names):
        print(f"hiocluster: sweep: --param {sorted(n for n in names if names.count(n) > 1)[0]}"
              " is given twice", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = sweep(args.topology, dict(args.param) or None, seeds=args.seeds,
                       processes_per_run=args.processes_per_run, parallel=args.parallel,
                       app_dir=args.app_dir, progress=not args.quiet)
    except TopologyError as exc:
        print(f"hiocluster: {exc}", file=sys.stderr)
        json_error(args, exc, {"key_path": exc.key_path, "line": exc.line})
        return EXIT_USAGE
    if args.output:
        result.to_csv(args.output)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        for row in result.rows:
            outcome = f"FAILED: {row['error']}" if row["error"] else \
                f"digest {row['digest'][:16]}  {row['seconds']:.3f} s"
            print("  ".join([f"run {row['run']:>4}", *(f"{name}={value!r}" for name, value
                                                      in row["params"].items()),
                             f"seed {row['seed']}", outcome]))
        print(f"sweep: {len(result.rows)} runs, {len(result.failed)} failed, "
              f"{result.seconds:.1f} s" + (f"; table in {args.output}" if args.output else ""))
    return EXIT_FAILED if result.failed else EXIT_OK


def diff_main(args: argparse.Namespace) -> int:
    from hiocluster.errors import CheckpointError, DigestFileError, RecordError
    from hiocluster.supervision.digestfile import diff, diff_checkpoints, diff_records
    from hiocluster.worker.record import MANIFEST

    try:
        if not (os.path.isdir(args.a) and os.path.isdir(args.b)):
            found = diff(args.a, args.b)
        elif os.path.exists(os.path.join(args.a, MANIFEST)) or \
                os.path.exists(os.path.join(args.b, MANIFEST)):
            found = diff_records(args.a, args.b)
        else:
            found = diff_checkpoints(args.a, args.b)
    except (CheckpointError, DigestFileError, RecordError) as exc:
        print(f"hiocluster: diff: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(found.detail)
    return EXIT_OK if found.equal else EXIT_FAILED


def replay_main(args: argparse.Namespace) -> int:
    """``hiocluster replay``: exit 0 every digest as recorded, 1 one differs, 2 usage
    or a record (or checkpoint) that cannot be read."""
    from hiocluster.errors import CheckpointError, NodeFailed, RecordError
    from hiocluster.worker.replay import Diverged, replay

    if (args.break_at is None) != (args.node is None):
        print("hiocluster: replay: --break-at and --node go together", file=sys.stderr)
        return EXIT_USAGE
    try:
        done = replay(args.record, args.worker, app_dir=args.app_dir, until=args.until,
                      from_checkpoint=args.from_checkpoint, break_at=args.break_at,
                      node=args.node)
    except Diverged as exc:
        print(f"hiocluster: replay: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (RecordError, CheckpointError) as exc:
        print(f"hiocluster: replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NodeFailed as exc:  # a node's code failed in the replay
        print(f"hiocluster: replay: {exc}", file=sys.stderr)
        return EXIT_FAILED
    live = f"; the live run: {done.live:,.0f} ticks/s" if done.live else ""
    cut = "" if done.whole or args.until is not None else \
        " (the record is cut short: its run did not stop cleanly)"
    print(f"replayed {done.worker}: ticks {done.first:,}..{done.last:,}, {done.states:,} "
          f"digested states as recorded{cut}; {done.ticks_per_second:,.0f} ticks/s{live}")
    return EXIT_OK


def report_main(args: argparse.Namespace) -> int:
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
