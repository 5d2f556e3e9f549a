"""ServiceCore (hiocluster.services.core), sans-IO: restart policies, intensity,
backoff, scaling and rolling restarts, driven by hand with a fake clock."""

from __future__ import annotations

import pytest

from hiocluster.services.core import ReplicaState, ServiceCore, ServiceFailed
from hiocluster.topology import ServiceSpec, loads


def spec(**changes: object) -> ServiceSpec:
    base = dict(name="web", cls="m:C", listen=("127.0.0.1", 8080), replicas=2)
    base.update(changes)
    return ServiceSpec(**base)  # type: ignore[arg-type]


class Harness:
    """A core and the processes it asked for: start, stop, kill are recorded."""

    def __init__(self, *specs: ServiceSpec) -> None:
        self.core = ServiceCore(specs, start_timeout=5.0)
        self.now = 0.0
        self.pids = 100

    def take(self) -> list[tuple[str, str]]:
        actions = [(action.kind, action.replica.key) for action in self.core.actions]
        self.core.actions.clear()
        return actions

    def join_all(self) -> None:
        for replica in self.core.live():
            if replica.state is ReplicaState.STARTING:
                self.pids += 1
                self.core.joined(replica, self.pids, self.now)

    def at(self, now: float) -> list[tuple[str, str]]:
        self.now = now
        self.core.poll(now)
        return self.take()

    def exit(self, key: str, code: int) -> None:
        replica = self.core.replica(key)
        assert replica is not None, key
        self.core.exited(replica, code, self.now)


def test_start_makes_each_replica_with_its_own_identity() -> None:
    h = Harness(spec(), spec(name="echo", listen=("127.0.0.1", 7000), replicas=1))
    h.core.start(0.0)
    assert h.take() == [("start", "web.0.1"), ("start", "web.1.2"), ("start", "echo.0.3")]
    assert not h.core.all_serving()
    h.join_all()
    assert h.core.all_serving()


def test_one_for_one_restarts_the_dead_replica_after_its_backoff() -> None:
    h = Harness(spec(backoff=0.1))
    h.core.start(0.0)
    h.take()
    h.join_all()
    h.now = 1.0
    h.exit("web.1.2", -9)
    assert h.take() == []
    assert h.at(1.05) == []
    assert h.at(1.1) == [("start", "web.1.3")]  # a fresh incarnation, same replica
    rows = h.core.status(1.1)[0]
    assert rows["restarts"] == 1
    assert [r["state"] for r in rows["replicas"]] == ["serving", "starting"]
    assert "web.1 was killed by signal 9: restarting in 0.1 s" in h.core.log


def test_backoff_doubles_for_recent_crashes_and_is_capped() -> None:
    h = Harness(spec(replicas=1, backoff=0.5, backoff_max=1.5, max_restarts=10, within=100))
    h.core.start(0.0)
    h.take()
    delays, key = [], "web.0.1"
    for crash in range(4):
        h.join_all()
        h.exit(key, 1)
        when = h.now
        while True:
            h.now += 0.25
            started = h.at(h.now)
            if started:
                break
        delays.append(h.now - when)
        key = started[0][1]
    assert delays == [0.5, 1.0, 1.5, 1.5]


def test_too_many_restarts_fail_the_service_and_stop_everything() -> None:
    h = Harness(spec(replicas=2, max_restarts=2, within=10.0, backoff=0.1),
                spec(name="other", listen=("127.0.0.1", 9), replicas=1))
    h.core.start(0.0)
    h.take()
    h.join_all()
    h.exit("web.0.1", 1)
    h.at(0.2)
    h.join_all()
    h.exit("web.0.4", 1)
    h.at(0.5)
    h.join_all()
    h.exit("web.0.5", 3)  # the third crash within 10 s: more than 2 restarts
    assert isinstance(h.core.failure, ServiceFailed)
    assert str(h.core.failure) == ("service web failed: 3 crashes within 10 s "
                                   "(max_restarts = 2); the last: web.0 exited with code 3")
    assert sorted(h.take()) == [("stop", "other.0.3"), ("stop", "web.1.2")]
    assert not h.core.finished
    h.exit("web.1.2", 0)
    h.exit("other.0.3", 0)
    assert h.core.finished
    with pytest.raises(ValueError, match="has failed"):
        h.core.scale("web", 3, h.now)


