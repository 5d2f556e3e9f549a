"""A worker's data sockets: where its neighbours' DATA arrives, and where its goes.

One bound ROUTER receives; each connection has its sender's random routing
id, and becomes a neighbour's once its first frame, PEER, carries the run's
token and, over tcp, comes with that neighbour's CURVE key (docs/protocol.md
§1). Every later frame on it goes to the :class:`~hiocluster.worker.exchange.Exchange`
as that neighbour's. Anything from a connection that has not proved itself is
a stranger's: refused, counted, logged (the first LOG_REFUSED).

One DEALER per neighbour sends, and keeps the frames its neighbour may not
have yet: once a frame of the neighbour's tick j is here, it ran tick j, so it
had every frame of ours that tick j needed (:meth:`Exchange.safe_before`); only
the later ones are kept (two, or about two credit lags for a neighbour we only
send acks). A DEALER never reconnects by
itself: once its connection drops (a heartbeat timeout on a lossy link, a
reset), :meth:`PeerSockets.check` replaces it with a new one — a new routing
id, PEER again, then the kept frames. The receiver takes the new connection
as the same neighbour's and drops the resent frames it already has
(docs/protocol.md §7, "Lost connections").

A neighbour may dial before this worker has its own SETUP (it got its SETUP
first): its PEER, if it carries the token, is held (one per connection, at most
EARLY_PEERS) and judged once SETUP says who the neighbours are, never refused
for being early.

What does not depend on ZeroMQ (PEER judging, early PEERs, proven
connections, refusals, kept frames) is :class:`DataPlane`, shared with the
local data plane (hiocluster.worker.localnet: unix SEQPACKET sockets,
``--transport local``); :class:`PeerSockets` adds the ZeroMQ sockets.
"""

from __future__ import annotations

import hmac
import sys
import time
from collections import deque
from typing import Any, Callable, Hashable

from hiocluster import protocol as proto
from hiocluster.errors import DataFault, FrameError, ProtocolError
from hiocluster.runtime.transport import Context, Poller, Socket, TransportError
from hiocluster.worker.exchange import Exchange

__all__ = ["DataPlane", "PeerSockets", "DataFault", "LOG_REFUSED", "EARLY_PEERS"]

#: Refused data frames from strangers logged one by one; after that only counted.
LOG_REFUSED = 10
#: PEER frames held until SETUP says who the neighbours are (one per connection).
EARLY_PEERS = 1024
#: take_arrived reads at most this long (a stranger may never stop writing).
ARRIVED_S = 1.0
#: Longest one blocking receive waits (then the worker looks at its control socket).
RECEIVE_S = 0.1
#: Connections of one neighbour whose frames are still taken (a dropped one's last
#: frames can still be queued here when its replacement arrives).
KEEP_CONNECTIONS = 4


