"""state_dict / load_state_dict: a round trip continues bit-for-bit; a dict from another
optimizer, other options or other shapes is refused whole, before anything changes."""

import copy

import numpy as np
import pytest
from registry import CASES

import fastopt as fo


def _train(opt, params, grads):
    for g in grads:
        opt.step([gi.copy() for gi in g])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_round_trip_continues_identically(case, rng):
    shapes = [(4, 5), (7,)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(8)]

    a = [p.copy() for p in init]
    opt_a = case.make(a)
    _train(opt_a, a, grads[:4])
    saved = opt_a.state_dict()
    saved_params = [p.copy() for p in a]
    _train(opt_a, a, grads[4:])

    b = saved_params
    opt_b = case.make(b)
    opt_b.load_state_dict(copy.deepcopy(saved))
    assert opt_b.step_count == 4
    _train(opt_b, b, grads[4:])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_state_dict_is_plain_and_a_snapshot():
    w = np.ones(3, np.float32)
    opt = fo.Adam([w], lr=0.1)
    opt.step([np.ones(3, np.float32)])
    sd = opt.state_dict()
    assert sd["optimizer"] == "Adam" and sd["step_count"] == 1
    assert sd["param_groups"][0]["params"] == [0] and sd["param_groups"][0]["lr"] == 0.1
    m = sd["state"][0]["exp_avg"]
    assert isinstance(m, np.ndarray) and m.dtype == np.float32
    opt.step([np.ones(3, np.float32)])
    np.testing.assert_allclose(m, 0.1)  # a copy: later steps do not change it


def test_load_restores_hyper_parameters():
    w = np.ones(3, np.float32)
    opt = fo.SGD([w], lr=0.1, momentum=0.9)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.5
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.5
    opt.step([np.ones(3, np.float32)])
    np.testing.assert_allclose(w, 0.5)


def test_edited_buffers_are_used():
    """DESIGN: load_state_dict accepts edited values (e.g. a square average started at one)."""
    w = np.zeros(4, np.float64)
    opt = fo.RMSprop([w], lr=0.1, alpha=0.5, eps=0.0)
    sd = opt.state_dict()
    sd["state"][0]["square_avg"] = np.ones(4)
    opt.load_state_dict(sd)
    opt.step([np.ones(4)])
    np.testing.assert_allclose(w, -0.1)  # v = 0.5 * 1 + 0.5 * 1 = 1


def test_schedule_lr_survives_round_trip():
    w = np.ones(2, np.float32)
    sched = lambda n: 0.1 / (n + 1)  # noqa: E731
    opt = fo.SGD([w], lr=sched)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr"] is None
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] is sched


def _adam_with_state():
    w = np.ones((2, 3), np.float32)
    opt = fo.Adam([w], lr=0.1)
    opt.step([np.ones_like(w)])
    return opt, w


BAD_DICTS = [
    ("not-a-dict", lambda sd: [sd], TypeError, "must be a dict"),
    ("other-optimizer", lambda sd: {**sd, "optimizer": "SGD"}, ValueError, "from optimizer 'SGD', not 'Adam'"),
    ("sgd-state-dict", lambda sd: fo.SGD([np.ones((2, 3), np.float32)], momentum=0.9).state_dict(), ValueError,
     "from optimizer 'SGD'"),
    ("other-format", lambda sd: {**sd, "format": 99}, ValueError, "format 99"),
    ("missing-buffer", lambda sd: _edit(sd, lambda s: s.pop("exp_avg")), ValueError, "has state"),
    ("foreign-buffer", lambda sd: _edit(sd, lambda s: s.update(momentum_buffer=s["exp_avg"])), ValueError, "has state"),
    ("amsgrad-mismatch", lambda sd: _group(sd, amsgrad=True), ValueError, "max_exp_avg_sq"),
    ("wrong-shape", lambda sd: _edit(sd, lambda s: s.update(exp_avg=np.zeros(6, np.float32))), ValueError,
     r"exp_avg has shape \(6,\)"),
    ("wrong-dtype", lambda sd: _edit(sd, lambda s: s.update(exp_avg=np.zeros((2, 3)))), TypeError, "dtype float64"),
    ("not-an-array", lambda sd: _edit(sd, lambda s: s.update(exp_avg=[0.0] * 6)), TypeError, "must be a NumPy array"),
    ("negative-step", lambda sd: _edit(sd, lambda s: s.update(step=-1)), ValueError, "step must be an integer"),
    ("bad-hyper", lambda sd: _group(sd, lr=-1.0), ValueError, "Invalid learning rate"),
    ("unknown-option", lambda sd: _group(sd, momentum=0.9), ValueError, "has options"),
    ("two-groups", lambda sd: {**sd, "param_groups": sd["param_groups"] * 2}, ValueError, "2 param groups"),
    ("no-state", lambda sd: {**sd, "state": {}}, ValueError, "state for 0 parameters"),
]


def _edit(sd, fn):
    sd = copy.deepcopy(sd)
    fn(sd["state"][0])
    return sd


def _group(sd, **changes):
    sd = copy.deepcopy(sd)
    sd["param_groups"][0].update(changes)
    return sd


@pytest.mark.parametrize("make_bad,exc,pattern", [c[1:] for c in BAD_DICTS], ids=[c[0] for c in BAD_DICTS])
def test_bad_state_dict_is_refused_and_changes_nothing(make_bad, exc, pattern):
    opt, w = _adam_with_state()
    before = opt.state_dict()
    with pytest.raises(exc, match=pattern):
        opt.load_state_dict(make_bad(opt.state_dict()))
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, v in before["state"][0].items():
        np.testing.assert_array_equal(after["state"][0][k], v)