def test_crashes_older_than_the_window_do_not_count() -> None:
    h = Harness(spec(replicas=1, max_restarts=1, within=2.0, backoff=0.1))
    h.core.start(0.0)
    key = h.take()[0][1]
    for crash in range(5):  # one crash every 3 s: never two within 2 s
        h.join_all()
        h.now += 3.0
        h.exit(key, 1)
        key = h.at(h.now + 0.1)[0][1]
    assert h.core.failure is None


def test_one_for_all_stops_the_others_and_restarts_all() -> None:
    h = Harness(spec(replicas=3, restart="one_for_all", backoff=0.2))
    h.core.start(0.0)
    h.take()
    h.join_all()
    h.exit("web.1.2", -11)
    assert sorted(h.take()) == [("stop", "web.0.1"), ("stop", "web.2.3")]
    h.exit("web.0.1", 0)
    h.exit("web.2.3", 0)  # drained on purpose: no crash
    assert sorted(h.at(0.2)) == [("start", "web.0.4"), ("start", "web.1.5"),
                                 ("start", "web.2.6")]
    assert h.core.status(0.2)[0]["restarts"] == 3


def test_scale_up_and_down_drains_the_highest_numbered() -> None:
    h = Harness(spec(replicas=2))
    h.core.start(0.0)
    h.take()
    h.join_all()
    assert h.core.scale("web", 4, 1.0) == "web: 2 -> 4 replicas"
    assert h.take() == [("start", "web.2.3"), ("start", "web.3.4")]
    h.join_all()
    assert [r.listeners for r in h.core.live()] == [(0,), (1,), (2,), (3,)]
    h.core.scale("web", 1, 2.0)
    # the three go; web.0 is rolled so that its successor takes over their sockets
    assert h.take() == [("stop", "web.1.2"), ("stop", "web.2.3"), ("stop", "web.3.4"),
                        ("start", "web.0.5")]
    for key in ("web.1.2", "web.2.3", "web.3.4"):
        h.exit(key, 0)
    h.join_all()
    assert h.take() == [("stop", "web.0.1")]
    h.exit("web.0.1", 0)
    assert h.take() == [] and h.at(3.0) == []
    assert [(r.index, r.listeners) for r in h.core.live()] == [(0, (0, 1, 2, 3))]
    assert h.core.all_serving()
    h.core.scale("web", 2, 4.0)  # web.1 gets its socket back; web.0 may keep it too
    assert h.take() == [("start", "web.1.6")]
    assert h.core.listeners_for("web", 1) == (1, 3) and h.core.listeners_for("web", 0) == (0, 2)
    h.core.scale("web", 0, 5.0)
    assert h.core.listeners_for("web", 0) == ()
    with pytest.raises(KeyError, match="no service 'wbe' .services: web."):
        h.core.scale("wbe", 2, 3.0)
    with pytest.raises(ValueError, match="0..256"):
        h.core.scale("web", 257, 3.0)


def test_a_replica_stopped_but_lingering_is_killed_after_its_drain() -> None:
    h = Harness(spec(replicas=1, drain=2.0))
    h.core.start(0.0)
    h.take()
    h.join_all()
    h.core.scale("web", 0, 1.0)
    assert h.take() == [("stop", "web.0.1")]
    assert h.at(2.9) == []
    assert h.at(3.0) == [("kill", "web.0.1")]
    assert h.at(4.0) == []  # killed once


