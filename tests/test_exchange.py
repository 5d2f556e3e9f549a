"""Unit tests of hiocluster.worker.exchange: a worker's DATA plane, without sockets.

Two or three Exchanges (one per worker) pass their outgoing frames to each
other by hand, the way ZeroMQ would: every tick each sends each neighbour
exactly one frame; delivery is canonical; credit comes back one tick later; a
bad frame names its field and the neighbour that sent it.
"""

from __future__ import annotations

from typing import Any

import pytest

from hiocluster import protocol as proto
from hiocluster.errors import FrameError, LinkFull, RemoteProtocolError
from hiocluster.worker.exchange import Exchange, Unsendable
from hiocluster.node import Node


class Box(Node):
    """Puts what the test queued on ``out`` (to= the named target), records its inbox."""

    inboxes = ("in",)
    outboxes = ("out", "side")

    def setup(self) -> None:
        self.got: list[tuple[str, Any]] = []

    def take(self) -> None:
        while self.inbox["in"]:
            self.got.append(self.inbox["in"].get_from())


# links: 0 a.out -> c.in, 1 a.side -> c.in, 2 b.out -> c.in, 3 c.out -> a.in
ROWS = [[0, "a", "out", "c", "in", 4, "w0", "w1"],
        [1, "a", "side", "c", "in", 4, "w0", "w1"],
        [2, "b", "out", "c", "in", 2, "w0", "w1"],
        [3, "c", "out", "a", "in", 4, "w1", "w0"]]


def make(worker: str, names: list[str], rows: list[list[Any]] = ROWS,
         lag: int = 1) -> tuple[Exchange, dict]:
    nodes = {name: Box(name, seed=1) for name in names}
    return Exchange(worker, nodes, rows, lag), nodes


def swap(tick: int, *exchanges: Exchange) -> None:
    """Every exchange sends its frames of ``tick`` to the others (what sockets do)."""
    by_name = {exchange.worker: exchange for exchange in exchanges}
    for exchange in exchanges:
        for peer, frame in exchange.outgoing(tick):
            by_name[peer].accept(exchange.worker, frame)


def test_neighbours_are_every_worker_sharing_a_link() -> None:
    w0, _ = make("w0", ["a", "b"])
    w1, _ = make("w1", ["c"])
    assert w0.neighbours == ("w1",) and w1.neighbours == ("w0",)
    lonely, _ = make("w2", ["z"], [])
    assert lonely.neighbours == () and lonely.outgoing(0) == []


def test_every_tick_sends_one_frame_per_neighbour_even_when_empty() -> None:
    w0, _ = make("w0", ["a", "b"])
    frames = w0.outgoing(0)
    assert [peer for peer, _ in frames] == ["w1"]
    assert proto.decode_data(frames[0][1]) == proto.Data(0, "w0", [], [])


def test_delivery_is_by_source_name_then_sequence() -> None:
    w0, left = make("w0", ["a", "b"])
    w1, right = make("w1", ["c"])
    left["b"].outbox["out"].put("b0")      # b sorts after a, whatever the send order
    left["a"].outbox["side"].put("a-side0")
    left["a"].outbox["out"].put("a-out1")
    left["a"].outbox["side"].put("a-side2")
    swap(0, w0, w1)
    assert w1.missing(1) == [] and w1.missing(2) == ["w0"]
    w1.deliver(1)
    right["c"].take()
    assert right["c"].got == [("a", "a-side0"), ("a", "a-out1"), ("a", "a-side2"),
                              ("b", "b0")]
    assert w0.messages == 4 and w1.messages == 0


def test_credit_returns_one_tick_after_the_take() -> None:
    w0, left = make("w0", ["a", "b"])
    w1, right = make("w1", ["c"])
    out = left["b"].outbox["out"]  # capacity 2
    out.put(1)
    out.put(2)
    with pytest.raises(LinkFull):
        out.put(3)
    swap(0, w0, w1)
    w1.deliver(1)
    w0.deliver(1)
    right["c"].take()              # c takes both during tick 1
    swap(1, w0, w1)
    assert out.room() == 0         # the ack is on its way
    w0.deliver(2)
    assert out.room() == 2


