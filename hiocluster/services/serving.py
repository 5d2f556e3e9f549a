"""hio's TCP, TLS and WSGI servers, extended for replicas that share one port.

Subclasses of hio's own servers (``hio.core.tcp``, ``hio.core.http``), each
replacing or extending as little as it can:

* :class:`Server`, :class:`ServerTls`: the listening socket also sets
  SO_REUSEPORT, so every replica of a service binds the same address and the
  kernel spreads connections over them; connections get the server's idle
  ``tymeout`` (hio passes it under the wrong keyword), and idle or cut-off
  connections are closed and forgotten instead of held for ever. Out of file
  descriptors, a server stops accepting for a moment (hio's accept raises);
  a connection's buffer is bounded (it is not read while ``rx_cap`` bytes wait
  to be handled or ``TX_PAUSE`` bytes to go out), and an error on one socket
  closes that connection only (hio's send raises on EPIPE).
* :class:`WsgiServer`: hio's WSGI server on one of those, where an app that
  raises gets a 500 response (logged with its traceback) instead of ending the
  Doist; a request that hio's parser rejects or chokes on (hio raises
  ValueError on ``Host:x``, a header line without a colon, a bad chunk size) is
  answered 400 (431: head over MAX_HEAD; 413: body over ``max_body``; 501, 505)
  and its connection closed, never the server; a request that is not complete
  within ``tymeout`` of its first byte is closed (slowloris), as is a connection
  idle for ``tymeout``; the response says ``Connection: close`` when the server
  will close the connection after it, and the connection closes as soon as the
  response is out; closing a connection whose app never started no longer raises.

Each server can say which file descriptors it waits on (:meth:`Server.watch`),
so a replica's loop sleeps until one is ready (hiocluster.services.replica).
"""

from __future__ import annotations

import errno
import json
import logging
import re
import socket
import sys
import time
import traceback
from typing import Any, Callable, Iterable, Iterator

from hio.core.http import httping
from hio.core.http import serving as http_serving
from hio.core.tcp import serving as tcp_serving

from hiocluster.runtime.replicas import listening_socket
from hiocluster.services.core import Latency

__all__ = ["Server", "ServerTls", "WsgiServer", "guard", "listening_socket", "Watch",
           "IDLE_TYMEOUT", "MAX_BODY", "MAX_HEAD", "WRITE_ONLY", "FdWatch"]

logger = logging.getLogger("hiocluster.serving")

#: Seconds a connection may stay idle (and a request may take to arrive) by default.
IDLE_TYMEOUT = 60.0

#: Seconds a connection must have been quiet before a draining server closes it:
#: a client that just connected is sending its request, not idling.
DRAIN_IDLE_S = 0.25
#: The same for a connection that has not sent a byte yet (its client may be
#: slow to send its first request, on a busy machine): it is given longer.
DRAIN_FRESH_S = 2.0

#: Largest request body a WSGI server takes by default (bytes; 413 beyond).
MAX_BODY = 1 << 20
#: Largest request head (request line and headers, bytes; 431 beyond).
MAX_HEAD = 64 << 10
#: Bytes a connection may hold unread before its body is judged too large: room
#: for chunk framing (1-byte chunks take 6 bytes each) is made by the parser
#: consuming as it goes; this is only the slack for one partial chunk line.
RX_SLACK = 64 << 10
#: A connection is not read while this many bytes wait to go out to it (a client
#: that sends and does not read its answers is slowed to its own pace).
TX_PAUSE = 1 << 20
#: Most bytes read from one connection per cycle: a fast sender cannot hold a
#: cycle (and every other connection, and the request timeout) for long.
READ_BUDGET = 256 << 10
#: Seconds a server stops accepting when it is out of file descriptors.
ACCEPT_PAUSE_S = 0.1
#: Errors of accept() that mean "out of descriptors or memory", not a bad socket.
_STARVED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

#: ``(fd, wants to write)``: what a server waits on; ``(fd, WRITE_ONLY)``: only
#: for writing (a connection that is not read until its answers went out).
Watch = tuple[int, int]
WRITE_ONLY = 2

