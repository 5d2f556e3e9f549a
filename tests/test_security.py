"""CurveZMQ over tcp: who may connect, and who may speak for whom.

Over tcp every socket of a run is CURVE, authenticated by ZAP (zmq.auth) with
ZAP_ENFORCE_DOMAIN. A stranger with no key, or with a key the run does not
know, never gets a frame through (refused, and logged); a worker's own valid
key cannot speak for another worker on the control plane or the data plane.
Every such attempt leaves the run's digest as it was.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from hiocluster import protocol as proto
from hiocluster.supervision import supervisor
from hiocluster.topology import loads
from hiocluster.runtime.transport import KeyPair, write_key_pair

from conftest import REPO, hiocluster_command
from tests.faulty import ring_toml


def ring3(ticks: int = 60) -> str:
    return ring_toml({name: {} for name in "abc"}, {"p0": ["a"], "p1": ["b"], "p2": ["c"]},
                     ticks=ticks)


def run(text: str, tock: float | None = None, **kwargs: Any) -> supervisor.RunResult:
    topology = loads(text)
    if tock is not None:
        topology = topology.replace(tock=tock)
    return supervisor.run(topology, app_dir=str(REPO), handle_signals=False,
                          transport="tcp", keep_digests=True, **kwargs)


class Intruder:
    """Sockets a test points at a run; closed (linger 0) however the test ends."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.sockets: list[zmq.Socket] = []
        self.monitors: dict[zmq.Socket, zmq.Socket] = {}

    def dealer(self, address: str, keys: KeyPair | None = None,
               server: str | None = None) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if keys is not None and server is not None:
            sock.curve_publickey = keys.public.encode()
            sock.curve_secretkey = keys.secret.encode()
            sock.curve_serverkey = server.encode()
        self.monitors[sock] = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        sock.connect(address)
        self.sockets.append(sock)
        return sock

    def handshaken(self, sock: zmq.Socket, timeout: float = 30.0) -> None:
        """Wait (at most ``timeout`` seconds) until ``sock``'s CURVE handshake with the
        run succeeded: from then on what it sends reaches the other end, however soon
        the run ends."""
        monitor = self.monitors[sock]
        assert monitor.poll(timeout * 1000), "the intruder's handshake never succeeded"
        recv_monitor_message(monitor)

    def close(self) -> None:
        for sock in self.sockets:
            sock.disable_monitor()
            sock.close(linger=0)
        for monitor in self.monitors.values():
            monitor.close(linger=0)
        self.context.term()


def test_tcp_runs_are_curve_and_give_the_ipc_digest() -> None:
    reference = supervisor.run(loads(ring3()), app_dir=str(REPO), handle_signals=False,
                               keep_digests=True)
    result = run(ring3())
    assert result.tick_digests == reference.tick_digests


@pytest.mark.parametrize("who", ["no-key", "unknown-key"])
def test_strangers_on_tcp_never_get_a_frame_through(who: str,
                                                    capfd: pytest.CaptureFixture) -> None:
    baseline = run(ring3())
    intruder = Intruder()
    replies: list[Any] = []

    def on_ready(sup: supervisor.Supervisor) -> None:
        keys = KeyPair.generate() if who == "unknown-key" else None
        assert sup.keys is not None
        control = intruder.dealer(sup.control_address, keys, sup.keys.public)
        hello = sup.core.books["p1"].hello
        assert hello is not None and hello.data_address.startswith("tcp://127.0.0.1:")
        data = intruder.dealer(hello.data_address, keys, sup.worker_keys["p1"].public)
        control.send(b"\xc1 garbage")
        control.send(proto.encode(proto.Hello(worker="p9", token=b"x", pid=1, versions={},
                                              data_address="tcp://127.0.0.1:9")))
        data.send(proto.encode(proto.Data(tick=0, source="p0", messages=[[0, [0], [1]]],
                                          acks=[])))
        replies.append(control)

    try:
        result = run(ring3(), on_ready=on_ready)
        silent = replies[0].poll(500) == 0  # not even an ERROR: nothing got through
    finally:
        intruder.close()
    assert silent
    assert result.tick_digests == baseline.tick_digests
    assert result.rejected_frames == 0
    if who == "unknown-key":
        assert "refused a connection with an unknown CURVE key" in capfd.readouterr().err


def test_a_valid_key_cannot_speak_for_another_worker() -> None:
    baseline = run(ring3(), tock=0.05)
    intruder = Intruder()
    answers: list[zmq.Socket] = []

    def on_ready(sup: supervisor.Supervisor) -> None:
        assert sup.keys is not None
        mine = sup.worker_keys["p0"]           # a key the run knows, for p0
        # control plane: p0's key claiming to be p2 joining (it has joined already)
        control = intruder.dealer(sup.control_address, mine, sup.keys.public)
        control.send(proto.encode(proto.Hello(worker="p2", token=sup.token, pid=1,
                                              versions=proto.local_versions(),
                                              data_address="tcp://127.0.0.1:9")))
        answers.append(control)
        # data plane: p0's key saying PEER as p2 to p1 (whose neighbours are p0, p2)
        hello = sup.core.books["p1"].hello
        assert hello is not None
        data = intruder.dealer(hello.data_address, mine, sup.worker_keys["p1"].public)
        data.send(proto.encode(proto.Peer(worker="p2", token=sup.token)))
        for tick in range(3):
            data.send(proto.encode(proto.Data(tick=tick, source="p2", messages=[],
                                              acks=[])))
        # the supervisor's loop waits here until the frames can reach p1: under load
        # a run of 60 ticks could end before this connection was even made
        intruder.handshaken(data)

    try:
        # paced by the wall clock (60 ticks of 0.05 s): p1 runs for 3 s after the
        # frames are sent, so they are refused (and counted) before its BYE however
        # late a loaded machine delivers them (unpaced, stress once saw the last come
        # in as p1 closed: refused and said, but after its count had gone up)
        result = run(ring3(), tock=0.05, real=True, on_ready=on_ready)
        reply = proto.decode(answers[0].recv()) if answers[0].poll(30_000) else None
    finally:
        intruder.close()
    assert result.tick_digests == baseline.tick_digests
    assert isinstance(reply, proto.Error) and reply.code == "unknown-peer"
    assert "cannot speak for 'p2'" in reply.detail
    assert result.rejected_frames == 1 + 4  # the HELLO; the PEER and three DATA frames


def test_keygen_writes_pairs_that_load(tmp_path: Path, cli_env: dict[str, str]) -> None:
    done = subprocess.run(hiocluster_command("keygen", str(tmp_path / "keys"), "supervisor",
                                             "h1"), env=cli_env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    for name in ("supervisor", "h1"):
        secret = tmp_path / "keys" / f"{name}.key_secret"
        assert (secret.stat().st_mode & 0o777) == 0o600
        pair = KeyPair.load(str(secret))
        assert KeyPair.load_public(str(tmp_path / "keys" / f"{name}.key")) == pair.public
    again = subprocess.run(hiocluster_command("keygen", str(tmp_path / "keys"), "h1"),
                           env=cli_env, capture_output=True, text=True, timeout=30)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwrites a key


def test_key_files_are_read_with_clear_errors(tmp_path: Path) -> None:
    public, secret = write_key_pair(str(tmp_path), "x")
    assert KeyPair.load(secret).public == KeyPair.load_public(public)
    with pytest.raises(Exception, match="holds no secret key"):
        KeyPair.load(public)
    with pytest.raises(Exception, match="cannot read"):
        KeyPair.load(str(tmp_path / "missing.key_secret"))

