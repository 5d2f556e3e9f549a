"""A group process: a sub-supervisor, as hio doers (``hiocluster group``).

A :class:`Group` is a :class:`~hiocluster.supervision.supervisor.SupervisorShell` like the
root: a switchboard on its own control socket (ipc, in its own run directory)
and a doer per child, which it starts as ``hiocluster worker`` (or ``hiocluster
group``, for a group inside it). One more doer, :class:`ParentLink`, is its
connection to its own supervisor: frames from there go to the
:class:`~hiocluster.supervision.groupcore.GroupCore`, and what the core has to say goes
back. The workers under it send DATA to each other directly, wherever they
run; they bind their data sockets where the group was told to (``--bind``: an
agent's advertised address), else beside their control socket.

If the process that started it is no longer its parent, or its supervisor's
connection stays down for ``orphan_grace()`` (or never comes up), it stops its
children and exits with code 3, removing what its vanished
supervisor cannot, like an orphaned worker. Its run directory is a sibling of
its supervisor's (ipc paths do not grow with depth), kept by a guardian
(runtime.rundir.make_run_dir): if the group itself is killed, the directory goes too.
SIGTERM or SIGINT stop its children cleanly and tell its supervisor.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from hio.base.doing import Doer

from hiocluster.runtime.launch import LocalLauncher, TickRegister
from hiocluster.runtime.loop import Loop
from hiocluster.runtime.rundir import make_run_dir, remove_orphan_files, remove_run_dir
from hiocluster.runtime.signals import Signals
from hiocluster.runtime.transport import (
    Context,
    Credentials,
    KeyPair,
    Socket,
    TransportError,
    local_address,
)
from hiocluster.runtime.watchdog import OrphanRule, parent_gone
from hiocluster.supervision.groupcore import GroupCore
from hiocluster.supervision.supervisor import SupervisorShell
from hiocluster.timing import START_TIMEOUT
from hiocluster.topology.tree import check_tree
from hiocluster.worker.process import default_bind

__all__ = ["GroupOptions", "Group", "ParentLink", "run_group"]


@dataclass(frozen=True)
class GroupOptions:
    """How to join a run as a group (the ``hiocluster group`` command line)."""

    connect: str                      # its supervisor's control address
    name: str                         # the group's name in the plan
    tree: dict[str, Any]              # its children (see topology.tree.check_tree)
    credentials: Credentials          # the run's token; CURVE keys over tcp
    bind: str | None = None           # where the workers under it bind for DATA
    data: str = "zmq"                 # how they send it: "zmq", or "local" (unix://)
    app_dir: str | None = None
    run_dir: str | None = None        # its supervisor's; its own goes inside it
    tick_file: str | None = None      # a TickRegister its supervisor reads
    parent: int | None = None         # the pid of the process that started it, if one did


class ParentLink(Doer):
    """The group's control connection to its own supervisor, as a doer."""

    def __init__(self, group: Group, **kwa: Any) -> None:
        super().__init__(**kwa)
        self.group = group
        self.dealer: Socket | None = None
        self.monitor: Socket | None = None
        self.rule = OrphanRule(START_TIMEOUT, group.options.parent, time.monotonic())

    def enter(self) -> None:
        group, options = self.group, self.group.options
        assert group.context is not None
        self.dealer, self.monitor = group.context.monitored_dealer(
            options.connect, options.credentials.server)
        group.loop.poller.register(self.dealer)
        group.loop.poller.register(self.monitor)

    def recur(self, tyme: float) -> bool:
        core, now = self.group.core, time.monotonic()
        dealer, monitor = self.dealer, self.monitor
        assert dealer is not None and monitor is not None
        while monitor.readable():
            self.rule.seen(monitor.event(), now)
        if not core.orphaned and self.rule.gone(now):
            core.lost_parent(now)
        for _ in range(1000):
            frame = dealer.take()
            if frame is None:
                break
            core.from_parent(frame, now)
        return False

    def flush(self) -> None:
        """Send what the core has for the supervisor (what cannot go now stays, for
        the next cycle: the orphan rule ends a wait for a supervisor that is gone)."""
        assert self.dealer is not None
        up, sent = self.group.core.up, 0
        while sent < len(up) and self.dealer.put(up[sent]):
            sent += 1
        del up[:sent]

    def exit(self) -> None:
        for sock in (self.dealer, self.monitor):
            if sock is not None:
                self.group.loop.poller.unregister(sock)


