"""Whole-cluster failure scenarios (docs/design.md, invariants 4-6): loud and clean.

A node that raises, a worker process that is killed or exits, a node that hangs
past the tick deadline, a class that does not exist, a payload that cannot be
sent: each must stop the run with an error naming worker, node(s), tick and cause,
while every other node still runs its hio exit contexts. The CLI must leave no
orphan when it is SIGKILLed, and exit 130/143 cleanly on SIGINT/SIGTERM.

The autouse ``no_leaks`` fixture (conftest.py) checks that no process and no
run-directory entry is left after each test.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from hiocluster.supervision import supervisor
from hiocluster.errors import (Interrupted, NodeError, ProcessExited, RunFailed, TickTimeout,
                               TopologyError)
from hiocluster.topology import loads, resolve_classes

from conftest import REPO, hiocluster_command
from tests.faulty import ring_toml
from tests.waiting import exited, wait_until


def run_failing(text: str, **kwargs: Any) -> RunFailed:
    """Run the topology and return the RunFailed it must raise."""
    with pytest.raises(RunFailed) as info:
        supervisor.run(loads(text), app_dir=str(REPO), handle_signals=False, **kwargs)
    return info.value


def exit_lines(marker_dir: Path, name: str) -> list[str]:
    path = marker_dir / f"{name}.exit"
    return path.read_text().split() if path.exists() else []


def assert_exited_cleanly(marker_dir: Path, names: list[str]) -> None:
    """Each node ran hio's close and exit contexts (forced close by Doist.exit)."""
    for name in names:
        lines = exit_lines(marker_dir, name)
        assert lines == ["close", "exit"], f"{name} exit contexts: {lines}"


# -- a node raises ------------------------------------------------------------


def test_node_raise_names_worker_node_tick_and_cause(tmp_path: Path) -> None:
    marks = str(tmp_path)
    text = ring_toml({"bad": {"marker_dir": marks, "fail_at": 5, "fail": "raise"},
                      "buddy": {"marker_dir": marks}, "c": {"marker_dir": marks},
                      "d": {"marker_dir": marks}},
                     {"p0": ["bad", "buddy"], "p1": ["c"], "p2": ["d"]})
    error = run_failing(text)
    assert type(error) is NodeError
    assert error.worker == "p0"
    assert error.nodes == ("bad",)
    assert error.tick == 5
    assert "boom" in error.cause and "ValueError" in error.cause
    assert 'File "' in error.detail and "faulty.py" in error.detail  # traceback lines
    assert "in _fault" in error.detail and error.detail.rstrip().endswith("ValueError: boom")
    assert "worker p0 (node bad) failed at tick 5" in str(error)
    # every other node ran its exit contexts, the co-located buddy included
    assert_exited_cleanly(tmp_path, ["buddy", "c", "d"])
    # the failing node itself was aborted by hio, then exited
    assert exit_lines(tmp_path, "bad") == ["abort", "ValueError", "exit"]


def test_node_raise_at_tick_0_reports_tick_0() -> None:
    error = run_failing(ring_toml({"a": {}, "bad": {"fail_at": 0, "fail": "raise"}}))
    assert type(error) is NodeError
    assert (error.worker, error.nodes, error.tick) == ("bad", ("bad",), 0)
    assert "failed at tick 0" in str(error)


def test_node_raise_in_setup_fails_start_up(tmp_path: Path) -> None:
    marks = str(tmp_path)
    text = ring_toml({"a": {"marker_dir": marks}, "bad": {"fail_at": "setup"},
                      "b": {"marker_dir": marks}}, {"p0": ["a"], "p1": ["bad", "b"]})
    error = run_failing(text)
    assert type(error) is NodeError
    assert (error.worker, error.nodes, error.tick) == ("p1", ("bad",), None)
    assert "boom in setup" in error.cause
    assert "faulty.py" in error.detail
    assert "failed at start-up" in str(error)
    assert_exited_cleanly(tmp_path, ["a"])  # entered in its own process, so exited


# -- a worker process dies ---------------------------------------------------------


