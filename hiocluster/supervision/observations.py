"""The run's observations, taken in window by window (docs/protocol.md §7,
"Observations").

Each DONE carries what its worker's nodes' ``observe()`` said in the window
(a group's, everything under it). Once every DONE of a window is in, the root
supervisor hands the window to :class:`Observations`, which sorts its rows by
tick, node and name and keeps them: in memory (``RunResult.observations``, at
most MAX_KEPT rows), or, given a file, appended to it at once, so a run of any
length holds one window in memory.

A file is CSV (``tick,node,name,value``), or Parquet for ``*.parquet``
(pyarrow, an extra): its rows go to a CSV beside it (``<file>.part.csv``),
turned into Parquet at the end, a row group at a time. A restart from a
checkpoint after tick T (every worker starts again from there) drops the rows of
ticks after T, which the next try observes again: :meth:`Observations.rewind`.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from typing import IO, Any, Iterable

from hiocluster.errors import ObservationsError
from hiocluster.protocol.observed import Columns

__all__ = ["Observations", "MAX_KEPT", "COLUMNS", "read_observations"]

#: Most rows kept in memory (without a file); beyond, the table stops at the
#: first tick that does not fit whole, and ``cut`` says which.
MAX_KEPT = 8_000_000
#: The table's columns, in order.
COLUMNS = ("tick", "node", "name", "value")


class Observations:
    """Where a run's observations go (see the module docstring).

    Args:
        path: a file to stream them to (CSV, or Parquet for ``*.parquet``); None:
            keep them in memory.
        limit: most rows kept in memory.

    Raises:
        ObservationsError: the file cannot be made (or Parquet without pyarrow).
    """

    def __init__(self, path: str | None = None, limit: int = MAX_KEPT) -> None:
        self.path = path
        self.limit = limit
        self.rows = 0
        self.cut: int | None = None  # the first tick missing, where they stopped
        self.columns: tuple[list[int], list[str], list[str], list[float]] = ([], [], [], [])
        self.ends: list[tuple[int, int]] = []  # per window: (its last tick, rows after it)
        self.error: str | None = None  # why writing stopped (the disk full, say)
        self.file: IO[str] | None = None
        self.offsets: list[int] = []  # per window: the file's size after it
        self.parquet = path is not None and path.endswith(".parquet")
        if path is None:
            return
        self.spool = path + ".part.csv" if self.parquet else path
        try:
            if self.parquet:
                import pyarrow.parquet  # noqa: F401  (now, not when the run is over)
            self.file = open(self.spool, "w", encoding="utf-8", newline="")
            header = ",".join(COLUMNS) + "\n"
            self.file.write(header)
            self.start = len(header)  # its size (no flush: a full disk is found later)
        except (OSError, ImportError) as exc:
            raise ObservationsError(f"cannot write --observe {path}: "
                                    f"{getattr(exc, 'strerror', None) or exc}") from None

    def window(self, last: int, parts: Iterable[Columns], cuts: Iterable[int] = ()) -> None:
        """The observations of a window up to tick ``last`` (every worker's, in
        ``parts``: name -> (ticks, nodes, values)); ``cuts``: ticks from which a
        worker observes no more (its room was full): the table stops at the first."""
        if self.cut is not None:
            return
        cut = min((tick for tick in cuts if tick >= 0), default=None)
        rows = [(tick, node, name, value) for part in parts
                for name, (ticks, nodes, values) in part.items()
                for tick, node, value in zip(ticks, nodes, values)
                if cut is None or tick < cut]
        rows.sort()
        if self.path is None and self.rows + len(rows) > self.limit:
            room = self.limit - self.rows
            cut = rows[room][0]  # the first tick that does not fit whole
            rows = rows[:bisect.bisect_left(rows, (cut,))]
        self.extend(rows)
        self.ends.append((last, self.rows))
        self.cut = cut

    def extend(self, rows: list[tuple[int, str, str, float]]) -> None:
        """Append ``rows`` (in order) to the file or the table."""
        if self.path is None:
            for column, values in zip(self.columns, zip(*rows)):
                column.extend(values)  # type: ignore[attr-defined]
        elif self.file is not None:
            try:
                self.file.write("".join(f"{tick},{node},{name},{float(value)!r}\n"
                                        for tick, node, name, value in rows))
                self.offsets.append(self.file.tell())
            except OSError as exc:  # said after the run; the run itself goes on
                self._failed(exc)
        self.rows += len(rows)

    def rewind(self, tick: int) -> None:
        """Keep the rows of ticks up to ``tick`` (a window's end; -1: none): a
        restart from the checkpoint after it observes the later ones again."""
        kept = bisect.bisect_right(self.ends, (tick, float("inf")))
        del self.ends[kept:]
        self.rows = self.ends[-1][1] if self.ends else 0
        if self.cut is not None and self.cut > tick:
            self.cut = None
        if self.path is None:
            for column in self.columns:
                del column[self.rows:]
        elif self.file is not None:
            del self.offsets[kept:]
            try:
                self.file.flush()
                self.file.truncate(self.offsets[-1] if self.offsets else self.start)
                self.file.seek(0, os.SEEK_END)
            except OSError as exc:
                self._failed(exc)

    def close(self) -> None:
        """Finish the file (Parquet: made from the CSV written so far); nothing to do
        in memory. Safe to call twice."""
        if self.file is None:
            return
        file, self.file = self.file, None
        try:
            file.close()
            if self.parquet:
                assert self.path is not None
                _to_parquet(self.spool, self.path)
        except OSError as exc:
            self._failed(exc)
        finally:
            if self.parquet:
                with contextlib.suppress(OSError):
                    os.unlink(self.spool)

    def _failed(self, exc: OSError) -> None:
        self.error = self.error or f"cannot write --observe {self.path}: " \
            f"{exc.strerror or exc}"
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None

    def table(self) -> dict[str, Any]:
        """The rows kept in memory, in columns (numpy arrays for ``tick`` and
        ``value`` where numpy is installed); empty with a file."""
        return _table(self.columns)


def _table(columns: Iterable[list[Any]]) -> dict[str, Any]:
    """Columns in COLUMNS order as a table: numpy arrays for ``tick`` (int64) and
    ``value`` (float64) where numpy is installed."""
    table: dict[str, Any] = {key: list(column) for key, column in zip(COLUMNS, columns)}
    try:
        import numpy
    except ImportError:
        return table
    table["tick"] = numpy.asarray(table["tick"], dtype=numpy.int64)
    table["value"] = numpy.asarray(table["value"], dtype=numpy.float64)
    return table


def read_observations(path: str) -> dict[str, Any]:
    """A file :class:`Observations` wrote, back in columns (numpy arrays for
    ``tick`` and ``value`` where numpy is installed)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet

        read = pyarrow.parquet.read_table(path).to_pydict()
    else:
        with open(path, encoding="utf-8") as file:
            header = file.readline()
            if header.rstrip("\n") != ",".join(COLUMNS):
                raise ValueError(f"{path} is no observations file: its first line is "
                                 f"{header[:80]!r}")
            rows = [line.rstrip("\n").split(",") for line in file]
        read = {key: list(column) for key, column in zip(COLUMNS, zip(*rows))} if rows \
            else {key: [] for key in COLUMNS}
        read["tick"] = [int(tick) for tick in read["tick"]]
        read["value"] = [float(value) for value in read["value"]]
    return _table([read[key] for key in COLUMNS])


def _to_parquet(source: str, target: str) -> None:
    """The CSV ``source`` as a Parquet file, read and written a block at a time."""
    import pyarrow
    import pyarrow.csv
    import pyarrow.parquet

    schema = pyarrow.schema([("tick", pyarrow.int64()), ("node", pyarrow.string()),
                             ("name", pyarrow.string()), ("value", pyarrow.float64())])
    reader = pyarrow.csv.open_csv(source, convert_options=pyarrow.csv.ConvertOptions(
        column_types=schema))
    with pyarrow.parquet.ParquetWriter(target, schema) as writer:
        for batch in reader:
            writer.write_batch(batch)
