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
import struct
from array import array
from dataclasses import dataclass
from typing import IO, Iterator

from hiocluster.errors import CheckpointError, DigestFileError
from hiocluster.protocol.fields import DIGEST_SIZE, RUN_DIGEST_SIZE
from hiocluster.runtime.checkpoints import complete
from hiocluster.supervision.digests import node_digests

__all__ = ["DigestWriter", "DigestFile", "DigestFileError", "Divergence", "diff",
           "diff_checkpoints",
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
            only_a = sorted(set(a.nodes) - set(b.nodes))
            only_b = sorted(set(b.nodes) - set(a.nodes))
            return Divergence(False, None, only_a + only_b,
                              f"other nodes: only in A: {_few(only_a)}; only in B: "
                              f"{_few(only_b)}")
        states_b = b.states()
        tick_b, record_b = next(states_b, (None, b""))
        compared = 0
        last = None
        for tick_a, record_a in a.states():
            while tick_b is not None and tick_b < tick_a:
                tick_b, record_b = next(states_b, (None, b""))
            if tick_b is None:
                break
            if tick_b != tick_a:
                continue  # a tick only A digested (another digest_every)
            compared, last = compared + 1, tick_a
            if record_a[8:] != record_b[8:]:
                nodes = [name for k, name in enumerate(a.nodes)
                         if a.node_digest(record_a, k) != b.node_digest(record_b, k)]
                where = "set-up" if tick_a == -1 else f"tick {tick_a}"
                which = f"nodes: {_few(nodes)}" if nodes else \
                    "the run digest only (a state before it, not in both files, differs)"
                return Divergence(False, tick_a, nodes,
                                  f"first divergent state: {where}; {which}")
        if compared == 0:
            return Divergence(False, None, [], "no digested tick in common")
        ends_a = last_tick(a)
        ends_b = last_tick(b)
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
