"""The lockstep tick protocol, sans-IO: frames, messages, state machines.

Bytes in, typed messages out (and back). No sockets, no hio, no clock: the
transport moves the bytes, the worker and supervisor act on the messages. The
whole wire format is specified in docs/protocol.md; keep the two in step.

A frame is one msgpack array ``[version, type, body]`` where ``version`` is
:data:`VERSION`, ``type`` a message name such as ``"TICK"`` and ``body`` a map
whose keys are exactly the message's fields. Every field is checked on decode;
a bad one raises :class:`~hiocluster.errors.FrameError` naming it.

Imports: stdlib, msgpack and hiocluster.errors only.
"""

from __future__ import annotations

import enum
import math
import re
import reprlib
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, ClassVar, NoReturn

import msgpack

from .errors import FrameError, LocalProtocolError, RemoteProtocolError

__all__ = [
    "VERSION", "MAX_CONTROL_FRAME", "MAX_DATA_FRAME", "Message", "Hello", "Setup", "Ready",
    "Tick", "Tock", "Stop", "Bye", "Error", "Data", "encode", "decode", "decode_data",
    "check_unpacks",
    "ChildMachine",
    "ParentMachine", "ChildState", "ParentState",
]

VERSION = 1
#: Largest control frame accepted (HELLO, SETUP, TICK, TOCK, ...).
MAX_CONTROL_FRAME = 16 * 1024 * 1024
#: Largest data frame accepted (one batch of messages between two processes per tick).
MAX_DATA_FRAME = 256 * 1024 * 1024
#: Largest string inside any frame (names are far shorter: see NAME_RE).
MAX_STR = 64 * 1024
#: Longest array and map inside any frame.
MAX_ARRAY = 4 * 1024 * 1024
MAX_MAP = 1024 * 1024
MAX_INT = 2**63 - 1

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")
ADDRESS_RE = re.compile(r"(ipc|tcp)://[^\s]{1,200}\Z")
DIGEST_SIZE = 32

# ---------------------------------------------------------------------------
# field checks: a fast ``ok(value)`` on the hot path; ``explain`` finds the
# exact sub-field only once something is already known to be wrong.


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 40, 40


def _short(value: Any) -> str:
    """A short repr, safe for hostile input (bounded depth and length)."""
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Check:
    """A scalar check: ``test(value) -> bool`` and what it expects, for the error."""

    __slots__ = ("ok", "expected")

    def __init__(self, test: Callable[[Any], bool], expected: str) -> None:
        self.ok = test
        self.expected = expected

    def explain(self, value: Any, path: str) -> FrameError:
        return FrameError(f"expected {self.expected}, got {type(value).__name__} "
                          f"{_short(value)}", field=path, code="bad-field")


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
                    return self.key.explain(key, f"{path}.<key {_short(key)}>")
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


class LinkRun(TupleOf):
    """``[link id, [sequence, ...], [payload, ...]]``: increasing sequences, one per payload."""

    __slots__ = ("shape_ok",)

    def __init__(self) -> None:
        super().__init__(UINT, Check(_is_sequences, "an array of increasing integers"),
                         Check(lambda v: type(v) is list, "an array"))
        shape_ok = self.shape_ok = self.ok
        self.ok = lambda v: shape_ok(v) and len(v[1]) == len(v[2])

    def explain(self, value: Any, path: str) -> FrameError:
        if self.shape_ok(value):
            return FrameError(f"expected as many sequences as payloads, got "
                              f"{len(value[1])} and {len(value[2])}", field=path,
                              code="bad-field")
        return super().explain(value, path)


def _is_sequences(value: Any) -> bool:
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
NUMBER = Check(lambda v: type(v) in (int, float) and math.isfinite(v), "a finite number")
POSITIVE = Check(lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0,
                 "a finite number > 0")
_GOOD_NAMES: set[str] = set()  # names already checked: the same few recur every tick
_GOOD_NAMES_MAX = 100_000     # bounded, so a hostile peer cannot grow it forever


