"""hio's TCP, TLS and WSGI servers, extended for replicas that share one port.

Subclasses of hio's own servers (``hio.core.tcp``, ``hio.core.http``), each
replacing or extending as little as it can:

* :class:`Server`, :class:`ServerTls`: the listening socket also sets
  SO_REUSEPORT, so every replica of a service binds the same address and the
  kernel spreads connections over them; connections get the server's idle
  ``tymeout`` (hio passes it under the wrong keyword), and idle or cut-off
  connections are closed and forgotten instead of held for ever.
* :class:`WsgiServer`: hio's WSGI server on one of those, where an app that
  raises gets a 500 response (logged with its traceback) instead of ending the
  Doist; a request that is not complete within ``tymeout`` of its first byte is
  closed (slowloris), as is a connection idle for ``tymeout``; the response
  says ``Connection: close`` when the server will close the connection after
  it; and closing a connection whose app never started no longer raises.

Each server can say which file descriptors it waits on (:meth:`Server.watch`),
so a replica's loop sleeps until one is ready (hiocluster.replica).

Imports: hio and the stdlib.
"""

from __future__ import annotations

import logging
import socket
import sys
import traceback
from typing import Any, Callable, Iterable, Iterator

from hio.core.http import serving as http_serving
from hio.core.tcp import serving as tcp_serving

__all__ = ["Server", "ServerTls", "WsgiServer", "guard", "listening_socket", "Watch",
           "IDLE_TYMEOUT"]

logger = logging.getLogger("hiocluster.serving")

#: Seconds a connection may stay idle (and a request may take to arrive) by default.
IDLE_TYMEOUT = 60.0

#: Seconds a connection must have been quiet before a draining server closes it:
#: a client that just connected is sending its request, not idling.
DRAIN_IDLE_S = 0.25
#: The same for a connection that has not sent a byte yet (its client may be
#: slow to send its first request, on a busy machine): it is given longer.
DRAIN_FRESH_S = 2.0

#: ``(fd, wants to write)``: what a server waits on.
Watch = tuple[int, bool]


class _ReusePort:
    """hio's Acceptor with SO_REUSEPORT, or on listening sockets handed to it.

    ``sockets``: listening sockets made by someone else (a replica gets its
    supervisor's, so connections queued on them outlive the replica); the server
    then binds nothing and accepts from all of them. Closing one only closes this
    process's descriptor: never ``shutdown``, which would stop it for every
    process that shares it.
    """

    ha: Any
    bs: int
    bl: int
    ss: Any
    opened: bool

    def __init__(self, *args: Any, sockets: Iterable[socket.socket] = (), **kwa: Any) -> None:
        self.inherited = list(sockets)
        self.listeners: list[socket.socket] = []
        super().__init__(*args, **kwa)

    def open(self) -> bool:
        # Replaces hio's Acceptor.open, which makes, configures and binds its socket
        # in one method with no hook between socket() and bind(): SO_REUSEPORT must
        # be set in between, so the whole (short) method is ours.
        if self.inherited:
            self.listeners, self.inherited = self.inherited, []
            for sock in self.listeners:
                sock.setblocking(False)
        else:
            try:
                self.listeners = [listening_socket(self.ha, backlog=self.bl, bufsize=self.bs)]
            except OSError as exc:
                logger.error("cannot listen on %s:%s: %s", *self.ha, exc)
                return False
        self.ss = self.listeners[0]
        self.ha = self.ss.getsockname()
        self.eha = (self.eha[0], self.ha[1])  # type: ignore[has-type]  # port 0: the one bound
        self.opened = True
        return True

    def accept(self) -> tuple[Any, Any]:
        # Replaces hio's: from any of our listening sockets; a connection reset
        # before we accepted it is not an error.
        for sock in self.listeners:
            try:
                return sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
        return (None, None)

    def close_listeners(self) -> None:
        for sock in self.listeners:
            sock.close()
        self.listeners = []
        self.ss = None
        self.opened = False

    def close(self) -> None:
        # Replaces hio's Acceptor.close (and Server's, which adds closeAllIx): no
        # shutdown of a listening socket that other processes may share.
        self.close_listeners()
        if hasattr(self, "ixes"):
            self.closeAllIx()  # type: ignore[attr-defined]
        for cx in getattr(self, "cxes", {}).values():  # handshakes in progress
            cx.close()
        getattr(self, "cxes", {}).clear()

    def stop_accepting(self) -> None:
        """Take every connection already queued, then close our listening sockets:
        from now on the kernel hands new connections to the other replicas (or,
        for a shared socket, leaves them queued for its other holders)."""
        if not self.listeners:
            return
        self.serviceAxes()  # type: ignore[attr-defined]
        self.close_listeners()

    def listening(self) -> list[int]:
        return [sock.fileno() for sock in self.listeners]


