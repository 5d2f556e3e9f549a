"""Unit tests of hiocluster.topology: parsing, validation, links, placement, plan."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hiocluster.errors import TopologyError
from hiocluster.topology import (
    LinkSpec,
    NodeSpec,
    Plan,
    ServiceSpec,
    Topology,
    load,
    loads,
    plan,
    resolve_classes,
)
from hiocluster.topology.spec import SlurmTarget, SshTarget

AB = '[nodes.a]\nclass = "m:A"\n[nodes.b]\nclass = "m:B"\n'
LP = '[nodes.lp]\nclass = "m:A"\ncount = 3\n'


def error(text: str) -> TopologyError:
    with pytest.raises(TopologyError) as info:
        loads(text)
    return info.value


def test_loads_minimal_file() -> None:
    top = loads('[nodes.n0]\nclass = "nodes.ring:RingNode"\n', path="dir/ring.toml")
    assert top.name == "ring" and top.path == "dir/ring.toml"
    assert top.nodes == (NodeSpec("n0", "nodes.ring:RingNode", {}),)
    assert top.links == () and top.placement is None
    assert top.node("n0").cls == "nodes.ring:RingNode"
    assert loads(AB).name == "<string>"


def test_loads_defaults_and_run_values() -> None:
    top = loads(AB)
    assert (top.ticks, top.tock, top.t0, top.seed, top.tick_timeout, top.capacity,
            top.real) == (100, 1.0, 0.0, 0, 30.0, 1024, False)
    top = loads("[run]\nticks = 5\ntock = 2\nt0 = -1\nseed = 7\ntick_timeout = 0.5\n"
                "capacity = 8\nreal = true\n" + AB)
    assert (top.ticks, top.tock, top.t0, top.seed, top.tick_timeout, top.capacity,
            top.real) == (5, 2.0, -1.0, 7, 0.5, 8, True)
    assert isinstance(top.tock, float)


@pytest.mark.parametrize("count, names", [
    (1, ["lp0"]), (8, [f"lp{i}" for i in range(8)]), (12, [f"lp{i:02d}" for i in range(12)]),
])
def test_loads_count_expands_with_padding(count: int, names: list[str]) -> None:
    top = loads(f'[nodes.lp]\nclass = "m:A"\ncount = {count}\n')
    assert [node.name for node in top.nodes] == names


def test_loads_params_copied_per_node() -> None:
    top = loads('[nodes.lp]\nclass = "m:A"\ncount = 2\nparams = { xs = [1, {y = 2}], s = "t" }\n')
    first, second = top.nodes
    assert first.params == {"xs": [1, {"y": 2}], "s": "t"} == second.params
    first.params["xs"].append(3)
    assert second.params["xs"] == [1, {"y": 2}]


def test_links_glob_excludes_self_pairs() -> None:
    top = loads(LP + '[[links]]\nfrom = "lp*.out"\nto = "lp*.in"\n')
    pairs = [(link.source, link.target) for link in top.links]
    assert len(pairs) == 6 and all(s != t for s, t in pairs)


def test_links_explicit_self_link_allowed() -> None:
    top = loads(AB + '[[links]]\nfrom = "a.out"\nto = "a.in"\n')
    assert top.links[0].label == "a.out -> a.in"


def test_links_canonical_order_ids_and_capacity() -> None:
    top = loads("[run]\ncapacity = 4\n" + AB
                + '[[links]]\nfrom = "b.out"\nto = "a.in"\ncapacity = 2\n'
                + '[[links]]\nfrom = "a.z"\nto = "b.in"\n'
                + '[[links]]\nfrom = "a.out"\nto = "b.in"\n')
    assert top.links == (
        LinkSpec(0, "a", "out", "b", "in", 4), LinkSpec(1, "a", "z", "b", "in", 4),
        LinkSpec(2, "b", "out", "a", "in", 2))
    assert top.links[2].entry == 0


@pytest.mark.parametrize("text, key_path, fragment", [
    ("[run]\ntikcs = 3\n" + AB, "run.tikcs", "unknown key 'tikcs'; did you mean 'ticks'?"),
    ("nodez = 1\n" + AB, "nodez", "did you mean 'nodes'?"),
    ('[nodes.a]\nclass = "m:A"\nzzz = 1\n', "nodes.a.zzz", "unknown key 'zzz'"),
    ('[run]\nticks = "5"\n' + AB, "run.ticks", "expected int, got str"),
    ("[run]\nticks = true\n" + AB, "run.ticks", "expected int, got bool"),
    ("[run]\nseed = 1.5\n" + AB, "run.seed", "expected int, got float"),
    ("[run]\ntock = false\n" + AB, "run.tock", "expected number, got bool"),
    ("[run]\ntock = 0\n" + AB, "run.tock", "must be > 0"),
    ("[run]\ntick_timeout = inf\n" + AB, "run.tick_timeout", "must be finite"),
    ("[run]\nticks = 0\n" + AB, "run.ticks", "must be >= 1"),
    ("[run]\nreal = 1\n" + AB, "run.real", "expected bool, got int"),
    ("[run]\nseed = -1\n" + AB, "run.seed", "must be in 0.."),
    ("run = 3\n" + AB, "run", "expected table, got int"),
    ("", "nodes", "at least one node"),
    ("[nodes.a]\nparams = {}\n", "nodes.a", "missing required key 'class'"),
    ("[nodes.a]\nclass = 3\n", "nodes.a.class", "expected str, got int"),
    ('[nodes.a]\nclass = "m.A"\n', "nodes.a.class", "expected 'module.path:attr'"),
    ('[nodes.a]\nclass = "m:A"\ncount = 100001\n', "nodes.a.count", "must be in 1..100000"),
    ('[nodes.a]\nclass = "m:A"\nparams = 1\n', "nodes.a.params", "expected table"),
    ('[nodes."9a"]\nclass = "m:A"\n', "nodes.9a", "invalid node name '9a'"),
    (f'[nodes.{"x" * 63}]\nclass = "m:A"\ncount = 11\n', f"nodes.{'x' * 63}", "invalid node"),
    (LP + '[nodes.lp1]\nclass = "m:A"\n', "nodes.lp1", "duplicate node name 'lp1'"),
    ('[nodes.a]\nclass = "m:A"\nparams = { when = 2024-01-01 }\n', "nodes.a.params.when",
     "date values are not allowed"),
    ('[nodes.a]\nclass = "m:A"\nparams = { x = [{ t = 10:00:00 }] }\n',
     "nodes.a.params.x[0].t", "time values"),
    ("links = {}\n" + AB, "links", "expected array"),
    (AB + '[[links]]\nfrom = "a"\nto = "b.in"\n', "links[0].from", "expected 'node.box'"),
    (AB + '[[links]]\nfrom = "a.out"\nto = "b.i n"\n', "links[0].to", "invalid box name"),
    (AB + '[[links]]\nfrom = "a.out"\n', "links[0]", "missing required key 'to'"),
    (AB + '[[links]]\nfrom = "a.out"\nto = "c.in"\n', "links[0].to", "no node named 'c'"),
    (AB + '[[links]]\nfrom = "x*.out"\nto = "b.in"\n', "links[0].from", "matches no node"),
    (AB + '[[links]]\nfrom = "a*.out"\nto = "a.in"\n', "links[0]", "makes no link"),
    (AB + '[[links]]\nfrom = "a.o"\nto = "b.i"\ncapacity = 0\n', "links[0].capacity", ">= 1"),
    (AB + '[[links]]\nfrom = "a.o"\nto = "b.i"\n[[links]]\nfrom = "*.o"\nto = "b.i"\n',
     "links[1]", "duplicate link a.o -> b.i (also made by links[0])"),
    (AB + '[placement]\np = ["a"]\n', "placement", "not placed in any worker: b"),
    (AB + '[placement]\np = ["a", "b"]\nq = ["b"]\n', "placement.q", "'b' is placed twice"),
    (AB + '[placement]\np = ["*"]\nq = []\n', "placement.q", "worker 'q' has no nodes"),
    (AB + '[placement]\np = ["a", "c"]\n', "placement.p", "no node named 'c'"),
    (AB + '[placement]\n"-p" = ["*"]\n', "placement.-p", "invalid worker name"),
    (AB + "[placement]\n", "placement", "no workers"),
])
def test_loads_rejects(text: str, key_path: str, fragment: str) -> None:
    exc = error(text)
    assert exc.key_path == key_path
    assert fragment in exc.message


def test_loads_error_line_numbers() -> None:
    assert error("[run]\nticks = 5\ntikcs = 3\n" + AB).line == 3
    text = AB + '\n[nodes.c]\n# hi\nclass = 3\n'
    assert error(text).line == 8
    text = AB + '[[links]]\nfrom = "a.o"\nto = "b.i"\n\n[[links]]\nto = "b.i"\nfrom = "z.o"\n'
    exc = error(text)
    assert (exc.key_path, exc.line) == ("links[1].from", 11)
    exc = error('[nodes]\na = { class = "m:A" }\nb = { class = 1 }\n')
    assert (exc.key_path, exc.line) == ("nodes.b.class", 3)
    assert "<topology>:3 [nodes.b.class]" in str(exc)


def test_loads_decode_error_has_line() -> None:
    exc = error("[run]\nticks = = 3\n")
    assert exc.line == 2 and "column 9" in exc.message and exc.key_path == ""


def test_load_reads_file_and_reports_missing(tmp_path) -> None:
    path = tmp_path / "ring.toml"
    path.write_text(AB)
    assert load(path).name == "ring" and load(str(path)).path == str(path)
    with pytest.raises(TopologyError, match="no such file") as info:
        load(tmp_path / "nope.toml")
    assert info.value.path == str(tmp_path / "nope.toml")
    path.write_bytes(b"\x00\xff\xfe garbage")
    with pytest.raises(TopologyError, match="not a TOML file"):
        load(path)
    path.write_text("[[[")
    with pytest.raises(TopologyError, match="invalid TOML") as info:
        load(path)
    assert info.value.line == 1 and info.value.path == str(path)


def test_plan_defaults_to_one_worker_per_core_at_most() -> None:
    top = loads('[nodes.n]\nclass = "m:A"\ncount = 5\n')
    assert [(p.name, p.node_names) for p in plan(top, cores=2).workers] == [
        ("p0", ("n0", "n1", "n2")), ("p1", ("n3", "n4"))]
    assert len(plan(top, cores=64).workers) == 5  # never more workers than nodes
    assert len(plan(top).workers) == min(5, os.cpu_count() or 1)


def test_plan_uses_placement_in_file_order() -> None:
    top = loads(LP + AB + '[placement]\nz = ["b", "lp2"]\ny = ["lp0", "a", "lp1"]\n')
    assert top.placement == (("z", ("lp2", "b")), ("y", ("lp0", "lp1", "a")))
    result = plan(top)
    assert [p.name for p in result.workers] == ["z", "y"]
    assert result.worker_of("lp1") == "y" and result.node_to_worker["b"] == "z"


def test_plan_spreads_contiguous_blocks() -> None:
    top = loads('[nodes.n]\nclass = "m:A"\ncount = 5\n')
    result = plan(top, 2)
    assert [(p.name, p.node_names) for p in result.workers] == [
        ("p0", ("n0", "n1", "n2")), ("p1", ("n3", "n4"))]
    with pytest.raises(KeyError):
        result.worker_of("zz")


@pytest.mark.parametrize("processes", [0, 6, True, 2.0])
def test_plan_rejects_bad_process_count(processes: int) -> None:
    with pytest.raises(TopologyError) as info:
        plan(loads('[nodes.n]\nclass = "m:A"\ncount = 5\n', path="t.toml"), processes)
    assert info.value.key_path == "--processes" and info.value.path == "t.toml"


@given(n=st.integers(1, 60), data=st.data())
def test_plan_places_every_node_once_contiguously(n: int, data: st.DataObject) -> None:
    processes = data.draw(st.integers(1, n))
    top = loads(f'[nodes.n]\nclass = "m:A"\ncount = {n}\n')
    result = plan(top, processes)
    assert [p.name for p in result.workers] == [f"p{j}" for j in range(processes)]
    assert all(p.nodes for p in result.workers)
    flat = [node for p in result.workers for node in p.nodes]
    assert flat == list(top.nodes)  # each exactly once, in contiguous declaration-order blocks
    assert plan(top, processes) == result


def test_replace_revalidates_run_settings() -> None:
    top = loads(AB, path="t.toml")
    changed = top.replace(ticks=7, seed=3, tock=2)
    assert (changed.ticks, changed.seed, changed.tock, changed.nodes) == (7, 3, 2.0, top.nodes)
    for key, value in [("ticks", 0), ("seed", 2**63), ("ticks", True), ("tock", -1.0)]:
        with pytest.raises(TopologyError) as info:
            top.replace(**{key: value})
        assert info.value.key_path == f"run.{key}" and info.value.path == "t.toml"


# --- resolve_classes: a user module written under tmp_path ---------------------------

APP = """
from hiocluster.node import Node
class Ring(Node):
    inboxes = ("in",)
    outboxes = ("out",)
