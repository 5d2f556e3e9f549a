"""One bounded wait for the tests: every wait is bounded by seconds, never by rounds."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable, TypeVar

import psutil

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition",
               interval: float = 0.02) -> T:
    """Call ``predicate`` until it returns something truthy; return that.

    Bounded by ``timeout`` seconds of wall-clock time (generous: the suite runs
    on loaded 2-core machines); raises AssertionError naming ``what`` on expiry.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


PF_EXITING = 0x4  # include/linux/sched.h: the task is in do_exit()


def exited(process: psutil.Process) -> bool:
    """True once ``process`` has ended: gone, a zombie, or inside the kernel's exit
    (PF_EXITING). Its program is over then; on a busy machine the kernel's last
    steps (closing its files) have been seen to take tens of seconds in disk sleep."""
    try:
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        with open(f"/proc/{process.pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()  # the name may hold spaces
        return bool(int(fields[6]) & PF_EXITING)   # state ppid pgrp session tty tpgid flags
    except (psutil.NoSuchProcess, OSError):
        return True


def describe(process: psutil.Process) -> str:
    """One line on a process a test did not expect to find: pid, state, where the
    kernel has it waiting, command line."""
    try:
        with open(f"/proc/{process.pid}/wchan") as wchan:
            waiting = wchan.read().strip() or "-"
    except OSError:
        waiting = "?"
    try:
        return f"{process.pid} [{process.status()}, wchan {waiting}] " \
            f"{' '.join(process.cmdline())[:120]}"
    except psutil.Error:
        return f"{process.pid} (gone or a zombie now)"


def until_checkpointed(argv: list[str], env: dict[str, str], ckpt: Path,
                       act: Callable[[], object], *, cwd: Path,
                       timeout: float = 120.0) -> tuple[int, str, str]:
    """Run ``argv`` (a run with ``--checkpoint ckpt``); once it has ticked (its first
    checkpoint is whole), ``act()``; then its exit code, stdout and stderr. Every
    wait is bounded (60 s for the checkpoint, ``timeout`` for the end)."""
    run = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: list(ckpt.glob("tick-*/manifest.json")), timeout=60,
                   what="a checkpoint")
        act()
        out, err = run.communicate(timeout=timeout)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    return run.returncode, out, err
