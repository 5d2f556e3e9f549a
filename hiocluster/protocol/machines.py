"""The two ends of one control connection as state machines (docs/protocol.md §5).

Transitions are data: one table per side keyed ``(state, direction, type)``.
A transition not in the table is an error: sending it raises
:class:`LocalProtocolError` (our bug), receiving it :class:`RemoteProtocolError`;
either way the machine goes to ERROR and every later call fails (code "closed").
"""

from __future__ import annotations

import enum
from typing import ClassVar, NoReturn

from hiocluster.errors import FrameError, LocalProtocolError, RemoteProtocolError
from hiocluster.protocol.fields import CHUNK_SIZE, MAX_BYE_FRAME, MAX_CONTROL_FRAME, MAX_SETUP_FRAME
from hiocluster.protocol.frames import decode, encode
from hiocluster.protocol.messages import (
    Bye,
    Chunk,
    Done,
    Error,
    Grant,
    Hello,
    Message,
    Progress,
    Ready,
    Setup,
    Stop,
)

__all__ = ["ChildState", "ParentState", "ChildMachine", "ParentMachine",
           "CHILD_TRANSITIONS", "PARENT_TRANSITIONS"]


class _State(enum.Enum):
    """Enum members are singletons: hash them by identity, at C speed (hot path)."""

    __hash__ = object.__hash__


class ChildState(_State):
    START = "START"
    AWAIT_SETUP = "AWAIT_SETUP"
    SETTING_UP = "SETTING_UP"
    IDLE = "IDLE"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


class ParentState(_State):
    AWAIT_HELLO = "AWAIT_HELLO"
    HELLO_RECEIVED = "HELLO_RECEIVED"
    AWAIT_READY = "AWAIT_READY"
    IDLE = "IDLE"
    RUNNING = "RUNNING"
    AWAIT_BYE = "AWAIT_BYE"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


SEND, RECV = "send", "recv"
C, P = ChildState, ParentState

#: Every legal transition of the worker's side: (state, direction, type) → next state.
CHILD_TRANSITIONS: dict[tuple[ChildState, str, str], ChildState] = {
    (C.START, SEND, "HELLO"): C.AWAIT_SETUP,
    (C.AWAIT_SETUP, RECV, "SETUP"): C.SETTING_UP,
    (C.SETTING_UP, SEND, "READY"): C.IDLE,
    (C.IDLE, RECV, "GRANT"): C.RUNNING,
    (C.RUNNING, SEND, "PROGRESS"): C.RUNNING,
    (C.RUNNING, SEND, "DONE"): C.IDLE,
    (C.AWAIT_SETUP, RECV, "STOP"): C.STOPPING,
    (C.SETTING_UP, RECV, "STOP"): C.STOPPING,
    (C.IDLE, RECV, "STOP"): C.STOPPING,
    (C.RUNNING, RECV, "STOP"): C.STOPPING,
    (C.STOPPING, SEND, "BYE"): C.CLOSED,
}

#: Every legal transition of the supervisor's side, per worker.
PARENT_TRANSITIONS: dict[tuple[ParentState, str, str], ParentState] = {
    (P.AWAIT_HELLO, RECV, "HELLO"): P.HELLO_RECEIVED,
    (P.HELLO_RECEIVED, SEND, "SETUP"): P.AWAIT_READY,
    (P.AWAIT_READY, RECV, "READY"): P.IDLE,
    (P.IDLE, SEND, "GRANT"): P.RUNNING,
    (P.RUNNING, RECV, "PROGRESS"): P.RUNNING,
    (P.RUNNING, RECV, "DONE"): P.IDLE,
    (P.AWAIT_HELLO, SEND, "STOP"): P.AWAIT_BYE,
    (P.HELLO_RECEIVED, SEND, "STOP"): P.AWAIT_BYE,
    (P.AWAIT_READY, SEND, "STOP"): P.AWAIT_BYE,
    (P.IDLE, SEND, "STOP"): P.AWAIT_BYE,
    (P.RUNNING, SEND, "STOP"): P.AWAIT_BYE,
    # frames already in flight when STOP went out: a HELLO, a READY, PROGRESS, or
    # the DONE of the window being run (only if one is owed: see ParentMachine)
    (P.AWAIT_BYE, RECV, "HELLO"): P.AWAIT_BYE,
    (P.AWAIT_BYE, RECV, "READY"): P.AWAIT_BYE,
    (P.AWAIT_BYE, RECV, "PROGRESS"): P.AWAIT_BYE,
    (P.AWAIT_BYE, RECV, "DONE"): P.AWAIT_BYE,
    (P.AWAIT_BYE, RECV, "CHUNK"): P.AWAIT_BYE,  # a piece of a large BYE
    (P.AWAIT_BYE, RECV, "BYE"): P.CLOSED,
}


