"""The child process: one local hio Doist hosting some nodes, speaking the protocol.

Per TICK n the worker (1) waits for the data frames of tick n-1 that the TICK
says to expect, (2) delivers their messages into inboxes in canonical order and
returns credit, (3) runs ``Doist.recur()`` once (tyme advances by tock), (4) sends
one DATA frame per destination process, (5) answers TOCK, then hashes its nodes
(the digests travel with the next TOCK, or BYE).

Imports: hio, node, transport, protocol, errors. Never topology or supervisor.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from collections import Counter, deque
from dataclasses import dataclass
from itertools import groupby
from operator import itemgetter
from typing import Any, Callable, Iterator, NoReturn

import psutil
from hio.base.doing import Doist

from . import protocol as proto
from .errors import ClusterError, FrameError, ProtocolError, RemoteProtocolError
from .node import Inbox, Link, Node, load_class
from .transport import NOBLOCK, Again, Context, Poller, bound_address

__all__ = ["WorkerSpec", "main", "POLL_MS", "WATCH_S"]

#: Longest single wait on a socket, so signals are handled promptly.
POLL_MS = 200
#: How often the watchdog checks that the supervisor process is still alive.
WATCH_S = 0.2
#: Linger of a failing worker's sockets: time for its ERROR to leave, not more.
FAIL_LINGER_MS = 500
#: Longest ERROR detail sent up (well inside the protocol's string limit).
MAX_DETAIL = 8000
#: Traceback lines sent up with a node failure.
TRACEBACK_LINES = 12


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a child needs before it can say HELLO (pickled to the child)."""

    process: str
    control_address: str
    data_bind: str                                  # ipc://... or tcp://host:*
    nodes: tuple[tuple[str, str, dict], ...]        # (name, "module:attr", params)
    app_dir: str | None = None
    run_dir: str | None = None                      # the supervisor's; orphans clean it
    parent_pid: int = 0
    parent_started: float = 0.0                     # psutil create_time of the parent


class _Terminated(BaseException):
    """SIGTERM arrived: leave through the exit contexts."""


class _Watchdog(threading.Thread):
    """Stop this worker once its supervisor process is gone (orphan rule).

    Checks every WATCH_S from a daemon thread, so it works even while a node is
    busy; it sends this process SIGTERM, so the exit contexts still run.
    """

    def __init__(self, pid: int, started: float) -> None:
        super().__init__(name="hiocluster-watchdog", daemon=True)
        self.pid, self.started = pid, started
        self.orphaned = False
        self.stopped = threading.Event()

    def run(self) -> None:
        parent: psutil.Process | None = None
        try:
            found = psutil.Process(self.pid)
            if not self.started or abs(found.create_time() - self.started) <= 1e-3:
                parent = found  # else that pid is another process now
        except psutil.Error:
            pass
        while not self.stopped.wait(WATCH_S):
            try:
                if parent is not None and parent.is_running() \
                        and parent.status() != psutil.STATUS_ZOMBIE:
                    continue
            except psutil.Error:
                pass
            self.orphaned = True
            os.kill(os.getpid(), signal.SIGTERM)
            return


class _Stopped(Exception):
    """A STOP arrived while waiting for data frames."""

    def __init__(self, stop: proto.Stop) -> None:
        self.stop = stop


class NodeFailed(ClusterError):
    """A node raised (or produced something unsendable) during a tick."""

    def __init__(self, node: str, tick: int, detail: str) -> None:
        self.node, self.tick, self.detail = node, tick, detail
        super().__init__(f"node {node} failed at tick {tick}")


