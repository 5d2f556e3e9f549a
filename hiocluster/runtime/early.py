"""Signals that arrived before a command installed its own handlers.

``hiocluster``'s first line turns SIGINT and SIGTERM into an exception raised
wherever the command is (hiocluster.__main__). Code that is not ours may catch
and drop it (a bare ``except:`` around an import, say); so the signal is also
written down here, and a command that installs its own handlers takes it and
acts on it: a Ctrl-C in start-up is never lost.
"""

from __future__ import annotations

__all__ = ["received", "take", "pending"]

_pending: list[int] = []


def received(signum: int) -> None:
    """Write down that ``signum`` arrived (called from the first-line handler)."""
    _pending.append(signum)


def pending() -> int | None:
    """The first signal written down and not yet acted on (None: none); kept."""
    return _pending[0] if _pending else None


def take() -> int | None:
    """The first signal written down and not yet acted on (None: none); forgets all."""
    first = _pending[0] if _pending else None
    _pending.clear()
    return first
