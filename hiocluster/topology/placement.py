"""Nodes onto workers, workers onto hosts: :func:`plan`, with ``[placement]``,
``[groups]`` and ``[hosts.*]``, or a partition of the link graph (METIS when
installed, else greedy growing, or the file's own order)."""

from __future__ import annotations

import heapq
import math
import os
from collections import Counter
from typing import Callable

from hiocluster.errors import TopologyError
from hiocluster.topology.limits import MAX_GROUP_DEPTH
from hiocluster.topology.lines import locate_error
from hiocluster.topology.spec import HostSpec, LinkSpec, NodeSpec, Plan, Topology, WorkerSpec
from hiocluster.topology.values import int_value, suggest, topology_error


def plan(topology: Topology, processes: int | None = None, *,
         cores: int | None = None) -> Plan:
    """Map nodes onto workers (one OS process each), and workers onto hosts.

    ``processes`` None uses the topology's ``[placement]``; without one, the nodes
    are spread over as many workers as there are cores (``cores``, default
    ``os.cpu_count()``), never more workers than nodes. An int P splits the link
    graph into P balanced parts with few links between them (:func:`_partition`;
    without links: contiguous blocks of the file's order), workers ``p0..p{P-1}``,
    with no groups: the file's ``[groups]`` name the workers of its placement. Workers and groups named in ``[hosts.*]`` run on those hosts.

    Raises:
        TopologyError: P is not in 1..number of nodes (key path ``--processes``), or
            a host names a worker the plan does not have (``hosts.<name>.workers``).
    """
    nodes = topology.nodes
    if not nodes:
        raise TopologyError("no nodes to simulate (this topology only has services: "
                            "`hiocluster run` serves them)", key_path="nodes",
                            path=topology.path)
    if processes is None:
        if topology.placement is not None:
            workers = tuple(WorkerSpec(name, tuple(topology.node(n) for n in members))
                            for name, members in topology.placement)
        else:
            workers = _partition(nodes, topology.links,
                                 min(len(nodes), cores or os.cpu_count() or 1))
    else:
        try:
            count = int_value(processes, "--processes", 1, len(nodes))
        except TopologyError as exc:
            exc.message += f" (the topology has {len(nodes)} nodes)"
            locate_error(exc, None, topology.path)
            raise
        workers = _partition(nodes, topology.links, count)
    names = [worker.name for worker in workers]
    try:
        groups = _group_tree(topology.groups if processes is None else (), names)
        inside = {member for members in groups.values() for member in members}
        hosts: dict[str, HostSpec] = {}
        for host in topology.hosts:
            for j, worker in enumerate(host.workers):
                key_path = f"hosts.{host.name}.workers[{j}]"
                if worker not in names and worker not in groups:
                    raise topology_error(f"no worker or group {worker!r} in the plan"
                               f"{suggest(worker, [*names, *groups])} (workers: "
                               f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''})",
                               key_path)
                if worker in inside:
                    raise topology_error(f"{worker!r} is in a group: it runs where its group runs",
                               key_path)
                hosts[worker] = host
    except TopologyError as exc:
        locate_error(exc, topology.source, topology.path)
        raise
    return Plan(workers, hosts, groups)


def _group_tree(groups: tuple[tuple[str, tuple[str, ...]], ...],
                workers: list[str]) -> dict[str, tuple[str, ...]]:
    """The groups, checked: members exist, each once, no cycles, no name twice."""
    tree = dict(groups)
    parent: dict[str, str] = {}
    for name, members in groups:
        if name in workers:
            raise topology_error(f"group {name!r} has the name of a worker", f"groups.{name}")
        for j, member in enumerate(members):
            key_path = f"groups.{name}[{j}]"
            if member not in workers and member not in tree:
                raise topology_error(f"no worker or group {member!r}"
                           f"{suggest(member, [*workers, *tree])}", key_path)
            if member in parent:
                raise topology_error(f"{member!r} is in groups {parent[member]} and {name}", key_path)
            parent[member] = name
    for name in tree:  # a group must not contain itself, however deep
        seen, up = {name}, parent.get(name)
        while up is not None:
            if up in seen:
                raise topology_error(f"group {name!r} contains itself", f"groups.{name}")
            seen.add(up)
            up = parent.get(up)
        if len(seen) > MAX_GROUP_DEPTH:
            raise topology_error(f"group {name!r} is nested {len(seen)} deep (at most "
                       f"{MAX_GROUP_DEPTH})", f"groups.{name}")
    return tree


