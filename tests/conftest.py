"""Shared fixtures: every test must leave no process and no run directory behind.

Two checks after each test:
1. no process is left below this pytest process, except multiprocessing's fork
   server and resource tracker (they live as long as this pytest process);
2. no process anywhere carries this test's HIOCLUSTER_TEST_TAG in its
   environment (catches orphans of `hiocluster` CLI subprocesses, re-parented away).
And the test's HIOCLUSTER_RUN_ROOT must be empty: every socket file removed.
"""

from __future__ import annotations

import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import zmq
from hypothesis import HealthCheck, settings
from zmq.utils.monitor import recv_monitor_message

from waiting import describe, exited

REPO = Path(__file__).resolve().parent.parent

# Property tests run real code on a shared 2-core machine: no per-example deadline
# (a slow moment is not a failure); examples stay few and bounded per test.
settings.register_profile("hiocluster", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("hiocluster")
#: How long leftovers get to finish exiting before they count as leaked (generous:
#: the suite runs on loaded machines; a test without leftovers never waits).
SETTLE_S = 30.0


def _forkserver_pid() -> int | None:
    return getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)


def _resource_tracker_pid() -> int | None:
    return getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None)


def _leftovers(tag: str) -> list[psutil.Process]:
    me = psutil.Process()
    # multiprocessing's helpers live as long as pytest; the first test that starts
    # them passes its tag on to them, so both checks exempt them
    exempt = {_forkserver_pid(), _resource_tracker_pid()} - {None}
    found = {p.pid: p for p in me.children(recursive=True) if p.pid not in exempt}
    for process in psutil.process_iter():
        if process.pid == me.pid or process.pid in found or process.pid in exempt:
            continue
        try:
            if process.environ().get("HIOCLUSTER_TEST_TAG") == tag:
                found[process.pid] = process
        except psutil.Error:
            continue
    return [process for process in found.values() if not exited(process)]


@pytest.fixture(autouse=True)
def no_leaks(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Give each test its own run root and tag; afterwards assert nothing is left."""
    tag = uuid.uuid4().hex
    run_root = Path(tmp_path_factory.mktemp("runs", numbered=True))
    monkeypatch.setenv("HIOCLUSTER_TEST_TAG", tag)
    monkeypatch.setenv("HIOCLUSTER_RUN_ROOT", str(run_root))
    # no progress lines in what the tests read of stderr (a run slowed by a busy
    # machine would print some); tests/test_cli.py turns them on to check them
    monkeypatch.setenv("HIOCLUSTER_PROGRESS_S", "0")
    # workers import node classes from test modules, which import this conftest
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    yield run_root
    deadline = time.monotonic() + SETTLE_S
    leftovers = _leftovers(tag)
    while leftovers and time.monotonic() < deadline:
        psutil.wait_procs(leftovers, timeout=0.2)
        leftovers = _leftovers(tag)
    described = [describe(process) for process in leftovers]
    for process in leftovers:  # clean up so one leak does not fail the next tests
        try:
            process.kill()
        except psutil.Error:
            pass
    assert not leftovers, f"processes left behind: {described}"
    remaining = sorted(str(p.relative_to(run_root)) for p in run_root.rglob("*"))
    assert not remaining, f"run directory entries left behind: {remaining}"


@pytest.fixture
def cli_env(no_leaks: Path) -> dict[str, str]:
    """Environment for running the `hiocluster` CLI as a subprocess from the repo root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    env.pop("COLUMNS", None)
    return env


def hiocluster_command(*args: str) -> list[str]:
    """argv that runs the CLI with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "hiocluster", *args]


def connect_ready(sock: zmq.Socket, address: str, timeout: float = 30.0) -> None:
    """Connect ``sock`` and wait until ZeroMQ's handshake with the peer is done.

    Frames sent afterwards are on their way into the peer's queue: tests that
    inject frames into a run synchronise on this, not on a sleep.
    """
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(address)
        assert monitor.poll(timeout * 1000), f"no ZeroMQ handshake with {address}"
        recv_monitor_message(monitor)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


@pytest.fixture
def tmpfs(tmp_path: Path):
    """Mount a small tmpfs (``options``) at a fresh directory; always unmounted."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        where = tmp_path / name
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=True, timeout=30)