class Plain:
    pass
value = 3
"""


@pytest.fixture
def app(tmp_path, monkeypatch):
    pytest.importorskip("hiocluster.node")
    (tmp_path / "topo_app_mod.py").write_text(textwrap.dedent(APP))
    monkeypatch.setattr(sys, "path", list(sys.path))
    importlib.invalidate_caches()
    yield str(tmp_path)
    sys.modules.pop("topo_app_mod", None)


def test_resolve_classes_returns_classes_by_node(app: str) -> None:
    top = loads('[nodes.r]\nclass = "topo_app_mod:Ring"\ncount = 2\n'
                '[[links]]\nfrom = "r0.out"\nto = "r1.in"\n')
    classes = resolve_classes(top, app_dir=app)
    assert list(classes) == ["r0", "r1"] and classes["r0"].__name__ == "Ring"
    assert sys.path[0] == app


@pytest.mark.parametrize("cls, fragment", [
    ("topo_no_such_mod:Ring", "module 'topo_no_such_mod' not found"),
    ("topo_app_mod:Nope", "has no attribute 'Nope'"),
    ("topo_app_mod:Rnig", "has no attribute 'Rnig'; did you mean 'Ring'\\?"),
    ("topo_app_mod:value", "is not a class"),
    ("topo_app_mod:Plain", "is not a subclass of hiocluster.node.Node"),
])
def test_resolve_classes_rejects_bad_class(app: str, cls: str, fragment: str) -> None:
    top = loads(f'[nodes.a]\nclass = "topo_app_mod:Ring"\n\n[nodes.b]\nclass = "{cls}"\n')
    with pytest.raises(TopologyError, match=fragment) as info:
        resolve_classes(top, app_dir=app)
    assert (info.value.key_path, info.value.line) == ("nodes.b.class", 5)


def test_resolve_classes_rejects_missing_box(app: str) -> None:
    top = loads('[nodes.a]\nclass = "topo_app_mod:Ring"\n[nodes.b]\nclass = "topo_app_mod:Ring"\n'
                '[[links]]\nfrom = "a.out"\nto = "b.inn"\n')
    with pytest.raises(TopologyError) as info:
        resolve_classes(top, app_dir=app)
    assert info.value.key_path == "links[0].to" and info.value.line == 7
    assert info.value.message == (
        "node 'b' (topo_app_mod:Ring) has no inbox 'inn'; it has: in")


def _grid(side: int, torus: bool = False) -> str:
    """A side x side grid of nodes, each linked both ways to its 4 neighbours."""
    lines = ['[nodes.t]', 'class = "m:A"', f"count = {side * side}"]
    width = len(str(side * side - 1))
    for r in range(side):
        for c in range(side):
            for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                rr, cc = r + dr, c + dc
                if torus:
                    rr, cc = rr % side, cc % side
                elif not (0 <= rr < side and 0 <= cc < side):
                    continue
                lines += ["[[links]]", f'from = "t{r * side + c:0{width}d}.out"',
                          f'to = "t{rr * side + cc:0{width}d}.in"']
    return "\n".join(lines) + "\n"


def _bands(top: Topology, count: int) -> int:
    """Links between workers when the file's order is cut into ``count`` blocks."""
    from hiocluster.topology.placement import contiguous_blocks
    return Plan(contiguous_blocks(top.nodes, count)).crossing(top.links)


