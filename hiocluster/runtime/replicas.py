"""Starting a replica process: its listening sockets and its environment.

A replica (``hiocluster replica``) serves on listening sockets it inherits from
whoever started it: the run itself on this host, or a host's agent for a
service placed there (``[services.NAME] hosts``). Both hold those sockets for
the run, so that connections queued on them outlive any one replica, and both
start the process the same way: :func:`spawn_replica`.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Mapping, Sequence

from hiocluster.runtime.launch import PARENT_ENV, LocalProcess, spawn
from hiocluster.runtime.transport import CREDENTIALS_ENV

__all__ = ["listening_socket", "spawn_replica", "SERVICE_ENV", "LISTEN_FDS_ENV",
           "CONTROL_ENV"]

#: The environment variable that carries the service's spec (JSON) to a replica.
SERVICE_ENV = "HIOCLUSTER_SERVICE"
#: The listening sockets a replica inherits: their descriptor numbers, "3,4".
LISTEN_FDS_ENV = "HIOCLUSTER_LISTEN_FDS"
#: Where shells find a run's control endpoint (``hiocluster status`` and friends).
CONTROL_ENV = "HIOCLUSTER_CONTROL"


def listening_socket(ha: tuple[str, int], *, backlog: int = 1024,
                     bufsize: int = 8096, alone: bool = False) -> socket.socket:
    """A non-blocking TCP socket listening on ``ha`` with SO_REUSEADDR and
    SO_REUSEPORT (so replicas, and a supervisor's sockets for them, share the
    address). ``alone``: first check that no other socket listens there (another
    run's, though it set SO_REUSEPORT too, would silently share our traffic).
    Raises OSError (EADDRINUSE when taken)."""
    if alone:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # without SO_REUSEPORT, bind fails while anyone listens on ha; with
            # SO_REUSEADDR, connections of a past run in TIME_WAIT do not count
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(ha)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            if sock.getsockopt(socket.SOL_SOCKET, option) < 2 * bufsize:
                sock.setsockopt(socket.SOL_SOCKET, option, bufsize)
        sock.setblocking(False)
        sock.bind(ha)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def spawn_replica(command: Sequence[str], *, connect: str, key: str, app_dir: str | None,
                  spec: Mapping[str, Any], credentials: str, fds: Sequence[int],
                  env: Mapping[str, str] | None = None) -> LocalProcess:
    """Start ``hiocluster replica`` (``command``: the program and leading arguments
    that run hiocluster) as replica ``key`` of the service ``spec`` (its JSON
    form), joining the run at ``connect`` with ``credentials`` (JSON), serving on
    the inherited listening sockets ``fds``; ``env`` is added to this process's
    environment. Its stdout and stderr are one non-blocking pipe (``output``).
    Raises OSError."""
    environment = dict(os.environ, **(env or {}))
    environment[LISTEN_FDS_ENV] = ",".join(map(str, fds))
    environment[CREDENTIALS_ENV] = credentials
    environment[SERVICE_ENV] = json.dumps(dict(spec))
    environment[PARENT_ENV] = str(os.getpid())
    environment["PYTHONUNBUFFERED"] = "1"
    argv = [*command, "replica", "--connect", connect, "--name", key]
    if app_dir:
        argv += ["--app-dir", app_dir]
    return spawn(argv, environment, pass_fds=fds, capture="output")
