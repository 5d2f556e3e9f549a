"""Lockstep benchmark: hiocluster beside baselines measured in the same run.

Per N = 1, 2, 4, 8 workers, each hosting one node that runs 10 trivial hio doers:

* ``raw barrier``: a bare pyzmq ROUTER/DEALER barrier over ipc with N children
  that only echo (the cost of one supervised round trip per tick);
* ``minimal ring``: the same children, each stepping a hio Doist of 10 trivial
  doers, sending one frame to the next child and waiting for the previous
  one's, under windows of 64 ticks granted by the parent (what a hiocluster
  ring does, written by hand in pure pyzmq);
* ``bare Doist``: one hio Doist in this process running the same N x 10 doers,
  no IPC at all (the limit at N = 1);
* hiocluster with no links (``none``), and with a ring of links between the
  workers (``ring``: one message per tick to the next worker), with automatic
  windows (``auto``) and with ``--window 1`` (strict per-tick supervision);
  ``ring local``: the ring with automatic windows on ``--transport local``
  (DATA over unix SEQPACKET sockets), with the workers' CPU per worker-tick
  beside the ZeroMQ ring's (all their threads, start-up subtracted: a run of
  the same ring for 1 tick is taken off).

Then 10,000 trivial nodes on 2 workers beside a bare Doist with 10,000 doers,
and PHOLD events/s (topologies/phold.toml) at P = 1, 2, 4.

Targets (issue "Fast ticks"): ring auto >= 0.8x the minimal ring at every N;
ring --window 1 >= 0.8x raw barrier at every N; ring local >= 2x raw barrier at
N = 2, 4, 8; (earlier: N = 1 (none, auto)
>= 0.5x bare Doist; 10,000 nodes >= 0.3x bare Doist). Each figure is the best
of R interleaved rounds.

    python bench/lockstep.py [--quick] [--ticks T] [--sizes 1,2,4,8] [--repeat R]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from typing import Callable, Iterator

import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hio.base.doing import Doist  # noqa: E402

from hiocluster.supervision.supervisor import run  # noqa: E402
from hiocluster.topology import load, loads  # noqa: E402
from nodes.bench import TrivialDoer  # noqa: E402

DOERS = 10
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _barrier_child(address: str, run_dir: str, index: int) -> None:
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"c%d" % index)
    sock.connect(address)
    sock.send(b"hello")
    while True:
        message = sock.recv()
        if message == b"stop":
            break
        sock.send(message)
    sock.close(linger=0)
    context.term()


@contextlib.contextmanager
def children(n: int, target: Callable[..., None] | None = None, *args: object
             ) -> Iterator[tuple[zmq.Socket, list]]:
    """A ROUTER over ipc with ``n`` children running ``target(address, run_dir,
    index, *args)`` (default: echo); yields (router, identities) once each said
    hello, and tells each "stop" at the end."""
    run_dir = tempfile.mkdtemp(prefix="hioc-bench-")
    address = f"ipc://{run_dir}/barrier"
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind(address)
    mp = multiprocessing.get_context("forkserver")
    started = [mp.Process(target=target or _barrier_child, args=(address, run_dir, i, *args))
               for i in range(n)]
    for child in started:
        child.start()
    identities = [router.recv_multipart()[0] for _ in started]
    try:
        yield router, identities
    finally:
        for identity in identities:
            router.send_multipart([identity, b"stop"])
        for child in started:
            child.join()
            child.close()
        router.close(linger=0)
        context.term()
        shutil.rmtree(run_dir, ignore_errors=True)


def raw_barrier(n: int, ticks: int) -> float:
    """Ticks/s of a bare ROUTER/DEALER barrier over ipc with ``n`` children."""
    with children(n) as (router, identities):
        start = time.perf_counter()
        for tick in range(ticks):
            payload = b"%d" % tick
            for identity in identities:
                router.send_multipart([identity, payload])
            for _ in identities:
                router.recv_multipart()
        return ticks / (time.perf_counter() - start)


def _ring_child(control: str, run_dir: str, index: int, n: int) -> None:
    """One process of the minimal ring: PUSH to the next, PULL from the previous."""
    context = zmq.Context()
    parent = context.socket(zmq.DEALER)
    parent.setsockopt(zmq.ROUTING_ID, b"c%d" % index)
    parent.connect(control)
    inbound = context.socket(zmq.PULL)
    outbound = context.socket(zmq.PUSH)
    ring = n > 1  # one process alone has no neighbour to talk to
    if ring:
        inbound.bind(f"ipc://{run_dir}/r{index}")
        outbound.connect(f"ipc://{run_dir}/r{(index + 1) % n}")
    doist = Doist(tock=1.0, real=False, doers=[TrivialDoer() for _ in range(DOERS)])
    doist.enter()
    parent.send(b"hello")
    tick = 0
    while True:
        message = parent.recv()
        if message == b"stop":
            break
        until = int(message)
        while tick <= until:
            if tick and ring:
                inbound.recv()  # the previous process's frame of tick - 1
            doist.recur()
            if ring:
                outbound.send(b"%d" % tick)
            tick += 1
        parent.send(b"%.6f" % time.process_time())  # done: and the CPU it used so far
    if ring:
        inbound.recv()  # the last tick's frame
    doist.exit()
    for sock in (parent, inbound, outbound):
        sock.close(linger=0)
    context.term()


def minimal_ring(n: int, ticks: int, window: int = 64) -> float:
    """Ticks/s of a minimal pyzmq ring: each of ``n`` children steps a Doist of
    DOERS doers, sends one frame to the next and waits for the previous one's;
    the parent grants windows of ``window`` ticks (what hiocluster does, by hand)."""
    return _minimal_ring(n, ticks, window)[0]


def _minimal_ring(n: int, ticks: int, window: int = 64) -> tuple[float, float]:
    """(ticks/s, CPU µs per child per tick after the first window)."""
    with children(n, _ring_child, n) as (router, identities):
        start = time.perf_counter()
        granted, first, cpu = -1, {}, {}
        while granted < ticks - 1:
            granted = min(ticks - 1, granted + window)
            for identity in identities:
                router.send_multipart([identity, b"%d" % granted])
            for _ in identities:
                identity, used = router.recv_multipart()
                first.setdefault(identity, float(used))
                cpu[identity] = float(used)
        rate = ticks / (time.perf_counter() - start)
    spent = sum(cpu[identity] - first[identity] for identity in cpu) / n
    return rate, spent / max(1, ticks - window) * 1e6


def bare_doist(doers: int, ticks: int) -> float:
    """Ticks/s of one hio Doist in this process with ``doers`` trivial doers."""
    doist = Doist(tock=1.0, real=False, doers=[TrivialDoer() for _ in range(doers)])
    doist.enter()
    start = time.perf_counter()
    for _ in range(ticks):
        doist.recur()
    elapsed = time.perf_counter() - start
    doist.exit()
    return ticks / elapsed


def topology_text(n: int, ticks: int, ring: bool, doers: int = DOERS) -> str:
    cls = "nodes.bench:RingBusy" if ring else "nodes.bench:BusyNode"
    lines = ["[run]", f"ticks = {ticks}", "[nodes.n]", f'class = "{cls}"', f"count = {n}",
             f"params = {{ doers = {doers} }}"]
    width = len(str(n - 1))
    for i in range(n if ring else 0):
        lines += ["[[links]]", f'from = "n{i:0{width}d}.out"',
                  f'to = "n{(i + 1) % n:0{width}d}.in"']
    return "\n".join(lines) + "\n"


def cluster(n: int, ticks: int, ring: bool, window: int | None,
            transport: str | None = None) -> float:
    result = run(loads(topology_text(n, ticks, ring)), processes=n, handle_signals=False,
                 window=window, app_dir=REPO, transport=transport)
    return result.ticks_per_second


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def worker_cpu(n: int, ticks: int, transport: str | None) -> float:
    """Microseconds of CPU per worker-tick of a ring of ``n`` (every thread of every
    worker, reaped: RUSAGE_CHILDREN), a 1-tick run's start-up and shutdown taken off."""
    spent = []
    for length in (1, ticks):
        before = _children_cpu()
        cluster(n, length, True, None, transport)
        spent.append(_children_cpu() - before)
    return max(0.0, spent[1] - spent[0]) / (n * (ticks - 1)) * 1e6


