"""A group's tree: what a sub-supervisor is given of the plan below it (worker ->
its node names, group -> {child: tree}; :meth:`~hiocluster.topology.spec.Plan.tree`
makes it), checked where it arrives, and read."""

from __future__ import annotations

from typing import Any, Mapping

from hiocluster.protocol.fields import NAME
from hiocluster.topology.limits import MAX_GROUP_DEPTH

__all__ = ["check_tree", "tree_leaves", "tree_groups", "MAX_TREE_DEPTH"]

#: Deepest tree a group takes (as deep as ``[groups]`` may nest).
MAX_TREE_DEPTH = MAX_GROUP_DEPTH


def check_tree(tree: Any, *, depth: int = 0) -> dict[str, Any]:
    """``tree`` as a group gets it (worker -> [node names], group -> {child: tree}),
    checked: raises ValueError naming what is wrong."""
    if depth > MAX_TREE_DEPTH:
        raise ValueError(f"groups nested deeper than {MAX_TREE_DEPTH}")
    if not isinstance(tree, dict) or not tree:
        raise ValueError("a group's tree must be a non-empty map of its children")
    for child, sub in tree.items():
        if not isinstance(child, str) or not NAME.ok(child):
            raise ValueError(f"{child!r} is not a worker or group name")
        if isinstance(sub, dict):
            check_tree(sub, depth=depth + 1)
        elif not isinstance(sub, list) or not sub or not all(
                isinstance(node, str) and NAME.ok(node) for node in sub):
            raise ValueError(f"worker {child!r}: expected a non-empty list of node names")
    return tree


def tree_leaves(name: str, tree: Any) -> dict[str, tuple[str, ...]]:
    """Every worker in ``tree`` (the subtree of child ``name``) -> its node names."""
    if not isinstance(tree, dict):
        return {name: tuple(tree)}
    return {leaf: nodes for child, sub in tree.items()
            for leaf, nodes in tree_leaves(child, sub).items()}


def tree_groups(tree: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Every group inside ``tree``, however deep -> the node names under it."""
    found: dict[str, tuple[str, ...]] = {}
    for child, sub in tree.items():
        if isinstance(sub, dict):
            found[child] = tuple(node for nodes in tree_leaves(child, sub).values()
                                 for node in nodes)
            found.update(tree_groups(sub))
    return found
