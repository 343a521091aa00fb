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


# -- what each option kind accepts (torch's types where it has them) ---------------------
KIND_ERRORS = [
    ("betas-set", lambda: fo.Adam([P()], betas={0.9, 0.999}), TypeError, "betas must be a pair"),
    ("betas-ndarray", lambda: fo.Adam([P()], betas=np.array([0.9, 0.999])), TypeError, "betas must be a pair"),
    ("betas-three", lambda: fo.Adamax([P()], betas=(0.9, 0.99, 0.5)), TypeError, "betas must be a pair"),
    ("betas-string", lambda: fo.NAdam([P()], betas="ab"), TypeError, "betas must be a pair"),
    ("betas-dict", lambda: fo.RAdam([P()], betas={0.9: 1, 0.99: 2}), TypeError, "betas must be a pair"),
    ("beta-bool", lambda: fo.Adam([P()], betas=(True, 0.9)), TypeError, "must be a real number"),
    ("beta-complex", lambda: fo.Adam([P()], betas=(0.9j, 0.9)), TypeError, "must be a real number"),
    ("beta-0d-array", lambda: fo.Adam([P()], betas=(np.array(0.9), 0.9)), TypeError, "must be a real number"),
    ("lr-huge-int", lambda: fo.SGD([P()], lr=10**400), ValueError, "Invalid learning rate"),
    ("eps-huge-int", lambda: fo.Adam([P()], eps=10**400), ValueError, "Invalid eps"),
    ("wd-np-inf", lambda: fo.Adam([P()], weight_decay=np.float32("inf")), ValueError, "Invalid weight_decay"),
    ("lr-np-bool", lambda: fo.SGD([P()], lr=np.bool_(True)), TypeError, "lr must be a real number"),
    ("flag-string", lambda: fo.SGD([P()], momentum=0.9, nesterov="False"), TypeError, "nesterov must be a bool"),
    ("flag-two", lambda: fo.RMSprop([P()], centered=2), TypeError, "centered must be a bool"),
    ("flag-float", lambda: fo.Adam([P()], maximize=1.0), TypeError, "maximize must be a bool"),
    ("flag-none", lambda: fo.Adam([P()], amsgrad=None), TypeError, "amsgrad must be a bool"),
    ("choice-not-str", lambda: fo.SGD([P()], momentum=0.9, momentum_init=np.array(["grad"])), TypeError,
     "momentum_init must be a string"),
    ("choice-bytes", lambda: fo.SGD([P()], momentum=0.9, momentum_init=b"grad"), TypeError, "must be a string"),
    ("grad-noise-set", lambda: fo.SGD([P()], grad_noise={0.1, 0.55}), TypeError, "grad_noise must be a pair"),
    ("grad-noise-array", lambda: fo.SGD([P()], grad_noise=np.array([0.1, 0.55])), TypeError, "must be a pair"),
    ("skip-nonfinite-string", lambda: fo.SGD([P()], skip_nonfinite="no"), TypeError, "skip_nonfinite must be"),
    ("adamw-group-not-decoupled", lambda: fo.AdamW([{"params": [P()], "decoupled_weight_decay": False}]),
     ValueError, "AdamW always has decoupled_weight_decay=True"),
]


@pytest.mark.parametrize("factory,exc,pattern", [c[1:] for c in KIND_ERRORS], ids=[c[0] for c in KIND_ERRORS])
def test_option_kinds_are_checked(factory, exc, pattern):
    with pytest.raises(exc, match=pattern):
        factory()


def test_option_kinds_torch_accepts_are_accepted():
    w = P()
    fo.Adam([w], betas=[0.9, 0.999], amsgrad=np.bool_(True), maximize=1, lr=np.float32(0.1), eps=np.float64(1e-8))
    fo.SGD([w], momentum=np.float32(0.5), nesterov=np.True_, weight_decay=np.int64(0))
    fo.SGD([w], lr=0.1, skip_nonfinite=np.bool_(True), grad_noise=[0.1, 0.55])


def _sgd_pair(**options):
    """Two identical optimizers over copies of one parameter."""
    a, b = P(6, np.float64), P(6, np.float64)
    return a, fo.Adam([a], lr=0.1, **options), b


