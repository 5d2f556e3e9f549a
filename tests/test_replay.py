"""``run --record DIR`` and ``hiocluster replay DIR --worker NAME``: each worker of a
real 4-worker PHOLD run replayed alone reproduces every digest it sent; a record
altered by one byte is caught at its tick; hostile, cut or missing records are
refused by name; --from-checkpoint, --until and --break-at (pdb inside step());
a record that would fill its file system stops the run before it does."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import msgpack
import pytest
from conftest import REPO, hiocluster_command

from hiocluster.protocol.fields import DIGEST_SIZE
from tests.faulty import mesh_toml

TIMEOUT = 120
TICKS = 200


def cli(env: dict[str, str], *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(hiocluster_command(*args), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT, **kwargs)


@pytest.fixture
def recorded(cli_env, tmp_path) -> Path:
    """A 4-worker PHOLD run recorded into tmp_path/rec, checkpointed every 50 ticks."""
    done = cli(cli_env, "run", "topologies/phold.toml", "--ticks", str(TICKS), "--record",
               str(tmp_path / "rec"), "--checkpoint", str(tmp_path / "ckpt"),
               "--checkpoint-every", "50")
    assert done.returncode == 0, done.stderr
    assert f"hiocluster: recorded " in done.stderr and str(tmp_path / "rec") in done.stderr
    return tmp_path / "rec"


def entries(path: Path) -> list[tuple[int, object]]:
    """(offset after it, entry) for each msgpack object of a record file."""
    unpacker = msgpack.Unpacker(open(path, "rb"), raw=False)
    found = []
    for entry in unpacker:
        found.append((unpacker.tell(), entry))
    return found


def test_every_worker_replayed_alone_reproduces_every_digest(cli_env, recorded) -> None:
    manifest = json.loads((recorded / "record.json").read_text())
    assert manifest["status"] == "finished" and sorted(manifest["placement"]) == \
        ["p0", "p1", "p2", "p3"] and manifest["size"] > 0
    for worker in ("p0", "p1", "p2", "p3"):
        done = cli(cli_env, "replay", str(recorded), "--worker", worker)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"replayed {worker}: ticks 0..199, {TICKS} digested "
                                      "states as recorded; "), done.stdout


def test_a_record_altered_by_one_byte_is_caught_at_its_tick(cli_env, recorded) -> None:
    original = recorded.parent / "original"
    shutil.copytree(recorded, original)
    path = recorded / "p1.rec"
    data = bytearray(path.read_bytes())
    header = entries(path)[0][1]
    size = len(header["ready"])               # one state's records: p1's two LPs
    windows = [(end, entry) for end, entry in entries(path)[1:] if entry[0] == 1]
    end, (_, until, digests) = windows[len(windows) // 2]
    first = until - len(digests) // size + 1  # the window's first tick
    tick = (first + until) // 2
    name = "lp2"                               # p1's first node, by name
    at = end - len(digests) + (tick - first) * size + len(name)   # its digest's first byte
    assert data[at - len(name):at] == name.encode()
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    done = cli(cli_env, "replay", str(recorded), "--worker", "p1")
    assert done.returncode == 1, done.stderr
    assert f"the replay of p1 differs from its record at tick {tick}: node lp2" in done.stderr
    # and a diff of the two record directories names the same tick and node
    diff = cli(cli_env, "diff", str(original), str(recorded))
    assert diff.returncode == 1, diff.stderr
    assert diff.stdout.strip() == f"first divergent state: tick {tick}; nodes: lp2"
    # before that tick it is still as recorded
    assert cli(cli_env, "replay", str(recorded), "--worker", "p1", "--until",
               str(tick - 1)).returncode == 0


def test_an_altered_frame_is_caught_where_it_was_taken(cli_env, recorded) -> None:
    """A payload changed in a frame p1 received: its nodes' states differ from the
    tick the frame's messages were delivered on, not before."""
    path = recorded / "p1.rec"
    found = entries(path)
    out = [msgpack.packb(found[0][1])]
    changed = None
    for _, entry in found[1:]:
        if changed is None and entry[0] == 0:
            frame = msgpack.unpackb(entry[2], raw=False)  # [version, "DATA", body]
            tick, rows = frame[2]["tick"], frame[2]["messages"]
            if tick >= 20 and rows:
                rows[0][2][0][0] += 1.0      # one event's time: one tick later
                entry = [0, entry[1], msgpack.packb(frame)]
                changed = tick
        out.append(msgpack.packb(entry))
    assert changed is not None
    path.write_bytes(b"".join(out))
    done = cli(cli_env, "replay", str(recorded), "--worker", "p1")
    assert done.returncode == 1, done.stderr
    assert f"differs from its record at tick {changed + 1}: node" in done.stderr


