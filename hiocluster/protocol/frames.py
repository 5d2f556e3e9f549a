"""Framing: a message to bytes and back, with limits on everything untrusted.

A frame is one msgpack array ``[version, type, body]``; ``body`` is a map
whose keys are exactly the message's fields. :func:`decode` checks every field
and raises :class:`~hiocluster.errors.FrameError` naming the first bad one
(docs/protocol.md §2 and §4).
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

import msgpack

from hiocluster.errors import FrameError
from hiocluster.protocol import arrays
from hiocluster.protocol.fields import (
    MAX_ARRAY,
    MAX_CONTROL_FRAME,
    MAX_DATA_FRAME,
    MAX_INT,
    MAX_MAP,
    MAX_STR,
    is_name,
    is_sequences,
    short,
)
from hiocluster.protocol.messages import MESSAGE_TYPES, Data, Message

__all__ = ["VERSION", "encode", "decode", "decode_data", "read_data", "reload_data",
           "from_body", "check_unpacks", "check_size", "check_control_value",
           "claimed_by"]

#: The protocol version every frame carries; a peer speaking another is refused.
VERSION = 4

# resets itself after every pack; arrays become ext type 1 (see arrays)
_pack = msgpack.Packer(use_bin_type=True, default=arrays.default).pack


def encode(message: Message) -> bytes:
    """Pack ``message`` into one frame.

    Raises:
        FrameError: a field holds something msgpack cannot pack (code "unpackable").
    """
    try:
        return _pack([VERSION, message.TYPE, message.to_body()])
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameError(f"cannot pack {message.TYPE}: {exc}", field="body",
                         code="unpackable") from exc


def _unpack(data: bytes, limit: int, payloads: bool = False) -> Any:
    if len(data) > limit:
        raise _oversized(data, limit)
    if not data:
        raise FrameError("empty frame", field="frame", code="bad-msgpack")
    try:
        # explicit keywords: a **splat costs more than the whole unpack of a GRANT
        if payloads:  # user payloads: any string length, int map keys, as packb allows
            return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True,
                                   max_str_len=limit, max_bin_len=limit,
                                   max_array_len=MAX_ARRAY, max_map_len=MAX_MAP,
                                   max_ext_len=limit, ext_hook=arrays.ext_hook)
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                               max_str_len=MAX_STR, max_bin_len=limit, max_array_len=MAX_ARRAY,
                               max_map_len=MAX_MAP, max_ext_len=limit,
                               ext_hook=arrays.ext_hook)
    except msgpack.ExtraData as exc:
        raise FrameError("trailing bytes after the frame", field="frame",
                         code="bad-msgpack") from exc
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        # ValueError covers FormatError, StackError, truncated input and limits.
        raise FrameError(f"not valid msgpack ({type(exc).__name__}: {exc})", field="frame",
                         code="bad-msgpack") from exc


def decode(data: bytes, *, limit: int = MAX_CONTROL_FRAME,
           allowed: tuple[type[Message], ...] | None = None,
           expect: type[Message] | None = None) -> Message:
    """Unpack and validate one control frame.

    Args:
        data: the frame's bytes, untrusted.
        limit: largest frame accepted, in bytes.
        allowed: message classes acceptable here; others raise ``FrameError``
            with field "type" (e.g. a DATA frame on the control socket).
        expect: the type nearly every frame here has (a DONE while a window runs,
            a GRANT between windows; scalar fields only): a frame of exactly that
            type with every field present and valid is taken at once, in a few
            calls; anything else goes the general way, so every error is the same.

    Raises:
        FrameError: with ``field`` naming what was wrong.
    """
    frame = _unpack(data, limit)
    if expect is not None:
        message = _plain(frame, expect)
        if message is not None:
            return message
    return _decode(frame, allowed)


def _plain(frame: Any, cls: type[Message]) -> Message | None:
    """``frame`` as a ``cls``, if it is one with every field present and valid (what
    :func:`_decode` would make of it); None for anything else."""
    if type(frame) is not list or len(frame) != 3 or frame[1] != cls.TYPE \
            or type(frame[0]) is not int or frame[0] != VERSION:
        return None
    body, schema = frame[2], cls.PLAIN or cls.SCHEMA
    if type(body) is not dict or len(body) != len(schema):
        return None
    for name, check in schema.items():
        if name not in body or not check.ok(body[name]):
            return None
    return cls(**body)


def decode_data(data: bytes) -> Data:
    """Unpack and validate one DATA frame (user payloads: strings up to the frame
    limit and non-string map keys are allowed, as msgpack packs them).

    Raises:
        FrameError: with ``field`` naming what was wrong.
    """
    return _decode(_unpack(data, MAX_DATA_FRAME, payloads=True), (Data,))  # type: ignore


def _rows_ok(messages: Any, acks: Any) -> bool:
    """DATA's ``messages`` and ``acks`` as its schema wants them (the same tests as
    LinkRun and TupleOf(UINT, UINT), unrolled: this runs for every frame)."""
    if type(messages) is not list or type(acks) is not list:
        return False
    for row in messages:
        if type(row) is not list or len(row) != 3:
            return False
        link, sequences, payloads = row
        if type(link) is not int or not 0 <= link <= MAX_INT or type(payloads) is not list \
                or not is_sequences(sequences) or len(sequences) != len(payloads):
            return False
    for row in acks:
        if type(row) is not list or len(row) != 2:
            return False
        link, count = row
        if type(link) is not int or type(count) is not int or not 0 <= link <= MAX_INT \
                or not 0 <= count <= MAX_INT:
            return False
    return True


def read_data(data: bytes) -> tuple[int, str, list[list[Any]], list[list[int]]]:
    """``(tick, source, messages, acks)`` of a DATA frame, checked exactly as
    :func:`decode_data` checks it, on the path every valid frame takes: one unpack,
    the shape of the array and map tested in place, the rows by the schema's own
    checks unrolled, no message object built. A frame that fails any of this is decoded
    again by :func:`decode_data`, which raises its precise error.

    Raises:
        FrameError: with ``field`` naming what was wrong.
    """
    try:
        frame = _unpack(data, MAX_DATA_FRAME, payloads=True)
    except FrameError:
        frame = None
    if type(frame) is list and len(frame) == 3 and frame[1] == "DATA" \
            and frame[0] == VERSION and type(frame[0]) is int:
        body = frame[2]
        if type(body) is dict and len(body) == 4:
            tick, source = body.get("tick"), body.get("source")
            messages, acks = body.get("messages"), body.get("acks")
            if type(tick) is int and 0 <= tick <= MAX_INT and is_name(source) \
                    and _rows_ok(messages, acks):
                return tick, source, messages, acks  # type: ignore[return-value]
    slow = decode_data(data)
    return slow.tick, slow.source, slow.messages, slow.acks


def claimed_by(data: bytes, limit: int = MAX_CONTROL_FRAME) -> tuple[Any, Any]:
    """``(worker, token)`` as a HELLO frame that fails :func:`decode` carries them
    (either None where it has none): a worker of the run whose HELLO is malformed
    still proves who it is with the run's token, so its run can fail at once,
    naming the bad field, instead of waiting for a valid HELLO that never comes.
    Only values of msgpack that unpacks within ``limit``, of type ``"HELLO"``."""
    try:
        frame = _unpack(data, limit)
    except FrameError:
        return None, None
    if type(frame) is list and len(frame) == 3 and frame[1] == "HELLO" \
            and type(frame[2]) is dict:
        return frame[2].get("worker"), frame[2].get("token")
    return None, None


def reload_data(data: bytes) -> Data:
    """Unpack a DATA frame this process packed itself, as a receiver would unpack it
    (the msgpack round trip that makes local payloads look exactly like remote
    ones), without re-checking the fields it built.

    Raises:
        FrameError: a payload does not survive the round trip.
    """
    _, _, body = _unpack(data, MAX_DATA_FRAME, payloads=True)
    return Data(**body)


def from_body(cls: type[Message], body: dict[str, Any]) -> Message:
    """A message of type ``cls`` from a body that travelled inside another message,
    checked like a frame.

    Raises:
        FrameError: a field is invalid.
    """
    return _decode([VERSION, cls.TYPE, body], (cls,))


def check_control_value(value: Any) -> None:
    """Raise FrameError unless ``value`` survives a control frame's round trip
    (msgpack-able, string map keys, strings up to MAX_STR): what a node's
    ``result()`` may be."""
    try:
        data = msgpack.packb(value, use_bin_type=True, default=arrays.default)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameError(f"not msgpack-able: {exc}", field="value", code="unpackable") from exc
    _unpack(data, MAX_CONTROL_FRAME)


def _oversized(data: bytes, limit: int) -> FrameError:
    return FrameError(f"frame of {len(data)} bytes exceeds the limit of {limit}",
                      field="frame", code="oversized")


def check_size(data: bytes) -> bytes:
    """Return ``data`` if it is no bigger than a DATA frame may be, else raise
    FrameError: the sender's whole check for a frame of scalar payloads, which
    come back from msgpack exactly as they were packed."""
    if len(data) > MAX_DATA_FRAME:
        raise _oversized(data, MAX_DATA_FRAME)
    return data


def check_unpacks(data: bytes) -> bytes:
    """Return ``data`` if it unpacks as a DATA frame's receiver unpacks it, else raise
    FrameError (the sender's check that every payload survives the round trip)."""
    _unpack(data, MAX_DATA_FRAME, payloads=True)
    return data


def _decode(frame: Any, allowed: tuple[type[Message], ...] | None) -> Message:
    if type(frame) is not list or len(frame) != 3:
        raise FrameError(f"expected an array [version, type, body], got {short(frame)}",
                         field="frame", code="bad-frame")
    version, kind, body = frame
    if type(version) is not int or version != VERSION:
        raise FrameError(f"unsupported protocol version {short(version)} (speak {VERSION})",
                         field="version", code="version")
    cls = MESSAGE_TYPES.get(kind) if type(kind) is str else None
    if cls is None or (allowed is not None and cls not in allowed):
        raise FrameError(f"unknown or unexpected message type {short(kind)}", field="type",
                         code="bad-type")
    if type(body) is not dict:
        raise FrameError(f"expected a map, got {short(body)}", field="body", code="bad-field")
    schema = cls.SCHEMA
    if len(body) != len(schema) or not all(map(schema.__contains__, body)):
        for key in body:
            if key not in schema:
                raise FrameError(f"unknown field {short(key)} in {kind}",
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
