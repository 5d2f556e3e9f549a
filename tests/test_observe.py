"""Per-tick observations: what nodes' observe() say, collected into one table the
same at every placement, never part of a digest; bad values named."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, hiocluster_command

from hiocluster.errors import NodeError, ObservationsError
from hiocluster.supervision.observations import Observations, read_observations
from hiocluster.supervision.supervisor import run
from hiocluster.topology import load

HEAT = REPO / "topologies" / "heat.toml"

ODD = """from hiocluster.node import Node


class Odd(Node):
    inboxes = ()
    outboxes = ()

    def setup(self):
        self.count = 0

    def step(self):
        self.count += 1

    def state(self):
        return self.count

    def observe(self):
        said = self.params["says"]
        if said == "text":
            return "not a dict"
        if said == "nan":
            return {"x": float("nan")} if self.count == 3 else {"x": 1.0}
        if said == "bool":
            return {"x": True}
        if said == "name":
            return {"no spaces": 1}
        if said == "big":
            return {"x": list(range(65))}
        if said == "huge":
            return {"x": 10 ** 400}
        if said == "arrays":
            import numpy
            return {"grid": numpy.arange(4.0).reshape(2, 2) * self.count,
                    "pair": (self.count, -self.count), "n": self.count}
        return {"count": self.count} if self.count % 2 else None
