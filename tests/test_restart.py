"""``[run] restart = "checkpoint"``: a worker that dies (kill -9), hangs (SIGSTOP past
the tick deadline) or loses its host is survived: every worker goes back to the
last checkpoint, the run goes on and ends with the digests of a run that never
failed; past the intensity it fails as before. Real `hiocluster run` processes;
the policy's rules (sans-IO) and the digest file's rewind without them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import psutil
import pytest
from conftest import REPO, hiocluster_command

from hiocluster.errors import NodeError, ProcessExited, TickTimeout
from hiocluster.supervision.digestfile import DigestFile, DigestWriter
from hiocluster.supervision.restarts import Intensity, Restart, restartable, summary
from hiocluster.topology import loads
from tests.faulty import mesh_toml
from tests.waiting import wait_until

TIMEOUT = 120
CRASHER = "tests.restart_nodes:Crasher"


def topology(path: Path, *, ticks: int = 300, restart: str = "checkpoint",
             max_restarts: int = 3, every: int = 50, params: str = "",
             tick_timeout: float = 30.0, cls: str = CRASHER) -> Path:
    text = mesh_toml(cls, 4, ticks=ticks, seed=11, capacity=8, params=params)
    text = text.replace("[run]\n", f'[run]\nrestart = "{restart}"\nmax_restarts = '
                        f"{max_restarts}\nwithin = 60\ncheckpoint_every = {every}\n"
                        f"tick_timeout = {tick_timeout}\n", 1)
    path.write_text(text)
    return path


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(hiocluster_command(*args), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)


def run_json(env: dict[str, str], path: Path, *flags: str) -> dict:
    done = cli(env, "run", str(path), "--app-dir", str(REPO), "--json", "--digests", *flags)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    result["stderr"] = done.stderr
    return result


def crash(tmp_path: Path, how: str, at: int) -> str:
    return f'victim = 2, at = {at}, how = "{how}", once = "{tmp_path / "crashed"}"'


@pytest.mark.parametrize("how, kind, cause", [("sigkill", "died", "signal SIGKILL"),
                                              ("sigstop", "hung", "")])
def test_a_worker_that_dies_or_hangs_is_restarted_from_the_last_checkpoint(
        cli_env, tmp_path, how, kind, cause) -> None:
    whole = run_json(cli_env, topology(tmp_path / "whole.toml", restart="none"),
                     "--processes", "1")
    path = topology(tmp_path / "crash.toml", params=crash(tmp_path, how, 130),
                    tick_timeout=2.0)
    restarted = run_json(cli_env, path, "--processes", "4", "--checkpoint",
                         str(tmp_path / "ckpt"), "--output", str(tmp_path / "out.jsonl"))
    assert (tmp_path / "crashed").exists()  # it did crash, once
    assert restarted["digest"] == whole["digest"]
    assert restarted["tick_digests"] == whole["tick_digests"]  # every tick's, from tick 0
    assert "resumed_from" not in restarted
    [restart] = restarted["restarts"]
    assert (restart["worker"], restart["kind"], restart["resumed_from"]) == ("p2", kind, 99)
    # a hang is named at the tick the supervisor knew it owed (a window's first)
    assert 99 < restart["tick"] < 150 and cause in restart["cause"], restart
    assert f"hiocluster: p2 {kind} at tick {restart['tick']} (" in restarted["stderr"]
    assert "; restarted from tick 99" in restarted["stderr"]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert {row["status"] for row in rows} == {"finished"} and len(rows) == 4


def test_a_recorded_run_that_restarted_replays_from_where_its_last_try_began(
        cli_env, tmp_path) -> None:
    """Without --checkpoint: the checkpoints are the run's own, removed at its end;
    the one the last try started from stays in the record, for its replay."""
    path = topology(tmp_path / "crash.toml", params=crash(tmp_path, "sigkill", 130))
    record = tmp_path / "rec"
    restarted = run_json(cli_env, path, "--processes", "4", "--record", str(record))
    assert [restart["resumed_from"] for restart in restarted["restarts"]] == [99]
    assert [entry.name for entry in record.iterdir() if entry.is_dir()] == \
        ["restarted-from-tick-000000000099"]
    for worker in ("p0", "p2"):
        done = cli(cli_env, "replay", str(record), "--worker", worker)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"replayed {worker}: ticks 100..299, "), done.stdout


def test_the_summary_says_what_happened_and_the_digest_file_is_whole(cli_env,
                                                                     tmp_path) -> None:
    reference = tmp_path / "whole.dg"
    run_json(cli_env, topology(tmp_path / "whole.toml", restart="none"), "--processes", "1",
             "--digests", str(reference))
    path = topology(tmp_path / "crash.toml", params=crash(tmp_path, "sigkill", 20))
    written = tmp_path / "restarted.dg"
    done = cli(cli_env, "run", str(path), "--app-dir", str(REPO), "--processes", "4",
               "--digests", str(written))  # no --checkpoint: checkpoints of its own
    assert done.returncode == 0, done.stderr
    # the crash came before the first checkpoint: from the start
    assert "restarts p2 died at tick 20 (signal SIGKILL); restarted from the start; " \
        "1 restart" in done.stdout
    same = cli(cli_env, "diff", str(reference), str(written))
    assert same.returncode == 0 and "to tick 299" in same.stdout, same
    with DigestFile(str(written)) as file:  # each state once, in order
        assert [tick for tick, _ in file.states()] == list(range(-1, 300))


def test_the_observations_file_of_a_restarted_run_is_that_of_a_run_that_never_failed(
        cli_env, tmp_path) -> None:
    """Streamed as the run goes: the rows after the checkpoint are dropped at the
    restart and observed again, those before it kept (every tick's, from 0)."""
    observing = "tests.restart_nodes:ObservingCrasher"
    whole = tmp_path / "whole.csv"
    run_json(cli_env, topology(tmp_path / "whole.toml", restart="none", cls=observing),
             "--processes", "1", "--observe", str(whole))
    path = topology(tmp_path / "crash.toml", params=crash(tmp_path, "sigkill", 130),
                    cls=observing)
    written = tmp_path / "restarted.csv"
    # windows of 10: those of ticks 100..129 were written before p2 died at 130
    restarted = run_json(cli_env, path, "--processes", "4", "--window", "10",
                         "--observe", str(written))
    assert [restart["resumed_from"] for restart in restarted["restarts"]] == [99]
    rows = len(whole.read_text().splitlines()) - 1
    assert rows == 300 * 4 * 2
    assert f"hiocluster: {rows:,} observations in {written}\n" in restarted["stderr"]
    assert written.read_bytes() == whole.read_bytes()


def test_past_the_intensity_the_run_fails_naming_it(cli_env, tmp_path) -> None:
    path = topology(tmp_path / "crash.toml", max_restarts=2,
                    params='victim = 2, at = 120, how = "sigkill"')  # every time
    done = cli(cli_env, "run", str(path), "--app-dir", str(REPO), "--processes", "4",
               "--json")
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("restarted from tick 99") == 2
    error = json.loads(done.stdout)["error"]
    assert (error["type"], error["worker"]) == ("ProcessExited", "p2")
    assert "more than 2 restarts in 60 s ([run] max_restarts, within)" in error["cause"]


def test_without_restarts_a_dead_worker_fails_the_run_saying_how_far_it_got(
        cli_env, tmp_path) -> None:
    path = topology(tmp_path / "crash.toml", restart="none",
                    params=crash(tmp_path, "sigkill", 60))
    out = tmp_path / "out.jsonl"
    done = cli(cli_env, "run", str(path), "--app-dir", str(REPO), "--processes", "4",
               "--checkpoint", str(tmp_path / "ckpt"), "--output", str(out), "--json")
    assert done.returncode == 1 and "worker p2" in done.stderr and "SIGKILL" in done.stderr
    assert "restarted" not in done.stderr
    error = json.loads(done.stdout)["error"]
    reached = error["reached"]
    assert 49 <= reached < error["tick"] == 60, error  # every worker got past the checkpoint
    assert error["checkpoint"] == str(tmp_path / "ckpt" / "tick-000000000049")
    assert f"every worker finished tick {reached} (digest {error['digest']})" in done.stderr
    assert f"`--resume {tmp_path / 'ckpt'}` goes on from there" in done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["node"] for row in rows] == [f"lp{i}" for i in range(4)]
    assert all((row["status"], row["tick"], row["result"]) == ("failed", reached, None)
               for row in rows), rows
    # and the run goes on from the checkpoint it names, to the uninterrupted digest
    whole = run_json(cli_env, topology(tmp_path / "whole.toml", restart="none"),
                     "--processes", "2")
    resumed = run_json(cli_env, path, "--processes", "2", "--resume", str(tmp_path / "ckpt"))
    assert resumed["digest"] == whole["digest"] and resumed["resumed_from"] == 49


