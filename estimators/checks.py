"""Parameter validators shared by metrics, selectors and evaluations (torchmetrics ``utilities/checks``
style).

Each ``check_*`` returns the value it was given (``check_float``: as a float) so a constructor can
validate and store in one expression, and raises ``ValueError`` whose message starts with the
parameter's name, so an error in a grid file points at the key to fix::

    super().__init__(k=check_int("k", k, 1), precision=check_choice("precision", precision, ("float32",)))

``bool`` is a subclass of ``int`` in Python; every integer check here refuses it (``k=True`` is a
typo, not 1). :func:`is_int` is that test alone, for callers whose messages differ.
"""

from __future__ import annotations

from typing import Any


def is_int(value: Any, minimum: int | None = None) -> bool:
    """True when ``value`` is an ``int`` but not a ``bool``, and ``>= minimum`` when that is given."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else a ``ValueError`` naming the parameter."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> int | None:
    """``value`` if it is an int ``>= minimum`` (or None when ``optional``), else a ``ValueError``."""
    if value is None and optional:
        return None
    if not is_int(value, minimum):
        allowed = f"an int >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_float(name: str, value: Any, *, positive: bool, optional: bool = False) -> float | None:
    """``value`` as a float if it is a finite number ``> 0`` (``positive``) or ``>= 0`` (or None when
    ``optional``), else a ``ValueError``. Bools and NaN are refused."""
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if not ok or (value <= 0 if positive else value < 0) or value == float("inf"):
        allowed = ("a finite number > 0" if positive else "a finite number >= 0") + (
            " or None" if optional else ""
        )
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` naming the parameter and the choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
