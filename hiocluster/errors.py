"""Every exception hiocluster raises on purpose.

::

    ClusterError
    ├── TopologyError(ValueError)    bad topology file: .key_path, .line
    ├── FrameError(ValueError)       bytes are not a valid frame: .field
    ├── ProtocolError                .tick, .worker, .field, .code
    │   ├── LocalProtocolError       we broke the protocol: our bug
    │   └── RemoteProtocolError      a peer broke it
    ├── RunFailed                    a lockstep run stopped: .worker, .nodes, .tick, .cause
    │   ├── NodeError                a node raised: .detail holds the traceback
    │   ├── TickTimeout              a worker missed the tick deadline
    │   └── ProcessExited            a worker's process died: .exitcode
    ├── LinkFull                     an outbox has no credit left on a link: .link, .tick
    ├── Interrupted                  SIGINT/SIGTERM asked the run to stop: .signal
    ├── TransportError               a socket could not be bound, connected or used
    │   └── Gone                     a run closed a shell's connection
    ├── Unreachable                  no run answers at the control endpoint
    ├── SeveralRuns                  more than one does: say which (--control)
    ├── Exhausted                    the machine ran out of files, disk, memory
    ├── NodeFailed                   in a worker: a node's code raised: .node, .tick
    ├── Unsendable                   in a worker: a payload cannot cross a link
    ├── DataFault                    in a worker: a neighbour's DATA frame is bad: .peer
    ├── ServiceFailed                a service restarted too often: .service
    ├── DigestFileError              a digest file cannot be written or read as one
    ├── CheckpointError              a checkpoint cannot be written, read, or resumed
    ├── RecordError                  a record (--record) cannot be written, read or replayed
    └── LaunchError                  a launcher cannot start workers (no Slurm allocation)

    BaseException
    ├── Terminated                   in a worker: a signal, or the supervisor's loss
    └── TickOverrun                  in a worker: a tick ran past its deadline

``Terminated`` and ``TickOverrun`` are BaseExceptions on purpose: they end a
node's code wherever it is, and a node's ``except Exception`` does not hold them.
They are raised at a worker's signal checkpoints, or by the signal itself only
while a node's own code runs (hiocluster.runtime.signals).

Errors carry fields, not only text. msgpack and zmq exceptions are translated at
the protocol and transport boundaries with ``raise ... from exc``.

This module imports nothing from hiocluster.
"""

from __future__ import annotations

import signal as _signal
from typing import Any

__all__ = [
    "ClusterError",
    "TopologyError",
    "FrameError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "RunFailed",
    "NodeError",
    "TickTimeout",
    "ProcessExited",
    "LinkFull",
    "Interrupted",
    "TransportError",
    "Gone",
    "Unreachable",
    "SeveralRuns",
    "Exhausted",
    "NodeFailed",
    "Unsendable",
    "DataFault",
    "ServiceFailed",
    "DigestFileError",
    "CheckpointError",
    "RecordError",
    "LaunchError",
    "Terminated",
    "TickOverrun",
]


class ClusterError(Exception):
    """Base class of every hiocluster error."""


class TopologyError(ClusterError, ValueError):
    """A topology file (or a CLI override of it) is invalid.

    Attributes:
        key_path: dotted path of the offending key, e.g. ``nodes.a.class``.
        line: 1-based line in the file where known, else None.
        path: the file, where known.
    """

    def __init__(self, message: str, *, key_path: str = "", line: int | None = None,
                 path: str | None = None) -> None:
        self.message = message
        self.key_path = key_path
        self.line = line
        self.path = path
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path or "<topology>"
        if self.line is not None:
            where += f":{self.line}"
        key = f" [{self.key_path}]" if self.key_path else ""
        return f"{where}{key}: {self.message}"


class FrameError(ClusterError, ValueError):
    """Bytes that are not a valid frame (bad msgpack, wrong shape, bad field).

    Attributes:
        field: the offending field (``"frame"`` for the frame as a whole).
        code: a short machine-readable code, sent in the ERROR reply.
    """

    def __init__(self, message: str, *, field: str = "frame", code: str = "bad-frame") -> None:
        self.field = field
        self.code = code
        super().__init__(f"{field}: {message}")


class ProtocolError(ClusterError):
    """A valid frame arrived that the protocol does not allow now.

    Attributes:
        tick: the last tick known done, if any.
        worker: the worker at the other end, if known.
        field: the offending field, if one.
        code: short code, as sent in ERROR frames.
    """

    def __init__(self, message: str, *, tick: int | None = None, worker: str | None = None,
                 field: str = "type", code: str = "protocol") -> None:
        self.tick = tick
        self.worker = worker
        self.field = field
        self.code = code
        super().__init__(message)


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug in hiocluster)."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something the protocol forbids."""


class RunFailed(ClusterError):
    """A lockstep run stopped because one worker failed.

    Attributes:
        worker: the failing worker's name (as in the plan: ``p0``, a placement key).
        nodes: names of the nodes it hosted (or the one node that raised).
        tick: the tick at which it failed (None before the first tick).
        cause: short human cause: "exit code 3", "signal SIGKILL", "ValueError: ...".
        detail: more lines (a traceback), possibly empty.
        kind: "worker", or "group" when ``worker`` is a group (a sub-supervisor).
        reached: of a root run (``hiocluster.run``): the last tick every worker
            finished (-1: none), and ``digest`` the run digest after it.
        checkpoint: the newest complete checkpoint of ``--checkpoint DIR``, if any
            (its ``tick-*`` directory: ``--resume`` goes on from there).
    """

    reached: int | None = None
    digest: str | None = None
    checkpoint: str | None = None

    def __init__(self, *, worker: str, nodes: tuple[str, ...] | list[str], tick: int | None,
                 cause: str, detail: str = "", kind: str = "worker") -> None:
        self.worker = worker
        self.kind = kind
        self.nodes = tuple(nodes)
        self.tick = tick
        self.cause = cause
        self.detail = detail
        super().__init__(str(self))

    def __str__(self) -> str:
        at = f"tick {self.tick}" if self.tick is not None else "start-up"
        nodes = ", ".join(self.nodes) or "-"
        text = f"{self.kind} {self.worker} (node {nodes}) failed at {at}: {self.cause}"
        if self.detail and self.detail.strip() != self.cause.strip():
            text += "\n" + self.detail.rstrip()
        return text


