"""Services benchmark: hiocluster's HTTP replicas beside hio and gunicorn, same run.

Serves the falcon app of nodes/web.py (``GET /hello``) from, one at a time:

* ``hiocluster``: ``hiocluster run`` of a temporary topology with 1 and with 2
  replicas of ``nodes.web:Web`` on one free loopback port (SO_REUSEPORT), and 1
  replica writing an access log (a file; the issue "operable services" asks
  <= 10 % at c=64), and 1 replica in a run whose Prometheus endpoint is scraped
  every second (asked: <= 2 %);
* ``hio fixed-tock``: hio's own WSGI server (``hio.core.http.serving.Server``)
  with its ``ServerDoer`` in hio's own ``Doist(real=True, tock=0.001)``, in a
  child process (this file, run with the hidden ``--hio-server PORT``);
* ``gunicorn``: the sync worker with 1 and 2 workers, and gthread (2 workers,
  4 threads each), serving ``nodes.web:app`` (skipped when gunicorn is missing).

Each server is measured with wrk (Debian's package; ``apt-get install -y wrk``
when missing, as root) at 1, 16 and 64 connections (``-t1`` at 1, ``-t2``
otherwise), after a short warm-up: requests/s and p50/p99 latency. Where wrk
cannot be had, a bounded keep-alive HTTP/1.1 client in Python stands in (and
says so); it is much slower than wrk, so its figures say less. Then the
idle CPU of every server process (replicas, gunicorn master and workers) over a
few seconds with no load, as % of one core. Every figure is the best of R
rounds (req/s highest, latencies and idle CPU lowest), the servers taking
turns within each round, so no server runs while another is measured.

Targets (the services issue): hiocluster per replica >= 3x gunicorn sync
(1 worker) at 16 and 64 connections; single-connection p50 <= 0.3 ms with
idle CPU <= 2% of a core per replica; 2 replicas >= 1.6x one replica (at 16
and 64 connections, the worse counts) on the same cores as wrk.

    python bench/services.py [--quick] [--duration S] [--idle S] [--repeat R]
                             [--connections 1,16,64] [--client auto|wrk|python]
"""

from __future__ import annotations

import argparse
import array
import contextlib
import importlib.util
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import multiprocessing

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PYTHON = sys.executable
HOST = "127.0.0.1"
PATH = "/hello"
READY_S = 30.0      # most seconds a server may take to answer its first request
GRACE_S = 10.0      # seconds between SIGTERM and SIGKILL
FALLBACK_MAX = 100_000  # most requests one fallback client process makes per run
SCRAPE_S = 1.0      # seconds between scrapes of the metrics endpoint


