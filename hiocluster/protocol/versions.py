"""What a run's digests depend on, beyond the topology: the versions of the runtime.

A worker reports them in HELLO; the supervisor refuses one whose versions differ
from its own (docs/protocol.md §6), because msgpack packing, Python's RNG or hio's
scheduling could then differ and the run would not be reproducible.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from typing import Mapping

import msgpack

__all__ = ["local_versions", "mismatches"]


def local_versions() -> dict[str, str]:
    """``{"python", "msgpack", "hio", "hiocluster", "protocol"}`` of this process."""
    from hiocluster.protocol.frames import VERSION
    from hiocluster.version import __version__

    try:
        hio = importlib.metadata.version("hio")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a broken install
        hio = "unknown"
    return {
        "python": f"{platform.python_implementation().lower()}-"
                  f"{sys.version_info.major}.{sys.version_info.minor}",
        "msgpack": ".".join(map(str, msgpack.version)),
        "hio": hio,
        "hiocluster": __version__,
        "protocol": str(VERSION),
    }


def mismatches(theirs: Mapping[str, str], ours: Mapping[str, str]) -> list[str]:
    """Human lines for every version that differs (or is missing) in ``theirs``."""
    return [f"{name} {theirs.get(name, 'missing')} (supervisor: {ours[name]})"
            for name in ours if theirs.get(name) != ours[name]]
