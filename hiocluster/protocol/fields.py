"""Field checks for frames: limits, and one validator per field type.

Each :class:`Check` has a fast ``ok(value)`` for the hot path and an
``explain(value, path)`` that finds the exact offending sub-field, called only
once something is already known to be wrong. The field types are listed in
docs/protocol.md §2.
"""

from __future__ import annotations

import math
import re
import reprlib
from typing import Any, Callable, Iterable

from hiocluster.errors import FrameError

__all__ = [
    "MAX_CONTROL_FRAME", "MAX_BYE_FRAME", "CHUNK_SIZE", "MAX_SETUP_FRAME", "MAX_DATA_FRAME", "MAX_STR", "MAX_ARRAY",
    "MAX_MAP", "MAX_INT", "NAME_RE", "DIGEST_SIZE", "RUN_DIGEST_SIZE", "Check", "ListOf",
    "MapOf", "TupleOf", "LinkRun", "optional", "UINT", "COUNT", "INT", "NUMBER", "POSITIVE", "BOOL", "NAME", "TEXT", "ADDRESS",
    "BYTES", "TOKEN", "CURVE_KEY", "ANY", "STATS", "is_name", "digested", "node_digests",
    "differing_nodes",
]

#: Largest frame a supervisor accepts from a worker (HELLO, READY, DONE, BYE, ...).
MAX_CONTROL_FRAME = 16 * 1024 * 1024
#: Largest BYE a supervisor accepts, in CHUNK frames where it is over MAX_CONTROL_FRAME
#: (a finished run's results: each node's ``result()``, numpy arrays included).
MAX_BYE_FRAME = 1024 * 1024 * 1024
#: How much of such a BYE one CHUNK frame carries.
CHUNK_SIZE = 8 * 1024 * 1024
#: Largest frame a worker accepts from its supervisor (SETUP carries its nodes and links).
MAX_SETUP_FRAME = 256 * 1024 * 1024
#: Largest data frame accepted (one batch of messages between two workers per tick).
MAX_DATA_FRAME = 256 * 1024 * 1024
#: Largest string inside a control frame (names are far shorter: see NAME_RE).
MAX_STR = 64 * 1024
#: Longest array and map inside any frame.
MAX_ARRAY = 4 * 1024 * 1024
MAX_MAP = 1024 * 1024
MAX_INT = 2**63 - 1
#: Largest credit lag (SETUP ``credit_lag``, ``[run] credit_lag``): a worker may hold
#: about two lags of frames per neighbour.
MAX_CREDIT_LAG = 4096

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")
ADDRESS_RE = re.compile(r"(ipc|tcp|unix)://[^\s]{1,200}\Z")
#: Bytes of a node digest (xxh3_128 of the packed state, docs/protocol.md §7).
DIGEST_SIZE = 16
#: Bytes of the run digest (sha256 chained over the node digests).
RUN_DIGEST_SIZE = 32

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 40, 40


def short(value: Any) -> str:
    """A short repr, safe for hostile input (bounded depth and length)."""
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Check:
    """A scalar check: ``ok(value) -> bool`` and what it expects, for the error."""

    __slots__ = ("ok", "expected")

    def __init__(self, test: Callable[[Any], bool], expected: str) -> None:
        self.ok = test
        self.expected = expected

    def explain(self, value: Any, path: str) -> FrameError:
        return FrameError(f"expected {self.expected}, got {type(value).__name__} "
                          f"{short(value)}", field=path, code="bad-field")


class ListOf(Check):
    """An array whose every item passes ``item``."""

    __slots__ = ("item",)

    def __init__(self, item: Check) -> None:
        item_ok = item.ok
        super().__init__(lambda v: type(v) is list and all(map(item_ok, v)), "an array")
        self.item = item

    def explain(self, value: Any, path: str) -> FrameError:
        if type(value) is list:
            for index, entry in enumerate(value):
                if not self.item.ok(entry):
                    return self.item.explain(entry, f"{path}[{index}]")
        return super().explain(value, path)


class MapOf(Check):
    """A map whose keys pass ``key`` and values pass ``value``."""

    __slots__ = ("key", "value")

    def __init__(self, key: Check, value: Check) -> None:
        key_ok, value_ok = key.ok, value.ok
        super().__init__(lambda v: type(v) is dict and all(map(key_ok, v))
                         and all(map(value_ok, v.values())), "a map")
        self.key, self.value = key, value

    def explain(self, value: Any, path: str) -> FrameError:
        if type(value) is dict:
            for key, entry in value.items():
                if not self.key.ok(key):
                    return self.key.explain(key, f"{path}.<key {short(key)}>")
                if not self.value.ok(entry):
                    return self.value.explain(entry, f"{path}.{key}")
        return super().explain(value, path)


class TupleOf(Check):
    """An array of fixed length whose items pass the given checks in turn."""

    __slots__ = ("items",)

    def __init__(self, *items: Check) -> None:
        size, oks = len(items), tuple(item.ok for item in items)

        def test(v: Any) -> bool:
            return (type(v) is list and len(v) == size
                    and all(ok(entry) for ok, entry in zip(oks, v)))
        super().__init__(test, f"an array of {size}")
        self.items = items

    def explain(self, value: Any, path: str) -> FrameError:
        if type(value) is list and len(value) == len(self.items):
            for index, (item, entry) in enumerate(zip(self.items, value)):
                if not item.ok(entry):
                    return item.explain(entry, f"{path}[{index}]")
        return super().explain(value, path)