@pytest.mark.parametrize("extra, key, words", [
    ('[groups]\ng = ["p0", "p1"]\n[placement]\np0 = ["lp0", "lp1"]\np1 = ["lp2", "lp3"]\n',
     "run.restart", "does not work with groups"),
    ("", "run.restart", "expected one of none, checkpoint, got 'checkpoints'"),
])
def test_what_restarts_cannot_do_is_refused_by_name(cli_env, tmp_path, extra, key,
                                                     words) -> None:
    path = topology(tmp_path / "t.toml", restart="checkpoints" if not extra else
                    "checkpoint")
    path.write_text(path.read_text() + extra)
    done = cli(cli_env, "run", str(path), "--app-dir", str(REPO))
    assert done.returncode == 2 and f"[{key}]" in done.stderr and words in done.stderr, \
        done.stderr


def test_readme_kill_9_of_a_worker_of_a_long_phold_run(cli_env, tmp_path) -> None:
    """README, "Long runs": kill -9 a worker of topologies/phold-long.toml mid-run;
    it finishes with the digest of the run that never failed (shortened here)."""
    long = ["run", "topologies/phold-long.toml", "--ticks", "3000", "--json"]
    whole = json.loads(cli(cli_env, *long, "--processes", "1").stdout)
    ckpt = tmp_path / "ckpt"
    run = subprocess.Popen(hiocluster_command(*long, "--checkpoint", str(ckpt),
                                              "--checkpoint-every", "100"),
                           cwd=REPO, env=cli_env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: any(ckpt.glob("tick-*/manifest.json")) or run.poll() is not None,
                   60, "a complete checkpoint")
        [p1] = [child for child in psutil.Process(run.pid).children()
                if {"worker", "--name", "p1"} <= set(child.cmdline())]
        p1.kill()  # kill -9
        stdout, stderr = run.communicate(timeout=TIMEOUT)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate(timeout=30)
    assert run.returncode == 0, stderr
    result = json.loads(stdout)
    assert result["digest"] == whole["digest"]
    [restart] = result["restarts"]
    assert (restart["worker"], restart["cause"]) == ("p1", "signal SIGKILL")
    assert restart["resumed_from"] >= 99 and restart["resumed_from"] % 100 == 99
    assert f"hiocluster: p1 died at tick {restart['tick']:,} (signal SIGKILL); restarted " \
        f"from tick {restart['resumed_from']:,}" in stderr


