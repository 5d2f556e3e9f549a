"""Workers as Slurm job steps: ``hiocluster run --launcher slurm`` inside an
allocation (``salloc``, ``sbatch``), and the batch script ``hiocluster sbatch``
writes.

Every worker is one ``srun`` job step of one task on the Slurm node the
placement gives it (the allocation's task slots, node by node, in order), as
``mpiexec`` under Slurm or Dask-jobqueue start theirs. One step per worker, not
one step of P tasks: a step's exit status is its worker's own, so a worker that
dies is named with its node, and a run that restarts from a checkpoint starts
steps again without giving the allocation back. Each worker binds its data
socket on its node's address (``scontrol``'s NodeAddr) and connects to the
supervisor over tcp with CurveZMQ; its credentials (its key pair, the run's
token) go in the step's environment, which srun hands to the task: never on a
command line, never in a file.

What this module asks Slurm is asked with its own tools (``scontrol show
hostnames`` expands a node list; ``scontrol show node`` gives addresses), never
parsed by hand beyond their documented output.

A host of a run may also be a node of the allocation (``[hosts.NAME] agent =
"slurm://NODE"``): its agent is started as a job step there (:class:`SlurmAgent`),
as an ``ssh://`` host's is over SSH, and starts that host's workers or service
replicas.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from hiocluster.errors import LaunchError, describe_exitcode
from hiocluster.hosts.started import StartedAgent
from hiocluster.runtime.launch import LocalProcess, spawn, worker_argv
from hiocluster.runtime.transport import CREDENTIALS_ENV, Credentials, facing

__all__ = ["Allocation", "SlurmAgent", "SlurmLauncher", "SlurmStep", "tasks_per_node", "node_addresses",
           "place", "where", "sbatch_script", "STEP_PREFIX"]

SRUN, SCONTROL, SQUEUE, SCANCEL = "srun", "scontrol", "squeue", "scancel"
#: A worker's step is named STEP_PREFIX + its name (``squeue -s`` shows it).
STEP_PREFIX = "hiocluster-"
#: Seconds a Slurm command may take before the launcher gives up on it.
COMMAND_TIMEOUT = 30.0
_TASKS = re.compile(r"(\d+)(?:\(x(\d+)\))?")


def tasks_per_node(text: str, nodes: int) -> list[int]:
    """``$SLURM_TASKS_PER_NODE`` (``"2(x3),1"``) as one count per node; empty: one
    task on each of ``nodes``. Raises LaunchError."""
    if not text.strip():
        return [1] * nodes
    counts: list[int] = []
    for part in text.split(","):
        found = _TASKS.fullmatch(part.strip())
        if found is None:
            raise LaunchError(f"$SLURM_TASKS_PER_NODE is {text!r}, not Slurm's "
                              "'N(xM),N' form")
        counts += [int(found[1])] * int(found[2] or 1)
    if len(counts) != nodes:
        raise LaunchError(f"$SLURM_TASKS_PER_NODE ({text!r}) counts {len(counts)} nodes; "
                          f"the allocation has {nodes}")
    return counts


def node_addresses(text: str) -> dict[str, str]:
    """Node name -> the address it is reached at, from ``scontrol show node -o``
    (one node per line: ``NodeName=a1 ... NodeAddr=198.18.0.2 ...``)."""
    found = {}
    for line in text.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if fields.get("NodeName"):
            found[fields["NodeName"]] = fields.get("NodeAddr") or fields["NodeName"]
    return found


def place(workers: Sequence[str], nodes: Sequence[str], tasks: Sequence[int]) -> dict[str, str]:
    """Worker -> Slurm node: the allocation's task slots node by node, in order;
    workers beyond its tasks go round the nodes again (oversubscribed)."""
    slots = [node for node, count in zip(nodes, tasks) for _ in range(count)]
    return {worker: slots[k] if k < len(slots) else nodes[(k - len(slots)) % len(nodes)]
            for k, worker in enumerate(workers)}


def _not_found(command: str) -> LaunchError:
    return LaunchError(f"{command} not found: --launcher slurm and slurm:// hosts need "
                       "Slurm's commands on the PATH")


def _slurm(*argv: str) -> str:
    """Run a Slurm command; its stdout. Raises LaunchError naming it."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise _not_found(argv[0]) from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{shlex.join(argv)} did not answer in {COMMAND_TIMEOUT:g} s") \
            from None
    if done.returncode != 0:
        raise LaunchError(f"{shlex.join(argv)} failed ({describe_exitcode(done.returncode)}): "
                          f"{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Allocation:
    """The Slurm allocation this process runs in: its job, nodes (in order), tasks
    per node, each node's address, and the node this process is on (None: not one
    of them, as under ``salloc`` on a login node)."""

    job: str
    nodes: tuple[str, ...]
    tasks: tuple[int, ...]
    addresses: Mapping[str, str]
    here: str | None = None

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None, *,
                         what: str = "--launcher slurm") -> Allocation:
        """The allocation of ``$SLURM_JOB_ID``. Raises LaunchError outside one,
        naming ``what`` needs it."""
        env = os.environ if env is None else env
        job = env.get("SLURM_JOB_ID", "")
        if not job:
            raise LaunchError(f"{what} runs inside a Slurm allocation (salloc or "
                              "sbatch; see `hiocluster sbatch`): $SLURM_JOB_ID is not set")
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        if not nodelist:
            raise LaunchError(f"Slurm job {job}: $SLURM_JOB_NODELIST is not set")
        nodes = tuple(_slurm(SCONTROL, "show", "hostnames", nodelist).split())
        if not nodes:
            raise LaunchError(f"Slurm job {job}: its node list {nodelist!r} names no node")
        tasks = tuple(tasks_per_node(env.get("SLURM_TASKS_PER_NODE", ""), len(nodes)))
        addresses = node_addresses(_slurm(SCONTROL, "show", "node", "-o", nodelist))
        here = env.get("SLURMD_NODENAME") or None
        return cls(job, nodes, tasks, addresses, here if here in nodes else None)

    @property
    def ntasks(self) -> int:
        return sum(self.tasks)

    def address(self, node: str) -> str:
        return self.addresses.get(node, node)

    def supervisor_address(self) -> str:
        """Where the workers reach the supervisor: this node's address when it is in
        the allocation, else this host's address on the route to its first node."""
        if self.here is not None:
            return self.address(self.here)
        return facing(f"tcp://{self.address(self.nodes[0])}:9")


