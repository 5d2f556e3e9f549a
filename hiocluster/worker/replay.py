"""Replay one worker of a recorded run alone (``hiocluster replay DIR --worker p1``).

The worker's nodes are built from the SETUP it got (hiocluster.worker.record), in
this process, with no other process and no socket: the DATA frames it accepted
are fed to its :class:`~hiocluster.worker.exchange.Exchange` in the order they
came, its ticks run as they ran, and after every window the digest records of
every digested tick are compared with the ones it sent up. The first difference
names its tick and nodes (:class:`Diverged`). ``from_checkpoint`` starts from a
checkpoint's tick instead (frames before it are read and skipped);
``break_at``/``node`` stop in pdb inside that node's ``step()`` at that tick:
time-travel debugging of one process of a distributed run.
"""

from __future__ import annotations

import os
import pdb
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from hiocluster import protocol as proto
from hiocluster.errors import ClusterError, FrameError, ProtocolError, RecordError
from hiocluster.protocol.fields import differing_nodes, digested
from hiocluster.runtime import checkpoints
from hiocluster.worker import checkpoint
from hiocluster.worker.exchange import Exchange
from hiocluster.worker.nodes import NodeRunner
from hiocluster.worker.record import (
    FRAME,
    RecordReader,
    read_manifest,
    record_path,
)

__all__ = ["Diverged", "Replayed", "replay"]


class Diverged(ClusterError):
    """A replayed state differs from the recorded one: ``tick`` and ``nodes``."""

    def __init__(self, worker: str, tick: int, nodes: list[str]) -> None:
        self.worker, self.tick, self.nodes = worker, tick, nodes
        shown = ", ".join(nodes[:8]) + (f" and {len(nodes) - 8} more" if len(nodes) > 8 else "")
        at = "after set-up" if tick < 0 else f"at tick {tick}"
        super().__init__(f"the replay of {worker} differs from its record {at}: "
                         f"node{'s' if len(nodes) != 1 else ''} {shown}")


@dataclass
class Replayed:
    """A replay that matched its record: ticks ``first`` .. ``last``, ``states``
    digests compared, in ``seconds``; ``whole``: the record ran to its end mark;
    ``live``: the recorded run's ticks/s (None if it did not say)."""

    worker: str
    first: int
    last: int
    states: int
    seconds: float
    whole: bool
    live: float | None

    @property
    def ticks_per_second(self) -> float:
        ticks = self.last - self.first + 1
        return ticks / self.seconds if self.seconds > 0 else 0.0


def replay(directory: str, worker: str, *, app_dir: str | None = None,
           until: int | None = None, from_checkpoint: str | None = None,
           break_at: int | None = None, node: str | None = None,
           debugger: Callable[[Callable[[], Any]], Any] | None = None) -> Replayed:
    """Replay ``worker`` of the record in ``directory`` (see the module docstring).

    Args:
        app_dir: where to import node classes from (default: the record's).
        until: stop after this tick.
        from_checkpoint: a checkpoint directory (one ``tick-*`` or a ``--checkpoint``
            directory: its newest) to start from, or "" for the run's own.
        break_at, node: run ``node``'s ``step()`` at tick ``break_at`` under
            ``debugger`` (default: pdb, stopping at its first line).

    Raises:
        RecordError: no such worker, a record that is not one, cut short where
            a window needs more, or a node that cannot be found.
        Diverged: a state differs from the record.
    """
    manifest = read_manifest(directory)
    placement = manifest.get("placement")
    if not isinstance(placement, dict) or worker not in placement:
        workers = ", ".join(sorted(placement)) if isinstance(placement, dict) else "none"
        raise RecordError(f"{directory} has no worker {worker!r} (workers: {workers})")
    if manifest.get("versions") != proto.local_versions():
        raise RecordError(f"{directory} was recorded by other versions "
                          f"({manifest.get('versions')}; these: {proto.local_versions()})")
    with RecordReader(record_path(directory, worker)) as reader:
        setup = reader.setup
        if node is not None and node not in {row[0] for row in setup.nodes}:
            raise RecordError(f"worker {worker} has no node {node!r} (its nodes: "
                              f"{', '.join(row[0] for row in setup.nodes[:10])})")
        return _Replay(reader, app_dir or reader.app_dir or manifest.get("app_dir"),
                       manifest).run(until, from_checkpoint, break_at, node, debugger)


