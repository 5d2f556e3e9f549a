"""Restarts inside lockstep, sans-IO: which failures a run with ``[run] restart =
"checkpoint"`` survives, how often (the intensity: ``max_restarts`` in ``within``
seconds, as an OTP supervisor counts), and how each is told.

A worker that dies (ProcessExited: a signal, an exit, its host lost) or hangs
(TickTimeout) while the run ticks is survived: every worker is stopped, all of
them start again from the newest checkpoint this run completed (or from where the
run began, before its first), and the run goes on. Determinism makes that exact:
the final digest is the one of a run that never failed. A node that raises
(NodeError), a broken frame, a failure at start-up and everything else still fail
the run: doing it again would fail again. :func:`hiocluster.supervision.supervisor.run`
drives the loop; this module decides.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from hiocluster.errors import ClusterError, ProcessExited, TickTimeout

__all__ = ["Restart", "Intensity", "restartable", "told", "summary"]


def restartable(failure: ClusterError | None) -> bool:
    """Whether ``failure`` is one a restart from a checkpoint can get past: a worker
    that died or hung while the run ticked (not at start-up, not a node's error)."""
    return isinstance(failure, (ProcessExited, TickTimeout)) and failure.tick is not None


@dataclass(frozen=True)
class Restart:
    """One restart: ``worker`` failed at ``tick`` (``cause``); every worker went back
    to the state after ``resumed_from`` (-1: the run's start), ``seconds`` into the run."""

    worker: str
    tick: int
    cause: str
    resumed_from: int
    seconds: float
    hung: bool = False
    #: hosts lost: their workers were started again on the supervisor's host
    moved: tuple[str, ...] = ()

    @classmethod
    def of(cls, failure: ProcessExited | TickTimeout, resumed_from: int,
           seconds: float, moved: tuple[str, ...] = ()) -> Restart:
        assert failure.tick is not None
        return cls(failure.worker, failure.tick, failure.cause, resumed_from, seconds,
                   isinstance(failure, TickTimeout), moved)

    def __str__(self) -> str:
        return told(self.to_json())

    def to_json(self) -> dict[str, object]:
        return {"worker": self.worker, "tick": self.tick, "cause": self.cause,
                "kind": "hung" if self.hung else "died", "resumed_from": self.resumed_from,
                "seconds": round(self.seconds, 3), "moved": list(self.moved)}


def told(row: dict[str, Any]) -> str:
    """One restart in words, from its JSON row (RunResult.restarts)."""
    since = row["resumed_from"]
    since = "the start" if since < 0 else f"tick {since:,}"
    moved = row.get("moved") or ()
    where = f", the workers of host {', '.join(moved)} on this one" if moved else ""
    return f"{row['worker']} {row['kind']} at tick {row['tick']:,} ({row['cause']}); " \
        f"restarted from {since}{where}"


def summary(rows: list[dict[str, Any]]) -> str:
    """A run's restarts in words: each one, then how many."""
    return "; ".join([*map(told, rows), f"{len(rows)} restart{'s' if len(rows) != 1 else ''}"])


class Intensity:
    """At most ``max_restarts`` restarts in any ``within`` seconds (OTP's intensity
    and period): :meth:`allows` says whether one more may happen ``now``, and counts it."""

    def __init__(self, max_restarts: int, within: float) -> None:
        self.max_restarts, self.within = max_restarts, within
        self._times: deque[float] = deque()

    def allows(self, now: float) -> bool:
        times = self._times
        while times and times[0] <= now - self.within:
            times.popleft()
        if len(times) >= self.max_restarts:
            return False
        times.append(now)
        return True

    def exceeded(self) -> str:
        """The words for a run that failed once more than it may."""
        return (f"more than {self.max_restarts} restart"
                f"{'s' if self.max_restarts != 1 else ''} in {self.within:g} s "
                "([run] max_restarts, within)")
