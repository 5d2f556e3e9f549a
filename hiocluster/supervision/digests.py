"""The run digest, and the digest records workers send to build it.

The state of a run after a tick is every node's digest; the run digest folds
those states in, tick by tick (docs/protocol.md §7)::

    fold(D, state) = sha256(D + Σ over nodes in name order: utf8(name) + node digest)
    D_setup = fold(32 zero bytes, state after set-up);  D_n = fold(D_n-1, state after tick n)

A node digest is xxh3_128 of the node's packed state (16 bytes): fast enough to
cost less than the work it proves; sha256 chains them into the run digest.

A worker cannot fold (it sees only its own nodes), so it sends *records*: per
tick, ``utf8(name) + node digest`` for each of its nodes in name order. The
supervisor splices the workers' records into the global name order and hashes.
When workers hold contiguous ranges of names (the usual case) that is one slice
per worker per tick.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable, Mapping

from hiocluster.protocol.fields import DIGEST_SIZE, RUN_DIGEST_SIZE, digested, node_digests

__all__ = ["DigestChain", "digested", "digested_between", "node_digests"]

_sha256 = hashlib.sha256


def digested_between(first: int, last: int, every: int, ticks: int) -> int:
    """How many of ticks ``first`` .. ``last`` (inclusive) are digested."""
    if last < first:
        return 0
    count = (last + 1) // every - first // every
    if last == ticks - 1 and ticks % every:
        count += 1  # the last tick, off the every-th beat
    return count


class DigestChain:
    """Fold per-worker digest records into the run digest, one state at a time.

    Args:
        workers: each worker's node names.
        keep: keep the run digest after every digested tick (``tick_digests``).
        every, ticks: which ticks are digested (:func:`digested`); a group learns
            them from its SETUP and sets them then.
    """

    def __init__(self, workers: Mapping[str, Iterable[str]], keep: bool = False,
                 every: int = 1, ticks: int = 0) -> None:
        self.every, self.ticks = every, ticks
        owner: dict[str, tuple[str, int, int]] = {}  # node -> (worker, start, end)
        self.sizes: dict[str, int] = {}
        for worker, names in workers.items():
            offset = 0
            for name in sorted(names):
                end = offset + len(name.encode()) + DIGEST_SIZE
                owner[name] = (worker, offset, end)
                offset = end
            self.sizes[worker] = offset
        runs: list[list] = []   # [worker, start, end]: consecutive bytes of one worker
        for name in sorted(owner):
            worker, start, end = owner[name]
            if runs and runs[-1][0] == worker and runs[-1][2] == start:
                runs[-1][2] = end
            else:
                runs.append([worker, start, end])
        self._runs = [tuple(run) for run in runs]
        self.keep = keep
        self.digest = b"\0" * RUN_DIGEST_SIZE
        self.tick_digests: list[str] = []
        self.folded = 0  # states folded in; the first is the state after set-up
        #: called with (tick, run digest, the records folded) for each state folded
        #: (a digest file's writer: hiocluster.supervision.digestfile)
        self.sink: Callable[[int, bytes, bytes], None] | None = None
        self._last = b""  # the last state folded: run digest before it, then its records

    def tick_of(self, state: int) -> int:
        """The tick after which the ``state``-th state folded was taken (0: set-up, -1)."""
        if state == 0:
            return -1
        return min(state * self.every - 1, self.ticks - 1)

    def states(self, first: int, last: int) -> int:
        """How many states ticks ``first`` .. ``last`` hold (the digested ones)."""
        return digested_between(first, last, self.every, self.ticks)

    @property
    def last_records(self) -> bytes:
        """The records of the last state folded, spliced in name order."""
        return self._last[RUN_DIGEST_SIZE:]

    def check(self, worker: str, records: bytes, states: int) -> str | None:
        """Why ``records`` cannot be ``states`` states of ``worker`` (None if they can)."""
        expected = self.sizes[worker] * states
        if len(records) != expected:
            return (f"expected {expected} bytes ({states} state(s) of "
                    f"{self.sizes[worker]} bytes), got {len(records)}")
        return None

    def splice(self, records: Mapping[str, bytes], states: int) -> bytes:
        """``states`` states of records, each spliced into name order, not hashed: what
        a sub-supervisor sends up for the workers under it."""
        sizes, runs = self.sizes, self._runs
        parts = []
        for index in range(states):
            for worker, start, end in runs:
                base = sizes[worker] * index
                parts.append(records[worker][base + start:base + end])
        return b"".join(parts)

    def fold(self, records: Mapping[str, bytes], states: int) -> None:
        """Fold ``states`` consecutive states; ``records[worker]`` holds that many of
        each worker's (already checked with :meth:`check`)."""
        sizes, runs, digest = self.sizes, self._runs, self.digest
        for index in range(states):
            parts = [digest]
            for worker, start, end in runs:
                base = sizes[worker] * index
                parts.append(records[worker][base + start:base + end])
            self._last = joined = b"".join(parts)
            digest = _sha256(joined).digest()
            if self.sink is not None:
                self.sink(self.tick_of(self.folded), digest, b"".join(parts[1:]))
            if self.keep and self.folded:
                self.tick_digests.append(digest.hex())
            self.folded += 1
        self.digest = digest
