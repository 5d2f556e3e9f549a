"""The run's Prometheus endpoint (``[run] metrics = "HOST:PORT"``, ``--metrics``).

``GET /metrics`` on that address answers in Prometheus's text format (the
``prometheus_client`` package writes it), read at each scrape from the run's
own status (what ``hiocluster status --json`` shows), so nothing is counted
twice and a scrape costs the run nothing between scrapes. It is served by
hio's WSGI server (:class:`~hiocluster.services.serving.WsgiServer`) in the
run's own loop, a doer beside the control endpoint: no thread reads the run's
state while the loop changes it.

Families (``service``, ``replica``, ``worker`` labels):

======================================== ======= ====================================
hiocluster_up                            gauge   1: the run answers
hiocluster_uptime_seconds                gauge   since the run started
hiocluster_requests_total                counter responses (TCP: messages) served
hiocluster_request_duration_seconds      histo.  from a request read whole to its
                                                 answer handed to the socket (HTTP)
hiocluster_connections                   gauge   open connections, per replica
hiocluster_replicas                      gauge   serving, and ``desired``
hiocluster_restarts_total                counter crashes restarted (and health)
hiocluster_replaced_total                counter lifetimes (``reason="lifetime"``)
                                                 and health checks (``"health"``)
hiocluster_replica_cpu_percent           gauge   of one core, over the last ~2 s
hiocluster_replica_rss_bytes             gauge   resident memory
hiocluster_replica_healthy               gauge   1/0, replicas with a health check
hiocluster_simulation_tick               gauge   the last tick every worker finished
hiocluster_simulation_ticks              gauge   the run's ticks
hiocluster_simulation_ticks_per_second   gauge   since the first tick
hiocluster_simulation_window             gauge   ticks granted per round trip
hiocluster_worker_tick                   gauge   the last tick each worker finished
hiocluster_worker_waiting_seconds        gauge   how long it has waited for a
                                                 neighbour's frames (0: it is not)
======================================== ======= ====================================
"""

from __future__ import annotations

import logging
import os
import re
import socket
from typing import Any, Callable, Iterator

from hio.base.doing import Doer
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from hiocluster.errors import MetricsError
from hiocluster.services.core import LATENCY_BUCKETS
from hiocluster.services.serving import FdWatch, WsgiServer, listening_socket

__all__ = ["MetricsEndpoint", "families", "parse_address"]

logger = logging.getLogger("hiocluster.metrics")

#: Seconds a scraper's connection may stay idle.
METRICS_TIMEOUT_S = 30.0

_ADDRESS = re.compile(r"(?P<host>[A-Za-z0-9_.-]{1,253}):(?P<port>\d{1,5})")