class FdWatch:
    """The file descriptors one doer sleeps on (its servers' :class:`Watch`
    list), kept registered with a loop's poller as they open and close."""

    def __init__(self, poller: Any) -> None:
        self.poller = poller
        self.watched: dict[int, int] = {}
        self.last: list[Watch] = []

    def update(self, listed: list[Watch]) -> None:
        if listed == self.last:  # the common case: nothing opened or closed
            return
        self.last = listed
        watch = dict(listed)
        for fd in [fd for fd in self.watched if fd not in watch]:
            self.poller.unregister(fd)
            del self.watched[fd]
        for fd, mode in watch.items():
            if self.watched.get(fd) != mode:
                self.poller.register(fd, bool(mode), read=mode != WRITE_ONLY)
                self.watched[fd] = mode

    def clear(self) -> None:
        self.update([])


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

    paused_until = 0.0   # out of descriptors: no accept() before (monotonic)
    starved = False      # said so (once until an accept succeeds again)

    def accept(self) -> tuple[Any, Any]:
        # Replaces hio's: from any of our listening sockets; a connection reset
        # before we accepted it is not an error; out of descriptors (EMFILE), stop
        # accepting for ACCEPT_PAUSE_S (hio raises, ending the process).
        if self.paused_until and time.monotonic() < self.paused_until:
            return (None, None)
        for sock in self.listeners:
            try:
                found = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                if exc.errno not in _STARVED:
                    raise
                self.paused_until = time.monotonic() + ACCEPT_PAUSE_S
                if not self.starved:
                    self.starved = True
                    logger.warning("%s:%s: cannot accept (%s): not accepting for a moment;"
                                   " serving the %d connections open", *self.ha,
                                   exc.strerror, len(getattr(self, "ixes", ())))
                return (None, None)
            if self.starved:
                self.starved = False
                logger.warning("%s:%s: accepting again", *self.ha)
            return found
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
        """The listening sockets to wait on (none while accepting is paused)."""
        if self.paused_until and time.monotonic() < self.paused_until:
            return []
        return [sock.fileno() for sock in self.listeners]


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

    rx_cap = MAX_BODY + MAX_HEAD + RX_SLACK   # set by the server
    more = False   # stopped reading at READ_BUDGET: read again at once
    rxbs: bytearray
    txbs: bytearray
    cutoff: bool

    @property
    def reading(self) -> bool:
        """Whether to read more: fewer than ``rx_cap`` bytes wait to be handled and
        fewer than TX_PAUSE to go out."""
        return len(self.rxbs) < self.rx_cap and len(self.txbs) < TX_PAUSE

    def serviceReceives(self) -> None:
        # Replaces hio's, which reads until the socket is empty (a fast sender
        # fills memory, 300 MB in one cycle) and raises on unexpected errors.
        rxbs = self.rxbs
        budget = READ_BUDGET
        try:
            while not self.cutoff and len(rxbs) < self.rx_cap and len(self.txbs) < TX_PAUSE:
                data = self.receive()
                if not data:
                    return
                rxbs.extend(data)
                budget -= len(data)
                if budget <= 0:  # more may wait (in TLS, where poll cannot see it)
                    self.more = True
                    return
        except OSError as exc:
            logger.debug("connection %s: %s", getattr(self, "ca", "?"), exc)
            self.cutoff = True

    def serviceSends(self) -> None:
        # Extends hio's, whose send raises on EPIPE (a client that went away).
        try:
            super().serviceSends()  # type: ignore[misc]
        except OSError as exc:
            logger.debug("connection %s: %s", getattr(self, "ca", "?"), exc)
            self.cutoff = True

    def watched(self) -> Watch | None:
        """What this connection waits on (None: nothing, it is not read for now
        and has nothing to send)."""
        if self.cs is None:  # type: ignore[attr-defined]
            return None
        fd = self.cs.fileno()  # type: ignore[attr-defined]
        if self.reading:
            return (fd, bool(self.txbs))
        return (fd, WRITE_ONLY) if self.txbs else None

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
        more = False
        for ix in self.ixes.values():
            if ix.more:
                ix.more, more = False, True
            item = ix.watched()
            if item is not None:
                found.append(item)
        self.hurry = more
        return found

    hurry = False  # a connection has more to read (see Remoter.more)

    @property
    def busy(self) -> bool:
        """A connection stopped reading at its budget: run again at once. (Known
        after :meth:`watch`.)"""
        return self.hurry

    def reap_handshakes(self) -> None:
        """Plain TCP has none."""

    def service(self) -> None:
        super().service()  # type: ignore[misc]
        self.reap()


