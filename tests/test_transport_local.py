"""The local data plane (``--transport local``, hiocluster.worker.localnet) end to end.

DATA over Unix-domain SEQPACKET sockets gives the digests ZeroMQ gives, in every
placement, with groups, and for frames long enough to go in fragments; strangers
on a worker's local data socket are refused and counted and change nothing; a
neighbour's hostile frame fails the run naming the field; a run that cannot be
local (other hosts, tcp) is refused naming the flag. The autouse ``no_leaks``
fixture checks that no socket file is left in the run root.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hiocluster import protocol as proto
from hiocluster.supervision import supervisor
from hiocluster.errors import ProcessExited, RunFailed, TopologyError
from hiocluster.runtime.launch import worker_argv
from hiocluster.worker.localnet import CHUNK, MORE, local_path
from hiocluster.node import Node
from hiocluster.runtime.loop import Loop
from hiocluster.topology import Topology, load, loads, plan as make_plan

from conftest import REPO, hiocluster_command
from test_cluster_hostile import _data_junk, ring3
from test_examples import TOPOLOGY_FILES, TEST_TICKS
from tests.fake_worker import FAKE_COMMAND
from tests.faulty import ring_toml

RING = (REPO / "topologies" / "ring.toml").read_text()
ONE = '\n[groups]\ng1 = ["p0", "p1"]\ng2 = ["p2", "p3"]\n'
DEEP = '\n[groups]\ng1 = ["p0", "g2"]\ng2 = ["p1", "g3"]\ng3 = ["p2", "p3"]\n'


def run(topology: Topology | str, **kwargs: Any) -> supervisor.RunResult:
    if isinstance(topology, str):
        topology = loads(topology)
    return supervisor.run(topology, app_dir=str(REPO), handle_signals=False, **kwargs)


def _is_local(sup: supervisor.Supervisor, worker: str) -> str:
    """The local data socket of ``worker`` (asserts it is one, a socket file)."""
    hello = sup.core.books[worker].hello
    assert hello is not None and hello.data_address is not None
    path = local_path(hello.data_address)
    assert path is not None, hello.data_address
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    return path


@pytest.mark.parametrize("path", TOPOLOGY_FILES, ids=[p.stem for p in TOPOLOGY_FILES])
def test_example_digests_equal_on_both_transports(path: Path) -> None:
    topology = load(path)
    topology = topology.replace(ticks=min(topology.ticks, TEST_TICKS))
    reference = run(topology, keep_digests=True)
    seen: list[str] = []
    for processes in sorted({1, min(2, len(topology.nodes)), min(4, len(topology.nodes))}):
        result = run(topology, processes=processes, keep_digests=True, transport="local",
                     on_ready=lambda sup: seen.extend(_is_local(sup, w) for w in sup.children))
        assert result.tick_digests == reference.tick_digests, f"local, {processes} processes"
        assert result.rejected_frames == 0 and result.messages == reference.messages
    assert len(seen) >= 3


@pytest.mark.parametrize("groups", [ONE, DEEP], ids=["groups", "nested"])
def test_groups_on_local_transport_give_the_flat_digest(groups: str) -> None:
    flat = run(RING, keep_digests=True)
    local = run(RING + groups, keep_digests=True, transport="local")
    assert local.groups >= 2 and local.processes == 4
    assert local.tick_digests == flat.tick_digests


def test_run_transport_in_the_file_and_its_errors() -> None:
    text = RING.replace("[run]", '[run]\ntransport = "local"', 1)
    addresses: list[str] = []
    result = run(text, on_ready=lambda sup: addresses.extend(
        _is_local(sup, w) for w in sup.children))
    assert result.digest == run(RING).digest and addresses
    with pytest.raises(TopologyError) as info:
        loads(RING.replace("[run]", '[run]\ntransport = "carrier-pigeon"', 1))
    assert "run.transport" in str(info.value) and "local" in str(info.value)


def test_local_transport_is_refused_across_hosts_and_over_tcp() -> None:
    hosts = RING + '\n[hosts.far]\nagent = "tcp://198.18.0.2:7000"\nworkers = ["p1"]\n'
    with pytest.raises(TopologyError) as info:
        run(hosts, transport="local")
    assert "--transport local" in str(info.value) and "other hosts" in str(info.value)
    with pytest.raises(TopologyError) as info:
        run(RING, transport="local", listen="tcp://127.0.0.1:0")
    assert "--transport local" in str(info.value) and "tcp" in str(info.value)


class BigNode(Node):
    """Sends the next node a payload of ``size`` bytes every tick (fragments on the
    local transport) and keeps a checksum of what it got."""

    inboxes = ("in",)
    outboxes = ("out",)

    def setup(self) -> None:
        self.mix = 0

    def step(self) -> None:
        inbox = self.inbox["in"]
        while inbox:
            blob = inbox.get()
            self.mix = (self.mix * 31 + sum(blob[::997]) + len(blob)) % 1_000_000_007
        self.outbox["out"].put(self.rng.randbytes(int(self.params["size"]) + self.tick))

    def state(self) -> Any:
        return [self.mix]


@pytest.mark.parametrize("size", [CHUNK - 100, 3 * CHUNK + 5, 2_000_000],
                         ids=["about-one-message", "fragments", "megabytes"])
def test_long_frames_travel_in_fragments_with_the_same_digest(size: int) -> None:
    text = ring_toml({name: {"size": size} for name in "abc"}, ticks=6,
                     cls="test_transport_local:BigNode")
    zmq_run = run(text, keep_digests=True)
    local = run(text, keep_digests=True, transport="local")
    assert local.tick_digests == zmq_run.tick_digests and local.messages == zmq_run.messages


def _stranger(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    return sock


def test_strangers_on_a_local_data_socket_are_refused_and_change_nothing() -> None:
    text = ring3(ticks=200)
    baseline = run(text, keep_digests=True)
    strangers: list[socket.socket] = []
    junk = _data_junk(b"\7" * 16)  # garbage, no PEER, wrong token, no neighbour, forgeries
    framing = [[MORE + b"half a frame", b"a whole frame inside a fragmented one"],
               [b"\x92" * (CHUNK + 100)],          # longer than any message may be
               [MORE[:1] + b"\x07 a bad fragment header"]]

    def on_ready(sup: supervisor.Supervisor) -> None:
        path = _is_local(sup, "p1")
        strangers.append(_stranger(path))
        for frame in junk:
            strangers[0].send(frame)
        for messages in framing:  # each breaks the framing: refused, connection closed
            strangers.append(_stranger(path))
            for message in messages:
                strangers[-1].send(message)

    try:
        result = run(text, on_ready=on_ready, keep_digests=True, transport="local")
    finally:
        for sock in strangers:
            sock.close()
    assert len(strangers) == 1 + len(framing), "the junk was never sent"
    assert result.tick_digests == baseline.tick_digests
    assert result.rejected_frames == len(junk) + len(framing)
    assert baseline.rejected_frames == 0


@pytest.mark.parametrize("mode, field", [("bad-link", "DATA.messages[0][0]"),
                                         ("forged-source", "DATA.source"),
                                         ("bad-ack", "DATA.acks[0][1]")])
def test_a_neighbour_sending_bad_data_locally_is_blamed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, field: str) -> None:
    monkeypatch.setenv("FAKE_WORKER", f"p1:{mode}:{tmp_path / 'fake.json'}")
    with pytest.raises(RunFailed) as info:
        run(ring3(ticks=20).replace("[run]\n", "[run]\ncredit_lag = 1\n"),
            worker_command=FAKE_COMMAND, transport="local")
    error = info.value
    assert error.worker == "p1" and error.nodes == ("b",)
    assert "invalid DATA frame" in error.cause and field in error.cause


def test_a_worker_killed_mid_run_is_named(tmp_path: Path) -> None:
    text = ring_toml({"a": {}, "killer": {"fail_at": 3, "fail": "sigkill"}, "b": {}},
                     {"p0": ["a"], "p1": ["killer"], "p2": ["b"]})
    with pytest.raises(ProcessExited) as info:
        run(text, transport="local")
    error = info.value
    assert (error.worker, error.nodes, error.tick) == ("p1", ("killer",), 3)
    assert "SIGKILL" in error.cause


def test_hand_started_and_launched_workers_are_told_the_local_data_plane() -> None:
    topology = loads(RING)
    sup = supervisor.Supervisor(topology, make_plan(topology, None), Loop(),
                                transport="local", external=["p1"])
    assert sup.data == "local" and sup.transport == "ipc"  # control stays on ZeroMQ
    assert worker_argv("ipc:///r/control", "p1", data=sup.data)[-2:] == ["--data", "local"]
    assert "--data" not in worker_argv("ipc:///r/control", "p1")


def test_cli_runs_local_and_refuses_it_across_hosts(cli_env: dict[str, str]) -> None:
    ring = str(REPO / "topologies" / "ring.toml")
    digests = []
    for transport in ("ipc", "local"):
        done = subprocess.run(hiocluster_command("run", ring, "--json", "--transport",
                                                 transport), env=cli_env, cwd=str(REPO),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        digests.append(json.loads(done.stdout)["digest"])
    assert digests[0] == digests[1]
    refused = subprocess.run(hiocluster_command(
        "check", ring, "--transport", "local", "--host", "far=tcp://198.18.0.2:7000",
        "--place", "p1=far"), env=cli_env, cwd=str(REPO), capture_output=True, text=True,
        timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "--transport local" in refused.stderr and "Traceback" not in refused.stderr


def test_local_peers_hold_an_early_peer_until_setup_and_refuse_a_stranger(
        tmp_path: Path) -> None:
    """As the ZeroMQ data plane does (test_hardening_protocol): a neighbour's PEER
    before SETUP is held, a wrong token refused at once, both judged by DataPlane."""
    from types import SimpleNamespace

    from hiocluster.worker.localnet import LocalPeers
    from hiocluster.runtime.transport import Poller
    from tests.waiting import wait_until

    token = b"k" * 16
    p1_inbox = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    p1_inbox.bind(str(tmp_path / "d-p1"))
    p1_inbox.listen(4)
    peers = LocalPeers(f"unix://{tmp_path}/d-p0", "p0", token)
    poller = Poller()
    peers.watch(poller)
    early, stranger = _stranger(peers.path), _stranger(peers.path)
    try:
        early.send(proto.encode(proto.Peer(worker="p1", token=token)))
        stranger.send(proto.encode(proto.Peer(worker="p2", token=b"wrong")))

        def serve() -> bool:
            peers.serve(poller.poll(100))
            return peers.refused == 1 and len(peers.early) == 1

        wait_until(serve, 30, "the early PEER held and the stranger refused")
        accepted: list[tuple[str, bytes]] = []
        exchange = SimpleNamespace(neighbours=("p1",),
                                   accept=lambda source, raw: accepted.append((source, raw)))
        peers.connect(exchange, {"p1": f"unix://{tmp_path}/d-p1"}, {})  # type: ignore[arg-type]
        data = proto.encode(proto.Data(tick=0, source="p1", messages=[], acks=[]))
        early.send(data)
        wait_until(lambda: peers.serve(poller.poll(100)) or accepted, 30, "p1's DATA frame")
        assert accepted == [("p1", data)] and peers.refused == 1
        conn, _ = p1_inbox.accept()  # and p0 said PEER to p1 in turn
        with conn:
            assert proto.decode(conn.recv(4096), limit=proto.MAX_DATA_FRAME) == \
                proto.Peer(worker="p0", token=token)
    finally:
        for sock in (early, stranger, p1_inbox):
            sock.close()
        peers.close(drop=True)
    assert not (tmp_path / "d-p0").exists()
