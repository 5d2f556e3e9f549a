"""The worker: one OS process, one hio Doist, the nodes placed on it.

- ``process``: the worker's shell (:class:`~hiocluster.worker.process.Worker`):
  control socket, windows of ticks, exit contexts, orphan rule;
- ``exchange``: its DATA plane, sans-IO: frames, delivery, credit (docs/protocol.md §7);
- ``dataplane``: where DATA travels over ZeroMQ (:class:`PeerSockets`) and what every
  transport shares (:class:`DataPlane`: PEER judging, kept frames, refusals);
- ``localnet``: the same over unix SEQPACKET sockets (``--transport local``);
- ``nodes``: the worker's nodes in one Doist (:class:`NodeRunner`): enter, one
  recur a tick, exit, digest records, outcomes.

Nothing here is imported by the package's ``__init__``: a sans-IO module such as
``exchange`` loads without ZeroMQ.
"""
