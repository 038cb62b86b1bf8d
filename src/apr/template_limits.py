"""Bounds on chat-template rendering: a wall-clock limit and a size limit, checked from inside the sandbox.

A template is code from whoever made the GGUF. jinja2's sandbox stops it reaching Python internals but not
from looping or allocating without end, so the sandbox here checks a deadline and a size budget in every
hook a template cannot avoid: each call (methods, globals, macros), filter, attribute and item access,
intercepted operator, namespace assignment, loop iteration and output chunk. Growth needs one of those
steps, and each one is refused *before* it runs when its arguments say it would be too large (`"x" * 10**9`,
`s.expandtabs(10**6)`, `tojson(indent=10**6)`), so memory stays bounded as well as time.

Rendering in-process keeps a normal render at its usual cost (tens of microseconds of checks); a
subprocess per render would add milliseconds to every server request.

    APR_TEMPLATE_TIMEOUT_S    wall-clock limit per render, seconds (default 3)
    APR_TEMPLATE_MAX_CHARS    output limit, characters (default 4,000,000); all text one render produces
                              together (its work budget) is at most 16x that
"""

from __future__ import annotations

import os
import re
import threading
import time

from apr.errors import AprError

DEFAULT_TIMEOUT_S = 3.0
DEFAULT_MAX_CHARS = 4_000_000
WORK_FACTOR = 16  # characters all steps of one render may produce together, in multiples of the output limit
MAX_INT_ARG = 1_000_000  # no honest template passes a count or width this large to a call or filter
_BIG_NUMBER = re.compile(r"\d{7,}")  # a width/precision >= 1,000,000 in a format string
_ITER_CHECK_EVERY = 256


class TemplateLimit(AprError):
    """A template went past a bound: one line naming the limit (exit 2)."""


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise AprError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise AprError(f"{name} must be positive, got {raw!r}")
    return value


def timeout_s() -> float:
    return _env_float("APR_TEMPLATE_TIMEOUT_S", DEFAULT_TIMEOUT_S)


def max_chars() -> int:
    return int(_env_float("APR_TEMPLATE_MAX_CHARS", DEFAULT_MAX_CHARS))


class _State(threading.local):
    """This thread's render: deadline, limits and the work spent (servers render on many threads)."""

    deadline: float | None = None
    limit_s: float = DEFAULT_TIMEOUT_S
    max_chars: int = DEFAULT_MAX_CHARS
    work: int = 0
    budget: int = DEFAULT_MAX_CHARS * WORK_FACTOR


_state = _State()


class Bounded:
    """Context manager: the limits for one render on this thread."""

    def __init__(self, limit_s: float | None = None, limit_chars: int | None = None):
        self.limit_s = timeout_s() if limit_s is None else limit_s
        self.limit_chars = max_chars() if limit_chars is None else limit_chars

    def __enter__(self):
        s = _state
        self._saved = (s.deadline, s.limit_s, s.max_chars, s.work, s.budget)
        s.deadline, s.limit_s, s.max_chars = time.monotonic() + self.limit_s, self.limit_s, self.limit_chars
        s.work, s.budget = 0, self.limit_chars * WORK_FACTOR
        return self

    def __exit__(self, *exc):
        s = _state
        s.deadline, s.limit_s, s.max_chars, s.work, s.budget = self._saved
        return False


def active() -> bool:
    return _state.deadline is not None


def tick() -> None:
    s = _state
    if s.deadline is not None and time.monotonic() > s.deadline:
        raise TemplateLimit(f"chat template ran past its time limit ({s.limit_s:g} s; APR_TEMPLATE_TIMEOUT_S)")


def too_big_message(what: str) -> str:
    return f"chat template {what} past its size limit ({_state.max_chars} characters; APR_TEMPLATE_MAX_CHARS)"


def _too_big(what: str) -> TemplateLimit:
    return TemplateLimit(too_big_message(what))


def max_chars_now() -> int:
    return _state.max_chars


_SIZED = (str, bytes, bytearray, list, tuple, dict, set, frozenset)


def size(x, cap: int | None = None) -> int:
    """Characters `x` stands for, counting shared pieces every time (a join would copy each); stops at cap."""
    cap = _state.max_chars * WORK_FACTOR if cap is None else cap
    if isinstance(x, (str, bytes, bytearray)):
        return len(x)
    if isinstance(x, range):
        return len(x)
    if not isinstance(x, (list, tuple, dict, set, frozenset)):
        return 1
    # every element counts 1 up front, so a huge container is over the cap before any walk; only
    # strings and containers inside are then visited (each string's length on top: a slight overcount)
    total, stack = 0, [x]
    while stack and total <= cap:
        v = stack.pop()
        if isinstance(v, (str, bytes, bytearray)):
            total += len(v)
            continue
        is_dict = isinstance(v, dict)
        total += 1 + len(v) * (2 if is_dict else 1)
        if total > cap:
            break
        items = (*v.keys(), *v.values()) if is_dict else v
        kinds = set(map(type, items))  # C speed: most containers hold numbers, or only strings
        if all(issubclass(k, (str, bytes, bytearray)) for k in kinds):
            total += sum(map(len, items))
        elif any(issubclass(k, _SIZED) for k in kinds):
            stack.extend(i for i in items if isinstance(i, _SIZED))
    return total


def _magnitude(x) -> int:
    """How large an output `x` could ask for as an argument: an int's value, a string's length, a size."""
    if isinstance(x, bool):
        return 1
    if isinstance(x, int):
        if abs(x) > MAX_INT_ARG:
            raise _too_big(f"argument {x}")
        return abs(x)
    if x is None or isinstance(x, float):
        return 1
    return size(x)


def check_args(args, kwargs, *extra) -> None:
    """Refuse a step whose output could exceed the bounds: the largest input times the next largest
    (replace, join, expandtabs, translate, indent, center... are all at most that)."""
    if _state.deadline is None:
        return
    tick()
    sizes = sorted(_magnitude(a) for a in (*extra, *args, *kwargs.values()))
    if not sizes:
        return
    top = sizes[-1]
    bound = (top + 1) * (sizes[-2] + 1 if len(sizes) > 1 else 1)
    s = _state
    if bound > s.budget - s.work:
        raise _too_big("step would grow")


def check_result(value):
    s = _state
    if s.deadline is None:
        return value
    n = size(value, s.max_chars)
    if n > s.max_chars:
        raise _too_big("value grew")
    if isinstance(value, (str, bytes)):  # new text is what costs memory; a list of the same messages does not
        s.work += n
        if s.work > s.budget:
            raise _too_big("work went")
    return value


def check_format_string(fmt: str) -> None:
    if _state.deadline is not None and _BIG_NUMBER.search(fmt):
        raise _too_big("format width went")


def check_output(total: int) -> None:
    tick()
    if total > _state.max_chars:
        raise _too_big("output went")


class BoundedIter:
    """A `{% for %}` loop's iterable: the deadline is checked as items go by (a loop body may call nothing)."""

    __slots__ = ("_it",)

    def __init__(self, iterable):
        tick()
        self._it = iterable

    def __len__(self):
        return len(self._it)  # TypeError for an iterator, as the loop context expects

    def __iter__(self):
        for i, item in enumerate(self._it):
            if i % _ITER_CHECK_EVERY == 0:
                tick()
            yield item


def bounded_iter(iterable):
    return BoundedIter(iterable)