class NodeError(RunFailed):
    """A node's code raised; ``detail`` holds the last lines of the traceback."""


class TickTimeout(RunFailed):
    """A worker spent longer than the tick deadline on one tick."""


class ProcessExited(RunFailed):
    """A worker's process exited or was killed. ``exitcode``: negative for a signal."""

    def __init__(self, *, exitcode: int | None, **kwargs: object) -> None:
        self.exitcode = exitcode
        super().__init__(**kwargs)  # type: ignore[arg-type]


def describe_exitcode(exitcode: int | None) -> str:
    """Return "exit code N" or "signal SIGNAME" for an exit code (negative: a signal)."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"signal {_signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class LinkFull(ClusterError):
    """An outbox has no credit left on a link: the consumer is behind.

    The message was not sent; the producer must retry on a later tick.
    Attributes: link (``"a.out -> b.in"``), tick, capacity.
    """

    def __init__(self, link: str, tick: int, capacity: int) -> None:
        self.link = link
        self.tick = tick
        self.capacity = capacity
        super().__init__(f"link {link} is full at tick {tick} (capacity {capacity})")


class Interrupted(ClusterError):
    """The run was stopped by a signal; the tree was shut down cleanly.

    ``partial``: the results so far (a ``RunResult`` with ``status``
    "interrupted"), when every worker stopped at the same tick (the window in
    flight ended first); None when the run stopped before its first tick or
    without that cut (a second signal, or a window that did not end in time)."""

    def __init__(self, signum: int) -> None:
        self.signal = signum
        self.partial: Any = None
        super().__init__(f"interrupted by {_signal.Signals(signum).name}")


class TransportError(ClusterError):
    """A socket could not be bound, connected or used."""


class Gone(TransportError):
    """The run closed its end of a shell's connection (it exited, or was killed)."""


class Unreachable(ClusterError):
    """No run answers at the control endpoint (or none was found)."""


class SeveralRuns(ClusterError):
    """More than one run answers under the run root: which one is for the user to
    say (``--control``); the message lists them."""


class Exhausted(ClusterError):
    """The machine ran out of something a run needs: open files, disk space or
    inodes under the run root, a writable run root, memory."""

    def with_cause(self, cause: BaseException) -> Exhausted:
        self.__cause__ = cause
        return self


class NodeFailed(ClusterError):
    """A node's own code raised (or produced something unsendable)."""

    def __init__(self, node: str, tick: int, detail: str, code: str = "node-error",
                 cause: str | None = None) -> None:
        self.node, self.tick, self.detail, self.code = node, tick, detail, code
        #: one line, what a run's summary says (``detail`` has the rest)
        self.cause = cause or detail
        super().__init__(f"node {node} failed at tick {tick}")


class Unsendable(ClusterError):
    """A node put a payload that cannot cross a link (msgpack cannot round-trip it)."""

    def __init__(self, node: str, tick: int, detail: str) -> None:
        self.node, self.tick, self.detail = node, tick, detail
        super().__init__(detail)


class DataFault(ClusterError):
    """A neighbour sent an invalid DATA frame (it, not the receiver, is to blame)."""

    def __init__(self, peer: str, error: FrameError | ProtocolError) -> None:
        self.peer, self.error = peer, error
        super().__init__(f"{peer} sent an invalid DATA frame: {error}")


class ServiceFailed(ClusterError):
    """A service restarted more often than its intensity allows: ``.service``."""

    def __init__(self, service: str, message: str) -> None:
        super().__init__(message)
        self.service = service


class DigestFileError(ClusterError):
    """A digest file (``--digests FILE``, ``hiocluster diff``) that cannot be
    written, or read as one: names the file and what is wrong."""


class ObservationsError(ClusterError):
    """The observations' file (``--observe FILE``, ``run(observe=...)``) cannot be
    written: names the file and why."""


class CheckpointError(ClusterError):
    """A checkpoint that cannot be written, read as one, or resumed by this run (of
    another topology, other versions): names the file and what is wrong."""


class RecordError(ClusterError):
    """A record (``--record DIR``) cannot be written (too big, the disk nearly full),
    read (not a record, cut short, altered) or replayed."""


class LaunchError(ClusterError):
    """A launcher cannot start this run's workers: ``--launcher slurm`` outside an
    allocation, or a Slurm command missing or refusing; names what is wrong."""


class MetricsError(ClusterError):
    """The run's metrics endpoint cannot listen where it is asked to (the address
    and why)."""


class Terminated(BaseException):
    """A signal (or the loss of the supervisor) ends this worker: leave through the
    exit contexts. Never blamed on the node it interrupts."""


class TickOverrun(BaseException):
    """Raised in a node by the worker's watchdog: one tick ran past its deadline.

    A BaseException, like KeyboardInterrupt, so a node's ``except Exception``
    does not swallow it.
    """
