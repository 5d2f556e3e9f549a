"""A worker that breaks the protocol on purpose, run in place of ``hiocluster worker``.

Tests pass ``worker_command=FAKE_COMMAND`` and set ``$FAKE_WORKER`` to
``NAME:MODE:REPORT``: worker NAME is faked, every other worker is the real one.
The fake joins properly (HELLO with the run's token, SETUP, a PEER frame to
each neighbour, READY with records of the right size) and then misbehaves as
MODE says:

* ``garbage``: answers the first GRANT with bytes that are not msgpack;
* ``wrong-done``: a DONE for a tick past the window;
* ``stale-done``: a proper first window, then the same DONE again;
* ``short-digests``: a DONE whose digest records are too short;
* ``bad-progress``: PROGRESS for a tick outside the window;
* ``stranger-waiting``: PROGRESS waiting for a worker that is not its neighbour;
* ``old-hio``: HELLO claims another hio version (start-up must refuse it);
* ``bad-hello``: a malformed HELLO, with the run's token: ``versions.protocol`` is
  the int 2, not the string "2" (start-up must fail at once, naming the field);
* ``error-after-setup``: answers SETUP with ERROR ``worker-error`` and exits;
* ``bad-link``: DATA of tick 0 to the neighbours it feeds, naming a link that does
  not join them;
* ``forged-source``: the same, claiming to come from another worker;
* ``bad-ack``: DATA of tick 0 to its neighbours acknowledging 10**6 messages on
  every link from them (more than were ever in flight; a run with credit_lag = 1,
  where acks travel every tick);
* ``silent``: never says anything (start-up must time out and kill it);
* ``deaf``: ignores SIGTERM, joins, and then never answers anything, STOP included
  (the supervisor must escalate to SIGKILL).

It then waits (at most VERDICT_S per frame) for the verdict (ERROR or STOP),
answers STOP with BYE, and exits 0. Everything it received goes, as JSON, to
REPORT.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from hiocluster import protocol as proto
from hiocluster.cli import main as real_main
from hiocluster.runtime.transport import CREDENTIALS_ENV, Credentials

FAKE_COMMAND = [sys.executable, "-m", "tests.fake_worker"]
#: How long the fake waits for SETUP and GRANT, and then for the verdict.
START_S, VERDICT_S = 30.0, 30.0


class Fake:
    def __init__(self, args: argparse.Namespace, mode: str) -> None:
        self.args, self.mode = args, mode
        self.token = Credentials.from_json(os.environ[CREDENTIALS_ENV]).token
        self.received: list[dict[str, Any]] = []
        self.context = zmq.Context()
        self.control = self.context.socket(zmq.DEALER)
        self.data = self.context.socket(zmq.ROUTER)
        self.outs: dict[str, Any] = {}   # zmq DEALERs, or SEQPACKET sockets (--data local)
        self.listener: socket.socket | None = None

    def next(self, timeout: float = START_S) -> proto.Message | None:
        if not self.control.poll(timeout * 1000):
            self.received.append({"type": "timeout"})
            return None
        message = proto.decode(self.control.recv(), limit=proto.MAX_SETUP_FRAME)
        entry = {"type": message.TYPE}
        if isinstance(message, proto.Error):
            entry.update(code=message.code, field=message.field, detail=message.detail)
        self.received.append(entry)
        return message

    def send(self, message: proto.Message) -> None:
        self.control.send(proto.encode(message))

    def run(self) -> None:
        if self.mode == "silent":
            time.sleep(60)
            return
        if self.mode == "deaf":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.args.data == "local":  # listens (never accepts): neighbours can connect
            path = self.args.connect[len("ipc://"):].rsplit("/", 1)[0] + f"/d-{self.args.name}"
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.listener.bind(path)
            self.listener.listen(16)
            data_address = "unix://" + path
        else:
            self.data.bind(self.args.connect.rsplit("/", 1)[0] + f"/d-{self.args.name}"
                           if self.args.connect.startswith("ipc://") else "tcp://127.0.0.1:*")
            data_address = self.data.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.control.connect(self.args.connect)
        versions = proto.local_versions()
        if self.mode == "old-hio":
            versions["hio"] = "0.0.1"
        elif self.mode == "bad-hello":
            versions["protocol"] = 2  # type: ignore[assignment]
        self.send(proto.Hello(worker=self.args.name, token=self.token, pid=os.getpid(),
                              versions=versions,
                              data_address=data_address))
        setup = self.next()
        if not isinstance(setup, proto.Setup):
            return
        self.setup = setup
        if self.mode == "error-after-setup":
            self.send(proto.Error(code="worker-error", detail="the fake gives up after SETUP"))
            return
        for peer, address in setup.peers.items():
            if address.startswith("unix://"):
                out = self.outs[peer] = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                out.connect(address[len("unix://"):])
            else:
                out = self.outs[peer] = self.context.socket(zmq.DEALER)
                out.setsockopt(zmq.LINGER, 0)
                out.connect(address)
            out.send(proto.encode(proto.Peer(worker=self.args.name, token=self.token)))
        names = sorted(row[0] for row in setup.nodes)
        self.records = b"".join(name.encode() + bytes(proto.DIGEST_SIZE) for name in names)
        self.send(proto.Ready(digests=self.records))
        grant = self.next()
        if self.mode == "deaf":
            while self.next(60) is not None:
                pass
            return
        if isinstance(grant, proto.Grant):
            self.misbehave(grant)
        verdict = grant
        while verdict is not None and not isinstance(verdict, (proto.Error, proto.Stop)):
            verdict = self.next(VERDICT_S)
        if isinstance(verdict, proto.Stop):
            self.send(proto.Bye())

    def misbehave(self, grant: proto.Grant) -> None:
        mode, until = self.mode, grant.until
        if mode == "garbage":
            self.control.send(b"\xc1 this is not msgpack")
        elif mode == "wrong-done":
            self.send(proto.Done(until=until + 5, digests=self.records * (until + 6)))
        elif mode == "stale-done":
            done = proto.Done(until=until, digests=self.records * (until + 1))
            self.send(done)
            self.next()  # the next GRANT
            self.send(done)
        elif mode == "short-digests":
            self.send(proto.Done(until=until, digests=self.records[:-1] * (until + 1)))
        elif mode == "bad-progress":
            self.send(proto.Progress(tick=until + 3, waiting=[]))
        elif mode == "stranger-waiting":
            self.send(proto.Progress(tick=None, waiting=["nobody"]))
        elif mode == "bad-ack":  # acknowledges 10**6 messages on each link into it
            if self.setup.credit_lag != 1:  # else its first ack frame is for tick lag-1,
                raise ValueError("the bad-ack fake needs credit_lag = 1")  # not tick 0
            for peer, out in self.outs.items():
                acks = [[row[0], 10**6] for row in self.setup.links
                        if row[6] == peer and row[7] == self.args.name]
                out.send(proto.encode(proto.Data(tick=0, source=self.args.name, messages=[],
                                                 acks=acks)))
        elif mode in ("bad-link", "forged-source"):
            source = "p0" if mode == "forged-source" else self.args.name
            messages = [] if mode == "forged-source" else [[10**6, [0], ["x"]]]
            for peer, out in self.outs.items():  # those it feeds: they expect its tick 0
                if any(row[6] == self.args.name and row[7] == peer for row in self.setup.links):
                    out.send(proto.encode(proto.Data(tick=0, source=source,
                                                     messages=messages, acks=[])))
        else:  # pragma: no cover - a test typo
            raise ValueError(f"unknown fake mode {mode!r}")

    def close(self, report: str) -> None:
        Path(report).write_text(json.dumps(self.received))
        for sock in [self.control, self.data, *self.outs.values()]:
            sock.close(linger=1000) if isinstance(sock, zmq.Socket) else sock.close()
        if self.listener is not None:
            os.unlink(self.listener.getsockname())
            self.listener.close()
        self.context.term()


def main(argv: list[str]) -> int:
    name, mode, report = (os.environ.get("FAKE_WORKER", "::").split(":", 2) + ["", ""])[:3]
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("--connect")
    parser.add_argument("--name")
    parser.add_argument("--app-dir")
    parser.add_argument("--run-dir")
    parser.add_argument("--tick-file")
    parser.add_argument("--data", default="zmq")
    args = parser.parse_args(argv)
    if args.name != name:
        return real_main(argv)
    fake = Fake(args, mode)
    try:
        fake.run()
    finally:
        fake.close(report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
