"""The ``hiocluster`` command line: one function per subcommand, in the order
``--help`` lists them, and the option groups they share."""

from __future__ import annotations

import argparse
from typing import TypeAlias

from hiocluster.cli import arguments
from hiocluster.version import __version__

Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

#: The exit codes of the processes that join a run (worker, group).
_JOINED_EXITS = ("Exit codes: 0 stopped cleanly, 1 failed (the supervisor was told why), "
                 "2 usage error, 3 the supervisor vanished, 130/143 SIGINT/SIGTERM.")
#: The exit codes of the control commands that wait until done (scale, restart).
_DONE_EXITS = ("Exit codes: 0 done, 1 refused, 3 not done in time, 4 no run reachable, "
               "2 usage (also: several runs found; name one with --control).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hiocluster",
        description="Run hio Doists across processes in deterministic lockstep, and hio "
                    "servers as supervised replicas on one port.",
        epilog="Exit codes: 0 ok, 1 run failed (also: out of open files, disk space or "
               "a writable run root, named in one line), 2 usage or topology error, "
               "130 interrupted (SIGINT), 143 terminated (SIGTERM); a run of services only "
               "exits 0 when stopped, 1 when a service failed.")
    parser.add_argument("--version", action="version", version=f"hiocluster {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_run, _check, _sweep, _sbatch, _agent, _keygen, _worker, _group, _replica, _report,
                _diff, _replay, _status, _scale, _restart, _reload, _stop):
        add(commands)
    return parser


# -- running a topology ------------------------------------------------------------------


def _run(commands: Commands) -> None:
    run = commands.add_parser(
        "run", help="run a topology: its simulation in lockstep, its services",
        description="Run a topology and print a summary: its nodes in lockstep until the "
                    "last tick, its [services.*] as supervised replicas (until the "
                    "simulation ends; without nodes, until SIGINT, SIGTERM or "
                    "`hiocluster stop`). A run with services prints its control "
                    "address (HIOCLUSTER_CONTROL=...) for `hiocluster status`.")
    run.add_argument("topology", metavar="TOPOLOGY", help="topology file (TOML)")
    _run_options(run)


def _sweep(commands: Commands) -> None:
    sweep = commands.add_parser(
        "sweep", help="many runs of a topology over a grid of params and seeds",
        description="Run a topology once per combination of the --param values and "
                    "--seeds, PARALLEL runs at a time, and print (or write) one table: "
                    "a row per run with its params, seed, digest and time, or the error "
                    "that ended it (a failed run is a row; the sweep goes on).",
        epilog="Exit codes: 0 every run finished, 1 some failed (their rows say why), "
               "2 usage or topology error (nothing ran).")
    sweep.add_argument("topology", metavar="TOPOLOGY", help="topology file (TOML)")
    sweep.add_argument("--param", type=arguments.sweep_param, action="append", default=[],
                       metavar="TABLE.PARAM=V1,V2",
                       help="a param of every node of [nodes.TABLE] (or run.KEY, e.g. "
                            "run.ticks) and its values; repeat for a grid of all "
                            "combinations")
    sweep.add_argument("--seeds", type=arguments.seed_list, default=None, metavar="SEEDS",
                       help="run seeds: 1-10, 1,2,5 or both (default: the file's seed)")
    sweep.add_argument("--parallel", type=arguments.positive_int, default=None, metavar="J",
                       help="runs at a time (default: cores / processes per run)")
    sweep.add_argument("--processes-per-run", type=arguments.positive_int, default=1,
                       metavar="K", help="worker processes of each run (default 1)")
    sweep.add_argument("--output", metavar="FILE", default=None,
                       help="write the table as CSV (params as columns, results as JSON)")
    sweep.add_argument("--json", action="store_true", help="print the table as JSON")
    sweep.add_argument("--quiet", action="store_true", help="no progress lines")
    sweep.add_argument("--app-dir", metavar="DIR", default=None,
                       help="where node classes are imported from (default: cwd)")


