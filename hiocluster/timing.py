"""Timing shared by more than one process kind, in one place (seconds). A module's
own timers (a poll's longest sleep, a check's period) stay beside the code they
pace; what two kinds of process must agree on is here.

Imports nothing: every layer may read it.
"""

__all__ = ["START_TIMEOUT", "STOP_TIMEOUT", "PROGRESS_S", "KILL_GRACE_S"]

#: Seconds a child (worker or group) gets to import, say HELLO and become READY;
#: also how long it waits for its supervisor to answer HELLO.
START_TIMEOUT = 60.0
#: Seconds children get to run exit contexts and say BYE before being terminated.
STOP_TIMEOUT = 10.0
#: How often a child running a window tells its supervisor how far it got.
PROGRESS_S = 0.1
#: Seconds a process gets after its BYE (or a SIGTERM) before the next step: SIGTERM,
#: then SIGKILL (workers, groups, replicas alike).
KILL_GRACE_S = 2.0
