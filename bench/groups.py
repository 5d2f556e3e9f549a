"""Nested supervisors: the same runs flat, under two groups, and three deep.

Runs topologies/ring.toml and topologies/phold.toml (four workers) flat, with
``[groups]`` of two groups of two workers, and with groups nested three deep
(root > g1 > g2 > g3), with automatic windows and with ``--window 1`` (where the
extra control hop of each level is paid every tick). Prints ticks/s and the
ratio to the flat run measured in the same invocation; the digests must be
equal.

    python bench/groups.py [--ticks 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hiocluster.supervision import supervisor  # noqa: E402
from hiocluster.topology import load  # noqa: E402

TREES = {
    "flat": (),
    "2 groups": (("g1", ("p0", "p1")), ("g2", ("p2", "p3"))),
    "3 deep": (("g1", ("p0", "g2")), ("g2", ("p1", "g3")), ("g3", ("p2", "p3"))),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="best of R interleaved rounds")
    args = parser.parse_args()
    print(f"# hiocluster groups benchmark: {os.cpu_count()} cpus, {args.ticks} ticks, "
          f"best of {args.repeat}; 4 workers")
    for example in ("ring", "phold"):
        base = load(REPO / "topologies" / f"{example}.toml").replace(ticks=args.ticks)
        for window in (None, 1):
            best = dict.fromkeys(TREES, 0.0)
            digests = set()
            for _ in range(args.repeat):
                for label, groups in TREES.items():
                    result = supervisor.run(base.replace(groups=groups), app_dir=str(REPO),
                                            handle_signals=False, window=window)
                    best[label] = max(best[label], result.ticks_per_second)
                    digests.add(result.digest)
            assert len(digests) == 1, f"{example}: digests differ: {digests}"
            flat = best["flat"]
            print(f"{example} window {window or 'auto'}: " + ", ".join(
                f"{label} {rate:,.0f} t/s ({rate / flat:.2f}x)" for label, rate in best.items())
                + f"; digest {digests.pop()[:16]}")


if __name__ == "__main__":
    main()
