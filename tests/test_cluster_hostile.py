"""Hostile peers (docs/design.md, "Bad input"): bad input gets a clear error, the run goes on.

Strangers write to the supervisor's control socket and to a worker's data
socket while a run ticks: every frame is refused (an ERROR frame naming the
field, on the control socket), counted in ``rejected_frames``, and the run
ends with the same digest as an undisturbed one. Nobody without the run's token
can speak for a worker, so a forged DATA frame never displaces a real one, and
a flood from a stranger is bounded. A fake worker that breaks the protocol stops
the run with a RunFailed naming it and the field.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import zmq

from hiocluster import protocol as proto
from hiocluster.supervision import supervisor
from hiocluster.errors import RunFailed
from hiocluster.topology import loads

from conftest import REPO, connect_ready
from tests.fake_worker import FAKE_COMMAND
from tests.faulty import ring_toml

V = proto.VERSION


def ring3(ticks: int = 60, **extra: dict[str, Any]) -> str:
    """Three workers in a ring, one node each; ``extra`` adds params per node."""
    nodes: dict[str, dict[str, Any]] = {name: {} for name in ("a", "b", "c")}
    for name, params in extra.items():
        nodes[name].update(params)
    return ring_toml(nodes, {"p0": ["a"], "p1": ["b"], "p2": ["c"]}, ticks=ticks)


def run(text: str, **kwargs: Any) -> supervisor.RunResult:
    return supervisor.run(loads(text), app_dir=str(REPO), handle_signals=False, **kwargs)


def receive(sock: zmq.Socket, count: int, timeout: float = 30.0) -> list[list[bytes]]:
    """Up to ``count`` multipart messages, waiting at most ``timeout`` seconds for each."""
    replies = []
    while len(replies) < count and sock.poll(timeout * 1000):
        replies.append(sock.recv_multipart())
    return replies


def pack(*frame: Any) -> bytes:
    return msgpack.packb(list(frame), use_bin_type=True)


HELLO = proto.Hello(worker="intruder", token=b"\0" * 16, pid=1,
                    versions=proto.local_versions(), data_address="ipc:///tmp/x")

#: (what, frames of one message, expected ERROR code, expected ERROR field)
CONTROL_GARBAGE: list[tuple[str, list[bytes], str, str]] = [
    ("garbage", [b"\xc1\xc1 not msgpack at all"], "bad-msgpack", "frame"),
    ("empty", [b""], "bad-msgpack", "frame"),
    ("truncated", [proto.encode(HELLO)[:-7]], "bad-msgpack", "frame"),
    ("wrong-type", [pack(V, "HELLO", dict(HELLO.to_body(), pid="one"))], "bad-field",
     "HELLO.pid"),
    ("wrong-nested", [pack(V, "HELLO", dict(HELLO.to_body(), versions={"hio": 7}))],
     "bad-field", "HELLO.versions.hio"),
    ("oversized", [b"\0" * (proto.MAX_CONTROL_FRAME + 4096)], "oversized", "frame"),
    ("unknown-type", [pack(V, "GIMME", {})], "bad-type", "type"),
    ("version", [pack(1, "HELLO", HELLO.to_body())], "version", "version"),
    ("done-first", [proto.encode(proto.Done(until=0, digests=b""))], "bad-type", "type"),
    ("multipart", [proto.encode(proto.Ready(digests=b"")), b"second part"], "multipart",
     "frame"),
    ("stranger-hello", [proto.encode(HELLO)], "unknown-peer", "HELLO.worker"),
    ("no-token", [proto.encode(proto.Hello(**dict(HELLO.to_body(), worker="p1")))],
     "unknown-peer", "HELLO.worker"),
]


def test_control_socket_strangers_get_errors_and_the_run_goes_on() -> None:
    text = ring3()
    baseline = run(text)
    context = zmq.Context()
    sockets: list[zmq.Socket] = []

    def on_listening(sup: supervisor.Supervisor) -> None:  # before any worker joins
        stranger = context.socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        sockets.append(stranger)
        connect_ready(stranger, sup.control_address)
        for _, frames, _, _ in CONTROL_GARBAGE:
            stranger.send_multipart(frames)

    try:
        result = run(text, on_listening=on_listening)
        replies = receive(sockets[0], len(CONTROL_GARBAGE))
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
    assert "wrong token" in proto.decode(replies[-1][0]).detail  # type: ignore[attr-defined]
    assert result.rejected_frames == len(CONTROL_GARBAGE)
    assert baseline.rejected_frames == 0


def _data_junk(token_of_nobody: bytes) -> list[bytes]:
    # links in canonical order: 0 a.out -> b.in (p0 -> p1), 1 b -> c (p1 -> p2),
    # 2 c -> a (p2 -> p0). The target is p1 (node b): its neighbours are p0 and p2.
    forged = [proto.encode(proto.Data(tick=tick, source="p0", messages=[[0, [0], [tick]]],
                                      acks=[])) for tick in range(4)]
    return [
        b"\xc1 garbage",
        pack(V, "DATA", {"tick": 2, "source": "p0"}),                     # missing fields
        proto.encode(proto.Grant(until=3)),                               # not a PEER frame
        proto.encode(proto.Peer(worker="p0", token=token_of_nobody)),     # wrong token
        proto.encode(proto.Peer(worker="nobody", token=token_of_nobody)),  # not a neighbour
        *forged,                    # DATA claiming to be p0's, before and during ticking
    ]


def test_data_socket_strangers_are_refused_and_forgeries_change_nothing() -> None:
    text = ring3(ticks=60)
    baseline = run(text, keep_digests=True)
    context = zmq.Context()
    sockets: list[zmq.Socket] = []
    junk = _data_junk(b"\7" * 16)

    def on_ready(sup: supervisor.Supervisor) -> None:
        hello = sup.core.books["p1"].hello
        assert hello is not None
        stranger = context.socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        sockets.append(stranger)
        connect_ready(stranger, hello.data_address)
        for frame in junk:
            stranger.send(frame)

    try:
        # paced by the wall clock (60 ticks of 0.05 s): p1 runs for 3 s after the junk
        # is sent, however late a loaded machine's I/O threads deliver it (unpaced,
        # the run could end before a single frame of it had arrived)
        result = supervisor.run(loads(text).replace(tock=0.05), app_dir=str(REPO),
                                handle_signals=False, real=True, on_ready=on_ready,
                                keep_digests=True)
    finally:
        for sock in sockets:
            sock.close(linger=0)
        context.term()
    assert sockets, "the junk was never sent"
    assert result.tick_digests == baseline.tick_digests
    assert result.rejected_frames == len(junk)
    assert baseline.rejected_frames == 0


def _flood(address: str, identity: bytes, frames: int, size: int) -> subprocess.Popen:
    """A separate process that connects to ``address`` as ``identity`` and sends
    ``frames`` frames of ``size`` bytes as fast as the socket takes them."""
    code = f"""
