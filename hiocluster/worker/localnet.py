"""The local data plane (``--transport local``): DATA between the workers of one
host over Unix-domain ``SOCK_SEQPACKET`` sockets, without ZeroMQ.

Each worker listens on ``unix://<run dir>/d-<worker>`` (the 0700 run directory
keeps other users out) and connects one socket to each neighbour's; one message
is one frame, as on the ZeroMQ data plane (docs/protocol.md §1). A connection
proves itself exactly as there: its first frame is PEER with the run's token,
judged by :class:`~hiocluster.worker.dataplane.DataPlane` (held until SETUP if early); a
stranger's frames are refused and counted; a neighbour's invalid frame is a
:class:`~hiocluster.worker.dataplane.DataFault`. Control (HELLO ... BYE) stays on ZeroMQ.

A frame longer than CHUNK bytes travels as fragments: messages of
``MORE + piece`` and a last ``LAST + piece`` (``0xc1``, never the first byte
of msgpack, then 1 or 0), reassembled up to MAX_DATA_FRAME. Sends never wait
while there is room in the kernel's buffer; when there is none (a neighbour
that does not read), the sender waits for room reading its own neighbours'
frames meanwhile, so two workers never wait on each other. A connection that
breaks (its neighbour gone) is dialled again by :meth:`LocalPeers.check`, and
its kept frames resent, as on ZeroMQ.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from typing import Any

from hiocluster.errors import FrameError
from hiocluster.protocol import MAX_DATA_FRAME
from hiocluster.runtime.transport import Context, Poller, TransportError
from hiocluster.worker.dataplane import ARRIVED_S, RECEIVE_S, DataFault, DataPlane, PeerSockets

__all__ = ["LocalPeers", "open_data_plane", "local_path", "SCHEME", "CHUNK"]

#: The address scheme of a local data socket: ``unix://PATH``.
SCHEME = "unix://"
#: The longest message: a longer frame goes as fragments of at most this many bytes.
CHUNK = 64 * 1024
#: The first two bytes of a fragment: more follow, or this is the last.
MORE, LAST = b"\xc1\x01", b"\xc1\x00"
#: Kernel buffer asked for each way (the system's limit may give less).
BUFFER_BYTES = 1 << 20
#: How long a connect may wait for a neighbour's listening socket.
CONNECT_TIMEOUT_S = 10.0
#: How long a full socket is waited on between looks at the neighbours' frames.
PUSH_WAIT_MS = 100


def local_path(address: str) -> str | None:
    """The file behind a ``unix://`` address (None for other addresses)."""
    return address[len(SCHEME):] if address.startswith(SCHEME) else None


def open_data_plane(context: Context, bind: str, worker: str, token: bytes) -> DataPlane:
    """A worker's data plane bound at ``bind``: local for ``unix://``, else ZeroMQ."""
    if bind.startswith(SCHEME):
        return LocalPeers(bind, worker, token)
    return PeerSockets(context, bind, worker, token)


def _seqpacket() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER_BYTES)
    return sock