def _check(commands: Commands) -> None:
    check = commands.add_parser(
        "check", help="validate a topology without running it",
        description="Validate a topology (and import its node classes) without running "
                    "it; print the plan. It takes every option of `run`, so a run's "
                    "command line checks as it is: those that shape the run (--ticks, "
                    "--seed, --real, --processes, --host, --place, --transport, --listen, "
                    "--keys, --external) are applied and checked as `run` checks them; "
                    "those about output (--json, --digests, --trace, --output, "
                    "--no-prefix, --window) are accepted and unused.",
        epilog="Exit codes: 0 ok, 2 usage or topology error (or an option `run` would "
               "refuse, e.g. --keys DIR without the keys).")
    check.add_argument("topology", metavar="TOPOLOGY", help="topology file (TOML)")
    _run_options(check)


def _run_options(command: argparse.ArgumentParser) -> None:
    """The options of ``run``, which ``check`` takes too: any run's command line
    checks as it is."""
    command.add_argument("--ticks", type=arguments.positive_int, metavar="N",
                         help="number of ticks (default: the file's run.ticks)")
    command.add_argument("--seed", type=arguments.seed, metavar="S",
                         help="run seed (default: the file's run.seed)")
    command.add_argument("--processes", type=arguments.positive_int, metavar="P",
                         help="spread the nodes over P worker processes, without groups "
                              "(default: the file's placement and groups, else one per core; "
                              "1 puts every node in one)")
    command.add_argument("--window", type=arguments.window, default=None, metavar="N",
                         help="ticks granted at once (default: auto, sized to ~0.1 s of work); "
                              "1 supervises every tick; results never depend on it")
    command.add_argument("--real", action="store_true", default=None,
                         help="pace ticks to the wall clock: tick n starts tock x n seconds "
                              "after the start (default: the file's run.real)")
    command.add_argument("--metrics", metavar="HOST:PORT", default=None,
                         help="serve Prometheus metrics at http://HOST:PORT/metrics (port "
                              "0: any free one, printed; default: the file's run.metrics)")
    _output_options(command)
    _checkpoint_options(command)
    _app_dir(command)
    _transport_options(command)
    command.add_argument("--external", metavar="NAME", action="append", default=[],
                         type=arguments.name,
                         help="do not start worker NAME: wait for it to be started by hand "
                              "(the command to use is printed); repeatable")
    command.add_argument("--no-prefix", action="store_true",
                         help="pass replicas' output through without the 'name | ' prefix")


def _checkpoint_options(command: argparse.ArgumentParser) -> None:
    """Long runs: checkpoints and resuming from one."""
    command.add_argument("--checkpoint", metavar="DIR",
                         help="write a checkpoint into DIR every --checkpoint-every ticks "
                              "(the newest 2 kept), for --resume")
    command.add_argument("--checkpoint-every", type=arguments.positive_int, metavar="N",
                         help="ticks between checkpoints (default 1000; a multiple of the "
                              "file's run.digest_every)")
    command.add_argument("--resume", metavar="DIR",
                         help="start from the newest complete checkpoint in DIR (of this "
                              "topology; at any --processes, --window or host placement): "
                              "the run ends as the uninterrupted one would")
    command.add_argument("--record", metavar="DIR",
                         help="every worker records the DATA frames it receives and its "
                              "digests into DIR, to replay one alone later (`hiocluster "
                              "replay DIR --worker NAME`)")


