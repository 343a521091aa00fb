"""Schedules: each against its formula, written out here, and against torch.optim.lr_scheduler
where torch has the same schedule."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import fastopt as fo
from fastopt import schedules as S

N = 60  # steps compared


def values(schedule, n=N):
    return np.array([schedule(k) for k in range(n)])


# -- formulas -----------------------------------------------------------------------------------
def test_constant():
    assert list(values(S.constant(0.3), 5)) == [0.3] * 5


def test_inverse_time():
    np.testing.assert_allclose(values(S.inverse_time(0.5, 0.1)), [0.5 / (1 + 0.1 * n) for n in range(N)], rtol=1e-15)


def test_time_based_is_seed_003_recursion():
    eta, expected = 0.5, []
    for n in range(N):
        expected.append(eta)
        eta = eta / (1 + 0.05 * n)  # eta_{n+1} = eta_n / (1 + d n)
    s = S.time_based(0.5, 0.05)
    np.testing.assert_allclose(values(s), expected, rtol=1e-15)
    # random access (backwards, forwards) gives the same numbers as sequential calls
    assert s(7) == expected[7] and s(3) == expected[3] and s(40) == expected[40]
    assert s(1) == 0.5  # eta_1 = eta_0 / (1 + 0)


def test_step_decay_seed_formula_and_offset():
    s = S.step_decay(0.8, 0.5, 10)
    np.testing.assert_allclose(values(s), [0.8 * 0.5 ** math.floor((1 + n) / 10) for n in range(N)], rtol=1e-15)
    assert s(8) == 0.8 and s(9) == 0.4  # seed 003: the first drop after r - 1 steps
    s0 = S.step_decay(0.8, 0.5, 10, offset=0)
    assert s0(9) == 0.8 and s0(10) == 0.4


def test_exponential_seed_formula():
    np.testing.assert_allclose(values(S.exponential(0.2, 0.03)), [0.2 * math.exp(-0.03 * n) for n in range(N)],
                               rtol=1e-15)


def test_multistep_formula():
    s = S.multistep(1.0, [5, 5, 20], gamma=0.5)
    expected = [0.5 ** sum(m <= n for m in (5, 5, 20)) for n in range(N)]
    np.testing.assert_allclose(values(s), expected, rtol=1e-15)


def test_cosine_formula_and_hold():
    s = S.cosine(1.0, 40, final_lr=0.1)
    exp = [0.1 + 0.9 * (1 + math.cos(math.pi * min(n, 40) / 40)) / 2 for n in range(N)]
    np.testing.assert_allclose(values(s), exp, rtol=1e-14)
    assert s(40) == pytest.approx(0.1) and s(1000) == pytest.approx(0.1)


def test_cosine_restarts_cycles():
    s = S.cosine_restarts(1.0, 4, mult=2)
    # cycles of 4, 8, 16 steps start at 0, 4, 12, 28
    for start, length in ((0, 4), (4, 8), (12, 16), (28, 32)):
        assert s(start) == 1.0
        assert s(start + length // 2) == pytest.approx(0.5)


def test_linear_warmup_formula():
    s = S.linear_warmup(1.0, 10, start_lr=0.2)
    np.testing.assert_allclose(values(s), [0.2 + 0.8 * min(n, 10) / 10 for n in range(N)], rtol=1e-15)
    assert values(S.linear_warmup(0.3, 0), 3).tolist() == [0.3] * 3


def test_warmup_cosine_formula():
    s = S.warmup_cosine(1.0, 10, 50, start_lr=0.1, final_lr=0.01)
    exp = [0.1 + 0.9 * n / 10 if n < 10 else 0.01 + 0.99 * (1 + math.cos(math.pi * min(n - 10, 40) / 40)) / 2
           for n in range(N)]
    np.testing.assert_allclose(values(s), exp, rtol=1e-14)
    assert s(10) == 1.0 and s(50) == pytest.approx(0.01) and s(59) == pytest.approx(0.01)


def test_polynomial_formula():
    s = S.polynomial(1.0, 30, power=2.0, final_lr=0.1)
    np.testing.assert_allclose(values(s), [0.9 * (1 - min(n, 30) / 30) ** 2 + 0.1 for n in range(N)], rtol=1e-14)


def test_sequence_joins_with_local_counts():
    s = S.sequence([S.constant(1.0), S.linear_warmup(2.0, 4), S.exponential(3.0, 0.5)], [3, 10])
    exp = [1.0] * 3 + [2.0 * min(k, 4) / 4 for k in range(7)] + [3.0 * math.exp(-0.5 * k) for k in range(N - 10)]
    np.testing.assert_allclose(values(s), exp, rtol=1e-15)
    assert S.sequence([S.constant(0.5)], [])(100) == 0.5


def test_schedules_return_floats_and_repr():
    s = S.cosine(np.float32(0.5), 10)
    assert type(s(np.int64(3))) is float
    assert repr(s) == "cosine(lr=0.5, total_steps=10, final_lr=0)"


# -- torch equality -----------------------------------------------------------------------------
def torch_values(make_scheduler, base_lr, n=N):
    torch = pytest.importorskip("torch")
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=base_lr)
    sched = make_scheduler(torch.optim.lr_scheduler, opt)
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return np.array(out)


TORCH_CASES = [
    ("StepLR", lambda L, o: L.StepLR(o, step_size=7, gamma=0.5), S.step_decay(0.3, 0.5, 7, offset=0), 0.3),
    ("MultiStepLR", lambda L, o: L.MultiStepLR(o, milestones=[3, 10, 10, 31], gamma=0.3),
     S.multistep(0.3, [3, 10, 10, 31], gamma=0.3), 0.3),
    ("ExponentialLR", lambda L, o: L.ExponentialLR(o, gamma=0.93), S.exponential(0.3, -math.log(0.93)), 0.3),
    ("CosineAnnealingLR", lambda L, o: L.CosineAnnealingLR(o, T_max=N - 1, eta_min=0.01),
     S.cosine(0.3, N - 1, final_lr=0.01), 0.3),
    ("CosineAnnealingWarmRestarts", lambda L, o: L.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2, eta_min=0.02),
     S.cosine_restarts(0.3, 5, mult=2, final_lr=0.02), 0.3),
    ("CosineAnnealingWarmRestarts mult 1", lambda L, o: L.CosineAnnealingWarmRestarts(o, T_0=7),
     S.cosine_restarts(0.3, 7), 0.3),
    ("LinearLR", lambda L, o: L.LinearLR(o, start_factor=0.25, total_iters=12),
     S.linear_warmup(0.4, 12, start_lr=0.1), 0.4),
    ("PolynomialLR", lambda L, o: L.PolynomialLR(o, total_iters=40, power=1.5), S.polynomial(0.3, 40, power=1.5), 0.3),
    ("OneCycleLR cos", lambda L, o: L.OneCycleLR(o, max_lr=0.5, total_steps=N),
     S.one_cycle(0.5, N), 0.5),
    ("OneCycleLR linear 3-phase", lambda L, o: L.OneCycleLR(o, max_lr=0.5, total_steps=N, pct_start=0.25,
                                                             anneal_strategy="linear", three_phase=True,
                                                             div_factor=10, final_div_factor=100),
     S.one_cycle(0.5, N, pct_start=0.25, anneal="linear", three_phase=True, div_factor=10, final_div_factor=100), 0.5),
    ("LambdaLR inverse time", lambda L, o: L.LambdaLR(o, lambda n: 1 / (1 + 0.2 * n)), S.inverse_time(0.3, 0.2), 0.3),
]


@pytest.mark.parametrize("name, make, schedule, base", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_equals_torch_get_last_lr(name, make, schedule, base):
    if name.startswith("OneCycle"):
        pytest.importorskip("torch")
    np.testing.assert_allclose(values(schedule), torch_values(make, base), rtol=1e-12, atol=1e-15)


def test_warmup_cosine_equals_torch_sequential():
    def make(L, o):
        return L.SequentialLR(o, [L.LinearLR(o, start_factor=0.1, total_iters=8),
                                  L.CosineAnnealingLR(o, T_max=N - 8, eta_min=0.0)], milestones=[8])

    ours = values(S.warmup_cosine(0.3, 8, N, start_lr=0.03))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's SequentialLR warns about its epoch argument
        theirs = torch_values(make, 0.3)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-15)


def test_adagrad_lr_decay_is_inverse_time():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(50)
    grads = [rng.standard_normal(50) for _ in range(6)]
    w = w0.copy()
    opt = fo.Adagrad(w, lr=S.inverse_time(0.1, 0.3))
    tw = torch.tensor(w0, requires_grad=True)
    topt = torch.optim.Adagrad([tw], lr=0.1, lr_decay=0.3)
    for g in grads:
        opt.step(g)
        tw.grad = torch.tensor(g)
        topt.step()
    np.testing.assert_allclose(w, tw.detach().numpy(), rtol=1e-12)


# -- validation ---------------------------------------------------------------------------------
BAD = [
    (lambda: S.constant(-1.0), ValueError, "lr must be >= 0"),
    (lambda: S.constant(float("nan")), ValueError, "finite"),
    (lambda: S.constant("0.1"), TypeError, "real number"),
    (lambda: S.inverse_time(0.1, -1), ValueError, "decay"),
    (lambda: S.step_decay(0.1, 0.5, 0), ValueError, "drop_every must be >= 1"),
    (lambda: S.step_decay(0.1, 0.5, 2.5), TypeError, "drop_every must be an integer"),
    (lambda: S.multistep(0.1, [5, 3]), ValueError, "non-decreasing"),
    (lambda: S.multistep(0.1, [-1]), ValueError, "milestones"),
    (lambda: S.cosine(0.1, 0), ValueError, "total_steps must be >= 1"),
    (lambda: S.cosine(0.1, -5), ValueError, "total_steps"),
    (lambda: S.cosine_restarts(0.1, 10, mult=0), ValueError, "mult"),
    (lambda: S.linear_warmup(0.1, -1), ValueError, "warmup_steps"),
    (lambda: S.warmup_cosine(0.1, 100, 100), ValueError, "warmup_steps .100. must be less than total_steps"),
    (lambda: S.warmup_cosine(0.1, 200, 100), ValueError, "must be less than total_steps"),
    (lambda: S.one_cycle(0.1, 100, pct_start=1.5), ValueError, "pct_start"),
    (lambda: S.one_cycle(0.1, 2, pct_start=0.3), ValueError, "phases are empty"),
    (lambda: S.one_cycle(0.1, 100, anneal="cubic"), ValueError, "anneal"),
    (lambda: S.polynomial(0.1, 10, power=-1), ValueError, "power"),
    (lambda: S.sequence([], []), ValueError, "at least one"),
    (lambda: S.sequence([S.constant(1), S.constant(2)], []), ValueError, "need 1 boundaries"),
    (lambda: S.sequence([S.constant(1), S.constant(2), S.constant(3)], [5, 5]), ValueError, "strictly increasing"),
    (lambda: S.sequence([S.constant(1), 2.0], [5]), TypeError, "not callable"),
    (lambda: S.constant(0.1)(-1), ValueError, "step count must be >= 0"),
    (lambda: S.constant(0.1)(1.5), TypeError, "integer"),
    (lambda: S.ReduceLROnPlateau(0.1, factor=1.0), ValueError, "factor"),
    (lambda: S.ReduceLROnPlateau(0.1, mode="up"), ValueError, "mode"),
    (lambda: S.ReduceLROnPlateau(0.1, threshold_mode="pct"), ValueError, "threshold_mode"),
    (lambda: S.ReduceLROnPlateau(0.1, patience=-1), ValueError, "patience"),
    (lambda: S.ReduceLROnPlateau("x"), TypeError, "float lr or an optimizer"),
]


@pytest.mark.parametrize("make, exc, match", BAD)
def test_bad_arguments_raise_at_construction(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_schedule_drives_an_optimizer():
    w = np.zeros(3)
    opt = fo.SGD(w, lr=S.step_decay(1.0, 0.5, 2, offset=0))
    for _ in range(4):
        opt.step(np.ones(3))
    # rates 1, 1, 0.5, 0.5 for steps n = 0..3
    np.testing.assert_allclose(w, -3.0)


# -- ReduceLROnPlateau --------------------------------------------------------------------------
METRICS = [1.0, 0.9, 0.95, 0.91, 0.9, 0.92, 0.5, 0.5, 0.5, 0.49999, 0.6, 0.7, 0.8, 0.2, 0.3, 0.3, 0.3, 0.3,
           float("nan"), 0.3, 0.3, 0.3, 0.1]
PLATEAU_CASES = [
    {"mode": "min", "patience": 1},
    {"mode": "min", "patience": 2, "threshold": 0.05, "threshold_mode": "abs", "cooldown": 2},
    {"mode": "max", "patience": 0, "factor": 0.5, "min_lr": 0.02},
    {"mode": "max", "patience": 1, "threshold": 0.1, "threshold_mode": "rel", "cooldown": 1, "eps": 0.0},
]


@pytest.mark.parametrize("kw", PLATEAU_CASES)
def test_plateau_equals_torch(kw):
    torch = pytest.importorskip("torch")
    p = torch.zeros(1, requires_grad=True)
    topt = torch.optim.SGD([p], lr=0.3)
    tsched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kw)
    own = S.ReduceLROnPlateau(0.3, **kw)
    w = np.zeros(2)
    opt = fo.SGD([{"params": [w], "lr": 0.3}])
    driven = S.ReduceLROnPlateau(opt, **kw)
    for m in METRICS:
        tsched.step(m)
        own.update(m)
        driven.update(m)
        assert own.lr == pytest.approx(topt.param_groups[0]["lr"], rel=1e-15)
        assert opt.param_groups[0]["lr"] == pytest.approx(topt.param_groups[0]["lr"], rel=1e-15)
        assert own.num_bad_epochs == tsched.num_bad_epochs and own.cooldown_counter == tsched.cooldown_counter
    assert own.lr < 0.3  # the metric sequence does trigger reductions


def test_plateau_as_lr_callable_and_per_group_min_lr():
    w = np.zeros(2)
    plateau = S.ReduceLROnPlateau(1.0, patience=0, factor=0.5)
    opt = fo.SGD(w, lr=plateau)
    opt.step(np.ones(2))
    assert plateau.update(1.0) is False and plateau.update(2.0) is True
    opt.step(np.ones(2))
    np.testing.assert_allclose(w, -1.5)  # rates 1.0 then 0.5

    a, b = np.zeros(1), np.zeros(1)
    opt2 = fo.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}])
    driven = S.ReduceLROnPlateau(opt2, patience=0, factor=0.1, min_lr=[0.05, 0.05])
    driven.update(1.0)
    assert driven.update(1.0) is True
    assert [g["lr"] for g in opt2.param_groups] == [pytest.approx(0.1), 0.05]
    assert driven.get_last_lr() == [pytest.approx(0.1), 0.05]
    assert driven.update(1.0) is True and driven.update(1.0) is False  # 0.1 -> 0.05, then nothing moves


def test_plateau_rejects_schedule_groups_and_checks_state():
    w = np.zeros(1)
    with pytest.raises(TypeError, match="schedule as lr"):
        S.ReduceLROnPlateau(fo.SGD(w, lr=S.constant(0.1)))
    with pytest.raises(ValueError, match="2 param groups"):
        S.ReduceLROnPlateau(fo.SGD([{"params": [w]}, {"params": [np.zeros(1)]}], lr=0.1), min_lr=[0.1])
    p = S.ReduceLROnPlateau(0.1, patience=0)
    p.update(1.0)
    p.update(2.0)
    sd = p.state_dict()
    q = S.ReduceLROnPlateau(0.1, patience=0)
    with pytest.raises(ValueError, match="keys"):
        q.load_state_dict({"best": 1.0})
    assert q.lr == 0.1
    q.load_state_dict(sd)
    assert q.state_dict() == sd and q.lr == pytest.approx(0.01)