class _Replay:
    def __init__(self, reader: RecordReader, app_dir: str | None,
                 manifest: dict[str, Any]) -> None:
        self.reader, self.manifest = reader, manifest
        setup = reader.setup
        self.worker = reader.worker
        self.host = NodeRunner(setup, app_dir)
        self.exchange = Exchange(self.worker, self.host.by_name, setup.links,
                                 setup.credit_lag, setup.ticks)
        self.host.enter()
        self.every, self.last_tick = setup.digest_every, setup.ticks - 1
        self.names = sorted(row[0] for row in setup.nodes)
        self.frames: deque[tuple[int, str, bytes]] = deque()  # read, not taken yet
        self.skip: dict[str, int] = {}  # neighbour -> its frames before this tick are moot

    def run(self, until: int | None, from_checkpoint: str | None, break_at: int | None,
            node: str | None, debugger: Callable[[Callable[[], Any]], Any] | None
            ) -> Replayed:
        reader, host = self.reader, self.host
        setup = reader.setup
        tick = -1
        if from_checkpoint is not None:
            tick = self._take_back(from_checkpoint or self.manifest.get("checkpoint") or "")
            # the frames before the cut are in it: each neighbour's are skipped up to it
            self.skip = dict(self.exchange.arrived)
        else:
            if setup.resume:  # the recorded worker started from a checkpoint itself
                tick = self._take_back(setup.resume)
            self._compare(tick, reader.ready, host.records())
        first, states = tick + 1, 0
        last = self.last_tick if until is None else min(until, self.last_tick)
        began = time.perf_counter()
        # frames are taken as late as the ticks need them, in the order they came:
        # the worker took each no later (an exchange refuses frames too far ahead)
        for kind, key, data in reader.entries():
            if kind == FRAME:
                self.frames.append((reader.index, key, data))
                continue
            if key <= tick:  # a window before the checkpoint started from
                continue
            states += self._window(tick, min(key, last), data, break_at, node, debugger)
            tick = min(key, last)
            if tick >= last:
                break
        seconds = time.perf_counter() - began
        if until is None:
            for _ in reader.entries():  # the frames of the end, to its end mark
                pass
            if not reader.whole and self.manifest.get("status") == "finished":
                raise RecordError(f"{reader.path} is cut short after tick {tick} (entry "
                                  f"{reader.index}), yet its run finished: the file was "
                                  "damaged")
        if tick < last and until is not None:
            raise RecordError(f"{reader.path} ends after tick {tick}, before tick {until}")
        live = self.manifest.get("ticks_per_second")
        return Replayed(self.worker, first, tick, states, seconds, reader.whole,
                        float(live) if isinstance(live, (int, float)) else None)

    def _take_back(self, path: str) -> int:
        if not path:
            raise RecordError("the recorded run wrote no checkpoints: name a directory "
                              "(--from-checkpoint DIR)")
        if not os.path.exists(os.path.join(path, checkpoints.MANIFEST)):
            path, _ = checkpoints.newest(path)
        return checkpoint.take_back(path, self.host, self.exchange, self.worker)

    def _window(self, after: int, until: int, digests: bytes, break_at: int | None,
                node: str | None, debugger: Callable[[Callable[[], Any]], Any] | None
                ) -> int:
        """Run ticks after ``after`` to ``until``; compare each digested state with
        ``digests`` (the window's, as DONE carried them). Returns the states compared."""
        host, exchange = self.host, self.exchange
        size = len(self.reader.ready)
        at = 0
        for tick in range(after + 1, until + 1):
            if tick:
                while missing := exchange.missing(tick):
                    if not self.frames:
                        raise RecordError(f"{self.reader.path} lacks the frame of tick "
                                          f"{tick - 1} from {missing[0]}")
                    self._take(*self.frames.popleft())
                exchange.deliver(tick)
            if tick == break_at and node is not None:
                self._break(node, debugger)
            host.run_tick(tick)
            exchange.outgoing(tick)  # its credit books move on; the frames go nowhere
            if digested(tick, self.every, self.last_tick + 1):
                recorded = digests[at:at + size]
                if len(recorded) != size:
                    raise RecordError(f"{self.reader.path}: the window to tick {until} "
                                      f"holds {len(digests)} bytes of digests, too few")
                self._compare(tick, recorded, host.records())
                at += size
        return at // size if size else 0

    def _take(self, index: int, source: str, frame: bytes) -> None:
        try:
            if source in self.skip:
                if proto.read_data(frame)[0] < self.skip[source]:
                    return
                del self.skip[source]  # the first after the cut: the rest follow it
            self.exchange.accept(source, frame)
        except (FrameError, ProtocolError) as exc:
            raise RecordError(f"{self.reader.path}: entry {index}, a frame from {source}, "
                              f"is not one this worker took: {exc}") from None

    def _compare(self, tick: int, recorded: bytes, replayed: bytes) -> None:
        if recorded != replayed:
            raise Diverged(self.worker, tick, differing_nodes(replayed, recorded, self.names))

    def _break(self, name: str, debugger: Callable[[Callable[[], Any]], Any] | None) -> None:
        """Run ``name``'s next ``step()`` under the debugger (once)."""
        target = self.host.by_name[name]
        step = target.step

        def stepped() -> Any:
            del target.step  # once: the class's own from the next tick on
            return (debugger or pdb.Pdb().runcall)(step)

        target.step = stepped  # type: ignore[method-assign]
