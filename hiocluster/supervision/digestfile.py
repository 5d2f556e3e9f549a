"""Digest files: every node's digest after every digested tick, and their diff.

``hiocluster run ... --digests FILE`` writes one; ``hiocluster diff A B`` names
the first tick at which two runs' states differ, and the nodes that differ
there (docs/protocol.md §7, "Digest files").

Layout: a header line, UTF-8 JSON ending in ``\\n``::

    {"format": "hiocluster-digests", "version": 1, "topology": "ring",
     "ticks": 1000, "digest_every": 1, "nodes": ["n0", "n1", ...]}

then one record per digested state, oldest first (the state after set-up is
tick -1): the tick (signed 64-bit little-endian), the run digest after it (32
bytes), then for each node in name order ``utf8(name) + node digest`` (16
bytes): the records the run digest folds, as they are. Every record has the
same size, and names its nodes, so a file cut short or altered is told apart
from a run that differs.
"""

from __future__ import annotations

import bisect
import json
import os
import struct
from array import array
from dataclasses import dataclass
from typing import IO, Callable, Iterator

from hiocluster.errors import CheckpointError, DigestFileError, RecordError
from hiocluster.protocol.fields import DIGEST_SIZE, RUN_DIGEST_SIZE, differing_nodes
from hiocluster.runtime.checkpoints import complete
from hiocluster.supervision.digests import digested, node_digests
from hiocluster.worker.record import WINDOW, RecordReader, read_manifest

__all__ = ["DigestWriter", "DigestFile", "DigestFileError", "Divergence", "diff",
           "diff_checkpoints", "diff_records",
           "FORMAT", "VERSION"]

FORMAT, VERSION = "hiocluster-digests", 1
#: Longest header line read (a topology of MAX_NODES names fits).
MAX_HEADER = 64 * 1024 * 1024
_TICK = struct.Struct("<q")


class DigestWriter:
    """Write a digest file as the run folds its states (``DigestChain.sink``).

    Args:
        path: the file (replaced).
        topology, ticks, digest_every: the run's.
        nodes: every node name.
    """

    def __init__(self, path: str, topology: str, ticks: int, digest_every: int,
                 nodes: list[str]) -> None:
        self.path = path
        self.error: str | None = None  # why writing stopped (the disk full, say)
        self.written = 0   # states
        self._ticks = array("q")  # each record's tick, for rewind()
        self._size = 0            # a record's (they all have one)
        header = {"format": FORMAT, "version": VERSION, "topology": topology,
                  "ticks": ticks, "digest_every": digest_every, "nodes": sorted(nodes)}
        try:
            self.file: IO[bytes] | None = open(path, "wb")
            self.file.write(json.dumps(header).encode() + b"\n")
        except OSError as exc:
            raise DigestFileError(f"cannot write --digests {path}: "
                                  f"{exc.strerror or exc}") from None

    def __call__(self, tick: int, digest: bytes, records: bytes) -> None:
        if self.file is not None:
            record = _TICK.pack(tick) + digest + records
            self._size = len(record)
            try:
                self.file.write(record)
            except OSError as exc:  # said after the run; the run itself goes on
                self.error = f"cannot write --digests {self.path}: {exc.strerror or exc}"
                self.close()
                return
            self.written += 1
            self._ticks.append(tick)

    def rewind(self, tick: int | None) -> None:
        """Drop the records after ``tick`` (None: every record): a run restarted from
        its checkpoint after ``tick`` (or from its start) writes them again."""
        if self.file is None:
            return
        kept = 0 if tick is None else bisect.bisect_right(self._ticks, tick)
        try:
            self.file.flush()
            self.file.truncate(self.file.tell() - (self.written - kept) * self._size)
            self.file.seek(0, 2)
        except OSError as exc:
            self.error = f"cannot write --digests {self.path}: {exc.strerror or exc}"
            self.close()
            return
        del self._ticks[kept:]
        self.written = kept

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError as exc:
                self.error = self.error or \
                    f"cannot write --digests {self.path}: {exc.strerror or exc}"
            self.file = None


