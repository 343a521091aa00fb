"""The CUDA kernels: every rule's one element function, as a ``numba.cuda`` grid-stride loop.

The loops are rendered by :func:`kernels._build.render` from the same :class:`~kernels._build.Rule`
objects as the CPU loops, and the element function is compiled from the same Python function
with ``cuda.jit(device=True, inline="always")``: there is no second copy of any formula. A
float32 kernel is specialised on float32 arrays and float32 scalars, so it does float32 math
only (the element functions hold no numeric literal; ``tests/cuda/test_cuda_ptx.py`` checks the PTX
for ``.f64``).

Two loops per rule:

- **uniform**, ``kernel(param, grad, *states, grad_scale, *scalars)``: one segment, the step's
  scalars passed as kernel arguments. This is what the optimizers launch (one launch per
  parameter). The scalars travel in the launch's own parameter buffer, so a step copies
  nothing from the host and never waits on the device; a table in device memory would need a
  host-to-device copy per step (every step's bias corrections differ), and with it either a
  pinned buffer per step in flight or a stream synchronization.
- **segmented**, ``kernel(param, grad, *states, bounds, table)``: the CPU kernel's arguments, for
  one flat buffer cut into segments with one row of scalars each (``kernels._build``). Each
  thread finds the segment of its element by binary search in ``bounds``, starting from the
  segment of its previous element (the grid-stride index only grows). ``bounds`` and
  ``table`` must be device arrays; :func:`run_cuda` copies host ones (one small asynchronous
  copy per call).

With gradient noise (``grad_noise``), a noise variant of each loop (:func:`cuda_noise_kernel`)
adds ``noise_std * z_j`` to the scaled gradient, ``z_j`` drawn per element from
``kernels.noise.generator(dtype, split="compare")``: the CPU noise kernel's numbers. For
``clip_grad_norm`` / ``skip_nonfinite``, :func:`sumsq_partials` reduces a gradient to float64
per-chunk sums of squares and non-finite flags that do not depend on the block count.

``numba.cuda`` is imported on first use, never by ``import fastopt``. :func:`require` returns
it or raises :class:`CudaUnavailableError` saying what is missing (the numba-cuda package, a
driver, a GPU or NVVM). With ``NUMBA_ENABLE_CUDASIM=1`` set before Numba is imported, the
kernels run in Numba's CUDA simulator (slow Python, one block at a time), which is how the
tests check them without a GPU.
"""

from __future__ import annotations

import functools

import numpy as np

from . import _build, _config


class CudaUnavailableError(RuntimeError):
    """CUDA was asked for (a GPU array was passed) but cannot be used here; the message says why."""


_INSTALL = ("pip install 'fastopt[cuda12]' (CUDA 12 driver), 'fastopt[cuda13]' (CUDA 13) or "
            "'fastopt[cuda]' (numba-cuda with a system CUDA toolkit)")
_NO_PACKAGE = f"fastopt's CUDA backend needs the numba-cuda package, which is not installed: {_INSTALL}"
_UNAVAILABLE = "GPU arrays need CUDA, which is unavailable here: "


def numba_cuda():
    """``numba.cuda`` from the numba-cuda package (enough to compile PTX; running needs
    :func:`require`). Numba's built-in ``numba.cuda`` is deprecated and not used."""
    try:
        import numba_cuda  # noqa: F401
    except ImportError:
        raise CudaUnavailableError(_UNAVAILABLE + _NO_PACKAGE) from None
    from numba import cuda

    return cuda


@functools.lru_cache(maxsize=1)
def _load():
    """``(numba.cuda, None)``, or ``(None, reason)`` when it cannot run kernels here."""
    try:
        cuda = numba_cuda()
    except CudaUnavailableError:
        return None, _NO_PACKAGE
    if simulator():
        return cuda, None
    error = cuda.cuda_error()
    if error:
        return None, f"the CUDA driver could not be initialised ({' '.join(error.split())})"
    try:
        ngpus = len(cuda.gpus)
    except Exception as exc:  # noqa: BLE001  (the driver raises CudaSupportError and others)
        return None, f"no CUDA GPU could be listed ({exc})"
    if ngpus == 0:
        return None, "no CUDA GPU was found"
    from numba.cuda.cudadrv import nvvm

    if not nvvm.is_available():
        return None, f"NVVM (libnvvm, the CUDA toolkit's compiler) was not found: {_INSTALL}"
    return cuda, None


def simulator() -> bool:
    """Whether Numba's CUDA simulator is on (``NUMBA_ENABLE_CUDASIM=1`` before Numba was imported)."""
    try:
        from numba.cuda.core import config
    except ImportError:
        return False
    return bool(config.ENABLE_CUDASIM)


def available() -> bool:
    """Whether CUDA kernels can run here (a GPU, or the simulator)."""
    return _load()[0] is not None


