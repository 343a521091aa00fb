"""A step is all or nothing: each failure mode x every optimizer (list and FlatParams engines,
with and without gradient transforms) raises a clear error, and afterwards every parameter,
state buffer, host scalar and counter is bit-identical to what it was before the call.

Each failure hits the *second* param group, so a step that updates parameters while it
plans or checks them (the old loop) leaves the first group updated and fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
from registry import CASES

import fastopt as fo
from fastopt.kernels import RULES

f32 = np.float32
SHAPES = [(4, 5), (7,)]
TRANSFORMS = {"plain": {}, "clip-skip": {"clip_grad_norm": 1.0, "skip_nonfinite": True}}


def _foreign_option(opt) -> str:
    """An option of another fastopt optimizer (``momentum`` for Adam): a mistake, not a user key."""
    return sorted({k for m in RULES.values() for k in m.CHECKS} - set(opt.kernel.CHECKS))[0]


def _set(group, key, value):
    group[key] = value


def _read_only(opt, params):
    params[1].flags.writeable = False


# (id, edit(opt, params) applied before the failing step, exception, message regex)
MODES = [
    ("lr-overflows-float32", lambda o, p: _set(o.param_groups[1], "lr", 1e39), ValueError, "non-finite"),
    ("invalid-lr-edit", lambda o, p: _set(o.param_groups[1], "lr", -1.0), ValueError, "param group 1: Invalid"),
    ("ior-invalid-lr", lambda o, p: o.param_groups[1].__ior__({"lr": float("nan")}), ValueError, "Invalid"),
    ("schedule-bad-value", lambda o, p: _set(o.param_groups[1], "lr", lambda n: float("inf")), ValueError,
     "Invalid learning rate"),
    ("option-deleted", lambda o, p: o.param_groups[1].pop("lr"), ValueError, "param group 1 has no 'lr'"),
    ("foreign-option", lambda o, p: _set(o.param_groups[1], _foreign_option(o), 0.5), TypeError,
     "unknown option"),
    ("group-deleted", lambda o, p: o.param_groups.pop(0), ValueError, "has 1 groups"),
    ("group-appended", lambda o, p: o.param_groups.append(dict(o.param_groups[1])), ValueError, "has 3 groups"),
    ("group-not-a-dict", lambda o, p: o.param_groups.__setitem__(1, list(o.param_groups[1].items())), TypeError,
     "must be a dict"),
    ("params-replaced", lambda o, p: _set(o.param_groups[1], "params", [np.zeros(7, f32)]), ValueError,
     "no longer holds"),
    ("params-mutated", lambda o, p: o.param_groups[1]["params"].append(np.zeros(3, f32)), ValueError,
     "no longer holds"),
    ("params-swapped", lambda o, p: o.param_groups.reverse(), ValueError, "no longer holds"),
    ("param-made-read-only", _read_only, ValueError, "read-only"),
]

FLAT_MODES = [m for m in MODES if m[0] not in ("params-mutated", "param-made-read-only")] + [
    ("buffer-made-read-only", lambda o, flat: setattr(flat.buffer.flags, "writeable", False), ValueError,
     "read-only"),
]


def snapshot(opt, arrays) -> tuple:
    state = opt.state
    entries = state.values() if isinstance(state, dict) else state
    return ([a.tobytes() for a in arrays],
            [{k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in e.items()} for e in entries],
            opt.step_count, opt.skipped_steps, opt.last_grad_norm, opt.last_step_skipped)


def _grads(rng):
    return [rng.standard_normal(s).astype(f32) for s in SHAPES]


@pytest.mark.parametrize("transforms", list(TRANSFORMS), ids=list(TRANSFORMS))
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_failed_step_changes_nothing(case, mode, transforms, rng):
    _, edit, exc, pattern = mode
    params = [rng.standard_normal(s).astype(f32) for s in SHAPES]
    opt = case.cls([{"params": [params[0]]}, {"params": [params[1]]}], **case.options, **TRANSFORMS[transforms])
    for _ in range(2):
        opt.step(_grads(rng))
    before = snapshot(opt, params)
    edit(opt, params)
    with pytest.raises(exc, match=pattern):
        opt.step(_grads(rng))
    assert snapshot(opt, params) == before


@pytest.mark.parametrize("mode", FLAT_MODES, ids=[m[0] for m in FLAT_MODES])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_failed_flat_step_changes_nothing(case, mode, rng):
    _, edit, exc, pattern = mode
    flat = fo.FlatParams({"w": SHAPES[0], "b": SHAPES[1]}, dtype=f32)
    flat.buffer[:] = rng.standard_normal(flat.buffer.size).astype(f32)
    opt = case.cls([{"params": flat.select("w")}, {"params": flat.select("b")}], **case.options)

    def grad():
        g = flat.zeros_like()
        g["w"][...], g["b"][...] = _grads(rng)
        return g

    for _ in range(2):
        opt.step(grad())
    before = snapshot(opt, [flat.buffer])
    if mode[0] in ("params-replaced",):
        edit = lambda o, f: _set(o.param_groups[1], "params", flat.select("w"))  # noqa: E731
    edit(opt, flat)
    with pytest.raises(exc, match=pattern):
        opt.step(grad())
    assert snapshot(opt, [flat.buffer]) == before


@pytest.mark.parametrize("rule", ["adam", "nadam", "radam", "adamax"])
def test_loaded_state_that_overflows_the_plan_is_refused_before_the_step(rule, rng):
    """A state dict's step or host scalar that would make a bias correction or denominator
    non-finite is refused by load_state_dict; if it got in anyway (edited live state), the
    step refuses it before any launch."""
    cls = {"adam": fo.Adam, "nadam": fo.NAdam, "radam": fo.RAdam, "adamax": fo.Adamax}[rule]
    params = [rng.standard_normal(s).astype(f32) for s in SHAPES]
    opt = cls(params, lr=0.01)
    opt.step(_grads(rng))
    sd = opt.state_dict()
    sd["state"][1]["step"] = 10**400
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="step must be an integer"):
        opt.load_state_dict(sd)
    assert snapshot(opt, params) == before
    opt._slots[1].step = 10**400  # past the loader: the step itself must refuse it
    with pytest.raises(ValueError, match="cannot be computed|non-finite"):
        opt.step(_grads(rng))
    after = snapshot(opt, params)
    assert after[0] == before[0] and after[2] == before[2]


def test_nadam_mu_product_that_zeroes_a_denominator(rng):
    params = [rng.standard_normal(s).astype(f32) for s in SHAPES]
    opt = fo.NAdam(params, lr=0.01)
    opt.step(_grads(rng))
    mu = 0.9 * (1.0 - 0.5 * 0.96 ** (2 * 4e-3))
    sd = opt.state_dict()
    sd["state"][1]["mu_product"] = 1.0 / mu
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="mu_product"):
        opt.load_state_dict(sd)
    assert snapshot(opt, params) == before
    opt._slots[1].host = {"mu_product": 1.0 / mu}  # past the loader: the step refuses it
    with pytest.raises(ValueError, match="cannot be computed|non-finite"):
        opt.step(_grads(rng))
    assert snapshot(opt, params)[0] == before[0]
