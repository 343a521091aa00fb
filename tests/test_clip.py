"""Global-norm clipping: the standalone clip_grad_norm_ and the fused ``clip_grad_norm`` option,
against torch.nn.utils.clip_grad_norm_ (+ the torch optimizer's step), and against our own
two-pass form bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from registry import CASES, TORCH_CASES

import fastopt as fo
from fastopt.transforms import clip_grad_norm_, grad_norm

TOL = {np.float32: {"rtol": 2e-5, "atol": 1e-6}, np.float64: {"rtol": 1e-10, "atol": 1e-12}}
SHAPES = [(5, 13), (31,), ()]


def grads_for(rng, dtype, scale=3.0):
    return [np.asarray(rng.standard_normal(s) * scale, dtype=dtype) for s in SHAPES]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(rng, dtype, max_norm):
    torch = pytest.importorskip("torch")
    grads = grads_for(rng, dtype)
    tgrads = [torch.tensor(g.copy()) for g in grads]
    tparams = [torch.zeros(g.shape, dtype=t.dtype, requires_grad=True) for g, t in zip(grads, tgrads)]
    for p, g in zip(tparams, tgrads):
        p.grad = g
    tnorm = torch.nn.utils.clip_grad_norm_(tparams, max_norm)
    norm = clip_grad_norm_(grads, max_norm)
    assert isinstance(norm, float)
    assert norm == pytest.approx(float(tnorm), rel=TOL[dtype]["rtol"])
    for g, p in zip(grads, tparams):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, p.grad.numpy(), **TOL[dtype])
    clipped = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads))
    assert clipped == pytest.approx(min(norm, max_norm), rel=1e-5)


def test_clip_grad_norm_nonfinite_like_torch():
    g = [np.array([1.0, np.nan, 2.0]), np.array([3.0])]
    assert np.isnan(clip_grad_norm_(g, 1.0))
    assert np.isnan(g[0]).all() and np.isnan(g[1]).all()  # torch: grads * nan
    g = [np.array([1.0, np.inf, 2.0])]
    assert clip_grad_norm_(g, 1.0) == np.inf
    np.testing.assert_array_equal(g[0], [0.0, np.nan, 0.0])  # torch: grads * 0
    with pytest.raises(RuntimeError, match="error_if_nonfinite"):
        clip_grad_norm_([np.array([np.nan])], 1.0, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_([np.ones(2)], -1.0)
    with pytest.raises(TypeError, match="float32 or float64"):
        clip_grad_norm_([np.ones(2, np.int64)], 1.0)
    ro = np.ones(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        clip_grad_norm_(ro, 1.0)


def test_grad_norm_matches_linalg(rng):
    grads = grads_for(rng, np.float32)
    expected = np.linalg.norm(np.concatenate([g.astype(np.float64).ravel() for g in grads]))
    assert grad_norm(grads) == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=[c.id for c in TORCH_CASES])
def test_fused_clip_matches_torch_clip_then_step(case, dtype, rng):
    torch = pytest.importorskip("torch")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if dtype == np.float64 else torch.float32)
    try:
        params = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in SHAPES]
        tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
        opt = case.cls(params, clip_grad_norm=1.5, **case.options)
        topt = getattr(torch.optim, case.torch_cls)(tparams, foreach=False, **case.torch_options)
        for t in range(6):
            grads = grads_for(rng, dtype, scale=0.1 if t == 3 else 3.0)  # step 3: below max_norm
            kept = [g.copy() for g in grads]
            for tp, g in zip(tparams, grads):
                tp.grad = torch.from_numpy(g.copy())
            tnorm = torch.nn.utils.clip_grad_norm_(tparams, 1.5)
            topt.step()
            opt.step(grads)
            for g, k in zip(grads, kept):
                np.testing.assert_array_equal(g, k)  # the user's gradients are not written
            assert opt.last_grad_norm == pytest.approx(float(tnorm), rel=TOL[dtype]["rtol"])
            for i, (p, tp) in enumerate(zip(params, tparams)):
                np.testing.assert_allclose(p, tp.detach().numpy(), **TOL[dtype], err_msg=f"param {i}, step {t}")
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("case", CASES[::3], ids=[c.id for c in CASES[::3]])
def test_fused_clip_equals_two_pass_clip(case, rng):
    """The kernel's g * c equals the standalone clip's g * c followed by an unclipped step, up
    to one rounding: inside the kernel LLVM may fuse g * c into the next add (FMA)."""
    p0 = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in SHAPES]
    fused, two_pass = [p.copy() for p in p0], [p.copy() for p in p0]
    opt_f = case.cls(fused, clip_grad_norm=0.7, **case.options)
    opt_t = case.cls(two_pass, **case.options)
    for _ in range(4):
        grads = grads_for(rng, np.float32)
        opt_f.step(grads)
        norm = clip_grad_norm_(grads, 0.7)
        opt_t.step(grads)
        assert opt_f.last_grad_norm == norm
    for a, b in zip(fused, two_pass):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for sa, sb in zip(opt_f.state, opt_t.state):
        for k in sa:
            np.testing.assert_allclose(sa[k], sb[k], rtol=1e-6, atol=1e-7)


def test_nan_propagates_like_torch_without_skip():
    torch = pytest.importorskip("torch")
    for clip in (None, 1.0):
        w = np.linspace(-1, 1, 6)
        tw = torch.tensor(w.copy(), requires_grad=True)
        opt = fo.Adam(w, lr=0.1, clip_grad_norm=clip)
        topt = torch.optim.Adam([tw], lr=0.1, foreach=False)
        g = np.array([0.5, np.nan, -1.0, 2.0, np.inf, 0.1])
        tw.grad = torch.tensor(g.copy())
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([tw], clip)
        topt.step()
        opt.step(g)
        expected = tw.detach().numpy()
        np.testing.assert_array_equal(np.isnan(w), np.isnan(expected))
        assert np.isnan(w).sum() == (6 if clip else 2)
        np.testing.assert_allclose(w[~np.isnan(w)], expected[~np.isnan(expected)], rtol=1e-12)
        assert opt.skipped_steps == 0 and opt.step_count == 1


def test_bad_clip_options():
    w = np.zeros(3)
    for bad, exc in ((0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), ("1", TypeError)):
        with pytest.raises(exc, match="clip_grad_norm"):
            fo.SGD(w, lr=0.1, clip_grad_norm=bad)
    with pytest.raises(TypeError, match="skip_nonfinite"):
        fo.SGD(w, lr=0.1, skip_nonfinite="yes")