def _output_options(command: argparse.ArgumentParser) -> None:
    """What a run writes besides its summary."""
    command.add_argument("--json", action="store_true",
                         help="print one JSON object on stdout instead of the summary "
                              "(arrays in results as {dtype, shape, data}, bytes as hex)")
    command.add_argument("--quiet", action="store_true",
                         help="no progress on stderr (a bar on a terminal; else a line "
                              "every $HIOCLUSTER_PROGRESS_S seconds, default 5)")
    command.add_argument("--digests", nargs="?", const=True, default=False, metavar="FILE",
                         help="also print every tick's run digest (after the summary, or as "
                              "tick_digests with --json); with FILE, write every node's "
                              "digest after every digested tick there instead (for "
                              "`hiocluster diff`; also for a run that fails or is "
                              "interrupted)")
    command.add_argument("--trace", metavar="FILE",
                         help="record where each tick's time goes and write it to FILE as "
                              "Chrome Trace Event JSON (Perfetto, chrome://tracing); the "
                              "summary names the slowest process and node")
    command.add_argument("--output", metavar="FILE",
                         help="after a finished run, write one JSON line per node to FILE: "
                              "its result() and its metrics (JSON as --json's)")
    command.add_argument("--observe", metavar="FILE",
                         help="stream what the nodes' observe() say to FILE as the run "
                              "goes, a row per tick, node and name (tick,node,name,value): "
                              "CSV, or Parquet for *.parquet (needs pyarrow; converted at "
                              "the end); also for a run that fails: up to its last window")


def _transport_options(command: argparse.ArgumentParser) -> None:
    """How a run's processes reach each other, on this host and across hosts."""
    command.add_argument("--transport", choices=("ipc", "tcp", "local"), default=None,
                         help="how local processes talk: ZeroMQ over unix sockets (ipc, "
                              "the default) or TCP on 127.0.0.1 (tcp), or local: ZeroMQ "
                              "for control and plain unix SEQPACKET sockets for DATA "
                              "(faster; every worker on this host, no --host/--keys); "
                              "default: the file's run.transport, else ipc; results are "
                              "identical")
    command.add_argument("--listen", metavar="ADDRESS", type=arguments.address,
                         help="bind the control socket here (e.g. tcp://127.0.0.1:7000), for "
                              "workers started by hand")
    command.add_argument("--keys", metavar="DIR",
                         help="CurveZMQ keys for a run across hosts: DIR/supervisor.key_secret "
                              "and DIR/<host>.key for each host (see keygen)")
    command.add_argument("--host", metavar="NAME=ADDRESS", action="append", default=[],
                         type=arguments.host,
                         help="a host and its agent, e.g. h1=tcp://h1:7100, or a host whose "
                              "agent the run starts over SSH, e.g. h1=ssh://me@h1, or as a "
                              "Slurm job step on a node of its allocation, e.g. "
                              "h1=slurm://node7 (instead of the file's [hosts]); "
                              "repeatable")
    command.add_argument("--place", metavar="WORKER=HOST", action="append", default=[],
                         type=arguments.place,
                         help="run WORKER on HOST (a --host); repeatable")
    command.add_argument("--launcher", choices=("local", "slurm"), default="local",
                         help="who starts the workers: this host and the agents of its "
                              "hosts (local, the default), or Slurm: inside an allocation "
                              "(salloc, sbatch), each worker a job step on one of its "
                              "nodes, over tcp with CurveZMQ; default --processes: its "
                              "tasks")


def _app_dir(command: argparse.ArgumentParser) -> None:
    command.add_argument("--app-dir", metavar="DIR",
                         help="directory to import node classes from (default: current "
                              "directory)")


# -- across hosts ------------------------------------------------------------------------


def _agent(commands: Commands) -> None:
    agent = commands.add_parser(
        "agent", help="start workers on this host for supervisors elsewhere",
        description="Run until SIGINT or SIGTERM, starting workers on this host for "
                    "supervisors whose topology places workers here. Every connection is "
                    "CurveZMQ: the agent's key pair is DIR/NAME.key_secret; it admits only "
                    "the supervisors whose public keys it is told to --trust (never another "
                    "agent's key: any key it admits can make it run code).",
        epilog="Exit codes: 0, 130/143 after SIGINT/SIGTERM (every worker stopped), 1 when "
               "it cannot start (a key or the address).")
    agent.add_argument("--listen", required=True, metavar="ADDRESS", type=arguments.tcp,
                       help="where supervisors reach this agent: tcp://HOST:PORT (port 0: "
                            "a free one, said in its 'listening on' line)")
    agent.add_argument("--keys", required=True, metavar="DIR",
                       help="the keys directory; '-': this agent's key pair and the "
                            "supervisor's public key come as one JSON line on stdin, and "
                            "the agent stops when stdin ends (how a supervisor starts the "
                            "agent of an ssh:// or slurm:// host)")
    agent.add_argument("--name", required=True, metavar="NAME", type=arguments.name,
                       help="this host's name in topologies (its key pair: NAME.key_secret)")
    agent.add_argument("--trust", metavar="KEY", action="append", default=[],
                       help="a supervisor's public key file to accept LAUNCH from (relative "
                            "to DIR, e.g. supervisor.key); repeatable; needed unless "
                            "--keys -")
    agent.add_argument("--advertise", metavar="HOST",
                       help="the address workers here bind and neighbours reach (default: "
                            "the host of --listen)")
    _app_dir(agent)