def require():
    """The ``numba.cuda`` module, or :class:`CudaUnavailableError` saying why it cannot be used."""
    cuda, reason = _load()
    if cuda is None:
        raise CudaUnavailableError(f"{_UNAVAILABLE}{reason}. "
                                   "(Set NUMBA_ENABLE_CUDASIM=1 before importing Numba to use the CUDA simulator.)")
    return cuda


_UNIFORM = '''
def {fname}(param, grad, {state_args}grad_scale, {scalar_args}):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    n = param.size
    while i < n:
        {outputs} = element(param[i], grad[i] * grad_scale, {state_loads}{scalar_args})
        i += stride
'''

# The segmented loops: each thread finds its element's segment (its row of the table) by a
# binary search in ``bounds``, starting from the segment of its previous element.
_SEGMENT_SEARCH = '''
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    n = param.size
    last = bounds.size - 1
    s = 0
    while i < n:
        hi = last
        while hi - s > 1:
            mid = (s + hi) // 2
            if bounds[mid] <= i:
                s = mid
            else:
                hi = mid
        grad_scale = table[s, 0]'''

_SEGMENTED = '''
def {fname}(param, grad, {state_args}bounds, table):''' + _SEGMENT_SEARCH + '''
{unpack}
        {outputs} = element(param[i], grad[i] * grad_scale, {state_loads}{scalar_args})
        i += stride
'''

_UNIFORM_NOISE = '''
def {fname}(param, grad, {state_args}grad_scale, {scalar_args}, noise_std, noise_key, noise_offset):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    n = param.size
    while i < n:
        g = grad[i] * grad_scale + noise_std * normal(noise_key, noise_offset + np.uint64(i))
        {outputs} = element(param[i], g, {state_loads}{scalar_args})
        i += stride
'''

_SEGMENTED_NOISE = '''
def {fname}(param, grad, {state_args}bounds, table, noise_key, noise_offset):''' + _SEGMENT_SEARCH + '''
        noise_std = table[s, NOISE_COL]
{unpack}
        g = grad[i] * grad_scale + noise_std * normal(noise_key, noise_offset + np.uint64(i))
        {outputs} = element(param[i], g, {state_loads}{scalar_args})
        i += stride
'''

_SUMSQ = '''
def sumsq_partials(x, chunk, sums, flags):
    sq = cuda.shared.array({threads}, np.float64)
    bad = cuda.shared.array({threads}, np.float64)
    t = cuda.threadIdx.x
    n = x.size
    nchunks = (n + chunk - 1) // chunk
    c = cuda.blockIdx.x
    while c < nchunks:
        lo = c * chunk
        hi = min(lo + chunk, n)
        acc = np.float64(0.0)
        nan = np.float64(0.0)
        i = lo + t
        while i < hi:
            v = np.float64(x[i])
            acc += v * v
            nan += v * np.float64(0.0)
            i += {threads}
        sq[t] = acc
        bad[t] = nan
        cuda.syncthreads()
        half = {threads} // 2
        while half > 0:
            if t < half:
                sq[t] += sq[t + half]
                bad[t] += bad[t + half]
            cuda.syncthreads()
            half //= 2
        if t == 0:
            sums[c] = sq[0]
            flags[c] = bad[0]
        cuda.syncthreads()
        c += cuda.gridDim.x
'''

_FILL = '''
def fill(out, value):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < out.size:
        out[i] = value
        i += stride
'''


@functools.cache
def _device_function(rule: _build.Rule):
    return numba_cuda().jit(device=True, inline="always")(rule.element)


def kernel_source(rule: _build.Rule, segmented: bool) -> tuple[str, str]:
    """``(fname, source)`` of ``rule``'s CUDA loop."""
    template = _SEGMENTED if segmented else _UNIFORM
    kind = "segmented" if segmented else "uniform"
    fname = f"{rule.name}_cuda_{kind}_{_build._source_hash(rule, template)}"
    return fname, _build.render(rule, template, fname, indent=8)


@functools.cache
def python_kernel(rule: _build.Rule, segmented: bool):
    """The generated Python function of ``rule``'s CUDA loop, before ``cuda.jit`` (for
    ``cuda.compile_ptx``, which needs NVVM but no GPU)."""
    cuda = numba_cuda()
    fname, source = kernel_source(rule, segmented)
    return _build.compile_source(source, fname, {"cuda": cuda, "element": _device_function(rule)})


@functools.cache
def cuda_kernel(rule: _build.Rule, segmented: bool):
    """The compiled CUDA kernel of ``rule`` (specialised per dtype by numba-cuda on first launch)."""
    cuda = require()
    options = {"fastmath": _config.CUDA_FASTMATH}
    if not simulator():
        options["cache"] = _config.cache_enabled()
    return cuda.jit(**options)(python_kernel(rule, segmented))


