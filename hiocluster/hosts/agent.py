"""``hiocluster agent``: a daemon that starts workers on its host for supervisors.

A supervisor whose topology places workers on this host connects to the agent
(CurveZMQ: the agent admits only the supervisor public keys it was told to
trust, ``--trust``: never another agent's key, nor a worker's) and sends LAUNCH
per worker; the agent starts ``hiocluster worker`` with the credentials that
came with it, binding its data socket on the agent's own address, and reports
LAUNCHED, the worker's stderr (OUTPUT) and its end (EXITED, with the tick from
its tick register). A LAUNCH with a service's spec starts a replica of that
service instead (``[services.NAME] hosts``): it serves on the service's address
on this host, on listening sockets the agent opens for the supervisor's session
and holds until the session ends or CLOSE closes them (so connections queued on
them outlive any one replica, as the run's own do on its host). SIGNAL
terminates or kills a worker. Every 0.1 s the agent
PINGs each supervisor it serves; once a ping cannot be sent (ZeroMQ heartbeats
dropped the connection: the supervisor vanished, or the link to it is cut) it
stops every worker that supervisor had started here and removes their files
(docs/protocol.md §10).

Each supervisor's workers get a directory ``hioc-a<agent pid>-*`` under the run
root (``$HIOCLUSTER_RUN_ROOT``, else the temp directory), which is also the run
root of everything they start (a group's own directory goes inside it). An
agent that starts sweeps the directories of agents that are dead (killed with
SIGKILL, say): whatever their workers could not remove themselves.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hio.base.doing import Doer

from hiocluster import protocol as proto
from hiocluster.errors import FrameError
from hiocluster.runtime.launch import LocalLauncher, LocalProcess, end_process
from hiocluster.runtime.loop import Loop
from hiocluster.runtime.replicas import listening_socket, spawn_replica
from hiocluster.runtime.rundir import RUN_ROOT_ENV, make_run_dir, remove_run_dir, run_root
from hiocluster.runtime.signals import Signals
from hiocluster.runtime.transport import (
    Context,
    Credentials,
    KeyPair,
    TransportError,
    resolve,
    resolved,
)
from hiocluster.topology.spec import ServiceSpec
from hiocluster.topology.tree import check_tree

__all__ = ["AgentOptions", "Agent", "run_agent", "PING_S"]

#: How often the agent pings each supervisor it serves.
PING_S = 0.1
#: Seconds a worker gets between SIGTERM and SIGKILL when its supervisor is gone.
STOP_GRACE_S = 2.0
#: How an agent's directories start: ``hioc-a<pid>-`` (whose they are, for the sweep).
DIR_PREFIX = "hioc-a"


@dataclass(frozen=True)
class AgentOptions:
    """How to run an agent (the ``hiocluster agent`` command line)."""

    listen: str                    # tcp://HOST:PORT
    keys: str                      # the keys directory
    name: str                      # this host's name: its key pair is NAME.key_secret
    trust: tuple[str, ...] = ()    # the supervisors' public keys (files, relative to keys)
    app_dir: str | None = None     # where workers import node classes from
    advertise: str | None = None   # the host workers bind on (default: listen's host)
    #: ``--keys -``: its key pair and the supervisors it trusts (name -> public key),
    #: read from stdin; the agent then stops when stdin ends
    given: tuple[KeyPair, dict[str, str]] | None = None


def stdin_keys(line: str) -> tuple[KeyPair, dict[str, str]]:
    """``--keys -``: ``{"public": ..., "secret": ..., "trust": {name: public}}`` (Z85
    keys), one JSON line. Raises ValueError naming what is wrong."""
    try:
        given = json.loads(line)
        pair = KeyPair(str(given["public"]), str(given["secret"]))
        trust = {str(name): str(key) for name, key in dict(given["trust"]).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"--keys -: stdin's first line is not the keys as JSON ({exc})") \
            from None
    if not trust or any(len(key) != 40 for key in [pair.public, pair.secret, *trust.values()]):
        raise ValueError("--keys -: the keys on stdin are not Z85 CURVE keys (40 "
                         "characters), or trust none")
    if pair.public in trust.values():
        raise ValueError("--keys -: it would trust its own key")
    return pair, trust


@dataclass
class Session:
    """One supervisor's connection: the workers it started here."""

    identity: bytes
    run_dir: str
    ended: bool = False                  # the supervisor is gone, or gave up
    workers: dict[str, LocalProcess] = field(default_factory=dict)   # and replicas
    stopping: dict[str, float] = field(default_factory=dict)   # worker -> kill at
    #: its services' listening sockets on this host: (service, position) -> socket
    sockets: dict[tuple[str, int], socket.socket] = field(default_factory=dict)

    def close(self) -> None:
        """Its listening sockets and run directory (its processes are gone)."""
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
        remove_run_dir(self.run_dir)


