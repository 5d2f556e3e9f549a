"""A TCP echo service (topologies/echo.toml): every byte comes back. The
README's example of a service class, verbatim."""

from hiocluster.service import TcpService


class Echo(TcpService):
    """Sends back whatever arrives, on the connection it came on."""

    def receive(self, remoter, data: bytes) -> None:
        remoter.tx(data)
