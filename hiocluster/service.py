"""What a service's author writes: the node class each replica of a service runs.

A service (``[services.NAME]`` in a topology) is ``replicas`` processes, each
running one instance of its class in real time, all listening on the same
address (SO_REUSEPORT: the kernel spreads connections over them). Subclass

* :class:`TcpService` and write :meth:`TcpService.receive` for a TCP (or TLS)
  server: hio's ``tcp.Server``/``ServerTls`` as extended in hiocluster.services.serving;
* :class:`WsgiService` and write :meth:`WsgiService.app` for HTTP(S): hio's WSGI
  server, any WSGI app (falcon, flask, bottle, a function);
* :class:`Service` itself for anything else: give it servers that have the
  methods :class:`Service` calls, and hio doers of your own.

Each instance sees ``self.name``, ``self.replica`` (0, 1, ...), ``self.params``
(the table ``[services.NAME.params]``), ``self.listen`` (``(host, port)``),
``self.timeout`` (idle connections and slow requests are closed after it),
``self.max_body`` (the largest HTTP request body, bytes) and ``self.tls`` (``(certificate, key)`` paths, or None) and ``self.sockets``: the
listening sockets its run made for it (pass them to your servers: connections
queued on them outlive a replica that dies or restarts).
"""

from __future__ import annotations

import io
import logging
import sys
import time
import traceback
from typing import Any, Callable

from hiocluster.services.core import Latency
from hiocluster.services.serving import AccessLog, Server, ServerTls, Watch, WsgiServer
from hiocluster.topology import ServiceSpec

__all__ = ["Service", "TcpService", "WsgiService"]

logger = logging.getLogger("hiocluster.service")


class Service:
    """Base of a service's class (see the module docstring). The replica calls, in
    order: :meth:`open` once, then every cycle :meth:`step` (and sleeps on
    :meth:`watch` unless :attr:`busy`); on STOP :meth:`drain`, then the cycles go
    on until :attr:`idle`; :meth:`close` last. :meth:`doers` are run beside it."""

    def __init__(self, spec: ServiceSpec, replica: int) -> None:
        self.spec = spec
        self.name, self.replica = spec.name, replica
        self.params = dict(spec.params)
        self.listen, self.timeout, self.tls = spec.listen, spec.timeout, spec.tls
        self.max_body = spec.max_body
        self.sockets: list[Any] = []   # set by the replica before open()
        self.servers: list[Any] = []

    def make_servers(self) -> list[Any]:
        """The servers this replica runs (made, not yet opened)."""
        return []

    def doers(self) -> list[Any]:
        """More hio doers to run in this replica's Doist (timers, clients...)."""
        return []

    def open(self) -> None:
        """Make and open the servers. Raises OSError naming what failed."""
        self.servers = self.make_servers()
        for server in self.servers:
            if not server.reopen():
                raise OSError(f"cannot listen on {self.listen[0]}:{self.listen[1]}")

    def wind(self, tymth: Callable[[], float]) -> None:
        """Give the servers the replica's clock (hio's tymth)."""
        for server in self.servers:
            server.wind(tymth)

    def step(self) -> None:
        """One cycle of I/O and work."""
        for server in self.servers:
            server.service()

    def watch(self) -> list[Watch]:
        """What to sleep on: ``(fd, wants to write)`` for every socket."""
        return [item for server in self.servers for item in server.watch()]

    @property
    def busy(self) -> bool:
        """Work is waiting that no socket will wake us for: do not sleep."""
        return any(getattr(server, "busy", False) for server in self.servers)

    def drain(self) -> None:
        """Stop accepting; finish what is in flight."""
        for server in self.servers:
            server.drain()

    @property
    def idle(self) -> bool:
        """Nothing is in flight (after :meth:`drain`: the replica may exit)."""
        return all(server.idle for server in self.servers)

    @property
    def served(self) -> int:
        """Requests (or messages) served so far."""
        return sum(getattr(server, "served", 0) for server in self.servers)

    @property
    def latency(self) -> Latency | None:
        """How long its requests took (a histogram over its servers'), or None when
        its servers do not measure it (TCP: a message has no answer to time)."""
        found = [server.latency for server in self.servers if hasattr(server, "latency")]
        if not found:
            return None
        if len(found) == 1:
            return found[0]
        total = Latency()
        for latency in found:
            total.merge(latency.counts, latency.total)
        return total

    @property
    def connections(self) -> int:
        return sum(server.connections for server in self.servers)

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def reopen_logs(self) -> None:
        """SIGUSR1: open log files again (after a rotation)."""

    def healthy(self) -> bool | None:
        """Whether this replica can serve, asked every ``health_interval`` seconds
        while it serves (None, the default: it has no check). A replica whose check
        fails (False, or an exception) ``health_failures`` times in a row is
        replaced: its successor takes its listening sockets and it drains. Keep it
        quick: it runs in the replica's loop, between requests."""
        return None


