"""What a run needs of the machine: open files up front, and naming what ran out
(open files, disk space, a writable run root, memory) when something did."""

from __future__ import annotations

import os

from hiocluster.errors import Exhausted

#: Open files a run holds besides its children's, and per child process (measured:
#: a ring of 8 workers needs 47; the margin is for services' sockets and pipes).
FILES_BASE, FILES_PER_PROCESS = 24, 6


def enough_files(processes: int) -> None:
    """Make sure ``processes`` children fit in RLIMIT_NOFILE: raise the soft limit
    (up to the hard one) if need be, else Exhausted naming it. Checked up front:
    libzmq aborts the whole process when it runs out of descriptors in its own
    thread, and an abort cleans nothing up."""
    import resource

    need = FILES_BASE + FILES_PER_PROCESS * processes
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard == resource.RLIM_INFINITY or hard >= need:
        wanted = 2 * need if hard == resource.RLIM_INFINITY else min(hard, 2 * need)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return
    raise Exhausted(f"too many open files (RLIMIT_NOFILE {soft}): {processes} processes "
                    f"need about {need}; raise the limit (ulimit -n {need})")


def exhausted(exc: BaseException) -> str | None:
    """What ran out, if ``exc`` (or what caused it) says a resource did: e.g. "no
    space left on device (PATH)", "too many open files (RLIMIT_NOFILE 32)"."""
    import errno
    import resource
    import tempfile

    seen: BaseException | None = exc
    while seen is not None:
        code = getattr(seen, "errno", None)
        if code in (errno.EMFILE, errno.ENFILE):
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            return "too many open files in the system (fs.file-max)" \
                if code == errno.ENFILE else f"too many open files (RLIMIT_NOFILE {soft})"
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            path = getattr(seen, "filename", None) or \
                f"{os.environ.get('HIOCLUSTER_RUN_ROOT') or tempfile.gettempdir()}, the run root"
            what = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota "
                    "exceeded", errno.EROFS: "read-only file system"}[code]
            return f"{what} ({path})"
        if code == errno.ENOMEM:
            return "out of memory"
        seen = seen.__cause__ or seen.__context__
    return None