@functools.cache
def cuda_noise_kernel(rule: _build.Rule, segmented: bool, dtype):
    """The CUDA kernel of ``rule`` with gradient noise, for buffers of ``dtype``:

    - uniform: ``kernel(param, grad, *states, grad_scale, *scalars, noise_std, noise_key, noise_offset)``;
    - segmented: ``kernel(param, grad, *states, bounds, table, noise_key, noise_offset)``, the noise
      standard deviation in the table's column ``rule.ncols`` (the CPU noise kernel's arguments).

    Element ``i`` gets ``g_i * grad_scale + noise_std * z_j``, ``z_j = normal(noise_key, j)``
    with ``j = noise_offset + i``: ``kernels.noise.generator(dtype, split="compare")``, the
    CPU's deviates computed by arithmetic alone (one per thread, no scratch buffer).
    """
    cuda = require()
    options = {"fastmath": _config.CUDA_FASTMATH}
    if not simulator():
        options["cache"] = _config.cache_enabled()
    return cuda.jit(**options)(python_noise_kernel(rule, segmented, np.dtype(dtype)))


@functools.cache
def python_noise_kernel(rule: _build.Rule, segmented: bool, dtype):
    """The generated Python function of :func:`cuda_noise_kernel`, before ``cuda.jit`` (for
    ``cuda.compile_ptx``)."""
    from . import noise

    cuda = numba_cuda()
    dtype = np.dtype(dtype)
    template = _SEGMENTED_NOISE if segmented else _UNIFORM_NOISE
    with open(noise.__file__, "rb") as f:
        digest = _build._source_hash(rule, template + f.read().decode())
    fname = f"{rule.name}_cuda_noise_{'segmented' if segmented else 'uniform'}_{dtype.name}_{digest}"
    source = _build.render(rule, template, fname, indent=8)
    return _build.compile_source(source, fname, {
        "cuda": cuda, "np": np, "element": _device_function(rule), "NOISE_COL": rule.ncols,
        "normal": noise.generator(dtype, split="compare")[1]})


@functools.cache
def _sumsq_kernel(threads: int):
    if threads < 1 or threads & (threads - 1):
        raise ValueError(f"the CUDA reduction needs a power-of-two block size, got CUDA_BLOCK={threads}")
    cuda = require()
    source = _SUMSQ.format(threads=threads)
    return cuda.jit(_build.compile_source(source, "sumsq_partials", {"cuda": cuda, "np": np}))


def reduce_chunk() -> int:
    """Elements per chunk of the CUDA norm reduction: ``CUDA_BLOCK * CUDA_REDUCE_ITEMS``."""
    return _config.CUDA_BLOCK * _config.CUDA_REDUCE_ITEMS