def test_worker_sigkilled_reports_signal_and_its_nodes(tmp_path: Path) -> None:
    marks = str(tmp_path)
    text = ring_toml({"a": {"marker_dir": marks}, "killer": {"marker_dir": marks, "fail_at": 3,
                                                               "fail": "sigkill"},
                      "mate": {"marker_dir": marks}, "b": {"marker_dir": marks}},
                     {"p0": ["a"], "p1": ["killer", "mate"], "p2": ["b"]})
    error = run_failing(text)
    assert type(error) is ProcessExited
    assert error.exitcode == -9
    assert "SIGKILL" in error.cause
    assert error.worker == "p1"
    assert error.nodes == ("killer", "mate")
    assert error.tick == 3
    assert_exited_cleanly(tmp_path, ["a", "b"])
    assert not (tmp_path / "killer.exit").exists() and not (tmp_path / "mate.exit").exists()


def test_worker_exit_code_is_reported(tmp_path: Path) -> None:
    marks = str(tmp_path)
    text = ring_toml({"a": {"marker_dir": marks},
                      "quitter": {"marker_dir": marks, "fail_at": 2, "fail": "exit7"}})
    error = run_failing(text)
    assert type(error) is ProcessExited
    assert error.exitcode == 7
    assert error.cause == "exit code 7"
    assert error.worker == "quitter" and error.nodes == ("quitter",)
    assert error.tick == 2
    assert_exited_cleanly(tmp_path, ["a"])


# -- a node hangs -----------------------------------------------------------------


def test_hung_node_times_out_the_tick(tmp_path: Path) -> None:
    marks = str(tmp_path)
    text = ring_toml({"a": {"marker_dir": marks},
                      "sleeper": {"marker_dir": marks, "fail_at": 2, "fail": "hang"},
                      "b": {"marker_dir": marks}},
                     {"p0": ["a"], "p1": ["sleeper"], "p2": ["b"]}, tick_timeout=1.5)
    error = run_failing(text)  # the node sleeps 60 s: the 1.5 s deadline ends the run
    assert type(error) is TickTimeout
    assert error.worker == "p1"
    assert error.nodes == ("sleeper",)
    assert error.tick == 2
    assert "1.5 s" in error.cause
    assert "TickOverrun" in error.detail and "in _fault" in error.detail  # where it hung
    assert_exited_cleanly(tmp_path, ["a", "b"])
    # the worker's watchdog interrupted the hung node, which still left through hio's exit
    assert exit_lines(tmp_path, "sleeper") == ["exit"]


# -- start-up failures --------------------------------------------------------------


def test_missing_class_fails_start_up_naming_the_node() -> None:
    text = ring_toml({"a": {}, "ghost": {"class": "tests.faulty:NoSuchNode"}, "b": {}})
    error = run_failing(text, check_classes=False)  # the workers' own check
    assert type(error) is NodeError
    assert error.worker == "ghost"
    assert error.nodes == ("ghost",)
    assert error.tick is None
    assert "NoSuchNode" in error.cause
    assert "start-up" in str(error)


def test_missing_module_fails_start_up_naming_the_node() -> None:
    text = ring_toml({"a": {}, "ghost": {"class": "tests.no_such_module:Node"}},
                     {"p0": ["a", "ghost"]})
    error = run_failing(text, check_classes=False)  # the workers' own check
    assert type(error) is NodeError
    assert error.worker == "p0"
    assert error.nodes == ("ghost",)
    assert error.tick is None
    assert "tests.no_such_module" in error.cause and "not found" in error.cause


def test_resolve_classes_catches_a_missing_class_first() -> None:
    text = ring_toml({"a": {}, "ghost": {"class": "tests.faulty:NoSuchNode"}})
    with pytest.raises(TopologyError) as info:
        resolve_classes(loads(text), app_dir=str(REPO))
    assert info.value.key_path == "nodes.ghost.class"
    assert "NoSuchNode" in info.value.message
    assert info.value.line == text.splitlines().index("[nodes.ghost]") + 2