def parse_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` as ``(host, port)`` (port 0: any free one).

    Raises:
        ValueError: naming what is wrong.
    """
    found = _ADDRESS.fullmatch(address)
    if found is None or int(found["port"]) > 65535:
        raise ValueError(f"expected 'HOST:PORT' (port 0..65535), got {address!r}")
    return found["host"], int(found["port"])


def families(status: dict[str, Any]) -> list[Metric]:
    """The metric families of a run whose status (as ``hiocluster status --json``
    has it) is ``status``."""
    up = GaugeMetricFamily("hiocluster_up", "1: the run answers", labels=["topology"])
    up.add_metric([str(status.get("topology", ""))], 1)
    uptime = GaugeMetricFamily("hiocluster_uptime_seconds", "Seconds since the run started")
    uptime.add_metric([], float(status.get("uptime", 0.0)))
    found: list[Metric] = [up, uptime]
    services = status.get("services") or []
    if services:
        found += _service_families(services)
    simulation = status.get("simulation")
    if simulation:
        found += _simulation_families(simulation)
    return found


def _service_families(services: list[dict[str, Any]]) -> list[Metric]:
    requests = CounterMetricFamily("hiocluster_requests", "Responses (TCP: messages) served",
                                   labels=["service"])
    duration = HistogramMetricFamily(
        "hiocluster_request_duration_seconds",
        "From a request read whole to its answer handed to the socket (HTTP services)",
        labels=["service"])
    replicas = GaugeMetricFamily("hiocluster_replicas", "Replicas serving, and desired",
                                 labels=["service", "state"])
    restarts = CounterMetricFamily("hiocluster_restarts", "Replicas restarted",
                                   labels=["service"])
    replaced = CounterMetricFamily("hiocluster_replaced", "Replicas replaced",
                                   labels=["service", "reason"])
    connections = GaugeMetricFamily("hiocluster_connections", "Connections open",
                                    labels=["service", "replica"])
    cpu = GaugeMetricFamily("hiocluster_replica_cpu_percent",
                            "Percent of one core over the last ~2 s", labels=["service", "replica"])
    rss = GaugeMetricFamily("hiocluster_replica_rss_bytes", "Resident memory",
                            labels=["service", "replica"])
    healthy = GaugeMetricFamily("hiocluster_replica_healthy",
                                "1: its last health check passed (replicas with a check)",
                                labels=["service", "replica"])
    for service in services:
        name = service["service"]
        requests.add_metric([name], service["served"])
        latency = service.get("latency")
        if latency and len(latency["counts"]) == len(LATENCY_BUCKETS) + 1:
            running, buckets = 0, []
            for bound, count in zip((*(repr(b) for b in LATENCY_BUCKETS), "+Inf"),
                                    latency["counts"]):
                running += count
                buckets.append((bound, running))
            duration.add_metric([name], buckets, latency["sum"])
        replicas.add_metric([name, "serving"], service["serving"])
        replicas.add_metric([name, "desired"], service["desired"])
        restarts.add_metric([name], service["restarts"])
        replaced.add_metric([name, "lifetime"], service.get("replaced", 0))
        replaced.add_metric([name, "health"], service.get("unhealthy", 0))
        for replica in service["replicas"]:
            if replica["state"] not in ("serving", "stopping"):
                continue
            labels = [name, str(replica["replica"])]
            connections.add_metric(labels, replica["connections"])
            if replica.get("cpu") is not None:
                cpu.add_metric(labels, replica["cpu"])
            if replica.get("rss") is not None:
                rss.add_metric(labels, replica["rss"])
            if replica.get("health", "-") != "-":
                healthy.add_metric(labels, 1 if replica["health"] == "ok" else 0)
    return [requests, duration, replicas, restarts, replaced, connections, cpu, rss, healthy]


def _simulation_families(simulation: dict[str, Any]) -> list[Metric]:
    found: list[Metric] = []
    for key, text in (("tick", "The last tick every worker finished"),
                      ("ticks", "The run's ticks"),
                      ("rate", "Ticks per second since the first tick"),
                      ("window", "Ticks granted per round trip")):
        name = "ticks_per_second" if key == "rate" else key
        family = GaugeMetricFamily(f"hiocluster_simulation_{name}", text)
        family.add_metric([], simulation[key])
        found.append(family)
    tick = GaugeMetricFamily("hiocluster_worker_tick", "The last tick the worker finished",
                             labels=["worker"])
    waiting = GaugeMetricFamily("hiocluster_worker_waiting_seconds",
                                "How long the worker has waited for a neighbour's frames",
                                labels=["worker"])
    for worker, progress in (simulation.get("progress") or {}).items():
        tick.add_metric([worker], progress["tick"])
        waiting.add_metric([worker], progress["waiting_s"])
    return [*found, tick, waiting]


class _Collector:
    """prometheus_client's collector of the run's status, read at each scrape."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        yield from families(self.status())


class MetricsEndpoint(Doer):
    """Serves ``GET /metrics`` on ``address`` (see the module docstring). Listens
    at once, so a taken address fails the run before anything starts;
    :attr:`address` says the port bound (for port 0). The run :meth:`attach`-es
    it to its loop and status; a run that restarts attaches it to the next try's,
    on the same socket; :meth:`close` when the run is over.

    Raises:
        MetricsError: it cannot listen there (naming the address and why).
    """

    def __init__(self, address: str, **kwa: Any) -> None:
        super().__init__(**kwa)
        host, port = parse_address(address)
        try:
            self.socket = listening_socket((host, port), alone=True)
        except OSError as exc:
            raise MetricsError(f"cannot serve metrics on {address}: "
                               f"{exc.strerror or exc}") from None
        self.ha = (host, self.socket.getsockname()[1])
        self.address = f"{host}:{self.ha[1]}"
        self.status: Callable[[], dict[str, Any]] = dict
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(lambda: self.status()))  # type: ignore[arg-type]
        self.loop: Any = None
        self.server: WsgiServer | None = None
        self.fds: FdWatch | None = None
        self.said = False  # the run said where it is

    def attach(self, loop: Any, status: Callable[[], dict[str, Any]]) -> None:
        """Serve in ``loop`` (a :class:`~hiocluster.runtime.loop.Loop`) what
        ``status()`` says, from when this doer enters."""
        self.loop, self.status = loop, status

    def enter(self) -> None:
        # a server of its own per try, on a copy of the run's socket (closing a
        # server closes the sockets it serves)
        copy = socket.socket(fileno=os.dup(self.socket.fileno()))
        self.server = WsgiServer(make_wsgi_app(self.registry), self.ha,
                                 tymeout=METRICS_TIMEOUT_S, sockets=[copy])
        if not self.server.reopen():
            logger.error("metrics: cannot serve on %s", self.address)
            copy.close()
            self.server = None
            return
        self.server.wind(self.tymth)
        self.fds = FdWatch(self.loop.poller)

    def recur(self, tyme: float) -> bool:
        server = self.server
        if server is not None:
            server.service()
            self.fds.update(server.watch())  # type: ignore[union-attr]
            if server.busy:
                self.loop.asap = True
        return False

    def exit(self) -> None:
        if self.fds is not None:
            self.fds.clear()
            self.fds = None
        if self.server is not None:
            self.server.close()
            self.server = None

    def close(self) -> None:
        """The run is over: stop listening."""
        self.exit()
        self.socket.close()
