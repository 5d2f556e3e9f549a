"""A worker's share of a checkpoint, sans-IO: what its nodes and links hold after
a tick every worker has run (a cut), and how a worker takes it back, at any
placement (docs/protocol.md, "Checkpoints").

Everything is kept per node and per link, never per worker, so a run resumed
at another ``--processes``, window or host placement starts from the same
state:

* per node: its own state (:meth:`Node.snapshot`), its RNG, its send sequence,
  its inboxes' messages (with the link each came over), its hio retyme;
* per link: the source's ``sent`` and ``acked``, the target's ``taken`` (takes
  not acked yet) and ``pending`` (takes acked at the last ack tick, which the
  source counts ``lag`` ticks later), and the messages of the cut's tick not
  delivered yet;
* per worker, the same for all: the tick and hio's ``tyme``.

:func:`cut` and :func:`resume` touch no socket and no file: the shell moves the
bytes. :func:`take_back` reads a checkpoint directory (hiocluster.runtime.checkpoints)
for a worker, or for a replay of one (hiocluster.worker.replay).
"""

from __future__ import annotations

import struct
from typing import Any, Mapping

from hiocluster.errors import CheckpointError
from hiocluster.node import Node
from hiocluster.runtime import checkpoints
from hiocluster.worker.exchange import Exchange
from hiocluster.worker.nodes import NodeRunner, blame

__all__ = ["cut", "resume", "take_back", "snapshot_node", "restore_node"]


def snapshot_node(node: Node, retyme: float | None) -> dict[str, Any]:
    """One node's entry in a cut (its own state taken with :meth:`Node.snapshot`)."""
    version, internal, gauss = node.rng.getstate()
    # its 625 words as 2.5 KB of bytes: packed and read back without an int each
    rng = [version, struct.pack(f"<{len(internal)}I", *internal), gauss]
    return {"own": node.snapshot(), "rng": rng,
            "sequence": node.sequence, "retyme": retyme,
            "inboxes": {box: [[link.id, payload] for link, payload in inbox._entries]
                        for box, inbox in node.inbox.items() if inbox._entries}}


def restore_node(node: Node, entry: Mapping[str, Any], links: Mapping[int, Any]) -> None:
    """Put ``entry`` (:func:`snapshot_node`) back into a freshly built ``node``;
    ``links``: the worker's links by id (its inbox entries name them)."""
    node.restore(entry["own"])
    version, internal, gauss = entry["rng"]
    node.rng.setstate((version, struct.unpack(f"<{len(internal) // 4}I", internal), gauss))
    node.sequence = entry["sequence"]
    for box, rows in entry["inboxes"].items():
        node.inbox[box]._entries.extend((links[link_id], payload) for link_id, payload in rows)


def cut(host: NodeRunner, exchange: Exchange, tick: int) -> dict[str, Any]:
    """This worker's share of the cut after ``tick``: every worker ran it, and every
    frame of it addressed here is in. Raises NodeFailed naming a node whose
    ``snapshot()`` raised."""
    retymes = {doer.name: retyme for _, retyme, doer in host.doist.deeds
               if isinstance(doer, Node)}
    nodes = {}
    for node in host.nodes:
        with blame(node.name, tick, "snapshot()"):
            nodes[node.name] = snapshot_node(node, retymes.get(node.name))
    links, undelivered = exchange.cut(tick)
    return {"tick": tick, "tyme": host.doist.tyme, "nodes": nodes, "links": links,
            "undelivered": undelivered}


def resume(host: NodeRunner, exchange: Exchange, tick: int, tyme: float,
           nodes: Mapping[str, Mapping[str, Any]], links: Mapping[int, Mapping[str, int]],
           undelivered: Mapping[int, list[Any]]) -> None:
    """Start ``host`` (built and entered) and ``exchange`` after ``tick`` of a cut:
    ``nodes`` holds at least this worker's nodes' entries, ``links`` every side of
    each of its links (the cuts of every worker merged), ``undelivered`` at least
    the messages of ``tick`` for its links. Raises NodeFailed naming a node whose
    ``restore()`` raised."""
    exchange.resume(tick, links, undelivered)
    for node in host.nodes:
        with blame(node.name, tick, "restore()"):
            restore_node(node, nodes[node.name], exchange.links)
    doist = host.doist
    doist.tyme = tyme
    deeds = [doist.deeds.popleft() for _ in range(len(doist.deeds))]
    for dog, old, doer in deeds:
        saved = nodes[doer.name]["retyme"] if isinstance(doer, Node) else None
        doist.deeds.append((dog, old if saved is None else saved, doer))
    host.tick = host.clock.tick = tick


def take_back(directory: str, host: NodeRunner, exchange: Exchange, worker: str) -> int:
    """Resume ``host`` (built and entered) and ``exchange`` of worker ``worker`` from
    the checkpoint in ``directory``: every share is read, for links whose other end
    was elsewhere. Returns the checkpoint's tick; raises CheckpointError."""
    manifest = checkpoints.read_manifest(directory)
    mine = set(host.by_name)
    wanted = set(exchange.links)
    try:
        holding = [name for name, names in manifest["placement"].items()
                   if mine.intersection(names)]
        workers = list(manifest["placement"])
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{directory}: its manifest has no placement") from None
    nodes: dict[str, Any] = {}
    tyme = 0.0
    for share in checkpoints.read_shares(directory, holding, ".ckpt"):
        nodes.update((name, entry) for name, entry in share["nodes"].items()
                     if name in mine)
        tyme = share["tyme"]
    links: dict[int, dict[str, int]] = {}
    undelivered: dict[int, list[Any]] = {}
    for share in checkpoints.read_shares(directory, workers, ".links"):
        undelivered.update((link, rows) for link, rows in share["undelivered"].items()
                           if link in wanted)
        for link, side in share["links"].items():
            if link in wanted:
                links.setdefault(link, {}).update(side)
    missing = sorted(mine - set(nodes))
    sides = {"sent", "acked", "taken", "pending"}
    if missing or any(not sides <= set(links.get(link, ())) for link in wanted):
        raise CheckpointError(f"{directory} does not hold the state of "
                              f"{'node ' + missing[0] if missing else 'every link'} "
                              f"of worker {worker}")
    tick = int(manifest["tick"])
    resume(host, exchange, tick, tyme, nodes, links, undelivered)
    return tick
