"""An interrupted run keeps its results so far (issue "resumable runs", item 4).

SIGINT or SIGTERM to a running `hiocluster run`: the window in flight ends, every
worker stops after the same tick T, and --output holds each node's result at T,
marked interrupted: the same results, and the same digests, as a run of exactly
T + 1 ticks. Real processes; the signal is sent once the run has digested some
ticks (read from its --digests file, waited for in seconds)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, hiocluster_command
from hiocluster.supervision.digestfile import DigestFile
from tests.waiting import wait_until

HEAT = str(REPO / "topologies" / "heat.toml")
TIMEOUT = 90


def _states(path: Path) -> int:
    try:
        with DigestFile(str(path)) as file:
            return sum(1 for _ in file.states())
    except Exception:  # not written yet (or its header only half)
        return 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_keeps_the_results_so_far_at_one_tick(cli_env, tmp_path, signum) -> None:
    output, digests = tmp_path / "heat.jsonl", tmp_path / "heat.dg"
    run = subprocess.Popen(hiocluster_command(
        "run", HEAT, "--app-dir", str(REPO), "--processes", "2", "--ticks", "10000000",
        "--output", str(output), "--digests", str(digests)),
        cwd=REPO, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _states(digests) > 20 or run.poll() is not None, 60,
                   "20 ticks of the heat run digested")
        assert run.poll() is None, run.communicate()
        run.send_signal(signum)
        _, stderr = run.communicate(timeout=TIMEOUT)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 128 + signum, stderr
    said = re.search(r"interrupted by (\w+) after tick ([\d,]+) \(([\d,]+) of "
                     r"10,000,000 ticks, digest (\w+)\)", stderr)
    assert said is not None, stderr
    assert said.group(1) == signal.Signals(signum).name
    tick = int(said.group(2).replace(",", ""))
    assert int(said.group(3).replace(",", "")) == tick + 1 and tick >= 20
    assert f"results so far in --output {output}" in stderr and "Traceback" not in stderr
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["node"] for row in rows] == [f"t{i:02d}" for i in range(16)]
    assert {(row["status"], row["tick"]) for row in rows} == {("interrupted", tick)}

    # the same as a run of exactly tick + 1 ticks, at another placement
    whole = subprocess.run(hiocluster_command(
        "run", HEAT, "--app-dir", str(REPO), "--processes", "1", "--ticks", str(tick + 1),
        "--json", "--output", str(tmp_path / "whole.jsonl"), "--digests",
        str(tmp_path / "whole.dg")), cwd=REPO, env=cli_env, capture_output=True, text=True,
        timeout=TIMEOUT)
    assert whole.returncode == 0, whole.stderr
    assert json.loads(whole.stdout)["digest"] == said.group(4)
    rows_whole = [json.loads(line) for line in (tmp_path / "whole.jsonl").read_text()
                  .splitlines()]
    assert [{**row, "status": "-"} for row in rows] == \
        [{**row, "status": "-"} for row in rows_whole]
    diff = subprocess.run(hiocluster_command("diff", str(digests), str(tmp_path / "whole.dg")),
                          cwd=REPO, env=cli_env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert diff.returncode == 0 and f"to tick {tick}" in diff.stdout, diff
