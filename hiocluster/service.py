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

import logging
import time
import traceback
from typing import Any, Callable

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
    def connections(self) -> int:
        return sum(server.connections for server in self.servers)

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def reopen_logs(self) -> None:
        """SIGUSR1: open log files again (after a rotation)."""


class TcpService(Service):
    """A TCP (or, with ``tls`` in the topology, TLS) server. Write :meth:`receive`."""

    def __init__(self, spec: ServiceSpec, replica: int) -> None:
        if spec.access_log:
            raise ValueError(f"access_log is for HTTP services (WsgiService); service "
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

    def make_servers(self) -> list[Any]:
        cert, key = self.tls if self.tls is not None else (None, None)
        app = self.app()
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

    def reopen_logs(self) -> None:
        if self.access_log is not None:
            self.access_log.reopen()

    def close(self) -> None:
        super().close()
        if self.access_log is not None:
            self.access_log.close()
