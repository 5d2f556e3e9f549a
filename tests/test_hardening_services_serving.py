"""hiocluster.services.serving against hostile and odd HTTP, in this process: real sockets
on loopback, hio's clock stepped by the test (tests/test_serving.py's helpers).

hio 0.6.10's parser raises ValueError on ``Host:x`` (valid HTTP), on a header line
without a colon and on a bad chunk size, which ended the replica; it buffered a
body of any size; and a ``Connection: close`` response's socket stayed open until
the next cycle (an idle replica's sleep, 0.5 s).
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Iterator

import pytest

from hiocluster.services.serving import MAX_HEAD, WsgiServer
from test_serving import Clock, connect, read_some, serve_until


def echo_app(environ: dict[str, Any], start_response: Callable) -> list[bytes]:
    body = environ["wsgi.input"].read()
    reply = b"host=%s len=%d" % (environ.get("HTTP_HOST", "-").encode(), len(body))
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(reply)))])
    return [reply]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(clock: Clock) -> Iterator[WsgiServer]:
    server = WsgiServer(echo_app, ("127.0.0.1", 0), tymeout=5.0, max_body=4096)
    assert server.reopen()
    clock.wind(server)
    yield server
    server.close()


def exchange(server: WsgiServer, request: bytes) -> bytes:
    """Send ``request``, half-close, serve until the server closed: all it said."""
    sock = connect(server.servant.ha[1])
    try:
        sock.sendall(request)
    except OSError:
        pass
    got = bytearray()

    def closed() -> bool:
        try:
            while chunk := read_some(sock):
                got.extend(chunk)
        except ConnectionResetError:
            return True
        return chunk == b""

    serve_until([server], closed)
    sock.close()
    return bytes(got)


def status(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply[:80]
    return int(reply.split()[1])


def test_a_header_without_a_space_after_its_colon_is_valid(server: WsgiServer) -> None:
    reply = exchange(server, b"GET /hello HTTP/1.1\r\nHost:x\r\nConnection: close\r\n\r\n")
    assert status(reply) == 200 and reply.endswith(b"host=x len=0")
    reply = exchange(server, b"GET / HTTP/1.1\r\nHost: \t x \t\r\nConnection:close\r\n\r\n")
    assert reply.endswith(b"host=x len=0")


@pytest.mark.parametrize("request_bytes, code", [
    (b"GET /hello HTTP/1.1\r\nHost x\r\n\r\n", 400),                 # no colon
    (b"GET /hello HTTP/1.1\r\nHost : x\r\n\r\n", 400),               # space before colon
    (b"GET /hello HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),     # obs-fold
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET http://[::1/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),         # urlsplit raises
    (b"GET http://x:port/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),       # .port raises
    (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS to plain HTTP
    (b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n", 501),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n", 413),
    (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431),
])
def test_a_bad_request_is_answered_and_its_connection_closed(
        server: WsgiServer, request_bytes: bytes, code: int) -> None:
    assert status(exchange(server, request_bytes)) == code
    assert not server.servant.ixes and not server.reqs and not server.reps
    reply = exchange(server, b"GET / HTTP/1.1\r\nHost: y\r\nConnection: close\r\n\r\n")
    assert reply.endswith(b"host=y len=0")  # the server goes on


def test_bodies_are_bounded_by_max_body(server: WsgiServer) -> None:
    chunk = b"%x\r\n%s\r\n" % (1000, b"z" * 1000)
    head = (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n")
    assert status(exchange(server, head + chunk * 5 + b"0\r\n\r\n")) == 413
    assert status(exchange(server, head + b"1\r\nz\r\n" * 4000 + b"0\r\n\r\n")) == 200
    assert status(exchange(server, head + b"1\r\nz\r\n" * 5000 + b"0\r\n\r\n")) == 413
    assert status(exchange(server, head + b"ffffffff\r\n" + b"z" * 80_000)) == 413
    sized = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    assert exchange(server, sized % 4096 + b"z" * 4096).endswith(b"len=4096")
    assert status(exchange(server, sized % 4097 + b"z" * 4097)) == 413


def test_pipelined_requests_are_answered_in_order(server: WsgiServer) -> None:
    one = b"POST / HTTP/1.1\r\nHost:%d\r\nContent-Length: 2\r\n\r\nab"
    reply = exchange(server, b"".join(one % i for i in range(5)) + b"GET / HTTP/1.0\r\n\r\n")
    assert reply.count(b"HTTP/1.1 200 OK") == 6
    assert [int(part.split(b" ", 1)[0]) for part in reply.split(b"host=")[1:6]] == \
        list(range(5))


@pytest.mark.parametrize("request_bytes", [
    b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /x HTTP/1.0\r\n\r\n",
])
def test_a_connection_that_closes_closes_with_its_response(
        server: WsgiServer, request_bytes: bytes) -> None:
    sock = connect(server.servant.ha[1])
    sock.sendall(request_bytes)
    got = bytearray()
    serve_until([server], lambda: got.extend(read_some(sock) or b"") or bool(got))
    # the cycle that sent the response closed the connection (hio: one cycle later,
    # after a replica's idle sleep of up to 0.5 s)
    assert server.connections == 0
    sock.settimeout(5)
    while chunk := sock.recv(65536):
        got.extend(chunk)
    assert got.endswith(b"len=0")
    sock.close()


def test_a_client_gone_before_its_answer_is_no_error(server: WsgiServer) -> None:
    for _ in range(20):
        sock = connect(server.servant.ha[1])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.close()  # RST: the answer meets ECONNRESET or EPIPE
        for _ in range(5):
            server.service()
    assert exchange(server, b"GET / HTTP/1.0\r\nHost: z\r\n\r\n").endswith(b"host=z len=0")