class Agent(Doer):
    """The agent as a hio doer (see the module docstring)."""

    def __init__(self, options: AgentOptions, loop: Loop, **kwa: Any) -> None:
        super().__init__(**kwa)
        self.options, self.loop = options, loop
        self.listen = resolved(options.listen)
        host = self.listen[len("tcp://"):].rsplit(":", 1)[0]
        self.advertise = resolve(options.advertise) if options.advertise else host
        self.warnings = [warning for name, address in (
            (options.listen[len("tcp://"):].rpartition(":")[0], host),
            (options.advertise, self.advertise)) if name
            for warning in [_loopback_warning(name, address)] if warning]
        self.sessions: dict[bytes, Session] = {}
        self.rejected = 0
        self.stop_requested = 0
        self.ping_at = 0.0
        self.context: Context | None = None

    # -- hio ------------------------------------------------------------------------
    def enter(self) -> None:
        if self.options.given is not None:
            keys, trusted = self.options.given
        else:
            keys = KeyPair.load(os.path.join(self.options.keys,
                                             f"{self.options.name}.key_secret"))
            trusted = trusted_keys(self.options, keys)
        for warning in self.warnings:
            print(f"hiocluster agent {self.options.name}: warning: {warning}",
                  file=sys.stderr, flush=True)
        sweep(os.getpid())
        self.context = Context(keys, owner=f"agent {self.options.name}")
        gate = self.context.gate
        assert gate is not None
        for name, public in trusted.items():
            gate.admit(name, public)
        gate.open()
        self.router = self.context.control_router(self.listen)
        self.loop.poller.register(self.router)
        listening = self.options.listen
        if listening.endswith(":0"):  # a free port: which one, at which address
            listening = self.router.bound_address()
        print(f"hiocluster agent {self.options.name}: listening on {listening}", flush=True)

    def recur(self, tyme: float) -> bool:
        now = time.monotonic()
        while (parts := self.router.take_parts()) is not None:
            self._receive(parts)
        for session in list(self.sessions.values()):
            self._watch(session, now)
        if now >= self.ping_at:
            self.ping_at = now + PING_S
            for session in list(self.sessions.values()):
                if not self._send(session.identity, proto.Ping()):
                    self._end(session, now)
        if self.stop_requested:
            for session in list(self.sessions.values()):
                self._end(session, now)
            return not self.sessions
        return False

    def exit(self) -> None:
        for session in self.sessions.values():
            for handle in session.workers.values():
                _stop_now(handle)
            session.close()
        self.sessions.clear()
        if self.context is not None:  # None: enter failed before it was made
            self.context.close(linger=0)

    # -- supervisors' messages --------------------------------------------------------
    def _receive(self, parts: list[bytes]) -> None:
        identity = parts[0]
        try:
            if len(parts) != 2:
                raise FrameError(f"expected one frame, got {len(parts) - 1}", code="multipart")
            message = proto.decode(parts[1], allowed=proto.TO_AGENT)
        except FrameError as exc:
            self.rejected += 1
            self._send(identity, proto.Error(code=exc.code, detail=str(exc), field=exc.field))
            return
        session = self.sessions.get(identity)
        if session is not None and session.ended:
            return
        if session is None:
            try:
                run_dir = make_run_dir(prefix=f"{DIR_PREFIX}{os.getpid()}-", guarded=False)
            except TransportError as exc:
                self._send(identity, proto.Error(code="agent-error", detail=str(exc)))
                return
            session = self.sessions[identity] = Session(identity, run_dir)
        if isinstance(message, proto.Launch):
            self._launch(session, message)
        elif isinstance(message, proto.Signal):
            handle = session.workers.get(message.worker)
            if handle is not None:
                (handle.kill if message.signal == "kill" else handle.terminate)()
        elif isinstance(message, proto.Close):
            for position in message.listeners:
                sock = session.sockets.pop((message.service, position), None)
                if sock is not None:
                    sock.close()
        else:  # ERROR: the supervisor gives up on this host
            self._end(session, time.monotonic())

    def _launch(self, session: Session, launch: proto.Launch) -> None:
        if launch.worker in session.workers:
            what = "group" if launch.tree is not None else \
                "replica" if launch.service is not None else "worker"
            self._send(session.identity, proto.Error(
                code="duplicate", detail=f"{what} {launch.worker} runs here already",
                field="LAUNCH.worker"))
            return
        try:
            credentials = Credentials.from_json(launch.credentials)
        except ValueError as exc:
            self._send(session.identity, proto.Error(code="bad-field", detail=str(exc),
                                                     field="LAUNCH.credentials"))
            return
        if launch.service is not None:
            self._launch_replica(session, launch)
            return
        trees = {}
        if launch.tree is not None:
            try:
                trees[launch.worker] = check_tree(json.loads(launch.tree))
            except (ValueError, RecursionError) as exc:
                self._send(session.identity, proto.Error(code="bad-field", detail=str(exc),
                                                         field="LAUNCH.tree"))
                return
        launcher = LocalLauncher(launch.connect, lambda worker: credentials, session.run_dir,
                                 app_dir=self.options.app_dir, capture=True,
                                 bind=f"tcp://{self.advertise}:*", trees=trees,
                                 env={RUN_ROOT_ENV: session.run_dir})
        self._started(session, launch.worker, launcher.start(launch.worker))

    def _launch_replica(self, session: Session, launch: proto.Launch) -> None:
        """LAUNCH of a service's replica (see the module docstring). One that cannot
        listen or start is reported as exited with code 1, its reason in OUTPUT:
        the supervisor's restart policy decides what follows."""
        try:
            spec = service_spec(launch.service or "")
        except ValueError as exc:
            self._send(session.identity, proto.Error(code="bad-field", detail=str(exc),
                                                     field="LAUNCH.service"))
            return
        try:
            fds = [self._listening(session, spec, k).fileno()
                   for k in launch.listeners or [0]]
            handle = spawn_replica([sys.executable, "-m", "hiocluster"],
                                   connect=launch.connect, key=launch.worker,
                                   app_dir=self.options.app_dir, spec=spec.to_json(),
                                   credentials=launch.credentials, fds=fds,
                                   env={RUN_ROOT_ENV: session.run_dir})
        except OSError as exc:
            self._send(session.identity, proto.Output(
                worker=launch.worker, text=f"cannot serve {spec.name} on {spec.address} on "
                                           f"host {self.options.name}: {exc.strerror or exc}\n"))
            self._send(session.identity, proto.Exited(worker=launch.worker, exitcode=1,
                                                      tick=None))
            return
        self._started(session, launch.worker, handle)

    def _listening(self, session: Session, spec: ServiceSpec, position: int) -> socket.socket:
        """The session's listening socket ``position`` for ``spec`` (opened on first
        use; the first of a service first checks that nothing else listens there)."""
        key = (spec.name, position)
        if key not in session.sockets:
            alone = not any(name == spec.name for name, _ in session.sockets)
            session.sockets[key] = listening_socket(spec.listen, alone=alone)
        return session.sockets[key]

    def _started(self, session: Session, name: str, handle: LocalProcess) -> None:
        session.workers[name] = handle
        if handle.sentinel is not None:
            self.loop.poller.register(handle.sentinel)
        if handle.output is not None:
            self.loop.poller.register(handle.output)
        self._send(session.identity, proto.Launched(worker=name, pid=handle.pid or 0))

    # -- workers --------------------------------------------------------------------
    def _watch(self, session: Session, now: float) -> None:
        for name, handle in list(session.workers.items()):
            self._forward_output(session, name, handle)
            code = handle.exitcode()
            if code is None:
                if session.stopping.get(name, float("inf")) <= now:
                    handle.kill()
                continue
            self._forward_output(session, name, handle)
            self._send(session.identity, proto.Exited(worker=name, exitcode=code,
                                                      tick=handle.last_tick()))
            self._forget(handle)
            del session.workers[name]
        if session.ended and not session.workers:
            self.sessions.pop(session.identity, None)
            session.close()

    def _forward_output(self, session: Session, name: str, handle: LocalProcess) -> None:
        if handle.output is None:
            return
        try:
            data = os.read(handle.output, 65536)
        except BlockingIOError:
            return
        if data:
            self._send(session.identity, proto.Output(worker=name,
                                                      text=data.decode(errors="replace")))

    def _end(self, session: Session, now: float) -> None:
        """The supervisor is gone (or gave up): stop its workers, SIGKILL after a grace.
        An agent of one run (``--keys -``) then stops itself."""
        session.ended = True
        if self.options.given is not None and not self.stop_requested:
            self.stop_requested = signal.SIGTERM
        for name, handle in session.workers.items():
            if name not in session.stopping:
                handle.terminate()
                session.stopping[name] = now + STOP_GRACE_S
        self._watch(session, now)

    def _forget(self, handle: LocalProcess) -> None:
        for fd in (handle.sentinel, handle.output):
            if fd is not None:
                self.loop.poller.unregister(fd)
        handle.close()

    def _send(self, identity: bytes, message: proto.Message) -> bool:
        """False when the supervisor's connection is gone."""
        return self.router.put_to(identity, proto.encode(message))


