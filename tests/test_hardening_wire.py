"""The ZeroMQ wire under attack and on bad links (docs/protocol.md §1, §7).

* Routing ids: libzmq aborts a process whose ROUTER generates, for an anonymous
  peer, a routing id another peer already chose. Every peer of ours sets its
  own unpredictable id and every process seeds the generator, so claiming the
  ids libzmq would generate (learned from any fresh process) kills nothing.
* A lossy link: connections that are reset or stall past ZeroMQ's heartbeat
  are made again, proved again, and the frames lost with them resent; the
  run gives the one-process digest. How long a link may stay silent (the
  heartbeat timeout) is explicit and configurable.
* Strangers' frames: a bounded number per connection, a frame over the limit
  drops its connection, and the memory they took is given back.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import threading
from typing import Any

import psutil
import pytest
import zmq

from hiocluster.supervision import supervisor
from hiocluster.supervision.runcore import RunCore
from hiocluster.topology import load, loads
from hiocluster.runtime.transport import (BOUND_RCVHWM, HEARTBEAT_ENV, HEARTBEAT_TIMEOUT_MS, Context,
                                  KeyPair, heartbeat_timeout_ms)
from hiocluster.runtime.watchdog import ORPHAN_GRACE_S, orphan_grace

from conftest import REPO
from tests.faulty import ring_toml
from tests.relay import Relay

ATTACK = str(REPO / "tests" / "wire_attack.py")


def ring3(ticks: int = 60) -> str:
    return ring_toml({name: {} for name in "abc"}, {"p0": ["a"], "p1": ["b"], "p2": ["c"]},
                     ticks=ticks)


def run(text: str, **kwargs: Any) -> supervisor.RunResult:
    return supervisor.run(loads(text), app_dir=str(REPO), handle_signals=False, **kwargs)


@pytest.mark.parametrize("target", ["control", "endpoint", "data"])
def test_claiming_the_routing_ids_libzmq_would_generate_kills_nothing(
        target: str, cli_env: dict[str, str]) -> None:
    baseline = run(ring3())
    done = subprocess.run([sys.executable, ATTACK, target], capture_output=True, text=True,
                          timeout=90, env=cli_env)
    assert done.returncode == 0, (f"the run under attack on its {target} socket ended with "
                                  f"{done.returncode}:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["digest"] == baseline.digest
    assert result["claims"] >= 48
    if target == "endpoint":
        assert result["answered"] == [True], "the owner's status went unanswered"
    else:  # the anonymous stranger's frame was refused, not acted on
        assert result["rejected"] == 1


# -- a lossy link -------------------------------------------------------------------------


@pytest.fixture
def lossy(monkeypatch: pytest.MonkeyPatch):
    """Every worker's data address, as SETUP hands it to its neighbours, is a relay
    (tests/relay.py) that delays each chunk 50 ms and breaks some connections:
    the first three of each worker's inbox are reset, stalled (until ZeroMQ's
    heartbeat gives up) and reset again, each after a few dozen chunks. The
    heartbeat timeout is 2 s (HIOCLUSTER_HEARTBEAT_TIMEOUT_MS, every process of
    the run): a loaded 2-core machine misses 0.4 s heartbeats by itself, and a
    link that drops over and over for that is a test of the load, not of this."""
    monkeypatch.setenv("HIOCLUSTER_HEARTBEAT_TIMEOUT_MS", "2000")
    relays: list[Relay] = []
    addresses = RunCore._addresses

    def through_relays(core: RunCore, now: float) -> dict[str, str] | None:
        found = addresses(core, now)
        if found is None:
            return None
        for name, address in found.items():
            if not address.startswith("tcp://"):
                continue  # the one-process reference: nothing to relay
            relays.append(Relay(address, delay=0.05, faults={0: ("reset", 30),
                                                             1: ("stall", 50),
                                                             2: ("reset", 40)}))
            found[name] = relays[-1].address
        return found

    monkeypatch.setattr(RunCore, "_addresses", through_relays)
    try:
        yield relays
    finally:
        for relay in relays:
            relay.close()


@pytest.mark.parametrize("example", ["ring", "phold"])
def test_runs_over_a_lossy_link_give_the_one_process_digest(
        lossy: list[Relay], example: str, capfd: pytest.CaptureFixture[str]) -> None:
    topology = load(REPO / "topologies" / f"{example}.toml").replace(ticks=120)
    reference = supervisor.run(topology, processes=1, app_dir=str(REPO),
                               handle_signals=False, keep_digests=True)
    result = supervisor.run(topology, processes=3, transport="tcp", app_dir=str(REPO),
                            handle_signals=False, keep_digests=True)
    faults = [what for relay in lossy for what in relay.done]
    assert faults.count("reset") >= 3 and faults.count("stall") >= 1, faults
    assert result.tick_digests == reference.tick_digests
    assert result.messages == reference.messages
    assert "connecting again" in capfd.readouterr().err


# -- memory from strangers ------------------------------------------------------------------

FLOOD = """
import sys, zmq
from zmq.utils.monitor import recv_monitor_message
context = zmq.Context(); sock = context.socket(zmq.DEALER)
sock.setsockopt(zmq.SNDHWM, 2); sock.setsockopt(zmq.LINGER, 0)
monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
sock.connect(sys.argv[1])
blob = b"x" * (30 << 20)            # under the control socket's limit: read and refused
for frame in [blob] * int(sys.argv[2]) + [b"x" * (40 << 20)]:  # over it: dropped
    if not sock.poll(30_000, zmq.POLLOUT):
        sys.exit("the supervisor took no more frames for 30 s")
    sock.send(frame, zmq.NOBLOCK)
