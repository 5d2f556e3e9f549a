"""Unit tests of hiocluster.protocol: frames and state machines, no sockets, no processes.

Conversations shuttle frames between an in-memory ParentMachine and ChildMachine
(:class:`Pair`, after h11's ConnectionPair). docs/protocol.md is checked against
the code where it quotes it (transition tables, the worked GRANT example).
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
from hiocluster.protocol import (CHILD_TRANSITIONS, MAX_CONTROL_FRAME, MAX_DATA_FRAME,
                                 PARENT_TRANSITIONS, Answer, Assign, Bye, ChildMachine,
                                 ChildState, Chunk, Command, Data, Done, Error, Grant, Hello, Join, Load,
                                 Message, ParentMachine, ParentState, Peer, Progress, Ready,
                                 Setup, Standby, Stop, decode, decode_data, encode)
from hiocluster.protocol import machines
from hiocluster.protocol.fields import MAX_STR

C, P = ChildState, ParentState
DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
FEW = settings(max_examples=200)
V = proto.VERSION

TOKEN = bytes(range(16))
RECORDS = b"a" + bytes(proto.DIGEST_SIZE) + b"b" + bytes(range(proto.DIGEST_SIZE))
HELLO = Hello(worker="w0", token=TOKEN, pid=4242, versions=proto.local_versions(),
              data_address="ipc:///tmp/hioc-x/d-w0")
SETUP = Setup(t0=0.0, tock=0.5, seed=7, ticks=10, real=False, tick_timeout=30.0,
              nodes=[["a", "nodes.ring:RingNode", {"tokens": 3}, None, None],
                     ["b", "m:B", {}, 1, 4]],
              links=[[0, "a", "out", "c", "in", 16, "w0", "w1"],
                     [1, "c", "out", "a", "in", 1, "w1", "w0"]],
              peers={"w1": "tcp://198.18.0.2:40001"})
DATA = Data(tick=3, source="w1",
            messages=[[1, [0, 1], [{"k": [1, -2, 2.5, None, True, b"\0", "s"]}, "second"]],
                      [2, [5], [None]]], acks=[[0, 4]])
SAMPLES: list[Message] = [
    HELLO, SETUP, Ready(digests=RECORDS), Grant(until=3), Grant(until=9, start=1.7e9),
    Progress(tick=2, waiting=["w1"]), Progress(tick=None, waiting=[]),
    Done(until=3, digests=RECORDS * 4), Stop(reason="done", drain=True),
    Stop(reason="RunFailed: boom"), Chunk(data=b"\x92\x01", more=True),
    Bye(stats={"rejected": 0, "undelivered": 1, "unread": 2},
        metrics={"events": 7}, received={"w1": 10}),
    Bye(), Error(code="bad-field", detail="GRANT.until: expected ...", field="GRANT.until",
                 tick=3, node="a", peer="w1"),
    Error(code="terminated", detail="by SIGTERM"), DATA,
    Data(tick=0, source="w0", messages=[], acks=[]), Peer(worker="w1", token=TOKEN),
    Join(service="web", replica=1, incarnation=3, token=TOKEN, pid=4321),
    Load(served=10, connections=2), Command(command="status"),
    Standby(service="web", token=TOKEN, pid=77), Assign(replica=2, incarnation=9,
                                                        listeners=[2, 0]),
    Command(command="scale", service="web", replicas=4),
    Answer(ok=True, detail="", status={"services": [{"name": "web"}]}),
    Answer(ok=False, detail="no service 'wbe'"),
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

    def __init__(self, worker: str = "w0") -> None:
        self.parent = ParentMachine(worker)
        self.child = ChildMachine(worker)

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
        self.child_says(Ready(digests=RECORDS))
        return self

    def windows(self, *sizes: int) -> Pair:
        for size in sizes:
            until = self.parent.until + size
            self.parent_says(Grant(until=until))
            self.child_says(Done(until=until, digests=RECORDS * size))
        return self


# ---------------------------------------------------------------------------
# framing: round trips


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.TYPE)
def test_encode_decode_round_trip(message: Message) -> None:
    decoded = decode(encode(message), limit=MAX_DATA_FRAME)
    assert type(decoded) is type(message)
    assert decoded == message


def test_encode_frame_is_version_type_body() -> None:
    assert msgpack.unpackb(encode(Grant(until=3))) == [4, "GRANT", {"until": 3, "start": None}]
    # the worked example of docs/protocol.md, byte for byte
    assert encode(Grant(until=3)).hex() == "9304a54752414e5482a5756e74696c03a57374617274c0"


def test_encode_uses_bin_for_bytes_and_str_for_names() -> None:
    version, kind, body = msgpack.unpackb(encode(HELLO), raw=False)
    assert (version, kind, type(body["token"]), type(body["worker"])) == (V, "HELLO", bytes,
                                                                          str)


def test_encode_unpackable_field_raises_frame_error() -> None:
    with pytest.raises(FrameError) as info:
        encode(Data(tick=0, source="w0", messages=[[0, [0], [object()]]], acks=[]))
    assert (info.value.field, info.value.code) == ("body", "unpackable")


def test_decode_optional_fields_may_be_left_out() -> None:
    assert decode(pack([V, "STOP", {"reason": "x"}])) == Stop(reason="x", drain=False)
    assert decode(pack([V, "BYE", {}])) == Bye(stats={})
    assert decode(pack([V, "GRANT", {"until": 4}])) == Grant(until=4, start=None)
    assert decode(pack([V, "ERROR", {"code": "c", "detail": "d"}])) == Error("c", "d")


def test_decode_accepts_buffer_types() -> None:
    data = encode(Grant(until=1))
    assert decode(bytearray(data)) == decode(memoryview(data)) == Grant(until=1)


def test_decode_data_frame_over_control_limit_needs_data_limit() -> None:
    data = encode(Data(tick=0, source="w0", messages=[[0, [0], [b"\0" * MAX_CONTROL_FRAME]]],
                       acks=[]))
    frame_error(data, "frame", "oversized")
    assert decode(data, limit=MAX_DATA_FRAME, allowed=(Data,)).tick == 0


# ---------------------------------------------------------------------------
# framing: bad bytes


@pytest.mark.parametrize("data", [b"\xc1", b"\xff\xff\xff", b"hello world", b"\x93\x02",
                                  b"\xdd\xff\xff\xff\xff", encode(Grant(until=0)) + b"\0"],
                         ids=["never-used", "garbage", "text", "short", "huge-claim",
                              "trailing"])
def test_decode_garbage_is_bad_msgpack(data: bytes) -> None:
    frame_error(data, "frame", "bad-msgpack")


def test_decode_empty_frame() -> None:
    frame_error(b"", "frame", "bad-msgpack")


@pytest.mark.parametrize("message", [SETUP, DATA, HELLO, Done(until=3, digests=RECORDS)],
                         ids=lambda m: m.TYPE)
def test_decode_every_truncation_is_frame_error(message: Message) -> None:
    data = encode(message)
    for cut in range(len(data)):
        with pytest.raises(FrameError) as info:
            decode(data[:cut], limit=MAX_DATA_FRAME)
        assert info.value.field == "frame", (cut, str(info.value))


@pytest.mark.parametrize("obj", [{"until": 1}, 5, "GRANT", [V, "GRANT"], [V, "GRANT", {}, 0],
                                 []], ids=["map", "int", "str", "two", "four", "empty"])
def test_decode_wrong_top_level_shape(obj: Any) -> None:
    frame_error(pack(obj), "frame", "bad-frame")


@pytest.mark.parametrize("version", [0, 1, 2, 3, 5, -1, True, 4.0, "4", None])
def test_decode_wrong_version(version: Any) -> None:
    frame_error(pack([version, "GRANT", {"until": 0}]), "version", "version")


@pytest.mark.parametrize("kind", ["NOPE", "grant", "", 5, None, b"GRANT", "TICK", "TOCK"])
def test_decode_unknown_type(kind: Any) -> None:
    frame_error(pack([V, kind, {"until": 0}]), "type", "bad-type")


def test_decode_type_not_allowed_here() -> None:
    frame_error(encode(DATA), "type", "bad-type", allowed=(Setup, Grant, Stop, Error))
    frame_error(encode(Grant(until=0)), "type", "bad-type", allowed=(Data,))
    assert decode(encode(DATA), allowed=(Data,)) == DATA


@pytest.mark.parametrize("body", [[0, 0], None, "until=0"])
def test_decode_body_not_a_map(body: Any) -> None:
    frame_error(pack([V, "GRANT", body]), "body", "bad-field")


def test_decode_missing_field() -> None:
    frame_error(pack([V, "DONE", {"until": 3}]), "DONE.digests", "bad-field")
    body = HELLO.to_body()
    del body["token"]
    frame_error(pack([V, "HELLO", body]), "HELLO.token", "bad-field")


def test_decode_unknown_extra_field() -> None:
    frame_error(pack([V, "GRANT", {"until": 3, "extra": 1}]), "GRANT.extra", "bad-field")
    frame_error(pack([V, "READY", {"digests": b"", "x": None}]), "READY.x", "bad-field")


def test_decode_non_string_map_keys_are_bad_msgpack_except_in_payloads() -> None:
    frame_error(pack([V, "GRANT", {1: 3}]), "frame", "bad-msgpack")
    payload_with_int_key = pack([V, "DATA", {"tick": 0, "source": "w0", "acks": [],
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
    ext = pack([V, "DATA", {"tick": 0, "source": "w0", "acks": [],
                            "messages": [[0, [0], [msgpack.ExtType(1, b"x")]]]}])
    frame_error(ext, "frame", "bad-msgpack", limit=MAX_DATA_FRAME)


def test_decode_string_longer_than_max_str() -> None:
    body = {"code": "c", "detail": "x" * (MAX_STR + 1)}
    frame_error(pack([V, "ERROR", body]), "frame", "bad-msgpack")
    assert decode(pack([V, "ERROR", {"code": "c", "detail": "x" * MAX_STR}])).detail


def test_decode_bytes_packed_as_str_are_rejected() -> None:
    # a peer that packs without the bin type sends the token as a (raw) string
    legacy = msgpack.packb([V, "PEER", {"worker": "w1", "token": TOKEN}], use_bin_type=False)
    frame_error(legacy, "PEER.token", "bad-field")


def test_decode_oversized_control_frame() -> None:
    data = pack([V, "GRANT", {"until": 0, "pad": b"\0" * MAX_CONTROL_FRAME}])
    assert len(data) > MAX_CONTROL_FRAME
    frame_error(data, "frame", "oversized")


def test_decode_limit_is_inclusive() -> None:
    data = encode(DATA)
    assert decode(data, limit=len(data)) == DATA
    frame_error(data, "frame", "oversized", limit=len(data) - 1)


@pytest.mark.parametrize("where", ["frame", "field"])
def test_decode_deeply_nested_frame_is_frame_error(where: str) -> None:
    nested = b"\x91" * 1010 + b"\x00"
    data = nested if where == "frame" else encode(Grant(until=0))[:-1] + nested
    with pytest.raises(FrameError):
        decode(data)


# ---------------------------------------------------------------------------
# framing: bad fields, one at a time

BAD_FIELDS = [  # (valid message, field name, bad value, expected FrameError.field)
    (Grant(until=0), "until", "3", "GRANT.until"),
    (Grant(until=0), "until", -1, "GRANT.until"),
    (Grant(until=0), "until", True, "GRANT.until"),
    (Grant(until=0), "until", 3.0, "GRANT.until"),
    (Grant(until=0), "until", 2**63, "GRANT.until"),
    (Grant(until=0), "until", None, "GRANT.until"),
    (Grant(until=0), "start", float("nan"), "GRANT.start"),
    (Grant(until=0), "start", "now", "GRANT.start"),
    (Done(until=0, digests=b""), "digests", "x" * 33, "DONE.digests"),
    (Done(until=0, digests=b""), "until", -2**63, "DONE.until"),
    (Ready(digests=b""), "digests", [RECORDS], "READY.digests"),
    (Progress(tick=0, waiting=[]), "tick", -1, "PROGRESS.tick"),
    (Progress(tick=0, waiting=[]), "waiting", ["w1", "no spaces"], "PROGRESS.waiting[1]"),
    (Progress(tick=0, waiting=[]), "waiting", "w1", "PROGRESS.waiting"),
    (HELLO, "worker", "-w0", "HELLO.worker"),
    (HELLO, "worker", ".w0", "HELLO.worker"),
    (HELLO, "worker", "", "HELLO.worker"),
    (HELLO, "worker", "w" * 65, "HELLO.worker"),
    (HELLO, "worker", "w0\n", "HELLO.worker"),
    (HELLO, "worker", "w/0", "HELLO.worker"),
    (HELLO, "worker", b"w0", "HELLO.worker"),
    (HELLO, "token", b"", "HELLO.token"),
    (HELLO, "token", b"x" * 65, "HELLO.token"),
    (HELLO, "pid", -1, "HELLO.pid"),
    (HELLO, "versions", {"hio": 6}, "HELLO.versions.hio"),
    (HELLO, "data_address", "http://x", "HELLO.data_address"),
    (HELLO, "data_address", "ipc://", "HELLO.data_address"),
    (HELLO, "data_address", "tcp://a b", "HELLO.data_address"),
    (SETUP, "links", [[0, "a", "out", "c", "in", 1, "w0"]], "SETUP.links[0]"),
    (SETUP, "links", [[0, "a", "out", "c", "in", 1, "w0", "w1", 9]], "SETUP.links[0]"),
    (SETUP, "links", [[0, "a", "out", "c", "in", -1, "w0", "w1"]], "SETUP.links[0][5]"),
    (SETUP, "links", [[0, "a", "out", "c d", "in", 1, "w0", "w1"]], "SETUP.links[0][3]"),
    (SETUP, "links", [SETUP.links[0], "x"], "SETUP.links[1]"),
    (SETUP, "nodes", [["a", "m:A"]], "SETUP.nodes[0]"),
    (SETUP, "nodes", [["a", "m:A", [], None, None]], "SETUP.nodes[0][2]"),
    (SETUP, "nodes", [["a b", "m:A", {}, None, None]], "SETUP.nodes[0][0]"),
    (SETUP, "nodes", [["a", "m:A", {}, -1, 4]], "SETUP.nodes[0][3]"),
    (SETUP, "tock", 0, "SETUP.tock"),
    (SETUP, "tock", -0.5, "SETUP.tock"),
    (SETUP, "tock", float("nan"), "SETUP.tock"),
    (SETUP, "t0", float("inf"), "SETUP.t0"),
    (SETUP, "t0", False, "SETUP.t0"),
    (SETUP, "seed", -1, "SETUP.seed"),
    (SETUP, "real", 1, "SETUP.real"),
    (SETUP, "tick_timeout", 0, "SETUP.tick_timeout"),
    (SETUP, "peers", {"w1": "ftp://x"}, "SETUP.peers.w1"),
    (Stop(reason="x"), "drain", 1, "STOP.drain"),
    (Stop(reason="x"), "reason", None, "STOP.reason"),
    (Bye(), "stats", {"unread": "1"}, "BYE.stats.unread"),
    (Bye(), "received", {"w1": -1}, "BYE.received.w1"),
    (Error(code="c", detail="d"), "node", "bad name", "ERROR.node"),
    (Error(code="c", detail="d"), "peer", "", "ERROR.peer"),
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
    (Peer(worker="w1", token=TOKEN), "worker", 1, "PEER.worker"),
]


@pytest.mark.parametrize("message, name, value, field", BAD_FIELDS,
                         ids=[f"{m.TYPE}.{n}={v!r}"[:50] for m, n, v, _ in BAD_FIELDS])
def test_decode_bad_field_names_it(message: Message, name: str, value: Any,
                                   field: str) -> None:
    body = dict(message.to_body(), **{name: value})
    error = frame_error(pack([V, message.TYPE, body]), field, "bad-field",
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
    pair.child_says(Ready(digests=RECORDS))
    assert pair.states == (C.IDLE, P.IDLE)
    assert pair.child.tick is None and pair.parent.tick is None
    done = -1
    for size in (1, 4, 2):
        until = done + size
        assert pair.parent_says(Grant(until=until)) == Grant(until=until)
        assert pair.states == (C.RUNNING, P.RUNNING)
        assert pair.child.until == pair.parent.until == until
        pair.child_says(Progress(tick=done if done >= 0 else None, waiting=["w1"]))
        pair.child_says(Progress(tick=until - 1 if until else None, waiting=[]))
        assert pair.states == (C.RUNNING, P.RUNNING)
        assert pair.child_says(Done(until=until, digests=RECORDS * size)).TYPE == "DONE"
        assert pair.states == (C.IDLE, P.IDLE)
        assert pair.child.tick == pair.parent.tick == until
        done = until
    pair.parent_says(Stop(reason="done", drain=True))
    assert pair.states == (C.STOPPING, P.AWAIT_BYE)
    bye = Bye(stats={"rejected": 0, "undelivered": 1, "unread": 0}, received={"w1": 7})
    assert pair.child_says(bye) == bye
    assert pair.states == (C.CLOSED, P.CLOSED)


def test_machines_send_returns_the_encoded_frame() -> None:
    child = ChildMachine("w0")
    assert child.send(HELLO) == encode(HELLO)


def test_parent_machine_without_name_accepts_any_hello() -> None:
    parent = ParentMachine()
    assert parent.receive(encode(HELLO)) == HELLO
    assert parent.state is P.HELLO_RECEIVED


@pytest.mark.parametrize("reach", ["await-setup", "setting-up", "idle", "idle-after-windows"])
def test_child_machine_stop_allowed_before_running(reach: str) -> None:
    pair = Pair()
    pair.child_says(HELLO)
    if reach != "await-setup":
        pair.parent_says(SETUP)
    if reach.startswith("idle"):
        pair.child_says(Ready(digests=RECORDS))
    if reach == "idle-after-windows":
        pair.windows(2, 3)
    pair.parent_says(Stop(reason="done", drain=True))
    assert pair.states == (C.STOPPING, P.AWAIT_BYE)
    pair.child_says(Bye())
    assert pair.states == (C.CLOSED, P.CLOSED)


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 4], ids=["await-hello", "hello-received",
                                                        "await-ready", "idle", "running"])
def test_parent_machine_may_send_stop_any_time(steps: int) -> None:
    pair = Pair()
    actions: list[Callable[[], Any]] = [lambda: pair.child_says(HELLO),
                                        lambda: pair.parent_says(SETUP),
                                        lambda: pair.child_says(Ready(digests=RECORDS)),
                                        lambda: pair.parent_says(Grant(until=5))]
    for action in actions[:steps]:
        action()
    pair.parent.send(Stop(reason="x"))
    assert pair.parent.state is P.AWAIT_BYE


def test_parent_machine_accepts_late_progress_and_done_after_stop() -> None:
    pair = Pair().handshake().windows(2)
    grant = pair.parent.send(Grant(until=5))
    stop = pair.parent.send(Stop(reason="interrupted"))  # crosses the window's frames
    assert pair.parent.state is P.AWAIT_BYE
    pair.child.receive(grant)
    pair.child_says(Progress(tick=3, waiting=[]))
    pair.child_says(Done(until=5, digests=RECORDS * 4))
    assert pair.parent.state is P.AWAIT_BYE
    assert pair.child.receive(stop) == Stop(reason="interrupted")
    pair.child_says(Bye())
    assert pair.states == (C.CLOSED, P.CLOSED)


BIG_BYE = Bye(stats={"messages": 3}, results={"a": b"x" * (MAX_CONTROL_FRAME + 5),
                                             "b": list(range(1000))})


def stopped() -> Pair:
    pair = Pair().handshake().windows(2)
    pair.parent_says(Stop(reason="done", drain=True))
    return pair


def test_a_bye_over_a_control_frame_goes_in_chunks_and_arrives_whole() -> None:
    pair = stopped()
    frames = pair.child.frames(BIG_BYE)
    assert pair.child.state is C.CLOSED
    assert len(frames) == 3 and all(len(frame) <= MAX_CONTROL_FRAME for frame in frames)
    for frame in frames[:-1]:
        assert pair.parent.receive(frame) == Chunk(data=decode(frame).data, more=True)
        assert pair.parent.state is P.AWAIT_BYE
    assert pair.parent.receive(frames[-1]) == BIG_BYE
    assert pair.parent.state is P.CLOSED


def test_a_small_bye_is_one_frame() -> None:
    pair = stopped()
    assert pair.child.frames(Bye(results={"a": 1})) == [encode(Bye(results={"a": 1}))]


def test_chunks_before_stop_or_a_bye_among_them_are_unexpected() -> None:
    pair = Pair().handshake()
    chunk = encode(Chunk(data=b"x", more=True))
    with pytest.raises(RemoteProtocolError) as early:
        pair.parent.receive(chunk)
    assert early.value.code == "unexpected" and pair.parent.state is P.ERROR
    pair = stopped()
    pair.parent.receive(chunk)
    with pytest.raises(RemoteProtocolError) as among:
        pair.parent.receive(encode(Bye()))
    assert (among.value.code, among.value.field) == ("unexpected", "type")


def test_chunks_over_the_bye_limit_are_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machines, "MAX_BYE_FRAME", 10)
    pair = stopped()
    pair.parent.receive(encode(Chunk(data=b"x" * 6, more=True)))
    with pytest.raises(RemoteProtocolError) as caught:
        pair.parent.receive(encode(Chunk(data=b"x" * 5, more=True)))
    assert (caught.value.code, caught.value.field) == ("too-large", "CHUNK.data")
    assert pair.parent.state is P.ERROR


@pytest.mark.parametrize("joined", [b"\xc1", encode(Done(until=1, digests=RECORDS))],
                         ids=["garbage", "not-a-bye"])
def test_chunks_that_join_to_no_bye_are_frame_errors(joined: bytes) -> None:
    pair = stopped()
    pair.parent.receive(encode(Chunk(data=joined[:1], more=True)))
    with pytest.raises(FrameError):
        pair.parent.receive(encode(Chunk(data=joined[1:], more=False)))
    assert pair.parent.state is P.ERROR


def test_a_worker_never_sends_a_frame_over_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    pair = Pair().handshake()
    with pytest.raises(LocalProtocolError) as caught:  # not a BYE: no CHUNKs for it
        pair.child.send(Error(code="node-error", detail="x" * MAX_CONTROL_FRAME))
    assert (caught.value.code, caught.value.field) == ("too-large", "ERROR")
    assert pair.child.state is C.ERROR
    monkeypatch.setattr(machines, "MAX_BYE_FRAME", MAX_CONTROL_FRAME + 100)
    pair = stopped()
    with pytest.raises(LocalProtocolError) as bye:
        pair.child.frames(BIG_BYE)
    assert bye.value.code == "too-large" and "(its nodes' results)" in str(bye.value)


def test_parent_machine_rejects_stale_done_after_stop() -> None:
    pair = Pair().handshake().windows(3)
    pair.parent.send(Grant(until=6))
    pair.parent.send(Stop(reason="x"))
    with pytest.raises(RemoteProtocolError) as info:
        pair.parent.receive(encode(Done(until=2, digests=b"")))
    assert (info.value.field, info.value.code) == ("DONE.until", "stale-tick")
    assert pair.parent.state is P.ERROR


@pytest.mark.parametrize("late", [Done(until=2, digests=b""), Progress(tick=1, waiting=[])],
                         ids=["DONE", "PROGRESS"])
def test_parent_machine_rejects_window_frames_after_stop_when_none_owed(late: Message) -> None:
    pair = Pair().handshake().windows(3)
    pair.parent.send(Stop(reason="done", drain=True))
    with pytest.raises(RemoteProtocolError) as info:
        pair.parent.receive(encode(late))
    assert info.value.code == "unexpected"


def test_child_machine_accepts_stop_while_running() -> None:
    pair = Pair().handshake()
    pair.parent_says(Grant(until=9))
    pair.parent_says(Stop(reason="another worker failed"))
    assert pair.states == (C.STOPPING, P.AWAIT_BYE)


def test_parent_machine_accepts_late_ready_after_stop() -> None:
    pair = Pair()
    pair.child_says(HELLO)
    pair.parent_says(SETUP)
    ready = pair.child.send(Ready(digests=RECORDS))
    pair.parent.send(Stop(reason="start-up failed"))
    pair.parent.receive(ready)
    assert pair.parent.state is P.AWAIT_BYE


# ---------------------------------------------------------------------------
# state machines: windows out of order


@pytest.mark.parametrize("done, until", [(4, 3), (4, 0), (0, 0)],
                         ids=["past", "far-past", "repeat-first"])
def test_child_machine_rejects_a_grant_from_the_past(done: int, until: int) -> None:
    pair = Pair().handshake().windows(done + 1)
    with pytest.raises(RemoteProtocolError) as info:
        pair.child.receive(encode(Grant(until=until)))
    assert (info.value.field, info.value.code, info.value.tick) == ("GRANT.until",
                                                                    "stale-tick", done)
    assert pair.child.state is C.ERROR


def test_parent_machine_send_stale_grant_is_local_error() -> None:
    pair = Pair().handshake().windows(3)
    with pytest.raises(LocalProtocolError) as info:
        pair.parent.send(Grant(until=2))
    assert (info.value.field, info.value.code) == ("GRANT.until", "stale-tick")
    assert pair.parent.state is P.ERROR


@pytest.mark.parametrize("until, code", [(2, "stale-tick"), (4, "stale-tick"),
                                         (9, "wrong-tick")])
def test_parent_machine_rejects_done_for_wrong_window(until: int, code: str) -> None:
    pair = Pair().handshake().windows(3)
    pair.parent.send(Grant(until=5))
    with pytest.raises(RemoteProtocolError) as info:
        pair.parent.receive(encode(Done(until=until, digests=b"")))
    assert (info.value.field, info.value.code, info.value.worker) == ("DONE.until", code, "w0")
    assert pair.parent.state is P.ERROR


@pytest.mark.parametrize("tick", [None, 1, 6, 99], ids=["nil", "before", "after", "far"])
def test_parent_machine_rejects_progress_outside_the_window(tick: int | None) -> None:
    pair = Pair().handshake().windows(3)  # ticks 0..2 done
    pair.parent.send(Grant(until=5))
    with pytest.raises(RemoteProtocolError) as info:
        pair.parent.receive(encode(Progress(tick=tick, waiting=[])))
    assert (info.value.field, info.value.code) == ("PROGRESS.tick", "wrong-tick")


def test_child_machine_send_done_for_wrong_window_is_local_error() -> None:
    pair = Pair().handshake().windows(1)
    pair.parent_says(Grant(until=4))
    with pytest.raises(LocalProtocolError) as info:
        pair.child.send(Done(until=3, digests=b""))
    assert (info.value.field, info.value.code) == ("DONE.until", "stale-tick")


def test_parent_machine_rejects_hello_from_another_worker() -> None:
    parent = ParentMachine("w0")
    other = Hello(worker="w1", token=TOKEN, pid=1, versions={}, data_address="ipc://x")
    with pytest.raises(RemoteProtocolError) as info:
        parent.receive(encode(other))
    assert (info.value.field, info.value.code) == ("HELLO.worker", "wrong-worker")
    assert parent.state is P.ERROR


# ---------------------------------------------------------------------------
# state machines: messages out of place, and the ERROR state


@pytest.mark.parametrize("make, message", [
    (lambda: ChildMachine(), Ready(digests=b"")),
    (lambda: ChildMachine(), Done(until=0, digests=b"")),
    (lambda: Pair().handshake().child, Done(until=0, digests=b"")),
    (lambda: Pair().handshake().child, Progress(tick=None, waiting=[])),
    (lambda: Pair().handshake().child, HELLO),
    (lambda: Pair().handshake().child, Bye()),
    (lambda: ChildMachine(), Grant(until=0)),
    (lambda: ChildMachine(), DATA),
    (lambda: ParentMachine(), Grant(until=0)),
    (lambda: ParentMachine(), SETUP),
    (lambda: Pair().handshake().parent, SETUP),
    (lambda: None, None),  # see below
    (lambda: Pair().handshake().parent, Ready(digests=b"")),
], ids=["child-READY-at-start", "child-DONE-at-start", "child-DONE-idle",
        "child-PROGRESS-idle", "child-HELLO-twice", "child-BYE-unasked", "child-sends-GRANT",
        "child-sends-DATA", "parent-GRANT-before-HELLO", "parent-SETUP-before-HELLO",
        "parent-SETUP-twice", "parent-GRANT-while-running", "parent-sends-READY"])
def test_machine_send_not_allowed_is_local_error(make: Callable[[], Any],
                                                 message: Message | None) -> None:
    if message is None:  # a second GRANT before the first window's DONE
        pair = Pair().handshake()
        pair.parent.send(Grant(until=3))
        machine, message = pair.parent, Grant(until=5)
    else:
        machine = make()
    with pytest.raises(LocalProtocolError) as info:
        machine.send(message)
    assert (info.value.field, info.value.code) == ("type", "unexpected")
    assert machine.state in (C.ERROR, P.ERROR)


@pytest.mark.parametrize("make, message", [
    (lambda: Pair().child, Grant(until=0)),
    (lambda: Pair().child, Stop(reason="x")),
    (lambda: Pair().handshake().child, SETUP),
    (lambda: ParentMachine(), Ready(digests=b"")),
    (lambda: ParentMachine(), Done(until=0, digests=b"")),
    (lambda: Pair().handshake().parent, Progress(tick=None, waiting=[])),
    (lambda: Pair().handshake().parent, Bye()),
], ids=["child-GRANT-at-start", "child-STOP-at-start", "child-SETUP-twice",
        "parent-READY-before-HELLO", "parent-DONE-before-GRANT", "parent-PROGRESS-idle",
        "parent-BYE-unasked"])
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
    (lambda: Pair().handshake().child, encode(Peer(worker="w1", token=TOKEN))),
    (lambda: ParentMachine(), encode(Grant(until=0))),
    (lambda: ParentMachine(), encode(SETUP)),
], ids=["child-DATA", "child-HELLO", "child-PEER", "parent-GRANT", "parent-SETUP"])
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
    pair.windows(2)
    pair.child.receive(encode(Grant(until=0)))


def _child_bad_send(pair: Pair) -> None:
    pair.child.send(Bye())


def _parent_oversized(pair: Pair) -> None:
    pair.parent.receive(b"\0" * (MAX_CONTROL_FRAME + 1))


def _parent_bad_field(pair: Pair) -> None:
    pair.parent.send(Grant(until=0))
    pair.parent.receive(pack([V, "DONE", {"until": 0, "digests": "not bytes"}]))


def _parent_bad_send(pair: Pair) -> None:
    pair.parent.send(Ready(digests=b""))


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
    later_send = Stop(reason="x") if side == "parent" else Done(until=0, digests=b"")
    later_frame = encode(Bye() if side == "parent" else Grant(until=9))
    for attempt in (lambda: machine.send(later_send), lambda: machine.receive(later_frame),
                    lambda: machine.receive(b"\xc1"), lambda: machine.send(Error("c", "d"))):
        with pytest.raises(LocalProtocolError) as info:
            attempt()
        assert info.value.code == "closed"
        assert machine.state in (C.ERROR, P.ERROR)


CHILD_STEPS = ["START", "AWAIT_SETUP", "SETTING_UP", "IDLE", "RUNNING", "IDLE", "STOPPING",
               "CLOSED"]


def _reach(pair: Pair, steps: int) -> None:
    actions = [lambda: pair.child_says(HELLO), lambda: pair.parent_says(SETUP),
               lambda: pair.child_says(Ready(digests=RECORDS)),
               lambda: pair.parent_says(Grant(until=0)),
               lambda: pair.child_says(Done(until=0, digests=RECORDS)),
               lambda: pair.parent_says(Stop(reason="x")),
               lambda: pair.child_says(Bye())]
    for action in actions[:steps]:
        action()


@pytest.mark.parametrize("steps", range(len(CHILD_STEPS)),
                         ids=[f"{i}-{name}" for i, name in enumerate(CHILD_STEPS)])
def test_child_machine_error_frame_moves_to_error(steps: int) -> None:
    pair = Pair()
    _reach(pair, steps)
    assert pair.child.state.value == CHILD_STEPS[steps]
    error = Error(code="bad-field", detail="d", field="DONE.until", tick=0)
    assert pair.child.receive(encode(error)) == error
    assert pair.child.state is C.ERROR


@pytest.mark.parametrize("steps", range(len(CHILD_STEPS)))
def test_parent_machine_error_frame_moves_to_error(steps: int) -> None:
    pair = Pair()
    _reach(pair, steps)
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
    pair.parent_says(Grant(until=0))
    with pytest.raises((FrameError, LocalProtocolError)):
        pair.child.send(Done(until=0, digests=object()), checked=False)  # type: ignore
    assert pair.child.state is C.ERROR


def test_machine_send_invalid_field_is_local_error() -> None:
    pair = Pair().handshake()
    pair.parent_says(Grant(until=0))
    with pytest.raises(LocalProtocolError) as info:
        pair.child.send(Done(until=0, digests="not bytes"))  # type: ignore[arg-type]
    assert (info.value.field, info.value.code) == ("DONE.digests", "bad-field")


def test_versions_name_every_mismatch() -> None:
    ours = proto.local_versions()
    assert set(ours) == {"python", "msgpack", "hio", "hiocluster", "protocol"}
    assert proto.mismatches(dict(ours), ours) == []
    theirs = dict(ours, hio="0.0.1")
    del theirs["msgpack"]
    assert proto.mismatches(theirs, ours) == [f"msgpack missing (supervisor: {ours['msgpack']})",
                                              f"hio 0.0.1 (supervisor: {ours['hio']})"]


# ---------------------------------------------------------------------------
# docs/protocol.md quotes the transition tables: keep them in step


def _doc_table(heading: str) -> dict[tuple[str, str, str], str]:
    text = DOCS.read_text(encoding="utf-8")
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\|\s*([A-Z_]+)\s*\|\s*(send|recv) ([A-Z]+)\s*\|\s*([A-Z_]+)\s*\|",
                      section, flags=re.M)
    return {(state, direction, kind): after for state, direction, kind, after in rows}


@pytest.mark.parametrize("heading, table", [("### Worker machine", CHILD_TRANSITIONS),
                                            ("### Supervisor machine", PARENT_TRANSITIONS)])
def test_docs_transition_tables_match_code(heading: str, table: dict) -> None:
    expected = {(state.value, direction, kind): after.value
                for (state, direction, kind), after in table.items()}
    assert _doc_table(heading) == expected


def test_docs_worked_example_matches_encoder() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert encode(Grant(until=3)).hex(" ") in text


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
dones = st.builds(Done, until=uints, digests=st.binary(max_size=200))
progresses = st.builds(Progress, tick=st.none() | uints, waiting=st.lists(names, max_size=4))
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
       st.dictionaries(st.sampled_from(["until", "start", "tick", "waiting", "digests",
                                        "stats", "worker", "token", "links", "messages",
                                        "acks", "reason", "code", "detail", "other"]),
                       payloads, max_size=6))
def test_decode_arbitrary_bodies_is_message_or_frame_error(kind: str,
                                                           body: dict[str, Any]) -> None:
    result = _decode_or_frame_error(pack([V, kind, body]), limit=MAX_DATA_FRAME)
    assert isinstance(result, (Message, FrameError))
    if isinstance(result, FrameError):
        assert result.field == "frame" or result.field.startswith((kind, "body"))


@FEW
@given(st.one_of(dones, progresses, datas))
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
@given(dones, mutations)
def test_decode_mutated_done_is_message_or_frame_error(done: Done,
                                                       edits: list[tuple[str, int, int]]) -> None:
    data = _mutate(encode(done), edits)
    result = _decode_or_frame_error(data)
    assert isinstance(result, (Message, FrameError))
    parent = Pair().handshake().windows(1).parent
    parent.send(Grant(until=3))
    try:
        parent.receive(data)
    except (FrameError, RemoteProtocolError):
        assert parent.state is P.ERROR


def test_docs_services_table_lists_every_field() -> None:
    """docs/protocol.md §12 names exactly the fields of the services' messages."""
    section = DOCS.read_text(encoding="utf-8").split("## 12. Services", 1)[1]
    fields: dict[str, set[str]] = {}
    kind = ""
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] in ("type", "---"):
            continue
        kind = cells[0] or kind
        fields.setdefault(kind, set()).update(
            name.strip("` ") for name in cells[2].split(","))
    for message in (Join, Load, Standby, Assign, Command, Answer):
        assert fields[message.TYPE] == set(message.SCHEMA), message.TYPE


def test_an_agent_takes_a_replicas_launch_and_close_and_checks_their_fields() -> None:
    launch = proto.Launch(worker="web.0.3", connect="tcp://198.18.0.1:5000",
                          credentials="{}", service='{"name": "web"}', listeners=[0, 2])
    close = proto.Close(service="web", listeners=[2, 3])
    for message in (launch, close):
        assert decode(encode(message), allowed=proto.TO_AGENT) == message
    for bad, field in [(proto.Close(service="web", listeners=[-1]), "CLOSE.listeners"),
                       (proto.Close(service="../web", listeners=[]), "CLOSE.service"),
                       (proto.Launch(worker="web.0.3", connect="tcp://198.18.0.1:5000",
                                     credentials="{}", service='{}', listeners=["0"]),
                        "LAUNCH.listeners")]:
        with pytest.raises(FrameError) as info:
            decode(encode(bad), allowed=proto.TO_AGENT)
        assert info.value.field.startswith(field), info.value
    with pytest.raises(FrameError):  # an agent's answer is no supervisor's request
        decode(encode(close), allowed=proto.FROM_AGENT)