import sys, time, zmq
context = zmq.Context(); sock = context.socket(zmq.DEALER)
sock.setsockopt(zmq.ROUTING_ID, bytes.fromhex({identity.hex()!r}))
sock.setsockopt(zmq.SNDHWM, 4); sock.setsockopt(zmq.LINGER, 0)
sock.connect({address!r})
blob, sent, refused_since = b"x" * {size}, 0, None
while sent < {frames}:  # until it takes no more for 0.5 s
    try:
        sock.send(blob, zmq.NOBLOCK); sent += 1; refused_since = None
    except zmq.Again:
        refused_since = refused_since or time.monotonic()
        if time.monotonic() - refused_since > 0.5:
            break
        time.sleep(0.001)
print(sent, flush=True)
sys.stdin.read()
"""
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_a_flood_from_a_taken_identity_is_bounded() -> None:
    """A stranger that takes a worker's routing id on the control socket is never
    heard, and the frames it sends are held at most BOUND_RCVHWM deep."""
    text = ring3(ticks=400)
    baseline = run(text)
    floods: list[subprocess.Popen] = []
    memory: dict[str, int] = {}

    def on_ready(sup: supervisor.Supervisor) -> None:
        memory["before"] = psutil.Process().memory_info().rss
        identity = sup.switchboard.identity_of["p1"]
        floods.append(_flood(sup.control_address, identity, 5000, 100_000))

    def on_tick(done: int, total: int) -> None:
        if done >= total // 2 and "during" not in memory and floods:
            memory["during"] = psutil.Process().memory_info().rss

    try:
        result = run(text, on_ready=on_ready, on_tick=on_tick, window=1)
    finally:
        sent = [int(flood.communicate("", timeout=30)[0] or 0) for flood in floods]
    assert result.digest == baseline.digest
    assert sent[0] < 5000, "the flood was never held back"
    grew = memory.get("during", memory["before"]) - memory["before"]
    assert grew < 64 * 1024 * 1024, f"the supervisor grew by {grew / 1e6:.0f} MB"


# -- a fake worker that breaks the protocol ----------------------------------------------


@pytest.mark.parametrize("mode, worker, field, code, tick", [
    ("garbage", "p1", "frame", "bad-msgpack", 0),
    ("wrong-done", "p1", "DONE.until", "wrong-tick", 0),
    ("stale-done", "p1", "DONE.until", "stale-tick", 1),
    ("short-digests", "p1", "DONE.digests", "bad-field", 0),
    ("bad-progress", "p1", "PROGRESS.tick", "wrong-tick", 0),
    ("stranger-waiting", "p1", "PROGRESS.waiting", "bad-field", 0),
])
def test_fake_worker_breaking_the_protocol_fails_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, worker: str, field: str,
        code: str, tick: int) -> None:
    report = tmp_path / "fake.json"
    monkeypatch.setenv("FAKE_WORKER", f"p1:{mode}:{report}")
    with pytest.raises(RunFailed) as info:
        run(ring3(ticks=20), worker_command=FAKE_COMMAND, window=1)
    error = info.value
    assert type(error) is RunFailed
    assert (error.worker, error.nodes, error.tick) == (worker, ("b",), tick)
    assert field in str(error) and "invalid frame" in error.cause
    received = json.loads(report.read_text())
    assert [entry["type"] for entry in received[:2]] == ["SETUP", "GRANT"]
    verdict = received[-1]
    assert verdict["type"] == "ERROR", received
    assert (verdict["code"], verdict["field"]) == (code, field)


def test_worker_with_other_versions_is_refused_at_start_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = tmp_path / "fake.json"
    monkeypatch.setenv("FAKE_WORKER", f"p2:old-hio:{report}")
    with pytest.raises(RunFailed) as info:
        run(ring3(ticks=5), worker_command=FAKE_COMMAND)
    error = info.value
    assert (error.worker, error.tick) == ("p2", None)
    assert "versions differ" in error.cause and "hio 0.0.1" in error.cause
    received = json.loads(report.read_text())
    assert received[0]["type"] == "ERROR" and received[0]["code"] == "version-mismatch"


@pytest.mark.parametrize("mode, field", [("bad-link", "DATA.messages[0][0]"),
                                         ("forged-source", "DATA.source")])
def test_worker_sending_bad_data_is_blamed_by_its_neighbour(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, field: str) -> None:
    monkeypatch.setenv("FAKE_WORKER", f"p1:{mode}:{tmp_path / 'fake.json'}")
    with pytest.raises(RunFailed) as info:
        run(ring3(ticks=20), worker_command=FAKE_COMMAND)
    error = info.value
    assert error.worker == "p1" and error.nodes == ("b",)
    assert "invalid DATA frame" in error.cause and field in error.cause


def test_a_flood_on_a_data_socket_is_refused_and_bounded() -> None:
    text = ring3(ticks=400)
    baseline = run(text)
    floods: list[subprocess.Popen] = []
    memory: dict[str, int] = {}

    def on_ready(sup: supervisor.Supervisor) -> None:
        handle = sup.children["p1"].handle
        hello = sup.core.books["p1"].hello
        assert handle is not None and hello is not None
        memory["pid"] = handle.pid  # type: ignore[assignment]
        memory["before"] = psutil.Process(handle.pid).memory_info().rss
        floods.append(_flood(hello.data_address, b"stranger", 3000, 100_000))

    def on_tick(done: int, total: int) -> None:
        if done >= total // 2 and "during" not in memory and floods:
            memory["during"] = psutil.Process(memory["pid"]).memory_info().rss

    try:
        result = run(text, on_ready=on_ready, on_tick=on_tick, window=1)
    finally:
        sent = [int(flood.communicate("", timeout=30)[0] or 0) for flood in floods]
    assert result.digest == baseline.digest
    assert 0 < result.rejected_frames <= sent[0]
    grew = memory.get("during", memory["before"]) - memory["before"]
    assert grew < 64 * 1024 * 1024, f"worker p1 grew by {grew / 1e6:.0f} MB"
