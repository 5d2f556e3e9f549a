"""A lossy link for tests: a TCP relay on loopback that delays and breaks connections.

This kernel has no netem, so the link is a user-space relay (asyncio, in a
thread of the test process): every chunk of bytes waits ``delay`` seconds each
way, and some connections fail after a number of chunks, as connections on a
lossy link do: ``"reset"`` closes both sides at once, dropping whatever is in
flight; ``"stall"`` stops forwarding in both directions (a link that loses
everything for a while) until one side gives up — ZeroMQ's heartbeat timeout —
and then closes the other side too. Everything is bounded: a fault hits a
connection once, and only the connections ``faults`` names.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

__all__ = ["Relay"]


class Relay:
    """A relay to ``upstream`` (``tcp://HOST:PORT``); ``address`` is where it listens.

    Args:
        delay: seconds every chunk waits, each way.
        faults: connection number (0: the first accepted) -> (what, after how many
            chunks from the client): ``("reset", 40)``, ``("stall", 60)``.
    """

    def __init__(self, upstream: str, *, delay: float = 0.05,
                 faults: dict[int, tuple[str, int]] | None = None) -> None:
        host, _, port = upstream[len("tcp://"):].rpartition(":")
        self.upstream = (host, int(port))
        self.delay = delay
        self.faults = dict(faults or {})
        self.accepted = 0
        self.done: list[str] = []          # the faults that happened, in order
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True,
                                        name="relay")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the relay did not start")
        self.address = f"tcp://127.0.0.1:{self._port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0))
        self._port = self._server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        """Stop listening, close every connection, end the thread."""
        async def stop() -> None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await asyncio.sleep(0)
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self.accepted
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._writers.update(pair)
        state: dict[str, Any] = {"fault": self.faults.get(number), "chunks": 0,
                                 "stalled": False}
        ends = [asyncio.ensure_future(self._carry(reader, up_writer, state, pair, True)),
                asyncio.ensure_future(self._carry(up_reader, writer, state, pair, False))]
        await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        for end in ends:
            end.cancel()
        for side in pair:  # one side gave up: so does the other, dropping what is left
            side.transport.abort()
            self._writers.discard(side)

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     state: dict[str, Any], pair: tuple[Any, Any], from_client: bool) -> None:
        """Forward ``reader`` to ``writer``, each chunk ``delay`` late, in order."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if state["stalled"]:
                    continue  # lost, as is everything after it
                writer.write(data)
                await writer.drain()

        sending = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                queue.put_nowait((loop.time() + self.delay, data))
                fault = state["fault"]
                if from_client and fault is not None:
                    state["chunks"] += 1
                    what, after = fault
                    if state["chunks"] >= after:
                        state["fault"] = None
                        self.done.append(what)
                        if what == "reset":
                            for side in pair:
                                side.transport.abort()
                            return
                        state["stalled"] = True
        except (ConnectionError, OSError):
            return
        finally:
            sending.cancel()