class DataPlane:
    """What every data transport shares (see the module docstring): PEER judging,
    early PEERs, proven connections, the kept frames of each neighbour and
    refusals. A transport adds its sockets: where frames arrive
    (:meth:`serve`, :meth:`take_arrived`), how one goes out (:meth:`_put`), how a
    neighbour is dialled (:meth:`_dial`), :meth:`check`, :meth:`close`.

    Args:
        worker: this worker's name; token: the run's secret.
    """

    #: The address this worker's neighbours dial (HELLO.data_address).
    address: str

    def __init__(self, worker: str, token: bytes) -> None:
        self.worker, self.token = worker, token
        self.exchange: Exchange | None = None
        self.peer_of: dict[Hashable, str] = {}   # connection -> neighbour
        self.connections: dict[str, deque[Hashable]] = {}   # neighbour -> its latest ones
        self.outs: dict[str, Any] = {}           # neighbour -> our connection to it
        self.early: dict[Hashable, tuple[list[Any], str | None]] = {}  # PEERs before SETUP
        self.kept: dict[str, deque[tuple[int, bytes]]] = {}  # neighbour -> (tick, frame)
        self.addresses: dict[str, str] = {}
        self.keys: dict[str, str] = {}
        self.refused = 0
        self.redials = 0                         # outgoing connections made again

    def connect(self, exchange: Exchange, addresses: dict[str, str],
                keys: dict[str, str]) -> None:
        """Admit every neighbour's CURVE key (``keys``, over tcp), then dial every
        neighbour of ``exchange`` and say PEER to it. Raises TransportError: a
        neighbour's address is not one this transport dials."""
        self.exchange = exchange
        self.addresses, self.keys = addresses, keys
        self._admit_keys(exchange.neighbours, keys)
        self._hello = proto.encode(proto.Peer(worker=self.worker, token=self.token))
        for peer in exchange.neighbours:
            self.kept[peer] = deque()
            self._dial(peer)
        early, self.early = self.early, {}
        for parts, key in early.values():  # the PEERs that came before SETUP, in order
            self._admit(parts, key)

    def send(self, frames: list[tuple[str, bytes]]) -> None:
        """Send each ``(neighbour, frame)`` (of the exchange's last tick sent), and
        keep it until the neighbour is known to have it."""
        assert self.exchange is not None
        exchange = self.exchange
        put, kept, tick = self._put, self.kept, exchange.sent_tick
        for peer, frame in frames:
            mine = kept[peer]
            mine.append((tick, frame))
            safe = exchange.safe_before(peer)  # it ran a tick that needed all of ours before
            while mine[0][0] < safe:
                mine.popleft()
            put(peer, frame)

    def _admit_keys(self, neighbours: tuple[str, ...], keys: dict[str, str]) -> None:
        """Before dialling: let the neighbours' keys in (a transport with keys)."""

    def _dial(self, peer: str) -> None:
        """Connect to neighbour ``peer``, say PEER, then send its kept frames."""
        raise NotImplementedError

    def _put(self, peer: str, frame: bytes) -> None:
        """Send one frame to ``peer``; if its connection dropped, the frame goes when
        :meth:`check` makes it again (it is kept)."""
        raise NotImplementedError

    #: ``receive()``: wait (at most RECEIVE_S) for one frame and take it, looking at
    #: nothing else; None where a transport has no cheaper wait than the worker's poll.
    receive: Callable[[], None] | None = None

    def serve(self, ready: list[Any]) -> None:
        """Take one frame from each of our sockets in ``ready`` (a poll's answer).

        Raises:
            DataFault: a neighbour's frame is invalid.
        """
        raise NotImplementedError

    def watch(self, poller: Poller) -> None:
        """Have ``poller`` wake for frames to :meth:`serve`."""
        raise NotImplementedError

    def take_arrived(self) -> None:
        """Take every frame already here (at most ARRIVED_S): after a failed run, so
        that BYE says how far each neighbour got (a bad frame is only reported
        now); after a clean one, so that every stranger's frame is counted."""
        raise NotImplementedError

    def check(self, redial: bool = True) -> None:
        """Make again every outgoing connection that dropped: PEER, then every frame
        kept for that neighbour (``redial`` False: only look)."""
        raise NotImplementedError

    def drop_unconnected(self) -> None:
        """Before a clean close: let go of what can never reach a neighbour."""

    def close(self, *, drop: bool) -> None:
        """Close the data sockets; ``drop``: what they still hold is dropped."""
        raise NotImplementedError

    def _take(self, identity: Hashable, frame: bytes, key: str | None = None) -> None:
        """A frame that arrived on connection ``identity`` (``key``: the name of the
        CURVE key it came with): a neighbour's to the exchange, anything else to
        :meth:`_admit`.

        Raises:
            DataFault: a neighbour's frame is invalid.
        """
        peer = self.peer_of.get(identity)
        if peer is not None and self.exchange is not None:
            try:
                self.exchange.accept(peer, frame)
            except (FrameError, ProtocolError) as exc:
                raise DataFault(peer, exc) from exc
        else:
            self._admit([identity, frame], key)

    def _redial(self, peer: str) -> None:
        """The connection to ``peer`` dropped: say so (the first few times), dial again."""
        self.redials += 1
        if self.redials <= LOG_REFUSED:
            print(f"hiocluster worker {self.worker}: the data connection to {peer} "
                  f"dropped; connecting again, resending {len(self.kept[peer])} "
                  "frame(s)", file=sys.stderr, flush=True)
        self._dial(peer)

    def _fault_later(self, fault: DataFault) -> None:
        print(f"hiocluster worker {self.worker}: after its last tick, {fault}",
              file=sys.stderr, flush=True)

    def _prove(self, identity: Hashable, peer: str) -> None:
        """Connection ``identity`` is neighbour ``peer``'s. A neighbour's second one
        replaces a dropped one: its resent frames may be here already."""
        assert self.exchange is not None
        mine = self.connections.setdefault(peer, deque())
        if mine:
            self.exchange.resumed.add(peer)
        mine.append(identity)
        self.peer_of[identity] = peer
        if len(mine) > KEEP_CONNECTIONS:
            del self.peer_of[mine.popleft()]

    def _admit(self, parts: list[Any], key: str | None) -> None:
        """A frame on a connection not yet known: a neighbour's PEER, or a stranger's.
        ``key``: the name of the CURVE key it came with (None without CURVE)."""
        why = self._judge(parts, key)
        if why is not None:
            self._refuse(why)

    def _refuse(self, why: str) -> None:
        """Count and (the first LOG_REFUSED) log a stranger's frame, refused."""
        self.refused += 1
        if self.refused <= LOG_REFUSED:
            print(f"hiocluster worker {self.worker}: refused a frame on the data socket: "
                  f"{why}" + (" (further refusals are only counted)"
                              if self.refused == LOG_REFUSED else ""),
                  file=sys.stderr, flush=True)

    def _judge(self, parts: list[Any], key: str | None) -> str | None:
        """Admit (or, before SETUP, hold) a connection's first frame and return None,
        or say why it is refused."""
        if len(parts) != 2:
            return "not a PEER frame"
        try:
            peer = proto.decode(parts[1], limit=proto.MAX_DATA_FRAME, allowed=(proto.Peer,))
        except FrameError as exc:
            return str(exc)
        assert isinstance(peer, proto.Peer)
        if self.exchange is not None and peer.worker not in self.exchange.neighbours:
            return f"{peer.worker!r} is not a neighbour"
        if not hmac.compare_digest(peer.token, self.token):
            return "wrong token"
        if self.exchange is None:  # before our SETUP: who the neighbours are comes with it
            if parts[0] in self.early:
                return "a second frame before SETUP on a connection that said PEER"
            if len(self.early) >= EARLY_PEERS:
                return f"more than {EARLY_PEERS} PEER frames before SETUP"
            self.early[parts[0]] = (parts, key)
            return None
        if key is not None and key != peer.worker:
            return f"the CURVE key of {key or 'nobody'!r} cannot speak for {peer.worker!r}"
        self._prove(parts[0], peer.worker)
        return None


