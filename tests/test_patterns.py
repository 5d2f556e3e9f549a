"""Link patterns ([[patterns]]: ring, line, grid, torus, all, random) and the
topology builder (hiocluster.topology.build): the same validated topology either way."""

from __future__ import annotations

import pytest

from conftest import REPO
from hiocluster.supervision import supervisor
from hiocluster import Builder
from hiocluster.errors import TopologyError
from hiocluster.topology import loads, plan


def labels(text: str) -> set[str]:
    return {link.label for link in loads(text).links}


NODES = '[nodes.t]\nclass = "m:A"\ncount = {count}\n'


def pattern(count: int, **keys: object) -> str:
    body = "".join(f"{key} = {value!r}\n".replace("'", '"') for key, value in keys.items())
    return NODES.format(count=count) + "[[patterns]]\n" + body.replace("(", "[").replace(
        ")", "]")


def test_ring_line_and_all() -> None:
    assert labels(pattern(3, kind="ring", nodes="t")) == \
        {"t0.out -> t1.in", "t1.out -> t2.in", "t2.out -> t0.in"}
    assert labels(pattern(3, kind="line", nodes="t", **{"from": "o", "to": "i"})) == \
        {"t0.o -> t1.i", "t1.o -> t2.i"}
    assert len(labels(pattern(4, kind="all", nodes="t"))) == 12


def test_grid_has_named_boxes_and_torus_wraps() -> None:
    grid = labels(pattern(6, kind="grid", nodes="t", shape=(2, 3)))
    assert {label for label in grid if label.startswith("t4.")} == \
        {"t4.n -> t1.s", "t4.e -> t5.w", "t4.w -> t3.e"}
    torus = loads(pattern(16, kind="torus", nodes="t", shape=(4, 4), neighbours=8))
    assert len(torus.links) == 16 * 8
    corner = {link.label for link in torus.links if link.source == "t00"}
    assert "t00.nw -> t15.se" in corner and "t00.w -> t03.e" in corner


def test_random_k_out_is_seeded() -> None:
    first = labels(pattern(10, kind="random", nodes="t", k=3, seed=5))
    assert first == labels(pattern(10, kind="random", nodes="t", k=3, seed=5))
    assert first != labels(pattern(10, kind="random", nodes="t", k=3, seed=6))
    assert all(sum(1 for label in first if label.startswith(f"t{i}.")) == 3
               for i in range(10))
    assert not any(label.split(".")[0] == label.split(" -> ")[1].split(".")[0]
                   for label in first)


@pytest.mark.parametrize("keys, key_path, message", [
    ({"kind": "tours", "nodes": "t"}, "patterns[0].kind", "did you mean 'torus'"),
    ({"kind": "grid", "nodes": "t"}, "patterns[0]", "missing required key 'shape'"),
    ({"kind": "grid", "nodes": "t", "shape": (3, 3)}, "patterns[0].shape",
     "3 x 3 = 9 places for 4 nodes"),
    ({"kind": "torus", "nodes": "t", "shape": (2, 2), "neighbours": 6},
     "patterns[0].neighbours", "expected 4 or 8"),
    ({"kind": "random", "nodes": "t", "k": 4}, "patterns[0].k", "in 1..3"),
    ({"kind": "ring", "nodes": "u"}, "patterns[0].nodes",
     "no node, and no table of count nodes, named 'u'"),
    ({"kind": "ring", "nodes": "u*"}, "patterns[0].nodes", "matches no node"),
    ({"kind": "ring", "nodes": "t", "shape": (2, 2)}, "patterns[0].shape", "unknown key"),
    ({"kind": "torus", "nodes": "t", "shape": (2, 2), "boxes": "single"}, "patterns[0]",
     "use boxes = 'named'"),
])
def test_bad_patterns_are_named(keys: dict, key_path: str, message: str) -> None:
    with pytest.raises(TopologyError) as caught:
        loads(pattern(4, **keys))
    assert caught.value.key_path == key_path and message in str(caught.value), \
        str(caught.value)


def test_a_pattern_and_a_link_cannot_both_make_a_link() -> None:
    text = pattern(3, kind="ring", nodes="t") + '[[links]]\nfrom = "t0.out"\nto = "t1.in"\n'
    with pytest.raises(TopologyError, match=r"duplicate link t0.out -> t1.in \(also made by "
                                            r"links\[0\]\)"):
        loads(text)


def test_builder_makes_the_topology_its_toml_makes() -> None:
    b = Builder("tiles", ticks=12, seed=3)
    b.nodes("t", "tests.test_patterns:Tile", count=16, params={"size": 2},
            per_index={"row": [i // 4 for i in range(16)]})
    b.torus("t", shape=(4, 4))
    built = b.build()
    text = b.to_toml()
    assert built == loads(text).replace(name="tiles")
    assert built.node("t05").params == {"size": 2, "row": 1} and len(built.links) == 64
    assert "[[patterns]]" in text and 'kind = "torus"' in text
    layout = plan(built, 4)  # four 2x2 blocks: 32 links cross, as few as can
    assert layout.crossing(built.links) == 32
    with pytest.raises(TopologyError, match=r"patterns\[1\].shape"):
        b.grid("t", shape=(5, 5)).build()


from hiocluster.node import Node  # noqa: E402  (the node the builder test runs)


class Tile(Node):
    inboxes = outboxes = ("n", "s", "e", "w")

    def setup(self) -> None:
        self.heard: list[int] = []

    def step(self) -> None:
        for box in ("n", "s", "e", "w"):
            self.heard += self.inbox[box].drain()
            self.outbox[box].put(self.index)

    def state(self) -> object:
        return sum(self.heard)

    def result(self) -> object:
        return sorted(set(self.heard))


def test_a_built_torus_runs_the_same_everywhere() -> None:
    b = Builder("tiles", ticks=5)
    b.nodes("t", "tests.test_patterns:Tile", count=16).torus("t", shape=(4, 4))
    results = [supervisor.run(b.build(), processes=p, app_dir=str(REPO),
                              handle_signals=False) for p in (1, 4)]
    assert results[0].digest == results[1].digest
    assert results[0].nodes["t05"] == [1, 4, 6, 9]  # its four neighbours, by index


def test_readme_builder_example_builds() -> None:
    readme = (REPO / "README.md").read_text()
    block = next(code.split("```", 1)[0] for code in readme.split("```python\n")[1:]
                 if "Builder(" in code)
    namespace: dict = {}
    exec(compile(block, "README", "exec"), namespace)
    topology = namespace["topology"]
    assert len(topology.nodes) == 16 and len(topology.links) == 64
    assert topology.node("tile05").params == {"size": 32, "row": 1}