def test_a_box_the_node_lacks_is_named_with_the_boxes_it_has(tmp_path: Path) -> None:
    text = ring_toml({"bad": {"fail_at": 3, "fail": "nobox"}, "c": {}}, {"p0": ["bad", "c"]})
    error = run_failing(text)
    assert type(error) is NodeError and error.nodes == ("bad",) and error.tick == 3
    assert "node bad has no outbox 'north' (its outboxes: 'out';" in error.cause, error.cause


# -- an unsendable payload ------------------------------------------------------------


@pytest.mark.parametrize("placement", [None, {"p0": ["a", "sender", "z"]}],
                         ids=["cross-process", "in-process"])
def test_unsendable_payload_names_source_node_and_link(
        tmp_path: Path, placement: dict[str, list[str]] | None) -> None:
    marks = str(tmp_path)
    text = ring_toml({"a": {"marker_dir": marks},
                      "sender": {"marker_dir": marks, "fail_at": 4, "fail": "unsendable"},
                      "z": {"marker_dir": marks}}, placement)
    error = run_failing(text)
    assert type(error) is NodeError
    assert error.nodes == ("sender",)
    assert error.worker == ("p0" if placement else "sender")
    assert error.tick == 4
    assert "sender.out -> z.in" in error.cause
    assert_exited_cleanly(tmp_path, ["a", "z"])


# -- the CLI: orphans and signals -------------------------------------------------------


def _workers_of(cli: psutil.Process) -> list[psutil.Process]:
    """The worker processes of a CLI run: its children running ``hiocluster worker``."""
    workers = []
    for child in cli.children():
        try:
            if "worker" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                workers.append(child)
        except psutil.Error:
            continue
    return workers




def _slow_ring(tmp_path: Path, marks: Path) -> Path:
    nodes = {name: {"marker_dir": str(marks), "sleep": 0.01} for name in ("a", "b", "c")}
    path = tmp_path / "slow.toml"
    path.write_text(ring_toml(nodes, {"p0": ["a"], "p1": ["b"], "p2": ["c"]}, ticks=100000))
    return path


