"""The `hiocluster` command, run as a real subprocess; and the README's promises."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess

import pytest

from conftest import REPO, hiocluster_command

README = (REPO / "README.md").read_text()
TIMEOUT = 60


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(hiocluster_command(*args), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)


def _readme_block(after: str) -> str:
    """The text of the first fenced block after the line ``after``."""
    tail = README.split(after, 1)[1]
    return tail.split("```", 2)[1].split("\n", 1)[1]


def test_readme_has_exactly_two_marked_commands() -> None:
    assert README.count("<!-- setup-command -->") == 1
    assert README.count("<!-- test-command -->") == 1
    assert README.count("```sh\n") == 2  # no other copy-paste shell blocks
    setup = _readme_block("<!-- setup-command -->").strip()
    tests = _readme_block("<!-- test-command -->").strip()
    assert setup.startswith("python3 -m venv .venv") and "hiocluster run topologies/" in setup
    assert "pytest" in tests and "\n" not in setup and "\n" not in tests


def test_readme_example_output_is_real(cli_env: dict[str, str]) -> None:
    shown = _readme_block("The first command prints (timings vary; the digest does not):")
    result = run_cli(cli_env, "run", "topologies/ring.toml")
    assert result.returncode == 0, result.stderr
    for expected, actual in zip(shown.strip().splitlines(), result.stdout.strip().splitlines(),
                                strict=True):
        # timings may differ; every count and the digest must be exactly as shown
        pattern = re.escape(expected)
        for value in re.findall(r"\d+\.\d+|[\d,]+(?= ticks/s)", expected):
            pattern = pattern.replace(re.escape(value), r"[0-9][0-9,.]*", 1)
        assert re.fullmatch(pattern, actual), (expected, actual)


def test_readme_json_example_matches_digest(cli_env: dict[str, str]) -> None:
    shown = json.loads(_readme_block("`--json`), with any `--window`, or spread over eight, "
                                     "gives the same digest:").strip())
    result = run_cli(cli_env, "run", "topologies/ring.toml", "--processes", "1", "--json")
    assert result.returncode == 0, result.stderr
    actual = json.loads(result.stdout)
    assert set(shown) == set(actual)
    for key in ("ticks", "digest", "processes", "nodes", "messages", "undelivered"):
        assert actual[key] == shown[key], key


@pytest.mark.parametrize("processes", ["1", "3", "8"])
def test_run_json_fields_and_placement_independence(cli_env: dict[str, str],
                                                    processes: str) -> None:
    result = run_cli(cli_env, "run", "topologies/ring.toml", "--processes", processes,
                     "--ticks", "60", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["processes"] == int(processes) and data["ticks"] == 60
    assert data["ticks_per_second"] > 0 and data["seconds"] > 0 and data["nodes"] == 8
    reference = run_cli(cli_env, "run", "topologies/ring.toml", "--ticks", "60", "--json")
    assert json.loads(reference.stdout)["digest"] == data["digest"]


def test_run_seed_changes_digest(cli_env: dict[str, str]) -> None:
    digests = {json.loads(run_cli(cli_env, "run", "topologies/ring.toml", "--ticks", "30",
                                  "--seed", seed, "--json").stdout)["digest"]
               for seed in ("1", "2")}
    assert len(digests) == 2


@pytest.mark.parametrize("args, message", [
    (["run", "topologies/ring.toml", "--processes", "0"], "--processes"),
    (["run", "topologies/ring.toml", "--ticks", "x"], "--ticks"),
    (["run", "topologies/ring.toml", "--bogus"], "unrecognized arguments: --bogus"),
    (["run", "topologies/ring.toml", "--processes", "99"], "--processes"),
    (["run", "no/such/file.toml"], "no such file"),
    (["frobnicate"], "invalid choice"),
    (["run", "topologies/ring.toml", "--window", "0"], "--window: must be at least 1"),
    (["run", "topologies/ring.toml", "--external", "p9"], "p9 is no worker in the plan"),
    (["run", "topologies/ring.toml", "--listen", "http://x"], "--listen: expected ipc://"),
    (["worker", "--connect", "garbage", "--name", "p0"], "--connect: expected ipc://"),
    (["worker", "--connect", "tcp://127.0.0.1:9", "--name=.p"], "invalid worker name"),
])
def test_usage_errors_exit_2(cli_env: dict[str, str], args: list[str], message: str) -> None:
    result = run_cli(cli_env, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_bad_topology_names_key_path_and_line(cli_env: dict[str, str], tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[run]\nticks = 5\n\n[nodes.a]\nclass = "nodes.ring:RingNode"\nparms = {}\n')
    for command in ("run", "check"):
        result = run_cli(cli_env, command, str(path))
        assert result.returncode == 2
        assert "nodes.a.parms" in result.stderr and ":6" in result.stderr
        assert "did you mean 'params'" in result.stderr
    result = run_cli(cli_env, "run", str(path), "--json")
    assert result.returncode == 2
    error = json.loads(result.stdout)["error"]
    assert (error["type"], error["key_path"], error["line"]) == ("TopologyError",
                                                                 "nodes.a.parms", 6)


def test_off_a_terminal_progress_is_a_line_every_few_seconds(cli_env, tmp_path) -> None:
    """Paced by the wall clock (--real, 60 ticks of 0.02 s), the run lasts at least
    1.2 s: with a line due every 0.2 s, some come; --quiet has none."""
    topology = tmp_path / "paced.toml"
    topology.write_text('[run]\nticks = 60\ntock = 0.02\nreal = true\n'
                        '[nodes.n]\nclass = "nodes.ring:RingNode"\ncount = 2\n')
    env = dict(cli_env, HIOCLUSTER_PROGRESS_S="0.2")
    loud = run_cli(env, "run", str(topology), "--window", "1")
    assert loud.returncode == 0, loud.stderr
    lines = [line for line in loud.stderr.splitlines() if line.startswith("hiocluster: tick ")]
    assert lines, loud.stderr
    assert all(re.fullmatch(r"hiocluster: tick [\d,]+ of 60 \(\d+%\), [\d,]+ ticks/s"
                            r"(, about (\d+ min )?\d+ s left)?", line) for line in lines), lines
    quiet = run_cli(env, "run", str(topology), "--window", "1", "--quiet")
    assert quiet.returncode == 0 and "hiocluster: tick " not in quiet.stderr, quiet.stderr


def test_check_ok(cli_env: dict[str, str]) -> None:
    result = run_cli(cli_env, "check", "topologies/ring.toml", "--processes", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: ring: 8 nodes, 8 links")
    assert ", 2 links between workers" in result.stdout.splitlines()[0]
    assert result.stdout.splitlines()[1:] == ["  p0: 4 nodes: r0 r1 r2 r3",
                                              "  p1: 4 nodes: r4 r5 r6 r7"]


def test_check_summarises_a_large_plan(cli_env: dict[str, str], tmp_path) -> None:
    lines = ['[nodes.n]\nclass = "nodes.ring:RingNode"\ncount = 3000\n']
    lines += [f'[[links]]\nfrom = "n{i:04d}.out"\nto = "n{(i + 1) % 3000:04d}.in"\n'
              for i in range(3000)]
    (tmp_path / "big.toml").write_text("".join(lines))
    result = run_cli(cli_env, "check", str(tmp_path / "big.toml"), "--processes", "30")
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0].endswith("30 links between workers") and "3000 nodes, 3000 links" in out[0]
    assert out[1] == "  p0: 100 nodes: n0000 n0001 n0002 ... n0098 n0099"
    assert out[-1] == "  ... and 10 more workers" and len(out) == 22
    assert max(len(line) for line in out) < 120


def test_failed_run_exits_1_with_json_error(cli_env: dict[str, str], tmp_path) -> None:
    (tmp_path / "boom.py").write_text(
        "from hiocluster.node import Node\n"
        "class Boom(Node):\n"
        "    def step(self):\n"
        "        if self.tick == 2:\n"
        "            raise RuntimeError('kaboom')\n")
    path = tmp_path / "boom.toml"
    path.write_text('[run]\nticks = 5\n[nodes.b]\nclass = "boom:Boom"\n')
    result = run_cli(cli_env, "run", str(path), "--app-dir", str(tmp_path), "--json")
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "NodeError" and error["tick"] == 2 and error["nodes"] == ["b"]
    assert "kaboom" in error["cause"] and "kaboom" in result.stderr


def _run_with_terminal_stderr(env: dict[str, str], *args: str) -> tuple[int, bytes]:
    """Run the CLI with stderr on a pseudo-terminal; return its exit code and stderr."""
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(hiocluster_command(*args), cwd=REPO, env=env,
                                   stdout=subprocess.DEVNULL, stderr=slave)
    finally:
        os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], TIMEOUT)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        code = process.wait(timeout=TIMEOUT)
    return code, b"".join(chunks)


def test_progress_bar_on_a_terminal_only(cli_env: dict[str, str]) -> None:
    # 20 windows: the bar is updated 20 times however fast or slow the machine, and
    # drawn once more as it stops (a rate shows from the second update on)
    code, stderr = _run_with_terminal_stderr(cli_env, "run", "topologies/ring.toml",
                                             "--ticks", "500", "--window", "25")
    assert code == 0
    assert b"ticking" in stderr and b"/500" in stderr and b"ticks/s" in stderr
    piped = run_cli(cli_env, "run", "topologies/ring.toml", "--ticks", "200")
    assert piped.returncode == 0 and piped.stderr == ""


def _python_blocks() -> list[str]:
    return [block.split("```", 1)[0] for block in README.split("```python\n")[1:]]


def test_readme_node_and_api_examples_run(tmp_path, no_leaks) -> None:
    blocks = _python_blocks()
    node_code = next(block for block in blocks if "class Counter" in block)
    api_code = next(block for block in blocks if "hiocluster.run(" in block)
    (tmp_path / "counter.py").write_text(node_code)
    (tmp_path / "pair.toml").write_text(
        '[run]\nticks = 20\n[nodes.a]\nclass = "counter:Counter"\n[nodes.b]\n'
        'class = "counter:Counter"\n[[links]]\nfrom = "a.out"\nto = "b.in"\n'
        '[[links]]\nfrom = "b.out"\nto = "a.in"\n')
    import hiocluster

    results = [hiocluster.run(hiocluster.load(tmp_path / "pair.toml"), processes=processes,
                              app_dir=str(tmp_path), handle_signals=False)
               for processes in (1, 2)]
    assert results[0].digest == results[1].digest and results[0].metrics["values"] > 0
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        exec(compile(api_code.replace("processes=4", "processes=2"), "README", "exec"),
             namespace)
    finally:
        os.chdir(cwd)
    assert namespace["result"].ticks == 200 and len(namespace["result"].digest) == 64


def test_tcp_transport_gives_the_same_digest(cli_env: dict[str, str]) -> None:
    digests = set()
    for transport in ("ipc", "tcp"):
        result = run_cli(cli_env, "run", "topologies/phold.toml", "--ticks", "40",
                         "--processes", "4", "--transport", transport, "--json")
        assert result.returncode == 0, result.stderr
        digests.add(json.loads(result.stdout)["digest"])
    assert len(digests) == 1