print("dropped" if monitor.poll(30_000) else "kept", flush=True)
"""


def test_strangers_flooding_large_frames_leave_the_supervisor_bounded() -> None:
    """Two strangers send 30 MiB frames to the control socket as fast as it takes
    them, then one of 40 MiB: each connection holds at most BOUND_RCVHWM + 1
    frames, the one over the limit drops its connection, the run goes on, and
    what the frames took is given back (no reference cycle keeps them)."""
    # glibc raises its mmap threshold to the size of the first big block freed:
    # later 30 MiB frames come from ZeroMQ's I/O thread's arena, whose free top (up
    # to twice that) malloc_trim cannot give back: the allocator's cache, not frames
    # anyone holds. A fixed threshold maps each big block alone (and unmaps it when
    # freed), so the RSS below is what the process holds.
    ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    text = ring3(ticks=1500)
    baseline = run(text)
    floods: list[subprocess.Popen] = []
    rss: dict[str, int] = {}
    sampling = threading.Event()

    def sample() -> None:
        process = psutil.Process()
        while not sampling.wait(0.01):
            rss["peak"] = max(rss.get("peak", 0), process.memory_info().rss)

    sampler = threading.Thread(target=sample)

    def on_ready(sup: supervisor.Supervisor) -> None:
        rss["before"] = psutil.Process().memory_info().rss
        sampler.start()
        floods.extend(subprocess.Popen([sys.executable, "-c", FLOOD, sup.control_address,
                                        "12"], stdout=subprocess.PIPE, text=True)
                      for _ in range(2))

    def on_tick(done: int, total: int) -> None:
        # once both floods ended: the least the supervisor held for the rest of the run
        # (a dropped connection's frames are let go by ZeroMQ's I/O thread a little later)
        if floods and all(flood.poll() is not None for flood in floods):
            now = psutil.Process().memory_info().rss
            rss["after"] = min(rss.get("after", now), now)

    try:
        result = run(text, on_ready=on_ready, on_tick=on_tick, window=1)
    finally:
        sampling.set()
        if sampler.is_alive():
            sampler.join(10)
        said = [flood.communicate(timeout=60)[0].strip() for flood in floods]
    assert result.digest == baseline.digest
    assert said == ["dropped", "dropped"]
    assert "after" in rss, "the floods outlasted the run: make it longer"
    assert result.rejected_frames >= 2
    mib = 1 << 20
    peak, kept = (rss["peak"] - rss["before"]) // mib, (rss["after"] - rss["before"]) // mib
    assert peak < 2 * (BOUND_RCVHWM + 1) * 32 + 128, f"the supervisor grew by {peak} MiB"
    assert kept < 30, f"the supervisor kept {kept} MiB after the floods (a frame is 30)"


# -- heartbeats: how much loss a link may show -----------------------------------------------


def test_the_heartbeat_timeout_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HEARTBEAT_ENV, "2500")
    context = Context(KeyPair.generate(), owner="test")
    try:
        out, _ = context.data_dealer("tcp://127.0.0.1:9", KeyPair.generate().public)
        assert out.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 2500
        assert out.getsockopt(zmq.HEARTBEAT_TTL) == 2500
    finally:
        context.close(linger=0)
    assert orphan_grace() == pytest.approx(ORPHAN_GRACE_S + 2.5)
    monkeypatch.delenv(HEARTBEAT_ENV)
    assert heartbeat_timeout_ms() == HEARTBEAT_TIMEOUT_MS


@pytest.mark.parametrize("value", ["soon", "50", "-400", "1e9"])
def test_a_bad_heartbeat_timeout_is_a_clear_error(value: str, cli_env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-m", "hiocluster", "run",
                           str(REPO / "topologies" / "ring.toml"), "--transport", "tcp"],
                          capture_output=True, text=True, timeout=60,
                          env={**cli_env, HEARTBEAT_ENV: value})
    assert done.returncode != 0
    assert f"${HEARTBEAT_ENV} must be a whole number of milliseconds" in done.stderr
    assert repr(value) in done.stderr and "Traceback" not in done.stderr