def where(allocation: Allocation, worker: str, node: str) -> str:
    """Where worker ``worker``'s step runs, in words (said with its failures)."""
    return f"on Slurm node {node} (job {allocation.job}, step {STEP_PREFIX}{worker})"


class SlurmStep:
    """One worker's job step (see :class:`hiocluster.runtime.launch.ProcessHandle`):
    its ``srun`` is a child of this process; a failure names the worker's node."""

    def __init__(self, process: LocalProcess, job: str, worker: str, node: str) -> None:
        self.process, self.job, self.worker, self.node = process, job, worker, node
        self.pid: int | None = process.pid
        self.sentinel: int | None = process.sentinel

    def exitcode(self) -> int | None:
        return self.process.exitcode()

    def why(self) -> str | None:
        """srun says a task killed by a signal as exit code 128 + the signal: name
        the signal (other codes are the task's own, as the exit code says). Where
        it ran, the supervisor adds to every failure of the worker (:meth:`where`)."""
        code = self.exitcode()
        if code is not None and code > 128 and code - 128 in signal.valid_signals():
            return f"{describe_exitcode(128 - code)} (srun exit code {code})"
        return None

    def last_tick(self) -> int | None:
        return None  # its tick register would be a file on another node

    def terminate(self) -> None:
        self.process.terminate()  # srun cancels its step

    def kill(self) -> None:
        """srun itself stuck: kill it, and cancel its step, which would outlive it."""
        self.process.kill()
        try:
            steps = _slurm(SQUEUE, "-h", "-s", "-j", self.job, "-o", "%i %j")
            for line in steps.splitlines():
                step, _, name = line.strip().partition(" ")
                if name == STEP_PREFIX + self.worker:
                    _slurm(SCANCEL, "--quiet", step)
        except LaunchError:
            pass  # the job is gone already: so is the step

    def lost(self, why: str) -> None:
        """srun is a child of this process: its exit code will come."""

    def close(self) -> None:
        self.process.close()


