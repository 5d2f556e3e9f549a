"""How a run ends: its result, or the failure that names who is to blame.

Pure functions of what the supervisor's books hold (hiocluster.supervision.books), used
by :class:`~hiocluster.supervision.runcore.RunCore`: the :class:`RunResult` of a finished
run, the failure a worker's ERROR frame means, the failure an invalid frame
means, and where a worker that died without a word died.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Container, Iterable

from hiocluster import protocol as proto
from hiocluster.errors import (
    ClusterError,
    FrameError,
    NodeError,
    ProcessExited,
    ProtocolError,
    RunFailed,
    TickTimeout,
)
from hiocluster.supervision.books import WorkerBook
from hiocluster.supervision.digests import DigestChain
from hiocluster.supervision.observations import COLUMNS, Observations, read_observations
from hiocluster.supervision.windows import WindowSizer
from hiocluster.topology import Topology

__all__ = ["RunResult", "merge_byes", "jsonable", "result_of", "worker_failure", "subtree_error", "refusal", "placed",
           "late_start", "silent", "lost_frame", "error_frame"]


@dataclass
class RunResult:
    """What a finished run reports (the CLI's --json prints :meth:`to_json`)."""

    topology: str
    ticks: int
    digest: str
    processes: int
    node_count: int            # "nodes" in to_json()
    seconds: float
    startup_seconds: float
    messages: int
    undelivered: int
    unread: int
    rejected_frames: int
    window: str = "auto"
    groups: int = 0            # sub-supervisor processes between the root and workers
    real: bool = False
    late_ticks: int = 0
    metrics: dict[str, int] = field(default_factory=dict)
    tick_digests: list[str] = field(default_factory=list)
    #: a topology with services: each one's final status row (hiocluster.services.core)
    services: list[dict[str, Any]] = field(default_factory=list)
    #: every node's :meth:`Node.result`, by name
    nodes: dict[str, Any] = field(default_factory=dict)
    #: every node's own metrics, by name
    node_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the kind of every metric that is not a counter ("gauge", "duration")
    metric_kinds: dict[str, str] = field(default_factory=dict)
    #: with trace=True: each worker's rows, one per tick (see hiocluster.supervision.trace)
    trace: dict[str, list[Any]] = field(default_factory=dict)
    #: "finished"; "interrupted": a signal stopped it after ``ticks`` ticks, everywhere
    #: (the results so far: ``Interrupted.partial``)
    status: str = "finished"
    #: a resumed run: the tick of the checkpoint it started from (its tick_digests
    #: are those of the ticks after it)
    resumed_from: int | None = None
    #: ``[run] restart = "checkpoint"``: each restart the run went through
    #: (hiocluster.supervision.restarts.Restart.to_json); with any, ``seconds`` is
    #: the whole run's, restarts included
    restarts: list[dict[str, Any]] = field(default_factory=list)
    #: what the nodes' :meth:`Node.observe` said, in long form: ``{"tick": [...],
    #: "node": [...], "name": [...], "value": [...]}`` sorted by tick, node, name
    #: (numpy arrays where numpy is installed; ``tick`` int64, ``value`` float64);
    #: empty when they went to a file (``observations_file``)
    observations: dict[str, Any] = field(default_factory=dict)
    #: the tick the observations stop at, where there were too many to keep
    #: (observations.MAX_KEPT rows in memory, nodes.MAX_OBSERVED_BYTES in one
    #: window of a worker); None: they are whole
    observations_cut: int | None = None
    #: the first tick observed: 0, or after a resume the tick after the checkpoint
    #: it started from (a restart keeps its earlier tries' rows up to its checkpoint)
    observations_from: int = 0
    #: the file they were streamed to (``run(observe=...)``, ``--observe``), if any
    observations_file: str | None = None
    #: how many rows there are
    observations_rows: int = 0

    @property
    def ticks_per_second(self) -> float:
        return self.ticks / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = {("nodes" if key == "node_count" else key): value
                for key, value in self.__dict__.items()
                if key not in ("tick_digests", "services", "nodes", "node_metrics",
                               "metric_kinds", "trace", "observations", "observations_cut",
                               "observations_from", "observations_file",
                               "observations_rows")}
        data["ticks_per_second"] = round(self.ticks_per_second, 1)
        data["seconds"] = round(self.seconds, 6)
        data["startup_seconds"] = round(self.startup_seconds, 6)
        data["metrics_per_second"] = {name: round(value / self.seconds, 1) if self.seconds
                                      else 0.0 for name, value in self.metrics.items()}
        if self.resumed_from is None:
            del data["resumed_from"]
        if not self.restarts:
            del data["restarts"]
        if self.tick_digests:
            data["tick_digests"] = self.tick_digests
        if self.services:
            data["services"] = self.services
        if any(value is not None for value in self.nodes.values()):
            data["results"] = self.nodes
        if any(self.node_metrics.values()):
            data["node_metrics"] = self.node_metrics
            data["metric_kinds"] = self.metric_kinds
        return jsonable(data)

    def observed(self, name: str, how: str | None = None) -> Any:
        """The observations called ``name``: ``(ticks, nodes, values)``, or with
        ``how`` (``sum``, ``mean``, ``min``, ``max``) one value per tick over the
        nodes: ``(ticks, values)``. Raises KeyError naming those there are."""
        table = self.observations_table()
        names = table.get("name", ())
        if name not in set(names):
            raise KeyError(f"no observation {name!r} (observed: "
                           f"{', '.join(sorted(set(names))) or 'none'})")
        rows = [(int(tick), node, float(value)) for tick, node, key, value
                in zip(table["tick"], table["node"], names, table["value"]) if key == name]
        if how is None:
            return tuple(list(column) for column in zip(*rows))
        folds: dict[str, Callable[[list[float]], float]] = {
            "sum": sum, "min": min, "max": max,
            "mean": lambda values: sum(values) / len(values)}
        fold = folds.get(how)
        if fold is None:
            raise ValueError(f"how must be sum, mean, min or max, got {how!r}")
        per_tick: dict[int, list[float]] = {}
        for tick, _, value in rows:
            per_tick.setdefault(int(tick), []).append(float(value))
        return list(per_tick), [fold(values) for values in per_tick.values()]

    def to_pandas(self) -> Any:
        """The observations as a pandas DataFrame (columns tick, node, name, value;
        pandas must be installed: it is no dependency of hiocluster)."""
        import pandas

        table = self.observations_table()
        return pandas.DataFrame({key: table.get(key, []) for key in COLUMNS})

    def observations_table(self) -> dict[str, Any]:
        """``observations``, or read back from ``observations_file`` where they
        went there (the whole file in memory)."""
        if self.observations_file is None:
            return self.observations
        return read_observations(self.observations_file)

    def write_observations(self, path: str) -> int:
        """Write the observations kept in memory to ``path``: CSV, or Parquet for
        ``*.parquet`` (pyarrow must be installed); the number of rows."""
        sink = Observations(path)
        try:
            sink.extend(list(zip(*(self.observations.get(key, []) for key in COLUMNS))))
        finally:
            sink.close()
        return sink.rows

    def lines(self) -> list[dict[str, Any]]:
        """One JSON-able row per node, by name: what ``--output`` writes."""
        return [jsonable({"node": name, "result": self.nodes.get(name),
                          "metrics": self.node_metrics.get(name, {}),
                          "status": self.status, "tick": self.ticks - 1})
                for name in sorted(set(self.nodes) | set(self.node_metrics))]


def jsonable(value: Any) -> Any:
    """``value`` (anything a result may hold: msgpack values and numpy's) as plain
    JSON values, the one form of every JSON output (``--json``, ``--output``):

    - a numpy array: ``{"dtype": "<f8", "shape": [16, 16], "data": [...]}``,
      ``dtype`` numpy's ``dtype.str`` (as in protocol §2), ``data`` the elements
      flat in C order (``numpy.asarray(data, dtype).reshape(shape)`` gives the
      array back, bit for bit); a complex element is ``[real, imag]``;
    - a numpy scalar: the Python number it holds (a complex one ``[real, imag]``);
    - bytes: their hex (a map key too; other keys as JSON writes them);
    - maps, lists and tuples: the same, inside.
    """
    if isinstance(value, dict):
        return {(key.hex() if isinstance(key, (bytes, bytearray)) else key): jsonable(item)
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, complex):
        return [value.real, value.imag]
    numpy = sys.modules.get("numpy")  # not imported: the value cannot be numpy's
    if numpy is not None:
        if isinstance(value, numpy.ndarray):
            flat = numpy.ascontiguousarray(value).reshape(-1)
            kind = flat.dtype.kind
            data = flat.tolist() if kind in "biuf" else \
                numpy.stack([flat.real, flat.imag], axis=-1).tolist() if kind == "c" else \
                jsonable(flat.tolist())
            return {"dtype": value.dtype.str, "shape": list(value.shape), "data": data}
        if isinstance(value, numpy.generic):
            return jsonable(value.item())
    return value


def result_of(topology: Topology, books: Iterable[WorkerBook], chain: DigestChain,
              sizer: WindowSizer, rejected: int, times: tuple[float, float, float],
              processes: int, observed: Observations, groups: int = 0,
              reached: int | None = None) -> RunResult:
    """The result of a finished run (or one stopped after tick ``reached`` − 1
    everywhere): every book holds its child's BYE (a group's sums the workers under
    it); ``processes``: how many workers ran.

    ``times``: when the run started, its first GRANT went out, its last DONE came in;
    ``observed``: the observations taken in.
    """
    started, ticking, ticked = times
    books = list(books)
    merged = merge_byes(book.bye for book in books)  # type: ignore[misc]
    stats, metrics, results = merged.stats, merged.metrics, merged.results
    traces, per_node, kinds = merged.trace, merged.node_metrics, merged.kinds
    late = stats.get("late", 0)
    return RunResult(
        topology=topology.name, ticks=topology.ticks if reached is None else reached,
        digest=chain.digest.hex(),
        processes=processes, groups=groups, node_count=len(topology.nodes),
        seconds=ticked - ticking,
        startup_seconds=ticking - started, messages=stats.get("messages", 0),
        undelivered=stats.get("undelivered", 0), unread=stats.get("unread", 0),
        rejected_frames=rejected + stats.get("rejected", 0),
        window=str(sizer.size) if sizer.fixed else "auto", real=topology.real,
        late_ticks=late, metrics=dict(sorted(metrics.items())),
        tick_digests=chain.tick_digests, nodes=dict(sorted(results.items())),
        node_metrics=dict(sorted(per_node.items())), metric_kinds=dict(sorted(kinds.items())),
        trace=dict(sorted(traces.items())), observations=observed.table(),
        observations_cut=observed.cut, observations_file=observed.path,
        observations_rows=observed.rows)


def merge_byes(byes: Iterable[proto.Bye], inside: Container[str] = ()) -> proto.Bye:
    """A supervisor's children's BYEs as one (what a group says up, what a run's
    result sums): counts and metrics summed (``late``: the most any child had),
    results, traces, node metrics and metric kinds joined, and, for every
    neighbour not ``inside``, the furthest any child got (1 + its last tick)."""
    stats: dict[str, int] = {}
    metrics: dict[str, int] = {}
    received: dict[str, int] = {}
    results: dict[str, Any] = {}
    per_node: dict[str, dict[str, Any]] = {}
    kinds: dict[str, str] = {}
    trace: dict[str, list[Any]] = {}
    for bye in byes:
        results.update(bye.results)
        trace.update(bye.trace)
        per_node.update(bye.node_metrics)
        kinds.update(bye.kinds)
        for name, value in bye.stats.items():
            stats[name] = max(stats.get(name, 0), value) if name == "late" \
                else stats.get(name, 0) + value
        for name, value in bye.metrics.items():
            metrics[name] = metrics.get(name, 0) + value
        for peer, count in bye.received.items():
            if peer not in inside:
                received[peer] = max(received.get(peer, 0), count)
    return proto.Bye(stats=stats, metrics=metrics, received=received, results=results,
                     node_metrics=per_node, kinds=kinds, trace=trace)


KINDS: dict[str, type[RunFailed]] = {
    cls.__name__: cls for cls in (RunFailed, NodeError, TickTimeout, ProcessExited)}


def worker_failure(book: WorkerBook, message: proto.Error, nodes_of: Callable[[str], tuple],
                   tick: int | None, tick_timeout: float) -> RunFailed:
    """The failure an ERROR frame from ``book``'s worker means.

    A bad DATA frame (``peer`` set) is the peer's fault; ``node-error`` and
    ``tick-timeout`` name the node; a sub-supervisor's ``subtree`` error names the
    worker under it that failed; anything else names the worker. ``nodes_of``
    gives any worker's node names.
    """
    tick = message.tick if message.tick is not None else tick
    nodes = (message.node,) if message.node else book.node_names
    if message.code == "subtree" and message.worker is not None:
        kind = KINDS.get(message.field, RunFailed)
        fields: dict[str, Any] = dict(
            worker=message.worker, tick=tick, cause=message.cause or message.detail,
            nodes=(message.node,) if message.node else nodes_of(message.worker),
            detail=message.detail if message.cause else "")
        if kind is ProcessExited:
            fields["exitcode"] = message.exitcode
        return kind(**fields)
    if message.peer is not None:
        return RunFailed(worker=message.peer, nodes=nodes_of(message.peer), tick=tick,
                         cause=f"sent {book.name} an invalid DATA frame: {message.field}: "
                               f"{message.detail}")
    if message.code == "node-error":
        cause = message.cause or (message.detail.strip().splitlines()[-1] if message.detail
                                  else "error")
        return NodeError(worker=book.name, nodes=nodes, tick=tick, cause=cause,
                         detail=message.detail)
    if message.code == "tick-timeout":
        return TickTimeout(worker=book.name, nodes=nodes, tick=tick,
                           cause=f"ran past the {tick_timeout:g} s tick deadline "
                                 "(interrupted)", detail=message.detail)
    return RunFailed(worker=book.name, nodes=nodes, tick=tick,
                     cause=f"{message.code}: {message.detail}")


def refusal(book: WorkerBook, exc: FrameError | ProtocolError, tick: int | None) -> RunFailed:
    """The failure of a worker that sent an invalid frame (``exc`` says why)."""
    if exc.code == "version-mismatch":
        cause = str(exc)
    elif isinstance(exc, FrameError):
        cause = f"sent an invalid frame: {exc}"
    else:
        cause = f"sent an invalid frame: {exc.field}: {exc}"
    return RunFailed(worker=book.name, nodes=book.node_names, tick=tick, cause=cause)


def placed(failure: ProcessExited, books: Iterable[WorkerBook]) -> ProcessExited:
    """A process died without a word: its neighbours' BYEs tell how many of its DATA
    frames arrived, so the tick it died in, exactly."""
    if failure.tick is None:
        return failure
    heard = [book.bye.received.get(failure.worker, 0) for book in books
             if book.bye is not None]
    tick = max([failure.tick, *heard])
    if tick == failure.tick:
        return failure
    return ProcessExited(worker=failure.worker, nodes=failure.nodes, tick=tick,
                         exitcode=failure.exitcode, cause=failure.cause, kind=failure.kind)


def late_start(books: Iterable[WorkerBook],
               seconds: float) -> tuple[TickTimeout, list[WorkerBook]]:
    """Start-up ran out of time: the failure, and the workers stuck (those that never
    said HELLO, else those not READY)."""
    late = [book for book in books if not book.ready_or_failed]
    quiet = [book for book in late if book.hello is None]
    stuck, what = (quiet, "HELLO") if quiet else (late, "READY")
    first = stuck[0]
    return TickTimeout(worker=first.name, nodes=first.node_names, tick=None,
                       cause=f"no {what} within {seconds:g} s of start{_killed(first)}"), stuck


def silent(book: WorkerBook, seconds: float, tick_timeout: float) -> TickTimeout:
    """A worker owing DONE said nothing for ``seconds``: stuck inside a tick."""
    return TickTimeout(worker=book.name, nodes=book.node_names, tick=book.progress + 1,
                       cause=f"silent for {seconds:.1f} s on one tick, past the "
                             f"{tick_timeout:g} s tick deadline{_killed(book)}")


def _killed(book: WorkerBook) -> str:
    """What the supervisor does to a worker stuck at a deadline: a process it started
    is killed; one started by hand it cannot signal (it is left to the orphan rule)."""
    return " (started by hand: not killed)" if book.external else " (killed)"


def lost_frame(sender: str, nodes: tuple[str, ...], receiver: WorkerBook) -> RunFailed:
    """``receiver`` waited too long for a DATA frame worker ``sender`` says it sent."""
    return RunFailed(worker=sender, nodes=nodes, tick=receiver.progress,
                     cause=f"its DATA frame of tick {receiver.progress} never reached "
                           f"{receiver.name}")


def subtree_error(failure: RunFailed) -> proto.Error:
    """The ERROR a sub-supervisor sends up for a failure under it (see
    :func:`worker_failure`, which reads it back)."""
    return proto.Error(code="subtree", field=type(failure).__name__, worker=failure.worker,
                       tick=failure.tick, cause=failure.cause[:10_000],
                       detail=failure.detail[-8000:] or failure.cause[:8000],
                       node=failure.nodes[0] if len(failure.nodes) == 1 else None,
                       exitcode=getattr(failure, "exitcode", None))


def error_frame(exc: ClusterError, tick: int | None) -> bytes:
    """The ERROR frame that answers ``exc``."""
    return proto.encode(proto.Error(code=getattr(exc, "code", "error"), detail=str(exc),
                                    field=getattr(exc, "field", ""), tick=tick))