def listening_socket(ha: tuple[str, int], *, backlog: int = 1024,
                     bufsize: int = 8096) -> socket.socket:
    """A non-blocking TCP socket listening on ``ha`` with SO_REUSEADDR and
    SO_REUSEPORT (so replicas, and a supervisor's sockets for them, share the
    address). Raises OSError."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            if sock.getsockopt(socket.SOL_SOCKET, option) < 2 * bufsize:
                sock.setsockopt(socket.SOL_SOCKET, option, bufsize)
        sock.setblocking(False)
        sock.bind(ha)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class _Refreshing:
    """A connection whose idle timer restarts from now on activity."""

    tymer: Any

    heard = False  # the client has sent something

    def refresh(self) -> None:
        # Replaces hio's Remoter.refresh, whose Tymer.restart() is lossless (it
        # restarts from the previous deadline): every send or receive pushed the
        # deadline a whole tymeout further, so a busy connection could never be
        # found idle afterwards.
        self.tymer.start()

    def receive(self) -> Any:
        # Extends hio's: remembers that the client has spoken (see drain_quiet).
        data = super().receive()  # type: ignore[misc]
        if data:
            self.heard = True
        return data

    @property
    def drain_quiet(self) -> float:
        """Seconds of quiet after which a draining server closes this connection."""
        return DRAIN_IDLE_S if self.heard else DRAIN_FRESH_S


class Remoter(_Refreshing, tcp_serving.Remoter):
    """hio's connection, with an idle timer that measures idleness."""


class RemoterTls(_Refreshing, tcp_serving.RemoterTls):
    """hio's TLS connection, with an idle timer that measures idleness."""



class _Reaping:
    """Closes and forgets connections that are cut off or idle past ``tymeout``;
    once :meth:`drain` was called, also those with nothing in flight."""

    ixes: dict[Any, Any]
    tymeout: float
    draining = False

    def drain(self) -> None:
        """Stop accepting; close each connection once nothing is in flight on it."""
        self.draining = True
        self.stop_accepting()  # type: ignore[attr-defined]

    @property
    def connections(self) -> int:
        """Open connections (a TLS handshake in progress counts)."""
        return len(self.ixes) + len(getattr(self, "cxes", ()))

    @property
    def idle(self) -> bool:
        """No connection is open."""
        return not self.connections

    def reap(self) -> None:
        for ca, ix in list(self.ixes.items()):
            if ix.cutoff or (self.tymeout > 0 and ix.tymer.expired):
                if not ix.cutoff:
                    ix.serviceSends()  # what is queued may still go out
                self.removeIx(ca)  # type: ignore[attr-defined]
            elif self.draining and not ix.rxbs and not ix.txbs and \
                    ix.tymer.elapsed >= ix.drain_quiet:
                self.removeIx(ca)  # type: ignore[attr-defined]

    def watch(self) -> list[Watch]:
        """The file descriptors to wait on: the listening socket and every
        connection (for writing too while it has bytes queued)."""
        found: list[Watch] = [(fd, False) for fd in self.listening()]  # type: ignore
        for ix in self.ixes.values():
            if ix.cs is not None:
                found.append((ix.cs.fileno(), bool(ix.txbs)))
        return found

    def reap_handshakes(self) -> None:
        """Plain TCP has none."""

    def service(self) -> None:
        super().service()  # type: ignore[misc]
        self.reap()


class Server(_ReusePort, _Reaping, tcp_serving.Server):
    """hio's non-blocking TCP server on a shared port (see the module docstring).
    ``tymeout``: seconds a connection may be idle (0: for ever); ``sockets``:
    listening sockets to accept from instead of binding ``ha``."""

    Tymeout = IDLE_TYMEOUT

    def serviceAxes(self) -> None:
        # Replaces hio's, which passes the idle timeout to Remoter as ``timeout=``
        # where Remoter takes ``tymeout=`` (so it never reached a connection).
        self.serviceAccepts()
        while self.axes:
            cs, ca = self.axes.popleft()
            self.ixes[ca] = Remoter(tymth=self.tymth, ha=cs.getsockname(),
                                                ca=ca, cs=cs, bs=self.bs, wl=self.wl,
                                                tymeout=self.tymeout)


