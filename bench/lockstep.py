"""Lockstep benchmark: hiocluster beside raw pyzmq baselines, measured in the same run.

1. Barrier: ticks/s for N processes, each a hio Doist with 10 trivial doers,
   against a raw pyzmq ROUTER/DEALER barrier with the same N (children only echo),
   and against the raw barrier whose children also step a bare hio Doist with 10
   doers (what hio itself costs). Target: hiocluster >= 0.8x raw.
2. Messages: cross-process messages/s in lockstep (batched per tick, 2
   processes) against raw pyzmq PUSH/PULL sending one msgpack message per frame.
   Target: >= 1x.

    python bench/lockstep.py [--quick] [--ticks T] [--sizes 1,2,4,8]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from typing import Iterator

import msgpack
import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hiocluster.supervisor import run  # noqa: E402
from hiocluster.topology import loads  # noqa: E402

DOERS = 10


def _barrier_child(address: str, index: int, with_doist: bool) -> None:
    doist = None
    if with_doist:
        from hio.base.doing import Doist

        from nodes.bench import TrivialDoer
        doist = Doist(tock=1.0, real=False, doers=[TrivialDoer() for _ in range(DOERS)])
        doist.enter()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"c%d" % index)
    sock.connect(address)
    sock.send(b"hello")
    while True:
        message = sock.recv()
        if message == b"stop":
            break
        if doist is not None:
            doist.recur()
        sock.send(message)
    if doist is not None:
        doist.exit()
    sock.close(linger=0)
    context.term()


@contextlib.contextmanager
def barrier_children(n: int, with_doist: bool = False) -> Iterator[tuple[zmq.Socket, list]]:
    """A ROUTER over ipc with ``n`` echoing DEALER children; yields (router, identities)."""
    run_dir = tempfile.mkdtemp(prefix="hioc-bench-")
    address = f"ipc://{run_dir}/barrier"
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind(address)
    mp = multiprocessing.get_context("forkserver")
    children = [mp.Process(target=_barrier_child, args=(address, i, with_doist))
                for i in range(n)]
    for child in children:
        child.start()
    identities = [router.recv_multipart()[0] for _ in children]
    try:
        yield router, identities
    finally:
        for identity in identities:
            router.send_multipart([identity, b"stop"])
        for child in children:
            child.join()
        router.close(linger=0)
        context.term()
        shutil.rmtree(run_dir, ignore_errors=True)


def raw_barrier(n: int, ticks: int, with_doist: bool = False) -> float:
    """Ticks/s of a bare ROUTER/DEALER barrier over ipc with ``n`` children."""
    with barrier_children(n, with_doist) as (router, identities):
        start = time.perf_counter()
        for tick in range(ticks):
            payload = b"%d" % tick
            for identity in identities:
                router.send_multipart([identity, payload])
            for _ in identities:
                router.recv_multipart()
        return ticks / (time.perf_counter() - start)


def hiocluster_barrier(n: int, ticks: int) -> float:
    """Ticks/s of hiocluster with ``n`` processes, one BusyNode (10 doers) each."""
    text = f"[run]\nticks = {ticks}\n[nodes.busy]\nclass = \"nodes.bench:BusyNode\"\n" \
           f"count = {n}\nparams = {{ doers = {DOERS} }}\n"
    result = run(loads(text), processes=n, handle_signals=False)
    return result.ticks_per_second


def _pull_child(address: str, count: int) -> None:
    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.connect(address)
    total = 0
    for _ in range(count):
        total += msgpack.unpackb(sock.recv())
    sock.close(linger=0)
    context.term()


def raw_pushpull(messages: int) -> float:
    """Messages/s of raw PUSH/PULL, one msgpack message per frame, sender to receiver done."""
    run_dir = tempfile.mkdtemp(prefix="hioc-bench-")
    address = f"ipc://{run_dir}/push"
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.bind(address)
    child = multiprocessing.get_context("forkserver").Process(target=_pull_child,
                                                              args=(address, messages))
    child.start()
    push.send(msgpack.packb(0))  # wait for the connection before timing
    start = time.perf_counter()
    for i in range(1, messages):
        push.send(msgpack.packb(i))
    child.join()
    elapsed = time.perf_counter() - start
    push.close(linger=0)
    context.term()
    shutil.rmtree(run_dir, ignore_errors=True)
    return (messages - 1) / elapsed


def hiocluster_messages(per_tick: int, ticks: int) -> float:
    """Messages/s from a Source node to a Sink node in another process, in lockstep."""
    text = (f"[run]\nticks = {ticks}\ncapacity = {per_tick * 2}\n"
            f"[nodes.source]\nclass = \"nodes.bench:Source\"\nparams = {{ per_tick = {per_tick} }}\n"
            f"[nodes.sink]\nclass = \"nodes.bench:Sink\"\n"
            f"[[links]]\nfrom = \"source.out\"\nto = \"sink.in\"\n")
    result = run(loads(text), processes=2, handle_signals=False)
    return result.messages / result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer ticks (a smoke run)")
    parser.add_argument("--ticks", type=int, default=None)
    parser.add_argument("--sizes", default="1,2,4,8")
    parser.add_argument("--repeat", type=int, default=5, help="best of R interleaved rounds")
    args = parser.parse_args()
    ticks = args.ticks or (300 if args.quick else 3000)
    repeat = 1 if args.quick else args.repeat
    multiprocessing.get_context("forkserver").set_forkserver_preload(["hiocluster.worker"])
    print(f"# hiocluster lockstep benchmark: {os.cpu_count()} cpus, {ticks} ticks, "
          f"best of {repeat}")
    print(f"{'N':>3} {'raw barrier':>14} {'raw+hio Doist':>14} {'hiocluster':>14} "
          f"{'hio/raw':>8} {'hioc/raw':>9}")
    for n in [int(size) for size in args.sizes.split(",")]:
        raw = raw_doist = ours = 0.0
        for _ in range(repeat):  # interleaved rounds: machine drift hits all three alike
            raw = max(raw, raw_barrier(n, ticks))
            raw_doist = max(raw_doist, raw_barrier(n, ticks, with_doist=True))
            ours = max(ours, hiocluster_barrier(n, ticks))
        print(f"{n:>3} {raw:>10,.0f} t/s {raw_doist:>10,.0f} t/s {ours:>10,.0f} t/s "
              f"{raw_doist / raw:>7.2f}x {ours / raw:>8.2f}x")
    per_tick = 1000
    msg_ticks = max(20, ticks // 30)
    messages = per_tick * msg_ticks
    raw = ours = 0.0
    for _ in range(repeat):
        raw = max(raw, raw_pushpull(messages))
        ours = max(ours, hiocluster_messages(per_tick, msg_ticks))
    print(f"messages: raw PUSH/PULL {raw:,.0f} msg/s; hiocluster batched "
          f"({per_tick}/tick) {ours:,.0f} msg/s; ratio {ours / raw:.2f}x")


if __name__ == "__main__":
    main()
