r"""The gradient-norm reduction: :math:`\sum_i g_i^2` and a non-finite test in one read.

For a flat buffer :math:`g` cut into fixed chunks of ``CHUNK`` elements (``_config``),

.. math::

    S_c = \sum_{i \in c} g_i^2, \qquad
    F_c = \sum_{i \in c} 0 \cdot g_i, \qquad
    \|g\|_2^2 = \sum_c S_c \ \text{(in chunk order)},

in float64 whatever the gradient's dtype. :math:`0 \cdot g_i` is 0 for a finite element and
NaN for NaN or :math:`\pm\infty`, so :math:`F \ne 0` exactly when some element is not finite
(it is checked apart from the norm, which may overflow for huge but finite float64
gradients). Not :math:`g_i - g_i`: with the ``reassoc`` flag LLVM rewrites
:math:`F + (g - g)` as :math:`F`; a product by zero cannot be folded without ``nnan``/``ninf``,
which ``_config.FASTMATH`` never grants (a test checks that inf and NaN are seen). The chunks
are summed by whichever thread gets them, each in a fixed order, and
the chunk sums are then added serially in chunk order: the result is the same, bit for bit,
for any number of threads. A buffer below ``PARALLEL_MIN_WORK`` elements is reduced by the
serial kernel (the same loop), so which kernel runs depends only on the size.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import prange

from . import _config


def sumsq_chunks(x, chunk):
    """``(sum of squares, finite)`` of a flat float32/float64 array in chunks of ``chunk``."""
    n = x.size
    nchunks = (n + chunk - 1) // chunk
    sums = np.zeros(nchunks, np.float64)
    flags = np.zeros(nchunks, np.float64)
    for c in prange(nchunks):
        lo = c * chunk
        hi = min(lo + chunk, n)
        acc = 0.0
        bad = 0.0
        for i in range(np.uint64(lo), np.uint64(hi)):  # unsigned index: the loop vectorizes
            v = np.float64(x[i])
            acc += v * v
            bad += v * 0.0
        sums[c] = acc
        flags[c] = bad
    total = 0.0
    finite = True
    for c in range(nchunks):  # fixed order: independent of the thread count
        total += sums[c]
        finite = finite and flags[c] == 0.0
    return total, finite


@functools.cache
def _kernel(parallel: bool):
    from numba import njit

    return njit(parallel=parallel, cache=_config.cache_enabled(), fastmath=_config.FASTMATH,
                error_model=_config.ERROR_MODEL, nogil=True)(sumsq_chunks)


def sumsq(x: np.ndarray) -> tuple[float, bool]:
    """Sum of squares (float64) and whether every element is finite, in one pass over ``x``."""
    flat = x.reshape(-1)
    return _kernel(flat.size >= _config.PARALLEL_MIN_WORK)(flat, _config.CHUNK)
