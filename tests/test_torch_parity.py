"""Parity with ``torch.optim`` (single-tensor implementation, ``foreach=False``) for every
option set torch has: parameters and every state buffer over many steps, float32 and float64,
with several parameters of different shapes in one optimizer."""

import numpy as np
import pytest
from registry import TORCH_CASES

torch = pytest.importorskip("torch")

STEPS = 25
TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=[c.id for c in TORCH_CASES])
def test_matches_torch(case, dtype, rng):
    # torch keeps scalar state (step, NAdam's mu_product) in the default dtype; fastopt keeps
    # it in float64. With float64 parameters, compare against torch's float64 scalars.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if dtype == np.float64 else torch.float32)
    try:
        _run_parity(case, dtype, rng)
    finally:
        torch.set_default_dtype(previous)


def _run_parity(case, dtype, rng):
    shapes = [(5, 13), (31,), ()]
    params = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    opt = case.make(params)
    topt = getattr(torch.optim, case.torch_cls)(tparams, foreach=False, **case.torch_options)
    for t in range(1, STEPS + 1):
        grads = [np.asarray(rng.standard_normal(s) * np.exp(rng.uniform(-3, 1, s)) + 0.1, dtype=dtype) for s in shapes]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.from_numpy(g.copy())
        topt.step()
        opt.step(grads)
        for i, (p, tp) in enumerate(zip(params, tparams)):
            np.testing.assert_allclose(p, tp.detach().numpy(), **TOL[dtype], err_msg=f"param {i}, step {t}")

    for i, tp in enumerate(tparams):
        tstate = topt.state[tp]
        ours = opt.state[i]
        assert ours["step"] == int(tstate["step"]) if "step" in tstate else True
        for name, value in tstate.items():
            if name == "step":
                continue
            expected = value.numpy() if torch.is_tensor(value) else value
            np.testing.assert_allclose(ours[name], expected, **TOL[dtype], err_msg=f"param {i} state {name!r}")
        extra = set(ours) - set(tstate) - {"step", "momentum_started"}
        assert not extra, f"state fastopt has but torch has not: {extra}"
