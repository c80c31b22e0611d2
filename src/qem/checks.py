"""One home for argument checks and option parsing: every public entry point validates its
arguments with these, so that a bad value gets the same clear qem error everywhere."""

from __future__ import annotations

import math
from enum import Enum
from typing import TypeVar

import numpy as np

from qem.errors import InvalidParameterError

E = TypeVar("E", bound=Enum)


def parse_option(enum: type[E], value: object, name: str) -> E:
    """The member of ``enum`` named by ``value``, or an error listing the choices."""
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(repr(member.value) for member in enum)
        raise InvalidParameterError(f"{name} must be one of {choices}, got {value!r}.") from None


def check_count(name: str, value: object) -> int:
    """``value`` as an int, or an error unless it is an integer >= 1 (not a bool or float)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InvalidParameterError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def check_positive(name: str, value: object, hint: str = "") -> float:
    """``value`` as a float, or an error unless it is a finite real number > 0 (a string such as
    "1" is refused rather than converted)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidParameterError(f"{name} must be a number, got {value!r}. {hint}".rstrip())
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise InvalidParameterError(f"{name} must be a finite number > 0, got {value!r}. {hint}")
    return value


MAX_EPSILON = 500.0
"""Largest target epsilon qem calibrates to. Beyond it e^epsilon overflows the accountants and
the number means nothing as a privacy statement; for a non-private reference fine-tune without
qem (method ``nonprivate``)."""


def _number(value: object, message: str) -> float:
    """``value`` as a float if it is a real number (bool excluded), else InvalidParameterError
    with ``message``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidParameterError(message)
    return float(value)


def check_epsilon(epsilon: float) -> float:
    """Return epsilon as a float, or raise unless it is a number in (0, MAX_EPSILON]."""
    epsilon = _number(
        epsilon,
        f"epsilon must be a number, got {epsilon!r}; typical private fine-tuning budgets are "
        "0.5 to 8.",
    )
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise InvalidParameterError(
            f"epsilon must be a finite number > 0, got {epsilon!r}; "
            "typical private fine-tuning budgets are 0.5 to 8."
        )
    if epsilon > MAX_EPSILON:
        raise InvalidParameterError(
            f"epsilon = {epsilon:g} exceeds {MAX_EPSILON:g}: no accountant can represent it and "
            "it promises no privacy; for a non-private reference use method 'nonprivate'."
        )
    return epsilon


def check_delta(delta: float) -> float:
    """Return delta as a float, or raise if it is not a number in the open interval (0, 1)."""
    delta = _number(
        delta,
        f"delta must be a number in (0, 1) in Gaussian-DP mode, got {delta!r}; choose delta "
        "well below 1/N, for example 1e-5 (mode 'pure' takes no delta).",
    )
    if not math.isfinite(delta) or not 0.0 < delta < 1.0:
        raise InvalidParameterError(
            f"delta must lie strictly between 0 and 1, got {delta!r}; "
            "choose delta well below 1/N, for example 1e-5."
        )
    return delta


def check_in_interval(
    name: str, value: object, low: float, high: float, *, closed: str = "neither"
) -> float:
    """``value`` as a float, or an error unless it is a real number in the interval from
    ``low`` to ``high``; ``closed`` names the ends included: "neither", "low", "high", "both"."""
    with_low, with_high = closed in ("low", "both"), closed in ("high", "both")
    interval = f"{'[' if with_low else '('}{low:g}, {high:g}{']' if with_high else ')'}"
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidParameterError(f"{name} must be a number in {interval}, got {value!r}.")
    number = float(value)
    above = number >= low if with_low else number > low
    below = number <= high if with_high else number < high
    if not (math.isfinite(number) and above and below):
        raise InvalidParameterError(f"{name} must lie in {interval}, got {value!r}.")
    return number
