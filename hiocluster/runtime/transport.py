"""ZeroMQ sockets, addresses and CurveZMQ: the only module that imports zmq.

Control plane: the supervisor binds one ROUTER; each worker connects one
DEALER. Data plane: each worker binds one ROUTER for what its neighbours send
it, and connects one DEALER to each neighbour's ROUTER. Every connecting socket
sets its own routing id: 16 random bytes (:func:`routing_id`), so a bound
ROUTER never has to name one of ours, and nobody can guess one to take it
over. A connection says which worker it is once, with a frame that carries the
run's secret token, and every later frame on it is that worker's
(docs/protocol.md §1).

libzmq names an anonymous peer (one that sets no routing id: only a stranger
now) ``0x00`` + a 32-bit counter drawn from the C library's ``rand()``, and
aborts the process if that name is already held by a peer that chose it.
:func:`unpredictable_ids` seeds ``rand()`` from the OS in every process before
its first socket, so the counter cannot be predicted (unseeded, it is the same
in every process); ROUTER_HANDOVER stays off, so a peer claiming a routing id
in use is never attached (and never renamed with a generated one).

Addresses are ``ipc://`` inside the run directory (mode 0700: only this user
can connect) by default, or ``tcp://`` on ports the system picks. Over tcp
every socket is CurveZMQ (encrypted, and authenticated by ZAP through
:class:`Gate`, with ``ZAP_ENFORCE_DOMAIN`` so that a missing authenticator
fails closed): a bound socket admits only the public keys it was told, and
every message it receives carries the name of the key that sent it
(:meth:`Socket.sender`). TCP connections send ZeroMQ heartbeats, so a peer that
vanishes is noticed within the heartbeat timeout (:func:`heartbeat_timeout_ms`).

ZeroMQ stops here: the rest of the package sees :class:`Socket` (its own
methods: ``take``/``put`` and their kin, which never raise zmq's Again),
:class:`Poller` and :class:`TransportError`; no zmq flag, exception or frame
leaves this module.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, cast

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from hiocluster.errors import Gone, TransportError
from hiocluster.protocol import MAX_CONTROL_FRAME, MAX_DATA_FRAME, MAX_SETUP_FRAME

__all__ = ["TransportError", "Context", "Poller", "KeyPair", "Credentials", "Gate",
           "Asking", "Gone", "request",
           "CREDENTIALS_ENV", "write_key_pair", "TRANSPORTS",
           "ipc_address", "local_address", "ipc_path", "Socket",
           "facing", "resolve", "resolved", "HEARTBEAT_TIMEOUT_MS", "heartbeat_timeout_ms",
           "routing_id", "unpredictable_ids"]

#: How workers on one host reach each other: unix sockets, or TCP on loopback.
TRANSPORTS = ("ipc", "tcp")

#: The supervisor's control socket admits frames up to twice the limit, so an
#: oversized one can still be read and answered with ERROR "oversized".
HARD_LIMIT_FACTOR = 2
#: Frames a bound socket queues per connection before it stops reading from it: a
#: stranger cannot make us hold more than this many of its frames (plus the one
#: being read), each at most the socket's MAXMSGSIZE.
BOUND_RCVHWM = 4
#: The largest frame a run's control endpoint reads: a COMMAND is a few dozen bytes.
ENDPOINT_LIMIT = 65536
#: Linger on a clean close: long enough for queued frames to leave, never forever.
CLEAN_LINGER_MS = 2000
#: ZeroMQ heartbeats on tcp: a PING every HEARTBEAT_IVL_MS; a connection silent for
#: the heartbeat timeout is dropped (and the monitor says so). The timeout is how much
#: loss a link may show before it counts as down: by default HEARTBEAT_TIMEOUT_MS (a
#: vanished host is noticed within 0.5 s); on a lossy link, raise it with
#: $HIOCLUSTER_HEARTBEAT_TIMEOUT_MS (each process reads it: agents too).
HEARTBEAT_IVL_MS = 100
HEARTBEAT_TIMEOUT_MS = 400
HEARTBEAT_ENV = "HIOCLUSTER_HEARTBEAT_TIMEOUT_MS"
MAX_HEARTBEAT_TIMEOUT_MS = 600_000
#: The ZAP domain of every CURVE server socket.
ZAP_DOMAIN = "hiocluster"
#: Refused CURVE keys logged one by one; after that only counted.
LOG_REFUSED_KEYS = 10


#: Bytes in the routing id every connecting socket of ours sets (libzmq's own are 5).
ROUTING_ID_BYTES = 16
_seeded_in: int | None = None     # the pid whose rand() was seeded


def routing_id() -> bytes:
    """A routing id for one connecting socket: 16 random bytes, never one libzmq
    generates (those are 5 bytes) and never guessable by another peer."""
    return secrets.token_bytes(ROUTING_ID_BYTES)


def unpredictable_ids() -> None:
    """Seed the C library's ``rand()`` from the OS, once per process (again after a
    fork): libzmq draws the first routing id it gives an anonymous peer from it."""
    global _seeded_in
    if _seeded_in != os.getpid():
        ctypes.CDLL(None).srand(int.from_bytes(os.urandom(4), "little"))
        _seeded_in = os.getpid()


def heartbeat_timeout_ms() -> int:
    """The heartbeat timeout of this process: $HIOCLUSTER_HEARTBEAT_TIMEOUT_MS, else
    HEARTBEAT_TIMEOUT_MS. Raises TransportError naming a bad value."""
    text = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not text:
        return HEARTBEAT_TIMEOUT_MS
    value = int(text) if text.isdigit() else 0
    if not 2 * HEARTBEAT_IVL_MS <= value <= MAX_HEARTBEAT_TIMEOUT_MS:
        raise TransportError(f"${HEARTBEAT_ENV} must be a whole number of milliseconds from "
                             f"{2 * HEARTBEAT_IVL_MS} to {MAX_HEARTBEAT_TIMEOUT_MS}, not {text!r}")
    return value


def ipc_address(run_dir: str, name: str) -> str:
    """``ipc://`` address of socket ``name`` inside ``run_dir`` (path < 107 bytes)."""
    path = os.path.join(run_dir, name)
    if len(path.encode()) > 100:
        raise TransportError(f"ipc path too long for a unix socket: {path}")
    return f"ipc://{path}"