def test_local_links_go_through_msgpack_and_wait_a_tick() -> None:
    rows = [[0, "a", "out", "b", "in", 4, "w0", "w0"]]
    w0, nodes = make("w0", ["a", "b"], rows)
    nodes["a"].outbox["out"].put((1, "tuple"))
    assert w0.outgoing(0) == []
    nodes["b"].take()
    assert nodes["b"].got == []
    w0.deliver(1)
    nodes["b"].take()
    assert nodes["b"].got == [("a", [1, "tuple"])]  # as msgpack gives it back


def test_an_unsendable_payload_names_node_link_and_tick() -> None:
    w0, left = make("w0", ["a", "b"])
    left["b"].outbox["out"].put("fine")
    left["a"].outbox["side"].put({(1, 2): 3})  # packs, but cannot be unpacked
    with pytest.raises(Unsendable) as info:
        w0.outgoing(5)
    assert info.value.node == "a" and info.value.tick == 5
    assert "a.side -> c.in" in info.value.detail


@pytest.mark.parametrize("payload, why", [(2 ** 64, "int too big"), ("\ud800", "surrogate"),
                                          ("x" * (proto.MAX_DATA_FRAME + 1), "oversized")],
                         ids=["int", "str", "oversized"])
@pytest.mark.parametrize("local", [False, True], ids=["remote", "local"])
def test_a_scalar_that_cannot_travel_is_unsendable_in_every_placement(
        payload: Any, why: str, local: bool) -> None:
    """Scalar payloads skip the sender's unpack (they come back as packed): one that
    does not pack, or a frame over the limit, still fails in the sender, named."""
    rows = [[0, "a", "side", "c", "in", 4, "w0", "w0" if local else "w1"]]
    w0, nodes = make("w0", ["a", "c"] if local else ["a"], rows)
    nodes["a"].outbox["side"].put(payload)
    with pytest.raises(Unsendable) as info:
        w0.outgoing(3)
    assert info.value.node == "a" and info.value.tick == 3, why
    assert "a.side -> c.in" in info.value.detail


def test_scalars_arrive_as_they_were_put_locally_and_remotely() -> None:
    values = [None, True, False, 0, -1, 2 ** 64 - 1, -2 ** 63, 1.5, float("inf"), "",
              "\u00e9t\u00e9", b"", b"\x00\xff"]
    got = {}
    for local in (False, True):
        rows = [[0, "a", "side", "c", "in", 64, "w0", "w0" if local else "w1"]]
        w0, left = make("w0", ["a", "c"] if local else ["a"], rows)
        w1, right = (w0, left) if local else make("w1", ["c"], rows)
        for value in values:
            left["a"].outbox["side"].put(value)
        swap(0, *{w0, w1})
        w1.deliver(1)
        right["c"].take()
        got[local] = [value for _, value in right["c"].got]
    assert got[False] == got[True] == values
    assert [type(value) for value in got[True]] == [type(value) for value in values]


def test_drain_counts_the_last_ticks_messages_as_undelivered() -> None:
    w0, left = make("w0", ["a", "b"])
    w1, right = make("w1", ["c"])
    left["a"].outbox["out"].put(1)
    left["b"].outbox["out"].put(2)
    swap(0, w0, w1)
    w1.drain(1)
    assert w1.undelivered == 2 and not right["c"].inbox["in"]


def test_frames_queue_per_neighbour_at_most_one_tick_ahead() -> None:
    w0, _ = make("w0", ["a", "b"])
    w1, _ = make("w1", ["c"])
    w1.accept("w0", w0.outgoing(0)[0][1])
    with pytest.raises(RemoteProtocolError) as info:  # w1 has sent nothing yet
        w1.accept("w0", w0.outgoing(1)[0][1])
    assert (info.value.field, info.value.code, info.value.worker) == ("DATA.tick",
                                                                      "wrong-tick", "w0")


def _frame(**fields: Any) -> bytes:
    body = {"tick": 0, "source": "w0", "messages": [], "acks": []}
    body.update(fields)
    return proto.encode(proto.Data(**body))


