"""Topologies as code: a builder that makes the same validated topology a TOML
file would, and writes that file.

::

    from hiocluster import Builder

    b = Builder("heat", ticks=100, seed=1)
    b.nodes("t", "nodes.heat:Tile", count=16, params={"size": 32},
            per_index={"row": [i // 4 for i in range(16)]})
    b.torus("t", shape=(4, 4))               # boxes n s e w, each to the next tile's
    topology = b.build()                      # hiocluster.topology.Topology, validated
    text = b.to_toml()                        # the same, as a topology file

Every method adds to a TOML document (the file format of docs: Topology files,
with ``[[patterns]]`` for ring, line, grid, torus, all-to-all and random k-out
links); :meth:`Builder.build` validates it with :func:`hiocluster.topology.loads`,
so a topology built here and one read from its TOML are equal, and errors name
the same key paths.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import tomli_w

from hiocluster.topology.parse import loads
from hiocluster.topology.spec import Topology

__all__ = ["Builder"]


class Builder:
    """See the module docstring. ``run``: the ``[run]`` settings (ticks, tock, t0,
    seed, tick_timeout, capacity, real)."""

    def __init__(self, name: str = "built", **run: Any) -> None:
        self.name = name
        self.document: dict[str, Any] = {"run": dict(run), "nodes": {}, "links": [],
                                         "patterns": []}
        self.classes: dict[str, type] = {}  # class path -> a class that travels by value

    # -- nodes and links ----------------------------------------------------------
    def nodes(self, name: str, cls: str | type, *, count: int | None = None,
              params: dict[str, Any] | None = None,
              per_index: dict[str, Sequence[Any]] | None = None) -> Builder:
        """``[nodes.NAME]``: one node, or ``count`` of them (NAME0, NAME1, ...), with
        ``params`` and, per index, ``per_index`` params. ``cls``: ``"module:Class"``,
        or the class itself: one defined in ``__main__`` (a script, a notebook
        cell) or inside a function travels to the workers by value (cloudpickle),
        any other is imported there by its module and name."""
        table: dict[str, Any] = {"class": self._class_path(cls) if isinstance(cls, type)
                                 else cls}
        if count is not None:
            table["count"] = count
        if params:
            table["params"] = dict(params)
        if per_index:
            table["per_index"] = {key: list(values) for key, values in per_index.items()}
        self.document["nodes"][name] = table
        return self

    node = nodes

    def _class_path(self, cls: type) -> str:
        """Where the workers find ``cls``: its module and name, or (by value) a
        ``__main__:NAME`` path of its own, noted in :attr:`classes`."""
        if cls.__module__ != "__main__" and "<" not in cls.__qualname__:
            return f"{cls.__module__}:{cls.__qualname__}"
        path = f"__main__:{cls.__name__}"
        serial = 1
        while self.classes.get(path, cls) is not cls:  # two classes of one name
            serial += 1
            path = f"__main__:{cls.__name__}_{serial}"
        self.classes[path] = cls
        return path

    def link(self, source: str, target: str, *, capacity: int | None = None) -> Builder:
        """``[[links]]``: ``"a.out"`` to ``"b.in"`` (globs as in the file format)."""
        entry: dict[str, Any] = {"from": source, "to": target}
        if capacity is not None:
            entry["capacity"] = capacity
        self.document["links"].append(entry)
        return self

    def _pattern(self, kind: str, nodes: str | Iterable[str], **settings: Any) -> Builder:
        entry: dict[str, Any] = {"kind": kind,
                                 "nodes": nodes if isinstance(nodes, str) else list(nodes)}
        entry.update({key: list(value) if isinstance(value, tuple) else value
                      for key, value in settings.items() if value is not None})
        self.document["patterns"].append(entry)
        return self

    def ring(self, nodes: str | Iterable[str], *, outbox: str = "out", inbox: str = "in",
             capacity: int | None = None) -> Builder:
        """Each node to the next, the last to the first."""
        return self._pattern("ring", nodes, **{"from": outbox, "to": inbox},
                             capacity=capacity)

    def line(self, nodes: str | Iterable[str], *, outbox: str = "out", inbox: str = "in",
             capacity: int | None = None) -> Builder:
        """Each node to the next."""
        return self._pattern("line", nodes, **{"from": outbox, "to": inbox},
                             capacity=capacity)

    def all_to_all(self, nodes: str | Iterable[str], *, outbox: str = "out",
                   inbox: str = "in", capacity: int | None = None) -> Builder:
        """Every node to every other."""
        return self._pattern("all", nodes, **{"from": outbox, "to": inbox},
                             capacity=capacity)

    def random(self, nodes: str | Iterable[str], k: int, *, seed: int | None = None,
               outbox: str = "out", inbox: str = "in",
               capacity: int | None = None) -> Builder:
        """Each node to ``k`` others, drawn with ``seed`` (default: the run's)."""
        return self._pattern("random", nodes, k=k, seed=seed,
                             **{"from": outbox, "to": inbox}, capacity=capacity)

    def grid(self, nodes: str | Iterable[str], shape: tuple[int, int], *,
             neighbours: int = 4, boxes: str = "named", outbox: str = "out",
             inbox: str = "in", capacity: int | None = None) -> Builder:
        """Nodes in row order on a ``rows x columns`` grid, each linked to its 4 (or
        8) neighbours: out of box ``n`` into the neighbour's ``s``, and so on
        (``boxes="single"``: ``outbox`` to ``inbox``)."""
        return self._pattern("grid", nodes, shape=shape, neighbours=neighbours, boxes=boxes,
                             **{"from": outbox, "to": inbox}, capacity=capacity)

    def torus(self, nodes: str | Iterable[str], shape: tuple[int, int], *,
              neighbours: int = 4, boxes: str = "named", outbox: str = "out",
              inbox: str = "in", capacity: int | None = None) -> Builder:
        """:meth:`grid` whose edges wrap around."""
        return self._pattern("torus", nodes, shape=shape, neighbours=neighbours, boxes=boxes,
                             **{"from": outbox, "to": inbox}, capacity=capacity)

    # -- placement ----------------------------------------------------------------
    def placement(self, **workers: Sequence[str]) -> Builder:
        """``[placement]``: worker -> its nodes (names or globs)."""
        self.document.setdefault("placement", {}).update(
            {name: list(members) for name, members in workers.items()})
        return self

    # -- out ------------------------------------------------------------------------
    def to_toml(self) -> str:
        """The topology file this builder describes."""
        document = {key: value for key, value in self.document.items() if value}
        return tomli_w.dumps(document)

    def build(self, path: str | None = None) -> Topology:
        """The validated topology. Raises TopologyError naming the key path."""
        topology = loads(self.to_toml(), path=path)
        if self.classes:
            topology = topology.replace(classes=dict(self.classes))
        return topology.replace(name=self.name) if path is None else topology
