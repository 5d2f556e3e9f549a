"""The nodes one worker hosts: built from SETUP, stepped by one hio Doist, hashed.

:class:`NodeRunner` imports the node classes, builds the nodes, enters them in
hio's Doist (each separately, so a failing enter context names its node), runs
one ``Doist.recur()`` per tick, writes the digest records of each state
(docs/protocol.md §7) and runs every node's exit contexts, one by one, even
when one raises. Anything a node's own code raises becomes :class:`NodeFailed`
naming it. No sockets.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import pickle
import sys
import time
import traceback
from collections import Counter, deque
from typing import Any, Iterator

import hio
from hio.base.doing import Doist
from xxhash import xxh3_128_digest

from hiocluster import protocol as proto
from hiocluster.errors import FrameError, NodeFailed, Terminated, TickOverrun
from hiocluster.node import Clock, Node, load_class, pack_state
from hiocluster.protocol import arrays
from hiocluster.protocol.fields import short

__all__ = ["NodeRunner", "NodeFailed", "TickOverrun", "Terminated", "blame",
           "MAX_OBSERVED_BYTES"]

#: Most bytes (about) of observations one worker holds in a window (they travel
#: in its DONE, which must stay under MAX_CONTROL_FRAME with its digests): beyond,
#: the worker observes no more, and the run's observations stop at that tick (the
#: result says where). Automatic windows stay well under it.
MAX_OBSERVED_BYTES = 8 * 1024 * 1024
#: Most elements of one array an observe() returns (each is a row of its own).
MAX_OBSERVED_ARRAY = 64

#: Traceback lines sent up with a node failure.
#: Most frames of the user's code shown in a failure's traceback.
TRACEBACK_FRAMES = 8
#: Longest exception message kept whole (the rest is counted, not shown).
MAX_MESSAGE = 2000
#: Where hiocluster's and hio's own frames live: left out of a user's traceback.
_INTERNAL = tuple(os.path.dirname(str(module.__file__)) + os.sep
                  for module in (sys.modules[__name__.partition(".")[0]], hio))


class NodeRunner:
    """The nodes of one worker and the Doist that runs them (see module docstring).

    Args:
        setup: the SETUP message (clock, seed, node rows).
        app_dir: directory to import node classes from.
    """

    def __init__(self, setup: proto.Setup, app_dir: str | None) -> None:
        classes = {}
        by_value: dict[str, type] = {}
        for name, path, *_ in setup.nodes:
            try:
                if path in setup.classes:
                    if path not in by_value:
                        by_value[path] = by_value_class(path, setup.classes[path])
                    classes[name] = by_value[path]
                else:
                    classes[name] = load_class(path, app_dir)
            except ImportError as exc:
                raise NodeFailed(name, -1, str(exc)) from None
        self.nodes: list[Node] = []
        for name, _, params, index, count in setup.nodes:
            with blame(name, -1):
                self.nodes.append(classes[name](name, params, seed=setup.seed,
                                                ticks=setup.ticks, index=index, count=count))
        self.by_name = {node.name: node for node in self.nodes}
        self.clock = Clock()
        for node in self.nodes:
            node.clock = self.clock
        ordered = sorted(self.nodes, key=lambda node: node.name)
        self._states = [(node.name.encode(), node.state) for node in ordered]
        # tyme then advances as hio's own Doist advances it (tyme += tock per recur), so
        # hio's rescheduling arithmetic (retyme = tyme + tock) lines up exactly
        self.doist = Doist(tyme=float(setup.t0), tock=float(setup.tock), real=False,
                           doers=list(self.nodes))
        self.entered = False
        self.tick = -1
        self.busy_since = 0.0   # monotonic start of the tick being run, 0.0 between ticks
        #: the nodes whose class defines observe(), and what they said in the window
        #: under way: name -> [ticks, nodes, values] (taken by :meth:`take_observed`),
        #: until MAX_OBSERVED_BYTES in one window (then ``observed_cut``: none more)
        self.observing = [node for node in self.nodes
                          if type(node).observe is not Node.observe]
        self.observed: dict[str, list[list[Any]]] = {}
        self.observed_room = MAX_OBSERVED_BYTES
        self.observed_cut = -1

    def enter(self) -> None:
        """Run every node's hio enter context."""
        doist = self.doist
        self.entered = True
        for node in self.nodes:
            with blame(node.name, -1):
                doist.deeds.extend(doist.enter(doers=[node]))

    def run_tick(self, tick: int) -> None:
        """Tick ``tick``: every node steps once (one ``Doist.recur()``)."""
        self.tick = self.clock.tick = tick
        self.busy_since = time.monotonic()
        try:
            self.doist.recur()
        except Terminated:
            raise
        except BaseException as exc:  # SystemExit from a node is the node's failure too
            name, self.clock.failed = self.clock.failed or "?", None
            code = "tick-timeout" if isinstance(exc, TickOverrun) else "node-error"
            raise NodeFailed(name, tick, explain(exc), code, headline(exc)) from exc
        finally:
            self.busy_since = 0.0

    def records(self) -> bytes:
        """This state's digest records: ``utf8(name) + xxh3_128(packb(state()))`` per
        node, by name (docs/protocol.md §7). The hot loop of a big worker."""
        hash_, pack, direct = xxh3_128_digest, pack_state, arrays.digest
        try:
            if "numpy" not in sys.modules:  # no array can be in a state: the short way
                return b"".join([name + hash_(pack(state()))
                                 for name, state in self._states])
            return b"".join([name + (direct(value) or hash_(pack(value)))
                             for name, state in self._states for value in (state(),)])
        except Terminated:
            raise
        except BaseException:
            detail = explain()
        for name, state in self._states:  # which node was it? run them one by one
            with blame(name.decode(), self.tick, "state()"):
                value = state()
            try:
                pack_state(value)
            except (TypeError, ValueError, OverflowError) as exc:
                raise NodeFailed(name.decode(), self.tick, (
                    f"state() returned {short(value)} (a {type(value).__name__}), "
                    f"which cannot be digested: {exc}")) from None
        raise NodeFailed("?", self.tick, detail)  # a state() that failed only once

    def observe(self, tick: int) -> None:
        """Every observing node's :meth:`Node.observe` after ``tick``, checked and
        kept in columns; past MAX_OBSERVED_BYTES in a window, none more
        (``observed_cut``). One try around them all (a blame per node costs more
        than what it guards); each dict's values checked at once, at C speed
        (a bool, which passes as a number there, is found by :meth:`take_observed`);
        a small array becomes a row per element (:func:`_expanded`)."""
        if self.observed_cut >= 0:
            return
        observed, isfinite = self.observed, math.isfinite
        node = self.observing[0]
        try:
            for node in self.observing:
                said = node.observe()
                if said is None:
                    continue
                if type(said) is not dict:
                    raise ValueError(f"observe() returned a {type(said).__name__}; expected "
                                     "a dict of names to numbers, or None")
                name = node.name
                try:
                    finite = all(map(isfinite, said.values()))
                except (TypeError, OverflowError):  # not a number: an array, or wrong
                    finite = False
                if not finite:
                    said = _expanded(said)
                size = len(said) * (20 + len(name))  # a row's tick, node and value, packed
                if size > self.observed_room:
                    self.observed_cut = tick
                    for kept in observed.values():  # the whole tick, or none of it
                        while kept[0] and kept[0][-1] == tick:
                            for part in kept:
                                part.pop()
                    return
                self.observed_room -= size
                for key, value in said.items():
                    column = observed.get(key)
                    if column is None:
                        column = observed[_name(key)] = [[], [], []]
                    column[0].append(tick)
                    column[1].append(name)
                    column[2].append(value)
        except (NodeFailed, Terminated):
            raise
        except BaseException:
            with blame(node.name, tick, "observe()"):
                raise

    def take_observed(self) -> dict[str, list[list[Any]]]:
        """The observations of the window under way (for its DONE); the next
        window's start empty, with the whole room again."""
        observed, self.observed = self.observed, {}
        self.observed_room = MAX_OBSERVED_BYTES
        for key, (ticks, nodes, values) in observed.items():
            if bool in set(map(type, values)):
                at = list(map(type, values)).index(bool)
                raise NodeFailed(nodes[at], ticks[at], f"observe() gave {key!r}: "
                                 f"{values[at]!r}; expected a number")
        return observed

    def exit(self) -> list[tuple[str, str]]:
        """Run every node's hio exit contexts (last entered first), each one even when
        another raises; return (node, traceback tail) for each that raised."""
        failures: list[tuple[str, str]] = []
        if not self.entered:
            return failures
        self.entered = False
        deeds = self.doist.deeds
        while deeds:
            deed = deeds.pop()
            if deed[0] is None:  # hio's run-through marker
                continue
            try:
                self.doist.exit(deque([deed]))
            except Terminated:
                raise
            except BaseException:
                failures.append((deed[2].name, explain()))
        return failures

    def metrics(self) -> tuple[dict[str, int], dict[str, dict[str, Any]], dict[str, str]]:
        """Every node's :meth:`Node.metrics`, checked: the sum of the counters, each
        node's own, and the kind of each metric that is not a counter."""
        total: Counter[str] = Counter()
        per_node: dict[str, dict[str, Any]] = {}
        kinds: dict[str, str] = {}
        for node in self.nodes:
            with blame(node.name, self.tick):
                metrics = node.metrics()
                declared = dict(getattr(node, "metric_kinds", {}))
                for name, value in metrics.items():
                    kind = declared.get(name, "counter")
                    if kind not in proto.METRIC_KINDS:
                        raise ValueError(f"metric_kinds gives {name!r} the kind {kind!r}; "
                                         f"kinds: {', '.join(proto.METRIC_KINDS)}")
                    good = proto.UINT.ok(value) if kind == "counter" else \
                        type(value) in (int, float) and math.isfinite(value)
                    if not (proto.is_name(name) and good):
                        raise ValueError(
                            f"metrics() gave {name!r}: {value!r}; expected names of A-Z a-z "
                            "0-9 _ . - and " + ("integers >= 0 (a counter; declare other "
                                                "kinds in metric_kinds)" if kind == "counter"
                                                else "finite numbers"))
                    if kind != "counter":
                        kinds[name] = kind
            total.update({name: value for name, value in metrics.items()
                          if name not in kinds})
            per_node[node.name] = dict(metrics)
        return dict(total), per_node, kinds

    def results(self) -> dict[str, Any]:
        """Every node's :meth:`Node.result` (after the last tick of a finished run),
        checked to travel in a control frame."""
        results: dict[str, Any] = {}
        for node in self.nodes:
            with blame(node.name, self.tick):
                value = node.result()
                try:
                    proto.check_control_value(value)
                except FrameError as exc:
                    raise ValueError(f"result() returned a {type(value).__name__} that "
                                     f"cannot be sent: {exc}") from None
            results[node.name] = value
        return results

    def tell_outcome(self, outcome: str) -> None:
        """What every node's ``exit()`` will see in ``self.outcome``."""
        for node in self.nodes:
            node.outcome = outcome

    def unread(self) -> int:
        """Messages still waiting in inboxes."""
        return sum(len(box) for node in self.nodes for box in node.inbox.values())


