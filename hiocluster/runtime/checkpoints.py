"""A checkpoint directory's files: each worker's share, the manifest, atomically.

``--checkpoint DIR`` holds one directory per checkpoint, ``tick-<T>`` (T zero
padded): one share per worker, in two files (msgpack, arrays as in DATA frames:
hiocluster.worker.checkpoint says what they hold): ``<worker>.ckpt``, its nodes,
and ``<worker>.links``, its links (a resumed worker reads the node files that
hold its nodes, and every link file), written by the workers before their
DONE; then ``manifest.json``, written by the supervisor once every share is in. A checkpoint is complete once its manifest exists: every file is
written to a temporary name, synced and renamed, so a crash leaves either a
whole file or none. The newest complete ones are kept (``KEEP``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any

import msgpack

from hiocluster.errors import CheckpointError
from hiocluster.protocol import arrays

__all__ = ["FORMAT", "VERSION", "MANIFEST", "KEEP", "tick_dir", "atomic_write", "write_share",
           "read_shares", "write_manifest", "complete_checkpoint", "read_manifest",
           "newest", "complete", "prune",
           "topology_hash"]

FORMAT, VERSION = "hiocluster-checkpoint", 1
MANIFEST = "manifest.json"
#: a share's two files: what each holds (hiocluster.worker.checkpoint.cut)
PARTS = {".ckpt": ("tick", "tyme", "nodes"), ".links": ("links", "undelivered")}
#: Complete checkpoints kept (the newest).
KEEP = 2
_TICK_DIR = re.compile(r"tick-(\d{12})")
#: Largest share read back (a hostile or broken file is refused, not swallowed).
MAX_SHARE = 16 * 1024 ** 3


def tick_dir(root: str, tick: int) -> str:
    return os.path.join(root, f"tick-{tick:012d}")


def topology_hash(topology: Any) -> str:
    """What a checkpoint must be resumed with: everything of the topology that
    shapes the run's states (nodes, params, links, clock, seed, digests, credit),
    not where it runs (placement, hosts, groups, transport, timeouts) nor how long
    (``--ticks``: a resumed run may go further than the one that wrote it)."""
    shape = (topology.tock, topology.t0, topology.seed, topology.capacity,
             topology.real, topology.nodes, topology.links, topology.digest_every,
             topology.lag)
    return hashlib.sha256(repr(shape).encode()).hexdigest()


def atomic_write(path: str, data: bytes, durable: bool = True,
                 error: type[Exception] = CheckpointError) -> None:
    """Write ``data`` to ``path`` under a temporary name, renamed when whole; with
    ``durable``, synced first (and the directory after). Raises ``error``."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
        if durable:
            _sync_dir(os.path.dirname(path) or ".")
    except OSError as exc:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise error(f"cannot write {path}: {exc.strerror or exc}") from None


def _sync_dir(path: str) -> None:
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_share(directory: str, worker: str, share: dict[str, Any]) -> int:
    """Write ``worker``'s share into ``directory`` (made if need be); its size. Not
    synced here: :func:`complete_checkpoint` does that off the run's critical path,
    before the manifest makes the checkpoint complete."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        files = {suffix: msgpack.packb({key: share[key] for key in keys}, use_bin_type=True,
                                       default=arrays.default)
                 for suffix, keys in PARTS.items()}
    except OSError as exc:
        raise CheckpointError(f"cannot write into {directory}: {exc.strerror or exc}") \
            from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"{worker}'s share of the checkpoint cannot be packed: "
                              f"{exc}") from None
    for suffix, data in files.items():
        atomic_write(os.path.join(directory, worker + suffix), data, durable=False)
    return sum(len(data) for data in files.values())


def read_shares(directory: str, workers: list[str], suffix: str) -> list[dict[str, Any]]:
    """The ``suffix`` file (".ckpt": nodes, ".links": links) of each of ``workers``'
    shares; raises CheckpointError naming a file that is missing, too big or not one."""
    shares = []
    for worker in workers:
        path = os.path.join(directory, worker + suffix)
        try:
            if os.path.getsize(path) > MAX_SHARE:
                raise CheckpointError(f"{path} is larger than {MAX_SHARE} bytes")
            with open(path, "rb") as file:
                share = msgpack.unpackb(file.read(), raw=False, strict_map_key=False,
                                        ext_hook=arrays.ext_hook)
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
                msgpack.StackError) as exc:
            raise CheckpointError(f"{path} is not a checkpoint share: {exc}") from None
        if not isinstance(share, dict) or not set(PARTS[suffix]) <= set(share):
            raise CheckpointError(f"{path} is not a checkpoint share")
        shares.append(share)
    return shares


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
    atomic_write(os.path.join(directory, MANIFEST),
                 json.dumps({"format": FORMAT, "version": VERSION, **manifest}).encode())


def complete_checkpoint(directory: str, manifest: dict[str, Any]) -> None:
    """Every share in ``directory`` is written: sync them, then write the manifest
    that makes the checkpoint complete. (A supervisor runs this in a thread, off
    the run's critical path.) Raises CheckpointError."""
    try:
        for worker in manifest["placement"]:
            for suffix in PARTS:
                with open(os.path.join(directory, worker + suffix), "rb") as file:
                    os.fsync(file.fileno())
        _sync_dir(directory)
    except OSError as exc:
        raise CheckpointError(f"cannot sync the checkpoint in {directory}: "
                              f"{exc.strerror or exc}") from None
    write_manifest(directory, manifest)


def _manifest(directory: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(directory, MANIFEST), "rb") as file:
            manifest = json.loads(file.read())
    except FileNotFoundError:
        return None  # not complete
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {os.path.join(directory, MANIFEST)}: {exc}") \
            from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{os.path.join(directory, MANIFEST)} is not a checkpoint "
                              "manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{directory}: checkpoint version {manifest.get('version')!r},"
                              f" this hiocluster reads version {VERSION}")
    return manifest


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of the checkpoint in ``directory``; raises CheckpointError when
    it is not a complete one."""
    manifest = _manifest(directory)
    if manifest is None:
        raise CheckpointError(f"{directory} is not a complete checkpoint (no {MANIFEST})")
    return manifest


def _ticks(root: str) -> list[int]:
    try:
        names = os.listdir(root)
    except OSError as exc:
        raise CheckpointError(f"cannot read {root}: {exc.strerror or exc}") from None
    return sorted(int(match.group(1)) for name in names
                  if (match := _TICK_DIR.fullmatch(name)))


def newest(root: str) -> tuple[str, dict[str, Any]]:
    """The newest complete checkpoint under ``root``: its directory and manifest."""
    found = complete(root)
    if not found:
        raise CheckpointError(f"no complete checkpoint in {root}")
    tick = max(found)
    return tick_dir(root, tick), found[tick]


def complete(root: str) -> dict[int, dict[str, Any]]:
    """Every complete checkpoint under ``root``: tick -> manifest."""
    found = {}
    for tick in _ticks(root):
        manifest = _manifest(tick_dir(root, tick))
        if manifest is not None:
            found[tick] = manifest
    return found


def prune(root: str, keep: int = KEEP) -> None:
    """Remove all but the newest ``keep`` complete checkpoints (and any incomplete
    one older than the newest complete)."""
    complete = [tick for tick in _ticks(root)
                if os.path.exists(os.path.join(tick_dir(root, tick), MANIFEST))]
    if not complete:
        return
    kept = set(complete[-keep:])
    for tick in _ticks(root):
        if tick not in kept and tick < complete[-1]:
            shutil.rmtree(tick_dir(root, tick), ignore_errors=True)