#: Sockets a run's root supervisor binds in its run directory besides its control
#: socket: an orphan (its supervisor killed) removes them on its way out.
RUN_SOCKETS = ("endpoint", "services")
#: The file in a run directory that records a tcp control endpoint: its address and
#: the CURVE keys a shell of the run's user connects with (JSON, mode 0600).
ENDPOINT_RECORD = "endpoint.tcp"


def ipc_path(address: str) -> str | None:
    """The file behind an ``ipc://`` address (None for other transports)."""
    return address[len("ipc://"):] if address.startswith("ipc://") else None


def resolve(host: str) -> str:
    """The IPv4 address of ``host`` (ZeroMQ binds to addresses, not names)."""
    try:
        return socket.gethostbyname(host)
    except OSError as exc:
        raise TransportError(f"cannot resolve the host name {host!r}: {exc}") from exc


def resolved(address: str) -> str:
    """``tcp://NAME:PORT`` with NAME looked up."""
    host, _, port = address[len("tcp://"):].rpartition(":")
    return f"tcp://{resolve(host)}:{port}"


def facing(address: str) -> str:
    """This host's IP address on the route to ``tcp://HOST:PORT`` (what a peer there
    can reach us at). Connecting a UDP socket sends nothing."""
    host, _, port = address[len("tcp://"):].rpartition(":")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, int(port)))
            return probe.getsockname()[0]
    except (OSError, ValueError) as exc:
        raise TransportError(f"no route to {address}: {exc}") from exc