class TcpService(Service):
    """A TCP (or, with ``tls`` in the topology, TLS) server. Write :meth:`receive`."""

    def __init__(self, spec: ServiceSpec, replica: int) -> None:
        for key in ("access_log", "health_path"):
            if getattr(spec, key):
                raise ValueError(f"{key} is for HTTP services (WsgiService); service "
                                 f"{spec.name} is a TcpService")
        super().__init__(spec, replica)
        self.count = 0

    def make_servers(self) -> list[Any]:
        if self.tls is not None:
            return [ServerTls(ha=self.listen, tymeout=self.timeout, certpath=self.tls[0],
                              keypath=self.tls[1], certify=0, sockets=self.sockets)]
        return [Server(ha=self.listen, tymeout=self.timeout, sockets=self.sockets)]

    def receive(self, remoter: Any, data: bytes) -> None:
        """``data`` arrived on connection ``remoter`` (hio's Remoter: answer with
        ``remoter.tx(bytes)``). An exception closes this connection (logged with
        its traceback), not the replica."""
        raise NotImplementedError

    def step(self) -> None:
        # hio's Server.service in three parts, so what receive() sends goes out in
        # the same cycle as what it answers
        for server in self.servers:
            server.serviceConnects()
            server.serviceReceivesAllIx()
            for ca, remoter in list(server.ixes.items()):
                if remoter.rxbs:
                    data = bytes(remoter.rxbs)
                    remoter.clearRxbs()
                    try:
                        self.receive(remoter, data)
                    except Exception:
                        logger.error("%s: receive() raised; connection %s closed\n%s",
                                     self.name, ca, traceback.format_exc())
                        server.removeIx(ca)
                        continue
                    self.count += 1
            server.serviceSendsAllIx()
            server.reap()

    @property
    def served(self) -> int:
        return self.count


class WsgiService(Service):
    """An HTTP (or, with ``tls``, HTTPS) server of a WSGI app. Write :meth:`app`."""

    def app(self) -> Callable:
        """The WSGI application this replica serves."""
        raise NotImplementedError

    access_log: AccessLog | None = None
    wsgi: Callable | None = None     # the app this replica serves (app()'s)

    def make_servers(self) -> list[Any]:
        cert, key = self.tls if self.tls is not None else (None, None)
        app = self.wsgi = self.app()
        if self.spec.access_log:
            app = self.access_log = AccessLog(app, self.spec.access_log,
                                              self.spec.access_log_format,
                                              f"{self.name}.{self.replica}")
        return [WsgiServer(app, self.listen, tymeout=self.timeout, certpath=cert,
                           keypath=key, sockets=self.sockets, max_body=self.max_body)]

    def step(self) -> None:
        super().step()
        log = self.access_log
        if log is not None and log.lines and time.monotonic() >= log.flush_at:
            log.flush()  # lines wait at most ACCESS_LOG_FLUSH_S, however quiet it is

    def healthy(self) -> bool | None:
        """With ``health_path``: a GET of it, asked of the app directly (not over a
        socket, so it is this replica that answers; not in the access log); a
        2xx or 3xx answer is healthy. Without: no check (override for one)."""
        path = self.spec.health_path
        if not path or self.wsgi is None:
            return None
        status: list[str] = []

        def start(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status.append(line)
            return lambda data: None

        path, _, query = path.partition("?")
        host, port = self.listen
        environ = {"wsgi.version": (1, 0), "wsgi.url_scheme": "https" if self.tls else "http",
                   "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr,
                   "wsgi.multithread": False, "wsgi.multiprocess": True,
                   "wsgi.run_once": False, "REQUEST_METHOD": "GET", "SCRIPT_NAME": "",
                   "PATH_INFO": path, "QUERY_STRING": query, "SERVER_NAME": host,
                   "SERVER_PORT": str(port), "SERVER_PROTOCOL": "HTTP/1.1",
                   "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": f"{host}:{port}",
                   "HTTP_USER_AGENT": "hiocluster-health", "hiocluster.keep_alive": True}
        body = self.wsgi(environ, start)
        try:
            for _ in body:
                pass
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
        if not status:
            raise ValueError(f"GET {self.spec.health_path} gave no status")
        if status[-1][:1] not in ("2", "3"):
            raise ValueError(f"GET {self.spec.health_path}: {status[-1]}")
        return True

    def reopen_logs(self) -> None:
        if self.access_log is not None:
            self.access_log.reopen()

    def close(self) -> None:
        super().close()
        if self.access_log is not None:
            self.access_log.close()