def _partition(nodes: tuple[NodeSpec, ...], links: tuple[LinkSpec, ...],
               count: int) -> tuple[WorkerSpec, ...]:
    """``count`` workers of nearly equal size with few links between them: METIS
    (pymetis, when installed) or a plain greedy growing of regions, on the graph
    of links (both directions, weighted by how many links join two nodes), or
    contiguous blocks of the file's order where those are as balanced and cut as
    few links (a chain). Deterministic for a given topology; without links,
    blocks. Workers are numbered by their first node in the file's order."""
    index = {node.name: i for i, node in enumerate(nodes)}
    weights: dict[tuple[int, int], int] = {}
    for link in links:
        a, b = index[link.source], index[link.target]
        if a != b:
            pair = (min(a, b), max(a, b))
            weights[pair] = weights.get(pair, 0) + 1
    if count == 1 or count >= len(nodes) or not weights:
        return contiguous_blocks(nodes, count)
    neighbours: list[list[tuple[int, int]]] = [[] for _ in nodes]
    for (a, b), weight in sorted(weights.items()):
        neighbours[a].append((b, weight))
        neighbours[b].append((a, weight))
    n = len(nodes)

    even = math.ceil(n / count) + n // (100 * count)  # parts within 1 % count as even

    def score(parts: list[int]) -> tuple[int, int]:  # balance (to 1 %), then the cut
        cut = sum(weight for (a, b), weight in weights.items() if parts[a] != parts[b])
        return max(max(Counter(parts).values()), even), cut

    # the partitioner's split, unless the file's own order does as well (a chain)
    blocks = [i * count // n for i in range(n)]
    parts = min(_metis(neighbours, count, score(blocks), score)
                or _grow(neighbours, count), blocks, key=score)
    members: list[list[NodeSpec]] = [[] for _ in range(count)]
    for i, part in enumerate(parts):
        members[part].append(nodes[i])
    if not all(members):  # a partitioner that left a part empty: do not trust it
        return contiguous_blocks(nodes, count)
    members.sort(key=lambda block: index[block[0].name])
    return tuple(WorkerSpec(f"p{j}", tuple(block)) for j, block in enumerate(members))


def _metis(neighbours: list[list[tuple[int, int]]], count: int, to_beat: tuple[int, int],
           score: Callable[[list[int]], tuple[int, int]]) -> list[int] | None:
    """METIS's k-way partition: of a few fixed seeds, the first whose ``score``
    (balance, then links cut) beats ``to_beat`` (the file's order), else the best:
    the same topology, the same plan. None without pymetis."""
    try:
        import pymetis  # optional: pip install "hiocluster[graph]"
    except ImportError:
        return None
    xadj, adjncy, eweights = [0], [], []
    for row in neighbours:
        adjncy += [b for b, _ in row]
        eweights += [weight for _, weight in row]
        xadj.append(len(adjncy))
    best: tuple[tuple[int, int], list[int]] | None = None
    for seed in range(1, 9):  # METIS's balance varies with its seed
        options = pymetis.Options(seed=seed)
        if hasattr(pymetis, "CSRAdjacency"):  # pymetis >= 2025.2
            _, parts = pymetis.part_graph(count, pymetis.CSRAdjacency(xadj, adjncy),
                                          eweights=eweights, options=options)
        else:
            _, parts = pymetis.part_graph(count, xadj=xadj, adjncy=adjncy,
                                          eweights=eweights, options=options)
        found = (score(list(parts)), list(parts))
        if best is None or found[0] < best[0]:
            best = found
        if found[0] < to_beat:
            break  # better than the file's order: good enough
    return best[1] if best is not None else None


def _grow(neighbours: list[list[tuple[int, int]]], count: int) -> list[int]:
    """Without METIS, greedy graph growing: each part starts at the unplaced node
    with the fewest unplaced neighbours (a corner of what is left) and takes, one
    at a time, the unplaced node with the most link weight into the part (ties:
    the fewest unplaced neighbours, then the file's order), until it has its
    share: compact regions, so few links between them."""
    n = len(neighbours)
    parts = [-1] * n
    free = [len(row) for row in neighbours]  # unplaced neighbours of each node
    for part in range(count):
        size = n * (part + 1) // count - n * part // count
        gain: dict[int, int] = {}
        heap: list[tuple[int, int, int]] = []
        for _ in range(size):
            while heap and (parts[heap[0][2]] >= 0 or -heap[0][0] != gain.get(heap[0][2])):
                heapq.heappop(heap)  # stale entries
            if heap:
                node = heapq.heappop(heap)[2]
            else:  # a new region: a corner of what is left
                node = min((i for i in range(n) if parts[i] < 0), key=lambda i: (free[i], i))
            parts[node] = part
            gain.pop(node, None)
            for other, weight in neighbours[node]:
                free[other] -= 1
                if parts[other] < 0:
                    gain[other] = gain.get(other, 0) + weight
                    heapq.heappush(heap, (-gain[other], free[other], other))
    return parts


def contiguous_blocks(nodes: tuple[NodeSpec, ...], count: int) -> tuple[WorkerSpec, ...]:
    blocks: list[list[NodeSpec]] = [[] for _ in range(count)]
    for i, node in enumerate(nodes):
        blocks[i * count // len(nodes)].append(node)
    return tuple(WorkerSpec(f"p{j}", tuple(block)) for j, block in enumerate(blocks))
