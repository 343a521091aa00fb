"""skip_nonfinite: a step with any NaN/inf gradient changes nothing (parameters, every state
buffer, host scalars, step counters), is counted, and the run continues exactly as if the step
had never been attempted."""

from __future__ import annotations

import numpy as np
import pytest
from registry import CASES

import fastopt as fo
from fastopt import schedules

SHAPES = [(4, 9), (17,)]


def snapshot(opt, params):
    return ([p.copy() for p in params],
            [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()} for s in opt.state],
            opt.step_count)


def assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        np.testing.assert_array_equal(x, y)
    for sx, sy in zip(a[1], b[1]):
        assert sx.keys() == sy.keys()
        for k in sx:
            np.testing.assert_array_equal(sx[k], sy[k], err_msg=k)
    assert a[2] == b[2]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_step_changes_nothing_and_the_run_continues_exactly(case, rng):
    p0 = [rng.standard_normal(s) for s in SHAPES]
    guarded, plain = [p.copy() for p in p0], [p.copy() for p in p0]
    opt = case.cls(guarded, skip_nonfinite=True, **case.options)
    ref = case.cls(plain, **case.options)
    good = [[rng.standard_normal(s) for s in SHAPES] for _ in range(4)]
    for g in good[:2]:
        opt.step(g)
        ref.step(g)
    assert opt.last_step_skipped is False and np.isfinite(opt.last_grad_norm)
    for bad_value, where in ((np.nan, (1, 3)), (np.inf, (0, (2, 5))), (-np.inf, (1, 16))):
        before = snapshot(opt, guarded)
        bad = [g.copy() for g in good[2]]
        bad[where[0]][where[1]] = bad_value
        opt.step(bad)
        assert opt.last_step_skipped is True
        assert not np.isfinite(opt.last_grad_norm)
        assert_same(snapshot(opt, guarded), before)
    assert opt.skipped_steps == 3
    for g in good[2:]:
        opt.step(g)
        ref.step(g)
    assert opt.skipped_steps == 3 and opt.last_step_skipped is False
    assert_same(snapshot(opt, guarded), snapshot(ref, plain))


def test_skip_with_clip_and_none_gradients(rng):
    w, b = rng.standard_normal(5), rng.standard_normal(3)
    opt = fo.SGD([w, b], lr=0.1, momentum=0.9, clip_grad_norm=1.0, skip_nonfinite=True)
    w0 = w.copy()
    opt.step([np.array([np.nan] * 5), None])
    assert opt.skipped_steps == 1 and opt.step_count == 0
    np.testing.assert_array_equal(w, w0)
    opt.step([None, np.full(3, 10.0)])  # only b has a gradient: its norm alone is clipped
    assert opt.last_grad_norm == pytest.approx(np.sqrt(300.0))
    np.testing.assert_array_equal(w, w0)
    assert opt.step_count == 1


def test_skipped_step_does_not_advance_the_schedule(rng):
    seen = []

    def lr(n):
        seen.append(n)
        return 0.1

    w = np.zeros(3)
    opt = fo.Adam(w, lr=lr, skip_nonfinite=True)
    opt.step(np.ones(3))
    opt.step(np.array([1.0, np.nan, 1.0]))
    opt.step(np.ones(3))
    assert opt.step_count == 2 and seen[-1] == 1  # the retried step is step n = 1 again
    opt2 = fo.Adam(np.zeros(3), lr=schedules.constant(0.1), skip_nonfinite=True)
    opt2.step(np.array([np.inf, 0.0, 0.0]))
    assert opt2.step_count == 0 and opt2.skipped_steps == 1


def test_without_the_option_nothing_is_computed():
    w = np.zeros(3)
    opt = fo.Adam(w, lr=0.1)
    opt.step(np.ones(3))
    assert opt.last_grad_norm is None and opt.skipped_steps == 0 and not opt.transforms.active


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_only_a_real_nan_or_inf_skips(dtype, parallel, monkeypatch):
    """Finite gradients at the top of the dtype's range are finite: never skipped. (The old
    test summed four values before multiplying by zero: 4 x 1e308 overflowed to inf.)"""
    from fastopt.kernels import _config

    monkeypatch.setattr(_config, "PARALLEL_MIN_WORK", 0 if parallel else 1 << 40)
    big = np.finfo(dtype).max
    n = 2 * _config.CHUNK + 7
    w = np.zeros(n, dtype)
    opt = fo.SGD(w, lr=dtype(1e-300) if dtype == np.float64 else dtype(1e-38), skip_nonfinite=True)
    g = np.full(n, big, dtype)
    g[::3] = -big
    opt.step(g)
    assert opt.last_step_skipped is False and opt.skipped_steps == 0 and opt.step_count == 1
    for bad in (np.nan, np.inf, -np.inf):
        for where in (0, n // 2, n - 1):
            h = g.copy()
            h[where] = bad
            opt.step(h)
            assert opt.last_step_skipped is True
    assert opt.skipped_steps == 9


def test_clip_with_an_overflowing_finite_norm_behaves_like_torch():
    """A finite float64 gradient whose sum of squares overflows: the norm is inf (as
    torch.nn.utils.clip_grad_norm_ gives), the clip factor 0, the step runs (not skipped)."""
    w = np.ones(4)
    opt = fo.SGD(w, lr=0.1, weight_decay=0.5, clip_grad_norm=1.0, skip_nonfinite=True)
    opt.step(np.full(4, 1e300))
    assert opt.last_grad_norm == np.inf and not opt.last_step_skipped and opt.step_count == 1
    np.testing.assert_array_equal(w, np.full(4, 1.0 - 0.1 * 0.5))  # zero gradient, weight decay only