def _is_name(value: Any) -> bool:
    if type(value) is not str:  # first: a hostile list or map is unhashable
        return False
    if value in _GOOD_NAMES:
        return True
    if NAME_RE.match(value) is None:
        return False
    if len(_GOOD_NAMES) < _GOOD_NAMES_MAX:
        _GOOD_NAMES.add(value)
    return True


NAME = Check(_is_name, "a name (1-64 of A-Z a-z 0-9 _ . -, not starting with . or -)")
TEXT = Check(lambda v: type(v) is str, "a string")
ADDRESS = Check(lambda v: type(v) is str and ADDRESS_RE.match(v) is not None,
                "an ipc:// or tcp:// address")
DIGEST = Check(lambda v: type(v) is bytes and len(v) == DIGEST_SIZE, f"{DIGEST_SIZE} bytes")
ANY = Check(lambda v: True, "anything")
STATS = MapOf(NAME, UINT)


# ---------------------------------------------------------------------------
# messages


@dataclass(slots=True)
class Message:
    """Base of every frame type. Subclasses list their fields with validators."""

    TYPE: ClassVar[str] = ""
    SCHEMA: ClassVar[dict[str, Check]] = {}

    def to_body(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.SCHEMA}


@dataclass(slots=True)
class Hello(Message):
    """child → parent: who I am and where my data socket listens."""

    TYPE = "HELLO"
    process: str
    pid: int
    data_address: str
    nodes: list[str]
    SCHEMA = {"process": NAME, "pid": UINT, "data_address": ADDRESS, "nodes": ListOf(NAME)}


LINK_ROW = TupleOf(UINT, NAME, NAME, NAME, NAME, UINT)


@dataclass(slots=True)
class Setup(Message):
    """parent → child: clock, seed, where every process listens, and the links.

    ``placement`` maps every node to its process; ``links`` rows are
    ``[id, source, outbox, target, inbox, capacity]`` in canonical order.
    """

    TYPE = "SETUP"
    t0: float
    tock: float
    seed: int
    addresses: dict[str, str]
    placement: dict[str, str]
    links: list[list[Any]]
    SCHEMA = {"t0": NUMBER, "tock": POSITIVE, "seed": UINT, "addresses": MapOf(NAME, ADDRESS),
              "placement": MapOf(NAME, NAME), "links": ListOf(LINK_ROW)}


@dataclass(slots=True)
class Ready(Message):
    """child → parent: nodes built and entered; waiting for the first TICK."""

    TYPE = "READY"
    SCHEMA = {}


@dataclass(slots=True)
class Tick(Message):
    """parent → child: run tick ``n`` once ``expect`` data frames of tick n-1 are in."""

    TYPE = "TICK"
    n: int
    expect: int
    SCHEMA = {"n": UINT, "expect": UINT}


@dataclass(slots=True)
class Tock(Message):
    """child → parent: tick ``n`` done; its data frames went to ``sent``.

    ``digests`` are the node digests at the *start* of tick n (after tick n-1;
    after set-up for n = 0): a worker hashes its nodes after answering, while
    the supervisor works, so hashing is off the barrier's critical path. The
    digests after the last tick come in BYE.
    """

    TYPE = "TOCK"
    n: int
    sent: list[str]
    digests: dict[str, bytes]
    SCHEMA = {"n": UINT, "sent": ListOf(NAME), "digests": MapOf(NAME, DIGEST)}


@dataclass(slots=True)
class Stop(Message):
    """parent → child: stop. ``expect`` frames of the last tick are still to drain
    (None when the run failed and nothing is drained)."""

    TYPE = "STOP"
    reason: str
    expect: int | None = None
    SCHEMA = {"reason": TEXT, "expect": optional(UINT)}


