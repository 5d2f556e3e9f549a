"""The shell side of a run's control endpoint: ``hiocluster status|scale|restart|stop``.

Finds the run (``--control ADDRESS``, else ``$HIOCLUSTER_CONTROL``, else the one
run of this user under the run root that answers), sends one COMMAND, reads
the ANSWER (docs/protocol.md §12), and for ``scale``, ``restart`` and ``stop``
waits until the run got there. Exit codes as supervisorctl's: 0 ok, 3 some
replica is not serving (status) or the run did not get there in time, 4 the
run cannot be reached, 2 usage, 1 the run refused (e.g. no such service).

Imports: protocol, transport, the stdlib.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import time
from typing import Any

from . import protocol as proto
from .errors import ClusterError, FrameError
from .transport import ENDPOINT_RECORD, KeyPair, TransportError, request

__all__ = ["Unreachable", "find_endpoint", "ask", "format_status", "control_main",
           "EXIT_NOT_RUNNING", "EXIT_UNREACHABLE"]

EXIT_OK, EXIT_REFUSED, EXIT_NOT_RUNNING, EXIT_UNREACHABLE = 0, 1, 3, 4
#: Seconds to wait for an answer.
ANSWER_TIMEOUT_S = 5.0


class Unreachable(ClusterError):
    """No run answers at the control endpoint (or none was found)."""


def find_endpoint(given: str | None = None) -> str:
    """The control address: ``given``, ``$HIOCLUSTER_CONTROL``, or the only run
    under the run root that answers. Raises Unreachable saying what was tried."""
    if given:
        return given
    env = os.environ.get("HIOCLUSTER_CONTROL")
    if env:
        return env
    root = _root()
    found = []
    candidates = [f"ipc://{path}" for path in sorted(glob.glob(os.path.join(root, "hioc-*",
                                                                            "endpoint")))]
    for address in [*candidates, *_tcp_endpoints()]:
        try:
            path = address[len("ipc://"):]
            if address.startswith("ipc://") and \
                    os.stat(os.path.dirname(path)).st_uid != os.getuid():
                continue
            ask(address, proto.Command(command="status"), timeout=1.0)
        except (OSError, Unreachable):
            continue
        found.append(address)
    if not found:
        raise Unreachable(f"no run found under {root} (set HIOCLUSTER_CONTROL or pass "
                          "--control ADDRESS; a run prints its address when it starts)")
    if len(found) > 1:
        raise Unreachable(f"{len(found)} runs under {root}: say which with --control "
                          f"(one of: {', '.join(found)})")
    return found[0]


def _root() -> str:
    return os.environ.get("HIOCLUSTER_RUN_ROOT") or tempfile.gettempdir()


def _tcp_endpoints() -> dict[str, tuple[KeyPair, str]]:
    """The tcp endpoints of this user's runs under the run root (a run directory is
    theirs alone): address -> (the shells' CURVE key pair, the run's public key)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(_root(), "hioc-*", ENDPOINT_RECORD))):
        try:
            with open(path, encoding="utf-8") as file:
                record = json.load(file)
            found[str(record["address"])] = (KeyPair(str(record["public"]),
                                                      str(record["secret"])),
                                             str(record["server"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def ask(address: str, command: proto.Command, *, timeout: float = ANSWER_TIMEOUT_S
        ) -> proto.Answer:
    """Send ``command`` to the run at ``address``; its answer. Raises Unreachable."""
    path = address[len("ipc://"):] if address.startswith("ipc://") else None
    if path is not None and not os.path.exists(path):
        raise Unreachable(f"no run at {address} (no such socket)")
    curve = _tcp_endpoints().get(address) if address.startswith("tcp://") else None
    try:
        data = request(address, proto.encode(command), timeout, proto.MAX_CONTROL_FRAME,
                       curve)
        if data is None:
            raise Unreachable(f"no answer from {address} within {timeout:g} s")
        answer = proto.decode(data, allowed=(proto.Answer,))
    except (TransportError, FrameError) as exc:
        raise Unreachable(f"cannot talk to the run at {address}: {exc}") from exc
    assert isinstance(answer, proto.Answer)
    return answer


def serving(status: dict[str, Any]) -> bool:
    """Every service has all its replicas serving and nothing else running (and a
    simulation, if any, has no failed process)."""
    for row in status.get("services") or []:
        states = [replica["state"] for replica in row["replicas"]]
        if row["failed"] or row["rolling"] or states.count("serving") != row["desired"] \
                or len(states) != row["desired"]:
            return False
    return True


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024  # type: ignore[assignment]
    return "-"


def format_status(status: dict[str, Any]) -> str:
    """The table ``hiocluster status`` prints."""
    lines = [f"run {status.get('topology')} (pid {status.get('pid')}), up "
             f"{status.get('uptime', 0):.1f} s"]
    simulation = status.get("simulation")
    if simulation:
        lines.append(f"simulation: tick {simulation['tick']}/{simulation['ticks']}, "
                     f"{simulation['rate']:,.0f} ticks/s, window {simulation['window']}, "
                     f"{simulation['state']}")
        lines += [f"  {name:<12} {state}" for name, state in simulation["workers"].items()]
    rows = [("SERVICE", "REPLICA", "PID", "STATE", "RESTARTS", "UPTIME", "CPU", "RSS",
             "SERVED")]
    for service in status.get("services") or []:
        for replica in service["replicas"]:
            cpu = replica.get("cpu")
            rows.append((service["service"], str(replica["replica"]),
                         str(replica["pid"] or "-"), replica["state"],
                         str(replica["restarts"]), f"{replica['uptime']:.1f}s",
                         "-" if cpu is None else f"{cpu:.1f}%", _size(replica.get("rss")),
                         str(replica["served"])))
        if not service["replicas"]:
            rows.append((service["service"], "-", "-", "none", str(service["restarts"]),
                         "-", "-", "-", str(service["served"])))
    if len(rows) > 1:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                  for row in rows]
    for service in status.get("services") or []:
        note = f"{service['service']} on {service['listen']}: {service['serving']}/" \
               f"{service['desired']} serving, {service['restarts']} restarts, " \
               f"{service['served']} served"
        if service["rolling"]:
            note += f", rolling restart ({service['rolling']} to go)"
        if service["failed"]:
            note += f", FAILED: {service['failed']}"
        lines.append(note)
    return "\n".join(lines)


def control_main(args: Any) -> int:
    """``hiocluster status|scale|restart|stop`` (see the module docstring)."""
    try:
        address = find_endpoint(args.control)
        if args.command == "status":
            answer = ask(address, proto.Command(command="status"))
            if args.json:
                print(json.dumps({"control": address, **answer.status}))
            else:
                print(format_status(answer.status))
            return EXIT_OK if serving(answer.status) else EXIT_NOT_RUNNING
        if args.command == "scale":
            name, replicas = args.target
            command = proto.Command(command="scale", service=name, replicas=replicas)
        elif args.command == "restart":
            command = proto.Command(command="restart", service=args.service)
        else:
            command = proto.Command(command="stop")
        answer = ask(address, command)
        if not answer.ok:
            print(f"hiocluster: {args.command}: {answer.detail}", file=sys.stderr)
            return EXIT_REFUSED
        print(answer.detail)
        return _wait(address, args)
    except Unreachable as exc:
        print(f"hiocluster: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


def _wait(address: str, args: Any) -> int:
    """Until the run got where the command sends it (bounded by ``--timeout``)."""
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            status = ask(address, proto.Command(command="status"), timeout=2.0).status
        except Unreachable:
            if args.command == "stop":
                print("stopped")
                return EXIT_OK
            raise
        if args.command != "stop" and serving(status):
            print(format_status(status))
            return EXIT_OK
        failed = [row["failed"] for row in status.get("services") or [] if row["failed"]]
        if failed:
            print(f"hiocluster: {args.command}: {failed[0]}", file=sys.stderr)
            return EXIT_REFUSED
        time.sleep(0.1)  # polling a run we do not own: there is nothing to wait on
    print(f"hiocluster: {args.command}: not done within {args.timeout:g} s", file=sys.stderr)
    return EXIT_NOT_RUNNING
