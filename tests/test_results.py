"""Results out of a run: Node.result(), per-node metrics and their kinds, what
exit() knows, --output; and what count-made nodes know (index, count, per_index
params, the run's length). Real runs at several placements; nodes live here
(``tests.test_results:<Name>``, app dir: the repo root)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, hiocluster_command
from hiocluster.supervision import supervisor
from hiocluster.errors import Interrupted, NodeError, TopologyError
from hiocluster.node import Node
from hiocluster.topology import loads

HERE = "tests.test_results"


class Tile(Node):
    """Sums what its left neighbour sends; says who it is in its result; writes
    how the run ended (``self.outcome``) from ``exit()`` to ``params.marks``."""

    inboxes = ("in",)
    outboxes = ("out",)
    metric_kinds = {"load": "gauge", "wait": "duration"}

    def setup(self) -> None:
        self.total = 0

    def step(self) -> None:
        for value in self.inbox["in"].drain():
            self.total += value
        self.outbox["out"].put(self.index * 10 + self.params["weight"])
        if self.params.get("fail_at") == self.tick and self.index == 2:
            raise RuntimeError(f"tile {self.index} fails on purpose")

    def state(self) -> Any:
        return self.total

    def metrics(self) -> dict[str, Any]:
        return {"sent": self.tick + 1, "load": self.total / 100, "wait": 0.25 * self.index}

    def result(self) -> Any:
        return {"index": self.index, "count": self.count, "ticks": self.ticks,
                "weight": self.params["weight"], "colour": self.params["colour"],
                "total": self.total, "raw": b"\x00\x01"}

    def exit(self) -> None:
        marks = self.params.get("marks")
        if marks:
            Path(marks, f"{self.name}.outcome").write_text(str(self.outcome))
        super().exit()


class Cells(Node):
    """A strip of cells ``params.first`` .. ``params.last`` of a 1-D model; each
    tick each cell draws from ``random_for((cell,))`` and ``numpy_random_for``."""

    def setup(self) -> None:
        self.drawn: dict[str, list[float]] = {}

    def step(self) -> None:
        for cell in range(self.params["first"], self.params["last"] + 1):
            draws = self.drawn.setdefault(str(cell), [])
            draws.append(self.random_for((cell,)).random())
            draws.append(float(self.numpy_random_for((cell,)).random()))

    def result(self) -> Any:
        return self.drawn


class Mutator(Node):
    """Puts an array, then changes it in the same tick (``params.copy``: puts a
    copy); its receiver keeps what arrived."""

    inboxes = ("in",)
    outboxes = ("out",)

    def setup(self) -> None:
        self.got: list[list[int]] = []

    def step(self) -> None:
        import numpy

        for value in self.inbox["in"].drain():
            self.got.append([int(x) for x in value])
        if self.outbox["out"].links:
            sent = numpy.array([self.tick, 0])
            self.outbox["out"].put(sent.copy() if self.params.get("copy") else sent)
            sent[1] = 99  # after put, in the same tick

    def result(self) -> Any:
        return self.got


class Big(Node):
    """Its result: ``params.mib`` MiB of bytes in a numpy array, from its index."""

    def result(self) -> Any:
        import numpy

        return numpy.random.default_rng(self.index).integers(
            0, 255, self.params["mib"] << 20, dtype=numpy.uint8)


class BadResult(Node):
    def result(self) -> Any:
        return {1, 2}  # a set: msgpack cannot pack it


def ring(ticks: int = 6, **params: Any) -> str:
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in params.items())
    return f"""
[run]
ticks = {ticks}

[nodes.t]
class = "{HERE}:Tile"
count = 4
params = {{ colour = "red", {extra.strip().replace(chr(10), ', ')} }}
per_index = {{ weight = [1, 2, 3, 4] }}