class SlurmLauncher:
    """Start each worker as a job step of ``allocation`` (see the module docstring).

    Args:
        allocation: where (:meth:`Allocation.from_environment`).
        placement: worker -> Slurm node (:func:`place`).
        connect: the supervisor's control address (tcp).
        credentials: each worker's, put in its step's environment.
        app_dir: passed on (``hiocluster worker --app-dir``).
        command: the program and leading arguments each task runs (default: this
            Python running ``-m hiocluster``: the nodes see the same paths).
    """

    def __init__(self, allocation: Allocation, placement: Mapping[str, str], connect: str,
                 credentials: Callable[[str], Credentials], *, app_dir: str | None = None,
                 command: Sequence[str] | None = None) -> None:
        self.allocation, self.placement = allocation, dict(placement)
        self.connect, self.credentials, self.app_dir = connect, credentials, app_dir
        self.command = list(command or [sys.executable, "-m", "hiocluster"])

    def argv(self, worker: str) -> list[str]:
        """The srun command line that starts ``worker`` (no secret in it)."""
        node = self.placement[worker]
        return [SRUN, f"--jobid={self.allocation.job}", f"--job-name={STEP_PREFIX}{worker}",
                "--ntasks=1", "--nodes=1", f"--nodelist={node}", "--exact",
                "--kill-on-bad-exit=1", "--quiet", *self.command,
                *worker_argv(self.connect, worker, app_dir=self.app_dir,
                             bind=f"tcp://{self.allocation.address(node)}:*")]

    def start(self, worker: str) -> SlurmStep:
        env = dict(os.environ)
        env[CREDENTIALS_ENV] = self.credentials(worker).to_json()
        try:
            process = spawn(self.argv(worker), env)
        except FileNotFoundError:
            raise _not_found(SRUN) from None
        return SlurmStep(process, self.allocation.job, worker, self.placement[worker])


class SlurmAgent(StartedAgent):
    """The agent of host ``name`` (``agent = "slurm://NODE"``), started as a job step
    of one task on Slurm node ``node`` of this process's allocation, listening on
    the node's address (hiocluster.hosts.started says the rest). The step shares
    the node's CPUs with the job's other steps (``--overlap``): its agent starts
    the host's processes inside it. Raises LaunchError outside an allocation, or
    when ``node`` is not one of its nodes."""

    hint = "is the node up, and can it run this Python and app directory?"

    def __init__(self, name: str, node: str, app_dir: str, *,
                 allocation: Allocation | None = None) -> None:
        allocation = allocation or Allocation.from_environment(
            what=f"host {name} (slurm://{node})")
        if node not in allocation.nodes:
            raise LaunchError(f"host {name}: Slurm node {node!r} is not in job "
                              f"{allocation.job}'s allocation "
                              f"({', '.join(allocation.nodes)})")
        super().__init__(name, allocation.address(node), app_dir)
        self.allocation, self.node = allocation, node
        self.step = f"{STEP_PREFIX}agent-{name}"
        self.label = f"srun on Slurm node {node} (job {allocation.job}, step {self.step})"

    def argv(self) -> list[str]:
        """The srun command line (no secret in it: the keys go on its stdin)."""
        return [SRUN, f"--jobid={self.allocation.job}", f"--job-name={self.step}",
                "--ntasks=1", "--nodes=1", f"--nodelist={self.node}", "--overlap",
                "--kill-on-bad-exit=1", "--quiet", *self.agent_argv()]

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        try:
            return super().spawn(argv)
        except FileNotFoundError:
            raise OSError(str(_not_found(SRUN))) from None


def sbatch_script(topology: str, run_args: Sequence[str], *, nodes: int,
                  ntasks_per_node: int, time: str | None = None,
                  partition: str | None = None, job_name: str | None = None,
                  python: str = sys.executable, workdir: str | None = None) -> str:
    """A batch script that runs ``topology`` with ``--launcher slurm`` in its
    allocation: one worker per task (``--processes`` nodes x tasks per node)."""
    name = job_name or STEP_PREFIX + os.path.splitext(os.path.basename(topology))[0]
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --nodes={nodes}",
             f"#SBATCH --ntasks-per-node={ntasks_per_node}",
             "#SBATCH --output=%x-%j.out"]
    if time:
        lines.append(f"#SBATCH --time={time}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    run = [python, "-m", "hiocluster", "run", os.path.abspath(topology), "--launcher", "slurm",
           "--processes", str(nodes * ntasks_per_node), *run_args]
    lines += ["set -euo pipefail", f"cd {shlex.quote(workdir or os.getcwd())}",
              f"exec {shlex.join(run)}", ""]
    return "\n".join(lines)
