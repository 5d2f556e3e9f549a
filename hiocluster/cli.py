"""The ``hiocluster`` command: argument parsing, progress, summary, exit codes.

Exit codes: 0 success, 1 failed run, 2 usage or topology error, 130 after
SIGINT, 143 after SIGTERM (the whole process tree shut down cleanly first).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

from . import __version__
from .errors import ClusterError, Interrupted, RunFailed, TopologyError

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hiocluster",
        description="Run hio Doists across processes in deterministic lockstep.",
        epilog="Exit codes: 0 ok, 1 run failed, 2 usage or topology error, "
               "130 interrupted (SIGINT), 143 terminated (SIGTERM).")
    parser.add_argument("--version", action="version", version=f"hiocluster {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a topology in lockstep and print a summary",
                              description="Run a topology in lockstep and print a summary.")
    run.add_argument("topology", metavar="TOPOLOGY", help="topology file (TOML)")
    run.add_argument("--ticks", type=_positive_int, metavar="N",
                     help="number of ticks (default: the file's run.ticks)")
    run.add_argument("--seed", type=_seed, metavar="S",
                     help="run seed (default: the file's run.seed)")
    run.add_argument("--processes", type=_positive_int, metavar="P",
                     help="spread the nodes over P processes (default: the file's placement; "
                          "1 puts every node in one process)")
    run.add_argument("--json", action="store_true",
                     help="print one JSON object on stdout instead of the summary")
    run.add_argument("--digests", action="store_true",
                     help="with --json, include every tick's run digest")
    run.add_argument("--app-dir", metavar="DIR",
                     help="directory to import node classes from (default: current directory)")
    run.add_argument("--transport", choices=("ipc", "tcp"), default="ipc",
                     help="how local processes talk: unix sockets (default) or TCP on "
                          "127.0.0.1; results are identical")

    check = commands.add_parser("check", help="validate a topology without running it",
                                description="Validate a topology (and import its node "
                                            "classes) without running it.")
    check.add_argument("topology", metavar="TOPOLOGY", help="topology file (TOML)")
    check.add_argument("--processes", type=_positive_int, metavar="P",
                       help="also check that the nodes can be spread over P processes")
    check.add_argument("--app-dir", metavar="DIR",
                       help="directory to import node classes from (default: current directory)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hiocluster`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return _check(args) if args.command == "check" else _run(args)
    except TopologyError as exc:  # also raised by run() for an impossible plan
        print(f"hiocluster: {exc}", file=sys.stderr)
        _json_error(args, exc, {"key_path": exc.key_path, "line": exc.line})
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. `hiocluster run ... | head -1`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _load(args: argparse.Namespace) -> Any:
    """The topology with the CLI's overrides, and its placement plan."""
    from .topology import load, plan

    topology = load(args.topology)
    changes = {key: getattr(args, key, None) for key in ("ticks", "seed")}
    changes = {key: value for key, value in changes.items() if value is not None}
    if changes:
        topology = topology.replace(**changes)
    return topology, plan(topology, args.processes)


def _check(args: argparse.Namespace) -> int:
    from .topology import resolve_classes

    topology, layout = _load(args)
    resolve_classes(topology, args.app_dir)  # run() does this itself
    processes = ", ".join(f"{p.name}=[{' '.join(p.node_names)}]" for p in layout.processes)
    print(f"ok: {topology.name}: {len(topology.nodes)} nodes, {len(topology.links)} links, "
          f"{topology.ticks} ticks; {len(layout.processes)} processes: {processes}")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from .supervisor import run

    topology, _ = _load(args)
    with _progress(topology.ticks) as on_tick:
        try:
            result = run(topology, processes=args.processes, app_dir=args.app_dir,
                         on_tick=on_tick, keep_digests=args.digests,
                         transport=args.transport)
        except Interrupted as exc:
            print(f"hiocluster: {exc}; every process was shut down", file=sys.stderr)
            _json_error(args, exc, {"signal": exc.signal})
            return 128 + exc.signal
        except RunFailed as exc:
            return _failed(args, exc, {"process": exc.process, "nodes": list(exc.nodes),
                                       "tick": exc.tick, "cause": exc.cause})
        except TopologyError:
            raise
        except ClusterError as exc:
            return _failed(args, exc, {})
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(summary(result))
    return EXIT_OK


def _failed(args: argparse.Namespace, exc: ClusterError, fields: dict[str, Any]) -> int:
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
    return "\n".join([
        f"{result.topology}: {result.ticks} ticks, {result.nodes} nodes on "
        f"{result.processes} processes in {result.seconds:.3f} s "
        f"({result.ticks_per_second:,.0f} ticks/s; start-up {result.startup_seconds:.3f} s)",
        f"digest   {result.digest}",
        f"messages {result.messages} delivered or in flight; {result.undelivered} in flight "
        f"at stop, {result.unread} unread in inboxes; {result.rejected_frames} frames "
        "rejected",
    ] + [f"metric   {name} {value:,} ({value / result.seconds:,.0f}/s)"
         for name, value in result.metrics.items() if result.seconds > 0])


class _progress:
    """A rich progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar: Any = None

    def __enter__(self) -> Callable[[int, int], None] | None:
        if not sys.stderr.isatty():
            return None
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn("ticking"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task("run", total=self.total, rate="")
        step = max(1, self.total // 200)

        def on_tick(done: int, total: int) -> None:
            if done % step == 0 or done == total:
                speed = self.bar.tasks[0].speed
                self.bar.update(task, completed=done,
                                rate=f"{speed:,.0f} ticks/s" if speed else "")
        return on_tick

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
