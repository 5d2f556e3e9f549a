"""Line numbers for topology errors (best effort: tomllib reports none for valid
TOML): the line of a key path in the text."""

from __future__ import annotations

import re

from hiocluster.errors import TopologyError

# --- line numbers (best effort: tomllib reports none for valid TOML) ---------------

_HEADER = re.compile(r"\s*(\[\[?)([^\[\]]+)\]\]?\s*(?:#.*)?$")
_KEY = re.compile(r"""\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*[=.]""")


def _split_key_path(key_path: str) -> list[str | int]:
    return [int(index) if index else name
            for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", key_path)]


def _bare(part: str) -> str:
    return part.strip().strip("\"'")


def _locate(text: str | None, key_path: str) -> int | None:
    """Return the 1-based line that defines ``key_path`` in ``text``, if found."""
    if not text or not key_path:
        return None
    want = _split_key_path(key_path)
    lines = text.splitlines()
    sections: list[tuple[tuple[str | int, ...], int]] = [((), -1)]
    seen_arrays: dict[tuple[str | int, ...], int] = {}
    for number, line in enumerate(lines):
        match = _HEADER.match(line)
        if match:
            names: tuple[str | int, ...] = tuple(_bare(p) for p in match[2].split("."))
            if match[1] == "[[":
                index = seen_arrays[names] = seen_arrays.get(names, -1) + 1
                names += (index,)
            sections.append((names, number))
    for depth in range(len(want), -1, -1):
        for position, (names, start) in enumerate(sections):
            if list(names) != want[:depth]:
                continue
            if depth == len(want):
                return start + 1 if start >= 0 else None
            key = want[depth]
            end = sections[position + 1][1] if position + 1 < len(sections) else len(lines)
            for number in range(start + 1, end):
                match = _KEY.match(lines[number])
                if match and _bare(match[1]) == key:
                    return number + 1
    return None


def locate_error(exc: TopologyError, text: str | None, path: str | None) -> None:
    """Fill in the line and path of an error raised by the checks above."""
    if exc.line is None:
        exc.line = _locate(text, exc.key_path)
    exc.path = exc.path or path
    exc.args = (str(exc),)