# -- processes -----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def get_ok(port: int, timeout: float = 1.0) -> bool:
    """One ``GET /hello`` answered 200."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(f"GET {PATH} HTTP/1.1\r\nHost: {HOST}\r\n"
                         "Connection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.startswith(b"HTTP/1.1 200") or data.startswith(b"HTTP/1.0 200")
    except OSError:
        return False


def wait_until(check: Callable[[], bool], what: str, proc: subprocess.Popen,
               deadline_s: float = READY_S) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: exited with {proc.returncode} before it was ready")
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {deadline_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to ``proc`` and, after a grace, SIGKILL; then the same for any of its
    descendants still alive (by pid, as found before the SIGTERM)."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if descendants:
        _gone, alive = psutil.wait_procs(descendants, timeout=GRACE_S)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.terminate()
        _gone, alive = psutil.wait_procs(alive, timeout=GRACE_S)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(alive, timeout=GRACE_S)


@dataclass
class Running:
    """A server under test: its port, the processes to measure idle (name, pid) and
    its log (stderr)."""

    port: int
    processes: list[tuple[str, int]]
    log: str = ""
    per_unit: list[str] = field(default_factory=list)  # the names counted "per replica"


@contextlib.contextmanager
def started(argv: list[str], env: dict[str, str] | None = None) -> Iterator[
        tuple[subprocess.Popen, str]]:
    """``argv`` in a new session, its stderr (and stdout) in a temporary file."""
    log = tempfile.NamedTemporaryFile("w+", prefix="hioc-bench-", suffix=".log", delete=False)
    proc = None
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                cwd=REPO, env=env, start_new_session=True)
        yield proc, log.name
    finally:
        if proc is not None:
            stop(proc)
        log.close()
        os.unlink(log.name)


def read_log(path: str) -> str:
    with open(path, errors="replace") as handle:
        return handle.read()


@contextlib.contextmanager
def hiocluster(replicas: int, access_log: bool = False, metrics: bool = False
               ) -> Iterator[Running]:
    port = free_port()
    run_dir = tempfile.mkdtemp(prefix="hioc-bench-")
    topology = os.path.join(run_dir, "web.toml")
    metrics_port = free_port()
    with open(topology, "w") as handle:
        if metrics:
            handle.write(f'[run]\nmetrics = "{HOST}:{metrics_port}"\n\n')
        handle.write(f'[services.web]\nclass = "nodes.web:Web"\nreplicas = {replicas}\n'
                     f'listen = "{HOST}:{port}"\ntimeout = 30.0\ndrain = 5.0\n'
                     + ('access_log = "access.log"\n' if access_log else ""))
    try:
        with started([PYTHON, "-m", "hiocluster", "run", topology, "--app-dir", REPO]) as (
                proc, log):
            wait_until(lambda: read_log(log).count(" serving on ") >= replicas
                       and get_ok(port), f"hiocluster {replicas} replicas", proc)
            pids = [int(pid) for pid in re.findall(r" serving on \S+ \(pid (\d+)\)",
                                                    read_log(log))]
            names = [f"replica {i}" for i in range(len(pids))]
            running = Running(port, [("supervisor", proc.pid), *zip(names, pids)],
                              per_unit=names)
            scraping = threading.Event()
            scraper = threading.Thread(target=scrape, args=(metrics_port, scraping),
                                       daemon=True) if metrics else None
            if scraper is not None:
                scraper.start()
            try:
                yield running
            finally:
                scraping.set()
                if scraper is not None:
                    scraper.join(10)
                running.log = read_log(log)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def scrape(port: int, done: threading.Event) -> None:
    """GET /metrics every SCRAPE_S until ``done`` (Prometheus scrapes every 15 s by
    default: this is 15 times harsher)."""
    while not done.wait(SCRAPE_S):
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as answer:
                answer.read()
        except OSError as exc:
            print(f"# metrics scrape failed: {exc}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def hio_fixed_tock() -> Iterator[Running]:
    port = free_port()
    with started([PYTHON, os.path.abspath(__file__), "--hio-server", str(port)]) as (
            proc, log):
        wait_until(lambda: get_ok(port), "hio fixed-tock", proc)
        running = Running(port, [("server", proc.pid)], per_unit=["server"])
        try:
            yield running
        finally:
            running.log = read_log(log)


@contextlib.contextmanager
def gunicorn(workers: int, kind: str) -> Iterator[Running]:
    port = free_port()
    argv = [PYTHON, "-m", "gunicorn", "-w", str(workers), "-k", kind, "-b", f"{HOST}:{port}",
            "--chdir", REPO]
    if kind == "gthread":
        argv += ["--threads", "4"]
    with started(argv + ["nodes.web:app"]) as (proc, log):
        master = psutil.Process(proc.pid)
        wait_until(lambda: len(master.children()) >= workers and get_ok(port),
                   f"gunicorn {kind} {workers} workers", proc)
        deadline = time.monotonic() + READY_S  # every worker has booted (imported the app)
        while read_log(log).count("Booting worker") < workers and time.monotonic() < deadline:
            time.sleep(0.05)
        names = [f"worker {i}" for i in range(workers)]
        running = Running(port, [("master", proc.pid),
                                 *zip(names, [child.pid for child in master.children()])],
                          per_unit=names)
        try:
            yield running
        finally:
            running.log = read_log(log)


def hio_server(port: int) -> None:
    """The hidden ``--hio-server PORT``: nodes.web:app on hio's own WSGI server in
    hio's own fixed-tock loop, until SIGTERM."""
    from hio.base.doing import Doist
    from hio.core.http import serving

    from nodes.web import app

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)
    server = serving.Server(ha=(HOST, port), app=app)
    doist = Doist(real=True, tock=0.001, doers=[serving.ServerDoer(server=server)])
    doist.do()  # ServerDoer.enter reopens (listens); exit closes


# -- clients -------------------------------------------------------------------------

