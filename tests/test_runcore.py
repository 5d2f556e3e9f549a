"""Unit tests of the supervisor's rules (hiocluster.supervision.runcore, runbooks, chain): no
sockets, no processes, the clock is an argument.

In-memory worker machines (protocol.ChildMachine) talk to a RunCore; the test
plays every worker and every process exit, and reads what the core says to do.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Any

import msgpack
import pytest

from hiocluster import protocol as proto
from hiocluster.protocol import DIGEST_SIZE
from hiocluster.protocol.observed import pack_observed
from hiocluster.supervision.digests import DigestChain
from hiocluster.errors import (Interrupted, NodeError, ProcessExited, RunFailed, TickTimeout)
from hiocluster.supervision.runcore import (CUT_GRACE_S, SILENCE_GRACE_S, Kill, Phase, RunCore,
                                           Terminate)
from hiocluster.supervision.windows import WindowSizer
from hiocluster.topology import loads, plan

TOKEN = b"t" * 16
# a ring a -> b -> c -> a; w0 hosts a and b, w1 hosts c, w2 hosts the lonely z
TOPOLOGY = loads("""
[run]
ticks = 7
tick_timeout = 2.0
[nodes.a]
class = "m:A"
[nodes.b]
class = "m:A"
[nodes.c]
class = "m:A"
[nodes.z]
class = "m:A"
[[links]]
from = "a.out"
to = "b.in"
[[links]]
from = "b.out"
to = "c.in"
[[links]]
from = "c.out"
to = "a.in"
[placement]
w0 = ["a", "b"]
w1 = ["c"]
w2 = ["z"]
""")
PLAN = plan(TOPOLOGY)
NODES = {"w0": ["a", "b"], "w1": ["c"], "w2": ["z"]}



def _child(order: Kill | Terminate) -> str:
    return order.child

def digest(node: str, tick: int) -> bytes:
    return hashlib.sha256(f"{node}@{tick}".encode()).digest()[:DIGEST_SIZE]


def records(worker: str, tick: int) -> bytes:
    """A worker's digest records of the state after ``tick`` (-1: after set-up)."""
    return b"".join(name.encode() + digest(name, tick) for name in sorted(NODES[worker]))


class Run:
    """A RunCore and one ChildMachine per worker, at a clock the test moves."""

    def __init__(self, window: int | None = 3, **kwargs: Any) -> None:
        self.now = 100.0
        self.core = RunCore(TOPOLOGY, PLAN, now=self.now, token=TOKEN, window=window,
                            keep_digests=True, wall=lambda: 1_700_000_000.0, **kwargs)
        self.machines = {name: proto.ChildMachine(name) for name in NODES}
        self.inbox: dict[str, list[proto.Message]] = {name: [] for name in NODES}

    def say(self, worker: str, message: proto.Message, *, raw: bytes | None = None) -> None:
        frame = raw if raw is not None else self.machines[worker].send(message, checked=False)
        if self.core.books[worker].joined:
            self.core.receive(worker, frame, self.now)
        else:
            joined, reply = self.core.admit([b"id", frame])
            assert joined == worker, reply and proto.decode(reply)
            self.core.receive(worker, frame, self.now)
        self.flush()

    def flush(self) -> None:
        for worker, frame in self.core.outbox:
            machine = self.machines[worker]
            message = machine.receive(frame) if machine.state is not proto.ChildState.ERROR \
                else proto.decode(frame, limit=proto.MAX_SETUP_FRAME)
            self.inbox[worker].append(message)
        self.core.outbox.clear()

    def last(self, worker: str) -> proto.Message:
        return self.inbox[worker][-1]

    def hello(self, worker: str, **changes: Any) -> None:
        fields = dict(worker=worker, token=TOKEN, pid=1, versions=proto.local_versions(),
                      data_address=f"ipc:///tmp/d-{worker}")
        fields.update(changes)
        self.say(worker, proto.Hello(**fields))

    def start(self) -> None:
        for worker in NODES:
            self.hello(worker)
        for worker in NODES:
            self.say(worker, proto.Ready(digests=records(worker, -1)))

    def window(self, until: int) -> None:
        for worker in NODES:
            grant = self.last(worker)
            assert isinstance(grant, proto.Grant) and grant.until == until
            first = self.machines[worker].done + 1
            self.say(worker, proto.Done(until=until, digests=b"".join(
                records(worker, tick) for tick in range(first, until + 1))))

    def finish(self) -> None:
        for worker in NODES:
            assert self.last(worker) == proto.Stop(reason="done", drain=True)
            self.say(worker, proto.Bye(stats={"messages": 1}, received={}))


