"""How a run starts and ends around its workers' processes, found by fault injection.

Signals to the whole process group, repeated runs in one Python process, a
stopped (SIGSTOP) worker, a worker that never joins, one that ignores STOP and
SIGTERM, failures over TCP: each ends the run cleanly, by its own deadline, with
nothing left behind (the ``no_leaks`` fixture checks processes and files).
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
from hiocluster.errors import NodeError, ProcessExited, RunFailed, TickTimeout
from hiocluster.topology import loads

from conftest import REPO, hiocluster_command
from tests.fake_worker import FAKE_COMMAND
from tests.faulty import ring_toml
from tests.waiting import wait_until


def run(text: str, **kwargs: Any) -> supervisor.RunResult:
    return supervisor.run(loads(text), app_dir=str(REPO), handle_signals=False, **kwargs)


def slow_ring(marks: Path, ticks: int = 100_000, **settings: Any) -> str:
    nodes = {name: {"marker_dir": str(marks), "sleep": 0.005} for name in "abc"}
    return ring_toml(nodes, {"p0": ["a"], "p1": ["b"], "p2": ["c"]}, ticks=ticks, **settings)


def start_cli(tmp_path: Path, cli_env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    marks = tmp_path / "marks"
    marks.mkdir()
    topology = tmp_path / "slow.toml"
    topology.write_text(slow_ring(marks))
    popen = subprocess.Popen(hiocluster_command("run", str(topology)), env=cli_env,
                             cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    cli = psutil.Process(popen.pid)

    def ticking() -> list[psutil.Process] | None:
        assert popen.poll() is None, popen.communicate()
        workers = [child for child in cli.children() if "worker" in child.cmdline()]
        if len(workers) == 3 and all((marks / f"{n}.ticking").exists() for n in "abc"):
            return workers
        return None
    popen.workers = wait_until(ticking, 60, "three ticking workers")  # type: ignore[attr-defined]
    return popen, marks


@pytest.mark.parametrize("targets", ["group", "every-process"])
def test_sigterm_to_the_run_exits_143_and_blames_nobody(tmp_path: Path,
                                                        cli_env: dict[str, str],
                                                        targets: str) -> None:
    """``kill -- -PGID`` (a shell, a terminal) reaches the CLI's process group only;
    systemd signals every process of the unit, so the workers get it too."""
    popen, marks = start_cli(tmp_path, cli_env)
    try:
        if targets == "group":
            os.killpg(popen.pid, signal.SIGTERM)
        else:
            for process in [psutil.Process(popen.pid), *popen.workers]:  # type: ignore
                process.send_signal(signal.SIGTERM)
        _, stderr = popen.communicate(timeout=30)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.communicate()
    assert popen.returncode == 143, stderr
    assert "interrupted by SIGTERM" in stderr and "failed" not in stderr, stderr
    if targets == "group":  # workers signalled directly leave through hio's exit only
        for name in "abc":
            assert (marks / f"{name}.exit").read_text().split() == ["close", "exit"], name


def test_repeated_runs_keep_file_descriptors_flat() -> None:
    text = ring_toml({name: {} for name in "abcd"},
                     {"p0": ["a"], "p1": ["b"], "p2": ["c"], "p3": ["d"]}, ticks=5)
    me = psutil.Process()
    run(text)  # warm-up: imports, caches
    before = me.num_fds()
    digests = {run(text).digest for _ in range(12)}
    assert len(digests) == 1
    assert me.num_fds() <= before + 2, f"{before} -> {me.num_fds()} file descriptors"


def test_a_stopped_worker_ends_the_run_soon_after_its_deadline(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    found: list[supervisor.Supervisor] = []
    stopped: list[int] = []

    def on_tick(done: int, total: int) -> None:
        if done >= 20 and not stopped:
            handle = found[0].children["p1"].handle
            assert handle is not None and handle.pid is not None
            os.kill(handle.pid, signal.SIGSTOP)
            stopped.append(handle.pid)

    # only the tick deadline can end it: without one the run would hang (pytest-timeout)
    with pytest.raises(TickTimeout) as info:
        run(slow_ring(marks, tick_timeout=1.0), on_ready=found.append, on_tick=on_tick)
    assert info.value.worker == "p1" and info.value.nodes == ("b",)
    assert "silent" in info.value.cause and "killed" in info.value.cause
    assert "past the 1 s tick deadline" in info.value.cause, info.value.cause
    for name in "ac":  # the others were stopped cleanly, not blamed
        assert (marks / f"{name}.exit").read_text().split() == ["close", "exit"], name


def test_a_worker_that_never_joins_times_out_start_up(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_WORKER", f"p1:silent:{tmp_path / 'fake.json'}")
    # the fake sleeps 60 s: the deadline ends it. The real workers p0 and p2 must say
    # HELLO before it, so it leaves room for a Python start-up on a loaded machine
    with pytest.raises(TickTimeout) as info:
        run(ring_toml({name: {} for name in "abc"}, {"p0": ["a"], "p1": ["b"], "p2": ["c"]}),
            worker_command=FAKE_COMMAND, start_timeout=10.0)
    assert (info.value.worker, info.value.tick) == ("p1", None)
    assert "no HELLO within 10 s" in info.value.cause


def test_a_worker_deaf_to_stop_and_sigterm_is_killed(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_WORKER", f"p1:deaf:{tmp_path / 'fake.json'}")
    found: list[supervisor.Supervisor] = []
    text = ring_toml({"a": {"fail_at": 0, "fail": "raise"}, "b": {}, "c": {}},
                     {"p0": ["a"], "p1": ["b"], "p2": ["c"]}, tick_timeout=30.0)
    with pytest.raises(NodeError) as info:  # the fake waits for ever: only a kill ends it
        run(text, worker_command=FAKE_COMMAND, stop_timeout=1.0, kill_grace=0.5,
            on_listening=found.append)
    assert info.value.worker == "p0"   # the deaf one is not blamed for the failure
    assert found[0].children["p1"].exitcode == -signal.SIGKILL  # it ignores SIGTERM


@pytest.mark.parametrize("fault, kind", [("raise", NodeError), ("sigkill", ProcessExited)])
def test_failures_over_tcp_are_as_loud_as_over_ipc(fault: str, kind: type) -> None:
    text = ring_toml({"a": {}, "bad": {"fail_at": 3, "fail": fault}, "c": {}},
                     {"p0": ["a"], "p1": ["bad"], "p2": ["c"]})
    with pytest.raises(RunFailed) as info:
        run(text, transport="tcp")
    assert type(info.value) is kind
    assert (info.value.worker, info.value.tick) == ("p1", 3)
