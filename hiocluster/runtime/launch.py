"""Starting and stopping worker processes: a small interface, and the local one.

A supervisor only needs, per worker: start it, know whether it still runs and
how it ended, and signal it. :class:`Launcher` and :class:`ProcessHandle` say
that; :class:`LocalLauncher` starts ``hiocluster worker`` as a child process on
this host. (A remote launcher, asking an agent on another host, implements the
same two protocols.)

A local worker runs in its own session, so a signal to the supervisor's process
group (Ctrl-C, ``kill -- -PGID``, systemd) reaches the supervisor only, which
then stops every worker cleanly. It gets its credentials (the run's token and,
over tcp, its CURVE keys) in its environment (``HIOCLUSTER_CREDENTIALS``),
never on its command line.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

from hiocluster.runtime.transport import CREDENTIALS_ENV, Credentials

__all__ = ["ProcessHandle", "Launcher", "LocalProcess", "LocalLauncher", "TickRegister",
           "end_process", "spawn", "worker_argv",
           "PARENT_ENV", "parent_from_env"]

#: The pid of the process that started a worker or group (its parent while that
#: lives): once its parent is another, it is an orphan (docs/protocol.md §9).
PARENT_ENV = "HIOCLUSTER_PARENT"


def parent_from_env() -> int | None:
    """The pid in ``$HIOCLUSTER_PARENT`` (None: started by hand)."""
    text = os.environ.get(PARENT_ENV, "")
    return int(text) if text.isdigit() else None


class ProcessHandle(Protocol):
    """One started worker process."""

    pid: int | None
    #: a file descriptor that becomes readable when the process ends (None: poll)
    sentinel: int | None

    def exitcode(self) -> int | None:
        """How it ended (negative: killed by that signal), or None while it runs."""

    def last_tick(self) -> int | None:
        """The tick it was working on (running, or waiting for its inputs), if it can
        tell: a worker that dies without a word is placed by it."""

    def why(self) -> str | None:
        """How it ended, in words, where the exit code cannot say (a lost host)."""

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM): it runs its exit contexts."""

    def kill(self) -> None:
        """Stop it now (SIGKILL)."""

    def lost(self, why: str) -> None:
        """Nothing more will be heard of it (SIGKILL was asked for long ago): count it
        as gone, for ``why``."""

    def close(self) -> None:
        """Release what the handle holds (after the process ended)."""


class Launcher(Protocol):
    """Starts worker processes for one run."""

    def start(self, worker: str) -> ProcessHandle:
        """Start worker ``worker``; it connects to the run's control address itself."""


def worker_argv(connect: str, worker: str, *, app_dir: str | None = None,
                run_dir: str | None = None, tick_file: str | None = None,
                bind: str | None = None, tree_file: str | None = None,
                data: str = "zmq") -> list[str]:
    """The ``hiocluster worker`` arguments that join ``worker`` to a run; with
    ``tree_file``, the ``hiocluster group`` arguments of a sub-supervisor;
    ``data``: "local" for the local data plane (``--data local``)."""
    argv = ["group", "--tree", tree_file] if tree_file else ["worker"]
    argv += ["--connect", connect, "--name", worker]
    if bind:
        argv += ["--bind", bind]
    if data != "zmq":
        argv += ["--data", data]
    if app_dir:
        argv += ["--app-dir", app_dir]
    if run_dir:
        argv += ["--run-dir", run_dir]
    if tick_file:
        argv += ["--tick-file", tick_file]
    return argv


class TickRegister:
    """Eight bytes in a file, shared by a worker and its supervisor: the tick the
    worker is working on. The worker stores it every tick (no message, no syscall);
    the supervisor reads it when the worker dies. -1: not ticking yet."""

    SIZE = 8

    def __init__(self, path: str, *, create: bool = False) -> None:
        self.path = path
        if create:
            with open(path, "wb") as file:
                file.write(struct.pack("<q", -1))
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, self.SIZE)

    def store(self, tick: int) -> None:
        struct.pack_into("<q", self._map, 0, tick)

    def load(self) -> int:
        return struct.unpack_from("<q", self._map, 0)[0]

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


