"""Test-only nodes that misbehave on purpose, and fake worker entry points.

Used by tests/test_cluster_failures.py and tests/test_cluster_hostile.py as
``"tests.faulty:Name"`` class paths and as ``worker_target``.

:class:`FaultyNode` forwards a counter around whatever ring it is linked into
(one message per tick on ``out``, every message taken from ``in``) and, when
``params.fail_at`` is reached, fails the way ``params.fail`` says. With
``params.marker_dir`` it leaves files there that tests read back:

* ``<name>.exit``  lines ``close`` / ``abort <ExcType>`` / ``exit``: which hio
  contexts ran (written when each runs, so a killed process leaves none);
* ``<name>.ticking`` once the node has run tick 1 (lets a test wait until a
  run is really ticking before it signals it).

:func:`ring_toml` writes topologies of such rings inline. Fake workers that
break the protocol on purpose are in tests/fake_worker.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from hiocluster.node import Node

FAULTY = "tests.faulty:FaultyNode"


class FaultyNode(Node):
    """A ring node with exit markers and one configurable fault.

    params:
        marker_dir: where to write ``<name>.exit`` / ``<name>.ticking`` (optional).
        fail_at: the tick at which to fail (default: never); "setup" raises
            ValueError("boom in setup") from setup().
        fail: "raise" (ValueError("boom")), "sigkill" (SIGKILL own process),
            "exit7" (os._exit(7)), "hang" (sleep 60 s), "unsendable" (put a set),
            "nobox" (put into an outbox it lacks).
        sleep: seconds to sleep every tick (slow-ish nodes for signal tests).
        say: a line to write on stderr in setup().
    """

    inboxes = ("in",)
    outboxes = ("out",)
    snapshot_attrs = ("count", "mix")  # tests/test_cluster_hosts.py restarts them

    def setup(self) -> None:
        self.count = 0
        self.mix = 0
        marker_dir = self.params.get("marker_dir")
        self.marker_dir = Path(marker_dir) if marker_dir else None
        self.fail_at = self.params.get("fail_at")
        self.fail = self.params.get("fail", "raise")
        self.sleep = float(self.params.get("sleep", 0.0))
        if self.fail_at == "setup":
            raise ValueError("boom in setup")
        if "say" in self.params:
            print(self.params["say"], file=sys.stderr, flush=True)

    def _mark(self, suffix: str, line: str) -> None:
        if self.marker_dir is not None:
            with open(self.marker_dir / f"{self.name}.{suffix}", "a") as file:
                file.write(line + "\n")

    def step(self) -> None:
        if self.sleep:
            time.sleep(self.sleep)
        if self.tick == 1:
            self._mark("ticking", "1")
        if self.fail_at is not None and self.tick == self.fail_at:
            self._fault()
        inbox = self.inbox["in"]
        while inbox:
            value = inbox.get()
            self.mix = (self.mix * 31 + value) % 1_000_000_007
        out = self.outbox["out"]
        if out.links:
            self.count += 1
            out.put(self.count + self.rng.randrange(100))

    def _fault(self) -> None:
        if self.fail == "raise":
            raise ValueError("boom")
        if self.fail == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fail == "exit7":
            os._exit(7)
        if self.fail == "hang":
            time.sleep(60)
        if self.fail == "unsendable":
            self.outbox["out"].put({1, 2, 3})
        if self.fail == "nobox":
            self.outbox["north"].put(1)

    def state(self) -> Any:
        return [self.count, self.mix]

    # -- hio contexts: record which ran --------------------------------------
    def close(self) -> None:
        self._mark("exit", "close")
        super().close()

    def abort(self, ex: BaseException) -> None:
        self._mark("exit", f"abort {type(ex).__name__}")
        super().abort(ex)

    def exit(self, deeds: Any = None) -> None:  # type: ignore[override]
        super().exit(deeds)
        if deeds is None:
            self._mark("exit", "exit")


# ---------------------------------------------------------------------------
# topologies


def ring_toml(nodes: dict[str, dict[str, Any]], placement: dict[str, list[str]] | None = None,
              *, ticks: int = 20, tick_timeout: float = 10.0, cls: str = FAULTY) -> str:
    """TOML for a ring of ``nodes`` (in the given order: each ``out`` feeds the next ``in``).

    Each node's params dict may carry ``"class"`` to override ``cls``. Without a
    ``placement`` every node gets a worker of its own, named after it.
    """
    if placement is None:
        placement = {name: [name] for name in nodes}
    names = list(nodes)
    lines = ["[run]", f"ticks = {ticks}", "seed = 7", f"tick_timeout = {tick_timeout}", ""]
    for name, given in nodes.items():
        params = dict(given)
        lines += [f"[nodes.{name}]", f"class = {json.dumps(params.pop('class', cls))}"]
        if params:
            inline = ", ".join(f"{key} = {json.dumps(value)}" for key, value in params.items())
            lines.append(f"params = {{ {inline} }}")
        lines.append("")
    for source, target in zip(names, names[1:] + names[:1]):
        lines += ["[[links]]", f'from = "{source}.out"', f'to = "{target}.in"', ""]
    if placement is not None:
        lines.append("[placement]")
        lines += [f"{process} = {json.dumps(members)}" for process, members in placement.items()]
    return "\n".join(lines) + "\n"


def mesh_toml(cls: str, nodes: int, *, ticks: int, seed: int, capacity: int,
              params: str = "", lag: int | None = None, ring: bool = False) -> str:
    """TOML for a full mesh of ``nodes`` nodes of class ``cls`` (globs: every pair),
    or with ``ring`` a one-way ring (lp_i -> lp_i+1, so each worker has neighbours it
    only sends to); ``lag``: the run's credit_lag (default auto)."""
    links = "\n".join(f'[[links]]\nfrom = "lp{i}.out"\nto = "lp{(i + 1) % nodes}.in"\n'
                      for i in range(nodes)) if ring else \
        '[[links]]\nfrom = "lp*.out"\nto = "lp*.in"\n'
    return f"""
[run]
ticks = {ticks}
seed = {seed}
capacity = {capacity}
{f"credit_lag = {lag}" if lag is not None else ""}

[nodes.lp]
class = "{cls}"
count = {nodes}
{f"params = {{ {params} }}" if params else ""}

{links}"""


class Mixer(Node):
    """Order-sensitive traffic for placement tests: folds every message it reads, in
    delivery order, into ``mix``; sends 0-3 random numbers to random peers each tick
    (``offer``: a full link just means fewer sends; counted in ``blocked``)."""

    inboxes = ("in",)
    outboxes = ("out",)

    def setup(self) -> None:
        self.mix = self.sent = self.blocked = 0

    def step(self) -> None:
        inbox = self.inbox["in"]
        while inbox:
            source, value = inbox.get_from()
            self.mix = (self.mix * 1_000_003 + zlib.crc32(source.encode()) + value) % (2**61 - 1)
        out = self.outbox["out"]
        for _ in range(self.rng.randrange(4)):
            if out.offer(self.rng.randrange(1000), to=self.rng.choice(out.targets)):
                self.sent += 1
            else:
                self.blocked += 1

    def state(self) -> list[int]:
        return [self.mix, self.sent, self.blocked]
