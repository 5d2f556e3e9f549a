"""Records (``hiocluster run --record DIR``): what one worker received, and the
digests of what it made of it, to replay that worker alone (hiocluster.worker.replay).

A worker's record, ``DIR/<worker>.rec``, is a stream of msgpack objects:

* a header map: ``format`` ("hiocluster-record"), ``version``, ``worker``,
  ``setup`` (the SETUP frame it got, as it came: its nodes, links, clock, seed,
  and the checkpoint it resumed from, if any), ``app_dir`` (where it imported
  node classes from) and ``ready`` (the digest records of its state after set-up
  or resume, as in READY);
* then, in the order they happened, entries ``[0, source, frame]`` (a DATA frame
  accepted from neighbour ``source``, its bytes as they came) and
  ``[1, until, digests]`` (a window done: the digest records of every digested
  tick in it, as in DONE);
* ``[2]`` when the worker stopped cleanly: the record is whole.

Frames are written as they are accepted, before the exchange checks them; the
window entry as its DONE is sent. The file is buffered: a worker killed with
-9 leaves a record cut short, which a replay reads up to its last whole entry.
A record is bounded: the worker fails the run (RecordError, naming the file)
before it would leave its file system with less than RESERVE free.

The supervisor writes ``DIR/record.json``: the run's topology, versions,
placement and checkpoint directory, and once the run is over its ticks/s.
"""

from __future__ import annotations

import json
import os
from typing import Any, BinaryIO, Iterator, Mapping

import msgpack

from hiocluster import protocol as proto
from hiocluster.errors import RecordError
from hiocluster.node import Node
from hiocluster.protocol.fields import MAX_DATA_FRAME, MAX_SETUP_FRAME, short
from hiocluster.runtime.checkpoints import atomic_write
from hiocluster.worker.exchange import Exchange

__all__ = ["FORMAT", "VERSION", "MANIFEST", "FRAME", "WINDOW", "END", "Recorder",
           "RecordingExchange", "RecordReader", "record_path", "directory_size", "RESERVE",
           "write_manifest", "read_manifest"]

FORMAT, VERSION = "hiocluster-record", 1
MANIFEST = "record.json"
FRAME, WINDOW, END = 0, 1, 2
#: Free space a record leaves on its file system: 5 % of it, at most 256 MiB.
RESERVE_SHARE, RESERVE_MAX = 0.05, 256 * 1024 * 1024
RESERVE = f"{RESERVE_SHARE:.0%} of its file system (at most {RESERVE_MAX >> 20} MiB) and " \
    "2 MiB more"
#: Bytes written between two looks at the free space, and buffered before a write
#: (RESERVE's 2 MiB more: two looks' worth, for the other workers' records).
CHECK_EVERY, BUFFER = 1024 * 1024, 256 * 1024
#: Largest entry read back (the header holds a SETUP, a frame is at most
#: MAX_DATA_FRAME, a window's digests fit in a DONE): a hostile file is refused.
MAX_ENTRY = max(MAX_DATA_FRAME, MAX_SETUP_FRAME) + 1024 * 1024


def record_path(directory: str, worker: str) -> str:
    return os.path.join(directory, f"{worker}.rec")


def write_manifest(directory: str, manifest: Mapping[str, Any]) -> None:
    """``DIR/record.json`` (see the module docstring); raises RecordError."""
    atomic_write(os.path.join(directory, MANIFEST),
                 json.dumps({"format": FORMAT, "version": VERSION, **manifest},
                            indent=1).encode(), durable=False, error=RecordError)


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of the record in ``directory``; raises RecordError."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, "rb") as file:
            manifest = json.loads(file.read(1 << 24))
    except FileNotFoundError:
        raise RecordError(f"{directory} holds no record (no {MANIFEST}: was it written by "
                          "`hiocluster run --record DIR`?)") from None
    except (OSError, ValueError) as exc:
        raise RecordError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RecordError(f"{path} is not a record's manifest")
    if manifest.get("version") != VERSION:
        raise RecordError(f"{path}: record version {manifest.get('version')!r}, this "
                          f"hiocluster reads version {VERSION}")
    return manifest


