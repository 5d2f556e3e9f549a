"""A one-node Slurm cluster of the test's own: munged, slurmctld and slurmd (Debian's
slurm-wlm and munge) started in a directory of its own, on free ports, with a
slurm.conf naming this machine (16 CPUs declared, so a 2-core machine can hold
4-task allocations), and stopped after, with every job cancelled first and no
job step left behind (checked).

Where Slurm cannot start here (not installed, not root), :func:`unavailable`
says why, and the tests skip saying so: never silently.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

TOOLS = ("munged", "slurmctld", "slurmd", "srun", "salloc", "sbatch", "scontrol", "sinfo",
         "squeue", "scancel")
READY_S = 30.0   # for the daemons to start and the node to be idle
STOP_S = 15.0    # for jobs to end and the daemons to stop


def unavailable() -> str | None:
    """Why a Slurm cluster cannot start here (None: it can)."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return (f"Slurm cannot start here: {', '.join(missing)} not installed (apt-get "
                "install slurm-wlm munge; .ci/run does)")
    if os.geteuid() != 0:
        return "Slurm cannot start here: its daemons run as root in these tests"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SlurmCluster:
    """``with SlurmCluster() as cluster``: ``cluster.env`` reaches it (SLURM_CONF);
    ``cluster.run(argv)`` runs a Slurm command against it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hioc-slurm-"))  # short: socket paths
        self.conf = str(self.dir / "slurm.conf")
        # the daemons outlive any one test: they do not carry a test's tag
        self.env = {key: value for key, value in os.environ.items()
                    if key != "HIOCLUSTER_TEST_TAG"}
        self.env["SLURM_CONF"] = self.conf
        self.node = socket.gethostname().split(".")[0]
        self.pids: list[int] = []

    # -- the daemons ---------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        d = self.dir
        (d / "state").mkdir()
        (d / "spool").mkdir()
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._daemon(["munged", "-f", f"--key-file={key}", f"--socket={d / 'munge.sock'}",
                      f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
                      f"--seed-file={d / 'munged.seed'}"], d / "munged.pid")
        (d / "plugstack.conf").write_text("")
        (d / "slurm.conf").write_text(f"""\
ClusterName=hioc{os.getpid()}
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={d / 'munge.sock'}
CredType=cred/munge
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd.log'}
PlugStackConfig={d / 'plugstack.conf'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
KillWait=5
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=16 State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        self._daemon(["slurmctld", "-c"], d / "slurmctld.pid")
        self._daemon(["slurmd", "-c"], d / "slurmd.pid")
        deadline = time.monotonic() + READY_S
        while True:
            state = self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip()
            if state == "idle":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Slurm node is {state or 'not known'} after "
                                   f"{READY_S:g} s; logs in {d}")
            time.sleep(0.1)

    def _daemon(self, argv: list[str], pid_file: Path) -> None:
        """Start a daemon (it forks); its pid from its pid file."""
        subprocess.run(argv, env=self.env, check=True, timeout=READY_S,
                       stdin=subprocess.DEVNULL, capture_output=True)
        deadline = time.monotonic() + READY_S
        while not (pid_file.exists() and pid_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} wrote no pid file in {READY_S:g} s")
            time.sleep(0.05)
        self.pids.append(int(pid_file.read_text().split()[0]))

    def run(self, argv: list[str], *, check: bool = True,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=check, stdin=subprocess.DEVNULL)

    def steps(self) -> list[str]:
        """``JOBID.STEPID NAME`` of every job step running now."""
        out = self.run(["squeue", "-h", "-s", "-o", "%i %j"], check=False).stdout
        return [line.strip() for line in out.splitlines()
                if line.strip() and not line.split()[0].endswith(".batch")]

    def jobs(self) -> list[str]:
        return self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()

    def wait_until_idle(self, seconds: float = STOP_S) -> None:
        """Until no job is left (bounded); raises AssertionError naming them."""
        deadline = time.monotonic() + seconds
        while self.jobs():
            if time.monotonic() > deadline:
                raise AssertionError(f"Slurm jobs left after {seconds:g} s: {self.jobs()}")
            time.sleep(0.1)

    def __exit__(self, *exc_info: object) -> None:
        left: list[str] = []
        try:
            if self.pids:
                jobs = self.jobs()
                if jobs:
                    self.run(["scancel", *jobs], check=False)
                self.wait_until_idle()
        except (AssertionError, subprocess.SubprocessError, OSError) as exc:
            left.append(str(exc))
        for pid in reversed(self.pids):  # slurmd, slurmctld, munged
            _stop(pid)
        steps = [p for p in psutil.process_iter(["name", "cmdline"])
                 if (p.info["name"] or "").startswith("slurmstepd")
                 and str(self.dir) in " ".join(_open_paths(p))]
        for process in steps:
            left.append(f"slurmstepd {process.pid}")
            _stop(process.pid)
        shutil.rmtree(self.dir, ignore_errors=True)
        if left:
            raise AssertionError(f"the Slurm cluster left: {'; '.join(left)}")


def _open_paths(process: psutil.Process) -> list[str]:
    try:
        return [process.cwd(), *(f.path for f in process.open_files())]
    except (psutil.Error, OSError):
        return []


def _stop(pid: int) -> None:
    """SIGTERM, up to STOP_S, then SIGKILL: a daemon of ours, by pid."""
    try:
        process = psutil.Process(pid)
        process.send_signal(signal.SIGTERM)
        process.wait(STOP_S)
    except psutil.TimeoutExpired:
        process.kill()
        process.wait(STOP_S)
    except psutil.NoSuchProcess:
        pass
