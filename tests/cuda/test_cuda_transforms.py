"""The fused gradient transforms (``clip_grad_norm``, ``skip_nonfinite``, ``grad_noise``) on the
CUDA backend, against the same optimizer with the same options on NumPy arrays (the CPU
kernels and reduction, checked against references and torch in the main suite).

- the norm reduction (:func:`kernels.cuda.sumsq_partials` and ``CudaBackend.sumsq``) against
  :func:`kernels.reduce.sumsq` and ``math.fsum``, bit for bit for any block count, and its
  non-finite test;
- every transform and their combination on a few optimizers: parameters, every state buffer,
  the norm and the skip counters after each step;
- a skipped step leaves the device parameters and state bit for bit as they were;
- the noise kernels (uniform and segmented) draw the CPU's deviates within a few ulps.

Chunks of ``CUDA_BLOCK * CUDA_REDUCE_ITEMS = 8 * 4 = 32`` elements (``fine_chunks``): the
300-element parameter is 10 chunks over at most 3 blocks, so blocks take several chunks.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from cuda_cases import TOL, compare_params_and_state, random_arrays

import fastopt as fo
from fastopt.kernels import _build, _config, noise, reduce
from fastopt.kernels import adam as kadam
from fastopt.kernels import cuda as kcuda
from fastopt.kernels import sgd as ksgd

SHAPES = [(37,), (20, 15)]  # 37 and 300 elements
DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])


@pytest.fixture(autouse=True)
def fine_chunks(monkeypatch):
    monkeypatch.setattr(_config, "CUDA_REDUCE_ITEMS", 4)


@pytest.fixture(autouse=True)
def _quiet_uint64_wraparound():
    """Run as Python (the simulator), the noise hash's uint64 products warn about wrapping and
    the reduction's ``0 * inf`` about NaN."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)  # 0 * inf in the reduction
        yield


def _partials(cuda, x):
    k = kcuda.reduce_chunks(x.size)
    sums, flags = cuda.device_array(k, np.float64), cuda.device_array(k, np.float64)
    kcuda.sumsq_partials(cuda.to_device(x), sums, flags)
    return sums.copy_to_host(), flags.copy_to_host()


