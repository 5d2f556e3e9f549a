"""Agents and hosts under hostile or broken conditions (network namespaces).

Keys are made compose-style: every host holds every public key.

* Keys have roles: an agent takes LAUNCH only from the supervisor keys it was
  told to trust (``--trust``), never from another agent's key or a worker's.
* A host whose agent is not there (not running, or listening elsewhere) fails
  the run at once, naming host and address, not at the start-up deadline; an
  agent whose named address is loopback says so.
* Nothing is left on a host when its agent, or a group placed on it, is
  killed with SIGKILL: orphans clean up even with their stderr pipe gone, and a
  restarted agent sweeps what a dead one left.

These tests need root (they skip with the reason otherwise; CI runs as root).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from hiocluster import protocol as proto
from hiocluster.supervision import supervisor
from hiocluster.errors import ProcessExited, RunFailed
from hiocluster.topology import ServiceSpec, Topology, loads
from hiocluster.runtime.transport import Credentials, KeyPair

from conftest import REPO, hiocluster_command
from tests.faulty import ring_toml
from tests.netns import Hosts, skip_reason
from tests.test_cluster_hosts import keys, spread  # noqa: F401 (keys: a fixture)
from tests.waiting import wait_until

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


def ring(placement: dict[str, list[str]], groups: str = "", ticks: int = 100_000,
         marks: Path | None = None) -> Topology:
    """A ring of slow nodes (one per letter of the placement's lists), leaving
    ``<node>.ticking`` in ``marks`` once they tick."""
    nodes = {name: {"sleep": 0.005, **({"marker_dir": str(marks)} if marks else {})}
             for names in placement.values() for name in names}
    return loads(ring_toml(nodes, placement, ticks=ticks, tick_timeout=30.0) + groups)


def run(topology: Topology, keys: Path, **kwargs: Any) -> supervisor.RunResult:
    return supervisor.run(topology, app_dir=str(REPO), handle_signals=False, keys=str(keys),
                          **kwargs)


# -- 1. keys have roles ------------------------------------------------------------------

def _monitor_until_handshake(sock: zmq.Socket, monitor: zmq.Socket, address: str) -> str:
    sock.connect(address)
    assert monitor.poll(30_000), "no handshake result within 30 s"
    event = recv_monitor_message(monitor)["event"]
    return "accepted" if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else "refused"


def launch_as(pair: KeyPair, agent_public: str, address: str,
              service: str | None = None) -> tuple[str, list[Any]]:
    """Connect to the agent at ``address`` with ``pair`` and send it a LAUNCH (of a
    worker whose supervisor does not exist; with ``service``, a replica of that
    service as JSON); return whether the handshake went through and the agent's
    answers (a process it started is killed again)."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_publickey, sock.curve_secretkey = pair.public.encode(), pair.secret.encode()
    sock.curve_serverkey = agent_public.encode()
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED
                                      | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                      | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    answers: list[Any] = []
    try:
        handshake = _monitor_until_handshake(sock, monitor, address)
        if handshake == "refused":
            return handshake, answers
        worker_pair = KeyPair.generate()
        name = "p1" if service is None else "web.0.1"
        sock.send(proto.encode(proto.Launch(
            worker=name, connect="tcp://198.18.0.1:9",
            credentials=Credentials(b"t" * 16, worker_pair, pair.public).to_json(),
            service=service, listeners=None if service is None else [0])))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not sock.poll(100):
                continue
            message = proto.decode(sock.recv(), allowed=proto.FROM_AGENT)
            if isinstance(message, (proto.Ping, proto.Output)):
                continue
            answers.append(message)
            if isinstance(message, proto.Launched):
                sock.send(proto.encode(proto.Signal(worker=name, signal="kill")))
            if isinstance(message, (proto.Exited, proto.Error)):
                break
        return handshake, answers
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        context.term()


@pytest.mark.parametrize("role", ["supervisor", "agent", "worker"])
def test_an_agent_takes_launch_only_from_a_trusted_supervisor_key(keys: Path,
                                                                  role: str) -> None:
    with Hosts(1, keys) as hosts:
        agent = hosts.start_agent(0, "h3")
        pair = {"supervisor": lambda: KeyPair.load(str(keys / "supervisor.key_secret")),
                "agent": lambda: KeyPair.load(str(keys / "h1.key_secret")),
                "worker": KeyPair.generate}[role]()
        handshake, answers = launch_as(pair, KeyPair.load_public(str(keys / "h3.key")),
                                       hosts.agent_address(0))
        if role == "supervisor":
            assert handshake == "accepted"
            assert [type(answer) for answer in answers] == [proto.Launched, proto.Exited]
        else:
            assert (handshake, answers) == ("refused", [])
            assert psutil.Process(agent.pid).children() == []


def test_an_agent_starts_a_replica_and_refuses_a_malformed_service(keys: Path) -> None:
    supervisor_pair = KeyPair.load(str(keys / "supervisor.key_secret"))
    spec = ServiceSpec("web", "nodes.web:Web", ("0.0.0.0", 8080)).to_json()
    with Hosts(1, keys) as hosts:
        agent = hosts.start_agent(0, "h3")
        public, address = KeyPair.load_public(str(keys / "h3.key")), hosts.agent_address(0)
        _, answers = launch_as(supervisor_pair, public, address, json.dumps(spec))
        assert [type(answer) for answer in answers] == [proto.Launched, proto.Exited]
        assert answers[1].exitcode == -signal.SIGKILL
        for bad in ["{", json.dumps({**spec, "listen": ["0.0.0.0", "http"]}),
                    json.dumps({**spec, "surprise": 1})]:
            _, answers = launch_as(supervisor_pair, public, address, bad)
            assert len(answers) == 1 and isinstance(answers[0], proto.Error), answers
            assert (answers[0].code, answers[0].field) == ("bad-field", "LAUNCH.service")
            assert "not a service's spec" in answers[0].detail
        assert agent.poll() is None and psutil.Process(agent.pid).children() == []


def test_an_agent_will_not_trust_its_own_key_or_no_key(keys: Path,
                                                      cli_env: dict[str, str]) -> None:
    base = ["agent", "--listen", "tcp://127.0.0.1:9", "--keys", str(keys), "--name", "h1"]
    done = subprocess.run(hiocluster_command(*base), env=cli_env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "--trust" in done.stderr
    done = subprocess.run(hiocluster_command(*base, "--trust", "h1.key"), env=cli_env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "h1.key" in done.stderr and "own" in done.stderr, \
        done.stderr
    assert "Traceback" not in done.stderr
    done = subprocess.run(hiocluster_command(*base, "--trust", "nobody.key"), env=cli_env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "nobody.key" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# -- 2. a host that does not answer ----------------------------------------------------------

@pytest.mark.parametrize("agent", ["not running", "listening on loopback"])
def test_a_host_that_does_not_answer_fails_the_run_at_once(keys: Path, agent: str) -> None:
    with Hosts(2, keys) as hosts:
        hosts.start_agent(0, "h1")
        if agent != "not running":
            hosts.start_agent(1, "h2", listen="tcp://127.0.0.1:7100")
        topology = spread(ring({f"p{i}": [name] for i, name in enumerate("abcd")}, ticks=10),
                            hosts, {"h1": ("p1",), "h2": ("p2",)})
        with pytest.raises(RunFailed) as info:
            run(topology, keys, start_timeout=60.0)
    error = info.value
    assert error.worker == "p2" and error.tick is None
    assert "host h2" in error.cause and hosts.agent_address(1) in error.cause, error.cause
    assert "no agent answers" in error.cause, error.cause


def test_a_group_on_a_host_that_does_not_answer_is_named_a_group(keys: Path) -> None:
    with Hosts(2, keys) as hosts:
        hosts.start_agent(0, "h1")
        topology = ring({f"p{i}": [name] for i, name in enumerate("abcd")},
                        '\n[groups]\ng1 = ["p2", "p3"]\n', ticks=10)
        with pytest.raises(RunFailed) as info:
            run(spread(topology, hosts, {"h1": ("p1",), "h2": ("g1",)}), keys)
    assert info.value.worker == "g1" and "no agent answers" in info.value.cause
    assert str(info.value).startswith("group g1 "), str(info.value)


def test_an_agent_whose_name_is_loopback_warns(keys: Path) -> None:
    with Hosts(1, keys) as hosts:
        agent = hosts.start_agent(0, "h1", listen="tcp://localhost:7100",
                                  stderr=subprocess.PIPE)
        agent.terminate()
        _, stderr = agent.communicate(timeout=30)
    assert "localhost" in stderr and "127.0.0.1" in stderr and "loopback" in stderr, stderr


# -- 3. nothing left behind on a host ---------------------------------------------------------

def _ticking(marks: Path, names: str) -> bool:
    return all((marks / f"{name}.ticking").exists() for name in names)


def _agent_processes(agent: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(agent.pid).children(recursive=True)


def _gone(processes: list[psutil.Process]) -> bool:
    return not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _entries(*folders: Path) -> list[str]:
    return sorted(str(path) for folder in folders for path in folder.rglob("*"))


def _marks(tmp_path: Path) -> Path:
    marks = tmp_path / "marks"
    marks.mkdir()
    return marks


def _forget(hosts: Hosts, name: str) -> None:
    """Reap agent ``name`` (killed) and leave it out of the hosts' clean stop."""
    agent = hosts.agents.pop(name)
    agent.wait(timeout=30)
    agent.stdout.close()  # type: ignore[union-attr]


@pytest.fixture
def agent_tmp(tmp_path: Path) -> Path:
    temp = tmp_path / "agent-tmp"
    temp.mkdir()
    return temp


def _kill_run(keys: Path, hosts: Hosts, topology: Topology, marks: Path, names: str,
              victim: Any) -> tuple[RunFailed, list[psutil.Process]]:
    """Run ``topology``; once every node ticks, SIGKILL ``victim()`` (a pid); return
    the failure and every process the agents had started."""
    started: list[psutil.Process] = []

    def on_tick(done: int, total: int) -> None:
        if not started and _ticking(marks, names):
            started.extend(p for agent in hosts.agents.values()
                           for p in _agent_processes(agent))
            os.kill(victim(), signal.SIGKILL)

    with pytest.raises(RunFailed) as info:
        run(topology, keys, on_tick=on_tick)
    assert started, "the run failed before the kill"
    return info.value, started


def test_a_killed_agent_leaves_nothing_on_its_host(keys: Path, tmp_path: Path,
                                                   agent_tmp: Path, no_leaks: Path) -> None:
    marks = _marks(tmp_path)
    topology = ring({f"p{i}": [name] for i, name in enumerate("abcd")}, marks=marks)
    with Hosts(2, keys) as hosts:
        agent = hosts.start_agent(0, "h1", temp=agent_tmp)
        hosts.start_agent(1, "h2", temp=agent_tmp)
        topology = spread(topology, hosts, {"h1": ("p1", "p2"), "h2": ("p3",)})
        error, started = _kill_run(keys, hosts, topology, marks, "abcd", lambda: agent.pid)
        _forget(hosts, "h1")
        assert isinstance(error, ProcessExited) and "host h1 lost" in error.cause
        wait_until(lambda: _gone(started), 30, "the workers of the killed agent to exit")
        # the orphans removed their own files: nothing waits for a restart
        wait_until(lambda: not _entries(agent_tmp, no_leaks), 30,
                   "the files of the killed agent's workers to go")


def test_a_restarted_agent_sweeps_what_a_dead_one_left(keys: Path, tmp_path: Path,
                                                       agent_tmp: Path, no_leaks: Path) -> None:
    marks = _marks(tmp_path)
    topology = ring({f"p{i}": [name] for i, name in enumerate("abc")}, marks=marks)
    with Hosts(1, keys) as hosts:
        agent = hosts.start_agent(0, "h1", temp=agent_tmp)
        topology = spread(topology, hosts, {"h1": ("p1", "p2")})
        killed: list[psutil.Process] = []

        def kill_all() -> int:  # the agent and its workers, all at once (an OOM, a crash)
            killed.extend(_agent_processes(agent))
            for process in killed:
                process.kill()
            return agent.pid

        _kill_run(keys, hosts, topology, marks, "abc", kill_all)
        _forget(hosts, "h1")
        wait_until(lambda: _gone(killed), 30, "the killed workers to be gone")
        left = _entries(agent_tmp, no_leaks)
        assert left, "a killed agent and its killed workers leave their files"
        hosts.start_agent(0, "h1", temp=agent_tmp)
        wait_until(lambda: not _entries(agent_tmp, no_leaks), 30,
                   f"the restarted agent to sweep {left}")


def test_a_group_killed_on_a_host_leaves_nothing(keys: Path, tmp_path: Path,
                                                 agent_tmp: Path, no_leaks: Path) -> None:
    marks = _marks(tmp_path)
    topology = ring({f"p{i}": [name] for i, name in enumerate("abcd")},
                    '\n[groups]\ng1 = ["p1", "g2"]\ng2 = ["p2"]\n', marks=marks)
    with Hosts(1, keys) as hosts:
        agent = hosts.start_agent(0, "h1", temp=agent_tmp)
        topology = spread(topology, hosts, {"h1": ("g1",)})

        def the_group() -> int:
            (process,) = psutil.Process(agent.pid).children()
            return process.pid

        error, started = _kill_run(keys, hosts, topology, marks, "abcd", the_group)
        assert isinstance(error, ProcessExited) and error.worker == "g1"
        assert error.cause == "signal SIGKILL"
        wait_until(lambda: _gone(started), 30, "the group's orphans to exit")
        wait_until(lambda: not _entries(agent_tmp, no_leaks), 30,
                   "the killed group's files to go")
