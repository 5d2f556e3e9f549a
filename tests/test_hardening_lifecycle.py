"""Start-up, shutdown and clean-up of local runs, at any moment.

* kill -9 of the CLI at any moment of its start-up (or later) leaves no process
  and no file once its workers are gone: a worker or group whose parent is gone
  leaves at once, and the run directory's guardian removes what is left;
* SIGINT to the CLI's process group at any moment ends it with exit code 130
  and one line on stderr, never by the signal itself or with a traceback;
* survivors of a killed worker stop by themselves as soon as STOP arrives;
* ``--transport tcp`` binds no unix socket for its control endpoint;
* a group is called a group in what is said about it.

Moments are either delays after the launch (parametrised: on a loaded machine
a delay lands anywhere) or events (the run directory is made, the first child
runs, every child runs): the assertion is about the outcome, whatever the moment.
The autouse ``no_leaks`` fixture (conftest.py) checks the processes and the run
root after each test; the tests here also wait for it (generously) themselves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest

from hiocluster.supervision import supervisor
from hiocluster.errors import ProcessExited, RunFailed
from hiocluster.topology import loads

from conftest import REPO, hiocluster_command
from tests.faulty import ring_toml
from tests.waiting import wait_until

DEEP = '\n[groups]\ng1 = ["p0", "g2"]\ng2 = ["p1", "g3"]\ng3 = ["p2", "p3"]\n'
#: Generous: the suite runs on loaded 2-core machines.
GONE_S = 20.0


def _topology(tmp_path: Path, tree: str) -> Path:
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    nodes = {name: {"sleep": 0.005, "marker_dir": str(marks)} for name in "abcd"}
    text = ring_toml(nodes, {"p0": ["a"], "p1": ["b"], "p2": ["c"], "p3": ["d"]},
                     ticks=100_000) + (DEEP if tree == "deep" else "")
    path = tmp_path / f"{tree}.toml"
    path.write_text(text)
    return path


def _tagged(tag: str) -> list[psutil.Process]:
    """Every live process of this test (they carry its tag in their environment)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("HIOCLUSTER_TEST_TAG") == tag and \
                    process.status() != psutil.STATUS_ZOMBIE and process.pid != os.getpid():
                found.append(process)
        except psutil.Error:
            continue
    return found


