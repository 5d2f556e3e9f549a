"""The ZeroMQ wire under attack and on bad links (docs/protocol.md §1, §7).

* Routing ids: libzmq aborts a process whose ROUTER generates, for an anonymous
  peer, a routing id another peer already chose. Every peer of ours sets its
  own unpredictable id and every process seeds the generator, so claiming the
  ids libzmq would generate (learned from any fresh process) kills nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from hiocluster import supervisor
from hiocluster.topology import loads

from conftest import REPO
from tests.faulty import ring_toml

ATTACK = str(REPO / "tests" / "wire_attack.py")


def ring3(ticks: int = 60) -> str:
    return ring_toml({name: {} for name in "abc"}, {"p0": ["a"], "p1": ["b"], "p2": ["c"]},
                     ticks=ticks)


def run(text: str, **kwargs: Any) -> supervisor.RunResult:
    return supervisor.run(loads(text), app_dir=str(REPO), handle_signals=False, **kwargs)


@pytest.mark.parametrize("target", ["control", "endpoint", "data"])
def test_claiming_the_routing_ids_libzmq_would_generate_kills_nothing(
        target: str, cli_env: dict[str, str]) -> None:
    baseline = run(ring3())
    done = subprocess.run([sys.executable, ATTACK, target], capture_output=True, text=True,
                          timeout=90, env=cli_env)
    assert done.returncode == 0, (f"the run under attack on its {target} socket ended with "
                                  f"{done.returncode}:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["digest"] == baseline.digest
    assert result["claims"] >= 48
    if target == "endpoint":
        assert result["answered"] == [True], "the owner's status went unanswered"
    else:  # the anonymous stranger's frame was refused, not acted on
        assert result["rejected"] == 1
