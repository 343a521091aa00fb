"""Build the loops of every update rule from its one element function.

An update rule's math lives in one place: an *element function* of scalars,

    element(p, g, s_1, ..., s_k, c_1, ..., c_m) -> (p', s_1', ..., s_k')

where ``p`` is a parameter, ``g`` its (already scaled) gradient, ``s_j`` the rule's state
buffers at that element and ``c_j`` the per-step scalars the host computed in float64 and
cast to the buffer's dtype (learning rate, bias corrections, ...). Element functions use no
numeric literals: a Python ``1`` or ``0.5`` is a float64 to Numba and would promote float32
math to float64; every constant arrives as one of the ``c_j``.

This module turns a :class:`Rule` into loops by generating their source from a template:

- the CPU kernel, ``kernel(param, grad, *states, bounds, table)``, compiled twice from the
  same source: ``parallel=True`` (a ``prange`` over fixed chunks of ``CHUNK`` elements) and
  serial (the same loop, run by one thread, for small buffers: ``use_parallel``);
- the CUDA kernel (``kernels.cuda``), a grid-stride loop over the same element function.

``bounds`` (int64, ``nseg + 1`` offsets, ``bounds[0] == 0``, ``bounds[-1] == param.size``)
cuts the flat buffer into segments and ``table`` (``nseg x ncols``, the buffer's dtype) holds
one row of scalars per segment: column 0 is the gradient scale (-1 for ``maximize``, times a
clip factor), the rule's scalars follow. A plain array is one segment; a flat buffer of
many tensors in several param groups is still one launch.

With gradient noise (``grad_noise``), a second template adds ``noise_std * z_j`` to each
scaled gradient, ``noise_std`` from the table's column ``rule.ncols`` (one past the rule's
scalars) and ``z_j`` the counter-based normal deviate of element ``j = noise_offset + i``
(``kernels.noise``). Deviates come in blocks of 32 elements (elements ``k`` and ``k + 16`` of
a block share one hash), so the noise loop runs block by block: a ``_blocks`` function hashes
16 counters, draws 32 deviates and updates the block's 32 elements in one vectorized pass, the
hashing and Box-Muller arithmetic overlapping the memory traffic. It prefetches its streams
4 KiB ahead (the arithmetic would otherwise slow the loads) and is compiled for 512-bit
vectors where the CPU has them (``kernels._llvm``). A block cut by a chunk or segment end is
copied to a scratch block and run through the same function, so every element's numbers come
from the same code, whatever the chunking, the thread count or the parameter split. The
``_blocks`` function is inlined into the kernel (``forceinline``), so a kernel holds all of its
code and runs the same instructions whether it was compiled in this process or loaded from the
cache. The noise-free loop is the plain template, unchanged.

The generated source is compiled under this file's name, so the on-disk cache (``_cache``: a
per-user directory keyed by fastopt's kernel sources and settings) can stamp it; the function
name carries a hash of the rule's source file, the template and the compile flags
(``_config``), so each variant has its own entry.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import _config, _threads

#: Columns every table starts with, before the rule's own scalars.
GENERIC_COLUMNS = ("grad_scale",)


@dataclass(frozen=True, eq=False)  # identity equality and hash: rules are singletons, looked up per step
class Rule:
    """One compiled variant of an update rule.

    Parameters
    ----------
    name:
        Unique identifier, used in kernel names (``"adam_amsgrad"``).
    element:
        The element function (see the module docstring).
    state:
        Names of the state buffers, in the element function's order.
    scalars:
        Names of the per-step scalars, in the element function's order.
    """

    name: str
    element: Callable = field(repr=False)
    state: tuple[str, ...]
    scalars: tuple[str, ...]

    @property
    def ncols(self) -> int:
        return len(GENERIC_COLUMNS) + len(self.scalars)


_CPU_TEMPLATE = '''
def {fname}(param, grad, {state_args}bounds, table):
    n = param.size
    nchunks = (n + {chunk} - 1) // {chunk}
    for c in prange(nchunks):
        lo = c * {chunk}
        hi = min(lo + {chunk}, n)
        s = np.searchsorted(bounds, lo, side="right") - 1
        while lo < hi:
            end = min(bounds[s + 1], hi)
            grad_scale = table[s, 0]
{unpack}
            for i in range(np.uint64(lo), np.uint64(end)):  # unsigned: no negative-index wraparound,
                {outputs} = element(param[i], grad[i] * grad_scale, {state_loads}{scalar_args})
            lo = end  # which would keep LLVM from vectorizing the loop
            s += 1
'''


_CPU_NOISE_TEMPLATE = '''
def {fname}_blocks(param_, grad_, {state_args_}at, nblocks, counter, grad_scale, noise_std, {scalar_args}):
    prefer_wide_vectors()
    for b in range(nblocks):
        ahead = at + PREFETCH
        for line in range(np.uint64(0), BLOCK, LINE):
{prefetch}
        for k in range(HALF_BLOCK):  # hash k of the block feeds elements k and k + 16
            z0, z1 = pair_at(counter)
            counter += GOLDEN
            i = at + k
            j = i + HALF_BLOCK
            g = grad_[i] * grad_scale + noise_std * z0
            {outputs_i} = element(param_[i], g, {state_loads_i}{scalar_args})
            g = grad_[j] * grad_scale + noise_std * z1
            {outputs_j} = element(param_[j], g, {state_loads_j}{scalar_args})
        at += BLOCK


def {fname}(param, grad, {state_args}bounds, table, noise_key, noise_offset):
    n = param.size
    offset = np.uint64(noise_offset)  # element i is element offset + i of the noise stream
    nchunks = (n + {chunk} - 1) // {chunk}
    for c in prange(nchunks):
        prefer_wide_vectors()  # the block function is inlined here (forceinline): same vectors
        lo = c * {chunk}
        hi = min(lo + {chunk}, n)
        scratch = np.empty(({nstreams}, BLOCK), param.dtype)  # a block cut by a chunk or segment end
        s = np.searchsorted(bounds, lo, side="right") - 1
        while lo < hi:
            end = min(bounds[s + 1], hi)
            grad_scale = table[s, 0]
            noise_std = table[s, NOISE_COL]
{unpack}
            first = np.uint64(lo)
            last = np.uint64(end)
            # noise blocks are BLOCK elements from a multiple of BLOCK in the stream: the whole
            # ones in [lo, end), and a cut one at each end where that end is not aligned
            lead = (BLOCK - (offset + first) % BLOCK) % BLOCK  # elements before the first boundary
            whole_from = first + lead
            nwhole = (last - whole_from) // BLOCK if whole_from <= last else np.uint64(0)
            whole_to = whole_from + nwhole * BLOCK
            if nwhole > 0:
                {fname}_blocks({streams}, whole_from, nwhole,
                               hash_counter(noise_key, (offset + whole_from) >> ONE),
                               grad_scale, noise_std, {scalar_args})
            for cut in range(2):  # the same loop on a copy of a cut block: same code, same numbers
                if cut == 0:  # the block holding first, when first is not on a boundary
                    present = lead > 0 and last > first
                    base = whole_from - BLOCK  # may wrap below zero: unsigned arithmetic, fine
                else:  # the block holding last - 1, when last is not on a boundary
                    present = whole_from <= last and whole_to < last
                    base = whole_to
                if not present:
                    continue
                for r in range(BLOCK):
                    q = base + np.uint64(r)
                    inside = q - first < last - first
{copy_in}
                {fname}_blocks({scratch_rows}, np.uint64(0), np.uint64(1),
                               hash_counter(noise_key, (offset + base) >> ONE),
                               grad_scale, noise_std, {scalar_args})
                for r in range(BLOCK):
                    q = base + np.uint64(r)
                    if q - first < last - first:
{copy_out}
            lo = end
            s += 1
'''


def _source_hash(rule: Rule, template: str) -> str:
    h = hashlib.sha256(template.encode())
    h.update(repr((rule.name, rule.state, rule.scalars)).encode())
    # the compile settings too: Numba's cache does not see them, and a kernel cached under
    # other flags must not be loaded
    h.update(repr((sorted(_config.FASTMATH), _config.ERROR_MODEL)).encode())
    try:
        with open(inspect.getsourcefile(rule.element), "rb") as f:
            h.update(f.read())
    except (OSError, TypeError):  # no source file (interactive): hash the bytecode
        h.update(rule.element.__code__.co_code)
    return h.hexdigest()[:10]


def render(rule: Rule, template: str, fname: str, indent: int = 12) -> str:
    """The source of one loop over ``rule``'s element function (``indent``: of ``{unpack}``)."""
    indent = " " * indent
    unpack = "\n".join(
        f"{indent}{name} = table[s, {j + len(GENERIC_COLUMNS)}]" for j, name in enumerate(rule.scalars)
    )
    streams = ("param", "grad") + rule.state
    written = ("param",) + rule.state

    def items(names, index, suffix=""):  # "a[i], b[i], "
        return "".join(f"{name}{suffix}[{index}], " for name in names)

    return template.format(
        fname=fname,
        chunk=_config.CHUNK,
        state_args="".join(f"{s}, " for s in rule.state),
        unpack=unpack,
        outputs=items(written, "i").rstrip(" "),
        state_loads=items(rule.state, "i"),
        # the noise template: elements i and j of the arrays its block function gets (suffix _)
        outputs_i=items(written, "i", "_").rstrip(" "),
        state_loads_i=items(rule.state, "i", "_"),
        outputs_j=items(written, "j", "_").rstrip(" "),
        state_loads_j=items(rule.state, "j", "_"),
        nstreams=len(streams),
        state_args_="".join(f"{s}_, " for s in rule.state),
        streams=", ".join(streams),
        scratch_rows=", ".join(f"scratch[{k}]" for k in range(len(streams))),
        prefetch="\n".join(f"            prefetch({name}_, ahead + line)" for name in streams),
        copy_in="\n".join(f"{indent}        scratch[{k}, r] = {name}[q] if inside else {name}[first]"
                          for k, name in enumerate(streams)),
        copy_out="\n".join(f"{indent}            {name}[q] = scratch[{streams.index(name)}, r]" for name in written),
        scalar_args=", ".join(rule.scalars),
    )