class Server(_ReusePort, _Reaping, tcp_serving.Server):
    """hio's non-blocking TCP server on a shared port (see the module docstring).
    ``tymeout``: seconds a connection may be idle (0: for ever); ``sockets``:
    listening sockets to accept from instead of binding ``ha``; ``rx_cap``: most
    bytes read from one connection and not yet handled."""

    Tymeout = IDLE_TYMEOUT
    rx_cap = MAX_BODY + MAX_HEAD + RX_SLACK

    def serviceAxes(self) -> None:
        # Replaces hio's, which passes the idle timeout to Remoter as ``timeout=``
        # where Remoter takes ``tymeout=`` (so it never reached a connection).
        self.serviceAccepts()
        while self.axes:
            cs, ca = self.axes.popleft()
            try:
                remoter = Remoter(tymth=self.tymth, ha=cs.getsockname(), ca=ca, cs=cs,
                                  bs=self.bs, wl=self.wl, tymeout=self.tymeout)
            except OSError:  # gone already
                cs.close()
                continue
            remoter.rx_cap = self.rx_cap
            self.ixes[ca] = remoter


class ServerTls(_ReusePort, _Reaping, tcp_serving.ServerTls):
    """hio's TLS server on a shared port; a handshake that does not finish within
    ``tymeout`` is dropped too."""

    Tymeout = IDLE_TYMEOUT
    rx_cap = MAX_BODY + MAX_HEAD + RX_SLACK

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
            remoter.rx_cap = self.rx_cap
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


#: A JSON string of a str (the C encoder json.dumps uses), quotes included.
_json_text: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]
#: Seconds an access log's lines may wait in its buffer.
ACCESS_LOG_FLUSH_S = 1.0


