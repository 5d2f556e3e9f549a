"""Service classes for the services tests (replicas import them from tests/), and a
simulation node that waits for the test."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hiocluster.service import TcpService
from nodes.ring import RingNode
from waiting import wait_until


class CrashAtStart(TcpService):
    """Exits with code 7 before it serves: every start is a crash."""

    def open(self) -> None:
        print(f"crash-at-start replica {self.replica}: exiting with 7", flush=True)
        os._exit(7)


class Chatty(TcpService):
    """Echoes, and writes a line per message, in two pieces, to stdout (its
    supervisor must still print whole lines, prefixed)."""

    def receive(self, remoter: Any, data: bytes) -> None:
        print(f"replica {self.replica} got", end="", flush=True)
        print(f" {len(data)} bytes", flush=True)
        remoter.tx(data)


class GatedRing(RingNode):
    """A ring node that holds its simulation at tick ``hold_at`` (default 1) until
    the file ``gate`` exists: a test decides when the simulation may end, instead
    of racing a clock. Bounded: after ``hold_s`` seconds (default 50) it fails."""

    def step(self) -> None:
        if self.tick == int(self.params.get("hold_at", 1)):
            gate = Path(self.params["gate"])
            wait_until(gate.exists, float(self.params.get("hold_s", 50.0)),
                       f"the test to open {gate}")
        super().step()
