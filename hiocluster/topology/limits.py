"""The topology format's names and bounds: what a name may look like, how big
a file may make things, the ``[run]`` settings and their defaults."""

from __future__ import annotations

import re

NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
BOX_NAME = NODE_NAME
WORKER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
CLASS_PATH = re.compile(f"{_DOTTED}:{_DOTTED}")
GLOB_PATTERN = re.compile(r"[A-Za-z0-9_*?\[\]!-]+")
MAX_COUNT = 100_000
SEED_LIMIT = 2**63
#: Deepest nesting of ``[groups]``: a group inside a group ... this many deep (a
#: process per level; the bound keeps hostile trees from exhausting recursion).
MAX_GROUP_DEPTH = 64
#: Most replicas one service may have (in the file, and through ``hiocluster scale``).
MAX_REPLICAS = 256
#: Restart strategies of a service, as Erlang/OTP names them.
RESTART_POLICIES = ("one_for_one", "one_for_all")
#: Line formats of a service's access log (``access_log_format``).
ACCESS_LOG_FORMATS = ("common", "json")

#: Most ticks between a message's take and its credit at the source that ``[run]
#: credit_lag = "auto"`` (the default) picks: with more, a worker waits less often on
#: the neighbours it only sends to; links need about 2 x lag capacity to flow freely.
AUTO_CREDIT_LAG = 8

RUN_DEFAULTS: dict[str, int | float | bool | str] = {
    "ticks": 100, "tock": 1.0, "t0": 0.0, "seed": 0, "tick_timeout": 30.0, "capacity": 1024,
    "real": False, "digest_every": 1, "credit_lag": "auto", "transport": "ipc",
    "checkpoint_every": 0, "restart": "none", "max_restarts": 3, "within": 60.0,
    "metrics": "", "observe_every": 1,
}
#: What a lockstep run does when a worker dies, hangs or loses its host (``[run]
#: restart``): fail, or roll every worker back to the last checkpoint and go on.
RUN_RESTARTS = ("none", "checkpoint")
#: The most ``[run] max_restarts`` may say.
MAX_RUN_RESTARTS = 1000
#: How the workers of one host talk (``[run] transport``, ``--transport``): ZeroMQ over
#: unix sockets or TCP on loopback, or ``local``: ZeroMQ for control and Unix-domain
#: SEQPACKET sockets for DATA (hiocluster.worker.localnet; one host, no CurveZMQ).
RUN_TRANSPORTS = ("ipc", "tcp", "local")
