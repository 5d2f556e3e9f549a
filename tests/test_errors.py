"""Errors that point at the user's code: each case a simulation author met, with
the message asserted (real runs, in-process supervisor)."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import REPO
from hiocluster.supervision import supervisor
from hiocluster.errors import NodeError, RunFailed, TopologyError
from hiocluster.node import Node
from hiocluster.topology import loads

HERE = "tests.test_errors"


class BadState(Node):
    def state(self) -> Any:
        return {1, 2}


class RaisingState(Node):
    def state(self) -> Any:
        return self.params["missing"]


class BadPayload(Node):
    outboxes = ("out",)

    def step(self) -> None:
        self.outbox["out"].put(object())


class Sink(Node):
    inboxes = ("in",)


class LongMessage(Node):
    def step(self) -> None:
        helper(self.tick)


def helper(tick: int) -> None:
    raise ValueError(f"tick {tick}: " + "x" * 5000)


def run(text: str, processes: int = 1) -> Any:
    return supervisor.run(loads(text), processes=processes, app_dir=str(REPO),
                          handle_signals=False)


def nodes(**classes: str) -> str:
    return "[run]\nticks = 3\n" + "".join(f'[nodes.{name}]\nclass = "{HERE}:{cls}"\n'
                                           for name, cls in classes.items())


def test_a_state_that_cannot_be_digested_names_state() -> None:
    with pytest.raises(RunFailed) as caught:
        run(nodes(a="BadState", b="Sink"))
    assert caught.value.nodes == ("a",)
    assert caught.value.cause == ("state() returned {1, 2} (a set), which cannot be "
                                  "digested: cannot serialize 'set' object")


def test_a_state_that_raises_names_state_and_the_user_s_line() -> None:
    with pytest.raises(NodeError) as caught:
        run(nodes(a="RaisingState"))
    detail = caught.value.detail
    assert detail.startswith("state() raised\nTraceback (most recent call last; "
                             "hiocluster's and hio's frames left out):")
    assert 'return self.params["missing"]' in detail and "hiocluster/worker/nodes.py" not in detail
    assert caught.value.cause == "state() raised KeyError: 'missing'"


@pytest.mark.parametrize("processes", [1, 2])
def test_a_bad_payload_is_blamed_on_its_sender_once(processes: int) -> None:
    text = nodes(a="BadPayload", b="Sink") + '[[links]]\nfrom = "a.out"\nto = "b.in"\n'
    with pytest.raises(RunFailed) as caught:
        run(text, processes)
    error = caught.value
    assert error.nodes == ("a",) and error.tick == 0
    assert error.cause == ("cannot send on link a.out -> b.in at tick 0: cannot serialize "
                           "'object' object")
    assert str(error).count("cannot serialize") == 1


def test_a_long_message_keeps_its_type_and_the_frames_are_the_user_s() -> None:
    with pytest.raises(NodeError) as caught:
        run(nodes(a="LongMessage"))
    error = caught.value
    assert error.cause.startswith("ValueError: tick 0: xxx") and error.cause.endswith("...")
    assert len(error.cause) < 320
    lines = error.detail.splitlines()
    assert lines[0].startswith("Traceback") and lines[1].endswith("in step")
    assert "helper(self.tick)" in lines[2] and lines[3].endswith("in helper")
    assert lines[-1].endswith("... (3020 more characters)")  # 12 + 5000 + 8 - 2000
    assert "hio/base/doing.py" not in error.detail


def test_a_missing_module_says_where_it_was_looked_for(tmp_path: Any) -> None:
    with pytest.raises(TopologyError) as caught:
        supervisor.run(loads('[nodes.a]\nclass = "nosuchmodule:Thing"\n'),
                       app_dir=str(tmp_path), handle_signals=False)
    assert caught.value.key_path == "nodes.a.class"
    assert f"module 'nosuchmodule' not found (looked in the app dir {tmp_path} and on " \
           "sys.path; where is it? pass --app-dir DIR)" in str(caught.value)


def test_one_process_is_not_processes() -> None:
    from hiocluster.cli import summary
    result = run(nodes(s="Sink"))
    assert " on 1 process in " in summary(result)