class LocalPeers(DataPlane):
    """A worker's local data sockets (see the module docstring).

    Args:
        bind: ``unix://PATH``: where it listens.
        worker: this worker's name; token: the run's secret.

    Raises:
        TransportError: it cannot listen there.
    """

    def __init__(self, bind: str, worker: str, token: bytes) -> None:
        super().__init__(worker, token)
        self.path = local_path(bind) or ""
        self.listener = _seqpacket()
        try:
            self.listener.bind(self.path)
            self.listener.listen(socket.SOMAXCONN)
        except (OSError, ValueError) as exc:
            self.listener.close()
            raise TransportError(f"cannot bind {bind}: {exc}") from exc
        self.listener.setblocking(False)
        self.socket = self.listener.fileno()     # what a poll answers for new connections
        self.address = bind
        self.conns: dict[int, tuple[int, socket.socket]] = {}  # fd -> (identity, socket)
        self.partial: dict[int, bytearray] = {}  # identity -> the fragments so far
        self.down: set[str] = set()              # neighbours whose connection broke
        self.poller: Poller | None = None
        self.waiting = select.poll()             # the data sockets alone: receive()
        self.waiting.register(self.socket, select.POLLIN)
        self.buffer = bytearray(CHUNK + len(MORE))
        self.view = memoryview(self.buffer)
        self.serial = 0                          # identities: never reused, unlike fds
        self.closed = False

    def watch(self, poller: Poller) -> None:
        """Have ``poller`` wake for new connections and frames to :meth:`serve`."""
        self.poller = poller
        poller.register(self.socket)

    # -- receiving ------------------------------------------------------------
    def receive(self) -> None:  # type: ignore[override]
        """Wait for frames on the data sockets alone, at most RECEIVE_S, and take one
        from each that has one (a poll(2) of these descriptors: cheaper than the
        worker's poll, which has its ZeroMQ control socket in it too).

        Raises:
            DataFault: a neighbour's frame is invalid.
        """
        self.serve([fd for fd, _ in self.waiting.poll(RECEIVE_S * 1000)])

    def serve(self, ready: list[Any]) -> None:
        conns = self.conns
        for item in ready:
            if item in conns:
                self._receive(item)
            elif item == self.socket:
                self._accept()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors, say: the connection waits in the backlog
                return
            conn.setblocking(False)
            self.serial += 1
            self.conns[conn.fileno()] = (self.serial, conn)
            if self.poller is not None:
                self.poller.register(conn.fileno())
            self.waiting.register(conn.fileno(), select.POLLIN)

    def _receive(self, fd: int) -> None:
        """One message from connection ``fd``: a frame, a fragment, or its end."""
        identity, conn = self.conns[fd]
        try:  # with MSG_TRUNC: the message's whole length, even where it did not fit
            size = conn.recv_into(self.buffer, 0, socket.MSG_TRUNC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            size = 0
        if size == 0:  # closed (no frame is empty)
            self._drop(fd)
            return
        if size > len(self.buffer):
            self._bad(fd, f"a message longer than {CHUNK + len(MORE)} bytes", "oversized")
            return
        view = self.view
        if view[0] != MORE[0] and identity not in self.partial:
            self._take(identity, bytes(view[:size]))
            return
        partial = self.partial.setdefault(identity, bytearray())
        if size < len(MORE) or view[0] != MORE[0] or view[1] > 1:
            self._bad(fd, "a fragment without its header", "bad-frame")  # or a frame inside one
            return
        partial += view[len(MORE):size]
        if len(partial) > MAX_DATA_FRAME:
            self._bad(fd, f"a frame of more than {MAX_DATA_FRAME} bytes", "oversized")
        elif view[1] == LAST[1]:
            del self.partial[identity]
            self._take(identity, bytes(partial))

    def _bad(self, fd: int, what: str, code: str) -> None:
        """Connection ``fd`` broke the framing: a neighbour's fault, or a stranger's
        frame refused (its fragments so far dropped)."""
        identity, _ = self.conns[fd]
        self.partial.pop(identity, None)
        peer = self.peer_of.get(identity)
        if peer is not None and self.exchange is not None:
            raise DataFault(peer, FrameError(what, code=code))
        self._refuse(what)

    def _drop(self, fd: int) -> None:
        identity, conn = self.conns.pop(fd)
        self.partial.pop(identity, None)
        if self.poller is not None:
            self.poller.unregister(fd)
        self.waiting.unregister(fd)
        conn.close()

    def take_arrived(self) -> None:
        """Take every frame already here (after a failed run: a bad one is only
        reported now)."""
        deadline = time.monotonic() + ARRIVED_S
        while self.conns and time.monotonic() < deadline:
            poll = select.poll()
            for fd in self.conns:
                poll.register(fd, select.POLLIN)
            ready = [fd for fd, _ in poll.poll(0)]
            if not ready:
                return
            try:
                self.serve(ready)
            except DataFault as fault:
                self._fault_later(fault)

    # -- sending ----------------------------------------------------------------
    def _dial(self, peer: str) -> None:
        address = self.addresses[peer]
        path = local_path(address)
        if path is None:
            raise TransportError(f"{peer}'s data address {address} is not a local one: "
                                 "--transport local needs every worker on this host")
        out = _seqpacket()
        out.settimeout(CONNECT_TIMEOUT_S)
        try:
            out.connect(path)
        except OSError:  # gone, or not there yet: check() tries again
            out.close()
            self.down.add(peer)
            return
        out.setblocking(False)
        self.outs[peer] = out
        self.down.discard(peer)
        self._put(peer, self._hello)
        for _, frame in self.kept[peer]:
            self._put(peer, frame)

    def _put(self, peer: str, frame: bytes) -> None:
        out = self.outs.get(peer)
        if out is None:  # its connection broke: check() dials again and resends
            return
        try:
            if len(frame) <= CHUNK:
                try:
                    out.send(frame)
                    return
                except BlockingIOError:
                    self._push(out, [frame])
                return
            whole = memoryview(frame)
            for start in range(0, len(frame), CHUNK):
                self._push(out, [MORE if start + CHUNK < len(frame) else LAST,
                                 whole[start:start + CHUNK]])
        except OSError:  # the neighbour is gone (EPIPE, ECONNRESET)
            self.outs.pop(peer).close()
            self.down.add(peer)

    def _push(self, out: socket.socket, message: list[Any]) -> None:
        """Send one message, waiting for room while reading our neighbours' frames
        (they may be waiting for us to read before they read ours)."""
        while True:
            try:
                out.sendmsg(message)
                return
            except BlockingIOError:
                pass
            poll = select.poll()
            poll.register(out.fileno(), select.POLLOUT)
            for fd in self.conns:
                poll.register(fd, select.POLLIN)
            self.serve([fd for fd, _ in poll.poll(PUSH_WAIT_MS) if fd != out.fileno()])

    def check(self, redial: bool = True) -> None:
        """Dial again every neighbour whose connection broke (PEER, then its kept
        frames)."""
        if redial:
            for peer in sorted(self.down):
                self._redial(peer)

    def drop_unconnected(self) -> None:
        """Nothing lingers here: what was sent is in the neighbour's socket already."""

    def close(self, *, drop: bool = True) -> None:
        """Close every socket and remove the listening socket's file. What was sent is
        in the neighbours' sockets already: nothing to wait for."""
        if self.closed:
            return
        self.closed = True
        for _, conn in self.conns.values():
            conn.close()
        for out in self.outs.values():
            out.close()
        self.conns.clear()
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
