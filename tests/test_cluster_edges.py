"""Edge cases found in review, each once a bug: fractional tocks, raising exit
contexts, failing state()/sys.exit in nodes, payloads that pack but do not
unpack, unhashable names from hostile peers, links to missing boxes through the
API, an unusable run root.

Nodes used by the end-to-end tests live here and are imported by workers as
``tests.test_cluster_edges:<Name>`` (app dir: the repo root).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from hiocluster import protocol as proto
from hiocluster import supervisor
from hiocluster.errors import FrameError, NodeError, TopologyError
from hiocluster.node import Node
from hiocluster.topology import loads

REPO = Path(__file__).resolve().parent.parent
HERE = "tests.test_cluster_edges"


def run(text: str, **kwargs: Any) -> supervisor.RunResult:
    return supervisor.run(loads(text), app_dir=str(REPO), handle_signals=False, **kwargs)


# ---------------------------------------------------------------------------
# nodes


class StepCounter(Node):
    """Counts how many times step() ran."""

    def setup(self) -> None:
        self.steps = 0

    def step(self) -> None:
        self.steps += 1

    def state(self) -> Any:
        return self.steps

    def metrics(self) -> dict[str, int]:
        return {"steps": self.steps}


class ExitMarker(Node):
    """Writes ``<marker_dir>/<name>`` when its hio exit context runs; raises there
    too if ``params.raise``."""

    def exit(self, deeds: Any = None) -> None:  # type: ignore[override]
        super().exit(deeds)
        if deeds is None:
            (Path(self.params["marker_dir"]) / self.name).write_text("exit")
            if self.params.get("raise"):
                raise ValueError(f"exit boom in {self.name}")


class BadState(Node):
    """state() raises from tick 2 on."""

    def state(self) -> Any:
        if self.tick >= 2:
            raise ValueError("state boom")
        return self.tick


class SysExit(Node):
    """Calls sys.exit(0) in step() at tick 2."""

    def step(self) -> None:
        if self.tick == 2:
            sys.exit(0)


class TupleKeySender(Node):
    """Puts a payload msgpack packs but cannot unpack (a map with an array key)."""

    outboxes = ("out",)

    def step(self) -> None:
        if self.tick == 1:
            self.outbox["out"].put({(1, 2): 3})


class Sink(Node):
    inboxes = ("in",)

    def step(self) -> None:
        self.inbox["in"].drain()


class PutsOnExit(Node):
    """Puts one message per tick, and three more in its hio exit context."""

    outboxes = ("out",)

    def step(self) -> None:
        self.outbox["out"].put(self.tick)

    def exit(self, deeds: Any = None) -> None:  # type: ignore[override]
        super().exit(deeds)
        if deeds is None:
            for value in range(3):
                self.outbox["out"].put(-value)


class BadMetrics(Node):
    def metrics(self) -> dict[str, int]:
        return {"fraction": 0.5}  # type: ignore[dict-item]


# ---------------------------------------------------------------------------
# 1. float tock: nodes silently skip ticks


def test_every_node_steps_once_per_tick_with_a_fractional_tock() -> None:
    text = f"""
[run]
ticks = 30
tock = 0.1

[nodes.a]
class = "{HERE}:StepCounter"
"""
    result = run(text)
    assert result.metrics == {"steps": 30}


# ---------------------------------------------------------------------------
# 2. one node's exit() raising skips its siblings' exit contexts


def test_a_raising_exit_does_not_skip_sibling_exits(tmp_path: Path) -> None:
    text = f"""
[run]
ticks = 3

[nodes.a]
class = "{HERE}:ExitMarker"
params = {{ marker_dir = "{tmp_path}" }}

[nodes.b]
class = "{HERE}:ExitMarker"
params = {{ marker_dir = "{tmp_path}", raise = true }}
"""
    with pytest.raises(Exception):
        run(text, processes=1)
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


# ---------------------------------------------------------------------------
# 3. state() raising is not a NodeError and does not name the node


def test_state_raising_is_a_node_error_naming_the_node() -> None:
    text = f"""
[run]
ticks = 5

[nodes.a]
class = "{HERE}:BadState"

[nodes.b]
class = "{HERE}:StepCounter"
"""
    with pytest.raises(NodeError) as caught:
        run(text, processes=1)
    assert caught.value.nodes == ("a",)
    assert caught.value.cause == "ValueError: state boom"


# ---------------------------------------------------------------------------
# 4. sys.exit() in a node


def test_sys_exit_in_a_node_names_the_node_and_runs_sibling_exits(tmp_path: Path) -> None:
    text = f"""
[run]
ticks = 5

[nodes.a]
class = "{HERE}:ExitMarker"
params = {{ marker_dir = "{tmp_path}" }}