@dataclass(slots=True)
class Bye(Message):
    """child → parent: exit contexts ran; final counters and node digests (after the
    last tick; empty when the run failed); ``metrics``: the sum over its nodes of
    :meth:`Node.metrics`; the process exits next."""

    TYPE = "BYE"
    stats: dict[str, int] = field(default_factory=dict)
    digests: dict[str, bytes] = field(default_factory=dict)
    metrics: dict[str, int] = field(default_factory=dict)
    SCHEMA = {"stats": STATS, "digests": MapOf(NAME, DIGEST), "metrics": STATS}


@dataclass(slots=True)
class Error(Message):
    """either way: something failed. ``field`` names the offending field, if any."""

    TYPE = "ERROR"
    code: str
    detail: str
    field: str = ""
    tick: int | None = None
    node: str | None = None
    SCHEMA = {"code": TEXT, "detail": TEXT, "field": TEXT, "tick": optional(UINT),
              "node": optional(NAME)}


@dataclass(slots=True)
class Data(Message):
    """process → process: every message one process sent another during ``tick``.

    ``messages`` rows are ``[link id, [sequence, ...], [payload, ...]]``: one row
    per link, its messages in send order, sequences and payloads side by side
    (columns, so a receiver hands a whole run to an inbox at once). ``acks`` rows
    ``[link id, count]`` return credit: how many messages the receiver took out of
    the link's inbox during ``tick``.
    """

    TYPE = "DATA"
    tick: int
    source: str
    messages: list[list[Any]]
    acks: list[list[int]]
    SCHEMA = {"tick": UINT, "source": NAME, "messages": ListOf(LinkRun()),
              "acks": ListOf(TupleOf(UINT, UINT))}


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Hello, Setup, Ready, Tick, Tock, Stop, Bye, Error, Data)
}


# ---------------------------------------------------------------------------
# framing


_pack = msgpack.Packer(use_bin_type=True).pack  # resets itself after every pack


def encode(message: Message) -> bytes:
    """Pack ``message`` into one frame.

    Raises:
        FrameError: a field holds something msgpack cannot pack (field "body").
    """
    try:
        return _pack([VERSION, message.TYPE, message.to_body()])
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameError(f"cannot pack {message.TYPE}: {exc}", field="body",
                         code="unpackable") from exc


def _unpack(data: bytes, limit: int, payloads: bool = False) -> Any:
    if len(data) > limit:
        raise FrameError(f"frame of {len(data)} bytes exceeds the limit of {limit}",
                         field="frame", code="oversized")
    if not data:
        raise FrameError("empty frame", field="frame", code="bad-msgpack")
    try:
        # explicit keywords: a **splat costs more than the whole unpack of a TICK
        if payloads:  # user payloads: any string length, int map keys, as packb allows
            return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True,
                                   max_str_len=limit, max_bin_len=limit,
                                   max_array_len=MAX_ARRAY, max_map_len=MAX_MAP, max_ext_len=0)
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                               max_str_len=MAX_STR, max_bin_len=limit, max_array_len=MAX_ARRAY,
                               max_map_len=MAX_MAP, max_ext_len=0)
    except msgpack.ExtraData as exc:
        raise FrameError("trailing bytes after the frame", field="frame",
                         code="bad-msgpack") from exc
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        # ValueError covers FormatError, StackError, truncated input and limits.
        raise FrameError(f"not valid msgpack ({type(exc).__name__}: {exc})", field="frame",
                         code="bad-msgpack") from exc


def decode(data: bytes, *, limit: int = MAX_CONTROL_FRAME,
           allowed: tuple[type[Message], ...] | None = None) -> Message:
    """Unpack and validate one frame.

    Args:
        data: the frame's bytes, untrusted.
        limit: largest frame accepted, in bytes.
        allowed: message classes acceptable here; others raise ``FrameError``
            with field "type" (e.g. a DATA frame on the control socket).

    Raises:
        FrameError: with ``field`` naming what was wrong.
    """
    return _decode(_unpack(data, limit), allowed)