def local_address(transport: str, run_dir: str, name: str) -> str:
    """Where socket ``name`` of a local run binds: ``ipc://`` in the run directory, or
    ``tcp://127.0.0.1:*`` (a free port; read it back with :func:`bound_address`)."""
    if transport == "ipc":
        return ipc_address(run_dir, name)
    if transport == "tcp":
        return "tcp://127.0.0.1:*"
    raise TransportError(f"unknown transport {transport!r}; choose from {TRANSPORTS}")


@dataclass(frozen=True)
class KeyPair:
    """A CurveZMQ key pair, both keys in Z85 text (40 characters)."""

    public: str
    secret: str

    @classmethod
    def generate(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public.decode("ascii"), secret.decode("ascii"))

    @classmethod
    def load(cls, path: str) -> KeyPair:
        """Read a ``.key_secret`` certificate (``hiocluster keygen`` writes them).

        Raises:
            TransportError: no such file, or it holds no secret key.
        """
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot read a CURVE key pair from {path}: {exc}") from exc
        if not secret:
            raise TransportError(f"{path} holds no secret key (it is a .key, not a "
                                 ".key_secret)")
        return cls(public.decode("ascii"), secret.decode("ascii"))

    @staticmethod
    def load_public(path: str) -> str:
        """The public key of a ``.key`` (or ``.key_secret``) certificate."""
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot read a CURVE public key from {path}: {exc}") from exc
        return public.decode("ascii")