@dataclass
class Result:
    rate: float          # requests/s
    p50: float           # seconds
    p99: float
    errors: str = ""     # what wrk (or the fallback) counted as errors, if any
    client_cpu: float = float("nan")  # cores the client itself used meanwhile


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_wrk(text: str) -> Result:
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    quantiles = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+(?:us|ms|s|m|h))\s*$", text, re.M))
    if rate is None or set(quantiles) != {"50", "99"}:
        raise RuntimeError(f"cannot read wrk's output:\n{text}")

    def seconds(value: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value).groups()  # type: ignore
        return float(number) * _UNITS[unit]

    errors = []
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                              r"timeout (\d+)", text)
    if socket_errors:
        names = ("connect", "read", "write", "timeout")
        errors += [f"{count} {name}" for name, count in zip(names, socket_errors.groups())
                   if int(count)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors.append(f"{non2xx.group(1)} non-2xx")
    return Result(float(rate.group(1)), seconds(quantiles["50"]), seconds(quantiles["99"]),
                  ", ".join(errors))


def wrk(port: int, connections: int, duration: float) -> Result:
    threads = 1 if connections == 1 else 2
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
            "--latency", f"http://{HOST}:{port}{PATH}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    took = time.monotonic() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    result = parse_wrk(done.stdout)
    result.client_cpu = (after.ru_utime + after.ru_stime - before.ru_utime
                         - before.ru_stime) / took
    return result


def _client(port: int, connections: int, duration: float,
            limit: int) -> tuple[float, bytes, int]:
    """One fallback client process: ``connections`` keep-alive HTTP/1.1 connections,
    each sending the next request once the last response is in; ends after
    ``duration`` seconds or ``limit`` requests. (seconds, latencies, errors)."""
    request = f"GET {PATH} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    selector = selectors.DefaultSelector()
    latencies = array.array("d")
    errors = 0
    state: dict[socket.socket, list] = {}  # sock -> [buffer, sent at]

    def connect() -> None:
        sock = socket.create_connection((HOST, port), timeout=5.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        state[sock] = [b"", time.perf_counter()]
        sock.sendall(request)

    def drop(sock: socket.socket) -> None:
        selector.unregister(sock)
        sock.close()
        del state[sock]

    start = time.perf_counter()
    deadline = start + duration
    for _ in range(connections):
        connect()
    while time.perf_counter() < deadline and len(latencies) < limit and state:
        for key, _events in selector.select(timeout=0.1):
            sock = key.fileobj
            try:
                chunk = sock.recv(65536)  # type: ignore[union-attr]
            except OSError:
                chunk = b""
            entry = state[sock]  # type: ignore[index]
            if not chunk:  # closed by the server
                if entry[0]:
                    errors += 1
                drop(sock)  # type: ignore[arg-type]
                connect()
                continue
            entry[0] += chunk
            head_end = entry[0].find(b"\r\n\r\n")
            if head_end < 0:
                continue
            head = entry[0][:head_end].lower()
            length = re.search(rb"content-length:\s*(\d+)", head)
            size = head_end + 4 + (int(length.group(1)) if length else 0)
            if len(entry[0]) < size:
                continue
            now = time.perf_counter()
            latencies.append(now - entry[1])
            if not head.startswith(b"http/1.1 200"):
                errors += 1
            if b"connection: close" in head or not length:
                drop(sock)  # type: ignore[arg-type]
                connect()
            else:
                entry[0], entry[1] = entry[0][size:], now
                sock.sendall(request)  # type: ignore[union-attr]
    elapsed = time.perf_counter() - start
    for sock in list(state):
        drop(sock)
    selector.close()
    return elapsed, latencies.tobytes(), errors


def python_client(port: int, connections: int, duration: float) -> Result:
    """The fallback: one client process at 1 connection, else two (like wrk -t2)."""
    processes = 1 if connections == 1 else 2
    shares = [connections // processes + (i < connections % processes)
              for i in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(_client, port, share, duration, FALLBACK_MAX) for share in shares]
        outcomes = [future.result(timeout=duration + 60) for future in futures]
    latencies = array.array("d")
    rate = 0.0
    for elapsed, data, _errors in outcomes:
        part = array.array("d", data)
        rate += len(part) / elapsed
        latencies.extend(part)
    ordered = sorted(latencies)
    if not ordered:
        raise RuntimeError("the fallback client got no response")
    errors = sum(outcome[2] for outcome in outcomes)
    return Result(rate, ordered[len(ordered) // 2], ordered[min(len(ordered) - 1,
                                                          int(len(ordered) * 0.99))],
                  f"{errors} errors" if errors else "")


def find_wrk(client: str) -> str | None:
    """The wrk binary (installed with apt-get when missing and we may), or None."""
    if client == "python":
        return None
    if shutil.which("wrk") is None and shutil.which("apt-get") and os.geteuid() == 0:
        print("# wrk is missing: apt-get install -y wrk", file=sys.stderr, flush=True)
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(["apt-get", "install", "-y", "wrk"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=300,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = shutil.which("wrk")
    if found is None and client == "wrk":
        raise SystemExit("wrk is missing and cannot be installed")
    return found


# -- measuring -----------------------------------------------------------------------

def idle_cpu(processes: list[tuple[str, int]], seconds: float) -> dict[str, float]:
    """% of one core each process used over ``seconds`` of no load."""
    handles = {}
    for name, pid in processes:
        with contextlib.suppress(psutil.Error):
            handles[name] = psutil.Process(pid)

    def used(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    before = {name: used(process) for name, process in handles.items()}
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    return {name: 100.0 * (used(process) - before[name]) / elapsed
            for name, process in handles.items()}


def quiet(port: int, deadline_s: float = 5.0) -> None:
    """Wait until no client connection to ``port`` is still open (wrk's last ones)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            busy = [c for c in psutil.net_connections("tcp") if c.laddr
                    and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED]
        except psutil.Error:
            return
        if not busy:
            return
        time.sleep(0.05)


@dataclass
class Config:
    label: str
    start: Callable[[], contextlib.AbstractContextManager]
    results: dict[int, Result] = field(default_factory=dict)
    idle: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    per_unit: list[str] = field(default_factory=list)

    def keep(self, connections: int, result: Result) -> None:
        old = self.results.get(connections)
        if old is None:
            self.results[connections] = result
        else:  # best of each figure
            best = result if result.rate > old.rate else old
            self.results[connections] = Result(
                best.rate, min(old.p50, result.p50), min(old.p99, result.p99),
                "; ".join(e for e in (old.errors, result.errors) if e), best.client_cpu)

    def keep_idle(self, cpu: dict[str, float]) -> None:
        for name, value in cpu.items():
            self.idle[name] = min(self.idle.get(name, value), value)

    def unit_idle(self) -> float:
        """The highest idle CPU of one replica (worker, server)."""
        return max((self.idle[name] for name in self.per_unit if name in self.idle),
                   default=float("nan"))


def measure(config: Config, connections: list[int], duration: float, idle_s: float,
            client: Callable[[int, int, float], Result], warmup: float) -> None:
    with config.start() as running:
        config.per_unit = running.per_unit
        client(running.port, max(connections), warmup)  # warm-up, not counted
        for count in connections:
            config.keep(count, client(running.port, count, duration))
        quiet(running.port)
        config.keep_idle(idle_cpu(running.processes, idle_s))
    problems = [line.strip() for line in running.log.splitlines()
                if re.search(r"error|traceback|exception|warn", line, re.I)]
    for line in problems[:5]:
        if line not in config.notes:
            config.notes.append(line)


# -- output --------------------------------------------------------------------------

def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def ratio(a: Config | None, b: Config | None, connections: int) -> float | None:
    if a is None or b is None or connections not in a.results or connections not in b.results:
        return None
    return a.results[connections].rate / b.results[connections].rate


def show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter measurements, one round")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per measurement (default 3, --quick 1)")
    parser.add_argument("--idle", type=float, default=None,
                        help="seconds of idle CPU measurement (default 3, --quick 1)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="best of R rounds (default 2, --quick 1)")
    parser.add_argument("--connections", default="1,16,64")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto",
                        help="wrk, the Python fallback, or wrk when it can be had")
    parser.add_argument("--hio-server", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hio_server is not None:
        hio_server(args.hio_server)
        return
    duration = args.duration or (1.0 if args.quick else 3.0)
    idle_s = args.idle or (1.0 if args.quick else 3.0)
    repeat = args.repeat or (1 if args.quick else 2)
    warmup = 0.5 if args.quick else 1.0
    connections = [int(c) for c in args.connections.split(",")]

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # the finally blocks stop every server

    signal.signal(signal.SIGTERM, terminate)

    wrk_path = find_wrk(args.client)
    if wrk_path:
        version = subprocess.run([wrk_path, "--version"], capture_output=True, text=True)
        name = (version.stdout + version.stderr).split(" [")[0].strip() or "wrk"
        client: Callable[[int, int, float], Result] = wrk
    else:
        name = "the Python fallback client (no wrk): bounded keep-alive HTTP/1.1, " \
               f"at most {FALLBACK_MAX:,} requests per process"
        client = python_client
        duration = max(1.0, duration)

    configs = [Config("hiocluster 1 replica", lambda: hiocluster(1)),
               Config("hiocluster 1 replica, access log", lambda: hiocluster(1, True)),
               Config("hiocluster 1 replica, metrics", lambda: hiocluster(1, metrics=True)),
               Config("hiocluster 2 replicas", lambda: hiocluster(2)),
               Config("hio fixed-tock", hio_fixed_tock)]
    have_gunicorn = importlib.util.find_spec("gunicorn") is not None
    if have_gunicorn:
        configs += [Config("gunicorn sync 1 worker", lambda: gunicorn(1, "sync")),
                    Config("gunicorn sync 2 workers", lambda: gunicorn(2, "sync")),
                    Config("gunicorn gthread 2 workers", lambda: gunicorn(2, "gthread"))]
    print(f"# hiocluster services benchmark: {os.cpu_count()} cpus, {name}, "
          f"{duration:g} s per measurement, idle CPU over {idle_s:g} s, best of {repeat}; "
          f"load average {os.getloadavg()[0]:.2f} at start", flush=True)
    if not have_gunicorn:
        print("# gunicorn is not importable here: its baselines are skipped", flush=True)

    for round_ in range(repeat):
        for config in configs:
            print(f"# round {round_ + 1}/{repeat}: {config.label}", file=sys.stderr, flush=True)
            measure(config, connections, duration, idle_s, client, warmup)

    width = max(len(config.label) for config in configs)
    cwidth = max(len(f"c={count}:") for count in connections)
    for config in configs:
        for count in connections:
            result = config.results[count]
            errors = f" ({result.errors})" if result.errors else ""
            client = "" if result.client_cpu != result.client_cpu else \
                f"  (client {result.client_cpu:.2f} cores)"
            print(f"{config.label:<{width}} {f'c={count}:':<{cwidth}} {result.rate:>8,.0f} req/s "
                  f"p50 {ms(result.p50):>9} p99 {ms(result.p99):>9}{errors}{client}")

    by_label = {config.label: config for config in configs}
    one, two = by_label["hiocluster 1 replica"], by_label["hiocluster 2 replicas"]
    hio = by_label["hio fixed-tock"]
    sync1 = by_label.get("gunicorn sync 1 worker")
    loaded = [count for count in connections if count >= 16]
    for count in loaded:
        print(f"hiocluster 1 replica / gunicorn sync 1 worker at c={count}: "
              f"{show(ratio(one, sync1, count))}")
    for count in connections:
        print(f"hiocluster 2 replicas / 1 replica at c={count}: {show(ratio(two, one, count))}")
    logging_ = by_label["hiocluster 1 replica, access log"]
    for count in connections:
        print(f"hiocluster 1 replica with / without an access log at c={count}: "
              f"{show(ratio(logging_, one, count))}")
    scraped = by_label["hiocluster 1 replica, metrics"]
    for count in connections:
        print(f"hiocluster 1 replica with / without metrics scraped every {SCRAPE_S:g} s at "
              f"c={count}: {show(ratio(scraped, one, count))}")
    for count in connections:
        print(f"hiocluster 1 replica / hio fixed-tock at c={count}: "
              f"{show(ratio(one, hio, count))}")
    single = min(connections)
    p50 = one.results[single].p50
    print(f"hiocluster single-connection (c={single}) p50: 1 replica {ms(p50)}, "
          f"2 replicas {ms(two.results[single].p50)}; hio fixed-tock {ms(hio.results[single].p50)}")
    for config in configs:
        parts = ", ".join(f"{name} {value:.2f}%" for name, value in config.idle.items())
        print(f"idle CPU (% of one core) {config.label}: {parts}")
    for config in configs:
        for note in config.notes:
            print(f"# {config.label} log: {note}")

    per_replica = [ratio(one, sync1, count) for count in loaded]
    scaling = [ratio(two, one, count) for count in loaded]
    replica_idle = max(one.unit_idle(), two.unit_idle())
    if sync1 is None or not per_replica or None in per_replica:
        first = ("per replica >= 3x gunicorn sync: n/a ("
                 + ("no gunicorn)" if sync1 is None else "no run at 16+ connections)"))
    else:
        worst = min(per_replica)  # type: ignore[type-var]
        first = (f"per replica >= 3x gunicorn sync at c={','.join(map(str, loaded))}: "
                 f"{verdict(worst >= 3.0)} (worst {worst:.2f}x)")
    second = (f"c={single} p50 <= 0.3 ms with idle CPU <= 2% per replica: "
              f"{verdict(p50 <= 0.3e-3 and replica_idle <= 2.0)} "
              f"(p50 {ms(p50)}, idle {replica_idle:.2f}%)")
    if not scaling or None in scaling:
        third = "2 replicas >= 1.6x one: n/a"
    else:
        worst_scaling = min(scaling)  # type: ignore[type-var]
        third = (f"2 replicas >= 1.6x one at c={','.join(map(str, loaded))}: "
                 f"{verdict(worst_scaling >= 1.6)} (worst {worst_scaling:.2f}x)")
    print(f"# load average {os.getloadavg()[0]:.2f} at the end (other work on the machine "
          "shows here)")
    print(f"targets: {first}; {second}; {third}")


if __name__ == "__main__":
    main()