def _start_cli(tmp_path: Path, cli_env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    marks = tmp_path / "marks"
    marks.mkdir()
    topology = _slow_ring(tmp_path, marks)
    command = hiocluster_command("run", str(topology), "--ticks", "100000")
    popen = subprocess.Popen(command, env=cli_env, cwd=str(REPO), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    return popen, marks


def _wait_ticking(popen: subprocess.Popen, marks: Path) -> list[psutil.Process]:
    cli = psutil.Process(popen.pid)

    def ready() -> list[psutil.Process] | None:
        if popen.poll() is not None:
            raise AssertionError(f"CLI exited early ({popen.returncode}): "
                                 f"{popen.stderr.read() if popen.stderr else ''}")
        workers = _workers_of(cli)
        ticking = all((marks / f"{name}.ticking").exists() for name in "abc")
        return workers if len(workers) == 3 and ticking else None
    return wait_until(ready, 60, "3 ticking workers")


def _finish(popen: subprocess.Popen) -> None:
    """Kill the CLI if it still runs and reap it. Its pipes are closed, not read to
    their end: after a kill -9 the orphans hold them until the kernel ends them."""
    if popen.poll() is None:
        popen.kill()
    popen.wait(timeout=30)
    for pipe in (popen.stdout, popen.stderr):
        if pipe is not None:
            pipe.close()


def _sigkill_cli_and_wait_for_workers(popen: subprocess.Popen, marks: Path) -> None:
    workers = _wait_ticking(popen, marks)
    popen.send_signal(signal.SIGKILL)
    popen.wait(timeout=30)
    # orphans leave 0.2 s after their control connection dropped (docs/protocol.md §9);
    # without that rule they would wait for a GRANT for ever: a generous bound suffices
    wait_until(lambda: all(exited(w) for w in workers), 30,
               "workers to exit after the supervisor vanished")


def test_cli_failed_run_exits_1_with_the_failure_in_json(tmp_path: Path,
                                                         cli_env: dict[str, str]) -> None:
    path = tmp_path / "failing.toml"
    path.write_text(ring_toml({"a": {}, "bad": {"fail_at": 3, "fail": "raise"}},
                              {"p0": ["a"], "p1": ["bad"]}))
    done = subprocess.run(hiocluster_command("run", str(path), "--json"), env=cli_env,
                          cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["type"] == "NodeError"
    assert (error["worker"], error["nodes"], error["tick"]) == ("p1", ["bad"], 3)
    assert "boom" in error["cause"]
    assert "worker p1 (node bad) failed at tick 3" in done.stderr


def test_cli_sigkilled_leaves_no_orphan(tmp_path: Path, cli_env: dict[str, str],
                                        no_leaks: Path) -> None:
    popen, marks = _start_cli(tmp_path, cli_env)
    try:
        _sigkill_cli_and_wait_for_workers(popen, marks)
    finally:
        _finish(popen)
        # the orphans remove the run directory; that is checked by
        # test_cli_sigkilled_orphans_remove_the_run_directory
        for entry in no_leaks.iterdir():
            shutil.rmtree(entry, ignore_errors=True)
    for name in "abc":  # orphans still ran their exit contexts: "close" too unless
        # the watchdog's SIGTERM landed inside the node's own step (hio then runs exit only)
        assert (marks / f"{name}.exit").read_text().split() in (["close", "exit"], ["exit"])


def test_cli_sigkilled_leaves_nothing_in_the_temp_dir(tmp_path: Path,
                                                     cli_env: dict[str, str]) -> None:
    """After kill -9 of the CLI, the orphans remove the run directory (control and
    data sockets, token) from the temp dir, and nothing else was ever put there."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = dict(cli_env, TMPDIR=str(temp))
    env.pop("HIOCLUSTER_RUN_ROOT")  # the run directory goes in the temp dir itself
    popen, marks = _start_cli(tmp_path, env)
    try:
        _sigkill_cli_and_wait_for_workers(popen, marks)
        left = sorted(str(p.relative_to(temp)) for p in temp.rglob("*"))
    finally:
        _finish(popen)
        shutil.rmtree(temp, ignore_errors=True)
    assert left == [], f"left in the temp dir by the orphans: {left}"


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_cli_signal_stops_cleanly(tmp_path: Path, cli_env: dict[str, str], signum: int,
                                  code: int) -> None:
    popen, marks = _start_cli(tmp_path, cli_env)
    try:
        _wait_ticking(popen, marks)
        popen.send_signal(signum)
        _, stderr = popen.communicate(timeout=30)
    finally:
        _finish(popen)
    assert popen.returncode == code, stderr
    assert f"interrupted by {signal.Signals(signum).name}" in stderr, stderr
    for name in "abc":
        assert (marks / f"{name}.exit").read_text().split() == ["close", "exit"], name


@pytest.mark.parametrize("window", [1, None], ids=["window-1", "auto"])
def test_interrupt_from_the_api_stops_cleanly(tmp_path: Path, window: int | None) -> None:
    """Supervisor.interrupt (what the SIGINT/SIGTERM handlers call) stops every
    worker through its exit contexts and raises Interrupted; no result. With
    ``--window 1`` no worker runs a tick past the one being supervised."""
    marks = tmp_path / "marks"
    marks.mkdir()
    text = ring_toml({name: {"marker_dir": str(marks), "sleep": 0.002} for name in "abc"},
                     {"p0": ["a"], "p1": ["b", "c"]}, ticks=100_000)
    found: list[supervisor.Supervisor] = []
    ticks: list[int] = []
    stopped: list[int] = []

    def on_tick(done: int, total: int) -> None:
        ticks.append(done)
        if done >= 7 and not stopped:
            stopped.append(done)
            found[0].interrupt(signal.SIGTERM)

    with pytest.raises(Interrupted) as info:  # not the 100,000 ticks' end
        supervisor.run(loads(text), app_dir=str(REPO), handle_signals=False, window=window,
                       on_ready=found.append, on_tick=on_tick)
    assert info.value.signal == signal.SIGTERM
    if window == 1:  # at most the tick already granted ran after the interrupt
        assert ticks[-1] <= stopped[0] + 1, (stopped, ticks[-3:])
    assert found[0].result is None
    assert_exited_cleanly(marks, list("abc"))