def compile_source(source: str, fname: str, namespace: dict) -> Callable:
    """Execute generated source as if it were part of this file, return ``fname``.

    Compiling under this file's path and module name is what lets Numba cache the result
    (its cache locator needs a real source file) and reload it in a later process.
    """
    namespace = dict(namespace, __name__=__name__)
    exec(compile(source, __file__, "exec"), namespace)
    return namespace[fname]


@functools.cache
def cpu_kernel(rule: Rule, parallel: bool):
    """The compiled CPU kernel for ``rule`` (lazily specialised per dtype by Numba); a parallel one
    is wrapped in a :class:`~fastopt.kernels._threads.ParallelKernel` (fork and thread safety)."""
    kernel = build_cpu_kernel(rule, parallel, _config.cache_enabled())
    return _threads.ParallelKernel(kernel, lambda: cpu_kernel(rule, False)) if parallel else kernel


def build_cpu_kernel(rule: Rule, parallel: bool, cache: bool):
    """A new dispatcher for ``rule``'s CPU loop. ``cache=False`` gives one whose LLVM IR and
    assembly can be inspected (Numba cannot inspect code loaded from its cache)."""
    return _build_cpu(rule, _CPU_TEMPLATE, rule.name, "", parallel, cache, {})


@functools.cache
def cpu_noise_kernel(rule: Rule, parallel: bool, dtype: np.dtype):
    """The CPU kernel of ``rule`` with gradient noise, for buffers of ``dtype``:
    ``kernel(param, grad, *states, bounds, table, noise_key, noise_offset)``; ``table`` has
    the noise standard deviation in column ``rule.ncols``. A parallel one is wrapped as in
    :func:`cpu_kernel`."""
    kernel = build_cpu_noise_kernel(rule, parallel, dtype, _config.cache_enabled())
    return _threads.ParallelKernel(kernel, lambda: cpu_noise_kernel(rule, False, dtype)) if parallel else kernel