class Group(SupervisorShell):
    """One group's process (see the module docstring)."""

    def __init__(self, options: GroupOptions, loop: Loop, **kwa: Any) -> None:
        self.options = options
        self.parent_link = ParentLink(self)
        super().__init__(loop, list(options.tree), extra=[self.parent_link], **kwa)
        self.run_dir: str | None = None
        self.register: TickRegister | None = None
        self.launcher: LocalLauncher | None = None
        self.interrupts: list[int] = []   # stop signals taken, for the next cycle
        self.parent = os.getppid()        # who started it: once gone, its files are ours

    def recur(self, tyme: float, deeds: Any = None) -> bool:  # type: ignore[override]
        while self.interrupts:
            self.core.interrupt(self.interrupts.pop(0), time.monotonic())
        return super().recur(tyme, deeds)

    def awaiting_dones(self) -> bool:
        return not self.core.up and super().awaiting_dones()

    def _after(self, now: float) -> None:
        self.parent_link.flush()
        if self.register is not None and self.core.ticking:
            self.register.store(self.core.progress)

    def launcher_for(self, worker: str) -> LocalLauncher:
        if self.launcher is None:
            options = self.options
            bind = options.bind
            if bind is None and options.connect.startswith("tcp://"):
                bind = default_bind(options.connect, self.options.name)
            assert self.run_dir is not None
            self.launcher = LocalLauncher(
                self.control_address, self.credentials, self.run_dir, app_dir=options.app_dir,
                bind=bind, trees={name: sub for name, sub in options.tree.items()
                                  if isinstance(sub, dict)}, data=options.data)
        return self.launcher

    def credentials(self, child: str) -> Credentials:
        """A child's: the run's token, its own key pair (and, for a group, those under
        it) from this group's credentials."""
        mine = self.options.credentials
        pair = mine.under.get(child)
        sub = self.options.tree[child]
        under: dict[str, KeyPair] = {}
        if pair is not None and isinstance(sub, dict):
            under = {name: mine.under[name] for name in _names_below(sub)
                     if name in mine.under}
        server = mine.keys.public if mine.keys is not None else None
        return Credentials(mine.token, pair, server, under)

    @property
    def exit_code(self) -> int:
        return self.core.exit_code if self.core is not None else 1

    # -- helpers --------------------------------------------------------------------
    def _open(self) -> None:
        options = self.options
        if options.tick_file:
            try:
                self.register = TickRegister(options.tick_file)
            except OSError as exc:
                raise TransportError(f"cannot open its tick register: {exc}") from exc
        # beside its supervisor's, not inside: ipc paths stay short at any depth
        self.run_dir = make_run_dir()
        self.listen = local_address("ipc", self.run_dir, "control")
        self.context = Context(options.credentials.keys, owner=f"group {options.name}")
        if self.context.gate is not None:
            self.context.gate.open()  # its own socket is ipc: no CURVE handshakes
        self.core = GroupCore(options.name, options.tree, now=time.monotonic(),
                              token=options.credentials.token, pid=os.getpid())

    def _close(self) -> None:
        if self.register is not None:
            self.register.close()
        orphaned = self.core is not None and self.core.orphaned
        if self.context is not None:
            self.context.close(linger=0 if orphaned else None)
            self.context = None
        if self.run_dir is not None:
            remove_run_dir(self.run_dir)
            self.run_dir = None
        if orphaned or os.getppid() != self.parent:  # the files its starter cannot remove
            remove_orphan_files(self.options.run_dir, self.options.connect,
                                self.options.tick_file)


def _names_below(tree: dict[str, Any]) -> list[str]:
    return [name for child, sub in tree.items()
            for name in (child, *(_names_below(sub) if isinstance(sub, dict) else ()))]


def load_tree(path: str) -> dict[str, Any]:
    """A group's tree from its file; raises ValueError naming what is wrong."""
    try:
        with open(path) as file:
            return check_tree(json.load(file))
    except (OSError, RecursionError) as exc:
        raise ValueError(f"cannot read the tree {path}: {exc}") from None


def run_group(options: GroupOptions) -> int:
    """Run a group in this process; return its exit code."""
    loop = Loop()
    group = Group(options, loop)
    loop.doers = [group]

    try:
        with Signals().watch(loop, group.interrupts.append):
            loop.run()
    except TransportError as exc:
        orphaned = parent_gone(options.parent)  # e.g. its files went with its supervisor
        if orphaned:
            remove_orphan_files(options.run_dir, options.connect, options.tick_file)
        print(f"hiocluster group {options.name}: "
              f"{'orphaned: its supervisor is gone' if orphaned else exc}", file=sys.stderr,
              flush=True)
        return 3 if orphaned else 1
    failure = group.core.failure if group.core is not None else None
    if failure is not None and not group.core.told:  # else its supervisor says it
        print(f"hiocluster group {options.name}: {failure}", file=sys.stderr, flush=True)
    return group.exit_code
