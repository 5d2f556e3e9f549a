"""``hiocluster sbatch``: the batch script that runs a topology with ``--launcher
slurm`` in its own allocation; printed, or submitted with ``--submit``."""

from __future__ import annotations

import argparse
import subprocess
import sys

from hiocluster.cli.output import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from hiocluster.errors import TopologyError

__all__ = ["sbatch_main"]


def sbatch_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from hiocluster.hosts.slurm import sbatch_script
    from hiocluster.topology import load

    run_args = list(args.run_args)
    # the run's own options, checked by run's own parser now, not in the queue later
    taken = {"--launcher", "--processes"} & {arg.split("=", 1)[0] for arg in run_args}
    if taken:
        parser.error(f"sbatch: {', '.join(sorted(taken))} is the script's to set "
                     "(--launcher slurm, --processes nodes x tasks per node)")
    parser.parse_args(["run", args.topology, *run_args])
    try:
        load(args.topology)
    except TopologyError as exc:
        print(f"hiocluster: {exc}", file=sys.stderr)
        return EXIT_USAGE
    script = sbatch_script(args.topology, run_args, nodes=args.nodes,
                           ntasks_per_node=args.ntasks_per_node, time=args.time,
                           partition=args.partition, job_name=args.job_name)
    if not args.submit:
        sys.stdout.write(script)
        return EXIT_OK
    try:
        done = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True,
                              text=True, timeout=60)
    except FileNotFoundError:
        print("hiocluster: sbatch: `sbatch` not found: is Slurm installed here?",
              file=sys.stderr)
        return EXIT_FAILED
    except subprocess.TimeoutExpired:
        print("hiocluster: sbatch: `sbatch` did not answer in 60 s", file=sys.stderr)
        return EXIT_FAILED
    if done.returncode != 0:
        print(f"hiocluster: sbatch: {done.stderr.strip() or 'sbatch failed'}",
              file=sys.stderr)
        return EXIT_FAILED
    job = done.stdout.strip().split(";")[0]
    print(f"submitted batch job {job}")
    return EXIT_OK
