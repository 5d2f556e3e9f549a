"""Service classes for the services tests (replicas import them from tests/)."""

from __future__ import annotations

import os
from typing import Any

from hiocluster.service import TcpService


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
