"""Progress in a Jupyter notebook: one line of text, updated in place.

:func:`in_notebook` says whether this process is a Jupyter kernel; a
:class:`NotebookBar` is an ``on_tick(done, total)`` callback that shows
``ticking ██████░░░░ 120/200 (60%), 1,234 ticks/s, about 3 s left`` in the cell
that runs, through IPython's ``display(..., display_id=True)`` and updates at
most every :data:`UPDATE_S` (plain text: no widget library is needed, and every
frontend that shows a cell's output shows it).
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["NotebookBar", "in_notebook", "UPDATE_S"]

#: Least seconds between two updates of the bar (and the last tick always).
UPDATE_S = 0.25
#: Cells of the bar.
WIDTH = 30


def in_notebook() -> bool:
    """This process is a Jupyter kernel (IPython's ZMQ shell), not a terminal."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class NotebookBar:
    """See the module docstring."""

    def __init__(self) -> None:
        self.handle: Any = None
        self.first: tuple[int, float] | None = None
        self.shown_at = 0.0

    def text(self, done: int, total: int, now: float) -> str:
        if self.first is None:
            self.first = (done, now)
        filled = WIDTH * done // max(1, total)
        ticks, seconds = done - self.first[0], now - self.first[1]
        rate = ticks / seconds if seconds > 0 and ticks else 0.0
        line = (f"ticking {'█' * filled}{'░' * (WIDTH - filled)} {done:,}/{total:,} "
                f"({done / max(1, total):.0%})")
        if rate:
            line += f", {rate:,.0f} ticks/s"
            if done < total:
                line += f", about {(total - done) / rate:,.0f} s left"
        return line

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.first is not None and done < total and now - self.shown_at < UPDATE_S:
            return  # not shown: not even made
        text = self.text(done, total, now)
        self.shown_at = now
        from IPython.display import display

        if self.handle is None:
            self.handle = display({"text/plain": text}, raw=True, display_id=True)
        else:
            self.handle.update({"text/plain": text}, raw=True)