class ServerTls(_ReusePort, _Reaping, tcp_serving.ServerTls):
    """hio's TLS server on a shared port; a handshake that does not finish within
    ``tymeout`` is dropped too."""

    Tymeout = IDLE_TYMEOUT

    def serviceAxes(self) -> None:
        # Replaces hio's for the same keyword as Server.serviceAxes.
        self.serviceAccepts()
        while self.axes:
            cs, ca = self.axes.popleft()
            try:
                remoter = RemoterTls(
                    tymth=self.tymth, ha=cs.getsockname(), ca=ca, bs=self.bs, cs=cs,
                    wl=self.wl, tymeout=self.tymeout, context=self.context)
            except OSError:  # gone before its handshake began
                cs.close()
                continue
            self.cxes[ca] = remoter

    def reap(self) -> None:
        super().reap()
        self.reap_handshakes()

    def reap_handshakes(self) -> None:
        """Drop handshakes that took longer than ``tymeout``."""
        for ca, cx in list(self.cxes.items()):
            if self.tymeout > 0 and cx.tymer.expired:  # a handshake that never ends
                cx.close()
                del self.cxes[ca]

    def watch(self) -> list[Watch]:
        found = super().watch()
        # a handshake in progress waits for either direction
        found += [(cx.cs.fileno(), False) for cx in self.cxes.values() if cx.cs is not None]
        return found


