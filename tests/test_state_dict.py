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


# -- round trips after every toggle of every option that adds or removes a buffer --------
TOGGLES = [
    # (id, class, base options, successive edits of group 0)
    ("sgd-momentum", fo.SGD, {"lr": 0.1}, [{"momentum": 0.9}, {"momentum": 0.0}, {"momentum": 0.5}]),
    ("sgd-nesterov", fo.SGD, {"lr": 0.1, "momentum": 0.9}, [{"nesterov": True}, {"nesterov": False, "momentum": 0.0},
                                                           {"momentum": 0.9, "nesterov": True}]),
    ("sgd-momentum-zero-init", fo.SGD, {"lr": 0.1, "momentum_init": "zero"}, [{"momentum": 0.9}, {"momentum": 0.0}]),
    ("adam-amsgrad", fo.Adam, {"lr": 0.01}, [{"amsgrad": True}, {"amsgrad": False}, {"amsgrad": True}]),
    ("adamw-amsgrad", fo.AdamW, {"lr": 0.01}, [{"amsgrad": True}, {"amsgrad": False}]),
    ("rmsprop-centered", fo.RMSprop, {"lr": 0.01}, [{"centered": True}, {"centered": False}, {"centered": True}]),
    ("rmsprop-momentum", fo.RMSprop, {"lr": 0.01}, [{"momentum": 0.5}, {"momentum": 0.0, "centered": True},
                                                  {"momentum": 0.3}, {"centered": False, "momentum": 0.0}]),
    ("adagrad", fo.Adagrad, {"lr": 0.1}, [{"eps_inside_sqrt": True}, {"lr_decay": 0.1}]),
    ("adadelta", fo.Adadelta, {}, [{"maximize": True}, {"rho": 0.5}]),
    ("adamax", fo.Adamax, {"lr": 0.01}, [{"weight_decay": 0.1}, {"betas": [0.5, 0.6]}]),
    ("nadam", fo.NAdam, {"lr": 0.01}, [{"decoupled_weight_decay": True, "weight_decay": 0.1}, {"momentum_decay": 0.1}]),
    ("radam", fo.RAdam, {"lr": 0.01}, [{"decoupled_weight_decay": True, "weight_decay": 0.1}, {"betas": (0.5, 0.9)}]),
]


def _grads_at(n, shapes):
    rng = np.random.default_rng(1000 + n)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _run(opt, edits, steps_after_each=2):
    shapes = [s.shape for s in opt._slots]
    for edit in edits:
        opt.param_groups[0].update(edit)
        for _ in range(steps_after_each):
            opt.step(_grads_at(opt.step_count, shapes))
    for _ in range(2):
        opt.step(_grads_at(opt.step_count, shapes))


def _state_bytes(opt):
    return [{k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in e.items()} for e in opt.state]


@pytest.mark.parametrize("stepped", [0, 1], ids=["saved-right-after-the-edit", "saved-after-a-step"])
@pytest.mark.parametrize("toggle", TOGGLES, ids=[t[0] for t in TOGGLES])
def test_round_trip_after_every_toggle(toggle, stepped, tmp_path, rng):
    _, cls, base, edits = toggle
    shapes = [(4, 5), (7,)]
    for cut in range(len(edits)):
        params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        opt = cls(params, **base)
        _run(opt, edits[:cut])
        opt.param_groups[0].update(edits[cut])
        for _ in range(stepped):
            opt.step(_grads_at(opt.step_count, shapes))
        sd = opt.state_dict()
        fo.save(opt, tmp_path / "ckpt.npz")
        copies = [p.copy() for p in params]
        loaded = cls(copies, **base)
        loaded.load_state_dict(copy.deepcopy(sd))
        from_file = cls([np.zeros(s, np.float32) for s in shapes], **base)
        fo.load(from_file, tmp_path / "ckpt.npz")
        for other in (loaded, from_file):
            assert _state_bytes(other) == _state_bytes(opt)
        _run(opt, edits[cut + 1 :])
        for other in (loaded, from_file):
            _run(other, edits[cut + 1 :])
            for x, slot in zip(params, other._slots):
                np.testing.assert_array_equal(x, slot.param)
            assert _state_bytes(other) == _state_bytes(opt)


def test_user_keys_survive_state_dict_and_checkpoint(tmp_path):
    w = np.ones(3, np.float32)
    opt = fo.Adam([{"params": [w], "name": "w", "meta": {"layer": 3}}], lr=0.1)
    opt.step([np.ones(3, np.float32)])
    sd = opt.state_dict()
    assert sd["param_groups"][0]["name"] == "w"
    other = fo.Adam([np.ones(3, np.float32)], lr=0.1)
    other.load_state_dict(sd)
    assert other.param_groups[0]["name"] == "w" and other.param_groups[0]["meta"] == {"layer": 3}
    fo.save(opt, tmp_path / "c.npz")
    third = fo.Adam([np.ones(3, np.float32)], lr=0.1)
    fo.load(third, tmp_path / "c.npz")
    assert third.param_groups[0]["name"] == "w" and third.param_groups[0]["meta"] == {"layer": 3}
    opt.param_groups[0]["name"] = object()
    with pytest.raises(TypeError, match="cannot save param group 0 option 'name'"):
        fo.save(opt, tmp_path / "d.npz")


def test_state_dict_cannot_change_a_forced_option():
    w = np.ones(3, np.float32)
    opt = fo.AdamW([w], lr=0.1)
    sd = opt.state_dict()
    sd["param_groups"][0]["decoupled_weight_decay"] = False
    with pytest.raises(ValueError, match="AdamW always has decoupled_weight_decay=True"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["decoupled_weight_decay"] is True


@pytest.mark.parametrize("edit,pattern", [
    (lambda s: s.update(step=10**400), "step must be an integer"),
    (lambda s: s.update(step=2**60), "step must be an integer"),
    (lambda s: s.update(momentum_started=0.5), "momentum_started must be a bool"),
])
def test_loaded_step_and_host_scalars_are_checked(edit, pattern):
    w = np.ones(3, np.float32)
    opt = fo.SGD([w], lr=0.1, momentum=0.9)
    opt.step([np.ones(3, np.float32)])
    sd = opt.state_dict()
    edit(sd["state"][0])
    before = _state_bytes(opt)
    with pytest.raises(ValueError if "step" in pattern else TypeError, match=pattern):
        opt.load_state_dict(sd)
    assert _state_bytes(opt) == before


def test_checkpoint_load_into_a_read_only_parameter_changes_nothing(tmp_path):
    w, b = np.ones(3, np.float32), np.ones(2, np.float32)
    opt = fo.Adam([w, b], lr=0.1)
    opt.step([np.ones(3, np.float32), np.ones(2, np.float32)])
    fo.save(opt, tmp_path / "c.npz")
    w2, b2 = np.zeros(3, np.float32), np.zeros(2, np.float32)
    other = fo.Adam([w2, b2], lr=0.1)
    b2.flags.writeable = False
    before = _state_bytes(other)
    with pytest.raises(ValueError, match="read-only"):
        fo.load(other, tmp_path / "c.npz")
    assert _state_bytes(other) == before and other.step_count == 0
    assert not w2.any()
