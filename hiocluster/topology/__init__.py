"""Topology files: TOML text -> validated, immutable dataclasses -> placement plan.

Owns the topology file format (``[run]``, ``[nodes.*]``, ``[[links]]``,
``[[patterns]]``, ``[placement]``, ``[groups]``, ``[hosts.*]``, ``[services.*]``),
its validation with errors that name the key path and, where it can be found,
the line; ``count`` expansion of nodes, glob expansion of links and their
canonical ids; and the mapping of nodes onto workers (:func:`plan`).

- ``limits``: names and bounds of the format, ``[run]`` defaults;
- ``spec``: the dataclasses (:class:`Topology`, :class:`Plan`, ...);
- ``values``: value checks (each names its key path);
- ``lines``: the line of a key path, for errors;
- ``patterns``: the links of ``[[patterns]]``;
- ``parse``: the sections, :func:`loads`, :func:`load`;
- ``placement``: :func:`plan` (placement, groups, hosts, graph partition);
- ``resolve``: importing node and service classes;
- ``build``: :class:`~hiocluster.topology.build.Builder`, topologies as code.

Needs only the stdlib and hiocluster.errors/protocol.fields (never zmq, msgpack
or hio); ``resolve`` imports hiocluster.node when called, ``build`` needs tomli_w.
"""

from hiocluster.topology.limits import MAX_GROUP_DEPTH, MAX_REPLICAS, RUN_TRANSPORTS
from hiocluster.topology.parse import load, loads
from hiocluster.topology.placement import plan
from hiocluster.topology.resolve import resolve_classes, resolve_services
from hiocluster.topology.spec import (
    HostSpec,
    LinkSpec,
    NodeSpec,
    Plan,
    ServiceSpec,
    Topology,
    WorkerSpec,
)

__all__ = [
    "NodeSpec",
    "LinkSpec",
    "Topology",
    "HostSpec",
    "WorkerSpec",
    "ServiceSpec",
    "Plan",
    "loads",
    "load",
    "plan",
    "resolve_classes",
    "resolve_services",
    "MAX_GROUP_DEPTH",
    "MAX_REPLICAS",
    "RUN_TRANSPORTS",
]
