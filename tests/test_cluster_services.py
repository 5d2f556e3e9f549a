"""Services end to end: `hiocluster run` of a topology with [services.*], real
replica processes serving on one port (SO_REUSEPORT), real clients on loopback,
`hiocluster status|scale|restart|stop` through the run's control endpoint.

Tests synchronise on what the run says (its "serving on" lines, its status),
never on sleeps; every load loop is bounded in count and time.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import psutil
import pytest
import trustme

from conftest import REPO, hiocluster_command
from hiocluster import protocol as proto
from hiocluster.control.client import ask
from tests.waiting import wait_until

TOPOLOGIES = REPO / "topologies"
pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def with_port(text: str, port: int) -> str:
    """A topology's text with its listen port replaced by ``port``."""
    return re.sub(r'listen = "127\.0\.0\.1:\d+"', f'listen = "127.0.0.1:{port}"', text)


class Run:
    """`hiocluster run TOPOLOGY` as a subprocess (run by ``wrap``, e.g. salloc, if
    given); its stderr read line by line."""

    def __init__(self, path: Path, env: dict[str, str], *args: str,
                 wrap: Sequence[str] = ()) -> None:
        self.proc = subprocess.Popen(
            [*wrap, *hiocluster_command("run", str(path), "--app-dir", str(REPO), *args)],
            env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.control = self.expect(r"control: HIOCLUSTER_CONTROL=(\S+)").group(1)
        self.stdout = ""

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The next stderr line matching ``pattern`` (fails at EOF or time-out)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s; "
                                     f"seen: {self.log[-20:]}") from None
            if line is None:
                raise AssertionError(f"the run ended before {pattern!r}; seen: "
                                     f"{self.log[-20:]}")
            self.log.append(line)
            found = re.search(pattern, line)
            if found:
                return found

    def serving(self, count: int) -> list[int]:
        """Wait for ``count`` more replicas to say they serve; their pids."""
        return [int(self.expect(r"serving on \S+ \(pid (\d+)\)").group(1))
                for _ in range(count)]

    def status(self) -> dict[str, Any]:
        return ask(self.control, proto.Command(command="status")).status

    def until(self, check: Callable[[dict[str, Any]], bool], timeout: float = 30.0
              ) -> dict[str, Any]:
        """Poll the run's status until ``check`` holds (bounded; polling another
        process's state: there is nothing to wait on)."""
        seen: list[dict[str, Any]] = []

        def reached() -> dict[str, Any] | None:
            seen[:] = [self.status()]
            return seen[0] if check(seen[0]) else None

        try:
            return wait_until(reached, timeout, "the run's status", interval=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the last: {seen}") from None

    def finish(self, timeout: float = 30.0) -> int:
        """Wait for the run to end; its exit code (the rest of stderr goes to log,
        stdout to ``self.stdout``)."""
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout)
        while not self.lines.empty():
            line = self.lines.get_nowait()
            if line is not None:
                self.log.append(line)
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read()
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.finish(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def start(cli_env: dict[str, str], tmp_path: Path):
    runs: list[Run] = []

    def starter(text: str, *args: str, name: str = "svc.toml") -> Run:
        path = tmp_path / name
        path.write_text(text)
        run = Run(path, cli_env, *args)
        runs.append(run)
        return run

    yield starter
    for run in runs:
        run.close()


def echo_once(port: int, payload: bytes, timeout: float = 30.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def get(port: int, path: str = "/hello", timeout: float = 30.0,
        host: str = "127.0.0.1") -> tuple[int, bytes]:
    """One HTTP/1.1 request on a new connection (Connection: close): status, body."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        raise ConnectionError(f"no HTTP response: {data[:80]!r}")
    return int(head.split()[1]), body


class Load:
    """``threads`` clients, each doing requests one after another on new
    connections until stopped (bounded by ``limit`` requests and ``seconds``)."""

    def __init__(self, port: int, threads: int = 4, limit: int = 20_000,
                 seconds: float = 60.0, host: str = "127.0.0.1") -> None:
        self.port, self.limit, self.seconds, self.host = port, limit, seconds, host
        self.ok, self.failed, self.errors = 0, 0, []  # type: ignore[var-annotated]
        self.lock = threading.Condition()
        self.stopping = threading.Event()
        self.workers = [threading.Thread(target=self._work, daemon=True)
                        for _ in range(threads)]

    def __enter__(self) -> Load:
        for worker in self.workers:
            worker.start()
        return self

    def _work(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self.stopping.is_set() and time.monotonic() < deadline:
            with self.lock:
                if self.ok + self.failed >= self.limit:
                    return
            try:
                status, _ = get(self.port, host=self.host)
                good = status == 200
            except OSError as exc:
                good = False
                error = repr(exc)
            else:
                error = f"status {status}"
            with self.lock:
                if good:
                    self.ok += 1
                else:
                    self.failed += 1
                    self.errors.append(error)
                self.lock.notify_all()

    def done(self) -> int:
        with self.lock:
            return self.ok + self.failed

    def reach(self, count: int, timeout: float = 30.0) -> bool:
        """Wait until ``count`` requests are done (True), or ``timeout`` passed."""
        with self.lock:
            return self.lock.wait_for(lambda: self.ok + self.failed >= count, timeout)

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        for worker in self.workers:
            worker.join(30)


def crashing(**settings: float) -> str:
    """A topology whose service ``flaky`` crashes at every start."""
    lines = "".join(f"{key} = {value}\n" for key, value in settings.items())
    return (f'[services.flaky]\nclass = "svc_nodes:CrashAtStart"\n'
            f'listen = "127.0.0.1:{free_port()}"\n{lines}')


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:  # no SO_REUSEPORT: fails while any replica listens
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_echo_example_spreads_connections_over_its_four_replicas(start) -> None:
    port = free_port()
    run = start(with_port((TOPOLOGIES / "echo.toml").read_text(), port))
    pids = run.serving(4)
    assert len(set(pids)) == 4
    for i in range(64):
        payload = f"message {i}\n".encode()
        assert echo_once(port, payload) == payload
    status = run.until(lambda s: s["services"][0]["served"] >= 64)
    served = [replica["served"] for replica in status["services"][0]["replicas"]]
    assert len(served) == 4 and all(count > 0 for count in served), served
    assert sum(served) == 64
    stop = subprocess.run(hiocluster_command("stop", "--control", run.control),
                          capture_output=True, text=True, timeout=60, env=run_env(run))
    assert stop.returncode == 0, stop.stderr
    assert run.finish() == 0
    assert "echo: stopped; 64 served, 0 restarts" in run.stdout
    assert port_is_free(port)


def run_env(run: Run) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_status_table_and_exit_codes(start, cli_env: dict[str, str]) -> None:
    port = free_port()
    run = start(with_port((TOPOLOGIES / "http.toml").read_text(), port))
    pids = run.serving(2)
    env = {**cli_env, "HIOCLUSTER_CONTROL": run.control}
    shown = subprocess.run(hiocluster_command("status"), capture_output=True, text=True,
                           env=env, timeout=30)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[1].split() == ["SERVICE", "REPLICA", "PID", "STATE", "RESTARTS", "UPTIME",
                                "CPU", "RSS", "SERVED", "CODE", "HEALTH"]
    rows = [line.split() for line in lines[2:4]]
    assert rows[0][-2] == rows[1][-2] and re.fullmatch(r"[0-9a-f]{12}", rows[0][-2])
    assert rows[0][-1] == rows[1][-1] == "-"  # no health check
    assert [(row[0], row[1], int(row[2]), row[3]) for row in rows] == \
        [("web", "0", pids[0], "serving"), ("web", "1", pids[1], "serving")] or \
        sorted(int(row[2]) for row in rows) == sorted(pids)
    assert lines[4] == f"web on 127.0.0.1:{port}: 2/2 serving, 0 restarts, 0 served"
    as_json = subprocess.run(hiocluster_command("status", "--json"), capture_output=True,
                             text=True, env=env, timeout=30)
    body = json.loads(as_json.stdout)
    assert body["control"] == run.control
    replica = body["services"][0]["replicas"][0]
    assert replica["rss"] > 1_000_000 and replica["cpu"] is not None
    # found without being told where, as the only run under the run root
    env.pop("HIOCLUSTER_CONTROL")
    assert subprocess.run(hiocluster_command("status"), capture_output=True, env=env,
                          timeout=30).returncode == 0
    run.close()
    gone = subprocess.run(hiocluster_command("status", "--control", run.control),
                          capture_output=True, text=True, env=env, timeout=30)
    assert gone.returncode == 4 and "no run at" in gone.stderr


def test_kill_9_of_a_replica_under_load(start) -> None:
    port = free_port()
    run = start(with_port((TOPOLOGIES / "http.toml").read_text(), port))
    pids = run.serving(2)
    # a warm spare stands by (once the replicas serve): it will take web.0's place
    spare = run.until(lambda s: s["services"][0]["spare"] is not None)["services"][0]["spare"]
    victim = run.status()["services"][0]["replicas"][0]["pid"]  # web.0's

    survivor = next(pid for pid in pids if pid != victim)

    def survivor_served(status: dict) -> int:  # the replica not killed
        return next(r["served"] for r in status["services"][0]["replicas"]
                    if r["pid"] == survivor)
    with Load(port, threads=4) as load:
        run.until(lambda s: s["services"][0]["served"] > 50)
        before = survivor_served(run.status())
        os.kill(victim, signal.SIGKILL)
        (new_pid,) = run.serving(1)
        run.until(lambda s: s["services"][0]["served"] > 0 and all(
            r["state"] == "serving" for r in s["services"][0]["replicas"]))
        assert load.reach(load.done() + 100)  # the load runs on against both
        # the other replica kept serving (its counts arrive at most every LOAD_S)
        after = survivor_served(run.until(lambda s: survivor_served(s) > before))
    # the warm spare took its place (no Python start-up): that is what makes it quick
    assert new_pid not in pids and new_pid == spare
    assert after > before
    assert load.failed <= 4, load.errors  # at most one in flight per client thread
    assert load.ok > 100
    status = run.status()["services"][0]
    assert status["restarts"] == 1
    assert any("web.0 was killed by signal 9: restarting in 0.1 s" in line for line in run.log)


def test_rolling_restart_under_load_loses_no_request(start, cli_env: dict[str, str]) -> None:
    port = free_port()
    run = start(with_port((TOPOLOGIES / "http.toml").read_text(), port))
    old = set(run.serving(2))
    with Load(port, threads=4) as load:
        run.until(lambda s: s["services"][0]["served"] > 50)
        restart = subprocess.run(
            hiocluster_command("restart", "web", "--control", run.control),
            capture_output=True, text=True, env=cli_env, timeout=60)
        during = load.done()
    assert restart.returncode == 0, restart.stderr
    assert "web: rolling restart of 2 replicas" in restart.stdout
    new = {replica["pid"] for replica in run.status()["services"][0]["replicas"]}
    assert len(new) == 2 and not new & old
    assert during > 0 and load.failed == 0, load.errors
    assert run.status()["services"][0]["restarts"] == 0  # a roll is no crash


@pytest.mark.parametrize("limit, said", [
    ("max_requests = 40", r"web\.\d served \d+ requests \(max_requests = 40 \+ 0\): replaced"),
    ("max_rss = 1_048_576", r"web\.\d uses [\d.]+ MiB \(max_rss = 1\.0 MiB\): replaced"),
], ids=["max_requests", "max_rss"])
def test_replicas_past_a_lifetime_limit_are_replaced_under_load_losing_nothing(
        start, limit: str, said: str) -> None:
    """max_requests = 40 (or max_rss = 1 MiB, which every replica is over):
    under load each replica is replaced once past it, its successor serving
    first; no request fails, none counts as a crash."""
    port = free_port()
    text = with_port((TOPOLOGIES / "http.toml").read_text(), port).replace(
        "replicas = 2\n", f"replicas = 2\n{limit}\n")
    run = start(text)
    first = set(run.serving(2))
    with Load(port, threads=4) as load:
        status = run.until(lambda s: s["services"][0]["replaced"] >= 3 and not first & {
            replica["pid"] for replica in s["services"][0]["replicas"]})  # theirs drained
    service = status["services"][0]
    assert load.failed == 0, load.errors
    assert service["restarts"] == 0 and load.ok >= 120
    run.expect(said)
    run.until(lambda s: s["services"][0]["served"] >= load.ok)  # every answer counted


def test_scale_two_four_one_keeps_serving(start, cli_env: dict[str, str]) -> None:
    port = free_port()
    run = start(with_port((TOPOLOGIES / "http.toml").read_text(), port))
    run.serving(2)
    with Load(port, threads=2) as load:
        for count in (4, 1):
            scaled = subprocess.run(
                hiocluster_command("scale", f"web={count}", "--control", run.control),
                capture_output=True, text=True, env=cli_env, timeout=60)
            assert scaled.returncode == 0, scaled.stderr
            replicas = run.status()["services"][0]["replicas"]
            assert [r["replica"] for r in replicas] == list(range(count))
            assert all(r["state"] == "serving" for r in replicas)
    assert load.ok > 0 and load.failed == 0, load.errors
    bad = subprocess.run(hiocluster_command("scale", "wbe=2", "--control", run.control),
                         capture_output=True, text=True, env=cli_env, timeout=60)
    assert bad.returncode == 1 and "no service 'wbe' (services: web)" in bad.stderr


def test_restart_intensity_exceeded_fails_the_run_cleanly(start) -> None:
    run = start(crashing(replicas=2, max_restarts=3, within=30, backoff=0.05))
    code = run.finish(60)
    assert code == 1
    message = ("hiocluster: run failed: service flaky failed: 4 crashes within 30 s "
               "(max_restarts = 3); the last: flaky.")
    assert any(line.startswith(message) and line.endswith("exited with code 7")
               for line in run.log), "\n".join(run.log)
    assert any(re.fullmatch(r"flaky\.[01] +\| crash-at-start replica [01]: exiting with 7",
                            line) for line in run.log), "\n".join(run.log)


def test_https_example_with_certificates_made_now(start, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    port = free_port()
    run = start(with_port((TOPOLOGIES / "https.toml").read_text(), port), name="https.toml")
    run.serving(2)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    data = tls_get(port, context)
    assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"hello over TLS\n")
    with pytest.raises((ConnectionError, OSError)):
        get(port)  # plaintext to the TLS port: no HTTP answer, the connection is dropped


def tls_get(port: int, context: ssl.SSLContext) -> bytes:
    """GET /hello over TLS to localhost:``port``: the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    return data


def test_the_readmes_certificate_command_makes_a_pair_the_https_example_serves(
        start, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl on this machine: the README's command needs it")
    readme = (REPO / "README.md").read_text().split("## Services", 1)[1]
    command = next(line for line in readme.splitlines() if line.startswith("openssl req "))
    (tmp_path / "topologies").mkdir()
    made = subprocess.run(shlex.split(command), cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert made.returncode == 0, made.stderr
    port = free_port()
    run = start(with_port((TOPOLOGIES / "https.toml").read_text(), port),
                name="topologies/https.toml")
    run.serving(2)
    trusting = ssl.create_default_context(cafile=str(tmp_path / "topologies" / "cert.pem"))
    assert tls_get(port, trusting).endswith(b"hello over TLS\n")


def test_idle_connections_do_not_stop_service_and_go_after_the_timeout(start) -> None:
    port = free_port()
    text = with_port((TOPOLOGIES / "http.toml").read_text(), port)
    run = start(text.replace("timeout = 30.0", "timeout = 1.5"))
    run.serving(2)
    # a recv waits at most 30 s: the server, not the 30 s default timeout, closes them
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(300)]
    try:
        assert get(port)[0] == 200  # served beside 300 idle connections
        for sock in idle:
            assert sock.recv(1) == b""  # closed by the server (blocks until then)
        assert get(port)[0] == 200
    finally:
        for sock in idle:
            sock.close()


def test_replica_output_is_prefixed_in_whole_lines(start) -> None:
    port = free_port()
    run = start(f"""
[services.chat]
class = "svc_nodes:Chatty"
replicas = 2
listen = "127.0.0.1:{port}"
""")
    run.serving(2)
    for _ in range(10):
        assert echo_once(port, b"ping") == b"ping"
    for _ in range(10):
        line = run.expect(r"got")
        assert re.fullmatch(r"chat\.[01] +\| replica [01] got 4 bytes", line.group(0)) or \
            re.fullmatch(r"chat\.[01] +\| replica [01] got 4 bytes", run.log[-1]), run.log[-1]


def test_sigterm_drains_and_exits_zero(start) -> None:
    port = free_port()
    run = start(with_port((TOPOLOGIES / "echo.toml").read_text(), port))
    run.serving(4)
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0
    assert "echo: stopped; 0 served, 0 restarts" in run.stdout
    assert port_is_free(port)


def test_kill_9_of_the_run_leaves_no_replica_file_or_port(start, no_leaks: Path) -> None:
    port = free_port()
    run = start(with_port((TOPOLOGIES / "echo.toml").read_text(), port))
    pids = run.serving(4)
    spare = run.until(lambda s: s["services"][0]["spare"] is not None)["services"][0]["spare"]
    run.proc.kill()
    assert run.finish() == -signal.SIGKILL
    pids.append(spare)  # a spare too leaves when its run is gone
    for pid in pids:  # orphans: each notices its supervisor is gone and exits
        wait_until(lambda: not psutil.pid_exists(pid), 30,
                   f"replica {pid} to exit after its supervisor")
    assert port_is_free(port)
    assert list(no_leaks.iterdir()) == []  # the last orphan out removed the run directory


def test_a_simulation_and_services_in_one_topology(start, cli_env: dict[str, str],
                                                   tmp_path: Path) -> None:
    port = free_port()
    gate = tmp_path / "gate"
    ring = (TOPOLOGIES / "ring.toml").read_text()
    ring = re.sub(r"ticks = \d+", "ticks = 60\ntick_timeout = 60.0", ring)
    ring = re.sub(r"tock = [\d.]+", "tock = 0.02\nreal = true", ring)
    # r0 holds the simulation at tick 1 until the test opens the gate: no race with a clock
    ring, held = re.subn(r'(\[nodes\.r0\]\n)class = "nodes\.ring:RingNode"\n'
                         r'params = \{ tokens = 3 \}',
                         rf'\1class = "svc_nodes:GatedRing"\n'
                         rf'params = {{ tokens = 3, gate = {json.dumps(str(gate))} }}', ring)
    assert held == 1
    run = start(ring + f"""
[services.echo]
class = "nodes.echo:Echo"
replicas = 2
listen = "127.0.0.1:{port}"
""")
    run.serving(2)
    assert echo_once(port, b"during the simulation") == b"during the simulation"
    run.until(lambda s: s["simulation"]["state"] == "running")
    shown = subprocess.run(hiocluster_command("status", "--control", run.control, "--json"),
                           capture_output=True, text=True, env=cli_env, timeout=30)
    status = json.loads(shown.stdout)
    simulation = status["simulation"]
    assert simulation["ticks"] == 60 and simulation["state"] == "running"
    assert simulation["tick"] < 60
    assert sorted(simulation["workers"]) == ["p0", "p1", "p2", "p3"]
    assert [row["service"] for row in status["services"]] == ["echo"]
    gate.touch()  # the simulation may end now
    assert run.finish(60) == 0  # the simulation ends, and the services with it
    assert "60 ticks, 8 nodes on 4 processes" in run.stdout
    assert "echo: stopped; 1 served, 0 restarts" in run.stdout
    assert port_is_free(port)


def test_status_says_3_while_a_replica_is_down_and_bad_commands_are_named(
        start, cli_env: dict[str, str]) -> None:
    import zmq

    run = start(crashing(replicas=1, max_restarts=1000, backoff=5, backoff_max=5))
    run.expect(r"flaky\.0 exited with code 7: restarting in 5 s")
    env = {**cli_env, "HIOCLUSTER_CONTROL": run.control}
    shown = subprocess.run(hiocluster_command("status"), capture_output=True, text=True,
                           env=env, timeout=30)
    assert shown.returncode == 3, shown.stdout + shown.stderr
    assert re.search(r"flaky +0 +- +backoff +1 ", shown.stdout), shown.stdout
    usage = subprocess.run(hiocluster_command("scale", "flaky=many"), capture_output=True,
                           text=True, env=env, timeout=30)
    assert usage.returncode == 2 and "expected NAME=N with N an integer" in usage.stderr
    refused = subprocess.run(hiocluster_command("restart", "nope"), capture_output=True,
                             text=True, env=env, timeout=30)
    assert refused.returncode == 1 and "no service 'nope' (services: flaky)" in refused.stderr
    too_many = subprocess.run(hiocluster_command("scale", "flaky=1000"), capture_output=True,
                              text=True, env=env, timeout=30)
    assert too_many.returncode == 1 and "replicas must be in 0..256" in too_many.stderr
    context = zmq.Context()
    try:  # a hostile frame on the endpoint: answered with what was wrong, run goes on
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(run.control)
        for frame in (b"\xc1garbage", proto.encode(proto.Answer(ok=True, detail="x"))):
            sock.send(frame)
            assert sock.poll(30_000)
            answer = proto.decode(sock.recv())
            assert isinstance(answer, proto.Answer) and not answer.ok
            assert answer.detail.startswith("bad command: ")
        sock.close()
    finally:
        context.term()
    assert run.status()["services"][0]["service"] == "flaky"


def test_readme_services_examples_are_real(start, cli_env: dict[str, str]) -> None:
    readme = (REPO / "README.md").read_text().split("## Services", 1)[1]
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert code.split("class Echo", 1)[1] in (REPO / "nodes" / "echo.py").read_text()
    toml = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    assert toml in (TOPOLOGIES / "echo.toml").read_text()  # the example is the real file
    shown = readme.split("<!-- status-example -->\n```text\n", 1)[1].split("```", 1)[0]
    port = free_port()
    run = start(with_port(toml, port), name="echo.toml")
    run.serving(4)
    for i in range(64):
        assert echo_once(port, b"%d" % i) == b"%d" % i
    run.until(lambda s: s["services"][0]["served"] == 64)
    victim = run.status()["services"][0]["replicas"][2]["pid"]
    os.kill(victim, signal.SIGKILL)
    run.serving(1)
    run.until(lambda s: all(r["state"] == "serving" for r in s["services"][0]["replicas"]))
    result = subprocess.run(hiocluster_command("status", "--control", run.control),
                            capture_output=True, text=True, env=cli_env, timeout=30)
    assert result.returncode == 0, result.stderr
    for expected, actual in zip(shown.strip().splitlines(), result.stdout.strip().splitlines(),
                                strict=True):
        # pids, times, sizes, counts and the code's hash differ; the words and the
        # layout do not
        pattern = re.sub(r"(?:\\ )+", r"\\s+", re.escape(
            re.sub(r"\b[0-9a-f]{12}\b", "CODE-HASH", expected)))
        pattern = re.sub(r"\d+(?:\\\.\d+)?", r"[0-9]+(?:\\.[0-9]+)?", pattern)
        pattern = pattern.replace("CODE\\-HASH", "[0-9a-f]{12}")
        assert re.fullmatch(pattern, actual), (expected, actual)
    assert result.stdout.strip().splitlines()[-1].endswith("4/4 serving, 1 restarts, 64 served")


def test_an_address_taken_by_another_program_fails_at_once(start) -> None:
    with socket.socket() as squatter:  # no SO_REUSEPORT: nobody may share it
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        run = start(with_port((TOPOLOGIES / "http.toml").read_text(), port))
        assert run.finish(60) == 1
    assert run.log[-1] == (f"hiocluster: run failed: service web failed: cannot listen on "
                           f"127.0.0.1:{port}: Address already in use")
    assert not any("serving on" in line for line in run.log)


APP = """from hiocluster.service import TcpService


class Echo(TcpService):
    def receive(self, remoter, data: bytes) -> None:
        remoter.tx(b"{tag}:" + data)
"""


def test_replicas_say_which_code_they_run_so_mixed_versions_show(start, tmp_path: Path,
                                                                   cli_env: dict[str, str]) -> None:
    """The code changes under a running service: the warm spare imported the old
    code, so the replica it becomes serves it; the spare made after the change
    has the new. `status` shows each replica's code version and that two serve."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "appmod.py").write_text(APP.format(tag="v1"))
    port = free_port()
    run = start(f'[services.echo]\nclass = "appmod:Echo"\nreplicas = 2\n'
                f'listen = "127.0.0.1:{port}"\n', "--app-dir", str(app))
    run.serving(2)
    before = run.until(lambda s: s["services"][0]["spare"] is not None)["services"][0]
    (old,) = {replica["version"] for replica in before["replicas"]}
    assert re.fullmatch(r"[0-9a-f]{12}", old) and before["versions"] == 1
    (app / "appmod.py").write_text(APP.format(tag="v2"))
    os.kill(before["replicas"][0]["pid"], signal.SIGKILL)
    run.serving(1)  # the spare, with the code it imported before the change
    run.until(lambda s: s["services"][0]["spare"] not in (None, before["spare"]))
    os.kill(before["replicas"][1]["pid"], signal.SIGKILL)
    run.serving(1)  # the spare made after the change
    after = run.until(lambda s: s["services"][0]["serving"] == 2 and not {
        r["pid"] for r in s["services"][0]["replicas"]} & {r["pid"] for r in before["replicas"]}
        )["services"][0]
    versions = [replica["version"] for replica in after["replicas"]]
    assert versions[0] == old and versions[1] not in ("", old)
    assert after["versions"] == 2
    table = subprocess.run(hiocluster_command("status", "--control", run.control),
                           capture_output=True, text=True, env=cli_env, timeout=30)
    assert "2 code versions serving" in table.stdout and versions[1] in table.stdout
    assert {echo_once(port, b"x") for _ in range(40)} <= {b"v1:x", b"v2:x"}


WEB_APP = """from nodes.web import Web as _Web, make_app


class Web(_Web):
    def app(self):
        return make_app("{tag} " + str(self.params.get("greeting", "hello")), str(self.replica))
"""


@pytest.mark.parametrize("how", ["SIGHUP", "hiocluster reload"])
def test_a_reload_under_load_serves_the_new_code_and_params_losing_nothing(
        start, tmp_path: Path, cli_env: dict[str, str], how: str) -> None:
    """The app's code and the topology's params change; SIGHUP to the run (or
    `hiocluster reload`) rolls every replica onto them, the spare (old code)
    retired first: no request fails, and every answer after is from the new."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "appweb.py").write_text(WEB_APP.format(tag="v1"))
    port = free_port()
    topology = ('[services.web]\nclass = "appweb:Web"\nreplicas = 2\n'
                f'listen = "127.0.0.1:{port}"\n[services.web.params]\ngreeting = "{{}}"\n')
    run = start(topology.format("hello"), "--app-dir", str(app))
    run.serving(2)
    before = run.until(lambda s: s["services"][0]["spare"] is not None)["services"][0]
    assert get(port)[1] == b"v1 hello\n"
    (app / "appweb.py").write_text(WEB_APP.format(tag="v2"))
    (tmp_path / "svc.toml").write_text(topology.format("bonjour"))
    with Load(port, threads=4) as load:
        assert load.reach(40)
        if how == "SIGHUP":
            run.proc.send_signal(signal.SIGHUP)
            run.expect(r"SIGHUP: web: reload of 2 replicas")
        else:
            done = subprocess.run(hiocluster_command("reload", "--control", run.control),
                                  capture_output=True, text=True, env=cli_env, timeout=60)
            assert done.returncode == 0, done.stderr
            assert "web: reload of 2 replicas" in done.stdout
        after = run.until(lambda s: s["services"][0]["rolling"] == 0 and not {
            r["pid"] for r in s["services"][0]["replicas"]} & {
            r["pid"] for r in before["replicas"]} and s["services"][0]["serving"] == 2)
        served = load.done()
        assert load.reach(served + 40)
    assert load.failed == 0, load.errors
    service = after["services"][0]
    assert service["restarts"] == 0 and service["versions"] == 1
    assert service["replicas"][0]["version"] != before["replicas"][0]["version"]
    assert {get(port)[1] for _ in range(20)} == {b"v2 bonjour\n"}
    if how == "hiocluster reload":  # a file that no longer loads changes nothing
        (tmp_path / "svc.toml").write_text(topology.format("x").replace("replicas = 2",
                                                                       "replicas = 0"))
        refused = subprocess.run(hiocluster_command("reload", "--control", run.control),
                                 capture_output=True, text=True, env=cli_env, timeout=60)
        assert refused.returncode != 0 and "cannot reload" in refused.stderr
        assert "services.web" in refused.stderr  # names what is wrong in it
        assert run.status()["services"][0]["rolling"] == 0


HEALTH_APP = """import os

import falcon

from nodes.web import Web as _Web, make_app


class _Ready:
    def __init__(self, where):
        self.where = where

    def on_get(self, req, resp):
        if os.path.exists(os.path.join(self.where, f"sick-{os.getpid()}")):
            resp.status = falcon.HTTP_503
        resp.text = "checked"


class Web(_Web):
    def app(self):
        app = make_app("hello", str(self.replica))
        app.add_route("/ready", _Ready(self.params["where"]))
        return app
"""


def test_a_replica_failing_its_health_check_is_replaced_under_load_losing_nothing(
        start, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """One replica's /ready starts answering 503: after health_failures checks in
    a row it stops taking connections and a fresh replica takes its socket; no
    request fails meanwhile, status shows health, and it counts as no crash."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "healthweb.py").write_text(HEALTH_APP)
    port = free_port()
    run = start(f'[services.web]\nclass = "healthweb:Web"\nreplicas = 2\n'
                f'listen = "127.0.0.1:{port}"\nhealth_path = "/ready"\n'
                f'health_interval = 0.2\nhealth_failures = 2\n'
                f'[services.web.params]\nwhere = "{tmp_path}"\n', "--app-dir", str(app))
    run.serving(2)
    before = run.until(lambda s: [r["health"] for r in s["services"][0]["replicas"]]
                       == ["ok", "ok"])["services"][0]
    sick = before["replicas"][0]["pid"]
    with Load(port, threads=4) as load:
        assert load.reach(40)
        (tmp_path / f"sick-{sick}").touch()
        run.expect(r"web\.0 failed its health check 2 times in a row \(ValueError: "
                   r"GET /ready: 503 Service Unavailable\): replaced")
        after = run.until(lambda s: sick not in {r["pid"] for r in s["services"][0]["replicas"]}
                          and [r["health"] for r in s["services"][0]["replicas"]]
                          == ["ok", "ok"])
        served = load.done()
        assert load.reach(served + 40)
    assert load.failed == 0, load.errors
    service = after["services"][0]
    assert (service["unhealthy"], service["restarts"], service["failed"]) == (1, 1, None)
    assert service["replicas"][1]["pid"] == before["replicas"][1]["pid"]
    assert not psutil.pid_exists(sick) or psutil.Process(sick).status() == "zombie"
    table = subprocess.run(hiocluster_command("status", "--control", run.control),
                           capture_output=True, text=True, env=cli_env, timeout=30)
    assert "HEALTH" in table.stdout and "1 replaced for failed health checks" in table.stdout


def test_a_reload_scales_to_the_files_number_of_replicas(start, tmp_path: Path,
                                                          cli_env: dict[str, str]) -> None:
    port = free_port()
    text = with_port((TOPOLOGIES / "http.toml").read_text(), port)
    run = start(text)
    run.serving(2)
    (tmp_path / "svc.toml").write_text(text.replace("replicas = 2", "replicas = 3"))
    done = subprocess.run(hiocluster_command("reload", "--control", run.control),
                          capture_output=True, text=True, env=cli_env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "web: reload of 2 replicas, then 2 -> 3 replicas" in done.stdout
    after = run.until(lambda s: s["services"][0]["serving"] == 3
                      and s["services"][0]["rolling"] == 0)["services"][0]
    assert (after["desired"], after["restarts"]) == (3, 0)
    assert {get(port)[0] for _ in range(12)} == {200}


def test_sigttin_and_sigttou_scale_every_service_by_one(start) -> None:
    port = free_port()
    run = start(with_port((TOPOLOGIES / "http.toml").read_text(), port))
    run.serving(2)
    run.proc.send_signal(signal.SIGTTIN)
    run.expect(r"SIGTTIN: web: 2 -> 3 replicas")
    run.until(lambda s: s["services"][0]["serving"] == 3)
    run.proc.send_signal(signal.SIGTTOU)
    run.expect(r"SIGTTOU: web: 3 -> 2 replicas")
    status = run.until(lambda s: len(s["services"][0]["replicas"]) == 2)["services"][0]
    assert status["desired"] == 2 and status["restarts"] == 0
    assert get(port)[0] == 200


COMMON = re.compile(r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] '
                    r'"GET /hello\?n=(\d+) HTTP/1\.1" 200 \d+')


def logged(path: Path, fmt: str) -> list[int]:
    """The request numbers in an access log file so far."""
    if not path.exists():
        return []
    numbers = []
    for line in path.read_text().splitlines():
        if fmt == "json":
            row = json.loads(line)
            assert (row["method"], row["status"], row["protocol"]) == ("GET", 200, "HTTP/1.1")
            assert row["remote"] == "127.0.0.1" and re.fullmatch(r"web\.[01]", row["replica"])
            numbers.append(int(row["path"].split("=")[1]))
        else:
            found = COMMON.fullmatch(line)
            assert found, line
            numbers.append(int(found.group(1)))
    return numbers


@pytest.mark.parametrize("fmt", ["common", "json"])
def test_access_log_a_line_per_request_reopened_on_sigusr1(start, tmp_path: Path,
                                                           fmt: str) -> None:
    port = free_port()
    text = with_port((TOPOLOGIES / "http.toml").read_text(), port).replace(
        "replicas = 2\n", f'replicas = 2\naccess_log = "access.log"\n'
                          f'access_log_format = "{fmt}"\n')
    run = start(text)
    run.serving(2)
    log = tmp_path / "access.log"
    for n in range(20):
        assert get(port, f"/hello?n={n}")[0] == 200
    wait_until(lambda: len(logged(log, fmt)) == 20, 30, "20 lines in the access log")
    assert sorted(logged(log, fmt)) == list(range(20))
    log.rename(tmp_path / "access.log.1")  # a rotation: then SIGUSR1, as logrotate does
    run.proc.send_signal(signal.SIGUSR1)
    run.expect(r"SIGUSR1: 2 replicas told to open their log files again")
    for _ in range(2):
        run.expect(r"web\.[01]\.\d+: SIGUSR1: log files opened again")
    for n in range(20, 30):
        assert get(port, f"/hello?n={n}")[0] == 200
    wait_until(lambda: len(logged(log, fmt)) == 10, 30, "10 lines in the new access log")
    assert sorted(logged(log, fmt)) == list(range(20, 30))
    assert sorted(logged(tmp_path / "access.log.1", fmt)) == list(range(20))


def test_an_access_log_line_cannot_be_forged_by_a_path() -> None:
    from hiocluster.services.serving import AccessLog

    log = AccessLog(lambda environ, start: (start("200 OK", []), [b"ok"])[1], "-")
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": '/a" 200 1\n1.2.3.4 - - "\\',
               "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": ("127.0.0.1", 1)}
    assert log(environ, lambda *args: None) == [b"ok"]
    (line,) = log.lines
    assert line.count("\n") == 1 and line.count('"') == 2, line
    assert '"GET /a\\x22 200 1\\n1.2.3.4 - - \\x22\\\\ HTTP/1.1" 200 2' in line


def test_access_log_to_the_runs_output(start) -> None:
    port = free_port()
    run = start(with_port((TOPOLOGIES / "http.toml").read_text(), port).replace(
        "replicas = 2\n", 'replicas = 2\naccess_log = "-"\n'))
    run.serving(2)
    assert get(port, "/hello?n=7")[0] == 200
    line = run.expect(r"web\.[01] +\| 127\.0\.0\.1 - - \[").string
    assert COMMON.fullmatch(line.split("| ", 1)[1]).group(1) == "7"  # type: ignore[union-attr]
