"""Runs across hosts: agents in Linux network namespaces, CurveZMQ between them.

Three namespace hosts, each with a ``hiocluster agent``; the supervisor runs
in this namespace. The ring and PHOLD examples spread over the hosts give the
per-tick digests of one process; a host whose link goes down, or whose agent is
stopped, ends the run loudly naming the host: its heartbeats, not the tick deadline.
These tests need root (they skip with the reason otherwise; CI runs as root).
"""

from __future__ import annotations

import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from hiocluster.supervision import supervisor
from hiocluster.supervision.restarts import Restart
from hiocluster.errors import ProcessExited, RunFailed
from hiocluster.topology import HostSpec, Topology, load, loads
from hiocluster.runtime.transport import HEARTBEAT_TIMEOUT_MS

from conftest import REPO, hiocluster_command
from tests.faulty import ring_toml
from tests.netns import Hosts, skip_reason
from tests.waiting import wait_until

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

HOSTS = ("h1", "h2", "h3")


def host_fixtures(names: tuple[str, ...]) -> tuple[Any, Any]:
    """The ``keys`` fixture (a keys directory for the supervisor and ``names``) and
    the ``hosts`` fixture (a network namespace per name, its agent started)."""

    @pytest.fixture
    def keys(tmp_path: Path, cli_env: dict[str, str]) -> Path:
        folder = tmp_path / "keys"
        subprocess.run(hiocluster_command("keygen", str(folder), "supervisor", *names),
                       env=cli_env, check=True, capture_output=True, timeout=30)
        return folder

    @pytest.fixture
    def hosts(keys: Path) -> Iterator[Hosts]:
        with Hosts(len(names), keys) as made:
            start_agents(made, names)
            yield made

    return keys, hosts


keys, hosts = host_fixtures(HOSTS)


def start_agents(hosts: Hosts, names: tuple[str, ...], **kwargs: Any) -> list[subprocess.Popen]:
    """Start an agent per name (in namespaces 0, 1, ...) side by side: their Python
    start-ups overlap instead of adding up."""
    with ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(lambda args: hosts.start_agent(*args, **kwargs),
                             enumerate(names)))


def spread(topology: Topology, hosts: Hosts, workers: dict[str, tuple[str, ...]]) -> Topology:
    """``topology`` with ``workers`` (host -> worker names) placed on the hosts."""
    return topology.replace(hosts=tuple(
        HostSpec(name, hosts.agent_address(HOSTS.index(name)), names)
        for name, names in workers.items()))


def run(topology: Topology, **kwargs: Any) -> supervisor.RunResult:
    return supervisor.run(topology, app_dir=str(REPO), handle_signals=False,
                          keep_digests=True, **kwargs)


@pytest.mark.parametrize("example", ["ring", "phold"])
def test_examples_across_three_hosts_match_one_process(hosts: Hosts, keys: Path,
                                                       example: str) -> None:
    topology = load(REPO / "topologies" / f"{example}.toml").replace(ticks=60)
    reference = run(topology, processes=1)
    across = run(spread(topology, hosts, {"h1": ("p0",), "h2": ("p1", "p2"), "h3": ("p3",)}),
                 keys=str(keys))
    assert across.tick_digests == reference.tick_digests
    assert across.processes == 4 and across.messages == reference.messages


def test_groups_on_hosts_match_one_process(hosts: Hosts, keys: Path) -> None:
    """A group per host (one of them nested): each host's workers are supervised on
    their host, DATA still goes worker to worker across hosts."""
    topology = load(REPO / "topologies" / "phold.toml").replace(
        ticks=60, groups=(("g1", ("p0", "p1")), ("g2", ("p2", "g3")), ("g3", ("p3",))))
    reference = run(topology, processes=1)
    across = run(spread(topology, hosts, {"h1": ("g1",), "h2": ("g2",)}), keys=str(keys))
    assert across.tick_digests == reference.tick_digests
    assert across.processes == 4 and across.groups == 3
    assert across.messages == reference.messages


def slow_ring(ticks: int = 100_000) -> Topology:
    nodes = {name: {"sleep": 0.005} for name in "abcd"}
    return loads(ring_toml(nodes, {"p0": ["a"], "p1": ["b"], "p2": ["c"], "p3": ["d"]},
                           ticks=ticks, tick_timeout=60.0))


def fail_when(topology: Topology, keys: Path, act: Any) -> RunFailed:
    """Run ``topology``; call ``act()`` once 20 ticks are done; return the failure.

    The tick deadline is 60 s: a failure that names the lost host (ProcessExited)
    came from the heartbeats (0.4-0.5 s), not from that deadline (TickTimeout)."""
    acted: list[bool] = []

    def on_tick(done: int, total: int) -> None:
        if done >= 20 and not acted:
            act()
            acted.append(True)

    with pytest.raises(RunFailed) as info:
        run(topology, keys=str(keys), on_tick=on_tick)
    assert acted
    return info.value


def test_a_host_whose_link_goes_down_is_reported_within_the_bound(hosts: Hosts,
                                                                  keys: Path) -> None:
    topology = spread(slow_ring(), hosts, {"h1": ("p1",), "h2": ("p2",), "h3": ("p3",)})
    error = fail_when(topology, keys, lambda: hosts.cut(1))
    assert isinstance(error, ProcessExited) and error.worker == "p2" and error.nodes == ("c",)
    assert "host h2 lost" in error.cause and error.tick is not None and error.tick >= 20
    assert HEARTBEAT_TIMEOUT_MS <= 500


