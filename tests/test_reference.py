"""Every optimizer and option set against the slow NumPy reference of its formula:
parameters and every state buffer, over many steps, float32 and float64."""

import naive
import numpy as np
import pytest
from registry import CASES

import fastopt as fo

STEPS = 30
TOL = {np.float32: dict(rtol=2e-4, atol=2e-6), np.float64: dict(rtol=1e-9, atol=1e-12)}


def gradients(rng, shape, steps, dtype):
    # Mixed magnitudes and signs, and a drift, so moments, maxima and eps all matter.
    scale = np.exp(rng.uniform(-3, 1, size=shape))
    return [(rng.standard_normal(shape) * scale + 0.1).astype(dtype) for _ in range(steps)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_reference(case, dtype, rng):
    shape = (7, 19)  # 133 elements: odd, exercises the vector loop's remainder
    p0 = rng.standard_normal(shape)
    grads = gradients(rng, shape, STEPS, dtype)
    hp = case.hyper()

    w = p0.astype(dtype)
    opt = case.make([w])
    ref_p, ref_s = p0.copy(), naive.initial_state(case.rule, shape, hp)
    reference = naive.REFERENCES[case.rule]
    for t, g in enumerate(grads, start=1):
        opt.step([g])
        ref_p, ref_s = reference(ref_p, g.astype(np.float64), ref_s, t, hp)
        assert w.dtype == dtype
        np.testing.assert_allclose(w, ref_p, **TOL[dtype], err_msg=f"param after step {t}")

    state = opt.state[0]
    assert state["step"] == STEPS
    for name, expected in ref_s.items():
        np.testing.assert_allclose(state[name], expected, **TOL[dtype], err_msg=f"state {name!r}")
        if isinstance(state[name], np.ndarray):
            assert state[name].dtype == dtype


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_parallel_kernel_matches_serial(case, rng, monkeypatch):
    """Above the serial threshold the parallel loop runs; it must give the serial loop's numbers."""
    from fastopt.kernels import _build, _config

    n = 3 * _config.CHUNK + 17  # several chunks, last one partial
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = gradients(rng, n, 4, np.float32)
    results = []
    for threshold in (0, 2**62):  # 0: always parallel; 2**62: always serial
        monkeypatch.setattr(_config, "PARALLEL_MIN_WORK", threshold)
        w = p0.copy()
        opt = case.make(w)
        for g in grads:
            opt.step(g)
        results.append((w, opt.state[0]))
    (wp, sp), (ws, ss) = results
    np.testing.assert_array_equal(wp, ws)
    for k, v in ss.items():
        np.testing.assert_array_equal(sp[k], v)
    assert _build.cpu_kernel.cache_info().currsize >= 2


# Rules whose first moment (or RMSprop's centered mean) is an exponential average, and a way to
# make its weight on the new gradient exactly 1 (beta1 = 0 / alpha = 0).
EXACT_AT_WEIGHT_ONE = [
    (fo.Adam, {"betas": (0.0, 0.999)}, "exp_avg"),
    (fo.Adam, {"betas": (0.0, 0.999), "amsgrad": True}, "exp_avg"),
    (fo.Adamax, {"betas": (0.0, 0.999)}, "exp_avg"),
    (fo.NAdam, {"betas": (0.0, 0.999)}, "exp_avg"),
    (fo.RAdam, {"betas": (0.0, 0.999)}, "exp_avg"),
    (fo.RMSprop, {"alpha": 0.0, "centered": True}, "grad_avg"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cls, options, buffer", EXACT_AT_WEIGHT_ONE,
                         ids=[f"{c.__name__}-{b}-{i}" for i, (c, _, b) in enumerate(EXACT_AT_WEIGHT_ONE)])
def test_average_with_weight_one_is_the_gradient(cls, options, buffer, dtype, rng):
    """m = beta m + (1 - beta) g with beta = 0 is g, bit for bit, even after a large m: the
    update m + (1 - beta)(g - m) would lose g's low bits to m's magnitude (torch's lerp
    switches to g - (g - m) beta for weights of 0.5 and up, and so does fastopt)."""
    p = np.zeros(1000, dtype)
    opt = cls(p, lr=1e-3, **options)
    opt.step(np.full_like(p, 3.0))  # a large average first
    g = (rng.standard_normal(p.size) * 1e-4).astype(dtype)
    opt.step(g)
    np.testing.assert_array_equal(opt.state[0][buffer], g)
