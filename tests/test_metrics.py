"""The run's Prometheus endpoint: its families from a status (no sockets), then
real runs of services and of a simulation scraped over HTTP."""

from __future__ import annotations

import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, hiocluster_command
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hiocluster.errors import TopologyError
from hiocluster.services.core import LATENCY_BUCKETS
from hiocluster.services.metrics import _Collector, families, parse_address
from hiocluster.topology import loads
from tests.test_cluster_services import Load, Run, free_port, get
from tests.waiting import wait_until


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(name, sorted labels): value}`` of a scrape."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def render(status: dict[str, Any]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(lambda: status))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def service_status() -> dict[str, Any]:
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    counts[0], counts[3], counts[-1] = 5, 2, 1   # <= 0.5 ms, <= 5 ms, > 10 s
    replica = {"replica": 0, "state": "serving", "connections": 3, "cpu": 12.5,
               "rss": 40_000_000, "health": "ok"}
    return {"topology": "web", "uptime": 12.5, "simulation": None, "services": [{
        "service": "web", "served": 8, "serving": 2, "desired": 2, "restarts": 1,
        "replaced": 2, "unhealthy": 1, "latency": {"counts": counts, "sum": 11.0},
        "replicas": [replica, {**replica, "replica": 1, "health": "failing 2", "cpu": None},
                     {"replica": 2, "state": "backoff", "connections": 0}]}]}


def test_a_services_status_as_prometheus_families() -> None:
    got = samples(render(service_status()))
    web = (("service", "web"),)
    assert got[("hiocluster_up", (("topology", "web"),))] == 1
    assert got[("hiocluster_requests_total", web)] == 8
    assert got[("hiocluster_request_duration_seconds_bucket", (("le", "0.0005"),) + web)] == 5
    assert got[("hiocluster_request_duration_seconds_bucket", (("le", "0.005"),) + web)] == 7
    assert got[("hiocluster_request_duration_seconds_bucket", (("le", "10.0"),) + web)] == 7
    assert got[("hiocluster_request_duration_seconds_bucket", (("le", "+Inf"),) + web)] == 8
    assert got[("hiocluster_request_duration_seconds_count", web)] == 8
    assert got[("hiocluster_request_duration_seconds_sum", web)] == 11.0
    assert got[("hiocluster_replaced_total", (("reason", "health"),) + web)] == 1
    assert got[("hiocluster_replaced_total", (("reason", "lifetime"),) + web)] == 2
    assert got[("hiocluster_restarts_total", web)] == 1
    zero, one = (("replica", "0"),) + web, (("replica", "1"),) + web
    assert got[("hiocluster_connections", zero)] == 3
    assert got[("hiocluster_replica_cpu_percent", zero)] == 12.5
    assert ("hiocluster_replica_cpu_percent", one) not in got  # not measured yet
    assert (got[("hiocluster_replica_healthy", zero)], got[("hiocluster_replica_healthy", one)]) \
        == (1, 0)
    assert not any(dict(labels).get("replica") == "2" for _, labels in got)  # in backoff
    assert not any(name.startswith("hiocluster_simulation") for name, _ in got)


def test_a_simulations_status_as_prometheus_families() -> None:
    status = {"topology": "ring", "uptime": 3.0, "services": [], "simulation": {
        "tick": 40, "ticks": 200, "rate": 13.5, "window": 4, "state": "running",
        "workers": {"p0": "running", "p1": "running"},
        "progress": {"p0": {"tick": 41, "waiting": [], "waiting_s": 0.0},
                     "p1": {"tick": 40, "waiting": ["p0"], "waiting_s": 0.25}}}}
    got = samples(render(status))
    assert got[("hiocluster_simulation_tick", ())] == 40
    assert got[("hiocluster_simulation_ticks", ())] == 200
    assert got[("hiocluster_simulation_ticks_per_second", ())] == 13.5
    assert got[("hiocluster_simulation_window", ())] == 4
    assert got[("hiocluster_worker_tick", (("worker", "p1"),))] == 40
    assert got[("hiocluster_worker_waiting_seconds", (("worker", "p1"),))] == 0.25
    assert not any(name.startswith("hiocluster_requests") for name, _ in got)
    assert families({"topology": "x"})  # a run not started yet: up, uptime


