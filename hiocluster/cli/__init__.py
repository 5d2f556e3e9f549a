"""The ``hiocluster`` command: argument parsing, progress, summary, exit codes.

Exit codes: 0 success, 1 failed run, 2 usage or topology error, 130 after
SIGINT, 143 after SIGTERM (the whole process tree shut down cleanly first). A
run of services only is stopped by design: 0 after SIGINT, SIGTERM or
``hiocluster stop``, 1 when a service failed. Resource exhaustion (open files,
disk space, a read-only run root) is a failed run: one line naming it, exit 1.
``status`` and friends: see hiocluster.control.client.

The parts: ``parser`` (one function per subcommand) over ``arguments`` (the
values' types); the subcommands in ``run`` (run, check, report), ``agent``
(agent, keygen) and ``join`` (worker, group, replica); ``output`` (summaries,
the progress bar, failures) and ``resources`` (open files, what ran out). A
subcommand's module, and what it uses beyond argparse, is imported when it runs:
``--help`` imports the parser and the output, neither ZeroMQ nor hio.
"""

from __future__ import annotations

import sys
from typing import Sequence

from hiocluster.cli.output import services_summary, summary
from hiocluster.cli.parser import build_parser

__all__ = ["build_parser", "main", "services_summary", "summary"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hiocluster`` console script; returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passed: list[str] = []  # sbatch: what follows `--` is the run's own options
    if argv[:1] == ["sbatch"] and "--" in argv:
        cut = argv.index("--")
        argv, passed = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    args.run_args = passed
    if args.command in ("worker", "group"):
        from hiocluster.cli.join import worker_main
        return worker_main(parser, args)
    if args.command == "keygen":
        from hiocluster.cli.agent import keygen_main
        return keygen_main(parser, args)
    if args.command == "agent":
        from hiocluster.cli.agent import agent_main
        return agent_main(parser, args)
    if args.command == "replica":
        from hiocluster.cli.join import replica_main
        return replica_main(parser, args)
    if args.command == "sbatch":
        from hiocluster.cli.slurm import sbatch_main
        return sbatch_main(parser, args)
    if args.command == "sweep":
        from hiocluster.cli.run import sweep_main
        return sweep_main(args)
    if args.command == "diff":
        from hiocluster.cli.run import diff_main
        return diff_main(args)
    if args.command == "replay":
        from hiocluster.cli.run import replay_main
        return replay_main(args)
    if args.command == "report":
        from hiocluster.cli.run import report_main
        return report_main(args)
    if args.command in ("status", "scale", "restart", "reload", "stop"):
        from hiocluster.control.client import control_main
        return control_main(args)
    from hiocluster.cli.run import topology_main
    return topology_main(args)