def decode_data(data: bytes) -> Data:
    """Unpack and validate one DATA frame (user payloads: strings up to the frame
    limit and non-string map keys are allowed, as msgpack packs them).

    Raises:
        FrameError: with ``field`` naming what was wrong.
    """
    return _decode(_unpack(data, MAX_DATA_FRAME, payloads=True), (Data,))  # type: ignore


def check_unpacks(data: bytes) -> bytes:
    """Return ``data`` if it unpacks as a DATA frame's receiver unpacks it, else raise
    FrameError (the sender's check that every payload survives the round trip)."""
    _unpack(data, MAX_DATA_FRAME, payloads=True)
    return data


def _decode(frame: Any, allowed: tuple[type[Message], ...] | None) -> Message:
    if type(frame) is not list or len(frame) != 3:
        raise FrameError(f"expected an array [version, type, body], got {_short(frame)}",
                         field="frame", code="bad-frame")
    version, kind, body = frame
    if type(version) is not int or version != VERSION:
        raise FrameError(f"unsupported protocol version {_short(version)} (speak {VERSION})",
                         field="version", code="version")
    cls = MESSAGE_TYPES.get(kind) if type(kind) is str else None
    if cls is None or (allowed is not None and cls not in allowed):
        raise FrameError(f"unknown or unexpected message type {_short(kind)}", field="type",
                         code="bad-type")
    if type(body) is not dict:
        raise FrameError(f"expected a map, got {_short(body)}", field="body", code="bad-field")
    schema = cls.SCHEMA
    if len(body) != len(schema) or not all(map(schema.__contains__, body)):
        for key in body:
            if key not in schema:
                raise FrameError(f"unknown field {_short(key)} in {kind}",
                                 field=f"{kind}.{key}", code="bad-field")
        for name in schema:
            if name not in body and not _has_default(cls, name):
                raise FrameError(f"missing field in {kind}", field=f"{kind}.{name}",
                                 code="bad-field")
    try:
        for name, value in body.items():
            if not schema[name].ok(value):
                raise schema[name].explain(value, f"{kind}.{name}")
    except RecursionError as exc:
        raise FrameError("nested too deeply", field=kind, code="bad-field") from exc
    return cls(**body)


_OPTIONAL: dict[type, frozenset[str]] = {}


def _has_default(cls: type, name: str) -> bool:
    optional = _OPTIONAL.get(cls)
    if optional is None:
        optional = frozenset(f.name for f in fields(cls)
                             if f.default is not MISSING or f.default_factory is not MISSING)
        _OPTIONAL[cls] = optional
    return name in optional


# ---------------------------------------------------------------------------
# state machines


class _State(enum.Enum):
    """Enum members are singletons: hash them by identity, at C speed (hot path)."""

    __hash__ = object.__hash__


class ChildState(_State):
    START = "START"
    AWAIT_SETUP = "AWAIT_SETUP"
    SETTING_UP = "SETTING_UP"
    IDLE = "IDLE"
    TICKING = "TICKING"
    STOPPING = "STOPPING"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


class ParentState(_State):
    AWAIT_HELLO = "AWAIT_HELLO"
    HELLO_RECEIVED = "HELLO_RECEIVED"
    AWAIT_READY = "AWAIT_READY"
    IDLE = "IDLE"
    AWAIT_TOCK = "AWAIT_TOCK"
    AWAIT_BYE = "AWAIT_BYE"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


SEND, RECV = "send", "recv"
C, P = ChildState, ParentState

#: Every legal transition of the child side: (state, direction, type) → next state.
CHILD_TRANSITIONS: dict[tuple[ChildState, str, str], ChildState] = {
    (C.START, SEND, "HELLO"): C.AWAIT_SETUP,
    (C.AWAIT_SETUP, RECV, "SETUP"): C.SETTING_UP,
    (C.SETTING_UP, SEND, "READY"): C.IDLE,
    (C.IDLE, RECV, "TICK"): C.TICKING,
    (C.TICKING, SEND, "TOCK"): C.IDLE,
    (C.AWAIT_SETUP, RECV, "STOP"): C.STOPPING,
    (C.SETTING_UP, RECV, "STOP"): C.STOPPING,
    (C.IDLE, RECV, "STOP"): C.STOPPING,
    # STOP while waiting for the data frames of a tick (another process failed)
    (C.TICKING, RECV, "STOP"): C.STOPPING,
    (C.STOPPING, SEND, "BYE"): C.CLOSED,
}

