"""What the command prints: the exit codes, a failure as one line (and, with
--json, one JSON object), the summaries after a run, the progress bar."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

from hiocluster.cli.resources import exhausted
from hiocluster.errors import ClusterError, Exhausted
from hiocluster.supervision.restarts import summary as restart_summary

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def failed(args: argparse.Namespace, exc: ClusterError, fields: dict[str, Any]) -> int:
    """A failed run: one line on stderr naming what ran out if something did; exit 1."""
    resource = exhausted(exc)
    if resource is not None and not str(exc).startswith(resource):
        exc = Exhausted(f"{resource}: {exc}").with_cause(exc)
    print(f"hiocluster: run failed: {exc}", file=sys.stderr)
    json_error(args, exc, fields)
    return EXIT_FAILED


def json_error(args: argparse.Namespace, exc: ClusterError, fields: dict[str, Any]) -> None:
    """With --json, every outcome is one JSON object on stdout: here, the error."""
    if getattr(args, "json", False):
        print(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc),
                                    **fields}}))


def summary(result: Any) -> str:
    """The human summary printed after a successful run."""
    processes = f"{result.processes} process" + ("es" if result.processes != 1 else "")
    if result.groups:
        processes += f" ({result.groups} group" + ("s)" if result.groups != 1 else ")")
    late = [f"late     {result.late_ticks} ticks started more than one tock late"] \
        if result.real else []
    return "\n".join([
        f"{result.topology}: {result.ticks} ticks, {result.node_count} nodes on "
        f"{processes} in {result.seconds:.3f} s "
        f"({result.ticks_per_second:,.0f} ticks/s; start-up {result.startup_seconds:.3f} s)",
        f"digest   {result.digest}",
        f"messages {result.messages} delivered or in flight; {result.undelivered} in flight "
        f"at stop, {result.unread} unread in inboxes; {result.rejected_frames} frames "
        "rejected",
    ] + late + ([f"restarts {restart_summary(result.restarts)}"] if result.restarts else [])
        + [f"metric   {name} {value:,} in all ({value / max(1, result.ticks):,.4g} per "
           f"tick, {value / result.seconds:,.0f}/s)"
           for name, value in result.metrics.items() if result.seconds > 0]
        + [_spread(name, kind, [metrics[name] for metrics in result.node_metrics.values()
                                if name in metrics])
           for name, kind in result.metric_kinds.items()])


def _spread(name: str, kind: str, values: list[float]) -> str:
    """A gauge's or a duration's line: min, mean and max over the nodes."""
    if not values:
        return f"metric   {name} ({kind}): no node reported it"
    mean = sum(values) / len(values)
    return (f"metric   {name} ({kind}) min {min(values):,.6g} mean {mean:,.6g} "
            f"max {max(values):,.6g} over {len(values)} nodes")


def services_summary(rows: list[dict[str, Any]]) -> str:
    """One line per service, after a run."""
    return "\n".join(f"{row['service']}: stopped; {row['served']} served, "
                     f"{row['restarts']} restarts" for row in rows)


#: Seconds between two progress lines off a terminal (0: none).
PROGRESS_ENV, PROGRESS_S = "HIOCLUSTER_PROGRESS_S", 5.0


def progress_every() -> float:
    """``$HIOCLUSTER_PROGRESS_S``, else PROGRESS_S; a value that is no number >= 0
    is the default."""
    try:
        every = float(os.environ.get(PROGRESS_ENV, PROGRESS_S))
    except ValueError:
        return PROGRESS_S
    return every if every >= 0 and every == every else PROGRESS_S


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class ProgressBar:
    """Progress on stderr: a rich bar when it is a terminal; off one (a log, a
    batch job), a plain line every ``progress_every()`` seconds — tick, ticks/s and
    the time left; nothing when ``quiet``."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.quiet = total, quiet
        self.bar: Any = None

    def __enter__(self) -> Callable[[int, int], None] | None:
        if self.quiet:
            return None
        if not sys.stderr.isatty():
            every = progress_every()
            return self._lines(every) if every > 0 else None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("ticking"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task("run", total=self.total, rate="")
        first: list[tuple[int, float]] = []

        def on_tick(done: int, total: int) -> None:  # called as windows complete
            now = time.monotonic()
            if not first:
                first.append((done, now))
            ticks, seconds = done - first[0][0], now - first[0][1]
            rate = f"{ticks / seconds:,.0f} ticks/s" if seconds > 0 and ticks else ""
            self.bar.update(task, completed=done, rate=rate)
        return on_tick

    def _lines(self, every: float) -> Callable[[int, int], None]:
        first: list[tuple[int, float]] = []  # the first tick seen: the rate counts from it
        due = [time.monotonic() + every]

        def on_tick(done: int, total: int) -> None:  # called as windows complete
            now = time.monotonic()
            if not first:
                first.append((done, now))
            if now < due[0] or done >= total:
                return
            due[0] = now + every
            ticks, seconds = done - first[0][0], now - first[0][1]
            rate = ticks / seconds if seconds > 0 else 0.0
            left = f", about {_duration((total - done) / rate)} left" if rate > 0 else ""
            print(f"hiocluster: tick {done:,} of {total:,} ({done / total:.0%}), "
                  f"{rate:,.0f} ticks/s{left}", file=sys.stderr, flush=True)
        return on_tick

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.stop()