@pytest.mark.parametrize("raw, field, code", [
    (b"\xc1", "frame", "bad-msgpack"),
    (proto.encode(proto.Grant(until=1)), "type", "bad-type"),
    (_frame(source="w9"), "DATA.source", "wrong-source"),
    (_frame(tick=3), "DATA.tick", "wrong-tick"),
    (_frame(messages=[[3, [0], ["x"]]]), "DATA.messages[0][0]", "bad-link"),
    (_frame(messages=[[99, [0], ["x"]]]), "DATA.messages[0][0]", "bad-link"),
    (_frame(messages=[[0, [0], ["x"]], [0, [1], ["y"]]]), "DATA.messages[1][0]",
     "duplicate"),
    (_frame(acks=[[0, 1]]), "DATA.acks[0][0]", "bad-link"),
], ids=["garbage", "not-data", "forged-source", "future", "backwards-link", "no-link",
        "link-twice", "ack-wrong-way"])
def test_a_bad_frame_names_its_field_and_sender(raw: bytes, field: str, code: str) -> None:
    w1, _ = make("w1", ["c"])
    with pytest.raises((FrameError, RemoteProtocolError)) as info:
        w1.accept("w0", raw)
    assert (info.value.field, info.value.code) == (field, code)


def test_a_frame_from_the_past_is_stale() -> None:
    w0, _ = make("w0", ["a", "b"])
    w1, _ = make("w1", ["c"])
    swap(0, w0, w1)
    with pytest.raises(RemoteProtocolError) as info:
        w1.accept("w0", _frame(tick=0))
    assert info.value.code == "stale-tick"


def test_an_ack_beyond_what_is_in_flight_is_refused_at_delivery() -> None:
    w0, left = make("w0", ["a", "b"])
    w1, _ = make("w1", ["c"])
    left["a"].outbox["out"].put(1)
    w1.outgoing(0)  # so w0 may receive w1's frame of tick 0
    w0.outgoing(0)
    w0.accept("w1", proto.encode(proto.Data(0, "w1", [], [[0, 2]])))
    with pytest.raises(RemoteProtocolError) as info:
        w0.deliver(1)
    assert (info.value.field, info.value.code, info.value.worker) == ("DATA.acks[0][1]",
                                                                      "bad-ack", "w1")


# -- credit lag (SETUP credit_lag = L) ------------------------------------------------
ONE_WAY = ROWS[:3]  # w0 only sends to w1: w1 is downstream, and only sends acks


def lockstep(ticks: int, exchanges: list[Exchange], each: Any = None) -> list[list[str]]:
    """Run ``ticks`` ticks as workers would: before each, what is missing must be in
    (the frames are passed at once), deliver, ``each(tick)``, send. Returns who
    sent frames to whom at each tick."""
    by_name = {exchange.worker: exchange for exchange in exchanges}
    sent = []
    for tick in range(ticks):
        for exchange in exchanges:
            if tick:
                assert exchange.missing(tick) == []
                exchange.deliver(tick)
        if each is not None:
            each(tick)
        row = []
        for exchange in exchanges:
            for peer, frame in exchange.outgoing(tick):
                by_name[peer].accept(exchange.worker, frame)
                row.append(f"{exchange.worker}>{peer}")
        sent.append(row)
    return sent


@pytest.mark.parametrize("lag", [1, 2, 3, 5])
def test_a_downstream_neighbour_sends_only_every_lag_ticks(lag: int) -> None:
    w0, _ = make("w0", ["a", "b"], ONE_WAY, lag)
    w1, _ = make("w1", ["c"], ONE_WAY, lag)
    assert (w0.upstream, w0.downstream, w1.upstream, w1.downstream) == \
        ((), ("w1",), ("w0",), ())
    sent = lockstep(4 * lag, [w0, w1])
    for tick, row in enumerate(sent):
        assert row == ["w0>w1"] + (["w1>w0"] if (tick + 1) % lag == 0 else [])
    # w0 waits on w1 only when acks are due: for the frame sent lag ticks before
    waits = [tick for tick in range(1, 6 * lag) if w0.acks_due(tick)]
    assert waits == [tick for tick in range(2 * lag - 1, 6 * lag, lag)]