#: Every legal transition of the parent side, per child.
PARENT_TRANSITIONS: dict[tuple[ParentState, str, str], ParentState] = {
    (P.AWAIT_HELLO, RECV, "HELLO"): P.HELLO_RECEIVED,
    (P.HELLO_RECEIVED, SEND, "SETUP"): P.AWAIT_READY,
    (P.AWAIT_READY, RECV, "READY"): P.IDLE,
    (P.IDLE, SEND, "TICK"): P.AWAIT_TOCK,
    (P.AWAIT_TOCK, RECV, "TOCK"): P.IDLE,
    (P.AWAIT_HELLO, SEND, "STOP"): P.AWAIT_BYE,
    (P.HELLO_RECEIVED, SEND, "STOP"): P.AWAIT_BYE,
    (P.AWAIT_READY, SEND, "STOP"): P.AWAIT_BYE,
    (P.IDLE, SEND, "STOP"): P.AWAIT_BYE,
    (P.AWAIT_TOCK, SEND, "STOP"): P.AWAIT_BYE,
    # frames already in flight when STOP was sent: a HELLO, a READY, or the TOCK
    # of the tick being run (only if one is owed: see ParentMachine._check)
    (P.AWAIT_BYE, RECV, "HELLO"): P.AWAIT_BYE,
    (P.AWAIT_BYE, RECV, "READY"): P.AWAIT_BYE,
    (P.AWAIT_BYE, RECV, "TOCK"): P.AWAIT_BYE,
    (P.AWAIT_BYE, RECV, "BYE"): P.CLOSED,
}


class _Machine:
    """Shared mechanics: look up transitions, hold ERROR, decode with limits."""

    TRANSITIONS: ClassVar[dict]
    ERROR_STATE: ClassVar[enum.Enum]
    ALLOWED_IN: ClassVar[tuple[type[Message], ...]]

    def __init__(self, process: str | None, initial: enum.Enum) -> None:
        self.process = process
        self.state = initial
        self.tick: int | None = None  # last tick sent/received; None before the first

    def _advance(self, direction: str, message: Message) -> None:
        if self.state is self.ERROR_STATE:
            raise LocalProtocolError("protocol machine is in ERROR; no further use",
                                     tick=self.tick, process=self.process, code="closed")
        kind = message.TYPE
        if kind == "ERROR":
            self.state = self.ERROR_STATE
            return
        next_state = self.TRANSITIONS.get((self.state, direction, kind))
        if next_state is None:
            self._reject(direction, f"{kind} not allowed in state {self.state.value}",
                         field="type", code="unexpected")
        self._check(direction, message)
        self.state = next_state

    def send(self, message: Message, *, checked: bool = True) -> bytes:
        """Check that ``message`` may be sent now, advance, and return its frame.

        Args:
            checked: validate every field first; the worker's per-tick TOCK, built
                from values that were validated on the way in, skips it.

        Raises:
            LocalProtocolError: not allowed now, or a field is invalid (our bug);
                the machine goes to ERROR.
        """
        if checked and self.state is not self.ERROR_STATE:
            for name, check in message.SCHEMA.items():
                value = getattr(message, name)
                if not check.ok(value):
                    self.state = self.ERROR_STATE
                    error = check.explain(value, f"{message.TYPE}.{name}")
                    raise LocalProtocolError(f"refusing to send: {error}", tick=self.tick,
                                             process=self.process, field=error.field,
                                             code="bad-field")
        try:
            frame = encode(message)
        except FrameError as exc:
            self.state = self.ERROR_STATE
            raise LocalProtocolError(str(exc), tick=self.tick, process=self.process,
                                     field=exc.field, code=exc.code) from exc
        self._advance(SEND, message)
        return frame

    def receive(self, data: bytes) -> Message:
        """Decode a frame from the peer, check it is allowed now, and advance.

        Raises:
            FrameError: the bytes are not a valid frame (machine goes to ERROR).
            RemoteProtocolError: a valid frame the protocol forbids now.
        """
        if self.state is self.ERROR_STATE:
            raise LocalProtocolError("protocol machine is in ERROR; no further use",
                                     tick=self.tick, process=self.process, code="closed")
        try:
            message = decode(data, allowed=self.ALLOWED_IN)
        except FrameError:
            self.state = self.ERROR_STATE
            raise
        self._advance(RECV, message)
        return message

    def _check(self, direction: str, message: Message) -> None:
        """Per-message field checks against the machine's state (ticks)."""

    def _reject(self, direction: str, text: str, field: str, code: str) -> NoReturn:
        self.state = self.ERROR_STATE
        error_class = LocalProtocolError if direction == SEND else RemoteProtocolError
        raise error_class(text, tick=self.tick, process=self.process, field=field, code=code)


