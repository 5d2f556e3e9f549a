"""Nodes for tests/test_restart.py: Mixers (tests/faulty.py) that can be
checkpointed, one of which ends its own process at a given tick: every time, or
only the first time (a marker file remembers it), as a kill -9 or a hang would."""

from __future__ import annotations

import os
import signal

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
