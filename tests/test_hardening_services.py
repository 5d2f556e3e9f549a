"""Services against hostile clients and signals, end to end: `hiocluster run` with
real replica processes, real clients on loopback (tests/test_cluster_services.py's
helpers). Every replica's pid is checked unchanged where nothing should end it.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import time
from typing import Any

import psutil
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from test_cluster_services import (TOPOLOGIES, echo_once, free_port, get, start,  # noqa: F401
                                   with_port)  # (start: a fixture)
from waiting import wait_until

pytestmark = pytest.mark.timeout(120)


def http_topology(port: int, **keys: Any) -> str:
    """topologies/http.toml on ``port``, with ``keys`` set in [services.web]."""
    text = with_port((TOPOLOGIES / "http.toml").read_text(), port)
    for key, value in keys.items():
        text, found = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        if not found:
            text = text.replace("[services.web]\n", f"[services.web]\n{key} = {value}\n", 1)
    return text


def exchange(port: int, data: bytes, *, pieces: int = 1, quiet: float = 0.3) -> bytes:
    """Send ``data`` (in ``pieces``: a slow sender), then read until the server
    closes or says nothing for ``quiet`` seconds; what it answered. A reset is no
    failure here. (No half-close: hio takes it for a closed connection.)"""
    got = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            step = max(1, len(data) // pieces)
            for at in range(0, len(data), step):
                sock.sendall(data[at:at + step])
            sock.settimeout(quiet)
            while chunk := sock.recv(65536):
                got.extend(chunk)
        except OSError:  # reset, closed already, or quiet: a request still incomplete
            pass
    return bytes(got)


def ask(port: int, request: bytes) -> bytes:
    """One request whose answer ends with the connection (Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        got = bytearray()
        try:
            while chunk := sock.recv(65536):
                got.extend(chunk)
        except ConnectionResetError:
            pass
    return bytes(got)


def pids(run: Any) -> list[int]:
    return [r["pid"] for r in run.status()["services"][0]["replicas"]]


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


# -- 1. one valid request killed a replica; eight killed the service --------------

def test_host_without_space_and_bad_lines_do_not_end_a_replica(start) -> None:
    port = free_port()
    run = start(http_topology(port))
    before = sorted(run.serving(2))
    for _ in range(8):
        reply = ask(port, b"GET /hello HTTP/1.1\r\nHost:x\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply[:100]
        assert reply.endswith(b"hello from hiocluster\n")
        reply = ask(port, b"GET /hello HTTP/1.1\r\nHost x\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n"), reply[:100]
        reply = ask(port, b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                          b"\r\nzz\r\n")
        assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n"), reply[:100]
    assert sorted(pids(run)) == before
    assert run.status()["services"][0]["restarts"] == 0
    assert not any("exited" in line or "killed" in line for line in run.log), run.log


REQUEST_LINES = st.sampled_from([
    b"GET /hello HTTP/1.1", b"GET /hello HTTP/1.0", b"POST /hello HTTP/1.1", b"GET  HTTP/1.1",
    b"GET /hello", b"GET /hello HTTP/9.9", b"BREW /hello HTTP/1.1", b"", b"\x00\xff GET",
    b"GET http://[::1/ HTTP/1.1", b"GET http://x:99999999/ HTTP/1.1", b"GET /" + b"a" * 70_000
    + b" HTTP/1.1", b"GET /hello HTTP/1.1 x"])
HEADERS = st.lists(st.one_of(
    st.sampled_from([b"Host:x", b"Host x", b"Host : x", b" folded", b"Connection: close",
                     b"Connection: keep-alive", b"Transfer-Encoding: chunked",
                     b"Transfer-Encoding: gzip", b"Content-Length: -1",
                     b"Content-Length: 10", b"Content-Length: 99999999999999999999",
                     b"Content-Length: zz", b"X: " + b"y" * 70_000, b":", b"\xff\xfe: \x00"]),
    st.binary(max_size=40)), max_size=8)
BODIES = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"zz\r\n", b"-5\r\nabc\r\n", b"ffffffffffff\r\n", b"1\r\nab\r\n0\r\n\r\n",
                     b"5;x=y\r\nabcde\r\n0\r\n\r\n", b"0\r\nTrailer x\r\n\r\n",
                     b"1\r\nz\r\n" * 30_000, b"z" * 300_000]))