def many_nodes(nodes: int, processes: int, ticks: int) -> float:
    result = run(loads(topology_text(nodes, ticks, False, doers=0)), processes=processes,
                 handle_signals=False, app_dir=REPO)
    return result.ticks_per_second


def phold_rate(processes: int, ticks: int) -> tuple[float, float, str]:
    topology = load(os.path.join(REPO, "topologies", "phold.toml")).replace(ticks=ticks)
    result = run(topology, processes=processes, handle_signals=False, app_dir=REPO)
    return result.metrics["events"] / result.seconds, result.ticks_per_second, result.digest


def best(repeat: int, *measures: Callable[[], float]) -> list[float]:
    """Interleaved rounds (machine drift hits every measure alike); best of each."""
    results = [0.0] * len(measures)
    for _ in range(repeat):
        for index, measure in enumerate(measures):
            results[index] = max(results[index], measure())
    return results


def verdict(value: float, target: float) -> str:
    return "met" if value >= target else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer ticks (a smoke run)")
    parser.add_argument("--ticks", type=int, default=None)
    parser.add_argument("--sizes", default="1,2,4,8")
    parser.add_argument("--repeat", type=int, default=3, help="best of R interleaved rounds")
    args = parser.parse_args()
    ticks = args.ticks or (300 if args.quick else 3000)
    repeat = 1 if args.quick else args.repeat
    multiprocessing.get_context("forkserver")  # the raw barrier's children
    print(f"# hiocluster lockstep benchmark: {os.cpu_count()} cpus, {ticks} ticks, "
          f"best of {repeat}")
    print(f"{'N':>3} {'raw barrier':>12} {'min. ring':>10} {'bare Doist':>11} "
          f"{'none auto':>10} {'ring auto':>10} {'ring w=1':>9} {'ring local':>10} | "
          f"{'ring/min':>8} {'ring/raw':>8} {'w=1/raw':>8} {'local/raw':>9} {'none/bare':>9} | "
          f"{'CPU/worker-tick: ring':>21} {'local':>7} {'min':>7}")
    worst = {"ring": 1e9, "w1": 1e9, "local": 1e9, "cpu": 0.0}
    n1_bare = 0.0
    for n in [int(size) for size in args.sizes.split(",")]:
        raw, minimal, bare, none, ring, strict, local = best(
            repeat, lambda: raw_barrier(n, ticks), lambda: minimal_ring(n, ticks),
            lambda: bare_doist(n * DOERS, ticks),
            lambda: cluster(n, ticks, False, None), lambda: cluster(n, ticks, True, None),
            lambda: cluster(n, ticks, True, 1), lambda: cluster(n, ticks, True, None, "local"))
        cpu_ring, cpu_local = worker_cpu(n, ticks, None), worker_cpu(n, ticks, "local")
        cpu_min = _minimal_ring(n, ticks)[1]
        if n >= 2:
            worst["cpu"] = max(worst["cpu"], cpu_ring / cpu_min)
        worst["ring"] = min(worst["ring"], ring / minimal)
        worst["w1"] = min(worst["w1"], strict / raw)
        if n >= 2:
            worst["local"] = min(worst["local"], local / raw)
        if n == 1:
            n1_bare = none / bare
        print(f"{n:>3} {raw:>8,.0f} t/s {minimal:>6,.0f} t/s {bare:>7,.0f} t/s "
              f"{none:>6,.0f} t/s {ring:>6,.0f} t/s {strict:>5,.0f} t/s {local:>6,.0f} t/s | "
              f"{ring / minimal:>7.2f}x {ring / raw:>7.2f}x {strict / raw:>7.2f}x "
              f"{local / raw:>8.2f}x {none / bare:>8.2f}x | "
              f"{cpu_ring:>18,.0f} us {cpu_local:>4,.0f} us {cpu_min:>4,.0f} us")
    many_ticks = max(20, ticks // 100)
    many, bare_many = best(repeat, lambda: many_nodes(10_000, 2, many_ticks),
                           lambda: bare_doist(10_000, many_ticks))
    print(f"10,000 trivial nodes on 2 workers: {many:,.1f} t/s; bare Doist with 10,000 "
          f"doers: {bare_many:,.1f} t/s; ratio {many / bare_many:.2f}x")
    phold_ticks = max(50, ticks // 8)
    for processes in (1, 2, 4):
        events, tick_rate, digest = phold_rate(processes, phold_ticks)
        print(f"phold P={processes}: {phold_ticks} ticks, {events:,.0f} events/s, "
              f"{tick_rate:,.1f} ticks/s, digest {digest[:16]}")
    print("targets: ring auto >= 0.8x minimal ring at every N: "
          f"{verdict(worst['ring'], 0.8)} (worst {worst['ring']:.2f}x); "
          f"N=1 >= 0.5x bare Doist: {verdict(n1_bare, 0.5)} ({n1_bare:.2f}x); "
          f"--window 1 >= 0.8x raw: {verdict(worst['w1'], 0.8)} (worst {worst['w1']:.2f}x); "
          f"ring local >= 2x raw barrier at N=2,4,8: "
          + (f"{verdict(worst['local'], 2.0)} (worst {worst['local']:.2f}x); "
             if worst["local"] < 1e9 else "not measured (no N >= 2); ") +
          f"10,000 nodes >= 0.3x bare: {verdict(many / bare_many, 0.3)} "
          f"({many / bare_many:.2f}x); worker CPU per tick <= 2x the minimal ring's: "
          f"{verdict(2.0, worst['cpu'])} (worst {worst['cpu']:.2f}x)")


if __name__ == "__main__":
    main()
