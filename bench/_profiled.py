"""A worker entry point that reports CPU time per function (used by tick_profile.py).

Lives in its own module so forkserver children can import it by name.
"""

from __future__ import annotations

import collections
import json
import os
import time
from typing import Any, Callable

from hiocluster import protocol, worker
from hiocluster.node import Node

#: Where the child writes its counters (ns of thread CPU per function name).
REPORT = os.environ.get("HIOCLUSTER_PROFILE_REPORT", "")


def wrap(owner: Any, name: str, totals: collections.Counter[str], label: str = "") -> None:
    """Replace ``owner.name`` by a wrapper adding its thread CPU time to ``totals``."""
    original: Callable[..., Any] = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time_ns()
        try:
            return original(*args, **kwargs)
        finally:
            totals[label or name] += time.thread_time_ns() - start

    setattr(owner, name, timed)


def profiled_worker(spec: worker.WorkerSpec) -> None:
    totals: collections.Counter[str] = collections.Counter()
    for name in ("_tick", "_collect", "_deliver", "_send", "_next_control"):
        wrap(worker.Worker, name, totals)
    wrap(protocol.ChildMachine, "send", totals, "ChildMachine.send")
    wrap(Node, "digest", totals, "node digests")
    start = time.thread_time_ns()
    try:
        worker.main(spec)
    finally:
        totals["total"] = time.thread_time_ns() - start
        with open(REPORT, "w", encoding="utf-8") as file:
            json.dump(totals, file)