def _stop_when_stdin_ends() -> None:
    """``--keys -``: its supervisor holds stdin (through ssh); once it ends (the run
    is over, or the connection dropped), SIGTERM this agent: a clean stop."""
    def watch() -> None:
        try:
            while os.read(sys.stdin.fileno(), 4096):
                pass
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def trusted_keys(options: AgentOptions, own: KeyPair) -> dict[str, str]:
    """The supervisors' public keys an agent admits (name -> key), from ``--trust``
    (paths relative to the keys directory). Raises TransportError for a file that
    is no public key, for the agent's own key, and for none at all."""
    if not options.trust:
        raise TransportError("trusts no supervisor key: give --trust FILE (a supervisor's "
                             "public key, e.g. supervisor.key)")
    trusted = {}
    for given in options.trust:
        path = os.path.join(options.keys, given)
        public = KeyPair.load_public(path)
        if public == own.public:
            raise TransportError(f"--trust {given}: {path} is this agent's own public key; "
                                 "trust the supervisors' keys (e.g. supervisor.key), never "
                                 "an agent's")
        trusted[Path(path).stem] = public
    return trusted


def service_spec(text: str) -> ServiceSpec:
    """A LAUNCH's service: its spec as JSON. Raises ValueError naming what is wrong."""
    try:
        spec = ServiceSpec.from_json(json.loads(text))
        host, port = spec.listen
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"not a service's spec ({type(exc).__name__}: {exc})") from None
    if not (isinstance(host, str) and type(port) is int and 0 < port < 65536):
        raise ValueError(f"not a service's spec: listen {spec.listen!r} is no (host, port)")
    return spec


