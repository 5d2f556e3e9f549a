"""Value checks of the topology format: each returns the checked value or raises
TopologyError naming the key path (the line is added later, by ``lines``)."""

from __future__ import annotations

import datetime
import difflib
import fnmatch
import math
import re
from typing import Any, Iterable

from hiocluster.errors import TopologyError
from hiocluster.protocol.fields import MAX_CREDIT_LAG
from hiocluster.topology.limits import (
    BOX_NAME,
    GLOB_PATTERN,
    MAX_RUN_RESTARTS,
    RUN_RESTARTS,
    RUN_TRANSPORTS,
    SEED_LIMIT,
)

# --- value checks: each raises TopologyError(key_path=...) without a line ---------

def topology_error(message: str, key_path: str) -> TopologyError:
    return TopologyError(message, key_path=key_path)


def type_name(value: object) -> str:
    names = {bool: "bool", dict: "table", list: "array", datetime.datetime: "datetime",
             datetime.date: "date", datetime.time: "time"}
    return names.get(type(value), type(value).__name__)


def int_value(value: object, key_path: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise topology_error(f"expected int, got {type_name(value)}", key_path)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise topology_error(f"must be {bound}, got {value}", key_path)
    return value


def number_value(value: object, key_path: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise topology_error(f"expected number, got {type_name(value)}", key_path)
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise topology_error(f"must be finite, got {value}", key_path)
    if positive and number <= 0:
        raise topology_error(f"must be > 0, got {value}", key_path)
    return number


def text_value(value: object, key_path: str) -> str:
    if not isinstance(value, str):
        raise topology_error(f"expected str, got {type_name(value)}", key_path)
    return value


def table_value(value: object, key_path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise topology_error(f"expected table, got {type_name(value)}", key_path)
    return value


def array_value(value: object, key_path: str) -> list[Any]:
    if not isinstance(value, list):
        raise topology_error(f"expected array, got {type_name(value)}", key_path)
    return value


def suggest(word: str, choices: Iterable[str]) -> str:
    """"; did you mean 'x'?" for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def check_keys(table: dict[str, Any], allowed: tuple[str, ...], prefix: str,
          required: tuple[str, ...] = ()) -> None:
    for key in table:
        if key not in allowed:
            raise topology_error(f"unknown key {key!r}{suggest(key, allowed)}", _join(prefix, key))
    for key in required:
        if key not in table:
            raise topology_error(f"missing required key {key!r}", prefix)


_ADDRESS = re.compile(r"[A-Za-z0-9_.-]{1,253}:(?P<port>\d{1,5})")


def run_value(key: str, value: object) -> int | float | bool | str | None:
    key_path = f"run.{key}"
    if key in ("transport", "restart"):
        allowed = RUN_TRANSPORTS if key == "transport" else RUN_RESTARTS
        if value not in allowed:
            raise topology_error(f"expected one of {', '.join(allowed)}, got {value!r}"
                                 f"{suggest(str(value), allowed)}", key_path)
        return str(value)
    if key == "metrics":  # "" (none) or where the Prometheus endpoint listens
        if not isinstance(value, str):
            raise topology_error(f"expected str, got {type_name(value)}", key_path)
        found = _ADDRESS.fullmatch(value)
        if value and (found is None or int(found["port"]) > 65535):
            raise topology_error(f"expected 'HOST:PORT' (port 0..65535; 0: any free one), "
                                 f"got {value!r}", key_path)
        return value
    if key == "real":
        if not isinstance(value, bool):
            raise topology_error(f"expected bool, got {type_name(value)}", key_path)
        return value
    if key in ("ticks", "capacity", "digest_every"):
        return int_value(value, key_path, 1)
    if key in ("checkpoint_every", "observe_every"):  # 0: 1000 with --checkpoint; never
        return int_value(value, key_path, 0)
    if key == "max_restarts":
        return int_value(value, key_path, 0, MAX_RUN_RESTARTS)
    if key == "credit_lag":
        if value == "auto" or value is None:
            return None
        if isinstance(value, str):
            raise topology_error(f'expected an int or "auto", got {value!r}', key_path)
        return int_value(value, key_path, 1, MAX_CREDIT_LAG)
    if key == "seed":
        return int_value(value, key_path, 0, SEED_LIMIT - 1)
    return number_value(value, key_path, positive=key != "t0")


def _plain(value: object, key_path: str) -> Any:
    """Deep-copy a params value, rejecting TOML dates and times."""
    if isinstance(value, dict):
        return {key: _plain(item, _join(key_path, key)) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item, f"{key_path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        raise topology_error(f"{type_name(value)} values are not allowed in params", key_path)
    return value


def name_value(value: str, pattern: re.Pattern[str], what: str, key_path: str) -> str:
    if not pattern.fullmatch(value):
        raise topology_error(f"invalid {what} name {value!r}: must match {pattern.pattern}", key_path)
    return value


def is_glob(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


def match_names(pattern: str, names: dict[str, int], key_path: str) -> list[str]:
    """The node names ``pattern`` means; ``names``: every node -> its declaration index."""
    if is_glob(pattern):
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise topology_error(f"pattern {pattern!r} matches no node", key_path)
        return matched
    if pattern not in names:
        raise topology_error(f"no node named {pattern!r}{suggest(pattern, names)}", key_path)
    return [pattern]


def endpoint_value(value: object, key_path: str) -> tuple[str, str]:
    text = text_value(value, key_path)
    node, dot, box = text.rpartition(".")
    if not dot or not GLOB_PATTERN.fullmatch(node):
        raise topology_error(f"expected 'node.box', got {text!r}", key_path)
    return node, name_value(box, BOX_NAME, "box", key_path)
