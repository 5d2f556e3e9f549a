"""Where a tick's time goes: a run's trace, as Chrome Trace Event JSON, a table
and a picture.

With ``--trace FILE`` (``run(trace=True)``) every worker records, per tick, when
it began waiting for its neighbours' frames, began running its nodes, began
sending, began hashing and was done, and when each of its nodes stepped
(wall-clock seconds). The rows travel in each worker's BYE
(``RunResult.trace``: worker -> rows ``[tick, waiting, running, sending,
hashing, done, [[node, from, to], ...]]``; "hashing" also holds the nodes'
``observe()`` on the ticks observed).

:func:`chrome` turns them into Chrome Trace Event JSON (open it in Perfetto or
chrome://tracing: a process per worker, a track for its phases and one per
node), with the rows kept under ``otherData.hiocluster`` so :func:`load` can
read them back. :func:`profile` and :func:`lines` make the table the run
summary and ``hiocluster report`` print; :func:`plot` draws ticks/s over time
and each process's time running vs waiting (matplotlib, optional).
"""

from __future__ import annotations

import json
import statistics
from typing import Any

__all__ = ["chrome", "load", "profile", "lines", "plot"]

_PHASES = ("wait", "run", "send", "hash")
#: How the table and the picture name each phase.
_NAMES = {"wait": "waiting", "run": "running", "send": "sending", "hash": "hashing"}


def chrome(trace: dict[str, list[Any]]) -> dict[str, Any]:
    """Chrome Trace Event JSON of a run's trace (times in microseconds from the
    first event)."""
    starts = [row[1] for rows in trace.values() for row in rows]
    origin = min(starts) if starts else 0.0
    events: list[dict[str, Any]] = []
    for pid, (worker, rows) in enumerate(sorted(trace.items()), start=1):
        events.append({"ph": "M", "name": "process_name", "pid": pid,
                       "args": {"name": f"worker {worker}"}})
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": 0,
                       "args": {"name": "tick"}})
        tids: dict[str, int] = {}
        for row in rows:
            tick, times, spans = row[0], row[1:6], row[6]
            for phase, start, end in zip(_PHASES, times, times[1:]):
                events.append({"ph": "X", "name": phase, "pid": pid, "tid": 0,
                               "ts": (start - origin) * 1e6, "dur": (end - start) * 1e6,
                               "args": {"tick": tick}})
            for node, start, end in spans:
                if node not in tids:
                    tids[node] = len(tids) + 1
                    events.append({"ph": "M", "name": "thread_name", "pid": pid,
                                   "tid": tids[node], "args": {"name": f"node {node}"}})
                events.append({"ph": "X", "name": "step", "pid": pid, "tid": tids[node],
                               "ts": (start - origin) * 1e6, "dur": (end - start) * 1e6,
                               "args": {"tick": tick}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"hiocluster": trace}}


