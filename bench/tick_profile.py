"""Where a lockstep tick's CPU goes: thread CPU per function, N = 1, beside the raw barrier.

    python bench/tick_profile.py [--ticks T]

Prints µs of thread CPU per tick for the raw ROUTER/DEALER barrier's parent, for
the supervisor's main functions and for the worker's (docs/benchmarks.md quotes
it). The wrappers add a little time of their own.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import sys
import tempfile
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _profiled import wrap, profiled_worker  # noqa: E402
from hiocluster import supervisor  # noqa: E402
from hiocluster.topology import loads  # noqa: E402
from lockstep import barrier_children  # noqa: E402


def raw(ticks: int) -> None:
    with barrier_children(1) as (router, (identity,)):
        send = receive = 0
        start, wall = time.thread_time_ns(), time.perf_counter()
        for _ in range(ticks):
            before = time.thread_time_ns()
            router.send_multipart([identity, b"tick"])
            sent = time.thread_time_ns()
            router.recv_multipart()
            send += sent - before
            receive += time.thread_time_ns() - sent
        total = time.thread_time_ns() - start
        rate = ticks / (time.perf_counter() - wall)
    print(f"raw barrier parent: {rate:,.0f} ticks/s; cpu us/tick: total "
          f"{total / ticks / 1e3:.1f}, send {send / ticks / 1e3:.1f}, "
          f"recv {receive / ticks / 1e3:.1f}")


def ours(ticks: int, report: str) -> None:
    totals: collections.Counter[str] = collections.Counter()
    for name in ("_account", "_gather_tocks", "_dispatch"):
        wrap(supervisor.Supervisor, name, totals)
    wrap(supervisor.ChildDoer, "send", totals, "ChildDoer.send")
    text = f'[run]\nticks = {ticks}\n[nodes.busy]\nclass = "nodes.bench:BusyNode"\n'
    start = time.thread_time_ns()
    result = supervisor.run(loads(text), processes=1, handle_signals=False,
                            worker_target=profiled_worker)
    totals["total"] = time.thread_time_ns() - start
    print(f"hiocluster: {result.ticks_per_second:,.0f} ticks/s")
    with open(report, encoding="utf-8") as file:
        worker_totals = json.load(file)
    for side, counters in (("supervisor", totals), ("worker", worker_totals)):
        print(f"  {side} cpu us/tick: " + ", ".join(
            f"{name} {value / ticks / 1e3:.1f}" for name, value in sorted(counters.items())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=10_000)
    args = parser.parse_args()
    handle, report = tempfile.mkstemp(prefix="hioc-profile-", suffix=".json")
    os.close(handle)
    # before the fork server starts: its children inherit its environment
    os.environ["HIOCLUSTER_PROFILE_REPORT"] = report
    multiprocessing.get_context("forkserver").set_forkserver_preload(["hiocluster.worker"])
    try:
        raw(args.ticks)
        ours(args.ticks, report)
    finally:
        os.remove(report)


if __name__ == "__main__":
    main()
