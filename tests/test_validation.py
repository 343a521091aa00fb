"""Bad input raises a clear TypeError/ValueError before any buffer is modified.

The error cases are data (like torch's ``ErrorOptimizerInput``): each builds its arguments,
names the exception and a regex its message must match.
"""

import re

import numpy as np
import pytest

import fastopt as fo

f32 = np.float32


def P(n=6, dtype=f32):
    return np.arange(n, dtype=dtype) / 10


CONSTRUCTION_ERRORS = [
    # (id, factory, exception, message regex)
    ("negative-lr", lambda: fo.Adam([P()], lr=-1.0), ValueError, "Invalid learning rate"),
    ("nan-lr", lambda: fo.SGD([P()], lr=float("nan")), ValueError, "Invalid learning rate"),
    ("inf-lr", lambda: fo.SGD([P()], lr=float("inf")), ValueError, "Invalid learning rate"),
    ("string-lr", lambda: fo.SGD([P()], lr="0.1"), TypeError, "lr must be a real number or a callable"),
    ("beta1-one", lambda: fo.Adam([P()], betas=(1.0, 0.999)), ValueError, "beta parameter at index 0"),
    ("beta2-negative", lambda: fo.Adam([P()], betas=(0.9, -0.1)), ValueError, "beta parameter at index 1"),
    ("beta-nan", lambda: fo.NAdam([P()], betas=(float("nan"), 0.9)), ValueError, "beta parameter at index 0"),
    ("betas-not-pair", lambda: fo.Adam([P()], betas=0.9), TypeError, "betas must be a pair"),
    ("negative-eps", lambda: fo.Adam([P()], eps=-1e-8), ValueError, "Invalid eps"),
    ("negative-wd", lambda: fo.AdamW([P()], weight_decay=-0.1), ValueError, "Invalid weight_decay"),
    ("negative-momentum", lambda: fo.SGD([P()], momentum=-0.9), ValueError, "Invalid momentum"),
    ("nesterov-no-momentum", lambda: fo.SGD([P()], nesterov=True), ValueError, "Nesterov momentum requires"),
    ("nesterov-dampening", lambda: fo.SGD([P()], momentum=0.9, dampening=0.1, nesterov=True), ValueError,
     "zero dampening"),
    ("rho-above-one", lambda: fo.Adadelta([P()], rho=1.5), ValueError, "Invalid rho"),
    ("negative-lr-decay", lambda: fo.Adagrad([P()], lr_decay=-1), ValueError, "Invalid lr_decay"),
    ("negative-alpha", lambda: fo.RMSprop([P()], alpha=-0.1), ValueError, "Invalid alpha"),
    ("bad-momentum-init", lambda: fo.SGD([P()], momentum=0.9, momentum_init="ones"), ValueError,
     "Invalid momentum_init"),
    ("amsgrad-not-bool", lambda: fo.Adam([P()], amsgrad="yes"), TypeError, "amsgrad must be a bool"),
    ("unknown-option", lambda: fo.Adam([P()], momentum=0.9), TypeError, "unexpected keyword"),
    ("positional-option", lambda: fo.Adam([P()], 0.1), TypeError, "positional"),
    ("unknown-group-option", lambda: fo.Adam([{"params": [P()], "momentum": 0.9}]), TypeError,
     "param group 0 has unknown option"),
    ("bad-group-value", lambda: fo.Adam([{"params": [P()]}, {"params": [P()], "lr": -1}]), ValueError,
     "param group 1: Invalid learning rate"),
    ("group-without-params", lambda: fo.Adam([{"lr": 0.1}]), ValueError, "no 'params'"),
    ("empty", lambda: fo.Adam([]), ValueError, "empty parameter list"),
    ("params-dict", lambda: fo.Adam({"w": P()}), TypeError, "not a dict"),
    ("int-dtype", lambda: fo.Adam([np.arange(4)]), TypeError, "dtype int64"),
    ("float16", lambda: fo.Adam([P(dtype=np.float16)]), TypeError, "dtype float16"),
    ("list-param", lambda: fo.Adam([[1.0, 2.0]]), TypeError, "must be a NumPy array"),
    ("non-contiguous", lambda: fo.Adam([np.zeros((4, 4), f32)[:, 1]]), ValueError, "not C-contiguous"),
    ("fortran-order", lambda: fo.Adam([np.asfortranarray(np.zeros((3, 4), f32))]), ValueError, "not C-contiguous"),
    ("read-only", lambda: fo.Adam([np.frombuffer(bytes(16), dtype=f32)]), ValueError, "read-only"),
    ("same-array-twice", lambda: (lambda p: fo.Adam([p, p]))(P()), ValueError, "share memory"),
    ("overlapping-views", lambda: (lambda b: fo.Adam([b[:6], b[4:]]))(P(10)), ValueError, "share memory"),
]