# -- the reduction ------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("n", [1, 31, 300])
def test_chunk_partials_match_a_numpy_reference(cuda, dtype, n):
    x = np.random.default_rng(n).standard_normal(n).astype(dtype)
    sums, flags = _partials(cuda, x)
    chunk = kcuda.reduce_chunk()
    assert chunk == 32 and sums.size == -(-n // chunk)
    x64 = x.astype(np.float64)
    expected = [np.sum(x64[c : c + chunk] ** 2) for c in range(0, n, chunk)]
    np.testing.assert_allclose(sums, expected, rtol=1e-14)
    np.testing.assert_array_equal(flags, 0.0)


@DTYPES
def test_norm_does_not_depend_on_block_count(cuda, monkeypatch, dtype):
    x = np.random.default_rng(3).standard_normal(300).astype(dtype)
    results = []
    for blocks in (1, 2, 3, 16):
        monkeypatch.setattr(_config, "CUDA_MAX_BLOCKS", blocks)
        results.append(_partials(cuda, x)[0])
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


@DTYPES
def test_backend_norm_equals_the_cpu_norm(cuda, dtype):
    grads = random_arrays(np.random.default_rng(4), SHAPES, dtype)
    opt = fo.SGD([cuda.to_device(np.zeros(s, dtype)) for s in SHAPES], lr=0.1)
    flat = [cuda.to_device(g).reshape(-1) for g in grads]
    total, finite = opt._backend.sumsq(flat)
    cpu = sum(reduce.sumsq(g)[0] for g in grads)
    exact = math.fsum((g.astype(np.float64) ** 2).sum() for g in grads)
    assert finite
    assert total == pytest.approx(cpu, rel=1e-14) and total == pytest.approx(exact, rel=1e-14)
    assert opt._backend.sumsq([None, flat[1]])[0] == pytest.approx(reduce.sumsq(grads[1])[0], rel=1e-14)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_elements_are_flagged(cuda, bad):
    x = np.ones(300, np.float32)
    x[77] = bad
    _, flags = _partials(cuda, x)
    assert np.count_nonzero(flags) == 1 and flags[77 // 32] != 0.0


def test_huge_finite_gradient_overflows_the_norm_but_is_finite(cuda):
    x = np.full(40, 1e200)
    opt = fo.SGD(cuda.to_device(np.zeros(40)), lr=0.1)
    total, finite = opt._backend.sumsq([cuda.to_device(x)])
    assert total == math.inf and finite


# -- the optimizers -------------------------------------------------------------------------
CASES = [
    (fo.Adam, {"lr": 0.01, "weight_decay": 0.01}),
    (fo.SGD, {"lr": 0.1, "momentum": 0.9, "maximize": True}),
    (fo.RMSprop, {"lr": 0.01, "centered": True}),
]
TRANSFORMS = [
    {"clip_grad_norm": 2.0},
    {"skip_nonfinite": True},
    {"grad_noise": (0.3, 0.55), "seed": 11},
    {"clip_grad_norm": 2.0, "skip_nonfinite": True, "grad_noise": (0.3, 0.55), "seed": 11},
]


def _compare(host_opt, dev_opt, host_params, dev_params, dtype, when):
    compare_params_and_state(host_opt, dev_opt, host_params, dev_params, dtype, when)
    assert dev_opt.step_count == host_opt.step_count
    assert dev_opt.skipped_steps == host_opt.skipped_steps
    assert dev_opt.last_step_skipped == host_opt.last_step_skipped
    if host_opt.last_grad_norm is None:
        assert dev_opt.last_grad_norm is None
    elif math.isnan(host_opt.last_grad_norm):
        assert math.isnan(dev_opt.last_grad_norm)
    else:
        assert dev_opt.last_grad_norm == pytest.approx(host_opt.last_grad_norm, rel=1e-14)


@DTYPES
@pytest.mark.parametrize("transforms", TRANSFORMS, ids=lambda t: "+".join(k for k in t if k != "seed"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0].__name__)
def test_transforms_match_cpu(cuda, case, transforms, dtype):
    cls, options = case
    rng = np.random.default_rng(6)
    host_params = random_arrays(rng, SHAPES, dtype)
    dev_params = [cuda.to_device(p) for p in host_params]
    host_opt = cls(host_params, **options, **transforms)
    dev_opt = cls(dev_params, **options, **transforms)
    for t in range(3):
        grads = [3 * g for g in random_arrays(rng, SHAPES, dtype)]  # a norm of ~55: clipping acts
        if t == 1 and transforms.get("skip_nonfinite"):
            grads[1][4, 5] = np.inf
        host_opt.step(grads)
        dev_opt.step([cuda.to_device(g) for g in grads])
        _compare(host_opt, dev_opt, host_params, dev_params, dtype, f"after step {t + 1}")
    if transforms.get("skip_nonfinite"):
        assert dev_opt.skipped_steps == 1 and dev_opt.step_count == 2
    if "clip_grad_norm" in transforms:
        assert dev_opt.last_grad_norm > 2 * transforms["clip_grad_norm"]


@DTYPES
def test_skipped_step_changes_nothing_on_device(cuda, dtype):
    rng = np.random.default_rng(7)
    params = [cuda.to_device(p) for p in random_arrays(rng, SHAPES, dtype)]
    opt = fo.Adam(params, lr=0.01, skip_nonfinite=True, clip_grad_norm=1.0)
    opt.step([cuda.to_device(g) for g in random_arrays(rng, SHAPES, dtype)])
    before = [p.copy_to_host() for p in params]
    state = [{k: v.copy_to_host() for k, v in s.items() if k != "step"} for s in opt.state]
    grads = random_arrays(rng, SHAPES, dtype)
    grads[0][36] = np.nan
    opt.step([cuda.to_device(g) for g in grads])
    assert opt.last_step_skipped and opt.skipped_steps == 1 and opt.step_count == 1
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p.copy_to_host(), b)
    for s, saved in zip(opt.state, state):
        assert s["step"] == 1
        for k, v in saved.items():
            np.testing.assert_array_equal(s[k].copy_to_host(), v)


# -- the noise kernels ------------------------------------------------------------------------
@DTYPES
def test_noise_alone_is_the_cpu_noise(cuda, dtype):
    """SGD with lr 1 on zero gradients from zero parameters: each parameter becomes
    ``-sigma_t z_j`` (``z_j`` at its position in the parameter order), the CPU's within ulps."""
    host = [np.zeros(s, dtype) for s in SHAPES]
    dev = [cuda.to_device(p) for p in host]
    kw = {"lr": 1.0, "grad_noise": (0.5, 0.55), "seed": 2**63 + 5}
    host_opt, dev_opt = fo.SGD(host, **kw), fo.SGD(dev, **kw)
    zeros = [np.zeros(s, dtype) for s in SHAPES]
    host_opt.step(zeros)
    dev_opt.step([cuda.to_device(z) for z in zeros])
    eps = np.finfo(dtype).eps
    for h, d in zip(host, dev):
        assert np.all(h != 0.0)
        np.testing.assert_allclose(d.copy_to_host(), h, rtol=8 * eps, atol=8 * eps)
    # the deviates of the second parameter continue the first's: positions 37..336
    key = noise.stream_key(kw["seed"], 0)
    z = np.array([noise.generator(dtype, "compare")[1](key, np.uint64(37 + j)) for j in range(5)])
    np.testing.assert_allclose(dev[1].copy_to_host().reshape(-1)[:5], -math.sqrt(0.5) * z, rtol=8 * eps)


@DTYPES
def test_segmented_noise_kernel_matches_the_cpu_noise_kernel(cuda, dtype):
    """The segmented noise kernel (the flat buffer's launch) against the CPU noise kernel:
    three segments, one empty, a noise offset, SGD with momentum."""
    rule = ksgd.plan({**ksgd.DEFAULTS, "lr": 0.1, "momentum": 0.9}, 2, {})[0]
    rng = np.random.default_rng(8)
    n = 70
    bounds = np.array([0, 20, 20, n], np.int64)
    table = np.zeros((3, rule.ncols + 1), dtype)
    for s in range(3):
        table[s, : rule.ncols] = [1.0 - 0.25 * s] + list(
            ksgd.plan({**ksgd.DEFAULTS, "lr": 0.1 * (s + 1), "momentum": 0.9}, 2, {})[1])
        table[s, rule.ncols] = 0.1 * (s + 1)
    p, g, m = (rng.standard_normal(n).astype(dtype) for _ in range(3))
    key, offset = noise.stream_key(9, 3), np.uint64(1001)
    dp, dg, dm = (cuda.to_device(a) for a in (p, g, m))
    kcuda.run_cuda_noise(rule, dp, dg, (dm,), bounds, table, key, offset)
    _build.cpu_noise_kernel(rule, False, np.dtype(dtype))(p, g, m, bounds, table, key, offset)
    np.testing.assert_allclose(dp.copy_to_host(), p, **TOL[dtype])
    np.testing.assert_allclose(dm.copy_to_host(), m, **TOL[dtype])


def test_uniform_noise_kernel_with_adam(cuda):
    """The uniform noise kernel for a rule with state and scalars: Adam's element on
    ``g + sigma z`` against the CPU noise kernel (one segment)."""
    hp = {**kadam.DEFAULTS, "lr": 0.01}
    rule, scalars = kadam.plan(hp, 1, {})
    rng = np.random.default_rng(10)
    p, g = (rng.standard_normal(37).astype(np.float32) for _ in range(2))
    m, v = np.zeros(37, np.float32), np.zeros(37, np.float32)
    table = np.array([[1.0, *scalars, 0.2]], np.float32)
    bounds = np.array([0, 37], np.int64)
    key = noise.stream_key(1, 0)
    dev = [cuda.to_device(a) for a in (p, g, m, v)]
    kcuda.run_cuda_noise(rule, dev[0], dev[1], (dev[2], dev[3]), bounds, table, key, 0)
    _build.cpu_noise_kernel(rule, False, np.dtype(np.float32))(p, g, m, v, bounds, table, key, 0)
    for d, h in zip((dev[0], dev[2], dev[3]), (p, m, v)):
        np.testing.assert_allclose(d.copy_to_host(), h, **TOL[np.float32])
