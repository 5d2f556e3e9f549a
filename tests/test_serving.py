"""hio's servers as hiocluster extends them (hiocluster.services.serving), in this process:
real sockets on loopback, hio's clock stepped by the test (a Tymist), no sleeps.

Each defect of hio 0.6.10 the subclasses fix has a test that fails on hio's own
class where it can be shown: no SO_REUSEPORT, the idle timeout that never reaches
a connection, an app that raises ending the server, a trickled request held for
ever, no ``Connection: close``.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import trustme
from hio.base import tyming
from hio.core.tcp import serving as hio_tcp

from hiocluster.services.serving import Server, ServerTls, WsgiServer
from tests.waiting import wait_until


class Clock:
    """hio's clock for the servers under test, moved by the test."""

    def __init__(self) -> None:
        self.tymist = tyming.Tymist(tock=0.125)

    def wind(self, *servers: Any) -> None:
        for server in servers:
            server.wind(self.tymist.tymen())

    def advance(self, seconds: float) -> None:
        self.tymist.tick(seconds)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_until(servers: list[Any], done: Callable[[], bool], timeout: float = 30.0) -> None:
    """Service the servers until ``done()``, bounded by ``timeout`` seconds (a test
    that hangs fails); between rounds a short sleep lets loopback and TLS bytes move."""

    def serve() -> bool:
        for server in servers:
            server.service()
        return done()

    wait_until(serve, timeout, what="the servers to get there", interval=0.001)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setblocking(False)
    return sock


def read_some(sock: socket.socket) -> bytes | None:
    """What has arrived (b"": the other side closed), or None: nothing yet."""
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return None


def hello_app(environ: dict[str, Any], start_response: Callable) -> list[bytes]:
    body = b"hello " + environ["PATH_INFO"].encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


def broken_app(environ: dict[str, Any], start_response: Callable) -> list[bytes]:
    if environ["PATH_INFO"] == "/boom":
        raise ValueError("boom in the app")
    return hello_app(environ, start_response)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_two_servers_share_a_port_where_hio_s_cannot(clock: Clock) -> None:
    port = free_port()
    first, second = Server(ha=("127.0.0.1", port)), Server(ha=("127.0.0.1", port))
    hios = hio_tcp.Server(ha=("127.0.0.1", port))
    try:
        assert first.reopen() and second.reopen()
        assert not hios.reopen()  # hio's own: EADDRINUSE
        clock.wind(first, second)
        clients = [connect(port) for _ in range(16)]
        serve_until([first, second], lambda: len(first.ixes) + len(second.ixes) == 16)
        assert first.ixes and second.ixes  # the kernel spread them over both
        for client in clients:
            client.close()
    finally:
        for server in (first, second, hios):
            server.close()


def test_idle_connections_close_after_the_tymeout(clock: Clock) -> None:
    server = Server(ha=("127.0.0.1", 0), tymeout=2.0)
    assert server.reopen()
    clock.wind(server)
    try:
        idle, busy = connect(server.ha[1]), connect(server.ha[1])
        serve_until([server], lambda: len(server.ixes) == 2)
        for _ in range(3):  # 1.5 s of traffic on one, silence on the other
            clock.advance(0.5)
            busy.send(b"x")
            serve_until([server], lambda: any(ix.rxbs for ix in server.ixes.values()))
            for ix in server.ixes.values():
                ix.clearRxbs()
        clock.advance(0.75)  # the idle one has been silent 2.25 s, the busy one 0.75 s
        server.service()
        assert len(server.ixes) == 1
        assert read_some(idle) == b""  # closed by the server: EOF
        idle.close()
        busy.close()
        serve_until([server], lambda: not server.ixes)  # a closed client is forgotten
    finally:
        server.close()


def test_hio_s_server_never_times_out_a_connection(clock: Clock) -> None:
    """What the replacement of serviceAxes fixes: hio passes its tymeout under a
    keyword Remoter does not take, so every connection gets tymeout 0."""
    server = hio_tcp.Server(ha=("127.0.0.1", free_port()), tymeout=2.0)
    assert server.reopen()
    clock.wind(server)
    try:
        client = connect(server.ha[1])
        serve_until([server], lambda: len(server.ixes) == 1)
        assert next(iter(server.ixes.values())).tymeout == 0.0
        client.close()
    finally:
        server.close()