def _keygen(commands: Commands) -> None:
    keygen = commands.add_parser(
        "keygen", help="make CurveZMQ key pairs for supervisors and agents",
        description="Make one CurveZMQ key pair per NAME in DIR: NAME.key (the public "
                    "key, to give to the other side) and NAME.key_secret (mode 0600, to "
                    "keep). Existing keys are never overwritten.")
    keygen.add_argument("directory", metavar="DIR", help="where to write the keys")
    keygen.add_argument("--skip-existing", action="store_true",
                        help="leave names that have a key pair already (instead of failing)")
    keygen.add_argument("names", metavar="NAME", nargs="+", type=arguments.name,
                        help="who the key pair is for: 'supervisor', or a host's name")


# -- the processes a run starts ----------------------------------------------------------


def _worker(commands: Commands) -> None:
    worker = commands.add_parser(
        "worker", help="join a run as one of its workers",
        description="Join a run as one of its workers: connect to the supervisor, get "
                    "nodes and links from it, run ticks until it says stop. Its credentials "
                    "(the run's token and, over tcp, its CURVE keys) are read from "
                    "--credentials FILE (the supervisor writes it for a worker started "
                    "with `run --external`) or $HIOCLUSTER_CREDENTIALS.",
        epilog=_JOINED_EXITS)
    _joining(worker, "worker", "this worker's name in the run's plan (e.g. p1)",
             "where neighbours send DATA (default: beside the control socket)")


def _group(commands: Commands) -> None:
    group = commands.add_parser(
        "group", help="join a run as a sub-supervisor (started by its supervisor)",
        description="Join a run as one of its groups: start the workers and groups under "
                    "it (--tree), speak for them to its supervisor, stop them when it says "
                    "stop. Supervisors and agents start groups themselves; credentials as "
                    "for `worker`.",
        epilog=_JOINED_EXITS)
    group.add_argument("--tree", required=True, metavar="FILE",
                       help="JSON: each child -> its node names (a worker) or its own tree "
                            "(a group)")
    _joining(group, "group", "this group's name in the run's plan",
             "where the workers under it bind for DATA (default: beside its control socket)")


def _joining(command: argparse.ArgumentParser, what: str, name_help: str,
             bind_help: str) -> None:
    """The options of a process that joins a run: ``worker`` and ``group``."""
    command.add_argument("--connect", required=True, metavar="ADDRESS", type=arguments.address,
                         help="the supervisor's control address (ipc://... or tcp://...)")
    command.add_argument("--name", required=True, metavar="NAME", type=arguments.name,
                         help=name_help)
    command.add_argument("--credentials", metavar="FILE",
                         help=f"file holding this {what}'s credentials (JSON)")
    command.add_argument("--bind", metavar="ADDRESS", type=arguments.address, help=bind_help)
    command.add_argument("--data", choices=("zmq", "local"), default="zmq",
                         help="how DATA travels between workers: ZeroMQ (default), or "
                              "local: unix SEQPACKET sockets (the run's --transport local; "
                              "the default --bind is then unix://<dir of control>/d-NAME)")
    _app_dir(command)
    command.add_argument("--run-dir", metavar="DIR", help=argparse.SUPPRESS)
    command.add_argument("--tick-file", metavar="FILE", help=argparse.SUPPRESS)


