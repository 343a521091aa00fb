"""Annealed gradient noise: the counter-based generator against a pure-Python reference, its
distribution, and the ``grad_noise`` option (variance schedule, order of operations,
reproducibility, independence of thread count and of how the parameters are split)."""

from __future__ import annotations

import math
import re
import warnings

import naive
import numba
import numpy as np
import pytest

import fastopt as fo
from fastopt.kernels import _build, _config, noise
from fastopt.kernels.sgd import SGD

MASK = (1 << 64) - 1


def mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def reference_normals(seed, step, start, n):
    """Deviates start..start+n-1 of (seed, step), from the formulas in float64."""
    key = mix((mix(seed) + (step + 1) * 0x9E3779B97F4A7C15) & MASK)
    out = np.empty(n)
    for k in range(n):
        j = start + k
        i = 16 * (j // 32) + j % 16  # elements 32b + k and 32b + 16 + k share hash 16b + k
        h = mix((key + (i + 1) * 0x9E3779B97F4A7C15) & MASK)
        u = ((h >> 32) + 1) / 2.0**32
        theta = 2 * math.pi * (h & 0xFFFFFFFF) / 2.0**32
        r = math.sqrt(-2 * math.log(u))
        out[k] = r * (math.sin(theta) if j % 32 >= 16 else math.cos(theta))
    return out


def fill(dtype, key, start, n):
    fill_normal = noise.generator(dtype)[2]

    @numba.njit
    def run(out, key, start):
        fill_normal(out, key, start)

    out = np.empty(n, dtype)
    run(out, key, np.uint64(start))
    return out


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-6), (np.float64, 1e-13)], ids=["f32", "f64"])
@pytest.mark.parametrize("start", [0, 7])
def test_generator_matches_reference(dtype, tol, start):
    got = fill(dtype, noise.stream_key(42, 3), start, 501)
    expected = reference_normals(42, 3, start, 501)
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_fill_equals_elementwise_normal_and_python(dtype):
    """The pairwise CPU fill, the per-element ``normal`` (what a GPU thread calls) and the same
    Python source run by the interpreter (what the CUDA simulator runs) agree."""
    normal = noise.generator(dtype)[1]

    @numba.njit
    def elementwise(out, key, start):
        for k in range(out.size):
            out[k] = normal(key, start + np.uint64(k))

    key = noise.stream_key(5, 0)
    for start, n in ((0, 0), (0, 1), (1, 1), (3, 10), (8, 9)):
        a = fill(dtype, key, start, n)
        b = np.empty(n, dtype)
        elementwise(b, key, np.uint64(start))
        np.testing.assert_array_equal(a, b)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # uint64 wrap-around in NumPy scalars
            c = np.array([normal(key, np.uint64(start + k)) for k in range(n)], dtype)
        np.testing.assert_allclose(a, c, rtol=4 * np.finfo(dtype).eps, atol=4 * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_bitcast_and_compare_splits_give_the_same_deviates(dtype):
    """The CPU's exponent bitcast and the portable compare-and-scale split (for numba.cuda)
    are both exact: the same numbers, bit for bit."""
    key = noise.stream_key(8, 1)
    results = []
    for split in ("bitcast", "compare"):
        fill_normal = noise.generator(dtype, split)[2]

        @numba.njit
        def run(out, key, start, fill_normal=fill_normal):
            fill_normal(out, key, start)

        out = np.empty(1 << 16, dtype)
        run(out, key, np.uint64(3))
        results.append(out)
    np.testing.assert_array_equal(results[0], results[1])


def _horner32(coeffs, x):
    acc = np.zeros_like(x)
    for c in reversed(coeffs):
        acc = acc * x + np.float32(c)
    return acc


def test_float32_polynomials_are_accurate_on_their_ranges():
    """The float32 generator's polynomials, evaluated in float32, against float64 math."""
    f = np.linspace(math.sqrt(0.5) - 1, math.sqrt(2) - 1, 100_001).astype(np.float32)
    log1p = f + f * f * (np.float32(-0.5) + f * _horner32(noise._LOG1P_F32, f))
    exact = np.log1p(f.astype(np.float64))
    assert np.max(np.abs(log1p - exact)) < 1.5e-7
    assert np.max(np.abs(log1p - exact) / np.maximum(np.abs(exact), 1e-30)) < 1e-6  # relative, near f = 0
    t = np.linspace(-math.pi / 4, math.pi / 4, 100_001).astype(np.float32)
    t2 = t * t
    sin_t = t + t * t2 * _horner32(noise._SIN_F32, t2)
    cos_t = np.float32(1) + t2 * _horner32(noise._COS_F32, t2)
    assert np.max(np.abs(sin_t - np.sin(t.astype(np.float64)))) < 1.5e-7
    assert np.max(np.abs(cos_t - np.cos(t.astype(np.float64)))) < 1.5e-7


def test_noise_kernel_is_float32_and_vectorized():
    """Plain SGD with noise, float32: no float64 math, and the generator runs on packed
    registers (plain SGD takes no square root, so a packed ``vsqrtps`` is the Box-Muller radius
    of the noise loop, and a scalar generator would show ``vsqrtss`` only)."""
    kernel = _build.build_cpu_noise_kernel(SGD, False, np.dtype(np.float32), cache=False)
    n = 64
    kernel(np.zeros(n, np.float32), np.ones(n, np.float32), np.array([0, n], np.int64),
           np.ones((1, SGD.ncols + 1), np.float32), noise.stream_key(1, 0), 0)
    ir = "\n".join(kernel.inspect_llvm().values())
    assert "fpext" not in ir
    assert not re.search(r"= f(add|sub|mul|div)[^\n]* double ", ir)
    asm = "\n".join(kernel.inspect_asm().values())
    assert re.search(r"vsqrtps\s+[^\n]*%[yz]mm", asm), "the noise generator does not vectorize"
    assert re.search(r"vfmadd\w*ps\s+[^\n]*%[yz]mm", asm), "no packed FMA"


def normal_cdf(x):
    return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_distribution_is_standard_normal(dtype):
    n = 1 << 18
    z = fill(dtype, noise.stream_key(2024, 0), 0, n).astype(np.float64)
    assert abs(z.mean()) < 4 / math.sqrt(n)
    assert abs(z.var() - 1) < 4 * math.sqrt(2 / n)
    assert abs(np.mean(z**3)) < 4 * math.sqrt(15 / n)  # skewness
    assert abs(np.mean(z**4) - 3) < 4 * math.sqrt(96 / n)  # kurtosis
    zs = np.sort(z[:20000])
    ks = np.max(np.abs(normal_cdf(zs) - np.arange(1, zs.size + 1) / zs.size))
    assert ks < 1.63 / math.sqrt(zs.size)  # Kolmogorov-Smirnov, 1% level
    # the two deviates of a pair, and neighbouring pairs, are uncorrelated
    assert abs(np.corrcoef(z[0::2], z[1::2])[0, 1]) < 4 / math.sqrt(n / 2)
    assert abs(np.corrcoef(z[:-2], z[2:])[0, 1]) < 4 / math.sqrt(n)
    other = fill(dtype, noise.stream_key(2024, 1), 0, n)
    assert abs(np.corrcoef(z, other)[0, 1]) < 4 / math.sqrt(n)


def noise_of_step(opt, w):
    """Run one SGD(lr=1) step on a zero gradient: the change is -(noise)."""
    before = [p.copy() for p in w]
    opt.step([np.zeros_like(p) for p in w])
    return np.concatenate([(b - p).ravel().astype(np.float64) for b, p in zip(before, w)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_option_adds_seeded_noise_with_annealed_variance(dtype):
    eta, gamma = 0.3, 0.55
    w = [np.zeros(4000, dtype), np.zeros((30, 50), dtype)]
    opt = fo.SGD(w, lr=1.0, grad_noise=(eta, gamma), seed=11)
    tol = 2e-6 if dtype == np.float32 else 1e-12
    for t in range(4):
        z = noise_of_step(opt, w)
        sigma = math.sqrt(eta / (1 + t) ** gamma)
        np.testing.assert_allclose(z, sigma * reference_normals(11, t, 0, z.size), rtol=tol, atol=tol * sigma)
        assert z.var() == pytest.approx(sigma**2, rel=0.05)


def test_variance_decays_with_t():
    w = np.zeros(20000)
    opt = fo.SGD(w, lr=1.0, grad_noise=(1.0, 1.0), seed=0)
    variances = [noise_of_step(opt, [w]).var() for _ in range(8)]
    for t, v in enumerate(variances):
        assert v == pytest.approx(1.0 / (1 + t), rel=0.05)


def test_clip_then_noise_then_maximize_then_rule():
    """Adam with clipping, noise and maximize against the NumPy reference fed with
    -(c * g + sigma * z)."""
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(300)
    w = p0.copy()
    opt = fo.Adam(w, lr=0.01, maximize=True, clip_grad_norm=2.0, grad_noise=(0.5, 0.55), seed=9)
    hp = {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
          "decoupled_weight_decay": False, "maximize": False}
    ref_p, ref_s = p0.copy(), naive.initial_state("adam", p0.shape, hp)
    for t in range(3):
        g = rng.standard_normal(300) * 5
        opt.step(g)
        c = min(1.0, 2.0 / (np.linalg.norm(g) + 1e-6))
        z = math.sqrt(0.5 / (1 + t) ** 0.55) * reference_normals(9, t, 0, 300)
        ref_p, ref_s = naive.adam(ref_p, -(c * g + z), ref_s, t + 1, hp)
        np.testing.assert_allclose(w, ref_p, rtol=1e-10, atol=1e-12)


def test_reproducible_by_seed_and_different_across_seeds():
    def run(seed, steps=3):
        w = np.zeros(1000, np.float32)
        opt = fo.Adam(w, lr=0.1, grad_noise=(0.1, 0.55), seed=seed)
        for _ in range(steps):
            opt.step(np.ones(1000, np.float32))
        return w, opt

    a, opt_a = run(5)
    b, _ = run(5)
    c, _ = run(6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert opt_a.transforms.seed == 5
    _, unseeded = run(None, steps=0)
    assert isinstance(unseeded.transforms.seed, int)  # drawn at random and kept


def test_state_dict_round_trip_continues_the_noise_stream():
    w1, w2 = np.zeros(200), np.zeros(200)
    opt1 = fo.SGD(w1, lr=1.0, momentum=0.5, grad_noise=(0.2, 0.5), seed=3)
    for _ in range(2):
        opt1.step(np.ones(200))
    opt2 = fo.SGD(w2, lr=1.0, momentum=0.5, grad_noise=(0.2, 0.5), seed=3)
    w2[:] = w1
    opt2.load_state_dict(opt1.state_dict())
    opt1.step(np.ones(200))
    opt2.step(np.ones(200))
    np.testing.assert_array_equal(w1, w2)


def test_noise_does_not_depend_on_how_parameters_are_split():
    whole = np.zeros(1001, np.float32)
    parts = [np.zeros(400, np.float32), np.zeros(601, np.float32)]
    a = fo.SGD(whole, lr=0.5, grad_noise=(0.1, 0.0), seed=1)
    b = fo.SGD(parts, lr=0.5, grad_noise=(0.1, 0.0), seed=1)
    for _ in range(2):
        a.step(np.ones(1001, np.float32))
        b.step([np.ones(400, np.float32), np.ones(601, np.float32)])
    np.testing.assert_array_equal(whole, np.concatenate(parts))


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 threads")
def test_noise_is_bitwise_independent_of_the_thread_count(monkeypatch):
    monkeypatch.setattr(_config, "PARALLEL_MIN_WORK", 0)  # the parallel kernel, many chunks
    n = 6 * _config.CHUNK + 3
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            w = np.zeros(n, np.float32)
            opt = fo.Adam(w, lr=0.01, grad_noise=(1.0, 0.55), seed=77, clip_grad_norm=1.0)
            for _ in range(2):
                opt.step(np.full(n, 0.5, np.float32))
            results.append(w)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(results[0], results[1])


def test_zero_eta_is_no_noise():
    a, b = np.ones(50), np.ones(50)
    fo.RMSprop(a, lr=0.1, grad_noise=(0.0, 0.55), seed=1).step(np.full(50, 0.3))
    fo.RMSprop(b, lr=0.1).step(np.full(50, 0.3))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kw, exc, match", [
    ({"grad_noise": 0.1}, TypeError, "pair"),
    ({"grad_noise": (-0.1, 0.5)}, ValueError, "eta"),
    ({"grad_noise": (0.1, float("nan"))}, ValueError, "gamma"),
    ({"grad_noise": (0.1, 0.5), "seed": -1}, ValueError, "seed"),
    ({"grad_noise": (0.1, 0.5), "seed": 2**64}, ValueError, "seed"),
    ({"grad_noise": (0.1, 0.5), "seed": 1.5}, ValueError, "seed"),
])
def test_bad_noise_options(kw, exc, match):
    with pytest.raises(exc, match=match):
        fo.Adam(np.zeros(3), **kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", [1, 5, 20, 33, 70, 200])
@pytest.mark.parametrize("offset", [0, 3, 29, 1001])
def test_noise_kernel_on_short_cut_and_empty_segments(dtype, n, offset):
    """The CPU noise kernel over segments that start and end anywhere in a block of 32 (and one
    that is empty): every element gets its own deviate, g + std * z_j, nothing outside moves."""
    from fastopt.kernels import sgd as ksgd

    rule = ksgd.plan({**ksgd.DEFAULTS, "lr": 0.5}, 1, {})[0]
    bounds = np.array([0, n // 3, n // 3, n], np.int64)  # the middle segment is empty
    table = np.zeros((3, rule.ncols + 1), dtype)
    for s in range(3):
        table[s, : rule.ncols] = [1.0] + list(ksgd.plan({**ksgd.DEFAULTS, "lr": 0.5}, 1, {})[1])
        table[s, rule.ncols] = 0.1 * (s + 1)
    rng = np.random.default_rng(n + offset)
    p, g = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    key = noise.stream_key(4, 2)
    normal = noise.generator(dtype)[1]
    with np.errstate(over="ignore"):  # the hash's uint64 wrap-around, run as plain Python
        z = np.array([normal(key, np.uint64(offset + i)) for i in range(n)], np.float64)
    std = np.repeat(0.1 * np.arange(1, 4), np.diff(bounds))
    expected = p - 0.5 * (g.astype(np.float64) + std * z)
    for parallel in (False, True):
        q = p.copy()
        _build.cpu_noise_kernel(rule, parallel, np.dtype(dtype))(q, g, bounds, table, key, offset)
        np.testing.assert_allclose(q, expected, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)
