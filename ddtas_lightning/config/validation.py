"""Argument checks shared by every component, so a bad config value always gets the same message.

Every check raises :class:`ConfigError`, a ``ValueError`` subclass: code that catches ``ValueError``
keeps working, and ``python -m ddtas_lightning.train`` turns a ``ConfigError`` raised anywhere (in
``validate_config``, in a constructor Hydra calls, or in a data module's ``setup`` deep inside
Lightning) into one ``error: <message>`` line and exit code 2. Messages name the config key
(``data.K``, ``miner.distance``, ...) and what is allowed. The catalogue of every bad input and its
message is ``tests/test_bad_inputs.py`` / ``docs/bad_inputs.md``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and what is allowed."""


def check_choice(name: str, value: Any, allowed: Collection) -> None:
    """Raise ``ConfigError("<name> must be one of <allowed>, got <value>")`` if ``value`` is not allowed."""
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def as_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int (bools and non-integral floats refused), optionally ``>= minimum``."""
    ok = not isinstance(value, bool)
    try:
        number = int(value) if ok else 0
        ok = ok and float(value) == number  # 2.5 or "2.5" is not an integer
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{name} must be an integer{_bound('>=', minimum)}, got {value!r}")
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {number}")
    return number


def as_float(name: str, value: Any, low: float | None = None, high: float | None = None,
             low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float inside ``[low, high]`` (either end open when ``*_open``)."""
    what = f"a number{_interval(low, high, low_open, high_open)}"
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {what}, got {value!r}") from None
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if number != number or number in (float("inf"), float("-inf")) or too_low or too_high:
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    return number


def _bound(op: str, value: Any) -> str:
    return "" if value is None else f" {op} {value}"


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""
