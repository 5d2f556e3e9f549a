"""Workers on other hosts: the supervisor's side of a host's agent.

:class:`AgentLink` is a doer in the supervisor's Loop: it connects to one
host's agent (CurveZMQ, with the agent's public key from the keys directory),
asks it to LAUNCH workers, and keeps a :class:`RemoteProcess` per worker — the
same :class:`~hiocluster.runtime.launch.ProcessHandle` a local worker has, so the
supervisor's ChildDoers cannot tell them apart. When the connection drops
(ZeroMQ heartbeats: the host vanished, its link is cut, or its agent is
stopped), every worker on that host is lost at once; so they are when the
first contact fails: nothing takes the TCP connection within the heartbeat time
(no agent runs there, or it listens on another address), or nothing completes
the handshake within HANDSHAKE_S.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from hio.base.doing import Doer

from hiocluster import protocol as proto
from hiocluster.errors import FrameError, TopologyError, TransportError
from hiocluster.hosts.slurm import SlurmAgent
from hiocluster.hosts.ssh import SshAgent
from hiocluster.hosts.started import StartedAgent
from hiocluster.runtime.transport import KeyPair, Socket, facing, heartbeat_timeout_ms
from hiocluster.topology.spec import SlurmTarget

if TYPE_CHECKING:
    from hiocluster.topology import HostSpec

__all__ = ["AgentLink", "RemoteProcess", "first_contact_s", "HANDSHAKE_S", "listen_toward",
           "agent_links", "launch_agents", "supervisor_keys"]


def listen_toward(link: AgentLink) -> str:
    """Where a supervisor binds for the processes it starts on ``link``'s host:
    the address of this host that faces it, a free port (``tcp://ADDRESS:*``).
    Raises TransportError when there is no route to it."""
    toward = link.started.toward if link.started is not None else link.host.agent
    return f"tcp://{facing(toward)}:*"


def supervisor_keys(keys: str | None) -> KeyPair:
    """A supervisor's CURVE key pair for a run across hosts: ``supervisor.key_secret``
    of the keys directory, else one made for the run (every host's agent is then
    started by the run, and told it)."""
    return KeyPair.load(os.path.join(keys, "supervisor.key_secret")) if keys \
        else KeyPair.generate()


def agent_links(owner: Any, hosts: Mapping[str, HostSpec], keys: str | None, *, what: str,
                output: Callable[[str, str], None] | None = None) -> dict[str, AgentLink]:
    """An :class:`AgentLink` per host, in order: an agent started by hand is known
    by its public key in ``keys`` (``NAME.key``); an ``ssh://`` or ``slurm://``
    host's is started by its link, with keys made for the run. Raises
    TopologyError (agents started by hand, no keys directory: naming ``what``
    runs there) or LaunchError (a ``slurm://`` host outside an allocation)."""
    agents = sorted(name for name, host in hosts.items() if host.started is None)
    if agents and keys is None:
        raise TopologyError(f"{what} on other hosts need a keys directory (--keys DIR; "
                            f"make it with: hiocluster keygen DIR supervisor "
                            f"{' '.join(agents)})", key_path="hosts")
    return {name: AgentLink(owner, host, None if host.started else KeyPair.load_public(
        os.path.join(keys or "", f"{name}.key")), output=output)
        for name, host in hosts.items()}


def launch_agents(links: Iterable[AgentLink]) -> None:
    """Start every started agent (``ssh://``, ``slurm://``) at once, before any link
    enters: their logins and Python start-ups overlap."""
    for link in links:
        if link.started is not None:
            with contextlib.suppress(OSError):  # its link says so as it enters
                link.launch()


def started_agent(host: HostSpec, app_dir: str) -> StartedAgent | None:
    """The agent a supervisor starts itself for ``host`` (``ssh://``, ``slurm://``);
    None: one started by hand. Raises LaunchError (a ``slurm://`` host outside an
    allocation, or not on one of its nodes)."""
    target = host.started
    if target is None:
        return None
    if isinstance(target, SlurmTarget):
        return SlurmAgent(host.name, target.node, app_dir)
    return SshAgent(host.name, target, app_dir)



def first_contact_s() -> float:
    """How soon an agent's host must take the TCP connection: the heartbeat time
    (what a connected host may stay silent before it is lost)."""
    return heartbeat_timeout_ms() / 1000


#: ... and the agent complete the CurveZMQ handshake this soon after.
HANDSHAKE_S = 10.0
#: Seconds an agent started for the run gets to stop its processes and exit at the end.
STARTED_STOP_S = 5.0


class RemoteProcess:
    """A worker started by an agent (see :class:`~hiocluster.runtime.launch.ProcessHandle`)."""

    sentinel = None  # the link wakes the loop itself

    def __init__(self, link: AgentLink, worker: str) -> None:
        self.link, self.worker = link, worker
        self.pid: int | None = None
        self._exitcode: int | None = None
        self._tick: int | None = None
        self._why: str | None = None

    def exitcode(self) -> int | None:
        if self._why is not None and self._exitcode is None:
            return 255  # lost with its host: see why()
        return self._exitcode

    def last_tick(self) -> int | None:
        return self._tick

    def why(self) -> str | None:
        return self._why

    def terminate(self) -> None:
        self.link.signal(self.worker, "terminate")

    def kill(self) -> None:
        self.link.signal(self.worker, "kill")

    def close(self) -> None:
        pass

    def ended(self, exitcode: int, tick: int | None) -> None:
        self._exitcode, self._tick = exitcode, tick

    def lost(self, why: str) -> None:
        if self._exitcode is None:
            self._why = why


class AgentLink(Doer):
    """One host's agent, as a doer (see the module docstring).

    Args:
        supervisor: the Supervisor it serves (its context, control address,
            credentials for each worker, and the loop's poller).
        host: the host (its agent's address and name).
        agent_key: the agent's CURVE public key; None for an ``ssh://`` or
            ``slurm://`` host, whose agent this link starts as it enters, with keys
            made for the run (hiocluster.hosts.started), and stops as it exits.
        output: called with (worker, text) for what a process there wrote
            (default: printed on stderr, each line prefixed ``[host/worker]``).
    """

    def __init__(self, supervisor: Any, host: HostSpec, agent_key: str | None, *,
                 output: Callable[[str, str], None] | None = None, **kwa: Any) -> None:
        super().__init__(**kwa)
        self.supervisor, self.host, self.output = supervisor, host, output
        self.started = started_agent(host, supervisor.app_dir)
        self.agent_key = agent_key if self.started is None else self.started.keys.public
        assert self.agent_key is not None
        self.processes: dict[str, RemoteProcess] = {}
        self.pending: list[bytes] = []   # frames waiting for the connection
        self.socket: Socket | None = None
        self.monitor: Socket | None = None
        self.connected = False
        self.reached = False          # TCP connected, at least once
        self.retried = False          # an attempt to connect failed
        self.contact_by = 0.0         # monotonic: when the first contact is overdue
        self.awaiting: int | None = None  # a started agent's stdout, until it says
        self.lost: str | None = None  # why its workers were lost with it (None: they were not)

    def enter(self) -> None:
        if self.started is None:
            self._connect()
            return
        try:  # not waiting for it: what is launched meanwhile waits in pending
            if self.started.process is None:
                self.launch()
        except OSError as exc:
            self._lose(f"host {self.host.name}: {exc}")
            return
        self.awaiting = self.started.output
        self.supervisor.loop.poller.register(self.awaiting)

    def _await(self) -> None:
        """A started agent: connect once it says where it listens."""
        assert self.started is not None and self.awaiting is not None
        lost: str | None = None
        try:
            address = self.started.poll()
            if address is None:
                return
        except OSError as exc:
            lost = f"host {self.host.name}: {exc}"
        self.supervisor.loop.poller.unregister(self.awaiting)
        self.awaiting = None
        if lost is not None:
            self._lose(lost)
            self.pending.clear()
            return
        assert address is not None
        self.host = dataclasses.replace(self.host, agent=address)
        self._connect()

    def _connect(self) -> None:
        context, poller = self.supervisor.context, self.supervisor.loop.poller
        self.socket, self.monitor = context.monitored_dealer(self.host.agent, self.agent_key,
                                                             refusals=True, contact=True)
        poller.register(self.socket)
        poller.register(self.monitor)
        self.contact_by = time.monotonic() + first_contact_s()

    def launch(self) -> None:
        """An ssh:// or slurm:// host: start its agent now, without waiting for it
        (the supervisor launches every host's before the first link enters). Raises
        OSError."""
        assert self.started is not None
        self.started.launch(self.supervisor.keys.public)

    def start(self, worker: str) -> RemoteProcess:
        """Ask the agent to start ``worker`` (the Launcher interface)."""
        plan = self.supervisor.plan
        tree = json.dumps(plan.tree(worker)) if worker in plan.groups else None
        return self._launch(proto.Launch(
            worker=worker, connect=self.supervisor.control_address,
            credentials=self.supervisor.credentials(worker).to_json(), tree=tree))

    def start_replica(self, key: str, *, connect: str, credentials: str,
                      spec: dict[str, Any], listeners: list[int]) -> RemoteProcess:
        """Ask the agent to start replica ``key`` (SERVICE.REPLICA.INCARNATION) of the
        service ``spec`` (its JSON form) on its listening sockets ``listeners``,
        joining the run's services socket at ``connect``."""
        return self._launch(proto.Launch(worker=key, connect=connect, credentials=credentials,
                                         service=json.dumps(spec), listeners=listeners))

    def _launch(self, launch: proto.Launch) -> RemoteProcess:
        process = self.processes[launch.worker] = RemoteProcess(self, launch.worker)
        if self.lost or (self.socket is None and self.awaiting is None):  # nothing to ask
            process.lost(self.lost or f"host {self.host.name}: no agent")
            return process
        self._send(launch)
        return process

    def close_listeners(self, service: str, positions: list[int]) -> None:
        """Ask the agent to close its listening sockets ``positions`` of ``service``."""
        if not self.lost:
            self._send(proto.Close(service=service, listeners=positions))

    def signal(self, worker: str, kind: str) -> None:
        self._send(proto.Signal(worker=worker, signal=kind))

    def recur(self, tyme: float) -> bool:
        if self.awaiting is not None:
            self._await()
        while self.monitor is not None and self.monitor.readable():
            event = self.monitor.event()
            if event == "connected":
                self.connected = True
            elif event == "reached":
                self.reached = True
            elif event == "retrying":
                self.retried = True
            elif event == "refused":
                self._lose(f"host {self.host.name}: its agent at {self.host.agent} refused "
                           "this supervisor's key (does it --trust supervisor.key?)")
            elif self.connected:
                self._lose(f"host {self.host.name} lost: its agent at {self.host.agent} went "
                           f"silent for {heartbeat_timeout_ms() / 1000:g} s")
        if not self.connected and self.monitor is not None:
            self._first_contact(time.monotonic())
        while self.pending and self.socket is not None and self._flush():
            pass
        while self.socket is not None and (frame := self.socket.take()) is not None:
            self._receive(frame)
        return False

    def _first_contact(self, now: float) -> None:
        """Lose the host's workers once its first contact is overdue (once)."""
        if self.reached and now >= self.contact_by + HANDSHAKE_S:
            self._lose(f"host {self.host.name}: something at {self.host.agent} took the "
                       f"connection but completed no CurveZMQ handshake within "
                       f"{HANDSHAKE_S:g} s (a stopped agent, or no agent at that address)")
        elif not self.reached and now >= self.contact_by:
            how = "refused the connection" if self.retried else \
                f"did not answer within {first_contact_s():g} s"
            self._lose(f"host {self.host.name}: no agent answers at {self.host.agent} "
                       f"({how}): is `hiocluster agent` running there, listening on that "
                       "address?")
        else:
            return
        self.contact_by = float("inf")

    def exit(self) -> None:
        if self.awaiting is not None:
            self.supervisor.loop.poller.unregister(self.awaiting)
            self.awaiting = None
        if self.socket is not None:
            poller = self.supervisor.loop.poller
            poller.unregister(self.socket)
            poller.unregister(self.monitor)
            self.socket = self.monitor = None
        if self.started is not None:
            self.started.stop(STARTED_STOP_S)

    def _receive(self, data: bytes) -> None:
        try:
            message = proto.decode(data, allowed=proto.FROM_AGENT)
        except FrameError as exc:
            self._lose(f"host {self.host.name}: its agent sent an invalid frame: {exc}")
            return
        process = self.processes.get(getattr(message, "worker", ""))
        if isinstance(message, proto.Launched) and process is not None:
            process.pid = message.pid
        elif isinstance(message, proto.Exited) and process is not None:
            process.ended(message.exitcode, message.tick)
            del self.processes[message.worker]  # its handle's holder has what it needs
        elif isinstance(message, proto.Output) and self.output is not None:
            self.output(message.worker, message.text)
        elif isinstance(message, proto.Output):
            for line in message.text.splitlines():
                print(f"[{self.host.name}/{message.worker}] {line}", file=sys.stderr,
                      flush=True)
        elif isinstance(message, proto.Error):
            self._lose(f"host {self.host.name}: its agent says {message.code}: "
                       f"{message.detail}")

    def _lose(self, why: str) -> None:
        self.lost = self.lost or why
        for process in self.processes.values():
            process.lost(why)

    def _send(self, message: proto.Message) -> None:
        """Send ``message`` now, or once connected; nothing once the link is gone."""
        if self.socket is None and self.awaiting is None:
            return
        self.pending.append(proto.encode(message))
        if self.socket is not None:
            self._flush()

    def _flush(self) -> bool:
        """Send the oldest pending frame; False if it has to wait (not connected yet)."""
        assert self.socket is not None
        try:
            if not self.socket.put(self.pending[0]):
                return False
        except TransportError as exc:
            self._lose(f"host {self.host.name}: cannot reach its agent at {self.host.agent}: "
                       f"{exc}")
            self.pending.clear()
            return False
        self.pending.pop(0)
        return True
