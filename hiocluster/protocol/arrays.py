"""Array payloads: numpy arrays as a msgpack ext type, so they travel in DATA
frames (and results, and node states) like any msgpack value.

Ext type 1 (docs/protocol.md §2): its data is itself msgpack, the array
``[dtype, shape, contents]``: ``dtype`` numpy's ``dtype.str`` (byte order, kind
and size: ``"<f8"``, ``"|b1"``, ``"<i4"``, ``"<c16"``), ``shape`` a list of
uints, ``contents`` the bytes of the array in C order. A worker written in
another language reads it without numpy. Packing and unpacking copy the
contents once, with no per-element Python work. numpy scalars (``np.float64``)
travel as the Python numbers they hold.

numpy is optional: it is imported only when an array is sent or arrives.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import msgpack
import xxhash

__all__ = ["ARRAY_EXT", "default", "ext_hook", "digest", "arrays_size", "ARRAY_KINDS",
           "MAX_DIMENSIONS"]

#: The ext type code of an array.
ARRAY_EXT = 1
#: The kinds of dtype an array payload may have: bool, signed and unsigned ints,
#: floats, complex (no objects, strings or records: they do not survive as bytes).
ARRAY_KINDS = "biufc"
#: Most dimensions an arriving array may have.
MAX_DIMENSIONS = 32


def default(value: Any) -> Any:
    """msgpack's ``default``: an array becomes ext type 1, a numpy scalar its Python
    number; anything else cannot be packed (TypeError names its type)."""
    numpy = sys.modules.get("numpy")  # not imported: the value cannot be numpy's
    if numpy is not None:
        if isinstance(value, numpy.ndarray):
            if value.dtype.kind not in ARRAY_KINDS:
                raise TypeError(f"cannot send a numpy array of dtype {value.dtype} (kinds: "
                                "bool, int, uint, float, complex)")
            contents = numpy.ascontiguousarray(value).tobytes()
            return msgpack.ExtType(ARRAY_EXT, msgpack.packb(
                [value.dtype.str, list(value.shape), contents], use_bin_type=True))
        if isinstance(value, numpy.generic):
            return value.item()
    raise TypeError(f"cannot serialize {type(value).__name__!r} object")


def ext_hook(code: int, data: bytes) -> Any:
    """msgpack's ``ext_hook``: ext type 1 back to a numpy array (a fresh, writable
    one); anything else is refused (ValueError names what was wrong)."""
    if code != ARRAY_EXT:
        raise ValueError(f"unknown msgpack ext type {code}")
    try:
        dtype, shape, contents = msgpack.unpackb(data, raw=False, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"an array (ext type 1) that is not [dtype, shape, bytes]: "
                         f"{exc}") from None
    if type(dtype) is not str or type(shape) is not list or type(contents) is not bytes \
            or len(shape) > MAX_DIMENSIONS \
            or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError("an array (ext type 1) that is not [dtype, shape, bytes]")
    try:
        import numpy
    except ImportError:
        raise ValueError("an array payload arrived, but numpy is not installed here "
                         "(pip install numpy)") from None
    try:
        kind = numpy.dtype(dtype)
    except (TypeError, ValueError):
        raise ValueError(f"an array of unknown dtype {dtype[:40]!r}") from None
    if kind.kind not in ARRAY_KINDS or kind.str != dtype:
        raise ValueError(f"an array of dtype {dtype[:40]!r}: not one that can travel")
    if math.prod(shape) * kind.itemsize != len(contents):
        raise ValueError(f"an array of shape {shape} and dtype {dtype} with "
                         f"{len(contents)} bytes of contents")
    return numpy.frombuffer(contents, dtype=kind).reshape(shape).copy()


def arrays_size(rows: list[list[Any]]) -> int | None:
    """The bytes of the payloads of DATA ``rows`` (``[link, sequences, payloads]``)
    when every payload is a plain numpy array of a kind that travels (at most
    MAX_DIMENSIONS of them), else None. Such a payload always comes back from msgpack as
    ``array.copy()`` (a fresh, writable, C-ordered array of the same dtype and
    shape): what a sender may use instead of packing and unpacking it."""
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return None
    ndarray, size = numpy.ndarray, 0
    for row in rows:
        for value in row[2]:
            if type(value) is not ndarray or value.dtype.kind not in ARRAY_KINDS \
                    or value.ndim > MAX_DIMENSIONS:
                return None
            size += value.nbytes
    return size


#: Arrays at least this big are digested without being packed (see :func:`digest`).
DIGEST_DIRECT_BYTES = 4096
_FIXEXT = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}


def digest(value: Any) -> bytes | None:
    """xxh3_128 of ``packb(value)`` when ``value`` is a big array, computed without
    packing it: the msgpack header bytes, then the array's own memory (no copy of
    a C-ordered array). None for anything else (pack it). The same bytes are
    hashed either way, so a digest never depends on which way it was made."""
    numpy = sys.modules.get("numpy")
    if numpy is None or type(value) is not numpy.ndarray \
            or value.nbytes < DIGEST_DIRECT_BYTES or value.dtype.kind not in ARRAY_KINDS:
        return None
    key = (value.dtype.str, value.shape)
    prefix = _PREFIXES.get(key)
    if prefix is None:
        prefix = _prefix(value.dtype.str, value.shape, value.nbytes)
        if len(_PREFIXES) < 256:  # the few shapes a run's states have, not every one
            _PREFIXES[key] = prefix
    hasher = xxhash.xxh3_128(prefix)
    hasher.update(value if value.flags.c_contiguous else numpy.ascontiguousarray(value))
    return hasher.digest()


#: msgpack's bytes before an array's contents, by (dtype, shape)
_PREFIXES: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _prefix(dtype: str, shape: tuple[int, ...], size: int) -> bytes:
    """The bytes ``packb`` writes for an array before its contents: the ext header,
    then ``[dtype, shape, bin header]``."""
    head = b"\x93" + msgpack.packb(dtype) + msgpack.packb(list(shape))
    head += (b"\xc5" + size.to_bytes(2, "big")) if size < 65536 else \
        (b"\xc6" + size.to_bytes(4, "big"))
    inner = len(head) + size
    if inner in _FIXEXT:  # pragma: no cover - too small to get here
        ext = bytes([_FIXEXT[inner], ARRAY_EXT])
    elif inner < 65536:
        ext = b"\xc8" + inner.to_bytes(2, "big") + bytes([ARRAY_EXT])
    else:
        ext = b"\xc9" + inner.to_bytes(4, "big") + bytes([ARRAY_EXT])
    return ext + head
