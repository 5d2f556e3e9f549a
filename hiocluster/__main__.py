"""``python -m hiocluster`` and the ``hiocluster`` command.

SIGINT and SIGTERM are caught from the first line that runs here on: until a
command installs its own handlers (a run's clean stop, a worker's exit
contexts), either ends the command with one line on stderr and exit code 130
or 143, whatever it was doing (importing included), never with a traceback or
by the signal itself.
"""

import signal
import sys


class _Signalled(KeyboardInterrupt):
    """SIGINT or SIGTERM (``signal``), raised wherever the command was: a
    BaseException, so no ``except Exception`` on the way (an importer's) holds it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signal = signum


def _interrupt(signum: int, frame: object) -> None:
    from hiocluster.runtime.early import received
    received(signum)  # also written down: code not ours may drop the raise
    raise _Signalled(signum)


def main() -> int:
    """The ``hiocluster`` console script; returns the exit code."""
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _interrupt)
        from hiocluster.cli import main as command

        return command()
    except KeyboardInterrupt as exc:  # a plain one: Python's own handler, before ours
        from hiocluster.runtime.early import take
        return _interrupted(getattr(exc, "signal", None) or take() or signal.SIGINT)
    except BaseException:
        # raised inside Python's import machinery, the interrupt can leave it broken
        # and surface as another exception (a KeyError from a module lock): the
        # signal it came from is written down, and ends the command the same way
        from hiocluster.runtime.early import take
        written = take()
        if written is None:
            raise
        return _interrupted(written)


def _interrupted(signum: int) -> int:
    for again in (signal.SIGINT, signal.SIGTERM):  # a second one: the same end
        signal.signal(again, signal.SIG_IGN)
    print(f"hiocluster: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
