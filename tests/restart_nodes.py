"""Nodes for tests/test_restart.py: Mixers (tests/faulty.py) that can be
checkpointed, one of which ends its own process at a given tick: every time, or
only the first time (a marker file remembers it), as a kill -9 or a hang would."""

from __future__ import annotations

import os
import signal

from hiocluster.node import Node
from tests.faulty import Mixer


class Crasher(Mixer):
    """params: ``victim`` (the index of the node that crashes), ``at`` (the tick),
    ``how`` ("sigkill": kill -9 of its own process; "sigstop": stops it, a hang),
    ``once`` (a file: crash only while it does not exist, and make it; "" or
    absent: crash every time the tick is reached)."""

    snapshot_attrs = ("mix", "sent", "blocked")

    def step(self) -> None:
        params = self.params
        if self.index == params.get("victim") and self.tick == params.get("at"):
            once = params.get("once", "")
            if not once or not os.path.exists(once):
                if once:
                    with open(once, "x"):
                        pass
                how = signal.SIGSTOP if params.get("how") == "sigstop" else signal.SIGKILL
                os.kill(os.getpid(), how)
        super().step()


class Shouter(Node):
    """Sends ``params.size`` random bytes a tick to each of its targets and counts
    what it hears: records that grow fast (tests/test_replay.py fills a small file
    system with one)."""

    inboxes = ("in",)
    outboxes = ("out",)

    def setup(self) -> None:
        self.heard = 0

    def step(self) -> None:
        inbox = self.inbox["in"]
        while inbox:
            self.heard += len(inbox.get())
        out = self.outbox["out"]
        for target in out.targets:
            out.offer(self.rng.randbytes(int(self.params["size"])), to=target)

    def state(self) -> int:
        return self.heard


class ObservingCrasher(Crasher):
    """A Crasher that says what it mixed and sent each tick (its ``observe()``)."""

    def observe(self) -> dict[str, int]:
        return {"mix": self.mix % 1_000_003, "sent": self.sent}
