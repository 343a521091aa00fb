"""The noise generator on the CUDA target: ``generator(dtype, split="compare")`` is meant to be
called from ``numba.cuda`` kernels (one thread per element) and give the CPU's deviates; the
CUDA update kernels with noise are tested in ``test_cuda_transforms``."""

from __future__ import annotations

import warnings

import numba
import numpy as np
import pytest

from fastopt import kernels
from fastopt.kernels import _build, noise
from fastopt.kernels import cuda as kcuda

_DRAW = """
def draw(out, key, start):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = normal(key, start + np.uint64(i))
"""


def _draw(cuda, dtype):
    """A one-thread-per-element kernel over ``normal``; ``cuda`` must be a global of the
    kernel's source for the simulator to swap in its own module."""
    normal = noise.generator(dtype, "compare")[1]
    return _build.compile_source(_DRAW, "draw", {"cuda": cuda, "normal": normal, "np": np})


def _cpu(dtype, key, start, n):
    fill = noise.generator(dtype)[2]

    @numba.njit
    def run(out, key, start):
        fill(out, key, start)

    out = np.empty(n, dtype)
    run(out, key, np.uint64(start))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_kernel_draws_the_cpu_deviates(cuda, dtype):
    key = noise.stream_key(3, 4)
    out = cuda.device_array(37, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the simulator runs the uint64 hash in NumPy
        cuda.jit(_draw(cuda, dtype))[3, 16](out, key, np.uint64(5))
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(out.copy_to_host(), _cpu(dtype, key, 5, 37), rtol=8 * eps, atol=8 * eps)


@pytest.mark.gpu  # typing this kernel initializes the CUDA driver, so it needs a GPU, not just NVVM
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_compare_split_compiles_to_ptx(dtype):
    from numba import cuda, types

    draw = _draw(cuda, dtype)
    ftype = types.float32 if dtype == np.float32 else types.float64
    ptx, _ = cuda.compile_ptx(draw, (ftype[::1], types.uint64, types.uint64), cc=(8, 0))
    assert "draw" in ptx


def _noise_ptx(rule, segmented: bool, dtype: str) -> str:
    from numba.cuda import types

    cuda = kcuda.numba_cuda()
    scalar = getattr(types, dtype)
    arr = types.Array(scalar, 1, "C")
    arrays = (arr,) * (2 + len(rule.state))
    if segmented:
        sig = (*arrays, types.Array(types.int64, 1, "C"), types.Array(scalar, 2, "C"), types.uint64, types.uint64)
    else:
        sig = (*arrays, *(scalar,) * (rule.ncols + 1), types.uint64, types.uint64)
    ptx, _ = cuda.compile_ptx(kcuda.python_noise_kernel(rule, segmented, dtype), sig, cc=(9, 0))
    return ptx


@pytest.mark.gpu  # like the test above: typing the noise hash initializes the CUDA driver
@pytest.mark.parametrize("segmented", [False, True], ids=["uniform", "segmented"])
@pytest.mark.parametrize("rule", [kernels.adam.ADAM, kernels.sgd.MOMENTUM], ids=lambda r: r.name)
def test_float32_noise_kernel_has_no_f64(rule, segmented):
    """The noise deviates of a float32 kernel are float32 math too (``generator(float32, "compare")``)."""
    assert [ln for ln in _noise_ptx(rule, segmented, "float32").splitlines() if ".f64" in ln] == []
