"""Property tests: random sizes (empty, one element, odd, around the serial/parallel switch)
and random hyper-parameters, each step checked against the NumPy reference."""

import os

import naive
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from registry import CASES

import fastopt as fo
from fastopt.kernels import _config

T = _config.PARALLEL_MIN_WORK // 7  # where Adam (7 streams) switches to the parallel kernel
C = _config.CHUNK
SIZES = st.sampled_from([0, 1, 2, 7, 8, 9, 31, 33, 1000, T - 1, T, T + 1, T + 9, C, C + 1, 2 * C + 3])
UNIT = st.floats(0.0, 0.999)


@st.composite
def adam_options(draw):
    return dict(lr=draw(st.floats(0.0, 1.0)), betas=(draw(UNIT), draw(UNIT)), eps=draw(st.floats(1e-8, 1e-2)),
                weight_decay=draw(st.floats(0.0, 0.5)), amsgrad=draw(st.booleans()), maximize=draw(st.booleans()),
                decoupled_weight_decay=draw(st.booleans()))


# Random examples on a developer's machine (new cases every run); in CI the same examples every
# run (derandomize), so a submission is judged by its code, not by the draw.
settings.register_profile("fastopt", deadline=None, max_examples=25, derandomize=bool(os.environ.get("CI")),
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile("fastopt")


@given(n=SIZES, options=adam_options(), dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
def test_adam_any_size_and_options(n, options, dtype, seed):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n)
    w = p0.astype(dtype)
    opt = fo.Adam(w, **options)
    hp = {**fo.Adam.kernel.DEFAULTS, **options}
    ref_p, ref_s = p0, naive.initial_state("adam", n, hp)
    for t in range(1, 4):
        g = rng.standard_normal(n).astype(dtype)
        opt.step(g)
        ref_p, ref_s = naive.adam(ref_p, g.astype(np.float64), ref_s, t, hp)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(w, ref_p, **tol)
    for k, v in ref_s.items():
        np.testing.assert_allclose(opt.state[0][k], v, **tol)


@given(case_index=st.integers(0, len(CASES) - 1), n=SIZES, seed=st.integers(0, 2**16))
def test_every_case_any_size(case_index, n, seed):
    case = CASES[case_index]
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n)
    w = p0.astype(np.float64)
    opt = case.make(w)
    hp = case.hyper()
    ref_p, ref_s = p0, naive.initial_state(case.rule, n, hp)
    for t in range(1, 4):
        g = rng.standard_normal(n)
        opt.step(g)
        ref_p, ref_s = naive.REFERENCES[case.rule](ref_p, g, ref_s, t, hp)
    np.testing.assert_allclose(w, ref_p, rtol=1e-9, atol=1e-12)


@given(lr=st.floats(allow_nan=True, allow_infinity=True), seed=st.integers(0, 100))
def test_any_lr_is_either_refused_or_applied(lr, seed):
    """A learning rate is either valid (finite, >= 0) and applied exactly, or refused."""
    w = np.random.default_rng(seed).standard_normal(5)
    w0 = w.copy()
    if np.isfinite(lr) and lr >= 0:
        fo.SGD(w, lr=lr).step(np.ones(5))
        np.testing.assert_array_equal(w, w0 - lr)
    else:
        try:
            fo.SGD(w, lr=lr)
        except ValueError as exc:
            assert "Invalid learning rate" in str(exc)
        else:
            raise AssertionError(f"lr={lr} accepted")