def http(port: int, request: bytes, server: WsgiServer, *, closes: bool = False) -> bytes:
    """Send ``request``, serve until a whole response (and, with ``closes``, EOF)."""
    sock = connect(port)
    sock.sendall(request)
    got = bytearray()
    state = {"eof": False}

    def done() -> bool:
        while chunk := read_some(sock):
            got.extend(chunk)
        if chunk == b"":
            state["eof"] = True
        complete = b"\r\n\r\n" in got and got.endswith((b"hello /x", b"hello /y", b"Error\n"))
        return complete and (state["eof"] or not closes)

    serve_until([server], done)
    sock.close()
    return bytes(got)


@pytest.fixture
def wsgi(clock: Clock) -> Iterator[WsgiServer]:
    server = WsgiServer(broken_app, ("127.0.0.1", 0), tymeout=5.0)
    assert server.reopen()
    clock.wind(server)
    yield server
    server.close()


def test_an_app_that_raises_gets_a_500_and_the_server_goes_on(
        wsgi: WsgiServer, caplog: pytest.LogCaptureFixture) -> None:
    port = wsgi.servant.ha[1]
    reply = http(port, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n", wsgi)
    assert reply.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert "boom in the app" in caplog.text and "Traceback" in caplog.text
    reply = http(port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", wsgi)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"hello /x")


def test_connection_close_is_said_when_the_server_closes(wsgi: WsgiServer) -> None:
    port = wsgi.servant.ha[1]
    kept = http(port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", wsgi)
    assert b"connection: close" not in kept.lower()
    for request in (b"GET /y HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    b"GET /y HTTP/1.0\r\n\r\n"):
        reply = http(port, request, wsgi, closes=True)
        assert b"\r\nconnection: close\r\n" in reply.lower(), reply


def test_a_trickled_request_is_dropped_after_the_tymeout(wsgi: WsgiServer,
                                                         clock: Clock) -> None:
    port = wsgi.servant.ha[1]
    slow = connect(port)
    began = wsgi.servant.tyme
    for _ in range(20):  # one byte every 0.5 s: the idle timer never expires ...
        slow.send(b"G")
        clock.advance(0.5)
        wsgi.service()
        if not wsgi.servant.ixes:
            break
    assert not wsgi.servant.ixes and not wsgi.reqs
    took = wsgi.servant.tyme - began
    assert 5.0 < took <= 6.5, took  # ... but the request took over 5 s
    assert read_some(slow) == b""  # closed: EOF
    slow.close()
    reply = http(port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", wsgi)  # others still served
    assert reply.endswith(b"hello /x")


def test_a_kept_alive_connection_closes_when_idle(wsgi: WsgiServer, clock: Clock) -> None:
    port = wsgi.servant.ha[1]
    sock = connect(port)
    sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    got = bytearray()
    serve_until([wsgi], lambda: got.extend(read_some(sock) or b"") or got.endswith(b"hello /x"))
    assert len(wsgi.servant.ixes) == 1  # kept alive (hio would keep it for ever)
    clock.advance(5.5)
    wsgi.service()
    assert not wsgi.servant.ixes
    sock.close()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path, Path]:
    ca = trustme.CA()
    folder = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certpath, keypath = folder / "cert.pem", folder / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certpath))
    cert.private_key_pem.write_to_path(str(keypath))
    return ca, certpath, keypath


def test_https_works_and_plaintext_is_refused(clock: Clock, certificates: Any) -> None:
    ca, certpath, keypath = certificates
    server = WsgiServer(hello_app, ("127.0.0.1", 0), certpath=str(certpath),
                        keypath=str(keypath), tymeout=5.0)
    assert server.reopen() and isinstance(server.servant, ServerTls)
    clock.wind(server)
    port = server.servant.ha[1]
    try:
        raw = connect(port)
        raw.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        serve_until([server], lambda: not server.servant.cxes and not server.servant.ixes)
        assert read_some(raw) == b""  # not TLS: the handshake failed, dropped
        raw.close()
        context = ssl.create_default_context()
        ca.configure_trust(context)
        tls = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30),
                                  server_hostname="127.0.0.1", do_handshake_on_connect=False)
        tls.setblocking(False)

        def handshaken() -> bool:
            try:
                tls.do_handshake()
                return True
            except ssl.SSLWantReadError:
                return False

        serve_until([server], handshaken)
        tls.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        got = bytearray()

        def answered() -> bool:
            try:
                got.extend(tls.recv(65536))
            except ssl.SSLWantReadError:
                pass
            return got.endswith(b"hello /x")

        serve_until([server], answered)
        assert got.startswith(b"HTTP/1.1 200 OK")
        tls.close()
    finally:
        server.close()


