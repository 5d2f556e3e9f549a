"""hiocluster: hio Doists across processes and hosts, in deterministic lockstep.

Public API::

    from hiocluster import load, run, Node
    result = run(load("topologies/ring.toml"), processes=4)
    print(result.digest)

Also ``Builder`` (topologies as code), ``Service`` (a node class served by
replicas), ``RunResult``, ``Topology``, ``plan``, ``loads``, ``diff`` (two
digest files: where two runs first differ), ``sweep`` (many runs over a grid
of params and seeds) and the errors.
"""

from hiocluster.errors import (
    ClusterError,
    DigestFileError,
    FrameError,
    Interrupted,
    LinkFull,
    LocalProtocolError,
    NodeError,
    ProcessExited,
    ProtocolError,
    RemoteProtocolError,
    RunFailed,
    TickTimeout,
    TopologyError,
)
from hiocluster.version import __version__

__all__ = [
    "__version__", "load", "loads", "plan", "run", "Node", "RunResult", "Topology", "Builder",
    "Service", "diff", "sweep",
    "ClusterError", "DigestFileError", "FrameError", "Interrupted", "LinkFull", "LocalProtocolError", "NodeError",
    "ProcessExited", "ProtocolError", "RemoteProtocolError", "RunFailed", "TickTimeout",
    "TopologyError",
]


def __getattr__(name: str) -> object:
    # Lazy, so `hiocluster check` and `import hiocluster.topology` need no zmq or hio.
    if name in ("load", "loads", "plan", "Topology"):
        from hiocluster import topology
        return getattr(topology, name)
    if name in ("run", "RunResult"):
        from hiocluster.supervision import supervisor
        return getattr(supervisor, name)
    if name == "sweep":
        from hiocluster.supervision.sweep import sweep
        return sweep
    if name == "diff":
        from hiocluster.supervision.digestfile import diff
        return diff
    if name == "Builder":
        from hiocluster.topology.build import Builder
        return Builder
    if name == "Node":
        from hiocluster.node import Node
        return Node
    if name == "Service":
        from hiocluster.service import Service
        return Service
    raise AttributeError(f"module 'hiocluster' has no attribute {name!r}")
