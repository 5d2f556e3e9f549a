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

from conftest import REPO, connect_ready
from hiocluster import protocol as proto

V = proto.VERSION
from hiocluster.supervision import supervisor
from hiocluster.errors import FrameError, NodeError, TopologyError
from hiocluster.node import Node
from hiocluster.topology import loads

HERE = "tests.test_cluster_edges"


def run(text: str, **kwargs: Any) -> supervisor.RunResult:
    return supervisor.run(loads(text), app_dir=str(REPO), handle_signals=False, **kwargs)


def topology(nodes: dict[str, str | tuple[str, dict[str, Any]]], links: tuple[str, ...] = (),
             **settings: Any) -> str:
    """TOML for ``nodes`` (name: class in this module, or (class, params)), ``links``
    like "a.out -> b.in", and ``[run]`` settings."""
    lines = ["[run]"] + [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    for name, spec in nodes.items():
        cls, params = (spec, {}) if isinstance(spec, str) else spec
        lines += [f"[nodes.{name}]", f'class = "{HERE}:{cls}"']
        if params:
            inline = ", ".join(f"{key} = {json.dumps(value)}" for key, value in params.items())
            lines.append(f"params = {{ {inline} }}")
    for link in links:
        source, target = link.split(" -> ")
        lines += ["[[links]]", f'from = "{source}"', f'to = "{target}"']
    return "\n".join(lines) + "\n"


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
# hio's clock: with a fractional tock every node still steps once per tick


def test_every_node_steps_once_per_tick_with_a_fractional_tock() -> None:
    result = run(topology({"a": "StepCounter"}, ticks=30, tock=0.1))
    assert result.metrics == {"steps": 30}


# ---------------------------------------------------------------------------
# failures in a node's own code name the node; the others still run their exits


def test_a_raising_exit_does_not_skip_sibling_exits(tmp_path: Path) -> None:
    marks = str(tmp_path)
    text = topology({"a": ("ExitMarker", {"marker_dir": marks}),
                     "b": ("ExitMarker", {"marker_dir": marks, "raise": True})}, ticks=3)
    with pytest.raises(NodeError) as caught:
        run(text, processes=1)
    assert caught.value.nodes == ("b",) and "exit boom in b" in caught.value.cause
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_state_raising_is_a_node_error_naming_the_node() -> None:
    with pytest.raises(NodeError) as caught:
        run(topology({"a": "BadState", "b": "StepCounter"}, ticks=5), processes=1)
    assert caught.value.nodes == ("a",)
    assert caught.value.cause == "state() raised ValueError: state boom"


@pytest.mark.parametrize("window", [1, 3, None])
def test_state_raising_names_node_and_tick_in_any_window(window: int | None) -> None:
    """state() is hashed after every tick, inside the window: its failure names the
    node and the exact tick whatever the window, and the other worker is stopped."""
    with pytest.raises(NodeError) as caught:
        run(topology({"a": "BadState", "b": "StepCounter"}, ticks=6), processes=2,
            window=window)
    assert (caught.value.worker, caught.value.nodes, caught.value.tick) == ("p0", ("a",), 2)
    assert caught.value.cause == "state() raised ValueError: state boom"


def test_sys_exit_in_a_node_names_the_node_and_runs_sibling_exits(tmp_path: Path) -> None:
    text = topology({"a": ("ExitMarker", {"marker_dir": str(tmp_path)}), "b": "SysExit"},
                    ticks=5)
    with pytest.raises(NodeError) as caught:
        run(text, processes=1)
    assert caught.value.nodes == ("b",)
    assert caught.value.tick == 2
    assert (tmp_path / "a").exists()


def test_bad_metrics_name_the_node() -> None:
    with pytest.raises(NodeError) as info:
        run(topology({"ok": "StepCounter", "odd": "BadMetrics"}, ticks=3), processes=1)
    assert info.value.nodes == ("odd",) and "0.5" in info.value.cause + info.value.detail


# ---------------------------------------------------------------------------
# payloads: one that packs but cannot be unpacked fails its sender, at once


def test_unround_trippable_payload_fails_fast_naming_the_sender() -> None:
    text = topology({"a": "TupleKeySender", "b": "Sink"}, ("a.out -> b.in",), ticks=5,
                    tick_timeout=30)
    with pytest.raises(NodeError) as caught:
        run(text, processes=2)
    assert caught.value.nodes == ("a",)
    assert "a.out -> b.in" in caught.value.detail


@pytest.mark.parametrize("processes", [1, 2])
def test_puts_in_exit_contexts_are_counted_as_undelivered(processes: int) -> None:
    result = run(topology({"a": "PutsOnExit", "b": "Sink"}, ("a.out -> b.in",), ticks=5),
                 processes=processes)
    assert result.messages == 5 + 3
    assert result.undelivered == 1 + 3  # the last tick's message, and the three from exit


# ---------------------------------------------------------------------------
# hostile names: unhashable values where a name belongs are frame errors


HELLO_BODY = {"worker": "a", "token": b"t", "pid": 1, "versions": {},
              "data_address": "ipc:///x"}


@pytest.mark.parametrize("frame, field", [
    ([V, "HELLO", dict(HELLO_BODY, worker=[1])], "HELLO.worker"),
    ([V, "HELLO", dict(HELLO_BODY, versions={"hio": {}})], "HELLO.versions.hio"),
    ([V, "PROGRESS", {"tick": 0, "waiting": [[1]]}], "PROGRESS.waiting[0]"),
    ([V, "PEER", {"worker": {}, "token": b"t"}], "PEER.worker"),
    ([V, "DATA", {"tick": 0, "source": [1], "messages": [], "acks": []}], "DATA.source"),
])
def test_unhashable_name_field_is_a_frame_error(frame: list[Any], field: str) -> None:
    data = msgpack.packb(frame, use_bin_type=True)
    decode = proto.decode_data if frame[1] == "DATA" else proto.decode
    with pytest.raises(FrameError) as caught:
        decode(data)
    assert caught.value.field == field
    assert caught.value.code == "bad-field"


def test_stranger_with_unhashable_hello_cannot_kill_the_run() -> None:
    context = zmq.Context()
    sockets: list[zmq.Socket] = []

    def on_ready(sup: supervisor.Supervisor) -> None:
        stranger = context.socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        sockets.append(stranger)
        connect_ready(stranger, sup.control_address)
        stranger.send(msgpack.packb([V, "HELLO", dict(HELLO_BODY, worker=[1])]))

    try:
        # paced by the wall clock (60 ticks of 0.05 s): the run lasts 3 s after the
        # HELLO is sent, however late a loaded machine delivers it (stress: a 30-tick
        # unpaced run once ended before it arrived)
        result = run(topology({"a": "StepCounter"}, ticks=60, tock=0.05, real=True),
                     on_ready=on_ready)
        reply = proto.decode(sockets[0].recv()) if sockets[0].poll(30_000) else None
    finally:
        for sock in sockets:
            sock.close(linger=0)
        context.term()
    assert result.ticks == 60
    assert result.rejected_frames == 1
    assert isinstance(reply, proto.Error) and reply.field == "HELLO.worker"


# ---------------------------------------------------------------------------
# bad set-ups: the API checks boxes; the CLI reports an unusable run root cleanly


def test_api_run_with_a_missing_box_raises_topology_error() -> None:
    with pytest.raises(TopologyError) as caught:
        run(topology({"a": "Sink", "b": "Sink"}, ("a.out -> b.in",)))
    assert caught.value.key_path == "links[0].from"


def test_cli_unusable_run_root_is_a_clean_json_failure(cli_env: dict[str, str],
                                                         tmp_path: Path) -> None:
    env = dict(cli_env, HIOCLUSTER_RUN_ROOT=str(tmp_path / "missing" / "dir"))
    done = subprocess.run([sys.executable, "-m", "hiocluster", "run", "topologies/ring.toml",
                           "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["type"] == "TransportError" and "run directory" in error["message"]
