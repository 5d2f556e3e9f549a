"""The shell side of a run's control endpoint: ``hiocluster status|scale|restart|stop``.

Finds the run (``--control ADDRESS``, else ``$HIOCLUSTER_CONTROL``, else the one
run of this user under the run root that answers), sends one COMMAND, reads
the ANSWER (docs/protocol.md §12); for ``scale`` and ``restart`` waits until
the run got there, for ``stop`` until the run's second ANSWER says it stopped.
Exit codes as supervisorctl's: 0 ok, 3 some replica is not serving (status) or
the run did not get there in time, 4 the run cannot be reached, 2 usage (also:
several runs found, none named), 1 the run refused (e.g. no such service), or
it vanished or failed before confirming its stop.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import time
from typing import Any

from hiocluster import protocol as proto
from hiocluster.errors import FrameError, SeveralRuns, Unreachable
from hiocluster.runtime.transport import (
    ENDPOINT_RECORD,
    Asking,
    Gone,
    KeyPair,
    TransportError,
    request,
)

__all__ = ["Unreachable", "SeveralRuns", "find_endpoint", "ask", "format_status", "control_main",
           "EXIT_NOT_RUNNING", "EXIT_UNREACHABLE"]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_UNREACHABLE = 0, 1, 2, 3, 4
#: Seconds to wait for an answer.
ANSWER_TIMEOUT_S = 5.0


def find_endpoint(given: str | None = None) -> str:
    """The control address: ``given``, ``$HIOCLUSTER_CONTROL``, or the only run
    under the run root that answers. Raises Unreachable saying what was tried, or
    SeveralRuns listing the runs found."""
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
            status = ask(address, proto.Command(command="status"), timeout=1.0).status
        except (OSError, Unreachable):
            continue
        found.append((address, status))
    if not found:
        raise Unreachable(f"no run found under {root} (set HIOCLUSTER_CONTROL or pass "
                          "--control ADDRESS; a run prints its address when it starts)")
    if len(found) > 1:
        raise SeveralRuns(f"{len(found)} runs under {root}: say which with --control "
                          "ADDRESS (or $HIOCLUSTER_CONTROL):\n" + "\n".join(
                              f"  {address}  {status.get('topology')} (pid "
                              f"{status.get('pid')})" for address, status in found))
    return found[0][0]


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


def _curve(address: str) -> tuple[KeyPair, str] | None:
    """The shells' key pair and the run's public key for a tcp endpoint (else None)."""
    return _tcp_endpoints().get(address) if address.startswith("tcp://") else None


def ask(address: str, command: proto.Command, *, timeout: float = ANSWER_TIMEOUT_S
        ) -> proto.Answer:
    """Send ``command`` to the run at ``address``; its answer. Raises Unreachable."""
    path = address[len("ipc://"):] if address.startswith("ipc://") else None
    if path is not None and not os.path.exists(path):
        raise Unreachable(f"no run at {address} (no such socket)")
    curve = _curve(address)
    try:
        data = request(address, proto.encode(command), timeout, proto.MAX_CONTROL_FRAME,
                       curve)
    except TransportError as exc:
        raise Unreachable(f"cannot talk to the run at {address}: {exc}") from exc
    if data is None:
        raise Unreachable(f"no answer from {address} within {timeout:g} s")
    return _answer(address, data)


def _answer(address: str, data: bytes) -> proto.Answer:
    try:
        answer = proto.decode(data, allowed=(proto.Answer,))
    except FrameError as exc:
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
    rows: list[tuple[str, ...]] = [("SERVICE", "REPLICA", "PID", "STATE", "RESTARTS",
                                    "UPTIME", "CPU", "RSS", "SERVED", "CODE", "HEALTH")]
    for service in status.get("services") or []:
        for replica in service["replicas"]:
            cpu = replica.get("cpu")
            rows.append((service["service"], str(replica["replica"]),
                         str(replica["pid"] or "-"), replica["state"],
                         str(replica["restarts"]), f"{replica['uptime']:.1f}s",
                         "-" if cpu is None else f"{cpu:.1f}%", _size(replica.get("rss")),
                         str(replica["served"]), replica.get("version") or "-",
                         replica.get("health", "-")))
        if not service["replicas"]:
            rows.append((service["service"], "-", "-", "none", str(service["restarts"]),
                         "-", "-", "-", str(service["served"]), "-", "-"))
    hosts = [replica.get("host") or "" for service in status.get("services") or []
             for replica in service["replicas"] or [{}]]
    if any(hosts):  # services across hosts: where each replica runs, after its number
        rows = [(*row[:2], host, *row[2:]) for row, host in zip(rows, ["HOST", *hosts])]
    if len(rows) > 1:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                  for row in rows]
    for service in status.get("services") or []:
        note = f"{service['service']} on {service['listen']}: {service['serving']}/" \
               f"{service['desired']} serving, {service['restarts']} restarts, " \
               f"{service['served']} served"
        if service.get("versions", 0) > 1:
            note += f", {service['versions']} code versions serving"
        for replica in service["replicas"]:
            if replica.get("health_detail"):
                lines.append(f"{service['service']}.{replica['replica']} is "
                             f"{replica['health']}: {replica['health_detail']}")
        if service.get("unhealthy"):
            note += f", {service['unhealthy']} replaced for failed health checks"
        if service.get("replaced"):
            note += f", {service['replaced']} replaced (max_requests, max_rss)"
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
        if args.command == "stop":
            return _stop(address, args.timeout)
        if args.command == "scale":
            name, replicas = args.target
            command = proto.Command(command="scale", service=name, replicas=replicas)
        elif args.command == "reload":
            command = proto.Command(command="reload")
        else:
            command = proto.Command(command="restart", service=args.service)
        answer = ask(address, command)
        if not answer.ok:
            print(f"hiocluster: {args.command}: {answer.detail}", file=sys.stderr)
            return EXIT_REFUSED
        print(answer.detail)
        return _wait(address, args)
    except Unreachable as exc:
        print(f"hiocluster: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except SeveralRuns as exc:
        print(f"hiocluster: {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _stop(address: str, timeout: float) -> int:
    """``stop``: "stopped" (exit 0) only when the run says so, its second ANSWER
    (docs/protocol.md §12); otherwise what was seen, and a non-zero exit."""
    status = ask(address, proto.Command(command="status")).status
    run = f"the run {status.get('topology')} (pid {status.get('pid')})"
    try:
        with Asking(address, proto.MAX_CONTROL_FRAME, _curve(address)) as asking:
            asking.send(proto.encode(proto.Command(command="stop")))
            data = asking.receive(ANSWER_TIMEOUT_S)
            if data is None:
                raise Unreachable(f"no answer from {address} within {ANSWER_TIMEOUT_S:g} s")
            answer = _answer(address, data)
            if not answer.ok:
                print(f"hiocluster: stop: {answer.detail}", file=sys.stderr)
                return EXIT_REFUSED
            print(answer.detail, flush=True)  # "stopping"
            data = asking.receive(timeout)
    except Gone:
        print(f"hiocluster: stop: {run} vanished before confirming its stop (killed, or "
              "it crashed)", file=sys.stderr)
        return EXIT_REFUSED
    except TransportError as exc:
        raise Unreachable(f"cannot talk to the run at {address}: {exc}") from exc
    if data is None:
        print(f"hiocluster: stop: {run} did not stop within {timeout:g} s", file=sys.stderr)
        return EXIT_NOT_RUNNING
    answer = _answer(address, data)
    if not answer.ok:
        print(f"hiocluster: stop: {answer.detail}", file=sys.stderr)
        return EXIT_REFUSED
    print(answer.detail)
    return EXIT_OK


def _wait(address: str, args: Any) -> int:
    """Until the run got where ``scale`` or ``restart`` sends it (bounded by
    ``--timeout``)."""
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        status = ask(address, proto.Command(command="status"), timeout=2.0).status
        if serving(status):
            print(format_status(status))
            return EXIT_OK
        failed = [row["failed"] for row in status.get("services") or [] if row["failed"]]
        if failed:
            print(f"hiocluster: {args.command}: {failed[0]}", file=sys.stderr)
            return EXIT_REFUSED
        time.sleep(0.1)  # polling a run we do not own: there is nothing to wait on
    print(f"hiocluster: {args.command}: not done within {args.timeout:g} s", file=sys.stderr)
    return EXIT_NOT_RUNNING
