"""Unit tests of sub-supervisors (hiocluster.supervision.groupcore) and of [groups] in plans:
no sockets, no processes, the clock is an argument.

An in-memory tree: a RunCore at the root, a GroupCore per group, a
ChildMachine per worker that answers like a worker would (READY, DONE with
made-up digest records, BYE). Frames go wherever the cores say; the test reads
the verdicts.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from hiocluster import protocol as proto
from hiocluster.protocol import DIGEST_SIZE
from hiocluster.errors import NodeError, ProcessExited, RunFailed, TopologyError
from hiocluster.supervision.groupcore import DEFER_S, GroupCore
from hiocluster.topology.tree import check_tree, tree_groups, tree_leaves
from hiocluster.supervision.runcore import Phase, RunCore, Supervision
from hiocluster.topology import loads, plan

TOKEN = b"t" * 16
BASE = """
[run]
ticks = 9
tick_timeout = 2.0
[nodes.a]
class = "m:A"
[nodes.b]
class = "m:A"
[nodes.c]
class = "m:A"
[nodes.d]
class = "m:A"
[nodes.z]
class = "m:A"
[[links]]
from = "a.out"
to = "c.in"
[[links]]
from = "c.out"
to = "b.in"
[[links]]
from = "b.out"
to = "d.in"
[[links]]
from = "d.out"
to = "a.in"
[placement]
w0 = ["a", "b"]
w1 = ["c"]
w2 = ["d"]
w3 = ["z"]
"""
FLAT = ""
ONE = '[groups]\ng = ["w0", "w1"]\n'
NESTED = '[groups]\ng = ["w0", "h"]\nh = ["w1", "k"]\nk = ["w2", "w3"]\n'


def records(nodes: list[str], tick: int) -> bytes:
    """A worker's digest records of the state after ``tick`` (-1: after set-up)."""
    return b"".join(name.encode() + hashlib.sha256(f"{name}@{tick}".encode()).digest()[:DIGEST_SIZE]
                    for name in sorted(nodes))


class Tree:
    """A root RunCore, a GroupCore per group, a worker machine per worker."""

    def __init__(self, groups: str, *, window: int = 3,
                 fault: dict[str, Any] | None = None) -> None:
        self.now = 100.0
        self.topology = loads(BASE + groups)
        self.plan = plan(self.topology)
        self.root = RunCore(self.topology, self.plan, now=self.now, token=TOKEN,
                            window=window, keep_digests=True)
        self.parent: dict[str, str | None] = {name: None for name in self.plan.top}
        self.groups: dict[str, GroupCore] = {}
        for name, members in self.plan.groups.items():
            self.groups[name] = GroupCore(name, self.plan.tree(name), now=self.now,
                                          token=TOKEN, pid=1000)
            for member in members:
                self.parent[member] = name
        self.workers = {spec.name: proto.ChildMachine(spec.name) for spec in self.plan.workers}
        self.nodes = {spec.name: list(spec.node_names) for spec in self.plan.workers}
        self.done = {name: -1 for name in self.workers}
        self.fault = fault or {}
        self.frames = 0

    def core_of(self, name: str) -> Supervision:
        parent = self.parent[name]
        return self.root if parent is None else self.groups[parent]

    def up(self, child: str, frame: bytes) -> None:
        """``frame`` from ``child`` to its supervisor."""
        self.frames += 1
        core = self.core_of(child)
        if not core.books[child].joined:
            joined, reply = core.admit([b"id-" + child.encode(), frame])
            assert joined == child, reply and proto.decode(reply)
        core.receive(child, frame, self.now)

    def start(self) -> None:
        for name, machine in self.workers.items():
            self.up(name, machine.send(proto.Hello(
                worker=name, token=TOKEN, pid=1, versions=proto.local_versions(),
                data_address=f"ipc:///tmp/d-{name}")))
        self.settle()

    def settle(self) -> None:
        """Deliver every frame until nobody has anything to say."""
        for _ in range(10_000):
            moved = False
            for core in [self.root, *self.groups.values()]:
                core.poll(self.now)
                out, core.outbox[:] = list(core.outbox), []
                for child, frame in out:
                    moved = True
                    if child in self.groups:
                        self.groups[child].from_parent(frame, self.now)
                    else:
                        self.worker_gets(child, frame)
            for name, group in self.groups.items():
                up, group.up[:] = list(group.up), []
                for frame in up:
                    moved = True
                    self.up(name, frame)
            if not moved:
                return
        raise AssertionError("the tree never settled")

    def worker_gets(self, name: str, frame: bytes) -> None:
        machine = self.workers[name]
        if machine.state in (proto.ChildState.CLOSED, proto.ChildState.ERROR):
            return
        message = machine.receive(frame)
        nodes = self.nodes[name]
        if isinstance(message, proto.Setup):
            assert sorted(row[0] for row in message.nodes) == sorted(nodes)
            self.up(name, machine.send(proto.Ready(digests=records(nodes, -1))))
        elif isinstance(message, proto.Grant):
            fault = self.fault.get(name)
            ticks = range(self.done[name] + 1, message.until + 1)
            if fault is not None and fault[1] in ticks:
                kind, tick = fault
                if kind == "hold":  # still working on it
                    return
                if kind == "raise":
                    self.up(name, machine.send(proto.Error(
                        code="node-error", detail="ValueError: boom", node=nodes[0],
                        tick=tick)))
                else:  # the process dies without a word
                    self.core_of(name).exited(name, -9, self.now, tick=tick)
                return
            self.up(name, machine.send(proto.Done(
                until=message.until,
                digests=b"".join(records(nodes, tick) for tick in ticks)), checked=False))
            self.done[name] = message.until
        elif isinstance(message, proto.Stop):
            if self.fault.get(name, ("",))[0] == "deaf":
                return
            self.up(name, machine.send(proto.Bye(stats={"messages": 2, "late": 1},
                                                 metrics={"hops": 3})))

    def exit_all(self) -> None:
        """Every process that said BYE (or failed) exits; groups last."""
        for name in self.workers:
            self.core_of(name).exited(name, 0, self.now)
        for name in reversed(list(self.groups)):
            self.core_of(name).exited(name, self.groups[name].exit_code, self.now)
        self.settle()


