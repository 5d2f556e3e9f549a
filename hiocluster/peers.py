"""A worker's data sockets: where its neighbours' DATA arrives, and where its goes.

One bound ROUTER receives; ZeroMQ names each connection, and a connection
becomes a neighbour's once its first frame, PEER, carries the run's token and,
over tcp, comes with that neighbour's CURVE key (docs/protocol.md §1). Every
later frame on it goes to the :class:`~hiocluster.exchange.Exchange` as that
neighbour's. One DEALER per neighbour sends. Anything from a connection that
has not proved itself is a stranger's: refused, counted, logged (the first
LOG_REFUSED).

Imports: exchange, transport, protocol, errors.
"""

from __future__ import annotations

import sys
from typing import Any

from . import protocol as proto
from .errors import ClusterError, FrameError, ProtocolError
from .exchange import Exchange
from .transport import NOBLOCK, Again, Context, bound_address, sender

__all__ = ["PeerSockets", "DataFault", "LOG_REFUSED"]

#: Refused data frames from strangers logged one by one; after that only counted.
LOG_REFUSED = 10


class DataFault(ClusterError):
    """A neighbour sent an invalid DATA frame (it, not the receiver, is to blame)."""

    def __init__(self, peer: str, error: FrameError | ProtocolError) -> None:
        self.peer, self.error = peer, error
        super().__init__(f"{peer} sent an invalid DATA frame: {error}")


class PeerSockets:
    """A worker's data sockets (see the module docstring).

    Args:
        context: the worker's ZeroMQ context.
        bind: where the receiving ROUTER binds (``tcp://host:*`` picks a port).
        worker: this worker's name; token: the run's secret.
    """

    def __init__(self, context: Context, bind: str, worker: str, token: bytes) -> None:
        self.context, self.worker, self.token = context, worker, token
        self.socket = context.data_router(bind)
        self.address = bound_address(self.socket)
        self.exchange: Exchange | None = None
        self.peer_of: dict[bytes, str] = {}      # connection -> neighbour
        self.outs: dict[str, Any] = {}           # neighbour -> DEALER
        self.refused = 0

    def connect(self, exchange: Exchange, addresses: dict[str, str],
                keys: dict[str, str]) -> None:
        """Admit every neighbour's CURVE key (``keys``, over tcp), then dial every
        neighbour of ``exchange`` and say PEER to it."""
        self.exchange = exchange
        gate = self.context.gate
        if gate is not None:
            for peer in exchange.neighbours:
                gate.admit(peer, keys[peer])
            gate.open()
        hello = proto.encode(proto.Peer(worker=self.worker, token=self.token))
        for peer in exchange.neighbours:
            out = self.outs[peer] = self.context.data_dealer(addresses[peer], keys.get(peer))
            out.send(hello)

    def send(self, frames: list[tuple[str, bytes]]) -> None:
        """Send each ``(neighbour, frame)``."""
        outs = self.outs
        for peer, frame in frames:
            outs[peer].send(frame)

    def take_one(self) -> None:
        """One message from the receiving socket (a poll said there is one).

        Raises:
            DataFault: a neighbour's frame is invalid.
        """
        sock = self.socket
        try:
            identity = sock.recv(NOBLOCK)
        except Again:
            return
        frame = first = sock.recv(copy=False)
        parts = [identity, frame.bytes]
        while frame.more:
            frame = sock.recv(copy=False)
            parts.append(frame.bytes)
        peer = self.peer_of.get(identity)
        if peer is not None and len(parts) == 2 and self.exchange is not None:
            try:
                self.exchange.accept(peer, parts[1])
            except (FrameError, ProtocolError) as exc:
                raise DataFault(peer, exc) from exc
        else:
            self._admit(parts, sender(first))

    def take_arrived(self) -> None:
        """Take every frame already here. After a failed run, so that BYE says how
        far each neighbour got: a bad frame is only reported now."""
        while self.socket.poll(0):
            try:
                self.take_one()
            except DataFault as fault:
                print(f"hiocluster worker {self.worker}: after the run failed, {fault}",
                      file=sys.stderr, flush=True)

    def _admit(self, parts: list[bytes], key: str | None) -> None:
        """A frame on a connection not yet known: a neighbour's PEER, or a stranger's.
        ``key``: the name of the CURVE key it came with (None without CURVE)."""
        why = "not a PEER frame"
        if len(parts) == 2 and self.exchange is not None:
            try:
                peer = proto.decode(parts[1], limit=proto.MAX_DATA_FRAME,
                                    allowed=(proto.Peer,))
            except FrameError as exc:
                why = str(exc)
            else:
                assert isinstance(peer, proto.Peer)
                if peer.worker not in self.exchange.neighbours:
                    why = f"{peer.worker!r} is not a neighbour"
                elif peer.token != self.token:
                    why = "wrong token"
                elif key is not None and key != peer.worker:
                    why = f"the CURVE key of {key or 'nobody'!r} cannot speak for {peer.worker!r}"
                elif peer.worker in self.peer_of.values():
                    why = f"{peer.worker!r} is already connected"
                else:
                    self.peer_of[parts[0]] = peer.worker
                    return
        self.refused += 1
        if self.refused <= LOG_REFUSED:
            print(f"hiocluster worker {self.worker}: refused a frame on the data socket: "
                  f"{why}" + (" (further refusals are only counted)"
                              if self.refused == LOG_REFUSED else ""),
                  file=sys.stderr, flush=True)
