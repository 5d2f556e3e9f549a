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
    from hiocluster.supervision.outcome import jsonable

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


# -- hiocluster stop says what it saw ------------------------------------------------

@pytest.fixture
def runs(cli_env: dict[str, str], tmp_path: Path):
    """Start `hiocluster run` of a one-replica echo service on a free port."""
    from test_cluster_services import Run, free_port, with_port

    started: list[Run] = []

    def start() -> tuple[Run, int]:
        """A run serving; its replica's pid."""
        port = free_port()
        text = with_port((REPO / "topologies" / "echo.toml").read_text(), port)
        path = tmp_path / f"echo{len(started)}.toml"
        path.write_text(text.replace("replicas = 4", "replicas = 1"))
        run = Run(path, cli_env)
        started.append(run)
        return run, run.serving(1)[0]

    yield start
    for run in started:
        run.close()


def test_stop_says_stopped_when_the_run_confirms_it(runs, cli_env) -> None:
    run, _ = runs()
    done = cli(cli_env, "stop", "--control", run.control)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["stopping", "stopped"]
    assert run.finish() == 0


def test_stop_of_a_run_killed_while_stopping_is_no_success(runs, cli_env) -> None:
    import os
    import signal

    run, replica = runs()
    # its replica frozen, the run cannot finish stopping: it is killed while stopping
    os.kill(replica, signal.SIGSTOP)
    try:
        stop = subprocess.Popen(hiocluster_command("stop", "--control", run.control),
                                env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            assert stop.stdout.readline() == "stopping\n"
            run.proc.kill()
            out, err = stop.communicate(timeout=TIMEOUT)
        finally:
            if stop.poll() is None:
                stop.kill()
                stop.communicate()
    finally:
        os.kill(replica, signal.SIGCONT)  # an orphan now: it cleans up and exits
    assert run.finish() == -signal.SIGKILL
    assert stop.returncode == 1, (out, err)
    assert "stopped" not in out
    assert err.strip() == (f"hiocluster: stop: the run echo0 (pid {run.proc.pid}) vanished "
                           "before confirming its stop (killed, or it crashed)")


# -- several runs: say which -----------------------------------------------------------

def test_several_runs_are_listed_and_exit_2(runs, cli_env) -> None:
    first, _ = runs()
    second, _ = runs()
    env = {key: value for key, value in cli_env.items() if key != "HIOCLUSTER_CONTROL"}
    for command in (["status"], ["scale", "echo=2"], ["restart", "echo"], ["stop"]):
        done = cli(env, *command)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        lines = done.stderr.splitlines()
        assert lines[0].startswith(f"hiocluster: {command[0]}: 2 runs under ")
        assert "--control" in lines[0]
        listed = sorted(line.split()[0] for line in lines[1:])
        assert listed == sorted([first.control, second.control])
        assert "Traceback" not in done.stderr
    for run in (first, second):  # nothing was done to either
        assert run.status()["services"][0]["desired"] == 1
        assert run.proc.poll() is None


# -- check takes run's flags ------------------------------------------------------------

def test_check_takes_every_option_of_run() -> None:
    from hiocluster.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore
    options = {name: {option for action in commands[name]._actions
                      for option in action.option_strings} for name in ("run", "check")}
    assert "--keys" in options["run"]
    assert options["check"] == options["run"]


def test_check_applies_and_checks_the_run_options(cli_env, tmp_path) -> None:
    ring = str(REPO / "topologies" / "ring.toml")
    keys = tmp_path / "keys"
    assert cli(cli_env, "keygen", str(keys), "supervisor").returncode == 0
    same = ["--app-dir", str(REPO), "--transport", "tcp", "--ticks", "7", "--external",
            "p1", "--json", "--output", str(tmp_path / "out"), "--window", "2"]
    done = cli(cli_env, "check", ring, "--keys", str(keys), *same)
    assert done.returncode == 0, done.stderr
    assert ", 7 ticks;" in done.stdout.splitlines()[0]
    assert not (tmp_path / "out").exists()  # checked, not run
    missing = cli(cli_env, "check", ring, "--keys", str(tmp_path / "none"), *same)
    assert missing.returncode == 2
    assert missing.stderr.startswith("hiocluster: check: cannot read a CURVE key pair from "
                                     f"{tmp_path / 'none' / 'supervisor.key_secret'}")
    unknown = cli(cli_env, "check", ring, "--app-dir", str(REPO), "--external", "p9")
    assert unknown.returncode == 2 and "p9 is no worker in the plan" in unknown.stderr


# -- resource exhaustion: one line naming the resource, nothing left behind ------------

def _full(root: Path) -> None:
    """Fill ``root``'s blocks (inodes are left)."""
    with open(root / "fill", "wb", buffering=0) as file:
        with pytest.raises(OSError, match="No space left on device"):
            for _ in range(10_000):  # 64 KiB is 16 of them
                file.write(b"\0" * 4096)
    assert sorted(path.name for path in root.iterdir()) == ["fill"]


def _one_line(done: subprocess.CompletedProcess[str], *words: str) -> str:
    assert done.returncode in (1, 2), (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _echo(tmp_path: Path) -> str:
    from test_cluster_services import free_port, with_port

    path = tmp_path / "echo.toml"
    path.write_text(with_port((REPO / "topologies" / "echo.toml").read_text(), free_port()))
    return str(path)


def test_a_full_run_root_is_one_line(cli_env, tmpfs) -> None:
    root = tmpfs("full", "size=64k")
    _full(root)
    env = {**cli_env, "HIOCLUSTER_RUN_ROOT": str(root)}
    done = cli(env, "run", "topologies/ring.toml", "--app-dir", str(REPO))
    line = _one_line(done, "no space left on device", str(root))
    assert line.startswith("hiocluster: run failed: ")
    assert sorted(path.name for path in root.iterdir()) == ["fill"]  # nothing left


@pytest.mark.parametrize("how,words", [
    ("size=64k,ro", ["read-only file system"]),
    ("size=64k,nr_inodes=1", ["no space left on device"]),  # no inode for the run dir
])
def test_a_services_run_with_a_read_only_or_full_root_is_one_line(
        cli_env, tmpfs, tmp_path, how: str, words: list[str]) -> None:
    root = tmpfs("root", how)
    env = {**cli_env, "HIOCLUSTER_RUN_ROOT": str(root)}
    done = cli(env, "run", _echo(tmp_path), "--app-dir", str(REPO))
    _one_line(done, *words, str(root))
    assert list(root.iterdir()) == []


def _nofile(soft: int, hard: int | None = None):
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, soft if hard is None else hard))
    return limit


def test_too_few_open_files_is_one_line_naming_the_limit(cli_env, tmp_path) -> None:
    for argv in (["topologies/ring.toml", "--processes", "8"], [_echo(tmp_path)]):
        done = subprocess.run(hiocluster_command("run", *argv, "--app-dir", str(REPO)),
                              cwd=REPO, env=cli_env, capture_output=True, text=True,
                              timeout=TIMEOUT, preexec_fn=_nofile(32))
        _one_line(done, "too many open files (RLIMIT_NOFILE 32)", "ulimit -n")


def test_a_low_soft_open_files_limit_is_raised_to_what_the_run_needs(cli_env) -> None:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 256:
        pytest.skip(f"the hard limit here ({hard}) leaves no room")
    done = subprocess.run(hiocluster_command("run", "topologies/ring.toml", "--processes",
                                             "8", "--app-dir", str(REPO), "--json"),
                          cwd=REPO, env=cli_env, capture_output=True, text=True,
                          timeout=TIMEOUT, preexec_fn=_nofile(32, hard))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["processes"] == 8
