"""A replica process: one instance of a service's class, serving in real time.

Its loop is a :class:`~hiocluster.runtime.loop.Loop`, a hio Doist that sleeps in one
poll over the service's sockets (the listening socket, every connection; for
writing too while bytes wait to go out), its control socket and a signal
wake-up, bounded by the next hio timer. So an idle replica costs nearly
nothing, and a request is answered in the cycle that its bytes wake (hio's own
fixed-tock loop either spins or waits up to a tock).

Life of a replica (docs/protocol.md §12): open the servers; JOIN (service,
replica, incarnation, the run's token); serve, with a LOAD at most every LOAD_S
when its counts changed, and at least every quarter of its ``heartbeat`` (the
run kills a replica that fell silent for ``heartbeat`` seconds: its loop hangs,
or it was stopped); every ``health_interval`` its service's health check, the
failures in a row reported in LOAD; SIGUSR1 reopens its log files, SIGHUP,
SIGUSR2, SIGTTIN and SIGTTOU are ignored with a line said (the run acts on
them; their default would end the replica); on STOP (or SIGTERM, or the
supervisor gone: the orphan rule of workers) drain: stop accepting, finish what
is in flight, BYE, exit 0. Started by the supervisor as ``hiocluster replica``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

from hio.base.doing import Doer

from hiocluster import protocol as proto
from hiocluster.errors import FrameError, TransportError
from hiocluster.node import load_class
from hiocluster.runtime.launch import PARENT_ENV
from hiocluster.runtime.loop import Loop
from hiocluster.runtime.replicas import LISTEN_FDS_ENV, SERVICE_ENV
from hiocluster.runtime.rundir import remove_orphan_files
from hiocluster.runtime.signals import IGNORED_SIGNALS, STOP_SIGNALS, Signals
from hiocluster.runtime.transport import Context, Credentials, Poller, ipc_path
from hiocluster.runtime.watchdog import Watchdog, parent_gone
from hiocluster.service import Service
from hiocluster.services.serving import FdWatch
from hiocluster.topology import ServiceSpec

__all__ = ["ReplicaOptions", "run_replica", "LOAD_S", "SERVICE_ENV", "LISTEN_FDS_ENV",
           "PARENT_ENV"]

#: Most often a replica reports its counts (only when they changed).
LOAD_S = 0.2
#: Seconds to reach the supervisor at start.
CONNECT_TIMEOUT = 10.0
#: Longest sleep of an idle replica (its sockets, signals and timers wake it
#: sooner): idle connections are reaped, and LOAD sent, on this scale.
IDLE_WAIT_S = 0.5
#: Longest sleep while draining (a drain ends as soon as nothing is in flight).
DRAIN_WAIT_S = 0.05

logger = logging.getLogger("hiocluster.replica")


def code_version(cls: type, app_dir: str | None) -> str:
    """Which code a process imported for ``cls``: 12 hex digits of a hash of the
    source of every module loaded from the app's directory (``app_dir``, else
    where ``cls``'s top package lies), installed packages left out. Taken right
    after the import, so a spare that imported the code before an edit says the
    old version when it serves: mixed versions show in ``status``."""
    if app_dir is None:  # the directory its top package (or module) was found in
        top = sys.modules[cls.__module__.partition(".")[0]]
        where = os.path.dirname(top.__file__ or "")
        app_dir = os.path.dirname(where) if hasattr(top, "__path__") else where
    root = os.path.realpath(app_dir)
    digest = hashlib.sha256()
    for name, loaded in sorted(sys.modules.items()):
        path = getattr(loaded, "__file__", None)
        if not path or not path.endswith(".py"):
            continue
        path = os.path.realpath(path)
        if not path.startswith(root + os.sep) or "-packages" + os.sep in path:
            continue
        try:
            with open(path, "rb") as source:
                digest.update(name.encode() + b"\0" + source.read() + b"\0")
        except OSError:
            continue  # gone since: its name still counts
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class ReplicaOptions:
    """How to start one replica (the ``hiocluster replica`` command line)."""

    connect: str
    spec: ServiceSpec
    index: int
    incarnation: int
    credentials: Credentials
    app_dir: str | None = None
    fds: tuple[int, ...] = ()     # inherited listening sockets
    spare: bool = False           # wait, warm, to be told which replica to become
    parent: int | None = None     # the run's pid, where it is our parent

    @property
    def key(self) -> str:
        """Its routing id: ``web.1.7``, or ``web.spare.3`` for a spare."""
        return f"{self.spec.name}.{'spare' if self.spare else self.index}.{self.incarnation}"


class _Serving(Doer):
    """The service's servers as a doer: one step per cycle, then what to wake on."""

    def __init__(self, replica: ReplicaProcess, **kwa: Any) -> None:
        super().__init__(**kwa)
        self.replica = replica

    def enter(self) -> None:
        self.replica.service.wind(self.tymth)

    def recur(self, tyme: float) -> bool:
        self.replica.step()
        return False