def expected_digest(ticks: int) -> list[str]:
    chain = hashlib.sha256
    value, out = b"\0" * 32, []
    for tick in range(-1, ticks):
        state = b"".join(name.encode() + digest(name, tick) for name in sorted("abcz"))
        value = chain(value + state).digest()
        if tick >= 0:
            out.append(value.hex())
    return out


def test_a_run_from_hello_to_bye() -> None:
    run = Run(window=3)
    run.start()
    setup = run.inbox["w0"][0]
    assert isinstance(setup, proto.Setup)
    assert [row[0] for row in setup.nodes] == ["a", "b"]
    assert [row[:4] for row in setup.links] == [[0, "a", "out", "b"], [1, "b", "out", "c"],
                                                [2, "c", "out", "a"]]
    assert setup.peers == {"w1": "ipc:///tmp/d-w1"}            # neighbours only
    lonely = run.inbox["w2"][0]
    assert isinstance(lonely, proto.Setup) and lonely.links == [] and lonely.peers == {}
    for until in (2, 5, 6):  # windows of 3, the last one cut at ticks - 1
        run.window(until)
    run.finish()
    assert run.core.finished and run.core.failure is None
    result = run.core.result
    assert result is not None
    assert result.tick_digests == expected_digest(7)
    assert result.digest == expected_digest(7)[-1]
    assert (result.ticks, result.processes, result.messages, result.window) == (7, 3, 3, "3")


def test_the_digest_does_not_depend_on_windows_or_placement() -> None:
    digests = set()
    for window in (1, 2, 7):
        run = Run(window=window)
        run.start()
        until = -1
        while until < 6:
            until = min(6, until + window)
            run.window(until)
        run.finish()
        digests.add(run.core.result.digest)  # type: ignore[union-attr]
    chain = DigestChain({"p": "abcz"}, keep=True)
    for tick in range(-1, 7):
        chain.fold({"p": b"".join(n.encode() + digest(n, tick) for n in sorted("abcz"))}, 1)
    assert digests == {chain.digest.hex()}


def test_the_chain_splices_records_of_interleaved_workers() -> None:
    chain = DigestChain({"x": ["b", "d"], "y": ["a", "c", "e"]})
    assert chain.sizes == {"x": 2 + 2 * DIGEST_SIZE, "y": 3 + 3 * DIGEST_SIZE}
    x = b"b" + b"1" * DIGEST_SIZE + b"d" + b"2" * DIGEST_SIZE
    y = b"a" + b"3" * DIGEST_SIZE + b"c" + b"4" * DIGEST_SIZE + b"e" + b"5" * DIGEST_SIZE
    chain.fold({"x": x, "y": y}, 1)
    whole = b"a" + b"3" * DIGEST_SIZE + b"b" + b"1" * DIGEST_SIZE + b"c" + b"4" * DIGEST_SIZE + b"d" + b"2" * DIGEST_SIZE \
        + b"e" + b"5" * DIGEST_SIZE
    assert chain.digest == hashlib.sha256(b"\0" * 32 + whole).digest()
    assert chain.check("x", x * 2, 2) is None and "expected" in chain.check("x", x, 2)


def test_strangers_are_answered_and_counted() -> None:
    run = Run()
    hello = proto.Hello(worker="w0", token=b"wrong", pid=1, versions={}, data_address="ipc://x")
    for parts, why in [([b"id", proto.encode(hello)], "wrong token"),
                       ([b"id", proto.encode(proto.Hello(**dict(hello.to_body(), token=TOKEN,
                                                                worker="w9")))],
                        "not a worker"),
                       ([b"id", b"\xc1"], "not valid msgpack"),
                       ([b"id", b"a", b"b"], "expected one frame")]:
        worker, reply = run.core.admit(parts)
        assert worker is None and reply is not None and why in proto.decode(reply).detail
    run.hello("w0")
    joined, reply = run.core.admit([b"other", proto.encode(proto.Hello(
        **dict(hello.to_body(), token=TOKEN)))])
    assert joined is None and "already joined" in proto.decode(reply).detail  # type: ignore
    assert run.core.rejected == 5


def test_other_versions_are_refused_at_start_up() -> None:
    run = Run()
    run.hello("w0")
    run.hello("w2")
    run.hello("w1", versions=dict(proto.local_versions(), msgpack="0.1"))
    failure = run.core.failure
    assert isinstance(failure, RunFailed) and failure.worker == "w1" and failure.tick is None
    assert "msgpack 0.1" in failure.cause and "versions differ" in failure.cause
    error = run.last("w1")
    assert isinstance(error, proto.Error) and error.code == "version-mismatch"
    assert run.core.phase is Phase.STOPPING
    assert run.last("w0") == proto.Stop(reason=f"RunFailed: {failure}"[:1000], drain=False)