class ChildMachine(_Machine):
    """The child side of one control connection."""

    TRANSITIONS = CHILD_TRANSITIONS
    ERROR_STATE = ChildState.ERROR
    ALLOWED_IN = (Setup, Tick, Stop, Error)

    def __init__(self, process: str | None = None) -> None:
        super().__init__(process, ChildState.START)

    def _check(self, direction: str, message: Message) -> None:
        if isinstance(message, Tick):
            expected = 0 if self.tick is None else self.tick + 1
            if message.n != expected:
                stale = self.tick is not None and message.n <= self.tick
                self._reject(direction, f"TICK {message.n} but the next tick is {expected}"
                             + (" (a tick from the past)" if stale else ""),
                             field="TICK.n", code="stale-tick" if stale else "tick-gap")
            self.tick = message.n
        elif isinstance(message, Tock) and message.n != self.tick:
            self._reject(direction, f"TOCK {message.n} while ticking {self.tick}",
                         field="TOCK.n", code="wrong-tick")


class ParentMachine(_Machine):
    """The parent side of one child's control connection."""

    TRANSITIONS = PARENT_TRANSITIONS
    ERROR_STATE = ParentState.ERROR
    ALLOWED_IN = (Hello, Ready, Tock, Bye, Error)

    def __init__(self, process: str | None = None) -> None:
        super().__init__(process, ParentState.AWAIT_HELLO)
        self.tock_owed = False  # STOP went out while a TICK was unanswered

    def _check(self, direction: str, message: Message) -> None:
        if self.state is ParentState.AWAIT_BYE and isinstance(message, Tock):
            if not self.tock_owed:
                self._reject(direction, f"TOCK {message.n} after STOP, but no TICK was "
                             "unanswered", field="TOCK.n", code="unexpected")
            self.tock_owed = False
        elif isinstance(message, Stop):
            self.tock_owed = self.state is ParentState.AWAIT_TOCK
        if isinstance(message, Tick):
            expected = 0 if self.tick is None else self.tick + 1
            if message.n != expected:
                self._reject(direction, f"TICK {message.n} but the next tick is {expected}",
                             field="TICK.n", code="tick-gap")
            self.tick = message.n
        elif isinstance(message, Tock) and message.n != self.tick:
            past = self.tick is not None and message.n < self.tick
            self._reject(direction, f"TOCK {message.n} answers no TICK (last TICK {self.tick})"
                         + (" (a tick from the past)" if past else ""),
                         field="TOCK.n", code="stale-tick" if past else "wrong-tick")
        elif isinstance(message, Hello) and self.process is not None \
                and message.process != self.process:
            self._reject(direction, f"HELLO from {message.process!r} on the connection of "
                         f"{self.process!r}", field="HELLO.process", code="wrong-process")
