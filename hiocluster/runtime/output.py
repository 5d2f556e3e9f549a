"""Children's output, one whole line at a time, prefixed with who wrote it.

Honcho style: ``web.1 | the line``, the name padded so the bars line up, in a
color per name on a terminal (plain otherwise, and when ``NO_COLOR`` is set).
Every child writes into its own pipe and only this process writes the result,
each batch of complete lines in one ``write``: lines of different processes
never interleave mid-line.
"""

from __future__ import annotations

import os
import sys
from typing import IO

__all__ = ["Prefixer", "MAX_LINE"]

#: A line longer than this is written in pieces (a child that never ends its line
#: must not grow our buffer without bound).
MAX_LINE = 64 * 1024

_COLORS = (36, 33, 32, 35, 34, 91, 96, 93, 92, 95, 94)  # ANSI foreground codes


class Prefixer:
    """See the module docstring.

    Args:
        out: where lines go (default: this process's stderr).
        prefix: False: pass lines through as they are (``--no-prefix``).
        color: None: on a terminal unless NO_COLOR is set.
    """

    def __init__(self, out: IO[str] | None = None, *, prefix: bool = True,
                 color: bool | None = None) -> None:
        self.out = out or sys.stderr
        self.prefix = prefix
        if color is None:
            color = self.out.isatty() and not os.environ.get("NO_COLOR")
        self.color = color
        self.pending: dict[str, bytes] = {}
        self.colors: dict[str, int] = {}
        self.width = 0

    def reserve(self, names: list[str]) -> None:
        """Pad prefixes for these names from the start, so the bars line up."""
        self.width = max([self.width, *map(len, names)])

    def feed(self, name: str, data: bytes) -> None:
        """Bytes ``name`` wrote: its complete lines go out now, the rest waits."""
        text = self.pending.pop(name, b"") + data
        lines = text.split(b"\n")
        rest = lines.pop()
        if len(rest) > MAX_LINE:
            lines.append(rest)
            rest = b""
        if rest:
            self.pending[name] = rest
        if lines:
            self.write(name, [line.decode("utf-8", "replace") for line in lines])

    def flush(self, name: str) -> None:
        """``name`` is gone: what it left without a newline goes out too."""
        rest = self.pending.pop(name, b"")
        if rest:
            self.write(name, [rest.decode("utf-8", "replace")])

    def write(self, name: str, lines: list[str]) -> None:
        """Write ``lines`` of ``name`` in one go."""
        if self.prefix:
            self.width = max(self.width, len(name))
            head = f"{name:<{self.width}} | "
            if self.color:
                code = self.colors.setdefault(name, _COLORS[len(self.colors) % len(_COLORS)])
                head = f"\033[{code}m{head}\033[0m"
            text = "".join(f"{head}{line.rstrip(chr(13))}\n" for line in lines)
        else:
            text = "".join(f"{line}\n" for line in lines)
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):
            pass  # our own stderr is gone: nothing to tell