def test_wrong_digest_records_fail_the_run_naming_the_field() -> None:
    run = Run(window=2)
    run.start()
    run.say("w1", proto.Done(until=1, digests=records("w1", 0)))  # one state short
    failure = run.core.failure
    assert isinstance(failure, RunFailed) and failure.worker == "w1"
    assert "DONE.digests" in failure.cause


def test_a_worker_error_with_a_peer_blames_the_peer() -> None:
    run = Run()
    run.start()
    run.say("w0", proto.Error(code="bad-link", detail="link 7 does not join w1 and w0",
                              field="DATA.messages[0][0]", tick=1, peer="w1"))
    failure = run.core.failure
    assert type(failure) is RunFailed
    assert (failure.worker, failure.nodes, failure.tick) == ("w1", ("c",), 1)
    assert "sent w0 an invalid DATA frame" in failure.cause


def test_node_and_tick_timeout_errors_keep_their_kind() -> None:
    for code, kind in [("node-error", NodeError), ("tick-timeout", TickTimeout)]:
        run = Run()
        run.start()
        run.say("w0", proto.Error(code=code, detail="Traceback...\nValueError: boom", tick=1,
                                  node="b"))
        assert type(run.core.failure) is kind
        assert (run.core.failure.worker, run.core.failure.nodes) == ("w0", ("b",))


def test_a_death_without_a_word_is_placed_by_what_the_neighbours_received() -> None:
    run = Run(window=7)
    run.start()
    run.say("w1", proto.Progress(tick=2, waiting=[]))
    run.core.exited("w1", -9, run.now)
    run.flush()
    assert run.core.signals == []  # it is gone already
    for worker in ("w0", "w2"):
        assert run.last(worker) == proto.Stop(reason=run.last(worker).reason, drain=False)
        run.say(worker, proto.Bye(received={"w1": 5} if worker == "w0" else {}))
    failure = run.core.failure
    assert isinstance(failure, ProcessExited) and failure.exitcode == -9
    assert (failure.worker, failure.tick, failure.cause) == ("w1", 5, "signal SIGKILL")
    assert run.core.finished


def test_a_silent_worker_is_killed_past_the_deadline() -> None:
    run = Run(window=7)
    run.start()
    run.now += 1.0
    run.say("w0", proto.Progress(tick=3, waiting=[]))
    run.say("w1", proto.Progress(tick=3, waiting=[]))
    run.say("w2", proto.Progress(tick=3, waiting=[]))
    run.now += 2.0 + SILENCE_GRACE_S / 2
    run.core.poll(run.now)
    assert run.core.failure is None
    for worker in ("w0", "w2"):
        run.say(worker, proto.Progress(tick=3, waiting=[]))
    run.now += SILENCE_GRACE_S
    run.core.poll(run.now)
    failure = run.core.failure
    assert isinstance(failure, TickTimeout) and (failure.worker, failure.tick) == ("w1", 4)
    assert run.core.signals == [Kill("w1")]


def test_a_frame_that_never_arrives_is_a_lost_frame() -> None:
    run = Run(window=7)
    run.start()
    run.say("w1", proto.Progress(tick=4, waiting=[]))   # w1 finished tick 4: sent its frame
    run.say("w0", proto.Progress(tick=4, waiting=["w1"]))
    run.now += 1.0
    run.say("w1", proto.Progress(tick=5, waiting=["w0"]))
    run.say("w2", proto.Progress(tick=6, waiting=[]))
    run.core.poll(run.now)
    assert run.core.failure is None
    run.now += 1.5
    for worker in ("w1", "w2"):
        run.say(worker, run.inbox[worker] and proto.Progress(
            tick=5 if worker == "w1" else 6, waiting=["w0"] if worker == "w1" else []))
    run.say("w0", proto.Progress(tick=4, waiting=["w1"]))
    run.core.poll(run.now)
    failure = run.core.failure
    assert type(failure) is RunFailed and failure.worker == "w1"
    assert "DATA frame of tick 4 never reached w0" in failure.cause


def test_an_interrupt_stops_everyone_and_blames_nobody() -> None:
    run = Run()
    run.start()
    run.say("w2", proto.Error(code="terminated", detail="by SIGTERM"))  # the same signal
    run.core.interrupt(15, run.now)
    assert isinstance(run.core.failure, Interrupted) and run.core.failure.signal == 15
    for worker in ("w0", "w1"):
        assert isinstance(run.last(worker), proto.Stop)


