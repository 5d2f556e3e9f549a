"""Nested supervisors end to end: [groups] run as real group processes.

One digest whatever the tree (flat, one level, three deep, one process, ipc or
tcp with CURVE); a failure deep inside names the worker and node as a flat run
does; a group that dies is blamed for every node under it and its workers do
not outlive it. The autouse ``no_leaks`` fixture checks that no process and no
run-directory entry is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from hiocluster.supervision import supervisor
from hiocluster.errors import NodeError, ProcessExited, RunFailed, TopologyError
from hiocluster.topology import loads

from conftest import REPO, hiocluster_command
from tests.faulty import ring_toml
from tests.waiting import wait_until

RING = (REPO / "topologies" / "ring.toml").read_text()
PHOLD = (REPO / "topologies" / "phold.toml").read_text()
ONE = '\n[groups]\ng1 = ["p0", "p1"]\ng2 = ["p2", "p3"]\n'
DEEP = '\n[groups]\ng1 = ["p0", "g2"]\ng2 = ["p1", "g3"]\ng3 = ["p2", "p3"]\n'


def run(text: str, **kwargs: Any) -> supervisor.RunResult:
    return supervisor.run(loads(text), app_dir=str(REPO), handle_signals=False, **kwargs)


@pytest.mark.parametrize("text", [RING, PHOLD], ids=["ring", "phold"])
def test_one_digest_flat_grouped_nested_and_in_one_process(text: str) -> None:
    flat = run(text, keep_digests=True)
    one = run(text + ONE, keep_digests=True)
    deep = run(text + DEEP, keep_digests=True)
    single = run(text + DEEP, processes=1)  # --processes: flat, the groups left out
    assert single.processes == 1 and single.groups == 0 and one.groups == 2
    assert one.digest == deep.digest == single.digest == flat.digest
    assert one.tick_digests == deep.tick_digests == flat.tick_digests  # every tick, too
    assert one.processes == deep.processes == 4    # workers; groups are not counted
    assert one.messages == deep.messages == flat.messages
    assert one.metrics == deep.metrics == flat.metrics


def test_nested_groups_over_tcp_with_curve_give_the_same_digest() -> None:
    assert run(RING + DEEP, transport="tcp").digest == run(RING).digest


def test_a_node_error_three_deep_is_reported_as_in_a_flat_run(tmp_path: Path) -> None:
    errors = []
    for groups in ("", DEEP):
        marks = tmp_path / ("deep" if groups else "flat")
        marks.mkdir()
        nodes: dict[str, dict[str, Any]] = {name: {"marker_dir": str(marks)} for name in "abcd"}
        nodes["c"].update(fail_at=4, fail="raise")
        text = ring_toml(nodes, {"p0": ["a"], "p1": ["b"], "p2": ["c"], "p3": ["d"]})
        with pytest.raises(RunFailed) as info:
            run(text + groups)
        errors.append(info.value)
    flat, deep = errors
    assert type(deep) is NodeError
    assert (deep.worker, deep.nodes, deep.tick) == ("p2", ("c",), 4) \
        == (flat.worker, flat.nodes, flat.tick)
    assert deep.cause == flat.cause and "boom" in deep.cause
    assert deep.detail.rstrip().endswith("ValueError: boom")
    for name in "abd":  # every other node ran its exit contexts, however deep
        assert (marks / f"{name}.exit").read_text().split() == ["close", "exit"]


def test_a_worker_killed_inside_a_group_is_named_with_its_tick(tmp_path: Path) -> None:
    text = ring_toml({"a": {}, "killer": {"fail_at": 3, "fail": "sigkill"}, "mate": {},
                      "b": {}}, {"p0": ["a"], "p1": ["killer", "mate"], "p2": ["b"]})
    with pytest.raises(ProcessExited) as info:
        run(text + '[groups]\ng1 = ["p0", "g2"]\ng2 = ["p1"]\n')
    error = info.value
    assert (error.worker, error.nodes, error.tick, error.exitcode) == \
        ("p1", ("killer", "mate"), 3, -9)


def test_a_killed_group_is_blamed_for_its_nodes_and_leaves_no_worker(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    nodes = {name: {"marker_dir": str(marks), "sleep": 0.01} for name in "abcd"}
    text = ring_toml(nodes, {"p0": ["a"], "p1": ["b"], "p2": ["c"], "p3": ["d"]},
                     ticks=100_000) + '[groups]\ng1 = ["p0", "g2"]\ng2 = ["p1", "p2"]\n'
    found: list[supervisor.Supervisor] = []
    under: list[psutil.Process] = []

    def on_tick(done: int, total: int) -> None:
        if done >= 5 and not under:
            handle = found[0].children["g1"].handle
            assert handle is not None and handle.pid is not None
            group = psutil.Process(handle.pid)
            under.extend(group.children(recursive=True))
            # g2, and the workers p0, p1, p2 (and the guardians of g1's and g2's run dirs)
            assert len([process for process in under if process.name() != "sh"]) == 4
            os.kill(handle.pid, signal.SIGKILL)

    with pytest.raises(ProcessExited) as info:
        run(text, on_ready=found.append, on_tick=on_tick)
    error = info.value
    assert error.worker == "g1" and error.nodes == ("a", "b", "c")
    assert error.exitcode == -9
    # the group's workers and its sub-group noticed, stopped and exited themselves
    gone, alive = psutil.wait_procs(under, timeout=30)
    assert alive == []
    assert (marks / "d.exit").read_text().split() == ["close", "exit"]


def test_external_workers_must_not_be_inside_a_group() -> None:
    with pytest.raises(TopologyError, match="run under a group"):
        run(RING + ONE, external=["p1"])
    with pytest.raises(TopologyError, match="g1 is a group: only workers can be started"):
        run(RING + ONE, external=["g1"])


def test_cli_check_and_run_show_groups(cli_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(RING + DEEP)
    check = subprocess.run(hiocluster_command("check", str(path)), env=cli_env, cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert "groups: g1 [p0, g2]; g2 [p1, g3]; g3 [p2, p3]" in check.stdout
    done = subprocess.run(hiocluster_command("run", str(path)), env=cli_env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    flat = subprocess.run(hiocluster_command("run", "topologies/ring.toml"), env=cli_env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 == flat.returncode, done.stderr
    assert done.stdout.splitlines()[1] == flat.stdout.splitlines()[1]  # the digest line
    assert "on 4 processes (3 groups)" in done.stdout


def test_group_command_rejects_a_bad_tree(cli_env: dict[str, str], tmp_path: Path) -> None:
    tree = tmp_path / "tree.json"
    tree.write_text('{"p0": "not a list"}')
    env = dict(cli_env, HIOCLUSTER_CREDENTIALS='{"token": "00ff"}')
    done = subprocess.run(hiocluster_command("group", "--tree", str(tree), "--connect",
                                             "ipc:///nonexistent/x", "--name", "g1"),
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--tree: worker 'p0': expected a non-empty list of node names" in done.stderr


def test_readme_groups_example_runs_with_the_flat_digest() -> None:
    section = (REPO / "README.md").read_text().split("## Nested supervisors", 1)[1]
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    groups = block.split("[hosts.", 1)[0]  # no agent here: the tree on this host
    assert groups.startswith("[groups]")
    result = run(RING + "\n" + groups)
    assert result.groups == 2 and result.digest == run(RING).digest


def test_groups_ten_deep_give_the_flat_digest() -> None:
    """A chain of ten groups, one worker hanging off each of the first levels: the
    run directories are siblings, so ipc paths do not grow with the depth."""
    chain = "".join(f'g{i} = ["g{i + 1}"]\n' for i in range(1, 7))
    groups = f'\n[groups]\ng0 = ["p0", "g1"]\n{chain}g7 = ["p1", "g8"]\ng8 = ["g9"]\n' \
             'g9 = ["p2", "p3"]\n'
    ring = RING.replace("ticks = 200", "ticks = 40")  # the depth matters, not the length
    assert ring != RING
    result = run(ring + groups)
    assert result.groups == 10 and result.digest == run(ring).digest


def test_cli_sigkilled_with_nested_groups_leaves_no_process_or_file(
        tmp_path: Path, cli_env: dict[str, str], no_leaks: Path) -> None:
    """kill -9 of the CLI: the top group is an orphan, stops everything under it,
    and every run directory (root's, each group's) is removed by someone."""
    marks = tmp_path / "marks"
    marks.mkdir()
    nodes = {name: {"marker_dir": str(marks), "sleep": 0.01} for name in "abcd"}
    path = tmp_path / "deep.toml"
    path.write_text(ring_toml(nodes, {"p0": ["a"], "p1": ["b"], "p2": ["c"], "p3": ["d"]},
                              ticks=100_000) + DEEP)
    popen = subprocess.Popen(hiocluster_command("run", str(path)), env=cli_env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        cli = psutil.Process(popen.pid)

        def ticking() -> bool:
            assert popen.poll() is None, popen.stderr.read() if popen.stderr else ""
            return all((marks / f"{name}.ticking").exists() for name in "abcd")

        wait_until(ticking, 60, "the run to start ticking")
        tree = cli.children(recursive=True)
        # g1, g2, g3 and four workers (and the guardian of each run directory)
        assert len([process for process in tree if process.name() != "sh"]) == 7
        popen.kill()
        popen.wait(timeout=30)
        gone, alive = psutil.wait_procs(tree, timeout=30)
        assert alive == []
    finally:
        if popen.poll() is None:
            popen.kill()
        popen.communicate(timeout=30)
    left = sorted(str(p.relative_to(no_leaks)) for p in no_leaks.rglob("*"))
    assert left == [], f"left in the run root: {left}"
    for name in "abcd":  # every node still ran its exit contexts
        assert (marks / f"{name}.exit").read_text().split() in (["close", "exit"], ["exit"])