@pytest.mark.parametrize("groups", [ONE, NESTED])
def test_groups_give_the_flat_digest_and_sums(groups: str) -> None:
    flat, grouped = Tree(FLAT), Tree(groups)
    for tree in (flat, grouped):
        tree.start()
        tree.exit_all()
        assert tree.root.finished and tree.root.failure is None
    assert grouped.root.result.digest == flat.root.result.digest
    assert grouped.root.chain.tick_digests == flat.root.chain.tick_digests
    assert len(flat.root.chain.tick_digests) == 9
    result = grouped.root.result
    assert result.processes == 4
    assert result.messages == 8 and result.metrics == {"hops": 12}  # summed over workers
    assert result.late_ticks == 1                                   # the worst, not a sum
    for group in grouped.groups.values():
        assert group.exit_code == 0 and group.phase is Phase.FINISHED


def test_a_group_says_hello_for_its_workers_once_all_did() -> None:
    tree = Tree(ONE)
    group = tree.groups["g"]
    for name in ("w0",):
        tree.up(name, tree.workers[name].send(proto.Hello(
            worker=name, token=TOKEN, pid=1, versions=proto.local_versions(),
            data_address="ipc:///tmp/d-w0")))
    assert group.up == []
    tree.up("w1", tree.workers["w1"].send(proto.Hello(
        worker="w1", token=TOKEN, pid=1, versions=proto.local_versions(),
        data_address="tcp://198.18.0.5:4000")))
    hello = proto.decode(group.up[0])
    assert isinstance(hello, proto.Hello) and hello.worker == "g" and hello.data_address is None
    assert hello.leaves == {"w0": "ipc:///tmp/d-w0", "w1": "tcp://198.18.0.5:4000"}


def test_progress_upward_is_the_least_and_names_only_outside_peers() -> None:
    tree = Tree(ONE, window=8, fault={"w0": ("hold", 0), "w1": ("hold", 0)})
    tree.start()
    group = tree.groups["g"]
    # w0 (a, b) hears from w1 (c, inside) and w2 (d, outside)
    assert tree.root.books["g"].neighbours == {"w2"}
    assert group.books["w0"].neighbours == {"w1", "w2"}
    tree.up("w0", tree.workers["w0"].send(proto.Progress(tick=4, waiting=["w1", "w2"]),
                                          checked=False))
    tree.up("w1", tree.workers["w1"].send(proto.Progress(tick=2, waiting=[]), checked=False))
    tree.now += 1.0
    group.poll(tree.now)
    progress = proto.decode(group.up[-1])
    assert isinstance(progress, proto.Progress)
    assert progress.tick == 2 and progress.waiting == ["w2"]