class PeerSockets(DataPlane):
    """A worker's ZeroMQ data sockets (see the module docstring).

    Args:
        context: the worker's ZeroMQ context.
        bind: where the receiving ROUTER binds (``tcp://host:*`` picks a port).
        worker: this worker's name; token: the run's secret.
    """

    def __init__(self, context: Context, bind: str, worker: str, token: bytes) -> None:
        super().__init__(worker, token)
        self.context = context
        self.socket = context.data_router(bind, wait=RECEIVE_S)  # a recv waits this long
        self.address = self.socket.bound_address()
        self.monitors: dict[str, Socket] = {}       # neighbour -> its DEALER's monitor
        self.up: dict[str, bool] = {}            # neighbour -> its DEALER is connected

    def watch(self, poller: Poller) -> None:
        poller.register(self.socket)

    def _admit_keys(self, neighbours: tuple[str, ...], keys: dict[str, str]) -> None:
        gate = self.context.gate
        if gate is not None:
            for peer in neighbours:
                gate.admit(peer, keys[peer])
            gate.open()

    def _dial(self, peer: str) -> None:
        if not self.addresses[peer].startswith(("ipc://", "tcp://")):
            raise TransportError(f"{peer}'s data address {self.addresses[peer]} is not a "
                                 "ZeroMQ one: every worker of a run uses the same --transport")
        out, self.monitors[peer] = self.context.data_dealer(self.addresses[peer],
                                                            self.keys.get(peer))
        self.outs[peer], self.up[peer] = out, False
        if out.put(self._hello):  # queued until the connection is made
            for _, frame in self.kept[peer]:
                out.put(frame)
        # else the connect failed already (the neighbour is gone): check() sees it

    def _put(self, peer: str, frame: bytes) -> None:
        self.outs[peer].put(frame)  # False: its connection dropped; the frame is kept,
        # and goes when check() makes the connection again

    def serve(self, ready: list[Any]) -> None:
        if self.socket in ready:
            self.take_one()

    def close(self, *, drop: bool) -> None:
        """Close the data sockets now, dropping what they hold (``drop``), or leave
        them to the context's close (a clean one lingers until they are sent)."""
        if drop:
            for sock in (self.socket, *self.outs.values()):
                sock.close(linger=0)

    def check(self, redial: bool = True) -> None:
        """Make again every outgoing connection that dropped (or never came up): a
        new socket and routing id, PEER, then every frame kept for that neighbour."""
        for peer, monitor in self.monitors.items():
            down = False
            while monitor.readable():
                self.up[peer] = monitor.event() == "connected"
                down = down or not self.up[peer]
            if down and redial:
                self.context.discard(self.outs[peer], monitor)
                self._redial(peer)

    def drop_unconnected(self) -> None:
        """Before a clean close: close at once the sockets to neighbours not connected
        now (what they hold can never leave: the close would wait out its linger)."""
        self.check(redial=False)
        for peer, up in self.up.items():
            if not up:
                self.context.discard(self.outs[peer], self.monitors[peer])

    def receive(self) -> None:  # type: ignore[override]
        """Wait for one message, at most RECEIVE_S (the socket's receive timeout), and
        take it: one blocking recv, where a poll of control and data together costs
        a zmq_poll per frame that usually arrives while the worker runs.

        Raises:
            DataFault: a neighbour's frame is invalid.
        """
        self.take_one(wait=True)

    def take_one(self, wait: bool = False) -> None:
        """One message from the receiving socket (a poll said there is one; with
        ``wait``, waiting for it at most RECEIVE_S).

        Raises:
            DataFault: a neighbour's frame is invalid.
        """
        sock = self.socket
        parts = sock.take_routed(wait)
        if parts is None:
            return
        if len(parts) == 2:  # the key's name only matters on a connection not proved yet
            identity = parts[0]
            self._take(identity, parts[1],
                       None if identity in self.peer_of else sock.sender())
        else:
            self._admit(parts, sock.sender())

    def take_arrived(self) -> None:
        """Take every frame already here. After a failed run, so that BYE says how
        far each neighbour got: a bad frame is only reported now."""
        deadline = time.monotonic() + ARRIVED_S  # a stranger may never stop writing
        while self.socket.poll(0) and time.monotonic() < deadline:
            try:
                self.take_one()
            except DataFault as fault:
                self._fault_later(fault)
