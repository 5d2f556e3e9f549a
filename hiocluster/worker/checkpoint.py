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

No sockets, no files: the shell moves the bytes.
"""

from __future__ import annotations

import struct
from typing import Any, Mapping

from hiocluster.node import Node
from hiocluster.worker.exchange import Exchange
from hiocluster.worker.nodes import NodeRunner, blame

__all__ = ["cut", "resume", "snapshot_node", "restore_node"]


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
