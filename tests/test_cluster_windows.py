"""Windows, real-time pacing and workers started by hand.

The window size and the clock change how a run is paced, never what it
computes: every tick's digest is the same for --window 1, 7 and auto, and with
--real. A worker started by hand (``hiocluster worker``) joins a run exactly
like one the supervisor starts, and a real worker obeys a supervisor written
by hand from docs/protocol.md.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import zmq
from hypothesis import given, settings, strategies as st

from hiocluster import protocol as proto
from hiocluster.supervision import supervisor
from hiocluster.topology import load, loads
from hiocluster.runtime.transport import CREDENTIALS_ENV, Credentials

from conftest import REPO, hiocluster_command
from tests.faulty import mesh_toml

def run(topology: Any, **kwargs: Any) -> supervisor.RunResult:
    if isinstance(topology, str):
        topology = loads(topology)
    return supervisor.run(topology, app_dir=str(REPO), handle_signals=False, **kwargs)


@settings(max_examples=6, derandomize=True)
@given(nodes=st.integers(2, 5), capacity=st.integers(1, 5), seed=st.integers(0, 2**63 - 1),
       ticks=st.integers(5, 25), lag=st.sampled_from([None, 1, 2, 3, 8]),
       ring=st.booleans(), data=st.data())
def test_windows_never_change_a_digest(nodes: int, capacity: int, seed: int, ticks: int,
                                       lag: int | None, ring: bool,
                                       data: st.DataObject) -> None:
    topology = loads(mesh_toml("tests.faulty:Mixer", nodes, ticks=ticks, seed=seed,
                               capacity=capacity, lag=lag, ring=ring))
    processes = data.draw(st.integers(1, nodes), label="processes")
    reference = run(topology, processes=1, keep_digests=True)
    for window in (1, 7, None):
        result = run(topology, processes=processes, window=window, keep_digests=True)
        assert result.tick_digests == reference.tick_digests, window
        assert (result.messages, result.undelivered, result.unread) == (
            reference.messages, reference.undelivered, reference.unread)


def test_real_time_paces_ticks_to_the_wall_clock_and_changes_no_digest() -> None:
    topology = load(REPO / "topologies" / "ring.toml").replace(ticks=30, tock=0.02)
    reference = run(topology, keep_digests=True)
    paced = run(topology, real=True, keep_digests=True)
    assert paced.tick_digests == reference.tick_digests
    assert paced.real and not reference.real
    # tick n starts n x tock after one shared start: 29 tocks from tick 0 to tick 29
    assert paced.seconds >= 29 * 0.02
    assert 0 <= paced.late_ticks <= 30


def test_cli_real_reports_late_ticks(cli_env: dict[str, str], tmp_path: Path) -> None:
    fast = tmp_path / "ring.toml"
    fast.write_text((REPO / "topologies" / "ring.toml").read_text().replace(
        "tock = 1.0", "tock = 0.01"))
    started = time.monotonic()
    done = subprocess.run(hiocluster_command("run", str(fast), "--real", "--ticks", "50"),
                          cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started >= 49 * 0.01
    assert re.search(r"^late +\d+ ticks started more than one tock late$", done.stdout, re.M)


def test_a_worker_started_by_hand_joins_the_run(cli_env: dict[str, str]) -> None:
    reference = run(load(REPO / "topologies" / "ring.toml"))
    cli = subprocess.Popen(hiocluster_command("run", "topologies/ring.toml", "--json",
                                              "--transport", "tcp", "--external", "p1"),
                           cwd=REPO, env=cli_env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    worker = None
    try:
        assert cli.stderr is not None
        line = cli.stderr.readline()
        match = re.match(r"hiocluster: waiting for worker p1: (hiocluster worker .*)$", line)
        assert match, line
        argv = shlex.split(match[1])
        assert "--credentials" in argv and "secret" not in line
        env = {key: value for key, value in cli_env.items() if key != CREDENTIALS_ENV}
        worker = subprocess.Popen([sys.executable, "-m", "hiocluster", *argv[1:]], env=env,
                                  cwd="/")
        stdout, stderr = cli.communicate(timeout=60)
        assert worker.wait(timeout=30) == 0
    finally:
        for process in (cli, worker):
            if process is not None and process.poll() is None:
                process.kill()
                process.communicate()
    assert cli.returncode == 0, stderr
    assert json.loads(stdout)["digest"] == reference.digest


def test_worker_without_credentials_is_a_usage_error(cli_env: dict[str, str]) -> None:
    env = {key: value for key, value in cli_env.items() if key != CREDENTIALS_ENV}
    done = subprocess.run(hiocluster_command("worker", "--connect", "tcp://127.0.0.1:9",
                                             "--name", "p0"), env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "no usable credentials" in done.stderr


class HandSupervisor:
    """A supervisor written from docs/protocol.md: one ROUTER and a machine."""

    def __init__(self, tmp_path: Path) -> None:
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.address = f"ipc://{tmp_path}/control"
        self.router.bind(self.address)
        self.machine = proto.ParentMachine("w0")
        self.identity = b""

    def receive(self) -> proto.Message:
        assert self.router.poll(30_000), "the worker said nothing"
        self.identity, frame = self.router.recv_multipart()
        return self.machine.receive(frame)

    def send(self, message: proto.Message) -> None:
        self.router.send_multipart([self.identity, self.machine.send(message)])

    def close(self) -> None:
        self.router.close(linger=0)
        self.context.term()


def test_a_real_worker_told_error_runs_its_exits_and_answers(tmp_path: Path,
                                                             cli_env: dict[str, str]) -> None:
    boss = HandSupervisor(tmp_path)
    token = os.urandom(16)
    marks = tmp_path / "marks"
    marks.mkdir()
    worker = subprocess.Popen(hiocluster_command("worker", "--connect", boss.address,
                                                 "--name", "w0", "--app-dir", str(REPO)),
                              env=dict(cli_env, **{CREDENTIALS_ENV: Credentials(token).to_json()}))
    try:
        hello = boss.receive()
        assert isinstance(hello, proto.Hello) and hello.token == token
        assert hello.versions == proto.local_versions() and hello.worker == "w0"
        boss.send(proto.Setup(t0=0.0, tock=1.0, seed=1, ticks=10, real=False,
                              tick_timeout=10.0, peers={}, links=[],
                              nodes=[["a", "tests.faulty:FaultyNode",
                                      {"marker_dir": str(marks)}, None, None]]))
        ready = boss.receive()
        assert isinstance(ready, proto.Ready) and ready.digests.startswith(b"a")
        boss.send(proto.Grant(until=2))
        done = boss.receive()
        assert isinstance(done, proto.Done) and done.until == 2
        assert len(done.digests) == 3 * len(ready.digests)
        boss.send(proto.Error(code="bad-field", detail="a test says so", field="DONE.until"))
        answer = proto.decode(boss.router.recv_multipart()[1]) if boss.router.poll(30_000) \
            else None
        assert worker.wait(timeout=30) == 1
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        boss.close()
    assert isinstance(answer, proto.Error) and answer.code == "protocol"
    assert "a test says so" in answer.detail
    assert (marks / "a.exit").read_text().split() == ["close", "exit"]


def test_an_orphaned_external_worker_exits_and_removes_its_socket(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    boss = HandSupervisor(tmp_path)
    worker = subprocess.Popen(hiocluster_command("worker", "--connect", boss.address,
                                                 "--name", "w0", "--app-dir", str(REPO)),
                              env=dict(cli_env, **{CREDENTIALS_ENV: Credentials(b"ab").to_json()}))
    try:
        hello = boss.receive()
        assert isinstance(hello, proto.Hello)
        data_socket = Path(hello.data_address[len("ipc://"):])
        assert data_socket.exists()
        boss.close()                      # the supervisor vanishes
        assert worker.wait(timeout=30) == 3  # the orphan rule's exit code (protocol.md §9)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert not data_socket.exists()
    (tmp_path / "control").unlink(missing_ok=True)  # the hand supervisor's own file