def test_servers_on_a_shared_listening_socket_hand_over_without_loss(clock: Clock) -> None:
    """How replicas share their run's listening socket: one that stops accepting
    closes only its descriptor, so what is queued (and what comes after) is
    accepted by the next; nothing is refused."""
    from hiocluster.services.serving import listening_socket

    held = listening_socket(("127.0.0.1", 0))  # the run's: it never accepts
    port = held.getsockname()[1]
    old = Server(ha=("127.0.0.1", port), sockets=[socket.socket(fileno=os.dup(held.fileno()))])
    new = Server(ha=("127.0.0.1", port), sockets=[socket.socket(fileno=os.dup(held.fileno()))])
    try:
        assert old.reopen() and new.reopen()
        clock.wind(old, new)
        queued = [connect(port) for _ in range(4)]  # nobody accepted them yet
        old.stop_accepting()  # takes what is queued, closes its descriptor only
        later = [connect(port) for _ in range(4)]
        serve_until([old, new], lambda: len(old.ixes) + len(new.ixes) == 8)
        assert len(old.ixes) == 4 and not old.listeners  # old took the queued ones ...
        assert len(new.ixes) == 4  # ... and the new one what came after
        for client in queued + later:
            client.close()
    finally:
        for server in (old, new):
            server.close()
        held.close()


def test_closing_before_the_app_started_does_not_raise(clock: Clock) -> None:
    """hio's closeConnection finishes a response whose app never started (writing
    its end raises AssertionError, hiding whatever closed it); ours does not."""
    from hio.core.http import serving as hio_http

    for cls, raises in ((WsgiServer, False), (hio_http.Server, True)):
        server = cls(app=hello_app, ha=("127.0.0.1", 0), tymeout=5.0) if raises else \
            cls(hello_app, ("127.0.0.1", 0), tymeout=5.0)
        assert server.reopen()
        clock.wind(server)
        client = connect(server.servant.ha[1] if not raises else server.servant.eha[1])
        client.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")

        def parsed() -> bool:
            server.serviceConnects()
            server.servant.serviceReceivesAllIx()
            server.serviceReqs()
            return bool(server.reps)

        serve_until([], parsed)
        if raises:
            with pytest.raises(AssertionError):
                server.close()
            server.servant.close()
        else:
            server.close()
            assert not server.reps and not server.servant.ixes
        client.close()


def test_a_pipelined_request_keeps_the_server_busy_until_answered(wsgi: WsgiServer) -> None:
    """Two requests in one write: the second is already read when the first is
    answered, so no socket will wake a sleeping replica for it: ``busy`` says so."""
    sock = connect(wsgi.servant.ha[1])
    sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\nGET /y HTTP/1.1\r\nHost: x\r\n\r\n")
    got = bytearray()
    serve_until([wsgi], lambda: got.extend(read_some(sock) or b"") or b"hello /x" in got)

    def answered() -> bool:  # what a replica's loop does: it sleeps unless busy
        if b"hello /y" in got:
            return True
        assert wsgi.busy, "the second request waits, but nothing would wake the loop"
        wsgi.service()
        got.extend(read_some(sock) or b"")
        return False

    wait_until(answered, what="the pipelined second response", interval=0.001)
    wsgi.service()  # the second response ends
    assert not wsgi.busy and wsgi.served == 2
    sock.close()


def _health_service(path: str, app: Callable) -> Any:
    from hiocluster.service import WsgiService
    from hiocluster.topology import ServiceSpec

    service = WsgiService(ServiceSpec("web", "m:C", ("127.0.0.1", 8080), health_path=path), 0)
    service.wsgi = app
    return service


def test_a_wsgi_services_health_check_asks_its_app_for_the_path() -> None:
    asked: list[tuple[str, str]] = []

    def app(environ: dict[str, Any], start: Callable) -> list[bytes]:
        asked.append((environ["PATH_INFO"], environ["QUERY_STRING"]))
        start(environ["QUERY_STRING"] == "fail" and "503 Service Unavailable" or "204 OK", [])
        return [b""]

    assert _health_service("/ready?deep=1", app).healthy() is True
    assert asked == [("/ready", "deep=1")]
    with pytest.raises(ValueError, match=r"GET /ready\?fail: 503 Service Unavailable"):
        _health_service("/ready?fail", app).healthy()
    assert _health_service("", app).healthy() is None  # no check

    def silent(environ: dict[str, Any], start: Callable) -> list[bytes]:
        return []

    with pytest.raises(ValueError, match="gave no status"):
        _health_service("/x", silent).healthy()


def test_a_tcp_service_refuses_a_health_path() -> None:
    from hiocluster.service import TcpService
    from hiocluster.topology import ServiceSpec

    with pytest.raises(ValueError, match="health_path is for HTTP services"):
        TcpService(ServiceSpec("echo", "m:C", ("127.0.0.1", 9000), health_path="/h"), 0)
