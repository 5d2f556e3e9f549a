"""``--launcher slurm`` and ``hiocluster sbatch`` on a real one-node Slurm cluster
(tests/slurm_cluster.py: munged, slurmctld, slurmd of the test's own): ring and
PHOLD under ``salloc -n 4`` give the one-process digests; scancel mid-run fails the
run naming worker, Slurm node and tick, with nothing left; a cancelled step with
``restart = "checkpoint"`` is survived; a submitted batch script runs. The sans-IO
parts (task counts, node addresses, placement, the script, the srun line) without
Slurm."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, hiocluster_command

from hiocluster.hosts.slurm import (
    Allocation,
    SlurmLauncher,
    node_addresses,
    place,
    sbatch_script,
    tasks_per_node,
)
from hiocluster.errors import LaunchError
from hiocluster.runtime.transport import Credentials
from tests.slurm_cluster import SlurmCluster, unavailable
from tests.waiting import until_checkpointed, wait_until

TIMEOUT = 120


@pytest.fixture(scope="module")
def slurm():
    why = unavailable()
    if why is not None:
        pytest.skip(why)
    with SlurmCluster() as cluster:
        yield cluster


@pytest.fixture
def slurm_env(slurm, cli_env) -> dict[str, str]:
    """The CLI's environment, reaching the test's Slurm cluster."""
    env = dict(cli_env, SLURM_CONF=slurm.conf)
    for key in [key for key in env if key.startswith("SLURM_") and key != "SLURM_CONF"]:
        del env[key]  # not inside some other allocation
    return env


def salloc(tasks: int, *args: str, name: str = "hioc-test") -> list[str]:
    return ["salloc", f"--ntasks={tasks}", f"--job-name={name}", "--quiet",
            *hiocluster_command(*args)]


def digest_of(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(hiocluster_command("run", *args, "--processes", "1", "--json"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["digest"]


@pytest.mark.parametrize("topology", ["topologies/ring.toml", "topologies/phold.toml"])
def test_a_run_under_salloc_gives_the_one_process_digest(slurm, slurm_env, topology) -> None:
    done = subprocess.run(salloc(4, "run", topology, "--launcher", "slurm",
                                 "--json"),
                          cwd=REPO, env=slurm_env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["processes"] == 4  # a worker per task, unasked
    assert result["digest"] == digest_of(slurm_env, topology)
    slurm.wait_until_idle()


def test_workers_on_a_slurm_host_give_the_one_process_digest(slurm, slurm_env) -> None:
    """``--host n1=slurm://NODE``: the local launcher here, an agent started as a
    job step for the workers placed on n1."""
    done = subprocess.run(salloc(2, "run", "topologies/ring.toml", "--processes", "3",
                                 "--host", f"n1=slurm://{slurm.node}", "--place", "p1=n1",
                                 "--place", "p2=n1", "--json"),
                          cwd=REPO, env=slurm_env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["digest"] == digest_of(slurm_env, "topologies/ring.toml")
    slurm.wait_until_idle()
    assert not slurm.steps()


def test_check_shows_each_workers_slurm_node(slurm, slurm_env) -> None:
    done = subprocess.run(salloc(3, "check", "topologies/ring.toml",
                                 "--launcher", "slurm"),
                          cwd=REPO, env=slurm_env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert f"  p2 on Slurm node {slurm.node}: " in done.stdout
    assert "launcher: slurm: job " in done.stdout and "3 tasks on 1 nodes" in done.stdout
    slurm.wait_until_idle()


def _started(slurm: SlurmCluster, count: int) -> list[str]:
    steps = [line for line in slurm.steps() if line.split()[1].startswith("hiocluster-p")]
    return steps if len(steps) == count else []


def test_scancel_mid_run_fails_it_naming_worker_node_and_tick(slurm, slurm_env,
                                                               tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    code, _, err = until_checkpointed(
        salloc(4, "run", "topologies/phold.toml", "--ticks", "10000000", "--launcher",
               "slurm", "--checkpoint", str(ckpt), "--checkpoint-every", "100",
               name="hioc-cancel"),
        slurm_env, ckpt, lambda: slurm.run(["scancel", "--name=hioc-cancel"]), cwd=REPO)
    assert code == 1, err
    assert "hiocluster: run failed: worker p" in err and " failed at tick " in err, err
    assert f" on Slurm node {slurm.node} (job " in err and ", step hiocluster-p" in err, err
    assert "hiocluster: every worker finished tick " in err, err
    assert "the newest checkpoint is " in err, err
    assert "Traceback" not in err
    slurm.wait_until_idle()
    assert not slurm.steps()


def test_a_cancelled_step_is_survived_by_a_restart_from_the_last_checkpoint(
        slurm, slurm_env, tmp_path) -> None:
    topology = tmp_path / "phold.toml"
    text = (REPO / "topologies" / "phold.toml").read_text()
    topology.write_text(text.replace("[run]\n", '[run]\nrestart = "checkpoint"\n'
                                     "checkpoint_every = 100\n", 1))
    ticks, ckpt = "4000", tmp_path / "ckpt"
    whole = digest_of(slurm_env, str(topology), "--app-dir", str(REPO), "--ticks", ticks)

    def cancel_p2() -> None:
        steps = wait_until(lambda: _started(slurm, 4), timeout=60, what="4 worker steps")
        slurm.run(["scancel", next(line.split()[0] for line in steps
                                   if line.endswith(" hiocluster-p2"))])

    code, out, err = until_checkpointed(
        salloc(4, "run", str(topology), "--app-dir", str(REPO), "--ticks", ticks,
               "--launcher", "slurm", "--json", "--checkpoint", str(ckpt),
               name="hioc-restart"), slurm_env, ckpt, cancel_p2, cwd=REPO)
    assert code == 0, err
    result = json.loads(out)
    assert result["digest"] == whole
    [restart] = result["restarts"]
    assert restart["worker"] == "p2", restart
    slurm.wait_until_idle()


def test_a_submitted_batch_script_runs_the_topology(slurm, slurm_env, tmp_path) -> None:
    done = subprocess.run(hiocluster_command("sbatch", str(REPO / "topologies/ring.toml"),
                                             "--ntasks-per-node", "3", "--submit", "--",
                                             "--app-dir", str(REPO), "--json"),
                          cwd=tmp_path, env=slurm_env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().rpartition(" ")[2]
    assert done.stdout.startswith("submitted batch job ") and job.isdigit(), done.stdout
    slurm.wait_until_idle(TIMEOUT)
    output = tmp_path / f"hiocluster-ring-{job}.out"
    result = json.loads(output.read_text().splitlines()[-1])
    assert result["processes"] == 3
    assert result["digest"] == digest_of(slurm_env, "topologies/ring.toml")


def test_a_service_runs_its_replicas_on_a_slurm_node(slurm, slurm_env, tmp_path) -> None:
    """``agent = "slurm://NODE"``: the host's agent is a job step of the run's
    allocation; its replicas serve there, status names the host, and stopping the
    run ends the step."""
    from tests.test_cluster_services import Run, free_port, get

    port = free_port()
    path = tmp_path / "web.toml"
    path.write_text(f'[hosts.n1]\nagent = "slurm://{slurm.node}"\n\n[services.web]\n'
                    f'class = "nodes.web:Web"\nreplicas = 2\nlisten = "0.0.0.0:{port}"\n'
                    'hosts = ["n1"]\n')
    run = Run(path, slurm_env, wrap=["salloc", "--ntasks=2", "--job-name=hioc-web",
                                     "--quiet"])
    try:
        said = sorted(run.expect(r"web\.(\d) serving on \S+ on host n1 \(pid \d+\)",
                                 timeout=60).group(1) for _ in range(2))
        assert said == ["0", "1"]
        assert [line.split()[1] for line in slurm.steps()] == ["hiocluster-agent-n1"]
        rows = run.status()["services"][0]["replicas"]
        assert sorted(row["host"] for row in rows) == ["n1", "n1"], rows
        assert get(port)[0] == 200
        stop = subprocess.run(hiocluster_command("stop", "--control", run.control),
                              env=slurm_env, capture_output=True, text=True, timeout=TIMEOUT)
        assert stop.returncode == 0, stop.stderr
        assert run.finish(60) == 0, run.log[-20:]
    finally:
        run.close()
    slurm.wait_until_idle()
    assert not slurm.steps()


# -- without Slurm ---------------------------------------------------------------------


def test_outside_an_allocation_it_is_refused_by_name(cli_env) -> None:
    env = {key: value for key, value in cli_env.items() if not key.startswith("SLURM_")}
    for command in ("run", "check"):
        done = subprocess.run(hiocluster_command(command, "topologies/ring.toml",
                                                 "--launcher", "slurm"),
                              cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT)
        assert done.returncode == 2, done
        assert "--launcher slurm runs inside a Slurm allocation" in done.stderr
        assert "$SLURM_JOB_ID is not set" in done.stderr


def test_a_slurm_host_outside_an_allocation_is_refused_by_name(cli_env, tmp_path) -> None:
    env = {key: value for key, value in cli_env.items() if not key.startswith("SLURM_")}
    path = tmp_path / "web.toml"
    path.write_text('[hosts.n1]\nagent = "slurm://node7"\n\n[services.web]\n'
                    'class = "nodes.web:Web"\nlisten = "0.0.0.0:8080"\nhosts = ["n1"]\n')
    for command in ("run", "check"):
        done = subprocess.run(hiocluster_command(command, str(path), "--app-dir", str(REPO)),
                              cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT)
        assert done.returncode == 2, done
        assert "host n1 (slurm://node7) runs inside a Slurm allocation" in done.stderr
        assert "Traceback" not in done.stderr


def test_what_slurm_cannot_run_is_refused_by_name(cli_env) -> None:
    env = dict(cli_env, SLURM_JOB_ID="7", SLURM_JOB_NODELIST="a1", PATH="/nonexistent")
    done = subprocess.run(hiocluster_command("run", "topologies/ring.toml", "--launcher",
                                             "slurm", "--processes", "2"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2 and "scontrol not found" in done.stderr, done.stderr


def test_tasks_per_node_reads_slurms_form() -> None:
    assert tasks_per_node("2(x3),1", 4) == [2, 2, 2, 1]
    assert tasks_per_node("4", 1) == [4]
    assert tasks_per_node("", 3) == [1, 1, 1]
    with pytest.raises(LaunchError, match="not Slurm's"):
        tasks_per_node("2(y3)", 3)
    with pytest.raises(LaunchError, match="counts 2 nodes; the allocation has 3"):
        tasks_per_node("1(x2)", 3)


def test_node_addresses_come_from_scontrols_lines() -> None:
    text = ("NodeName=a1 Arch=x86_64 CoresPerSocket=1 NodeAddr=198.18.0.2 NodeHostName=a1\n"
            "NodeName=a2 Arch=x86_64 NodeHostName=a2\n")
    assert node_addresses(text) == {"a1": "198.18.0.2", "a2": "a2"}


def test_workers_fill_the_task_slots_node_by_node() -> None:
    assert place(["p0", "p1", "p2", "p3"], ["a1", "a2"], [3, 1]) == \
        {"p0": "a1", "p1": "a1", "p2": "a1", "p3": "a2"}
    assert place(["p0", "p1", "p2"], ["a1", "a2"], [1, 1]) == \
        {"p0": "a1", "p1": "a2", "p2": "a1"}  # beyond the tasks: round the nodes again


def test_the_srun_line_holds_no_secret_and_the_script_runs_the_topology() -> None:
    allocation = Allocation("42", ("a1", "a2"), (1, 1), {"a1": "198.18.0.2"})
    credentials = Credentials(b"\x01" * 16, None, None, {})
    launcher = SlurmLauncher(allocation, {"p0": "a1", "p1": "a2"}, "tcp://198.18.0.1:7000",
                             lambda worker: credentials, app_dir="/app")
    argv = launcher.argv("p0")
    assert argv[:8] == ["srun", "--jobid=42", "--job-name=hiocluster-p0", "--ntasks=1",
                        "--nodes=1", "--nodelist=a1", "--exact", "--kill-on-bad-exit=1"]
    assert argv[-8:] == ["--connect", "tcp://198.18.0.1:7000", "--name", "p0", "--bind",
                         "tcp://198.18.0.2:*", "--app-dir", "/app"]
    assert credentials.to_json() not in " ".join(argv) and "01" * 16 not in " ".join(argv)
    assert launcher.argv("p1")[-4:-2] == ["--bind", "tcp://a2:*"]  # no NodeAddr: its name
    script = sbatch_script("t/ring.toml", ["--ticks", "50"], nodes=2, ntasks_per_node=4,
                           time="1:00:00", python="/py", workdir="/w")
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=4\n" in script
    assert "#SBATCH --time=1:00:00\n" in script and "cd /w\n" in script
    assert script.endswith(f"exec /py -m hiocluster run {Path('t/ring.toml').resolve()} "
                           "--launcher slurm --processes 8 --ticks 50\n")


def test_sbatch_checks_the_runs_options_now(cli_env) -> None:
    for extra, words in ((["--", "--tcks", "5"], "unrecognized arguments: --tcks 5"),
                         (["--", "--processes", "3"], "--processes is the script's to set"),
                         (["--nodes", "0"], "--nodes")):
        done = subprocess.run(hiocluster_command("sbatch", "topologies/ring.toml", *extra),
                              cwd=REPO, env=cli_env, capture_output=True, text=True,
                              timeout=TIMEOUT)
        assert done.returncode == 2 and words in done.stderr, done