def is_sequences(value: Any) -> bool:
    """A list of strictly increasing integers in 0..MAX_INT (checked at C speed)."""
    if type(value) is not list:
        return False
    if not value:
        return True
    if set(map(type, value)) != {int} or value[0] < 0 or value[-1] > MAX_INT:
        return False
    return all(map(int.__lt__, value, value[1:]))


def optional(check: Check) -> Check:
    """``check``, or nil."""
    return Check(lambda v: v is None or check.ok(v), f"nil or {check.expected}")


UINT = Check(lambda v: type(v) is int and 0 <= v <= MAX_INT, "an integer 0..2**63-1")
INT = Check(lambda v: type(v) is int and -MAX_INT - 1 <= v <= MAX_INT, "a 64-bit integer")
COUNT = Check(lambda v: type(v) is int and 1 <= v <= MAX_INT, "an integer 1..2**63-1")
NUMBER = Check(lambda v: type(v) in (int, float) and math.isfinite(v), "a finite number")
POSITIVE = Check(lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0,
                 "a finite number > 0")
BOOL = Check(lambda v: type(v) is bool, "true or false")
_GOOD_NAMES: set[str] = set()  # names already checked: the same few recur every tick
_GOOD_NAMES_MAX = 100_000     # bounded, so a hostile peer cannot grow it forever


def is_name(value: Any) -> bool:
    """True if ``value`` is a valid name (see NAME_RE)."""
    if type(value) is not str:  # first: a hostile list or map is unhashable
        return False
    if value in _GOOD_NAMES:
        return True
    if NAME_RE.match(value) is None:
        return False
    if len(_GOOD_NAMES) < _GOOD_NAMES_MAX:
        _GOOD_NAMES.add(value)
    return True


NAME = Check(is_name, "a name (1-64 of A-Z a-z 0-9 _ . -, not starting with . or -)")
TEXT = Check(lambda v: type(v) is str, "a string")
#: A directory (a checkpoint's): an absolute path, "" for none.
PATH = Check(lambda v: type(v) is str and (v == "" or (v.startswith("/") and len(v) <= 4096
                                                       and "\0" not in v)),
             "an absolute path (at most 4096 characters), or \"\"")
ADDRESS = Check(lambda v: type(v) is str and ADDRESS_RE.match(v) is not None,
                "an ipc:// or tcp:// address")
BYTES = Check(lambda v: type(v) is bytes, "bytes")
TOKEN = Check(lambda v: type(v) is bytes and 1 <= len(v) <= 64, "1 to 64 bytes")
CURVE_KEY = Check(lambda v: type(v) is str and len(v) == 40 and v.isascii(),
                  "a CURVE public key (40 characters of Z85)")
CREDIT_LAG = Check(lambda v: type(v) is int and 1 <= v <= MAX_CREDIT_LAG,
                   f"an integer 1..{MAX_CREDIT_LAG}")
ANY = Check(lambda v: True, "anything")
STATS = MapOf(NAME, UINT)


class LinkRun(TupleOf):
    """``[link id, [sequence, ...], [payload, ...]]``: increasing sequences, one per payload."""

    __slots__ = ("shape_ok",)

    def __init__(self) -> None:
        super().__init__(UINT, Check(is_sequences, "an array of increasing integers"),
                         Check(lambda v: type(v) is list, "an array"))
        shape_ok = self.shape_ok = self.ok
        self.ok = lambda v: shape_ok(v) and len(v[1]) == len(v[2])

    def explain(self, value: Any, path: str) -> FrameError:
        if self.shape_ok(value):
            return FrameError(f"expected as many sequences as payloads, got "
                              f"{len(value[1])} and {len(value[2])}", field=path,
                              code="bad-field")
        return super().explain(value, path)


def digested(tick: int, every: int, ticks: int) -> bool:
    """Whether the state after ``tick`` is digested: every ``every``-th tick
    (ticks every−1, 2·every−1, …) and always the run's last (``digest_every``)."""
    return (tick + 1) % every == 0 or tick == ticks - 1


def node_digests(records: bytes, names: Iterable[str]) -> dict[str, bytes]:
    """Node name -> digest, from one state's records spliced in name order
    (``names``: every node). Raises ValueError where a record does not name its
    node."""
    found, at = {}, 0
    for name in sorted(names):
        encoded = name.encode()
        if records[at:at + len(encoded)] != encoded:
            raise ValueError(f"the records do not name node {name!r} where they should")
        at += len(encoded)
        found[name] = records[at:at + DIGEST_SIZE]
        at += DIGEST_SIZE
    return found


def differing_nodes(held: bytes, expected: bytes, names: Iterable[str]) -> list[str]:
    """The nodes whose digests differ between two states' records spliced in name
    order (``["?"]`` where the records cannot be read as such, or do not differ)."""
    try:
        ours, theirs = node_digests(held, names), node_digests(expected, names)
    except ValueError:
        return ["?"]
    return [name for name in sorted(ours) if ours[name] != theirs[name]] or ["?"]
