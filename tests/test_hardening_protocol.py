"""Gaps a worker written from docs/protocol.md alone found in the protocol's edges.

* a neighbour's over-large acknowledgement is blamed on the neighbour that sent
  it, naming the field (not on the worker that received it);
* a PEER that arrives before the receiver has its own SETUP is held, not refused,
  and judged once SETUP names the neighbours;
* a malformed HELLO from a worker of the run (it carries the run's token, or comes
  with the worker's CURVE key) fails the run at once naming the field, instead of
  a wait for a valid HELLO; a stranger's is refused and the run goes on;
* a worker started by hand that answered ERROR (or was refused, or never joined)
  is not waited for: nobody can see its process end, and it will say nothing more;
* the control endpoint answers every bad command, a multipart one included, with
  ANSWER ``ok: false`` saying what was wrong (docs/protocol.md §12);
* docs/protocol.md's tables of HELLO versions and of the run directory's entries
  are what the code does.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
import zmq

from hiocluster import protocol as proto
from hiocluster.supervision import supervisor
from hiocluster.errors import RunFailed
from hiocluster.worker.dataplane import PeerSockets
from hiocluster.supervision.runcore import Phase
from hiocluster.topology import loads
from hiocluster.runtime.transport import CREDENTIALS_ENV, Context, Credentials

from conftest import REPO, connect_ready, hiocluster_command
from tests.fake_worker import FAKE_COMMAND
from tests.faulty import FAULTY, ring_toml
from tests.test_cluster_windows import HandSupervisor
from tests.test_runcore import Run
from tests.test_runcore import TOKEN as RUN_TOKEN
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
        run(ring3().replace("[run]\n", "[run]\ncredit_lag = 1\n"),
            worker_command=FAKE_COMMAND)
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


# -- 3. a malformed HELLO: a worker of the run's fails the run, a stranger's does not ---


class StartRun(Run):
    """tests.test_runcore's Run, where a worker that never said HELLO (a malformed
    one, or none) reads what the core sends it without a machine of its own."""

    def flush(self) -> None:
        for worker, frame in self.core.outbox:
            if self.machines[worker].state is proto.ChildState.START:
                self.inbox[worker].append(proto.decode(frame, limit=proto.MAX_SETUP_FRAME))
        self.core.outbox[:] = [(worker, frame) for worker, frame in self.core.outbox
                               if self.machines[worker].state is not proto.ChildState.START]
        super().flush()


def _bad_hello(worker: str = "w1", token: bytes | None = RUN_TOKEN) -> bytes:
    """A HELLO whose ``versions.protocol`` is the int 2 (the spec says the string "2")."""
    body: dict[str, Any] = {"worker": worker, "pid": 1,
                            "versions": dict(proto.local_versions(), protocol=2),
                            "data_address": f"ipc:///tmp/d-{worker}"}
    if token is not None:
        body["token"] = token
    return msgpack.packb([proto.VERSION, "HELLO", body], use_bin_type=True)


@pytest.mark.parametrize("sender, token", [(None, RUN_TOKEN),   # ipc: its token proves it
                                           ("w1", None)])       # tcp: its CURVE key does
def test_a_malformed_hello_from_a_worker_of_the_run_fails_the_run_naming_the_field(
        sender: str | None, token: bytes | None) -> None:
    run = StartRun(stop_timeout=60.0)
    run.hello("w0")
    joined, reply = run.core.admit([b"id", _bad_hello("w1", token)], sender)
    assert (joined, reply) == ("w1", None)
    run.core.receive("w1", _bad_hello("w1", token), run.now)
    run.flush()
    failure = run.core.failure
    field = "HELLO.versions.protocol" if token else "HELLO.token"
    assert isinstance(failure, RunFailed) and failure.worker == "w1", failure
    assert failure.tick is None and field in failure.cause
    error = run.last("w1")
    assert isinstance(error, proto.Error) and (error.code, error.field) == ("bad-field", field)
    assert run.core.phase is Phase.STOPPING  # at once: no 60 s wait for a valid HELLO


@pytest.mark.parametrize("frame, field", [
    (_bad_hello("w1", b"wrong"), "HELLO.versions.protocol"),   # the run's token it is not
    (_bad_hello("w1", None), "HELLO.token"),                   # no token at all
    (_bad_hello("w9"), "HELLO.versions.protocol"),             # no worker of the run
    (msgpack.packb([proto.VERSION, "READY", {"worker": "w1", "token": RUN_TOKEN}],
                   use_bin_type=True), "type"),               # not a HELLO
])
def test_a_malformed_hello_from_a_stranger_is_refused_and_the_run_goes_on(
        frame: bytes, field: str) -> None:
    run = StartRun()
    joined, reply = run.core.admit([b"id", frame])
    assert joined is None and reply is not None
    assert proto.decode(reply).field == field  # type: ignore[attr-defined]
    assert run.core.failure is None and run.core.rejected == 1
    run.start()  # w1 itself joins as usual
    assert run.core.phase is Phase.RUNNING


def test_a_malformed_hello_from_an_already_joined_worker_stays_a_strangers() -> None:
    run = StartRun()
    run.hello("w1")
    joined, reply = run.core.admit([b"other", _bad_hello("w1")])
    assert joined is None and reply is not None and run.core.failure is None


# -- 4. a worker started by hand is not waited for once it can say nothing more ---------


def test_a_worker_started_by_hand_that_answered_error_is_not_waited_for() -> None:
    run = StartRun(stop_timeout=60.0, external=["w1"])
    run.start()
    run.say("w1", proto.Error(code="worker-error", detail="it gives up"))
    for worker in ("w0", "w2"):
        assert isinstance(run.last(worker), proto.Stop)
        run.say(worker, proto.Bye())
    assert run.core.finished  # at once: not after the 60 s stop deadline
    failure = run.core.failure
    assert isinstance(failure, RunFailed) and failure.worker == "w1"
    assert failure.cause == "worker-error: it gives up"


def test_a_started_worker_that_answered_error_is_still_waited_for_until_it_exits() -> None:
    run = StartRun(stop_timeout=60.0)
    run.start()
    run.say("w1", proto.Error(code="worker-error", detail="it gives up"))
    for worker in ("w0", "w2"):
        run.say(worker, proto.Bye())
    assert not run.core.finished  # its process is there to watch: it exits by itself
    run.core.exited("w1", 1, run.now)
    assert run.core.finished


def test_a_worker_started_by_hand_that_never_joined_is_not_waited_for() -> None:
    run = StartRun(stop_timeout=60.0, external=["w2"])
    run.hello("w0")
    run.hello("w1", versions=dict(proto.local_versions(), hio="0.0.1"))  # w1 is refused
    run.core.exited("w1", 1, run.now)
    run.say("w0", proto.Bye())
    assert run.core.finished
    assert isinstance(run.core.failure, RunFailed) and run.core.failure.worker == "w1"


def test_a_worker_started_by_hand_stuck_at_start_is_not_said_to_be_killed() -> None:
    run = StartRun(start_timeout=5.0, external=["w2"])
    run.hello("w0")
    run.hello("w1")
    run.core.poll(run.now + 6.0)
    failure = run.core.failure
    assert isinstance(failure, RunFailed) and failure.worker == "w2"
    assert "started by hand: not killed" in failure.cause


# -- the same with real processes: the worker started by hand is a fake one -------------


def _run_with_a_hand_started_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    mode: str, *, start_s: float, stop_s: float,
                                    bound: float = 30.0) -> dict[str, Any]:
    """ring3 with p1 started by hand as tests.fake_worker in ``mode`` (see
    tests/external_run.py); the outcome, which must come within ``bound`` seconds."""
    topology = tmp_path / "ring.toml"
    topology.write_text(ring3())
    monkeypatch.setenv("FAKE_WORKER", f"p1:{mode}:{tmp_path / 'fake.json'}")
    driver = subprocess.Popen([sys.executable, "-m", "tests.external_run", str(topology), "p1",
                               str(start_s), str(stop_s)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        out, _ = driver.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)  # it and the fake; its workers orphan out
        driver.communicate()
        raise AssertionError(f"the run did not end within {bound:g} s") from None
    assert driver.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def test_a_hand_started_worker_with_a_malformed_hello_fails_the_run_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outcome = _run_with_a_hand_started_worker(tmp_path, monkeypatch, "bad-hello",
                                              start_s=60.0, stop_s=60.0)
    assert (outcome.get("failure"), outcome.get("worker")) == ("RunFailed", "p1"), outcome
    assert "HELLO.versions.protocol" in outcome["cause"]
    received = json.loads((tmp_path / "fake.json").read_text())
    assert [(entry["type"], entry.get("field")) for entry in received] == [
        ("ERROR", "HELLO.versions.protocol")]


def test_a_hand_started_worker_that_answered_error_ends_the_run_promptly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outcome = _run_with_a_hand_started_worker(tmp_path, monkeypatch, "error-after-setup",
                                              start_s=60.0, stop_s=60.0)
    assert (outcome.get("failure"), outcome.get("worker")) == ("RunFailed", "p1"), outcome
    assert outcome["cause"] == "worker-error: the fake gives up after SETUP"


def test_strangers_malformed_hellos_are_refused_while_the_run_goes_on() -> None:
    text = ring3()
    baseline = run(text)
    context = zmq.Context()
    strangers: list[zmq.Socket] = []

    def on_listening(sup: supervisor.Supervisor) -> None:
        for frame in (_bad_hello("p1", b"wrong"), _bad_hello("p1", None)):
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            connect_ready(sock, sup.control_address)
            sock.send(frame)
            strangers.append(sock)

    try:
        result = run(text, on_listening=on_listening)
        replies = [proto.decode(sock.recv()) if sock.poll(30_000) else None
                   for sock in strangers]
    finally:
        context.destroy(linger=0)
    assert result.digest == baseline.digest and result.rejected_frames == 2
    assert [(reply.code, reply.field) for reply in replies] == [  # type: ignore[union-attr]
        ("bad-field", "HELLO.versions.protocol"), ("bad-field", "HELLO.token")]


# -- 5. the control endpoint's answers to bad commands -----------------------------------


def test_the_control_endpoint_answers_every_bad_command_and_the_run_goes_on(
        cli_env: dict[str, str]) -> None:
    """p1 is started by hand only once the endpoint has answered: the run waits for it."""
    answers: list[proto.Message | None] = []
    hand: list[subprocess.Popen] = []
    asks = [[b"two", b"frames"], [b"\xc1"], [proto.encode(proto.Answer(ok=True, detail=""))],
            [proto.encode(proto.Command(command="scale", service="web", replicas=2))],
            [proto.encode(proto.Command(command="status"))]]

    def ask(sup: supervisor.Supervisor) -> None:
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, proto.MAX_CONTROL_FRAME)
        try:
            sock.connect(sup.endpoint_address)
            for frames in asks:
                sock.send_multipart(frames)
                answers.append(proto.decode(sock.recv()) if sock.poll(30_000) else None)
        finally:
            context.destroy(linger=0)
            argv = shlex.split(sup.worker_command_line("p1"))
            hand.append(subprocess.Popen([sys.executable, "-m", *argv], env=cli_env))

    asking: list[threading.Thread] = []

    def on_listening(sup: supervisor.Supervisor) -> None:
        asking.append(threading.Thread(target=ask, args=(sup,)))
        asking[0].start()

    try:
        result = run(ring3(), external=["p1"], on_listening=on_listening)
    finally:
        for thread in asking:
            thread.join(timeout=60)
        _reap(hand)
    assert result.ticks == 20
    assert all(isinstance(answer, proto.Answer) for answer in answers), answers
    details = [(answer.ok, answer.detail) for answer in answers]  # type: ignore[union-attr]
    assert details[:4] == [
        (False, "bad command: frame: expected one frame, got 2"),
        (False, details[1][1]), (False, details[2][1]), (False, "this run has no services")]
    assert details[1][1].startswith("bad command: frame: not valid msgpack")
    assert details[2][1].startswith("bad command: type: unknown or unexpected message type")
    status = answers[4].status  # type: ignore[union-attr]
    assert details[4][0] and status["simulation"]["workers"]["p1"] == "await_hello"


# -- 6. the docs' tables are the code's ------------------------------------------------

DOCS = REPO / "docs" / "protocol.md"


def _doc_rows(heading: str, columns: int) -> list[list[str]]:
    """The body rows of the first table after ``heading`` with ``columns`` cells."""
    section = DOCS.read_text(encoding="utf-8").split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.strip().startswith("|") and len(cells) == columns:
            rows.append(cells)
        elif rows:
            break
    return [row for row in rows[1:] if not set(row[0]) <= {"-", " "}]


def test_docs_hello_versions_table_is_what_a_worker_sends() -> None:
    rows = {key.strip("`"): (pattern.strip("`"), example.split("`")[1])
            for key, pattern, _, example in _doc_rows("### HELLO versions", 4)}
    ours = proto.local_versions()
    assert set(rows) == set(ours)
    for key, (pattern, example) in rows.items():
        assert re.fullmatch(pattern, ours[key]), (key, pattern, ours[key])
        assert re.fullmatch(pattern, example), (key, pattern, example)
    assert ours["protocol"] == str(proto.VERSION)


def test_docs_run_directory_table_names_every_entry(cli_env: dict[str, str]) -> None:
    documented = ["[^/]+".join(map(re.escape, re.split(r"<[a-z]+>", entry.strip("`"))))
                  for entry, _, _ in _doc_rows("There is no token file", 3)]
    seen: list[str] = []
    hand: list[subprocess.Popen] = []

    def on_listening(sup: supervisor.Supervisor) -> None:  # p1 is started by hand
        argv = shlex.split(sup.worker_command_line("p1"))
        hand.append(subprocess.Popen([sys.executable, "-m", *argv], env=cli_env))

    def on_ready(sup: supervisor.Supervisor) -> None:
        assert sup.run_dir is not None
        seen.extend(sorted(os.listdir(sup.run_dir)))

    try:
        run(ring3(), external=["p1"], on_listening=on_listening, on_ready=on_ready)
    finally:
        _reap(hand)
    assert "p1.credentials" in seen and "t-p0" in seen and "d-p2" in seen, seen
    assert "t-p1" not in seen  # nobody here registers the ticks of a worker started by hand
    for entry in seen:
        assert any(re.fullmatch(pattern, entry) for pattern in documented), (entry, documented)


def _reap(processes: list) -> None:
    """Wait for each hand-started process (30 s), killing one that stays."""
    for process in processes:
        try:
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