def reduce_chunks(n: int) -> int:
    """How many chunk partials :func:`sumsq_partials` writes for ``n`` elements."""
    chunk = reduce_chunk()
    return -(-n // chunk)


def sumsq_partials(x, sums, flags, stream=0, device_id: int = 0) -> None:
    r"""Per-chunk partial sums of squares of the flat device array ``x``, on the device.

    ``x`` is cut into fixed chunks of :func:`reduce_chunk` elements; chunk :math:`c` is
    reduced by one block (blocks take chunks ``b, b + gridDim, ...``): thread :math:`t` sums
    :math:`g_i^2` and :math:`0 \cdot g_i` in float64 over :math:`i = lo + t, lo + t + T, ...`,
    then the block adds its threads' sums by a fixed tree in shared memory, and
    ``sums[c]``/``flags[c]`` get the chunk's :math:`S_c` and :math:`F_c` (as in
    :mod:`kernels.reduce`: :math:`F_c \ne 0` exactly when the chunk holds NaN or inf).
    Every partial depends on the chunk and ``CUDA_BLOCK`` only, never on how many blocks run.
    ``sums`` and ``flags`` are float64 device arrays of :func:`reduce_chunks` ``(x.size)``.
    """
    n = x.size
    if n == 0:
        return
    nchunks = reduce_chunks(n)
    blocks, threads = launch_shape(nchunks * _config.CUDA_BLOCK, device_id)
    _sumsq_kernel(threads)[blocks, threads, stream](x, np.int64(reduce_chunk()), sums, flags)


def run_uniform_noise(rule: _build.Rule, param, grad, states, row, noise_key, noise_offset,
                      stream=0, device_id: int = 0) -> None:
    """One launch of ``rule``'s uniform noise kernel: ``row`` is ``(grad_scale, *scalars,
    noise_std)`` (buffer dtype), ``noise_key`` the step's key, ``noise_offset`` the index of
    ``param[0]`` in the noise stream."""
    n = param.size
    if n == 0:
        return
    blocks, threads = launch_shape(n, device_id)
    kernel = cuda_noise_kernel(rule, False, param.dtype)
    kernel[blocks, threads, stream](param, grad, *states, *row[: rule.ncols + 1], np.uint64(noise_key),
                                    np.uint64(noise_offset))


def run_cuda_noise(rule: _build.Rule, param, grad, states, bounds, table, noise_key, noise_offset,
                   stream=0, device_id: int = 0) -> None:
    """The noise counterpart of :func:`run_cuda` (the arguments of the CPU noise kernel)."""
    if isinstance(table, np.ndarray) and isinstance(bounds, np.ndarray) and bounds.size == 2:
        run_uniform_noise(rule, param, grad, states, table[0], noise_key, noise_offset, stream, device_id)
        return
    n = param.size
    if n == 0:
        return
    cuda = require()
    if isinstance(bounds, np.ndarray):
        bounds = cuda.to_device(bounds, stream=stream)
    if isinstance(table, np.ndarray):
        table = cuda.to_device(np.ascontiguousarray(table), stream=stream)
    blocks, threads = launch_shape(n, device_id)
    cuda_noise_kernel(rule, True, param.dtype)[blocks, threads, stream](
        param, grad, *states, bounds, table, np.uint64(noise_key), np.uint64(noise_offset))


@functools.cache
def _fill_kernel():
    cuda = require()
    return cuda.jit(_build.compile_source(_FILL, "fill", {"cuda": cuda}))


@functools.cache
def _multiprocessors(device_id: int) -> int | None:
    cuda = require()
    try:
        return int(cuda.gpus[device_id].MULTIPROCESSOR_COUNT)
    except Exception:  # noqa: BLE001  (the simulator's device has no attributes)
        return None


def launch_shape(n: int, device_id: int = 0) -> tuple[int, int]:
    """``(blocks, threads)`` for ``n`` elements: ``CUDA_BLOCK`` threads per block and enough
    blocks for one element per thread, capped at ``CUDA_MAX_BLOCKS`` (default: ``CUDA_BLOCKS_PER_SM``
    per multiprocessor); the grid-stride loop covers the rest."""
    threads = _config.CUDA_BLOCK
    blocks = max(1, -(-n // threads))
    cap = _config.CUDA_MAX_BLOCKS
    if cap is None:
        sms = _multiprocessors(device_id)
        cap = None if sms is None else sms * _config.CUDA_BLOCKS_PER_SM
    if cap is not None:
        blocks = min(blocks, max(1, cap))
    return blocks, threads


def run_uniform(rule: _build.Rule, param, grad, states, row, stream=0, device_id: int = 0) -> None:
    """One launch of ``rule``'s uniform kernel over flat device arrays.

    ``row`` is ``(grad_scale, *scalars)`` as NumPy scalars of the buffer's dtype (a row of a
    host table: ``table[0, :rule.ncols]``); Python floats would make the kernel float64.
    """
    n = param.size
    if n == 0:
        return
    blocks, threads = launch_shape(n, device_id)
    cuda_kernel(rule, False)[blocks, threads, stream](param, grad, *states, *row[: rule.ncols])


def run_segmented(rule: _build.Rule, param, grad, states, bounds, table, stream=0, device_id: int = 0) -> None:
    """One launch of ``rule``'s segmented kernel; ``bounds`` and ``table`` on the device."""
    n = param.size
    if n == 0:
        return
    blocks, threads = launch_shape(n, device_id)
    cuda_kernel(rule, True)[blocks, threads, stream](param, grad, *states, bounds, table)


def run_cuda(rule: _build.Rule, param, grad, states, bounds, table, stream=0, device_id: int = 0) -> None:
    """Run ``rule`` over flat device arrays: the CUDA counterpart of :func:`kernels._build.run_cpu`.

    With host (NumPy) ``bounds`` and ``table`` of one segment, the uniform kernel runs with the
    scalars as arguments (no copy); otherwise the segmented kernel runs, after copying host
    ``bounds``/``table`` to the device on ``stream``.
    """
    if isinstance(table, np.ndarray) and isinstance(bounds, np.ndarray) and bounds.size == 2:
        run_uniform(rule, param, grad, states, table[0], stream, device_id)
        return
    cuda = require()
    if isinstance(bounds, np.ndarray):
        bounds = cuda.to_device(bounds, stream=stream)
    if isinstance(table, np.ndarray):
        table = cuda.to_device(np.ascontiguousarray(table), stream=stream)
    run_segmented(rule, param, grad, states, bounds, table, stream, device_id)


def fill(out, value, stream=0, device_id: int = 0) -> None:
    """Set every element of the flat device array ``out`` to ``value`` (cast to its dtype)."""
    if out.size:
        blocks, threads = launch_shape(out.size, device_id)
        _fill_kernel()[blocks, threads, stream](out, out.dtype.type(value))
