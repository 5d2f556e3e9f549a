"""docker-compose.yml and its Dockerfile, checked without a Docker engine.

There is no Docker engine on the project's machines, so the file is checked
as far as can be without one: Debian's ``docker-compose config`` validates it
(.ci/run installs it when missing), every service's command parses as a
``hiocluster`` invocation, the hosts and keys it names agree, the run's plan is
valid (``hiocluster check`` with the same hosts), and everything the Dockerfile
copies exists.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from hiocluster.cli import build_parser

from conftest import REPO, hiocluster_command

COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_docker_compose_config_validates_the_file() -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's package)")
    done = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_every_command_is_a_hiocluster_invocation(services: dict[str, Any]) -> None:
    parser = build_parser()
    for name, service in services.items():
        try:
            parser.parse_args(service["command"])
        except SystemExit as exc:
            raise AssertionError(f"service {name}: {service['command']} is not a valid "
                                 "hiocluster command line") from exc
    assert {service["command"][0] for service in services.values()} == {"keygen", "agent",
                                                                         "run"}


def test_hosts_keys_and_plan_agree(services: dict[str, Any], cli_env: dict[str, str],
                                   tmp_path: Path) -> None:
    parser = build_parser()
    parsed = {name: parser.parse_args(service["command"]) for name, service in services.items()}
    agents = {name: args for name, args in parsed.items() if args.command == "agent"}
    (run,) = [args for args in parsed.values() if args.command == "run"]
    (keygen,) = [args for args in parsed.values() if args.command == "keygen"]
    assert set(keygen.names) == {"supervisor", *agents}
    assert dict(run.host) == {name: args.listen for name, args in agents.items()}
    assert all(args.name == name and args.keys == run.keys for name, args in agents.items())
    # keys have roles: an agent takes LAUNCH from the supervisor's key only
    assert all(args.trust == ["supervisor.key"] for args in agents.values())
    assert {host for _, host in run.place} == set(agents)
    supervisor = next(name for name, args in parsed.items() if args.command == "run")
    depends = services[supervisor]["depends_on"]
    assert set(depends) == {"keys", *agents}
    # a host that does not answer fails a run at once: start once every agent listens
    for name, args in agents.items():
        assert depends[name]["condition"] == "service_healthy"
        probe = services[name]["healthcheck"]["test"]
        port = int(args.listen.rpartition(":")[2])
        assert probe[:3] == ["CMD", "python", "-c"] and f"('{name}', {port})" in probe[3]
    # the plan the supervisor will run is valid: ring.toml's workers on those hosts
    check_plan(run, keygen.names, cli_env, tmp_path)


def check_plan(run: Any, key_names: list[str], cli_env: dict[str, str],
               tmp_path: Path) -> None:
    """``hiocluster check`` of a deployment's parsed ``run`` command, with keys made
    as its deployment makes them (``key_names``), accepts its plan: each --place
    worker on its host."""
    keys = tmp_path / "keys"
    made = subprocess.run(hiocluster_command("keygen", str(keys), *key_names), cwd=REPO,
                          env=cli_env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    argv = ["check", run.topology, "--keys", str(keys)]
    for name, address in run.host:  # the hosts' names resolve only in the deployment's
        port = address.rpartition(":")[2]  # network: their addresses are checked apart
        argv += ["--host", f"{name}=tcp://127.0.0.1:{port}"]
    for worker, host in run.place:
        argv += ["--place", f"{worker}={host}"]
    done = subprocess.run(hiocluster_command(*argv), cwd=REPO, env=cli_env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for worker, host in run.place:
        assert f"  {worker} on {host} (" in done.stdout, done.stdout


def test_the_dockerfile_copies_what_exists() -> None:
    lines = (REPO / "Dockerfile").read_text().splitlines()
    copied = [part for line in lines if line.startswith("COPY ")
              for part in line.split()[1:-1]]
    assert copied and all((REPO / part).exists() for part in copied), copied
    assert 'ENTRYPOINT ["hiocluster"]' in lines
