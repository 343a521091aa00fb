"""The norm reduction: its value against NumPy, its NaN/inf test, and bitwise independence of
the thread count."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from fastopt.kernels import _config, reduce

SIZES = [0, 1, 133, _config.CHUNK, 3 * _config.CHUNK + 17]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", SIZES)
def test_sum_of_squares_matches_numpy(rng, dtype, n):
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-5, 5, n))).astype(dtype)
    total, finite = reduce.sumsq(x)
    expected = np.sum(x.astype(np.float64) ** 2)
    assert finite
    assert total == pytest.approx(expected, rel=1e-13, abs=0)
    assert np.sqrt(total) == pytest.approx(np.linalg.norm(x.astype(np.float64)), rel=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 5, -1])
def test_nonfinite_elements_are_seen(rng, dtype, bad, where):
    for n in (7, 2 * _config.CHUNK + 3):
        x = rng.standard_normal(n).astype(dtype)
        x[where] = bad
        total, finite = reduce.sumsq(x)
        assert not finite
        assert not np.isfinite(total)


@pytest.mark.parametrize("n", [10, 2 * _config.CHUNK + 3])
def test_huge_finite_float64_overflows_the_norm_but_is_finite(n, monkeypatch):
    for parallel in (False, True):
        monkeypatch.setattr(_config, "PARALLEL_MIN_WORK", 0 if parallel else 1 << 40)
        for value in (1e200, np.finfo(np.float64).max):
            total, finite = reduce.sumsq(np.full(n, value))
            assert total == np.inf and finite, (value, parallel)


def test_parallel_and_serial_kernels_agree_and_the_parallel_one_runs(rng, monkeypatch):
    x = rng.standard_normal(3 * _config.CHUNK + 5).astype(np.float32)
    monkeypatch.setattr(_config, "PARALLEL_MIN_WORK", 0)
    parallel = reduce.sumsq(x)
    monkeypatch.setattr(_config, "PARALLEL_MIN_WORK", 2**62)
    serial = reduce.sumsq(x)
    assert parallel[0] == pytest.approx(serial[0], rel=1e-14)
    assert reduce._kernel(True).signatures  # the parallel kernel was used above


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 threads")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_result_is_bitwise_independent_of_the_thread_count(rng, dtype, monkeypatch):
    monkeypatch.setattr(_config, "PARALLEL_MIN_WORK", 0)
    x = (rng.standard_normal(16 * _config.CHUNK + 11) * 1e3).astype(dtype)
    before = numba.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1, 2):
            numba.set_num_threads(threads)
            results.append(reduce.sumsq(x)[0])
    finally:
        numba.set_num_threads(before)
    assert len({r.hex() for r in results}) == 1, results