def _replica(commands: Commands) -> None:
    replica = commands.add_parser(
        "replica", help="serve as one replica of a service (started by hiocluster run)",
        description="Serve as one replica of a service: the service's spec and the run's "
                    "token come in $HIOCLUSTER_SERVICE and $HIOCLUSTER_CREDENTIALS; "
                    "`hiocluster run` starts replicas itself.",
        epilog="Exit codes: 0 stopped cleanly, 1 cannot serve, 2 usage error, 3 the "
               "supervisor vanished.")
    replica.add_argument("--connect", required=True, metavar="ADDRESS", type=arguments.address,
                         help="the run's services socket")
    replica.add_argument("--name", required=True, metavar="SERVICE.REPLICA.INCARNATION",
                         help="which replica this is")
    _app_dir(replica)


# -- after a run -------------------------------------------------------------------------


def _sbatch(commands: Commands) -> None:
    sbatch = commands.add_parser(
        "sbatch", help="a Slurm batch script that runs a topology (--submit: submit it)",
        usage="hiocluster sbatch TOPOLOGY [--nodes N] [--ntasks-per-node K] [--time TIME] "
              "[--partition NAME] [--job-name NAME] [--submit] [-- RUN_OPTION ...]",
        description="Print a Slurm batch script that runs TOPOLOGY with `hiocluster run "
                    "--launcher slurm` in its allocation: one worker per task, each a "
                    "job step on its node; or submit it with `sbatch` (--submit). Options "
                    "of `run` go after `--`, and are checked now.",
        epilog="Example: hiocluster sbatch topologies/phold.toml --nodes 2 "
               "--ntasks-per-node 8 --time 1:00:00 -- --ticks 100000 --checkpoint ckpt")
    sbatch.add_argument("topology", metavar="TOPOLOGY", help="topology file (TOML)")
    sbatch.add_argument("--nodes", type=arguments.positive_int, default=1, metavar="N",
                        help="nodes to allocate (default 1)")
    sbatch.add_argument("--ntasks-per-node", type=arguments.positive_int, default=1,
                        metavar="K", help="workers on each node (default 1)")
    sbatch.add_argument("--time", metavar="TIME", help="the job's time limit (sbatch --time)")
    sbatch.add_argument("--partition", metavar="NAME", help="the partition (sbatch --partition)")
    sbatch.add_argument("--job-name", metavar="NAME",
                        help="the job's name (default: hiocluster-<topology>)")
    sbatch.add_argument("--submit", action="store_true",
                        help="submit the script with sbatch; print its job id")


def _report(commands: Commands) -> None:
    report = commands.add_parser(
        "report", help="summarise a trace written by run --trace",
        description="Print where a traced run's ticks went (per process: tick time p50 "
                    "and p99, time waiting for neighbours; the slowest process and "
                    "node) and, with --png, draw ticks/s over time and each process's "
                    "time running vs waiting (needs matplotlib).")
    report.add_argument("trace", metavar="TRACE", help="a file written by run --trace")
    report.add_argument("--png", metavar="FILE", help="also write this picture")


def _diff(commands: Commands) -> None:
    diff = commands.add_parser(
        "diff", help="where two runs first differ (their --digests files or --record dirs)",
        description="Compare two digest files written by `run --digests FILE`, or two "
                    "record directories (`run --record DIR`), and print the first "
                    "digested tick at which the runs' states differ, and the nodes whose "
                    "states differ there; or two checkpoint directories (`run "
                    "--checkpoint DIR`): their newest common tick, node by node.",
        epilog="Exit codes: 0 equal, 1 they differ (a tick, other nodes, or one run "
               "ends first), 2 usage error or a file that is not a digest file.")
    diff.add_argument("a", metavar="A",
                      help="a digest file, a record directory or a checkpoint directory")
    diff.add_argument("b", metavar="B", help="another (of the same kind)")