@pytest.mark.parametrize("groups", [ONE, NESTED])
@pytest.mark.parametrize("fault, expected", [
    ({"w1": ("raise", 4)}, (NodeError, "w1", ("c",), 4, None)),
    # a death without a word: the tick from its tick register, which the group knows
    ({"w0": ("die", 5)}, (ProcessExited, "w0", ("a", "b"), 5, -9)),
])
def test_a_failure_deep_in_groups_names_its_worker_nodes_and_tick(
        groups: str, fault: dict[str, Any], expected: tuple) -> None:
    tree = Tree(groups, fault=fault)
    tree.start()
    tree.exit_all()
    failure = tree.root.failure
    assert (type(failure), failure.worker, failure.nodes, failure.tick,
            getattr(failure, "exitcode", None)) == expected
    assert tree.root.finished


def test_a_death_goes_up_unplaced_when_a_sibling_is_slow_to_say_bye() -> None:
    tree = Tree(ONE, fault={"w0": ("die", 2), "w1": ("deaf", 99)})
    tree.start()
    assert tree.root.failure is None  # g waits for w1's BYE to place w0's death
    tree.now += DEFER_S / 2
    tree.settle()
    assert tree.root.failure is None
    tree.now += DEFER_S
    tree.settle()
    failure = tree.root.failure
    assert type(failure) is ProcessExited and failure.worker == "w0" and failure.tick == 2


HOLD = {name: ("hold", 2) for name in ("w0", "w1", "w2", "w3")}


def test_a_group_that_dies_is_blamed_for_every_node_under_it() -> None:
    tree = Tree(NESTED, fault=HOLD)
    tree.start()
    assert tree.root.phase is Phase.RUNNING
    tree.core_of("h").exited("h", -9, tree.now, tick=2)
    tree.settle()
    failure = tree.root.failure
    assert type(failure) is ProcessExited
    assert failure.worker == "h" and failure.nodes == ("c", "d", "z")


def test_a_group_may_not_speak_for_a_worker_outside_it() -> None:
    tree = Tree(ONE, fault=HOLD)
    tree.start()
    group = tree.groups["g"]
    group.up.append(group.parent.send(proto.Error(code="subtree", field="NodeError",
                                                  worker="w2", cause="lies", detail="x")))
    tree.settle()
    failure = tree.root.failure
    assert type(failure) is RunFailed and failure.worker == "g"
    assert "ERROR.worker" in failure.cause and "'w2' is not under g" in failure.cause


def test_a_group_hello_must_name_exactly_its_workers() -> None:
    topology = loads(BASE + ONE)
    core = RunCore(topology, plan(topology), now=0.0, token=TOKEN)
    for name, hello in [("g", proto.Hello(worker="g", token=TOKEN, pid=1,
                                          versions=proto.local_versions(),
                                          leaves={"w0": "ipc:///x", "w9": "ipc:///y"})),
                        *[(w, proto.Hello(worker=w, token=TOKEN, pid=1,
                                          versions=proto.local_versions(),
                                          data_address=f"ipc:///d-{w}"))
                          for w in ("w2", "w3")]]:
        frame = proto.encode(hello)
        assert core.admit([b"i" + name.encode(), frame])[0] == name
        core.receive(name, frame, 0.0)
    assert type(core.failure) is RunFailed and core.failure.worker == "g"
    assert "HELLO.leaves" in core.failure.cause