# -- sans-IO: the rules, and the digest file's rewind --------------------------------

def test_the_intensity_counts_restarts_within_its_period() -> None:
    intensity = Intensity(2, 10.0)
    assert intensity.allows(0.0) and intensity.allows(1.0)
    assert not intensity.allows(5.0)            # a third within 10 s
    assert intensity.allows(10.5)                # the first is out of the period
    assert not intensity.allows(10.9)
    assert not Intensity(0, 10.0).allows(0.0)    # max_restarts 0: none at all


def test_only_a_worker_that_died_or_hung_while_ticking_is_restartable() -> None:
    def failure(kind, tick):
        extra = {"exitcode": -9} if kind is ProcessExited else {}
        return kind(worker="p1", nodes=["a"], tick=tick, cause="x", **extra)
    assert restartable(failure(ProcessExited, 5)) and restartable(failure(TickTimeout, 5))
    assert not restartable(failure(ProcessExited, None))   # at start-up
    assert not restartable(failure(NodeError, 5))          # doing it again fails again
    assert not restartable(None)


def test_restarts_are_told_in_words() -> None:
    died = Restart("p2", 4120, "signal SIGKILL", 3999, 1.5)
    hung = Restart("p1", 17, "tick deadline", -1, 2.0, hung=True, moved=("beta",))
    assert summary([died.to_json()]) == \
        "p2 died at tick 4,120 (signal SIGKILL); restarted from tick 3,999; 1 restart"
    assert str(hung) == "p1 hung at tick 17 (tick deadline); restarted from the start, " \
        "the workers of host beta on this one"
    assert summary([died.to_json(), hung.to_json()]).endswith("; 2 restarts")


def test_a_digest_file_rewinds_to_a_tick(tmp_path) -> None:
    path = str(tmp_path / "d.dg")
    writer = DigestWriter(path, "t", 10, 2, ["a"])
    record = b"a" + bytes(16)
    for tick in (-1, 1, 3, 5):
        writer(tick, bytes(32), record)
    writer.rewind(3)                      # states after 1 and 3 stay; 5's goes
    for tick in (5, 7, 9):
        writer(tick, bytes([tick]) * 32, record)
    writer.close()
    with DigestFile(path) as file:
        states = list(file.states())
    assert [tick for tick, _ in states] == [-1, 1, 3, 5, 7, 9]
    assert states[3][1][8:40] == bytes([5]) * 32  # the one written again (after its tick)


def test_the_file_says_how_a_run_restarts() -> None:
    parsed = loads('[run]\nrestart = "checkpoint"\nmax_restarts = 5\nwithin = 2.5\n'
                   '[nodes.a]\nclass = "m:C"\n')
    assert (parsed.restart, parsed.max_restarts, parsed.within) == ("checkpoint", 5, 2.5)
    assert loads('[nodes.a]\nclass = "m:C"\n').restart == "none"