class LocalProcess:
    """A worker started as a child process of this one (see :class:`ProcessHandle`)."""

    def __init__(self, popen: subprocess.Popen, register: TickRegister | None) -> None:
        self.popen = popen
        self.register = register
        self.pid: int | None = popen.pid
        try:
            self.sentinel: int | None = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: the supervisor polls
            self.sentinel = None

    @property
    def output(self) -> int | None:
        """The pipe its output comes through (non-blocking), where it is captured
        (its stderr, or its stdout and stderr as one)."""
        pipe = self.popen.stdout or self.popen.stderr
        return pipe.fileno() if pipe is not None else None

    def exitcode(self) -> int | None:
        return self.popen.poll()

    def why(self) -> str | None:
        return None

    def last_tick(self) -> int | None:
        tick = self.register.load() if self.register is not None else -1
        return tick if tick >= 0 else None

    def _signal(self, signum: int) -> None:
        if self.popen.poll() is None:  # Popen never signals a reaped pid
            try:
                self.popen.send_signal(signum)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def lost(self, why: str) -> None:
        """A local SIGKILL always lands: its exit code will come."""

    def close(self) -> None:
        if self.sentinel is not None:
            os.close(self.sentinel)
            self.sentinel = None
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()
        if self.register is not None:
            self.register.close()


def spawn(argv: Sequence[str], env: Mapping[str, str], *, pass_fds: Sequence[int] = (),
          capture: str | None = None, register: TickRegister | None = None) -> LocalProcess:
    """Start a child process the way every hiocluster child starts (workers, groups,
    replicas): no stdin, no descriptor but ``pass_fds``, a session of its own (a
    terminal's signals reach the run's root only, which stops it in order).

    ``capture``: None, it writes where we do; ``"stderr"``, its stderr is a pipe;
    ``"output"``, its stdout and stderr are one pipe. The pipe is non-blocking.
    Raises OSError (no such program, no memory, too many processes).
    """
    popen = subprocess.Popen(list(argv), env=dict(env), stdin=subprocess.DEVNULL,
                             close_fds=True, pass_fds=tuple(pass_fds),
                             start_new_session=True,
                             stdout=subprocess.PIPE if capture == "output" else None,
                             stderr=subprocess.STDOUT if capture == "output"
                             else subprocess.PIPE if capture == "stderr" else None)
    pipe = popen.stdout if capture == "output" else popen.stderr
    if pipe is not None:
        os.set_blocking(pipe.fileno(), False)
    return LocalProcess(popen, register)


def end_process(handle: ProcessHandle, grace: float) -> None:
    """Make sure ``handle``'s process is gone: SIGTERM, up to ``grace`` seconds,
    SIGKILL, up to ``grace`` seconds (a forced exit, not the normal path)."""
    for step in (handle.terminate, handle.kill):
        if handle.exitcode() is None:
            step()
            deadline = time.monotonic() + grace
            while handle.exitcode() is None and time.monotonic() < deadline:
                time.sleep(0.01)


class LocalLauncher:
    """Start workers as child processes running ``hiocluster worker``.

    Args:
        connect: the supervisor's control address.
        credentials: each worker's credentials, passed in its environment.
        run_dir: the run directory (tick registers go there; orphans clean it).
        app_dir, bind, data: passed on (see ``hiocluster worker --help``).
        capture: give each worker's stderr to the caller (``LocalProcess.output``)
            instead of sharing this process's.
        trees: the groups among the children: name -> its tree (see
            hiocluster.topology.tree); they run ``hiocluster group``.
        env: set in each child's environment (besides this process's own).
        command: the program and leading arguments (default: this Python running
            ``-m hiocluster``); tests substitute misbehaving workers here.
    """

    def __init__(self, connect: str, credentials: Callable[[str], Credentials], run_dir: str,
                 *, app_dir: str | None = None, command: Sequence[str] | None = None,
                 bind: str | None = None, capture: bool = False,
                 trees: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, data: str = "zmq") -> None:
        self.connect, self.credentials, self.data = connect, credentials, data
        self.env = dict(env or {})
        self.trees = dict(trees or {})
        self.app_dir, self.run_dir, self.bind, self.capture = app_dir, run_dir, bind, capture
        self.command = list(command or [sys.executable, "-m", "hiocluster"])

    def start(self, worker: str) -> LocalProcess:
        env = dict(os.environ, **self.env)
        env[CREDENTIALS_ENV] = self.credentials(worker).to_json()
        env[PARENT_ENV] = str(os.getpid())
        register = TickRegister(os.path.join(self.run_dir, f"t-{worker}"), create=True)
        tree_file = None
        if worker in self.trees:
            tree_file = os.path.join(self.run_dir, f"tree-{worker}.json")
            with open(tree_file, "w") as file:
                json.dump(self.trees[worker], file)
        argv = self.command + worker_argv(self.connect, worker, app_dir=self.app_dir,
                                          run_dir=self.run_dir, tick_file=register.path,
                                          bind=self.bind, tree_file=tree_file,
                                          data=self.data)
        return spawn(argv, env, capture="stderr" if self.capture else None,
                     register=register)
