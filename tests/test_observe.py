"""Per-tick observations: what nodes' observe() say, collected into one table the
same at every placement, never part of a digest; bad values named."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, hiocluster_command

from hiocluster.errors import NodeError
from hiocluster.supervision.outcome import observation_table
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


@pytest.mark.parametrize("says, message", [
    ("text", "observe() returned a str; expected a dict"),
    ("nan", "observe() gave 'x': nan; expected a finite number"),
    ("bool", "observe() gave 'x': True; expected a number"),
    ("name", "observe() gave the name 'no spaces'"),
])
def test_a_bad_observation_fails_the_run_naming_the_node(tmp_path: Path, says: str,
                                                          message: str) -> None:
    with pytest.raises(NodeError, match="a") as caught:
        run(processes=1, **odd(tmp_path, says))  # type: ignore[arg-type]
    assert message in str(caught.value) and caught.value.nodes == ("a",)


def test_observations_stop_where_the_first_worker_stopped_keeping_them() -> None:
    parts = {"p0": {"columns": {"x": [[0, 1, 2], ["a", "a", "a"], [1, 2, 3]]}, "cut": 3},
             "p1": {"columns": {"x": [[0, 1], ["b", "b"], [5, 6]]}, "cut": 2}}
    table, cut = observation_table(parts)
    assert cut == 2
    assert table["tick"].tolist() == [0, 0, 1, 1] and list(table["node"]) == ["a", "b"] * 2
    assert observation_table({})[0]["tick"].size == 0