def test_a_replica_that_never_joins_is_killed_and_restarted() -> None:
    h = Harness(spec(replicas=1, backoff=0.1))
    h.core.start(0.0)
    h.take()
    assert h.at(4.9) == []
    assert h.at(5.1) == [("kill", "web.0.1")]
    h.exit("web.0.1", -9)
    assert h.at(5.2) == [("start", "web.0.2")]


def test_rolling_restart_starts_a_successor_before_stopping_each() -> None:
    h = Harness(spec(replicas=2))
    h.core.start(0.0)
    h.take()
    h.join_all()
    assert h.core.restart("web", 1.0) == "web: rolling restart of 2 replicas"
    assert h.take() == [("start", "web.0.3")]  # old web.0 still serves
    with pytest.raises(ValueError, match="already restarting"):
        h.core.restart("web", 1.0)
    h.join_all()
    assert h.take() == [("stop", "web.0.1")]
    assert h.core.all_serving()
    h.exit("web.0.1", 0)
    assert h.take() == [("start", "web.1.4")]
    h.join_all()
    assert h.take() == [("stop", "web.1.2")]
    h.exit("web.1.2", 0)
    assert h.take() == []
    row = h.core.status(2.0)[0]
    assert row["rolling"] == 0 and row["restarts"] == 0 and row["serving"] == 2
    assert [r["incarnation"] for r in row["replicas"]] == [3, 4]


def test_a_crash_during_a_roll_abandons_it_and_restarts_as_usual() -> None:
    h = Harness(spec(replicas=2, backoff=0.1))
    h.core.start(0.0)
    h.take()
    h.join_all()
    h.core.restart("web", 1.0)
    h.take()
    h.now = 1.5
    h.exit("web.0.3", 1)  # the successor dies before serving: web.0.1 serves on
    assert h.core.status(1.5)[0]["rolling"] == 0
    assert h.at(2.0) == []
    assert h.core.all_serving()


def test_a_replica_past_max_requests_is_replaced_its_successor_serving_first() -> None:
    h = Harness(spec(replicas=2, max_requests=100))
    h.core.start(0.0)
    h.take()
    h.join_all()
    web0 = h.core.replica("web.0.1")
    h.core.load(web0, 99, 3, 1.0)  # type: ignore[arg-type]
    assert h.take() == []
    h.core.load(web0, 100, 3, 1.2)  # type: ignore[arg-type]
    assert h.take() == [("start", "web.0.3")]  # web.0.1 serves on meanwhile
    assert "web.0 served 100 requests (max_requests = 100 + 0): replaced" in h.core.log
    h.core.load(web0, 150, 3, 1.4)  # type: ignore[arg-type]
    assert h.take() == []  # one successor, however much more it serves
    h.join_all()
    assert h.take() == [("stop", "web.0.1")]
    h.now = 2.0
    h.exit("web.0.1", 0)
    row = h.core.status(2.0)[0]
    assert (row["replaced"], row["restarts"], row["serving"]) == (1, 0, 2)
    assert row["served"] == 150
    assert not any("restarting" in line for line in h.core.log)


def test_max_requests_jitter_is_drawn_per_start_within_its_bounds() -> None:
    h = Harness(spec(replicas=8, max_requests=1000, max_requests_jitter=50))
    h.core.start(0.0)
    jitters = [action.replica.jitter for action in h.core.actions]
    assert all(0 <= jitter <= 50 for jitter in jitters) and len(set(jitters)) > 1
    h.take()
    h.join_all()
    first = h.core.replica("web.0.1")
    assert first is not None
    h.core.load(first, 1000 + first.jitter - 1, 0, 1.0)
    assert h.take() == []
    h.core.load(first, 1000 + first.jitter, 0, 1.1)
    assert h.take() == [("start", "web.0.9")]