def test_a_setup_for_other_workers_is_refused_upward() -> None:
    group = GroupCore("g", {"w0": ["a"], "w1": ["c"]}, now=0.0, token=TOKEN, pid=7)
    for name in ("w0", "w1"):
        frame = proto.encode(proto.Hello(worker=name, token=TOKEN, pid=1,
                                         versions=proto.local_versions(),
                                         data_address=f"ipc:///d-{name}"))
        assert group.admit([name.encode(), frame])[0] == name
        group.receive(name, frame, 0.0)
    assert len(group.up) == 1
    setup = proto.Setup(t0=0.0, tock=1.0, seed=1, ticks=5, real=False, tick_timeout=2.0,
                        nodes=[], links=[], peers={}, leaves={"w0": {}, "w7": {}})
    group.from_parent(proto.encode(setup), 0.0)
    error = proto.decode(group.up[-1])
    assert isinstance(error, proto.Error) and error.field == "SETUP.leaves"
    assert group.phase is Phase.STOPPING and group.failure is not None
    assert {child for child, _ in group.outbox} == {"w0", "w1"}  # STOP to both


def test_an_orphaned_group_stops_its_children_and_tells_nobody() -> None:
    tree = Tree(ONE, fault=HOLD)
    tree.start()
    group = tree.groups["g"]
    group.lost_parent(tree.now)
    assert group.up == [] and group.orphaned
    assert sorted(child for child, _ in group.outbox) == ["w0", "w1"]
    for name in ("w0", "w1"):
        group.exited(name, 0, tree.now)
    assert group.finished and group.exit_code == 3


DEEPEST: dict[str, Any] = {"w": ["a"]}
for _level in range(70):
    DEEPEST = {f"g{_level}": DEEPEST}


@pytest.mark.parametrize("tree, why", [
    ({}, "non-empty map"),
    ([], "non-empty map"),
    ({"w0": []}, "non-empty list"),
    ({"w0": ["a", 3]}, "non-empty list"),
    ({"-bad": ["a"]}, "not a worker or group name"),
    ({"g": {"w0": "a"}}, "non-empty list"),
    (DEEPEST, "deeper"),
])
def test_check_tree_names_what_is_wrong(tree: Any, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_tree(tree)


def test_tree_helpers() -> None:
    tree = {"w0": ["a", "b"], "h": {"w1": ["c"], "k": {"w2": ["d"]}}}
    assert check_tree(tree) is tree
    assert tree_leaves("g", tree) == {"w0": ("a", "b"), "w1": ("c",), "w2": ("d",)}
    assert tree_groups(tree) == {"h": ("c", "d"), "k": ("d",)}


# -- [groups] in topologies -------------------------------------------------------------

def test_plan_of_groups() -> None:
    layout = plan(loads(BASE + NESTED))
    assert layout.top == ("g",)
    assert layout.leaves("g") == ("w0", "w1", "w2", "w3")
    assert layout.below("g") == ("w0", "h", "w1", "k", "w2", "w3")
    assert layout.tree("h") == {"w1": ["c"], "k": {"w2": ["d"], "w3": ["z"]}}


@pytest.mark.parametrize("groups, key_path, why", [
    ('[groups]\ng = ["w0", "w9"]\n', "groups.g[1]", "no worker or group 'w9'"),
    ('[groups]\ng = ["w0"]\nh = ["w0"]\n', "groups.h[0]", "is in groups g and h"),
    ('[groups]\ng = ["h"]\nh = ["g"]\n', "groups.g", "contains itself"),
    ('[groups]\nw0 = ["w1"]\n', "groups.w0", "has the name of a worker"),
    ('[groups]\ng = []\n', "groups.g", ""),
    ('[groups]\ng = "w0"\n', "groups.g", ""),
    ("[groups]\n" + "".join(f'g{i} = ["g{i + 1}"]\n' for i in range(70)) + 'g70 = ["w0"]\n',
     "groups.g", "nested"),
])
def test_bad_groups_are_named(groups: str, key_path: str, why: str) -> None:
    with pytest.raises(TopologyError) as info:
        plan(loads(BASE + groups))
    assert info.value.key_path.startswith(key_path)
    assert why in str(info.value)


def test_a_host_runs_a_whole_group_not_part_of_one() -> None:
    hosts = '[hosts.h1]\nagent = "tcp://198.18.0.2:7100"\nworkers = ["w1"]\n'
    with pytest.raises(TopologyError, match="is in a group: it runs where its group runs"):
        plan(loads(BASE + ONE + hosts))
    layout = plan(loads(BASE + ONE + hosts.replace('"w1"', '"g"')))
    assert layout.hosts["g"].name == "h1"
