"""The checks the config objects run in ``__post_init__``; each message starts with the field's name and says
what to pass instead (the shorthand resolver swaps in the flat keyword's name when that is what was passed)."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

from ..errors import ConfigurationError


def is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_int(name: str, value: object, *, minimum: int = 1, example: int, off: str | None = None) -> None:
    """An int >= ``minimum``; None too when ``off`` says what None does."""
    if value is None and off is not None:
        return
    if not is_int(value, minimum):
        kind = "a positive integer" if minimum == 1 else f"an int >= {minimum}"
        alternative = f", or None ({off})" if off else ""
        raise ConfigurationError(f"{name} must be {kind} (got {value!r}); pass e.g. {example}{alternative}")


def check_seconds(name: str, value: object, *, example: float, off: str | None = None, zero: bool = False) -> None:
    """Seconds > 0 (>= 0 with ``zero``), finite; None too when ``off`` says what None does."""
    if value is None and off is not None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and (value >= 0 if zero else value > 0) and value < math.inf):  # type: ignore[operator]
        bound = ">= 0" if zero else "> 0"
        alternative = f", or None ({off})" if off else ""
        raise ConfigurationError(f"{name} must be seconds {bound} (got {value!r}); pass e.g. {example}{alternative}")


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False (got {value!r})")


def check_path(name: str, value: object, *, off: str | None = None) -> None:
    """A route path (``"/..."``); None too when ``off`` says what None does."""
    if value is None and off is not None:
        return
    if not isinstance(value, str) or not value.startswith("/"):
        alternative = f", or None ({off})" if off else ""
        raise ConfigurationError(f"{name} must be a path starting with '/' (got {value!r}){alternative}")


def check_paths(name: str, value: Mapping[str, str] | None, names: Collection[str]) -> None:
    """Route name -> path, for the route names in ``names``."""
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{name} must be a dict of route name -> path (got {value!r}), e.g. {{}}")
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ConfigurationError(f"{name} names unknown route(s) {unknown}; use {sorted(names)}")
    for route, path in value.items():
        check_path(f"{name}[{route!r}]", path)


def check_callable(name: str, value: object) -> None:
    if value is not None and not callable(value):
        raise ConfigurationError(f"{name} must be a function or None (got {type(value).__name__})")


def check_text(name: str, value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a str or None (got {type(value).__name__})")