def test_processes_split_the_link_graph_into_blocks_not_bands() -> None:
    grid = loads(_grid(8))
    layout = plan(grid, 4)
    assert sorted(len(worker.nodes) for worker in layout.workers) == [16, 16, 16, 16]
    assert layout.crossing(grid.links) == 32 < _bands(grid, 4) == 48  # 4 quadrants
    assert plan(grid, 4) == layout  # deterministic
    torus = loads(_grid(8, torus=True))
    assert plan(torus, 4).crossing(torus.links) <= _bands(torus, 4)
    assert plan(torus, 16).crossing(torus.links) < _bands(torus, 16)


def test_without_pymetis_regions_are_grown(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    monkeypatch.setitem(sys.modules, "pymetis", None)  # import pymetis: ImportError
    grid = loads(_grid(8))
    layout = plan(grid, 4)
    assert sorted(len(worker.nodes) for worker in layout.workers) == [16, 16, 16, 16]
    assert layout.crossing(grid.links) <= _bands(grid, 4)  # plain: no better than bands
    assert plan(grid, 4) == layout
    assert layout.workers[0].node_names[0] == "t00"


# -- services across hosts ----------------------------------------------------------

SERVICE_ON_HOSTS = """
[hosts.alpha]
agent = "tcp://198.18.0.10:7100"

[services.web]
class = "nodes.web:Web"
listen = "0.0.0.0:8080"
"""


def test_a_service_names_its_hosts_and_a_host_needs_no_workers() -> None:
    topology = loads(SERVICE_ON_HOSTS + 'hosts = ["alpha", "local"]\n')
    assert topology.services[0].hosts == ("alpha", "local")
    assert topology.hosts[0].workers == ()
    spec = topology.services[0]
    assert ServiceSpec.from_json(spec.to_json()) == spec  # as replicas get it
    assert loads(SERVICE_ON_HOSTS).services[0].hosts == ()  # none: this one


@pytest.mark.parametrize("hosts, key_path, said", [
    ('"alpha"', "services.web.hosts", "expected array"),
    ('["alpha", "alpha"]', "services.web.hosts[1]", "named twice"),
    ('["al pha"]', "services.web.hosts[0]", "host"),
    ("[3]", "services.web.hosts[0]", "expected str"),
])
def test_a_services_hosts_are_checked(hosts: str, key_path: str, said: str) -> None:
    with pytest.raises(TopologyError) as info:
        loads(SERVICE_ON_HOSTS + f"hosts = {hosts}\n")
    assert info.value.key_path == key_path and said in info.value.message, info.value


@pytest.mark.parametrize("agent, started", [
    ("tcp://198.18.0.10:7100", None),
    ("ssh://me@beta:2222", SshTarget("beta", "me", 2222)),
    ("slurm://node7", SlurmTarget("node7")),
])
def test_a_hosts_agent_says_who_starts_it(agent: str, started: object) -> None:
    topology = loads(SERVICE_ON_HOSTS.replace("tcp://198.18.0.10:7100", agent))
    assert topology.hosts[0].started == started


@pytest.mark.parametrize("agent", ["slurm://", "slurm://no de", "slurm://-x", "http://a:1"])
def test_a_hosts_agent_of_no_known_form_is_refused(agent: str) -> None:
    with pytest.raises(TopologyError) as info:
        loads(SERVICE_ON_HOSTS.replace("tcp://198.18.0.10:7100", agent))
    assert info.value.key_path == "hosts.alpha.agent" and "slurm://NODE" in info.value.message
