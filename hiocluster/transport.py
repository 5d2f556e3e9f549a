"""ZeroMQ sockets and addresses: the only module that imports zmq.

Control plane: the supervisor binds one ROUTER; each worker connects one
DEALER. Data plane: each worker binds one ROUTER for what its neighbours send
it, and connects one DEALER to each neighbour's ROUTER. Every bound socket is a
ROUTER, so ZeroMQ itself names each connection (a routing id nobody can choose
or take over); a connection says which worker it is once, with a frame that
carries the run's secret token, and every later frame on it is that worker's
(docs/protocol.md §1).

Addresses are ``ipc://`` inside the run directory (mode 0700: only this user
can connect) by default, or ``tcp://127.0.0.1`` on ports the system picks.

zmq errors stop here: they become :class:`TransportError`.
"""

from __future__ import annotations

import os
from typing import Iterable

import zmq
from zmq.utils.monitor import recv_monitor_message

from .errors import ClusterError
from .protocol import MAX_CONTROL_FRAME, MAX_DATA_FRAME, MAX_SETUP_FRAME

__all__ = ["TransportError", "Context", "Poller", "TRANSPORTS", "ipc_address",
           "local_address", "bound_address", "ipc_path", "readable", "monitor_event", "Again",
           "ZMQError", "NOBLOCK", "SNDMORE"]

#: How workers on one host reach each other: unix sockets, or TCP on loopback.
TRANSPORTS = ("ipc", "tcp")

#: The supervisor's control socket admits frames up to twice the limit, so an
#: oversized one can still be read and answered with ERROR "oversized".
HARD_LIMIT_FACTOR = 2
#: Frames a bound socket queues per connection before it stops reading from it:
#: a stranger cannot make us hold more than this many of its frames.
BOUND_RCVHWM = 16
#: Linger on a clean close: long enough for queued frames to leave, never forever.
CLEAN_LINGER_MS = 2000


class TransportError(ClusterError):
    """A socket could not be bound, connected or used."""


def ipc_address(run_dir: str, name: str) -> str:
    """``ipc://`` address of socket ``name`` inside ``run_dir`` (path < 107 bytes)."""
    path = os.path.join(run_dir, name)
    if len(path.encode()) > 100:
        raise TransportError(f"ipc path too long for a unix socket: {path}")
    return f"ipc://{path}"


def ipc_path(address: str) -> str | None:
    """The file behind an ``ipc://`` address (None for other transports)."""
    return address[len("ipc://"):] if address.startswith("ipc://") else None


def local_address(transport: str, run_dir: str, name: str) -> str:
    """Where socket ``name`` of a local run binds: ``ipc://`` in the run directory, or
    ``tcp://127.0.0.1:*`` (a free port; read it back with :func:`bound_address`)."""
    if transport == "ipc":
        return ipc_address(run_dir, name)
    if transport == "tcp":
        return "tcp://127.0.0.1:*"
    raise TransportError(f"unknown transport {transport!r}; choose from {TRANSPORTS}")


class Context:
    """A zmq context and every socket made from it; close() cleans all up.

    Never carry one across a fork: make it in the process that uses it.
    """

    def __init__(self) -> None:
        self._context = zmq.Context()
        self._sockets: list[zmq.Socket] = []

    def _socket(self, kind: int, *, limit: int) -> zmq.Socket:
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, CLEAN_LINGER_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, limit)
        self._sockets.append(sock)
        return sock

    def _bound_router(self, address: str, limit: int) -> zmq.Socket:
        sock = self._socket(zmq.ROUTER, limit=limit)
        sock.setsockopt(zmq.RCVHWM, BOUND_RCVHWM)
        sock.setsockopt(zmq.SNDHWM, 0)              # replies are few and bounded
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)    # a send to a gone peer raises
        return _attach(sock, address, "bind")

    def control_router(self, address: str) -> zmq.Socket:
        """The supervisor's control socket, bound at ``address``."""
        return self._bound_router(address, MAX_CONTROL_FRAME * HARD_LIMIT_FACTOR)

    def control_dealer(self, address: str) -> zmq.Socket:
        """A worker's control socket, connected to its supervisor."""
        sock = self._socket(zmq.DEALER, limit=MAX_SETUP_FRAME)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        return _attach(sock, address, "connect")

    def data_router(self, address: str) -> zmq.Socket:
        """A worker's data inbox, bound at ``address`` (``tcp://host:*`` picks a port)."""
        return self._bound_router(address, MAX_DATA_FRAME)

    def data_dealer(self, address: str) -> zmq.Socket:
        """A worker's data outbox to one neighbour, connected to its inbox."""
        sock = self._socket(zmq.DEALER, limit=MAX_DATA_FRAME)
        sock.setsockopt(zmq.SNDHWM, 0)  # the protocol bounds it: two ticks ahead at most
        return _attach(sock, address, "connect")

    def monitor(self, sock: zmq.Socket) -> zmq.Socket:
        """A socket that reports ``sock``'s connects and disconnects (monitor_event).

        Closed by :meth:`close` with the rest: stop the thread that reads it first.
        """
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._sockets.append(monitor)
        return monitor

    def close(self, *, linger: int | None = None) -> None:
        """Close every socket (``linger`` ms, default the clean linger) and the context."""
        for sock in self._sockets:
            if not sock.closed:
                sock.close(linger=CLEAN_LINGER_MS if linger is None else linger)
        self._sockets.clear()
        self._context.term()


def bound_address(sock: zmq.Socket) -> str:
    """The address a socket is bound at, with the port a wildcard picked."""
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


def _attach(sock: zmq.Socket, address: str, how: str) -> zmq.Socket:
    """``sock.bind`` or ``sock.connect``; on failure close it and raise TransportError."""
    try:
        getattr(sock, how)(address)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise TransportError(f"cannot {how} {address}: {exc}") from exc
    return sock


def readable(sock: zmq.Socket) -> bool:
    """A message can be received now (cheaper than a recv that raises Again)."""
    return bool(sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)


def monitor_event(monitor: zmq.Socket) -> str:
    """Read one event from a monitor socket: "connected" or "disconnected"."""
    event = recv_monitor_message(monitor)
    return "connected" if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED else "disconnected"


class Poller:
    """Wait on sockets and plain file descriptors (process sentinels) together."""

    def __init__(self, items: Iterable[zmq.Socket | int] = ()) -> None:
        self._poller = zmq.Poller()
        for item in items:
            self.register(item)

    def register(self, item: zmq.Socket | int) -> None:
        self._poller.register(item, zmq.POLLIN)

    def unregister(self, item: zmq.Socket | int) -> None:
        self._poller.unregister(item)

    def poll(self, timeout_ms: float) -> list[zmq.Socket | int]:
        """Items ready to read within ``timeout_ms`` (empty list on time-out)."""
        return [item for item, _ in self._poller.poll(timeout_ms)]


Again = zmq.Again
ZMQError = zmq.ZMQError
NOBLOCK = zmq.NOBLOCK
SNDMORE = zmq.SNDMORE
