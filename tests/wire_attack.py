"""A run under the routing-id attack, in a process of its own (libzmq's assert
aborts whatever process it fires in): ``python tests/wire_attack.py TARGET``.

The attacker learns the routing ids libzmq gives anonymous peers the way anyone
can: a fresh process of plain pyzmq names its ROUTERs' first anonymous peers
(``0x00`` + a counter drawn from an unseeded ``rand()``). It claims the next
ids of each with DEALERs that set ROUTING_ID, then connects anonymously (or,
for the endpoint, waits for the owner's ``hiocluster status``). TARGET: the
supervisor's ``control`` socket, the run's ``endpoint``, or worker p1's
``data`` socket. Prints the run's result as JSON; a run that survives exits 0.

Used by tests/test_hardening_wire.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import zmq

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from conftest import connect_ready  # noqa: E402
from hiocluster.control import client as control  # noqa: E402
from hiocluster.supervision import supervisor
from hiocluster import protocol as proto  # noqa: E402
from hiocluster.topology import loads  # noqa: E402

from faulty import ring_toml  # noqa: E402

#: How many ROUTERs' first ids the attacker learns, and how many ids after each it claims.
ROUTERS, AHEAD = 6, 8

PROBE = f"""
import zmq
context, ids = zmq.Context(), []
for index in range({ROUTERS}):
    router = context.socket(zmq.ROUTER); router.bind(f"inproc://r{{index}}")
    dealer = context.socket(zmq.DEALER); dealer.connect(f"inproc://r{{index}}")
    dealer.send(b"?"); ids.append(router.recv_multipart()[0].hex())
print(" ".join(ids))
"""


def generated_ids() -> list[int]:
    """The counters libzmq starts its ROUTERs at in an unseeded process."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return [int(text, 16) for text in out.split()]


def attack(context: zmq.Context, address: str, anonymous: bool) -> list[zmq.Socket]:
    """Claim the ids libzmq would give the next anonymous peers of ``address``;
    then (``anonymous``) be one."""
    sockets = []
    for start in generated_ids():
        for step in range(AHEAD):
            claim = context.socket(zmq.DEALER)
            claim.setsockopt(zmq.LINGER, 0)
            claim.setsockopt(zmq.ROUTING_ID, b"\0" + ((start + step) % 2**32).to_bytes(4, "big"))
            sockets.append(claim)
            connect_ready(claim, address)  # so that its id is taken before the next one comes
    if anonymous:
        stranger = context.socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        connect_ready(stranger, address)
        stranger.send(b"\xc1 an anonymous stranger")
        sockets.append(stranger)
    return sockets


def main(target: str) -> int:
    text = ring_toml({name: {} for name in "abc"}, {"p0": ["a"], "p1": ["b"], "p2": ["c"]},
                     ticks=60)
    context = zmq.Context()
    sockets: list[zmq.Socket] = []
    answers: list[proto.Answer] = []

    def on_listening(sup: supervisor.Supervisor) -> None:
        if target == "control":  # before any worker joins: theirs are the next ids
            sockets.extend(attack(context, sup.control_address, anonymous=True))

    def on_ready(sup: supervisor.Supervisor) -> None:
        if target == "data":
            hello = sup.core.books["p1"].hello
            assert hello is not None
            sockets.extend(attack(context, hello.data_address, anonymous=True))
        elif target == "endpoint":
            sockets.extend(attack(context, sup.endpoint_address, anonymous=False))
            # the owner asks, from another thread: this one runs the supervisor
            asking = threading.Thread(target=lambda: answers.append(control.ask(
                sup.endpoint_address, proto.Command(command="status"))))
            asking.start()
            threads.append(asking)

    threads: list[threading.Thread] = []
    try:
        result = supervisor.run(loads(text), app_dir=str(REPO), handle_signals=False,
                                window=4, on_listening=on_listening, on_ready=on_ready)
    finally:
        for thread in threads:
            thread.join(30)
        for sock in sockets:
            sock.close(linger=0)
        context.term()
    print(json.dumps({"digest": result.digest, "rejected": result.rejected_frames,
                      "answered": [answer.ok for answer in answers], "claims": len(sockets)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
