"""The command line's values: argparse ``type=`` functions, each saying what is wrong
with a value it refuses."""

from __future__ import annotations

import argparse
import tomllib
from typing import Any


def positive_int(text: str, low: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def non_negative_int(text: str) -> int:
    return positive_int(text, 0)


def seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in 0..2**63-1, got {value}")
    return value


def window(text: str) -> int | None:
    if text == "auto":
        return None
    return positive_int(text)


def name(text: str) -> str:
    from hiocluster.protocol.fields import NAME_RE

    if NAME_RE.match(text) is None:
        raise argparse.ArgumentTypeError(f"invalid worker name {text!r}: 1-64 of A-Z a-z 0-9 "
                                         "_ . -, not starting with . or -")
    return text


def address(text: str) -> str:
    from hiocluster.protocol.fields import ADDRESS_RE

    if ADDRESS_RE.match(text) is None:
        raise argparse.ArgumentTypeError(f"expected ipc://PATH, tcp://HOST:PORT or unix://PATH, "
                                         f"got {text!r}")
    return text


def tcp(text: str) -> str:
    checked = address(text)
    host = checked[len("tcp://"):].rpartition(":")[0] if checked.startswith("tcp://") else ""
    if not host or host in ("*", "0.0.0.0"):
        raise argparse.ArgumentTypeError(f"expected tcp://HOST:PORT with a host workers can "
                                         f"reach, got {text!r}")
    return checked


def host(text: str) -> tuple[str, str]:
    """--host NAME=ADDRESS: a host and its agent (tcp://HOST:PORT), or how to start
    one: over SSH (ssh://[USER@]HOST[:PORT]), as a Slurm job step (slurm://NODE)."""
    from hiocluster.topology.spec import SLURM_AGENT, SSH_AGENT

    host_name, _, agent = text.partition("=")
    for scheme, form, pattern in (("ssh://", "ssh://[USER@]HOST[:PORT]", SSH_AGENT),
                                  ("slurm://", "slurm://NODE", SLURM_AGENT)):
        if agent.startswith(scheme):
            if pattern.fullmatch(agent) is None:
                raise argparse.ArgumentTypeError(f"expected {form}, got {agent!r}")
            return name(host_name), agent
    return name(host_name), tcp(agent)


def place(text: str) -> tuple[str, str]:
    """--place WORKER=HOST."""
    worker, _, host_name = text.partition("=")
    return name(worker), name(host_name)


def scale_target(text: str) -> tuple[str, int]:
    """scale NAME=N."""
    service, equals, count = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"expected NAME=N, got {text!r}")
    try:
        value = int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=N with N an integer, got "
                                         f"{text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"N must be 0 or more, got {value}")
    return name(service), value


def sweep_param(text: str) -> tuple[str, list[Any]]:
    """``--param TABLE.PARAM=V1,V2,...``: a name and its values, each read as TOML
    reads a value (``1``, ``0.5``, ``true``, ``"a,b"``), else as a plain string."""
    name, equals, values = text.partition("=")
    if not equals or not name or not values:
        raise argparse.ArgumentTypeError(f"expected TABLE.PARAM=V1,V2,..., got {text!r}")
    try:
        parsed = tomllib.loads(f"v = [{values}]")["v"]
    except tomllib.TOMLDecodeError:
        parsed = values.split(",")
    if not parsed or any(value == "" for value in parsed):
        raise argparse.ArgumentTypeError(f"{name}: an empty value in {values!r}")
    return name, parsed


def seed_list(text: str) -> list[int]:
    """``--seeds 1-10`` (inclusive), ``1,2,5`` or a mix, ``3``: the seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        try:
            first = seed(low)
            last = seed(high) if dash else first
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"--seeds {text!r}: {exc}") from None
        if last < first or last - first >= 100_000:
            raise argparse.ArgumentTypeError(f"--seeds {text!r}: {part!r} is not a range "
                                             f"of at most 100,000 seeds")
        seeds.extend(range(first, last + 1))
    return seeds
