"""Hosts reached over SSH (``[hosts.NAME] agent = "ssh://[USER@]HOST[:PORT]"``): the
supervisor starts the host's agent itself, with OpenSSH's ``ssh`` and the user's
own keys, config and known_hosts, as ``mpiexec``, Dask's SSHCluster and Ray's
cluster launcher do.

The agent runs as ``hiocluster agent --keys - --listen tcp://HOST:0``: its key pair
(made for this run) and the supervisor's public key come as one JSON line on
ssh's stdin, never on a command line or in a file; it binds a free port on the
address HOST resolves to there, and says which on its first stdout line. From
then on it is an agent like any other (CurveZMQ, heartbeats, OUTPUT frames for
its workers' stderr, which the supervisor prints prefixed). The supervisor
holds ssh's stdin for the whole run: when the run ends it closes it, and when
the SSH connection drops it ends, so the agent stops its workers and exits
either way. ``$HIOCLUSTER_SSH_COMMAND`` replaces ``ssh`` (e.g. ``ssh -i KEY -o
UserKnownHostsFile=FILE``), as ``$GIT_SSH_COMMAND`` does for git. The remote
side runs the same Python (``sys.executable``) in the same app directory: the
hosts share a layout, as with ``srun``.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import subprocess
import sys
import time
from typing import Sequence

from hiocluster.runtime.transport import KeyPair
from hiocluster.topology.spec import SshTarget

__all__ = ["SshAgent", "ssh_argv", "SSH_COMMAND_ENV", "START_S"]

SSH_COMMAND_ENV = "HIOCLUSTER_SSH_COMMAND"
#: Seconds for ssh to log in and the agent to say where it listens.
START_S = 30.0
#: Variables the remote agent gets from the supervisor's environment (the run's
#: settings every process must share, e.g. HIOCLUSTER_HEARTBEAT_TIMEOUT_MS).
FORWARDED = ("PYTHONPATH",)


def ssh_argv(target: SshTarget, remote: Sequence[str]) -> list[str]:
    """The ssh command line that runs ``remote`` on ``target`` (no terminal, never
    a password prompt)."""
    argv = [*shlex.split(os.environ.get(SSH_COMMAND_ENV) or "ssh"), "-T",
            "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(START_S * 2 / 3)}"]
    if target.port:
        argv += ["-p", str(target.port)]
    return [*argv, "--", target.destination, shlex.join(remote)]


class SshAgent:
    """One host's agent, started over SSH for this run (see the module docstring)."""

    def __init__(self, name: str, target: SshTarget, app_dir: str) -> None:
        self.name, self.target, self.app_dir = name, target, app_dir
        self.keys = KeyPair.generate()
        self.process: subprocess.Popen[bytes] | None = None
        self.began = 0.0

    def remote(self) -> list[str]:
        env = [f"{key}={value}" for key, value in sorted(os.environ.items())
               if (key.startswith("HIOCLUSTER_") and key != SSH_COMMAND_ENV)
               or key in FORWARDED]
        return ["env", *env, sys.executable, "-m", "hiocluster", "agent", "--listen",
                f"tcp://{self.target.host}:0", "--keys", "-", "--name", self.name,
                "--app-dir", self.app_dir]

    def launch(self, supervisor_key: str) -> None:
        """Start ssh (which logs in and starts the agent) and give the agent its keys,
        without waiting: every host's agent starts at once. Raises OSError."""
        argv = ssh_argv(self.target, self.remote())
        self.began = time.monotonic()
        try:
            self.process = process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
                start_new_session=True)
        except FileNotFoundError:
            raise OSError(f"{argv[0]} not found: an ssh:// host needs OpenSSH's ssh") \
                from None
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(json.dumps({"public": self.keys.public,
                                            "secret": self.keys.secret,
                                            "trust": {"supervisor": supervisor_key}}
                                           ).encode() + b"\n")
            process.stdin.flush()
        except OSError:
            pass  # ssh already gone: address() says so

    def address(self, timeout: float = START_S) -> str:
        """The address the launched agent listens at, once it says (within ``timeout``
        seconds of its launch). Raises OSError naming what went wrong (a login
        refused, no agent started)."""
        process = self.process
        assert process is not None and process.stdout is not None
        line, deadline = b"", self.began + timeout
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([process.stdout], [], [], max(left, 0))
            if not ready:
                raise OSError(f"ssh {self.target.destination}: no agent said where it "
                              f"listens within {timeout:g} s")
            chunk = os.read(process.stdout.fileno(), 1024)
            if not chunk:
                code = process.wait()
                raise OSError(f"ssh {self.target.destination} ended (exit code {code}) "
                              "before an agent started there: can it log in without a "
                              "password, and run this Python and app directory there?")
            line += chunk
        text = line.decode(errors="replace").strip()
        address = text.rpartition(" listening on ")[2]
        if not address.startswith("tcp://"):
            raise OSError(f"ssh {self.target.destination}: the agent said {text!r}, not "
                          "where it listens")
        return address

    def stop(self, grace: float) -> None:
        """End the run's hold on the agent (it stops its workers and exits); ssh
        gets ``grace`` seconds, then SIGTERM, then SIGKILL."""
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
