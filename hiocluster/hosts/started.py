"""Agents the supervisor starts itself, for a host it reaches through an engine
that starts processes (``ssh://`` hosts: OpenSSH's ``ssh``; ``slurm://`` hosts: a
Slurm job step), rather than one a person started by hand.

Whatever starts it, the agent runs as ``hiocluster agent --keys - --listen
tcp://HOST:0``: its key pair (made for this run) and the supervisor's public key
come as one JSON line on the engine's stdin, never on a command line or in a
file; it binds a free port on HOST and says which on its first stdout line. From
then on it is an agent like any other (CurveZMQ, heartbeats, OUTPUT frames for
its processes' output, which the supervisor prints prefixed). The supervisor
holds the engine's stdin for the whole run: when the run ends it closes it, and
when the engine's connection drops it ends, so the agent stops its processes and
exits either way. The remote side runs the same Python (``sys.executable``) in
the same app directory: the hosts share a layout, as with ``srun``.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

from hiocluster.runtime.transport import KeyPair

__all__ = ["StartedAgent", "START_S"]

#: Seconds for the engine to start the agent and the agent to say where it listens.
START_S = 30.0


class StartedAgent:
    """One host's agent, started for this run by an engine (see the module
    docstring); subclasses say how (:meth:`argv`), and in whose words
    (:attr:`label`, :attr:`hint`).

    Args:
        name: the host's name (the agent's ``--name``).
        listen: the address the agent binds there (a free port on it).
        app_dir: the app directory (``--app-dir``), the same there.
    """

    #: the engine, in failures: ``ssh me@h1``, ``srun on Slurm node n1``
    label = "the agent's engine"
    #: what to check when the engine ends before the agent starts
    hint = "can it run this Python and app directory there?"

    def __init__(self, name: str, listen: str, app_dir: str) -> None:
        self.name, self.listen, self.app_dir = name, listen, app_dir
        self.keys = KeyPair.generate()
        self.process: subprocess.Popen[bytes] | None = None
        self.began = 0.0
        self._line = b""   # the agent's first stdout line, as far as it came

    @property
    def toward(self) -> str:
        """A tcp address on the host (where the supervisor's own address facing it
        is looked up)."""
        return f"tcp://{self.listen}:9"

    def agent_argv(self) -> list[str]:
        """The agent's command line, run there."""
        return [sys.executable, "-m", "hiocluster", "agent", "--listen",
                f"tcp://{self.listen}:0", "--keys", "-", "--name", self.name,
                "--app-dir", self.app_dir]

    def argv(self) -> list[str]:
        """The engine's command line, which starts :meth:`agent_argv` there."""
        raise NotImplementedError

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start the engine (stdin and stdout piped). Raises OSError."""
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=None, start_new_session=True)

    def launch(self, supervisor_key: str) -> None:
        """Start the engine (which starts the agent) and give the agent its keys,
        without waiting: every host's agent starts at once. Raises OSError."""
        argv = self.argv()
        self.began, self._line = time.monotonic(), b""
        self.process = process = self.spawn(argv)
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(json.dumps({"public": self.keys.public,
                                            "secret": self.keys.secret,
                                            "trust": {"supervisor": supervisor_key}}
                                           ).encode() + b"\n")
            process.stdin.flush()
        except OSError:
            pass  # the engine is gone already: address() says so

    @property
    def output(self) -> int:
        """The engine's stdout: a file descriptor to wait on for :meth:`poll`."""
        assert self.process is not None and self.process.stdout is not None
        return self.process.stdout.fileno()

    def poll(self, timeout: float = START_S) -> str | None:
        """The address the launched agent listens at, once it said (None until
        then; never waits). Raises OSError naming what went wrong: a login refused,
        a step not started, no agent started, or none said within ``timeout``
        seconds of its launch."""
        process = self.process
        assert process is not None
        while not self._line.endswith(b"\n"):
            ready, _, _ = select.select([self.output], [], [], 0)
            if not ready:
                if time.monotonic() < self.began + timeout:
                    return None
                raise OSError(f"{self.label}: no agent said where it listens within "
                              f"{timeout:g} s")
            chunk = os.read(self.output, 1024)
            if not chunk:
                code = process.wait()
                raise OSError(f"{self.label} ended (exit code {code}) before an agent "
                              f"started there: {self.hint}")
            self._line += chunk
        text = self._line.decode(errors="replace").strip()
        address = text.rpartition(" listening on ")[2]
        if not address.startswith("tcp://"):
            raise OSError(f"{self.label}: the agent said {text!r}, not where it listens")
        return address

    def stop(self, grace: float) -> None:
        """End the run's hold on the agent (it stops its processes and exits); the
        engine gets ``grace`` seconds, then SIGTERM, then SIGKILL."""
        process = self.process
        if process is None:
            return
        if process.stdin is not None:
            try:
                process.stdin.close()
            except OSError:
                pass
        for step in (None, process.terminate, process.kill):
            if step is not None and process.poll() is None:
                step()
            try:
                process.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        if process.stdout is not None:
            process.stdout.close()
        self.process = None