class AccessLog:
    """A WSGI app that writes one line per answered request to ``path`` ("-":
    standard output, which the run prefixes with the replica's name): ``common``
    (the Common Log Format) or ``json`` (one object per line). Lines are buffered
    and written at most :data:`ACCESS_LOG_FLUSH_S` late; :meth:`reopen` (SIGUSR1)
    opens the file again after a log rotation. Requests refused before the app
    (400, 413, 431, ...) are not logged."""

    def __init__(self, app: Callable, path: str, format: str = "common",
                 replica: str = "-") -> None:
        self.app, self.path, self.format, self.replica = app, path, format, replica
        self.second, self.when = -1, ""  # the last second formatted, and its text
        self.lines: list[str] = []
        self.flush_at = 0.0
        self.out: Any = None
        self.reopen()

    def reopen(self) -> None:
        """(Re)open the log: after a rotation, lines go to the new file."""
        self.flush()
        if self.out is not None and self.out is not sys.stdout:
            self.out.close()
        self.out = sys.stdout if self.path == "-" else open(  # noqa: SIM115 (kept open)
            self.path, "a", encoding="utf-8")

    def flush(self) -> None:
        if self.lines and self.out is not None:
            self.out.write("".join(self.lines))
            self.out.flush()
            self.lines.clear()
        self.flush_at = time.monotonic() + ACCESS_LOG_FLUSH_S

    def close(self) -> None:
        self.flush()
        if self.out is not None and self.out is not sys.stdout:
            self.out.close()
        self.out = None

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        said: list[Any] = []

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            said[:] = [status, headers]
            return start_response(status, headers, exc_info)

        body = self.app(environ, start)
        if said:
            status, headers = said
            size: int | None = sum(map(len, body)) if type(body) is list else next(
                (int(value) for name, value in headers
                 if name.lower() == "content-length" and value.isdigit()), None)
            self._line(environ, int(status[:3]), size)
        return body

    def _line(self, environ: dict[str, Any], status: int, size: int | None) -> None:
        query = environ.get("QUERY_STRING") or ""
        path = environ.get("PATH_INFO", "") + (f"?{query}" if query else "")
        remote = environ.get("REMOTE_ADDR") or "-"
        if isinstance(remote, tuple):  # hio gives the peer's (host, port)
            remote = str(remote[0])
        method, protocol = environ.get("REQUEST_METHOD", "-"), environ.get("SERVER_PROTOCOL", "-")
        now = time.time()
        if self.format == "json":  # by hand: json.dumps of a dict costs 2.5x as much
            text = _json_text
            line = (f'{{"time": {now:.3f}, "remote": {text(remote)}, "method": '
                    f'{text(method)}, "path": {text(path)}, "protocol": {text(protocol)}, '
                    f'"status": {status}, "bytes": {"null" if size is None else size}, '
                    f'"replica": {text(self.replica)}}}')
        else:
            if '"' in path or "\\" in path or not path.isprintable():  # escaped, as nginx does
                path = path.encode("unicode_escape").decode("ascii").replace('"', "\\x22")
            second = int(now)
            if second != self.second:  # the date is formatted once a second
                self.second, self.when = second, time.strftime(
                    "%d/%b/%Y:%H:%M:%S +0000", time.gmtime(second))
            line = (f'{remote} - - [{self.when}] "{method} {path} {protocol}" {status} '
                    f'{"-" if size is None else size}')
        self.lines.append(line + "\n")
        if time.monotonic() >= self.flush_at or len(self.lines) >= 1024:
            self.flush()


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