def test_a_replica_over_max_rss_is_replaced_and_none_is_while_stopping() -> None:
    h = Harness(spec(replicas=1, max_rss=64 << 20))
    h.core.start(0.0)
    h.take()
    h.join_all()
    web0 = h.core.replica("web.0.1")
    h.core.load(web0, 5, 0, 1.0, rss=64 << 20)  # type: ignore[arg-type]
    h.core.load(web0, 5, 0, 1.0, rss=None)  # type: ignore[arg-type]  # not measured
    assert h.take() == []
    h.core.load(web0, 6, 0, 1.1, rss=(64 << 20) + 1)  # type: ignore[arg-type]
    assert h.take() == [("start", "web.0.2")]
    assert any("web.0 uses 64.0 MiB (max_rss = 64.0 MiB): replaced" in line
               for line in h.core.log)
    h = Harness(spec(replicas=1, max_requests=10))
    h.core.start(0.0)
    h.take()
    h.join_all()
    h.core.stop(1.0)
    h.take()
    h.core.load(h.core.replica("web.0.1"), 20, 0, 1.1)  # type: ignore[arg-type]
    assert h.take() == []


def test_an_unhealthy_replica_stops_taking_connections_at_once_and_is_replaced() -> None:
    h = Harness(spec(replicas=2, health_failures=3, max_restarts=1))
    h.core.start(0.0)
    h.take()
    h.join_all()
    web0 = h.core.replica("web.0.1")
    assert web0 is not None
    h.core.load(web0, 5, 1, 1.0, failing=0, health="ok")
    h.core.load(web0, 5, 1, 2.0, failing=2, health="ValueError: GET /health: 503")
    assert h.take() == []
    shown = h.core.status(2.0)[0]["replicas"][0]
    assert (shown["health"], shown["health_detail"]) == \
        ("failing 2", "ValueError: GET /health: 503")
    h.core.load(web0, 5, 1, 3.0, failing=3, health="ValueError: GET /health: 503")
    # its successor is started, and it drains now, before the successor serves
    assert h.take() == [("start", "web.0.3"), ("stop", "web.0.1")]
    assert "web.0 failed its health check 3 times in a row (ValueError: GET /health: " \
           "503): replaced" in h.core.log
    h.core.load(web0, 5, 1, 3.1, failing=4, health="still")
    assert h.take() == []  # replaced once
    h.now = 3.2
    h.exit("web.0.1", 0)
    h.join_all()
    assert h.take() == []
    row = h.core.status(3.5)[0]
    assert (row["unhealthy"], row["restarts"], row["serving"], row["failed"]) == \
        (1, 1, 2, None)
    # health replacements are not crashes: more than max_restarts never fail it
    for k, t in enumerate((4.0, 5.0, 6.0)):
        old = h.core.live()[-1]
        h.core.load(old, 0, 0, t, failing=3, health="bad")
        assert [kind for kind, _ in h.take()] == ["start", "stop"]
        h.now = t + 0.1
        h.exit(old.key, 0)
        h.join_all()
    assert h.core.failure is None and h.core.all_serving()


def test_an_unhealthy_successor_that_crashes_is_restarted() -> None:
    h = Harness(spec(replicas=1, health_failures=1, backoff=0.5))
    h.core.start(0.0)
    h.take()
    h.join_all()
    h.core.load(h.core.replica("web.0.1"), 0, 0, 1.0, failing=1,  # type: ignore[arg-type]
                health="bad")
    assert h.take() == [("start", "web.0.2"), ("stop", "web.0.1")]
    h.now = 1.1
    h.exit("web.0.2", 1)  # the successor dies before it serves; web.0.1 drains
    h.exit("web.0.1", 0)
    assert h.at(1.5) == []
    assert h.at(1.7) == [("start", "web.0.3")]


def test_an_unhealthy_replica_whose_slot_already_has_a_successor_just_drains() -> None:
    h = Harness(spec(replicas=1, health_failures=2))
    h.core.start(0.0)
    h.take()
    h.join_all()
    h.core.restart("web", 1.0)
    assert h.take() == [("start", "web.0.2")]
    web1 = h.core.replica("web.0.1")
    h.core.load(web1, 0, 0, 1.1, failing=2, health="bad")  # type: ignore[arg-type]
    assert h.take() == []  # its successor does not serve yet: it serves on
    h.join_all()
    assert h.take() == [("stop", "web.0.1")]


