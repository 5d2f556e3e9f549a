"""``from hiocluster.build import Builder``, as before the topology package:
the builder lives in :mod:`hiocluster.topology.build` (also ``hiocluster.Builder``)."""

from hiocluster.topology.build import Builder

__all__ = ["Builder"]