def test_a_lost_host_is_survived_by_a_restart_from_the_last_checkpoint(
        hosts: Hosts, keys: Path) -> None:
    """``restart = "checkpoint"``: the lost host's worker starts again on this host,
    every worker goes back to the last checkpoint, the run ends as if never cut."""
    ring = slow_ring(ticks=200).replace(restart="checkpoint", checkpoint_every=20)
    reference = run(ring.replace(restart="none"))  # all four workers on this host
    cut: list[bool] = []

    def on_tick(done: int, total: int) -> None:
        if done >= 50 and not cut:
            hosts.cut(1)
            cut.append(True)

    restarts: list[Restart] = []
    result = run(spread(ring, hosts, {"h1": ("p1",), "h2": ("p2",), "h3": ("p3",)}),
                 keys=str(keys), on_tick=on_tick, on_restart=restarts.append)
    assert result.tick_digests == reference.tick_digests
    [restart] = restarts
    assert (restart.worker, restart.moved) == ("p2", ("h2",)) and restart.resumed_from >= 39
    assert "host h2 lost" in restart.cause and result.restarts == [restart.to_json()]


def test_a_stopped_agent_is_reported(hosts: Hosts, keys: Path) -> None:
    agent = hosts.agents["h3"]
    topology = spread(slow_ring(), hosts, {"h1": ("p1",), "h3": ("p2", "p3")})
    try:
        error = fail_when(topology, keys, lambda: os.kill(agent.pid, signal.SIGSTOP))
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    assert isinstance(error, ProcessExited) and error.worker in ("p2", "p3")
    assert "host h3 lost" in error.cause


def test_hosts_without_keys_are_a_clear_error(hosts: Hosts) -> None:
    topology = spread(slow_ring(10), hosts, {"h1": ("p1",)})
    with pytest.raises(Exception, match="need a keys directory"):
        run(topology)


def test_an_agent_refuses_a_supervisor_it_does_not_know(hosts: Hosts, keys: Path,
                                                        tmp_path: Path,
                                                        cli_env: dict[str, str]) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(hiocluster_command("keygen", str(stranger), "supervisor", *HOSTS),
                   env=cli_env, check=True, capture_output=True, timeout=30)
    for name in HOSTS:  # the stranger knows the agents' real public keys
        (stranger / f"{name}.key").write_text((keys / f"{name}.key").read_text())
    topology = spread(slow_ring(10), hosts, {"h2": ("p1",)})
    with pytest.raises(RunFailed) as info:  # told at once: the start-up deadline would
        run(topology, keys=str(stranger), start_timeout=90.0)  # trip pytest-timeout
    assert (info.value.worker, info.value.tick) == ("p1", None)
    assert "its agent at" in info.value.cause and "refused this supervisor's key" in \
        info.value.cause


def _cli_across(tmp_path: Path, keys: Path, hosts: Hosts, nodes: dict[str, dict[str, Any]],
                ticks: int, cli_env: dict[str, str], *extra: str) -> subprocess.Popen:
    """The CLI running a ring of ``nodes`` (one worker each: p0, p1, ...), worker p1 on
    h1 and p2 on h2 (by --host/--place), the rest here."""
    path = tmp_path / "ring.toml"
    names = list(nodes)
    path.write_text(ring_toml(nodes, {f"p{i}": [name] for i, name in enumerate(names)},
                              ticks=ticks))
    argv = ["run", str(path), "--keys", str(keys),
            "--host", f"h1={hosts.agent_address(0)}", "--host", f"h2={hosts.agent_address(1)}",
            "--place", "p1=h1", "--place", "p2=h2", *extra]
    return subprocess.Popen(hiocluster_command(*argv), cwd=REPO, env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_workers_stderr_comes_back_prefixed_with_host_and_worker(
        tmp_path: Path, keys: Path, hosts: Hosts, cli_env: dict[str, str]) -> None:
    nodes = {"a": {}, "b": {"say": "hello from b"}, "c": {"say": "hello from c"}}
    cli = _cli_across(tmp_path, keys, hosts, nodes, 20, cli_env)
    stdout, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 0, stderr
    assert "[h1/p1] hello from b" in stderr and "[h2/p2] hello from c" in stderr


def test_an_agent_stops_its_workers_when_the_supervisor_vanishes(
        tmp_path: Path, keys: Path, cli_env: dict[str, str], no_leaks: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    with Hosts(2, keys) as hosts:
        agents = start_agents(hosts, ("h1", "h2"))

        def agent_dirs() -> list[Path]:  # in the run root, as every run directory:
            # hioc-a<pid>-..., not the supervisor's, whose random name may start with a
            return list(no_leaks.glob("hioc-a[0-9]*-*"))

        nodes = {name: {"marker_dir": str(marks), "sleep": 0.005} for name in "abc"}
        cli = _cli_across(tmp_path, keys, hosts, nodes, 100_000, cli_env)
        try:
            def ticking() -> bool:
                assert cli.poll() is None, cli.communicate()
                return all((marks / f"{n}.ticking").exists() for n in "abc")

            wait_until(ticking, 60, "the run to tick")
            remote = [child for agent in agents
                      for child in psutil.Process(agent.pid).children()]
            assert len(remote) == 2 and len(agent_dirs()) == 2, "workers run in the agents' dirs"
            cli.kill()  # the supervisor vanishes without a word
            cli.communicate(timeout=30)
            psutil.wait_procs(remote, timeout=30)
            assert not [p for p in remote if p.is_running()
                        and p.status() != psutil.STATUS_ZOMBIE]
            wait_until(lambda: not agent_dirs(), 30, "the agents to remove their run files")
            assert all(agent.poll() is None for agent in agents)  # agents serve on
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.communicate()
