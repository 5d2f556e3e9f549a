"""Where a tick's time goes (hiocluster.supervision.trace): run --trace writes Chrome Trace
Event JSON, the summary names the slowest process and node, hiocluster report
prints the table and draws a PNG; tracing never changes a digest."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, hiocluster_command
from hiocluster.supervision import supervisor
from hiocluster.topology import load


def test_run_trace_writes_chrome_json_and_names_the_slowest(tmp_path: Path,
                                                             cli_env: dict[str, str]) -> None:
    out = tmp_path / "heat.json"
    done = subprocess.run(hiocluster_command("run", "topologies/heat.toml", "--processes", "2",
                                             "--ticks", "20", "--trace", str(out)),
                          capture_output=True, text=True, env=cli_env, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    events = data["traceEvents"]
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {"worker p0", "worker p1"}
    steps = [e for e in events if e["ph"] == "X" and e["name"] == "step"]
    assert len(steps) == 16 * 20 and all(e["dur"] >= 0 for e in steps)
    phases = {e["name"] for e in events if e["ph"] == "X" and e["tid"] == 0}
    assert phases == {"wait", "run", "send", "hash"}
    summary = done.stdout.splitlines()
    assert [line.split(":")[0] for line in summary if line.startswith("trace ")] == \
        ["trace    p0", "trace    p1"]
    # every part of a tick in the same unit, waiting apart from the work
    assert all(re.search(r"ms per tick: waiting [\d.]+, running [\d.]+, sending [\d.]+, "
                         r"hashing [\d.]+; tick p50", line)
               for line in summary if line.startswith("trace "))
    assert any(line.startswith("slowest  process p") and "; node t" in line
               for line in summary), summary
    report = subprocess.run(hiocluster_command("report", str(out), "--png",
                                               str(tmp_path / "heat.png")),
                            capture_output=True, text=True, env=cli_env, timeout=120)
    assert report.returncode == 0, report.stderr
    assert [line for line in summary if line.startswith(("trace ", "slowest "))] == \
        report.stdout.splitlines()[:-1]
    import matplotlib.image
    picture = matplotlib.image.imread(str(tmp_path / "heat.png"))
    assert picture.shape[0] > 100 and picture.shape[1] > 100 and picture.std() > 0.01


def test_tracing_changes_no_digest_and_goes_through_groups() -> None:
    topology = load(REPO / "topologies" / "ring.toml").replace(ticks=30)
    grouped = topology.replace(groups=(("g1", ("p0", "p1")), ("g2", ("p2", "p3"))),
                               placement=(("p0", ("r0", "r1")), ("p1", ("r2", "r3")),
                                          ("p2", ("r4", "r5")), ("p3", ("r6", "r7"))))
    plain = supervisor.run(topology, processes=4, app_dir=str(REPO), handle_signals=False)
    traced = supervisor.run(grouped, app_dir=str(REPO), handle_signals=False, trace=True)
    assert traced.digest == plain.digest and not plain.trace
    assert sorted(traced.trace) == ["p0", "p1", "p2", "p3"]
    assert [row[0] for row in traced.trace["p2"]] == list(range(30))
    row = traced.trace["p2"][5]
    assert row[1] <= row[2] <= row[3] <= row[4] <= row[5]
    assert sorted(span[0] for span in row[6]) == ["r4", "r5"]


def test_report_refuses_what_is_not_a_trace(tmp_path: Path, cli_env: dict[str, str]) -> None:
    bad = tmp_path / "x.json"
    bad.write_text('{"traceEvents": []}')
    done = subprocess.run(hiocluster_command("report", str(bad)), capture_output=True,
                          text=True, env=cli_env, timeout=60)
    assert done.returncode == 2 and "is not a hiocluster trace" in done.stderr


@pytest.mark.parametrize("rows, slowest", [
    ({"a": [[0, 0.0, 0.5, 1.0, 1.0, 1.0, [["x", 0.5, 1.0]]]],
      "b": [[0, 0.0, 0.1, 1.0, 1.0, 1.0, [["y", 0.1, 1.0]]]]}, ("b", "y")),
])
def test_profile_finds_the_busiest(rows: dict, slowest: tuple[str, str]) -> None:
    from hiocluster.supervision.trace import profile
    found = profile(rows)
    assert (found["slowest_worker"], found["slowest_node"]) == slowest
    assert found["workers"]["a"]["waiting"] == 0.5
    assert (found["workers"]["b"]["wait"], found["workers"]["b"]["run"]) == (0.1, 0.9)
