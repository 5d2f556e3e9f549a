"""The prefixer of children's output (hiocluster.runtime.output): whole lines, aligned
names, colors only where they belong."""

from __future__ import annotations

import io

import pytest

from hiocluster.runtime.output import MAX_LINE, Prefixer


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_partial_lines_wait_for_their_end_and_never_mix() -> None:
    out = io.StringIO()
    prefixer = Prefixer(out)
    prefixer.reserve(["hiocluster", "web.1"])
    prefixer.feed("web.0", b"first half ")
    prefixer.feed("web.1", b"other\nand more")
    prefixer.feed("web.0", b"second half\nnext\n")
    prefixer.flush("web.1")
    assert out.getvalue().splitlines() == [
        "web.1      | other",
        "web.0      | first half second half",
        "web.0      | next",
        "web.1      | and more",
    ]


def test_colors_on_a_terminal_unless_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    tty = Terminal()
    Prefixer(tty).write("web.0", ["hi"])
    assert tty.getvalue() == "\033[36mweb.0 | \033[0mhi\n"
    monkeypatch.setenv("NO_COLOR", "1")
    plain = Terminal()
    Prefixer(plain).write("web.0", ["hi"])
    assert plain.getvalue() == "web.0 | hi\n"
    piped = io.StringIO()  # not a terminal: plain
    monkeypatch.delenv("NO_COLOR")
    Prefixer(piped).write("web.0", ["hi"])
    assert piped.getvalue() == "web.0 | hi\n"


def test_each_name_keeps_its_own_color() -> None:
    tty = Terminal()
    prefixer = Prefixer(tty, color=True)
    for name in ("a", "b", "a"):
        prefixer.write(name, ["x"])
    codes = [line.split("m", 1)[0] for line in tty.getvalue().splitlines()]
    assert codes[0] == codes[2] != codes[1]


def test_no_prefix_passes_lines_through() -> None:
    out = io.StringIO()
    prefixer = Prefixer(out, prefix=False)
    prefixer.feed("web.0", b"as it was\r\n")
    assert out.getvalue() == "as it was\r\n"


def test_a_line_that_never_ends_is_written_in_pieces() -> None:
    out = io.StringIO()
    prefixer = Prefixer(out)
    prefixer.feed("w", b"x" * (MAX_LINE + 10))
    assert out.getvalue() == "w | " + "x" * (MAX_LINE + 10) + "\n"
    assert not prefixer.pending


def test_undecodable_bytes_are_replaced_not_fatal() -> None:
    out = io.StringIO()
    Prefixer(out).feed("w", b"caf\xe9\n")
    assert out.getvalue() == "w | caf\ufffd\n"
