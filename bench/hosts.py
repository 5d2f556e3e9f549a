"""Across hosts: ring and PHOLD on three network-namespace hosts beside one host.

Makes three Linux network namespaces joined to this one by veth pairs (needs
root), starts ``hiocluster agent`` in each, and runs topologies/ring.toml and
topologies/phold.toml with their four workers spread over the hosts (tcp +
CurveZMQ, every DATA frame host to host) beside the same four workers on this
host over ipc, and over tcp + CurveZMQ, and the same four workers under groups
nested three deep (root > g1 > g2 > g3, one host, ipc), in the same run. Prints
ticks/s and the ratios; the digests must be equal. (bench/groups.py compares
trees with --window 1 too.)

    sudo python bench/hosts.py [--ticks 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hiocluster.supervision import supervisor  # noqa: E402
from hiocluster.topology import HostSpec, Topology, load  # noqa: E402
from tests.netns import Hosts, skip_reason  # noqa: E402

HOSTS = ("h1", "h2", "h3")
SPREAD = {"h1": ("p1",), "h2": ("p2",), "h3": ("p3",)}   # p0 stays with the supervisor
DEEP = (("g1", ("p0", "g2")), ("g2", ("p1", "g3")), ("g3", ("p2", "p3")))


def measure(topology: Topology, **kwargs: object) -> tuple[float, str, float]:
    """(ticks/s, digest, start-up seconds) of one run."""
    result = supervisor.run(topology, app_dir=str(REPO), handle_signals=False, **kwargs)
    return result.ticks_per_second, result.digest, result.startup_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="best of R interleaved rounds")
    args = parser.parse_args()
    why = skip_reason()
    if why:
        sys.exit(f"bench/hosts.py: {why}")
    print(f"# hiocluster hosts benchmark: {os.cpu_count()} cpus, {args.ticks} ticks, "
          f"best of {args.repeat}; 4 workers, 3 of them on namespace hosts")
    with tempfile.TemporaryDirectory(prefix="hioc-bench-") as folder:
        keys = Path(folder) / "keys"
        subprocess.run([sys.executable, "-m", "hiocluster", "keygen", str(keys), "supervisor",
                        *HOSTS], check=True, capture_output=True)
        with Hosts(len(HOSTS), keys) as hosts:
            logins = {}
            for index, name in enumerate(HOSTS):
                hosts.start_agent(index, name)
                logins[name] = hosts.start_sshd(index, Path(folder))
            os.environ["HIOCLUSTER_SSH_COMMAND"] = (Path(folder) / "ssh").read_text()
            for example in ("ring", "phold"):
                topology = load(REPO / "topologies" / f"{example}.toml").replace(
                    ticks=args.ticks)
                across = topology.replace(hosts=tuple(
                    HostSpec(name, hosts.agent_address(HOSTS.index(name)), workers)
                    for name, workers in SPREAD.items()))
                over_ssh = topology.replace(hosts=tuple(
                    HostSpec(name, f"ssh://{logins[name]}", workers)
                    for name, workers in SPREAD.items()))
                best = {"ipc": 0.0, "tcp": 0.0, "hosts": 0.0, "ssh": 0.0, "nested": 0.0}
                startup = {label: float("inf") for label in best}
                digests = set()
                for _ in range(args.repeat):
                    for label, (subject, extra) in {
                            "ipc": (topology, {}), "tcp": (topology, {"transport": "tcp"}),
                            "hosts": (across, {"keys": str(keys)}),
                            "ssh": (over_ssh, {}),
                            "nested": (topology.replace(groups=DEEP), {})}.items():
                        rate, digest, began = measure(subject, **extra)
                        best[label] = max(best[label], rate)
                        startup[label] = min(startup[label], began)
                        digests.add(digest)
                assert len(digests) == 1, f"{example}: digests differ: {digests}"
                print(f"{example}: one host ipc {best['ipc']:,.0f} t/s, one host tcp+curve "
                      f"{best['tcp']:,.0f} t/s, three hosts tcp+curve {best['hosts']:,.0f} t/s; "
                      f"hosts/ipc {best['hosts'] / best['ipc']:.2f}x, "
                      f"hosts/tcp {best['hosts'] / best['tcp']:.2f}x; nested 3 deep "
                      f"{best['nested']:,.0f} t/s, nested/ipc "
                      f"{best['nested'] / best['ipc']:.2f}x; digest {digests.pop()[:16]}")
                ssh_rate = best["ssh"] / best["hosts"]
                ssh_start = startup["ssh"] / startup["ipc"]
                print(f"{example}: three ssh hosts {best['ssh']:,.0f} t/s, ssh/agents "
                      f"{ssh_rate:.2f}x ({'met' if ssh_rate >= 0.9 else 'MISSED'}: within 10 %);"
                      f" start-up one host {startup['ipc']:.2f} s, agents "
                      f"{startup['hosts']:.2f} s, ssh {startup['ssh']:.2f} s: ssh/local "
                      f"{ssh_start:.2f}x ({'met' if ssh_start <= 3 else 'MISSED'}: <= 3x)")


if __name__ == "__main__":
    main()