[nodes.b]
class = "{HERE}:SysExit"
"""
    with pytest.raises(NodeError) as caught:
        run(text, processes=1)
    assert caught.value.nodes == ("b",)
    assert caught.value.tick == 2
    assert (tmp_path / "a").exists()


# ---------------------------------------------------------------------------
# 5. a payload that packs but cannot be unpacked


def test_unround_trippable_payload_fails_fast_naming_the_sender() -> None:
    text = f"""
[run]
ticks = 5
tick_timeout = 3

[nodes.a]
class = "{HERE}:TupleKeySender"

[nodes.b]
class = "{HERE}:Sink"

[[links]]
from = "a.out"
to = "b.in"
"""
    with pytest.raises(NodeError) as caught:
        run(text, processes=2)
    assert caught.value.nodes == ("a",)
    assert "a.out -> b.in" in caught.value.detail


# ---------------------------------------------------------------------------
# 6. unhashable values where a name is expected crash the decoder


@pytest.mark.parametrize("frame, field", [
    ([1, "HELLO", {"process": [1], "pid": 1, "data_address": "ipc:///x", "nodes": []}],
     "HELLO.process"),
    ([1, "HELLO", {"process": "a", "pid": 1, "data_address": "ipc:///x", "nodes": [{}]}],
     "HELLO.nodes[0]"),
    ([1, "TOCK", {"n": 0, "sent": [[1]], "digests": {}}], "TOCK.sent[0]"),
    ([1, "DATA", {"tick": 0, "source": [1], "messages": [], "acks": []}], "DATA.source"),
])
def test_unhashable_name_field_is_a_frame_error(frame: list[Any], field: str) -> None:
    data = msgpack.packb(frame, use_bin_type=True)
    decode = proto.decode_data if frame[1] == "DATA" else proto.decode
    with pytest.raises(FrameError) as caught:
        decode(data)
    assert caught.value.field == field
    assert caught.value.code == "bad-field"


def test_stranger_with_unhashable_hello_cannot_kill_the_run() -> None:
    text = f"""
[run]
ticks = 30

[nodes.a]
class = "{HERE}:StepCounter"
"""
    context = zmq.Context()
    sockets: list[zmq.Socket] = []

    def on_ready(sup: supervisor.Supervisor) -> None:
        stranger = context.socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        stranger.connect(sup.control_address)
        sockets.append(stranger)
        stranger.send(msgpack.packb([1, "HELLO", {"process": [1], "pid": 1,
                                                  "data_address": "ipc:///x", "nodes": []}]))

    try:
        result = run(text, on_ready=on_ready)
    finally:
        for sock in sockets:
            sock.close(linger=0)
        context.term()
    assert result.ticks == 30
    assert result.rejected_frames == 1


# ---------------------------------------------------------------------------
# 7. the Python API does not check boxes


def test_api_run_with_a_missing_box_raises_topology_error() -> None:
    text = f"""
[nodes.a]
class = "{HERE}:Sink"

[nodes.b]
class = "{HERE}:Sink"

[[links]]
from = "a.out"
to = "b.in"
"""
    with pytest.raises(TopologyError) as caught:
        run(text)
    assert caught.value.key_path == "links[0].from"


# ---------------------------------------------------------------------------
# 8. CLI: an unusable run root gives a traceback and no JSON


def test_cli_unusable_run_root_is_a_clean_json_failure(cli_env: dict[str, str],
                                                         tmp_path: Path) -> None:
    env = dict(cli_env, HIOCLUSTER_RUN_ROOT=str(tmp_path / "missing" / "dir"))
    done = subprocess.run([sys.executable, "-m", "hiocluster", "run", "topologies/ring.toml",
                           "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "error" in json.loads(done.stdout)


# ---------------------------------------------------------------------------
# messages put in exit contexts are counted, never dropped unseen; bad metrics


@pytest.mark.parametrize("processes", [1, 2])
def test_puts_in_exit_contexts_are_counted_as_undelivered(processes: int) -> None:
    result = run(f"""
[run]
ticks = 5
[nodes.a]
class = "{HERE}:PutsOnExit"
[nodes.b]
class = "{HERE}:Sink"
[[links]]
from = "a.out"
to = "b.in"
""", processes=processes)
    assert result.messages == 5 + 3
    assert result.undelivered == 1 + 3  # the last tick's message, and the three from exit


def test_bad_metrics_name_the_node() -> None:
    with pytest.raises(NodeError) as info:
        run(f"""
[run]
ticks = 3
[nodes.ok]
class = "{HERE}:StepCounter"
[nodes.odd]
class = "{HERE}:BadMetrics"
[placement]
p0 = ["ok", "odd"]
""")
    assert info.value.nodes == ("odd",) and "0.5" in info.value.cause + info.value.detail