@pytest.mark.parametrize("spoil, words", [
    (lambda path: path.write_bytes(b"\x92\x01\x02junk"), "is not a hiocluster record"),
    (lambda path: path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2]),
     "is cut short after tick"),
    (lambda path: path.write_bytes(b"\xc1" * 64), "its header is not msgpack"),
    (lambda path: path.unlink(), "cannot read the record"),
])
def test_hostile_or_cut_records_are_refused_by_name(cli_env, recorded, spoil, words) -> None:
    original = recorded.parent / "original"
    shutil.copytree(recorded, original)
    spoil(recorded / "p2.rec")
    done = cli(cli_env, "replay", str(recorded), "--worker", "p2")
    assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, \
        done.stderr
    # a diff of the spoiled record is refused (2) or differs (1: cut, or a worker less)
    diff = cli(cli_env, "diff", str(original), str(recorded))
    assert diff.returncode in (1, 2) and "Traceback" not in diff.stderr, diff
    assert (diff.returncode == 2) == (words not in ("is cut short after tick",
                                                    "cannot read the record")), diff


def test_what_replay_cannot_do_is_said(cli_env, recorded, tmp_path) -> None:
    nothing = cli(cli_env, "replay", str(tmp_path), "--worker", "p1")
    assert nothing.returncode == 2 and "holds no record" in nothing.stderr
    stranger = cli(cli_env, "replay", str(recorded), "--worker", "p9")
    assert stranger.returncode == 2 and "no worker 'p9' (workers: p0, p1, p2, p3)" in \
        stranger.stderr
    alone = cli(cli_env, "replay", str(recorded), "--worker", "p1", "--break-at", "3")
    assert alone.returncode == 2 and "--break-at and --node go together" in alone.stderr
    elsewhere = cli(cli_env, "replay", str(recorded), "--worker", "p1", "--break-at", "3",
                    "--node", "lp7")
    assert elsewhere.returncode == 2 and "worker p1 has no node 'lp7'" in elsewhere.stderr


def test_replay_from_a_checkpoint_and_until_a_tick(cli_env, recorded, tmp_path) -> None:
    newest = cli(cli_env, "replay", str(recorded), "--worker", "p3", "--from-checkpoint")
    assert newest.returncode == 0, newest.stderr
    assert newest.stdout.startswith("replayed p3: ticks 150..199, 50 digested states")
    older = cli(cli_env, "replay", str(recorded), "--worker", "p3", "--from-checkpoint",
                str(tmp_path / "ckpt" / "tick-000000000099"), "--until", "120")
    assert older.returncode == 0, older.stderr
    assert older.stdout.startswith("replayed p3: ticks 100..120, 21 digested states")


def test_break_at_stops_in_pdb_inside_the_nodes_step(cli_env, recorded) -> None:
    done = cli(cli_env, "replay", str(recorded), "--worker", "p1", "--break-at", "42",
               "--node", "lp3", input="p (self.name, self.tick)\nc\n")
    assert done.returncode == 0, done.stderr
    assert "step()" in done.stdout and "('lp3', 42)" in done.stdout
    assert "replayed p1: ticks 0..199" in done.stdout


def test_a_record_stops_the_run_before_its_file_system_fills(cli_env, tmp_path,
                                                              tmpfs) -> None:
    small = tmpfs("small", "size=8m")
    path = tmp_path / "loud.toml"
    path.write_text(mesh_toml("tests.restart_nodes:Shouter", 2, ticks=100_000, seed=3,
                              capacity=64, params="size = 16384"))
    done = cli(cli_env, "run", str(path), "--app-dir", str(REPO), "--processes", "2",
               "--record", str(small / "rec"))
    assert done.returncode == 1, done.stderr
    assert "the record" in done.stderr and "file system has" in done.stderr \
        and "a record leaves 5% of its file system (at most 256 MiB) and 2 MiB more " \
        "free" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    manifest = json.loads((small / "rec" / "record.json").read_text())
    assert manifest["status"] == "failed"