@dataclass
class Divergence:
    """What :func:`diff` found: ``equal``, or the first ``tick`` at which the
    states differ (None: they differ otherwise: other nodes, or one run ends
    first) and the ``nodes`` whose digests differ there; ``detail`` in words."""

    equal: bool
    tick: int | None
    nodes: list[str]
    detail: str


class DigestFile:
    """A digest file, read: its header (``topology``, ``ticks``, ``every``,
    ``nodes``) and its records (:meth:`states`). Raises DigestFileError."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.file: IO[bytes] = open(path, "rb")
        except OSError as exc:
            raise DigestFileError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            line = self.file.readline(MAX_HEADER)
            header = json.loads(line) if line.endswith(b"\n") else None
        except (ValueError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            self.close()
            raise DigestFileError(f"{path} is not a hiocluster digest file")
        if header.get("version") != VERSION:
            self.close()
            raise DigestFileError(f"{path}: digest file version {header.get('version')!r}, "
                                  f"this hiocluster reads version {VERSION}")
        nodes = header.get("nodes")
        if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes) \
                or nodes != sorted(set(nodes)):
            self.close()
            raise DigestFileError(f"{path}: its header's nodes are not a sorted list of "
                                  "distinct names")
        self.topology = str(header.get("topology", "?"))
        self.ticks, self.every = header.get("ticks"), header.get("digest_every")
        self.nodes: list[str] = nodes
        self.names = [name.encode() for name in nodes]
        self.size = _TICK.size + RUN_DIGEST_SIZE + sum(len(name) + DIGEST_SIZE
                                                       for name in self.names)
        self._offsets: list[int] = []
        offset = _TICK.size + RUN_DIGEST_SIZE
        for name in self.names:
            self._offsets.append(offset)
            offset += len(name) + DIGEST_SIZE

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> DigestFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def states(self) -> Iterator[tuple[int, bytes]]:
        """(tick, record) for each state, oldest first; raises DigestFileError on a
        record cut short, out of order, or not naming the header's nodes."""
        last = None
        index = 0
        while True:
            record = self.file.read(self.size)
            if not record:
                return
            if len(record) != self.size:
                raise DigestFileError(f"{self.path}: record {index} is cut short "
                                      f"({len(record)} of {self.size} bytes)")
            tick = _TICK.unpack_from(record)[0]
            if tick < -1 or (last is not None and tick <= last):
                raise DigestFileError(f"{self.path}: record {index} is for tick {tick}, "
                                      f"after tick {last}")
            for name, offset in zip(self.names, self._offsets):
                if record[offset:offset + len(name)] != name:
                    raise DigestFileError(f"{self.path}: record {index} (tick {tick}) does "
                                          f"not name node {name.decode()!r} where it should")
            yield tick, record
            last, index = tick, index + 1

    def node_digest(self, record: bytes, k: int) -> bytes:
        start = self._offsets[k] + len(self.names[k])
        return record[start:start + DIGEST_SIZE]


def diff(path_a: str, path_b: str) -> Divergence:
    """The first digested tick both files hold at which the states differ, and
    the nodes that differ there; a file that ends before the other, or holds
    other nodes, differs too. Raises DigestFileError."""
    with DigestFile(path_a) as a, DigestFile(path_b) as b:
        if a.nodes != b.nodes:
            return _other_nodes(a.nodes, b.nodes)

        def nodes(record_a: bytes, record_b: bytes) -> list[str]:
            return [name for k, name in enumerate(a.nodes)
                    if a.node_digest(record_a, k) != b.node_digest(record_b, k)]

        # a record starts with its tick: the same in the two compared
        return _first_divergence(a.states(), b.states(), nodes,
                                 lambda: (last_tick(a), last_tick(b)))


