"""Slurm: start-up to the first tick with 8 workers under ``--launcher slurm`` vs the
local launcher, and ticks/s, on a one-node Slurm cluster of this script's own
(tests/slurm_cluster.py: munged, slurmctld, slurmd; needs root and Debian's
slurm-wlm and munge).

Each figure is the best of R interleaved rounds of ``hiocluster run
topologies/ring.toml --processes 8 --json`` (start-up: the run's
``startup_seconds``, from the start to the first GRANT): locally over ipc, locally
over tcp + CurveZMQ (what a Slurm run uses), and inside ``salloc -n 8`` with
``--launcher slurm`` (each worker an srun job step). Target: Slurm <= 2x local.

    sudo python bench/slurm.py [--ticks T] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.slurm_cluster import SlurmCluster, unavailable  # noqa: E402

WORKERS = 8


def measure(env: dict[str, str], prefix: list[str], *flags: str, ticks: int) -> dict:
    argv = [*prefix, sys.executable, "-m", "hiocluster", "run", "topologies/ring.toml",
            "--ticks", str(ticks), "--processes", str(WORKERS), "--json", *flags]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ticks", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    why = unavailable()
    if why is not None:
        raise SystemExit(why)
    print(f"# hiocluster slurm benchmark: {os.cpu_count()} cpus, {WORKERS} workers, "
          f"{args.ticks} ticks, best of {args.repeat}")
    with SlurmCluster() as cluster:
        env = dict(cluster.env)
        kinds = {"local ipc": ([], ("--transport", "ipc")),
                 "local tcp+curve": ([], ("--transport", "tcp")),
                 "slurm": (["salloc", f"--ntasks={WORKERS}", "--quiet"],
                           ("--launcher", "slurm"))}
        best = {kind: {"startup": float("inf"), "rate": 0.0} for kind in kinds}
        digests = set()
        for _ in range(args.repeat):
            for kind, (prefix, flags) in kinds.items():
                result = measure(env, prefix, *flags, ticks=args.ticks)
                digests.add(result["digest"])
                best[kind]["startup"] = min(best[kind]["startup"], result["startup_seconds"])
                best[kind]["rate"] = max(best[kind]["rate"], result["ticks_per_second"])
        cluster.wait_until_idle()
    for kind, figures in best.items():
        print(f"{kind:16} start-up {figures['startup']:.3f} s, {figures['rate']:,.0f} ticks/s")
    ratio = best["slurm"]["startup"] / best["local ipc"]["startup"]
    print(f"slurm start-up / local: {ratio:.2f}x ({'met' if ratio <= 2 else 'MISSED'}: <= 2x); "
          f"vs local tcp+curve: {best['slurm']['startup'] / best['local tcp+curve']['startup']:.2f}x; "
          f"digests {'equal' if len(digests) == 1 else 'DIFFER'}")


if __name__ == "__main__":
    main()