def guard(app: Callable) -> Callable:
    """A WSGI app that never raises into the server: an exception before the
    response started becomes a 500 (logged with its traceback); after that, the
    response is cut and the connection closed. It adds ``Connection: close`` when
    the server will close the connection after the response."""

    def guarded(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        closing = not environ.get("hiocluster.keep_alive", True)

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if closing and not any(name.lower() == "connection" for name, _ in headers):
                headers = [*headers, ("Connection", "close")]
            return start_response(status, headers, exc_info)

        try:
            body = app(environ, start)
            if type(body) is list:  # nothing left to raise (falcon's usual answer)
                return body
            return _Guarded(iter(body), environ, start, body)
        except Exception:
            return _failure(environ, start, sys.exc_info())

    return guarded


def _failure(environ: dict[str, Any], start: Callable, exc_info: Any) -> list[bytes]:
    logger.error("%s %s: the app raised\n%s", environ.get("REQUEST_METHOD"),
                 environ.get("PATH_INFO"), "".join(traceback.format_exception(*exc_info)))
    body = b"500 Internal Server Error\n"
    start("500 Internal Server Error", [("Content-Type", "text/plain"),
                                        ("Content-Length", str(len(body)))], exc_info)
    return [body]


class _Guarded:
    """The app's body iterator: an exception while it is read is answered as in
    :func:`guard` (hio's own handler logs it and leaves the response hanging)."""

    def __init__(self, body: Iterator[bytes], environ: dict[str, Any], start: Callable,
                 original: Any) -> None:
        self.body, self.environ, self.start, self.original = body, environ, start, original
        self.sent = False
        self.failed: list[bytes] | None = None

    def __iter__(self) -> _Guarded:
        return self

    def __next__(self) -> bytes:
        if self.failed is not None:
            if not self.failed:
                raise StopIteration
            return self.failed.pop(0)
        try:
            chunk = next(self.body)
        except StopIteration:
            if hasattr(self.original, "close"):
                self.original.close()
            raise
        except Exception:
            if self.sent:  # the head is out: all we can do is cut the connection
                logger.error("%s %s: the app raised while sending its response\n%s",
                             self.environ.get("REQUEST_METHOD"), self.environ.get("PATH_INFO"),
                             traceback.format_exc())
                self.environ["hiocluster.abort"] = True
                raise StopIteration from None
            self.failed = _failure(self.environ, self.start, sys.exc_info())
            return self.failed.pop(0)
        if chunk:
            self.sent = True
        return chunk


class WsgiServer(http_serving.Server):
    """hio's WSGI HTTP server (see the module docstring) on a shared port: plain,
    or TLS with ``context`` (an ``ssl.SSLContext``) or ``certpath``/``keypath``.

    Args:
        app: the WSGI application.
        ha: ``(host, port)`` to listen on.
        tymeout: seconds a connection may stay idle, and a request may take from
            its first byte to its last (0: no limit).
        context, certpath, keypath: TLS (https) when given.
        sockets: listening sockets to serve instead of binding ``ha`` (see
            :class:`Server`).
    """

    Tymeout = IDLE_TYMEOUT

    def __init__(self, app: Callable, ha: tuple[str, int], *, tymeout: float | None = None,
                 context: Any = None, certpath: str | None = None,
                 keypath: str | None = None, bufsize: int = 8096,
                 sockets: Iterable[socket.socket] = (), **kwa: Any) -> None:
        tymeout = self.Tymeout if tymeout is None else tymeout
        if context is not None or certpath or keypath:
            servant: Any = ServerTls(ha=ha, bs=bufsize, tymeout=tymeout, context=context,
                                     certpath=certpath, keypath=keypath, certify=0,
                                     sockets=sockets)
        else:
            servant = Server(ha=ha, bs=bufsize, tymeout=tymeout, sockets=sockets)
        super().__init__(app=guard(app), servant=servant, ha=ha, tymeout=tymeout, **kwa)
        self.tymeout = tymeout
        self.started: dict[Any, float] = {}   # connection -> when its request began
        self.served = 0                       # responses completed
        self.draining = False
        self.again = False                    # a pipelined request waits (see busy)

    def watch(self) -> list[Watch]:
        return self.servant.watch()

    def drain(self) -> None:
        """Stop accepting; answer what is asked with ``Connection: close`` and close
        each connection once its response is out."""
        self.servant.stop_accepting()
        self.draining = True

    @property
    def connections(self) -> int:
        return self.servant.connections

    @property
    def idle(self) -> bool:
        return self.servant.idle

    @property
    def busy(self) -> bool:
        """An app's response is being produced, or a request that came in behind
        the last response (pipelined) waits to be parsed: run again soon, do not
        sleep (no socket will wake us for bytes already read)."""
        return self.again or any(not rep.ended for rep in self.reps.values())

    def buildEnviron(self, requestant: Any) -> dict[str, Any]:
        # Extends hio's: tells the guarded app whether the connection stays open.
        if self.draining:
            requestant.persisted = False  # closed after this response
        environ = super().buildEnviron(requestant)
        environ["hiocluster.keep_alive"] = bool(requestant.persisted)
        return environ

    def serviceConnects(self) -> None:
        # Extends hio's: hio never times out a kept-alive connection (it sets its
        # tymeout to 0), and a request trickling in keeps refreshing the timer.
        super().serviceConnects()
        self.servant.reap_handshakes()
        if self.tymeout <= 0 and not self.draining:
            return
        now = self.servant.tyme
        for ca, ix in list(self.servant.ixes.items()):
            requestant = self.reqs.get(ca)
            if requestant is None:
                continue
            if requestant.ended or not (requestant.msg or requestant.headed):
                self.started.pop(ca, None)  # between requests: idle, by its timer
                expired = (self.draining and ix.tymer.elapsed >= ix.drain_quiet) or \
                    (self.tymeout > 0 and ix.tymer.expired)
                if expired and not ix.txbs and (ca not in self.reps or self.reps[ca].ended):
                    self.closeConnection(ca)
                continue
            if self.tymeout <= 0:
                continue
            began = self.started.setdefault(ca, now)
            if now - began > self.tymeout:  # slow or stalled request
                self.closeConnection(ca)

    def serviceReps(self) -> None:
        # Extends hio's: a response the app broke off closes its connection; count
        # finished responses.
        for ca, rep in list(self.reps.items()):
            if rep.environ.get("hiocluster.abort") and rep.ended:
                self.closeConnection(ca)
        running = [(ca, rep) for ca, rep in self.reps.items() if not rep.ended]
        super().serviceReps()
        finished = [ca for ca, rep in running if rep.ended]
        self.served += len(finished)
        # hio parses a connection's next request only in the cycle after its last
        # response ended: if its bytes are here already, say so (busy)
        self.again = any(ca in self.reqs and self.reqs[ca].msg for ca in finished)

    def closeConnection(self, ca: Any) -> None:
        # Extends hio's: a responder whose app never started has nothing to finish
        # (hio would write to it and raise AssertionError, hiding the first error).
        rep = self.reps.get(ca)
        if rep is not None and not rep.started:
            rep.ended = True
        self.started.pop(ca, None)
        if ca in self.servant.ixes or ca in self.reqs or ca in self.reps:
            super().closeConnection(ca)

    def close(self) -> None:
        super().close()
        self.started.clear()
