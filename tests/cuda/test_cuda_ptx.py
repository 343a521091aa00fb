"""Float32 kernels do float32 math only: their PTX holds no ``.f64`` instruction.

The simulator runs kernels as Python and cannot show a float64 promotion (a numeric literal
in an element function, a float64 scalar argument); the PTX can. Compiling PTX needs NVVM
(a CUDA toolkit, e.g. ``pip install 'fastopt[cuda12]'``) but no GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastopt import kernels
from fastopt.kernels import _build
from fastopt.kernels import cuda as kcuda

pytestmark = pytest.mark.ptx

CC = (9, 0)  # any architecture NVVM supports would do; float64 use does not depend on it


def _ptx(rule, segmented: bool, dtype: str) -> str:
    from numba.cuda import types

    cuda = kcuda.numba_cuda()
    scalar = getattr(types, dtype)
    arr = types.Array(scalar, 1, "C")
    arrays = (arr,) * (2 + len(rule.state))
    if segmented:
        sig = (*arrays, types.Array(types.int64, 1, "C"), types.Array(scalar, 2, "C"))
    else:
        sig = (*arrays, *(scalar,) * rule.ncols)
    ptx, _ = cuda.compile_ptx(kcuda.python_kernel(rule, segmented), sig, cc=CC)
    return ptx


def _f64_lines(ptx: str) -> list[str]:
    return [line.strip() for line in ptx.splitlines() if ".f64" in line]


@pytest.mark.parametrize("segmented", [False, True], ids=["uniform", "segmented"])
@pytest.mark.parametrize("rule", kernels.all_variants(), ids=lambda r: r.name)
def test_float32_kernel_has_no_f64(rule, segmented):
    assert _f64_lines(_ptx(rule, segmented, "float32")) == []


def _literal_element(p, g, lr, l2):
    return (p - 0.5 * lr * g,)  # the literal 0.5 is a float64: what element functions must avoid


def test_the_check_sees_a_float64_literal():
    """The check can fail: an element with a literal compiles to float64 math."""
    rule = _build.Rule("literal_canary", _literal_element, (), ("lr", "l2"))
    assert _f64_lines(_ptx(rule, False, "float32"))


def test_float64_kernel_uses_f64():
    assert _f64_lines(_ptx(kernels.adam.ADAM, False, "float64"))


def test_norm_reduction_compiles_with_float64_partials():
    """The norm reduction accumulates in float64 on purpose (whatever the gradient's dtype)."""
    from numba.cuda import types

    cuda = kcuda.numba_cuda()
    source = kcuda._SUMSQ.format(threads=256)
    fn = _build.compile_source(source, "sumsq_partials", {"cuda": cuda, "np": np})
    f64 = types.Array(types.float64, 1, "C")
    ptx, _ = cuda.compile_ptx(fn, (types.Array(types.float32, 1, "C"), types.int64, f64, f64), cc=CC)
    assert _f64_lines(ptx)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_flat_padding_check_compiles(dtype):
    """The GPU FlatParams' padding check (fastopt._flat_cuda) compiles for both dtypes."""
    from numba.cuda import types

    from fastopt import _flat_cuda

    cuda = kcuda.numba_cuda()
    fn = _build.compile_source(_flat_cuda._PADDING, "padding_kind", {"cuda": cuda})
    sig = (types.Array(getattr(types, dtype), 1, "C"), types.Array(types.int64, 1, "C"),
           types.Array(types.int32, 1, "C"))
    ptx, _ = cuda.compile_ptx(fn, sig, cc=CC)
    assert "atom" in ptx
