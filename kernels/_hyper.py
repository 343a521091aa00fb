"""Validation of hyper-parameters: one checker per kind, each raising a message that names
the parameter, the value and what was expected (``torch.optim``'s wording where it has one)."""

from __future__ import annotations

import math
import numbers


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name} value: {value} (must be finite)")
    return value


def nonneg(name: str, value) -> float:
    value = _real(name, value)
    if value < 0.0:
        raise ValueError(f"Invalid {name} value: {value} (must be >= 0)")
    return value


def positive(name: str, value) -> float:
    value = _real(name, value)
    if value <= 0.0:
        raise ValueError(f"Invalid {name} value: {value} (must be > 0)")
    return value


def learning_rate(name: str, value) -> float:
    """A learning rate: finite and >= 0 (a schedule's value is checked with this each step)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or a callable step -> lr, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"Invalid learning rate: {value} (must be a finite number >= 0)")
    return value


def unit_open(name: str, value) -> float:
    """A decay rate in [0, 1)."""
    value = _real(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name} value: {value} (must be in [0, 1))")
    return value


def unit_closed(name: str, value) -> float:
    """A decay rate in [0, 1]."""
    value = _real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid {name} value: {value} (must be in [0, 1])")
    return value


def betas(name: str, value) -> tuple[float, float]:
    try:
        b1, b2 = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {value!r}") from None
    for i, b in enumerate((b1, b2)):
        b = _real(f"beta parameter at index {i}", b)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b} (must be in [0, 1))")
    return float(b1), float(b2)


def flag(name: str, value) -> bool:
    if not isinstance(value, (bool, int)) or value not in (0, 1):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def choice(*options: str):
    def check(name: str, value) -> str:
        if value not in options:
            raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, options))})")
        return value

    return check


def validate(hp: dict, checks: dict) -> dict:
    """Check every entry of ``hp`` against ``checks``; unknown names are a TypeError."""
    unknown = sorted(set(hp) - set(checks))
    if unknown:
        raise TypeError(f"unknown hyper-parameter(s) {', '.join(unknown)}; expected some of {', '.join(checks)}")
    return {name: checks[name](name, value) for name, value in hp.items()}
