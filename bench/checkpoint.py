"""Checkpoint benchmark: what --checkpoint costs, how fast one is written, how fast
a run resumes; each figure against its baseline run in the same invocation.

* heat (16 tiles of 128x128, numpy state) at P = 1 and 2: ticks/s without
  checkpoints and with one every 100 ticks (target: <= 5 % slower);
* a ring of 10,000 nodes (no tokens) on 2 workers: the run's ticking time with one
  checkpoint minus without (target: a checkpoint written in <= 1 s);
* resume: start-up time (start to first GRANT) of a run resumed from the last
  checkpoint vs a fresh start of the same run (target: <= 2x);
* record: PHOLD (topologies/phold.toml) at P = 2, ticks/s without and with
  --record (target: <= 15 % slower); then its worker p1 replayed alone from the
  record, ticks/s vs the recorded run's (target: >= 2x).

Each figure is the best of R interleaved rounds.

    python bench/checkpoint.py [--ticks T] [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from hiocluster import Builder, load, run  # noqa: E402
from hiocluster.worker.replay import replay  # noqa: E402

ALPHA = 0.1


def heat(ticks: int):
    b = Builder("heat", ticks=ticks, seed=1)
    b.nodes("t", "nodes.heat:Tile", count=16, params={"size": 128, "columns": 4,
                                                      "alpha": ALPHA})
    b.grid("t", shape=(4, 4))
    return b.build()


def ring(nodes: int, ticks: int):
    b = Builder("ring10k", ticks=ticks, seed=1)
    b.nodes("r", "nodes.ring:RingNode", count=nodes)
    b.ring("r")
    return b.build()


def timed(topology, processes: int, **kwargs) -> tuple[float, float]:
    """(ticking seconds, start-up seconds) of one run."""
    result = run(topology, processes=processes, app_dir=REPO, handle_signals=False,
                 **kwargs)
    return result.seconds, result.startup_seconds


def best(repeat: int, *measures: Callable[[], float]) -> list[float]:
    values = [float("inf")] * len(measures)
    for _ in range(repeat):
        for k, measure in enumerate(measures):
            values[k] = min(values[k], measure())
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ticks", type=int, default=1000, help="heat ticks (default 1000)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="hiocluster-bench-")
    try:
        print(f"# hiocluster checkpoint benchmark: {os.cpu_count()} cpus, best of "
              f"{args.repeat}")
        every = 100
        for processes in (1, 2):
            topology = heat(args.ticks)
            target = os.path.join(scratch, f"heat{processes}")

            def plain() -> float:
                return timed(topology, processes)[0]

            def checkpointed() -> float:
                shutil.rmtree(target, ignore_errors=True)
                return timed(topology, processes, checkpoint=target,
                             checkpoint_every=every)[0]

            without, with_ = best(args.repeat, plain, checkpointed)
            cost = with_ / without - 1
            print(f"heat P={processes}: {args.ticks / without:,.0f} ticks/s without, "
                  f"{args.ticks / with_:,.0f} with a checkpoint every {every}: "
                  f"{cost:+.1%} ({'met' if cost <= 0.05 else 'MISSED'}: <= 5 %)")
        nodes, ticks = 10_000, 200
        big = ring(nodes, ticks)
        target = os.path.join(scratch, "ring")

        def ring_plain() -> float:
            return timed(big, 2)[0]

        def ring_checkpointed() -> float:
            shutil.rmtree(target, ignore_errors=True)
            return timed(big, 2, checkpoint=target, checkpoint_every=100)[0]

        without, with_ = best(args.repeat, ring_plain, ring_checkpointed)
        write = with_ - without
        print(f"ring of {nodes:,} nodes on 2 workers: one checkpoint costs {write:.3f} s "
              f"({'met' if write <= 1.0 else 'MISSED'}: <= 1 s)")

        def fresh() -> float:
            return timed(big, 2)[1]

        def resumed() -> float:
            return timed(big, 2, resume=target)[1]

        start, again = best(args.repeat, fresh, resumed)
        print(f"resume of the {nodes:,}-node ring: start-up {again:.3f} s vs {start:.3f} s "
              f"fresh: {again / start:.2f}x ({'met' if again <= 2 * start else 'MISSED'}: "
              "<= 2x)")
        phold = load(os.path.join(REPO, "topologies", "phold.toml")).replace(ticks=2000)
        target = os.path.join(scratch, "record")

        def phold_plain() -> float:
            return timed(phold, 2)[0]

        def phold_recorded() -> float:
            shutil.rmtree(target, ignore_errors=True)
            return timed(phold, 2, record=target)[0]

        without, with_ = best(args.repeat, phold_plain, phold_recorded)
        cost = with_ / without - 1
        print(f"PHOLD P=2: {phold.ticks / without:,.0f} ticks/s without, "
              f"{phold.ticks / with_:,.0f} with --record: {cost:+.1%} "
              f"({'met' if cost <= 0.15 else 'MISSED'}: <= 15 %)")
        replayed = max((replay(target, "p1") for _ in range(args.repeat)),
                       key=lambda done: done.ticks_per_second)
        live = phold.ticks / with_
        speed = replayed.ticks_per_second / live
        print(f"replay of PHOLD's p1 alone: {replayed.ticks_per_second:,.0f} ticks/s vs "
              f"{live:,.0f} live: {speed:.1f}x ({'met' if speed >= 2 else 'MISSED'}: >= 2x)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
