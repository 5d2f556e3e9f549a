"""The package's layers and lint, checked with the suite (so CI runs them): the
import-linter contracts in pyproject.toml (each layer imports only those below
it; the sans-IO cores import no sockets, processes or loops), ruff and mypy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} is not installed beside {sys.executable} (pip install -e '.[test]')")
    return found


def test_the_import_contracts_hold() -> None:
    done = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_ruff_finds_nothing_in_the_package() -> None:
    done = subprocess.run([_tool("ruff"), "check", "--no-cache", "hiocluster"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


@pytest.mark.timeout(600)  # a cold mypy on a loaded 2-core machine
def test_mypy_finds_nothing_in_the_package() -> None:
    done = subprocess.run([_tool("mypy"), "hiocluster"], cwd=REPO, capture_output=True,
                          text=True, timeout=580)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
