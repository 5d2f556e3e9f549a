"""Observations on the wire: what one worker's nodes' ``observe()`` said in a
window, as one ``bin`` of DONE's ``observed`` (docs/protocol.md §3, §7
"Observations").

The bin is a msgpack map, name -> ``[ticks, nodes, values]``: ticks as int64
and values as float64, little-endian, each column one bin; nodes an array of
names. Packing a window's numbers a column at a time costs a fraction of
packing them one by one, and the supervisor reads them only once the next
window is granted: a DONE's own checks stay as cheap as without observations.
"""

from __future__ import annotations

import math
import sys
from array import array
from typing import Any, Mapping

import msgpack

from hiocluster.errors import FrameError
from hiocluster.protocol.fields import MAX_ARRAY, MAX_MAP, is_name

__all__ = ["pack_observed", "unpack_observed", "Columns"]

#: name -> (ticks, nodes, values), one row per index
Columns = dict[str, tuple[list[int], list[str], list[float]]]

_SWAP = sys.byteorder == "big"  # the wire is little-endian


def _column(typecode: str, values: Any) -> bytes:
    column = array(typecode, values)
    if _SWAP:
        column.byteswap()
    return column.tobytes()


def _numbers(typecode: str, data: bytes) -> list[Any]:
    column = array(typecode)
    column.frombytes(data)
    if _SWAP:
        column.byteswap()
    return column.tolist()


def pack_observed(columns: Mapping[str, list[list[Any]]]) -> bytes:
    """One window's observations (name -> [ticks, nodes, values], values floats)
    as DONE's bin."""
    return msgpack.packb({name: [_column("q", ticks), nodes, _column("d", values)]
                          for name, (ticks, nodes, values) in columns.items()},
                         use_bin_type=True)


def unpack_observed(data: bytes, field: str = "DONE.observed") -> Columns:
    """The columns of an untrusted bin.

    Raises:
        FrameError: code ``bad-field``, ``field`` naming the part that is wrong.
    """
    def bad(why: str, where: str = "") -> FrameError:
        return FrameError(f"expected {why}", field=field + where, code="bad-field")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                               max_str_len=len(data), max_bin_len=len(data),
                               max_array_len=MAX_ARRAY, max_map_len=MAX_MAP, max_ext_len=0)
    except Exception:  # msgpack raises many kinds for malformed input
        raise bad("a msgpack map of observations") from None
    if type(body) is not dict:
        raise bad("a map of names to [ticks, nodes, values]")
    columns: Columns = {}
    for name, entry in body.items():
        if not is_name(name):
            raise bad("names as keys", f".<key {str(name)[:64]!r}>")
        if type(entry) is not list or len(entry) != 3 or type(entry[0]) is not bytes \
                or type(entry[1]) is not list or type(entry[2]) is not bytes:
            raise bad("[ticks (bin), nodes (array), values (bin)]", f".{name}")
        ticks, nodes, values = entry
        if not len(ticks) == 8 * len(nodes) == len(values):
            raise bad("ticks, nodes and values of one length", f".{name}")
        tick_list, value_list = _numbers("q", ticks), _numbers("d", values)
        if nodes and (min(tick_list) < 0 or set(map(type, nodes)) != {str}
                      or not all(map(is_name, set(nodes)))
                      or not all(map(math.isfinite, value_list))):
            raise bad("ticks >= 0, node names and finite values", f".{name}")
        columns[name] = (tick_list, nodes, value_list)
    return columns