def _steps(opt, w, n=3):
    for i in range(n):
        opt.step([np.full_like(w, 0.5 + i)])


# -- every param-group edit takes effect at the next step or raises ----------------------
def test_in_place_betas_edit_takes_effect():
    w, opt, _ = _sgd_pair(betas=[0.9, 0.999])
    ref_w = P(6, np.float64)
    ref = fo.Adam([ref_w], lr=0.1, betas=(0.5, 0.6))
    opt.param_groups[0]["betas"][0] = 0.5  # the list the group holds, edited in place
    opt.param_groups[0]["betas"][1] = 0.6
    _steps(opt, w)
    _steps(ref, ref_w)
    np.testing.assert_array_equal(w, ref_w)


def test_in_place_betas_edit_to_invalid_raises():
    w, opt, _ = _sgd_pair(betas=[0.9, 0.999])
    opt.step([np.ones_like(w)])
    opt.param_groups[0]["betas"][1] = 1.5
    w0 = w.copy()
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        opt.step([np.ones_like(w)])
    np.testing.assert_array_equal(w, w0)


@pytest.mark.parametrize("how", ["ior", "update", "replace-dict", "setdefault-after-pop"])
def test_dict_edits_take_effect(how):
    w, opt, ref_w = _sgd_pair()
    ref = fo.Adam([ref_w], lr=0.02)
    g = opt.param_groups[0]
    if how == "ior":
        opt.param_groups[0] |= {"lr": 0.02}
    elif how == "update":
        g.update(lr=0.02)
    elif how == "replace-dict":
        opt.param_groups[0] = {**g, "lr": 0.02}
    else:
        g.pop("lr")
        g.setdefault("lr", 0.02)
    _steps(opt, w)
    _steps(ref, ref_w)
    np.testing.assert_array_equal(w, ref_w)


def test_params_replaced_by_the_same_arrays_is_fine():
    w, opt, ref_w = _sgd_pair()
    ref = fo.Adam([ref_w], lr=0.1)
    opt.param_groups[0]["params"] = [w]
    _steps(opt, w)
    opt.param_groups[0]["params"].append(P())  # the new list is watched too
    with pytest.raises(ValueError, match="no longer holds"):
        opt.step([np.ones_like(w)])
    _steps(ref, ref_w)
    np.testing.assert_array_equal(w, ref_w)


def test_forced_option_edit_raises():
    w = P()
    opt = fo.AdamW([w], lr=0.1)
    opt.param_groups[0]["decoupled_weight_decay"] = False
    with pytest.raises(ValueError, match="AdamW always has decoupled_weight_decay=True"):
        opt.step([np.ones_like(w)])


def test_user_keys_are_kept_and_never_read():
    w, b = P(), P(3)
    opt = fo.Adam([{"params": [w], "name": "weights", "tags": ["x"]}, {"params": [b]}], lr=0.1)
    assert opt.param_groups[0]["name"] == "weights"
    opt.param_groups[1]["note"] = {"frozen": False}
    ref_w, ref_b = P(), P(3)
    ref = fo.Adam([ref_w, ref_b], lr=0.1)
    for o, arrays in ((opt, (w, b)), (ref, (ref_w, ref_b))):
        o.step([np.ones_like(a) for a in arrays])
    np.testing.assert_array_equal(w, ref_w)
    assert opt.state_dict()["param_groups"][1]["note"] == {"frozen": False}


def test_kernel_functions_check_grad_scale_and_host_state():
    from fastopt import kernels

    w = P()
    state = kernels.init_state("nadam", w)
    for bad in (float("nan"), float("inf"), None, "1"):
        with pytest.raises((TypeError, ValueError), match="grad_scale"):
            kernels.adam_step(w, np.ones_like(w), kernels.init_state("adam", w), step=1, grad_scale=bad)
    w0 = w.copy()
    with pytest.raises(ValueError, match="mu_product"):
        kernels.nadam_step(w, np.ones_like(w), {**state, "host": {"mu_product": 7.0}}, step=1)
    np.testing.assert_array_equal(w, w0)
