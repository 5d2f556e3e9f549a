"""How long a service's replacements take: what the README's restart timings say.

Runs topologies/http.toml (2 replicas of the falcon app, on a free loopback
port) as ``hiocluster run`` and measures, R times each, with the wall clock of
this process:

* ``kill -9 -> serving``: a replica is SIGKILLed until its successor says it
  serves (its output line), with the warm spare (the default: the restart waits
  its ``backoff``, 0.1 s, then the spare is assigned) and without (``spare =
  false``: a new Python process imports the app); kills are 1.2 s apart and
  ``within = 1.0``, so each is a first crash (a crash soon after another waits
  twice the backoff, and so on);
* ``spare refilled``: from that kill until a new spare stands (status);
* ``restart`` and ``reload``: how long ``hiocluster restart web`` and
  ``hiocluster reload`` take to roll both replicas (each successor serving
  before its predecessor drains), as the shell waits for them;
* ``health``: with ``health_path`` (interval 0.2 s, 2 failures), from the
  moment the app starts failing its check until its successor serves;
* ``reload under wrk -c64``: two reloads while wrk (Debian's; skipped without
  it) keeps 64 connections busy for 8 s: its requests, non-2xx answers and
  socket errors (asked: 0 non-2xx, no socket errors but connections the
  client closed).

Prints the median and the worst of each. No target: the README quotes them.

    python bench/restarts.py [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the tests' modules import their conftest

from hiocluster import protocol as proto  # noqa: E402
from hiocluster.control.client import ask  # noqa: E402
from tests.test_cluster_services import HEALTH_APP  # noqa: E402  (the tests' sick app)

TIMEOUT_S = 60.0
SPACING_S = 1.2     # seconds between kills: more than the topology's within



def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Run:
    """``hiocluster run`` of a topology text; its stderr lines with their times."""

    def __init__(self, text: str, where: str, app_dir: str) -> None:
        self.path = os.path.join(where, "svc.toml")
        Path(self.path).write_text(text)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hiocluster", "run", self.path, "--app-dir", app_dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env={**os.environ, "PYTHONPATH": f"{app_dir}{os.pathsep}{REPO}"})
        self.lines: queue.Queue[tuple[float, str | None]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.control = self.expect(r"HIOCLUSTER_CONTROL=(\S+)")[1].group(1)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put((time.monotonic(), line))
        self.lines.put((time.monotonic(), None))

    def expect(self, pattern: str) -> tuple[float, re.Match[str]]:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            when, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise SystemExit(f"the run ended before {pattern!r}")
            found = re.search(pattern, line)
            if found:
                return when, found

    def serving(self, since: float) -> tuple[float, int]:
        """The first replica to say it serves at ``since`` or later."""
        while True:
            when, found = self.expect(r"serving on \S+ \(pid (\d+)\)")
            if when >= since:
                return when, int(found.group(1))

    def status(self) -> dict[str, Any]:
        return ask(self.control, proto.Command(command="status")).status["services"][0]

    def until(self, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            status = self.status()
            if check(status):
                return status
            time.sleep(0.005)
        raise SystemExit("the run's status never got there")

    def command(self, *argv: str) -> float:
        began = time.monotonic()
        subprocess.run([sys.executable, "-m", "hiocluster", *argv, "--control", self.control],
                       check=True, capture_output=True, cwd=REPO, timeout=TIMEOUT_S)
        return time.monotonic() - began

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def settled(run: Run) -> dict[str, Any]:
    return run.until(lambda s: s["serving"] == 2 and s["rolling"] == 0
                     and s.get("spare") is not None)


def kill_to_serving(run: Run, repeat: int, spare: bool) -> tuple[list[float], list[float]]:
    served, refilled = [], []
    for _ in range(repeat):
        time.sleep(SPACING_S)
        before = settled(run) if spare else run.until(lambda s: s["serving"] == 2)
        victim = before["replicas"][0]["pid"]
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        when, _ = run.serving(killed)
        served.append(when - killed)
        if spare:
            run.until(lambda s: s.get("spare") not in (None, before["spare"]))
            refilled.append(time.monotonic() - killed)
    return served, refilled


def health(run: Run, repeat: int, where: str) -> list[float]:
    took = []
    for _ in range(repeat):
        before = settled(run)
        sick = before["replicas"][0]["pid"]
        began = time.monotonic()
        Path(where, f"sick-{sick}").touch()
        when, _ = run.serving(began)
        took.append(when - began)
    return took


def reload_under_wrk(run: Run, port: int) -> str:
    """Two reloads while wrk runs at 64 connections; what wrk counted."""
    wrk = subprocess.Popen(["wrk", "-t2", "-c64", "-d8s", f"http://127.0.0.1:{port}/hello"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.5)
    took = [run.command("reload")]
    settled(run)
    took.append(run.command("reload"))
    out, _ = wrk.communicate(timeout=TIMEOUT_S)
    requests = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return (f"2 reloads under wrk -c64 for 8 s ({', '.join(f'{t:.2f} s' for t in took)}): "
            f"{requests.group(1) if requests else '?'} requests, "
            f"{non2xx.group(1) if non2xx else 0} non-2xx, socket errors: "
            f"{errors.group(1) if errors else 'none'}")


def line(what: str, seconds: list[float]) -> str:
    return (f"{what:<40} median {statistics.median(seconds) * 1000:7.0f} ms   worst "
            f"{max(seconds) * 1000:7.0f} ms   ({len(seconds)} times)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    where = tempfile.mkdtemp(prefix="hioc-bench-restarts-")
    try:
        # within = 1 s: kills SPACING_S apart are each a first crash (backoff 0.1 s,
        # not doubled, and never the intensity's limit)
        port = free_port()
        base = (REPO / "topologies" / "http.toml").read_text().replace(
            "127.0.0.1:8080", f"127.0.0.1:{port}").replace(
            "replicas = 2\n", "replicas = 2\nwithin = 1.0\n")
        print(f"# hiocluster restart timings: {os.cpu_count()} cpus, topologies/http.toml "
              f"(2 replicas), {args.repeat} times each; load average "
              f"{os.getloadavg()[0]:.2f} at start", flush=True)
        run = Run(base, where, str(REPO))
        try:
            served, refilled = kill_to_serving(run, args.repeat, spare=True)
            settled(run)
            restarts = [run.command("restart", "web") for _ in range(args.repeat)
                        if settled(run)]
            reloads = [run.command("reload") for _ in range(args.repeat) if settled(run)]
            settled(run)
            loaded = reload_under_wrk(run, port) if shutil.which("wrk") else \
                "2 reloads under wrk: skipped (no wrk: apt-get install wrk)"
        finally:
            run.close()
        print(line("kill -9 -> serving (warm spare)", served))
        print(line("kill -9 -> new spare standing", refilled))
        print(line("hiocluster restart web (2 replicas)", restarts))
        print(line("hiocluster reload (2 replicas)", reloads))
        print(loaded)
        run = Run(base.replace("replicas = 2\n", "replicas = 2\nspare = false\n"), where,
                  str(REPO))
        try:
            cold, _ = kill_to_serving(run, args.repeat, spare=False)
        finally:
            run.close()
        print(line("kill -9 -> serving (spare = false)", cold))
        Path(where, "healthweb.py").write_text(HEALTH_APP)
        run = Run(base.replace('class = "nodes.web:Web"', 'class = "healthweb:Web"').replace(
            "[services.web.params]\n", f'health_path = "/ready"\nhealth_interval = 0.2\n'
            f'health_failures = 2\n\n[services.web.params]\nwhere = "{where}"\n'), where, where)
        try:
            sick = health(run, args.repeat, where)
        finally:
            run.close()
        print(line("health check fails -> successor serving", sick))
        print("# (health: interval 0.2 s x 2 failures = 0.2-0.4 s of it is the checks)")
    finally:
        shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
