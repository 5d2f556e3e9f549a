"""Gaps a worker written from docs/protocol.md alone found in the protocol's edges.

* a neighbour's over-large acknowledgement is blamed on the neighbour that sent
  it, naming the field (not on the worker that received it);
* a PEER that arrives before the receiver has its own SETUP is held, not refused,
  and judged once SETUP names the neighbours;
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zmq

from hiocluster import protocol as proto
from hiocluster import supervisor
from hiocluster.errors import RunFailed
from hiocluster.peers import PeerSockets
from hiocluster.topology import loads
from hiocluster.transport import CREDENTIALS_ENV, Context, Credentials

from conftest import REPO, connect_ready, hiocluster_command
from tests.fake_worker import FAKE_COMMAND
from tests.faulty import FAULTY, ring_toml
from tests.test_cluster_windows import HandSupervisor
from tests.waiting import wait_until

TOKEN = b"k" * 16


def ring3(ticks: int = 20) -> str:
    """Three workers in a ring a -> b -> c -> a, one node each (p0, p1, p2)."""
    return ring_toml({name: {} for name in "abc"}, {"p0": ["a"], "p1": ["b"], "p2": ["c"]},
                     ticks=ticks)


def run(text: str, **kwargs: Any) -> supervisor.RunResult:
    return supervisor.run(loads(text), app_dir=str(REPO), handle_signals=False, **kwargs)


# -- 1. a bad acknowledgement is its sender's fault ------------------------------------


def test_an_over_large_ack_is_blamed_on_the_neighbour_that_sent_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_WORKER", f"p1:bad-ack:{tmp_path / 'fake.json'}")
    with pytest.raises(RunFailed) as info:
        run(ring3(), worker_command=FAKE_COMMAND)
    error = info.value
    # p1 acknowledged 10**6 messages on the link a -> b; p0 received it and says so
    assert (error.worker, error.nodes) == ("p1", ("b",)), str(error)
    assert "sent p0 an invalid DATA frame" in error.cause
    assert "DATA.acks[0][1]" in error.cause and "1000000" in error.cause


# -- 2. a PEER before the receiver's own SETUP is held --------------------------------


def _dealer(context: zmq.Context, address: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    connect_ready(sock, address)
    return sock


def test_a_peer_before_setup_is_held_and_admitted_once_setup_names_it(tmp_path: Path) -> None:
    context, ours = zmq.Context(), Context()
    p1_inbox = context.socket(zmq.ROUTER)
    p1_inbox.setsockopt(zmq.LINGER, 0)
    p1_inbox.bind(f"ipc://{tmp_path}/d-p1")
    try:
        peers = PeerSockets(ours, f"ipc://{tmp_path}/d-p0", "p0", TOKEN)
        early = _dealer(context, peers.address)
        stranger = _dealer(context, peers.address)
        early.send(proto.encode(proto.Peer(worker="p1", token=TOKEN)))
        stranger.send(proto.encode(proto.Peer(worker="p2", token=b"wrong")))
        for _ in range(2):  # both read before SETUP
            wait_until(lambda: peers.socket.poll(0), 30, "a frame on p0's data socket")
            peers.take_one()
        assert peers.refused == 1  # the stranger's wrong token, at once; p1's is held
        accepted: list[tuple[str, bytes]] = []
        exchange = SimpleNamespace(neighbours=("p1",),
                                   accept=lambda source, raw: accepted.append((source, raw)))
        peers.connect(exchange, {"p1": f"ipc://{tmp_path}/d-p1"}, {})  # type: ignore[arg-type]
        data = proto.encode(proto.Data(tick=0, source="p1", messages=[], acks=[]))
        early.send(data)
        wait_until(lambda: peers.socket.poll(0), 30, "p1's DATA frame")
        peers.take_one()
        assert accepted == [("p1", data)] and peers.refused == 1
        assert p1_inbox.poll(30_000)  # and p0 said PEER to p1 in turn
        assert proto.decode(p1_inbox.recv_multipart()[1], limit=proto.MAX_DATA_FRAME) == \
            proto.Peer(worker="p0", token=TOKEN)
    finally:
        ours.close(linger=0)
        context.destroy(linger=0)


def test_a_real_worker_holds_a_peer_that_came_before_its_setup(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    boss = HandSupervisor(tmp_path)
    context = zmq.Context()
    p1_inbox = context.socket(zmq.ROUTER)
    p1_inbox.setsockopt(zmq.LINGER, 0)
    p1_address = f"ipc://{tmp_path}/d-p1"
    p1_inbox.bind(p1_address)
    worker = subprocess.Popen(hiocluster_command("worker", "--connect", boss.address,
                                                 "--name", "w0", "--app-dir", str(REPO)),
                              env=dict(cli_env, **{CREDENTIALS_ENV: Credentials(TOKEN).to_json()}))
    try:
        boss.machine = proto.ParentMachine("w0")
        hello = boss.receive()
        assert isinstance(hello, proto.Hello) and hello.data_address
        p1 = _dealer(context, hello.data_address)
        p1.send(proto.encode(proto.Peer(worker="p1", token=TOKEN)))  # before w0's SETUP
        boss.send(proto.Setup(
            t0=0.0, tock=1.0, seed=1, ticks=5, real=False, tick_timeout=10.0,
            peers={"p1": p1_address},
            nodes=[["a", FAULTY, {}, None, None]],
            links=[[0, "a", "out", "x", "in", 4, "w0", "p1"],
                   [1, "x", "out", "a", "in", 4, "p1", "w0"]]))
        assert isinstance(boss.receive(), proto.Ready)
        boss.send(proto.Grant(until=1))
        p1.send(proto.encode(proto.Data(tick=0, source="p1", messages=[[1, [0], [7]]],
                                        acks=[])))
        done = boss.receive()
        while isinstance(done, proto.Progress):
            done = boss.receive()
        assert isinstance(done, proto.Done) and done.until == 1  # it ran tick 1 on p1's frame
        boss.send(proto.Stop(reason="done", drain=False))
        bye = boss.receive()
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        boss.close()
        context.destroy(linger=0)
    assert isinstance(bye, proto.Bye)
    assert bye.stats["rejected"] == 0 and bye.received == {"p1": 1}