class ReplicaProcess:
    """One replica's lifetime (see the module docstring)."""

    def __init__(self, options: ReplicaOptions, service: Service, version: str = "") -> None:
        self.options, self.service, self.version = options, service, version
        self.loop = Loop([_Serving(self), *service.doers()], max_wait=IDLE_WAIT_S)
        self.fds = FdWatch(self.loop.poller)
        self.draining_since: float | None = None
        self.reported: tuple[int, int, int, str] = (-1, -1, 0, "")
        self.report_at = 0.0
        self.beat_at = 0.0      # a LOAD is due by then even if nothing changed
        self.check_at = 0.0     # the next health check
        self.failing = 0        # health checks failed in a row
        self.health = ""        # "" no check, "ok", or what the last failed one said
        self.done = False

    # -- the loop -----------------------------------------------------------------
    def run(self) -> int:
        options = self.options
        self.context = Context(options.credentials.keys, owner=f"replica {options.key}")
        watchdog = None
        with Signals(STOP_SIGNALS + IGNORED_SIGNALS).watch(self.loop, self._signalled):
            try:
                self.control, monitor = self.context.monitored_dealer(
                    options.connect, options.credentials.server, identity=options.key.encode())
                watchdog = Watchdog(monitor, CONNECT_TIMEOUT,
                                    lambda: 0.0, idle_check=IDLE_WAIT_S, parent=options.parent)
                watchdog.start()
                try:
                    self.service.open()
                except Exception as exc:
                    detail = f"{type(exc).__name__}: {exc}"
                    logger.error("%s cannot serve: %s", options.key, detail)
                    self._send(proto.Error(code="start", detail=detail))
                    return 1
                self._send(proto.Join(service=options.spec.name, replica=options.index,
                                      incarnation=options.incarnation,
                                      token=options.credentials.token, pid=os.getpid(),
                                      version=self.version))
                self.loop.poller.register(self.control)
                self.loop.enter()
                try:
                    while not self.done:
                        self.loop.recur()
                        self._control()
                        if not self.done:
                            self.loop.wait()
                finally:
                    self.loop.exit()
                if watchdog.orphaned or parent_gone(watchdog.parent):  # killed as it stopped
                    remove_run_files(self.options.connect)
                    return 3
                self._send(proto.Bye(stats={"served": self.service.served}))
                return 0
            finally:
                if watchdog is not None:
                    watchdog.stop()
                self.service.close()
                self.context.close()

    def step(self) -> None:
        """One cycle of the service, then what to sleep on next."""
        service = self.service
        service.step()
        listed = service.watch()
        if service.busy:  # after watch: it tells the servers what waits
            self.loop.asap = True
        self.fds.update(listed)

    def _control(self) -> None:
        """Frames from the supervisor, LOAD when due, the end of a drain."""
        while (data := self.control.take()) is not None:
            try:
                message = proto.decode(data, allowed=proto.TO_REPLICA)
            except FrameError as exc:
                logger.error("bad frame from the supervisor: %s", exc)
                continue
            if isinstance(message, proto.Stop):
                self._drain(message.reason)
            else:
                logger.error("the supervisor says: %s", message.detail)  # type: ignore
                self._drain("error")
        now = time.monotonic()
        service = self.service
        if self.draining_since is None and now >= self.check_at:
            self.check_at = now + self.options.spec.health_interval
            self._check_health()
        counts = (service.served, service.connections, self.failing, self.health)
        if self.draining_since is None and ((counts != self.reported and now >= self.report_at)
                                            or now >= self.beat_at):
            self.reported, self.report_at = counts, now + LOAD_S
            self.beat_at = now + self.options.spec.heartbeat / 4
            latency = service.latency
            self._send(proto.Load(served=counts[0], connections=counts[1],
                                  failing=self.failing, health=self.health,
                                  latency=list(latency.counts) if latency else [],
                                  latency_sum=latency.total if latency else 0.0))
        self.loop.wake_by(min(self.beat_at, self.check_at))
        if self.draining_since is not None and (
                service.idle or now - self.draining_since > self.options.spec.drain):
            self.done = True

    def _check_health(self) -> None:
        """Ask the service whether it is healthy; count the failures in a row."""
        try:
            healthy = self.service.healthy()
            why = "healthy() returned False"
        except Exception as exc:
            healthy, why = False, f"{type(exc).__name__}: {exc}"
        if healthy is None:
            self.health = ""
        elif healthy:
            if self.failing:
                logger.warning("%s: healthy again", self.options.key)
            self.failing, self.health = 0, "ok"
        else:
            self.failing += 1
            self.health = why[:200]
            logger.warning("%s: health check failed (%d in a row): %s", self.options.key,
                           self.failing, self.health)

    def _drain(self, reason: str) -> None:
        if self.draining_since is None:
            logger.debug("%s drains: %s", self.options.key, reason)
            self.draining_since = time.monotonic()
            self.loop.max_wait = DRAIN_WAIT_S
            self.service.drain()

    def _signalled(self, signum: int) -> None:
        """A signal, at the loop's checkpoint: SIGTERM/SIGINT drain; the rest are
        ignored (said in the log)."""
        if signum in STOP_SIGNALS:
            self._drain(signal.Signals(signum).name)
        elif signum == signal.SIGUSR1:
            self.service.reopen_logs()
            logger.warning("%s: SIGUSR1: log files opened again", self.options.key)
        else:
            logger.warning("%s: %s ignored", self.options.key, signal.Signals(signum).name)

    def _send(self, message: proto.Message) -> None:
        try:
            sent = self.control.put(proto.encode(message))
        except TransportError as exc:  # the supervisor is gone: the orphan rule ends us
            logger.debug("cannot send %s: %s", message.TYPE, exc)
            return
        if not sent:
            logger.debug("cannot send %s: not connected", message.TYPE)


