"""``ssh://`` hosts: the supervisor starts each host's agent over SSH itself.

Three network-namespace hosts (tests/netns.py), each running OpenSSH's sshd with
keys made at test time; the runs reach them through ``$HIOCLUSTER_SSH_COMMAND``
(the client's key and a known_hosts of the test's own). Ring and PHOLD across
them give the one-process digests; cutting one host's link ends the run naming
it; a host where ssh cannot log in is named at once; nothing is left on any host
(Hosts checks every namespace for processes as it closes)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from conftest import REPO, hiocluster_command

from hiocluster.topology import loads
from tests.netns import Hosts, skip_reason
from tests.waiting import until_checkpointed

TIMEOUT = 120
WHY = skip_reason() or (None if shutil.which("ssh") and Path("/usr/sbin/sshd").exists()
                        else "ssh hosts need OpenSSH's ssh and sshd (apt-get install "
                             "openssh-server openssh-client; .ci/run does)")
pytestmark = pytest.mark.skipif(WHY is not None, reason=WHY or "")


@pytest.fixture
def ssh_hosts(tmp_path: Path) -> Iterator[tuple[Hosts, list[str]]]:
    """Three hosts with sshd; and each one's ``--host hN=ssh://root@ADDRESS``."""
    with Hosts(3, tmp_path) as hosts:
        logins = [hosts.start_sshd(index, tmp_path) for index in range(3)]
        yield hosts, [f"h{index + 1}=ssh://{login}" for index, login in enumerate(logins)]


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(hiocluster_command(*args), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)


def over_ssh(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return dict(env, HIOCLUSTER_SSH_COMMAND=(tmp_path / "ssh").read_text())


def spread(hosts: list[str]) -> list[str]:
    argv = []
    for host in hosts:
        argv += ["--host", host]
    return [*argv, "--place", "p1=h1", "--place", "p2=h2", "--place", "p3=h3"]


@pytest.mark.parametrize("example", ["ring", "phold"])
def test_examples_across_three_ssh_hosts_match_one_process(ssh_hosts, cli_env, tmp_path,
                                                           example) -> None:
    _, logins = ssh_hosts
    topology = f"topologies/{example}.toml"
    alone = run(cli_env, "run", topology, "--processes", "1", "--json")
    assert alone.returncode == 0, alone.stderr
    spread_run = run(over_ssh(cli_env, tmp_path), "run", topology, "--processes", "4",
                     "--json", *spread(logins))
    assert spread_run.returncode == 0, spread_run.stderr
    assert json.loads(spread_run.stdout)["digest"] == json.loads(alone.stdout)["digest"]


def test_a_cut_link_ends_the_run_naming_the_host(ssh_hosts, cli_env, tmp_path) -> None:
    hosts, logins = ssh_hosts
    ckpt = tmp_path / "ckpt"
    argv = hiocluster_command("run", "topologies/phold.toml", "--ticks", "10000000",
                              "--processes", "4", "--checkpoint", str(ckpt),
                              "--checkpoint-every", "100", *spread(logins))
    code, _, err = until_checkpointed(argv, over_ssh(cli_env, tmp_path), ckpt,
                                      lambda: hosts.cut(1), cwd=REPO)
    assert code == 1, err
    assert "hiocluster: run failed: worker p2" in err and "host h2 lost" in err, err


def test_a_host_ssh_cannot_log_in_to_is_named_at_once(ssh_hosts, cli_env, tmp_path) -> None:
    _, logins = ssh_hosts
    env = over_ssh(cli_env, tmp_path)
    env["HIOCLUSTER_SSH_COMMAND"] = env["HIOCLUSTER_SSH_COMMAND"].replace(
        str(tmp_path / "user_key"), str(tmp_path / "no_such_key"))
    done = run(env, "run", "topologies/ring.toml", "--processes", "4", *spread(logins))
    assert done.returncode == 1, done.stderr
    # every host's login fails at once: the run names the first it hears of
    assert re.search(r"host h\d: ssh root@\S+ ended \(exit code 255\) before an agent "
                     "started there", done.stderr), done.stderr


def test_ssh_hosts_in_a_topology_file_and_bad_ones_refused() -> None:
    topology = loads('[nodes.n]\nclass = "nodes.ring:RingNode"\ncount = 2\n'
                     '[hosts.beta]\nagent = "ssh://me@beta:2222"\nworkers = ["p1"]\n')
    [host] = topology.hosts
    assert host.ssh is not None and (host.ssh.destination, host.ssh.port) == ("me@beta", 2222)
    for bad in ("ssh://-oProxyCommand=x@beta", "ssh://beta:port", "ssh://"):
        with pytest.raises(ValueError, match="ssh://\\[USER@\\]HOST\\[:PORT\\]"):
            loads('[nodes.n]\nclass = "nodes.ring:RingNode"\ncount = 2\n'
                  f'[hosts.beta]\nagent = "{bad}"\nworkers = ["p1"]\n')


def test_an_agent_of_one_run_refuses_keys_it_cannot_read(cli_env, tmp_path) -> None:
    agent = ["agent", "--listen", "tcp://127.0.0.1:0", "--name", "beta"]
    for stdin, flags, code, words in (
            ("junk\n", ["--keys", "-"], 1, "stdin's first line is not the keys as JSON"),
            ('{"public": "x", "secret": "y", "trust": {"s": "z"}}\n', ["--keys", "-"], 1,
             "not Z85 CURVE keys"),
            ("", ["--keys", "-", "--trust", "supervisor.key"], 2, "no --trust"),
            ("", ["--keys", str(tmp_path)], 2, "--trust KEY is required")):
        done = subprocess.run(hiocluster_command(*agent, *flags), cwd=REPO, env=cli_env,
                              input=stdin, capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == code and words in done.stderr, (flags, done)
        assert "Traceback" not in done.stderr


def test_a_service_runs_replicas_on_an_ssh_host_and_here(tmp_path, cli_env) -> None:
    from tests.test_cluster_services import Run, free_port, get

    with Hosts(1, tmp_path) as hosts:
        login = hosts.start_sshd(0, tmp_path)
        port = free_port()
        path = tmp_path / "web.toml"
        path.write_text(f'[hosts.h1]\nagent = "ssh://{login}"\n\n[services.web]\n'
                        f'class = "nodes.web:Web"\nreplicas = 2\nlisten = "0.0.0.0:{port}"\n'
                        'hosts = ["h1", "local"]\n')
        run = Run(path, over_ssh(cli_env, tmp_path))  # no --keys: made for the run
        try:
            said = {run.expect(r"web\.(\d) serving on \S+ (on host h1 )?\(pid \d+\)").groups()
                    for _ in range(2)}
            assert said == {("0", "on host h1 "), ("1", None)}
            for address in (hosts.address(0), "127.0.0.1"):
                assert get(port, host=address)[0] == 200
            stop = run_stop(cli_env, run.control)
            assert stop.returncode == 0, stop.stderr
            assert run.finish() == 0, run.log[-20:]
        finally:
            run.close()


def run_stop(env: dict[str, str], control: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(hiocluster_command("stop", "--control", control), env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
