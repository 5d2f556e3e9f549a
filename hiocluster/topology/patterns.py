"""``[[patterns]]``: the links a ring, line, grid, torus, all-to-all or seeded
random pattern makes (also what the builder writes)."""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any

from hiocluster.topology.limits import BOX_NAME, SEED_LIMIT
from hiocluster.topology.values import (
    array_value,
    check_keys,
    int_value,
    is_glob,
    match_names,
    name_value,
    suggest,
    text_value,
    topology_error,
)

#: The link patterns of ``[[patterns]]`` (and the builder).
PATTERN_KINDS = ("ring", "line", "grid", "torus", "all", "random")
#: Grid directions: name -> (rows down, columns right); a message sent out of box
#: ``d`` arrives in the neighbour's inbox named for where it came from.
_DIRECTIONS = {"n": (-1, 0), "s": (1, 0), "e": (0, 1), "w": (0, -1),
               "ne": (-1, 1), "nw": (-1, -1), "se": (1, 1), "sw": (1, -1)}
_OPPOSITE = {"n": "s", "s": "n", "e": "w", "w": "e", "ne": "sw", "sw": "ne", "nw": "se",
             "se": "nw"}
_LINE_KEYS = ("kind", "nodes", "from", "to", "capacity")
_GRID_KEYS = (*_LINE_KEYS, "shape", "neighbours", "boxes")
#: The keys each kind of pattern takes.
_PATTERN_KEYS = {"ring": _LINE_KEYS, "line": _LINE_KEYS, "all": _LINE_KEYS,
                 "random": (*_LINE_KEYS, "k", "seed"), "grid": _GRID_KEYS,
                 "torus": _GRID_KEYS}


def pattern_links(entry: dict[str, Any], j: int, names: dict[str, int], run_seed: int,
             key_path: str) -> list[tuple[str, str, str, str]]:
    """The links one ``[[patterns]]`` entry makes (see docs: Topology files)."""
    kind = text_value(entry.get("kind"), f"{key_path}.kind") if "kind" in entry else ""
    if kind not in PATTERN_KINDS:
        raise topology_error(f"expected kind = one of {', '.join(PATTERN_KINDS)}, got {kind!r}"
                   f"{suggest(kind, PATTERN_KINDS)}", f"{key_path}.kind")
    check_keys(entry, _PATTERN_KEYS[kind], key_path, ("kind", "nodes"))
    members = _pattern_nodes(entry["nodes"], names, f"{key_path}.nodes")
    outbox = name_value(text_value(entry.get("from", "out"), f"{key_path}.from"), BOX_NAME, "box",
                   f"{key_path}.from")
    inbox = name_value(text_value(entry.get("to", "in"), f"{key_path}.to"), BOX_NAME, "box",
                  f"{key_path}.to")
    n = len(members)
    if kind in ("ring", "line"):
        ends = n if kind == "ring" else n - 1
        pairs = [(members[i], members[(i + 1) % n]) for i in range(ends) if n > 1]
        return [(a, outbox, b, inbox) for a, b in pairs]
    if kind == "all":
        return [(a, outbox, b, inbox) for a in members for b in members if a != b]
    if kind == "random":
        if "k" not in entry:
            raise topology_error("missing required key 'k' (links out of each node)", key_path)
        k = int_value(entry["k"], f"{key_path}.k", 1, max(1, n - 1))
        seed = int_value(entry.get("seed", run_seed), f"{key_path}.seed", 0, SEED_LIMIT - 1)
        digest = hashlib.sha256(f"hiocluster pattern {j} seed {seed}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        links: list[tuple[str, str, str, str]] = []
        for a in members:
            for b in rng.sample([m for m in members if m != a], k):
                links.append((a, outbox, b, inbox))
        return links
    if "shape" not in entry:
        raise topology_error("missing required key 'shape' ([rows, columns])", key_path)
    shape = array_value(entry["shape"], f"{key_path}.shape")
    if len(shape) != 2:
        raise topology_error(f"expected [rows, columns], got {shape!r}", f"{key_path}.shape")
    rows, cols = (int_value(v, f"{key_path}.shape", 1) for v in shape)
    if rows * cols != n:
        raise topology_error(f"{rows} x {cols} = {rows * cols} places for {n} nodes",
                   f"{key_path}.shape")
    neighbours = int_value(entry.get("neighbours", 4), f"{key_path}.neighbours", 4, 8)
    if neighbours not in (4, 8):
        raise topology_error(f"expected 4 or 8, got {neighbours}", f"{key_path}.neighbours")
    boxes = text_value(entry.get("boxes", "named"), f"{key_path}.boxes")
    if boxes not in ("named", "single"):
        raise topology_error(f"expected 'named' (a box per direction: n s e w, and ne nw se sw) or "
                   f"'single' (from and to), got {boxes!r}", f"{key_path}.boxes")
    links = []
    for r in range(rows):
        for c in range(cols):
            for direction, (dr, dc) in list(_DIRECTIONS.items())[:neighbours]:
                rr, cc = r + dr, c + dc
                if kind == "torus":
                    rr, cc = rr % rows, cc % cols
                elif not (0 <= rr < rows and 0 <= cc < cols):
                    continue
                a, b = members[r * cols + c], members[rr * cols + cc]
                if a == b:
                    continue  # a torus one wide: its own neighbour
                link = (a, direction, b, _OPPOSITE[direction]) if boxes == "named" \
                    else (a, outbox, b, inbox)
                if link in links:
                    raise topology_error(f"links {a}.{link[1]} -> {b}.{link[3]} twice (a torus two wide "
                               "with boxes = 'single'): use boxes = 'named'", key_path)
                links.append(link)
    return links


def _pattern_nodes(value: object, names: dict[str, int], key_path: str) -> list[str]:
    """A pattern's nodes, in order: a table's ``count`` nodes by index (``"t"``), a
    glob or a name (file order), or an array of names."""
    if isinstance(value, list):
        members = [text_value(v, f"{key_path}[{i}]") for i, v in enumerate(value)]
        for i, member in enumerate(members):
            if member not in names:
                raise topology_error(f"no node named {member!r}{suggest(member, names)}",
                           f"{key_path}[{i}]")
        return members
    text = text_value(value, key_path)
    table = [name for name in names if re.fullmatch(re.escape(text) + r"\d+", name)]
    if table and text not in names:
        return table
    if not is_glob(text) and text not in names:
        raise topology_error(f"no node, and no table of count nodes, named {text!r}"
                   f"{suggest(text, names)}", key_path)
    return match_names(text, names, key_path)
