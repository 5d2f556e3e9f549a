"""Unit tests of hiocluster.protocol: frames and state machines, no sockets, no processes.

Conversations shuttle frames between an in-memory ParentMachine and ChildMachine
(:class:`Pair`, after h11's ConnectionPair). docs/protocol.md is checked against
the code where it quotes it (transition tables, the worked TICK example).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from hiocluster import protocol as proto
from hiocluster.errors import FrameError, LocalProtocolError, RemoteProtocolError
from hiocluster.protocol import (CHILD_TRANSITIONS, MAX_CONTROL_FRAME, MAX_DATA_FRAME, MAX_STR,
                                 PARENT_TRANSITIONS, Bye, ChildMachine, ChildState, Data, Error,
                                 Hello, Message, ParentMachine, ParentState, Ready, Setup, Stop,
                                 Tick, Tock, decode, decode_data, encode)

C, P = ChildState, ParentState
DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
FEW = settings(max_examples=200)

DIGEST = bytes(range(32))
HELLO = Hello(process="w0", pid=4242, data_address="ipc:///tmp/hioc-x/d0", nodes=["a", "b"])
SETUP = Setup(t0=0.0, tock=0.5, seed=7,
              addresses={"w0": "ipc:///tmp/hioc-x/d0", "w1": "tcp://10.0.0.2:40001"},
              placement={"a": "w0", "b": "w0", "c": "w1"},
              links=[[0, "a", "out", "c", "in", 16], [1, "c", "out", "a", "in", 1]])
TOCK_0 = Tock(n=0, sent=["w1"], digests={"a": DIGEST, "b": bytes(32)})
DATA = Data(tick=3, source="w1",
            messages=[[1, [0, 1], [{"k": [1, -2, 2.5, None, True, b"\0", "s"]}, "second"]],
                      [2, [5], [None]]], acks=[[0, 4]])
SAMPLES: list[Message] = [
    HELLO, SETUP, Ready(), Tick(n=3, expect=2), TOCK_0, Tock(n=9, sent=[], digests={}),
    Stop(reason="done", expect=1), Stop(reason="RunFailed: boom"),
    Bye(stats={"rejected": 0, "undelivered": 1, "unread": 2}), Bye(),
    Error(code="bad-field", detail="TICK.n: expected ...", field="TICK.n", tick=3, node="a"),
    Error(code="terminated", detail="SIGTERM"), DATA,
    Data(tick=0, source="w0", messages=[], acks=[]),
]


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def frame_error(data: bytes, field: str, code: str, **kwargs: Any) -> FrameError:
    """Assert decode(data) raises FrameError with this field and code."""
    with pytest.raises(FrameError) as info:
        decode(data, **kwargs)
    assert (info.value.field, info.value.code) == (field, code), str(info.value)
    return info.value


class Pair:
    """A parent and a child machine back to back; frames go through encode/decode."""

    def __init__(self, process: str = "w0") -> None:
        self.parent = ParentMachine(process)
        self.child = ChildMachine(process)

    def child_says(self, message: Message) -> Message:
        return self.parent.receive(self.child.send(message))

    def parent_says(self, message: Message) -> Message:
        return self.child.receive(self.parent.send(message))

    @property
    def states(self) -> tuple[ChildState, ParentState]:
        return self.child.state, self.parent.state

    def handshake(self) -> Pair:
        self.child_says(HELLO)
        self.parent_says(SETUP)
        self.child_says(Ready())
        return self

    def run_ticks(self, count: int) -> Pair:
        start = 0 if self.child.tick is None else self.child.tick + 1
        for n in range(start, start + count):
            self.parent_says(Tick(n=n, expect=0))
            self.child_says(Tock(n=n, sent=[], digests={"a": DIGEST}))
        return self


# ---------------------------------------------------------------------------
# framing: round trips


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.TYPE)
def test_encode_decode_round_trip(message: Message) -> None:
    decoded = decode(encode(message), limit=MAX_DATA_FRAME)
    assert type(decoded) is type(message)
    assert decoded == message


def test_encode_frame_is_version_type_body() -> None:
    assert msgpack.unpackb(encode(Tick(n=3, expect=2))) == [1, "TICK", {"n": 3, "expect": 2}]
    # the worked example of docs/protocol.md, byte for byte
    assert encode(Tick(n=3, expect=2)).hex() == "9301a45449434b82a16e03a665787065637402"


def test_encode_uses_bin_for_bytes_and_str_for_names() -> None:
    version, kind, body = msgpack.unpackb(encode(TOCK_0), raw=False)
    assert (version, kind, type(body["digests"]["a"])) == (1, "TOCK", bytes)
    assert encode(TOCK_0).count(b"\xc4\x20") == 2  # bin 8, length 32: one per digest


def test_encode_unpackable_field_raises_frame_error() -> None:
    with pytest.raises(FrameError) as info:
        encode(Data(tick=0, source="w0", messages=[[0, [0], [object()]]], acks=[]))
    assert (info.value.field, info.value.code) == ("body", "unpackable")


def test_decode_optional_fields_may_be_left_out() -> None:
    assert decode(pack([1, "STOP", {"reason": "x"}])) == Stop(reason="x", expect=None)
    assert decode(pack([1, "BYE", {}])) == Bye(stats={})
    assert decode(pack([1, "ERROR", {"code": "c", "detail": "d"}])) == Error("c", "d")


def test_decode_accepts_buffer_types() -> None:
    data = encode(Tick(n=1, expect=0))
    assert decode(bytearray(data)) == decode(memoryview(data)) == Tick(n=1, expect=0)


def test_decode_data_frame_over_control_limit_needs_data_limit() -> None:
    data = encode(Data(tick=0, source="w0", messages=[[0, [0], [b"\0" * MAX_CONTROL_FRAME]]],
                       acks=[]))
    frame_error(data, "frame", "oversized")
    assert decode(data, limit=MAX_DATA_FRAME, allowed=(Data,)).tick == 0


# ---------------------------------------------------------------------------
# framing: bad bytes


@pytest.mark.parametrize("data", [b"\xc1", b"\xff\xff\xff", b"hello world", b"\x93\x01",
                                  b"\xdd\xff\xff\xff\xff", encode(Ready()) + b"\0"],
                         ids=["never-used", "garbage", "text", "short", "huge-claim",
                              "trailing"])
def test_decode_garbage_is_bad_msgpack(data: bytes) -> None:
    frame_error(data, "frame", "bad-msgpack")


def test_decode_empty_frame() -> None:
    frame_error(b"", "frame", "bad-msgpack")


@pytest.mark.parametrize("message", [SETUP, TOCK_0, DATA, HELLO], ids=lambda m: m.TYPE)
def test_decode_every_truncation_is_frame_error(message: Message) -> None:
    data = encode(message)
    for cut in range(len(data)):
        with pytest.raises(FrameError) as info:
            decode(data[:cut], limit=MAX_DATA_FRAME)
        assert info.value.field == "frame", (cut, str(info.value))


@pytest.mark.parametrize("obj", [{"n": 1}, 5, "TICK", [1, "TICK"], [1, "TICK", {}, 0], []],
                         ids=["map", "int", "str", "two", "four", "empty"])
def test_decode_wrong_top_level_shape(obj: Any) -> None:
    frame_error(pack(obj), "frame", "bad-frame")


@pytest.mark.parametrize("version", [0, 2, -1, True, 1.0, "1", None])
def test_decode_wrong_version(version: Any) -> None:
    frame_error(pack([version, "TICK", {"n": 0, "expect": 0}]), "version", "version")


@pytest.mark.parametrize("kind", ["NOPE", "tick", "", 5, None, b"TICK"])
def test_decode_unknown_type(kind: Any) -> None:
    frame_error(pack([1, kind, {"n": 0, "expect": 0}]), "type", "bad-type")


def test_decode_type_not_allowed_here() -> None:
    frame_error(encode(DATA), "type", "bad-type", allowed=(Setup, Tick, Stop, Error))
    frame_error(encode(Tick(n=0, expect=0)), "type", "bad-type", allowed=(Data,))
    assert decode(encode(DATA), allowed=(Data,)) == DATA


@pytest.mark.parametrize("body", [[0, 0], None, "n=0"])
def test_decode_body_not_a_map(body: Any) -> None:
    frame_error(pack([1, "TICK", body]), "body", "bad-field")


def test_decode_missing_field() -> None:
    frame_error(pack([1, "TICK", {"n": 3}]), "TICK.expect", "bad-field")
    frame_error(pack([1, "HELLO", {"process": "w0", "pid": 1, "nodes": []}]),
                "HELLO.data_address", "bad-field")


def test_decode_unknown_extra_field() -> None:
    frame_error(pack([1, "TICK", {"n": 3, "expect": 0, "extra": 1}]), "TICK.extra", "bad-field")
    frame_error(pack([1, "READY", {"x": None}]), "READY.x", "bad-field")


def test_decode_non_string_map_keys_are_bad_msgpack_except_in_payloads() -> None:
    frame_error(pack([1, "TICK", {1: 3, "expect": 0}]), "frame", "bad-msgpack")
    payload_with_int_key = pack([1, "DATA", {"tick": 0, "source": "w0", "acks": [],
                                             "messages": [[0, [0], [{1: "x"}]]]}])
    frame_error(payload_with_int_key, "frame", "bad-msgpack", limit=MAX_DATA_FRAME)
    assert decode_data(payload_with_int_key).messages == [[0, [0], [{1: "x"}]]]


def test_decode_data_checks_sequences_against_payloads() -> None:
    for bad, why in [([[0, [1, 1], ["a", "b"]]], "increasing"), ([[0, [1], ["a", "b"]]], "got 1 and 2"),
                     ([[0, [True], ["a"]]], "increasing"), ([[0, [-1], ["a"]]], "increasing")]:
        with pytest.raises(FrameError) as info:
            decode_data(encode(Data(tick=1, source="w0", messages=bad, acks=[])))
        assert info.value.field.startswith("DATA.messages[0]") and why in str(info.value)


def test_decode_ext_types_are_bad_msgpack() -> None:
    ext = pack([1, "DATA", {"tick": 0, "source": "w0", "acks": [],
                            "messages": [[0, [0], [msgpack.ExtType(1, b"x")]]]}])
    frame_error(ext, "frame", "bad-msgpack", limit=MAX_DATA_FRAME)


def test_decode_string_longer_than_max_str() -> None:
    body = {"code": "c", "detail": "x" * (MAX_STR + 1)}
    frame_error(pack([1, "ERROR", body]), "frame", "bad-msgpack")
    assert decode(pack([1, "ERROR", {"code": "c", "detail": "x" * MAX_STR}])).detail


def test_decode_bytes_packed_as_str_are_rejected() -> None:
    # a peer that packs without the bin type sends digests as (raw) strings
    legacy = msgpack.packb([1, "TOCK", TOCK_0.to_body()], use_bin_type=False)
    frame_error(legacy, "TOCK.digests.a", "bad-field")


def test_decode_oversized_control_frame() -> None:
    data = pack([1, "TICK", {"n": 0, "expect": 0, "pad": b"\0" * MAX_CONTROL_FRAME}])
    assert len(data) > MAX_CONTROL_FRAME
    frame_error(data, "frame", "oversized")


def test_decode_limit_is_inclusive() -> None:
    data = encode(DATA)
    assert decode(data, limit=len(data)) == DATA
    frame_error(data, "frame", "oversized", limit=len(data) - 1)


@pytest.mark.parametrize("where", ["frame", "field"])
def test_decode_deeply_nested_frame_is_frame_error(where: str) -> None:
    nested = b"\x91" * 1010 + b"\x00"
    data = nested if where == "frame" else encode(Tick(n=0, expect=0))[:-1] + nested
    with pytest.raises(FrameError):
        decode(data)


# ---------------------------------------------------------------------------
# framing: bad fields, one at a time

BAD_FIELDS = [  # (valid message, field name, bad value, expected FrameError.field)
    (Tick(n=0, expect=0), "n", "3", "TICK.n"),
    (Tick(n=0, expect=0), "n", -1, "TICK.n"),
    (Tick(n=0, expect=0), "n", True, "TICK.n"),
    (Tick(n=0, expect=0), "n", 3.0, "TICK.n"),
    (Tick(n=0, expect=0), "n", 2**63, "TICK.n"),
    (Tick(n=0, expect=0), "n", None, "TICK.n"),
    (Tick(n=0, expect=0), "expect", -2**63, "TICK.expect"),
    (TOCK_0, "digests", {"a": b"\0" * 31}, "TOCK.digests.a"),
    (TOCK_0, "digests", {"a": b"\0" * 33}, "TOCK.digests.a"),
    (TOCK_0, "digests", {"a": "x" * 32}, "TOCK.digests.a"),
    (TOCK_0, "digests", {"-a": DIGEST}, "TOCK.digests.<key '-a'>"),
    (TOCK_0, "digests", [DIGEST], "TOCK.digests"),
    (TOCK_0, "sent", ["w1", "no spaces"], "TOCK.sent[1]"),
    (TOCK_0, "sent", "w1", "TOCK.sent"),
    (HELLO, "process", "-w0", "HELLO.process"),
    (HELLO, "process", ".w0", "HELLO.process"),
    (HELLO, "process", "", "HELLO.process"),
    (HELLO, "process", "w" * 65, "HELLO.process"),
    (HELLO, "process", "w0\n", "HELLO.process"),
    (HELLO, "process", "w/0", "HELLO.process"),
    (HELLO, "process", b"w0", "HELLO.process"),
    (HELLO, "pid", -1, "HELLO.pid"),
    (HELLO, "data_address", "http://x", "HELLO.data_address"),
    (HELLO, "data_address", "ipc://", "HELLO.data_address"),
    (HELLO, "data_address", "tcp://a b", "HELLO.data_address"),
    (HELLO, "nodes", ["a", 1], "HELLO.nodes[1]"),
    (SETUP, "links", [[0, "a", "out", "c", "in"]], "SETUP.links[0]"),
    (SETUP, "links", [[0, "a", "out", "c", "in", 1, 2]], "SETUP.links[0]"),
    (SETUP, "links", [[0, "a", "out", "c", "in", -1]], "SETUP.links[0][5]"),
    (SETUP, "links", [[0, "a", "out", "c d", "in", 1]], "SETUP.links[0][3]"),
    (SETUP, "links", [SETUP.links[0], "x"], "SETUP.links[1]"),
    (SETUP, "tock", 0, "SETUP.tock"),
    (SETUP, "tock", -0.5, "SETUP.tock"),
    (SETUP, "tock", float("nan"), "SETUP.tock"),
    (SETUP, "t0", float("inf"), "SETUP.t0"),
    (SETUP, "t0", False, "SETUP.t0"),
    (SETUP, "seed", -1, "SETUP.seed"),
    (SETUP, "addresses", {"w0": "ftp://x"}, "SETUP.addresses.w0"),
    (SETUP, "placement", {"a": 3}, "SETUP.placement.a"),
    (Stop(reason="x", expect=1), "expect", -1, "STOP.expect"),
    (Stop(reason="x", expect=1), "reason", None, "STOP.reason"),
    (Bye(), "stats", {"unread": "1"}, "BYE.stats.unread"),
    (Error(code="c", detail="d"), "node", "bad name", "ERROR.node"),
    (Error(code="c", detail="d"), "tick", -1, "ERROR.tick"),
    (Error(code="c", detail="d"), "code", 5, "ERROR.code"),
    (DATA, "tick", "3", "DATA.tick"),
    (DATA, "source", "", "DATA.source"),
    (DATA, "messages", [[0, [1]]], "DATA.messages[0]"),
    (DATA, "messages", [[0, [-1], ["x"]]], "DATA.messages[0][1]"),
    (DATA, "messages", [[0, [1], "x"]], "DATA.messages[0][2]"),
    (DATA, "messages", [[0, [1, 2], ["x"]]], "DATA.messages[0]"),
    (DATA, "acks", [[0, -1]], "DATA.acks[0][1]"),
    (DATA, "acks", [[0, 1, 2]], "DATA.acks[0]"),
]


@pytest.mark.parametrize("message, name, value, field", BAD_FIELDS,
                         ids=[f"{m.TYPE}.{n}={v!r}"[:50] for m, n, v, _ in BAD_FIELDS])
def test_decode_bad_field_names_it(message: Message, name: str, value: Any,
                                   field: str) -> None:
    body = dict(message.to_body(), **{name: value})
    error = frame_error(pack([1, message.TYPE, body]), field, "bad-field",
                        limit=MAX_DATA_FRAME)
    assert str(error).startswith(field + ": expected")


# ---------------------------------------------------------------------------
# state machines: the happy path


def test_machines_happy_path_conversation() -> None:
    pair = Pair("w0")
    assert pair.states == (C.START, P.AWAIT_HELLO)
    assert pair.child_says(HELLO) == HELLO
    assert pair.states == (C.AWAIT_SETUP, P.HELLO_RECEIVED)
    assert pair.parent_says(SETUP) == SETUP
    assert pair.states == (C.SETTING_UP, P.AWAIT_READY)
    pair.child_says(Ready())
    assert pair.states == (C.IDLE, P.IDLE)
    assert pair.child.tick is None and pair.parent.tick is None
    for n in range(4):
        assert pair.parent_says(Tick(n=n, expect=n % 3)) == Tick(n=n, expect=n % 3)
        assert pair.states == (C.TICKING, P.AWAIT_TOCK)
        assert pair.child.tick == pair.parent.tick == n
        tock = Tock(n=n, sent=["w1"], digests={"a": DIGEST, "b": DIGEST})
        assert pair.child_says(tock) == tock
        assert pair.states == (C.IDLE, P.IDLE)
    pair.parent_says(Stop(reason="done", expect=1))
    assert pair.states == (C.STOPPING, P.AWAIT_BYE)
    bye = Bye(stats={"rejected": 0, "undelivered": 1, "unread": 0})
    assert pair.child_says(bye) == bye
    assert pair.states == (C.CLOSED, P.CLOSED)


def test_machines_send_returns_the_encoded_frame() -> None:
    child = ChildMachine("w0")
    assert child.send(HELLO) == encode(HELLO)


def test_parent_machine_without_name_accepts_any_hello() -> None:
    parent = ParentMachine()
    assert parent.receive(encode(HELLO)) == HELLO
    assert parent.state is P.HELLO_RECEIVED


@pytest.mark.parametrize("reach", ["await-setup", "setting-up", "idle", "idle-after-ticks"])
def test_child_machine_stop_allowed_before_ticking(reach: str) -> None:
    pair = Pair()
    pair.child_says(HELLO)
    if reach != "await-setup":
        pair.parent_says(SETUP)
    if reach.startswith("idle"):
        pair.child_says(Ready())
    if reach == "idle-after-ticks":
        pair.run_ticks(2)
    pair.parent_says(Stop(reason="done", expect=0))
    assert pair.states == (C.STOPPING, P.AWAIT_BYE)
    pair.child_says(Bye())
    assert pair.states == (C.CLOSED, P.CLOSED)


@pytest.mark.parametrize("steps", [0, 1, 2, 3], ids=["await-hello", "hello-received",
                                                     "await-ready", "idle"])
def test_parent_machine_may_send_stop_until_ticking(steps: int) -> None:
    pair = Pair()
    actions: list[Callable[[], Any]] = [lambda: pair.child_says(HELLO),
                                        lambda: pair.parent_says(SETUP),
                                        lambda: pair.child_says(Ready())]
    for action in actions[:steps]:
        action()
    pair.parent.send(Stop(reason="x"))
    assert pair.parent.state is P.AWAIT_BYE


def test_parent_machine_accepts_late_tock_after_stop() -> None:
    pair = Pair().handshake().run_ticks(2)
    tick = pair.parent.send(Tick(n=2, expect=0))
    stop = pair.parent.send(Stop(reason="interrupted", expect=None))  # crosses the TOCK
    assert pair.parent.state is P.AWAIT_BYE
    pair.child.receive(tick)
    pair.child_says(Tock(n=2, sent=[], digests={"a": DIGEST}))
    assert pair.parent.state is P.AWAIT_BYE
    assert pair.child.receive(stop) == Stop(reason="interrupted")
    pair.child_says(Bye())
    assert pair.states == (C.CLOSED, P.CLOSED)


def test_parent_machine_rejects_stale_tock_after_stop() -> None:
    pair = Pair().handshake().run_ticks(3)
    pair.parent.send(Tick(n=3, expect=0))
    pair.parent.send(Stop(reason="x"))
    with pytest.raises(RemoteProtocolError) as info:
        pair.parent.receive(encode(Tock(n=1, sent=[], digests={})))
    assert (info.value.field, info.value.code) == ("TOCK.n", "stale-tick")
    assert pair.parent.state is P.ERROR


def test_child_machine_accepts_stop_while_ticking() -> None:
    pair = Pair().handshake()
    pair.parent_says(Tick(n=0, expect=1))
    pair.parent_says(Stop(reason="another process failed"))
    assert pair.states == (C.STOPPING, P.AWAIT_BYE)


def test_parent_machine_accepts_late_ready_after_stop() -> None:
    pair = Pair()
    pair.child_says(HELLO)
    pair.parent_says(SETUP)
    ready = pair.child.send(Ready())
    pair.parent.send(Stop(reason="start-up failed"))
    pair.parent.receive(ready)
    assert pair.parent.state is P.AWAIT_BYE


def test_parent_machine_rejects_duplicate_tock_after_stop() -> None:
    pair = Pair().handshake().run_ticks(1)
    pair.parent.send(Stop(reason="done", expect=0))
    with pytest.raises(RemoteProtocolError):
        pair.parent.receive(encode(Tock(n=0, sent=[], digests={"a": DIGEST})))


# ---------------------------------------------------------------------------
# state machines: ticks out of order


def test_child_machine_rejects_tick_from_the_past() -> None:
    pair = Pair().handshake().run_ticks(4)  # ticks 0..3 done
    with pytest.raises(RemoteProtocolError) as info:
        pair.child.receive(encode(Tick(n=2, expect=0)))
    assert (info.value.field, info.value.code, info.value.tick) == ("TICK.n", "stale-tick", 3)
    assert pair.child.state is C.ERROR


def test_child_machine_rejects_repeated_tick_as_stale() -> None:
    pair = Pair().handshake().run_ticks(4)
    with pytest.raises(RemoteProtocolError) as info:
        pair.child.receive(encode(Tick(n=3, expect=0)))
    assert info.value.code == "stale-tick"


@pytest.mark.parametrize("done, n", [(0, 1), (2, 3), (2, 5)], ids=["first-not-0", "skip", "jump"])
def test_child_machine_rejects_tick_gap(done: int, n: int) -> None:
    pair = Pair().handshake().run_ticks(done)
    with pytest.raises(RemoteProtocolError) as info:
        pair.child.receive(encode(Tick(n=n, expect=0)))
    assert (info.value.field, info.value.code) == ("TICK.n", "tick-gap")
    assert pair.child.state is C.ERROR


@pytest.mark.parametrize("n", [0, 2, 4])
def test_parent_machine_send_tick_out_of_order_is_local_error(n: int) -> None:
    pair = Pair().handshake().run_ticks(1)
    with pytest.raises(LocalProtocolError) as info:
        pair.parent.send(Tick(n=n, expect=0))
    assert (info.value.field, info.value.code) == ("TICK.n", "tick-gap")
    assert pair.parent.state is P.ERROR


@pytest.mark.parametrize("n, code", [(2, "stale-tick"), (4, "wrong-tick")])
def test_parent_machine_rejects_tock_for_wrong_tick(n: int, code: str) -> None:
    pair = Pair().handshake().run_ticks(3)
    pair.parent.send(Tick(n=3, expect=0))
    with pytest.raises(RemoteProtocolError) as info:
        pair.parent.receive(encode(Tock(n=n, sent=[], digests={})))
    assert (info.value.field, info.value.code, info.value.process) == ("TOCK.n", code, "w0")
    assert pair.parent.state is P.ERROR


def test_child_machine_send_tock_for_wrong_tick_is_local_error() -> None:
    pair = Pair().handshake().run_ticks(1)
    pair.parent_says(Tick(n=1, expect=0))
    with pytest.raises(LocalProtocolError) as info:
        pair.child.send(Tock(n=0, sent=[], digests={}))
    assert (info.value.field, info.value.code) == ("TOCK.n", "wrong-tick")


def test_parent_machine_rejects_hello_from_another_process() -> None:
    parent = ParentMachine("w0")
    with pytest.raises(RemoteProtocolError) as info:
        parent.receive(encode(Hello(process="w1", pid=1, data_address="ipc://x", nodes=[])))
    assert (info.value.field, info.value.code) == ("HELLO.process", "wrong-process")
    assert parent.state is P.ERROR


# ---------------------------------------------------------------------------
# state machines: messages out of place, and the ERROR state


@pytest.mark.parametrize("make, message", [
    (lambda: ChildMachine(), Ready()),
    (lambda: ChildMachine(), Tock(n=0, sent=[], digests={})),
    (lambda: Pair().handshake().child, Tock(n=0, sent=[], digests={})),
    (lambda: Pair().handshake().child, HELLO),
    (lambda: Pair().handshake().child, Bye()),
    (lambda: ChildMachine(), Tick(n=0, expect=0)),
    (lambda: ChildMachine(), DATA),
    (lambda: ParentMachine(), Tick(n=0, expect=0)),
    (lambda: ParentMachine(), SETUP),
    (lambda: Pair().handshake().parent, SETUP),
    (lambda: Pair().handshake().parent, Ready()),
], ids=["child-READY-at-start", "child-TOCK-at-start", "child-TOCK-idle", "child-HELLO-twice",
        "child-BYE-unasked", "child-sends-TICK", "child-sends-DATA", "parent-TICK-before-HELLO",
        "parent-SETUP-before-HELLO", "parent-SETUP-twice", "parent-sends-READY"])
def test_machine_send_not_allowed_is_local_error(make: Callable[[], Any],
                                                 message: Message) -> None:
    machine = make()
    with pytest.raises(LocalProtocolError) as info:
        machine.send(message)
    assert (info.value.field, info.value.code) == ("type", "unexpected")
    assert machine.state in (C.ERROR, P.ERROR)


@pytest.mark.parametrize("make, message", [
    (lambda: Pair().child, Tick(n=0, expect=0)),
    (lambda: Pair().child, Stop(reason="x")),
    (lambda: Pair().handshake().child, SETUP),
    (lambda: ParentMachine(), Ready()),
    (lambda: ParentMachine(), Tock(n=0, sent=[], digests={})),
    (lambda: Pair().handshake().parent, Bye()),
], ids=["child-TICK-at-start", "child-STOP-at-start", "child-SETUP-twice",
        "parent-READY-before-HELLO", "parent-TOCK-before-TICK", "parent-BYE-unasked"])
def test_machine_receive_not_allowed_is_remote_error(make: Callable[[], Any],
                                                     message: Message) -> None:
    machine = make()
    with pytest.raises(RemoteProtocolError) as info:
        machine.receive(encode(message))
    assert (info.value.field, info.value.code) == ("type", "unexpected")
    assert machine.state in (C.ERROR, P.ERROR)


@pytest.mark.parametrize("make, data", [
    (lambda: Pair().handshake().child, encode(DATA)),
    (lambda: Pair().handshake().child, encode(HELLO)),
    (lambda: ParentMachine(), encode(Tick(n=0, expect=0))),
    (lambda: ParentMachine(), encode(SETUP)),
], ids=["child-DATA", "child-HELLO", "parent-TICK", "parent-SETUP"])
def test_machine_receive_wrong_direction_type_is_frame_error(make: Callable[[], Any],
                                                             data: bytes) -> None:
    machine = make()
    with pytest.raises(FrameError) as info:
        machine.receive(data)
    assert (info.value.field, info.value.code) == ("type", "bad-type")
    assert machine.state in (C.ERROR, P.ERROR)


def _child_garbage(pair: Pair) -> None:
    pair.child.receive(b"\xc1")


def _child_stale(pair: Pair) -> None:
    pair.run_ticks(2)
    pair.child.receive(encode(Tick(n=0, expect=0)))


def _child_bad_send(pair: Pair) -> None:
    pair.child.send(Bye())


def _parent_oversized(pair: Pair) -> None:
    pair.parent.receive(b"\0" * (MAX_CONTROL_FRAME + 1))


def _parent_bad_field(pair: Pair) -> None:
    pair.parent.send(Tick(n=0, expect=0))
    pair.parent.receive(pack([1, "TOCK", {"n": 0, "sent": [], "digests": {"a": b"short"}}]))


def _parent_bad_send(pair: Pair) -> None:
    pair.parent.send(Ready())


@pytest.mark.parametrize("side, fail", [
    ("child", _child_garbage), ("child", _child_stale), ("child", _child_bad_send),
    ("parent", _parent_oversized), ("parent", _parent_bad_field), ("parent", _parent_bad_send),
], ids=lambda v: getattr(v, "__name__", v))
def test_machine_stays_in_error_after_any_error(side: str, fail: Callable[[Pair], None]) -> None:
    pair = Pair().handshake()
    with pytest.raises((FrameError, LocalProtocolError, RemoteProtocolError)):
        fail(pair)
    machine = getattr(pair, side)
    assert machine.state in (C.ERROR, P.ERROR)
    later_send = Stop(reason="x") if side == "parent" else Tock(n=0, sent=[], digests={})
    later_frame = encode(Bye() if side == "parent" else Tick(n=0, expect=0))
    for attempt in (lambda: machine.send(later_send), lambda: machine.receive(later_frame),
                    lambda: machine.receive(b"\xc1"), lambda: machine.send(Error("c", "d"))):
        with pytest.raises(LocalProtocolError) as info:
            attempt()
        assert info.value.code == "closed"
        assert machine.state in (C.ERROR, P.ERROR)


def _child_states() -> list[tuple[str, Callable[[], ChildMachine]]]:
    def reach(steps: int) -> Callable[[], ChildMachine]:
        def make() -> ChildMachine:
            pair = Pair()
            actions = [lambda: pair.child_says(HELLO), lambda: pair.parent_says(SETUP),
                       lambda: pair.child_says(Ready()),
                       lambda: pair.parent_says(Tick(n=0, expect=0)),
                       lambda: pair.child_says(Tock(n=0, sent=[], digests={})),
                       lambda: pair.parent_says(Stop(reason="x")),
                       lambda: pair.child_says(Bye())]
            for action in actions[:steps]:
                action()
            return pair.child
        return make
    return [(name, reach(i)) for i, name in enumerate(
        ["START", "AWAIT_SETUP", "SETTING_UP", "IDLE", "TICKING", "IDLE2", "STOPPING",
         "CLOSED"])]


@pytest.mark.parametrize("name, make", _child_states(), ids=[n for n, _ in _child_states()])
def test_child_machine_error_frame_moves_to_error(name: str, make: Callable[[], Any]) -> None:
    child = make()
    assert child.state.value == name.rstrip("2")
    error = Error(code="bad-field", detail="d", field="TOCK.n", tick=0)
    assert child.receive(encode(error)) == error
    assert child.state is C.ERROR


@pytest.mark.parametrize("steps", range(7))
def test_parent_machine_error_frame_moves_to_error(steps: int) -> None:
    pair = Pair()
    actions = [lambda: pair.child_says(HELLO), lambda: pair.parent_says(SETUP),
               lambda: pair.child_says(Ready()), lambda: pair.parent_says(Tick(n=0, expect=0)),
               lambda: pair.child_says(Tock(n=0, sent=[], digests={})),
               lambda: pair.parent_says(Stop(reason="x"))]
    for action in actions[:steps]:
        action()
    if steps == 6:
        pair.child_says(Bye())
    pair.parent.receive(encode(Error(code="node-error", detail="boom", tick=0, node="a")))
    assert pair.parent.state is P.ERROR


def test_machine_sending_error_moves_to_error() -> None:
    pair = Pair().handshake()
    frame = pair.child.send(Error(code="worker-error", detail="traceback"))
    assert pair.child.state is C.ERROR
    assert pair.parent.receive(frame) == Error(code="worker-error", detail="traceback")
    assert pair.parent.state is P.ERROR


def test_machine_send_unpackable_leaves_machine_in_error() -> None:
    pair = Pair().handshake()
    pair.parent_says(Tick(n=0, expect=0))
    with pytest.raises((FrameError, LocalProtocolError)):
        pair.child.send(Tock(n=0, sent=[], digests={"a": object()}))  # type: ignore[dict-item]
    assert pair.child.state is C.ERROR


def test_machine_send_invalid_field_is_local_error() -> None:
    pair = Pair().handshake()
    pair.parent_says(Tick(n=0, expect=0))
    with pytest.raises(LocalProtocolError):
        pair.child.send(Tock(n=0, sent=[], digests={"a": b"short"}))


# ---------------------------------------------------------------------------
# docs/protocol.md quotes the transition tables: keep them in step


def _doc_table(heading: str) -> dict[tuple[str, str, str], str]:
    text = DOCS.read_text(encoding="utf-8")
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\|\s*([A-Z_]+)\s*\|\s*(send|recv) ([A-Z]+)\s*\|\s*([A-Z_]+)\s*\|",
                      section, flags=re.M)
    return {(state, direction, kind): after for state, direction, kind, after in rows}


@pytest.mark.parametrize("heading, table", [("### Child machine", CHILD_TRANSITIONS),
                                            ("### Parent machine", PARENT_TRANSITIONS)])
def test_docs_transition_tables_match_code(heading: str, table: dict) -> None:
    expected = {(state.value, direction, kind): after.value
                for (state, direction, kind), after in table.items()}
    assert _doc_table(heading) == expected


def test_docs_worked_example_matches_encoder() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert encode(Tick(n=3, expect=2)).hex(" ") in text


# ---------------------------------------------------------------------------
# property tests

NAME_HEAD = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_"
names = st.builds(lambda head, tail: head + tail, st.sampled_from(NAME_HEAD),
                  st.text(alphabet=NAME_HEAD + ".-", max_size=63))
uints = st.integers(min_value=0, max_value=2**63 - 1)
payloads = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**64 - 1)
    | st.floats(allow_nan=False) | st.text(st.characters(codec="utf-8"), max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=8), inner, max_size=4),
    max_leaves=12)
tocks = st.builds(Tock, n=uints, sent=st.lists(names, max_size=4),
                  digests=st.dictionaries(names, st.binary(min_size=32, max_size=32), max_size=4))
datas = st.builds(Data, tick=uints, source=names,
                  messages=st.lists(st.tuples(uints, st.lists(payloads, max_size=4)).map(
                      lambda run: [run[0], list(range(len(run[1]))), run[1]]), max_size=5),
                  acks=st.lists(st.lists(uints, min_size=2, max_size=2), max_size=5))


def _decode_or_frame_error(data: bytes, **kwargs: Any) -> Message | FrameError:
    try:
        return decode(data, **kwargs)
    except FrameError as exc:
        return exc


@FEW
@given(st.binary(max_size=300))
def test_decode_arbitrary_bytes_is_message_or_frame_error(data: bytes) -> None:
    result = _decode_or_frame_error(data, limit=MAX_DATA_FRAME)
    assert isinstance(result, (Message, FrameError))


@FEW
@given(st.sampled_from(sorted(proto.MESSAGE_TYPES)),
       st.dictionaries(st.sampled_from(["n", "expect", "tick", "sent", "digests", "stats",
                                        "process", "links", "messages", "acks", "reason",
                                        "code", "detail", "other"]), payloads, max_size=6))
def test_decode_arbitrary_bodies_is_message_or_frame_error(kind: str,
                                                           body: dict[str, Any]) -> None:
    result = _decode_or_frame_error(pack([1, kind, body]), limit=MAX_DATA_FRAME)
    assert isinstance(result, (Message, FrameError))
    if isinstance(result, FrameError):
        assert result.field == "frame" or result.field.startswith((kind, "body"))


@FEW
@given(st.one_of(tocks, datas))
def test_decode_inverts_encode_for_valid_messages(message: Message) -> None:
    assert decode(encode(message), limit=MAX_DATA_FRAME) == message


mutations = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete"]),
                               st.integers(min_value=0, max_value=10_000),
                               st.integers(min_value=1, max_value=255)), min_size=1, max_size=4)


def _mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    buffer = bytearray(data)
    for op, where, byte in edits:
        index = where % (len(buffer) + 1)
        if op == "insert":
            buffer.insert(index, byte)
        elif buffer and index < len(buffer):
            if op == "flip":
                buffer[index] ^= byte
            else:
                del buffer[index]
    return bytes(buffer)


@FEW
@given(tocks, mutations)
def test_decode_mutated_tock_is_message_or_frame_error(tock: Tock,
                                                       edits: list[tuple[str, int, int]]) -> None:
    data = _mutate(encode(tock), edits)
    result = _decode_or_frame_error(data)
    assert isinstance(result, (Message, FrameError))
    parent = Pair().handshake().run_ticks(1).parent
    parent.send(Tick(n=1, expect=0))
    try:
        parent.receive(data)
    except (FrameError, RemoteProtocolError):
        assert parent.state is P.ERROR
