"""The generated CPU loops vectorize (a regression test: with a signed loop index, Numba's
negative-index wraparound test kept LLVM from vectorizing every rule, ~2.3x slower)."""

import platform
import re

import numpy as np
import pytest
from fastopt.kernels import _build, _config, adam, sgd
from numba import njit

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="checks x86 packed instructions")


def uncached_kernel(rule):
    """The serial kernel compiled as _build does, but without the cache (so its asm is visible)."""
    fname = f"probe_{rule.name}"
    element = njit(inline="always", fastmath=_config.FASTMATH, error_model=_config.ERROR_MODEL)(rule.element)
    py = _build.compile_source(_build.render(rule, _build._CPU_TEMPLATE, fname), fname,
                               {"np": np, "prange": range, "element": element, "CHUNK": _config.CHUNK})
    return njit(fastmath=_config.FASTMATH, error_model=_config.ERROR_MODEL)(py)


@pytest.mark.parametrize("rule, packed", [(adam.ADAM, r"sqrtps"), (sgd.MOMENTUM, r"(mul|fmadd\w*)ps")])
def test_float32_loops_use_packed_instructions(rule, packed):
    kernel = uncached_kernel(rule)
    n = 64
    arrays = [np.zeros(n, np.float32) for _ in range(2 + len(rule.state))]
    kernel(*arrays, np.array([0, n], np.int64), np.zeros((1, rule.ncols), np.float32))
    asm = "".join(kernel.inspect_asm().values())
    assert re.search(packed, asm), f"{rule.name}: no packed float32 instruction ({packed}) in the loop"
