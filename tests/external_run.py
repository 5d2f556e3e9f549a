"""A run with one worker started by hand, from Python, so a test can set the timeouts.

``python -m tests.external_run TOPOLOGY WORKER START_S STOP_S``: runs TOPOLOGY
(from the repo root's node classes) with WORKER external (``--external``) and
starts that worker itself, once the control socket is bound, as a hand would:
``tests.fake_worker`` (``$FAKE_WORKER`` says how it misbehaves) with its
credentials in the environment. Prints one JSON line at the end: ``{"digest"}``
or ``{"failure": type, "worker", "cause", "text"}``; exits 0 either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from hiocluster.supervision import supervisor
from hiocluster.errors import ClusterError, RunFailed
from hiocluster.topology import load
from hiocluster.runtime.transport import CREDENTIALS_ENV

from tests.fake_worker import FAKE_COMMAND

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str]) -> int:
    path, worker, start_s, stop_s = argv
    started: list[subprocess.Popen] = []

    def on_listening(sup: supervisor.Supervisor) -> None:
        env = dict(os.environ, **{CREDENTIALS_ENV: sup.credentials(worker).to_json()})
        started.append(subprocess.Popen(
            [*FAKE_COMMAND, "worker", "--connect", sup.control_address, "--name", worker],
            env=env, cwd=REPO))

    outcome: dict[str, Any]
    try:
        result = supervisor.run(load(path), app_dir=REPO, external=[worker],
                                on_listening=on_listening, start_timeout=float(start_s),
                                stop_timeout=float(stop_s))
        outcome = {"digest": result.digest}
    except ClusterError as exc:
        outcome = {"failure": type(exc).__name__, "text": str(exc)}
        if isinstance(exc, RunFailed):
            outcome.update(worker=exc.worker, cause=exc.cause)
    finally:
        for process in started:  # the hand-started worker ends by itself: wait for it
            process.wait(timeout=30)
    print(json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