def diff_records(root_a: str, root_b: str) -> Divergence:
    """Two record directories (``--record DIR``), state by state as :func:`diff`:
    every worker's digest records of a state spliced into the run's, so runs
    recorded at other placements compare node by node. A record cut short (a
    worker killed) is compared up to its last whole window. Raises RecordError."""
    nodes_a, states_a = _recorded_states(root_a)
    nodes_b, states_b = _recorded_states(root_b)
    if nodes_a != nodes_b:
        return _other_nodes(nodes_a, nodes_b)
    ends: list[int | None] = [None, None]  # the last state each holds, once read to its end

    def counted(states: Iterator[tuple[int, bytes]], k: int) -> Iterator[tuple[int, bytes]]:
        for tick, records in states:
            ends[k] = tick
            yield tick, records

    def rest() -> tuple[int | None, int | None]:
        for states in (seen_a, seen_b):
            for _ in states:
                pass
        return ends[0], ends[1]

    seen_a, seen_b = counted(states_a, 0), counted(states_b, 1)
    return _first_divergence(seen_a, seen_b, lambda a, b: differing_nodes(a, b, nodes_a),
                             rest)


def _recorded_states(root: str) -> tuple[list[str], Iterator[tuple[int, bytes]]]:
    """A record directory's nodes, and its states: (tick, the records of every
    node spliced in name order), as far as every worker's record holds them."""
    read_manifest(root)  # a directory run --record wrote, or a clear RecordError
    try:
        paths = sorted(entry.path for entry in os.scandir(root) if entry.name.endswith(".rec"))
    except OSError as exc:
        raise RecordError(f"cannot read the record directory {root}: "
                          f"{exc.strerror or exc}") from None
    if not paths:
        raise RecordError(f"{root} holds no worker's record (*.rec)")
    readers = [RecordReader(path) for path in paths]
    names = sorted(row[0] for reader in readers for row in reader.setup.nodes)
    if len(set(names)) != len(names):
        raise RecordError(f"{root}: its workers' records name a node twice: not one run")

    def states() -> Iterator[tuple[int, bytes]]:
        try:
            for held in zip(*(_worker_states(reader) for reader in readers)):
                ticks = {tick for tick, _ in held}
                if len(ticks) != 1:
                    raise RecordError(f"{root}: its workers' records hold other ticks "
                                      f"({sorted(ticks)[:4]}): not one run")
                found: dict[str, bytes] = {}
                for reader, (tick, records) in zip(readers, held):
                    try:
                        found.update(node_digests(records, (row[0] for row in
                                                            reader.setup.nodes)))
                    except ValueError as exc:
                        raise RecordError(f"{reader.path}: the state of tick {tick}: "
                                          f"{exc}") from None
                yield ticks.pop(), b"".join(name.encode() + found[name] for name in names)
        finally:
            for reader in readers:
                reader.close()

    return names, states()


def _worker_states(reader: RecordReader) -> Iterator[tuple[int, bytes]]:
    """(tick, its digest records) of each state one worker's record holds: after
    set-up (unless it resumed), then each window's, as its DONE carried them."""
    setup, size = reader.setup, len(reader.ready)
    if not setup.resume:
        yield -1, reader.ready
    for kind, until, digests in reader.entries():
        if kind != WINDOW:
            continue
        count, odd = divmod(len(digests), size) if size else (0, 0)
        ticks: list[int] = []
        tick = min(until, setup.ticks - 1)
        while len(ticks) < count and tick >= 0:  # the window's digested ticks, newest first
            if digested(tick, setup.digest_every, setup.ticks):
                ticks.append(tick)
            tick -= 1
        if odd or len(ticks) != count:
            raise RecordError(f"{reader.path}: entry {reader.index}, the window to tick "
                              f"{until}, holds {len(digests)} bytes of digests: not whole "
                              "states of its ticks")
        for k, tick in enumerate(reversed(ticks)):
            yield tick, digests[k * size:(k + 1) * size]


