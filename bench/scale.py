"""Scale: a 10,000-node ring and a 10,000-LP PHOLD with sparse links on 8 workers.

Writes both topologies as TOML files (a ring of 10,000 RingNodes; PHOLD LPs each
linked to K random others, seeded), then for each: ``hiocluster check`` (time,
and its summary line), and a run on P workers reporting time to first tick,
ticks/s and the memory (RSS) of every worker and of the supervisor.

    python bench/scale.py [--nodes 10000] [--processes 8] [--ticks 50] [--fanout 4]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hiocluster.supervision import supervisor  # noqa: E402
from hiocluster.topology import load  # noqa: E402


def ring_toml(nodes: int, ticks: int) -> str:
    width = len(str(nodes - 1))
    lines = ["[run]", f"ticks = {ticks}", "seed = 1", "", "[nodes.r]",
             'class = "nodes.ring:RingNode"', f"count = {nodes}", "params = { tokens = 1 }"]
    for i in range(nodes):
        lines += ["[[links]]", f'from = "r{i:0{width}d}.out"',
                  f'to = "r{(i + 1) % nodes:0{width}d}.in"']
    return "\n".join(lines) + "\n"


def phold_toml(nodes: int, ticks: int, fanout: int) -> str:
    width = len(str(nodes - 1))
    rng = random.Random(42)
    lines = ["[run]", f"ticks = {ticks}", "seed = 7", "capacity = 4096", "", "[nodes.lp]",
             'class = "nodes.phold:PholdLP"', f"count = {nodes}",
             "params = { population = 4, remote_fraction = 0.5, mean_delay = 1.0 }"]
    for i in range(nodes):
        for j in sorted(rng.sample([k for k in range(nodes) if k != i], fanout)):
            lines += ["[[links]]", f'from = "lp{i:0{width}d}.out"', f'to = "lp{j:0{width}d}.in"']
    return "\n".join(lines) + "\n"


def measure(path: Path, processes: int) -> None:
    started = time.perf_counter()
    check = subprocess.run([sys.executable, "-m", "hiocluster", "check", str(path),
                            "--processes", str(processes)], cwd=REPO, capture_output=True,
                           text=True, check=True)
    checked = time.perf_counter() - started
    print(f"  check: {checked:.2f} s: {check.stdout.splitlines()[0]}")
    rss: dict[str, int] = {}
    found: list[supervisor.Supervisor] = []

    def on_tick(done: int, total: int) -> None:
        if done >= total // 2 and not rss:
            for name, child in found[0].children.items():
                if child.handle is not None:
                    rss[name] = psutil.Process(child.handle.pid).memory_info().rss
            rss["supervisor"] = psutil.Process().memory_info().rss

    started = time.perf_counter()
    topology = load(path)
    loaded = time.perf_counter() - started
    result = supervisor.run(topology, processes=processes, handle_signals=False,
                            app_dir=str(REPO), on_ready=found.append, on_tick=on_tick)
    workers = [value for name, value in rss.items() if name != "supervisor"]
    print(f"  run: {result.node_count:,} nodes on {result.processes} workers: load {loaded:.2f} s, "
          f"time to first tick {result.startup_seconds:.2f} s, {result.ticks} ticks in "
          f"{result.seconds:.2f} s ({result.ticks_per_second:,.1f} ticks/s), "
          f"{result.messages:,} messages")
    if workers:
        print(f"  memory: workers {min(workers) / 2**20:.0f}-{max(workers) / 2**20:.0f} MiB "
              f"each, supervisor {rss['supervisor'] / 2**20:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--ticks", type=int, default=50)
    parser.add_argument("--fanout", type=int, default=4)
    args = parser.parse_args()
    print(f"# hiocluster scale benchmark: {os.cpu_count()} cpus, {args.nodes:,} nodes, "
          f"{args.processes} workers, {args.ticks} ticks")
    with tempfile.TemporaryDirectory(prefix="hioc-scale-") as folder:
        for name, text in (("ring", ring_toml(args.nodes, args.ticks)),
                           ("phold", phold_toml(args.nodes, args.ticks, args.fanout))):
            path = Path(folder) / f"{name}{args.nodes}.toml"
            path.write_text(text)
            print(f"{name}: {path.stat().st_size / 2**20:.1f} MiB of TOML")
            measure(path, args.processes)


if __name__ == "__main__":
    main()
