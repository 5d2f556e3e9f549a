"""The supervisor's fast path for ``--window 1`` (strict per-tick supervision).

While a run ticks, a DONE is decoded the quick way (protocol.frames.decode with
``expect``), one GRANT frame serves every worker, the last DONE of a window
grants the next at once, and a worker's exit is noticed by its pidfd, not by a
waitpid per cycle. None of it changes a digest or an error: a hostile DONE is
refused exactly as the general decoder refuses it, naming the field.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from hiocluster import protocol as proto
from hiocluster.supervision import supervisor
from hiocluster.runtime import launch
from hiocluster.errors import FrameError, ProcessExited, RunFailed
from hiocluster.protocol import DIGEST_SIZE
from hiocluster.supervision.runcore import Phase, RunCore
from hiocluster.topology import loads, plan

from conftest import REPO
from tests.calls import count_calls
from tests.faulty import ring_toml
from tests.test_runcore import Run, records

#: Python calls (functions and builtins, as sys.setprofile sees them) the core may make
#: on the DONE -> GRANT path of one --window 1 tick: per worker (decode and check its
#: DONE, note its records, send it the GRANT) and once per tick (fold the run digest,
#: pack the GRANT). Before the fast path: 66 per worker (with an O(N) "all IDLE?"
#: test per DONE) and 11 per tick; now 35 and 29.
CALLS_PER_WORKER = 36
CALLS_PER_TICK = 32


def run(text: str, **kwargs: Any) -> supervisor.RunResult:
    return supervisor.run(loads(text), app_dir=str(REPO), handle_signals=False, **kwargs)


# -- digests ----------------------------------------------------------------------


def test_window_1_computes_what_automatic_windows_compute() -> None:
    text = ring_toml({name: {} for name in ("a", "b", "c", "d")},
                     {"p0": ["a", "b"], "p1": ["c"], "p2": ["d"]}, ticks=60)
    auto = run(text, keep_digests=True)
    strict = run(text, window=1, keep_digests=True)
    assert strict.tick_digests == auto.tick_digests and len(auto.tick_digests) == 60
    assert strict.digest == auto.digest
    assert (strict.messages, strict.undelivered) == (auto.messages, auto.undelivered)
    assert strict.window == "1" and auto.window == "auto"


# -- hostile DONEs while running ---------------------------------------------------


def _done(body: Any, *, version: Any = proto.VERSION, kind: Any = "DONE") -> bytes:
    return msgpack.packb([version, kind, body], use_bin_type=True)


GOOD = records("w1", 0)
#: a hostile DONE of w1 at tick 0 of a --window 1 run -> (field, code) it must be refused with
HOSTILE: dict[str, tuple[bytes, str, str]] = {
    "version 2": (_done({"until": 0, "digests": GOOD}, version=2), "version", "version"),
    "version 3.0": (_done({"until": 0, "digests": GOOD}, version=3.0), "version", "version"),
    "version True": (_done({"until": 0, "digests": GOOD}, version=True), "version", "version"),
    "type as bytes": (_done({"until": 0, "digests": GOOD}, kind=b"DONE"), "type", "bad-type"),
    "type READY": (_done({"digests": GOOD}, kind="READY"), "type", "unexpected"),
    "body a list": (_done([0, GOOD]), "body", "bad-field"),
    "until a string": (_done({"until": "0", "digests": GOOD}), "DONE.until", "bad-field"),
    "until a bool": (_done({"until": False, "digests": GOOD}), "DONE.until", "bad-field"),
    "until a float": (_done({"until": 0.0, "digests": GOOD}), "DONE.until", "bad-field"),
    "until negative": (_done({"until": -1, "digests": GOOD}), "DONE.until", "bad-field"),
    "until in the future": (_done({"until": 1, "digests": GOOD}), "DONE.until", "wrong-tick"),
    "digests a string": (_done({"until": 0, "digests": "x"}), "DONE.digests", "bad-field"),
    "digests short": (_done({"until": 0, "digests": GOOD[:-1]}), "DONE.digests", "bad-field"),
    "digests of two ticks": (_done({"until": 0, "digests": GOOD * 2}), "DONE.digests",
                             "bad-field"),
    "digests missing": (_done({"until": 0}), "DONE.digests", "bad-field"),
    "a field too many": (_done({"until": 0, "digests": GOOD, "x": 1}), "DONE.x", "bad-field"),
    "a field renamed": (_done({"until": 0, "digest": GOOD}), "DONE.digest", "bad-field"),
    "an integer key": (_done({"until": 0, 1: GOOD}), "frame", "bad-msgpack"),
    "trailing bytes": (_done({"until": 0, "digests": GOOD}) + b"\0", "frame", "bad-msgpack"),
    "not msgpack": (b"\xc1", "frame", "bad-msgpack"),
    "empty": (b"", "frame", "bad-msgpack"),
    "oversized": (_done({"until": 0, "digests": b"x" * proto.MAX_CONTROL_FRAME}), "frame",
                  "oversized"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_done_while_running_fails_the_run_naming_the_field(case: str) -> None:
    raw, field, code = HOSTILE[case]
    run = Run(window=1)
    run.start()
    run.say("w0", proto.Done(until=0, digests=records("w0", 0)))  # the fast path, taken
    assert run.core.failure is None and run.core.owed == 2
    run.say("w1", proto.Done(until=0, digests=GOOD), raw=raw)
    failure = run.core.failure
    assert type(failure) is RunFailed and failure.worker == "w1" and failure.tick == 0
    assert field in failure.cause
    error = run.last("w1")
    assert isinstance(error, proto.Error) and (error.field, error.code) == (field, code)
    assert run.core.phase is Phase.STOPPING and run.core.books["w1"].failed
    assert isinstance(run.last("w0"), proto.Stop) and isinstance(run.last("w2"), proto.Stop)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_the_quick_decoder_refuses_what_the_general_one_refuses(case: str) -> None:
    raw = HOSTILE[case][0]
    allowed = proto.ParentMachine.ALLOWED_IN
    try:
        expected: Any = proto.decode(raw, allowed=allowed)
    except FrameError as exc:
        expected = (exc.field, exc.code)
    try:
        got: Any = proto.decode(raw, allowed=allowed, expect=proto.Done)
    except FrameError as exc:
        got = (exc.field, exc.code)
    assert got == expected


def test_a_done_that_is_only_late_after_stop_is_still_taken() -> None:
    run = Run(window=1)
    run.start()
    run.core.interrupt(15, run.now)  # STOP while tick 0 runs: each worker owes its DONE
    run.say("w1", proto.Done(until=0, digests=GOOD))
    assert not run.core.books["w1"].failed


# -- the cost of a tick, in calls -------------------------------------------------------


def _strict_core(workers: int) -> tuple[RunCore, dict[str, proto.ChildMachine]]:
    """A --window 1 core of ``workers`` one-node workers, past READY (tick 0 granted)."""
    lines = ["[run]", "ticks = 1000"]
    for index in range(workers):
        lines += [f"[nodes.n{index}]", 'class = "m:A"']
    lines.append("[placement]")
    lines += [f'w{index} = ["n{index}"]' for index in range(workers)]
    topology = loads("\n".join(lines) + "\n")
    core = RunCore(topology, plan(topology), now=0.0, token=b"t" * 16, window=1)
    machines = {name: proto.ChildMachine(name) for name in core.books}
    state = {name: f"n{name[1:]}".encode() + b"\0" * DIGEST_SIZE for name in core.books}

    def say(name: str, message: proto.Message) -> None:
        frame = machines[name].send(message, checked=False)
        if not core.books[name].joined:
            assert core.admit([b"id", frame])[0] == name
        core.receive(name, frame, 1.0)

    for name in core.books:
        say(name, proto.Hello(worker=name, token=b"t" * 16, pid=1,
                              versions=proto.local_versions(), data_address=f"ipc:///d-{name}"))
    deliver = lambda: [machines[name].receive(frame) for name, frame in core.outbox]  # noqa
    deliver()  # SETUP
    core.outbox.clear()
    for name in core.books:
        say(name, proto.Ready(digests=state[name]))
    deliver()  # GRANT until 0
    core.outbox.clear()
    core.state = state  # type: ignore[attr-defined]  # one tick's records per worker
    return core, machines


@pytest.mark.parametrize("workers", [1, 2, 8])
def test_a_strict_tick_costs_the_core_a_bounded_number_of_calls_per_worker(
        workers: int) -> None:
    core, machines = _strict_core(workers)
    for tick in range(20):
        frames = [(name, machines[name].send(
            proto.Done(until=tick, digests=core.state[name]),  # type: ignore[attr-defined]
            checked=False)) for name in core.books]
        if tick == 19:  # warm: measure the last one
            calls = count_calls(lambda: [core.receive(name, frame, 2.0)
                                          for name, frame in frames])
        else:
            for name, frame in frames:
                core.receive(name, frame, 2.0)
        assert core.failure is None and core.granted == tick + 1
        for name, frame in core.outbox:  # the next GRANT: one frame for every worker
            assert machines[name].receive(frame) == proto.Grant(until=tick + 1)
        assert len({id(frame) for _, frame in core.outbox}) == 1
        core.outbox.clear()
    budget = CALLS_PER_TICK + CALLS_PER_WORKER * workers
    assert calls <= budget, f"{calls} calls for a tick of {workers} workers (budget {budget})"


# -- a worker killed mid-run ---------------------------------------------------------


def test_a_worker_killed_mid_run_under_window_1_is_named_with_its_tick(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    looks: dict[int, int] = {}
    exitcode = launch.LocalProcess.exitcode

    def counted(handle: Any) -> int | None:
        looks[id(handle)] = looks.get(id(handle), 0) + 1
        return exitcode(handle)

    monkeypatch.setattr(launch.LocalProcess, "exitcode", counted)
    marks = str(tmp_path)
    ticks = 400
    text = ring_toml({"a": {"marker_dir": marks},
                      "killer": {"marker_dir": marks, "fail_at": ticks - 10,
                                 "fail": "sigkill"},
                      "b": {"marker_dir": marks}}, ticks=ticks)
    started = time.monotonic()
    with pytest.raises(ProcessExited) as info:
        run(text, window=1)
    seconds = time.monotonic() - started
    error = info.value
    assert (error.worker, error.nodes, error.exitcode) == ("killer", ("killer",), -9)
    assert error.tick == ticks - 10 and "SIGKILL" in error.cause
    # its exit was noticed by its pidfd: the processes were looked at every LOOK_S,
    # not once per tick (a waitpid per worker per cycle made that thousands)
    allowed = seconds / supervisor.LOOK_S + 20
    assert len(looks) == 3 and max(looks.values()) <= allowed, (looks, allowed)