def _entries(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def _nothing_left(root: Path) -> Callable[[], bool]:
    tag = os.environ["HIOCLUSTER_TEST_TAG"]
    return lambda: not _tagged(tag) and not _entries(root)


def _children(popen: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(popen.pid).children(recursive=True)
    except psutil.Error:
        return []


def _started(popen: subprocess.Popen) -> int:
    """How many workers and groups the CLI started so far."""
    count = 0
    for child in _children(popen):
        try:
            count += "hiocluster" in " ".join(child.cmdline())
        except psutil.Error:
            continue
    return count


#: Moments of a start-up: events, or delays after the launch (seconds).
EVENTS: dict[str, Callable[[subprocess.Popen, Path, Path], Any]] = {
    "run-dir": lambda popen, root, marks: any(root.iterdir()),
    "first-child": lambda popen, root, marks: _started(popen) >= 1,
    "all-children": lambda popen, root, marks: _started(popen) >= 4,
    "ticking": lambda popen, root, marks: any(marks.glob("*.ticking")),
}
MOMENTS = [0.05, 0.1, 0.3, 1.0, *EVENTS]


def _launch(tmp_path: Path, cli_env: dict[str, str], tree: str) -> subprocess.Popen:
    topology = _topology(tmp_path, tree)
    # its own process group, as a shell would start it: the group is signalled
    return subprocess.Popen(hiocluster_command("run", str(topology)), env=cli_env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _at(moment: float | str, popen: subprocess.Popen, root: Path, marks: Path) -> None:
    if isinstance(moment, float):
        time.sleep(moment)  # the moment itself is what is tested: any one will do
        return
    event = EVENTS[moment]
    wait_until(lambda: popen.poll() is not None or event(popen, root, marks), timeout=60,
               what=f"the run's start-up to reach {moment}")
    assert popen.poll() is None, popen.communicate()[1]


@pytest.mark.parametrize("tree", ["flat", "deep"])
@pytest.mark.parametrize("moment", MOMENTS, ids=str)
def test_cli_killed_at_any_moment_leaves_nothing(tmp_path: Path, cli_env: dict[str, str],
                                                 no_leaks: Path, moment: float | str,
                                                 tree: str) -> None:
    popen = _launch(tmp_path, cli_env, tree)
    try:
        _at(moment, popen, no_leaks, tmp_path / "marks")
        popen.kill()
        popen.wait(timeout=30)
        wait_until(_nothing_left(no_leaks), timeout=GONE_S,
                   what="every process and file of the killed run to be gone")
    finally:
        if popen.poll() is None:
            popen.kill()
        popen.communicate(timeout=30)


def _catches_sigterm(popen: subprocess.Popen) -> bool:
    """Whether the CLI has a handler for SIGTERM: hiocluster's own code runs (Python
    catches SIGINT from its start-up on; a SIGINT while it imports ``site`` is
    CPython's own fatal error, before any code of ours)."""
    with open(f"/proc/{popen.pid}/status") as status:
        caught = next(line for line in status if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


#: A node module whose import takes long (the first time): the CLI is in the middle
#: of importing the topology's classes, before its run has signal handlers.
SLOW_IMPORT = """
import os, time
from pathlib import Path
from tests.faulty import FaultyNode as SlowNode
mark = Path(__file__).with_name("importing")
if not mark.exists():
    mark.write_text(str(os.getpid()))
    time.sleep(30)  # a heavy import; interrupted by the test
"""

BROKEN_IMPORT = """
import os, time
from pathlib import Path
from tests.faulty import FaultyNode as SlowNode
Path(__file__).with_name("importing").write_text(str(os.getpid()))
try:
    time.sleep(30)  # interrupted by the test
except KeyboardInterrupt:
    raise KeyError("what an import machinery left broken by an interrupt raises")
"""


def _start(tmp_path: Path, cli_env: dict[str, str], tree: str,
           module: str | None) -> subprocess.Popen[str]:
    """`hiocluster run` of the ``tree`` topology in its own process group; with
    ``module``, its nodes' class is imported from that module's text."""
    topology = _topology(tmp_path, tree)
    if module is not None:
        (tmp_path / "slow_import.py").write_text(module)
        topology.write_text(topology.read_text().replace('"tests.faulty:FaultyNode"',
                                                         '"slow_import:SlowNode"'))
    return subprocess.Popen(hiocluster_command("run", str(topology), "--app-dir",
                                               str(tmp_path)),
                            env=cli_env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _importing(tmp_path: Path, popen: subprocess.Popen[str]) -> None:
    wait_until(lambda: (tmp_path / "importing").exists() or popen.poll() is not None,
               timeout=60, what="the CLI to import the node classes")


@pytest.mark.parametrize("tree", ["flat", "deep"])
@pytest.mark.parametrize("moment", [0.05, 0.1, 0.3, 1.0, "importing-nodes",
                                    "importing-broken", *EVENTS],
                         ids=str)
def test_sigint_to_the_process_group_at_any_moment_exits_130(
        tmp_path: Path, cli_env: dict[str, str], no_leaks: Path, moment: float | str,
        tree: str) -> None:
    """Ctrl-C at any moment once hiocluster runs: exit code 130, one line on stderr,
    nothing left (children in the same process group get it too). Delays count
    from the moment hiocluster's code runs (its handlers are the first thing)."""
    # importing-broken: an interrupt that Python's import machinery, interrupted in a
    # module lock, turns into a KeyError: the signal was written down, it still is one
    popen = _start(tmp_path, cli_env, tree, {"importing-nodes": SLOW_IMPORT,
                                             "importing-broken": BROKEN_IMPORT}.get(str(moment)))
    try:
        if str(moment).startswith("importing"):
            _importing(tmp_path, popen)
        elif isinstance(moment, float):
            wait_until(lambda: popen.poll() is not None or _catches_sigterm(popen),
                       timeout=60, what="hiocluster's code to run")
            time.sleep(moment)  # the moment itself is what is tested: any one will do
        else:
            _at(moment, popen, no_leaks, tmp_path / "marks")
        os.killpg(popen.pid, signal.SIGINT)
        _, stderr = popen.communicate(timeout=60)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.communicate(timeout=30)
    assert popen.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("hiocluster:")]
    assert len(lines) == 1 and "interrupted by SIGINT" in lines[0], stderr
    wait_until(_nothing_left(no_leaks), timeout=GONE_S,
               what="every process and file of the interrupted run to be gone")


#: Runs the command as ``python -m hiocluster`` does, with a real SIGINT arriving
#: while it imports its own modules (here: as ``hiocluster.cli`` is imported).
INTERRUPTED_IMPORT = """
import importlib.abc, os, runpy, signal, sys

class Interrupting(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "hiocluster.cli":
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Interrupting())
sys.argv = ["hiocluster", "check", "topologies/ring.toml"]
runpy.run_module("hiocluster", run_name="__main__", alter_sys=True)
"""


def test_sigint_while_hiocluster_imports_itself_exits_130(cli_env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT], env=cli_env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "hiocluster: interrupted by SIGINT", done.stderr


# -- a killed worker: its survivors stop by themselves ------------------------------------


@pytest.mark.parametrize("window", [1, None], ids=["window-1", "auto"])
def test_survivors_of_a_killed_worker_stop_by_themselves(window: int | None) -> None:
    """kill -9 of one worker: the others stop as soon as STOP arrives, whatever they
    were waiting on (a neighbour's frame, the next GRANT), and exit 0 after their
    BYE; none is left for the supervisor to SIGTERM after its grace."""
    nodes = {name: {"sleep": 0.001} for name in "abcd"}
    nodes["b"]["fail_at"], nodes["b"]["fail"] = 30, "sigkill"
    text = ring_toml(nodes, ticks=100_000)  # a worker per node
    found: list[supervisor.Supervisor] = []
    for _ in range(3):  # the stuck survivor was one of three trials with automatic windows
        with pytest.raises(ProcessExited) as caught:
            supervisor.run(loads(text), app_dir=str(REPO), handle_signals=False,
                           window=window, on_ready=found.append)
        assert caught.value.worker == "b" and caught.value.cause == "signal SIGKILL"
        codes = {name: child.exitcode for name, child in found[-1].children.items()}
        assert codes == {"a": 0, "b": -signal.SIGKILL, "c": 0, "d": 0}, codes


# -- what is said about a group --------------------------------------------------------------


@pytest.mark.parametrize("victim", ["g1", "g2"])
def test_a_killed_group_is_called_a_group(victim: str) -> None:
    """A group's process that dies is reported as ``group NAME``, at the top of the
    tree or deeper (where its parent group tells the root)."""
    text = ring_toml({name: {"sleep": 0.002} for name in "abcd"},
                     {"p0": ["a"], "p1": ["b"], "p2": ["c"], "p3": ["d"]},
                     ticks=100_000) + DEEP
    found: list[supervisor.Supervisor] = []
    killed: list[int] = []

    def on_tick(done: int, total: int) -> None:
        if done >= 5 and not killed:
            handle = found[0].children["g1"].handle
            assert handle is not None and handle.pid is not None
            pid = handle.pid
            if victim == "g2":  # g1's child running `hiocluster group ... --name g2`
                pid = next(child.pid for child in psutil.Process(pid).children()
                           if "g2" in child.cmdline())
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    with pytest.raises(RunFailed) as caught:
        supervisor.run(loads(text), app_dir=str(REPO), handle_signals=False,
                       on_ready=found.append, on_tick=on_tick)
    assert caught.value.worker == victim and caught.value.kind == "group"
    assert str(caught.value).startswith(f"group {victim} (node "), str(caught.value)
    assert "worker g" not in str(caught.value)


# -- --transport tcp: no unix path for the control endpoint ----------------------------------


def test_a_tcp_run_binds_no_unix_socket_and_status_still_finds_it(
        tmp_path: Path, cli_env: dict[str, str], no_leaks: Path) -> None:
    """Under a run root too long for a unix socket path, a tcp run still runs: its
    control endpoint is tcp (CURVE; its keys in the run directory), and ``status``
    finds and reaches it; ``stop`` stops it."""
    root = no_leaks / ("r" * 90)
    root.mkdir()
    env = dict(cli_env, HIOCLUSTER_RUN_ROOT=str(root))
    topology = _topology(tmp_path, "flat")
    popen = subprocess.Popen(hiocluster_command("run", str(topology), "--transport", "tcp"),
                             env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: popen.poll() is not None or
                   any((tmp_path / "marks").glob("*.ticking")), timeout=60,
                   what="the tcp run to tick")
        assert popen.poll() is None, popen.communicate()[1]
        sockets = [path for path in root.rglob("*") if path.is_socket()]
        assert sockets == []
        status = subprocess.run(hiocluster_command("status", "--json"), env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        answer = json.loads(status.stdout)
        assert answer["control"].startswith("tcp://127.0.0.1:")
        assert answer["simulation"]["ticks"] == 100_000
        stop = subprocess.run(hiocluster_command("stop"), env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0, stop.stderr
        _, stderr = popen.communicate(timeout=60)
        assert popen.returncode == 143, stderr
        assert "ipc path too long" not in stderr
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.communicate(timeout=30)
        wait_until(lambda: not any(root.iterdir()), timeout=GONE_S,
                   what="the run directory to be removed")
        root.rmdir()

