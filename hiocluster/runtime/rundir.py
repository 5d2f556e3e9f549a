"""Run directories: one per supervisor, group, service run or agent session, mode
0700, under ``$HIOCLUSTER_RUN_ROOT`` (default: the system temp directory), holding
the run's unix sockets and credentials. Each has a guardian, a shell that removes
it once the process that made it is gone, however it went (kill -9 included; an
agent's have none: it sweeps what a dead agent left when it starts); a
clean end removes it at once (:func:`remove_run_dir`, :func:`close_run`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from typing import Any

from hiocluster.runtime.transport import RUN_SOCKETS, TransportError, ipc_path

__all__ = ["RUN_ROOT_ENV", "run_root", "make_run_dir", "remove_run_dir", "close_run",
           "remove_orphan_files"]

#: Where run directories go (default: the system temp directory).
RUN_ROOT_ENV = "HIOCLUSTER_RUN_ROOT"
#: How long a released guardian gets to remove its directory and exit.
GUARDIAN_WAIT_S = 2.0
#: Guardians started for one directory when each is killed by a signal at birth.
GUARDIAN_TRIES = 3


def run_root() -> str:
    """``$HIOCLUSTER_RUN_ROOT`` if set, else the system temp directory."""
    return os.environ.get(RUN_ROOT_ENV) or tempfile.gettempdir()


#: The guardian of a run directory: a shell that makes the directory, says its path,
#: and removes it once its stdin reaches end of file, that is once the process that
#: started it is gone, however it went (kill -9 included). It runs in its own session,
#: deaf to the signals of a terminal or a process group.
_GUARDIAN = ('trap "" HUP INT TERM PIPE; d=$(mktemp -d "$0/$1XXXXXXXX") || exit 1; '
             'echo "$d"; read _; rm -rf -- "$d"')
_guardians: dict[str, subprocess.Popen] = {}


def make_run_dir(prefix: str = "hioc-", *, guarded: bool = True) -> str:
    """A new run directory (mode 0700, named ``prefix`` + 8 random characters) under
    :func:`run_root`, removed by :func:`remove_run_dir` or, should this process die
    first, by its guardian. ``guarded`` False: no guardian (an agent, whose
    children must be its workers alone, sweeps what a dead agent left when it
    starts). Raises TransportError."""
    root = run_root()
    if not guarded:
        try:
            path = tempfile.mkdtemp(prefix=prefix, dir=root)
            os.chmod(path, 0o700)
        except OSError as exc:
            raise TransportError(f"cannot make the run directory under {root}: {exc}") from exc
        return path
    for _ in range(GUARDIAN_TRIES):
        guardian, path, error = _start_guardian(root, prefix)
        if path or guardian.returncode is None or guardian.returncode >= 0:
            break
        # killed by a signal before it could trap any: one meant for this process's
        # group, caught between its fork and its own session (a Ctrl-C at that very
        # moment); this process has its own handlers for it: try again
    if not path:
        try:  # the same attempt here, for the error as an OSError (its errno names the cause)
            shutil.rmtree(tempfile.mkdtemp(prefix=prefix, dir=root), ignore_errors=True)
        except OSError as exc:
            raise TransportError(f"cannot make the run directory under {root}: {exc}") from exc
        raise TransportError(f"cannot make the run directory under {root}: "
                             f"{error or _ended(guardian.returncode)}")
    assert guardian.stderr is not None
    guardian.stderr.close()
    path = os.path.abspath(path)
    _guardians[path] = guardian
    return path


def _start_guardian(root: str, prefix: str) -> tuple[subprocess.Popen, str, str]:
    """Start a guardian; return it with the path it made ("" if none) and, if none,
    what it said on stderr (it is then reaped). Raises TransportError."""
    try:
        guardian = subprocess.Popen(["/bin/sh", "-c", _GUARDIAN, root, prefix],
                                    stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    close_fds=True, start_new_session=True)
    except OSError as exc:
        raise TransportError(f"cannot make the run directory under {root}: {exc}") from exc
    assert guardian.stdout is not None and guardian.stderr is not None
    with guardian.stdout:
        path = guardian.stdout.readline().decode(errors="replace").rstrip("\n")
    if path:
        return guardian, path, ""
    with guardian.stderr:
        error = guardian.stderr.read().decode(errors="replace").strip()
    _release(guardian)
    return guardian, "", error


def _ended(code: int | None) -> str:
    return f"its guardian shell ended ({'signal ' + str(-code) if code and code < 0 else code})"


def remove_run_dir(path: str) -> None:
    """Remove a run directory made by :func:`make_run_dir`, and let its guardian go."""
    shutil.rmtree(path, ignore_errors=True)
    guardian = _guardians.pop(path, None)
    if guardian is not None:
        _release(guardian)


def _release(guardian: subprocess.Popen) -> None:
    """End of file to a guardian, and wait for it (it exits at once)."""
    assert guardian.stdin is not None
    guardian.stdin.close()
    try:
        guardian.wait(GUARDIAN_WAIT_S)
    except subprocess.TimeoutExpired:  # pragma: no cover - a shell that hangs
        guardian.kill()
        guardian.wait()


def close_run(owner: Any) -> None:
    """The end of a run's root: close ``owner.context`` (every socket) and remove
    ``owner.run_dir``."""
    if owner.context is not None:
        owner.context.close(linger=0)
        owner.context = None
    if owner.run_dir is not None:
        remove_run_dir(owner.run_dir)
        owner.run_dir = None


def remove_orphan_files(run_dir: str | None, connect: str, *own: str | None) -> None:
    """An orphan's clean-up (a worker, group or replica whose starter is gone): its
    own files (``own``: its data socket, its tick register) and, in the run
    directory its starter made (``run_dir``), the starter's sockets and
    credentials; whoever comes last removes the directory. ``connect``: the
    starter's control address (its socket file, over ipc)."""
    paths = list(own)
    if run_dir:
        paths.append(ipc_path(connect))
        paths += [os.path.join(run_dir, name) for name in RUN_SOCKETS]
        with contextlib.suppress(OSError):
            paths += [os.path.join(run_dir, name) for name in os.listdir(run_dir)
                      if name.endswith(".credentials")]
    for path in paths:
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)
    if run_dir:
        with contextlib.suppress(OSError):
            os.rmdir(run_dir)
