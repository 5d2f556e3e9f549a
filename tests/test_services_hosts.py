"""Services across hosts: ``[services.web] hosts = ["h1", "h2"]`` runs replicas
through each host's agent (network-namespace hosts, CurveZMQ), each host serving
the service's port on its own address; ``hiocluster status`` names each
replica's host; when a host's link is cut, its replicas restart on the host
still there, and requests to that host keep succeeding throughout.

Needs root (skips with the reason otherwise; CI runs as root). Every wait is
bounded in seconds; the load is bounded in requests and seconds.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, hiocluster_command

from hiocluster.errors import TopologyError
from hiocluster.runtime.loop import Loop
from hiocluster.services.supervisor import ServiceRun
from hiocluster.supervision import supervisor
from hiocluster.topology import loads, plan
from tests.netns import Hosts, skip_reason
from tests.test_cluster_hosts import host_fixtures
from tests.test_cluster_services import Load, Run, free_port, get

pytestmark = pytest.mark.timeout(180)
netns = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

HOSTS = ("h1", "h2")


keys, hosts = host_fixtures(HOSTS)


def web(hosts: Hosts, port: int, replicas: int = 4, on: tuple[str, ...] = HOSTS) -> str:
    """The HTTP example's service, on every address of each host, over ``on``."""
    declared = "".join(f'[hosts.{name}]\nagent = "{hosts.agent_address(i)}"\n\n'
                       for i, name in enumerate(HOSTS))
    return (f'{declared}[services.web]\nclass = "nodes.web:Web"\nreplicas = {replicas}\n'
            f'listen = "0.0.0.0:{port}"\nhosts = {list(on)!r}\nmax_restarts = 20\n'
            f'within = 60.0\nbackoff = 0.05\n\n[services.web.params]\n'
            f'greeting = "hello from hiocluster"\n').replace("'", '"')


@pytest.fixture
def run_web(tmp_path: Path, cli_env: dict[str, str], keys: Path):
    runs: list[Run] = []

    def start(text: str) -> Run:
        path = tmp_path / "web.toml"
        path.write_text(text)
        run = Run(path, cli_env, "--keys", str(keys))
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


def placed(status: dict[str, Any]) -> list[tuple[str, str]]:
    """(host, state) of each replica of the run's one service."""
    return [(replica["host"], replica["state"])
            for replica in status["services"][0]["replicas"]]


@pytest.mark.parametrize("hosts, keys, said", [
    ('["beta"]', True, "host 'beta' is not declared"),
    ('["alpha"]', False, "need a keys directory"),
])
def test_a_run_refuses_hosts_it_cannot_reach(tmp_path: Path, hosts: str, keys: bool,
                                             said: str) -> None:
    topology = loads('[hosts.alpha]\nagent = "tcp://198.18.0.10:7100"\n\n[services.web]\n'
                     f'class = "nodes.web:Web"\nlisten = "0.0.0.0:8080"\nhosts = {hosts}\n')
    with pytest.raises(TopologyError) as info:
        ServiceRun(topology, Loop(), app_dir=str(REPO), keys=str(tmp_path) if keys else None)
    assert said in str(info.value) and info.value.key_path.startswith(
        "services.web.hosts" if keys else "hosts"), info.value


def test_a_simulation_run_refuses_services_on_other_hosts() -> None:
    topology = loads('[nodes.a]\nclass = "nodes.ring:RingNode"\n\n[hosts.alpha]\n'
                     'agent = "tcp://198.18.0.10:7100"\n\n[services.web]\n'
                     'class = "nodes.web:Web"\nlisten = "0.0.0.0:8080"\nhosts = ["alpha"]\n')
    with pytest.raises(TopologyError) as info:
        supervisor.Supervisor(topology, plan(topology, 1), Loop(), app_dir=str(REPO))
    assert "in a run of services alone" in str(info.value)
    assert info.value.key_path == "services.web.hosts[0]"