def build_cpu_noise_kernel(rule: Rule, parallel: bool, dtype: np.dtype, cache: bool):
    """A new dispatcher for :func:`cpu_noise_kernel` (``cache=False``: inspectable)."""
    from . import _llvm, noise

    dtype = np.dtype(dtype)
    generator_source = ""
    for module in (noise, _llvm):  # the generator's and the intrinsics' source are part of the kernel
        with open(module.__file__, "rb") as f:
            generator_source += f.read().decode()
    pair_at = noise.generator(dtype)[3]
    namespace = {
        "pair_at": pair_at, "hash_counter": noise.hash_counter, "NOISE_COL": rule.ncols,
        "prefer_wide_vectors": _llvm.prefer_wide_vectors, "prefetch": _llvm.prefetch,
        "BLOCK": np.uint64(noise.BLOCK), "HALF_BLOCK": np.uint64(noise.HALF_BLOCK), "ONE": np.uint64(1),
        "GOLDEN": np.uint64(noise.GOLDEN), "LINE": np.uint64(max(1, 64 // dtype.itemsize)),
        "PREFETCH": np.uint64(_config.PREFETCH_BYTES // dtype.itemsize),
    }
    return _build_cpu(rule, _CPU_NOISE_TEMPLATE, f"{rule.name}_noise_{dtype.name}", generator_source,
                      parallel, cache, namespace)


def _build_cpu(rule: Rule, template: str, stem: str, extra_source: str, parallel: bool, cache: bool,
               namespace: dict):
    """Render ``template`` for ``rule``, compile it under a name that hashes everything it is
    built from (``extra_source`` too), and wrap it in a Numba dispatcher."""
    from numba import njit, prange

    from . import _cache

    digest = _source_hash(rule, render(rule, template, "{fname}") + extra_source)
    fname = f"{stem}_{'parallel' if parallel else 'serial'}_{digest}"
    element = njit(inline="always", fastmath=_config.FASTMATH, error_model=_config.ERROR_MODEL)(
        rule.element
    )
    py_func = compile_source(render(rule, template, fname), fname,
                             {"np": np, "prange": prange, "element": element, **namespace})
    helper = f"{fname}_blocks"  # the noise template's block loop, called from two places
    if helper in py_func.__globals__:
        # forceinline: LLVM inlines it into the kernel, so the kernel holds all of its code. A call
        # instead binds, in the process that compiles, to the helper's own separately optimized
        # copy and, in one that loads the cache, to the copy linked into the kernel: the two
        # round differently (found: cached noise kernels differed in the last bits)
        py_func.__globals__[helper] = _cache.jit(py_func.__globals__[helper], cache=cache, fastmath=_config.FASTMATH,
                                                 error_model=_config.ERROR_MODEL, nogil=True, forceinline=True)
    return _cache.jit(py_func, cache=cache, parallel=parallel, fastmath=_config.FASTMATH,
                      error_model=_config.ERROR_MODEL, nogil=True)


def use_parallel(rule: Rule, n: int) -> bool:
    """Whether ``n`` elements of ``rule`` are worth a parallel launch (see ``_config``)."""
    return n * (3 + 2 * len(rule.state)) >= _config.PARALLEL_MIN_WORK


def run_cpu(rule: Rule, param, grad, states, bounds, table) -> None:
    """Run ``rule`` over flat NumPy buffers, serially when the buffer is small."""
    cpu_kernel(rule, use_parallel(rule, param.size))(param, grad, *states, bounds, table)
