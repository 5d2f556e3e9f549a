"""Digest files (`run --digests FILE`) and `hiocluster diff`: real runs, real files.

The runs differ in placement (equal), seed, and one node's code from one tick on
(the first divergent tick and node named); files cut short or altered are
refused by name, never compared wrongly."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

import hiocluster
from conftest import REPO, hiocluster_command
from hiocluster.errors import DigestFileError
from hiocluster.supervision.digestfile import DigestFile

TIMEOUT = 90
RING = str(REPO / "topologies" / "ring.toml")

DRIFT = textwrap.dedent('''
    from hiocluster import Node

    class Counter(Node):
        """Adds 1 each tick; node DRIFTER adds 2 from tick DRIFT_AT on."""
        def __init__(self, *args, **kwa):
            super().__init__(*args, **kwa)
            self.total = 0
        def step(self):
            drift = self.name == DRIFTER and self.tick >= DRIFT_AT
            self.total += 2 if drift else 1
        def state(self):
            return self.total
    ''')

TOPOLOGY = textwrap.dedent('''
    [run]
    ticks = 12
    [nodes.c]
    class = "counters:Counter"
    count = 6
    ''')


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(hiocluster_command(*args), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)


def _counters(tmp_path: Path, name: str, drifter: str, at: int) -> tuple[str, str]:
    """An app dir whose Counter drifts on node ``drifter`` from tick ``at`` on."""
    app = tmp_path / name
    app.mkdir()
    (app / "counters.py").write_text(DRIFT.replace("DRIFTER", repr(drifter))
                                     .replace("DRIFT_AT", str(at)))
    (app / "counters.toml").write_text(TOPOLOGY)
    return str(app), str(app / "counters.toml")


def test_a_digest_file_holds_every_nodes_digest_and_the_run_digests(cli_env, tmp_path) -> None:
    path = tmp_path / "ring.dg"
    done = cli(cli_env, "run", RING, "--app-dir", str(REPO), "--processes", "2", "--ticks",
               "20", "--json", "--digests", str(path))
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout)
    assert "tick_digests" not in said  # FILE, not the flag: nothing printed per tick
    with DigestFile(str(path)) as file:
        assert file.topology == "ring" and file.ticks == 20
        assert file.nodes == [f"r{k}" for k in range(8)] and said["nodes"] == 8
        states = list(file.states())
    assert [tick for tick, _ in states] == list(range(-1, 20))
    assert states[-1][1][8:40].hex() == said["digest"]  # the last run digest is the run's
    flag = cli(cli_env, "run", RING, "--app-dir", str(REPO), "--processes", "2", "--ticks",
               "20", "--json", "--digests")
    assert [record[8:40].hex() for _, record in states[1:]] == \
        json.loads(flag.stdout)["tick_digests"]


def test_diff_finds_runs_equal_across_placements_and_names_where_seeds_differ(
        cli_env, tmp_path) -> None:
    files = {}
    for name, flags in (("p1", ["--processes", "1"]), ("p4", ["--processes", "4"]),
                        ("seed", ["--processes", "2", "--seed", "99"])):
        files[name] = str(tmp_path / f"{name}.dg")
        done = cli(cli_env, "run", RING, "--app-dir", str(REPO), "--ticks", "30",
                   "--digests", files[name], "--record", str(tmp_path / name), *flags)
        assert done.returncode == 0, done.stderr
    for a, b in ((files["p1"], files["p4"]), (tmp_path / "p1", tmp_path / "p4")):
        same = cli(cli_env, "diff", str(a), str(b))
        assert same.returncode == 0 and same.stdout.startswith("equal: 31 states"), same
    records = cli(cli_env, "diff", str(tmp_path / "p1"), str(tmp_path / "seed"))
    assert records.returncode == 1, records
    other = cli(cli_env, "diff", files["p1"], files["seed"])
    assert other.returncode == 1, other
    found = hiocluster.diff(files["p1"], files["seed"])
    # the first state whose run digest differs, found from the files' own run digests
    with DigestFile(files["p1"]) as a, DigestFile(files["seed"]) as b:
        first = next(tick for (tick, ra), (_, rb) in zip(a.states(), b.states())
                     if ra[8:40] != rb[8:40])
    assert found.tick == first and found.nodes
    assert f"tick {first}" in other.stdout or (first == -1 and "set-up" in other.stdout)
    assert records.stdout == other.stdout  # the records name the same state and nodes


@pytest.mark.parametrize("at", [0, 7])
def test_diff_names_the_tick_and_the_node_whose_code_changed(cli_env, tmp_path, at) -> None:
    base_app, base = _counters(tmp_path, "base", drifter="nobody", at=at)
    drift_app, drift = _counters(tmp_path, "drift", drifter="c3", at=at)
    paths, records = [], []
    for app, topology, processes in ((base_app, base, "2"), (drift_app, drift, "3")):
        paths.append(str(tmp_path / f"{Path(app).name}.dg"))
        records.append(str(tmp_path / f"{Path(app).name}.rec"))
        done = cli(cli_env, "run", topology, "--app-dir", app, "--processes", processes,
                   "--digests", paths[-1], "--record", records[-1])
        assert done.returncode == 0, done.stderr
    for compared in (paths, records):  # the digest files, and the records (2 vs 3 workers)
        done = cli(cli_env, "diff", *compared)
        assert done.returncode == 1, done
        assert done.stdout.strip() == f"first divergent state: tick {at}; nodes: c3"


def test_a_run_that_ends_first_differs(cli_env, tmp_path) -> None:
    app, topology = _counters(tmp_path, "app", drifter="nobody", at=0)
    long, short = str(tmp_path / "long.dg"), str(tmp_path / "short.dg")
    for path, ticks in ((long, "12"), (short, "5")):
        assert cli(cli_env, "run", topology, "--app-dir", app, "--ticks", ticks,
                   "--digests", path).returncode == 0
    done = cli(cli_env, "diff", long, short)
    assert done.returncode == 1
    assert "A ends at tick 11 and B at tick 4" in done.stdout


def test_files_cut_short_or_altered_are_refused_by_name(cli_env, tmp_path) -> None:
    app, topology = _counters(tmp_path, "app", drifter="nobody", at=0)
    good = tmp_path / "good.dg"
    assert cli(cli_env, "run", topology, "--app-dir", app, "--digests",
               str(good)).returncode == 0
    data = good.read_bytes()
    header_end = data.index(b"\n") + 1
    cut = tmp_path / "cut.dg"
    cut.write_bytes(data[:-5])
    renamed = tmp_path / "renamed.dg"
    at = data.index(b"c3", header_end)  # a node's name inside the first record
    renamed.write_bytes(data[:at] + b"x3" + data[at + 2:])
    garbage = tmp_path / "garbage.dg"
    garbage.write_bytes(b"\x00\xff" * 100)
    version = tmp_path / "version.dg"
    version.write_bytes(data.replace(b'"version": 1', b'"version": 9', 1))
    for path, words in ((cut, "is cut short"), (renamed, "does not name node 'c3'"),
                        (garbage, "is not a hiocluster digest file"),
                        (version, "digest file version 9"),
                        (tmp_path / "missing.dg", "cannot read")):
        done = cli(cli_env, "diff", str(good), str(path))
        assert done.returncode == 2, (path, done)
        assert words in done.stderr and str(path) in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        with pytest.raises(DigestFileError):
            hiocluster.diff(str(path), str(good))


def test_an_unwritable_digest_file_fails_the_run_before_it_starts(cli_env, tmp_path) -> None:
    done = cli(cli_env, "run", RING, "--app-dir", str(REPO), "--digests",
               str(tmp_path / "no" / "such" / "dir.dg"))
    assert done.returncode == 1
    assert "cannot write --digests" in done.stderr and "Traceback" not in done.stderr
