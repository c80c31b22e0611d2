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