def _loopback_warning(name: str, address: str) -> str | None:
    """What to say when host ``name`` (not an address) resolves to a loopback address:
    no other host reaches it there (Debian maps a host's own name to 127.0.1.1)."""
    try:
        ipaddress.ip_address(name)
        return None  # an address given as such is meant
    except ValueError:
        pass
    if not ipaddress.ip_address(address).is_loopback:
        return None
    return (f"{name} resolves to {address}, a loopback address: no other host can reach "
            f"this agent or its workers there (see /etc/hosts); use the address other hosts "
            f"reach this one at")


def sweep(me: int) -> list[str]:
    """Remove the directories that agents now dead left under the run root (theirs, and
    an earlier process's with this pid ``me``); return them."""
    swept: list[str] = []
    try:
        entries = list(Path(run_root()).glob(f"{DIR_PREFIX}*-*"))
    except OSError:
        return swept
    for entry in entries:
        owner = entry.name[len(DIR_PREFIX):].partition("-")[0]
        if owner.isdigit() and (int(owner) == me or not _alive(int(owner))):
            shutil.rmtree(entry, ignore_errors=True)
            swept.append(str(entry))
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's
    return True


def _stop_now(handle: LocalProcess) -> None:
    """SIGTERM, a short grace, SIGKILL: the agent is going away."""
    end_process(handle, STOP_GRACE_S)
    handle.popen.wait()
    handle.close()


def run_agent(options: AgentOptions) -> int:
    """Run an agent until SIGINT or SIGTERM; return its exit code."""
    loop = Loop()
    try:
        agent = Agent(options, loop)
        loop.doers = [agent]

        def stop(signum: int) -> None:
            agent.stop_requested = signum

        with Signals().watch(loop, stop):
            if options.given is not None:
                _stop_when_stdin_ends()
            loop.run()
    except TransportError as exc:
        print(f"hiocluster agent {options.name}: {exc}", file=sys.stderr)
        return 1
    return 128 + agent.stop_requested if agent.stop_requested else 0