[[links]]
from = "t0.out"
to = "t1.in"
[[links]]
from = "t1.out"
to = "t2.in"
[[links]]
from = "t2.out"
to = "t3.in"
[[links]]
from = "t3.out"
to = "t0.in"
""".replace("{ colour = \"red\",  }", "{ colour = \"red\" }")


def run(text: str, **kwargs: Any) -> supervisor.RunResult:
    return supervisor.run(loads(text), app_dir=str(REPO), handle_signals=False, **kwargs)


def test_count_nodes_know_their_index_count_params_and_the_run_length() -> None:
    results = [run(ring(), processes=processes) for processes in (1, 2, 4)]
    assert len({result.digest for result in results}) == 1
    nodes = results[0].nodes
    assert list(nodes) == ["t0", "t1", "t2", "t3"]
    for i, name in enumerate(nodes):
        assert {key: nodes[name][key] for key in ("index", "count", "ticks", "weight",
                                                  "colour", "raw")} == \
            {"index": i, "count": 4, "ticks": 6, "weight": i + 1, "colour": "red",
             "raw": b"\x00\x01"}
    # each tile got 6 ticks' worth from its left neighbour, less the last in flight
    left = {0: 3, 1: 0, 2: 1, 3: 2}
    assert [nodes[f"t{i}"]["total"] for i in range(4)] == \
        [5 * (left[i] * 10 + left[i] + 1) for i in range(4)]
    for result in results[1:]:
        assert result.nodes == nodes and result.node_metrics == results[0].node_metrics


@pytest.mark.parametrize("split", [[(0, 7)], [(0, 1), (2, 4), (5, 7)]])
def test_random_for_draws_the_same_in_any_split_of_a_model(split) -> None:
    """One node of 8 cells, or three of 2-3 cells: each cell's draws are those a
    one-array reference makes with the module's functions, tick by tick."""
    from hiocluster.node import numpy_random_for, random_for

    nodes = "".join(f'[nodes.s{k}]\nclass = "{HERE}:Cells"\n'
                    f"params = {{ first = {first}, last = {last} }}\n"
                    for k, (first, last) in enumerate(split))
    result = run(f"[run]\nticks = 5\nseed = 42\n{nodes}", processes=len(split))
    cells = {cell: draws for node in result.nodes.values() for cell, draws in node.items()}
    assert cells == {str(cell): [value for tick in range(5) for value in (
        random_for(42, tick, (cell,)).random(),
        float(numpy_random_for(42, tick, (cell,)).random()))] for cell in range(8)}
    assert len({value for draws in cells.values() for value in draws}) == 80  # all differ


def test_run_takes_a_topology_files_path_too() -> None:
    import hiocluster

    path = REPO / "topologies" / "ring.toml"
    by_path = hiocluster.run(str(path), processes=2, app_dir=str(REPO), handle_signals=False)
    loaded = hiocluster.run(hiocluster.load(path), processes=1, app_dir=str(REPO),
                            handle_signals=False)
    assert by_path.digest == loaded.digest and by_path.topology == "ring"
    with pytest.raises(TopologyError, match="no such file"):
        hiocluster.run(REPO / "topologies" / "nope.toml")


@pytest.mark.parametrize("copy", [False, True])
def test_put_sends_the_payload_as_it_is_when_the_tick_ends(copy) -> None:
    text = (f'[run]\nticks = 4\n[nodes.a]\nclass = "{HERE}:Mutator"\n'
            f"params = {{ copy = {str(copy).lower()} }}\n"
            f'[nodes.b]\nclass = "{HERE}:Mutator"\n'
            '[[links]]\nfrom = "a.out"\nto = "b.in"\n')
    for processes in (1, 2):  # a local link, then one between processes: the same
        got = run(text, processes=processes).nodes["b"]
        assert got == [[tick, 0 if copy else 99] for tick in range(3)], (processes, got)


def test_per_node_metrics_keep_their_kind() -> None:
    result = run(ring(), processes=2)
    assert result.metric_kinds == {"load": "gauge", "wait": "duration"}
    assert result.metrics == {"sent": 24}  # counters: summed, with a rate
    assert result.node_metrics["t3"] == {"sent": 6, "load": result.nodes["t3"]["total"] / 100,
                                         "wait": 0.75}
    data = result.to_json()
    assert data["nodes"] == 4 and data["results"]["t1"]["index"] == 1
    assert data["node_metrics"]["t0"]["wait"] == 0.0