@netns
def test_replicas_spread_over_hosts_and_status_names_each_host(
        hosts: Hosts, run_web, cli_env: dict[str, str]) -> None:
    port = free_port()
    run = run_web(web(hosts, port))
    serving = [run.expect(r"web\.(\d) serving on \S+ on host (h\d) \(pid \d+\)").groups()
               for _ in range(4)]
    assert sorted(serving) == [("0", "h1"), ("1", "h2"), ("2", "h1"), ("3", "h2")]
    for index in range(2):  # each host serves the port on its own address
        assert get(port, host=hosts.address(index)) == (200, b"hello from hiocluster\n")
    shown = subprocess.run(hiocluster_command("status", "--control", run.control),
                           env=cli_env, capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    header, *rows = [line.split() for line in shown.stdout.splitlines()
                     if line.startswith(("SERVICE", "web "))][:5]
    assert header[:3] == ["SERVICE", "REPLICA", "HOST"]
    assert [row[:3] for row in rows] == [["web", "0", "h1"], ["web", "1", "h2"],
                                         ["web", "2", "h1"], ["web", "3", "h2"]]
    stop = subprocess.run(hiocluster_command("stop", "--control", run.control), env=cli_env,
                          capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert run.finish() == 0, run.log[-20:]


@netns
def test_a_lost_hosts_replicas_restart_on_the_host_left_while_it_keeps_serving(
        hosts: Hosts, run_web) -> None:
    port = free_port()
    run = run_web(web(hosts, port))
    run.until(lambda status: placed(status) == [("h1", "serving"), ("h2", "serving")] * 2)
    survivor = hosts.address(1)
    with Load(port, threads=2, limit=4_000, seconds=90, host=survivor) as load:
        assert load.reach(50), "no requests done before the cut"
        before = load.done()
        hosts.cut(0)
        run.expect(r"web\.0: host h1 lost")
        status = run.until(lambda status: placed(status) == [("h2", "serving")] * 4,
                           timeout=60)
        assert load.reach(load.done() + 100), "the load stalled after the cut"
    assert load.failed == 0, load.errors[:5]
    assert load.ok > before
    assert status["services"][0]["restarts"] >= 2
    run.proc.send_signal(signal.SIGTERM)  # a services run drains and ends cleanly
    assert run.finish() == 0, run.log[-20:]


def test_check_names_a_services_hosts_and_what_is_missing(tmp_path: Path, keys: Path,
                                                         cli_env: dict[str, str]) -> None:
    path = tmp_path / "web.toml"
    declared = '[hosts.h1]\nagent = "tcp://198.18.0.10:7100"\n\n'
    service = '[services.web]\nclass = "nodes.web:Web"\nlisten = "0.0.0.0:8080"\n'

    def check(hosts: str, *args: str) -> subprocess.CompletedProcess[str]:
        path.write_text(f"{declared}{service}hosts = {hosts}\n")
        return subprocess.run(hiocluster_command("check", str(path), "--app-dir", str(REPO),
                                                 *args), env=cli_env, capture_output=True,
                              text=True, timeout=60)

    done = check('["h1", "local"]', "--keys", str(keys))
    assert done.returncode == 0, done.stderr
    assert "service web: 1 x nodes.web:Web on 0.0.0.0:8080 on hosts h1, local;" in done.stdout
    done = check('["h1", "h9"]', "--keys", str(keys))
    assert done.returncode == 2 and f"{path}:7 [services.web.hosts[1]]: host 'h9' is not " \
        "declared" in done.stderr, done.stderr
    done = check('["h1"]')
    assert done.returncode == 2 and "need a keys directory (--keys DIR" in done.stderr
    assert "Traceback" not in done.stderr


@netns
def test_scaling_across_hosts_leaves_no_socket_that_nobody_serves(
        hosts: Hosts, run_web, cli_env: dict[str, str]) -> None:
    port = free_port()
    run = run_web(web(hosts, port, on=("h1", "h2", "local")))
    run.until(lambda status: placed(status) == [("h1", "serving"), ("h2", "serving"),
                                                 ("local", "serving"), ("h1", "serving")])
    for replicas, expected in [(2, [("h1", "serving"), ("h2", "serving")]),
                               (4, [("h1", "serving"), ("h2", "serving"),
                                    ("local", "serving"), ("h1", "serving")])]:
        scale = subprocess.run(hiocluster_command("scale", f"web={replicas}", "--control",
                                                  run.control), env=cli_env,
                               capture_output=True, text=True, timeout=30)
        assert scale.returncode == 0, scale.stderr
        run.until(lambda status: placed(status) == expected, timeout=60)
        # every request answered: a socket left open with no replica would hold some
        for address in (hosts.address(0), hosts.address(1), "127.0.0.1"):
            for _ in range(24):
                if replicas == 2 and address == "127.0.0.1":
                    with pytest.raises(ConnectionRefusedError):  # none here now
                        get(port, host=address, timeout=10)
                    break
                assert get(port, host=address, timeout=10)[0] == 200
