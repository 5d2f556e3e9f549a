"""Import node and service classes named by a topology and check them against its
links and files (:func:`resolve_classes`, :func:`resolve_services`)."""

from __future__ import annotations

import os

from hiocluster.errors import TopologyError
from hiocluster.topology.lines import locate_error
from hiocluster.topology.spec import Topology
from hiocluster.topology.values import topology_error


def resolve_classes(topology: Topology, app_dir: str | None = None) -> dict[str, type]:
    """Import every node's class and check each link's boxes exist on it.

    ``app_dir`` (default: the current directory) goes at the front of sys.path
    if absent, like uvicorn's ``--app-dir``.

    Returns:
        ``{node name: class}`` in declaration order.
    Raises:
        TopologyError: naming ``nodes.<name>.class`` or ``links[i].from``/``.to``.
    """
    from hiocluster.node import Node, load_class  # deferred: node imports the runtime stack

    try:
        cache: dict[str, type] = {}
        for path, cls in topology.classes.items():  # by value: no import
            if not (isinstance(cls, type) and issubclass(cls, Node)):
                raise topology_error(f"{cls!r} is not a subclass of hiocluster.node.Node",
                                     "nodes")
            cache[path] = cls
        classes: dict[str, type] = {}
        for node in topology.nodes:
            if node.cls not in cache:
                key_path = f"nodes.{node.table or node.name}.class"
                try:
                    cache[node.cls] = load_class(node.cls, app_dir)
                except ImportError as exc:
                    raise topology_error(str(exc), key_path) from exc
            classes[node.name] = cache[node.cls]
        for link in topology.links:
            origin = link.origin or f"links[{link.entry if link.entry >= 0 else link.id}]"
            for end, node_name, box, kind in (("from", link.source, link.outbox, "outbox"),
                                              ("to", link.target, link.inbox, "inbox")):
                boxes = tuple(getattr(classes[node_name], f"{kind}es", ()))
                if box not in boxes:
                    raise topology_error(f"node {node_name!r} ({topology.node(node_name).cls}) has no "
                               f"{kind} {box!r}; it has: {', '.join(boxes) or 'none'}",
                               f"{origin}.{end}" if origin.startswith("links")
                               else origin)
    except TopologyError as exc:
        locate_error(exc, topology.source, topology.path)
        raise
    return classes


def resolve_services(topology: Topology, app_dir: str | None = None) -> dict[str, type]:
    """Import every service's class (a subclass of hiocluster.service.Service) and
    check its TLS files exist.

    Raises:
        TopologyError: naming ``services.<name>.class`` or ``.tls``.
    """
    from hiocluster.node import load_class  # deferred: imports the runtime stack
    from hiocluster.service import Service

    classes: dict[str, type] = {}
    try:
        for service in topology.services:
            try:
                classes[service.name] = load_class(service.cls, app_dir, base=Service)
            except ImportError as exc:
                raise topology_error(str(exc), f"services.{service.name}.class") from exc
            for what, path in zip(("cert", "key"), service.tls or ()):
                if not os.path.isfile(path):
                    raise topology_error(f"no such file: {path}", f"services.{service.name}.tls.{what}")
    except TopologyError as exc:
        locate_error(exc, topology.source, topology.path)
        raise
    return classes