"""


def heat(**changes: object) -> dict[str, object]:
    return {"topology": load(HEAT).replace(**changes), "app_dir": str(REPO),
            "handle_signals": False}


def test_observations_are_the_same_at_every_placement_and_change_no_digest() -> None:
    one = run(processes=1, **heat())  # type: ignore[arg-type]
    four = run(processes=4, **heat())  # type: ignore[arg-type]
    quiet = run(processes=2, **heat(observe_every=0))  # type: ignore[arg-type]
    assert one.digest == four.digest == quiet.digest
    table = one.observations
    ticks, nodes = load(HEAT).ticks, len(load(HEAT).nodes)
    assert len(table["tick"]) == ticks * nodes * 3 and one.observations_cut is None
    for key in ("tick", "value"):
        assert np.array_equal(table[key], four.observations[key])
    assert list(table["node"]) == list(four.observations["node"])
    assert list(table["name"][:3]) == ["centre", "corner", "updates"]
    assert quiet.observations["tick"].size == 0
    # the last tick's centres are the final fields' centres
    ticks_, tiles, centres = one.observed("centre")
    last = {tile: value for tick, tile, value in zip(ticks_, tiles, centres) if tick == ticks - 1}
    for tile, result in one.nodes.items():
        field = result["field"]
        assert last[tile] == field[field.shape[0] // 2, field.shape[0] // 2]
    per_tick, means = one.observed("centre", "mean")
    assert per_tick == list(range(ticks))
    assert means[-1] == pytest.approx(sum(last.values()) / len(last))
    with pytest.raises(KeyError, match=r"no observation 'centr' \(observed: centre, corner"):
        one.observed("centr")
    with pytest.raises(ValueError, match="sum, mean, min or max"):
        one.observed("centre", "median")


def test_observations_come_up_through_nested_groups(tmp_path: Path) -> None:
    text = HEAT.read_text()
    tiles = [f"t{i:02d}" for i in range(16)]
    placement = "".join(f'p{k} = {tiles[4 * k:4 * k + 4]!r}\n'.replace("'", '"')
                        for k in range(4))
    path = tmp_path / "heat-groups.toml"
    path.write_text(f"{text}\n[placement]\n{placement}\n[groups]\n"
                    'g1 = ["p0", "g2"]\ng2 = ["p1", "p2", "p3"]\n')
    nested = run(load(path), app_dir=str(REPO), handle_signals=False)
    flat = run(processes=1, **heat())  # type: ignore[arg-type]
    assert nested.groups == 2 and nested.digest == flat.digest
    for key in ("tick", "value"):
        assert np.array_equal(nested.observations[key], flat.observations[key])


def test_a_resumed_run_observes_from_its_checkpoint_and_says_so(tmp_path: Path) -> None:
    first = run(processes=2, checkpoint=str(tmp_path / "ck"), checkpoint_every=20,
                **heat())  # type: ignore[arg-type]
    assert first.observations_from == 0
    resumed = run(processes=1, resume=str(tmp_path / "ck"), **heat())  # type: ignore[arg-type]
    ticks = load(HEAT).ticks
    since = resumed.observations_from
    assert resumed.resumed_from is not None and since == resumed.resumed_from + 1 > 0
    assert sorted(set(resumed.observations["tick"].tolist())) == list(range(since, ticks))
    kept = first.observations["tick"] >= since  # the same rows as the first run's, from there
    assert np.array_equal(resumed.observations["value"], first.observations["value"][kept])


def test_observe_every_k_ticks_and_the_last(tmp_path: Path) -> None:
    every = run(processes=2, **heat(observe_every=7))  # type: ignore[arg-type]
    ticks = load(HEAT).ticks
    expected = sorted({t for t in range(ticks) if (t + 1) % 7 == 0} | {ticks - 1})
    assert sorted(set(every.observations["tick"].tolist())) == expected
    frame = every.to_pandas()
    assert list(frame.columns) == ["tick", "node", "name", "value"]
    assert len(frame) == len(expected) * len(load(HEAT).nodes) * 3
    path = tmp_path / "observed.parquet"
    assert every.write_observations(str(path)) == len(frame)
    import pandas
    assert pandas.read_parquet(path).equals(frame)


def test_the_cli_writes_observations_as_csv(tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "heat.csv"
    done = subprocess.run(hiocluster_command("run", str(HEAT), "--processes", "2", "--observe",
                                             str(out), "--app-dir", str(REPO)),
                          capture_output=True, text=True, env=cli_env, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(out.open()))
    topology = load(HEAT)
    assert f"{len(rows):,} observations in {out}" in done.stderr
    assert len(rows) == topology.ticks * len(topology.nodes) * 3
    assert rows[0].keys() == {"tick", "node", "name", "value"}
    assert (rows[0]["tick"], rows[0]["name"]) == ("0", "centre")


def test_the_readmes_observation_example_runs(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    readme = (REPO / "README.md").read_text().split("**Observations per tick.**", 1)[1]
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    block = block.replace("processes=2)", "processes=2, handle_signals=False, "
                                          f"app_dir={str(REPO)!r})")
    block = block.replace('"topologies/heat.toml"', repr(str(HEAT)))
    namespace: dict[str, object] = {}
    exec(compile(block, "README", "exec"), namespace)
    assert namespace["ticks"] == list(range(load(HEAT).ticks))
    assert len(namespace["centre"]) == load(HEAT).ticks  # type: ignore[arg-type]
    assert set(namespace["table"]) == {"tick", "node", "name", "value"}  # type: ignore[arg-type]
    assert (tmp_path / "centre.png").stat().st_size > 1000


def odd(tmp_path: Path, says: str) -> dict[str, object]:
    (tmp_path / "oddnode.py").write_text(ODD)
    path = tmp_path / "odd.toml"
    path.write_text(f'[run]\nticks = 6\n\n[nodes.a]\nclass = "oddnode:Odd"\n'
                    f'params = {{ says = "{says}" }}\n')
    return {"topology": str(path), "app_dir": str(tmp_path), "handle_signals": False}


def test_none_from_observe_says_nothing_that_tick(tmp_path: Path) -> None:
    result = run(processes=1, **odd(tmp_path, "count"))  # type: ignore[arg-type]
    assert result.observed("count") == ([0, 2, 4], ["a", "a", "a"], [1.0, 3.0, 5.0])


def test_a_small_array_is_a_row_per_element_named_by_its_index(tmp_path: Path) -> None:
    result = run(processes=1, **odd(tmp_path, "arrays"))  # type: ignore[arg-type]
    table = result.observations
    names = sorted(set(table["name"]))
    assert names == ["grid.0.0", "grid.0.1", "grid.1.0", "grid.1.1", "n", "pair.0", "pair.1"]
    assert result.observed("grid.1.1") == ([0, 1, 2, 3, 4, 5], ["a"] * 6,
                                           [3.0 * count for count in range(1, 7)])
    assert result.observed("pair.1")[2] == [-1.0 * count for count in range(1, 7)]


@pytest.mark.parametrize("says, message", [
    ("text", "observe() returned a str; expected a dict"),
    ("nan", "observe() gave 'x': nan; expected a finite number"),
    ("bool", "observe() gave 'x': True; expected a number"),
    ("name", "observe() gave the name 'no spaces'"),
    ("big", "observe() gave 'x': an array of 65 values; expected at most 64"),
    ("huge", "observe() gave 'x': 1000"),
])
def test_a_bad_observation_fails_the_run_naming_the_node(tmp_path: Path, says: str,
                                                          message: str) -> None:
    with pytest.raises(NodeError, match="a") as caught:
        run(processes=1, **odd(tmp_path, says))  # type: ignore[arg-type]
    assert message in str(caught.value) and caught.value.nodes == ("a",)


def window(*rows: tuple[int, str, str, float]) -> dict[str, list[list[object]]]:
    """One worker's observations of a window, as its DONE carries them."""
    out: dict[str, list[list[object]]] = {}
    for tick, node, name, value in rows:
        for column, item in zip(out.setdefault(name, [[], [], []]), (tick, node, value)):
            column.append(item)
    return out


