"""Every compile setting of fastopt's kernels, in one place.

Kernels are compiled lazily, once per rule variant, target and dtype. The settings here apply
to all of them:

- ``FASTMATH``: a safe subset of LLVM's fast-math flags. Never ``fastmath=True``: it adds
  ``nnan``/``ninf``, which let LLVM assume gradients hold no NaN or inf and would break every
  NaN/inf check built on the kernels.
- ``ERROR_MODEL``: ``"numpy"``, so division does not test for zero and raise
  (``"python"`` puts a branch in the loop that stops it vectorizing).
- ``CHUNK``: elements per parallel work item. A fixed chunking (not one per thread) keeps the
  work split independent of the thread count; a buffer of one chunk runs on one thread, so
  small chunks (8192 elements: 32 KiB of float32 per stream) let mid-sized buffers use both
  cores.
- ``PARALLEL_MIN_WORK``: the parallel kernel runs when elements x streams (arrays read or
  written: 3 for plain SGD, 7 for Adam) reach this; below it the serial kernel runs, since a
  ``prange`` launch costs ~2 us that a small update cannot win back. Measured on a 2-core
  Xeon (``bench/test_bench_threshold.py``): serial and parallel cross near 50K elements for
  SGD and 14K for Adam, i.e. ~1.2e5 element-streams.
- ``PREFETCH_BYTES``: how far ahead the noise kernels prefetch each stream (4 KiB: the
  Adam-with-noise loop runs ~20% faster at 1e7 float32 with it, 1-4 KiB measured alike).
- ``CUDA_BLOCK``: threads per block of the CUDA kernels (read at every launch, so tests can
  shrink it and make a few dozen elements span several blocks).
- ``CUDA_MAX_BLOCKS``: the most blocks in one grid; ``None`` means ``CUDA_BLOCKS_PER_SM`` per
  multiprocessor, enough to keep every SM busy, and the grid-stride loop covers the rest.
- ``CUDA_REDUCE_ITEMS``: elements per thread of a chunk of the CUDA norm reduction (a chunk
  is ``CUDA_BLOCK * CUDA_REDUCE_ITEMS`` elements, one float64 partial each).
- ``CUDA_FASTMATH``: ``False``. numba-cuda's fast math is all or nothing (flush-to-zero and
  approximate division and square root); NVVM still contracts ``a * b + c`` into FMA.
- ``cache_enabled()``: whether kernels are kept in fastopt's on-disk cache (``_cache``: a
  per-user directory, keyed by fastopt's sources and these settings); where it cannot be
  written, kernels still compile, without it, and a warning says why.
"""

from __future__ import annotations

import os
import warnings

FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
ERROR_MODEL = "numpy"
CHUNK = int(os.environ.get("FASTOPT_CHUNK", 1 << 13))
PARALLEL_MIN_WORK = int(os.environ.get("FASTOPT_PARALLEL_MIN_WORK", 1 << 17))
PREFETCH_BYTES = 4096
CUDA_BLOCK = int(os.environ.get("FASTOPT_CUDA_BLOCK", "256"))
CUDA_MAX_BLOCKS: int | None = None
CUDA_BLOCKS_PER_SM = 8
CUDA_FASTMATH = False
CUDA_REDUCE_ITEMS = int(os.environ.get("FASTOPT_CUDA_REDUCE_ITEMS", "32"))

_cache_ok: bool | None = None


def cache_enabled() -> bool:
    """Whether kernels are cached on disk (``kernels._cache``: a per-user directory).

    Probed once: where the cache directory cannot be created or written, kernels still compile,
    in every process, and a warning says why. ``FASTOPT_NO_CACHE=1`` turns the cache off.
    """
    global _cache_ok
    if _cache_ok is None:
        if os.environ.get("FASTOPT_NO_CACHE", "") not in ("", "0"):
            _cache_ok = False
        else:
            _cache_ok = _probe_cache()
    return _cache_ok


def _probe_cache() -> bool:
    from . import _cache

    try:
        _cache.ensure_writable()
    except OSError as exc:
        warnings.warn(
            f"fastopt: cannot write its kernel cache ({exc}); kernels will be compiled in every "
            "process. Set FASTOPT_CACHE_DIR to a writable directory to fix.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True