class Rejected(Exception):
    """A request answered with ``status`` (400, 413, 431...) and its connection
    closed: ``reason`` says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(_TOKEN + rb" [^\x00-\x20\x7f]+ HTTP/(\d)\.\d")
_FIELD_NAME = re.compile(_TOKEN)
_HEAD_END = re.compile(rb"\r?\n\r?\n")
#: header lines hio reads right: ``name: value`` CRLF (value without CR, LF; not
#: starting with a space)
_CANONICAL = re.compile(rb"(?:" + _TOKEN + rb": [^\s][^\r\n]*\r\n|" + _TOKEN + rb": \r\n)*")
_METHODS = frozenset(method.encode() for method in httping.METHODS)
_REASONS = {400: "Bad Request", 413: "Content Too Large", 431: "Request Header Fields Too Large",
            501: "Not Implemented", 505: "HTTP Version Not Supported"}


def _checked_head(head: bytes) -> bytes | None:
    """The request line and header lines ``head`` (without the blank line that
    ends them), checked (RFC 9112) and rewritten as hio's parser reads them:
    ``name: value`` (hio splits on ``": "`` and raises ValueError on ``Host:x``,
    valid HTTP, and on a line without a colon); None when ``head`` is already
    so (the usual case, checked by one regular expression). Raises Rejected."""
    line_end = head.find(b"\n")
    request = head if line_end < 0 else head[:line_end]
    if request.endswith(b"\r"):
        request = request[:-1]
    found = _REQUEST_LINE.fullmatch(request)
    if found is None:
        raise Rejected(400, f"bad request line {bytes(request[:60])!r}")
    if found[1] != b"1":
        raise Rejected(505, f"HTTP version {bytes(request.rsplit(b' ', 1)[1])!r}")
    if request[:request.find(b" ")] not in _METHODS:
        raise Rejected(501, f"method {bytes(request.split(b' ', 1)[0][:20])!r}")
    count = head.count(b"\n")
    if count > httping.MAX_HEADERS:
        raise Rejected(431, f"{count} header lines (at most {httping.MAX_HEADERS})")
    if line_end < 0:
        return head + b"\r\n\r\n"
    fields = head[line_end + 1:] + b"\r\n"
    lower = fields.lower()
    if b"content-length" not in lower and b"transfer-encoding" not in lower and \
            _CANONICAL.fullmatch(fields):
        return None  # hio reads it as it is
    lines = head.split(b"\n")
    out = [request]
    lengths = set()
    chunked = False
    for line in lines[1:]:
        if line.endswith(b"\r"):
            line = line[:-1]
        name, colon, value = line.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name):  # also obs-fold, "Host :x"
            raise Rejected(400, f"bad header line {bytes(line[:60])!r}")
        value = value.strip(b" \t")
        lower = name.lower()
        if lower == b"content-length":
            if not value.isdigit():
                raise Rejected(400, f"Content-Length {bytes(value[:30])!r}")
            lengths.add(int(value))
        elif lower == b"transfer-encoding":
            if value.lower() != b"chunked":
                raise Rejected(501, f"Transfer-Encoding {bytes(value[:30])!r}")
            chunked = True
        out.append(name + b": " + value)
    if len(lengths) > 1 or (lengths and chunked):  # ambiguous: a smuggling attempt
        raise Rejected(400, "conflicting Content-Length / Transfer-Encoding")
    out.extend((b"", b""))
    return b"\r\n".join(out)


class Requestant(http_serving.Requestant):
    """hio's request parser, made safe for anything a client sends: the head is
    bounded (MAX_HEAD), checked and normalised before hio parses it; the body is
    bounded (``max_body``); whatever is wrong, or whatever hio raises, becomes an
    error response (:attr:`rejected`) queued on the connection, never an
    exception out of :meth:`parse`."""

    def __init__(self, *, max_body: int = MAX_BODY, **kwa: Any) -> None:
        self.max_body = max_body
        self.rejected: int | None = None   # the status answered, once rejected
        self.parser: Any = None            # hio's parse generator (hio sets it)
        super().__init__(**kwa)

    def parseHead(self) -> Iterator[bool | None]:
        # Extends hio's: waits for the whole head first (bounded), checks and
        # normalises it (see _checked_head), then lets hio parse it in one go.
        if self.headed:
            return
        msg = self.msg
        while True:
            while msg and msg[0] in b"\r\n":  # blank lines before a request
                del msg[:1]
            end = msg.find(b"\r\n\r\n", 0, MAX_HEAD + 4)  # the usual end, else a bare LF's
            if end >= 0:
                start, stop = end, end + 4
                break
            if b"\n\n" in msg or b"\n\r\n" in msg:
                found = _HEAD_END.search(msg, 0, MAX_HEAD + 4)
                if found is not None:
                    start, stop = found.start(), found.end()
                    break
            if len(msg) > MAX_HEAD:
                raise Rejected(431, f"request head over {MAX_HEAD} bytes")
            if self.closed:
                raise httping.PrematureClosure("connection closed within the request head")
            yield None
        checked = _checked_head(bytes(msg[:start]))
        if checked is not None:
            msg[:stop] = checked
        for result in super().parseHead():
            if result is not None and self.length is not None and \
                    self.length > self.max_body:
                raise Rejected(413, f"Content-Length {self.length} over max_body "
                                    f"{self.max_body}")
            yield result

    def parse(self) -> None:
        # Extends hio's: nothing escapes; a body grown past max_body is refused.
        try:
            super().parse()
        except Exception as exc:  # hio raises ValueError, IndexError... on bad input
            status = exc.status if isinstance(exc, Rejected) else 400
            self.reject(status, f"{type(exc).__name__}: {exc}")
            return
        if self.errored:  # hio's own HTTPException: the error is said, not raised
            self.reject(400, self.error or "")
        elif self.headed and (len(self.body) > self.max_body or (
                not self.ended and len(self.msg) > self.max_body + RX_SLACK)):
            self.reject(413, f"body over max_body {self.max_body}")

    def reject(self, status: int, reason: str) -> None:
        """Answer ``status`` (unless the client is gone) and end this request: its
        connection is closed once the answer is out."""
        logger.debug("%s: request rejected, %d: %s", self.remoter.ca, status, reason)
        if self.parser is not None:
            self.parser.close()
            self.parser = None
        self.rejected, self.errored, self.error = status, True, ""
        self.ended, self.persisted = True, False
        if not self.closed and not self.remoter.cutoff:
            text = f"{status} {_REASONS.get(status, 'Bad Request')}"
            body = f"{text}\n".encode()
            self.remoter.tx(f"HTTP/1.1 {text}\r\nContent-Type: text/plain\r\n"
                            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                            .encode() + body)


class Responder(http_serving.Responder):
    """hio's WSGI responder; anything raised while answering (hio's write raises
    on a str body, a bad status...) ends this response and its connection only."""

    def service(self) -> None:
        try:
            super().service()
        except Exception:
            logger.error("%s %s: answering failed\n%s", self.environ.get("REQUEST_METHOD"),
                         self.environ.get("PATH_INFO"), traceback.format_exc())
            self.environ["hiocluster.abort"] = True
            self.ended = True


class WsgiServer(http_serving.Server):
    """hio's WSGI HTTP server (see the module docstring) on a shared port: plain,
    or TLS with ``context`` (an ``ssl.SSLContext``) or ``certpath``/``keypath``.

    Args:
        app: the WSGI application.
        ha: ``(host, port)`` to listen on.
        tymeout: seconds a connection may stay idle, and a request may take from
            its first byte to its last (0: no limit).
        max_body: largest request body in bytes (413 beyond; the connection is
            not read further than that).
        context, certpath, keypath: TLS (https) when given.
        sockets: listening sockets to serve instead of binding ``ha`` (see
            :class:`Server`).
    """

    Tymeout = IDLE_TYMEOUT

    def __init__(self, app: Callable, ha: tuple[str, int], *, tymeout: float | None = None,
                 max_body: int = MAX_BODY, context: Any = None, certpath: str | None = None,
                 keypath: str | None = None, bufsize: int = 8096,
                 sockets: Iterable[socket.socket] = (), **kwa: Any) -> None:
        tymeout = self.Tymeout if tymeout is None else tymeout
        if context is not None or certpath or keypath:
            servant: Any = ServerTls(ha=ha, bs=bufsize, tymeout=tymeout, context=context,
                                     certpath=certpath, keypath=keypath, certify=0,
                                     sockets=sockets)
        else:
            servant = Server(ha=ha, bs=bufsize, tymeout=tymeout, sockets=sockets)
        servant.rx_cap = max_body + MAX_HEAD + RX_SLACK
        super().__init__(app=guard(app), servant=servant, ha=ha, tymeout=tymeout, **kwa)
        self.tymeout = tymeout
        self.max_body = max_body
        self.started: dict[Any, float] = {}   # connection -> when its request began
        self.served = 0                       # responses completed
        self.latency = Latency()              # from a request read whole to its answer out
        self.begun: dict[Any, float] = {}     # connection -> when its request was read
        self.draining = False
        self.again = False                    # a pipelined request waits (see busy)
        self.closing: set[Any] = set()        # answered; closed once the bytes are out

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
        return self.again or self.servant.hurry or \
            any(not rep.ended for rep in self.reps.values())

    def buildEnviron(self, requestant: Any) -> dict[str, Any]:
        # Extends hio's: tells the guarded app whether the connection stays open.
        if self.draining:
            requestant.persisted = False  # closed after this response
        environ = super().buildEnviron(requestant)
        environ["hiocluster.keep_alive"] = bool(requestant.persisted)
        return environ

    def serviceConnects(self) -> None:
        # Replaces hio's, which makes hio's Requestant (ours cannot be raised out
        # of) and never times out a kept-alive connection (it sets its tymeout to
        # 0); a request trickling in must be whole within tymeout of its first byte.
        servant = self.servant
        servant.serviceConnects()
        servant.reap_handshakes()
        reqs, reps = self.reqs, self.reps
        tymeout, draining = self.tymeout, self.draining
        now = servant.tyme
        for ca, ix in list(servant.ixes.items()):
            if ix.cutoff:
                self.closeConnection(ca)
                continue
            requestant = reqs.get(ca)
            if requestant is None:
                reqs[ca] = Requestant(msg=ix.rxbs, remoter=ix, max_body=self.max_body)
                continue
            if tymeout <= 0 and not draining:
                continue
            if requestant.ended or not (requestant.msg or requestant.headed):
                self.started.pop(ca, None)  # between requests: idle, by its timer
                expired = (draining and ix.tymer.elapsed >= ix.drain_quiet) or \
                    (tymeout > 0 and ix.tymer.expired)
                if expired and not ix.txbs and (ca not in reps or reps[ca].ended):
                    self.closeConnection(ca)
                continue
            if tymeout <= 0:
                continue
            began = self.started.setdefault(ca, now)
            if now - began > tymeout:  # slow or stalled request
                self.closeConnection(ca)

    def serviceReqs(self) -> None:
        # Replaces hio's: a request our Requestant rejected was answered (400, 413,
        # 431...) and its connection closes once that is out; the responder is
        # ours, so nothing the app or hio raises while answering escapes either.
        reps = self.reps
        now = 0.0
        for ca, requestant in list(self.reqs.items()):
            if requestant.parser is None:
                continue
            requestant.parse()
            if not requestant.ended:
                continue
            if requestant.errored:
                self.started.pop(ca, None)
                self.closing.add(ca)
                continue
            environ = self.buildEnviron(requestant)
            self.begun[ca] = now = now or time.perf_counter()
            chunkable = requestant.version >= (1, 1)
            responder = reps.get(ca)
            if responder is None:
                reps[ca] = Responder(incomer=requestant.remoter, app=self.app,
                                     environ=environ, chunkable=chunkable)
            else:
                responder.reset(environ=environ, chunkable=chunkable)

    def serviceReps(self) -> None:
        # Extends hio's: a response the app broke off closes its connection; count
        # finished responses; note the connections to close once they are out.
        running = [(ca, rep) for ca, rep in self.reps.items() if not rep.ended]
        super().serviceReps()
        finished = [ca for ca, rep in running if rep.ended]
        self.served += len(finished)
        reqs = self.reqs
        now = time.perf_counter() if finished else 0.0
        begun, latency = self.begun, self.latency
        for ca in finished:
            latency.add(now - begun.pop(ca, now))
            requestant = reqs.get(ca)
            if requestant is None or not requestant.persisted or \
                    self.reps[ca].environ.get("hiocluster.abort"):
                self.closing.add(ca)
        # hio parses a connection's next request only in the cycle after its last
        # response ended: if its bytes are here already, say so (busy)
        self.again = any(ca in reqs and reqs[ca].msg for ca in finished)

    def service(self) -> None:
        # Extends hio's: a connection that closes after its response closes as soon
        # as the response is out, not a cycle later (hio waits for a cycle that
        # finds its bytes gone: an idle replica sleeps for IDLE_WAIT_S before it).
        super().service()
        if self.closing:
            ixes = self.servant.ixes
            for ca in list(self.closing):
                ix = ixes.get(ca)
                if ix is None or not ix.txbs or ix.cutoff:
                    self.closeConnection(ca)

    def closeConnection(self, ca: Any) -> None:
        # Extends hio's: a responder whose app never started has nothing to finish
        # (hio would write to it and raise AssertionError, hiding the first error);
        # what is queued (an error response) goes out first.
        rep = self.reps.get(ca)
        if rep is not None and not rep.started:
            rep.ended = True
        self.started.pop(ca, None)
        self.begun.pop(ca, None)
        self.closing.discard(ca)
        ix = self.servant.ixes.get(ca)
        if ix is not None and ix.txbs and not ix.cutoff:
            ix.serviceSends()
        if ix is not None or ca in self.reqs or ca in self.reps:
            super().closeConnection(ca)

    def close(self) -> None:
        super().close()
        self.started.clear()
        self.closing.clear()