def test_stop_drains_every_replica_and_finishes_when_all_exited() -> None:
    h = Harness(spec(replicas=2))
    h.core.start(0.0)
    h.take()
    h.join_all()
    h.core.exited(h.core.replica("web.1.2"), -9, 0.5)  # type: ignore[arg-type]
    h.core.stop(0.6)
    assert h.take() == [("stop", "web.0.1")]
    assert h.at(1.0) == []  # the pending restart was dropped
    h.exit("web.0.1", 0)
    assert h.core.finished and h.core.failure is None


def test_services_in_the_topology_file(tmp_path: object) -> None:
    topology = loads("""
[services.web]
class = "nodes.web:Hello"
replicas = 3
listen = "127.0.0.1:8080"
restart = "one_for_all"
max_restarts = 4
within = 5
tls = { cert = "c.pem", key = "k.pem" }
max_requests = 1000
max_requests_jitter = 50
max_rss = 536_870_912
health_path = "/health?deep=1"
health_interval = 0.5
health_failures = 2
[services.web.params]
greeting = "hi"
""", path="/srv/site/web.toml")
    (web,) = topology.services
    assert (web.replicas, web.listen, web.restart, web.max_restarts, web.within) == \
        (3, ("127.0.0.1", 8080), "one_for_all", 4, 5.0)
    assert web.tls == ("/srv/site/c.pem", "/srv/site/k.pem")
    assert (web.max_requests, web.max_requests_jitter, web.max_rss) == (1000, 50, 512 << 20)
    assert (web.health_path, web.health_interval, web.health_failures) == \
        ("/health?deep=1", 0.5, 2)
    assert web.params == {"greeting": "hi"} and not topology.nodes
    assert ServiceSpec.from_json(web.to_json()) == web


@pytest.mark.parametrize("body, key_path, message", [
    ('class = "m:C"', "services.web", "missing required key 'listen'"),
    ('class = "m:C"\nlisten = "nowhere"', "services.web.listen", "expected 'HOST:PORT'"),
    ('class = "m:C"\nlisten = "h:70000"', "services.web.listen", "in 1..65535"),
    ('class = "m:C"\nlisten = "h:80"\nreplicas = 0', "services.web.replicas", "in 1..256"),
    ('class = "m:C"\nlisten = "h:80"\nrestart = "one_for_al"', "services.web.restart",
     "did you mean 'one_for_all'"),
    ('class = "m:C"\nlisten = "h:80"\nwithin = -1', "services.web.within", "> 0"),
    ('class = "m:C"\nlisten = "h:80"\nreplica = 2', "services.web.replica",
     "did you mean 'replicas'"),
    ('class = "m:C"\nlisten = "h:80"\ntls = { cert = "c" }', "services.web.tls",
     "missing required key 'key'"),
    ('class = "C"\nlisten = "h:80"', "services.web.class", "module.path:attr"),
    ('class = "m:C"\nlisten = "h:80"\nmax_requests = -1', "services.web.max_requests",
     "in 0.."),
    ('class = "m:C"\nlisten = "h:80"\nmax_rss = "1G"', "services.web.max_rss", "expected"),
    ('class = "m:C"\nlisten = "h:80"\nhealth_path = "health"', "services.web.health_path",
     "expected a path such as '/health'"),
    ('class = "m:C"\nlisten = "h:80"\nhealth_path = "/a b"', "services.web.health_path",
     "no spaces"),
    ('class = "m:C"\nlisten = "h:80"\nhealth_interval = 0', "services.web.health_interval",
     "> 0"),
    ('class = "m:C"\nlisten = "h:80"\nhealth_failures = 0', "services.web.health_failures",
     "in 1..1000"),
])
def test_bad_services_are_named(body: str, key_path: str, message: str) -> None:
    from hiocluster.errors import TopologyError
    with pytest.raises(TopologyError) as info:
        loads(f"[services.web]\n{body}\n")
    assert info.value.key_path == key_path and message in str(info.value), str(info.value)


