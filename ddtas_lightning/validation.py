"""Argument checks shared by every component, so a bad config value always gets the same message."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


def check_choice(name: str, value: Any, allowed: Collection) -> None:
    """Raise ``ValueError("<name> must be one of <allowed>, got <value>")`` if ``value`` is not allowed."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