def test_start_up_has_a_deadline() -> None:
    run = Run(start_timeout=5.0)
    run.hello("w0")
    run.now += 5.1
    run.core.poll(run.now)
    failure = run.core.failure
    assert isinstance(failure, TickTimeout) and failure.tick is None
    assert failure.worker == "w1" and "no HELLO within 5 s" in failure.cause
    assert sorted(run.core.signals, key=_child) == [Kill("w1"), Kill("w2")]


def test_stopping_has_a_deadline_then_terminates() -> None:
    run = Run(window=7, stop_timeout=10.0)
    run.start()
    run.window(6)
    run.say("w0", proto.Bye())
    run.now += 10.5
    run.core.poll(run.now)
    assert run.core.finished
    assert sorted(run.core.signals, key=_child) == [Terminate("w1"), Terminate("w2")]
    assert isinstance(run.core.failure, RunFailed) and "no BYE" in run.core.failure.cause


def test_real_time_runs_share_one_start_and_size_windows_by_tock() -> None:
    topology = TOPOLOGY.replace(real=True, tock=0.01)
    core = RunCore(topology, PLAN, now=0.0, token=TOKEN, wall=lambda: 1000.0)
    assert core.sizer.size == 10  # 100 ms of 10 ms ticks
    for worker in NODES:
        book = core.books[worker]
        book.joined = True
        core.receive(worker, proto.ChildMachine(worker).send(proto.Hello(
            worker=worker, token=TOKEN, pid=1, versions=proto.local_versions(),
            data_address="ipc://x")), 0.0)
    grants = []
    for worker in NODES:
        core.receive(worker, proto.encode(proto.Ready(digests=records(worker, -1))), 0.0)
    grants = [proto.decode(frame, limit=proto.MAX_SETUP_FRAME) for _, frame in core.outbox]
    starts = {g.start for g in grants if isinstance(g, proto.Grant)}
    assert starts == {1000.02}


@pytest.mark.parametrize("window, record, expected", [(None, 36, 16), (7, 36, 7),
                                                      (None, 4 * 1024 * 1024, 1)])
def test_window_sizer_starts_small_and_respects_limits(window: int | None, record: int,
                                                       expected: int) -> None:
    assert WindowSizer(window, record, 1.0, False).size == expected


def test_window_sizer_grows_while_ticks_are_cheap_and_shrinks_when_not() -> None:
    sizer = WindowSizer(None, 36, 1.0, False)
    sizer.observe(16, 0.0016)        # 0.1 ms a tick: grow, at most 8x at a time
    assert sizer.size == 128
    sizer.observe(128, 0.0128)
    assert sizer.size == 1000        # 0.1 s of 0.1 ms ticks
    sizer.observe(1000, 10.0)        # 10 ms a tick: 0.1 s is 10 ticks
    assert sizer.size == 10
    fixed = WindowSizer(3, 36, 1.0, False)
    fixed.observe(3, 10.0)
    assert fixed.size == 3


def test_an_interrupt_lets_the_window_end_and_keeps_the_results_at_that_tick() -> None:
    run = Run(window=3)
    run.start()
    run.window(2)                      # GRANT until 5 is out now
    run.core.interrupt(2, run.now)
    assert run.core.failure is None and not any(
        isinstance(run.last(worker), proto.Stop) for worker in NODES)  # the window goes on
    run.window(5)
    for worker in NODES:               # no GRANT after it: a drained STOP
        assert run.last(worker) == proto.Stop(reason="Interrupted: interrupted by SIGINT",
                                              drain=True)
        run.say(worker, proto.Bye(results={node: len(node) for node in NODES[worker]}))
    failure = run.core.failure
    assert run.core.finished and isinstance(failure, Interrupted) and failure.signal == 2
    partial = failure.partial
    assert partial is not None and run.core.result is None
    assert (partial.status, partial.ticks) == ("interrupted", 6)
    assert partial.digest == expected_digest(6)[-1]
    assert partial.nodes == {"a": 1, "b": 1, "c": 1, "z": 1}
    assert {row["status"] for row in partial.lines()} == {"interrupted"}


@pytest.mark.parametrize("how", ["second signal", "window too slow"])
def test_an_interrupt_without_a_cut_stops_at_once_with_no_results(how: str) -> None:
    run = Run(window=3)
    run.start()
    run.core.interrupt(15, run.now)
    if how == "second signal":
        run.core.interrupt(2, run.now)
    else:  # the workers still say PROGRESS (not silent): the window just never ends
        for _ in range(int(CUT_GRACE_S) + 1):
            run.now += 1.0
            for worker in NODES:
                run.say(worker, proto.Progress(tick=None, waiting=[]))
            run.core.poll(run.now)
    run.flush()
    for worker in NODES:
        assert run.last(worker) == proto.Stop(reason="Interrupted: interrupted by SIGTERM",
                                              drain=False)
        run.say(worker, proto.Bye())
    failure = run.core.failure
    assert run.core.finished and isinstance(failure, Interrupted) and failure.partial is None