def test_two_services_cannot_share_an_address() -> None:
    from hiocluster.errors import TopologyError
    with pytest.raises(TopologyError, match="also where service a listens"):
        loads('[services.a]\nclass = "m:C"\nlisten = "h:80"\n'
              '[services.b]\nclass = "m:C"\nlisten = "h:80"\n')


def test_cpu_is_the_recent_rate_not_the_average_since_the_last_status() -> None:
    """A replica busy for its first second, then idle: 100 % while busy, 0 % once
    a whole window (CPU_WINDOW_S) has been idle, however rarely status asks."""
    from hiocluster.services.supervisor import CPU_WINDOW_S, CpuRate

    clock = {"now": 0.0}

    def used() -> float:  # a full core for the first second, then nothing
        return min(clock["now"], 1.0)

    rate = CpuRate(used, 0.0)
    clock["now"] = 1.0
    assert rate.percent(1.0) == 100.0
    for step in range(1, 17):  # the run samples every quarter window
        clock["now"] = 1.0 + step * CPU_WINDOW_S / 4
        rate.sample(clock["now"])
    assert rate.percent(clock["now"]) == 0.0
    assert len(rate.samples) <= 6  # one window's worth is kept, not the whole past
    assert CpuRate(used, clock["now"]).percent(clock["now"]) is None  # too soon to say


def test_reload_takes_the_new_spec_and_count_and_rolls_but_keeps_the_address() -> None:
    h = Harness(spec(replicas=2, params={"greeting": "hi"}))
    h.core.start(0.0)
    h.take()
    h.join_all()
    new = spec(replicas=3, params={"greeting": "bonjour"})
    assert h.core.reload("web", new, 1.0) == "web: reload of 2 replicas, then 2 -> 3 replicas"
    assert h.take() == [("start", "web.0.3"), ("start", "web.2.4")]
    assert h.core.services["web"].spec.params == {"greeting": "bonjour"}
    assert h.core.services["web"].desired == 3
    h.join_all()  # web.0 rolled; then web.1, while web.2 serves
    assert h.take() == [("stop", "web.0.1")]
    h.now = 1.5
    h.exit("web.0.1", 0)
    assert h.take() == [("start", "web.1.5")]
    fewer = Harness(spec(replicas=3))
    fewer.core.start(0.0)
    fewer.take()
    fewer.join_all()
    assert fewer.core.reload("web", spec(replicas=1), 1.0) == \
        "web: reload of 3 replicas, then 3 -> 1 replicas"
    assert fewer.take() == [("start", "web.0.4"), ("stop", "web.1.2"), ("stop", "web.2.3")]
    # web.0.4 was started with its own listening socket only: once it serves,
    # web.0 rolls again, onto those of the replicas scaled away
    fewer.join_all()
    fewer.now = 1.5
    for key in ("web.1.2", "web.2.3"):
        fewer.exit(key, 0)
    assert fewer.take() == [("stop", "web.0.1")]
    fewer.exit("web.0.1", 0)
    assert fewer.take() == [("start", "web.0.5")]
    assert fewer.core.replica("web.0.5").listeners == (0, 1, 2)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="already restarting"):
        h.core.reload("web", new, 1.0)
    with pytest.raises(ValueError, match="a reload keeps the address"):
        h.core.reload("web", spec(listen=("127.0.0.1", 9090)), 1.0)
    with pytest.raises(KeyError, match="no service 'api'"):
        h.core.reload("api", new, 1.0)
    h.now = 2.0
    h.join_all()
    h.exit("web.1.2", 0)
    assert h.core.all_serving() and h.core.status(2.0)[0]["rolling"] == 0
