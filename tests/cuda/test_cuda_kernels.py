"""The CUDA kernels against the CPU kernels, variant by variant, on flat buffers.

The optimizer launches the uniform kernel (tested through it in ``test_cuda_optimizer``);
here the segmented kernel (which a GPU FlatParams' optimizer launches) runs every variant over a
buffer cut into segments with different scalars (one of them empty), and the launch shape
is checked to follow the config.
"""

from __future__ import annotations

import numpy as np
import pytest
from cuda_cases import CASES, plans

from fastopt import kernels
from fastopt.kernels import _build, _config
from fastopt.kernels import cuda as kcuda

SIGNED = {"exp_avg", "grad_avg", "momentum_buffer"}  # the other buffers hold second moments
TOL = {np.float32: {"rtol": 2e-5, "atol": 1e-6}, np.float64: {"rtol": 1e-12, "atol": 1e-14}}


def _rows_by_variant() -> dict:
    """For each variant, the scalar rows of the first steps (over all cases) that select it."""
    rows: dict = {}
    for case in CASES:
        for rule, scalars in plans(case):
            rows.setdefault(rule, [])
            if len(rows[rule]) < 3:
                rows[rule].append(scalars)
    return rows


ROWS = _rows_by_variant()


def test_cases_cover_every_variant():
    assert set(ROWS) == set(kernels.all_variants())


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule", kernels.all_variants(), ids=lambda r: r.name)
def test_segmented_matches_cpu(cuda, rule, dtype):
    rng = np.random.default_rng(7)
    n = 37
    bounds = np.array([0, 5, 5, 20, n], np.int64)  # segment 1 is empty
    rows = (ROWS[rule] * 4)[:4]
    table = np.empty((4, rule.ncols), dtype)
    table[:, 0] = [1.0, 3.0, -1.0, 0.5]  # gradient scale: clip factors and maximize
    table[:, 1:] = rows
    param, grad = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    # states as a few steps in: moderate first moments, second moments above their square
    states = [(np.clip(0.1 * rng.standard_normal(n), -0.3, 0.3) if name in SIGNED
               else 0.5 + np.abs(rng.standard_normal(n))).astype(dtype) for name in rule.state]
    d_param, d_grad = cuda.to_device(param), cuda.to_device(grad)
    d_states = [cuda.to_device(s) for s in states]
    for _ in range(2):
        kcuda.run_cuda(rule, d_param, d_grad, d_states, bounds, table)
        _build.run_cpu(rule, param, grad, states, bounds, table)
    np.testing.assert_allclose(d_param.copy_to_host(), param, **TOL[dtype])
    for name, d, h in zip(rule.state, d_states, states):
        np.testing.assert_allclose(d.copy_to_host(), h, **TOL[dtype], err_msg=name)


def test_uniform_matches_segmented_on_one_segment(cuda):
    """The optimizer's kernel (scalars as arguments) and the table kernel agree."""
    rule = kernels.adam.ADAM
    scalars = ROWS[rule][0]
    rng = np.random.default_rng(3)
    n = 300
    table = np.array([[1.0, *scalars]], np.float32)
    bounds = np.array([0, n], np.int64)
    p, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    a = [cuda.to_device(x) for x in (p, g, np.zeros(n, np.float32), np.zeros(n, np.float32))]
    b = [cuda.to_device(x) for x in (p, g, np.zeros(n, np.float32), np.zeros(n, np.float32))]
    kcuda.run_uniform(rule, a[0], a[1], a[2:], table[0])
    kcuda.run_segmented(rule, b[0], b[1], b[2:], cuda.to_device(bounds), cuda.to_device(table))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.copy_to_host(), y.copy_to_host())
    assert not np.array_equal(a[0].copy_to_host(), p)  # the kernels did run


def test_launch_shape_follows_the_config(monkeypatch):
    assert kcuda.launch_shape(37) == (3, 8)  # capped by the fixture: the grid-stride loop wraps
    assert kcuda.launch_shape(5) == (1, 8)
    monkeypatch.setattr(_config, "CUDA_MAX_BLOCKS", None)
    monkeypatch.setattr(_config, "CUDA_BLOCK", 16)
    blocks, threads = kcuda.launch_shape(300)
    assert threads == 16
    assert blocks == 19  # one element per thread (any GPU has 8 x 3 blocks' room)


@pytest.mark.parametrize("max_blocks", [None, 1], ids=["thread-per-element", "one-block"])
def test_every_element_updated_once_whatever_the_grid(cuda, monkeypatch, max_blocks):
    """Plain SGD with lr=1, grad=1 subtracts exactly 1 from every element touched once."""
    monkeypatch.setattr(_config, "CUDA_MAX_BLOCKS", max_blocks)
    n = 37
    d_param = cuda.to_device(np.zeros(n, np.float64))
    d_grad = cuda.to_device(np.ones(n, np.float64))
    table = np.array([[1.0, 1.0, 0.0]])
    kcuda.run_cuda(kernels.sgd.SGD, d_param, d_grad, [], np.array([0, n], np.int64), table)
    np.testing.assert_array_equal(d_param.copy_to_host(), -np.ones(n))


def test_fill(cuda):
    buf = cuda.device_array(37, np.float32)
    kcuda.fill(buf, 0.25)
    np.testing.assert_array_equal(buf.copy_to_host(), np.full(37, 0.25, np.float32))