def _credit_run(lag: int, local: bool) -> tuple[list[int], list[int]]:
    """c takes one message per tick; b fills its link (capacity 2) every tick. Returns
    b's room at the start of each tick and the ticks c took in; all nodes in one
    worker (``local``) or c apart."""
    if local:
        rows = [row[:6] + ["w0", "w0"] for row in ONE_WAY]
        w0, nodes = make("w0", ["a", "b", "c"], rows, lag)
        exchanges, left, right = [w0], nodes, nodes
    else:
        w0, left = make("w0", ["a", "b"], ONE_WAY, lag)
        w1, right = make("w1", ["c"], ONE_WAY, lag)
        exchanges = [w0, w1]
    out, inbox = left["b"].outbox["out"], right["c"].inbox["in"]
    rooms: list[int] = []
    takes: list[int] = []

    def each(tick: int) -> None:
        rooms.append(out.room())
        if inbox:
            inbox.get()
            takes.append(tick)
        while out.room():
            out.put(tick)

    lockstep(10 * lag + 3, exchanges, each)
    return rooms, takes


@pytest.mark.parametrize("lag", [1, 2, 4])
def test_credit_counts_lag_ticks_after_the_batch_of_takes(lag: int) -> None:
    """A take in tick k is acked with its batch at the end of tick e (the first e >= k
    with e+1 a multiple of lag) and counts at the source from tick e+lag on."""
    rooms, takes = _credit_run(lag, local=False)

    def acked(tick: int) -> int:
        return sum(1 for k in takes if k // lag * lag + lag - 1 + lag <= tick)

    # b filled the link every tick, so the room at tick t is what came back since t-1
    expected = [2] + [acked(tick) - acked(tick - 1) for tick in range(1, len(rooms))]
    assert rooms == expected
    assert sum(rooms[1:]) > 0            # credit came back, ...
    assert rooms[1:2 * lag - 1] == [0] * (2 * lag - 2)  # ... never before 2 lags


@pytest.mark.parametrize("lag", [1, 3])
def test_credit_is_the_same_whatever_the_placement(lag: int) -> None:
    assert _credit_run(lag, local=True) == _credit_run(lag, local=False)


def test_acks_only_travel_on_every_lag_th_tick() -> None:
    w0, _ = make("w0", ["a", "b"], ONE_WAY, 4)
    w0.outgoing(0)
    with pytest.raises(RemoteProtocolError) as info:  # from w1 only ticks 3, 7, ...
        w0.accept("w1", proto.encode(proto.Data(0, "w1", [], [[0, 1]])))
    assert (info.value.field, info.value.code) == ("DATA.tick", "wrong-tick")
    both, _ = make("w0", ["a", "b"], ROWS, 4)           # both ways: a frame every tick,
    both.outgoing(0)
    with pytest.raises(RemoteProtocolError) as info:   # acks only in ticks 3, 7, ...
        both.accept("w1", proto.encode(proto.Data(0, "w1", [], [[0, 1]])))
    assert (info.value.field, info.value.code) == ("DATA.acks", "bad-ack")


def test_an_upstream_neighbour_may_run_two_lags_ahead_not_more() -> None:
    """w1 only acks w0's frames (lag 3): having sent its acks of tick 2, it lets w0
    run ticks up to 2 + 2*3 - 1 = 7 (tick 8 needs w1's acks of tick 5)."""
    w1, _ = make("w1", ["c"], ONE_WAY, 3)
    for tick in range(3):
        w1.outgoing(tick)
    for tick in range(8):
        w1.accept("w0", proto.encode(proto.Data(tick, "w0", [], [])))
    with pytest.raises(RemoteProtocolError) as info:
        w1.accept("w0", proto.encode(proto.Data(8, "w0", [], [])))
    assert (info.value.field, info.value.code) == ("DATA.tick", "wrong-tick")


def test_resending_keeps_what_a_neighbour_may_still_need() -> None:
    lag = 4
    w0, _ = make("w0", ["a", "b"], ONE_WAY, lag)
    w1, _ = make("w1", ["c"], ONE_WAY, lag)
    lockstep(9, [w0, w1])
    # w1 sent its frames of ticks 3 and 7: it ran tick 8, which needed w0's tick 7
    assert w0.arrived == {"w1": 8} and w0.safe_before("w1") == 7
    # w0 sends w1 only acks: w1's frame of tick 8 says it had them up to tick 8-4
    assert w1.arrived == {"w0": 9} and w1.safe_before("w0") == 5


def test_an_over_large_ack_is_refused_when_it_counts_lag_ticks_later() -> None:
    lag = 2
    w0, left = make("w0", ["a", "b"], ONE_WAY, lag)
    left["a"].outbox["out"].put(1)
    w0.outgoing(0)
    w0.deliver(1)
    w0.outgoing(1)
    w0.accept("w1", proto.encode(proto.Data(1, "w1", [], [[0, 2]])))  # tick 1 carries acks
    w0.deliver(2)                                     # not yet: they count from tick 3
    w0.outgoing(2)
    with pytest.raises(RemoteProtocolError) as info:
        w0.deliver(3)
    assert (info.value.field, info.value.code, info.value.worker) == ("DATA.acks[0][1]",
                                                                      "bad-ack", "w1")


def test_end_frames_go_upstream_and_say_a_neighbour_had_everything() -> None:
    w0, _ = make("w0", ["a", "b"], ONE_WAY, 2)
    w1, _ = make("w1", ["c"], ONE_WAY, 2)
    w0.end = w1.end = 4
    lockstep(4, [w0, w1])
    w1.drain(4)
    assert w0.unfinished() == ["w1"] and w1.unfinished() == []
    assert w0.finish() == []                          # w0 is fed by nobody
    frames = w1.finish()
    assert [peer for peer, _ in frames] == ["w0"]
    w0.accept("w1", frames[0][1])
    assert w0.unfinished() == []
    with pytest.raises(RemoteProtocolError):          # an end frame with content is not one
        w0.accept("w1", proto.encode(proto.Data(4, "w1", [], [[0, 1]])))


@pytest.mark.parametrize("make_array", [
    lambda np: np.arange(12.0).reshape(3, 4),
    lambda np: np.arange(12.0).reshape(3, 4)[:, ::2],          # not contiguous
    lambda np: np.asfortranarray(np.arange(6).reshape(2, 3)),
    lambda np: np.array([True, False]),
    lambda np: np.array([1 + 2j], dtype=np.complex64),
    lambda np: np.array(3.5),                                   # 0-d
    lambda np: np.arange(4, dtype=">f8"),                       # big-endian
    lambda np: np.zeros((0, 3), dtype=np.uint16),
], ids=["2d", "strided", "fortran", "bool", "complex", "0d", "big-endian", "empty"])
def test_arrays_between_local_nodes_are_what_msgpack_gives_back(make_array: Any) -> None:
    """Arrays alone on local links are copied, not packed: exactly the array a
    neighbour unpacks (dtype, shape, C order, a fresh writable one)."""
    np = pytest.importorskip("numpy")
    rows = [[0, "a", "out", "b", "in", 4, "w0", "w0"]]
    w0, nodes = make("w0", ["a", "b"], rows)
    sent = make_array(np)
    nodes["a"].outbox["out"].put(sent)
    w0.outgoing(0)
    w0.deliver(1)
    got = nodes["b"].inbox["in"].get()
    unpacked = proto.reload_data(proto.encode(proto.Data(0, "w0", [[0, [0], [sent]]], [])))
    expected = unpacked.messages[0][2][0]
    assert type(got) is type(expected) and got.dtype.str == expected.dtype.str
    assert got.shape == expected.shape and got.flags.c_contiguous and got.flags.writeable
    assert got.tobytes() == expected.tobytes() and got is not sent
    if sent.size:
        assert not np.shares_memory(got, sent)