def observed(rows: list[tuple[int, str, float]]) -> list[bytes]:
    """One worker's DONE.observed of a window: its rows, all named x."""
    return [pack_observed({"x": [[tick for tick, _, _ in rows], [node for _, node, _ in rows],
                                 [value for _, _, value in rows]]})]


def test_each_window_s_observations_are_taken_in_sorted_once_every_done_is_in() -> None:
    run = Run(window=2)
    run.start()
    said = {"w0": observed([(0, "b", 1.0), (0, "a", 2.0), (1, "b", 3.0)]),
            "w1": observed([(1, "c", 4.0)])}
    for worker in ("w0", "w1"):
        run.say(worker, proto.Done(until=1, digests=records(worker, 0) + records(worker, 1),
                                   observed=said[worker]))
    run.say("w2", proto.Done(until=1, digests=records("w2", 0) + records("w2", 1)))
    assert isinstance(run.last("w2"), proto.Grant)  # the next window first ...
    assert run.core.observations.rows == 0
    run.core.flush_observed(run.now)                # ... then the shell has them read
    table = run.core.observations.table()
    assert table["tick"].tolist() == [0, 0, 1, 1]
    assert list(table["node"]) == ["a", "b", "b", "c"]
    assert table["value"].tolist() == [2.0, 1.0, 3.0, 4.0]


def say_observed(blobs: list[bytes]) -> RunFailed:
    """w0's window 0..1 with ``blobs`` as its observations; the run's failure."""
    run = Run(window=2)
    run.start()
    for worker in NODES:
        run.say(worker, proto.Done(until=1, digests=records(worker, 0) + records(worker, 1),
                                   observed=blobs if worker == "w0" else []))
    run.core.flush_observed(run.now)
    run.flush()
    failure = run.core.failure
    assert isinstance(failure, RunFailed) and failure.worker == "w0", failure
    assert isinstance(run.last("w0"), proto.Error)  # it is told why, as for any bad frame
    return failure


@pytest.mark.parametrize("rows, why", [([(0, "c", 1.0)], "nodes not under w0: c"),
                                       ([(2, "a", 1.0)], "ticks outside the window 0..1")])
def test_observations_of_other_nodes_or_ticks_fail_the_run_naming_the_field(
        rows: list[tuple[int, str, float]], why: str) -> None:
    failure = say_observed(observed(rows))
    assert "DONE.observed[0].x" in failure.cause and why in failure.cause


def test_window_sizer_keeps_a_done_with_observations_under_its_limit() -> None:
    sizer = WindowSizer(None, 36, 1.0, False)
    sizer.observe(16, 0.0016, WindowSizer.MAX_DONE_BYTES // 2)  # cheap ticks, large DONEs
    assert sizer.size == 32 and sizer.limit == 32
    fixed = WindowSizer(64, 36, 1.0, False)  # a window the user fixed is theirs
    fixed.observe(64, 0.01, WindowSizer.MAX_DONE_BYTES * 2)
    assert fixed.size == 64


D8 = struct.pack("<d", 1.0)
Q8 = struct.pack("<q", 0)


@pytest.mark.parametrize("blob, where", [
    (b"\xc1", "DONE.observed[0]"),                                          # not msgpack
    (msgpack.packb([1, 2]), "DONE.observed[0]"),                            # not a map
    (msgpack.packb({"no spaces": [Q8, ["a"], D8]}), "DONE.observed[0].<key"),
    (msgpack.packb({"x": [Q8, ["a"]]}), "DONE.observed[0].x"),               # two columns
    (msgpack.packb({"x": [Q8 * 2, ["a"], D8]}), "DONE.observed[0].x"),       # lengths differ
    (msgpack.packb({"x": [Q8, [["a"]], D8]}), "DONE.observed[0].x"),         # a list for a name
    (msgpack.packb({"x": [Q8, ["a"], struct.pack("<d", math.nan)]}), "DONE.observed[0].x"),
    (msgpack.packb({"x": [struct.pack("<q", -1), ["a"], D8]}), "DONE.observed[0].x"),
])
def test_a_malformed_observation_is_a_bad_field(blob: bytes, where: str) -> None:
    failure = say_observed([blob])
    assert where in failure.cause and "expected" in failure.cause, failure.cause