class _Machine:
    """Shared mechanics: look up transitions, hold ERROR, decode with limits.

    ``until`` is the last tick granted (-1 before the first GRANT) and ``done``
    the last tick reported done (-1 before the first DONE).
    """

    TRANSITIONS: ClassVar[dict]
    ERROR_STATE: ClassVar[enum.Enum]
    ALLOWED_IN: ClassVar[tuple[type[Message], ...]]
    LIMIT_IN: ClassVar[int]
    #: state -> the message nearly every frame received in it is (decoded quicker)
    EXPECT: ClassVar[dict[enum.Enum, type[Message]]] = {}

    def __init__(self, worker: str | None, initial: enum.Enum) -> None:
        self.worker = worker
        self.state = initial
        self.until = -1
        self.done = -1

    @property
    def tick(self) -> int | None:
        """The last tick known done (None before the first), for error reports."""
        return self.done if self.done >= 0 else None

    def _closed(self) -> NoReturn:
        raise LocalProtocolError("protocol machine is in ERROR; no further use",
                                 tick=self.tick, worker=self.worker, code="closed")

    def _advance(self, direction: str, message: Message) -> None:
        if self.state is self.ERROR_STATE:
            self._closed()
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

    def send(self, message: Message, *, checked: bool = True,
             frame: bytes | None = None) -> bytes:
        """Check that ``message`` may be sent now, advance, and return its frame.

        Args:
            checked: validate every field first; hot-path frames built from values
                that were validated on the way in skip it.
            frame: ``message`` already packed (one GRANT frame serves every child).

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
                                             worker=self.worker, field=error.field,
                                             code="bad-field")
        if frame is None:
            try:
                frame = encode(message)
            except FrameError as exc:
                self.state = self.ERROR_STATE
                raise LocalProtocolError(str(exc), tick=self.tick, worker=self.worker,
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
            self._closed()
        try:
            message = decode(data, limit=self.LIMIT_IN, allowed=self.ALLOWED_IN,
                             expect=self.EXPECT.get(self.state))
        except FrameError:
            self.state = self.ERROR_STATE
            raise
        self._advance(RECV, message)
        return message

    def _check(self, direction: str, message: Message) -> None:
        """Per-message checks against the machine's state (grants and ticks)."""
        kind = type(message)  # no message class has subclasses: quicker than isinstance
        if kind is Grant:
            grant: Grant = message  # type: ignore[assignment]  # kind is Grant: no call
            if grant.until <= self.until:
                self._reject(direction, f"GRANT until {grant.until} but tick {self.until} "
                             "was already granted", field="GRANT.until", code="stale-tick")
            self.until = grant.until
        elif kind is Done:
            done: Done = message  # type: ignore[assignment]  # kind is Done: no call
            if done.until != self.until:
                stale = done.until < self.until
                self._reject(direction, f"DONE until {done.until} but the grant runs "
                             f"until {self.until}" + (" (a tick from the past)" if stale else ""),
                             field="DONE.until", code="stale-tick" if stale else "wrong-tick")
            self.done = done.until
        elif kind is Progress:
            progress: Progress = message  # type: ignore[assignment]  # no call
            tick = -1 if progress.tick is None else progress.tick
            if not self.done <= tick <= self.until:
                self._reject(direction, f"PROGRESS at tick {progress.tick} outside the window "
                             f"{self.done + 1}..{self.until}", field="PROGRESS.tick",
                             code="wrong-tick")

    def _reject(self, direction: str, text: str, field: str, code: str) -> NoReturn:
        self.state = self.ERROR_STATE
        error_class = LocalProtocolError if direction == SEND else RemoteProtocolError
        raise error_class(text, tick=self.tick, worker=self.worker, field=field, code=code)


