"""ZeroMQ sockets and addresses: the only module that imports zmq.

Control plane: the supervisor binds a ROUTER, each child connects a DEALER whose
routing id is its process name. Data plane: each child binds one PULL socket
and connects one PUSH socket per peer it sends to. Addresses are ``ipc://``
inside the run directory (mode 0700: only this user can connect) for local
processes by default, or ``tcp://127.0.0.1`` on ports the system picks (any
local user can connect; there is no CurveZMQ authentication yet).

zmq errors stop here: they become :class:`TransportError`.
"""

from __future__ import annotations

import os
from typing import Iterable

import zmq

from .errors import ClusterError
from .protocol import MAX_CONTROL_FRAME, MAX_DATA_FRAME

__all__ = ["TransportError", "Context", "Poller", "POLLIN", "TRANSPORTS", "ipc_address",
           "local_address", "bound_address"]

#: How processes on one host reach each other: unix sockets, or TCP on loopback.
TRANSPORTS = ("ipc", "tcp")

POLLIN = zmq.POLLIN
#: ZeroMQ itself cuts a peer that sends more than this many times our frame limit,
#: so that we can still decode (and answer) frames up to twice the limit.
HARD_LIMIT_FACTOR = 2
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
        sock.setsockopt(zmq.MAXMSGSIZE, limit * HARD_LIMIT_FACTOR)
        self._sockets.append(sock)
        return sock

    def router(self, address: str, *, timeout_ms: int = -1) -> zmq.Socket:
        """The supervisor's control socket, bound at ``address``.

        A blocking recv gives up after ``timeout_ms`` with :data:`Again`.
        """
        sock = self._socket(zmq.ROUTER, limit=MAX_CONTROL_FRAME)
        sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone peer raises
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        return _bind(sock, address)

    def dealer(self, address: str, identity: str, *, timeout_ms: int = -1) -> zmq.Socket:
        """A child's control socket, connected to the supervisor (recv gives up after
        ``timeout_ms`` with :data:`Again`)."""
        sock = self._socket(zmq.DEALER, limit=MAX_CONTROL_FRAME)
        sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        sock.setsockopt(zmq.ROUTING_ID, identity.encode())
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        return _connect(sock, address)

    def pull(self, address: str) -> zmq.Socket:
        """A child's data inbox, bound at ``address`` (``tcp://host:*`` picks a port)."""
        sock = self._socket(zmq.PULL, limit=MAX_DATA_FRAME)
        return _bind(sock, address)

    def push(self, address: str) -> zmq.Socket:
        """A data outbox to one peer."""
        sock = self._socket(zmq.PUSH, limit=MAX_DATA_FRAME)
        return _connect(sock, address)

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


def _bind(sock: zmq.Socket, address: str) -> zmq.Socket:
    return _attach(sock, address, "bind")


def _connect(sock: zmq.Socket, address: str) -> zmq.Socket:
    return _attach(sock, address, "connect")


def _attach(sock: zmq.Socket, address: str, how: str) -> zmq.Socket:
    """``sock.bind`` or ``sock.connect``; on failure close it and raise TransportError."""
    try:
        getattr(sock, how)(address)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise TransportError(f"cannot {how} {address}: {exc}") from exc
    return sock


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