def by_value_class(path: str, data: bytes) -> type:
    """A node class its supervisor sent by value (pickled by cloudpickle: SETUP
    comes only from the supervisor that started this worker, proved by its
    credentials). Raises ImportError naming what went wrong."""
    try:
        cls = pickle.loads(data)
    except Exception as exc:
        raise ImportError(f"node class {path}, sent by value, cannot be unpickled here: "
                          f"{type(exc).__name__}: {exc} (the same Python and packages as "
                          "the supervisor's are needed)") from None
    if not (isinstance(cls, type) and issubclass(cls, Node)):
        raise ImportError(f"node class {path}, sent by value, is not a Node subclass")
    return cls


def _expanded(said: dict[Any, Any]) -> dict[Any, Any]:
    """``said`` with each small array (a list, a tuple, a numpy array of at most
    MAX_OBSERVED_ARRAY numbers) as one entry per element, ``name.i`` (``name.i.j``
    for a 2-D array, in C order); ValueError naming the first value that is no
    finite number (nor such an array)."""
    out: dict[Any, Any] = {}
    for key, value in said.items():
        shape = getattr(value, "shape", None)
        if isinstance(value, (list, tuple)) or (shape is not None and shape != ()):
            _name(key)
            if shape is not None:
                items = value.reshape(-1).tolist()
                names = [".".join(map(str, at)) for at in itertools.product(*map(range, shape))]
            else:
                items, names = list(value), [str(at) for at in range(len(value))]
            if len(items) > MAX_OBSERVED_ARRAY:
                raise ValueError(f"observe() gave {key!r}: an array of {len(items)} values; "
                                 f"expected at most {MAX_OBSERVED_ARRAY}")
            for at, item in zip(names, items):
                out[f"{key}.{at}"] = _number(f"{key}.{at}", item)
        else:
            out[key] = _number(key, value)
    return out