def remove_run_files(connect: str) -> None:
    """An orphan's clean-up (its run was killed): the run directory's sockets and
    credentials and, for whoever is last out, the directory."""
    path = ipc_path(connect)
    if path is not None:
        remove_orphan_files(os.path.dirname(path), connect)


def standby(options: ReplicaOptions) -> ReplicaOptions | int:
    """A spare's life until it is told which replica to become: the service's code
    is imported, the run's listening sockets inherited; STANDBY, then wait for
    ASSIGN (the options of that replica) or STOP, SIGTERM, SIGINT, the run gone
    (an exit code)."""
    with Signals(STOP_SIGNALS + IGNORED_SIGNALS) as signals:
        context = Context(owner=f"spare {options.key}")
        watchdog = None
        try:
            control, monitor = context.monitored_dealer(options.connect,
                                                        identity=options.key.encode())
            watchdog = Watchdog(monitor, CONNECT_TIMEOUT, lambda: 0.0,
                                idle_check=IDLE_WAIT_S, parent=options.parent)
            watchdog.start()
            control.send(proto.encode(proto.Standby(service=options.spec.name,
                                                    token=options.credentials.token,
                                                    pid=os.getpid())))
            wake = signals.fileno()
            poller = Poller([control] if wake is None else [control, wake])
            while True:
                if watchdog.orphaned:
                    remove_run_files(options.connect)
                    return 3
                if set(signals.take()) & set(STOP_SIGNALS):  # the others are ignored
                    return 0
                if control not in poller.poll(IDLE_WAIT_S * 1000):
                    continue
                try:
                    data = control.take()
                    if data is None:
                        continue
                    message = proto.decode(data, allowed=proto.TO_REPLICA)
                except FrameError as exc:
                    logger.error("bad frame from the supervisor: %s", exc)
                    continue
                if not isinstance(message, proto.Assign):
                    return 0  # STOP (or an ERROR): a spare has nothing to drain
                if any(k >= len(options.fds) for k in message.listeners):
                    logger.error("ASSIGN names listening sockets %s; this spare has %d",
                                 message.listeners, len(options.fds))
                    return 1
                keep = tuple(options.fds[k] for k in message.listeners)
                for fd in set(options.fds) - set(keep):
                    os.close(fd)
                return dataclasses.replace(options, index=message.replica,
                                           incarnation=message.incarnation, fds=keep,
                                           spare=False)
        finally:
            if watchdog is not None:
                watchdog.stop()
            context.close(linger=0)


