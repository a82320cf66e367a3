"""One way to check numeric and boolean parameters, so every error reads the same:
``<name> must be <range>, got <value>`` — raised at construction, before any training."""
from __future__ import annotations

import math
import numbers
from typing import Any


def _describe(low: float | None, high: float | None, low_open: bool, high_open: bool,
              integer: bool, optional: bool) -> str:
    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        text = f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        text = f"{kind} {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        text = f"{kind} {'<' if high_open else '<='} {high:g}"
    else:
        text = f"a finite {kind[2:] if integer else 'number'}"
    return f"None or {text}" if optional else text


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 optional: bool = False) -> Any:
    """``value`` as an int (``integer``) or float within the range, else a ValueError.

    ``optional`` lets ``None`` through. Booleans and strings are refused, never coerced.
    """
    if value is None and optional:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name} must be {_describe(low, high, low_open, high_open, integer, optional)}"
                         f", got {value!r}")
    return int(value) if integer else float(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else a ValueError (``bool("false")`` is True: never coerce)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value