def test_observations_stop_where_the_first_worker_stopped_keeping_them() -> None:
    sink = Observations()
    sink.window(2, [window((0, "a", "x", 1.0), (1, "a", "x", 2.0), (2, "a", "x", 3.0)),
                    window((0, "b", "x", 5.0), (1, "b", "x", 6.0))], cuts=[-1, 2])
    sink.window(4, [window((3, "a", "x", 1.0))])  # after the cut: none more
    assert sink.cut == 2 and sink.rows == 4
    table = sink.table()
    assert table["tick"].tolist() == [0, 0, 1, 1] and list(table["node"]) == ["a", "b"] * 2
    assert Observations().table()["tick"].size == 0


def test_in_memory_the_table_stops_at_the_first_tick_that_does_not_fit_whole() -> None:
    sink = Observations(limit=5)
    sink.window(1, [window(*[(tick, node, "x", 1.0) for tick in (0, 1) for node in "ab"])])
    sink.window(3, [window(*[(tick, node, "x", 1.0) for tick in (2, 3) for node in "ab"])])
    assert (sink.rows, sink.cut) == (4, 2)  # tick 2's second row would be the 6th


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_a_restart_rewinds_the_file_to_its_checkpoint(tmp_path: Path, suffix: str) -> None:
    path = str(tmp_path / f"observed.{suffix}")
    sink = Observations(path)
    for last in (1, 3, 5):  # three windows, then a restart from the checkpoint after 3
        sink.window(last, [window(*[(tick, "a", "x", float(tick)) for tick in
                                    (last - 1, last)])])
    sink.rewind(3)
    assert sink.rows == 4
    sink.window(5, [window((4, "a", "x", 40.0), (5, "a", "x", 50.0))])
    sink.close()
    table = read_observations(path)
    assert table["tick"].tolist() == list(range(6))
    assert table["value"].tolist() == [0.0, 1.0, 2.0, 3.0, 40.0, 50.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"observed.{suffix}"]


def test_an_observations_file_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    with pytest.raises(ObservationsError, match="cannot write --observe .*nowhere"):
        Observations(str(tmp_path / "nowhere" / "o.csv"))
    sink = Observations("/dev/full")  # the disk full: said, and the run goes on
    sink.window(0, [window(*[(0, f"n{i}", "x", 1.0) for i in range(2000)])])
    sink.close()
    assert sink.error is not None and "/dev/full" in sink.error
    with pytest.raises(ValueError, match="no observations file"):
        read_observations(str(HEAT))


def test_a_run_streams_its_observations_to_the_file_as_it_goes(tmp_path: Path) -> None:
    path = tmp_path / "heat.csv"
    seen: list[int] = []

    def on_tick(done: int, total: int) -> None:
        if done < total:  # the run is not over: what is in the file already
            seen.append(len(path.read_text().splitlines()) - 1)
    streamed = run(processes=2, window=10, observe=str(path), on_tick=on_tick,
                   **heat())  # type: ignore[arg-type]
    kept = run(processes=1, **heat())  # type: ignore[arg-type]
    assert any(seen) and max(seen) < streamed.observations_rows
    assert streamed.observations["tick"].size == 0  # none held in memory
    assert streamed.observations_rows == len(kept.observations["tick"])
    table = streamed.observations_table()
    for key in ("tick", "value"):
        assert np.array_equal(table[key], kept.observations[key])
    assert list(table["node"]) == list(kept.observations["node"])
    assert streamed.observed("centre", "mean") == kept.observed("centre", "mean")