def run_replica(options: ReplicaOptions) -> int:
    """Build the service's instance and serve until stopped; the exit code. A
    spare imports the service's code first, then waits to be assigned."""
    try:
        cls = load_class(options.spec.cls, options.app_dir, base=Service)
    except ImportError as exc:
        print(f"{options.key}: cannot load {options.spec.cls}: {exc}", file=sys.stderr)
        return 1
    version = code_version(cls, options.app_dir)
    if options.spare:
        assigned = standby(options)
        if isinstance(assigned, int):
            return assigned
        options = assigned
    try:
        service = cls(options.spec, options.index)
        service.sockets = [socket.socket(fileno=fd) for fd in options.fds]
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exc(limit=-4))
        print(f"{options.key}: cannot make {options.spec.cls}: {detail}", file=sys.stderr)
        return 1
    return ReplicaProcess(options, service, version).run()


def options_from(connect: str, name: str, app_dir: str | None) -> ReplicaOptions:
    """The options of ``hiocluster replica`` (``name``: service.replica.incarnation);
    the spec and credentials come in the environment.

    Raises:
        ValueError: naming what is missing or malformed.
    """
    from hiocluster.runtime.transport import CREDENTIALS_ENV

    service, dot, rest = name.partition(".")
    index, dot2, incarnation = rest.partition(".")
    spare = index == "spare"
    if not (dot and dot2 and (index.isdigit() or spare) and incarnation.isdigit()):
        raise ValueError(f"--name must be SERVICE.REPLICA.INCARNATION or "
                         f"SERVICE.spare.N, got {name!r}")
    try:
        spec = ServiceSpec.from_json(json.loads(os.environ[SERVICE_ENV]))
        credentials = Credentials.from_json(os.environ[CREDENTIALS_ENV])
    except KeyError as exc:
        raise ValueError(f"{exc.args[0]} is not set: replicas are started by "
                         "hiocluster run") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"bad {SERVICE_ENV}: {exc}") from None
    if spec.name != service:
        raise ValueError(f"--name {name} is not a replica of {spec.name}")
    try:
        fds = tuple(int(fd) for fd in os.environ.get(LISTEN_FDS_ENV, "").split(",") if fd)
    except ValueError:
        raise ValueError(f"bad {LISTEN_FDS_ENV}: {os.environ[LISTEN_FDS_ENV]!r}") from None
    parent = os.environ.get(PARENT_ENV, "")
    return ReplicaOptions(connect, spec, -1 if spare else int(index), int(incarnation),
                          credentials, app_dir, fds, spare,
                          int(parent) if parent.isdigit() else None)