def main(spec: WorkerSpec) -> None:
    """multiprocessing target: run a worker and exit with its status."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop

    def on_term(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated()

    signal.signal(signal.SIGTERM, on_term)
    try:
        code = Worker(spec).run()
    except _Terminated:  # SIGTERM while already failing: exit quietly, as terminated
        code = 143
    sys.exit(code)


class Worker:
    """One child process's lifetime: HELLO, SETUP, ticks, STOP, BYE."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.process = spec.process
        self.machine = proto.ChildMachine(spec.process)
        self.nodes: list[Node] = []
        self.doist: Doist | None = None
        self.entered = False
        self.tick = -1
        self.links: dict[int, Link] = {}
        self.out_links: list[Link] = []
        self.in_links: list[Link] = []
        self.inbox_of: dict[int, Any] = {}
        self.peers: dict[str, Any] = {}        # process → PUSH socket
        self.early: dict[int, list[proto.Data]] = {}  # tick → frames that came early
        self.seen: dict[int, set[str]] = {}           # tick → sources already received
        self.local: proto.Data | None = None
        self.rejected = 0
        self.messages = 0           # messages put on any link, local ones included
        self.digests: dict[str, bytes] = {}  # of the nodes' current state
        self.undelivered = 0

    # -- lifetime ---------------------------------------------------------
    def run(self) -> int:
        watchdog = _Watchdog(self.spec.parent_pid, self.spec.parent_started)
        if self.spec.parent_pid:
            watchdog.start()
        try:
            return self._run(watchdog)
        finally:
            watchdog.stopped.set()

    def _run(self, watchdog: _Watchdog) -> int:
        self.context = Context()
        try:
            control = self.control = self.context.dealer(
                self.spec.control_address, self.process, timeout_ms=POLL_MS)
            self.data = self.context.pull(self.spec.data_bind)
            self.poller = Poller([self.data, self.control])
            classes = self._import()
            control.send(self.machine.send(proto.Hello(
                process=self.process, pid=os.getpid(), data_address=bound_address(self.data),
                nodes=[name for name, _, _ in self.spec.nodes])))
            message = self._next_control()
            if isinstance(message, proto.Setup):
                self._setup(message, classes)
                control.send(self.machine.send(proto.Ready()))
                message = self._loop()
            if isinstance(message, proto.Stop):
                self._stop(message)
                failures = self._exit_nodes()
                if failures:
                    raise NodeFailed(failures[0][0], self.tick, failures[0][1])
                digests = self.digests if message.expect is not None else {}
                control.send(self.machine.send(proto.Bye(stats=self._stats(),
                                                         digests=digests,
                                                         metrics=self._metrics())))
                self._close(clean=message.expect is not None)
                return 0
            return self._fail("protocol", f"unexpected {message.TYPE}")
        except NodeFailed as exc:
            return self._fail("node-error", exc.detail, node=exc.node)
        except FrameError as exc:
            return self._fail(exc.code, str(exc), field=exc.field)
        except ProtocolError as exc:
            return self._fail(exc.code, str(exc), field=exc.field)
        except _Terminated:
            if watchdog.orphaned:
                return self._fail("orphaned", "supervisor vanished", code_out=3, tell=False)
            return self._fail("terminated", "SIGTERM", code_out=143)
        except Exception:
            return self._fail("worker-error", _tail(traceback.format_exc()))

    def _fail(self, code: str, detail: str, *, node: str | None = None, field: str = "",
              code_out: int = 1, tell: bool = True) -> int:
        """Run exit contexts, tell the supervisor what happened, close, return the exit code."""
        for name, text in self._exit_nodes():
            detail += f"\nwhile exiting node {name}:\n{text}"
        if tell and getattr(self, "control", None) is not None:
            if len(detail) > MAX_DETAIL:  # keep the end: the exception itself
                detail = "..." + detail[-MAX_DETAIL:]
            error = proto.Error(code=code, detail=detail, field=field,
                                tick=self.tick if self.tick >= 0 else None, node=node)
            try:
                self.control.send(proto.encode(error))
            except Exception:
                pass  # the supervisor also sees our exit code; nothing else to tell
        self._close(clean=False, orphaned=not tell)
        return code_out

    def _close(self, *, clean: bool, orphaned: bool = False) -> None:
        """Close every socket. After a failure, frames to peers are not waited for;
        an orphan also removes the socket files its dead supervisor cannot."""
        if not clean:
            for sock in self.peers.values():
                sock.close(linger=0)
        self.context.close(linger=0 if orphaned else None if clean else FAIL_LINGER_MS)
        if orphaned:
            for address in (self.spec.data_bind, self.spec.control_address):
                if address.startswith("ipc://"):
                    with contextlib.suppress(OSError):
                        os.unlink(address[len("ipc://"):])
            if self.spec.run_dir:
                with contextlib.suppress(OSError):  # the last worker out removes it
                    os.rmdir(self.spec.run_dir)

    def _exit_nodes(self) -> list[tuple[str, str]]:
        """Run every node's hio exit contexts (last entered first), each one even when
        another raises; return (node, traceback tail) for each that raised."""
        failures: list[tuple[str, str]] = []
        if self.doist is not None and self.entered:
            self.entered = False
            deeds = self.doist.deeds
            while deeds:
                deed = deeds.pop()
                if deed[0] is None:  # hio's run-through marker
                    continue
                try:
                    self.doist.exit(deque([deed]))
                except BaseException:
                    failures.append((deed[2].name, _tail(traceback.format_exc())))
        return failures

    # -- start-up ---------------------------------------------------------
    def _import(self) -> dict[str, type]:
        classes = {}
        for name, path, _ in self.spec.nodes:
            try:
                classes[name] = load_class(path, self.spec.app_dir)
            except ImportError as exc:
                raise NodeFailed(name, -1, str(exc)) from None
        return classes

    def _setup(self, setup: proto.Setup, classes: dict[str, type]) -> None:
        for name, path, params in self.spec.nodes:
            with _blame(name, -1):
                self.nodes.append(classes[name](name, params, seed=setup.seed))
        by_name = {node.name: node for node in self.nodes}
        placement = setup.placement
        for link_id, source, outbox, target, inbox, capacity in setup.links:
            link = Link(link_id, source, outbox, target, inbox, capacity,
                        placement[source], placement[target])
            if source in by_name:
                by_name[source].outbox[outbox]._attach(link)
                self.out_links.append(link)
            if target in by_name:
                self.inbox_of[link_id] = by_name[target].inbox[inbox]
                self.in_links.append(link)
            self.links[link_id] = link
        for peer in sorted({link.target_process for link in self.out_links}
                           | {link.source_process for link in self.in_links}):
            if peer != self.process:
                self.peers[peer] = self.context.push(setup.addresses[peer])
        # tyme then advances as hio's own Doist advances it (tyme += tock per recur), so
        # hio's rescheduling arithmetic (retyme = tyme + tock) lines up exactly
        self.doist = doist = Doist(tyme=float(setup.t0), tock=float(setup.tock), real=False,
                                   doers=list(self.nodes))
        self.entered = True
        for node in self.nodes:  # one at a time, so a failing enter context names its node
            with _blame(node.name, -1):
                doist.deeds.extend(doist.enter(doers=[node]))
        self.digests = self._digests()

    # -- ticking ----------------------------------------------------------
    def _loop(self) -> proto.Message:
        machine, control = self.machine, self.control
        while True:
            message = self._next_control()
            if type(message) is not proto.Tick:
                return message
            try:
                self._tick(message)
            except _Stopped as stopped:
                return stopped.stop
            control.send(machine.send(proto.Tock(n=message.n, sent=self._sent,
                                                 digests=self.digests), checked=False))
            self.digests = self._digests()  # while the supervisor gathers the others

    def _tick(self, tick: proto.Tick) -> None:
        n = self.tick = tick.n
        self._deliver(self._collect(n - 1, tick.expect))
        for node in self.nodes:
            node.tick = n
        doist = self.doist
        assert doist is not None
        try:
            doist.recur()
        except _Terminated:
            raise
        except BaseException as exc:  # SystemExit from a node is the node's failure too
            name: str = getattr(exc, "hiocluster_node", "?")
            raise NodeFailed(name, n, _tail(traceback.format_exc())) from exc
        self._send(n)

    def _collect(self, tick: int, expect: int) -> list[proto.Data]:
        """The data frames of ``tick`` (remote ones, then ours), waiting as needed."""
        frames = self.early.pop(tick, [])
        while len(frames) < expect:
            try:  # frames usually arrive before the TICK: take them without polling
                frame = self._accept(self.data.recv(NOBLOCK), tick)
            except Again:  # nothing yet: wait for data, or for a STOP or ERROR
                if self.control in self.poller.poll(POLL_MS):
                    self._interrupting(self.machine.receive(self.control.recv()), tick)
                continue
            if frame is not None:
                frames.append(frame)
        self.seen.pop(tick, None)
        if self.local is not None:
            frames.append(self.local)
            self.local = None
        return frames

    def _interrupting(self, message: proto.Message, tick: int) -> NoReturn:
        """A control frame while waiting for data: STOP or ERROR (the machine allows
        nothing else here)."""
        if isinstance(message, proto.Stop):
            raise _Stopped(message)
        assert isinstance(message, proto.Error)
        raise RemoteProtocolError(f"supervisor sent ERROR {message.code}: {message.detail}",
                                  tick=tick + 1, field=message.field, code=message.code)

    def _accept(self, raw: bytes, current: int) -> proto.Data | None:
        """Validate one data frame; frames of the next tick wait in ``early``."""
        try:
            frame = proto.decode_data(raw)
            self._validate(frame, current)
        except FrameError as exc:
            self.rejected += 1
            print(f"hiocluster worker {self.process}: rejected a data frame at tick "
                  f"{current + 1}: {exc}", file=sys.stderr, flush=True)
            return None
        self.seen.setdefault(frame.tick, set()).add(frame.source)
        if frame.tick == current:
            return frame
        self.early.setdefault(frame.tick, []).append(frame)
        return None

    def _validate(self, frame: proto.Data, current: int) -> None:
        if frame.tick not in (current, current + 1):
            raise FrameError(f"frame of tick {frame.tick} while collecting tick {current}"
                             + (" (a tick from the past)" if frame.tick < current else ""),
                             field="DATA.tick",
                             code="stale-tick" if frame.tick < current else "wrong-tick")
        if frame.source not in self.peers:
            raise FrameError(f"{frame.source!r} is not a peer", field="DATA.source",
                             code="unknown-peer")
        if frame.source in self.seen.get(frame.tick, ()):
            raise FrameError(f"second frame from {frame.source} for tick {frame.tick}",
                             field="DATA.source", code="duplicate")
        links, me, source = self.links, self.process, frame.source
        seen: set[int] = set()
        for index, row in enumerate(frame.messages):
            link = links.get(row[0])
            if link is None or link.source_process != source or link.target_process != me:
                raise FrameError(f"link {row[0]} does not run {source} -> {me}",
                                 field=f"DATA.messages[{index}][0]", code="bad-link")
            if row[0] in seen:
                raise FrameError(f"link {row[0]} appears twice", field=f"DATA.messages[{index}][0]",
                                 code="duplicate")
            seen.add(row[0])
        for index, (link_id, count) in enumerate(frame.acks):
            link = links.get(link_id)
            if link is None or link.source_process != me or link.target_process != source:
                raise FrameError(f"link {link_id} does not run {me} -> {source}",
                                 field=f"DATA.acks[{index}][0]", code="bad-link")
            if count > link.sent - link.acked:
                raise FrameError(f"acks {count} on link {link_id} but only "
                                 f"{link.sent - link.acked} are in flight",
                                 field=f"DATA.acks[{index}][1]", code="bad-ack")

    def _deliver(self, frames: list[proto.Data]) -> None:
        """Return credit, then fill inboxes: by source node name, then send sequence."""
        links, inbox_of = self.links, self.inbox_of
        runs: dict[Inbox, list[tuple[Link, list[int], list[Any]]]] = {}
        for frame in frames:
            for link_id, count in frame.acks:
                links[link_id].acked += count
            for link_id, sequences, payloads in frame.messages:
                if payloads:
                    runs.setdefault(inbox_of[link_id], []).append(
                        (links[link_id], sequences, payloads))
        for inbox, group in runs.items():  # inboxes are independent: their order is moot
            if len(group) == 1:
                inbox._deliver(group[0][0], group[0][2])
                continue
            group.sort(key=_source_of)
            for _, same_source in groupby(group, key=_source_of):
                batch = list(same_source)
                if len(batch) == 1:
                    inbox._deliver(batch[0][0], batch[0][2])
                else:  # one node, several outboxes into this inbox: merge by sequence
                    merged = sorted(((sequence, link, payload) for link, sequences, payloads
                                     in batch for sequence, payload in zip(sequences, payloads)),
                                    key=itemgetter(0))
                    for _, link, payload in merged:
                        inbox._deliver(link, [payload])

    def _send(self, tick: int) -> None:
        """One DATA frame per destination process: messages and returned credit."""
        batches: dict[str, proto.Data] = {}
        count = 0
        for link in self.out_links:
            if link.payloads:
                frame = batches.get(link.target_process)
                if frame is None:
                    frame = batches[link.target_process] = proto.Data(tick, self.process, [], [])
                frame.messages.append([link.id, link.sequences, link.payloads])
                count += len(link.payloads)
                link.sequences, link.payloads = [], []
        for link in self.in_links:
            if link.taken:
                frame = batches.get(link.source_process)
                if frame is None:
                    frame = batches[link.source_process] = proto.Data(tick, self.process, [], [])
                frame.acks.append([link.id, link.taken])
                link.taken = 0
        self.messages += count
        local = batches.pop(self.process, None)
        if local is not None:
            # through msgpack and back, so local payloads look exactly like remote ones
            self.local = self._pack(local, proto.decode_data)
        for peer in sorted(batches):
            frame = batches[peer]
            self.peers[peer].send(self._pack(frame, proto.check_unpacks), copy=False)
        self._sent = sorted(batches)

    def _pack(self, frame: proto.Data, unpack: Callable[[bytes], Any]) -> Any:
        """``unpack(encode(frame))``: pack a DATA frame and unpack it as its receiver
        will (``check_unpacks`` gives back the bytes to send, ``decode_data`` the
        frame to keep).

        Every payload that msgpack packs but cannot give back (a map with an array
        key, say) or that overflows a frame fails here, in the sender, naming the
        node and link, the same in every placement.
        """
        try:
            return unpack(proto.encode(frame))
        except FrameError as exc:
            link: Link | None = None
            for row in frame.messages:
                try:
                    proto.decode_data(proto.encode(proto.Data(0, self.process, [row], [])))
                except FrameError as cause:
                    exc = cause
                    link = self.links[row[0]]
                    break
            else:
                link = self.links[frame.messages[0][0]] if frame.messages else None
            if link is None:
                raise
            raise NodeFailed(link.source, frame.tick, f"cannot send on link {link.label} at "
                             f"tick {frame.tick}: {exc.__cause__ or exc}") from exc

    # -- stopping ---------------------------------------------------------
    def _stop(self, stop: proto.Stop) -> None:
        """Drain the last tick's frames (counted as undelivered, never dropped unseen)."""
        if stop.expect is None:
            return
        frames = self._collect(self.tick, stop.expect)
        self.undelivered = sum(len(row[2]) for frame in frames for row in frame.messages)

    def _stats(self) -> dict[str, int]:
        unread = sum(len(box) for node in self.nodes for box in node.inbox.values())
        unsent = sum(len(link.payloads) for link in self.out_links)  # put in exit contexts
        return {"messages": self.messages + unsent, "rejected": self.rejected,
                "undelivered": self.undelivered + unsent, "unread": unread}

    def _metrics(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for node in self.nodes:
            with _blame(node.name, self.tick):
                metrics = node.metrics()
                for name, value in metrics.items():
                    if not (proto.NAME.ok(name) and proto.UINT.ok(value)):
                        raise ValueError(f"metrics() gave {name!r}: {value!r}; expected names "
                                         "of A-Z a-z 0-9 _ . - and integers >= 0")
            total.update(metrics)
        return dict(total)

    def _digests(self) -> dict[str, bytes]:
        """Every node's digest (every tick: one try for all, not one per node)."""
        digests = {}
        try:
            for node in self.nodes:
                digests[node.name] = node.digest()
        except _Terminated:
            raise
        except BaseException:
            raise NodeFailed(node.name, self.tick, _tail(traceback.format_exc())) from None
        return digests

    # -- waiting ----------------------------------------------------------
    def _next_control(self) -> proto.Message:
        recv = self.control.recv
        while True:
            try:
                return self.machine.receive(recv())
            except Again:  # quiet for POLL_MS; the watchdog minds the supervisor
                continue


def _source_of(run: tuple[Link, list[int], list[Any]]) -> str:
    return run[0].source


@contextlib.contextmanager
def _blame(node: str, tick: int) -> Iterator[None]:
    """Turn anything a node's own code raises into NodeFailed naming that node."""
    try:
        yield
    except (_Terminated, NodeFailed):
        raise
    except BaseException:
        raise NodeFailed(node, tick, _tail(traceback.format_exc())) from None


def _tail(text: str, lines: int = TRACEBACK_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