@st.composite
def http_cases(draw: Any) -> tuple[bytes, int]:
    line = draw(REQUEST_LINES)
    head = b"\r\n".join([line, *draw(HEADERS)]) + b"\r\n\r\n"
    message = head + draw(BODIES)
    if draw(st.booleans()):  # pipelined: a second request behind it
        message += b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n" + message[:draw(st.integers(0, 60))]
    return message, draw(st.sampled_from([1, 1, 3, 17]))


def test_fuzzed_http_never_ends_a_replica_and_memory_stays_bounded(start) -> None:
    port = free_port()
    run = start(http_topology(port, max_body=65536, replicas=1, spare="false"))
    (pid,) = run.serving(1)
    for _ in range(20):  # warm: what a replica allocates serving at all
        assert get(port)[0] == 200
    baseline = rss(pid)
    seen: set[int] = set()

    @settings(max_examples=250, database=None)
    @given(http_cases())
    @example((b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n", 1))
    @example((b"GET /hello HTTP/1.1\r\nHost:x\r\n\r\n", 1))
    def case(generated: tuple[bytes, int]) -> None:
        message, pieces = generated
        reply = exchange(port, message, pieces=pieces)
        if reply:
            assert reply.startswith(b"HTTP/1.1 "), reply[:80]
            seen.add(int(reply.split()[1]))

    case()
    assert pids(run) == [pid], run.log[-20:]
    assert get(port)[0] == 200
    assert {200, 400, 413} <= seen, seen
    grown = rss(pid) - baseline
    assert grown < 48 << 20, f"the replica grew by {grown / 2**20:.0f} MiB"
    assert run.status()["services"][0]["restarts"] == 0


TCP_ECHO = """
[services.echo]
class = "nodes.echo:Echo"
replicas = 1
spare = false
timeout = 5.0
listen = "127.0.0.1:{port}"
"""


def test_fuzzed_tcp_never_ends_a_replica_and_memory_stays_bounded(start) -> None:
    port = free_port()
    run = start(TCP_ECHO.format(port=port))
    (pid,) = run.serving(1)
    assert echo_once(port, b"warm") == b"warm"
    baseline = rss(pid)

    @settings(max_examples=100, database=None)
    @given(st.binary(max_size=2000), st.sampled_from([0, 1, 64 << 10, 4 << 20]),
           st.sampled_from(["read", "close", "reset", "stall"]))
    def case(data: bytes, extra: int, how: str) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            if how == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.sendall(data)
            if how == "read":
                got = b""
                while len(got) < len(data):
                    got += sock.recv(65536)
                assert got == data
            sock.setblocking(False)
            sent = 0
            deadline = time.monotonic() + 5
            while sent < extra and time.monotonic() < deadline:  # echo without reading
                try:
                    sent += sock.send(b"x" * min(65536, extra - sent))
                except BlockingIOError:
                    break  # the replica stopped reading: it does not buffer without end
                except ConnectionError:
                    break
        finally:
            sock.close()

    case()
    assert pids(run) == [pid]
    assert echo_once(port, b"still here") == b"still here"
    grown = rss(pid) - baseline
    assert grown < 48 << 20, f"the replica grew by {grown / 2**20:.0f} MiB"


# -- 2. bodies are bounded, and the timeout covers the whole request ---------------

def test_a_body_over_max_body_is_refused_without_buffering_it(start) -> None:
    port = free_port()
    run = start(http_topology(port, max_body=65536, replicas=1, spare="false"))
    (pid,) = run.serving(1)
    assert get(port)[0] == 200
    baseline = rss(pid)
    reply = ask(port, b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 300000000\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413 Content Too Large\r\n"), reply[:100]
    for body in (b"1000\r\n" + b"z" * 4096 + b"\r\n", b"1\r\nz\r\n"):  # chunked, 40 MB sent
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            block = body * ((1 << 20) // len(body))
            answer = b""
            try:
                for _ in range(40):
                    sock.sendall(block)
            except ConnectionError:
                pass  # refused and closed: the rest of the body is not read
            try:
                while chunk := sock.recv(65536):
                    answer += chunk
            except ConnectionError:
                pass
        assert answer == b"" or answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    assert pids(run) == [pid]
    grown = rss(pid) - baseline
    assert grown < 16 << 20, f"the replica grew by {grown / 2**20:.0f} MiB"
    assert get(port)[0] == 200


def test_a_request_trickled_in_fast_is_cut_at_the_timeout(start) -> None:
    port = free_port()
    run = start(http_topology(port, replicas=1, spare="false", max_body=1 << 30,
                              timeout=2.0))
    (pid,) = run.serving(1)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        block = b"1\r\nz\r\n" * 10_000
        deadline = time.monotonic() + 60  # bounded: the server must cut it well before
        cut = False
        while time.monotonic() < deadline:
            try:
                sock.sendall(block)
            except ConnectionError:
                cut = True
                break
        assert cut, "a request that never ends was not cut"
    assert pids(run) == [pid]


# -- 3. out of file descriptors ----------------------------------------------------

def test_out_of_descriptors_a_replica_pauses_accepting_and_lives(start) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    port = free_port()
    run = start(http_topology(port, replicas=1, spare="false"))
    (pid,) = run.serving(1)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (128, 128))
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(300)]
    try:
        run.expect(r"cannot accept \(Too many open files\): not accepting for a moment")
        assert pids(run) == [pid]
        for sock in idle[:250]:
            sock.close()
        del idle[:250]
        assert get(port, timeout=30)[0] == 200
    finally:
        for sock in idle:
            sock.close()
    assert pids(run) == [pid]
    assert sum("cannot accept" in line for line in run.log) == 1


# -- 4. HUP, USR1, USR2 ------------------------------------------------------------

def test_hup_and_usr_signals_end_neither_the_run_nor_a_replica(start) -> None:
    port = free_port()
    run = start(http_topology(port))
    before = sorted(run.serving(2))
    spare = run.until(lambda s: s["services"][0]["spare"] is not None)["services"][0]["spare"]
    for signum in (signal.SIGHUP, signal.SIGUSR2):
        if signum != signal.SIGHUP:  # the run reloads on SIGHUP (test_cluster_services)
            run.proc.send_signal(signum)
            run.expect(rf"hiocluster +\| {signum.name} ignored")
        for pid in (*before, spare):
            os.kill(pid, signum)
        for _ in before:
            run.expect(rf"web\.[01] +\| web\.[01]\.\d+: {signum.name} ignored")
    assert get(port)[0] == 200
    status = run.status()["services"][0]
    assert sorted(pids(run)) == before and status["spare"] == spare
    assert status["restarts"] == 0
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0


# -- 5. a hung replica is replaced ------------------------------------------------

def test_a_stopped_replica_is_killed_and_replaced(start) -> None:
    port = free_port()
    run = start(http_topology(port, replicas=1, heartbeat=1.5))
    (pid,) = run.serving(1)
    os.kill(pid, signal.SIGSTOP)
    try:
        run.expect(rf"web\.0 \(pid {pid}\) silent for [\d.]+ s \(heartbeat = 1.5 s\): hung")
        (new,) = run.serving(1)
        assert new != pid
        answered = sum(get(port, timeout=10)[0] == 200 for _ in range(32))
        assert answered == 32
        wait_until(lambda: not psutil.pid_exists(pid) or
                   psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                   timeout=10, what=f"the stopped replica {pid} to be gone")
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)
    status = run.status()["services"][0]
    assert [r["pid"] for r in status["replicas"]] == [new] and status["restarts"] == 1


def test_an_idle_replica_is_not_taken_for_hung(start) -> None:
    port = free_port()
    run = start(http_topology(port, replicas=1, spare="false", heartbeat=0.6))
    (pid,) = run.serving(1)
    # idle for ten heartbeats: its loop sleeps, and still beats
    wait_until(lambda: run.status()["services"][0]["replicas"][0]["uptime"] > 6,
               timeout=30, what="six seconds of serving")
    assert pids(run) == [pid] and get(port)[0] == 200


# -- 6. a second run on the same port ---------------------------------------------

def test_a_second_run_on_the_same_address_is_refused(start) -> None:
    port = free_port()
    first = start(http_topology(port), name="first.toml")
    before = sorted(first.serving(2))
    second = start(http_topology(port), name="second.toml")
    assert second.finish(60) == 1
    assert second.log[-1] == (f"hiocluster: run failed: service web failed: cannot listen "
                              f"on 127.0.0.1:{port}: Address already in use")
    assert not any("serving on" in line for line in second.log)
    assert sorted(pids(first)) == before and get(port)[0] == 200