def test_exit_knows_how_the_run_ended(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    run(ring(marks=str(marks)), processes=2)
    assert {p.name: p.read_text() for p in marks.iterdir()} == \
        {f"t{i}.outcome": "finished" for i in range(4)}
    for path in marks.iterdir():
        path.unlink()
    with pytest.raises(NodeError, match="tile 2 fails on purpose"):
        run(ring(marks=str(marks), fail_at=3), processes=2)
    outcomes = {p.name: p.read_text() for p in marks.iterdir()}
    assert set(outcomes.values()) == {"failed"} and len(outcomes) == 4


def test_a_result_that_cannot_travel_names_its_node() -> None:
    text = f'[run]\nticks = 2\n[nodes.ok]\nclass = "{HERE}:Tile"\ncount = 1\n' \
           f'params = {{ colour = "x", weight = 1 }}\n[nodes.bad]\nclass = "{HERE}:BadResult"\n' \
           '[[links]]\nfrom = "ok0.out"\nto = "ok0.in"\n'
    with pytest.raises(NodeError) as caught:
        run(text, processes=1)
    assert caught.value.nodes == ("bad",)
    assert "result() returned a set that cannot be sent" in caught.value.detail


BIG = f'[run]\nticks = 2\n[nodes.b]\nclass = "{HERE}:Big"\ncount = 4\nparams = {{ mib = 6 }}\n' \
      '[placement]\np0 = ["b0"]\np1 = ["b1"]\np2 = ["b2"]\np3 = ["b3"]\n'


@pytest.mark.parametrize("how", ["one worker", "groups"])
def test_results_over_a_control_frame_arrive_whole(how: str) -> None:
    """Four results of 6 MiB: 24 MiB from one worker, or from each group of two,
    is over the 16 MiB of a control frame; its BYE goes in CHUNKs and every
    result arrives as it was."""
    import numpy

    text = BIG + ('[groups]\ng1 = ["p0", "p1"]\ng2 = ["p2", "p3"]\n' if how == "groups" else "")
    result = run(text, processes=1) if how == "one worker" else run(text)
    assert result.groups == (2 if how == "groups" else 0)
    assert sorted(result.nodes) == ["b0", "b1", "b2", "b3"]
    for index in range(4):
        expected = numpy.random.default_rng(index).integers(0, 255, 6 << 20, dtype=numpy.uint8)
        assert numpy.array_equal(result.nodes[f"b{index}"], expected)


def test_output_writes_a_json_line_per_node(tmp_path: Path, cli_env: dict[str, str]) -> None:
    path = tmp_path / "ring.toml"
    path.write_text(ring())
    out = tmp_path / "out.jsonl"
    done = subprocess.run(hiocluster_command("run", str(path), "--processes", "2", "--output",
                                             str(out), "--app-dir", str(REPO), "--json"),
                          capture_output=True, text=True, env=cli_env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["node"] for line in lines] == ["t0", "t1", "t2", "t3"]
    assert lines[2]["result"]["weight"] == 3 and lines[2]["result"]["raw"] == "0001"
    assert lines[2]["metrics"]["wait"] == 0.5
    assert json.loads(done.stdout)["results"]["t2"]["index"] == 2
    summary = subprocess.run(hiocluster_command("run", str(path), "--app-dir", str(REPO)),
                             capture_output=True, text=True, env=cli_env, timeout=120)
    assert "metric   sent 24 in all (4 per tick, " in summary.stdout
    assert "metric   wait (duration) min 0 mean 0.375 max 0.75 over 4 nodes" in summary.stdout


@pytest.mark.parametrize("body, key_path, message", [
    ('count = 2\nper_index = { w = [1] }', "nodes.t.per_index.w", "has 1 values for 2 nodes"),
    ('per_index = { w = [1] }', "nodes.t.per_index", "per_index needs count"),
    ('count = 2\nper_index = { w = 3 }', "nodes.t.per_index.w", "expected array"),
])
def test_bad_per_index_is_named(body: str, key_path: str, message: str) -> None:
    with pytest.raises(TopologyError) as caught:
        loads(f'[nodes.t]\nclass = "m:C"\n{body}\n')
    assert caught.value.key_path == key_path and message in str(caught.value)


def test_exit_knows_an_interrupted_run(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    text = ring(ticks=1000, marks=str(marks)).replace("[run]", "[run]\ntock = 0.05\nreal = true")
    with pytest.raises(Interrupted):
        run(text, processes=2,
            on_ready=lambda running: running.interrupt(signal.SIGTERM))
    assert {p.name: p.read_text() for p in marks.iterdir()} == \
        {f"t{i}.outcome": "interrupted" for i in range(4)}
