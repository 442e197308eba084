"""Numbers that reach math, checked before any work starts: one parser per kind of value.

Every weight, scale, learning rate, density or tolerance goes through :func:`number` (finite, within its range),
every count (steps, epochs, rank, batch size, prefix length) through :func:`count`, and every list of adapter
weights through :func:`weights` (the text of ``--weights``) and :func:`check_weights` (one per adapter). The CLI's
option types (:mod:`adapterkit.cli.options`) call these same functions, so the library and the command line refuse
the same values with the same words.
"""

from __future__ import annotations

import math
from typing import Sequence

from adapterkit.errors import RequestError

#: the largest magnitude of an adapter weight: far beyond any use, small enough that w·s·B stays finite in float32
MAX_WEIGHT = 1e6
#: the largest count (steps, epochs, rank, batch size, prefix length, seed): beyond any use, and small enough that a
#: tensor sized by it stays within torch's and numpy's 64-bit sizes (larger ones raise their own errors, not ours)
MAX_COUNT = 2**31 - 1


def number(value, name: str, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high]`` (an end is excluded when ``*_open``); else RequestError."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a number, got {value!r}") from None
    except OverflowError:  # an integer (or fraction) beyond any float
        raise RequestError(f"{name} must be a finite number, got one beyond the range of floats") from None
    if isinstance(value, bool) or not math.isfinite(result):
        raise RequestError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (result < low or (low_open and result == low))
    too_high = high is not None and (result > high or (high_open and result == high))
    if too_low or too_high:
        raise RequestError(f"{name} must be in {_interval(low, high, low_open, high_open)}, got {result:g}")
    return result


def count(value, name: str, low: int = 1, high: int | None = MAX_COUNT) -> int:
    """``value`` as an integer ≥ ``low`` and ≤ ``high`` (default :data:`MAX_COUNT`); else RequestError."""
    if isinstance(value, str):
        try:
            value = int(value, 10)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be a whole number, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        # Python refuses to print an integer of more than 4300 digits
        shown = value if value.bit_length() < 1000 else f"an integer of {value.bit_length()} bits"
        raise RequestError(f"{name} must be {bound}, got {shown}")
    return value


def weights(text: str, name: str = "--weights") -> list[float]:
    """``"0.7,0.3"`` -> ``[0.7, 0.3]``: finite weights of magnitude at most :data:`MAX_WEIGHT`."""
    parts = [part.strip() for part in str(text).split(",")]
    if not parts or any(part == "" for part in parts):
        raise RequestError(f"{name} {text!r} is not a comma-separated list of numbers")
    return [number(part, f"{name} entry {part!r}", -MAX_WEIGHT, MAX_WEIGHT) for part in parts]


def check_weights(values: Sequence[float] | None, adapters: int, name: str = "weights") -> list[float]:
    """One finite weight per adapter (default 1 each)."""
    if values is None:
        return [1.0] * adapters
    values = list(values)
    if len(values) != adapters:
        raise RequestError(f"{len(values)} {name} given for {adapters} adapter{'s' if adapters != 1 else ''}: "
                           "give one weight per adapter")
    return [number(v, f"{name[:-1] if name.endswith('s') else name} {v!r}", -MAX_WEIGHT, MAX_WEIGHT) for v in values]


def _interval(low, high, low_open, high_open) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"