@pytest.mark.parametrize("factory,exc,pattern", [c[1:] for c in CONSTRUCTION_ERRORS],
                         ids=[c[0] for c in CONSTRUCTION_ERRORS])
def test_construction_errors(factory, exc, pattern):
    with pytest.raises(exc, match=pattern):
        factory()


def _two_param_adam():
    w, b = P(6), P(3)
    return fo.Adam([w, b], lr=0.1), w, b


STEP_ERRORS = [
    ("too-few-grads", lambda w, b: [np.ones_like(w)], ValueError, "got 1 gradients for 2 parameters"),
    ("too-many-grads", lambda w, b: [np.ones_like(w)] * 3, ValueError, "got 3 gradients"),
    ("single-array-for-two", lambda w, b: np.ones_like(w), TypeError, "one gradient array for 2 parameters"),
    ("not-a-sequence", lambda w, b: 3.0, TypeError, "sequence of gradients"),
    ("wrong-dtype", lambda w, b: [np.ones_like(w), np.ones(3, np.float64)], TypeError,
     "gradient 1 has dtype float64 but its parameter has dtype float32"),
    ("wrong-shape", lambda w, b: [np.ones_like(w), np.ones(4, f32)], ValueError,
     r"gradient 1 has shape \(4,\) but its parameter has shape \(3,\)"),
    ("non-contiguous-grad", lambda w, b: [np.ones(12, f32)[::2], np.ones_like(b)], ValueError, "not C-contiguous"),
    ("grad-is-param", lambda w, b: [np.ones_like(w), b], ValueError, "shares memory with its parameter"),
    ("list-grad", lambda w, b: [[1.0] * 6, np.ones_like(b)], TypeError, "must be a NumPy array"),
]


@pytest.mark.parametrize("make_grads,exc,pattern", [c[1:] for c in STEP_ERRORS], ids=[c[0] for c in STEP_ERRORS])
def test_step_errors_leave_everything_untouched(make_grads, exc, pattern):
    opt, w, b = _two_param_adam()
    opt.step([np.full_like(w, 0.5), np.full_like(b, -0.5)])  # some non-trivial state first
    before = opt.state_dict()
    w0, b0 = w.copy(), b.copy()
    with pytest.raises(exc, match=pattern):
        opt.step(make_grads(w, b))
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(b, b0)
    after = opt.state_dict()
    assert after["step_count"] == before["step_count"] == 1
    for i in before["state"]:
        for k, v in before["state"][i].items():
            np.testing.assert_array_equal(after["state"][i][k], v)


def test_group_edited_to_bad_value_fails_before_any_update():
    w, b = P(6), P(3)
    opt = fo.SGD([{"params": [w]}, {"params": [b]}], lr=0.1, momentum=0.9)
    opt.param_groups[1]["momentum"] = -1.0
    w0 = w.copy()
    with pytest.raises(ValueError, match="param group 1: Invalid momentum"):
        opt.step([np.ones_like(w), np.ones_like(b)])
    np.testing.assert_array_equal(w, w0)  # group 0 was not updated either


def test_schedule_returning_bad_lr_fails_before_any_update():
    w = P(6)
    opt = fo.Adam([w], lr=lambda n: 0.1 if n < 1 else float("nan"))
    opt.step([np.ones_like(w)])
    w1 = w.copy()
    with pytest.raises(ValueError, match="Invalid learning rate: nan"):
        opt.step([np.ones_like(w)])
    np.testing.assert_array_equal(w, w1)
    assert opt.step_count == 1


def test_read_only_gradient_is_fine():
    w = P(6)
    g = np.ones_like(w)
    g.flags.writeable = False
    fo.SGD([w], lr=0.1).step([g])
    np.testing.assert_allclose(w, P(6) - 0.1)


def test_none_gradient_skips_parameter():
    opt, w, b = _two_param_adam()
    b0 = b.copy()
    opt.step([np.ones_like(w), None])
    np.testing.assert_array_equal(b, b0)
    assert opt.state[0]["step"] == 1 and opt.state[1]["step"] == 0


def test_messages_name_the_parameter_in_groups():
    w, b = P(6), np.zeros(3, np.int32)
    with pytest.raises(TypeError, match=re.escape("param group 1, parameter 0 has dtype int32")):
        fo.Adam([{"params": [w]}, {"params": [b]}])
