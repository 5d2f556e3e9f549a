"""Parameter sweeps: the grid and its topologies (no processes), then real sweeps
whose rows are checked against runs made one by one."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, hiocluster_command

from hiocluster.errors import TopologyError
from hiocluster.supervision.supervisor import run
from hiocluster.supervision.sweep import apply_point, last_means, points, sweep
from hiocluster.topology import load

RING = REPO / "topologies" / "ring.toml"

FLAKY = """from hiocluster.node import Node


class Flaky(Node):
    inboxes = ()
    outboxes = ()

    def setup(self):
        self.count = 0

    def step(self):
        self.count += 1
        if self.params.get("boom") and self.count == 3:
            raise RuntimeError("boom at its third step")

    def state(self):
        return self.count

    def result(self):
        return {"count": self.count}
"""


def test_a_grid_is_every_combination_in_order_or_the_points_given() -> None:
    assert points({"a.x": [1, 2], "run.ticks": [10, 20]}) == [
        {"a.x": 1, "run.ticks": 10}, {"a.x": 1, "run.ticks": 20},
        {"a.x": 2, "run.ticks": 10}, {"a.x": 2, "run.ticks": 20}]
    assert points([{"a.x": 1}, {"a.x": 5, "a.y": 0}]) == [{"a.x": 1}, {"a.x": 5, "a.y": 0}]
    assert points(None) == [{}]
    with pytest.raises(ValueError, match="'a.x' has no values"):
        points({"a.x": []})
    with pytest.raises(ValueError, match="empty"):
        points([])


def test_a_point_sets_a_tables_params_run_settings_and_the_seed() -> None:
    topology = load(RING)
    made = apply_point(topology, {"r0.tokens": 5, "run.ticks": 7}, 42)
    assert made.node("r0").params["tokens"] == 5 and made.node("r1").params == {}
    assert (made.ticks, made.seed, made.metrics) == (7, 42, "")
    assert topology.node("r0").params["tokens"] == 3  # the original is untouched
    for name, message in [("r9.tokens", r"no node table 'r9' \(tables: r0, r1"),
                          ("tokens", "expected TABLE.PARAM"),
                          ("run.tics", "no run setting 'tics'"),
                          ("run.metrics", "no run setting 'metrics'")]:
        with pytest.raises(TopologyError, match=message):
            apply_point(topology, {name: 1}, None)
    with pytest.raises(TopologyError, match="run.ticks"):
        apply_point(topology, {"run.ticks": 0}, None)


def test_a_sweeps_rows_are_the_runs_made_one_by_one() -> None:
    result = sweep(RING, {"run.ticks": [20, 40], "r0.tokens": [1, 3]}, seeds=[1, 2],
                   parallel=2, app_dir=str(REPO), progress=False)
    assert len(result.rows) == 8 and not result.failed
    assert [(row["params"], row["seed"]) for row in result.rows[:3]] == [
        ({"run.ticks": 20, "r0.tokens": 1}, 1), ({"run.ticks": 20, "r0.tokens": 1}, 2),
        ({"run.ticks": 20, "r0.tokens": 3}, 1)]
    topology = load(RING)
    for row in (result.rows[0], result.rows[-1]):
        alone = run(apply_point(topology, row["params"], row["seed"]), processes=1,
                    app_dir=str(REPO), handle_signals=False)
        assert row["digest"] == alone.digest
    assert len({row["digest"] for row in result.rows}) == 8


def test_a_sweep_sums_up_each_runs_observations(tmp_path: Path) -> None:
    heat = REPO / "topologies" / "heat.toml"
    result = sweep(heat, {"t.alpha": [0.1, 0.2]}, app_dir=str(REPO), progress=False)
    alone = run(apply_point(load(heat), {"t.alpha": 0.2}, None), processes=1,
                app_dir=str(REPO), handle_signals=False)
    row = result.rows[1]
    assert row["observed"]["centre"] == alone.observed("centre", "mean")[1][-1]
    assert result.rows[0]["observed"]["centre"] != row["observed"]["centre"]
    result.to_csv(tmp_path / "heat.csv")
    header = next(csv.reader((tmp_path / "heat.csv").open()))
    assert header[header.index("ticks_per_second") + 1:] == [
        "observed.centre", "observed.corner", "observed.updates", "error", "results"]


def test_each_observation_is_summed_up_at_the_last_tick_it_was_observed() -> None:
    table = {"tick": [0, 0, 0, 1, 1], "node": ["a", "a", "b", "a", "b"],
             "name": ["x", "y", "x", "x", "x"], "value": [1.0, 7.0, 3.0, 2.0, 5.0]}
    assert last_means(table) == {"x": 3.5, "y": 7.0}  # y was said at tick 0 only
    assert last_means({}) == {}


def test_a_failed_run_is_a_row_and_the_sweep_goes_on(tmp_path: Path,
                                                      cli_env: dict[str, str]) -> None:
    (tmp_path / "flaky.py").write_text(FLAKY)
    path = tmp_path / "flaky.toml"
    path.write_text('[run]\nticks = 10\n\n[nodes.a]\nclass = "flaky:Flaky"\n')
    seen: list[tuple[int, int, int]] = []
    result = sweep(path, {"a.boom": [False, True]}, app_dir=str(tmp_path),
                   progress=lambda *counts: seen.append(counts))
    good, bad = result.rows
    assert good["error"] is None and good["results"] == {"a": {"count": 10}}
    assert "boom at its third step" in bad["error"] and bad["digest"] is None
    assert sorted(seen)[-1] == (2, 1, 2)
    out = tmp_path / "sweep.csv"
    done = subprocess.run(hiocluster_command("sweep", str(path), "--param", "a.boom=false,true",
                                             "--seeds", "1-2", "--output", str(out),
                                             "--app-dir", str(tmp_path)),
                          capture_output=True, text=True, env=cli_env, timeout=120)
    assert done.returncode == 1, done.stderr  # some failed
    assert "sweep: 4 runs, 2 failed" in done.stdout
    rows = list(csv.DictReader(out.open()))
    assert [(row["a.boom"], row["seed"], bool(row["error"])) for row in rows] == [
        ("False", "1", False), ("False", "2", False), ("True", "1", True), ("True", "2", True)]
    assert json.loads(rows[0]["results"]) == {"a": {"count": 10}}


def test_the_readmes_sweep_command_runs(cli_env: dict[str, str], tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("hiocluster sweep topologies/"))
    argv = command.split()[1:]
    argv[argv.index("--output") + 1] = str(tmp_path / "sweep.csv")
    done = subprocess.run(hiocluster_command(*argv, "--app-dir", str(REPO)), cwd=REPO,
                          capture_output=True, text=True, env=cli_env, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert len(rows) == 16 and {row["r0.tokens"] for row in rows} == {"1", "3"}
    assert "sweep: 16 runs, 0 failed" in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["--param", "r0.tokens"], "expected TABLE.PARAM=V1,V2"),
    (["--param", "r9.tokens=1,2"], "no node table 'r9'"),
    (["--seeds", "5-1"], "is not a range"),
    (["--param", "r0.tokens=1", "--param", "r0.tokens=2"], "is given twice"),
])
def test_bad_sweep_arguments_are_named(cli_env: dict[str, str], argv: list[str],
                                       message: str) -> None:
    done = subprocess.run(hiocluster_command("sweep", str(RING), *argv),
                          capture_output=True, text=True, env=cli_env, timeout=60)
    assert done.returncode == 2 and message in done.stderr, done.stderr