@dataclass(frozen=True)
class Credentials:
    """What a worker proves itself with: the run's token and, over tcp, its own
    CURVE key pair and the supervisor's public key. A group (a sub-supervisor)
    also carries the key pairs of everyone under it (``under``), for its children.
    Travels as JSON: in the environment (CREDENTIALS_ENV) of a process the
    supervisor starts, or in a file (``hiocluster worker --credentials FILE``)."""

    token: bytes
    keys: KeyPair | None = None
    server: str | None = None
    under: dict[str, KeyPair] = field(default_factory=dict)

    def to_json(self) -> str:
        data: dict[str, Any] = {"token": self.token.hex()}
        if self.keys is not None and self.server is not None:
            data.update(public=self.keys.public, secret=self.keys.secret, server=self.server)
            if self.under:
                data["under"] = {name: [pair.public, pair.secret]
                                 for name, pair in self.under.items()}
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Credentials:
        """Raises ValueError naming what is wrong."""
        try:
            data = json.loads(text)
            token = bytes.fromhex(data["token"])
            keys = KeyPair(str(data["public"]), str(data["secret"])) if "secret" in data \
                else None
            server = str(data["server"]) if keys is not None else None
            under = {str(name): KeyPair(str(public), str(secret))
                     for name, (public, secret) in data.get("under", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not hiocluster credentials ({type(exc).__name__}: {exc})") \
                from None
        if not 1 <= len(token) <= 64:
            raise ValueError("the token must be 1 to 64 bytes")
        return cls(token, keys, server, under)


#: The environment variable a worker reads its credentials from.
CREDENTIALS_ENV = "HIOCLUSTER_CREDENTIALS"


def write_key_pair(directory: str, name: str) -> tuple[str, str]:
    """Write ``name.key`` (public) and ``name.key_secret`` (secret, mode 0600) into
    ``directory``; return their paths."""
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret


class Gate(ThreadAuthenticator):
    """ZAP for one process: which CURVE public keys may connect, and their names.

    A key is admitted with :meth:`admit`; any other is refused, counted in
    ``refused`` and logged on stderr (the first LOG_REFUSED_KEYS). Every
    message from an admitted key carries its name as the ZeroMQ User-Id. Until
    :meth:`open` is called, handshakes wait (so a worker that gets its SETUP a
    moment after its neighbours is not refused while it reads it).
    """

    def __init__(self, context: zmq.Context, owner: str) -> None:
        super().__init__(context, log=logging.getLogger("hiocluster.zap"))
        self.owner = owner
        self.names: dict[str, str] = {}      # public key (Z85) -> name
        self.refused = 0
        self._open = threading.Event()

    def start(self) -> None:
        super().start()
        self.configure_curve_callback(ZAP_DOMAIN, self)

    def admit(self, name: str, public: str) -> None:
        self.names[public] = name

    def forget(self, public: str) -> None:
        """Refuse ``public`` from now on (its process is gone)."""
        self.names.pop(public, None)

    def open(self) -> None:
        """Every key is admitted now: stop holding handshakes back."""
        self._open.set()

    async def callback(self, domain: str, key: bytes) -> bool:
        """The credentials provider pyzmq calls for each CURVE handshake."""
        deadline = time.monotonic() + 30.0
        while not self._open.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if key.decode("ascii") in self.names:
            return True
        self.refused += 1
        if self.refused <= LOG_REFUSED_KEYS:
            print(f"hiocluster {self.owner}: refused a connection with an unknown CURVE key "
                  f"{key.decode('ascii')[:8]}..." + (" (further refusals are only counted)"
                                                      if self.refused == LOG_REFUSED_KEYS
                                                      else ""), file=sys.stderr, flush=True)
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names.get(z85.encode(client_public_key).decode("ascii"), "")


#: plain ints: an operation on pyzmq's enum flags runs Python code (hot path)
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)
_MORE = _NOBLOCK | _SNDMORE
_EVENTS_OPTION, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class Socket(zmq.Socket):  # type: ignore[type-arg]
    """One of the package's sockets: made by :class:`Context`, used only through
    these methods (and ``send``, ``poll``, ``close``): nobody else sees a zmq flag
    or a zmq exception.

    ``take*`` never block unless told to ``wait`` (a data inbox's receive time-out
    bounds that wait: :meth:`Context.data_router`); they return None when nothing
    came. ``put*`` never block; they say whether the frame was queued.
    """

    #: a CURVE server: take_routed notes the key each message came with (kept as a
    #: name: a frame kept for its properties would keep its payload too)
    _keyed = False
    _sender: str | None = None

    def readable(self) -> bool:
        """A message can be received now (cheaper than a take that finds nothing)."""
        return bool(cast(int, self.getsockopt(_EVENTS_OPTION)) & _POLLIN)

    def take(self, wait: bool = False) -> bytes | None:
        """One single-part message, or None (nothing here; with ``wait``, nothing
        within the socket's receive time-out)."""
        if not wait and not self.readable():
            return None  # cheaper than the Again a recv would raise
        try:
            return cast(bytes, self.recv(0 if wait else _NOBLOCK))
        except zmq.Again:
            return None

    def take_parts(self) -> list[bytes] | None:
        """Every part of one message, or None when nothing is here."""
        if not self.readable():
            return None
        try:
            return cast("list[bytes]", self.recv_multipart(_NOBLOCK))
        except zmq.Again:
            return None

    def take_routed(self, wait: bool = False) -> list[bytes] | None:
        """A bound ROUTER's next message: the connection's routing id, then each
        part; None as :meth:`take`. :meth:`sender` names the key it came with."""
        if not wait and not self.readable():
            return None
        try:
            identity = self.recv(0 if wait else _NOBLOCK)
        except zmq.Again:
            return None
        frame = self.recv(copy=False)
        if self._keyed:
            try:
                self._sender = cast(str, frame.get("User-Id"))
            except zmq.ZMQError:  # not set
                self._sender = None
        parts = [identity, frame.bytes]
        while frame.more:
            frame = self.recv(copy=False)
            parts.append(frame.bytes)
        return parts

    def sender(self) -> str | None:
        """The name of the CURVE key the last :meth:`take_routed` message came with;
        None without CURVE."""
        return self._sender

    def put(self, frame: bytes) -> bool:
        """Queue ``frame`` without waiting; False when it cannot go now (a
        connection not made, or one that failed for good). Raises TransportError."""
        try:
            self.send(frame, _NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot send: {exc}") from exc
        return True

    def put_to(self, identity: bytes, frame: bytes) -> bool:
        """A bound ROUTER's send to the connection ``identity``; False when that
        peer is gone (or cannot take it now)."""
        try:
            self.send(identity, _MORE)
            self.send(frame, _NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def event(self) -> str:
        """A monitor socket's next event: "connected", "disconnected", "refused"
        (the other side refused the handshake: our key, or no CURVE) or, where
        asked for, "reached" (a TCP connection, before its handshake) and
        "retrying" (an attempt to connect failed)."""
        event = cast(zmq.Event, recv_monitor_message(self)["event"])
        return _EVENTS.get(event, "disconnected")

    def bound_address(self) -> str:
        """The address this socket is bound at, with the port a wildcard picked."""
        return cast(bytes, self.getsockopt(zmq.LAST_ENDPOINT)).decode()


class _ZmqContext(zmq.Context):  # type: ignore[type-arg]
    """A zmq context whose sockets (monitors too) are :class:`Socket`."""

    _socket_class = Socket


class Context:
    """A zmq context and every socket made from it; close() cleans all up.

    Args:
        keys: this process's CURVE key pair. With keys, sockets on tcp addresses
            are CurveZMQ: bound ones are servers that admit the keys their
            :attr:`gate` knows; connected ones need the server's public key.
        owner: who this process is, for the gate's log lines.

    Never carry one across a fork: make it in the process that uses it.
    """

    def __init__(self, keys: KeyPair | None = None, owner: str = "process") -> None:
        self.heartbeat_ms = heartbeat_timeout_ms()
        unpredictable_ids()
        self._context = _ZmqContext()
        self._sockets: list[Socket] = []
        self._monitors = 0  # monitors made: each its own inproc address
        self.keys = keys
        self.gate: Gate | None = None
        if keys is not None:
            self.gate = Gate(self._context, owner)
            self.gate.start()

    def _socket(self, kind: int, *, limit: int) -> Socket:
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, CLEAN_LINGER_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, limit)
        self._sockets.append(sock)
        return sock

    def _secure(self, sock: Socket, address: str, server_key: str | None = None) -> None:
        """Heartbeats, and CURVE when this context has keys, for tcp addresses: a
        server without ``server_key``, a client of that server with it."""
        if not address.startswith("tcp://"):
            return
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, self.heartbeat_ms)
        sock.setsockopt(zmq.HEARTBEAT_TTL, self.heartbeat_ms)
        if self.keys is None:
            return
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public.encode("ascii"))
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret.encode("ascii"))
        if server_key is None:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock._keyed = True
            sock.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        else:
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode("ascii"))

    def _client(self, sock: Socket, address: str, server_key: str | None) -> None:
        if self.keys is not None and address.startswith("tcp://") and not server_key:
            sock.close(linger=0)
            raise TransportError(f"no CURVE public key for the server at {address}")
        self._secure(sock, address, server_key or "")

    def _bound_router(self, address: str, limit: int) -> Socket:
        sock = self._socket(zmq.ROUTER, limit=limit)
        sock.setsockopt(zmq.RCVHWM, BOUND_RCVHWM)
        sock.setsockopt(zmq.SNDHWM, 0)              # replies are few and bounded
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)    # a send to a gone peer raises
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0)     # a routing id in use is never taken
        self._secure(sock, address, None)
        return _attach(sock, address, "bind")

    def control_router(self, address: str) -> Socket:
        """The supervisor's control socket, bound at ``address``."""
        return self._bound_router(address, MAX_CONTROL_FRAME * HARD_LIMIT_FACTOR)

    def endpoint_router(self, address: str) -> Socket:
        """A run's control endpoint (``hiocluster status``), bound at ``address``: a
        bigger frame than ENDPOINT_LIMIT drops its connection."""
        return self._bound_router(address, ENDPOINT_LIMIT)

    def control_dealer(self, address: str, server_key: str | None = None, *,
                       identity: bytes | None = None,
                       before: Callable[[Socket], None] | None = None) -> Socket:
        """A worker's control socket, connected to its supervisor (whose CURVE public
        key is ``server_key`` on tcp); ``identity``: its routing id there (default:
        :func:`routing_id`);
        ``before``: called with the socket before it connects (to attach a monitor
        that must not miss the first handshake)."""
        sock = self._socket(zmq.DEALER, limit=MAX_SETUP_FRAME)
        sock.setsockopt(zmq.ROUTING_ID, routing_id() if identity is None else identity)
        if before is not None:
            before(sock)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        self._client(sock, address, server_key)
        return _attach(sock, address, "connect")

    def monitored_dealer(self, address: str, server_key: str | None = None, *,
                         identity: bytes | None = None, refusals: bool = False,
                         contact: bool = False) -> tuple[Socket, Socket]:
        """A control socket as :meth:`control_dealer` makes it, and its monitor
        (:meth:`monitor`), attached before it connects: the first handshake (or
        refusal) is never missed."""
        made: list[Socket] = []
        sock = self.control_dealer(address, server_key, identity=identity,
                                   before=lambda sock: made.append(
                                       self.monitor(sock, refusals=refusals,
                                                    contact=contact)))
        return sock, made[0]

    def data_router(self, address: str, wait: float | None = None) -> Socket:
        """A worker's data inbox, bound at ``address`` (``tcp://host:*`` picks a port);
        a blocking recv on it gives up after ``wait`` seconds (None: never)."""
        sock = self._bound_router(address, MAX_DATA_FRAME)
        if wait is not None:
            sock.setsockopt(zmq.RCVTIMEO, int(wait * 1000))
        return sock

    def data_dealer(self, address: str, server_key: str | None = None
                    ) -> tuple[Socket, Socket]:
        """A worker's data outbox to one neighbour, connected to its inbox, and its
        monitor (:meth:`monitor`, with refusals and failed connects), attached before
        it connects. It never reconnects by itself (RECONNECT_IVL -1): a connection
        that drops is replaced by a new socket, with a new routing id, that proves
        itself again (hiocluster.worker.dataplane); frames never arrive on a connection whose
        first frame was not its PEER."""
        sock = self._socket(zmq.DEALER, limit=MAX_DATA_FRAME)
        sock.setsockopt(zmq.ROUTING_ID, routing_id())
        sock.setsockopt(zmq.SNDHWM, 0)  # the protocol bounds it: two ticks ahead at most
        sock.setsockopt(zmq.RECONNECT_IVL, -1)
        monitor = self.monitor(sock, refusals=True, closed=True)
        try:
            self._client(sock, address, server_key)
        except TransportError:
            self.discard(monitor)
            raise
        return _attach(sock, address, "connect"), monitor

    def monitor(self, sock: Socket, *, refusals: bool = False,
                closed: bool = False, contact: bool = False) -> Socket:
        """A socket that reports ``sock``'s connects and disconnects (monitor_event),
        with ``refusals`` the handshakes the other side refused, with ``closed``
        a connect that failed for good, and with ``contact`` each TCP connection
        made ("reached") and each attempt that failed ("retrying").

        Closed by :meth:`close` with the rest: stop the thread that reads it first.
        """
        events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        if refusals:
            events |= zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        if closed:
            events |= zmq.EVENT_CLOSED
        if contact:
            events |= zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED
        # an address of its own: pyzmq's default names it after the socket's fd, which
        # a new socket reuses while the closed one's monitor may still hold the name
        self._monitors += 1
        monitor = sock.get_monitor_socket(events, f"inproc://monitor-{self._monitors}")
        self._sockets.append(monitor)
        return monitor

    def discard(self, *socks: Socket) -> None:
        """Close these sockets of this context now (linger 0): what they still hold
        is dropped."""
        for sock in socks:
            if sock in self._sockets:
                self._sockets.remove(sock)
            if not sock.closed:
                sock.close(linger=0)

    def close(self, *, linger: int | None = None) -> None:
        """Close every socket (``linger`` ms, default the clean linger) and the context."""
        for sock in self._sockets:
            if not sock.closed:
                sock.close(linger=CLEAN_LINGER_MS if linger is None else linger)
        self._sockets.clear()
        if self.gate is not None:
            self.gate.stop()
            self.gate = None
        self._context.term()


