"""Run directories and their guardians (hiocluster.runtime.rundir), with real shells."""

from __future__ import annotations

from pathlib import Path

import pytest

from hiocluster.errors import TransportError
from hiocluster.runtime import rundir


def test_a_run_directory_is_private_and_goes_with_remove(no_leaks: Path) -> None:
    path = Path(rundir.make_run_dir())
    assert path.parent == no_leaks and path.name.startswith("hioc-")
    assert path.stat().st_mode & 0o777 == 0o700
    rundir.remove_run_dir(str(path))
    assert not path.exists()


def test_a_guardian_killed_by_a_signal_at_birth_is_started_again(
        no_leaks: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C meant for the run's process group can reach a guardian between its
    fork and its own session: it dies before its trap, and another one is started.
    (SIGKILL stands for it here: a SIGINT ignored by whoever started the tests, as
    a shell does for a job it puts in the background, would be ignored here too.)"""
    once = no_leaks / "once"
    monkeypatch.setattr(rundir, "_GUARDIAN", f'[ -e "{once}" ] || {{ : > "{once}"; '
                        'kill -KILL $$; }; ' + rundir._GUARDIAN)
    path = rundir.make_run_dir()
    assert once.exists() and Path(path).is_dir()  # the first one died; the second made it
    rundir.remove_run_dir(path)
    once.unlink()


def test_guardians_that_keep_dying_end_in_a_typed_error_naming_the_signal(
        no_leaks: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tries = no_leaks / "tries"
    monkeypatch.setattr(rundir, "_GUARDIAN", f'echo x >> "{tries}"; kill -KILL $$')
    with pytest.raises(TransportError, match=r"guardian shell ended \(signal 9\)"):
        rundir.make_run_dir()
    assert tries.read_text().split() == ["x"] * rundir.GUARDIAN_TRIES
    tries.unlink()