def load(path: str) -> dict[str, list[Any]]:
    """A run's trace from a file :func:`chrome` wrote. Raises ValueError."""
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
        trace = data["otherData"]["hiocluster"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a hiocluster trace ({type(exc).__name__}: "
                         f"{exc})") from None
    if not isinstance(trace, dict):
        raise ValueError(f"{path} is not a hiocluster trace")
    return trace


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def profile(trace: dict[str, list[Any]]) -> dict[str, Any]:
    """Per worker: ticks traced, tick time p50/p99 (seconds, from waiting to done),
    each phase's mean seconds per tick (``wait``, ``run``, ``send``, ``hash``) and
    the share of the tick spent waiting for neighbours; the slowest process (the
    most busy time per tick) and node (the most time stepping, in all)."""
    workers: dict[str, dict[str, float]] = {}
    stepping: dict[str, float] = {}
    for worker, rows in trace.items():
        totals = [row[5] - row[1] for row in rows]
        waits = [row[2] - row[1] for row in rows]
        whole = sum(totals)
        count = max(1, len(rows))
        workers[worker] = {"ticks": len(rows), "p50": _quantile(totals, 0.5),
                           "p99": _quantile(totals, 0.99),
                           "busy": (whole - sum(waits)) / len(rows) if rows else 0.0,
                           "waiting": sum(waits) / whole if whole > 0 else 0.0,
                           **{phase: sum(row[k + 2] - row[k + 1] for row in rows) / count
                              for k, phase in enumerate(_PHASES)}}
        for row in rows:
            for node, start, end in row[6]:
                stepping[node] = stepping.get(node, 0.0) + end - start
    slowest = max(workers, key=lambda name: workers[name]["busy"], default=None)
    node = max(stepping, key=stepping.__getitem__, default=None)
    return {"workers": workers, "slowest_worker": slowest, "slowest_node": node,
            "node_seconds": stepping.get(node, 0.0) if node else 0.0,
            "median_node_seconds": statistics.median(stepping.values()) if stepping else 0.0}


def lines(trace: dict[str, list[Any]]) -> list[str]:
    """The table: a line per process, then the slowest process and node."""
    found = profile(trace)
    out = [f"trace    {worker}: {row['ticks']} ticks; ms per tick: "
           + ", ".join(f"{_NAMES[phase]} {row[phase] * 1e3:.3f}" for phase in _PHASES)
           + f"; tick p50 {row['p50'] * 1e3:.3f} p99 {row['p99'] * 1e3:.3f}; "
           f"{row['waiting']:.0%} waiting"
           for worker, row in sorted(found["workers"].items())]
    if found["slowest_worker"] is not None:
        busy = found["workers"][found["slowest_worker"]]["busy"]
        out.append(f"slowest  process {found['slowest_worker']} ({busy * 1e3:.3f} ms busy "
                   "per tick)" + (f"; node {found['slowest_node']} "
                                  f"({found['node_seconds'] * 1e3:.1f} ms stepping in the "
                                  f"whole run, the median node "
                                  f"{found['median_node_seconds'] * 1e3:.1f} ms)"
                                  if found["slowest_node"] else ""))
    return out


def plot(trace: dict[str, list[Any]], path: str) -> None:
    """A PNG: ticks/s over time, and each process's mean tick in its parts
    (running, sending, hashing, waiting; ms per tick), the legend beside them.

    Raises:
        ImportError: matplotlib is not installed (``pip install matplotlib``).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done: dict[int, float] = {}
    for rows in trace.values():
        for row in rows:
            done[row[0]] = max(done.get(row[0], 0.0), row[5])
    ticks = sorted(done)
    origin = min((row[1] for rows in trace.values() for row in rows), default=0.0)
    found = profile(trace)["workers"]
    figure, (rate, shares) = plt.subplots(1, 2, figsize=(12, 4.5))
    if len(ticks) > 1:
        window = max(min(5, len(ticks) - 1), len(ticks) // 50)  # a rate over >= 5 ticks
        xs, ys = [], []
        for i in range(window, len(ticks), window):
            span = done[ticks[i]] - done[ticks[i - window]]
            if span > 0:
                xs.append(done[ticks[i]] - origin)
                ys.append(window / span)
        rate.plot(xs, ys)
    rate.set_xlabel("seconds")
    rate.set_ylabel("ticks/s")
    rate.set_title("ticks per second (over 5+ ticks)")
    names = sorted(found)
    bottom = [0.0] * len(names)
    for phase in ("run", "send", "hash", "wait"):  # each part of a tick in its colour
        heights = [found[name][phase] * 1e3 for name in names]
        shares.bar(names, heights, bottom=bottom, label=_NAMES[phase])
        bottom = [b + h for b, h in zip(bottom, heights)]
    shares.set_ylabel("ms per tick (mean)")
    shares.set_title("per process: where a tick's time goes")
    # beside the bars, never over them
    shares.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