def _other_nodes(nodes_a: list[str], nodes_b: list[str]) -> Divergence:
    only_a = sorted(set(nodes_a) - set(nodes_b))
    only_b = sorted(set(nodes_b) - set(nodes_a))
    return Divergence(False, None, only_a + only_b,
                      f"other nodes: only in A: {_few(only_a)}; only in B: {_few(only_b)}")


def _first_divergence(states_a: Iterator[tuple[int, bytes]],
                      states_b: Iterator[tuple[int, bytes]],
                      nodes: Callable[[bytes, bytes], list[str]],
                      ends: Callable[[], tuple[int | None, int | None]]) -> Divergence:
    """The first tick both hold at which the states (bytes) differ, and the
    ``nodes`` that differ there; equal states to the end differ still where
    ``ends`` says one run ends first."""
    tick_b, record_b = next(states_b, (None, b""))
    compared = 0
    last = None
    for tick_a, record_a in states_a:
        while tick_b is not None and tick_b < tick_a:
            tick_b, record_b = next(states_b, (None, b""))
        if tick_b is None:
            break
        if tick_b != tick_a:
            continue  # a tick only A digested (another digest_every)
        compared, last = compared + 1, tick_a
        if record_a != record_b:
            differ = [name for name in nodes(record_a, record_b) if name != "?"]
            where = "set-up" if tick_a == -1 else f"tick {tick_a}"
            which = f"nodes: {_few(differ)}" if differ else \
                "the run digest only (a state before it, not in both files, differs)"
            return Divergence(False, tick_a, differ, f"first divergent state: {where}; {which}")
    if compared == 0:
        return Divergence(False, None, [], "no digested tick in common")
    ends_a, ends_b = ends()
    if ends_a != ends_b:
        return Divergence(False, None, [], f"equal in the {compared} states both hold (to "
                                           f"tick {last}), but A ends at tick {ends_a} and B "
                                           f"at tick {ends_b}")
    return Divergence(True, None, [], f"equal: {compared} states, to tick {last}")


def diff_checkpoints(root_a: str, root_b: str) -> Divergence:
    """Two checkpoint directories (``--checkpoint DIR``): the states of the newest
    tick both hold a complete checkpoint of, node by node (an earlier tick may be
    where they first differ: a digest file says). Raises CheckpointError."""
    found_a, found_b = complete(root_a), complete(root_b)
    common = sorted(set(found_a) & set(found_b))
    if not common:
        return Divergence(False, None, [], f"no checkpoint of the same tick in both (A: "
                                           f"{sorted(found_a)[-3:]}, B: {sorted(found_b)[-3:]})")
    tick = common[-1]
    a, b = found_a[tick], found_b[tick]
    if a.get("digest") == b.get("digest") and a.get("records") == b.get("records"):
        return Divergence(True, None, [], f"equal at tick {tick}, the newest checkpoint both "
                                          "hold")
    nodes = set(_record_digests(a, tick).items()) ^ set(_record_digests(b, tick).items())
    names = sorted({name for name, _ in nodes})
    return Divergence(False, tick, names,
                      f"the states differ at tick {tick} (the newest checkpoint both hold; "
                      f"they may differ earlier); nodes: {_few(names)}")


def _record_digests(manifest: dict, tick: int) -> dict[str, bytes]:
    """Node name -> digest in the state a manifest records (its nodes: its placement)."""
    try:
        names = [name for nodes in manifest["placement"].values() for name in nodes]
        return node_digests(bytes.fromhex(manifest["records"]), names)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"the manifest of tick {tick}: its records or placement "
                              f"cannot be read ({exc})") from None


def last_tick(file: DigestFile) -> int | None:
    """The tick of the file's last record (None: no record), read from its end."""
    file.file.seek(0, 2)
    end = file.file.tell()
    file.file.seek(0)
    file.file.readline(MAX_HEADER)
    start = file.file.tell()
    count = (end - start) // file.size
    if count == 0:
        return None
    file.file.seek(start + (count - 1) * file.size)
    return int(_TICK.unpack(file.file.read(_TICK.size))[0])


def _few(names: list[str], shown: int = 8) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