class Asking:
    """A shell's conversation with a running run's ROUTER at ``address``: frames
    out, answers in (at most ``limit`` bytes each), and whether the run closed the
    connection while the shell waited. Raises TransportError."""

    #: How long an answer sent just before the run closed may still take to show.
    LAST_WORDS_MS = 500

    def __init__(self, address: str, limit: int,
                 curve: tuple[KeyPair, str] | None = None) -> None:
        unpredictable_ids()
        self.address = address
        self.context = _ZmqContext()
        self.sock: Socket = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, limit)
        self.sock.setsockopt(zmq.ROUTING_ID, routing_id())
        if curve is not None:  # our key pair, and the server's public key
            self.sock.curve_publickey, self.sock.curve_secretkey = (
                curve[0].public.encode("ascii"), curve[0].secret.encode("ascii"))
            self.sock.curve_serverkey = curve[1].encode("ascii")
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            self.sock.connect(address)
        except zmq.ZMQError as exc:
            self.close()
            raise TransportError(f"cannot talk to {address}: {exc}") from exc

    def __enter__(self) -> Asking:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, frame: bytes) -> None:
        try:
            self.sock.send(frame)
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot talk to {self.address}: {exc}") from exc

    def receive(self, timeout: float) -> bytes | None:
        """The next answer within ``timeout`` seconds, or None. Raises Gone when
        the run closed the connection without one (what it sent before closing
        is answered first)."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(int(left * 1000)))
            if self.sock in ready:
                return self.sock.recv()
            if self.monitor in ready and self.monitor.event() == "disconnected":
                if self.sock.poll(self.LAST_WORDS_MS):
                    return self.sock.recv()
                raise Gone(f"{self.address} closed the connection")
        return None

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
        self.context.term()


def request(address: str, frame: bytes, timeout: float, limit: int,
            curve: tuple[KeyPair, str] | None = None) -> bytes | None:
    """Send ``frame`` to the ROUTER at ``address`` and return its one answer (at
    most ``limit`` bytes), or None after ``timeout`` seconds or once the run closed
    the connection. A shell's single question to a running run. Raises
    TransportError."""
    with Asking(address, limit, curve) as asking:
        asking.send(frame)
        try:
            return asking.receive(timeout)
        except Gone:
            return None


def _attach(sock: Socket, address: str, how: str) -> Socket:
    """``sock.bind`` or ``sock.connect``; on failure close it and raise TransportError."""
    try:
        getattr(sock, how)(address)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise TransportError(f"cannot {how} {address}: {exc}") from exc
    return sock


_EVENTS = {zmq.EVENT_HANDSHAKE_SUCCEEDED: "connected",
           zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused",
           zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "refused",
           zmq.EVENT_CONNECTED: "reached", zmq.EVENT_CONNECT_RETRIED: "retrying"}


class Poller:
    """Wait on sockets and plain file descriptors (process sentinels) together."""

    def __init__(self, items: Iterable[Socket | int] = ()) -> None:
        self._poller = zmq.Poller()
        for item in items:
            self.register(item)

    def register(self, item: Socket | int, write: bool = False, read: bool = True) -> None:
        """Wake when ``item`` is readable (and, with ``write``, writable; without
        ``read``, only writable); again for an item already registered changes
        what it waits for."""
        self._poller.register(item, (zmq.POLLIN if read else 0) |
                              (zmq.POLLOUT if write else 0))

    def unregister(self, item: Socket | int) -> None:
        self._poller.unregister(item)

    def poll(self, timeout_ms: float) -> list[Socket | int]:
        """Items ready to read within ``timeout_ms`` (empty list on time-out)."""
        return [item for item, _ in self._poller.poll(int(timeout_ms))]
