"""Hosts reached over SSH (``[hosts.NAME] agent = "ssh://[USER@]HOST[:PORT]"``): the
supervisor starts the host's agent itself (hiocluster.hosts.started), with
OpenSSH's ``ssh`` and the user's own keys, config and known_hosts, as ``mpiexec``,
Dask's SSHCluster and Ray's cluster launcher do.

The agent listens on the address HOST resolves to there. ``$HIOCLUSTER_SSH_COMMAND``
replaces ``ssh`` (e.g. ``ssh -i KEY -o UserKnownHostsFile=FILE``), as
``$GIT_SSH_COMMAND`` does for git. ssh carries no environment: the run's settings
every process must share (``HIOCLUSTER_*``, e.g. HIOCLUSTER_HEARTBEAT_TIMEOUT_MS,
and PYTHONPATH) go on the remote command line, through ``env``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from typing import Sequence

from hiocluster.hosts.started import START_S, StartedAgent
from hiocluster.topology.spec import SshTarget

__all__ = ["SshAgent", "ssh_argv", "SSH_COMMAND_ENV"]

SSH_COMMAND_ENV = "HIOCLUSTER_SSH_COMMAND"
#: Variables the remote agent gets from the supervisor's environment besides
#: HIOCLUSTER_* ones.
FORWARDED = ("PYTHONPATH",)


def ssh_argv(target: SshTarget, remote: Sequence[str]) -> list[str]:
    """The ssh command line that runs ``remote`` on ``target`` (no terminal, never
    a password prompt)."""
    argv = [*shlex.split(os.environ.get(SSH_COMMAND_ENV) or "ssh"), "-T",
            "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(START_S * 2 / 3)}"]
    if target.port:
        argv += ["-p", str(target.port)]
    return [*argv, "--", target.destination, shlex.join(remote)]


class SshAgent(StartedAgent):
    """One host's agent, started over SSH for this run (see the module docstring)."""

    hint = ("can it log in without a password, and run this Python and app directory "
            "there?")

    def __init__(self, name: str, target: SshTarget, app_dir: str) -> None:
        super().__init__(name, target.host, app_dir)
        self.target = target
        self.label = f"ssh {target.destination}"

    @property
    def toward(self) -> str:
        return f"tcp://{self.target.host}:{self.target.port or 22}"

    def remote(self) -> list[str]:
        env = [f"{key}={value}" for key, value in sorted(os.environ.items())
               if (key.startswith("HIOCLUSTER_") and key != SSH_COMMAND_ENV)
               or key in FORWARDED]
        return ["env", *env, *self.agent_argv()]

    def argv(self) -> list[str]:
        return ssh_argv(self.target, self.remote())

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        try:
            return super().spawn(argv)
        except FileNotFoundError:
            raise OSError(f"{argv[0]} not found: an ssh:// host needs OpenSSH's ssh") \
                from None