def _name(key: Any) -> str:
    """``key``, if a name an observation can have; else ValueError saying so."""
    if type(key) is not str or not proto.is_name(key):
        raise ValueError(f"observe() gave the name {key!r}; expected "
                         "1-64 of A-Z a-z 0-9 _ . -")
    return key


def _number(key: Any, value: Any) -> Any:
    """``value``, if a finite number; else ValueError naming ``key``."""
    if type(value) is bool or not hasattr(value, "__float__"):
        raise ValueError(f"observe() gave {key!r}: {short(value)}; expected a number")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int past float's range
        finite = False
    if not finite:
        raise ValueError(f"observe() gave {key!r}: {short(value)}; expected a finite number")
    return value


@contextlib.contextmanager
def blame(node: str, tick: int, what: str = "") -> Iterator[None]:
    """Turn anything a node's own code raises into NodeFailed naming that node (and,
    with ``what``, the hook that raised: ``state()``)."""
    try:
        yield
    except (NodeFailed, Terminated):
        raise
    except BaseException as exc:
        detail, cause = explain(), headline(exc)
        if what:
            detail, cause = f"{what} raised\n{detail}", f"{what} raised {cause}"
        raise NodeFailed(node, tick, detail, cause=cause) from None


def explain(exc: BaseException | None = None) -> str:
    """The exception being handled (or ``exc``), for a user: the frames of their
    own code (hiocluster's and hio's left out, at most TRACEBACK_FRAMES, whole),
    then the exception's type and message (cut after MAX_MESSAGE characters)."""
    exc = exc if exc is not None else sys.exc_info()[1]
    assert exc is not None
    summary = traceback.TracebackException.from_exception(exc)
    frames = [frame for frame in summary.stack
              if not frame.filename.startswith(_INTERNAL)] or list(summary.stack)[-1:]
    lines = traceback.StackSummary.from_list(frames[-TRACEBACK_FRAMES:]).format()
    message = "".join(summary.format_exception_only()).rstrip()
    if len(message) > MAX_MESSAGE:
        message = f"{message[:MAX_MESSAGE]}... ({len(message) - MAX_MESSAGE} more characters)"
    head = "Traceback (most recent call last; hiocluster's and hio's frames left out):\n"
    return (head + "".join(lines) if lines else "") + message


def headline(exc: BaseException) -> str:
    """``Type: the first line of the message``, cut after 300 characters."""
    line = "".join(traceback.format_exception_only(exc)).strip().splitlines()[0]
    return line if len(line) <= 300 else line[:300] + "..."