class Recorder:
    """Write one worker's record (see the module docstring)."""

    def __init__(self, directory: str, worker: str, setup: proto.Setup,
                 app_dir: str | None, ready: bytes) -> None:
        self.path = record_path(directory, worker)
        self._pack = msgpack.Packer().pack
        self.size = 0
        self._check_at = 0
        try:
            self.file: BinaryIO | None = open(self.path, "wb", buffering=BUFFER)
        except OSError as exc:
            raise RecordError(f"cannot write the record {self.path}: "
                              f"{exc.strerror or exc}") from None
        self._write({"format": FORMAT, "version": VERSION, "worker": worker,
                     "setup": proto.encode(setup), "app_dir": app_dir or "",
                     "ready": ready})

    def frame(self, source: str, raw: bytes) -> None:
        self._write([FRAME, source, raw])

    def window(self, until: int, digests: bytes) -> None:
        self._write([WINDOW, until, digests])

    def close(self, whole: bool) -> None:
        """Flush and close; ``whole``: the worker stopped cleanly (an end mark)."""
        file, self.file = self.file, None
        if file is None:
            return
        try:
            if whole:
                file.write(self._pack([END]))
            file.close()
        except OSError as exc:
            raise RecordError(f"cannot write the record {self.path}: "
                              f"{exc.strerror or exc}") from None

    def _write(self, entry: Any) -> None:
        data = self._pack(entry)
        file = self.file
        if file is None:
            return
        try:
            file.write(data)
        except OSError as exc:
            self.file = None
            raise RecordError(f"cannot write the record {self.path}: "
                              f"{exc.strerror or exc}") from None
        self.size += len(data)
        if self.size >= self._check_at:
            self._check_at = self.size + CHECK_EVERY
            self._look(file)

    def _look(self, file: BinaryIO) -> None:
        """Fail before the file system has less than RESERVE free (counting what
        the buffer still holds)."""
        try:
            found = os.fstatvfs(file.fileno())
        except OSError:
            return
        total, free = found.f_blocks * found.f_frsize, found.f_bavail * found.f_frsize
        if free < min(total * RESERVE_SHARE, RESERVE_MAX) + 2 * CHECK_EVERY:
            self.file = None
            file.close()
            raise RecordError(f"the record {self.path} stopped at {self.size:,} bytes: its "
                              f"file system has {free:,} bytes free, and a record leaves "
                              f"{RESERVE} free (record into a directory with more room)")


class RecordingExchange(Exchange):
    """An :class:`Exchange` that writes every DATA frame it is given to a recorder
    (set once the record's header is written)."""

    recorder: Recorder | None = None

    def __init__(self, worker: str, nodes: Mapping[str, Node], rows: Any, lag: int = 1,
                 end: int = -1) -> None:
        super().__init__(worker, nodes, rows, lag, end)
        self.recorder = None

    def accept(self, source: str, raw: bytes) -> None:
        if self.recorder is not None:
            self.recorder.frame(source, raw)
        super().accept(source, raw)


class RecordReader:
    """Read one worker's record: :attr:`header` (checked), then :meth:`entries`.

    Raises RecordError naming the file, and the entry, for anything that is not a
    record of this version: a hostile or altered file is refused, never run."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.file = open(path, "rb")
        except OSError as exc:
            raise RecordError(f"cannot read the record {path}: {exc.strerror or exc}") \
                from None
        self._unpacker = msgpack.Unpacker(self.file, raw=False, max_buffer_size=MAX_ENTRY,
                                          strict_map_key=True)
        self.index = 0
        self.whole = False
        header = self._next("its header")
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise RecordError(f"{path} is not a hiocluster record")
        if header.get("version") != VERSION:
            raise RecordError(f"{path}: record version {header.get('version')!r}, this "
                              f"hiocluster reads version {VERSION}")
        try:
            setup = proto.decode(header["setup"], limit=MAX_SETUP_FRAME,
                                 allowed=(proto.Setup,))
            assert isinstance(setup, proto.Setup)
            self.setup = setup
            self.worker = str(header["worker"])
            self.app_dir = str(header["app_dir"]) or None
            self.ready = bytes(header["ready"])
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            raise RecordError(f"{path}: its header lacks or garbles {exc}") from None

    def _next(self, what: str) -> Any:
        try:
            return self._unpacker.unpack()
        except msgpack.OutOfData:
            raise EOFError from None
        except (ValueError, msgpack.UnpackException, TypeError) as exc:
            raise RecordError(f"{self.path}: {what} is not msgpack ({exc})") from None

    def entries(self) -> Iterator[tuple[int, Any, bytes]]:
        """``(kind, source or until, bytes)`` for each entry, oldest first, up to the
        end mark (``whole`` is then True) or, in a record cut short, its last whole
        entry."""
        while True:
            self.index += 1
            try:
                entry = self._next(f"entry {self.index}")
            except EOFError:
                return
            if entry == [END]:
                self.whole = True
                return
            if not (isinstance(entry, list) and len(entry) == 3
                    and entry[0] in (FRAME, WINDOW) and isinstance(entry[2], bytes)
                    and isinstance(entry[1], str if entry[0] == FRAME else int)
                    and not isinstance(entry[1], bool)):
                raise RecordError(f"{self.path}: entry {self.index} is not a frame or a "
                                  f"window: {short(entry)}")
            yield entry[0], entry[1], entry[2]

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def directory_size(directory: str) -> int:
    """Bytes of every worker record in ``directory``."""
    total = 0
    with os.scandir(directory) as found:
        for entry in found:
            if entry.name.endswith(".rec"):
                total += entry.stat().st_size
    return total

