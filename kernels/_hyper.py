"""Validation of hyper-parameters: one checker per kind, each raising a message that names
the parameter, the value and what was expected (``torch.optim``'s wording where it has one).

What each kind accepts (and nothing else; every other value is a ``TypeError`` or
``ValueError``, never a later failure):

- real numbers: ``int``, ``float`` and NumPy's integer and float scalars (not ``bool``, not
  strings, not arrays, not complex); finite (an ``int`` too large for a float is rejected);
- pairs (``betas``): a ``tuple`` or ``list`` of exactly two real numbers (not a set, whose
  order is arbitrary, nor an ndarray); the checked value is a tuple of floats;
- flags: ``bool``, ``numpy.bool_`` or the integers 0 and 1;
- choices: one of the listed strings.
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def _float(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float64's range
        raise ValueError(f"Invalid {name} value: {value} (must be finite)") from None


def _real(name: str, value) -> float:
    value = _float(name, value)
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
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or a callable step -> lr, got {type(value).__name__} {value!r}")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
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


def pair(name: str, value, labels: str = "(first, second)") -> tuple:
    """A tuple or list of exactly two items (a set has no order; an ndarray is not saved or
    compared like a value), returned as a tuple."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair {labels} (a tuple or list of two numbers), "
                        f"got {type(value).__name__} {value!r}")
    return tuple(value)


def betas(name: str, value) -> tuple[float, float]:
    b1, b2 = pair(name, value, "(beta1, beta2)")
    out = []
    for i, b in enumerate((b1, b2)):
        b = _real(f"beta parameter at index {i}", b)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b} (must be in [0, 1))")
        out.append(b)
    return out[0], out[1]


def flag(name: str, value) -> bool:
    """A bool: ``True``/``False``, ``numpy.bool_`` or the integers 0 and 1."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def choice(*options: str):
    def check(name: str, value) -> str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, one of {', '.join(map(repr, options))}; "
                            f"got {type(value).__name__} {value!r}")
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


#: The largest finite scalar of each buffer dtype (a plan's scalars are cast to it).
LARGEST = {np.dtype(np.float32): float(np.finfo(np.float32).max), np.dtype(np.float64): float(np.finfo(np.float64).max)}


def largest(dtype) -> float:
    """The largest finite value of ``dtype`` (float64's for any other dtype)."""
    return LARGEST.get(np.dtype(dtype), LARGEST[np.dtype(np.float64)])


def checked_plan(plan, hp: dict, step: int, host: dict, dtype, where) -> tuple:
    """``plan(hp, step, host)`` whose every scalar is finite in ``dtype`` (what the kernel
    reads after the cast), else a ValueError naming ``where`` (the parameter) and the scalar.
    Used by every path that launches a kernel (the optimizers, the flat engine, the sharded
    optimizer's checks and ``fastopt.kernels.update``), before anything changes."""
    try:
        rule, scalars = plan(hp, step, host)
    except (ArithmeticError, ValueError) as exc:  # OverflowError, ZeroDivisionError, math domain
        raise ValueError(f"parameter {where!r}: update {step} cannot be computed from these hyper-parameters "
                         f"and state, it has no finite value ({type(exc).__name__}: {exc})") from None
    limit = largest(dtype)
    for x in scalars:
        if not -limit <= x <= limit:
            name = rule.scalars[scalars.index(x)] if x == x else "a scalar"
            raise ValueError(f"parameter {where!r}: update {step} has a non-finite {name} ({x!r} in {dtype}): "
                             "the hyper-parameters or the loaded state (step, host scalars) overflow; "
                             "nothing was changed")
    return rule, scalars
