"""The CLI's outputs and errors, hardened: results with arrays in every output
format (--json, --output, --digests, --trace), resource exhaustion as one line,
`hiocluster stop` that reports only what it saw, several runs found, and
`check` taking `run`'s flags. Real `hiocluster` subprocesses throughout."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, hiocluster_command
from hiocluster.topology import load
from nodes.heat import reference

README = (REPO / "README.md").read_text()
TIMEOUT = 90
#: The README's own heat command (checked to be there, word for word).
HEAT = "hiocluster run topologies/heat.toml --output heat.jsonl"


def cli(env: dict[str, str], *args: str, cwd: Path = REPO
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(hiocluster_command(*args), cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)


def _array(form: dict) -> np.ndarray:
    """An array back from its documented JSON form."""
    assert sorted(form) == ["data", "dtype", "shape"]
    return np.asarray(form["data"], dtype=form["dtype"]).reshape(form["shape"])


def _field(results: dict[str, dict]) -> np.ndarray:
    """The heat grid from the tiles' results as JSON gives them."""
    grid = [[None] * 4 for _ in range(4)]
    for tile in results.values():
        grid[tile["row"]][tile["col"]] = _array(tile["field"])
    return np.block(grid)


def _heat(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    """The README's heat command with ``flags`` instead of its --output."""
    assert HEAT in README
    return cli(env, *HEAT.split()[1:3], "--app-dir", str(REPO), *flags)


def _expected(ticks: int = 50) -> np.ndarray:
    """The heat example's final field, computed on one array."""
    alpha = load(REPO / "topologies" / "heat.toml").nodes[0].params["alpha"]
    return reference(64, 64, ticks - 1, alpha)


def test_heat_json_has_arrays_in_the_documented_form(cli_env) -> None:
    done = _heat(cli_env, "--json")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    body = json.loads(done.stdout)
    assert "tick_digests" not in body
    field = _field(body["results"])
    assert np.array_equal(field, _expected(body["ticks"]))


def test_heat_output_file_is_one_line_per_tile_with_arrays(cli_env, tmp_path) -> None:
    out = tmp_path / "heat.jsonl"
    done = _heat(cli_env, "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["node"] for row in rows] == [f"t{i:02d}" for i in range(16)]
    field = _field({row["node"]: row["result"] for row in rows})
    assert np.array_equal(field, _expected())
    assert rows[0]["metrics"]["updates"] == 49


def test_heat_digests_without_json_are_printed(cli_env) -> None:
    done = _heat(cli_env, "--digests")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    ticks = [line.split() for line in lines if line.startswith("tick ")]
    assert [int(row[1]) for row in ticks] == list(range(50))
    digest = next(line.split()[1] for line in lines if line.startswith("digest "))
    assert ticks[-1][2] == digest  # the run digest is the last tick's


def test_heat_json_with_digests_and_trace(cli_env, tmp_path) -> None:
    trace = tmp_path / "heat.json"
    done = _heat(cli_env, "--json", "--digests", "--trace", str(trace))
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert len(body["tick_digests"]) == 50 and body["tick_digests"][-1] == body["digest"]
    assert np.array_equal(_field(body["results"]), _expected())
    assert json.loads(trace.read_text())["traceEvents"]


def test_jsonable_says_every_result_value_in_json() -> None:
    from hiocluster.outcome import jsonable

    value = {
        "f": np.arange(6, dtype="<f4").reshape(2, 3) / 3,
        "b": np.array([True, False]),
        "i": np.array(7, dtype=">i2"),           # 0-d, big-endian
        "u": np.zeros((0, 2), dtype=np.uint8),   # empty
        "c": np.array([1 + 2j, -0.5j]),
        "scalars": [np.float32(0.1), np.int64(-3), np.bool_(True), np.complex64(1j)],
        "raw": b"\x00\xff",
        b"\x01": (1, [np.uint16(2)]),
        3: None,
    }
    said = json.loads(json.dumps(jsonable(value)))
    for key in ("f", "b", "i", "u"):
        back = _array(said[key])
        assert back.dtype == value[key].dtype and back.shape == value[key].shape
        assert np.array_equal(back, value[key])
    assert said["c"] == {"dtype": "<c16", "shape": [2], "data": [[1.0, 2.0], [-0.0, -0.5]]}
    assert said["scalars"] == [float(np.float32(0.1)), -3, True, [0.0, 1.0]]
    assert said["raw"] == "00ff" and said["01"] == [1, [2]] and said["3"] is None