class ChildMachine(_Machine):
    """The worker's side of its control connection."""

    TRANSITIONS = CHILD_TRANSITIONS
    ERROR_STATE = ChildState.ERROR
    ALLOWED_IN = (Setup, Grant, Stop, Error)
    LIMIT_IN = MAX_SETUP_FRAME
    EXPECT = {ChildState.IDLE: Grant}

    def __init__(self, worker: str | None = None) -> None:
        super().__init__(worker, ChildState.START)

    def send(self, message: Message, *, checked: bool = True,
             frame: bytes | None = None) -> bytes:
        """As :meth:`_Machine.send`; a frame over :data:`MAX_CONTROL_FRAME` (the
        supervisor would drop the connection) raises LocalProtocolError, code
        "too-large", but a BYE's: send that one with :meth:`frames`."""
        frame = super().send(message, checked=checked, frame=frame)
        if len(frame) > MAX_CONTROL_FRAME and type(message) is not Bye:
            self._too_large(message, len(frame), MAX_CONTROL_FRAME)
        return frame

    def frames(self, bye: Bye) -> list[bytes]:
        """The frames that send ``bye``: one, or where that is over
        :data:`MAX_CONTROL_FRAME` (large results), CHUNK frames of its pieces."""
        frame = self.send(bye)
        if len(frame) <= MAX_CONTROL_FRAME:
            return [frame]
        if len(frame) > MAX_BYE_FRAME:
            self._too_large(bye, len(frame), MAX_BYE_FRAME)
        return [encode(Chunk(data=frame[start:start + CHUNK_SIZE],
                             more=start + CHUNK_SIZE < len(frame)))
                for start in range(0, len(frame), CHUNK_SIZE)]

    def _too_large(self, message: Message, size: int, limit: int) -> NoReturn:
        self.state = ChildState.ERROR
        what = " (its nodes' results)" if type(message) is Bye else ""
        raise LocalProtocolError(f"a {message.TYPE} frame of {size:,} bytes{what} is over "
                                 f"the {limit:,} the supervisor accepts", tick=self.tick,
                                 worker=self.worker, field=message.TYPE, code="too-large")


class ParentMachine(_Machine):
    """The supervisor's side of one worker's control connection."""

    TRANSITIONS = PARENT_TRANSITIONS
    ERROR_STATE = ParentState.ERROR
    ALLOWED_IN = (Hello, Ready, Progress, Done, Bye, Chunk, Error)
    LIMIT_IN = MAX_CONTROL_FRAME
    EXPECT = {ParentState.RUNNING: Done}

    def __init__(self, worker: str | None = None) -> None:
        super().__init__(worker, ParentState.AWAIT_HELLO)
        self.done_owed = False  # STOP went out while a window was running
        self.pieces: list[bytes] = []  # a large BYE's CHUNKs so far
        self.pieces_size = 0

    def receive(self, data: bytes) -> Message:
        """As :meth:`_Machine.receive`; a CHUNK is kept, and the last one's BYE (the
        pieces joined, at most :data:`MAX_BYE_FRAME`) is what it returns."""
        message = super().receive(data)
        if type(message) is not Chunk or message.more:  # type: ignore[attr-defined]
            return message
        frame, self.pieces, self.pieces_size = b"".join(self.pieces), [], 0
        try:
            bye = decode(frame, limit=MAX_BYE_FRAME, allowed=(Bye,))
        except FrameError:
            self.state = self.ERROR_STATE
            raise
        self._advance(RECV, bye)
        return bye

    def _check(self, direction: str, message: Message) -> None:
        kind = type(message)  # no message class has subclasses: quicker than isinstance
        if self.state is ParentState.AWAIT_BYE and (kind is Done or kind is Progress):
            if not self.done_owed:
                self._reject(direction, f"{message.TYPE} after STOP, but no window was "
                             "running", field="type", code="unexpected")
            if kind is Done:
                self.done_owed = False
        elif kind is Stop:
            self.done_owed = self.state is ParentState.RUNNING
        elif kind is Chunk:
            chunk: Chunk = message  # type: ignore[assignment]  # kind is Chunk: no call
            self.pieces_size += len(chunk.data)
            if self.pieces_size > MAX_BYE_FRAME:
                self._reject(direction, f"CHUNKs of more than {MAX_BYE_FRAME:,} bytes",
                             field="CHUNK.data", code="too-large")
            self.pieces.append(chunk.data)
        elif kind is Bye and self.pieces:
            self._reject(direction, "a BYE while its CHUNKs were not all in",
                         field="type", code="unexpected")
        elif kind is Hello and self.worker is not None:
            hello: Hello = message  # type: ignore[assignment]  # kind is Hello: no call
            if hello.worker != self.worker:
                self._reject(direction, f"HELLO from {hello.worker!r} on the connection of "
                             f"{self.worker!r}", field="HELLO.worker", code="wrong-worker")
        super()._check(direction, message)
