"""2-D heat diffusion (topologies/heat.toml): an explicit 5-point stencil on a grid
split into tiles, each tile a node that trades its edges (numpy rows and
columns) with its 4 neighbours every tick.

The field outside the grid is held at 0. Tick 0 sends each tile's first edges;
every later tick takes the neighbours' edges of the tick before (the halo),
updates the tile once and sends its new edges, so after ``ticks`` ticks the
field has had ``ticks - 1`` updates: exactly what :func:`reference` computes on
one array with the same operations in the same order, so the two are equal,
bit for bit, at every placement.

params: ``size`` (cells per tile side), ``columns`` (tiles per row of the grid),
``alpha`` (diffusion number, <= 0.25 for stability).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hiocluster.node import Node

SIDES = ("n", "s", "e", "w")


def initial(rows: int, cols: int, row0: int = 0, col0: int = 0) -> np.ndarray:
    """The starting temperatures of cells ``[row0, row0 + rows) x [col0, col0 + cols)``
    of the whole grid: a deterministic pattern, the same however it is cut."""
    i = np.arange(row0, row0 + rows, dtype=np.int64)[:, None]
    j = np.arange(col0, col0 + cols, dtype=np.int64)[None, :]
    return ((i * 7 + j * 13) % 17).astype(np.float64) / 17.0


def update(u: np.ndarray, up: np.ndarray, down: np.ndarray, left: np.ndarray,
           right: np.ndarray, alpha: float) -> np.ndarray:
    """One explicit step of ``u`` given its four neighbour fields (each the value
    of the cell above, below, left and right of every cell)."""
    return u + alpha * (up + down + left + right - 4.0 * u)


def shifted(u: np.ndarray, top: np.ndarray, bottom: np.ndarray, west: np.ndarray,
            east: np.ndarray) -> tuple[np.ndarray, ...]:
    """The four neighbour fields of ``u``, given the rows above and below it and
    the columns to its left and right."""
    up = np.vstack([top[None, :], u[:-1, :]])
    down = np.vstack([u[1:, :], bottom[None, :]])
    left = np.hstack([west[:, None], u[:, :-1]])
    right = np.hstack([u[:, 1:], east[:, None]])
    return up, down, left, right


def reference(rows: int, cols: int, steps: int, alpha: float) -> np.ndarray:
    """The whole grid after ``steps`` updates, on one array."""
    u = initial(rows, cols)
    zeros_row, zeros_col = np.zeros(cols), np.zeros(rows)
    for _ in range(steps):
        u = update(u, *shifted(u, zeros_row, zeros_row, zeros_col, zeros_col), alpha)
    return u


class Tile(Node):
    """One tile of the grid (see the module docstring)."""

    inboxes = SIDES
    outboxes = SIDES
    metric_kinds = {"mean": "gauge"}
    snapshot_attrs = ("u", "updates")  # all its state, for checkpoints

    def setup(self) -> None:
        size, columns = int(self.params["size"]), int(self.params["columns"])
        self.alpha = float(self.params["alpha"])
        self.row, self.col = divmod(self.index, columns)
        self.u = initial(size, size, self.row * size, self.col * size)
        self.zeros = np.zeros(size)
        self.updates = 0

    def step(self) -> None:
        if self.tick > 0:
            halo = {side: self.inbox[side].get() if self.inbox[side] else self.zeros
                    for side in SIDES}
            self.u = update(self.u, *shifted(self.u, halo["n"], halo["s"], halo["w"],
                                             halo["e"]), self.alpha)
            self.updates += 1
        edges = {"n": self.u[0, :], "s": self.u[-1, :], "w": self.u[:, 0],
                 "e": self.u[:, -1]}
        for side in SIDES:
            if self.outbox[side].targets:
                self.outbox[side].put(edges[side])

    def state(self) -> Any:
        return self.u

    def metrics(self) -> dict[str, Any]:
        return {"updates": self.updates, "mean": float(self.u.mean())}

    def observe(self) -> dict[str, float]:
        """Each tick: the temperature at the tile's centre and corner, and the
        updates so far (three numbers at hand: what observation itself costs)."""
        middle = self.u.shape[0] // 2
        return {"centre": float(self.u[middle, middle]), "corner": float(self.u[0, 0]),
                "updates": self.updates}

    def result(self) -> Any:
        return {"row": self.row, "col": self.col, "field": self.u}


def assemble(results: dict[str, Any]) -> np.ndarray:
    """The whole grid from the tiles' results."""
    tiles = list(results.values())
    rows = 1 + max(tile["row"] for tile in tiles)
    cols = 1 + max(tile["col"] for tile in tiles)
    grid = [[None] * cols for _ in range(rows)]
    for tile in tiles:
        grid[tile["row"]][tile["col"]] = tile["field"]
    return np.block(grid)