@pytest.mark.parametrize("value, message", [
    ("nowhere", "expected 'HOST:PORT'"), ("h:70000", "port 0..65535"), (9100, "expected str")])
def test_a_bad_metrics_address_is_named(value: object, message: str) -> None:
    text = f'[run]\nmetrics = {value!r}\n'.replace("'", '"')
    with pytest.raises(TopologyError, match=message) as caught:
        loads(text + '[nodes.a]\nclass = "m:C"\n')
    assert caught.value.key_path == "run.metrics"
    with pytest.raises(ValueError, match="expected 'HOST:PORT'"):
        parse_address("nowhere:")


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(address, timeout=30) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        return samples(answer.read().decode())


def test_a_services_run_serves_its_metrics(cli_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "web.toml"
    path.write_text((REPO / "topologies" / "http.toml").read_text().replace(
        "127.0.0.1:8080", f"127.0.0.1:{port}").replace("[services.web]\n",
                                                        '[run]\nmetrics = "127.0.0.1:0"\n\n'
                                                        "[services.web]\n"))
    run = Run(path, cli_env)
    try:
        address = run.expect(r"metrics: (http://127\.0\.0\.1:\d+/metrics)").group(1)
        run.serving(2)
        with Load(port, threads=2) as load:
            assert load.reach(50)
        assert load.failed == 0, load.errors
        web = (("service", "web"),)
        got = wait_until(lambda: (lambda got: got if got[("hiocluster_requests_total", web)]
                                  == load.ok else None)(scrape(address)), 30, "every request")
        assert got[("hiocluster_request_duration_seconds_count", web)] == load.ok
        assert got[("hiocluster_replicas", (("service", "web"), ("state", "serving")))] == 2
        assert got[("hiocluster_replica_rss_bytes", (("replica", "0"),) + web)] > 1e6
        assert get(port)[0] == 200  # the endpoint costs the service nothing it needs
        # a stranger's garbage gets a 400 and the endpoint serves on
        host, metrics_port = address.split("//")[1].split("/")[0].split(":")
        with socket.create_connection((host, int(metrics_port)), timeout=30) as sock:
            sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 400")
        assert scrape(address)[("hiocluster_replicas", (("service", "web"),
                                                       ("state", "desired")))] == 2
    finally:
        run.close()
    assert run.proc.returncode == 0


def test_a_simulation_serves_its_metrics_while_it_runs(cli_env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        hiocluster_command("run", str(REPO / "topologies" / "ring.toml"), "--app-dir",
                           str(REPO), "--processes", "2", "--metrics", "127.0.0.1:0",
                           "--quiet", "--real"),
        env={**cli_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("hiocluster: metrics: http://127.0.0.1:"), line
        address = line.split()[-1]

        def ticking() -> Any:
            got = scrape(address)
            return got if got.get(("hiocluster_simulation_tick", ()), 0) >= 2 else None

        got = wait_until(ticking, 60, "the simulation to tick")
        assert got[("hiocluster_simulation_ticks", ())] == 200
        assert {dict(labels)["worker"] for name, labels in got
                if name == "hiocluster_worker_tick"} == {"p0", "p1"}
        assert ("hiocluster_worker_waiting_seconds", (("worker", "p0"),)) in got
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def test_a_taken_metrics_address_fails_the_run_before_it_starts(
        cli_env: dict[str, str]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        done = subprocess.run(
            hiocluster_command("run", str(REPO / "topologies" / "ring.toml"), "--app-dir",
                               str(REPO), "--processes", "2", "--ticks", "5",
                               "--metrics", f"127.0.0.1:{port}"),
            env=cli_env, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "tick" not in done.stdout
