"""A TCP echo service (topologies/echo.toml): every byte comes back."""

from __future__ import annotations

from typing import Any

from hiocluster.service import TcpService


class Echo(TcpService):
    """Sends back whatever arrives, on the connection it came on."""

    def receive(self, remoter: Any, data: bytes) -> None:
        remoter.tx(data)
