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
(``kernels.noise``): each chunk first fills a scratch buffer with its deviates, two per hash,
then runs the loop above on ``g * grad_scale + noise_std * z``. The noise-free loop is the
plain template, unchanged.

The generated source is compiled under this file's name, so Numba's on-disk cache works for
it; the function name carries a hash of the rule's source file, the template and the compile
flags (``_config``), so editing any of them never loads a stale cache entry.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import _config

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
def {fname}(param, grad, {state_args}bounds, table, noise_key, noise_offset):
    n = param.size
    nchunks = (n + {chunk} - 1) // {chunk}
    for c in prange(nchunks):
        lo = c * {chunk}
        hi = min(lo + {chunk}, n)
        noise = np.empty(hi - lo, param.dtype)
        fill_normal(noise, noise_key, np.uint64(noise_offset + lo))
        first = np.uint64(lo)
        s = np.searchsorted(bounds, lo, side="right") - 1
        while lo < hi:
            end = min(bounds[s + 1], hi)
            grad_scale = table[s, 0]
            noise_std = table[s, NOISE_COL]
{unpack}
            for i in range(np.uint64(lo), np.uint64(end)):
                g = grad[i] * grad_scale + noise_std * noise[i - first]
                {outputs} = element(param[i], g, {state_loads}{scalar_args})
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
    return template.format(
        fname=fname,
        chunk=_config.CHUNK,
        state_args="".join(f"{s}, " for s in rule.state),
        unpack=unpack,
        outputs="".join(f"{name}[i], " for name in ("param",) + rule.state).rstrip(" "),
        state_loads="".join(f"{s}[i], " for s in rule.state),
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
    """The compiled CPU kernel for ``rule`` (lazily specialised per dtype by Numba)."""
    return build_cpu_kernel(rule, parallel, _config.cache_enabled())


def build_cpu_kernel(rule: Rule, parallel: bool, cache: bool):
    """A new dispatcher for ``rule``'s CPU loop. ``cache=False`` gives one whose LLVM IR and
    assembly can be inspected (Numba cannot inspect code loaded from its cache)."""
    return _build_cpu(rule, _CPU_TEMPLATE, rule.name, "", parallel, cache, {})


@functools.cache
def cpu_noise_kernel(rule: Rule, parallel: bool, dtype: np.dtype):
    """The CPU kernel of ``rule`` with gradient noise, for buffers of ``dtype``:
    ``kernel(param, grad, *states, bounds, table, noise_key, noise_offset)``; ``table`` has
    the noise standard deviation in column ``rule.ncols``."""
    return build_cpu_noise_kernel(rule, parallel, dtype, _config.cache_enabled())


def build_cpu_noise_kernel(rule: Rule, parallel: bool, dtype: np.dtype, cache: bool):
    """A new dispatcher for :func:`cpu_noise_kernel` (``cache=False``: inspectable)."""
    from . import noise

    dtype = np.dtype(dtype)
    with open(noise.__file__, "rb") as f:  # the generator's source is part of the kernel
        generator_source = f.read().decode()
    namespace = {"fill_normal": noise.generator(dtype)[2], "NOISE_COL": rule.ncols}
    return _build_cpu(rule, _CPU_NOISE_TEMPLATE, f"{rule.name}_noise_{dtype.name}", generator_source,
                      parallel, cache, namespace)


def _build_cpu(rule: Rule, template: str, stem: str, extra_source: str, parallel: bool, cache: bool,
               namespace: dict):
    """Render ``template`` for ``rule``, compile it under a name that hashes everything it is
    built from (``extra_source`` too), and wrap it in a Numba dispatcher."""
    from numba import njit, prange

    digest = _source_hash(rule, render(rule, template, "{fname}") + extra_source)
    fname = f"{stem}_{'parallel' if parallel else 'serial'}_{digest}"
    element = njit(inline="always", fastmath=_config.FASTMATH, error_model=_config.ERROR_MODEL)(
        rule.element
    )
    py_func = compile_source(render(rule, template, fname), fname,
                             {"np": np, "prange": prange, "element": element, **namespace})
    return njit(
        parallel=parallel,
        cache=cache,
        fastmath=_config.FASTMATH,
        error_model=_config.ERROR_MODEL,
        nogil=True,
    )(py_func)


def use_parallel(rule: Rule, n: int) -> bool:
    """Whether ``n`` elements of ``rule`` are worth a parallel launch (see ``_config``)."""
    return n * (3 + 2 * len(rule.state)) >= _config.PARALLEL_MIN_WORK


def run_cpu(rule: Rule, param, grad, states, bounds, table) -> None:
    """Run ``rule`` over flat NumPy buffers, serially when the buffer is small."""
    cpu_kernel(rule, use_parallel(rule, param.size))(param, grad, *states, bounds, table)
