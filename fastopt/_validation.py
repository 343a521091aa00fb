"""Checks on the arrays users hand to fastopt. Every check runs before any buffer is touched
and raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
layout, writability or aliasing) with a message that names the offending argument."""

from __future__ import annotations

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

#: The array types fastopt reads and writes: the base class, and ``np.memmap`` (a file-backed
#: buffer that indexes and stores exactly like it), which kernels see through a base-class view.
#: Every other subclass (``np.matrix``, masked arrays, user subclasses) is a TypeError: its
#: indexing, shape or mask semantics differ, and a kernel would ignore or break them.
ARRAY_TYPES = (np.ndarray, np.memmap)


def check_array_type(a: np.ndarray, where: str) -> None:
    """``a`` (known to be an ``np.ndarray``) is of an accepted type (:data:`ARRAY_TYPES`)."""
    t = type(a)
    if t is np.ndarray or t is np.memmap:
        return
    kind = "a masked array (its mask would be ignored)" if isinstance(a, np.ma.MaskedArray) else \
        f"a {t.__module__}.{t.__qualname__}, a NumPy array subclass"
    raise TypeError(f"{where} is {kind}; fastopt takes plain np.ndarray (or np.memmap) arrays: "
                    "pass np.asarray(...) of it, a plain array over the same memory")


def flat_view(a: np.ndarray, size: int) -> np.ndarray:
    """The flat view a kernel gets of the checked, C-contiguous array ``a``: a base-class 1-D
    ``np.ndarray`` of exactly ``size`` elements over ``a``'s memory. Every host buffer handed
    to a kernel is made here. The result is one by construction: a subclass is first viewed
    as ``np.ndarray`` (whose ``reshape`` keeps the base class; ``np.matrix``'s would stay 2-D),
    and ``reshape(size)`` gives shape ``(size,)`` or raises (C-contiguity, checked before,
    makes it a view, not a copy)."""
    try:
        return (a if type(a) is np.ndarray else a.view(np.ndarray)).reshape(size)
    except ValueError:
        raise TypeError(f"internal error: a kernel would get {a.size} elements of a "
                        f"{type(a).__name__} of shape {a.shape} for {size}") from None


def check_param(p, where: str) -> None:
    """A parameter (or a state buffer): a float32/float64, C-contiguous, writable NumPy array,
    ``np.ndarray`` or ``np.memmap`` (:data:`ARRAY_TYPES`)."""
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{where} must be a NumPy array (float32 or float64), got {type(p).__name__}")
    check_array_type(p, where)
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where} has dtype {p.dtype}; fastopt updates float32 and float64 arrays")
    if not p.flags.c_contiguous:
        raise ValueError(f"{where} is not C-contiguous; pass np.ascontiguousarray(...) and keep that array")
    if not p.flags.writeable:
        raise ValueError(f"{where} is read-only; fastopt updates parameters in place")


def check_no_overlap(arrays, names, extent=None) -> None:
    """No two arrays share memory (a parameter passed twice, or overlapping views).

    ``extent(a) -> (address, nbytes)`` locates an array (default: NumPy's ``__array_interface__``).
    """
    if extent is None:
        extent = _host_extent
    spans = sorted(
        (start, start + nbytes, name)
        for a, name in zip(arrays, names)
        for start, nbytes in [extent(a)]
        if nbytes
    )
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{name} and {other} share memory; each parameter must be its own buffer")


def _host_extent(a: np.ndarray) -> tuple[int, int]:
    return a.__array_interface__["data"][0], a.nbytes


def check_grad(g, p, where) -> None:
    """A gradient for parameter ``p``: a NumPy array of an accepted type (:data:`ARRAY_TYPES`),
    same dtype and shape, C-contiguous, not ``p`` itself.

    ``where`` names the gradient in messages: a string, or an int ``i`` for "gradient i"
    (the string is only built when a check fails: this runs on every step).
    """
    if type(g) is np.ndarray and g.dtype is p.dtype and g.shape == p.shape and g.flags.c_contiguous:
        if g.size and np.may_share_memory(g, p):
            raise ValueError(f"{_name(where)} shares memory with its parameter; pass a separate gradient buffer")
        return
    where = _name(where)
    if not isinstance(g, np.ndarray):
        raise TypeError(f"{where} must be a NumPy array like its parameter, got {type(g).__name__}")
    check_array_type(g, where)
    if g.dtype is not p.dtype and g.dtype != p.dtype:
        raise TypeError(f"{where} has dtype {g.dtype} but its parameter has dtype {p.dtype}")
    if g.shape != p.shape:
        raise ValueError(f"{where} has shape {g.shape} but its parameter has shape {p.shape}")
    if not g.flags.c_contiguous:
        raise ValueError(f"{where} is not C-contiguous")
    if g.size and np.may_share_memory(g, p):
        raise ValueError(f"{where} shares memory with its parameter; pass a separate gradient buffer")


def _name(where) -> str:
    return f"gradient {where}" if isinstance(where, int) else where
