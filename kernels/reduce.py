r"""The gradient-norm reduction: :math:`\sum_i g_i^2` and a non-finite test in one read.

For a flat buffer :math:`g` cut into fixed chunks of ``CHUNK`` elements (``_config``),

.. math::

    S_c = \sum_{i \in c} g_i^2, \qquad
    F_c = \#\{i \in c : |g_i| \le \text{DBL\_MAX}\} - |c|, \qquad
    \|g\|_2^2 = \sum_c S_c \ \text{(in chunk order)},

in float64 whatever the gradient's dtype. :math:`|g_i| \le` DBL_MAX is false exactly for NaN
and :math:`\pm\infty`, so :math:`F \ne 0` exactly when some element is not finite, whatever
the finite values (huge float64 gradients overflow the norm, never the test). It is a
comparison, not arithmetic: a test built on :math:`0 \cdot g_i` breaks under the ``reassoc``
flag, which lets LLVM factor :math:`0 g_1 + 0 g_2` into :math:`0 (g_1 + g_2)`, and that sum
overflows for finite values near DBL_MAX (``_config.FASTMATH`` never grants ``nnan``/``ninf``,
so the comparison is kept; a test checks that inf, NaN and huge finite values are told apart).
The chunks
are summed by whichever thread gets them, each in a fixed order, and
the chunk sums are then added serially in chunk order: the result is the same, bit for bit,
for any number of threads. A buffer below ``PARALLEL_MIN_WORK`` elements is reduced by the
serial kernel (the same loop), so which kernel runs depends only on the size.
"""

from __future__ import annotations

import functools
import types

import numpy as np
from numba import prange

from . import _config, _threads

_MAX = np.finfo(np.float64).max  # |x| <= _MAX is False exactly for NaN and +-inf


def sumsq_chunks(x, chunk):
    """``(sum of squares, finite)`` of a flat float32/float64 array in chunks of ``chunk``.

    Each chunk is read as four interleaved streams (its quarters), each with its own float64
    accumulator: one accumulator would chain every addition through the adder's latency and
    run at half the speed of memory. The NaN/inf test is one comparison per element.
    """
    n = x.size
    nchunks = (n + chunk - 1) // chunk
    sums = np.zeros(nchunks, np.float64)
    flags = np.zeros(nchunks, np.float64)
    for c in prange(nchunks):
        lo = c * chunk
        hi = min(lo + chunk, n)
        q = (hi - lo) // 4
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        bad = 0.0
        for j in range(np.uint64(q)):  # unsigned index: the loop vectorizes
            i = np.uint64(lo) + j
            v0 = np.float64(x[i])
            v1 = np.float64(x[i + np.uint64(q)])
            v2 = np.float64(x[i + np.uint64(2 * q)])
            v3 = np.float64(x[i + np.uint64(3 * q)])
            a0 += v0 * v0
            a1 += v1 * v1
            a2 += v2 * v2
            a3 += v3 * v3
            bad += np.float64((abs(v0) <= _MAX) & (abs(v1) <= _MAX) & (abs(v2) <= _MAX) & (abs(v3) <= _MAX))
        acc = (a0 + a1) + (a2 + a3)
        for i in range(np.uint64(lo + 4 * q), np.uint64(hi)):
            v = np.float64(x[i])
            acc += v * v
            bad += np.float64(abs(v) <= _MAX)
        sums[c] = acc
        flags[c] = bad - (q + (hi - lo - 4 * q))  # 0 when every element is finite
    total = 0.0
    finite = True
    for c in range(nchunks):  # fixed order: independent of the thread count
        total += sums[c]
        finite = finite and flags[c] == 0.0
    return total, finite


@functools.cache
def _kernel(parallel: bool):
    """The serial or parallel reduction. Numba's on-disk cache keys a function by its name and
    code, not by ``parallel=``: compiled twice from one function, whichever variant was cached
    first would be loaded for both (a parallel kernel running serially). So each variant is a
    copy of the function under its own name."""
    from . import _cache

    suffix = "_parallel" if parallel else "_serial"
    fn = types.FunctionType(sumsq_chunks.__code__, sumsq_chunks.__globals__, sumsq_chunks.__name__ + suffix)
    fn.__qualname__ = sumsq_chunks.__qualname__ + suffix
    kernel = _cache.jit(fn, parallel=parallel, fastmath=_config.FASTMATH, error_model=_config.ERROR_MODEL, nogil=True)
    return _threads.ParallelKernel(kernel, lambda: _kernel(False)) if parallel else kernel  # fork/thread safe


def sumsq(x: np.ndarray) -> tuple[float, bool]:
    """Sum of squares (float64) and whether every element is finite, in one pass over ``x``
    (read through a base-class 1-D view: a subclass's reshape may keep two dimensions)."""
    flat = (x if type(x) is np.ndarray else x.view(np.ndarray)).reshape(-1)
    return _kernel(flat.size >= _config.PARALLEL_MIN_WORK)(flat, _config.CHUNK)


def sumsq_all(arrays) -> tuple[float, bool]:
    """``(sum of squares, finite)`` over several flat arrays (``None`` and empty skipped), each
    reduced by :func:`sumsq` and added in order, so the total is thread-count independent."""
    total, finite = 0.0, True
    for g in arrays:
        if g is not None and g.size:
            s, f = sumsq(g)
            total += s
            finite = finite and f
    return total, finite
