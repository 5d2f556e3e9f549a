"""Parameter sweeps: many runs of one topology over a grid of params and seeds.

:func:`sweep` makes one topology per point of the grid and seed (a param
``TABLE.PARAM`` set on every node of ``[nodes.TABLE]``, or ``run.KEY`` a run
setting such as ``run.ticks``), runs each to completion with
:func:`hiocluster.run` in a pool of ``parallel`` processes (each run spreading
its nodes over ``processes_per_run`` workers of its own), and returns one
table: a row per run with its params, seed, digest, time and node results,
or the error that ended it (a failed run is a row, never the end of the
sweep). The pool's processes are started with ``spawn``: a script that calls
:func:`sweep` needs the usual ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import csv
import itertools
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

from hiocluster.errors import TopologyError
from hiocluster.topology import Topology, load
from hiocluster.topology.limits import RUN_DEFAULTS

__all__ = ["sweep", "SweepResult", "points", "apply_point"]

#: Seconds between two progress lines.
PROGRESS_S = 2.0


def points(grid: Mapping[str, Iterable[Any]] | Sequence[Mapping[str, Any]] | None
           ) -> list[dict[str, Any]]:
    """The grid's points: every combination of a ``{name: values}`` mapping (in its
    order), or a list of ``{name: value}`` dicts as given; ``[{}]`` for none."""
    if grid is None:
        return [{}]
    if isinstance(grid, Mapping):
        names = list(grid)
        values = [list(grid[name]) for name in names]
        for name, options in zip(names, values):
            if not options:
                raise ValueError(f"sweep parameter {name!r} has no values")
        return [dict(zip(names, combination)) for combination in itertools.product(*values)]
    found = [dict(point) for point in grid]
    if not found:
        raise ValueError("the sweep's list of points is empty")
    return found


def apply_point(topology: Topology, point: Mapping[str, Any], seed: int | None) -> Topology:
    """``topology`` with ``point``'s params and ``seed`` (None: its own).

    Raises:
        TopologyError: a name that is neither ``TABLE.PARAM`` of a node table nor
            ``run.KEY``, or a run setting out of range (named).
    """
    nodes, run = list(topology.nodes), {}
    tables = {node.table or node.name for node in topology.nodes}
    for name, value in point.items():
        table, dot, param = name.partition(".")
        if not dot or not param:
            raise TopologyError(f"sweep parameter {name!r}: expected TABLE.PARAM (a param of "
                                f"every node of [nodes.TABLE]) or run.KEY",
                                key_path=f"sweep.{name}")
        if table == "run":
            if param not in RUN_DEFAULTS or param == "metrics":
                raise TopologyError(f"sweep parameter {name!r}: no run setting {param!r}",
                                    key_path=f"sweep.{name}")
            run[param] = value
            continue
        if table not in tables:
            raise TopologyError(f"sweep parameter {name!r}: no node table {table!r} (tables: "
                                f"{', '.join(sorted(tables))})", key_path=f"sweep.{name}")
        nodes = [replace(node, params={**node.params, param: value})
                 if (node.table or node.name) == table else node for node in nodes]
    if seed is not None:
        run["seed"] = seed
    run["metrics"] = ""  # runs side by side cannot share an endpoint's address
    return topology.replace(nodes=tuple(nodes), **run)


@dataclass
class SweepResult:
    """A sweep's table: one row per run, in the order of the grid, then seeds.

    Each row: ``run`` (its number), ``params`` (the point), ``seed``, ``digest``,
    ``seconds`` (the run's own, start-up excluded), ``wall`` (seconds from its
    start in the pool to its result), ``ticks_per_second``, ``results`` (every
    node's :meth:`Node.result`), ``observed`` (each observation's mean over the
    nodes at the last tick observed: a column ``observed.NAME`` each in the
    flat table) and ``error`` (None, or what ended it)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["error"] is not None]

    def columns(self) -> list[str]:
        names = list(dict.fromkeys(name for row in self.rows for name in row["params"]))
        observed = sorted({f"observed.{name}" for row in self.rows for name in row["observed"]})
        return ["run", *names, "seed", "digest", "seconds", "wall", "ticks_per_second",
                *observed, "error", "results"]

    def flat(self) -> list[dict[str, Any]]:
        """Rows with the params as columns of their own and the results as JSON."""
        from hiocluster.supervision.outcome import jsonable

        return [{"run": row["run"], **row["params"], "seed": row["seed"],
                 "digest": row["digest"], "seconds": row["seconds"], "wall": row["wall"],
                 "ticks_per_second": row["ticks_per_second"],
                 **{f"observed.{name}": value for name, value in row["observed"].items()},
                 "error": row["error"],
                 "results": json.dumps(jsonable(row["results"]), separators=(",", ":"))
                 if row["results"] is not None else None}
                for row in self.rows]

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the table as CSV (params as columns, results as JSON)."""
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns())
            writer.writeheader()
            writer.writerows(self.flat())

    def to_pandas(self) -> Any:
        """The table as a pandas DataFrame (pandas must be installed)."""
        import pandas

        return pandas.DataFrame(self.flat(), columns=self.columns())

    def to_json(self) -> dict[str, Any]:
        return {"runs": len(self.rows), "failed": len(self.failed),
                "seconds": round(self.seconds, 3), "rows": self.flat()}


def _one(topology: Topology, processes: int | None, app_dir: str | None) -> dict[str, Any]:
    """One run, in a pool process: what its row says."""
    from hiocluster.supervision.supervisor import run

    began = time.monotonic()
    try:
        result = run(topology, processes=processes, app_dir=app_dir, handle_signals=False)
    except Exception as exc:  # a failed run is a row: the sweep goes on
        return {"error": f"{type(exc).__name__}: {exc}",
                "wall": round(time.monotonic() - began, 6)}
    return {"digest": result.digest, "seconds": round(result.seconds, 6),
            "ticks_per_second": round(result.ticks_per_second, 3),
            "results": result.nodes, "error": None,
            "observed": last_means(result.observations),
            "wall": round(time.monotonic() - began, 6)}


def last_means(table: Mapping[str, Any]) -> dict[str, float]:
    """Each observation's mean over the nodes at the last tick it was observed
    (``RunResult.observed(name, "mean")``'s last value), in one pass over the
    table (sorted by tick)."""
    last: dict[str, list[Any]] = {}  # name -> [tick, sum, count]
    for tick, name, value in zip(table.get("tick", ()), table.get("name", ()),
                                 table.get("value", ())):
        seen = last.get(name)
        if seen is None or seen[0] != tick:
            last[name] = [tick, float(value), 1]
        else:
            seen[1] += float(value)
            seen[2] += 1
    return {name: total / count for name, (_, total, count) in sorted(last.items())}


def sweep(topology: Topology | str | os.PathLike[str],
          grid: Mapping[str, Iterable[Any]] | Sequence[Mapping[str, Any]] | None = None, *,
          seeds: Iterable[int] | None = None, processes_per_run: int | None = 1,
          parallel: int | None = None, app_dir: str | None = None,
          progress: bool | Callable[[int, int, int], None] = True) -> SweepResult:
    """Run ``topology`` at every point of ``grid`` (a ``{"TABLE.PARAM": values}``
    mapping, every combination, or a list of ``{name: value}`` dicts) and every
    seed of ``seeds`` (None: the topology's own), ``parallel`` runs at a time
    (None: one per core / ``processes_per_run``), each over ``processes_per_run``
    worker processes (None: as :func:`hiocluster.run` decides). ``progress``:
    a line on stderr every few seconds (False: none; a callable: called with
    (done, failed, total) after each run).

    Raises:
        TopologyError: the topology, or a name of the grid, is invalid (before
            anything runs).
        ValueError: an empty grid or seed list, or a bad ``parallel``.
    """
    if not isinstance(topology, Topology):
        topology = load(topology)
    if not topology.nodes:
        raise TopologyError("a sweep runs simulations: this topology has no nodes",
                            key_path="nodes")
    seed_list: list[int | None] = [None] if seeds is None else list(seeds)
    if not seed_list:
        raise ValueError("the sweep's list of seeds is empty")
    jobs = [(point, seed, apply_point(topology, point, seed))
            for point in points(grid) for seed in seed_list]  # every name checked first
    cores = os.cpu_count() or 1
    if parallel is None:
        parallel = max(1, cores // max(1, processes_per_run or 1))
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    parallel = min(parallel, len(jobs))
    rows: list[dict[str, Any]] = [
        {"run": k, "params": dict(point), "seed": made.seed, "digest": None, "seconds": None,
         "wall": None, "ticks_per_second": None, "results": None, "observed": {},
         "error": None}
        for k, (point, seed, made) in enumerate(jobs)]
    began, said, done, failed = time.monotonic(), time.monotonic(), 0, 0
    with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: dict[Future[dict[str, Any]], int] = {
            pool.submit(_one, made, processes_per_run, app_dir): k
            for k, (_, _, made) in enumerate(jobs)}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    k = pending.pop(future)
                    try:
                        rows[k].update(future.result())
                    except Exception as exc:  # the pool process itself died
                        rows[k].update(error=f"{type(exc).__name__}: {exc}")
                    done += 1
                    failed += rows[k]["error"] is not None
                    if callable(progress):
                        progress(done, failed, len(jobs))
                now = time.monotonic()
                if progress is True and (now - said >= PROGRESS_S or not pending):
                    said = now
                    rate = done / (now - began)
                    left = f", about {(len(jobs) - done) / rate:.0f} s left" if pending else ""
                    print(f"hiocluster: sweep: {done}/{len(jobs)} runs ({failed} failed), "
                          f"{now - began:.1f} s{left}", file=sys.stderr, flush=True)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return SweepResult(rows, time.monotonic() - began)