def _replay(commands: Commands) -> None:
    replay = commands.add_parser(
        "replay", help="re-run one worker of a recorded run alone, checking every digest",
        description="Re-run one worker of a run recorded with `run --record DIR` in this "
                    "process, without any other process or socket: its nodes get the "
                    "DATA frames it received, tick by tick, and every digested state is "
                    "compared with the recorded one.",
        epilog="Exit codes: 0 every digest as recorded, 1 a state differs (its tick and "
               "nodes named), 2 usage error or a record that cannot be read.")
    replay.add_argument("record", metavar="DIR", help="the directory of run --record DIR")
    replay.add_argument("--worker", required=True, type=arguments.name, metavar="NAME",
                        help="the worker to replay (e.g. p1)")
    replay.add_argument("--until", type=arguments.non_negative_int, metavar="T",
                        help="stop after tick T")
    replay.add_argument("--from-checkpoint", nargs="?", const="", metavar="DIR",
                        help="start from a checkpoint: the newest in DIR, or in the "
                             "recorded run's --checkpoint directory")
    replay.add_argument("--break-at", type=arguments.non_negative_int, metavar="T",
                        help="stop in pdb inside --node's step() at tick T")
    replay.add_argument("--node", type=arguments.name, metavar="NAME",
                        help="the node --break-at stops in")
    replay.add_argument("--app-dir", metavar="DIR",
                        help="import node classes from DIR (default: the recorded run's)")


# -- controlling a running run (hiocluster.control.client) -------------------------------


def _status(commands: Commands) -> None:
    status = commands.add_parser(
        "status", help="show a running run's services and simulation",
        description="Show a running run: each service's replicas (pid, state, restarts, "
                    "uptime, CPU, memory, requests served) and the simulation's progress.",
        epilog="Exit codes: 0 every replica serving, 3 some are not, 4 no run reachable, "
               "2 usage (also: several runs found; name one with --control).")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    _control(status)


def _scale(commands: Commands) -> None:
    scale = commands.add_parser(
        "scale", help="change a service's number of replicas",
        description="Change a service's number of replicas, without refusing "
                    "connections: new replicas serve beside the others; removed ones "
                    "drain first. Waits until done.",
        epilog=_DONE_EXITS)
    scale.add_argument("target", metavar="NAME=N", type=arguments.scale_target,
                       help="the service and its new number of replicas")
    _control(scale, waits=True)


def _restart(commands: Commands) -> None:
    restart = commands.add_parser(
        "restart", help="rolling restart of a service",
        description="Restart a service's replicas one at a time; each one's successor "
                    "serves before it is stopped. Waits until done.",
        epilog=_DONE_EXITS)
    restart.add_argument("service", metavar="NAME", type=arguments.name, help="the service")
    _control(restart, waits=True)


def _reload(commands: Commands) -> None:
    reload = commands.add_parser(
        "reload", help="new code and settings for every service, without downtime",
        description="What SIGHUP to the run does: read the topology file again and "
                    "restart each service's replicas onto what it says (its settings "
                    "and params; the address stays), one at a time, each a process "
                    "that imports the code anew and serves before its predecessor "
                    "drains; a changed number of replicas is then scaled to (as "
                    "hiocluster scale, which a reload undoes). Waits until done.",
        epilog=_DONE_EXITS)
    _control(reload, waits=True)


def _stop(commands: Commands) -> None:
    stop = commands.add_parser(
        "stop", help="stop a running run",
        description="Stop a running run: replicas drain and exit, a simulation stops. "
                    "Prints 'stopping', then 'stopped' once the run confirms it stopped.",
        epilog="Exit codes: 0 stopped (the run confirmed it), 1 refused, or the run "
               "vanished (e.g. was killed) or failed before confirming its stop, 2 usage "
               "(also: several runs found; name one with --control), 3 not stopped in "
               "time, 4 no run reachable.")
    _control(stop, waits=True)


def _control(command: argparse.ArgumentParser, waits: bool = False) -> None:
    """Where the run is; with ``waits``, how long to wait until it is done."""
    command.add_argument("--control", metavar="ADDRESS", type=arguments.address,
                         help="the run's control endpoint (default: $HIOCLUSTER_CONTROL, "
                              "else the one run found)")
    if waits:
        command.add_argument("--timeout", type=float, default=60.0, metavar="S",
                             help="seconds to wait until done (default 60)")
