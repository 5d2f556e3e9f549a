"""Hostile peers (DESIGN.md invariant 6): bad input gets a clear error, the run goes on.

Strangers write to the supervisor's control socket and to a worker's data
socket while a run ticks: every frame is refused (an ERROR frame naming the
field, on the control socket), counted in ``rejected_frames``, and the run
ends with the same digest as an undisturbed one. A fake child that breaks the
protocol mid-run stops the run with a RunFailed naming it and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from hiocluster import protocol as proto
from hiocluster import supervisor
from hiocluster.errors import RunFailed
from hiocluster.topology import loads

from conftest import REPO, connect_ready
from tests.faulty import fake_worker, ring_toml

DIGEST = b"\1" * proto.DIGEST_SIZE


def ring3(ticks: int = 60, **extra: dict[str, Any]) -> str:
    """Three processes in a ring, one node each; ``extra`` adds params per node."""
    nodes: dict[str, dict[str, Any]] = {name: {} for name in ("a", "b", "c")}
    for name, params in extra.items():
        nodes[name].update(params)
    return ring_toml(nodes, {"p0": ["a"], "p1": ["b"], "p2": ["c"]}, ticks=ticks)


def run(text: str, **kwargs: Any) -> supervisor.RunResult:
    return supervisor.run(loads(text), app_dir=str(REPO), handle_signals=False, **kwargs)


def receive(sock: zmq.Socket, count: int, timeout: float = 10.0) -> list[list[bytes]]:
    """Up to ``count`` multipart messages, waiting at most ``timeout`` seconds for each."""
    replies = []
    while len(replies) < count and sock.poll(timeout * 1000):
        replies.append(sock.recv_multipart())
    return replies


def pack(*frame: Any) -> bytes:
    return msgpack.packb(list(frame), use_bin_type=True)


HELLO_BODY = {"process": "intruder", "pid": 1, "data_address": "ipc:///tmp/x",
              "nodes": ["a"]}

#: (what, frames of one message, expected ERROR code, expected ERROR field)
CONTROL_GARBAGE: list[tuple[str, list[bytes], str, str]] = [
    ("garbage", [b"\xc1\xc1 not msgpack at all"], "bad-msgpack", "frame"),
    ("empty", [b""], "bad-msgpack", "frame"),
    ("truncated", [proto.encode(proto.Hello(**HELLO_BODY))[:-7]], "bad-msgpack", "frame"),
    ("wrong-type", [pack(1, "HELLO", dict(HELLO_BODY, pid="one"))], "bad-field", "HELLO.pid"),
    ("wrong-nested", [pack(1, "HELLO", dict(HELLO_BODY, nodes=["a", 7]))], "bad-field",
     "HELLO.nodes[1]"),
    ("oversized", [b"\0" * (proto.MAX_CONTROL_FRAME + 4096)], "oversized", "frame"),
    ("unknown-type", [pack(1, "GIMME", {})], "bad-type", "type"),
    ("version", [pack(99, "HELLO", HELLO_BODY)], "version", "version"),
    ("stale-tock", [proto.encode(proto.Tock(n=0, sent=[], digests={"a": DIGEST}))],
     "bad-type", "type"),
    ("multipart", [proto.encode(proto.Ready()), b"second part"], "multipart", "frame"),
    ("stranger-hello", [proto.encode(proto.Hello(**HELLO_BODY))], "unknown-peer",
     "HELLO.process"),
]


def test_control_socket_strangers_get_errors_and_the_run_goes_on() -> None:
    text = ring3()
    baseline = run(text)
    context = zmq.Context()
    sockets: list[zmq.Socket] = []

    def on_ready(sup: supervisor.Supervisor) -> None:
        stranger = context.socket(zmq.DEALER)
        # an impersonator: zmq gives a taken routing id to nobody, so it is never heard
        impostor = context.socket(zmq.DEALER)
        impostor.setsockopt(zmq.ROUTING_ID, sup.children[0].identity)
        for sock in (stranger, impostor):
            sock.setsockopt(zmq.LINGER, 0)
            sockets.append(sock)
            connect_ready(sock, sup.control_address)  # before ticking starts
        for _, frames, _, _ in CONTROL_GARBAGE:
            stranger.send_multipart(frames)
        impostor.send(proto.encode(proto.Tock(n=0, sent=[], digests={"a": DIGEST})))

    try:
        result = run(text, on_ready=on_ready)
        stranger, impostor = sockets
        replies = receive(stranger, len(CONTROL_GARBAGE))
        assert impostor.poll(0) == 0
    finally:
        for sock in sockets:
            sock.close(linger=0)
        context.term()
    assert result.digest == baseline.digest
    assert result.ticks == baseline.ticks
    got = []
    for reply in replies:
        assert len(reply) == 1
        error = proto.decode(reply[0])
        assert isinstance(error, proto.Error)
        assert error.detail
        got.append((error.code, error.field))
    assert got == [(code, field) for _, _, code, field in CONTROL_GARBAGE]
    assert result.rejected_frames == len(CONTROL_GARBAGE)
    assert baseline.rejected_frames == 0


def test_data_socket_strangers_are_rejected_and_the_run_goes_on() -> None:
    text = ring3(ticks=60)
    baseline = run(text)
    context = zmq.Context()
    sockets: list[zmq.Socket] = []
    # links in canonical order: 0 a.out -> b.in (p0 -> p1), 1 b -> c (p1 -> p2),
    # 2 c -> a (p2 -> p0). The target is p1 (node b): its peers are p0 and p2.
    junk = [
        b"\xc1 garbage",
        pack(1, "DATA", {"tick": 2, "source": "p0"}),                     # missing fields
        proto.encode(proto.Tick(n=3, expect=0)),                         # not a DATA frame
        proto.encode(proto.Data(tick=0, source="p0", messages=[], acks=[])),        # stale
        proto.encode(proto.Data(tick=2, source="nobody", messages=[[0, [0], [1]]], acks=[])),
        proto.encode(proto.Data(tick=2, source="p0", messages=[[2, [0], [1]]], acks=[])),
        proto.encode(proto.Data(tick=2, source="p2", messages=[], acks=[[0, 1]])),
        proto.encode(proto.Data(tick=2, source="p2", messages=[], acks=[[1, 10**6]])),  # credit
    ]

    def on_tick(done: int, total: int) -> None:
        if done == 2:  # every worker is between ticks, collecting tick 1 next
            push = context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            sockets.append(push)
            connect_ready(push, state["address"])
            for frame in junk:
                push.send(frame)

    state: dict[str, str] = {}

    def on_ready(sup: supervisor.Supervisor) -> None:
        child = sup.children[1]
        assert child.name == "p1" and child.hello is not None
        state["address"] = child.hello.data_address

    try:
        result = run(text, on_ready=on_ready, on_tick=on_tick)
    finally:
        for sock in sockets:
            sock.close(linger=0)
        context.term()
    assert sockets, "on_tick never sent the junk"
    assert result.digest == baseline.digest
    assert result.rejected_frames == len(junk)
    assert baseline.rejected_frames == 0


# -- a fake child that breaks the protocol ----------------------------------------------


@pytest.mark.parametrize("mode, field, code, tick", [
    ("garbage", "frame", "bad-msgpack", 0),
    ("wrong-tick", "TOCK.n", "wrong-tick", 0),
    ("stale-tock", "TOCK.n", "stale-tick", 1),
    ("missing-digest", "TOCK.digests", "bad-field", 0),
])
def test_fake_child_breaking_the_protocol_fails_the_run(tmp_path: Path, mode: str, field: str,
                                                         code: str, tick: int) -> None:
    report = tmp_path / "fake.json"
    text = ring3(ticks=20, b={"fake": mode, "report": str(report)})
    seen: list[supervisor.Supervisor] = []
    with pytest.raises(RunFailed) as info:
        run(text, worker_target=fake_worker, on_ready=seen.append)
    error = info.value
    assert type(error) is RunFailed
    assert error.process == "p1"
    assert error.nodes == ("b",)
    assert error.tick == tick
    assert field in str(error)
    fake = seen[0].children[1].process
    assert fake.exitcode == 0, "the fake child should have exited by itself"
    received = json.loads(report.read_text())
    assert [entry["type"] for entry in received[:-1]] == ["SETUP"] + ["TICK"] * (tick + 1)
    verdict = received[-1]
    assert verdict["type"] == "ERROR", received
    assert (verdict["code"], verdict["field"]) == (code, field)


def test_fake_child_bye_without_digests_fails_a_clean_run(tmp_path: Path) -> None:
    report = tmp_path / "fake.json"
    text = ring3(ticks=4, b={"fake": "bye-without-digests", "report": str(report)})
    with pytest.raises(RunFailed) as info:
        run(text, worker_target=fake_worker)
    assert (info.value.process, info.value.nodes) == ("p1", ("b",))
    assert "BYE.digests" in info.value.cause
    received = json.loads(report.read_text())
    assert [entry["type"] for entry in received] == ["SETUP"] + ["TICK"] * 4 + ["STOP", "ERROR"]
    assert (received[-1]["code"], received[-1]["field"]) == ("bad-field", "BYE.digests")
