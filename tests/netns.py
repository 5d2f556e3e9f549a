"""Hosts for tests: Linux network namespaces joined by veth pairs to a bridge.

:class:`Hosts` makes ``count`` namespaces, each a host with one address from
198.18.X.0/24 (X picked so that no other interface on this machine has it),
bridged to this (root) namespace at 198.18.X.1, where the test's supervisor
runs; it starts a ``hiocluster agent`` in each, can cut a host's link, and on
close kills the agents and deletes every namespace, veth and the bridge, then
checks that none is left. Needs root and iproute2 (``ip``); :func:`skip_reason`
says why not, where not.

Only addresses from 198.18.0.0/15 are used; nothing leaves the machine.
"""

from __future__ import annotations

import fcntl
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from tests.waiting import wait_until

REPO = Path(__file__).resolve().parent.parent
LOCK = "/tmp/hiocluster-netns.lock"
AGENT_PORT = 7100


def skip_reason() -> str | None:
    """Why namespace tests cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (the ip command)"
    return None


def ip(*args: str, namespace: str | None = None, check: bool = True) -> str:
    argv = ["ip", *(["-n", namespace] if namespace else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


class Hosts:
    """See the module docstring. Use as a context manager."""

    def __init__(self, count: int, keys: Path) -> None:
        self.count, self.keys = count, keys
        self.tag = uuid.uuid4().hex[:6]
        self.bridge = f"hcb{self.tag}"
        self.namespaces = [f"hc{self.tag}{i}" for i in range(count)]
        self.agents: dict[str, subprocess.Popen] = {}
        self.sshds: list[subprocess.Popen] = []
        self.subnet = ""

    # -- set-up ----------------------------------------------------------------------
    def __enter__(self) -> Hosts:
        try:
            with open(LOCK, "w") as lock:  # two tests never take the same subnet
                fcntl.flock(lock, fcntl.LOCK_EX)
                taken = ip("-o", "-4", "addr", "show")
                free = [x for x in range(1, 255) if f" 198.18.{x}." not in taken]
                self.subnet = f"198.18.{random.choice(free)}"
                ip("link", "add", self.bridge, "type", "bridge")
                ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
                ip("link", "set", self.bridge, "up")
            for index, namespace in enumerate(self.namespaces):
                outside, inside = f"hv{self.tag}{index}a", f"hv{self.tag}{index}b"
                ip("netns", "add", namespace)
                ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                ip("link", "set", inside, "netns", namespace)
                ip("link", "set", outside, "master", self.bridge, "up")
                ip("addr", "add", f"{self.address(index)}/24", "dev", inside,
                   namespace=namespace)
                ip("link", "set", inside, "up", namespace=namespace)
                ip("link", "set", "lo", "up", namespace=namespace)
        except BaseException:
            self.close()
            raise
        return self

    def address(self, index: int) -> str:
        return f"{self.subnet}.{10 + index}"

    def agent_address(self, index: int) -> str:
        return f"tcp://{self.address(index)}:{AGENT_PORT}"

    def start_agent(self, index: int, name: str, timeout: float = 30.0,
                    temp: Path | None = None, *, listen: str | None = None,
                    trust: tuple[str, ...] = ("supervisor.key",),
                    env: dict[str, str] | None = None,
                    stderr: int | None = None) -> subprocess.Popen:
        """Start ``hiocluster agent`` as host ``name`` in namespace ``index`` (with
        TMPDIR ``temp`` if given, listening at ``listen`` if given, trusting the
        supervisor keys ``trust``, with ``env`` added to its environment and its
        stderr to ``stderr``); return once it says it listens."""
        env = dict(os.environ, **({"TMPDIR": str(temp)} if temp else {}), **(env or {}))
        argv = ["ip", "netns", "exec", self.namespaces[index], sys.executable, "-m",
                "hiocluster", "agent", "--listen", listen or self.agent_address(index),
                "--keys", str(self.keys), "--name", name, "--app-dir", str(REPO)]
        for key in trust:
            argv += ["--trust", key]
        agent = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr,
                                 text=True, env=env)
        self.agents[name] = agent
        assert agent.stdout is not None
        ready, _, _ = select.select([agent.stdout], [], [], timeout)
        line = agent.stdout.readline() if ready else ""
        if "listening" not in line:
            raise RuntimeError(f"agent {name} did not start: {line!r}")
        return agent

    def start_sshd(self, index: int, directory: Path) -> str:
        """Run OpenSSH's sshd in namespace ``index`` (port 22 on its address; a host key
        and the client's key pair made in ``directory`` on first use; root may log in
        with that key only); return once it takes connections. ``directory/ssh`` is
        the client's ssh command line for it (identity, a known_hosts of its own)."""
        keys = directory / "user_key"
        if not keys.exists():
            for name in ("host_key", "user_key"):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                                str(directory / name)], check=True, timeout=30)
            (directory / "authorized_keys").write_text((directory / "user_key.pub").read_text())
            (directory / "ssh").write_text(
                f"ssh -i {directory / 'user_key'} -o IdentitiesOnly=yes "
                f"-o UserKnownHostsFile={directory / 'known_hosts'} "
                "-o StrictHostKeyChecking=accept-new -o ConnectTimeout=10 -F none")
        config = directory / f"sshd-{index}.conf"
        config.write_text(f"""Port 22
ListenAddress {self.address(index)}
HostKey {directory / 'host_key'}
PidFile {directory / f'sshd-{index}.pid'}
AuthorizedKeysFile {directory / 'authorized_keys'}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
ClientAliveInterval 1
ClientAliveCountMax 3
""")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # its privilege separation
        sshd = subprocess.Popen(["ip", "netns", "exec", self.namespaces[index],
                                 "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.sshds.append(sshd)

        def listening() -> bool:
            if sshd.poll() is not None:
                raise RuntimeError(f"sshd in {self.namespaces[index]} exited: "
                                   f"{sshd.stderr.read() if sshd.stderr else ''}")
            return f"{self.address(index)}:22 " in subprocess.run(
                ["ip", "netns", "exec", self.namespaces[index], "ss", "-ltnH"],
                capture_output=True, text=True, timeout=30).stdout
        wait_until(listening, 30, f"sshd on {self.address(index)}:22")
        return f"root@{self.address(index)}"

    def cut(self, index: int) -> None:
        """Take host ``index``'s link down (``ip link set ... down``)."""
        ip("link", "set", f"hv{self.tag}{index}a", "down")

    # -- tear-down ---------------------------------------------------------------------
    def close(self) -> None:
        for agent in self.agents.values():
            if agent.poll() is None:
                agent.send_signal(signal.SIGCONT)  # a test may have stopped it
                agent.terminate()
        codes = {}
        for name, agent in self.agents.items():
            try:
                codes[name] = agent.wait(timeout=15)
            except subprocess.TimeoutExpired:
                agent.kill()
                codes[name] = agent.wait()
            if agent.stdout is not None:
                agent.stdout.close()
        stray = []
        for sshd in self.sshds:  # then whatever its sessions left in the namespaces
            sshd.terminate()
            try:
                sshd.wait(timeout=15)
            except subprocess.TimeoutExpired:
                sshd.kill()
                sshd.wait()
            if sshd.stderr is not None:
                sshd.stderr.close()
        def running() -> dict[int, str]:
            return {int(pid): f"{namespace}: {_command_line(int(pid))}"
                    for namespace in self.namespaces
                    for pid in ip("netns", "pids", namespace, check=False).split()}

        # an ssh session of a cut link ends when sshd gives its client up (about 3 s);
        # anything else still there (an agent, a worker) is a leak
        try:
            wait_until(lambda: not running(), 15, "the namespaces' processes to end")
        except AssertionError:
            pass
        for pid, line in running().items():
            if "sshd: " not in line:
                stray.append(line)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for namespace in self.namespaces:
            ip("netns", "del", namespace, check=False)
        ip("link", "del", self.bridge, check=False)
        wait_until(lambda: not self.leftovers(), 30,
                   f"the network namespaces and links {self.namespaces + [self.bridge]} to go")
        bad = {name: code for name, code in codes.items() if code != 128 + signal.SIGTERM}
        assert not bad, f"agents that did not stop cleanly on SIGTERM: {bad}"
        assert not stray, f"processes left in the namespaces: {stray}"

    def leftovers(self) -> list[str]:
        names = ip("netns", "list", check=False)
        links = ip("-o", "link", "show", check=False)
        return [name for name in [*self.namespaces, self.bridge]
                if name in names or f" {name}:" in links or f" {name}@" in links]

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return f"pid {pid}"
